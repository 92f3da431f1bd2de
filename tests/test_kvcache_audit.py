"""Regressions from an audit of the engine model against vLLM for KV that arrives by transfer (a P->D decode leg, a
migration's destination). vLLM v1 with prefix caching caches the blocks its KV connector loaded as its own
(``KVCacheManager.allocate_slots`` caches up to the computed-plus-external tokens unless ``delay_cache_blocks``, and
``Scheduler._update_waiting_for_remote_kv`` caches an async load once it lands; our connector's migration path
registers the adopted blocks, ``LlmschedConnector._adopt_reserved``): a later prompt with that prefix on the same
instance -- a pairing router's prefill fallback on a decoder, the next turn after a re-role to MIXED -- hits them.
The engine model cached only what it prefilled itself. Each test failed before the fix, in each clock."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np

from scheduler.config.models import ClusterConfig, EngineSpec, PoolSpec
from scheduler.core.prefix import prompt_hash_ids
from scheduler.core.types import ClusterView, InstanceRole
from scheduler.engine.base import EngineRequest, SamplingParams
from scheduler.engine.simulated_backend import SimulatedBackend
from scheduler.engine_model import EngineModel
from scheduler.latency import roofline_model
from scheduler.policy.migration import MigrationPlan, MigrationReason
from scheduler.policy.route import RouteDecision, Router
from sim.simulator import Simulator, Workload
from tests.test_routers_audit import GPU, MODEL

ENG = EngineSpec(
    block_size=16, max_num_batched_tokens=512, max_num_seqs=64, num_kv_blocks=2000, enable_prefix_caching=True
)
PROMPT = 1024  # two 512-token ids
FIRST, NEXT = (1, 2), (1, 2, 3)  # a prompt, and the next one sharing it (the next turn of a conversation)


def _drain(eng: EngineModel) -> None:
    while eng.has_work:
        eng.step()


def test_a_decode_engine_caches_the_prompt_kv_a_handoff_brought() -> None:
    """A DECODE engine decodes a leg whose 1024-token prompt KV came from the prefill instance, then prefills (the
    pairing routers' fallback) the next prompt of that conversation: its first 1024 tokens are in the decoder's KV
    as in vLLM's prefix cache. The engine model recomputed all 1536."""
    eng = EngineModel(roofline_model(MODEL, GPU, 1), ENG, role=InstanceRole.DECODE)
    eng.add_request("leg", PROMPT + 1, 8, cached_tokens=PROMPT, hash_ids=FIRST, hash_block_tokens=512)
    _drain(eng)
    assert eng.prefix_hit_tokens == 0  # the leg loaded its KV: no hit, nothing computed
    eng.add_request("next", PROMPT + 512, 8, hash_ids=NEXT, hash_block_tokens=512)
    _drain(eng)
    assert eng.prefix_hit_tokens == PROMPT
    assert eng.prompt_tokens_computed == 512


class _ByRid(Router):
    """Places request ``i`` as ``where[i]``: (prefill instance, decode instance or None)."""

    name = "by_rid"

    def __init__(self, where: dict[str, tuple[str, str | None]]) -> None:
        self.where = where

    def route(self, request: Any, view: Any) -> Any:
        return RouteDecision(*self.where[request.request_id])


def _config(*pools: tuple[str, InstanceRole, int]) -> ClusterConfig:
    return ClusterConfig(
        gpus={"a100": GPU},
        model=MODEL,
        pools=[PoolSpec(name=n, role=r, gpu="a100", count=c, engine=ENG) for n, r, c in pools],
    )


def _turns(output0: int) -> Workload:
    """Turn 1 at 0 s, turn 2 (its prompt extends turn 1's) at 30 s, long after turn 1 finished."""
    return Workload(
        arrival_s=np.array([0.0, 30.0]),
        prompt_tokens=np.array([PROMPT, PROMPT + 512]),
        output_tokens=np.array([output0, 8]),
        hash_ids=[FIRST, NEXT],
    )


def test_the_simulators_decoder_caches_the_prompt_kv_a_handoff_brought() -> None:
    """Turn 1 prefills on ``p-0`` and decodes on ``d-0``; turn 2 runs whole on ``d-0`` (the prefill fallback). The
    simulator queued the decode leg without its ids, so nothing of it could be cached on ``d-0``: 0 hit tokens."""
    cfg = _config(("p", InstanceRole.PREFILL, 1), ("d", InstanceRole.DECODE, 1))
    sim = Simulator(cfg, router=_ByRid({"0": ("p-0", "d-0"), "1": ("d-0", None)}))
    res = sim.run(_turns(8))
    assert [res.instance_ids[k] for k in res.instance] == ["p-0", "d-0"]
    assert res.instance_ids[res.decode_instance[0]] == "d-0"
    assert res.prefix_hit_tokens == PROMPT
    dec = next(x for x in sim.instances if x.instance_id == "d-0")
    assert dec.engine.prompt_tokens_computed == 512


class _MoveOnce:
    """Moves request 0 from ``src`` to ``dst`` once it decodes there."""

    def __init__(self, src: str, dst: str) -> None:
        self.src, self.dst, self.done = src, dst, False

    def plan(self, view: ClusterView, now: float) -> list[MigrationPlan]:
        if self.done or not view.by_id(self.src).num_decoding:
            return []
        self.done = True
        return [MigrationPlan("0", self.src, self.dst, MigrationReason.LOAD_BALANCE)]


def test_the_simulators_migration_destination_caches_the_kv_it_received() -> None:
    """Turn 1 decodes on ``m-0`` and migrates to ``m-1``; turn 2 is routed to ``m-1``, which holds turn 1's KV.
    The migration committed the request there without its ids: turn 2 recomputed its whole prompt."""
    cfg = _config(("m", InstanceRole.MIXED, 2))
    sim = Simulator(
        cfg,
        router=_ByRid({"0": ("m-0", None), "1": ("m-1", None)}),
        migration=_MoveOnce("m-0", "m-1"),
        migration_interval_s=0.05,
    )
    res = sim.run(_turns(400))
    assert res.migrations == 1
    dst = next(x for x in sim.instances if x.instance_id == "m-1")
    assert dst.engine.prefix_hit_tokens == PROMPT
    assert dst.engine.prompt_tokens_computed == 512


def test_the_live_simulated_decoder_caches_the_prompt_kv_a_handoff_brought() -> None:
    """The same on the live simulated backend: a decode leg lands with its prompt's KV exported by a PREFILL engine;
    the next prompt sharing it, prefilled on the decoder, hits it (it recomputed it all)."""
    prompt = tuple(range(1, PROMPT + 1))

    async def run() -> tuple[int, int, frozenset[int]]:
        P = SimulatedBackend(MODEL, GPU, engine=ENG, role=InstanceRole.PREFILL, time_scale=0)
        D = SimulatedBackend(MODEL, GPU, engine=ENG, role=InstanceRole.DECODE, time_scale=0)
        await P.start()
        await D.start()
        try:
            first = [
                t
                async for c in P.generate(EngineRequest("r", prompt, SamplingParams(max_tokens=1)))
                for t in c.token_ids
            ]
            kv = await P.export_kv("r")
            leg = EngineRequest(
                "r", prompt + tuple(first), SamplingParams(max_tokens=4), num_output_tokens_before=1, kv=(kv,)
            )
            async for _ in D.generate(leg):
                pass
            nxt = prompt + tuple(range(2000, 2512))
            async for _ in D.generate(EngineRequest("n", nxt, SamplingParams(max_tokens=2))):
                pass
            return (
                D.engine.prefix_hit_tokens,
                D.engine.prompt_tokens_computed,
                D.engine.snapshot("d", 0.0).cached_hash_ids,
            )
        finally:
            await P.shutdown()
            await D.shutdown()

    hit, computed, cached = asyncio.run(run())
    assert hit == PROMPT and computed == 512
    assert set(prompt_hash_ids(prompt)[:2]) <= cached


def test_a_request_resumed_after_an_aborted_migration_keeps_its_prompt_ids_and_its_place() -> None:
    """``SimulatedBackend.resume`` (the destination failed at the commit) re-added the paused request without its
    prompt's ids and behind the queued prompts: a later preemption recomputed its whole context, and it waited
    for prompts that arrived while it was paused, where vLLM's paused request never left its running batch."""
    from scheduler.engine.base import EngineRequest, SamplingParams
    from scheduler.engine.simulated_backend import SimulatedBackend
    from tests.test_migration_audit import cluster_config

    async def scenario() -> tuple[tuple[int, ...], tuple[int, ...], str]:
        cfg = cluster_config("c", mixed=1)
        pool = cfg.pools[0]
        engine = pool.engine.model_copy(update={"enable_prefix_caching": True})
        b = SimulatedBackend(cfg.model, cfg.gpus[pool.gpu], engine=engine, time_scale=1.0)
        await b.start()
        try:
            gen = b.generate(EngineRequest("r", tuple(range(1, 1100)), SamplingParams(max_tokens=400, ignore_eos=True)))
            async for c in gen:
                if c.index >= 3:
                    break
            ids = b.engine.get("r").hash_ids
            res = await b.pause("r", 0)
            assert not isinstance(res, str), res
            queued = b.generate(EngineRequest("q", tuple(range(5, 900)), SamplingParams(max_tokens=4)))
            task = asyncio.ensure_future(queued.__anext__())
            await asyncio.sleep(0)
            assert await b.resume("r")
            first = b.engine.waiting[0].rid if b.engine.waiting else "r (admitted)"
            after = b.engine.get("r").hash_ids
            task.cancel()
            await b.abort("r")
            await b.abort("q")
            return ids, after, first
        finally:
            await b.shutdown()

    ids, after, first = asyncio.run(scenario())
    assert ids and after == ids
    assert first in ("r", "r (admitted)")
