"""The one-command GPU report: correctness at real shapes, then time, achieved TFLOP/s and peak memory of every op
and competitor, written as Markdown.

    python -m benchmarks.report                       # CUDA: N = 8,192, D = 4,096, V = 151,936, bf16 -> docs/
    python -m benchmarks.report --shapes tiny --out -  # any machine: the same code path in seconds (tests use it)

1. Correctness: each fused op on the bf16 inputs against an fp32 chunked reference computed from the same (bf16)
   values: token log-probs one chunk of rows at a time without gradients, the loss and dL/dlp from them, then each
   chunk's logits recomputed with autograd and back-propagated with its slice of dL/dlp (the multi-teacher KL: the
   float64-free reference on each chunk, summed). Loss (relative to max(|loss|, 1)) and gradients (relative norm)
   must agree within TOLERANCE.
2. Timing: forward + backward, median of REPEATS after a warm-up, CUDA events; achieved TFLOP/s counts 2NDV per
   matrix product the implementation actually does (benchmarks/cases.py); peak memory from max_memory_allocated
   above the inputs. The bare lm_head products (forward and the two gradient products) are the floor.

Exit status 1 if any correctness check fails. Budget: about 10 minutes on one H100; cases still queued when
DEADLINE_S has passed are listed as not run.
"""

import argparse
import datetime
import statistics
import sys
import time
from pathlib import Path

import torch

from benchmarks import cases
from benchmarks.suite import SHAPES

TOLERANCE = 2e-2
REPEATS = 5
DEADLINE_S = 480
REFERENCE_ROWS = 1024
REPORT_CASES = [("logprobs", 1), ("sft", 1), ("grpo", 1), ("gal", 1), ("dypo", 1), ("kl", 1), ("kl", 2), ("kl", 4)]


def _synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def chunked_reference(case, loss, teachers):
    """fp32 loss and gradients (hidden, weight) of the case's inputs, never holding more than REFERENCE_ROWS rows
    of logits."""
    from dypo_kernels import reference

    hidden = case.inputs["hidden"].detach().float()
    weight = case.inputs["weight"].detach().float().requires_grad_()
    rows = hidden.reshape(-1, hidden.shape[-1])
    grad_rows = torch.zeros_like(rows)
    if loss == "kl":
        teacher_rows = [h.detach().float().reshape(rows.shape[0], -1) for h in case.inputs["teacher_hiddens"]]
        teacher_weights = [w.detach().float() for w in case.inputs["teacher_weights"]]
        total = 0.0
        for start in range(0, rows.shape[0], REFERENCE_ROWS):
            chunk = rows[start:start + REFERENCE_ROWS].clone().requires_grad_()
            part = reference.multi_teacher_kl(chunk, weight, [t[start:start + REFERENCE_ROWS] for t in teacher_rows],
                                              teacher_weights, dtype=torch.float32) * chunk.shape[0] / rows.shape[0]
            part.backward()
            grad_rows[start:start + REFERENCE_ROWS] = chunk.grad
            total += part.item()
        return total, grad_rows.view_as(hidden), weight.grad
    targets = case.inputs["targets"].reshape(-1)
    with torch.no_grad():
        token_logps = torch.cat([reference.token_logprobs(rows[s:s + REFERENCE_ROWS], weight,
                                                          targets[s:s + REFERENCE_ROWS], dtype=torch.float32)[0]
                                 for s in range(0, rows.shape[0], REFERENCE_ROWS)])
    token_logps = token_logps.view(case.inputs["targets"].shape).requires_grad_()
    value = case.loss_of_logps(token_logps)
    (grad_logps,) = torch.autograd.grad(value, token_logps)
    grad_logps = grad_logps.reshape(-1)
    for start in range(0, rows.shape[0], REFERENCE_ROWS):
        chunk = rows[start:start + REFERENCE_ROWS].clone().requires_grad_()
        chunk_logps, _ = reference.token_logprobs(chunk, weight, targets[start:start + REFERENCE_ROWS],
                                                  dtype=torch.float32)
        (chunk_logps * grad_logps[start:start + REFERENCE_ROWS]).sum().backward()
        grad_rows[start:start + REFERENCE_ROWS] = chunk.grad
    return value.item(), grad_rows.view_as(hidden), weight.grad


def relative_error(actual, expected):
    expected = expected.double()
    return ((actual.double() - expected).norm() / expected.norm().clamp(min=1e-30)).item()


def check(loss, teachers, dims, dtype, device):
    """(passed, line): the fused op against the chunked fp32 reference."""
    case = cases.build(loss, "fused", **dims, teachers=teachers, dtype=dtype, device=device)
    value = case.forward()
    grads = torch.autograd.grad(value, case.params)
    ref_value, ref_hidden, ref_weight = chunked_reference(case, loss, teachers)
    # the loss relative to max(|loss|, 1): GRPO's on-policy value is near 0, where a relative error means nothing
    errors = [abs(value.item() - ref_value) / max(abs(ref_value), 1.0), relative_error(grads[0], ref_hidden),
              relative_error(grads[1], ref_weight)]
    passed = all(e < TOLERANCE for e in errors)
    return passed, f"| {loss} m={teachers} | {errors[0]:.1e} | {errors[1]:.1e} | {errors[2]:.1e} | " \
                   f"{'pass' if passed else 'FAIL'} |"


