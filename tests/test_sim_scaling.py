"""Autoscaling in the simulator (sim/scaling.py): start-up delay, lossless drain, GPU-hour accounting, reaction."""

from __future__ import annotations

import numpy as np
import pytest

from scheduler.config.load import load_config
from scheduler.core.types import ClusterView
from scheduler.policy.migration import make_migration_policy
from scheduler.policy.scaling import ScaleDecision, make_scaling_policy
from sim.metrics import sim_summary
from sim.simulator import Simulator, Workload
from tests.test_engine_model import config, random_workload


class Scripted:
    """A pure stand-in policy: returns the scripted decisions at the first tick at or after each time."""

    def __init__(self, script: list[tuple[float, ScaleDecision]]) -> None:
        self.script = sorted(script, key=lambda x: x[0])
        self.views: list[ClusterView] = []

    @staticmethod
    def pool_of(snapshot) -> str:
        return snapshot.role.value

    def decide(self, view, now_s, observed=None):
        self.views.append(view)
        out = []
        while self.script and self.script[0][0] <= now_s:
            out.append(self.script.pop(0)[1])
        return out


def lifetimes_gpu_hours(res) -> float:
    stop = np.where(np.isnan(res.instance_stopped_s.astype(float)), res.makespan_s, res.instance_stopped_s)
    return float(((stop - res.instance_started_s) * res.instance_gpus).sum() / 3600)


def test_scaled_up_instance_is_not_routable_before_its_startup_delay():
    cfg = config(1)
    w = random_workload(1, 600, rate=6.0)  # ~100 s of arrivals
    pol = Scripted([(5.0, ScaleDecision("mixed", delta=1, reason="test"))])
    sim = Simulator(cfg, router="round_robin", scaling=pol, scaling_interval_s=5.0, scaling_startup_s=30.0)
    res = sim.run(w)
    assert res.instance_ids == ["m-0", "m-1"]
    assert res.instance_started_s[1] == pytest.approx(5.0)
    on_new = res.instance == 1
    assert on_new.any(), "the started instance never took traffic"
    assert w.arrival_s[on_new].min() >= 35.0  # start request at 5 s + 30 s start-up
    # Nor did any policy tick see it before it was up.
    for v in pol.views:
        ids = {i.instance_id for i in v.instances}
        assert ("m-1" in ids) == (v.time_s >= 35.0)
    assert np.isfinite(res.finish_s).all()


@pytest.mark.parametrize("migrate", [False, True])
def test_scale_down_drains_without_losing_a_request(migrate):
    cfg = config(3, blocks=400)
    w = random_workload(2, 900, rate=20.0, max_prompt=600, max_out=300)
    pol = Scripted([(10.0, ScaleDecision("mixed", delta=-2, reason="test", drain=("m-2",)))])
    sim = Simulator(cfg, router="least_outstanding", scaling=pol, scaling_interval_s=1.0, scaling_startup_s=5.0,
                    migration=make_migration_policy("llumnix") if migrate else None)
    res = sim.run(w)
    assert not res.rejected.any()
    assert np.isfinite(res.finish_s).all()  # every request finished, drained or not
    drained = [k for k, x in enumerate(sim.instances) if x.stopped_s is not None]
    assert sorted(sim.instances[k].instance_id for k in drained) == ["m-1", "m-2"]
    for k in drained:
        stop = sim.instances[k].stopped_s
        assert stop >= 10.0
        mine = (res.instance == k) | (res.decode_instance == k)
        late = w.arrival_s[mine] > stop
        assert not late.any(), "a removed instance took new requests"
        if not migrate:  # finished in place: removed only after its last request
            assert np.nanmax(res.finish_s[(res.instance == k)]) <= stop + 1e-9
    assert sim.scaler.removed == 2
    assert res.scale_events == 1


def test_scale_down_of_a_decode_pool_waits_for_kv_in_flight():
    cfg = config(pd=(2, 3), blocks=600)
    w = random_workload(3, 500, rate=15.0, max_prompt=500, max_out=200)
    pol = Scripted([(3.0, ScaleDecision("decode", delta=-2, reason="test"))])
    res = Simulator(cfg, router="least_outstanding", scaling=pol, scaling_interval_s=1.0).run(w)
    assert np.isfinite(res.finish_s).all() and not res.rejected.any()


def test_a_decoder_paired_with_a_prompt_still_prefilling_is_not_removed_before_its_kv_lands():
    """A request is paired with its decoder at routing; the KV only leaves the prefill instance at its end. The
    decoder is not empty meanwhile: it used to be removed at once, then decoded the request anyway, uncharged."""
    cfg = config(pd=(1, 2), blocks=2000)
    w = Workload(np.array([0.01, 5.0]), np.array([16000, 50]), np.array([200, 20]))  # a long prefill first
    pol = Scripted([(0.02, ScaleDecision("decode", delta=-1, reason="test", drain=("d-0",)))])
    sim = Simulator(cfg, router="least_outstanding", scaling=pol, scaling_interval_s=0.02, scaling_startup_s=1.0)
    res = sim.run(w)
    d0 = sim._index["d-0"]
    assert res.decode_instance[0] == d0.index and res.first_token_s[0] > 3.0
    assert d0.stopped_s is not None and res.finish_s[0] <= d0.stopped_s + 1e-9  # removed once it decoded it
    assert res.instance_lifetime_s[d0.index] >= d0.engine.busy_time_s  # every busy second charged


