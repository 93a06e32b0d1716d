"""The comparison's strategies and settings: luffy's mixed groups and loss (against a float64 reference with full
logits, values and gradients), sft_rl's two queues, num_teachers, the offline ratio of each."""

import math

import pytest
import torch

from dypo.batches import loss_batch
from dypo.config import Config
from dypo.routing import offline_share, route_groups
from dypo_kernels import Grade, Route
from tests.trainer.test_train import PROBLEMS, forced_trainer


def test_new_strategies_route_every_group_to_rl_as_plain_grpo():
    grades = [Grade.EASY, Grade.MID, Grade.HARD]
    assert route_groups(grades, "sft_rl", 0, Config(alpha=0.3)) == ([Route.RL] * 3, 1.0)
    assert route_groups(grades, "luffy", 0, Config(alpha=0.3)) == ([Route.SKIP, Route.RL, Route.RL], 1.0)
    assert [offline_share(route, strategy, 8) for route, strategy in
            [(Route.SFT, "dypo"), (Route.RL, "dypo"), (Route.RL, "luffy"), (Route.RL, "sft_rl")]] == [1, 0, 1 / 8, 0.5]


def test_luffy_puts_a_scored_teacher_trajectory_in_each_trained_group(monkeypatch):
    trainer = forced_trainer(monkeypatch, strategy="luffy", train_batch_size=8)
    metrics, _ = trainer.train_step(0)
    groups = trainer.queues.groups[Route.RL]
    assert len(groups) == 2 and not trainer.queues.groups[Route.SFT]  # the easy prompt is dropped
    mid, hard = groups
    for group, problem in ((mid, PROBLEMS[1]), (hard, PROBLEMS[2])):
        *own, teacher = group.rows
        assert teacher.off_policy and teacher.reward == 1.0 and not any(row.off_policy for row in own)
        assert trainer.codec.text(teacher.ids[teacher.prompt_length:]) in problem.teacher_solutions
        rewards = torch.tensor([row.reward for row in group.rows])
        expected = (rewards - rewards.mean()) / rewards.std()
        assert [row.advantage for row in group.rows] == pytest.approx(expected.tolist(), abs=1e-3)
    assert [row.reward for row in hard.rows] == [0.0, 0.0, 0.0, 1.0]  # all its own rollouts failed
    assert metrics["offline_ratio"] == pytest.approx(1 / 4)  # one teacher row of 4 in each trained group
    batch = loss_batch(groups, trainer.codec.pad_id, torch.device("cpu"))
    assert batch["off_policy"].tolist() == [3, 7] and batch["route"].tolist() == [Route.RL] * 3 + [Route.SKIP] + \
        [Route.RL] * 3 + [Route.SKIP]


def reference_luffy(hidden, weight, bias, batch, config):
    """LUFFY's loss in float64 from full logits: the clipped GRPO surrogate on the rollouts (ratio to old_logps),
    -A p / (p + gamma) on the teacher tokens, aggregated over all rows as loss_type says."""
    logits = (hidden.double() @ weight.double().T + bias.double()) / config.temperature
    logps = logits.log_softmax(-1).gather(-1, batch["targets"].unsqueeze(-1)).squeeze(-1)
    mask, advantages = batch["mask"], batch["advantages"].double()[:, None]
    off = torch.zeros(len(mask), dtype=torch.bool)
    off[batch["off_policy"]] = True
    ratio = (logps - batch["old_logps"].double()).exp()
    clipped = ratio.clamp(1 - config.epsilon, 1 + config.epsilon_high)
    on_terms = -torch.minimum(ratio * advantages, clipped * advantages)
    off_terms = -advantages * logps.exp() / (logps.exp() + config.luffy_gamma)
    terms = torch.where(off[:, None], off_terms, on_terms) * mask
    if config.loss_type == "grpo":
        return (terms.sum(1) / mask.sum(1)).mean()
    return terms.sum() / mask.sum()


@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
def test_luffy_loss_and_gradients_match_the_float64_reference(monkeypatch, loss_type):
    trainer = forced_trainer(monkeypatch, strategy="luffy", train_batch_size=8, loss_type=loss_type, bf16="false")
    trainer.train_step(0)
    groups = trainer.queues.groups[Route.RL]
    for group in groups:  # a policy that has moved since the rollouts: ratios away from 1, some clipped
        for row in group.rows:
            if row.old_logps:
                row.old_logps = [v + 0.3 * (-1) ** i for i, v in enumerate(row.old_logps)]
    batch = trainer.batch(groups)
    parameters = list(trainer.model.parameters())
    loss = trainer.loss(batch, 1.0)[0]
    grads = torch.autograd.grad(loss, parameters, allow_unused=True)
    bias = torch.zeros(trainer.model.lm_head.weight.shape[0])
    expected = trainer.policy(batch["ids"], batch["attention"], lambda hidden, weight, b: reference_luffy(
        hidden, weight, b if b is not None else bias, batch, trainer.config))
    expected_grads = torch.autograd.grad(expected, parameters, allow_unused=True)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-6)
    for got, want in zip(grads, expected_grads):
        if want is not None:
            assert torch.allclose(got.double(), want.double(), rtol=1e-4, atol=1e-6)


def test_sft_rl_trains_every_prompt_by_sft_and_rl(monkeypatch):
    trainer = forced_trainer(monkeypatch, strategy="sft_rl", train_batch_size=12)
    metrics, _ = trainer.train_step(0)
    sft, rl = trainer.queues.groups[Route.SFT], trainer.queues.groups[Route.RL]
    assert len(sft) == len(rl) == 3 and all(len(g.rows) == 1 for g in sft) and all(len(g.rows) == 4 for g in rl)
    assert metrics["offline_ratio"] == 0.5


def test_num_teachers_keeps_the_first_teachers_solutions(monkeypatch):
    trainer = forced_trainer(monkeypatch, train_batch_size=8, sft_teachers="all", num_teachers=1)
    trainer.train_step(0)
    (hard,) = trainer.queues.groups[Route.SFT]
    assert [trainer.codec.text(row.ids[row.prompt_length:]) for row in hard.rows] == ["6"]


@pytest.mark.parametrize("options,message", [
    ({"strategy": "luffy", "loss_type": "cispo"}, "strategy luffy aggregates"),
    ({"strategy": "luffy", "micro_batch_size": 2}, "strategy luffy takes each update whole"),
    ({"strategy": "luffy", "num_generations": 1}, "it needs at least 2"),
    ({"luffy_gamma": 0.0}, "luffy_gamma must be positive"),
    ({"init": "pretrained"}, "init must be one of base, random"),
    ({"num_teachers": -1}, "num_teachers must be >= 0"),
    ({"ood_data": ("x.jsonl",)}, "ood_data needs data"),
])
def test_bad_strategy_settings_are_refused(options, message):
    from dypo.config import _check

    def fail(text):
        raise ValueError(text)

    with pytest.raises(ValueError, match=message):
        _check(Config(**options), fail)
    assert math.isfinite(Config().luffy_gamma)
