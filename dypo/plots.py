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
