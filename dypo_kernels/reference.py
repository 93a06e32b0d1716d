"""Float64 reference implementations: the oracle that every fused op is tested against.

Each function materialises the full ``[..., V]`` logits and computes in float64 (``dtype`` can ask otherwise, for
the naive same-dtype baseline of the benchmarks). They are slow and memory-hungry on purpose and no ``fused_*`` op
calls them. Notation follows docs/design.md, "The method and its math", and the DYPO paper (arXiv 2604.08926):
``z_t = (W h_t + b) / temperature`` are the logits of response token t and ``y_t`` its target id.
"""

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from dypo_kernels.grade import Grade, GroupAdvantages


def logits(hidden, weight, bias=None, temperature=1.0, dtype=torch.float64):
    """z = (hidden @ weight.T + bias) / temperature, shape ``[..., V]``."""
    z = hidden.to(dtype) @ weight.to(dtype).T
    if bias is not None:
        z = z + bias.to(dtype)
    return z / temperature


def token_logprobs(hidden, weight, targets, *, bias=None, temperature=1.0, ignore_index=-100,
                   dtype=torch.float64):
    """Token log-probs and entropies of the targets.

    lp_t = z_t[y_t] - logsumexp(z_t);  H_t = logsumexp(z_t) - sum_v softmax(z_t)_v z_t,v.
    Positions whose target is ``ignore_index`` give 0 for both. Returns ``(logps, entropy)`` shaped like targets.
    """
    z = logits(hidden, weight, bias, temperature, dtype)
    valid = targets != ignore_index
    safe_targets = targets.masked_fill(~valid, 0)
    log_probs = torch.log_softmax(z, dim=-1)
    token_logps = log_probs.gather(-1, safe_targets.unsqueeze(-1)).squeeze(-1)
    probs = log_probs.exp()
    entropy = -(probs * log_probs).sum(-1)
    zero = torch.zeros((), dtype=dtype, device=z.device)
    return torch.where(valid, token_logps, zero), torch.where(valid, entropy, zero)


def sequence_logprobs(token_logps, mask, *, average=False):
    """S_i = sum of lp_t over the response tokens of sequence i (the mean over them when ``average``)."""
    total = torch.where(mask.bool(), token_logps, 0.0).sum(-1)
    return total / mask.to(token_logps.dtype).sum(-1).clamp(min=1) if average else total


def _group_ids(batch_size, group_size, group_index, device):
    if group_index is not None:
        return group_index.to(device=device, dtype=torch.long)
    return torch.arange(batch_size, device=device) // group_size


def group_advantages(rewards, *, group_size=None, group_index=None, scale="group", eps=1e-6,
                     success_threshold=0.5, dtype=torch.float64):
    """Group-normalised advantages (GRPO, paper eq. 22) and the DYPO grade of each group (paper section 3).

    A_i = (R_i - mean_g) / (std + eps), where std is the group's sample std (n - 1) for ``scale="group"``,
    the whole batch's sample std for ``"batch"``, and no division for ``"none"`` (Dr.GRPO). A group of one
    has std 0. A rollout succeeds when R_i > success_threshold; a group is EASY when all succeed, HARD when none
    does, MID otherwise. Written with a dense [G, B] membership matrix, unlike the library's scatter version.
    """
    rewards = rewards.to(dtype)
    ids = _group_ids(rewards.shape[0], group_size, group_index, rewards.device)
    membership = (ids[None, :] == torch.arange(int(ids.max()) + 1, device=ids.device)[:, None]).to(dtype)
    count = membership.sum(1)
    mean = membership @ rewards / count
    centred = rewards - membership.T @ mean
    std = torch.where(count > 1, (membership @ centred**2 / (count - 1).clamp(min=1)).sqrt(), 0.0)
    if scale == "group":
        advantages = centred / (membership.T @ std + eps)
    elif scale == "batch":
        advantages = centred / ((rewards.std() if rewards.numel() > 1 else 0.0) + eps)
    elif scale == "none":
        advantages = centred
    else:
        raise ValueError(f"scale must be 'group', 'batch' or 'none', got {scale!r}")
    num_success = (membership @ (rewards > success_threshold).to(dtype)).long()
    grade = torch.where(num_success == 0, int(Grade.HARD),
                        torch.where(num_success == count.long(), int(Grade.EASY), int(Grade.MID)))
    return GroupAdvantages(advantages, mean, std, num_success, grade)


