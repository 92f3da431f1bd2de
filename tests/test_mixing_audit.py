"""Audit of the ``mixing`` router (Intelligent Router heuristic) and the P/D pairing: each test failed before its fix."""

from __future__ import annotations

import dataclasses

import pytest

from scheduler.core.types import Rejected
from scheduler.policy.route import make_router
from tests.test_policies_route import D, M, P, req, snap, view

# A MIXED instance full of long decodes, an idle DECODE instance; two MIXED ones, one with a long prompt queue.
BUSY = snap("m0", M, running=60, decoding=60, used=800, ctx=30_000, pred=20_000.0)
QUEUED = snap("mq", M, running=1, waiting=4, decoding=0, used=100, pending=20_000)


@pytest.mark.parametrize("name", ["mixing", "lookahead", "least_outstanding", "round_robin"])
def test_a_view_without_accepting_prefill_instance_routes_as_its_accepting_instances_say(name: str) -> None:
    """Whether a view is P/D was "any PREFILL instance in it", drained or dead ones included: MIXED + DECODE
    instances ran every request colocated on the MIXED ones, the DECODE instances idle, until a drained PREFILL
    instance was in the view -- then the same instances paired; and two MIXED instances handed KV off to each
    other while a drained PREFILL instance lingered, colocated without it. Now the accepting instances decide."""
    gone = (snap("p0", P, draining=True), dataclasses.replace(snap("p1", P), healthy=False))

    def decide(*insts):
        d = make_router(name).route(req(2000, 30.0), view(*insts))
        return d if isinstance(d, Rejected) else (d.prefill_instance, d.decode_instance)

    pd = (BUSY, snap("d0", D))
    assert decide(*pd) == decide(*gone, *pd) == ("m0", "d0")  # the idle decoder takes the decode
    mixed = (QUEUED, BUSY)
    assert decide(*mixed) == decide(*gone, *mixed) == decide(*mixed, snap("d1", D, draining=True))
    assert decide(*mixed)[1] is None  # all-MIXED: colocated


def test_the_simulated_engine_reports_the_predicted_remaining_tokens_a_live_instance_does() -> None:
    """``predicted_remaining_tokens`` is what the mixing router (and lookahead, learned) read as the decode work on an
    instance. A live instance sums each request's predicted remaining clipped at 0; the engine model clipped only
    the sum, so a request past its prediction cancelled the others' remaining: on the IR mix with the shipped trace
    predictor (median guess 131 tokens, decode-heavy outputs 300-800) 69% of the snapshots with decodes read 0
    (per request: 0.2%), and the routers took them for "no prediction" (``num_decoding`` x 256)."""
    from scheduler.engine_model.model import EngineModel, EngineSpec
    from scheduler.latency import roofline_model
    from tests.test_engine_model import GPU, MODEL

    eng = EngineModel(roofline_model(MODEL, GPU, 1), EngineSpec(block_size=16, num_kv_blocks=4000))
    for i, (out, guess) in enumerate([(300, 20.0), (300, 20.0), (300, 100.0), (300, None)]):
        eng.add_request(str(i), 50, out, predicted_remaining=guess)
    seen = []
    while eng.has_work and len(seen) < 300:
        span = eng.plan_span(max_steps=7)
        eng.advance(span, span.steps) if span is not None else eng.step()
        snap = eng.snapshot("x", 0.0, detail=True)
        per = sum(r.predicted_remaining or 0.0 for r in snap.requests if not r.in_prefill)
        seen.append((snap.predicted_remaining_tokens, per))
        assert snap.predicted_remaining_tokens == pytest.approx(per, abs=1e-6), seen
    assert any(0 < per < 100 for _, per in seen)  # the cases that differed: two past their guess, one not
