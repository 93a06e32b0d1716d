"""The statistics of python -m dypo.compare: mean and sample sd, and the paired comparison of two strategies over
the same seeds (each seed: the same data order, evaluation sets and base model): the mean difference, a bootstrap
95% interval of it and the two-sided p-value of the paired t-test."""

import math
import random
import statistics


def mean_sd(values):
    """'mean ± sd' (sample sd, n - 1), or the value alone for one seed."""
    if len(values) < 2:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def t_test_p(t, df):
    """Two-sided p-value of Student's t with ``df`` (a positive integer) degrees of freedom: 1 - A(t | df), with
    A the closed form for integer df (Abramowitz and Stegun 26.7.3 and 26.7.4)."""
    if math.isinf(t):
        return 0.0
    theta = math.atan(abs(t) / math.sqrt(df))
    cos2, sin = math.cos(theta) ** 2, math.sin(theta)
    if df % 2 == 0:
        term = total = 1.0
        for k in range(2, df, 2):  # the terms (1 3 ... (k - 1)) / (2 4 ... k) cos^k
            term *= cos2 * (k - 1) / k
            total += term
        inside = sin * total
    else:
        total, term = 0.0, 1.0
        if df > 1:
            total = 1.0
            for k in range(3, df, 2):  # the terms (2 4 ... (k - 1)) / (3 5 ... k) cos^(k - 1)
                term *= cos2 * (k - 1) / k
                total += term
        inside = 2 / math.pi * (theta + (sin * math.cos(theta) * total if df > 1 else 0.0))
    return min(1.0, max(0.0, 1.0 - inside))


def paired(first, second, resamples=10000, seed=0):
    """The paired comparison of ``first`` against ``second`` (lists over the same seeds): (mean of first - second,
    bootstrap 95% interval of that mean over resampled seeds, paired t-test p). With one seed: (difference, None,
    None); with differences all equal, p is 0 (or 1 when they are 0)."""
    differences = [a - b for a, b in zip(first, second)]
    n, mean = len(differences), statistics.mean(differences)
    if n < 2:
        return mean, None, None
    rng = random.Random(seed)
    means = sorted(statistics.mean(rng.choices(differences, k=n)) for _ in range(resamples))
    interval = (means[int(0.025 * resamples)], means[int(0.975 * resamples) - 1])
    sd = statistics.stdev(differences)
    if sd == 0:
        return mean, interval, 1.0 if mean == 0 else 0.0
    return mean, interval, t_test_p(mean / (sd / math.sqrt(n)), n - 1)


def p_value(p):
    return "p < 0.001" if p < 0.001 else f"p {p:.3f}"


def paired_text(first, second):
    """'+0.123 [+0.050, +0.200], p 0.012' for the report."""
    mean, interval, p = paired(first, second)
    if interval is None:
        return f"{mean:+.3f}"
    return f"{mean:+.3f} [{interval[0]:+.3f}, {interval[1]:+.3f}], {p_value(p)}"
