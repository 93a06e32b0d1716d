"""Rewards: the built-in exact match of the final answer, or a user function named ``module:function``."""

import importlib
import math
import numbers
import re


class RewardError(ValueError):
    """A reward function that cannot be loaded or returned something other than one float per completion."""


def boxed_content(text: str):
    r"""The content of the last \boxed{...} (nested braces included), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, position = 1, start + len("\\boxed{")
    for index in range(position, len(text)):
        depth += {"{": 1, "}": -1}.get(text[index], 0)
        if depth == 0:
            return text[position:index]
    return None


def final_answer(completion: str):
    r"""The content of the last \boxed{...}, else the last number of a completion, else None."""
    content = boxed_content(completion)
    if content is not None:
        return content.strip()
    numbers = re.findall(r"-?\d+(?:\.\d+)?", completion.replace(",", ""))
    return numbers[-1] if numbers else None


def _normalized(text: str) -> str:
    for old, new in (("\\left", ""), ("\\right", ""), ("\\!", ""), ("\\dfrac", "\\frac"), ("\\tfrac", "\\frac"),
                     ("$", ""), (" ", ""), (",", "")):
        text = text.replace(old, new)
    return text.rstrip(".")


def _number(text: str):
    r"""The value of an integer, decimal, a/b or \frac{a}{b}, or None."""
    text = _normalized(text)
    fraction = re.fullmatch(r"(-?)\\frac\{(-?\d+(?:\.\d+)?)\}\{(-?\d+(?:\.\d+)?)\}", text) or \
        re.fullmatch(r"()(-?\d+(?:\.\d+)?)/(-?\d+(?:\.\d+)?)", text)
    if fraction:
        sign, numerator, denominator = fraction.groups()
        return None if float(denominator) == 0 else (-1 if sign else 1) * float(numerator) / float(denominator)
    try:
        return float(text) if re.fullmatch(r"-?\d+(?:\.\d+)?", text) else None
    except ValueError:
        return None


def exact_match(completion: str, answer: str) -> float:
    r"""1.0 when the completion's final answer equals the ground truth, else 0.0: as numbers when both read as
    one (integers, decimals, fractions: "12.0" = "12", "\frac{1}{2}" = "0.5"), else as text without spaces, $ and
    \left/\right."""
    found = final_answer(completion)
    if found is None:
        return 0.0
    found_value, answer_value = _number(found), _number(answer)
    if found_value is not None and answer_value is not None:
        return 1.0 if math.isclose(found_value, answer_value, rel_tol=1e-9, abs_tol=1e-12) else 0.0
    return 1.0 if _normalized(found) == _normalized(answer) else 0.0


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
    except Exception as exc:  # a missing module, or one that fails while it is imported
        raise RewardError(f"--reward {spec}: cannot import {module_name!r} ({exc})") from None
    function = getattr(module, function_name, None)
    if not callable(function):
        raise RewardError(f"--reward {spec}: {module_name} has no function {function_name!r}")
    return function


def _name(reward_function) -> str:
    module, name = getattr(reward_function, "__module__", None), getattr(reward_function, "__qualname__", None)
    return f"{module}:{name}" if module and name else repr(reward_function)


def score(reward_function, prompts, completions, answers):
    """The reward function's floats for the completions, checked: one finite real number per completion. A
    function that raises is a RewardError naming it and the exception's first line."""
    name = _name(reward_function)
    try:
        values = reward_function(prompts, completions, ground_truth=answers)
    except Exception as exc:
        line = (str(exc).strip().splitlines() or [""])[0][:200]
        raise RewardError(f"reward function {name} raised {type(exc).__name__}{': ' + line if line else ''}"
                          ) from None
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


def probe_reward(reward_function, problems, count=2):
    """The reward function called once, before the run writes anything, on the teacher solutions of the first
    ``count`` problems as completions, and its values checked as ``score`` checks them: a function that raises or
    returns the wrong number of values is an error up front, not after the first step."""
    problems = list(problems)[:count]
    prompts = [p.prompt for p in problems for _ in p.teacher_solutions]
    completions = [solution for p in problems for solution in p.teacher_solutions]
    answers = [p.answer for p in problems for _ in p.teacher_solutions]
    if completions:
        score(reward_function, prompts, completions, answers)
