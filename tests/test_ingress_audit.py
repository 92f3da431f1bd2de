"""Regressions from an audit of the live Ingress/Instance (no Ray: fake actor handles, Instance built with Ray's
runtime context patched out). Each test reproduces one confirmed bug."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import pytest
from ray.exceptions import ActorUnavailableError, RayActorError

from scheduler.config.load import load_config
from scheduler.control.api import GenerateRequest, InvalidRequest, Unavailable
from scheduler.control.controller import Member
from scheduler.control.ingress import Ingress
from scheduler.control.instance import Instance, InstanceInfo, Submitted
from scheduler.control.registry import RegistryEntry, RequestRecord
from scheduler.core.types import ClusterView, InstanceRole, InstanceSnapshot, Phase
from scheduler.engine.base import EngineRequest, SamplingParams, TokenChunk
from scheduler.server.echo import EchoIngress
from scheduler.server.http_server import build_app


# ---- fakes: actor handles whose ``.method.remote(...)`` returns an awaitable ---------------------------------------
class _Method:
    def __init__(self, fn: Any) -> None:
        self.fn = fn

    def remote(self, *a: Any, **kw: Any) -> Any:
        return asyncio.ensure_future(self.fn(*a, **kw))


class FakeInstance:
    """A tiny engine: one token per ``poll``; ``abort`` ends the stream with finish_reason abort."""

    def __init__(self, iid: str, role: InstanceRole = InstanceRole.MIXED) -> None:
        self.iid, self.role = iid, role
        self.streams: dict[str, dict[str, Any]] = {}
        self.aborted: list[str] = []
        self.calls: list[str] = []
        self.draining = False

    def __getattr__(self, name: str) -> _Method:
        fn = getattr(self, "_" + name, None)
        if fn is None:
            raise AttributeError(name)
        return _Method(fn)

    async def _submit(self, req: Any, kv: Any = None, **kw: Any) -> Submitted:
        self.calls.append("submit")
        st = {"next": req.num_output_tokens_before, "left": req.sampling.max_tokens, "paused": False,
              "done": False, "ev": asyncio.Event()}
        self.streams[req.request_id] = st
        return Submitted(chunks=(self._tok(req.request_id, st),))

    def _tok(self, rid: str, st: dict[str, Any]) -> TokenChunk:
        i = st["next"]
        st["next"] += 1
        st["left"] -= 1
        fin = st["left"] <= 0
        st["done"] = fin
        return TokenChunk(rid, i, (7,), fin, "length" if fin else None)

    async def _poll(self, rid: str, timeout: float, from_index: int) -> TokenChunk | None:
        st = self.streams.get(rid)
        if st is None:
            return None
        if st["paused"] or st.get("aborted"):
            end = "migrated" if st.get("migrated") else "abort"
            if st.get("aborted"):
                return TokenChunk(rid, st["next"], (), True, end)
            try:
                await asyncio.wait_for(st["ev"].wait(), timeout)
            except TimeoutError:
                return TokenChunk(rid, -1, ())
            return TokenChunk(rid, st["next"], (), True, "migrated" if st.get("migrated") else "abort")
        await asyncio.sleep(0.01)
        return self._tok(rid, st)

    async def _abort(self, rid: str, forget: bool = False) -> bool:
        self.aborted.append(rid)
        st = self.streams.get(rid)
        if st is None:
            return False
        st["aborted"] = True
        st["ev"].set()
        return True

    async def _snapshot(self) -> InstanceSnapshot:
        return InstanceSnapshot(self.iid, self.role)

    async def _migrate_context(self, rid: str) -> int | None:
        return 10 if rid in self.streams else None

    async def _export_kv(self, rid: str, start: int, end: Any) -> Any:
        return object()

    async def _migrate_stop(self, rid: str, start: int) -> Any:
        st = self.streams[rid]
        st["paused"] = True
        return ("snap", st["next"])

    async def _migrate_release(self, rid: str) -> bool:
        st = self.streams.get(rid)
        if st is None:
            return False
        st["migrated"] = True
        return await self._abort(rid)

    async def _migrate_resume(self, rid: str) -> bool:
        self.streams[rid]["paused"] = False
        return True

    async def _migrate_reserve(self, rid: str, tokens: int, template: Any, **kw: Any) -> str | None:
        return None

    async def _migrate_stage(self, rid: str, piece: list[Any]) -> tuple[str, Any]:
        return "ok", 10

    async def _migrate_commit(self, rid: str, template: Any, stopped: list[Any], **kw: Any) -> str | None:
        _, n = await stopped[0]
        self.streams[rid] = {"next": n, "left": template.sampling.max_tokens - n, "paused": False, "done": False,
                             "ev": asyncio.Event()}
        return None

    async def _migrate_cancel(self, rid: str) -> None:
        self.streams.pop(rid, None)

    async def _set_draining(self, flag: bool, leaving: bool = False) -> None:
        self.draining = flag

    def running(self, rid: str) -> bool:
        st = self.streams.get(rid)
        return st is not None and not st.get("aborted") and not st["done"]


def _member(inst: FakeInstance, pool: str = "mixed") -> Member:
    info = InstanceInfo(inst.iid, pool, inst.role, "cpu", 1, "m", "simulated", incarnation=inst.iid + "#1")
    return Member(inst, info)  # type: ignore[arg-type]


def _ingress(instances: list[FakeInstance], routable: list[str] | None = None, controller: Any = None,
             **kw: Any) -> Ingress:
    ing = Ingress(load_config("default"), controller=controller, direct=False, **kw)
    ing._members = {i.iid: _member(i) for i in instances}
    routable = routable if routable is not None else [i.iid for i in instances]
    ing._view = ClusterView(0.0, tuple(InstanceSnapshot(i.iid, i.role) for i in instances if i.iid in routable))
    ing._tasks = [None]  # type: ignore[list-item]  # "started": public coroutines skip start()
    return ing


async def _consume(ing: Ingress, req: GenerateRequest, out: list[TokenChunk]) -> None:
    async for c in ing.generate(req):
        out.append(c)


async def _until(cond: Any, timeout: float = 5.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "timed out waiting"
        await asyncio.sleep(0.005)


# ---- 1 ------------------------------------------------------------------------------------------------------------
def test_lost_zero_token_final_answer_is_resent(no_ray: None) -> None:
    """A poll retry after a lost zero-token final answer (abort) got None ("unknown request") instead of it again."""
    async def scenario() -> TokenChunk | None:
        cfg = load_config("default")
        pool = cfg.pools[0]
        inst = Instance("mixed-0", pool, cfg.model, cfg.gpus[pool.gpu])
        await inst.start()
        try:
            sub = await inst.submit(EngineRequest("r", tuple(range(1, 50)), SamplingParams(max_tokens=200)))
            got = sum(len(c.token_ids) for c in sub.chunks)
            await inst.abort("r")
            first = await inst.poll("r", 2.0, got)  # its reply is lost on the channel ...
            assert first is not None and first.finished and first.finish_reason == "abort"
            return await inst.poll("r", 2.0, got)  # ... the ingress retries the same poll over Ray
        finally:
            await inst.shutdown()

    retry = asyncio.run(scenario())
    assert retry is not None and retry.finished and retry.finish_reason == "abort"


def test_request_unknown_to_instance_does_not_blacklist_it() -> None:
    """poll -> None (a lost final answer) marked a healthy instance dead: this ingress never routed to it again."""

    async def scenario() -> tuple[Ingress, list[TokenChunk]]:
        S, T = FakeInstance("mixed-0"), FakeInstance("mixed-1")
        ing = _ingress([S, T], routable=["mixed-0"])
        orig = S._poll

        async def poll(rid: str, timeout: float, frm: int) -> TokenChunk | None:
            out = await orig(rid, timeout, frm)
            return None if out is not None and out.finished and out.finish_reason == "abort" else out

        S._poll = poll  # type: ignore[method-assign]
        out: list[TokenChunk] = []
        t = asyncio.create_task(_consume(ing, GenerateRequest("q", prompt="hi", sampling=SamplingParams(max_tokens=30)),
                                         out))
        await _until(lambda: len(out) >= 3)
        assert (await ing.migrate("q", "mixed-1")).committed
        await asyncio.wait_for(t, 5)
        return ing, out

    ing, out = asyncio.run(scenario())
    assert out[-1].finish_reason == "length" and out[-1].instance_id == "mixed-1"
    assert "mixed-0" in ing._members and not ing._dead


# ---- 2 ------------------------------------------------------------------------------------------------------------
def test_cancel_after_migration_commit_aborts_destination() -> None:
    """A cancel just after a migration committed aborted only the source; the destination kept decoding."""

    async def scenario() -> tuple[FakeInstance, list[TokenChunk]]:
        S, D = FakeInstance("mixed-0"), FakeInstance("mixed-1")
        orig_abort = S._abort

        async def slow_abort(rid: str) -> bool:  # one Ray round trip
            await asyncio.sleep(0.05)
            return await orig_abort(rid)

        S._abort = slow_abort  # type: ignore[method-assign]
        ing = _ingress([S, D], routable=["mixed-0"])
        out: list[TokenChunk] = []
        t = asyncio.create_task(_consume(ing, GenerateRequest("r", prompt="hello",
                                                              sampling=SamplingParams(max_tokens=500)), out))
        await _until(lambda: len(out) >= 3)
        rec = ing.registry.get("r")
        assert rec is not None

        async def cancel_in_window() -> None:
            await _until(lambda: rec.moving_to is not None)
            assert await ing.cancel("r")

        w = asyncio.create_task(cancel_in_window())
        assert (await ing.migrate("r", "mixed-1")).committed
        await w
        await asyncio.wait_for(t, 5)
        await asyncio.sleep(0.05)
        return D, out

    D, out = asyncio.run(scenario())
    assert out[-1].finish_reason == "abort"
    assert not D.running("r"), "destination copy of a cancelled request is still decoding"


# ---- 3 ------------------------------------------------------------------------------------------------------------
def test_cancel_during_decode_submit_is_not_lost() -> None:
    """A cancel landing while the P->D decode leg was being submitted was lost: the request ran to max_tokens."""

    async def scenario() -> tuple[FakeInstance, list[TokenChunk]]:
        P, D = FakeInstance("prefill-0", InstanceRole.PREFILL), FakeInstance("decode-0", InstanceRole.DECODE)
        orig_submit = D._submit

        async def submit_after_kv(req: Any, kv: Any = None, **kw: Any) -> Submitted:
            await asyncio.sleep(0.2)  # resolving the KV ObjectRef before the method runs
            return await orig_submit(req, kv, **kw)

        D._submit = submit_after_kv  # type: ignore[method-assign]
        ing = _ingress([P, D])
        out: list[TokenChunk] = []
        t = asyncio.create_task(_consume(ing, GenerateRequest("r", prompt="hello",
                                                              sampling=SamplingParams(max_tokens=20)), out))
        await _until(lambda: ing.registry.get("r") is not None and ing.registry.get("r").instances == ("decode-0",))
        await asyncio.sleep(0.05)  # D.submit is in flight
        assert await ing.cancel("r")
        await asyncio.wait_for(t, 5)
        await asyncio.sleep(0.02)
        return D, out

    D, out = asyncio.run(scenario())
    assert out[-1].finish_reason == "abort", "cancelled request ran to completion"
    assert not D.running("r")


# ---- 4 ------------------------------------------------------------------------------------------------------------
def test_remote_cancel_survives_dead_instance() -> None:
    """Cancel of another replica's request raised RayActorError (INTERNAL) on a dead instance, skipping the rest."""
    P, D = FakeInstance("prefill-0"), FakeInstance("decode-0")

    async def dead_abort(rid: str) -> bool:
        raise RayActorError()

    P._abort = dead_abort  # type: ignore[method-assign]

    async def lookup(rid: str) -> RegistryEntry:
        return RegistryEntry(rid, "ingress-other", ("prefill-0", "decode-0"), 1, Phase.TRANSFER)

    class Ctrl:
        pass

    Ctrl.lookup = _Method(lookup)  # type: ignore[attr-defined]

    async def scenario() -> bool:
        D.streams["r"] = {"next": 3, "left": 5, "paused": False, "done": False, "ev": asyncio.Event()}
        return await _ingress([P, D], controller=Ctrl()).cancel("r")

    assert asyncio.run(scenario()) is True
    assert "r" in D.aborted


