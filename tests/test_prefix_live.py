"""Prefix-cache affinity on the live path: requests carry the prompt's block ids computed from their token ids
(``scheduler.core.prefix``), as a Mooncake trace's ``hash_ids`` -- before, live requests carried none, so the
prefix-cache routers and the simulated engines' prefix cache were inert outside the simulator."""

from __future__ import annotations

import asyncio
import dataclasses
import subprocess
import sys
from typing import Any

import pytest

from scheduler.control.api import GenerateRequest
from scheduler.core.prefix import HASH_BLOCK_TOKENS, prompt_hash_ids
from scheduler.core.types import ClusterView, InstanceSnapshot
from scheduler.engine.base import EngineRequest, SamplingParams
from scheduler.policy.route import make_router
from tests.test_ingress_audit import FakeInstance, _consume, _ingress

B = HASH_BLOCK_TOKENS


def test_ids_follow_the_shared_prefix_block_by_block() -> None:
    a = list(range(1, 3 * B + 100))
    b = a[: 2 * B] + [7] * (B + 100)  # same first two blocks
    c = a[: 3 * B] + [9] * 100  # differs only in the partial last block
    ia, ib, ic = prompt_hash_ids(a), prompt_hash_ids(b), prompt_hash_ids(c)
    assert len(ia) == 4 and ia[:2] == ib[:2] and ia[2] != ib[2]
    assert ia[:3] == ic[:3] and ia[3] != ic[3]
    assert prompt_hash_ids([5] * B + a[:B])[1] != ia[0]  # a block's id depends on what precedes it
    # The same ids in another process (ingress replicas and instances compute them apart).
    code = "from scheduler.core.prefix import prompt_hash_ids; print(prompt_hash_ids(list(range(1, 1636))))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == str(ia)


def test_prefix_affinity_places_a_shared_prefix_with_its_first_request() -> None:
    """Live, the second request of a conversation (its history as the prefix) went wherever the load said: the
    router never saw an id."""
    prefix = list(range(100, 100 + 3 * B))

    async def scenario() -> tuple[str, str]:
        ing = _ingress([FakeInstance("mixed-0"), FakeInstance("mixed-1")])
        ing.router = make_router("prefix_affinity")
        # Instances with room for the prefix: the router forgets sends past an instance's KV (16 tokens by default).
        kv = 1000  # blocks of 16 tokens
        ing._view = ClusterView(0.0, tuple(dataclasses.replace(s, kv_blocks_total=kv) for s in ing._view.instances))
        placed = []
        for rid, tail in (("turn-1", [1, 2, 3]), ("turn-2", [1, 2, 3, 4, 5] * 40)):
            req = GenerateRequest(rid, prompt_token_ids=prefix + tail, sampling=SamplingParams(max_tokens=2))
            out: list[Any] = []
            await _consume(ing, req, out)
            placed.append(out[-1].instance_id)
            # The first one's instance is busier now (500 prompt tokens queued): worth it for a 1536-token hit only.
            # (A refresh: what was routed before it is in the snapshots, no longer booked on top of them.)
            ing._pending.clear()
            ing._pending_prompt.clear()
            ing._pending_compute.clear()
            ing._view = ClusterView(0.0, tuple(
                InstanceSnapshot(s.instance_id, s.role, kv_blocks_total=kv,
                                 prefill_tokens_pending=500 if s.instance_id == placed[0] else 0)
                for s in ing._view.instances))
        return placed[0], placed[1]

    first, second = asyncio.run(scenario())
    assert first == second


@pytest.mark.parametrize("caching", [True, False])
def test_the_simulated_engine_hits_a_prefix_it_computed(caching: bool) -> None:
    from scheduler.config.load import load_config
    from scheduler.config.models import EngineSpec
    from scheduler.engine.simulated_backend import SimulatedBackend

    cfg = load_config("default")
    backend = SimulatedBackend(cfg.model, cfg.gpus["a100"], engine=EngineSpec(enable_prefix_caching=caching),
                               time_scale=0.0)
    prefix = list(range(100, 100 + 2 * B))

    async def scenario() -> tuple[int, int, int]:
        await backend.start()
        try:
            for rid, tail in (("a", [1, 2]), ("b", [3, 4, 5])):
                _ = [c async for c in backend.generate(EngineRequest(rid, tuple(prefix + tail), SamplingParams()))]
            s = await backend.stats()
            return s.prompt_tokens_computed, s.prompt_tokens_loaded, len(s.cached_hash_ids)
        finally:
            await backend.shutdown()

    computed, hit, cached = asyncio.run(scenario())
    if caching:  # "b" found the two full blocks "a" computed (whole KV blocks of them)
        assert hit == 2 * B and computed == 2 * B + 2 + 3 and cached == 4  # the two blocks, the two tails
    else:
        assert (hit, computed, cached) == (0, 4 * B + 5, 0)
