"""Rewards: the built-in exact match of the final answer, or a user function named ``module:function``."""

import importlib
import math
import numbers
import re


class RewardError(ValueError):
    """A reward function that cannot be loaded or returned something other than one float per completion."""


def final_answer(completion: str):
    """The last integer of a completion, or None (also takes the content of a trailing \\boxed{...})."""
    boxed = re.findall(r"\\boxed\{([^}]*)\}", completion)
    text = boxed[-1] if boxed else completion
    numbers_found = re.findall(r"-?\d+", text)
    return numbers_found[-1] if numbers_found else None


def exact_match(completion: str, answer: str) -> float:
    """1.0 when the completion's final answer equals the ground truth, else 0.0."""
    found = final_answer(completion)
    return 1.0 if found is not None and found.lstrip("0") == answer.lstrip("0") else 0.0


def exact_match_reward(prompts, completions, *, ground_truth, **_):
    """The built-in reward, with the signature of TRL's reward functions."""
    return [exact_match(completion, answer) for completion, answer in zip(completions, ground_truth)]


def load_reward(spec: str):
    """The function ``module:function`` (importable from the current directory), or the built-in exact match for
    an empty spec. It is called as f(prompts, completions, ground_truth=answers) and returns one float each."""
    if not spec:
        return exact_match_reward
    module_name, function_name = spec.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise RewardError(f"--reward {spec}: cannot import {module_name!r} ({exc})") from None
    function = getattr(module, function_name, None)
    if not callable(function):
        raise RewardError(f"--reward {spec}: {module_name} has no function {function_name!r}")
    return function


def score(reward_function, prompts, completions, answers):
    """The reward function's floats for the completions, checked: one finite real number per completion."""
    name = getattr(reward_function, "__name__", "reward")
    values = reward_function(prompts, completions, ground_truth=answers)
    try:
        values = list(values)
    except TypeError:
        raise RewardError(f"reward function {name} must return a list of floats; got "
                          f"{type(values).__name__}") from None
    if len(values) != len(completions):
        raise RewardError(f"reward function {name} returned {len(values)} values for {len(completions)} completions")
    for value in values:
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
            raise RewardError(f"reward function {name} must return finite floats; got {value!r}")
    return [float(value) for value in values]
