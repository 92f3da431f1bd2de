"""Profiled latency models: Vidur per-operator GEMM tables + Splitwise-calibrated attention and overhead.

``profiled_model(model, gpu, tp)`` builds a ``LatencyModel`` for a (model, GPU family, TP) triple covered by the
vendored tables in ``scheduler/latency/data`` (see the README there for sources and licenses), or returns ``None``
so that ``latency_for`` falls back to the roofline. The tables are read lazily on first use, never at import.

How a profiled model is assembled (all per step, seconds)::

    gemm(n)   = L * layer(n) + emb(n) + lm_head(n) + 2 * L * allreduce(n)      # n = tokens in the batch
    overhead  = c0[gpu] + c1[gpu] * (tp - 1)                                  # Splitwise-fitted
    attention = roofline attention_coeffs * (k_prefill[gpu], k_decode[gpu])   # Splitwise-fitted multipliers

``layer(n)`` is the sum of Vidur's per-layer operator medians (QKV/O projections, RoPE, norms, gated MLP, add)
for one TP shard; ``allreduce(n)`` is Vidur's measured NCCL all-reduce of ``n * hidden * 2`` bytes on a DGX node
(analytic ring model where no profile exists, e.g. A40); ``lm_head`` is the roofline of the vocab projection
(Vidur does not profile it). The raw table is smoothed to be non-decreasing in ``n`` (isotonic regression: more
tokens never make a GEMM cheaper; the profile noise does) and extended beyond its last point on a least-squares
line over its upper range, so ``GemmTable``'s last-slope extrapolation is robust.

Regenerate the data and the fit report with ``python -m scheduler.latency.fit --report docs/latency.md``.
"""

from __future__ import annotations

import csv
import functools
import gzip
import io
import json
import re
from dataclasses import dataclass
from importlib import resources

import numpy as np

from scheduler.config.models import GPUSpec, ModelSpec
from scheduler.latency.model import GemmTable, LatencyModel, _allreduce_time, attention_coeffs

TABLE_FILE = "vidur_gemm_tables.csv.gz"
META_FILE = "profiles.json"
# Above the profiled range the table is extended on a line fitted to points with n >= this fraction of the max.
_EXTRAP_FROM = 0.5
_EXTRAP_FACTORS = (2, 4)


# ---- name matching ------------------------------------------------------------------------------------------
def gpu_family(name: str) -> str | None:
    """Profile key of a GPU name: ``A100-80GB`` / ``a100`` -> ``a100``; ``None`` for unprofiled types."""
    n = name.lower()
    for fam in ("a100", "h100", "h200", "a40"):
        # "a40" must not match "a400"/"a4000"-style names.
        if re.search(rf"(^|[^a-z0-9]){fam}($|[^0-9])", n):
            return fam
    return None


def model_key(name: str) -> str:
    """Normalised model name: ``meta-llama/Llama-2-7b-hf`` / ``llama2-7b`` -> ``llama27b``."""
    n = name.lower().rsplit("/", 1)[-1]
    n = re.sub(r"(-instruct)?(-hf)?$", "", n)
    n = re.sub(r"^meta-", "", n)
    return re.sub(r"[^a-z0-9]", "", n)


# ---- vendored data (lazy) -----------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class ProfileRows:
    """Raw profiled points of one (gpu family, model, tp): per-layer ms, embedding ms, one all-reduce ms."""

    num_tokens: tuple[int, ...]
    layer_ms: tuple[float, ...]
    emb_ms: tuple[float, ...]
    allreduce_ms: tuple[float, ...] | None  # None: no network profile (analytic ring all-reduce is used)


def _data_file(name: str) -> bytes:
    return (resources.files("scheduler.latency") / "data" / name).read_bytes()


@functools.cache
def profile_meta() -> dict:
    """``profiles.json``: model shapes per profile key and the Splitwise calibration per GPU family."""
    return json.loads(_data_file(META_FILE))


@functools.cache
def profile_rows() -> dict[tuple[str, str, int], ProfileRows]:
    """All vendored GEMM rows keyed by (gpu family, model key, tp)."""
    text = gzip.decompress(_data_file(TABLE_FILE)).decode()
    acc: dict[tuple[str, str, int], list[tuple[int, float, float, float | None]]] = {}
    for r in csv.DictReader(io.StringIO(text)):
        key = (r["gpu"], r["model"], int(r["tp"]))
        ar = float(r["allreduce_ms"]) if r["allreduce_ms"] else None
        acc.setdefault(key, []).append((int(r["num_tokens"]), float(r["layer_ms"]), float(r["emb_ms"]), ar))
    out = {}
    for key, pts in acc.items():
        pts.sort()
        has_ar = all(p[3] is not None for p in pts)
        out[key] = ProfileRows(
            tuple(p[0] for p in pts), tuple(p[1] for p in pts), tuple(p[2] for p in pts),
            tuple(p[3] for p in pts) if has_ar else None,  # type: ignore[misc]
        )
    return out


# ---- table construction (shared with fit.py and the tests) ---------------------------------------------------
def isotonic(ys: np.ndarray) -> np.ndarray:
    """Least-squares non-decreasing fit (pool-adjacent-violators)."""
    vals: list[float] = []
    wts: list[int] = []
    for y in ys:
        vals.append(float(y))
        wts.append(1)
        while len(vals) > 1 and vals[-2] > vals[-1]:
            w = wts[-2] + wts[-1]
            v = (vals[-2] * wts[-2] + vals[-1] * wts[-1]) / w
            vals[-2:] = [v]
            wts[-2:] = [w]
    return np.repeat(vals, wts)


