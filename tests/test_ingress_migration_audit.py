"""Regressions from an audit of the live ingress's migration and recovery paths (no Ray: the fake actor handles of
``tests/test_ingress_audit.py``, and real ``Instance`` objects over the simulated backend for engine failures).
Each test failed before its fix."""

from __future__ import annotations

import asyncio
from typing import Any

from scheduler.core.types import ClusterView, InstanceRole
from scheduler.engine.base import SamplingParams
from scheduler.policy.route import RouteDecision, Router
from tests.test_ingress_audit import FakeInstance, _ingress


class _Borrow(Router):
    """Answers as the pairing routers' Splitwise borrow does: a PREFILL instance named as both prefill and decode."""

    name = "borrow"

    def route(self, request: Any, view: ClusterView) -> Any:
        return RouteDecision("prefill-0", "prefill-0")


def _decoding(ing: Any, src: FakeInstance, rid: str = "r", outputs: int = 5, max_tokens: int = 400) -> Any:
    """A request in its decode phase on ``src``, registered on ``ing`` and running on the fake."""
    from scheduler.control.registry import Phase, RequestRecord

    rec = RequestRecord(
        rid,
        tuple(range(1, 21)),
        SamplingParams(max_tokens=max_tokens),
        instances=(src.iid,),
        output_token_ids=[7] * outputs,
        phase=Phase.DECODE,
    )
    ing.registry.add(rec)
    src.streams[rid] = {
        "next": outputs,
        "left": max_tokens - outputs,
        "paused": False,
        "done": False,
        "ev": asyncio.Event(),
    }
    return rec


# ---- 1: a destination the ingress picks itself is never a PREFILL instance --------------------------------------
def test_a_picked_migration_destination_is_an_instance_that_decodes() -> None:
    """``migrate`` without a destination (and so every drain) took the router's answer for a new request: a PREFILL
    instance when the router named one (a Splitwise borrow), which then decoded the request in full. The simulator's
    migration policy only moves requests to instances that decode: the idle DECODE instance is the one."""

    async def scenario() -> tuple[Any, FakeInstance]:
        S = FakeInstance("mixed-0")
        P = FakeInstance("prefill-0", InstanceRole.PREFILL)
        D = FakeInstance("decode-0", InstanceRole.DECODE)
        ing = _ingress([S, P, D], router=_Borrow())
        _decoding(ing, S)
        return await ing.migrate("r"), P

    res, P = asyncio.run(scenario())
    assert res.committed and res.destination == "decode-0", res
    assert "r" not in P.streams


def test_no_instance_that_decodes_is_no_destination_not_a_prefill_instance() -> None:
    """With no other instance that decodes, the request stays where it is, and the reason says why (it was moved to
    the PREFILL instance the router named)."""

    async def scenario() -> Any:
        S = FakeInstance("mixed-0")
        P = FakeInstance("prefill-0", InstanceRole.PREFILL)
        ing = _ingress([S, P], router=_Borrow())
        _decoding(ing, S)
        return await ing.migrate("r")

    res = asyncio.run(scenario())
    assert not res.committed and not res.started, res
    assert "destination" in res.reason and "DECODE or MIXED" in res.reason and "mixed-0" in res.reason, (
        res.reason
    )


# ---- 2: a picked destination is booked once --------------------------------------------------------------------
def test_a_picked_migration_destination_counts_the_request_once() -> None:
    """The ingress booked a destination it picked at the pick and again at the commit: with no refresh in between,
    the destination counted two waiting requests for one migrated request (and a drain's next picks avoided it)."""

    async def scenario() -> tuple[int, int, int]:
        S, D = FakeInstance("mixed-0"), FakeInstance("mixed-1")
        ing = _ingress([S, D])
        rec = _decoding(ing, S)
        seen: list[tuple[int, int]] = []
        switch = ing._switch

        def on_commit(*a: Any) -> None:
            switch(*a)
            s = ing.view().by_id("mixed-1")
            seen.append((s.num_waiting, s.prefill_tokens_pending))

        ing._switch = on_commit  # type: ignore[method-assign]
        res = await ing.migrate("r")
        assert res.committed and res.destination == "mixed-1", res
        return (*seen[0], len(rec.prompt_token_ids) + rec.next_index)

    waiting, queued, context = asyncio.run(scenario())
    assert (waiting, queued) == (1, context)


