"""Live vs simulated on a GPU: one engine replays a trace slice in real time, the simulator replays it in model time.

"One scheduling core, two clocks": both sides batch with the same ``EngineModel`` (continuous batching, chunked
prefill, paged-KV accounting). On the real clock each step it plans is executed on the GPU -- a whole
Llama-3-8B-shaped model (random bf16 weights, eager PyTorch, KV cache in GPU memory) over exactly the step's prompt
chunks and decodes -- and time advances by what the GPU took; on the model clock time advances by the latency
model's ``step_time`` (the vendored H200 profile, ``docs/latency.md``). Per request TTFT, TPOT and E2E from both
give the simulator's error on a GPU, with no host contention in the way (the 2-core VM's live runs,
docs/live_vs_sim.md, are dominated by it).

The latency model's engine overhead is a property of the engine, not the GPU: like ``llmsched profile`` on the
CPU, a short profile of this engine (lone decode steps and prompts) fits it first (``c0``: median of measured
minus the model's kernel time), and the simulation uses it. The shipped overhead (the H100 Splitwise fit) is
reported beside it.

    python bench/bench_gpu_replay.py --out DIR                      # on a GPU (about 2 minutes on an H200)
    python bench/bench_gpu_replay.py --out DIR --quick --device cpu # a smoke run: tiny shapes, a few requests

Limits, on purpose: decode attention runs each step's batch at its mean context (the same KV bytes and the same
attention term in the model), a prompt chunk after cached context attends non-causally to it (rare: the token
budget fits the slice's prompts whole), RoPE is left out (an elementwise pass, ~1 % of a step), and the forward
is eager (no CUDA graphs): its launches cost CPU time that the profile's fitted overhead stands for.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_gpu_kernels import PROFILES, _layer_weights, _sdpa, _shard, device_info
from scheduler.config.models import EngineSpec, GPUSpec
from scheduler.engine_model.model import EngineModel
from scheduler.latency import latency_for
from scheduler.latency.fit import kernel_time, spec_for
from sim.traces import default_trace

KV_CAPACITY_TOKENS = 1 << 18  # per layer: 32 layers x 2 x 262,144 x 8 x 128 x 2 B = 34 GiB on the GPU
QUICK_SHAPE = {"n_embd": 256, "n_expanded_embd": 896, "vocab_size": 2048, "num_layers": 2}
LOADS = ((1.0, 150), (4.0, 400))  # (rate scale, requests) of the trace's first requests
QUICK_LOADS = ((8.0, 12), (16.0, 24))
BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


class Executor:
    """A whole Llama-shaped model on one device that runs an ``EngineModel`` step's composition."""

    def __init__(self, shape: dict, dev: torch.device, kv_tokens: int) -> None:
        self.s = s = _shard(shape, 1)
        self.dev, self.dt = dev, torch.bfloat16
        self.layers = [_layer_weights(s, dev, self.dt) for _ in range(shape["num_layers"])]
        self.emb = torch.randn(shape["vocab_size"], s["hidden"], device=dev, dtype=self.dt) * 0.02
        self.head = torch.randn(s["hidden"], shape["vocab_size"], device=dev, dtype=self.dt) * 0.02
        self.norm = torch.ones(s["hidden"], device=dev, dtype=self.dt)
        self.kv_tokens = kv_tokens
        # K and V of a token side by side, as the QKV projection lays them out: one copy writes both.
        self.cache = [torch.zeros(kv_tokens, 2, s["kv"], s["d"], device=dev, dtype=self.dt) for _ in self.layers]
        self.vocab = shape["vocab_size"]
        self.capped = 0

    def sync(self) -> None:
        if self.dev.type == "cuda":
            torch.cuda.synchronize()

    def run(self, chunks: list[tuple[int, int]], batch: int, context: int) -> None:
        # Flash / memory-efficient attention only: cuDNN's builds a plan per new shape (tens of ms), and a
        # replay's every step has a new context length (the first GPU run spent ~80 ms per step on it).
        with torch.inference_mode(), sdpa_kernel(BACKENDS):
            self._run(chunks, batch, context)

    def _run(self, chunks: list[tuple[int, int]], batch: int, context: int) -> None:
        """Prompt chunks ``(context before, length)`` and ``batch`` decodes attending ``context`` tokens in all."""
        s = self.s
        h, d, heads, kv = s["hidden"], s["d"], s["heads"], s["kv"]
        qk, g = (heads + kv) * d, heads // kv
        p = sum(c for _, c in chunks)
        n = p + batch
        if n == 0:
            return
        ctx = -(-context // batch) if batch else 0
        if batch and batch * ctx > self.kv_tokens:
            self.capped += 1  # more KV than the buffer: attend to what fits (counted in the report)
            ctx = self.kv_tokens // batch
        y = F.embedding(torch.randint(0, self.vocab, (n,), device=self.dev), self.emb)
        for cache, w in zip(self.cache, self.layers):
            kc, vc = cache[:, 0], cache[:, 1]
            a = F.rms_norm(y, (h,), w["ln1"])
            qkv = a @ w["qkv"]
            cache[:n].copy_(qkv[:, heads * d:].view(n, 2, kv, d))  # the new tokens' KV into the cache
            parts, start = [], 0
            for before, c in chunks:
                q = qkv[start:start + c, : heads * d].view(c, heads, d).transpose(0, 1)[None]
                if before == 0:
                    k = qkv[start:start + c, heads * d: qk].view(c, kv, d).transpose(0, 1)[None]
                    v = qkv[start:start + c, qk:].view(c, kv, d).transpose(0, 1)[None]
                    o = _sdpa(q, k, v, True)
                else:
                    k = kc[: before + c].transpose(0, 1)[None]
                    v = vc[: before + c].transpose(0, 1)[None]
                    o = _sdpa(q, k, v, False)
                parts.append(o[0].transpose(0, 1).reshape(c, heads * d))
                start += c
            if batch:
                q = qkv[p:, : heads * d].view(batch, kv, g, d)
                k = kc[: batch * ctx].view(batch, ctx, kv, d).transpose(1, 2)
                v = vc[: batch * ctx].view(batch, ctx, kv, d).transpose(1, 2)
                parts.append(F.scaled_dot_product_attention(q, k, v).reshape(batch, heads * d))
            o = parts[0] if len(parts) == 1 else torch.cat(parts)
            y = torch.addmm(y, o, w["o"])
            b = F.rms_norm(y, (h,), w["ln2"])
            u = b @ w["up"]
            y = torch.addmm(y, F.silu(u[:, : s["ffn"]]) * u[:, s["ffn"]:], w["down"])
        rows = torch.arange(n - batch - len(chunks), n, device=self.dev)  # one sampled position per sequence
        (F.rms_norm(y[rows], (h,), self.norm) @ self.head).argmax(-1)
        self.sync()


def profile_overhead(ex: Executor, lat, quick: bool) -> dict:
    """This engine's per-step overhead beside the model's kernel time: lone decode steps and lone prompts."""
    points = [([], b, b * 1024) for b in ((1, 4) if quick else (1, 4, 16, 32, 64, 128))]
    points += [([(0, c)], 0, 0) for c in ((64,) if quick else (128, 512, 1024, 2048))]
    rows = []
    t_end = time.perf_counter() + (0.2 if quick else 4.0)
    while time.perf_counter() < t_end:  # the GPU idles at a low clock and ramps up under load (seen: 345 MHz idle)
        ex.run([], 32, 32 * 1024)
    for chunks, batch, ctx in points:
        for _ in range(2):  # warm-up: allocator, kernels of this shape
            ex.run(chunks, batch, ctx)
        ts = []
        for _ in range(10):
            t0 = time.perf_counter()
            ex.run(chunks, batch, ctx)
            ts.append(time.perf_counter() - t0)
        rows.append({"chunk": chunks[0][1] if chunks else 0, "batch": batch, "context": ctx,
                     "measured_s": statistics.median(ts), "kernel_model_s": kernel_time(lat, chunks, batch, ctx)})
    c0 = statistics.median(r["measured_s"] - r["kernel_model_s"] for r in rows)
    return {"points": rows, "overhead_s": max(c0, 0.0)}


def replay(em: EngineModel, arrivals: np.ndarray, prompts: np.ndarray, outputs: np.ndarray,
           ex: Executor | None) -> dict:
    """Drive ``em`` over the requests: on the real clock (``ex`` runs each step) or the model's (``ex`` None)."""
    n = len(arrivals)
    first = np.full(n, np.nan)
    finish = np.full(n, np.nan)
    steps = []
    i, t = 0, 0.0
    t_start = time.perf_counter()
    now = (lambda: time.perf_counter() - t_start) if ex is not None else (lambda: t)
    while i < n or em.has_work:
        if not em.has_work:
            if ex is not None:
                time.sleep(max(arrivals[i] - now(), 0.0))
            else:
                t = max(t, float(arrivals[i]))
        while i < n and arrivals[i] <= now():
            em.add_request(str(i), int(prompts[i]), int(outputs[i]))
            i += 1
        if not em.has_work:
            continue
        res = em.step(want_emitted=True)
        if ex is not None:
            t0 = now()
            ex.run(res.chunks or [], res.decode_batch, res.decode_context)
            t_end = now()
            steps.append((len(res.chunks or []), sum(c for _, c in res.chunks or []), res.decode_batch,
                          res.decode_context, t_end - t0, res.duration_s))
        else:
            t += res.duration_s
            t_end = t
        for seq in res.first_token:
            first[int(seq.rid)] = t_end
        for seq in res.finished:
            finish[int(seq.rid)] = t_end
    return {"first_s": first.tolist(), "finish_s": finish.tolist(), "steps": steps, "wall_s": now()}


def metrics(arrivals, outputs, first, finish) -> dict:
    first, finish = np.asarray(first), np.asarray(finish)
    ttft = first - arrivals
    e2e = finish - arrivals
    multi = outputs > 1
    tpot = (finish[multi] - first[multi]) / (outputs[multi] - 1)
    return {k: {"p50": float(np.percentile(v, 50)), "p90": float(np.percentile(v, 90))}
            for k, v in (("ttft_s", ttft), ("tpot_s", tpot), ("e2e_s", e2e))}


def error(sim: dict, live: dict) -> dict:
    return {f"{k}_{q}": 100 * (sim[k][q] / live[k][q] - 1) for k in live for q in ("p50", "p90")}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true", help="tiny shapes and a few requests: a smoke run")
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device; use --device cpu --quick for a smoke run", file=sys.stderr)
        return 2
    t_start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:6.1f}s] {msg}", flush=True)

    shape = json.loads(PROFILES.read_text())["models"]["llama38b"]
    if args.quick:
        shape = {**shape, **QUICK_SHAPE}
    model = spec_for(shape)
    gpu = GPUSpec.from_catalog("h200")
    shipped = latency_for(model, gpu, 1)  # quick: the roofline (the tiny shape has no profile)
    kv_tokens = 4096 if args.quick else KV_CAPACITY_TOKENS
    spec = EngineSpec(max_num_batched_tokens=4096, max_num_seqs=256, num_kv_blocks=kv_tokens // 16)
    ex = Executor(shape, dev, kv_tokens)
    log(f"model {shape['hf_name']} ({shape['num_layers']} layers) on {device_info(dev)['name']}; latency model "
        f"{shipped.source}")
    prof = profile_overhead(ex, shipped, args.quick)
    lat = dataclasses.replace(shipped, overhead_s=prof["overhead_s"])
    log(f"engine overhead fitted: {prof['overhead_s'] * 1e3:.2f} ms per step (shipped {shipped.overhead_s * 1e3:.2f})")
    trace = default_trace()
    result: dict[str, Any] = {"info": device_info(dev), "model": shape, "latency_source": shipped.source,
                              "engine": spec.model_dump(), "profile": prof, "trace": "azure_llm_2023_conv (bundled "
                              "first 10 min)", "runs": []}
    for scale, count in (QUICK_LOADS if args.quick else LOADS):
        t = trace.head(count).scale_rate(scale)
        arrivals = np.asarray(t.arrival_s, dtype=float) - float(t.arrival_s[0])
        prompts = np.minimum(np.asarray(t.prompt_tokens), 3072 if not args.quick else 256)
        outputs = np.minimum(np.maximum(np.asarray(t.output_tokens), 1), 1024 if not args.quick else 16)
        ex.capped = 0
        live = replay(EngineModel(lat, spec), arrivals, prompts, outputs, ex)
        run = {"rate_scale": scale, "requests": count, "live": metrics(arrivals, outputs, live["first_s"],
                                                                      live["finish_s"])}
        for name, model_lat in (("sim", lat), ("sim_shipped_overhead", shipped)):
            sim = replay(EngineModel(model_lat, spec), arrivals, prompts, outputs, None)
            run[name] = metrics(arrivals, outputs, sim["first_s"], sim["finish_s"])
            run[f"{name}_error_pct"] = error(run[name], run["live"])
        st = np.asarray(live["steps"], dtype=float)
        measured, modelled = st[:, 4], st[:, 5]  # the real clock's engine model runs on the fitted overhead
        ratio = modelled / measured
        run["steps"] = {"count": len(st), "measured_s_sum": float(measured.sum()),
                        "model_over_measured_p10_p50_p90": [float(x) for x in np.percentile(ratio, [10, 50, 90])],
                        "model_s_sum": float(modelled.sum()),
                        "median_abs_error_pct": float(np.median(np.abs(modelled / measured - 1)) * 100),
                        "mean_batch": float(st[:, 2].mean()), "max_batch": int(st[:, 2].max()),
                        "prompt_chunks": int(st[:, 0].sum()), "decode_context_capped_steps": ex.capped}
        run["live_per_request"] = {"arrival_s": arrivals.tolist(), "prompt": prompts.tolist(),
                                   "output": outputs.tolist(), "first_s": live["first_s"],
                                   "finish_s": live["finish_s"]}
        result["runs"].append(run)
        e = run["sim_error_pct"]
        log(f"rate x{scale}, {count} requests, {live['wall_s']:.1f}s live: steps {len(st)} (mean batch "
            f"{run['steps']['mean_batch']:.1f}), step model median |err| {run['steps']['median_abs_error_pct']:.1f}%;"
            " sim error TTFT {ttft_s_p50:+.0f}/{ttft_s_p90:+.0f}%, TPOT {tpot_s_p50:+.0f}/{tpot_s_p90:+.0f}%, "
            "E2E {e2e_s_p50:+.0f}/{e2e_s_p90:+.0f}%".format(**e))
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "gpu_replay.json").write_text(json.dumps(result, indent=1))
    result["profile_after"] = profile_overhead(ex, shipped, args.quick)
    (args.out / "gpu_replay.json").write_text(json.dumps(result, indent=1))
    log(f"engine overhead after the replays: {result['profile_after']['overhead_s'] * 1e3:.2f} ms; wrote "
        f"{args.out / 'gpu_replay.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