def grpo_loss(hidden, weight, targets, advantages, *, mask=None, old_logps=None, ref_logps=None, beta=0.0,
              eps_low=0.2, eps_high=0.2, loss_type="grpo", max_len=None, bias=None, temperature=1.0,
              use_bias_correction_kl=False, entropy_coef=0.0, delta=None, sapo_temperature_pos=1.0,
              sapo_temperature_neg=1.05, vllm_is_ratio=None, num_items_in_batch=None,
              importance_sampling_level="token", vespo_k_pos=2.0, vespo_lambda_pos=3.0, vespo_k_neg=3.0,
              vespo_lambda_neg=2.0, dtype=torch.float64):
    """Clipped GRPO loss (paper eq. 3 / 21) with the k3 KL penalty, its variants and an entropy bonus, on
    ``[B, T, D]`` hidden states, as TRL 1.16's GRPOTrainer._compute_loss writes them.

    per-token: rho * P + beta * (exp(ref - lp) - (ref - lp) - 1) [* r], r_t = exp(lp_t - old_lp_t) (old = lp
    detached when ``old_logps`` is None), rho = ``vllm_is_ratio``, P by loss_type: "cispo" -sg[min(r, eps_high)] A lp;
    "sapo" -sigmoid(tau (r - 1)) 4 / tau A (tau by the sign of A); "vespo" -sg[phi] A lp, phi the gamma weight of
    the sequence's clamped log-ratio sum (plus its tokens' clamped log rho), rho then not applied; otherwise
    -min(min(r, delta) A, clip(r) A). importance_sampling_level "sequence" (GSPO): r is exp of the sequence's mean
    log-ratio, for every token (and weights the corrected KL).
    Aggregation: "grpo"/"sapo" mean over each sequence's tokens then over sequences; "bnpo"/"dapo"/"cispo" mean over
    all tokens (dapo/cispo: over ``num_items_in_batch`` when given); "dr_grpo" sum / (B * max_len); "luspo" sum over
    each sequence, mean over sequences. Minus entropy_coef times the token entropy, aggregated the same way.
    """
    token_logps, entropy = token_logprobs(hidden, weight, targets, bias=bias, temperature=temperature, dtype=dtype)
    return grpo_loss_from_logps(token_logps, advantages, mask=mask, old_logps=old_logps, ref_logps=ref_logps,
                                beta=beta, eps_low=eps_low, eps_high=eps_high, loss_type=loss_type, max_len=max_len,
                                use_bias_correction_kl=use_bias_correction_kl, entropy=entropy,
                                entropy_coef=entropy_coef, delta=delta,
                                sapo_temperatures=(sapo_temperature_pos, sapo_temperature_neg),
                                vllm_is_ratio=vllm_is_ratio, num_items_in_batch=num_items_in_batch,
                                importance_sampling_level=importance_sampling_level,
                                vespo_shapes=(vespo_k_pos, vespo_lambda_pos, vespo_k_neg, vespo_lambda_neg))


