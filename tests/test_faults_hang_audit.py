"""Regressions from an audit of live fault handling: hung instances (an actor that lives while its engine makes no
progress was never replaced; ``PoolSpec.hang_timeout_s`` is the watchdog's limit), broken instances released during
a scale-down, and a teardown or start-up that killed or leaked instances. Each failed before its fix, except the
guards of the new watchdog (idle time is no stall; the timeout is validated).

One Ray cluster and one deployment (2 MIXED simulated instances, ``hang_timeout_s`` 10, its minimum) for the module's
Ray tests; the hang is made inside the instance's actor (``__ray_call__``), so no test engine is needed. The others
run the ``Instance`` object, the Controller's applier or the Ingress over fakes, without Ray."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

ray = pytest.importorskip("ray")

from scheduler.config.models import ClusterConfig
from scheduler.control.cluster import deploy
from scheduler.control.instance import Instance
from scheduler.engine.base import EngineRequest, SamplingParams
from tests.test_control_plane import GPUS, MODEL, SIM, _check_exact, _collect, _req

HANG_S = 10.0  # the least a pool takes (UNHEALTHY_AFTER_S)


def hang_config(name: str, count: int) -> ClusterConfig:
    """``count`` MIXED simulated instances whose watchdog gives up after ``HANG_S`` without progress."""
    return ClusterConfig.model_validate(
        {
            "name": name,
            "gpus": GPUS,
            "model": MODEL,
            "pools": [
                {"name": "mixed", "role": "mixed", "gpu": "a100", "count": count, "hang_timeout_s": HANG_S}
            ],
        }
    )


@contextmanager
def hang_deployment(aloop: Any, cfg: ClusterConfig, **ingress_kw: Any) -> Iterator[tuple[Any, Any]]:
    """``cfg`` deployed on the running Ray cluster (simulated backend, 50 ms refresh) and a started ingress over it
    (``ingress_kw``): ``(deployment, ingress)``, both closed after. This module's and test_hang_quarantine_audit's."""
    dep = deploy(
        cfg,
        name=cfg.name,
        controller_name=f"llmsched-controller-{cfg.name}",
        backend_kwargs=SIM,
        refresh_s=0.05,
    )
    try:
        ing = dep.make_ingress(**ingress_kw)
        aloop.run(ing.start())
        try:
            yield dep, ing
        finally:
            aloop.run(ing.close())
    finally:
        dep.shutdown()


CFG = hang_config("hang", 2)


@pytest.fixture(scope="module")
def hang(local_ray: Any, aloop: Any) -> Iterator[tuple[Any, Any]]:
    with hang_deployment(aloop, CFG) as dep_ing:
        yield dep_ing


def _stop_engine_loop(inst: Instance) -> None:
    """The engine's step loop ends without an error (a worker that stopped): the actor and its stats answer."""
    task = inst._backend._task  # type: ignore[union-attr]
    task.get_loop().call_soon_threadsafe(task.cancel)


def _hang_in_a_step(inst: Instance) -> None:
    """A step that never returns (a deadlocked worker): it holds the step lock, so stats -- and snapshots -- wait
    on it too; polls still answer ("nothing yet")."""

    async def hold() -> None:
        async with inst._backend._step_lock:  # type: ignore[union-attr]
            await asyncio.sleep(3600)

    asyncio.run_coroutine_threadsafe(hold(), inst._backend._task.get_loop())  # type: ignore[union-attr]


def _members_after_replacing(dep: Any, gone: str, timeout_s: float = 30.0) -> list[str]:
    deadline = time.time() + timeout_s
    members: dict[str, Any] = {}
    while time.time() < deadline:
        members = ray.get(dep.controller.members.remote())
        if len(members) == CFG.pools[0].count and gone not in members:
            return sorted(members)
        time.sleep(0.2)
    pytest.fail(f"hung instance {gone} not replaced: members {sorted(members)}")


