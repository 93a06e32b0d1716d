"""group_advantages (one kernel on CUDA) against the reference formulation, on N rewards in groups of 8."""

import pytest

from benchmarks.suite import competitor_id, competitors, run_benchmark


@pytest.mark.parametrize("pair", [p for p in competitors() if p[0] in ("fused", "naive")], ids=competitor_id)
def test_advantages(benchmark, shape, pair):
    run_benchmark(benchmark, shape, False, "advantages", pair)
