"""``--seed`` reaches a router that draws (``power_of_two``, ``random``, ``learned``'s exploration) in simulate,
compare and plan, unless the router's parameters name a seed; ``--seed 0`` builds the routers it always built."""

from __future__ import annotations

import random

from scheduler.config.load import load_config
from sim.commands import seeded
from sim.compare import router_factory


def test_seed_reaches_a_drawing_router_unless_its_params_name_one() -> None:
    assert seeded("power_of_two", {}, 3) == {"seed": 3}
    assert seeded("random", {}, 3) == {"seed": 3}
    assert seeded("power_of_two", {"seed": 7}, 3) == {"seed": 7}  # the router's own parameter wins
    assert seeded("least_outstanding", {}, 3) == {}  # draws nothing: takes no seed
    assert seeded("power_of_two", {"queue_weight": 2.0}, 0) == {"queue_weight": 2.0}  # seed 0: as before


def test_compare_and_plan_build_power_of_two_with_the_run_seed() -> None:
    cfg = load_config(None)
    draws = [router_factory("power_of_two", cfg, seed)()._rng.random() for seed in (0, 5)]
    assert draws == [random.Random(0).random(), random.Random(5).random()]
    assert router_factory("power_of_two:seed=9", cfg, 5)()._rng.random() == random.Random(9).random()
