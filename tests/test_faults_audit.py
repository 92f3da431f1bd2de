"""Regressions from an audit of failures in the live control plane (instances that stop answering, engines that
fail, a Controller that restarts). Each test reproduces one confirmed bug; no Ray unless the bug is in the Ray layer
(fake actor handles from ``tests/test_ingress_audit.py``, real ``Instance`` objects over the simulated backend)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from ray.exceptions import ActorDiedError, ActorUnavailableError

from scheduler.control.api import GenerateRequest
from scheduler.engine.base import SamplingParams, TokenChunk
from tests.test_controller_audit import FakeInstance as CtrlFakeInstance
from tests.test_controller_audit import _controller
from tests.test_ingress_audit import FakeInstance, _consume, _ingress


def _unavailable() -> ActorUnavailableError:
    return ActorUnavailableError("the actor is temporarily unavailable: RpcError", b"\x00" * 16)


# ---- 1: "temporarily unavailable" is not "dead" ------------------------------------------------------------------
def test_an_instance_ray_reports_unavailable_for_a_moment_is_routed_to_again() -> None:
    """Ray's ``ActorUnavailableError`` ("temporarily unavailable but may be available later") on one snapshot made
    the ingress mark the incarnation dead: this replica never routed to the live instance again, while the
    Controller kept it as a member (so it was never replaced either) -- the cluster lost it for good."""

    async def scenario() -> tuple[set[str], set[str]]:
        S, T = FakeInstance("mixed-0"), FakeInstance("mixed-1")
        ing = _ingress([S, T])
        orig, calls = S._snapshot, [0]

        async def snapshot() -> Any:
            calls[0] += 1
            if calls[0] == 1:
                raise _unavailable()
            return await orig()

        S._snapshot = snapshot  # type: ignore[method-assign]
        await ing._refresh_view()  # S does not answer this round
        await ing._refresh_view()  # ... and answers the next
        return set(ing._members), {s.instance_id for s in ing.view().instances if s.accepting}

    members, routable = asyncio.run(scenario())
    assert members == {"mixed-0", "mixed-1"}
    assert routable == {"mixed-0", "mixed-1"}


def test_a_stream_whose_instance_is_unavailable_recovers_and_the_instance_stays() -> None:
    """A poll answered with ``ActorUnavailableError`` recovered the request (right) but also blacklisted the
    instance for good; it should stay a member, and the copy it may still run be aborted there."""

    async def scenario() -> tuple[list[TokenChunk], FakeInstance, Any]:
        S, T = FakeInstance("mixed-0"), FakeInstance("mixed-1")
        ing = _ingress([S, T], routable=["mixed-0"])
        orig, polls = S._poll, [0]

        async def poll(rid: str, timeout: float, frm: int) -> TokenChunk | None:
            polls[0] += 1
            if polls[0] == 3:
                raise _unavailable()
            return await orig(rid, timeout, frm)

        S._poll = poll  # type: ignore[method-assign]
        # The recovery may go anywhere but S; T must be in the view for that.
        ing._view = type(ing._view)(0.0, ing._view.instances + (await T._snapshot(),))
        out: list[TokenChunk] = []
        await asyncio.wait_for(
            _consume(ing, GenerateRequest("u", prompt="hi", sampling=SamplingParams(max_tokens=8)), out), 5
        )
        await asyncio.sleep(0.05)  # the fire-and-forget abort lands
        return out, S, ing

    out, S, ing = asyncio.run(scenario())
    indices = [c.index + k for c in out for k in range(len(c.token_ids))]
    assert indices == list(range(8)) and out[-1].finish_reason == "length"
    assert out[-1].instance_id == "mixed-1"
    assert "mixed-0" in ing._members and not ing._dead
    assert "u" in S.aborted  # no orphan copy decoding on S until its lease


def test_the_controller_does_not_forget_an_instance_ray_reports_unavailable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The Controller forgot an instance on ``ActorUnavailableError`` and removed its placement group (which kills
    the live actor and every stream on it); only a confirmed death (``ActorDiedError``) should."""
    import scheduler.control.controller as controller_mod

    removed: list[str] = []
    monkeypatch.setattr(controller_mod, "remove_instance_pg", lambda cluster, iid: removed.append(iid))
    a, b = CtrlFakeInstance("mixed-0"), CtrlFakeInstance("mixed-1")
    ctrl = _controller([a, b], {"mixed": 2})
    ctrl.cluster = "c"

    def failing(exc: Exception) -> Any:
        async def snapshot(self: Any) -> Any:
            raise exc

        return snapshot

    async def scenario() -> None:
        monkeypatch.setattr(CtrlFakeInstance, "_snapshot", failing(_unavailable()))
        await ctrl._refresh()
        assert set(ctrl._members) == {"mixed-0", "mixed-1"} and not removed
        monkeypatch.setattr(CtrlFakeInstance, "_snapshot", failing(ActorDiedError()))
        await ctrl._refresh()

    asyncio.run(scenario())
    assert not ctrl._members and sorted(removed) == ["mixed-0", "mixed-1"]


