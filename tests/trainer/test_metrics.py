import pytest
import torch

from dypo.metrics import MERGE, SUM, WEIGHTS, merge_metrics, read_metrics


def test_parts_merge_into_the_whole_steps_metrics():
    """Counts add up, loss terms weigh by prompts (or pairs), token means by RL tokens: the merged clip fraction
    is the share of all the step's RL tokens that were clipped."""
    parts = [{"num_prompts_rl": 1, "num_tokens_rl": 10, "loss_grpo": 0.3, "clip_fraction_low": 0.5, "num_pairs": 4,
              "pair_accuracy": 0.25, "step_seconds": 2.0, "grad_norm": 1.0},
             {"num_prompts_rl": 3, "num_tokens_rl": 30, "loss_grpo": 0.1, "clip_fraction_low": 0.1, "num_pairs": 0,
              "pair_accuracy": 0.0, "step_seconds": 3.0, "grad_norm": 3.0}]
    merged = merge_metrics(parts)
    assert merged["num_prompts_rl"] == 4 and merged["num_tokens_rl"] == 40 and merged["num_pairs"] == 4
    assert merged["clip_fraction_low"] == pytest.approx((10 * 0.5 + 30 * 0.1) / 40)
    assert merged["loss_grpo"] == pytest.approx((1 * 0.3 + 3 * 0.1) / 4)
    assert merged["pair_accuracy"] == pytest.approx(0.25)  # the part without pairs has no say
    assert merged["step_seconds"] == 3.0 and merged["grad_norm"] == 2.0


def test_weighted_metrics_weigh_by_counts_the_table_holds():
    assert all(MERGE[count] == SUM for count in WEIGHTS.values())
    assert {"mean_entropy", "mean_margin", "loss_gal", "mean_kl"} <= set(WEIGHTS)


def test_metrics_are_read_as_the_floats_they_hold():
    parts = [{"loss": torch.tensor(0.1), "num_prompts_rl": 2, "num_tokens_rl": torch.tensor(7)},
             {"grad_norm": torch.tensor(1.5, dtype=torch.float64)}]
    assert read_metrics(parts) == [{"loss": float(torch.tensor(0.1)), "num_prompts_rl": 2.0, "num_tokens_rl": 7.0},
                                   {"grad_norm": 1.5}]
    assert read_metrics([{"num_prompts_sft": 1}]) == [{"num_prompts_sft": 1.0}]
