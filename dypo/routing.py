"""Routing (paper Fig. 2): each prompt's group of rollouts goes where its grade sends it. The rule is written once
here, for the trainer and the TRL and verl adapters; the trainer's rows and queues live here too."""

import dataclasses
from typing import List, Optional

import torch

from dypo_kernels import Grade, Route


def routes_of(grades, *, plain_grpo=False):
    """Each group's Route from its Grade, DYPO's rule: easy groups are dropped (SKIP), mid ones trained by RL, hard
    ones by SFT on a teacher solution; under plain GRPO hard ones go to RL too (all their rollouts failed: zero
    advantages). ``grades``: a [G] tensor or list of Grade values; returns [G] int64 on the grades' device."""
    route_of_grade = {Grade.EASY: Route.SKIP, Grade.MID: Route.RL, Grade.HARD: Route.RL if plain_grpo else Route.SFT}
    grades = torch.as_tensor(grades, dtype=torch.long)
    table = torch.tensor([route_of_grade[Grade(value)] for value in range(len(Grade))], device=grades.device)
    return table[grades]


def is_plain_grpo(strategy, step, config):
    """Whether this step trains plain GRPO: the grpo strategy, DYPO before switch_gate, sft_then_rl's second half."""
    return strategy == "grpo" or (strategy == "dypo" and step < config.switch_gate) or \
        (strategy == "sft_then_rl" and step >= config.max_steps // 2)


def route_groups(grades, strategy, step, config):
    """The Route of each prompt's group from its Grade under ``strategy``, and the alpha of this step's RL term (1:
    plain GRPO). dypo: DYPO's rule (routes_of). sft, and sft_then_rl's first half: every group to SFT. sft_rl
    (multi-teacher SFT + RL, no grading): every group to RL, and the trainer queues its teacher solution for SFT as
    well. luffy: every group but the easy ones to RL, where the trainer puts a teacher trajectory in place of one
    rollout."""
    plain = is_plain_grpo(strategy, step, config)
    if strategy == "sft" or (strategy == "sft_then_rl" and not plain):
        return [Route.SFT] * len(grades), config.alpha  # no RL rows: alpha weighs nothing
    if strategy in ("sft_rl", "luffy"):
        grades = torch.as_tensor(grades, dtype=torch.long).tolist()
        skip = strategy == "luffy"
        return [Route.SKIP if skip and grade == Grade.EASY else Route.RL for grade in grades], 1.0
    return [Route(route) for route in routes_of(grades, plain_grpo=plain).tolist()], (1.0 if plain else config.alpha)


def offline_share(route, strategy, group_size):
    """The off-policy (teacher) share of a trained prompt's data: 1 for SFT, 0 for RL on its own rollouts; luffy's
    mixed group holds one teacher trajectory in ``group_size``; sft_rl trains each prompt by SFT and RL alike."""
    if route == Route.SFT:
        return 1.0
    return {"luffy": 1.0 / group_size, "sft_rl": 0.5}.get(strategy, 0.0)


@dataclasses.dataclass
class Row:
    """One training sequence: prompt + completion token ids; RL rows carry their rollout-time log-probs (one per
    completion token) and advantage, SFT rows under --teacher_topk_field their solution's stored teacher top-k;
    ``off_policy``: a teacher trajectory in an RL group (strategy luffy), trained by the trainer's off-policy term."""

    ids: List[int]
    prompt_length: int
    reward: float = 0.0
    advantage: float = 0.0
    old_logps: Optional[List[float]] = None
    ref_logps: Optional[List[float]] = None
    teacher_topk: Optional[dict] = None
    off_policy: bool = False


@dataclasses.dataclass
class RoutedGroup:
    """One prompt's rows waiting in a queue."""

    arrival: int
    step: int
    route: int
    rows: List[Row]


class Queues:
    """The SFT queue (hard prompts' teacher solutions) and the RL queue (mid groups' rollouts). An update fires
    whenever together they hold a batch; it takes the oldest prompts of both."""

    def __init__(self):
        self.groups = {Route.SFT: [], Route.RL: []}
        self.arrivals = 0

    def push(self, step, route, rows):
        self.groups[route].append(RoutedGroup(self.arrivals, step, int(route), rows))
        self.arrivals += 1

    def __len__(self):
        return sum(map(len, self.groups.values()))

    def pop_batch(self, size):
        batch = sorted(self.groups[Route.SFT] + self.groups[Route.RL], key=lambda g: g.arrival)[:size]
        taken = {g.arrival for g in batch}
        for route in self.groups:
            self.groups[route] = [g for g in self.groups[route] if g.arrival not in taken]
        return batch

    def state(self):
        return {"arrivals": self.arrivals,
                "groups": [dataclasses.asdict(g) for route in self.groups for g in self.groups[route]]}

    @classmethod
    def from_state(cls, state):
        queues = cls()
        queues.arrivals = state["arrivals"]
        for group in state["groups"]:
            queues.groups[Route(group["route"])].append(
                RoutedGroup(group["arrival"], group["step"], group["route"], [Row(**row) for row in group["rows"]]))
        return queues
