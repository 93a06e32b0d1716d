import pytest
import torch

from dypo_kernels import fused_grpo_loss, fused_linear_logprobs, reference
from tests.batches import gradients, nearby_logps, sequence_batch
from tests.conftest import HAS_CUDA, relative_error
from tests.linear_logprobs.test_linear_logprobs import low_precision_dtype

LOSS_TYPES = ["grpo", "bnpo", "dapo", "dr_grpo"]
POLICIES = {"on_policy": dict(), "off_policy": dict(old=0.3), "off_policy_kl": dict(old=0.3, ref=0.2, beta=0.04),
            "off_policy_kl_corrected": dict(old=0.3, ref=0.2, beta=0.04, use_bias_correction_kl=True),
            "on_policy_kl_corrected": dict(ref=0.2, beta=0.04, use_bias_correction_kl=True)}


def grpo_inputs(device, policy, dtype=torch.float32, seed=0, temperature=0.7):
    batch = sequence_batch(5, 9, 40, 101, dtype=dtype, device=device, seed=seed)
    current = fused_linear_logprobs(batch["hidden"], batch["weight"], batch["targets"], bias=batch["bias"],
                                    temperature=temperature)
    generator = batch["generator"]
    kwargs = dict(mask=batch["mask"], bias=batch["bias"], temperature=temperature, beta=policy.get("beta", 0.0),
                  eps_low=0.2, eps_high=0.28)
    if "old" in policy:
        kwargs["old_logps"] = nearby_logps(current, generator, policy["old"])
    if "ref" in policy:
        kwargs["ref_logps"] = nearby_logps(current, generator, policy["ref"])
    if "use_bias_correction_kl" in policy:
        kwargs["use_bias_correction_kl"] = policy["use_bias_correction_kl"]
    advantages = torch.randn(5, generator=generator).to(device)
    return batch, advantages, kwargs


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("policy", POLICIES.values(), ids=POLICIES.keys())
def test_fp32_matches_float64_reference(backend, loss_type, policy):
    batch, advantages, kwargs = grpo_inputs(backend, policy)
    args = (batch["hidden"], batch["weight"], batch["targets"], advantages)
    loss = fused_grpo_loss(*args, loss_type=loss_type, max_len=12 if loss_type == "dr_grpo" else None, **kwargs)
    expected = reference.grpo_loss(*args, loss_type=loss_type, max_len=12 if loss_type == "dr_grpo" else None,
                                   **kwargs)
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert relative_error(loss, expected) < 1e-5
    for name, grad, ref in zip(("hidden", "weight", "bias"), gradients(loss, batch), gradients(expected, batch)):
        assert relative_error(grad, ref) < 1e-5, name


def test_low_precision_within_torch_own_error(backend, request):
    dtype = low_precision_dtype(request.node.backend_name)
    batch, advantages, kwargs = grpo_inputs(backend, POLICIES["off_policy_kl"], dtype=dtype)
    args = (batch["hidden"], batch["weight"], batch["targets"], advantages)
    loss = fused_grpo_loss(*args, **kwargs)
    expected = reference.grpo_loss(*args, **kwargs)
    naive = reference.grpo_loss(*args, dtype=dtype, **kwargs)
    assert relative_error(loss, expected) <= 2 * relative_error(naive, expected) + 1e-5
    for grad, ref, base in zip(gradients(loss, batch), gradients(expected, batch), gradients(naive, batch)):
        assert grad.dtype == dtype
        assert relative_error(grad, ref) <= 2 * relative_error(base, ref) + 1e-5


def test_metrics_follow_their_definitions(backend):
    batch, advantages, kwargs = grpo_inputs(backend, POLICIES["off_policy_kl"])
    loss, metrics = fused_grpo_loss(batch["hidden"], batch["weight"], batch["targets"], advantages,
                                    return_metrics=True, **kwargs)
    logps, entropy = reference.token_logprobs(batch["hidden"], batch["weight"], batch["targets"], bias=batch["bias"],
                                              temperature=kwargs["temperature"])
    mask = batch["mask"]
    ratio = torch.exp(logps - kwargs["old_logps"].double())[mask]
    adv = advantages.double()[:, None].expand_as(mask)[mask]
    delta = kwargs["ref_logps"].double()[mask] - logps[mask]
    expected = {"clip_fraction_low": ((ratio < 0.8) & (adv < 0)).double().mean(),
                "clip_fraction_high": ((ratio > 1.28) & (adv > 0)).double().mean(),
                "mean_ratio": ratio.mean(), "mean_entropy": entropy[mask].mean(),
                "mean_kl": (torch.exp(delta) - delta - 1).mean()}
    assert set(metrics) == set(expected)
    for name, value in expected.items():
        assert not metrics[name].requires_grad
        assert abs(metrics[name].item() - value.item()) < 1e-5, name
    assert 0 < metrics["clip_fraction_low"] + metrics["clip_fraction_high"] < 1  # the inputs do exercise the clip


