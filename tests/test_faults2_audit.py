"""Regressions from the second audit of live fault handling (engines that fail mid-stream, instances that never
finish starting, admin drains of a blocked instance, cancels on a failed engine). Each test failed before its fix.
No Ray: real ``Instance`` objects over the simulated backend behind in-process handles (``tests/test_chaos.py``),
and the Controller fakes of ``tests/test_controller_audit.py``."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from scheduler.control.api import GenerateRequest
from scheduler.engine.base import EngineRequest, SamplingParams, TokenChunk
from tests.test_faults_audit import _crash_after
from tests.test_ingress_audit import _consume

pytestmark = pytest.mark.usefixtures("no_ray")  # tests/conftest.py: Instance objects here, no Ray node


async def _cluster(name: str, n: int, time_scale: float, **kw: Any) -> tuple[dict[str, Any], Any]:
    """``n`` MIXED simulated instances and an ingress over them (``_cluster_of``)."""
    from bench.loadgen import cluster_config

    return await _cluster_of(cluster_config(name, mixed=n), time_scale, **kw)


async def _cluster_of(
    cfg: Any, time_scale: float, *, lease_s: float | None = None, **ingress_kw: Any
) -> tuple[dict[str, Any], Any]:
    """Every pool's instances of ``cfg`` (``<pool>-<k>``, simulated at ``time_scale``; poll lease ``lease_s`` if
    given) and an ingress over them (in-process handles, direct channels unless ``ingress_kw`` says otherwise)."""
    from scheduler.control.controller import Member
    from scheduler.control.ingress import Ingress
    from scheduler.control.instance import Instance
    from tests.test_chaos import _Controller, _Handle

    lease = {} if lease_s is None else {"lease_s": lease_s}
    insts = {
        f"{pool.name}-{k}": Instance(
            f"{pool.name}-{k}", pool, cfg.model, cfg.gpus[pool.gpu], backend_kwargs={"time_scale": time_scale},
            **lease,
        )
        for pool in cfg.pools
        for k in range(pool.count)
    }
    members = {iid: Member(_Handle(i), await i.start()) for iid, i in insts.items()}
    ing = Ingress(cfg, _Handle(_Controller(members)), refresh_s=0.01, **ingress_kw)
    await ing.start()
    return insts, ing


async def _teardown(insts: dict[str, Any], ing: Any) -> None:
    await ing.close()
    for i in insts.values():
        await i.shutdown()


# ---- 1: an engine that fails mid-stream ------------------------------------------------------------------------------
def test_a_stream_whose_engine_fails_continues_elsewhere() -> None:
    """A stream whose instance's engine failed under it ended ``error: engine failed: ...`` (FAILED at the client),
    while a dead, released or hung instance's streams are re-prefilled elsewhere -- though the failed instance is
    released and replaced all the same. It must continue on the other instance at the next index, each index once,
    with the tokens the request's context gives (the simulated token is a function of (seed, request, index))."""
    from scheduler.engine.simulated_backend import sim_token

    vocab = 0

    async def scenario() -> tuple[list[TokenChunk], int]:
        nonlocal vocab
        insts, ing = await _cluster("engine-fails", 2, 1.0)
        vocab = ing.config.model.vocab_size
        out: list[TokenChunk] = []
        try:
            req = GenerateRequest(
                "ef", prompt="hello", sampling=SamplingParams(max_tokens=60, ignore_eos=True)
            )
            task = asyncio.create_task(_consume(ing, req, out))
            while sum(len(c.token_ids) for c in out) < 5:
                await asyncio.sleep(0.005)
            _crash_after(insts[ing.registry.get("ef").instances[0]], 1)
            await asyncio.wait_for(task, 20)
            return out, ing.counters["recoveries"]
        finally:
            await _teardown(insts, ing)

    out, recoveries = asyncio.run(asyncio.wait_for(scenario(), 40))
    assert out[-1].finish_reason == "length", out[-1]
    assert [c.index + k for c in out for k in range(len(c.token_ids))] == list(range(60))
    assert [t for c in out for t in c.token_ids] == [sim_token(0, "ef", i, vocab) for i in range(60)]
    assert recoveries == 1
    assert len({c.instance_id for c in out if c.token_ids}) == 2


