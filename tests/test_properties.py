"""Property tests: the log-prob, GRPO and SFT ops against the float64 reference on shapes, dtypes, masks (empty rows
and empty masks included), temperatures, biases and ignore_index (0: a real token id) drawn by hypothesis, on every
backend and impl. Examples are capped so that the file runs in well under a minute."""

import math

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dypo_kernels import fused_grpo_loss, fused_linear_logprobs, fused_sft_loss, reference
from tests.conftest import relative_error
from tests.linear_logprobs.test_linear_logprobs import low_precision_dtype

# the backend fixture sets environment variables once per test: the same for every example
PROPERTY = settings(max_examples=40, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}


@st.composite
def cases(draw):
    """A batch [B, T, D] with a head [V, D] (bias or not), integer targets, a mask and the op's settings."""
    return dict(size=draw(st.integers(1, 3)), length=draw(st.integers(1, 5)), hidden_size=draw(st.integers(1, 8)),
                vocab_size=draw(st.integers(1, 40)), dtype=draw(st.sampled_from(list(TOLERANCE))),
                bias=draw(st.booleans()), temperature=draw(st.sampled_from([0.5, 1.0, 1.7])),
                ignore_index=draw(st.sampled_from([-100, -1, 0])), kept=draw(st.sampled_from([0.0, 0.5, 1.0])),
                seed=draw(st.integers(0, 2**16)))


def make_batch(case, device, backend_name):
    """Tensors for ``case``: rows of the mask are empty at random (all of them when ``kept`` is 0)."""
    if case["dtype"] == torch.bfloat16:
        case["dtype"] = low_precision_dtype(backend_name)
    generator = torch.Generator().manual_seed(case["seed"])
    size, length, hidden_size, vocab_size = case["size"], case["length"], case["hidden_size"], case["vocab_size"]

    def param(*shape, scale=1.0):
        return (torch.randn(*shape, generator=generator) * scale).to(device, case["dtype"]).requires_grad_()

    mask = torch.rand(size, length, generator=generator) < case["kept"]
    mask[torch.rand(size, generator=generator) < 0.3] = False
    return dict(hidden=param(size, length, hidden_size), weight=param(vocab_size, hidden_size,
                                                                      scale=2 / math.sqrt(hidden_size)),
                bias=param(vocab_size) if case["bias"] else None,
                targets=torch.randint(0, vocab_size, (size, length), generator=generator).to(device),
                mask=mask.to(device), advantages=torch.randn(size, generator=generator).to(device))


def assert_matches(loss, expected, batch, dtype):
    params = [batch[name] for name in ("hidden", "weight", "bias") if batch[name] is not None]
    tolerance = TOLERANCE[dtype]
    assert torch.isfinite(loss).all()
    assert relative_error(loss, expected) < tolerance or (expected - loss.double()).abs().max() < tolerance
    for param, grad, ref in zip(params, torch.autograd.grad(loss.sum(), params, allow_unused=True),
                                torch.autograd.grad(expected.sum(), params, allow_unused=True)):
        grad = torch.zeros_like(param) if grad is None else grad
        ref = torch.zeros_like(param, dtype=torch.float64) if ref is None else ref
        assert grad.dtype == param.dtype
        assert relative_error(grad, ref) < tolerance or (grad.double() - ref).abs().max() < tolerance


@PROPERTY
@given(case=cases())
def test_linear_logprobs(backend, request, case):
    batch = make_batch(case, backend, request.node.backend_name)
    targets = batch["targets"].masked_fill(~batch["mask"], case["ignore_index"])
    kwargs = dict(bias=batch["bias"], temperature=case["temperature"], ignore_index=case["ignore_index"])
    logps, entropy = fused_linear_logprobs(batch["hidden"], batch["weight"], targets, return_entropy=True, **kwargs)
    ref_logps, ref_entropy = reference.token_logprobs(batch["hidden"], batch["weight"], targets, **kwargs)
    assert_matches(logps + 0.5 * entropy, ref_logps + 0.5 * ref_entropy, batch, case["dtype"])


@PROPERTY
@given(case=cases(), loss_type=st.sampled_from(["grpo", "bnpo", "dapo", "dr_grpo"]))
def test_grpo_loss(backend, request, case, loss_type):
    batch = make_batch(case, backend, request.node.backend_name)
    args = (batch["hidden"], batch["weight"], batch["targets"], batch["advantages"])
    kwargs = dict(mask=batch["mask"], bias=batch["bias"], temperature=case["temperature"], loss_type=loss_type)
    loss = fused_grpo_loss(*args, **kwargs)
    expected = reference.grpo_loss(*args, **kwargs)
    if not batch["mask"].any():
        assert loss.item() == 0.0
        expected = expected.nan_to_num(0.0) * 0.0
    assert_matches(loss, expected, batch, case["dtype"])


@PROPERTY
@given(case=cases(), reduction=st.sampled_from(["token_mean", "seq_mean"]))
def test_sft_loss(backend, request, case, reduction):
    batch = make_batch(case, backend, request.node.backend_name)
    targets = batch["targets"].masked_fill(torch.rand(batch["targets"].shape, generator=torch.Generator().manual_seed(
        case["seed"])).to(backend) < 0.2, case["ignore_index"])
    kwargs = dict(mask=batch["mask"], bias=batch["bias"], temperature=case["temperature"],
                  ignore_index=case["ignore_index"], reduction=reduction)
    loss = fused_sft_loss(batch["hidden"], batch["weight"], targets, **kwargs)
    assert_matches(loss, reference.sft_loss(batch["hidden"], batch["weight"], targets, **kwargs), batch,
                   case["dtype"])

