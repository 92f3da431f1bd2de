"""The simulator core: event order, metrics, goodput (audit). Each test failed before its fix."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import yaml

import scheduler.config
from bench.loadgen import cluster_config
from sim.commands import simulate_main
from sim.compare import at_load
from sim.compare import main as compare_main
from sim.metrics import RequestMetrics, sim_summary
from sim.simulator import Simulator, Workload


@pytest.fixture(scope="module")
def one_mixed():
    return cluster_config("simcore", mixed=1)


def _ttft_on_noisy_host(cfg, t0: float) -> float:
    """TTFT of one request arriving at ``t0`` on a host whose every noise draw is 3x."""
    sim = Simulator(cfg, router="round_robin")
    for x in sim.instances:
        x.latency = dataclasses.replace(x.latency, host_noise=(3.0,))
    sim._noisy = list(sim.instances)
    res = sim.run(Workload(np.array([t0]), np.array([512]), np.array([4])))
    return float(res.first_token_s[0] - t0)


def test_a_noise_draw_at_an_arrivals_instant_comes_first(one_mixed) -> None:
    """``EventKind`` orders a same-time NOISE (and HOST) event before an ARRIVAL, but the arrival merge took every
    arrival at ``t`` before any heap event at ``t``: a request at t=0 prefilled on the undrawn host (3x faster
    here) than one arriving 1 ns later."""
    at_tick = _ttft_on_noisy_host(one_mixed, 0.0)
    after = _ttft_on_noisy_host(one_mixed, 1e-9)
    assert at_tick == pytest.approx(after, rel=1e-6)


def test_goodput_zero_does_not_advise_lowering_the_rate(tmp_path, capsys) -> None:
    """A TTFT SLO below any prefill: goodput 0 (missed even at 0.05x the trace's rate), and ``simulate --goodput``
    warned that the cluster "is overloaded at the trace's rate ... add instances or lower --rate-scale", which
    cannot help."""
    examples = Path(scheduler.config.__file__).parent / "examples"
    cfg = yaml.safe_load((examples / "default.yaml").read_text())
    cfg["slos"] = {0: {"ttft_s": 0.001, "tpot_s": 0.1}}  # no prefill is that fast
    path = tmp_path / "tight.yaml"
    path.write_text(yaml.safe_dump(cfg))
    rc = simulate_main(
        [
            "--quiet",
            "--config",
            str(path),
            "--synthetic",
            "60",
            "--goodput",
            "--json",
            str(tmp_path / "out.json"),
        ]
    )
    err = capsys.readouterr().err
    assert rc == 0
    assert "overloaded" not in err and "lower --rate-scale" not in err
    assert "even at the goodput search's lowest rate" in err


def test_one_token_responses_have_no_tpot(one_mixed) -> None:
    """TPOT is the time per output token after the first: a one-token response has none. It was counted as 0 s, so
    half the requests here being one-token put the TPOT p50 at ~0 (a decode-bound cluster read as instant); its
    TPOT target stays met."""
    w = Workload(np.arange(8) * 5.0, np.full(8, 256), np.array([1, 64] * 4))
    res = Simulator(one_mixed, router="round_robin").run(w)
    s = sim_summary(res)
    multi = (res.finish_s - res.first_token_s)[1::2] / 63
    assert s["tpot_s"]["p50"] == pytest.approx(float(np.median(multi)))
    assert s["tpot_s"]["p50"] > 0.001
    tight = RequestMetrics.from_times(
        w.arrival_s, res.first_token_s, res.finish_s, w.output_tokens, slo_tpot_s=1e-6
    )
    assert tight.slo_met[0::2].all() and not tight.slo_met[1::2].any()  # no TPOT to miss; the others miss


def test_a_nan_arrival_is_refused_not_lost() -> None:
    """A NaN arrival passed ``Workload``'s order check (NaN compares false) and the run never served nor refused that
    request: it vanished into the SLO misses, neither completed nor rejected."""
    with pytest.raises(ValueError, match="arrival_s: arrivals must be finite"):
        Workload(np.array([0.0, np.nan, 2.0]), np.full(3, 100), np.full(3, 5))


def test_load_on_a_cluster_that_completes_nothing_is_an_error(tmp_path, capsys) -> None:
    """Every request refused (2 KV blocks an instance): the measured saturation is 0, ``at_load`` scaled the trace by
    0 (arrivals at infinity, the first at NaN), and ``llmsched compare`` never returned (killed after 120 s)."""
    w = Workload(np.arange(3.0), np.full(3, 100), np.full(3, 5), name="t")
    with pytest.raises(ValueError, match="completes none of t's requests"):
        at_load(w, 0.8, 0.0)
    cfg = yaml.safe_load((Path(scheduler.config.__file__).parent / "examples" / "default.yaml").read_text())
    cfg["pools"][0]["engine"] = {"num_kv_blocks": 2, "block_size": 16}
    path = tmp_path / "nokv.yaml"
    path.write_text(yaml.safe_dump(cfg))
    rc = compare_main(
        ["--config", str(path), "--synthetic", "30", "--routers", "round_robin", "--no-goodput"]
    )
    assert rc == 2 and "error: --load: the cluster completes none" in capsys.readouterr().err


def test_host_noise_keeps_drawing_through_a_handoff() -> None:
    """The host-noise ticks went on only while an engine was busy: a tick during a P->D handoff (nothing busy, no
    arrival left) ended them, and the decode leg after it (here 5.3 s) ran on one frozen draw -- 2 draws in all."""
    cfg = cluster_config("simcore-pd", mixed=0, prefill=1, decode=1)
    sim = Simulator(cfg)
    for x in sim.instances:
        x.latency = dataclasses.replace(x.latency, host_noise=(1.0, 1.0001), host_noise_period_s=0.25)
    sim._noisy = list(sim.instances)
    # An 8000-token prompt: its prefill ends at ~0.22 s, its KV lands ~0.17 s later, past the 0.25 s tick.
    res = sim.run(Workload(np.array([0.0]), np.array([8000]), np.array([400])))
    assert res.kv_transfers == 1
    assert sim._noise_epoch >= res.finish_s[0] / 0.25 - 1