@pytest.mark.skipif(HAS_CUDA, reason="compares on CPU tensors")
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("policy", ["off_policy_kl", "off_policy_kl_corrected"])
def test_matches_liger_kernel(loss_type, policy):
    """Same settings, same numbers as Liger-Kernel's chunked GRPO (its uncompiled path runs on CPU)."""
    pytest.importorskip("liger_kernel")
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    batch, advantages, kwargs = grpo_inputs("cpu", POLICIES[policy])
    liger = LigerFusedLinearGRPOLoss(beta=0.04, compiled=False, epsilon_low=0.2, epsilon_high=0.28,
                                     loss_type=loss_type, max_completion_length=9, temperature=kwargs["temperature"],
                                     use_bias_correction_kl=kwargs.get("use_bias_correction_kl", False))
    liger_loss, liger_metrics = liger(batch["hidden"], batch["weight"], batch["targets"].clamp(min=0),
                                      batch["mask"].long(), advantages, bias=batch["bias"],
                                      ref_per_token_logps=kwargs["ref_logps"], old_per_token_logps=kwargs["old_logps"])
    loss, metrics = fused_grpo_loss(batch["hidden"], batch["weight"], batch["targets"], advantages,
                                    loss_type=loss_type, max_len=9, return_metrics=True, **kwargs)
    assert relative_error(loss, liger_loss) < 1e-4
    for name, grad, ref in zip(("hidden", "weight", "bias"), gradients(loss, batch), gradients(liger_loss, batch)):
        assert relative_error(grad, ref) < 1e-4, name
    liger_kl, liger_clip = liger_metrics[0], liger_metrics[-1]
    assert abs(metrics["mean_kl"].item() - liger_kl.item()) < 1e-5
    clip_total = metrics["clip_fraction_low"] + metrics["clip_fraction_high"]
    assert abs(clip_total.item() - liger_clip.item()) < 1e-6


def test_on_policy_gradient_is_the_policy_gradient(backend):
    """Ratio 1: the gradient is that of -sum_t w_t A_i lp_t (REINFORCE with group advantages)."""
    batch, advantages, kwargs = grpo_inputs(backend, POLICIES["on_policy"])
    loss, metrics = fused_grpo_loss(batch["hidden"], batch["weight"], batch["targets"], advantages,
                                    return_metrics=True, **kwargs)
    logps, _ = reference.token_logprobs(batch["hidden"], batch["weight"], batch["targets"], bias=batch["bias"],
                                        temperature=kwargs["temperature"])
    mask = batch["mask"].double()
    surrogate = -((advantages.double()[:, None] * logps * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean()
    for grad, ref in zip(gradients(loss, batch), gradients(surrogate, batch)):
        assert relative_error(grad, ref) < 1e-5
    assert metrics["mean_ratio"].item() == 1.0 and metrics["clip_fraction_low"].item() == 0.0


def test_two_calls_give_identical_bits(backend, request):
    if request.node.backend_name == "triton" and HAS_CUDA:
        pytest.skip("the CUDA gradient kernel adds tiles with atomics (documented)")
    batch, advantages, kwargs = grpo_inputs(backend, POLICIES["off_policy_kl"])
    args = (batch["hidden"], batch["weight"], batch["targets"], advantages)
    first, second = (fused_grpo_loss(*args, **kwargs) for _ in range(2))
    assert torch.equal(first, second)
    assert all(torch.equal(a, b) for a, b in zip(gradients(first, batch), gradients(second, batch)))


def test_no_response_token_gives_zero_with_zero_gradients(backend):
    batch, advantages, kwargs = grpo_inputs(backend, POLICIES["off_policy_kl"])
    kwargs["mask"] = torch.zeros_like(batch["mask"])
    loss = fused_grpo_loss(batch["hidden"], batch["weight"], batch["targets"], advantages, **kwargs)
    assert loss.item() == 0.0
    assert all(torch.all(g == 0) for g in gradients(loss, batch))


def bad_calls():
    def call(**changes):
        def run(h, w, y, a, m):
            kwargs = dict(mask=m)
            kwargs.update(changes)
            return fused_grpo_loss(kwargs.pop("hidden", h), w, kwargs.pop("targets", y), kwargs.pop("advantages", a),
                                   **kwargs)
        return run

    return [
        (call(hidden=torch.randn(3, 4, 8)), "targets"),
        (call(targets=torch.randint(0, 10, (3, 5))), "targets"),
        (call(targets=torch.full((2, 4), 10)), "targets"),
        (call(mask=torch.ones(2, 5)), "mask"),
        (call(advantages=torch.zeros(3)), "advantages"),
        (call(advantages=torch.tensor([0.0, float("nan")])), "advantages"),
        (call(old_logps=torch.zeros(2, 3)), "old_logps"),
        (call(ref_logps=torch.zeros(4, 2), beta=0.1), "ref_logps"),
        (call(beta=0.1), "ref_logps"),
        (call(beta=-0.1, ref_logps=torch.zeros(2, 4)), "beta"),
        (call(eps_low=1.0), "eps_low"),
        (call(eps_low=-0.1), "eps_low"),
        (call(eps_high=-0.1), "eps_high"),
        (call(loss_type="ppo"), "loss_type.*'grpo', 'bnpo', 'dapo', 'dr_grpo'"),
        (call(max_len=0), "max_len"),
        (call(temperature=0.0), "temperature"),
        (call(temperature=True), "temperature"),
        (call(mask=torch.full((2, 4), 0.5)), "mask"),
        (call(mask=torch.full((2, 4), 2)), "mask"),
        (call(old_logps=torch.full((2, 4), float("nan"))), "old_logps"),
        (call(ref_logps=torch.full((2, 4), float("inf")), beta=0.1), "ref_logps"),
    ]


@pytest.mark.parametrize("call,match", bad_calls())
def test_bad_input_raises_naming_the_argument(call, match):
    hidden, weight = torch.randn(2, 4, 8), torch.randn(10, 8)
    targets, advantages, mask = torch.randint(0, 10, (2, 4)), torch.randn(2), torch.ones(2, 4, dtype=torch.bool)
    with pytest.raises((ValueError, TypeError), match=match):
        call(hidden, weight, targets, advantages, mask)
