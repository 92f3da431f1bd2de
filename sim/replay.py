"""``llmsched replay``: send a trace to a live cluster through the SDK at its timestamps; same report as the
simulator, so the two compare directly.

Each trace request becomes a prompt of ``prompt_tokens`` token ids (deterministic pseudo-random ids below the
model's vocabulary) with ``max_tokens = output_tokens`` and ``ignore_eos`` so the live engine produces exactly the
trace's output length. Lengths are clipped to fit the target model's context (``--max-model-len``) and the
clipping is reported, because a tiny CPU model cannot take a 30k-token Mooncake prompt.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from scheduler.core.metrics import RequestMetrics, percentiles, summarize


@dataclass
class LiveResult:
    """Per-request wall-clock columns of a live replay (seconds from the replay start)."""

    name: str
    arrival_s: np.ndarray
    prompt_tokens: np.ndarray
    output_tokens: np.ndarray
    first_token_s: np.ndarray
    finish_s: np.ndarray
    tokens_received: np.ndarray
    errors: list[str]
    wall_seconds: float
    duplicated_tokens: int = 0
    # When each request was handed to the SDK. TTFT and E2E count from here, as vLLM's benchmark_serving does:
    # the load generator wakes ~1 ms after a scheduled arrival (asyncio's epoll timeout is rounded up to whole
    # milliseconds), which is this process's delay, not the cluster's. The lateness is reported on its own.
    sent_s: np.ndarray | None = None
    started_wall_s: float | None = None  # time.time() at the replay start (to place server-side timestamps)

    def start_s(self) -> np.ndarray:
        """Per request, when the cluster's clock starts: sent, or the scheduled arrival if it was never sent."""
        if self.sent_s is None:
            return self.arrival_s
        return np.where(np.isfinite(self.sent_s), self.sent_s, self.arrival_s)

    def metrics(self, *, slo_ttft_s: float = np.inf, slo_tpot_s: float = np.inf) -> RequestMetrics:
        return RequestMetrics.from_times(self.start_s(), self.first_token_s, self.finish_s, self.output_tokens,
                                         slo_ttft_s=slo_ttft_s, slo_tpot_s=slo_tpot_s)

    def summary(self, **slo) -> dict:
        return summarize(self.metrics(**slo), requests=len(self.arrival_s), wall_seconds=self.wall_seconds,
                         events=int(self.tokens_received.sum()),
                         extra={"source": "live", "trace": self.name, "errors": len(self.errors),
                                "duplicated_tokens": self.duplicated_tokens,
                                "send_late_s": percentiles(self.start_s() - self.arrival_s)})

    @classmethod
    def from_columns(cls, cols: dict, *, name: str = "trace", wall_seconds: float = float("nan")) -> LiveResult:
        """Rebuild from the ``per_request`` columns ``llmsched run`` writes (seconds from the replay start)."""
        col = {k: np.asarray(v, dtype=float) for k, v in cols.items() if v is not None and k.startswith("live_")}
        out = np.asarray(cols["output_tokens"], dtype=np.int64)
        first, finish = col["live_first_s"], col["live_finish_s"]
        # Tokens received are not kept per request: a finished request received its output_tokens.
        got = np.where(np.isfinite(finish), out, 0)
        return cls(name, np.asarray(cols["arrival_s"], dtype=float), np.asarray(cols["prompt_tokens"]), out,
                   first, finish, got, [], wall_seconds, 0, col.get("live_sent_s"))


def fit_lengths(
    prompt: np.ndarray, output: np.ndarray, max_model_len: int, max_output: int
) -> tuple[np.ndarray, np.ndarray]:
    """Clip output to ``max_output`` and prompt so prompt + output fits the context."""
    out = np.clip(output, 1, max_output)
    pr = np.clip(prompt, 1, max_model_len - out - 1)
    return pr.astype(np.int64), out.astype(np.int64)


PREPARE_AHEAD_S = 0.02


def prompt_ids(i: int, n: int, vocab: int, seed: int = 0) -> list[int]:
    # Skip the first ids (special tokens in the tiny tokenizer) so prompts are plain text tokens.
    rng = np.random.default_rng((seed, i))
    return rng.integers(4, vocab, n).tolist()


