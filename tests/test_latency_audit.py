"""Latency-model audit: each test failed before its fix (the consumers of the model time a config alike, the live
profile's step table, its loading errors, the GPU match of the profiled tables)."""

from __future__ import annotations

import dataclasses
import itertools
import json

import pytest

from scheduler.config.load import load_config
from scheduler.config.models import EngineSpec, GPUSpec, ModelSpec
from scheduler.engine_model import EngineModel
from scheduler.latency import latency_for, prefill_pairs, profiles, roofline_model
from scheduler.policy.routers_learned import LearnedRouter
from scheduler.policy.routers_lookahead import LookaheadRouter
from scheduler.policy.scaling import SLAScaler, prefill_capacity_rps
from scheduler.profile import latency_from_profile
from sim.cluster import build_instances

LLAMA7 = ModelSpec(name="llama2-7b", num_layers=32, hidden_size=4096, num_heads=32, num_kv_heads=32,
                   intermediate_size=11008, vocab_size=32000)
# A live CPU profile as `llmsched profile` writes it (rounded from docs/results/live_vs_sim_s19d/pd-40-2, whose
# lone-step medians put 512 tokens under 384); the last point below the one before, as s13/pd-120-1's.
PROFILE = {
    "overhead_s": 1.79e-3, "gemm_s_per_token": 2.05e-5, "per_seq_s": 7.2e-5, "attn_prefill_s_per_pair": 0.0,
    "attn_decode_s_per_token": 4.3e-7, "request_latency_s": 7.5e-3,
    "prefill_table": [[32, 1.94e-3], [128, 3.58e-3], [256, 5.75e-3], [384, 9.41e-3], [512, 8.50e-3],
                      [768, 34.08e-3], [1024, 33.93e-3]],
}


def _write(tmp_path, prof: dict):
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(prof))
    return path


def _cpu_config(tmp_path):
    return load_config("tiny-cpu").model_copy(update={"latency_profile": str(_write(tmp_path, PROFILE))})


# ---- one latency function per config ---------------------------------------------------------------------------
@pytest.mark.parametrize("consumer", ["lookahead", "learned", "sla"])
def test_cost_models_time_a_profiled_config_as_the_simulator(tmp_path, consumer):
    """A config naming a `latency_profile`: the simulator timed its engines with it, the lookahead and learned
    routers and the SLA scaler with the roofline of the `cpu` pseudo-GPU (a 512-token prefill 17.3 ms against the
    simulator's 10.4 ms)."""
    cfg = _cpu_config(tmp_path)
    inst = build_instances(cfg)[0]
    snap = inst.make_snapshot(0.0, detail=False)
    if consumer == "lookahead":
        lat = LookaheadRouter(config=cfg).latency_of(snap)
    elif consumer == "learned":
        router = LearnedRouter()
        router.initialize(cfg)
        lat = router.latency_of(snap).lat
    else:
        lat = SLAScaler(config=cfg).latency_of(inst.pool.name)
    for n in (128, 512, 1024):
        assert lat.prefill_time(n) == pytest.approx(inst.latency.prefill_time(n), rel=1e-12), n
    assert lat.decode_coeffs(8) == pytest.approx(inst.latency.decode_coeffs(8), rel=1e-12)


# ---- mixed steps: what the router and the scaler assume is what the engine model charges ---------------------
def _per_seq_model():
    return dataclasses.replace(roofline_model(LLAMA7, GPUSpec.from_catalog("a100"), 1), per_seq_s=2e-3)


def test_router_prefill_span_is_the_engine_step():
    """The router's prefill step left out the prompt's per-sequence cost the engine model charges (2 ms here)."""
    lat = _per_seq_model()
    eng = EngineModel(lat, EngineSpec())
    eng.add_request("a", 512, 1)
    step = eng.step().duration_s
    router = LookaheadRouter(latency=lat, chunk_tokens=2048)
    assert router._prefill_span(lat, 512, prefill_pairs(512, 0), 0, 0) == pytest.approx(step, rel=1e-12)


