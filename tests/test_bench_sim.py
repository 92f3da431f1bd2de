"""bench/bench_sim.py: which Azure trace it times, and that the file it writes says so."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import bench_sim
from sim.traces import bundled_traces


def test_a_checkout_not_beside_shared_says_it_times_the_slice(monkeypatch, tmp_path, capsys):
    """From a worktree outside the repository's parent the bench silently timed the 2,867-request slice."""
    monkeypatch.setattr(bench_sim, "SHARED_AZURE", tmp_path / "shared/data/azure_llm_2023_conv.csv.gz")
    path = bench_sim.azure_trace_path(None)
    assert path == bundled_traces()["azure_llm_2023_conv"]
    err = capsys.readouterr().err
    assert "not found" in err and "--trace" in err


def test_trace_flag_wins_and_a_missing_one_names_the_flag(tmp_path):
    given = bundled_traces()["azure_llm_2023_conv"]
    assert bench_sim.azure_trace_path(str(given)) == given
    with pytest.raises(SystemExit, match="--trace .*no such file"):
        bench_sim.azure_trace_path(str(tmp_path / "nope.csv.gz"))


def test_the_json_names_the_trace_it_timed(monkeypatch, tmp_path):
    monkeypatch.setattr(
        bench_sim, "run", lambda cfg, w, router, closed_form=True: {"requests": len(w), "wall_s": 1.0, "events": 1}
    )
    monkeypatch.setattr(bench_sim, "synthetic", lambda n, rate, seed: bench_sim.load_trace(given).head(10))
    given = bundled_traces()["azure_llm_2023_conv"]
    out = tmp_path / "b.json"
    assert bench_sim.main(["--trace", str(given), "--json", str(out)]) == 0
    row = json.loads(out.read_text())["azure_16"]
    assert row["trace"] == given.name and row["requests"] == len(bench_sim.load_trace(given))


def test_migration_case_times_both_trees_and_compares_their_summaries(monkeypatch, tmp_path):
    # ``--case migration --baseline TREE``: with/without migration in this tree and the baseline's, in fresh
    # processes; a tree against itself gives the same summaries (wall clock aside) and the same moves.
    monkeypatch.setattr(bench_sim, "MIGRATION_WORKLOADS",
                        {"tiny": bench_sim.MigrationRun(["--synthetic", "60", "--cv", "4", "--rate", "2"])})
    out = tmp_path / "m.json"
    assert bench_sim.main(["--case", "migration", "--baseline", str(bench_sim.ROOT), "--repeats", "1",
                           "--json", str(out)]) == 0
    row = json.loads(out.read_text())["migration_tiny"]
    assert row["identical"] is True
    for tree in ("current", "baseline"):
        assert row[tree]["llumnix_wall_s"] > 0 and row[tree]["ratio"] > 0
    assert row["current"]["migrations"] == row["baseline"]["migrations"]
    with pytest.raises(SystemExit, match="--baseline .*not a checkout"):
        bench_sim.main(["--case", "migration", "--baseline", str(tmp_path)])


def test_migration_case_times_the_tuned_policy_on_the_mooncake_slice(monkeypatch, tmp_path):
    """The Mooncake row: the bundled conversation slice on the 16 long-context A100s, the tuned policy of
    docs/routing.md against none (the L4 rows keep ``llumnix`` on the L4 config), its ratio from the best runs."""
    calls = []

    def fake(tree, config, migration, workload):  # type: ignore[no-untyped-def]
        calls.append((str(config), migration, tuple(workload)))
        wall = 0.5 if migration == "none" else 2.0 + len(calls)  # the best (first) with-migration run counts
        return {"requests": 1000, "wall_seconds": wall, "migrations": 7 if migration != "none" else 0}

    monkeypatch.setattr(bench_sim, "simulate_summary", fake)
    out = tmp_path / "m.json"
    assert bench_sim.main(["--case", "migration", "--repeats", "2", "--json", str(out)]) == 0
    row = json.loads(out.read_text())["migration_mooncake_slice_16_tuned"]
    mooncake = [c for c in calls if "--trace" in c[2]]
    assert len(mooncake) == 4 and {c[0] for c in mooncake} == {"llama3-8b-a100-16-longctx"}
    assert {c[1] for c in mooncake} == {"none", bench_sim.TUNED_MIGRATION}
    trace = Path(mooncake[0][2][mooncake[0][2].index("--trace") + 1])
    assert trace == bundled_traces()["mooncake_conversation"] and trace.is_file()
    assert row["migration"] == bench_sim.TUNED_MIGRATION and row["requests"] == 1000
    best = min(2.0 + i + 1 for i, c in enumerate(calls) if c in mooncake and c[1] != "none")
    assert row["current"] == {"none_wall_s": 0.5, "llumnix_wall_s": best, "ratio": round(best / 0.5, 2),
                              "migrations": 7}
    assert {c[1] for c in calls if "--trace" not in c[2]} == {"none", "llumnix"}  # the L4 rows as they were
    assert all(c[0].endswith("l4.yaml") for c in calls if "--trace" not in c[2])