async def replay_async(
    target: str,
    arrival_s: np.ndarray,
    prompt_tokens: np.ndarray,
    output_tokens: np.ndarray,
    *,
    name: str = "trace",
    vocab: int = 1024,
    token: str | None = None,
    timeout_s: float = 600.0,
    id_prefix: str = "replay",
    tenants: Sequence[str | None] | None = None,
) -> LiveResult:
    """``tenants``: each request's app (a trace's tenant column), sent as its ``tenant``, so the live length
    predictor sees what the simulator's does."""
    from scheduler.client import AsyncClient

    n = len(arrival_s)
    first = np.full(n, np.nan)
    finish = np.full(n, np.nan)
    got = np.zeros(n, dtype=np.int64)
    sent = np.full(n, np.nan)
    errors: list[str] = []
    dup = 0
    client = AsyncClient(target, token=token)
    t0 = time.perf_counter()
    wall0 = time.time()

    async def one(i: int) -> None:
        nonlocal dup
        # Build the prompt a little ahead of its arrival (not all at once: a long trace's prompts would not fit).
        ahead = arrival_s[i] - PREPARE_AHEAD_S - (time.perf_counter() - t0)
        if ahead > 0:
            await asyncio.sleep(ahead)
        ids = prompt_ids(i, int(prompt_tokens[i]), vocab)
        delay = arrival_s[i] - (time.perf_counter() - t0)
        if delay > 0:
            await asyncio.sleep(delay)
        seen = -1
        sent[i] = time.perf_counter() - t0
        try:
            async for chunk in client.stream(
                ids, max_tokens=int(output_tokens[i]), temperature=0.0,
                request_id=f"{id_prefix}-{i}", ignore_eos=True, timeout_s=timeout_s,
                tenant=str(tenants[i]) if tenants is not None and tenants[i] else None,  # "" / None: unset
            ):
                now = time.perf_counter() - t0
                if chunk.token_ids:
                    if chunk.index <= seen:
                        dup += 1
                    seen = chunk.index + len(chunk.token_ids) - 1
                    if np.isnan(first[i]):
                        first[i] = now
                    got[i] += len(chunk.token_ids)
                if chunk.finished:
                    finish[i] = now
        except Exception as e:  # noqa: BLE001 -- whatever fails one request is recorded, never silently dropped
            errors.append(f"request {i}: {type(e).__name__}: {e}")

    try:
        await asyncio.gather(*(one(i) for i in range(n)))
    finally:
        await client.close()
    return LiveResult(name, np.asarray(arrival_s, dtype=float), prompt_tokens, output_tokens, first, finish, got,
                      errors, time.perf_counter() - t0, dup, sent, wall0)


def main(argv: list[str] | None = None) -> int:
    from scheduler.cli_args import output_file, positive_float, positive_int, token_vocab
    from scheduler.telemetry.report import print_summaries, write_json
    from sim.traces import default_trace, load_trace

    p = argparse.ArgumentParser(prog="llmsched replay", description=__doc__)
    p.add_argument("--trace", help="trace file (default: the bundled Azure slice)")
    p.add_argument("--format")
    p.add_argument("--target", required=True, help="host:port of the llmsched gRPC server")
    p.add_argument("--limit", type=positive_int, default=50, help="send the first N requests (default: %(default)s)")
    p.add_argument("--rate-scale", type=positive_float, default=1.0)
    p.add_argument("--max-model-len", type=positive_int, default=2048)
    p.add_argument("--max-output", type=positive_int, default=256)
    p.add_argument("--vocab", type=token_vocab, default=1024)
    p.add_argument("--token", help="client token when the server requires auth")
    p.add_argument("--config", default="default",
                   help="cluster config whose class-0 SLOs score slo_attainment, as in llmsched simulate (default: "
                        "%(default)s; use the served cluster's config)")
    p.add_argument("--json", type=output_file)
    args = p.parse_args(argv)
    if args.max_output > args.max_model_len - 2:  # fit_lengths needs room for a prompt of at least one token
        p.error(f"--max-output: must be at most --max-model-len - 2 ({args.max_model_len - 2}), got {args.max_output}")
    from scheduler.config.load import ConfigError, load_config

    try:
        slo = load_config(args.config).slo_for(0)
    except (ConfigError, OSError, ValueError) as e:
        p.error(f"--config: {e}")
    try:
        trace = load_trace(args.trace, args.format) if args.trace else default_trace()
    except (OSError, ValueError) as e:  # missing file, malformed trace (TraceFormatError names line and column)
        p.error(f"--trace: {e}")
    if args.limit:
        trace = trace.head(args.limit)
    if args.rate_scale != 1.0:
        trace = trace.scale_rate(args.rate_scale)
    pr, out = fit_lengths(trace.prompt_tokens, trace.output_tokens, args.max_model_len, args.max_output)
    res = asyncio.run(replay_async(args.target, trace.arrival_s, pr, out, name=trace.name, vocab=args.vocab,
                                   token=args.token, tenants=trace.tenant))
    s = res.summary(slo_ttft_s=slo.ttft_s or np.inf, slo_tpot_s=slo.tpot_s or np.inf)
    s["slo"] = {"ttft_s": slo.ttft_s, "tpot_s": slo.tpot_s, "config": args.config}
    s["clipped_prompts"] = int((pr < trace.prompt_tokens).sum())
    s["clipped_outputs"] = int((out < trace.output_tokens).sum())
    print_summaries({"live": s}, title=f"replay of {trace.name} ({len(pr)} req) against {args.target}")
    for e in res.errors[:5]:
        print("  error:", e, file=sys.stderr)
    if args.json:
        write_json(args.json, s)
    return 0 if not res.errors else 1
