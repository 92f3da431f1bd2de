"""Regressions from an audit of the KV handoff between the two clocks (live migration vs the simulator's); each
test failed before its fix."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from bench.loadgen import cluster_config
from scheduler.control.api import GenerateRequest
from scheduler.control.instance import Instance
from scheduler.engine.base import SamplingParams
from tests.test_migration_audit import Handle, make_ingress, set_routable, until


# ---- 1: a request whose whole context (prompt + max_tokens) can never fit on the destination was accepted at the
# live handshake (the reservation only covers context + headroom): the move paused it for the stop-and-copy and
# failed at commit ("prompt_tokens+max_tokens ... need N KV blocks"), downtime paid for nothing. The simulator (and
# Llumnix, whose handshake reserves the blocks) refuse it up front.
async def _instances(blocks: tuple[int | None, ...]) -> list[Instance]:
    cfg = cluster_config("handoff", mixed=len(blocks))
    pool = cfg.pools[0]
    out = []
    for i, n in enumerate(blocks):
        kw: dict[str, Any] = {"time_scale": 0.2}
        if n is not None:
            kw["num_blocks"] = n
        inst = Instance(f"mixed-{i}", pool, cfg.model, cfg.gpus[pool.gpu], backend_kwargs=kw)
        await inst.start()
        out.append(inst)
    return out


def _streaming(ing: Any, out: list[Any], *, max_tokens: int) -> asyncio.Task:
    """Stream request "r" (a 99-token prompt) through ``ing`` into ``out``, in a task."""

    async def consume() -> None:
        sampling = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
        async for c in ing.generate(GenerateRequest("r", prompt_token_ids=list(range(1, 100)), sampling=sampling)):
            out.append(c)

    return asyncio.create_task(consume())


@pytest.mark.usefixtures("no_ray")
def test_live_handshake_refuses_a_request_whose_whole_context_cannot_fit() -> None:
    async def scenario() -> tuple[Any, list[str], int]:
        S_inst, D_inst = await _instances((None, 40))  # the destination holds 40 blocks: 640 tokens
        S, D = Handle(S_inst), Handle(D_inst)
        ing = make_ingress([S, D], routable=["mixed-0"])
        out: list[Any] = []

        t = _streaming(ing, out, max_tokens=1000)
        try:
            await until(lambda: len(out) >= 2)
            set_routable(ing, ["mixed-0", "mixed-1"])
            res = await ing.migrate("r", "mixed-1")
            return res, list(S.calls), sum(len(c.token_ids) for c in out)
        finally:
            t.cancel()
            for i in (S_inst, D_inst):
                await i.shutdown()

    res, calls, _ = asyncio.run(scenario())
    assert not res.committed
    assert "HANDSHAKE" in res.reason and "migrate_stop" not in calls, (
        f"the request was paused for a move its destination could never hold: {res.reason}"
    )


def _two_pools(first: tuple[str, int], second: tuple[str, int], **kw: Any) -> Any:
    """A one-instance pool each, ``(name, KV blocks)``, of the engine-model tests' A100 / model."""
    from scheduler.config.models import ClusterConfig, EngineSpec, PoolSpec
    from tests.test_engine_model import GPU, MODEL

    def pool(name: str, blocks: int) -> PoolSpec:
        engine = EngineSpec(block_size=16, max_num_batched_tokens=512, max_num_seqs=64, num_kv_blocks=blocks)
        return PoolSpec(name=name, gpu="a100", count=1, engine=engine)

    return ClusterConfig(gpus={"a100": GPU}, model=MODEL, pools=[pool(*first), pool(*second)], **kw)


def test_simulator_refuses_the_same_move_at_handshake() -> None:
    """The other clock, same numbers: the simulator's driver refuses it at the handshake (no stop, no downtime)."""
    import numpy as np

    from sim.simulator import Simulator, Workload
    from tests.test_sim_migration import AllToFirst, MoveAt

    cfg = _two_pools(("big", 2000), ("small", 40))
    pol = MoveAt(0.3)
    sim = Simulator(cfg, router=AllToFirst(), migration=pol, migration_interval_s=0.3)
    res = sim.run(Workload(np.array([0.0]), np.array([99]), np.array([1000])))
    assert res.migrations == 0 and sim.migrations.aborted_dst == 1 and not sim.migrations.downtime_s


