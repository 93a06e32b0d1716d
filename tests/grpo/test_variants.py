"""fused_grpo_loss's variants (CISPO, SAPO, LUSPO, VESPO, GSPO's sequence-level ratio, the two-sided clip, vLLM's
importance-sampling correction, num_items_in_batch) and its entropy bonus: against the float64 reference on every
backend and impl, and against Liger-Kernel's LigerFusedLinearGRPOLoss (its uncompiled path runs on CPU) on the same
inputs."""

import pytest
import torch

from dypo_kernels import fused_grpo_loss, reference
from tests.batches import gradients
from tests.conftest import HAS_CUDA, relative_error, set_chunk_rows
from tests.grpo.test_fused_grpo_loss import POLICIES, grpo_inputs


def is_ratio(shape, seed=1):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) + 0.5


# name -> fused_grpo_loss keywords
VARIANTS = {
    "cispo": dict(loss_type="cispo", eps_high=1.1),
    "sapo": dict(loss_type="sapo"),
    "sapo_temperatures": dict(loss_type="sapo", sapo_temperature_pos=0.5, sapo_temperature_neg=2.0),
    "luspo": dict(loss_type="luspo"),
    "delta": dict(loss_type="dapo", delta=1.05),
    "delta_grpo": dict(loss_type="grpo", delta=1.02, eps_high=0.1),
    "vllm_is_ratio_tokens": dict(loss_type="dapo", vllm_is_ratio=is_ratio((5, 9))),
    "vllm_is_ratio_sequences": dict(loss_type="grpo", vllm_is_ratio=is_ratio((5, 1))),
    "num_items_in_batch": dict(loss_type="dapo", num_items_in_batch=70),
    "num_items_in_batch_cispo": dict(loss_type="cispo", eps_high=1.2, num_items_in_batch=torch.tensor(55.0)),
    "gspo": dict(loss_type="grpo", importance_sampling_level="sequence", eps_high=0.05),
    "gspo_luspo": dict(loss_type="luspo", importance_sampling_level="sequence", eps_high=0.05),
    "gspo_dapo_delta": dict(loss_type="dapo", importance_sampling_level="sequence", delta=1.02),
    "gspo_vllm_is_ratio": dict(loss_type="grpo", importance_sampling_level="sequence", vllm_is_ratio=is_ratio((5, 9))),
    "vespo": dict(loss_type="vespo"),
    "vespo_shapes": dict(loss_type="vespo", vespo_k_pos=1.0, vespo_lambda_pos=1.5, vespo_k_neg=4.0,
                         vespo_lambda_neg=3.0),
    "vespo_vllm_is_ratio": dict(loss_type="vespo", vllm_is_ratio=is_ratio((5, 9)), num_items_in_batch=60),
}
SEQUENCE_LEVEL = [name for name, settings in VARIANTS.items()
                  if settings.get("importance_sampling_level") == "sequence" or settings["loss_type"] == "vespo"]
ENTROPY = {loss_type: dict(loss_type=loss_type, entropy_coef=0.3) for loss_type in
           ("grpo", "dapo", "dr_grpo", "cispo", "sapo", "luspo", "vespo")}


OPTIONS = ("delta", "vllm_is_ratio", "num_items_in_batch", "entropy_coef", "sapo_temperature_pos",
           "sapo_temperature_neg", "importance_sampling_level", "vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg",
           "vespo_lambda_neg")


def on_device(settings, device):
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in settings.items()}


def assert_matches_reference(batch, args, kwargs, settings):
    """The loss and its gradients within 1e-5 of float64's; returns float64's loss."""
    loss = fused_grpo_loss(*args, **kwargs, **settings)
    expected = reference.grpo_loss(*args, **kwargs, **settings)
    assert relative_error(loss, expected) < 1e-5
    for name, grad, ref in zip(("hidden", "weight", "bias"), gradients(loss, batch), gradients(expected, batch)):
        assert relative_error(grad, ref) < 1e-5, name
    return expected


@pytest.mark.parametrize("settings", list(VARIANTS.values()) + list(ENTROPY.values()),
                         ids=list(VARIANTS) + [f"entropy_{name}" for name in ENTROPY])
