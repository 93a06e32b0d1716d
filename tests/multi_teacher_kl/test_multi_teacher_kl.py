import math

import pytest
import torch

from dypo_kernels import fused_multi_teacher_kl, reference
from tests.conftest import HAS_CUDA, relative_error
from tests.linear_logprobs.test_linear_logprobs import low_precision_dtype

TEACHER_SIZES = [16, 40, 24]  # each teacher its own hidden size


@pytest.fixture(autouse=True)
def small_triton_blocks(monkeypatch):
    if not HAS_CUDA:  # tiny vocabularies still cross several blocks in the interpreter
        from dypo_kernels.multi_teacher_kl import triton_kernels

        monkeypatch.setattr(triton_kernels, "BLOCK_V", 32)


def distillation_batch(device, num_teachers, dtype=torch.float32, leading=(3, 5), vocab_size=101, seed=0):
    generator = torch.Generator().manual_seed(seed)

    def make(*shape, scale=1.0):
        return (torch.randn(*shape, generator=generator) * scale).to(device=device, dtype=dtype)

    student = dict(student_hidden=make(*leading, 32).requires_grad_(),
                   student_weight=make(vocab_size, 32, scale=3 / math.sqrt(32)).requires_grad_(),
                   student_bias=make(vocab_size).requires_grad_())
    sizes = TEACHER_SIZES[:num_teachers]
    teachers = dict(teacher_hiddens=[make(*leading, d) for d in sizes],
                    teacher_weights=[make(vocab_size, d, scale=3 / math.sqrt(d)) for d in sizes],
                    teacher_biases=[make(vocab_size) if i == 0 else None for i in range(num_teachers)])
    mask = (torch.rand(leading, generator=generator) > 0.3).to(device)
    return student, teachers, mask


def check_against_reference(student, teachers, tolerance_floor=1e-5, **kwargs):
    """Value and student gradients within max(floor, 4 x naive fp32's own error) of float64."""
    loss = fused_multi_teacher_kl(**student, **teachers, **kwargs)
    expected = reference.multi_teacher_kl(**student, **teachers, **kwargs)
    naive = reference.multi_teacher_kl(**student, **teachers, dtype=torch.float32, **kwargs)
    params = list(student.values())
    grads, ref_grads, naive_grads = (torch.autograd.grad(value, params) for value in (loss, expected, naive))
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert relative_error(loss, expected) <= max(tolerance_floor, 4 * relative_error(naive, expected))
    for name, grad, ref, base in zip(student, grads, ref_grads, naive_grads):
        assert grad.dtype == student[name].dtype
        assert relative_error(grad, ref) <= max(tolerance_floor, 4 * relative_error(base, ref)), name


@pytest.mark.parametrize("num_teachers", [1, 2, 3])
@pytest.mark.parametrize("divergence,jsd_beta", [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.3),
                                                 ("jsd", 0.0), ("jsd", 1.0)])
@pytest.mark.parametrize("aggregate", ["mixture", "mean"])
def test_matches_float64_reference(backend, num_teachers, divergence, jsd_beta, aggregate):
    student, teachers, mask = distillation_batch(backend, num_teachers)
    coefs = [0.5, 0.2, 0.3][:num_teachers] if num_teachers == 3 else None
    check_against_reference(student, teachers, mask=mask, teacher_coefs=coefs, divergence=divergence,
                            jsd_beta=jsd_beta, aggregate=aggregate, temperature=0.7)


@pytest.mark.parametrize("temperature", [0.1, 1.0, 10.0])
@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
def test_temperatures_and_scaling(backend, temperature, divergence):
    student, teachers, mask = distillation_batch(backend, 2)
    check_against_reference(student, teachers, mask=mask, divergence=divergence, temperature=temperature,
                            scale_by_temperature_sq=True)


def test_zero_teacher_probabilities_give_no_nan(backend):
    """-inf teacher logits (p = 0): 0 log 0 = 0 in every divergence; the reverse KL stays finite where another
    teacher covers the token."""
    student, teachers, mask = distillation_batch(backend, 2)
    blocked = torch.zeros(101, device=backend)
    blocked[::3] = float("-inf")
    teachers["teacher_biases"] = [blocked, None]
    for divergence in ("forward_kl", "reverse_kl", "jsd"):
        for aggregate in ("mixture", "mean") if divergence != "reverse_kl" else ("mixture",):
            loss = fused_multi_teacher_kl(**student, **teachers, mask=mask, divergence=divergence,
                                          aggregate=aggregate)
            grads = torch.autograd.grad(loss, list(student.values()))
            assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads), (divergence, aggregate)
            expected = reference.multi_teacher_kl(**student, **teachers, mask=mask, divergence=divergence,
                                                  aggregate=aggregate)
            assert relative_error(loss, expected) < 1e-5
            for grad, ref in zip(grads, torch.autograd.grad(expected, list(student.values()))):
                assert relative_error(grad, ref) < 1e-5, (divergence, aggregate)