# ---- 2: the simulator queued a request migrated in during a step at the END of the destination's pre-step snapshot
# (``_queue_on_snapshot``), though the engine puts it at the FRONT of its queue (``front=True``, as vLLM prepends
# it): until the step ended, the migration policy's defrag read another prompt as that queue's head.
class _SplitRouter:
    """Request 0 on the first instance, every other one on the second (which builds a queue)."""

    name = "split"
    needs_request_detail = True

    def route(self, request, view):
        from scheduler.policy.route import RouteDecision

        return RouteDecision(view.instances[0 if request.request_id == "0" else 1].instance_id)

    def on_routed(self, *a: Any) -> None:
        pass

    def on_finished(self, *a: Any) -> None:
        pass


def test_simulator_queues_a_request_migrated_in_mid_step_at_the_head_of_the_snapshot(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import numpy as np

    from sim.migration import MigrationDriver
    from sim.simulator import Simulator, Workload
    from tests.test_engine_model import config
    from tests.test_sim_migration import MoveAt

    n = 40
    w = Workload(
        np.linspace(0.0, 0.4, n), np.array([200] + [400] * (n - 1)), np.array([400] + [200] * (n - 1))
    )
    sim = Simulator(
        config(2, blocks=2000), router=_SplitRouter(), migration=MoveAt(0.3), migration_interval_s=0.3
    )
    seen: list[tuple[Any, ...]] = []
    commit = MigrationDriver.on_commit

    def on_commit(drv: MigrationDriver, payload: tuple, now: float) -> None:
        dst = drv.in_flight[payload[0]].dst
        mid_step = dst.in_step is not None
        commit(drv, payload, now)
        snap = dst.snapshot
        listed = snap.num_waiting - snap.num_incoming
        queued = [r.request_id for r in snap.requests if r.in_prefill]
        seen.append((mid_step, (queued[-listed:] if listed else [None])[0], dst.engine.waiting[0].rid))

    monkeypatch.setattr(MigrationDriver, "on_commit", on_commit)
    sim.run(w)
    assert seen and seen[0][0], f"the commit did not land mid-step with a queue on the destination: {seen}"
    _, snap_head, engine_head = seen[0]
    assert snap_head == engine_head == 0, (
        f"the snapshot's queue head is {snap_head}, the engine's {engine_head}"
    )


# ---- 3: the observed arrival rate's span: the simulator divided by min(window, now), the live Controller by
# min(window, max(elapsed, 1 s)): with a decision interval under 1 s the two clocks read the same arrivals as
# different rates (twice as many at 0.5 s).
class _Records:
    def __init__(self) -> None:
        self.seen: list[tuple[float, float]] = []

    def pool_of(self, snap: Any) -> str:
        return "m"

    def decide(self, view: Any, now_s: float, observed: Any) -> list[Any]:
        self.seen.append((now_s, observed.rate_rps))
        return []


def test_both_clocks_read_the_same_arrival_rate_early_in_a_window() -> None:
    import numpy as np

    from scheduler.control.controller_scaling import _WorkloadWindow
    from scheduler.core.types import InstanceRole, InstanceSnapshot, RequestLoad
    from sim.simulator import Simulator, Workload
    from tests.test_engine_model import config
    from tests.test_sim_migration import AllToFirst

    pol = _Records()
    sim = Simulator(config(1, blocks=2000), router=AllToFirst(), scaling=pol, scaling_interval_s=0.5)
    sim.run(Workload(np.array([0.1, 0.2]), np.array([100, 100]), np.array([400, 400])))
    now, sim_rate = pol.seen[0]
    assert now == 0.5

    live = _WorkloadWindow(sim.scaler.window_s)  # type: ignore[union-attr]
    live.observe(0.0, [], {})  # the Controller's first look, before the two arrivals
    loads = tuple(RequestLoad(r, 100, 0, in_prefill=True) for r in ("0", "1"))
    live.observe(0.5, [InstanceSnapshot("m-0", InstanceRole.MIXED, requests=loads)], {})
    assert sim_rate == live.summary(0.5).rate_rps, (
        f"simulated {sim_rate} req/s, live {live.summary(0.5).rate_rps}"
    )


# ---- 5: the simulator freed a migrating request's KV on its source at the stop; live, the paused request keeps its
# blocks there until the destination committed (``pause`` holds them, ``migrate_release`` frees them; Llumnix frees
# the source after the commit too). A prompt queued on the source for those blocks started a whole stop-and-copy
# earlier in the simulator.
def test_simulator_holds_the_source_kv_until_the_commit() -> None:
    import numpy as np

    from sim.simulator import Simulator, Workload
    from tests.test_sim_migration import AllToFirst, MoveAt

    cfg = _two_pools(("src", 110), ("dst", 2000),
                     policies={"migration": {"name": "llumnix", "params": {"protocol": {"mode": "blocking"}}}})
    sim = Simulator(cfg, router=AllToFirst(), migration=MoveAt(0.5), migration_interval_s=0.5)
    # Request 0 (1200-token prompt) decodes on src; request 1 (800) waits there for its blocks.
    sim.run(Workload(np.array([0.0, 0.2]), np.array([1200, 800]), np.array([300, 10])))
    assert sim.migrations.committed == 1  # type: ignore[union-attr]
    stop = sim.migrations.total_s[0] - sim.migrations.downtime_s[0]  # type: ignore[union-attr]
    commit = 0.5 + sim.migrations.total_s[0]  # type: ignore[union-attr]
    assert sim.admit[1] >= commit - 1e-9, (
        f"request 1 took the migrating request's blocks at {sim.admit[1]:.4f} s, before the commit at "
        f"{commit:.4f} s (stop ~{0.5 + stop:.4f} s)"
    )


# ---- 6: a plan onto a draining destination: live, ``Instance.migrate_reserve`` refuses it at the handshake ("is
# draining": a failed migration); the simulator's driver reserved there and moved the request onto an instance on
# its way out (the shipped policies filter draining destinations; a custom one need not).
def test_simulator_refuses_a_move_onto_a_draining_destination_as_live() -> None:
    import numpy as np

    from sim.simulator import Simulator, Workload
    from tests.test_engine_model import config
    from tests.test_sim_migration import AllToFirst, MoveAt

    pol = MoveAt(0.3)
    sim = Simulator(config(2, blocks=2000), router=AllToFirst(), migration=pol, migration_interval_s=0.3)
    sim.instances[1].draining = True
    res = sim.run(Workload(np.array([0.0]), np.array([200]), np.array([400])))
    assert res.migrations == 0 and pol.hooks == [("done", "0", False)], (res.migrations, pol.hooks)


# ---- 7: a migration cancelled (an admin RPC's deadline, a cancelled drain; or its commit step timed out) just after
# its stop was sent: the driver's undo sends ``migrate_resume`` while the source's ``pause`` still waits for the step
# in flight to end (the simulated backend's step lock). The resume found nothing paused and returned; the pause then
# paused the request for good -- the ingress kept polling a stream that never moved again.
@pytest.mark.usefixtures("no_ray")
def test_a_migration_cancelled_while_its_stop_waits_for_the_step_resumes_the_source() -> None:
    async def scenario() -> tuple[bool, list[Any], list[str]]:
        S_inst, D_inst = await _instances((None, None))
        S, D = Handle(S_inst), Handle(D_inst)
        order: list[str] = []

        backend = S_inst._backend
        pause = backend.pause  # type: ignore[union-attr]

        async def pause_after_the_step(*a: Any) -> Any:
            await asyncio.sleep(0.3)  # waits for a long step in flight to end (its step lock)
            res = await pause(*a)
            order.append("paused")
            return res

        backend.pause = pause_after_the_step  # type: ignore[union-attr]

        async def stop(fn: Any, *a: Any, **kw: Any) -> Any:
            # A Ray actor task runs to its end whatever its caller does (the fake handle's future would be cancelled).
            return await asyncio.shield(asyncio.ensure_future(fn(*a, **kw)))

        async def resume(fn: Any, *a: Any, **kw: Any) -> Any:
            res = await fn(*a, **kw)
            order.append(f"resumed={res}")
            return res

        S.hooks.update(migrate_stop=stop, migrate_resume=resume)
        ing = make_ingress([S, D], routable=["mixed-0"])
        out: list[Any] = []

        t = _streaming(ing, out, max_tokens=200)
        try:
            await until(lambda: len(out) >= 2)
            set_routable(ing, ["mixed-0", "mixed-1"])
            mig = asyncio.create_task(ing.migrate("r", "mixed-1", mode="blocking"))
            await until(lambda: "migrate_stop" in S.calls)  # the stop is on its way: cancel now
            mig.cancel()
            try:
                await mig
            except asyncio.CancelledError:
                pass
            try:
                await asyncio.wait_for(asyncio.shield(t), 10.0)
                done = True
            except TimeoutError:
                done = False
            return done, out, order
        finally:
            t.cancel()
            for i in (S_inst, D_inst):
                await i.shutdown()

    done, out, order = asyncio.run(scenario())
    n = sum(len(c.token_ids) for c in out)
    assert done and n == 200, f"the client's stream stalled at {n} tokens: the source stayed paused ({order})"
