"""Control-plane overhead added to TTFT, in one run: the same simulated engine (``time_scale`` 0: every modelled
step takes no time, so what is left is our own cost) measured three ways, interleaved request by request:

    in-process   SimulatedBackend.generate() in this process (the engine alone: the baseline)
    ingress      LocalCluster.ingress.generate(): validate, route on the cached view, Instance.submit over the
                 direct channel (control/channel.py)
    ingress_ray  the same with Ray actor calls only (``Ingress(direct=False)``: the design before the channel)
    grpc         AsyncClient.stream() -> gRPC server (loopback) -> the channel ingress -> ... (client in this
                 process: it shares the server's event loop)
    grpc_remote  the same from a client in its own process, as real clients are (``--remote-client``; the
                 parent only tells it when to send, the TTFT is timed in the child)

plus router throughput: ``router.route(info, view)`` decisions per second, per router, on the ingress' live view
(2 instances), on a 64-instance view built from it, and on that view with ``--residents`` running requests in
every snapshot, as a loaded live instance reports them (pure policy cost: no Ray, no I/O). The idle views alone
hid costs that grow with the batch: lookahead and llumnix walked every resident of every candidate per decision.

    llmsched bench control-plane
    llmsched bench control-plane --requests 500 --json cp.json

Target (issue 3): the whole control plane -- router + gRPC + Ray hop, i.e. the ``grpc_remote`` path -- adds < 2 ms
p50 to TTFT over in-process. The same-process ``grpc`` path (client and server on one event loop and one GIL, so the
client's own work queues behind the server's) and the ``ingress`` path (no gRPC) are shown beside it.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.loadgen import cluster_config, pct, rotated
from scheduler.telemetry.report import write_json

PROMPT = tuple(range(1, 129))  # 128 tokens
MAX_TOKENS = 4


async def ttft_inprocess(backend: Any, rid: str) -> float:
    from scheduler.engine.base import EngineRequest, SamplingParams

    t = time.perf_counter()
    stream = backend.generate(EngineRequest(rid, PROMPT, SamplingParams(max_tokens=MAX_TOKENS)))
    first = None
    async for c in stream:
        if first is None and c.token_ids:
            first = time.perf_counter() - t
    assert first is not None
    return first


async def ttft_ingress(ingress: Any, rid: str) -> float:
    from scheduler.control.api import GenerateRequest
    from scheduler.engine.base import SamplingParams

    t = time.perf_counter()
    first = None
    async for c in ingress.generate(GenerateRequest(rid, prompt_token_ids=PROMPT,
                                                    sampling=SamplingParams(max_tokens=MAX_TOKENS))):
        if first is None and c.token_ids:
            first = time.perf_counter() - t
    assert first is not None
    return first


async def ttft_grpc(client: Any, rid: str) -> float:
    t = time.perf_counter()
    first = None
    async for c in client.stream(list(PROMPT), max_tokens=MAX_TOKENS, request_id=rid, ignore_eos=True):
        if first is None and c.token_ids:
            first = time.perf_counter() - t
    assert first is not None
    return first


def remote_client(address: str) -> None:
    """``--remote-client``: one TTFT per line read from stdin (the request id), printed in seconds."""

    async def main() -> None:
        from scheduler.client import AsyncClient

        client = AsyncClient(address)
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        while line := await reader.readline():
            print(await ttft_grpc(client, line.decode().strip()), flush=True)
        await client.close()

    asyncio.run(main())


async def start_remote_client(address: str) -> Any:
    """A child process running :func:`remote_client`; returns ``ttft(rid)`` and the process."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.bench_control_plane", "--remote-client", address,
        cwd=str(Path(__file__).resolve().parents[1]), stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)

    async def ttft(rid: str) -> float:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(f"{rid}\n".encode())
        await proc.stdin.drain()
        line = await proc.stdout.readline()
        if not line:
            raise RuntimeError("the remote client exited")
        return float(line)

    return ttft, proc


