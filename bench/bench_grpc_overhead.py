"""Overhead of the gRPC layer (server + SDK + loopback) over calling the ingress directly, in the same run.

    python bench/bench_grpc_overhead.py            # 400 calls, 20 streams of 256 tokens
    python bench/bench_grpc_overhead.py --quick    # CI smoke
    python bench/bench_grpc_overhead.py --json out.json

The server runs in a child process (as in production: the client is another process); the ingress is
``EchoIngress`` with no per-token sleep, so what is measured is the front end's own cost. Baseline: the same
ingress awaited directly in this process. Prints p50/p99 and the ratio / absolute overhead of:

- per call: a 1-token Generate, send to last chunk (SDK ``Client.generate``);
- TTFT: send to first token of a 256-token stream;
- per streamed token: gap between consecutive tokens of that stream.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import multiprocessing as mp
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scheduler.client import Client
from scheduler.control.api import GenerateRequest
from scheduler.engine.base import SamplingParams
from scheduler.server.echo import EchoIngress


def _serve(port_q: mp.Queue, stop: mp.Event) -> None:  # type: ignore[type-arg]
    from scheduler.server.grpc_server import build_server

    async def main() -> None:
        srv = build_server(EchoIngress(max_model_len=1 << 20), port=0)
        await srv.start()
        port_q.put(srv.port)
        while not stop.is_set():
            await asyncio.sleep(0.05)
        await srv.stop(0.2)

    asyncio.run(main())


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


def summary(xs: list[float]) -> dict[str, float]:
    return {
        "p50_ms": pct(xs, 0.5) * 1e3,
        "p99_ms": pct(xs, 0.99) * 1e3,
        "mean_ms": statistics.fmean(xs) * 1e3,
    }


async def direct(calls: int, streams: int, tokens: int) -> dict[str, list[float]]:
    ingress = EchoIngress(max_model_len=1 << 20)
    call, ttft, gaps = [], [], []
    for i in range(calls):
        t = time.perf_counter()
        async for _ in ingress.generate(
            GenerateRequest(f"d{i}", prompt_token_ids=(1, 2, 3), sampling=SamplingParams(max_tokens=1))
        ):
            pass
        call.append(time.perf_counter() - t)
    for i in range(streams):
        t = time.perf_counter()
        times = []
        async for _ in ingress.generate(
            GenerateRequest(f"s{i}", prompt_token_ids=(1, 2, 3), sampling=SamplingParams(max_tokens=tokens))
        ):
            times.append(time.perf_counter() - t)
        ttft.append(times[0])
        gaps += [b - a for a, b in itertools.pairwise(times)]
    return {"call": call, "ttft": ttft, "token": gaps}


def via_grpc(address: str, calls: int, streams: int, tokens: int) -> dict[str, list[float]]:
    call, ttft, gaps = [], [], []
    with Client(address, timeout_s=30) as c:
        for _ in range(20):  # warm the channel
            c.generate([1, 2, 3], max_tokens=1)
        for _ in range(calls):
            t = time.perf_counter()
            c.generate([1, 2, 3], max_tokens=1)
            call.append(time.perf_counter() - t)
        for _ in range(streams):
            r = c.generate([1, 2, 3], max_tokens=tokens)
            assert [ch.index for ch in r.chunks] == list(range(tokens))
            ttft.append(r.ttft_s or 0.0)
            gaps += [b - a for a, b in itertools.pairwise(r.token_times)]
    return {"call": call, "ttft": ttft, "token": gaps}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="llmsched bench grpc", description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=400)
    ap.add_argument("--streams", type=int, default=20)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    if args.quick:
        args.calls, args.streams, args.tokens = 50, 3, 64

    ctx = mp.get_context("spawn")
    port_q, stop = ctx.Queue(), ctx.Event()
    proc = ctx.Process(target=_serve, args=(port_q, stop), daemon=True)
    proc.start()
    try:
        port = port_q.get(timeout=30)
        base = asyncio.run(direct(args.calls, args.streams, args.tokens))
        grpc_ = via_grpc(f"127.0.0.1:{port}", args.calls, args.streams, args.tokens)
    finally:
        stop.set()
        proc.join(5)
        if proc.is_alive():
            proc.terminate()

    out: dict[str, object] = {"calls": args.calls, "streams": args.streams, "tokens_per_stream": args.tokens}
    print(
        f"{'metric':<10}{'direct p50':>12}{'direct p99':>12}{'grpc p50':>10}{'grpc p99':>10}"
        f"{'overhead p50':>14}{'ratio p50':>11}"
    )
    for key in ("call", "ttft", "token"):
        d, g = summary(base[key]), summary(grpc_[key])
        over = g["p50_ms"] - d["p50_ms"]
        ratio = g["p50_ms"] / d["p50_ms"] if d["p50_ms"] > 0 else float("inf")
        out[key] = {"direct": d, "grpc": g, "overhead_p50_ms": over, "ratio_p50": ratio}
        print(
            f"{key:<10}{d['p50_ms']:>10.3f}ms{d['p99_ms']:>10.3f}ms{g['p50_ms']:>8.3f}ms{g['p99_ms']:>8.3f}ms"
            f"{over:>12.3f}ms{ratio:>10.1f}x"
        )
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