def test_recovering_from_engine_failures_is_bounded_by_max_recoveries() -> None:
    """A guard of the recovery above: a request whose engines keep failing under it (it may be what kills them) is
    re-run at most ``max_recoveries`` times, as a request whose instances keep dying; then UNAVAILABLE."""
    from scheduler.control.api import Unavailable

    async def scenario() -> BaseException | None:
        insts, ing = await _cluster("engine-fails-bound", 2, 1.0, max_recoveries=0)
        out: list[TokenChunk] = []
        try:
            req = GenerateRequest(
                "eb", prompt="hello", sampling=SamplingParams(max_tokens=60, ignore_eos=True)
            )
            task = asyncio.create_task(_consume(ing, req, out))
            while sum(len(c.token_ids) for c in out) < 5:
                await asyncio.sleep(0.005)
            _crash_after(insts[ing.registry.get("eb").instances[0]], 1)
            try:
                await asyncio.wait_for(task, 20)
            except Unavailable as e:
                return e
            return None
        finally:
            await _teardown(insts, ing)

    err = asyncio.run(asyncio.wait_for(scenario(), 40))
    assert err is not None and "lost its instance" in str(err)


class _RaisingBackend:
    """A backend whose stream raises mid-way (as vLLM's output handler raises ``EngineDeadError`` into every stream
    of a dead engine core, or a request-level error into one), with ``stats`` failing or not."""

    def __init__(self, engine_dead: bool) -> None:
        self.engine_dead = engine_dead

    async def generate(self, request: EngineRequest) -> Any:
        yield TokenChunk(request.request_id, 0, (7,))
        raise RuntimeError(
            "EngineCore encountered an issue" if self.engine_dead else "bad logits for this request"
        )

    async def stats(self) -> Any:
        if self.engine_dead:
            raise RuntimeError("EngineDeadError")
        from scheduler.engine.base import EngineStats

        return EngineStats(0, 0, 0, 100, 16)

    async def abort(self, request_id: str) -> None:
        return None

    async def shutdown(self) -> None:
        return None


@pytest.mark.parametrize("engine_dead", [True, False])
def test_a_stream_that_raises_says_whether_its_engine_failed(engine_dead: bool) -> None:
    """The vLLM path: the engine's stream raises. With the engine dead (its stats raise) the stream's end must say
    so (``ENGINE_FAILED``: the ingress recovers it); a request's own error on a live engine stays a plain ``error:``
    (final: re-running a request that fails by itself elsewhere helps nobody)."""
    from bench.loadgen import cluster_config
    from scheduler.control.instance import ENGINE_FAILED, Instance

    cfg = cluster_config("raising", mixed=1)
    pool = cfg.pools[0]

    async def scenario() -> str | None:
        inst = Instance("mixed-0", pool, cfg.model, cfg.gpus[pool.gpu])
        inst._backend = _RaisingBackend(engine_dead)
        sub = await inst.submit(EngineRequest("r", (1, 2, 3), SamplingParams(max_tokens=8)))
        out = list(sub.chunks)
        while not out[-1].finished:
            out.append(await inst.poll("r", 1.0, 1))
        return out[-1].finish_reason

    reason = asyncio.run(asyncio.wait_for(scenario(), 10))
    assert reason is not None and reason.startswith("error:")
    assert reason.startswith(ENGINE_FAILED) is engine_dead, reason


# ---- 2: an instance that never finishes starting ---------------------------------------------------------------------
class _FakeActor:
    """An Instance actor handle whose ``start`` hangs (``hang``) or raises; ``ray.remote(Instance)`` builds them."""

    def __init__(self, hang: bool) -> None:
        self.hang = hang

    def __getattr__(self, name: str) -> Any:
        from tests.test_ingress_audit import _Method

        return _Method(getattr(self, "_" + name))

    async def _start(self) -> Any:
        if self.hang:
            await asyncio.Event().wait()  # a model load that never ends
        raise RuntimeError("engine could not start")

    async def _shutdown(self) -> None:
        return None


