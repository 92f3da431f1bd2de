"""``llmsched simulate``: replay a trace (or a synthetic workload) through the simulator and report.

The config's policies run as a live cluster runs them -- router, admission, predictor, migration, P/D re-roling
(--migration / --reroling replace the last two); autoscaling runs with --scaling (docs/simulator.md, "Policies
from the config")."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import math
import sys
from pathlib import Path

import numpy as np

from scheduler.cli_args import (
    figure_file,
    nonneg_float,
    nonneg_int,
    output_dir,
    output_file,
    positive_float,
    positive_int,
)
from scheduler.config.load import ConfigError, load_config
from scheduler.config.models import ClusterConfig
from scheduler.policy.route import make_router, router_class
from scheduler.policy.scaling import (
    SIM_REROLING_REMEDY,
    ScalingLoop,
    check_reroling_without_scaling,
    make_scaling_policy,
)
from sim.goodput import goodput
from sim.metrics import request_metrics, sim_summary
from sim.policies import add_policy_args, policy_flags, policy_stats, sim_policies
from sim.report import print_summaries, write_figure, write_json
from sim.simulator import Simulator, Workload


def add_workload_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trace", help="trace file (Azure CSV, Mooncake JSONL, BurstGPT CSV, token-pair CSV; .gz ok)")
    p.add_argument("--format", help="trace format when auto-detection is not wanted")
    p.add_argument("--limit", type=positive_int, help="use only the first N requests of the trace")
    p.add_argument("--window", type=window_arg, help="START:END seconds of the trace to replay (either may be empty)")
    p.add_argument("--rate-scale", type=positive_float, default=1.0, help="multiply the trace's request rate")
    p.add_argument("--synthetic", type=positive_int, metavar="N", help="N synthetic requests instead of a trace")
    p.add_argument("--rate", type=positive_float, help="synthetic arrival rate, req/s (default: 1.5 per instance)")
    p.add_argument("--cv", type=positive_float, default=1.0,
                   help="synthetic inter-arrival CV (1 = Poisson, >1 bursty)")
    p.add_argument("--seed", type=nonneg_int, default=0,
                   help="synthetic arrivals, trace resampling and tie spreading, the simulator's host-noise draws "
                        "(a measured profile's spread), and a drawing router's own seed (power_of_two, random, "
                        "learned's exploration) unless its parameters name one")
    p.add_argument("--spread-ties", action="store_true",
                   help="spread requests logged at one timestamp (a coarse trace clock, e.g. Mooncake's 3 s ticks) "
                        "evenly at random up to the next timestamp, instead of replaying them as one burst")
    p.add_argument("--priority-mix", type=priority_mix_arg, metavar="P:SHARE,...",
                   help="give each request a priority class at random (seeded by --seed): e.g. 1:0.25 puts a quarter "
                        "in class 1, the rest in 0 (traces carry none; SLOs and policies.admission read it)")


def priority_mix_arg(s: str) -> dict[int, float]:
    """``P:SHARE,...`` -> ``{priority: share}``, shares in (0, 1] summing to at most 1 (the rest is class 0)."""
    mix: dict[int, float] = {}
    try:
        for item in s.split(","):
            p, _, share = item.partition(":")
            if int(p) in mix:  # the last share would silently win
                raise argparse.ArgumentTypeError(f"class {int(p)} given twice in {s!r}")
            mix[int(p)] = float(share)
    except ValueError:
        mix = {0: float("nan")}
    if not all(0 < v <= 1 for v in mix.values()) or sum(mix.values()) > 1 + 1e-9:
        raise argparse.ArgumentTypeError(f"expected P:SHARE,... with shares in (0, 1] summing to <= 1, got {s!r}")
    return mix


def with_priorities(w: Workload, mix: dict[int, float], seed: int) -> Workload:
    """``w`` with each request's priority drawn from ``mix`` (``priority_mix_arg``; the rest class 0)."""
    classes = [*mix, 0]
    shares = [*mix.values(), max(1.0 - sum(mix.values()), 0.0)]
    prio = np.random.default_rng(seed).choice(np.array(classes, dtype=np.int64), size=len(w),
                                              p=np.array(shares) / sum(shares))
    return dataclasses.replace(w, priority=prio)


