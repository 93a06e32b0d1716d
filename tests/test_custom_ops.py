"""torch.compile (dypo_kernels/custom_ops.py): every op traces with fullgraph=True, so with no graph break, and the
compiled call gives eager mode's values, gradients and metrics, bit for bit where the backward's upstream gradient
is 1. Errors are eager mode's."""

import pytest
import torch

from dypo_kernels import (
    dypo_loss,
    fused_grpo_loss,
    fused_linear_logprobs,
    fused_multi_teacher_kl,
)
from tests.batches import OPS, nearby_logps, op_inputs, sequence_batch

HEAD = ("hidden", "weight", "bias")


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def run(step, operands, compiled, backend="aot_eager"):
    """(loss, metrics, gradients of the head) of ``step(operands)``, eager or compiled with fullgraph=True."""
    function = torch.compile(step, fullgraph=True, backend=backend) if compiled else step
    loss, metrics = function(operands)
    return loss.detach(), metrics, torch.autograd.grad(loss, [operands[name] for name in HEAD])


def assert_same_as_eager(step, operands, backend="aot_eager"):
    eager, compiled = run(step, operands, False), run(step, operands, True, backend)
    torch.testing.assert_close(compiled[0], eager[0], rtol=0, atol=0)
    assert sorted(compiled[1]) == sorted(eager[1])
    for name, value in eager[1].items():
        assert compiled[1][name].dtype == torch.float32
        torch.testing.assert_close(compiled[1][name], torch.as_tensor(value, dtype=torch.float32), rtol=0, atol=0,
                                   msg=name)
    for name, compiled_grad, eager_grad in zip(HEAD, compiled[2], eager[2]):
        torch.testing.assert_close(compiled_grad, eager_grad, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("op", sorted(OPS))
def test_every_op_compiles_without_graph_break_and_equals_eager(backend, op):
    operands, data = op_inputs(backend)
    assert_same_as_eager(lambda o: (OPS[op](o, data), {}), operands)


def grpo_inputs(device, dtype=torch.float32):
    batch = sequence_batch(4, 7, 16, 48, device=device, dtype=dtype)
    generator = batch["generator"]
    logps = fused_linear_logprobs(batch["hidden"], batch["weight"], batch["targets"], bias=batch["bias"])
    data = dict(targets=batch["targets"], mask=batch["mask"], advantages=torch.randn(4, generator=generator),
                old_logps=nearby_logps(logps, generator, 0.3), ref_logps=nearby_logps(logps, generator, 0.3))
    return {name: batch[name] for name in HEAD}, data


@pytest.mark.parametrize("settings", [
    dict(loss_type="dapo", beta=0.1, entropy_coef=0.01, num_items_in_batch=torch.tensor(9.0)),
    dict(loss_type="grpo", importance_sampling_level="sequence", beta=0.1, use_bias_correction_kl=True),
    dict(loss_type="sapo", sapo_temperature_neg=2.0),
    dict(loss_type="dr_grpo", delta=1.5, temperature=1.25, max_len=9),
], ids=["dapo-entropy", "gspo", "sapo", "dr_grpo-delta"])
def test_grpo_variants_and_metrics_equal_eager(backend, settings):
    operands, data = grpo_inputs(backend)

    def step(o):
        return fused_grpo_loss(o["hidden"], o["weight"], data["targets"], data["advantages"], mask=data["mask"],
                               old_logps=data["old_logps"], ref_logps=data["ref_logps"], bias=o["bias"],
                               return_metrics=True, **settings)

    assert_same_as_eager(step, operands)


def test_grpo_on_packed_rows_equals_eager(backend):
    operands, data = grpo_inputs(backend)
    lengths = data["mask"].sum(-1)
    mask = data["mask"].reshape(-1)
    cu_seqlens = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)])
    packed = {"hidden": operands["hidden"].detach().reshape(-1, 16)[mask].requires_grad_(),
              "weight": operands["weight"], "bias": operands["bias"]}

    targets, old_logps = data["targets"].reshape(-1)[mask], data["old_logps"].reshape(-1)[mask]

    def step(o):
        return fused_grpo_loss(o["hidden"], o["weight"], targets, data["advantages"], old_logps=old_logps,
                               bias=o["bias"], cu_seqlens=cu_seqlens, loss_type="luspo"), {}

    assert_same_as_eager(step, packed)


