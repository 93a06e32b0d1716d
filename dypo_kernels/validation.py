"""Input checks shared by the public ops: each raises before any work, naming the argument and its shape.

Checks that depend on tensor values (ranges, finiteness, group ids) go into a ``Checks``, which reads all of them,
and the counts an op sizes its work by, in one device-to-host copy: one host synchronisation per op for its checks.
"""

import math
from typing import Callable, List, Union

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class Count:
    """A device count an op needs on the host: ``value`` once its Checks has run (or given at once)."""

    def __init__(self, value=None):
        self.value = value


class Checks:
    """Conditions that must hold (bool 0-dim tensors, each with its error message, a string or a function making it
    when the condition fails) and counts (integer 0-dim tensors), read with one device-to-host copy by ``run``."""

    def __init__(self):
        self._conditions: List[torch.Tensor] = []
        self._messages: List[Union[str, Callable[[], str]]] = []
        self._counts: List[tuple] = []

    def require(self, holds, message):
        self._conditions.append(holds)
        self._messages.append(message)

    def count(self, value):
        handle = Count()
        self._counts.append((value, handle))
        return handle

    def run(self):
        """Raises ValueError for the first condition that fails; fills the counts."""
        values = self._conditions + [value for value, _ in self._counts]
        if not values:
            return
        read = torch.stack([v.reshape(()).to(device=values[0].device, dtype=torch.int64) for v in values]).tolist()
        for holds, message in zip(read, self._messages):
            if not holds:
                raise ValueError(message() if callable(message) else message)
        for number, (_, handle) in zip(read[len(self._conditions):], self._counts):
            handle.value = number
        self._conditions, self._messages, self._counts = [], [], []


def check_tensor(name, value, *, dims=None, dtypes=None, integer=False):
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if dims is not None and value.dim() not in dims:
        raise ValueError(f"{name} must have {' or '.join(map(str, dims))} dimensions, got shape {tuple(value.shape)}")
    if integer and (value.is_floating_point() or value.is_complex() or value.dtype == torch.bool):
        raise TypeError(f"{name} must hold integer token ids, got dtype {value.dtype}")
    if dtypes is not None and value.dtype not in dtypes:
        raise TypeError(f"{name} must have a dtype in {[str(d) for d in dtypes]}, got {value.dtype}")


def check_same_device(**tensors):
    present = {name: t for name, t in tensors.items() if t is not None}
    devices = {t.device for t in present.values()}
    if len(devices) > 1:
        listing = ", ".join(f"{name} on {t.device}" for name, t in present.items())
        raise ValueError(f"all tensors must be on one device, got {listing}")


def check_temperature(temperature):
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not math.isfinite(temperature) \
            or temperature <= 0:
        raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")


def check_ignore_index(ignore_index):
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an integer token id (default -100), got {ignore_index!r}")


def check_linear_head(hidden, weight, bias, hidden_name="hidden", weight_name="weight", bias_name="bias"):
    """hidden [..., D] and weight [V, D] (and bias [V]) of one float dtype."""
    check_tensor(hidden_name, hidden, dtypes=FLOAT_DTYPES)
    check_tensor(weight_name, weight, dims=(2,), dtypes=FLOAT_DTYPES)
    if hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"{hidden_name} {tuple(hidden.shape)} must end in the hidden size of {weight_name} "
                         f"{tuple(weight.shape)} ([V, D]: D = {weight.shape[1]})")
    if weight.shape[0] == 0 or weight.shape[1] == 0:
        raise ValueError(f"{weight_name} {tuple(weight.shape)} must have a vocabulary and a hidden size of at least 1 "
                         "([V, D]: V >= 1, D >= 1)")
    if hidden.dtype != weight.dtype:
        raise TypeError(f"{hidden_name} ({hidden.dtype}) and {weight_name} ({weight.dtype}) must share a dtype")
    if bias is not None:
        check_tensor(bias_name, bias, dims=(1,), dtypes=FLOAT_DTYPES)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"{bias_name} {tuple(bias.shape)} must have the vocabulary size of {weight_name} "
                             f"{tuple(weight.shape)}")


