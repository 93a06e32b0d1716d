"""The chunk's row statistics and logit gradient against float64 evaluations of the same formulas."""

import pytest
import torch

from dypo_kernels.vocab_pass import triton_pass
from tests.conftest import HAS_CUDA

DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
TINY = torch.finfo(torch.float32).tiny
SHAPES = [(1, 1), (3, 32), (4, 100), (2, 257)]  # (R, V): one partial block, one full, several with a partial tail
# logits: sd 3; peaked (sd 32: most softmax entries underflow); a low temperature's offset (1e3 + sd 2) and spread
SCALES = ["normal", "peaked", "offset", "cold"]


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    monkeypatch.setattr(triton_pass, "BLOCK_V", 32)  # tiny vocabularies still cross several blocks


def make_logits(rows, vocab, scale, seed):
    generator = torch.Generator().manual_seed(seed)
    z = torch.randn(rows, vocab, generator=generator, dtype=torch.float64)
    z = {"normal": 3 * z, "peaked": 32 * z, "offset": 1e3 + 2 * z, "cold": 1e3 * z}[scale]
    targets = torch.randint(0, vocab, (rows,), generator=generator)
    coefs = torch.randn(2, rows, generator=generator)
    return (z.float().to(DEVICE), targets.to(DEVICE), coefs[0].to(DEVICE), coefs[1].to(DEVICE))


def reference_stats(z, targets):
    z = z.double()
    lse = z.logsumexp(-1)
    p = torch.exp(z - lse[:, None])
    entropy = lse - torch.where(p > 0, p * z, 0).sum(-1)
    return lse, z.gather(1, targets[:, None])[:, 0], entropy


def reference_gradient(z, targets, lse, entropy, coef_logp, coef_entropy):
    """(gradient, bound): the formula in float64 from the kernel's own fp32 inputs, and the sum of its terms'
    magnitudes, the scale of fp32's rounding errors in each entry."""
    z, lse, entropy, coef_logp = (t.double() for t in (z, lse, entropy, coef_logp))
    log_p = z - lse[:, None]
    p = torch.exp(log_p)
    onehot = torch.nn.functional.one_hot(targets, z.shape[1]).double()
    gradient = coef_logp[:, None] * (onehot - p)
    bound = coef_logp.abs()[:, None] * (onehot + p)
    if coef_entropy is not None:
        coef_entropy = coef_entropy.double()[:, None]
        mean_z = (lse - entropy)[:, None]
        gradient -= coef_entropy * torch.where(p > 0, p * (z - mean_z), 0)
        bound += coef_entropy.abs() * torch.where(p > 0, p * (log_p.abs() + entropy.abs()[:, None]), 0)
    return gradient, bound


def assert_gradient_close(out, expected, bound):
    """Within fp32's error (p's relative error grows with |log p|, up to ~1e-5 where p underflows), plus one
    rounding to out's dtype (two ulps for bf16: the interpreter truncates), and fp32's flush of subnormals."""
    finfo = torch.finfo(out.dtype)
    ulps = 1 if out.dtype == torch.float32 else 2
    tolerance = 3e-5 * bound + TINY + ulps * finfo.eps * expected.abs() + finfo.tiny * finfo.eps
    error = (out.double().cpu() - expected.cpu()).abs()
    assert (error <= tolerance.cpu()).all(), (error - tolerance.cpu()).max()


def assert_no_subnormals(out):
    assert ((out != 0) & (out.abs() < TINY)).sum() == 0


