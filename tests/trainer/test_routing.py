import json

import pytest
import torch

from dypo.config import Config
from dypo.routing import Queues, Row, route_groups, routes_of
from dypo_kernels import Grade, Route


@pytest.mark.parametrize("plain_grpo,expected", [(False, [Route.SKIP, Route.RL, Route.SFT]),
                                                 (True, [Route.SKIP, Route.RL, Route.RL])])
def test_the_route_rule_sends_each_grade_where_dypo_trains_it(plain_grpo, expected):
    """The one rule of the trainer and the TRL and verl adapters: easy dropped, mid RL, hard SFT (RL under plain
    GRPO), for lists and tensors of grades alike."""
    grades = [Grade.EASY, Grade.MID, Grade.HARD]
    assert routes_of(grades, plain_grpo=plain_grpo).tolist() == expected
    routes = routes_of(torch.tensor([Grade.HARD, Grade.HARD, Grade.EASY]), plain_grpo=plain_grpo)
    assert routes.dtype == torch.long and routes.tolist() == [expected[2], expected[2], Route.SKIP]
    assert routes_of([]).tolist() == []


@pytest.mark.parametrize("strategy,step,expected,plain_grpo", [
    ("dypo", 5, [Route.SKIP, Route.RL, Route.SFT], False),
    ("grpo", 5, [Route.SKIP, Route.RL, Route.RL], True),
    ("sft", 5, [Route.SFT, Route.SFT, Route.SFT], False),
    ("sft_then_rl", 0, [Route.SFT, Route.SFT, Route.SFT], False),
    ("sft_then_rl", 9, [Route.SKIP, Route.RL, Route.RL], True),
    ("dypo", 1, [Route.SKIP, Route.RL, Route.RL], True),  # before switch_gate: plain GRPO
])
def test_routes_follow_grades(strategy, step, expected, plain_grpo):
    config = Config(strategy=strategy, max_steps=10, switch_gate=2, alpha=0.3)
    routes, alpha = route_groups([Grade.EASY, Grade.MID, Grade.HARD], strategy, step, config)
    assert routes == expected
    assert alpha == (1.0 if plain_grpo else 0.3)


def test_queues_fire_in_arrival_order_and_survive_a_round_trip():
    queues = Queues()
    for step, route in enumerate([Route.SFT, Route.RL, Route.RL, Route.SFT]):
        queues.push(step, route, [Row([1, 2, 3], 2, 1.0, 0.5, [-0.1], [-0.2])])
    restored = Queues.from_state(json.loads(json.dumps(queues.state())))
    assert restored.state() == queues.state()
    assert [g.step for g in restored.pop_batch(3)] == [0, 1, 2] and len(restored) == 1
