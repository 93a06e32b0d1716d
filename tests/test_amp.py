"""Autocast: every op under torch.autocast with fp32 inputs computes what it computes for inputs in the autocast
dtype (as an unfused lm_head would), and its gradients reach the fp32 inputs in fp32."""

import pytest
import torch

from dypo_kernels import fused_multi_teacher_kl
from tests.batches import OPS, op_inputs

TRAINED = ("hidden", "weight", "bias")


@pytest.mark.parametrize("backward_inside", [False, True], ids=["backward after", "backward inside"])
@pytest.mark.parametrize("op", list(OPS))
def test_autocast_computes_in_the_autocast_dtype(backend, op, backward_inside):
    operands, data = op_inputs(backend)
    low = {name: t.detach().bfloat16().requires_grad_(name in TRAINED) for name, t in operands.items()}
    expected = OPS[op](low, data)
    expected_grads = torch.autograd.grad(expected, [low[name] for name in TRAINED])
    with torch.autocast(backend.type, dtype=torch.bfloat16):
        loss = OPS[op](operands, data)
        if backward_inside:
            grads = torch.autograd.grad(loss, [operands[name] for name in TRAINED])
    if not backward_inside:
        grads = torch.autograd.grad(loss, [operands[name] for name in TRAINED])
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=0)
    for name, grad, grad_expected in zip(TRAINED, grads, expected_grads):
        assert grad.dtype == torch.float32, name
        torch.testing.assert_close(grad, grad_expected.float(), rtol=1e-6, atol=0, msg=name)


def test_self_distillation_under_autocast_is_zero(backend):
    operands, data = op_inputs(backend)
    hidden, weight = operands["hidden"], operands["weight"]
    with torch.autocast(backend.type, dtype=torch.bfloat16):
        loss = fused_multi_teacher_kl(hidden, weight, [hidden], [weight], mask=data["mask"])
    assert loss.item() == 0.0
