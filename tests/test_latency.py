"""Latency model: physical floors, the profiled fit (held out), end-to-end vs Splitwise, KV transfer/capacity."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from importlib import resources

import numpy as np
import pytest

from scheduler.config.load import bundled_configs, load_config
from scheduler.config.models import GPUSpec, ModelSpec
from scheduler.latency import kv_transfer_time, latency_for, prefill_pairs, profiles, roofline_model
from scheduler.latency.fit import (
    GPU_KERNEL_FILES,
    SPLITWISE_FILE,
    holdout_errors,
    mape,
    measured_attention,
    predict_splitwise,
    read_gpu_kernels,
    read_vendored_splitwise,
    spec_for,
    whole_step_errors,
)

LLAMA7 = ModelSpec(
    name="llama2-7b", profile_name="meta-llama/Llama-2-7b-hf", num_layers=32, hidden_size=4096, num_heads=32,
    num_kv_heads=32, intermediate_size=11008, vocab_size=32000,
)
LLAMA70 = ModelSpec(
    name="llama2-70b", num_layers=80, hidden_size=8192, num_heads=64, num_kv_heads=8, intermediate_size=28672,
    vocab_size=32000,
)
A100 = GPUSpec.from_catalog("a100")
H100 = GPUSpec.from_catalog("h100")

# Measured with `python -m scheduler.latency.fit --report docs/latency.md`: held-out MAPE 1.57 %, p95 5.7 %.
HOLDOUT_MAPE_MAX = 0.025
HOLDOUT_P95_MAX = 0.08
# Measured worst per (gpu, tp): prompt 17.0 %, token 13.9 % (docs/latency.md).
SPLITWISE_PROMPT_MAPE_MAX = 20.0
SPLITWISE_TOKEN_MAPE_MAX = 16.0

BATCHES = (1, 2, 8, 32, 128, 256, 512)
CONTEXTS = (0, 16, 512, 2048, 8192)


def _pool_models():
    for name in bundled_configs():
        cfg = load_config(name)
        for pool in cfg.pools:
            yield pytest.param(latency_for(cfg.model, cfg.gpus[pool.gpu], pool.tp), id=f"{name}:{pool.name}")


def _profiled_models():
    for gpu, key, tp in profiles.profiled_triples():
        spec = spec_for(profiles.profile_meta()["models"][key])
        lat = profiles.profiled_model(spec, GPUSpec.from_catalog(gpu), tp)
        assert lat is not None, (gpu, key, tp)
        yield pytest.param(lat, id=f"{gpu}:{key}:tp{tp}")


# ---- physics ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("lat", [*_pool_models(), *_profiled_models()])
def test_decode_step_never_beats_hbm_floor(lat):
    for b in BATCHES:
        a, slope = lat.decode_coeffs(b)
        for ctx in CONTEXTS:
            total = b * ctx
            t = a + slope * total
            assert t >= lat.hbm_floor(b, total), (b, ctx, t, lat.hbm_floor(b, total))
            assert t == pytest.approx(lat.step_time(decode_batch=b, decode_context=total))


@pytest.mark.parametrize("lat", [*_pool_models(), *_profiled_models()])
def test_step_time_monotone(lat):
    ns = [1, 2, 7, 64, 100, 512, 2048, 4096, 5000, 9000, 20000]
    g = [lat.gemm(n) for n in ns]
    assert all(y >= x for x, y in itertools.pairwise(g)), g
    pre = [lat.prefill_time(n) for n in ns]
    assert all(y > x for x, y in itertools.pairwise(pre))
    assert lat.prefill_time(512, context_before=4096) > lat.prefill_time(512)
    assert lat.step_time(decode_batch=8, decode_context=8000) > lat.step_time(decode_batch=8, decode_context=800)


def test_roofline_monotone_and_tp_helps_compute_bound():
    r1, r2 = roofline_model(LLAMA7, A100, 1), roofline_model(LLAMA7, A100, 2)
    xs = [r1.gemm(n) for n in (1, 16, 256, 1024, 4096, 16384, 40000)]
    assert all(y >= x for x, y in itertools.pairwise(xs))
    assert r2.gemm(4096) < r1.gemm(4096)
    assert roofline_model(LLAMA7, H100, 1).prefill_time(2048) < r1.prefill_time(2048)
    # Attention cost grows with context before the chunk.
    assert prefill_pairs(100, 1000) > prefill_pairs(100, 0) > 0


# ---- the profiled fit ------------------------------------------------------------------------------------------
def test_gemm_table_held_out_interpolation_error():
    errs: list[float] = []
    for (gpu, key, tp), rows in profiles.profile_rows().items():
        spec = spec_for(profiles.profile_meta()["models"][key])
        errs += holdout_errors(rows, spec, GPUSpec.from_catalog(gpu), tp)
    assert len(errs) > 1000
    assert np.mean(errs) < HOLDOUT_MAPE_MAX, np.mean(errs)
    assert np.percentile(errs, 95) < HOLDOUT_P95_MAX, np.percentile(errs, 95)


def test_end_to_end_vs_splitwise():
    text = (resources.files("scheduler.latency") / "data" / SPLITWISE_FILE).read_text()
    rows = [r for r in read_vendored_splitwise(text) if not r["excluded"]]
    assert len(rows) >= 100
    for gpu in ("a100", "h100"):
        for tp in (2, 4, 8):
            lat = latency_for(LLAMA70.model_copy(update={"profile_name": "meta-llama/Llama-2-70b-hf"}),
                              GPUSpec.from_catalog(gpu), tp)
            assert lat.source.startswith("vidur")
            use = [r for r in rows if r["gpu"] == gpu and r["tp"] == tp]
            pred = [(predict_splitwise(lat, r), r) for r in use]
            pm = mape([(p[0], r["prompt_s"]) for p, r in pred])
            tm = mape([(p[1], r["token_s"]) for p, r in pred])
            assert pm < SPLITWISE_PROMPT_MAPE_MAX, (gpu, tp, pm)
            assert tm < SPLITWISE_TOKEN_MAPE_MAX, (gpu, tp, tm)


def test_sanity_numbers_llama2_7b_a100():
    lat = latency_for(LLAMA7, A100, 1)
    assert lat.source.startswith("vidur")
    a, b = lat.decode_coeffs(1)
    assert 0.010 < a + b * 1024 < 0.018
    assert 0.060 < lat.prefill_time(1024) < 0.110
    # Profiled and roofline agree within a factor of 2 where both apply.
    roof = roofline_model(LLAMA7, A100, 1)
    for n in (1, 256, 2048):
        assert 0.5 < lat.gemm(n) / roof.gemm(n) < 2.0


@pytest.mark.parametrize(
    ("model", "gpu", "tp"),
    [
        (LLAMA7, GPUSpec.from_catalog("l4"), 1),  # unprofiled GPU
        (LLAMA7, A100, 3),  # unprofiled TP degree
        (LLAMA7.model_copy(update={"dtype": "float32"}), A100, 1),  # Vidur profiled fp16
        (LLAMA7.model_copy(update={"num_layers": 2, "hidden_size": 128, "num_heads": 4, "num_kv_heads": 4}), A100, 1),
        (LLAMA7.model_copy(update={"name": "mystery", "profile_name": None}), A100, 1),
    ],
)
def test_profiled_model_none_outside_profiles(model, gpu, tp):
    assert profiles.profiled_model(model, gpu, tp) is None
    assert latency_for(model, gpu, tp).source == "roofline"


@pytest.mark.parametrize(
    ("name", "key"),
    [("meta-llama/Llama-2-7b-hf", "llama27b"), ("llama2-7b", "llama27b"), ("Llama-2-70B", "llama270b"),
     ("meta-llama/Meta-Llama-3-8B", "llama38b"), ("codellama/CodeLlama-34b-Instruct-hf", "codellama34b")],
)
def test_model_key(name, key):
    assert profiles.model_key(name) == key


@pytest.mark.parametrize(
    ("name", "fam"), [("A100-80GB", "a100"), ("a100", "a100"), ("H100-80GB", "h100"), ("A40", "a40"),
                      ("NVIDIA H200", "h200"), ("H200", "h200"), ("a4000", None), ("L4", None), ("cpu", None)],
)
def test_gpu_family(name, fam):
    assert profiles.gpu_family(name) == fam


# ---- GPU families measured on a lent GPU (bench/bench_gpu_kernels.py) -------------------------------------------
H200_KERNELS = json.loads(GPU_KERNEL_FILES[0].read_text())


def test_h200_table_is_the_recorded_measurement():
    """The vendored H200 rows are the committed benchmark's numbers, and H200 configs use them."""
    by_key = {}
    for r in H200_KERNELS["layers"]:
        by_key.setdefault((r["model"], r["tp"]), []).append(r)
    assert len(by_key) == 20  # five model shapes x TP 1/2/4/8
    for (key, tp), pts in by_key.items():
        rows = profiles.profile_rows()[("h200", key, tp)]
        assert rows.num_tokens == tuple(sorted(r["num_tokens"] for r in pts))
        want = [r["layer_ms"] for r in sorted(pts, key=lambda r: r["num_tokens"])]
        assert rows.layer_ms == pytest.approx(want, rel=1e-4)
        assert rows.allreduce_ms is not None and (tp > 1) == any(rows.allreduce_ms)
    spec = spec_for(profiles.profile_meta()["models"]["llama38b"])
    lat = latency_for(spec, GPUSpec.from_catalog("h200"), 1)
    assert lat.source == "measured+h100-overhead" and lat.gemm.source == "measured"


