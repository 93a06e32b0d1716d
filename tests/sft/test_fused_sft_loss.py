import pytest
import torch
import torch.nn.functional as F

from dypo_kernels import fused_sft_loss, reference
from tests.batches import gradients, sequence_batch
from tests.conftest import relative_error
from tests.linear_logprobs.test_linear_logprobs import low_precision_dtype


@pytest.mark.parametrize("reduction", ["token_mean", "seq_mean"])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_fp32_matches_float64_reference(backend, reduction, temperature):
    batch = sequence_batch(4, 11, 40, 101, device=backend)
    mask = torch.rand(batch["targets"].shape, generator=batch["generator"]).to(backend) > 0.2
    args = (batch["hidden"], batch["weight"], batch["targets"])
    kwargs = dict(mask=mask, reduction=reduction, bias=batch["bias"], temperature=temperature)
    loss = fused_sft_loss(*args, **kwargs)
    expected = reference.sft_loss(*args, **kwargs)
    assert relative_error(loss, expected) < 1e-5
    for grad, ref in zip(gradients(loss, batch), gradients(expected, batch)):
        assert relative_error(grad, ref) < 1e-5


def test_token_mean_is_cross_entropy(backend):
    """Without a mask, token_mean is F.cross_entropy of the logits with ignore_index."""
    batch = sequence_batch(3, 7, 24, 37, device=backend, bias=False)
    loss = fused_sft_loss(batch["hidden"], batch["weight"], batch["targets"])
    logits = batch["hidden"].double() @ batch["weight"].double().T
    expected = F.cross_entropy(logits.flatten(0, 1), batch["targets"].flatten(), ignore_index=-100)
    assert relative_error(loss, expected) < 1e-5
    for grad, ref in zip(gradients(loss, batch), gradients(expected, batch)):
        assert relative_error(grad, ref) < 1e-5


def test_low_precision_within_torch_own_error(backend, request):
    dtype = low_precision_dtype(request.node.backend_name)
    batch = sequence_batch(4, 9, 40, 101, dtype=dtype, device=backend)
    args, kwargs = (batch["hidden"], batch["weight"], batch["targets"]), dict(bias=batch["bias"], temperature=0.8)
    loss, expected = fused_sft_loss(*args, **kwargs), reference.sft_loss(*args, **kwargs)
    naive = reference.sft_loss(*args, dtype=dtype, **kwargs)
    assert relative_error(loss, expected) <= 2 * relative_error(naive, expected) + 1e-5
    for grad, ref, base in zip(gradients(loss, batch), gradients(expected, batch), gradients(naive, batch)):
        assert relative_error(grad, ref) <= 2 * relative_error(base, ref) + 1e-5


def test_one_sequence_and_no_valid_token(backend):
    batch = sequence_batch(1, 6, 16, 30, device=backend)
    hidden, weight, targets = batch["hidden"][0], batch["weight"], batch["targets"][0]
    loss = fused_sft_loss(hidden, weight, targets, reduction="seq_mean")
    assert relative_error(loss, reference.sft_loss(hidden, weight, targets, reduction="seq_mean")) < 1e-5
    empty = fused_sft_loss(hidden, weight, torch.full_like(targets, -100))
    assert empty.item() == 0.0
    assert all(torch.all(g == 0) for g in torch.autograd.grad(empty, [hidden, weight]))


@pytest.mark.parametrize("kwargs,match", [
    (dict(reduction="sum"), "reduction.*'token_mean', 'seq_mean'"),
    (dict(mask=torch.ones(2, 3)), "mask"),
    (dict(temperature=-1.0), "temperature"),
    (dict(ignore_index=-1), "targets"),  # -100 is then an out-of-range id
    (dict(ignore_index=None), "ignore_index"),
    (dict(mask=torch.full((2, 4), 0.5)), "mask"),
    (dict(temperature=True), "temperature"),
])
def test_bad_input_raises_naming_the_argument(kwargs, match):
    targets = torch.randint(0, 10, (2, 4))
    targets[0, 0] = -100
    with pytest.raises((ValueError, TypeError), match=match):
        fused_sft_loss(torch.randn(2, 4, 8), torch.randn(10, 8), targets, **kwargs)