# ---- 5 ------------------------------------------------------------------------------------------------------------
def test_failing_slow_predictor_still_rechecks_duplicate_id() -> None:
    """A failing slow predictor skipped the duplicate request_id re-check: a plain ValueError (INTERNAL) later."""

    class FailingSlowPredictor:
        name, slow = "embedding", True

        def predict_dist(self, prompt: Any, n: int) -> Any:
            time.sleep(0.05)
            raise RuntimeError("encoder unavailable")

    async def scenario() -> list[Any]:
        ing = _ingress([FakeInstance("mixed-0")], predictor=FailingSlowPredictor())
        req = GenerateRequest("dup", prompt="hi", sampling=SamplingParams(max_tokens=50))

        async def run() -> list[TokenChunk]:
            out: list[TokenChunk] = []
            async for c in ing.generate(req):
                out.append(c)
                if len(out) == 2:
                    break
            return out

        return await asyncio.gather(run(), run(), return_exceptions=True)

    errs = [r for r in asyncio.run(scenario()) if isinstance(r, BaseException)]
    assert len(errs) == 1 and isinstance(errs[0], InvalidRequest) and errs[0].field == "request_id"


# ---- 6 ------------------------------------------------------------------------------------------------------------
def test_refresh_keeps_requests_routed_during_it() -> None:
    """_refresh_view cleared _pending after awaiting snapshots: requests routed meanwhile vanished from the view."""

    async def scenario() -> int:
        A, B = FakeInstance("mixed-0"), FakeInstance("mixed-1")
        for inst in (A, B):
            async def slow_snapshot(inst: FakeInstance = inst) -> InstanceSnapshot:
                snap = InstanceSnapshot(inst.iid, inst.role)  # taken now (empty) ...
                await asyncio.sleep(0.1)  # ... answered late
                return snap

            inst._snapshot = slow_snapshot  # type: ignore[method-assign]
        ing = _ingress([A, B])
        refresh = asyncio.create_task(ing._refresh_view())
        await asyncio.sleep(0.02)
        for k in range(6):
            ing._route(RequestRecord(f"r{k}", (1, 2, 3), SamplingParams(max_tokens=50)))
        await refresh
        return sum(s.num_waiting for s in ing.view().instances)

    assert asyncio.run(scenario()) == 6


