"""Faults of the run directory and of the run's inputs: each is one line on stderr naming the file (exit status 2),
found before anything in the run directory is written, so the directory is byte for byte as it was; a second run
into a directory in use is refused; and the runs that finish with something to say (no plots, no update, positions
past the model's) say it on one line."""

import fcntl
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import dypo.run
import dypo.trainer
from dypo.train import main

REPO = Path(__file__).resolve().parents[2]
TINY = ["--max_steps", "4", "--save_steps", "2", "--eval_prompts", "2"]
PREFIX = "python -m dypo.train: "


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished run of 4 steps with checkpoint-2 and checkpoint-4; each test works on its own copy."""
    run = tmp_path_factory.mktemp("finished") / "run"
    main([*TINY, "--output_dir", str(run)])
    return run


@pytest.fixture
def run(finished, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(finished, copy)
    return copy


def snapshot(root: Path):
    """Every path under ``root`` and each file's bytes."""
    return {str(path.relative_to(root)): path.read_bytes() if path.is_file() else None
            for path in sorted(root.rglob("*"))}


def refused(argv, capsys):
    """The one error line of a run that ends with exit status 2."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    ours = [line for line in capsys.readouterr().err.splitlines() if line.startswith(PREFIX)]
    assert len(ours) == 1 and ours[0].startswith(PREFIX + "error: "), ours
    return ours[0]


def warnings_of(err):
    return [line for line in err.splitlines() if line.startswith(PREFIX + "warning: ")]


# checkpoints --------------------------------------------------------------------------------------------------

def test_every_checkpoint_damaged_is_refused_and_the_run_kept(run, capsys):
    """Was: 'has no checkpoint yet: starting from step 0', metrics.jsonl cut to the new run's steps."""
    for saved in ("checkpoint-2", "checkpoint-4"):
        os.remove(run / saved / "rng.pt")
    before = snapshot(run)
    error = refused(["--resume", str(run), "--max_steps", "6"], capsys)
    assert f"{run}/checkpoint-4 is damaged: rng.pt missing; no other checkpoint to resume from " \
           f"({run}/checkpoint-2 is damaged: rng.pt missing)" in error
    assert snapshot(run) == before


def cut(path: Path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])


def drop_key(path: Path, key):
    state = json.loads(path.read_text())
    del state[key]
    path.write_text(json.dumps(state))


def replace_key(path: Path, key, value):
    path.write_text(json.dumps({**json.loads(path.read_text()), key: value}))


@pytest.mark.parametrize("damage,message", [
    (lambda c: (c / "model.safetensors").write_bytes(b""), "model.safetensors is empty"),
    (lambda c: cut(c / "model.safetensors"), "model.safetensors is unreadable (Error while deserializing header"),
    (lambda c: cut(c / "model.safetensors", keep=0.001), "model.safetensors is unreadable"),
    (lambda c: cut(c / "optimizer.pt"), "optimizer.pt is unreadable (PytorchStreamReader failed reading zip archive"),
    (lambda c: cut(c / "rng.pt"), "rng.pt is unreadable"),
    (lambda c: cut(c / "rng.pt", keep=0.9999), "rng.pt is unreadable"),
    (lambda c: cut(c / "scheduler.pt"), "scheduler.pt is unreadable"),
    (lambda c: cut(c / "trainer_state.json"), "trainer_state.json is unreadable"),
    (lambda c: drop_key(c / "trainer_state.json", "queues"), "trainer_state.json has no 'queues'"),
    (lambda c: drop_key(c / "trainer_state.json", "seconds"), "trainer_state.json has no 'seconds'"),
    (lambda c: replace_key(c / "trainer_state.json", "step", "4"), "trainer_state.json holds step '4'"),
    (lambda c: replace_key(c / "trainer_state.json", "queues", {}), "trainer_state.json does not fit this run"),
    (lambda c: (c / "rng.pt").write_bytes((c / "scheduler.pt").read_bytes()), "rng.pt does not fit this run"),
])
def test_a_damaged_checkpoint_file_is_named_and_nothing_changes(run, capsys, damage, message):
    damage(run / "checkpoint-4")
    before = snapshot(run)
    error = refused(["--resume", str(run), "--max_steps", "6"], capsys)
    assert f"{run}/checkpoint-4 is damaged: {message}" in error
    assert error.endswith("; remove that directory to resume from checkpoint-2")
    assert snapshot(run) == before


