"""DYPO's group alignment loss: gal_loss on sequence log-probs, its per-sequence coefficients, and fused_gal_loss
from hidden states."""

import torch

from dypo_kernels.amp import follows_autocast
from dypo_kernels.backend import select_backend
from dypo_kernels.custom_ops import traceable_loss
from dypo_kernels.gal.pairs import METRICS, coefficients, group_layout, has_pair, loss_and_metrics, pair_terms
from dypo_kernels.gal.terms import GROUP_GROWTH, GalTerms, gal_chunks, gal_layout, plan_gal, sweep_ahead
from dypo_kernels.groups import group_ids
from dypo_kernels.logprob_pass import LogprobPass
from dypo_kernels.packing import sequence_inputs
from dypo_kernels.sweep import select_impl, sweep_loss
from dypo_kernels.tokens import select_tokens
from dypo_kernels.validation import (
    Checks,
    check_number,
    check_per_sequence,
    check_same_device,
    check_temperature,
    check_tensor,
)


def _checked_pairs(seq_logps, rewards, ref_seq_logps, group_size, group_index, beta):
    """The public functions' checks, then the pairs of their inputs."""
    check_tensor("seq_logps", seq_logps, dims=(1,))
    check_tensor("rewards", rewards, dims=(1,))
    if ref_seq_logps is not None:
        check_tensor("ref_seq_logps", ref_seq_logps, dims=(1,))
    for name, value in (("rewards", rewards), ("ref_seq_logps", ref_seq_logps)):
        if value is not None and value.shape != seq_logps.shape:
            raise ValueError(f"{name} {tuple(value.shape)} must match seq_logps {tuple(seq_logps.shape)}")
    check_same_device(seq_logps=seq_logps, rewards=rewards, ref_seq_logps=ref_seq_logps, group_index=group_index)
    check_number("beta", beta, low=0)
    checks = Checks()
    if rewards.numel():
        checks.require(torch.isfinite(rewards).all(), "rewards must be finite; found NaN or inf")
    ids, groups = group_ids(seq_logps.shape[0], seq_logps.device, group_size, group_index, checks)
    slot, width = group_layout(ids, checks)
    checks.run()
    return pair_terms(seq_logps, rewards, ref_seq_logps, ids, slot, groups.value, width.value), ids, slot


def gal_loss(seq_logps, rewards, *, ref_seq_logps=None, group_size=None, group_index=None, beta=1.0,
             return_metrics=False):
    """Group alignment loss (DYPO paper eq. 14-15) on sequence log-probs.

    For each pair (s, f) of one group with R_s > R_f: d = (S_s - S_ref,s) - (S_f - S_ref,f) and
    l = -log sigmoid(beta * d). The loss is the mean over each group's pairs, then the mean over the groups that
    have at least one pair; groups without pairs contribute nothing, and a batch without any pair gives a zero
    loss that still backpropagates (zero gradients).

    Args:
        seq_logps: ``[B]`` sequence log-probs S_i (sum, or mean, of the token log-probs), differentiable.
        rewards: ``[B]`` finite rewards.
        ref_seq_logps: optional ``[B]`` reference-model sequence log-probs.
        group_size / group_index: uniform groups of consecutive rows, or ``[B]`` ids 0..G-1 (exactly one).
        beta: >= 0, the sharpness beta_GAL.
        return_metrics: also return detached ``{"num_pairs", "pair_accuracy", "mean_margin"}`` (accuracy: share
            of pairs with d > 0).

    Returns:
        fp32 scalar loss (and the metrics dict). Cost: O(B * K) memory and work for groups of at most K rows.
    """
    (difference, is_pair), _, _ = _checked_pairs(seq_logps, rewards, ref_seq_logps, group_size, group_index, beta)
    loss, metrics = loss_and_metrics(difference, is_pair, beta)
    return (loss, metrics) if return_metrics else loss


def groups_with_pairs(rewards, group_ids):
    """How many of the groups named by ``group_ids`` ([B] integers, any values) hold a GAL pair, i.e. rewards that
    are not all equal; one host sync."""
    if not group_ids.numel():
        return 0
    groups = torch.unique(group_ids, return_inverse=True)[1]
    return int(has_pair(rewards, groups, int(groups.max()) + 1).sum())


def gal_coefficients(seq_logps, rewards, *, ref_seq_logps=None, group_size=None, group_index=None, beta=1.0,
                     pair_groups=None):
    """c_i = d gal_loss / d S_i, detached ``[B]`` fp32: the GAL gradient is sum_i c_i grad S_i (docs/design.md,
    "The method and its math"), so a fused sweep can treat c_i as a per-sequence advantage.

    With w_sf = 1 / (pairs of the group * groups with pairs) and sigma = sigmoid(-beta d_sf):
    c_s = -beta sum_f w_sf sigma_sf over the pairs where s succeeds, c_f = +beta sum_s w_sf sigma_sf where f fails.
    ``pair_groups``: the number of groups with pairs in the whole batch when these rows are whole groups of it
    (None: those counted here).
    """
    with torch.no_grad():
        (difference, is_pair), ids, slot = _checked_pairs(seq_logps.detach(), rewards, ref_seq_logps, group_size,
                                                          group_index, beta)
        return coefficients(difference, is_pair, beta, pair_groups, ids, slot).float()