# ---- 7 ------------------------------------------------------------------------------------------------------------
def test_migrate_from_dead_source_is_not_committed() -> None:
    """migrate() with a source just marked dead raised InstanceLost (INTERNAL) instead of committed=False."""

    async def scenario() -> Any:
        ing = _ingress([FakeInstance("mixed-0"), FakeInstance("mixed-1")])
        rec = RequestRecord("r", (1, 2, 3), SamplingParams(max_tokens=50))
        rec.phase, rec.instances, rec.output_token_ids = Phase.DECODE, ("mixed-0",), [5, 6]
        ing.registry.add(rec)
        ing._mark_dead("mixed-0")
        return await ing.migrate("r", "mixed-1"), ing

    res, ing = asyncio.run(scenario())
    assert not res.committed and "mixed-0" in res.reason
    assert not ing._migrating


# ---- 8 ------------------------------------------------------------------------------------------------------------
def test_cancelled_drain_puts_instance_back_in_service() -> None:
    """A drain() cancelled mid-way (caller's deadline) left the instance draining forever, never released."""
    calls: list[tuple[Any, ...]] = []
    S, D = FakeInstance("mixed-0"), FakeInstance("mixed-1")

    async def set_draining(iid: str, flag: bool = True) -> bool:
        calls.append(("set_draining", iid, flag))
        {"mixed-0": S, "mixed-1": D}[iid].draining = flag
        return True

    async def release(iid: str, **kw: Any) -> bool:
        calls.append(("release", iid))
        return True

    class Ctrl:
        pass

    Ctrl.set_draining, Ctrl.release = _Method(set_draining), _Method(release)  # type: ignore[attr-defined]

    async def refuse(rid: str, tokens: int, template: Any, **kw: Any) -> str:  # every migration attempt is refused
        return "no KV room"

    D._migrate_reserve = refuse  # type: ignore[method-assign]

    async def scenario() -> None:
        ing = _ingress([S, D], routable=["mixed-0"], controller=Ctrl())
        out: list[TokenChunk] = []
        t = asyncio.create_task(_consume(ing, GenerateRequest("r", prompt="hi",
                                                              sampling=SamplingParams(max_tokens=10**3)), out))
        await _until(lambda: len(out) >= 2)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(ing.drain("mixed-0"), 0.3)
        t.cancel()
        await asyncio.gather(t, return_exceptions=True)

    asyncio.run(scenario())
    assert ("release", "mixed-0") in calls or not S.draining, "instance left draining forever"