def grpo_loss_from_logps(token_logps, advantages, *, mask=None, old_logps=None, ref_logps=None, beta=0.0,
                         eps_low=0.2, eps_high=0.2, loss_type="grpo", max_len=None, use_bias_correction_kl=False,
                         entropy=None, entropy_coef=0.0, delta=None, sapo_temperatures=(1.0, 1.05),
                         vllm_is_ratio=None, num_items_in_batch=None, importance_sampling_level="token",
                         vespo_shapes=(2.0, 3.0, 3.0, 2.0)):
    """grpo_loss on token log-probs (and entropies) ``[B, T]`` (differentiable) already computed, in their dtype."""
    dtype = token_logps.dtype
    mask = torch.ones_like(token_logps) if mask is None else mask.to(dtype)
    old = token_logps.detach() if old_logps is None else old_logps.to(dtype)
    log_ratio = token_logps - old
    if importance_sampling_level == "sequence":
        log_ratio = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1)).unsqueeze(-1)
    ratio = torch.exp(log_ratio)
    adv = advantages.to(dtype).unsqueeze(-1)
    if loss_type == "vespo":
        phi = _gamma_weights(token_logps - old, mask, adv, vllm_is_ratio, vespo_shapes)
        per_token = -phi * adv * token_logps
    elif loss_type == "cispo":
        per_token = -ratio.clamp(max=eps_high).detach() * adv * token_logps
    elif loss_type == "sapo":
        tau = torch.where(adv > 0, float(sapo_temperatures[0]), float(sapo_temperatures[1])).to(dtype)
        per_token = -torch.sigmoid(tau * (ratio - 1)) * 4 / tau * adv
    else:
        capped = ratio if delta is None else ratio.clamp(max=delta)
        per_token = -torch.minimum(capped * adv, ratio.clamp(1 - eps_low, 1 + eps_high) * adv)
    if vllm_is_ratio is not None and loss_type != "vespo":
        per_token = per_token * vllm_is_ratio.to(dtype)
    if beta != 0.0:
        delta_ref = ref_logps.to(dtype) - token_logps
        kl = torch.exp(delta_ref) - delta_ref - 1
        per_token = per_token + beta * (ratio * kl if use_bias_correction_kl else kl)
    loss = _aggregate(per_token, mask, loss_type, max_len, num_items_in_batch)
    if entropy_coef:
        loss = loss - entropy_coef * _aggregate(entropy, mask, loss_type, max_len, num_items_in_batch)
    return loss


@torch.no_grad()
def _gamma_weights(log_ratio, mask, adv, is_ratio, shapes):
    """VESPO's phi of each sequence [B, 1], detached (TRL's get_gamma_weights; rho summed over the masked tokens)."""
    k_pos, lambda_pos, k_neg, lambda_neg = shapes
    log_weight = (log_ratio.clamp(-20.0, 20.0) * mask).sum(-1, keepdim=True)
    if is_ratio is not None:
        log_weight = log_weight + (torch.log(is_ratio.to(log_ratio.dtype)).clamp(math.log(1e-8), 20.0)
                                   * mask).sum(-1, keepdim=True)
    log_weight = log_weight.clamp(math.log(1e-8), 20.0)
    k = torch.where(adv >= 0, k_pos, k_neg).to(log_ratio.dtype)
    rate = torch.where(adv >= 0, lambda_pos, lambda_neg).to(log_ratio.dtype).clamp(min=1e-4)
    return torch.exp(rate + k * log_weight - rate * torch.exp(log_weight)).nan_to_num(0.0, 0.0, 0.0)


def _aggregate(per_token, mask, loss_type, max_len=None, num_items_in_batch=None):
    """GRPO's token aggregations of a ``[B, T]`` per-token loss over ``mask``."""
    if loss_type in ("grpo", "sapo"):
        return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean()
    if loss_type in ("bnpo", "dapo", "cispo", "vespo"):
        tokens = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        return (per_token * mask).sum() / tokens
    if loss_type == "dr_grpo":
        return (per_token * mask).sum() / (mask.shape[0] * (max_len or mask.shape[-1]))
    if loss_type == "luspo":
        return (per_token * mask).sum(-1).mean()
    raise ValueError(f"unknown loss_type {loss_type!r}")


