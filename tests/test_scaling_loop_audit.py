"""Audit of the SLA scaler's inputs and the scaling loop (scheduler/policy/scaling.py, sim/scaling.py, the live
Controller's window, ``llmsched simulate --goodput``): each test reproduces one finding and failed before its fix."""

from __future__ import annotations

import numpy as np
import pytest

from scheduler.config.models import ClusterConfig, GPUSpec, SLOSpec
from scheduler.core.types import SLO, ClusterView, InstanceRole, InstanceSnapshot, RequestLoad
from scheduler.policy.routers_lookahead import default_latency_model
from scheduler.policy.scaling import SLAScaler, WorkloadSummary

LAT = default_latency_model()
A100 = GPUSpec(name="a100", memory_gib=80, fp16_tflops=312, hbm_gbps=2039)
LOOSE, TIGHT = SLO(ttft_s=8.0, tpot_s=0.2), SLO(ttft_s=0.5, tpot_s=0.03)


def _config(**slos: SLO) -> ClusterConfig:
    return ClusterConfig(
        gpus={"a100": A100},
        model=LAT.model,
        pools=[{"name": "mixed", "role": "mixed", "gpu": "a100"}],
        slos={int(k[1:]): SLOSpec(ttft_s=s.ttft_s, tpot_s=s.tpot_s) for k, s in slos.items()},
    )


def _mixed(n: int) -> ClusterView:
    return ClusterView(
        0.0, tuple(InstanceSnapshot(f"mixed-{k}", InstanceRole.MIXED, gpu="a100", tp=1) for k in range(n))
    )


def _target(pol: SLAScaler, w: WorkloadSummary, n: int = 1) -> int:
    (d,) = pol.decide(_mixed(n), 0.0, w)
    assert d.target is not None
    return d.target


# ---- 1. every priority class's SLO -------------------------------------------------------------------------------
def test_sla_scaler_sizes_for_the_slo_of_each_class_in_the_window() -> None:
    """Class 0 loose (TTFT 8 s), class 1 tight (0.5 s, TPOT 30 ms). The scaler built from the config sized every
    pool with class 0's SLO whatever the traffic: a window of class-1 requests got the instance count of a loose
    SLO (13 where the tight one needs 17 here). It now sizes for the tightest SLO of the classes in the window (one
    FCFS queue and one decode batch per engine: every class waits and steps alike); class 0 alone is unchanged."""
    cfg = _config(c0=LOOSE, c1=TIGHT)
    kw = {"headroom": 1.0, "max_instances": 1000}
    w = WorkloadSummary(40.0, 1000, 300)
    by_class = {
        p: _target(SLAScaler(config=cfg, **kw), WorkloadSummary(40.0, 1000, 300, priorities=p))
        for p in ((0,), (1,), (0, 1))
    }
    alone = {
        name: _target(SLAScaler(config=cfg, slo=slo, **kw), w)
        for name, slo in (("loose", LOOSE), ("tight", TIGHT))
    }
    assert alone["tight"] > alone["loose"]
    assert by_class == {(0,): alone["loose"], (1,): alone["tight"], (0, 1): alone["tight"]}
    # An explicit ``slo`` still holds for every class; no class known: class 0's.
    assert (
        _target(SLAScaler(config=cfg, slo=LOOSE, **kw), WorkloadSummary(40.0, 1000, 300, priorities=(1,)))
        == alone["loose"]
    )
    assert _target(SLAScaler(config=cfg, **kw), w) == alone["loose"]


def test_both_windows_report_the_priority_classes_they_saw() -> None:
    """The simulator's driver and the Controller's window hand the scaler the classes of the window's arrivals."""
    from scheduler.control.controller_scaling import _WorkloadWindow
    from scheduler.policy.scaling import make_scaling_policy
    from sim.simulator import Simulator, Workload

    win = _WorkloadWindow(30.0)
    win.observe(0.0, [], {})
    win.observe(
        1.0,
        [
            InstanceSnapshot(
                "a",
                InstanceRole.MIXED,
                requests=(RequestLoad("r1", 100, 0, None, 2, True), RequestLoad("r2", 100, 0, None, 0, True)),
            )
        ],
        {},
    )
    assert win.summary(1.0).priorities == (0, 2)

    cfg = _config(c0=LOOSE, c1=TIGHT)
    n = 200
    w = Workload(
        np.linspace(0, 20, n), np.full(n, 200), np.full(n, 20), priority=np.where(np.arange(n) < 100, 0, 1)
    )
    pol = make_scaling_policy("sla", config=cfg, max_instances=4)
    seen: list[WorkloadSummary] = []
    decide = pol.decide
    pol.decide = lambda v, t, o: (seen.append(o), decide(v, t, o))[1]  # type: ignore[method-assign]
    Simulator(
        cfg, scaling=pol, scaling_interval_s=2.0, scaling_startup_s=1.0, scaling_options={"window_s": 4.0}
    ).run(w)
    assert seen[0].priorities == (0,) and seen[-1].priorities == (1,)
    assert any(s.priorities == (0, 1) for s in seen)


