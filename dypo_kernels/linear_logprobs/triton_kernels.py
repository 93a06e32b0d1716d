"""Triton path of fused_linear_logprobs: the projection fused with the vocabulary reductions; logits live only in
registers, one [BLOCK_N, BLOCK_V] tile at a time.

Forward: program (i_n, i_s) computes the logit tiles of rows block i_n over its share i_s of the vocabulary
(``tl.dot`` over D, fp32 accumulator) and keeps the split's running max, sum of exp and sum of exp * (z - max),
and picks the target logit from the tile that holds it. A small torch epilogue merges the splits (verl's
split-vocabulary partials: no locks, entropy for free). Extra memory: 3 fp32 per row and split.

Backward: program (i_n, i_v) recomputes one logit tile, turns it into the logit gradient
(g_lp (onehot - p) - g_H p (z - E[z])) / T, and adds its products with W and h into fp32 gradient buffers with
atomics (Cut Cross-Entropy's scheme). FLOP: forward 2NDV, backward 6NDV.
"""

import torch
import triton
import triton.language as tl

# Tiles by (kernel, input width, GPU generation: 90 for Hopper and newer, 80 for Ampere/Ada), chosen among those
# that compile without register spills in their loops for that target on Triton 3.2, 3.6 and 3.9 (python -m
# dypo_kernels.aot checks each with the installed Triton): the 16-bit ones as large as that allows, the fp32 ones
# with room to spare (ptxas's register use for them varies most between Triton versions).
# Not yet timed on a GPU: the GPU report (benchmarks/report.py) is where to compare them.
CONFIGS = {
    ("forward", "16-bit", 90): dict(BLOCK_N=128, BLOCK_V=128, BLOCK_D=64, num_warps=8, num_stages=3),
    ("forward", "16-bit", 80): dict(BLOCK_N=128, BLOCK_V=128, BLOCK_D=32, num_warps=8, num_stages=3),
    # 64 rows x 8 warps crashes Triton 3.2's compiler on sm_90 (a LinearLayout assertion), hence 128 x 64 there
    ("backward", "16-bit", 90): dict(BLOCK_N=128, BLOCK_V=64, BLOCK_D=64, num_warps=8, num_stages=3),
    ("backward", "16-bit", 80): dict(BLOCK_N=64, BLOCK_V=128, BLOCK_D=64, num_warps=8, num_stages=3),
    ("forward", "fp32", 90): dict(BLOCK_N=64, BLOCK_V=64, BLOCK_D=32, num_warps=8, num_stages=3),
    ("forward", "fp32", 80): dict(BLOCK_N=64, BLOCK_V=64, BLOCK_D=32, num_warps=8, num_stages=3),
    ("backward", "fp32", 90): dict(BLOCK_N=64, BLOCK_V=64, BLOCK_D=16, num_warps=8, num_stages=2),
    ("backward", "fp32", 80): dict(BLOCK_N=64, BLOCK_V=64, BLOCK_D=16, num_warps=8, num_stages=2),
}
TILE_OVERRIDE = {}  # tests in Triton's interpreter set small tiles here
TARGET_PROGRAMS = 1024  # enough (rows block, vocab split) programs to fill an H100/H200 a few times over
MAX_SPLITS = 64