def test_a_run_killed_before_its_first_checkpoint_resumes_from_step_0(run, capsys):
    for saved in run.glob("checkpoint-*"):
        shutil.rmtree(saved)
    summary = main(["--resume", str(run), "--max_steps", "2"])
    assert "has no checkpoint yet: starting from step 0" in capsys.readouterr().out and summary["steps"] == 2


def test_resume_with_fewer_steps_than_done_is_refused(run, capsys):
    before = snapshot(run)
    error = refused(["--resume", str(run), "--max_steps", "3"], capsys)
    assert f"{run} is already at step 4 (checkpoint-4); --max_steps 3 would go back" in error
    assert snapshot(run) == before


# the lock --------------------------------------------------------------------------------------------------

def hold_lock(directory: Path):
    """Lock ``directory`` as a run does, from this test process; returns the open file (close it to unlock)."""
    directory.mkdir(parents=True, exist_ok=True)
    lock = open(directory / ".lock", "a+")
    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    lock.write(f"{os.getpid()}\n")
    lock.flush()
    return lock


@pytest.mark.parametrize("argv", [[], ["--overwrite_output_dir"], ["--resume"]], ids=["fresh", "overwrite", "resume"])
def test_a_second_process_into_a_directory_in_use_is_refused(run, argv):
    lock = hold_lock(run)
    try:
        before = snapshot(run)
        target = [*argv, str(run)] if argv == ["--resume"] else [*TINY, *argv, "--output_dir", str(run)]
        result = subprocess.run([sys.executable, "-m", "dypo.train", *target], cwd=REPO, capture_output=True,
                                text=True, timeout=120)
        assert result.returncode == 2 and result.stderr.strip().splitlines() == [
            f"{PREFIX}error: output_dir {run} is in use by another run (pid {os.getpid()})"], result.stderr
        assert snapshot(run) == before
    finally:
        lock.close()


def test_the_lock_is_held_through_the_run_and_kept_by_overwrite(run, monkeypatch):
    seen = []
    clear, evaluate = dypo.run._clear_run, dypo.trainer.Trainer.evaluate

    def probe(where):
        with open(run / ".lock") as other:
            try:
                fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
                locked = False
            except BlockingIOError:
                locked = True
            seen.append((where, other.read().strip(), locked))

    monkeypatch.setattr(dypo.run, "_clear_run", lambda out: clear(out) or probe("cleared"))
    monkeypatch.setattr(dypo.trainer.Trainer, "evaluate", lambda self, problems: probe("evaluate") or
                        evaluate(self, problems))
    main([*TINY, "--overwrite_output_dir", "--output_dir", str(run)])
    evaluations = ("evaluate",) * 4 * 2  # test, validation and two OOD sets, before and after
    assert seen == [(where, str(os.getpid()), True) for where in ("cleared", *evaluations)]
    assert not (run / ".lock").exists()  # removed when the run ends


def test_a_stale_lock_file_neither_blocks_nor_counts_as_a_run(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / ".lock").write_text("999999999\n")  # left by a killed run: the kernel released its lock
    assert main(["--max_steps", "1", "--eval_prompts", "2", "--output_dir", str(run)])["steps"] == 1
    assert not (run / ".lock").exists()


def test_a_failed_run_leaves_no_directory_it_created(tmp_path, capsys):
    out = tmp_path / "a" / "b" / "run"
    refused(["--data", str(tmp_path / "missing.jsonl"), "--output_dir", str(out)], capsys)
    assert list(tmp_path.iterdir()) == []


# the run directory -------------------------------------------------------------------------------------------