def test_h200_against_h100_follows_the_datasheets():
    """Same Hopper die, 1.43x the HBM bandwidth: memory-bound decode GEMMs ~0.7x the H100's time, compute-bound
    prefill GEMMs about equal (independent measurements: Vidur's H100 table vs ours)."""
    spec = spec_for(profiles.profile_meta()["models"]["llama27b"])
    for tp in (1, 2):
        h100 = latency_for(spec, H100, tp).gemm
        h200 = latency_for(spec, GPUSpec.from_catalog("h200"), tp).gemm
        assert 0.6 < h200(1) / h100(1) < 0.95, (tp, h200(1) / h100(1))
        assert 0.85 < h200(4096) / h100(4096) < 1.25, (tp, h200(4096) / h100(4096))


def test_h200_attention_multipliers_from_the_measurement():
    kp, kd, kps, kds = measured_attention(H200_KERNELS, GPUSpec.from_catalog("h200"))
    cal = profiles.calibration_for("h200")
    assert (cal.k_prefill, cal.k_decode) == pytest.approx((kp, kd))
    assert len(kps) >= 8 and len(kds) >= 20
    # A modern flash kernel at >= 1k tokens runs near the roofline; decode at full occupancy near HBM speed.
    assert 0.8 < kp < 3.0 and 0.7 < kd < 1.5


