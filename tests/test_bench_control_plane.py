"""``llmsched bench control-plane`` runs end to end (a few requests): every path, including the gRPC client in its
own process, yields a TTFT, and the overheads are reported against the in-process engine."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e


def test_control_plane_bench_measures_every_path(tmp_path: Path) -> None:
    pytest.importorskip("ray")
    from bench import bench_control_plane

    out = tmp_path / "cp.json"
    assert bench_control_plane.main(["--requests", "8", "--warmup", "2", "--router-s", "0.05",
                                     "--routers", "least_outstanding", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert set(r["ttft_ms"]) == {"in_process", "ingress", "ingress_ray", "grpc", "grpc_remote"}
    for path, v in r["ttft_ms"].items():
        assert 0 < v["p50"] <= v["p99"] < 5_000, (path, v)
    # Through gRPC the request crosses more than the bare engine call does.
    assert r["ttft_ms"]["grpc_remote"]["p50"] > r["ttft_ms"]["in_process"]["p50"]
    assert isinstance(r["meets_target"], bool) and r["overhead_ms"]["grpc_remote"]["p50"] == pytest.approx(
        r["ttft_ms"]["grpc_remote"]["p50"] - r["ttft_ms"]["in_process"]["p50"])
    assert r["router_decisions"] and r["router_decisions"][0]["decisions_per_s"] > 0