# ---- 2: a Controller that died while creating an instance --------------------------------------------------------
def test_concurrent_starts_build_one_engine(monkeypatch: pytest.MonkeyPatch, no_ray: None) -> None:
    """Two ``start`` calls at once (a restarted Controller adopting an instance still starting) built two engines
    -- two vLLM engines do not fit one GPU -- and the second call answered before the channel was up."""
    from bench.loadgen import cluster_config
    from scheduler.control import instance as instance_mod
    from scheduler.control.instance import Instance

    built: list[Any] = []
    real = instance_mod.make_backend

    def make(kind: str, **kw: Any) -> Any:
        backend = real(kind, **kw)
        built.append(backend)
        fast = backend.start

        async def slow_start() -> None:  # an engine takes a while to load
            await asyncio.sleep(0.05)
            await fast()

        backend.start = slow_start
        return backend

    monkeypatch.setattr(instance_mod, "make_backend", make)
    cfg = cluster_config("starts", mixed=1)
    pool = cfg.pools[0]

    async def scenario() -> list[Any]:
        inst = Instance("mixed-0", pool, cfg.model, cfg.gpus[pool.gpu], backend_kwargs={"time_scale": 0.0})
        try:
            return list(await asyncio.gather(inst.start(), inst.start()))
        finally:
            await inst.shutdown()

    infos = asyncio.run(asyncio.wait_for(scenario(), 30))
    assert len(built) == 1
    assert all(i.channel for i in infos)


def test_an_instance_whose_creator_died_before_starting_it_is_started_on_adoption(ray_head: Any) -> None:
    """A Controller killed while an instance's actor was being constructed: its ``start`` call, buffered in the dead
    caller, never runs (checked on Ray 2.60: the detached actor comes up un-started). The restarted Controller
    adopted it from ``get_info`` and counted it in its pool, so it was never replaced -- yet every snapshot failed
    ("not started") and no ingress ever routed to it: a pool one instance short for good. Here the orphan is made
    directly (a named, detached Instance nobody started) and a Controller is deployed over it."""
    import ray

    from bench.loadgen import cluster_config
    from scheduler.control.cluster import deploy
    from scheduler.control.controller import NAMESPACE, instance_actor_name
    from scheduler.control.instance import Instance

    cfg = cluster_config("adopt", mixed=1)
    pool = cfg.pools[0]
    orphan = (
        ray.remote(Instance)
        .options(
            name=instance_actor_name("adopt", "mixed-0"),
            namespace=NAMESPACE,
            lifetime="detached",
            num_cpus=0,
            max_restarts=0,
            max_concurrency=1000,
        )
        .remote("mixed-0", pool, cfg.model, cfg.gpus[pool.gpu], backend_kwargs={"time_scale": 0.0})
    )
    # Constructed, never started:
    assert ray.get(orphan.get_info.remote(), timeout=60).instance_id == "mixed-0"
    dep = deploy(
        cfg,
        name="adopt",
        controller_name="llmsched-controller-adopt",
        backend_kwargs={"simulated": {"time_scale": 0.0}},
        refresh_s=0.05,
        ready_timeout_s=60,
    )
    ing = dep.make_ingress()

    async def scenario() -> list[TokenChunk]:
        await ing.start()
        try:
            for _ in range(200):  # the view shows an instance once one answers its snapshots
                if ing.view().instances:
                    break
                await asyncio.sleep(0.05)
            assert [s.instance_id for s in ing.view().instances] == ["mixed-0"], (
                "the adopted instance never serves"
            )
            out: list[TokenChunk] = []
            await _consume(
                ing, GenerateRequest("adopted-1", prompt="hello", sampling=SamplingParams(max_tokens=4)), out
            )
            return out
        finally:
            await ing.close()

    try:
        out = asyncio.run(asyncio.wait_for(scenario(), 60))
    finally:
        dep.shutdown()
    assert [c.index + k for c in out for k in range(len(c.token_ids))] == [0, 1, 2, 3]
    assert out[-1].finish_reason == "length"


