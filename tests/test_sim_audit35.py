"""The simulator against the live path: policy ticks, migration aborts, bad workloads (audit, session 35).
Each test but the first failed before its fix."""

from __future__ import annotations

import asyncio
import dataclasses

import numpy as np
import pytest

from bench.loadgen import cluster_config
from scheduler.policy.scaling import ScaleDecision
from sim.commands import simulate_main
from sim.simulator import Simulator, Workload
from tests.test_engine_model import GPU, config
from tests.test_sim_migration import AllToFirst, MoveAt


@pytest.fixture(scope="module")
def two_mixed():
    return config(2, blocks=2000)


@pytest.fixture(scope="module")
def one_request():
    """A 4000-token prompt decoding 60 tokens on instance 0 of ``two_mixed``: a move planned at 1.2 s commits, one
    at 1.319 s aborts (the request finishes on its source during the pre-copy)."""
    return Workload(np.array([0.0]), np.array([4000]), np.array([60]))


def test_an_aborted_move_leaves_the_request_running_on_its_source(two_mixed, one_request) -> None:
    """Guard (held before this audit): as the live driver, an aborted move -- the destination refusing, or the request
    finishing on its source during the pre-copy -- leaves it running on the source untouched: same first token and
    finish as a run without the move, nothing re-queued, no reservation left behind."""
    alone = Simulator(two_mixed, router=AllToFirst()).run(one_request)
    for t, committed in ((1.2, True), (1.319, False)):
        sim = Simulator(two_mixed, router=AllToFirst(), migration=MoveAt(t), migration_interval_s=0.01)
        res = sim.run(one_request)
        assert res.migrations == committed and sim.migrations.aborted_src == (not committed)
        if not committed:
            # (to float rounding: the handshake turned the source's closed-form span into steps)
            assert res.first_token_s[0] == alone.first_token_s[0]
            assert res.finish_s[0] == pytest.approx(alone.finish_s[0], rel=1e-12)
            assert res.preemptions[0] == 0 and res.decode_instance[0] == -1
        assert [x.engine.prefill_blocks for x in sim.instances] == [0, 0]


class _DrainTheDestination:
    """Scale-down naming the destination of the first migration in flight (a least-loaded pick would: a reservation
    holds no request)."""

    def __init__(self) -> None:
        self.sim: Simulator | None = None
        self.done = False

    def pool_of(self, snap) -> str:
        return "p"

    def decide(self, view, now, observed) -> list[ScaleDecision]:
        moving = self.sim.migrations.in_flight if self.sim.migrations is not None else {}
        if self.done or not moving:
            return []
        self.done = True
        return [ScaleDecision("p", delta=-1, drain=(next(iter(moving.values())).dst.instance_id,))]


def test_an_aborted_move_into_a_drained_destination_lets_it_go(two_mixed, one_request) -> None:
    """An instance drained while a migration's reservation was on it stayed alive to the run's end when the move
    aborted: freeing the reservation woke nothing (a draining instance is removed when it runs dry, and it had
    nothing to run), so its GPU time counted to the makespan."""
    pol = _DrainTheDestination()
    sim = Simulator(
        two_mixed,
        router=AllToFirst(),
        migration=MoveAt(1.319),
        migration_interval_s=0.01,
        scaling=pol,
        scaling_interval_s=0.001,
        scaling_startup_s=0.0,
    )
    pol.sim = sim
    res = sim.run(one_request)
    assert pol.done and sim.migrations.aborted_src == 1 and sim.instances[1].draining
    assert sim.scaler.removed == 1
    assert res.instance_stopped_s[1] < res.makespan_s - 0.005


class _ByIndex:
    """Request 0 to the first instance, the others to the second."""

    name = "by_index"
    needs_request_detail = False

    def route(self, request, view):
        from scheduler.policy.route import RouteDecision

        return RouteDecision(view.instances[0 if request.request_id == "0" else 1].instance_id)

    def on_routed(self, *a) -> None:
        pass

    def on_finished(self, *a) -> None:
        pass


class _MoveAtOrStop(MoveAt):
    def plan(self, view, now_s: float) -> list:
        assert now_s < 60.0, "the run did not end"  # it is over by ~1.4 s of simulated time
        return super().plan(view, now_s)


def test_a_prompt_a_reservation_held_back_runs_once_the_move_aborts() -> None:
    """A prompt routed to an idle destination that its migration reservation left without room waited; when the
    move aborted (its request finished on the source during the pre-copy), freeing the blocks woke nothing: the
    prompt waited for good and the run never ended (the policy ticks go on while an engine has work)."""
    cfg = config(2, blocks=200)
    # Request 0 (2000 + 60 tokens) on instance 0, a move of it planned at 1.08 s reserves 133 of instance 1's 200
    # blocks; request 1 (1500 tokens: 94 blocks) lands there at 1.09 s; request 0 ends at 1.12 s, mid pre-copy.
    w = Workload(np.array([0.0, 1.09]), np.array([2000, 1500]), np.array([60, 10]))
    sim = Simulator(cfg, router=_ByIndex(), migration=_MoveAtOrStop(1.08), migration_interval_s=0.01)
    res = sim.run(w)
    assert sim.migrations.aborted_src == 1 and res.migrations == 0
    assert res.first_token_s[1] < res.finish_s[0] + 0.2 and np.isfinite(res.finish_s[1])


