import math
import statistics

import pytest

from dypo.stats import mean_sd, paired, t_test_p


@pytest.mark.parametrize("t,df,p", [(2.776, 4, 0.05), (2.571, 5, 0.05), (12.706, 1, 0.05), (2.228, 10, 0.05),
                                    (1.0, 3, 0.391), (2.0, 7, 0.0856), (0.0, 4, 1.0), (4.604, 4, 0.01)])
def test_t_test_p_matches_the_t_tables(t, df, p):
    assert t_test_p(t, df) == pytest.approx(p, abs=5e-4)
    assert t_test_p(-t, df) == t_test_p(t, df)


def test_paired_comparison_of_two_strategies_over_seeds():
    first, second = [0.70, 0.62, 0.81, 0.75, 0.66], [0.60, 0.58, 0.70, 0.69, 0.65]
    mean, (low, high), p = paired(first, second)
    differences = [a - b for a, b in zip(first, second)]
    assert mean == pytest.approx(statistics.mean(differences))
    assert min(differences) <= low < mean < high <= max(differences)
    t = mean / (statistics.stdev(differences) / math.sqrt(5))
    assert p == pytest.approx(t_test_p(t, 4)) and p < 0.05
    assert paired(first, first)[2] == 1.0 and paired([1.0], [0.5]) == (0.5, None, None)
    assert mean_sd([0.5]) == "0.500" and mean_sd([0.5, 0.7]) == "0.600 ± 0.141"
