"""Autocast. Under ``torch.autocast`` an unfused ``lm_head(hidden)`` runs its product in the autocast dtype, and the
ops do the same: ``follows_autocast`` casts the head's operands (hidden states, weights, biases) to the autocast
dtype of their device, then runs the op with autocast off, so that its own products and fp32 statistics are as they
are for inputs of that dtype. The casts are ordinary autograd ops: the gradients reach fp32 parameters in fp32.
Other inputs (targets, masks, log-probs, rewards) are left as they are."""

import functools
import inspect

import torch


def _cast(value, dtype):
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, (list, tuple)):
        return type(value)(_cast(item, dtype) for item in value)
    return value


def follows_autocast(*operands):
    """Decorates a public op whose first argument is a tensor; ``operands`` name the arguments that feed its
    products (tensors, sequences of tensors, or None)."""

    def decorate(op):
        position = {name: index for index, name in enumerate(inspect.signature(op).parameters)}

        @functools.wraps(op)
        def run(*args, **kwargs):
            first = args[0] if args else kwargs.get(operands[0])
            if not isinstance(first, torch.Tensor) or not torch.is_autocast_enabled(first.device.type):
                return op(*args, **kwargs)
            device_type = first.device.type
            dtype = torch.get_autocast_dtype(device_type)
            args = list(args)
            for name in operands:  # found by position, not Signature.bind, which Dynamo cannot trace in torch 2.6
                if name in kwargs:
                    kwargs[name] = _cast(kwargs[name], dtype)
                elif position[name] < len(args):
                    args[position[name]] = _cast(args[position[name]], dtype)
            with torch.autocast(device_type, enabled=False):
                return op(*args, **kwargs)

        return run

    return decorate