def add_batching_arg(p: argparse.ArgumentParser) -> None:
    """``--same-instant-batching`` (``simulate``, ``compare``): ``Simulator``'s ``same_instant_batching``."""
    p.add_argument("--same-instant-batching", action="store_true",
                   help="requests reaching an idle instance at one instant (a coarse trace clock's burst) share its "
                        "next step, as live vLLM batches them; default: the first starts a step alone "
                        "(docs/simulator.md#same-instant-arrivals)")


def window_arg(s: str) -> tuple[float, float]:
    """``START:END`` seconds (an empty START is 0, an empty END the trace's end) -> ``(start, end)``."""
    start, _, end = s.partition(":")
    try:
        lo, hi = float(start or 0), float(end) if end else float("inf")
    except ValueError:
        lo = hi = float("nan")
    if not 0 <= lo < hi:  # NaN fails too
        raise argparse.ArgumentTypeError(f"expected START:END seconds with 0 <= START < END, got {s!r}")
    return lo, hi


def add_cluster_args(
    p: argparse.ArgumentParser,
    instances_help: str = "override the instance count (spread over the config's pools)",
) -> None:
    p.add_argument("--config", help="cluster config YAML or a bundled name (default: 'default')")
    p.add_argument("--instances", type=int, help=instances_help)


def load_cluster(args: argparse.Namespace) -> ClusterConfig:
    """``--config`` (with ``--instances``). Every command runs the config's migration and re-roling; autoscaling
    only with ``simulate --scaling``: a ``policies.scaling`` it will not run is noted, not silently dropped."""
    cfg = load_config(args.config)
    if args.instances is not None:
        cfg = with_instances(cfg, args.instances)
    if cfg.num_instances == 0:  # the simulator would fail deep inside; say which setting to change
        raise ConfigError(f"{args.config or 'default'}: pools[*].count: every pool has count 0; give a pool "
                          "instances or pass --instances")
    spec = cfg.policies.scaling
    if spec is not None and spec.name != "none" and not getattr(args, "scaling", None):
        print(f"note: {args.config}: policies.scaling not applied: the live Controller applies it; this simulation "
              f"runs without (llmsched simulate --scaling {spec.name} runs it with its params)", file=sys.stderr)
    return cfg


def seeded(router: str, params: dict[str, object], seed: int) -> dict[str, object]:
    """``params`` with ``--seed`` for a router that draws (``power_of_two``, ``random``, ``learned``'s exploration)
    unless they name one; such routers default to seed 0, so ``--seed 0`` leaves every run as it was."""
    if seed and "seed" not in params and "seed" in inspect.signature(router_class(router)).parameters:
        return {**params, "seed": seed}
    return params


def comma_list(flag: str, s: str) -> list[str]:
    """Comma-separated entries, none empty (the message names ``flag``)."""
    items = [x.strip() for x in s.split(",")]
    if not all(items):
        raise ValueError(f"{flag}: empty entry in {s!r}; give comma-separated values")
    return items


def check_time_span(trace) -> None:
    """Refuse a trace whose arrivals span no time (one request, or all at one instant): its request rate, which
    ``compare --load`` and ``plan`` scale from, cannot be measured (it would read ~1e11 req/s)."""
    if len(trace) < 2 or float(trace.arrival_s[-1] - trace.arrival_s[0]) <= 0:
        raise ValueError(f"trace {getattr(trace, 'source', '') or trace.name}: its {len(trace)} arrival(s) span no "
                         "time, so its request rate cannot be measured; use a trace (or --window/--limit) with "
                         "arrivals spread over time")


