"""LogprobPass: the vocabulary pass of every log-prob op (fused_linear_logprobs, GRPO, SFT, GAL, dypo_loss) in the
sweep engine, and TokenTerms, the one copy of the losses' per-token math (docs/design.md, "The sweep engine")."""

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Dict, Optional

import torch

from dypo_kernels import vocab_pass
from dypo_kernels.sweep import Chunk, loss_chunks, sweep

if TYPE_CHECKING:
    from dypo_kernels.gal.terms import GalTerms
    from dypo_kernels.grpo.sequence import SequenceTerms


OBJECTIVES = ("clip", "cispo", "sapo")


@dataclass
class TokenTerms:
    """Per-token constants of a loss, fp32 ``[N]`` over the kept tokens (None: the term is absent).

    L_t = pg_weight_t * rho_t * P_t                                                  (the policy term)
        + kl_weight_t * [r_t] * (exp(ref_t - lp_t) - (ref_t - lp_t) - 1)             (k3 estimate of the KL)
        - nll_weight_t * lp_t                                                        (SFT, paper eq. 5)
        - entropy_weight_t * H_t                                                     (entropy bonus)
    with r_t = exp(lp_t - old_t), or 1 when ``old_logps`` is None (on-policy: the ratio of a detached copy), rho_t
    the constant ``is_ratio`` (vLLM's truncated importance-sampling correction; 1 when None), and P_t by
    ``objective``:
        "clip"   -min(min(r_t, delta) A_t, clip(r_t, 1 - eps_low, 1 + eps_high) A_t)   (GRPO, paper eq. 3 / 21;
                 delta: INTELLECT-2's two-sided clip, None for none)
        "cispo"  -sg[min(r_t, eps_high)] A_t lp_t                                      (CISPO, MiniMax-M1)
        "sapo"   -(4 / tau) sigmoid(tau (r_t - 1)) A_t, tau = sapo_temperatures[0 if A_t > 0 else 1]   (SAPO)
    as TRL 1.16's GRPOTrainer and Liger-Kernel 0.8.5 define them. The KL term carries r_t with
    ``kl_importance_weighted`` (DeepSeek-V3.2's unbiased KL gradient, use_bias_correction_kl): its gradient is then
    kl_weight_t r_t (lp_t - ref_t).
    """

    pg_weight: Optional[torch.Tensor] = None
    advantages: Optional[torch.Tensor] = None
    old_logps: Optional[torch.Tensor] = None
    kl_weight: Optional[torch.Tensor] = None
    ref_logps: Optional[torch.Tensor] = None
    nll_weight: Optional[torch.Tensor] = None
    entropy_weight: Optional[torch.Tensor] = None
    is_ratio: Optional[torch.Tensor] = None
    kl_importance_weighted: bool = False
    objective: str = "clip"
    eps_low: float = 0.2
    eps_high: float = 0.2
    delta: Optional[float] = None
    sapo_temperatures: tuple = (1.0, 1.05)

    def evaluate(self, rows, logps, entropy):
        """(L_t, dL_t/dlp_t, dL_t/dH_t or None, diagnostics) for the tokens ``rows``, whose log-probs and entropies
        are ``logps`` and ``entropy``."""
        value = torch.zeros_like(logps)
        gradient = torch.zeros_like(logps)
        parts = {}
        if self.old_logps is not None and (self.pg_weight is not None or self.kl_importance_weighted):
            ratio = torch.exp(logps - self.old_logps[rows])  # shared by the policy-gradient and the bias-corrected KL
        else:
            ratio = torch.ones_like(logps)
        if self.pg_weight is not None:
            advantages = self.advantages[rows]
            policy_loss, policy_gradient, clipped_low, clipped_high = self._policy(ratio, advantages, logps)
            weight = self.pg_weight[rows] if self.is_ratio is None else self.pg_weight[rows] * self.is_ratio[rows]
            used = weight != 0  # tokens outside the term add an exact 0, even where their ratio overflows
            value += torch.where(used, weight * policy_loss, 0.0)
            gradient += torch.where(used, weight * policy_gradient, 0.0)
            parts.update(policy_loss=policy_loss if self.is_ratio is None else policy_loss * self.is_ratio[rows],
                         ratio=ratio, clipped_low=clipped_low.float(), clipped_high=clipped_high.float())
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
        gradient_entropy = None
        if self.entropy_weight is not None:
            value -= self.entropy_weight[rows] * entropy
            gradient_entropy = -self.entropy_weight[rows]
        return value, gradient, gradient_entropy, parts

    def _policy(self, ratio, advantages, logps):
        """(P_t, dP_t/dlp_t, clipped below, clipped above) of the policy objective; the clip flags mark where the
        clip stops the gradient on the side the advantage pushes the ratio (none for SAPO)."""
        none = torch.zeros_like(ratio, dtype=torch.bool)
        if self.objective == "cispo":
            weight = ratio.clamp(max=self.eps_high)
            return -weight * advantages * logps, -weight * advantages, none, (ratio > self.eps_high) & (advantages > 0)
        if self.objective == "sapo":
            tau = torch.where(advantages > 0, self.sapo_temperatures[0], self.sapo_temperatures[1])
            gate = torch.sigmoid(tau * (ratio - 1))
            return -4 / tau * gate * advantages, -4 * gate * (1 - gate) * ratio * advantages, none, none
        policy_loss, slope = clipped_objective(ratio, advantages, self.eps_low, self.eps_high, self.delta)
        low, high = 1 - self.eps_low, 1 + self.eps_high
        return (policy_loss, -(slope * ratio) * advantages, (ratio < low) & (advantages < 0),
                (ratio > high) & (advantages > 0))  # dr/dlp = r