# ---- 9 ------------------------------------------------------------------------------------------------------------
def test_admin_calls_with_controller_down_are_unavailable() -> None:
    """Drain/Scale/SwitchRole with the Controller down mapped RayActorError to INTERNAL, not UNAVAILABLE."""

    async def down(*a: Any, **kw: Any) -> Any:
        raise RayActorError()

    async def restarting(*a: Any, **kw: Any) -> Any:
        raise ActorUnavailableError("controller restarting", b"\x00" * 16)

    class Ctrl:
        pass

    Ctrl.set_draining = Ctrl.release = Ctrl.switch_role = _Method(down)  # type: ignore[attr-defined]
    Ctrl.scale = _Method(restarting)  # type: ignore[attr-defined]

    async def scenario() -> dict[str, Any]:
        ing = _ingress([FakeInstance("mixed-0"), FakeInstance("mixed-1")], controller=Ctrl())
        got: dict[str, Any] = {}
        for name, call in (("drain", ing.drain("mixed-0")), ("scale", ing.scale("mixed", 3)),
                           ("switch_role", ing.switch_role("mixed-0", "decode"))):
            try:
                await call
                got[name] = None
            except Exception as e:  # noqa: BLE001
                got[name] = e
        return got

    got = asyncio.run(scenario())
    assert all(isinstance(e, Unavailable) for e in got.values()), got


