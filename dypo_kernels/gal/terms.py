"""GAL inside the sweep (fused_gal_loss, dypo_loss): the one chunking policy for its groups, and GalTerms, the part of
LogprobPass that turns a chunk's log-probs into GAL's per-token coefficients.

The GAL gradient is sum_i c_i grad S_i, and c_i depends on the current S of every sequence of i's group
(docs/design.md, "GAL in the sweep"). The policy:
- a group's tokens go into one chunk, which grows to hold the group, up to GROUP_GROWTH times a chunk's rows;
  that chunk computes its groups' c_i from its own log-probs before forming its gradient: 6NDV, one sweep;
- a group larger than that (long rollouts at a large vocabulary) is swept ahead once without gradients (2 r D V for
  its r tokens) for its S, so its coefficients are known when the sweep reaches it: 8 r D V for those rows, and the
  memory stays bounded whatever the group size.
"""

from dataclasses import dataclass
from typing import List, Optional

import torch

from dypo_kernels.gal.pairs import coefficients, has_pair, loss_and_metrics, pair_terms
from dypo_kernels.logprob_pass import logprob_bytes_per_logit, score
from dypo_kernels.sweep import Chunk, chunk_layout, whole_group_chunks, with_waves

GROUP_GROWTH = 4


def consecutive_group_ids(ids):
    """Ids 0..G'-1 for rows whose group ids ``ids`` come group by group (each group's rows together)."""
    if not ids.numel():
        return ids
    return torch.cat([ids.new_zeros(1), (ids[1:] != ids[:-1]).long()]).cumsum(0)


@dataclass
class GalPlan:
    """GAL's sequences in sweep order: ``rows`` (batch rows), ``group`` (ids 0..G-1, non-decreasing) and ``lengths``
    (kept tokens), the groups that fit a chunk first (``tokens_per_group`` / ``sequences_per_group``, host lists),
    then those swept ahead, from sequence ``ahead_sequence`` and group ``ahead_group`` on. ``gal_tokens``: all their
    tokens; ``width``: the largest group's sequences."""

    rows: torch.Tensor
    group: torch.Tensor
    lengths: torch.Tensor
    tokens_per_group: List[int]
    sequences_per_group: List[int]
    ahead_sequence: int
    ahead_group: int
    num_groups: int
    gal_tokens: int
    width: int

    @property
    def chunked_tokens(self):
        return sum(self.tokens_per_group)

    def token_sequence(self, num_tokens):
        """[num_tokens]: the plan's sequence 0..S-1 of each of its tokens, which come first, then -1 for the pass's
        other tokens."""
        device = self.rows.device
        token_sequence = torch.full((num_tokens,), -1, dtype=torch.long, device=device)
        token_sequence[:self.gal_tokens] = torch.repeat_interleave(torch.arange(self.rows.shape[0], device=device),
                                                                   self.lengths, output_size=self.gal_tokens)
        return token_sequence


def plan_gal(rows, group, lengths, group_limit, keep=None):
    """The plan of sequences ``rows`` ordered group by group (``group`` their ids, non-decreasing, < S; ``lengths``
    their kept tokens): only the groups flagged in ``keep`` (None: all), those of more than ``group_limit`` tokens
    moved to the end to be swept ahead, renumbered 0..G-1. One host sync."""
    count = group.shape[0]  # groups <= sequences: buffers sized by S, no host sync before the one below
    sizes = torch.zeros(3, count, dtype=torch.long, device=group.device)
    sizes[0].index_add_(0, group, lengths.long())
    sizes[1].index_add_(0, group, torch.ones_like(group))
    if keep is None:
        sizes[2] = 1
    else:
        sizes[2, :keep.shape[0]] = keep.long()
    tokens, sequences, kept = sizes.tolist()
    starts = [0]
    for size in sequences:
        starts.append(starts[-1] + size)
    used = [g for g in range(count) if sequences[g] and kept[g]]
    fits = [g for g in used if tokens[g] <= group_limit]
    ahead = [g for g in used if tokens[g] > group_limit]
    order = fits + ahead
    totals = dict(num_groups=len(order), gal_tokens=sum(tokens[g] for g in order),
                  width=max((sequences[g] for g in order), default=0))
    common = dict(tokens_per_group=[tokens[g] for g in fits], sequences_per_group=[sequences[g] for g in fits],
                  ahead_sequence=sum(sequences[g] for g in fits), ahead_group=len(fits), **totals)
    if order == [g for g in range(count) if sequences[g]]:  # every group, in order: nothing to move
        return GalPlan(rows, consecutive_group_ids(group), lengths, **common)
    permutation = torch.tensor([i for g in order for i in range(starts[g], starts[g + 1])], dtype=torch.long,
                               device=rows.device)
    new_group = torch.tensor([rank for rank, g in enumerate(order) for _ in range(sequences[g])], dtype=torch.long,
                             device=rows.device)
    return GalPlan(rows[permutation], new_group, lengths[permutation], **common)


