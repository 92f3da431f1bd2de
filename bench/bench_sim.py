"""Simulator speed: closed-form spans vs the naive one-event-per-step reference, in the same run.

    python bench/bench_sim.py                 # Azure conv trace on 16 instances + 1M synthetic on 64
    python bench/bench_sim.py --quick         # smaller sizes (CI smoke)
    python bench/bench_sim.py --trace PATH/shared/data/azure_llm_2023_conv.csv.gz   # from a checkout not beside shared/
    python bench/bench_sim.py --case migration [--baseline OLD_TREE]   # what a migration policy costs

Prints wall time, requests/s and events/s for each, and the speed-up of the closed form over the naive
reference on the same workload (the baseline measured in this run, so machine noise cancels).

``--case migration``: ``llmsched simulate`` with ``--migration llumnix`` against ``--migration none`` on the
migration study's cluster (``default`` on L4s: KV binds), the bundled Azure slice at 0.5x and 300 bursty synthetic
requests; and the tuned policy of docs/routing.md ("Held out (fortieth session)") against none on the bundled
Mooncake conversation slice (1,000 requests) on 16 long-context A100s under lookahead, where KV does not bind and
a tick reads 16 prefix-cache engines; each run a fresh process, the simulator's own ``wall_seconds`` (best of
``--repeats``, runs alternated).
``--baseline OLD_TREE`` (a checkout of older code, e.g. ``git archive <commit> | tar -x -C OLD_TREE``) times the
same runs under that code in the same alternation, prints both trees' with/without ratios and the speed-up, and
checks the summaries are identical but for their wall-clock fields.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from scheduler.config.load import load_config
from sim.commands import with_instances
from sim.metrics import sim_summary
from sim.simulator import Simulator, Workload
from sim.traces import bundled_traces, load_trace, synthetic

ROOT = Path(__file__).resolve().parents[1]
SHARED_AZURE = ROOT.parent / "shared/data/azure_llm_2023_conv.csv.gz"
CASES = ("azure_16", "closed_form_vs_naive", "synthetic", "migration")
# The migration study's cluster (docs/simulator.md, "Policies from the config"): ``default`` on L4s, written per run.
L4 = "l4"
# docs/routing.md, "Held out (fortieth session)": the Mooncake compares' tuned policy.
TUNED_MIGRATION = ("llumnix:high_watermark=0.3:balance_gap=0.1:max_concurrent=16:max_plans=16:max_per_s=16:"
                   "cooldown_s=0.5")


@dataclass(frozen=True)
class MigrationRun:
    """One migration-case row: ``llmsched simulate`` arguments, on ``config`` (``L4``, or a config ``--config``
    takes), with ``migration`` against ``--migration none``."""

    args: list[str]
    config: str = L4
    migration: str = "llumnix"


MIGRATION_WORKLOADS = {
    "azure_slice_0.5x": MigrationRun(["--rate-scale", "0.5"]),
    "synthetic_300_cv4": MigrationRun(["--synthetic", "300", "--cv", "4", "--rate", "2"]),
    "mooncake_slice_16_tuned": MigrationRun(
        ["--trace", str(bundled_traces()["mooncake_conversation"]), "--router", "lookahead"],
        config="llama3-8b-a100-16-longctx", migration=TUNED_MIGRATION),
}


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


def simulate_summary(tree: Path, config: Path | str, migration: str, workload: list[str]) -> dict:
    """One ``llmsched simulate --json`` run of ``tree``'s code in a fresh process: its summary."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "summary.json"
        cmd = [sys.executable, "-m", "scheduler.cli", "simulate", "--config", str(config), "--migration", migration,
               *workload, "--quiet", "--json", str(out)]
        env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1"}
        subprocess.run(cmd, cwd=tree, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return json.loads(out.read_text())


def _outcome(summary: dict) -> dict:
    """A summary less what differs between equal runs: wall-clock fields and the trace file's path."""
    return {k: v for k, v in summary.items() if "wall" not in k and k != "trace_source"}


def migration_case(*, baseline: Path | None = None, repeats: int = 3) -> dict:
    """With vs without migration (``MIGRATION_WORKLOADS``), this tree and ``baseline``'s."""
    trees = {"current": ROOT} if baseline is None else {"current": ROOT, "baseline": baseline}
    out: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        l4 = Path(tmp) / "l4.yaml"  # as docs/simulator.md: sed 's/gpu: a100/gpu: l4/'
        text = (ROOT / "scheduler/config/examples/default.yaml").read_text()
        l4.write_text(text.replace("gpu: a100", "gpu: l4"))
        for name, case in MIGRATION_WORKLOADS.items():
            config = l4 if case.config == L4 else case.config
            specs = {"none": "none", "llumnix": case.migration}
            runs: dict[tuple[str, str], list[dict]] = {}
            for _ in range(repeats):  # alternated: a loaded minute weighs on every variant alike
                for tree_name, tree in trees.items():
                    for mig, spec in specs.items():
                        runs.setdefault((tree_name, mig), []).append(simulate_summary(tree, config, spec, case.args))
            row: dict[str, object] = {"requests": runs[("current", "none")][0]["requests"],
                                      "migration": case.migration}
            for tree_name in trees:
                none = min(r["wall_seconds"] for r in runs[(tree_name, "none")])
                mig = min(r["wall_seconds"] for r in runs[(tree_name, "llumnix")])
                row[tree_name] = {"none_wall_s": round(none, 3), "llumnix_wall_s": round(mig, 3),
                                  "ratio": round(mig / max(none, 1e-9), 2),
                                  "migrations": runs[(tree_name, "llumnix")][0]["migrations"]}
            if baseline is not None:
                cur, old = row["current"], row["baseline"]
                row["speedup"] = round(old["llumnix_wall_s"] / max(cur["llumnix_wall_s"], 1e-9), 2)  # type: ignore[index]
                row["identical"] = all(_outcome(a) == _outcome(b) for mig in ("none", "llumnix")
                                       for a, b in zip(runs[("current", mig)], runs[("baseline", mig)]))
            out[name] = row
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="llmsched bench sim")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--trace", help="Azure conv trace file (default: ../shared/data beside the repository, "
                                   "else the bundled 10-minute slice)")
    p.add_argument("--case", action="append", choices=CASES,
                   help="run only this case (repeatable; default: all but migration)")
    p.add_argument("--baseline", type=Path, help="migration case: also time this checkout's code (older code)")
    p.add_argument("--repeats", type=int, default=3, help="migration case: runs of each variant (best is kept)")
    p.add_argument("--json")
    args = p.parse_args(argv)
    cases = set(args.case or CASES[:-1])
    if args.baseline is not None and not (args.baseline / "sim/simulator.py").is_file():
        raise SystemExit(f"llmsched bench sim: --baseline {args.baseline}: not a checkout (no sim/simulator.py)")
    out: dict[str, dict] = {}
    if "migration" in cases:
        for name, row in migration_case(baseline=args.baseline, repeats=args.repeats).items():
            out[f"migration_{name}"] = row
    if cases <= {"migration"}:
        return _report(out, args.json)
    base = load_config("default")

    azure_path = azure_trace_path(args.trace)
    trace = load_trace(azure_path)
    if args.quick:
        trace = trace.head(3000)
    cfg16 = with_instances(base, 16)
    w = Workload.from_trace(trace)
    if "azure_16" in cases:
        out["azure_16"] = {"trace": azure_path.name, **run(cfg16, w, "least_outstanding")}
    if "closed_form_vs_naive" in cases:
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
    if "synthetic" in cases:
        n = 50_000 if args.quick else 1_000_000
        cfg64 = with_instances(base, 64)
        syn = synthetic(n, rate=64 * 1.2, seed=1)
        out[f"synthetic_{n}_64"] = run(cfg64, Workload.from_trace(syn), "round_robin")
    return _report(out, args.json)


def _report(out: dict[str, dict], path: str | None) -> int:
    for k, v in out.items():
        print(f"{k:24s} {json.dumps(v)}")
    if path:
        Path(path).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
