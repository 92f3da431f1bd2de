"""Prefix cache in the engine model: hits skip prefill compute, the LRU is bounded by KV, fast path stays exact."""

from __future__ import annotations

import numpy as np
import pytest

from scheduler.config.models import ClusterConfig, EngineSpec, GPUSpec, ModelSpec, PoolSpec
from scheduler.engine_model import EngineModel
from scheduler.latency import roofline_model
from sim.simulator import Simulator, Workload

MODEL = ModelSpec(
    name="llama2-7b", num_layers=32, hidden_size=4096, num_heads=32, num_kv_heads=32,
    intermediate_size=11008, vocab_size=32000,
)
GPU = GPUSpec(name="a100", memory_gib=80, fp16_tflops=312, hbm_gbps=2039, price_per_hour=2.0)
LAT = roofline_model(MODEL, GPU, 1)


def engine(*, cache: bool = True, blocks: int = 1000) -> EngineModel:
    spec = EngineSpec(block_size=16, max_num_batched_tokens=512, max_num_seqs=64, num_kv_blocks=blocks,
                      enable_prefix_caching=cache)
    return EngineModel(LAT, spec)


def run_until_first_token(eng: EngineModel, rid: str) -> float:
    t = 0.0
    while True:
        res = eng.step()
        t += res.duration_s
        if any(s.rid == rid for s in res.first_token):
            return t


def drain(eng: EngineModel) -> None:
    while eng.has_work:
        eng.step()


def test_second_request_with_same_prefix_only_computes_the_rest() -> None:
    eng = engine()
    eng.add_request("a", 1000, 2, hash_ids=(1, 2, 3, 4), hash_block_tokens=256)
    t_cold = run_until_first_token(eng, "a")
    drain(eng)
    computed = eng.prompt_tokens_computed
    # Shares the first three blocks (768 tokens), then diverges.
    eng.add_request("b", 1000, 2, hash_ids=(1, 2, 3, 9), hash_block_tokens=256)
    t_warm = run_until_first_token(eng, "b")
    assert eng.prompt_tokens_computed - computed == 1000 - 768
    assert eng.prefix_hit_tokens == 768
    assert t_warm < 0.5 * t_cold


def test_full_hit_still_recomputes_the_last_block() -> None:
    eng = engine()
    eng.add_request("a", 512, 2, hash_ids=(7, 8), hash_block_tokens=256)
    drain(eng)
    before = eng.prompt_tokens_computed
    seq = eng.add_request("b", 512, 3, hash_ids=(7, 8), hash_block_tokens=256)
    drain(eng)
    assert eng.prompt_tokens_computed - before == 16  # the last token's whole block, as vLLM (hits are whole blocks)
    assert seq.done


def test_disabled_cache_changes_nothing() -> None:
    eng = engine(cache=False)
    for rid in ("a", "b"):
        eng.add_request(rid, 1000, 2, hash_ids=(1, 2, 3, 4), hash_block_tokens=256)
        drain(eng)
    assert eng.prompt_tokens_computed == 2000 and eng.prefix_hit_tokens == 0
    assert eng.snapshot("m-0", 0.0).cached_hash_ids == frozenset()


def test_lru_is_bounded_by_kv_capacity_and_evicts_oldest() -> None:
    eng = engine(blocks=64)  # 1024 tokens of KV: four 256-token ids fit in the cache
    for k in range(6):
        before = eng.snapshot("m-0", 0.0).cached_hash_ids  # the snapshot's copy is reused until the cache changes
        assert not before or eng.snapshot("m-0", 0.0).cached_hash_ids is before
        eng.add_request(f"r{k}", 256, 1, hash_ids=(100 + k,), hash_block_tokens=256)
        drain(eng)
        assert eng.snapshot("m-0", 0.0).cached_hash_ids == frozenset(range(max(100, 100 + k - 3), 101 + k))
        assert before == frozenset(range(max(100, 100 + k - 4), 100 + k))  # an earlier snapshot stays as it was
    cached = eng.snapshot("m-0", 0.0).cached_hash_ids
    assert cached == frozenset({102, 103, 104, 105})
    assert eng.cached_prefix_blocks((104, 105)) == 2
    assert eng.cached_prefix_blocks((104, 100, 105)) == 1  # leading match only
    assert eng.cached_prefix_blocks((100,)) == 0