def test_a_placement_group_left_without_its_instance_is_removed_on_restart(ray_head: Any) -> None:
    """A Controller killed between creating an instance's (detached, named) placement group and its actor -- e.g.
    while ``pg.ready()`` waits minutes for KubeRay to add a GPU node -- left the group behind: the restarted
    Controller adopts actors only, so the group held its GPUs (a pending one takes them when the node comes) for
    good. Groups of the cluster with no adopted instance are removed at adoption."""
    import ray
    from ray.util.placement_group import placement_group

    from bench.loadgen import cluster_config
    from scheduler.control.cluster import deploy
    from scheduler.control.placement import pg_name

    orphan = placement_group([{"CPU": 0.01}], name=pg_name("orphan", "mixed-3"), lifetime="detached")
    ray.get(orphan.ready(), timeout=60)
    dep = deploy(
        cluster_config("orphan", mixed=1),
        name="orphan",
        controller_name="llmsched-controller-orphan",
        backend_kwargs={"simulated": {"time_scale": 0.0}},
        refresh_s=0.05,
        ready_timeout_s=60,
    )
    try:
        states = {v["name"]: v["state"] for v in ray.util.placement_group_table().values()}
    finally:
        dep.shutdown()
    assert states[pg_name("orphan", "mixed-3")] == "REMOVED"
    assert states[pg_name("orphan", "mixed-0")] == "CREATED"  # the instance it placed


# ---- 3: an engine that fails ---------------------------------------------------------------------------------------
def _crash_after(inst: Any, steps: int) -> None:
    """Make the instance's simulated engine raise on its ``steps``-th step from now (a bug, a device fault)."""
    engine = inst._backend.engine
    real, n = engine.step, [0]

    def step(*a: Any, **kw: Any) -> Any:
        n[0] += 1
        if n[0] >= steps:
            raise RuntimeError("device fault")
        return real(*a, **kw)

    engine.step = step


