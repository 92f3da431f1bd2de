"""``llmsched simulate`` and ``plan`` run the config's ``policies.migration`` and ``policies.reroling`` (as the live
Controller and ``compare`` do; ``sim/policies.py``), ``--migration`` / ``--reroling`` override them, and a config
without them simulates bit for bit as before. Until the fortieth session both commands printed "not applied"."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import yaml

from scheduler.cli import main as cli_main
from scheduler.config.load import load_config
from scheduler.core.types import InstanceRole
from sim.metrics import sim_summary
from sim.planner import Candidate, make_config, write_plan
from sim.simulator import Simulator, Workload
from sim.traces import default_trace, load_trace

EXAMPLES = Path(__file__).resolve().parents[1] / "scheduler" / "config" / "examples"
# The migration study's bursty load (docs/migration.md: KV is what binds): gamma arrivals, CV 4.
BURSTY = ["--synthetic", "300", "--cv", "4", "--rate", "2"]
REROLING = {"name": "threshold", "params": {"interval_s": 1, "sustain_s": 2}}


def _config(tmp_path: Path, example: str, gpu: str | None = None, **policies: object) -> str:
    cfg = yaml.safe_load((EXAMPLES / f"{example}.yaml").read_text())
    if gpu is not None:
        for p in cfg["pools"]:
            p["gpu"] = gpu
    cfg.setdefault("policies", {}).update(policies)
    path = tmp_path / f"{example}-{'-'.join(policies) or 'plain'}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def _decode_heavy(tmp_path: Path) -> str:
    """400 requests of 300 prompt / 800 output tokens at 10 req/s: the 2 + 2 P/D cluster's decoders saturate while
    its prefill instances idle, so ``RerolePolicy`` moves a PREFILL instance to DECODE (after ~50 s)."""
    t0 = dt.datetime(2023, 11, 16, 18, 0, 0)
    rows = [f"{(t0 + dt.timedelta(seconds=i / 10)).strftime('%Y-%m-%d %H:%M:%S.%f')},300,800" for i in range(400)]
    path = tmp_path / "decode_heavy.csv"
    path.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n" + "\n".join(rows) + "\n")
    return str(path)


def cli_json(command: str, args: list[str], tmp_path: Path, capsys) -> tuple[int, dict, str]:
    """``llmsched <command> ARGS --json F``: exit status, F's object (``{}`` unless 0), what it printed."""
    out = tmp_path / f"{command}.json"
    out.unlink(missing_ok=True)
    rc = cli_main([command, *args, "--json", str(out)])
    cap = capsys.readouterr()
    return rc, (json.loads(out.read_text()) if rc == 0 else {}), cap.out + cap.err


def _simulate(args: list[str], tmp_path: Path, capsys) -> tuple[int, dict, str]:
    return cli_json("simulate", args, tmp_path, capsys)


def test_simulate_runs_the_configs_migration_policy(tmp_path: Path, capsys) -> None:
    cfg = _config(tmp_path, "default", gpu="l4", migration={"name": "llumnix"})
    rc, s, said = _simulate(["--config", cfg, *BURSTY], tmp_path, capsys)
    assert rc == 0 and "not applied" not in said
    assert s["migrations"] > 0 and s["migration"]["committed"] == s["migrations"]  # measured: 34
    assert s["migration_policy"] == {"name": "llumnix", "params": {}}
    assert f"migrations {s['migrations']}" in said  # the printed line says so
    rc, off, said = _simulate(["--config", cfg, *BURSTY, "--migration", "none"], tmp_path, capsys)
    assert rc == 0 and off["migrations"] == 0 and "migration" not in off and "migrations" not in said.split("wall")[-1]
    # The flag on a config without one runs it, with the flag's params.
    plain = _config(tmp_path, "default", gpu="l4")
    rc, flag, _ = _simulate(["--config", plain, *BURSTY, "--migration", "llumnix:max_per_s=1"], tmp_path, capsys)
    assert rc == 0 and 0 < flag["migrations"] and flag["migration_policy"]["params"] == {"max_per_s": 1}


