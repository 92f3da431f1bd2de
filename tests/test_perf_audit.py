"""Performance audit: hot-path costs that grew over the sessions, each pinned by a count (or, once, a ratio of two
timings in one process, with a wide margin) that the slow code fails, plus the equivalence the faster code keeps."""

from __future__ import annotations

import dataclasses
import time

import pytest

from scheduler.config.models import EngineSpec
from scheduler.core.types import ClusterView, InstanceRole, InstanceSnapshot, RequestInfo, RequestLoad
from scheduler.engine_model import EngineModel
from scheduler.policy.route import make_router
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


class CountingRequests(tuple):
    """A snapshot's ``requests`` that counts how often a policy walks it."""

    walks = 0

    def __iter__(self):  # type: ignore[no-untyped-def]
        CountingRequests.walks += 1
        return super().__iter__()


def test_llumnix_reads_each_detailed_snapshot_once_not_once_per_request() -> None:
    # Live snapshots always carry every running request; llumnix counted the high-priority ones of every candidate
    # on every request: 64 instances x 128 requests was 2.6x the decision time of the same view without them.
    def snap(i: int) -> InstanceSnapshot:
        reqs = CountingRequests(RequestLoad(f"q{i}-{j}", 600, 50, None, 0) for j in range(16))
        return InstanceSnapshot(
            f"x-{i}",
            InstanceRole.MIXED,
            num_running=16,
            num_decoding=16,
            kv_blocks_used=100 + i,
            kv_blocks_total=4096,
            requests=reqs,
        )

    view = ClusterView(1.0, tuple(snap(i) for i in range(8)))
    router = make_router("llumnix")
    CountingRequests.walks = 0
    picks = {router.route(RequestInfo(f"r{n}", 1.0, 512, 128), view).prefill_instance for n in range(20)}
    assert picks == {"x-0"}  # the lightest (no high-priority headroom anywhere)
    assert CountingRequests.walks <= len(view.instances), CountingRequests.walks
    # A new snapshot object is read again: its high-priority requests' headroom moves the pick.
    light = dataclasses.replace(
        view.instances[0],
        requests=CountingRequests(RequestLoad(f"h{j}", 600, 50, None, 1) for j in range(16)),
    )
    view2 = ClusterView(2.0, (light, *view.instances[1:]))
    assert router.route(RequestInfo("s", 2.0, 512, 128), view2).prefill_instance == "x-1"


def lookahead_view(n_instances: int, residents: int) -> ClusterView:
    def snap(i: int) -> InstanceSnapshot:
        reqs = tuple(RequestLoad(f"q{i}-{j}", 700, 50, float(10 + (37 * j) % 500)) for j in range(residents))
        return InstanceSnapshot(
            f"x-{i}",
            InstanceRole.MIXED,
            num_running=residents,
            num_decoding=residents,
            kv_blocks_used=residents * 45,
            kv_blocks_total=100_000,
            decode_context_tokens=700 * residents,
            requests=reqs,
        )

    return ClusterView(1.0, tuple(snap(i) for i in range(n_instances)))


def test_lookahead_prices_a_newcomer_without_walking_every_resident() -> None:
    # With per-request detail (``detail=True``: a live snapshot always lists its requests) the decode side summed
    # min(remaining, O) over every resident of every candidate for every request: 64 instances x 128 residents,
    # 7.7 ms a decision against 2.1 ms with 8 residents. The residents' lengths are sorted once per snapshot; a
    # decision bisects them.
    def best_us(view: ClusterView) -> float:
        router = make_router("lookahead", detail=True)
        router.route(RequestInfo("warm", 1.0, 512, 128), view)  # the per-snapshot terms
        best = float("inf")
        for k in range(5):
            t0 = time.perf_counter()
            for n in range(10):
                router.route(RequestInfo(f"r{k}-{n}", 1.0, 512, 128, predicted_output_tokens=200.0), view)
            best = min(best, time.perf_counter() - t0)
        return best

    few, many = best_us(lookahead_view(16, 8)), best_us(lookahead_view(16, 1024))
    assert many < 5 * few, f"1024 residents: {many / few:.1f}x the decision time of 8"


def test_lookahead_overlap_is_the_sum_over_residents() -> None:
    # The bisected sum is the plain one: sum(min(r, O)) over the residents, whatever O.
    router = make_router("lookahead", detail=True)
    view = lookahead_view(1, 40)
    inst = view.instances[0]
    t = router._terms(inst)
    rems = [r.predicted_remaining for r in inst.requests]
    for o in (1.0, 10.0, 10.5, 200.0, 509.0, 10_000.0):
        q = router._request(RequestInfo("n", 1.0, 512, 128, predicted_output_tokens=o))
        side = router._decode_side(q, t, colocated=True)
        step_with = t.a1 + t.b * (t.Cd + q.P + q.O / 2)
        assert side.harm_s == pytest.approx(
            (step_with - t.step_now) * sum(min(r, o) for r in rems), rel=1e-12
        )


