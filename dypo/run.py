"""python -m dypo.train: DYPO end to end. With no arguments: a tiny Qwen2 model from the built-in base model
(python -m dypo.pretrain), a character tokenizer and built-in multi-digit additions with two rule-based teachers,
on a CPU in about a minute and a half. With
--model and --data: a local Hugging Face causal LM on a JSONL or Parquet file of prompts, answers and teacher
solutions (nothing is downloaded).

Each step: k rollouts per prompt -> rewards -> group_advantages (advantages and grades) -> routing (hard: SFT on a
teacher solution drawn uniformly, or on all of them; mid: alpha GRPO + (1 - alpha) GAL on the rollouts; easy:
dropped) -> the SFT and RL queues; whenever they hold train_batch_size prompts: one policy forward to hidden states
-> dypo_loss with lm_head.weight (no logits) -> clip -> optimizer step. Old and reference log-probs come from the
fused forward at rollout time. Strategies for comparison: dypo (default), grpo, sft, sft_then_rl, sft_rl, luffy.
Greedy accuracy before and after: the test set, and the built-in task's validation and out-of-distribution sets.
The run directory gets config.json, metrics.jsonl, samples.jsonl, PNG plots, summary.json and checkpoints (--resume
RUN_DIR continues from the last one). Under torchrun the same run is sharded with FSDP2 (dypo/distributed.py).
"""

import contextlib
import dataclasses
import fcntl
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Optional

from dypo import checkpoint, distributed, plots, policy
from dypo.config import Config, parse_config
from dypo.data import DataError, Problem, check_encodable, check_teacher_topk, extra_eval_sets, load_data
from dypo.rewards import RewardError, load_reward, probe_reward
from dypo.trainer import Trainer

LOCK = ".lock"  # RUN_DIR/.lock: held (flock) by the run writing there, holds its pid, removed when it ends


def main(argv=None):
    config, resume, overwrite = parse_config(sys.argv[1:] if argv is None else argv, description=__doc__)
    out = Path(config.output_dir)
    size = int(os.environ.get("WORLD_SIZE", "1"))
    for name in ("prompts_per_step", "train_batch_size"):
        if getattr(config, name) % size:
            _fail(f"{name} ({getattr(config, name)}) must be a multiple of the number of processes ({size})")
    if config.strategy == "luffy" and size > 1:
        _fail("strategy luffy runs in one process (its mixed groups' advantages are taken where they are rolled out)")
    # before anything else, --overwrite_output_dir included: no two runs ever write one directory (under torchrun
    # the main process holds the lock for all of them)
    with RunLock(out) if os.environ.get("RANK", "0") == "0" else contextlib.nullcontext():
        if resume is None and not overwrite and ((out / "config.json").exists() or any(out.glob("checkpoint-*"))):
            _fail(f"output_dir {out} holds a run: --resume {out} continues it, --overwrite_output_dir starts afresh")
        world = distributed.init_world(config.ddp_timeout)
        finished = False
        try:
            summary = _run(config, resume, overwrite, world)
            finished = True
            return summary
        except (DataError, RewardError, policy.ModelError, checkpoint.CheckpointError) as exc:
            _fail(exc)
        finally:
            distributed.close(world, finished)


