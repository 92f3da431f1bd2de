"""The simulator's opt-in model of the live ingress's poll-round view (``ingress_poll_s``, ``sim/poll.py``): routers
see each instance as of the last round plus the ingress's own bookings since its ask; off, as of its last step."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from scheduler.core.types import ClusterView, InstanceRole, InstanceSnapshot
from scheduler.policy.route import LeastOutstandingRouter
from sim.poll import IngressPoll
from sim.simulator import Simulator, Workload
from tests.test_engine_model import config


class _Seen(LeastOutstandingRouter):
    """least_outstanding, keeping each view it routed on."""

    def __init__(self) -> None:
        super().__init__()
        self.views: list[ClusterView] = []

    def route(self, request, view):  # type: ignore[override]
        self.views.append(view)
        return super().route(request, view)


@pytest.fixture(scope="module")
def two_mixed():
    return config(2, blocks=2000)


def _one_token_then_another(gap_s: float) -> Workload:
    """A 64-token prompt answered by one token (done in one ~10 ms step on m-0), another request ``gap_s`` later."""
    return Workload(np.array([0.0, gap_s]), np.array([64, 64]), np.array([1, 1]))


def test_a_router_routes_on_the_stale_count_until_a_round_shows_the_finish(two_mixed) -> None:
    """Request 0 finishes on m-0 within a step. 50 ms later, with rounds 200 ms apart, the ingress still counts it
    there (booked after the round at t=0 was asked; no round since): least_outstanding sends request 1 to m-1. Off,
    the router sees m-0 empty at its step's end and sends it to m-0 (ties: first in view order) -- and so it does
    with the rounds on once a round asked after the finish has published."""
    w = _one_token_then_another(0.05)
    lag = _Seen()
    res = Simulator(two_mixed, router=lag, ingress_poll_s=0.2).run(w)
    assert res.finish_s[0] < 0.05  # it is gone from m-0 when request 1 comes
    seen = lag.views[1].by_id("m-0")
    assert (seen.num_running, seen.num_waiting, seen.prefill_tokens_pending) == (0, 1, 64)
    assert lag.views[1].time_s == 0.0  # the view is the round published at t=0
    assert res.instance.tolist() == [0, 1]

    exact = _Seen()
    res = Simulator(two_mixed, router=exact).run(w)
    assert exact.views[1].by_id("m-0").num_waiting == 0
    assert res.instance.tolist() == [0, 0]

    later = Simulator(two_mixed, router=_Seen(), ingress_poll_s=0.2).run(_one_token_then_another(0.25))
    assert later.instance.tolist() == [0, 0]


def test_a_round_waits_for_the_step_in_flight_and_publishes_with_its_last_answer() -> None:
    """A 4000-token prompt's prefill step (~0.39 s, one step) is in flight on m-0 when the round of t=0.05 is asked:
    m-1 answers at once, m-0 at the step's end, and the round publishes then. Requests routed meanwhile see the round
    of t=0 plus the bookings. The round's answer from m-0 holds request 2, which reached it during the wait, and
    the ingress still counts its booking, made after the ask: counted twice until the next round, as live."""
    w = Workload(np.array([0.0, 0.1, 0.2, 0.42]), np.array([4000, 16, 16, 16]), np.array([50, 1, 1, 1]))
    seen = _Seen()
    res = Simulator(config(2, blocks=2000, budget=4096), router=seen, ingress_poll_s=0.05).run(w)
    step_end = res.first_token_s[0]
    assert 0.3 < step_end < 0.42
    assert [v.time_s for v in seen.views] == [0.0, 0.0, 0.0, step_end]
    m0, m1 = seen.views[3].by_id("m-0"), seen.views[3].by_id("m-1")
    assert (m0.num_running, m0.num_waiting, m0.prefill_tokens_pending) == (1, 2, 32)
    assert (m1.num_running, m1.num_waiting) == (0, 1)  # request 1, done since, booked after m-1 answered
    assert res.instance.tolist() == [0, 1, 0, 1]


def test_a_landed_decode_leg_is_counted_on_its_decoder_until_a_round_shows_it() -> None:
    """P/D, rounds 1 s apart (only the one at t=0 published before t=0.9): request 0's decode leg lands on d-0 at
    ~0.17 s and is counted there as the ingress counts it (``_expect_decode(landed=...)``): one waiting, none on its
    way, its context (prompt + first token) queued -- not the 1 running the simulator's exact view shows -- and so is
    request 1's on d-1; request 2's decode goes to d-0 (a tie, first in order), where the exact view sends it to
    d-1, whose request 1 ended."""
    w = Workload(np.array([0.0, 0.1, 0.9]), np.array([2000, 16, 16]), np.array([50, 20, 20]))
    cfg = config(pd=(1, 2), blocks=2000, budget=4096)
    seen = _Seen()
    res = Simulator(cfg, router=seen, ingress_poll_s=1.0).run(w)
    assert res.first_token_s[1] < 0.9 and seen.views[2].time_s == 0.0
    d0, d1 = seen.views[2].by_id("d-0"), seen.views[2].by_id("d-1")
    assert (d0.num_running, d0.num_waiting, d0.num_incoming, d0.prefill_tokens_pending) == (0, 1, 0, 2001)
    assert (d1.num_running, d1.num_waiting, d1.prefill_tokens_pending) == (0, 1, 17)
    assert res.decode_instance.tolist() == [1, 2, 1]
    exact = _Seen()
    res = Simulator(cfg, router=exact).run(w)
    assert exact.views[2].by_id("d-0").num_running == 1 and res.decode_instance.tolist() == [1, 2, 2]


def test_bookings_made_while_a_round_is_out_stay_counted_after_it_publishes() -> None:
    """As ``IngressView._refresh_view``: only what was booked before the ask leaves the count when the round
    publishes; a request routed while the answers were on their way stays counted (its instance may not show it)."""
    poll = IngressPoll(0.025)
    poll.book("a", 100)
    poll.ask(["a", "b"])
    poll.book("a", 7)
    poll.book("b", 5, compute=1)
    assert not poll.answer("a", _snap("a"))
    assert poll.answer("b", _snap("b"))
    poll.publish(1.0)
    assert poll.pending == {"a": (1, 7, 7), "b": (1, 5, 1)}
    poll.ask(["a", "b"])
    poll.publish(2.0)  # nobody answered (timeout): the last snapshots stand, the bookings taken at the ask go
    assert poll.pending == {} and set(poll.snapshots) == {"a", "b"} and poll.time_s == 2.0


def test_the_period_must_be_positive(two_mixed) -> None:
    with pytest.raises(ValueError, match="ingress_poll_s"):
        Simulator(two_mixed, ingress_poll_s=0.0)


def _snap(iid: str) -> InstanceSnapshot:
    return InstanceSnapshot(instance_id=iid, role=InstanceRole.MIXED)


def test_simulate_takes_the_period_from_its_flag(tmp_path, capsys) -> None:
    """``llmsched simulate --ingress-poll-s``: the rounds run (their events counted), the default has none; a period
    that is not positive is refused by name."""
    import json

    from sim.commands import simulate_main

    events = []
    for flags in ([], ["--ingress-poll-s", "0.025"]):
        out = tmp_path / f"{len(flags)}.json"
        assert simulate_main(["--synthetic", "200", "--instances", "2", "--quiet", "--json", str(out), *flags]) == 0
        events.append(json.loads(out.read_text())["events"])
    assert events[1] > events[0]
    with pytest.raises(SystemExit):
        simulate_main(["--synthetic", "20", "--quiet", "--ingress-poll-s", "0"])
    assert "--ingress-poll-s" in capsys.readouterr().err


def test_simulate_goodput_probes_route_on_the_rounds_too(monkeypatch) -> None:
    """``simulate --ingress-poll-s S --goodput``: every goodput probe routes on the rounds, as the run beside it does
    (the probes ran without them: the same goodput whatever S, the flag silently left out of the reported figure)."""
    import sim.goodput
    from sim.commands import simulate_main

    periods: list[float | None] = []

    class Recording(Simulator):
        def __init__(self, *a, **kw) -> None:
            periods.append(kw.get("ingress_poll_s"))
            super().__init__(*a, **kw)

    monkeypatch.setattr(sim.goodput, "Simulator", Recording)
    assert simulate_main(["--synthetic", "100", "--instances", "2", "--quiet", "--goodput",
                          "--ingress-poll-s", "0.25"]) == 0
    assert len(periods) >= 5 and set(periods) == {0.25}


def test_a_request_routed_on_a_round_from_before_a_drain_is_refused_and_routed_again(two_mixed) -> None:
    """m-0 drains for a scale-down at t=0.5 (busy: it stays until its request ends); rounds 10 s apart, so the view
    is the round of t=0. Request 2 (t=1.0) is routed to m-0 on it (a tie, first in order): m-0 refuses it, as live
    (``Instance.submit``), and it goes to m-1, counted in ``drain_refused``; m-0 shows draining from then on, so
    request 3 goes to m-1 without a refusal. Before, request 2 ran on the draining m-0. Off, the view is fresh: no
    refusal, and no ``drain_refused`` key (nor with the rounds on and nothing that drains)."""
    from scheduler.policy.scaling import ScaleDecision
    from sim.metrics import sim_summary
    from tests.test_sim_scaling import Scripted

    w = Workload(np.array([0.0, 0.01, 1.0, 1.1]), np.array([64, 64, 64, 64]), np.array([300, 300, 20, 20]))

    def run(poll_s: float | None, scale: bool = True):
        pol = Scripted([(0.5, ScaleDecision("mixed", delta=-1, reason="test", drain=("m-0",)))])
        sim = Simulator(two_mixed, router="least_outstanding", ingress_poll_s=poll_s,
                        **({"scaling": pol, "scaling_interval_s": 0.5} if scale else {}))
        res = sim.run(w)
        assert np.isfinite(res.finish_s).all() and not res.rejected.any()
        return sim, res

    sim, res = run(10.0)
    assert sim._index["m-0"].stopped_s is not None and sim._index["m-0"].stopped_s > 1.1  # draining, not gone
    assert res.instance.tolist() == [0, 1, 1, 1]
    assert res.drain_refused == 1 and sim_summary(res)["drain_refused"] == 1
    _, res = run(None)
    assert res.instance.tolist() == [0, 1, 1, 1] and "drain_refused" not in sim_summary(res)
    _, res = run(10.0, scale=False)
    assert res.drain_refused is None and "drain_refused" not in sim_summary(res)


class _SwitchAt:
    """A pure stand-in re-roling policy: proposes the scripted role changes at the first tick at or after each
    time."""

    def __init__(self, script: list[tuple[float, str, InstanceRole]]) -> None:
        self.script = sorted(script, key=lambda x: x[0])

    def propose(self, view, now_s):  # type: ignore[no-untyped-def]
        from scheduler.policy.scaling import RoleChange

        out = []
        while self.script and self.script[0][0] <= now_s:
            _, iid, role = self.script.pop(0)
            out.append(RoleChange(iid, role, "test"))
        return out


def _rerole_run(switch: tuple[str, InstanceRole], poll_s: float | None, w: Workload, router: Any = None):
    from tests.test_engine_model import config as engine_config

    sim = Simulator(engine_config(pd=(2, 2), blocks=2000), router=router or "least_outstanding", ingress_poll_s=poll_s,
                    reroling=_SwitchAt([(0.5, *switch)]), reroling_interval_s=0.5,
                    reroling_options={"switch_delay_s": 0.0, "handoff": False})
    res = sim.run(w)
    assert np.isfinite(res.finish_s).all() and not res.rejected.any()
    assert [(s.instance_id, s.done_s) for s in sim.reroler.events] == [(switch[0], 0.5)]  # idle: switched at once
    return sim, res


def test_a_request_routed_on_a_round_from_before_a_role_switch_is_refused_and_routed_again() -> None:
    """p-0 (idle) switches to DECODE at t=0.5; rounds 10 s apart, so the view is the round of t=0, p-0 PREFILL
    in it. The request (t=1.0) is routed to p-0 for its prefill on it (idle, first in order): p-0 refuses it, as
    live (``Instance.submit``'s ``view_role``), and it prefills on p-1, counted in ``role_refused``; p-0 shows as
    DECODE from then on. Before, the prefill-only leg ran on the DECODE p-0. Off, the view is fresh: no refusal,
    p-0 decodes the request, and no ``role_refused`` key."""
    from sim.metrics import sim_summary

    w = Workload(np.array([1.0]), np.array([64]), np.array([20]))
    sim, res = _rerole_run(("p-0", InstanceRole.DECODE), 10.0, w)
    ids = list(res.instance_ids)
    assert (ids[res.instance[0]], ids[res.decode_instance[0]]) == ("p-1", "d-0")
    assert (res.role_refused, res.drain_refused) == (1, 0)
    assert sim_summary(res)["role_refused"] == 1
    assert sim.poll.snapshots["p-0"].role is InstanceRole.DECODE  # shown in its new role since the refusal
    _, res = _rerole_run(("p-0", InstanceRole.DECODE), None, w)
    assert (ids[res.instance[0]], ids[res.decode_instance[0]]) == ("p-1", "p-0")
    assert res.role_refused is None and "role_refused" not in sim_summary(res)


def test_a_handoff_paired_on_a_round_from_before_its_decoders_switch_goes_to_another_decoder() -> None:
    """d-0 (idle) switches to PREFILL at t=0.5; the round of t=0 shows it DECODE. The request (t=1.0) is paired with
    it there: its prefill runs on p-0, and the KV is refused by d-0, now PREFILL (live: the handoff's submit with
    ``view_role`` DECODE); it goes to d-1, the decoder the router names now. Before, the request decoded in full on
    the PREFILL d-0."""
    w = Workload(np.array([1.0]), np.array([64]), np.array([20]))
    sim, res = _rerole_run(("d-0", InstanceRole.PREFILL), 10.0, w)
    ids = list(res.instance_ids)
    assert (ids[res.instance[0]], ids[res.decode_instance[0]]) == ("p-0", "d-1")
    assert res.role_refused == 1 and sim._index["d-0"].incoming == 0
    _, res = _rerole_run(("d-0", InstanceRole.PREFILL), None, w)
    assert ids[res.decode_instance[0]] == "d-1" and res.role_refused is None


def test_a_second_handoff_paired_with_a_decoder_that_refused_one_is_not_sent_there() -> None:
    """Requests 0 and 1 are both paired with d-0 on the round of t=0 (DECODE there); d-0 switched to PREFILL at 0.5.
    Request 0's KV is refused (its prefill is short); request 1's prefill (long) ends after that refusal showed d-0's
    new role, so its KV goes to d-1 at once -- not sent to be refused again, as live's ``Ingress._role_changed``
    re-picks before the submit. Before: two refusals."""
    from scripts.time_drain_refusal import PinnedRouter

    w = Workload(np.array([1.0, 1.0]), np.array([64, 3000]), np.array([20, 20]))
    pins = {"0": ("p-0", "d-0"), "1": ("p-1", "d-0")}
    sim, res = _rerole_run(("d-0", InstanceRole.PREFILL), 10.0, w, PinnedRouter(pins))
    ids = list(res.instance_ids)
    assert [(ids[res.instance[k]], ids[res.decode_instance[k]]) for k in (0, 1)] == [("p-0", "d-1"), ("p-1", "d-1")]
    assert res.role_refused == 1 and sim._index["d-0"].incoming == 0


def test_a_kv_that_lands_during_a_switchs_delay_holds_the_switch_until_it_is_done() -> None:
    """d-0 (idle) begins its switch to PREFILL at 0.5 with a 2 s delay (the engine re-configuring). A request at
    t=1.0 is paired with it on the round of t=0: its KV is taken (a draining decoder takes a paired handoff, as
    live) and it decodes there. The switch waits until it is done and d-0 is idle again, as live's Controller does.
    Before, the role flipped at 2.5 s under the running decode."""
    from tests.test_engine_model import config as engine_config

    sim = Simulator(engine_config(pd=(2, 2), blocks=2000), router="least_outstanding", ingress_poll_s=10.0,
                    reroling=_SwitchAt([(0.5, "d-0", InstanceRole.PREFILL)]), reroling_interval_s=0.5,
                    reroling_options={"switch_delay_s": 2.0, "handoff": False})
    res = sim.run(Workload(np.array([1.0]), np.array([64]), np.array([400])))
    ids = list(res.instance_ids)
    assert ids[res.decode_instance[0]] == "d-0" and res.finish_s[0] > 2.5  # still decoding when the delay ran out
    [event] = sim.reroler.events
    assert event.done_s is not None and event.done_s >= res.finish_s[0] + 2.0, (event.done_s, res.finish_s[0])
