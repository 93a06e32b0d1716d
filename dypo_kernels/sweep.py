"""The single sweep of the losses (fused_grpo_loss, fused_sft_loss, fused_gal_loss, dypo_loss): one copy of their
per-token math, and the autograd.Function that computes their value and all their gradients in one pass over the
vocabulary.

Each of these losses is sum_t L_t(lp_t), plus possibly GAL, whose gradient is sum_i c_i grad S_i with per-sequence
coefficients c_i (DESIGN.md section 1, "a useful identity"). Their logit gradient is therefore
g_t (onehot(y_t) - softmax(z_t)) / T with g_t = dL/dlp_t, a function of the token's own log-prob, of per-token
constants and, for GAL, of the log-probs of the other tokens of its group, which the sweep takes in the same chunk:
the sweep computes lp_t, then g_t, then the gradients, before the forward returns. The backward only scales
the stored gradients by the incoming one (Liger-Kernel's scheme for its chunked losses).
"""

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch.autograd.function import once_differentiable

from dypo_kernels.linear_logprobs import correction_gradients, cpu, forward_and_gradients

LOSS_TYPES = ("grpo", "bnpo", "dapo", "dr_grpo")


@dataclass
class TokenTerms:
    """Per-token constants of the objective, fp32 ``[N]`` over the kept tokens (None: the term is absent).

    L_t = pg_weight_t * -min(r_t A_t, clip(r_t, 1 - eps_low, 1 + eps_high) A_t)     (GRPO, paper eq. 2-3)
        + kl_weight_t * [r_t] * (exp(ref_t - lp_t) - (ref_t - lp_t) - 1)             (k3 estimate of the KL)
        - nll_weight_t * lp_t                                                        (SFT, paper eq. 5)
    with r_t = exp(lp_t - old_t), or 1 when ``old_logps`` is None (on-policy: the ratio of a detached copy). The KL
    term carries r_t with ``kl_importance_weighted`` (DeepSeek-V3.2's unbiased KL gradient, TRL's and Liger-Kernel's
    use_bias_correction_kl): its gradient is then kl_weight_t r_t (lp_t - ref_t).
    ``seq_coef_t`` adds a constant to dL/dlp_t with no value: the GAL gradient c_i of the token's sequence, whose
    value the caller computes from the sequence log-probs. ``group_gradient(rows, logps)`` adds to dL/dlp_t a term
    that depends on the log-probs of other tokens (GAL's c_i, from the current sequence log-probs of the tokens'
    groups); the sweep then takes the token ranges ``chunks`` whole, each holding whole groups and at most one
    chunk's rows, and calls it with one of them (or with all the rows).
    """

    pg_weight: Optional[torch.Tensor] = None
    advantages: Optional[torch.Tensor] = None
    old_logps: Optional[torch.Tensor] = None
    kl_weight: Optional[torch.Tensor] = None
    ref_logps: Optional[torch.Tensor] = None
    nll_weight: Optional[torch.Tensor] = None
    seq_coef: Optional[torch.Tensor] = None
    kl_importance_weighted: bool = False
    group_gradient: Optional[Callable[[slice, torch.Tensor], torch.Tensor]] = None
    chunks: Optional[List[Tuple[int, int]]] = None
    eps_low: float = 0.2
    eps_high: float = 0.2

    def evaluate(self, rows, logps):
        """(L_t, dL_t/dlp_t, diagnostics) for the tokens ``rows``, whose log-probs are ``logps``."""
        value = torch.zeros_like(logps)
        gradient = torch.zeros_like(logps)
        parts = {}
        if self.old_logps is not None and (self.pg_weight is not None or self.kl_importance_weighted):
            ratio = torch.exp(logps - self.old_logps[rows])  # shared by the policy-gradient and the bias-corrected KL
        else:
            ratio = torch.ones_like(logps)
        if self.pg_weight is not None:
            weight, advantages = self.pg_weight[rows], self.advantages[rows]
            clipped_ratio = ratio.clamp(1 - self.eps_low, 1 + self.eps_high)
            policy_loss = -torch.minimum(ratio * advantages, clipped_ratio * advantages)
            # the clipped branch is the minimum, and flat, exactly where the ratio left the trust region on the side
            # the advantage pushes it towards
            clipped_low = (ratio < 1 - self.eps_low) & (advantages < 0)
            clipped_high = (ratio > 1 + self.eps_high) & (advantages > 0)
            used = weight != 0  # tokens outside the term add an exact 0, even where their ratio overflows
            value += torch.where(used, weight * policy_loss, 0.0)
            gradient += torch.where(used & ~(clipped_low | clipped_high), -weight * advantages * ratio, 0.0)
            parts.update(policy_loss=policy_loss, ratio=ratio, clipped_low=clipped_low.float(),
                         clipped_high=clipped_high.float())
        if self.kl_weight is not None:
            weight = self.kl_weight[rows]
            log_ref_ratio = self.ref_logps[rows] - logps
            kl = torch.exp(log_ref_ratio) - log_ref_ratio - 1
            used = weight != 0
            if self.kl_importance_weighted:
                gradient += torch.where(used, weight * ratio * -log_ref_ratio, 0.0)  # r kl + r (1 - e^(ref - lp))
                kl = ratio * kl
            else:
                gradient += torch.where(used, weight * (1 - torch.exp(log_ref_ratio)), 0.0)
            value += torch.where(used, weight * kl, 0.0)
            parts["kl"] = kl  # the term as the loss has it (TRL and Liger-Kernel log the same)
        if self.nll_weight is not None:
            value -= self.nll_weight[rows] * logps
            gradient -= self.nll_weight[rows]
        if self.seq_coef is not None:
            gradient += self.seq_coef[rows]
        if self.group_gradient is not None:
            gradient += self.group_gradient(rows, logps)
        return value, gradient, parts


