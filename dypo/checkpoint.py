"""Checkpoints that survive being killed at any moment: each is written under a temporary name, flushed to disk,
then renamed to ``checkpoint-STEP`` (STEP steps done), so a directory with that name is always complete. One with
a file missing, cut short or unreadable was damaged from outside: --resume refuses it (``latest``) with one line
naming the file, rather than going back to an older checkpoint, which would cut the run's logs back to that step.

One process: the model as safetensors, the optimizer, scheduler and RNG states as tensors loaded with
``weights_only=True``, the trainer's state (step, queues, Python RNG) as JSON: nothing is unpickled.
Under torchrun: model and optimizer through torch.distributed.checkpoint (each rank writes its shards; DCP's own
metadata file is a pickle this run wrote), each rank's RNG and trainer state in its own files, and ``world.json``
with the number of ranks."""

import json
import numbers
import os
import re
import shutil
import warnings
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_model, save_model

NAME = re.compile(r"checkpoint-(\d+)$")
FILES = ("model.safetensors", "optimizer.pt", "scheduler.pt", "rng.pt", "trainer_state.json")
# the keys of trainer_state.json that Trainer.load_state and run.py read
STATE_KEYS = ("step", "updates", "python_rng", "queues", "source", "eval_accuracy_before", "seconds")


class CheckpointError(ValueError):
    """A checkpoint that does not fit the run (another model, missing files); the message names it."""


class DamagedCheckpoint(CheckpointError):
    """A published checkpoint-N with a file missing, cut short or unreadable: damage from outside, since this
    module never leaves such a directory behind."""

    def __init__(self, path: Path, what: str):
        super().__init__(f"{path} is damaged: {what}")
        self.path, self.what = Path(path), what


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


def _reason(exc: BaseException) -> str:
    """The first sentence of an exception's first line (torch's zip errors go on for three more), or its type."""
    line = (str(exc).strip().splitlines() or [""])[0].split(". ")[0].strip()
    return line[:200] or type(exc).__name__


def checkpoints(run_dir: Path):
    """The published checkpoints of a run (``checkpoint-STEP`` directories), oldest first. A kill while one is
    written leaves only ``.checkpoint-STEP.partial``, which is not one of them."""
    found = [(int(NAME.match(p.name).group(1)), p) for p in Path(run_dir).iterdir()
             if p.is_dir() and NAME.match(p.name)]
    return [path for _, path in sorted(found)]


def read_state(path: Path, name="trainer_state.json") -> dict:
    """A checkpoint's trainer state, with the keys a resume reads; DamagedCheckpoint when it is missing, cut
    short, not JSON or lacks a key."""
    file = path / name
    try:
        state = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DamagedCheckpoint(path, f"{name} missing") from None
    except (OSError, ValueError) as exc:  # a cut file is a JSONDecodeError, bytes that are not UTF-8 another one
        raise DamagedCheckpoint(path, f"{name} is unreadable ({_reason(exc)})") from None
    if not isinstance(state, dict):
        raise DamagedCheckpoint(path, f"{name} does not hold an object")
    missing = [key for key in STATE_KEYS if key not in state]
    if missing:
        raise DamagedCheckpoint(path, f"{name} has no {', '.join(repr(key) for key in missing)}")
    for key, kind in (("step", int), ("updates", int), ("seconds", numbers.Real), ("eval_accuracy_before",
                                                                                    numbers.Real)):
        if isinstance(state[key], bool) or not isinstance(state[key], kind) or state[key] < 0:
            raise DamagedCheckpoint(path, f"{name} holds {key} {state[key]!r}")
    return state


