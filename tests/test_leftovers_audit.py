"""Audit of the leftovers of earlier audits (sim/planner.py, ``llmsched compare``'s goodput, shared test fixtures):
each test reproduces one finding and failed before its fix."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import yaml

from scheduler.cli import main as cli_main
from scheduler.config.load import load_config
from scheduler.config.models import ClusterConfig, SLOSpec
from scheduler.policy.placement import instance_profile
from sim import planner
from sim.compare import GOODPUT_CEILING
from sim.simulator import Workload
from sim.traces import default_trace

ROOT = Path(__file__).resolve().parents[1]
LOOSE, TIGHT = SLOSpec(ttft_s=8.0, tpot_s=0.2), SLOSpec(ttft_s=0.5, tpot_s=0.03)


@pytest.fixture(scope="module")
def two_classes() -> ClusterConfig:
    """The default config with a loose class 0 and a tight class 1."""
    return load_config("default").model_copy(update={"slos": {0: LOOSE, 1: TIGHT}})


def _with_classes(w: Workload, every: int) -> Workload:
    """``w`` with every ``every``-th request in class 1, the rest in class 0 (``every`` 0: all class 0)."""
    prio = np.zeros(len(w), dtype=np.int64)
    if every:
        prio[::every] = 1
    return replace(w, priority=prio)


# ---- 1. the planner's analytic pass sizes for the trace's tightest class ------------------------------------------
def test_planner_analytic_pass_sizes_for_the_tightest_class_in_the_trace(two_classes: ClusterConfig) -> None:
    """Class 0 loose (TTFT 8 s, TPOT 200 ms), class 1 tight (0.5 s, 30 ms); a fifth of the trace is class 1. The
    simulated pass scores each request against its own class, but the analytic pass (estimate, ``pd:auto``
    share, hetero pairs) sized an instance with class 0's SLO only: on an A100 a decode capacity of 6.0 req/s
    where the tight class allows 4.0, so an estimate of 4 instances where 5 are needed and a pd:auto share of
    0.32 where 0.24. It now sizes for the tightest class present in the trace, as the SLA scaler sizes pools
    (``scaling.tightest_slo``); a trace of class 0 alone is sized as before."""
    cfg = two_classes
    w = Workload.from_trace(default_trace().head(300).scale_rate(4.0))
    analytic = planner._analytic(cfg)

    def prof(slo: SLOSpec, trace: Workload):
        return instance_profile(
            cfg.model, cfg.gpus["a100"], 1, slo.to_slo(), planner.summary_of(trace), **analytic
        )

    mixed_trace, class0 = _with_classes(w, 5), _with_classes(w, 0)
    tight, loose = prof(TIGHT, mixed_trace), prof(LOOSE, mixed_trace)
    assert tight is not None and loose is not None
    assert tight.decode_rps < loose.decode_rps  # the two classes size differently: the test discriminates
    ws = planner.summary_of(mixed_trace)
    assert planner.profile(cfg, "a100", 1, ws) == tight
    assert planner.profile(cfg, "a100", 1, planner.summary_of(class0)) == prof(LOOSE, class0)
    c = planner.Candidate("a100", 1, "mixed", "least_outstanding")
    assert planner.estimate(tight, c, ws.rate_rps) > planner.estimate(loose, c, ws.rate_rps)
    # What ``plan`` builds from it: the pd:auto share it names and the estimate each search starts from.
    share = planner.auto_share(tight)
    assert share is not None and f"{share:.2f}" != f"{planner.auto_share(loose):.2f}"
    results = planner.plan(
        cfg, mixed_trace, gpus=["a100"], tps=(1,), layouts=("mixed", "pd:auto"), max_instances=12, workers=1
    )
    got = {r.candidate.layout: r.estimate for r in results}
    pd = planner.Candidate("a100", 1, f"pd:auto={share:.2f}", "least_outstanding")
    assert got == {
        "mixed": planner.estimate(tight, c, ws.rate_rps),
        pd.layout: planner.estimate(tight, pd, ws.rate_rps),
    }


# ---- 2. ``llmsched compare`` says when a goodput is the search's ceiling ------------------------------------------
def test_compare_says_when_a_goodput_is_the_search_ceiling(tmp_path: Path, capsys) -> None:
    """The goodput bisection stops at 8x the offered rate. On a 60-request head every router still met the target
    there, and compare reported 230.07 req/s (8 x 28.76) as each router's goodput, in the JSON and the table alike,
    with nothing saying it was the ceiling (6.4x the measured saturation). Now ``goodput_capped`` says so, and the
    table marks the figure ``>=`` with the reason; a measured goodput is not marked."""
    capped, measured = tmp_path / "capped.json", tmp_path / "measured.json"
    assert (
        cli_main(["compare", "--limit", "60", "--routers", "least_outstanding", "--json", str(capped)]) == 0
    )
    r = json.loads(capped.read_text())["routers"]["least_outstanding"]
    assert r["goodput_capped"] is True and r["goodput_rps"] == pytest.approx(
        GOODPUT_CEILING * r["offered_rps"]
    )
    line = next(x for x in capsys.readouterr().out.splitlines() if "goodput@90%" in x)
    assert f">={r['goodput_rps']:.2f} req/s" in line and "ceiling" in line
    args = ["--limit", "400", "--instances", "2", "--load", "1.0", "--routers", "least_outstanding"]
    assert cli_main(["compare", *args, "--json", str(measured)]) == 0
    r = json.loads(measured.read_text())["routers"]["least_outstanding"]
    assert r["goodput_capped"] is False and 0 < r["goodput_rps"] < GOODPUT_CEILING * r["offered_rps"]
    line = next(x for x in capsys.readouterr().out.splitlines() if "goodput@90%" in x)
    assert f"goodput@90% {r['goodput_rps']:.2f} req/s" in line and "ceiling" not in line
    # ``simulate --goodput`` warned on stderr, but its JSON could not tell a ceiling (64x) from a measurement.
    sim = tmp_path / "sim.json"
    assert cli_main(["simulate", "--limit", "10", "--goodput", "--json", str(sim)]) == 0
    s = json.loads(sim.read_text())
    assert s["goodput_capped"] is True and s["goodput_rps"] == pytest.approx(64 * s["offered_rps"])
    assert f"goodput >={s['goodput_rps']:.2f} req/s" in capsys.readouterr().out


def test_plan_progress_says_when_headroom_is_the_search_ceiling(tmp_path: Path, capsys) -> None:
    """``llmsched plan``'s table marks a headroom at the bisection's 2x ceiling ``>=``, but its progress line (what
    a user watches for minutes) said "up to 6.5 req/s" of the same lower bound (one A100 TP 2 on the Azure head,
    3.26 req/s x 2). It now says "at least"; a measured headroom (one A100 TP 1: 5.4 req/s) stays "up to"."""
    out = tmp_path / "plan"
    args = ["--limit", "200", "--gpus", "a100", "--tp", "1,2", "--layouts", "mixed", "--max-instances", "4"]
    assert cli_main(["plan", *args, "--workers", "1", "--out", str(out)]) == 0
    res = {r["candidate"]["tp"]: r for r in json.loads((out / "plan.json").read_text())["results"]}
    assert (res[1]["max_rate_capped"], res[2]["max_rate_capped"]) == (False, True)
    err = capsys.readouterr().err.splitlines()
    line = {
        tp: next(x for x in err if f"a100 TP{tp} mixed least_outstanding: 1 instances" in x) for tp in (1, 2)
    }
    assert f"up to {res[1]['max_rate_rps']:.1f} req/s" in line[1]
    assert f"at least {res[2]['max_rate_rps']:.1f} req/s" in line[2] and "up to" not in line[2]


# ---- 5. the planner's other leftovers --------------------------------------------------------------------------------
def test_a_pd_estimate_is_at_least_one_instance_per_pool() -> None:
    """A P/D layout's analytic estimate could be 1 (the Azure head on one A100: 0.34 of an instance prefilling),
    which no P/D cluster is: the search started from 2 (a prefill and a decode instance) while plan.json's
    ``estimate`` -- "the analytic instance count the search started from" -- and the table's "est. n" said 1."""
    cfg = load_config("default")
    w = Workload.from_trace(default_trace().head(200))
    ws = planner.summary_of(w)
    prof = planner.profile(cfg, "a100", 1, ws)
    c = planner.Candidate("a100", 1, "pd:0.34", "least_outstanding")
    assert prof is not None and ws.rate_rps < 0.66 * prof.decode_rps  # so one decode instance is enough
    assert planner.estimate(prof, c, ws.rate_rps) == 2
    r = planner.plan_one(cfg, c, w, target=0.9, max_instances=4)
    assert r.estimate == 2 and r.instances >= 2