# ---- 10 -----------------------------------------------------------------------------------------------------------
def test_scale_returns_target_size() -> None:
    """Admin.Scale answered the pool's previous desired count, not its target size after the call."""
    desired = {"mixed": 1}

    async def scale(pool: str, count: int) -> int:  # the Controller's contract: returns the previous count
        before, desired[pool] = desired[pool], count
        return before

    async def members() -> dict[str, Member]:
        return {}

    class Ctrl:
        pass

    Ctrl.scale, Ctrl.members = _Method(scale), _Method(members)  # type: ignore[attr-defined]

    async def scenario() -> int:
        ing = _ingress([], controller=Ctrl())
        return await ing.scale("mixed", 3)

    assert asyncio.run(scenario()) == 3 and desired["mixed"] == 3


# ---- 11 -----------------------------------------------------------------------------------------------------------
def test_http_chat_max_completion_tokens_and_prompt_usage() -> None:
    """HTTP: max_completion_tokens 0 was replaced by max_tokens, errors named max_tokens, text prompt_tokens was 0."""

    async def scenario() -> tuple[httpx.Response, httpx.Response, httpx.Response]:
        ing = EchoIngress(models=("echo",))
        app = build_app(ing, default_model="echo")
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            msgs = [{"role": "user", "content": "hi"}]
            zero = await c.post("/v1/chat/completions",
                                json={"model": "echo", "messages": msgs, "max_completion_tokens": 0})
            neg = await c.post("/v1/chat/completions",
                               json={"model": "echo", "messages": msgs, "max_completion_tokens": -1})
            text = await c.post("/v1/completions", json={"model": "echo", "prompt": "hello world", "max_tokens": 2})
        return zero, neg, text

    zero, neg, text = asyncio.run(scenario())
    assert zero.status_code == 400 and zero.json()["error"]["param"] == "max_completion_tokens"
    assert neg.status_code == 400 and neg.json()["error"]["param"] == "max_completion_tokens"
    usage = text.json()["usage"]
    assert usage["prompt_tokens"] == len("hello world") and usage["total_tokens"] == len("hello world") + 2


@pytest.mark.parametrize("draining", [False, True])
def test_a_channel_failure_warns_only_for_an_instance_in_service(draining: bool, caplog) -> None:
    """The direct channel of an instance released once drained closes with its shutdown: the fallback to Ray is
    expected there and said at INFO. Before, every release logged a WARNING "direct channel failed" that looked
    like a fault to operators; one in service still warns."""
    import logging
    from types import SimpleNamespace

    from scheduler.control.channel import ChannelError

    ing = Ingress(load_config("default"), controller=None)
    snap = InstanceSnapshot("mixed-0", InstanceRole.MIXED, num_running=1, draining=draining)
    ing._snapshots, ing._view = {"mixed-0": snap}, ClusterView(0.0, (snap,))

    class Channel:
        async def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
            raise ChannelError("closed mid-call")

    async def poll(*args: Any, **kwargs: Any) -> str:
        return "over Ray"

    ing._channel = lambda iid: Channel()  # type: ignore[method-assign]
    with caplog.at_level(logging.INFO, logger="scheduler.control.ingress"):
        out = asyncio.run(ing._call("mixed-0", SimpleNamespace(poll=SimpleNamespace(remote=poll)), "poll", "r1"))
    assert out == "over Ray"
    [rec] = [r for r in caplog.records if "direct channel failed" in r.getMessage()]
    assert rec.levelno == (logging.INFO if draining else logging.WARNING)
