"""bench/bench_sim.py: which Azure trace it times, and that the file it writes says so."""

from __future__ import annotations

import json

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
    monkeypatch.setattr(bench_sim, "MIGRATION_WORKLOADS", {"tiny": ["--synthetic", "60", "--cv", "4", "--rate", "2"]})
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