def gal_loss(seq_logps, rewards, *, ref_seq_logps=None, group_size=None, group_index=None, beta=1.0,
             dtype=torch.float64):
    """Group alignment loss (paper eq. 14-15).

    For pairs (s, f) of one group with R_s > R_f: d = (S_s - S_ref,s) - (S_f - S_ref,f),
    loss = -log sigmoid(beta * d); mean over a group's pairs, then over the groups that have pairs.
    A batch without pairs returns a zero that still backpropagates.
    """
    margin = seq_logps.to(dtype)
    if ref_seq_logps is not None:
        margin = margin - ref_seq_logps.to(dtype)
    rewards = rewards.to(dtype)
    ids = _group_ids(margin.shape[0], group_size, group_index, margin.device)
    is_pair = (ids[:, None] == ids[None, :]) & (rewards[:, None] > rewards[None, :])
    pair_loss = -F.logsigmoid(beta * (margin[:, None] - margin[None, :]))
    num_groups = int(ids.max()) + 1
    group_pairs = torch.zeros(num_groups, dtype=dtype, device=margin.device).index_add_(
        0, ids, is_pair.sum(1).to(dtype))
    group_sum = torch.zeros(num_groups, dtype=dtype, device=margin.device).index_add_(
        0, ids, torch.where(is_pair, pair_loss, 0.0).sum(1))
    has_pairs = group_pairs > 0
    if not bool(has_pairs.any()):
        return margin.sum() * 0.0
    return (group_sum[has_pairs] / group_pairs[has_pairs]).mean()


def sft_loss(hidden, weight, targets, *, mask=None, ignore_index=-100, reduction="token_mean", bias=None,
             temperature=1.0, dtype=torch.float64):
    """Negative log-likelihood of teacher trajectories (paper eq. 5) on ``[B, T, D]`` hidden states.

    "token_mean": over all valid tokens; "seq_mean": each sequence's token mean, then the mean over the
    sequences that have at least one valid token.
    """
    token_logps, _ = token_logprobs(hidden, weight, targets, bias=bias, temperature=temperature,
                                    ignore_index=ignore_index, dtype=dtype)
    valid = targets != ignore_index
    if mask is not None:
        valid = valid & mask.bool()
    return sft_loss_from_logps(token_logps, valid, reduction=reduction)


def sft_loss_from_logps(token_logps, valid, *, reduction="token_mean"):
    """sft_loss on token log-probs ``[B, T]`` already computed, over the tokens ``valid``."""
    valid = valid.to(token_logps.dtype)
    if reduction == "token_mean":
        return -(token_logps * valid).sum() / valid.sum().clamp(min=1)
    if reduction == "seq_mean":
        per_seq = (token_logps * valid).sum(-1) / valid.sum(-1).clamp(min=1)
        has_tokens = valid.sum(-1) > 0
        return -(per_seq * has_tokens).sum() / has_tokens.sum().clamp(min=1)
    raise ValueError(f"unknown reduction {reduction!r}")


def dypo_loss(hidden, weight, targets, *, mask, route, rewards, group_index, advantages=None, old_logps=None,
              ref_logps=None, alpha=0.5, gamma=1.0, beta_gal=1.0, beta_kl=0.0, eps_low=0.2, eps_high=0.2,
              loss_type="grpo", bias=None, temperature=1.0, use_bias_correction_kl=False, entropy_coef=0.0,
              delta=None, sapo_temperature_pos=1.0, sapo_temperature_neg=1.05, vllm_is_ratio=None,
              importance_sampling_level="token", dtype=torch.float64):
    """DYPO's routed objective, each part from the functions above on its own rows (route 1 = RL, 2 = SFT):
    (P_hard gamma L_SFT + P_mid (alpha L_GRPO + (1 - alpha) L_GAL - entropy_coef H_RL)) / (P_hard + P_mid), P the
    prompts (groups) of each route; L_SFT aggregates -lp over the SFT rows, and H_RL the RL rows' entropy, as
    ``loss_type`` aggregates GRPO's per-token loss."""
    targets = targets.masked_fill(~mask.bool(), 0)
    token_logps, entropy = token_logprobs(hidden, weight, targets, bias=bias, temperature=temperature, dtype=dtype)
    return dypo_loss_from_logps(token_logps, mask=mask, route=route, rewards=rewards, group_index=group_index,
                                advantages=advantages, old_logps=old_logps, ref_logps=ref_logps, alpha=alpha,
                                gamma=gamma, beta_gal=beta_gal, beta_kl=beta_kl, eps_low=eps_low, eps_high=eps_high,
                                loss_type=loss_type, use_bias_correction_kl=use_bias_correction_kl, entropy=entropy,
                                entropy_coef=entropy_coef, delta=delta,
                                sapo_temperatures=(sapo_temperature_pos, sapo_temperature_neg),
                                vllm_is_ratio=vllm_is_ratio, importance_sampling_level=importance_sampling_level)


