"""The verl adapter against verl 0.9.1 itself: the entry point registers it, verl's compute_advantage and ppo_loss
call it, and its values and gradients match a float64 reference. `make test` installs verl without its
dependency pins (it pins transformers < 5.11; the registries and losses tested here run on ours)."""

import importlib.util
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

if importlib.util.find_spec("verl") is None:  # a verl that is there but fails to import fails these tests
    pytest.skip("verl is installed by `make test` (Makefile), not by the test extra", allow_module_level=True)
from tensordict import TensorDict  # noqa: E402
from verl import DataProto  # noqa: E402
from verl.trainer.config import AlgoConfig  # noqa: E402
from verl.trainer.ppo.core_algos import (
    compute_grpo_outcome_advantage,
    compute_policy_loss_vanilla,
    get_adv_estimator_fn,  # noqa: E402
    get_policy_loss_fn,
)
from verl.trainer.ppo.ray_trainer import compute_advantage  # noqa: E402
from verl.utils import tensordict_utils as tu  # noqa: E402
from verl.workers.config import FSDPActorConfig  # noqa: E402
from verl.workers.config.actor import PolicyLossConfig  # noqa: E402
from verl.workers.utils.losses import ppo_loss  # noqa: E402

from dypo.integrations import verl as adapter  # noqa: E402

AGG_MODES = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"]


def actor_config(group_size, loss_mode="dypo", loss_agg_mode="token-mean", **settings):
    settings = {"ppo_micro_batch_size_per_gpu": group_size, **settings}
    return FSDPActorConfig(strategy="fsdp", rollout_n=group_size, ppo_mini_batch_size=2, loss_agg_mode=loss_agg_mode,
                           policy_loss=PolicyLossConfig(loss_mode=loss_mode), **settings)


def rollouts(num_groups, group_size, length, seed, binary=True):
    """Rewards with easy, hard and mid groups, uids in contiguous blocks, response masks of random lengths >= 1."""
    generator = torch.Generator().manual_seed(seed)
    rewards = (torch.rand(num_groups, group_size, generator=generator) < 0.5).float() if binary else \
        torch.rand(num_groups, group_size, generator=generator)
    rewards[0] = 1.0 if binary else 0.6 + 0.4 * torch.rand(group_size, generator=generator)
    rewards[1] = 0.0 if binary else 0.4 * torch.rand(group_size, generator=generator)
    rewards[2, 0], rewards[2, 1:] = 1.0, 0.0
    lengths = torch.randint(1, length + 1, (num_groups * group_size,), generator=generator)
    mask = (torch.arange(length)[None] < lengths[:, None]).float()
    token_rewards = torch.zeros(num_groups * group_size, length)
    token_rewards[torch.arange(len(lengths)), lengths - 1] = rewards.flatten()
    uids = np.array([f"prompt-{g}" for g in range(num_groups) for _ in range(group_size)], dtype=object)
    log_prob = -torch.rand(num_groups * group_size, length, generator=generator) * 3
    old_log_prob = log_prob + 0.3 * torch.randn(log_prob.shape, generator=generator)
    return rewards.flatten(), token_rewards, mask, uids, log_prob, old_log_prob


def reference_advantages(rewards, group_size, normalise, threshold=0.5):
    rewards = rewards.double().view(-1, group_size)
    success = (rewards > threshold).sum(-1)
    is_mid = (success > 0) & (success < group_size)
    centred = rewards - rewards.mean(-1, keepdim=True)
    scaled = centred / (rewards.std(-1, keepdim=True) + 1e-6) if normalise else centred
    return torch.where(is_mid[:, None], scaled, 0.0).flatten()