def test_plan_names_the_gpu_inventory_when_it_holds_no_instance(tmp_path: Path, capsys) -> None:
    """With one A100 in the config (``gpus.a100.count: 1``), ``plan --tp 2`` said "llama2-7b fits on none of a100
    at TP 2 (weights plus KV ...)" -- it fits; the inventory was the reason. The error now names it."""
    raw = yaml.safe_load((ROOT / "scheduler/config/examples/default.yaml").read_text())
    raw["gpus"]["a100"] = {"count": 1}
    raw["pools"][0]["count"] = 1
    cfg = tmp_path / "one-a100.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    base = ["plan", "--config", str(cfg), "--limit", "50", "--gpus", "a100", "--workers", "1"]
    assert cli_main([*base, "--tp", "2", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "the GPU inventory (gpus.<key>.count) holds no instance of a100 TP2 (count 1)" in err
    assert "fits on none" not in err
    fits = ["--tp", "1,2", "--max-instances", "1", "--layouts", "mixed"]  # TP 1 fits: the plan runs
    assert cli_main([*base, *fits, "--out", str(tmp_path / "p")]) == 0
    # Eight GPUs, but one per node: a TP-2 instance (never spanning nodes) fits none of them either.
    raw["gpus"]["a100"] = {"count": 8, "gpus_per_node": 1}
    cfg.write_text(yaml.safe_dump(raw))
    assert cli_main([*base, "--tp", "2", "--out", str(tmp_path / "q")]) == 2
    assert "holds no instance of a100 TP2 (gpus_per_node 1)" in capsys.readouterr().err


# ---- 3. one no-Ray fixture (tests/conftest.py) ----------------------------------------------------------------------
def test_no_ray_refuses_every_way_a_test_could_start_ray(no_ray: None) -> None:
    """The one ``no_ray`` the modules that run ``Instance`` objects in-process share (nine kept a copy or an inline
    patch, of ``ray.get_runtime_context`` only): any Ray call that would start a local node now raises too (they
    all go through ``ray.init``), and an ``Instance`` still builds, with no node id."""
    import ray

    from bench.loadgen import cluster_config
    from scheduler.control.instance import Instance

    if ray.is_initialized():
        # An earlier module's Ray node is up in this process (the whole suite): check in a fresh one, not skipped.
        test = f"{Path(__file__).relative_to(ROOT)}::test_no_ray_refuses_every_way_a_test_could_start_ray"
        run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test], cwd=ROOT,
                             capture_output=True, text=True, timeout=300, check=False)
        assert run.returncode == 0 and "1 passed" in run.stdout, run.stdout[-3000:] + run.stderr[-2000:]
        return
    with pytest.raises(ray.exceptions.RaySystemError, match="Ray has not been started"):
        ray.put(1)  # no auto-connect in tests (tests/conftest.py): no ray.init() behind it to refuse
    with pytest.raises(RuntimeError, match="no_ray"):
        ray.init()
    with pytest.raises(RuntimeError, match="no_ray"):
        ray.get_runtime_context()
    cfg = cluster_config("no-ray", mixed=1)
    pool = cfg.pools[0]
    assert Instance("mixed-0", pool, cfg.model, cfg.gpus[pool.gpu]).info.node_id == ""
    assert not ray.is_initialized()


