import json
import random

import pytest
import torch

from dypo import task
from dypo.train import Config, build_model, main, route_groups, train_step
from dypo_kernels import Grade, Route


def test_task_rewards_and_teachers():
    rng = random.Random(0)
    problem = task.make_problem(rng, 2)
    for solution in problem.teacher_solutions:  # every teacher is correct, in its own style
        assert task.exact_match(solution, problem.answer) == 1.0
    assert len(set(problem.teacher_solutions)) == 2
    assert task.exact_match("12", "13") == 0.0 and task.exact_match("", "1") == 0.0
    assert task.exact_match("so \\boxed{42} done 7", "42") == 1.0
    tokenizer = task.CharTokenizer()
    assert tokenizer.decode(tokenizer.encode("(3+4)=7") + [task.EOS, 5]) == "(3+4)=7"


@pytest.mark.parametrize("strategy,step,expected,plain_grpo", [
    ("dypo", 5, [Route.SKIP, Route.RL, Route.SFT], False),
    ("grpo", 5, [Route.SKIP, Route.RL, Route.RL], True),
    ("sft", 5, [Route.SFT, Route.SFT, Route.SFT], False),
    ("sft_then_rl", 0, [Route.SFT, Route.SFT, Route.SFT], False),
    ("sft_then_rl", 9, [Route.SKIP, Route.RL, Route.RL], True),
    ("dypo", 1, [Route.SKIP, Route.RL, Route.RL], True),  # before switch_gate: plain GRPO
])
def test_routes_follow_grades(strategy, step, expected, plain_grpo):
    config = Config(strategy=strategy, max_steps=10, switch_gate=2, alpha=0.3)
    routes, alpha = route_groups([Grade.EASY, Grade.MID, Grade.HARD], strategy, step, config)
    assert routes == expected
    assert alpha == (1.0 if plain_grpo else 0.3)


def test_step_routes_loss_terms_as_the_grades_say(monkeypatch):
    """Rollouts forced to: prompt 0 all right (easy), prompt 1 half right (mid), prompt 2 all wrong (hard)."""
    config = Config(num_generations=4, prompts_per_step=3, max_new_tokens=6)
    tokenizer = task.CharTokenizer()
    torch.manual_seed(0)
    model = build_model(config, tokenizer.vocab_size)
    reference = build_model(config, tokenizer.vocab_size).requires_grad_(False)
    problems = [task.Problem("1+1=", "2", ["2", "(1+1)=2"]), task.Problem("2+2=", "4", ["4", "(2+2)=4"]),
                task.Problem("3+3=", "6", ["6", "(3+3)=6"])]
    forced = ["2"] * 4 + ["4", "5", "4", "5"] + ["1"] * 4
    monkeypatch.setattr("dypo.train.generate", lambda *args, **kwargs: list(forced))
    before = [p.detach().clone() for p in model.parameters()]
    metrics = train_step(model, reference, torch.optim.SGD(model.parameters(), lr=0.1), tokenizer, problems, config,
                         step=0, rng=random.Random(0))
    assert (metrics["share_easy"], metrics["share_mid"], metrics["share_hard"]) == pytest.approx((1 / 3,) * 3)
    assert metrics["num_prompts_rl"] == 1 and metrics["num_prompts_sft"] == 1
    assert metrics["loss_sft"] > 0 and metrics["num_pairs"] == 4  # 2 successes x 2 failures in the mid group
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_a_short_run_writes_its_run_directory(tmp_path):
    summary = main(["--max_steps", "3", "--logging_steps", "1", "--eval_prompts", "4", "--output_dir",
                    str(tmp_path / "run")])
    run = tmp_path / "run"
    assert json.loads((run / "config.json").read_text())["max_steps"] == 3
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [0, 1, 2]
    assert {"reward_mean", "share_hard", "offline_ratio", "loss"} <= set(lines[0])
    assert {"eval_accuracy_before", "eval_accuracy_after", "steps", "reward_curve", "hard_share_curve"} <= set(summary)
    assert len(summary["reward_curve"]) == 3  # one value per logging interval


def test_unknown_strategy_is_a_one_line_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--strategy", "ppo"])
    assert exit_info.value.code == 2
    assert "strategy" in capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [
    (["--alpha", "2"], "alpha must lie in [0, 1]"),
    (["--loss_type", "ppo"], "loss_type must be one of grpo, bnpo, dapo, dr_grpo"),
    (["--max_steps", "0"], "max_steps must be a positive integer"),
    (["--no_such_option", "1"], "unrecognized arguments"),
])
def test_bad_options_are_one_line_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in error and len(error.strip().splitlines()) == 1


def test_yaml_config_then_options(tmp_path, capsys):
    from dypo.train import parse_config

    config_file = tmp_path / "run.yaml"
    config_file.write_text("alpha: 0.25\nmax_steps: 7\n")
    config = parse_config(["--config", str(config_file), "--max_steps", "9"])
    assert (config.alpha, config.max_steps) == (0.25, 9)  # the command line wins over the file
    config_file.write_text("alpah: 0.25\n")
    with pytest.raises(SystemExit) as exit_info:
        parse_config(["--config", str(config_file)])
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and "unknown key 'alpah'" in error and "alpha" in error
