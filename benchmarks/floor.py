"""The design floor of a dypo_kernels op: the least time its implementation's design allows on a GPU, from two
rates. Its matrix products' FLOP at the rate of large bare bf16 products, plus the bytes its vocabulary passes move
(beyond what the bare products move) at the device-to-device copy bandwidth. The GPU report (benchmarks/report.py)
uses the rates it measures; ``python -m benchmarks.floor`` prints the table it predicts for an H100 SXM and an H200
from their quoted rates. This is a model, not a measurement.

FLOP, for N tokens, hidden size D and vocabulary V (one product of the logits' shape is 2NDV):

| op | chunked | fused |
|---|---|---|
| sft, grpo, gal, dypo (forward + backward) | 6NDV: logits, grad_h, grad_W | 8NDV: the backward recomputes the logits |
| logprobs: fused_linear_logprobs under autograd | 8NDV: the backward recomputes the logits | 8NDV |
| scoring: fused_linear_logprobs under torch.no_grad | 2NDV | 2NDV |
| kl, m teachers of the student's size | 2N(D_s + sum_i D_i)V + 4N D_s V | (none: the KL is chunked only) |

Pass bytes per logit entry (N*V entries), chunked impl only; b = ``operand_bytes`` (2 for bf16), the width of the
bare product's output and of the chunked impl's gradient workspace:
    each fp32 logits product writes 4 B instead of the bare product's b: + (4 - b), once per product of logits
    the stats pass reads the fp32 logits: 4 B
    the gradient pass reads them again and writes the workspace: 4 + b B
    so the losses 12 B (bf16), logprobs 14 B (two logits products), scoring 4 + (4 - b) = 6 B;
    kl: its pass reads the student's and the m teachers' fp32 logits about three times each and writes the
    workspace, (3 + 3m) * 4 + b B, plus (m + 1)(4 - b) B for the m + 1 fp32 logits products.
The fused impl moves no pass bytes (its logit tiles stay in registers); its fp32 atomics into grad_h and grad_W
are not modelled, nor are kernel launches and the per-token coefficients.

Not in the floor either, but listed beside it: the chunked impl accumulates grad_W in fp32 with one in-place product
per wave of chunks, each reading and writing the whole [V, D] fp32 buffer (8 B per entry). Half of chunk_bytes
holds a chunk's fp32 logits, half the 16-bit gradients of a wave (dypo_kernels/sweep.py: chunk_layout): at
V = 151,936, D = 4,096 and the 2 GiB CUDA default, chunks of 1,664 rows in waves of two, about 5 GB per wave: 15 GB
at N = 8,192. Each such product (K = 3,328 rows) does 2K / 8 B = 832 FLOP per byte of its output, over three times an
H100's ridge point (790 TFLOP/s / 3 TB/s = 263): the products' compute should hide it, which the GPU report shows.
"""

import math
from typing import NamedTuple

OPS = ("logprobs", "sft", "grpo", "gal", "dypo", "kl", "scoring")
IMPLS = ("chunked", "fused")
DEFAULT_CHUNK_BYTES = 2 * 2**30  # the library's CUDA default
# quoted rates: dense bf16 achieved on large products, device-to-device copy achieved (bytes read + written)
GPUS = {"H100 SXM": dict(tflops=790.0, bandwidth_gbs=3000.0), "H200": dict(tflops=790.0, bandwidth_gbs=4300.0)}
PREDICTION_SHAPES = [dict(N=8192, D=4096, V=151936), dict(N=16384, D=4096, V=151936)]


class Floor(NamedTuple):
    flop: float  # of the matrix products
    pass_bytes: float  # moved by the vocabulary passes beyond the bare products
    seconds: float  # flop at the product rate + pass_bytes at the copy bandwidth


def _check(op, impl):
    if op not in OPS or impl not in IMPLS:
        raise ValueError(f"unknown op or impl {op!r} x {impl!r}: expected one of {OPS} x {IMPLS}")
    if op == "kl" and impl == "fused":
        raise ValueError("the multi-teacher KL has no fused impl")


def matmul_flop(op, impl, N, D, V, *, teachers=1):
    """FLOP of the matrix products ``impl`` does for ``op`` (the table above; teachers of the student's size)."""
    _check(op, impl)
    product = 2.0 * N * D * V
    if op == "scoring":
        return product
    if op == "kl":
        return (1 + teachers) * product + 2 * product
    return 3 * product if impl == "chunked" and op != "logprobs" else 4 * product


