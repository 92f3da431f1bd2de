"""Regressions from an audit of the prefix_affinity router and the prefix-cache accounting (routers_smart.py,
scheduler/core/prefix.py, the snapshots' cached ids, the engine model's prefix cache). Each test reproduces one
confirmed bug."""

from __future__ import annotations

from scheduler.core.types import ClusterView, InstanceRole, InstanceSnapshot, RequestInfo
from scheduler.policy.route import RouteDecision
from scheduler.policy.routers_smart import PrefixAffinityRouter

M = InstanceRole.MIXED
HOT = tuple(range(8))  # a 4096-token prompt's eight 512-token blocks


def snap(
    iid: str,
    *,
    pending: int = 0,
    compute: int | None = None,
    total: int = 1000,
    cached: frozenset[int] | None = None,
) -> InstanceSnapshot:
    return InstanceSnapshot(
        iid,
        M,
        kv_blocks_total=total,
        block_size=16,
        prefill_tokens_pending=pending,
        prefill_compute_tokens=compute,
        cached_hash_ids=cached,
    )


def req(rid: str, hash_ids: tuple[int, ...] = HOT, prompt: int = 4096) -> RequestInfo:
    return RequestInfo(rid, 0.0, prompt, 64, hash_ids=hash_ids)


def route(r: PrefixAffinityRouter, request: RequestInfo, *insts: InstanceSnapshot) -> str:
    d = r.route(request, ClusterView(0.0, insts))
    assert isinstance(d, RouteDecision)
    r.on_routed(request, d)
    return d.prefill_instance


# ---- 1: prefix_affinity credited prefixes the instance had evicted ----------------------------------------------------
def test_prefix_affinity_believes_a_snapshot_that_lists_its_cache_over_its_memory() -> None:
    """It scored an instance by its memory of where it sent each block even when the instance's snapshot listed its
    cache without them (evicted, LRU under KV pressure): "b" kept drawing the prefix, and its queue, for nothing."""
    r = PrefixAffinityRouter()
    assert route(r, req("first"), snap("a", cached=frozenset()), snap("b", cached=frozenset())) == "a"
    r.on_finished("first", "a")
    # "a" has since evicted the prefix (its cache holds other blocks) and carries 500 more queued tokens than "b".
    evicted = (
        snap("a", pending=600, cached=frozenset({100, 101})),
        snap("b", pending=100, cached=frozenset()),
    )
    assert route(r, req("again"), *evicted) == "b"
    r.on_finished("again", "b")
    # Still listed: the hit (4096 tokens) outweighs the queue.
    listed = (snap("a", pending=600, cached=frozenset(HOT)), snap("b", pending=100, cached=frozenset()))
    assert route(r, req("third"), *listed) == "a"


def test_prefix_affinity_counts_a_prefix_on_its_way_before_the_listing_shows_it() -> None:
    """Believing the snapshot alone must not spread a burst: a prefix routed to an instance and still queued there
    is not in its cache yet, but will be by the time the next request with it is admitted."""
    r = PrefixAffinityRouter()
    empty = (snap("a", cached=frozenset()), snap("b", cached=frozenset()))
    assert route(r, req("first"), *empty) == "a"
    queued = (snap("a", pending=4000, compute=4000, cached=frozenset()), snap("b", cached=frozenset()))
    # queue 4000 + the last block's 16 tokens to compute (vLLM recomputes a repeat's last token), against 4096 on "b"
    assert route(r, req("second"), *queued) == "a"
    r.on_finished("first", "a")
    r.on_finished("second", "a")
    assert route(r, req("third"), *empty) == "a"  # tie: first in view order


def test_prefix_affinity_stops_counting_a_prefix_on_its_way_once_the_listing_shows_it() -> None:
    """A request's blocks counted on its prefill instance until it finished: on a P/D cluster it finishes on its
    decoder, long after the prefill instance cached (and, busy, perhaps evicted) them. Once a listing shows them,
    the listing alone says whether they are still there."""
    r = PrefixAffinityRouter()
    empty = (snap("p0", cached=frozenset()), snap("p1", cached=frozenset()))
    assert route(r, req("first"), *empty) == "p0"
    assert (
        route(r, req("x", (50,), prompt=100), snap("p0", cached=frozenset(HOT)), empty[1]) == "p0"
    )  # prefilled
    r.on_finished("x", "p0")
    # "first" still decodes elsewhere; p0 has since evicted its prefix and queues 500 more tokens than p1.
    evicted = (snap("p0", pending=600, cached=frozenset({7000})), snap("p1", pending=100, cached=frozenset()))
    assert route(r, req("second"), *evicted) == "p1"