def warn_over_context(cfg: ClusterConfig, w) -> None:
    """Say when requests need more context than the config's model has: the live ingress refuses them (a prompt
    plus max_tokens over ``model.max_model_len``); the simulator serves them as if the context were longer."""
    from sim.simulator import over_context

    n = over_context(cfg, w)
    if n:
        print(f"warning: {n} of {len(w)} requests need more than {cfg.name}'s max_model_len "
              f"({cfg.model.max_model_len} tokens of prompt + output); a live cluster refuses them, the simulator "
              "serves them as if the context were longer, and refuses those that do not fit an instance's KV cache "
              "at all (a long-context config fits them: --config llama3-8b-a100-16-longctx)", file=sys.stderr)


def warn_goodput(g, offered_rps: float, attainment: float) -> None:
    """Say when the goodput is not the plain answer it looks like: the trace's rate is above it (the cluster is
    overloaded at the load just simulated), it is only the search's ceiling (a lower bound), or it is 0 because
    even a nearly idle cluster misses the SLO (then less load is no cure)."""
    if g.scale <= 0:  # missed at the lowest rate tried: there is no load to shed
        print(f"warning: SLO attainment {g.attainment:.1%} even at the goodput search's lowest rate (a nearly idle "
              "cluster): requests miss the SLO on their own latency (or are refused), not for load; loosen the "
              "targets or use faster instances (GPU, TP) -- more instances or a lower rate will not meet them",
              file=sys.stderr)
    elif g.capped:
        print(f"warning: goodput >= {g.goodput_rps:.2f} req/s: SLO attainment still met at {g.scale:g}x the trace's "
              "rate, the search's ceiling; the true goodput is higher", file=sys.stderr)
    elif g.goodput_rps < offered_rps:
        print(f"warning: the offered load ({offered_rps:.2f} req/s) is above this cluster's goodput "
              f"({g.goodput_rps:.2f} req/s at 90% SLO attainment): it is overloaded at the trace's rate (attainment "
              f"{attainment:.1%} in this run); add instances or lower --rate-scale to meet the SLO", file=sys.stderr)


def with_instances(cfg: ClusterConfig, n: int) -> ClusterConfig:
    """Resize pools proportionally to ``n`` instances in total (each pool keeps at least one)."""
    if n < len(cfg.pools):
        raise ConfigError(f"--instances: need at least {len(cfg.pools)} (one per pool), got {n}")
    total = cfg.num_instances or 1
    counts = [max(1, round(p.count * n / total)) for p in cfg.pools]
    counts[-1] += n - sum(counts)
    # Rounding up the first pools could leave the last with none (a P/D config's decode pool: "no instance can
    # decode"): it takes its one back from the largest of the others (n >= one per pool, so one has two or more).
    while counts[-1] < 1:
        counts[max(range(len(counts) - 1), key=counts.__getitem__)] -= 1
        counts[-1] += 1
    pools = [p.model_copy(update={"count": c}) for p, c in zip(cfg.pools, counts)]
    return cfg.model_copy(update={"pools": pools})


def with_predictor(cfg: ClusterConfig, name: str | None, **params: object) -> ClusterConfig:
    """``cfg`` with ``policies.predictor`` set (``None``: none): the simulator then guesses every request's length
    the way a live ingress would (``scheduler/predict/serving.py``)."""
    from scheduler.config.models import PolicySpec

    spec = PolicySpec(name=name, params=params) if name is not None else None
    return cfg.model_copy(update={"policies": cfg.policies.model_copy(update={"predictor": spec})})


