"""Migration in the simulator: requests move with their KV, nothing is lost, the cost is paid."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from scheduler.core.types import ClusterView
from sim.simulator import Simulator, Workload
from tests.test_engine_model import config


@dataclass(frozen=True)
class Plan:
    request_id: str
    source: str
    destination: str
    reason: str = "test"


class MoveOneFromBusiest:
    """Minimal pure policy: one decoding request from the busiest to the idlest instance per tick."""

    def plan(self, view: ClusterView, now_s: float) -> list[Plan]:
        insts = sorted(view.instances, key=lambda s: s.num_running + s.num_waiting)
        lo, hi = insts[0], insts[-1]
        if hi.num_running - lo.num_running < 2:
            return []
        for r in hi.requests:
            if not r.in_prefill:
                return [Plan(r.request_id, hi.instance_id, lo.instance_id)]
        return []


def skewed_workload(n: int = 120) -> Workload:
    rng = np.random.default_rng(5)
    return Workload(np.sort(rng.uniform(0, 2.0, n)), rng.integers(100, 600, n), rng.integers(100, 400, n))


class AllToFirst:
    """A router that overloads instance 0 so migration has something to fix."""

    name = "all_to_first"
    needs_request_detail = False

    def route(self, request, view):
        from scheduler.policy.route import RouteDecision

        return RouteDecision(view.instances[0].instance_id)

    def on_routed(self, *a):
        pass

    def on_finished(self, *a):
        pass


def test_migration_moves_requests_and_loses_nothing() -> None:
    cfg = config(2, blocks=2000)
    w = skewed_workload()
    base = Simulator(cfg, router=AllToFirst()).run(w)
    sim = Simulator(cfg, router=AllToFirst(), migration=MoveOneFromBusiest(), migration_interval_s=0.05)
    res = sim.run(w)
    assert res.migrations > 0
    assert np.isfinite(res.finish_s).all() and np.isfinite(base.finish_s).all()
    moved = res.decode_instance >= 0  # last instance a migration put the request on
    assert 0 < moved.sum() <= res.migrations
    # spreading the load must shorten the run; each move paid a non-zero stop-and-copy
    assert res.finish_s.max() < base.finish_s.max()
    assert min(sim.migrations.downtime_s) > 0
    assert len(sim.migrations.downtime_s) == res.migrations + len(sim.migrations.in_flight)


class RecordsFinishes(AllToFirst):
    def __init__(self) -> None:
        self.finished_on: dict[str, str] = {}

    def on_finished(self, request_id, instance_id):
        self.finished_on[request_id] = instance_id


def test_router_hears_the_instance_a_migrated_request_finished_on() -> None:
    """The live ingress names the final holder in ``on_finished``; a migrated request's is its destination."""
    cfg = config(2, blocks=2000)
    router = RecordsFinishes()
    res = Simulator(cfg, router=router, migration=MoveOneFromBusiest(), migration_interval_s=0.05).run(
        skewed_workload())
    moved = np.flatnonzero(res.decode_instance >= 0)
    assert len(moved) > 0 and len(router.finished_on) == len(res.finish_s)
    for i in moved:  # (some move back to m-0 later)
        assert router.finished_on[str(i)] == res.instance_ids[res.decode_instance[i]]
    assert sum(router.finished_on[str(i)] != res.instance_ids[0] for i in moved) > 0
    stayed = np.flatnonzero(res.decode_instance < 0)
    assert all(router.finished_on[str(i)] == res.instance_ids[0] for i in stayed)


