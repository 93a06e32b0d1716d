"""torch.compile: under Dynamo each public op is one ``torch.library`` custom op (QuACK's way), opaque to the tracer,
so that a compiled step holds no graph break however many host syncs and data-dependent shapes the op has inside.

- **Loss ops** (``traceable_loss``): ``dypo_kernels::loss`` takes the op's tensors, which of them need gradients and
  its other arguments as text (repr'd when traced, so the graph is keyed by them). At run time it calls the eager op,
  which checks its inputs as in eager mode and, as in eager mode, forms the gradients of the loss during the forward;
  the op returns them, and its backward scales them by the upstream gradient. The fake implementation gives Dynamo
  the shapes: a 0-dim fp32 loss, gradients shaped like their inputs, 0-dim fp32 metrics.
- **fused_linear_logprobs** has per-token outputs, so its backward needs the upstream gradients:
  ``dypo_kernels::linear_logprobs`` (logps, entropy and the log-sum-exp, 2NDV) and
  ``dypo_kernels::linear_logprobs_backward`` (one more sweep, 6NDV), as in eager mode.

A custom op's kernel runs with autograd's dispatch keys excluded, and the loss ops form their gradients through
autograd (the op's own SweepLoss and the row selections before it), so their kernel runs the eager op on a worker
thread, whose dispatch state is fresh, on the caller's CUDA device and stream. The caller waits for it: nothing runs
concurrently.
"""

import ast
import functools
import math
from concurrent.futures import ThreadPoolExecutor
from typing import List, Optional, Tuple

import torch

_LOSS_OPS = {}  # name -> (eager op, metric names of its arguments)
_WORKER = []


def _encode(value, tensors):
    """``value`` as a literal (tensors moved to ``tensors``, replaced by their index)."""
    if isinstance(value, torch.Tensor):
        tensors.append(value)
        return {"tensor": len(tensors) - 1}
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # BatchTotals
        return {"totals": [_encode(item, tensors) for item in value]}
    if isinstance(value, (list, tuple)):
        return {"tuple" if isinstance(value, tuple) else "list": [_encode(item, tensors) for item in value]}
    if isinstance(value, dict):
        return {"dict": {key: _encode(item, tensors) for key, item in value.items()}}
    if isinstance(value, float) and not math.isfinite(value):
        return {"float": repr(value)}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"under torch.compile the ops take tensors, numbers, strings, None and lists of them; got "
                    f"{type(value).__name__}")


def _decode(value, tensors):
    if not isinstance(value, dict):
        return value
    (kind, item), = value.items()
    if kind == "tensor":
        return tensors[item]
    if kind == "float":
        return float(item)
    if kind == "dict":
        return {key: _decode(part, tensors) for key, part in item.items()}
    items = [_decode(part, tensors) for part in item]
    if kind == "totals":
        from dypo_kernels.combined import BatchTotals

        return BatchTotals(*items)
    return tuple(items) if kind == "tuple" else items


def _arguments(text, tensors):
    """(args, kwargs) of a call encoded by ``_encode``."""
    call = ast.literal_eval(text)
    return _decode(call["args"], tensors), _decode(call["kwargs"], tensors)


def _on_worker(function, device):
    """function() on the worker thread, on ``device``'s current CUDA stream."""
    if not _WORKER:
        _WORKER.append(ThreadPoolExecutor(max_workers=1, thread_name_prefix="dypo_kernels"))
    if device.type != "cuda":
        return _WORKER[0].submit(function).result()
    stream = torch.cuda.current_stream(device)

    def on_stream():
        with torch.cuda.device(device), torch.cuda.stream(stream):
            return function()

    return _WORKER[0].submit(on_stream).result()


def _metric_names(op, args, kwargs):
    return _LOSS_OPS[op][1](*args, **kwargs) if kwargs.get("return_metrics") else []


@torch.library.custom_op("dypo_kernels::loss", mutates_args=())
def _loss(op: str, tensors: List[torch.Tensor], needs: List[bool], call: str) -> Tuple[
        torch.Tensor, List[torch.Tensor], List[torch.Tensor]]:
    def run():
        leaves = [tensor.detach().requires_grad_() if need else tensor for tensor, need in zip(tensors, needs)]
        args, kwargs = _arguments(call, leaves)
        with torch.enable_grad():
            result = _LOSS_OPS[op][0](*args, **kwargs)
        loss, metrics = result if isinstance(result, tuple) else (result, {})
        wanted = [leaf for leaf, need in zip(leaves, needs) if need]
        grads = [None] * len(wanted)
        if wanted and loss.requires_grad:
            grads = torch.autograd.grad(loss, wanted, allow_unused=True)
        names = _metric_names(op, args, kwargs)
        if sorted(names) != sorted(metrics):
            raise RuntimeError(f"dypo_kernels: {op}'s metrics {sorted(metrics)} differ from the names declared for "
                               f"torch.compile {sorted(names)}")
        values = [torch.as_tensor(metrics[name], dtype=torch.float32, device=loss.device).detach().reshape(())
                  for name in names]
        return (loss.detach().clone(), [torch.zeros_like(leaf) if grad is None else grad
                                        for grad, leaf in zip(grads, wanted)], values)

    return _on_worker(run, tensors[0].device)


@_loss.register_fake
def _(op, tensors, needs, call):
    args, kwargs = _arguments(call, tensors)
    first = tensors[0]
    return (first.new_empty((), dtype=torch.float32),
            [torch.empty_like(tensor) for tensor, need in zip(tensors, needs) if need],
            [first.new_empty((), dtype=torch.float32) for _ in _metric_names(op, args, kwargs)])


def _loss_setup(ctx, inputs, output):
    ctx.needs = inputs[2]
    ctx.save_for_backward(*output[1])


