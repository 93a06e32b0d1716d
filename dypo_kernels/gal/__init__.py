"""DYPO's group alignment loss: gal_loss on sequence log-probs, its per-sequence coefficients, and fused_gal_loss
from hidden states."""

import torch
import torch.nn.functional as F

from dypo_kernels.backend import select_backend
from dypo_kernels.groups import group_ids
from dypo_kernels.linear_logprobs import fused_linear_logprobs
from dypo_kernels.sweep import TokenTerms, chunk_capacity, select_tokens, sweep_loss, whole_group_chunks
from dypo_kernels.validation import check_number, check_per_sequence, check_same_device, check_sequence_batch, \
    check_temperature, check_tensor


def _padded_groups(ids, num_groups, group_size):
    """(order, slot): row order[j] goes to [group, slot[j]] of a [G, K] padded layout; K the largest group."""
    rows = torch.arange(ids.shape[0], device=ids.device)
    if group_size is not None:
        return rows, rows % group_size, group_size
    order = torch.argsort(ids, stable=True)
    counts = torch.bincount(ids, minlength=num_groups)
    starts = counts.cumsum(0) - counts
    slot = rows - starts[ids[order]]
    return order, slot, int(counts.max()) if counts.numel() else 0


def _pairs(seq_logps, rewards, ref_seq_logps, group_size, group_index, beta):
    """Pairwise margins d [G, K, K] (row s minus row f), the pair mask (same group, R_s > R_f) and the
    padded layout, for the inputs checked and grouped."""
    check_tensor("seq_logps", seq_logps, dims=(1,))
    check_tensor("rewards", rewards, dims=(1,))
    if ref_seq_logps is not None:
        check_tensor("ref_seq_logps", ref_seq_logps, dims=(1,))
    for name, value in (("rewards", rewards), ("ref_seq_logps", ref_seq_logps)):
        if value is not None and value.shape != seq_logps.shape:
            raise ValueError(f"{name} {tuple(value.shape)} must match seq_logps {tuple(seq_logps.shape)}")
    check_same_device(seq_logps=seq_logps, rewards=rewards, ref_seq_logps=ref_seq_logps, group_index=group_index)
    if not isinstance(beta, (int, float)) or not beta >= 0:
        raise ValueError(f"beta must be a number >= 0, got {beta!r}")
    if rewards.numel() and not bool(torch.isfinite(rewards).all()):
        raise ValueError("rewards must be finite; found NaN or inf")
    ids, num_groups = group_ids(seq_logps.shape[0], seq_logps.device, group_size, group_index)
    order, slot, width = _padded_groups(ids, num_groups, group_size)
    margins = seq_logps.float() if ref_seq_logps is None else seq_logps.float() - ref_seq_logps.float()
    padded_margin = margins.new_zeros(num_groups, width).index_put((ids[order], slot), margins[order])
    padded_reward = rewards.new_full((num_groups, width), float("-inf"), dtype=torch.float32).index_put(
        (ids[order], slot), rewards[order].float())
    present = torch.zeros(num_groups, width, dtype=torch.bool, device=ids.device).index_put(
        (ids[order], slot), torch.ones_like(slot, dtype=torch.bool))
    is_pair = present[:, :, None] & present[:, None, :] & (padded_reward[:, :, None] > padded_reward[:, None, :])
    difference = padded_margin[:, :, None] - padded_margin[:, None, :]
    return difference, is_pair, (ids, order, slot)


def _group_weights(is_pair, pair_groups=None):
    """1 / (pairs in the group * groups with pairs), per pair; 0 where there is no pair. ``pair_groups`` replaces
    the count of groups with pairs when the groups are a part of a batch."""
    pairs_per_group = is_pair.sum((1, 2)).float()
    pair_groups = (pairs_per_group > 0).sum().clamp(min=1) if pair_groups is None else max(pair_groups, 1)
    return is_pair / (pairs_per_group.clamp(min=1) * pair_groups)[:, None, None]


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
    difference, is_pair, _ = _pairs(seq_logps, rewards, ref_seq_logps, group_size, group_index, beta)
    pair_loss = torch.where(is_pair, -F.logsigmoid(beta * difference), 0.0)
    loss = (pair_loss * _group_weights(is_pair)).sum()
    if not return_metrics:
        return loss
    num_pairs = is_pair.sum()
    with torch.no_grad():
        metrics = {"num_pairs": num_pairs,
                   "pair_accuracy": (is_pair & (difference > 0)).sum() / num_pairs.clamp(min=1),
                   "mean_margin": torch.where(is_pair, difference, 0.0).sum() / num_pairs.clamp(min=1)}
    return loss, metrics


def _has_pair(rewards, ids, num_groups):
    """bool ``[G]``: the groups (ids 0..G-1 of the rows) whose rewards are not all equal, the only ones with pairs."""
    rewards = rewards.float()
    highest = rewards.new_full((num_groups,), float("-inf")).scatter_reduce(0, ids, rewards, "amax")
    lowest = rewards.new_full((num_groups,), float("inf")).scatter_reduce(0, ids, rewards, "amin")
    return highest > lowest


