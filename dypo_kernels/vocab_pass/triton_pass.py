"""Triton passes over one chunk of fp32 logits for the log-prob losses: the row statistics and the logit gradient.
They take cuBLAS's product as it is and divide by the temperature as they load (z = product * inv_temperature),
so a temperature costs no extra pass over the chunk.

One program per row, looping over the row in blocks of BLOCK_V; row offsets in int64 (R V can pass 2^31).
Memory-bound: ``row_stats`` reads each logit once (4 B per logit), ``logit_gradient`` reads it once and writes its
gradient once (4 B + out's element size per logit). No atomics: every value is reduced in a fixed order, so the
results are deterministic.
"""

import torch
import triton
import triton.language as tl

BLOCK_V = 4096
NUM_WARPS = 8
FP32_TINY = tl.constexpr(2.0 ** -126)  # fp32's smallest normal, torch.finfo(torch.float32).tiny


@triton.jit
def _row_stats_kernel(p_logits, p_targets, p_lse, p_target_logit, p_entropy, V, inv_temperature,
                      BLOCK_V: tl.constexpr):
    row = tl.program_id(0)
    p_row = p_logits + row.to(tl.int64) * V
    # one scalar max for the row so far, so each logit costs one exp; the sums stay per lane, rescaled by it
    row_max = float("-inf")
    b_sum_exp = tl.zeros([BLOCK_V], dtype=tl.float32)
    b_sum_exp_shifted = tl.zeros([BLOCK_V], dtype=tl.float32)  # sum of e * (z - row_max)
    for v_start in range(0, V, BLOCK_V):
        o_v = v_start + tl.arange(0, BLOCK_V)
        b_z = tl.load(p_row + o_v, mask=o_v < V, other=float("-inf")) * inv_temperature
        new_max = tl.maximum(row_max, tl.max(b_z, axis=0))
        # a row holding only -inf so far keeps a finite reference point, so no -inf - -inf appears
        ref = tl.where(new_max == float("-inf"), 0.0, new_max)
        rescale = tl.exp(row_max - ref)
        shift = tl.where(row_max == float("-inf"), 0.0, row_max - ref)
        b_shifted = b_z - ref
        b_e = tl.exp(b_shifted)
        b_sum_exp_shifted = rescale * (b_sum_exp_shifted + b_sum_exp * shift) + \
            tl.where(b_e > 0.0, b_e * b_shifted, 0.0)
        b_sum_exp = rescale * b_sum_exp + b_e
        row_max = new_max
    ref = tl.where(row_max == float("-inf"), 0.0, row_max)
    sum_exp = tl.sum(b_sum_exp, axis=0)
    log_sum = tl.log(sum_exp)
    tl.store(p_lse + row, ref + log_sum)
    tl.store(p_entropy + row, log_sum - tl.sum(b_sum_exp_shifted, axis=0) / sum_exp)
    tl.store(p_target_logit + row, tl.load(p_row + tl.load(p_targets + row)) * inv_temperature)


@triton.jit
def _logit_gradient_kernel(p_logits, p_targets, p_lse, p_entropy, p_coef_logp, p_coef_entropy, p_out, V,
                           inv_temperature, HAS_ENTROPY: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0)
    o_row = row.to(tl.int64) * V
    # int32 (V < 2^31): an int64 comparison with the block's columns would widen them all to 64 bits
    target = tl.load(p_targets + row).to(tl.int32)
    lse = tl.load(p_lse + row)
    coef_logp = tl.load(p_coef_logp + row)
    if HAS_ENTROPY:
        entropy = tl.load(p_entropy + row)
        coef_entropy = tl.load(p_coef_entropy + row)
    for v_start in range(0, V, BLOCK_V):
        o_v = v_start + tl.arange(0, BLOCK_V)
        m_v = o_v < V
        b_z = tl.load(p_logits + o_row + o_v, mask=m_v, other=float("-inf")) * inv_temperature
        b_log_p = b_z - lse
        b_p = tl.exp(b_log_p)
        b_grad = coef_logp * (tl.where(o_v == target, 1.0, 0.0) - b_p)
        if HAS_ENTROPY:
            # z - (lse - H) as (z - lse) + H: at low temperatures lse - H would round at the logits' scale
            b_grad -= coef_entropy * tl.where(b_p > 0.0, b_p * (b_log_p + entropy), 0.0)
        b_grad = tl.where(tl.abs(b_grad) < FP32_TINY, 0.0, b_grad)  # no subnormals (NaN compares false: kept)
        tl.store(p_out + o_row + o_v, b_grad.to(p_out.dtype.element_ty), mask=m_v)


