"""fused_sft_loss: the negative log-likelihood of teacher trajectories from hidden states, in one sweep."""

from dypo_kernels.amp import follows_autocast
from dypo_kernels.backend import select_backend
from dypo_kernels.custom_ops import traceable_loss
from dypo_kernels.logprob_pass import LogprobPass, TokenTerms
from dypo_kernels.packing import unpack
from dypo_kernels.sweep import loss_chunks, select_impl, sweep_loss
from dypo_kernels.tokens import select_tokens
from dypo_kernels.validation import (
    Checks,
    check_choice,
    check_ignore_index,
    check_linear_head,
    check_mask_values,
    check_same_device,
    check_targets,
    check_temperature,
    check_tensor,
)

REDUCTIONS = ("token_mean", "seq_mean")


def sft_weights(reduction, valid, sequence):
    """Weight of each kept token: 1 / (valid tokens) for "token_mean"; 1 / (len_i * sequences with a valid token)
    for "seq_mean". ``valid`` [S, T] bool, ``sequence`` [N] the kept tokens' rows."""
    if reduction == "token_mean":
        return (1.0 / valid.sum().clamp(min=1).float()).expand(sequence.shape[0]).contiguous()
    lengths = valid.sum(-1)
    return 1.0 / (lengths[sequence].float() * (lengths > 0).sum().clamp(min=1))


@follows_autocast("hidden", "weight", "bias")
@traceable_loss()
def fused_sft_loss(hidden, weight, targets, *, mask=None, ignore_index=-100, reduction="token_mean", bias=None,
                   temperature=1.0, cu_seqlens=None, impl=None, chunk_bytes=None):
    """Negative log-likelihood of teacher trajectories (DYPO paper eq. 5), never building the logits:
    -sum_t w_t lp_t with lp_t = log softmax((W h_t + b) / temperature)[y_t].

    "token_mean": w_t = 1 / (valid tokens); "seq_mean": the mean over each sequence's valid tokens, then over the
    sequences that have one. A token is valid where ``targets`` != ``ignore_index`` and ``mask`` (if given) is set.

    Args:
        hidden: ``[..., T, D]`` (or ``[T, D]``, one sequence) fp32/bf16/fp16; weight ``[V, D]``; bias ``[V]`` or None.
        targets: ``[..., T]`` token ids; mask: optional, the shape of targets.
        cu_seqlens: padding-free input (``[S + 1]`` offsets from 0 to N, flash-attn's convention): hidden ``[N, D]``,
            targets and mask ``[N]``; "seq_mean" takes the sequences from the offsets. One more host sync.

    Returns:
        fp32 scalar, differentiable in hidden, weight and bias; 0 (with zero gradients) when no token is valid.

    impl and chunk_bytes as fused_linear_logprobs.

    Cost: one sweep, the gradients formed in the forward (6NDV FLOP; 8NDV with impl="fused"); extra memory
    O(N*D + V*D + chunk_bytes); one host sync (the target check and the token count). Same as Liger-Kernel's fused
    linear cross-entropy with mean reduction.
    """
    check_linear_head(hidden, weight, bias)
    if cu_seqlens is not None and hidden.dim() != 2:
        raise ValueError(f"hidden must be [N, D] packed rows with cu_seqlens, got shape {tuple(hidden.shape)}")
    check_tensor("targets", targets, integer=True)
    if hidden.dim() < 2 or tuple(targets.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"targets {tuple(targets.shape)} must be hidden's leading shape {tuple(hidden.shape[:-1])}, "
                         "with at least one dimension")
    if mask is not None:
        check_tensor("mask", mask)
        if mask.shape != targets.shape:
            raise ValueError(f"mask {tuple(mask.shape)} must have the shape of targets {tuple(targets.shape)}")
    check_same_device(hidden=hidden, weight=weight, bias=bias, targets=targets, mask=mask)
    check_choice("reduction", reduction, REDUCTIONS)
    check_temperature(temperature)
    check_ignore_index(ignore_index)
    checks = Checks()
    check_mask_values(mask, checks)
    valid = targets != ignore_index
    if mask is not None:
        valid &= mask.bool()
    check_targets(targets.masked_fill(~valid, 0), targets.shape, weight.shape[0], None, checks=checks)
    tokens = checks.count(valid.sum())
    checks.run()
    backend = select_backend(hidden.device)
    impl = select_impl(impl, backend, hidden.device)

    packed = None
    if cu_seqlens is not None:
        packed = unpack(cu_seqlens, hidden.shape[0], hidden.device)
        valid, targets = packed.pad(valid, False), packed.pad(targets, 0)
        rows = hidden
    else:
        valid = valid.reshape(-1, targets.shape[-1])
        rows = hidden.reshape(*valid.shape, hidden.shape[-1])
    _, sequence, kept_hidden, kept_targets = select_tokens(rows, targets.reshape(valid.shape), valid, tokens.value,
                                                           packed=packed)
    op_pass = LogprobPass(kept_targets, 1.0 / temperature, backend,
                          terms=TokenTerms(nll_weight=sft_weights(reduction, valid, sequence)))
    return sweep_loss(kept_hidden, weight, bias, op_pass, loss_chunks(op_pass, kept_hidden, weight, impl, chunk_bytes),
                      impl)
