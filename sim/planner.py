"""Capacity planning: the cheapest cluster that serves a trace within its SLOs (``llmsched plan``).

Search space: GPU type x TP degree x layout (colocated MIXED pool, or PREFILL + DECODE pools, with ``--hetero-pd``
also on two different GPU types / TPs) x router. For each candidate the instance counts are searched on "SLO
attainment >= target at the trace's rate" (attainment grows with instances): O(log N) simulations each. The
analytic pass of ``scheduler.policy.placement`` (``instance_profile``: memory and TP feasibility, per-instance
prefill / decode / colocated capacity under the SLO, the same capacity model the SLA autoscaler sizes pools with)
decides which (GPU, TP) can hold the model at all, where the count search starts (its instance estimate), the
prefill share a ``pd:auto`` layout starts from, and which heterogeneous pairs are worth simulating
(``enumerate_placements``: dominated ones are pruned). The search runs both ways from the estimate, so an estimate
that is off costs simulations, never the smallest count; a P/D answer is sized pool by pool. Each answer's headroom
is found by bisection on rate (DistServe's goodput); the Pareto plot keeps what a dollar more buys in it. Runs in
parallel across cores.

NOTE: the search used to start at a floor from a throughput bound meant to be optimistic ("fewer cannot keep
up": prefill at full-chunk speed, decode at a batch of 64). It was not: max_num_seqs admits larger batches, and
on the committed Azure plan (first 6,000 requests at 16x) the floor's count was itself the answer on every
cheapest candidate -- 9 H200 where 7 meet the target, 23 A100 where 20 do.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import yaml

from scheduler.cli_args import output_dir, positive_int
from scheduler.config.gpus import catalog_key, catalog_names
from scheduler.config.load import ConfigError
from scheduler.config.models import ClusterConfig, GPUSpec, PolicySpec, PoolSpec
from scheduler.core.types import SLO, InstanceRole
from scheduler.deploy.k8s import KubernetesError
from scheduler.policy.placement import (
    InstanceProfile,
    enumerate_placements,
    instance_profile,
    pair_prefill_rps,
    within_catalog,
)
from scheduler.policy.scaling import WorkloadSummary, instances_for, tightest_slo
from sim.cluster import build_instances, latency_factory
from sim.commands import (
    add_cluster_args,
    add_workload_args,
    check_time_span,
    comma_list,
    load_cluster,
    load_workload,
    warn_over_context,
)
from sim.compare import router_factory, router_params
from sim.goodput import goodput
from sim.metrics import request_metrics
from sim.policies import add_policy_args, flag_named, policy_flags, policy_specs, sim_policies
from sim.simulator import Simulator, Workload


@dataclass(frozen=True)
class Candidate:
    gpu: str  # of the MIXED pool, or of the PREFILL pool
    tp: int
    layout: str  # "mixed", "pd:<prefill share>" or "pd:auto=<share>" (the share the analytic profile suggested)
    router: str
    decode_gpu: str = ""  # a P/D layout's DECODE pool on another GPU type / TP ("" / 0: the prefill pool's)
    decode_tp: int = 0

    @property
    def decode_on(self) -> tuple[str, int]:
        return self.decode_gpu or self.gpu, self.decode_tp or self.tp

    @property
    def hardware(self) -> str:
        """``gpu TPn``, or ``prefill-gpu TPn / decode-gpu TPm`` when the pools differ."""
        g, t = self.decode_on
        return f"{self.gpu} TP{self.tp}" + (f" / {g} TP{t}" if (g, t) != (self.gpu, self.tp) else "")

    @property
    def prefill_share(self) -> float | None:
        """The share of instances that prefill where the P/D count search starts; None for a colocated (MIXED)
        layout."""
        if self.layout == "mixed":
            return None
        return float(self.layout.split(":", 1)[1].removeprefix("auto="))


@dataclass
class PlanResult:
    candidate: Candidate
    instances: int  # total instances (0 = infeasible within max)
    prefill: int
    decode: int
    gpus: int
    cost_per_hour: float
    attainment: float
    ttft_p99_s: float | None
    tpot_p99_s: float | None
    estimate: int | None = None  # the analytic instance count the search started from
    simulations: int = 0  # runs the search took
    max_rate_rps: float | None = None  # the most this cluster serves at the target (rate bisection), >= the trace's
    max_rate_capped: bool = False  # the bisection's 2x ceiling still met the target: max_rate_rps is a lower bound
    infeasible: str = ""  # instances == 0: why no count was found (``plan_one``), as the progress lines say it

    @property
    def counts(self) -> tuple[int, ...]:
        """What ``make_config`` takes: ``(instances,)`` colocated, ``(prefill, decode)`` disaggregated."""
        return (self.instances,) if self.candidate.prefill_share is None else (self.prefill, self.decode)


def template_for(base: ClusterConfig, role: InstanceRole) -> PoolSpec:
    """The base config's pool a planned pool of ``role`` copies all but its name, role, hardware and count from
    (backend, engine settings, timeouts): its first pool in that role (a P/D template's prefill chunk budget stays
    on its PREFILL pool), else its first pool. Only the engine was copied: planned on a vLLM config, the written
    best-cluster.yaml served simulated engines with default timeouts."""
    return next((p for p in base.pools if p.role == role), base.pools[0])


def make_config(base: ClusterConfig, c: Candidate, counts: tuple[int, ...]) -> ClusterConfig:
    """``base`` with the candidate's pools: ``(n,)`` MIXED instances, or ``(prefill, decode)`` instances."""

    def pool(name: str, role: InstanceRole, gpu: str, tp: int, count: int) -> PoolSpec:
        return template_for(base, role).model_copy(
            update={"name": name, "role": role, "gpu": gpu, "tp": tp, "count": count})

    if c.prefill_share is None:
        (n,) = counts
        pools = [pool(f"{c.gpu}-tp{c.tp}", InstanceRole.MIXED, c.gpu, c.tp, n)]
    else:
        p, d = counts
        dg, dt = c.decode_on
        pools = [pool(f"prefill-{c.gpu}", InstanceRole.PREFILL, c.gpu, c.tp, p),
                 pool(f"decode-{dg}", InstanceRole.DECODE, dg, dt, d)]
    label = "-".join(map(str, counts))
    hw = c.hardware.lower().replace(" / ", "-").replace(" ", "-")
    # The router the candidate is simulated with (router_factory reads it from here: the base config's params when
    # it is the base config's router, under those a --routers entry sets, name:key=value as compare takes them):
    # the written best-cluster.yaml runs the cluster the table measured, with a router name serve knows.
    name, params = router_params(c.router, base)
    update: dict[str, object] = {"router": PolicySpec(name=name, params=params)}
    if c.prefill_share is None:  # re-roling moves PREFILL <-> DECODE: a MIXED cluster has none (serve refuses it)
        update["reroling"] = None
    policies = base.policies.model_copy(update=update)
    router = re.sub(r"[^A-Za-z0-9_.-]+", "-", c.router)  # llumnix:metric=remaining_steps -> llumnix-metric-...
    return base.model_copy(update={"pools": pools, "policies": policies,
                                   "name": f"plan-{hw}-{c.layout}-{router}-{label}"})