class RunLock:
    """An exclusive lock on the run directory for the whole run: ``fcntl.flock`` on RUN_DIR/.lock, which holds
    the holder's pid. A second run into the directory (--resume and --overwrite_output_dir included) is a one-line
    error naming that pid. The kernel releases the lock when its process ends, however it ends, so a stale file
    left by a killed run locks nothing. On exit the file is removed, and so are the directories this run created
    when it leaves nothing in them: a run that fails before writing anything leaves no trace."""

    def __init__(self, out: Path):
        self.out, self.path, self.descriptor, self.created, self.holder = Path(out), Path(out) / LOCK, None, [], ""

    def __enter__(self):
        out = self.out
        for place in (out, *out.parents):
            if place.exists():
                if place != out and not place.is_dir():
                    _fail(f"output_dir {out} is below a file ({place}), not a directory")
                break
            self.created.append(place)
        if out.exists() and not out.is_dir():
            _fail(f"output_dir {out} is a file, not a directory")
        try:
            out.mkdir(parents=True, exist_ok=True)
            self.descriptor = self._lock()
        except OSError as exc:  # PermissionError, a read-only file system
            self._remove_created()
            _fail(f"output_dir {out} is not writable ({exc.strerror or exc})")
        if self.descriptor is None:
            self._remove_created()
            holder = self.holder
            _fail(f"output_dir {out} is in use by another run{f' (pid {holder})' if holder else ''}")
        os.ftruncate(self.descriptor, 0)
        os.write(self.descriptor, f"{os.getpid()}\n".encode())
        return self

    def _lock(self):
        """The locked descriptor, or None when another process holds the lock."""
        while True:
            descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self.holder = os.pread(descriptor, 32, 0).decode(errors="replace").strip()
                os.close(descriptor)
                return None
            except BaseException:
                os.close(descriptor)
                raise
            try:
                if os.stat(self.path).st_ino == os.fstat(descriptor).st_ino:
                    return descriptor
            except FileNotFoundError:
                pass
            os.close(descriptor)  # locked a file that the holder removed as it ended: lock the one there now

    def __exit__(self, *exc_info):
        with contextlib.suppress(OSError):
            os.unlink(self.path)  # while still locked: whoever opened this file before sees it gone and retries
        os.close(self.descriptor)
        self._remove_created()

    def _remove_created(self):
        for directory in self.created:  # the deepest first; os.rmdir only removes an empty one
            try:
                os.rmdir(directory)
            except OSError:
                break


def _run(config: Config, resume: Optional[Path], overwrite=False, world=None):
    """The run in its directory: a fresh start or the last checkpoint, then each step's metrics, samples,
    progress line and checkpoint, and the summary. Every input (checkpoint, data, reward, model, lengths) is
    checked before anything in the directory is written."""
    world = world or distributed.World()
    out = Path(config.output_dir)
    newest = checkpoint.latest(out) if resume else None
    if newest and newest[1]["step"] > config.max_steps:
        raise checkpoint.CheckpointError(
            f"{out} is already at step {newest[1]['step']} ({newest[0].name}); --max_steps {config.max_steps} would "
            f"go back (give --max_steps {newest[1]['step']} or more)")
    problems, eval_problems = load_data(config)
    other_sets = extra_eval_sets(config)
    reward_function = load_reward(config.reward)
    probe_reward(reward_function, problems or eval_problems)
    trainer = Trainer(config, problems, reward_function, world)
    longest = check_encodable(trainer.codec, (problems or [_longest_builtin(config)]) + eval_problems +
                              [problem for problems_of_set in other_sets.values() for problem in problems_of_set])
    if config.teacher_topk_field:
        check_teacher_topk(trainer.codec, problems + eval_problems, policy.lm_head(trainer.model)[0].shape[0])
    warning = policy.check_positions(trainer.model, longest, config.max_new_tokens, config.model)
    if warning and world.main:
        _warn(warning)
    if world.main:
        if overwrite:
            _clear_run(out)
        out.mkdir(parents=True, exist_ok=True)
    world.barrier()
    if newest:
        state = _load(out, newest[0], trainer, config, world)
        accuracy_before, elapsed = state["eval_accuracy_before"], state["seconds"]
        # a checkpoint of a run from before these sets has no "before" for them: unknown, not the resumed model's
        sets_before = {name: state.get("eval_sets_before", {}).get(name) for name in other_sets}
        _say(world, f"resumed {out} from {newest[0].name}")
    else:
        if resume:
            _say(world, f"{out} has no checkpoint yet: starting from step 0")
        accuracy_before, elapsed = trainer.evaluate(eval_problems), 0.0
        sets_before = _evaluate_sets(trainer, other_sets)
    if world.main:
        config_file = out / "config.json.partial"
        config_file.write_text(json.dumps(dataclasses.asdict(config), indent=2))
        os.replace(config_file, out / "config.json")
        for log in ("metrics.jsonl", "samples.jsonl"):
            _kept_lines(out / log, trainer.step)
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()] \
        if world.main and (out / "metrics.jsonl").exists() else []
    started = time.monotonic() - elapsed
    bar = _progress(config.max_steps, trainer.step, enabled=world.main)
    with contextlib.ExitStack() as files:
        metrics_log, samples_log = (files.enter_context(open(out / name if world.main else os.devnull, "a"))
                                    for name in ("metrics.jsonl", "samples.jsonl"))
        while trainer.step < config.max_steps:
            step = trainer.step
            metrics, samples = trainer.train_step(step)
            metrics["seconds"] = time.monotonic() - started
            trainer.step += 1
            history.append(metrics)
            metrics_log.write(json.dumps(metrics) + "\n")
            metrics_log.flush()
            if (step + 1) % config.sample_steps == 0:
                samples_log.write("".join(json.dumps(s) + "\n" for s in samples))
                samples_log.flush()
            bar.update(1)
            if world.main and ((step + 1) % config.logging_steps == 0 or step + 1 == config.max_steps):
                bar.write(_progress_line(history[-config.logging_steps:], step + 1, config.max_steps), file=sys.stdout)
                sys.stdout.flush()
            if (step + 1) % config.save_steps == 0 or step + 1 == config.max_steps:
                state = trainer.state({"eval_accuracy_before": accuracy_before, "eval_sets_before": sets_before,
                                       "seconds": metrics["seconds"]})
                if world.distributed:
                    checkpoint.save_sharded(out, trainer.step, trainer.policy, trainer.optimizer, trainer.scheduler,
                                            state, world, keep=config.save_total_limit)
                else:
                    checkpoint.save(out, trainer.step, trainer.model, trainer.optimizer, trainer.scheduler, state,
                                    keep=config.save_total_limit)
    bar.close()
    accuracy_after = trainer.evaluate(eval_problems)
    sets = {name: {"before": sets_before[name], "after": after} for name, after in
            _evaluate_sets(trainer, other_sets).items()}
    return _finish(config, out, history, (accuracy_before, accuracy_after), sets, len(eval_problems), trainer)


