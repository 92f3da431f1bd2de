"""Overload: offered load at 3x the cluster's measured capacity, through the gRPC server.

    python -m bench.bench_overload --json overload.json
    python -m bench.bench_overload --phase-s 20 --factor 3 --phases bounded,serve-default,unbounded

One run, one cluster (2 MIXED simulated llama-7b instances, ``max_num_seqs`` 8 each, ``time_scale`` 4 so two
cores keep up), one request shape (256-token prompt, 64 output tokens, ``ignore_eos``):

1. **capacity**: a closed loop of ``instances x max_num_seqs`` clients for ``--capacity-s``; capacity = completed
   requests per second in the steady part. Its TTFT/TPOT show the SLO holds at capacity.
2. **overload phases**, each a fresh gRPC server on the same cluster, open-loop Poisson arrivals at ``--factor`` x
   capacity for ``--phase-s`` (then up to ``--drain-s`` for admitted streams to finish):

   - ``bounded``: the server's ``InflightLimiter`` sized to the engines' batch capacity (``instances x
     max_num_seqs``) -- what admission should converge to;
   - ``serve-default``: the limiter ``llmsched serve`` installs when no ``LLMSCHED_MAX_INFLIGHT*`` is set
     (``InflightLimiter()``: 256 per priority, 1024 total) -- what happens today out of the box;
   - ``unbounded``: no limiter at all (only the ingress' ``max_in_flight`` of 4096);
   - ``shed``: no limiter; the router is ``lookahead_shed`` (refuses what would wait too long for its prefill);
   - ``admission``: no limiter; the ingress applies ``policies.admission`` (``AdmissionPolicy``: bounded queues
     per priority, ``--protected-share`` of the requests priority 1 with a long queue, the rest priority 0 with a
     short one): the protected class keeps its SLO, the rest is shed. Its summary splits by priority.

Per phase: admitted vs rejected (every rejection must be RESOURCE_EXHAUSTED with a ``retry-after``), p99 TTFT and
TPOT of *admitted* requests (an admitted request with no token by the hard stop counts as an infinite TTFT),
server RSS (this process: Ray driver + ingress + gRPC server; the client is a child process) sampled every 0.25 s,
peak in-flight. SLO: the config default (TTFT 2 s, TPOT 100 ms on the modelled GPU) x ``time_scale``.
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
    FAILED,
    NOT_SENT,
    LoadPlan,
    LoadProcess,
    Outcome,
    RequestSpec,
    Stack,
    cluster_config,
    count_outcomes,
    latency_summary,
    pct,
    rss_bytes,
    start_stack,
)

log = logging.getLogger("bench.overload")

PROMPT, OUTPUT = 256, 64
SLO_TTFT_S, SLO_TPOT_S = 2.0, 0.1  # ClusterConfig's default SLO for priority 0, on the modelled GPU


def poisson_arrivals(rate: float, duration_s: float, seed: int) -> np.ndarray:
    """A Poisson process conditioned on its count: exactly ``round(rate * duration_s)`` arrivals, uniform in
    ``[0, duration_s)``, sorted (so the offered rate is the asked one, not one draw of it)."""
    rng = np.random.default_rng(seed)
    return np.sort(rng.uniform(0.0, duration_s, round(rate * duration_s)))


async def _sample(stack: Stack, limiter: Any, stats: dict[str, Any], stop: asyncio.Event) -> None:
    while not stop.is_set():
        rss = rss_bytes()
        stats["rss"].append(rss)
        stats["peak_registry"] = max(stats["peak_registry"], len(stack.ingress.registry))
        if limiter is not None:
            stats["peak_in_flight"] = max(stats["peak_in_flight"], limiter.in_flight)
        try:
            await asyncio.wait_for(stop.wait(), 0.25)
        except TimeoutError:
            pass


async def _wait_idle(stack: Stack, timeout_s: float = 60.0) -> None:
    """Until every engine is empty (the previous phase's streams are gone)."""
    import ray

    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout_s:
        stats = await asyncio.gather(*(_await(m.handle.stats.remote())
                                       for m in stack.ingress._members.values()))
        if all(s.num_running == 0 and s.num_waiting == 0 for s in stats) and not len(stack.ingress.registry):
            return
        await asyncio.sleep(0.2)
    del ray
    log.warning("engines not idle after %.0fs", timeout_s)


async def _await(ref: Any) -> Any:
    return await ref


async def run_phase(stack: Stack, name: str, plan: LoadPlan, limiter: Any, router: Any = None,
                    admission: Any = None) -> tuple[list[Outcome], dict[str, Any]]:
    await stack.start_front(limiter=limiter, router=router, admission=admission)
    plan.target = stack.address
    await _wait_idle(stack)
    stats: dict[str, Any] = {"rss": [], "peak_registry": 0, "peak_in_flight": 0}
    stop = asyncio.Event()
    load = LoadProcess(plan)
    sampler = None
    try:
        await load.start()
        t0 = time.perf_counter()
        sampler = asyncio.ensure_future(_sample(stack, limiter, stats, stop))
        res = await load.result(plan.stop_after_s + 90)
        stats["wall_s"] = time.perf_counter() - t0
        stats["admission_rejected"] = dict(stack.ingress.admission_rejected)  # the ingress' own count
    finally:
        stop.set()
        if sampler is not None:
            await sampler
        load.kill()
        await stack.stop_front()
    log.info("phase %s: %d requests in %.1fs", name, len(res), stats["wall_s"])
    return res, stats


def summarize_phase(res: list[Outcome], stats: dict[str, Any], *, offered_rps: float, slo_ttft: float,
                    slo_tpot: float, limit: int | None) -> dict[str, Any]:
    sent = [o for o in res if o.outcome != NOT_SENT]
    rejected = [o for o in sent if o.outcome == FAILED and o.code == "RESOURCE_EXHAUSTED"]
    admitted = [o for o in sent if not (o.outcome == FAILED and o.code == "RESOURCE_EXHAUSTED")]
    ttft = [float("inf") if math.isnan(o.first_s) else o.ttft_s for o in admitted]
    tpot = [o.tpot_s for o in admitted if o.outcome == COMPLETED]
    rss = stats["rss"] or [0]
    c = count_outcomes(res)
    p99_ttft = float(np.percentile(ttft, 99, method="higher")) if ttft else float("nan")  # inf-safe
    p99_tpot = pct(tpot, 99)
    return {
        "offered_rps": round(offered_rps, 2),
        "limit_in_flight": limit,
        "sent": c["sent"],
        "admitted": len(admitted),
        "completed": c["completed"],
        "rejected": len(rejected),
        "rejected_with_retry_after": sum(o.retry_after_s is not None and o.retry_after_s > 0 for o in rejected),
        "retry_after_s": sorted({o.retry_after_s for o in rejected if o.retry_after_s is not None})[:5],
        "other_failures": {k: v for k, v in c["failed_status_codes"].items() if k != "RESOURCE_EXHAUSTED"},
        # Still streaming or queued when the bench stopped waiting (cancelled by the bench): not lost, but
        # admitted work the cluster could not serve in time.
        "open_at_hard_stop": c["lost_detail"]["still_open"],
        "lost": c["lost"] - c["lost_detail"]["still_open"],
        "lost_detail": c["lost_detail"],
        "duplicated_tokens": c["duplicated_tokens"],
        "admitted_ttft_p50_s": pct([x for x in ttft if x != float("inf")], 50),
        "admitted_ttft_p99_s": p99_ttft,
        "admitted_tpot_p50_s": pct(tpot, 50),
        "admitted_tpot_p99_s": p99_tpot,
        "admitted_no_token_by_stop": sum(x == float("inf") for x in ttft),
        "slo_ttft_s": slo_ttft,
        "slo_tpot_s": slo_tpot,
        "within_slo": bool(p99_ttft <= slo_ttft and (p99_tpot <= slo_tpot or math.isnan(p99_tpot))),
        "goodput_rps": round(sum(o.outcome == COMPLETED and o.ttft_s <= slo_ttft and
                                 (o.tokens < 2 or o.tpot_s <= slo_tpot) for o in admitted) / max(stats["wall_s"], 1e-9), 2),
        "rss_start_mib": round(rss[0] / 2**20, 1),
        "rss_peak_mib": round(max(rss) / 2**20, 1),
        "rss_end_mib": round(rss[-1] / 2**20, 1),
        "rss_growth_mib": round((max(rss) - rss[0]) / 2**20, 1),
        "peak_in_flight": stats["peak_in_flight"] or None,
        "peak_ingress_registry": stats["peak_registry"],
        "wall_s": round(stats["wall_s"], 1),
    }


async def run(args: argparse.Namespace, stack: Stack) -> dict[str, Any]:
    from scheduler.policy.route import make_router
    from scheduler.server.admission import InflightLimiter

    k = args.instances * args.max_num_seqs
    slo_ttft, slo_tpot = SLO_TTFT_S * args.time_scale, SLO_TPOT_S * args.time_scale
    # 1. capacity, closed loop at the engines' batch capacity
    cap_plan = LoadPlan("", closed_concurrency=k, closed_duration_s=args.capacity_s, closed_prompt_len=PROMPT,
                        closed_max_tokens=OUTPUT, token_seed=args.seed, timeout_s=60, id_prefix="cap",
                        stop_after_s=args.capacity_s + 60)
    cap_res, _ = await run_phase(stack, "capacity", cap_plan, None)
    warm = min(2.0, args.capacity_s / 4)
    done = [o for o in cap_res if o.outcome == COMPLETED and warm <= o.end_s <= args.capacity_s]
    capacity = len(done) / (args.capacity_s - warm)
    out: dict[str, Any] = {
        "capacity": {"rps": round(capacity, 2), "concurrency": k, "completed": len(done),
                     **{kk: round(v, 4) for kk, v in latency_summary(done).items()},
                     "lost": count_outcomes(cap_res)["lost"]},
        "factor": args.factor,
        "phases": {},
    }
    offered = args.factor * capacity
    print(f"capacity {capacity:.2f} req/s at concurrency {k}; offering {offered:.2f} req/s ({args.factor}x)")
    arrivals = poisson_arrivals(offered, args.phase_s, args.seed)
    # The admission phase's classes: a seeded share of the arrivals is priority 1 (protected), the rest 0.
    prio = (np.random.default_rng(args.seed + 1).random(len(arrivals)) < args.protected_share).astype(int)
    for phase in args.phases.split(","):
        limiter = {"bounded": lambda: InflightLimiter(default_limit=k, max_total=k),
                   "serve-default": lambda: InflightLimiter.for_config(stack.deployment.config),
                   "unbounded": lambda: None, "shed": lambda: None, "admission": lambda: None}[phase]()
        # "shed": no server limit; the router refuses what would wait too long (SLO shedding, docs/routing.md).
        router = make_router("lookahead_shed", config=stack.deployment.config) if phase == "shed" else None
        admission = admission_policy(args) if phase == "admission" else None
        reqs = [RequestSpec(f"{phase}-{i}", float(t), PROMPT, OUTPUT, int(prio[i]) if admission else 0)
                for i, t in enumerate(arrivals)]
        plan = LoadPlan("", reqs, token_seed=args.seed, timeout_s=args.phase_s + args.drain_s, retries=0,
                        stop_after_s=args.phase_s + args.drain_s, id_prefix=phase)
        res, stats = await run_phase(stack, phase, plan, limiter, router, admission)
        limit = None if limiter is None else limiter.max_total
        out["phases"][phase] = summarize_phase(res, stats, offered_rps=len(reqs) / args.phase_s, slo_ttft=slo_ttft,
                                               slo_tpot=slo_tpot, limit=limit)
        if admission is not None:
            of = {r.rid: r.priority for r in reqs}
            out["phases"][phase]["admission"] = {"max_queued": admission.max_queued,
                                                 "ingress_admission_rejected": stats["admission_rejected"]}
            out["phases"][phase]["by_priority"] = {
                p: summarize_phase([o for o in res if of[o.rid] == p], stats,
                                   offered_rps=sum(r.priority == p for r in reqs) / args.phase_s,
                                   slo_ttft=slo_ttft, slo_tpot=slo_tpot, limit=limit)
                for p in sorted(set(of.values()))}
            out["phases"][phase]["simulated"] = simulate_admission(stack.deployment.config, arrivals, prio, args)
    return out


def simulate_admission(cfg: Any, arrivals: np.ndarray, prio: np.ndarray, args: argparse.Namespace
                       ) -> dict[str, Any]:
    """The admission phase replayed in the simulator: same arrivals, priorities, shapes and policy on the same
    cluster, on the modelled clock (the live engines run it ``time_scale`` x slower, so arrivals are divided by it
    and TTFTs multiplied back). Per priority: refused fraction and admitted TTFT p99 (live seconds)."""
    from sim.simulator import Simulator, Workload

    n = len(arrivals)
    w = Workload(arrival_s=arrivals / args.time_scale, prompt_tokens=np.full(n, PROMPT),
                 output_tokens=np.full(n, OUTPUT), priority=prio.astype(np.int64))
    res = Simulator(cfg, admission=admission_policy(args), seed=args.seed).run(w)
    ttft = (res.first_token_s - w.arrival_s) * args.time_scale
    out: dict[str, Any] = {}
    for p in sorted({int(x) for x in prio}):
        sel = prio == p
        served = sel & ~res.rejected
        out[p] = {"sent": int(sel.sum()), "rejected": int(res.admission_rejected[sel].sum()),
                  "rejected_fraction": round(float(res.admission_rejected[sel].mean()), 3),
                  "admitted_ttft_p99_s": round(float(np.percentile(ttft[served], 99)), 3) if served.any() else None}
    return out


def admission_policy(args: argparse.Namespace) -> Any:
    """The admission phase's policy: short queue for priority 0, long for the protected priority 1."""
    from scheduler.policy.admission import AdmissionPolicy

    return AdmissionPolicy(max_queued={0: args.queue_low, 1: args.queue_protected}, protected_priority=1)


def print_table(r: dict[str, Any]) -> None:
    cap = r["capacity"]
    print(f"capacity: {cap['rps']} req/s (closed loop, {cap['concurrency']} clients); "
          f"TTFT p99 {cap['ttft_p99_s']:.3f}s, TPOT p99 {cap['tpot_p99_s'] * 1e3:.0f}ms")
    cols = ["offered_rps", "limit_in_flight", "sent", "admitted", "rejected", "rejected_with_retry_after", "lost",
            "open_at_hard_stop",
            "admitted_ttft_p99_s", "admitted_tpot_p99_s", "within_slo", "goodput_rps", "rss_growth_mib",
            "rss_peak_mib", "peak_ingress_registry"]
    phases = {f"{n} p{p}" if p is not None else n: s for n, ph in r["phases"].items()
              for p, s in [(None, ph), *ph.get("by_priority", {}).items()]}
    names = list(phases)
    print(f"{'':<28}" + "".join(f"{n:>16}" for n in names))
    for col in cols:
        vals = []
        for n in names:
            v = phases[n][col]
            vals.append(f"{v:>16.3f}" if isinstance(v, float) else f"{v!s:>16}")
        print(f"{col:<28}" + "".join(vals))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llmsched bench overload", description=__doc__.splitlines()[0])
    p.add_argument("--json", type=Path)
    p.add_argument("--factor", type=float, default=3.0, help="offered load / measured capacity")
    p.add_argument("--capacity-s", type=float, default=12.0)
    p.add_argument("--phase-s", type=float, default=20.0)
    p.add_argument("--drain-s", type=float, default=20.0, help="after the arrivals, for admitted streams (hard stop)")
    p.add_argument("--phases", default="bounded,serve-default",
                   help="comma list of bounded,serve-default,unbounded,shed,admission")
    p.add_argument("--protected-share", type=float, default=0.25,
                   help="admission phase: share of the requests at priority 1 (protected); the rest priority 0")
    p.add_argument("--queue-low", type=int, default=2, help="admission phase: max_queued of priority 0")
    p.add_argument("--queue-protected", type=int, default=32, help="admission phase: max_queued of priority 1")
    p.add_argument("--instances", type=int, default=2)
    p.add_argument("--max-num-seqs", type=int, default=8)
    p.add_argument("--time-scale", type=float, default=4.0)
    p.add_argument("--seed", type=int, default=0)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for noisy in ("scheduler.control.ingress", "scheduler.control.controller", "scheduler.server.grpc_server"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    cfg = cluster_config("overload", mixed=args.instances, max_num_seqs=args.max_num_seqs)
    t0 = time.perf_counter()
    stack = start_stack(cfg, time_scale=args.time_scale, seed=args.seed)
    try:
        result = asyncio.run(run(args, stack))
    finally:
        stack.shutdown()
    result["config"] = {"pools": f"{args.instances}x MIXED a100 (simulated llama-7b)",
                        "max_num_seqs": args.max_num_seqs, "time_scale": args.time_scale, "prompt": PROMPT,
                        "output": OUTPUT, "phase_s": args.phase_s, "seed": args.seed}
    result["total_wall_s"] = round(time.perf_counter() - t0, 1)
    print_table(result)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2, default=str))
    b = result["phases"].get("bounded")
    ok = b is None or (b["within_slo"] and b["lost"] == 0 and b["rejected"] == b["rejected_with_retry_after"])
    a = result["phases"].get("admission")
    if a is not None:  # the protected class within its SLO, nothing lost, every refusal with a retry-after
        ok = ok and a["by_priority"][1]["within_slo"] and a["lost"] == 0 and a["rejected"] == a[
            "rejected_with_retry_after"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