def price_and_gpus(cfg: ClusterConfig) -> tuple[float, int]:
    """$/h and GPUs of a cluster's pools."""
    return (sum(cfg.gpus[p.gpu].price_per_hour * p.tp * p.count for p in cfg.pools),
            sum(p.tp * p.count for p in cfg.pools))


def within_inventory(base: ClusterConfig, c: Candidate, counts: tuple[int, ...]) -> bool:
    """Whether the pools of ``c`` at ``counts`` fit the GPUs of a type the config has (``gpus.<key>.count``, 0 =
    unbounded, in nodes of ``gpus_per_node``): the analytic pass's rule (``placement.within_catalog``)."""
    hw = [(c.gpu, c.tp)] if c.prefill_share is None else [(c.gpu, c.tp), c.decode_on]
    return within_catalog(((g, tp, n) for (g, tp), n in zip(hw, counts, strict=True)), base.gpus)


def split(n: int, share: float) -> tuple[int, int]:
    """``n`` instances as (prefill, decode) at ``share`` prefilling, at least one of each."""
    p = max(1, min(n - 1, round(n * share)))
    return p, n - p


# A (GPU, TP) must hold KV for this many max-length requests: one alone would serve a batch of one.
MIN_KV_REQUESTS = 4


def kv_need(base: ClusterConfig, role: InstanceRole) -> int:
    """KV tokens an instance of ``role`` must hold to be planned: ``MIN_KV_REQUESTS`` max-length requests where it
    decodes (its batch is the requests it holds, each to its last token); a PREFILL instance one max-length prompt
    (vLLM's own start-up check) -- its batch is the chunk budget, and it keeps a prompt's KV only until the DECODE
    side has it. With the DECODE rule on it, a P/D template whose PREFILL pool holds one 2,048-token request was
    "fits on none", though the simulator serves it."""
    return base.model.max_model_len * (1 if role == InstanceRole.PREFILL else MIN_KV_REQUESTS)


def summary_of(w: Workload) -> WorkloadSummary:
    """The workload as the analytic capacity model sees it: arrival rate, mean lengths and its priority classes."""
    return WorkloadSummary(w.rate_rps, float(np.mean(w.prompt_tokens)), float(np.mean(w.output_tokens)),
                           priorities=tuple(int(p) for p in np.unique(w.priorities)))


def sized_slo(base: ClusterConfig, w: WorkloadSummary) -> SLO:
    """The SLO the analytic pass sizes an instance for: the tightest of the trace's classes, as the SLA scaler sizes
    pools (``scaling.tightest_slo``; the simulated pass scores each request against its own class's). Class 0's
    alone sized a trace whose tight class was not class 0 for the looser SLO: a low estimate, a prefill-heavy
    ``pd:auto`` share."""
    return tightest_slo(base.slo_for, w.priorities or (0,))


def default_gpus(base: ClusterConfig) -> list[str]:
    """The GPU types a plan considers without --gpus: the config's catalog but its CPU (a CPU-only config plans
    its cpu)."""
    return [g for g in base.gpus if g != "cpu"] or list(base.gpus)


def latency_sources(base: ClusterConfig, keys: list[str], tps: tuple[int, ...]) -> dict[str, list[str]]:
    """``gpu TPn`` grouped by the kind of latency model the simulator uses for it (profiled table, roofline, one
    measured profile): a plan that mixes kinds compares GPU types at different fidelity."""
    out: dict[str, list[str]] = {}
    timed = latency_factory(base)
    for g in keys:
        for tp in tps:
            src = timed(base.model, base.gpus[g], tp).source
            kind = "roofline" if src == "roofline" else src.split("+", 1)[0]
            out.setdefault(kind, []).append(f"{g} TP{tp}")
    return out