def time_case(case, device):
    """(median seconds, peak extra MB) of forward + backward."""
    case.step()  # warm-up (compilation, autotuning, allocator)
    _synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
    times = []
    for _ in range(REPEATS):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            case.step()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            begin = time.perf_counter()
            case.step()
            times.append(time.perf_counter() - begin)
    peak = (torch.cuda.max_memory_allocated() - baseline) / 2**20 if device.type == "cuda" else float("nan")
    return statistics.median(times), peak


class _BareProducts(torch.autograd.Function):
    """h W^T forward; upstream W and upstream^T h backward: the three products every fused op must at least do."""

    @staticmethod
    def forward(ctx, hidden, weight, upstream):
        ctx.save_for_backward(hidden, weight, upstream)
        return (hidden @ weight.T).sum()

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, upstream = ctx.saved_tensors
        return upstream @ weight, upstream.T @ hidden, None


def bare_products(dims, dtype, device):
    """The floor: forward h W^T and the two gradient products, as plain matrix products."""
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(dims["N"], dims["D"], generator=generator).to(device, dtype).requires_grad_()
    weight = (torch.randn(dims["V"], dims["D"], generator=generator) * dims["D"] ** -0.5).to(device, dtype)
    weight.requires_grad_()
    upstream = torch.randn(dims["N"], dims["V"], generator=generator).to(device, dtype)
    return cases.Case(lambda: _BareProducts.apply(hidden, weight, upstream), [hidden, weight],
                      3 * 2.0 * dims["N"] * dims["D"] * dims["V"])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", choices=tuple(SHAPES), default=None)
    parser.add_argument("--out", default=None, help="Markdown file ('-': stdout); default docs/gpu_report_DATE.md")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shape = SHAPES[args.shapes or ("real" if device.type == "cuda" else "tiny")]
    dims = {k: shape[k] for k in ("N", "D", "V", "T")}
    dtype = shape["dtype"]
    started = time.monotonic()
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 reference stays fp32

    import triton

    machine = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (no CUDA: code-path check only)"
    lines = [f"# dypo-kernels report: {datetime.date.today()}, {machine}",
             f"torch {torch.__version__}, triton {triton.__version__}; N = {dims['N']:,}, D = {dims['D']:,}, "
             f"V = {dims['V']:,}, sequences of {dims['T']} tokens, {str(dtype).replace('torch.', '')}; "
             f"command: `python -m benchmarks.report{' --shapes ' + args.shapes if args.shapes else ''}`", "",
             "## Correctness (bf16 fused op against an fp32 chunked reference on the same inputs)", "",
             "| case | loss rel. error | grad hidden | grad weight | result |", "|---|---|---|---|---|"]
    all_passed = True
    for loss, teachers in REPORT_CASES:
        passed, line = check(loss, teachers, dims, dtype, device)
        all_passed &= passed
        lines.append(line)
        print(line, flush=True)
    lines += ["", "## Forward + backward", "",
              "| case | implementation | time (ms) | TFLOP/s | peak extra memory (MB) | vs naive time | notes |",
              "|---|---|---|---|---|---|---|"]
    floor = bare_products(dims, dtype, device)
    seconds, peak = time_case(floor, device)
    lines.append(f"| lm_head products | bare matmuls | {seconds * 1e3:.1f} | {floor.matmul_flop / seconds / 1e12:.0f} "
                 f"| {peak:.0f} | | the floor: forward + 2 gradient products |")
    for loss, teachers in REPORT_CASES + [("advantages", 1)]:
        naive_seconds = None
        for impl in ("naive", "fused", "liger", "liger-compiled", "cce"):
            label = f"{loss}" + (f" m={teachers}" if loss == "kl" else "")
            if time.monotonic() - started > DEADLINE_S:
                lines.append(f"| {label} | {impl} | not run: past the report's time budget | | | | |")
                continue
            try:
                case = cases.build(loss, impl, **dims, teachers=teachers, dtype=dtype, device=device)
                seconds, peak = time_case(case, device)
            except cases.NotInstalled as exc:
                lines.append(f"| {label} | {impl} | not run: {exc} | | | | |")
                continue
            except cases.Unavailable:
                continue
            except torch.cuda.OutOfMemoryError:
                lines.append(f"| {label} | {impl} | out of memory | | | | |")
                continue
            if impl == "naive":
                naive_seconds = seconds
            tflops = f"{case.matmul_flop / seconds / 1e12:.0f}" if case.matmul_flop else ""
            ratio = f"{seconds / naive_seconds:.2f}x" if naive_seconds else ""
            lines.append(f"| {label} | {impl} | {seconds * 1e3:.1f} | {tflops} | {peak:.0f} | {ratio} | {case.notes} |")
            print(lines[-1], flush=True)
            del case
    text = "\n".join(lines) + "\n"
    if args.out == "-":
        print(text)
    else:
        out = Path(args.out or f"docs/gpu_report_{datetime.date.today()}.md")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        print(f"wrote {out}")
    return 0 if all_passed else 1


if __name__ == "__main__":
    sys.exit(main())
