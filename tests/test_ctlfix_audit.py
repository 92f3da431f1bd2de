"""Control-plane leftovers: the Controller's admin ``scale``, a redeploy that drops a pool, the migration plans'
book, and the gRPC end of a request that ended ``error: ...``. Each test failed before its fix. The Controller ones
need no Ray: the fake Controller of ``tests/test_controller_audit.py`` (fake instance handles)."""

from __future__ import annotations

import asyncio
import inspect
import time
from typing import Any

import pytest

import scheduler.control.controller as controller_mod
import scheduler.control.controller_admin as admin_mod
from scheduler.core.types import InstanceRole
from scheduler.policy.migration import MigrationPlan, MigrationReason
from tests.test_controller_audit import FakeInstance, _controller, _member, _snap
from tests.test_ctlrelease_audit import _real_release


def _never_placed(ctrl: Any) -> Any:
    """A ``_create`` whose placement group never becomes ready (no room in the cluster)."""

    async def create(pool: Any, iid: str) -> None:
        try:
            await asyncio.Event().wait()
        finally:
            ctrl._pending.pop(iid, None)

    return create


def test_admin_scale_answers_after_a_bounded_wait_and_leaves_the_starts_going(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Scale(mixed, 2) on a cluster with no room: the admin call waited for the creation with no bound (a start
    waits up to start_timeout_s, 900 s, and a placement group with no room for good), so the operator's RPC never
    returned. It answers after SCALE_WAIT_S now, the creation still going on."""
    monkeypatch.setattr(admin_mod, "SCALE_WAIT_S", 0.2)
    ctrl = _controller([FakeInstance("mixed-0")], {"mixed": 1})
    ctrl._create = _never_placed(ctrl)

    async def run() -> None:
        t0 = time.monotonic()
        assert await asyncio.wait_for(ctrl.scale("mixed", 2), 2.0) == 1  # the previous desired count
        assert time.monotonic() - t0 < 1.0
        assert list(ctrl._pending) == ["mixed-1"] and not ctrl._pending["mixed-1"].done()  # not called off
        ctrl._pending["mixed-1"].cancel()

    asyncio.run(run())


def test_admin_scale_does_not_wait_for_another_pools_starts(monkeypatch: pytest.MonkeyPatch) -> None:
    """An instance of pool ``decode`` still starting (the reconcile loop's): Scale(prefill, 1), which starts nothing,
    waited for it all the same (``_reconcile(wait=True)`` waited for every creation in flight)."""
    ctrl = _controller([FakeInstance("prefill-0", InstanceRole.PREFILL)], {"prefill": 1, "decode": 1})
    ctrl._create = _never_placed(ctrl)

    async def run() -> None:
        await ctrl._reconcile(wait=False)  # the loop starts decode-1
        assert list(ctrl._pending) == ["decode-1"]
        assert await asyncio.wait_for(ctrl.scale("prefill", 1), 1.0) == 1
        ctrl._pending["decode-1"].cancel()

    asyncio.run(run())


class _Adopted(FakeInstance):
    """An adopted instance: ``start`` answers its record; ``shutdown`` records how it was released."""

    def __init__(self, iid: str) -> None:
        super().__init__(iid)
        self.shutdowns: list[str | None] = []

    async def _start(self) -> Any:
        return _member(self, self.iid.rsplit("-", 1)[0]).info

    async def _shutdown(self, broken: str | None = None) -> None:
        self.shutdowns.append(broken)


def test_a_redeploy_that_drops_a_pool_releases_its_instances_as_extras(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A redeploy of the same cluster whose config no longer has pool ``old``: the Controller adopted old-0, and
    starting it looked the pool up (``self._pools[...]``): the KeyError read as a start that failed, so the instance
    was released as broken -- its streams ended ENGINE_FAILED "did not start" (each counted against its request in
    the quarantine) -- and a start failure was booked for a pool that no longer exists. It is released as an extra
    now: its streams end RELEASED and continue elsewhere."""
    killed: list[str] = []
    monkeypatch.setattr(controller_mod.ray, "kill", lambda h, no_restart=True: killed.append(h.iid))
    monkeypatch.setattr(controller_mod, "remove_instance_pg", lambda cluster, iid: None)
    gone, kept = _Adopted("old-0"), _Adopted("mixed-0")
    ctrl = _real_release([kept], {"mixed": 1})
    ctrl._members["old-0"] = _member(gone, "old")

    async def run() -> None:
        await ctrl._start_adopted("old-0")
        await ctrl._start_adopted("mixed-0")
        await ctrl._stopped(["old-0"])

    asyncio.run(run())
    assert gone.shutdowns == [None]  # released, not broken
    assert killed == ["old-0"]
    assert list(ctrl._members) == ["mixed-0"] and kept.shutdowns == []
    assert ctrl._start_failures == {}


class _NoPlans:
    """A migration policy that plans nothing and records the plans dropped."""

    def __init__(self) -> None:
        self.dropped: list[str] = []

    def plan(self, view: Any, now: float) -> list[MigrationPlan]:
        return []

    def on_migration_dropped(self, request_id: str) -> None:
        self.dropped.append(request_id)


def test_plans_of_a_gone_ingress_leave_no_key_and_are_counted_dropped() -> None:
    """Plans not taken within 5 s are pruned, but the key of their ingress stayed in ``Controller._plans`` with an
    empty list, for good (ingress ids are random per process: one key per ingress that ever died holding a plan).
    And a pruned plan, counted ``planned``, was never counted ``dropped``: planned != committed + failed + dropped
    with nothing in flight."""
    ctrl = _controller([FakeInstance("mixed-0"), FakeInstance("mixed-1")], {"mixed": 2})
    ctrl._migration = policy = _NoPlans()
    ctrl._snapshots = {"mixed-0": _snap("mixed-0", 4), "mixed-1": _snap("mixed-1")}
    ctrl.migration_stats = {"planned": 2, "dropped": 0, "committed": 0, "failed": 0}
    old, new = time.time() - 6.0, time.time()
    ctrl._plans = {
        "ingress-dead": [(old, MigrationPlan("r1", "mixed-0", "mixed-1", MigrationReason.LOAD_BALANCE))],
        "ingress-live": [(new, MigrationPlan("r2", "mixed-0", "mixed-1", MigrationReason.LOAD_BALANCE))],
    }
    ctrl._policy_tick()
    assert list(ctrl._plans) == ["ingress-live"] and policy.dropped == ["r1"]
    assert ctrl.migration_stats["dropped"] == 1


# -- gRPC: a request that ended "error: ..." ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def srv():  # type: ignore[no-untyped-def]
    from scheduler.server.background import BackgroundServer
    from tests.test_apipolish_audit import _Faulty

    with BackgroundServer(lambda: _Faulty(max_model_len=4096)) as s:
        yield s


def test_grpc_stream_that_ended_in_an_engine_error_ends_internal_with_its_tokens(srv: Any) -> None:
    """A request whose engine raised on it ends ``error: <why>`` in the ingress. HTTP answers it 500 (or the tokens
    made, then an error event), but gRPC ended the stream OK with that finish_reason: the SDK's ``generate`` returned
    it as a result and ``stream`` ended normally -- a failure no caller that does not parse finish_reason sees. The
    stream ends INTERNAL with the reason now (final: not retried), after every token made, the last chunk's too."""
    import grpc

    from scheduler.client import Client, LLMSchedError

    with Client(srv.address, timeout_s=10, retries=3) as c:
        with pytest.raises(LLMSchedError) as exc:
            c.generate("hello there", max_tokens=4, request_id="err-gen")
        assert exc.value.code == grpc.StatusCode.INTERNAL
        assert exc.value.message == "error: ValueError: the engine refused it"
        got: list[Any] = []
        with pytest.raises(LLMSchedError) as exc:
            got.extend(c.stream("hello there", max_tokens=4, request_id="err-stream"))
        assert exc.value.code == grpc.StatusCode.INTERNAL
        # the first chunk, then the failing one's tokens; none marked finished
        assert [ch.index for ch in got] == [0, 1] and all(ch.token_ids for ch in got)
        assert not any(ch.finished for ch in got)


# -- the ingress tokenizes a long prompt off its event loop ----------------------------------------------------------
LONG_PROMPT = (
    "the quick brown fox jumps over the lazy dog. " * 4400
)  # 200 KB, ~120k tokens of the tiny model's


@pytest.fixture(scope="module")
def long_prompt_ingress(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """An ingress over a fake instance with the tiny model's tokenizer, and how long that takes on LONG_PROMPT."""
    from scheduler.control.tokenizer import HFTokenizer
    from tests.test_chat_template import _copy_tokenizer
    from tests.test_ingress_audit import FakeInstance as IngressInstance
    from tests.test_ingress_audit import _ingress

    tok = HFTokenizer(_copy_tokenizer(tmp_path_factory.mktemp("ctlfix") / "tok", None))
    ing = _ingress([IngressInstance("mixed-0")], tokenizer=tok)
    tok.encode(LONG_PROMPT)
    t0 = time.perf_counter()
    n = len(tok.encode(LONG_PROMPT))
    encode_s = time.perf_counter() - t0
    assert encode_s > 0.05, "the prompt is too short to show a stall on this machine"
    return ing, n, encode_s


def _longest_stall(coro: Any) -> tuple[Any, float]:
    """``coro``'s result (or exception) and the longest the event loop went without running a 1 ms ticker."""

    async def run() -> tuple[Any, float]:
        gaps: list[float] = []
        stop = asyncio.Event()

        async def ticker() -> None:
            last = time.perf_counter()
            while not stop.is_set():
                await asyncio.sleep(0.001)
                now = time.perf_counter()
                gaps.append(now - last)
                last = now

        t = asyncio.create_task(ticker())
        await asyncio.sleep(0.02)
        try:
            out: Any = await coro
        except Exception as e:  # noqa: BLE001 - returned for the test to check
            out = e
        stop.set()
        await t
        return out, max(gaps)

    return asyncio.run(run())


def test_a_long_prompt_is_tokenized_off_the_event_loop(no_ray: None, long_prompt_ingress: Any) -> None:
    """``Ingress._validate`` tokenized a text prompt on the event loop: a 200 KB prompt (~150 ms with the tiny
    model's tokenizer; a 4 MB one, the largest message, seconds) held every other stream, poll and report that long.
    (A thread alone would not do: tokenizers' ``encode`` holds the GIL; ``encode_batch`` releases it.) The chat
    template's rendering is cheap by comparison (about 1 ms for an 800 KB conversation) and stays on the loop."""
    from scheduler.control.api import GenerateRequest, InvalidRequest

    ing, n, encode_s = long_prompt_ingress
    err, stall = _longest_stall(anext(aiter(ing.generate(GenerateRequest("long", prompt=LONG_PROMPT)))))
    assert isinstance(err, InvalidRequest) and str(err).startswith(f"prompt: {n} tokens leave no room")
    assert stall < encode_s / 3


def test_http_usage_tokenizes_a_long_prompt_off_the_event_loop(
    no_ray: None, long_prompt_ingress: Any
) -> None:
    """The HTTP server's ``usage`` tokenized a text prompt again, on the event loop, at the end of every request
    that reports it (non-streamed, or ``include_usage``): the same stall as the ingress's."""
    from scheduler.control.api import GenerateRequest
    from scheduler.server import http_server

    ing, n, encode_s = long_prompt_ingress

    async def usage() -> Any:
        out = http_server._prompt_tokens(ing, GenerateRequest("u", prompt=LONG_PROMPT))
        return await out if inspect.isawaitable(out) else out  # it was a plain function

    count, stall = _longest_stall(usage())
    assert count == n and stall < encode_s / 3


# -- a stream whose client left does not hold its instance's release -------------------------------------------------
@pytest.mark.parametrize("direct", [False, True])
def test_a_stream_whose_client_left_does_not_hold_its_instances_shutdown(no_ray: None, direct: bool) -> None:
    """The client left mid-stream: the ingress aborted the request on its instance and stopped polling it. Polled
    over Ray, its poll in flight was cancelled with it, so the stream's ``abort`` end stayed on the instance, never
    taken, until the lease reaper -- and a release meanwhile (a scale-down, a drain, the server's shutdown) waited
    ``SHUTDOWN_HANDOVER_S`` (1 s) for a poll that never came. The ingress's abort tells the instance it polls the
    stream no more; the instance drops it once ended."""
    from scheduler.control.api import GenerateRequest
    from scheduler.engine.base import SamplingParams
    from tests.test_faults2_audit import _cluster

    async def run() -> tuple[list[str], float]:
        insts, ing = await _cluster(f"ctlfix-gone-{direct}", 1, 1.0, direct=direct)
        inst = next(iter(insts.values()))
        req = GenerateRequest(
            "gone", prompt_token_ids=tuple(range(1, 50)), sampling=SamplingParams(max_tokens=500)
        )
        gen = ing.generate(req)
        await anext(gen)
        await gen.aclose()  # the client left: the server closes the ingress stream
        await asyncio.sleep(0.3)
        left = list(inst._streams)
        t0 = time.monotonic()
        await inst.shutdown()
        took = time.monotonic() - t0
        await ing.close()
        return left, took

    left, took = asyncio.run(run())
    assert left == [] and took < 0.5


# -- the poll lease runs from a poll's end ----------------------------------------------------------------------------
def test_a_stream_with_a_poll_waiting_is_not_reaped(no_ray: None) -> None:
    """The instance renewed a stream's lease only when a poll started, so a poll that waited longer than the lease
    (a request queued for KV; the ingress polls with ``poll_timeout_s``, here above ``lease_s``) had its stream
    reaped under it as an orphan while its ingress waited on it: the poll answered ``abort``. A stream with a poll
    waiting is alive; its lease runs from the poll's end. (The ingress's read-ahead, ``_Ahead``, keeps polls back to
    back, so only this case was left: with the defaults, a 5 s poll and a 30 s lease, it does not arise.)"""
    from scheduler.engine.base import EngineRequest, SamplingParams, TokenChunk
    from tests.test_instance_leases import LEASE_S, _instance

    async def slow_first(request: EngineRequest) -> Any:  # queued for 3 leases, then two tokens
        await asyncio.sleep(LEASE_S * 3)
        yield TokenChunk(request.request_id, 0, (7,))
        yield TokenChunk(request.request_id, 1, (8,), True, "length")

    aborted: list[str] = []

    async def abort(request_id: str) -> None:  # the engine's: this fake stream ignores it
        aborted.append(request_id)

    async def scenario() -> TokenChunk | None:
        inst = _instance()
        await inst.start()
        inst._backend.generate, inst._backend.abort = slow_first, abort
        try:
            await inst.submit(EngineRequest("queued", tuple(range(1, 65)), SamplingParams(max_tokens=2)))
            out = await inst.poll("queued", LEASE_S * 10)  # one poll, waiting past the lease
            assert "queued" in inst._streams or out.finished  # not dropped as an orphan either
            return out
        finally:
            await inst.shutdown()

    out = asyncio.run(asyncio.wait_for(scenario(), 30))
    assert aborted == [] and out is not None and out.token_ids[:1] == (7,)


# ---- a redeploy with a new pool count ---------------------------------------------------------------------------------
def test_a_redeploy_with_a_new_count_takes_it_and_a_restart_keeps_the_scaled_size() -> None:
    """The Controller restored each pool's saved desired size whatever the config said: a redeploy of the same
    cluster with ``count`` 4 -> 6 (instances alive, so the saved sizes survive) kept the size saved before it. The
    counts a size was saved under are saved beside it: a pool whose configured count changed takes the new one."""
    from scheduler.control.controller import restored_desired

    counts = {"prefill": 4, "decode": 2}
    scaled = {"prefill": 5, "decode": 3}  # an admin scale / the scaling loop moved both
    # A restart (same config): the scaled sizes stay.
    assert restored_desired(counts, scaled, {"prefill": 4, "decode": 2}) == {"prefill": 5, "decode": 3}
    # A redeploy changing prefill's count only: prefill takes it, decode keeps its scaled size.
    assert restored_desired({"prefill": 6, "decode": 2}, scaled, {"prefill": 4, "decode": 2}) == {
        "prefill": 6, "decode": 3}
    # Sizes saved by an older Controller (no counts beside them) are kept, as before; pools gone or new are not.
    assert restored_desired({"prefill": 6, "new": 1}, {"prefill": 5, "gone": 9}, None) == {"prefill": 5, "new": 1}
    assert restored_desired(counts, None, None) == counts


def test_the_controller_saves_the_counts_beside_the_sizes_and_restores_by_them() -> None:
    """``Controller._save_desired`` / ``_load_desired`` through its KV (a dict standing in for Ray's)."""
    from types import SimpleNamespace

    from scheduler.control.controller import Controller

    kv: dict[str, object] = {}

    def ctl(counts: dict[str, int]) -> SimpleNamespace:
        pools = [SimpleNamespace(name=k, count=v) for k, v in counts.items()]
        c = SimpleNamespace(config=SimpleNamespace(pools=pools), _kv_put=kv.__setitem__, _kv_get=kv.get)
        c._desired = Controller._load_desired(c)
        return c

    first = ctl({"mixed": 2})
    first._desired["mixed"] = 5  # scaled up
    Controller._save_desired(first)
    assert ctl({"mixed": 2})._desired == {"mixed": 5}  # restarted: the scaled size
    assert ctl({"mixed": 3})._desired == {"mixed": 3}  # redeployed with a new count: the count