def _analytic(base: ClusterConfig, role: InstanceRole = InstanceRole.MIXED) -> dict:
    """The planner's terms for ``placement``'s analytic pass on an instance of ``role``: the engine settings of the
    pool ``make_config`` builds for that role (``template_for``), the latency model the simulator uses, and
    ``kv_need`` as the feasibility rule. The first pool's engine for every role sized a P/D template's decode pool
    with its prefill pool's settings (and fitted it by its KV)."""
    return {"engine": template_for(base, role).engine, "max_context_tokens": kv_need(base, role),
            "latency_factory": latency_factory(base)}


def profile(base: ClusterConfig, gpu: str, tp: int, w: WorkloadSummary,
            role: InstanceRole = InstanceRole.MIXED) -> InstanceProfile | None:
    """One ``role`` instance's analytic capacity for ``w`` under ``sized_slo`` (``placement.instance_profile``,
    ``_analytic``'s terms); None when the model does not fit: weights plus ``kv_need`` tokens of KV, and heads
    split evenly over ``tp``."""
    return instance_profile(base.model, base.gpus[gpu], tp, sized_slo(base, w), w, **_analytic(base, role))


def role_profiles(base: ClusterConfig, c: Candidate,
                  w: WorkloadSummary) -> tuple[InstanceProfile | None, InstanceProfile | None]:
    """``c``'s instances as ``estimate`` and ``auto_share`` take them, each on its own hardware and from its own
    role's template: (MIXED, None) colocated, (PREFILL, DECODE) disaggregated; (None, None) when one of them does
    not fit."""
    if c.prefill_share is None:
        return profile(base, c.gpu, c.tp, w), None
    pre = profile(base, c.gpu, c.tp, w, InstanceRole.PREFILL)
    dec = profile(base, *c.decode_on, w, InstanceRole.DECODE)
    return (pre, dec) if pre is not None and dec is not None else (None, None)


def estimate(prof: InstanceProfile | None, c: Candidate, rate: float,
             decode: InstanceProfile | None = None) -> int | None:
    """The analytic instance count for ``c`` at ``rate`` (where the count search starts); None: the model says
    no count serves it (the simulator may still find one: it is a guess from mean lengths). ``prof`` is the MIXED
    or PREFILL pool's instance, ``decode`` the DECODE pool's (``role_profiles``; None: ``prof`` decodes too)."""
    if prof is None:
        return None
    share = c.prefill_share
    if share is None:
        return instances_for(rate, prof.mixed_rps)
    # PREFILL + DECODE: the share fixes the split, so the count is set by the pool that runs out first.
    pre, dec = _phase_rps(prof, decode)
    if pre <= 0 or dec <= 0:
        return None
    # At least one instance of each pool (``split``): the search starts there, and plan.json reports this as where.
    return max(2, math.ceil(max(rate / (share * pre), rate / ((1 - share) * dec)) - 1e-9))


def _phase_rps(prefill: InstanceProfile, decode: InstanceProfile | None) -> tuple[float, float]:
    return pair_prefill_rps(prefill, decode or prefill), (decode or prefill).decode_rps


def auto_share(prof: InstanceProfile | None, decode: InstanceProfile | None = None) -> float | None:
    """The prefill share the analytic profile suggests: instances in proportion to each phase's per-instance time
    (``1 / prefill capacity`` : ``1 / decode capacity``; the decode side from ``decode``, the DECODE pool's
    instance, when given), clipped to [0.05, 0.95]; None when it cannot say."""
    if prof is None:
        return None
    pre, dec = _phase_rps(prof, decode)
    if pre <= 0 or dec <= 0:
        return None
    return min(max(dec / (pre + dec), 0.05), 0.95)


def refused_anywhere(base: ClusterConfig, c: Candidate, w: Workload) -> tuple[int, str]:
    """Requests of ``w`` that no count of ``c``'s instances serves, and the KV they outgrow: the simulator refuses a
    request whose context its engine's KV cannot hold at all (``EngineModel.check_request``) -- a PREFILL instance
    its prompt and first token, a DECODE or MIXED one its whole context (a P/D request runs on a PREFILL instance
    from start to end at most, where that holds more)."""
    counts = (1,) if c.prefill_share is None else (1, 1)
    kv = {x.role: x.engine.total_blocks * x.engine.block_size for x in build_instances(make_config(base, c, counts))}
    prompt = np.asarray(w.prompt_tokens, dtype=np.int64)
    context = prompt + np.asarray(w.output_tokens, dtype=np.int64)
    if c.prefill_share is None:
        held = kv[InstanceRole.MIXED]
        return int((context > held).sum()), f"{held} tokens"
    pre, dec = kv[InstanceRole.PREFILL], kv[InstanceRole.DECODE]
    return int(((prompt + 1 > pre) | (context > max(pre, dec))).sum()), f"{pre} tokens prefill, {dec} decode"


