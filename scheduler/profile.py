"""``llmsched profile``: measure a live engine's prefill and decode step times and fit a latency table.

The fit has the latency model's own form (``scheduler/latency/model.py``), so the simulator loads it as is::

    prefill(N)      = c + g1 * N + a_p * N (N + 1) / 2          (one request, N prompt tokens, TTFT)
    decode(b, ctx)  = c + g1 * b + a_d * b * ctx                (b requests decoding, ctx tokens each, TPOT)

``c`` is the per-step constant (scheduler, launch, and on the live path the gRPC + Ray hop: included on purpose,
since the simulator is compared with what clients see). Measured through the SDK against a running server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

import numpy as np

from scheduler.config.models import GPUSpec, ModelSpec
from scheduler.latency.model import GemmTable, LatencyModel

PREFILL_GRID = (32, 128, 256, 512, 768, 1024)
DECODE_GRID = ((1, 64), (2, 64), (4, 64), (8, 64), (8, 512), (16, 128))


async def measure(target: str, *, vocab: int = 1024, decode_tokens: int = 24, repeats: int = 3,
                  token: str | None = None) -> dict:
    """Prefill TTFTs and decode TPOTs over the grids, median of ``repeats``."""
    from scheduler.client import AsyncClient

    client = AsyncClient(target, token=token)
    rng = np.random.default_rng(0)
    prefill, decode = [], []
    n = 0

    async def one(prompt_len: int, max_tokens: int) -> tuple[float, float]:
        nonlocal n
        n += 1
        ids = rng.integers(4, vocab, prompt_len).tolist()
        t0 = time.perf_counter()
        times = []
        async for ch in client.stream(ids, max_tokens=max_tokens, temperature=0.0, ignore_eos=True,
                                      request_id=f"profile-{n}-{time.time_ns()}"):
            if ch.token_ids:
                times.extend([time.perf_counter()] * len(ch.token_ids))
        ttft = times[0] - t0
        tpot = (times[-1] - times[0]) / max(len(times) - 1, 1)
        return ttft, tpot

    try:
        for N in (16, 300, 1000):  # warm-up: first runs of a shape are several times slower on vLLM-CPU
            await one(N, 4)
        for N in PREFILL_GRID:
            ts = [(await one(N, 1))[0] for _ in range(repeats)]
            prefill.append((N, float(np.median(ts))))
        for b, ctx in DECODE_GRID:
            runs = []
            for _ in range(repeats):
                res = await asyncio.gather(*(one(ctx, decode_tokens) for _ in range(b)))
                runs.append(float(np.median([r[1] for r in res])))
            decode.append((b, ctx, float(np.median(runs))))
    finally:
        await client.close()
    return {"prefill": prefill, "decode": decode}


def fit(samples: dict) -> dict:
    """Least squares for ``(c, g1, a_p, a_d, s)`` over both kinds of samples, non-negative (scipy NNLS)."""
    from scipy.optimize import nnls

    rows, y = [], []
    for N, t in samples["prefill"]:
        rows.append([1.0, N, N * (N + 1) / 2, 0.0, 1.0])
        y.append(t)
    for b, ctx, t in samples["decode"]:
        rows.append([1.0, b, 0.0, b * (ctx + 12), b])  # ctx grows by half the decoded tokens on average
        y.append(t)
    A, Y = np.asarray(rows), np.asarray(y)
    scale = A.max(axis=0)  # column scaling: pairs are ~1e6, the intercept 1
    coef, _ = nnls((A / scale) / Y[:, None], np.ones_like(Y))  # relative-error weighting
    coef = coef / scale
    pred = A @ coef
    return {
        "overhead_s": float(coef[0]),
        "gemm_s_per_token": float(coef[1]),
        "attn_prefill_s_per_pair": float(coef[2]),
        "attn_decode_s_per_token": float(coef[3]),
        "per_seq_s": float(coef[4]),
        "fit_mape": float(np.mean(np.abs(pred - Y) / Y)),
        "samples": samples,
    }


def latency_from_profile(path: str | Path, model: ModelSpec, gpu: GPUSpec, tp: int = 1) -> LatencyModel:
    """The simulator's LatencyModel from a profile JSON written by ``llmsched profile``."""
    p = json.loads(Path(path).read_text())
    g = p["gemm_s_per_token"]
    gemm = GemmTable((1, 16384), (g, g * 16384), source=f"profile:{path}")
    return LatencyModel(model, gpu, tp, p["overhead_s"], p["attn_prefill_s_per_pair"], p["attn_decode_s_per_token"],
                        gemm, source=f"profile:{Path(path).name}", per_seq_s=p.get("per_seq_s", 0.0))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="llmsched profile", description=__doc__)
    ap.add_argument("--target", required=True, help="host:port of a running llmsched server (one instance is best)")
    ap.add_argument("--out", default="latency-profile.json")
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args(argv)
    prof = fit(asyncio.run(measure(args.target, vocab=args.vocab, repeats=args.repeats)))
    Path(args.out).write_text(json.dumps(prof, indent=2) + "\n")
    print(f"wrote {args.out}: overhead {prof['overhead_s'] * 1e3:.2f} ms, per-token {prof['gemm_s_per_token'] * 1e6:.1f} us, "
          f"fit error {prof['fit_mape'] * 100:.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