def load_workload(args: argparse.Namespace, cfg: ClusterConfig):
    """Returns ``(trace, workload)``; the trace carries the name and source that reports print."""
    from sim.traces import default_trace, load_trace, synthetic

    if args.synthetic and args.trace:
        raise ValueError("--synthetic: generates the workload; give it or --trace, not both")
    if args.format and not args.trace:
        raise ValueError("--format: names the format of --trace; no --trace given")
    cv = getattr(args, "cv", 1.0)
    arrival = "gamma" if cv != 1.0 else "poisson"
    if args.synthetic:
        rate = args.rate or 1.5 * cfg.num_instances
        trace = synthetic(args.synthetic, rate, arrival=arrival, cv=cv, seed=args.seed)
    elif args.trace:
        trace = load_trace(args.trace, args.format, rate=args.rate or 1.5 * cfg.num_instances, seed=args.seed,
                           arrival=arrival, cv=cv)
        if trace.drawn_arrivals:  # lengths only: the loader drew the arrival times
            print(f"note: {args.trace} has no timestamps as read (format {args.format or 'detected'}); arrivals "
                  f"are synthetic ({trace.drawn_arrivals}; --rate and --cv set them)",
                  file=sys.stderr)
        if trace.skipped_rows:  # the loader drops them on purpose (docs/traces.md); a replay says so
            print(f"note: {args.trace}: {trace.skipped_rows} row(s) with 0 prompt or 0 output tokens dropped (not "
                  "replayed, not counted as refused)", file=sys.stderr)
    else:
        trace = default_trace()
    if not trace.drawn_arrivals and (args.rate is not None or cv != 1.0):
        flag = "--rate" if args.rate is not None else "--cv"
        raise ValueError(f"{flag}: sets the arrival process of --synthetic or of a lengths-only trace; "
                         f"{trace.name} replays its own timestamps (use --rate-scale to change its rate)")
    tied = float(np.mean(np.diff(trace.arrival_s) == 0)) if len(trace) > 2 else 0.0
    if getattr(args, "spread_ties", False):
        trace = trace.spread_ties(args.seed)
    elif tied > 0.5:
        print(f"note: {trace.name}: {tied:.0%} of its requests arrive at the same instant as the one before (a "
              "coarse trace clock?); they are replayed as bursts; --spread-ties spreads them", file=sys.stderr)
    if args.window:
        span = float(trace.arrival_s[-1]) if len(trace) else 0.0
        trace = trace.window(*args.window)
        if len(trace) == 0:  # say where the trace is, not only that nothing is left
            raise ValueError(f"--window {args.window[0]:g}:{args.window[1]:g}: no request arrives there; "
                             f"{trace.name}'s arrivals span 0-{span:.1f} s")
    if args.limit:
        trace = trace.head(args.limit)
    if args.rate_scale != 1.0:
        trace = trace.scale_rate(args.rate_scale)
    if len(trace) == 0:
        raise ValueError("the workload is empty after --window/--limit")
    w = Workload.from_trace(trace)
    mix = getattr(args, "priority_mix", None)
    return trace, (w if mix is None else with_priorities(w, mix, args.seed))


