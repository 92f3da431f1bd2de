"""The live run against the simulator: a replayed slice simulated with the run's own profile, the two compared
(percentile errors, TTFT by requests in flight, the decode engines' pace), and earlier runs re-simulated from
their saved reports (``llmsched run --resimulate``). docs/live_vs_sim.md has the measurements.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np


def say(msg: str) -> None:
    print(f"[llmsched run] {msg}", flush=True)


Timings = dict[str, tuple[float, ...]]  # per request id: an instance's stamps (``Instance.request_timings``)


def engine_pace(lone: list[tuple[int, str, int]], timings: Timings) -> list[float]:
    """Per lone decode stream of the profile ``(prompt, request id, tokens)``, its decode engine's time per token:
    the engine's first token out to its finish stamp (``Instance.request_timings``), free of the stack's noise."""
    out = []
    for _, rid, n in lone:
        t = timings.get(rid)
        if t is not None and len(t) >= 5 and n > 3 and t[4] > t[1]:
            out.append(float(t[4] - t[1]) / (n - 2))
    return out


def decode_pace(server: dict[str, list[float]], output) -> np.ndarray:
    """Per replayed stream of 8+ tokens, its decode engine's time per token (first token out to finish stamp);
    NaN where either stamp is missing or the stream is shorter."""
    first = np.asarray(server["decode_first_s"], dtype=float)
    fin = np.asarray(server["decode_finished_s"], dtype=float)
    o = np.asarray(output, dtype=float)
    pace = (fin - first) / np.maximum(o - 2, 1)
    return np.where((o >= 8) & (fin > first), pace, np.nan)


def replay_lone_pace(server: dict[str, list[float]], output) -> list[float]:
    """The same for the replay's streams that decoded alone: no other decode leg and no other request's prefill
    forward (prefill side ``engine_scheduled_s`` .. ``engine_finished_s``) in their window, 8+ tokens. A prefill
    beside a stream slows it on this host, and the simulator has that: counted in, it read as drift (a 120-request
    replay's "lone" streams at 1.3-1.6x the profile's pace)."""
    first = np.asarray(server["decode_first_s"], dtype=float)
    fin = np.asarray(server["decode_finished_s"], dtype=float)
    p0 = np.asarray(server.get("engine_scheduled_s", np.full(len(first), np.nan)), dtype=float)
    p1 = np.asarray(server.get("engine_finished_s", np.full(len(first), np.nan)), dtype=float)
    pace = decode_pace(server, output)
    legs = np.isfinite(first) & np.isfinite(fin)
    fwd = np.isfinite(p0) & np.isfinite(p1)
    out = []
    for i in np.flatnonzero(np.isfinite(pace)):
        others = np.arange(len(pace)) != i
        busy = (legs & others & (first < fin[i]) & (fin > first[i])) | \
            (fwd & others & (p0 < fin[i]) & (p1 > first[i]))
        if not busy.any():
            out.append(float(pace[i]))
    return out


SIM_SEEDS = 8  # draws of the host's noise per simulated slice (``simulate_slice``)


def simulate_slice(cfg, profile_path: Path, arrival, prompt, output, name: str, *,
                   ingress_poll_s: float | None = None) -> list:
    """The slice in the simulator with the profile: one ``SimResult`` per draw of the host's noise (``SIM_SEEDS``
    when the profile measured the host's spread, ``host_noise``; else the one deterministic run). A noisy host's
    percentiles are those of many draws: one draw of 40 requests moved a p90 by +-10 points from seed to seed.
    ``ingress_poll_s``: route on the ingress's poll-round view (``Simulator``; off by default). The config's
    ``policies.migration`` / ``policies.reroling`` run as the live Controller ran them during the replay
    (``sim_policies``, fresh per draw); ``cfg`` without them: the plain runs. ``policies.scaling`` is not simulated
    here (the slice runs the instances the live run had), so it does not refuse re-roling beside it either: a
    ``--resimulate --config`` with scaling re-simulates a live run that ran re-roling."""
    from sim.policies import sim_policies
    from sim.simulator import Simulator, Workload

    sim_cfg = cfg.model_copy(update={
        "latency_profile": str(profile_path),
        "pools": [p.model_copy(update={"backend": "simulated"}) for p in cfg.pools],
        "policies": cfg.policies.model_copy(update={"scaling": None}),
    })
    seeds = SIM_SEEDS if json.loads(Path(profile_path).read_text()).get("host_noise") else 1
    policies = sim_policies(sim_cfg)
    return [Simulator(sim_cfg, seed=k, ingress_poll_s=ingress_poll_s, **policies())
            .run(Workload(arrival, prompt, output, name=name)) for k in range(seeds)]


def live_policies(cfg) -> dict[str, dict | None]:
    """``report.json``'s ``live_policies``: the config's periodic policies the live Controller ran through the replay
    (``None``: without), which ``resimulate`` simulates again whatever ``--config`` says."""
    from sim.policies import POLICY_FIELDS, policy_specs

    specs = policy_specs(cfg)
    return {k: specs.get(f"{k}_policy") for k in POLICY_FIELDS}


def as_live_ran(cfg, report: dict, where: str):
    """``cfg`` with the periodic policies the report's live run ran (``live_policies``), said when they differ from
    ``cfg``'s. A report written before they were recorded (before the fortieth session: every committed one, run
    on ``cpu-pd`` / ``cpu-mixed``, which set neither) keeps ``cfg``'s."""
    from scheduler.config.models import PolicySpec
    from sim.policies import POLICY_FIELDS

    ran = report.get("live_policies")
    if ran is None:
        return cfg
    update = {k: None if ran.get(k) is None else PolicySpec(**ran[k]) for k in POLICY_FIELDS}
    if any(update[k] != getattr(cfg.policies, k) for k in POLICY_FIELDS):
        say(f"{where}: simulated with the live run's policies ("
            + ", ".join(f"{k} {'none' if v is None else v.name}" for k, v in update.items())
            + "), not --config's")
    return cfg.model_copy(update={"policies": cfg.policies.model_copy(update=update)})


