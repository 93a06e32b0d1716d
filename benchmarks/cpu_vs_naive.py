"""dypo_kernels against naive PyTorch, Liger-Kernel and Cut Cross-Entropy (where they run) on the CPU: forward +
backward of each loss, each case in a fresh process (time: median of the repeats; memory: peak RSS above the
inputs). Prints Markdown tables.

    python -m benchmarks.cpu_vs_naive                      # log-probs at small shapes, a few seconds (make demo)
    python -m benchmarks.cpu_vs_naive --full --loss all    # N = 4,096, D = 1,024, V = 32,768 (README tables)
    python -m benchmarks.cpu_vs_naive --full --loss grpo --peaked   # the same with a peaked softmax

Inputs (benchmarks/cases.py): hidden ~ N(0, 1) and weights ~ N(0, 1/D), logits of standard deviation about 1 (a flat
softmax); with --peaked weights ~ N(0, 1), logits of standard deviation sqrt(D) (32 at D = 1,024), the peaked softmax
of a trained model at low temperature, where exp(z - max z) is subnormal or 0 for most entries of a row.

Losses (benchmarks/cpu_case.py): logprobs, grpo (DAPO aggregation, beta 0.04), gal (pairs, beta 0.1), sft, dypo
(half RL rows of mid prompts, two rollouts each, half SFT rows of hard prompts), on sequences of 512 tokens, old
log-probs equal to the current policy's; kl: forward KL to the mixture of m = 1, 2, 3 teachers of the student's
hidden size.
"""

import argparse
import datetime
import platform

from benchmarks import cases
from benchmarks.cpu_case import measure
from dypo_kernels.backend import cpu_extension

LOSSES = ("logprobs", "grpo", "gal", "sft", "dypo", "kl")


def _runs_here(loss, impl, teachers):
    try:
        cases.build(loss, impl, N=64, D=16, V=64, T=16, teachers=teachers)
    except cases.Unavailable:
        return False
    return True


def table(loss, shape, repeats, peaked=False):
    teacher_counts = (1, 2, 3) if loss == "kl" else (1,)
    impls = []
    for teachers in teacher_counts:
        impls.append(dict(impl="naive", teachers=teachers))
        if loss != "kl":  # the multi-teacher KL has one CPU pass (torch) whichever backend is chosen
            impls.append(dict(impl="fused", backend="torch", teachers=teachers))
        if cpu_extension() is not None:
            impls.append(dict(impl="fused", backend="cpp", teachers=teachers))
        elif loss == "kl":
            impls.append(dict(impl="fused", backend="torch", teachers=teachers))
        impls += [dict(impl=impl, teachers=teachers) for impl in ("liger", "cce") if _runs_here(loss, impl, teachers)]
    results = [measure(**impl, **shape, loss=loss, repeats=repeats, peaked=peaked) for impl in impls]
    softmax = f"peaked softmax (logit sd {shape['D'] ** 0.5:.0f})" if peaked else "flat softmax (logit sd 1)"
    lines = [f"{loss}: fp32, N = {shape['N']:,}, D = {shape['D']:,}, V = {shape['V']:,}, {softmax}; "
             "forward + backward",
             "| implementation | time (s) | vs naive | peak extra memory (MB) | vs naive |", "|---|---|---|---|---|"]
    for impl, row in zip(impls, results):
        if row["impl"] == "naive":
            naive = row
        name = row["impl"] + (f", m = {impl['teachers']}" if loss == "kl" else "")
        lines.append(f"| {name} | {row['seconds']:.2f} | {row['seconds'] / naive['seconds']:.2f}x | "
                     f"{row['peak_extra_mb']:.0f} | {row['peak_extra_mb'] / naive['peak_extra_mb']:.2f}x |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="N = 4,096, D = 1,024, V = 32,768")
    parser.add_argument("--loss", choices=LOSSES + ("all",), default="logprobs")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--peaked", action="store_true", help="weights ~ N(0, 1): a peaked softmax")
    args = parser.parse_args()
    shape = dict(N=4096, D=1024, V=32768) if args.full else dict(N=1024, D=256, V=16384)
    print(f"{datetime.date.today()}, {platform.processor() or platform.machine()}")
    for loss in LOSSES if args.loss == "all" else (args.loss,):
        print("\n" + table(loss, shape, args.repeats, args.peaked), flush=True)


if __name__ == "__main__":
    main()
