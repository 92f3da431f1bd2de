"""bench/bench_routing.py: the goodput target's baseline is the docs' (docs/routing.md, "best of LO/P2/Llumnix")."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import bench_routing
from scheduler.policy.routers_lookahead import BatchModel, LookaheadRouter


def spy_routers(monkeypatch: pytest.MonkeyPatch, module: object) -> list[object]:
    """Every router ``module`` hands its simulator, in order."""
    seen: list[object] = []

    class Spy(module.Simulator):  # type: ignore[attr-defined, name-defined, misc]
        def __init__(self, config, router=None, **kw):  # type: ignore[no-untyped-def]
            seen.append(router)
            super().__init__(config, router=router, **kw)

    monkeypatch.setattr(module, "Simulator", Spy)
    return seen


def test_the_baseline_takes_llumnix_under_its_better_metric() -> None:
    """The shed studies divided by the better of least-outstanding and usage-ratio Llumnix only, while the docs'
    column takes power-of-two too and Llumnix under the better of its two metrics (Mooncake x16: freeness's 1.38
    req/s over usage ratio's 1.28, lookahead 1.85x -> 1.72x)."""
    rows = {"least_outstanding": {"goodput_rps": 1.18}, "power_of_two": {"goodput_rps": 0.5},
            "llumnix": {"goodput_rps": 1.28}, "llumnix:metric=remaining_steps": {"goodput_rps": 1.38},
            "lookahead": {"goodput_rps": 2.37}}
    assert bench_routing.best_dispatcher(rows) == ("llumnix:metric=remaining_steps", 1.38)
    rows["power_of_two"]["goodput_rps"] = 1.5
    assert bench_routing.best_dispatcher(rows) == ("power_of_two", 1.5)
    with pytest.raises(KeyError):  # a study that did not run a baseline router: said, not skipped
        bench_routing.best_dispatcher({"llumnix": {"goodput_rps": 1.0}})


def test_the_shed_study_runs_every_baseline_router_and_divides_by_the_best() -> None:
    """A small run (the trace's first 200 requests on 2 instances, what ``--head/--instances`` give)."""
    out = bench_routing.study_shed((), head=200, instances=2)
    r = out["routers"]
    assert out["requests"] == 200 and out["config"].endswith("x2")
    assert set(bench_routing.BASELINE_DISPATCHERS) | {"round_robin", "lookahead"} == set(r)
    best = max(bench_routing.BASELINE_DISPATCHERS, key=lambda n: r[n]["goodput_rps"])
    assert out["best_dispatcher"] == best
    ratios = out["goodput_over_best_dispatcher"]
    assert ratios[best] == 1.0 and all(ratios[n] <= 1.0 for n in bench_routing.BASELINE_DISPATCHERS)
    assert ratios["lookahead"] == r["lookahead"]["goodput_rps"] / r[best]["goodput_rps"]


def test_head_and_instances_are_for_the_shed_studies(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit, match="2"):
        bench_routing.main(["sweep", "--head", "10"])
    assert "--head/--instances: only with shed" in capsys.readouterr().err


@pytest.mark.parametrize(("flags", "model"), [([], BatchModel.DRAIN), (["--steady-batch"], BatchModel.STEADY),
                                              (["--batch-model", "refill"], BatchModel.REFILL)])
def test_ir_batch_model_flags_reach_every_lookahead_row(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                        flags: list[str], model: BatchModel) -> None:
    """``ir --steady-batch`` / ``--batch-model``: each of the study's six lookahead rows is built with that model
    (a 60-request IR mix), and the recorded command says how to get it again."""
    full = bench_routing.ir_workload
    monkeypatch.setattr(bench_routing, "ir_workload", lambda seed=0: full(60, seed=seed))
    seen = spy_routers(monkeypatch, bench_routing)
    out = tmp_path / "ir.json"
    bench_routing.main(["ir", *flags, "--json", str(out)])
    lookahead = [r for r in seen if isinstance(r, LookaheadRouter)]
    assert len(lookahead) == 6 and {r.batch_model for r in lookahead} == {model}
    assert json.loads(out.read_text())["ir"]["command"] == " ".join(["python bench/bench_routing.py ir", *flags])


def test_batch_model_flags_are_for_ir_and_agree(capsys: pytest.CaptureFixture[str]) -> None:
    for argv, msg in ((["predictor", "--steady-batch"], "only with ir"),
                      (["ir", "--steady-batch", "--batch-model", "refill"], "contradicts --batch-model refill")):
        with pytest.raises(SystemExit, match="2"):
            bench_routing.main(argv)
        assert msg in capsys.readouterr().err
