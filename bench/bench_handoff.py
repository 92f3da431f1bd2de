"""P->D handoff as a client sees it, on a live vLLM-CPU P/D cluster (``deploy/examples/cpu-pd.yaml`` by default):
the gap between token 0 (from the prefill instance) and token 1 (from the decode instance) minus one decode step,
and the time of token 1 since the request was sent (the gap alone rewards a slower token 0).

Three ingresses over one cluster, one running at a time, rounds in rotating order:

    default        the direct channel (control/channel.py); the prefill instance exports the prompt KV the moment
                   its prefill ends (``submit(export_on_finish=True)``), the decode instance gets it through Ray's
                   object store
    on_request     the same, but the export starts only when the ingress asks for it (one hop later)
    ray_calls      Ray actor calls only (``Ingress(direct=False)``), early export as ``default``

    llmsched bench handoff --json docs/results/handoff.json
    llmsched bench handoff --rounds 12 --prompts 64,512,960
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.loadgen import on_local_cluster, rotated, sole_ingress
from scheduler.telemetry.report import write_json


def _export_on_request(base: type) -> type:
    class ExportOnRequest(base):  # type: ignore[misc, valid-type]
        """The ingress as it was before early export: the prefill instance is not told to export at its end."""

        def _attempt(self, *args: Any, export: bool = False, **kwargs: Any) -> Any:
            return super()._attempt(*args, export=False, **kwargs)

    return ExportOnRequest


async def handoff_ms(ingress: Any, rid: str, prompt: tuple[int, ...], tokens: int) -> tuple[float, float]:
    """(client-seen gap token 0 -> token 1 minus the mean gap between the decode side's later tokens,
    token 1's time since the request was sent), ms."""
    from scheduler.control.api import GenerateRequest
    from scheduler.engine.base import SamplingParams

    times: list[float] = []
    t0 = time.perf_counter()
    req = GenerateRequest(rid, prompt_token_ids=prompt, sampling=SamplingParams(max_tokens=tokens, ignore_eos=True))
    async for c in ingress.generate(req):
        if c.token_ids:
            times.extend([time.perf_counter()] * len(c.token_ids))
    step = (times[-1] - times[1]) / max(len(times) - 2, 1)
    return (times[1] - times[0] - step) * 1e3, (times[1] - t0) * 1e3


async def bench(cluster: Any, args: argparse.Namespace) -> dict[str, Any]:
    from scheduler.control.ingress import Ingress
    from scheduler.control.tokenizer import make_tokenizer
    from sim.replay import prompt_ids

    dep = cluster.deployment
    tok = make_tokenizer(dep.config, dep.backend_kwargs)
    paths = {
        "default": cluster.ingress,
        "on_request": _export_on_request(Ingress)(dep.config, dep.controller, tokenizer=tok),
        "ray_calls": Ingress(dep.config, dep.controller, tokenizer=tok, direct=False),
    }
    prompts = [int(x) for x in args.prompts.split(",")]
    out: dict[str, dict[int, list[tuple[float, float]]]] = {p: {n: [] for n in prompts} for p in paths}
    k = 0
    for r in range(args.rounds + 1):  # round 0 warms every path up and is not recorded
        for name in rotated(list(paths), r):
            async with sole_ingress(paths[name], 0.3) as ing:
                for n in prompts:
                    k += 1
                    await asyncio.sleep(0.2)
                    ms = await handoff_ms(ing, f"handoff-{k}", tuple(prompt_ids(k + 10_000, n, args.vocab)),
                                          args.tokens)  # (gap, token 1 time)
                    if r:
                        out[name][n].append(ms)
    def med(i: int) -> dict[str, dict[str, float]]:
        return {p: {str(n): statistics.median(x[i] for x in v) for n, v in by.items()} for p, by in out.items()}

    return {"config": str(args.config), "rounds": args.rounds, "decode_tokens": args.tokens,
            "handoff_ms_median": med(0), "token1_ms_median": med(1),
            "samples_ms": {p: {str(n): v for n, v in by.items()} for p, by in out.items()}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="llmsched bench handoff", description=__doc__.splitlines()[0])
    p.add_argument("--config", type=Path, default=Path("deploy/examples/cpu-pd.yaml"))
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--prompts", default="64,960")
    p.add_argument("--tokens", type=int, default=8, help="output tokens per request (>= 3)")
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)

    res = on_local_cluster(args.config, bench, args)
    for key, what in (("handoff_ms_median", "handoff (gap token 0 -> 1 minus one decode step)"),
                      ("token1_ms_median", "token 1 since the request was sent")):
        med = res[key]
        sizes = list(next(iter(med.values())))
        print(f"{what}, median of {args.rounds} per cell, ms:")
        print(f"{'path':<12}" + "".join(f"{s + ' tok':>12}" for s in sizes))
        for name, by in med.items():
            print(f"{name:<12}" + "".join(f"{by[s]:>12.1f}" for s in sizes))
        for s in sizes:
            print(f"  {s} tokens: default / on_request {med['default'][s] / med['on_request'][s]:.2f}x, "
                  f"default / ray_calls {med['default'][s] / med['ray_calls'][s]:.2f}x")
    if args.json:
        write_json(args.json, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
