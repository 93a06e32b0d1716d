"""The metrics a training step reports, and how the values of its parts (micro-batches, updates, ranks) merge into
the step's: one table for the trainer, its ranks and the TRL adapter."""

import torch

SUM, LARGEST, SHARED, MEAN = "sum", "largest", "shared", "mean"

# Each metric's merge rule: counts add up, step time and memory take the largest, what every part shares is kept,
# the rest is averaged; a rule that names a count weighs each part's value by that count (the prompts, pairs or RL
# tokens the value covers), so that token means merge into the whole step's token means.
MERGE = {
    "step": SHARED, "updates": SHARED, "queued_prompts": SHARED,
    "step_seconds": LARGEST, "peak_memory_mb": LARGEST,
    "rollout_tokens": SUM, "train_tokens": SUM, "tokens_per_second": SUM,
    # rollouts
    "reward_mean": MEAN, "share_easy": MEAN, "share_mid": MEAN, "share_hard": MEAN, "offline_ratio": MEAN,
    "entropy": MEAN,
    # updates
    "loss": MEAN, "grad_norm": MEAN, "learning_rate": MEAN,
    # dypo_loss's
    "num_prompts_sft": SUM, "num_prompts_rl": SUM, "num_tokens_rl": SUM, "num_pairs": SUM,
    "loss_sft": "num_prompts_sft", "loss_grpo": "num_prompts_rl", "loss_gal": "num_pairs",
    "hard_kl": "num_prompts_sft",  # the trainer's --hard_loss kl|sft_kl term
    "pair_accuracy": "num_pairs", "mean_margin": "num_pairs",
    **{name: "num_tokens_rl" for name in ("mean_ratio", "mean_entropy", "mean_kl", "clip_fraction_low",
                                          "clip_fraction_high")},
}
WEIGHTS = {name: rule for name, rule in MERGE.items() if rule in MERGE}  # weighted metric: its count
# dypo_loss's loss terms: given BatchTotals, each part's value is its share of the whole's, and the shares add up
LOSS_TERMS = ("loss_sft", "loss_grpo", "loss_gal")
TRAINER_LOSS_TERMS = (*LOSS_TERMS, "hard_kl")  # and the trainer's KL term of hard prompts, normalised the same way


def merge_metrics(parts):
    """One metrics dict from several parts' (MERGE; a name it lacks is averaged). A weighted value whose parts
    cover none of its count is averaged."""
    merged = {}
    for name in dict.fromkeys(name for part in parts for name in part):
        found = [part for part in parts if name in part]
        values = [float(part[name]) for part in found]
        rule = MERGE.get(name, MEAN)
        weights = [float(part.get(rule, 0)) for part in found] if name in WEIGHTS else []
        if len(found) == 1 or rule == SHARED:
            merged[name] = found[0][name]
        elif rule == SUM:
            merged[name] = sum(values)
        elif rule == LARGEST:
            merged[name] = max(values)
        elif sum(weights) > 0:
            merged[name] = sum(w * v for w, v in zip(weights, values)) / sum(weights)
        else:
            merged[name] = sum(values) / len(values)
    return merged


def read_metrics(parts):
    """Each part's metrics (dicts of numbers and scalar tensors) as Python floats, every tensor of every part read
    in one device-to-host copy."""
    tensors = [(i, name) for i, part in enumerate(parts) for name, value in part.items()
               if isinstance(value, torch.Tensor)]
    values = torch.stack([parts[i][name].detach().double() for i, name in tensors]).tolist() if tensors else []
    read = dict(zip(tensors, values))
    return [{name: read[i, name] if (i, name) in read else float(value) for name, value in part.items()}
            for i, part in enumerate(parts)]
