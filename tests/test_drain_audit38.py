"""An operator's drain with several ingress replicas, its loose ends (no Ray: the Controller's drain bookkeeping and
the Ingress's drain on in-process or fake instances).

1. A drain waited two registry report periods for other replicas' requests even with no other replica live.
2. Its waits and retries are ``config.drain`` (they were constants).
3. A policy plan that moved a request the drain had to move was counted by the policy, not the drain, and the drain
   planned the same request again.
4. The drain took the registry as complete two report periods after it began: a replica whose report came later
   (a loaded host) had its streams released under it and re-prefilled. It now waits until every live replica has
   polled twice since it began (each poll flushes that replica's unreported changes first).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from scheduler.config.load import ConfigError, load_config, parse_config
from scheduler.config.models import DrainSpec
from scheduler.control.api import GenerateRequest
from scheduler.control.controller import Controller
from scheduler.control.controller_migration import PLAN_TTL_S
from scheduler.control.registry import EntryTable, RegistryEntry, RequestRecord
from scheduler.core.types import ClusterView, InstanceRole, InstanceSnapshot, Phase
from scheduler.engine.base import SamplingParams, TokenChunk
from scheduler.policy.migration import MigrationPlan, MigrationPolicy, MigrationReason
from tests.test_ingress_audit import FakeInstance, _consume, _ingress, _Method, _until
from tests.test_migration_audit import drain_pair, set_routable


class _Planner(MigrationPolicy):
    """A migration policy that plans what the test gives it, and records what the Controller tells it."""

    def __init__(self) -> None:
        self.next: list[MigrationPlan] = []
        self.dropped: list[str] = []
        self.done: list[tuple[str, bool]] = []

    def plan(self, view: ClusterView, now_s: float) -> list[MigrationPlan]:
        out, self.next = self.next, []
        return out

    def on_migration_done(self, request_id: str, *, ok: bool) -> None:
        self.done.append((request_id, ok))

    def on_migration_dropped(self, request_id: str) -> None:
        self.dropped.append(request_id)


def _controller(monkeypatch: pytest.MonkeyPatch) -> Controller:
    """The Controller's migration side alone (its registry, plans, drain state)."""
    monkeypatch.setattr(Controller, "_ensure_loop", lambda self: None)
    ctrl = Controller.__new__(Controller)
    ctrl._registry, ctrl._plans, ctrl._migration = EntryTable(), {}, None
    ctrl.migration_stats = {"planned": 0, "dropped": 0, "committed": 0, "failed": 0}
    ctrl._init_drain_moves(DrainSpec())
    return ctrl


# ---- 1 ------------------------------------------------------------------------------------------------------------
def test_drain_moves_says_whether_another_ingress_is_live(monkeypatch: pytest.MonkeyPatch) -> None:
    """``drain_moves`` tells the drain's ingress whether every other replica live (polled within ``PLAN_TTL_S``)
    has polled twice since the drain began -- at once with none live; while its registry is younger than that (a
    restarted Controller), each heard from so far."""
    ctrl = _controller(monkeypatch)
    ctrl._registry.apply("A", [RegistryEntry("a", "A", ("d",), 5, Phase.DECODE)], [], full=True)
    ctrl._registry.apply("G", [], [], full=True, now=time.monotonic() - PLAN_TTL_S)  # gone: silent since
    assert asyncio.run(ctrl.drain_moves("d", "A")) == (0, 0, True)
    ctrl._end_drain_moves("d")
    asyncio.run(ctrl.take_migrations("B"))  # B polls: live, with nothing on the instance
    asyncio.run(ctrl.take_migrations("B"))  # (before the drain: proves nothing of what it sent since)
    assert asyncio.run(ctrl.drain_moves("d", "A")) == (0, 0, False)
    asyncio.run(ctrl.take_migrations("B"))
    assert asyncio.run(ctrl.drain_moves("d", "A")) == (0, 0, False)  # its flush may predate the drain
    asyncio.run(ctrl.take_migrations("B"))
    assert asyncio.run(ctrl.drain_moves("d", "A")) == (0, 0, True)

    # A Controller restarted less than PLAN_TTL_S ago waits for the replicas heard from so far.
    young = _controller(monkeypatch)  # (a fresh registry: as just restarted)
    young._registry.seen("A")
    asyncio.run(young.take_migrations("B"))
    assert asyncio.run(young.drain_moves("d", "A")) == (0, 0, False)
    asyncio.run(young.take_migrations("B"))
    asyncio.run(young.take_migrations("B"))
    assert asyncio.run(young.drain_moves("d", "A")) == (0, 0, True)


