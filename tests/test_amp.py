"""Autocast: every op under torch.autocast with fp32 inputs computes what it computes for inputs in the autocast
dtype (as an unfused lm_head would), and its gradients reach the fp32 inputs in fp32."""

import pytest
import torch

from dypo_kernels import (
    Route,
    dypo_loss,
    fused_gal_loss,
    fused_grpo_loss,
    fused_linear_logprobs,
    fused_multi_teacher_kl,
    fused_sft_loss,
    fused_sparse_teacher_kl,
)
from tests.batches import sequence_batch

GROUP_INDEX = [0, 1, 0, 2, 3, 2, 1, 0, 2, 3]
ROUTE = [Route.RL, Route.SFT, Route.RL, Route.RL, Route.SKIP, Route.RL, Route.SFT, Route.RL, Route.RL, Route.SKIP]
REWARDS = [1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.3, 1.0]


def op_inputs(device):
    """(operands: the float tensors that feed the products, data: the rest) for a batch of 10 sequences of 8."""
    batch = sequence_batch(10, 8, 40, 101, device=device)
    generator = batch["generator"]
    teacher = torch.log_softmax(torch.randn(10, 8, 101, generator=generator) * 2, -1).topk(5, -1)
    operands = dict(hidden=batch["hidden"], weight=batch["weight"], bias=batch["bias"],
                    teacher_hidden=torch.randn(10, 8, 24, generator=generator).to(device),
                    teacher_weight=torch.randn(101, 24, generator=generator).to(device) / 3)
    data = dict(targets=batch["targets"], mask=batch["mask"],
                advantages=torch.randn(10, generator=generator).to(device),
                rewards=torch.tensor(REWARDS, device=device), group_index=torch.tensor(GROUP_INDEX, device=device),
                route=torch.tensor(ROUTE, device=device), top_ids=teacher.indices.to(device),
                top_logps=teacher.values.to(device))
    return operands, data


OPS = {
    "logprobs": lambda o, d: fused_linear_logprobs(o["hidden"], o["weight"], d["targets"], bias=o["bias"]).sum(),
    "grpo": lambda o, d: fused_grpo_loss(o["hidden"], o["weight"], d["targets"], d["advantages"], mask=d["mask"],
                                         bias=o["bias"]),
    "sft": lambda o, d: fused_sft_loss(o["hidden"], o["weight"], d["targets"], mask=d["mask"], bias=o["bias"]),
    "gal": lambda o, d: fused_gal_loss(o["hidden"], o["weight"], d["targets"], d["rewards"],
                                       group_index=d["group_index"], mask=d["mask"], bias=o["bias"]),
    "dypo": lambda o, d: dypo_loss(o["hidden"], o["weight"], d["targets"], mask=d["mask"], route=d["route"],
                                   rewards=d["rewards"], group_index=d["group_index"], bias=o["bias"]),
    "kl": lambda o, d: fused_multi_teacher_kl(o["hidden"], o["weight"], [o["teacher_hidden"]], [o["teacher_weight"]],
                                              mask=d["mask"], student_bias=o["bias"]),
    "sparse_kl": lambda o, d: fused_sparse_teacher_kl(o["hidden"], o["weight"], [d["top_ids"]], [d["top_logps"]],
                                                      mask=d["mask"], student_bias=o["bias"]),
}
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
