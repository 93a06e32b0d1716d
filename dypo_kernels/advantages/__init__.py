"""group_advantages: GRPO's group-normalised advantages and DYPO's grade of each group, in one kernel."""

import torch

from dypo_kernels.backend import select_backend
from dypo_kernels.grade import Grade, GroupAdvantages
from dypo_kernels.groups import group_ids
from dypo_kernels.validation import Checks, check_number, check_tensor

SCALES = ("group", "batch", "none")


def _group_advantages_torch(rewards, ids, num_groups, batch, scale, eps, success_threshold):
    """The statistics in units of each group's magnitude s_g = max |R| (1 for a group of zeros), so that any finite
    rewards give finite advantages: u = R / s_g in [-1, 1] (in the rewards' dtype, then fp32), and
    A = (u - mean_u) / (std_u + eps / s_g), which is (R - mean) / (std + eps)."""
    device, rewards = rewards.device, _exact(rewards)
    magnitude = torch.zeros(num_groups, dtype=rewards.dtype, device=device).scatter_reduce_(
        0, ids, rewards.abs(), "amax")
    magnitude = torch.where(magnitude > 0, magnitude, 1.0)
    units = (rewards / magnitude[ids]).float()
    count = torch.zeros(num_groups, device=device).index_add_(0, ids, torch.ones_like(units))
    mean = torch.zeros(num_groups, device=device).index_add_(0, ids, units) / count
    centred = units - mean[ids]
    square = torch.zeros(num_groups, device=device).index_add_(0, ids, centred * centred)
    std = torch.where(count > 1, (square / (count - 1).clamp(min=1)).sqrt(), 0.0)
    if scale == "group":
        advantages = centred / (std + (eps / magnitude).float())[ids]
    elif scale == "batch":
        batch_std, batch_magnitude = batch
        advantages = centred * (magnitude / batch_magnitude).float()[ids] / (batch_std + eps / batch_magnitude).float()
    else:
        advantages = (centred * magnitude[ids]).float()
    success = (rewards > success_threshold).long()
    num_success = torch.zeros(num_groups, dtype=torch.long, device=device).index_add_(0, ids, success)
    grade = torch.where(num_success == 0, int(Grade.HARD),
                        torch.where(num_success == count.long(), int(Grade.EASY), int(Grade.MID)))
    return advantages, (mean * magnitude).float(), (std * magnitude).float(), num_success, grade


def group_advantages(rewards, *, group_size=None, group_index=None, scale="group", eps=1e-6,
                     success_threshold=0.5):
    """Group-normalised advantages and the grade of each group (GRPO, paper eq. 22; DYPO routing, section 3).

    A_i = (R_i - mean_g) / (s + eps), with s the group's sample std (n - 1) for ``scale="group"`` (GRPO, as TRL
    and verl compute it), the whole batch's sample std for ``"batch"``, and no division for ``"none"`` (Dr.GRPO).
    A group of one has std 0 (advantage 0). Rollout i succeeds when R_i > ``success_threshold``; a group is
    ``Grade.EASY`` when all of its rollouts succeed, ``Grade.HARD`` when none does, ``Grade.MID`` otherwise.

    The statistics are taken in units of each group's largest |R_i|, so finite rewards of any magnitude give finite
    advantages (with ``"none"``, R_i - mean_g itself must fit fp32); ``mean`` and ``std`` are returned in fp32.

    Args:
        rewards: ``[B]`` float rewards; NaN or inf is an error.
        group_size: uniform groups of this many consecutive rows (must divide B), or
        group_index: ``[B]`` integer group ids 0..G-1 without gaps, in any order (ragged groups).

    Returns:
        ``GroupAdvantages(advantages [B] fp32, mean [G] fp32, std [G] fp32, num_success [G] int64,
        grade [G] int64)``; compare ``grade`` with ``Grade`` members.

    Cost: O(B) work, one Triton launch on CUDA (plus a sort for ragged groups; fp64 rewards, whose range exceeds the
    kernel's fp32, take a few torch ops instead); one host sync: the input checks, read with the number of groups.
    """
    check_tensor("rewards", rewards, dims=(1,))
    if not rewards.is_floating_point():
        raise TypeError(f"rewards must be a float tensor, got {rewards.dtype}")
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    check_number("eps", eps, low=0)
    check_number("success_threshold", success_threshold)
    checks = Checks()
    if rewards.numel():
        checks.require(torch.isfinite(rewards).all(), lambda: "rewards must be finite; found NaN or inf at rows "
                       f"{(~torch.isfinite(rewards)).nonzero().squeeze(1)[:5].tolist()}")
    ids, groups = group_ids(rewards.shape[0], rewards.device, group_size, group_index, checks)
    checks.run()
    num_groups = groups.value
    if num_groups == 0:
        empty = rewards.new_zeros(0, dtype=torch.float32)
        return GroupAdvantages(empty, empty, empty, empty.long(), empty.long())
    if select_backend(rewards.device) != "triton" or rewards.dtype == torch.float64:  # fp64 may exceed fp32's range
        return GroupAdvantages(*_group_advantages_torch(rewards, ids, num_groups, _batch_scale(rewards), scale, eps,
                                                        success_threshold))
    from dypo_kernels.advantages import triton_kernels

    if group_size is not None:
        order = torch.arange(rewards.shape[0], device=rewards.device)
        offsets = torch.arange(0, rewards.shape[0] + 1, group_size, device=rewards.device)
    else:
        order = torch.argsort(ids, stable=True)
        sizes = torch.zeros(num_groups, dtype=torch.long, device=rewards.device).index_add_(0, ids,
                                                                                            torch.ones_like(ids))
        offsets = torch.nn.functional.pad(sizes.cumsum(0), (1, 0))
    return GroupAdvantages(*triton_kernels.group_advantages(
        rewards.float().contiguous(), order, offsets, torch.stack(_batch_scale(rewards)), num_groups, scale,
        float(eps), float(success_threshold)))


def _exact(rewards):
    """fp64 rewards as they are (they may exceed fp32's range), others in fp32 (16-bit values fit exactly)."""
    return rewards if rewards.dtype == torch.float64 else rewards.float()


def _batch_scale(rewards):
    """(the batch's sample std in units of its magnitude, fp32; the magnitude max |R|, 1 for zeros)."""
    rewards = _exact(rewards)
    magnitude = rewards.abs().amax() if rewards.numel() else rewards.new_ones(())
    magnitude = torch.where(magnitude > 0, magnitude, 1.0)
    std = (rewards / magnitude).float().std() if rewards.numel() > 1 else magnitude.new_zeros((), dtype=torch.float32)
    return std, magnitude


def grouped_advantages(rewards, ids, num_groups):
    """GRPO's advantages [B] fp32 (scale "group", eps 1e-6) of rewards already checked, for ids 0..G-1: the
    unchecked core that dypo_loss calls, without host sync."""
    if not rewards.numel():
        return rewards.new_zeros(0, dtype=torch.float32)
    return _group_advantages_torch(rewards, ids, num_groups, None, "group", 1e-6, 0.5)[0]
