"""DYPO's group alignment loss: gal_loss on sequence log-probs, its per-sequence coefficients, and fused_gal_loss
from hidden states."""

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from dypo_kernels.backend import select_backend
from dypo_kernels.groups import group_ids
from dypo_kernels.sweep import LogprobPass, group_chunks, select_impl, select_tokens, sweep_loss
from dypo_kernels.validation import check_number, check_per_sequence, check_same_device, check_sequence_batch, \
    check_temperature, check_tensor


def group_layout(ids, num_groups):
    """(slot [B], width): each row's position within its group (ids 0..G-1, any order) and the largest group's
    size, which shapes the padded [G, K] layout of the pairs. One host sync (the width)."""
    rows = torch.arange(ids.shape[0], device=ids.device)
    order = torch.argsort(ids, stable=True)
    counts = torch.bincount(ids, minlength=num_groups)
    slot = torch.empty_like(ids)
    slot[order] = rows - (counts.cumsum(0) - counts)[ids[order]]
    return slot, int(counts.max()) if counts.numel() else 0


def _pair_terms(seq_logps, rewards, ref_seq_logps, group, slot, num_groups, width):
    """Pairwise margins d [G, K, K] (row s minus row f) and the pair mask (same group, R_s > R_f), unchecked, for
    sequences at (group, slot) of a padded [G, K] layout."""
    margins = seq_logps.float() if ref_seq_logps is None else seq_logps.float() - ref_seq_logps.float()
    padded_margin = margins.new_zeros(num_groups, width).index_put((group, slot), margins)
    padded_reward = margins.new_full((num_groups, width), float("-inf")).index_put((group, slot), rewards.float())
    present = torch.zeros(num_groups, width, dtype=torch.bool, device=group.device).index_put(
        (group, slot), torch.ones_like(slot, dtype=torch.bool))
    is_pair = present[:, :, None] & present[:, None, :] & (padded_reward[:, :, None] > padded_reward[:, None, :])
    return padded_margin[:, :, None] - padded_margin[:, None, :], is_pair


def _pair_weights(is_pair, pair_groups=None):
    """1 / (pairs in the group * groups with pairs), per pair; 0 where there is no pair. ``pair_groups`` (an int
    or a 0-dim tensor) replaces the count of groups with pairs when the groups are a part of a batch."""
    pairs_per_group = is_pair.sum((1, 2)).float()
    if pair_groups is None:
        pair_groups = (pairs_per_group > 0).sum()
    return is_pair / (pairs_per_group.clamp(min=1) * torch.as_tensor(pair_groups).clamp(min=1))[:, None, None]


def _loss_and_metrics(difference, is_pair, beta, pair_groups=None):
    pair_loss = torch.where(is_pair, -F.logsigmoid(beta * difference), 0.0)
    loss = (pair_loss * _pair_weights(is_pair, pair_groups)).sum()
    num_pairs = is_pair.sum()
    with torch.no_grad():
        metrics = {"num_pairs": num_pairs,
                   "pair_accuracy": (is_pair & (difference > 0)).sum() / num_pairs.clamp(min=1),
                   "mean_margin": torch.where(is_pair, difference, 0.0).sum() / num_pairs.clamp(min=1)}
    return loss, metrics


def _coefficients(difference, is_pair, beta, pair_groups, group, slot):
    """c_i of every sequence at (group, slot): minus its pulls as the successful s, plus as the failed f."""
    pull = _pair_weights(is_pair, pair_groups) * beta * torch.sigmoid(-beta * difference)
    return (pull.sum(1) - pull.sum(2))[group, slot]


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
    if rewards.numel() and not bool(torch.isfinite(rewards).all()):
        raise ValueError("rewards must be finite; found NaN or inf")
    ids, num_groups = group_ids(seq_logps.shape[0], seq_logps.device, group_size, group_index)
    slot, width = group_layout(ids, num_groups)
    return _pair_terms(seq_logps, rewards, ref_seq_logps, ids, slot, num_groups, width), ids, slot


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
    loss, metrics = _loss_and_metrics(difference, is_pair, beta)
    return (loss, metrics) if return_metrics else loss


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
        (difference, is_pair), ids, slot = _checked_pairs(seq_logps.detach(), rewards, ref_seq_logps, group_size,
                                                          group_index, beta)
        return _coefficients(difference, is_pair, beta, pair_groups, ids, slot).float()


