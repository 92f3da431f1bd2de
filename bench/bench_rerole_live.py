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

    llmsched bench rerole-live                              # 200 s of trace, time scale 2 (~15 min)
    llmsched bench rerole-live --window 60 --json out.json
    llmsched bench rerole-live --resim docs/results/rerole_live.json   # the simulator side again, recorded live runs
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
from scheduler.demo import _instance_timings
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
            first, _ = await _instance_timings(stack.ingress)
            return res, events, started, first
        finally:
            await stack.stop_front()

    try:
        t0 = time.perf_counter()
        res, events, started, first = asyncio.run(go())
    finally:
        stack.shutdown()
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
                         for e in events if e["action"].startswith("role_switch")])
    return out


def run_sim(cfg: Any, w: Any, reroling: bool, *, ingress_poll_s: float | None = None) -> dict:
    from scheduler.policy.route import make_router
    from scheduler.policy.scaling import RerolePolicy
    from sim.metrics import request_metrics
    from sim.simulator import Simulator

    kw: dict[str, Any] = {}
    if reroling:
        kw = {"reroling": RerolePolicy(), "reroling_interval_s": 5.0,
              "reroling_options": {"switch_delay_s": 0.0, "handoff": False}}
    sim = Simulator(cfg, router=make_router("least_outstanding"), ingress_poll_s=ingress_poll_s, **kw)
    res = sim.run(w)
    m = request_metrics(res)
    out = _stats(m.ttft_s, m.tpot_s, len(w))
    if sim.reroler is not None:
        out["switches"] = sim.reroler.summary()["switches"]
    return out


def sim_error(live: dict, sim: dict) -> dict[str, float]:
    """(sim - live) / live per metric, and the TTFT against the live one taken where the simulator takes it."""
    err = {k: (sim[k] - live[k]) / live[k] for k in sim if k != "switches" and live[k]}
    for q in ("50", "90"):  # against the live TTFT taken where the simulator takes it (at the engine)
        if live.get(f"ttft_at_instance_p{q}_s"):
            err[f"ttft_p{q}_s_at_instance"] = (
                sim[f"ttft_p{q}_s"] - live[f"ttft_at_instance_p{q}_s"]) / live[f"ttft_at_instance_p{q}_s"]
    return err


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
                           + (" --no-poll" if args.no_poll else ""),
                           "sim_ingress_poll_s": poll, "live": {}, "sim": {}, "sim_error": {}}
    if args.resim:
        # The live runs' command stands; the simulator side's is this one.
        out.update(command=rec["command"], live=rec["live"],
                   sim_command=f"llmsched bench rerole-live --resim {args.resim}" + (" --no-poll" if args.no_poll else ""))
        for name, live in rec["live"].items():
            sim = out["sim"][name] = run_sim(runs[name], w, name == "rerole", ingress_poll_s=poll)
            out["sim_error"][name] = sim_error(live, sim)
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
        sim = out["sim"][name] = run_sim(cfg, w, name == "rerole", ingress_poll_s=poll)
        out["sim_error"][name] = sim_error(live, sim)
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
