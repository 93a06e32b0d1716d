"""Input checks shared by the public ops: each raises before any work, naming the argument and its shape."""

import math

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


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
    if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")


def check_linear_head(hidden, weight, bias, hidden_name="hidden", weight_name="weight", bias_name="bias"):
    """hidden [..., D] and weight [V, D] (and bias [V]) of one float dtype."""
    check_tensor(hidden_name, hidden, dtypes=FLOAT_DTYPES)
    check_tensor(weight_name, weight, dims=(2,), dtypes=FLOAT_DTYPES)
    if hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"{hidden_name} {tuple(hidden.shape)} must end in the hidden size of {weight_name} "
                         f"{tuple(weight.shape)} ([V, D]: D = {weight.shape[1]})")
    if hidden.dtype != weight.dtype:
        raise TypeError(f"{hidden_name} ({hidden.dtype}) and {weight_name} ({weight.dtype}) must share a dtype")
    if bias is not None:
        check_tensor(bias_name, bias, dims=(1,), dtypes=FLOAT_DTYPES)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"{bias_name} {tuple(bias.shape)} must have the vocabulary size of {weight_name} "
                             f"{tuple(weight.shape)}")


def check_targets(targets, leading_shape, vocab_size, ignore_index, name="targets", hidden_name="hidden"):
    check_tensor(name, targets, integer=True)
    if tuple(targets.shape) != tuple(leading_shape):
        raise ValueError(f"{name} {tuple(targets.shape)} must have the leading shape of {hidden_name} "
                         f"{tuple(leading_shape)} + (D,)")
    out_of_range = ((targets < 0) | (targets >= vocab_size)) & (targets != ignore_index)
    if targets.numel() and bool(out_of_range.any()):
        bad = targets[out_of_range][:5].tolist()
        raise ValueError(f"{name} must lie in [0, {vocab_size}) or equal ignore_index={ignore_index}; "
                         f"found {bad}")
