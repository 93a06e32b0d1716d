"""The trainer's problems: from JSONL or Parquet files (a prompt, a string or a list of chat messages, a
ground-truth answer and a list of teacher solutions per record, under configurable field names; defaults: LUFFY's
and DYPO's ``prompt``, ``reward_model.ground_truth``, ``target``; optionally the teachers' top-k log-probs along
each solution, ``--teacher_topk_field``), or from the built-in task (task.py). Every problem of a file is reported
before any training starts."""

import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Union

Prompt = Union[str, List[dict]]


class DataError(ValueError):
    """A data file that cannot be used; the message names the file, the record and the field."""


@dataclass
class Problem:
    prompt: Prompt
    answer: str
    teacher_solutions: List[str]
    source: str = field(default="", compare=False)  # "--data FILE: record N", for error messages
    # --teacher_topk_field: per teacher solution, {"ids": [m][n][k], "logps": [m][n][k]} (m teachers, the n tokens of
    # the solution as the trainer tokenizes it, EOS included, k stored tokens per position)
    teacher_topk: Optional[List[dict]] = None


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


def _topk_entry(entry, where, layout):
    """One solution's stored top-k, checked: {"ids", "logps"}, each m x n x k (the file's m and k, ``layout``:
    set by its first entry), ids distinct non-negative integers per position, logps log-probabilities whose
    exponentials sum to at most 1."""
    from dypo_kernels.multi_teacher_kl.sparse import MASS_TOLERANCE

    if not isinstance(entry, dict) or not {"ids", "logps"} <= set(entry):
        raise DataError(f"{where} must be an object with ids and logps; got {type(entry).__name__}")
    ids, logps = entry["ids"], entry["logps"]

    def nested(value):  # the shape of a list of lists of lists, or None
        if not (isinstance(value, list) and value and all(isinstance(t, list) and t for t in value)):
            return None
        shapes = {(len(t), len(t[0]) if isinstance(t[0], list) else -1) for t in value}
        lengths = {len(p) if isinstance(p, list) else -1 for t in value for p in t}
        if len(shapes) != 1 or len(lengths) != 1 or -1 in lengths or 0 in lengths:
            return None
        return len(value), len(value[0]), lengths.pop()

    shape = nested(ids)
    if shape is None or nested(logps) != shape:
        raise DataError(f"{where}: ids and logps must be lists [teacher][token][k] of one shape, each teacher "
                        "with one entry per solution token and k entries per token")
    if layout and (shape[0], shape[2]) != layout:
        raise DataError(f"{where}: {shape[0]} teachers x k {shape[2]}; the file's first record has {layout[0]} x "
                        f"{layout[1]}")
    for teacher_ids, teacher_logps in zip(ids, logps):
        for position_ids, position_logps in zip(teacher_ids, teacher_logps):
            if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in position_ids) or \
                    len(set(position_ids)) != len(position_ids):
                raise DataError(f"{where}: ids must be distinct non-negative integers per token; got {position_ids}")
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v) and
                       v <= MASS_TOLERANCE for v in position_logps) or \
                    sum(math.exp(v) for v in position_logps) > 1 + MASS_TOLERANCE:
                raise DataError(f"{where}: logps must be log-probabilities (<= 0, summing to at most 1 as "
                                f"probabilities); got {position_logps}")
    return {"ids": ids, "logps": [[[float(v) for v in p] for p in t] for t in logps]}, (shape[0], shape[2])


def _topk(value, solutions, where, layout):
    """The stored top-k of each teacher solution (a list, in the solutions' order) and the file's layout."""
    if not isinstance(value, list) or len(value) != len(solutions):
        raise DataError(f"{where}: the teacher top-k must be a list with one entry per teacher solution "
                        f"({len(solutions)}); got {len(value) if isinstance(value, list) else type(value).__name__}")
    entries = []
    for number, entry in enumerate(value):
        checked, layout = _topk_entry(entry, f"{where}: teacher top-k {number}", layout)
        entries.append(checked)
    return entries, layout


def load_problems(path, *, prompt_field="prompt", answer_field="reward_model.ground_truth", teachers_field="target",
                  teacher_topk_field="", option="--data") -> List[Problem]:
    """Every record of a .jsonl or .parquet file as a Problem; raises DataError naming the file, record and field
    of the first problem found (missing file, empty file, missing field, wrong type)."""
    path = Path(path)
    records = _records(path, option)
    if not records:
        raise DataError(f"{option} {path}: the file holds no records")
    problems, layout = [], None
    for number, record in enumerate(records, 1):
        where = f"{option} {path}: record {number}"
        if not isinstance(record, dict):
            raise DataError(f"{where} is a {type(record).__name__}, not an object")
        answer = _field(record, answer_field, where, "answer_field")
        if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
            raise DataError(f"{where}: the answer must be a string or a number; got {type(answer).__name__}")
        solutions = _solutions(_field(record, teachers_field, where, "teachers_field"), where)
        topk = None
        if teacher_topk_field:
            topk, layout = _topk(_field(record, teacher_topk_field, where, "teacher_topk_field"), solutions, where,
                                 layout)
        problems.append(Problem(prompt=_prompt(_field(record, prompt_field, where, "prompt_field"), where),
                                answer=str(answer), teacher_solutions=solutions, source=where, teacher_topk=topk))
    return problems


def load_data(config):
    """(training problems or None for the built-in task, evaluation problems)."""
    from dypo import task  # task.py imports Problem from here

    if not config.data:
        return None, task.make_problems(random.Random(config.seed + 1), config.eval_prompts, config.max_digits)
    fields = {"prompt_field": config.prompt_field, "answer_field": config.answer_field,
              "teachers_field": config.teachers_field}
    problems = load_problems(config.data, teacher_topk_field=config.teacher_topk_field, **fields)
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


def extra_eval_sets(config):
    """The evaluation sets besides the test set: {name: problems}. The built-in task's validation set (for choosing
    settings without the test set: python -m dypo.compare) and its out-of-distribution sets (task.OOD_SETS, named
    ``ood_<set>``), eval_prompts each; with --data, one ``ood_<file stem>`` set per --ood_data file."""
    from dypo import task

    if config.data:
        fields = {"prompt_field": config.prompt_field, "answer_field": config.answer_field,
                  "teachers_field": config.teachers_field}
        return {f"ood_{Path(path).stem}": load_problems(path, option="--ood_data", **fields)[:config.eval_prompts]
                for path in config.ood_data}
    sets = {"validation": task.make_problems(random.Random(config.seed + 2), config.eval_prompts, config.max_digits)}
    ood = task.ood_problems(random.Random(config.seed + 3), config.eval_prompts, config.max_digits)
    return {**sets, **{f"ood_{name}": problems for name, problems in ood.items()}}


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


def check_teacher_topk(codec, problems, vocab_size):
    """Each stored top-k against its solution as the trainer tokenizes it (one entry per token, EOS included) and
    the student's vocabulary, before any training (problems without any: --eval_data's, are skipped)."""
    for problem in problems:
        for number, (solution, entry) in enumerate(zip(problem.teacher_solutions, problem.teacher_topk or [])):
            tokens = len(codec.solution_ids(solution))
            where = f"{problem.source}: teacher top-k {number}"
            if len(entry["ids"][0]) != tokens:
                raise DataError(f"{where} has {len(entry['ids'][0])} tokens per teacher; its solution is {tokens} "
                                "tokens (EOS included)")
            largest = max(i for teacher in entry["ids"] for position in teacher for i in position)
            if largest >= vocab_size:
                raise DataError(f"{where}: token id {largest} is outside the student's vocabulary ({vocab_size})")


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
