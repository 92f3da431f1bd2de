"""Performance audit: hot-path costs that grew over the sessions, each pinned by a deterministic count (not a
timing) that the slow code fails, plus the equivalence the faster code must keep."""

from __future__ import annotations

from scheduler.config.models import EngineSpec
from scheduler.engine_model import EngineModel
from tests.test_engine_prefix_cache import LAT


class CountingId(int):
    """A prefix-cache hash id that counts how often it is hashed."""

    hashes = 0

    def __hash__(self) -> int:
        CountingId.hashes += 1
        return int.__hash__(self)


def prefix_engine(blocks: int) -> EngineModel:
    spec = EngineSpec(
        block_size=16,
        max_num_batched_tokens=512,
        max_num_seqs=64,
        num_kv_blocks=blocks,
        enable_prefix_caching=True,
    )
    return EngineModel(LAT, spec)


def test_snapshot_does_not_rehash_every_cached_id_after_a_cache_change() -> None:
    # Ids enter the cache per scheduled chunk (vLLM's rule), so the snapshot's frozen copy of the ids is rebuilt
    # about once per engine step on a prefix-cache run. Built from the LRU OrderedDict, every rebuild hashed every
    # cached id again (Mooncake tier x16, prefix_affinity: the simulator 1.5x slower than with a set copy).
    eng = prefix_engine(blocks=10_000)
    n = 200
    eng.add_request("a", n * 16, 2, hash_ids=tuple(CountingId(i) for i in range(n)), hash_block_tokens=16)
    while eng.has_work:
        eng.step()
    eng.add_request("b", 64, 2, hash_ids=(CountingId(10_000), CountingId(10_001)), hash_block_tokens=16)
    while eng.has_work:
        eng.step()  # the cache changed: the next snapshot rebuilds its copy of the ids
    assert len(eng.prefix_cache) == n + 2
    CountingId.hashes = 0
    snap = eng.snapshot("i0", 0.0)
    assert len(snap.cached_hash_ids) == n + 2
    assert CountingId.hashes < n // 10, f"{CountingId.hashes} hashes for one snapshot of {n + 2} cached ids"


def test_snapshot_ids_are_the_cache_ids_through_inserts_and_evictions() -> None:
    # The set the snapshot copies must follow the LRU exactly: inserted ids in, evicted ids out.
    eng = prefix_engine(blocks=40)  # 640 tokens of prefix cache: 40 ids of 16 tokens
    inserted: set[int] = set()
    for k in range(12):
        ids = (
            tuple(range(k * 100, k * 100 + 12)) if k % 3 else tuple(range(12))
        )  # some prompts repeat a prefix
        eng.add_request(f"r{k}", 12 * 16, 3, hash_ids=ids, hash_block_tokens=16)
        while eng.has_work:
            eng.step()
            assert eng.snapshot("i0", 0.0).cached_hash_ids == frozenset(eng.prefix_cache)
        inserted.update(ids)
    assert len(inserted) > len(eng.prefix_cache) > 0  # some were evicted
    assert len(eng.prefix_cache) <= 40