def groups_with_pairs(rewards, group_ids):
    """How many of the groups named by ``group_ids`` ([B] integers, any values) hold a GAL pair, i.e. rewards that
    are not all equal; one host sync."""
    if not group_ids.numel():
        return 0
    groups = torch.unique(group_ids, return_inverse=True)[1]
    return int(_has_pair(rewards, groups, int(groups.max()) + 1).sum())


def gal_coefficients(seq_logps, rewards, *, ref_seq_logps=None, group_size=None, group_index=None, beta=1.0,
                     pair_groups=None):
    """c_i = d gal_loss / d S_i, detached ``[B]`` fp32: the GAL gradient is sum_i c_i grad S_i (DESIGN.md section
    1, "a useful identity"), so a fused sweep can treat c_i as a per-sequence advantage.

    With w_sf = 1 / (pairs of the group * groups with pairs) and sigma = sigmoid(-beta d_sf):
    c_s = -beta sum_f w_sf sigma_sf over the pairs where s succeeds, c_f = +beta sum_s w_sf sigma_sf where f fails.
    ``pair_groups``: the number of groups with pairs in the whole batch when these rows are whole groups of it
    (None: those counted here).
    """
    with torch.no_grad():
        difference, is_pair, (ids, order, slot) = _pairs(seq_logps.detach(), rewards, ref_seq_logps,
                                                         group_size, group_index, beta)
        pull = _group_weights(is_pair, pair_groups) * beta * torch.sigmoid(-beta * difference)
        padded = pull.sum(2) * -1.0 + pull.sum(1)  # [G, K]: as the successful s, minus; as the failed f, plus
        coefficients = torch.empty_like(seq_logps, dtype=torch.float32)
        coefficients[order] = padded[ids[order], slot]
        return coefficients


def chunked_gal_gradient(chunks, token_row, group, rewards, *, ref_seq_logps=None, beta=1.0, pair_groups,
                         scale=1.0, divisor=None, seq_logps=None):
    """TokenTerms.group_gradient of GAL, for S sequences ordered group by group: ``group`` ``[S]`` their group ids
    0..G-1 (non-decreasing), ``token_row`` ``[N]`` each kept token's sequence 0..S-1 (-1: a token outside GAL),
    ``chunks`` from whole_group_chunks over the N tokens. For the tokens of a chunk (or of all rows, Triton's call):
    scale * c_i / divisor_i, with c_i (gal_coefficients, over the whole batch's ``pair_groups``) from the chunk's own
    S_i = (sum of the tokens' log-probs) / divisor_i, which also go into ``seq_logps`` when given."""
    num_rows = group.shape[0]
    divisor = torch.ones(num_rows, device=group.device) if divisor is None else divisor
    first_row = [0] + torch.bincount(group).cumsum(0).tolist()
    rows_of_chunk = {(start, stop): (first_row[first], first_row[last]) for start, stop, first, last in chunks}
    rows_of_chunk[(0, token_row.shape[0])] = (0, num_rows)

    def group_gradient(tokens, logps):
        gradient = torch.zeros_like(logps)
        first, last = rows_of_chunk[(tokens.start, tokens.stop)]
        if first == last:  # a chunk of tokens outside GAL only
            return gradient
        row = token_row[tokens]
        inside = row >= 0
        row = row[inside] - first
        chunk_seq_logps = torch.zeros(last - first, device=logps.device).index_add_(0, row, logps[inside]) / \
            divisor[first:last]
        if seq_logps is not None:
            seq_logps[first:last] = chunk_seq_logps
        coefficients = gal_coefficients(
            chunk_seq_logps, rewards[first:last], group_index=group[first:last] - group[first],
            ref_seq_logps=None if ref_seq_logps is None else ref_seq_logps[first:last], beta=beta,
            pair_groups=pair_groups)
        gradient[inside] = (scale * coefficients / divisor[first:last])[row]
        return gradient

    return group_gradient


def sequence_logprobs(token_logps, mask, average):
    """S_i: the sum (or, with ``average``, the mean) of token log-probs ``[B, T]`` over ``mask``; what lies outside
    the mask (padding, possibly NaN) is not read."""
    total = torch.where(mask.bool(), token_logps.float(), 0.0).sum(-1)
    return total / mask.sum(-1).clamp(min=1) if average else total


