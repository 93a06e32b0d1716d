"""Scoring: token log-probs and entropies under torch.no_grad (forward only), fused against naive PyTorch."""

import pytest

from benchmarks.suite import competitor_id, competitors, run_benchmark


@pytest.mark.parametrize("competitor", [c for c in competitors() if c.impl in ("fused", "naive")], ids=competitor_id)
def test_scoring(benchmark, shape, measure_memory, competitor):
    run_benchmark(benchmark, shape, measure_memory, "scoring", competitor)
