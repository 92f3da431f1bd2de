"""Regressions from the audit of slow consumers and the poll lease. Each test failed before its fix (the backlog
test checks the fix's buffer itself).

The ingress polled an instance for a stream's next chunks only when its consumer (the gRPC/HTTP client) pulled the
next chunk, so a paused reader stopped renewing the instance's poll lease and missed a release's hand-over. Real
``Instance`` objects over the simulated backend behind in-process handles (``tests/test_chaos.py``), a short lease."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from scheduler.control.api import GenerateRequest
from scheduler.engine.base import SamplingParams, TokenChunk
from scheduler.engine.simulated_backend import sim_token
from tests.test_faults2_audit import _cluster_of, _teardown

pytestmark = pytest.mark.usefixtures("no_ray")

LEASE_S = 0.4


async def _cluster(
    name: str, n: int, lease_s: float = LEASE_S, **ingress_kw: Any
) -> tuple[dict[str, Any], Any]:
    """``n`` MIXED simulated instances (real-time steps, poll lease ``lease_s``), an ingress over them putting new
    requests on mixed-0 (Ray calls: in-process handles)."""
    from bench.loadgen import cluster_config
    from tests.test_ingress_migration_audit import _FirstOnMixed0

    return await _cluster_of(cluster_config(name, mixed=n), 1.0, lease_s=lease_s, router=_FirstOnMixed0(),
                             direct=False, poll_timeout_s=0.1, **ingress_kw)


def _tokens(out: list[TokenChunk]) -> list[int]:
    return [t for c in out for t in c.token_ids]


def _indices(out: list[TokenChunk]) -> list[int]:
    return [c.index + k for c in out for k in range(len(c.token_ids))]


def test_a_consumer_paused_past_the_lease_keeps_its_stream() -> None:
    """A client that stops reading for longer than the instance's poll lease (a paused debugger, gRPC flow control, a
    slow HTTP reader): the ingress polled only when the client pulled, the instance reaped the stream as one whose
    ingress died, and the client got ``abort`` (CANCELLED) half-way. vLLM's server keeps a slow reader's outputs
    instead. The stream must go on where it was, each index once, with no recovery."""
    n = 200

    async def scenario() -> tuple[list[TokenChunk], int, set[str]]:
        insts, ing = await _cluster("slow-reader", 2)
        out: list[TokenChunk] = []
        try:
            req = GenerateRequest(
                "slow", prompt="hello", sampling=SamplingParams(max_tokens=n, ignore_eos=True)
            )
            stream = ing.generate(req)
            out.append(await anext(stream))
            await asyncio.sleep(LEASE_S * 4)  # the reader pauses
            out.append(await anext(stream))  # what was made meanwhile: one chunk (merged), not one per poll
            async for c in stream:
                out.append(c)
            return out, ing.counters["recoveries"], {c.instance_id for c in out if c.token_ids}
        finally:
            await _teardown(insts, ing)

    from bench.loadgen import cluster_config

    out, recoveries, served_by = asyncio.run(asyncio.wait_for(scenario(), 30))
    vocab = cluster_config("slow-reader", mixed=1).model.vocab_size
    assert out[-1].finish_reason == "length", out[-1]
    assert _indices(out) == list(range(n))
    assert _tokens(out) == [sim_token(0, "slow", i, vocab) for i in range(n)]
    assert recoveries == 0 and served_by == {"mixed-0"}
    assert len(out[1].token_ids) > 1, out[1]


def test_a_release_under_a_paused_consumer_is_handed_over_not_counted_as_a_failure() -> None:
    """An instance released for a scale-down (``Instance.shutdown``) while a stream's client is not reading: its end
    ``released`` waits ``SHUTDOWN_HANDOVER_S`` (1 s) to be polled, and the ingress polled only when the client pulled,
    so the end was lost in the kill and read as an actor death -- counted toward the request's quarantine (here
    ``quarantine_after=1``: it failed ``RequestFailed``), a slow client penalised for an operator's scale-down. The
    stream must continue on the other instance, its quarantine count untouched."""
    from ray.exceptions import ActorDiedError

    from scheduler.control.instance import SHUTDOWN_HANDOVER_S

    n = 200

    async def scenario() -> tuple[list[TokenChunk], BaseException | None, tuple[str, ...]]:
        # A lease well past the pause: only the release's hand-over is under test here.
        insts, ing = await _cluster("slow-release", 2, lease_s=SHUTDOWN_HANDOVER_S * 10, quarantine_after=1)
        out: list[TokenChunk] = []
        err: BaseException | None = None
        try:
            req = GenerateRequest(
                "rel", prompt="hello", sampling=SamplingParams(max_tokens=n, ignore_eos=True)
            )
            stream = ing.generate(req)
            out.append(await anext(stream))
            rec = ing.registry.get("rel")
            victim = insts["mixed-0"]
            await (
                victim.shutdown()
            )  # the Controller's release: SHUTDOWN_HANDOVER_S for the ends to be polled ...

            async def dead(*_: Any, **__: Any) -> Any:
                raise ActorDiedError()

            for name in ("submit", "poll", "abort", "snapshot", "stats"):
                setattr(victim, name, dead)  # ... then the kill
            await asyncio.sleep(SHUTDOWN_HANDOVER_S * 0.5)  # the reader resumes later still
            try:
                async for c in stream:
                    out.append(c)
            except Exception as e:  # noqa: BLE001 - the answer under test
                err = e
            return out, err, rec.failed_engines
        finally:
            for inst in insts.values():
                for name in ("submit", "poll", "abort", "snapshot", "stats"):
                    vars(inst).pop(name, None)
            await _teardown(insts, ing)

    out, err, failed = asyncio.run(asyncio.wait_for(scenario(), 30))
    assert err is None, repr(err)
    assert failed == ()
    assert out[-1].finish_reason == "length", out[-1]
    assert _indices(out) == list(range(n))


def test_a_backlog_is_read_as_one_chunk_per_instance_and_an_error_after_it() -> None:
    """What the reader has not taken yet comes as one chunk per instance it ran on (as vLLM's output collector
    merges a slow reader's outputs), merged once per read -- a long pause is not copied per poll -- and an error
    raised by the polls reaches the reader after the chunks made before it."""
    from scheduler.control.api import Unavailable
    from scheduler.control.read_ahead import _Ahead

    n = 20_000

    made = asyncio.Event()

    async def source() -> Any:
        for i in range(n):
            yield TokenChunk("r", i, (i,), text="x", instance_id="a" if i < n // 2 else "b")
            await asyncio.sleep(0)  # a poll
        made.set()
        raise Unavailable("lost")

    async def scenario() -> tuple[list[TokenChunk], BaseException | None]:
        ahead = _Ahead(source())
        first = [await anext(ahead)]
        await made.wait()  # the reader pauses; the polls go on to the end
        out: list[TokenChunk] = []
        try:
            async for c in ahead:
                out.append(c)
        except Unavailable as e:
            return first + out, e
        return first + out, None

    out, err = asyncio.run(asyncio.wait_for(scenario(), 10))
    assert isinstance(err, Unavailable)
    assert [c.instance_id for c in out[1:]] == ["a", "b"]
    assert _indices(out) == list(range(n)) and _tokens(out) == list(range(n))
    assert "".join(c.text for c in out) == "x" * n


def test_a_retry_submitted_while_the_reaper_frees_its_old_stream_is_not_dropped() -> None:
    """The reaper aborts an unpolled stream (its ingress died), then drops it by id. A retry of the request (the SDK's,
    through another ingress) submitted while that abort was in flight replaced the ended stream under the same id, and
    the reaper dropped the new one: its polls answered "unknown request" while its engine request ran on unreaped,
    holding its KV until it finished. The reaper drops only the stream it reaped."""
    from bench.loadgen import cluster_config
    from scheduler.control.instance import Instance
    from scheduler.engine.base import EngineRequest

    async def scenario() -> TokenChunk | None:
        cfg = cluster_config("reap-race", mixed=1)
        pool = cfg.pools[0]
        inst = Instance(
            "mixed-0", pool, cfg.model, cfg.gpus[pool.gpu], backend_kwargs={"time_scale": 1.0}, lease_s=0.2
        )
        await inst.start()
        real_abort = inst._backend.abort
        aborting = asyncio.Event()

        async def slow_abort(
            rid: str,
        ) -> None:  # the engine's answer to the abort takes a while (vLLM: an RPC)
            await real_abort(rid)
            aborting.set()
            await asyncio.sleep(0.3)

        inst._backend.abort = slow_abort
        try:
            req = EngineRequest("r", tuple(range(1, 33)), SamplingParams(max_tokens=2, ignore_eos=True))
            await inst.submit(req)  # token 0 taken; its ingress "died": nobody polls the end
            await asyncio.wait_for(aborting.wait(), 5)  # the lease ran out: the reaper is freeing it
            retry = EngineRequest("r", tuple(range(1, 33)), SamplingParams(max_tokens=400, ignore_eos=True))
            sub = await inst.submit(retry)
            assert sub.rejected is None and sub.chunks, sub
            await asyncio.sleep(0.35)  # the reaper's abort returned
            return await inst.poll("r", 1.0, len(sub.chunks[0].token_ids))
        finally:
            inst._backend.abort = real_abort
            await inst.shutdown()

    got = asyncio.run(asyncio.wait_for(scenario(), 20))
    assert got is not None, "the retry's stream was dropped"
    assert got.token_ids


def test_a_migration_under_a_paused_consumer_is_not_undone_by_the_destinations_lease() -> None:
    """A live migration commits while the client is not reading: the ingress switched to the destination only once the
    client read the source's ``migrated`` end, so the destination's new stream went unpolled past its lease, was reaped,
    and the request was re-prefilled elsewhere (here back on the source). The destination must serve the rest."""

    async def scenario() -> tuple[list[TokenChunk], bool, int]:
        insts, ing = await _cluster("slow-migration", 2)
        out: list[TokenChunk] = []
        try:
            req = GenerateRequest(
                "mig", prompt="hello", sampling=SamplingParams(max_tokens=300, ignore_eos=True)
            )
            stream = ing.generate(req)
            out.append(await anext(stream))
            while ing.registry.get("mig").next_index < 2:
                out.append(await anext(stream))
            committed = (await ing.migrate("mig", "mixed-1")).committed
            await asyncio.sleep(LEASE_S * 4)  # the reader pauses
            async for c in stream:
                out.append(c)
            return out, committed, ing.counters["recoveries"]
        finally:
            await _teardown(insts, ing)

    out, committed, recoveries = asyncio.run(asyncio.wait_for(scenario(), 30))
    assert committed
    assert out[-1].finish_reason == "length", out[-1]
    assert _indices(out) == list(range(300))
    assert recoveries == 0
    assert out[-1].instance_id == "mixed-1"
