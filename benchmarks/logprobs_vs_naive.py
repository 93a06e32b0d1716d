"""fused_linear_logprobs against naive PyTorch on the CPU: forward + backward of a per-token log-prob loss, each
case in a fresh process (time: median of the repeats; memory: peak RSS above the inputs).

    python -m benchmarks.logprobs_vs_naive                 # small shapes, a few seconds (the README's demo)
    python -m benchmarks.logprobs_vs_naive --full          # N = 4,096, D = 1,024, V = 32,768 (README table)
"""

import argparse
import datetime
import platform

from benchmarks.cpu_case import measure
from dypo_kernels.backend import cpu_extension


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="N = 4,096, D = 1,024, V = 32,768")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    shape = dict(N=4096, D=1024, V=32768) if args.full else dict(N=1024, D=256, V=16384)
    impls = [dict(impl="naive"), dict(impl="fused", backend="torch")]
    if cpu_extension() is not None:
        impls.append(dict(impl="fused", backend="cpp"))
    results = [measure(**impl, **shape, repeats=args.repeats) for impl in impls]
    naive = results[0]
    print(f"fp32, N = {shape['N']:,}, D = {shape['D']:,}, V = {shape['V']:,}; forward + backward; "
          f"{datetime.date.today()}, {platform.processor() or platform.machine()}")
    print("| implementation | time (s) | vs naive | peak extra memory (MB) | vs naive |")
    print("|---|---|---|---|---|")
    for row in results:
        print(f"| {row['impl']} | {row['seconds']:.2f} | {row['seconds'] / naive['seconds']:.2f}x | "
              f"{row['peak_extra_mb']:.0f} | {row['peak_extra_mb'] / naive['peak_extra_mb']:.2f}x |")


if __name__ == "__main__":
    main()
