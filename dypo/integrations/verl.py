"""DYPO inside verl: an advantage estimator and a policy loss registered in verl's registries under ``dypo``.

dypo-kernels declares this module as a ``verl.plugins`` entry point, so verl 0.9.1 loads it wherever it is imported
(driver and Ray workers) once dypo-kernels is installed; ``VERL_USE_EXTERNAL_MODULES=dypo.integrations.verl`` does
the same where entry points are switched off, and shows an import error that verl's plugin loader would hide. A
GRPO run switches to DYPO's mid-prompt objective with:

    algorithm.adv_estimator=dypo
    actor_rollout_ref.actor.policy_loss.loss_mode=dypo
    trainer.use_v1=False                       # the v1 trainer reorders rows by completion and length, always
    trainer.balance_batch=False                # keep each prompt's rollouts together
    actor_rollout_ref.actor.use_dynamic_bsz=False
    actor_rollout_ref.actor.shuffle=False      # verl's default
    actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=<a multiple of actor_rollout_ref.rollout.n>

What each part does:
- ``dypo_advantages`` (driver, on the batch as it goes to the actor): checks that each prompt's rows are one
  contiguous block of ``rollout.n`` rows, grades each group (success: reward > ``success_threshold``; the reward is
  the row's ``token_level_rewards`` sum, which holds the KL penalty if ``use_kl_in_reward``), routes it by DYPO's
  rule (dypo.routing), and gives the groups routed to RL (mid ones) their GRPO advantage (``group_advantages``:
  sample std, or none with ``algorithm.norm_adv_by_std_in_grpo=False``), easy and hard groups zero.
- ``dypo_policy_loss`` (actor, per micro-batch): alpha * verl's own ``vanilla`` loss (PPO clip, dual clip,
  rollout importance weights, ``loss_agg_mode``: exactly ``loss_mode=vanilla``) + (1 - alpha) * GAL (paper eq.
  14-15) over each block of ``rollout.n`` rows. verl hands a policy loss only token log-probs and advantages, so the
  groups are the blocks (the actor config's batching settings are checked), and a rollout's reward rank within its
  group is its advantage's rank (the GRPO advantage is increasing in the reward). Rows without response tokens
  (rejected by rollout correction) take no part in GAL. GAL is normalised like verl's sequence-mean losses: the sum
  of each group's mean pair loss over the mini-batch's groups (``global_batch_size / rollout.n``, times
  ``dp_size``), so micro-batches add up to the mini-batch's loss; with ``loss_agg_mode=seq-mean-token-mean``
  (GRPO's) alpha weighs the two terms per prompt as in the paper.
Other parameters: ``register(name, alpha=..., beta_gal=...)`` in a module of your own, loaded the same way.

Not covered by verl's registries, and so not done here: hard prompts' SFT on teacher solutions (verl has no hook
that puts teacher trajectories into the batch; they get no gradient, like easy ones) and the hidden-state fusion of
``dypo_loss`` (verl computes the token log-probs itself; its ``use_fused_kernels`` bounds that memory). GAL compares
the policy's own sequence log-probs (no reference term: verl does not pass reference log-probs to a policy loss).
Tested on CPU against verl 0.9.1 (tests/integrations/test_verl.py), not in a verl training run.

The log-probs themselves: with ``actor_rollout_ref.model.use_fused_kernels=True`` verl's FSDP models score tokens
with ``FusedLinearForPPO`` (``fused_kernel_options.impl_backend=torch``, the default, or ``liger``) or
``linear_cross_entropy`` (``triton``) on the last hidden states. ``patch_verl_log_probs()`` (in every process:
``DYPO_VERL_LOG_PROBS=1`` does it where this module is loaded) replaces both with ``dypo_log_probs_hook``, that is
``fused_linear_logprobs``: old, reference and current log-probs and entropies, no [tokens, vocab] logits
(tests/integrations/test_log_probs.py).
"""