def sequence_logprobs(token_logps, mask, average):
    """S_i: the sum (or, with ``average``, the mean) of token log-probs ``[B, T]`` over ``mask``; what lies outside
    the mask (padding, possibly NaN) is not read."""
    total = torch.where(mask.bool(), token_logps.float(), 0.0).sum(-1)
    return total / mask.sum(-1).clamp(min=1) if average else total


@follows_autocast("hidden", "weight", "bias")
@traceable_loss(lambda *args, **kwargs: list(METRICS))
def fused_gal_loss(hidden, weight, targets, rewards, *, group_size=None, group_index=None, mask=None, ref_logps=None,
                   ref_seq_logps=None, beta=1.0, average_log_prob=False, bias=None, temperature=1.0,
                   cu_seqlens=None, return_metrics=False, impl=None, chunk_bytes=None):
    """Group alignment loss (DYPO paper eq. 14-15) from hidden states, never building the logits: gal_loss on
    S_i = sum_t mask_i,t lp_i,t (the mean with ``average_log_prob``), lp the token log-probs of fused_linear_logprobs.

    Args:
        hidden: ``[B, T, D]`` fp32/bf16/fp16; weight ``[V, D]``; bias ``[V]`` or None; targets ``[B, T]``.
        rewards: ``[B]`` finite; pairs (s, f) of one group with R_s > R_f.
        group_size / group_index: uniform groups of consecutive rows or ``[B]`` ids 0..G-1 (exactly one).
        mask: ``[B, T]`` the response tokens (None: all).
        cu_seqlens: padding-free input (``[S + 1]`` offsets from 0 to N, flash-attn's convention): hidden ``[N, D]``,
            targets, mask and ref_logps ``[N]``, rewards (and group_index, ref_seq_logps) ``[S]``. One more host sync.
        ref_logps: ``[B, T]`` reference token log-probs, or ref_seq_logps ``[B]`` (at most one); constants.
        beta: >= 0; temperature > 0; return_metrics: as gal_loss.
        impl, chunk_bytes: as fused_linear_logprobs ("chunked" or "fused"; the chunk budget).

    Returns:
        fp32 scalar (and the metrics); a batch without pairs gives 0 with zero gradients.

    Cost: the rows of groups whose rewards are all equal (no pair) are not projected at all. The gradient is
    sum_i c_i grad S_i, and c_i needs the current S of every sequence of i's group (docs/design.md, "GAL in the
    sweep"): each chunk holds whole groups, growing to hold one of up to 4 chunks' rows, and computes their c_i from
    its own log-probs before forming its gradient: one sweep, 6NDV FLOP. A larger group is swept ahead once without
    gradients (2 r D V for its r tokens), so memory stays O(N*D + V*D + chunk_bytes) whatever the group size. Two
    host syncs: the checks with their counts, and the groups' sizes.
    """
    checks = Checks()
    packed, batch_size, targets, mask, per_token = sequence_inputs(hidden, weight, bias, targets, mask, cu_seqlens,
                                                                   checks, ref_logps=ref_logps)
    ref_logps = per_token["ref_logps"]
    check_per_sequence(batch_size, hidden.device, checks, rewards=rewards, ref_seq_logps=ref_seq_logps)
    if ref_logps is not None and ref_seq_logps is not None:
        raise ValueError("give ref_logps ([B, T]) or ref_seq_logps ([B]), not both")
    check_number("beta", beta, low=0)
    check_temperature(temperature)
    ids, groups = group_ids(batch_size, hidden.device, group_size, group_index, checks)
    checks.run()
    device = hidden.device
    backend = select_backend(device)
    impl = select_impl(impl, backend, device)

    mask = torch.ones(targets.shape, dtype=torch.bool, device=device) if mask is None else mask.bool()
    if ref_logps is not None:
        ref_seq_logps = sequence_logprobs(ref_logps.detach(), mask, average_log_prob)
    order = torch.arange(ids.shape[0], device=device) if group_size is not None else torch.argsort(ids, stable=True)
    layout = gal_layout(weight, device, backend, impl, chunk_bytes)
    # the groups whose rewards are not all equal (the only ones with pairs), each group's rows together
    plan = plan_gal(order, ids[order], mask[order].sum(-1), GROUP_GROWTH * layout[0],
                    keep=has_pair(rewards, ids, groups.value))
    _, _, kept_hidden, kept_targets = select_tokens(hidden, targets, mask, plan.gal_tokens, plan.rows, packed)
    gal = GalTerms.of_plan(plan, kept_hidden.shape[0], rewards=rewards[plan.rows].float(), beta=beta,
                           ref_seq_logps=None if ref_seq_logps is None else ref_seq_logps.detach()[plan.rows].float(),
                           divisor=plan.lengths.clamp(min=1).float() if average_log_prob else None)
    op_pass = LogprobPass(kept_targets, 1.0 / temperature, backend, gal=gal)
    sweep_ahead(op_pass, plan, kept_hidden, weight, bias, impl, chunk_bytes)
    loss = sweep_loss(kept_hidden, weight, bias, op_pass, gal_chunks(plan, layout, kept_hidden.shape[0]), impl)
    return (loss, gal.loss_and_metrics()[1]) if return_metrics else loss
