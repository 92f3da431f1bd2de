"""Simulator speed: closed-form spans vs the naive one-event-per-step reference, in the same run.

    python bench/bench_sim.py                 # Azure conv trace on 16 instances + 1M synthetic on 64
    python bench/bench_sim.py --quick         # smaller sizes (CI smoke)
    python bench/bench_sim.py --trace PATH/shared/data/azure_llm_2023_conv.csv.gz   # from a checkout not beside shared/

Prints wall time, requests/s and events/s for each, and the speed-up of the closed form over the naive
reference on the same workload (the baseline measured in this run, so machine noise cancels).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from scheduler.config.load import load_config
from sim.commands import with_instances
from sim.metrics import sim_summary
from sim.simulator import Simulator, Workload
from sim.traces import bundled_traces, load_trace, synthetic

SHARED_AZURE = Path(__file__).resolve().parents[1].parent / "shared/data/azure_llm_2023_conv.csv.gz"


def run(cfg, w: Workload, router: str, *, closed_form: bool = True) -> dict:
    t0 = time.perf_counter()
    res = Simulator(cfg, router=router, closed_form=closed_form).run(w)
    wall = time.perf_counter() - t0
    s = sim_summary(res)
    return {
        "requests": len(w),
        "wall_s": round(wall, 3),
        "requests_per_s": round(len(w) / wall),
        "events": res.events,
        "events_per_s": round(res.events / wall),
        "engine_steps": res.steps,
        "ttft_p99_s": s["ttft_s"]["p99"],
        "completed": s["completed"],
    }


def azure_trace_path(arg: str | None) -> Path:
    """The Azure conv trace to time: ``--trace``, else the full hour beside the repository, else the bundled slice.

    The fallback is announced: a checkout that is not beside ``shared/`` (a git worktree elsewhere) silently timed
    the 2,867-request slice, and its ``azure_16`` row could not be compared with the 19,366-request one.
    """
    if arg is not None:
        path = Path(arg)
        if not path.is_file():
            raise SystemExit(f"llmsched bench sim: --trace {arg!r}: no such file")
        return path
    if SHARED_AZURE.exists():
        return SHARED_AZURE
    path = bundled_traces()["azure_llm_2023_conv"]
    print(f"note: {SHARED_AZURE} not found; timing the bundled 10-minute slice ({path.name}); "
          "pass --trace for the full hour", file=sys.stderr)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="llmsched bench sim")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--trace", help="Azure conv trace file (default: ../shared/data beside the repository, "
                                   "else the bundled 10-minute slice)")
    p.add_argument("--json")
    args = p.parse_args(argv)
    out: dict[str, dict] = {}
    base = load_config("default")

    azure_path = azure_trace_path(args.trace)
    trace = load_trace(azure_path)
    if args.quick:
        trace = trace.head(3000)
    cfg16 = with_instances(base, 16)
    w = Workload.from_trace(trace)
    out["azure_16"] = {"trace": azure_path.name, **run(cfg16, w, "least_outstanding")}
    # Same workload, naive stepping: the baseline for the closed-form speed-up.
    naive_n = min(len(trace), 3000)
    w_small = Workload.from_trace(trace.head(naive_n))
    fast = run(cfg16, w_small, "least_outstanding")
    naive = run(cfg16, w_small, "least_outstanding", closed_form=False)
    out["closed_form_vs_naive"] = {
        "requests": naive_n,
        "closed_form_wall_s": fast["wall_s"],
        "naive_wall_s": naive["wall_s"],
        "speedup": round(naive["wall_s"] / max(fast["wall_s"], 1e-9), 2),
        "event_ratio": round(naive["events"] / max(fast["events"], 1), 2),
    }
    n = 50_000 if args.quick else 1_000_000
    cfg64 = with_instances(base, 64)
    syn = synthetic(n, rate=64 * 1.2, seed=1)
    out[f"synthetic_{n}_64"] = run(cfg64, Workload.from_trace(syn), "round_robin")
    for k, v in out.items():
        print(f"{k:24s} {json.dumps(v)}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
