"""Sequence-level importance weights inside the sweep (fused_grpo_loss with importance_sampling_level="sequence",
GSPO, and loss_type="vespo"): SequenceTerms, the part of LogprobPass that turns a chunk's log-probs into the
per-token coefficients of a policy term whose ratio is one per sequence.

Both ratios need the whole sequence's log-ratio before any of its tokens' gradients, as GAL's coefficients need the
whole group's log-probs, so they take GAL's chunking policy with each sequence a group of its own
(gal/terms.py): a chunk holds whole sequences (growing to hold one of up to 4 chunks' rows) and forms their
coefficients from its own log-probs; a longer sequence is swept ahead once without gradients.

GSPO (Zheng et al. 2025; TRL's and Liger-Kernel's importance_sampling_level="sequence"): s_i = exp(mean_t (lp_t -
old_t)) over the sequence's tokens, the clipped objective P_i = -min(min(s_i, delta) A_i, clip(s_i) A_i) on every
token of i, and with use_bias_correction_kl the KL term times s_i. With W_i = sum_t w_t rho_t (the tokens'
aggregation weights times vllm_is_ratio) and K_i = sum_t w^kl_t kl_t:
    L_i = W_i P_i + [s_i] K_i,    dL/dlp_t = (W_i dP_i/ds_i + [K_i]) s_i / n_i + w^kl_t [s_i] dkl_t/dlp_t.
VESPO (TRL's get_gamma_weights): log w_i = clamp(sum_t clamp(lp_t - old_t, -20, 20) + sum_t clamp(log rho_t,
log 1e-8, 20), log 1e-8, 20), phi_i = exp(lambda + k log w_i - lambda w_i) detached (k, lambda by the sign of A_i),
and L_t = -phi_i A_i lp_t: dL/dlp_t = -w_t phi_i A_i.
"""

import math
from dataclasses import dataclass
from typing import Optional

import torch

from dypo_kernels.gal.terms import GROUP_GROWTH, gal_layout, plan_gal
from dypo_kernels.logprob_pass import clipped_objective

LOG_MIN_WEIGHT = math.log(1e-8)


