"""fused_grpo_loss: the clipped GRPO / DAPO / Dr.GRPO loss and its variants (CISPO, SAPO, LUSPO, two-sided clip,
importance-sampling correction, entropy bonus) from hidden states, in one sweep over the vocabulary."""

import torch

from dypo_kernels.amp import follows_autocast
from dypo_kernels.backend import select_backend
from dypo_kernels.custom_ops import traceable_loss
from dypo_kernels.gal.terms import gal_chunks, sweep_ahead
from dypo_kernels.grpo.sequence import LOG_MIN_WEIGHT, SequenceTerms, sequence_plan
from dypo_kernels.logprob_pass import LogprobPass, TokenTerms
from dypo_kernels.packing import sequence_inputs
from dypo_kernels.sweep import loss_chunks, select_impl, sweep_loss
from dypo_kernels.tokens import LOSS_TYPES, select_tokens, token_mean, token_weights
from dypo_kernels.validation import (
    Checks,
    check_choice,
    check_number,
    check_per_sequence,
    check_temperature,
    check_tensor,
)

POLICY_METRICS = ("clip_fraction_low", "clip_fraction_high", "mean_ratio", "mean_entropy")

# the policy objective of each loss_type (TokenTerms.objective): the clipped surrogate unless named here
OBJECTIVES = {"cispo": "cispo", "sapo": "sapo"}


def check_grpo_settings(beta, eps_low, eps_high, loss_type, ref_logps, beta_name="beta", use_bias_correction_kl=False,
                        delta=None, sapo_temperatures=(1.0, 1.05), entropy_coef=0.0):
    check_number(beta_name, beta, low=0)
    if not isinstance(use_bias_correction_kl, bool):
        raise TypeError(f"use_bias_correction_kl must be True or False, got {use_bias_correction_kl!r}")
    check_number("eps_low", eps_low, low=0, high=1, high_open=True)
    check_number("eps_high", eps_high, low=0)
    check_choice("loss_type", loss_type, LOSS_TYPES)
    if beta > 0 and ref_logps is None:
        raise ValueError(f"{beta_name}={beta} > 0 needs ref_logps (the reference model's token log-probs)")
    if delta is not None:
        check_number("delta", delta, low=0)
        if delta <= 0 or loss_type in (*OBJECTIVES, "vespo"):
            raise ValueError(f"delta must be a positive upper bound of the ratio in the clipped objective (loss_type "
                             f"grpo, bnpo, dapo, dr_grpo, luspo); got delta={delta!r} with loss_type={loss_type!r}")
    for name, value in zip(("sapo_temperature_pos", "sapo_temperature_neg"), sapo_temperatures):
        check_number(name, value, low=0)
        if value <= 0:
            raise ValueError(f"{name} must be positive, got {value!r}")
    check_number("entropy_coef", entropy_coef)


def policy_terms(loss_type, eps_low, eps_high, delta, sapo_temperatures):
    """The TokenTerms settings of the policy objective of ``loss_type``."""
    return dict(objective=OBJECTIVES.get(loss_type, "clip"), eps_low=eps_low, eps_high=eps_high, delta=delta,
                sapo_temperatures=tuple(float(t) for t in sapo_temperatures))


def check_is_ratio(is_ratio, mask, checks, name="vllm_is_ratio"):
    """``is_ratio`` [B, T] or [B, 1] as fp32 [B, T] (None stays None): non-negative and finite where ``mask`` is
    set, checked in ``checks``."""
    if is_ratio is None:
        return None
    check_tensor(name, is_ratio, dims=(2,))
    if not is_ratio.is_floating_point():
        raise TypeError(f"{name} must be a float tensor, got {is_ratio.dtype}")
    if is_ratio.shape[0] != mask.shape[0] or is_ratio.shape[1] not in (1, mask.shape[1]):
        raise ValueError(f"{name} {tuple(is_ratio.shape)} must be [B, T] or [B, 1] for a mask {tuple(mask.shape)}")
    if is_ratio.device != mask.device:
        raise ValueError(f"{name} is on {is_ratio.device}, the batch on {mask.device}")
    ratio = is_ratio.detach().float().expand(mask.shape)
    if ratio.numel():
        checks.require((((ratio >= 0) & torch.isfinite(ratio)) | ~mask).all(),
                       f"{name} must be finite and >= 0 where mask is set")
    return ratio


