"""Prompt groups of a batch of rollouts: uniform (``group_size`` consecutive rows) or ragged (``group_index``)."""

import torch

from dypo_kernels.validation import Checks, Count, check_tensor


def group_ids(batch_size, device, group_size=None, group_index=None, checks=None):
    """Validated group id of each row, int64 [B], and the number of groups G as a Count. For ragged groups the ids
    are checked in ``checks`` and G read with them when given (else at once: one host sync)."""
    if (group_size is None) == (group_index is None):
        raise ValueError("give exactly one of group_size (uniform groups) and group_index (ragged groups)")
    if group_size is not None:
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1 or \
                batch_size % group_size:
            raise ValueError(f"group_size={group_size!r} must be a positive integer dividing the batch size "
                             f"{batch_size}")
        return torch.arange(batch_size, device=device) // group_size, Count(batch_size // group_size)
    check_tensor("group_index", group_index, dims=(1,), integer=True)
    if group_index.shape[0] != batch_size:
        raise ValueError(f"group_index {tuple(group_index.shape)} must have one id per row ({batch_size})")
    if group_index.device != device:
        raise ValueError(f"group_index is on {group_index.device}, the other tensors on {device}")
    ids = group_index.long()
    if batch_size == 0:
        return ids, Count(0)
    run_now = checks is None
    checks = Checks() if run_now else checks
    in_range = (ids >= 0) & (ids < batch_size)  # G <= B: the buffers below are sized by B, not by a host sync
    present = torch.zeros(batch_size, dtype=torch.bool, device=device).index_fill_(0, ids.clamp(0, batch_size - 1),
                                                                                    True)
    num_groups = ids.max() + 1
    checks.require(in_range.all(), lambda: f"group_index must hold ids 0..G-1 (G <= B = {batch_size}), found "
                                           f"{ids[~in_range][:5].tolist()}")
    missing = ~present & (torch.arange(batch_size, device=device) < num_groups)
    checks.require(~missing.any(), lambda: f"group_index must hold ids 0..G-1 without gaps; missing "
                                           f"{missing.nonzero().squeeze(1)[:5].tolist()}")
    groups = checks.count(num_groups)
    if run_now:
        checks.run()
    return ids, groups