def _hang_mid_stream(hang: Any, aloop: Any, rid: str, make_hang: Any) -> tuple[float, str]:
    """Stream ``rid``; after 10 tokens hang its instance. Returns (seconds from the hang to the stream's end,
    the hung instance). The stream must come out exact: recovered elsewhere, not waiting for good."""
    _, ing = hang
    n = 300
    hung: list[tuple[str, float]] = []

    async def on_chunk(c: Any, out: list[Any]) -> None:
        if not hung and sum(len(x.token_ids) for x in out) >= 10:
            iid = ing.registry.get(rid).instances[0]
            hung.append(
                (iid, time.monotonic())
            )  # (before the call: its last progress is at most a step before)
            await ing._members[iid].handle.__ray_call__.remote(make_hang)

    chunks = aloop.run(_collect(ing, _req(rid, 200, n), on_chunk), timeout=HANG_S + 40)
    _check_exact(chunks, rid, n)
    assert hung and ing.counters["recoveries"] >= 1
    return time.monotonic() - hung[0][1], hung[0][0]


def test_an_engine_whose_step_loop_stopped_is_replaced_and_its_stream_recovered(
    hang: Any, aloop: Any
) -> None:
    """Before: the actor answered every snapshot and poll ("nothing yet"), so the stream waited for good and the
    Controller kept the instance as healthy capacity; now its snapshot turns unhealthy after ``hang_timeout_s``
    without progress, the Controller releases it (its stream ends "released" and is re-prefilled elsewhere) and
    a replacement starts."""
    took_s, iid = _hang_mid_stream(hang, aloop, "hang-loop", _stop_engine_loop)
    assert took_s >= HANG_S - 0.5  # not before the configured time
    _members_after_replacing(hang[0], iid)


def test_an_instance_whose_snapshots_hang_is_replaced_and_its_stream_recovered(hang: Any, aloop: Any) -> None:
    """A step that never ends holds the stats lock: snapshots time out (the ingresses route around it after 10 s)
    but polls answer. Before: the Controller marked it unhealthy and kept it for good (only a death or an engine
    error released an instance); its stream waited for good."""
    took_s, iid = _hang_mid_stream(hang, aloop, "hang-step", _hang_in_a_step)
    assert took_s >= HANG_S - 0.5
    _members_after_replacing(hang[0], iid)


def test_an_instance_idle_for_long_is_not_hung_when_work_arrives(no_ray: None) -> None:
    """The watchdog times work without progress, not time since the last token: an instance that sat idle past
    ``hang_timeout_s`` and then takes a request is healthy (no Ray: the Instance object over a simulated engine)."""
    pool = CFG.pools[0]

    async def scenario() -> tuple[bool, bool]:
        inst = Instance("mixed-0", pool, CFG.model, CFG.gpus[pool.gpu], backend_kwargs={"time_scale": 1.0})
        await inst.start()
        try:
            inst._progress_s -= 10 * HANG_S  # its last token long ago
            idle = (await inst.snapshot()).healthy
            await inst.submit(
                EngineRequest("late", tuple(range(1, 65)), SamplingParams(max_tokens=400)), wait_first=False
            )
            return idle, (await inst.snapshot()).healthy
        finally:
            await inst.shutdown()

    assert asyncio.run(asyncio.wait_for(scenario(), 30)) == (True, True)