def _evaluate(base: ClusterConfig, c: Candidate, counts: tuple[int, ...], w: Workload, *,
              seed: int = 0) -> tuple[float, dict]:
    cfg = make_config(base, c, counts)
    policies = sim_policies(cfg)  # the base config's migration / re-roling, as simulate runs them
    res = Simulator(cfg, router=router_factory(c.router, cfg, seed)(), seed=seed, **policies()).run(w)
    m = request_metrics(res)
    return float(m.slo_met.mean()), {
        "ttft_p99_s": float(np.nanpercentile(m.ttft_s, 99)) if np.isfinite(m.ttft_s).any() else None,
        "tpot_p99_s": float(np.nanpercentile(m.tpot_s, 99)) if np.isfinite(m.tpot_s).any() else None,
    }


def smallest(ok: Callable[[int], bool], start: int, lo: int, hi: int) -> int | None:
    """The smallest ``n`` in ``[lo, hi]`` with ``ok(n)`` (assumed monotone), None if none: from ``start`` walk down
    (steps doubling) while it holds or up until it does, then bisect the bracket."""
    n = min(max(start, lo), hi)
    if ok(n):
        best, step = n, 1
        while best > lo:
            n = max(lo, best - step)
            if not ok(n):
                lo = n + 1
                break
            best, step = n, step * 2
    else:
        best, lo, step = None, n + 1, 1
        while best is None and n < hi:
            n = min(n + step, hi)
            if ok(n):
                best = n
            else:
                lo, step = n + 1, step * 2
        if best is None:
            return None
    hi = best
    while lo < hi:
        mid = (lo + hi) // 2
        if ok(mid):
            hi = mid
        else:
            lo = mid + 1
    return hi


def plan_one(base: ClusterConfig, c: Candidate, w: Workload, *, target: float, max_instances: int,
             seed: int = 0) -> PlanResult:
    """The fewest instances of ``c`` whose simulated SLO attainment on ``w`` meets ``target``.

    Colocated: the smallest count, searched from the analytic estimate. Disaggregated: first the smallest total at
    the candidate's prefill share, then each pool alone down to the fewest that still meet the target with the
    other fixed -- the share is where the search starts, the two counts are its answer (at a fixed share the
    rounding of ``n * share`` makes attainment jump up and down with ``n``). No count found: a result with 0
    instances, ``infeasible`` saying why -- requests an instance cannot hold (no simulation: more instances do not
    help), the GPU inventory, or ``max_instances``. ``seed``: every simulation's host-noise draws (``--seed``).
    """
    ws = summary_of(w)
    refused, kv = refused_anywhere(base, c, w)
    n_req = len(w.prompt_tokens)
    if n_req - refused < target * n_req:  # each refused request misses its SLO, at any count
        why = (f"{refused} of {n_req} requests need more KV than an instance holds ({kv}; the simulator refuses them "
               f"at any count): at most {(n_req - refused) / n_req:.3f} attainment; a larger GPU, TP or num_kv_blocks")
        return PlanResult(c, 0, 0, 0, 0, 0.0, 0.0, None, None, infeasible=why)
    prof, dec = role_profiles(base, c, ws)
    guess = estimate(prof, c, ws.rate_rps, dec)
    seen: dict[tuple[int, ...], tuple[float, dict]] = {}

    def run(counts: tuple[int, ...]) -> tuple[float, dict]:
        if counts not in seen:
            seen[counts] = _evaluate(base, c, counts, w, seed=seed)
        return seen[counts]

    def ok(counts: tuple[int, ...]) -> bool:
        return run(counts)[0] >= target

    share = c.prefill_share
    # The count search's ceiling: --max-instances, and no more GPUs of a type than the config has (counts past
    # the inventory are neither simulated nor treated as "missed", which would send the walk the wrong way).
    as_counts = (lambda k: (k,)) if share is None else (lambda k: split(k, share))
    asked = max_instances
    max_instances = max((k for k in range(1, max_instances + 1) if within_inventory(base, c, as_counts(k))),
                        default=0)
    least = 1 if share is None else 2  # a P/D cluster is one instance of each pool at least
    n = smallest(lambda k: ok(as_counts(k)), guess or least, least, max_instances) if max_instances >= least else None
    if n is None:
        if max_instances < least:
            why = f"the GPU inventory (gpus.<key>.count) holds no {c.hardware} cluster of {least} instances"
        else:
            # More instances might serve it only where the search stopped at --max-instances; say how close it got.
            ceiling = (f"within --max-instances ({asked})" if max_instances == asked else
                       f"within the {max_instances} instances the GPU inventory (gpus.<key>.count) holds")
            why = f"infeasible {ceiling}: attainment {run(as_counts(max_instances))[0]:.3f} at {max_instances}"
        return PlanResult(c, 0, 0, 0, 0, 0.0, 0.0, None, None, guess, len(seen), infeasible=why)
    best: tuple[int, ...]
    if share is None:
        best = (n,)
    else:
        p, d = split(n, share)
        p = smallest(lambda k: ok((k, d)), p, 1, p) or p
        d = smallest(lambda k: ok((p, k)), d, 1, d) or d
        best = (p, d)
    a, info = run(best)
    cfg = make_config(base, c, best)
    price, gpus = price_and_gpus(cfg)
    pd = best if share is not None else (0, 0)  # MIXED instances are neither
    # DistServe's measure of the answer: the highest rate it keeps at the target, by bisection on the trace's rate
    # -- the headroom a plan sized for this trace has. 1x is known to pass; capped at 2x (a smallest cluster has
    # less unless it is one instance); 5 steps in log space: within 2.2% below the true figure.
    g = goodput(cfg, w, router_factory(c.router, cfg, seed), target=target, lo=1.0, hi=2.0, iters=5, seed=seed,
                policies=sim_policies(cfg))
    return PlanResult(c, sum(best), *pd, gpus, price, a, info["ttft_p99_s"], info["tpot_p99_s"], guess,
                      len(seen) + g.probes, g.goodput_rps, max_rate_capped=g.scale >= 2.0)


