"""Engine model vs vLLM V1's scheduler (the engine-model audit): each test is a rule where the model differed.

References are to vLLM's ``v1/core/sched/scheduler.py``, ``v1/core/kv_cache_manager.py`` and
``v1/core/single_type_kv_cache_manager.py``.
"""

from __future__ import annotations

import numpy as np

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


def spec(*, blocks: int = 1000, budget: int = 2048, cache: bool = True, chunked: bool = True) -> EngineSpec:
    return EngineSpec(block_size=16, max_num_batched_tokens=budget, max_num_seqs=64, num_kv_blocks=blocks,
                      enable_prefix_caching=cache, enable_chunked_prefill=chunked)


def drain(eng: EngineModel) -> None:
    while eng.has_work:
        eng.step()


def test_cache_eviction_takes_a_prompts_tail_blocks_first() -> None:
    # vLLM frees a request's blocks in reverse (single_type_kv_cache_manager.free), so its tail is evicted first
    # and the prefix stays reusable. The model evicted the head first, which orphans every block after it.
    eng = EngineModel(LAT, spec(blocks=65))  # 1040 tokens: four 256-token ids fit
    eng.add_request("a", 1024, 1, hash_ids=(1, 2, 3, 4), hash_block_tokens=256)
    drain(eng)
    eng.add_request("b", 512, 1, hash_ids=(5, 6), hash_block_tokens=256)
    drain(eng)
    assert eng.cached_prefix_blocks((1, 2, 3, 4)) == 2  # was 0: ids 1 and 2 went first
    assert eng.cached_prefix_blocks((5, 6)) == 2


def test_a_prompt_admitted_in_the_same_step_hits_the_blocks_scheduled_before_it() -> None:
    # vLLM caches a request's full blocks when it allocates them (kv_cache_manager.allocate_slots ->
    # cache_blocks), so a request admitted later in the same schedule() hits them. The model cached a prompt's
    # ids only when its prefill completed: two prompts with a shared prefix arriving together both computed it.
    eng = EngineModel(LAT, spec())
    eng.add_request("a", 1024, 2, hash_ids=(1, 2, 3, 4), hash_block_tokens=256)
    eng.add_request("b", 1024, 2, hash_ids=(1, 2, 3, 9), hash_block_tokens=256)
    res = eng.step()
    assert [s.rid for s in res.admitted] == ["a", "b"]
    assert eng.prefix_hit_tokens == 768
    assert eng.prompt_tokens_computed == 1024 + 256  # was 2048


def test_a_chunk_caches_the_ids_it_completes() -> None:
    # Chunked: the ids a chunk fills are cached as it is scheduled, the partial id only with the prompt's end.
    eng = EngineModel(LAT, spec(budget=300))
    eng.add_request("a", 1000, 2, hash_ids=(1, 2, 3, 4), hash_block_tokens=256)
    eng.step()  # tokens [0, 300): id 1
    assert eng.cached_prefix_blocks((1, 2, 3, 4)) == 1
    eng.step()  # [300, 600): id 2
    assert eng.cached_prefix_blocks((1, 2, 3, 4)) == 2
    eng.step()  # [600, 900): id 3
    eng.step()  # [900, 1000): the last, partial id with the prompt's end
    assert eng.cached_prefix_blocks((1, 2, 3, 4)) == 4


def test_a_cache_hit_is_whole_kv_blocks() -> None:
    # vLLM hits only whole blocks, and at most num_tokens - 1 tokens (kv_cache_manager.get_computed_blocks): a full
    # hit recomputes the prompt's last block, and an id of 100 tokens spares 6 blocks of 16 (96 tokens), not 100.
    eng = EngineModel(LAT, spec())
    eng.add_request("a", 300, 1, hash_ids=(1, 2, 3), hash_block_tokens=100)
    drain(eng)
    seq = eng.add_request("b", 300, 1, hash_ids=(1, 8, 9), hash_block_tokens=100)
    assert eng.cache_hit_tokens(seq) == 96  # was 100
    before = eng.prompt_tokens_computed
    drain(eng)
    assert eng.prompt_tokens_computed - before == 300 - 96


def test_without_chunked_prefill_a_prompt_waits_for_a_step_with_room_for_it() -> None:
    # vLLM, chunked prefill off: a waiting prompt larger than the step's budget left stops admission
    # (scheduler.py, "If chunked_prefill is disabled, we can stop the scheduling here"). The model admitted it
    # anyway: two 2000-token prompts in one 2048-token step.
    eng = EngineModel(LAT, spec(cache=False, chunked=False))
    eng.add_request("a", 2000, 3)
    eng.add_request("b", 2000, 3)
    res = eng.step()
    assert [s.rid for s in res.admitted] == ["a"]  # was a and b
    assert eng.prompt_tokens_computed == 2000
    res = eng.step()  # a decodes (1 token), b's 2000 fit the 2047 left
    assert [s.rid for s in res.admitted] == ["b"] and res.decode_batch == 1
    # A prompt over the whole budget (vLLM refuses that config) still runs, alone, rather than waiting forever.
    eng.add_request("c", 3000, 1)
    drain(eng)
    assert eng.prompt_tokens_computed == 7000


def test_closed_form_exact_without_chunked_prefill() -> None:
    # A budget just over the longest prompt: prompts often wait behind the decodes for a step with room (the span
    # planner must agree with step about that).
    eng = spec(blocks=120, budget=520, cache=False, chunked=False)
    cfg = ClusterConfig(gpus={"a100": GPU}, model=MODEL, pools=[PoolSpec(name="m", gpu="a100", count=2, engine=eng)])
    rng = np.random.default_rng(3)
    n = 200
    w = Workload(np.cumsum(rng.exponential(1 / 20.0, n)), rng.integers(1, 500, n), rng.integers(1, 100, n))
    fast = Simulator(cfg, router="round_robin", closed_form=True).run(w)
    slow = Simulator(cfg, router="round_robin", closed_form=False).run(w)
    for col in ("first_token_s", "finish_s", "admit_s"):
        np.testing.assert_allclose(getattr(fast, col), getattr(slow, col), rtol=1e-9, atol=1e-12, err_msg=col)
    assert np.array_equal(fast.preemptions, slow.preemptions)
    assert fast.events < slow.events
