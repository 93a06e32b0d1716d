"""torchrun with 2 processes on CPU (gloo, FSDP2): the same data gives the single process's losses and
parameters, both ranks hold the same parameters, checkpoints resume, and mismatches are one-line errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dypo import checkpoint
from dypo.train import main

REPO = Path(__file__).resolve().parents[2]
FORCED = str(Path(__file__).with_name("forced_rollouts.py"))
RUN = ["--max_steps", "4", "--save_steps", "2", "--logging_steps", "2", "--eval_prompts", "4",
       "--num_generations", "8", "--prompts_per_step", "8", "--train_batch_size", "8"]


def run(*command):
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def torchrun(*args):
    return run(sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args)


def losses(run_dir):
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def sharded_weights(path):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(str(path / "dcp"), str(path.parent / "converted.pt"))
    state = torch.load(path.parent / "converted.pt", weights_only=False)["model"]
    return {name.removeprefix("model."): tensor for name, tensor in state.items()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("distributed")
    single, pair = root / "single", root / "pair"
    run(sys.executable, FORCED, *RUN, "--output_dir", str(single))
    torchrun(FORCED, *RUN, "--output_dir", str(pair))
    return single, pair


def test_two_ranks_match_one_process_on_the_same_data(runs):
    single, pair = runs
    assert losses(pair) == pytest.approx(losses(single), rel=1e-4, abs=1e-5)
    steps = [json.loads(line) for line in (pair / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == [0, 1, 2, 3] and all(s["updates"] == 1 for s in steps)
    expected = load_file(str(single / "checkpoint-4" / "model.safetensors"))
    got = sharded_weights(pair / "checkpoint-4")
    assert set(got) == set(expected)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-5, msg=name)


def test_both_ranks_hold_the_same_parameters(runs):
    _, pair = runs
    assert (pair / "params-rank0.sha256").read_text() == (pair / "params-rank1.sha256").read_text()
    assert sorted(p.name for p in (pair / "checkpoint-4").iterdir()) == [
        "dcp", "rng-rank0.pt", "rng-rank1.pt", "scheduler.pt", "trainer_state-rank0.json",
        "trainer_state-rank1.json", "world.json"]


def test_a_sharded_checkpoint_resumes_and_refuses_another_world_size(runs, capsys):
    _, pair = runs
    with pytest.raises(SystemExit) as exit_info:
        main(["--resume", str(pair), "--max_steps", "6"])
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and "written by 2 process(es); this run has 1" in error
    assert "torchrun --nproc_per_node 2" in error
    torchrun(FORCED, "--resume", str(pair), "--max_steps", "6")
    assert [json.loads(line)["step"] for line in (pair / "metrics.jsonl").read_text().splitlines()] == list(range(6))
    assert [p.name for p in checkpoint.checkpoints(pair)] == ["checkpoint-4", "checkpoint-6"]


def test_batch_sizes_must_divide_among_the_ranks(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(SystemExit) as exit_info:
        main(["--output_dir", str(tmp_path / "run")])
    error = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert "prompts_per_step (8) must be a multiple of the number of processes (3)" in error
