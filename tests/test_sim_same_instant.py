"""Requests that reach an idle instance at one simulated instant share its next step (``same_instant_batching``), as
live vLLM's engine loop schedules whatever reached it before its next ``schedule()``; with no two arrivals at one
instant the run is bit-identical to starting each idle instance at once (the old behaviour, the option off)."""

from __future__ import annotations

import numpy as np
import pytest

from bench.loadgen import cluster_config
from scheduler.policy.migration import make_migration_policy
from sim.metrics import sim_summary
from sim.simulator import Simulator, Workload
from sim.traces import load_bundled


def _run(cfg, w: Workload, *, same: bool, router: str = "round_robin", **kw):
    return Simulator(cfg, router=router, same_instant_batching=same, **kw).run(w)


def test_two_requests_at_one_instant_share_the_idle_instances_first_step() -> None:
    """Two prompts at t=1 on one idle instance: one prefill step for both, both first tokens at its end. Started at
    the first arrival, the second waited for the first's prefill step and came out a step later."""
    cfg = cluster_config("same-instant", mixed=1)
    w = Workload(np.array([1.0, 1.0]), np.array([512, 300]), np.array([4, 4]))
    res = _run(cfg, w, same=True)
    assert res.admit_s[0] == res.admit_s[1] == 1.0
    assert res.first_token_s[0] == res.first_token_s[1]
    old = _run(cfg, w, same=False)
    assert old.admit_s[1] > 1.0 and old.first_token_s[1] > old.first_token_s[0]  # waited for request 0's step
    assert res.first_token_s[1] < old.first_token_s[1]
    assert res.steps < old.steps


def test_a_burst_on_a_prefill_instance_is_one_prefill_step() -> None:
    """P/D: three prompts at one instant on one PREFILL instance are prefilled together and hand off together."""
    cfg = cluster_config("same-instant-pd", mixed=0, prefill=1, decode=1)
    w = Workload(np.array([0.0, 0.5, 0.5, 0.5]), np.array([200, 400, 400, 400]), np.array([8, 8, 8, 8]))
    res = _run(cfg, w, same=True, router="least_outstanding")
    assert (res.decode_instance[1:] >= 0).all()
    assert len(set(res.first_token_s[1:].tolist())) == 1
    assert np.isfinite(res.finish_s).all()


def _jittered_mooncake(n: int) -> Workload:
    trace = load_bundled("mooncake_conversation").head(n).spread_ties(seed=1)
    assert len(np.unique(trace.arrival_s)) == len(trace)  # every arrival at its own instant
    return Workload.from_trace(trace.scale_rate(4.0))


def _columns(res) -> dict:
    summary = sim_summary(res)
    for key in ("wall_seconds", "requests_per_wall_s", "events_per_wall_s"):
        summary.pop(key, None)
    return {"summary": summary, "first": res.first_token_s, "finish": res.finish_s, "admit": res.admit_s,
            "instance": res.instance, "decode": res.decode_instance, "preempt": res.preemptions,
            "busy": res.instance_busy_s, "events": res.events, "steps": res.steps}


@pytest.mark.parametrize("case", ["mixed-lookahead", "mixed-least_outstanding-migration", "pd-round_robin",
                                  "pd-lookahead-poll"])
def test_distinct_arrival_times_run_bit_identical(case: str) -> None:
    """No two arrivals at one instant (the Mooncake slice's ticks spread): the deferred start changes nothing, on a
    MIXED cluster (with Llumnix migration too) and on a P/D one (handoffs, the ingress's poll rounds)."""
    kind, router, *extra = case.split("-")
    cfg = (cluster_config("distinct", mixed=4) if kind == "mixed"
           else cluster_config("distinct", mixed=0, prefill=2, decode=2))
    def run(same: bool) -> dict:
        kw: dict = {"ingress_poll_s": 0.05} if "poll" in extra else {}
        if "migration" in extra:  # a policy per run: it keeps state across ticks
            kw.update(migration=make_migration_policy("llumnix"), migration_interval_s=0.1)
        return _columns(_run(cfg, w, same=same, router=router, **kw))

    w = _jittered_mooncake(300)
    on, off = run(True), run(False)
    assert on["summary"].pop("same_instant_batching") is True and "same_instant_batching" not in off["summary"]
    assert on["summary"] == off["summary"]
    for key in ("first", "finish", "admit", "instance", "decode", "preempt", "busy"):
        np.testing.assert_array_equal(on[key], off[key], err_msg=key)
    assert (on["events"], on["steps"]) == (off["events"], off["steps"])
    if "migration" in extra:
        assert on["summary"]["migrations"] > 0  # the migration paths ran


