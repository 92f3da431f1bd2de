"""A length guess that runs out is renewed from the predictor's distribution (``LengthPrediction.expected_remaining``),
in the simulated engine and the live instance alike, rather than read as "finishing now".

Before: a request past its guess (the median) counted 0 remaining tokens in every snapshot, live and simulated, so a
decode-heavy request the predictor under-guessed vanished from the routers' view of decode work (the IR mix with the
shipped trace predictor: guesses ~131 tokens, outputs 300-800; lookahead's mean-E2E gain over round-robin 12.3%).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scheduler.config.models import EngineSpec
from scheduler.control.instance import InstanceInfo, _Stream, snapshot_from_stats
from scheduler.core.types import InstanceRole, RequestLoad
from scheduler.engine.base import EngineStats
from scheduler.engine_model import EngineModel
from scheduler.latency import roofline_model
from scheduler.predict import load_predictor
from scheduler.predict.base import BUCKET_EDGES, LengthPrediction, remaining_tokens
from tests.test_engine_model import GPU, MODEL, assert_predicted_sum_is_per_request

# Mass on 128-256 and 512-1024 tokens: the median sits in the first, so a 700-token response outlives its guess.
DIST = LengthPrediction.from_probs([0, 0, 0, 0, 0.6, 0, 0.4, 0, 0])


def _sample(d: LengthPrediction, rng: np.random.Generator, n: int) -> np.ndarray:
    """Draws from ``d``'s model: a bucket by its probability, log-uniform inside it."""
    e = np.array(d.bucket_edges, dtype=float)
    k = rng.choice(len(d.probs), size=n, p=np.array(d.probs))
    lo, hi = np.maximum(e[k], 1.0), e[k + 1]
    return np.exp(np.log(lo) + rng.random(n) * (np.log(hi) - np.log(lo)))


@pytest.mark.parametrize("g", [0.0, 100.0, 181.0, 300.0, 600.0, 1000.0])
def test_expected_remaining_is_the_conditional_mean_of_the_distribution(g: float) -> None:
    x = _sample(DIST, np.random.default_rng(0), 400_000)
    alive = x[x > g]
    expect = float(alive.mean() - g) if len(alive) else 1.0
    assert DIST.expected_remaining(g) == pytest.approx(max(expect, 1.0), rel=0.02)


def test_expected_remaining_edges() -> None:
    assert DIST.expected_remaining(256.0) == pytest.approx(
        (1024 - 512) / math.log(2) - 256.0
    )  # the gap: none left
    # Past everything it knows: one more octave bucket from there (``test_the_tail_rule...`` below).
    assert DIST.expected_remaining(1024.0) == pytest.approx(_octave_rest(1024.0), rel=0.01)
    # A guess with time left is read as is; a point guess (hint, exact lengths) that ran out stays at 0.
    assert remaining_tokens(50.0, DIST, 131.0) == 50.0
    assert remaining_tokens(-5.0, None, 300.0) == 0.0
    assert remaining_tokens(-5.0, DIST, 300.0) == DIST.expected_remaining(300.0) > 300.0


def _octave_rest(g: float) -> float:
    """E[L - g] of L log-uniform on [g, 2g), by quadrature (the tail rule's rest, computed apart from it)."""
    x = np.exp(np.linspace(math.log(g), math.log(2 * g), 200_001))
    return float(np.trapezoid(x - g, np.log(x)) / math.log(2))


# Mass in the open last bucket [2048, 8192): the shipped predictor's arXiv summaries, and a flat histogram.
TAILED = [
    LengthPrediction.from_probs([1.0] * 9),
    load_predictor("trace").predict(None, prompt_tokens=1000, tenant="arxiv_summarization"),
]