def test_output_dir_that_is_a_file_or_below_one(tmp_path, capsys):
    file = tmp_path / "file"
    file.write_text("mine")
    assert refused(["--output_dir", str(file)], capsys).endswith(f"output_dir {file} is a file, not a directory")
    below = file / "run"
    assert refused(["--output_dir", str(below)], capsys).endswith(
        f"output_dir {below} is below a file ({file}), not a directory")
    assert file.read_text() == "mine" and sorted(tmp_path.iterdir()) == [file]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only directory (the monkeypatched test "
                                               "below covers the same path)")
def test_a_read_only_output_dir_is_refused_before_the_first_evaluation(run, capsys):
    before = snapshot(run)
    run.chmod(0o555)
    try:
        assert f"output_dir {run} is not writable" in refused(["--resume", str(run), "--max_steps", "6"], capsys)
    finally:
        run.chmod(0o755)
    assert snapshot(run) == before


def test_an_unwritable_lock_file_is_refused_before_any_work(run, monkeypatch, capsys):
    def denied(self):
        raise PermissionError(13, "Permission denied")

    def never(*args, **kwargs):
        raise AssertionError("the run went on past its lock")

    monkeypatch.setattr(dypo.run.RunLock, "_lock", denied)
    monkeypatch.setattr(dypo.run, "load_data", never)
    monkeypatch.setattr(dypo.trainer.Trainer, "evaluate", never)
    before = snapshot(run)
    error = refused(["--resume", str(run), "--max_steps", "6"], capsys)
    assert error.endswith(f"output_dir {run} is not writable (Permission denied)")
    assert snapshot(run) == before


# inputs ----------------------------------------------------------------------------------------------------

RECORD = {"prompt": "1+1=", "reward_model": {"ground_truth": "2"}, "target": ["2"]}


def jsonl(path: Path, records, tail=b""):
    path.write_bytes(b"".join(json.dumps(r).encode() + b"\n" for r in records) + tail)
    return path


@pytest.mark.parametrize("option", ["--data", "--eval_data"])
def test_a_data_file_that_is_not_utf8_is_named_with_its_line(run, tmp_path, option, capsys):
    good = jsonl(tmp_path / "good.jsonl", [RECORD] * 4)
    bad = jsonl(tmp_path / "bad.jsonl", [RECORD] * 2, tail=b'{"prompt": "caf\xe9"}\n')
    files = ["--data", str(bad)] if option == "--data" else ["--data", str(good), "--eval_data", str(bad)]
    before = snapshot(run)
    error = refused([*TINY, *files, "--overwrite_output_dir", "--output_dir", str(run)], capsys)
    assert error.endswith(f"{option} {bad}: line 3 is not UTF-8 text (byte 0xe9 at column 16)")
    assert snapshot(run) == before  # --overwrite_output_dir deletes nothing before the inputs are checked


