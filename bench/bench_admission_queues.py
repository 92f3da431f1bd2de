"""The live Ingress's admission step (``Ingress._admit``) with N requests in flight: its queues (requests with no
first token yet, per priority) read from the registry's incremental counts vs the full registry scan that computed
them before (``queued_by_priority`` walked every record per admitted request).

No Ray, no engines: an ``Ingress`` over a fixed view of 8 MIXED instances, its registry filled with N records
(``--waiting`` of them without a token, 3 priorities), ``policies.admission`` ``bounded`` with queues long enough
to admit. Per size: microseconds per ``_admit`` call and per ``queued_by_priority`` call, each way, best of
``--repeat`` rounds (both ways interleaved in one run), and the ratio.

    python bench/bench_admission_queues.py [--in-flight 256 1024 4096] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scheduler.config.load import load_config
from scheduler.control.ingress import Ingress
from scheduler.control.registry import RequestRecord, RequestRegistry
from scheduler.core.types import ClusterView, InstanceRole, InstanceSnapshot
from scheduler.engine.base import SamplingParams
from scheduler.policy.admission import AdmissionPolicy


def scan(registry: RequestRegistry) -> dict[int, int]:
    """The queues as computed before: a walk over every record."""
    out: dict[int, int] = {}
    for r in registry:
        if r.next_index == 0:
            out[r.priority] = out.get(r.priority, 0) + 1
    return out


def _ingress(n: int, waiting: float) -> Ingress:
    ing = Ingress(load_config("default"), controller=None, direct=False,
                  admission=AdmissionPolicy(default_max_queued=10**9))
    ing._view = ClusterView(0.0, tuple(InstanceSnapshot(f"i{k}", InstanceRole.MIXED, kv_blocks_total=10**5)
                                       for k in range(8)))
    for k in range(n):
        rec = RequestRecord(f"r{k}", tuple(range(1, 65)), SamplingParams(max_tokens=64), priority=k % 3)
        ing.registry.add(rec)
        if k >= n * waiting:
            ing.registry.emit(rec, (7,) * (1 + k % 8))
    assert ing.queued_by_priority() == scan(ing.registry)
    return ing


def _per_call_us(fn: Callable[[], object], calls: int) -> float:
    t = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t) / calls * 1e6


def measure(n: int, *, waiting: float, repeat: int) -> dict[str, float]:
    ing = _ingress(n, waiting)
    rec = RequestRecord("new", tuple(range(1, 65)), SamplingParams(max_tokens=64), priority=1)
    incremental = ing.queued_by_priority
    calls = max(20, 200_000 // max(n, 1))
    best: dict[str, float] = {}
    for _ in range(repeat):
        for name, queues in (("scan", lambda: scan(ing.registry)), ("incremental", incremental)):
            ing.queued_by_priority = queues  # type: ignore[method-assign]
            for what, fn in ((f"admit_{name}_us", lambda: ing._admit(rec)), (f"queues_{name}_us", queues)):
                us = _per_call_us(fn, calls)
                best[what] = min(best.get(what, us), us)
    out = {"in_flight": n, **{k: round(v, 2) for k, v in sorted(best.items())}}
    out["admit_speedup"] = round(best["admit_scan_us"] / best["admit_incremental_us"], 1)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--in-flight", type=int, nargs="+", default=[256, 1024, 4096])
    p.add_argument("--waiting", type=float, default=0.25, help="share of the records with no token yet")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--json", type=Path)
    a = p.parse_args(argv)
    rows = [measure(n, waiting=a.waiting, repeat=a.repeat) for n in a.in_flight]
    for r in rows:
        print(f"{r['in_flight']:>6} in flight: _admit {r['admit_scan_us']:8.1f} us (scan) -> "
              f"{r['admit_incremental_us']:6.1f} us (incremental), x{r['admit_speedup']}; queues alone "
              f"{r['queues_scan_us']:8.1f} -> {r['queues_incremental_us']:.2f} us")
    if a.json:
        a.json.write_text(json.dumps({"waiting": a.waiting, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