@dataclass
class SequenceTerms:
    """The sequence-level policy term (and, for GSPO, the KL term) of a sweep over S sequences whose tokens come
    first, sequence by sequence (``token_sequence`` [N]: 0..S-1, -1 for the pass's other tokens), scaled by
    ``scale`` in the loss. Per token: ``old_logps`` (None: on-policy), ``weights`` (w_t, times rho_t for GSPO),
    ``kl_weights`` and ``ref_logps`` (GSPO's KL; None without). Per sequence: ``advantages``, ``lengths``
    (n_i >= 1), ``log_is_ratio`` (VESPO's clamped sum of log rho; None without)."""

    objective: str  # "gspo" or "vespo"
    token_sequence: torch.Tensor
    old_logps: Optional[torch.Tensor]
    weights: torch.Tensor
    advantages: torch.Tensor
    lengths: torch.Tensor
    kl_weights: Optional[torch.Tensor] = None
    ref_logps: Optional[torch.Tensor] = None
    kl_importance_weighted: bool = False
    log_is_ratio: Optional[torch.Tensor] = None
    eps_low: float = 0.2
    eps_high: float = 0.2
    delta: Optional[float] = None
    vespo_shapes: tuple = (2.0, 3.0, 3.0, 2.0)  # k_pos, lambda_pos, k_neg, lambda_neg
    scale: float = 1.0
    log_ratio: Optional[torch.Tensor] = None
    weighted_logps: Optional[torch.Tensor] = None
    kl_sums: Optional[torch.Tensor] = None
    token_coefficient: Optional[torch.Tensor] = None

    def __post_init__(self):
        count, device = self.advantages.shape[0], self.advantages.device
        self.log_ratio, self.weighted_logps, self.kl_sums = (
            torch.zeros(count, dtype=torch.float32, device=device) for _ in range(3))
        inside = self.token_sequence >= 0
        self.sequence_weights = torch.zeros(count, dtype=torch.float32, device=device).index_add_(
            0, torch.where(inside, self.token_sequence, 0), torch.where(inside, self.weights, 0.0))

    def _token_log_ratio(self, rows, logps):
        if self.old_logps is None:  # on-policy: the ratio of a detached copy, 1 (its gradient is not 0)
            return torch.zeros_like(logps)
        log_ratio = logps - self.old_logps[rows]
        return log_ratio.clamp(-20.0, 20.0) if self.objective == "vespo" else log_ratio

    def _kl(self, rows, logps):
        log_ref_ratio = self.ref_logps[rows] - logps
        return torch.exp(log_ref_ratio) - log_ref_ratio - 1, 1 - torch.exp(log_ref_ratio)

    def _accumulate(self, rows, sequence, logps, into):
        log_ratio, weighted_logps, kl_sums = into
        inside = sequence >= 0
        index = torch.where(inside, sequence, 0)
        log_ratio.index_add_(0, index, torch.where(inside, self._token_log_ratio(rows, logps), 0.0))
        weighted_logps.index_add_(0, index, torch.where(inside, self.weights[rows] * logps, 0.0))
        if self.kl_weights is not None:
            kl_sums.index_add_(0, index, torch.where(inside, self.kl_weights[rows] * self._kl(rows, logps)[0], 0.0))

    def _ratio(self, log_ratio, sequences):
        """GSPO's s_i, or VESPO's phi_i, of ``sequences`` from their log-ratio sums."""
        if self.objective == "gspo":
            return torch.exp(log_ratio / self.lengths[sequences])
        log_is = 0.0 if self.log_is_ratio is None else self.log_is_ratio[sequences]
        log_weight = (log_ratio + log_is).clamp(LOG_MIN_WEIGHT, 20.0)
        k_pos, lambda_pos, k_neg, lambda_neg = self.vespo_shapes
        positive = self.advantages[sequences] >= 0
        k = torch.where(positive, k_pos, k_neg)
        rate = torch.where(positive, lambda_pos, lambda_neg).clamp(min=1e-4)
        return torch.exp(rate + k * log_weight - rate * torch.exp(log_weight)).nan_to_num(0.0, 0.0, 0.0)

    def _sequence_coefficients(self, sequences, log_ratio, kl_sums):
        """(per-sequence coefficient of dL/dlp_t shared by its tokens, the KL factor [s_i] of its tokens)."""
        ratio = self._ratio(log_ratio, sequences)
        advantages = self.advantages[sequences]
        if self.objective == "vespo":
            return -ratio * advantages, torch.ones_like(ratio)
        _, slope = clipped_objective(ratio, advantages, self.eps_low, self.eps_high, self.delta)
        shared = self.sequence_weights[sequences] * (-slope * advantages)
        kl_factor = torch.ones_like(ratio)
        if self.kl_weights is not None and self.kl_importance_weighted:
            shared = shared + kl_sums
            kl_factor = ratio
        return shared * ratio / self.lengths[sequences], kl_factor

    def _token_gradient(self, rows, sequence, logps, shared, kl_factor):
        gradient = shared[sequence] * (self.weights[rows] if self.objective == "vespo" else 1.0)
        if self.kl_weights is not None:
            gradient = gradient + self.kl_weights[rows] * kl_factor[sequence] * self._kl(rows, logps)[1]
        return gradient

    def gradient(self, chunk, logps):
        """dL/dlp of the chunk's tokens; accumulates their sums (the values come from them in ``loss_and_metrics``)."""
        rows = chunk.rows
        sequence = self.token_sequence[rows]
        self._accumulate(rows, sequence, logps, (self.log_ratio, self.weighted_logps, self.kl_sums))
        gradient = torch.zeros_like(logps) if self.token_coefficient is None else \
            self.token_coefficient[rows].clone()
        first, last = chunk.first_sequence, chunk.last_sequence
        if first < last:  # the sequences the chunk holds whole
            held = (sequence >= first) & (sequence < last)
            sequences = torch.arange(first, last, device=logps.device)
            shared, kl_factor = self._sequence_coefficients(sequences, self.log_ratio[first:last],
                                                            self.kl_sums[first:last])
            local = torch.where(held, sequence - first, 0)
            gradient += self.scale * torch.where(held, self._token_gradient(rows, local, logps, shared, kl_factor),
                                                 0.0)
        return gradient

    def sweep_ahead(self, first_sequence, first_token, token_logps):
        """The coefficients of the sequences from ``first_sequence`` on (too long for a chunk), from their tokens'
        log-probs ``token_logps`` (the pass's rows from ``first_token`` on)."""
        rows = slice(first_token, first_token + token_logps.shape[0])
        sequence = self.token_sequence[rows] - first_sequence
        count = self.advantages.shape[0] - first_sequence
        sums = tuple(torch.zeros(count, dtype=torch.float32, device=token_logps.device) for _ in range(3))
        self._accumulate(rows, sequence, token_logps, sums)
        shared, kl_factor = self._sequence_coefficients(torch.arange(first_sequence, self.advantages.shape[0],
                                                                     device=token_logps.device), sums[0], sums[2])
        self.token_coefficient = torch.zeros(self.token_sequence.shape, dtype=torch.float32, device=sums[0].device)
        self.token_coefficient[rows] = self.scale * self._token_gradient(rows, sequence, token_logps, shared,
                                                                         kl_factor)

    def loss_and_metrics(self):
        """The term's value over all sequences (after the sweep; not scaled) and its per-sequence ratio (s_i or
        phi_i)."""
        sequences = torch.arange(self.advantages.shape[0], device=self.advantages.device)
        ratio = self._ratio(self.log_ratio, sequences)
        if self.objective == "vespo":
            return -(ratio * self.advantages * self.weighted_logps).sum(), ratio
        policy_loss, _ = clipped_objective(ratio, self.advantages, self.eps_low, self.eps_high, self.delta)
        value = (self.sequence_weights * policy_loss).sum()
        if self.kl_weights is not None:
            value = value + ((ratio if self.kl_importance_weighted else 1.0) * self.kl_sums).sum()
        return value, ratio


def sequence_plan(mask, weight, device, backend, impl, chunk_bytes):
    """(plan, chunks layout) of a sweep with whole sequences per chunk: GAL's plan with a group per sequence."""
    layout = gal_layout(weight, device, backend, impl, chunk_bytes)
    rows = torch.arange(mask.shape[0], device=device)
    return plan_gal(rows, rows, mask.sum(-1), GROUP_GROWTH * layout[0]), layout
