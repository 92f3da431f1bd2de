"""Simulator speed audit (thirty-seventh session): the routers' snapshot of an instance is read from its engine only
when the engine changed since the last read (``SimInstance.make_snapshot``, keyed on ``EngineModel.version``).
A periodic refresh of an idle or mid-span instance rebuilt ~40% of an Azure x16 run's snapshots unchanged. The
tests pin the reuse and, above all, that a kept snapshot is never stale: after every kind of change, and at every
read of small runs that migrate, hand KV off and cache prefixes."""

from __future__ import annotations

import dataclasses

import pytest

from scheduler.config.load import load_config
from scheduler.core.types import InstanceRole, InstanceSnapshot
from scheduler.policy.migration import make_migration_policy
from sim.cluster import SimInstance, build_instances
from sim.commands import with_instances
from sim.simulator import Simulator, Workload
from sim.traces import bundled_traces, load_trace

pytestmark = pytest.mark.usefixtures("no_ray")  # tests/conftest.py: no Ray node in this module


def _state(s: InstanceSnapshot) -> InstanceSnapshot:
    """The state a snapshot shows, without when it was read."""
    return dataclasses.replace(s, time_s=0.0)


def _instance() -> SimInstance:
    return build_instances(with_instances(load_config("default"), 1))[0]


def _assert_current(inst: SimInstance, now: float, *, detail: bool = True) -> InstanceSnapshot:
    snap = inst.make_snapshot(now, detail=detail)
    assert _state(snap) == _state(inst.fresh_snapshot(now, detail=detail)), "a kept snapshot is stale"
    return snap


def test_an_unchanged_engine_keeps_its_snapshot_and_the_refresh_time_moves() -> None:
    inst = _instance()
    inst.engine.add_request("a", 300, 40)
    first = inst.make_snapshot(1.0, detail=False)
    # A periodic refresh with nothing changed: the same object (no read), refreshed as of now.
    assert inst.make_snapshot(2.5, detail=False) is first
    assert inst.snap_t == 2.5 and first.time_s == 1.0
    inst.engine.step()
    assert inst.make_snapshot(3.0, detail=False) is not first


def test_a_kept_snapshot_is_rebuilt_after_every_kind_of_change() -> None:
    inst = _instance()
    eng = inst.engine
    t = 0.0

    def changed(before: InstanceSnapshot) -> InstanceSnapshot:
        nonlocal t
        t += 0.1
        after = _assert_current(inst, t)
        assert _state(after) != _state(before), "the change did not show"
        return after

    snap = _assert_current(inst, t)
    eng.add_request("a", 200, 50, predicted_remaining=30.0)
    snap = changed(snap)
    eng.add_request("b", 100, 60, predicted_remaining=6.0)  # runs out 5 steps in
    snap = changed(snap)
    while not eng.decoding:
        eng.step()
        snap = changed(snap)
    span = eng.plan_span()
    assert span is not None and span.steps > 2
    eng.advance(span, 2)  # a span cut or ended: its steps booked at once
    snap = changed(snap)
    # A policy read ahead of the engine (mid-span) drops the guesses that ran out by then for good.
    with eng.ahead(5):
        inst.fresh_snapshot(t, detail=True)
    snap = changed(snap)
    eng.add_request("c", 400, 10)
    snap = changed(snap)
    assert eng.abort("c")
    snap = changed(snap)
    while len(eng.decoding) < 2:
        eng.step()
    snap = _assert_current(inst, t)
    assert eng.detach("a") is not None  # a migration's stop-and-copy
    snap = changed(snap)
    # Written from outside the engine: a migration's KV reservation, a switch of role; the driver's own state.
    eng.prefill_blocks += 7
    snap = changed(snap)
    eng.role = InstanceRole.DECODE
    snap = changed(snap)
    inst.draining = True
    snap = changed(snap)
    inst.incoming = 2
    snap = changed(snap)
    brief = inst.make_snapshot(t, detail=False)  # the other detail: not the detailed snapshot kept
    assert brief.requests == () and snap.requests != ()
    # An entry amended with what the engine does not show yet is read from the engine again next time.
    inst.amend_snapshot(t, num_waiting=brief.num_waiting + 1)
    assert inst.snap_key is None
    assert _assert_current(inst, t + 1, detail=False).num_waiting == brief.num_waiting


def _checked_run(monkeypatch: pytest.MonkeyPatch, sim: Simulator, w: Workload) -> tuple[object, int]:
    """Run ``sim`` with every routers' snapshot checked against a read of its engine; returns the result and how
    many snapshots were kept."""
    make = SimInstance.make_snapshot
    kept = 0

    def checked(self: SimInstance, now_s: float, *, detail: bool) -> InstanceSnapshot:
        nonlocal kept
        before = self.snapshot
        snap = make(self, now_s, detail=detail)
        kept += snap is before
        assert _state(snap) == _state(self.fresh_snapshot(now_s, detail=detail)), (self.instance_id, now_s)
        return snap

    monkeypatch.setattr(SimInstance, "make_snapshot", checked)
    return sim.run(w), kept


def _azure(n: int, rate: float) -> Workload:
    return Workload.from_trace(load_trace(bundled_traces()["azure_llm_2023_conv"]).head(n).scale_rate(rate))


def test_no_kept_snapshot_is_stale_in_a_pd_run_that_migrates(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = load_config("scheduler/config/examples/llama2-7b-pd-a100.yaml")
    sim = Simulator(cfg, migration=make_migration_policy("llumnix", high_watermark=0.5, balance_gap=0.1))
    res, kept = _checked_run(monkeypatch, sim, _azure(1500, 3.0))
    assert res.migrations > 0 and res.kv_transfers > 0 and kept > 0


def test_no_kept_snapshot_is_stale_with_a_prefix_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = load_config("scheduler/config/examples/llama3-8b-a100-longctx-tier.yaml")
    w = Workload.from_trace(load_trace(bundled_traces()["mooncake_conversation"]).head(400))
    res, kept = _checked_run(monkeypatch, Simulator(cfg, router="prefix_affinity"), w)
    assert res.prefix_hit_tokens > 0 and kept > 0