@dataclass
class GalTerms:
    """GAL's part of a sweep (LogprobPass.gal), for a GalPlan's S sequences whose tokens come first among the pass's
    N (``token_sequence`` [N]: each token's sequence 0..S-1, -1 outside GAL; ``slot`` [S]: the position in its group;
    ``width``: the largest group). ``gradient`` accumulates every chunk's log-probs into the sequence sums and gives
    the chunk's tokens scale * c_i / divisor_i: from the chunk's own sums for the groups it holds whole, from
    ``token_coefficient`` for groups swept ahead. ``pair_groups``: the groups with a pair (0-dim: no host sync)."""

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
    seq_sums: Optional[torch.Tensor] = None
    pair_groups: Optional[torch.Tensor] = None
    token_coefficient: Optional[torch.Tensor] = None

    @classmethod
    def of_plan(cls, plan, num_tokens, **gal):
        device = plan.group.device
        count = plan.group.shape[0]
        sequences = torch.zeros(plan.num_groups, dtype=torch.long, device=device).index_add_(
            0, plan.group, torch.ones_like(plan.group))
        slot = torch.arange(count, device=device) - (sequences.cumsum(0) - sequences)[plan.group]
        return cls(plan.token_sequence(num_tokens), plan.group, slot, plan.num_groups, plan.width, **gal)

    def __post_init__(self):
        self.seq_sums = torch.zeros(self.group.shape, dtype=torch.float32, device=self.group.device)
        self.pair_groups = has_pair(self.rewards, self.group, self.num_groups).sum()

    @property
    def seq_logps(self):
        return self.seq_sums if self.divisor is None else self.seq_sums / self.divisor

    def _coefficients(self, first, last, first_group, last_group, sums):
        """scale * c_i / divisor_i of sequences [first, last), whole groups [first_group, last_group)."""
        divisor = None if self.divisor is None else self.divisor[first:last]
        seq_logps = sums if divisor is None else sums / divisor
        group, slot = self.group[first:last] - first_group, self.slot[first:last]
        difference, is_pair = pair_terms(seq_logps, self.rewards[first:last],
                                         None if self.ref_seq_logps is None else self.ref_seq_logps[first:last],
                                         group, slot, last_group - first_group, self.width)
        result = self.scale * coefficients(difference, is_pair, self.beta, self.pair_groups, group, slot)
        return result if divisor is None else result / divisor

    def gradient(self, chunk, logps):
        sequence = self.token_sequence[chunk.rows]
        inside = sequence >= 0
        self.seq_sums.index_add_(0, torch.where(inside, sequence, 0), torch.where(inside, logps, 0.0))
        gradient = torch.zeros_like(logps) if self.token_coefficient is None else \
            self.token_coefficient[chunk.rows].clone()
        first, last = chunk.first_sequence, chunk.last_sequence
        if first < last:
            held = (sequence >= first) & (sequence < last)
            chunk_coefficients = self._coefficients(first, last, chunk.first_group, chunk.last_group,
                                                    self.seq_sums[first:last])
            gradient += torch.where(held, chunk_coefficients[torch.where(held, sequence - first, 0)], 0.0)
        return gradient

    def sweep_ahead(self, plan, token_logps):
        """The coefficients of the groups swept ahead, from their tokens' log-probs ``token_logps`` (the pass's rows
        from plan.chunked_tokens on)."""
        first, first_token = plan.ahead_sequence, plan.chunked_tokens
        sequence = self.token_sequence[first_token:first_token + token_logps.shape[0]]
        sums = torch.zeros(self.group.shape[0] - first, dtype=torch.float32, device=token_logps.device).index_add_(
            0, sequence - first, token_logps)
        ahead = self._coefficients(first, self.group.shape[0], plan.ahead_group, self.num_groups, sums)
        self.token_coefficient = torch.zeros(self.token_sequence.shape, dtype=torch.float32, device=sums.device)
        self.token_coefficient[first_token:first_token + token_logps.shape[0]] = ahead[sequence - first]

    def loss_and_metrics(self):
        """gal_loss of the swept sequence log-probs (not scaled) and its metrics."""
        difference, is_pair = pair_terms(self.seq_logps, self.rewards, self.ref_seq_logps, self.group, self.slot,
                                         self.num_groups, self.width)
        return loss_and_metrics(difference, is_pair, self.beta)



def gal_layout(weight, device, backend, impl, chunk_bytes):
    """(tokens per chunk, rows per wave) of a log-prob sweep (chunk_layout; no limit for the fused impl)."""
    return chunk_layout(logprob_bytes_per_logit(backend), weight, device, backend, impl, chunk_bytes)


def gal_chunks(plan, layout, num_tokens):
    """The sweep's chunks: whole groups (each chunk growing to its largest group), then the other tokens."""
    capacity, wave = layout
    chunks = whole_group_chunks(plan.tokens_per_group, plan.sequences_per_group, capacity,
                                num_tokens - plan.chunked_tokens)
    return with_waves(chunks, wave) or [Chunk(0, 0)]


def ahead_logps(op_pass, plan, hidden, weight, bias, impl, chunk_bytes):
    """The log-probs of the plan's groups too large for a chunk, from a sweep without gradients (2 r D V), when
    gradients are needed (None otherwise, or when every group fits a chunk)."""
    if plan.ahead_sequence == plan.rows.shape[0] or not torch.is_grad_enabled():
        return None
    rows = slice(plan.chunked_tokens, plan.gal_tokens)
    return score(hidden[rows].detach(), weight.detach(), None if bias is None else bias.detach(),
                 op_pass.targets[rows], op_pass.inv_temperature, op_pass.backend, impl, chunk_bytes).logps


def sweep_ahead(op_pass, plan, hidden, weight, bias, impl, chunk_bytes):
    """For the groups too large for a chunk: their GAL coefficients, and those of a sequence-level policy term
    (GSPO, VESPO: a plan with a group per sequence, or GAL's), before the main sweep, from one sweep without
    gradients (ahead_logps)."""
    logps = ahead_logps(op_pass, plan, hidden, weight, bias, impl, chunk_bytes)
    if logps is None:
        return
    if op_pass.gal is not None:
        op_pass.gal.sweep_ahead(plan, logps)
    if op_pass.sequence is not None:
        op_pass.sequence.sweep_ahead(plan.ahead_sequence, plan.chunked_tokens, logps)