def test_a_replica_closed_and_started_again_counts_as_heard_after_two_polls(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A replica that closes (``Controller.ingress_closed``) and starts again under the same id, during a drain, is
    heard from once it has polled twice since. Before, its poll count began again at 0, below the drain's count of
    it from before the close: the drain took it as silent until it had polled as often again (``peer_wait_s``)."""
    ctrl = _controller(monkeypatch)
    for _ in range(6):
        asyncio.run(ctrl.take_migrations("B"))  # B has run a while
    assert asyncio.run(ctrl.drain_moves("d", "A")) == (0, 0, False)
    asyncio.run(ctrl.ingress_closed("B"))
    assert asyncio.run(ctrl.drain_moves("d", "A")) == (0, 0, True)  # gone: not waited for
    ctrl._registry.apply("B", [], [], full=True)  # started again: it reports first (``report_requests``)
    assert asyncio.run(ctrl.drain_moves("d", "A")) == (0, 0, False)
    asyncio.run(ctrl.take_migrations("B"))
    asyncio.run(ctrl.take_migrations("B"))
    assert asyncio.run(ctrl.drain_moves("d", "A")) == (0, 0, True)


def _peers_ctrl(answer: tuple[int, int, bool]) -> Any:
    calls: list[str] = []

    async def ok(*a: Any, **kw: Any) -> bool:
        calls.append("admin")
        return True

    async def drain_moves(iid: str, ingress_id: str) -> tuple[int, int, bool]:
        calls.append("drain_moves")
        return answer

    class Ctrl:
        pass

    Ctrl.set_draining = Ctrl.release = _Method(ok)  # type: ignore[attr-defined]
    Ctrl.drain_moves = _Method(drain_moves)  # type: ignore[attr-defined]
    ctrl = Ctrl()
    ctrl.calls = calls  # type: ignore[attr-defined]
    return ctrl


def _timed_drain(ctrl: Any, **drain: float) -> float:
    async def scenario() -> float:
        ing = _ingress([FakeInstance("mixed-0"), FakeInstance("mixed-1")], controller=ctrl)
        ing.config = ing.config.model_copy(update={"drain": DrainSpec(**drain)})
        t0 = time.monotonic()
        assert await asyncio.wait_for(ing.drain("mixed-0"), 5.0) == 0
        return time.monotonic() - t0

    return asyncio.run(scenario())


def test_a_drain_with_no_other_ingress_live_does_not_wait_for_their_reports() -> None:
    """Every drain waited two report periods (2 x 0.2 s) for requests of other replicas to show in the registry;
    with every other live replica heard from (``drain_moves``' third answer; none live: at once) there is nothing to
    wait for. Until then it waits, ``peer_wait_s`` at most."""
    alone = _timed_drain(_peers_ctrl((0, 0, True)))
    assert alone < 0.2, alone
    others = _timed_drain(_peers_ctrl((0, 0, False)), peer_wait_s=0.6)
    assert others >= 0.6, others


# ---- 2 ------------------------------------------------------------------------------------------------------------
def test_drain_settings_are_validated_naming_the_field() -> None:
    base = load_config("default").model_dump(mode="json", exclude={"gpus", "drain"})
    assert parse_config(base).drain == DrainSpec(switch_wait_s=30.0, peer_wait_s=30.0, move_tries=20)
    cfg = parse_config({**base, "drain": {"peer_wait_s": 5, "move_tries": 3}})
    assert (cfg.drain.peer_wait_s, cfg.drain.move_tries, cfg.drain.switch_wait_s) == (5.0, 3, 30.0)
    for bad, field in (({"peer_wait_s": -1}, "drain.peer_wait_s"), ({"switch_wait_s": "soon"}, "drain.switch_wait_s"),
                       ({"move_tries": 0}, "drain.move_tries"), ({"tries": 3}, "drain.tries")):
        with pytest.raises(ConfigError, match=field.replace(".", r"\.")) as e:
            parse_config({**base, "drain": bad})
        if "tries" in bad:
            assert "allowed: switch_wait_s, peer_wait_s, move_tries" in str(e.value)


def test_drain_waits_for_other_ingresses_at_most_peer_wait_s() -> None:
    """A request of another replica that never moves off held the drain 30 s (a constant); ``peer_wait_s`` now."""
    took = _timed_drain(_peers_ctrl((1, 0, False)), peer_wait_s=0.3)
    assert 0.3 <= took < 1.5, took


def test_drain_waits_for_its_streams_to_switch_at_most_switch_wait_s() -> None:
    """A committed move whose stream never switches over held the drain 30 s (a constant); ``switch_wait_s`` now."""
    ctrl = _peers_ctrl((0, 0, True))

    async def scenario() -> float:
        ing = _ingress([FakeInstance("mixed-0"), FakeInstance("mixed-1")], routable=["mixed-0"], controller=ctrl)
        ing.config = ing.config.model_copy(update={"drain": DrainSpec(switch_wait_s=0.3)})
        out: list[TokenChunk] = []
        t = asyncio.create_task(_consume(ing, GenerateRequest(
            "r", prompt="hi", sampling=SamplingParams(max_tokens=10**3)), out))
        await _until(lambda: len(out) >= 2)
        ing.registry.get("r").moving_to = "mixed-1"  # committed, its stream not switched (a slow consumer)
        t0 = time.monotonic()
        await asyncio.wait_for(ing.drain("mixed-0"), 5.0)
        took = time.monotonic() - t0
        ing.registry.get("r").moving_to = None
        t.cancel()
        await asyncio.gather(t, return_exceptions=True)
        return took

    took = asyncio.run(scenario())
    assert 0.3 <= took < 1.5, took


# ---- 3 ------------------------------------------------------------------------------------------------------------
def test_a_policy_plan_that_moves_a_request_off_a_drained_instance_is_the_drains_move(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A drain through ingress A; ingress B serves b1 and b2 on it, and the migration policy's plan of b1 (d -> x)
    is queued for B. The drain plans b2 only (b1's move is that plan: one plan for it, not two), the policy plans
    nothing more off the instance while the drain runs, and b1's commit counts as the drain's move. A policy plan
    the drain adopted that B never takes is dropped, and the drain plans its own."""
    ctrl = _controller(monkeypatch)
    pol = ctrl._migration = _Planner()
    ctrl._snapshots = {i: InstanceSnapshot(i, InstanceRole.MIXED) for i in ("d", "x")}
    ctrl._registry.apply("A", [], [], full=True)
    ctrl._registry.apply("B", [RegistryEntry(r, "B", ("d",), 5, Phase.DECODE) for r in ("b1", "b2", "b3")], [],
                         full=True)
    pol.next = [MigrationPlan("b1", "d", "x", MigrationReason.LOAD_BALANCE),
                MigrationPlan("b3", "d", "x", MigrationReason.LOAD_BALANCE)]
    ctrl._policy_tick()  # before the drain began

    def take() -> list[tuple[str, str]]:
        return sorted((p.request_id, p.destination) for p in asyncio.run(ctrl.take_migrations("B")))

    assert asyncio.run(ctrl.drain_moves("d", "A")) == (3, 0, False)
    assert take() == [("b1", "x"), ("b2", ""), ("b3", "x")]  # one plan each
    pol.next = [MigrationPlan("b2", "d", "x", MigrationReason.DRAIN)]
    ctrl._policy_tick()  # while the drain runs: dropped, the drain moves b2
    assert pol.dropped == ["b2"] and ctrl._plans == {}
    asyncio.run(ctrl.migration_done("b1", True, True))  # the policy's plan committed ...
    asyncio.run(ctrl.migration_done("b3", False, True))  # ... and aborted: the drain moves b3 itself
    assert pol.done == [("b1", True), ("b3", False)] and ctrl.migration_stats["committed"] == 1
    assert asyncio.run(ctrl.drain_moves("d", "A")) == (3, 1, False)  # b1 counted by the drain (not switched yet)
    assert take() == [("b3", "")]
    asyncio.run(ctrl.migration_done("b2", True, True, drain=True))
    asyncio.run(ctrl.migration_done("b3", True, True, drain=True))
    ctrl._registry.apply("B", [RegistryEntry(r, "B", ("x",), 9, Phase.DECODE) for r in ("b1", "b2", "b3")], [],
                         full=True)
    assert asyncio.run(ctrl.drain_moves("d", "A")) == (0, 3, True)  # each counted once (B polled twice since)

    # A policy plan queued before the drain that B never takes: dropped at its TTL, then the drain plans b4.
    ctrl._registry.apply("B", [RegistryEntry("b4", "B", ("x",), 5, Phase.DECODE)], [], full=True)
    pol.next = [MigrationPlan("b4", "x", "d", MigrationReason.LOAD_BALANCE)]
    ctrl._policy_tick()
    assert asyncio.run(ctrl.drain_moves("x", "A")) == (1, 0, False)
    ctrl._plans["B"] = [(t - PLAN_TTL_S, p) for t, p in ctrl._plans["B"]]
    ctrl._policy_tick()
    assert pol.dropped == ["b2", "b4"]
    assert asyncio.run(ctrl.drain_moves("x", "A")) == (1, 0, False) and take() == [("b4", "")]
    ctrl._end_drain_moves("x")
    ctrl._end_drain_moves("d")
    assert (ctrl._drain_moves, ctrl._drain_moved, ctrl._drains, ctrl._policy_moves) == ({}, {}, {}, {})


def test_a_policy_migration_in_flight_off_a_drained_instance_counts_as_the_drains() -> None:
    """The drain's own replica runs a policy plan's migration off the instance when the drain begins: the drain's
    own attempt is refused ("already migrating"), and the drain returned 0 moved though the request moved."""
    async def scenario() -> tuple[int, list[Any]]:
        D_inst, D, ing = await drain_pair()
        out: list[Any] = []
        errors: list[BaseException] = []

        async def consume() -> None:
            try:
                async for c in ing.generate(GenerateRequest("r", prompt_token_ids=list(range(1, 50)),
                                                            sampling=SamplingParams(max_tokens=300))):
                    out.append(c)
            except Exception as e:  # noqa: BLE001
                errors.append(e)

        async def held(fn: Any, *a: Any, **kw: Any) -> Any:  # the policy's migration is under way when the drain starts
            await _until(lambda: "mixed-0" in ing._admin_drains)
            return await fn(*a, **kw)

        t = asyncio.create_task(consume())
        await _until(lambda: len(out) >= 2)
        set_routable(ing, ["mixed-0", "mixed-1"])
        D.hooks["_migrate_reserve"] = held
        plan = asyncio.create_task(ing._execute_plan(MigrationPlan("r", "mixed-0", "mixed-1",
                                                                   MigrationReason.LOAD_BALANCE)))
        await _until(lambda: "r" in ing._migrating)
        moved = await ing.drain("mixed-0")
        await plan
        await asyncio.wait_for(t, 30)
        await D_inst.shutdown()
        assert not errors, errors
        return moved, out

    moved, out = asyncio.run(scenario())
    assert moved == 1
    assert [i for c in out for i in range(c.index, c.index + len(c.token_ids))] == list(range(300))
    assert out[-1].instance_id == "mixed-1"


# ---- 4 ------------------------------------------------------------------------------------------------------------
def test_a_drain_waits_for_a_live_replica_whose_report_comes_late(monkeypatch: pytest.MonkeyPatch) -> None:
    """Replica B (live: it polled before) has a stream decoding on the drained instance that it has not reported
    yet, and its event loop stalls: its next report and poll come three report periods after the drain began. The
    drain (through A, on the Controller's real bookkeeping) waited two periods, saw nothing of B there and released
    the instance under B's stream (re-prefilled); now it waits to hear from B, has B move the stream, and counts it.
    A replica silent for ``PLAN_TTL_S`` (gone) is not waited for."""
    ctrl = _controller(monkeypatch)
    released: list[dict[str, tuple[str, ...]]] = []  # where the registry shows B's requests at the release

    async def ok(*a: Any, **kw: Any) -> bool:
        return True

    async def release_it(iid: str, **kw: Any) -> bool:
        released.append({e.request_id: e.instances for e in ctrl._registry.entries.values() if e.ingress_id == "B"})
        return True

    class Ctrl:
        set_draining, release, drain_moves = _Method(ok), _Method(release_it), _Method(ctrl.drain_moves)

    async def replica_b(resume_s: float, stop: asyncio.Event) -> list[str]:
        """B: stalled until ``resume_s``; then, every poll period, it flushes its changes and polls for plans,
        running a drain's move of its stream to mixed-1."""
        taken: list[str] = []
        await asyncio.sleep(resume_s - time.monotonic())
        ctrl._registry.apply("B", [RegistryEntry("b1", "B", ("mixed-0",), 7, Phase.DECODE)], [], full=False)
        while not stop.is_set():
            for p in await ctrl.take_migrations("B"):
                taken.append(p.request_id)
                ctrl._registry.apply("B", [RegistryEntry(p.request_id, "B", ("mixed-1",), 9, Phase.DECODE)], [],
                                     full=False)
                await ctrl.migration_done(p.request_id, True, True, drain=True)
            await asyncio.sleep(0.05)
        return taken

    async def scenario() -> tuple[int, list[str], float]:
        ing = _ingress([FakeInstance("mixed-0"), FakeInstance("mixed-1")], controller=Ctrl())
        ing.config = ing.config.model_copy(update={"drain": DrainSpec(peer_wait_s=5.0)})
        await ctrl.take_migrations("B")  # B is live
        ctrl._registry.apply("G", [], [], full=True, now=time.monotonic() - PLAN_TTL_S)  # G is gone: never waited for
        stop = asyncio.Event()
        t0 = time.monotonic()
        b = asyncio.create_task(replica_b(t0 + 3 * ing.report_s, stop))
        moved = await asyncio.wait_for(ing.drain("mixed-0"), 10.0)
        took = time.monotonic() - t0
        stop.set()
        return moved, await b, took

    moved, taken, took = asyncio.run(scenario())
    # Old code: [{}] -- released before B's report came, under its stream (re-prefilled), nothing moved.
    assert released == [{"b1": ("mixed-1",)}], released
    assert taken == ["b1"] and moved == 1, (taken, moved)
    assert took < 2.0, took  # heard from B: not held to peer_wait_s


def test_an_ingress_flushes_its_registry_changes_before_each_plans_poll() -> None:
    """What makes two polls since a drain began prove the Controller knows an ingress's requests there: its changes
    not reported yet go first (one report at a time with the report loop's). Before, a poll came without them."""
    calls: list[tuple[str, Any]] = []

    async def report(ingress_id: str, upserts: list[RegistryEntry], removed: list[str], full: bool) -> str:
        calls.append(("report", sorted(e.request_id for e in upserts)))
        return "epoch"

    async def take(ingress_id: str) -> list[MigrationPlan]:
        calls.append(("take", None))
        return []

    class Ctrl:
        report_requests, take_migrations = _Method(report), _Method(take)

    async def scenario() -> None:
        ing = _ingress([FakeInstance("mixed-0")], controller=Ctrl())
        await ing._report()  # (the first report is the full set)
        ing.registry.add(RequestRecord("r1", (1, 2), SamplingParams(max_tokens=4), instances=("mixed-0",)))
        await ing._take_plans()
        await ing._take_plans()  # nothing new: no empty report

    asyncio.run(scenario())
    assert calls == [("report", []), ("report", ["r1"]), ("take", None), ("take", None)], calls