def router_rate(router: Any, view: Any, seconds: float) -> dict[str, float]:
    from scheduler.core.types import RequestInfo

    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _ in range(100):
            info = RequestInfo(f"r{n}", 0.0, 512, 128)
            router.route(info, view)
            n += 1
    dt = time.perf_counter() - t0
    return {"instances": len(view.instances), "decisions_per_s": round(n / dt), "us_per_decision": dt / n * 1e6}


def wide_view(view: Any, n: int, residents: int = 0) -> Any:
    """``n`` copies of ``view``'s instances; ``residents``: each decoding that many requests (listed, as live
    snapshots list them), contexts of 600-1100 tokens, KV counted for them."""
    from scheduler.core.types import ClusterView, RequestLoad

    base = view.instances
    snaps = []
    for i in range(n):
        s = dataclasses.replace(base[i % len(base)], instance_id=f"x-{i}")
        if residents:
            reqs = tuple(RequestLoad(f"x{i}-{j}", 600 + (37 * j) % 500, 50, float(10 + (53 * j) % 400))
                         for j in range(residents))
            ctx = sum(r.context_tokens for r in reqs)
            pred = sum(r.predicted_remaining or 0.0 for r in reqs)
            s = dataclasses.replace(s, requests=reqs, num_running=residents, num_decoding=residents,
                                    decode_context_tokens=ctx, predicted_remaining_tokens=pred,
                                    num_predicted=residents,
                                    kv_blocks_used=min(-(-ctx // s.block_size) + residents, s.kv_blocks_total))
        snaps.append(s)
    return ClusterView(view.time_s, tuple(snaps))


async def run(args: argparse.Namespace, cluster: Any) -> dict[str, Any]:
    from scheduler.client import AsyncClient
    from scheduler.engine.simulated_backend import SimulatedBackend
    from scheduler.policy.route import make_router
    from scheduler.server.grpc_server import build_server

    cfg = cluster.deployment.config
    pool = cfg.pools[0]
    backend = SimulatedBackend(cfg.model, cfg.gpus[pool.gpu], engine=pool.engine, time_scale=0.0)
    await backend.start()
    ingress = cluster.ingress
    await ingress.start()
    ray_ingress = cluster.deployment.make_ingress(refresh_s=0.025, direct=False)
    await ray_ingress.start()
    server = build_server(ingress, port=0)
    await server.start()
    client = AsyncClient(f"127.0.0.1:{server.port}")
    remote, remote_proc = await start_remote_client(f"127.0.0.1:{server.port}")
    out: dict[str, list[float]] = {"in_process": [], "ingress": [], "ingress_ray": [], "grpc": [], "grpc_remote": []}
    fns = {"in_process": lambda r: ttft_inprocess(backend, r), "ingress": lambda r: ttft_ingress(ingress, r),
           "ingress_ray": lambda r: ttft_ingress(ray_ingress, r), "grpc": lambda r: ttft_grpc(client, r),
           "grpc_remote": remote}
    try:
        for i in range(args.warmup):
            for k, fn in fns.items():
                await fn(f"w-{k}-{i}")
        for i in range(args.requests):
            for k in rotated(list(fns), i):
                if args.idle_ms:  # spaced arrivals: the stack has gone idle before each request
                    await asyncio.sleep(args.idle_ms / 1e3)
                out[k].append(await fns[k](f"m-{k}-{i}"))
        routers = []
        for name in args.routers.split(","):
            views = (ingress.view(), wide_view(ingress.view(), 64), wide_view(ingress.view(), 64, args.residents))
            for view in views:
                residents = len(view.instances[0].requests) if view.instances else 0
                try:
                    routers.append({"router": name, "residents": residents,
                                    **router_rate(make_router(name), view, args.router_s)})
                except Exception as e:  # noqa: BLE001 - a router that cannot run here is reported, not fatal
                    routers.append({"router": name, "instances": len(view.instances), "residents": residents,
                                    "error": repr(e)[:200]})
    finally:
        if remote_proc.stdin is not None:
            remote_proc.stdin.close()
        try:
            await asyncio.wait_for(remote_proc.wait(), 10)
        except TimeoutError:
            remote_proc.kill()
        await client.close()
        await server.stop(0.2)
        await ingress.close()
        await ray_ingress.close()
        await backend.shutdown()
    base50, base99 = pct(out["in_process"], 50), pct(out["in_process"], 99)
    res: dict[str, Any] = {"requests": args.requests, "idle_ms": args.idle_ms, "prompt_tokens": len(PROMPT),
                           "router": ingress.router.name,
                           "instances": len(ingress.view().instances), "ttft_ms": {}, "overhead_ms": {}}
    for k, xs in out.items():
        res["ttft_ms"][k] = {"p50": pct(xs, 50) * 1e3, "p99": pct(xs, 99) * 1e3}
        if k != "in_process":
            res["overhead_ms"][k] = {"p50": (pct(xs, 50) - base50) * 1e3, "p99": (pct(xs, 99) - base99) * 1e3}
    res["router_decisions"] = routers
    res["target_p50_overhead_ms"] = 2.0
    res["meets_target"] = bool(res["overhead_ms"]["grpc_remote"]["p50"] < 2.0)
    res["meets_target_same_process_client"] = bool(res["overhead_ms"]["grpc"]["p50"] < 2.0)
    return res


def print_table(r: dict[str, Any]) -> None:
    print(f"TTFT, {r['requests']} sequential requests ({r['idle_ms']:g} ms idle before each), "
          f"{r['prompt_tokens']}-token prompt, engine time_scale 0, "
          f"router {r['router']} over {r['instances']} instances")
    print(f"{'path':<12}{'p50 ms':>10}{'p99 ms':>10}{'+p50 ms':>10}{'+p99 ms':>10}")
    for k, v in r["ttft_ms"].items():
        o = r["overhead_ms"].get(k, {"p50": 0.0, "p99": 0.0})
        print(f"{k:<12}{v['p50']:>10.3f}{v['p99']:>10.3f}{o['p50']:>10.3f}{o['p99']:>10.3f}")
    for d in r["router_decisions"]:
        if "error" in d:
            print(f"{d['router']:<18} over {d['instances']:>3} instances, {d.get('residents', 0):>3} running each: "
                  f"{d['error']}")
            continue
        print(f"{d['router']:<18} over {d['instances']:>3} instances, {d.get('residents', 0):>3} running each: "
              f"{d['decisions_per_s']:>9,} decisions/s ({d['us_per_decision']:.1f} us each)")
    print(f"target: control-plane (gRPC path, client in its own process) overhead p50 < "
          f"{r['target_p50_overhead_ms']} ms -> {'met' if r['meets_target'] else 'NOT met'} "
          f"(client in the server's process: {'met' if r['meets_target_same_process_client'] else 'NOT met'})")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="llmsched bench control-plane", description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=300)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--idle-ms", type=float, default=0.0,
                   help="idle time before each measured request (0: back to back; trace arrivals are spaced)")
    p.add_argument("--instances", type=int, default=2)
    p.add_argument("--router-s", type=float, default=0.5, help="seconds per router and view")
    p.add_argument("--residents", type=int, default=128,
                   help="running requests in each snapshot of the loaded 64-instance view")
    p.add_argument("--routers", default="least_outstanding,power_of_two,llumnix,mixing,lookahead,learned")
    p.add_argument("--json", type=Path)
    p.add_argument("--remote-client", metavar="ADDRESS", help=argparse.SUPPRESS)  # the grpc_remote child
    args = p.parse_args(argv)
    if args.remote_client:
        remote_client(args.remote_client)
        return 0

    from scheduler.control.cluster import start_local_cluster

    cfg = cluster_config("cp", mixed=args.instances)
    cluster = start_local_cluster(cfg, backend_kwargs={"simulated": {"time_scale": 0.0}},
                                  ingress_kwargs={"refresh_s": 0.025})
    try:
        res = asyncio.run(run(args, cluster))
    finally:
        cluster.shutdown()
    print_table(res)
    if args.json:
        write_json(args.json, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
