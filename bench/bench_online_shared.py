"""Online length learning over ingress replicas: each learning alone vs sharing through the Controller.

The ``bench_online_tenants`` two-app mix (``chat`` ~20-token answers, ``summarise`` ~500, one prompt distribution)
split at random over ``--replicas`` ingress replicas, each with its own ``params: {online: true}`` predictor; a
request is predicted by the replica that serves it as it arrives and learned there ``--lag`` arrivals later. Rows:

* ``alone``: each replica learns from the requests it served (before sharing; ``online: {share: false}``);
* ``shared``: every ``--period`` arrivals (a plans period's worth: 50 = 200 req/s at the default 0.25 s) each
  replica exchanges its samples with the Controller's ``LengthLog`` (``scheduler/predict/shared.py``; the report
  and reply pickled as Ray sends them, their bytes measured);
* ``one``: one ingress serving every request (what sharing aims at).

Scored past the first ``--warmup`` on the requests replica B (the second) serves: MAE and Kendall tau per tenant.
``--restart-at F``: replica B restarts (a fresh predictor) at fraction F of the stream -- alone it starts from the
shipped guesses again, shared from the Controller's merged state -- scored on B's requests after it.

    python bench/bench_online_shared.py [--n 4000] [--replicas 2] [--period 50] [--lag 32] [--seed 0] [--json OUT]
"""

from __future__ import annotations

import argparse
import logging
import pickle
import time
from typing import Any

import numpy as np

from bench.bench_online_tenants import emit, online_predictor, per_tenant, workload
from bench.bench_online_tenants import replay as replay_online
from scheduler.predict.shared import LengthLog, SharedLengths


def replay(prompt: np.ndarray, output: np.ndarray, tenants: list[str], replica: np.ndarray, *, mode: str, lag: int,
           period: int, restart_at: int | None) -> tuple[np.ndarray, dict[str, Any]]:
    """Each request's guess by the replica serving it (``mode``: alone, shared, one); the report sizes."""
    k = int(replica.max()) + 1 if mode != "one" else 1
    sps = [online_predictor() for _ in range(k)]
    log = LengthLog("bench")
    shares = [SharedLengths(sp.online, adopt=sp.use_online) for sp in sps] if mode == "shared" else []
    sizes: dict[str, list[float]] = {k: [] for k in ("report", "reply", "samples", "ingress_s", "controller_s")}

    def exchange(r: int) -> None:
        t0 = time.perf_counter()
        report = pickle.dumps(shares[r].report())
        t1 = time.perf_counter()
        reply = pickle.dumps(log.share(f"r{r}", pickle.loads(report)))
        t2 = time.perf_counter()
        shares[r].apply(pickle.loads(reply))
        sizes["report"].append(len(report))
        sizes["reply"].append(len(reply))
        sizes["ingress_s"].append(time.perf_counter() - t2 + t1 - t0)
        sizes["controller_s"].append(t2 - t1)

    for r in range(len(shares)):
        exchange(r)
    for v in sizes.values():
        v.clear()  # (the first exchanges: nothing learned yet)

    def restart(i: int) -> None:
        if i == restart_at:
            sps[1] = online_predictor()
            if shares:
                shares[1] = SharedLengths(sps[1].online, adopt=sps[1].use_online)
                exchange(1)  # (``Ingress._start``: before it serves anything)

    def period_end(i: int) -> None:
        if shares and (i + 1) % period == 0:
            sizes["samples"].append(sum(len(s.view.journal or ()) for s in shares))
            for r in range(len(shares)):
                exchange(r)

    guess = replay_online(prompt, output, tenants, lag, lambda i: sps[0 if mode == "one" else replica[i]],
                          before=restart, after=period_end)
    stats = {}
    if shares:
        [merged] = [g.merged for g in log.groups.values()]  # (one settings: one log)
        stats = {"report_bytes_mean": round(float(np.mean(sizes["report"])), 1),
                 "report_bytes_max": int(np.max(sizes["report"])),
                 "reply_bytes_mean": round(float(np.mean(sizes["reply"])), 1),
                 "bytes_per_sample": round(float(np.sum(sizes["report"]) / max(1, np.sum(sizes["samples"]))), 1),
                 "full_state_bytes": len(pickle.dumps(merged.state())),
                 # wall clock per exchange (noisy): the replica's report + rebase, the Controller's merge
                 "ingress_ms_mean": round(1e3 * float(np.mean(sizes["ingress_s"])), 2),
                 "controller_ms_mean": round(1e3 * float(np.mean(sizes["controller_s"])), 2),
                 "merged_observed": merged.observed}
    return guess, stats


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(prog="llmsched bench online-shared", description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=4000)
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--period", type=int, default=50, help="arrivals between two exchanges of each replica")
    ap.add_argument("--lag", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--warmup", type=float, default=0.1, help="fraction of the stream not scored")
    ap.add_argument("--restart-at", type=float, default=None, help="replica B restarts at this fraction")
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    logging.getLogger("scheduler.predict.serving").setLevel(logging.ERROR)  # (the tenants are new to it: by design)
    prompt, output, tenants = workload(a.n, a.seed)
    replica = np.random.default_rng(a.seed + 1).integers(0, a.replicas, a.n)
    start = int((a.restart_at if a.restart_at is not None else a.warmup) * a.n)
    keep = (replica == 1) & (np.arange(a.n) >= start)
    res: dict[str, Any] = {"n": a.n, "replicas": a.replicas, "period": a.period, "lag": a.lag, "seed": a.seed,
                           "warmup": a.warmup, "restart_at": a.restart_at, "scored": "replica B's requests"}
    restart = start if a.restart_at is not None else None
    for mode in ("alone", "shared", "one"):
        guess, stats = replay(prompt, output, tenants, replica, mode=mode, lag=a.lag, period=a.period,
                              restart_at=restart if mode != "one" else None)
        res[mode] = {**per_tenant(guess, output, tenants, keep), **stats}
    return emit(res, a.json)


if __name__ == "__main__":
    main()