def with_gpus(base: ClusterConfig, names: list[str]) -> tuple[ClusterConfig, list[str]]:
    """``base`` with every GPU type of ``names`` it lacks taken from the catalog, and the keys to plan over.

    Raises:
        ValueError: a name neither in the config nor in the catalog (the message names ``--gpus``).
    """
    keys, extra = [], {}
    for raw in (n.strip() for n in names):
        if not raw:
            continue
        if raw in base.gpus:
            keys.append(raw)
            continue
        key = catalog_key(raw)
        if key is None:
            raise ValueError(f"--gpus: unknown GPU type {raw!r}; config has {', '.join(sorted(base.gpus))}, "
                             f"catalog: {', '.join(catalog_names())}")
        if key not in base.gpus:
            extra[key] = GPUSpec.from_catalog(key)
        keys.append(key)
    if not keys:
        raise ValueError("--gpus: no GPU type given")
    return (base.model_copy(update={"gpus": {**base.gpus, **extra}}) if extra else base), keys


def with_inventory(base: ClusterConfig, keys: list[str], have: dict[str, int]) -> tuple[ClusterConfig, list[str]]:
    """``base`` with the ``count`` of each GPU type of ``keys`` set to the GPUs of that type a cluster has (``have``,
    e.g. :func:`scheduler.deploy.k8s.read_gpu_inventory`'s usable GPUs per type), and the keys it has any of.
    The count search then stays within them as it does within a config's own ``gpus.<key>.count``.

    Raises:
        ValueError: the cluster has none of ``keys`` (the message names ``--k8s-inventory``).
    """
    counts: dict[str, int] = {}
    for name, n in have.items():
        key = catalog_key(name) or name
        counts[key] = counts.get(key, 0) + n
    usable = [k for k in keys if counts.get(k, 0) > 0]
    if not usable:
        has = ", ".join(f"{k} x {n}" for k, n in sorted(counts.items()) if n) or "no usable GPU"
        raise ValueError(f"--k8s-inventory: the cluster has none of {', '.join(keys)} (it has: {has})")
    gpus = {**base.gpus, **{k: base.gpus[k].model_copy(update={"count": counts[k]}) for k in usable}}
    return base.model_copy(update={"gpus": gpus}), usable


def hetero_pairs(base: ClusterConfig, keys: list[str], tps: tuple[int, ...], ws: WorkloadSummary, *,
                 max_instances: int) -> list[tuple[tuple[str, int], tuple[str, int]]]:
    """(prefill (gpu, tp), decode (gpu, tp)) pairs on different hardware worth simulating (Splitwise: each phase on
    the GPU that does it best per dollar): the analytic pass over both roles (``placement.enumerate_placements``,
    with the planner's feasibility rule) keeps only P/D clusters no other is cheaper than with at least as much
    capacity; of those, the ones whose pools differ."""
    roles = (InstanceRole.PREFILL, InstanceRole.DECODE)
    terms = {r: _analytic(base, r) for r in roles}  # each pool sized and fitted by its own role's template
    found = enumerate_placements({k: base.gpus[k] for k in keys}, base.model, sized_slo(base, ws), ws, tp_choices=tps,
                                 modes=("disaggregated",), extra=0, max_instances=max_instances,
                                 engine={r: terms[r]["engine"] for r in roles},
                                 max_context_tokens={r: terms[r]["max_context_tokens"] for r in roles},
                                 latency_factory=latency_factory(base))
    out: list[tuple[tuple[str, int], tuple[str, int]]] = []
    for cand in found:
        pre, dec = cand.pools
        pair = ((pre.gpu, pre.tp), (dec.gpu, dec.tp))
        if pair[0] != pair[1] and pair not in out:
            out.append(pair)
    return out


def _plan_star(args):
    return plan_one(*args[:3], target=args[3], max_instances=args[4], seed=args[5])


