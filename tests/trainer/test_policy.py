"""--model with a local Hugging Face directory (a tiny Qwen2 and a character-level fast tokenizer with a chat
template, built here: nothing is downloaded) and --data in LUFFY's format."""

import json

import pytest
import torch

from dypo.config import Config
from dypo.policy import HFCodec, ModelError, resolve_runtime
from dypo.train import main
from tests.tiny_models import save_tiny_qwen2


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_qwen2(tmp_path_factory.mktemp("tiny-qwen2"))


def test_codec_uses_the_chat_template(model_dir):
    from transformers import AutoTokenizer

    codec = HFCodec(AutoTokenizer.from_pretrained(model_dir, local_files_only=True))
    prompt = codec.prompt_ids([{"role": "user", "content": "1+2=?"}])
    assert codec.tokenizer.decode(prompt) == "user:1+2=?;assistant:"
    assert codec.prompt_ids("1+2=?") == prompt  # a plain prompt becomes one user message
    solution = codec.solution_ids("3")
    assert solution[-1] == codec.eos_id and codec.text(solution + [5, 6]) == "3"


def test_a_local_model_trains_on_a_luffy_style_file(model_dir, tmp_path):
    records = [{"prompt": [{"role": "user", "content": f"{a}+{b}=?"}], "reward_model": {"ground_truth": str(a + b)},
                "target": [{"role": "assistant", "content": f"\\boxed{{{a + b}}}"}]}
               for a in range(4) for b in range(4)]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    run = tmp_path / "run"
    summary = main(["--model", str(model_dir), "--data", str(data), "--max_steps", "3", "--eval_prompts", "4",
                    "--num_generations", "4", "--prompts_per_step", "2", "--train_batch_size", "2",
                    "--max_new_tokens", "6", "--learning_rate", "1e-3", "--output_dir", str(run)])
    assert summary["steps"] == 3 and summary["eval_prompts"] == 4
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert sum(line["updates"] for line in lines) >= 1
    assert (run / "final_model" / "config.json").is_file() and (run / "final_model" / "tokenizer.json").is_file()
    assert "validation_accuracy_after" not in summary and summary["ood_sets"] == {}  # --data: no OOD set unless given


def test_ood_data_files_are_evaluated_before_and_after(model_dir, tmp_path):
    def records(pairs):
        return "".join(json.dumps({"prompt": f"{a}+{b}=?", "reward_model": {"ground_truth": str(a + b)},
                                   "target": [f"\\boxed{{{a + b}}}"]}) + "\n" for a, b in pairs)

    data, shifted = tmp_path / "train.jsonl", tmp_path / "shifted.jsonl"
    data.write_text(records([(a, b) for a in range(4) for b in range(4)]))
    shifted.write_text(records([(a, 10) for a in range(3)]))
    summary = main(["--model", str(model_dir), "--data", str(data), "--ood_data", str(shifted), "--max_steps", "1",
                    "--eval_prompts", "2", "--num_generations", "2", "--prompts_per_step", "2",
                    "--train_batch_size", "2", "--max_new_tokens", "4", "--output_dir", str(tmp_path / "run")])
    assert list(summary["ood_sets"]) == ["shifted"] and set(summary["ood_sets"]["shifted"]) == {"before", "after"}
    assert summary["ood_accuracy_after"] == summary["ood_sets"]["shifted"]["after"]


def test_missing_model_directory_is_a_one_line_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", str(tmp_path / "nope"), "--output_dir", str(tmp_path / "run")])
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and "not a Hugging Face model directory" in error
    assert len(error.strip().splitlines()) == 1


def test_the_embedded_tokenizer_rejects_text_prompts(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": "What is one plus one?", "reward_model": {"ground_truth": "2"},
                                        "target": ["2"]}) + "\n" for _ in range(3)))
    with pytest.raises(SystemExit):
        main(["--data", str(data), "--eval_prompts", "1", "--max_steps", "1", "--output_dir", str(tmp_path / "r")])
    assert "record 1: cannot be tokenized" in capsys.readouterr().err and not (tmp_path / "r").exists()


def test_rollouts_ignore_the_models_generation_config():
    """Rollouts must come from softmax(logits / T) alone: a repetition penalty in the model's generation config
    would make them come from another distribution than the losses' log-probs describe."""
    from dypo.policy import generate, load_policy

    torch.manual_seed(0)
    model, codec, runtime = load_policy(Config())
    model.generation_config.repetition_penalty = 50.0
    prompt = codec.prompt_ids("12+34=")
    ids = torch.tensor([prompt])
    for _ in range(6):  # greedy decoding by hand from the raw logits
        ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    expected = ids[0, len(prompt):].tolist()
    if codec.eos_id in expected:
        expected = expected[:expected.index(codec.eos_id) + 1]
    assert generate(model, codec, runtime, [prompt], max_new_tokens=6, temperature=1.0, greedy=True) == [expected]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU fallbacks")
def test_gpu_features_resolve_off_on_cpu_and_refuse_to_be_forced():
    runtime = resolve_runtime(Config())
    assert (runtime.device.type, runtime.autocast_dtype, runtime.attn_implementation) == ("cpu", None, "sdpa")
    with pytest.raises(ModelError, match="use_liger_kernel true needs CUDA"):
        resolve_runtime(Config(use_liger_kernel="true"))
    with pytest.raises(ModelError, match="flash_attention_2 needs CUDA"):
        resolve_runtime(Config(attn_implementation="flash_attention_2"))
