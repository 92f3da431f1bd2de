"""The learned router's audit (a helper session): artifact loading, non-finite weights and samples, and the
training script's provenance (commit, seed, and the held-out part of each trace)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from scheduler.core.types import ClusterView, InstanceRole, InstanceSnapshot, RequestInfo
from scheduler.policy.route import make_router
from scheduler.policy.routers_learned import DEFAULT_WEIGHTS, FEATURES, LearnedRouter

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))


def _artifact(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


@pytest.mark.parametrize(("doc", "says"), [
    ({}, "weights: must be an object"),  # no weights at all: was KeyError('weights')
    ({"weights": [0.5, 1.0]}, "weights: must be an object"),  # was AttributeError
    ({"weights": {"waiting": "fast"}}, "weights: could not convert"),  # was a ValueError naming no file
    ({"weights": {"queue_len": 1.0}}, "unknown features"),  # another version's feature: named no file
    ({"version": 2, "weights": dict(DEFAULT_WEIGHTS)}, "version 2"),  # was loaded as if version 1
])
def test_a_bad_artifact_is_refused_naming_the_file(tmp_path, doc, says) -> None:
    """``policies.router: {name: learned, params: {path: ...}}`` fails at start-up on a bad artifact, with the
    file and what is wrong in the message -- not a bare KeyError / AttributeError, or an old artifact version read
    as the current one."""
    path = _artifact(tmp_path, "lr.json", json.dumps({"kind": "llmsched.learned_router", "features": list(FEATURES),
                                                      **doc}))
    with pytest.raises(ValueError, match=rf"lr\.json: .*{says}"):
        make_router("learned", path=str(path))


@pytest.mark.parametrize("value", ["NaN", "Infinity"])
def test_non_finite_weights_are_refused(tmp_path, value) -> None:
    """Python's json reads NaN and Infinity. A NaN weight (or an infinite one times a zero feature) made every
    candidate's cost NaN, and argmin then sent every request to the first instance -- even one with 50 requests
    queued beside an idle one."""
    doc = '{"kind": "llmsched.learned_router", "weights": {"waiting": VALUE}}'.replace("VALUE", value)
    path = _artifact(tmp_path, "nan.json", doc)
    with pytest.raises(ValueError, match=r"nan\.json: weights: waiting=(nan|inf): weights must be finite"):
        LearnedRouter(path=path)
    with pytest.raises(ValueError, match="must be finite"):
        LearnedRouter({**DEFAULT_WEIGHTS, "pending_prefill": float(value.lower().replace("inity", ""))})
    # the router as configured with finite weights: the idle instance
    busy = InstanceSnapshot("busy", InstanceRole.MIXED, num_running=60, num_waiting=50, prefill_tokens_pending=50_000)
    idle = InstanceSnapshot("idle", InstanceRole.MIXED)
    q = RequestInfo(request_id="r", arrival_s=0.0, prompt_tokens=100, max_tokens=50)
    assert LearnedRouter(dict(DEFAULT_WEIGHTS)).route(q, ClusterView(0.0, (busy, idle))).prefill_instance == "idle"


def test_fit_refuses_non_finite_samples() -> None:
    """One NaN reward (an unserved request scored NaN) made every fitted weight NaN, installed without a word."""
    rng = np.random.default_rng(0)
    X = rng.normal(size=(50, len(FEATURES)))
    samples = [(x, -float(abs(x).sum())) for x in X]
    r = LearnedRouter(dict(DEFAULT_WEIGHTS))
    before = r.weights
    for bad in ((X[0], float("nan")), (np.full(len(FEATURES), np.inf), -1.0)):
        with pytest.raises(ValueError, match="finite"):
            r.fit([*samples, bad])
        assert r.weights == before  # nothing installed
    assert np.isfinite(list(r.fit(samples).values())).all()


def test_a_trained_artifact_names_its_commit_seed_and_the_requests_it_never_saw(tmp_path) -> None:
    """Training replays the head of each trace; the docs' compares replayed the WHOLE trace, half of it the
    training requests. The artifact now says which part is held out (``--window START:`` of ``llmsched compare``),
    with the commit and seed it was trained at. A trace whose clock ties requests at the cut (Mooncake's 3 s
    ticks): the tied ones are in neither part, so the window holds no training request."""
    from train_learned_router import checkout_commit, main

    from sim.commands import window_arg
    from sim.traces import load_trace

    # 40 requests, one a second; requests 18..21 share one timestamp, and the head (fraction 0.5) ends at 19
    t = [float(i) for i in range(40)]
    t[18:22] = [18.0] * 4
    rows = ["TIMESTAMP,ContextTokens,GeneratedTokens"]
    rows += [f"2023-11-16 18:00:{s:09.6f},{100 + i},{20 + i}" for i, s in enumerate(t)]
    trace_path = _artifact(tmp_path, "tiny.csv", "\n".join(rows) + "\n")
    out = tmp_path / "lr.json"
    assert main(["--trace", str(trace_path), "--instances", "2", "--rounds", "0", "--seed", "3",
                 "--out", str(out)]) == 0
    meta = json.loads(out.read_text())["meta"]
    assert meta["seed"] == 3 and meta["commit"] == checkout_commit()  # None only outside a git checkout
    (held,) = meta["held_out"]
    assert held["trace"] == "tiny.csv" and held["config"] == "default x2"
    trace = load_trace(str(trace_path))
    tail = trace.window(*window_arg(held["window"]))  # what `llmsched compare --window` replays
    assert tail.prompt_tokens.tolist() == trace.prompt_tokens[22:].tolist()  # after the head and its tie
