"""Regressions from the third audit of live fault handling. Each test failed before its fix.

Most run without Ray: real ``Instance`` objects over the simulated backend behind in-process handles
(``tests/test_chaos.py``), as in ``tests/test_faults2_audit.py``. One runs the real thing on a Ray cluster (3 MIXED
simulated instances, ``hang_timeout_s`` 10) shared by the module."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from scheduler.config.models import UNHEALTHY_AFTER_S, ClusterConfig
from scheduler.engine.base import SamplingParams
from tests.test_control_plane import GPUS, MODEL, SIM, _collect, _req


def test_a_hang_timeout_below_the_unhealthy_bound_is_refused_naming_the_field() -> None:
    """``pools[].hang_timeout_s`` took 5 s, below the 10 s (``UNHEALTHY_AFTER_S``) for which a silent instance's last
    snapshot still stands: a snapshot merely slow on a loaded host then read as hung, and the Controller released a
    busy instance with its streams. Refused at config load, naming the field; the bound itself is accepted."""
    pool = {"name": "mixed", "gpu": "a100", "hang_timeout_s": UNHEALTHY_AFTER_S - 0.5}
    with pytest.raises(ValueError, match=r"pools\.0\.hang_timeout_s\n.*greater than or equal to 10"):
        ClusterConfig.model_validate({"gpus": GPUS, "model": MODEL, "pools": [pool]})
    pool["hang_timeout_s"] = UNHEALTHY_AFTER_S
    cfg = ClusterConfig.model_validate({"gpus": GPUS, "model": MODEL, "pools": [pool]})
    assert cfg.pools[0].hang_timeout_s == UNHEALTHY_AFTER_S


_CALLS = ("submit", "poll", "snapshot", "abort", "stats")


# ---- 1: a request that takes its instance down (kills the actor, blocks its event loop) is quarantined ----------
def _goes_down_under(inst: Any, rid: str, how: str) -> list[str]:
    """Once ``rid`` runs on ``inst`` (its submit answered), the instance goes down for every caller: ``how`` is
    "dies" (calls raise ``ActorDiedError``: the Controller killed it, or the request crashed its process) or "blocks"
    (calls never answer: the request's engine call blocked the actor's event loop). Returns the list the instance's
    id is appended to when it goes down. Calls go through the instance's attributes: the ingress uses Ray calls."""
    from ray.exceptions import ActorDiedError

    down: list[str] = []

    async def gone() -> Any:
        if how == "dies":
            raise ActorDiedError()
        await asyncio.sleep(3600)

    def wrap(name: str) -> None:
        real = getattr(inst, name)

        async def call(*args: Any, **kw: Any) -> Any:
            if down:
                return await gone()
            out = await real(*args, **kw)
            if name == "submit" and args[0].request_id == rid:
                down.append(inst.instance_id)
            return out

        setattr(inst, name, call)

    for name in _CALLS:
        wrap(name)
    return down


@pytest.mark.usefixtures("no_ray")
@pytest.mark.parametrize("how", ["dies", "blocks"])
def test_a_request_that_takes_down_every_instance_it_runs_on_is_quarantined(how: str) -> None:
    """A request that blocks its instance's event loop (an engine call that never yields) makes the instance stop
    answering, and the Controller kills it: to the ingress a poll that times out, or an actor death. Neither counted
    toward the quarantine (only an engine that reported its failure did), so such a request was recovered onto every
    instance in turn: here all four went down, and it ended UNAVAILABLE, which the SDK retries. Counted as an engine
    failure, it ends ``RequestFailed`` after ``quarantine_after`` (3) instances; the fourth survives."""
    from scheduler.control.api import GenerateRequest, RequestFailed
    from tests.test_faults2_audit import _cluster, _teardown
    from tests.test_ingress_audit import _consume
    from tests.test_ingress_migration_audit import _FirstOnMixed0

    async def scenario() -> tuple[BaseException | None, list[str]]:
        insts, ing = await _cluster(
            f"qod-{how}", 4, 0.2, router=_FirstOnMixed0(), direct=False, max_recoveries=5, poll_timeout_s=0.2
        )
        try:
            downs = [_goes_down_under(inst, "qod", how) for inst in insts.values()]
            req = GenerateRequest(
                "qod", prompt="bad", sampling=SamplingParams(max_tokens=400, ignore_eos=True)
            )
            try:
                await asyncio.wait_for(_consume(ing, req, []), 40)
            except Exception as e:  # noqa: BLE001 - the answer under test
                return e, [i for d in downs for i in d]
            return None, [i for d in downs for i in d]
        finally:
            for inst in insts.values():  # up again, for the teardown's shutdown
                for name in _CALLS:
                    vars(inst).pop(name, None)
            await _teardown(insts, ing)

    err, down = asyncio.run(asyncio.wait_for(scenario(), 60))
    assert isinstance(err, RequestFailed), repr(err)
    assert "failed 3 engines" in str(err), str(err)
    assert len(down) == 3, down