@pytest.mark.parametrize("policy", ["off_policy_kl", "off_policy_kl_corrected"])
def test_matches_float64_reference(backend, settings, policy):
    batch, advantages, kwargs = grpo_inputs(backend, POLICIES[policy])
    args = (batch["hidden"], batch["weight"], batch["targets"], advantages)
    settings = on_device(settings, backend)
    kwargs.update(eps_high=settings.pop("eps_high", kwargs["eps_high"]))
    expected = assert_matches_reference(batch, args, kwargs, settings)
    without = {key: value for key, value in settings.items() if key not in OPTIONS}
    if without == settings:  # a loss type of its own: not the plain clipped objective
        without = dict(loss_type="dapo")
    assert relative_error(expected, reference.grpo_loss(*args, **kwargs, **without)) > 1e-3  # the inputs exercise it


@pytest.mark.parametrize("name", SEQUENCE_LEVEL)
@pytest.mark.parametrize("chunk_rows", [2, 5], ids=["sequences swept ahead", "sequences whole in a chunk"])
def test_sequence_level_ratios_in_small_chunks(backend, request, monkeypatch, name, chunk_rows):
    """GSPO's and VESPO's weights need a sequence's whole log-ratio: chunks of 2 rows hold at most 8 tokens, so the
    9-token sequences are swept ahead; chunks of 5 rows grow to hold each sequence whole."""
    set_chunk_rows(monkeypatch, chunk_rows, 101, request.node.backend_name)
    batch, advantages, kwargs = grpo_inputs(backend, POLICIES["off_policy_kl_corrected"])
    batch["mask"][1] = True  # a sequence of 9 tokens
    kwargs["mask"] = batch["mask"]
    args = (batch["hidden"], batch["weight"], batch["targets"].clamp(min=0), advantages)
    settings = on_device(VARIANTS[name], backend)
    kwargs.update(eps_high=settings.pop("eps_high", kwargs["eps_high"]))
    expected = assert_matches_reference(batch, args, kwargs, settings)
    with torch.no_grad():
        assert relative_error(fused_grpo_loss(*args, **kwargs, **settings), expected) < 1e-5


@pytest.mark.parametrize("name", list(ENTROPY))
def test_the_entropy_bonus_changes_the_loss_by_its_aggregated_entropy(name):
    """The bonus is exactly -coef times the token entropy aggregated as the policy term (verl's entropy_coeff)."""
    batch, advantages, kwargs = grpo_inputs("cpu", POLICIES["off_policy_kl"])
    args = (batch["hidden"], batch["weight"], batch["targets"], advantages)
    with torch.no_grad():
        without = fused_grpo_loss(*args, **kwargs, loss_type=ENTROPY[name]["loss_type"])
        with_bonus = fused_grpo_loss(*args, **kwargs, **ENTROPY[name])
        _, entropy = reference.token_logprobs(batch["hidden"], batch["weight"], batch["targets"],
                                              bias=batch["bias"], temperature=kwargs["temperature"])
        aggregated = reference._aggregate(entropy, batch["mask"].double(), ENTROPY[name]["loss_type"])
    assert abs((without - with_bonus).item() - 0.3 * aggregated.item()) < 1e-5
    assert aggregated.item() > 0.1  # the bonus is not negligible on these inputs


