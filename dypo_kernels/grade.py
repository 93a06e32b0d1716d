"""The grade of a prompt's group of rollouts, which decides how DYPO trains on it (paper section 3)."""

from enum import IntEnum


class Grade(IntEnum):
    """EASY: every rollout succeeds (dropped); MID: mixed (GRPO + GAL); HARD: none succeeds (SFT on a teacher)."""

    EASY = 0
    MID = 1
    HARD = 2