def test_simulate_goodput_probes_each_get_a_fresh_migration_policy(tmp_path: Path, capsys, monkeypatch) -> None:
    import sim.policies

    made: list[object] = []
    real = sim.policies.migration_policy

    def counting(config):
        made.append(real(config))
        return made[-1]

    monkeypatch.setattr(sim.policies, "migration_policy", counting)
    cfg = _config(tmp_path, "default", gpu="l4", migration={"name": "llumnix"})
    rc, s, _ = _simulate(["--config", cfg, "--synthetic", "150", "--goodput", "--quiet"], tmp_path, capsys)
    assert rc == 0 and s["goodput_rps"] > 0
    # One to check it, one for the run, one per probe (at least the 4x bracket's three): never one object twice.
    assert len(made) >= 5 and len({id(p) for p in made}) == len(made)


def test_simulate_runs_the_configs_reroling_policy_on_a_pd_cluster(tmp_path: Path, capsys) -> None:
    cfg = _config(tmp_path, "llama2-7b-pd-a100", reroling=REROLING)
    trace = _decode_heavy(tmp_path)
    rc, s, said = _simulate(["--config", cfg, "--trace", trace], tmp_path, capsys)
    assert rc == 0 and "not applied" not in said
    r = s["reroling"]
    assert r["role_switches"] >= 1 and r["to_decode"] == r["role_switches"]  # measured: 1, at 50 s
    # As the live Controller switches: the drain only (no modelled restart), no hand-off of its own.
    assert r["switch_delay_s"] == 0.0 and r["decodes_handed_off"] == 0
    assert s["reroling_policy"] == REROLING and f"role switches {r['role_switches']}" in said
    rc, off, _ = _simulate(["--config", cfg, "--trace", trace, "--reroling", "none"], tmp_path, capsys)
    assert rc == 0 and "reroling" not in off
    # The policy's own params through the flag: a sustain longer than the run never switches.
    rc, slow, _ = _simulate(["--config", cfg, "--trace", trace, "--reroling", "threshold:sustain_s=1000"],
                            tmp_path, capsys)
    assert rc == 0 and slow["reroling"]["role_switches"] == 0


def test_reroling_with_scaling_is_refused_naming_both(tmp_path: Path, capsys) -> None:
    cfg = _config(tmp_path, "llama2-7b-pd-a100", reroling=REROLING)
    rc, _, said = _simulate(["--config", cfg, "--synthetic", "20", "--scaling", "threshold"], tmp_path, capsys)
    assert rc == 2 and "policies.reroling (threshold): not with --scaling threshold" in said
    assert "--reroling none" in said
    rc, _, _ = _simulate(["--config", cfg, "--synthetic", "20", "--scaling", "threshold", "--reroling", "none"],
                         tmp_path, capsys)
    assert rc == 0


def test_bad_policies_are_exit_2_naming_the_field(tmp_path: Path, capsys) -> None:
    pd = ["--config", "llama2-7b-pd-a100", "--synthetic", "20", "--quiet"]
    for args, named in ((["--synthetic", "20", "--migration", "llumnix:max_per_s=0"], "max_per_s"),
                        (["--synthetic", "20", "--migration", "llumnix:nope=1"], "nope"),
                        (["--synthetic", "20", "--migration", "bogus"], "bogus"),
                        ([*pd, "--reroling", "threshold:nope=1"], "nope"),
                        ([*pd, "--reroling", "threshold:interval_s=0"], "interval_s"),
                        (["--synthetic", "20", "--reroling", "threshold"], "needs a PREFILL and a DECODE pool")):
        rc, _, said = _simulate(args, tmp_path, capsys)
        # Set by the flag: named by it, not by the config key the user never wrote.
        field = "--reroling" if "--reroling" in args else "--migration"
        assert rc == 2 and field in said and named in said and "Traceback" not in said, args
        assert "policies." not in said, (args, said[-300:])
    # The same from the config file (it loads: names are checked at load, parameters where the policy is built).
    cfg = _config(tmp_path, "default", migration={"name": "llumnix", "params": {"nope": 1}})
    rc, _, said = _simulate(["--config", cfg, "--synthetic", "20"], tmp_path, capsys)
    assert rc == 2 and "policies.migration" in said and "nope" in said
    # Re-roling on a MIXED cluster: the flag's named as the flag (it named policies.reroling), the config's by key.
    rc, _, said = _simulate(["--synthetic", "20", "--reroling", "threshold"], tmp_path, capsys)
    assert rc == 2 and "error: --reroling: needs a PREFILL and a DECODE pool" in said, said[-300:]
    cfg = _config(tmp_path, "default", reroling=REROLING)
    rc, _, said = _simulate(["--config", cfg, "--synthetic", "20"], tmp_path, capsys)
    assert rc == 2 and "error: policies.reroling: needs a PREFILL and a DECODE pool" in said, said[-300:]