@triton.jit
def _logit_tile(p_h, p_w, p_b, o_n, o_v, m_n, m_v, D, stride_h, stride_w, inv_temperature,
                HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    """z = (h W^T + b) / T for one [BLOCK_N, BLOCK_V] tile, fp32; columns past V are -inf."""
    b_z = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
    o_n = o_n.to(tl.int64)
    o_v = o_v.to(tl.int64)
    for d_start in range(0, D, BLOCK_D):
        o_d = d_start + tl.arange(0, BLOCK_D)
        m_d = o_d < D
        b_h = tl.load(p_h + o_n[:, None] * stride_h + o_d[None, :], mask=m_n[:, None] & m_d[None, :], other=0.0)
        b_w = tl.load(p_w + o_v[:, None] * stride_w + o_d[None, :], mask=m_v[:, None] & m_d[None, :], other=0.0)
        b_z = tl.dot(b_h, tl.trans(b_w), b_z, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        b_z += tl.load(p_b + o_v, mask=m_v, other=0.0).to(tl.float32)[None, :]
    b_z = b_z * inv_temperature
    return tl.where(m_v[None, :], b_z, float("-inf"))


@triton.jit
def _logprobs_fwd_kernel(p_h, p_w, p_b, p_targets, p_max, p_sum_exp, p_sum_exp_shifted, p_target_logit,
                         N, V, D, stride_h, stride_w, inv_temperature, tiles_per_split,
                         HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    i_n = tl.program_id(0)
    i_s = tl.program_id(1)
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_n = o_n < N
    # int32 (V < 2^31), compared with the tile's local columns: an int64 [BLOCK_N, BLOCK_V] comparison alone
    # took more registers than the logit tile and made the kernel spill
    b_targets = tl.load(p_targets + o_n, mask=m_n, other=-1).to(tl.int32)
    b_max = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
    b_sum_exp = tl.zeros([BLOCK_N], dtype=tl.float32)
    b_sum_exp_shifted = tl.zeros([BLOCK_N], dtype=tl.float32)  # sum of e * (z - b_max)
    b_target_logit = tl.zeros([BLOCK_N], dtype=tl.float32)
    split_start = i_s * tiles_per_split * BLOCK_V
    for i_t in range(0, tiles_per_split):
        tile_start = split_start + i_t * BLOCK_V
        o_v = tile_start + tl.arange(0, BLOCK_V)
        m_v = o_v < V
        b_z = _logit_tile(p_h, p_w, p_b, o_n, o_v, m_n, m_v, D, stride_h, stride_w, inv_temperature,
                          HAS_BIAS, DOT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_D)
        is_target = tl.arange(0, BLOCK_V)[None, :] == (b_targets - tile_start)[:, None]
        b_target_logit += tl.sum(tl.where(is_target, b_z, 0.0), axis=1)
        new_max = tl.maximum(b_max, tl.max(b_z, axis=1))
        # rows whose split holds only -inf so far keep a finite reference point, so no -inf - -inf appears
        ref = tl.where(new_max == float("-inf"), 0.0, new_max)
        rescale = tl.exp(b_max - ref)
        shift = tl.where(b_max == float("-inf"), 0.0, b_max - ref)
        b_shifted = b_z - ref[:, None]
        b_e = tl.exp(b_shifted)
        b_sum_exp_shifted = rescale * (b_sum_exp_shifted + b_sum_exp * shift) + \
            tl.sum(tl.where(b_e > 0.0, b_e * b_shifted, 0.0), axis=1)
        b_sum_exp = rescale * b_sum_exp + tl.sum(b_e, axis=1)
        b_max = new_max
    o_partial = i_s * N + o_n
    tl.store(p_max + o_partial, b_max, mask=m_n)
    tl.store(p_sum_exp + o_partial, b_sum_exp, mask=m_n)
    tl.store(p_sum_exp_shifted + o_partial, b_sum_exp_shifted, mask=m_n)
    has_target = (b_targets >= split_start) & (b_targets < split_start + tiles_per_split * BLOCK_V) & (b_targets < V)
    tl.store(p_target_logit + o_n, b_target_logit, mask=m_n & has_target)


@triton.jit
def _logprobs_bwd_kernel(p_h, p_w, p_b, p_targets, p_lse, p_entropy, p_grad_logp, p_grad_entropy,
                         p_grad_h, p_grad_w, p_grad_b, N, V, D, stride_h, stride_w, inv_temperature,
                         HAS_BIAS: tl.constexpr, HAS_GRAD_ENTROPY: tl.constexpr, NEEDS_GRAD_H: tl.constexpr,
                         NEEDS_GRAD_W: tl.constexpr, NEEDS_GRAD_B: tl.constexpr, DOT_PRECISION: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    i_n = tl.program_id(0)
    i_v = tl.program_id(1)
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    o_v = i_v * BLOCK_V + tl.arange(0, BLOCK_V)
    m_n = o_n < N
    m_v = o_v < V
    b_z = _logit_tile(p_h, p_w, p_b, o_n, o_v, m_n, m_v, D, stride_h, stride_w, inv_temperature,
                      HAS_BIAS, DOT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_D)
    b_lse = tl.load(p_lse + o_n, mask=m_n, other=0.0)
    b_grad_logp = tl.load(p_grad_logp + o_n, mask=m_n, other=0.0) * inv_temperature
    b_p = tl.exp(b_z - b_lse[:, None])
    b_targets = tl.load(p_targets + o_n, mask=m_n, other=-1).to(tl.int32)  # int32 as in the forward
    is_target = tl.arange(0, BLOCK_V)[None, :] == (b_targets - i_v * BLOCK_V)[:, None]
    b_grad_z = b_grad_logp[:, None] * (tl.where(is_target, 1.0, 0.0) - b_p)
    if HAS_GRAD_ENTROPY:
        b_mean_z = b_lse - tl.load(p_entropy + o_n, mask=m_n, other=0.0)
        b_grad_entropy = tl.load(p_grad_entropy + o_n, mask=m_n, other=0.0) * inv_temperature
        b_grad_z -= b_grad_entropy[:, None] * tl.where(b_p > 0.0, b_p * (b_z - b_mean_z[:, None]), 0.0)
    b_grad_z = tl.where(m_n[:, None] & m_v[None, :], b_grad_z, 0.0)
    if NEEDS_GRAD_B:
        tl.atomic_add(p_grad_b + o_v, tl.sum(b_grad_z, axis=0), mask=m_v)
    b_grad_z = b_grad_z.to(p_h.dtype.element_ty)
    o_n = o_n.to(tl.int64)  # N*D and V*D can pass 2^31
    o_v = o_v.to(tl.int64)
    for d_start in range(0, D, BLOCK_D):
        o_d = d_start + tl.arange(0, BLOCK_D)
        m_d = o_d < D
        if NEEDS_GRAD_H:
            b_w = tl.load(p_w + o_v[:, None] * stride_w + o_d[None, :], mask=m_v[:, None] & m_d[None, :], other=0.0)
            tl.atomic_add(p_grad_h + o_n[:, None] * D + o_d[None, :],
                          tl.dot(b_grad_z, b_w, input_precision=DOT_PRECISION), mask=m_n[:, None] & m_d[None, :])
        if NEEDS_GRAD_W:
            b_h = tl.load(p_h + o_n[:, None] * stride_h + o_d[None, :], mask=m_n[:, None] & m_d[None, :], other=0.0)
            tl.atomic_add(p_grad_w + o_v[:, None] * D + o_d[None, :],
                          tl.dot(tl.trans(b_grad_z), b_h, input_precision=DOT_PRECISION),
                          mask=m_v[:, None] & m_d[None, :])


def _generation(device):
    return 90 if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9 else 80


def launch_config(kernel, dtype, device):
    """Tiles and launch options of ``kernel`` ("forward" or "backward") for inputs of ``dtype`` on ``device``."""
    width = "fp32" if dtype == torch.float32 else "16-bit"
    return {**CONFIGS[(kernel, width, _generation(device))], **TILE_OVERRIDE}


def _dot_precision(dtype):
    # fp32 inputs get exact fp32 products (tl.dot would use tf32 by default); bf16/fp16 use tensor cores
    return "ieee" if dtype == torch.float32 else "tf32"


def forward(hidden, weight, bias, targets, inv_temperature, config=None):
    """Returns (lse, target_logit, entropy), each fp32 [N], for hidden [N, D] contiguous."""
    config = {**launch_config("forward", hidden.dtype, hidden.device), **(config or {})}
    launch = {k: config[k] for k in ("num_warps", "num_stages")}
    blocks = {k: config[k] for k in ("BLOCK_N", "BLOCK_V", "BLOCK_D")}
    N, D = hidden.shape
    V = weight.shape[0]
    row_blocks = triton.cdiv(N, blocks["BLOCK_N"])
    vocab_tiles = triton.cdiv(V, blocks["BLOCK_V"])
    splits = max(1, min(MAX_SPLITS, vocab_tiles, TARGET_PROGRAMS // row_blocks))
    tiles_per_split = triton.cdiv(vocab_tiles, splits)
    splits = triton.cdiv(vocab_tiles, tiles_per_split)
    partial_max, partial_sum_exp, partial_sum_exp_shifted = (
        torch.empty(splits, N, dtype=torch.float32, device=hidden.device) for _ in range(3))
    target_logit = torch.empty(N, dtype=torch.float32, device=hidden.device)
    _logprobs_fwd_kernel[(row_blocks, splits)](
        hidden, weight, bias if bias is not None else hidden, targets, partial_max, partial_sum_exp,
        partial_sum_exp_shifted, target_logit, N, V, D, hidden.stride(0), weight.stride(0), inv_temperature,
        tiles_per_split, HAS_BIAS=bias is not None, DOT_PRECISION=_dot_precision(hidden.dtype), **blocks, **launch)
    lse, entropy = merge_splits(partial_max, partial_sum_exp, partial_sum_exp_shifted)
    return lse, target_logit, entropy


def merge_splits(partial_max, partial_sum_exp, partial_sum_exp_shifted):
    """Merge per-split (max, sum e, sum e (z - max)) [S, N] into (lse, entropy) [N]."""
    row_max = partial_max.max(0).values
    ref = torch.where(torch.isneginf(row_max), 0.0, row_max)
    rescale = torch.exp(partial_max - ref)
    shift = torch.where(torch.isneginf(partial_max), 0.0, partial_max - ref)
    sum_exp = (rescale * partial_sum_exp).sum(0)
    sum_exp_shifted = (rescale * (partial_sum_exp_shifted + partial_sum_exp * shift)).sum(0)
    log_sum = sum_exp.log()
    return ref + log_sum, log_sum - sum_exp_shifted / sum_exp


def backward(hidden, weight, bias, targets, lse, entropy, grad_logp, grad_entropy, inv_temperature,
             needs_input_grad, config=None):
    """Gradients of sum(grad_logp * logp + grad_entropy * entropy) for hidden, weight, bias (None if not needed),
    accumulated in fp32 and returned in the inputs' dtypes."""
    config = {**launch_config("backward", hidden.dtype, hidden.device), **(config or {})}
    launch = {k: config[k] for k in ("num_warps", "num_stages")}
    blocks = {k: config[k] for k in ("BLOCK_N", "BLOCK_V", "BLOCK_D")}
    needs_hidden, needs_weight, needs_bias = needs_input_grad
    N, D = hidden.shape
    V = weight.shape[0]
    device = hidden.device
    grad_hidden = torch.zeros(N, D, dtype=torch.float32, device=device) if needs_hidden else None
    grad_weight = torch.zeros(V, D, dtype=torch.float32, device=device) if needs_weight else None
    grad_bias = torch.zeros(V, dtype=torch.float32, device=device) if needs_bias else None
    placeholder = lse
    grid = (triton.cdiv(N, blocks["BLOCK_N"]), triton.cdiv(V, blocks["BLOCK_V"]))
    _logprobs_bwd_kernel[grid](
        hidden, weight, bias if bias is not None else hidden, targets, lse, entropy, grad_logp,
        grad_entropy if grad_entropy is not None else placeholder,
        grad_hidden if needs_hidden else placeholder, grad_weight if needs_weight else placeholder,
        grad_bias if needs_bias else placeholder, N, V, D, hidden.stride(0), weight.stride(0), inv_temperature,
        HAS_BIAS=bias is not None, HAS_GRAD_ENTROPY=grad_entropy is not None, NEEDS_GRAD_H=needs_hidden,
        NEEDS_GRAD_W=needs_weight, NEEDS_GRAD_B=needs_bias, DOT_PRECISION=_dot_precision(hidden.dtype),
        **blocks, **launch)
    return grad_hidden, grad_weight, grad_bias


def aot_specs(dtype="bf16", capability=90):
    """The kernels with the signatures and configs they launch with on GPUs of ``capability`` (80 or 90), for
    ahead-of-time compilation checks (dypo_kernels/aot.py). ``dtype`` is the type of hidden/weight: "bf16",
    "fp16" or "fp32"."""
    pointers = {"p_h": f"*{dtype}", "p_w": f"*{dtype}", "p_b": f"*{dtype}", "p_targets": "*i64"}
    # ":16": multiples of 16 at real shapes (D = 4,096, V = 151,936 or 128,256), as the JIT specialises them
    scalars = {"N": "i32", "V": "i32:16", "D": "i32:16", "stride_h": "i32:16", "stride_w": "i32:16",
               "inv_temperature": "fp32"}
    precision = "ieee" if dtype == "fp32" else "tf32"
    forward_signature = {**pointers, **{name: "*fp32" for name in (
        "p_max", "p_sum_exp", "p_sum_exp_shifted", "p_target_logit")}, **scalars, "tiles_per_split": "i32"}
    backward_signature = {**pointers, **{name: "*fp32" for name in (
        "p_lse", "p_entropy", "p_grad_logp", "p_grad_entropy", "p_grad_h", "p_grad_w", "p_grad_b")}, **scalars}

    def split(config):
        return ({k: config[k] for k in ("BLOCK_N", "BLOCK_V", "BLOCK_D")},
                {k: config[k] for k in ("num_warps", "num_stages")})

    width = "fp32" if dtype == "fp32" else "16-bit"
    forward_blocks, forward_launch = split(CONFIGS[("forward", width, capability)])
    backward_blocks, backward_launch = split(CONFIGS[("backward", width, capability)])
    flags = dict(HAS_BIAS=True, DOT_PRECISION=precision)
    return [
        ("logprobs_fwd", _logprobs_fwd_kernel, forward_signature, {**flags, **forward_blocks}, forward_launch),
        ("logprobs_bwd", _logprobs_bwd_kernel, backward_signature,
         {**flags, "HAS_GRAD_ENTROPY": True, "NEEDS_GRAD_H": True, "NEEDS_GRAD_W": True, "NEEDS_GRAD_B": True,
          **backward_blocks}, backward_launch),
    ]
