import json

import pytest

from dypo.data import DataError, Problem, load_problems
from dypo.rewards import RewardError, exact_match, load_reward, score
from dypo.train import main

LUFFY_RECORD = {"prompt": [{"role": "user", "content": "What is 2+3?"}], "reward_model": {"ground_truth": "5"},
                "target": [{"role": "assistant", "content": "2+3 = \\boxed{5}"}, "It is 5"]}


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_jsonl_and_parquet_give_the_same_problems(tmp_path):
    pyarrow = pytest.importorskip("pyarrow")
    parquet = pytest.importorskip("pyarrow.parquet")

    records = [LUFFY_RECORD, {**LUFFY_RECORD, "reward_model": {"ground_truth": "4"}, "target": ["4"]}]
    from_jsonl = load_problems(write_jsonl(tmp_path / "d.jsonl", records))
    assert from_jsonl[0] == Problem([{"role": "user", "content": "What is 2+3?"}], "5",
                                    ["2+3 = \\boxed{5}", "It is 5"])
    columnar = [{**r, "target": [t if isinstance(t, str) else t["content"] for t in r["target"]]} for r in records]
    parquet.write_table(pyarrow.Table.from_pylist(columnar), tmp_path / "d.parquet")
    assert load_problems(tmp_path / "d.parquet") == from_jsonl
    numeric = load_problems(write_jsonl(tmp_path / "n.jsonl", [{"prompt": "1+1=", "reward_model": {"ground_truth": 2},
                                                                 "target": "2"}]))
    assert numeric == [Problem("1+1=", "2", ["2"])]


def test_field_names_are_configurable(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "q", "meta": {"answer": "7"}, "solutions": ["7"]}])
    problems = load_problems(path, prompt_field="question", answer_field="meta.answer", teachers_field="solutions")
    assert problems == [Problem("q", "7", ["7"])]


@pytest.mark.parametrize("content,message", [
    (None, "no such file"),
    ("", "holds no records"),
    ('{"prompt": "q"\n', "line 1 is not JSON"),
    (json.dumps({"prompt": "q", "target": ["1"]}) + "\n", "record 1 has no field 'reward_model.ground_truth' "
                                                        "(set --answer_field)"),
    (json.dumps({**LUFFY_RECORD, "prompt": 3}) + "\n", "the prompt must be a non-empty string"),
    (json.dumps({**LUFFY_RECORD, "reward_model": {"ground_truth": [5]}}) + "\n", "the answer must be a string"),
    (json.dumps({**LUFFY_RECORD, "target": []}) + "\n", "teacher solutions must be a non-empty list"),
    (json.dumps({**LUFFY_RECORD, "target": [3]}) + "\n", "each teacher solution must be a non-empty string"),
    ("[1, 2]\n", "record 1 is a list, not an object"),
])
def test_bad_data_files_are_one_line_errors(tmp_path, content, message, capsys):
    path = tmp_path / "data.jsonl"
    if content is not None:
        path.write_text(content)
    with pytest.raises(DataError, match="data.jsonl"):
        load_problems(path)
    with pytest.raises(SystemExit) as exit_info:
        main(["--data", str(path), "--output_dir", str(tmp_path / "run")])
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in error and len(error.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()  # nothing is written before the inputs are checked


def test_wrong_extension_and_too_few_records(tmp_path, capsys):
    with pytest.raises(DataError, match="must end in .jsonl or .parquet"):
        load_problems(tmp_path.joinpath("d.csv").touch() or tmp_path / "d.csv")
    path = write_jsonl(tmp_path / "d.jsonl", [LUFFY_RECORD] * 3)
    with pytest.raises(SystemExit):
        main(["--data", str(path), "--eval_prompts", "3", "--output_dir", str(tmp_path / "run")])
    assert "lower --eval_prompts or give --eval_data" in capsys.readouterr().err


def test_builtin_reward_extracts_the_final_answer():
    assert exact_match("so \\boxed{42} done 7", "42") == 1.0
    assert exact_match("12", "13") == 0.0 and exact_match("", "1") == 0.0 and exact_match("007", "7") == 1.0
    assert exact_match("so \\boxed{\\frac{1}{2}}", "0.5") == 1.0 and exact_match("\\boxed{\\dfrac{1}{2}}", "1/2") == 1.0
    assert exact_match("it is 12", "12.0") == 1.0 and exact_match("total 1,000", "1000") == 1.0
    assert exact_match("\\boxed{x^{2}+1}", "x^{2} + 1") == 1.0 and exact_match("\\boxed{x^{2}}", "x^{3}") == 0.0
    assert exact_match("\\boxed{\\frac{1}{3}}", "0.33") == 0.0
    reward = load_reward("")
    assert score(reward, ["p", "p"], ["x = 5", "x = 6"], ["5", "5"]) == [1.0, 0.0]


def test_pluggable_reward_and_its_errors(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(
        "def length(prompts, completions, ground_truth):\n    return [len(c) / 10 for c in completions]\n"
        "def short(prompts, completions, **kwargs):\n    return [1.0]\n"
        "def text(prompts, completions, **kwargs):\n    return ['high' for c in completions]\n")
    (tmp_path / "broken_rewards.py").write_text("def f(:\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert score(load_reward("my_rewards:length"), ["p"] * 2, ["ab", "abcd"], ["1", "1"]) == [0.2, 0.4]
    with pytest.raises(RewardError, match="returned 1 values for 2 completions"):
        score(load_reward("my_rewards:short"), ["p"] * 2, ["a", "b"], ["1", "1"])
    with pytest.raises(RewardError, match="must return finite floats; got 'high'"):
        score(load_reward("my_rewards:text"), ["p"], ["a"], ["1"])
    with pytest.raises(RewardError, match="has no function 'missing'"):
        load_reward("my_rewards:missing")
    with pytest.raises(RewardError, match="cannot import 'no_such_module'"):
        load_reward("no_such_module:f")
    with pytest.raises(RewardError, match="cannot import 'broken_rewards'"):
        load_reward("broken_rewards:f")