def test_prefix_affinity_forgets_sends_beyond_the_instances_kv_capacity() -> None:
    """Without a cache listing (vLLM live), its memory of sends was one LRU of 200,000 ids for the whole cluster: an
    instance whose KV holds 2 blocks was credited with a prefix sent there long before, and 50 newer prompts'
    blocks since -- gone from any engine of that size."""
    r = PrefixAffinityRouter()
    small = 64  # 64 blocks x 16 tokens = 1024 tokens: two 512-token hash blocks
    assert route(r, req("hot"), snap("a", total=small), snap("b", total=small, pending=10)) == "a"
    for k in range(50):
        other = tuple(range(1000 + 8 * k, 1008 + 8 * k))
        route(r, req(f"o{k}", other), snap("a", total=small), snap("b", total=small, pending=10**6))
        r.on_finished(f"o{k}", "a")
    r.on_finished("hot", "a")
    # "a" now queues 600 tokens, "b" 100: the prefix is long gone from "a" and "b" is lighter.
    assert (
        route(r, req("again"), snap("a", total=small, pending=600), snap("b", total=small, pending=100))
        == "b"
    )
    # A prefix sent just before still counts.
    r2 = PrefixAffinityRouter()
    assert route(r2, req("hot"), snap("a", total=small), snap("b", total=small, pending=10)) == "a"
    r2.on_finished("hot", "a")
    two = req("again", HOT[:2], prompt=1024)
    assert route(r2, two, snap("a", total=small, pending=600), snap("b", total=small, pending=100)) == "a"


# ---- 2: prefix_affinity queued in KV tokens, not in the tokens the instance will compute ----------------------------
def test_prefix_affinity_weighs_a_queue_by_the_prefill_it_will_compute() -> None:
    """The load term read ``prefill_tokens_pending``: queued prompts whole, cached prefixes included (their KV),
    against the newcomer's uncached tokens only. A hot instance with four queued turns of one conversation (4096
    tokens each, all but the last 96 cached) looked 16k tokens loaded while it had 384 to compute, and a fifth turn
    went to an idle instance to prefill all 4096 tokens again."""
    r = PrefixAffinityRouter()
    hot = snap("hot", pending=4 * 4096, compute=4 * 96, total=4000, cached=frozenset(HOT))
    idle = snap("idle", cached=frozenset())
    assert route(r, req("turn5"), hot, idle) == "hot"  # 384 + 0 against 0 + 4096
    # Where the engine cannot tell what its queue will compute, the whole prompts stand in (as before).
    r2 = PrefixAffinityRouter()
    assert (
        route(r2, req("turn5"), snap("hot", pending=4 * 4096, total=4000, cached=frozenset(HOT)), idle)
        == "idle"
    )


# ---- 3: the engine model's compute figure counted a waiting request's transferred KV as work ------------------------
def test_the_engine_models_queue_to_compute_leaves_out_kv_that_came_with_a_request() -> None:
    """``prefill_compute_tokens`` is the queue less what admission will not compute: cached prefixes "or KV that came
    with a transfer" (InstanceSnapshot). The engine model took off cache hits only, so a P->D decode leg waiting on a
    MIXED decoder (its 2000-token prompt's KV loaded, one token to run) counted as 2001 tokens of prefill, for
    lookahead's queue time and prefix_affinity's load term alike; vLLM's connector leaves it out."""
    from scheduler.config.models import EngineSpec
    from scheduler.engine_model.model import EngineModel
    from tests.test_engine_prefix_cache import LAT, drain

    spec = EngineSpec(block_size=16, max_num_batched_tokens=512, max_num_seqs=64, num_kv_blocks=1000)
    eng = EngineModel(LAT, spec.model_copy(update={"enable_prefix_caching": True}))
    eng.add_request("a", 1024, 2, hash_ids=(1, 2, 3, 4), hash_block_tokens=256)
    drain(eng)
    eng.add_request("leg", 2001, 10, cached_tokens=2000)  # a decode leg: its prompt's KV arrived with it
    eng.add_request("b", 1024, 2, hash_ids=(1, 2, 3, 9), hash_block_tokens=256)  # 768 cached
    snap = eng.snapshot("i0", 0.0)
    assert snap.prefill_tokens_pending == 2001 + 1024  # KV accounting: whole contexts
    assert snap.prefill_compute_tokens == 1 + (1024 - 768)
    # An engine whose cache holds nothing yet can tell too.
    fresh = EngineModel(LAT, spec.model_copy(update={"enable_prefix_caching": True}))
    fresh.add_request("leg", 2001, 10, cached_tokens=2000)
    assert fresh.snapshot("i1", 0.0).prefill_compute_tokens == 1