def check_num_items(num_items, loss_type, device, checks):
    if num_items is None:
        return
    if loss_type not in ("dapo", "cispo", "vespo"):
        raise ValueError(f"num_items_in_batch is the normaliser of loss_type 'dapo', 'cispo' or 'vespo'; loss_type "
                         f"{loss_type!r} does not use it")
    if isinstance(num_items, torch.Tensor):
        if num_items.dim() != 0 or num_items.device != device:
            raise ValueError(f"num_items_in_batch must be a number or a 0-dim tensor on {device}, got shape "
                             f"{tuple(num_items.shape)} on {num_items.device}")
        checks.require(num_items > 0, "num_items_in_batch must be positive")
    else:
        check_number("num_items_in_batch", num_items, low=0)
        if num_items <= 0:
            raise ValueError(f"num_items_in_batch must be positive, got {num_items!r}")


def check_importance_sampling_level(level, loss_type):
    """Whether the policy term's ratio is one per sequence (GSPO's "sequence", and VESPO's gamma weight)."""
    check_choice("importance_sampling_level", level, ("token", "sequence"))
    if level == "sequence" and loss_type in ("cispo", "sapo", "vespo"):
        raise ValueError(f"importance_sampling_level='sequence' is not defined for loss_type={loss_type!r} (TRL's "
                         "and Liger-Kernel's rule); use 'token'")
    return level == "sequence" or loss_type == "vespo"


def vespo_log_is_ratio(is_ratio, mask, rows):
    """VESPO's per-sequence sum of clamp(log rho_t, log 1e-8, 20) over the masked tokens, for the sequences
    ``rows`` (None without a ratio)."""
    if is_ratio is None:
        return None
    log_ratio = torch.log(is_ratio).clamp(LOG_MIN_WEIGHT, 20.0)
    return torch.where(mask, log_ratio, 0.0).sum(-1)[rows]


def sequence_metrics(op_pass, old_logps, ref_logps, kl_importance_weighted):
    """policy_metrics for a sequence-level policy term, over its tokens: the clip fractions and mean ratio of GSPO's
    s_i on every token (VESPO clips nothing; its mean_ratio is the tokens' r_t), the entropy and the KL as the loss
    has it."""
    terms = op_pass.sequence
    _, ratio = terms.loss_and_metrics()
    inside = terms.token_sequence >= 0
    token_sequence = terms.token_sequence[inside]
    logps = op_pass.logps[inside]
    old_logps = None if old_logps is None else old_logps[inside]
    ref_logps = None if ref_logps is None else ref_logps[inside]
    token_ratio = torch.ones_like(logps) if old_logps is None else torch.exp(logps - old_logps)
    if terms.objective == "gspo":
        token_ratio = ratio[token_sequence]
        advantages = terms.advantages[token_sequence]
        clipped_low = (token_ratio < 1 - terms.eps_low) & (advantages < 0)
        clipped_high = (token_ratio > 1 + terms.eps_high) & (advantages > 0)
    else:
        clipped_low = clipped_high = torch.zeros_like(logps, dtype=torch.bool)
    metrics = {"clip_fraction_low": token_mean(clipped_low.float()),
               "clip_fraction_high": token_mean(clipped_high.float()), "mean_ratio": token_mean(token_ratio),
               "mean_entropy": token_mean(op_pass.entropy[inside])}
    if ref_logps is not None:
        log_ref_ratio = ref_logps - logps
        kl = torch.exp(log_ref_ratio) - log_ref_ratio - 1
        metrics["mean_kl"] = token_mean(token_ratio * kl if kl_importance_weighted else kl)
    return metrics


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


def policy_metric_names(*args, ref_logps=None, **kwargs):
    """The keys of policy_metrics (and sequence_metrics) for these arguments."""
    return [*POLICY_METRICS, *(["mean_kl"] if ref_logps is not None else [])]


