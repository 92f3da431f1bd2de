"""The Controller's refresh / reconcile loop: releases off the loop's path, and its races with admin calls. Each test
failed before its fix. No Ray: the fake Controller of ``tests/test_controller_audit.py`` (fake instance handles)
with its real ``_release``, ``ray.kill`` and the placement-group removal recorded."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

import scheduler.control.controller as controller_mod
from scheduler.core.types import InstanceRole, InstanceSnapshot
from tests.test_controller_audit import FakeInstance, _controller


class Broken(FakeInstance):
    """Reports itself hung (its watchdog) and never finishes ``shutdown`` (a blocked actor)."""

    shutdowns = 0

    async def _snapshot(self) -> InstanceSnapshot:
        return InstanceSnapshot(self.iid, InstanceRole.MIXED, num_running=1, healthy=False)

    async def _shutdown(self, broken: str | None = None) -> None:
        self.shutdowns += 1
        await asyncio.sleep(3600)


class Healthy(FakeInstance):
    async def _shutdown(self, broken: str | None = None) -> None:
        return None


@pytest.fixture
def kills(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[str]]:
    """``ray.kill`` and ``remove_instance_pg`` recorded; releases wait at most 0.3 s for ``Instance.shutdown``."""
    out: dict[str, list[str]] = {"killed": [], "removed": []}
    monkeypatch.setattr(controller_mod.ray, "kill", lambda h, no_restart=True: out["killed"].append(h.iid))
    monkeypatch.setattr(controller_mod, "remove_instance_pg", lambda cluster, iid: out["removed"].append(iid))
    monkeypatch.setattr(controller_mod, "RELEASE_TIMEOUT_S", 0.3, raising=False)
    return out


def _real_release(insts: list[FakeInstance], pools: dict[str, int]) -> Any:
    ctrl = _controller(insts, pools)
    del ctrl._release  # the real one: shuts the actor down (bounded), kills it, removes its group
    ctrl.cluster, ctrl.namespace = "audit", "llmsched"
    return ctrl


def test_a_broken_instances_release_does_not_hold_the_controllers_loop(kills: dict[str, list[str]]) -> None:
    """Two hung instances whose actors do not answer ``shutdown``: the refresh that found them released them inline,
    under the Controller's lock, waiting 5 s for each -- 10 s in which no death was noticed, no replacement started,
    no policy ran and admin calls (``scale``, ``release``) waited for the lock. Now each leaves the membership and
    the view at once, its shutdown, kill and group removal run in a tracked task, the replacements start at once,
    and a second release of the same instance is a no-op."""
    b1, b2 = Broken("mixed-1"), Broken("mixed-2")
    ctrl = _real_release([Healthy("mixed-0"), b1, b2], {"mixed": 3})
    created: list[str] = []

    async def _create(pool: Any, iid: str) -> None:
        created.append(iid)
        ctrl._pending.pop(iid, None)

    ctrl._create = _create

    async def run() -> None:
        t0 = time.monotonic()
        await asyncio.wait_for(ctrl._refresh(), 2.0)
        assert time.monotonic() - t0 < 0.25  # not the releases' wait
        assert list(ctrl._members) == ["mixed-0"]
        assert [s.instance_id for s in (await ctrl.view()).instances] == ["mixed-0"]
        assert kills["killed"] == []  # still shutting down
        await asyncio.wait_for(ctrl.scale("mixed", 3), 0.25)  # the admin call is not held; replacements start
        assert sorted(created) == ["mixed-3", "mixed-4"]
        await ctrl._replace("mixed-1", "again")  # no double release
        await ctrl._refresh()
        assert (b1.shutdowns, b2.shutdowns) == (1, 1)
        await asyncio.sleep(0.5)  # past RELEASE_TIMEOUT_S: killed anyway
        assert sorted(kills["killed"]) == sorted(kills["removed"]) == ["mixed-1", "mixed-2"]
        assert not ctrl._releasing

    asyncio.run(run())


def test_shutdown_during_a_release_still_kills_the_instance(
    kills: dict[str, list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``Controller.shutdown`` while the loop was releasing a hung instance cancelled the loop, and with it the
    release in its wait for ``Instance.shutdown``: the instance had already left the membership, so the teardown
    did not release it either -- its detached actor and placement group (its GPUs) were left behind for good."""
    from ray.experimental import internal_kv

    monkeypatch.setattr(internal_kv, "_internal_kv_del", lambda *a, **kw: None)
    ctrl = _real_release([Healthy("mixed-0"), Broken("mixed-1")], {"mixed": 2})
    ctrl._scaling_task = None

    async def run() -> None:
        ctrl._loop_task = asyncio.create_task(ctrl._refresh())  # the loop, in the round that releases mixed-1
        await asyncio.sleep(0.1)
        await asyncio.wait_for(ctrl.shutdown(), 5.0)

    asyncio.run(run())
    assert sorted(kills["killed"]) == sorted(kills["removed"]) == ["mixed-0", "mixed-1"]


