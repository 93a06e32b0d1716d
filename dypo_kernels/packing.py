"""Padding-free inputs (flash-attn's ``cu_seqlens``, as verl's use_remove_padding and TRL's padding_free feed them):
S sequences packed into token rows ``[N, D]``, sequence s holding rows cu_seqlens[s]..cu_seqlens[s + 1].

The hidden states stay packed. Only the small per-token tensors (targets, mask, log-probs, ratios: N values each)
are laid out ``[S, T]`` (T the longest sequence), with ``Packed.index`` giving each position's packed row: every
weight, plan and check of the ops then works as on padded inputs, and ``tokens.select_tokens`` gathers the hidden
rows through the index. One host sync reads the boundaries."""

from dataclasses import dataclass

import torch

from dypo_kernels.validation import check_linear_head, check_sequence_batch, check_tensor


@dataclass
class Packed:
    """The [S, T] layout of packed sequences: ``index`` the packed row of each position (0 past a sequence's end),
    ``valid`` whether the position holds a token."""

    index: torch.Tensor
    valid: torch.Tensor

    def pad(self, values, fill):
        """``values`` [N] (or None) laid out [S, T], ``fill`` past each sequence's end."""
        return None if values is None else torch.where(self.valid, values[self.index], fill)


def check_offsets(cu_seqlens, num_rows, device, checks, name="cu_seqlens"):
    """``cu_seqlens`` for an op whose result does not depend on the sequences (per-token log-probs, the token mean
    of a KL): checked in ``checks``, with no host sync of its own."""
    check_tensor(name, cu_seqlens, dims=(1,), integer=True)
    if cu_seqlens.shape[0] < 1 or cu_seqlens.device != device:
        raise ValueError(f"{name} must hold S + 1 >= 1 offsets on {device}, got shape {tuple(cu_seqlens.shape)} on "
                         f"{cu_seqlens.device}")
    valid = (cu_seqlens[0] == 0) & (cu_seqlens[-1] == num_rows) & (cu_seqlens[1:] >= cu_seqlens[:-1]).all()
    checks.require(valid, f"{name} must start at 0, not decrease and end at the number of token rows ({num_rows})")


def unpack(cu_seqlens, num_rows, device, name="cu_seqlens"):
    """The Packed layout of ``cu_seqlens`` ([S + 1] int32/int64: 0, non-decreasing, ending at ``num_rows``; empty
    sequences allowed), read with one host sync; a violation is a ValueError naming the argument."""
    check_tensor(name, cu_seqlens, dims=(1,), integer=True)
    if cu_seqlens.shape[0] < 1:
        raise ValueError(f"{name} must hold S + 1 >= 1 offsets, got shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.device != device:
        raise ValueError(f"{name} is on {cu_seqlens.device}, the hidden states on {device}")
    offsets = cu_seqlens.tolist()
    if offsets[0] != 0 or offsets[-1] != num_rows or any(b < a for a, b in zip(offsets, offsets[1:])):
        raise ValueError(f"{name} must start at 0, not decrease and end at the number of token rows ({num_rows}); "
                         f"got {offsets[:8]}{' ...' if len(offsets) > 8 else ''}")
    lengths = [b - a for a, b in zip(offsets, offsets[1:])]
    width = max(lengths, default=0)
    starts = torch.tensor(offsets[:-1], dtype=torch.long, device=device)
    positions = torch.arange(width, device=device)
    valid = positions[None, :] < torch.tensor(lengths, dtype=torch.long, device=device)[:, None]
    return Packed(torch.where(valid, starts[:, None] + positions[None, :], 0), valid)


def sequence_inputs(hidden, weight, bias, targets, mask, cu_seqlens, checks, vllm_is_ratio=None, **per_token):
    """The batch of a sequence op, padded (hidden ``[B, T, D]``, per-token tensors ``[B, T]``) or packed (hidden
    ``[N, D]``, per-token tensors ``[N]``, ``cu_seqlens``), validated: (Packed or None, B or S, targets, mask and
    the per-token tensors laid out ``[B, T]``, ``vllm_is_ratio`` among them: a packed ``[N]`` one laid out with 1
    past each sequence's end, a ``[S, 1]`` one as it is, for the op's own check)."""
    if cu_seqlens is None:
        check_sequence_batch(hidden, weight, bias, targets, mask, checks, **per_token)
        return None, hidden.shape[0], targets, mask, {**per_token, "vllm_is_ratio": vllm_is_ratio}
    token_ratio = isinstance(vllm_is_ratio, torch.Tensor) and vllm_is_ratio.dim() == 1
    if token_ratio:
        per_token["vllm_is_ratio"] = vllm_is_ratio
    check_linear_head(hidden, weight, bias)
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be [N, D] packed rows with cu_seqlens, got shape {tuple(hidden.shape)}")
    for name, value in dict(targets=targets, mask=mask, **per_token).items():
        if isinstance(value, torch.Tensor) and tuple(value.shape) != (hidden.shape[0],):
            raise ValueError(f"{name} {tuple(value.shape)} must hold one value per packed row ({hidden.shape[0]},) "
                             "with cu_seqlens")
    # the value checks of the padded form, on the packed rows seen as one sequence
    check_sequence_batch(hidden[None], weight, bias, targets[None], None if mask is None else mask[None], checks,
                         **{name: None if value is None else value[None] for name, value in per_token.items()})
    packed = unpack(cu_seqlens, hidden.shape[0], hidden.device)
    mask = packed.valid if mask is None else packed.pad(mask.bool(), False)
    laid_out = {name: packed.pad(value, 0.0) for name, value in per_token.items()}
    laid_out["vllm_is_ratio"] = torch.where(packed.valid, laid_out["vllm_is_ratio"], 1.0) if token_ratio else \
        vllm_is_ratio
    return packed, packed.valid.shape[0], packed.pad(targets, 0), mask, laid_out
