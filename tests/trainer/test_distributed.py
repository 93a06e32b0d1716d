"""torchrun with 2 processes on CPU (gloo, FSDP2): the same data gives the single process's losses and
parameters, both ranks hold the same parameters, checkpoints resume, and mismatches are one-line errors."""

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
FORCED = str(Path(__file__).with_name("forced_rollouts.py"))
# dapo (one token count over the whole update) and every teacher solution (uneven sequences per prompt): exact
# across ranks and micro-batches only because each part is normalised by the whole update's totals
RUN = ["--max_steps", "6", "--save_steps", "3", "--logging_steps", "3", "--eval_prompts", "4",
       "--num_generations", "8", "--prompts_per_step", "8", "--train_batch_size", "8", "--loss_type", "dapo",
       "--sft_teachers", "all"]


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "GLOO_SOCKET_IFNAME": "lo"}
# gloo's TCP transport on this sandbox has (rarely) broken a pair between two healthy ranks ("Connection reset by
# peer" / EnforceNotMet); a launch that fails that way, and only that way, is retried once
TRANSPORT_FAILURES = ("gloo/transport/tcp", "EnforceNotMet")


def run(*command, retry=False):
    for attempt in range(2 if retry else 1):
        result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600, env=ENV)
        if result.returncode == 0 or not any(failure in result.stderr for failure in TRANSPORT_FAILURES):
            break
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def torchrun(*args):
    return run(sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args,
               retry=True)


def losses(run_dir):
    return [json.loads(line).get("loss") for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


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
    # the pair also cuts its work into micro-batches (uneven: 3 + 1 prompts per rank)
    torchrun(FORCED, *RUN, "--micro_batch_size", "3", "--log_prob_micro_batch_size", "5", "--output_dir", str(pair))
    return single, pair


def test_two_ranks_match_one_process_on_the_same_data(runs):
    single, pair = runs
    steps = [[json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()] for run in runs]
    for key in ("step", "updates", "queued_prompts", "share_easy", "share_hard"):
        assert [s[key] for s in steps[1]] == [s[key] for s in steps[0]], key
    assert 0 in [s["updates"] for s in steps[0]] and any(s["share_easy"] for s in steps[0])  # groups carried over
    expected_losses, got_losses = losses(single), losses(pair)
    assert [loss is None for loss in got_losses] == [loss is None for loss in expected_losses]
    assert [loss for loss in got_losses if loss is not None] == pytest.approx(
        [loss for loss in expected_losses if loss is not None], rel=1e-4, abs=1e-5)
    expected = load_file(str(single / "checkpoint-6" / "model.safetensors"))
    got = sharded_weights(pair / "checkpoint-6")
    assert set(got) == set(expected)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-3, atol=1e-4, msg=name)  # float order: ~3e-5


def test_both_ranks_hold_the_same_parameters(runs):
    _, pair = runs
    assert (pair / "params-rank0.sha256").read_text() == (pair / "params-rank1.sha256").read_text()
    assert sorted(p.name for p in (pair / "checkpoint-6").iterdir()) == [
        "dcp", "rng-rank0.pt", "rng-rank1.pt", "scheduler.pt", "trainer_state-rank0.json",
        "trainer_state-rank1.json", "world.json"]


def test_a_sharded_checkpoint_resumes_on_two_ranks_or_on_one(runs, tmp_path):
    _, pair = runs
    alone = tmp_path / "alone"
    shutil.copytree(pair, alone)
    torchrun(FORCED, "--resume", str(pair), "--max_steps", "8")
    assert [json.loads(line)["step"] for line in (pair / "metrics.jsonl").read_text().splitlines()] == list(range(8))
    assert [p.name for p in checkpoint.checkpoints(pair)] == ["checkpoint-6", "checkpoint-8"]
    run(sys.executable, FORCED, "--resume", str(alone), "--max_steps", "8")  # 2 ranks -> 1: DCP reshards
    assert [json.loads(line)["step"] for line in (alone / "metrics.jsonl").read_text().splitlines()] == list(range(8))
    # rollouts are forced, so going on alone gives what going on as a pair gives: the weights and optimizer loaded
    assert [loss for loss in losses(alone)[6:] if loss] == pytest.approx(
        [loss for loss in losses(pair)[6:] if loss], rel=1e-4)
    expected, got = sharded_weights(pair / "checkpoint-8"), load_file(str(alone / "checkpoint-8" / "model.safetensors"))
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-3, atol=1e-4, msg=name)


