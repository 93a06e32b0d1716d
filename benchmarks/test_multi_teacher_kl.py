"""Forward + backward of the multi-teacher KL (forward KL to the mixture) for m = 1..3 teachers: time should grow
about linearly in m (one more projection per teacher); Liger-Kernel's JSD loss (beta 0) takes one teacher."""

import pytest

from benchmarks.suite import competitor_id, competitors, run_benchmark


@pytest.mark.parametrize("teachers", [1, 2, 3])
@pytest.mark.parametrize("competitor", competitors(), ids=competitor_id)
def test_multi_teacher_kl(benchmark, shape, measure_memory, competitor, teachers):
    run_benchmark(benchmark, shape, measure_memory, "kl", competitor, teachers=teachers)
