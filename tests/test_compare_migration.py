"""``llmsched compare`` runs the config's ``policies.migration`` beside every router (docs/routing.md, "Live
migration beside the routers")."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from scheduler.cli import main as cli_main
from scheduler.config.load import load_config
from scheduler.config.models import PolicySpec
from scheduler.policy.migration import make_migration_policy
from sim.compare import at_goodput, compare
from sim.goodput import goodput, scale_rate
from sim.policies import migration_factory
from sim.simulator import Workload
from sim.traces import LogNormal, synthetic


def _kv_tight(migration: PolicySpec | None):
    """The migration study's cluster (docs/migration.md): Llama-2-7B on 24 GB L4s, where KV is the bottleneck."""
    base = load_config("default")
    pools = [p.model_copy(update={"gpu": "l4"}) for p in base.pools]
    return base.model_copy(update={"pools": pools, "policies": base.policies.model_copy(update={"migration": migration})})


def _bursty(n: int, seed: int = 3) -> Workload:
    return Workload.from_trace(synthetic(n, 0.3, arrival="gamma", cv=4.0, seed=seed,
                                         prompt=LogNormal.from_p50_p90(1000, 3000, max=3500),
                                         output=LogNormal.from_p50_p90(300, 900, max=1500)))


def test_compare_runs_the_configs_migration_policy_and_reports_its_moves() -> None:
    w = _bursty(600)
    on, _, sat_on = compare(_kv_tight(PolicySpec(name="llumnix")), w, ["least_outstanding"], load=0.9,
                            with_goodput=False)
    off, _, sat_off = compare(_kv_tight(None), w, ["least_outstanding"], load=0.9, with_goodput=False)
    assert sat_on == sat_off  # measured without migration: the same offered rate on and off
    s = on["least_outstanding"]
    assert s["migrations"] > 10 and s["migration"]["committed"] == s["migrations"]
    assert sum(s["migration"]["started"].values()) >= s["migrations"]
    assert set(s["migration"]["started"]) <= {"load_balance", "defrag"}
    # Staged copies: a move's whole copy dwarfs its stop-and-copy; every context crossed at least once.
    assert s["migration"]["total_p50_s"] > 10 * s["migration"]["downtime_p50_s"] > 0
    assert s["migration"]["copied_tokens"] > s["migrations"] * 100
    assert off["least_outstanding"]["migrations"] == 0 and "migration" not in off["least_outstanding"]


def test_goodput_probes_each_get_a_fresh_migration_policy() -> None:
    made = []

    def factory():
        made.append(make_migration_policy("llumnix"))
        return made[-1]

    cfg = _kv_tight(None)
    g = goodput(cfg, _bursty(150), lambda: "least_outstanding", lo=0.5, hi=8.0, iters=2,
                policies=lambda: {"migration": factory()})
    assert len(made) == g.probes >= 3 and len({id(p) for p in made}) == g.probes
    # ``at_goodput`` re-runs the passing probe: the same attainment, and it says what the misses missed.
    a = at_goodput(cfg, scale_rate(_bursty(150), g.scale), "least_outstanding", {"migration": factory()})
    assert a["slo_attainment"] == g.attainment >= 0.9
    assert a["migrations"] == a["migration"]["committed"]
    assert max(a["ttft_miss"], a["tpot_miss"]) <= 1 - a["slo_attainment"] + 1e-9  # a miss misses one of them
    assert migration_factory(cfg) is None
    assert migration_factory(_kv_tight(PolicySpec(name="none"))) is None


