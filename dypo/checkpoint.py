"""Checkpoints that survive being killed at any moment: each is written under a temporary name, flushed to disk,
then renamed to ``checkpoint-STEP`` (STEP steps done), so a directory with that name is always complete. The model
is stored as safetensors, the optimizer, scheduler and RNG states as tensors loaded with ``weights_only=True``,
the trainer's state (step, queues, Python RNG) as JSON: nothing is unpickled."""

import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model

NAME = re.compile(r"checkpoint-(\d+)$")
FILES = ("model.safetensors", "optimizer.pt", "scheduler.pt", "rng.pt", "trainer_state.json")


class CheckpointError(ValueError):
    """A checkpoint that does not fit the run (another model, missing files); the message names it."""


def _fsync(path: Path):
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def rng_states():
    states = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.stack(torch.cuda.get_rng_state_all())
    return states


def checkpoints(run_dir: Path):
    """Complete checkpoints of a run, oldest first (a directory missing one of the files, which no kill of this
    module's writes can leave behind, is passed over)."""
    found = [(int(NAME.match(p.name).group(1)), p) for p in Path(run_dir).iterdir()
             if p.is_dir() and NAME.match(p.name) and all((p / name).is_file() for name in FILES)]
    return [path for _, path in sorted(found)]


def _delete(path: Path):
    """Rename out of the checkpoint namespace first, so a kill mid-delete leaves no partial checkpoint-N."""
    doomed = path.with_name(f".{path.name}.deleting")
    shutil.rmtree(doomed, ignore_errors=True)
    os.rename(path, doomed)
    shutil.rmtree(doomed)


def save(run_dir: Path, step: int, model, optimizer, scheduler, trainer_state: dict, keep: int):
    """Write checkpoint-STEP atomically, then delete all but the newest ``keep`` checkpoints."""
    run_dir = Path(run_dir)
    final, temporary = run_dir / f"checkpoint-{step}", run_dir / f".checkpoint-{step}.partial"
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir()
    save_model(model, str(temporary / "model.safetensors"))
    torch.save(optimizer.state_dict(), temporary / "optimizer.pt")
    torch.save(scheduler.state_dict(), temporary / "scheduler.pt")
    torch.save(rng_states(), temporary / "rng.pt")
    (temporary / "trainer_state.json").write_text(json.dumps(trainer_state))
    for name in FILES:
        _fsync(temporary / name)
    _fsync(temporary)
    if final.exists():
        _delete(final)
    os.rename(temporary, final)
    _fsync(run_dir)
    for old in checkpoints(run_dir)[:-keep]:
        _delete(old)


def load(path: Path, model, optimizer, scheduler) -> dict:
    """Restore model, optimizer, scheduler and RNG states from a checkpoint; returns the trainer's state."""
    missing = [name for name in FILES if not (path / name).is_file()]
    if missing:
        raise CheckpointError(f"{path} is incomplete: {', '.join(missing)} missing")
    try:
        load_model(model, str(path / "model.safetensors"), strict=True, device=str(next(model.parameters()).device))
    except RuntimeError as exc:
        raise CheckpointError(f"{path} holds another model's weights ({str(exc).splitlines()[0]}); resume with the "
                              "run's own --model") from None
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    states = torch.load(path / "rng.pt", weights_only=True)
    torch.set_rng_state(states["cpu"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(states["cuda"]))
    return json.loads((path / "trainer_state.json").read_text())
