"""Goodput: the highest request rate at which SLO attainment stays at or above a target (DistServe's metric).

Found by bisection over a rate scale applied to the trace's arrival times (lengths unchanged): attainment is
(close to) monotone in load, and each probe is one full simulation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from scheduler.config.models import ClusterConfig
from sim.metrics import request_metrics
from sim.simulator import Simulator, Workload


def scale_rate(w: Workload, factor: float) -> Workload:
    """``factor`` times the request rate: arrivals compressed by ``factor``."""
    return replace(w, arrival_s=w.arrival_s / factor)


def attainment(config: ClusterConfig, w: Workload, router_factory: Callable[[], object], *, seed: int = 0,
               same_instant_batching: bool = False, policies: Callable[[], dict[str, object]] = dict,
               ingress_poll_s: float | None = None) -> float:
    """``policies``: a factory of the run's periodic-policy ``Simulator`` keywords (``sim.policies.sim_policies``:
    migration, re-roling; fresh state per run; default: without); ``ingress_poll_s``: the poll-round view
    (``Simulator``; ``None``: off)."""
    res = Simulator(config, router=router_factory(), seed=seed,  # type: ignore[arg-type]
                    same_instant_batching=same_instant_batching, ingress_poll_s=ingress_poll_s,
                    **policies()).run(w)
    return float(request_metrics(res).slo_met.mean()) if len(w) else 0.0


@dataclass(frozen=True)
class GoodputResult:
    """``scale`` x the trace's rate is ``goodput_rps``; ``capped``: still met at the search's ceiling ``hi`` (the
    goodput is at least that, a lower bound)."""

    goodput_rps: float
    scale: float
    attainment: float
    probes: int
    capped: bool = False


def goodput(
    config: ClusterConfig,
    w: Workload,
    router_factory: Callable[[], object],
    *,
    target: float = 0.9,
    lo: float = 0.05,
    hi: float = 64.0,
    iters: int = 8,
    seed: int = 0,
    same_instant_batching: bool = False,
    policies: Callable[[], dict[str, object]] = dict,
    ingress_poll_s: float | None = None,
) -> GoodputResult:
    """Max rate (req/s) with SLO attainment >= ``target``; 0 when even ``lo`` x the trace rate misses it. ``seed``:
    the probes' host-noise draws (``Simulator``), the run's own when reported beside it; ``same_instant_batching``:
    the probes' (``Simulator``); ``policies``: the probes' periodic policies, fresh per probe (``attainment``);
    ``ingress_poll_s``: the probes' poll-round view (``Simulator``), the run's own when reported beside it."""
    if len(w) > 1 and float(w.arrival_s[-1] - w.arrival_s[0]) <= 0:
        raise ValueError(f"goodput: the {len(w)} arrivals of {w.name!r} span no time, so the trace's rate (which the "
                         "result scales) cannot be measured")
    base_rate = w.rate_rps if len(w) > 1 else 0.0
    probes = 0

    def ok(scale: float) -> tuple[bool, float]:
        nonlocal probes
        probes += 1
        a = attainment(config, scale_rate(w, scale), router_factory, seed=seed,
                       same_instant_batching=same_instant_batching, policies=policies, ingress_poll_s=ingress_poll_s)
        return a >= target, a

    good, a_lo = ok(lo)
    if not good:
        return GoodputResult(0.0, 0.0, a_lo, probes)
    best, best_a = lo, a_lo
    # Grow the bracket geometrically, then bisect in log space.
    x = lo
    while x < hi:
        nxt = min(x * 4, hi)
        g, a = ok(nxt)
        if not g:
            hi = nxt
            break
        best, best_a, x = nxt, a, nxt
    else:
        return GoodputResult(best * base_rate, best, best_a, probes, capped=True)
    lo = best
    for _ in range(iters):
        mid = float(np.sqrt(lo * hi))
        g, a = ok(mid)
        if g:
            lo, best, best_a = mid, mid, a
        else:
            hi = mid
    return GoodputResult(best * base_rate, best, best_a, probes)
