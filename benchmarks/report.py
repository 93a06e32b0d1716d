"""The one-command GPU report: the machine's rates, correctness at real shapes, then time, achieved TFLOP/s, design
floor and peak memory of every op in both dypo_kernels impls and of every competitor, written as Markdown.

    sh benchmarks/gpu_session.sh                       # a GPU session: installs the carried wheels, runs this
    python -m benchmarks.report                        # CUDA: bf16, D = 4,096, V = 151,936 at N = 8,192 and 16,384
    python -m benchmarks.report --shapes tiny --out -  # any machine: the same code path in seconds (tests use it)

1. Rates: the copy bandwidth (bytes read + written by a 1 GiB device-to-device ``copy_``) and, at each N, the bare
   products' rate: TFLOP/s of h W^T forward and its two gradient products (upstream W, upstream^T h) backward, as
   plain matrix products.
2. Correctness at the first N: each op in each impl on the bf16 inputs against an fp32 chunked reference computed
   once from the same (bf16) values: token log-probs one chunk of rows at a time without gradients, the loss and
   dL/dlp from them, then each chunk's logits recomputed with autograd and back-propagated with its slice of dL/dlp
   (the multi-teacher KL: the float64-free reference on each chunk, summed). Loss (relative to max(|loss|, 1)) and
   gradients (relative norm) must agree within TOLERANCE.
3. Timing at N and 2N (the shape's N: 8,192 and 16,384 for "real"): forward + backward (scoring: forward only, under
   torch.no_grad), median of REPEATS after a warm-up, CUDA events; achieved TFLOP/s counts the FLOP of the products
   each implementation does (benchmarks/cases.py); peak memory from max_memory_allocated above the inputs.
   dypo_kernels as "dypo-chunked" and "dypo-fused" (the ops' ``impl``), naive PyTorch, Liger-Kernel and Cut
   Cross-Entropy where they have the op, and the bare products (the floor's rate).
4. The floor of each row: for dypo_kernels, its design floor (benchmarks/floor.py: the impl's FLOP at the measured
   bare-product rate plus its pass bytes at the measured copy bandwidth); for the others, their FLOP at the
   bare-product rate alone (their passes are not modelled: a lower bound). The table gives measured / floor.
5. The default: the last line says which dypo_kernels impl took less time over the loss rows (every op but scoring)
   that both ran, for setting the CUDA default.

Budget: BUDGET_S (8 minutes on one H100 / H200); no check or timed case starts after LAST_START_S, and those that
did not run are listed. Liger-Kernel's compiled losses come last (the first call of torch.compile is the slowest thing
here). The Markdown is rewritten after every row, so a run stopped from outside keeps what it measured. A row that
raises is written as an error and the report goes on (one device run must give everything it can). Exit status 1
if a correctness check fails or any row errs.
"""

import argparse
import datetime
import gc
import math
import os
import statistics
import sys
import time
import traceback
from importlib import metadata
from pathlib import Path

import torch

from benchmarks import cases, floor
from benchmarks.suite import SHAPES

TOLERANCE = 2e-2
REPEATS = 5
BUDGET_S = 480
LAST_START_S = BUDGET_S - 60  # the slowest single case (a first torch.compile) fits in the rest
REFERENCE_ROWS = 1024
COPY_BYTES = {"cuda": 2**30, "cpu": 2**26}
REPORT_CASES = [("logprobs", 1), ("sft", 1), ("grpo", 1), ("gal", 1), ("dypo", 1), ("kl", 1), ("kl", 2)]
SCORING = ("scoring", 1)
# label: (benchmarks/cases.py implementation, dypo_kernels impl)
DYPO_IMPLS = {"dypo-chunked": ("fused", "chunked"), "dypo-fused": ("fused", "fused")}
TIMED_IMPLS = {"naive": ("naive", None), **DYPO_IMPLS, "liger": ("liger", None), "cce": ("cce", None)}
LAST_IMPLS = {"liger-compiled": ("liger-compiled", None)}
IMPL_ENV = ("DYPO_KERNELS_IMPL", "DYPO_KERNELS_CHUNK_BYTES", "DYPO_KERNELS_BACKEND")


