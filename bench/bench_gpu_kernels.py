"""GPU kernel timings for the latency model: one decoder layer's GEMM-side work, attention, and KV-cache copies.

Measures, on whatever CUDA GPU it runs on (bf16, random weights, real model shapes; plain PyTorch, no vLLM):

* ``layers``: one decoder layer without the attention kernel -- RMSNorm, QKV projection, RoPE, O projection,
  residual add, RMSNorm, gated up projection, SiLU x mul, down projection, add -- for one TP shard of each
  profiled model shape (``scheduler/latency/data/profiles.json``), TP 1/2/4/8, over a grid of batch token counts.
  This is the quantity of the vendored Vidur tables' ``layer_ms`` column (the sum of the same operators' kernel
  times), so a new GPU family's rows come straight from it. Each timing replays a CUDA graph of ``copies``
  layers with distinct weights (so a small shard's weights do not sit in L2 between layers) and divides.
* ``emb`` / ``lm_head``: the embedding lookup and the vocabulary projection of ``n`` tokens.
* ``attention``: per layer and TP shard, causal prefill of ``n`` tokens (flash/cuDNN SDPA) and decode of a batch
  of ``b`` sequences of ``ctx`` cached tokens (grouped query heads folded into the query length, which is exact
  for one new token per sequence and reads each KV head once).
* ``kv_copy``: device->host (pinned and pageable), host->device and device->device bandwidth over sizes, and one
  request's paged KV (Llama-3-8B shape, 16-token blocks scattered over a 32-layer cache) gathered into a staging
  buffer, sent to pinned host memory and scattered back into another cache: the stage copy of a migration or a
  P->D handoff that goes through host memory.

    python bench/bench_gpu_kernels.py --out DIR             # on a GPU machine (about a minute on an H200)
    python bench/bench_gpu_kernels.py --out DIR --quick --device cpu   # a smoke run of the same code paths

Writes ``DIR/gpu_kernels.json``; ``python -m scheduler.latency.fit --gpu-kernels FILE`` turns it into the
vendored table rows and calibration of that GPU family (docs/latency.md).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

PROFILES = Path(__file__).resolve().parents[1] / "scheduler" / "latency" / "data" / "profiles.json"
GRID = (1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096)
QUICK_GRID = (1, 8, 64)
TPS = (1, 2, 4, 8)
L2_DEFEAT_BYTES = 256 << 20  # several times an H100/H200 L2 (50-60 MB)
MAX_COPIES = 8
TARGET_S = 0.015  # replay each graph for about this long, three times


class Clock:
    """Times a callable: CUDA graph replays between CUDA events on a GPU, plain calls on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"

    def time(self, fn: Callable[[], Any], *, target_s: float = TARGET_S, max_reps: int = 200) -> float:
        """Median seconds per call of ``fn`` over a few timed batches."""
        if not self.cuda:
            return _time_copy(fn, lambda: None, reps=3)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up on a side stream, as graph capture requires
            fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        graph.replay()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        one = max(start.elapsed_time(end) / 1e3, 1e-6)
        reps = int(min(max(target_s / one, 3), max_reps))
        samples = []
        for _ in range(3):
            start.record()
            for _ in range(reps):
                graph.replay()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) / 1e3 / reps)
        del graph
        return statistics.median(samples)