import os

import torch
from verl.trainer.ppo.core_algos import (
    ADV_ESTIMATOR_REGISTRY,
    POLICY_LOSS_REGISTRY,
    compute_policy_loss_vanilla,
    register_adv_est,
    register_policy_loss,
)

from dypo.routing import routes_of
from dypo_kernels import Route, fused_linear_logprobs, gal_loss, group_advantages
from dypo_kernels.gal import groups_with_pairs, sequence_logprobs
from dypo_kernels.validation import check_number

REORDERED = ("GAL needs each prompt's rollouts in one block of rollout.n rows: set trainer.use_v1=False, "
             "trainer.balance_batch=False, actor_rollout_ref.actor.use_dynamic_bsz=False, actor.shuffle=False and a "
             "ppo_micro_batch_size_per_gpu that is a multiple of actor_rollout_ref.rollout.n")
_registered = {}


def group_size_of_blocks(index):
    """The group size n when the rows of each uid in ``index`` are one contiguous block of n rows, every group of
    the same size; otherwise a ValueError."""
    first_row = {}
    ids = [first_row.setdefault(uid, len(first_row)) for uid in index]
    if not ids:
        raise ValueError("dypo advantages: the batch is empty")
    size = len(ids) // len(first_row)
    if size * len(first_row) != len(ids) or any(group != row // size for row, group in enumerate(ids)):
        raise ValueError(f"dypo advantages: each prompt's rollouts must be one contiguous block of equal size; "
                         f"{REORDERED}")
    return size


def dypo_advantages(token_level_rewards, response_mask, index=None, config=None, *, epsilon=1e-6,
                    success_threshold=0.5, **unused):
    """verl advantage estimator: per-row GRPO advantages for mid groups, zero for easy and hard ones.

    Args:
        token_level_rewards: ``[B, T]``; a row's reward R_i is its sum (verl puts it on the last token).
        response_mask: ``[B, T]``.
        index: ``[B]`` uids of the rows' prompts (verl's ``uid``); each prompt's rows one contiguous block.
        config: verl's AlgoConfig; ``norm_adv_by_std_in_grpo=False`` gives Dr.GRPO's unscaled advantages.
        unused: what else verl passes to estimators (``reward_baselines``), which grading does not read.

    Returns:
        (advantages, returns), both ``[B, T]`` fp32: A_i broadcast over the response tokens, as verl's GRPO.
    """
    if index is None:
        raise ValueError("dypo advantages need verl's uid per row (index); got None")
    if token_level_rewards.dim() != 2 or response_mask.shape != token_level_rewards.shape:
        raise ValueError(f"token_level_rewards {tuple(token_level_rewards.shape)} and response_mask "
                         f"{tuple(response_mask.shape)} must both be [B, T]")
    if len(index) != token_level_rewards.shape[0]:
        raise ValueError(f"index holds {len(index)} uids for {token_level_rewards.shape[0]} rows")
    group_size = group_size_of_blocks(index)
    normalise = True if config is None else config.get("norm_adv_by_std_in_grpo", True)
    graded = group_advantages(token_level_rewards.float().sum(-1), group_size=group_size,
                              scale="group" if normalise else "none", eps=epsilon,
                              success_threshold=success_threshold)
    # verl has no hook for hard prompts' teacher solutions: only RL groups train
    is_rl = (routes_of(graded.grade) == Route.RL).repeat_interleave(group_size)
    advantages = torch.where(is_rl, graded.advantages, 0.0)[:, None] * response_mask
    return advantages, advantages


def sequence_advantages(advantages, response_mask):
    """Each row's advantage ``[B]`` (0 for a row without response tokens); a ValueError when a row's advantage
    varies over its tokens (a token-level estimator such as GAE)."""
    mask = response_mask.bool()
    first_token = mask.int().argmax(-1, keepdim=True)
    per_row = torch.where(mask.any(-1), advantages.gather(-1, first_token).squeeze(-1), 0.0)
    spread = torch.where(mask, (advantages - per_row[:, None]).abs(), 0.0).amax(-1) if mask.numel() else per_row
    if bool((spread > 1e-5 * (1 + per_row.abs())).any()):
        raise ValueError("loss_mode=dypo needs one advantage per sequence (algorithm.adv_estimator=dypo); the "
                         "advantages vary over a row's tokens")
    return per_row


def check_batching(config, batch_size):
    """The actor settings under which verl's micro-batches are whole blocks of rollout.n rows, in the order
    dypo_advantages checked."""
    if config is None or not isinstance(getattr(config, "rollout_n", None), int) or config.rollout_n < 1:
        raise ValueError("loss_mode=dypo needs verl's actor config with rollout_n (the group size)")
    micro_batch = getattr(config, "ppo_micro_batch_size_per_gpu", None)
    if getattr(config, "use_dynamic_bsz", False) or getattr(config, "shuffle", False) or \
            (micro_batch is not None and micro_batch % config.rollout_n) or batch_size % config.rollout_n:
        raise ValueError(f"loss_mode=dypo got a micro-batch of {batch_size} rows (use_dynamic_bsz="
                         f"{getattr(config, 'use_dynamic_bsz', None)}, shuffle={getattr(config, 'shuffle', None)}, "
                         f"ppo_micro_batch_size_per_gpu={micro_batch}, rollout.n={config.rollout_n}): {REORDERED}")


def dypo_policy_loss(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean", config=None,
                     rollout_is_weights=None, *, alpha=0.5, beta_gal=1.0, average_log_prob=False):
    """verl policy loss: alpha * verl's vanilla PPO-clip loss + (1 - alpha) * GAL over blocks of rollout.n rows.

        L_GAL = dp_size / G_global * sum over the micro-batch's groups g with a pair of mean_(s,f) -log sigmoid(
                beta_gal * (S_s - S_f)),   S_i = sum_t mask_i,t log_prob_i,t (mean with ``average_log_prob``),

    pairs (s, f) of one group, both with response tokens, with A_s > A_f; G_global = global_batch_size / rollout.n
    (the micro-batch's groups when verl gives no global batch size).

    Args:
        old_log_prob, log_prob, advantages, response_mask: ``[B, T]`` as verl passes them, each block of
            ``config.rollout_n`` rows one prompt's group (as dypo_advantages checked the batch).
        loss_agg_mode, config (verl's ActorConfig), rollout_is_weights: as for verl's vanilla loss.

    Returns:
        (loss, metrics): verl's vanilla metrics plus ``actor/gal_loss`` (the mean over this micro-batch's groups
        with pairs), ``actor/gal_pair_accuracy`` and ``actor/gal_groups``. Cost: O(B * T) beyond vanilla.
    """
    batch_size = log_prob.shape[0]
    check_batching(config, batch_size)
    group_size = config.rollout_n
    rewards = sequence_advantages(advantages, response_mask)
    grpo, metrics = compute_policy_loss_vanilla(old_log_prob, log_prob, advantages, response_mask,
                                                loss_agg_mode=loss_agg_mode, config=config,
                                                rollout_is_weights=rollout_is_weights)
    seq_logps = sequence_logprobs(log_prob, response_mask, average_log_prob)
    answered = response_mask.bool().any(-1).nonzero().squeeze(-1)
    group_index = torch.unique(answered // group_size, return_inverse=True)[1]
    gal_mean, gal_metrics = gal_loss(seq_logps[answered], rewards[answered], group_index=group_index, beta=beta_gal,
                                     return_metrics=True)
    pair_groups = groups_with_pairs(rewards[answered], answered // group_size)
    batch_info = getattr(config, "global_batch_info", None) or {}
    dp_size, global_batch_size = batch_info.get("dp_size", 1), batch_info.get("global_batch_size")
    if global_batch_size is None:
        if dp_size > 1:
            raise ValueError("loss_mode=dypo needs global_batch_size in the actor config's global_batch_info when "
                             "dp_size > 1")
        global_batch_size = batch_size
    gal = gal_mean * pair_groups * group_size / global_batch_size * dp_size
    metrics.update({"actor/gal_loss": gal_mean.item(), "actor/gal_pair_accuracy": gal_metrics["pair_accuracy"].item(),
                    "actor/gal_groups": pair_groups})
    return alpha * grpo + (1 - alpha) * gal, metrics


def register(name="dypo", *, alpha=0.5, beta_gal=1.0, average_log_prob=False, success_threshold=0.5):
    """Register ``dypo_policy_loss`` (verl ``policy_loss.loss_mode=name``) and ``dypo_advantages``
    (``algorithm.adv_estimator=name``) with these settings. Registering a name again with the same settings does
    nothing; with other settings, or a name verl already uses, is a ValueError."""
    check_number("alpha", alpha, low=0, high=1)
    check_number("beta_gal", beta_gal, low=0)
    check_number("success_threshold", success_threshold)
    settings = dict(alpha=alpha, beta_gal=beta_gal, average_log_prob=bool(average_log_prob),
                    success_threshold=success_threshold)
    if name in _registered:
        if _registered[name] != settings:
            raise ValueError(f"verl loss {name!r} is already registered with {_registered[name]}; pick another name")
        return
    if name in POLICY_LOSS_REGISTRY or name in ADV_ESTIMATOR_REGISTRY:
        raise ValueError(f"verl already has a policy loss or advantage estimator named {name!r}")

    def policy_loss(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean", config=None,
                    rollout_is_weights=None):
        return dypo_policy_loss(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
                                rollout_is_weights, alpha=alpha, beta_gal=beta_gal,
                                average_log_prob=settings["average_log_prob"])

    def advantages(token_level_rewards, response_mask, index=None, config=None, **unused):
        return dypo_advantages(token_level_rewards, response_mask, index, config,
                               success_threshold=success_threshold)

    register_policy_loss(name)(policy_loss)
    register_adv_est(name)(advantages)
    _registered[name] = settings


# verl's fused-kernel log-prob path ------------------------------------------------------------------------------
def dypo_log_probs_hook(hidden_states, vocab_weights, input_ids, temperature=1.0):
    """verl's fused-kernel log-probs, ``FusedLinearForPPO.forward(hidden_states, vocab_weights, input_ids,
    temperature)``, from ``fused_linear_logprobs``: the same values and return value, without the [tokens, vocab]
    logits that verl's torch backend builds chunk by chunk (512 rows each, with their fp32 softmax).

    Args:
        hidden_states: ``[N, D]`` or ``[B, N, D]`` last hidden states (verl passes ``[1, nnz, D]``, or ``[B, S, D]``
            without padding removal).
        vocab_weights: ``[V, D]`` the lm_head weight.
        input_ids: ``hidden_states.shape[:-1]`` next-token ids (verl's rolled labels); -100 positions give 0.
        temperature: a number; the logits are divided by it (verl's fused path takes no per-row temperatures).

    Returns:
        ``(log_probs, entropy)`` shaped like ``input_ids``: log_probs float32, entropy in ``hidden_states``' dtype,
        as verl's torch backend returns them.

    Differentiable in hidden_states and vocab_weights (verl's actor update calls it with gradients): forward 2NDV
    FLOP (all there is under no_grad: the old and reference log-probs), backward 6NDV; extra memory
    O(N*D + V*D + chunk), never N x V.
    """
    if input_ids.shape != hidden_states.shape[:-1]:
        raise ValueError(f"input_ids {tuple(input_ids.shape)} must be hidden_states' leading shape "
                         f"{tuple(hidden_states.shape[:-1])}")
    log_probs, entropy = fused_linear_logprobs(hidden_states, vocab_weights, input_ids.long(),
                                               temperature=float(temperature), return_entropy=True)
    return log_probs, entropy.to(hidden_states.dtype)


class DYPOFusedLinearForPPO(torch.nn.Module):
    """Stands in for verl's ``verl.utils.experimental.torch_functional.FusedLinearForPPO``: its forward is
    ``dypo_log_probs_hook``. ``chunk_size`` and ``impl_backend`` are accepted and unused (the op chunks by bytes)."""

    def __init__(self, chunk_size=512, impl_backend="torch"):
        super().__init__()
        self.chunk_size, self.impl_backend = chunk_size, impl_backend

    def forward(self, hidden_states, vocab_weights, input_ids, temperature=1.0):
        return dypo_log_probs_hook(hidden_states, vocab_weights, input_ids, temperature)


def dypo_linear_cross_entropy(hidden, weight, labels, temperature=1.0, reduction="none", dist_process_group=None):
    """Stands in for verl's ``verl.utils.kernel.linear_cross_entropy.linear_cross_entropy`` (the ``triton``
    backend): flat ``[N]`` float32 log-probs and entropies of ``labels`` under ``hidden @ weight.T / temperature``,
    as verl's kernel returns them with ``reduction="none"``. verl's own kernel runs where the hook cannot honour
    the call: another ``reduction``, or a vocabulary split over a process group of more than one rank (Megatron's
    tensor parallelism)."""
    split = dist_process_group is not None and torch.distributed.is_initialized() and \
        torch.distributed.get_world_size(dist_process_group) > 1
    if split or str(reduction).lower() != "none":
        from verl.utils.kernel.linear_cross_entropy import LinearCrossEntropy

        return LinearCrossEntropy.apply(hidden, weight, labels, temperature, reduction, dist_process_group)
    log_probs, entropy = fused_linear_logprobs(hidden.reshape(-1, hidden.shape[-1]), weight, labels.reshape(-1).long(),
                                               temperature=float(temperature), return_entropy=True)
    return log_probs, entropy


_verl_originals = {}


def patch_verl_log_probs():
    """Install the hook in this process: verl's ``FusedLinearForPPO`` (use_fused_kernels with impl_backend torch or
    liger) becomes ``DYPOFusedLinearForPPO`` and its ``linear_cross_entropy`` (impl_backend triton) becomes
    ``dypo_linear_cross_entropy``. verl's HF-model forwards (verl.models.transformers) look both up at each call, so
    the patch takes effect for models already built. Patching twice does nothing; ``unpatch_verl_log_probs`` undoes
    it. verl's Megatron forwards bind ``linear_cross_entropy`` when imported: not covered."""
    from verl.utils.experimental import torch_functional
    from verl.utils.kernel import linear_cross_entropy

    if _verl_originals:
        return
    _verl_originals.update(FusedLinearForPPO=torch_functional.FusedLinearForPPO,
                           linear_cross_entropy=linear_cross_entropy.linear_cross_entropy)
    torch_functional.FusedLinearForPPO = DYPOFusedLinearForPPO
    linear_cross_entropy.linear_cross_entropy = dypo_linear_cross_entropy


def unpatch_verl_log_probs():
    """Give verl back its own fused log-prob functions (after ``patch_verl_log_probs``; else nothing)."""
    from verl.utils.experimental import torch_functional
    from verl.utils.kernel import linear_cross_entropy

    if _verl_originals:
        torch_functional.FusedLinearForPPO = _verl_originals.pop("FusedLinearForPPO")
        linear_cross_entropy.linear_cross_entropy = _verl_originals.pop("linear_cross_entropy")


register()
if os.environ.get("DYPO_VERL_LOG_PROBS", "0") not in ("", "0"):  # verl loads this module in each of its processes
    patch_verl_log_probs()
