"""Streaming through the live stack: tokens/s and host CPU per streamed token, direct channel vs Ray calls only.

One local cluster of real vLLM-CPU engines (``deploy/examples/cpu-pd.yaml`` by default), two ingresses over it in
this process: the default one (submit/poll on the instances' direct channels, ``control/channel.py``) and one with
``direct=False`` (every hot-path call a Ray actor call: the design before the channel). Only one of them runs at a
time (the other is closed: its 25 ms snapshot polls would load the box). Rounds alternate the two (rotating order)
with 1 and 2 concurrent greedy streams; per run: tokens/s per stream (first to last token) and the whole box's busy
CPU-seconds per streamed token from /proc/stat (the idle cluster's background included).

    llmsched bench stream-cpu --json docs/results/stream_cpu.json
    llmsched bench stream-cpu --rounds 5 --tokens 800

Why it matters: on a 2-core host a stream's pace is set by the stack's per-token wake-ups competing with the engine
step (docs/live_vs_sim.md), which the simulator does not model.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
import zlib
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.loadgen import on_local_cluster, rotated, sole_ingress
from scheduler.telemetry.report import write_json


def busy_jiffies() -> tuple[int, int]:
    """(busy, total) CPU jiffies of the whole box since boot."""
    with open("/proc/stat") as f:
        vals = [int(x) for x in f.readline().split()[1:]]
    idle = vals[3] + vals[4]  # idle + iowait
    return sum(vals) - idle, sum(vals)


async def run_streams(ingress: Any, tag: str, streams: int, tokens: int, prompt_len: int) -> dict[str, float]:
    from scheduler.control.api import GenerateRequest
    from scheduler.engine.base import SamplingParams

    async def one(k: int) -> tuple[float, float, int]:
        # A fresh prompt per stream (no prefix-cache hit), the same length every time.
        prompt = tuple(((k * 7919 + i * 31 + zlib.crc32(tag.encode())) % 900) + 50 for i in range(prompt_len))
        first = last = 0.0
        n = 0
        req = GenerateRequest(f"{tag}-{k}", prompt_token_ids=prompt,
                              sampling=SamplingParams(max_tokens=tokens, ignore_eos=True))
        async for c in ingress.generate(req):
            if c.token_ids:
                now = time.perf_counter()
                if n == 0:
                    first = now
                last = now
                n += len(c.token_ids)
        return first, last, n

    b0, t0 = busy_jiffies()
    w0 = time.perf_counter()
    res = await asyncio.gather(*(one(k) for k in range(streams)))
    wall = time.perf_counter() - w0
    b1, t1 = busy_jiffies()
    n_tok = sum(r[2] for r in res)
    hz = 100.0  # USER_HZ
    return {
        "tokens_per_s_per_stream": statistics.mean(r[2] / max(r[1] - r[0], 1e-9) for r in res),
        "ms_per_token": statistics.mean((r[1] - r[0]) / max(r[2] - 1, 1) * 1e3 for r in res),
        "cpu_ms_per_token": (b1 - b0) / hz / n_tok * 1e3,
        "box_busy": (b1 - b0) / max(t1 - t0, 1),
        "wall_s": wall,
    }


async def bench(cluster: Any, args: argparse.Namespace) -> dict[str, Any]:
    paths = {"direct": cluster.ingress, "ray_calls": cluster.deployment.make_ingress(direct=False)}

    async def segment(name: str, tag: str, streams: int, tokens: int) -> dict[str, float]:
        async with sole_ingress(paths[name], 0.5) as ing:
            return await run_streams(ing, tag, streams, tokens, args.prompt)

    for name in paths:  # warm-up: compile paths, fill caches
        await segment(name, f"warm-{name}", 1, 64)
    rows: dict[str, dict[int, list[dict[str, float]]]] = {p: {1: [], 2: []} for p in paths}
    for r in range(args.rounds):
        for streams in (1, 2):
            for name in rotated(list(paths), r):
                out = await segment(name, f"r{r}-{name}-{streams}", streams, args.tokens)
                rows[name][streams].append(out)
                print(f"round {r} {name:<9} streams={streams} {out['tokens_per_s_per_stream']:7.1f} tok/s/stream "
                      f"{out['cpu_ms_per_token']:6.2f} CPU-ms/token box {out['box_busy'] * 100:5.1f}%", flush=True)
    summary: dict[str, Any] = {}
    for name, by in rows.items():
        summary[name] = {
            str(s): {k: statistics.median(x[k] for x in xs) for k in ("tokens_per_s_per_stream", "ms_per_token",
                                                                        "cpu_ms_per_token", "box_busy")}
            for s, xs in by.items()
        }
    ratios = {
        str(s): {
            "tokens_per_s": summary["direct"][str(s)]["tokens_per_s_per_stream"]
            / summary["ray_calls"][str(s)]["tokens_per_s_per_stream"],
            "cpu_per_token": summary["direct"][str(s)]["cpu_ms_per_token"]
            / summary["ray_calls"][str(s)]["cpu_ms_per_token"],
        }
        for s in (1, 2)
    }
    return {"config": str(args.config), "rounds": args.rounds, "tokens": args.tokens, "prompt_tokens": args.prompt,
            "median": summary, "direct_over_ray_calls": ratios, "runs": rows}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="llmsched bench stream-cpu", description=__doc__.splitlines()[0])
    p.add_argument("--config", type=Path, default=Path("deploy/examples/cpu-pd.yaml"))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--tokens", type=int, default=600)
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)

    res = on_local_cluster(args.config, bench, args)
    print(f"medians over {args.rounds} rounds, {args.tokens} tokens per stream ({args.config}):")
    for s in ("1", "2"):
        d, r = res["median"]["direct"][s], res["median"]["ray_calls"][s]
        q = res["direct_over_ray_calls"][s]
        print(f"  {s} stream(s): direct {d['tokens_per_s_per_stream']:.0f} tok/s/stream, {d['cpu_ms_per_token']:.2f} "
              f"CPU-ms/token | Ray calls {r['tokens_per_s_per_stream']:.0f}, {r['cpu_ms_per_token']:.2f} | "
              f"direct/Ray: {q['tokens_per_s']:.2f}x tok/s, {q['cpu_per_token']:.2f}x CPU per token")
    if args.json:
        write_json(args.json, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
