"""Overload at 3x the measured capacity (``python -m bench.bench_overload``): bounded server memory, p99 TTFT/TPOT
of admitted requests within the SLO, every rejection explicit (RESOURCE_EXHAUSTED with a retry-after).

One e2e bench run (module fixture) measures capacity with a closed loop, then offers 3x that open-loop to two
servers on the same cluster: ``bounded`` (the server's InflightLimiter sized to the engines' batch capacity) and
``serve-default`` (the limiter ``llmsched serve`` installs by default). The unit tests check the bench's
arithmetic without Ray.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bench.bench_overload import poisson_arrivals, summarize_phase
from bench.loadgen import COMPLETED, FAILED, Outcome


def test_poisson_arrivals_offer_exactly_the_asked_rate() -> None:
    a = poisson_arrivals(12.0, 10.0, seed=1)
    assert len(a) == 120 and np.all(np.diff(a) >= 0) and a[0] >= 0 and a[-1] < 10.0
    assert np.array_equal(a, poisson_arrivals(12.0, 10.0, seed=1))


def test_summary_counts_admitted_without_a_token_as_infinite_ttft() -> None:
    ok = [Outcome(f"ok{i}", COMPLETED, sent_s=0.0, first_s=0.1, end_s=1.0, tokens=10, max_tokens=10)
          for i in range(98)]
    rej = [Outcome(f"r{i}", FAILED, code="RESOURCE_EXHAUSTED", retry_after_s=1.0) for i in range(5)]
    starving = [Outcome("s0", "still_open", sent_s=0.0), Outcome("s1", "still_open", sent_s=0.0)]
    s = summarize_phase(ok + rej + starving, {"rss": [100 * 2**20, 101 * 2**20], "peak_in_flight": 3,
                                              "peak_registry": 3, "wall_s": 10.0},
                        offered_rps=10.5, slo_ttft=1.0, slo_tpot=0.2, limit=16)
    assert s["admitted"] == 100 and s["rejected"] == 5 and s["rejected_with_retry_after"] == 5
    assert s["admitted_ttft_p99_s"] == float("inf") and not s["within_slo"]
    assert s["open_at_hard_stop"] == 2 and s["lost"] == 0
    assert s["rss_growth_mib"] == 1.0


@pytest.fixture(scope="module")
def overload(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    pytest.importorskip("ray")
    from bench import bench_overload

    out = tmp_path_factory.mktemp("overload") / "overload.json"
    bench_overload.main(["--capacity-s", "10", "--phase-s", "15", "--drain-s", "15", "--factor", "3",
                         "--phases", "bounded,serve-default,shed", "--json", str(out)])
    return json.loads(Path(out).read_text())


@pytest.mark.e2e
def test_bounded_server_at_3x_capacity_keeps_admitted_within_slo(overload: dict[str, Any]) -> None:
    cap, b = overload["capacity"], overload["phases"]["bounded"]
    assert cap["rps"] > 0 and cap["lost"] == 0
    assert b["offered_rps"] >= 2.7 * cap["rps"], (b["offered_rps"], cap["rps"])
    # Rejections are explicit: RESOURCE_EXHAUSTED, each with a retry-after; nothing else failed or vanished.
    assert b["rejected"] > 0 and b["rejected"] == b["rejected_with_retry_after"], b
    assert b["other_failures"] == {} and b["lost"] == 0 and b["open_at_hard_stop"] == 0, b
    assert b["duplicated_tokens"] == 0
    assert b["admitted"] + b["rejected"] == b["sent"]
    # p99 of what was admitted meets the SLO.
    assert b["admitted_ttft_p99_s"] <= b["slo_ttft_s"], b
    assert b["admitted_tpot_p99_s"] <= b["slo_tpot_s"], b
    # Bounded memory: in-flight never above the limit; the server's RSS grows by a few MiB at most.
    assert b["peak_in_flight"] <= b["limit_in_flight"]
    assert b["rss_growth_mib"] < 64, b


@pytest.mark.e2e
def test_default_serve_admission_at_3x_capacity_keeps_admitted_within_slo(overload: dict[str, Any]) -> None:
    d = overload["phases"]["serve-default"]
    assert d["lost"] == 0 and d["duplicated_tokens"] == 0  # nothing vanishes even here
    assert d["rejected"] > 0, "nothing was rejected at 3x capacity"
    assert d["admitted_ttft_p99_s"] <= d["slo_ttft_s"], d


@pytest.mark.e2e
def test_slo_shedding_router_at_3x_capacity_refuses_explicitly_and_keeps_admitted_within_slo(
        overload: dict[str, Any]) -> None:
    """No server limit, router ``lookahead_shed``: the router's refusals reach clients as RESOURCE_EXHAUSTED with a
    retry-after, nothing admitted is lost, and what it admits meets the SLO at 3x capacity."""
    d = overload["phases"]["shed"]
    assert d["rejected"] > 0 and d["rejected"] == d["rejected_with_retry_after"], d
    assert d["other_failures"] == {} and d["lost"] == 0 and d["open_at_hard_stop"] == 0, d
    assert d["admitted"] + d["rejected"] == d["sent"] and d["duplicated_tokens"] == 0
    assert d["admitted_ttft_p99_s"] <= d["slo_ttft_s"], d
    assert d["admitted_tpot_p99_s"] <= d["slo_tpot_s"], d

