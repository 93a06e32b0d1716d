"""The memory contract (docs/design.md, "The memory contract"): peak extra memory of forward + backward grows with
N*D and V*D, never with N*V. Measured as the peak RSS above the inputs of a fresh subprocess
(benchmarks/cpu_case.py), with the allocator pinned to give memory back as soon as it is freed."""

from benchmarks.cpu_case import measure

D, V = 128, 32768  # N x V dwarfs the N x D terms (a few each: hidden copies and gradients)
N_SMALL, N_LARGE = 1024, 4096
MB = 2**20


def logits_mb(n, v):
    return n * v * 4 / MB


def assert_memory_flat_in_n_times_v(**case):
    small, large, wide = (measure(**case, N=n, D=D, V=v, pin_allocator=True)
                          for n, v in ((N_SMALL, V), (N_LARGE, V), (N_LARGE, 2 * V)))
    growth_with_n = large["peak_extra_mb"] - small["peak_extra_mb"]
    growth_with_v = wide["peak_extra_mb"] - large["peak_extra_mb"]
    # each N*D term is 1.5 MB here; an N x V tensor would add 384 MB
    assert growth_with_n < 0.1 * logits_mb(N_LARGE - N_SMALL, V), (small, large)
    # the weight and its fp32 gradient add a few V*D (16 MB each); an N x V tensor would add 512 MB
    assert growth_with_v < 4 * V * D * 4 / MB, (large, wide)
