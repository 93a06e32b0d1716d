import json
import random

import pytest
import torch

from dypo import task
from dypo.config import Config
from dypo.data import Problem
from dypo.train import main
from dypo.trainer import Trainer
from dypo_kernels import Route


def test_task_teachers_are_correct_in_their_own_styles():
    from dypo.rewards import exact_match

    problem = task.make_problem(random.Random(0), 2)
    for solution in problem.teacher_solutions:
        assert exact_match(solution, problem.answer) == 1.0
    assert len(set(problem.teacher_solutions)) == 2
    tokenizer = task.CharTokenizer()
    assert tokenizer.decode(tokenizer.encode("(3+4)=7") + [task.EOS, 5]) == "(3+4)=7"


PROBLEMS = [Problem("1+1=", "2", ["2", "(1+1)=2"]), Problem("2+2=", "4", ["4", "(2+2)=4"]),
            Problem("3+3=", "6", ["6", "(3+3)=6"])]


def forced_trainer(monkeypatch, **options):
    """Rollouts forced to: prompt 0 all right (easy), prompt 1 half right (mid), prompt 2 all wrong (hard)."""
    options = {"num_generations": 4, "prompts_per_step": 3, "max_new_tokens": 6, "train_batch_size": 2, **options}
    trainer = Trainer(Config(**options))
    forced = ["2"] * 4 + ["4", "5", "4", "5"] + ["1"] * 4
    monkeypatch.setattr("dypo.policy.generate", lambda *args, **kwargs: [trainer.codec.solution_ids(t)
                                                                         for t in forced])
    monkeypatch.setattr(trainer.source, "next", lambda count: PROBLEMS)
    return trainer


def test_step_routes_loss_terms_as_the_grades_say(monkeypatch):
    trainer = forced_trainer(monkeypatch, beta=0.1)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    metrics, _ = trainer.train_step(0)
    assert (metrics["share_easy"], metrics["share_mid"], metrics["share_hard"]) == pytest.approx((1 / 3,) * 3)
    assert metrics["offline_ratio"] == 0.5 and metrics["updates"] == 1 and metrics["queued_prompts"] == 0
    assert metrics["num_prompts_rl"] == 1 and metrics["num_prompts_sft"] == 1
    assert metrics["loss_sft"] > 0 and metrics["num_pairs"] == 4  # 2 successes x 2 failures in the mid group
    assert metrics["mean_kl"] == pytest.approx(0.0, abs=1e-6)  # policy == reference at the first step
    assert metrics["clip_fraction_low"] == 0.0 and metrics["grad_norm"] > 0 and metrics["train_tokens"] > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))


def test_rollouts_carry_their_logprobs_and_advantages(monkeypatch):
    trainer = forced_trainer(monkeypatch, train_batch_size=8)  # nothing fires: the groups stay queued
    trainer.train_step(0)
    sft, rl = trainer.queues.groups[Route.SFT], trainer.queues.groups[Route.RL]
    assert [g.route for g in rl] == [Route.RL] and [g.route for g in sft] == [Route.SFT]
    assert [row.advantage > 0 for row in rl[0].rows] == [True, False, True, False]
    for row in rl[0].rows:
        assert len(row.old_logps) == len(row.ids) - row.prompt_length == len(row.ref_logps)
        assert row.old_logps == pytest.approx(row.ref_logps, abs=1e-5)  # the reference is the initial policy
    assert len(sft[0].rows) == 1 and sft[0].rows[0].old_logps is None


def test_all_teachers_option_trains_on_every_solution(monkeypatch):
    trainer = forced_trainer(monkeypatch, train_batch_size=8, sft_teachers="all")
    trainer.train_step(0)
    (hard,) = trainer.queues.groups[Route.SFT]
    completions = {trainer.codec.text(row.ids[row.prompt_length:]) for row in hard.rows}
    assert completions == {"6", "(3+3)=6"}


def test_updates_report_every_loss_metric_the_table_names(monkeypatch):
    trainer = forced_trainer(monkeypatch, beta=0.1)
    metrics, _ = trainer.train_step(0)
    assert {"mean_entropy", "mean_margin", "mean_ratio", "mean_kl", "pair_accuracy", "num_tokens_rl"} <= set(metrics)


def four_prompt_trainer(monkeypatch, **options):
    """Prompts mid, hard, mid, easy: three routed groups, so micro-batches of 2 split them unevenly."""
    problems = [PROBLEMS[1], PROBLEMS[2], Problem("4+4=", "8", ["8", "(4+4)=8"]), PROBLEMS[0]]
    forced = ["4", "5", "4", "5"] + ["1"] * 4 + ["8", "8", "8", "9"] + ["2"] * 4
    options = {"num_generations": 4, "prompts_per_step": 4, "max_new_tokens": 6, "train_batch_size": 3, **options}
    trainer = Trainer(Config(**options))
    monkeypatch.setattr("dypo.policy.generate", lambda *args, **kwargs: [trainer.codec.solution_ids(t)
                                                                         for t in forced])
    monkeypatch.setattr(trainer.source, "next", lambda count: problems)
    return trainer


@pytest.mark.parametrize("beta,loss_type,sft_teachers", [(0.0, "grpo", "one"), (0.1, "grpo", "one"),
                                                          (0.1, "dapo", "all"), (0.0, "bnpo", "one"),
                                                          (0.1, "dr_grpo", "all")])