@pytest.mark.parametrize("route", ["three_routes", "sft_only"])
def test_dypo_loss_metrics_equal_eager(backend, route):
    operands, data = op_inputs(backend)
    if route == "sft_only":  # no RL rows: GAL's metrics are zeros, the keys the same
        data["route"] = torch.where(data["route"] == 1, 2, data["route"])
    logps = fused_linear_logprobs(operands["hidden"], operands["weight"], data["targets"], bias=operands["bias"])
    ref_logps = nearby_logps(logps, torch.Generator().manual_seed(1), 0.2)

    def step(o):
        return dypo_loss(o["hidden"], o["weight"], data["targets"], mask=data["mask"], route=data["route"],
                         rewards=data["rewards"], group_index=data["group_index"], ref_logps=ref_logps, beta_kl=0.05,
                         bias=o["bias"], return_metrics=True)

    assert_same_as_eager(step, operands)


def test_kl_metrics_equal_eager(backend):
    operands, data = op_inputs(backend)

    def step(o):
        return fused_multi_teacher_kl(o["hidden"], o["weight"], [operands["teacher_hidden"]] * 2,
                                      [operands["teacher_weight"]] * 2, mask=data["mask"], divergence="jsd",
                                      aggregate="mean", student_bias=o["bias"], return_metrics=True)

    assert_same_as_eager(step, operands)


def test_linear_logprobs_backward_takes_the_upstream_gradients(backend):
    operands, data = op_inputs(backend)
    weights = torch.randn(data["targets"].shape, generator=torch.Generator().manual_seed(2))

    def step(o):
        logps, entropy = fused_linear_logprobs(o["hidden"], o["weight"], data["targets"], bias=o["bias"],
                                               temperature=0.8, return_entropy=True)
        return (weights * logps).sum() + entropy.square().sum(), {"logps": logps.detach()}

    assert_same_as_eager(step, operands)


def test_scoring_under_no_grad_compiles(backend):
    operands, data = op_inputs(backend)

    def score(o):
        with torch.no_grad():
            return fused_linear_logprobs(o["hidden"], o["weight"], data["targets"], bias=o["bias"])

    compiled = torch.compile(score, fullgraph=True, backend="aot_eager")(operands)
    torch.testing.assert_close(compiled, score(operands), rtol=0, atol=0)


def test_upstream_gradient_scales_the_loss_gradients():
    operands, data = grpo_inputs("cpu")

    def step(o):
        return 3.0 * fused_grpo_loss(o["hidden"], o["weight"], data["targets"], data["advantages"],
                                     mask=data["mask"], bias=o["bias"]), {}

    assert_same_as_eager(step, operands)


def test_bf16_operands_equal_eager():
    operands, data = grpo_inputs("cpu", dtype=torch.bfloat16)

    def step(o):
        return fused_grpo_loss(o["hidden"], o["weight"], data["targets"], data["advantages"], mask=data["mask"],
                               old_logps=data["old_logps"], bias=o["bias"]), {}

    assert_same_as_eager(step, operands)


def test_autocast_equals_eager():
    operands, data = grpo_inputs("cpu")

    def step(o):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return fused_grpo_loss(o["hidden"], o["weight"], data["targets"], data["advantages"],
                                   mask=data["mask"], bias=o["bias"]), {}

    assert_same_as_eager(step, operands)


def test_a_compiled_training_step_has_no_graph_break():
    """A model's forward and the loss in one graph (AOTAutograd compiles its backward): the parameters get eager
    mode's gradients."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(48, 16), torch.nn.Linear(16, 16), torch.nn.Tanh())
    head = torch.nn.Linear(16, 48, bias=False)
    tokens = torch.randint(0, 48, (4, 8))
    advantages = torch.randn(4)

    def step(tokens):
        hidden = model(tokens[:, :-1])
        loss, metrics = fused_grpo_loss(hidden, head.weight, tokens[:, 1:], advantages, loss_type="dapo",
                                        entropy_coef=0.01, return_metrics=True)
        return loss, metrics["mean_entropy"]

    parameters = [*model.parameters(), head.weight]
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(tokens)
    compiled[0].backward()
    compiled_grads = [p.grad.clone() for p in parameters]
    for p in parameters:
        p.grad = None
    eager = step(tokens)
    eager[0].backward()
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)
    for compiled_grad, p in zip(compiled_grads, parameters):
        torch.testing.assert_close(compiled_grad, p.grad, rtol=0, atol=0)


def test_inductor_equals_eager():
    operands, data = op_inputs("cpu")
    assert_same_as_eager(lambda o: (OPS["dypo"](o, data), {}), operands, backend="inductor")


def test_bad_input_is_eager_modes_error():
    operands, data = op_inputs("cpu")

    def step(o):
        return fused_grpo_loss(o["hidden"], o["weight"], data["targets"], data["advantages"][:3], mask=data["mask"])

    with pytest.raises(ValueError, match="advantages"):
        torch.compile(step, fullgraph=True, backend="aot_eager")(operands)
