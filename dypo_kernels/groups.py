"""Prompt groups of a batch of rollouts: uniform (``group_size`` consecutive rows) or ragged (``group_index``)."""

import torch

from dypo_kernels.validation import check_tensor


def group_ids(batch_size, device, group_size=None, group_index=None):
    """Validated group id of each row, int64 [B], and the number of groups G. One host sync for ragged groups."""
    if (group_size is None) == (group_index is None):
        raise ValueError("give exactly one of group_size (uniform groups) and group_index (ragged groups)")
    if group_size is not None:
        if not isinstance(group_size, int) or group_size < 1 or batch_size % group_size:
            raise ValueError(f"group_size={group_size!r} must be a positive integer dividing the batch size "
                             f"{batch_size}")
        return torch.arange(batch_size, device=device) // group_size, batch_size // group_size
    check_tensor("group_index", group_index, dims=(1,), integer=True)
    if group_index.shape[0] != batch_size:
        raise ValueError(f"group_index {tuple(group_index.shape)} must have one id per row ({batch_size})")
    if group_index.device != device:
        raise ValueError(f"group_index is on {group_index.device}, the other tensors on {device}")
    ids = group_index.long()
    if batch_size == 0:
        return ids, 0
    lowest, num_groups = int(ids.min()), int(ids.max()) + 1
    if lowest < 0:
        raise ValueError(f"group_index must hold ids 0..G-1, found {lowest}")
    missing = (torch.bincount(ids, minlength=num_groups) == 0).nonzero().squeeze(1)
    if missing.numel():
        raise ValueError(f"group_index must hold ids 0..G-1 without gaps; missing {missing[:5].tolist()}")
    return ids, num_groups
