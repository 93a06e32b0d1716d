"""fused_linear_logprobs: token log-probs (and entropies) of a linear head's softmax without the logits."""

from typing import NamedTuple, Optional

import torch
from torch.autograd.function import once_differentiable

from dypo_kernels import custom_ops
from dypo_kernels.amp import follows_autocast
from dypo_kernels.backend import select_backend
from dypo_kernels.logprob_pass import LogprobPass, score
from dypo_kernels.packing import check_offsets
from dypo_kernels.sweep import loss_chunks, select_impl, sweep
from dypo_kernels.tokens import positions_of
from dypo_kernels.validation import (
    Checks,
    check_ignore_index,
    check_linear_head,
    check_same_device,
    check_targets,
    check_temperature,
)


def logprob_grads(hidden, weight, bias, targets, lse, entropy, grad_logp, grad_entropy, settings, needs):
    """Gradients (hidden, weight, bias; None where not ``needs``), in the inputs' dtypes, of sum(grad_logp * logps +
    grad_entropy * entropy) over kept rows whose statistics ``lse``, ``entropy`` are known: one sweep, 6NDV."""
    inv_temperature, backend, impl, chunk_bytes = settings
    if hidden.shape[0] == 0:
        return tuple(torch.zeros_like(t) if need else None for t, need in zip((hidden, weight, bias), needs))
    op_pass = LogprobPass(targets, inv_temperature, backend, lse=lse, entropy=entropy,
                          grad_logp=torch.zeros_like(lse) if grad_logp is None else grad_logp.float(),
                          grad_entropy=None if grad_entropy is None else grad_entropy.float())
    with torch.autocast(hidden.device.type, enabled=False):  # a backward called inside autocast
        grads = sweep(hidden, weight, bias, op_pass, loss_chunks(op_pass, hidden, weight, impl, chunk_bytes),
                      needs_input_grad=needs, impl=impl)
    return tuple(None if g is None else g.to(like.dtype) for g, like in zip(grads, (hidden, weight, bias)))


class LinearLogprobsFunction(torch.autograd.Function):
    """hidden [N, D] (rows already free of ignored targets), weight [V, D], bias [V] or None, targets [N] int64.
    Returns fp32 (logps, entropy) [N]; saves only per-row fp32 statistics: the backward sweeps again, with the
    upstream gradients as the log-prob and entropy coefficients."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, settings):
        op_pass = score(hidden, weight, bias, targets, *settings)
        ctx.save_for_backward(hidden, weight, bias, targets, op_pass.lse, op_pass.entropy)
        ctx.settings = settings
        return op_pass.logps, op_pass.entropy

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_logp, grad_entropy):
        grads = logprob_grads(*ctx.saved_tensors, grad_logp, grad_entropy, ctx.settings,
                              tuple(ctx.needs_input_grad[:3]))
        return *grads, None, None


class Rows(NamedTuple):
    """The rows an op scores: ``kept`` (indices into the flattened targets; None when every one is kept), their
    hidden states [N, D] and targets [N] int64, and the sweep's (inverse temperature, backend, impl, chunk_bytes)."""

    kept: Optional[torch.Tensor]
    hidden: torch.Tensor
    targets: torch.Tensor
    settings: tuple


def kept_rows(hidden, targets, temperature, ignore_index, impl, chunk_bytes, count):
    """The Rows of the targets that are not ``ignore_index`` (``count`` of them, a host int), unchecked."""
    flat_hidden, flat_targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    backend = select_backend(hidden.device)
    settings = (1.0 / temperature, backend, select_impl(impl, backend, hidden.device), chunk_bytes)
    if count == flat_targets.numel():
        return Rows(None, flat_hidden.contiguous(), flat_targets.long().contiguous(), settings)
    kept = positions_of(flat_targets != ignore_index, count)
    return Rows(kept, flat_hidden.index_select(0, kept).contiguous(),
                flat_targets.index_select(0, kept).long().contiguous(), settings)


