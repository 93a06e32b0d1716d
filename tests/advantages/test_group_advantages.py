import pytest
import torch

from dypo_kernels import Grade, group_advantages, reference
from tests.conftest import relative_error


def binary_and_graded_rewards(num_groups, size, generator):
    """Groups that are all-fail, all-success and mixed, plus non-binary rewards in the last group."""
    rewards = (torch.rand(num_groups, size, generator=generator) > 0.5).float()
    rewards[0] = 0.0
    rewards[1] = 1.0
    rewards[-1] = torch.rand(size, generator=generator)
    return rewards.view(-1)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("num_groups,size", [(5, 8), (3, 1), (2, 300)])  # 300 rows cross the kernel's block
def test_uniform_groups_match_reference(backend, scale, num_groups, size):
    rewards = binary_and_graded_rewards(num_groups, size, torch.Generator().manual_seed(size)).to(backend)
    out = group_advantages(rewards, group_size=size, scale=scale)
    expected = reference.group_advantages(rewards, group_size=size, scale=scale)
    assert out.advantages.dtype == torch.float32
    for name in ("advantages", "mean", "std"):
        actual, ref = getattr(out, name), getattr(expected, name)
        assert relative_error(actual, ref) < 1e-6 or (ref.abs().max() == 0 and actual.abs().max() == 0), name
    assert torch.equal(out.num_success.cpu(), expected.num_success.cpu())
    assert torch.equal(out.grade.cpu(), expected.grade.cpu())
    if size > 1 and num_groups > 2:
        assert out.grade[0] == Grade.HARD and out.grade[1] == Grade.EASY


def test_ragged_groups_in_any_order_match_reference(backend):
    generator = torch.Generator().manual_seed(3)
    sizes = torch.tensor([1, 4, 7, 2, 150])
    group_index = torch.repeat_interleave(torch.arange(5), sizes)
    group_index = group_index[torch.randperm(group_index.numel(), generator=generator)].to(backend)
    rewards = torch.rand(group_index.numel(), generator=generator).to(backend)
    out = group_advantages(rewards, group_index=group_index, success_threshold=0.3)
    expected = reference.group_advantages(rewards, group_index=group_index, success_threshold=0.3)
    assert relative_error(out.advantages, expected.advantages) < 1e-6
    assert relative_error(out.std, expected.std) < 1e-6
    assert torch.equal(out.grade.cpu(), expected.grade.cpu())
    assert out.advantages[group_index == 0].item() == 0  # a group of one: advantage 0


@pytest.mark.parametrize("kwargs,match", [
    (dict(rewards=torch.tensor([1.0, float("nan")]), group_size=2), "rewards"),
    (dict(rewards=torch.tensor([1.0, float("inf")]), group_size=2), "rewards"),
    (dict(rewards=torch.ones(6), group_size=4), "group_size"),
    (dict(rewards=torch.ones(4), group_index=torch.tensor([0, 0, 2, 2])), "group_index"),
    (dict(rewards=torch.ones(4), group_index=torch.tensor([0, -1, 1, 1])), "group_index"),
    (dict(rewards=torch.ones(4), group_index=torch.tensor([0, 1])), "group_index"),
    (dict(rewards=torch.ones(4)), "group_size"),
    (dict(rewards=torch.ones(4), group_size=2, scale="rank"), "'group', 'batch', 'none'"),
    (dict(rewards=torch.ones(4, dtype=torch.long), group_size=2), "rewards"),
])
def test_bad_input_raises_naming_the_argument(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        group_advantages(**kwargs)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("dtype,magnitude", [(torch.float32, 1e30), (torch.float32, 1e-30), (torch.float64, 1e39),
                                             (torch.float64, 1e-300)])
def test_finite_rewards_of_any_magnitude_give_finite_advantages(backend, scale, dtype, magnitude):
    """Squares of 1e30 overflow fp32, and fp64 rewards of 1e39 do not fit fp32 at all: the statistics are taken in
    units of each group's largest |reward|."""
    rewards = (torch.tensor([1.0, -1.0, 0.0, 0.0, 3.0, 1.0, 2.0, 2.0], dtype=torch.float64) * magnitude).to(dtype)
    out = group_advantages(rewards.to(backend), group_size=4, scale=scale)
    expected = reference.group_advantages(rewards, group_size=4, scale=scale)
    if expected.advantages.abs().max() < torch.finfo(torch.float32).max:  # not so with "none" at 1e39
        assert torch.isfinite(out.advantages).all()
        assert relative_error(out.advantages, expected.advantages) < 1e-6
    if scale == "group" and magnitude > 1:  # (±1, 0, 0) / sample std sqrt(2/3): eps does not count
        assert torch.allclose(out.advantages[:2].cpu(), torch.tensor([1.2247449, -1.2247449]), atol=1e-6)


@pytest.mark.parametrize("kwargs,match", [
    (dict(success_threshold=float("nan")), "success_threshold"),
    (dict(success_threshold=True), "success_threshold"),
    (dict(eps=float("inf")), "eps"),
    (dict(group_size=True), "group_size"),
])
def test_bad_settings_raise_naming_the_argument(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        group_advantages(torch.ones(4), **{"group_size": 2, **kwargs})