@pytest.mark.skipif(HAS_CUDA, reason="compares on CPU tensors")
@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.parametrize("policy", ["off_policy_kl", "off_policy_kl_corrected"])
def test_matches_liger(name, policy):
    """Same settings, same numbers as Liger-Kernel 0.8.5's chunked GRPO with these options."""
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    settings = dict(VARIANTS[name])
    batch, advantages, kwargs = grpo_inputs("cpu", POLICIES[policy])
    if settings["loss_type"] == "luspo":  # Liger's luspo weights every position by its sequence's length
        kwargs["mask"] = torch.ones_like(batch["mask"])
    call_options = {key: settings.pop(key) for key in ("vllm_is_ratio", "num_items_in_batch") if key in settings}
    if settings["loss_type"] == "vespo" and "vllm_is_ratio" in call_options:  # Liger sums log rho over padding too
        call_options["vllm_is_ratio"] = torch.where(kwargs["mask"], call_options["vllm_is_ratio"], 1.0)
    liger = LigerFusedLinearGRPOLoss(beta=0.04, compiled=False, epsilon_low=0.2, epsilon_high=settings.get(
        "eps_high", 0.28), temperature=kwargs["temperature"], use_bias_correction_kl=kwargs.get(
        "use_bias_correction_kl", False), **{("epsilon_high" if key == "eps_high" else key): value
                                             for key, value in settings.items() if key != "eps_high"})
    targets = batch["targets"].clamp(min=0)  # Liger gathers at every position
    liger_loss, liger_metrics = liger(batch["hidden"], batch["weight"], targets,
                                      kwargs["mask"].long(), advantages, bias=batch["bias"],
                                      ref_per_token_logps=kwargs["ref_logps"], old_per_token_logps=kwargs["old_logps"],
                                      **call_options)
    kwargs.update(eps_high=settings.pop("eps_high", kwargs["eps_high"]))
    loss, metrics = fused_grpo_loss(batch["hidden"], batch["weight"], targets, advantages, return_metrics=True,
                                    **kwargs, **settings, **call_options)
    assert relative_error(loss, liger_loss) < 1e-4
    for grad_name, grad, ref in zip(("hidden", "weight", "bias"), gradients(loss, batch),
                                    gradients(liger_loss, batch)):
        assert relative_error(grad, ref) < 1e-4, grad_name
    clip_total = metrics["clip_fraction_low"] + metrics["clip_fraction_high"]
    if "num_items_in_batch" not in call_options:  # Liger's clip fraction is over the batch's own tokens
        assert abs(clip_total.item() - liger_metrics[-1].item()) < 1e-6


@pytest.mark.parametrize("changes,match", [
    (dict(loss_type="cispo", delta=1.5), "delta"),
    (dict(delta=0.0), "delta"),
    (dict(delta=float("nan")), "delta"),
    (dict(loss_type="sapo", sapo_temperature_pos=0.0), "sapo_temperature_pos"),
    (dict(loss_type="sapo", sapo_temperature_neg=-1.0), "sapo_temperature_neg"),
    (dict(vllm_is_ratio=torch.ones(2, 3)), "vllm_is_ratio"),
    (dict(vllm_is_ratio=torch.ones(2)), "vllm_is_ratio"),
    (dict(vllm_is_ratio=-torch.ones(2, 4)), "vllm_is_ratio must be finite and >= 0"),
    (dict(vllm_is_ratio=torch.ones(2, 4, dtype=torch.long)), "vllm_is_ratio"),
    (dict(num_items_in_batch=10), "num_items_in_batch.*'grpo'"),
    (dict(loss_type="dapo", num_items_in_batch=0), "num_items_in_batch must be positive"),
    (dict(loss_type="dapo", num_items_in_batch=torch.tensor([3.0])), "num_items_in_batch"),
    (dict(loss_type="dapo", num_items_in_batch=torch.tensor(0.0)), "num_items_in_batch must be positive"),
    (dict(entropy_coef=float("nan")), "entropy_coef"),
    (dict(loss_type="gspo"), "loss_type"),
    (dict(importance_sampling_level="sentence"), "importance_sampling_level"),
    (dict(loss_type="cispo", importance_sampling_level="sequence"), "importance_sampling_level='sequence'"),
    (dict(loss_type="vespo", importance_sampling_level="sequence"), "importance_sampling_level='sequence'"),
    (dict(loss_type="vespo", delta=2.0), "delta"),
    (dict(loss_type="vespo", vespo_k_pos=float("inf")), "vespo_k_pos"),
])
def test_bad_settings_raise_naming_the_argument(changes, match):
    hidden, weight = torch.randn(2, 4, 8), torch.randn(10, 8)
    targets, advantages = torch.randint(0, 10, (2, 4)), torch.randn(2)
    with pytest.raises((ValueError, TypeError), match=match):
        fused_grpo_loss(hidden, weight, targets, advantages, **changes)
