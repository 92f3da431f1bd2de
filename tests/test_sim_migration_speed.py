"""The simulator with a migration policy (fortieth session, docs/simulator.md "Migration runs' speed"): 20x the
time of a run without one on an overloaded L4 cluster, spent rebuilding every queued request's snapshot entry at
each 0.5 s policy tick and in the policy's scans of them. The faster code keeps the entries and skips work that
cannot plan; these tests pin both (counts the old code fails) and that the plans and summaries stay the same."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from scheduler.config.load import load_config
from scheduler.config.models import EngineSpec
from scheduler.core.types import ClusterView, InstanceRole, InstanceSnapshot, RequestLoad
from scheduler.engine_model import EngineModel
from scheduler.engine_model.model import _remaining
from scheduler.policy.migration import LlumnixMigrationPolicy, make_migration_policy
from scheduler.predict.base import LengthPrediction
from sim.migration import migration_stats
from sim.simulator import Simulator, Workload
from tests.test_engine_prefix_cache import LAT

DIST = LengthPrediction.from_probs([1, 2, 1], (1, 8, 32, 128))


def small_engine(blocks: int = 60) -> EngineModel:
    spec = EngineSpec(block_size=16, max_num_batched_tokens=256, max_num_seqs=16, num_kv_blocks=blocks)
    return EngineModel(LAT, spec)


def queued_entries(eng: EngineModel) -> list[RequestLoad]:
    return [r for r in eng.snapshot("i", 0.0, detail=True).requests if r.in_prefill]


def test_queued_entries_are_kept_between_reads() -> None:
    # An instance whose KV is full holds a long queue: a read rebuilt every queued entry (~100 on the bursty L4 run,
    # at every policy tick and routing refresh); they are the same until the queue changes.
    eng = small_engine(blocks=40)
    for k in range(30):
        eng.add_request(f"r{k}", 300, 50, predicted_remaining=20.0, length_dist=DIST)
    eng.step()
    first, again = queued_entries(eng), queued_entries(eng)
    assert len(first) >= 25
    assert all(a is b for a, b in zip(first, again, strict=True))
    # A new arrival changes the queue: the others keep their entries, the new one is listed last.
    eng.add_request("late", 100, 5)
    after = queued_entries(eng)
    assert [r.request_id for r in after] == [r.request_id for r in first] + ["late"]
    assert all(a is b for a, b in zip(first, after, strict=False))


def from_scratch(eng: EngineModel) -> tuple[tuple[RequestLoad, ...], int]:
    """What a detailed read shows of ``eng``'s requests, and its pending prompt tokens, built without the kept
    reads (the snapshot's own rule: decodes, then prefilling and waiting)."""
    out = []
    for s in eng.decoding.values():
        g = eng.generated_of(s)
        out.append(RequestLoad(s.rid, eng.computed_of(s) + 1, g, _remaining(s, g), s.priority))
    for s in (*eng.prefilling, *eng.waiting):
        out.append(RequestLoad(s.rid, s.num_tokens, s.generated, _remaining(s, s.generated), s.priority, True))
    pending = sum(s.num_tokens - s.num_computed for s in eng.prefilling) + sum(s.num_tokens for s in eng.waiting)
    return tuple(out), pending


@pytest.mark.parametrize("seed", range(6))
def test_kept_queue_entries_equal_a_fresh_read_through_a_random_run(seed: int) -> None:
    # Arrivals (some at the queue's head, as a migrated request), admissions, chunked prefills, completions,
    # preemptions (small KV), aborts, a decode detached (a migration's stop) and closed-form spans: after each, the
    # read with its kept entries equals one built from scratch.
    rng = np.random.default_rng(seed)
    eng = small_engine(blocks=int(rng.integers(30, 80)))
    rids: list[str] = []
    for k in range(400):
        op = rng.random()
        if op < 0.3:
            rid = f"r{k}"
            guess = float(rng.integers(1, 60)) if rng.random() < 0.7 else None
            eng.add_request(rid, int(rng.integers(10, 400)), int(rng.integers(1, 60)), priority=int(rng.integers(0, 2)),
                            predicted_remaining=guess, length_dist=DIST if guess is not None else None,
                            front=bool(rng.random() < 0.2), generated_before=int(rng.integers(0, 3)))
            rids.append(rid)
        elif op < 0.35 and rids:
            eng.abort(rids[int(rng.integers(len(rids)))])
        elif op < 0.4 and eng.decoding:
            eng.detach(next(iter(eng.decoding)))
        elif op < 0.5 and (span := eng.plan_span()) is not None:
            eng.advance(span, int(rng.integers(1, span.steps + 1)))
        elif eng.has_work:
            eng.step()
        kept = eng.snapshot("i", 0.0, detail=True)
        assert (kept.requests, kept.prefill_tokens_pending) == from_scratch(eng), f"op {k}"
    assert eng.num_preemptions > 0  # the run went through preemptions (entries that re-enter the queue)


def snap(iid: str, *, used: int, decodes: list[int], queued: int, total: int = 1000) -> InstanceSnapshot:
    reqs = tuple(RequestLoad(f"{iid}-d{k}", ctx, 10) for k, ctx in enumerate(decodes))
    reqs += tuple(RequestLoad(f"{iid}-q{k}", 200, 0, in_prefill=True) for k in range(queued))
    return InstanceSnapshot(instance_id=iid, role=InstanceRole.MIXED, time_s=0.0, num_running=len(decodes),
                            num_waiting=queued, num_decoding=len(decodes), kv_blocks_used=used,
                            kv_blocks_total=total, block_size=16, prefill_tokens_pending=0, requests=reqs)


def counting(policy: LlumnixMigrationPolicy) -> list[int]:
    calls = [0]
    inner = policy._destination

    def wrapped(*a, **kw):
        calls[0] += 1
        return inner(*a, **kw)

    policy._destination = wrapped  # type: ignore[method-assign]
    return calls


def test_balance_looks_for_no_destination_when_every_instance_is_about_as_full() -> None:
    # Under load every instance is above the watermark and none is ``balance_gap`` less used: nothing can move, and
    # the old round still sorted each source's requests and looked for a destination for every one (40 here).
    policy = LlumnixMigrationPolicy()
    calls = counting(policy)
    view = ClusterView(0.0, tuple(snap(f"i{k}", used=900 + 10 * k, decodes=[300 + 20 * j for j in range(10)],
                                       queued=100) for k in range(4)))
    assert policy.plan(view, 1.0) == []
    assert calls[0] == 0


def test_balance_does_not_retry_a_larger_request_where_a_smaller_found_no_room() -> None:
    # The one less-used instance (0.5 against 0.95) would go past the 0.8 watermark with any of the source's
    # decodes (5000+ tokens: 313+ of its 1000 blocks): once the smallest finds no destination, no larger one can
    # (``_destination`` is monotone in the context) until a move is planned. The old round tried all ten.
    policy = LlumnixMigrationPolicy()
    calls = counting(policy)
    src = snap("src", used=950, decodes=[5000 + 100 * j for j in range(10)], queued=50)
    dst = snap("dst", used=500, decodes=[100], queued=0)
    assert policy.plan(ClusterView(0.0, (src, dst)), 1.0) == []
    assert calls[0] == 1
    # A smaller one after a failure is still tried: a long-running 5000-token decode goes first (it spares the
    # most KV-time per token copied) and finds no room; the 1000-token one after it does.
    both = (RequestLoad("long", 5000, 10, predicted_remaining=2000.0), RequestLoad("short", 1000, 10, 10.0))
    src = snap("src", used=950, decodes=[], queued=0)
    src = InstanceSnapshot(**{**{f: getattr(src, f) for f in src.__slots__}, "requests": both, "num_decoding": 2})
    plans = LlumnixMigrationPolicy().plan(ClusterView(0.0, (src, dst)), 1.0)
    assert [p.request_id for p in plans] == ["short"]


def with_requests(s: InstanceSnapshot, reqs: tuple[RequestLoad, ...], **kw: object) -> InstanceSnapshot:
    return InstanceSnapshot(**{**{f: getattr(s, f) for f in s.__slots__}, "requests": reqs,
                               "num_decoding": len(reqs), "num_running": len(reqs), **kw})


# Three long-running large decodes (5000-7000 tokens: 317+ blocks with headroom) go first in both orders (a drain's
# longest remaining first; priority's most KV-time spared per token copied), then a short 500-token one.
LARGE_FIRST = tuple(RequestLoad(f"big{k}", 5000 + 1000 * k, 10, 2000.0 - 100 * k) for k in range(3)) + (
    RequestLoad("small", 500, 10, 10.0),)


VIP = RequestLoad("vip", 100, 10, priority=1)


@pytest.mark.parametrize(("src", "dst", "reason"), [
    # The one destination has 160 blocks free: once the 5000-token decode finds none, the 6000- and 7000-token
    # ones cannot either. It holds a high-priority decode and the short one takes it to 0.87, past ``pressure``:
    # a drain still goes there (its source must empty).
    (with_requests(snap("src", used=950, decodes=[], queued=0), LARGE_FIRST, draining=True),
     with_requests(snap("dst", used=840, decodes=[], queued=0), (VIP,)), "drain"),
    # A 0.95-full instance holding a high-priority decode sheds low-priority ones; the destination at 0.5 would go
    # past the 0.8 watermark with any of the large ones (313+ blocks).
    (with_requests(snap("src", used=950, decodes=[], queued=0), (*LARGE_FIRST, VIP)),
     snap("dst", used=500, decodes=[100], queued=0), "priority"),
], ids=["drain", "priority"])
def test_drain_and_priority_do_not_retry_a_larger_request_where_a_smaller_found_no_room(
        src: InstanceSnapshot, dst: InstanceSnapshot, reason: str) -> None:
    # The old triggers asked for all four decodes; the short one after the failures is still asked for.
    policy = LlumnixMigrationPolicy()
    calls = counting(policy)
    plans = policy.plan(ClusterView(0.0, (src, dst)), 1.0)
    assert [(p.request_id, p.destination, p.reason.value) for p in plans] == [("small", "dst", reason)]
    assert calls[0] == 2


def test_defrag_does_not_retry_an_instance_whose_smallest_decode_has_no_room() -> None:
    # A 3200-token prompt heads the queue and fits nowhere (10 blocks free anywhere); its instance's decodes could
    # free enough, but no destination has room for even the smallest: the old round tried each of them (and rolled
    # back) at every tick; one look at the smallest settles it.
    policy = LlumnixMigrationPolicy()
    calls = counting(policy)
    src = snap("src", used=990, decodes=[3100, 1000, 3200, 2000], queued=0)
    head = RequestLoad("head", 3200, 0, in_prefill=True)
    src = InstanceSnapshot(**{**{f: getattr(src, f) for f in src.__slots__}, "requests": (*src.requests, head),
                              "num_waiting": 1})
    dst = snap("dst", used=990, decodes=[100], queued=0)
    assert policy.plan(ClusterView(0.0, (src, dst)), 1.0) == []
    assert calls[0] == 1


@pytest.mark.parametrize(("decodes", "moved"), [
    ([1920, 1600, 1600], ["src-d1", "src-d2", "src-d0"]),  # no one decode frees enough: smallest first
    ([4000, 1600, 1600, 1600], ["src-d1", "src-d2", "src-d3"]),  # the one that would has no room: then smallest
])
def test_defrag_asks_once_for_a_destination_of_its_smallest_decode(decodes: list[int], moved: list[str]) -> None:
    # A 4000-token prompt (250 blocks) heads the queue with 10 free; every other instance has 220. The defrag's
    # look at its smallest decode before the loop found a destination, and the loop asked again for the same
    # request with nothing planned in between (the answer cannot have changed).
    policy = LlumnixMigrationPolicy(high_watermark=1.0, max_per_instance=4, max_per_s=10.0)
    asked: list[tuple[str, int]] = []
    inner = policy._destination

    def wrapped(rnd, r, *a, **kw):
        asked.append((r.request_id, rnd.changes))
        return inner(rnd, r, *a, **kw)

    policy._destination = wrapped  # type: ignore[method-assign]
    src = snap("src", used=990, decodes=decodes, queued=0)
    head = RequestLoad("head", 4000, 0, in_prefill=True)
    src = InstanceSnapshot(**{**{f: getattr(src, f) for f in src.__slots__}, "requests": (*src.requests, head),
                              "num_waiting": 1})
    dests = [snap(f"d{k}", used=780, decodes=[100], queued=0) for k in range(3)]
    plans = policy.plan(ClusterView(0.0, (src, *dests)), 1.0)
    assert [(p.request_id, p.destination, p.reason.value) for p in plans] == [
        (rid, f"d{k}", "defrag") for k, rid in enumerate(moved)]
    assert len(asked) == len(set(asked)), asked


def l4_config(tmp_path: Path):
    text = (Path(__file__).resolve().parents[1] / "scheduler/config/examples/default.yaml").read_text()
    path = tmp_path / "l4.yaml"  # the migration study's cluster: 4 x Llama-2-7B on L4s, KV binds
    path.write_text(text.replace("gpu: a100", "gpu: l4"))
    return load_config(path)


# Pinned from the code before the speed-up (commit 1edb4aa, ``Simulator(cfg, migration=...).run(w)`` on the
# workload below): (events, engine steps, preemptions, moves started by trigger, committed, aborted at the
# destination / source, KV tokens copied), and the sums of first-token and finish times. The faster code makes the
# same plans, so all of it is equal (the times to float rounding of the sums: they are bit-identical here).
PINNED = [
    ({}, (3412, 33477, 67, {"defrag": 1, "load_balance": 20, "priority": 10}, 31, 0, 0, 59954),
     130907.42644826598, 145223.1789216674),
    ({"high_watermark": 0.5, "balance_gap": 0.1, "pressure": 0.7},
     (3460, 33970, 84, {"load_balance": 12, "priority": 14}, 26, 0, 0, 25953), 133499.5443374546, 147978.33776186296),
    ({"high_watermark": 0.3, "balance_gap": 0.1, "max_concurrent": 16, "max_plans": 16, "max_per_s": 16,
      "cooldown_s": 0.5},
     (3491, 35263, 75, {"load_balance": 11, "priority": 15}, 26, 0, 0, 26047), 133168.11325550376, 147631.0044249679),
]


@pytest.mark.parametrize(("params", "counts", "first_sum", "finish_sum"), PINNED)
def test_migration_runs_are_those_of_the_code_before_the_speed_up(tmp_path, params, counts, first_sum, finish_sum):
    # 400 bursty requests (CV 4, 3 req/s), 30% high priority, 15% long prompts (5000-8000 tokens, past the model's
    # 4096: served as if longer) so every trigger but drain plans: balance, priority isolation, de-fragmentation.
    rng = np.random.default_rng(7)
    n = 400
    gaps = rng.gamma(1 / 16, 16 / 3.0, n)
    prompt = np.where(rng.random(n) < 0.15, rng.integers(5000, 8000, n), rng.integers(50, 2000, n))
    w = Workload(np.cumsum(gaps), prompt, rng.integers(5, 800, n), priority=(rng.random(n) < 0.3).astype(np.int64))
    sim = Simulator(l4_config(tmp_path), migration=make_migration_policy("llumnix", **params))
    res = sim.run(w)
    st = migration_stats(sim.migrations)
    got = (res.events, res.steps, int(res.preemptions.sum()), st["started"], st["committed"], st["aborted_dst"],
           st["aborted_src"], st["copied_tokens"])
    assert got == counts
    assert float(np.nansum(res.first_token_s)) == pytest.approx(first_sum, rel=1e-12)
    assert float(np.nansum(res.finish_s)) == pytest.approx(finish_sum, rel=1e-12)
