"""Regressions from an audit of live migration (each test failed before its fix).

In-process cluster: real ``Instance`` objects (simulated backend) behind fake actor handles (``.method.remote(...)``
returns an asyncio future, as Ray's ObjectRef is awaitable; a "dead" handle raises ``RayActorError`` on every
call), and a real ``Ingress`` wired to them (no Ray, no Controller)."""
from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from ray.exceptions import RayActorError

from bench.loadgen import cluster_config
from scheduler.control.api import GenerateRequest
from scheduler.control.controller import Member
from scheduler.control.ingress import Ingress
from scheduler.control.instance import Instance
from scheduler.control.registry import RequestRecord
from scheduler.core.types import ClusterView, InstanceRole, InstanceSnapshot, Phase
from scheduler.engine.base import EngineRequest, SamplingParams, TokenChunk
from scheduler.engine.simulated_backend import SimulatedBackend, sim_token
from scheduler.transfer.migration import MigrationSnapshot
from tests.test_ingress_audit import FakeInstance, _consume, _ingress, _until

pytestmark = pytest.mark.usefixtures("no_ray")  # tests/conftest.py: Instance objects here, no Ray node


class Handle:
    def __init__(self, inst: Instance) -> None:
        self.inst = inst
        self.dead = False
        self.hooks: dict[str, Any] = {}  # method -> async wrapper(fn, *a, **kw)
        self.calls: list[str] = []

    def __getattr__(self, name: str) -> Any:
        fn = getattr(self.inst, name)
        h = self

        class _M:
            def remote(self, *a: Any, **kw: Any) -> Any:
                async def call() -> Any:
                    h.calls.append(name)
                    if h.dead:
                        raise RayActorError()
                    hook = h.hooks.get(name)
                    if hook is not None:
                        return await hook(fn, *a, **kw)
                    return await fn(*a, **kw)
                return asyncio.ensure_future(call())

        return _M()


def make_config(n: int = 2) -> Any:
    return cluster_config("audit", mixed=n)


async def start_instances(n: int = 2, time_scale: float = 0.2, lease_s: float = 30.0, num_blocks: int | None = None
                          ) -> list[Instance]:
    cfg = make_config(n)
    pool = cfg.pools[0]
    kw: dict[str, Any] = {"time_scale": time_scale}
    if num_blocks is not None:
        kw["num_blocks"] = num_blocks
    out = []
    for i in range(n):
        inst = Instance(f"mixed-{i}", pool, cfg.model, cfg.gpus[pool.gpu], backend_kwargs=kw, lease_s=lease_s)
        await inst.start()
        out.append(inst)
    return out


def make_ingress(handles: list[Handle], routable: list[str] | None = None, **kw: Any) -> Ingress:
    cfg = make_config(len(handles))
    ing = Ingress(cfg, controller=None, direct=False, **kw)
    ing._members = {h.inst.instance_id: Member(h, h.inst.info) for h in handles}  # type: ignore[arg-type]
    set_routable(ing, routable if routable is not None else [h.inst.instance_id for h in handles])
    ing._tasks = [None]  # type: ignore[list-item]  # "started"
    return ing


def set_routable(ing: Ingress, iids: list[str]) -> None:
    ing._view = ClusterView(0.0, tuple(InstanceSnapshot(i, ing._members[i].info.role) for i in iids))