def pooled_metrics(results: list):
    """``RequestMetrics`` of several ``SimResult``s (or of one) with their requests pooled."""
    from sim.metrics import RequestMetrics, request_metrics

    ms = [request_metrics(r) for r in results]
    return RequestMetrics(*(np.concatenate([getattr(m, f.name) for m in ms]) for f in dataclasses.fields(ms[0])))


def pooled_sim_summary(results: list) -> dict:
    """``sim_summary`` of the first draw with the latency percentiles and SLO attainment of every draw pooled."""
    from scheduler.core.metrics import percentiles
    from sim.metrics import sim_summary

    out = sim_summary(results[0])
    if len(results) > 1:
        m = pooled_metrics(results)
        for k in ("ttft_s", "tpot_s", "e2e_s", "queue_s"):
            out[k] = percentiles(getattr(m, k))
        out["slo_attainment"] = float(m.slo_met.mean())
        prio = np.concatenate([r.workload.priorities for r in results])
        for p, c in out["slo"]["classes"].items():
            c["attainment"] = float(m.slo_met[prio == p].mean())
        out["noise_draws"] = len(results)
    return out


METRICS = [(m, q) for m in ("ttft_s", "tpot_s", "e2e_s") for q in ("p50", "p90")]
PACE_MIN_STREAMS = 5  # lone streams on each side for a pace ratio


def pooled_errors(pools: list) -> dict[str, float]:
    """(simulated - live) / live of ``METRICS`` over several runs' requests pooled: ``pools`` holds a (live,
    simulated) ``RequestMetrics`` pair per run. A 40-request run's p90 is its 4th-slowest request, so one
    request's hiccup on a shared host moves it by 10-30%; pooled, each percentile rests on every run."""
    from scheduler.core.metrics import percentiles

    def pool(side: int, metric: str) -> dict:
        return percentiles(np.concatenate([getattr(p[side], metric) for p in pools]))

    live = {m: pool(0, m) for m, _ in METRICS}
    sim = {m: pool(1, m) for m, _ in METRICS}
    return sim_errors(live, sim)