def test_compare_cli_applies_policies_migration_without_the_not_applied_note(tmp_path: Path, capsys) -> None:
    cfg = yaml.safe_load(Path("scheduler/config/examples/default.yaml").read_text())
    cfg["policies"]["migration"] = {"name": "llumnix", "params": {"max_per_s": 4.0}}
    path = tmp_path / "mig.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "c.json"
    assert cli_main(["compare", "--synthetic", "60", "--config", str(path), "--no-goodput",
                     "--routers", "least_outstanding", "--json", str(out)]) == 0
    assert "not applied" not in capsys.readouterr().err
    d = json.loads(out.read_text())
    assert d["migration_policy"] == {"name": "llumnix", "params": {"max_per_s": 4.0}}
    assert "migration" in d["routers"]["least_outstanding"]
    # --migration overrides the config's: none runs without; a policy on a config that has none runs it.
    assert cli_main(["compare", "--synthetic", "60", "--config", str(path), "--no-goodput", "--migration", "none",
                     "--routers", "least_outstanding", "--json", str(out)]) == 0
    d = json.loads(out.read_text())
    assert "migration_policy" not in d and "migration" not in d["routers"]["least_outstanding"]
    assert cli_main(["compare", "--synthetic", "60", "--no-goodput", "--migration", "llumnix:balance_gap=0.1",
                     "--routers", "least_outstanding", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["migration_policy"] == {"name": "llumnix", "params": {"balance_gap": 0.1}}
    # A bad policy or parameter fails before any simulation, naming it.
    capsys.readouterr()
    for bad, named in (("llumnix:max_per_s=0", "max_per_s"), ("llumnix:nope=1", "nope"), ("bogus", "bogus")):
        assert cli_main(["compare", "--synthetic", "60", "--no-goodput", "--migration", bad]) == 2
        assert named in capsys.readouterr().err


def test_compare_reports_at_goodput_from_the_bisections_probe_not_a_rerun(monkeypatch) -> None:
    """``at_goodput`` is the bisection's passing probe at the goodput's rate: kept, not simulated again (one run
    fewer per router than the code before, which re-ran it), and equal to that re-run, migration stats included."""
    import sim.compare as C
    import sim.goodput as gp

    runs = {"compare": 0, "goodput": 0}

    def spy(module, key):
        real = module.Simulator

        class Spy(real):  # type: ignore[misc, valid-type]
            def run(self, w):  # type: ignore[no-untyped-def]
                runs[key] += 1
                return super().run(w)

        monkeypatch.setattr(module, "Simulator", Spy)

    spy(C, "compare")
    spy(gp, "goodput")
    found: dict[str, object] = {}
    real_goodput = C.goodput

    def goodput_spy(config, w, make, **kw):  # type: ignore[no-untyped-def]
        g = real_goodput(config, w, make, **kw)
        found[len(found)] = g
        return g

    monkeypatch.setattr(C, "goodput", goodput_spy)
    cfg = _kv_tight(PolicySpec(name="llumnix", params={"high_watermark": 0.5, "balance_gap": 0.1}))
    w, routers = _bursty(200), ["least_outstanding", "llumnix"]
    plain, _, _ = compare(cfg, w, routers, load=0.9, with_goodput=False)
    without = runs["compare"]  # the saturation's runs and one per router
    runs.update(compare=0, goodput=0)
    s, _, sat = compare(cfg, w, routers, load=0.9)
    assert runs["compare"] == without  # no run at the goodput rate
    assert runs["goodput"] == sum(g.probes for g in found.values())  # type: ignore[attr-defined]
    wl = C.at_load(w, 0.9, sat)
    for i, name in enumerate(routers):
        g = found[i]
        assert g.goodput_rps > 0 and not g.capped  # type: ignore[attr-defined]
        again = at_goodput(cfg, scale_rate(wl, g.scale), C.router_factory(name, cfg)(),  # type: ignore[attr-defined]
                           C.sim_policies(cfg)())  # type: ignore[misc]
        assert s[name]["at_goodput"] == again  # the re-run's stats, exactly
        assert again["slo_attainment"] == g.attainment  # type: ignore[attr-defined]
        assert s[name]["at_goodput"]["migration"]["committed"] == again["migrations"]
    assert sum(s[n]["at_goodput"]["migrations"] for n in routers) > 0  # the migration stats were compared too
    assert {n: s[n]["slo_attainment"] for n in routers} == {n: plain[n]["slo_attainment"] for n in routers}


def test_goodput_report_is_the_reported_probes_at_the_ceiling_and_when_none_passes() -> None:
    """``goodput(report=...)`` keeps the report of the probe at the reported scale in every way the search ends: a
    capped search (the ceiling ``hi`` itself was probed) and a bisected one equal a re-run at ``scale``; a search
    where even ``lo`` fails has none."""
    from sim.compare import goodput_stats

    cfg = _kv_tight(None)
    w = _bursty(150)

    def policies():
        return {"migration": make_migration_policy("llumnix", high_watermark=0.5, balance_gap=0.1)}

    capped = goodput(cfg, w, lambda: "least_outstanding", lo=0.05, hi=0.3, iters=2, policies=policies,
                     report=goodput_stats)
    bisected = goodput(cfg, w, lambda: "least_outstanding", lo=0.5, hi=8.0, iters=3, policies=policies,
                       report=goodput_stats)
    assert capped.capped and capped.scale == 0.3 and not bisected.capped
    for g in (capped, bisected):
        again = at_goodput(cfg, scale_rate(w, g.scale), "least_outstanding", policies())
        assert g.report == again and again["slo_attainment"] == g.attainment >= 0.9
    assert bisected.report["migrations"] > 0  # type: ignore[index]
    none = goodput(cfg, w, lambda: "least_outstanding", target=1.01, lo=0.5, hi=8.0, iters=1, report=goodput_stats)
    assert none.goodput_rps == 0 and none.report is None