def dypo_loss_from_logps(token_logps, *, mask, route, rewards, group_index, advantages=None, old_logps=None,
                         ref_logps=None, alpha=0.5, gamma=1.0, beta_gal=1.0, beta_kl=0.0, eps_low=0.2, eps_high=0.2,
                         loss_type="grpo", use_bias_correction_kl=False, entropy=None, entropy_coef=0.0, delta=None,
                         sapo_temperatures=(1.0, 1.05), vllm_is_ratio=None, importance_sampling_level="token"):
    """dypo_loss on token log-probs (and entropies) ``[B, T]`` already computed, in their dtype."""
    dtype = token_logps.dtype
    mask = mask.bool()
    rl, sft = (route == 1).nonzero().squeeze(1), (route == 2).nonzero().squeeze(1)
    prompts_rl, prompts_sft = group_index[rl].unique().numel(), group_index[sft].unique().numel()
    total = token_logps.sum() * 0.0
    if sft.numel():
        total = total + prompts_sft * gamma * _aggregate(-token_logps[sft], mask[sft].to(dtype), loss_type)
    if rl.numel():
        rl_group = torch.unique(group_index[rl], return_inverse=True)[1]
        rl_advantages = (group_advantages(rewards[rl], group_index=rl_group, dtype=dtype).advantages
                         if advantages is None else advantages[rl])
        grpo = grpo_loss_from_logps(token_logps[rl], rl_advantages, mask=mask[rl],
                                    old_logps=None if old_logps is None else old_logps[rl],
                                    ref_logps=None if ref_logps is None else ref_logps[rl], beta=beta_kl,
                                    eps_low=eps_low, eps_high=eps_high, loss_type=loss_type,
                                    use_bias_correction_kl=use_bias_correction_kl, delta=delta,
                                    sapo_temperatures=sapo_temperatures,
                                    vllm_is_ratio=None if vllm_is_ratio is None else vllm_is_ratio[rl],
                                    importance_sampling_level=importance_sampling_level)
        ref_seq = None if ref_logps is None else sequence_logprobs(ref_logps[rl].to(dtype), mask[rl])
        gal = gal_loss(sequence_logprobs(token_logps[rl], mask[rl]), rewards[rl], ref_seq_logps=ref_seq,
                       group_index=rl_group, beta=beta_gal, dtype=dtype)
        bonus = entropy_coef * _aggregate(entropy[rl], mask[rl].to(dtype), loss_type) if entropy_coef else 0.0
        total = total + prompts_rl * (alpha * grpo + (1 - alpha) * gal - bonus)
    return total / max(prompts_rl + prompts_sft, 1)


def _divergence(teacher_logp, student_logp, divergence, jsd_beta):
    """Per-token divergence summed over the vocabulary, with 0 * log 0 = 0."""
    teacher_p, student_q = teacher_logp.exp(), student_logp.exp()

    def kl(p, logp, logq):  # KL(p || q), safe where p = 0
        return torch.where(p > 0, p * (logp - logq), torch.zeros_like(p)).sum(-1)

    if divergence == "forward_kl" or (divergence == "jsd" and jsd_beta == 0.0):
        return kl(teacher_p, teacher_logp, student_logp)
    if divergence == "reverse_kl" or (divergence == "jsd" and jsd_beta == 1.0):
        return kl(student_q, student_logp, teacher_logp)
    if divergence == "jsd":
        log_mix = torch.logaddexp(teacher_logp + torch.log(torch.tensor(jsd_beta, dtype=teacher_logp.dtype)),
                                  student_logp + torch.log(torch.tensor(1 - jsd_beta, dtype=teacher_logp.dtype)))
        return jsd_beta * kl(teacher_p, teacher_logp, log_mix) + (1 - jsd_beta) * kl(student_q, student_logp, log_mix)
    raise ValueError(f"unknown divergence {divergence!r}")


