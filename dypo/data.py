"""The trainer's problems: from JSONL or Parquet files (a prompt, a string or a list of chat messages, a
ground-truth answer and a list of teacher solutions per record, under configurable field names; defaults: LUFFY's
and DYPO's ``prompt``, ``reward_model.ground_truth``, ``target``), or from the built-in task (task.py). Every
problem of a file is reported before any training starts."""

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Union

Prompt = Union[str, List[dict]]


class DataError(ValueError):
    """A data file that cannot be used; the message names the file, the record and the field."""


@dataclass
class Problem:
    prompt: Prompt
    answer: str
    teacher_solutions: List[str]
    source: str = field(default="", compare=False)  # "--data FILE: record N", for error messages


def _records(path: Path, option: str):
    if not path.is_file():
        raise DataError(f"{option} {path}: no such file")
    if path.suffix in (".jsonl", ".json"):
        records = []
        try:
            with open(path, "rb") as lines:
                for number, raw in enumerate(lines, 1):
                    try:
                        line = raw.decode("utf-8")
                    except UnicodeDecodeError as exc:
                        raise DataError(f"{option} {path}: line {number} is not UTF-8 text (byte "
                                        f"0x{raw[exc.start]:02x} at column {exc.start + 1})") from None
                    if not line.strip():
                        continue
                    try:
                        records.append(json.loads(line))
                    except ValueError as exc:
                        raise DataError(f"{option} {path}: line {number} is not JSON ({exc})") from None
        except OSError as exc:
            raise DataError(f"{option} {path}: cannot be read ({exc.strerror or exc})") from None
        return records
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet
        except ImportError:
            raise DataError(f"{option} {path}: reading Parquet needs pyarrow (pip install '.[train]')") from None
        try:
            return pyarrow.parquet.read_table(path).to_pylist()
        except Exception as exc:  # pyarrow raises several unrelated types for a damaged file
            raise DataError(f"{option} {path}: not a readable Parquet file ({exc})") from None
    raise DataError(f"{option} {path}: the file name must end in .jsonl or .parquet")


def _field(record, name: str, where: str, option: str):
    value = record
    for part in name.split("."):
        if not isinstance(value, dict) or part not in value:
            raise DataError(f"{where} has no field {name!r} (set --{option})")
        value = value[part]
    return value


def _prompt(value, where: str) -> Prompt:
    if isinstance(value, str) and value:
        return value
    if isinstance(value, list) and value and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in value):
        return [{"role": m["role"], "content": m["content"]} for m in value]
    raise DataError(f"{where}: the prompt must be a non-empty string or a list of {{role, content}} messages; "
                    f"got {type(value).__name__}")


def _solutions(value, where: str) -> List[str]:
    items = [value] if isinstance(value, (str, dict)) else value
    if not isinstance(items, list) or not items:
        raise DataError(f"{where}: the teacher solutions must be a non-empty list; got {type(value).__name__}")
    solutions = []
    for item in items:
        text = item.get("content") if isinstance(item, dict) else item
        if not isinstance(text, str) or not text:
            raise DataError(f"{where}: each teacher solution must be a non-empty string or a message with a "
                            f"content; got {type(item).__name__}")
        solutions.append(text)
    return solutions


def load_problems(path, *, prompt_field="prompt", answer_field="reward_model.ground_truth", teachers_field="target",
                  option="--data") -> List[Problem]:
    """Every record of a .jsonl or .parquet file as a Problem; raises DataError naming the file, record and field
    of the first problem found (missing file, empty file, missing field, wrong type)."""
    path = Path(path)
    records = _records(path, option)
    if not records:
        raise DataError(f"{option} {path}: the file holds no records")
    problems = []
    for number, record in enumerate(records, 1):
        where = f"{option} {path}: record {number}"
        if not isinstance(record, dict):
            raise DataError(f"{where} is a {type(record).__name__}, not an object")
        answer = _field(record, answer_field, where, "answer_field")
        if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
            raise DataError(f"{where}: the answer must be a string or a number; got {type(answer).__name__}")
        problems.append(Problem(prompt=_prompt(_field(record, prompt_field, where, "prompt_field"), where),
                                answer=str(answer),
                                teacher_solutions=_solutions(_field(record, teachers_field, where, "teachers_field"),
                                                             where), source=where))
    return problems


def load_data(config):
    """(training problems or None for the built-in task, evaluation problems)."""
    from dypo import task  # task.py imports Problem from here

    if not config.data:
        return None, task.make_problems(random.Random(config.seed + 1), config.eval_prompts, config.max_digits)
    fields = {"prompt_field": config.prompt_field, "answer_field": config.answer_field,
              "teachers_field": config.teachers_field}
    problems = load_problems(config.data, **fields)
    if config.eval_data:
        return problems, load_problems(config.eval_data, option="--eval_data", **fields)[:config.eval_prompts]
    if len(problems) <= config.eval_prompts:
        raise DataError(f"--data {config.data}: {len(problems)} records leave none for training after holding out "
                        f"eval_prompts={config.eval_prompts}; lower --eval_prompts or give --eval_data")
    order = list(range(len(problems)))
    random.Random(config.seed + 1).shuffle(order)
    held_out = set(order[:config.eval_prompts])
    training = [p for i, p in enumerate(problems) if i not in held_out]
    return training, [problems[i] for i in order[:config.eval_prompts]]


def check_encodable(codec, problems) -> int:
    """Every prompt and teacher solution through the tokenizer before any training, so that a bad record is an
    error up front rather than mid-run. Returns the longest prompt's length in tokens."""
    longest = 0
    for problem in problems:
        try:
            longest = max(longest, len(codec.prompt_ids(problem.prompt)))
            for solution in problem.teacher_solutions:
                codec.solution_ids(solution)
        except Exception as exc:  # tokenizers and chat templates raise many unrelated types
            raise DataError(f"{problem.source or 'a prompt'}: cannot be tokenized ({exc})") from None
    return longest


class ProblemSource:
    """The training prompts of each step: drawn from the built-in task, or a data file in shuffled epochs."""

    def __init__(self, config, rng, problems=None):
        self.config, self.rng, self.problems = config, rng, problems
        self.order, self.position = [], 0

    def next(self, count):
        if self.problems is None:
            from dypo import task

            return task.make_problems(self.rng, count, self.config.max_digits)
        batch = []
        while len(batch) < count:
            if self.position == len(self.order):
                self.order = list(range(len(self.problems)))
                self.rng.shuffle(self.order)
                self.position = 0
            batch.append(self.problems[self.order[self.position]])
            self.position += 1
        return batch

    def state(self):
        return {"order": self.order, "position": self.position}

    def load_state(self, state):
        self.order, self.position = state["order"], state["position"]