def test_a_picked_destination_is_booked_again_at_the_commit_after_a_refresh_took_the_pick() -> None:
    """The guard of the fix above: once a refresh took the pick's booking (the destination's snapshot does not show
    the request before the commit), the commit books it, as for a given destination."""

    async def scenario() -> int:
        S, D = FakeInstance("mixed-0"), FakeInstance("mixed-1")
        ing = _ingress([S, D])
        _decoding(ing, S)
        orig = D._migrate_reserve

        async def reserve_then_refresh(*a: Any, **kw: Any) -> Any:
            await ing._refresh_view()  # the snapshots of a refresh between the pick and the commit
            return await orig(*a, **kw)

        D._migrate_reserve = reserve_then_refresh  # type: ignore[method-assign]
        seen: list[int] = []
        switch = ing._switch

        def on_commit(*a: Any) -> None:
            switch(*a)
            seen.append(ing.view().by_id("mixed-1").num_waiting)

        ing._switch = on_commit  # type: ignore[method-assign]
        assert (await ing.migrate("r")).committed
        return seen[0]

    assert asyncio.run(scenario()) == 1


# ---- 3: a query of death is quarantined, not recovered onto every engine ----------------------------------------
class _FirstOnMixed0(Router):
    """New requests on mixed-0 (co-located); recoveries (accepted) where ``least_outstanding`` puts them."""

    name = "first_on_mixed0"

    def __init__(self) -> None:
        from scheduler.policy.route import make_router

        self.base = make_router("least_outstanding")

    def route(self, request: Any, view: ClusterView) -> Any:
        return self.base.route(request, view) if request.accepted else RouteDecision("mixed-0")


def _fails_while_decoding(inst: Any, rid: str) -> None:
    """Make the instance's simulated engine raise on a step while ``rid`` decodes there (a request that crashes
    the engine: a kernel fault on its input, say)."""
    engine = inst._backend.engine
    real = engine.step

    def step(*a: Any, **kw: Any) -> Any:
        if rid in engine.decoding:
            raise RuntimeError(f"device fault ({rid})")
        return real(*a, **kw)

    engine.step = step


def test_a_request_that_fails_every_engine_it_runs_on_is_quarantined_and_its_neighbour_survives(
    no_ray: None,
) -> None:
    """A "query of death" was recovered up to ``max_recoveries`` times, then ended UNAVAILABLE, which the SDK
    retries twice: one bad request could fail (max_recoveries + 1) x 3 engines. Here it failed all four engines,
    the last of them under a request that had merely been co-located with it once, which then failed too. After
    ``quarantine_after`` (3) engines it ends ``RequestFailed`` (gRPC INTERNAL: not retried) and fails no more; the
    co-located request is recovered and completes."""
    from scheduler.control.api import GenerateRequest, RequestFailed
    from tests.test_faults2_audit import _cluster, _teardown
    from tests.test_ingress_audit import _consume

    async def scenario() -> tuple[BaseException | None, list[Any], int]:
        insts, ing = await _cluster("qod", 4, 1.0, router=_FirstOnMixed0())
        try:
            for inst in insts.values():
                _fails_while_decoding(inst, "qod")
            victim: list[Any] = []
            v = asyncio.create_task(
                _consume(
                    ing,
                    GenerateRequest(
                        "v", prompt="hello", sampling=SamplingParams(max_tokens=150, ignore_eos=True)
                    ),
                    victim,
                )
            )
            while not victim:
                await asyncio.sleep(0.005)
            err: BaseException | None = None
            try:
                await asyncio.wait_for(
                    _consume(
                        ing,
                        GenerateRequest(
                            "qod", prompt="bad", sampling=SamplingParams(max_tokens=150, ignore_eos=True)
                        ),
                        [],
                    ),
                    20,
                )
            except Exception as e:  # noqa: BLE001 - the answer under test
                err = e
            await asyncio.gather(asyncio.wait_for(v, 30), return_exceptions=True)
            return err, victim, ing.counters.get("quarantined", 0)
        finally:
            await _teardown(insts, ing)

    err, victim, quarantined = asyncio.run(asyncio.wait_for(scenario(), 60))
    assert isinstance(err, RequestFailed), repr(err)
    assert "failed 3 engines" in str(err), str(err)
    assert quarantined == 1
    assert victim and victim[-1].finish_reason == "length", victim[-1:]
    assert [c.index + k for c in victim for k in range(len(c.token_ids))] == list(range(150))