def check_targets(targets, leading_shape, vocab_size, ignore_index, name="targets", hidden_name="hidden",
                  checks=None):
    """Integer ``targets`` of ``leading_shape`` in [0, V) (or equal to ``ignore_index``); the range is checked in
    ``checks`` when given (else at once)."""
    check_tensor(name, targets, integer=True)
    if tuple(targets.shape) != tuple(leading_shape):
        raise ValueError(f"{name} {tuple(targets.shape)} must have the leading shape of {hidden_name} "
                         f"{tuple(leading_shape)} + (D,)")
    if not targets.numel():
        return
    out_of_range = (targets < 0) | (targets >= vocab_size)
    if ignore_index is not None:
        out_of_range &= targets != ignore_index

    def message():
        allowed = "" if ignore_index is None else f" or equal ignore_index={ignore_index}"
        where = " where mask is set" if ignore_index is None else ""
        return f"{name} must lie in [0, {vocab_size}){allowed}{where}; found {targets[out_of_range][:5].tolist()}"

    _require(checks, ~out_of_range.any(), message)


def _require(checks, holds, message):
    """Adds the condition to ``checks``, or checks it at once without one."""
    if checks is None:
        checks = Checks()
        checks.require(holds, message)
        checks.run()
    else:
        checks.require(holds, message)


def check_choice(name, value, choices):
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")


def check_number(name, value, *, low=None, high=None, high_open=False):
    """A finite real number in [low, high] (or [low, high) with ``high_open``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    too_high = high is not None and (value >= high if high_open else value > high)
    if (low is not None and value < low) or too_high:
        interval = f"[{'-inf' if low is None else low}, {'inf' if high is None else high}{')' if high_open else ']'}"
        raise ValueError(f"{name} must lie in {interval}, got {value!r}")


def check_sequence_batch(hidden, weight, bias, targets, mask, checks=None, **per_token):
    """hidden [B, T, D] with its head, targets [B, T] integer ids (checked against V where ``mask`` is set),
    ``mask`` [B, T] or None, and optional float per-token tensors [B, T] (log-probs), named by their keywords."""
    check_linear_head(hidden, weight, bias)
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be [B, T, D], got shape {tuple(hidden.shape)}")
    check_tensor("targets", targets, integer=True)
    if tuple(targets.shape) != tuple(hidden.shape[:2]):
        raise ValueError(f"targets {tuple(targets.shape)} must be [B, T] = {tuple(hidden.shape[:2])}, as hidden "
                         f"{tuple(hidden.shape)}")
    if mask is not None:
        check_tensor("mask", mask)
        if tuple(mask.shape) != tuple(targets.shape):
            raise ValueError(f"mask {tuple(mask.shape)} must have the shape of targets {tuple(targets.shape)}")
    for name, value in per_token.items():
        if value is None:
            continue
        check_tensor(name, value, dtypes=FLOAT_DTYPES + (torch.float64,))
        if tuple(value.shape) != tuple(targets.shape):
            raise ValueError(f"{name} {tuple(value.shape)} must have the shape of targets {tuple(targets.shape)}")
    check_same_device(hidden=hidden, weight=weight, bias=bias, targets=targets, mask=mask, **per_token)
    check_mask_values(mask, checks)
    used = targets if mask is None else targets.masked_fill(~mask.bool(), 0)
    check_targets(used, targets.shape, weight.shape[0], ignore_index=None, checks=checks)
    for name, value in per_token.items():
        if value is not None and value.numel():
            finite = torch.isfinite(value) if mask is None else torch.isfinite(value) | ~mask.bool()
            _require(checks, finite.all(), f"{name} must be finite where mask is set; found NaN or inf")


def check_mask_values(mask, checks=None):
    """A mask is bool or holds only 0 and 1 (a weight of 0.5, 2 or NaN would be taken as 1)."""
    if mask is not None and mask.dtype != torch.bool and mask.numel():
        _require(checks, ((mask == 0) | (mask == 1)).all(),
                 lambda: "mask must be bool or hold only 0 and 1; found "
                         f"{mask[(mask != 0) & (mask != 1)][:5].tolist()}")


def check_per_sequence(batch_size, device, checks=None, **per_sequence):
    """Optional float tensors [B], one value per sequence, named by their keywords; they must be finite (checked in
    ``checks`` when given)."""
    for name, value in per_sequence.items():
        if value is None:
            continue
        check_tensor(name, value, dims=(1,))
        if value.shape[0] != batch_size:
            raise ValueError(f"{name} {tuple(value.shape)} must hold one value per sequence ({batch_size})")
        if value.device != device:
            raise ValueError(f"{name} is on {value.device}, hidden on {device}")
        if value.numel():
            _require(checks, torch.isfinite(value).all(), f"{name} must be finite; found NaN or inf")