IN_FLIGHT_BINS = (0, 1, 2, 3)  # other requests in flight; the last bin holds that many or more


def in_flight_at_ttft(sent: np.ndarray, first: np.ndarray, finish: np.ndarray) -> np.ndarray:
    """Per request, how many other requests were in flight (sent, not finished) halfway to its first token, as
    the live run saw it; -1 for a request that never got one."""
    mid = (sent + first) / 2
    done = np.isfinite(finish)  # a request that never finished (it failed) is left out of the counts
    s, f = np.sort(sent[done]), np.sort(finish[done])
    # In flight at t: sent by t less finished by t (a request finishes after it is sent). Sorted: O(n log n).
    busy = np.searchsorted(s, mid, side="right") - np.searchsorted(f, mid, side="right")
    own = done & (sent <= mid) & (finish > mid)
    return np.where(np.isfinite(mid), busy - own, -1)


def ttft_by_in_flight(in_flight: np.ndarray, live_ttft: np.ndarray, sim_ttft: np.ndarray,
                      live_queue: np.ndarray | None = None, sim_queue: np.ndarray | None = None) -> list[dict]:
    """Live against simulated TTFT of the same requests, binned by the others in flight live (``IN_FLIGHT_BINS``):
    count, the two medians and the median per-request ratio. Where a set median's TTFT error comes from: alone on
    the host the simulator should match the profile; with others in flight, its contention model is what shows.
    With ``live_queue`` / ``sim_queue`` (each request's wait at its first engine, arrival there to first scheduled)
    also their means: whether the gap is waiting behind other requests' steps or the request's own step and path.
    Live, even a request alone waits ~1.5 ms (vLLM's hop into its engine loop), which the simulator holds in the
    request's path latency instead."""
    rows = []
    for k, lo in enumerate(IN_FLIGHT_BINS):
        hi = IN_FLIGHT_BINS[k + 1] if k + 1 < len(IN_FLIGHT_BINS) else np.inf
        m = (in_flight >= lo) & (in_flight < hi) & np.isfinite(live_ttft) & np.isfinite(sim_ttft) & (live_ttft > 0)
        if m.any():
            row = {"in_flight": f"{lo}+" if hi == np.inf else str(lo), "requests": int(m.sum()),
                   "live_p50_s": float(np.median(live_ttft[m])), "sim_p50_s": float(np.median(sim_ttft[m])),
                   "sim_over_live": float(np.median(sim_ttft[m] / live_ttft[m]))}
            if live_queue is not None and sim_queue is not None:
                q = m & np.isfinite(live_queue) & np.isfinite(sim_queue)
                if q.any():
                    row.update(live_queue_mean_s=float(live_queue[q].mean()),
                               sim_queue_mean_s=float(sim_queue[q].mean()))
            rows.append(row)
    return rows


def ttft_flight_columns(live, sim_runs: list, arrival, stamps: dict | None = None) -> tuple[np.ndarray, ...]:
    """``ttft_by_in_flight``'s inputs for one run: the others in flight live, the live TTFT (from the send), the
    simulated one (median over the noise draws), and each request's wait at its first engine, live (the engines'
    stamps in ``stamps``: ``engine_arrival_s`` to ``engine_scheduled_s``; NaN without them) and simulated."""
    arrival = np.asarray(arrival)
    sim_ttft = np.median([r.first_token_s - arrival for r in sim_runs], axis=0)
    sim_queue = np.median([r.admit_s - arrival for r in sim_runs], axis=0)
    nan = np.full(len(arrival), np.nan)
    stamps = stamps or {}
    live_queue = (np.asarray(stamps.get("engine_scheduled_s", nan), dtype=float)
                  - np.asarray(stamps.get("engine_arrival_s", nan), dtype=float))
    return (in_flight_at_ttft(live.start_s(), live.first_token_s, live.finish_s),
            live.first_token_s - live.start_s(), sim_ttft, live_queue, sim_queue)


