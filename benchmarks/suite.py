"""Helpers of the pytest-benchmark suite (benchmarks/test_*.py): the shapes, the competitors, and the timed and
memory-probed run of one case."""

import os
from typing import NamedTuple, Optional

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
SHAPES = {
    "tiny": dict(N=256, D=64, V=512, T=64, dtype=torch.float32),
    "small": dict(N=1024, D=512, V=16384, T=256, dtype=torch.float32),
    "real": dict(N=8192, D=4096, V=151936, T=2048, dtype=torch.bfloat16),
}


def _available_gb():
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    return float("inf")


class Competitor(NamedTuple):
    impl: str  # benchmarks/cases.py's implementation
    backend: Optional[str] = None  # DYPO_KERNELS_BACKEND for dypo_kernels on CPU
    dypo_impl: Optional[str] = None  # dypo_kernels' impl keyword (CUDA)

    @property
    def name(self):
        if self.impl != "fused":
            return self.impl
        return f"dypo-{self.dypo_impl or self.backend}"


def competitors(device_has_cuda=HAS_CUDA):
    """dypo_kernels in each of its impls (CUDA) or on each CPU backend this machine has, then the others."""
    from dypo_kernels.backend import cpu_extension

    if device_has_cuda:
        dypo = [Competitor("fused", dypo_impl="chunked"), Competitor("fused", dypo_impl="fused")]
    else:
        dypo = [Competitor("fused", backend="cpp")] if cpu_extension() is not None else []
        dypo.append(Competitor("fused", backend="torch"))
    return dypo + [Competitor(impl) for impl in ("naive", "liger", "liger-compiled", "cce")]


def competitor_id(competitor):
    return competitor.name


def run_benchmark(benchmark, shape, measure_memory, loss, competitor, teachers=1):
    """Times ``loss`` x ``competitor`` with pytest-benchmark and records its peak memory."""
    from benchmarks import cases
    from benchmarks.cpu_case import measure

    impl, backend, dypo_impl = competitor
    if backend is not None:
        os.environ["DYPO_KERNELS_BACKEND"] = backend
    else:
        os.environ.pop("DYPO_KERNELS_BACKEND", None)
    dims = {k: shape[k] for k in ("N", "D", "V", "T")}
    benchmark.group = (f"{loss}{f' m={teachers}' if loss == 'kl' else ''}: N={dims['N']} D={dims['D']} "
                       f"V={dims['V']} {str(shape['dtype']).replace('torch.', '')} {shape['device']}")
    if impl == "naive" and not HAS_CUDA:
        need_gb = 3 * dims["N"] * dims["V"] * 4 * max(teachers, 1) / 2**30  # fp32 logits, softmax, their gradient
        if need_gb > 0.8 * _available_gb():
            pytest.skip(f"naive PyTorch: out of memory at this shape (needs about {need_gb:.0f} GB of logits, "
                        f"{_available_gb():.0f} GB available)")
    try:
        case = cases.build(loss, impl, **dims, teachers=teachers, dtype=shape["dtype"], device=shape["device"],
                           dypo_impl=dypo_impl)
        if HAS_CUDA:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            baseline = torch.cuda.memory_allocated()
            case.step()
            torch.cuda.synchronize()
            peak_mb = (torch.cuda.max_memory_allocated() - baseline) / 2**20
        elif measure_memory and shape["dtype"] == torch.float32:
            peak_mb = measure(impl=impl, loss=loss, teachers=teachers, backend=backend or "cpp",
                              **dims)["peak_extra_mb"]
        else:
            peak_mb = None
    except cases.Unavailable as exc:
        pytest.skip(str(exc))
    except torch.cuda.OutOfMemoryError:
        pytest.skip(f"{impl}: out of memory at this shape")
    benchmark.extra_info.update(peak_extra_mb=peak_mb, matmul_tflop=case.matmul_flop / 1e12, notes=case.notes)

    def step():
        case.step()
        if HAS_CUDA:
            torch.cuda.synchronize()

    benchmark.pedantic(step, rounds=3 if shape["N"] >= 2048 else 5, warmup_rounds=1)