def pass_bytes(op, impl, N, V, *, teachers=1, operand_bytes=2):
    """Bytes the vocabulary passes of ``impl`` move for ``op`` beyond the bare products (the table above)."""
    _check(op, impl)
    if impl == "fused":
        return 0.0
    wider_output = 4 - operand_bytes  # an fp32 logits product's output over the bare product's
    stats, gradient = 4, 4 + operand_bytes
    per_entry = {"scoring": wider_output + stats,
                 "logprobs": 2 * wider_output + stats + gradient,
                 "kl": (1 + teachers) * wider_output + (3 + 3 * teachers) * 4 + operand_bytes}.get(
        op, wider_output + stats + gradient)
    return float(per_entry) * N * V


def grad_weight_accumulation_bytes(op, N, D, V, *, teachers=1, chunk_bytes=DEFAULT_CHUNK_BYTES, operand_bytes=2):
    """About the bytes the chunked impl's fp32 grad_W accumulation reads and writes (not in the floor): 8 B per
    [V, D] entry per wave, as the library lays chunks out on CUDA (a chunk's fp32 logits, the student's and the m
    teachers' for kl, in half of ``chunk_bytes``, rounded down to a multiple of 128 rows; the wave's gradients in the
    other half)."""
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}: expected one of {OPS}")
    if op == "scoring":
        return 0.0
    rows = max(1, chunk_bytes // 2 // (V * 4 * (1 + teachers if op == "kl" else 1)))
    rows -= rows % 128 if rows >= 256 else 0
    wave_rows = max(1, chunk_bytes // 2 // (V * operand_bytes) // rows) * rows
    return math.ceil(N / wave_rows) * V * D * 8.0


def design_floor(op, impl, N, D, V, *, teachers=1, tflops, bandwidth_gbs, operand_bytes=2) -> Floor:
    """The design floor of ``op`` run by ``impl`` at this shape, on a GPU doing ``tflops`` TFLOP/s on large bare
    products and copying ``bandwidth_gbs`` GB/s (bytes read + written)."""
    flop = matmul_flop(op, impl, N, D, V, teachers=teachers)
    moved = pass_bytes(op, impl, N, V, teachers=teachers, operand_bytes=operand_bytes)
    return Floor(flop, moved, flop / (tflops * 1e12) + moved / (bandwidth_gbs * 1e9))


def prediction_table(gpus=GPUS, shapes=PREDICTION_SHAPES):
    """Markdown: the floor (ms) of every op and impl at each shape on each GPU of ``gpus``, from its quoted rates."""
    rows = [("sft, grpo, gal, dypo", "grpo", 1), ("logprobs", "logprobs", 1), ("kl m=1", "kl", 1),
            ("kl m=2", "kl", 2), ("scoring", "scoring", 1)]
    rates = "; ".join(f"{name}: {r['tflops']:.0f} TFLOP/s, {r['bandwidth_gbs'] / 1e3:.1f} TB/s"
                      for name, r in gpus.items())
    lines = [f"Design floor, a model (benchmarks/floor.py), not a measurement: bf16, quoted rates ({rates}); "
             "the fused impl's fp32 atomics not modelled. Beside it, not in the floor: the bytes of the chunked impl's "
             "fp32 grad_W accumulation, one product per wave (2 GiB chunk budget), to add at the copy bandwidth where "
             "the products do "
             "not hide them.", "",
             "| op | impl | N | D | V | matmul TFLOP | pass GB | " + " | ".join(f"{name} (ms)" for name in gpus)
             + " | grad_W accumulation GB (not in the floor) |", "|---|---|---|---|---|---|---|" + "---|" * len(gpus)
             + "---|"]
    for shape in shapes:
        for label, op, teachers in rows:
            for impl in ("chunked",) if op == "kl" else IMPLS:
                floors = [design_floor(op, impl, **shape, teachers=teachers, **rate) for rate in gpus.values()]
                lines.append(f"| {label} | {impl} | {shape['N']:,} | {shape['D']:,} | {shape['V']:,} | "
                             f"{floors[0].flop / 1e12:.1f} | {floors[0].pass_bytes / 1e9:.1f} | "
                             + " | ".join(f"{f.seconds * 1e3:.1f}" for f in floors) + " | "
                             + (f"{grad_weight_accumulation_bytes(op, **shape, teachers=teachers) / 1e9:.0f} |"
                                if impl == "chunked" else "0 |"))
    return "\n".join(lines)


if __name__ == "__main__":
    print(prediction_table())
