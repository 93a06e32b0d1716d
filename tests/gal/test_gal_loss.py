import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dypo_kernels import reference
from dypo_kernels.gal import gal_coefficients, gal_loss
from tests.conftest import relative_error


def ragged_batch(sizes, seed, binary=True):
    generator = torch.Generator().manual_seed(seed)
    group_index = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    group_index = group_index[torch.randperm(group_index.numel(), generator=generator)]
    count = group_index.numel()
    rewards = torch.rand(count, generator=generator)
    rewards = (rewards > 0.5).float() if binary else rewards
    return torch.randn(count, generator=generator) * 3, torch.randn(count, generator=generator), rewards, group_index


@pytest.mark.parametrize("beta", [1.0, 0.1, 3.0])
@pytest.mark.parametrize("with_ref", [False, True])
def test_uniform_groups_value_and_gradient_match_reference(beta, with_ref):
    generator = torch.Generator().manual_seed(0)
    seq_logps = torch.randn(24, generator=generator, dtype=torch.float64).float().requires_grad_()
    ref = torch.randn(24, generator=generator) if with_ref else None
    rewards = (torch.rand(24, generator=generator) > 0.5).float()
    loss = gal_loss(seq_logps, rewards, ref_seq_logps=ref, group_size=6, beta=beta)
    expected = reference.gal_loss(seq_logps, rewards, ref_seq_logps=ref, group_size=6, beta=beta)
    assert relative_error(loss, expected) < 1e-6
    (grad,) = torch.autograd.grad(loss, seq_logps)
    (ref_grad,) = torch.autograd.grad(expected, seq_logps)
    assert relative_error(grad, ref_grad) < 1e-6


def test_ragged_groups_with_graded_rewards_and_metrics():
    seq_logps, ref, rewards, group_index = ragged_batch([1, 3, 5, 2, 8], seed=1, binary=False)
    loss, metrics = gal_loss(seq_logps, rewards, ref_seq_logps=ref, group_index=group_index, beta=0.5,
                             return_metrics=True)
    assert relative_error(loss, reference.gal_loss(seq_logps, rewards, ref_seq_logps=ref, group_index=group_index,
                                                   beta=0.5)) < 1e-6
    margin = seq_logps - ref
    same = group_index[:, None] == group_index[None, :]
    pairs = same & (rewards[:, None] > rewards[None, :])
    difference = margin[:, None] - margin[None, :]
    assert metrics["num_pairs"].item() == pairs.sum().item()
    assert metrics["pair_accuracy"].item() == pytest.approx((difference[pairs] > 0).float().mean().item())
    assert metrics["mean_margin"].item() == pytest.approx(difference[pairs].mean().item(), rel=1e-5)


def test_batch_without_pairs_is_a_zero_that_backpropagates():
    seq_logps = torch.randn(6, requires_grad=True)
    loss = gal_loss(seq_logps, torch.tensor([1.0, 1.0, 0.0, 0.0, 0.0, 0.0]), group_size=2)
    loss.backward()
    assert loss.item() == 0 and torch.all(seq_logps.grad == 0) and torch.isfinite(seq_logps.grad).all()


def test_empty_ragged_batch_is_a_zero_with_metrics():
    seq_logps = torch.zeros(0, requires_grad=True)
    loss, metrics = gal_loss(seq_logps, torch.zeros(0), group_index=torch.zeros(0, dtype=torch.long),
                             return_metrics=True)
    loss.backward()
    assert loss.item() == 0 and metrics["num_pairs"].item() == 0 and metrics["pair_accuracy"].item() == 0
    assert gal_coefficients(seq_logps, torch.zeros(0), group_index=torch.zeros(0, dtype=torch.long)).shape == (0,)


@settings(max_examples=40, deadline=None)
@given(sizes=st.lists(st.integers(1, 7), min_size=1, max_size=6), seed=st.integers(0, 2**16),
       beta=st.floats(0.05, 4.0), binary=st.booleans())
def test_coefficients_equal_autograd_of_the_reference(sizes, seed, beta, binary):
    seq_logps, ref, rewards, group_index = ragged_batch(sizes, seed, binary)
    seq_logps = seq_logps.double().requires_grad_()
    expected = reference.gal_loss(seq_logps, rewards, ref_seq_logps=ref, group_index=group_index, beta=beta)
    (expected_grad,) = torch.autograd.grad(expected, seq_logps, allow_unused=True)
    coefficients = gal_coefficients(seq_logps, rewards, ref_seq_logps=ref, group_index=group_index, beta=beta)
    expected_grad = torch.zeros_like(seq_logps) if expected_grad is None else expected_grad
    assert torch.allclose(coefficients.double(), expected_grad, atol=1e-6)


@pytest.mark.parametrize("kwargs,match", [
    (dict(rewards=torch.ones(3)), "rewards"),
    (dict(rewards=torch.tensor([1.0, float("nan"), 0.0, 1.0])), "rewards"),
    (dict(rewards=torch.ones(4), beta=-1.0), "beta"),
    (dict(rewards=torch.ones(4), ref_seq_logps=torch.zeros(5)), "ref_seq_logps"),
    (dict(rewards=torch.ones(4), beta=float("inf")), "beta"),
    (dict(rewards=torch.ones(4), group_size=True), "group_size"),
])
def test_bad_input_raises_naming_the_argument(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        gal_loss(torch.zeros(4), **{"group_size": 2, **kwargs})
