"""Triton path of group_advantages: one program per group, reading its rows through a group-sorted order, so that
uniform and ragged groups share one kernel. Four short passes over the group's rows (magnitude and successes; sum;
squared deviations; advantages) in one launch for the whole batch. The statistics are taken in units of the group's
magnitude max |R| (as the torch path), so that any finite rewards give finite advantages."""

import triton
import triton.language as tl

SCALES = {"group": 0, "batch": 1, "none": 2}
BLOCK = 128


@triton.jit
def _group_advantages_kernel(p_rewards, p_order, p_offsets, p_batch, p_advantages, p_mean, p_std,
                             p_num_success, p_grade, eps, success_threshold,
                             SCALE: tl.constexpr, BLOCK: tl.constexpr):
    i_g = tl.program_id(0)
    start = tl.load(p_offsets + i_g)
    end = tl.load(p_offsets + i_g + 1)
    count = (end - start).to(tl.float32)
    b_magnitude = tl.zeros([BLOCK], dtype=tl.float32)
    b_success = tl.zeros([BLOCK], dtype=tl.int32)
    for i_start in range(start, end, BLOCK):
        o_row = i_start + tl.arange(0, BLOCK)
        m_row = o_row < end
        b_reward = tl.load(p_rewards + tl.load(p_order + o_row, mask=m_row, other=0), mask=m_row, other=0.0)
        b_magnitude = tl.maximum(b_magnitude, tl.abs(b_reward))
        b_success += (m_row & (b_reward > success_threshold)).to(tl.int32)
    magnitude = tl.max(b_magnitude, axis=0)
    magnitude = tl.where(magnitude > 0.0, magnitude, 1.0)
    b_sum = tl.zeros([BLOCK], dtype=tl.float32)
    for i_start in range(start, end, BLOCK):
        o_row = i_start + tl.arange(0, BLOCK)
        m_row = o_row < end
        b_reward = tl.load(p_rewards + tl.load(p_order + o_row, mask=m_row, other=0), mask=m_row, other=0.0)
        b_sum += (b_reward / magnitude).to(tl.float32)
    mean = tl.sum(b_sum, axis=0) / count
    b_square = tl.zeros([BLOCK], dtype=tl.float32)
    for i_start in range(start, end, BLOCK):
        o_row = i_start + tl.arange(0, BLOCK)
        m_row = o_row < end
        b_reward = tl.load(p_rewards + tl.load(p_order + o_row, mask=m_row, other=0), mask=m_row, other=0.0)
        b_centred = (b_reward / magnitude).to(tl.float32) - mean
        b_square += tl.where(m_row, b_centred * b_centred, 0.0)
    std = tl.where(count > 1.0, tl.sqrt(tl.sum(b_square, axis=0) / tl.maximum(count - 1.0, 1.0)), 0.0)
    if SCALE == 0:
        scale = 1.0 / (std + (eps / magnitude).to(tl.float32))
    elif SCALE == 1:
        batch_magnitude = tl.load(p_batch + 1)
        scale = (magnitude / batch_magnitude).to(tl.float32) / (tl.load(p_batch).to(tl.float32)
                                                                + (eps / batch_magnitude).to(tl.float32))
    else:
        scale = magnitude
    for i_start in range(start, end, BLOCK):
        o_row = i_start + tl.arange(0, BLOCK)
        m_row = o_row < end
        o_source = tl.load(p_order + o_row, mask=m_row, other=0)
        b_reward = tl.load(p_rewards + o_source, mask=m_row, other=0.0)
        b_centred = (b_reward / magnitude).to(tl.float32) - mean
        tl.store(p_advantages + o_source, (b_centred * scale).to(tl.float32), mask=m_row)
    num_success = tl.sum(b_success, axis=0)
    grade = tl.where(num_success == 0, 2, tl.where(num_success.to(tl.float32) == count, 0, 1))  # Grade values
    tl.store(p_mean + i_g, (mean * magnitude).to(tl.float32))
    tl.store(p_std + i_g, (std * magnitude).to(tl.float32))
    tl.store(p_num_success + i_g, num_success.to(tl.int64))
    tl.store(p_grade + i_g, grade.to(tl.int64))


def group_advantages(rewards, order, offsets, batch, num_groups, scale, eps, success_threshold):
    """rewards [B] fp32; order [B] int64, the rows sorted by group; offsets [G + 1] int64, where each group starts in
    ``order``; batch [2] fp32: the batch's std in units of its magnitude, and the magnitude (read for scale="batch"
    only). Returns the GroupAdvantages fields."""
    import torch

    device = rewards.device
    advantages = torch.empty(rewards.shape[0], dtype=torch.float32, device=device)
    mean, std = (torch.empty(num_groups, dtype=torch.float32, device=device) for _ in range(2))
    num_success, grade = (torch.empty(num_groups, dtype=torch.int64, device=device) for _ in range(2))
    _group_advantages_kernel[(num_groups,)](rewards, order, offsets, batch, advantages, mean, std, num_success,
                                            grade, eps, success_threshold, SCALE=SCALES[scale], BLOCK=BLOCK)
    return advantages, mean, std, num_success, grade


def aot_specs():
    signature = {"p_rewards": "*fp32", "p_order": "*i64", "p_offsets": "*i64", "p_batch": "*fp32",
                 "p_advantages": "*fp32", "p_mean": "*fp32", "p_std": "*fp32", "p_num_success": "*i64",
                 "p_grade": "*i64", "eps": "fp32", "success_threshold": "fp32"}
    return [(f"group_advantages[{name}]", _group_advantages_kernel, signature, {"SCALE": value, "BLOCK": BLOCK},
             {"num_warps": 4, "num_stages": 1}) for name, value in SCALES.items()]
