"""python -m dypo.train: DYPO end to end. With no arguments: a tiny Qwen2 model built from a config, a character
tokenizer and built-in multi-digit additions with two rule-based teachers, on a CPU in about a minute. With
--model and --data: a local Hugging Face causal LM on a JSONL or Parquet file of prompts, answers and teacher
solutions (nothing is downloaded).

Each step: k rollouts per prompt -> rewards -> group_advantages (advantages and grades) -> routing (hard: SFT on a
teacher solution drawn uniformly, or on all of them; mid: alpha GRPO + (1 - alpha) GAL on the rollouts; easy:
dropped) -> the SFT and RL queues; whenever they hold train_batch_size prompts: one policy forward to hidden states
-> dypo_loss with lm_head.weight (no logits) -> clip -> optimizer step. Old and reference log-probs come from the
fused forward at rollout time. Strategies for comparison: dypo (default), grpo, sft, sft_then_rl. The run
directory gets config.json, metrics.jsonl, samples.jsonl, PNG plots, summary.json and checkpoints (--resume
RUN_DIR continues from the last one). Under torchrun the same run is sharded with FSDP2 (dypo/distributed.py).
"""

import contextlib
import dataclasses
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Optional

from dypo import checkpoint, distributed, plots, policy
from dypo.config import Config, parse_config
from dypo.data import DataError, check_encodable, load_data
from dypo.rewards import RewardError, load_reward
from dypo.trainer import Trainer


def main(argv=None):
    config, resume, overwrite = parse_config(sys.argv[1:] if argv is None else argv, description=__doc__)
    out = Path(config.output_dir)
    if resume is None and not overwrite and ((out / "config.json").exists() or any(out.glob("checkpoint-*"))):
        _fail(f"output_dir {out} holds a run: --resume {out} continues it, --overwrite_output_dir starts afresh")
    size = int(os.environ.get("WORLD_SIZE", "1"))
    for name in ("prompts_per_step", "train_batch_size"):
        if getattr(config, name) % size:
            _fail(f"{name} ({getattr(config, name)}) must be a multiple of the number of processes ({size})")
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


def _run(config: Config, resume: Optional[Path], overwrite=False, world=None):
    """The run in its directory: a fresh start or the last checkpoint, then each step's metrics, samples,
    progress line and checkpoint, and the summary."""
    world = world or distributed.World()
    problems, eval_problems = load_data(config)
    trainer = Trainer(config, problems, load_reward(config.reward), world)
    check_encodable(trainer.codec, (problems or []) + eval_problems)
    out = Path(config.output_dir)
    if world.main:
        if overwrite:
            _clear_run(out)
        out.mkdir(parents=True, exist_ok=True)
    world.barrier()
    saved = checkpoint.checkpoints(out) if resume else []
    if saved:
        state = checkpoint.load_any(saved[-1], trainer.policy, trainer.model, trainer.optimizer, trainer.scheduler,
                                    world, seed=config.seed)
        trainer.load_state(state)
        accuracy_before, elapsed = state["eval_accuracy_before"], state["seconds"]
        _say(world, f"resumed {out} from {saved[-1].name}")
    else:
        if resume:
            _say(world, f"{out} has no checkpoint yet: starting from step 0")
        accuracy_before, elapsed = trainer.evaluate(eval_problems), 0.0
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
                state = trainer.state({"eval_accuracy_before": accuracy_before, "seconds": metrics["seconds"]})
                if world.distributed:
                    checkpoint.save_sharded(out, trainer.step, trainer.policy, trainer.optimizer, trainer.scheduler,
                                            state, world, keep=config.save_total_limit)
                else:
                    checkpoint.save(out, trainer.step, trainer.model, trainer.optimizer, trainer.scheduler, state,
                                    keep=config.save_total_limit)
    bar.close()
    accuracy_after = trainer.evaluate(eval_problems)
    return _finish(config, out, history, accuracy_before, accuracy_after, len(eval_problems), trainer)


def _finish(config, out, history, accuracy_before, accuracy_after, eval_prompts, trainer):
    """summary.json, the plots and the final model (--model), and the summary's lines on stdout."""
    intervals = [history[i:i + config.logging_steps] for i in range(0, len(history), config.logging_steps)]

    def curve(key):
        return [round(_window_mean(window, key), 4) for window in intervals]

    summary = {"eval_accuracy_before": accuracy_before, "eval_accuracy_after": accuracy_after,
               "eval_prompts": eval_prompts, "steps": len(history),
               "updates": trainer.updates, "seconds": history[-1]["seconds"] if history else 0.0,
               "reward_curve": curve("reward_mean"), "hard_share_curve": curve("share_hard"),
               "mid_share_curve": curve("share_mid"), "easy_share_curve": curve("share_easy"),
               "offline_ratio_curve": curve("offline_ratio"), "entropy_curve": curve("entropy"),
               "runtime": trainer.runtime.describe()}
    if config.model:
        weights = trainer.full_state_dict()
        if trainer.world.main:
            trainer.model.save_pretrained(out / "final_model", state_dict=weights)
            trainer.codec.tokenizer.save_pretrained(out / "final_model")
    if not trainer.world.main:
        return summary
    summary["plots"] = plots.write_plots(history, out, window=config.logging_steps)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    n = config.logging_steps
    print(f"reward per {n} steps:     {' '.join(f'{v:.2f}' for v in summary['reward_curve'])}")
    print(f"hard share per {n} steps: {' '.join(f'{v:.2f}' for v in summary['hard_share_curve'])}")
    print(f"easy share per {n} steps: {' '.join(f'{v:.2f}' for v in summary['easy_share_curve'])}")
    print(f"eval accuracy: {accuracy_before:.2f} -> {accuracy_after:.2f} ({summary['eval_prompts']} greedy prompts); "
          f"run directory: {out}")
    return summary


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


def _fail(message):
    print(f"python -m dypo.train: error: {message}", file=sys.stderr)
    raise SystemExit(2)
