"""Step-time model for one (model, GPU type, TP degree): pure functions of the batch.

A vLLM step runs every scheduled token through the same GEMMs and then does attention per request::

    step_time = overhead
              + gemm(num_tokens)                          # QKV/O/MLP GEMMs, norms, TP all-reduce; per step
              + attn_prefill * sum(chunk * (ctx + chunk/2)) # prefill attention: query x key pairs
              + attn_decode * sum(decode context tokens)    # decode attention: KV bytes read

``gemm`` is a piecewise-linear table over ``num_tokens`` fitted from profiles (Vidur per-operator MLP profiles)
or, for an unprofiled (model, GPU) pair, the roofline ``max(FLOPs / peak, bytes / bandwidth)``.

The decode-only step is affine in the summed context (``decode_coeffs``): the simulator advances many
identical-composition decode steps in closed form from that.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import numpy as np

from scheduler.config.models import GPUSpec, ModelSpec


@dataclass(frozen=True)
class GemmTable:
    """Per-step GEMM time (s) vs tokens in the batch, interpolated linearly, extrapolated on the last slope."""

    num_tokens: tuple[int, ...]
    seconds: tuple[float, ...]
    source: str = "profile"

    def __call__(self, n: int) -> float:
        xs, ys = self.num_tokens, self.seconds
        if n <= xs[0]:
            return ys[0]
        if n >= xs[-1]:
            slope = (ys[-1] - ys[-2]) / (xs[-1] - xs[-2]) if len(xs) > 1 else ys[-1] / xs[-1]
            return ys[-1] + slope * (n - xs[-1])
        # Scalar bisect: np.interp's array set-up costs ~10x more per call, and the simulator calls this per step.
        k = bisect.bisect_right(xs, n)
        x0, x1, y0 = xs[k - 1], xs[k], ys[k - 1]
        return y0 + (ys[k] - y0) * (n - x0) / (x1 - x0)


@dataclass(frozen=True)
class LatencyModel:
    """Latency of one instance: ``model`` on ``tp`` GPUs of type ``gpu``. All times in seconds."""

    model: ModelSpec
    gpu: GPUSpec
    tp: int
    overhead_s: float
    attn_prefill_s_per_pair: float
    attn_decode_s_per_token: float
    gemm: GemmTable
    source: str = "roofline"
    # Per scheduled sequence (sampling, block tables, Python bookkeeping): small on GPUs next to the GEMMs, but it
    # is most of a decode step on the vLLM CPU build. Fitted by `llmsched profile`.
    per_seq_s: float = 0.0
    # Measured by `llmsched profile` on a live cluster (0 / empty elsewhere):
    # the per-request path latency a client sees once per request (gRPC, ingress, Ray hop, engine IPC), not
    # once per step; it delays a request's whole stream and occupies no engine.
    request_latency_s: float = 0.0
    request_latency_s_per_token: float = 0.0  # the path's part that grows with the prompt (ids on the wire, hashing)
    # The P->D handoff as measured end to end (KV export, object store, import, decode admission):
    # ``handoff_s + handoff_s_per_token * prompt_tokens``; ``None``: the link model (``kv_transfer_time``).
    handoff_s: float | None = None
    handoff_s_per_token: float = 0.0
    # Step-time factor by number of engines busy on one host (index 0: this engine alone): engines that share
    # a host's cores (the vLLM CPU build) slow each other down. Beyond the table: its last slope.
    host_contention: tuple[float, ...] = (1.0,)
    # The same for a decode engine's steps where the profile measured them from the decoders' side too (decode
    # streams while the prefill engine works: a decode step there is not slowed as a prefill is). Empty: the table
    # above for every engine.
    host_contention_decode: tuple[float, ...] = ()
    # First step at a batch token count the engine has not run recently: extra time on top of the step,
    # ``(tokens, seconds)`` points, interpolated (flat past the ends). The vLLM CPU build's oneDNN GEMMs build a
    # kernel per token count, kept in a per-weight-shape LRU of ``shape_cache_size`` (0: no such cost, as on GPUs).
    # Measured by `llmsched profile`.
    new_shape_table: tuple[tuple[int, float], ...] = ()
    shape_cache_size: int = 0
    # Host CPU a request costs outside its own engine steps (request handling in the engines, the actors' hops, KV
    # export and import, gRPC): ``request_cpu_s + request_cpu_s_per_token * prompt_tokens`` CPU seconds, spent
    # while the request is set up, prefilled and handed off. Engines sharing the host's cores run slower while it
    # is spent. Measured by `llmsched run` (CPU by process role); 0 elsewhere.
    request_cpu_s: float = 0.0
    request_cpu_s_per_token: float = 0.0
    host_cores: int = 0  # cores of the profiled host (for ``request_cpu_s``)
    # Host CPU each streamed output token costs outside the engines (gRPC server and client, ingress, the instance
    # actor relaying it): ~0.75-1 ms on the 2-core VM, a third of a lone decode step. The contention tables hold one
    # stream per busy engine; every further token in flight loads the cores (``token_load``). Measured by
    # `llmsched run` (CPU by process role over lone streams of two lengths); 0 elsewhere.
    token_cpu_s: float = 0.0
    # The host's speed as the profile saw it vary: multipliers on the steps (lone decode streams, each over its
    # own median), one drawn per engine every ``host_noise_period_s``. A shared CPU host runs the same lone stream
    # at 0.5-2x its median pace from one run to the next; without the spread the simulator's deterministic steps
    # put every p90 at the p50's pace. Empty: no noise (GPU profiles, the roofline).
    host_noise: tuple[float, ...] = ()
    host_noise_period_s: float = 0.25

    # ---- the batch cost -------------------------------------------------------------------------------
    def path_latency(self, prompt_tokens: int) -> float:
        """The request path's delay on its stream (first token and finish), occupying no engine."""
        return self.request_latency_s + self.request_latency_s_per_token * prompt_tokens

    def step_time(
        self,
        *,
        prefill_tokens: int = 0,
        prefill_pairs: float = 0.0,
        decode_batch: int = 0,
        decode_context: int = 0,
        prefill_seqs: int = 0,
    ) -> float:
        """Time of one engine step.

        Args:
            prefill_tokens: prompt tokens scheduled this step (sum of chunk lengths).
            prefill_pairs: attention work of those chunks, ``sum(chunk * (ctx_before + chunk / 2))``.
            decode_batch: requests decoding one token this step.
            decode_context: sum of their KV lengths.
            prefill_seqs: requests the prefill chunks belong to (for the per-sequence cost).
        """
        n = prefill_tokens + decode_batch
        if n == 0:
            return 0.0
        return (
            self.overhead_s
            + self.gemm(n)
            + self.per_seq_s * (decode_batch + prefill_seqs)
            + self.attn_prefill_s_per_pair * prefill_pairs
            + self.attn_decode_s_per_token * decode_context
        )

    def decode_coeffs(self, batch: int) -> tuple[float, float]:
        """``(a, b)`` with decode-only step time ``a + b * sum_context`` for a batch of ``batch`` requests."""
        return self.overhead_s + self.gemm(batch) + self.per_seq_s * batch, self.attn_decode_s_per_token

    def handoff_time(self, prompt_tokens: int) -> float | None:
        """Measured P->D handoff time for a prompt, or ``None`` when unprofiled (use the link model)."""
        if self.handoff_s is None:
            return None
        return self.handoff_s + self.handoff_s_per_token * prompt_tokens

    def contention(self, busy_engines: int, *, decode: bool = False) -> float:
        """Step-time factor with ``busy_engines`` engines (this one included) busy on the host; ``decode``: for a
        decode engine's steps (``host_contention_decode`` where measured)."""
        t = self.host_contention_decode if decode and self.host_contention_decode else self.host_contention
        if busy_engines <= 1 or len(t) <= 1:
            return 1.0
        if busy_engines <= len(t):
            return t[busy_engines - 1]
        return t[-1] + (t[-1] - t[-2]) * (busy_engines - len(t))

    def request_cpu(self, prompt_tokens: int) -> float:
        """Host CPU seconds a request uses outside its engine steps (see ``request_cpu_s``)."""
        return self.request_cpu_s + self.request_cpu_s_per_token * prompt_tokens

    def host_factor(self, busy_engines: int, load_cores: float, *, decode: bool = False) -> float:
        """Step-time factor with ``busy_engines`` busy and ``load_cores`` of other CPU work (requests being set up,
        prefilled, handed off: ``request_cpu``) on the host. Processor sharing over ``host_cores``: the engines
        with their streams demand ``busy x`` what one demands, which the two-busy contention point gives (two
        engines oversubscribe the cores by that factor); the load stretches the steps by how much more it
        oversubscribes them. No load: the contention table itself (``decode``: the decoders' one)."""
        two_busy = self.host_contention[1] if len(self.host_contention) > 1 else 1.0
        return self.contention(busy_engines, decode=decode) * load_stretch(self.host_cores, two_busy, busy_engines,
                                                                            load_cores)

    def token_load(self, extra_tokens_per_s: float) -> float:
        """Cores of stack CPU (gRPC, ingress, instance actors) that ``extra_tokens_per_s`` streamed tokens cost
        beyond one stream per busy engine, which the contention tables were measured with."""
        return self.token_cpu_s * max(extra_tokens_per_s, 0.0)

    def new_shape_time(self, tokens: int) -> float:
        """Extra time of a step at a token count outside the engine's kernel cache (see ``shape_cache_size``)."""
        if not self.new_shape_table:
            return 0.0
        xs, ys = zip(*self.new_shape_table)
        return float(np.interp(tokens, xs, ys))  # flat past the ends; runs on a cache miss only, not per step

    def prefill_time(self, prompt_tokens: int, context_before: int = 0) -> float:
        return self.step_time(prefill_tokens=prompt_tokens, prefill_pairs=prefill_pairs(prompt_tokens, context_before),
                              prefill_seqs=1)

    # ---- physics -----------------------------------------------------------------------------------------
    def hbm_floor(self, decode_batch: int, decode_context: int) -> float:
        """Lower bound for a decode step: every weight and every KV byte read once at peak HBM bandwidth."""
        kv_per_token = self.model.kv_bytes_per_token_per_gpu(self.tp)  # each GPU reads its shard's KV
        bytes_read = self.model.weight_bytes / self.tp + decode_context * kv_per_token
        return bytes_read / (self.gpu.hbm_gbps * 1e9)

    def kv_blocks(self, block_size: int, *, gpu_memory_utilization: float, activation_reserve_gib: float) -> int:
        """KV capacity in blocks: GPU memory (all TP shards) minus weights and an activation reserve, over what a
        token's KV takes on all the shards (more than the model's KV where ``tp`` replicates KV heads)."""
        total = self.gpu.memory_gib * 2**30 * self.tp * gpu_memory_utilization
        free = total - self.model.weight_bytes - activation_reserve_gib * 2**30 * self.tp
        per_token = self.model.kv_bytes_per_token_per_gpu(self.tp) * self.tp
        return max(int(free // (per_token * block_size)), 0)


def load_stretch(host_cores: int, two_busy: float, busy_engines: int, load_cores: float) -> float:
    """How much ``load_cores`` of other CPU work stretches the steps of ``busy_engines`` engines on a host of
    ``host_cores``, by processor sharing: the engines demand ``busy x`` what one demands, which the two-busy
    contention point ``two_busy`` gives (two engines oversubscribe the cores by that factor); the load stretches
    the steps by how much more it oversubscribes them."""
    if load_cores <= 0 or host_cores <= 0:
        return 1.0
    c = float(host_cores)
    demand = busy_engines * two_busy * c / 2
    return max(1.0, (demand + load_cores) / c) / max(1.0, demand / c)


def prefill_pairs(chunk: int, context_before: int) -> float:
    """Query x key pairs of causal attention for ``chunk`` new tokens after ``context_before`` cached ones."""
    return chunk * (context_before + (chunk + 1) / 2)


def kv_transfer_time(num_tokens: int, model: ModelSpec, *, bandwidth_gbps: float, latency_s: float) -> float:
    """Time to move ``num_tokens`` of KV cache over a link: one latency plus bytes over bandwidth."""
    if num_tokens <= 0:
        return 0.0
    return latency_s + num_tokens * model.kv_bytes_per_token / (bandwidth_gbps * 1e9)


def kv_link(src: GPUSpec, dst: GPUSpec) -> tuple[float, float]:
    """(GB/s, latency s) of a KV transfer from a GPU of type ``src`` to one of type ``dst``: the slower end limits
    it (H100 -> A100 runs at the A100's 25 GB/s, not the H100's 50), with the higher of the two latencies."""
    return min(src.network_gbps, dst.network_gbps), max(src.network_latency_s, dst.network_latency_s)


def kv_transfer_between(num_tokens: int, model: ModelSpec, src: GPUSpec, dst: GPUSpec) -> float:
    """``kv_transfer_time`` over the link between ``src`` and ``dst`` (``kv_link``): every clock times a P->D
    handoff and a migration's copies with this."""
    bw, lat = kv_link(src, dst)
    return kv_transfer_time(num_tokens, model, bandwidth_gbps=bw, latency_s=lat)


# ---- roofline fallback ----------------------------------------------------------------------------------
ROOFLINE_GRID = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)


def roofline_gemm(model: ModelSpec, gpu: GPUSpec, tp: int) -> GemmTable:
    """GEMM time per step from the roofline: ``max(2 * params * tokens / FLOPs, weight bytes / bandwidth)``."""
    flops_per_token = 2 * model.num_params / tp
    weight_bytes = model.weight_bytes / tp
    peak = gpu.fp16_tflops * 1e12 * gpu.mfu
    bw = gpu.hbm_gbps * 1e9 * gpu.mbu
    comm = _allreduce_time(model, gpu, tp)
    secs = tuple(max(flops_per_token * n / peak, weight_bytes / bw) + comm(n) for n in ROOFLINE_GRID)
    return GemmTable(ROOFLINE_GRID, secs, source="roofline")


def _allreduce_time(model: ModelSpec, gpu: GPUSpec, tp: int):
    """Two ring all-reduces of the hidden state per layer under tensor parallelism."""
    if tp == 1:
        return lambda n: 0.0
    link = gpu.interconnect_gbps * 1e9

    def t(n: int) -> float:
        size = n * model.hidden_size * model.dtype_bytes
        per = 2 * (tp - 1) / tp * size / link + 10e-6
        return 2 * model.num_layers * per

    return t


def attention_coeffs(model: ModelSpec, gpu: GPUSpec, tp: int) -> tuple[float, float]:
    """(seconds per prefill query-key pair, seconds per decode context token), roofline-derived."""
    heads = model.num_heads / tp
    # QK^T and PV: 2 matmuls x 2 FLOPs x head_dim per head per pair, all layers.
    flops_per_pair = 4 * model.head_dim * heads * model.num_layers
    per_pair = flops_per_pair / (gpu.fp16_tflops * 1e12 * gpu.mfu)
    per_token = model.kv_bytes_per_token_per_gpu(tp) / (gpu.hbm_gbps * 1e9 * gpu.mbu)
    return per_pair, per_token


def roofline_model(model: ModelSpec, gpu: GPUSpec, tp: int, *, overhead_s: float | None = None) -> LatencyModel:
    """Roofline-only model; ``overhead_s`` defaults to the GPU type's ``step_overhead_s``."""
    if overhead_s is None:
        overhead_s = gpu.step_overhead_s
    pair, tok = attention_coeffs(model, gpu, tp)
    return LatencyModel(model, gpu, tp, overhead_s, pair, tok, roofline_gemm(model, gpu, tp), source="roofline")