def test_a_quarantined_request_is_a_final_status_the_sdk_does_not_retry() -> None:
    """The quarantine's answer is gRPC INTERNAL with its message (UNAVAILABLE is what the SDK retries), HTTP 500."""
    import grpc

    from scheduler.client._common import RETRYABLE
    from scheduler.control.api import RequestFailed
    from scheduler.server.grpc_server import status_for
    from scheduler.server.http_server import http_error_for

    err = RequestFailed("request q failed 3 engines it ran on (a, b, c): not recovered or retried further")
    code, message, _ = status_for(err)
    assert code is grpc.StatusCode.INTERNAL and code not in RETRYABLE
    assert "failed 3 engines" in message
    assert http_error_for(err).status == 500


# ---- 4: a drain waits for P->D requests on their way to the drained decoder ------------------------------------
def test_a_drain_of_a_decoder_moves_the_requests_on_their_way_to_it_instead_of_re_prefilling_them() -> None:
    """``Ingress.drain`` migrated the requests on the instance and released it, but a P->D request still prefilling
    elsewhere with the drained decoder named for its decode is on no instance there yet (``registry.on_instance``):
    the drain released the decoder under it, its KV landed on a dead instance and the request was re-prefilled
    elsewhere (a recovery). The simulator waits for it (``Simulator.is_empty``), as the Controller's drains do since
    the ingress reports the decoder (``_report``). The drain must wait for it to land, then move it -- or, since the
    handoff picks a decoder in service when the one paired at arrival is draining, the request decodes on
    decode-1 directly: nothing to move, nothing re-prefilled (tests/test_drain_node_pd.py)."""
    from ray.exceptions import RayActorError

    from scheduler.control.api import GenerateRequest
    from tests.test_ingress_audit import _consume, _Method

    P = FakeInstance("prefill-0", InstanceRole.PREFILL)
    D0 = FakeInstance("decode-0", InstanceRole.DECODE)
    D1 = FakeInstance("decode-1", InstanceRole.DECODE)
    D1.streams["busy"] = {"next": 0, "left": 10**6, "paused": False, "done": False, "ev": asyncio.Event()}

    async def busy_snapshot() -> Any:  # decode-1 runs something: a new request's decoder is decode-0
        from scheduler.core.types import InstanceSnapshot

        return InstanceSnapshot("decode-1", InstanceRole.DECODE, num_running=1)

    D1._snapshot = busy_snapshot  # type: ignore[method-assign]
    orig_submit = P._submit

    async def slow_prefill(*a: Any, **kw: Any) -> Any:
        await asyncio.sleep(0.3)
        return await orig_submit(*a, **kw)

    P._submit = slow_prefill  # type: ignore[method-assign]

    async def dead(*a: Any, **kw: Any) -> Any:
        raise RayActorError()

    async def set_draining(iid: str, flag: bool = True) -> bool:
        return True

    async def release(iid: str, **kw: Any) -> bool:
        for name in ("_submit", "_poll", "_migrate_reserve", "_migrate_context", "_abort"):
            setattr(D0, name, dead)  # the actor is killed
        return True

    class Ctrl:
        pass

    Ctrl.set_draining, Ctrl.release = _Method(set_draining), _Method(release)  # type: ignore[attr-defined]

    async def scenario() -> tuple[list[Any], int, int]:
        ing = _ingress([P, D0, D1], controller=Ctrl())
        ing._view = ClusterView(0.0, (await P._snapshot(), await D0._snapshot(), await busy_snapshot()))
        out: list[Any] = []
        t = asyncio.create_task(
            _consume(ing, GenerateRequest("r", prompt="hi", sampling=SamplingParams(max_tokens=40)), out)
        )
        await asyncio.sleep(0.05)
        assert ing._expected.get("r") == "decode-0"
        moved = await ing.drain("decode-0")
        await asyncio.wait_for(t, 10)
        return out, moved, ing.counters["recoveries"]

    out, moved, recoveries = asyncio.run(scenario())
    assert out[-1].finish_reason == "length" and out[-1].instance_id == "decode-1", out[-1]
    assert [c.index + k for c in out for k in range(len(c.token_ids))] == list(range(40))
    assert (moved, recoveries) == (0, 0)