def test_sla_prefill_capacity_counts_each_prompt_in_the_step():
    """Eight 256-token prompts packed into one 2048-token step: the scaler's service time left out their eight
    per-sequence costs."""
    lat = _per_seq_model()
    eng = EngineModel(lat, EngineSpec(max_num_batched_tokens=2048))
    for k in range(8):
        eng.add_request(f"r{k}", 256, 1)
    res = eng.step()
    assert len(res.admitted) == 8
    cap = prefill_capacity_rps(lat, 256, chunk_tokens=2048, max_utilization=0.9)
    assert cap == pytest.approx(0.9 * 8 / res.duration_s, rel=1e-12)


# ---- the live profile ------------------------------------------------------------------------------------------
def test_profile_step_table_never_falls_with_more_tokens(tmp_path):
    """Medians of a few lone steps on a noisy host: 512 tokens came out cheaper than 384, and a falling last slope
    made a 2048-token prefill cheaper than a 1024-token one (17 of the 168 profiles in docs/results dip)."""
    lat = latency_from_profile(_write(tmp_path, PROFILE), LLAMA7, GPUSpec.from_catalog("cpu"))
    ns = [1, 8, 16, 24, 32, 100, 128, 256, 384, 448, 512, 768, 1024, 2048, 8192]
    g = [lat.gemm(n) for n in ns]
    assert all(y >= x for x, y in itertools.pairwise(g)), list(zip(ns, g))
    pre = [lat.prefill_time(n) for n in ns]
    assert all(y >= x for x, y in itertools.pairwise(pre)), list(zip(ns, pre))
    assert min(pre) > 0


@pytest.mark.parametrize("key", ["gemm_s_per_token", "overhead_s", "attn_decode_s_per_token"])
def test_profile_missing_field_is_named(tmp_path, key):
    """A profile without a required field raised a bare ``KeyError`` naming neither the file nor the config key."""
    path = _write(tmp_path, {k: v for k, v in PROFILE.items() if k != key})
    with pytest.raises(ValueError, match=rf"latency_profile .*profile\.json: missing {key}"):
        latency_from_profile(path, LLAMA7, GPUSpec.from_catalog("cpu"))


def test_profile_without_table_needs_the_prefill_attention(tmp_path):
    prof = {k: v for k, v in PROFILE.items() if k not in ("prefill_table", "attn_prefill_s_per_pair")}
    with pytest.raises(ValueError, match="missing attn_prefill_s_per_pair"):
        latency_from_profile(_write(tmp_path, prof), LLAMA7, GPUSpec.from_catalog("cpu"))


# ---- which GPUs borrow a profiled table ------------------------------------------------------------------------
H100_PCIE = GPUSpec.from_catalog("h100").model_copy(
    update={"name": "H100-PCIe", "hbm_gbps": 2000.0, "fp16_tflops": 756.0, "interconnect_gbps": 32.0})


def test_respecced_gpu_does_not_borrow_the_sxm_table():
    """An H100 PCIe (2.0 TB/s, PCIe links) matched the `h100` family by name and took the SXM/DGX table: its
    one-token GEMMs read the 13.5 GB of Llama-2-7B weights in 5.69 ms, under the 6.74 ms its HBM needs, and a
    TP 2 step of 2048 tokens all-reduced over NVLink (27.6 ms; the roofline over PCIe: 64.6 ms)."""
    profiled = LLAMA7.model_copy(update={"profile_name": "meta-llama/Llama-2-7b-hf"})
    assert profiles.profiled_model(profiled, GPUSpec.from_catalog("h100"), 1) is not None
    lat = latency_for(profiled, H100_PCIE, 1)
    assert lat.gemm(1) >= LLAMA7.weight_bytes / (H100_PCIE.hbm_gbps * 1e9)
    assert profiles.profiled_model(profiled, H100_PCIE, 1) is None
    assert profiles.profiled_model(profiled, H100_PCIE, 2) is None
    # What does not change the kernels keeps the table: price, count, memory; the link at TP 1.
    same = GPUSpec.from_catalog("h100").model_copy(update={"price_per_hour": 1.0, "count": 4, "memory_gib": 94.0})
    assert profiles.profiled_model(profiled, same, 2) is not None
    link = GPUSpec.from_catalog("h100").model_copy(update={"interconnect_gbps": 32.0})
    assert profiles.profiled_model(profiled, link, 1) is not None
    assert profiles.profiled_model(profiled, link, 2) is None
