"""DYPOTrainer (TRL's GRPOTrainer with DYPO's routing and loss) on CPU with a tiny model built from a config, as
TRL's own tests do."""

import pytest
import torch

pytest.importorskip("trl")
from datasets import Dataset  # noqa: E402
from trl import GRPOConfig  # noqa: E402

from dypo.integrations.trl import DYPOTrainer  # noqa: E402
from dypo_kernels import Route, dypo_loss  # noqa: E402
from tests.tiny_models import save_tiny_qwen2  # noqa: E402


def right_answer(prompts, completions, ground_truth, **kwargs):
    return [1.0 if c.strip().endswith(a) else 0.0 for c, a in zip(completions, ground_truth)]


@pytest.fixture
def trainer(tmp_path):
    model_dir = save_tiny_qwen2(tmp_path / "model")
    rows = [{"prompt": f"{a}+{b}=", "ground_truth": str(a + b), "target": [f"{a + b}", f"({b}+{a})={a + b}"]}
            for a in range(3) for b in range(3)]
    args = GRPOConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, num_generations=4,
                      max_completion_length=4, max_steps=3, learning_rate=1e-2, logging_steps=1, report_to="none",
                      use_cpu=True, bf16=False, seed=0, save_strategy="no", beta=0.04)
    return DYPOTrainer(model=str(model_dir), reward_funcs=right_answer, args=args,
                       train_dataset=Dataset.from_list(rows), alpha=0.5)


def test_a_few_steps_run_and_change_the_parameters(trainer):
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    assert any(not torch.equal(before[n], p) for n, p in trainer.model.named_parameters())
    logged = {key for entry in trainer.state.log_history for key in entry}
    assert {"dypo/share_hard", "dypo/loss_sft"} <= logged


