"""python -m dypo.compare: the DYPO paper's comparisons in miniature on the built-in task, every run from the same
base model (pretrain.py), each run ``python -m dypo.train`` with its options.

1. Learning rates: every swept strategy at each of --learning_rates on the --sweep_seeds, scored on the validation
   set; each keeps its best rate (the ablations without a sweep of their own take dypo's).
2. The main table (the paper's Table 1): dypo, grpo, sft, sft_then_rl and luffy at their rates over --seeds, the
   test set (in distribution) and the out-of-distribution sets; dypo against each baseline paired by seed.
3. The ablation ladder (Table 3: sft -> sft_rl -> dypo with alpha 1 -> dypo), one teacher against two (Table 4),
   the hard prompts' KL to the teachers (--hard_loss sft_kl), and an alpha x beta_GAL grid (Table 5).
4. Figure 4 (offline ratio, training reward and entropy against steps) and Figure 5 (gradient-norm traces of dypo
   and grpo), as PNGs; and the gradient variance of GRPO alone against alpha GRPO + (1 - alpha) GAL on the same
   batches at the checkpoints of the first seed's dypo run (the paper's eq. 19).

Writes docs/strategy_comparison_DATE.md and its figures (--report_dir). Runs go to --output_dir; a run whose
summary is there from the same options is not run again. --quick: the whole pipeline at a toy size (under a
minute).
"""

import argparse
import contextlib
import datetime
import io
import json
import os
import queue
import random
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

from dypo import plots
from dypo.stats import mean_sd, p_value, paired, paired_text

# name: (python -m dypo.train options, what it is)
VARIANTS = {
    "dypo": ([], "DYPO: hard -> SFT, mid -> alpha GRPO + (1 - alpha) GAL, easy dropped"),
    "grpo": (["--strategy", "grpo"], "GRPO on every prompt's rollouts"),
    "sft": (["--strategy", "sft"], "multi-teacher SFT on every prompt (one teacher drawn uniformly)"),
    "sft_then_rl": (["--strategy", "sft_then_rl"], "SFT for the first half of the steps, then GRPO"),
    "luffy": (["--strategy", "luffy"], "LUFFY: mixed-policy GRPO, a teacher trajectory in each group, policy "
                                       "shaping"),
    "sft_rl": (["--strategy", "sft_rl"], "multi-teacher SFT + GRPO on every prompt, no grading"),
    "dypo_alpha1": (["--alpha", "1"], "DYPO's grading with alpha 1: no GAL"),
    "dypo_one_teacher": (["--num_teachers", "1"], "DYPO with one teacher (the first) instead of two"),
    "dypo_sft_kl": (["--hard_loss", "sft_kl", "--teacher_models", "builtin"],
                    "DYPO, hard prompts: SFT + KL to the two teacher models"),
}
MAIN = ("dypo", "grpo", "sft", "sft_then_rl", "luffy")
LADDER = (("sft", "multi-teacher SFT"), ("sft_rl", "+ RL (no grading)"),
          ("dypo_alpha1", "+ dynamic grading (alpha 1, no GAL)"), ("dypo", "+ GAL (DYPO)"))
SWEPT = ("dypo", "grpo", "sft", "sft_then_rl", "luffy", "sft_rl", "dypo_alpha1")
GRID_ALPHAS, GRID_BETAS = (0.2, 0.5, 0.8), (0.1, 1.0, 2.0)
QUICK = {"max_steps": 6, "eval_prompts": 8, "seeds": [0, 1], "sweep_seeds": [100], "grid_seeds": [0],
         "learning_rates": [3e-4, 1e-3], "batches": 2}


def worker():
    """--worker: runs python -m dypo.train once per line of stdin (a JSON list of its options) in this one process,
    its output discarded; answers each with a line: {} when it ended well, else {"error": its last stderr line}."""
    from dypo import run

    for line in sys.stdin:
        errors = io.StringIO()
        try:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(errors):
                run.main(json.loads(line))
            answer = {}
        except (SystemExit, Exception) as exc:  # a failed run is reported, and the next one goes on
            lines = errors.getvalue().strip().splitlines()
            answer = {"error": lines[-1] if lines else repr(exc)}
        print(json.dumps(answer), flush=True)