@pytest.mark.parametrize("dist", TAILED, ids=["flat", "arxiv"])
def test_the_tail_rule_keeps_a_response_past_the_last_edge_running(dist: LengthPrediction) -> None:
    """Past the last bucket edge (8192) a response was read as ending at once (1 token), and the open last
    bucket's rest fell to ~0 towards that edge (96 tokens at 8000): routers, the migration policy and the
    simulator's renewals (one per step there) saw the longest requests as finishing. Now the rest of a response
    the histogram no longer resolves is one more octave bucket's from where it stands: it grows with it."""
    last = BUCKET_EDGES[-2]
    x = _sample(dist, np.random.default_rng(1), 400_000)
    for g in (3000.0, 4000.0):  # the open bucket's own law while it spans an octave or more ahead
        alive = x[x > g]
        assert dist.expected_remaining(g) == pytest.approx(float(alive.mean()) - g, rel=0.03)
    for g in (9000.0, 20_000.0, 100_000.0):
        assert dist.expected_remaining(g) == pytest.approx(_octave_rest(g), rel=1e-3)
    # Continuous through the open bucket, no cliff at its upper edge, and growing from where the octave ahead
    # reaches past that edge.
    gs = np.arange(last, 4 * BUCKET_EDGES[-1], 7.0)
    rest = np.array([dist.expected_remaining(g) for g in gs])
    assert rest.min() >= 0.4 * last and np.all(np.abs(np.diff(rest)) < 10.0)
    assert np.all(np.diff(rest[gs >= BUCKET_EDGES[-1] / 2]) > 0.0)
    # What the histogram says before the response reaches the open bucket does not move: the mean is E[L].
    assert dist.mean == pytest.approx(float(x.mean()), rel=0.02)


def test_the_tail_stops_at_max_tokens() -> None:
    """A capped guess (``capped``: the engine stops at ``max_tokens``) is never renewed past the cap, a response
    that outran every bucket with mass included."""
    for cap in (1500, 3000, 8000):
        c = DIST.capped(cap)
        for g in np.arange(1.0, cap, 13.0):
            assert 1.0 <= c.expected_remaining(g) <= max(cap - g, 1.0) + 1e-9
        assert c.expected_remaining(cap - 200.0) == pytest.approx(
            min(_octave_rest(cap - 200.0), 200.0), rel=1e-3)  # past the 512-1024 mass: the tail, to the cap


@pytest.mark.parametrize("dist", TAILED, ids=["flat", "arxiv"])
def test_a_cap_past_the_last_edge_still_bounds_the_tail(dist: LengthPrediction) -> None:
    """``capped`` left a distribution unchanged for caps >= 8192 (the last edge), so the tail rule, bounded only by
    the cap's one-token bucket, renewed past ``max_tokens``: cap 10000, 9500 generated -> 4205 more, not <= 500.
    The buckets still do not move (nothing to cut below the last edge); the cap does bound the renewal."""
    assert dist.capped(10_000).expected_remaining(9500.0) == pytest.approx(500.0)
    for cap in (BUCKET_EDGES[-1], 10_000, 20_000):
        c = dist.capped(cap)
        assert (c.bucket_edges, c.probs, c.point, c.max_tokens) == (dist.bucket_edges, dist.probs, dist.point, cap)
        for g in np.arange(1.0, cap, 37.0):
            r = c.expected_remaining(g)
            assert 1.0 <= r <= max(cap - g, 1.0) + 1e-9
            assert r == pytest.approx(min(dist.expected_remaining(g), max(cap - g, 1.0)), rel=1e-12)
    assert dist.expected_remaining(9500.0) == pytest.approx(_octave_rest(9500.0), rel=1e-3)  # uncapped: the octave
    assert dist.capped(20_000).capped(10_000).max_tokens == dist.capped(10_000).capped(20_000).max_tokens == 10_000
    assert dist.capped(10_000).capped(3000) == dist.capped(3000)  # a cap below the edge: its one-token bucket
    with pytest.raises(ValueError, match="max_tokens"):
        dist.capped(0)