def checked_rows(hidden, weight, targets, bias, temperature, ignore_index, cu_seqlens, impl, chunk_bytes):
    """fused_linear_logprobs' checks (one host sync, with the count of kept rows), then its Rows."""
    check_linear_head(hidden, weight, bias)
    check_same_device(hidden=hidden, weight=weight, targets=targets, bias=bias)
    check_temperature(temperature)
    check_ignore_index(ignore_index)
    checks = Checks()
    if cu_seqlens is not None:  # packed rows: per-token results, the sequences change nothing
        if hidden.dim() != 2:
            raise ValueError(f"hidden must be [N, D] packed rows with cu_seqlens, got shape {tuple(hidden.shape)}")
        check_offsets(cu_seqlens, hidden.shape[0], hidden.device, checks)
    check_targets(targets, hidden.shape[:-1], weight.shape[0], ignore_index, checks=checks)
    count = checks.count((targets.reshape(-1) != ignore_index).sum())
    checks.run()
    return kept_rows(hidden, targets, temperature, ignore_index, impl, chunk_bytes, count.value)


def spread(rows, values, like):
    """Per-row ``values`` of ``rows`` laid out like the targets ``like``, 0 at ignored positions."""
    if rows.kept is not None:
        values = values.new_zeros(like.numel(), *values.shape[1:]).index_put((rows.kept,), values)
    return values.view(*like.shape, *values.shape[1:])


@follows_autocast("hidden", "weight", "bias")
def fused_linear_logprobs(hidden, weight, targets, *, bias=None, temperature=1.0, ignore_index=-100,
                          return_entropy=False, cu_seqlens=None, impl=None, chunk_bytes=None):
    """Log-probabilities of ``targets`` under softmax((hidden @ weight.T + bias) / temperature), never building
    the logits.

    lp_t = z_t[y_t] - logsumexp(z_t), and with ``return_entropy`` H_t = logsumexp(z_t) - sum_v softmax(z_t)_v z_t,v,
    where z_t = (W h_t + b) / temperature (docs/design.md; the token log-prob of the DYPO paper's eq. 3-5).

    Args:
        hidden: ``[..., D]`` float32, bfloat16 or float16, the last hidden states of the response tokens.
        weight: ``[V, D]`` the lm_head weight, same dtype as ``hidden``.
        targets: ``[...]`` integer token ids (the leading shape of ``hidden``); ``ignore_index`` marks positions
            that return 0, get no gradient and cost no matrix work (they are dropped before the projection).
        bias: optional ``[V]``.
        temperature: positive; the logits are divided by it.
        return_entropy: also return the entropies (differentiable too).
        cu_seqlens: accepted for padding-free callers (hidden ``[N, D]``, targets ``[N]``): checked, and nothing
            else, since each token's log-prob is its own (no extra host sync).
        impl: "chunked" (default; cuBLAS products and vocabulary passes over chunks of rows), "fused" (Triton
            register tiles, CUDA only: no workspace, 8NDV, not deterministic), or None (DYPO_KERNELS_IMPL).
        chunk_bytes: the byte budget of one chunk's logits and workspace (None: DYPO_KERNELS_CHUNK_BYTES, else
            2 GiB on CUDA, 128 MiB on CPU).

    Returns:
        ``logps`` float32 shaped like ``targets``; ``(logps, entropy)`` when ``return_entropy``.

    Differentiable in ``hidden``, ``weight`` and ``bias``; the weight gradient is accumulated in fp32.
    Cost, for N kept tokens: forward 2NDV FLOP (all there is under torch.no_grad: scoring), backward 6NDV (the
    logits are recomputed chunk by chunk). Extra memory O(N*D + V*D + chunk): never an N x V tensor. One host
    synchronisation, before any product: the target check, read with the number of kept rows.
    "chunked" is deterministic (no atomics: the same inputs give the same bits); "fused" adds tile products with
    atomics, so its gradients may differ in the last bits from run to run.

    Example:
        >>> h, W = torch.randn(2, 5, 16), torch.randn(100, 16)
        >>> y = torch.randint(0, 100, (2, 5))
        >>> fused_linear_logprobs(h, W, y).shape
        torch.Size([2, 5])
    """
    if torch.compiler.is_compiling():
        logps, entropy = custom_ops.linear_logprobs(hidden, weight, targets, bias, temperature, ignore_index,
                                                    cu_seqlens, impl, chunk_bytes)
        return (logps, entropy) if return_entropy else logps
    rows = checked_rows(hidden, weight, targets, bias, temperature, ignore_index, cu_seqlens, impl, chunk_bytes)
    logps, entropy = LinearLogprobsFunction.apply(rows.hidden, weight.contiguous(), bias, rows.targets,
                                                  rows.settings)
    logps, entropy = spread(rows, logps, targets), spread(rows, entropy, targets)
    return (logps, entropy) if return_entropy else logps
