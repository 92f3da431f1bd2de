"""Migration policy audit (a helper): the policy's own bookkeeping against what its executors do with a plan --
the destination's reservation, the simulator's hooks, the Controller's untaken plans. Each test fails before."""

from __future__ import annotations

import asyncio
import dataclasses
import time

import numpy as np

from scheduler.config.models import ClusterConfig, DrainSpec, EngineSpec, PoolSpec
from scheduler.control.controller import Controller
from scheduler.control.registry import EntryTable, RegistryEntry
from scheduler.core.types import ClusterView, Phase
from scheduler.engine.base import SamplingParams
from scheduler.policy.migration import LlumnixMigrationPolicy, MigrationPlan, MigrationReason
from sim.simulator import Simulator, Workload
from tests.test_engine_model import GPU, MODEL
from tests.test_policies_migration import inst, rl, view
from tests.test_sim_migration import AllToFirst


def test_two_plans_into_one_destination_leave_room_for_both_reservations() -> None:
    """The handshake reserves ceil((context + headroom) / block) on the destination (14 blocks for 160 tokens);
    the round debited the context alone (10), so with ``max_per_instance`` 2 a drain planned two moves into 26
    free blocks (28 reserved) and the executor refused the second."""
    p = LlumnixMigrationPolicy(max_per_instance=2, max_concurrent=4, max_plans=4)
    d = inst("d", (rl("r1", rem=100.0), rl("r2", rem=50.0)), draining=True)
    x = inst("x", used=74, total=100)  # 26 free
    plans = p.plan(view(d, x), 0.0)
    assert plans == [MigrationPlan("r1", "d", "x", MigrationReason.DRAIN)]
    # Room for both reservations: both go.
    roomy = inst("x", used=72, total=100)  # 28 free
    assert len(LlumnixMigrationPolicy(max_per_instance=2).plan(view(d, roomy), 0.0)) == 2


class _DrainFirst(LlumnixMigrationPolicy):
    """The Llumnix policy with the simulator's first instance draining (a scale-down); records what it planned
    and the hooks the driver called."""

    def __init__(self) -> None:
        super().__init__()
        self.planned: list[tuple[float, object, str]] = []
        self.hooks: list[tuple] = []

    def plan(self, v: ClusterView, now_s: float) -> list[MigrationPlan]:
        v = ClusterView(v.time_s, (dataclasses.replace(v.instances[0], draining=True), *v.instances[1:]))
        out = super().plan(v, now_s)
        self.planned += [(now_s, x.request_id, x.destination) for x in out]
        return out

    def on_migration_done(self, request_id: str, *, ok: bool) -> None:
        self.hooks.append(("done", request_id, ok))
        super().on_migration_done(request_id, ok=ok)

    def on_migration_dropped(self, request_id: str) -> None:
        self.hooks.append(("dropped", request_id))
        super().on_migration_dropped(request_id)


def test_sim_hooks_reach_the_llumnix_policy_and_a_refusal_does_not_stall_a_drain() -> None:
    """The simulator's snapshots carry int request ids, so the policy keyed its in-flight entry by 0; the driver
    reported ``str(rid)`` ("0") and the pop missed. A plan the destination refused (small-0 holds 640 tokens, the
    request needs 800) stayed "in flight" on the draining source for inflight_timeout_s: request 1 never left it
    (one plan in the whole run; it finished there at 4.6 s). The hooks now echo the plan's id, and the refusal is a
    failed migration (as the live ingress reports a refused reservation): request 1 moves at the next round."""

    def eng(blocks: int) -> EngineSpec:
        return EngineSpec(block_size=16, max_num_batched_tokens=512, max_num_seqs=64, num_kv_blocks=blocks)

    cfg = ClusterConfig(gpus={"a100": GPU}, model=MODEL, pools=[
        PoolSpec(name="big", gpu="a100", count=1, engine=eng(2000)),
        PoolSpec(name="small", gpu="a100", count=1, engine=eng(40)),
        PoolSpec(name="mid", gpu="a100", count=1, engine=eng(2000))])
    pol = _DrainFirst()
    sim = Simulator(cfg, router=AllToFirst(), migration=pol)
    res = sim.run(Workload(np.array([0.0, 0.0]), np.array([200, 200]), np.array([600, 300])))
    assert pol.planned[0] == (0.5, 0, "small-0") and sim.migrations.aborted_dst == 1
    assert pol.planned[1] == (1.0, 1, "mid-0") and res.migrations == 1
    assert pol.hooks == [("done", 0, False), ("done", 1, True)]
    assert not pol._inflight and np.isfinite(res.finish_s).all()


