"""One forward + backward of a per-token log-prob loss, in a fresh process, on the CPU: prints its peak extra
memory (peak RSS above the inputs, DESIGN.md section 5) and its median time as JSON.

    python -m benchmarks.cpu_case '{"impl": "fused", "backend": "cpp", "N": 4096, "D": 1024, "V": 32768}'

impl: "fused" (fused_linear_logprobs with backend "cpp" or "torch") or "naive" (materialised fp32 logits,
reference.token_logprobs in the inputs' dtype). The memory is read on the first call, before any warm-up can
leave freed blocks in the allocator; the time is the median of ``repeats`` later calls.
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


def run_case(impl, N, D, V, backend="cpp", repeats=0, seed=0):
    if impl == "fused":
        os.environ["DYPO_KERNELS_BACKEND"] = backend
    import torch

    from dypo_kernels import fused_linear_logprobs, reference
    from dypo_kernels.backend import cpu_extension

    if impl == "fused" and backend == "cpp":
        cpu_extension()  # build or load before the baseline
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, D, generator=generator).requires_grad_()
    weight = (torch.randn(V, D, generator=generator) / D**0.5).requires_grad_()
    targets = torch.randint(0, V, (N,), generator=generator)
    grad_logps = torch.randn(N, generator=generator)

    def step():
        if impl == "fused":
            logps = fused_linear_logprobs(hidden, weight, targets)
        else:
            logps, _ = reference.token_logprobs(hidden, weight, targets, dtype=torch.float32)
        (logps * grad_logps).sum().backward()
        hidden.grad = weight.grad = None

    with open("/proc/self/clear_refs", "w") as clear:  # reset the peak RSS to the current RSS
        clear.write("5")
    baseline = _rss_kib("VmRSS")
    start = time.perf_counter()
    step()
    first_seconds = time.perf_counter() - start
    peak = _rss_kib("VmHWM")
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {"impl": impl if impl == "naive" else f"fused-{backend}", "N": N, "D": D, "V": V,
            "peak_extra_mb": (peak - baseline) / 1024,
            "seconds": statistics.median(times) if times else first_seconds}


def measure(**case):
    """Runs one case in a fresh subprocess and returns its result dict."""
    import subprocess

    result = subprocess.run([sys.executable, "-m", "benchmarks.cpu_case", json.dumps(case)], capture_output=True,
                            text=True, check=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return json.loads(result.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    print(json.dumps(run_case(**json.loads(sys.argv[1]))))