def test_a_simulated_engine_whose_loop_fails_ends_its_streams_with_an_error(no_ray: None) -> None:
    """An exception in the simulated engine's loop ended the loop task silently: every stream on it waited forever
    (polls answered "nothing yet" every 5 s, so no ingress ever recovered or failed them) and new requests were
    accepted into the dead engine. Its streams must end with an error naming the fault, and the engine refuse work."""
    from bench.loadgen import cluster_config
    from scheduler.control.instance import Instance
    from scheduler.engine.base import EngineRequest

    cfg = cluster_config("crash", mixed=1)
    pool = cfg.pools[0]

    async def scenario() -> tuple[list[TokenChunk], list[Any]]:
        inst = Instance("mixed-0", pool, cfg.model, cfg.gpus[pool.gpu], backend_kwargs={"time_scale": 0.02})
        await inst.start()
        try:
            _crash_after(inst, 5)
            req = EngineRequest("c1", tuple(range(1, 65)), SamplingParams(max_tokens=1000, ignore_eos=True))
            sub = await inst.submit(req)
            out = list(sub.chunks)
            while not out[-1].finished:
                out.append(await inst.poll("c1", 1.0, out[-1].index + len(out[-1].token_ids)))
            errors = []
            for call in (
                inst.submit(EngineRequest("c2", (1, 2, 3), SamplingParams(max_tokens=4))),
                inst.snapshot(),
            ):
                try:
                    await call
                    errors.append(None)
                except RuntimeError as e:
                    errors.append(e)
            return out, errors
        finally:
            await inst.shutdown()

    out, errors = asyncio.run(asyncio.wait_for(scenario(), 20))
    assert out[-1].finish_reason is not None and out[-1].finish_reason.startswith("error:")
    assert "device fault" in out[-1].finish_reason
    # The dead engine takes nothing new and says why; its snapshot fails (routers stop sending it requests).
    assert all(e is not None and "device fault" in str(e) for e in errors), errors


def test_requests_sent_after_an_engine_failed_complete_elsewhere(no_ray: None) -> None:
    """After one instance's engine failed (its actor alive), the ingress kept its last snapshot as healthy for 10 s
    and kept routing to it; the submit then raised on the instance and the client got INTERNAL ("internal error
    (RemoteError)"), though a healthy instance was there. A snapshot that fails with an error (not a timeout) takes
    the instance out of the view, and a submit that raises is recovered on another instance."""
    from bench.loadgen import cluster_config
    from scheduler.engine.base import EngineRequest
    from tests.test_faults2_audit import _cluster_of, _teardown

    async def scenario() -> tuple[list[str | None], set[str]]:
        insts, ing = await _cluster_of(cluster_config("broken", mixed=2), 0.0)
        try:
            broken = insts["mixed-0"]._backend
            _crash_after(insts["mixed-0"], 1)
            async for c in broken.generate(EngineRequest("kill", (1, 2, 3), SamplingParams(max_tokens=4))):
                assert c.finish_reason is None or c.finish_reason.startswith("error:")
            reasons: list[str | None] = []
            for n in range(6):
                req = GenerateRequest(f"after-{n}", prompt="hello", sampling=SamplingParams(max_tokens=4))
                async for c in ing.generate(req):
                    if c.finished:
                        reasons.append(c.finish_reason)
            await asyncio.sleep(0.05)
            return reasons, {s.instance_id for s in ing.view().instances}
        finally:
            await _teardown(insts, ing)

    reasons, view = asyncio.run(asyncio.wait_for(scenario(), 30))
    assert reasons == ["length"] * 6
    assert view == {"mixed-1"}


def test_the_controller_replaces_an_instance_whose_engine_failed(monkeypatch: pytest.MonkeyPatch) -> None:
    """An instance whose snapshots fail with an error (its engine died: vLLM's EngineDeadError, the simulated
    engine's fault; the actor lives) was kept by the Controller for good -- only an actor death was ever replaced --
    so its pool stayed one instance short. It is released (and so replaced) once that lasts ``UNHEALTHY_AFTER_S``;
    a timeout (a busy instance) is not."""
    from ray.exceptions import RayTaskError

    import scheduler.control.controller as controller_mod

    monkeypatch.setattr(controller_mod, "UNHEALTHY_AFTER_S", 0.05, raising=False)
    a, b = CtrlFakeInstance("mixed-0"), CtrlFakeInstance("mixed-1")
    ctrl = _controller([a, b], {"mixed": 2})
    real = CtrlFakeInstance._snapshot

    async def snapshot(self: Any) -> Any:
        if self.iid == "mixed-0":
            raise RayTaskError("snapshot", "", RuntimeError("engine failed: RuntimeError: device fault"))
        if self.iid == "mixed-1":
            raise TimeoutError
        return await real(self)

    monkeypatch.setattr(CtrlFakeInstance, "_snapshot", snapshot)

    async def scenario() -> None:
        await ctrl._refresh()
        assert not ctrl.killed  # type: ignore[attr-defined]  # one failed snapshot is not a verdict
        await asyncio.sleep(0.1)
        await ctrl._refresh()

    asyncio.run(scenario())
    assert ctrl.killed == ["mixed-0"]  # type: ignore[attr-defined]
    assert set(ctrl._members) == {"mixed-1"}


