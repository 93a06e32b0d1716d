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
    """The Route of each prompt's group from its Grade under ``strategy`` (DYPO's rule, routes_of; the sft
    strategy, and sft_then_rl's first half, send every group to SFT), and the alpha of this step's RL term (1:
    plain GRPO)."""
    plain = is_plain_grpo(strategy, step, config)
    if strategy == "sft" or (strategy == "sft_then_rl" and not plain):
        routes = [Route.SFT] * len(grades)
    else:
        routes = [Route(route) for route in routes_of(grades, plain_grpo=plain).tolist()]
    return routes, (1.0 if plain else config.alpha)


@dataclasses.dataclass
class Row:
    """One training sequence: prompt + completion token ids; RL rows carry their rollout-time log-probs (one per
    completion token) and advantage, SFT rows under --teacher_topk_field their solution's stored teacher top-k."""

    ids: List[int]
    prompt_length: int
    reward: float = 0.0
    advantage: float = 0.0
    old_logps: Optional[List[float]] = None
    ref_logps: Optional[List[float]] = None
    teacher_topk: Optional[dict] = None


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
