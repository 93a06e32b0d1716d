"""Forward + backward of the dypo case (benchmarks/cases.py) for every competitor, side by side."""

import pytest

from benchmarks.suite import competitor_id, competitors, run_benchmark


@pytest.mark.parametrize("competitor", competitors(), ids=competitor_id)
def test_dypo(benchmark, shape, measure_memory, competitor):
    run_benchmark(benchmark, shape, measure_memory, "dypo", competitor)
