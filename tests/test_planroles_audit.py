"""Audit of the capacity planner's per-role engine settings (sim/planner.py, scheduler/policy/placement.py): each
test reproduces one finding and failed before its fix."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from scheduler.cli import main as cli_main
from scheduler.config.load import load_config
from scheduler.config.models import ClusterConfig, EngineSpec, SLOSpec
from scheduler.core.types import InstanceRole
from scheduler.policy.placement import enumerate_placements, instance_profile, pair_prefill_rps
from sim import planner
from sim.cluster import latency_factory
from sim.simulator import Workload
from sim.traces import default_trace

ROOT = Path(__file__).resolve().parents[1]
P, D = InstanceRole.PREFILL, InstanceRole.DECODE


def _with_engines(base: ClusterConfig, **engine_of_role: dict) -> ClusterConfig:
    """``base`` with each named role's pool's engine settings updated (``prefill={...}``, ``decode={...}``)."""
    pools = [
        p.model_copy(update={"engine": p.engine.model_copy(update=engine_of_role.get(p.role.value, {}))})
        for p in base.pools
    ]
    return base.model_copy(update={"pools": pools})


@pytest.fixture(scope="module")
def short_requests() -> Workload:
    """60 requests at 4 req/s, every one within tiny-llama's 2,048-token context."""
    rng = np.random.default_rng(0)
    n = 60
    return Workload(
        arrival_s=np.concatenate([[0.0], np.cumsum(rng.exponential(0.25, n - 1))]),
        prompt_tokens=rng.integers(200, 1500, n),
        output_tokens=rng.integers(20, 200, n),
    )


# ---- 1. each role's pool fits by its own engine settings ---------------------------------------------------------
def test_a_pd_template_fits_each_role_by_its_own_pools_kv(short_requests: Workload) -> None:
    """deploy/examples/cpu-pd.yaml with its PREFILL pool at 64 KV blocks (2,048 tokens) and its DECODE pool at 256
    (8,192): the analytic pass fitted every role with the first pool's engine and KV for 4 max-length requests,
    so ``plan`` raised "tiny-llama fits on none of cpu", though the simulator serves the template. A PREFILL
    instance now needs KV for one max-length prompt of its own pool, a DECODE instance 4 requests of its own. The
    mirror (PREFILL 256, DECODE 64) was planned as P/D, its decoders sized on the PREFILL pool's 8,192 tokens."""
    base = load_config(str(ROOT / "deploy/examples/cpu-pd.yaml"))
    small_prefill = _with_engines(base, prefill={"num_kv_blocks": 64})
    results = planner.plan(small_prefill, short_requests, tps=(1,), max_instances=4, workers=1)
    # The MIXED layout copies the first pool (``template_for``): 2,048 tokens hold one request, so only P/D.
    assert results and all(r.candidate.prefill_share is not None for r in results)
    best = results[0]
    assert best.attainment >= 0.9
    pools = planner.make_config(small_prefill, best.candidate, best.counts).pools
    assert [(p.role, p.engine.num_kv_blocks) for p in pools] == [(P, 64), (D, 256)]

    seen: list[planner.Candidate] = []
    small_decode = _with_engines(base, decode={"num_kv_blocks": 64})
    planner.plan(
        small_decode,
        short_requests,
        tps=(1,),
        max_instances=4,
        workers=1,
        progress=lambda done, total, r: seen.append(r.candidate),
    )
    assert [c.layout for c in seen] == ["mixed"]  # the DECODE pool holds one max-length request: no P/D


# ---- 2. each role's pool is sized by its own engine settings -----------------------------------------------------
PREFILL_ENGINE = {
    "max_num_seqs": 8,
    "max_num_batched_tokens": 8192,
}  # a prefill-tuned engine: big chunks, few seqs
DECODE_ENGINE = {"max_num_seqs": 256, "max_num_batched_tokens": 512}


@pytest.fixture(scope="module")
def pd_template() -> ClusterConfig:
    """The default config (Llama-2-7B) as a P/D template whose two pools run different engine settings."""
    base = load_config("default")
    mixed = base.pools[0]
    pools = [
        mixed.model_copy(
            update={"name": role.value, "role": role, "engine": mixed.engine.model_copy(update=eng)}
        )
        for role, eng in ((P, PREFILL_ENGINE), (D, DECODE_ENGINE))
    ]
    return base.model_copy(update={"pools": pools})