@dataclass
class SweepResult:
    """What one sweep gives, per kept token (fp32 ``[N]``): lse, log-prob, entropy, the value L_t and the diagnostics
    of TokenTerms.evaluate; and the fp32 gradients (hidden, weight, bias) of sum_t L_t (+ the seq_coef and
    group_gradient terms)."""

    lse: torch.Tensor
    logps: torch.Tensor
    entropy: torch.Tensor
    value: torch.Tensor
    parts: Dict[str, torch.Tensor] = field(default_factory=dict)
    grads: tuple = (None, None, None)


def sweep(hidden, weight, bias, targets, inv_temperature, terms: TokenTerms, *, needs_input_grad, backend):
    """Runs the objective ``terms`` over the kept tokens (hidden ``[N, D]``, targets ``[N]``)."""
    count = hidden.shape[0]
    value = torch.zeros(count, dtype=torch.float32, device=hidden.device)
    parts = {}

    def gradient_of_logps(rows, logps, entropy):
        chunk_value, gradient, chunk_parts = terms.evaluate(rows, logps)
        value[rows] = chunk_value
        for name, part in chunk_parts.items():
            parts.setdefault(name, torch.zeros_like(value))[rows] = part
        return gradient

    if count == 0:
        empty = torch.zeros(0, dtype=torch.float32, device=hidden.device)
        gradient_of_logps(slice(0, 0), empty, empty)
        grads = tuple(torch.zeros(like.shape, dtype=torch.float32, device=like.device) if need else None
                      for like, need in zip((hidden, weight, bias), needs_input_grad))
        return SweepResult(empty, empty, empty, value, parts, grads)
    lse, logps, entropy, *grads = forward_and_gradients(hidden, weight, bias, targets, inv_temperature,
                                                        gradient_of_logps, needs_input_grad=needs_input_grad,
                                                        backend=backend, chunks=terms.chunks)
    return SweepResult(lse, logps, entropy, value, parts, tuple(grads))