def test_a_missing_shard_is_a_clear_error(runs, tmp_path, capsys):
    _, pair = runs
    damaged = tmp_path / "damaged"
    shutil.copytree(pair, damaged)
    newest = checkpoint.checkpoints(damaged)[-1]
    (newest / "dcp" / "__1_0.distcp").unlink()
    with pytest.raises(SystemExit) as exit_info:
        main(["--resume", str(damaged)])
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and "cannot be loaded (shard files missing: __1_0.distcp)" in error


@pytest.mark.parametrize("name,message", [("trainer_state-rank0.json", "is unreadable"),
                                          ("scheduler.pt", "is unreadable (PytorchStreamReader"),
                                          ("world.json", "is unreadable")])
def test_a_damaged_sharded_checkpoint_file_is_named(runs, tmp_path, capsys, name, message):
    _, pair = runs
    damaged = tmp_path / "damaged"
    shutil.copytree(pair, damaged)
    *_, older, newest = checkpoint.checkpoints(damaged)  # which ones: the runs earlier tests resumed
    data = (newest / name).read_bytes()
    (newest / name).write_bytes(data[:len(data) // 2])
    with pytest.raises(SystemExit) as exit_info:
        main(["--resume", str(damaged)])
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and f"{newest} is damaged: {name} {message}" in error
    assert error.strip().endswith(f"remove that directory to resume from {older.name}")


def test_a_single_process_checkpoint_is_refused_under_torchrun(runs, capsys):
    single, _ = runs
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             FORCED, "--resume", str(single), "--max_steps", "8"], cwd=REPO, capture_output=True,
                            text=True, timeout=300, env=ENV)
    assert result.returncode != 0 and "was written by one process: resume it without torchrun" in result.stderr


def test_real_rollouts_and_an_eval_prompt_fewer_than_the_ranks(tmp_path):
    """The real generate() under FSDP2 (parameters gathered once per step), and evaluation with one prompt for two
    ranks (the rank without a prompt still takes part in the gathering)."""
    torchrun("-m", "dypo.train", "--max_steps", "2", "--eval_prompts", "1", "--logging_steps", "1",
             "--ddp_timeout", "60", "--output_dir", str(tmp_path / "run"))
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["eval_prompts"] == 1


def test_batch_sizes_must_divide_among_the_ranks(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(SystemExit) as exit_info:
        main(["--output_dir", str(tmp_path / "run")])
    error = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert "prompts_per_step (8) must be a multiple of the number of processes (3)" in error


def test_a_dead_rank_ends_the_run_and_the_last_checkpoint_stays_loadable(tmp_path):
    """torchrun's agent ends the surviving rank (--ddp_timeout bounds a collective's wait where no agent does)."""
    run_dir = tmp_path / "run"
    launcher = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", FORCED,
         "--max_steps", "500", "--save_steps", "2", "--eval_prompts", "2", "--ddp_timeout", "30", "--output_dir",
         str(run_dir)], cwd=REPO, stdout=subprocess.DEVNULL, stderr=open(tmp_path / "launcher.log", "w"), env=ENV)
    try:
        deadline = time.monotonic() + 240
        while not (run_dir.exists() and len(checkpoint.checkpoints(run_dir)) >= 2):
            assert launcher.poll() is None and time.monotonic() < deadline, "no checkpoints were written"
            time.sleep(0.05)
        workers = subprocess.run(["pgrep", "-P", str(launcher.pid)], capture_output=True, text=True).stdout.split()
        assert len(workers) == 2, workers
        os.kill(int(workers[1]), signal.SIGKILL)  # while the run goes on writing checkpoints every 2 steps
        killed_at = time.monotonic()
        assert launcher.wait(timeout=120) != 0, (tmp_path / "launcher.log").read_text()[-3000:]
        assert time.monotonic() - killed_at < 60
    finally:
        launcher.kill()
    newest = checkpoint.checkpoints(run_dir)[-1]
    assert sharded_weights(newest)  # complete and loadable
    torchrun(FORCED, "--resume", str(run_dir), "--max_steps", str(int(newest.name.split("-")[1]) + 1))