# ---- 2: a hung KV export is the source's fault, not the decoder's -------------------------------------------------
@pytest.mark.usefixtures("no_ray")
def test_a_decode_whose_kv_export_hangs_recomputes_the_prompt_and_blames_the_source(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The prefill instance's KV export hangs after token 0 (its engine stuck in the copy): Ray holds the decode
    instance's ``submit`` until its ObjectRef argument resolves, so the submit timed out and the healthy decode
    instance was blamed -- taken for unresponsive, left out of the recovery's route (with one decode instance the
    request failed UNAVAILABLE) and counted toward the request's quarantine. The export is the source's: it is called
    off, the source is blamed (counted toward the quarantine), and the decode instance recomputes the prompt, as for a
    failed export."""
    import tests.test_chaos as chaos
    from bench.loadgen import cluster_config
    from scheduler.control.api import GenerateRequest
    from tests.test_faults2_audit import _cluster_of, _teardown
    from tests.test_ingress_audit import _consume

    class RayMethod(
        chaos._Method
    ):  # as Ray: a caller that stops waiting for a call does not cancel its arguments
        async def _call(self, *args: Any, **kw: Any) -> Any:
            args = tuple([await asyncio.shield(a) if isinstance(a, asyncio.Future) else a for a in args])
            return await self.fn(*args, **kw)

    monkeypatch.setattr(chaos, "_Method", RayMethod)
    cfg = cluster_config("pd-export-hangs", mixed=0, prefill=1, decode=1)
    called_off: list[bool] = []

    async def scenario() -> tuple[list[Any], Any]:
        insts, ing = await _cluster_of(cfg, 0.0, submit_timeout_s=1.0)

        async def export_hangs(*_: Any) -> Any:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                called_off.append(True)
                raise

        insts["prefill-0"].export_kv = export_hangs  # type: ignore[method-assign]  # the handles look it up per call
        out: list[Any] = []
        try:
            req = GenerateRequest(
                "pdh", prompt="hello there", sampling=SamplingParams(max_tokens=8, ignore_eos=True)
            )
            task = asyncio.create_task(_consume(ing, req, out))
            while not out:
                await asyncio.sleep(0.005)
            rec = ing.registry.get("pdh")
            await asyncio.wait_for(task, 20)
            return out, rec
        finally:
            await _teardown(insts, ing)

    out, rec = asyncio.run(asyncio.wait_for(scenario(), 40))
    assert out[-1].finish_reason == "length", out[-1]
    assert [c.index + k for c in out for k in range(len(c.token_ids))] == list(range(8))
    assert {c.instance_id for c in out if c.index > 0 and c.token_ids} == {"decode-0"}
    assert rec.recoveries == 0 and rec.failed_engines == ("prefill-0",), (rec.recoveries, rec.failed_engines)
    assert called_off, "the hung export was left running on the source"


# ---- 4: a request submitted to an instance being released -----------------------------------------------------------
@pytest.mark.usefixtures("no_ray")
@pytest.mark.parametrize("broken", [None, "hung: test"])
def test_a_submit_during_a_release_is_refused_as_leaving(broken: str | None) -> None:
    """An instance being released (``shutdown``: the Controller kills the actor right after) still started new
    requests: one routed there during the release began decoding and ended in the kill, an actor death to the ingress,
    which its quarantine counts as a failure under the request -- though a release for a scale-down or by an admin is
    no failure. Then (thirty-ninth session) such a submit ended at once as the released streams do: ``released``
    (re-prefilled elsewhere, a P->D handoff's KV thrown away) or ``engine failed: ...`` (counted against a request
    that never ran there). Now it is refused as leaving (``draining: ... being released``): the ingress routes it,
    a handoff's KV included, to another instance -- not a recovery, nor a failure."""
    from bench.loadgen import cluster_config
    from scheduler.control.instance import DRAINING, Instance
    from scheduler.engine.base import EngineRequest

    cfg = cluster_config("closing", mixed=1)
    pool = cfg.pools[0]

    async def scenario() -> Any:
        inst = Instance("mixed-0", pool, cfg.model, cfg.gpus[pool.gpu], backend_kwargs={"time_scale": 0.2})
        await inst.start()
        await inst.submit(EngineRequest("r1", tuple(range(1, 65)), SamplingParams(max_tokens=200)))
        closing = asyncio.create_task(inst.shutdown(broken=broken))
        await asyncio.sleep(0.1)  # in its hand-over wait: r1's end is not polled
        assert not closing.done()
        try:
            return await inst.submit(EngineRequest("r2", tuple(range(1, 65)), SamplingParams(max_tokens=200)))
        finally:
            await closing

    sub = asyncio.run(asyncio.wait_for(scenario(), 20))
    assert not sub.chunks and sub.leaving, sub
    assert sub.rejected == f"{DRAINING}: mixed-0 is being released; it takes no new requests", sub


