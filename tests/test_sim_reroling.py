"""Re-roling in the simulator (sim/reroling.py): RerolePolicy applied to a P/D cluster whose mix shifts halfway.

Workload: the vendored Azure conv slice with its own (prompt, output) pairs reordered so the first half of the
arrivals is prefill-heavy and the second decode-heavy (or the reverse), at 1.5x its rate, on 2 PREFILL + 2
DECODE Llama-2-7B A100s (the numbers behind docs/routing.md's re-roling section, about 2 s in all).
"""

from __future__ import annotations

import sys
from functools import cache
from pathlib import Path

import numpy as np
import pytest

from scheduler.config.load import load_config
from scheduler.core.types import InstanceRole
from scheduler.policy.scaling import RerolePolicy, ThresholdScaler
from sim.compare import router_factory
from sim.metrics import request_metrics
from sim.simulator import Simulator, Workload

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

P, D = InstanceRole.PREFILL, InstanceRole.DECODE
CFG = load_config("llama2-7b-pd-a100")


@cache
def workload(decode_first: bool) -> Workload:
    from bench_routing import shifting_workload

    return shifting_workload(decode_first=decode_first)


@cache
def run(decode_first: bool, reroling: bool, **opts):
    w = workload(decode_first)
    sim = Simulator(CFG, router=router_factory("least_outstanding", CFG)(),
                    reroling=RerolePolicy() if reroling else None, reroling_options=opts)
    res = sim.run(w)
    return sim, res, request_metrics(res)


def shift_time(decode_first: bool) -> float:
    w = workload(decode_first)
    return float(w.arrival_s[len(w) // 2])


def test_reroling_follows_a_shift_to_decode_heavy_and_beats_static_roles() -> None:
    _, static, ms = run(False, False)
    sim, res, mr = run(False, True)
    switches = sim.reroler.events
    assert switches, "the decode pool saturated after the shift but no instance changed role"
    assert all(s.old_role is P and s.new_role is D for s in switches)  # the right direction only
    assert min(s.asked_s for s in switches) > shift_time(False)  # and only once the mix has shifted
    assert np.isfinite(res.finish_s).all() and np.isfinite(static.finish_s).all()
    assert mr.slo_met.mean() > ms.slo_met.mean() + 0.05  # measured: 1.000 vs 0.896
    assert np.nanmean(mr.e2e_s) < 0.85 * np.nanmean(ms.e2e_s)  # measured: 9.9 s vs 13.8 s
    assert res.role_switches == len(switches)


def test_reroling_follows_a_shift_to_prefill_heavy() -> None:
    _, _, ms = run(True, False)
    sim, res, mr = run(True, True)
    t = shift_time(True)
    switches = sim.reroler.events
    before = [s for s in switches if s.asked_s < t]
    after = [s for s in switches if s.asked_s >= t]
    assert before and all(s.new_role is D for s in before)  # decode-heavy half: the prefill pool lends
    assert after and all(s.new_role is P for s in after)  # prefill-heavy half: it gets the instance back
    assert np.isfinite(res.finish_s).all()
    assert mr.slo_met.mean() > ms.slo_met.mean() + 0.05  # measured: 0.997 vs 0.472


@pytest.mark.parametrize("decode_first", [False, True])
def test_switching_instance_takes_no_new_work_and_pays_the_switch_delay(decode_first: bool) -> None:
    sim, res, _ = run(decode_first, True)
    w = res.workload
    delay = sim.reroler.switch_delay_s
    for s in sim.reroler.events:
        idx = sim._index[s.instance_id].index
        assert s.idle_s is not None and s.done_s == pytest.approx(s.idle_s + delay)
        during = (w.arrival_s >= s.asked_s) & (w.arrival_s < s.done_s)
        assert during.any()
        # Neither role: no prompt sent to it, no decode paired with it, while it switches.
        assert not (res.instance[during] == idx).any()
        assert not (res.decode_instance[during] == idx).any()
        # Afterwards it serves in its new role.
        later = w.arrival_s >= s.done_s
        served = res.decode_instance[later] if s.new_role is D else res.instance[later]
        assert (served == idx).any()


def test_pools_never_drop_below_min_per_role() -> None:
    for decode_first in (False, True):
        sim, _, _ = run(decode_first, True)
        assert sim.reroler.history
        assert all(p >= 1 and d >= 1 for _, p, d, _ in sim.reroler.history)
    # With min_per_role 2 a 2 + 2 cluster has nothing to lend: the run is the static one.
    _, static, _ = run(False, False)
    sim = Simulator(CFG, router=router_factory("least_outstanding", CFG)(), reroling=RerolePolicy(min_per_role=2))
    res = sim.run(workload(False))
    assert sim.reroler.events == []
    np.testing.assert_array_equal(res.finish_s, static.finish_s)


def test_decode_handoff_by_migration_shortens_the_switch_and_loses_nothing() -> None:
    sim_h, res_h, _ = run(True, True)
    sim_n, res_n, _ = run(True, True, handoff=False)
    to_p_h = [s for s in sim_h.reroler.events if s.new_role is P]
    to_p_n = [s for s in sim_n.reroler.events if s.new_role is P]
    assert to_p_h and to_p_n and res_n.migrations == 0
    assert sum(s.handed_off for s in to_p_h) > 0 and res_h.migrations > 0
    assert to_p_h[0].idle_s - to_p_h[0].asked_s < to_p_n[0].idle_s - to_p_n[0].asked_s  # no wait for decodes
    assert np.isfinite(res_h.finish_s).all()


def test_static_runs_are_unchanged_and_reroling_with_scaling_is_refused() -> None:
    sim, res, _ = run(False, False)
    assert sim.reroler is None and res.role_switches is None
    with pytest.raises(ValueError, match="reroling"):
        Simulator(CFG, scaling=ThresholdScaler(), reroling=RerolePolicy())


def test_a_decoder_paired_with_a_prompt_still_prefilling_switches_only_after_decoding_it() -> None:
    """Re-roled to PREFILL while a request paired with it to decode still prefilled elsewhere, a decoder switched
    at once and the KV then landed on a PREFILL instance, which stopped the request at one token."""
    from scheduler.policy.scaling import RoleChange
    from tests.test_engine_model import config

    class Once:
        def __init__(self) -> None:
            self.done = False

        def propose(self, view, now_s):
            if not self.done and now_s >= 0.02:
                self.done = True
                return [RoleChange("d-0", InstanceRole.PREFILL, "test")]
            return []

    w = Workload(np.array([0.01, 5.0]), np.array([16000, 50]), np.array([200, 20]))
    sim = Simulator(config(pd=(1, 2), blocks=2000), router="least_outstanding", reroling=Once(),
                    reroling_interval_s=0.02, reroling_options={"switch_delay_s": 0.5})
    res = sim.run(w)
    sw = sim.reroler.events[0]
    assert sw.idle_s >= res.first_token_s[0] > 3.0  # idle only after the paired request's KV came and went
    assert res.finish_s[0] - res.first_token_s[0] > 199 * 0.005  # all 199 decode steps, not cut to one token