def _layout(path: Path) -> dict:
    try:
        layout = json.loads((path / "world.json").read_text(encoding="utf-8"))
        size = layout["world_size"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DamagedCheckpoint(path, f"world.json is unreadable ({_reason(exc)})") from None
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise DamagedCheckpoint(path, f"world.json holds world_size {size!r}")
    return layout


def check(path: Path) -> dict:
    """The cheap checks of a checkpoint, before anything is loaded: every file there and not empty, the JSON
    files readable with their keys, the safetensors header whole. Returns the trainer's state; raises
    DamagedCheckpoint naming the first file that fails."""
    path = Path(path)
    if (path / "world.json").is_file():
        layout = _layout(path)
        needed = ["scheduler.pt", "dcp/.metadata", *(f"rng-rank{r}.pt" for r in range(layout["world_size"])),
                  *(f"trainer_state-rank{r}.json" for r in range(layout["world_size"]))]
        state_file = "trainer_state-rank0.json"
    else:
        needed, state_file = list(FILES), "trainer_state.json"
    missing = [name for name in needed if not (path / name).is_file()]
    if missing:
        raise DamagedCheckpoint(path, f"{', '.join(missing)} missing")
    empty = [name for name in needed if (path / name).stat().st_size == 0]
    if empty:
        raise DamagedCheckpoint(path, f"{empty[0]} is empty")
    state = read_state(path, state_file)
    if state_file == "trainer_state.json":
        try:
            with safe_open(str(path / "model.safetensors"), "pt"):
                pass
        except Exception as exc:  # SafetensorError (a cut file: "incomplete metadata"), OSError
            raise DamagedCheckpoint(path, f"model.safetensors is unreadable ({_reason(exc)})") from None
    return state


def latest(run_dir: Path):
    """The checkpoint --resume continues from: the newest ``checkpoint-STEP`` and its trainer state, or None
    when the run has none yet. A damaged newest checkpoint is refused (CheckpointError), never passed over:
    resuming from an older one would cut the logs back to it and rotate checkpoints away."""
    found = checkpoints(run_dir)
    if not found:
        return None
    try:
        return found[-1], check(found[-1])
    except DamagedCheckpoint as exc:
        raise CheckpointError(refusal(found, exc)) from None


def refusal(found, damage: DamagedCheckpoint) -> str:
    """The one line for a damaged newest checkpoint: what is wrong with it, and which older one a resume could
    go on from once it is removed (or what is wrong with each of them)."""
    older, damaged = [], []
    for path in reversed(found[:-1]):
        try:
            check(path)
        except DamagedCheckpoint as exc:
            damaged.append(exc)
            continue
        older = [path]
        break
    if older:
        also = "".join(f"; {exc}" for exc in damaged)
        those = "those directories" if damaged else "that directory"
        return f"{damage}{also}; remove {those} to resume from {older[0].name}"
    also = f" ({'; '.join(str(exc) for exc in damaged)})" if damaged else ""
    return f"{damage}; no other checkpoint to resume from{also}"


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


def _tensors(path: Path, name: str):
    """torch.load of a checkpoint's tensor file (no pickle), DamagedCheckpoint when it is cut short or garbled
    (torch raises EOFError, RuntimeError, OSError or UnpicklingError for those)."""
    try:
        return torch.load(path / name, weights_only=True)
    except FileNotFoundError:
        raise DamagedCheckpoint(path, f"{name} missing") from None
    except Exception as exc:
        raise DamagedCheckpoint(path, f"{name} is unreadable ({_reason(exc)})") from None


def _restore(path: Path, name: str, restore, states):
    """A loaded state into the optimizer, scheduler or RNG; one that does not fit is named."""
    try:
        restore(states)
    except Exception as exc:  # KeyError, ValueError, TypeError, RuntimeError: a state of another shape
        raise DamagedCheckpoint(path, f"{name} does not fit this run ({_reason(exc)})") from None


def load(path: Path, model, optimizer, scheduler) -> dict:
    """Restore model, optimizer, scheduler and RNG states from a checkpoint; returns the trainer's state. A file
    missing, cut short or unreadable is a DamagedCheckpoint naming it, found before the model is touched where a
    cheap check finds it (``check``)."""
    state = check(path)
    device = str(next(model.parameters()).device)
    try:
        load_model(model, str(path / "model.safetensors"), strict=True, device=device)
    except RuntimeError as exc:  # load_state_dict: missing, unexpected or other-shaped tensors
        raise CheckpointError(f"{path} holds another model's weights ({str(exc).splitlines()[0]}); resume with the "
                              "run's own --model") from None
    except Exception as exc:  # SafetensorError: the file changed since check(), or bytes garbled within it
        raise DamagedCheckpoint(path, f"model.safetensors is unreadable ({_reason(exc)})") from None
    optimizer_state, scheduler_state, rng = (_tensors(path, name) for name in ("optimizer.pt", "scheduler.pt",
                                                                                "rng.pt"))
    _restore(path, "optimizer.pt", optimizer.load_state_dict, optimizer_state)
    _restore(path, "scheduler.pt", scheduler.load_state_dict, scheduler_state)
    _restore(path, "rng.pt", _restore_rng, rng)
    return state


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
    if not (path / "world.json").is_file():
        if world.distributed:
            raise CheckpointError(f"{path} was written by one process: resume it without torchrun")
        return load(path, model, optimizer, scheduler)
    trainer_state, layout = check(path), _layout(path)
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_state_dict,
        set_model_state_dict,
        set_state_dict,
    )

    scheduler_state = _tensors(path, "scheduler.pt")
    same_layout = layout["world_size"] == world.size
    rng = _tensors(path, f"rng-rank{world.rank}.pt") if same_layout else None
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
        try:
            written = {info.relative_path for info in dcp.FileSystemReader(str(path / "dcp")).read_metadata()
                       .storage_data.values()}
        except Exception:  # a cut or garbled .metadata (a pickle DCP wrote)
            raise DamagedCheckpoint(path, f"dcp/.metadata is unreadable ({_reason(exc)})") from None
        absent = sorted(name for name in written if not (path / "dcp" / name).is_file())
        reason = f"shard files missing: {', '.join(absent)}" if absent else \
            "another model's weights, or a damaged shard? resume with the run's own --model"
        raise CheckpointError(f"{path} cannot be loaded ({reason}): {_reason(exc)}") from None
    if "optimizer" in state:
        set_state_dict(module, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    else:
        set_model_state_dict(module, state["model"])
    _restore(path, "scheduler.pt", scheduler.load_state_dict, scheduler_state)
    if rng is not None:
        _restore(path, f"rng-rank{world.rank}.pt", _restore_rng, rng)
    else:  # another layout: every rank starts a new sampling stream
        torch.manual_seed(seed * 1_000_003 + trainer_state["step"] * 1_009 + world.rank)
    return trainer_state
