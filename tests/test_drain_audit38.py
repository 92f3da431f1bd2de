"""An operator's drain with several ingress replicas, its loose ends (no Ray: the Controller's drain bookkeeping and
the Ingress's drain on in-process or fake instances).

1. A drain waited two registry report periods for other replicas' requests even with no other replica live.
2. Its waits and retries are ``config.drain`` (they were constants).
3. A policy plan that moved a request the drain had to move was counted by the policy, not the drain, and the drain
   planned the same request again.
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
from scheduler.control.registry import EntryTable, RegistryEntry
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


def _controller(monkeypatch: pytest.MonkeyPatch, *, aged: bool = True) -> Controller:
    """The Controller's migration side alone (its registry, plans, drain state); ``aged``: its registry is older
    than ``PLAN_TTL_S`` (not a just-restarted Controller's)."""
    monkeypatch.setattr(Controller, "_ensure_loop", lambda self: None)
    ctrl = Controller.__new__(Controller)
    ctrl._registry, ctrl._plans, ctrl._migration = EntryTable(), {}, None
    if aged:
        ctrl._registry._born -= PLAN_TTL_S
    ctrl.migration_stats = {"planned": 0, "dropped": 0, "committed": 0, "failed": 0}
    ctrl._init_drain_moves(DrainSpec())
    return ctrl


# ---- 1 ------------------------------------------------------------------------------------------------------------
def test_drain_moves_says_whether_another_ingress_is_live(monkeypatch: pytest.MonkeyPatch) -> None:
    """``drain_moves`` tells the drain's ingress whether any other replica polled within ``PLAN_TTL_S`` -- and not
    that none did while its registry is younger than that (a restarted Controller has not heard from them yet)."""
    ctrl = _controller(monkeypatch)
    ctrl._registry.apply("A", [RegistryEntry("a", "A", ("d",), 5, Phase.DECODE)], [], full=True)
    ctrl._registry.apply("G", [], [], full=True, now=time.monotonic() - PLAN_TTL_S)  # gone: silent since
    assert asyncio.run(ctrl.drain_moves("d", "A")) == (0, 0, True)
    asyncio.run(ctrl.take_migrations("B"))  # B polls: live, with nothing on the instance
    assert asyncio.run(ctrl.drain_moves("d", "A")) == (0, 0, False)

    young = _controller(monkeypatch, aged=False)
    young._registry.seen("A")
    assert asyncio.run(young.drain_moves("d", "A")) == (0, 0, False)


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
    with none live (``drain_moves``' third answer) there is nothing to wait for. With one, the wait stays."""
    alone = _timed_drain(_peers_ctrl((0, 0, True)))
    assert alone < 0.2, alone
    others = _timed_drain(_peers_ctrl((0, 0, False)))
    assert others >= 0.4, others


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
    assert asyncio.run(ctrl.drain_moves("d", "A")) == (0, 3, False)  # each counted once

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
