"""dypo_loss: DYPO's routed objective (SFT on hard prompts, GRPO + GAL on mid ones) in one sweep over the vocabulary."""

from typing import NamedTuple

import torch

from dypo_kernels.advantages import grouped_advantages
from dypo_kernels.amp import follows_autocast
from dypo_kernels.backend import select_backend
from dypo_kernels.custom_ops import traceable_loss
from dypo_kernels.gal import sequence_logprobs
from dypo_kernels.gal.pairs import METRICS as GAL_METRICS
from dypo_kernels.gal.pairs import no_pair_metrics
from dypo_kernels.gal.terms import (
    GROUP_GROWTH,
    GalTerms,
    consecutive_group_ids,
    gal_chunks,
    gal_layout,
    plan_gal,
    sweep_ahead,
)
from dypo_kernels.grade import Route
from dypo_kernels.groups import group_ids
from dypo_kernels.grpo import (
    check_grpo_settings,
    check_importance_sampling_level,
    check_is_ratio,
    policy_metric_names,
    policy_metrics,
    policy_terms,
    sequence_metrics,
)
from dypo_kernels.grpo.sequence import SequenceTerms
from dypo_kernels.logprob_pass import LogprobPass, TokenTerms
from dypo_kernels.packing import sequence_inputs, unpack
from dypo_kernels.sweep import loss_chunks, select_impl, sweep_loss
from dypo_kernels.tokens import LOSS_TYPES as ALL_LOSS_TYPES
from dypo_kernels.tokens import positions_of, select_tokens, token_weights
from dypo_kernels.validation import (
    Checks,
    Count,
    check_number,
    check_per_sequence,
    check_temperature,
    check_tensor,
)

# fused_grpo_loss's loss types but VESPO, whose per-sequence weights need each sequence whole in a chunk, as GAL's
# groups do: the two chunkings are not combined
LOSS_TYPES = tuple(loss_type for loss_type in ALL_LOSS_TYPES if loss_type != "vespo")


def _check_routes(route, ids, checks):
    """(is_rl, is_sft) [B] bool; the checks that route holds Route values and no group mixes RL and SFT rows."""
    valid = (route == Route.SKIP) | (route == Route.RL) | (route == Route.SFT)
    names = ", ".join(f"{r.name}={int(r)}" for r in Route)
    checks.require(valid.all(), lambda: f"route must hold Route values ({names}); found {route[~valid][:5].tolist()}")
    is_rl, is_sft = route == Route.RL, route == Route.SFT
    group_rl, group_sft = _groups_with(is_rl, ids), _groups_with(is_sft, ids)
    mixed = group_rl & group_sft
    checks.require(~mixed.any(), lambda: f"groups {mixed.nonzero().squeeze(1)[:5].tolist()} of group_index hold both "
                                         "RL and SFT rows: a prompt is either mid (its rollouts are RL rows) or hard "
                                         "(its teacher trajectories are SFT rows)")
    return is_rl, is_sft


def _groups_with(rows, ids):
    """bool [B]: the group ids (< B once checked) that hold one of ``rows``."""
    count = ids.shape[0]
    return torch.zeros(count, dtype=torch.long, device=ids.device).index_add_(
        0, ids.clamp(0, max(count - 1, 0)), rows.long()) > 0


class BatchTotals(NamedTuple):
    """Counts over a whole batch that dypo_loss normalises by, given to each part of it (micro-batches, ranks) so
    that the parts' losses add up to the whole batch's: prompts (groups) and sequences with RL and SFT rows, their
    response tokens, the widest part's padded width (dr_grpo's T) and the RL groups with a GAL pair."""

    prompts_rl: int
    prompts_sft: int
    sequences_rl: int
    sequences_sft: int
    tokens_rl: int
    tokens_sft: int
    max_length: int
    gal_groups: int

    @classmethod
    def combine(cls, parts):
        """The totals of the union of disjoint parts."""
        return cls(*(max(values) if name == "max_length" else sum(values)
                     for name, values in zip(cls._fields, zip(*parts))))