def test_ingress_view_keeps_the_adjusted_snapshot_of_an_instance_whose_counts_did_not_change() -> None:
    # The live view adds the requests routed since the last refresh to each instance's snapshot. It made a new
    # snapshot object per counted instance on every request: in a burst (all 64 counted) 0.6-1.4 ms a view, more
    # than the routing, and every per-snapshot router cache (lookahead's terms, llumnix's counts) missed on every
    # instance: lookahead through the ingress 5.5-9.9 ms a decision, 1.2 ms with the objects kept.
    from scheduler.config.load import load_config
    from scheduler.control.ingress import Ingress

    ing = Ingress(
        load_config("default"), controller=None, direct=False, router=make_router("least_outstanding")
    )
    ing._view = lookahead_view(8, 4)
    for s in ing._view.instances:
        ing._pending[s.instance_id] = 1
    ing._incoming["x-3"] = 2
    v1, v2 = ing.view(), ing.view()
    assert all(a is b for a, b in zip(v1.instances, v2.instances, strict=True))
    assert [s.num_waiting for s in v1.instances] == [1, 1, 1, 3, 1, 1, 1, 1]
    assert [s.num_incoming for s in v1.instances] == [0, 0, 0, 2, 0, 0, 0, 0]
    ing._pending["x-5"] += 1  # one more routed there: only its entry is new
    v3 = ing.view()
    assert [b.instance_id for a, b in zip(v2.instances, v3.instances, strict=True) if a is not b] == ["x-5"]
    assert v3.instances[5].num_waiting == 2
    fresh = dataclasses.replace(ing._view.instances[0], num_waiting=7)  # a refresh brought a new snapshot
    ing._view = ClusterView(2.0, (fresh, *ing._view.instances[1:]))
    assert ing.view().instances[0].num_waiting == 8
    ing._pending.clear()
    ing._incoming.clear()
    assert ing.view() is ing._view


def test_lookahead_reads_each_candidates_prefill_history_once_a_decision() -> None:
    # The decode side of a MIXED candidate read its prefill history (an exp per read) twice, once for the stretch
    # of its own decode and once for the TPOT-miss price: Azure conv x16 lookahead, 620k reads for 310k prices.
    from scheduler.core.types import SLO
    from scheduler.policy.route import RouteDecision
    from scheduler.policy.routers_lookahead import LookaheadRouter, default_latency_model

    slo = SLO(ttft_s=10.0, tpot_s=0.03)
    router = LookaheadRouter(default_latency_model(), slo=slo, tpot_miss_penalty_s=10.0)
    view = lookahead_view(8, 8)
    router.route(RequestInfo("warm", 1.0, 512, 128), view)
    router.on_routed(RequestInfo("big", 1.0, 16_000, 128), RouteDecision("x-2"))
    reads = 0
    stalls = router._stalls

    def counting(instance_id: str) -> tuple[float, float, float]:
        nonlocal reads
        reads += 1
        return stalls(instance_id)

    router._stalls = counting  # type: ignore[method-assign]
    q = router._request(RequestInfo("n", 1.0, 512, 10, predicted_output_tokens=10.0))
    sides = {inst.instance_id: router._decode_side(q, router._terms(inst), colocated=True) for inst in view.instances}
    assert reads == len(view.instances), f"{reads} history reads for {len(view.instances)} candidates"
    router._stalls = stalls  # type: ignore[method-assign]
    # The one read serves both uses: the TPOT-miss price is the standalone miss probability's, which the prefill
    # history raises on x-2 only.
    for iid, side in sides.items():
        t = router._terms(router._cache[iid].snap)
        residents = router.miss_penalty_s * t.Bd if t.step_now <= slo.tpot_s < side.tpot_s else 0.0
        miss = router._tpot_miss_probability(iid, q.O, side.tpot_s, slo.tpot_s)
        assert side.slo_s == router.tpot_miss_penalty_s * q.w * miss + residents
    assert sides["x-2"].slo_s > sides["x-1"].slo_s


def test_lookahead_prices_colocated_candidates_without_building_breakdowns(monkeypatch: pytest.MonkeyPatch) -> None:
    # A colocated candidate's score built a CostBreakdown (seven fields, frozen) only to read its total: one per
    # candidate per request (Azure conv x16 lookahead: 310k). The score is the estimate's total, bit for bit.
    import scheduler.policy.routers_lookahead as la

    router = make_router("lookahead", detail=True)
    view = lookahead_view(8, 8)
    req = RequestInfo("n", 1.0, 900, 128, predicted_output_tokens=40.0)
    totals = [router.estimate(req, inst).total_s for inst in view.instances]
    built = 0

    class Counting(la.CostBreakdown):  # type: ignore[misc, valid-type]
        def __init__(self, *args: float) -> None:
            nonlocal built
            built += 1
            super().__init__(*args)

    monkeypatch.setattr(la, "CostBreakdown", Counting)
    assert [router.score(req, inst, phase="colocated") for inst in view.instances] == totals
    router.route(req, view)
    assert built == 0, f"{built} breakdowns built for {len(view.instances)} candidates"