def test_h200_whole_steps_match_the_additive_model():
    """The benchmark's whole-model steps (decode, prefill, mixed) against the model built from its parts: measured
    median |error| 2.0 %, max 15 % (docs/latency.md)."""
    specs = {k: spec_for(v) for k, v in profiles.profile_meta()["models"].items()}
    pairs = whole_step_errors(H200_KERNELS["steps"], specs, GPUSpec.from_catalog("h200"))
    errs = [abs(p * 1e3 / r["ms"] - 1) for r, p in pairs]
    assert len(errs) >= 30 and {r["chunk"] > 0 and r["batch"] > 0 for r, _ in pairs} == {True, False}
    assert np.median(errs) < 0.05 and max(errs) < 0.20, (np.median(errs), max(errs))


def test_gpu_kernel_benchmark_smoke_on_cpu(tmp_path):
    """The benchmark's code paths on the CPU (tiny shapes), and the fit reads what it writes."""
    from bench.bench_gpu_kernels import main

    assert main(["--out", str(tmp_path), "--quick", "--device", "cpu"]) == 0
    raw = json.loads((tmp_path / "gpu_kernels.json").read_text())
    assert raw["errors"] == {} and {"layers", "attention", "kv_copy"} <= set(raw)
    assert {r["kind"] for r in raw["attention"]} == {"prefill", "decode"}
    assert all(r["end_to_end_ms"] > 0 for r in raw["kv_copy"]["paged"])
    raw["info"]["name"] = "NVIDIA H200"  # what a GPU run records
    path = tmp_path / "h200.json"
    path.write_text(json.dumps(raw))
    allreduce = {("h100", tp): (np.array([1.0, 1e9]), np.array([0.01, 1.0])) for tp in (2, 4, 8)}
    fam, rows, _ = read_gpu_kernels(path, allreduce, raw["shapes"])
    assert fam == "h200" and len(rows) == 12
    r = rows[("h200", "llama38b", 2)]
    assert r.num_tokens == (1, 8, 64) and len(r.emb_ms) == 3 and all(a > 0 for a in r.allreduce_ms)


