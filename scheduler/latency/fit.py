"""Dev-time fitting of the profiled latency tables, and the fit-error report.

    python -m scheduler.latency.fit --report docs/latency.md [--data ../shared/data]

reads the public profiles (Vidur per-operator and network profiles, the Splitwise perf model, the DistServe fits)
from ``--data`` (default: ``<repo>/../shared/data``), writes the compact vendored tables
``scheduler/latency/data/{vidur_gemm_tables.csv.gz,profiles.json}``, and rewrites the generated section of the
report. Never imported at run time: ``profiles.py`` reads only the vendored files.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import io
import json
import statistics
from collections import defaultdict
from pathlib import Path

import numpy as np
from scipy.optimize import least_squares

from scheduler.config.models import GPUSpec, ModelSpec
from scheduler.latency import profiles
from scheduler.latency.model import (
    LatencyModel,
    _allreduce_time,
    attention_coeffs,
    prefill_pairs,
    roofline_model,
)
from scheduler.latency.profiles import Calibration, ProfileRows, _lm_head_s, gemm_table, model_key

DATA_OUT = Path(__file__).resolve().parent / "data"
DEFAULT_SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"
BEGIN, END = "<!-- fit-report:begin -->", "<!-- fit-report:end -->"
HOLDOUT_EVERY = 5
SPLITWISE_FILE = "splitwise_llama2_70b_medians.csv"  # vendored for the end-to-end test
# Kernel timings measured on lent GPUs by bench/bench_gpu_kernels.py (committed with the repo, not in shared/).
GPU_KERNEL_FILES = (Path(__file__).resolve().parents[2] / "docs" / "results" / "gpu" / "h200_kernels.json",)
# Families whose all-reduce is borrowed from another family's Vidur network profile: HGX H200 boards carry the
# H100's NVLink 4 / NVSwitch fabric, so one all-reduce of the same bytes costs the same.
ALLREDUCE_FROM = {"h200": "h100"}
# Engine overhead per step (scheduling, sampling, launches) is host-side work a kernel benchmark cannot see:
# a measured family borrows the Splitwise-fitted constants of its generation.
OVERHEAD_FROM = {"h200": "h100"}
# Decode attention points used for k_decode: enough (sequence x KV head) blocks to fill the SMs, the regime a
# split-KV kernel (vLLM's FlashAttention 3 / FlashInfer) reaches at any batch; torch's SDPA does not split the KV.
DECODE_MIN_BLOCKS = 128
PREFILL_MIN_TOKENS = 1024  # below this the prefill attention kernel is launch-bound (a few microseconds)

# Vidur model name -> (num_layers, vocab_size): what the per-layer profile does not say.
PROFILED_MODELS: dict[str, tuple[int, int]] = {
    "meta-llama/Llama-2-7b-hf": (32, 32000),
    "meta-llama/Llama-2-70b-hf": (80, 32000),
    "codellama/CodeLlama-34b-Instruct-hf": (48, 32000),
    "meta-llama/Meta-Llama-3-8B": (32, 128256),
    "meta-llama/Meta-Llama-3-70B": (80, 128256),
}
_LAYER_OPS = (
    "input_layernorm", "attn_pre_proj", "attn_rope", "attn_post_proj", "post_attention_layernorm",
    "mlp_up_proj", "mlp_act", "mlp_down_proj", "add",
)
# Splitwise hardware names -> catalog GPU keys.
SPLITWISE_HW = {"a100-80gb": "a100", "h100-80gb": "h100"}
OPT_MODELS = {  # DistServe's models (not profiled by Vidur: they exercise the roofline fallback)
    "facebook/opt-13b": {"num_layers": 40, "hidden_size": 5120, "num_heads": 40, "intermediate_size": 20480},
    "facebook/opt-66b": {"num_layers": 64, "hidden_size": 9216, "num_heads": 72, "intermediate_size": 36864},
    "facebook/opt-175b": {"num_layers": 96, "hidden_size": 12288, "num_heads": 96, "intermediate_size": 49152},
}


def _sig(x: float, digits: int = 5) -> str:
    return f"{x:.{digits}g}"


# ---- reading the public profiles ------------------------------------------------------------------------------
def read_vidur_mlp(path: Path) -> tuple[dict[tuple[str, str, int], dict[int, list[tuple[float, float]]]], dict]:
    """(gpu, model key, tp) -> num_tokens -> [(per-layer ms, embedding ms)], and model shapes by key."""
    pts: dict[tuple[str, str, int], dict[int, list[tuple[float, float]]]] = defaultdict(lambda: defaultdict(list))
    shapes: dict[str, dict] = {}
    with gzip.open(path, "rt", newline="") as f:
        for r in csv.DictReader(f):
            if r["model"] not in PROFILED_MODELS:
                continue
            key = model_key(r["model"])
            layer = sum(float(r[f"{op}_median_ms"]) for op in _LAYER_OPS)
            pts[(r["gpu"], key, int(r["num_tensor_parallel_workers"]))][int(r["num_tokens"])].append(
                (layer, float(r["emb_median_ms"]))
            )
            L, vocab = PROFILED_MODELS[r["model"]]
            shapes[key] = {
                "hf_name": r["model"], "num_layers": L, "vocab_size": vocab,
                "n_embd": int(r["n_embd"]), "n_head": int(r["n_head"]), "n_kv_head": int(r["n_kv_head"]),
                "n_expanded_embd": int(r["n_expanded_embd"]), "use_gated_mlp": r["use_gated_mlp"] == "True",
            }
    return pts, shapes


def read_allreduce(path: Path) -> dict[tuple[str, int], tuple[np.ndarray, np.ndarray]]:
    """(gpu family, tp) -> (bytes, median ms) of a single-node all-reduce on the DGX topology."""
    acc: dict[tuple[str, int], list[tuple[int, float]]] = defaultdict(list)
    with gzip.open(path, "rt", newline="") as f:
        for r in csv.DictReader(f):
            topo, w = r["topology"], int(r["num_workers"])
            if r["collective"] != "all_reduce" or not topo.endswith("_dgx") or int(r["devices_per_node"]) != w:
                continue
            acc[(topo.removesuffix("_dgx"), w)].append((int(r["size"]), float(r["median_ms"])))
    out = {}
    for k, v in acc.items():
        v.sort()
        out[k] = (np.array([s for s, _ in v], float), np.array([m for _, m in v]))
    return out


def _allreduce_ms(allreduce: dict, key: tuple[str, int], hidden: int, ns: list[int]) -> list[float] | None:
    """One all-reduce of each batch's fp16 hidden state, interpolated in a family's network profile: zeros at TP 1,
    ``None`` where the family has no profile."""
    if key[1] == 1:
        return [0.0] * len(ns)
    if key not in allreduce:
        return None
    sizes, ms = allreduce[key]
    return [float(np.interp(n * hidden * 2, sizes, ms)) for n in ns]


def build_rows(pts, shapes, allreduce) -> dict[tuple[str, str, int], ProfileRows]:
    out = {}
    for (gpu, key, tp), by_n in sorted(pts.items()):
        ns = sorted(by_n)
        layer = [statistics.fmean(a for a, _ in by_n[n]) for n in ns]
        emb = [statistics.fmean(b for _, b in by_n[n]) for n in ns]
        ar = _allreduce_ms(allreduce, (gpu, tp), shapes[key]["n_embd"], ns)
        out[(gpu, key, tp)] = ProfileRows(tuple(ns), tuple(layer), tuple(emb), tuple(ar) if ar else None)
    return out


def write_table(rows: dict[tuple[str, str, int], ProfileRows], path: Path) -> None:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["gpu", "model", "tp", "num_tokens", "layer_ms", "emb_ms", "allreduce_ms"])
    for (gpu, key, tp), r in rows.items():
        for i, n in enumerate(r.num_tokens):
            ar = "" if r.allreduce_ms is None else _sig(r.allreduce_ms[i], 4)
            w.writerow([gpu, key, tp, n, _sig(r.layer_ms[i]), _sig(r.emb_ms[i], 4), ar])
    path.write_bytes(gzip.compress(buf.getvalue().encode(), mtime=0))


# ---- specs ------------------------------------------------------------------------------------------------------
def spec_for(shape: dict) -> ModelSpec:
    return ModelSpec(
        name=shape["hf_name"], num_layers=shape["num_layers"], hidden_size=shape["n_embd"],
        num_heads=shape["n_head"], num_kv_heads=shape["n_kv_head"], intermediate_size=shape["n_expanded_embd"],
        vocab_size=shape["vocab_size"], gated_mlp=shape["use_gated_mlp"],
    )


def raw_gemm_s(rows: ProfileRows, model: ModelSpec, gpu: GPUSpec, tp: int, i: int) -> float:
    """The unsmoothed per-step GEMM time of point ``i`` (what the held-out check compares against)."""
    n, L = rows.num_tokens[i], model.num_layers
    if rows.allreduce_ms is not None:
        ar = rows.allreduce_ms[i]
    else:
        ar = _allreduce_time(model, gpu, tp)(n) * 1e3 / (2 * L)
    ms = L * rows.layer_ms[i] + rows.emb_ms[i] + 2 * L * ar
    return ms * 1e-3 + float(_lm_head_s(model, gpu, tp, np.array([n]))[0])


def holdout_errors(rows: ProfileRows, model: ModelSpec, gpu: GPUSpec, tp: int, every: int = HOLDOUT_EVERY):
    """Relative errors of the GEMM table at every ``every``-th point, fitted without those points."""
    idx = [i for i in range(2, len(rows.num_tokens) - 1, every)]
    keep = [i for i in range(len(rows.num_tokens)) if i not in set(idx)]

    def sub(xs):
        return None if xs is None else tuple(xs[i] for i in keep)

    train = ProfileRows(sub(rows.num_tokens), sub(rows.layer_ms), sub(rows.emb_ms), sub(rows.allreduce_ms))
    table = gemm_table(train, model, gpu, tp)
    return [abs(table(rows.num_tokens[i]) / raw_gemm_s(rows, model, gpu, tp, i) - 1) for i in idx]


# ---- Splitwise calibration -------------------------------------------------------------------------------------
def read_splitwise(path: Path) -> list[dict]:
    """Median over repeats of each llama2-70b config on a100/h100 (power-capped runs skipped)."""
    acc: dict[tuple, list[tuple[float, float]]] = defaultdict(list)
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            if r["model"] != "llama2-70b" or r["hardware"] not in SPLITWISE_HW:
                continue
            k = (SPLITWISE_HW[r["hardware"]], int(r["tensor_parallel"]), int(r["prompt_size"]),
                 int(r["batch_size"]), int(r["token_size"]))
            acc[k].append((float(r["prompt_time"]), float(r["token_time"])))
    out = []
    for (gpu, tp, p, b, t), v in sorted(acc.items()):
        out.append({"gpu": gpu, "tp": tp, "prompt": p, "batch": b, "tokens": t, "n": len(v),
                        "prompt_s": statistics.median(a for a, _ in v) / 1e3,
                        "token_s": statistics.median(c for _, c in v) / 1e3})
    # Anomaly filter: a batch of b prompts that takes < half of b single prompts (Splitwise's (tp2, b64) rows).
    single = {(r["gpu"], r["tp"], r["prompt"]): r["prompt_s"] for r in out if r["batch"] == 1}
    for r in out:
        ref = single.get((r["gpu"], r["tp"], r["prompt"]))
        r["excluded"] = bool(ref and r["prompt_s"] < 0.5 * r["batch"] * ref)
    return out


def write_splitwise(rows: list[dict], path: Path) -> None:
    cols = ["gpu", "tp", "prompt", "batch", "tokens", "n", "prompt_s", "token_s", "excluded"]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(cols)
    for r in rows:
        w.writerow([_sig(r[c], 6) if isinstance(r[c], float) else r[c] if c == "gpu" else int(r[c]) for c in cols])
    path.write_text(buf.getvalue())


def read_vendored_splitwise(text: str) -> list[dict]:
    """The rows ``write_splitwise`` wrote (types restored)."""
    out = []
    for r in csv.DictReader(io.StringIO(text)):
        out.append({k: (v if k == "gpu" else float(v) if k.endswith("_s") else int(v)) for k, v in r.items()})
        out[-1]["excluded"] = bool(out[-1]["excluded"])
    return out


def predict_splitwise(lat: LatencyModel, r: dict) -> tuple[float, float]:
    """Splitwise's prompt phase runs the batch's prompts one after another (its prompt_time grows ~b x)."""
    p, b = r["prompt"], r["batch"]
    prompt = b * lat.prefill_time(p)
    a, slope = lat.decode_coeffs(b)
    token = a + slope * b * (p + r["tokens"] / 2)
    return prompt, token


def _with(lat: LatencyModel, cal: Calibration) -> LatencyModel:
    pair, tok = attention_coeffs(lat.model, lat.gpu, lat.tp)
    return LatencyModel(lat.model, lat.gpu, lat.tp, cal.overhead(lat.tp), pair * cal.k_prefill,
                        tok * cal.k_decode, lat.gemm, source=lat.source)


def calibrate(bases: dict[int, LatencyModel], rows: list[dict], k_prefill: float, k_decode: float, *,
              fit_k_prefill: bool = False) -> Calibration:
    """Least squares on log(pred / measured) over prompt and token times of one GPU family.

    Fits the overhead ``c0 + c1 * (tp - 1)``; the attention multipliers stay as given unless ``fit_k_prefill``.
    """
    use = [r for r in rows if not r["excluded"] and r["tp"] in bases]

    def cal_of(x: np.ndarray) -> Calibration:
        return Calibration(x[0], x[1], x[2] if fit_k_prefill else k_prefill, k_decode)

    def resid(x: np.ndarray) -> np.ndarray:
        cal = cal_of(x)
        out = []
        for r in use:
            pp, tt = predict_splitwise(_with(bases[r["tp"]], cal), r)
            out += [np.log(pp / r["prompt_s"]), np.log(tt / r["token_s"])]
        return np.array(out)

    x0, lo, hi = [5e-3, 2e-3], [0.0, 0.0], [0.1, 0.05]
    if fit_k_prefill:
        x0, lo, hi = x0 + [2.0], lo + [0.5], hi + [100.0]
    sol = least_squares(resid, np.array(x0), bounds=(lo, hi))
    return cal_of(np.array([float(v) for v in sol.x]))


def distserve_attention(paths: list[Path], gpu: GPUSpec) -> tuple[float, float, list[float], list[float]]:
    """Median ratio of DistServe's fitted attention terms to our roofline ones: (k_prefill, k_decode, ...).

    DistServe's prefill quadratic ``c * len^2`` is ``2c`` per query-key pair; its decode ``b * sum(context)``
    is per context token: directly comparable with ``attention_coeffs``.
    """
    kp: list[float] = []
    kd: list[float] = []
    for path in paths:
        for name, by_tp in json.loads(path.read_text()).items():
            spec = _opt_spec(name)
            for tp_s, c in by_tp.items():
                pair, tok = attention_coeffs(spec, gpu, int(tp_s))
                if c["prefill"][2] > 0:
                    kp.append(2 * c["prefill"][2] * 1e-3 / pair)
                kd += [c[k][1] * 1e-3 / tok for k in ("decoding_smallbs", "decoding_largebs")]
    return statistics.median(kp), statistics.median(kd), kp, kd


def _opt_spec(name: str) -> ModelSpec:
    shape = OPT_MODELS[name]
    return ModelSpec(name=name, num_kv_heads=shape["num_heads"], vocab_size=50272, gated_mlp=False, **shape)


def mape(pairs: list[tuple[float, float]]) -> float:
    return 100 * statistics.fmean(abs(p / m - 1) for p, m in pairs) if pairs else float("nan")


# ---- DistServe comparison ----------------------------------------------------------------------------------------
def distserve_compare(path: Path, gpu: GPUSpec) -> list[tuple[str, int, float, float]]:
    """(model, tp, prefill MAPE %, decode MAPE %) of our roofline vs DistServe's fitted vLLM latency."""
    fits = json.loads(path.read_text())
    out = []
    for name, by_tp in fits.items():
        if name not in OPT_MODELS:
            continue
        spec = _opt_spec(name)
        for tp_s, c in by_tp.items():
            tp = int(tp_s)
            lat = roofline_model(spec, gpu, tp)
            pre = []
            for n in (128, 256, 512, 1024, 2048):
                a, b, q = c["prefill"]
                pre.append((lat.prefill_time(n), (a + b * n + q * n * n) / 1e3))
            dec = []
            for bs in (1, 8, 32, 64, 128):
                ctx = bs * 512
                a, b, q = c["decoding_smallbs"] if bs < c["decoding_large_small_bs_threshold"] else c[
                    "decoding_largebs"]
                x, y = lat.decode_coeffs(bs)
                dec.append((x + y * ctx, (a + b * ctx + q * bs) / 1e3))
            out.append((name.split("/")[-1], tp, mape(pre), mape(dec)))
    return out