@dataclass
class GalTerms:
    """GAL's part of a sweep (LogprobPass.gal): S sequences ordered group by group, ``group`` [S] their group ids
    0..G-1 (non-decreasing), ``slot`` [S] their positions in their groups (largest: ``width``), ``token_sequence``
    [N] each kept token's sequence 0..S-1 (-1: a token outside GAL). For a chunk holding whole groups, ``gradient``
    gives its tokens' scale * c_i / divisor_i, with c_i (gal_coefficients) from the chunk's own sequence log-probs
    S_i = (sum of its tokens' log-probs) / divisor_i, which it stores in ``seq_logps``. ``pair_groups``: the groups
    with a pair among the S sequences (a 0-dim tensor: no host sync)."""

    token_sequence: torch.Tensor
    group: torch.Tensor
    slot: torch.Tensor
    num_groups: int
    width: int
    rewards: torch.Tensor
    ref_seq_logps: Optional[torch.Tensor]
    beta: float
    scale: float = 1.0
    divisor: Optional[torch.Tensor] = None
    seq_logps: Optional[torch.Tensor] = None
    pair_groups: Optional[torch.Tensor] = None

    def __post_init__(self):
        self.seq_logps = torch.zeros(self.group.shape, dtype=torch.float32, device=self.group.device)
        self.pair_groups = _has_pair(self.rewards, self.group, self.num_groups).sum()

    def gradient(self, chunk, logps):
        first, last = chunk.first_sequence, chunk.last_sequence
        if first == last:  # a chunk of tokens outside GAL only
            return torch.zeros_like(logps)
        row = self.token_sequence[chunk.rows]
        inside = row >= 0
        local = torch.where(inside, row - first, 0)
        seq_logps = torch.zeros(last - first, dtype=torch.float32, device=logps.device).index_add_(
            0, local, torch.where(inside, logps, 0.0))
        if self.divisor is not None:
            seq_logps = seq_logps / self.divisor[first:last]
        self.seq_logps[first:last] = seq_logps
        group, slot = self.group[first:last] - chunk.first_group, self.slot[first:last]
        difference, is_pair = _pair_terms(seq_logps, self.rewards[first:last],
                                          None if self.ref_seq_logps is None else self.ref_seq_logps[first:last],
                                          group, slot, chunk.last_group - chunk.first_group, self.width)
        coefficients = self.scale * _coefficients(difference, is_pair, self.beta, self.pair_groups, group, slot)
        if self.divisor is not None:
            coefficients = coefficients / self.divisor[first:last]
        return torch.where(inside, coefficients[local], 0.0)

    def loss_and_metrics(self):
        """gal_loss of ``seq_logps`` (not scaled) and its metrics, once the sweep has filled them."""
        difference, is_pair = _pair_terms(self.seq_logps, self.rewards, self.ref_seq_logps, self.group, self.slot,
                                          self.num_groups, self.width)
        return _loss_and_metrics(difference, is_pair, self.beta)


def sequence_logprobs(token_logps, mask, average):
    """S_i: the sum (or, with ``average``, the mean) of token log-probs ``[B, T]`` over ``mask``; what lies outside
    the mask (padding, possibly NaN) is not read."""
    total = torch.where(mask.bool(), token_logps.float(), 0.0).sum(-1)
    return total / mask.sum(-1).clamp(min=1) if average else total


def consecutive_group_ids(ids):
    """Ids 0..G'-1 for rows whose group ids ``ids`` come group by group (each group's rows together)."""
    if not ids.numel():
        return ids
    return torch.cat([ids.new_zeros(1), (ids[1:] != ids[:-1]).long()]).cumsum(0)


def gal_terms(group, lengths, num_tokens, **gal):
    """GalTerms for S sequences ordered group by group (``group`` [S] ids 0..G-1 non-decreasing, ``lengths`` [S]
    their kept tokens, which come first among the pass's ``num_tokens``; the rest lie outside GAL), and the host
    lists (tokens per group, sequences per group) that plan the sweep's chunks. One host sync."""
    device = group.device
    sequences = torch.bincount(group) if group.numel() else group.new_zeros(0)
    tokens = torch.zeros_like(sequences).index_add_(0, group, lengths.long())
    tokens_per_group, sequences_per_group = torch.stack([tokens, sequences]).tolist()
    token_sequence = torch.full((num_tokens,), -1, dtype=torch.long, device=device)
    gal_tokens = sum(tokens_per_group)
    token_sequence[:gal_tokens] = torch.repeat_interleave(torch.arange(group.shape[0], device=device), lengths,
                                                          output_size=gal_tokens)
    slot = torch.arange(group.shape[0], device=device) - (sequences.cumsum(0) - sequences)[group]
    terms = GalTerms(token_sequence, group, slot, len(tokens_per_group), max(sequences_per_group, default=0), **gal)
    return terms, tokens_per_group, sequences_per_group


def fused_gal_loss(hidden, weight, targets, rewards, *, group_size=None, group_index=None, mask=None, ref_logps=None,
                   ref_seq_logps=None, beta=1.0, average_log_prob=False, bias=None, temperature=1.0,
                   return_metrics=False, impl=None, chunk_bytes=None):
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
    device = hidden.device
    backend = select_backend(device)
    impl = select_impl(impl, backend, device)

    mask = torch.ones(targets.shape, dtype=torch.bool, device=device) if mask is None else mask.bool()
    if ref_logps is not None:
        ref_seq_logps = sequence_logprobs(ref_logps.detach(), mask, average_log_prob)
    order = torch.arange(ids.shape[0], device=device) if group_size is not None else torch.argsort(ids, stable=True)
    rows = order[_has_pair(rewards, ids, num_groups)[ids[order]]]  # the groups with pairs, each group's rows together
    lengths = mask[rows].sum(-1)
    _, _, kept_hidden, kept_targets = select_tokens(hidden, targets, mask, rows)
    gal, tokens_per_group, sequences_per_group = gal_terms(
        consecutive_group_ids(ids[rows]), lengths, kept_hidden.shape[0], rewards=rewards[rows].float(), beta=beta,
        ref_seq_logps=None if ref_seq_logps is None else ref_seq_logps.detach()[rows].float(),
        divisor=lengths.clamp(min=1).float() if average_log_prob else None)
    op_pass = LogprobPass(kept_targets, 1.0 / temperature, backend, gal=gal)
    chunks = group_chunks(op_pass, kept_hidden, weight, impl, chunk_bytes, tokens_per_group, sequences_per_group)
    loss = sweep_loss(kept_hidden, weight, bias, op_pass, chunks, impl)
    return (loss, gal.loss_and_metrics()[1]) if return_metrics else loss