def test_the_cap_past_the_last_edge_reaches_the_live_and_simulated_renewals() -> None:
    """The capped distribution is the one the instances renew from: the engine model (simulator) and the live
    instance's snapshot (``snapshot_from_stats``) read a request 9500 tokens into a 10000-token cap as at most
    500 from its end (they read ~4200 before)."""
    cap, dist = 10_000, TAILED[1].capped(10_000)
    eng = _engine(blocks=1000)
    eng.add_request("long", 50, cap, predicted_remaining=dist.point, length_dist=dist)
    while eng.has_work and eng.generated_of(eng.get("long")) < 9500:
        span = eng.plan_span(max_steps=256)
        eng.advance(span, span.steps) if span is not None else eng.step()
    sim = eng.snapshot("x", 0.0, detail=True).requests[0]
    g = sim.generated_tokens
    assert 9500 <= g < cap and 1.0 <= sim.predicted_remaining <= cap - g
    stats = EngineStats(1, 0, 10, 100, 16, requests=(RequestLoad("r", 50 + g, g, None),))
    info = InstanceInfo("d", "p", InstanceRole.DECODE, "cpu", 1, "tiny", "sim", "i")
    live = snapshot_from_stats(stats, info, 0.0, {"r": _Stream(predicted=dist.point, dist=dist)})
    assert 1.0 <= live.requests[0].predicted_remaining <= cap - g


def test_the_simulated_engine_keeps_a_very_long_response_in_its_decode_work() -> None:
    """The engine model renews a spent guess from ``expected_remaining``: past 8192 tokens it renewed every step
    to 1 token, and the snapshot the routers read counted the request as finishing."""
    eng = _engine()
    dist = TAILED[0]
    eng.add_request("long", 50, 12_000, predicted_remaining=dist.point, length_dist=dist)
    while eng.has_work and eng.generated_of(eng.get("long")) < 9000:
        span = eng.plan_span(max_steps=256)
        eng.advance(span, span.steps) if span is not None else eng.step()
    snap = eng.snapshot("x", 0.0, detail=True)
    g = snap.requests[0].generated_tokens
    assert 9000 <= g < 12_000
    assert snap.predicted_remaining_tokens == pytest.approx(snap.requests[0].predicted_remaining)
    assert snap.predicted_remaining_tokens > 0.3 * g  # one renewal of ~0.44 g, counted down since


def _engine(blocks: int = 4000) -> EngineModel:
    return EngineModel(
        roofline_model(MODEL, GPU, 1),
        EngineSpec(block_size=16, max_num_batched_tokens=256, num_kv_blocks=blocks),
    )


def _run(eng: EngineModel, steps: int) -> None:
    for _ in range(steps):
        if not eng.has_work:
            return
        span = eng.plan_span(max_steps=7)
        eng.advance(span, span.steps) if span is not None else eng.step()


def test_a_request_past_its_guess_still_counts_in_the_simulated_snapshot() -> None:
    eng = _engine()
    eng.add_request("renewed", 50, 700, predicted_remaining=DIST.point, length_dist=DIST)
    eng.add_request("point", 50, 700, predicted_remaining=DIST.point)  # a hint: no distribution
    while eng.has_work and eng.generated_of(eng.get("renewed")) < 300:
        _run(eng, 1)
    snap = eng.snapshot("x", 0.0, detail=True)
    by_id = {r.request_id: r for r in snap.requests}
    g = by_id["renewed"].generated_tokens
    assert 300 <= g < 700  # both are past their guess, still running
    assert by_id["point"].predicted_remaining == 0.0
    assert by_id["renewed"].predicted_remaining == pytest.approx(DIST.expected_remaining(g), abs=1.0)
    assert snap.predicted_remaining_tokens == pytest.approx(by_id["renewed"].predicted_remaining, abs=1e-6)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), blocks=st.integers(30, 200))