def scaling_policy(args: argparse.Namespace, cfg: ClusterConfig) -> tuple[object | None, ScalingLoop]:
    """``simulate --scaling NAME``'s policy and loop. When the config's ``policies.scaling`` names the same policy,
    its params are read as the live Controller reads them (``ScalingLoop.split``: decision interval, observation
    window, start-up delay, then the policy's own); the flags override them."""
    if not args.scaling or args.scaling == "none":
        if args.min_instances is not None or args.max_instances is not None:
            raise ValueError("--min-instances / --max-instances: bounds of autoscaling; give --scaling too")
        return None, ScalingLoop()
    if args.goodput:  # the bisection replays a static cluster: its number would not be this run's
        raise ValueError("--goodput: bisects the rate on the static cluster; not with --scaling")
    spec = cfg.policies.scaling
    if spec is not None and spec.name not in (args.scaling, "none"):
        print(f"note: policies.scaling names {spec.name!r}: its params are not read for --scaling {args.scaling} "
              "(defaults and flags only)", file=sys.stderr)
    try:
        loop, params = ScalingLoop.split(spec.params if spec is not None and spec.name == args.scaling else {})
    except ValueError as e:
        raise ValueError(f"policies.scaling.params: {e}") from None
    params.pop("drain_timeout_s", None)  # live only: the simulator removes a drained instance once idle
    loop = dataclasses.replace(loop, **{k: v for k, v in (("interval_s", args.scaling_interval),
                                                           ("startup_delay_s", args.startup_delay)) if v is not None})
    params["startup_delay_s"] = loop.startup_delay_s
    for key, flag in (("min_instances", args.min_instances), ("max_instances", args.max_instances)):
        if flag is not None:
            params[key] = flag
    lo, hi = params.setdefault("min_instances", 1), params.setdefault("max_instances", 64)
    if not lo <= hi:  # type: ignore[operator]
        raise ValueError(f"--min-instances / min_instances ({lo}) must be <= --max-instances / max_instances ({hi})")
    if args.scaling == "sla":
        params.setdefault("config", cfg)
    try:
        return make_scaling_policy(args.scaling, **params), loop
    except TypeError as e:  # a param the policy does not take
        raise ValueError(f"policies.scaling.params: {e}") from None