@pytest.mark.parametrize("fault", ["hung", "engine_failed"])
def test_a_broken_instance_draining_for_a_scale_down_is_not_replaced(
    fault: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A scale-down 3 -> 2 drains mixed-2; it then hangs (its snapshot says unhealthy) or its engine fails. The
    Controller released it as broken with the pool's desired size still 3, so the reconcile loop started a
    replacement: the scale-down was undone (a death while draining was counted out; a broken release was not)."""
    import scheduler.control.controller as controller_mod
    from scheduler.core.types import InstanceRole, InstanceSnapshot
    from scheduler.policy.scaling import ScaleDecision
    from tests.test_controller_audit import FakeInstance, _controller

    class Broken(FakeInstance):
        async def _snapshot(self) -> InstanceSnapshot:
            if fault == "hung":
                return InstanceSnapshot(self.iid, InstanceRole.MIXED, num_running=1, healthy=False)
            raise ray.exceptions.RayTaskError("snapshot", "", RuntimeError("engine failed"))

    monkeypatch.setattr(controller_mod, "remove_instance_pg", lambda cluster, iid: False)
    ctrl = _controller([FakeInstance("mixed-0"), FakeInstance("mixed-1"), Broken("mixed-2")], {"mixed": 3})
    ctrl.cluster = "audit"

    async def run() -> None:
        await ctrl._apply_scale(ScaleDecision("mixed", target=2, reason="idle", drain=("mixed-2",)))
        assert list(ctrl._draining) == ["mixed-2"]
        ctrl._failing["mixed-2"] = time.monotonic() - 11.0  # failing past UNHEALTHY_AFTER_S (engine_failed)
        await ctrl._refresh()  # released as broken
        await ctrl._reconcile(wait=True)
        await ctrl._release_drained()

    asyncio.run(run())
    assert sorted(ctrl._members) == ["mixed-0", "mixed-1"] and not ctrl._pending
    assert ctrl._next_index["mixed"] == 3 and ctrl._desired["mixed"] == 2  # nothing started in its place


def test_a_request_paused_for_a_migration_is_no_stall(no_ray: None) -> None:
    """A source's request paused for a migration's stop-and-copy waits on its driver, not on the engine (a driver
    that died leaves it paused until ``lease_s``, 30 s). Counted as work without progress, an instance whose only
    request was paused past ``hang_timeout_s`` reported itself hung, and the Controller released a healthy
    instance; after a resume the watchdog times the engine again."""
    pool = CFG.pools[0]

    async def scenario() -> tuple[bool, bool, bool]:
        inst = Instance("mixed-0", pool, CFG.model, CFG.gpus[pool.gpu], backend_kwargs={"time_scale": 1.0})
        await inst.start()
        try:
            req = EngineRequest("moving", tuple(range(1, 65)), SamplingParams(max_tokens=400))
            assert (await inst.submit(req)).chunks  # decoding
            await inst.snapshot()  # (the watchdog has seen its prompt computed)
            assert not isinstance(await inst.migrate_stop("moving", 0), str)
            inst._progress_s -= 10 * HANG_S  # paused that long (the driving ingress died)
            paused = (await inst.snapshot()).healthy
            assert await inst.migrate_resume("moving")
            resumed = (await inst.snapshot()).healthy
            inst._progress_s -= 10 * HANG_S  # and now the engine stops making progress on it
            return paused, resumed, (await inst.snapshot()).healthy
        finally:
            await inst.shutdown()

    assert asyncio.run(asyncio.wait_for(scenario(), 30)) == (True, True, False)


def test_shutdown_calls_off_an_instance_still_being_placed(monkeypatch: pytest.MonkeyPatch) -> None:
    """``Controller.shutdown`` (a full teardown) awaited every instance still being created before releasing the
    live ones; one whose placement group never became ready (no node for it: a scale-up KubeRay cannot serve)
    held it for good, so ``Deployment.shutdown`` gave up at its timeout and killed the Controller, leaving every
    detached instance and placement group -- and their GPUs -- behind."""
    from ray.experimental import internal_kv

    from tests.test_controller_audit import FakeInstance, _controller

    monkeypatch.setattr(internal_kv, "_internal_kv_del", lambda *a, **kw: None)
    ctrl = _controller([FakeInstance("mixed-0")], {"mixed": 2})
    ctrl.cluster, ctrl.namespace = "audit", "llmsched"
    ctrl._loop_task = ctrl._scaling_task = None

    async def run() -> None:
        ctrl._pending["mixed-1"] = asyncio.create_task(asyncio.Event().wait())  # its pg.ready() never returns
        await asyncio.wait_for(ctrl.shutdown(), 5.0)

    asyncio.run(run())
    assert ctrl.killed == ["mixed-0"]  # type: ignore[attr-defined]


def test_an_adopted_instance_that_does_not_start_while_draining_for_a_scale_down_is_not_replaced() -> None:
    """The same for an instance a restarted Controller adopts and whose start fails: released for replacement
    with the scale-down's drain still on it, the reconcile loop undid the scale-down."""
    from tests.test_controller_audit import FakeInstance, _controller

    class NoStart(FakeInstance):
        async def _start(self) -> Any:
            raise RuntimeError("engine cannot start")

    ctrl = _controller([FakeInstance("mixed-0"), FakeInstance("mixed-1"), NoStart("mixed-2")], {"mixed": 3})
    ctrl._draining = {"mixed-2": (time.time() + 60, 0)}  # restored from Ray's KV after the restart
    ctrl._save_draining = lambda: None

    asyncio.run(ctrl._start_adopted("mixed-2"))
    assert ctrl.killed == ["mixed-2"]  # type: ignore[attr-defined]
    assert ctrl._desired["mixed"] == 2 and not ctrl._draining


def test_hang_timeout_is_validated_and_defaults_for_slow_cpu_steps() -> None:
    """Below the snapshot poll's and a CPU step's scale it would replace busy instances: refused, naming it."""
    pool = {"name": "mixed", "gpu": "a100", "hang_timeout_s": 2}
    with pytest.raises(ValueError, match=r"pools\.0\.hang_timeout_s"):
        ClusterConfig.model_validate({"gpus": GPUS, "model": MODEL, "pools": [pool]})
    default = ClusterConfig.model_validate(
        {"gpus": GPUS, "model": MODEL, "pools": [{"name": "m", "gpu": "a100"}]}
    )
    assert default.pools[0].hang_timeout_s == 60.0


def test_instance_health_is_false_for_a_hung_or_failed_engine(no_ray: None) -> None:
    """``Instance.health`` said True for every started instance: a hung engine, a failed one included."""
    pool = CFG.pools[0]

    async def scenario() -> list[bool]:
        inst = Instance("mixed-0", pool, CFG.model, CFG.gpus[pool.gpu], backend_kwargs={"time_scale": 1.0})
        await inst.start()
        try:
            out = [await inst.health()]
            await inst.submit(EngineRequest("r", tuple(range(1, 65)), SamplingParams(max_tokens=400)))
            await inst.snapshot()  # (the watchdog has seen its prompt computed)
            backend = inst._backend
            backend._task.cancel()  # type: ignore[union-attr]  # the step loop stops ...
            inst._progress_s -= 10 * HANG_S  # ... long ago
            out.append(await inst.health())
            backend._failed = "RuntimeError: device fault"  # type: ignore[union-attr]  # and its engine fails
            out.append(await inst.health())
            return out
        finally:
            await inst.shutdown()

    assert asyncio.run(asyncio.wait_for(scenario(), 30)) == [True, False, False]


def test_ready_past_its_timeout_keeps_the_instances_still_starting() -> None:
    """``Controller.ready`` (``deploy``, ``llmsched serve``) waited with ``wait_for`` on a gather of the creations:
    at its timeout (120 s by default; vLLM engines on new nodes take longer) the cancellation reached every
    creation in flight, and each killed its actor and removed its placement group -- the slow instances were
    destroyed and ``deploy`` raised. Now the creations go on, and ``ready`` answers with those running (``deploy``
    then warns "only N of M instances came up"; the others join as they start)."""
    from tests.test_controller_audit import FakeInstance, _controller, _member

    ctrl = _controller([FakeInstance("mixed-0")], {"mixed": 2})
    ctrl._refresh = lambda: asyncio.sleep(0)  # type: ignore[method-assign]
    cancelled: list[str] = []

    async def slow_create(pool: Any, iid: str) -> None:  # the engine takes a while to load
        try:
            await asyncio.sleep(0.5)
            ctrl._members[iid] = _member(FakeInstance(iid), pool.name)
        except asyncio.CancelledError:
            cancelled.append(iid)  # the real one kills the actor and removes its placement group here
            raise
        finally:
            ctrl._pending.pop(iid, None)

    ctrl._create = slow_create  # type: ignore[method-assign]

    async def run() -> tuple[list[str], list[str]]:
        up = sorted(await ctrl.ready(timeout_s=0.1))
        await asyncio.sleep(1.0)
        return up, sorted(ctrl._members)

    assert asyncio.run(run()) == (
        ["mixed-0"],
        ["mixed-0", "mixed-2"],
    )  # (the fake numbers from the pool size)
    assert cancelled == []


def test_shutdown_releases_unresponsive_instances_side_by_side(monkeypatch: pytest.MonkeyPatch) -> None:
    """A teardown released its instances one at a time, each waiting up to 5 s for ``Instance.shutdown``: with
    six hung instances it took past ``Deployment.shutdown``'s 30 s, which then killed the Controller and left the
    rest (detached) running on their GPUs."""
    from ray.experimental import internal_kv

    import scheduler.control.controller as controller_mod
    from tests.test_controller_audit import FakeInstance, _controller

    class Hung(FakeInstance):
        async def _shutdown(self) -> None:
            await asyncio.sleep(3600)

    killed: list[Any] = []
    monkeypatch.setattr(internal_kv, "_internal_kv_del", lambda *a, **kw: None)
    monkeypatch.setattr(controller_mod, "remove_instance_pg", lambda cluster, iid: False)
    monkeypatch.setattr(controller_mod.ray, "kill", lambda handle, no_restart=True: killed.append(handle.iid))
    ctrl = _controller([Hung(f"mixed-{i}") for i in range(8)], {"mixed": 8})
    del ctrl._release  # the real one: shuts the actor down (bounded), kills it, removes its group
    ctrl.cluster, ctrl.namespace = "audit", "llmsched"
    ctrl._loop_task = ctrl._scaling_task = None

    t0 = time.monotonic()
    asyncio.run(ctrl.shutdown())
    assert sorted(killed) == [f"mixed-{i}" for i in range(8)]
    assert time.monotonic() - t0 < 15.0  # one 5 s wait, not eight


def test_an_instance_that_said_it_is_hung_stays_out_when_its_snapshots_then_time_out() -> None:
    """The ingress keeps a slow instance's last snapshot for ``UNHEALTHY_AFTER_S``, but set it healthy from the
    timeout alone: an instance whose last answer said "hung" (the watchdog) was routed to again for 10 s once its
    snapshots began to time out -- a blocked actor with the Controller down, which would have released it."""
    from scheduler.core.types import InstanceRole, InstanceSnapshot
    from tests.test_ingress_audit import FakeInstance, _ingress

    S, T = FakeInstance("mixed-0"), FakeInstance("mixed-1")
    answers = [InstanceSnapshot("mixed-0", InstanceRole.MIXED, num_running=1, healthy=False)]

    async def snapshot() -> InstanceSnapshot:
        if answers:
            return answers.pop()
        await asyncio.sleep(3600)  # silent from here on
        raise AssertionError

    S._snapshot = snapshot  # type: ignore[method-assign]
    ing = _ingress([S, T])

    async def run() -> set[str]:
        await ing._refresh_view()  # "hung"
        await ing._refresh_view()  # times out (1 s)
        return {s.instance_id for s in ing.view().instances if s.accepting}

    assert asyncio.run(run()) == {"mixed-1"}
