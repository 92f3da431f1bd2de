"""The simulator core: event order, metrics, goodput (audit). Each test failed before its fix."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from bench.loadgen import cluster_config
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