def test_pd_candidates_are_sized_with_each_roles_engine(pd_template: ClusterConfig) -> None:
    """A P/D template whose PREFILL pool runs 8 sequences in 8,192-token chunks and whose DECODE pool runs 256 in
    512-token ones: the analytic pass sized the decoders with the PREFILL pool's 8 sequences (the first pool's
    engine for every role), so the ``pd:auto`` share, the estimate each count search starts from and the
    ``--hetero-pd`` shares were the prefill engine's. Each pool is now sized with its own role's engine, as
    ``make_config`` builds it (and the SLA scaler sizes a live pool)."""
    base = pd_template
    w = Workload.from_trace(default_trace().head(300).scale_rate(4.0))
    ws = planner.summary_of(w)
    lat = latency_factory(base)

    def prof(gpu: str, tp: int, engine: dict, need: int):
        eng = EngineSpec(**{**base.pools[0].engine.model_dump(), **engine})
        return instance_profile(
            base.model,
            base.gpus[gpu],
            tp,
            planner.sized_slo(base, ws),
            ws,
            engine=eng,
            max_context_tokens=need * base.model.max_model_len,
            latency_factory=lat,
        )

    got: list[planner.PlanResult] = []
    planner.plan(
        base,
        w,
        gpus=["a100", "h100"],
        tps=(1,),
        layouts=("pd:auto",),
        hetero_pd=True,
        max_instances=12,
        workers=1,
        progress=lambda done, total, r: got.append(r),
    )
    assert any(r.candidate.decode_gpu for r in got)  # the heterogeneous pairs are checked too
    moved = 0
    for r in got:
        c = r.candidate
        pre = prof(c.gpu, c.tp, PREFILL_ENGINE, 1)
        dec = prof(*c.decode_on, DECODE_ENGINE, planner.MIN_KV_REQUESTS)
        assert c.layout == f"pd:auto={planner.auto_share(pre, dec):.2f}"
        assert r.estimate == planner.estimate(pre, c, ws.rate_rps, dec)
        # What the first pool's engine alone said (discriminates: the two engines size decode differently).
        old = prof(*c.decode_on, PREFILL_ENGINE, planner.MIN_KV_REQUESTS)
        moved += f"{planner.auto_share(pre, old):.2f}" != f"{planner.auto_share(pre, dec):.2f}"
    assert moved == len(got)


def test_enumerate_placements_sizes_each_pool_with_its_roles_engine(pd_template: ClusterConfig) -> None:
    """``enumerate_placements`` (the ``--hetero-pd`` pass) took one engine for every pool: it now takes one per
    role, and each P/D candidate's capacity is its PREFILL pool's (PREFILL engine, paired over the slower link)
    or its DECODE pool's (DECODE engine), whichever runs out first."""
    base = pd_template
    ws = planner.summary_of(Workload.from_trace(default_trace().head(300).scale_rate(4.0)))
    slo = planner.sized_slo(base, ws)
    gpus = {k: base.gpus[k] for k in ("a100", "h100")}
    engines = {P: EngineSpec(**PREFILL_ENGINE), D: EngineSpec(**DECODE_ENGINE)}
    cands = enumerate_placements(
        gpus, base.model, slo, ws, tp_choices=(1, 2), modes=("disaggregated",), engine=engines, prune=False
    )
    assert cands
    for c in cands:
        pre, dec = (
            instance_profile(base.model, gpus[p.gpu], p.tp, slo, ws, engine=engines[p.role]) for p in c.pools
        )
        n_p, n_d = (p.count for p in c.pools)
        assert c.capacity_rps == pytest.approx(min(n_p * pair_prefill_rps(pre, dec), n_d * dec.decode_rps))
    # And the pools it would write run the engine they were sized with.
    assert [s.engine for s in cands[0].to_pool_specs(engines)] == [engines[P], engines[D]]


