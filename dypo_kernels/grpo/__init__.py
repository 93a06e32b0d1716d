"""fused_grpo_loss: the clipped GRPO / DAPO / Dr.GRPO loss from hidden states, in one sweep over the vocabulary."""

import torch

from dypo_kernels.amp import follows_autocast
from dypo_kernels.backend import select_backend
from dypo_kernels.logprob_pass import LogprobPass, TokenTerms
from dypo_kernels.sweep import loss_chunks, select_impl, sweep_loss
from dypo_kernels.tokens import LOSS_TYPES, select_tokens, token_mean, token_weights
from dypo_kernels.validation import (
    Checks,
    check_choice,
    check_number,
    check_per_sequence,
    check_sequence_batch,
    check_temperature,
    check_tensor,
)


def check_grpo_settings(beta, eps_low, eps_high, loss_type, ref_logps, beta_name="beta", use_bias_correction_kl=False):
    check_number(beta_name, beta, low=0)
    if not isinstance(use_bias_correction_kl, bool):
        raise TypeError(f"use_bias_correction_kl must be True or False, got {use_bias_correction_kl!r}")
    check_number("eps_low", eps_low, low=0, high=1, high_open=True)
    check_number("eps_high", eps_high, low=0)
    check_choice("loss_type", loss_type, LOSS_TYPES)
    if beta > 0 and ref_logps is None:
        raise ValueError(f"{beta_name}={beta} > 0 needs ref_logps (the reference model's token log-probs)")


def policy_metrics(op_pass, tokens=None):
    """Detached token means (over ``tokens``, a bool [N], or all) of a sweep's GRPO diagnostics."""
    def mean(values):
        return token_mean(values if tokens is None else values[tokens])

    parts = op_pass.parts
    metrics = {"clip_fraction_low": mean(parts["clipped_low"]), "clip_fraction_high": mean(parts["clipped_high"]),
               "mean_ratio": mean(parts["ratio"]), "mean_entropy": mean(op_pass.entropy)}
    if "kl" in parts:
        metrics["mean_kl"] = mean(parts["kl"])
    return metrics


@follows_autocast("hidden", "weight", "bias")
def fused_grpo_loss(hidden, weight, targets, advantages, *, mask=None, old_logps=None, ref_logps=None, beta=0.0,
                    eps_low=0.2, eps_high=0.2, loss_type="grpo", max_len=None, bias=None, temperature=1.0,
                    use_bias_correction_kl=False, return_metrics=False, impl=None, chunk_bytes=None):
    """Clipped policy-gradient loss of GRPO (DYPO paper eq. 3 / 21; DAPO's clip-higher with ``eps_high``), never
    building the logits.

    Per token: -min(r_t A_i, clip(r_t, 1 - eps_low, 1 + eps_high) A_i) + beta * (exp(ref_t - lp_t) - (ref_t - lp_t) - 1)
    with r_t = exp(lp_t - old_t) and lp_t the log-prob of targets[i, t] under softmax((W h + b) / temperature).
    Aggregation over the tokens where ``mask`` is set, as in TRL, verl and Liger-Kernel: "grpo" the mean over each
    sequence's tokens, then over the B sequences; "bnpo"/"dapo" the mean over all tokens; "dr_grpo" the sum over
    B * max_len (max_len defaults to T).

    Args:
        hidden: ``[B, T, D]`` fp32/bf16/fp16 last hidden states; weight ``[V, D]`` (same dtype); bias ``[V]`` or None.
        targets: ``[B, T]`` token ids (anything where ``mask`` is 0).
        advantages: ``[B]`` per-sequence advantages (e.g. ``group_advantages(...).advantages``), constants.
        mask: ``[B, T]`` bool or 0/1, the response tokens; None means all.
        old_logps: ``[B, T]`` log-probs of the policy that sampled; None means on-policy (ratio 1, detached).
        ref_logps: ``[B, T]`` reference-model log-probs, needed when ``beta`` > 0.
        beta: >= 0, weight of the k3 KL penalty. eps_low in [0, 1), eps_high >= 0: the clip range.
        use_bias_correction_kl: multiply the KL term by r_t (differentiable), which makes its gradient the unbiased
            reverse-KL gradient off-policy (DeepSeek-V3.2; TRL's option of that name, on by default there, and
            Liger-Kernel's): per-token gradient beta r_t (lp_t - ref_t) instead of beta (1 - exp(ref_t - lp_t)).
        temperature: positive; the logits are divided by it.
        return_metrics: also return detached token means ``clip_fraction_low`` (r < 1 - eps_low with A < 0),
            ``clip_fraction_high`` (r > 1 + eps_high with A > 0), ``mean_ratio``, ``mean_entropy`` and, with ref_logps,
            ``mean_kl`` (r_t-weighted with use_bias_correction_kl, as in the loss).
        impl, chunk_bytes: as fused_linear_logprobs ("chunked" or "fused"; the chunk budget).

    Returns:
        the fp32 scalar loss (and the metrics dict), differentiable in hidden, weight and bias.

    Cost for N masked tokens (dropped before the projection): one sweep with the gradients formed in the forward,
    6NDV FLOP (2NDV under torch.no_grad; 8NDV with impl="fused"). Extra memory O(N*D + V*D + chunk_bytes), never
    N x V: the fp32 gradients of hidden and weight are held from the forward to the backward. One host sync (the input
    checks and the token count, read together), none inside the sweep. impl="chunked" is bitwise deterministic;
    "fused" adds tiles with atomics, so its last bits may vary between runs.
    """
    checks = Checks()
    check_sequence_batch(hidden, weight, bias, targets, mask, checks, old_logps=old_logps, ref_logps=ref_logps)
    check_tensor("advantages", advantages)
    check_per_sequence(hidden.shape[0], hidden.device, checks, advantages=advantages)
    check_grpo_settings(beta, eps_low, eps_high, loss_type, ref_logps, use_bias_correction_kl=use_bias_correction_kl)
    check_temperature(temperature)
    if max_len is not None and (isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 1):
        raise ValueError(f"max_len must be a positive integer or None, got {max_len!r}")
    backend = select_backend(hidden.device)
    impl = select_impl(impl, backend, hidden.device)

    mask = torch.ones(targets.shape, dtype=torch.bool, device=hidden.device) if mask is None else mask.bool()
    tokens = checks.count(mask.sum())
    checks.run()
    kept, sequence, kept_hidden, kept_targets = select_tokens(hidden, targets, mask, tokens.value)
    weights = token_weights(loss_type, mask, sequence, max_len)
    terms = TokenTerms(pg_weight=weights, advantages=advantages.detach().float()[sequence], eps_low=eps_low,
                       eps_high=eps_high)
    if old_logps is not None:
        terms.old_logps = old_logps.detach().float().reshape(-1)[kept]
    if ref_logps is not None:  # the KL is reported even when beta = 0
        terms.ref_logps = ref_logps.detach().float().reshape(-1)[kept]
        terms.kl_weight = beta * weights
        terms.kl_importance_weighted = use_bias_correction_kl
    op_pass = LogprobPass(kept_targets, 1.0 / temperature, backend, terms=terms)
    loss = sweep_loss(kept_hidden, weight, bias, op_pass,
                      loss_chunks(op_pass, kept_hidden, weight, impl, chunk_bytes), impl)
    return (loss, policy_metrics(op_pass)) if return_metrics else loss