def _evaluate_sets(trainer, sets):
    return {name: trainer.evaluate(problems) for name, problems in sets.items()}


def _load(out, saved, trainer, config, world):
    """The checkpoint into the trainer; a file found damaged while loading is refused as ``checkpoint.latest``
    refuses one found by its cheap checks (naming an older checkpoint to go on from)."""
    name = "trainer_state-rank0.json" if (saved / "world.json").is_file() else "trainer_state.json"
    try:
        state = checkpoint.load_any(saved, trainer.policy, trainer.model, trainer.optimizer, trainer.scheduler,
                                    world, seed=config.seed)
        try:
            trainer.load_state(state)
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise checkpoint.DamagedCheckpoint(saved, f"{name} does not fit this run ({exc!r})") from None
    except checkpoint.DamagedCheckpoint as exc:
        raise checkpoint.CheckpointError(checkpoint.refusal(checkpoint.checkpoints(out), exc)) from None
    return state


def _longest_builtin(config):
    """The built-in task's longest training prompt (two operands of max_digits digits)."""
    operand = "9" * config.max_digits
    return Problem(f"{operand}+{operand}=", "", ["0"])


def _finish(config, out, history, accuracy, sets, eval_prompts, trainer):
    """summary.json, the plots and the final model (--model), and the summary's lines on stdout. ``accuracy``:
    the test set's before and after; ``sets``: each other evaluation set's (extra_eval_sets), whose ``ood_*`` sets
    give the out-of-distribution mean."""
    accuracy_before, accuracy_after = accuracy
    ood = {name.removeprefix("ood_"): value for name, value in sets.items() if name.startswith("ood_")}
    intervals = [history[i:i + config.logging_steps] for i in range(0, len(history), config.logging_steps)]

    def curve(key):
        return [round(_window_mean(window, key), 4) for window in intervals]

    summary = {"eval_accuracy_before": accuracy_before, "eval_accuracy_after": accuracy_after,
               "eval_prompts": eval_prompts, "steps": len(history),
               **({f"validation_accuracy_{when}": sets["validation"][when] for when in ("before", "after")}
                  if "validation" in sets else {}),
               **({f"ood_accuracy_{when}": _mean([v[when] for v in ood.values()]) for when in ("before", "after")}
                  if ood else {}),
               "ood_sets": ood,
               "updates": trainer.updates, "seconds": history[-1]["seconds"] if history else 0.0,
               "reward_curve": curve("reward_mean"), "hard_share_curve": curve("share_hard"),
               "mid_share_curve": curve("share_mid"), "easy_share_curve": curve("share_easy"),
               "offline_ratio_curve": curve("offline_ratio"), "entropy_curve": curve("entropy"),
               "runtime": trainer.runtime.describe()}
    if config.hard_loss != "sft":
        summary["hard_kl_curve"] = curve("hard_kl")
    if config.model:
        weights = trainer.full_state_dict()
        if trainer.world.main:
            trainer.model.save_pretrained(out / "final_model", state_dict=weights)
            trainer.codec.tokenizer.save_pretrained(out / "final_model")
    if not trainer.world.main:
        return summary
    summary["plots"] = plots.write_plots(history, out, window=config.logging_steps) if config.plots else []
    if config.plots and not summary["plots"]:
        _warn("matplotlib is not installed: no plots written (pip install 'dypo-kernels[train]')")
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    n = config.logging_steps
    print(f"reward per {n} steps:     {' '.join(f'{v:.2f}' for v in summary['reward_curve'])}")
    print(f"hard share per {n} steps: {' '.join(f'{v:.2f}' for v in summary['hard_share_curve'])}")
    print(f"easy share per {n} steps: {' '.join(f'{v:.2f}' for v in summary['easy_share_curve'])}")
    print(f"eval accuracy: {accuracy_before:.2f} -> {accuracy_after:.2f} ({summary['eval_prompts']} greedy prompts)")
    if ood:
        each = ", ".join(f"{name} {_two(value['before'])} -> {_two(value['after'])}" for name, value in ood.items())
        print(f"out of distribution: {_two(summary['ood_accuracy_before'])} -> {_two(summary['ood_accuracy_after'])} "
              f"({each})")
    print(f"run directory: {out}")
    if not trainer.updates:
        _warn(f"no update in {trainer.step} steps: the SFT and RL queues never held train_batch_size "
              f"({config.train_batch_size}) prompts (every prompt easy, or the batch too large for the steps)")
    return summary


