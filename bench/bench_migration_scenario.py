"""Live migration scenario (issue 4): two instances, one overloaded by long requests, the migration policy moves
work; P99 TTFT/TPOT with migration off and on, live and as the simulator predicts for the same scenario.

    python -m bench.bench_migration_scenario --json docs/results/migration_scenario.json
    llmsched bench migration-scenario --json docs/results/migration_scenario.json

Cluster: 2 MIXED simulated Llama-2-7B instances on L4s (24 GB), KV capped at ``--kv-blocks`` x 16 tokens each so
long requests create KV pressure; router ``round_robin`` (ignores lengths). Workload: ``--requests`` arrivals
every ``--gap-s`` seconds alternating long (``--long-prompt``/``--long-output``) and short requests, so round robin
puts every long request on the same instance while the other idles on short ones.

Run three ways with the same arrivals, lengths, config and policies:

1. live, migration off (``policies.migration`` unset): a local Ray cluster with the simulated backend at
   ``--time-scale`` (1.0: wall time = modelled time, so the Controller's wall-clock policy cadence and cooldowns
   mean the same as in the simulator), gRPC server, the SDK's ``AsyncClient`` streams in a child process
   (``bench.loadgen``); client-side TTFT/TPOT;
2. live, migration on (``policies.migration = llumnix`` with ``--params``): the Controller's policy loop plans on
   its live view, the ingress executes the multi-stage migrations; migrations counted at the Controller and ingress;
3. the simulator (``sim.simulator.Simulator``, ``migration=make_migration_policy(...)``) off and on.

Reported: P99 (and P50) TTFT and TPOT per run, migrations, and the simulator's error vs live
((sim - live) / live). Live times are divided by ``--time-scale`` (modelled seconds).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.loadgen import (
    COMPLETED,
    INGRESS_REFRESH_S,
    MODEL,
    LoadPlan,
    LoadProcess,
    RequestSpec,
    count_outcomes,
    pct,
    start_stack,
)

log = logging.getLogger("bench.migration_scenario")

DEFAULT_PARAMS = {"cooldown_s": 0.5, "max_per_s": 4, "request_cooldown_s": 5.0}


def scenario_config(name: str, *, kv_blocks: int, max_num_seqs: int, migration: dict[str, Any] | None) -> Any:
    from scheduler.config.models import ClusterConfig

    policies: dict[str, Any] = {"router": {"name": "round_robin"}}
    if migration is not None:
        policies["migration"] = migration
    return ClusterConfig.model_validate({
        "name": name, "model": MODEL, "gpus": {"l4": {}},
        "pools": [{"name": "mixed", "role": "mixed", "gpu": "l4", "count": 2,
                   "engine": {"max_num_seqs": max_num_seqs, "num_kv_blocks": kv_blocks}}],
        "policies": policies,
    })


def workload(n: int, gap_s: float, long_: tuple[int, int], short: tuple[int, int]) -> list[RequestSpec]:
    out = []
    for i in range(n):
        p, o = long_ if i % 2 == 0 else short
        out.append(RequestSpec(f"mig-{i:03d}", i * gap_s, p, o))
    return out


def _summ(ttft: list[float], tpot: list[float]) -> dict[str, float]:
    return {"ttft_p50_s": pct(ttft, 50), "ttft_p99_s": pct(ttft, 99),
            "tpot_p50_s": pct(tpot, 50), "tpot_p99_s": pct(tpot, 99)}


async def _live_once(stack: Any, specs: list[RequestSpec], time_scale: float, stop_after_s: float) -> dict[str, Any]:
    await stack.start_front()
    try:
        plan = LoadPlan(stack.address, [RequestSpec(s.rid, s.at_s * time_scale, s.prompt_len, s.max_tokens)
                                        for s in specs], timeout_s=stop_after_s, stop_after_s=stop_after_s,
                        retries=0, id_prefix="mig")
        proc = LoadProcess(plan)
        t0 = time.perf_counter()
        await proc.start()
        try:
            res = await proc.result(stop_after_s + 60)
        finally:
            proc.kill()
        wall = time.perf_counter() - t0
        ok = [o for o in res if o.outcome == COMPLETED]
        out: dict[str, Any] = _summ([o.ttft_s / time_scale for o in ok], [o.tpot_s / time_scale for o in ok])
        out["outcomes"] = count_outcomes(res)
        out["wall_s"] = wall
        out["moved_requests"] = sum(len(o.instances) > 1 for o in res)
        out["ingress_migrations"] = int(stack.ingress.counters.get("migrations", 0))
        out["per_request"] = [{"rid": o.rid, "ttft_s": o.ttft_s / time_scale, "tpot_s": o.tpot_s / time_scale,
                               "instances": list(o.instances)} for o in res]
        return out
    finally:
        await stack.stop_front()


def run_live(specs: list[RequestSpec], args: argparse.Namespace, params: dict[str, Any]) -> dict[str, Any]:
    import ray

    runtime = None
    out: dict[str, Any] = {}
    try:
        for label, mig in (("off", None), ("on", {"name": "llumnix", "params": params})):
            cfg = scenario_config(f"migscn-{label}", kv_blocks=args.kv_blocks, max_num_seqs=args.max_num_seqs,
                                  migration=mig)
            stack = start_stack(cfg, time_scale=args.time_scale)
            runtime = runtime or stack.runtime
            stack.runtime = None  # shut Ray down once, at the end
            try:
                log.info("live %s: %d requests", label, len(specs))
                r = asyncio.run(_live_once(stack, specs, args.time_scale, args.stop_after_s))
                if mig is not None:
                    r["controller_migrations"] = ray.get(stack.deployment.controller.migration_counters.remote())
                out[label] = r
            finally:
                stack.shutdown()
            log.info("live %s: %s", label, {k: v for k, v in r.items() if k != "per_request"})
    finally:
        if runtime is not None:
            runtime.shutdown()
        elif ray.is_initialized():
            ray.shutdown()
    return out


def run_sim(specs: list[RequestSpec], args: argparse.Namespace, params: dict[str, Any]) -> dict[str, Any]:
    from scheduler.policy.migration import make_migration_policy
    from sim.simulator import Simulator, Workload

    w = Workload(np.array([s.at_s for s in specs], dtype=float), np.array([s.prompt_len for s in specs]),
                 np.array([s.max_tokens for s in specs]), name="migration-scenario")
    pol = {k: v for k, v in params.items() if k != "protocol"}  # protocol knobs are the live ingress'; max_per_s binds
    out: dict[str, Any] = {}
    for label, mig in (("off", None), ("on", make_migration_policy("llumnix", **pol))):
        cfg = scenario_config(f"migscn-{label}", kv_blocks=args.kv_blocks, max_num_seqs=args.max_num_seqs,
                              migration=None if mig is None else {"name": "llumnix", "params": params})
        # Routed as the live ingress routes, on its poll rounds (round robin reads no load: no change there).
        sim = Simulator(cfg, migration=mig, view_refresh_s=0.1, ingress_poll_s=INGRESS_REFRESH_S / args.time_scale)
        res = sim.run(w)
        ttft = (res.first_token_s - w.arrival_s).tolist()
        n = w.output_tokens.astype(float)
        tpot = np.where(n > 1, (res.finish_s - res.first_token_s) / np.maximum(n - 1, 1), np.nan).tolist()
        r: dict[str, Any] = _summ(ttft, tpot)
        r["migrations"] = int(res.migrations)
        r["preemptions"] = int(res.preemptions.sum())
        r["makespan_s"] = float(res.makespan_s)
        if sim.migrations is not None and sim.migrations.downtime_s:
            r["migration_downtime_p50_s"] = float(np.median(sim.migrations.downtime_s))
        out[label] = r
    return out


def _err(sim: float, live: float) -> float:
    return (sim - live) / live if live and not math.isnan(live) and not math.isnan(sim) else float("nan")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="llmsched bench migration-scenario", description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--requests", type=int, default=12)
    ap.add_argument("--gap-s", type=float, default=0.5)
    ap.add_argument("--long-prompt", type=int, default=1024)
    ap.add_argument("--long-output", type=int, default=256)
    ap.add_argument("--short-prompt", type=int, default=128)
    ap.add_argument("--short-output", type=int, default=64)
    ap.add_argument("--kv-blocks", type=int, default=256, help="KV blocks (x16 tokens) per instance")
    ap.add_argument("--max-num-seqs", type=int, default=16)
    ap.add_argument("--time-scale", type=float, default=1.0)
    ap.add_argument("--stop-after-s", type=float, default=180.0)
    ap.add_argument("--params", type=json.loads, default=DEFAULT_PARAMS,
                    help="llumnix policy params (JSON), the same for live and simulator")
    ap.add_argument("--sim-only", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    specs = workload(args.requests, args.gap_s, (args.long_prompt, args.long_output),
                     (args.short_prompt, args.short_output))
    t0 = time.perf_counter()
    sim = run_sim(specs, args, args.params)
    live = {} if args.sim_only else run_live(specs, args, args.params)
    out: dict[str, Any] = {
        "scenario": {
            "instances": "2 MIXED simulated llama-7b on L4 (24 GB)", "router": "round_robin",
            "kv_blocks_per_instance": args.kv_blocks, "block_size": 16, "max_num_seqs": args.max_num_seqs,
            "requests": args.requests, "gap_s": args.gap_s,
            "long": [args.long_prompt, args.long_output], "short": [args.short_prompt, args.short_output],
            "migration_policy": {"name": "llumnix", "params": args.params}, "time_scale": args.time_scale,
            "units": "modelled seconds (live wall seconds / time_scale)",
        },
        "sim": sim, "live": live,
    }
    keys = ("ttft_p99_s", "tpot_p99_s", "ttft_p50_s", "tpot_p50_s")
    if live:
        out["sim_error_vs_live"] = {lab: {k: _err(sim[lab][k], live[lab][k]) for k in keys} for lab in ("off", "on")}
        out["live_on_over_off"] = {k: live["on"][k] / live["off"][k] for k in keys}
    out["sim_on_over_off"] = {k: sim["on"][k] / sim["off"][k] for k in keys}
    out["wall_s"] = time.perf_counter() - t0

    print(f"{'run':<10}{'TTFT p99':>10}{'TPOT p99':>10}{'TTFT p50':>10}{'TPOT p50':>10}{'migr':>6}")
    for lab in ("off", "on"):
        for src, d in (("live", live), ("sim", sim)):
            if lab in d:
                r = d[lab]
                m = r.get("migrations", r.get("ingress_migrations", 0))
                print(f"{src + ' ' + lab:<10}{r['ttft_p99_s']:>10.3f}{r['tpot_p99_s']:>10.4f}"
                      f"{r['ttft_p50_s']:>10.3f}{r['tpot_p50_s']:>10.4f}{m:>6}")
    if "sim_error_vs_live" in out:
        print("sim error vs live:", json.dumps(out["sim_error_vs_live"], indent=None))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2, default=float) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