def test_non_numeric_policy_params_are_exit_2_naming_the_key(tmp_path: Path, capsys) -> None:
    # A flag's value that is not JSON reads as a string, and so does a YAML value in quotes: the policies took them
    # and the run died mid-way in a comparison (a bare TypeError traceback, not naming the key), or never used
    # them (a sustain clock compared only once a trigger held) and exited 0.
    pd = ["--config", "llama2-7b-pd-a100", "--synthetic", "20", "--quiet"]
    for args, named in ((["--synthetic", "20", "--migration", "llumnix:high_watermark=abc"], "high_watermark"),
                        (["--synthetic", "20", "--migration", "llumnix:cooldown_s=1s"], "cooldown_s"),
                        ([*pd, "--reroling", "threshold:sustain_s=abc"], "sustain_s"),
                        ([*pd, "--reroling", "threshold:min_per_role=one"], "min_per_role"),
                        ([*pd, "--reroling", "threshold:interval_s=abc"], "interval_s")):
        rc, _, said = _simulate(args, tmp_path, capsys)
        field = "--reroling" if "--reroling" in args else "--migration"
        assert rc == 2 and field in said and named in said and "Traceback" not in said, (args, said[-300:])
    cfg = _config(tmp_path, "default", migration={"name": "llumnix", "params": {"pressure": "0.7"}})
    rc, _, said = _simulate(["--config", cfg, "--synthetic", "20"], tmp_path, capsys)
    assert rc == 2 and "policies.migration" in said and "pressure" in said and "'0.7'" in said


def test_policy_flag_syntax_errors_name_the_flag(tmp_path: Path, capsys) -> None:
    # The flags share --routers' NAME:key=value reader: a repeated key was reported as a "router" error, and
    # ``none`` with parameters dropped them silently (no policy ran, nothing said).
    pd = ["--config", "llama2-7b-pd-a100", "--synthetic", "20", "--quiet"]
    for args, said_part in ((["--synthetic", "20", "--migration", "llumnix:max_plans=2:max_plans=3"],
                             "--migration 'llumnix:max_plans=2:max_plans=3': repeated parameter name"),
                            ([*pd, "--reroling", "threshold:=1"], "--reroling 'threshold:=1': empty parameter name"),
                            (["--synthetic", "20", "--migration", "none:high_watermark=0.3"],
                             "--migration none: takes no parameters, got high_watermark"),
                            ([*pd, "--reroling", "none:sustain_s=2"], "--reroling none: takes no parameters")):
        rc, _, said = _simulate(args, tmp_path, capsys)
        assert rc == 2 and said_part in said and "router" not in said, (args, said[-300:])