def plan(
    base: ClusterConfig,
    w: Workload,
    *,
    gpus: list[str] | None = None,
    tps: tuple[int, ...] = (1, 2, 4, 8),
    layouts: tuple[str, ...] = ("mixed", "pd:auto"),
    routers: tuple[str, ...] = ("least_outstanding",),
    target: float = 0.9,
    max_instances: int = 64,
    workers: int = 2,
    hetero_pd: bool = False,
    progress: Callable[[int, int, PlanResult], None] | None = None,
    seed: int = 0,
) -> list[PlanResult]:
    """All feasible candidates, cheapest first. ``progress(done, total, result)`` after each candidate.
    A ``pd:auto`` layout becomes ``pd:auto=<share>`` per (GPU, TP), the share from its analytic profile.
    ``hetero_pd``: also P/D clusters whose DECODE pool runs on another GPU type or TP (``hetero_pairs``), at the
    share their two profiles suggest. ``seed``: the simulations' host-noise draws (``--seed``)."""
    ws = summary_of(w)
    keys = gpus or default_gpus(base)
    cands = []
    short = []  # (GPU, TP) of which the GPU inventory (gpus.<key>.count, --k8s-inventory) holds no instance
    for g in keys:
        for tp in tps:
            if not base.gpus[g].holds([tp]):
                per_node = base.gpus[g].gpus_per_node
                short.append(f"{g} TP{tp} (" + (f"gpus_per_node {per_node}" if per_node else
                                                 f"count {base.gpus[g].count}") + ")")
                continue
            for lay in layouts:
                # Each layout fits, and pd:auto takes its share, by its own roles' templates (``role_profiles``).
                probe = Candidate(g, tp, "pd:0.5" if lay == "pd:auto" else lay, "")
                prof, dec = role_profiles(base, probe, ws)
                if prof is None:
                    continue
                if lay == "pd:auto":
                    share = auto_share(prof, dec)
                    if share is None:
                        continue
                    lay = f"pd:auto={share:.2f}"
                cands += [Candidate(g, tp, lay, r) for r in routers if Candidate(g, tp, lay, r) not in cands]
    if hetero_pd:
        for (g, tp), (dg, dt) in hetero_pairs(base, keys, tps, ws, max_instances=max_instances):
            share = auto_share(*role_profiles(base, Candidate(g, tp, "pd:0.5", "", dg, dt), ws))
            if share is not None:
                cands += [Candidate(g, tp, f"pd:auto={share:.2f}", r, dg, dt) for r in routers]
    if not cands:
        fit = (f"{base.model.name} fits on none of {', '.join(keys)} at TP {', '.join(map(str, tps))} (weights plus "
               f"KV for {MIN_KV_REQUESTS} requests of {base.model.max_model_len} tokens, one on a PREFILL instance, "
               f"with each role's engine settings; or no prefill share for --layouts {','.join(layouts)})")
        # Named apart: "fits on none" of a GPU type the model fits on, when its inventory was the reason, misled.
        held = f"the GPU inventory (gpus.<key>.count) holds no instance of {', '.join(short)}"
        raise ValueError("--gpus/--tp: " + (held if len(short) == len(keys) * len(tps) else
                                             f"{fit}; {held}" if short else fit))
    jobs = [(base, c, w, target, max_instances, seed) for c in cands]
    results: list[PlanResult] = []

    def collect(it) -> None:
        for r in it:
            results.append(r)
            if progress is not None:
                progress(len(results), len(jobs), r)

    if workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(max_workers=workers) as ex:
            collect(ex.map(_plan_star, jobs))
    else:
        collect(_plan_star(j) for j in jobs)
    feasible = [r for r in results if r.instances > 0]
    return sorted(feasible, key=lambda r: (r.cost_per_hour, -r.attainment))


def _headroom(r: PlanResult) -> float:
    return r.max_rate_rps if r.max_rate_rps is not None else r.attainment


def pareto(results: list[PlanResult]) -> list[PlanResult]:
    """Drop configurations that cost more without more headroom (``max_rate_rps``: every result already meets the
    target, so what a dearer one can add is rate it still serves at it). Headroom at the bisection's 2x ceiling is
    a lower bound: the front stops there (what lies beyond it was not measured)."""
    out: list[PlanResult] = []
    best = -1.0
    for r in sorted(results, key=lambda r: (r.cost_per_hour, -_headroom(r))):
        if _headroom(r) > best:
            out.append(r)
            best = _headroom(r)
        if r.max_rate_capped and out and out[-1] is r:
            break
    return out


def check_policies(base: ClusterConfig, layouts: tuple[str, ...], *, flags: tuple[str, ...] = ()) -> None:
    """Fail fast on the base config's ``policies.migration`` / ``policies.reroling``, which every candidate's
    simulations run (``_evaluate``), re-roling the P/D candidates' only (``make_config``): checked on the base's
    first pool as a P/D pair, as a P/D candidate will run it. Says so when MIXED layouts run without it."""
    reroling = base.policies.reroling is not None
    pools = base.pools
    if reroling:
        pools = [base.pools[0].model_copy(update={"name": r.value, "role": r})
                 for r in (InstanceRole.PREFILL, InstanceRole.DECODE)]
    sim_policies(base.model_copy(update={"pools": pools}), flags=flags)
    if reroling and "mixed" in layouts:
        print("note: " + flag_named("policies.reroling: applied to the P/D candidates only (a MIXED pool has no "
                                    "roles to move; its best-cluster.yaml leaves it out)", "reroling", flags),
              file=sys.stderr)


def parse_tps(s: str) -> tuple[int, ...]:
    out = []
    for x in comma_list("--tp", s):
        if not x.isdigit() or int(x) < 1:
            raise ValueError(f"--tp: expected comma-separated integers >= 1, got {x!r}")
        out.append(int(x))
    return tuple(out)