def _count_totals(checks, mask, is_rl, is_sft, rewards, ids):
    """The Counts of one batch's BatchTotals, read with ``checks``."""
    mask = mask.bool()
    count = ids.shape[0]
    safe_ids = ids.clamp(0, max(count - 1, 0))
    rl_rewards = rewards.float()
    highest = rl_rewards.new_full((count,), float("-inf")).scatter_reduce(
        0, safe_ids, torch.where(is_rl, rl_rewards, float("-inf")), "amax")
    lowest = rl_rewards.new_full((count,), float("inf")).scatter_reduce(
        0, safe_ids, torch.where(is_rl, rl_rewards, float("inf")), "amin")
    device_counts = (_groups_with(is_rl, ids).sum(), _groups_with(is_sft, ids).sum(), is_rl.sum(), is_sft.sum(),
                     (mask & is_rl[:, None]).sum(), (mask & is_sft[:, None]).sum())
    return [checks.count(value) for value in device_counts] + [Count(mask.shape[-1]),
                                                               checks.count((highest > lowest).sum())]


def batch_totals(*, mask, route, rewards, group_index, cu_seqlens=None):
    """BatchTotals of one batch (the arguments as dypo_loss's, packed with ``cu_seqlens``); combine the parts' with
    BatchTotals.combine. One host sync (two packed)."""
    if cu_seqlens is not None:
        check_tensor("mask", mask, dims=(1,))
        packed = unpack(cu_seqlens, mask.shape[0], mask.device)
        mask = packed.pad(mask.bool(), False)
    checks = Checks()
    ids, _ = group_ids(route.shape[0], route.device, None, group_index, checks)
    is_rl, is_sft = _check_routes(route, ids, checks)
    counts = _count_totals(checks, mask, is_rl, is_sft, rewards, ids)
    checks.run()
    return BatchTotals(*(count.value for count in counts))


def _check_part(totals, here):
    """A ValueError naming batch_totals when a count of this batch ``here`` exceeds the whole batch's ``totals``."""
    if not isinstance(totals, BatchTotals):
        raise TypeError(f"batch_totals must be a BatchTotals, got {type(totals).__name__}")
    larger = [name for name, part, whole in zip(BatchTotals._fields, here, totals) if part > whole]
    if larger:
        raise ValueError(f"batch_totals {totals} counts less than this batch holds ({', '.join(larger)}: "
                         f"{here}); give the totals of a whole batch that contains this one")


def _part_weights(loss_type, mask, rows_of_part, sequence, token_in_part, totals=None, part="rl"):
    """Aggregation weights of the kept tokens of one part (its rows ``rows_of_part``), 0 on the other tokens;
    normalised over the whole batch of ``totals`` when given. Also each row's rank in the part (-1: outside)."""
    rank = torch.full((mask.shape[0],), -1, dtype=torch.long, device=mask.device)
    rank[rows_of_part] = torch.arange(rows_of_part.shape[0], device=mask.device)
    if not rows_of_part.numel():
        return torch.zeros(sequence.shape, dtype=torch.float32, device=mask.device), rank
    whole = {} if totals is None else dict(max_len=totals.max_length,
                                           num_sequences=getattr(totals, f"sequences_{part}"),
                                           num_tokens=getattr(totals, f"tokens_{part}"))
    weights = token_weights(loss_type, mask[rows_of_part], rank[sequence].clamp(min=0), **whole)
    return torch.where(token_in_part, weights, 0.0), rank


def metric_names(*args, alpha=0.5, **kwargs):
    """The keys of dypo_loss's metrics for these arguments."""
    return ["loss_sft", "loss_grpo", "loss_gal", "num_prompts_sft", "num_prompts_rl", "num_tokens_rl",
            *policy_metric_names(**kwargs), *(GAL_METRICS if alpha < 1 else ())]


