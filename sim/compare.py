"""``llmsched compare``: routers x load on one trace, in the simulator, with goodput.

``--load`` is the offered load as a fraction of the cluster's *measured* saturation rate: the rate at which the
cluster completes this trace's request mix in steady state when requests arrive faster than it serves them
(``saturation_rate``). The trace is then rate-scaled so its mean arrival rate is ``load x saturation``.

A config's ``policies.migration`` and ``policies.reroling`` run beside every router (each run and goodput probe
with fresh policies; ``--migration`` / ``--reroling`` replace them) as ``llmsched simulate`` runs them
(``sim/policies.py``); the saturation is measured without them, so a config with and without them offers the same
rate. Re-roling needs a P/D cluster: on a MIXED one it is refused, as the live Controller refuses it.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

import numpy as np

from scheduler.config.load import ConfigError
from scheduler.config.models import ClusterConfig
from scheduler.policy.route import make_router
from sim.commands import add_cluster_args, add_workload_args, load_cluster, load_workload, seeded
from sim.goodput import goodput, scale_rate
from sim.metrics import request_metrics, sim_summary
from sim.policies import add_policy_args, policy_flags, policy_specs, policy_stats, router_spec, sim_policies
from sim.report import print_summaries, write_figure, write_json
from sim.simulator import SimResult, Simulator, Workload

DEFAULT_ROUTERS = "round_robin,random,least_outstanding,power_of_two,llumnix,mixing,lookahead"


# Bisection steps after the 4x bracket: 4 ** (1 / 2 ** 8) = 0.54% resolution (6 steps: 2.2%, as wide as the gaps
# between the best routers' goodputs; the twenty-sixth session's audit).
GOODPUT_ITERS = 8
# The goodput search's ceiling, times the offered rate: a router still meeting the target there has a goodput of at
# least that (``goodput_capped``), not a measured one.
GOODPUT_CEILING = 8.0


def saturation_rate(config: ClusterConfig, w: Workload, *, sample: int | None = None, seed: int = 0,
                    router: str = "least_outstanding", same_instant_batching: bool = False) -> float:
    """Requests per second the cluster completes in steady state when this trace's mix arrives faster than it serves.

    ``sample`` requests (default 1000 per instance, the trace repeated as needed) are drawn shuffled with a fixed
    ``seed`` (which also draws the runs' host noise, ``Simulator``), so the mix is the same all through, and arrive evenly spaced at an offered rate above capacity, routed as
    they come by least-outstanding (or ``router``, by name) -- so a faster instance, draining sooner, takes more:
    mixed GPU types and P/D pools of mixed speed are measured as they would run. The rate is the completions over
    the second half of the arrivals (the first half fills the batches). If the cluster kept up with the offered
    rate, that rate was not above capacity: measure again at twice what it completed. A cluster that completes less past capacity than at
    it (P/D pools under overload) reads the most it completes while keeping up (``_past_collapse``).

    Why not one burst at t=0 (what this measured until the twenty-first session): a few thousand requests queued at
    once make only a few generations of batches per instance, and the completion rate between the burst's 10th and
    90th percentile completions read 17% high on the Azure trace (76.8 vs 65-66 req/s sustained on 16 A100s), so
    "load 0.8" was 0.93 of what the cluster sustains; and a burst split by count left a fast pool idle while a slow
    one worked (a TP-4 PREFILL tier beside TP-1 instances read 2.76 req/s against 5.05 sustained)."""
    # Fewer than ~500 per instance and the first half does not reach steady state (Azure, 4 x A100: 250 per
    # instance read 10.9 req/s, 500-4000 read 14.0-14.6); 1000 per instance repeat within ~3%.
    k = sample or 1000 * config.num_instances
    idx = mix_sample(w, k, seed)

    def simulator() -> Simulator:
        return Simulator(config, router=router, seed=seed, same_instant_batching=same_instant_batching)

    def completed(offered: float) -> tuple[float, int]:
        """(completion rate over the second half of the arrivals, completions counted) at ``offered`` req/s."""
        arrival = np.arange(k) / offered
        res = simulator().run(_sampled(w, idx, arrival))
        done = res.finish_s[np.isfinite(res.finish_s)]
        half = 0.5 * float(arrival[-1])
        n = int(np.sum((done >= half) & (done <= 2 * half)))
        if n < 10:  # a tiny sample: whole-run throughput is the best it can say
            return _completion_rate(res), n
        return n / max(half, 1e-9), n

    # First guess, above capacity on every cluster tried: twice a t=0 burst of 500 (a burst reads high on
    # homogeneous clusters and low on mixed ones; the loop doubles again if it was not enough).
    offered = 2.0 * _completion_rate(simulator().run(
        _sampled(w, idx[:500], np.zeros(min(k, 500)))))
    if offered <= 0.0:  # nothing completes at all (every request refused): no capacity for this mix
        return 0.0
    for _ in range(8):
        rate, n = completed(offered)
        if n < 10:
            return float(rate)
        if rate < 0.95 * offered:
            break
        offered = 2.0 * rate
    else:
        return float(rate)
    return _past_collapse(completed, float(rate))


def _past_collapse(completed, rate: float, *, step: float = 1.1, refine: int = 3) -> float:
    """``rate``, measured above capacity, or more where the cluster collapses under overload.

    Some clusters complete less past their capacity than at it: P/D pools thrash (prefilled KV waits for decoders
    that preempt to take it) -- Azure on 8 PREFILL + 8 DECODE A100s completes 50 req/s offered 50 and 34-35 offered
    60-80, where this measured 35. When the cluster keeps up with an offer ``step`` above ``rate``, climb by
    ``step`` while it does, then bisect ``refine`` times between the last offer it kept up with and the first it
    did not; the result is the most it completed while keeping up. A cluster without collapse (every MIXED one
    measured) fails the first probe and reads ``rate``, at one more simulation."""
    best, ok, fail = rate, None, step * rate
    for _ in range(16):
        got, _ = completed(fail)
        if got < 0.95 * fail:
            break
        best, ok, fail = max(best, got), fail, fail * step
    if ok is None:
        return rate
    for _ in range(refine):
        mid = 0.5 * (ok + fail)
        got, _ = completed(mid)
        if got >= 0.95 * mid:
            best, ok = max(best, got), mid
        else:
            fail = mid
    return float(best)


def mix_sample(w: Workload, k: int, seed: int = 0) -> np.ndarray:
    """``k`` indices into ``w``, each pass over the trace a fresh shuffle (fixed seed): the trace's mix all through."""
    rng = np.random.default_rng(seed)
    return np.concatenate([rng.permutation(len(w)) for _ in range(-(-k // len(w)))])[:k]


def _sampled(w: Workload, idx: np.ndarray, arrival: np.ndarray) -> Workload:
    """Requests ``idx`` of ``w`` (prefix ``hash_ids`` and tenants kept: reuse counts too) arriving at ``arrival``."""
    hash_ids = [w.hash_ids[i] for i in idx] if w.hash_ids is not None else None
    tenant = [w.tenant[i] for i in idx] if w.tenant is not None else None
    return Workload(arrival, w.prompt_tokens[idx], w.output_tokens[idx], hash_ids=hash_ids, tenant=tenant,
                    name=w.name, hash_block_tokens=w.hash_block_tokens)


def _completion_rate(res) -> float:
    """Completed requests per second over the whole run (0 when none completed)."""
    done = res.finish_s[np.isfinite(res.finish_s)]
    return float(len(done) / max(float(done.max(initial=0.0)), 1e-9))


def at_load(w: Workload, load: float, saturation: float) -> Workload:
    if saturation <= 0:  # a rate scale of 0 put every arrival at infinity (the first at NaN): the run never ended
        raise ValueError(f"--load: the cluster completes none of {w.name}'s requests (each refused: does one fit an "
                         "instance's KV cache?), so there is no saturation rate to take a share of")
    return scale_rate(w, load * saturation / w.rate_rps)


def router_params(spec: str, config: ClusterConfig) -> tuple[str, dict[str, object]]:
    """A ``--routers`` entry's router name and parameters: the config's ``policies.router.params`` when it names the
    config's router, the entry's own (``router_spec``) over them."""
    name, given = router_spec(spec)
    params = dict(config.policies.router.params) if name == config.policies.router.name else {}
    params.update(given)
    return name, params


def router_factory(name: str, config: ClusterConfig, seed: int = 0):
    """A zero-argument factory (goodput bisection needs fresh router state per probe). Routers that use the latency
    model or the SLOs (``lookahead``) get them from the config; the config's own router gets its
    ``policies.router.params`` (as ``llmsched simulate`` gives them: a learned router's ``path``, say). ``name``
    may carry parameters (``router_spec``: ``llumnix:metric=remaining_steps``), which override the config's.
    ``seed`` (``--seed``) reaches a router that draws (``power_of_two``, ``random``, ``learned``'s exploration)
    unless its parameters name one; their default seed is 0, so ``--seed 0`` is the run it was."""
    name, params = router_params(name, config)
    if name in ("lookahead", "lookahead_shed"):
        params.setdefault("config", config)
    params = seeded(name, params, seed)

    def make():
        return make_router(name, **params)

    return make


def at_goodput(config: ClusterConfig, w: Workload, router, policies: dict[str, object] | None = None, *,
               seed: int = 0, same_instant_batching: bool = False) -> dict[str, object]:
    """The run at the goodput rate (its passing probe, run again, with fresh ``policies``: ``Simulator`` keywords
    of ``sim_policies``): ``goodput_stats``. ``compare`` keeps them from the probe itself instead."""
    sim = Simulator(config, router=router, seed=seed, same_instant_batching=same_instant_batching, **(policies or {}))
    return goodput_stats(sim, sim.run(w), w)


def goodput_stats(sim: Simulator, res: SimResult, w: Workload) -> dict[str, object]:
    """A run at the goodput rate (``sim`` ran ``w`` into ``res``): which SLO its misses miss (shares of all
    requests; one request may miss both), its preemptions, migrations and role switches -- what a goodput moved
    by. ``compare``'s ``at_goodput``, from the bisection's passing probe (``goodput(report=...)``)."""
    m = request_metrics(res)
    inf = np.inf
    with np.errstate(invalid="ignore"):
        ttft_miss = ~(m.ttft_s <= (res.slo_ttft_s if res.slo_ttft_s is not None else inf))
        tpot_miss = m.tpot_s > (res.slo_tpot_s if res.slo_tpot_s is not None else inf)  # NaN (1 token): met
    out: dict[str, object] = {"offered_rps": w.rate_rps, "slo_attainment": float(m.slo_met.mean()),
                              "ttft_miss": float(ttft_miss.mean()), "tpot_miss": float(tpot_miss.mean()),
                              "preemptions": int(res.preemptions.sum()), "migrations": int(res.migrations)}
    out.update(policy_stats(sim, switches=False))
    return out


def compare(config: ClusterConfig, w: Workload, routers: list[str], *, load: float, with_goodput: bool = True,
            target: float = 0.9, seed: int = 0, same_instant_batching: bool = False,
            policies: Callable[[], dict[str, object]] | None = None) -> tuple[dict, dict, float]:
    """``seed``: ``--seed`` (the saturation sample and every run's host-noise draws, goodput probes included);
    ``same_instant_batching``: every run's, the saturation's and goodput's included (``Simulator``). The config's
    migration and re-roling policies run in every run and goodput probe, fresh each time, not in the saturation
    measurement (module docstring); ``policies``: their ``sim_policies`` where the caller built it already.

    Raises:
        ValueError: a bad ``policies.migration`` / ``policies.reroling`` (re-roling on a MIXED cluster included).
    """
    batching = {"same_instant_batching": same_instant_batching}
    if policies is None:
        policies = sim_policies(config)
    sat = saturation_rate(config, w, seed=seed, **batching)
    wl = at_load(w, load, sat)
    summaries, metrics = {}, {}
    for name in routers:
        make = router_factory(name, config, seed)
        sim = Simulator(config, router=make(), seed=seed, **batching, **policies())
        res = sim.run(wl)
        s = sim_summary(res)
        s["load"] = load
        s["saturation_rps"] = sat
        s["offered_rps"] = wl.rate_rps
        s.update(policy_stats(sim))
        if with_goodput:
            # The passing probe at the goodput's rate is the run ``at_goodput`` reports: its stats kept from the
            # bisection, not simulated again (the same workload, seed, fresh router and policies).
            g = goodput(config, wl, make, target=target, lo=0.05, hi=GOODPUT_CEILING, iters=GOODPUT_ITERS, seed=seed,
                        policies=policies, report=goodput_stats, **batching)
            s["goodput_rps"], s["goodput_capped"] = g.goodput_rps, g.capped
            if g.goodput_rps > 0:
                s["at_goodput"] = g.report
        summaries[name] = s
        metrics[name] = request_metrics(res)
    return summaries, metrics, sat


def main(argv: list[str] | None = None) -> int:
    from scheduler.cli_args import figure_file, output_file, positive_float
    from sim.cluster import build_instances
    from sim.commands import add_batching_arg, check_time_span, comma_list, warn_over_context

    p = argparse.ArgumentParser(prog="llmsched compare", description=__doc__)
    add_workload_args(p)
    add_cluster_args(p)
    # > 0 and finite: load 0 scales the trace's arrivals to infinity and the simulation never ends.
    p.add_argument("--load", type=positive_float, default=0.8, help="offered load / measured saturation rate")
    p.add_argument("--routers", default=DEFAULT_ROUTERS,
                   help="comma-separated router names; name:key=value[:key=value] sets a router parameter "
                   "(llumnix:metric=remaining_steps), the entry naming its row")
    add_policy_args(p, where="beside every router")
    p.add_argument("--no-goodput", action="store_true")
    add_batching_arg(p)
    p.add_argument("--json", type=output_file)
    p.add_argument("--png", type=figure_file)
    args = p.parse_args(argv)
    try:
        routers = comma_list("--routers", args.routers)
        cfg = load_cluster(args)
        cfg, flags = policy_flags(cfg, args)
        trace, w = load_workload(args, cfg)
        check_time_span(trace)  # --load scales from the trace's rate
        if args.rate_scale != 1.0:
            raise ValueError("--rate-scale: compare sets the rate by --load (a share of the measured saturation)")
        policies = sim_policies(cfg, flags=flags)  # fail fast: unknown policy, bad parameters, re-roling w/o P/D
        build_instances(cfg)  # fail fast: a pool without KV memory, a cluster that cannot prefill or decode
        for r in routers:
            try:
                router_factory(r, cfg)()  # fail fast on unknown names
            except ValueError as e:
                raise ValueError(f"--routers: {e}") from None
    except (ConfigError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    warn_over_context(cfg, w)
    try:
        summaries, metrics, sat = compare(cfg, w, routers, load=args.load, with_goodput=not args.no_goodput,
                                          seed=args.seed, same_instant_batching=args.same_instant_batching,
                                          policies=policies)
    except ValueError as e:  # no capacity for this mix (``at_load``)
        print(f"error: {e}", file=sys.stderr)
        return 2
    title = (f"trace {trace.name} ({len(w)} req), {cfg.name} x{cfg.num_instances}, load {args.load:.2f} of "
             f"saturation {sat:.2f} req/s")
    print_summaries(summaries, title=title)
    for name, s in summaries.items():
        if "reroling" in s:  # (simulate's printed line says the same)
            r = s["reroling"]
            print(f"  {name:18s} role switches {r['role_switches']} (to DECODE {r['to_decode']}, to PREFILL "
                  f"{r['to_prefill']})")
        if "goodput_rps" in s:
            capped = s["goodput_capped"]  # the ceiling's rate, read as a measured goodput it was not
            print(f"  {name:18s} goodput@90% {'>=' if capped else ''}{s['goodput_rps']:.2f} req/s   preemptions "
                  f"{s['preemptions']}"
                  + (f"   at it: preemptions {s['at_goodput']['preemptions']}, migrations "
                     f"{s['at_goodput'].get('migration', {}).get('started', {})}, TTFT / TPOT misses "
                     f"{s['at_goodput']['ttft_miss']:.1%} / {s['at_goodput']['tpot_miss']:.1%}"
                     + (f", role switches {s['at_goodput']['reroling']['role_switches']}"
                        if "reroling" in s["at_goodput"] else "")
                     if "at_goodput" in s else "")
                  + ("   (SLO attainment below 90% at any rate tried)" if s["goodput_rps"] <= 0 else "")
                  + (f"   (SLO attainment still met at {GOODPUT_CEILING:g}x the offered rate, the search's "
                     "ceiling: a lower bound)" if capped else ""))
    if any(s.get("goodput_rps", 0.0) > sat for s in summaries.values()):
        # On a short trace the backlog a burst leaves has no time to hurt: goodput then reads above what the
        # cluster sustains.
        print(f"note: goodput above the measured saturation ({sat:.2f} req/s): the trace ({len(w)} requests) is too "
              "short for a steady state; use a longer one for capacity numbers", file=sys.stderr)
    out = {"trace": trace.name, "trace_source": getattr(trace, "source", ""), "config": cfg.name,
           "instances": cfg.num_instances, "load": args.load, "saturation_rps": sat, "routers": summaries}
    out.update(policy_specs(cfg))  # the periodic policies every run had (as simulate and plan name them)
    if args.json:
        write_json(args.json, out)
    if args.png:
        write_figure(args.png, metrics, title=title)
    return 0


__all__ = ["at_goodput", "at_load", "compare", "goodput_stats", "main", "policy_stats", "router_factory", "router_params",
           "router_spec", "saturation_rate"]