def test_a_ray_call_with_no_cluster_up_never_connects_on_its_own_in_tests() -> None:
    """A Ray call left over after a module's ``ray.shutdown()`` (a task's ``finally`` un-draining an instance with
    an actor method's ``.remote()``, a thread's ``ray.get_actor``) ``ray.init()``-ed: it joined the cluster being
    torn down, and Ray ended the whole pytest process when that raylet died (test_drain_node, once in CI).
    tests/conftest.py turns Ray's auto-connect off before Ray is imported: such a call raises, nothing starts."""
    from ray._private import auto_init_hook

    assert auto_init_hook.enable_auto_connect is False  # checked first: with it on, the call below starts a node
    import ray

    if ray.is_initialized():
        pytest.skip("an earlier module's Ray node is up in this process")
    with pytest.raises(ray.exceptions.RaySystemError, match="Ray has not been started"):
        ray.get_actor("llmsched-controller", namespace="llmsched")
    assert not ray.is_initialized()


# ---- 4. the planned cluster keeps its template pools' backend and timeouts ------------------------------------------
def test_planned_pools_keep_the_templates_backend_and_timeouts(tmp_path: Path) -> None:
    """``make_config`` built each planned pool from the template's engine settings alone: planned on a vLLM
    config (deploy/examples/cpu-pd.yaml), the ready-to-use best-cluster.yaml had ``backend: simulated`` on every
    pool -- ``llmsched serve`` on it served simulated engines -- and the default hang / start timeouts. Each
    planned pool now copies its role's template pool whole but for name, role, hardware and count."""
    base = load_config(str(ROOT / "deploy/examples/cpu-pd.yaml"))
    prefill, decode = (
        p.model_copy(update=kw)
        for p, kw in zip(base.pools, ({"hang_timeout_s": 30.0}, {"start_timeout_s": 120.0}), strict=True)
    )
    base = base.model_copy(update={"pools": [prefill, decode]})
    assert {p.backend for p in base.pools} == {"vllm"}
    pd = planner.make_config(base, planner.Candidate("cpu", 1, "pd:0.5", "least_outstanding"), (2, 3)).pools
    kept = ("backend", "engine", "hang_timeout_s", "start_timeout_s")
    for got, tpl, count in zip(pd, (prefill, decode), (2, 3), strict=True):
        assert (got.role, got.gpu, got.tp, got.count) == (tpl.role, "cpu", 1, count)
        assert {k: getattr(got, k) for k in kept} == {k: getattr(tpl, k) for k in kept}
    # The CLI's answer, as written and loaded back.
    cpu_mixed = str(ROOT / "deploy/examples/cpu-mixed.yaml")
    out = tmp_path / "plan"
    args = ["--synthetic", "40", "--rate", "4", "--tp", "1", "--layouts", "mixed", "--max-instances", "4"]
    assert cli_main(["plan", "--config", cpu_mixed, *args, "--workers", "1", "--out", str(out)]) == 0
    (best,) = load_config(str(out / "best-cluster.yaml")).pools
    assert best.backend == "vllm" and best.engine == load_config(cpu_mixed).pools[0].engine
