"""Random batches of sequences for the loss tests: hidden [B, T, D], a head, targets, a response mask with an empty
row, and log-probs of an old and a reference policy near the current one."""

import math

import torch


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