def test_the_loss_on_a_fixed_batch_is_dypo_loss(trainer):
    model = trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1  # what train() sets for each accumulation window
    torch.manual_seed(1)
    prompt_ids = torch.randint(4, 20, (4, 3))
    completion_ids = torch.randint(4, 20, (4, 5))
    completion_mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 1, 0]])
    inputs = {"prompt_ids": prompt_ids, "prompt_mask": torch.ones_like(prompt_ids), "completion_ids": completion_ids,
              "completion_mask": completion_mask, "advantages": torch.tensor([0.8, -0.8, 0.8, -0.8]),
              "rewards": torch.tensor([1.0, 0.0, 1.0, 0.0]), "route": torch.full((4,), int(Route.RL)),
              "old_per_token_logps": -torch.rand(4, 5), "ref_per_token_logps": -torch.rand(4, 5)}
    trainer._generation_totals = trainer._batch_totals(inputs)  # the batch is a whole generation batch
    loss = trainer._compute_loss(model, inputs)
    hidden = model.model(input_ids=torch.cat([prompt_ids, completion_ids], 1)).last_hidden_state[:, 2:-1]
    expected = dypo_loss(hidden, model.lm_head.weight, completion_ids, mask=completion_mask.bool(),
                         route=inputs["route"], rewards=inputs["rewards"], group_index=torch.zeros(4, dtype=torch.long),
                         advantages=inputs["advantages"], old_logps=inputs["old_per_token_logps"],
                         ref_logps=inputs["ref_per_token_logps"], alpha=0.5, beta_kl=0.04,
                         loss_type=trainer.loss_type, eps_low=0.2, eps_high=0.2,
                         use_bias_correction_kl=trainer.args.use_bias_correction_kl)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    trainer.current_gradient_accumulation_steps = 2  # TRL leaves the division by accumulation steps to the loss
    torch.testing.assert_close(trainer._compute_loss(model, inputs), expected / 2, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("loss_type,options", [
    ("grpo", {}), ("bnpo", {}), ("dr_grpo", {}), ("dapo", {}), ("cispo", dict(epsilon_high=1.1)), ("sapo", {}),
    ("sapo", dict(sapo_temperature_pos=0.5, sapo_temperature_neg=2.0)), ("luspo", {}), ("dapo", dict(delta=1.05)),
    ("grpo", dict(delta=1.02)), ("grpo", dict(importance_sampling_level="sequence")),
    ("luspo", dict(importance_sampling_level="sequence")), ("dapo", dict(importance_sampling_ratio="tokens")),
    ("grpo", dict(importance_sampling_ratio="sequences")),
    ("grpo", dict(importance_sampling_level="sequence", importance_sampling_ratio="sequences"))],
    ids=lambda value: value if isinstance(value, str) else "-".join(value) or "default")
def test_rl_only_with_alpha_one_is_trls_own_loss_for_every_loss_type(trainer, loss_type, options, monkeypatch):
    """All groups mid and alpha = 1: DYPO's loss is GRPO's, so each micro-batch's loss (and gradient) must be what
    TRL's GRPOTrainer computes, normalisation included: dapo over the generation batch's tokens, divided among the
    accumulation windows it spans; the others per micro-batch, divided by the accumulation steps; dr_grpo by
    max_completion_length even where a long teacher solution of another micro-batch widened the completions."""
    from trl import GRPOTrainer

    model = trainer.model.train()
    trainer.loss_type, trainer.alpha = loss_type, 1.0
    options = dict(options)
    ratio_kind = options.pop("importance_sampling_ratio", None)
    if ratio_kind:  # as if the rollouts came from vLLM, with its correction on
        monkeypatch.setattr(trainer, "use_vllm", True)
        monkeypatch.setattr(trainer, "vllm_importance_sampling_correction", True)
    for name, value in options.items():  # TRL reads these from the trainer, the others from its args
        on_trainer = name in ("epsilon_high", "importance_sampling_level")
        monkeypatch.setattr(trainer if on_trainer else trainer.args, name, value)
    trainer.args.steps_per_generation, trainer.current_gradient_accumulation_steps = 2, 2
    trainer._metrics["train"].clear()
    torch.manual_seed(2)
    rows, width, widened = 8, trainer.max_completion_length - 1, 10
    completion_mask = (torch.rand(rows, width) > 0.3).long()
    completion_mask[:, 0] = 1

    def columns(values):  # widened with padding, as _put_teacher_solutions widens a generation batch
        return torch.nn.functional.pad(values, (0, widened - width))

    generation = {"prompt_ids": torch.randint(4, 20, (rows, 3)), "prompt_mask": torch.ones(rows, 3, dtype=torch.long),
                  "completion_ids": columns(torch.randint(4, 20, (rows, width))),
                  "completion_mask": columns(completion_mask), "advantages": torch.randn(rows),
                  "rewards": torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0, 1.0, 0.0, 0.0]),
                  "route": torch.full((rows,), int(Route.RL)),
                  "old_per_token_logps": columns(-torch.rand(rows, width) - 1),
                  "ref_per_token_logps": columns(-torch.rand(rows, width) - 1)}
    if ratio_kind:
        ratio = torch.rand(rows, width if ratio_kind == "tokens" else 1) + 0.5
        generation["importance_sampling_ratio"] = columns(ratio) if ratio_kind == "tokens" else ratio
    trainer._generation_totals = trainer._batch_totals(generation)
    for half in (slice(0, 4), slice(4, 8)):
        inputs = {name: value[half] for name, value in generation.items()}
        ours = trainer._compute_loss(model, inputs)
        grads = torch.autograd.grad(ours, [model.lm_head.weight])
        trls = GRPOTrainer._compute_loss(trainer, model, {**inputs, "num_items_in_batch": completion_mask.sum()})
        expected_grads = torch.autograd.grad(trls, [model.lm_head.weight])
        torch.testing.assert_close(ours, trls, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(grads, expected_grads, rtol=1e-4, atol=1e-7)
    if loss_type == "dapo" and not options and not ratio_kind:  # the logged term (mean of the micro-batches)
        hidden = model.model(input_ids=torch.cat([generation["prompt_ids"], generation["completion_ids"]], 1),
                             attention_mask=torch.cat([generation["prompt_mask"], generation["completion_mask"]], 1)
                             ).last_hidden_state[:, 2:-1]
        _, whole = dypo_loss(hidden, model.lm_head.weight, generation["completion_ids"],
                             mask=generation["completion_mask"].bool(), route=generation["route"],
                             rewards=generation["rewards"], group_index=torch.arange(rows) // 4,
                             advantages=generation["advantages"], old_logps=generation["old_per_token_logps"],
                             ref_logps=generation["ref_per_token_logps"], alpha=1.0, beta_kl=0.04, loss_type="dapo",
                             use_bias_correction_kl=True, return_metrics=True)
        logged = trainer._metrics["train"]["dypo/loss_grpo"]
        assert sum(logged) / len(logged) == pytest.approx(float(whole["loss_grpo"]), rel=1e-5)


@pytest.mark.parametrize("loss_type", ["dapo", "grpo"])
def test_logged_loss_terms_are_the_generation_batchs(trainer, loss_type):
    """Two micro-batches of one generation batch, the first with RL rows only, the second with SFT rows only. Under
    dapo each holds its share of the generation batch's terms, and the mean of the logged values must be the sum of
    the shares; otherwise each logs its own value where it has the term. Token means come from RL rows only."""
    trainer.loss_type, trainer.args.steps_per_generation = loss_type, 2
    trainer._metrics["train"].clear()
    zero = torch.tensor(0.0)
    trainer._log_loss_metrics({"loss_sft": zero, "loss_grpo": torch.tensor(0.3), "loss_gal": torch.tensor(0.1),
                               "num_prompts_sft": 0, "num_prompts_rl": 1, "num_tokens_rl": torch.tensor(7),
                               "num_pairs": torch.tensor(4), "pair_accuracy": torch.tensor(0.5),
                               "mean_kl": torch.tensor(0.02), "clip_fraction_low": torch.tensor(0.1),
                               "clip_fraction_high": torch.tensor(0.0)})
    trainer._log_loss_metrics({"loss_sft": torch.tensor(0.2), "loss_grpo": zero, "loss_gal": zero,
                               "num_prompts_sft": 1, "num_prompts_rl": 0, "num_tokens_rl": torch.tensor(0),
                               "num_pairs": torch.tensor(0), "pair_accuracy": zero, "mean_kl": zero,
                               "clip_fraction_low": zero, "clip_fraction_high": zero})
    logged = {name.split("/")[1]: sum(values) / len(values) for name, values in trainer._metrics["train"].items()}
    assert logged["loss_grpo"] == pytest.approx(0.3) and logged["loss_sft"] == pytest.approx(0.2)
    assert logged["loss_gal"] == pytest.approx(0.1) and logged["pair_accuracy"] == pytest.approx(0.5)
    assert logged["mean_kl"] == pytest.approx(0.02) and logged["clip_fraction_low"] == pytest.approx(0.1)


def test_teacher_draws_depend_on_seed_step_and_row_only(trainer):
    """No RNG state: what a resumed run draws is what the uninterrupted run drew."""
    row = {"target": [f"{n}" for n in range(8)]}
    tokenizer = trainer.processing_class

    def draws(step):
        trainer.state.global_step = step
        return [tokenizer.decode(trainer._teacher_ids(row, position)[:-1]) for position in (0, 4, 8)]

    first = [draws(step) for step in range(6)]
    assert [draws(step) for step in reversed(range(6))] == first[::-1]  # any order, same draws
    assert len({text for step_draws in first for text in step_draws}) > 3  # uniform-ish, not one fixed choice


@pytest.mark.parametrize("option,value", [("top_entropy_quantile", 0.5), ("entropy_coef", 0.1),
                                          ("loss_type", "vespo")])
def test_options_the_fused_loss_cannot_honour_are_refused(tmp_path, option, value):
    model_dir = save_tiny_qwen2(tmp_path / "model")
    args = GRPOConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, num_generations=4,
                      report_to="none", use_cpu=True, bf16=False, **{option: value})
    with pytest.raises(ValueError, match=option):
        DYPOTrainer(model=str(model_dir), reward_funcs=right_answer, args=args,
                    train_dataset=Dataset.from_list([{"prompt": "1+1=", "ground_truth": "2", "target": ["2"]}] * 4))