@follows_autocast("hidden", "weight", "bias")
@traceable_loss(metric_names)
def dypo_loss(hidden, weight, targets, *, mask, route, rewards, group_index, advantages=None, old_logps=None,
              ref_logps=None, alpha=0.5, gamma=1.0, beta_gal=1.0, beta_kl=0.0, eps_low=0.2, eps_high=0.2,
              loss_type="grpo", bias=None, temperature=1.0, use_bias_correction_kl=False, entropy_coef=0.0,
              delta=None, sapo_temperature_pos=1.0, sapo_temperature_neg=1.05, vllm_is_ratio=None,
              importance_sampling_level="token", cu_seqlens=None, batch_totals=None, return_metrics=False,
              impl=None, chunk_bytes=None):
    """DYPO's objective (paper section 3, eq. 4) over a batch that mixes the rollouts of mid prompts and the teacher
    trajectories of hard prompts, in one sweep over the vocabulary.

        L = (P_hard * gamma * L_SFT + P_mid * (alpha * L_GRPO + (1 - alpha) * L_GAL - entropy_coef * H_RL))
            / (P_hard + P_mid)

    P_mid and P_hard count the groups (prompts) of ``group_index`` with RL and SFT rows. L_GRPO is fused_grpo_loss
    on the RL rows (advantages, clip range, k3 KL with ``beta_kl``, aggregation ``loss_type``; dr_grpo divides by
    T); L_SFT is -lp_t aggregated the same way over the SFT rows; L_GAL is gal_loss on the RL rows' sequence
    log-probs S_i = sum_t mask lp (minus the reference's when ``ref_logps`` is given), sharpness ``beta_gal``. For
    loss_type "grpo" and equal group sizes this is the mean over the routed prompts of each prompt's objective (the
    expectation over prompts of eq. 4). SKIP rows and masked tokens are dropped before the projection. A batch
    without RL or SFT rows gives 0 with zero gradients.

    Args:
        hidden: ``[B, T, D]`` fp32/bf16/fp16; weight ``[V, D]``; bias ``[V]`` or None; targets, mask ``[B, T]``.
        route: ``[B]`` integer Route values (SKIP, RL, SFT); a group may not hold both RL and SFT rows.
        rewards: ``[B]`` finite (GAL's pairs: R_s > R_f within a group; SFT and SKIP rows' values do not matter).
        group_index: ``[B]`` ids 0..G-1 of each row's prompt.
        advantages: ``[B]`` (read on RL rows); None computes them over the RL rows with group_advantages.
        old_logps: ``[B, T]`` sampling-policy log-probs; None means on-policy. ref_logps: ``[B, T]`` reference's.
        alpha in [0, 1]; gamma, beta_gal, beta_kl >= 0; eps_low in [0, 1), eps_high >= 0; loss_type as
        fused_grpo_loss (the variants "cispo", "sapo", "luspo" too: their objective on the RL rows, their
        aggregation on both parts); temperature > 0; use_bias_correction_kl: the KL term weighted by the ratio, as
        fused_grpo_loss. entropy_coef: the entropy bonus on the RL rows, H_RL aggregated as L_GRPO (not weighted by
        alpha); delta, sapo_temperature_pos / _neg, vllm_is_ratio (``[B, T]`` or ``[B, 1]``, read on RL rows),
        importance_sampling_level ("sequence": GSPO's one ratio per sequence): as fused_grpo_loss, for L_GRPO.
        Rewards, and old/ref log-probs where ``mask`` is set, must be finite; what lies outside the mask is not
        read.
        cu_seqlens: padding-free input (``[S + 1]`` offsets from 0 to N, flash-attn's convention): hidden ``[N, D]``,
            targets, mask, old_logps, ref_logps and vllm_is_ratio ``[N]``; route, rewards, group_index and
            advantages ``[S]``; dr_grpo's T is the longest sequence. One more host sync (the offsets).
        batch_totals: ``BatchTotals`` of a whole batch this one is a part of (whole groups; see batch_totals and
            BatchTotals.combine): every term is normalised over the whole batch (prompt shares, sequences, tokens,
            dr_grpo's width, GAL's groups), so the parts' losses, gradients and loss_* metrics add up to the whole
            batch's, for every loss_type. None: this batch is the whole.
        return_metrics: also return detached ``loss_sft``, ``loss_grpo``, ``loss_gal`` (unweighted parts; with
            ``batch_totals``, this part's shares of the whole batch's),
            ``num_prompts_sft``, ``num_prompts_rl``, ``num_tokens_rl``, fused_grpo_loss's token metrics over the RL
            tokens and, when alpha < 1, gal_loss's pair metrics (zeros for a batch without RL rows).
        impl, chunk_bytes: as fused_linear_logprobs ("chunked" or "fused"; the chunk budget).

    Returns:
        the fp32 scalar loss (and the metrics dict), differentiable in hidden, weight and bias.

    Sweeps: every term's logit gradient is g_t (onehot - softmax) / T, with GAL's g_t = c_i the per-sequence
    coefficient of gal_coefficients, which needs the current log-probs of i's whole group (docs/design.md, "GAL in
    the sweep"). The sweep takes the RL rows group by group, each chunk holding whole groups (then the SFT tokens)
    and computing its c_i from its own log-probs before forming its gradient: one sweep, 6NDV, whatever
    ``old_logps`` are. An RL group larger than 4 chunks' rows is swept ahead once without gradients (+2 r D V for
    its r tokens). Extra memory O(N*D + V*D + chunk_bytes). Two host syncs: the input checks read with every count
    the op sizes its work by (prompts, sequences, tokens, GAL groups), and the RL groups' sizes; none in the sweep.
    """
    if mask is None or group_index is None or rewards is None:
        raise ValueError("dypo_loss needs mask ([B, T]), rewards ([B]) and group_index ([B]); got None")
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {', '.join(map(repr, LOSS_TYPES))}; got {loss_type!r} (vespo's "
                         "sequence weights are fused_grpo_loss's only)")
    checks = Checks()
    packed, batch_size, targets, mask, per_token = sequence_inputs(
        hidden, weight, bias, targets, mask, cu_seqlens, checks, old_logps=old_logps, ref_logps=ref_logps,
        vllm_is_ratio=vllm_is_ratio)
    old_logps, ref_logps, vllm_is_ratio = (per_token[name] for name in ("old_logps", "ref_logps", "vllm_is_ratio"))
    device = hidden.device
    check_tensor("route", route, dims=(1,), integer=True)
    if route.shape[0] != batch_size or route.device != device:
        raise ValueError(f"route {tuple(route.shape)} on {route.device} must hold one value per sequence "
                         f"({batch_size}) on {device}")
    check_per_sequence(batch_size, device, checks, rewards=rewards, advantages=advantages)
    is_ratio = check_is_ratio(vllm_is_ratio, mask.bool(), checks)
    check_number("alpha", alpha, low=0, high=1)
    check_number("gamma", gamma, low=0)
    check_number("beta_gal", beta_gal, low=0)
    check_number("beta_kl", beta_kl, low=0)
    check_temperature(temperature)
    ids, _ = group_ids(batch_size, device, None, group_index, checks)
    is_rl, is_sft = _check_routes(route, ids, checks)
    counts = _count_totals(checks, mask, is_rl, is_sft, rewards, ids)
    checks.run()  # the one host sync of the checks, with every count the op sizes its work by
    here = BatchTotals(*(count.value for count in counts))
    if batch_totals is not None:
        _check_part(batch_totals, here)
    if not here.prompts_rl:
        beta_kl = 0.0  # the KL term sits on RL rows only: a batch without them needs no reference log-probs
    sapo_temperatures = (sapo_temperature_pos, sapo_temperature_neg)
    check_grpo_settings(beta_kl, eps_low, eps_high, loss_type, ref_logps, beta_name="beta_kl",
                        use_bias_correction_kl=use_bias_correction_kl, delta=delta,
                        sapo_temperatures=sapo_temperatures, entropy_coef=entropy_coef)
    sequence_level = check_importance_sampling_level(importance_sampling_level, loss_type)
    backend = select_backend(device)
    impl = select_impl(impl, backend, device)

    mask = mask.bool()
    rl_rows, sft_rows = positions_of(is_rl, here.sequences_rl), positions_of(is_sft, here.sequences_sft)
    rl_rows = rl_rows[torch.argsort(ids[rl_rows], stable=True)]  # each group's rows together
    rl_group = consecutive_group_ids(ids[rl_rows])
    whole = here if batch_totals is None else batch_totals
    prompts = max(whole.prompts_rl + whole.prompts_sft, 1)
    share_rl, share_sft = whole.prompts_rl / prompts, whole.prompts_sft / prompts
    gal_fraction = here.gal_groups / whole.gal_groups if whole.gal_groups else 1.0  # of the whole's GAL groups
    with_gal = share_rl * (1 - alpha) > 0 and rl_rows.numel() > 0  # GAL's metrics even where this part has no pair
    with_sequences = sequence_level and share_rl * alpha > 0 and rl_rows.numel() > 0  # GSPO's ratios
    planned = with_gal or with_sequences
    if planned:  # the RL rows in GAL's sweep order: whole groups (so whole sequences) per chunk
        layout = gal_layout(weight, device, backend, impl, chunk_bytes)
        plan = plan_gal(rl_rows, rl_group, mask[rl_rows].sum(-1), GROUP_GROWTH * layout[0])
        rl_rows, rl_group = plan.rows, plan.group
    rl_rewards = rewards[rl_rows].float()
    kept, sequence, kept_hidden, kept_targets = select_tokens(hidden, targets, mask, here.tokens_rl + here.tokens_sft,
                                                              torch.cat([rl_rows, sft_rows]), packed)
    token_rl, token_sft = is_rl[sequence], is_sft[sequence]
    rl_weights, rl_rank = _part_weights(loss_type, mask, rl_rows, sequence, token_rl, batch_totals, "rl")
    sft_weights, _ = _part_weights(loss_type, mask, sft_rows, sequence, token_sft, batch_totals, "sft")
    if advantages is None:
        rl_advantages = grouped_advantages(rl_rewards, rl_group, here.prompts_rl)
    else:
        rl_advantages = advantages.detach().float()[rl_rows]
    token_advantages = torch.zeros(sequence.shape, dtype=torch.float32, device=device)
    if rl_rows.numel():
        token_advantages = torch.where(token_rl, rl_advantages[rl_rank[sequence].clamp(min=0)], 0.0)
    kept_old = None if old_logps is None else torch.where(token_rl, old_logps.detach().float().reshape(-1)[kept], 0.0)
    kept_ref = None if ref_logps is None else torch.where(token_rl, ref_logps.detach().float().reshape(-1)[kept], 0.0)
    kept_is_ratio = None if is_ratio is None else is_ratio.reshape(-1)[kept]
    terms = TokenTerms(nll_weight=share_sft * gamma * sft_weights, old_logps=kept_old,
                       **policy_terms(loss_type, eps_low, eps_high, delta, sapo_temperatures))
    if entropy_coef:
        terms.entropy_weight = share_rl * entropy_coef * rl_weights
    sequence_terms = None
    if with_sequences:  # GSPO: the RL tokens come first, sequence by sequence, in the plan's order
        sequence_terms = SequenceTerms("gspo", plan.token_sequence(kept.shape[0]), kept_old,
                                       rl_weights if kept_is_ratio is None else rl_weights * kept_is_ratio,
                                       rl_advantages, plan.lengths.clamp(min=1).float(), eps_low=eps_low,
                                       eps_high=eps_high, delta=delta, scale=share_rl * alpha)
        if kept_ref is not None:
            sequence_terms.kl_weights, sequence_terms.ref_logps = beta_kl * rl_weights, kept_ref
            sequence_terms.kl_importance_weighted = use_bias_correction_kl
    else:
        terms.pg_weight, terms.advantages = share_rl * alpha * rl_weights, token_advantages
        terms.is_ratio = kept_is_ratio
        if kept_ref is not None:
            terms.ref_logps, terms.kl_weight = kept_ref, beta_kl * terms.pg_weight
            terms.kl_importance_weighted = use_bias_correction_kl
    gal = None
    if with_gal:
        ref_seq_logps = None if ref_logps is None else sequence_logprobs(ref_logps.detach()[rl_rows], mask[rl_rows],
                                                                         False)
        gal = GalTerms.of_plan(plan, kept.shape[0], rewards=rl_rewards, ref_seq_logps=ref_seq_logps, beta=beta_gal,
                               scale=share_rl * (1 - alpha) * gal_fraction)
    op_pass = LogprobPass(kept_targets, 1.0 / temperature, backend, terms=terms, gal=gal, sequence=sequence_terms)
    if planned:  # chunks of whole RL groups, then the SFT tokens: each computes its groups' coefficients
        sweep_ahead(op_pass, plan, kept_hidden, weight, bias, impl, chunk_bytes)
        chunks = gal_chunks(plan, layout, kept.shape[0])
    else:
        chunks = loss_chunks(op_pass, kept_hidden, weight, impl, chunk_bytes)
    loss = sweep_loss(kept_hidden, weight, bias, op_pass, chunks, impl)
    if not return_metrics:
        return loss
    if sequence_terms is not None:
        loss_grpo = sequence_terms.loss_and_metrics()[0].detach()
        grpo_metrics = sequence_metrics(op_pass, kept_old, kept_ref, use_bias_correction_kl)
    else:
        policy_loss = op_pass.parts.get("policy_loss", torch.zeros_like(op_pass.logps))
        if beta_kl > 0:
            policy_loss = policy_loss + beta_kl * op_pass.parts["kl"]
        loss_grpo = torch.where(token_rl, rl_weights * policy_loss, 0.0).sum()
        grpo_metrics = policy_metrics(op_pass, tokens=token_rl)
    metrics = {"loss_sft": -torch.where(token_sft, sft_weights * op_pass.logps, 0.0).sum(), "loss_grpo": loss_grpo,
               "loss_gal": torch.zeros((), device=device),
               "num_prompts_sft": here.prompts_sft, "num_prompts_rl": here.prompts_rl, "num_tokens_rl": token_rl.sum(),
               **grpo_metrics}
    if gal is not None:
        gal_value, gal_metrics = gal.loss_and_metrics()
        metrics.update(loss_gal=gal_value.detach() * gal_fraction, **gal_metrics)
    elif alpha < 1:
        metrics.update(no_pair_metrics(device))
    return loss, metrics