@follows_autocast("hidden", "weight", "bias")
@traceable_loss(policy_metric_names)
def fused_grpo_loss(hidden, weight, targets, advantages, *, mask=None, old_logps=None, ref_logps=None, beta=0.0,
                    eps_low=0.2, eps_high=0.2, loss_type="grpo", max_len=None, bias=None, temperature=1.0,
                    use_bias_correction_kl=False, entropy_coef=0.0, delta=None, sapo_temperature_pos=1.0,
                    sapo_temperature_neg=1.05, vllm_is_ratio=None, num_items_in_batch=None,
                    importance_sampling_level="token", vespo_k_pos=2.0, vespo_lambda_pos=3.0, vespo_k_neg=3.0,
                    vespo_lambda_neg=2.0, cu_seqlens=None, return_metrics=False, impl=None, chunk_bytes=None):
    """Clipped policy-gradient loss of GRPO (DYPO paper eq. 3 / 21; DAPO's clip-higher with ``eps_high``) and the
    variants of TRL 1.16 and Liger-Kernel 0.8.5, never building the logits.

    Per token, with r_t = exp(lp_t - old_t) and lp_t the log-prob of targets[i, t] under
    softmax((W h + b) / temperature):
        L_t = rho_t P_t + beta * (exp(ref_t - lp_t) - (ref_t - lp_t) - 1) [* r_t]  - entropy_coef * H_t
    with P_t = -min(min(r_t, delta) A_i, clip(r_t, 1 - eps_low, 1 + eps_high) A_i) (delta: INTELLECT-2's two-sided
    clip), or for loss_type "cispo" P_t = -sg[min(r_t, eps_high)] A_i lp_t (MiniMax-M1's CISPO: the clipped ratio
    detached), or for "sapo" P_t = -(4 / tau) sigmoid(tau (r_t - 1)) A_i with tau = sapo_temperature_pos when
    A_i > 0, else sapo_temperature_neg (SAPO's soft gate); rho_t = ``vllm_is_ratio`` (1 when None), H_t the token's
    entropy. With importance_sampling_level="sequence" (GSPO) r_t is the sequence's s_i = exp(mean_t (lp_t - old_t)),
    one ratio for all its tokens (and the bias-corrected KL is weighted by s_i); loss_type "vespo" has
    P_t = -sg[phi_i] A_i lp_t with phi_i VESPO's gamma weight of the sequence's importance ratio (vllm_is_ratio
    enters phi_i, not rho_t). Definitions as TRL's GRPOTrainer._compute_loss and Liger-Kernel's
    LigerFusedLinearGRPOLoss.
    Aggregation over the tokens where ``mask`` is set: "grpo"/"sapo" the mean over each sequence's tokens, then over
    the B sequences; "bnpo"/"dapo"/"cispo"/"vespo" the mean over all tokens ("dapo"/"cispo"/"vespo": divided by
    ``num_items_in_batch`` when given); "dr_grpo" the sum over B * max_len (max_len defaults to T); "luspo" the sum
    over each sequence's tokens, mean over the sequences. The entropy bonus is aggregated as the policy term, as
    verl's entropy_coeff is.

    Args:
        hidden: ``[B, T, D]`` fp32/bf16/fp16 last hidden states; weight ``[V, D]`` (same dtype); bias ``[V]`` or None.
        targets: ``[B, T]`` token ids (anything where ``mask`` is 0).
        advantages: ``[B]`` per-sequence advantages (e.g. ``group_advantages(...).advantages``), constants.
        mask: ``[B, T]`` bool or 0/1, the response tokens; None means all.
        old_logps: ``[B, T]`` log-probs of the policy that sampled; None means on-policy (ratio 1, detached).
        ref_logps: ``[B, T]`` reference-model log-probs, needed when ``beta`` > 0.
        beta: >= 0, weight of the k3 KL penalty. eps_low in [0, 1), eps_high >= 0: the clip range (CISPO: the upper
            bound of its ratio weight, typically 1 to 5).
        use_bias_correction_kl: multiply the KL term by r_t (differentiable), which makes its gradient the unbiased
            reverse-KL gradient off-policy (DeepSeek-V3.2; TRL's option of that name, on by default there, and
            Liger-Kernel's): per-token gradient beta r_t (lp_t - ref_t) instead of beta (1 - exp(ref_t - lp_t)).
        entropy_coef: weight of the entropy bonus (finite; 0 for none). Its gradient -p (z - E_p[z]) is formed in
            the same sweep.
        delta: None, or a positive cap of r_t in the unclipped branch (clipped loss types only).
        sapo_temperature_pos, sapo_temperature_neg: SAPO's gate temperatures (> 0).
        vllm_is_ratio: ``[B, T]`` or ``[B, 1]`` non-negative finite weights of the policy term: the truncated
            importance-sampling correction of rollouts sampled by another engine (TRL's importance_sampling_ratio).
        cu_seqlens: padding-free input (flash-attn's convention, ``[S + 1]`` int32/int64 offsets from 0 to N):
            hidden ``[N, D]``, targets, mask, old_logps, ref_logps and vllm_is_ratio ``[N]`` (the ratio may also be
            ``[S, 1]``), advantages ``[S]``; the same loss as the padded form (dr_grpo's T: the longest sequence).
            One more host sync (the offsets).
        importance_sampling_level: "token", or "sequence" (GSPO; not with cispo, sapo, vespo).
        vespo_k_pos, vespo_lambda_pos, vespo_k_neg, vespo_lambda_neg: VESPO's gamma shapes and rates (by the sign
            of A).
        num_items_in_batch: "dapo"/"cispo"/"vespo" only: the normaliser instead of this batch's token count (the
            tokens of the whole generation batch, divided by the number of processes, as TRL passes it); a positive
            number or a 0-dim tensor (read on the device, no sync).
        temperature: positive; the logits are divided by it.
        return_metrics: also return detached token means ``clip_fraction_low`` (r < 1 - eps_low with A < 0),
            ``clip_fraction_high`` (r > 1 + eps_high with A > 0; CISPO: r > eps_high; SAPO clips nothing),
            ``mean_ratio``, ``mean_entropy`` and, with ref_logps, ``mean_kl`` (r_t-weighted with
            use_bias_correction_kl, as in the loss).
        impl, chunk_bytes: as fused_linear_logprobs ("chunked" or "fused"; the chunk budget).

    Returns:
        the fp32 scalar loss (and the metrics dict), differentiable in hidden, weight and bias.

    Cost for N masked tokens (dropped before the projection): one sweep with the gradients formed in the forward,
    6NDV FLOP (2NDV under torch.no_grad; 8NDV with impl="fused"), every variant and the entropy bonus included.
    GSPO and VESPO need a sequence's whole log-ratio before its tokens' gradients: each chunk holds whole sequences
    (growing to hold one of up to 4 chunks' rows), and a longer sequence is swept ahead once without gradients
    (+2 r D V for its r tokens); one more host sync (the sequences' sizes).
    Extra memory O(N*D + V*D + chunk_bytes), never N x V: the fp32 gradients of hidden and weight are held from the
    forward to the backward. One host sync (the input checks and the token count, read together), none inside the
    sweep. impl="chunked" is bitwise deterministic; "fused" adds tiles with atomics, so its last bits may vary
    between runs.
    """
    checks = Checks()
    packed, batch_size, targets, mask, per_token = sequence_inputs(
        hidden, weight, bias, targets, mask, cu_seqlens, checks, old_logps=old_logps, ref_logps=ref_logps,
        vllm_is_ratio=vllm_is_ratio)
    old_logps, ref_logps, vllm_is_ratio = (per_token[name] for name in ("old_logps", "ref_logps", "vllm_is_ratio"))
    check_tensor("advantages", advantages)
    check_per_sequence(batch_size, hidden.device, checks, advantages=advantages)
    sapo_temperatures = (sapo_temperature_pos, sapo_temperature_neg)
    check_grpo_settings(beta, eps_low, eps_high, loss_type, ref_logps, use_bias_correction_kl=use_bias_correction_kl,
                        delta=delta, sapo_temperatures=sapo_temperatures, entropy_coef=entropy_coef)
    check_temperature(temperature)
    if max_len is not None and (isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 1):
        raise ValueError(f"max_len must be a positive integer or None, got {max_len!r}")
    mask = torch.ones(targets.shape, dtype=torch.bool, device=hidden.device) if mask is None else mask.bool()
    is_ratio = check_is_ratio(vllm_is_ratio, mask, checks)
    check_num_items(num_items_in_batch, loss_type, hidden.device, checks)
    sequence_level = check_importance_sampling_level(importance_sampling_level, loss_type)
    vespo_shapes = (vespo_k_pos, vespo_lambda_pos, vespo_k_neg, vespo_lambda_neg)
    for name, value in zip(("vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg", "vespo_lambda_neg"), vespo_shapes):
        check_number(name, value)
    backend = select_backend(hidden.device)
    impl = select_impl(impl, backend, hidden.device)

    tokens = checks.count(mask.sum())
    checks.run()
    plan = layout = None
    if sequence_level:  # the sequences in sweep order, each whole in a chunk (or swept ahead)
        plan, layout = sequence_plan(mask, weight, hidden.device, backend, impl, chunk_bytes)
    kept, sequence, kept_hidden, kept_targets = select_tokens(hidden, targets, mask, tokens.value,
                                                              None if plan is None else plan.rows, packed)
    weights = token_weights(loss_type, mask, sequence, max_len, num_tokens=num_items_in_batch)
    token_advantages = advantages.detach().float()[sequence]
    kept_old = None if old_logps is None else old_logps.detach().float().reshape(-1)[kept]
    kept_ref = None if ref_logps is None else ref_logps.detach().float().reshape(-1)[kept]
    kept_is_ratio = None if is_ratio is None else is_ratio.reshape(-1)[kept]
    terms = TokenTerms(**policy_terms(loss_type, eps_low, eps_high, delta, sapo_temperatures))
    sequence_terms = None
    if sequence_level:
        sequence_terms = SequenceTerms(
            "vespo" if loss_type == "vespo" else "gspo", plan.token_sequence(tokens.value), kept_old,
            weights if kept_is_ratio is None or loss_type == "vespo" else weights * kept_is_ratio,
            advantages.detach().float()[plan.rows], plan.lengths.clamp(min=1).float(), eps_low=eps_low,
            eps_high=eps_high, delta=delta, vespo_shapes=tuple(float(v) for v in vespo_shapes),
            log_is_ratio=vespo_log_is_ratio(is_ratio, mask, plan.rows) if loss_type == "vespo" else None)
        if kept_ref is not None and loss_type != "vespo":  # GSPO's KL is weighted by s_i: a sequence term
            sequence_terms.kl_weights, sequence_terms.ref_logps = beta * weights, kept_ref
            sequence_terms.kl_importance_weighted = use_bias_correction_kl
    else:
        terms.pg_weight, terms.advantages, terms.is_ratio = weights, token_advantages, kept_is_ratio
    terms.old_logps = kept_old
    if kept_ref is not None and (sequence_terms is None or loss_type == "vespo"):
        terms.ref_logps, terms.kl_weight = kept_ref, beta * weights  # the KL is reported even when beta = 0
        terms.kl_importance_weighted = use_bias_correction_kl
    if entropy_coef:
        terms.entropy_weight = entropy_coef * weights
    op_pass = LogprobPass(kept_targets, 1.0 / temperature, backend, terms=terms, sequence=sequence_terms)
    if sequence_level:
        sweep_ahead(op_pass, plan, kept_hidden, weight, bias, impl, chunk_bytes)
        chunks = gal_chunks(plan, layout, kept_hidden.shape[0])
    else:
        chunks = loss_chunks(op_pass, kept_hidden, weight, impl, chunk_bytes)
    loss = sweep_loss(kept_hidden, weight, bias, op_pass, chunks, impl)
    if sequence_level:
        return (loss, sequence_metrics(op_pass, kept_old, kept_ref, use_bias_correction_kl)) if return_metrics \
            else loss
    return (loss, policy_metrics(op_pass)) if return_metrics else loss
