"""``llmsched bench rerole-live``: the live TTFT split where the simulator measures it (at the engine) and the
harness's hops (no cluster: the split is a function of the outcomes and the instances' timings)."""

from __future__ import annotations

import numpy as np
import pytest

from bench.bench_rerole_live import _at_instance
from bench.loadgen import COMPLETED, Outcome


def _done(rid: str, sent: float, first: float) -> Outcome:
    return Outcome(rid, outcome=COMPLETED, sent_s=sent, first_s=first, end_s=first + 1.0, tokens=10)


def test_ttft_split_at_the_instance_in_model_seconds():
    # SDK TTFTs (wall) 0.30, 0.50, 0.20 s; the instance received each 0.02-0.10 s after it was sent and its engine
    # put out the first token 0.01-0.05 s before the SDK saw it. Time scale 2: model seconds are half the wall's.
    done = [_done("r-0", 10.0, 10.30), _done("r-1", 11.0, 11.50), _done("r-2", 12.0, 12.20)]
    first = {"r-0": (1000.02, 1000.28), "r-1": (2000.10, 2000.45), "r-2": (3000.05, 3000.19, 3000.06, 3000.07)}
    out = _at_instance(done, first, 2.0)
    engine = np.array([0.26, 0.35, 0.14]) / 2
    stack = np.array([0.30, 0.50, 0.20]) / 2 - engine
    assert out["ttft_at_instance_p50_s"] == pytest.approx(np.percentile(engine, 50))
    assert out["ttft_at_instance_p90_s"] == pytest.approx(np.percentile(engine, 90))
    assert out["stack_p50_s"] == pytest.approx(np.percentile(stack, 50))
    assert out["stack_p90_s"] == pytest.approx(np.percentile(stack, 90))


def test_requests_without_instance_timings_are_left_out():
    done = [_done("r-0", 0.0, 0.4), _done("r-1", 0.0, 9.0)]
    out = _at_instance(done, {"r-0": (5.1, 5.3)}, 1.0)  # r-1's instance was not read (a failed call)
    assert out["ttft_at_instance_p90_s"] == pytest.approx(0.2)
    assert out["stack_p90_s"] == pytest.approx(0.2)
    assert _at_instance(done, {}, 1.0) == {}  # none read: no split rather than NaNs in the JSON


def test_resim_simulates_again_against_the_recorded_live_runs_with_the_ingress_poll(tmp_path):
    """``--resim``: no live run; the recorded live side stands and the simulator's is re-run, routing on the ingress's
    poll rounds (50 ms wall at the recorded time scale) unless ``--no-poll``, where the static run's TTFT p90 is
    lower (the lag it leaves out)."""
    import json
    from pathlib import Path

    from bench.bench_rerole_live import main

    recorded = Path(__file__).resolve().parents[1] / "docs/results/rerole_live.json"
    rec = json.loads(recorded.read_text())
    on, off = tmp_path / "on.json", tmp_path / "off.json"
    assert main(["--resim", str(recorded), "--json", str(on)]) == 0
    assert main(["--resim", str(recorded), "--json", str(off), "--no-poll"]) == 0
    on_, off_ = json.loads(on.read_text()), json.loads(off.read_text())
    assert on_["live"] == off_["live"] == rec["live"] and on_["command"] == rec["command"]
    assert on_["sim_ingress_poll_s"] == pytest.approx(0.05 / rec["time_scale"]) and off_["sim_ingress_poll_s"] is None
    live, sim = rec["live"]["static"], on_["sim"]["static"]
    assert on_["sim_error"]["static"]["ttft_p90_s"] == pytest.approx((sim["ttft_p90_s"] - live["ttft_p90_s"])
                                                                     / live["ttft_p90_s"])
    assert off_["sim"]["static"]["ttft_p90_s"] < sim["ttft_p90_s"]


def test_per_request_timings_name_the_prefill_side_and_the_decoder_in_model_seconds():
    from bench.bench_rerole_live import _per_request

    per_instance = {"prefill-1": {"static-0": (100.0, 100.2), "other-1": (1.0, 2.0)},
                    "decode-0": {"static-0": (100.3, 100.5)}, "prefill-0": {"static-2": (104.0, 104.4)}}
    per = _per_request(per_instance, 3, "static", 99.0, 2.0)
    assert per["prefill_instance"] == ["prefill-1", None, "prefill-0"]
    assert per["decode_instance"] == ["decode-0", None, "prefill-0"]  # no handoff: the same instance
    assert per["received_s"][0] == pytest.approx(0.5) and per["first_s"][0] == pytest.approx(0.6)
    assert per["received_s"][1] is None and per["first_s"][2] == pytest.approx(2.7)


def test_the_simulator_on_lives_routing_and_arrivals_at_the_instances():
    """Live sent requests 0 and 1 to prefill-1 at once (at 2.0 s, not at their trace times 0.0 / 0.3 s) and 2 to
    prefill-0 alone: simulated so, 1 waits for 0's prefill step (least_outstanding on the trace's times runs each
    at once), and what is left per request is live's lateness (5 ms on request 2)."""
    from bench.bench_rerole_live import run_sim_as_live
    from scheduler.config.load import load_config
    from scheduler.latency import latency_for
    from sim.simulator import Workload

    cfg = load_config("llama2-7b-pd-a100")
    lat = latency_for(cfg.model, cfg.gpus["a100"], 1)
    a, c = lat.prefill_time(1000), lat.prefill_time(500)
    w = Workload(np.array([0.0, 0.3, 0.6]), np.array([1000, 1000, 500]), np.array([10, 10, 10]), name="t")
    per = {"prefill_instance": ["prefill-1", "prefill-1", "prefill-0"],
           "decode_instance": ["decode-0", "decode-1", "decode-0"],
           "received_s": [2.0, 2.0, 4.0], "first_s": [2.0 + a, 2.0 + 2 * a, 4.0 + c + 0.005]}
    out = run_sim_as_live(cfg, w, per, False)
    assert out["requests"] == 3
    assert out["ttft_p90_s"] == pytest.approx(np.percentile([a, 2 * a, c], 90), abs=1e-9)
    assert out["late_p50_s"] == pytest.approx(0.0, abs=1e-9)
    assert out["late_p99_s"] == pytest.approx(np.percentile([0.0, 0.0, 0.005], 99), abs=1e-9)
    assert out["late_over_10ms"] == 0.0
