"""python -m dypo.pretrain: the built-in task's base model, and the cache of the tiny models trained by SFT before
any run (the base model and the built-in teachers of ``--teacher_models builtin``).

The base model is the embedded Qwen2 trained by SFT on a broader, easier corpus than the task (task.py's
pretraining_problems: the task's sums, the same sums spaced out, three-term sums, bare answers) for a short budget.
It answers some prompts, as a math base model does: at step 0 of a run, under sampling, most of the task's
one-digit prompts are mid, most two-digit ones hard, a few easy. Every strategy starts from it (``--init base``,
the default of the embedded model). Each model is built on first use (seconds on a CPU) and cached under
$XDG_CACHE_HOME/dypo/models (else ~/.cache/dypo/models), named by a hash of its recipe: a change of recipe or
architecture builds a new one.
"""

import argparse
import contextlib
import hashlib
import json
import os
import random
import shutil
import tempfile
import time
from pathlib import Path

import torch

from dypo import policy, task
from dypo.batches import padded_batch
from dypo.routing import Row
from dypo_kernels import fused_sft_loss

# how the base model is trained (with the run's hidden_size, num_layers and max_digits): part of its cache key
BASE_RECIPE = {"format": 1, "corpus": "base", "steps": 150, "batch_size": 32, "learning_rate": 3e-3, "seed": 0}


def cache_root() -> Path:
    """$XDG_CACHE_HOME/dypo/models, else ~/.cache/dypo/models."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dypo" / "models"


def base_recipe(config):
    return {**BASE_RECIPE, "hidden_size": config.hidden_size, "num_layers": config.num_layers,
            "max_digits": config.max_digits}


def base_model(config, say=print) -> Path:
    """The directory of the base model for ``config``'s architecture and task, built first if it is not cached."""
    return cached_model(base_recipe(config), say)


def cached_model(recipe, say=print) -> Path:
    """The directory of the tiny model of ``recipe``: from the cache, or trained and saved there first (written
    under a temporary name and renamed, so a concurrent or killed build never leaves a partial one)."""
    key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]
    final = cache_root() / f"{recipe['corpus']}-{key}"
    if (final / "config.json").is_file():
        return final
    started = time.monotonic()
    model = train_tiny(recipe)
    final.parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(prefix=f".{recipe['corpus']}-{key}-", dir=final.parent))
    try:
        model.save_pretrained(temporary)
        (temporary / "recipe.json").write_text(json.dumps(recipe, indent=2))
        os.replace(temporary, final)
    except OSError:
        if not (final / "config.json").is_file():  # not a concurrent build that won the rename
            raise
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    say(f"built the {recipe['corpus']} model of the built-in task in {time.monotonic() - started:.1f} s: {final}")
    return final


def solutions(recipe, rng):
    """One batch of (problem, solution text) of the recipe's corpus: the base corpus with bare answers, or the
    task's problems in one teacher's style (``corpus`` "teacher", ``style`` its index)."""
    count, digits = recipe["batch_size"], recipe["max_digits"]
    if recipe["corpus"] == "base":
        return [(p, p.answer) for p in task.pretraining_problems(rng, count, digits)]
    return [(p, p.teacher_solutions[recipe["style"]]) for p in task.make_problems(rng, count, digits)]


@contextlib.contextmanager
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def train_tiny(recipe):
    """A tiny Qwen2 of the recipe's architecture trained on CPU by SFT (fused_sft_loss) on fresh batches of its
    corpus, on one CPU thread (its many small operations run several times faster so on a busy machine); the
    caller's torch random state and thread count are left as they were."""
    from dypo.config import Config

    codec = policy.CharCodec()
    rng = random.Random(recipe["seed"])
    with _one_thread(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe["seed"])
        model = policy.tiny_model(Config(hidden_size=recipe["hidden_size"], num_layers=recipe["num_layers"]),
                                  codec.tokenizer.vocab_size, "sdpa")
        head = policy.FusedHead(model.train(), policy.Runtime(torch.device("cpu")))
        optimizer = torch.optim.AdamW(model.parameters(), lr=recipe["learning_rate"])
        for _ in range(recipe["steps"]):
            rows = []
            for problem, solution in solutions(recipe, rng):
                prompt = codec.prompt_ids(problem.prompt)
                rows.append(Row(prompt + codec.solution_ids(solution), len(prompt)))
            ids, attention, targets, mask = padded_batch(rows, codec.pad_id)
            loss = head(ids, attention, lambda hidden, weight, bias: fused_sft_loss(hidden, weight, targets,
                                                                                    mask=mask, bias=bias))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return model.eval()


def main(argv=None):
    from dypo.config import Config

    parser = argparse.ArgumentParser(prog="python -m dypo.pretrain", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = Config()
    for name in ("hidden_size", "num_layers", "max_digits"):
        parser.add_argument(f"--{name}", type=int, default=getattr(defaults, name),
                            help=f"as python -m dypo.train's (default: {getattr(defaults, name)})")
    args = parser.parse_args(argv)
    print(base_model(Config(**vars(args))))


if __name__ == "__main__":
    main()