def run_all(runs, workers: int):
    """Each run (run directory, options) in one of ``workers`` worker processes (0: in this process); returns each
    directory's summary, and how many were not run again: a directory holding a summary of the same options."""
    todo = queue.Queue()
    for run_dir, argv in runs:
        if not ((run_dir / "summary.json").is_file() and (run_dir / "argv.json").is_file() and
                _results_of(json.loads((run_dir / "argv.json").read_text())) == _results_of(argv)):
            todo.put((run_dir, argv))
    failures, done = [], []

    def finished(run_dir, argv, answer):
        if "error" in answer:
            failures.append(f"{run_dir}: {answer['error']}")
        else:
            (run_dir / "argv.json").write_text(json.dumps(argv))
            done.append(run_dir)

    if workers == 0:
        from dypo import run

        while not todo.empty():
            run_dir, argv = todo.get()
            with contextlib.redirect_stdout(io.StringIO()):
                run.main(argv)
            finished(run_dir, argv, {})
    else:
        threads = str(max(1, (os.cpu_count() or 1) // workers))

        def serve():
            process = subprocess.Popen([sys.executable, "-m", "dypo.compare", "--worker"], stdin=subprocess.PIPE,
                                       stdout=subprocess.PIPE, text=True,
                                       env={**os.environ, "OMP_NUM_THREADS": threads})
            while True:
                try:
                    run_dir, argv = todo.get_nowait()
                except queue.Empty:
                    break
                process.stdin.write(json.dumps(argv) + "\n")
                process.stdin.flush()
                finished(run_dir, argv, json.loads(process.stdout.readline() or '{"error": "the worker ended"}'))
            process.stdin.close()
            process.wait()

        pool = [threading.Thread(target=serve) for _ in range(workers)]
        for thread in pool:
            thread.start()
        for thread in pool:
            thread.join()
    if failures:
        raise SystemExit("python -m dypo.compare: runs failed:\n" + "\n".join(failures))
    summaries = {run_dir: json.loads((run_dir / "summary.json").read_text()) for run_dir, _ in runs}
    return summaries, len(runs) - len(done)


def _results_of(argv):
    """The options that decide a run's results (--plots only decides what else it writes)."""
    pairs = list(zip(argv[::2], argv[1::2]))
    return [pair for pair in pairs if pair[0] != "--plots"]


def options(variant, seed, rate, args, out, extra=()):
    """(run directory, python -m dypo.train options) of one run."""
    name = "-".join([variant, *(str(x) for x in extra[1::2])]) + f"-lr{rate:g}-seed{seed}"
    run_dir = out / name
    checkpoints = args.max_steps // 6 if variant == "dypo" and seed == args.seeds[0] and not extra else \
        args.max_steps
    argv = [*VARIANTS[variant][0], *extra, "--seed", str(seed), "--learning_rate", str(rate), "--max_steps",
            str(args.max_steps), "--eval_prompts", str(args.eval_prompts), "--logging_steps",
            str(max(1, args.max_steps // 10)), "--sample_steps", str(args.max_steps),
            "--save_steps", str(max(1, checkpoints)), "--save_total_limit", "6", "--plots", "false",
            "--output_dir", str(run_dir), "--overwrite_output_dir"]
    return run_dir, argv


def history(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _flat_gradient(model):
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def gradient_variance(run_dir: Path, batches: int, seed: int = 1000):
    """Per checkpoint of a dypo run: the variance statistics of g_GRPO (alpha = 1) and g_mix (the run's alpha)
    over ``batches`` batches of train_batch_size fresh mid groups. Var = sum_b ||g_b - mean g||^2 / (B - 1) (the
    estimator's variance, unbiased), Var(||g_b||), and the scale-free Var / ||g||^2, ||g||^2 estimated without bias
    as ||mean g||^2 - Var / B."""
    from safetensors.torch import load_model

    from dypo import checkpoint
    from dypo.config import Config
    from dypo.data import ProblemSource
    from dypo.routing import route_groups
    from dypo.trainer import Trainer
    from dypo_kernels import Route

    config = Config(**json.loads((run_dir / "config.json").read_text()))
    rows = []
    for saved in checkpoint.checkpoints(run_dir):
        step = int(saved.name.split("-")[1])
        trainer = Trainer(config)
        load_model(trainer.model, str(saved / "model.safetensors"))
        trainer.rng = random.Random(seed + step)
        trainer.source = ProblemSource(config, trainer.rng)
        mid_groups = trainer.queues.groups[Route.RL]
        while len(mid_groups) < batches * config.train_batch_size:
            rollouts = trainer.rollouts(trainer.source.next(config.prompts_per_step))
            _, graded = trainer.grade(rollouts)
            routes, _ = route_groups(graded.grade, config.strategy, config.max_steps, config)
            trainer.enqueue(rollouts, graded, routes, config.max_steps)
            mid_groups = trainer.queues.groups[Route.RL]
        gradients = {"grpo": [], "mix": []}
        for b in range(batches):
            groups = mid_groups[b * config.train_batch_size:(b + 1) * config.train_batch_size]
            for name, alpha in (("grpo", 1.0), ("mix", config.alpha)):
                trainer.model.zero_grad(set_to_none=True)
                trainer.loss(trainer.batch(groups), alpha)[0].backward()
                gradients[name].append(_flat_gradient(trainer.model).double())
        row = {"step": step}
        for name, values in gradients.items():
            stacked = torch.stack(values)
            mean = stacked.mean(0)
            variance = (stacked - mean).pow(2).sum(1).sum().item() / (batches - 1)
            signal = mean.pow(2).sum().item() - variance / batches
            row.update({f"var_{name}": variance, f"norm_var_{name}": stacked.norm(dim=1).var().item(),
                        f"signal_{name}": signal, f"relative_var_{name}": variance / signal if signal > 0 else
                        float("inf")})
        rows.append(row)
    return rows


class Results:
    """The summaries of every run, looked up by variant, options and seed."""

    def __init__(self, summaries, rates, args, out):
        self.summaries, self.rates, self.args, self.out = summaries, rates, args, out

    def runs(self, variant, extra=(), seeds=None, rate=None):
        rate = rate if rate is not None else self.rates[variant]
        return [self.summaries[options(variant, seed, rate, self.args, self.out, extra)[0]]
                for seed in (seeds or self.args.seeds)]

    def accuracy(self, variant, column, **kwargs):
        key = {"id": "eval_accuracy_after", "ood": "ood_accuracy_after", "validation": "validation_accuracy_after"}
        return [summary[key[column]] for summary in self.runs(variant, **kwargs)]


def rate_of(variant):
    return variant if variant in SWEPT else "dypo"


def write_report(results, variance_rows, figures, args, path: Path, seconds):
    rates = results.rates
    ood_names = list(results.runs("dypo")[0]["ood_sets"])
    lines = [f"# DYPO in miniature: the paper's comparisons ({datetime.date.today()})", "",
             f"Machine: {os.cpu_count()}-core CPU, torch {torch.__version__}. Command: `python -m dypo.compare"
             f"{' --quick' if args.quick else ''}` ({seconds / 60:.1f} min for {args.runs} runs"
             f"{f', {args.reused} of them reused from an earlier invocation' if args.reused else ''}). "
             "Every run starts from the same base model "
             f"(`python -m dypo.pretrain`) and trains {args.max_steps} steps of 8 prompts x 8 rollouts on the "
             "built-in task (`a+b=`, operands of 1-2 digits). Accuracy: greedy decoding after training on "
             f"{args.eval_prompts} prompts per set: the test set (in distribution, ID), and the out-of-distribution "
             f"sets never trained on after the base model (OOD, their mean): {', '.join(ood_names)} "
             "(`a + b =`, and sums of three one-digit terms). Rates are chosen on a separate validation set.", ""]
    lines += ["## Strategies", ""] + [f"- `{name}`: {what} (`{' '.join(['python -m dypo.train', *argv])}`)."
                                      for name, (argv, what) in VARIANTS.items()]
    lines += ["", "## Learning rates", "",
              f"Validation accuracy, mean over seeds {', '.join(map(str, args.sweep_seeds))}; the chosen rate in bold."
              " The ablations without a row take dypo's.", "",
              "| strategy | " + " | ".join(f"{rate:g}" for rate in args.learning_rates) + " |",
              "|---|" + "---|" * len(args.learning_rates)]
    for variant in SWEPT:
        cells = []
        for rate in args.learning_rates:
            value = statistics.mean(results.accuracy(variant, "validation", seeds=args.sweep_seeds, rate=rate))
            cells.append(f"**{value:.3f}**" if rate == rates[variant] else f"{value:.3f}")
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    before = results.runs("dypo")[0]
    lines += ["", f"The base model before training: ID {before['eval_accuracy_before']:.3f}, OOD "
              f"{before['ood_accuracy_before']:.3f} (seed {args.seeds[0]}'s sets).", ""]

    def table(title, rows, note):
        nonlocal lines
        lines += [f"## {title}", "", note, "",
                  "| strategy | rate | ID | OOD | " + " | ".join(ood_names) + " | dypo - this, ID | dypo - this, OOD |",
                  "|---|---|---|---|" + "---|" * len(ood_names) + "---|---|"]
        for variant, label in rows:
            runs = results.runs(variant)
            per_set = [mean_sd([r["ood_sets"][name]["after"] for r in runs]) for name in ood_names]
            versus = ["", ""] if variant == "dypo" else [
                paired_text(results.accuracy("dypo", column), results.accuracy(variant, column))
                for column in ("id", "ood")]
            lines.append(f"| {label} | {rates[variant]:g} | {mean_sd(results.accuracy(variant, 'id'))} | "
                         f"{mean_sd(results.accuracy(variant, 'ood'))} | " + " | ".join(per_set) + " | " +
                         " | ".join(versus) + " |")
        lines.append("")

    seeds = f"{len(args.seeds)} seeds ({', '.join(map(str, args.seeds))})"
    paired_note = ("dypo - this: the mean paired difference over the seeds, its bootstrap 95% interval, and the "
                   "two-sided p of the paired t-test. Claims below hold where p < 0.05 and the interval excludes 0.")
    table("Main table (the paper's Table 1)", [(v, v) for v in MAIN],
          f"Mean ± sd over {seeds}. {paired_note}")
    table("Ablation ladder (Table 3)", LADDER, f"Each rung adds one part of DYPO. {seeds}.")
    table("Teachers and the hard prompts' loss (Table 4, and --hard_loss)",
          [("dypo_one_teacher", "dypo, one teacher"), ("dypo", "dypo, two teachers"),
           ("dypo_sft_kl", "dypo, hard: SFT + KL to the teachers")], f"{seeds}, dypo's rate.")
    lines += ["## alpha x beta_GAL (Table 5)", "", f"ID / OOD accuracy, mean over seeds "
              f"{', '.join(map(str, args.grid_seeds))}, dypo's rate.", "",
              "| alpha \\ beta_GAL | " + " | ".join(f"{beta:g}" for beta in GRID_BETAS) + " |",
              "|---|" + "---|" * len(GRID_BETAS)]
    for alpha in GRID_ALPHAS:
        cells = []
        for beta in GRID_BETAS:
            runs = results.runs("dypo", extra=grid_extra(alpha, beta), seeds=args.grid_seeds)
            cells.append(f"{statistics.mean(r['eval_accuracy_after'] for r in runs):.3f} / "
                         f"{statistics.mean(r['ood_accuracy_after'] for r in runs):.3f}")
        lines.append(f"| {alpha:g} | " + " | ".join(cells) + " |")
    lines += ["", "## Figures 4 and 5", "", f"![Figure 4]({figures['figure4'].name})", "",
              "Offline ratio (the off-policy share of each trained prompt's data), training reward and policy entropy "
              f"against steps, mean over {seeds}, shaded ± sd.", "", f"![Figure 5]({figures['figure5'].name})", "",
              "Gradient norms (before clipping) of every update, dypo against grpo from the same base model; the "
              "legend gives their mean and sd over every update of every seed.", "",
              "What makes a step's gradient norm: its mean by the SFT share of the step's trained prompts (updates of "
              "every seed; the count of steps in brackets). dypo with alpha 1 trains the same routing without GAL.",
              "", "| strategy | " + " | ".join(label for label, _ in SFT_SHARES) + " | all |",
              "|---|" + "---|" * (len(SFT_SHARES) + 1)]
    for variant, buckets in figures["norms_by_share"].items():
        cells = [f"{statistics.mean(b):.2f} ({len(b)})" if b else "" for b in buckets]
        everything = [norm for bucket in buckets for norm in bucket]
        lines.append(f"| {variant} | " + " | ".join(cells) + f" | {statistics.mean(everything):.2f} |")
    lines += ["", "## Claims of the paper, as measured here", ""] + claims(results, figures["numbers"])
    if variance_rows:
        lines += ["", "## Gradient variance: GRPO alone against alpha GRPO + (1 - alpha) GAL on the same batches", "",
                  f"What Figure 5 does not measure: the variance of the gradient estimator itself. At each checkpoint "
                  f"of the seed-{args.seeds[0]} dypo run, {args.batches} batches of 8 fresh mid groups each, both "
                  "gradients on the same batches. Var = sum_b ||g_b - mean g||^2 / (B - 1), norm var = "
                  "Var(||g_b||), relative = Var / ||g||^2 with ||g||^2 estimated as ||mean g||^2 - Var / B (inf: the "
                  "mean gradient is lost in the noise). With alpha = 0.5, g_mix carries half of g_GRPO, so the raw "
                  "ratio holds a factor 1/4 of scale alone: the relative ratio is the fair comparison. Figure 5's "
                  "gradient norms are those of the training updates, whose batches also hold SFT rows.", "",
                  "| step | Var g_GRPO | Var g_mix | raw ratio mix/GRPO | norm var GRPO | norm var mix | "
                  "relative GRPO | relative mix | relative ratio mix/GRPO |", "|---|---|---|---|---|---|---|---|---|"]
        for row in variance_rows:
            lines.append(f"| {row['step']} | {row['var_grpo']:.3g} | {row['var_mix']:.3g} | "
                         f"{row['var_mix'] / row['var_grpo']:.2f} | {row['norm_var_grpo']:.3g} | "
                         f"{row['norm_var_mix']:.3g} | {row['relative_var_grpo']:.2f} | "
                         f"{row['relative_var_mix']:.2f} | {row['relative_var_mix'] / row['relative_var_grpo']:.2f} |")
    path.write_text("\n".join(lines) + "\n")


def claims(results, numbers):
    """One line per claim of the paper: holds (paired t-test p < 0.05 and the bootstrap interval above 0), reversed
    (the same, below 0), or not significant."""

    def verdict(first, second, column, paper):
        mean, interval, p = paired(results.accuracy(first, column), results.accuracy(second, column))
        if interval is None:
            state = "one seed: no verdict"
        elif p < 0.05 and interval[0] > 0:
            state = "**holds**"
        elif p < 0.05 and interval[1] < 0:
            state = "**reversed**"
        else:
            state = "**not significant**"
        p_text = "" if p is None else f", {p_value(p)}"
        return f"- {first} > {second}, {column.upper()} ({paper}): {state} ({mean:+.3f}{p_text})."

    lines = [verdict("dypo", other, "id", "Table 1") for other in ("sft_then_rl", "luffy", "grpo", "sft")]
    lines += [verdict("dypo", other, "ood", "Table 1") for other in ("sft_then_rl", "sft", "luffy", "grpo")]
    lines += [verdict(upper, lower, "id", "Table 3") for (lower, _), (upper, _) in zip(LADDER, LADDER[1:])]
    lines.append(verdict("dypo", "dypo_one_teacher", "id", "Table 4"))
    offline = numbers["offline"]
    lines.append(f"- DYPO's offline ratio falls as it learns (Figure 4: 1.0 -> 0.35): {offline['dypo'][0]:.2f} -> "
                 f"{offline['dypo'][1]:.2f}; LUFFY's stays at 1/8 (paper: about 0.12): {offline['luffy'][1]:.2f}.")
    reward = numbers["reward"]
    order = sorted(("dypo", "luffy", "grpo"), key=lambda v: -reward[v])
    lines.append(f"- Training reward dypo > luffy > grpo (Figure 4): {' > '.join(order)} over the last tenth of the "
                 f"steps ({', '.join(f'{v} {reward[v]:.2f}' for v in order)}).")
    entropy = numbers["entropy"]
    lines.append(f"- GRPO's entropy collapses while DYPO's stays up (Figure 4: about 0 against 0.2-0.6): final "
                 f"entropy grpo {entropy['grpo']:.2f}, dypo {entropy['dypo']:.2f} nats per token.")
    norms = numbers["grad_norm"]
    lines.append(f"- Lower, steadier gradient norms for DYPO (Figure 5: mean 0.104, sd 0.064 against GRPO's 0.270, "
                 f"0.286): dypo {norms['dypo'][0]:.3f} ± {norms['dypo'][1]:.3f}, grpo {norms['grpo'][0]:.3f} ± "
                 f"{norms['grpo'][1]:.3f}.")
    return lines


SFT_SHARES = (("no SFT prompt", lambda share: share == 0), ("SFT share up to 1/4", lambda share: 0 < share <= 0.25),
              ("1/4 to 1/2", lambda share: 0.25 < share <= 0.5), ("above 1/2", lambda share: share > 0.5))


def norms_by_sft_share(histories):
    """Each strategy's gradient norms (steps with an update) in the buckets of SFT_SHARES, by the share of SFT
    prompts among the step's trained prompts."""
    table = {}
    for variant, runs in histories.items():
        buckets = [[] for _ in SFT_SHARES]
        for m in (m for run in runs for m in run if m.get("grad_norm") is not None):
            share = m.get("num_prompts_sft", 0) / max(1, m.get("num_prompts_sft", 0) + m.get("num_prompts_rl", 0))
            buckets[next(i for i, (_, within) in enumerate(SFT_SHARES) if within(share))].append(m["grad_norm"])
        table[variant] = buckets
    return table


def grid_extra(alpha, beta):
    return ("--alpha", f"{alpha:g}", "--beta_gal", f"{beta:g}")


def parse(argv):
    parser = argparse.ArgumentParser(prog="python -m dypo.compare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="seeds of the main tables")
    parser.add_argument("--sweep_seeds", type=int, nargs="+", default=[100, 101], help="seeds of the rate sweep")
    parser.add_argument("--grid_seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds of the alpha x beta grid")
    parser.add_argument("--learning_rates", type=float, nargs="+", default=[3e-5, 1e-4, 3e-4, 1e-3, 3e-3])
    parser.add_argument("--max_steps", type=int, default=300)
    parser.add_argument("--eval_prompts", type=int, default=256, help="prompts per evaluation set")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (worker processes; 0: in this process)")
    parser.add_argument("--batches", type=int, default=16, help="batches per checkpoint for the gradient variance")
    parser.add_argument("--quick", action="store_true", help=f"a toy size, for CI: {QUICK}")
    parser.add_argument("--output_dir", default="runs/compare")
    parser.add_argument("--report_dir", default="docs")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        vars(args).update(QUICK)
    return args


def main(argv=None):
    args = parse(argv)
    if args.worker:
        return worker()
    started = time.monotonic()
    out, report_dir = Path(args.output_dir), Path(args.report_dir)
    out.mkdir(parents=True, exist_ok=True)
    report_dir.mkdir(parents=True, exist_ok=True)
    sweep = [options(v, seed, rate, args, out) for v in SWEPT for rate in args.learning_rates
             for seed in args.sweep_seeds]
    summaries, reused = run_all(sweep, args.jobs)
    rates = {}
    for variant in SWEPT:
        rates[variant] = max(args.learning_rates, key=lambda rate: statistics.mean(
            summaries[options(variant, seed, rate, args, out)[0]]["validation_accuracy_after"]
            for seed in args.sweep_seeds))
    rates.update({variant: rates[rate_of(variant)] for variant in VARIANTS})
    main_runs = [options(v, seed, rates[v], args, out) for v in VARIANTS for seed in args.seeds]
    grid = [options("dypo", seed, rates["dypo"], args, out, grid_extra(alpha, beta)) for alpha in GRID_ALPHAS
            for beta in GRID_BETAS for seed in args.grid_seeds]
    later, reused_later = run_all(main_runs + grid, args.jobs)
    summaries.update(later)
    args.reused, args.runs = reused + reused_later, len(sweep) + len(main_runs) + len(grid)
    results = Results(summaries, rates, args, out)
    histories = {v: [history(options(v, seed, rates[v], args, out)[0]) for seed in args.seeds] for v in MAIN}
    date = datetime.date.today()
    figures = {"figure4": report_dir / f"figure4_{date}.png", "figure5": report_dir / f"figure5_{date}.png"}
    figures["numbers"] = plots.figure4(histories, figures["figure4"])
    figures["numbers"]["grad_norm"] = plots.figure5(histories, figures["figure5"])
    figures["norms_by_share"] = norms_by_sft_share({v: histories.get(v) or [
        history(options(v, seed, rates[v], args, out)[0]) for seed in args.seeds] for v in ("dypo", "dypo_alpha1",
                                                                                             "grpo")})
    variance_rows = gradient_variance(options("dypo", args.seeds[0], rates["dypo"], args, out)[0], args.batches) \
        if args.batches > 1 else []
    report = report_dir / f"strategy_comparison_{date}.md"
    write_report(results, variance_rows, figures, args, report, time.monotonic() - started)
    print(report.read_text())


if __name__ == "__main__":
    main()
