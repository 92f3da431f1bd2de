"""Chaos under trace load: kill Instance actors and the Controller at random (seeded) times while the bundled Azure
trace streams through the gRPC SDK; count what every request became.

    llmsched bench chaos --duration 60 --json chaos.json            # 4 MIXED instances
    llmsched bench chaos --duration 60 --pd --json chaos-pd.json    # 2 PREFILL + 3 DECODE (P->D handoffs)
    python -m bench.bench_chaos --duration 30 --instance-kills 4 --controller-kills 2

Stack (this process): a local Ray cluster, simulated llama-7b engines (``time_scale`` slows the modelled GPU so
2 cores keep up), the Controller (``max_restarts=-1``), an Ingress and the gRPC server on loopback. Load (a child
process): trace arrivals for ``--duration`` seconds, each request an ``AsyncClient.stream`` with a client-chosen id,
``ignore_eos`` and the trace's output length (clipped), every chunk checked against the simulated engine's
deterministic token at its index. Chaos: ``ray.kill`` of a random live instance (no restart: the Controller
replaces it) or of the Controller (Ray restarts it; it re-adopts the named instances).

Counts (JSON keys): ``sent``, ``completed`` (finished with every index exactly once and the right tokens),
``failed_with_status`` (the SDK raised a gRPC status: explicit), ``lost`` (sent but neither: must be 0; broken down
in ``lost_detail``), ``duplicated_tokens`` (indices the caller saw twice: must be 0), ``wire_duplicated_tokens``
(re-sent indices the SDK trimmed), ``gaps`` (missing indices), ``wrong_tokens``, ``instance_kills``,
``controller_kills``. Exit status 1 when ``lost``, ``duplicated_tokens``, ``gaps`` or ``wrong_tokens`` is non-zero.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import random
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.loadgen import (
    LoadPlan,
    LoadProcess,
    RequestSpec,
    Stack,
    cluster_config,
    count_outcomes,
    latency_summary,
    start_stack,
)

log = logging.getLogger("bench.chaos")


def trace_requests(duration_s: float, *, rate_scale: float, max_prompt: int, max_output: int,
                   prefix: str = "chaos") -> list[RequestSpec]:
    """The bundled Azure conversation slice from its start, ``rate_scale`` x its rate, arrivals < duration."""
    from sim.traces import default_trace

    tr = default_trace()
    if rate_scale != 1.0:
        tr = tr.scale_rate(rate_scale)
    out = []
    for i, (t, p, o) in enumerate(zip(tr.arrival_s, tr.prompt_tokens, tr.output_tokens)):
        if t >= duration_s:
            break
        out.append(RequestSpec(f"{prefix}-{i}", float(t), int(min(max(p, 1), max_prompt)),
                               int(min(max(o, 1), max_output))))
    return out


def kill_schedule(duration_s: float, instance_kills: int, controller_kills: int, seed: int) -> list[tuple[float, str]]:
    """Seeded kill times in [10%, 90%] of the load window, kinds shuffled."""
    rng = random.Random(seed)
    kinds = ["instance"] * instance_kills + ["controller"] * controller_kills
    rng.shuffle(kinds)
    times = sorted(rng.uniform(0.1 * duration_s, 0.9 * duration_s) for _ in kinds)
    return list(zip(times, kinds))


class Chaos:
    """Runs the schedule against a live stack; records every kill and how the cluster came back."""

    def __init__(self, stack: Stack, schedule: list[tuple[float, str]], *, seed: int, min_live: int = 1) -> None:
        self.stack = stack
        self.schedule = schedule
        self.rng = random.Random(seed + 1)
        self.min_live = min_live
        self.events: list[dict[str, Any]] = []
        self.instance_kills = 0
        self.controller_kills = 0
        self.min_members = 10**9
        self._prefix = f"llmsched/{stack.deployment.name}/inst/"

    def _live_instances(self) -> list[str]:
        import ray

        ns = self.stack.deployment.namespace
        return sorted(e["name"] for e in ray.util.list_named_actors(all_namespaces=True)
                      if e.get("namespace") == ns and e["name"].startswith(self._prefix))

    async def _kill_instance(self, t: float) -> None:
        import ray

        names = await asyncio.to_thread(self._live_instances)
        # Only instances the ingress currently routes to: a victim that is already dead-but-named teaches nothing.
        members = set(self.stack.ingress._members)
        names = [n for n in names if n[len(self._prefix):] in members]
        # A pool first, then one of its instances: a P/D cluster loses prefill and decode instances alike.
        pools: dict[str, list[str]] = {}
        for n in names:
            pools.setdefault(n[len(self._prefix):].rsplit("-", 1)[0], []).append(n)
        pools = {k: v for k, v in pools.items() if len(v) > self.min_live}
        if not pools:
            self.events.append({"t_s": round(t, 2), "kind": "instance",
                                "skipped": f"no pool has more than {self.min_live} live instance(s)"})
            return
        name = self.rng.choice(pools[self.rng.choice(sorted(pools))])
        iid = name[len(self._prefix):]
        on_it = len(self.stack.ingress.registry.on_instance(iid))
        handle = await asyncio.to_thread(ray.get_actor, name, namespace=self.stack.deployment.namespace)
        ray.kill(handle, no_restart=True)
        self.instance_kills += 1
        self.events.append({"t_s": round(t, 2), "kind": "instance", "target": iid, "streams_on_it": on_it})
        log.info("t=%.1fs killed instance %s (%d streams on it)", t, iid, on_it)

    async def _kill_controller(self, t: float) -> None:
        import ray

        ctrl = self.stack.deployment.controller
        try:  # the epoch changes with every incarnation: how we know the one answering later is a new one
            before = (await asyncio.wait_for(_await(ctrl.ping.remote()), 1.0)).get("epoch")
        except Exception:  # noqa: BLE001 - already down (a previous kill): any answer is a new incarnation
            before = None
        ray.kill(ctrl, no_restart=False)
        self.controller_kills += 1
        ev: dict[str, Any] = {"t_s": round(t, 2), "kind": "controller",
                              "in_flight": len(self.stack.ingress.registry)}
        self.events.append(ev)
        log.info("t=%.1fs killed the controller (%d streams in flight)", t, ev["in_flight"])
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < 60:  # how long until a new incarnation answers
            try:
                info = await asyncio.wait_for(_await(ctrl.ping.remote()), 2.0)
                if info.get("restarted") and info.get("epoch") != before:
                    ev["back_after_s"] = round(time.perf_counter() - t0, 2)
                    ev["adopted_instances"] = info.get("instances")
                    return
            except Exception as e:  # noqa: BLE001 - down or restarting
                log.debug("controller not back yet: %s", type(e).__name__)
            await asyncio.sleep(0.1)

    async def run(self, t0: float) -> None:
        watch = asyncio.ensure_future(self._watch())
        pending: list[asyncio.Future[None]] = []
        try:
            for at, kind in self.schedule:
                delay = at - (time.perf_counter() - t0)
                if delay > 0:
                    await asyncio.sleep(delay)
                t = time.perf_counter() - t0
                if kind == "instance":
                    await self._kill_instance(t)
                else:
                    pending.append(asyncio.ensure_future(self._kill_controller(t)))
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)
        finally:
            watch.cancel()

    async def _watch(self) -> None:
        while True:
            self.min_members = min(self.min_members, len(self.stack.ingress._members))
            await asyncio.sleep(0.1)


async def _await(ref: Any) -> Any:
    return await ref


async def wait_restored(stack: Stack, want: int, timeout_s: float) -> dict[str, Any]:
    """Wait until the Controller answers and runs ``want`` instances again (replacements included)."""
    t0 = time.perf_counter()
    info: dict[str, Any] = {}
    while time.perf_counter() - t0 < timeout_s:
        try:
            info = await asyncio.wait_for(_await(stack.deployment.controller.ping.remote()), 2.0)
            if info.get("instances") == want:
                break
        except Exception as e:  # noqa: BLE001 - down or restarting
            log.debug("controller not answering: %s", type(e).__name__)
        await asyncio.sleep(0.2)
    return {"controller_up": bool(info), "instances": info.get("instances"), "want": want}


async def run_chaos(args: argparse.Namespace, stack: Stack, want: int) -> dict[str, Any]:
    await stack.start_front()
    reqs = trace_requests(args.duration, rate_scale=args.rate_scale, max_prompt=args.max_prompt,
                          max_output=args.max_output)
    plan = LoadPlan(stack.address, reqs, vocab=32000, token_seed=args.seed, timeout_s=args.request_timeout,
                    stop_after_s=args.duration + args.drain_timeout, id_prefix="chaos")
    schedule = kill_schedule(args.duration, args.instance_kills, args.controller_kills, args.seed)
    chaos = Chaos(stack, schedule, seed=args.seed, min_live=args.min_live)
    load = LoadProcess(plan)
    try:
        await load.start()
        t0 = time.perf_counter()
        chaos_task = asyncio.ensure_future(chaos.run(t0))
        res = await load.result(args.duration + args.drain_timeout + 60)
        await chaos_task
        load_wall = time.perf_counter() - t0
    finally:
        load.kill()
    restored = await wait_restored(stack, want, 30.0)
    counters = dict(stack.ingress.counters)
    await stack.stop_front()
    out: dict[str, Any] = count_outcomes(res)
    out.update({
        "instance_kills": chaos.instance_kills,
        "controller_kills": chaos.controller_kills,
        "recoveries": counters.get("recoveries", 0),
        "handoffs": counters.get("handoffs", 0),
        # Handoffs whose decoder was lost before its first token, handed to another decoder (not re-prefilled).
        "handoffs_rerouted": counters.get("handoff_rerouted", 0),
        "min_live_instances_seen": chaos.min_members,
        "restored": restored,
        "events": chaos.events,
        "latency_completed": latency_summary(res),
        "load_wall_s": round(load_wall, 2),
        "failures": [{"rid": o.rid, "code": o.code, "message": o.message} for o in res
                     if o.outcome == "failed_with_status"][:20],
        "lost_requests": [{"rid": o.rid, "outcome": o.outcome, "reason": o.finish_reason, "tokens": o.tokens,
                           "max_tokens": o.max_tokens, "message": o.message} for o in res
                          if o.outcome not in ("completed", "failed_with_status", "not_sent")][:20],
    })
    return out


def print_table(r: dict[str, Any]) -> None:
    rows = [("sent", r["sent"]), ("completed", r["completed"]), ("failed_with_status", r["failed_with_status"]),
            ("lost (must be 0)", r["lost"]), ("duplicated_tokens (must be 0)", r["duplicated_tokens"]),
            ("wire_duplicated_tokens", r["wire_duplicated_tokens"]), ("gaps", r["gaps"]),
            ("wrong_tokens", r["wrong_tokens"]), ("instance_kills", r["instance_kills"]),
            ("controller_kills", r["controller_kills"]), ("recoveries (re-prefills)", r["recoveries"]),
            ("handoffs rerouted (KV kept)", r.get("handoffs_rerouted", 0)),
            ("client retries", r["client_retries"]), ("tokens received", r["tokens_received"])]
    print(f"{'chaos':<32}{'count':>10}")
    for k, v in rows:
        print(f"{k:<32}{v:>10}")
    if r["failed_status_codes"]:
        print("failed by status:", ", ".join(f"{k}={v}" for k, v in sorted(r["failed_status_codes"].items())))
    if r["lost"]:
        print("lost by kind:", ", ".join(f"{k}={v}" for k, v in r["lost_detail"].items() if v))
    lat = r["latency_completed"]
    print(f"completed TTFT p50/p99 {lat['ttft_p50_s']:.3f}/{lat['ttft_p99_s']:.3f}s, "
          f"TPOT p50/p99 {lat['tpot_p50_s'] * 1e3:.1f}/{lat['tpot_p99_s'] * 1e3:.1f}ms")
    for ev in r["events"]:
        print("  event:", json.dumps(ev))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llmsched bench chaos", description=__doc__.splitlines()[0])
    p.add_argument("--duration", type=float, default=60.0, help="seconds of trace load (and of chaos)")
    p.add_argument("--json", type=Path, help="write the counts here")
    p.add_argument("--instances", type=int, default=4, help="MIXED instances (ignored with --pd)")
    p.add_argument("--pd", action="store_true", help="2 PREFILL (h100) + 3 DECODE (a100) instead of MIXED")
    p.add_argument("--instance-kills", type=int, default=None, help="default: one per 8 s of load")
    p.add_argument("--controller-kills", type=int, default=None, help="default: one per 25 s of load, >= 1")
    p.add_argument("--min-live", type=int, default=1, help="never kill a pool below this many live instances")
    p.add_argument("--rate-scale", type=float, default=1.0, help="x the trace's request rate (~4.8 req/s)")
    p.add_argument("--max-prompt", type=int, default=1024)
    p.add_argument("--max-output", type=int, default=128)
    p.add_argument("--time-scale", type=float, default=2.0, help="simulated step time x this (slower = lighter)")
    p.add_argument("--fake-gpus", type=int, default=0, help="> 0: fake GPU worker nodes (heavier; 0 = one node)")
    p.add_argument("--request-timeout", type=float, default=120.0)
    p.add_argument("--drain-timeout", type=float, default=90.0, help="after the load window, for streams to end")
    p.add_argument("--seed", type=int, default=0)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.instance_kills is None:
        args.instance_kills = max(1, int(args.duration // 8))
    if args.controller_kills is None:
        args.controller_kills = max(1, int(args.duration // 25))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for noisy in ("scheduler.control.ingress", "scheduler.control.controller"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    name = "chaos-pd" if args.pd else "chaos"
    cfg = (cluster_config(name, mixed=0, prefill=2, decode=3) if args.pd
           else cluster_config(name, mixed=args.instances))
    want = cfg.num_instances
    t_start = time.perf_counter()
    stack = start_stack(cfg, time_scale=args.time_scale, fake_gpus=args.fake_gpus, seed=args.seed)
    try:
        result = asyncio.run(run_chaos(args, stack, want))
    finally:
        stack.shutdown()
    result.update({
        "config": {"pools": [f"{p.count}x {p.role.name} {p.gpu}" for p in cfg.pools], "duration_s": args.duration,
                   "rate_scale": args.rate_scale, "max_prompt": args.max_prompt, "max_output": args.max_output,
                   "time_scale": args.time_scale, "seed": args.seed, "trace": "azure_llm_2023_conv (bundled)"},
        "total_wall_s": round(time.perf_counter() - t_start, 1),
    })
    print_table(result)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2, default=str))
    bad = result["lost"] or result["duplicated_tokens"] or result["gaps"] or result["wrong_tokens"]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