class SweepLossFunction(torch.autograd.Function):
    """loss = finish(sweep(...)) for kept tokens hidden ``[N, D]``, weight ``[V, D]``, bias ``[V]`` or None.

    ``finish(result)`` returns the scalar loss and, optionally, a per-token correction of dL/dlp_t (fp32 ``[N]``)
    found only after the sweep (dypo_loss's GAL coefficients when they came from stale old_logps: on CPU, when an RL
    group's tokens exceed one chunk); its gradients are added with one more gradient pass (6NDV). The gradients are
    computed in the forward (only when ``grad_enabled``: not under torch.no_grad) and scaled in the backward. Each loss awaiting its backward holds fp32 gradients of hidden and
    weight (N*D + V*D): sum micro-batch losses after their backward, not before.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, inv_temperature, backend, terms: TokenTerms,
                finish: Callable[[SweepResult], tuple], grad_enabled):
        needs = tuple(need and grad_enabled for need in ctx.needs_input_grad[:3])
        result = sweep(hidden, weight, bias, targets, inv_temperature, terms, needs_input_grad=needs,
                       backend=backend)
        loss, correction = finish(result)
        grads = result.grads
        if correction is not None and hidden.shape[0]:
            extra = correction_gradients(hidden, weight, bias, targets, result.lse, result.entropy, correction,
                                         inv_temperature, needs_input_grad=needs, backend=backend)
            grads = tuple(None if g is None else g.add_(e) for g, e in zip(grads, extra))
        ctx.save_for_backward(*grads)
        ctx.dtypes = tuple(None if t is None else t.dtype for t in (hidden, weight, bias))
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        grads = tuple(None if g is None else (g * grad_loss).to(dtype) for g, dtype in zip(ctx.saved_tensors,
                                                                                        ctx.dtypes))
        return (*grads, None, None, None, None, None, None)


def sweep_loss(hidden, weight, bias, targets, temperature, backend, terms, finish):
    """The loss of ``terms`` over the kept tokens, through SweepLossFunction."""
    return SweepLossFunction.apply(hidden, weight, bias, targets, 1.0 / temperature, backend, terms, finish,
                                   torch.is_grad_enabled())


def select_tokens(hidden, targets, mask, rows=None):
    """The tokens a loss uses, dropped to ``[N, D]`` rows before any projection.

    hidden ``[B, T, D]``, targets and mask ``[B, T]``; ``rows``: the sequences to take, in this order (None: all, in
    order). Returns (flat index into B*T, sequence of each token, hidden rows ``[N, D]`` contiguous, targets ``[N]``
    int64). One host sync (the number of kept tokens).
    """
    length = targets.shape[-1]
    if rows is None:
        kept = mask.reshape(-1).nonzero().squeeze(1)
    else:
        kept = (rows[:, None] * length + torch.arange(length, device=rows.device))[mask[rows]]
    sequence = torch.div(kept, length, rounding_mode="floor")
    kept_hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, kept).contiguous()
    kept_targets = targets.reshape(-1).index_select(0, kept).long().contiguous()
    return kept, sequence, kept_hidden, kept_targets


def token_weights(loss_type, mask, sequence, max_len=None, num_sequences=None, num_tokens=None):
    """Weight of each kept token in the aggregation of ``loss_type`` over the sequences of ``mask`` ``[B, T]``:
    "grpo" 1 / (B * len_i) (mean of each sequence's token mean); "bnpo"/"dapo" 1 / (tokens in the batch);
    "dr_grpo" 1 / (B * max_len), max_len defaulting to T. fp32 ``[N]`` for the tokens' sequences ``sequence``.
    ``num_sequences`` / ``num_tokens`` replace B / the batch's tokens when the batch is a part of a larger one."""
    mask = mask.float()
    sequences = mask.shape[0] if num_sequences is None else num_sequences
    if loss_type == "grpo":
        lengths = mask.sum(-1).clamp(min=1)
        return 1.0 / (sequences * lengths[sequence])
    if loss_type in ("bnpo", "dapo"):
        tokens = mask.sum() if num_tokens is None else torch.tensor(float(num_tokens), device=mask.device)
        return (1.0 / tokens.clamp(min=1)).expand(sequence.shape[0]).contiguous()
    return torch.full(sequence.shape, 1.0 / (max(sequences, 1) * (max_len or mask.shape[-1])),
                      device=mask.device)


def token_mean(values):
    """Mean of a per-token diagnostic (0 for no token)."""
    return values.mean() if values.numel() else values.new_zeros(())


def chunk_capacity(backend, vocab_size):
    """The most rows one chunk of a sweep may hold: a CPU chunk of logits; Triton takes all rows in one call."""
    return float("inf") if backend == "triton" else cpu.rows_per_chunk(vocab_size)


def whole_group_chunks(tokens_per_group, capacity, free_tokens=0):
    """Chunks for TokenTerms.chunks: token ranges (start, stop) of at most ``capacity`` tokens over groups of
    consecutive tokens (``tokens_per_group``), each group whole, then ``free_tokens`` tokens that may be split
    anywhere; each with the groups it holds (first, last + 1). None when one group alone has more tokens than
    ``capacity``. Ranges without tokens are left out."""
    chunks, token_start, token_stop, group_start = [], 0, 0, 0

    def close(group_stop):
        nonlocal token_start, group_start
        if token_stop > token_start:
            chunks.append((token_start, token_stop, group_start, group_stop))
        token_start, group_start = token_stop, group_stop

    if capacity < 1:
        return None
    for group, count in enumerate(tokens_per_group):
        if count > capacity:
            return None
        if token_stop + count - token_start > capacity:
            close(group)
        token_stop += count
    num_groups, remaining = len(tokens_per_group), free_tokens
    while remaining:
        if token_stop - token_start == capacity:
            close(num_groups)
        taken = min(capacity - (token_stop - token_start), remaining)
        token_stop, remaining = token_stop + taken, remaining - taken
    close(num_groups)
    return chunks