def parse_layouts(s: str) -> tuple[str, ...]:
    """``mixed``, ``pd:<share>`` (the share of instances that prefill, strictly between 0 and 1) or ``pd:auto``."""
    for x in comma_list("--layouts", s):
        if x in ("mixed", "pd:auto"):
            continue
        kind, _, share = x.partition(":")
        try:
            ok = kind == "pd" and 0.0 < float(share) < 1.0  # make_config would clamp a share outside silently
        except ValueError:
            ok = False
        if not ok:
            raise ValueError(f"--layouts: expected 'mixed', 'pd:auto' or 'pd:<prefill share in (0, 1)>', got {x!r}")
    return tuple(comma_list("--layouts", s))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="llmsched plan", description=__doc__)
    add_workload_args(p)
    # Refused below (the planner sizes the pools itself): say so in --help, not "override the instance count".
    add_cluster_args(p, instances_help="not for plan: it searches the instance counts (see --max-instances)")
    p.add_argument("--gpus", help="comma-separated GPU types to consider (default: all in the config's catalog)")
    p.add_argument("--tp", help="comma-separated tensor-parallel degrees (default: those of 1,2,4,8 the model's "
                                "attention heads split over)")
    p.add_argument("--layouts", default="mixed,pd:auto",
                   help="comma-separated layouts: 'mixed' (one colocated pool), 'pd:<share>' (PREFILL + DECODE "
                        "pools; the count search starts with <share> of the instances prefilling, 0 < share < 1, "
                        "and then sizes each pool) or 'pd:auto' (the starting share from the analytic capacity of "
                        "each GPU type and TP); default: %(default)s")
    p.add_argument("--hetero-pd", action="store_true",
                   help="also P/D clusters whose DECODE pool runs on another GPU type or TP than the PREFILL pool "
                        "(Splitwise); only pairs the analytic pass does not dominate are simulated")
    p.add_argument("--k8s-inventory", action="store_true",
                   help="plan within the GPUs the Kubernetes cluster has now: usable nvidia.com/gpu of Ready, "
                        "schedulable nodes per GPU type (in-cluster service account, else the kubeconfig; the "
                        "chart's ClusterRole grants the node list); GPU types it has none of are not planned")
    p.add_argument("--kube-context", help="kubeconfig context for --k8s-inventory (default: the current one)")
    p.add_argument("--routers", default="least_outstanding",
                   help="comma-separated router names; name:key=value[:key=value] sets a router parameter "
                   "(llumnix:metric=remaining_steps) as compare takes it, the entry naming its candidates")
    p.add_argument("--target", type=float, default=0.9, help="SLO attainment to meet, in (0, 1]")
    p.add_argument("--max-instances", type=positive_int, default=64,
                   help="the count search's ceiling, instances per candidate (default: %(default)s)")
    p.add_argument("--workers", type=positive_int, default=2,
                   help="candidates simulated in parallel, one process each (default: %(default)s)")
    p.add_argument("--out", type=output_dir, default="plan-out",
                   help="folder for plan.json, pareto.png and best-cluster.yaml")
    add_policy_args(p, where="in every candidate's simulations")
    args = p.parse_args(argv)
    if not 0 < args.target <= 1:  # NaN fails too
        p.error(f"--target: SLO attainment must be in (0, 1], got {args.target}")
    if args.instances is not None:  # the planner sizes the pools itself; the config's counts are not read
        p.error("--instances: plan searches the instance counts (see --max-instances); not with --instances")
    try:
        tps, layouts = parse_tps(args.tp or "1,2,4,8"), tuple(dict.fromkeys(parse_layouts(args.layouts)))
        routers = tuple(dict.fromkeys(comma_list("--routers", args.routers)))
        base = load_cluster(args)
        base, flags = policy_flags(base, args)
        check_policies(base, layouts, flags=flags)
        if args.tp is None:  # the default list: the degrees this model splits over
            tps = tuple(tp for tp in tps if base.model.splits_over(tp))
        odd = [tp for tp in tps if not base.model.splits_over(tp)]
        if odd:
            raise ValueError(f"--tp: {base.model.name}'s {base.model.num_heads} attention / "
                             f"{base.model.num_kv_heads} KV heads do not split over {', '.join(map(str, odd))} GPUs")
        for r in routers:
            try:
                router_factory(r, base)()  # fail fast on unknown names
            except ValueError as e:
                raise ValueError(f"--routers: {e}") from None
        gpus = None
        if args.gpus:
            base, gpus = with_gpus(base, args.gpus.split(","))
        if args.k8s_inventory:
            from scheduler.deploy.k8s import cluster_gpus

            have = cluster_gpus(args.kube_context)
            base, gpus = with_inventory(base, gpus or default_gpus(base), have)
            print(f"inventory: {', '.join(f'{k} x {base.gpus[k].count}' for k in gpus)} GPUs", file=sys.stderr)
        elif args.kube_context:
            raise ValueError("--kube-context: only with --k8s-inventory")
        trace, w = load_workload(args, base)
        check_time_span(trace)  # the instance counts are sized for the trace's rate
        # As simulate and compare do: the simulated answer serves requests a live cluster of it refuses.
        warn_over_context(base, w)
        kinds = latency_sources(base, gpus or default_gpus(base), tps)
        if base.latency_profile and sum(map(len, kinds.values())) > 1:
            raise ValueError(f"--gpus/--tp: {args.config} sets latency_profile, which the simulator applies to every "
                             "GPU type and TP alike; plan one GPU type and TP with it, or drop latency_profile")
        if "roofline" in kinds and len(kinds) > 1:  # profiled tables (vidur, measured) compare among themselves
            print("warning: GPU types / TPs are simulated with different latency models ("
                  + "; ".join(f"{k}: {', '.join(v)}" for k, v in kinds.items())
                  + "); the roofline has no measured overheads and reads fast, so compare them with care",
                  file=sys.stderr)
    except (ConfigError, ValueError, OSError, KubernetesError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    def said(done: int, total: int, r: PlanResult) -> None:  # a search takes minutes: say where it is
        c = r.candidate
        # A headroom at the search's ceiling is a lower bound (the table's ">="), not where the cluster tops out.
        most = "at least" if r.max_rate_capped else "up to"
        got = (f"{r.instances} instances, ${r.cost_per_hour:.2f}/h, attainment {r.attainment:.3f}, {most} "
               f"{r.max_rate_rps:.1f} req/s" if r.instances else r.infeasible)
        got += f" (estimate {r.estimate if r.estimate is not None else '-'}, {r.simulations} simulations)"
        print(f"[{done}/{total}] {c.hardware} {c.layout} {c.router}: {got}", file=sys.stderr, flush=True)

    try:
        results = plan(
            base, w, gpus=gpus, tps=tps, layouts=layouts, routers=routers, target=args.target,
            max_instances=args.max_instances, workers=args.workers, hetero_pd=args.hetero_pd, progress=said,
            seed=args.seed,
        )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    write_plan(Path(args.out), base, trace, results, args.target, workload=w, layouts=layouts)
    return 0 if results else 1


def _slos(base: ClusterConfig, w: Workload) -> dict:
    classes, n = np.unique(w.priorities, return_counts=True)
    per_class = {str(int(p)): {**asdict(base.slo_for(int(p))), "requests": int(k)}
                 for p, k in zip(classes, n, strict=True)}
    return {"slos": per_class, "sized_slo": asdict(sized_slo(base, summary_of(w)))}


def write_plan(out: Path, base: ClusterConfig, trace, results: list[PlanResult], target: float, *,
               workload: Workload | None = None, layouts: tuple[str, ...] = ("mixed", "pd:auto")) -> None:
    """The table, plan.json, best-cluster.yaml and pareto.png. ``workload``: what was planned (default: ``trace``'s,
    every request in class 0); plan.json names the SLO of each priority class in it (``slos``, with its requests:
    each request was scored against its own class's) and the one the analytic pass sized for (``sized_slo``). It
    named class 0's alone, a class the workload might not even have. ``layouts``: those searched; re-roling runs on
    the P/D ones only, so with none plan.json says it was not applied rather than naming it as if it ran."""
    from rich.console import Console
    from rich.table import Table

    out.mkdir(parents=True, exist_ok=True)
    t = Table(title=f"plan for trace {trace.name} ({len(trace)} req), SLO attainment >= {target:.0%}")
    for col in ("rank", "GPU x TP", "layout", "router", "P/D", "GPUs", "$/h", "attain", "max req/s", "TTFT p99 s",
                "TPOT p99 ms", "est. n"):
        t.add_column(col)
    for k, r in enumerate(results[:20], 1):
        c = r.candidate
        t.add_row(str(k), c.hardware, c.layout, c.router,
                  f"{r.prefill}/{r.decode}" if r.prefill else f"{r.instances} mixed", str(r.gpus),
                  f"{r.cost_per_hour:.2f}", f"{r.attainment:.3f}",
                  (">=" if r.max_rate_capped else "") + f"{r.max_rate_rps:.1f}" if r.max_rate_rps is not None
                  else "-",
                  f"{r.ttft_p99_s:.2f}" if r.ttft_p99_s is not None else "-",
                  f"{r.tpot_p99_s * 1e3:.0f}" if r.tpot_p99_s is not None else "-",
                  str(r.estimate) if r.estimate is not None else "-")
    import sys

    Console(width=None if sys.stdout.isatty() else 150).print(t)  # pipes and logs: not cut to 80 columns
    import json

    (out / "plan.json").write_text(json.dumps(
        {"trace": trace.name, "trace_source": getattr(trace, "source", ""), "requests": len(trace),
         "rate_rps": round(trace.mean_rate, 4), "config": base.name, "model": base.model.name,
         **_slos(base, workload if workload is not None else Workload.from_trace(trace)),
         # The periodic policies every candidate ran with (re-roling: the P/D candidates), as compare names them.
         **policy_specs(base),
         **({"reroling_policy": "not applied (no P/D candidate)"}
            if base.policies.reroling is not None and not any(x.startswith("pd") for x in layouts) else {}),
         "target": target, "results": [asdict(r) for r in results]}, indent=2))
    if not results:
        for stale in ("best-cluster.yaml", "pareto.png"):  # a previous run's answer is not this plan's
            (out / stale).unlink(missing_ok=True)
        print("no configuration meets the target (each candidate's reason is in its line above)")
        return
    best = results[0]
    cfg = make_config(base, best.candidate, best.counts)
    (out / "best-cluster.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter([r.cost_per_hour for r in results], [_headroom(r) for r in results], s=12, label="meets the target")
    front = pareto(results)
    ax.plot([r.cost_per_hour for r in front], [_headroom(r) for r in front], "r-o", ms=4, label="Pareto")
    ax.axhline(trace.mean_rate, color="grey", lw=0.8, ls="--", label="trace rate")
    ax.set_xlabel("$ / hour")
    ax.set_ylabel(f"max req/s at {target:.0%} SLO attainment")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "pareto.png", dpi=110)
    plt.close(fig)
    print(f"wrote {out}/plan.json, {out}/pareto.png, {out}/best-cluster.yaml "
          f"(best: {best.candidate.hardware} {best.candidate.layout}, {best.instances} instances)")
