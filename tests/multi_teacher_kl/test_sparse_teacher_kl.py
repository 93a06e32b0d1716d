import math

import pytest
import torch

from dypo_kernels import fused_multi_teacher_kl, fused_sparse_teacher_kl, reference
from tests.conftest import relative_error


def sparse_batch(device, num_teachers, ks=(7, 12, 3), leading=(3, 5), vocab_size=101, seed=0):
    generator = torch.Generator().manual_seed(seed)
    student = dict(student_hidden=torch.randn(*leading, 24, generator=generator).to(device).requires_grad_(),
                   student_weight=(torch.randn(vocab_size, 24, generator=generator) / math.sqrt(24) * 3).to(device)
                   .requires_grad_(),
                   student_bias=torch.randn(vocab_size, generator=generator).to(device).requires_grad_())
    ids, logps = [], []
    for k in ks[:num_teachers]:
        teacher = torch.log_softmax(torch.randn(*leading, vocab_size, generator=generator) * 2, -1)
        top = teacher.topk(k, -1)
        ids.append(top.indices.to(device))
        logps.append(top.values.to(device))
    mask = (torch.rand(leading, generator=generator) > 0.3).to(device)
    return student, ids, logps, mask


@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
@pytest.mark.parametrize("num_teachers", [1, 3])
def test_matches_float64_reference(backend, tail, num_teachers):
    student, ids, logps, mask = sparse_batch(backend, num_teachers)
    coefs = [0.5, 0.2, 0.3] if num_teachers == 3 else None
    kwargs = dict(mask=mask, teacher_coefs=coefs, tail=tail, temperature=0.7)
    loss = fused_sparse_teacher_kl(**student, teacher_token_ids=ids, teacher_logps=logps, **kwargs)
    expected = reference.sparse_teacher_kl(**student, teacher_token_ids=ids, teacher_logps=logps, **kwargs)
    assert relative_error(loss, expected) < 1e-5
    params = list(student.values())
    for grad, ref in zip(torch.autograd.grad(loss, params), torch.autograd.grad(expected, params)):
        assert relative_error(grad, ref) < 1e-5


@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
def test_full_support_is_the_dense_forward_kl(backend, tail):
    """k = V: the sparse teacher is the dense one, and both tails give fused_multi_teacher_kl's forward KL."""
    generator = torch.Generator().manual_seed(3)
    hidden = torch.randn(11, 16, generator=generator).to(backend).requires_grad_()
    weight = (torch.randn(50, 16, generator=generator) / 2).to(backend).requires_grad_()
    teacher_hidden, teacher_weight = torch.randn(11, 8, generator=generator), torch.randn(50, 8, generator=generator)
    teacher_logps = torch.log_softmax(teacher_hidden @ teacher_weight.T, -1)
    order = teacher_logps.argsort(-1, descending=True)
    loss = fused_sparse_teacher_kl(hidden, weight, [order.to(backend)], [teacher_logps.gather(-1, order).to(backend)],
                                   tail=tail)
    dense = fused_multi_teacher_kl(hidden, weight, [teacher_hidden.to(backend)], [teacher_weight.to(backend)])
    assert relative_error(loss, dense) < 1e-5
    for grad, ref in zip(torch.autograd.grad(loss, [hidden, weight]), torch.autograd.grad(dense, [hidden, weight])):
        assert relative_error(grad, ref) < 1e-5


def test_zero_probability_entries_give_no_nan(backend):
    student, ids, logps, mask = sparse_batch(backend, 2)
    logps[0] = logps[0].clone()
    logps[0][..., -2:] = float("-inf")  # the teacher gives 0 to the last two of its listed tokens
    for tail in ("bucket", "renormalize"):
        loss = fused_sparse_teacher_kl(**student, teacher_token_ids=ids, teacher_logps=logps, mask=mask, tail=tail)
        grads = torch.autograd.grad(loss, list(student.values()))
        assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads)
        expected = reference.sparse_teacher_kl(**student, teacher_token_ids=ids, teacher_logps=logps, mask=mask,
                                               tail=tail)
        assert relative_error(loss, expected) < 1e-5


def bad_inputs():
    ids = torch.tensor([[0, 1], [2, 3], [4, 5], [6, 7]])
    logps = torch.full((4, 2), -1.0)
    duplicated = ids.clone()
    duplicated[1, 1] = 2
    return [
        (dict(teacher_token_ids=[], teacher_logps=[]), "at least one teacher"),
        (dict(teacher_logps=[logps, logps]), "teacher_logps has 2"),
        (dict(teacher_token_ids=[ids + 100]), "teacher_token_ids\\[0\\] must lie in"),
        (dict(teacher_token_ids=[duplicated]), "repeats a token id"),
        (dict(teacher_logps=[logps + 1.5]), "log-probabilities"),
        (dict(teacher_logps=[torch.full((4, 2), -0.1)]), "sum to more than 1"),
        (dict(teacher_token_ids=[ids[:3]], teacher_logps=[logps[:3]]), "leading shape"),
        (dict(teacher_logps=[logps[:, :1]]), "teacher_logps\\[0\\]"),
        (dict(teacher_token_ids=ids), "must be a list"),
        (dict(tail="drop"), "tail.*'bucket', 'renormalize'"),
        (dict(teacher_coefs=[0.5]), "teacher_coefs"),
    ], (ids, logps)


@pytest.mark.parametrize("changes,match", bad_inputs()[0])
def test_bad_input_raises_naming_the_argument(changes, match):
    ids, logps = bad_inputs()[1]
    kwargs = dict(student_hidden=torch.randn(4, 8), student_weight=torch.randn(10, 8), teacher_token_ids=[ids],
                  teacher_logps=[logps])
    kwargs.update(changes)
    with pytest.raises((ValueError, TypeError), match=match):
        fused_sparse_teacher_kl(**kwargs)