def simulate_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="llmsched simulate", description=__doc__)
    add_workload_args(p)
    add_cluster_args(p)
    p.add_argument("--router", help="router name (default: the config's)")
    p.add_argument("--json", type=output_file, help="write the summary object here")
    p.add_argument("--png", type=figure_file, help="write latency CDFs and load over time here")
    p.add_argument("--goodput", action="store_true", help="also bisect the max rate meeting 90%% SLO attainment")
    p.add_argument("--naive", action="store_true", help="one event per engine step (reference; slow)")
    p.add_argument("--scaling", help="autoscaling policy: threshold | sla | none (default: static cluster)")
    p.add_argument("--scaling-interval", type=positive_float,
                   help="seconds between scaling decisions (default: the config's policies.scaling.params "
                        "scaling_interval_s, as the live Controller reads it; else 5)")
    p.add_argument("--startup-delay", type=nonneg_float,
                   help="seconds from an instance's start request until it takes traffic (model load; default: "
                        "the config's startup_delay_s, else 60)")
    p.add_argument("--min-instances", type=nonneg_int,
                   help="autoscaling floor per pool (default: the config's, else 1)")
    p.add_argument("--max-instances", type=positive_int,
                   help="autoscaling ceiling per pool (default: the config's, else 64)")
    p.add_argument("--ingress-poll-s", type=positive_float, metavar="S",
                   help="route on the live ingress's poll-round view, rounds S seconds apart (its refresh_s / the "
                        "engines' time scale; docs/simulator.md#routing-view); default: each instance as of its "
                        "last step's end")
    add_policy_args(p, where="in the run (and each --goodput probe)")
    add_batching_arg(p)
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    try:
        cfg = load_cluster(args)
        cfg, flags = policy_flags(cfg, args)
        trace, w = load_workload(args, cfg)
        if args.goodput:
            check_time_span(trace)  # goodput = scale x the trace's rate: a zero-span trace reads ~1e11 req/s
        router_name = args.router or cfg.policies.router.name
        params = cfg.policies.router.params if router_name == cfg.policies.router.name else {}
        try:
            params = seeded(router_name, params, args.seed)
            router = make_router(router_name, **params)
        except ValueError as e:  # say where the name / params came from
            where = "--router" if args.router else f"{args.config or 'default'}: policies.router"
            raise ValueError(f"{where}: {e}") from None
        scaling, loop = scaling_policy(args, cfg)
        rerole = cfg.policies.reroling  # (sim_policies sees the config's policies.scaling, not --scaling)
        # Each named as the user gave it: a --reroling flag is no config key (as ``sim_policies`` names it).
        check_reroling_without_scaling(None if rerole is None else f"--reroling {args.reroling}"
                                       if "reroling" in flags else f"policies.reroling ({rerole.name})",
                                       None if scaling is None else f"--scaling {args.scaling}",
                                       remedy=SIM_REROLING_REMEDY)
        policies = sim_policies(cfg, flags=flags)
        # Builds the instances: a pool without KV memory, a cluster that cannot prefill or decode fail here.
        sim = Simulator(cfg, router=router, closed_form=not args.naive, progress=not args.quiet and len(w) > 50_000,
                        scaling=scaling, scaling_interval_s=loop.interval_s, scaling_startup_s=loop.startup_delay_s,
                        scaling_options={"window_s": loop.window_s}, seed=args.seed,
                        ingress_poll_s=args.ingress_poll_s, same_instant_batching=args.same_instant_batching,
                        **policies())
    except (ConfigError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    res = sim.run(w)
    warn_over_context(cfg, w)
    summary = sim_summary(res)
    if sim.scaler is not None:
        summary["scaling"] = {"policy": args.scaling, **sim.scaler.summary()}
    summary.update(policy_stats(sim, cfg))  # (keys as compare's rows and its top level name them)
    summary["trace_source"] = getattr(trace, "source", "")
    if args.goodput:
        g = goodput(cfg, w, lambda: make_router(router_name, **params), seed=args.seed,
                    same_instant_batching=args.same_instant_batching, policies=policies,
                    ingress_poll_s=args.ingress_poll_s)
        summary["goodput_rps"], summary["goodput_capped"] = g.goodput_rps, g.capped  # capped: a lower bound
        summary["offered_rps"] = w.rate_rps
        warn_goodput(g, w.rate_rps, summary["slo_attainment"])
    if not args.quiet:
        print_summaries({f"sim {router_name}": summary},
                         title=f"trace {trace.name} ({len(w)} req) on {cfg.name} ({cfg.num_instances} instances)")
        print(
            f"wall {summary['wall_seconds']:.2f}s  events {summary['events']}  "
            f"({summary['requests_per_wall_s']:.0f} req/s, {summary['events_per_wall_s']:.0f} events/s)  "
            f"GPU util {summary['gpu_utilization'] * 100:.0f}%  cost ${summary['cost_usd']:.2f}  "
            f"preemptions {summary['preemptions']}"
            + (f"  refused {summary['rejected']}" if summary["rejected"] else "")
            + (f" (admission {summary['admission_rejected']})" if summary.get("admission_rejected") else "")
            + (f"  migrations {summary['migrations']}" if "migration" in summary else "")
            + (f"  role switches {summary['reroling']['role_switches']}" if "reroling" in summary else "")
            + (f"  goodput {'>=' if summary['goodput_capped'] else ''}{summary['goodput_rps']:.2f} req/s"
               if "goodput_rps" in summary else "")
            + (f"  GPU-hours {summary['gpu_hours']:.2f}  scale events {summary['scale_events']}  "
               f"mean instances {summary['mean_instances']:.2f}" if "scale_events" in summary else "")
        )
    if args.json:
        write_json(args.json, summary)
    if args.png:
        write_figure(
            args.png,
            {f"sim {router_name}": request_metrics(res)},
            timeline=(res.timeline_t, res.timeline_load, res.instance_ids),
            title=f"{trace.name} on {cfg.name}",
        )
        if not args.quiet:
            print(f"figure: {Path(args.png)}")
    return 0


def fit_predictor_main(argv: list[str] | None = None) -> int:
    """``llmsched predict fit-trace``: fit the trace predictor (output length given input length and tenant) on a
    deployment's own request log, in any trace format ``llmsched`` reads; score it on the log's last ``--holdout``
    share (arrival order), then refit on the whole log and write ``DIR/trace.json`` for

        policies: {predictor: {name: trace, params: {artifacts: DIR, tenant: NAME}}}

    The shipped trace predictor was fitted on public traces (Azure, Mooncake, arXiv); a deployment's own mix can
    map input length to output length quite differently (e.g. long prompts with short answers)."""
    from scheduler.predict.data import Record
    from scheduler.predict.metrics import evaluate
    from scheduler.predict.trace import fit_trace, split_pairs
    from sim.traces import load_trace

    p = argparse.ArgumentParser(prog="llmsched predict fit-trace", description=fit_predictor_main.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trace", required=True, help="request log / trace file (.gz ok)")
    p.add_argument("--format", help="trace format when auto-detection is not wanted")
    p.add_argument("--limit", type=positive_int, help="use only the first N requests")
    p.add_argument("--tenant", help="app name for every request (default: the trace's model column, else its name)")
    p.add_argument("--holdout", type=float, default=0.2, help="last share of each tenant's requests scored, in (0, 1)")
    p.add_argument("--out", type=output_dir, required=True, help="artifact folder to write trace.json into")
    p.add_argument("--json", type=output_file, help="write the held-out metrics here")
    args = p.parse_args(argv)
    if not 0 < args.holdout < 1:
        print(f"error: --holdout: must be in (0, 1), got {args.holdout}", file=sys.stderr)
        return 2
    try:
        trace = load_trace(args.trace, args.format)  # limit= would keep the first N *rows*: N arrivals, as simulate
        if args.limit:
            trace = trace.head(args.limit)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.tenant:
        tenants = [args.tenant] * len(trace)
    elif trace.tenant is not None:
        tenants = [str(t) for t in trace.tenant]
    else:
        tenants = [trace.name] * len(trace)
    pairs: dict[str, list[tuple[int, int]]] = {}
    for t, a, b in zip(tenants, trace.prompt_tokens.tolist(), trace.output_tokens.tolist(), strict=True):
        pairs.setdefault(t, []).append((int(a), int(b)))
    train, test = split_pairs(pairs, args.holdout)
    # A tenant too small to split (BurstGPT logs have a few-request model or two) is fitted, not scored.
    small = sorted(t for t in pairs if not train[t] or not test[t])
    for t in small:
        train[t], test[t] = pairs[t], []
    if not any(test.values()):
        print(f"error: --trace: too few requests per tenant to hold out {args.holdout:g} of them", file=sys.stderr)
        return 2
    held_out = [Record(None, a, b, t, source=t) for t, rows in test.items() for a, b in rows]
    metrics = evaluate(fit_trace(train), held_out)
    # Kendall's tau is undefined when the held-out lengths are all equal: NaN is not JSON, the report writes null.
    metrics = {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in metrics.items()}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    fit_trace(pairs).save(out / "trace.json")  # the artifact uses the whole log
    report = {"trace": trace.name, "trace_source": getattr(trace, "source", ""), "requests": len(trace),
              "tenants": {t: len(rows) for t, rows in pairs.items()}, "holdout": args.holdout,
              "not_scored": small,
              "held_out": metrics, "artifact": str(out / "trace.json")}
    print(f"trace {trace.name}: {len(trace)} requests, tenants {', '.join(sorted(pairs))}")
    tau = "undefined" if metrics["kendall_tau"] is None else f"{metrics['kendall_tau']:.3f}"
    print(f"held-out last {args.holdout:.0%}: n {metrics['n']}  Kendall tau {tau}  "
          f"bucket accuracy {metrics['bucket_accuracy']:.3f}  MAE {metrics['mae_tokens']:.1f} tokens")
    # The tenant that most of the log's requests came from (it named the alphabetically first: a one-request model)
    main = max(sorted(pairs), key=lambda t: len(pairs[t]))
    others = f" (or tenant: one of {', '.join(t for t in sorted(pairs) if t != main)})" if len(pairs) > 1 else ""
    print(f"wrote {out / 'trace.json'}; use policies.predictor: {{name: trace, params: {{artifacts: {out}, "
          f"tenant: {main}}}}}{others}")
    if args.json:
        write_json(args.json, report)
    return 0