def test_llumnix_migration_cuts_preemptions_under_bursty_kv_tight_load() -> None:
    """The study behind docs/migration.md ("Simulated: migration on vs off"), one seed: Llama-2-7B on L4s (KV is
    the bottleneck), gamma CV 4 bursts, least-outstanding dispatch. The Llumnix policy rebalances KV (relative
    gap rule) and pays each move's staged copy; preemptions fall, nothing is lost, every move committed."""
    from scheduler.config.load import load_config
    from scheduler.policy.migration import make_migration_policy
    from sim.traces import LogNormal, synthetic

    base = load_config("default")
    cfg = base.model_copy(update={"pools": [p.model_copy(update={"gpu": "l4"}) for p in base.pools]})
    preempted = {"off": 0, "on": 0}
    for seed in (3, 4):  # one seed's count is chaotic (a visibility change moved seed 4 from 27 to 32)
        t = synthetic(1500, 0.3, arrival="gamma", cv=4.0, seed=seed,
                      prompt=LogNormal.from_p50_p90(1000, 3000, max=3500),
                      output=LogNormal.from_p50_p90(300, 900, max=1500))
        w = Workload.from_trace(t)
        off = Simulator(cfg, router="least_outstanding").run(w)
        sim = Simulator(cfg, router="least_outstanding", migration=make_migration_policy("llumnix"))
        on = sim.run(w)
        assert np.isfinite(on.finish_s).all() and np.isfinite(off.finish_s).all()
        assert on.migrations > 50 and sim.migrations.aborted_dst == 0
        # Staged: the stop-and-copy is the short part of a move.
        assert np.median(sim.migrations.total_s) > 10 * np.median(sim.migrations.downtime_s) > 0
        preempted["off"] += int(off.preemptions.sum())
        preempted["on"] += int(on.preemptions.sum())
    assert preempted["on"] < 0.75 * preempted["off"]  # 78 -> 51 (with a 0.5 low watermark: 78 -> 66)


class MoveAt:
    """Plans request 0 from the first instance to the second once, at ``t``; records the driver's hooks."""

    def __init__(self, t: float) -> None:
        self.t, self.done, self.hooks = t, False, []

    def plan(self, view: ClusterView, now_s: float) -> list[Plan]:
        if self.done or now_s < self.t:
            return []
        self.done = True
        return [Plan("0", view.instances[0].instance_id, view.instances[1].instance_id)]

    def on_migration_done(self, request_id: str, *, ok: bool) -> None:
        self.hooks.append(("done", request_id, ok))

    def on_migration_dropped(self, request_id: str) -> None:
        self.hooks.append(("dropped", request_id))


def test_a_move_at_any_moment_keeps_every_token_made_so_far() -> None:
    """The stop reads the request as it is: a span books its steps at its end, and a stop inside the span's last
    step took the request as it was at the span's start (the destination re-made ~300 tokens: 4.6 -> 9.1 s);
    a stop mid-step copied before the step made its token. One request, a move planned at 25 moments."""
    cfg = config(2, blocks=2000)
    w = Workload(np.array([0.0]), np.array([200]), np.array([300]))
    alone = Simulator(cfg, router=AllToFirst()).run(w).finish_s[0]
    for t in np.linspace(0.05, alone - 0.01, 25):
        pol = MoveAt(float(t))
        sim = Simulator(cfg, router=AllToFirst(), migration=pol, migration_interval_s=0.01)
        res = sim.run(w)
        if res.migrations:  # (a move too late to start is refused and dropped)
            assert pol.hooks == [("done", "0", True)]
            assert res.finish_s[0] <= alone + sim.migrations.total_s[0] + 0.05, t  # no token made twice
            assert res.first_token_s[0] < t < res.finish_s[0]
        else:
            assert pol.hooks in ([("dropped", "0")], [])


def test_a_move_to_an_instance_too_small_for_the_request_is_refused_not_a_crash() -> None:
    from scheduler.config.models import ClusterConfig, EngineSpec, PoolSpec
    from tests.test_engine_model import GPU, MODEL

    def eng(blocks: int) -> EngineSpec:
        return EngineSpec(block_size=16, max_num_batched_tokens=512, max_num_seqs=64, num_kv_blocks=blocks)

    cfg = ClusterConfig(gpus={"a100": GPU}, model=MODEL, pools=[
        PoolSpec(name="big", gpu="a100", count=1, engine=eng(2000)),
        PoolSpec(name="small", gpu="a100", count=1, engine=eng(40))])  # 640 tokens: the request needs 800
    pol = MoveAt(0.3)
    sim = Simulator(cfg, router=AllToFirst(), migration=pol, migration_interval_s=0.3)
    res = sim.run(Workload(np.array([0.0]), np.array([200]), np.array([600])))
    # A refused reservation is a failed migration, as the live ingress reports it (ABORTED_DST in HANDSHAKE).
    assert res.migrations == 0 and sim.migrations.aborted_dst == 1 and pol.hooks == [("done", "0", False)]
    assert np.isfinite(res.finish_s[0])
