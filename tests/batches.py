"""Random batches of sequences for the loss tests: hidden [B, T, D], a head, targets, a response mask with an empty
row, and log-probs of an old and a reference policy near the current one; and ``OPS``, one call of every op on
``op_inputs``, for the tests that hold for all of them."""

import math

import torch

from dypo_kernels import (
    Route,
    dypo_loss,
    fused_gal_loss,
    fused_grpo_loss,
    fused_linear_logprobs,
    fused_multi_teacher_kl,
    fused_sft_loss,
    fused_sparse_teacher_kl,
)


def sequence_batch(batch_size, length, hidden_size, vocab_size, *, dtype=torch.float32, device="cpu", bias=True,
                   seed=0):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch_size, length, hidden_size, generator=generator)
    weight = torch.randn(vocab_size, hidden_size, generator=generator) / math.sqrt(hidden_size) * 3
    bias_tensor = torch.randn(vocab_size, generator=generator) if bias else None
    targets = torch.randint(0, vocab_size, (batch_size, length), generator=generator)
    mask = torch.rand(batch_size, length, generator=generator) > 0.25
    mask[0, 0] = True
    if batch_size > 2:
        mask[2] = False  # a sequence without response tokens
    targets[~mask] = -100  # what padding holds in practice: must be ignored, not range-checked
    params = [None if t is None else t.to(device=device, dtype=dtype).requires_grad_()
              for t in (hidden, weight, bias_tensor)]
    return dict(hidden=params[0], weight=params[1], bias=params[2], targets=targets.to(device),
                mask=mask.to(device), generator=generator)


def nearby_logps(logps, generator, scale):
    """Log-probs of another policy: the current ones moved by noise of ``scale`` (ratios of exp(+-scale))."""
    return (logps.detach().double() + scale * torch.randn(logps.shape, generator=generator, dtype=torch.float64)).to(
        logps.device, torch.float32)


def gradients(loss, batch):
    params = [batch[name] for name in ("hidden", "weight", "bias") if batch[name] is not None]
    return torch.autograd.grad(loss, params)


GROUP_INDEX = [0, 1, 0, 2, 3, 2, 1, 0, 2, 3]
ROUTE = [Route.RL, Route.SFT, Route.RL, Route.RL, Route.SKIP, Route.RL, Route.SFT, Route.RL, Route.RL, Route.SKIP]
REWARDS = [1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.3, 1.0]


# sequences, tokens per sequence, hidden size, vocabulary, the teacher's hidden size
OP_SIZES = (10, 8, 40, 101, 24)


def op_inputs(device):
    """Inputs of every op in OPS: (operands, the float tensors that feed the products; data, the rest). Four
    prompts: 0 and 2 mid (RL rollouts), 1 hard (two SFT trajectories), 3 easy (skipped); rows shuffled."""
    size, length, hidden_size, vocab_size, teacher_size = OP_SIZES
    batch = sequence_batch(size, length, hidden_size, vocab_size, device=device)
    generator = batch["generator"]
    teacher = torch.log_softmax(torch.randn(size, length, vocab_size, generator=generator) * 2, -1).topk(5, -1)
    operands = dict(hidden=batch["hidden"], weight=batch["weight"], bias=batch["bias"],
                    teacher_hidden=torch.randn(size, length, teacher_size, generator=generator).to(device),
                    teacher_weight=torch.randn(vocab_size, teacher_size, generator=generator).to(device) / 3)
    data = dict(targets=batch["targets"], mask=batch["mask"],
                advantages=torch.randn(size, generator=generator).to(device),
                rewards=torch.tensor(REWARDS, device=device), group_index=torch.tensor(GROUP_INDEX, device=device),
                route=torch.tensor(ROUTE, device=device), top_ids=teacher.indices.to(device),
                top_logps=teacher.values.to(device))
    return operands, data


OPS = {
    "logprobs": lambda o, d: fused_linear_logprobs(o["hidden"], o["weight"], d["targets"], bias=o["bias"]).sum(),
    "grpo": lambda o, d: fused_grpo_loss(o["hidden"], o["weight"], d["targets"], d["advantages"], mask=d["mask"],
                                         bias=o["bias"]),
    "sft": lambda o, d: fused_sft_loss(o["hidden"], o["weight"], d["targets"], mask=d["mask"], bias=o["bias"]),
    "gal": lambda o, d: fused_gal_loss(o["hidden"], o["weight"], d["targets"], d["rewards"],
                                       group_index=d["group_index"], mask=d["mask"], bias=o["bias"]),
    "dypo": lambda o, d: dypo_loss(o["hidden"], o["weight"], d["targets"], mask=d["mask"], route=d["route"],
                                   rewards=d["rewards"], group_index=d["group_index"], bias=o["bias"]),
    "kl": lambda o, d: fused_multi_teacher_kl(o["hidden"], o["weight"], [o["teacher_hidden"]], [o["teacher_weight"]],
                                              mask=d["mask"], student_bias=o["bias"]),
    "sparse_kl": lambda o, d: fused_sparse_teacher_kl(o["hidden"], o["weight"], [d["top_ids"]], [d["top_logps"]],
                                                      mask=d["mask"], student_bias=o["bias"]),
}