def _loss_backward(ctx, grad_loss, grad_grads, grad_metrics):
    saved = iter(ctx.saved_tensors)
    return None, [next(saved) * grad_loss if need else None for need in ctx.needs], None, None


_loss.register_autograd(_loss_backward, setup_context=_loss_setup)


def no_metrics(*args, **kwargs):
    return []


def traceable_loss(metric_names=no_metrics):
    """Decorates a public loss op (scalar loss, optionally with a metrics dict, differentiable in its tensor
    arguments): under torch.compile it runs as ``dypo_kernels::loss``. ``metric_names(*args, **kwargs)``: the keys
    of its metrics dict for those arguments (they must not depend on the tensors' values)."""

    def decorate(op):
        _LOSS_OPS[op.__name__] = (op, metric_names)

        @functools.wraps(op)
        def run(*args, **kwargs):
            if not torch.compiler.is_compiling():
                return op(*args, **kwargs)
            tensors = []
            call = repr(_encode({"args": list(args), "kwargs": kwargs}, tensors)["dict"])
            needs = [tensor.requires_grad and torch.is_grad_enabled() for tensor in tensors]
            loss, _, values = torch.ops.dypo_kernels.loss(op.__name__, tensors, needs, call)
            if not kwargs.get("return_metrics"):
                return loss
            return loss, dict(zip(metric_names(*args, **kwargs), values))

        return run

    return decorate


def _settings(text):
    """(temperature, ignore_index, impl, chunk_bytes) from the literal of fused_linear_logprobs' settings."""
    return _decode(ast.literal_eval(text), [])


@torch.library.custom_op("dypo_kernels::linear_logprobs", mutates_args=())
def _linear_logprobs(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], targets: torch.Tensor,
                     cu_seqlens: Optional[torch.Tensor], settings: str) -> Tuple[torch.Tensor, torch.Tensor,
                                                                                 torch.Tensor]:
    from dypo_kernels.linear_logprobs import checked_rows, spread
    from dypo_kernels.logprob_pass import score

    temperature, ignore_index, impl, chunk_bytes = _settings(settings)
    rows = checked_rows(hidden, weight, targets, bias, temperature, ignore_index, cu_seqlens, impl, chunk_bytes)
    op_pass = score(rows.hidden, weight.contiguous(), bias, rows.targets, *rows.settings)
    return tuple(spread(rows, values, targets) for values in (op_pass.logps, op_pass.entropy, op_pass.lse))


@_linear_logprobs.register_fake
def _(hidden, weight, bias, targets, cu_seqlens, settings):
    return tuple(targets.new_empty(targets.shape, dtype=torch.float32) for _ in range(3))


@torch.library.custom_op("dypo_kernels::linear_logprobs_backward", mutates_args=())
def _linear_logprobs_backward(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                              targets: torch.Tensor, lse: torch.Tensor, entropy: torch.Tensor,
                              grad_logps: Optional[torch.Tensor], grad_entropy: Optional[torch.Tensor], settings: str,
                              needs: List[bool]) -> List[torch.Tensor]:
    from dypo_kernels.linear_logprobs import kept_rows, logprob_grads, spread

    temperature, ignore_index, impl, chunk_bytes = _settings(settings)
    rows = kept_rows(hidden, targets, temperature, ignore_index, impl, chunk_bytes,
                     int((targets != ignore_index).sum()))

    def kept(values):
        return None if values is None else values.reshape(-1) if rows.kept is None else values.reshape(-1)[rows.kept]

    grad_hidden, grad_weight, grad_bias = logprob_grads(
        rows.hidden, weight.contiguous(), bias, rows.targets, kept(lse), kept(entropy), kept(grad_logps),
        kept(grad_entropy), rows.settings, tuple(needs))
    if grad_hidden is not None:
        grad_hidden = spread(rows, grad_hidden, targets)
    return [grad for grad in (grad_hidden, grad_weight, grad_bias) if grad is not None]


@_linear_logprobs_backward.register_fake
def _(hidden, weight, bias, targets, lse, entropy, grad_logps, grad_entropy, settings, needs):
    return [torch.empty_like(tensor) for tensor, need in zip((hidden, weight, bias), needs) if need]


def _linear_logprobs_setup(ctx, inputs, output):
    hidden, weight, bias, targets, _, ctx.settings = inputs
    ctx.save_for_backward(hidden, weight, bias, targets, output[2], output[1])
    ctx.needs = [bool(need) for need in ctx.needs_input_grad[:3]]


def _linear_logprobs_grads(ctx, grad_logps, grad_entropy, grad_lse):
    hidden, weight, bias, targets, lse, entropy = ctx.saved_tensors
    grads = iter(torch.ops.dypo_kernels.linear_logprobs_backward(hidden, weight, bias, targets, lse, entropy,
                                                                 grad_logps, grad_entropy, ctx.settings, ctx.needs))
    return *(next(grads) if need else None for need in ctx.needs), None, None, None


_linear_logprobs.register_autograd(_linear_logprobs_grads, setup_context=_linear_logprobs_setup)


def linear_logprobs(hidden, weight, targets, bias, temperature, ignore_index, cu_seqlens, impl, chunk_bytes):
    """fused_linear_logprobs' (logps, entropy) as dypo_kernels::linear_logprobs, for a traced call."""
    constants = []
    settings = repr(_encode([temperature, ignore_index, impl, chunk_bytes], constants))
    if constants:
        raise TypeError("under torch.compile fused_linear_logprobs takes temperature, ignore_index, impl and "
                        "chunk_bytes as Python values, not tensors")
    logps, entropy, _ = torch.ops.dypo_kernels.linear_logprobs(hidden, weight, bias, targets, cu_seqlens, settings)
    return logps, entropy