def clipped_objective(ratio, advantages, eps_low, eps_high, delta):
    """(P, slope) of the clipped objective P = -min(min(r, delta) A, clip(r, 1 - eps_low, 1 + eps_high) A) of a
    token's or a sequence's ratio r: dP/dr = -slope A, slope in {0, 1/2, 1} (the branch that is the minimum, where
    it is not flat; torch.minimum splits a tie between both branches)."""
    low, high = 1 - eps_low, 1 + eps_high
    capped = ratio if delta is None else ratio.clamp(max=delta)
    unclipped, clipped = capped * advantages, ratio.clamp(low, high) * advantages
    unclipped_slope = (ratio <= (math.inf if delta is None else delta)).float()
    clipped_slope = ((ratio >= low) & (ratio <= high)).float()
    slope = torch.where(unclipped < clipped, unclipped_slope,
                        torch.where(clipped < unclipped, clipped_slope, (unclipped_slope + clipped_slope) / 2))
    return -torch.minimum(unclipped, clipped), slope


def logprob_bytes_per_logit(backend):
    """What a LogprobPass holds per logit of its chunk beside the gradient workspace: the fp32 logits, and the torch
    pass's two temporaries."""
    return 4 + (8 if backend == "torch" else 0)


@dataclass
class LogprobPass:
    """The vocabulary pass of every log-prob op, for kept tokens with ``targets`` [N] (int64).

    Per chunk: the row statistics (lse, target logit, entropy) from the backend's vocabulary pass, lp = target
    logit - lse, then the coefficients g_t = dL/dlp_t of the loss (``terms``, plus GAL's per-sequence c_i from the
    chunk's own sequence log-probs, ``gal``, and a sequence-level policy term's, ``sequence``), or the upstream
    gradients ``grad_logp`` / ``grad_entropy`` of fused_linear_logprobs' backward (whose statistics ``lse`` /
    ``entropy`` are then known and not recomputed); then the logit gradient (g_t (onehot - p) - g_H,t p (z -
    E_p[z])) / T into the workspace. Its outputs, fp32
    ``[N]``: lse, logps, entropy, and the loss value L_t with its diagnostics ``parts``.
    """

    targets: torch.Tensor
    inv_temperature: float
    backend: str
    terms: Optional[TokenTerms] = None
    gal: Optional["GalTerms"] = None
    sequence: Optional["SequenceTerms"] = None
    grad_logp: Optional[torch.Tensor] = None
    grad_entropy: Optional[torch.Tensor] = None
    lse: Optional[torch.Tensor] = None
    logps: Optional[torch.Tensor] = None
    entropy: Optional[torch.Tensor] = None
    value: Optional[torch.Tensor] = None
    parts: Dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self):
        def buffer(given):
            return torch.zeros(self.targets.shape, dtype=torch.float32, device=self.targets.device) \
                if given is None else given
        self.lse, self.logps, self.entropy, self.value = map(buffer, (self.lse, self.logps, self.entropy, self.value))

    @property
    def bytes_per_logit(self):
        return logprob_bytes_per_logit(self.backend)

    def whole_chunk(self):
        count = self.targets.shape[0]
        if self.sequence is not None:
            sequences = self.sequence.advantages.shape[0]
            return Chunk(0, count, 0, sequences, 0, sequences)
        return Chunk(0, count, 0, 0 if self.gal is None else self.gal.group.shape[0], 0,
                     0 if self.gal is None else self.gal.num_groups)

    def coefficients(self, chunk, lse, target_logit, entropy):
        """Stores the chunk's statistics and returns (dL/dlp, dL/dH) for its rows (dL/dH None: no entropy term)."""
        rows = chunk.rows
        if self.grad_logp is not None:
            return self.grad_logp[rows], None if self.grad_entropy is None else self.grad_entropy[rows]
        logps = target_logit - lse
        self.lse[rows], self.logps[rows], self.entropy[rows] = lse, logps, entropy
        if self.terms is None and self.gal is None and self.sequence is None:
            return None, None
        gradient, gradient_entropy = torch.zeros_like(logps), None
        if self.terms is not None:
            value, gradient, gradient_entropy, parts = self.terms.evaluate(rows, logps, entropy)
            self.value[rows] = value
            for name, part in parts.items():
                self.parts.setdefault(name, torch.zeros_like(self.value))[rows] = part
        if self.gal is not None:
            gradient = gradient + self.gal.gradient(chunk, logps)
        if self.sequence is not None:
            gradient = gradient + self.sequence.gradient(chunk, logps)
        return gradient, gradient_entropy

    def chunk(self, chunk, logits, workspace):
        targets = self.targets[chunk.rows]
        still = vocab_pass.divide_by_temperature(logits, self.inv_temperature, self.backend)
        if self.grad_logp is not None:
            lse, entropy = self.lse[chunk.rows], self.entropy[chunk.rows]
            coef_logp, coef_entropy = self.coefficients(chunk, lse, None, entropy)
        else:
            lse, target_logit, entropy = vocab_pass.row_stats(logits, targets, still, self.backend)
            coef_logp, coef_entropy = self.coefficients(chunk, lse, target_logit, entropy)
        if workspace is None:
            return None
        scale = self.inv_temperature  # dz/dlogits: the gradient with respect to the products
        return vocab_pass.logit_gradient(logits, targets, lse.contiguous(), entropy.contiguous(),
                                         (coef_logp * scale).float().contiguous(),
                                         None if coef_entropy is None else (coef_entropy * scale).float().contiguous(),
                                         workspace, still, self.backend)

    def total(self):
        """The scalar loss: sum_t L_t, plus GAL's and the sequence-level term's values."""
        loss = self.value.sum()
        if self.gal is not None:
            loss = loss + self.gal.scale * self.gal.loss_and_metrics()[0]
        if self.sequence is not None:
            loss = loss + self.sequence.scale * self.sequence.loss_and_metrics()[0]
        return loss


def score(hidden, weight, bias, targets, inv_temperature, backend, impl, chunk_bytes):
    """A sweep for the row statistics only (2NDV, no gradient work): the LogprobPass holding lse, logps, entropy."""
    op_pass = LogprobPass(targets, inv_temperature, backend)
    if hidden.shape[0]:
        sweep(hidden, weight, bias, op_pass, loss_chunks(op_pass, hidden, weight, impl, chunk_bytes),
              needs_input_grad=(False, False, False), impl=impl)
    return op_pass
