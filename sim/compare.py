"""``llmsched compare``: routers x load on one trace, in the simulator, with goodput.

``--load`` is the offered load as a fraction of the cluster's *measured* saturation rate: the rate at which the
cluster completes this trace's request mix when it is never idle (all requests queued at once, least-outstanding
routing; a cluster of several MIXED pools is the sum of its pools, each measured alone). The trace is then
rate-scaled so its mean arrival rate is ``load x saturation``.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from scheduler.config.load import ConfigError
from scheduler.config.models import ClusterConfig
from scheduler.core.types import InstanceRole
from scheduler.policy.route import make_router
from sim.commands import add_cluster_args, add_workload_args, load_cluster, load_workload
from sim.goodput import goodput, scale_rate
from sim.metrics import request_metrics, sim_summary
from sim.report import print_summaries, write_figure, write_json
from sim.simulator import Simulator, Workload

DEFAULT_ROUTERS = "round_robin,random,least_outstanding,power_of_two,llumnix,mixing,lookahead"


def saturation_rate(config: ClusterConfig, w: Workload, *, sample: int = 4000) -> float:
    """Completed requests per second when the cluster is never idle (everything arrives at t=0).

    Several MIXED pools (GPU types, TP degrees) are measured one at a time and summed: routed all at once, a burst
    is split by outstanding count, so the faster pool drains its share and idles while the slower one works, and
    the cluster's capacity reads as barely more than its slowest pool's (a 12 x TP1 + 4 x TP4 cluster: 3.99
    req/s measured jointly on the Mooncake trace). P/D pools only work together and are measured together."""
    if len(config.pools) > 1 and all(p.role is InstanceRole.MIXED for p in config.pools):
        return sum(saturation_rate(config.model_copy(update={"pools": [p]}), w, sample=sample) for p in config.pools)
    k = min(len(w), sample)
    idx = np.linspace(0, len(w) - 1, k).astype(int)  # spread over the trace: the mix, not just its start
    hash_ids = [w.hash_ids[i] for i in idx] if w.hash_ids is not None else None  # prefix reuse counts too
    burst = Workload(np.zeros(k), w.prompt_tokens[idx], w.output_tokens[idx], hash_ids=hash_ids, name=w.name)
    res = Simulator(config, router="least_outstanding").run(burst)
    # Completion rate between the 10th and 90th percentile completions: the start-up and the drain of the last
    # long requests (a batch of one) would otherwise understate what a loaded cluster sustains.
    t = np.sort(res.finish_s[np.isfinite(res.finish_s)])
    if len(t) < 10:
        return float(len(t) / max(t[-1], 1e-9)) if len(t) else 0.0
    a, b = int(0.1 * len(t)), int(0.9 * len(t))
    return float((b - a) / max(t[b] - t[a], 1e-9))


def at_load(w: Workload, load: float, saturation: float) -> Workload:
    rate = len(w) / max(float(w.arrival_s[-1] - w.arrival_s[0]), 1e-9)
    return scale_rate(w, load * saturation / rate)


def router_factory(name: str, config: ClusterConfig):
    """A zero-argument factory (goodput bisection needs fresh router state per probe). Routers that use the latency
    model or the SLOs (``lookahead``) get them from the config."""

    def make():
        if name in ("lookahead", "lookahead_shed"):
            return make_router(name, config=config)
        return make_router(name)

    return make


def compare(config: ClusterConfig, w: Workload, routers: list[str], *, load: float, with_goodput: bool = True,
            target: float = 0.9) -> tuple[dict, dict, float]:
    sat = saturation_rate(config, w)
    wl = at_load(w, load, sat)
    summaries, metrics = {}, {}
    for name in routers:
        make = router_factory(name, config)
        res = Simulator(config, router=make()).run(wl)
        s = sim_summary(res)
        s["load"] = load
        s["saturation_rps"] = sat
        s["offered_rps"] = len(wl) / max(float(wl.arrival_s[-1] - wl.arrival_s[0]), 1e-9)
        if with_goodput:
            s["goodput_rps"] = goodput(config, wl, make, target=target, lo=0.05, hi=8.0, iters=6).goodput_rps
        summaries[name] = s
        metrics[name] = request_metrics(res)
    return summaries, metrics, sat


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="llmsched compare", description=__doc__)
    add_workload_args(p)
    add_cluster_args(p)
    p.add_argument("--load", type=float, default=0.8, help="offered load / measured saturation rate")
    p.add_argument("--routers", default=DEFAULT_ROUTERS)
    p.add_argument("--no-goodput", action="store_true")
    p.add_argument("--json")
    p.add_argument("--png")
    args = p.parse_args(argv)
    try:
        cfg = load_cluster(args)
        trace, w = load_workload(args, cfg)
        routers = [r.strip() for r in args.routers.split(",") if r.strip()]
        for r in routers:
            router_factory(r, cfg)()  # fail fast on unknown names
    except (ConfigError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    summaries, metrics, sat = compare(cfg, w, routers, load=args.load, with_goodput=not args.no_goodput)
    title = (f"trace {trace.name} ({len(w)} req), {cfg.name} x{cfg.num_instances}, load {args.load:.2f} of "
             f"saturation {sat:.2f} req/s")
    print_summaries(summaries, title=title)
    for name, s in summaries.items():
        if "goodput_rps" in s:
            print(f"  {name:18s} goodput@90% {s['goodput_rps']:.2f} req/s   preemptions {s['preemptions']}")
    out = {"trace": trace.name, "trace_source": getattr(trace, "source", ""), "config": cfg.name,
           "instances": cfg.num_instances, "load": args.load, "saturation_rps": sat, "routers": summaries}
    if args.json:
        write_json(args.json, out)
    if args.png:
        write_figure(args.png, metrics, title=title)
    return 0


__all__ = ["compare", "saturation_rate", "at_load", "router_factory", "main"]