def test_a_prompt_a_reservation_held_back_on_a_busy_destination_runs_at_the_next_step() -> None:
    """As above with the destination decoding a long request (a closed-form span in flight, planned while the
    reservation held the blocks): the freed blocks waited for the span's end, the prompt's first token came at
    10.5 s instead of 1.3 s."""
    cfg = config(2, blocks=200)
    w = Workload(np.array([0.0, 0.0, 1.09]), np.array([2000, 400, 1500]), np.array([60, 1500, 10]))
    sim = Simulator(cfg, router=_ByIndex(), migration=_MoveAtOrStop(1.08), migration_interval_s=0.01)
    res = sim.run(w)
    assert sim.migrations.aborted_src == 1 and res.migrations == 0
    assert res.first_token_s[2] < res.finish_s[0] + 0.2


class _CountScaling:
    def __init__(self) -> None:
        self.ticks: list[float] = []

    def pool_of(self, snap) -> str:
        return snap.role.value

    def decide(self, view, now, observed) -> list:
        self.ticks.append(now)
        return []


class _CountReroling:
    def __init__(self) -> None:
        self.ticks: list[float] = []

    def propose(self, view, now) -> list:
        self.ticks.append(now)
        return []


@pytest.mark.parametrize("kind", ["scaling", "reroling"])
def test_scaling_and_reroling_ticks_go_on_through_a_handoff(kind: str) -> None:
    """Their ticks went on only while an engine was busy: a tick during a P->D handoff after the last arrival (no
    engine busy, KV on its way) ended them for good -- here one tick in a 5.5 s run, the decode leg unwatched (a
    scale-down, a switch's hand-off never came)."""
    cfg = cluster_config("audit35-pd", mixed=0, prefill=1, decode=1)
    pol = _CountScaling() if kind == "scaling" else _CountReroling()
    sim = Simulator(cfg, **{kind: pol, f"{kind}_interval_s": 0.25})
    # An 8000-token prompt: its prefill ends at ~0.22 s, its KV lands ~0.17 s later, past the 0.25 s tick.
    res = sim.run(Workload(np.array([0.0]), np.array([8000]), np.array([400])))
    assert res.kv_transfers == 1
    assert len(pol.ticks) >= res.finish_s[0] / 0.25 - 1


@pytest.mark.parametrize("column", ["prompt_tokens", "output_tokens"])
def test_a_workload_with_a_zero_token_request_is_refused_naming_it(two_mixed, column: str) -> None:
    """A 0-token prompt or output ran, and the engine refused the request at its arrival: counted as rejected, as one
    too long for the cluster, with nothing naming it. A ``Trace`` refuses it; a ``Workload`` now does too."""
    cols = {"prompt_tokens": np.array([100, 100]), "output_tokens": np.array([5, 5])}
    cols[column][1] = 0
    with pytest.raises(ValueError, match=rf"workload\.{column}\[1\]: .*0 tokens"):
        Workload(np.array([0.0, 1.0]), cols["prompt_tokens"], cols["output_tokens"])


def test_simulate_says_how_many_trace_rows_it_dropped(tmp_path, capsys) -> None:
    """The loaders drop rows with 0 prompt or output tokens (documented, counted in ``Trace.skipped_rows``), but
    ``llmsched simulate`` said nothing: the replay ran fewer requests than the file's rows, silently."""
    path = tmp_path / "azure.csv"
    path.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n0.0,100,5\n0.5,0,5\n1.0,120,0\n1.5,90,7\n")
    assert simulate_main(["--quiet", "--trace", str(path)]) == 0
    err = capsys.readouterr().err
    assert "2 row(s) with 0 prompt or 0 output tokens dropped" in err


def test_a_moves_stop_and_copy_follows_the_live_drivers_stages(two_mixed) -> None:
    """The live driver pre-copies every stage, the one at or under ``last_stage_max_tokens`` too, and stops for what
    the request made during the last (a token or two); a context of at most that limit is not pre-copied. The
    simulator took the last stage for the stop (a 4000-token context over a 2 GB/s link: stages [4000, 63], a
    16.8 ms downtime where live pauses for ~1 token's 0.3 ms), and pre-copied a small context (its stop a token's
    copy, 41 us, where live copies the ~45 tokens, 0.75 ms)."""
    slow = two_mixed.model_copy(update={"gpus": {"a100": GPU.model_copy(update={"network_gbps": 2.0})}})
    for cfg, prompt, t in ((slow, 4000, 1.0), (two_mixed, 30, 0.065)):
        sim = Simulator(cfg, router=AllToFirst(), migration=MoveAt(t), migration_interval_s=0.01)
        res = sim.run(Workload(np.array([0.0]), np.array([prompt]), np.array([300])))
        m, (src, dst) = sim.migrations, sim.instances
        assert res.migrations == 1
        if prompt > m.last_stage_max_tokens:
            assert m.downtime_s[0] <= m._xfer(src, dst, 2)
        else:
            assert m.downtime_s[0] >= m._xfer(src, dst, prompt + 1)