def fused_gal_loss(hidden, weight, targets, rewards, *, group_size=None, group_index=None, mask=None, ref_logps=None,
                   ref_seq_logps=None, beta=1.0, average_log_prob=False, bias=None, temperature=1.0,
                   return_metrics=False):
    """Group alignment loss (DYPO paper eq. 14-15) from hidden states, never building the logits: gal_loss on
    S_i = sum_t mask_i,t lp_i,t (the mean with ``average_log_prob``), lp the token log-probs of fused_linear_logprobs.

    Args:
        hidden: ``[B, T, D]`` fp32/bf16/fp16; weight ``[V, D]``; bias ``[V]`` or None; targets ``[B, T]``.
        rewards: ``[B]`` finite; pairs (s, f) of one group with R_s > R_f.
        group_size / group_index: uniform groups of consecutive rows or ``[B]`` ids 0..G-1 (exactly one).
        mask: ``[B, T]`` the response tokens (None: all).
        ref_logps: ``[B, T]`` reference token log-probs, or ref_seq_logps ``[B]`` (at most one); constants.
        beta: >= 0; temperature > 0; return_metrics: as gal_loss, plus ``num_sweeps``.

    Returns:
        fp32 scalar (and the metrics); a batch without pairs gives 0 with zero gradients.

    Cost: the rows of groups whose rewards are all equal (no pair) are not projected at all. The gradient is
    sum_i c_i grad S_i, and c_i needs the current S of every sequence of i's group. One sweep (CPU 6NDV FLOP, CUDA
    8NDV) when every group's response tokens fit in one CPU chunk of logits (128 MiB / 4V, e.g.
    1,024 tokens at V = 32,768, 220 at V = 151,936), and always on CUDA: each chunk holds whole groups and computes
    their c_i from its own log-probs before forming its gradient. On CPU with larger groups, two sweeps (8NDV): the
    log-probs, then their gradient. Extra memory O(N*D + V*D + chunk*V) either way (one sweep holds the fp32
    gradients of hidden and weight from the forward to the backward). Host syncs: the checks, the grouping, and in
    each chunk the coefficients' checks.
    """
    check_sequence_batch(hidden, weight, bias, targets, mask, ref_logps=ref_logps)
    check_per_sequence(hidden.shape[0], hidden.device, rewards=rewards, ref_seq_logps=ref_seq_logps)
    if ref_logps is not None and ref_seq_logps is not None:
        raise ValueError("give ref_logps ([B, T]) or ref_seq_logps ([B]), not both")
    check_number("beta", beta, low=0)
    check_temperature(temperature)
    ids, num_groups = group_ids(hidden.shape[0], hidden.device, group_size, group_index)
    backend = select_backend(hidden.device)

    device = hidden.device
    mask = torch.ones(targets.shape, dtype=torch.bool, device=device) if mask is None else mask.bool()
    if ref_logps is not None:
        ref_seq_logps = sequence_logprobs(ref_logps.detach(), mask, average_log_prob)
    order = torch.arange(ids.shape[0], device=device) if group_size is not None else torch.argsort(ids, stable=True)
    rows = order[_has_pair(rewards, ids, num_groups)[ids[order]]]  # the groups with pairs, each group's rows together
    pair_group = torch.unique_consecutive(ids[rows], return_inverse=True)[1]
    used = dict(rewards=rewards[rows].float(), group_index=pair_group, beta=beta,
                ref_seq_logps=None if ref_seq_logps is None else ref_seq_logps.detach()[rows].float())
    lengths = mask[rows].sum(-1)
    num_pair_groups = int(pair_group[-1]) + 1 if rows.numel() else 0
    tokens_per_group = torch.zeros(num_pair_groups, dtype=torch.long, device=device).index_add_(
        0, pair_group, lengths).tolist()
    chunks = whole_group_chunks(tokens_per_group, chunk_capacity(backend, weight.shape[0]))

    if chunks is None:  # the log-probs of every row, then gal_loss's gradient through them
        in_pair_group = torch.zeros(hidden.shape[0], dtype=torch.bool, device=device).index_fill_(0, rows, True)
        used_targets = targets.masked_fill(~(mask & in_pair_group[:, None]), -1)
        token_logps = fused_linear_logprobs(hidden, weight, used_targets, bias=bias, temperature=temperature,
                                            ignore_index=-1)
        seq_logps = sequence_logprobs(token_logps[rows], mask[rows], average_log_prob)
        loss, metrics = gal_loss(seq_logps, return_metrics=True, **used)
        return (loss, {**metrics, "num_sweeps": 2 if torch.is_grad_enabled() else 1}) if return_metrics else loss

    _, _, kept_hidden, kept_targets = select_tokens(hidden, targets, mask, rows)
    token_row = torch.repeat_interleave(torch.arange(rows.shape[0], device=device), lengths)  # position in rows
    seq_logps = torch.zeros(rows.shape[0], dtype=torch.float32, device=device)
    group_gradient = chunked_gal_gradient(
        chunks, token_row, pair_group, used["rewards"], ref_seq_logps=used["ref_seq_logps"], beta=beta,
        pair_groups=num_pair_groups, divisor=lengths.clamp(min=1).float() if average_log_prob else None,
        seq_logps=seq_logps)
    terms = TokenTerms(group_gradient=group_gradient, chunks=[chunk[:2] for chunk in chunks])
    outcome = {}

    def finish(result):
        loss, outcome["metrics"] = gal_loss(seq_logps, return_metrics=True, **used)
        return loss, None

    loss = sweep_loss(kept_hidden, weight, bias, kept_targets, temperature, backend, terms, finish)
    return (loss, {**outcome["metrics"], "num_sweeps": 1}) if return_metrics else loss