def test_gpu_replay_benchmark_smoke_on_cpu(tmp_path):
    """Live vs simulated through one EngineModel on two clocks (tiny shapes on the CPU): every request gets its
    first and last token on both clocks, the real clock's steps are the engine model's, errors are reported."""
    from bench.bench_gpu_replay import main

    assert main(["--out", str(tmp_path), "--quick", "--device", "cpu"]) == 0
    d = json.loads((tmp_path / "gpu_replay.json").read_text())
    assert d["profile"]["overhead_s"] > 0 and len(d["runs"]) == 2
    for run in d["runs"]:
        live = run["live_per_request"]
        assert not any(np.isnan(live["first_s"])) and not any(np.isnan(live["finish_s"]))
        assert all(f >= a for f, a in zip(live["first_s"], live["arrival_s"]))
        assert run["steps"]["count"] > 0 and run["steps"]["prompt_chunks"] >= run["requests"]
        assert set(run["sim_error_pct"]) == {f"{k}_{q}" for k in ("ttft_s", "tpot_s", "e2e_s") for q in ("p50", "p90")}


def test_profiles_load_lazily():
    code = ("import scheduler.latency, scheduler.latency.profiles as p; "
            "assert p.profile_rows.cache_info().currsize == 0 and p.profile_meta.cache_info().currsize == 0")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_isotonic():
    ys = profiles.isotonic(np.array([1.0, 3.0, 2.0, 2.0, 5.0, 4.0]))
    assert list(ys) == pytest.approx([1.0, 7 / 3, 7 / 3, 7 / 3, 4.5, 4.5])


# ---- KV transfer and capacity ------------------------------------------------------------------------------------
def test_kv_transfer_time():
    assert kv_transfer_time(0, LLAMA7, bandwidth_gbps=25, latency_s=1e-3) == 0.0
    t1 = kv_transfer_time(1000, LLAMA7, bandwidth_gbps=25, latency_s=1e-3)
    t2 = kv_transfer_time(2000, LLAMA7, bandwidth_gbps=25, latency_s=1e-3)
    # Llama-2-7B fp16: 512 KiB of KV per token.
    assert LLAMA7.kv_bytes_per_token == 2 * 32 * 32 * 128 * 2
    assert t1 == pytest.approx(1e-3 + 1000 * 524288 / 25e9)
    assert t2 - t1 == pytest.approx(1000 * 524288 / 25e9)
    # GQA: 70B moves 8x less KV per token per layer than it would with full heads.
    assert LLAMA70.kv_bytes_per_token == 2 * 80 * 8 * 128 * 2


def test_kv_blocks_capacity():
    lat = latency_for(LLAMA7, A100, 1)
    blocks = lat.kv_blocks(16, gpu_memory_utilization=0.9, activation_reserve_gib=2.0)
    free = 80 * 2**30 * 0.9 - LLAMA7.weight_bytes - 2 * 2**30
    assert blocks == int(free // (LLAMA7.kv_bytes_per_token * 16))
    assert 7000 < blocks < 7600  # ~115k tokens of KV on one A100-80GB
    assert latency_for(LLAMA7, A100, 2).kv_blocks(16, gpu_memory_utilization=0.9, activation_reserve_gib=2.0) > 2 * blocks
    # 70B does not fit on one 80 GB GPU; it does on four.
    assert roofline_model(LLAMA70, A100, 1).kv_blocks(16, gpu_memory_utilization=0.9, activation_reserve_gib=2.0) == 0
    assert roofline_model(LLAMA70, A100, 4).kv_blocks(16, gpu_memory_utilization=0.9, activation_reserve_gib=2.0) > 0


def test_every_example_pool_has_kv_room():
    for name in bundled_configs():
        cfg = load_config(name)
        for pool in cfg.pools:
            lat = latency_for(cfg.model, cfg.gpus[pool.gpu], pool.tp)
            e = pool.engine
            blocks = e.num_kv_blocks or lat.kv_blocks(
                e.block_size, gpu_memory_utilization=e.gpu_memory_utilization,
                activation_reserve_gib=e.activation_reserve_gib,
            )
            # At least one max-length request fits.
            assert blocks * e.block_size >= cfg.model.max_model_len, (name, pool.name, blocks)