def test_bad_hash_block_tokens_names_the_field() -> None:
    with pytest.raises(ValueError, match="hash_block_tokens"):
        engine().add_request("a", 10, 1, hash_ids=(1,), hash_block_tokens=0)


def _conversation_workload(seed: int, n: int) -> Workload:
    """Multi-turn sessions: each turn's prompt extends the previous one's blocks."""
    rng = np.random.default_rng(seed)
    sessions: list[list[int]] = [[] for _ in range(8)]
    next_id = 0
    hashes, prompts = [], []
    for _ in range(n):
        s = sessions[int(rng.integers(len(sessions)))]
        for _ in range(int(rng.integers(1, 3))):
            s.append(next_id)
            next_id += 1
        hashes.append(tuple(s))
        prompts.append(len(s) * 64 - int(rng.integers(0, 32)))
    return Workload(np.cumsum(rng.exponential(0.05, n)), np.array(prompts), rng.integers(1, 60, n),
                    hash_ids=hashes, hash_block_tokens=64)


def _config(n: int, blocks: int) -> ClusterConfig:
    eng = EngineSpec(block_size=16, max_num_batched_tokens=512, max_num_seqs=64, num_kv_blocks=blocks,
                     enable_prefix_caching=True)
    return ClusterConfig(gpus={"a100": GPU}, model=MODEL, pools=[PoolSpec(name="m", gpu="a100", count=n, engine=eng)])


@pytest.mark.parametrize("seed", range(3))
def test_closed_form_exact_with_prefix_cache(seed: int) -> None:
    cfg = _config(2, 150 + 50 * seed)  # small KV: evictions and preemptions happen
    w = _conversation_workload(seed, 200)
    fast = Simulator(cfg, router="round_robin", closed_form=True).run(w)
    slow = Simulator(cfg, router="round_robin", closed_form=False).run(w)
    for col in ("first_token_s", "finish_s", "admit_s"):
        np.testing.assert_allclose(getattr(fast, col), getattr(slow, col), rtol=1e-9, atol=1e-12, err_msg=col)
    assert fast.prefix_hit_tokens == slow.prefix_hit_tokens > 0
    assert (np.isfinite(fast.finish_s) | fast.rejected).all()  # too-long prompts are rejected, never lost


def test_prefix_affinity_gets_more_hits_than_round_robin() -> None:
    cfg = _config(4, 400)
    w = _conversation_workload(5, 300)
    rr = Simulator(cfg, router="round_robin").run(w)
    pa = Simulator(cfg, router="prefix_affinity").run(w)
    assert pa.prefix_hit_tokens > rr.prefix_hit_tokens


def test_snapshot_reports_the_queues_compute_net_of_cached_prefixes_and_lookahead_prices_it() -> None:
    """``prefill_compute_tokens``: waiting prompts' leading cached blocks are not work; ``prefill_tokens_pending``
    (KV accounting) still counts them whole. Lookahead's queue time follows the compute figure, so a queue of
    prompts this instance has cached looks short, and an instance without a cache reports ``None``."""
    from scheduler.core.types import RequestInfo
    from scheduler.policy.routers_lookahead import LookaheadRouter

    eng = engine()
    eng.add_request("a", 1024, 2, hash_ids=(1, 2, 3, 4), hash_block_tokens=256)
    drain(eng)
    eng.add_request("b", 1024, 2, hash_ids=(1, 2, 3, 9), hash_block_tokens=256)  # 768 cached
    eng.add_request("c", 1024, 2, hash_ids=(5, 6, 7, 8), hash_block_tokens=256)  # none cached
    snap = eng.snapshot("i0", 0.0)
    assert snap.prefill_tokens_pending == 2048
    assert snap.prefill_compute_tokens == 2048 - 768
    cold = engine(cache=False)
    cold.add_request("b", 1024, 2)
    cold.add_request("c", 1024, 2)
    plain = cold.snapshot("i1", 0.0)
    assert plain.prefill_compute_tokens is None and plain.prefill_tokens_pending == 2048

    router = LookaheadRouter(latency=LAT)
    req = RequestInfo("n", 0.0, prompt_tokens=512, max_tokens=16)
    warm_ttft = router.estimate(req, snap).ttft_s
    cold_ttft = router.estimate(req, plain).ttft_s
    assert warm_ttft < cold_ttft