def say_ttft_by_in_flight(rows: list[dict]) -> None:
    def queue(r: dict) -> str:
        if "live_queue_mean_s" not in r:
            return ""
        return f", wait at the engine {r['live_queue_mean_s'] * 1e3:.1f} / {r['sim_queue_mean_s'] * 1e3:.1f} ms"

    say("TTFT by other requests in flight (live), live / simulated p50: " + "; ".join(
        f"{r['in_flight']}: {r['live_p50_s'] * 1e3:.1f} / {r['sim_p50_s'] * 1e3:.1f} ms ({r['requests']} requests, "
        f"x{r['sim_over_live']:.2f}{queue(r)})" for r in rows) + ("; waits: means, live / simulated" if any(
        "live_queue_mean_s" in r for r in rows) else ""))


def pace_ratio(pace: dict | None) -> float | None:
    """How much slower the decode engines ran during the replay than during the profile: the median engine time
    per token of lone streams, replay over profile (``engine_pace``), or ``None`` with too few of either."""
    if not pace:
        return None
    a, b = pace.get("profile_lone_s") or (), pace.get("replay_lone_s") or ()
    if len(a) < PACE_MIN_STREAMS or len(b) < PACE_MIN_STREAMS:
        return None
    return float(np.median(b) / np.median(a))


def simulate_paced(cfg, profile: dict, ratio: float, tmp: Path, arrival, prompt, output, name: str, *,
                   ingress_poll_s: float | None = None):
    """The slice simulated with the profile's decode steps scaled by ``ratio`` (``scale_decode_steps``)."""
    from scheduler.profile import scale_decode_steps

    tmp.write_text(json.dumps(scale_decode_steps(profile, ratio)))
    return simulate_slice(cfg, tmp, arrival, prompt, output, name, ingress_poll_s=ingress_poll_s)


def sim_errors(live_sum: dict, sim_sum: dict) -> dict[str, float]:
    """(simulated - live) / live for each of ``METRICS`` the live run has a non-zero value for."""
    return {f"{m}.{q}": (sim_sum[m][q] - live_sum[m][q]) / live_sum[m][q] for m, q in METRICS if live_sum[m][q]}