def case_label(loss, teachers):
    return f"kl m={teachers}" if loss == "kl" else loss


def _synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _release(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def chunked_reference(case, loss):
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


def check(loss, teachers, dypo_impl, dims, dtype, device, expected):
    """(passed, or None where the impl does not run here; the row's cells after the case and implementation): the op
    in ``dypo_impl`` against the chunked fp32 reference. ``expected`` holds the reference once computed: every impl's
    case draws the same inputs from the same seed."""
    try:
        case = cases.build(loss, "fused", **dims, teachers=teachers, dtype=dtype, device=device, dypo_impl=dypo_impl)
    except cases.Unavailable as exc:
        return None, f"not run: {exc} | | | |"
    value = case.forward()
    grads = torch.autograd.grad(value, case.params)
    if not expected:
        expected.extend(chunked_reference(case, loss))
    ref_value, ref_hidden, ref_weight = expected
    # the loss relative to max(|loss|, 1): GRPO's on-policy value is near 0, where a relative error means nothing
    errors = [abs(value.item() - ref_value) / max(abs(ref_value), 1.0), relative_error(grads[0], ref_hidden),
              relative_error(grads[1], ref_weight)]
    passed = all(e < TOLERANCE for e in errors)
    return passed, f"{errors[0]:.1e} | {errors[1]:.1e} | {errors[2]:.1e} | {'pass' if passed else 'FAIL'} |"


def time_case(case, device):
    """(median seconds, peak extra MB) of one step (forward + backward; forward alone for a case without params):
    REPEATS steps after a warm-up on CUDA, one on CPU (where the report checks the code path, not the speed)."""
    case.step()  # warm-up (compilation, autotuning, allocator)
    _synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
    times = []
    for _ in range(REPEATS if device.type == "cuda" else 1):
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


def copy_bandwidth_gbs(device):
    """GB/s read + written by a device-to-device copy_ of COPY_BYTES."""
    source = torch.empty(COPY_BYTES[device.type], dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    seconds, _ = time_case(cases.Case(lambda: target.copy_(source), [], 0.0), device)
    return 2 * source.numel() / seconds / 1e9


class _BareProducts(torch.autograd.Function):
    """h W^T forward (into ``logits``); upstream W and upstream^T h backward: the three products every op must at
    least do, and nothing else (the scalar returned reads nothing)."""

    @staticmethod
    def forward(ctx, hidden, weight, upstream, logits):
        ctx.save_for_backward(hidden, weight, upstream)
        torch.mm(hidden, weight.T, out=logits)
        return logits.new_zeros(())

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, upstream = ctx.saved_tensors
        return upstream @ weight, upstream.T @ hidden, None, None


def bare_cases(dims, dtype, device):
    """{label: Case}: the forward and the two gradient products as plain matrix products (the floor's rate), and the
    forward product alone under torch.no_grad (scoring's bare product)."""
    generator = torch.Generator(device=device).manual_seed(0)

    def make(*shape, scale=1.0):
        return torch.randn(*shape, generator=generator, device=device).mul_(scale).to(dtype)

    hidden = make(dims["N"], dims["D"]).requires_grad_()
    weight = make(dims["V"], dims["D"], scale=dims["D"] ** -0.5).requires_grad_()
    upstream = make(dims["N"], dims["V"])
    logits = torch.empty_like(upstream)
    product = 2.0 * dims["N"] * dims["D"] * dims["V"]

    def forward_product():
        with torch.no_grad():
            return torch.mm(hidden, weight.T, out=logits)

    return {"bare products": cases.Case(lambda: _BareProducts.apply(hidden, weight, upstream, logits),
                                        [hidden, weight], 3 * product,
                                        notes="forward + 2 gradient products: the floor's rate"),
            "bare forward": cases.Case(forward_product, [], product, notes="h W^T alone, no grad")}


def _package_version(name):
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


class Report:
    """The Markdown report, rewritten to ``out`` (unless "-") after every added row."""

    TIMING_HEADER = ["| case | implementation | time (ms) | TFLOP/s | floor (ms) | measured / floor | "
                     "peak extra memory (MB) | vs naive | notes |", "|---|---|---|---|---|---|---|---|---|"]

    def __init__(self, header, out, token_counts, dtype_name):
        self.header, self.out, self.dtype_name = header, out, dtype_name
        self.rates, self.checks, self.not_run, self.footer = [], [], [], []
        self.timings = {n: [] for n in token_counts}

    def text(self):
        lines = list(self.header)
        lines += ["", "## Rates", "", *self.rates]
        lines += ["", f"## Correctness ({self.dtype_name} op against an fp32 chunked reference on the same inputs)",
                  "",
                  "| case | implementation | loss rel. error | grad hidden | grad weight | result |",
                  "|---|---|---|---|---|---|", *self.checks]
        for n, rows in self.timings.items():
            lines += ["", f"## Forward + backward at N = {n:,} (scoring: forward only)", "", *self.TIMING_HEADER,
                      *rows]
        lines += ["", "Floor: dypo rows, the design floor (benchmarks/floor.py: the impl's matrix-product FLOP at the "
                      "bare products' measured rate plus its pass bytes at the measured copy bandwidth; the fused "
                      "impl's atomics are not modelled); other rows, their FLOP at that rate alone (a lower bound)."]
        if self.not_run:
            lines += ["", f"## Not run (past the time budget: no case starts after {LAST_START_S} s)", "",
                      *[f"- {entry}" for entry in self.not_run]]
        return "\n".join(lines + ["", *self.footer]) + "\n"

    def save(self):
        if self.out != "-":
            self.out.parent.mkdir(parents=True, exist_ok=True)
            self.out.write_text(self.text())


def default_impl_line(times):
    """Which dypo_kernels impl took less time over the loss rows both ran; ``times`` maps (N, case, impl) to s."""
    pairs = [(seconds, times[(n, case, "dypo-fused")]) for (n, case, impl), seconds in times.items()
             if impl == "dypo-chunked" and case != SCORING[0] and (n, case, "dypo-fused") in times]
    if not pairs:
        return ("Faster impl for the losses on this machine: undecided (dypo-chunked and dypo-fused did not both run "
                "a loss row here).")
    chunked, fused = sum(p[0] for p in pairs), sum(p[1] for p in pairs)
    chunked_wins = sum(p[0] < p[1] for p in pairs)
    winner, wins = ("chunked", chunked_wins) if chunked <= fused else ("fused", len(pairs) - chunked_wins)
    return (f"Faster impl for the losses on this machine: **{winner}** ({chunked * 1e3:.1f} ms chunked against "
            f"{fused * 1e3:.1f} ms fused over the {len(pairs)} loss rows both ran; {winner} faster in {wins} of them).")


class ReportRun:
    """One run of the report: the rates it measured, the times of the rows so far, the deadline and the failures."""

    def __init__(self, report, shape, device, started):
        self.report, self.shape, self.device, self.started = report, shape, device, started
        self.dtype = shape["dtype"]
        self.failures = 0
        self.bandwidth_gbs = None
        self.product_flops = {}  # N -> the bare products' FLOP/s
        self.times = {}  # (N, case, implementation) -> seconds

    def dims(self, n):
        return dict(N=n, D=self.shape["D"], V=self.shape["V"], T=self.shape["T"])

    def run(self, what, task):
        """``task()``, unless past LAST_START_S (then ``what`` is listed as not run and None returned); out of memory
        and errors come back as their one-line description (errors counted, the traceback on stderr)."""
        if time.monotonic() - self.started > LAST_START_S:
            self.report.not_run.append(what)
            return None
        try:
            return task()
        except torch.cuda.OutOfMemoryError:
            return "out of memory"
        except Exception as exc:
            traceback.print_exc()
            self.failures += 1
            return f"error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        finally:
            _release(self.device)

    def measure_copy(self):
        self.bandwidth_gbs = copy_bandwidth_gbs(self.device)
        self.report.rates.append(f"- device-to-device copy: {self.bandwidth_gbs:,.0f} GB/s (bytes read + written, "
                                 f"{COPY_BYTES[self.device.type] / 2**20:.0f} MiB copy_)")
        print(self.report.rates[-1], flush=True)

    def check_all(self):
        """The correctness rows at the first N, each impl of each op in its own run (an error stops only its row)."""
        n = self.shape["N"]
        for loss, teachers in REPORT_CASES:
            label, expected = case_label(loss, teachers), []
            for impl_label, (_, dypo_impl) in DYPO_IMPLS.items():
                outcome = self.run(f"correctness at N = {n:,}: {label}, {impl_label}",
                                   lambda: check(loss, teachers, dypo_impl, self.dims(n), self.dtype, self.device,
                                                 expected))
                if outcome is None:
                    continue
                if isinstance(outcome, str):
                    outcome = (False, f"{outcome} | | | FAIL |")
                passed, cells = outcome
                self.failures += passed is False
                self.report.checks.append(f"| {label} | {impl_label} | {cells}")
                print(self.report.checks[-1], flush=True)
                self.report.save()

    def time_row(self, n, label, impl_label, build, floor_of, note=""):
        """Times ``build()``'s case at N = n and adds its row; ``floor_of(case, seconds)``: the row's floor (s) or
        None; ``note`` goes after the case's notes. A dypo_kernels impl or a competitor that cannot run here gets a
        "not run" row; a competitor without the op gets none."""
        def measure():
            try:
                case = build()
            except cases.NotInstalled as exc:
                return f"not run: {exc}"
            except cases.Unavailable as exc:
                return f"not run: {exc}" if impl_label in DYPO_IMPLS else None
            seconds, peak = time_case(case, self.device)
            return case, seconds, peak

        outcome = self.run(f"N = {n:,}: {label}, {impl_label}", measure)
        if outcome is None:
            return
        if isinstance(outcome, str):
            self.report.timings[n].append(f"| {label} | {impl_label} | {outcome} | | | | | | |")
        else:
            case, seconds, peak = outcome
            self.times[(n, label, impl_label)] = seconds
            tflops = f"{case.matmul_flop / seconds / 1e12:.0f}" if case.matmul_flop else ""
            floor_seconds = floor_of(case, seconds)
            floor_cells = ("| |" if floor_seconds is None
                           else f"{floor_seconds * 1e3:.1f} | {seconds / floor_seconds:.2f}")
            naive = self.times.get((n, label, "naive"))
            versus = f"{seconds / naive:.2f}x" if naive and impl_label != "naive" else ""
            self.report.timings[n].append(f"| {label} | {impl_label} | {seconds * 1e3:.1f} | {tflops} | {floor_cells} "
                                          f"| {'' if math.isnan(peak) else f'{peak:.0f}'} | {versus} | "
                                          f"{'; '.join(filter(None, (case.notes, note)))} |")
            del case, outcome
        print(self.report.timings[n][-1], flush=True)
        self.report.save()

    def bare_rows(self, n):
        """The bare products (whose rate the floors of this N use) and the bare forward product."""
        bare = {}

        def build(label):
            if not bare:
                bare.update(bare_cases(self.dims(n), self.dtype, self.device))
            return bare[label]

        def products_floor(case, seconds):
            self.product_flops[n] = case.matmul_flop / seconds
            self.report.rates.append(f"- N = {n:,}: bare products {self.product_flops[n] / 1e12:.0f} TFLOP/s")
            return seconds

        self.time_row(n, "bare products", "torch.mm", lambda: build("bare products"), products_floor)
        self.time_row(n, "bare forward", "torch.mm", lambda: build("bare forward"), self.flop_floor(n))
        bare.clear()

    def flop_floor(self, n):
        """The floor of a row whose passes are not modelled: its FLOP at the bare products' rate."""
        def floor_of(case, seconds):
            return case.matmul_flop / self.product_flops[n] if n in self.product_flops else None
        return floor_of

    def design_floor(self, n, loss, teachers, dypo_impl):
        """The design floor (benchmarks/floor.py) of a dypo_kernels row at the rates measured here."""
        def floor_of(case, seconds):
            if n not in self.product_flops:
                return None
            return floor.design_floor(loss, dypo_impl, n, self.shape["D"], self.shape["V"], teachers=teachers,
                                      tflops=self.product_flops[n] / 1e12, bandwidth_gbs=self.bandwidth_gbs,
                                      operand_bytes=self.dtype.itemsize).seconds
        return floor_of

    def timed_rows(self, n, impls, cases_to_time):
        for loss, teachers in cases_to_time:
            for impl_label, (impl, dypo_impl) in impls.items():
                def build(loss=loss, teachers=teachers, impl=impl, dypo_impl=dypo_impl):
                    return cases.build(loss, impl, **self.dims(n), teachers=teachers, dtype=self.dtype,
                                       device=self.device, dypo_impl=dypo_impl)

                floor_of = self.flop_floor(n) if dypo_impl is None else self.design_floor(n, loss, teachers,
                                                                                          dypo_impl)
                self.time_row(n, case_label(loss, teachers), impl_label, build, floor_of,
                              self.accumulation_note(n, loss, teachers, dypo_impl))

    def accumulation_note(self, n, loss, teachers, dypo_impl):
        """On CUDA, for the chunked impl: the bytes of its per-wave fp32 grad_W accumulation, which the floor
        leaves out (benchmarks/floor.py), and their time at the copy bandwidth were the products not to hide them."""
        if self.device.type != "cuda" or dypo_impl != "chunked" or loss == SCORING[0]:
            return ""
        chunk_bytes = int(os.environ.get("DYPO_KERNELS_CHUNK_BYTES") or floor.DEFAULT_CHUNK_BYTES)
        moved = floor.grad_weight_accumulation_bytes(loss, n, self.shape["D"], self.shape["V"], teachers=teachers,
                                                     chunk_bytes=chunk_bytes, operand_bytes=self.dtype.itemsize)
        return f"grad_W accumulation {moved / 1e9:.0f} GB, not in the floor: {moved / self.bandwidth_gbs / 1e6:.1f} ms"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", choices=tuple(SHAPES), default=None,
                        help="D, V, T and the first N (timed at N and 2N); default real on CUDA, tiny elsewhere")
    parser.add_argument("--out", default=None, help="Markdown file ('-': stdout); default docs/gpu_report_DATE.md")
    args = parser.parse_args(argv)
    started = time.monotonic()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shape = SHAPES[args.shapes or ("real" if device.type == "cuda" else "tiny")]
    token_counts = (shape["N"], 2 * shape["N"])
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 reference stays fp32

    import triton

    machine = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (no CUDA: code-path check only)"
    environment = ", ".join(f"{name}={os.environ[name]}" for name in IMPL_ENV if name in os.environ)
    command = "python -m benchmarks.report" + (f" --shapes {args.shapes}" if args.shapes else "")
    out = "-" if args.out == "-" else Path(args.out or f"docs/gpu_report_{datetime.date.today()}.md")
    report = Report([f"# dypo-kernels report: {datetime.date.today()}, {machine}",
                     f"torch {torch.__version__}, triton {triton.__version__}, liger-kernel "
                     f"{_package_version('liger-kernel')}, cut-cross-entropy {_package_version('cut-cross-entropy')}; "
                     f"D = {shape['D']:,}, V = {shape['V']:,}, N = {' and '.join(f'{n:,}' for n in token_counts)}, "
                     f"sequences of {shape['T']} tokens, {str(shape['dtype']).replace('torch.', '')}; "
                     f"{environment or 'no DYPO_KERNELS_* variable set'}; command: `{command}`"],
                    out, token_counts, str(shape["dtype"]).replace("torch.", ""))
    session = ReportRun(report, shape, device, started)
    session.measure_copy()
    session.check_all()
    for n in token_counts:
        session.bare_rows(n)
        session.timed_rows(n, TIMED_IMPLS, REPORT_CASES + [SCORING])
    for n in token_counts:
        session.timed_rows(n, LAST_IMPLS, REPORT_CASES)
    report.footer.append(default_impl_line(session.times))
    report.save()
    print(report.text() if out == "-" else f"wrote {out}\n{report.footer[-1]}")
    return 0 if session.failures == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