def test_a_snapshot_that_arrives_after_the_instance_was_released_does_not_bring_it_back() -> None:
    """A refresh round waits for every instance's snapshot (up to 2 s for a slow one); an instance released in the
    meantime (the scaling loop's drained release, an admin release) had its answered snapshot put back into the
    Controller's view -- for good, nothing removed it again: a ghost the migration policy planned with, counted
    by ``view()``."""

    class Slow(FakeInstance):
        async def _snapshot(self) -> InstanceSnapshot:
            await asyncio.sleep(0.3)
            return await super()._snapshot()

    ctrl = _controller([FakeInstance("mixed-0"), FakeInstance("mixed-1"), Slow("mixed-2")], {"mixed": 3})

    async def run() -> list[str]:
        rnd = asyncio.create_task(ctrl._refresh())
        await asyncio.sleep(0.1)  # mixed-0 answered; the round waits for mixed-2
        assert await ctrl.release("mixed-0")
        await rnd
        return [s.instance_id for s in (await ctrl.view()).instances]

    assert asyncio.run(run()) == ["mixed-1", "mixed-2"]


def test_an_admin_scale_down_calls_off_instances_still_being_placed() -> None:
    """A pool asked to grow to 3 on a cluster with no room (the placement groups never become ready), then
    Scale(mixed, 1): the reconcile loop chose the newest as extras -- the two being placed -- but only released
    members, so both creations went on (to start only to be released, or to wait for good), and the admin call,
    which waits for the creations in flight, never returned. They are called off now (newest first), as the scaling
    loop's scale-down does."""
    ctrl = _controller([FakeInstance("mixed-0")], {"mixed": 1})
    cancelled: list[str] = []

    async def never_placed(pool: Any, iid: str) -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.append(iid)
            raise
        finally:
            ctrl._pending.pop(iid, None)

    ctrl._create = never_placed

    async def run() -> None:
        await ctrl._set_desired("mixed", 3)
        await ctrl._reconcile(wait=False)
        await asyncio.sleep(0.05)  # both waiting for their placement groups
        assert sorted(ctrl._pending) == ["mixed-1", "mixed-2"]
        await ctrl._set_desired("mixed", 2)  # the newest first
        await ctrl._reconcile(wait=False)
        await asyncio.sleep(0)
        assert list(ctrl._pending) == ["mixed-1"] and cancelled == ["mixed-2"]
        await asyncio.wait_for(ctrl.scale("mixed", 1), 1.0)
        await asyncio.sleep(0)
        assert not ctrl._pending and cancelled == ["mixed-2", "mixed-1"]
        assert list(ctrl._members) == ["mixed-0"] and ctrl._desired == {"mixed": 1}

    asyncio.run(run())


def test_an_instance_released_during_its_role_switch_does_not_come_back_as_a_member() -> None:
    """The scaling loop's ``RoleSwitcher.advance`` waits for ``set_role`` (up to 5 s), then writes the instance's
    new record into the membership; an instance released meanwhile (an admin release, or the refresh found it
    broken) came back as a member whose actor was being killed: the ingresses were handed it and its pool counted
    it until a later refresh saw it dead."""
    from tests.test_controller_audit import _switch_ran_dry

    gate = asyncio.Event()

    class SlowSwitch(FakeInstance):
        async def _set_role(self, role: Any) -> Any:
            await gate.wait()
            return await super()._set_role(role)

    p0 = SlowSwitch("prefill-0", InstanceRole.PREFILL)
    ctrl = _controller([p0, FakeInstance("prefill-1", InstanceRole.PREFILL)], {"prefill": 2})

    async def run() -> None:
        await _switch_ran_dry(ctrl)
        advancing = asyncio.create_task(ctrl._switcher.advance())
        await asyncio.sleep(0.05)  # in set_role
        assert await ctrl.release("prefill-0")
        gate.set()
        await advancing
        assert list(ctrl._members) == ["prefill-1"]
        assert not ctrl._switcher.switching and ctrl._switcher.stats["switches"] == 0

    asyncio.run(run())


