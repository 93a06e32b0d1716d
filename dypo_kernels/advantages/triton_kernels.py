"""Triton path of group_advantages: one program per group, reading its rows through a group-sorted order, so that
uniform and ragged groups share one kernel. Three short passes over the group's rows (sum and successes; squared
deviations; advantages) in one launch for the whole batch."""

import triton
import triton.language as tl

SCALES = {"group": 0, "batch": 1, "none": 2}
BLOCK = 128


@triton.jit
def _group_advantages_kernel(p_rewards, p_order, p_offsets, p_batch_std, p_advantages, p_mean, p_std,
                             p_num_success, p_grade, eps, success_threshold,
                             SCALE: tl.constexpr, BLOCK: tl.constexpr):
    i_g = tl.program_id(0)
    start = tl.load(p_offsets + i_g)
    end = tl.load(p_offsets + i_g + 1)
    count = (end - start).to(tl.float32)
    b_sum = tl.zeros([BLOCK], dtype=tl.float32)
    b_success = tl.zeros([BLOCK], dtype=tl.int32)
    for i_start in range(start, end, BLOCK):
        o_row = i_start + tl.arange(0, BLOCK)
        m_row = o_row < end
        b_reward = tl.load(p_rewards + tl.load(p_order + o_row, mask=m_row, other=0), mask=m_row, other=0.0)
        b_reward = b_reward.to(tl.float32)
        b_sum += b_reward
        b_success += (m_row & (b_reward > success_threshold)).to(tl.int32)
    mean = tl.sum(b_sum, axis=0) / count
    b_square = tl.zeros([BLOCK], dtype=tl.float32)
    for i_start in range(start, end, BLOCK):
        o_row = i_start + tl.arange(0, BLOCK)
        m_row = o_row < end
        b_reward = tl.load(p_rewards + tl.load(p_order + o_row, mask=m_row, other=0), mask=m_row, other=0.0)
        b_square += tl.where(m_row, (b_reward.to(tl.float32) - mean) * (b_reward.to(tl.float32) - mean), 0.0)
    std = tl.where(count > 1.0, tl.sqrt(tl.sum(b_square, axis=0) / tl.maximum(count - 1.0, 1.0)), 0.0)
    if SCALE == 0:
        scale = 1.0 / (std + eps)
    elif SCALE == 1:
        scale = 1.0 / (tl.load(p_batch_std) + eps)
    else:
        scale = 1.0
    for i_start in range(start, end, BLOCK):
        o_row = i_start + tl.arange(0, BLOCK)
        m_row = o_row < end
        o_source = tl.load(p_order + o_row, mask=m_row, other=0)
        b_reward = tl.load(p_rewards + o_source, mask=m_row, other=0.0).to(tl.float32)
        tl.store(p_advantages + o_source, (b_reward - mean) * scale, mask=m_row)
    num_success = tl.sum(b_success, axis=0)
    grade = tl.where(num_success == 0, 2, tl.where(num_success.to(tl.float32) == count, 0, 1))  # Grade values
    tl.store(p_mean + i_g, mean)
    tl.store(p_std + i_g, std)
    tl.store(p_num_success + i_g, num_success.to(tl.int64))
    tl.store(p_grade + i_g, grade.to(tl.int64))


def group_advantages(rewards, order, offsets, batch_std, num_groups, scale, eps, success_threshold):
    """rewards [B]; order [B] int64, the rows sorted by group; offsets [G + 1] int64, where each group starts in
    ``order``; batch_std [1] fp32 (read for scale="batch" only). Returns the GroupAdvantages fields."""
    import torch

    device = rewards.device
    advantages = torch.empty(rewards.shape[0], dtype=torch.float32, device=device)
    mean, std = (torch.empty(num_groups, dtype=torch.float32, device=device) for _ in range(2))
    num_success, grade = (torch.empty(num_groups, dtype=torch.int64, device=device) for _ in range(2))
    _group_advantages_kernel[(num_groups,)](rewards, order, offsets, batch_std, advantages, mean, std, num_success,
                                            grade, eps, success_threshold, SCALE=SCALES[scale], BLOCK=BLOCK)
    return advantages, mean, std, num_success, grade


def aot_specs():
    signature = {"p_rewards": "*fp32", "p_order": "*i64", "p_offsets": "*i64", "p_batch_std": "*fp32",
                 "p_advantages": "*fp32", "p_mean": "*fp32", "p_std": "*fp32", "p_num_success": "*i64",
                 "p_grade": "*i64", "eps": "fp32", "success_threshold": "fp32"}
    return [(f"group_advantages[{name}]", _group_advantages_kernel, signature, {"SCALE": value, "BLOCK": BLOCK},
             {"num_warps": 4, "num_stages": 1}) for name, value in SCALES.items()]