class _FakeRay:
    """The Ray calls ``Controller._create`` and ``_release`` make, recorded: actors built, killed, groups removed."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, *, hang: bool) -> None:
        import scheduler.control.controller as c

        self.actors: list[_FakeActor] = []
        self.killed: list[_FakeActor] = []
        self.removed: list[str] = []
        fake = self

        class _Remote:
            def options(self, **_: Any) -> _Remote:
                return self

            def remote(self, *_: Any, **__: Any) -> _FakeActor:
                fake.actors.append(_FakeActor(hang))
                return fake.actors[-1]

        class _PG:
            async def ready(self) -> None:
                return None

        monkeypatch.setattr(c.ray, "remote", lambda cls: _Remote())
        monkeypatch.setattr(c.ray, "kill", lambda h, no_restart=True: self.killed.append(h))
        monkeypatch.setattr(c.ray, "cluster_resources", dict)
        monkeypatch.setattr(c, "plan_placement", lambda *a, **kw: None)
        monkeypatch.setattr(c, "create_instance_pg", lambda *a, **kw: _PG())
        monkeypatch.setattr(c, "actor_options", lambda *a, **kw: {})
        monkeypatch.setattr(c, "remove_instance_pg", lambda cluster, iid: self.removed.append(iid))


def _creating_controller(start_timeout_s: float) -> Any:
    """The fake Controller of ``tests/test_controller_audit.py`` with its real ``_create`` and ``_release``."""

    from scheduler.control.controller import Controller
    from tests.test_controller_audit import _controller

    ctrl = _controller([], {"mixed": 1})
    ctrl._pools["mixed"].start_timeout_s = start_timeout_s
    ctrl._pools["mixed"].gpu, ctrl._pools["mixed"].backend = "cpu", "simulated"
    ctrl.config.model, ctrl.config.gpus = None, {"cpu": None}
    ctrl.cluster, ctrl.namespace, ctrl._detached, ctrl._use_gpus, ctrl._backend_kwargs = (
        "t",
        "t",
        False,
        False,
        {},
    )
    ctrl._create = lambda pool, iid: Controller._create(ctrl, pool, iid)
    ctrl._release = lambda iid, broken=None: Controller._release(ctrl, iid, broken)
    return ctrl


def test_an_instance_whose_start_hangs_is_released_and_started_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """``Controller._create`` waited on ``Instance.start`` for good: an engine that hangs at start (a stuck model
    load) held its pool one instance short forever, the actor and placement group kept. After the pool's
    ``start_timeout_s`` the instance must be released (actor killed, group removed) and the reconcile loop start
    another."""
    ray = _FakeRay(monkeypatch, hang=True)

    async def scenario() -> tuple[int, int, list[str]]:
        ctrl = _creating_controller(start_timeout_s=0.2)
        await ctrl._reconcile(wait=False)
        pending = list(ctrl._pending.values())
        await asyncio.wait_for(asyncio.gather(*pending), 5.0)  # hung for good before the fix
        n_failed = len(ray.actors)
        ctrl._start_failures["mixed"] = (1, 0.0)  # the retry delay (its own test below) has passed
        await ctrl._reconcile(wait=False)
        started_again = len(ray.actors) + len(ctrl._pending) - n_failed
        for t in list(ctrl._pending.values()):
            t.cancel()
        return n_failed, started_again, ray.removed

    n_failed, started_again, removed = asyncio.run(asyncio.wait_for(scenario(), 10))
    assert n_failed == 1 and ray.killed[:1] == ray.actors[:1]  # the hung actor itself killed
    assert removed[:1] == ["mixed-1"]  # and its group removed
    assert started_again == 1


def test_starts_that_keep_failing_are_retried_with_a_growing_delay(monkeypatch: pytest.MonkeyPatch) -> None:
    """A start that fails at once (a bad model path, a backend that raises) was retried every reconcile round: a new
    actor and placement group twice a second, for good. The pool's next start must wait, doubling per failure."""
    import time

    ray = _FakeRay(monkeypatch, hang=False)

    async def scenario() -> int:
        ctrl = _creating_controller(start_timeout_s=5.0)
        end = time.monotonic() + 2.5
        while time.monotonic() < end:  # the Controller's loop reconciles every 0.5 s; faster here
            await ctrl._reconcile(wait=False)
            await asyncio.sleep(0.1)
        for t in list(ctrl._pending.values()):
            t.cancel()
        return len(ray.actors)

    created = asyncio.run(asyncio.wait_for(scenario(), 10))
    # At 0 s and after 1 s (then 2 s more): not one per round (~25).
    assert 2 <= created <= 3, created


