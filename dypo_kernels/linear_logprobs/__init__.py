"""fused_linear_logprobs: token log-probs (and entropies) of a linear head's softmax without the logits."""

import functools

import torch

from dypo_kernels.backend import select_backend
from dypo_kernels.linear_logprobs import cpu
from dypo_kernels.linear_logprobs.cpu import flush_negligible
from dypo_kernels.validation import check_linear_head, check_same_device, check_targets, check_temperature


def _kernels(backend):
    """The (forward, backward) pair of a backend, with the CPU pair bound to its vocabulary pass."""
    if backend == "triton":
        from dypo_kernels.linear_logprobs import triton_kernels

        return triton_kernels.forward, triton_kernels.backward
    return functools.partial(cpu.forward, backend=backend), functools.partial(cpu.backward, backend=backend)


def forward_and_gradients(hidden, weight, bias, targets, inv_temperature, gradient_of_logps, *, needs_input_grad,
                          backend, chunks=None):
    """The sweep of the losses: (lse, logps, entropy) of every row and, in the same call, the fp32 gradients of
    sum_t L_t(lp) where ``gradient_of_logps(rows, logps, entropy)`` gives g_t = dL/dlp_t for a slice of rows once
    their log-probs are known (a chunk of ``chunks``, or all rows). No gradient work when none is needed.

    CPU: one sweep of chunked logits, 6NDV FLOP (cpu.forward_and_gradients). Triton: the forward kernel (2NDV), then
    the backward kernel with g as the log-prob gradient (6NDV, the tiles recomputed in registers): 8NDV, with no
    logits buffer at all, the trade Cut Cross-Entropy makes on GPUs.

    ``chunks``: row ranges (start, stop) of at most ``cpu.rows_per_chunk`` rows, covering the rows in order, that the
    CPU sweep must take as its chunks (None: equal chunks); Triton calls ``gradient_of_logps`` once for all rows.
    """
    if backend != "triton":
        return cpu.forward_and_gradients(hidden, weight, bias, targets, inv_temperature, gradient_of_logps,
                                         needs_input_grad=needs_input_grad, backend=backend, chunks=chunks)
    forward_impl, backward_impl = _kernels(backend)
    weight, bias = weight.contiguous(), None if bias is None else bias.contiguous()  # the kernels assume stride 1
    lse, target_logit, entropy = forward_impl(hidden, weight, bias, targets, inv_temperature)
    logps = target_logit - lse
    grad_logp = flush_negligible(gradient_of_logps(slice(0, hidden.shape[0]), logps, entropy).float()).contiguous()
    if not any(needs_input_grad):  # under torch.no_grad: the values only
        return lse, logps, entropy, None, None, None
    grads = backward_impl(hidden, weight, bias, targets, lse, entropy, grad_logp, None, inv_temperature,
                          needs_input_grad=needs_input_grad)
    return (lse, logps, entropy, *grads)


def correction_gradients(hidden, weight, bias, targets, lse, entropy, grad_logp, inv_temperature, *,
                         needs_input_grad, backend):
    """fp32 gradients of sum_t grad_logp_t lp_t for rows whose lse and entropy a sweep already gave (6NDV)."""
    _, backward_impl = _kernels(backend)
    weight, bias = weight.contiguous(), None if bias is None else bias.contiguous()
    grad_logp = flush_negligible(grad_logp.float()).contiguous()
    return backward_impl(hidden, weight, bias, targets, lse, entropy, grad_logp, None, inv_temperature,
                         needs_input_grad=needs_input_grad)