def kernel_gradient(z, targets, coef_logp, coef_entropy, out_kind="fp32"):
    """logit_gradient from row_stats' lse and entropy, into a NaN-filled out (or over z for "in_place")."""
    lse, _, entropy = triton_pass.row_stats(z, targets)
    dtype = {"in_place": torch.float32, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[out_kind]
    out = z if out_kind == "in_place" else torch.full(z.shape, float("nan"), dtype=dtype, device=DEVICE)
    expected, bound = reference_gradient(z, targets, lse, entropy, coef_logp, coef_entropy)
    result = triton_pass.logit_gradient(z, targets, lse, entropy, coef_logp, coef_entropy, out)
    assert result is out
    return out, expected, bound


@pytest.mark.parametrize("rows,vocab", SHAPES)
@pytest.mark.parametrize("scale", SCALES)
def test_row_stats(rows, vocab, scale):
    z, targets, _, _ = make_logits(rows, vocab, scale, seed=rows * vocab)
    lse, target_logit, entropy = triton_pass.row_stats(z, targets)
    expected_lse, expected_target, expected_entropy = reference_stats(z, targets)
    assert all(t.dtype == torch.float32 and t.shape == (rows,) for t in (lse, target_logit, entropy))
    # lse to its own rounding at |z| ~ 1e3; the entropy to 1e-5 there too (lse - E[z] in fp32 would miss by 6e-5)
    torch.testing.assert_close(lse.double(), expected_lse, rtol=3e-7, atol=1e-5)
    torch.testing.assert_close(entropy.double(), expected_entropy, rtol=1e-5, atol=1e-5)
    assert torch.equal(target_logit.double(), expected_target)


@pytest.mark.parametrize("rows,vocab", SHAPES)
@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("with_entropy", [False, True])
def test_logit_gradient(rows, vocab, scale, with_entropy):
    z, targets, coef_logp, coef_entropy = make_logits(rows, vocab, scale, seed=rows * vocab + 1)
    out, expected, bound = kernel_gradient(z, targets, coef_logp, coef_entropy if with_entropy else None)
    assert_gradient_close(out, expected, bound)
    assert_no_subnormals(out)


@pytest.mark.parametrize("out_kind", ["in_place", "fp32", "fp16", "bf16"])
@pytest.mark.parametrize("with_entropy", [False, True])
def test_logit_gradient_out_dtypes(out_kind, with_entropy):
    z, targets, coef_logp, coef_entropy = make_logits(5, 150, "normal", seed=7)
    out, expected, bound = kernel_gradient(z, targets, coef_logp, coef_entropy if with_entropy else None, out_kind)
    assert out.dtype == {"fp16": torch.float16, "bf16": torch.bfloat16}.get(out_kind, torch.float32)
    assert_gradient_close(out, expected, bound)
    if out_kind == "in_place":
        assert out.data_ptr() == z.data_ptr()


@pytest.mark.parametrize("with_entropy", [False, True])
def test_underflowing_entries_are_written_as_zero(with_entropy):
    z, targets, coef_logp, coef_entropy = make_logits(4, 300, "peaked", seed=11)
    out, expected, bound = kernel_gradient(z, targets, coef_logp, coef_entropy if with_entropy else None)
    assert ((expected != 0) & (expected.abs() < TINY)).sum() > 20  # the reference does have subnormal entries
    assert_no_subnormals(out)
    assert_gradient_close(out, expected, bound)


def test_negative_infinite_logits_contribute_nothing():
    z, targets, coef_logp, coef_entropy = make_logits(4, 100, "normal", seed=13)
    masked = torch.rand(z.shape, generator=torch.Generator().manual_seed(13)) < 0.3
    masked[1] = True
    masked[1, 5] = False  # a row with one finite logit: p = 1 there
    masked[2, targets[2].item()] = True  # a target at -inf: target logit -inf, its gradient coef_logp
    masked = masked.to(DEVICE)
    z[masked] = float("-inf")
    lse, target_logit, entropy = triton_pass.row_stats(z, targets)
    expected_lse, expected_target, expected_entropy = reference_stats(z, targets)
    torch.testing.assert_close(lse.double(), expected_lse, rtol=3e-7, atol=1e-5)
    torch.testing.assert_close(entropy.double(), expected_entropy, rtol=1e-5, atol=1e-5)
    assert torch.equal(target_logit.double(), expected_target) and target_logit[2] == float("-inf")
    out, expected, bound = kernel_gradient(z, targets, coef_logp, coef_entropy)
    assert not out.isnan().any()
    assert_gradient_close(out, expected, bound)
    assert torch.equal(out[masked].double(), expected[masked])  # coef_logp at a target, else exactly 0


def test_nan_propagates_to_its_row_only():
    z, targets, coef_logp, coef_entropy = make_logits(4, 100, "normal", seed=17)
    z[2, 40] = float("nan")
    lse, _, entropy = triton_pass.row_stats(z, targets)
    assert lse[2].isnan() and entropy[2].isnan()
    assert not lse[[0, 1, 3]].isnan().any() and not entropy[[0, 1, 3]].isnan().any()
    out, expected, bound = kernel_gradient(z, targets, coef_logp, coef_entropy)
    assert out[2].isnan().all()
    keep = [0, 1, 3]
    assert_gradient_close(out[keep], expected[keep], bound[keep])


def test_production_block_size(monkeypatch):
    monkeypatch.setattr(triton_pass, "BLOCK_V", 4096)
    z, targets, coef_logp, coef_entropy = make_logits(2, 2 * 4096 + 48, "peaked", seed=19)
    lse, target_logit, entropy = triton_pass.row_stats(z, targets)
    expected_lse, expected_target, expected_entropy = reference_stats(z, targets)
    torch.testing.assert_close(lse.double(), expected_lse, rtol=3e-7, atol=1e-5)
    torch.testing.assert_close(entropy.double(), expected_entropy, rtol=1e-5, atol=1e-5)
    out, expected, bound = kernel_gradient(z, targets, coef_logp, coef_entropy, "bf16")
    assert_gradient_close(out, expected, bound)
    assert_no_subnormals(out)


def test_reference_gradient_is_the_losses_gradient():
    """The formula the kernel implements is d/dz of sum_r coef_logp log p(y) + coef_entropy H (float64 autograd)."""
    z, targets, coef_logp, coef_entropy = make_logits(3, 20, "normal", seed=23)
    z = z.double().cpu().requires_grad_()
    log_p = z.log_softmax(-1)
    entropy = -(log_p.exp() * log_p).sum(-1)
    loss = (coef_logp.cpu() * log_p.gather(1, targets.cpu()[:, None])[:, 0] + coef_entropy.cpu() * entropy).sum()
    (expected,) = torch.autograd.grad(loss, z)
    lse, _, ref_entropy = reference_stats(z.detach(), targets.cpu())
    gradient, _ = reference_gradient(z.detach(), targets.cpu(), lse, ref_entropy, coef_logp.cpu(), coef_entropy.cpu())
    torch.testing.assert_close(gradient, expected)


@pytest.mark.parametrize("inv_temperature", [0.5, 1.7])
def test_the_temperature_is_applied_as_the_logits_load(inv_temperature):
    """Both passes on the raw products with inv_temperature give what they give on the divided logits."""
    products, targets, coef_logp, coef_entropy = make_logits(3, 100, "normal", seed=5)
    divided = products * inv_temperature
    for stat, expected in zip(triton_pass.row_stats(products, targets, inv_temperature),
                              triton_pass.row_stats(divided, targets)):
        torch.testing.assert_close(stat, expected, rtol=1e-6, atol=1e-6)
    lse, _, entropy = triton_pass.row_stats(divided, targets)
    scaled = triton_pass.logit_gradient(products, targets, lse, entropy, coef_logp, coef_entropy,
                                        torch.empty_like(products), inv_temperature)
    plain = triton_pass.logit_gradient(divided, targets, lse, entropy, coef_logp, coef_entropy,
                                       torch.empty_like(divided))
    torch.testing.assert_close(scaled, plain, rtol=1e-5, atol=1e-7)
