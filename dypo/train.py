"""``python -m dypo.train``: the trainer's command line (run.py; the method itself is trainer.py)."""

from dypo.run import main

if __name__ == "__main__":
    main()
