"""pytest-benchmark suite: ``pytest benchmarks/ --benchmark-only``.

Each test times forward + backward of one (loss, implementation) pair; the tests of one loss share a benchmark
group, so pytest-benchmark's table puts the competitors side by side. Peak memory goes to ``extra_info``
(``peak_extra_mb``): on CUDA from torch.cuda.max_memory_allocated around one step, on CPU from a fresh subprocess
(benchmarks/cpu_case.py: peak RSS above the inputs). Implementations that do not run here (no CUDA, package missing)
are skipped with the reason; naive PyTorch running out of memory is reported as a skip that says so.

Shapes: ``--shapes small`` (default without CUDA: under 3 minutes on a 2-core CPU), ``real`` (default with CUDA:
N = 8,192, D = 4,096, V = 151,936 in bf16), ``tiny`` (seconds: the smoke test in tests/). ``--no-memory`` skips the
memory probes.
"""

import pytest

from benchmarks.suite import HAS_CUDA, SHAPES


def pytest_addoption(parser):
    parser.addoption("--shapes", choices=tuple(SHAPES), default=None,
                     help="benchmark shapes: tiny, small (default on CPU) or real (default on CUDA)")
    parser.addoption("--no-memory", action="store_true", help="skip the peak-memory probes")


@pytest.fixture(scope="session")
def shape(request):
    name = request.config.getoption("--shapes") or ("real" if HAS_CUDA else "small")
    return dict(SHAPES[name], device="cuda" if HAS_CUDA else "cpu")


@pytest.fixture(scope="session")
def measure_memory(request):
    return not request.config.getoption("--no-memory")