# ---- 5: a release whose engine's abort raises ------------------------------------------------------------------------
@pytest.mark.usefixtures("no_ray")
def test_a_release_whose_engine_abort_raises_still_ends_every_stream_and_closes() -> None:
    """``Instance.shutdown`` ended its streams one by one through the engine's abort and stopped at the first that
    raised (vLLM's ``abort`` raises ``EngineDeadError`` on a dead engine core): the other streams never ended
    ``released`` -- they ended in the kill, an actor death the quarantine counts --, and the channel and backend were
    not shut down. Each stream ends ``released`` now, through the engine where its abort works, here otherwise."""
    from bench.loadgen import cluster_config
    from scheduler.control.instance import RELEASED, Instance
    from scheduler.engine.base import EngineRequest

    cfg = cluster_config("abort-raises", mixed=1)
    pool = cfg.pools[0]

    async def scenario() -> tuple[list[Any], bool]:
        inst = Instance("mixed-0", pool, cfg.model, cfg.gpus[pool.gpu], backend_kwargs={"time_scale": 1.0})
        await inst.start()
        for rid in ("r1", "r2"):
            await inst.submit(EngineRequest(rid, tuple(range(1, 65)), SamplingParams(max_tokens=3000)))

        async def dead(request_id: str) -> None:
            raise RuntimeError("EngineDeadError: EngineCore encountered an issue")

        inst._backend.abort = dead  # type: ignore[union-attr]
        real_shutdown, shut = inst._backend.shutdown, []  # type: ignore[union-attr]

        async def shutdown() -> None:
            shut.append(True)
            await real_shutdown()

        inst._backend.shutdown = shutdown  # type: ignore[union-attr]

        async def end_of(rid: str) -> Any:
            deadline = time.monotonic() + 3.0  # its end comes at once, or never (the kill ends it)
            while True:
                c = await inst.poll(rid, 1.0)
                if c is None or c.finished or time.monotonic() > deadline:
                    return c

        polls = [asyncio.create_task(end_of(rid)) for rid in ("r1", "r2")]
        await asyncio.sleep(0.05)
        try:
            await inst.shutdown()
        except RuntimeError:
            pass  # what it did before: the caller (the Controller) kills the actor then
        return [await p for p in polls], bool(shut)

    ends, shut_down = asyncio.run(asyncio.wait_for(scenario(), 20))
    assert [e is not None and e.finished and e.finish_reason for e in ends] == [RELEASED, RELEASED], ends
    assert shut_down, "the backend was not shut down"


# ---- 6: one silent instance and the view of the others ---------------------------------------------------------------
@pytest.mark.usefixtures("no_ray")
def test_one_silent_instance_does_not_slow_the_view_of_the_others() -> None:
    """The ingress's refresh asked every instance for its snapshot and waited for all, up to 1 s each round: while one
    instance did not answer (a blocked actor, a step holding the stats lock -- up to its ``hang_timeout_s``, 60 s by
    default) the whole view was refreshed once a second instead of every ``refresh_s`` (10 ms here: 2 refreshes in
    2 s), and routers read the other instances' load that late. The silent one's call is kept, not waited for again;
    it still leaves the view once silent for ``UNHEALTHY_AFTER_S``, as before."""
    from tests.test_faults2_audit import _cluster, _teardown

    async def scenario() -> int:
        insts, ing = await _cluster("silent", 3, 0.0, direct=False)
        try:

            async def silent() -> Any:
                await asyncio.sleep(3600)

            insts["mixed-2"].snapshot = silent  # type: ignore[method-assign]
            await asyncio.sleep(1.5)  # its first call times out
            seen = set()
            for _ in range(200):
                await asyncio.sleep(0.01)
                seen.add(ing.view_refreshed_s)
            return len(seen)
        finally:
            vars(insts["mixed-2"]).pop("snapshot", None)
            await _teardown(insts, ing)

    refreshes = asyncio.run(asyncio.wait_for(scenario(), 30))
    assert refreshes >= 20, refreshes


