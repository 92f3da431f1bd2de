"""The simulator's engine model and KV capacity against real (vLLM) engines: each test is a place they differed."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from scheduler.config.models import ClusterConfig, EngineSpec, GPUSpec, ModelSpec, PoolSpec
from scheduler.core.types import ClusterView, InstanceRole
from scheduler.engine_model import EngineModel
from scheduler.latency import roofline_model
from scheduler.latency.model import attention_coeffs
from scheduler.policy.migration import LlumnixMigrationPolicy, MigrationPlan
from sim.simulator import Simulator, Workload

# Llama-2-70B: 8 KV heads (GQA), head_dim 128.
LLAMA70 = ModelSpec(
    name="llama2-70b",
    num_layers=80,
    hidden_size=8192,
    num_heads=64,
    num_kv_heads=8,
    intermediate_size=28672,
    vocab_size=32000,
)
H100 = GPUSpec.from_catalog("h100")
ONE_HEAD = (
    2 * 80 * 1 * 128 * 2
)  # K and V of one KV head, all layers, fp16: what each GPU holds per token at TP 16


def test_kv_capacity_counts_the_kv_heads_vllm_replicates_past_their_number() -> None:
    """At TP 16 vLLM gives each GPU one of Llama-2-70B's 8 KV heads (``max(1, 8 // 16)``, replicated); the engine
    model divided the model's KV by 16 (half a head per GPU) and had twice the KV blocks vLLM has."""
    tp = 16
    eng = EngineModel(roofline_model(LLAMA70, H100, tp), EngineSpec(block_size=16))
    free_per_gpu = H100.memory_gib * 2**30 * 0.9 - LLAMA70.weight_bytes / tp - 2 * 2**30
    assert abs(eng.total_blocks - free_per_gpu // (ONE_HEAD * 16)) <= 1
    assert LLAMA70.kv_bytes_per_token_per_gpu(tp) == ONE_HEAD
    assert LLAMA70.kv_bytes_per_token_per_gpu(4) == 2 * ONE_HEAD  # split: 2 heads each


def test_decode_kv_reads_per_gpu_stop_shrinking_once_kv_heads_are_replicated() -> None:
    """A decode reads its context's KV on every GPU: at TP 16 one replicated head each, as much as at TP 8, not
    half of it (the roofline's per-token attention time halved past TP 8)."""
    assert attention_coeffs(LLAMA70, H100, 16)[1] == attention_coeffs(LLAMA70, H100, 8)[1]
    lat16, lat8 = roofline_model(LLAMA70, H100, 16), roofline_model(LLAMA70, H100, 8)
    weights = LLAMA70.weight_bytes / (H100.hbm_gbps * 1e9)
    assert lat16.hbm_floor(1, 10_000) - weights / 16 == pytest.approx(lat8.hbm_floor(1, 10_000) - weights / 8)


def _vllm_args(pool: PoolSpec, model: ModelSpec = LLAMA70) -> dict:
    from scheduler.control.instance import make_vllm_backend

    backend = make_vllm_backend(
        model=model, gpu=H100, pool=pool, role=InstanceRole.MIXED, model_path="/no/model"
    )
    return backend._engine_args


def test_a_vllm_pool_pinning_kv_blocks_gets_them_per_gpu_with_replicated_kv_heads() -> None:
    """``num_kv_blocks`` becomes vLLM's per-GPU ``kv_cache_memory_bytes``: with TP past the KV heads each GPU holds
    one head per token, and the bytes were for half of one (vLLM then had half the blocks the config pins)."""
    pool = PoolSpec(name="d", gpu="h100", tp=16, backend="vllm", engine=EngineSpec(num_kv_blocks=1000))
    assert _vllm_args(pool)["kv_cache_memory_bytes"] == (1000 * 16 + 32) * ONE_HEAD


def test_a_gpu_vllm_pool_without_kv_blocks_sizes_its_kv_from_gpu_memory_utilization(monkeypatch) -> None:
    """On a GPU, a pool without ``num_kv_blocks`` had the backend's fixed 256 MiB of KV (a CPU host-memory default:
    3,276 tokens of Llama-2-70B per H100 at TP 4, where the engine model gives the pool 496,512); vLLM should size
    it from the pool's ``gpu_memory_utilization``, as the engine model does. On CPU the configured size stays."""
    from vllm.platforms import current_platform

    engine = EngineSpec(gpu_memory_utilization=0.85)
    monkeypatch.setattr(current_platform, "is_cpu", lambda: False)
    for tp in (1, 4):
        args = _vllm_args(PoolSpec(name="g", gpu="h100", tp=tp, backend="vllm", engine=engine))
        assert args["kv_cache_memory_bytes"] is None
        assert args["gpu_memory_utilization"] == 0.85
    monkeypatch.setattr(current_platform, "is_cpu", lambda: True)
    args = _vllm_args(PoolSpec(name="c", gpu="h100", backend="vllm", engine=engine))
    assert args["kv_cache_memory_bytes"] == 256 << 20
    assert "gpu_memory_utilization" not in args


# ---- migration rate limits: the policy's, applied by the simulator as by the live Controller ----------------------
class _DrainFirst(LlumnixMigrationPolicy):
    """The Llumnix policy with the simulator's first instance draining; records when it planned what."""

    def __init__(self, **kw: object) -> None:
        super().__init__(**kw)
        self.planned: list[tuple[float, object]] = []

    def plan(self, v: ClusterView, now_s: float) -> list[MigrationPlan]:
        v = ClusterView(v.time_s, (dataclasses.replace(v.instances[0], draining=True), *v.instances[1:]))
        out = super().plan(v, now_s)
        self.planned += [(now_s, x.request_id) for x in out]
        return out


def test_the_simulator_starts_no_more_migrations_per_second_than_the_live_controller() -> None:
    """``max_per_s`` (default 2) was the Controller's own check, after the policy: live, a drain of 8 requests
    started 2 a second; the simulator ran the policy alone and started all 8 in its first round. The cap is the
    policy's now, so both apply it."""
    from tests.test_engine_model import GPU, MODEL
    from tests.test_sim_migration import AllToFirst

    eng = EngineSpec(block_size=16, max_num_batched_tokens=4096, max_num_seqs=64, num_kv_blocks=4000)
    cfg = ClusterConfig(
        gpus={"a100": GPU},
        model=MODEL,
        pools=[PoolSpec(name="src", gpu="a100", engine=eng), PoolSpec(name="dst", gpu="a100", engine=eng)],
    )
    pol = _DrainFirst(max_concurrent=16, max_per_instance=16, max_plans=16, cooldown_s=0.0)
    sim = Simulator(cfg, router=AllToFirst(), migration=pol)
    n = 8
    res = sim.run(Workload(np.zeros(n), np.full(n, 200), np.full(n, 2000)))
    times = [t for t, _ in pol.planned]
    assert sorted({rid for _, rid in pol.planned}) == list(range(n)) and res.migrations == n
    assert max(sum(t0 <= t < t0 + 1.0 for t in times) for t0 in times) == 2  # the default max_per_s


def test_a_dropped_plan_gives_its_slot_of_max_per_s_back() -> None:
    """A plan its executor never started (the Controller had no stream for it yet; the simulator's request had
    left the source) did not count against the Controller's ``max_per_s``, and does not against the policy's."""
    from tests.test_policies_migration import inst, rl, view

    pol = LlumnixMigrationPolicy(
        max_per_s=2, max_concurrent=16, max_per_instance=16, max_plans=16, cooldown_s=0
    )
    d = inst("d", tuple(rl(f"r{k}", rem=100.0 - k) for k in range(5)), draining=True)
    x = inst("x", total=1000)
    first = pol.plan(view(d, x), 0.0)
    assert [p.request_id for p in first] == ["r0", "r1"]
    d = inst("d", tuple(rl(f"r{k}", rem=100.0 - k) for k in range(2, 5)), draining=True)
    assert pol.plan(view(d, x), 0.5) == []  # two in the last second already
    pol.on_migration_dropped("r1")
    assert [p.request_id for p in pol.plan(view(d, x), 0.6)] == ["r2"]
    assert [p.request_id for p in pol.plan(view(d, x), 1.0)] == ["r3"]  # r0's start left the window


def test_a_step_budget_below_max_num_seqs_is_refused_as_vllm_refuses_it() -> None:
    """vLLM refuses ``max_num_batched_tokens < max_num_seqs`` at engine start; the config took it, so a simulation
    ran a cluster no live vLLM pool starts as (its batches capped at the budget, 4 decodes of 16 allowed)."""
    with pytest.raises(ValueError, match="max_num_batched_tokens: 4 is below max_num_seqs 16"):
        EngineSpec(max_num_batched_tokens=4, max_num_seqs=16)
    EngineSpec(max_num_batched_tokens=16, max_num_seqs=16)


# ---- the simulator's migration protocol knobs: the live ingress's ------------------------------------------------
def _protocol_run(protocol: dict, *, small_blocks: int) -> tuple[Simulator, object]:
    """One request (200-token prompt, 300 out) on a draining instance, moved to ``dst`` (``small_blocks``)."""
    from tests.test_engine_model import GPU, MODEL
    from tests.test_sim_migration import AllToFirst

    def eng(blocks: int) -> EngineSpec:
        return EngineSpec(block_size=16, max_num_batched_tokens=512, max_num_seqs=64, num_kv_blocks=blocks)

    cfg = ClusterConfig(
        gpus={"a100": GPU},
        model=MODEL,
        pools=[
            PoolSpec(name="src", gpu="a100", engine=eng(2000)),
            PoolSpec(name="dst", gpu="a100", engine=eng(small_blocks)),
        ],
        policies={"migration": {"name": "llumnix", "params": {"protocol": protocol}}},
    )
    sim = Simulator(cfg, router=AllToFirst(), migration=_DrainFirst())
    return sim, sim.run(Workload(np.zeros(1), np.array([200]), np.array([300])))


def test_the_simulator_reserves_the_headroom_the_config_gives_the_live_protocol() -> None:
    """``policies.migration.params.protocol`` sets the live ingress's protocol; the simulator's driver kept its own
    defaults. With 512 tokens of headroom a 40-block destination refuses a ~210-token request live (46 blocks);
    the simulator reserved 64 tokens' worth (18 blocks) and moved it."""
    sim, res = _protocol_run({"headroom_tokens": 512}, small_blocks=40)
    assert sim.migrations.aborted_dst >= 1 and res.migrations == 0
    sim, res = _protocol_run({}, small_blocks=40)
    assert res.migrations == 1


def test_a_blocking_protocol_stops_the_request_for_its_whole_context_in_the_simulator_too() -> None:
    """Mode ``blocking`` (no pre-copy: the stop copies all the KV) was simulated as a live multi-stage move, whose
    downtime is the last small stage; ``recompute`` is not modelled, and says so."""
    from scheduler.latency import kv_transfer_time

    sim, res = _protocol_run({"mode": "blocking"}, small_blocks=2000)
    gpu = sim.config.gpus["a100"]
    whole = kv_transfer_time(
        200, sim.config.model, bandwidth_gbps=gpu.network_gbps, latency_s=gpu.network_latency_s
    )
    assert res.migrations == 1 and sim.migrations.downtime_s[0] > whole
    live, _ = _protocol_run({}, small_blocks=2000)
    assert live.migrations.downtime_s[0] < whole / 2
    with pytest.raises(ValueError, match="protocol.mode: the simulator models live and blocking"):
        _protocol_run({"mode": "recompute"}, small_blocks=2000)


def test_the_policy_plans_with_the_headroom_the_protocol_reserves() -> None:
    """The policy's ``headroom_tokens`` and the protocol's were two settings: the Controller built the policy with
    its own 64 while the destination reserved the protocol's 512, so the policy planned moves the destination then
    refused. One value now (either key sets both); two that differ are refused when the config loads."""
    from scheduler.config.load import ConfigError, load_config, parse_config
    from scheduler.transfer.migration import migration_config, migration_policy

    raw = load_config("tiny-cpu").model_dump(mode="json")

    def cfg(params: dict) -> ClusterConfig:
        return parse_config({**raw, "policies": {**raw["policies"], "migration": {"name": "llumnix",
                                                                                 "params": params}}}, source="x")

    for params in ({"protocol": {"headroom_tokens": 512}}, {"headroom_tokens": 512},
                   {"headroom_tokens": 512, "protocol": {"headroom_tokens": 512}}):
        c = cfg(params)
        assert migration_policy(c).headroom_tokens == migration_config(c).headroom_tokens == 512, params
    assert migration_policy(cfg({})).headroom_tokens == migration_config(cfg({})).headroom_tokens == 64
    with pytest.raises(ConfigError, match=r"params.headroom_tokens \(128\) differs from .*protocol.headroom_tokens"):
        cfg({"headroom_tokens": 128, "protocol": {"headroom_tokens": 512}})


def test_a_gpu_vllm_pool_keeps_the_configs_kv_block_size(monkeypatch) -> None:
    """``make_vllm_backend`` rounded every pool's block size up to 32 (a vLLM-CPU rule): on a GPU a 16-token config
    ran live with 32-token blocks -- coarser prefix hits and KV allocation than the engine model's 16."""
    from vllm.platforms import current_platform

    pool = PoolSpec(
        name="g", gpu="h100", tp=4, backend="vllm", engine=EngineSpec(block_size=16, num_kv_blocks=100)
    )
    monkeypatch.setattr(current_platform, "is_cpu", lambda: False)
    args = _vllm_args(pool)
    assert args["block_size"] == 16 and args["kv_cache_memory_bytes"] == (100 * 16 + 16) * 2 * ONE_HEAD
    monkeypatch.setattr(current_platform, "is_cpu", lambda: True)
    assert _vllm_args(pool)["block_size"] == 32