def test_a_config_file_that_is_not_utf8_is_named(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_bytes(b"max_steps: 3\nalpha: \xff\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["--config", str(config), "--output_dir", str(tmp_path / "run")])
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and error.strip().splitlines() == [
        f"{PREFIX}error: cannot read --config {config}: not UTF-8 text (byte 0xff at offset 20)"]
    assert sorted(tmp_path.iterdir()) == [config]


REWARDS = """
calls = []

def raises(prompts, completions, **kwargs):
    raise ZeroDivisionError("division by zero\\nmore")

def short(prompts, completions, **kwargs):
    return [1.0]

def third_call_fails(prompts, completions, **kwargs):
    calls.append(len(completions))
    if len(calls) == 3:
        raise KeyError("late")
    return [0.0] * len(completions)

def always(prompts, completions, **kwargs):
    return [1.0] * len(completions)
"""


@pytest.fixture
def rewards(tmp_path, monkeypatch):
    (tmp_path / "fault_rewards.py").write_text(REWARDS)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "fault_rewards", raising=False)
    yield "fault_rewards"
    sys.modules.pop("fault_rewards", None)


@pytest.mark.parametrize("function,message", [
    ("raises", "reward function fault_rewards:raises raised ZeroDivisionError: division by zero"),
    ("short", "reward function fault_rewards:short returned 1 values for 4 completions"),
])
def test_a_bad_reward_function_is_refused_before_anything_is_written(run, rewards, capsys, function, message):
    before = snapshot(run)
    error = refused([*TINY, "--reward", f"{rewards}:{function}", "--overwrite_output_dir", "--output_dir", str(run)],
                    capsys)
    assert error.endswith(message)
    assert snapshot(run) == before


def test_a_reward_function_failing_later_is_still_one_line(tmp_path, rewards, capsys):
    # calls: the probe, the first evaluation, then step 0's rollouts
    error = refused([*TINY, "--reward", f"{rewards}:third_call_fails", "--output_dir", str(tmp_path / "run")], capsys)
    assert error.endswith("reward function fault_rewards:third_call_fails raised KeyError: 'late'")


def test_a_run_without_an_update_says_so(tmp_path, rewards, capsys):
    summary = main(["--max_steps", "2", "--eval_prompts", "2", "--reward", f"{rewards}:always", "--output_dir",
                    str(tmp_path / "run")])  # every prompt easy: nothing trains
    assert summary["updates"] == 0
    assert warnings_of(capsys.readouterr().err) == [
        f"{PREFIX}warning: no update in 2 steps: the SFT and RL queues never held train_batch_size (8) prompts "
        "(every prompt easy, or the batch too large for the steps)"]


def test_missing_matplotlib_is_said_once(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    summary = main(["--max_steps", "1", "--eval_prompts", "2", "--output_dir", str(tmp_path / "run")])
    assert summary["plots"] == [] and not list((tmp_path / "run").glob("*.png"))
    assert warnings_of(capsys.readouterr().err) == [
        f"{PREFIX}warning: matplotlib is not installed: no plots written (pip install 'dypo-kernels[train]')"]


# positions -------------------------------------------------------------------------------------------------

def test_rotary_positions_past_the_model_maximum_warn_once(tmp_path, capsys):
    # the embedded Qwen2 has 64 positions; its longest built-in prompt of this seed (an OOD one: "a + b =" with a
    # 2-digit operand) is 8 tokens
    main(["--max_steps", "1", "--eval_prompts", "2", "--max_new_tokens", "60", "--output_dir", str(tmp_path / "run")])
    assert warnings_of(capsys.readouterr().err) == [
        f"{PREFIX}warning: the longest prompt (8 tokens) + max_new_tokens (60) = 68 positions, more than the embedded "
        "model's max_position_embeddings (64): positions past it were never trained"]


def save_tiny_gpt2(path: Path, positions=16):
    """GPT-2 (learned absolute positions, wpe) with the character tokenizer of tests/tiny_models.py."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from tests.tiny_models import save_tiny_qwen2

    save_tiny_qwen2(path)
    vocab = json.loads((path / "config.json").read_text())["vocab_size"]
    for name in ("config.json", "model.safetensors", "generation_config.json"):
        (path / name).unlink(missing_ok=True)
    GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_positions=positions, n_embd=16, n_layer=1, n_head=2,
                               bos_token_id=1, eos_token_id=2, pad_token_id=0)).save_pretrained(path)
    return path


def test_learned_positions_past_the_model_maximum_are_refused(run, tmp_path, capsys):
    model = save_tiny_gpt2(tmp_path / "gpt2")
    data = jsonl(tmp_path / "data.jsonl", [{"prompt": [{"role": "user", "content": f"{a}+{a}=?"}],
                                            "reward_model": {"ground_truth": str(2 * a)},
                                            "target": [str(2 * a)]} for a in range(6)])
    before = snapshot(run)
    argv = ["--model", str(model), "--data", str(data), "--max_steps", "1", "--eval_prompts", "2",
            "--num_generations", "2", "--prompts_per_step", "2", "--train_batch_size", "2",
            "--overwrite_output_dir", "--output_dir", str(run)]
    # "user:1+1=?;assistant:" is 21 tokens, 5 past GPT-2's 16 positions even before a completion
    error = refused([*argv, "--max_new_tokens", "4"], capsys)
    assert error.endswith(f"the longest prompt (21 tokens) + max_new_tokens (4) = 25 positions, more than --model "
                          f"{model}'s max_position_embeddings (16): its learned position embeddings end there; lower "
                          "--max_new_tokens or shorten the prompts")
    assert snapshot(run) == before