def test_without_the_policies_the_summary_is_the_plain_runs(tmp_path: Path, capsys) -> None:
    """``--migration none --reroling none`` (and a config without them) simulate exactly the plain ``Simulator``
    run: every summary value but the wall-clock ones equal."""
    wall = {"wall_seconds", "requests_per_wall_s", "events_per_wall_s", "trace_source"}
    trace = _decode_heavy(tmp_path)
    for config in ("default", "llama2-7b-pd-a100"):
        rc, s, _ = _simulate(["--config", config, "--trace", trace, "--quiet", "--migration", "none",
                              "--reroling", "none"], tmp_path, capsys)
        assert rc == 0
        cfg = load_config(config)
        w = Workload.from_trace(load_trace(trace))
        plain = json.loads(json.dumps(sim_summary(Simulator(cfg, router=cfg.policies.router.name).run(w))))
        assert {k: v for k, v in s.items() if k not in wall} == {k: v for k, v in plain.items() if k not in wall}


def test_plan_runs_the_configs_policies_in_each_candidates_simulations(tmp_path: Path, monkeypatch) -> None:
    import sim.planner

    seen: list[dict] = []

    class Recording(Simulator):
        def __init__(self, config, **kw):
            seen.append({"pools": {p.role for p in config.pools}, **kw})
            super().__init__(config, **kw)

    monkeypatch.setattr(sim.planner, "Simulator", Recording)
    base = load_config(_config(tmp_path, "default", migration={"name": "llumnix"}, reroling=REROLING))
    w = Workload.from_trace(load_trace(_decode_heavy(tmp_path)).head(60))
    mixed, pd = Candidate("a100", 1, "mixed", "least_outstanding"), Candidate("a100", 1, "pd:0.5", "least_outstanding")
    sim.planner._evaluate(base, mixed, (2,), w)
    sim.planner._evaluate(base, pd, (1, 2), w)
    assert [type(k.get("migration")).__name__ for k in seen] == ["LlumnixMigrationPolicy"] * 2
    assert "reroling" not in seen[0]  # a MIXED cluster has no roles to move
    assert type(seen[1]["reroling"]).__name__ == "RerolePolicy" and seen[1]["reroling_interval_s"] == 1.0
    # The written best-cluster.yaml of a MIXED answer leaves re-roling out (serve refuses it there), P/D keeps it.
    assert make_config(base, mixed, (2,)).policies.reroling is None
    assert make_config(base, pd, (1, 2)).policies.reroling == base.policies.reroling
    assert {InstanceRole.PREFILL, InstanceRole.DECODE} == seen[1]["pools"]


def test_plan_json_names_the_policies_it_ran(tmp_path: Path, capsys) -> None:
    cfg = _config(tmp_path, "default", migration={"name": "llumnix"}, reroling=REROLING)
    out = tmp_path / "plan"
    assert cli_main(["plan", "--config", cfg, "--limit", "200", "--gpus", "a100", "--tp", "1", "--layouts",
                     "mixed,pd:auto", "--workers", "1", "--max-instances", "8", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "not applied" not in err and "policies.reroling: applied to the P/D candidates only" in err
    d = json.loads((out / "plan.json").read_text())
    assert d["migration_policy"] == {"name": "llumnix", "params": {}} and d["reroling_policy"] == REROLING
    # A bad parameter fails before any simulation, naming it.
    bad = _config(tmp_path, "default", reroling={"name": "threshold", "params": {"nope": 1}})
    assert cli_main(["plan", "--config", bad, "--limit", "200", "--gpus", "a100", "--tp", "1", "--out",
                     str(out)]) == 2
    assert "policies.reroling.params" in capsys.readouterr().err


def test_plan_json_names_reroling_only_where_it_ran(tmp_path: Path) -> None:
    # Re-roling runs on the P/D candidates only: with MIXED layouts alone plan.json named the policy as if it ran.
    base = load_config(_config(tmp_path, "default", reroling=REROLING))
    for layouts, named in ((("mixed",), "not applied (no P/D candidate)"), (("mixed", "pd:auto"), REROLING),
                           (("pd:0.3",), REROLING)):
        out = tmp_path / "-".join(layouts)
        write_plan(out, base, default_trace().head(50), [], 0.9, layouts=layouts)
        assert json.loads((out / "plan.json").read_text())["reroling_policy"] == named, layouts