def test_groups_must_fit_whole_in_a_batch(tmp_path):
    model_dir = save_tiny_qwen2(tmp_path / "model")
    args = GRPOConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=6, num_generations=4,
                      generation_batch_size=12, report_to="none", use_cpu=True, bf16=False)
    with pytest.raises(ValueError, match="must be a multiple of num_generations"):
        DYPOTrainer(model=str(model_dir), reward_funcs=right_answer, args=args,
                    train_dataset=Dataset.from_list([{"prompt": "1+1=", "ground_truth": "2", "target": ["2"]}] * 4))


@pytest.mark.parametrize("width", [3, 1], ids=["token-level ratio", "sequence-level ratio"])
def test_vllm_ratios_follow_the_completion_columns(width):
    """A teacher solution longer than the rollouts widens the completions: a token-level importance-sampling ratio
    gets 1 on the new columns and a sequence-level one stays [rows, 1]; trimming the trailing padding trims it."""
    from dypo.integrations.trl import _without_trailing_padding

    output = {"completion_ids": torch.ones(2, 3, dtype=torch.long),
              "completion_mask": torch.ones(2, 3, dtype=torch.long),
              "importance_sampling_ratio": torch.full((2, width), 0.5)}
    DYPOTrainer._put_teacher_solutions(output, {1: [7, 7, 7, 7, 7]})
    ratio = output["importance_sampling_ratio"]
    assert ratio.shape == ((2, 5) if width == 3 else (2, 1))
    if width == 3:
        assert ratio[:, 3:].eq(1.0).all() and ratio[:, :3].eq(0.5).all()
    output["completion_mask"][1, 4:] = 0
    assert _without_trailing_padding(output)["importance_sampling_ratio"].shape == ((2, 4) if width == 3 else (2, 1))