def _mean(values):
    """The mean, or None when a value is unknown (a "before" lost to a resume of an older run)."""
    return None if None in values else sum(values) / len(values)


def _two(value):
    return "?" if value is None else f"{value:.2f}"


def _progress_line(window, step, max_steps):
    mean = {key: _window_mean(window, key) for key in ("reward_mean", "share_hard", "share_mid", "share_easy",
                                                      "offline_ratio", "entropy", "loss")}
    return (f"step {step:4d}/{max_steps} reward {mean['reward_mean']:.2f} "
            f"hard/mid/easy {mean['share_hard']:.2f}/{mean['share_mid']:.2f}/{mean['share_easy']:.2f} "
            f"offline {mean['offline_ratio']:.2f} entropy {mean['entropy']:.2f} loss {mean['loss']:.3f} "
            f"({window[-1]['seconds']:.0f} s)")


def _window_mean(window, key):
    values = [m[key] for m in window if m.get(key) is not None]
    return sum(values) / len(values) if values else float("nan")


def _kept_lines(path: Path, before_step: int):
    """Rewrite a JSON-lines log keeping the complete records of steps before ``before_step`` (the steps a resumed
    run redoes, and a line cut by a kill, go)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("step", before_step) < before_step:
            kept.append(line + "\n")
    temporary = path.with_suffix(".partial")
    temporary.write_text("".join(kept))
    os.replace(temporary, path)


def _clear_run(out: Path):
    """--overwrite_output_dir: delete what an earlier run left (only the files a run writes)."""
    for old in [*out.glob("checkpoint-*"), *out.glob(".checkpoint-*"), out / "final_model"]:
        shutil.rmtree(old, ignore_errors=True)
    for name in ("config.json", "metrics.jsonl", "samples.jsonl", "summary.json", *plots.PLOTS):
        (out / name).unlink(missing_ok=True)


def _progress(total, initial, enabled=True):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc="steps", file=sys.stderr, disable=None if enabled else True,
                leave=False, dynamic_ncols=True)


def _say(world, line):
    if world.main:
        print(line, flush=True)


def _warn(message):
    print(f"python -m dypo.train: warning: {message}", file=sys.stderr, flush=True)


def _fail(message):
    print(f"python -m dypo.train: error: {message}", file=sys.stderr)
    raise SystemExit(2)