# ---- one decoder layer without attention -----------------------------------------------------------------------
def _shard(shape: dict, tp: int) -> dict[str, int]:
    hidden, heads, kv = shape["n_embd"], shape["n_head"], shape["n_kv_head"]
    d = hidden // heads
    return {"hidden": hidden, "d": d, "heads": heads // tp, "kv": max(kv // tp, 1),
            "ffn": shape["n_expanded_embd"] // tp}


def _layer_weights(s: dict[str, int], dev: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    h, d = s["hidden"], s["d"]

    def w(*size: int) -> torch.Tensor:
        return torch.randn(*size, device=dev, dtype=dtype) * 0.02

    return {"ln1": torch.ones(h, device=dev, dtype=dtype), "ln2": torch.ones(h, device=dev, dtype=dtype),
            "qkv": w(h, (s["heads"] + 2 * s["kv"]) * d), "o": w(s["heads"] * d, h),
            "up": w(h, 2 * s["ffn"]), "down": w(s["ffn"], h)}


def _layer_bytes(s: dict[str, int]) -> int:
    h, d = s["hidden"], s["d"]
    return 2 * (h * (s["heads"] + 2 * s["kv"]) * d + s["heads"] * d * h + 3 * h * s["ffn"])


def layer_fn(s: dict[str, int], weights: list[dict[str, torch.Tensor]], n: int, dev: torch.device,
             dtype: torch.dtype) -> Callable[[], torch.Tensor]:
    h, d, qk = s["hidden"], s["d"], (s["heads"] + s["kv"]) * s["d"]
    x = torch.randn(n, h, device=dev, dtype=dtype)
    rope = torch.randn(n, qk, device=dev, dtype=dtype)  # stands in for the fused cos/sin rotation: same bytes

    def run() -> torch.Tensor:
        y = x
        for w in weights:
            a = F.rms_norm(y, (h,), w["ln1"])
            qkv = a @ w["qkv"]
            q = qkv[:, :qk].mul_(rope)  # RoPE on q and k, in place as vLLM's kernel does
            z = q[:, : s["heads"] * d] @ w["o"]  # the attention output has q's shape; its kernel is timed apart
            y = y + z
            b = F.rms_norm(y, (h,), w["ln2"])
            u = b @ w["up"]
            m = F.silu(u[:, : s["ffn"]]) * u[:, s["ffn"]:]
            y = y + m @ w["down"]
        return y

    return run


def time_layers(clock: Clock, shapes: dict, grid: tuple[int, ...], dtype: torch.dtype, log) -> list[dict]:
    rows = []
    for key, shape in shapes.items():
        for tp in TPS:
            s = _shard(shape, tp)
            copies = min(max(math.ceil(L2_DEFEAT_BYTES / _layer_bytes(s)), 1), MAX_COPIES)
            if clock.device.type == "cpu":
                copies = 1
            weights = [_layer_weights(s, clock.device, dtype) for _ in range(copies)]
            emb = torch.randn(shape["vocab_size"] // tp, s["hidden"], device=clock.device, dtype=dtype) * 0.02
            head = torch.randn(s["hidden"], shape["vocab_size"] // tp, device=clock.device, dtype=dtype) * 0.02
            t0 = time.perf_counter()
            for i, n in enumerate(grid):
                per_layer = clock.time(layer_fn(s, weights, n, clock.device, dtype)) / copies
                row = {"model": key, "tp": tp, "num_tokens": n, "layer_ms": per_layer * 1e3, "copies": copies}
                if i % 3 == 0 or n == grid[-1]:  # the embedding and LM head are small: a coarser grid
                    ids = torch.randint(0, emb.shape[0], (n,), device=clock.device)
                    x = torch.randn(n, s["hidden"], device=clock.device, dtype=dtype)
                    row["emb_ms"] = clock.time(partial(F.embedding, ids, emb)) * 1e3
                    row["lm_head_ms"] = clock.time(partial(torch.matmul, x, head)) * 1e3
                rows.append(row)
            log(f"layers {key} tp{tp}: {len(grid)} points in {time.perf_counter() - t0:.1f}s, "
                f"n=1 {rows[-len(grid)]['layer_ms']:.3f} ms, n={grid[-1]} {rows[-1]['layer_ms']:.3f} ms")
            weights = emb = head = None  # free before the next shard's weights are made
            if clock.cuda:
                torch.cuda.empty_cache()
    return rows


# ---- attention -------------------------------------------------------------------------------------------------
def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    gqa = q.shape[1] != k.shape[1]
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)


def time_attention(clock: Clock, shapes: dict, quick: bool, dtype: torch.dtype, log) -> list[dict]:
    dev = clock.device
    rows = []
    cases = [("llama38b", 1), ("llama38b", 8), ("llama27b", 1), ("llama370b", 8)]
    prefill = (128, 512) if quick else (128, 256, 512, 1024, 2048, 4096, 8192)
    decode_b = (1, 4) if quick else (1, 4, 16, 64, 256)
    decode_ctx = (128, 512) if quick else (256, 1024, 4096, 16384)
    for key, tp in cases:
        s = _shard(shapes[key], tp)
        heads, kv, d = s["heads"], s["kv"], s["d"]
        for n in prefill:
            q = torch.randn(1, heads, n, d, device=dev, dtype=dtype)
            k = torch.randn(1, kv, n, d, device=dev, dtype=dtype)
            v = torch.randn(1, kv, n, d, device=dev, dtype=dtype)
            rows.append({"kind": "prefill", "model": key, "tp": tp, "heads": heads, "kv_heads": kv, "head_dim": d,
                         "tokens": n, "ms": clock.time(partial(_sdpa, q, k, v, True)) * 1e3})
        g = heads // kv
        for b in decode_b:
            for ctx in decode_ctx:
                kv_bytes = 2 * b * kv * ctx * d * 2
                if kv_bytes > 24 << 30:
                    continue
                copies = 1 if clock.device.type == "cpu" else min(max(math.ceil(L2_DEFEAT_BYTES / kv_bytes), 1),
                                                                  MAX_COPIES)
                qs = [torch.randn(b, kv, g, d, device=dev, dtype=dtype) for _ in range(copies)]
                ks = [torch.randn(b, kv, ctx, d, device=dev, dtype=dtype) for _ in range(copies)]
                vs = [torch.randn(b, kv, ctx, d, device=dev, dtype=dtype) for _ in range(copies)]

                def run(qs=qs, ks=ks, vs=vs) -> None:
                    for q, k, v in zip(qs, ks, vs):
                        _sdpa(q, k, v, False)

                rows.append({"kind": "decode", "model": key, "tp": tp, "heads": heads, "kv_heads": kv,
                             "head_dim": d, "batch": b, "context": ctx, "copies": copies,
                             "ms": clock.time(run) / copies * 1e3})
                qs = ks = vs = run = None
        last = [r for r in rows if r["kind"] == "prefill" and r["model"] == key and r["tp"] == tp][-1]
        log(f"attention {key} tp{tp}: prefill {last['tokens']} tokens {last['ms']:.3f} ms, decode b{rows[-1]['batch']} "
            f"ctx {rows[-1]['context']} {rows[-1]['ms']:.3f} ms")
    return rows


# ---- whole model steps -----------------------------------------------------------------------------------------
STEP_CACHE_BYTES = 40 << 30  # decode KV per step config at most (the caches of every layer)


class TinyLlama:
    """A whole Llama-shaped model (random weights, one GPU): embedding, ``num_layers`` decoder layers, final norm and
    the LM head over each sequence's last position, as vLLM computes logits only where it samples."""

    def __init__(self, shape: dict, dev: torch.device, dtype: torch.dtype) -> None:
        self.s = _shard(shape, 1)
        self.L = shape["num_layers"]
        self.layers = [_layer_weights(self.s, dev, dtype) for _ in range(self.L)]
        self.emb = torch.randn(shape["vocab_size"], self.s["hidden"], device=dev, dtype=dtype) * 0.02
        self.head = torch.randn(self.s["hidden"], shape["vocab_size"], device=dev, dtype=dtype) * 0.02
        self.norm = torch.ones(self.s["hidden"], device=dev, dtype=dtype)
        self.dev, self.dtype = dev, dtype

    def cache_bytes(self, batch: int, ctx: int) -> int:
        return self.L * 2 * batch * self.s["kv"] * ctx * self.s["d"] * 2

    def step_fn(self, chunk: int, batch: int, ctx: int) -> Callable[[], torch.Tensor]:
        """One engine step: a prompt chunk of ``chunk`` tokens (no cached context) and ``batch`` decodes of
        ``ctx`` cached tokens each."""
        s, dev, dt = self.s, self.dev, self.dtype
        h, d, heads, kv = s["hidden"], s["d"], s["heads"], s["kv"]
        qk, g, n = (heads + kv) * d, heads // kv, chunk + batch
        ids = torch.randint(0, self.emb.shape[0], (n,), device=dev)
        rope = torch.randn(n, qk, device=dev, dtype=dt)
        caches = [(torch.randn(batch, kv, ctx, d, device=dev, dtype=dt),
                   torch.randn(batch, kv, ctx, d, device=dev, dtype=dt)) for _ in range(self.L if batch else 0)]
        last = torch.tensor(([chunk - 1] if chunk else []) + list(range(chunk, n)), device=dev)

        def run() -> torch.Tensor:
            y = F.embedding(ids, self.emb)
            for i, w in enumerate(self.layers):
                a = F.rms_norm(y, (h,), w["ln1"])
                qkv = a @ w["qkv"]
                qkv[:, :qk].mul_(rope)
                parts = []
                if chunk:
                    q = qkv[:chunk, : heads * d].view(chunk, heads, d).transpose(0, 1)[None]
                    k = qkv[:chunk, heads * d: qk].view(chunk, kv, d).transpose(0, 1)[None]
                    v = qkv[:chunk, qk:].view(chunk, kv, d).transpose(0, 1)[None]
                    o = _sdpa(q, k, v, True)
                    parts.append(o[0].transpose(0, 1).reshape(chunk, heads * d))
                if batch:
                    q = qkv[chunk:, : heads * d].view(batch, kv, g, d)
                    kc, vc = caches[i]
                    o = F.scaled_dot_product_attention(q, kc, vc)
                    parts.append(o.reshape(batch, heads * d))
                o = parts[0] if len(parts) == 1 else torch.cat(parts)
                y = y + o @ w["o"]
                b = F.rms_norm(y, (h,), w["ln2"])
                u = b @ w["up"]
                y = y + (F.silu(u[:, : s["ffn"]]) * u[:, s["ffn"]:]) @ w["down"]
            return F.rms_norm(y[last], (h,), self.norm) @ self.head

        return run


def time_steps(clock: Clock, shapes: dict, quick: bool, dtype: torch.dtype, log) -> list[dict]:
    """Whole forward steps of Llama-3-8B and Llama-2-7B shapes (TP 1): decode-only, prefill-only and mixed."""
    rows = []
    decode = ((1, 128), (4, 128)) if quick else ((1, 512), (1, 2048), (8, 512), (8, 2048), (32, 512), (32, 2048),
                                                 (128, 512), (128, 1024), (256, 1024))
    prefill = (64,) if quick else (128, 512, 1024, 2048, 4096)
    mixed = ((64, 4, 128),) if quick else tuple((c, b, 1024) for c in (512, 2048) for b in (8, 32, 128))
    cases = [(0, b, ctx) for b, ctx in decode] + [(c, 0, 0) for c in prefill] + list(mixed)
    for key in ("llama38b", "llama27b"):
        model = TinyLlama(shapes[key], clock.device, dtype)
        t0 = time.perf_counter()
        for chunk, batch, ctx in cases:
            if model.cache_bytes(batch, ctx) > STEP_CACHE_BYTES:
                continue
            ms = clock.time(model.step_fn(chunk, batch, ctx)) * 1e3
            rows.append({"model": key, "tp": 1, "chunk": chunk, "batch": batch, "context": ctx, "ms": ms})
            if clock.cuda:
                torch.cuda.empty_cache()
        log(f"steps {key}: {sum(r['model'] == key for r in rows)} configs in {time.perf_counter() - t0:.1f}s; "
            + ", ".join(f"c{r['chunk']}/b{r['batch']}x{r['context']} {r['ms']:.2f} ms"
                        for r in rows if r["model"] == key)[:400])
        model = None
        if clock.cuda:
            torch.cuda.empty_cache()
    return rows


# ---- KV-cache copies -------------------------------------------------------------------------------------------
def _time_copy(fn: Callable[[], Any], sync: Callable[[], None], reps: int = 5) -> float:
    fn()
    sync()
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def time_kv_copy(clock: Clock, shapes: dict, quick: bool, dtype: torch.dtype, log) -> dict:
    dev = clock.device
    sync = torch.cuda.synchronize if clock.cuda else (lambda: None)
    pin = clock.cuda
    out: dict[str, Any] = {"bandwidth": [], "paged": []}
    sizes_mb = (1, 16) if quick else (1, 4, 16, 64, 256, 1024)
    for mb in sizes_mb:
        n = mb << 20
        src = torch.empty(n, dtype=torch.uint8, device=dev).random_(0, 255)
        dst = torch.empty_like(src)
        host = torch.empty(n, dtype=torch.uint8, pin_memory=pin)
        pageable = torch.empty(n, dtype=torch.uint8)
        row = {"mb": mb}
        for name, fn in (("d2h_pinned", partial(host.copy_, src, non_blocking=True)),
                         ("h2d_pinned", partial(src.copy_, host, non_blocking=True)),
                         ("d2h_pageable", partial(pageable.copy_, src)),
                         ("d2d", partial(dst.copy_, src))):
            s = _time_copy(fn, sync)
            row[name + "_gbps"] = n / s / 1e9
            row[name + "_ms"] = s * 1e3
        out["bandwidth"].append(row)
    # One request's paged KV, Llama-3-8B shape: per layer a K and a V cache of [blocks, 16, kv heads, head dim].
    s = _shard(shapes["llama38b"], 1)
    layers = 2 if quick else shapes["llama38b"]["num_layers"]
    block = 16
    num_blocks = 64 if quick else 4096
    caches = [torch.zeros(2, num_blocks, block, s["kv"], s["d"], device=dev, dtype=dtype) for _ in range(layers)]
    remote = [torch.zeros_like(c) for c in caches]
    per_token = 2 * layers * s["kv"] * s["d"] * 2
    out["paged_bytes_per_token"] = per_token
    gen = torch.Generator().manual_seed(0)
    for tokens in ((64, 256) if quick else (256, 1024, 4096, 16384)):
        nb = tokens // block
        src_ids = torch.randperm(num_blocks, generator=gen)[:nb].to(dev)
        dst_ids = torch.randperm(num_blocks, generator=gen)[:nb].to(dev)
        staging = torch.empty(layers, 2, nb, block, s["kv"], s["d"], device=dev, dtype=dtype)
        host = torch.empty(staging.shape, dtype=dtype, pin_memory=pin)
        back = torch.empty_like(staging)

        def gather(src_ids=src_ids, staging=staging) -> None:
            for i, c in enumerate(caches):
                torch.index_select(c, 1, src_ids, out=staging[i])

        def scatter(dst_ids=dst_ids, back=back) -> None:
            for i, c in enumerate(remote):
                c.index_copy_(1, dst_ids, back[i])

        def end_to_end(gather=gather, scatter=scatter, staging=staging, host=host, back=back) -> None:
            gather()
            host.copy_(staging, non_blocking=True)
            back.copy_(host, non_blocking=True)
            scatter()

        row = {"tokens": tokens, "bytes": tokens * per_token}
        for name, fn in (("gather", gather), ("d2h", partial(host.copy_, staging, non_blocking=True)),
                         ("h2d", partial(back.copy_, host, non_blocking=True)), ("scatter", scatter),
                         ("end_to_end", end_to_end)):
            row[name + "_ms"] = _time_copy(fn, sync) * 1e3
        row["end_to_end_gbps"] = row["bytes"] / (row["end_to_end_ms"] / 1e3) / 1e9
        out["paged"].append(row)
        log(f"paged KV {tokens} tokens ({row['bytes'] / 2**20:.0f} MiB): gather {row['gather_ms']:.2f} ms, "
            f"d2h {row['d2h_ms']:.2f}, h2d {row['h2d_ms']:.2f}, scatter {row['scatter_ms']:.2f}, "
            f"end to end {row['end_to_end_ms']:.2f} ms ({row['end_to_end_gbps']:.1f} GB/s)")
    return out


def device_info(dev: torch.device) -> dict:
    info = {"torch": torch.__version__, "python": platform.python_version(), "device": str(dev)}
    if dev.type == "cuda":
        p = torch.cuda.get_device_properties(dev)
        info.update(name=p.name, sm_count=p.multi_processor_count, memory_gib=p.total_memory / 2**30,
                    capability=f"{p.major}.{p.minor}", cuda=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version())
        try:
            info["nvidia_smi"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,driver_version,clocks.max.sm,clocks.max.mem,power.limit",
                 "--format=csv,noheader"], capture_output=True, text=True, timeout=20, check=False).stdout.strip()
        except (OSError, subprocess.SubprocessError) as e:
            info["nvidia_smi"] = f"unavailable: {e}"
    else:
        info["name"] = platform.processor() or "cpu"
    return info


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true", help="a small grid and one model: a smoke run")
    ap.add_argument("--sections", default="kv_copy,attention,layers,steps")
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device; use --device cpu for a smoke run", file=sys.stderr)
        return 2
    dtype = torch.bfloat16
    shapes = json.loads(PROFILES.read_text())["models"]
    if args.quick:
        shapes = {k: shapes[k] for k in ("llama38b", "llama27b", "llama370b")}
        shrink = {"n_embd": 512, "n_expanded_embd": 1792, "vocab_size": 4096}  # 16 heads of 32 (4 of 8 for kv)
        shapes = {k: {**v, **shrink, "num_layers": 2} for k, v in shapes.items()}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "gpu_kernels.json"
    t_start = time.perf_counter()
    result: dict[str, Any] = {"info": device_info(dev), "quick": args.quick, "dtype": "bfloat16",
                              "shapes": shapes, "errors": {}}
    clock = Clock(dev)

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:6.1f}s] {msg}", flush=True)

    log(f"device {result['info']}")
    grid = QUICK_GRID if args.quick else GRID
    for section in args.sections.split(","):
        try:
            if section == "layers":
                result["layers"] = time_layers(clock, shapes, grid, dtype, log)
            elif section == "attention":
                result["attention"] = time_attention(clock, shapes, args.quick, dtype, log)
            elif section == "steps":
                result["steps"] = time_steps(clock, shapes, args.quick, dtype, log)
            elif section == "kv_copy":
                result["kv_copy"] = time_kv_copy(clock, shapes, args.quick, dtype, log)
            else:
                raise ValueError(f"unknown section {section!r}")
        except Exception:  # noqa: BLE001 -- keep what the other sections measured
            result["errors"][section] = traceback.format_exc()
            log(f"{section} FAILED:\n{result['errors'][section]}")
        result["elapsed_s"] = time.perf_counter() - t_start
        path.write_text(json.dumps(result, indent=1))
    log(f"wrote {path}")
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
