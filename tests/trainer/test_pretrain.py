"""The base model (built once, cached by recipe, loaded by --init base), the task's corpora and evaluation sets."""

import random

import pytest
import torch
from safetensors.torch import load_file

from dypo import policy, pretrain, task
from dypo.config import Config
from dypo.data import extra_eval_sets


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setitem(pretrain.BASE_RECIPE, "steps", 3)  # the real recipe's 150 steps take seconds
    return tmp_path / "dypo" / "models"


def test_the_base_model_is_built_once_and_every_run_starts_from_it(cache, capsys):
    first, _, _ = policy.load_policy(Config(seed=1))
    (built,) = cache.glob("base-*")
    assert capsys.readouterr().out.count("built the base model") == 1
    second, _, _ = policy.load_policy(Config(seed=2, strategy="grpo"))
    assert "built the base model" not in capsys.readouterr().out
    saved = load_file(built / "model.safetensors")
    for model in (first, second):
        assert all(torch.equal(value, saved[name]) for name, value in model.state_dict().items() if name in saved)
    random_init, _, _ = policy.load_policy(Config(init="random"))
    assert not torch.equal(random_init.lm_head.weight, first.lm_head.weight)
    policy.load_policy(Config(hidden_size=32))  # another architecture: another base model
    assert len(list(cache.glob("base-*"))) == 2


def test_the_base_model_answers_some_prompts_as_trained():
    """The real recipe: after its 150 steps the base model solves some of the task's prompts greedily, not all."""
    model = pretrain.train_tiny(pretrain.base_recipe(Config()))
    codec = policy.CharCodec()
    problems = task.make_problems(random.Random(0), 64, 2)
    completions = policy.generate(model, codec, policy.Runtime(torch.device("cpu")),
                                  [codec.prompt_ids(p.prompt) for p in problems], max_new_tokens=4, temperature=1.0,
                                  greedy=True)
    correct = sum(codec.text(c) == p.answer for c, p in zip(completions, problems)) / len(problems)
    assert 0.05 < correct < 0.6


def test_the_corpora_and_the_evaluation_sets_hold_what_they_say():
    problems = task.pretraining_problems(random.Random(0), 300, 2)
    spaced = [p for p in problems if " " in p.prompt]
    three = [p for p in problems if p.prompt.count("+") == 2]
    assert 70 < len(spaced) < 130 and 70 < len(three) < 130
    for problem in problems:
        terms = problem.prompt.replace(" ", "").removesuffix("=").split("+")
        assert int(problem.answer) == sum(map(int, terms))
    assert [p.prompt for p in task.make_problems(random.Random(3), 5, 2)] == \
        ["8+2=", "9+7=", "1+9=", "7+4=", "3+7="]  # the task's prompts as before the other formats came
    sets = extra_eval_sets(Config(eval_prompts=10))
    assert list(sets) == ["validation", "ood_spaced", "ood_three_terms"] and all(len(s) == 10 for s in sets.values())
    assert all(" + " in p.prompt for p in sets["ood_spaced"])
    assert all(p.prompt.count("+") == 2 and len(p.prompt) == 6 for p in sets["ood_three_terms"])