class _AddOne:
    def __init__(self) -> None:
        self.done = False

    def pool_of(self, snap) -> str:
        return "p"

    def decide(self, view, now, observed) -> list[ScaleDecision]:
        if self.done:
            return []
        self.done = True
        return [ScaleDecision("p", delta=1)]


def test_an_instance_started_mid_run_draws_host_noise_as_its_siblings() -> None:
    """The host-noise draws (a measured profile's spread) covered the instances built at the start only: one an
    autoscaler started stepped undrawn, here 3x faster than its sibling on the same 3x host (TTFT 39 ms vs 118)."""
    cfg = cluster_config("audit35-noise", mixed=1)
    sim = Simulator(
        cfg, router="round_robin", scaling=_AddOne(), scaling_interval_s=0.25, scaling_startup_s=0.0
    )
    for x in sim.instances:
        x.latency = dataclasses.replace(x.latency, host_noise=(3.0,))
    sim._noisy = list(sim.instances)
    arrival = np.array([0.0, 1.0, 1.5])
    res = sim.run(Workload(arrival, np.full(3, 512), np.full(3, 4)))
    assert list(res.instance) == [0, 1, 0]  # the second request on the started instance
    ttft = res.first_token_s - arrival
    assert ttft[1] == pytest.approx(ttft[2], rel=1e-9)


def test_the_simulated_engine_waits_rather_than_spins_while_a_reservation_keeps_a_prompt_out() -> None:
    """The live simulated backend's engine loop stepped again at once after a step that scheduled nothing: a prompt
    that a migration's reservation left without room, nothing running, made it spin -- 20k empty steps in 0.2 s,
    a core of the shared host, until the reservation went. It waits for a change now: the freed reservation, and
    a queued request aborted (the one behind it may fit), wake it."""
    from scheduler.config.models import EngineSpec
    from scheduler.engine.base import EngineRequest, SamplingParams
    from scheduler.engine.simulated_backend import SimulatedBackend
    from tests.test_engine_model import MODEL

    async def scenario() -> None:
        eng = EngineSpec(block_size=16, max_num_batched_tokens=512, max_num_seqs=8, num_kv_blocks=100)
        b = SimulatedBackend(MODEL, GPU, engine=eng, time_scale=0.0)
        await b.start()
        steps = 0
        step = b.engine.step

        def counting(**kw):
            nonlocal steps
            steps += 1
            return step(**kw)

        b.engine.step = counting
        try:
            assert await b.reserve_kv("moving", 80 * 16) is None  # 80 of 100 blocks
            big = b.generate(
                EngineRequest("big", tuple(range(1, 501)), SamplingParams(max_tokens=3))
            )  # 32 blocks
            small = b.generate(
                EngineRequest("small", tuple(range(1, 101)), SamplingParams(max_tokens=3))
            )  # 7
            await asyncio.sleep(0.2)
            assert steps <= 3  # FCFS: the small one waits behind the big one
            await b.abort("big")  # the small one fits now
            assert [c async for c in small][-1].finish_reason == "length"
            assert [c async for c in big][-1].finish_reason == "abort"
            again = b.generate(EngineRequest("big2", tuple(range(1, 501)), SamplingParams(max_tokens=3)))
            await asyncio.sleep(0.05)
            await b.cancel_incoming("moving")  # the reservation goes: it fits
            chunks = await asyncio.wait_for(_collect(again), 5.0)
            assert chunks[-1].finish_reason == "length"
        finally:
            await b.shutdown()

    asyncio.run(scenario())


async def _collect(stream) -> list:
    return [c async for c in stream]


def test_a_moves_stages_are_sized_at_the_speed_the_source_runs(two_mixed, monkeypatch) -> None:
    """The live driver's stages are what the request made during the previous one, at the speed it ran. The
    simulator sized them from the source's uncontended step time: on a 3x host (``host_noise``) at 60 tokens/s
    where the request made 20 (over a 2 GB/s link: a second stage of 64 tokens where it made 22)."""
    import sim.migration

    rates: list[float] = []
    stages = sim.migration.migration_stages

    def spy(*a, **kw):
        rates.append(kw["decode_rate_tok_s"])
        return stages(*a, **kw)

    monkeypatch.setattr(sim.migration, "migration_stages", spy)
    for noise in (1.0, 3.0):
        # (at 2 s: decoding on the 3x host too, its 4000-token prefill ends at 1.3 s)
        s = Simulator(two_mixed, router=AllToFirst(), migration=MoveAt(2.0), migration_interval_s=0.01)
        for x in s.instances:
            x.latency = dataclasses.replace(x.latency, host_noise=(noise,))
        s._noisy = list(s.instances)
        assert s.run(Workload(np.array([0.0]), np.array([4000]), np.array([600]))).migrations == 1
    assert rates[1] == pytest.approx(rates[0] / 3, rel=0.02)
