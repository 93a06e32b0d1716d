import math

import pytest
import torch

from dypo_kernels import fused_linear_logprobs, reference
from tests.conftest import HAS_CUDA, relative_error

# (leading shape, D, V): N = 1; V and D that no block size divides (37, 101, 250; 24, 40); a 2-D batch
SHAPES = [((1,), 24, 37), ((3, 7), 40, 101), ((2, 33), 64, 250)]
OPTIONS = [dict(), dict(bias=True, temperature=0.7), dict(temperature=2.5, ignore=True)]


def low_precision_dtype(backend_name):
    # Triton's interpreter computes bf16 on bit patterns (docs/testing.md): it is tested with fp16 there
    return torch.float16 if backend_name == "triton" and not HAS_CUDA else torch.bfloat16


def make_inputs(shape, hidden_size, vocab_size, dtype, device, bias=False, ignore=False, seed=0):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*shape, hidden_size, generator=generator)
    weight = torch.randn(vocab_size, hidden_size, generator=generator) / math.sqrt(hidden_size) * 3
    targets = torch.randint(0, vocab_size, shape, generator=generator)
    if ignore:
        targets.view(-1)[::3] = -100
    bias_tensor = torch.randn(vocab_size, generator=generator) if bias else None
    tensors = [hidden, weight, bias_tensor]
    tensors = [None if t is None else t.to(device=device, dtype=dtype).requires_grad_() for t in tensors]
    return (*tensors, targets.to(device))


def run_fused_and_reference(hidden, weight, bias, targets, temperature, dtype=torch.float64):
    logps, entropy = fused_linear_logprobs(hidden, weight, targets, bias=bias, temperature=temperature,
                                           return_entropy=True)
    ref_logps, ref_entropy = reference.token_logprobs(hidden, weight, targets, bias=bias, temperature=temperature,
                                                      dtype=dtype)
    return (logps, entropy), (ref_logps, ref_entropy)


@pytest.mark.parametrize("shape,hidden_size,vocab_size", SHAPES)
@pytest.mark.parametrize("options", OPTIONS, ids=["plain", "bias-temp0.7", "temp2.5-ignore"])
def test_fp32_matches_float64_reference(backend, shape, hidden_size, vocab_size, options):
    hidden, weight, bias, targets = make_inputs(shape, hidden_size, vocab_size, torch.float32, backend,
                                                bias=options.get("bias", False), ignore=options.get("ignore", False))
    temperature = options.get("temperature", 1.0)
    outputs, expected = run_fused_and_reference(hidden, weight, bias, targets, temperature)
    assert outputs[0].dtype == torch.float32 and outputs[0].shape == targets.shape
    for name, out, ref in zip(("logps", "entropy"), outputs, expected):
        assert relative_error(out, ref) < 1e-5, name

    generator = torch.Generator().manual_seed(1)
    grad_logps, grad_entropy = (torch.randn(targets.shape, generator=generator).to(backend) for _ in range(2))
    params = [t for t in (hidden, weight, bias) if t is not None]
    grads = torch.autograd.grad((outputs[0] * grad_logps + outputs[1] * grad_entropy).sum(), params)
    ref_grads = torch.autograd.grad((expected[0] * grad_logps + expected[1] * grad_entropy).sum(), params)
    for name, grad, ref in zip(("hidden", "weight", "bias"), grads, ref_grads):
        assert relative_error(grad, ref) < 1e-5, name
    if options.get("ignore"):
        ignored = targets == -100
        assert torch.all(outputs[0][ignored] == 0) and torch.all(outputs[1][ignored] == 0)
        assert torch.all(grads[0][ignored] == 0)


@pytest.mark.parametrize("shape,hidden_size,vocab_size", SHAPES[1:])
def test_low_precision_within_torch_own_error(backend, request, shape, hidden_size, vocab_size):
    """Error against float64 at most twice that of naive PyTorch in the same dtype (STYLE.md 5)."""
    dtype = low_precision_dtype(request.node.backend_name)
    hidden, weight, bias, targets = make_inputs(shape, hidden_size, vocab_size, dtype, backend, bias=True)
    outputs, expected = run_fused_and_reference(hidden, weight, bias, targets, 0.8)
    naive = reference.token_logprobs(hidden, weight, targets, bias=bias, temperature=0.8, dtype=dtype)
    params = [hidden, weight, bias]
    grad_out = torch.randn(targets.shape, generator=torch.Generator().manual_seed(2)).to(backend)
    grads = torch.autograd.grad((outputs[0] * grad_out + outputs[1]).sum(), params)
    ref_grads = torch.autograd.grad((expected[0] * grad_out + expected[1]).sum(), params)
    naive_grads = torch.autograd.grad((naive[0] * grad_out + naive[1]).sum(), params)
    for out, ref, base in [*zip(outputs, expected, naive), *zip(grads, ref_grads, naive_grads)]:
        assert out.dtype in (torch.float32, dtype)
        assert relative_error(out, ref) <= 2 * relative_error(base, ref) + 1e-5


