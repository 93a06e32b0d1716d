import pytest

from benchmarks.cpu_case import measure
from tests.conftest import available_backends
from tests.memory import N_LARGE, N_SMALL, D, V, assert_memory_flat_in_n_times_v, logits_mb


def test_probe_sees_materialised_logits():
    """The measurement itself can fail a test: naive PyTorch's growth with N is a multiple of N*V."""
    small, large = (measure(impl="naive", N=n, D=D, V=V, pin_allocator=True) for n in (N_SMALL, N_LARGE))
    assert large["peak_extra_mb"] - small["peak_extra_mb"] > logits_mb(N_LARGE - N_SMALL, V)


@pytest.mark.parametrize("backend", [b for b in available_backends() if b != "triton"])
def test_peak_memory_grows_with_n_times_d_not_n_times_v(backend):
    assert_memory_flat_in_n_times_v(impl="fused", backend=backend)