def _lm_head_s(model: ModelSpec, gpu: GPUSpec, tp: int, n: np.ndarray) -> np.ndarray:
    """Roofline of the vocab projection (not in Vidur's profiles), per TP shard."""
    w = model.vocab_size * model.hidden_size / tp
    flops = 2 * w * n / (gpu.fp16_tflops * 1e12 * gpu.mfu)
    return np.maximum(flops, w * model.dtype_bytes / (gpu.hbm_gbps * 1e9 * gpu.mbu))


def gemm_table(rows: ProfileRows, model: ModelSpec, gpu: GPUSpec, tp: int, source: str = "vidur") -> GemmTable:
    """Per-step token-parallel time from profiled rows: smoothed, extended, in seconds."""
    n = np.asarray(rows.num_tokens, dtype=float)
    L = model.num_layers
    if rows.allreduce_ms is not None:
        ar_ms = np.asarray(rows.allreduce_ms)
    else:
        ring = _allreduce_time(model, gpu, tp)  # 2 * L all-reduces already included
        ar_ms = np.array([ring(int(x)) * 1e3 / (2 * L) for x in n])
    ms = L * np.asarray(rows.layer_ms) + np.asarray(rows.emb_ms) + 2 * L * ar_ms
    secs = isotonic(ms * 1e-3 + _lm_head_s(model, gpu, tp, n))
    # Robust extension: a line over the upper range, never below the last smoothed point.
    hi = n >= _EXTRAP_FROM * n[-1]
    slope, icpt = np.polyfit(n[hi], secs[hi], 1) if hi.sum() >= 2 else (secs[-1] / n[-1], 0.0)
    slope = max(float(slope), 0.0)
    xs = [int(x) for x in n]
    ys = [float(y) for y in secs]
    for f in _EXTRAP_FACTORS:
        x = int(n[-1] * f)
        xs.append(x)
        ys.append(max(ys[-1], float(icpt + slope * x)))
    return GemmTable(tuple(xs), tuple(ys), source=source)


@dataclass(frozen=True, slots=True)
class Calibration:
    """Per-GPU-family constants fitted to the Splitwise end-to-end perf model (see ``fit.py``)."""

    overhead_s: float  # c0: per-step fixed cost (scheduling, sampling, launch)
    overhead_per_tp_s: float  # c1: extra per-step cost per additional TP worker
    k_prefill: float  # multiplier on the roofline prefill attention cost per query-key pair
    k_decode: float  # multiplier on the roofline decode attention cost per context token
    source: str = "splitwise"

    def overhead(self, tp: int) -> float:
        return self.overhead_s + self.overhead_per_tp_s * (tp - 1)


def calibration_for(family: str) -> Calibration:
    """The fitted constants of a GPU family, or of the family it borrows from (A40 -> A100, same generation)."""
    meta = profile_meta()
    cal = meta["calibration"]
    fam = family if family in cal else meta.get("calibration_fallback", {}).get(family, "a100")
    c = cal[fam]
    src = c.get("source", "splitwise") + ("" if fam == family else f" (borrowed from {fam})")
    return Calibration(c["overhead_s"], c["overhead_per_tp_s"], c["k_prefill"], c["k_decode"], source=src)


def _shape_matches(model: ModelSpec, shape: dict) -> bool:
    return (
        model.hidden_size == shape["n_embd"]
        and model.num_heads == shape["n_head"]
        and model.num_kv_heads == shape["n_kv_head"]
        and model.intermediate_size == shape["n_expanded_embd"]
        and model.gated_mlp == shape["use_gated_mlp"]
    )


def _hardware_matches(gpu: GPUSpec, family: str, tp: int) -> bool:
    """``gpu`` has the profiled board's speeds (its family's catalog entry): a re-specced part of that name
    (an H100 PCIe at 2.0 TB/s on PCIe links) must not borrow the SXM/DGX table, which reads its weights faster
    than its HBM can and all-reduces over NVLink."""
    ref = GPUSpec.from_catalog(family)
    same = gpu.hbm_gbps == ref.hbm_gbps and gpu.fp16_tflops == ref.fp16_tflops
    return same and (tp == 1 or gpu.interconnect_gbps == ref.interconnect_gbps)


def profiled_model(model: ModelSpec, gpu: GPUSpec, tp: int) -> LatencyModel | None:
    """A profile-backed latency model for the triple, or ``None`` when no vendored profile covers it.

    The match is by ``model.profile_name or model.name`` (normalised, see ``model_key``) and the GPU family in
    ``gpu.name``; a profile is only used when its architecture shape equals ``model``'s and the dtype is 16-bit
    (Vidur profiled fp16), so a renamed toy model never borrows a 7B table; likewise the GPU's speeds must be
    the profiled board's (``_hardware_matches``).
    """
    fam = gpu_family(gpu.name)
    if fam is None or model.dtype not in ("float16", "bfloat16"):
        return None
    key = model_key(model.profile_name or model.name)
    shape = profile_meta()["models"].get(key)
    rows = profile_rows().get((fam, key, tp))
    if shape is None or rows is None or not _shape_matches(model, shape):
        return None
    if not _hardware_matches(gpu, fam, tp):
        return None
    cal = calibration_for(fam)
    table = profile_meta().get("table_source", {}).get(fam, "vidur")  # "measured": bench/bench_gpu_kernels.py
    pair, tok = attention_coeffs(model, gpu, tp)
    return LatencyModel(
        model, gpu, tp,
        overhead_s=cal.overhead(tp),
        attn_prefill_s_per_pair=pair * cal.k_prefill,
        attn_decode_s_per_token=tok * cal.k_decode,
        gemm=gemm_table(rows, model, gpu, tp, source=table),
        source=f"{table}+{cal.source}",
    )


def profiled_triples() -> list[tuple[str, str, int]]:
    """Every (gpu family, model key, tp) the vendored tables cover."""
    return sorted(profile_rows())