# ---- 4: prefix_affinity priced a token of queue alike on instances of different speeds -------------------------------
def test_prefix_affinity_estimates_ttft_at_each_instances_prefill_pace() -> None:
    """Conductor's estimate is a time (queue time + prefill time of the uncached part, on that instance); the router
    summed tokens, so on the long-context tier a TP-4 instance (prefill ~2.5x faster per 2048-token chunk) with
    2500 tokens queued lost a 1000-token prompt to a TP-1 instance with 1000 queued: 2000 tokens "against" 3500,
    1.45x the time (cached tokens are priced the same way: a hit saves the time it saves there)."""
    from pathlib import Path

    from scheduler.config.load import load_config

    tier = Path(__file__).resolve().parents[1] / "scheduler/config/examples/llama3-8b-a100-longctx-tier.yaml"
    r = PrefixAffinityRouter()
    r.initialize(load_config(str(tier)))

    def at(iid: str, tp: int, pending: int) -> InstanceSnapshot:
        return InstanceSnapshot(
            iid,
            M,
            gpu="a100",
            tp=tp,
            kv_blocks_total=10_000,
            block_size=16,
            prefill_tokens_pending=pending,
            cached_hash_ids=frozenset(),
        )

    slow, fast = at("tp1", 1, 1000), at("tp4", 4, 2500)
    assert route(r, req("new", (), prompt=1000), slow, fast) == "tp4"
    assert r.pace_of(slow) > 2 * r.pace_of(fast)
    # Unbound (no config): token units, every instance alike.
    assert route(PrefixAffinityRouter(), req("new", (), prompt=1000), slow, fast) == "tp1"


# ---- 5: the engine model charged a prompt's partial last block as a whole one ------------------------------------------
def test_the_engine_models_prefix_cache_charges_a_partial_last_block_its_tokens() -> None:
    """Each cached id was charged ``hash_block_tokens`` of the KV capacity, the last (partial) one of a prompt too:
    a 100-token prompt's one id took 256 tokens, and 1024 tokens of KV held four such prompts' ids where they fill
    800 (vLLM holds its blocks). Mooncake's prompts end in a partial 512-token block (~4% of their ids' charge)."""
    from scheduler.config.models import EngineSpec
    from scheduler.engine_model.model import EngineModel
    from tests.test_engine_prefix_cache import LAT, drain

    spec = EngineSpec(block_size=16, max_num_batched_tokens=512, max_num_seqs=64, num_kv_blocks=64)
    eng = EngineModel(LAT, spec.model_copy(update={"enable_prefix_caching": True}))  # 1024 tokens of KV
    for k in range(8):
        eng.add_request(f"r{k}", 100, 1, hash_ids=(100 + k,), hash_block_tokens=256)
        drain(eng)
    assert eng.snapshot("i0", 0.0).cached_hash_ids == frozenset(range(100, 108))
    # Whole blocks are charged whole: the oldest go once 1024 tokens are passed.
    eng.add_request("long", 768, 1, hash_ids=(1, 2, 3), hash_block_tokens=256)
    drain(eng)
    assert eng.snapshot("i0", 0.0).cached_hash_ids == frozenset({1, 2, 3, 106, 107})  # 968 tokens


def test_a_full_repeat_is_priced_with_its_last_block_recomputed_as_the_engines_do() -> None:
    """A prompt whose every id is cached still prefills its last KV block (vLLM recomputes the last token to sample
    the first output; the engine model too): prefix_affinity and lookahead priced it at 0 and P - 1 tokens hit."""
    from scheduler.core.prefix import reused_prompt_tokens

    r = PrefixAffinityRouter()
    full = snap("a", cached=frozenset(HOT))
    assert r.score(req("again"), full, phase="prefill") == 16.0  # 4096 - (4095 // 16 * 16)
    assert reused_prompt_tokens(8, 4096, kv_block=16) == 4080
    assert reused_prompt_tokens(8, 4000, kv_block=16) == 3984  # a partial last id: up to the last whole block
    assert reused_prompt_tokens(3, 4096, kv_block=16) == 1536 and reused_prompt_tokens(0, 10, kv_block=0) == 0