def test_micro_batches_accumulate_the_whole_batch_gradient(monkeypatch, beta, loss_type, sft_teachers):
    """Every loss type, and hard prompts with several teacher solutions: the parts are normalised by the whole
    update's totals (token counts, sequences, padded width), so they add up exactly."""
    options = dict(beta=beta, loss_type=loss_type, sft_teachers=sft_teachers)
    whole = four_prompt_trainer(monkeypatch, **options)
    whole_metrics, _ = whole.train_step(0)
    parts = four_prompt_trainer(monkeypatch, micro_batch_size=2, log_prob_micro_batch_size=3, **options)
    parts_metrics, _ = parts.train_step(0)  # micro-batches [mid, hard] and [mid]: the second has no SFT rows
    assert whole_metrics["updates"] == parts_metrics["updates"] == 1
    # not pair_accuracy: at step 0 the policy is its reference, so every GAL margin is 0 up to rounding, and which
    # side of 0 it rounds to depends on how the rows were batched
    for name in ("loss", "loss_sft", "loss_grpo", "loss_gal", "mean_ratio", "entropy"):
        assert parts_metrics[name] == pytest.approx(whole_metrics[name], rel=1e-5, abs=1e-7), name
    for name in ("num_prompts_sft", "num_prompts_rl", "num_pairs", "num_tokens_rl", "train_tokens"):
        assert parts_metrics[name] == whole_metrics[name], name
    for a, b in zip(whole.model.parameters(), parts.model.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6)


def test_generation_in_chunks_gives_the_same_greedy_completions():
    from dypo.policy import generate, load_policy

    torch.manual_seed(0)
    model, codec, runtime = load_policy(Config())
    prompts = [codec.prompt_ids(p) for p in ("1+2=", "33+4=", "5+66=", "7+8=", "9+1=")]
    whole = generate(model, codec, runtime, prompts, max_new_tokens=5, temperature=1.0, greedy=True)
    assert generate(model, codec, runtime, prompts, max_new_tokens=5, temperature=1.0, greedy=True,
                    batch_size=2) == whole


@pytest.mark.parametrize("corrected", ["true", "false"])
def test_loss_options_reach_dypo_loss(tmp_path, monkeypatch, corrected):
    import dypo.trainer

    seen = []
    real = dypo.trainer.dypo_loss
    monkeypatch.setattr(dypo.trainer, "dypo_loss",
                        lambda *args, **kwargs: seen.append(kwargs) or real(*args, **kwargs))
    main(["--max_steps", "2", "--eval_prompts", "2", "--beta", "0.1", "--loss_type", "dapo", "--epsilon_high", "0.28",
          "--use_bias_correction_kl", corrected, "--output_dir", str(tmp_path / "run")])
    assert seen and all(kwargs["use_bias_correction_kl"] == (corrected == "true") and kwargs["beta_kl"] == 0.1 and
                        kwargs["loss_type"] == "dapo" and kwargs["eps_high"] == 0.28 for kwargs in seen)


def test_variant_options_reach_dypo_loss(tmp_path, monkeypatch):
    import dypo.trainer

    seen = []
    real = dypo.trainer.dypo_loss
    monkeypatch.setattr(dypo.trainer, "dypo_loss",
                        lambda *args, **kwargs: seen.append(kwargs) or real(*args, **kwargs))
    main(["--max_steps", "2", "--eval_prompts", "2", "--loss_type", "luspo", "--entropy_coef", "0.01",
          "--sapo_temperature_neg", "2", "--importance_sampling_level", "sequence", "--output_dir",
          str(tmp_path / "run")])
    assert seen and all(kwargs["loss_type"] == "luspo" and kwargs["entropy_coef"] == 0.01 and kwargs["delta"] is None
                        and kwargs["sapo_temperature_neg"] == 2.0 and kwargs["importance_sampling_level"] == "sequence"
                        for kwargs in seen)


def test_a_short_run_writes_its_run_directory(tmp_path):
    summary = main(["--max_steps", "4", "--logging_steps", "2", "--sample_steps", "2", "--save_steps", "2",
                    "--eval_prompts", "4", "--output_dir", str(tmp_path / "run")])
    run = tmp_path / "run"
    assert json.loads((run / "config.json").read_text())["max_steps"] == 4
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [0, 1, 2, 3]
    assert {"reward_mean", "share_hard", "share_mid", "share_easy", "offline_ratio", "entropy", "loss", "grad_norm",
            "tokens_per_second", "step_seconds", "peak_memory_mb", "updates"} <= set(lines[0])
    samples = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == [1] * 4 + [3] * 4 and {"prompt", "completion", "reward"} <= set(samples[0])
    assert {"eval_accuracy_before", "eval_accuracy_after", "steps", "reward_curve", "hard_share_curve",
            "validation_accuracy_before", "validation_accuracy_after", "ood_accuracy_before",
            "ood_accuracy_after"} <= set(summary)
    assert set(summary["ood_sets"]) == {"spaced", "three_terms"}
    for when in ("before", "after"):
        each = [value[when] for value in summary["ood_sets"].values()]
        assert summary[f"ood_accuracy_{when}"] == pytest.approx(sum(each) / 2)
        assert all(v * 4 == int(v * 4) for v in each)  # a share of the 4 prompts per set
    assert len(summary["reward_curve"]) == 2  # one value per logging interval
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    if summary["plots"]:
        for name in ("reward.png", "grades.png", "entropy.png", "grad_norm.png"):
            assert (run / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plots_false_writes_no_pngs(tmp_path):
    summary = main(["--max_steps", "2", "--eval_prompts", "2", "--plots", "false", "--output_dir", str(tmp_path / "r")])
    assert summary["plots"] == [] and not list((tmp_path / "r").glob("*.png"))