def multi_teacher_kl(student_hidden, student_weight, teacher_hiddens: Sequence[torch.Tensor],
                     teacher_weights: Sequence[torch.Tensor], *, mask=None, teacher_coefs=None,
                     divergence="forward_kl", jsd_beta=0.5, aggregate="mixture", temperature=1.0,
                     scale_by_temperature_sq=False, student_bias=None, teacher_biases=None,
                     dtype=torch.float64):
    """Divergence of the student's next-token distribution from m teachers', mean over unmasked tokens.

    q = softmax(student logits / T), p_i = softmax(teacher_i logits / T), weights w_i (uniform by default).
    "mixture": D(sum_i w_i p_i, q); "mean": sum_i w_i D(p_i, q). D is KL(p || q) ("forward_kl"),
    KL(q || p) ("reverse_kl") or the generalised JSD, beta KL(p || M) + (1 - beta) KL(q || M) with
    M = beta p + (1 - beta) q, where beta = 0 and 1 are the forward and reverse KL (Liger-Kernel's convention).
    """
    m = len(teacher_hiddens)
    coefs = (torch.full((m,), 1.0 / m, dtype=dtype) if teacher_coefs is None
             else torch.as_tensor(teacher_coefs, dtype=dtype))
    biases = teacher_biases or [None] * m
    student_logp = torch.log_softmax(logits(student_hidden, student_weight, student_bias, temperature, dtype), -1)
    teacher_logps = [torch.log_softmax(logits(h, w, b, temperature, dtype), -1)
                     for h, w, b in zip(teacher_hiddens, teacher_weights, biases)]
    if aggregate == "mixture":
        stacked = torch.stack([lp + torch.log(c) for lp, c in zip(teacher_logps, coefs)])
        per_token = _divergence(torch.logsumexp(stacked, 0), student_logp, divergence, jsd_beta)
    elif aggregate == "mean":
        per_token = sum(c * _divergence(lp, student_logp, divergence, jsd_beta) for lp, c in zip(teacher_logps, coefs))
    else:
        raise ValueError(f"unknown aggregate {aggregate!r}")
    mask = torch.ones_like(per_token) if mask is None else mask.bool().to(dtype)
    loss = torch.where(mask.bool(), per_token, 0.0).sum() / mask.sum().clamp(min=1)
    return loss * temperature**2 if scale_by_temperature_sq else loss


def sparse_teacher_kl(student_hidden, student_weight, teacher_token_ids, teacher_logps, *, mask=None,
                      teacher_coefs=None, tail="bucket", temperature=1.0, student_bias=None, dtype=torch.float64):
    """sum_i w_i KL(P_i || Q_i) for teachers given as top-k (ids, log-probs), mean over unmasked tokens, written with
    explicit coarse-grained distributions: "bucket": P_i = (p_S, 1 - sum p_S), Q_i = (q_S, 1 - sum q_S);
    "renormalize": P_i = p_S / sum p_S against the full student distribution on S."""
    m = len(teacher_token_ids)
    coefs = [1.0 / m] * m if teacher_coefs is None else [float(c) for c in teacher_coefs]
    student_logp = torch.log_softmax(logits(student_hidden, student_weight, student_bias, temperature, dtype), -1)
    per_token = torch.zeros(student_logp.shape[:-1], dtype=dtype, device=student_logp.device)
    for coef, ids, logps in zip(coefs, teacher_token_ids, teacher_logps):
        p_top = logps.to(dtype).exp()
        q_top = student_logp.exp().gather(-1, ids.long())
        if tail == "renormalize":
            p_top = p_top / p_top.sum(-1, keepdim=True)
            teacher, student = p_top, q_top
        else:
            rest = (1 - p_top.sum(-1, keepdim=True)).clamp(min=0)
            rest = torch.where(rest > 1e-4, rest, 0.0)
            teacher = torch.cat([p_top, rest], -1)
            student = torch.cat([q_top, 1 - q_top.sum(-1, keepdim=True)], -1)
        per_token = per_token + coef * torch.where(teacher > 0, teacher * (teacher.log() - student.log()),
                                                   0.0).sum(-1)
    mask = torch.ones_like(per_token) if mask is None else mask.bool().to(dtype)
    return torch.where(mask.bool(), per_token, 0.0).sum() / mask.sum().clamp(min=1)