def test_controller_drops_plans_nobody_took_without_a_request_cooldown() -> None:
    """A plan no ingress took within 5 s never started; the Controller reported it failed, so its request stayed
    out of plans for request_cooldown_s (10 s from the plan: 5 s more). Dropped, it is planned again at once."""
    ctrl = Controller.__new__(Controller)  # the policy loop alone: no Ray
    pol = ctrl._migration = LlumnixMigrationPolicy(cooldown_s=0.0)
    ctrl._init_drain_moves(DrainSpec())
    ctrl.migration_stats = {"planned": 0, "dropped": 0, "committed": 0, "failed": 0}
    ctrl._registry = EntryTable()
    ctrl._registry.apply("ing", [RegistryEntry("a", "ing", ("d",), 5, Phase.DECODE)], [], full=True)
    ctrl._snapshots = {"d": inst("d", (rl("a"),), draining=True), "x": inst("x", total=200)}
    t0 = time.time() - 6.0
    old = pol.plan(ClusterView(t0, tuple(ctrl._snapshots.values())), t0)
    assert [x.request_id for x in old] == ["a"]
    ctrl._plans = {"ing": [(t0, old[0])]}  # queued 6 s ago, never taken
    ctrl._policy_tick()
    assert [p.request_id for _, p in ctrl._plans["ing"]] == ["a"]  # expired, and planned again


def test_a_plan_that_was_moot_on_arrival_is_dropped_not_failed() -> None:
    """The ingress reported every plan it could not start (the request finished meanwhile, already moving, its
    source gone) as a failed migration: the Controller counted a failure and the policy rested the request for
    request_cooldown_s. The ingress now says whether anything was tried; the Controller drops the rest."""
    from scheduler.control.api import GenerateRequest
    from tests.test_ingress_audit import FakeInstance, _consume, _ingress

    class Recorder:
        def __init__(self) -> None:
            self.calls: list[tuple] = []
            rec = self

            class _M:
                def remote(self, *a: object) -> None:
                    rec.calls.append(a)

            self.migration_done = _M()

    async def scenario() -> list[tuple]:
        ing = _ingress([FakeInstance("mixed-0"), FakeInstance("mixed-1")], routable=["mixed-0"])
        ing.controller = Recorder()
        await ing._execute_plan(MigrationPlan("gone", "mixed-0", "mixed-1", MigrationReason.LOAD_BALANCE))  # finished
        out: list[object] = []
        task = asyncio.create_task(_consume(ing, GenerateRequest(
            "r", prompt_token_ids=[1, 2, 3], sampling=SamplingParams(max_tokens=400)), out))
        while len(out) < 2:
            await asyncio.sleep(0.005)
        ing.registry.get("r").moving_to = "mixed-1"  # already moving
        await ing._execute_plan(MigrationPlan("r", "mixed-0", "mixed-1", MigrationReason.LOAD_BALANCE))
        ing.registry.get("r").moving_to = None
        await ing.cancel("r")
        await task
        return ing.controller.calls

    assert asyncio.run(scenario()) == [("gone", False, False), ("r", False, False)]

    ctrl = Controller.__new__(Controller)
    pol = ctrl._migration = LlumnixMigrationPolicy()
    ctrl._init_drain_moves(DrainSpec())
    ctrl.migration_stats = {"planned": 0, "dropped": 0, "committed": 0, "failed": 0}
    pol._inflight["a"], pol._recent["a"] = ("d", "x", 0.0), 0.0
    asyncio.run(ctrl.migration_done("a", False, False))
    assert ctrl.migration_stats["dropped"] == 1 and ctrl.migration_stats["failed"] == 0
    assert "a" not in pol._inflight and "a" not in pol._recent  # no cooldown for what never moved