def row_stats(logits, targets, inv_temperature=1.0):
    """(lse, target_logit, entropy), each fp32 [R], of a chunk's logits z = logits * inv_temperature (logits fp32
    [R, V], contiguous) and targets
    y (int64 [R], in [0, V)): lse = logsumexp(z), target_logit = z[y], entropy = lse - sum_v softmax(z)_v z_v.

    One read of each logit (4 B), an online max with sum e and sum e (z - max) rescaled as it grows; the target
    logit is one scalar load. -inf logits add nothing; a NaN makes its row's lse and entropy NaN. Deterministic."""
    rows, vocab = logits.shape
    lse, target_logit, entropy = (torch.empty(rows, dtype=torch.float32, device=logits.device) for _ in range(3))
    _row_stats_kernel[(rows,)](logits, targets, lse, target_logit, entropy, vocab, float(inv_temperature),
                               BLOCK_V=BLOCK_V, num_warps=NUM_WARPS)
    return lse, target_logit, entropy


def logit_gradient(logits, targets, lse, entropy, coef_logp, coef_entropy, out, inv_temperature=1.0):
    """Writes the gradient with respect to z of sum_r coef_logp[r] log p_r[y_r] + coef_entropy[r] H_r into ``out``
    and returns it: with z = logits * inv_temperature and p = exp(z - lse[r]),

        out[r, v] = coef_logp[r] (1[v == y_r] - p) - coef_entropy[r] p (z - (lse[r] - entropy[r]))

    logits fp32 [R, V] contiguous; targets int64 [R]; lse, entropy, coef_logp fp32 [R] (``row_stats``'s lse and
    entropy); coef_entropy fp32 [R], or None for no entropy term (``entropy`` is then unused and may be None);
    out contiguous [R, V] of fp32, bf16 or fp16, possibly ``logits`` itself (fp32, in place).

    Each value is computed in fp32 and rounded once to out's dtype; values of magnitude below fp32's smallest normal
    are written as 0 (subnormals slow the matrix products that follow and are far below the row's resolution).
    -inf logits get 0 (or coef_logp at the target); a NaN lse gives its row a NaN gradient. One read of each logit
    and one write of its gradient (4 B + out's element size). Deterministic."""
    rows, vocab = logits.shape
    has_entropy = coef_entropy is not None
    _logit_gradient_kernel[(rows,)](logits, targets, lse, entropy if has_entropy else lse, coef_logp,
                                    coef_entropy if has_entropy else coef_logp, out, vocab, float(inv_temperature),
                                    HAS_ENTROPY=has_entropy, BLOCK_V=BLOCK_V, num_warps=NUM_WARPS)
    return out


def aot_specs():
    """The stats kernel and the gradient kernel (out fp32 / bf16, with and without the entropy term), for the
    ahead-of-time compilation checks (dypo_kernels/aot.py)."""
    launch = dict(num_warps=NUM_WARPS, num_stages=1)
    stats_signature = {"p_logits": "*fp32", "p_targets": "*i64", "p_lse": "*fp32", "p_target_logit": "*fp32",
                       "p_entropy": "*fp32", "V": "i32:16", "inv_temperature": "fp32"}

    def gradient_signature(out):
        return {"p_logits": "*fp32", "p_targets": "*i64", "p_lse": "*fp32", "p_entropy": "*fp32",
                "p_coef_logp": "*fp32", "p_coef_entropy": "*fp32", "p_out": f"*{out}", "V": "i32:16",
                "inv_temperature": "fp32"}

    # out spelled bfloat16, not bf16: names with "bf16" are the 16-bit GEMM kernels the AOT tests expect wgmma of
    return [("vocab_row_stats", _row_stats_kernel, stats_signature, dict(BLOCK_V=BLOCK_V), launch)] + [
        (f"vocab_logit_gradient[{name},{'entropy' if has_entropy else 'logp'}]", _logit_gradient_kernel,
         gradient_signature(out), dict(HAS_ENTROPY=has_entropy, BLOCK_V=BLOCK_V), launch)
        for out, name in (("fp32", "float32"), ("bf16", "bfloat16")) for has_entropy in (True, False)]