# ---- 3. plan.json names every class's SLO and the one the analytic pass sized for ---------------------------------
def test_plan_json_names_each_class_slo_and_the_sized_one(tmp_path: Path) -> None:
    """plan.json's ``slo`` was class 0's whatever the planned workload held: a workload of a loose class 0 and a
    tight class 1 (the analytic pass sizes for the tight one, each request is scored against its own) named the
    loose SLO alone, and a workload of class 1 alone named a class it does not have. It now lists each class
    present with its requests (``slos``) and the SLO the analytic pass sized for (``sized_slo``)."""
    loose, tight = SLOSpec(ttft_s=8.0, tpot_s=0.2), SLOSpec(ttft_s=0.5, tpot_s=0.03)
    cfg = load_config("default").model_copy(update={"slos": {0: loose, 1: tight}})
    trace = default_trace().head(50)
    w = Workload.from_trace(trace)
    both = replace(w, priority=(np.arange(50) % 5 == 0).astype(np.int64))  # every fifth request in class 1
    planner.write_plan(tmp_path, cfg, trace, [], 0.9, workload=both)
    d = json.loads((tmp_path / "plan.json").read_text())
    assert d["slos"] == {
        "0": {**loose.model_dump(), "requests": 40},
        "1": {**tight.model_dump(), "requests": 10},
    }
    assert d["sized_slo"] == tight.model_dump()
    planner.write_plan(
        tmp_path, cfg, trace, [], 0.9, workload=replace(w, priority=np.ones(50, dtype=np.int64))
    )
    d = json.loads((tmp_path / "plan.json").read_text())
    assert d["slos"] == {"1": {**tight.model_dump(), "requests": 50}} and d["sized_slo"] == tight.model_dump()


# ---- 4. plan warns about requests a live cluster of its answer refuses -------------------------------------------
def test_plan_warns_about_requests_over_the_models_context(tmp_path: Path, capsys, monkeypatch) -> None:
    """``simulate`` and ``compare`` warn when requests need more than the model's max_model_len (a live cluster
    refuses them; the simulator serves them as if the context were longer); ``plan`` did not: on cpu-pd.yaml a
    40-request synthetic workload, 13 of them over tiny-llama's 2,048 tokens, was planned at 100% attainment
    without a word. It now warns as they do."""
    monkeypatch.setattr(planner, "plan", lambda base, w, **kw: [])  # the warning comes before any simulation
    args = ["--synthetic", "40", "--rate", "4", "--tp", "1", "--workers", "1", "--out", str(tmp_path)]
    assert cli_main(["plan", "--config", str(ROOT / "deploy/examples/cpu-pd.yaml"), *args]) == 1
    assert "13 of 40 requests need more than cpu-pd's max_model_len" in capsys.readouterr().err


# ---- 5. a KV-block override does not make a model fit a GPU its weights do not ---------------------------------
def test_a_kv_block_override_does_not_fit_weights_the_gpu_cannot_hold(monkeypatch) -> None:
    """``instance_profile`` checked the KV an engine holds (``engine_kv_tokens``), which takes a ``num_kv_blocks``
    override as is: Llama-2-70B (128 GiB of weights) with ``num_kv_blocks: 4096`` was planned on one 24 GB L4 and
    one H100 (the cheapest candidates). An instance now fits only where the memory left after the weights and the
    activation reserve holds the KV it is told to allocate."""
    base = load_config("llama2-70b-h100")
    pinned = _with_engines(base, mixed={"num_kv_blocks": 4096})  # 65,536 tokens: 16 max-length requests
    w = Workload.from_trace(default_trace().head(300))

    def planned(cfg: ClusterConfig) -> set[tuple[str, int]]:
        """The (GPU, TP) ``plan`` simulates (each search stubbed out)."""
        tried: list[tuple[str, int]] = []
        monkeypatch.setattr(
            planner,
            "plan_one",
            lambda b, c, *a, **kw: (
                tried.append((c.gpu, c.tp)) or planner.PlanResult(c, 0, 0, 0, 0, 0.0, 0.0, None, None)
            ),
        )
        cfg, keys = planner.with_gpus(cfg, ["l4", "h100"])
        planner.plan(cfg, w, gpus=keys, tps=(1, 2, 4, 8), layouts=("mixed",), workers=1)
        return set(tried)

    unpinned, got = planned(base), planned(pinned)
    assert unpinned == {
        ("l4", 8),
        ("h100", 2),
        ("h100", 4),
        ("h100", 8),
    }  # 128 GiB of weights: 2 H100s, 8 L4s
    assert got and got <= unpinned  # the override fits fewer, never more