def test_an_adopted_instance_whose_start_hangs_is_replaced(monkeypatch: pytest.MonkeyPatch) -> None:
    """A restarted Controller starts the instances it adopted (``_start_adopted``); a start that hangs there held the
    instance as "starting" for good (its failing snapshots are no verdict while it starts): never replaced."""
    from scheduler.control.controller import Member
    from tests.test_controller_audit import FakeInstance, _info

    ray = _FakeRay(monkeypatch, hang=True)

    async def scenario() -> tuple[list[str], set[str]]:
        ctrl = _creating_controller(start_timeout_s=0.2)
        actor = _FakeActor(hang=True)
        ctrl._members["mixed-0"] = Member(actor, _info(FakeInstance("mixed-0"), "mixed"))  # type: ignore[arg-type]
        await asyncio.wait_for(ctrl._start_adopted("mixed-0"), 5.0)
        return [a is actor for a in ray.killed], ctrl._starting

    killed, starting = asyncio.run(asyncio.wait_for(scenario(), 10))
    assert killed == [True] and ray.removed == ["mixed-0"]
    assert not starting


def test_start_timeout_is_validated_and_defaults_above_vllms_own() -> None:
    """A guard of the new knob: refused below 5 s (naming it); by default above vLLM's engine-ready wait (600 s)."""
    from scheduler.config.models import ClusterConfig
    from tests.test_control_plane import GPUS, MODEL

    with pytest.raises(ValueError, match=r"pools\.0\.start_timeout_s"):
        ClusterConfig.model_validate(
            {"gpus": GPUS, "model": MODEL, "pools": [{"name": "m", "gpu": "a100", "start_timeout_s": 0}]}
        )
    cfg = ClusterConfig.model_validate(
        {"gpus": GPUS, "model": MODEL, "pools": [{"name": "m", "gpu": "a100"}]}
    )
    assert cfg.pools[0].start_timeout_s > 600


