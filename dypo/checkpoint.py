"""Checkpoints that survive being killed at any moment: each is written under a temporary name, flushed to disk,
then renamed to ``checkpoint-STEP`` (STEP steps done), so a directory with that name is always complete.

One process: the model as safetensors, the optimizer, scheduler and RNG states as tensors loaded with
``weights_only=True``, the trainer's state (step, queues, Python RNG) as JSON: nothing is unpickled.
Under torchrun: model and optimizer through torch.distributed.checkpoint (each rank writes its shards; DCP's own
metadata file is a pickle this run wrote), each rank's RNG and trainer state in its own files, and ``world.json``
with the number of ranks."""

import json
import os
import re
import shutil
import warnings
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


def _restore_rng(states):
    torch.set_rng_state(states["cpu"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(states["cuda"]))


def _complete(path: Path):
    return (path / "world.json").is_file() or all((path / name).is_file() for name in FILES)


def checkpoints(run_dir: Path):
    """Complete checkpoints of a run, oldest first (a directory missing one of the files, which no kill of this
    module's writes can leave behind, is passed over)."""
    found = [(int(NAME.match(p.name).group(1)), p) for p in Path(run_dir).iterdir()
             if p.is_dir() and NAME.match(p.name) and _complete(p)]
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
    _publish(run_dir, temporary, final, keep)


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
    _restore_rng(torch.load(path / "rng.pt", weights_only=True))
    return json.loads((path / "trainer_state.json").read_text())


def _publish(run_dir: Path, temporary: Path, final: Path, keep: int):
    for path in [p for p in temporary.rglob("*") if p.is_file()] + [temporary]:
        _fsync(path)
    if final.exists():
        _delete(final)
    os.rename(temporary, final)
    _fsync(run_dir)
    for old in checkpoints(run_dir)[:-keep]:
        _delete(old)


def save_sharded(run_dir: Path, step: int, module, optimizer, scheduler, trainer_state: dict, world, keep: int):
    """The torchrun form of ``save``: every rank takes part; rank 0 publishes the directory."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    run_dir = Path(run_dir)
    final, temporary = run_dir / f"checkpoint-{step}", run_dir / f".checkpoint-{step}.partial"
    if world.main:
        shutil.rmtree(temporary, ignore_errors=True)
        temporary.mkdir()
    world.barrier()
    # before the first update the optimizer has no state, and get_state_dict would create it with a zero step
    with_optimizer = bool(optimizer.state)
    if with_optimizer:
        model_state, optimizer_state = get_state_dict(module, optimizer)
        state = {"model": model_state, "optimizer": optimizer_state}
    else:
        state = {"model": get_model_state_dict(module)}
    dcp.save(state, checkpoint_id=str(temporary / "dcp"))
    torch.save(rng_states(), temporary / f"rng-rank{world.rank}.pt")
    (temporary / f"trainer_state-rank{world.rank}.json").write_text(json.dumps(trainer_state))
    world.barrier()
    if world.main:
        torch.save(scheduler.state_dict(), temporary / "scheduler.pt")
        (temporary / "world.json").write_text(json.dumps({"world_size": world.size, "optimizer": with_optimizer}))
        _publish(run_dir, temporary, final, keep)
    world.barrier()


def load_any(path: Path, module, model, optimizer, scheduler, world, seed=0) -> dict:
    """``load`` or its torchrun form, whichever wrote the checkpoint. A sharded checkpoint resumes on any number
    of processes, one included: DCP reshards the model and optimizer, the trainer's state is the same on every rank
    (one shared queue), and a rank that did not exist before gets a fresh sampling seed. A single-process
    checkpoint resumes on one process only."""
    sharded = (path / "world.json").is_file()
    layout = json.loads((path / "world.json").read_text()) if sharded else {"world_size": 1}
    if not sharded:
        if world.distributed:
            raise CheckpointError(f"{path} was written by one process: resume it without torchrun")
        return load(path, model, optimizer, scheduler)
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_state_dict,
        set_model_state_dict,
        set_state_dict,
    )

    needed = ["scheduler.pt", "trainer_state-rank0.json", "dcp/.metadata"]
    if layout["world_size"] == world.size:
        needed.append(f"rng-rank{world.rank}.pt")
    missing = [name for name in needed if not (path / name).is_file()]
    if missing:
        raise CheckpointError(f"{path} is incomplete: {', '.join(missing)} missing")
    if layout.get("optimizer", True):
        model_state, optimizer_state = get_state_dict(module, optimizer)
        state = {"model": model_state, "optimizer": optimizer_state}
    else:
        state = {"model": get_model_state_dict(module)}
    try:
        with warnings.catch_warnings():  # one process reading a sharded checkpoint is what is meant here
            warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
            dcp.load(state, checkpoint_id=str(path / "dcp"))
    except (Exception, dcp.api.CheckpointException) as exc:  # DCP's own type derives from BaseException
        written = {info.relative_path for info in dcp.FileSystemReader(str(path / "dcp")).read_metadata()
                   .storage_data.values()}
        absent = sorted(name for name in written if not (path / "dcp" / name).is_file())
        reason = f"shard files missing: {', '.join(absent)}" if absent else \
            "another model's weights, or a damaged shard? resume with the run's own --model"
        detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise CheckpointError(f"{path} cannot be loaded ({reason}): {detail}") from None
    if "optimizer" in state:
        set_state_dict(module, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    else:
        set_model_state_dict(module, state["model"])
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    trainer_state = json.loads((path / "trainer_state-rank0.json").read_text())
    rng_file = path / f"rng-rank{world.rank}.pt"
    if layout["world_size"] == world.size and rng_file.is_file():
        _restore_rng(torch.load(rng_file, weights_only=True))
    else:  # another layout: every rank starts a new sampling stream
        torch.manual_seed(seed * 1_000_003 + trainer_state["step"] * 1_009 + world.rank)
    return trainer_state