# ---- 2. an SLO no instance count can meet ------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("prompt", "slo", "what"),
    [(16_000, SLO(ttft_s=0.2, tpot_s=0.1), "TTFT"), (1000, SLO(ttft_s=2.0, tpot_s=1e-4), "TPOT")],
)
def test_sla_scaler_does_not_jump_to_max_for_an_slo_no_instance_count_meets(
    prompt: int, slo: SLO, what: str
) -> None:
    """A mean prompt whose prefill alone outlasts the TTFT target (or a one-request decode step over TPOT): the
    scaler asked for ``max_instances`` (64) at 1 req/s -- more instances cannot shorten one request's prefill.
    It now sizes the pool for the load's throughput with that target dropped, and the reason says so."""
    pol = SLAScaler(LAT, slo=slo, headroom=1.0, cooldown_s=0, startup_delay_s=0, max_instances=64)
    relaxed = SLO(None, slo.tpot_s) if what == "TTFT" else SLO(slo.ttft_s, None)
    w = WorkloadSummary(1.0, prompt, 200)
    need = SLAScaler(LAT, slo=relaxed, headroom=1.0).targets({"mixed"}, w)["mixed"]
    assert need is not None and need < 10
    (d,) = pol.decide(_mixed(1), 0.0, w) or (None,)
    got = 1 if d is None else d.target
    assert got == max(need, 1) and got < 64
    if d is not None:
        assert f"{what} {getattr(slo, what.lower() + '_s'):g} s unreachable" in d.reason
    # Load that needs more instances still gets them, and says why the target was dropped.
    (up,) = SLAScaler(LAT, slo=slo, headroom=1.0, max_instances=64).decide(
        _mixed(1), 0.0, WorkloadSummary(8.0, prompt, 200)
    )
    assert 1 < up.target < 64 and f"{what} " in up.reason and "sized for throughput" in up.reason  # type: ignore


# ---- 3. one scaling loop for both clocks -------------------------------------------------------------------------
def _live_loop(cfg: ClusterConfig) -> tuple[float, float, float]:
    """(decision interval, window, the policy's start-up delay) as the live Controller reads the config."""
    from scheduler.control.controller import Controller

    ctrl = Controller.__new__(Controller)  # its config reader alone: no Ray
    ctrl.config = cfg
    ctrl._members = {}
    ctrl._init_scaling_policy()
    assert ctrl._scaling is not None
    return ctrl._scaling_interval_s, ctrl._workload.window_s, ctrl._scaling.startup_delay_s


def _sim_loop(cfg: ClusterConfig, monkeypatch, name: str, *flags: str) -> tuple[float, float, float]:
    """The same, as ``llmsched simulate --scaling NAME`` hands them to the simulator."""
    from sim import commands

    seen: dict = {}

    def capture(config, **kw):  # type: ignore[no-untyped-def]
        seen.update(kw)
        raise ValueError("captured")

    monkeypatch.setattr(commands, "load_cluster", lambda args: cfg)
    monkeypatch.setattr(commands, "Simulator", capture)
    assert (
        commands.simulate_main(["--synthetic", "20", "--rate", "2", "--scaling", name, "--quiet", *flags])
        == 2
    )
    pol = seen["scaling"]
    assert seen["scaling_startup_s"] == pol.startup_delay_s  # the driver models what the policy books
    return (
        seen["scaling_interval_s"],
        seen.get("scaling_options", {}).get("window_s", 60.0),
        pol.startup_delay_s,
    )


@pytest.mark.parametrize(
    "params",
    [
        {},
        {
            "window_s": 20,
            "scaling_interval_s": 2,
            "startup_delay_s": 45,
            "headroom": 1.3,
            "drain_timeout_s": 30,
        },
    ],
)
def test_live_controller_and_simulator_read_one_scaling_loop_from_the_config(
    params: dict, monkeypatch
) -> None:
    """The same config scaled on different clocks: the Controller decided every 10 s on a 30 s window and booked
    30 s start-ups; ``llmsched simulate --scaling sla`` every 5 s on a 60 s window with 60 s start-ups, and read
    none of the config's ``policies.scaling.params`` (a config's ``window_s: 20`` was live-only). Both read them
    through ``ScalingLoop.split`` now, with one set of defaults; the simulator's flags still override."""
    from scheduler.config.models import PoliciesSpec, PolicySpec

    cfg = _config(c0=LOOSE).model_copy(
        update={"policies": PoliciesSpec(scaling=PolicySpec(name="sla", params=params))}
    )
    live = _live_loop(cfg)
    assert _sim_loop(cfg, monkeypatch, "sla") == live
    if params:
        assert live == (2.0, 20.0, 45.0)
    assert _sim_loop(cfg, monkeypatch, "sla", "--scaling-interval", "7", "--startup-delay", "9")[::2] == (
        7.0,
        9.0,
    )


