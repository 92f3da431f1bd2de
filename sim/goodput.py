"""Goodput: the highest request rate at which SLO attainment stays at or above a target (DistServe's metric).

Found by bisection over a rate scale applied to the trace's arrival times (lengths unchanged): attainment is
(close to) monotone in load, and each probe is one full simulation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np

from scheduler.config.models import ClusterConfig
from sim.metrics import request_metrics
from sim.simulator import SimResult, Simulator, Workload


def scale_rate(w: Workload, factor: float) -> Workload:
    """``factor`` times the request rate: arrivals compressed by ``factor``."""
    return replace(w, arrival_s=w.arrival_s / factor)


def attainment(config: ClusterConfig, w: Workload, router_factory: Callable[[], object], *, seed: int = 0,
               same_instant_batching: bool = False, policies: Callable[[], dict[str, object]] = dict,
               ingress_poll_s: float | None = None) -> float:
    """``policies``: a factory of the run's periodic-policy ``Simulator`` keywords (``sim.policies.sim_policies``:
    migration, re-roling; fresh state per run; default: without); ``ingress_poll_s``: the poll-round view
    (``Simulator``; ``None``: off)."""
    return _attained(_probe(config, w, router_factory, seed=seed, same_instant_batching=same_instant_batching,
                            policies=policies, ingress_poll_s=ingress_poll_s)[1], w)


def _probe(config: ClusterConfig, w: Workload, router_factory: Callable[[], object], *, seed: int,
           same_instant_batching: bool, policies: Callable[[], dict[str, object]],
           ingress_poll_s: float | None) -> tuple[Simulator, SimResult]:
    """One probe's simulation, fresh router and policies: the simulator (its policies' stats) and its result."""
    sim = Simulator(config, router=router_factory(), seed=seed,  # type: ignore[arg-type]
                    same_instant_batching=same_instant_batching, ingress_poll_s=ingress_poll_s,
                    **policies())
    return sim, sim.run(w)


def _attained(res: SimResult, w: Workload) -> float:
    return float(request_metrics(res).slo_met.mean()) if len(w) else 0.0


@dataclass(frozen=True)
class GoodputResult:
    """``scale`` x the trace's rate is ``goodput_rps``; ``capped``: still met at the search's ceiling ``hi`` (the
    goodput is at least that, a lower bound); ``report``: ``goodput``'s ``report`` of the probe at ``scale`` (the
    last that passed; ``None`` without ``report`` or when none passed)."""

    goodput_rps: float
    scale: float
    attainment: float
    probes: int
    capped: bool = False
    report: object = field(default=None, compare=False, repr=False)


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
    report: Callable[[Simulator, SimResult, Workload], object] | None = None,
) -> GoodputResult:
    """Max rate (req/s) with SLO attainment >= ``target``; 0 when even ``lo`` x the trace rate misses it. ``seed``:
    the probes' host-noise draws (``Simulator``), the run's own when reported beside it; ``same_instant_batching``:
    the probes' (``Simulator``); ``policies``: the probes' periodic policies, fresh per probe (``attainment``);
    ``ingress_poll_s``: the probes' poll-round view (``Simulator``), the run's own when reported beside it;
    ``report``: called on each passing probe's simulator, result and (rate-scaled) workload, the reported probe's
    value kept in the result -- what a caller would otherwise simulate that rate again for (``compare``'s
    ``at_goodput``). Every reported ``scale`` was probed (the ceiling ``hi`` and ``lo`` included), and a passing
    probe is always the new best, so the last passing probe is the reported one."""
    if len(w) > 1 and float(w.arrival_s[-1] - w.arrival_s[0]) <= 0:
        raise ValueError(f"goodput: the {len(w)} arrivals of {w.name!r} span no time, so the trace's rate (which the "
                         "result scales) cannot be measured")
    base_rate = w.rate_rps if len(w) > 1 else 0.0
    probes = 0
    kept = None  # ``report`` of the last passing probe

    def ok(scale: float) -> tuple[bool, float]:
        nonlocal probes, kept
        probes += 1
        ws = scale_rate(w, scale)
        sim, res = _probe(config, ws, router_factory, seed=seed, same_instant_batching=same_instant_batching,
                          policies=policies, ingress_poll_s=ingress_poll_s)
        a = _attained(res, ws)
        if a >= target and report is not None:
            kept = report(sim, res, ws)
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
        return GoodputResult(best * base_rate, best, best_a, probes, capped=True, report=kept)
    lo = best
    for _ in range(iters):
        mid = float(np.sqrt(lo * hi))
        g, a = ok(mid)
        if g:
            lo, best, best_a = mid, mid, a
        else:
            hi = mid
    return GoodputResult(best * base_rate, best, best_a, probes, report=kept)