def reference_gal(log_prob, mask, rewards, group_size, groups_in_batch, beta=1.0):
    """sum over groups of the mean pair loss -log sigmoid(beta (S_s - S_f)) over rows with response tokens, divided
    by groups_in_batch, float64."""
    seq_logps = (log_prob.double() * mask).sum(-1)
    total = seq_logps.new_zeros(())
    for g in range(len(rewards) // group_size):
        rows = [i for i in range(g * group_size, (g + 1) * group_size) if mask[i].any()]
        pairs = [(s, f) for s in rows for f in rows if rewards[s] > rewards[f]]
        if pairs:
            total = total + sum(-torch.nn.functional.logsigmoid(beta * (seq_logps[s] - seq_logps[f]))
                                for s, f in pairs) / len(pairs)
    return total / groups_in_batch


def test_importing_verl_registers_dypo_through_the_entry_point():
    script = ("import verl\nfrom verl.trainer.ppo.core_algos import get_policy_loss_fn, get_adv_estimator_fn\n"
              "print(get_policy_loss_fn('dypo').__module__, get_adv_estimator_fn('dypo').__module__)")
    printed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert printed.split() == ["dypo.integrations.verl", "dypo.integrations.verl"]


@pytest.mark.parametrize("group_size", [2, 4, 8])
@pytest.mark.parametrize("normalise", [True, False])
@pytest.mark.parametrize("binary", [True, False])
def test_compute_advantage_grades_and_matches_the_reference(group_size, normalise, binary):
    rewards, token_rewards, mask, uids, _, _ = rollouts(6, group_size, 7, seed=group_size, binary=binary)
    data = DataProto.from_dict(tensors={"token_level_rewards": token_rewards, "response_mask": mask},
                               non_tensors={"uid": uids})
    config = AlgoConfig(adv_estimator="dypo", norm_adv_by_std_in_grpo=normalise)
    advantages = compute_advantage(data, "dypo", norm_adv_by_std_in_grpo=normalise, config=config).batch["advantages"]
    expected = reference_advantages(rewards, group_size, normalise)
    torch.testing.assert_close(advantages.double(), expected[:, None] * mask, rtol=1e-5, atol=1e-5)
    assert advantages[: 2 * group_size].abs().sum() == 0  # the easy and the hard group
    verl_grpo, _ = compute_grpo_outcome_advantage(token_rewards, mask, uids, norm_adv_by_std_in_grpo=normalise)
    is_mid = expected != 0
    torch.testing.assert_close(advantages[is_mid], verl_grpo[is_mid], rtol=1e-5, atol=1e-5)


def test_advantages_refuse_rollouts_that_verl_reordered():
    _, token_rewards, mask, uids, _, _ = rollouts(4, 4, 5, seed=0)
    estimator = get_adv_estimator_fn("dypo")
    order = torch.randperm(len(uids), generator=torch.Generator().manual_seed(1))
    with pytest.raises(ValueError, match="balance_batch=False"):
        estimator(token_rewards[order], mask[order], index=uids[order.numpy()])
    with pytest.raises(ValueError, match="balance_batch=False"):
        estimator(token_rewards[:-1], mask[:-1], index=uids[:-1])
    with pytest.raises(ValueError, match="uid"):
        estimator(token_rewards, mask)


@pytest.mark.parametrize("loss_agg_mode", AGG_MODES)
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_policy_loss_is_alpha_vanilla_plus_gal_in_value_and_gradient(loss_agg_mode, alpha):
    group_size = 4
    rewards, _, mask, _, log_prob, old_log_prob = rollouts(5, group_size, 6, seed=3)
    mask[2 * group_size + 1] = 0  # a failed rollout of mid group 2 that rollout correction rejected
    advantages = reference_advantages(rewards, group_size, True).float()[:, None] * mask
    config = actor_config(group_size, loss_agg_mode=loss_agg_mode)

    log_prob = log_prob.requires_grad_()
    loss, metrics = adapter.dypo_policy_loss(old_log_prob, log_prob, advantages, mask, loss_agg_mode, config,
                                             alpha=alpha)
    (gradient,) = torch.autograd.grad(loss, log_prob)

    reference_log_prob = log_prob.detach().double().requires_grad_()
    vanilla, _ = compute_policy_loss_vanilla(old_log_prob.double(), reference_log_prob, advantages.double(),
                                             mask, loss_agg_mode=loss_agg_mode, config=config)
    expected = alpha * vanilla + (1 - alpha) * reference_gal(reference_log_prob, mask, rewards, group_size,
                                                             len(rewards) / group_size)
    (expected_gradient,) = torch.autograd.grad(expected, reference_log_prob)
    torch.testing.assert_close(loss.double(), expected.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gradient.double(), expected_gradient, rtol=1e-4, atol=1e-6)
    assert metrics["actor/gal_groups"] == sum(0 < r.sum() < group_size for r in rewards.view(-1, group_size))
    assert log_prob.grad is None and gradient[2 * group_size + 1].abs().sum() == 0
    assert math.isfinite(metrics["actor/gal_loss"]) and "actor/pg_clipfrac" in metrics


@pytest.mark.parametrize("loss_agg_mode", AGG_MODES)
def test_micro_batches_add_up_to_the_mini_batch(loss_agg_mode):
    """verl accumulates micro-batch losses normalised by the global batch: their sum must be the whole batch's."""
    group_size = 4
    rewards, _, mask, _, log_prob, old_log_prob = rollouts(6, group_size, 6, seed=4)
    advantages = reference_advantages(rewards, group_size, True).float()[:, None] * mask
    config = actor_config(group_size, loss_agg_mode=loss_agg_mode)
    config.global_batch_info.update(dp_size=1, batch_num_tokens=int(mask.sum()), global_batch_size=len(rewards))
    whole, _ = adapter.dypo_policy_loss(old_log_prob, log_prob, advantages, mask, loss_agg_mode, config)
    parts = [adapter.dypo_policy_loss(old_log_prob[rows], log_prob[rows], advantages[rows], mask[rows],
                                      loss_agg_mode, config)[0]
             for rows in torch.arange(len(rewards)).split(2 * group_size)]
    torch.testing.assert_close(sum(parts), whole, rtol=1e-5, atol=1e-6)


def test_verl_ppo_loss_calls_the_registered_loss():
    """verl's actor loss (ppo_loss) on a TensorDict micro-batch, as its engine passes it, with loss_mode=dypo."""
    group_size = 4
    rewards, _, mask, _, log_prob, old_log_prob = rollouts(3, group_size, 5, seed=5)
    advantages = reference_advantages(rewards, group_size, True).float()[:, None] * mask
    rows, length = mask.shape
    prompt = torch.ones(rows, 1, dtype=torch.long)
    lengths = mask.sum(-1).long()
    flat = torch.cat([torch.cat([log_prob[i, :lengths[i]], torch.zeros(1)]) for i in range(rows)])
    data = TensorDict({"prompts": prompt, "responses": torch.ones(rows, length, dtype=torch.long),
                       "attention_mask": torch.cat([torch.ones(rows, 1), mask], 1).long(),
                       "response_mask": mask, "old_log_probs": old_log_prob, "advantages": advantages},
                      batch_size=rows)
    tu.assign_non_tensor(data, dp_size=1, batch_num_tokens=int(mask.sum()), global_batch_size=rows)
    config = actor_config(group_size)
    loss, metrics = ppo_loss(config, {"log_probs": flat}, data)
    direct, _ = get_policy_loss_fn("dypo")(old_log_prob, log_prob * mask, advantages, mask.bool(),
                                           "token-mean", config)
    torch.testing.assert_close(loss, direct)
    assert "actor/gal_loss" in metrics


@pytest.mark.parametrize("setting, value", [("use_dynamic_bsz", True), ("shuffle", True),
                                            ("ppo_micro_batch_size_per_gpu", 6)])
def test_policy_loss_refuses_batching_that_splits_groups(setting, value):
    group_size = 4
    rewards, _, mask, _, log_prob, old_log_prob = rollouts(4, group_size, 5, seed=6)
    advantages = reference_advantages(rewards, group_size, True).float()[:, None] * mask
    config = actor_config(group_size)
    with pytest.raises(ValueError, match="use_v1=False"):
        adapter.dypo_policy_loss(old_log_prob[:6], log_prob[:6], advantages[:6], mask[:6], "token-mean", config)
    with pytest.raises(ValueError, match=f"{setting}={value}"):
        adapter.dypo_policy_loss(old_log_prob, log_prob, advantages, mask, "token-mean",
                                 actor_config(group_size, **{setting: value}))


def test_policy_loss_refuses_token_level_advantages():
    group_size = 4
    rewards, _, mask, _, log_prob, old_log_prob = rollouts(4, group_size, 5, seed=6)
    advantages = reference_advantages(rewards, group_size, True).float()[:, None] * mask
    with pytest.raises(ValueError, match="one advantage per sequence"):
        adapter.dypo_policy_loss(old_log_prob, log_prob, advantages * torch.rand(advantages.shape), mask,
                                 "token-mean", actor_config(group_size))


def test_register_names_and_settings():
    adapter.register("dypo")  # the same settings again: nothing happens
    with pytest.raises(ValueError, match="already registered"):
        adapter.register("dypo", alpha=0.3)
    with pytest.raises(ValueError, match="already has"):
        adapter.register("vanilla")
    with pytest.raises(ValueError, match="alpha"):
        adapter.register("dypo_alpha_two", alpha=2.0)
    adapter.register("dypo_grpo_only", alpha=1.0)
    group_size = 4
    rewards, _, mask, _, log_prob, old_log_prob = rollouts(3, group_size, 5, seed=7)
    advantages = reference_advantages(rewards, group_size, True).float()[:, None] * mask
    config = actor_config(group_size)
    loss, _ = get_policy_loss_fn("dypo_grpo_only")(old_log_prob, log_prob, advantages, mask, "token-mean", config)
    vanilla, _ = compute_policy_loss_vanilla(old_log_prob, log_prob, advantages, mask, config=config)
    torch.testing.assert_close(loss, vanilla)
