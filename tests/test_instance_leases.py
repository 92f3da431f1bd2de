"""Leases on an Instance's state when the ingress that drives it dies (simulated backend, no Ray, fast).

A stream nobody polls is aborted; an incoming live migration that no protocol step touches frees its reservation,
staged KV and pre-admitted copy. Without them a dead ingress leaks KV blocks until the instance restarts."""

from __future__ import annotations

import asyncio

import pytest

from bench.loadgen import cluster_config
from scheduler.control.instance import Instance
from scheduler.engine.base import EngineRequest, KVBlocks, SamplingParams

# "no Ray": an Instance built here asked Ray for its node id, which started a local node (~10 s) for nothing.
pytestmark = pytest.mark.usefixtures("no_ray")

LEASE_S = 0.2


def _instance(time_scale: float = 0.0) -> Instance:
    cfg = cluster_config("lease", mixed=1)
    pool = cfg.pools[0]
    return Instance("mixed-0", pool, cfg.model, cfg.gpus[pool.gpu], backend_kwargs={"time_scale": time_scale},
                    lease_s=LEASE_S)


async def _blocks_used(inst: Instance) -> int:
    return (await inst.stats()).kv_blocks_used


def test_unpolled_stream_is_aborted_and_its_kv_freed() -> None:
    async def scenario() -> tuple[int, int, bool]:
        inst = _instance(time_scale=1.0)  # real-time steps: the request is still decoding when the lease ends
        await inst.start()
        try:
            req = EngineRequest("orphan", tuple(range(1, 257)), SamplingParams(max_tokens=100_000, ignore_eos=True))
            await inst.submit(req)  # first chunk taken, then nobody polls (the ingress "died")
            held = await _blocks_used(inst)
            await asyncio.sleep(LEASE_S * 3)
            return held, await _blocks_used(inst), await inst.poll("orphan", 0.01) is None
        finally:
            await inst.shutdown()

    held, after, forgotten = asyncio.run(asyncio.wait_for(scenario(), 30))
    assert held > 0
    assert after == 0 and forgotten


def test_a_request_queued_past_the_lease_is_not_aborted() -> None:
    """Under overload a request can wait for KV longer than the lease before its first token. ``submit`` answers
    "accepted, nothing yet" in time and the caller's polls renew the lease: nothing is aborted (it was: 10% of a
    saturated P/D replay ended "abort" after waiting 30 s in a decode instance's queue, `llmsched bench
    rerole-live`)."""
    from scheduler.engine.base import TokenChunk

    async def slow_first(request: EngineRequest):  # queued for 3 leases, then two tokens
        await asyncio.sleep(LEASE_S * 3)
        yield TokenChunk(request.request_id, 0, (7,))
        yield TokenChunk(request.request_id, 1, (8,), True, "length")

    async def scenario() -> tuple[bool, list]:
        inst = _instance()
        await inst.start()
        inst._backend.generate = slow_first
        try:
            req = EngineRequest("queued", tuple(range(1, 65)), SamplingParams(max_tokens=2))
            t0 = asyncio.get_running_loop().time()
            sub = await inst.submit(req)
            early = not sub.chunks and asyncio.get_running_loop().time() - t0 < LEASE_S
            got: list = []
            while not (got and got[-1].finished):
                c = await inst.poll("queued", LEASE_S / 2)
                assert c is not None, "the stream was aborted / forgotten"
                got.extend([c] if c.token_ids or c.finished else [])
            return early, got
        finally:
            await inst.shutdown()

    early, got = asyncio.run(asyncio.wait_for(scenario(), 30))
    assert early
    assert [t for c in got for t in c.token_ids] == [7, 8] and got[-1].finish_reason == "length"