def test_a_start_still_pending_at_the_end_does_not_stretch_the_run():
    """A start asked for 2 s before the last arrival (120 s start-up) left its ready event in the queue; the run
    ended there, charging every instance 171 s for 55 s of work and dividing throughput by it."""
    cfg = config(2)
    w = random_workload(4, 400, rate=8.0)
    pol = Scripted([(float(w.arrival_s[-1]) - 2.0, ScaleDecision("mixed", delta=1, reason="up"))])
    sim = Simulator(cfg, router="round_robin", scaling=pol, scaling_interval_s=1.0, scaling_startup_s=120.0)
    res = sim.run(w)
    static = Simulator(cfg, router="round_robin").run(w)
    assert res.makespan_s == pytest.approx(static.makespan_s) and res.makespan_s <= np.nanmax(res.finish_s)
    asked = sim.scaler.events[0].time_s
    assert res.instance_lifetime_s[2] == pytest.approx(res.makespan_s - asked)  # the starting one: asked -> end
    assert sim_summary(res)["throughput_rps"] == pytest.approx(sim_summary(static)["throughput_rps"])


def test_gpu_hours_count_each_instance_lifetime():
    cfg = config(2)
    w = random_workload(4, 800, rate=8.0)
    pol = Scripted([(10.0, ScaleDecision("mixed", delta=2, reason="up")),
                    (60.0, ScaleDecision("mixed", target=1, reason="down"))])
    res = Simulator(cfg, router="round_robin", scaling=pol, scaling_interval_s=5.0, scaling_startup_s=20.0).run(w)
    s = sim_summary(res)
    assert len(res.instance_ids) == 4
    life = res.instance_lifetime_s
    assert life[2] == pytest.approx(res.instance_stopped_s[2] - 10.0)
    assert (life[:2] <= res.makespan_s + 1e-9).all() and (life > 0).all()
    assert life.sum() < 4 * res.makespan_s  # some instances were removed before the end
    assert s["gpu_hours"] == pytest.approx(lifetimes_gpu_hours(res))
    assert s["gpu_hours"] == pytest.approx(float((life * res.instance_gpus).sum()) / 3600)
    assert s["scale_events"] == 2 and s["mean_instances"] == pytest.approx(life.sum() / res.makespan_s)
    # A static run is charged the whole makespan per instance, as before.
    st = Simulator(cfg, router="round_robin").run(w)
    ss = sim_summary(st)
    assert ss["gpu_hours"] == pytest.approx(2 * cfg.pools[0].tp * st.makespan_s / 3600)
    assert "scale_events" not in ss


def step_workload(seed: int = 0) -> Workload:
    """1 req/s for 300 s, 12 req/s for 300 s, 1 req/s for 600 s (Azure-like lengths)."""
    rng = np.random.default_rng(seed)
    parts, t0 = [], 0.0
    for rate, dur in ((1.0, 300.0), (12.0, 300.0), (1.0, 600.0)):
        a = t0 + np.cumsum(rng.exponential(1 / rate, int(rate * dur * 1.5)))
        parts.append(a[a < t0 + dur])
        t0 += dur
    a = np.concatenate(parts)
    return Workload(a, rng.integers(200, 1500, len(a)), rng.integers(50, 300, len(a)), name="step")


@pytest.mark.parametrize("name", ["threshold", "sla"])
def test_scaler_follows_a_step_change(name):
    cfg = load_config("default")
    cfg = cfg.model_copy(update={"pools": [cfg.pools[0].model_copy(update={"count": 1, "gpu": "a40"})]})
    kw = {"config": cfg} if name == "sla" else {"scale_up": 0.3, "scale_down": 0.1, "cooldown_s": 20.0}
    pol = make_scaling_policy(name, min_instances=1, max_instances=12, **kw)
    sim = Simulator(cfg, router="least_outstanding", scaling=pol, scaling_interval_s=5.0, scaling_startup_s=30.0)
    res = sim.run(step_workload())
    ev = sim.scaler.events
    ups = [e.time_s for e in ev if e.change > 0]
    downs = [e.time_s for e in ev if e.change < 0]
    assert ups and 300.0 <= min(ups) <= 400.0, ev  # reacts to the step, not before it
    assert not any(t < 300.0 for t in ups)
    assert any(t >= 600.0 for t in downs), ev  # gives the capacity back after it
    # Busiest at the plateau, back to few instances at the end.
    hist = sim.scaler.history
    at = {round(t): a + s for t, a, s, _ in hist}
    assert max(v for t, v in at.items() if 450 <= t <= 600) >= 3
    assert min(v for t, v in at.items() if t >= 1000) <= 2
    assert np.isfinite(res.finish_s).all()
