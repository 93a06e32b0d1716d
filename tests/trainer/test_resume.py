"""Checkpoints and --resume: a run killed with SIGKILL and resumed reaches the same parameters as an uninterrupted
run of the same length (CPU), and its logs hold each step once."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dypo import checkpoint
from dypo.train import main

REPO = Path(__file__).resolve().parents[2]
RUN = ["--max_steps", "30", "--save_steps", "5", "--save_total_limit", "3", "--logging_steps", "10",
       "--sample_steps", "5", "--eval_prompts", "4", "--train_batch_size", "6"]


def train(*args, wait=True):
    process = subprocess.Popen([sys.executable, "-m", "dypo.train", *args], cwd=REPO, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    if wait:
        assert process.wait(timeout=300) == 0, process.stderr.read()
    return process


def final_weights(run):
    return load_file(str(checkpoint.checkpoints(run)[-1] / "model.safetensors"))


def test_a_killed_run_resumes_to_the_same_parameters(tmp_path):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    train(*RUN, "--output_dir", str(whole))
    process = train(*RUN, "--output_dir", str(killed), wait=False)
    deadline = time.monotonic() + 240
    while not (killed / "checkpoint-10").exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    done = checkpoint.checkpoints(killed)
    assert done and int(done[-1].name.split("-")[1]) < 30, "the run ended before it could be killed"
    train("--resume", str(killed))
    expected, resumed = final_weights(whole), final_weights(killed)
    assert expected.keys() == resumed.keys()
    for name in expected:
        assert torch.equal(expected[name], resumed[name]), name
    steps = [json.loads(line)["step"] for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(30))
    samples = [json.loads(line)["step"] for line in (killed / "samples.jsonl").read_text().splitlines()]
    assert samples == [s for s in range(4, 30, 5) for _ in range(4)]
    assert [p.name for p in checkpoint.checkpoints(killed)] == ["checkpoint-20", "checkpoint-25", "checkpoint-30"]


def test_a_checkpoint_cut_short_is_ignored_and_resume_continues(tmp_path):
    run = tmp_path / "run"
    main(["--max_steps", "4", "--save_steps", "2", "--eval_prompts", "2", "--output_dir", str(run)])
    (run / "checkpoint-4").rename(run / ".checkpoint-4.partial")  # as if killed while writing it
    assert [p.name for p in checkpoint.checkpoints(run)] == ["checkpoint-2"]
    summary = main(["--resume", str(run), "--max_steps", "6"])
    assert summary["steps"] == 6 and [p.name for p in checkpoint.checkpoints(run)] == ["checkpoint-4",
                                                                                       "checkpoint-6"]


def test_checkpoints_load_without_pickle(tmp_path):
    run = tmp_path / "run"
    main(["--max_steps", "2", "--eval_prompts", "2", "--output_dir", str(run)])
    for name in ("optimizer.pt", "scheduler.pt", "rng.pt"):
        torch.load(run / "checkpoint-2" / name, weights_only=True)


def test_resume_with_another_model_is_a_clear_error(tmp_path, capsys):
    run = tmp_path / "run"
    main(["--max_steps", "2", "--eval_prompts", "2", "--output_dir", str(run)])
    saved = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**saved, "hidden_size": 32}))
    with pytest.raises(SystemExit) as exit_info:
        main(["--resume", str(run), "--max_steps", "3"])
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and "holds another model's weights" in error


def test_a_damaged_newest_checkpoint_is_refused_naming_the_one_before(tmp_path, capsys):
    """Not passed over: going back to checkpoint-2 would cut the logs to step 2 and rotate checkpoint-4 away. The
    error says how to go back, and nothing of the run directory changes."""
    run = tmp_path / "run"
    main(["--max_steps", "4", "--save_steps", "2", "--eval_prompts", "2", "--output_dir", str(run)])
    os.remove(run / "checkpoint-4" / "rng.pt")
    before = {path: path.read_bytes() if path.is_file() else None for path in sorted(run.rglob("*"))}
    with pytest.raises(SystemExit) as exit_info:
        main(["--resume", str(run)])
    assert exit_info.value.code == 2 and capsys.readouterr().err.strip().splitlines()[-1] == (
        f"python -m dypo.train: error: {run}/checkpoint-4 is damaged: rng.pt missing; remove that directory to "
        "resume from checkpoint-2")
    assert {path: path.read_bytes() if path.is_file() else None for path in sorted(run.rglob("*"))} == before
    shutil.rmtree(run / "checkpoint-4")  # as the error says
    summary = main(["--resume", str(run)])
    assert "resumed" in capsys.readouterr().out and summary["steps"] == 4


def test_a_checkpoint_from_before_the_extra_evaluation_sets_resumes_with_their_before_unknown(tmp_path, capsys):
    """Their "before" is not the resumed model's accuracy: it is reported as unknown (None, "?")."""
    from dypo.train import main

    run = tmp_path / "run"
    main(["--max_steps", "1", "--eval_prompts", "2", "--output_dir", str(run)])
    state_file = run / "checkpoint-1" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    del state["eval_sets_before"]
    state_file.write_text(json.dumps(state))
    capsys.readouterr()
    summary = main(["--resume", str(run), "--max_steps", "2"])
    assert summary["ood_accuracy_before"] is None and summary["validation_accuracy_before"] is None
    assert all(value["before"] is None and value["after"] is not None for value in summary["ood_sets"].values())
    assert summary["eval_accuracy_before"] == state["eval_accuracy_before"]
    assert "out of distribution: ? -> " in capsys.readouterr().out