def test_low_precision_within_torch_own_error(backend, request):
    dtype = low_precision_dtype(request.node.backend_name)
    student, teachers, mask = distillation_batch(backend, 2, dtype=dtype)
    kwargs = dict(mask=mask, divergence="jsd", temperature=0.8)
    loss = fused_multi_teacher_kl(**student, **teachers, **kwargs)
    expected = reference.multi_teacher_kl(**student, **teachers, **kwargs)
    naive = reference.multi_teacher_kl(**student, **teachers, dtype=dtype, **kwargs)
    assert relative_error(loss, expected) <= 2 * relative_error(naive, expected) + 1e-5
    params = list(student.values())
    for grad, ref, base in zip(*(torch.autograd.grad(v, params) for v in (loss, expected, naive))):
        assert grad.dtype == dtype
        assert relative_error(grad, ref) <= 2 * relative_error(base, ref) + 1e-5


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
def test_a_zero_weight_teacher_is_ignored(backend, divergence):
    student, teachers, mask = distillation_batch(backend, 3)
    loss = fused_multi_teacher_kl(**student, **teachers, mask=mask, teacher_coefs=[0.6, 0.0, 0.4],
                                  divergence=divergence, aggregate="mean")
    without = {name: [value[0], value[2]] for name, value in teachers.items()}
    expected = fused_multi_teacher_kl(**student, **without, mask=mask, teacher_coefs=[0.6, 0.4], divergence=divergence,
                                      aggregate="mean")
    assert relative_error(loss, expected) < 1e-6
    params = list(student.values())
    for grad, ref in zip(torch.autograd.grad(loss, params), torch.autograd.grad(expected, params)):
        assert relative_error(grad, ref) < 1e-6


def test_no_token_gives_zero_with_zero_gradients(backend):
    student, teachers, mask = distillation_batch(backend, 2)
    loss = fused_multi_teacher_kl(**student, **teachers, mask=torch.zeros_like(mask))
    assert loss.item() == 0.0
    assert all(torch.all(g == 0) for g in torch.autograd.grad(loss, list(student.values())))


@pytest.mark.skipif(HAS_CUDA, reason="compares on CPU tensors")
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_one_teacher_jsd_matches_liger_kernel(beta):
    pytest.importorskip("liger_kernel")
    from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

    student, teachers, _ = distillation_batch("cpu", 1, leading=(12,))
    student.pop("student_bias")
    teachers.pop("teacher_biases")
    liger = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=beta, temperature=2.0,
                                    compiled=False)
    labels = torch.zeros(12, dtype=torch.long)
    liger_loss = liger(student["student_hidden"], student["student_weight"], teachers["teacher_hiddens"][0],
                       teachers["teacher_weights"][0], labels)
    loss = fused_multi_teacher_kl(**student, **teachers, divergence="jsd", jsd_beta=beta, temperature=2.0)
    assert relative_error(loss, liger_loss) < 1e-4
    params = list(student.values())
    for grad, ref in zip(torch.autograd.grad(loss, params), torch.autograd.grad(liger_loss, params)):
        assert relative_error(grad, ref) < 1e-4


def bad_calls():
    h, w = torch.randn(4, 8), torch.randn(10, 8)
    th, tw = [torch.randn(4, 6)], [torch.randn(10, 6)]
    return [
        (dict(teacher_hiddens=[], teacher_weights=[]), "at least one teacher"),
        (dict(teacher_weights=tw * 2), "teacher_weights has 2"),
        (dict(teacher_weights=[torch.randn(11, 6)]), "vocabulary"),
        (dict(teacher_hiddens=[torch.randn(3, 6)]), "teacher_hiddens\\[0\\]"),
        (dict(teacher_hiddens=th[0]), "teacher_hiddens must be a list"),
        (dict(teacher_coefs=[-0.5]), "teacher_coefs"),
        (dict(teacher_coefs=[0.9]), "teacher_coefs"),
        (dict(teacher_coefs=[0.5, 0.5]), "teacher_coefs"),
        (dict(jsd_beta=1.5), "jsd_beta"),
        (dict(jsd_beta=-0.1), "jsd_beta"),
        (dict(teacher_coefs=[float("nan")]), "teacher_coefs"),
        (dict(teacher_biases=[None, None]), "teacher_biases"),
        (dict(divergence="tv"), "divergence.*'forward_kl', 'reverse_kl', 'jsd'"),
        (dict(aggregate="max"), "aggregate.*'mixture', 'mean'"),
        (dict(temperature=0.0), "temperature"),
        (dict(mask=torch.ones(5)), "mask"),
        (dict(mask=torch.full((4,), 0.5)), "mask must be bool or hold only 0 and 1"),
        (dict(temperature=True), "temperature"),
        (dict(student_weight=torch.randn(10, 7)), "student_hidden"),
    ], (h, w, th, tw)


@pytest.mark.parametrize("changes,match", bad_calls()[0])
def test_bad_input_raises_naming_the_argument(changes, match):
    h, w, th, tw = bad_calls()[1]
    kwargs = dict(student_hidden=h, student_weight=w, teacher_hiddens=th, teacher_weights=tw)
    kwargs.update(changes)
    with pytest.raises((ValueError, TypeError), match=match):
        fused_multi_teacher_kl(**kwargs)


@pytest.mark.parametrize("divergence,aggregate", [("forward_kl", "mixture"), ("forward_kl", "mean"),
                                                  ("reverse_kl", "mixture"), ("jsd", "mean")])
@pytest.mark.parametrize("where", ["one teacher row", "a whole teacher", "one student row"])
def test_a_non_finite_row_gives_a_non_finite_loss(backend, divergence, aggregate, where):
    """The loss and its gradient agree: a NaN input row is a NaN loss, not a finite loss with NaN gradients."""
    student, teachers, _ = distillation_batch(backend, 2)
    if where == "one teacher row":
        teachers["teacher_hiddens"][1][1, 2, 0] = float("nan")
    elif where == "a whole teacher":
        teachers["teacher_hiddens"][0].fill_(float("nan"))
    else:
        student["student_hidden"].data[0, 1, 3] = float("nan")
    loss = fused_multi_teacher_kl(**student, **teachers, divergence=divergence, aggregate=aggregate)
    assert torch.isnan(loss)
    assert torch.isnan(torch.autograd.grad(loss, student["student_hidden"])[0]).any()