async def until(cond: Any, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "timed out waiting"
        await asyncio.sleep(0.002)


async def consume(ing: Ingress, req: Any, out: list[Any], errors: list[BaseException]) -> None:
    try:
        async for c in ing.generate(req):
            out.append(c)
    except Exception as e:  # noqa: BLE001
        errors.append(e)


# ---- A: A: migrate() cancelled (gRPC deadline of Admin.MigrateRequest, a cancelled drain) while the migration is in
# FINAL_COPY leaves the request paused on the source forever: no resume, no destination cancel. The client's
# stream stalls (the ingress keeps polling the paused source, renewing its lease).
def test_cancelled_migrate_in_final_copy_resumes_the_source() -> None:
    async def scenario() -> tuple[bool, bool, list[TokenChunk], bool]:
        S, D = FakeInstance("mixed-0"), FakeInstance("mixed-1")
        orig_commit = D._migrate_commit
        cancelled_on_dst: list[str] = []

        async def slow_commit(rid: str, template: Any, stopped: list[Any], **kw: Any) -> Any:
            await asyncio.sleep(0.5)  # a long context's stop-and-copy
            return await orig_commit(rid, template, stopped, **kw)

        orig_cancel = D._migrate_cancel

        async def cancel(rid: str) -> None:
            cancelled_on_dst.append(rid)
            await orig_cancel(rid)

        D._migrate_commit = slow_commit  # type: ignore[method-assign]
        D._migrate_cancel = cancel  # type: ignore[method-assign]
        ing = _ingress([S, D], routable=["mixed-0"], poll_timeout_s=0.2)
        out: list[TokenChunk] = []
        t = asyncio.create_task(_consume(ing, GenerateRequest("r", prompt="hi",
                                                              sampling=SamplingParams(max_tokens=40)), out))
        await _until(lambda: len(out) >= 3)
        mig = asyncio.create_task(ing.migrate("r", "mixed-1"))
        await _until(lambda: S.streams["r"]["paused"])  # FINAL_COPY: the source paused R
        mig.cancel()  # the admin RPC's deadline / a cancelled drain
        try:
            await mig
        except asyncio.CancelledError:
            pass
        done = True
        try:
            await asyncio.wait_for(asyncio.shield(t), 2.0)
        except TimeoutError:
            done = False
        paused = S.streams["r"]["paused"]
        t.cancel()
        return done, paused, out, bool(cancelled_on_dst)

    done, paused, out, dst_cancelled = asyncio.run(scenario())
    assert not paused, "the source was left paused: nobody resumed it"
    assert done and out[-1].finish_reason == "length", f"client stream stalled after {len(out)} chunks"
    assert dst_cancelled, "the destination's reservation was never cancelled"


# ---- B: B: the source dies while a migration is in STAGING. The client's stream recovers on its own -- and the router
# picks the migration's destination (it was picked as the least loaded). The migration then aborts (the source is
# gone) and its destination cancel ``migrate_cancel`` aborts *the recovered request* there: the client's request
# fails (Unavailable, or is re-prefilled a second time elsewhere) although a healthy instance was serving it.
def test_recovery_on_the_migration_destination_survives_the_migration_abort() -> None:
    async def scenario() -> tuple[list[Any], list[BaseException], int]:
        S_inst, D_inst = await start_instances(2, time_scale=0.2)
        S, D = Handle(S_inst), Handle(D_inst)
        ing = make_ingress([S, D], routable=["mixed-0"])
        stage_entered = asyncio.Event()
        recovered_on_d = asyncio.Event()

        async def slow_stage(fn: Any, rid: str, piece: list[Any]) -> Any:
            stage_entered.set()
            try:  # this piece's copy is still on the wire when the recovery lands on D (if it does meanwhile)
                await asyncio.wait_for(recovered_on_d.wait(), 1.0)
            except TimeoutError:
                pass
            return await fn(rid, piece)

        orig_submit = D_inst.submit

        async def submit(*a: Any, **kw: Any) -> Any:
            out = await orig_submit(*a, **kw)
            recovered_on_d.set()
            return out

        D.hooks["migrate_stage"] = slow_stage
        D.hooks["submit"] = lambda fn, *a, **kw: submit(*a, **kw)
        out: list[Any] = []
        errs: list[BaseException] = []
        req = GenerateRequest("r", prompt_token_ids=list(range(1, 200)), sampling=SamplingParams(max_tokens=60))
        t = asyncio.create_task(consume(ing, req, out, errs))
        await until(lambda: len(out) >= 3)
        set_routable(ing, ["mixed-0", "mixed-1"])
        mig = asyncio.create_task(ing.migrate("r", "mixed-1"))
        await stage_entered.wait()
        S.dead = True  # the source's process dies mid-copy
        res = await asyncio.wait_for(mig, 10)
        assert not res.committed
        await asyncio.wait_for(t, 20)
        for i in (S_inst, D_inst):
            await i.shutdown()
        return out, errs, ing.counters["recoveries"]

    out, errs, recoveries = asyncio.run(scenario())
    assert not errs, f"the request failed: {errs!r}"
    assert out[-1].finish_reason == "length"
    toks = [i for c in out for i in range(c.index, c.index + len(c.token_ids))]
    assert toks == list(range(60))
    assert recoveries == 1, f"{recoveries} recoveries: the recovered request was killed on the destination"


# ---- C: C: SimulatedBackend.pause detaches a request while the engine's current step (already computed, now sleeping
# its modelled time) still carries that request's next token. The step then emits the token on the source *after*
# the snapshot was taken; when that token ends the request (a stop token, here), the request finishes while its
# paused blocks stay counted in ``prefill_blocks``: ``resume`` pops the paused entry and returns False without
# giving the blocks back, and the commit path's release (``Instance.abort``) finds no stream and never reaches the
# backend. The source leaks the request's KV blocks for good.
def _backend() -> SimulatedBackend:
    cfg = cluster_config("c", mixed=1)
    pool = cfg.pools[0]
    return SimulatedBackend(cfg.model, cfg.gpus[pool.gpu], engine=pool.engine, time_scale=1.0)


def test_a_paused_request_emits_nothing_more_and_frees_its_blocks() -> None:
    async def scenario() -> tuple[object, list, bool, int]:
        b = _backend()
        await b.start()
        try:
            k = 6
            stop = sim_token(b.seed, "r", k, b.vocab_size)
            req = EngineRequest("r", tuple(range(1, 300)), SamplingParams(max_tokens=100, stop_token_ids=(stop,)))
            gen = b.generate(req)
            async for c in gen:
                if c.index == k - 1:
                    break  # token k is being "computed" by the step in flight now
            res = await b.pause("r", 0)
            after: list = []  # what the source emits after its snapshot (the in-flight step's token)
            if not isinstance(res, str):
                try:
                    after.append(await asyncio.wait_for(gen.__anext__(), 0.5))
                except TimeoutError:
                    pass
            resumed = await b.resume("r")  # the migration aborted in FINAL_COPY: resume
            await b.abort("r")
            await asyncio.sleep(0.01)
            snap = None if isinstance(res, str) else res[0]
            return snap, after, resumed, (await b.stats()).kv_blocks_used
        finally:
            await b.shutdown()

    snap, after, resumed, used = asyncio.run(scenario())
    assert not after, (f"the source emitted {[(c.index, c.finish_reason) for c in after]} after its snapshot "
                       f"(num_output_tokens={snap.num_output_tokens})")  # type: ignore[union-attr]
    assert used == 0, f"{used} KV blocks still held after the request ended (resume -> {resumed})"


# ---- D: D: ``Instance.migrate_commit`` that is still waiting for the source's stop-and-copy (or copying it) when the
# driver gives up (step timeout, or a cancelled driver) and sends ``migrate_cancel`` goes on and admits the
# request anyway: an orphan copy decodes on the destination (re-prefilling its whole context: the cancel dropped
# the staged KV) with nobody polling it, holding KV until the poll lease (30 s) reaps it.
def test_commit_after_cancel_admits_nothing() -> None:
    async def scenario() -> tuple[object, bool, int]:
        (D,) = await start_instances(1, time_scale=0.0)
        try:
            tokens = tuple(range(1, 300))
            assert await D.migrate_reserve("r", len(tokens) + 64) is None
            stop: asyncio.Future = asyncio.get_running_loop().create_future()  # the source's stop, still running
            tmpl = EngineRequest("r", (), SamplingParams(max_tokens=1000, ignore_eos=True))
            commit = asyncio.create_task(D.migrate_commit("r", tmpl, [stop]))
            await asyncio.sleep(0.05)
            await D.migrate_cancel("r")  # the driver timed out on the commit step (or was cancelled): abort
            stop.set_result((MigrationSnapshot("r", tokens, 10), None))  # ... then the stop arrives
            res = await commit
            await asyncio.sleep(0.05)
            st = D._streams.get("r")
            return res, st is not None and not st.done, (await D.stats()).kv_blocks_used
        finally:
            await D.shutdown()

    res, running, used = asyncio.run(scenario())
    assert res is not None, "a cancelled migration's late commit was accepted"
    assert not running and used == 0, f"orphan copy on the destination: running={running}, {used} KV blocks"


# ---- E: E: ``Ingress.drain`` releases (kills) the drained instance as soon as no request on it has ``moving_to is None``
# -- i.e. right after the last migration *committed*, not after the streams switched. A consumer that reads slower
# than the engine decodes still has tokens the source produced before the stop sitting in the source's buffer; the
# release destroys them, the ingress follows the request to the destination (the "source died after commit"
# branch) and ``_accept`` refuses the gap: the client's stream fails with RuntimeError ("gap in stream").
class FakeController:
    def __init__(self, handles: dict[str, Handle]) -> None:
        self.handles = handles
        self.released: list[str] = []
        ctl = self

        class _M:
            def __init__(self, fn: Any) -> None:
                self.fn = fn

            def remote(self, *a: Any, **kw: Any) -> Any:
                return asyncio.ensure_future(self.fn(*a, **kw))

        async def set_draining(iid: str, flag: bool) -> None:
            return None

        async def release(iid: str, replace: bool = False) -> bool:
            ctl.released.append(iid)
            ctl.handles[iid].dead = True  # the actor is killed
            await ctl.handles[iid].inst.shutdown()
            return True

        self.set_draining = _M(set_draining)
        self.release = _M(release)


async def drain_pair() -> tuple[Instance, Handle, Ingress]:
    """Two in-process instances, an ingress routing to mixed-0 alone, and a Controller that releases them; returns
    mixed-1 (to shut it down at the end), its handle, the ingress."""
    S_inst, D_inst = await start_instances(2, time_scale=0.5)
    S, D = Handle(S_inst), Handle(D_inst)
    ing = make_ingress([S, D], routable=["mixed-0"])
    ing.controller = FakeController({"mixed-0": S, "mixed-1": D})
    return D_inst, D, ing


def test_drain_does_not_release_before_migrated_streams_switched() -> None:
    async def scenario() -> tuple[list[Any], list[BaseException]]:
        D_inst, _, ing = await drain_pair()
        out: list[Any] = []
        errs: list[BaseException] = []

        async def slow_consumer() -> None:  # e.g. a client on a slow link: the ingress polls as it reads
            try:
                async for c in ing.generate(GenerateRequest("r", prompt_token_ids=list(range(1, 100)),
                                                            sampling=SamplingParams(max_tokens=400))):
                    out.append(c)
                    await asyncio.sleep(0.3)
            except Exception as e:  # noqa: BLE001
                errs.append(e)

        t = asyncio.create_task(slow_consumer())
        await until(lambda: len(out) >= 2)
        set_routable(ing, ["mixed-0", "mixed-1"])
        moved = await ing.drain("mixed-0")
        assert moved == 1
        await asyncio.wait_for(t, 30)
        await D_inst.shutdown()
        return out, errs

    out, errs = asyncio.run(scenario())
    assert not errs, f"the client's stream failed: {errs!r}"
    toks = [i for c in out for i in range(c.index, c.index + len(c.token_ids))]
    assert toks == list(range(400)) and out[-1].finish_reason == "length"


# ---- F: F: a cancel that lands on *another* ingress replica (``Ingress.cancel`` -> Controller registry lookup -> abort
# on the entry's instances) while the owning replica's migration is in FINAL_COPY is lost: the source's stream
# ends "abort" (the cancel), the owning ingress reads that as the migration's handover (``_continues``: reason
# "abort" and ``moving_to`` set -- the release and a cancel are the same abort) and follows the request to the
# destination, which decodes it to the end. The cancel RPC answered True; the client's stream never stops.
class LookupController:
    def __init__(self, owner: Any) -> None:
        owner_ing = owner

        class _M:
            def remote(self, rid: str) -> Any:
                async def f() -> Any:
                    rec = owner_ing.registry.get(rid)
                    return None if rec is None else rec.entry("owner")
                return asyncio.ensure_future(f())

        self.lookup = _M()


def test_cancel_via_another_replica_during_final_copy_stops_the_request() -> None:
    async def scenario() -> tuple[list[Any], bool, bool, bool]:
        S_inst, D_inst = await start_instances(2, time_scale=0.5)
        S, D = Handle(S_inst), Handle(D_inst)
        owner = make_ingress([S, D], routable=["mixed-0"])
        other = make_ingress([S, D])
        other.controller = LookupController(owner)
        stopped = asyncio.Event()
        go = asyncio.Event()

        async def slow_commit(fn: Any, *a: Any, **kw: Any) -> Any:
            stopped.set()
            await go.wait()  # the stop-and-copy of a long context
            return await fn(*a, **kw)

        D.hooks["migrate_commit"] = slow_commit
        out: list[Any] = []

        async def consume() -> None:
            async for c in owner.generate(GenerateRequest("r", prompt_token_ids=list(range(1, 100)),
                                                          sampling=SamplingParams(max_tokens=400))):
                out.append(c)

        t = asyncio.create_task(consume())
        await until(lambda: len(out) >= 2)
        set_routable(owner, ["mixed-0", "mixed-1"])
        mig = asyncio.create_task(owner.migrate("r", "mixed-1"))
        await stopped.wait()
        answered = await other.cancel("r")  # the client's Cancel RPC reached the other replica
        go.set()
        res = await mig
        await asyncio.wait_for(t, 30)
        await asyncio.sleep(0.1)
        d_running = "r" in D_inst._streams and not D_inst._streams["r"].done
        for i in (S_inst, D_inst):
            await i.shutdown()
        return out, answered, res.committed, d_running

    out, answered, committed, d_running = asyncio.run(scenario())
    assert answered
    n = sum(len(c.token_ids) for c in out)
    assert out[-1].finish_reason == "abort", (
        f"cancelled (answered {answered}, migration committed {committed}) but the stream went on: "
        f"{n} tokens, ended {out[-1].finish_reason!r} on {out[-1].instance_id}")
    assert not d_running, "the destination still decodes the cancelled request"


# ---- H: migrate() without a destination (drain, an admin call) asked the router for a placement and booked it as a
# route: a phantom prefill on the pair's PREFILL instance (counted waiting there until the next refresh, and the
# lookahead router's prefill pressure there) while the decoder it goes to counted nothing.
def test_a_destination_pick_is_booked_on_the_destination_not_as_a_route(monkeypatch: pytest.MonkeyPatch) -> None:
    import scheduler.control.ingress_migration as migration_mod

    async def stop_here(*a: Any, **kw: Any) -> None:
        raise RuntimeError("picked")

    monkeypatch.setattr(migration_mod, "run_migration", stop_here)
    insts = [FakeInstance("prefill-0", InstanceRole.PREFILL), FakeInstance("decode-0", InstanceRole.DECODE),
             FakeInstance("decode-1", InstanceRole.DECODE)]
    ing = _ingress(insts)
    routed: list[Any] = []
    monkeypatch.setattr(ing.router, "on_routed", lambda info, d: routed.append(d))
    ing.registry.add(RequestRecord("r", (1, 2, 3), SamplingParams(max_tokens=20), instances=("decode-0",),
                                   output_token_ids=[5, 6], phase=Phase.DECODE))
    with pytest.raises(RuntimeError, match="picked"):
        asyncio.run(ing.migrate("r"))
    assert routed == []
    assert ing._pending == {"decode-1": 1}
    waiting = {s.instance_id: s.num_waiting for s in ing.view().instances}
    assert waiting == {"prefill-0": 0, "decode-0": 0, "decode-1": 1}


# ---- I: a request aborted where nobody polls it any more (its client left; a committed migration's copy freed after
# a cancel) kept its ended stream until the lease, and set_role counted it as running: a re-roling of that instance
# was deferred for lease_s (30 s by default) and abandoned when switch_timeout_s is shorter.
def test_an_aborted_unpolled_stream_does_not_hold_a_role_switch_back() -> None:
    async def scenario() -> tuple[str, str]:
        (inst,) = await start_instances(1, time_scale=0.2)
        await inst.submit(EngineRequest("r", tuple(range(1, 50)), SamplingParams(max_tokens=400)))
        await inst.submit(EngineRequest("s", tuple(range(1, 50)), SamplingParams(max_tokens=400)))
        busy = ""
        await inst.abort("r")  # the ingress stops polling "r" here
        await until(lambda: inst._streams["r"].done)
        try:
            await inst.set_role(InstanceRole.PREFILL)  # "s" still runs
        except ValueError as e:
            busy = str(e)
        await inst.abort("s")
        await until(lambda: all(st.done for st in inst._streams.values()))
        info = await inst.set_role(InstanceRole.PREFILL)
        await inst.shutdown()
        return busy, info.role.value

    busy, role = asyncio.run(scenario())
    assert "still has 1 request(s)" in busy
    assert role == "prefill"


# ---- J: the source dies right after a migration committed, before the ingress polled the tokens it produced up to
# the stop: the destination's stream starts at the snapshot's index, so the client's stream had a gap (the ingress
# refused it: RuntimeError "gap in stream"). The destination now re-sends the outputs of its context it was asked for.
def test_source_dying_after_commit_with_undelivered_tokens_leaves_no_gap() -> None:
    async def scenario() -> tuple[list[Any], list[BaseException], Any, Any]:
        S_inst, D_inst = await start_instances(2, time_scale=0.2)
        S, D = Handle(S_inst), Handle(D_inst)
        ing = make_ingress([S, D], routable=["mixed-0"])
        stall, die = asyncio.Event(), asyncio.Event()

        async def stalled_poll(fn: Any, *a: Any, **kw: Any) -> Any:
            if stall.is_set():  # the answers stop reaching the ingress; then the process dies
                await die.wait()
                raise RayActorError()
            return await fn(*a, **kw)

        S.hooks["poll"] = stalled_poll
        out: list[Any] = []
        errs: list[BaseException] = []
        req = GenerateRequest("r", prompt_token_ids=list(range(1, 100)), sampling=SamplingParams(max_tokens=60))
        t = asyncio.create_task(consume(ing, req, out, errs))
        await until(lambda: len(out) >= 3)
        stall.set()
        delivered = len(out)
        await until(lambda: S_inst._streams["r"].buffer and S_inst._streams["r"].buffer[-1].index >= delivered + 3)
        set_routable(ing, ["mixed-0", "mixed-1"])
        res = await ing.migrate("r", "mixed-1")
        S.dead = True
        die.set()
        await asyncio.wait_for(t, 20)
        seed, vocab = S_inst._backend.seed, S_inst._backend.vocab_size  # type: ignore[attr-defined]
        for i in (S_inst, D_inst):
            await i.shutdown()
        return out, errs, res, (seed, vocab)

    out, errs, res, (seed, vocab) = asyncio.run(scenario())
    assert res.committed
    assert not errs, f"the request failed: {errs!r}"
    assert out[-1].finish_reason == "length"
    assert [i for c in out for i in range(c.index, c.index + len(c.token_ids))] == list(range(60))
    assert [t for c in out for t in c.token_ids] == [sim_token(seed, "r", i, vocab) for i in range(60)]