# ---- driver ---------------------------------------------------------------------------------------------------------
def run(data: Path) -> tuple[str, dict]:
    """Fit everything from ``data``; write the vendored files; return (report markdown, summary numbers)."""
    pts, shapes = read_vidur_mlp(data / "vidur_mlp_profiling_compact.csv.gz")
    allreduce = read_allreduce(data / "vidur_network_profiling_compact.csv.gz")
    rows = build_rows(pts, shapes, allreduce)
    vidur_rows = dict(rows)
    measured = []  # (path, family, raw measurement) per lent-GPU benchmark
    for path in GPU_KERNEL_FILES:
        fam, gk_rows, raw = read_gpu_kernels(path, allreduce, shapes)
        rows.update(gk_rows)
        measured.append((path, fam, raw))
    specs = {k: spec_for(s) for k, s in shapes.items()}
    gpus = {g: GPUSpec.from_catalog(g) for g in ("a100", "h100", "a40", *(f for _, f, _ in measured))}
    lines: list[str] = []
    summary: dict = {}

    # 1. GEMM table interpolation, held out.
    lines += [f"### GEMM-table interpolation, every {HOLDOUT_EVERY}th profiled `num_tokens` point held out", "",
              "| gpu | model | tp | points | MAPE % | p95 % | max % |", "|---|---|---|---|---|---|---|"]
    all_err: list[float] = []
    for (g, key, tp), r in rows.items():
        errs = holdout_errors(r, specs[key], gpus[g], tp)
        all_err += errs
        lines.append(f"| {g} | {key} | {tp} | {len(errs)} | {100 * np.mean(errs):.1f} | "
                     f"{100 * np.percentile(errs, 95):.1f} | {100 * max(errs):.1f} |")
    summary["holdout_mape_pct"] = 100 * float(np.mean(all_err))
    summary["holdout_p95_pct"] = 100 * float(np.percentile(all_err, 95))
    lines += ["", (f"All triples: {len(all_err)} held-out points, MAPE {summary['holdout_mape_pct']:.2f} %, "
                  f"p95 {summary['holdout_p95_pct']:.2f} %, max {100 * max(all_err):.1f} %."), ""]

    # 2. Attention multipliers from DistServe; overhead from Splitwise; validation against Splitwise.
    ds_files = [data / "distserve_profiler_a100_80g.vllm.json", data / "distserve_profiler_a100_80g.distserve.json"]
    kp, kd, kps, kds = distserve_attention(ds_files, gpus["a100"])
    lines += ["### Attention multipliers (DistServe fits of OPT-13B/66B on A100 vs our roofline terms)", "",
              (f"Prefill (per query-key pair): {len(kps)} fits, ratios {min(kps):.2f}..{max(kps):.2f}, "
              f"median **k_prefill = {kp:.2f}**. Decode (per context token read): {len(kds)} fits, ratios "
              f"{min(kds):.2f}..{max(kds):.2f}, median **k_decode = {kd:.2f}**."), ""]
    sw = read_splitwise(data / "splitwise_sim_perf_model.csv")
    l70 = specs["llama270b"]
    cals: dict[str, Calibration] = {}
    swk: dict[str, Calibration] = {}
    lines += ["### End-to-end vs Splitwise (llama2-70b; MAPE %, median of repeats per config)", "",
              ("Columns: *shipped* = overhead fitted on all TP degrees of that GPU, DistServe attention multipliers; "
              "*LOTO* = the same fitted leave-one-TP-out (on the other two TP degrees, evaluated on this one); "
              "*sw-attn* = also fitting k_prefill to Splitwise; *uncal.* = profiled GEMMs, roofline attention, "
              "default 2 ms overhead; *roofline* = `roofline_model`."), "",
              ("| gpu | tp | rows | prompt shipped | LOTO | sw-attn | uncal. | roofline "
              "| token shipped | LOTO | sw-attn | uncal. | roofline |"), "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for g in ("a100", "h100"):
        gr = [r for r in sw if r["gpu"] == g]
        bases = {tp: _base(rows[(g, "llama270b", tp)], l70, gpus[g], tp) for tp in (2, 4, 8)}
        cals[g] = calibrate(bases, gr, kp, kd)
        swk[g] = calibrate(bases, gr, kp, kd, fit_k_prefill=True)
        for tp in (2, 4, 8):
            loto = calibrate({t: m for t, m in bases.items() if t != tp}, gr, kp, kd)
            use = [r for r in gr if r["tp"] == tp and not r["excluded"]]
            cols = []
            for lat in (_with(bases[tp], cals[g]), _with(bases[tp], loto), _with(bases[tp], swk[g]), bases[tp],
                        roofline_model(l70, gpus[g], tp)):
                cols.append([(predict_splitwise(lat, r), r) for r in use])
            pm = [mape([(p[0], r["prompt_s"]) for p, r in c]) for c in cols]
            tm = [mape([(p[1], r["token_s"]) for p, r in c]) for c in cols]
            summary[f"splitwise_{g}_tp{tp}"] = {"prompt_mape_pct": pm[0], "token_mape_pct": tm[0],
                                                "prompt_loto_pct": pm[1], "token_loto_pct": tm[1]}
            lines.append(f"| {g} | {tp} | {len(use)} | " + " | ".join(f"{x:.1f}" for x in pm) + " | "
                         + " | ".join(f"{x:.1f}" for x in tm) + " |")
    excl = [r for r in sw if r["excluded"]]
    lines += ["", "Excluded as anomalous (batch prompt time < half of batch x single-prompt time): "
              + ", ".join(f"{r['gpu']} tp{r['tp']} p{r['prompt']} b{r['batch']}" for r in excl) + ".", "",
              "Fitted constants (A40 borrows A100's; *k_prefill if fitted to Splitwise* is reported, not used):", "",
              ("| gpu | overhead c0 ms | c1 ms per extra TP worker | k_prefill | k_decode "
              "| k_prefill if fitted to Splitwise |"), "|---|---|---|---|---|---|"]
    for g, c in cals.items():
        lines.append(f"| {g} | {c.overhead_s * 1e3:.2f} | {c.overhead_per_tp_s * 1e3:.2f} | {c.k_prefill:.2f} | "
                     f"{c.k_decode:.2f} | {swk[g].k_prefill:.2f} |")
    summary["calibration"] = {g: vars_of(c) for g, c in cals.items()}

    # 2b. GPU families measured here: their own attention multipliers, their generation's engine overhead.
    table_source = {}
    for path, fam, raw in measured:
        kp_m, kd_m, kps_m, kds_m = measured_attention(raw, gpus[fam])
        base = cals[OVERHEAD_FROM[fam]]
        cal = Calibration(base.overhead_s, base.overhead_per_tp_s, kp_m, kd_m)
        summary["calibration"][fam] = vars_of(cal, source=f"{OVERHEAD_FROM[fam]}-overhead")
        table_source[fam] = "measured"
        lines += ["", *gpu_kernel_section(path, raw, fam, {k: r for k, r in rows.items() if k[0] == fam}, specs,
                                          cal, kps_m, kds_m, vidur_rows)]

    # 3. DistServe (OPT on A100: unprofiled, so the roofline fallback) vs ours.
    lines += ["", "### Roofline fallback vs DistServe's fitted vLLM latency (OPT on A100-80GB; MAPE %)", "",
              "Grid: single prompts of 128..2048 tokens; decode batches 1..128 at 512 context tokens each.", "",
              "| profile | model | tp | prefill MAPE % | decode MAPE % |", "|---|---|---|---|---|"]
    for path in ds_files:
        for name, tp, pm, dm in distserve_compare(path, gpus["a100"]):
            lines.append(f"| {path.name.split('.')[1]} | {name} | {tp} | {pm:.1f} | {dm:.1f} |")

    meta = {"models": shapes, "calibration": summary["calibration"], "calibration_fallback": {"a40": "a100"},
            "table_source": table_source, "sources": "see README.md in this folder"}
    DATA_OUT.mkdir(exist_ok=True)
    write_table(rows, DATA_OUT / profiles.TABLE_FILE)
    write_splitwise(sw, DATA_OUT / SPLITWISE_FILE)
    (DATA_OUT / profiles.META_FILE).write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
    profiles.profile_rows.cache_clear()
    profiles.profile_meta.cache_clear()
    lines += ["", *_sanity_lines()]
    return "\n".join(lines), summary


# ---- kernel timings measured on a lent GPU (bench/bench_gpu_kernels.py) -------------------------------------------
def read_gpu_kernels(path: Path, allreduce: dict, shapes: dict) -> tuple[str, dict, dict]:
    """(gpu family, {(family, model key, tp): ProfileRows}, the raw measurement) from one benchmark JSON.

    ``layer_ms`` is the benchmark's measured decoder layer without attention (the quantity of Vidur's per-layer
    operator sum); ``emb_ms`` is measured on a coarser grid and interpolated; the all-reduce is the Vidur profile
    of the family named in ``ALLREDUCE_FROM`` (a one-GPU machine cannot measure it).
    """
    raw = json.loads(path.read_text())
    fam = profiles.gpu_family(raw["info"]["name"])
    if fam is None:
        raise ValueError(f"{path}: no GPU family for {raw['info']['name']!r}")
    by_key: dict[tuple[str, int], list[dict]] = defaultdict(list)
    for r in raw["layers"]:
        by_key[(r["model"], r["tp"])].append(r)
    out = {}
    for (key, tp), pts in sorted(by_key.items()):
        pts.sort(key=lambda r: r["num_tokens"])
        ns = [r["num_tokens"] for r in pts]
        emb_pts = [(r["num_tokens"], r["emb_ms"]) for r in pts if "emb_ms" in r]
        emb = np.interp(ns, [n for n, _ in emb_pts], [e for _, e in emb_pts])
        ar = _allreduce_ms(allreduce, (ALLREDUCE_FROM.get(fam, fam), tp), shapes[key]["n_embd"], ns)
        out[(fam, key, tp)] = ProfileRows(tuple(ns), tuple(r["layer_ms"] for r in pts), tuple(float(e) for e in emb),
                                          tuple(ar) if ar else None)
    return fam, out, raw


def measured_attention(raw: dict, gpu: GPUSpec) -> tuple[float, float, list[float], list[float]]:
    """(k_prefill, k_decode, prefill ratios, decode ratios): measured attention over the roofline terms, per layer.

    Prefill: causal attention of ``n`` tokens is ``n (n + 1) / 2`` query-key pairs; decode: ``batch x context``
    tokens read. Medians over the points where the kernel is neither launch- nor occupancy-bound (see
    ``PREFILL_MIN_TOKENS`` and ``DECODE_MIN_BLOCKS``).
    """
    kps, kds = [], []
    for r in raw["attention"]:
        d, heads, kv = r["head_dim"], r["heads"], r["kv_heads"]
        if r["kind"] == "prefill" and r["tokens"] >= PREFILL_MIN_TOKENS:
            n = r["tokens"]
            roof = 4 * d * heads * n * (n + 1) / 2 / (gpu.fp16_tflops * 1e12 * gpu.mfu)
            kps.append(r["ms"] / 1e3 / roof)
        elif r["kind"] == "decode" and r["batch"] * kv >= DECODE_MIN_BLOCKS:
            roof = r["batch"] * r["context"] * 2 * kv * d * 2 / (gpu.hbm_gbps * 1e9 * gpu.mbu)
            kds.append(r["ms"] / 1e3 / roof)
    return statistics.median(kps), statistics.median(kds), kps, kds


def gpu_kernel_section(path: Path, raw: dict, fam: str, rows: dict, specs: dict, cal: Calibration,
                       kps: list[float], kds: list[float], vidur_rows: dict) -> list[str]:
    """The report's lines for one measured GPU family."""
    gpu = GPUSpec.from_catalog(fam)
    info = raw["info"]
    lines = [f"### {info['name']}, measured here (`bench/bench_gpu_kernels.py`)", "",
             (f"Source: `{path.relative_to(path.parents[3])}` -- torch {info['torch']}, CUDA {info.get('cuda')}, "
              f"{info.get('nvidia_smi', '')}; bf16, random weights, one decoder layer per TP shard (GEMMs, norms, "
              "RoPE, SiLU x mul, adds; attention timed apart), CUDA-graph replays over distinct layer copies. "
              f"All-reduce: the {ALLREDUCE_FROM.get(fam, fam)} Vidur profile (same NVLink fabric); engine overhead: "
              f"the {OVERHEAD_FROM.get(fam, fam)} Splitwise fit (c0 {cal.overhead_s * 1e3:.2f} ms, c1 "
              f"{cal.overhead_per_tp_s * 1e3:.2f} ms per extra TP worker): a kernel benchmark cannot see the "
              "engine's host work."), "",
             (f"Attention against the roofline at the catalog's mfu/mbu: prefill (>= {PREFILL_MIN_TOKENS} tokens, "
              f"{len(kps)} points) ratios {min(kps):.2f}..{max(kps):.2f}, median **k_prefill = "
              f"{statistics.median(kps):.2f}**; decode (batch x KV heads >= {DECODE_MIN_BLOCKS}, {len(kds)} points) "
              f"{min(kds):.2f}..{max(kds):.2f}, median **k_decode = {statistics.median(kds):.2f}**. Below that "
              "occupancy torch's SDPA does not split the KV and reads it at a fraction of the bandwidth (a batch of "
              "1 at 16k context: 0.19 ms per layer, ~0.35 TB/s); vLLM's split-KV kernels do not have that floor, so "
              "it is left out of the fit."), "",
             ("GEMM side per step (all layers + embedding + LM head + all-reduce), measured vs what an H200 config "
              "got before this profile (the roofline) and vs the H100 Vidur table where one exists:"), "",
             "| model | tp | n | measured ms | roofline ms | roofline err % | H100 Vidur ms | measured / H100 |",
             "|---|---|---|---|---|---|---|---|"]
    for (f, key, tp), r in rows.items():
        model = specs[key]
        roof = roofline_model(model, gpu, tp).gemm
        h100 = vidur_rows.get(("h100", key, tp))
        for n in (1, 256, 4096):
            i = r.num_tokens.index(n)
            got = raw_gemm_s(r, model, gpu, tp, i)
            ref = "-", "-"
            if h100 is not None and n in h100.num_tokens:
                hv = raw_gemm_s(h100, model, GPUSpec.from_catalog("h100"), tp, h100.num_tokens.index(n))
                ref = f"{hv * 1e3:.2f}", f"{got / hv:.2f}"
            lines.append(f"| {key} | {tp} | {n} | {got * 1e3:.2f} | {roof(n) * 1e3:.2f} | "
                         f"{100 * (roof(n) / got - 1):+.0f} | {ref[0]} | {ref[1]} |")
    if raw.get("steps"):
        lines += ["", *whole_step_lines(raw["steps"], specs, gpu)]
    if path.with_name(path.stem + "_run1.json").exists():
        lines += ["", repeatability_line(json.loads(path.with_name(path.stem + "_run1.json").read_text()), raw)]
    kv = raw.get("kv_copy", {})
    if kv:
        bw = {r["mb"]: r for r in kv["bandwidth"]}
        big = bw[max(bw)]
        lines += ["", (f"Copies ({max(bw)} MiB): device->host pinned {big['d2h_pinned_gbps']:.0f} GB/s, host->device "
                       f"pinned {big['h2d_pinned_gbps']:.0f} GB/s, device->host pageable "
                       f"{big['d2h_pageable_gbps']:.0f} GB/s, device->device {big['d2d_gbps']:.0f} GB/s. One "
                       "request's paged KV (Llama-3-8B shape, 128 KiB per token, 16-token blocks over 32 layers) "
                       "gathered, sent through pinned host memory and scattered into another cache, unpipelined:"), "",
                  "| tokens | MiB | gather ms | d2h ms | h2d ms | scatter ms | end to end ms | GB/s |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in kv["paged"]:
            lines.append(f"| {r['tokens']} | {r['bytes'] / 2**20:.0f} | {r['gather_ms']:.2f} | {r['d2h_ms']:.2f} | "
                         f"{r['h2d_ms']:.2f} | {r['scatter_ms']:.2f} | {r['end_to_end_ms']:.2f} | "
                         f"{r['end_to_end_gbps']:.1f} |")
    return lines + [""]


def kernel_time(lat: LatencyModel, chunks: list[tuple[int, int]], batch: int, context: int) -> float:
    """The model's step time less its engine overhead (a benchmark's own forward has no engine around it):
    prompt chunks ``(context before, length)`` and ``batch`` decodes attending ``context`` tokens in all."""
    t = lat.step_time(prefill_tokens=sum(c for _, c in chunks),
                      prefill_pairs=sum(prefill_pairs(c, b) for b, c in chunks), decode_batch=batch,
                      decode_context=context, prefill_seqs=len(chunks))
    return t - lat.overhead_s


def whole_step_errors(steps: list[dict], specs: dict, gpu: GPUSpec) -> list[tuple[dict, float]]:
    """(measured row, predicted seconds) for every whole-model step of the benchmark."""
    from scheduler.latency import latency_for

    return [(r, kernel_time(latency_for(specs[r["model"]], gpu, r["tp"]), [(0, r["chunk"])] if r["chunk"] else [],
                            r["batch"], r["batch"] * r["context"])) for r in steps]


def whole_step_lines(steps: list[dict], specs: dict, gpu: GPUSpec) -> list[str]:
    pairs = whole_step_errors(steps, specs, gpu)
    errs = [100 * (p * 1e3 / r["ms"] - 1) for r, p in pairs]
    lines = [("Whole steps (the benchmark's own Llama forward, all layers, attention over a KV cache, LM head on "
              "each sequence's last position; one CUDA graph per step) against the model's step time less its "
              f"engine overhead: {len(errs)} steps, median |error| {statistics.median(abs(e) for e in errs):.1f} %, "
              f"max {max(abs(e) for e in errs):.0f} %. The additive model (GEMMs on the batch's tokens + attention "
              "terms) holds for prefill, decode and mixed steps." + _mixing_note(steps)), "",
             "| model | prompt chunk | decodes | context each | measured ms | model ms | error % |",
             "|---|---|---|---|---|---|---|"]
    for (r, p), e in zip(pairs, errs):
        lines.append(f"| {r['model']} | {r['chunk']} | {r['batch']} | {r['context']} | {r['ms']:.2f} | "
                     f"{p * 1e3:.2f} | {e:+.0f} |")
    return lines


def _mixing_note(steps: list[dict]) -> str:
    """The interference the mixing routers avoid, in the measurement: decodes sharing a step with a prompt chunk."""
    by = {(r["model"], r["chunk"], r["batch"], r["context"]): r["ms"] for r in steps}
    mixed = by.get(("llama38b", 512, 32, 1024))
    alone = [v for (m, c, b, _), v in by.items() if (m, c, b) == ("llama38b", 0, 32)]
    if mixed is None or not alone:
        return ""
    return (f" Mixing shows in it: 32 decodes (1024-token contexts) sharing a step with a 512-token prompt chunk "
            f"wait {mixed:.1f} ms for their token, against {min(alone):.1f}-{max(alone):.1f} ms in decode-only steps "
            "(512-2048-token contexts).")


def repeatability_line(first: dict, raw: dict) -> str:
    """Run-to-run spread of the layer and attention timings between two benchmark runs (fresh machines)."""
    la = {(r["model"], r["tp"], r["num_tokens"]): r["layer_ms"] for r in first["layers"]}
    dl = [abs(r["layer_ms"] / la[(r["model"], r["tp"], r["num_tokens"])] - 1) for r in raw["layers"]]

    def akey(r: dict) -> tuple:
        return r["kind"], r["model"], r["tp"], r.get("tokens"), r.get("batch"), r.get("context")

    aa = {akey(r): r["ms"] for r in first["attention"]}
    da = [abs(r["ms"] / aa[akey(r)] - 1) for r in raw["attention"] if akey(r) in aa]
    return (f"Repeatability (the table's run against an earlier run on another machine of the same kind, "
            f"`*_run1.json`): layer timings differ by median "
            f"{100 * statistics.median(dl):.1f} %, p95 {100 * float(np.percentile(dl, 95)):.1f} %, max "
            f"{100 * max(dl):.0f} % ({len(dl)} points); attention by median {100 * statistics.median(da):.1f} %, "
            f"max {100 * max(da):.0f} % ({len(da)} points).")


def vars_of(c: Calibration, source: str = "splitwise-overhead+distserve-attention") -> dict:
    return {"overhead_s": c.overhead_s, "overhead_per_tp_s": c.overhead_per_tp_s, "k_prefill": c.k_prefill,
            "k_decode": c.k_decode, "source": source}


def _base(rows: ProfileRows, model: ModelSpec, gpu: GPUSpec, tp: int) -> LatencyModel:
    pair, tok = attention_coeffs(model, gpu, tp)
    return LatencyModel(model, gpu, tp, 2e-3, pair, tok, gemm_table(rows, model, gpu, tp), source="vidur")


def _sanity_lines() -> list[str]:
    """Shipped models at a few reference points (read back from the freshly written vendored files)."""
    from scheduler.latency import latency_for

    out = ["### Reference points of the shipped models (ms)", "",
           "| model | gpu | tp | source | decode bs1 ctx1k | decode bs64 ctx1k | prefill 1k | prefill 4k |",
           "|---|---|---|---|---|---|---|---|"]
    for key, tps in (("llama27b", (1, 2)), ("llama270b", (4, 8))):
        spec = spec_for(profiles.profile_meta()["models"][key])
        for g in ("a100", "h100", "h200", "a40", "l4"):
            for tp in tps:
                lat = latency_for(spec, GPUSpec.from_catalog(g), tp)
                d1 = sum(x * y for x, y in zip(lat.decode_coeffs(1), (1, 1024)))
                d64 = sum(x * y for x, y in zip(lat.decode_coeffs(64), (1, 64 * 1024)))
                out.append(f"| {key} | {g} | {tp} | {lat.source} | {d1 * 1e3:.1f} | {d64 * 1e3:.1f} | "
                           f"{lat.prefill_time(1024) * 1e3:.1f} | {lat.prefill_time(4096) * 1e3:.1f} |")
    return out


def write_report(path: Path, body: str) -> None:
    text = path.read_text() if path.exists() else f"# Latency model\n\n{BEGIN}\n{END}\n"
    if BEGIN not in text or END not in text:
        text += f"\n{BEGIN}\n{END}\n"
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    path.write_text(f"{head}{BEGIN}\n{body}\n{END}{tail}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m scheduler.latency.fit", description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_SHARED, help="folder with the public profiles")
    ap.add_argument("--report", type=Path, help="markdown file whose generated section is rewritten")
    args = ap.parse_args(argv)
    body, summary = run(args.data)
    if args.report:
        write_report(args.report, body)
    print(body)
    print(json.dumps({k: v for k, v in summary.items() if k.startswith("holdout")}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