def test_an_idle_vllm_engine_that_died_does_not_report_its_cached_idle_stats() -> None:
    """``VLLMBackend.stats`` answers an idle engine's report from a cache (each utility call wakes the engine core):
    an idle instance whose engine core died went on reporting itself idle and fit -- the least loaded instance, so the
    routers' favourite -- while every request sent there failed with EngineDeadError, and the Controller, seeing no
    failing snapshot, never replaced it."""
    from scheduler.engine.vllm_backend import VLLMBackend

    class DeadEngineError(RuntimeError):
        pass

    class Core:
        dead = False

        async def call_utility_async(self, name: str, *args: Any) -> Any:
            if self.dead:
                raise DeadEngineError("EngineCore encountered an issue")
            idle = dict.fromkeys(("num_running", "num_waiting", "kv_blocks_used", "num_preemptions"), 0)
            counts = dict.fromkeys(
                ("prompt_tokens_computed", "prompt_tokens_loaded", "prompt_tokens_adopted", "prompt_tokens_cached"), 0
            )
            return {
                **idle,
                **counts,
                "kv_blocks_total": 64,
                "block_size": 32,
                "requests": [],
                "prefill_tokens_pending": 0,
                "prefill_compute_tokens": None,
            }

    class Engine:
        def __init__(self) -> None:
            self.engine_core = Core()

        @property
        def errored(
            self,
        ) -> bool:  # AsyncLLM.errored: the engine core is dead (or the output handler stopped)
            return self.engine_core.dead

    backend = VLLMBackend.__new__(VLLMBackend)  # the stats path alone: no engine processes
    backend._engine, backend._idle_stats, backend._epoch = Engine(), None, 0
    backend._active, backend._incoming, backend._priority = {}, {}, {}
    backend._prefix = None  # KV cache events not followed

    async def scenario() -> None:
        assert (await backend.stats()).kv_blocks_total == 64  # idle: cached from here on
        backend._engine.engine_core.dead = True
        with pytest.raises(DeadEngineError):
            await backend.stats()

    asyncio.run(scenario())