def resimulate(cfg, dirs: list[str], json_path: str | None = None, *,
               ingress_poll_s: float | None = None) -> dict[str, dict[str, float]]:
    """Re-fit the profile samples saved by earlier runs (``DIR/report.json``) with the current ``fit`` and
    simulate their slices again: the simulator's error against those live runs, without running them again
    (how a change to the fit or the simulator is checked against several noisy live runs at once). Nothing is
    written into ``DIR``; ``json_path`` gets the per-run errors and their median. ``ingress_poll_s``: simulate
    with the ingress's poll-round view (``Simulator``; the live runs' ingress polls every 25 ms)."""
    import tempfile

    from scheduler.profile import fit
    from scheduler.telemetry.report import write_json
    from sim.replay import LiveResult

    errors: dict[str, dict[str, float]] = {}
    paced: dict[str, dict[str, float]] = {}
    pools: list[tuple] = []  # (live, simulated) RequestMetrics per run with per-request columns
    flights: list[tuple] = []  # (in flight, live TTFT, simulated TTFT) per request, every run
    with tempfile.TemporaryDirectory() as tmp:
        for n, d in enumerate(dirs):
            report = json.loads((Path(d) / "report.json").read_text())
            if not report.get("profile_samples") or not report.get("per_request"):
                raise ValueError(f"{d}/report.json: no profile_samples/per_request (written by an older llmsched run)")
            run_cfg = as_live_ran(cfg, report, d)
            path = Path(tmp) / f"profile-{n}.json"
            profile = fit(report["profile_samples"])
            path.write_text(json.dumps(profile))
            pr = report["per_request"]
            slice_ = (np.asarray(pr["arrival_s"]), np.asarray(pr["prompt_tokens"]), np.asarray(pr["output_tokens"]),
                      report.get("trace", "trace"))
            res = simulate_slice(run_cfg, path, *slice_, ingress_poll_s=ingress_poll_s)
            # The live side is recomputed from its per-request columns where saved, so every run is scored by the
            # current rules (TTFT from when the request was sent; reports without ``live_sent_s``: from arrival).
            live = report["live"]
            if pr.get("live_first_s") is not None:
                slo = cfg.slo_for(0)
                lr = LiveResult.from_columns(pr, name=report.get("trace", "trace"))
                live = lr.summary(slo_ttft_s=slo.ttft_s or np.inf, slo_tpot_s=slo.tpot_s or np.inf)
                pools.append((lr.metrics(), pooled_metrics(res)))
                flights.append(ttft_flight_columns(lr, res, slice_[0], pr))
            errors[d] = sim_errors(live, pooled_sim_summary(res))
            say(f"{d}: " + ", ".join(f"{k} {v * 100:+.0f}%" for k, v in errors[d].items()))
            pace = dict(report.get("engine_pace") or {})
            if pace and pr.get("decode_first_s") is not None:  # the replay side by the current rule
                pace["replay_lone_s"] = replay_lone_pace(pr, pr["output_tokens"])
            ratio = pace_ratio(pace)
            if ratio is not None:
                res = simulate_paced(run_cfg, profile, ratio, Path(tmp) / f"paced-{n}.json", *slice_,
                                     ingress_poll_s=ingress_poll_s)
                paced[d] = {"pace_ratio": ratio, **sim_errors(live, pooled_sim_summary(res))}
                say(f"  engine drift x{ratio:.2f} divided out: " + ", ".join(
                    f"{k} {v * 100:+.0f}%" for k, v in paced[d].items() if k != "pace_ratio"))
    med = {k: float(np.median([e[k] for e in errors.values()])) for k in next(iter(errors.values()))}
    if len(errors) > 1:
        say(f"median over {len(errors)} runs: " + ", ".join(f"{k} {v * 100:+.0f}%" for k, v in med.items()))
    pooled = pooled_errors(pools) if len(pools) == len(errors) > 1 else None
    if pooled:
        say(f"pooled over the {len(pools)} runs' requests: " + ", ".join(
            f"{k} {v * 100:+.0f}%" for k, v in pooled.items()))
    if flights:
        say_ttft_by_in_flight(ttft_by_in_flight(*(np.concatenate(c) for c in zip(*flights))))
    med_paced = {k: float(np.median([e[k] for e in paced.values()])) for k in next(iter(paced.values()))} \
        if paced else None
    if med_paced and len(paced) > 1:
        say(f"median over {len(paced)} runs, engine drift divided out: " + ", ".join(
            f"{k} {v * 100:+.0f}%" for k, v in med_paced.items() if k != "pace_ratio"))
    if json_path:
        doc = {"config": cfg.name, "what": "(simulated - live) / live per run, simulator re-fitted from each run's "
               "own profile samples", "runs": errors, "median": med}
        if ingress_poll_s is not None:
            doc["ingress_poll_s"] = ingress_poll_s
        if pooled:
            doc.update(pooled_what="the percentiles of all runs' requests pooled, live against simulated: one "
                       "sample of every request of every run, so a p90 rests on ~10% of all of them, not of one run",
                       pooled=pooled)
        if paced:
            doc.update(paced_what="the same with the profile's decode steps scaled by the run's engine pace "
                       "(replay over profile, lone decode streams): the error with the host's drift divided out",
                       runs_paced=paced, median_paced=med_paced)
        write_json(json_path, doc)  # creates the folder --json's output_file let through
    return errors
