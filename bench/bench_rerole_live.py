"""Dynamic re-roling on the live control plane vs static roles, and the simulator's error on both.

The workload of ``bench_routing.py rerole`` (the vendored Azure conv slice, its (prompt, output) pairs reordered
so that the first half of the arrivals is decode-heavy and the second prefill-heavy, 1.5x its rate), a window of
it, through the gRPC SDK (load generator in a child process) to a local Ray cluster of ``llama2-7b-pd-a100``
(2 PREFILL + 2 DECODE, simulated engines timed by the A100 latency model), once with static roles and once with
``policies.reroling`` (``RerolePolicy`` defaults; ``scheduler/control/reroling.py``). Engines run ``--time-scale``
times slower than the modelled GPU and arrivals are stretched by the same factor, so the cluster sees the
modelled load while the 2-core host keeps up with the stream; times are reported back in model seconds.
The simulator runs the same window with the same policy (``sim/reroling.py``; switch delay 0 and no decode
hand-off, as the live switch: it costs the drain only), routing as the live ingress does on its poll-round view
(``ingress_poll_s``: its 50 ms wall period in model seconds; ``--no-poll``: each instance as of its last step).
The live TTFT is also reported where the simulator takes it, at the engine (instance received -> its engine's first
token, ``ttft_at_instance_*``), and the rest -- the harness's gRPC, ingress and Ray hops -- apart (``stack_*``).
Each live run keeps its per-request instances and timings (``per_request``), and the simulator runs it once more on
them (``sim_as_live``: each request routed where live routed it, arriving when its prefill instance received it), so
what is left of the error is the engines' and the host's (docs/simulator.md, "The static P/D run's TTFT tail").

    llmsched bench rerole-live                              # 200 s of trace, time scale 2 (~15 min)
    llmsched bench rerole-live --window 60 --json out.json
    llmsched bench rerole-live --resim docs/results/rerole_live.json   # the simulator side again, recorded live runs
    llmsched bench rerole-live --window 100 --only static --json docs/results/rerole_live_static_100.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.loadgen import (
    COMPLETED,
    INGRESS_REFRESH_S,
    LoadPlan,
    LoadProcess,
    RequestSpec,
    count_outcomes,
    start_stack,
)
from scheduler.demo import _from_each_instance
from scheduler.policy.route import RouteDecision, Router
from scheduler.telemetry.report import write_json

SLO_TTFT_S, SLO_TPOT_S = 2.0, 0.1  # the config's class-0 SLO, model seconds


def _stats(ttft: np.ndarray, tpot: np.ndarray, n: int) -> dict[str, float]:
    ok = (ttft <= SLO_TTFT_S) & (np.nan_to_num(tpot, nan=0.0) <= SLO_TPOT_S)
    return {"slo_attainment": float(ok.sum() / n), "ttft_p50_s": float(np.nanpercentile(ttft, 50)),
            "ttft_p90_s": float(np.nanpercentile(ttft, 90)), "tpot_p50_s": float(np.nanpercentile(tpot, 50)),
            "tpot_p90_s": float(np.nanpercentile(tpot, 90))}


def _at_instance(done: list, first: dict[str, tuple[float, ...]], scale: float) -> dict[str, float]:
    """TTFT as the simulator measures it, at the engine: from the instance receiving the request (``Instance.submit``)
    to its engine's first token out (``Instance.request_timings`` of the instance that put it out; model seconds),
    and the rest of the SDK's TTFT -- the harness's gRPC, ingress and Ray hops, both ways -- per request."""
    t = np.array([first[o.rid][:2] if o.rid in first else (np.nan, np.nan) for o in done], dtype=float).reshape(-1, 2)
    engine = (t[:, 1] - t[:, 0]) / scale
    stack = np.array([o.ttft_s for o in done]) / scale - engine
    if np.isnan(engine).all():
        return {}
    return {"ttft_at_instance_p50_s": float(np.nanpercentile(engine, 50)),
            "ttft_at_instance_p90_s": float(np.nanpercentile(engine, 90)),
            "stack_p50_s": float(np.nanpercentile(stack, 50)), "stack_p90_s": float(np.nanpercentile(stack, 90))}


def _per_request(per_instance: dict[str, dict], n: int, label: str, started: float, scale: float) -> dict[str, list]:
    """Per request ``{label}-{i}`` of the window, from every instance's ``request_timings``: the instance whose
    engine put out its first token (the prefill side), when that instance received it and when that first token came
    out (model seconds from the load's start), and the instance that put out its last record (the decode leg's;
    the same one without a handoff). ``None`` where no instance has it."""
    recs: dict[int, list[tuple[float, float, str]]] = {}
    for iid, timings in per_instance.items():
        for rid, t in timings.items():
            head, _, idx = rid.rpartition("-")
            if head == label and idx.isdigit() and int(idx) < n:
                recs.setdefault(int(idx), []).append(((t[1] - started) / scale, (t[0] - started) / scale, iid))
    out: dict[str, list] = {k: [None] * n for k in ("prefill_instance", "decode_instance", "received_s", "first_s")}
    for i, r in recs.items():
        (first, received, iid), last = min(r), max(r)
        out["prefill_instance"][i], out["received_s"][i], out["first_s"][i] = iid, received, first
        out["decode_instance"][i] = last[2]
    return out


def run_live(cfg: Any, w: Any, scale: float, label: str) -> dict:
    stack = start_stack(cfg, time_scale=scale)

    async def go() -> tuple[list, list, float]:
        await stack.start_front()
        try:
            specs = [RequestSpec(f"{label}-{i}", float(w.arrival_s[i]) * scale, int(w.prompt_tokens[i]),
                                 int(w.output_tokens[i])) for i in range(len(w))]
            span = float(w.arrival_s[-1]) * scale
            load = LoadProcess(LoadPlan(stack.address, specs, vocab=cfg.model.vocab_size, timeout_s=600.0,
                                        stop_after_s=span + 600.0, id_prefix=label))
            started = await load.start()
            res = await load.result(timeout_s=span + 700.0)
            events = await stack.deployment.controller.scaling_events.remote()
            timings = await _from_each_instance(stack.ingress, "request_timings", "server-side timings")
            return res, events, started, timings
        finally:
            await stack.stop_front()

    try:
        t0 = time.perf_counter()
        res, events, started, timings = asyncio.run(go())
    finally:
        stack.shutdown()
    per = _per_request(timings, len(w), label, started, scale)
    first = {f"{label}-{i}": (r * scale, f * scale) for i, (r, f) in enumerate(zip(per["received_s"], per["first_s"]))
             if f is not None}
    done = [o for o in res if o.outcome == COMPLETED]
    ttft = np.array([o.ttft_s for o in done]) / scale
    tpot = np.array([o.tpot_s for o in done]) / scale
    out = _stats(ttft, tpot, len(res))
    out.update(_at_instance(done, first, scale))
    lost = Counter(f"{o.outcome}: {o.finish_reason} {o.message}".strip()[:160] for o in res
                   if o.outcome != COMPLETED)
    out.update(outcomes=count_outcomes(res), lost_reasons=dict(lost.most_common(5)), wall_s=time.perf_counter() - t0,
               switches=[{k: e[k] for k in ("action", "instance", "to") if k in e}
                         | {"at_model_s": round((e["time_s"] - started) / scale, 1)}
                         for e in events if e["action"].startswith("role_switch")], per_request=per)
    return out


def _simulate(cfg: Any, w: Any, reroling: bool, ingress_poll_s: float | None, router: Any = None) -> tuple[Any, Any]:
    from scheduler.policy.route import make_router
    from scheduler.policy.scaling import RerolePolicy
    from sim.metrics import request_metrics
    from sim.policies import AS_LIVE_REROLING
    from sim.simulator import Simulator

    kw: dict[str, Any] = {}
    if reroling:
        kw = {"reroling": RerolePolicy(), "reroling_interval_s": 5.0, "reroling_options": dict(AS_LIVE_REROLING)}
    sim = Simulator(cfg, router=router or make_router("least_outstanding"), ingress_poll_s=ingress_poll_s, **kw)
    return sim, request_metrics(sim.run(w))


def run_sim(cfg: Any, w: Any, reroling: bool, *, ingress_poll_s: float | None = None) -> dict:
    sim, m = _simulate(cfg, w, reroling, ingress_poll_s)
    out = _stats(m.ttft_s, m.tpot_s, len(w))
    if sim.reroler is not None:
        out["switches"] = sim.reroler.summary()["switches"]
    return out


class _AsLive(Router):
    """Routes request ``i`` (the simulator's id) to the instances the live run used for it."""

    name = "as_live"

    def __init__(self, prefill: list[str], decode: list[str]) -> None:
        self._p, self._d = prefill, decode

    def route(self, request: Any, view: Any) -> RouteDecision:
        i = int(request.request_id)
        return RouteDecision(self._p[i], self._d[i])  # the same one twice: it ran there start to end, colocated


def run_sim_as_live(cfg: Any, w: Any, per: dict[str, list], reroling: bool, *,
                    ingress_poll_s: float | None = None) -> dict[str, float]:
    """The simulator on the live run's inputs to its instances: each request routed where live routed it, arriving
    when its live prefill instance received it (``per``: ``_per_request``'s). What is left of the error against
    the live TTFT at the instance is then the engines' and the host's -- not the routing's, nor the arrival jitter
    the harness's hops add. Per request, ``late_*``: live's TTFT at the instance less the simulator's, here."""
    from sim.simulator import Workload

    keep = sorted((i for i, r in enumerate(per["received_s"]) if r is not None), key=lambda i: per["received_s"][i])
    sub = Workload(np.array([per["received_s"][i] for i in keep]), w.prompt_tokens[keep], w.output_tokens[keep],
                   name=f"{w.name} as live")
    router = _AsLive([per["prefill_instance"][i] for i in keep], [per["decode_instance"][i] for i in keep])
    _, m = _simulate(cfg, sub, reroling, ingress_poll_s, router)
    live = np.array([per["first_s"][i] - per["received_s"][i] for i in keep])
    late = live - m.ttft_s
    return {"requests": len(keep), "ttft_p50_s": float(np.nanpercentile(m.ttft_s, 50)),
            "ttft_p90_s": float(np.nanpercentile(m.ttft_s, 90)),
            "late_p50_s": float(np.nanpercentile(late, 50)), "late_p90_s": float(np.nanpercentile(late, 90)),
            "late_p99_s": float(np.nanpercentile(late, 99)), "late_over_10ms": float(np.mean(late > 0.01))}


def sim_error(live: dict, sim: dict, as_live: dict | None = None) -> dict[str, float]:
    """(sim - live) / live per metric, and the TTFT against the live one taken where the simulator takes it (also
    with the simulator on live's routing and arrivals at the instances, ``as_live``: ``run_sim_as_live``)."""
    err = {k: (sim[k] - live[k]) / live[k] for k in sim if k != "switches" and live[k]}
    for q in ("50", "90"):  # against the live TTFT taken where the simulator takes it (at the engine)
        at = live.get(f"ttft_at_instance_p{q}_s")
        if not at:
            continue
        err[f"ttft_p{q}_s_at_instance"] = (sim[f"ttft_p{q}_s"] - at) / at
        if as_live:
            err[f"ttft_p{q}_s_as_live"] = (as_live[f"ttft_p{q}_s"] - at) / at
    return err


def _sim_side(out: dict, name: str, cfg: Any, w: Any, live: dict, poll: float | None) -> dict:
    """The simulator's run against the live run ``name`` into ``out`` (``sim``, ``sim_error``; ``sim_as_live``
    where the live run kept its per-request timings)."""
    sim = out["sim"][name] = run_sim(cfg, w, name == "rerole", ingress_poll_s=poll)
    as_live = None
    if live.get("per_request"):
        as_live = out.setdefault("sim_as_live", {})[name] = run_sim_as_live(
            cfg, w, live["per_request"], name == "rerole", ingress_poll_s=poll)
        print(f"  {name} sim on live's routing and arrivals at the instances: TTFT p50/p90 "
              f"{as_live['ttft_p50_s']:.3f}/{as_live['ttft_p90_s']:.3f} s; live later per request p50/p90/p99 "
              f"{as_live['late_p50_s'] * 1e3:.1f}/{as_live['late_p90_s'] * 1e3:.1f}/{as_live['late_p99_s'] * 1e3:.1f}"
              f" ms", flush=True)
    out["sim_error"][name] = sim_error(live, sim, as_live)
    return sim


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="llmsched bench rerole-live", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--window", type=float, default=200.0, help="seconds of the (1.5x) trace to replay")
    p.add_argument("--time-scale", type=float, default=2.0, help="engines this much slower than the model")
    p.add_argument("--only", choices=("static", "rerole"), help="run one of the two")
    p.add_argument("--json")
    p.add_argument("--no-poll", action="store_true",
                   help="the simulator's routers see each instance as of its last step, not the ingress's poll rounds")
    p.add_argument("--resim", metavar="JSON",
                   help="no live run: simulate again against the live runs recorded in JSON (its window, time "
                        "scale); writes --json, else JSON itself")
    args = p.parse_args(argv)
    if args.resim:
        rec = json.loads(Path(args.resim).read_text())
        args.window, args.time_scale = rec["window_s"], rec["time_scale"]

    from bench.bench_routing import shifting_workload
    from scheduler.config.load import load_config
    from scheduler.config.models import PolicySpec
    from sim.simulator import Workload

    full = shifting_workload(decode_first=True)
    k = int(np.searchsorted(full.arrival_s, args.window))
    w = Workload(full.arrival_s[:k], full.prompt_tokens[:k], full.output_tokens[:k], name=full.name)
    base = load_config("llama2-7b-pd-a100")
    s = args.time_scale
    poll = None if args.no_poll else INGRESS_REFRESH_S / s
    policy = {"name": "threshold", "params": {"interval_s": 5.0 * s, "sustain_s": 5.0 * s, "cooldown_s": 30.0 * s,
                                              "switch_timeout_s": 120.0 * s}}
    runs = {"static": base, "rerole": base.model_copy(update={"policies": base.policies.model_copy(
        update={"reroling": PolicySpec.model_validate(policy)})})}
    out: dict[str, Any] = {"trace": w.name, "requests": len(w), "window_s": args.window, "time_scale": s,
                           "config": "llama2-7b-pd-a100 (2 PREFILL + 2 DECODE, simulated A100 engines)",
                           "router": "least_outstanding", "slo": f"ttft {SLO_TTFT_S} s, tpot {SLO_TPOT_S} s",
                           "command": f"llmsched bench rerole-live --window {args.window:g} --time-scale {s:g}"
                           + (f" --only {args.only}" if args.only else "") + (" --no-poll" if args.no_poll else ""),
                           "sim_ingress_poll_s": poll, "live": {}, "sim": {}, "sim_error": {}}
    if args.resim:
        # The live runs' command stands; the simulator side's is this one.
        out.update(command=rec["command"], live=rec["live"],
                   sim_command=f"llmsched bench rerole-live --resim {args.resim}" + (" --no-poll" if args.no_poll else ""))
        for name, live in rec["live"].items():
            sim = _sim_side(out, name, runs[name], w, live, poll)
            print(f"  {name} sim: TTFT p50/p90 {sim['ttft_p50_s']:.3f}/{sim['ttft_p90_s']:.3f} s, TPOT p50/p90 "
                  f"{sim['tpot_p50_s'] * 1e3:.1f}/{sim['tpot_p90_s'] * 1e3:.1f} ms; error "
                  + ", ".join(f"{k} {v:+.1%}" for k, v in out["sim_error"][name].items()), flush=True)
        write_json(Path(args.json or args.resim), out)
        return 0
    for name, cfg in runs.items():
        if args.only and name != args.only:
            continue
        print(f"[rerole-live] {name}: {len(w)} requests over {w.arrival_s[-1] * s:.0f} s wall...", flush=True)
        live = out["live"][name] = run_live(cfg, w, s, name)
        sim = _sim_side(out, name, cfg, w, live, poll)
        print(f"  live: SLO {live['slo_attainment']:.1%}, TTFT p50/p90 {live['ttft_p50_s']:.2f}/{live['ttft_p90_s']:.2f}"
              f" s, TPOT p50/p90 {live['tpot_p50_s'] * 1e3:.0f}/{live['tpot_p90_s'] * 1e3:.0f} ms, "
              f"lost {live['outcomes']['lost']}, switches {live['switches']}", flush=True)
        if "ttft_at_instance_p50_s" in live:
            print(f"        at the instance: TTFT p50/p90 {live['ttft_at_instance_p50_s']:.3f}/"
                  f"{live['ttft_at_instance_p90_s']:.3f} s; the stack's hops p50/p90 {live['stack_p50_s'] * 1e3:.1f}/"
                  f"{live['stack_p90_s'] * 1e3:.1f} ms", flush=True)
        print(f"  sim:  SLO {sim['slo_attainment']:.1%}, TTFT p50/p90 {sim['ttft_p50_s']:.2f}/{sim['ttft_p90_s']:.2f}"
              f" s, TPOT p50/p90 {sim['tpot_p50_s'] * 1e3:.0f}/{sim['tpot_p90_s'] * 1e3:.0f} ms, "
              f"switches {sim.get('switches', [])}", flush=True)
    if args.json:
        write_json(Path(args.json), out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