def test_abandoned_incoming_migration_frees_its_reservation() -> None:
    async def scenario() -> tuple[int, int, int, int]:
        inst = _instance()
        await inst.start()
        try:
            assert await inst.migrate_reserve("abandoned", 1024) is None
            assert await inst.migrate_reserve("alive", 1024) is None
            reserved = await _blocks_used(inst)
            # "alive" keeps getting stage copies (its driver is alive), "abandoned" gets nothing after the handshake.
            for k in range(6):
                piece = KVBlocks("alive", k * 16, (k + 1) * 16, tuple(range(k * 16, (k + 1) * 16)), 0)
                assert await inst.migrate_stage("alive", [_ready(piece)]) == ("ok", (k + 1) * 16)
                await asyncio.sleep(LEASE_S / 2)
            one_left = await _blocks_used(inst)
            await asyncio.sleep(LEASE_S * 3)
            return reserved, one_left, await _blocks_used(inst), len(inst._incoming)
        finally:
            await inst.shutdown()

    reserved, one_left, none_left, tracked = asyncio.run(asyncio.wait_for(scenario(), 30))
    assert reserved > 0
    assert one_left == reserved // 2  # the abandoned one was freed while the live one kept its blocks
    assert none_left == 0 and tracked == 0


def test_a_failure_while_freeing_does_not_end_the_reaper() -> None:
    async def scenario() -> tuple[int, int, bool]:
        inst = _instance()
        await inst.start()
        backend = inst._backend
        real = backend.cancel_incoming
        calls = []

        async def flaky(rid: str) -> None:
            calls.append(rid)
            if len(calls) == 1:
                raise RuntimeError("engine hiccup")
            await real(rid)

        backend.cancel_incoming = flaky
        try:
            assert await inst.migrate_reserve("first", 512) is None
            await asyncio.sleep(LEASE_S * 3)  # its cancel raises: the entry is dropped, the reaper lives on
            assert await inst.migrate_reserve("second", 512) is None
            held = await _blocks_used(inst)
            await asyncio.sleep(LEASE_S * 3)
            return held, await _blocks_used(inst), not inst._reaper.done()
        finally:
            await inst.shutdown()

    held, after, alive = asyncio.run(asyncio.wait_for(scenario(), 30))
    assert alive
    assert after < held  # the second reservation was still freed by its lease


def _ready(value: object) -> asyncio.Future:
    fut = asyncio.get_running_loop().create_future()
    fut.set_result(value)
    return fut


def test_early_export_is_served_once_and_an_unclaimed_one_expires() -> None:
    """A P->D prefill submitted with ``export_on_finish`` starts exporting its prompt KV when it finishes; the
    ingress' ``export_kv`` gets that export; one nobody asks for (the decode side died) is dropped after the lease.
    Either way, and for a request with no handoff, the engine's copy of the prompt KV is let go (the vLLM backend
    kept every prompt's until a byte cap pushed it out: ``release_kv``)."""

    async def scenario() -> tuple[int, bool, bool, bool, list[str]]:
        cfg = cluster_config("lease-pd", mixed=0, prefill=1, decode=1)
        pool = next(p for p in cfg.pools if p.role.value == "prefill")
        inst = Instance("prefill-0", pool, cfg.model, cfg.gpus[pool.gpu], backend_kwargs={"time_scale": 0.0},
                        lease_s=LEASE_S)
        await inst.start()
        forgotten: list[str] = []
        inst._backend.release_kv = forgotten.append  # type: ignore[union-attr]
        try:
            prompt = tuple(range(1, 97))
            for rid, export in (("claimed", True), ("orphan", True), ("no-handoff", False)):
                req = EngineRequest(rid, prompt, SamplingParams(max_tokens=1, ignore_eos=True))
                sub = await inst.submit(req, export_on_finish=export)
                assert sub.rejected is None
            await asyncio.sleep(0.05)
            both_started = {"claimed", "orphan"} == set(inst._exports)
            kv = await inst.export_kv("claimed")
            served_once = "claimed" not in inst._exports
            await asyncio.sleep(LEASE_S * 3)
            return int(kv.end_token), both_started, served_once, "orphan" not in inst._exports, forgotten
        finally:
            await inst.shutdown()

    end, both_started, served_once, expired, forgotten = asyncio.run(asyncio.wait_for(scenario(), 30))
    assert end == 96 and both_started and served_once and expired
    # The one without a handoff at once, the claimed one when served, the orphan when its lease ran out.
    assert forgotten == ["no-handoff", "claimed", "orphan"]