def test_renewed_aggregate_equals_the_per_request_sum(seed: int, blocks: int) -> None:
    """The O(1) sum (renewed through the due heap) equals the detailed snapshot's per-request sum, through spans,
    preemptions and a migration's detach / re-add, which carries the tokens generated before it."""
    rng = np.random.default_rng(seed)
    eng = _engine(blocks)
    for i in range(12):
        p, o = int(rng.integers(1, 150)), int(rng.integers(2, 400))
        if -(-(p + o) // 16) <= blocks:
            guess = float(rng.integers(1, 60))
            eng.add_request(str(i), p, o, predicted_remaining=guess, length_dist=DIST if i % 2 else None)

    for k in range(600):
        if not eng.has_work:
            break
        _run(eng, 1)
        assert_predicted_sum_is_per_request(eng)
        if k == 40 and eng.decoding:
            seq = eng.detach(next(iter(eng.decoding)))
            assert seq is not None
            before = seq.dist_base
            eng.add_request(
                seq.rid,
                seq.num_tokens,
                seq.max_new,
                cached_tokens=seq.num_tokens - 1,
                predicted_remaining=seq.predicted_remaining,
                length_dist=seq.length_dist,
                generated_before=before,
            )
            assert eng.get(seq.rid).dist_base == before
            assert_predicted_sum_is_per_request(eng)


def test_live_and_simulated_snapshots_renew_alike() -> None:
    """The live instance (``snapshot_from_stats``: its stream's guess and the outputs emitted elsewhere) reports
    what the engine model does for the same request 300 tokens in (one of them on a prefill instance)."""
    eng = _engine()
    eng.add_request(
        "r",
        51,
        699,
        cached_tokens=50,
        predicted_remaining=DIST.point - 1,
        length_dist=DIST,
        generated_before=1,
    )  # a P->D decode: token 0 came from the prefill instance
    while eng.has_work and eng.generated_of(eng.get("r")) < 299:
        eng.step()
    sim = eng.snapshot("x", 0.0, detail=True).requests[0]
    assert sim.generated_tokens == 299
    stats = EngineStats(1, 0, 10, 100, 16, requests=(RequestLoad("r", 350, 299, None),))
    info = InstanceInfo("d", "p", InstanceRole.DECODE, "cpu", 1, "tiny", "sim", "i")
    live = snapshot_from_stats(stats, info, 0.0, {"r": _Stream(predicted=DIST.point, dist=DIST, before=1)})
    assert live.requests[0].predicted_remaining == pytest.approx(sim.predicted_remaining, abs=1.0)
    assert live.requests[0].predicted_remaining == pytest.approx(DIST.expected_remaining(300), abs=1e-9)
    no_dist = snapshot_from_stats(stats, info, 0.0, {"r": _Stream(predicted=DIST.point, before=1)})
    assert no_dist.requests[0].predicted_remaining == 0.0 and no_dist.predicted_remaining_tokens == 0.0


def test_the_simulator_hands_the_predictors_distribution_to_the_engines() -> None:
    from scheduler.config.load import load_config
    from sim.commands import with_predictor
    from sim.simulator import Simulator, Workload

    cfg = with_predictor(load_config("default"), "trace")
    w = Workload(np.array([0.0, 0.1]), np.array([100, 2000]), np.array([20, 30]))
    sim = Simulator(cfg, router="round_robin")
    sim.run(w)
    assert sim.w.predicted_dist is not None and len(sim.w.predicted_dist) == 2
    assert [d.point for d in sim.w.predicted_dist] == list(sim.w.predicted_output)
    with pytest.raises(ValueError, match="predicted_dist"):
        Workload(w.arrival_s, w.prompt_tokens, w.output_tokens, predicted_dist=sim.w.predicted_dist)


def test_live_and_simulated_snapshots_agree_after_a_renewal_too() -> None:
    """Read before and after its renewal, the live stream's guess counts down from the renewal as the engine
    model's does (it renews once, at the first read past the guess): read afresh from the distribution at every
    snapshot, the live value parted from the simulated one after the first renewal (438.7 against 418.8 here)."""
    eng = _engine()
    eng.add_request("r", 51, 699, cached_tokens=50, predicted_remaining=DIST.point - 1, length_dist=DIST,
                    generated_before=1)
    stream = _Stream(predicted=DIST.point, dist=DIST, before=1)
    info = InstanceInfo("d", "p", InstanceRole.DECODE, "cpu", 1, "tiny", "sim", "i")
    for target in (200, 250, 299, 400):
        while eng.has_work and eng.generated_of(eng.get("r")) < target:
            eng.step()
        snap = eng.snapshot("x", 0.0, detail=True)
        sim = snap.requests[0]
        stats = EngineStats(1, 0, 10, 100, 16, requests=(RequestLoad("r", 350, sim.generated_tokens, None),))
        live = snapshot_from_stats(stats, info, 0.0, {"r": stream})
        assert live.requests[0].predicted_remaining == pytest.approx(sim.predicted_remaining, abs=1e-6), target
        assert live.predicted_remaining_tokens == pytest.approx(snap.predicted_remaining_tokens, abs=1e-6)