# ---- 3: an admin Drain of a blocked instance -------------------------------------------------------------------------
def test_an_admin_drain_of_a_blocked_instance_answers_unavailable_and_keeps_the_drain(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``Controller.set_draining`` (Admin DrainInstance) awaited the instance's ``set_draining`` with no deadline: a
    blocked actor (a hung engine holding its event loop) hung the admin call for good. It must answer UNAVAILABLE
    naming the instance, with the operator's drain still recorded (a retry delivers it)."""
    import scheduler.control.controller_admin as admin_mod
    from scheduler.control.api import Unavailable
    from scheduler.server.grpc_server import status_for
    from tests.test_controller_audit import FakeInstance, _controller

    class Blocked(FakeInstance):
        async def _set_draining(self, flag: bool, leaving: bool = False) -> None:
            await asyncio.Event().wait()

    monkeypatch.setattr(admin_mod, "ADMIN_CALL_TIMEOUT_S", 0.2)
    ctrl = _controller([FakeInstance("mixed-0"), Blocked("mixed-1")], {"mixed": 2})

    async def scenario() -> BaseException | None:
        try:
            await asyncio.wait_for(
                ctrl.set_draining("mixed-1", True), 5.0
            )  # TimeoutError here before the fix
        except Unavailable as e:
            return e
        return None

    err = asyncio.run(scenario())
    assert err is not None and "mixed-1" in str(err)
    assert status_for(err)[0].name == "UNAVAILABLE"
    assert ctrl._operator_drained == {"mixed-1"}


def test_the_ingress_passes_on_the_controllers_own_admin_error() -> None:
    """Over Ray the Controller's ``Unavailable`` arrives as a ``RayTaskError(Unavailable)``, whose text is the remote
    traceback; the ingress re-raised it as is, so the admin's UNAVAILABLE carried a stack dump as its message. The
    Controller's own error must reach the client as it is (a guard of the fix above: the Controller never answered
    before it)."""
    from ray.exceptions import RayTaskError

    from scheduler.control.api import Unavailable
    from scheduler.control.ingress import Ingress
    from scheduler.server.grpc_server import status_for

    class Ctrl:
        class set_draining:  # a Ray method's look-alike
            @staticmethod
            def remote(*_: Any) -> Any:
                async def fail() -> None:
                    cause = Unavailable("instance_id: mixed-1 did not answer", field="instance_id")
                    tb = "Traceback (most recent call last):\n  ...\nUnavailable: instance_id: mixed-1 did not answer"
                    raise RayTaskError("set_draining", tb, cause).as_instanceof_cause()

                return fail()

    ing = Ingress.__new__(Ingress)
    ing.controller = Ctrl()

    async def scenario() -> BaseException:
        try:
            await ing._admin("set_draining", "mixed-1", True)
        except Exception as e:  # noqa: BLE001 - what the server maps to a status
            return e
        raise AssertionError("no error")

    err = asyncio.run(scenario())
    code, message, _ = status_for(err)
    assert (code.name, message) == ("UNAVAILABLE", "instance_id: mixed-1 did not answer")


# ---- 4: a Cancel that meets a failed engine --------------------------------------------------------------------------
def test_a_cancel_that_meets_a_failed_engine_still_stops_the_other_copy() -> None:
    """Admin Cancel of a request another replica serves aborts it on every instance the Controller's registry names
    (a P->D pair during a handoff). ``_abort_bounded`` caught a timeout and a dead actor, not an abort that raised on
    a live actor whose engine failed (vLLM's ``abort`` raises ``EngineDeadError`` then: a ``RayTaskError``): the
    Cancel answered INTERNAL, though the other instance's abort had run. A failed engine holds nothing to stop."""
    from ray.exceptions import RayTaskError

    from scheduler.control.controller import Member
    from scheduler.control.ingress import Ingress
    from scheduler.control.registry import RegistryEntry, RequestRegistry
    from scheduler.core.types import Phase
    from tests.test_controller_audit import FakeInstance, _info

    aborted: list[str] = []

    class Engine(FakeInstance):
        def __init__(self, iid: str, dead: bool) -> None:
            super().__init__(iid)
            self.dead = dead

        async def _abort(self, rid: str, forget: bool = False) -> bool:
            if self.dead:
                raise RayTaskError("abort", "", RuntimeError("EngineDeadError")).as_instanceof_cause()
            aborted.append(self.iid)
            return True

    class Ctrl(FakeInstance):
        async def _lookup(self, rid: str) -> RegistryEntry:
            return RegistryEntry(rid, "other", ("prefill-0", "decode-0"), 1, Phase.TRANSFER)

    ing = Ingress.__new__(Ingress)
    ing._tasks, ing.registry, ing.controller = [object()], RequestRegistry(), Ctrl("controller")
    ing._members = {
        iid: Member(Engine(iid, dead), _info(FakeInstance(iid), iid.split("-")[0]))  # type: ignore[arg-type]
        for iid, dead in (("prefill-0", True), ("decode-0", False))
    }

    assert asyncio.run(ing.cancel("r")) is True  # raised RayTaskError (INTERNAL) before
    assert aborted == ["decode-0"]


# ---- 5: the Controller's view of a failed engine ---------------------------------------------------------------------
def test_the_controllers_view_marks_a_failed_engine_unhealthy_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An instance whose snapshot raised (its engine failed: it cannot report its load) stayed healthy in the
    Controller's view for ``UNHEALTHY_AFTER_S`` (10 s) -- capacity to the scaling policy, a destination to the
    migration policy -- while every ingress took it out at once. An error is a verdict at once; a slow answer is not."""
    from ray.exceptions import RayTaskError

    from tests.test_controller_audit import FakeInstance, _controller

    ctrl = _controller([FakeInstance("mixed-0"), FakeInstance("mixed-1")], {"mixed": 2})
    real, failing = FakeInstance._snapshot, [False]

    async def snapshot(self: Any) -> Any:
        if failing[0] and self.iid == "mixed-0":
            raise RayTaskError("snapshot", "", RuntimeError("engine failed: RuntimeError: device fault"))
        if failing[0] and self.iid == "mixed-1":
            raise TimeoutError
        return await real(self)

    monkeypatch.setattr(FakeInstance, "_snapshot", snapshot)

    async def scenario() -> dict[str, bool]:
        await ctrl._refresh()
        failing[0] = True
        await ctrl._refresh()
        return {s.instance_id: s.healthy for s in (await ctrl.view()).instances}

    assert asyncio.run(scenario()) == {"mixed-0": False, "mixed-1": True}
    assert not ctrl.killed  # type: ignore[attr-defined]  # released only once it lasts UNHEALTHY_AFTER_S


# ---- 6: a P->D decode submit whose KV source failed --------------------------------------------------------------------
def test_a_decode_whose_kv_export_failed_recomputes_the_prompt_there(monkeypatch: pytest.MonkeyPatch) -> None:
    """The prefill instance's engine fails after token 0, while it exports the prompt KV: Ray then raises the
    export's error from the decode instance's ``submit`` (its ObjectRef argument failed; checked against Ray: a
    ``RayTaskError(RuntimeError)`` from ``B.submit`` carrying the export's cause). Taken for the decode instance's
    own failure, the healthy decode instance was left out of the recovery's route: with one decode instance the
    request failed UNAVAILABLE. The decode side must recompute the prompt without the KV, as when the source died."""
    from ray.exceptions import RayTaskError

    import tests.test_chaos as chaos
    from bench.loadgen import cluster_config

    class RayMethod(chaos._Method):  # a failed ObjectRef argument fails the call, as Ray fails it
        async def _call(self, *args: Any, **kw: Any) -> Any:
            try:
                args = tuple([await a if isinstance(a, asyncio.Future) else a for a in args])
            except Exception as e:  # noqa: BLE001 - re-raised as Ray would
                raise RayTaskError("Instance.submit", "", e).as_instanceof_cause() from None
            return await self.fn(*args, **kw)

    monkeypatch.setattr(chaos, "_Method", RayMethod)
    cfg = cluster_config("pd-export-fails", mixed=0, prefill=1, decode=1)

    async def scenario() -> list[TokenChunk]:
        insts, ing = await _cluster_of(cfg, 0.0)

        async def export_fails(*_: Any) -> Any:
            raise RuntimeError("EngineDeadError: EngineCore encountered an issue")

        insts["prefill-0"].export_kv = export_fails  # type: ignore[method-assign]  # the handles look it up per call
        out: list[TokenChunk] = []
        try:
            req = GenerateRequest(
                "pdx", prompt="hello there", sampling=SamplingParams(max_tokens=8, ignore_eos=True)
            )
            await asyncio.wait_for(_consume(ing, req, out), 20)
            return out
        finally:
            await _teardown(insts, ing)

    out = asyncio.run(asyncio.wait_for(scenario(), 40))
    assert out[-1].finish_reason == "length"
    assert [c.index + k for c in out for k in range(len(c.token_ids))] == list(range(8))
    assert {c.instance_id for c in out if c.index > 0 and c.token_ids} == {"decode-0"}
