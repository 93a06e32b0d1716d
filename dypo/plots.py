"""PNG plots of a run against steps, the quantities of the paper's Figures 4 and 5: reward, grade shares and the
offline (SFT) ratio, policy entropy, gradient norm. Each curve is a moving average over ``window`` steps."""

from pathlib import Path

PLOTS = {
    "reward.png": ("reward", ["reward_mean"]),
    "grades.png": ("share of prompts", ["share_hard", "share_mid", "share_easy", "offline_ratio"]),
    "entropy.png": ("policy entropy (nats per token)", ["entropy"]),
    "grad_norm.png": ("gradient norm (before clipping)", ["grad_norm"]),
}


def _moving_average(points, window):
    steps, values = zip(*points)
    averaged = [sum(values[max(0, i - window + 1):i + 1]) / len(values[max(0, i - window + 1):i + 1])
                for i in range(len(values))]
    return steps, averaged


def write_plots(history, out: Path, window: int):
    """Writes the PNGs into ``out``; returns their names, or [] when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written = []
    for name, (label, keys) in PLOTS.items():
        figure, axes = plt.subplots(figsize=(6, 3.5))
        for key in keys:
            points = [(m["step"], m[key]) for m in history if m.get(key) is not None]
            if points:
                axes.plot(*_moving_average(points, window), label=key)
        axes.set_xlabel("step")
        axes.set_ylabel(label)
        if len(keys) > 1:
            axes.legend()
        axes.grid(alpha=0.3)
        figure.tight_layout()
        figure.savefig(out / name, dpi=100)
        plt.close(figure)
        written.append(name)
    return written


def _curves(runs, key, window):
    """Each step's mean and sd over runs of ``key``'s moving average (steps where every run has a value)."""
    per_run = [dict(zip(*_moving_average([(m["step"], m[key]) for m in run if m.get(key) is not None], window)))
               for run in runs]
    steps = sorted(set.intersection(*(set(curve) for curve in per_run)))
    values = [[curve[step] for curve in per_run] for step in steps]
    means = [sum(v) / len(v) for v in values]
    sds = [(sum((x - m) ** 2 for x in v) / (len(v) - 1)) ** 0.5 if len(v) > 1 else 0.0 for v, m in zip(values, means)]
    return steps, means, sds


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def figure4(histories, path: Path):
    """The paper's Figure 4 from each strategy's runs (``histories``: {strategy: [metrics of each step] per seed}):
    offline ratio, training reward and entropy against steps, mean over seeds shaded ± sd. Returns the numbers the
    report quotes: offline ratio over the first and last tenth of the steps, reward over the last tenth, entropy
    over the last tenth, per strategy."""
    plt = _pyplot()
    steps = max(len(run) for runs in histories.values() for run in runs)
    window, tenth = max(1, steps // 20), max(1, steps // 10)
    figure, panels = plt.subplots(1, 3, figsize=(15, 4))
    numbers = {"offline": {}, "reward": {}, "entropy": {}}
    for strategy, runs in histories.items():
        for axes, key, label in zip(panels, ("offline_ratio", "reward_mean", "entropy"),
                                    ("offline data ratio", "training reward", "policy entropy (nats per token)")):
            x, mean, sd = _curves(runs, key, window)
            line, = axes.plot(x, mean, label=strategy)
            axes.fill_between(x, [m - s for m, s in zip(mean, sd)], [m + s for m, s in zip(mean, sd)],
                              color=line.get_color(), alpha=0.2)
            axes.set(xlabel="step", ylabel=label)

        def share(key, part):
            values = [m[key] for run in runs for m in part(run) if m.get(key) is not None]
            return sum(values) / len(values)

        numbers["offline"][strategy] = (share("offline_ratio", lambda run: run[:tenth]),
                                        share("offline_ratio", lambda run: run[-tenth:]))
        numbers["reward"][strategy] = share("reward_mean", lambda run: run[-tenth:])
        numbers["entropy"][strategy] = share("entropy", lambda run: run[-tenth:])
    panels[0].legend()
    for axes in panels:
        axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return numbers


def figure5(histories, path: Path, strategies=("dypo", "grpo")):
    """The paper's Figure 5: the gradient norm (before clipping) of every update of the first seed's runs, dypo
    against grpo, the legend giving each one's mean and sd over every update of every seed. Returns {strategy:
    (mean, sd)}."""
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(8, 4))
    numbers = {}
    for strategy in strategies:
        norms = [m["grad_norm"] for run in histories[strategy] for m in run if m.get("grad_norm") is not None]
        mean = sum(norms) / len(norms)
        sd = (sum((x - mean) ** 2 for x in norms) / max(1, len(norms) - 1)) ** 0.5
        numbers[strategy] = (mean, sd)
        first = [(m["step"], m["grad_norm"]) for m in histories[strategy][0] if m.get("grad_norm") is not None]
        axes.plot(*zip(*first), linewidth=0.8, label=f"{strategy}: mean {mean:.3f}, sd {sd:.3f}")
    axes.set(xlabel="step", ylabel="gradient norm (before clipping)")
    axes.legend()
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return numbers