def test_the_controllers_view_marks_a_silent_instance_unhealthy_until_it_answers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The Controller kept a silent (hung) instance's last snapshot, healthy, for good: the scaling policy counted it
    as capacity and the migration policy picked it as a destination, while every ingress routed around it. After
    ``UNHEALTHY_AFTER_S`` without an answer it is unhealthy in the Controller's view too, and healthy again when it
    answers."""
    import scheduler.control.controller as controller_mod

    monkeypatch.setattr(controller_mod, "UNHEALTHY_AFTER_S", 0.05, raising=False)
    ctrl = _controller([CtrlFakeInstance("mixed-0")], {"mixed": 1})
    real, silent = CtrlFakeInstance._snapshot, [False]

    async def snapshot(self: Any) -> Any:
        if silent[0]:
            raise TimeoutError
        return await real(self)

    monkeypatch.setattr(CtrlFakeInstance, "_snapshot", snapshot)

    async def scenario() -> list[bool]:
        seen = []
        await ctrl._refresh()
        seen.append(ctrl._snapshots["mixed-0"].healthy)
        silent[0] = True
        await ctrl._refresh()
        seen.append(ctrl._snapshots["mixed-0"].healthy)  # one slow answer: no verdict
        await asyncio.sleep(0.1)
        await ctrl._refresh()
        seen.append(ctrl._snapshots["mixed-0"].healthy)
        silent[0] = False
        await ctrl._refresh()
        seen.append(ctrl._snapshots["mixed-0"].healthy)
        return seen

    assert asyncio.run(scenario()) == [True, True, False, True]
    assert set(ctrl._members) == {"mixed-0"}  # silent is not dead: kept


# ---- 4: releasing an instance with requests in flight ---------------------------------------------------------------
def test_streams_on_a_released_instance_continue_elsewhere(no_ray: None) -> None:
    """Releasing an instance that still runs requests (a drain that could not move them all: its comment says
    "a request still there is recovered elsewhere by re-prefill"; a scale-down past ``drain_timeout_s``; an admin
    Scale down) calls ``Instance.shutdown``, which aborted every stream: the client's stream ended "abort"
    (CANCELLED) half-way, though nobody cancelled it. They must continue on another instance."""
    from bench.loadgen import cluster_config
    from tests.test_faults2_audit import _cluster_of, _teardown

    async def scenario() -> list[TokenChunk]:
        insts, ing = await _cluster_of(cluster_config("release", mixed=2), 1.0)
        out: list[TokenChunk] = []
        try:
            req = GenerateRequest(
                "rel", prompt="hello", sampling=SamplingParams(max_tokens=60, ignore_eos=True)
            )
            task = asyncio.create_task(_consume(ing, req, out))
            while sum(len(c.token_ids) for c in out) < 5:
                await asyncio.sleep(0.005)
            await insts[
                ing.registry.get("rel").instances[0]
            ].shutdown()  # Controller._release, before ray.kill
            await asyncio.wait_for(task, 20)
            return out
        finally:
            await _teardown(insts, ing)

    out = asyncio.run(asyncio.wait_for(scenario(), 40))
    assert out[-1].finish_reason == "length"
    assert [c.index + k for c in out for k in range(len(c.token_ids))] == list(range(60))


# ---- 5: a client's retry with the same request id ------------------------------------------------------------------
def test_a_retry_after_the_client_left_is_not_refused_as_already_running(no_ray: None) -> None:
    """The client's connection drops mid-stream; the ingress aborts the request on its instance and stops polling it;
    the SDK retries with the same request id (UNAVAILABLE is retried, same id). The instance kept the ended stream
    until its lease (30 s) and refused the retry as "request_id ... is already running": INVALID_ARGUMENT, not
    retried, for a request that had been accepted."""
    from bench.loadgen import cluster_config
    from scheduler.control.api import InvalidRequest
    from tests.test_faults2_audit import _cluster_of, _teardown

    async def scenario() -> list[TokenChunk] | InvalidRequest:
        insts, ing = await _cluster_of(cluster_config("retry", mixed=1), 1.0)
        try:
            req = GenerateRequest(
                "again", prompt="hello", sampling=SamplingParams(max_tokens=30, ignore_eos=True)
            )
            stream = ing.generate(req)
            async for c in stream:
                if c.index + len(c.token_ids) >= 3:
                    break
            await stream.aclose()  # the client went away: the server closes the stream
            await asyncio.sleep(0.2)  # the abort landed; the ended stream waits for a poll that never comes
            out: list[TokenChunk] = []
            try:
                await _consume(ing, req, out)  # the SDK's retry, same id
            except InvalidRequest as e:
                return e
            return out
        finally:
            await _teardown(insts, ing)

    out = asyncio.run(asyncio.wait_for(scenario(), 30))
    assert not isinstance(out, InvalidRequest), out
    assert out[-1].finish_reason == "length"
    assert [c.index + k for c in out for k in range(len(c.token_ids))] == list(range(30))


def test_a_retry_that_meets_its_dead_replicas_copy_runs_elsewhere(no_ray: None) -> None:
    """The ingress (gRPC server) serving a request dies; its copy keeps running on the instance until the lease
    (30 s). The SDK retries with the same id on another replica; routed to that instance, the submit was refused as
    "request_id ... is already running" and the retry failed with INVALID_ARGUMENT. Not the client's error: the
    request runs on another instance (the orphan is reaped at its lease)."""
    from bench.loadgen import cluster_config
    from scheduler.control.api import InvalidRequest
    from scheduler.engine.base import EngineRequest
    from scheduler.policy.route import RoundRobinRouter
    from tests.test_faults2_audit import _cluster_of, _teardown

    async def scenario() -> list[TokenChunk] | InvalidRequest:
        insts, ing = await _cluster_of(cluster_config("orphan-copy", mixed=2), 1.0, router=RoundRobinRouter())
        # The dead replica's copy, on the instance the round-robin router picks first.
        await insts["mixed-0"].submit(
            EngineRequest("dup", (1, 2, 3), SamplingParams(max_tokens=500, ignore_eos=True))
        )
        out: list[TokenChunk] = []
        try:
            req = GenerateRequest(
                "dup", prompt="hello", sampling=SamplingParams(max_tokens=10, ignore_eos=True)
            )
            try:
                await _consume(ing, req, out)
            except InvalidRequest as e:
                return e
            return out
        finally:
            await _teardown(insts, ing)

    out = asyncio.run(asyncio.wait_for(scenario(), 30))
    assert not isinstance(out, InvalidRequest), out
    assert out[-1].finish_reason == "length" and out[-1].instance_id == "mixed-1"
    assert [c.index + k for c in out for k in range(len(c.token_ids))] == list(range(10))


# ---- 6: two failures in one P->D hand-off ---------------------------------------------------------------------------
def test_a_decode_instance_dying_during_the_resubmit_without_kv_is_recovered() -> None:
    """P->D: the KV source died (the decode submit fails resolving its KV), so the ingress resubmits without KV --
    and the decode instance dies during that resubmit. That call sat outside the ``try`` that maps deaths to
    ``InstanceLost``: ``RayActorError`` escaped ``Ingress.generate`` (gRPC INTERNAL). It is recovered like any death."""
    from ray.exceptions import RayTaskError

    from scheduler.core.types import InstanceRole

    P = FakeInstance("prefill-0", InstanceRole.PREFILL)
    D1, D2 = FakeInstance("decode-0", InstanceRole.DECODE), FakeInstance("decode-1", InstanceRole.DECODE)
    failed: list[str] = []

    def dies_once(inst: FakeInstance) -> None:
        orig = inst._submit

        async def submit(req: Any, kv: Any = None, **kw: Any) -> Any:
            if not failed and kv is not None:  # the KV's source died ...
                raise RayTaskError("submit", "", ActorDiedError())
            if failed == [inst.iid]:  # ... and this instance dies before the resubmit lands
                raise ActorDiedError()
            return await orig(req, kv, **kw)

        async def first(req: Any, kv: Any = None, **kw: Any) -> Any:
            try:
                return await submit(req, kv, **kw)
            except RayTaskError:
                failed.append(inst.iid)
                raise

        inst._submit = first  # type: ignore[method-assign]

    dies_once(D1)
    dies_once(D2)

    async def scenario() -> list[TokenChunk]:
        ing = _ingress([P, D1, D2])
        out: list[TokenChunk] = []
        await asyncio.wait_for(
            _consume(ing, GenerateRequest("pd", prompt="hi", sampling=SamplingParams(max_tokens=6)), out), 5
        )
        return out

    out = asyncio.run(scenario())
    assert len(failed) == 1
    assert [c.index + k for c in out for k in range(len(c.token_ids))] == list(range(6))
    assert out[-1].finish_reason == "length" and out[-1].instance_id != failed[0]


# ---- 7: ids after a Controller restart ------------------------------------------------------------------------------
def test_a_replacement_made_after_a_controller_restart_gets_a_new_id(ray_head: Any) -> None:
    """The restarted Controller rebuilt its id counter from the instances it adopted: an instance that died while it
    was down was replaced under the dead one's id, so id-keyed state (the prefix-affinity router's LRU, migration
    cooldowns, metrics series, ingress health timestamps) carried over to a fresh, empty instance. The docs promise
    a new id; the counter now lives in Ray's KV with the desired sizes."""
    import ray

    from bench.loadgen import cluster_config
    from scheduler.control.cluster import deploy

    dep = deploy(
        cluster_config("ids", mixed=1),
        name="ids",
        controller_name="llmsched-controller-ids",
        backend_kwargs={"simulated": {"time_scale": 0.0}},
        refresh_s=30.0,  # the first Controller never notices the death below: its successor replaces the instance
        ready_timeout_s=60,
    )
    try:
        assert list(dep.instances) == ["mixed-0"]
        victim = ray.get(dep.controller.members.remote(), timeout=30)["mixed-0"].handle
        ray.kill(victim, no_restart=True)
        ray.kill(dep.controller, no_restart=False)  # Ray restarts it (max_restarts=-1)
        after = None
        for _ in range(60):
            try:
                after = ray.get(dep.controller.ready.remote(30.0), timeout=40)
                break
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                time.sleep(0.5)
    finally:
        dep.shutdown()
    assert after is not None and list(after) == ["mixed-1"]


