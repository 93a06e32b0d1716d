"""The memory contract (DESIGN.md section 2): peak extra memory of forward + backward grows with N*D and V*D,
never with N*V. Measured as the peak RSS above the inputs of a fresh subprocess (benchmarks/cpu_case.py)."""

import pytest

from benchmarks.cpu_case import measure
from tests.conftest import available_backends

D, V = 256, 16384
N_SMALL, N_LARGE = 1024, 4096
MB = 2**20


def logits_mb(n, v):
    return n * v * 4 / MB


def test_probe_sees_materialised_logits():
    """The measurement itself can fail a test: naive PyTorch's growth with N is a multiple of N*V."""
    small, large = (measure(impl="naive", N=n, D=D, V=V) for n in (N_SMALL, N_LARGE))
    assert large["peak_extra_mb"] - small["peak_extra_mb"] > logits_mb(N_LARGE - N_SMALL, V)


@pytest.mark.parametrize("backend", [b for b in available_backends() if b != "triton"])
def test_peak_memory_grows_with_n_times_d_not_n_times_v(backend):
    small, large, wide = (measure(impl="fused", backend=backend, N=n, D=D, V=v)
                          for n, v in ((N_SMALL, V), (N_LARGE, V), (N_LARGE, 2 * V)))
    growth_with_n = large["peak_extra_mb"] - small["peak_extra_mb"]
    growth_with_v = wide["peak_extra_mb"] - large["peak_extra_mb"]
    # N*D terms (hidden gradient, per-row statistics) are 3 MB here; an N x V tensor would add 192 MB
    assert growth_with_n < 0.1 * logits_mb(N_LARGE - N_SMALL, V), (small, large)
    # the weight and its fp32 gradient add a few V*D (16 MB each); an N x V tensor would add 256 MB
    assert growth_with_v < 4 * V * D * 4 / MB, (large, wide)