def test_a_restarted_controller_finishes_a_release_its_predecessor_began(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The Controller died while releasing mixed-1 (its shutdown sent, the kill not yet: up to 5 s, 1 s for an idle
    one). Its restart adopted the named, still-live actor as a member -- shut down or shutting down, its drain flag
    still on (a scale-down's release) -- which nothing tracked any more: a simulated engine's snapshots still say
    healthy and draining after its shutdown (checked), so it was never released and never served, its pool one
    short for good, and for a scale-down the reconcile released another, serving instance to match the desired
    size. The release in flight is recorded (Ray's KV, as the drains are); the restart kills that actor instead."""
    from scheduler.control.controller import Controller, instance_actor_name
    from tests.test_controller_audit import _info

    class Actor:  # a named Instance actor; ``get_info.remote()`` is its answer (``ray.get`` is the identity here)
        def __init__(self, iid: str) -> None:
            self.iid = iid
            info = _info(FakeInstance(iid), "mixed")
            self.get_info = type("Method", (), {"remote": staticmethod(lambda: info)})

    actors = {instance_actor_name("audit", f"mixed-{i}"): Actor(f"mixed-{i}") for i in range(2)}
    named = [{"name": n, "namespace": "llmsched"} for n in actors]
    killed: list[str] = []
    monkeypatch.setattr(controller_mod.ray.util, "list_named_actors", lambda all_namespaces=True: named)
    monkeypatch.setattr(controller_mod.ray, "get_actor", lambda name, namespace=None: actors[name])
    monkeypatch.setattr(controller_mod.ray, "get", lambda ref, timeout=None: ref)
    monkeypatch.setattr(controller_mod.ray, "kill", lambda h, no_restart=True: killed.append(h.iid))
    monkeypatch.setattr(controller_mod.ray.util, "placement_group_table", dict)
    kv: dict[str, Any] = {"releasing": ["mixed-1"]}  # what the dead Controller recorded
    ctrl = Controller.__new__(Controller)  # its restart's __init__, from the adoption on
    ctrl.cluster, ctrl.namespace = "audit", "llmsched"
    ctrl._members, ctrl._adopted, ctrl._next_index, ctrl._unreported = {}, [], {"mixed": 0}, set()
    ctrl._kv_get, ctrl._kv_put = kv.get, kv.__setitem__
    ctrl._adopt()
    assert list(ctrl._members) == ["mixed-0"] and killed == ["mixed-1"]
    assert kv["releasing"] == []


def test_a_restarted_controller_releases_the_drained_instance_not_its_replacement() -> None:
    """A DrainNode of the last DECODE instance (decode-7) started its replacement ahead (decode-8), moved its
    requests over and asked for its release; the Controller was killed after the release counted decode-7 out of its
    pool (desired back to 1, its marks dropped) but before it recorded decode-7 as "releasing". The restart adopted
    both, unmarked, one over the pool's size, and its reconcile released the newest -- the replacement -- then the
    retried release took decode-7: no decoder left (CI, test_drain_node_pd). The instance says it is leaving in its
    snapshot; the reconcile waits for the adopted ones' first snapshots and releases the leaving one."""
    class Leaving(FakeInstance):
        async def _snapshot(self) -> InstanceSnapshot:
            return InstanceSnapshot(self.iid, InstanceRole.DECODE, draining=True, leaving=True)

    ctrl = _controller([Leaving("decode-7", InstanceRole.DECODE), FakeInstance("decode-8", InstanceRole.DECODE)],
                       {"decode": 1})
    ctrl._unreported = {"decode-7", "decode-8"}  # adopted by the restart; nothing heard from them yet

    async def run() -> None:
        await ctrl._reconcile(wait=False)
        assert ctrl.killed == [] and sorted(ctrl._members) == ["decode-7", "decode-8"]  # not picked blind
        await ctrl._refresh()
        await ctrl._reconcile(wait=False)

    asyncio.run(run())
    assert ctrl.killed == ["decode-7"] and list(ctrl._members) == ["decode-8"], ctrl.killed


def test_the_controllers_persisted_state_is_one_record_written_once_per_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """The state a restarted Controller reads (pool counts, drain / release / replacement marks) was one Ray-KV key
    per entry, written one after another: killed between two writes of one transition (a release counted out of
    its pool, then recorded "releasing"), the Controller restarted with a count and a mark that disagreed. Now one
    record, written once at the end of the loop step that changed it: a kill before then leaves the previous one
    whole."""
    import json

    from ray.experimental import internal_kv

    from scheduler.control.controller import Controller

    writes: list[tuple[bytes, Any]] = []
    monkeypatch.setattr(internal_kv, "_internal_kv_put",
                        lambda key, value, overwrite=True, namespace=None: writes.append((key, json.loads(value))))
    monkeypatch.setattr(internal_kv, "_internal_kv_get", lambda key, namespace=None: None)
    ctrl = Controller.__new__(Controller)
    ctrl.cluster, ctrl.namespace = "audit", "llmsched"
    ctrl._kv_put("desired", {"decode": 2})  # outside the actor's loop (``__init__``): at once
    assert writes == [(b"llmsched/audit/state", {"desired": {"decode": 2}})]

    async def step() -> None:
        ctrl._kv_put("desired", {"decode": 1})
        ctrl._kv_put("replaced_ahead", [])
        assert len(writes) == 1  # killed here: the previous record stands, whole
        await asyncio.sleep(0)

    asyncio.run(step())
    assert writes[1:] == [(b"llmsched/audit/state", {"desired": {"decode": 1}, "replaced_ahead": []})]
    assert ctrl._kv_get("desired") == {"decode": 1} and ctrl._kv_get("releasing") is None


def test_a_restart_counts_out_a_replaced_ahead_instance_that_went_meanwhile_and_keeps_operator_drains() -> None:
    """A DrainNode started decode-8 ahead of decode-7 (the pool's count raised to 2), then decode-7 died while no
    Controller ran: the restart dropped its mark (only adopted instances kept theirs) without counting it out, so
    the pool stayed at 2 for good. And an operator's drain of an adopted instance came back only with the scaling
    loop (a deployment without one lost it). Both are read with the adoption now."""
    from scheduler.control.controller import Controller

    kv: dict[str, Any] = {"replaced_ahead": ["decode-7", "prefill-1"], "operator_draining": ["prefill-1"]}
    ctrl = Controller.__new__(Controller)
    ctrl._members = {"decode-8": object(), "prefill-1": object()}  # adopted; decode-7 is gone
    ctrl._desired = {"decode": 2, "prefill": 2}
    ctrl._replaced_ahead, ctrl._operator_drained = set(), set()
    ctrl._kv_get, ctrl._kv_put = kv.get, kv.__setitem__
    ctrl.config = type("C", (), {"pools": []})()
    ctrl._restore_marks()
    assert ctrl._desired == {"decode": 1, "prefill": 2} and kv["desired"] == {"decode": 1, "prefill": 2}
    assert ctrl._replaced_ahead == {"prefill-1"} and kv["replaced_ahead"] == ["prefill-1"]
    assert ctrl._operator_drained == {"prefill-1"}


def test_a_restart_counts_out_a_scale_down_whose_instance_went_meanwhile() -> None:
    """The scaling loop drained mixed-2 for a scale-down (3 -> 2; the count drops at its release), and mixed-2 died
    while no Controller ran: the restart dropped its drain (only adopted instances kept theirs), and the reconcile
    replaced it at the old count -- the scale-down undone. Counted out now, as its release would have."""
    ctrl = _controller([FakeInstance("mixed-0"), FakeInstance("mixed-1")], {"mixed": 3})
    ctrl._kv_get = {"draining": ["mixed-2", "mixed-1"]}.get
    ctrl._load_draining()
    assert ctrl._desired == {"mixed": 2} and list(ctrl._draining) == ["mixed-1"]