class LinearLogprobsFunction(torch.autograd.Function):
    """hidden [N, D] (rows already free of ignored targets), weight [V, D], bias [V] or None, targets [N] int64.
    Returns fp32 (logps, entropy) [N]; saves only per-row fp32 statistics, the logits are recomputed backward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, inv_temperature, backend):
        if hidden.shape[0] == 0:  # every target ignored: keep the graph, with zero gradients
            lse = target_logit = entropy = hidden.new_zeros(0, dtype=torch.float32)
        else:
            forward_impl, _ = _kernels(backend)
            lse, target_logit, entropy = forward_impl(hidden, weight, bias, targets, inv_temperature)
        ctx.save_for_backward(hidden, weight, bias, targets, lse, entropy)
        ctx.inv_temperature = inv_temperature
        ctx.backend = backend
        ctx.mark_non_differentiable(lse)
        return target_logit - lse, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        hidden, weight, bias, targets, lse, entropy = ctx.saved_tensors
        needs = tuple(ctx.needs_input_grad[:3])
        if hidden.shape[0] == 0:
            return (torch.zeros_like(hidden) if needs[0] else None, torch.zeros_like(weight) if needs[1] else None,
                    torch.zeros_like(bias) if needs[2] else None, None, None, None)
        if grad_logp is None:
            grad_logp = torch.zeros_like(lse)
        _, backward_impl = _kernels(ctx.backend)
        grad_logp = flush_negligible(grad_logp.float()).contiguous()
        grad_entropy = None if grad_entropy is None else flush_negligible(grad_entropy.float()).contiguous()
        grads = backward_impl(hidden, weight, bias, targets, lse, entropy, grad_logp, grad_entropy,
                              ctx.inv_temperature, needs_input_grad=needs)
        grad_hidden, grad_weight, grad_bias = (
            None if g is None else g.to(like.dtype) for g, like in zip(grads, (hidden, weight, bias)))
        return grad_hidden, grad_weight, grad_bias, None, None, None


def fused_linear_logprobs(hidden, weight, targets, *, bias=None, temperature=1.0, ignore_index=-100,
                          return_entropy=False):
    """Log-probabilities of ``targets`` under softmax((hidden @ weight.T + bias) / temperature), never building
    the logits.

    lp_t = z_t[y_t] - logsumexp(z_t), and with ``return_entropy`` H_t = logsumexp(z_t) - sum_v softmax(z_t)_v z_t,v,
    where z_t = (W h_t + b) / temperature (DESIGN.md section 1; the token log-prob of the DYPO paper's eq. 2-5).

    Args:
        hidden: ``[..., D]`` float32, bfloat16 or float16, the last hidden states of the response tokens.
        weight: ``[V, D]`` the lm_head weight, same dtype as ``hidden``.
        targets: ``[...]`` integer token ids (the leading shape of ``hidden``); ``ignore_index`` marks positions
            that return 0, get no gradient and cost no matrix work (they are dropped before the projection).
        bias: optional ``[V]``.
        temperature: positive; the logits are divided by it.
        return_entropy: also return the entropies (differentiable too).

    Returns:
        ``logps`` float32 shaped like ``targets``; ``(logps, entropy)`` when ``return_entropy``.

    Differentiable in ``hidden``, ``weight`` and ``bias``; the weight gradient is accumulated in fp32.
    Cost, for N kept tokens: forward 2NDV FLOP, backward 6NDV (the logits are recomputed). Extra memory
    O(N*D + V*D + chunk*V): never an N x V tensor (CPU: 128 MiB logit chunks; CUDA: register tiles).
    Two host synchronisations, both before the kernels: the out-of-range target check and the selection of the kept
    rows. The CPU paths are deterministic; on CUDA the backward adds tile products with atomics, so gradients may
    differ in the last bits from run to run.

    Example:
        >>> h, W = torch.randn(2, 5, 16), torch.randn(100, 16)
        >>> y = torch.randint(0, 100, (2, 5))
        >>> fused_linear_logprobs(h, W, y).shape
        torch.Size([2, 5])
    """
    check_linear_head(hidden, weight, bias)
    check_same_device(hidden=hidden, weight=weight, targets=targets, bias=bias)
    check_targets(targets, hidden.shape[:-1], weight.shape[0], ignore_index)
    check_temperature(temperature)
    backend = select_backend(hidden.device)

    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    flat_targets = targets.reshape(-1)
    kept = (flat_targets != ignore_index).nonzero().squeeze(1)
    all_kept = kept.numel() == flat_targets.numel()
    kept_hidden = flat_hidden if all_kept else flat_hidden.index_select(0, kept)
    kept_targets = flat_targets if all_kept else flat_targets.index_select(0, kept)
    logps, entropy = LinearLogprobsFunction.apply(kept_hidden.contiguous(), weight.contiguous(), bias,
                                                  kept_targets.long().contiguous(), 1.0 / temperature, backend)
    if not all_kept:
        zeros = torch.zeros(flat_targets.shape, dtype=torch.float32, device=hidden.device)
        logps, entropy = zeros.index_put((kept,), logps), zeros.index_put((kept,), entropy)
    logps = logps.view(targets.shape)
    return (logps, entropy.view(targets.shape)) if return_entropy else logps