def test_one_silent_instance_does_not_slow_the_controllers_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    """The Controller's refresh likewise waited up to 2 s a round for a silent instance's snapshot: every round of its
    loop (deaths noticed, replacements started, the policies' view) ran 2 s late for as long as the instance stayed
    silent (up to its ``hang_timeout_s``). Its call is kept; later rounds do not wait for it, and its silence still
    counts toward the hang verdict."""
    from tests.test_controller_audit import FakeInstance, _controller

    real = FakeInstance._snapshot

    async def snapshot(self: Any) -> Any:
        if self.iid == "mixed-1":
            await asyncio.sleep(3600)
        return await real(self)

    monkeypatch.setattr(FakeInstance, "_snapshot", snapshot)
    ctrl = _controller([FakeInstance("mixed-0"), FakeInstance("mixed-1")], {"mixed": 2})

    async def scenario() -> list[float]:
        took = []
        for _ in range(3):
            t0 = time.monotonic()
            await ctrl._refresh()
            took.append(time.monotonic() - t0)
        return took

    took = asyncio.run(asyncio.wait_for(scenario(), 30))
    assert took[0] >= 1.9 and max(took[1:]) < 0.5, (
        took
    )  # the first round finds it silent, the next ones go on
    assert "mixed-1" in ctrl._failing and "mixed-0" not in ctrl._failing


# ---- 1, live: a request that blocks its instance's event loop ------------------------------------------------------
BLOCK_CFG = ClusterConfig.model_validate(
    {
        "name": "qodblock",
        "gpus": GPUS,
        "model": MODEL,
        "pools": [
            {"name": "mixed", "role": "mixed", "gpu": "a100", "count": 3, "hang_timeout_s": UNHEALTHY_AFTER_S}
        ],
    }
)


@pytest.fixture(scope="module")
def qodblock(local_ray: Any, aloop: Any) -> Any:
    from scheduler.control.cluster import deploy

    dep = deploy(
        BLOCK_CFG,
        name="qodblock",
        controller_name="llmsched-controller-qodblock",
        backend_kwargs=SIM,
        refresh_s=0.05,
    )
    ing = dep.make_ingress(quarantine_after=2, max_recoveries=3)
    aloop.run(ing.start())
    yield dep, ing
    aloop.run(ing.close())
    dep.shutdown()


def _blocks_its_loop_while_decoding(inst: Any, rid: str = "qod-block") -> None:
    """Make the instance's simulated engine block the actor's event loop once ``rid`` decodes there (an engine call
    that never yields): no snapshot, poll or submit answers from then on, until the Controller kills the actor."""

    engine = inst._backend.engine
    real = engine.step

    def step(*a: Any, **kw: Any) -> Any:
        if rid in engine.decoding:
            time.sleep(300)  # bounded, should the kill not come
        return real(*a, **kw)

    engine.step = step


def test_a_request_that_blocks_every_instances_event_loop_is_quarantined(qodblock: Any, aloop: Any) -> None:
    """Live: each instance the request reached stopped answering, the Controller killed it as silent, and the ingress
    recovered the request elsewhere (an actor death, or a poll that timed out) -- neither counted by the quarantine:
    the request blocked all three instances one after another (then ran on a replacement, which this test leaves
    unpatched; a real query of death blocks those too, up to ``max_recoveries``, then UNAVAILABLE, which the SDK
    retries). Now it ends ``RequestFailed`` after ``quarantine_after`` (2) instances."""
    import ray

    from scheduler.control.api import RequestFailed

    dep, ing = qodblock
    for m in ray.get(dep.controller.members.remote()).values():
        ray.get(m.handle.__ray_call__.remote(_blocks_its_loop_while_decoding))
    with pytest.raises(RequestFailed, match="failed 2 engines"):
        aloop.run(_collect(ing, _req("qod-block", 64, 400)), timeout=6 * UNHEALTHY_AFTER_S + 30)
    assert ing.counters["quarantined"] == 1
