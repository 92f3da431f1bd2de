"""Every simulating command runs the config's ``policies.migration`` / ``policies.reroling`` the same way
(``sim/policies.py``): ``compare`` runs re-roling beside every router (``--reroling``), ``plan`` takes
``--migration`` / ``--reroling``, ``llmsched run``'s simulation and ``--resimulate`` run what the live Controller ran,
and re-roling beside ``policies.scaling`` is refused saying what to do. Until the fortieth session ``compare`` noted
re-roling "not applied", ``plan`` had no flags, and the live-vs-sim simulation ran without either policy."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

import sim.simulator
from scheduler.cli import main as cli_main
from scheduler.config.load import load_config
from sim.live_vs_sim import live_policies, resimulate
from tests.test_sim_cli_policies import REROLING, _config, _decode_heavy, cli_json

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results"
# Fast switches: the decode-heavy trace saturates the 2 + 2 P/D cluster's decoders within seconds at load 2.
FAST = "threshold:interval_s=1:sustain_s=2"


def _compare(args: list[str], tmp_path: Path, capsys) -> tuple[int, dict, str]:
    return cli_json("compare", args, tmp_path, capsys)


def test_compare_runs_the_configs_reroling_beside_every_router(tmp_path: Path, capsys, monkeypatch) -> None:
    import sim.policies

    made: list[object] = []
    real = sim.policies.reroling_policy

    def counting(config, **kwargs):
        built = real(config, **kwargs)
        made.append(built[0] if built else None)
        return built

    monkeypatch.setattr(sim.policies, "reroling_policy", counting)
    cfg = _config(tmp_path, "llama2-7b-pd-a100", reroling=REROLING)
    trace = ["--trace", _decode_heavy(tmp_path), "--load", "2"]
    rc, d, said = _compare(["--config", cfg, *trace, "--routers", "least_outstanding"], tmp_path, capsys)
    assert rc == 0 and "not applied" not in said
    assert d["reroling_policy"] == REROLING
    s = d["routers"]["least_outstanding"]
    r = s["reroling"]
    assert r["role_switches"] >= 1 and r["to_decode"] == r["role_switches"]  # measured: 1 P->D
    assert r["switch_delay_s"] == 0.0 and r["decodes_handed_off"] == 0  # as live (AS_LIVE_REROLING)
    assert f"role switches {r['role_switches']}" in said
    # The run at the goodput rate re-rolls too, and every run and probe had its own policy object.
    assert "role_switches" in s["at_goodput"]["reroling"]
    policies = [p for p in made if p is not None]
    assert len(policies) >= 5 and len({id(p) for p in policies}) == len(policies)

    # --reroling none: without, the same saturation (measured without re-roling either way).
    rc, off, said = _compare(["--config", cfg, *trace, "--routers", "least_outstanding,round_robin", "--no-goodput",
                              "--reroling", "none"], tmp_path, capsys)
    assert rc == 0 and "reroling_policy" not in off and "role switches" not in said
    assert all("reroling" not in row for row in off["routers"].values())
    assert off["saturation_rps"] == d["saturation_rps"]
    # The flag on a config without re-roling runs it beside every router, with the flag's params.
    rc, flag, _ = _compare(["--config", "llama2-7b-pd-a100", *trace, "--routers", "least_outstanding,round_robin",
                            "--no-goodput", "--reroling", FAST], tmp_path, capsys)
    assert rc == 0 and flag["reroling_policy"] == {"name": "threshold", "params": {"interval_s": 1, "sustain_s": 2}}
    assert all(row["reroling"]["role_switches"] >= 1 for row in flag["routers"].values())


def test_compare_refuses_reroling_on_a_mixed_cluster_as_live(tmp_path: Path, capsys) -> None:
    """The live Controller refuses re-roling without PREFILL and DECODE pools; so does compare, before simulating."""
    rc, _, said = _compare(["--synthetic", "60", "--reroling", "threshold"], tmp_path, capsys)
    assert rc == 2 and "--reroling: needs a PREFILL and a DECODE pool" in said  # the flag set it: named so
    rc, _, said = _compare(["--config", "llama2-7b-pd-a100", "--synthetic", "60", "--reroling", "threshold:nope=1"],
                           tmp_path, capsys)
    assert rc == 2 and "--reroling: " in said and "nope" in said and "policies." not in said


def _plan(args: list[str], tmp_path: Path, capsys) -> tuple[int, dict, str]:
    out = tmp_path / "plan"
    shutil.rmtree(out, ignore_errors=True)
    rc = cli_main(["plan", *args, "--limit", "100", "--gpus", "a100", "--tp", "1", "--workers", "1",
                   "--max-instances", "4", "--out", str(out)])
    cap = capsys.readouterr()
    return rc, (json.loads((out / "plan.json").read_text()) if rc in (0, 1) else {}), cap.out + cap.err


def test_plan_flags_override_the_configs_policies(tmp_path: Path, capsys) -> None:
    cfg = _config(tmp_path, "default", migration={"name": "llumnix"}, reroling=REROLING)
    rc, d, said = _plan(["--config", cfg, "--layouts", "mixed,pd:0.5", "--migration", "none", "--reroling", "none"],
                        tmp_path, capsys)
    assert rc == 0 and "migration_policy" not in d and "reroling_policy" not in d
    assert "applied to the P/D candidates only" not in said
    rc, d, said = _plan(["--layouts", "mixed,pd:0.5", "--migration", "llumnix:max_per_s=2", "--reroling", FAST],
                        tmp_path, capsys)
    assert rc == 0 and d["migration_policy"] == {"name": "llumnix", "params": {"max_per_s": 2}}
    assert d["reroling_policy"]["params"] == {"interval_s": 1, "sustain_s": 2}
    assert "--reroling: applied to the P/D candidates only" in said  # named as given (the flag)
    rc, _, said = _plan(["--layouts", "pd:0.5", "--migration", "llumnix:nope=1"], tmp_path, capsys)
    assert rc == 2 and "--migration: " in said and "nope" in said and "policies." not in said  # named as given


def test_reroling_beside_policies_scaling_says_what_to_do(tmp_path: Path, capsys) -> None:
    both = _config(tmp_path, "llama2-7b-pd-a100", reroling=REROLING, scaling={"name": "threshold"})
    for cmd in (["simulate", "--synthetic", "20", "--quiet"], ["plan", "--limit", "100", "--layouts", "pd:0.5",
                                                                 "--gpus", "a100", "--tp", "1", "--workers", "1",
                                                                 "--out", str(tmp_path / "p")]):
        assert cli_main([*cmd, "--config", both]) == 2
        err = capsys.readouterr().err
        assert "policies.reroling (threshold): not with policies.scaling (threshold)" in err, cmd
        assert "pass --reroling none" in err and "drop one of the two" in err
        assert cli_main([*cmd, "--config", both, "--reroling", "none"]) == 0, cmd
        capsys.readouterr()


@pytest.fixture
def recorded_simulators(monkeypatch) -> list[dict]:
    """The keywords of every ``Simulator`` built (the live-vs-sim slice builds them inside its function)."""
    seen: list[dict] = []

    class Recording(sim.simulator.Simulator):
        def __init__(self, config, **kw):
            seen.append(kw)
            super().__init__(config, **kw)

    monkeypatch.setattr(sim.simulator, "Simulator", Recording)
    return seen


def _report(tmp_path: Path, name: str, **extra: object) -> str:
    d = tmp_path / name
    d.mkdir()
    report = json.loads((RESULTS / "live_vs_sim_s15" / "pd-40-1" / "report.json").read_text())
    (d / "report.json").write_text(json.dumps({**report, **extra}))
    return str(d)


def test_resimulate_runs_the_policies_the_live_run_ran(tmp_path: Path, recorded_simulators: list[dict]) -> None:
    cpu_pd = load_config(str(Path(__file__).resolve().parents[1] / "deploy" / "examples" / "cpu-pd.yaml"))
    # A committed report (no live_policies: cpu-pd ran neither) re-simulates as before: plain runs.
    resimulate(cpu_pd, [_report(tmp_path, "old")])
    assert recorded_simulators and all("migration" not in k and "reroling" not in k for k in recorded_simulators)
    # A run whose Controller ran migration and re-roling: every draw (and the paced re-run) runs both, fresh.
    recorded_simulators.clear()
    ran = {"migration": {"name": "llumnix", "params": {}}, "reroling": REROLING}
    resimulate(cpu_pd, [_report(tmp_path, "new", live_policies=ran)])
    migs = [k["migration"] for k in recorded_simulators]
    assert len(migs) >= 8 and all(type(m).__name__ == "LlumnixMigrationPolicy" for m in migs)
    assert len({id(m) for m in migs}) == len(migs)
    assert all(type(k["reroling"]).__name__ == "RerolePolicy" and k["reroling_interval_s"] == 1.0
               for k in recorded_simulators)
    # What the main job writes for --resimulate: the config's, None for a policy it has not.
    with_mig = cpu_pd.model_copy(update={"policies": cpu_pd.policies.model_copy(
        update={"migration": load_config(_config(tmp_path, "default", migration={"name": "llumnix"}))
                .policies.migration})})
    assert live_policies(cpu_pd) == {"migration": None, "reroling": None}
    assert live_policies(with_mig)["migration"] == {"name": "llumnix", "params": {}}
    # A live run without them, re-simulated with a --config that has them: the live run's (none) win.
    recorded_simulators.clear()
    resimulate(with_mig, [_report(tmp_path, "none", live_policies=live_policies(cpu_pd))])
    assert all("migration" not in k for k in recorded_simulators)


def test_resimulate_with_a_scaling_config_runs_the_live_runs_reroling(tmp_path: Path,
                                                                      recorded_simulators: list[dict]) -> None:
    """The slice simulates no scaling, so a ``--config`` with ``policies.scaling`` does not refuse the re-roling a
    live run ran (it did, telling the user to pass ``--reroling``, a flag ``--resimulate`` lacks)."""
    cpu_pd = load_config(str(Path(__file__).resolve().parents[1] / "deploy" / "examples" / "cpu-pd.yaml"))
    scaled = cpu_pd.model_copy(update={"policies": cpu_pd.policies.model_copy(
        update={"scaling": load_config(_config(tmp_path, "default", scaling={"name": "threshold"})).policies.scaling})})
    resimulate(scaled, [_report(tmp_path, "rr", live_policies={"migration": None, "reroling": REROLING})])
    assert recorded_simulators and all(type(k["reroling"]).__name__ == "RerolePolicy" for k in recorded_simulators)


def test_the_main_jobs_simulation_runs_the_configs_policies(tmp_path: Path, recorded_simulators: list[dict],
                                                           monkeypatch) -> None:
    """``llmsched run`` with its live part replayed from a committed report (the cluster faked): the slice's
    simulation runs the config's migration, as the live Controller ran it, and report.json records it."""
    from scheduler import demo
    from scheduler.profile import fit
    from sim.replay import LiveResult

    rep = json.loads((RESULTS / "live_vs_sim_s19d" / "pd-40-1" / "report.json").read_text())
    pr = rep["per_request"]
    res = {"profile": fit(rep["profile_samples"]), "live": LiveResult.from_columns(pr, name=rep["trace"]),
           "migration": None, "role_switch": rep["role_switch"], "engine_pace": rep["engine_pace"],
           "server": {k: v for k, v in pr.items() if k.startswith(("server_", "engine_", "decode_"))},
           "lengths": tuple(np.asarray(pr[k]) for k in ("arrival_s", "prompt_tokens", "output_tokens")),
           "replay_engines": rep["replay_engines"], "instances": [tuple(i) for i in rep["instances"]]}
    monkeypatch.setattr(demo, "_run_cluster", lambda cfg, args, t0: (res, rep["host_probe"]))
    cpu_pd = Path(__file__).resolve().parents[1] / "deploy" / "examples" / "cpu-pd.yaml"
    for name, policies in (("plain", {}), ("mig", {"migration": {"name": "llumnix"}})):
        recorded_simulators.clear()
        cfg = yaml.safe_load(cpu_pd.read_text())
        cfg["policies"].update(policies)
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        demo.main(["--config", str(path), "--out", str(tmp_path / name)])
        written = json.loads((tmp_path / name / "report.json").read_text())
        assert written["live_policies"] == {"migration": policies.get("migration") and
                                            {**policies["migration"], "params": {}}, "reroling": None}
        migs = [k.get("migration") for k in recorded_simulators]
        assert len(migs) >= 8  # every noise draw (and the paced re-run)
        if policies:
            assert all(type(m).__name__ == "LlumnixMigrationPolicy" for m in migs)
        else:
            assert migs == [None] * len(migs)
