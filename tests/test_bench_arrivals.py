"""``llmsched bench arrivals``: the schedule both sides share, the simulator's side, the paired ratios."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from bench.bench_arrivals import SCENARIOS, Scenario, fitted_profile, paired, schedule, simulated_tpot

REPO = Path(__file__).resolve().parents[1]
KW = {"long": 200, "arrivals": 6, "gap_s": 0.15, "start_s": 0.1}


def test_schedule_puts_the_arrivals_inside_the_long_streams():
    arr, prompt, out = schedule(Scenario(900, 2), **KW)
    assert list(prompt[:2]) == [64, 64] and list(out[:2]) == [200, 200]
    assert list(prompt[2:]) == [900] * 6 and list(out[2:]) == [2] * 6
    np.testing.assert_allclose(arr[2:], 0.1 + 0.15 * np.arange(6))
    assert len(schedule(Scenario(0, 0), **KW)[0]) == 2  # the baseline: the two streams alone


def test_simulated_large_arrivals_slow_the_streams_by_their_prefill_steps(tmp_path):
    """On a committed run's profile: every arrival slows the two streams, large prompts (the prefill engine busy
    at the three-busy factor for tens of ms each) more than small ones."""
    prof = fitted_profile(REPO / "docs/results/live_vs_sim_s15b/pd-120-1/report.json", tmp_path)
    tpot = {sc.name: simulated_tpot(prof, sc, **KW) for sc in SCENARIOS}
    assert all(v > tpot["baseline"] for k, v in tpot.items() if k != "baseline")
    assert tpot["900x2"] / tpot["baseline"] > 1.15  # ~6 x 70 ms of a 0.7 s stream at 3-busy instead of 2-busy
    assert tpot["900x2"] > tpot["32x2"] * 1.08


def test_paired_ratios_are_per_round():
    rounds = {"baseline": [4.0, 8.0, 5.0], "900x2": [5.0, 10.0, 5.0]}
    assert paired(rounds) == pytest.approx({"baseline": 1.0, "900x2": 1.25})


def test_a_fitted_profile_is_used_as_given(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"overhead_s": 0.002}))
    assert fitted_profile(path, tmp_path) == path


def test_a_missing_or_broken_profile_is_a_clear_error(tmp_path, capsys):
    from bench.bench_arrivals import main

    for path in (tmp_path / "none.json", tmp_path / "bad.json"):
        if path.name == "bad.json":
            path.write_text("{not json")
        with pytest.raises(SystemExit) as e:
            main(["--profile", str(path)])
        assert e.value.code == 2 and "--profile" in capsys.readouterr().err