# ---- 8: an instance that hangs on a submit ---------------------------------------------------------------------------
def test_a_submit_that_never_answers_is_recovered_elsewhere() -> None:
    """The poll had a deadline (``poll_timeout_s`` + 5 s) but the submit none: an instance whose event loop hangs
    (a blocking call in it) held every request routed to it for good -- the client's stream never got a token, an
    error or a recovery. ``Instance.submit`` answers within ``lease_s / 2``; no answer in ``submit_timeout_s`` is an
    unresponsive instance (recovered elsewhere, as a poll timeout is)."""
    S, T = FakeInstance("mixed-0"), FakeInstance("mixed-1")

    async def hang(req: Any, kv: Any = None, **kw: Any) -> Any:
        await asyncio.sleep(3600)

    S._submit = hang  # type: ignore[method-assign]

    async def scenario() -> list[TokenChunk]:
        ing = _ingress([S, T], routable=["mixed-0"])
        ing.submit_timeout_s = 0.2
        ing._view = type(ing._view)(0.0, ing._view.instances + (await T._snapshot(),))
        out: list[TokenChunk] = []
        await asyncio.wait_for(
            _consume(ing, GenerateRequest("h", prompt="hi", sampling=SamplingParams(max_tokens=5)), out), 5
        )
        return out

    out = asyncio.run(scenario())
    assert [c.index + k for c in out for k in range(len(c.token_ids))] == list(range(5))
    assert out[-1].finish_reason == "length" and out[-1].instance_id == "mixed-1"


def test_cancel_does_not_hang_on_an_instance_that_does_not_answer() -> None:
    """``Ingress.cancel`` awaited each instance's ``abort`` with no deadline: with the request's instance hung, the
    client's Cancel RPC hung with it (and the abort of a migration destination after it never ran). The stream
    itself is flagged cancelled first, so it ends as an abort however the instance answers."""
    S = FakeInstance("mixed-0")

    async def hang(rid: str) -> bool:
        await asyncio.sleep(3600)
        return True

    async def scenario() -> bool:
        ing = _ingress([S])
        out: list[TokenChunk] = []
        task = asyncio.create_task(
            _consume(ing, GenerateRequest("c", prompt="hi", sampling=SamplingParams(max_tokens=500)), out)
        )
        while len(out) < 2:
            await asyncio.sleep(0.005)
        S._abort = hang  # type: ignore[method-assign]  # the instance stops answering
        try:
            return await asyncio.wait_for(ing.cancel("c"), 5)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    assert asyncio.run(scenario()) is True