def test_all_ignored_returns_zeros_and_zero_gradients(backend):
    hidden, weight, bias, targets = make_inputs((2, 5), 16, 40, torch.float32, backend, bias=True)
    targets = torch.full_like(targets, -1)
    logps, entropy = fused_linear_logprobs(hidden, weight, targets, bias=bias, ignore_index=-1, return_entropy=True)
    assert torch.all(logps == 0) and torch.all(entropy == 0)
    grads = torch.autograd.grad((logps + entropy).sum(), [hidden, weight, bias])
    assert all(torch.all(g == 0) for g in grads)


def test_empty_input_returns_empty(backend):
    hidden, weight, _, _ = make_inputs((0,), 16, 40, torch.float32, backend)
    targets = torch.zeros(0, dtype=torch.long, device=backend)
    logps = fused_linear_logprobs(hidden, weight, targets)
    assert logps.shape == (0,)
    logps.sum().backward()
    assert torch.all(weight.grad == 0)


def test_non_finite_hidden_rows_stay_in_their_rows(backend):
    hidden, weight, _, targets = make_inputs((6,), 16, 70, torch.float32, backend)
    hidden = hidden.detach().clone()
    hidden[1, 3] = float("nan")
    hidden[4, 0] = float("inf")
    logps, entropy = fused_linear_logprobs(hidden, weight, targets, return_entropy=True)
    bad = torch.tensor([False, True, False, False, True, False])
    assert not torch.isfinite(logps[bad]).any()
    assert torch.isfinite(logps[~bad]).all() and torch.isfinite(entropy[~bad]).all()


def test_minus_infinity_bias_gives_zero_probability_not_nan(backend):
    hidden, weight, bias, targets = make_inputs((5,), 16, 50, torch.float32, backend, bias=True)
    bias = bias.detach().clone()
    bias[::4] = float("-inf")
    targets = targets.clone()
    targets[targets % 4 == 0] += 1
    logps, entropy = fused_linear_logprobs(hidden, weight, targets, bias=bias, return_entropy=True)
    kept = torch.ones(50, dtype=torch.bool)
    kept[::4] = False
    ref_logps, ref_entropy = reference.token_logprobs(hidden, weight[kept], torch.cumsum(kept, 0)[targets] - 1,
                                                      bias=bias[kept])
    assert relative_error(logps, ref_logps) < 1e-5 and relative_error(entropy, ref_entropy) < 1e-5
    grads = torch.autograd.grad((logps + entropy).sum(), [hidden, weight])
    assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("call,match", [
    (lambda h, w, y: fused_linear_logprobs(h[:, :-1], w, y), "hidden"),
    (lambda h, w, y: fused_linear_logprobs(h, w, y[:-1]), "targets"),
    (lambda h, w, y: fused_linear_logprobs(h, w, y.float()), "targets"),
    (lambda h, w, y: fused_linear_logprobs(h, w, y + 1000), "targets"),
    (lambda h, w, y: fused_linear_logprobs(h, w, y, temperature=0.0), "temperature"),
    (lambda h, w, y: fused_linear_logprobs(h, w, y, temperature=float("nan")), "temperature"),
    (lambda h, w, y: fused_linear_logprobs(h, w.double(), y), "weight"),
    (lambda h, w, y: fused_linear_logprobs(h, w[0], y), "weight"),
    (lambda h, w, y: fused_linear_logprobs(h, w, y, bias=torch.zeros(3)), "bias"),
    (lambda h, w, y: fused_linear_logprobs(h, w, y.to("meta")), "device"),
    (lambda h, w, y: fused_linear_logprobs(h, w, y, temperature=True), "temperature"),
    (lambda h, w, y: fused_linear_logprobs(h, w, y, ignore_index=None), "ignore_index"),
    (lambda h, w, y: fused_linear_logprobs(h[:, :0], w[:, :0], y), "D >= 1"),
    (lambda h, w, y: fused_linear_logprobs(h, w[:0], y), "V >= 1"),
])
def test_bad_input_raises_naming_the_argument(call, match):
    hidden, weight, targets = torch.randn(4, 8), torch.randn(10, 8), torch.randint(0, 10, (4,))
    with pytest.raises((ValueError, TypeError), match=match):
        call(hidden, weight, targets)