def test_simulate_flag_batches_a_coarse_traces_ticks(tmp_path) -> None:
    """``simulate --same-instant-batching`` on a trace logged on a 1 s clock (ticks of 4 short prompts, 2
    instances): the JSON names the option, and each tick's prompts share their instance's step (fewer steps) where
    each instance's first ran alone before."""
    import json

    from sim.commands import simulate_main

    rows = [f"2023-11-16 18:00:{k // 4:02d}.0000000,{300 + 10 * k},20" for k in range(40)]
    trace = tmp_path / "ticks.csv"
    trace.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n" + "\n".join(rows) + "\n")
    out = {}
    for flag in ("", "--same-instant-batching"):
        path = tmp_path / f"out{flag}.json"
        argv = ["--quiet", "--trace", str(trace), "--instances", "2", "--router", "round_robin", "--json", str(path)]
        assert simulate_main(argv + ([flag] if flag else [])) == 0
        out[flag] = json.loads(path.read_text())
    on, off = out["--same-instant-batching"], out[""]
    assert on["same_instant_batching"] is True and "same_instant_batching" not in off
    assert on["engine_steps"] < off["engine_steps"]


class _Watch:
    """A migration policy that moves nothing and records what each tick sees of instance 0."""

    def __init__(self) -> None:
        self.seen: dict[float, tuple[int, int]] = {}

    def plan(self, view, now_s: float) -> list:
        s = view.instances[0]
        self.seen[now_s] = (s.num_running, s.num_waiting)
        return []


def test_a_policy_tick_at_the_instant_sees_the_bursts_step_started() -> None:
    """Two prompts at t=0.5, on a migration tick: the batch starts once the instant's arrivals are done, before the
    tick (``EventKind``: POLICY after the kinds that bring work), so the tick reads both running -- as it read the
    first running (and the second queued) before. Started after every event of the instant, the tick read both
    waiting on an idle engine."""
    cfg = cluster_config("same-instant-tick", mixed=1)
    w = Workload(np.array([0.0, 0.5, 0.5]), np.array([64, 512, 300]), np.array([2, 40, 40]))
    seen = {}
    for same in (True, False):
        watch = _Watch()
        _run(cfg, w, same=same, migration=watch, migration_interval_s=0.5)
        seen[same] = watch.seen[0.5]
    assert seen[True] == (2, 0)
    assert seen[False] == (1, 1)


def test_compare_flag_reaches_every_simulation(monkeypatch) -> None:
    """``compare --same-instant-batching``: the saturation probes, the routers' runs and the goodput probes all batch
    (one left out would mix the two behaviours in one file)."""
    from scheduler.cli import main as cli_main
    from sim import compare, goodput

    seen: list[bool] = []
    real = compare.Simulator

    class Spy(real):  # type: ignore[misc, valid-type]
        def __init__(self, *a, **kw):  # type: ignore[no-untyped-def]
            seen.append(kw.get("same_instant_batching", False))
            super().__init__(*a, **kw)

    for mod in (compare, goodput):
        monkeypatch.setattr(mod, "Simulator", Spy)
    argv = ["compare", "--synthetic", "40", "--instances", "2", "--routers", "round_robin", "--same-instant-batching"]
    assert cli_main(argv) == 0
    assert len(seen) > 3 and set(seen) == {True}
