"""Time an operator's drain call (``Ingress.drain``, what Admin Drain runs) with one ingress replica: a local Ray
cluster of simulated instances, idle ones drained with replacement one after another, each call timed from the
call to its return (out of service, requests moved -- none here --, released).

    PYTHONPATH=. python scripts/time_drain.py --drains 8
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.loadgen import cluster_config
from scheduler.control.cluster import start_local_cluster


async def _drains(ing: object, n: int, instances: int) -> list[float]:
    took = []
    for _ in range(n):
        while True:  # the previous drain's replacement serving: every drain sees the same cluster
            await ing._refresh_members()  # type: ignore[attr-defined]
            await ing._refresh_view()  # type: ignore[attr-defined]
            view = ing.view()  # type: ignore[attr-defined]
            up = [s.instance_id for s in view.instances if not s.draining]
            if len(up) >= instances:
                break
            await asyncio.sleep(0.1)
        t0 = time.perf_counter()
        await ing.drain(min(up), replace=True)  # type: ignore[attr-defined]
        took.append(time.perf_counter() - t0)
    return took


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--drains", type=int, default=8)
    ap.add_argument("--instances", type=int, default=2)
    args = ap.parse_args()
    cluster = start_local_cluster(cluster_config("drain-timing", mixed=args.instances),
                                  backend_kwargs={"simulated": {"time_scale": 0.5}})
    try:
        took = asyncio.run(_drains(cluster.ingress, args.drains, args.instances))
    finally:
        cluster.shutdown()
    ms = sorted(t * 1e3 for t in took)
    print(f"drain call, one ingress replica, {len(ms)} drains: median {statistics.median(ms):.0f} ms, "
          f"min {ms[0]:.0f} ms, max {ms[-1]:.0f} ms")


if __name__ == "__main__":
    main()
