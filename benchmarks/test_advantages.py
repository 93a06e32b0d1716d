"""group_advantages (one kernel on CUDA) against the reference formulation, on N rewards in groups of 8."""

import pytest

from benchmarks.suite import competitor_id, competitors, run_benchmark


# one dypo_kernels competitor: the op has no impl choice
@pytest.mark.parametrize("competitor", [c for c in competitors() if c.impl == "naive" or c.name in
                                        ("dypo-chunked", "dypo-cpp", "dypo-torch")], ids=competitor_id)
def test_advantages(benchmark, shape, competitor):
    run_benchmark(benchmark, shape, False, "advantages", competitor)
