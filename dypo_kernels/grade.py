"""The grade of a prompt's group of rollouts, which decides how DYPO trains on it (paper section 3)."""

from enum import IntEnum
from typing import NamedTuple

import torch


class Grade(IntEnum):
    """EASY: every rollout succeeds (dropped); MID: mixed (GRPO + GAL); HARD: none succeeds (SFT on a teacher)."""

    EASY = 0
    MID = 1
    HARD = 2


class GroupAdvantages(NamedTuple):
    """What group_advantages returns: per row ``advantages`` [B] fp32; per group ``mean``, ``std`` [G] fp32,
    ``num_success`` [G] int64 and ``grade`` [G] int64 holding Grade values."""

    advantages: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    num_success: torch.Tensor
    grade: torch.Tensor


class Route(IntEnum):
    """What dypo_loss does with a sequence: SKIP (a rollout of an easy prompt: no gradient), RL (a rollout of a mid
    prompt: alpha GRPO + (1 - alpha) GAL), SFT (a teacher trajectory of a hard prompt: gamma SFT)."""

    SKIP = 0
    RL = 1
    SFT = 2
