"""One forward + backward of a benchmark case (benchmarks/cases.py), in a fresh process, on the CPU: prints its peak
extra memory (peak RSS above the inputs, docs/testing.md) and its median time as JSON.

    python -m benchmarks.cpu_case '{"impl": "fused", "backend": "cpp", "N": 4096, "D": 1024, "V": 32768}'
    python -m benchmarks.cpu_case '{"impl": "liger", "loss": "grpo", "N": 4096, "D": 1024, "V": 32768}'
    python -m benchmarks.cpu_case '{"impl": "naive", "loss": "grpo", "N": 4096, "D": 1024, "V": 32768, "peaked": true}'

The memory is read on the first call, before any warm-up can leave freed blocks in the allocator; the time is the
median of ``repeats`` later calls (the first call's time when ``repeats`` is 0). ``peaked``: weights ~ N(0, 1), a
peaked softmax (benchmarks/cases.py).
"""

import json
import os
import statistics
import sys
import time


def _rss_kib(field):
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def run_case(impl, N, D, V, backend="cpp", loss="logprobs", T=512, teachers=3, repeats=0, seed=0, peaked=False):
    if impl == "fused":
        os.environ["DYPO_KERNELS_BACKEND"] = backend
    from benchmarks import cases
    from dypo_kernels.backend import cpu_extension

    if impl == "fused" and backend == "cpp":
        cpu_extension()  # build or load before the baseline
    case = cases.build(loss, impl, N, D, V, T=T, teachers=teachers, seed=seed, peaked=peaked)
    with open("/proc/self/clear_refs", "w") as clear:  # reset the peak RSS to the current RSS
        clear.write("5")
    baseline = _rss_kib("VmRSS")
    start = time.perf_counter()
    case.step()
    first_seconds = time.perf_counter() - start
    peak = _rss_kib("VmHWM")
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        case.step()
        times.append(time.perf_counter() - start)
    return {"impl": f"fused-{backend}" if impl == "fused" else impl, "loss": loss, "N": N, "D": D, "V": V,
            "peaked": peaked,
            "peak_extra_mb": (peak - baseline) / 1024,
            "seconds": statistics.median(times) if times else first_seconds}


def measure(pin_allocator=False, **case):
    """Runs one case in a fresh subprocess and returns its result dict.

    ``pin_allocator``: glibc's malloc serves every allocation over 64 KiB by mmap (MALLOC_MMAP_THRESHOLD_), so that
    the peak RSS follows the live tensors instead of the allocator's adaptive threshold, which otherwise moves the
    peak by tens of MB from run to run. The memory tests use it; it slows every allocation, so timings do not.
    """
    import subprocess

    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536") if pin_allocator else None
    result = subprocess.run([sys.executable, "-m", "benchmarks.cpu_case", json.dumps(case)], capture_output=True,
                            text=True, env=env, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if result.returncode:
        raise RuntimeError(f"benchmarks.cpu_case {case} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    print(json.dumps(run_case(**json.loads(sys.argv[1]))))