# ---- 4. simulate --goodput under overload ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("rate", "warning"),
    [(60.0, "is above this cluster's goodput"), (2.0, None), (0.02, "the search's ceiling")],
)
def test_simulate_goodput_warns_when_the_offered_load_is_above_it(
    rate: float, warning: str | None, tmp_path, capsys
) -> None:
    """One A100 offered 60 req/s: ``simulate --goodput`` printed a goodput of a few req/s next to the run's
    summary and said nothing of the trace's own rate being far above it (the run just shown was overloaded). It
    now warns, naming both rates, and the JSON summary carries ``offered_rps``. A goodput that is only the
    bisection's 64x ceiling is said to be a lower bound. A rate the cluster serves: no warning."""
    import json

    from scheduler.cli import main as cli_main

    out = tmp_path / "s.json"
    assert (
        cli_main(
            [
                "simulate",
                "--synthetic",
                "150",
                "--rate",
                str(rate),
                "--instances",
                "1",
                "--goodput",
                "--quiet",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    summary, err = json.loads(out.read_text()), capsys.readouterr().err
    assert summary["offered_rps"] == pytest.approx(rate, rel=0.3)
    assert (summary["goodput_rps"] < summary["offered_rps"]) is (rate == 60.0)
    said = [line for line in err.splitlines() if "goodput" in line]
    assert (warning is None and not said) or (len(said) == 1 and warning in said[0]), err


# ---- 5. scale-down after down_sustain_s: to what the window needed ---------------------------------------------------
def test_sla_scale_down_keeps_the_largest_need_of_its_sustain_window() -> None:
    """10 instances; for 60 s (``down_sustain_s``) the load needs 8, then one tick's dip needs 3. The scaler
    waited its 60 s and then drained to the dip's 3 -- 5 instances the window had needed until the tick before,
    asked back (60 s to start) at the next tick. It now scales down to the largest need of the window it waited
    on (Kubernetes HPA's scale-down stabilization window), and lower only once a later window says so."""
    kw = {
        "slo": SLO(ttft_s=2.0, tpot_s=0.1),
        "headroom": 1.0,
        "startup_delay_s": 60,
        "cooldown_s": 0,
        "down_sustain_s": 60,
        "smoothing": 1.0,
        "trend_smoothing": 0.0,
        "max_instances": 64,
    }
    probe = SLAScaler(LAT, **kw)
    need = {
        r: probe.targets({"mixed"}, WorkloadSummary(r, 1000, 300))["mixed"] for r in np.arange(0.5, 60, 0.5)
    }
    r8 = max(r for r, n in need.items() if n == 8)
    r3 = max(r for r, n in need.items() if n == 3)
    pol = SLAScaler(LAT, **kw)
    v = _mixed(10)
    for t in range(0, 60, 5):
        assert pol.decide(v, float(t), WorkloadSummary(r8, 1000, 300)) == []
    (d,) = pol.decide(v, 60.0, WorkloadSummary(r3, 1000, 300))
    assert d.target == 8 and len(d.drain) == 2, d
    # The smaller need holds a whole window from the cut: then down to it.
    v = _mixed(8)
    downs = [x for t in range(65, 130, 5) for x in pol.decide(v, float(t), WorkloadSummary(r3, 1000, 300))]
    assert [x.target for x in downs] == [3]


# ---- 6. the live window's first look --------------------------------------------------------------------------------
def test_live_window_does_not_count_the_requests_in_flight_at_its_start_as_arrivals() -> None:
    """The Controller's window counted every request id it had not seen before as an arrival -- on its first look,
    all those already in flight: a Controller (re)started under 60 running requests read 12 req/s at its first
    decision (60 / 5 s) where 1 request had arrived, and the SLA scaler scaled up for it at once. Those are load
    already placed; only ids first seen after the first look arrive (their outputs still count when they end)."""
    from scheduler.control.controller_scaling import _WorkloadWindow

    def snap(*rids: str) -> InstanceSnapshot:
        return InstanceSnapshot(
            "a", InstanceRole.MIXED, requests=tuple(RequestLoad(r, 1100, 100) for r in rids)
        )

    old = [f"old-{k}" for k in range(60)]
    win = _WorkloadWindow(60.0)
    win.observe(100.0, [snap(*old)], {"old-60": None})
    win.observe(101.0, [snap(*old, "new")], {"old-60": None})
    win.observe(102.0, [snap("new")], {})
    s = win.summary(105.0)
    assert s.rate_rps == pytest.approx(1 / 5)
    assert s.mean_prompt_tokens == 1000 and s.mean_output_tokens == 100  # the old ones' outputs count


def test_simulate_goodput_probes_draw_the_runs_seed(monkeypatch, capsys) -> None:
    """``simulate --seed 7 --goodput``: the run drew host noise with seed 7, the goodput bisection's probes with
    seed 0 (the goodput of another noise draw than the run it is printed beside)."""
    from sim import goodput as gp

    seen: list[int] = []
    real = gp.Simulator

    class Spy(real):  # type: ignore[misc, valid-type]
        def __init__(self, *a, **kw):  # type: ignore[no-untyped-def]
            seen.append(kw.get("seed", 0))
            super().__init__(*a, **kw)

    monkeypatch.setattr(gp, "Simulator", Spy)
    from scheduler.cli import main as cli_main

    assert (
        cli_main(["simulate", "--quiet", "--synthetic", "40", "--instances", "2", "--seed", "7", "--goodput"])
        == 0
    )
    assert seen and set(seen) == {7}
