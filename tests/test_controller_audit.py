"""Controller scaling / draining / re-roling bookkeeping, without Ray: the applier alone (``Controller.__new__``)
on fake instance handles whose ``.method.remote(...)`` returns a task."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace
from typing import Any

import pytest

from scheduler.config.models import DrainSpec
from scheduler.control.controller import Controller, Member
from scheduler.control.instance import InstanceInfo
from scheduler.control.registry import EntryTable, RegistryEntry
from scheduler.control.reroling import RoleSwitcher
from scheduler.core.types import InstanceRole, InstanceSnapshot, Phase
from scheduler.policy.scaling import ScaleDecision, ThresholdScaler
from tests.test_ingress_audit import _Method


class FakeInstance:
    """Ray-handle look-alike: ``set_draining`` / ``set_role``; ``late`` names calls that land but whose reply times
    out (raise TimeoutError after taking effect)."""

    def __init__(self, iid: str, role: InstanceRole = InstanceRole.MIXED, late: tuple[str, ...] = ()) -> None:
        self.iid, self.role, self.late = iid, role, set(late)
        self.draining = self.leaving = False

    def __getattr__(self, name: str) -> _Method:
        fn = getattr(type(self), "_" + name, None)
        if fn is None:
            raise AttributeError(name)
        return _Method(fn.__get__(self))

    async def _set_draining(self, flag: bool, leaving: bool = False) -> None:
        self.draining, self.leaving = flag, flag and leaving
        if "set_draining" in self.late:
            raise TimeoutError

    async def _snapshot(self) -> InstanceSnapshot:
        return _snap(self.iid, draining=self.draining, role=self.role)

    async def _set_role(self, role: Any) -> InstanceInfo:
        if "set_role" in self.late:
            raise TimeoutError
        self.role = InstanceRole.parse(role)
        return _info(self, self.iid.rsplit("-", 1)[0])


def _info(inst: FakeInstance, pool: str) -> InstanceInfo:
    return InstanceInfo(inst.iid, pool, inst.role, "cpu", 1, "m", "simulated", incarnation=inst.iid + "#1")


def _member(inst: FakeInstance, pool: str = "mixed") -> Member:
    return Member(inst, _info(inst, pool))  # type: ignore[arg-type]


def _snap(iid: str, n: int = 0, draining: bool = False, role: InstanceRole = InstanceRole.MIXED) -> InstanceSnapshot:
    return InstanceSnapshot(iid, role, num_running=n, draining=draining)


def _controller(insts: list[FakeInstance], pools: dict[str, int], *, drain_timeout_s: float = 120.0) -> Controller:
    ctrl = Controller.__new__(Controller)  # the applier alone: no Ray, no engines
    ctrl.config = SimpleNamespace(
        pools=[
            SimpleNamespace(name=p, count=n, hang_timeout_s=60.0, start_timeout_s=900.0) for p, n in pools.items()
        ]
    )
    ctrl._pools = {p.name: p for p in ctrl.config.pools}
    ctrl._members = {i.iid: _member(i, i.iid.rsplit("-", 1)[0]) for i in insts}
    ctrl._pending, ctrl._snapshots, ctrl._registry, ctrl._refresh_round = {}, {}, EntryTable(), 10
    ctrl._unreported = set()
    ctrl._releasing = {}
    ctrl._role_round = {}
    ctrl._starting, ctrl._failing, ctrl._start_failures, ctrl._probes = set(), {}, {}, {}
    ctrl._next_index = {p: n for p, n in pools.items()}
    ctrl._desired = dict(pools)
    ctrl._draining, ctrl._operator_drained, ctrl._replaced_ahead = {}, set(), set()
    ctrl._init_drain_moves(DrainSpec())
    ctrl._k8s, ctrl._k8s_shrink_due, ctrl._drain_timeout_s = None, False, drain_timeout_s
    ctrl._scaling = ThresholdScaler(min_instances=1, max_instances=4)
    ctrl._lock = asyncio.Lock()
    ctrl.scaling_stats = {"up": 0, "down": 0, "released": 0, "forced_releases": 0}
    ctrl._scaling_events = []
    ctrl.epoch = "e1"
    ctrl._kv_put = lambda name, value: None
    ctrl._ensure_loop = lambda: None
    ctrl.killed = []  # type: ignore[attr-defined]

    # The real one shuts the actor down (its streams end RELEASED, or ENGINE_FAILED when ``broken``) and removes
    # its placement group.
    async def _release(iid: str, broken: str | None = None) -> bool:
        m = ctrl._members.pop(iid, None)
        ctrl._snapshots.pop(iid, None)
        ctrl._drop_operator_drain(iid)  # as the real one does
        if m is None:
            return False
        ctrl.killed.append(iid)  # type: ignore[attr-defined]
        return True

    async def _create(pool: Any, iid: str) -> None:
        ctrl._pending.pop(iid, None)

    ctrl._release, ctrl._create = _release, _create
    ctrl._switcher = RoleSwitcher(ctrl, None)
    return ctrl


def test_end_drain_whose_reply_is_late_does_not_leave_the_instance_to_be_force_released() -> None:
    """A scale-up's set_draining(False) that landed but timed out left the instance in _draining while routable,
    and its deadline force-released it with running requests."""
    insts = [FakeInstance(f"mixed-{i}") for i in range(3)]
    insts[0].draining = True
    insts[0].late.add("set_draining")
    ctrl = _controller(insts, {"mixed": 3}, drain_timeout_s=0.0)
    ctrl._draining = {"mixed-0": (time.time(), 1)}  # a scale-down in progress, already at its deadline

    async def main() -> None:
        await ctrl._apply_scale(ScaleDecision("mixed", delta=1, reason="load"))
        assert not insts[0].draining and "mixed-0" not in ctrl._draining and ctrl.scaling_stats["up"] == 1
        ctrl._snapshots["mixed-0"] = _snap("mixed-0", 5)
        await ctrl._release_drained()
        assert ctrl.killed == [] and ctrl.scaling_stats["forced_releases"] == 0  # type: ignore[attr-defined]

    asyncio.run(main())


def test_begin_drain_whose_reply_is_late_is_still_tracked() -> None:
    """A scale-down's set_draining(True) that landed but timed out left the instance draining, tracked by nothing."""
    insts = [FakeInstance(f"mixed-{i}", late=("set_draining",) if i == 0 else ()) for i in range(2)]
    ctrl = _controller(insts, {"mixed": 2})
    ctrl._snapshots = {"mixed-0": _snap("mixed-0", 0), "mixed-1": _snap("mixed-1", 3)}
    asyncio.run(ctrl._apply_scale(ScaleDecision("mixed", delta=-1, reason="idle")))
    assert insts[0].draining and "mixed-0" in ctrl._draining


def test_scaling_loop_leaves_an_operator_drain_alone() -> None:
    """An operator-drained instance counted as capacity, a scale-down picked it, and a scale-up un-drained it while
    the operator's drain was still moving its requests off."""
    insts = [FakeInstance(f"mixed-{i}") for i in range(3)]
    ctrl = _controller(insts, {"mixed": 3})
    ctrl._snapshots = {i.iid: _snap(i.iid, n) for i, n in zip(insts, (1, 5, 5))}

    async def main() -> None:
        await ctrl.set_draining("mixed-0", True)  # Admin DrainInstance(mixed-0) starts ...
        assert ctrl._active("mixed") == ["mixed-1", "mixed-2"]
        await ctrl._apply_scale(ScaleDecision("mixed", delta=-1, reason="idle"))  # 2 -> 1: not mixed-0
        assert "mixed-0" not in ctrl._draining and len(ctrl._draining) == 1
        await ctrl._apply_scale(ScaleDecision("mixed", delta=+1, reason="load"))  # 1 -> 2: takes its own back
        assert insts[0].draining and not ctrl._draining
        await ctrl.release("mixed-0")  # ... and ends with release()
        assert sorted(ctrl._members) == ["mixed-1", "mixed-2"] and ctrl._desired == {"mixed": 2}
        assert not ctrl._operator_drained
        # the operator's un-drain clears the record, and ends a scale-down drain of that instance too
        await ctrl._apply_scale(ScaleDecision("mixed", delta=-1, reason="idle"))
        (iid,) = ctrl._draining
        await ctrl.set_draining(iid, True)
        await ctrl.set_draining(iid, False)
        assert not ctrl._operator_drained and not ctrl._draining

    asyncio.run(main())


def test_an_admin_drain_says_leaving_in_the_instance_and_a_scale_down_drain_does_not() -> None:
    """An admin drain (DrainInstance, DrainNode) releases its instance once the requests moved: the Controller
    tells the instance, whose snapshots every ingress replica reads (a P->D handoff there picks another decoder).
    Before, only the ingress running the drain knew. A scale-down's drain keeps its pairing: not leaving."""
    insts = [FakeInstance(f"mixed-{i}") for i in range(3)]
    ctrl = _controller(insts, {"mixed": 3})
    ctrl._snapshots = {i.iid: _snap(i.iid, n) for i, n in zip(insts, (1, 5, 5))}

    async def main() -> None:
        await ctrl.set_draining("mixed-1", True)
        assert insts[1].draining and insts[1].leaving
        await ctrl._apply_scale(ScaleDecision("mixed", delta=-1, reason="idle"))  # drains mixed-0 (least loaded)
        assert insts[0].draining and not insts[0].leaving
        await ctrl.set_draining("mixed-1", False)  # the drain was undone
        assert not insts[1].draining and not insts[1].leaving

    asyncio.run(main())


def test_a_controller_dying_while_kuberay_grows_for_a_replacement_ahead_persists_no_mark_without_its_count() -> None:
    """DrainNode of the only DECODE instance's node: the Controller marks it replaced ahead and raises its pool's
    count, growing the KubeRay worker group first (an API call). Killed during that call, Ray's KV held the mark but
    not the count: the restarted Controller started no replacement and counted the instance out when the node
    died -- the pool fell to 0 DECODE instances for good. Now the mark is persisted with the count, not before."""
    p0, d0 = FakeInstance("prefill-0", InstanceRole.PREFILL), FakeInstance("decode-0", InstanceRole.DECODE)
    ctrl = _controller([p0, d0], {"prefill": 1, "decode": 1})
    ctrl._pools["prefill"].role, ctrl._pools["decode"].role = InstanceRole.PREFILL, InstanceRole.DECODE
    kv: dict[str, Any] = {}
    ctrl._kv_put = lambda name, value: kv.__setitem__(name, value)

    class Died(BaseException):
        """The Controller's process ends here."""

    async def grow(counts: dict[str, int]) -> None:
        raise Died

    ctrl._k8s_grow = grow
    with pytest.raises(Died):
        asyncio.run(ctrl._replace_ahead("node-1", ["decode-0"], 1.0))
    # What a restarted Controller reads: the mark only with the count that replaces the instance.
    assert "decode-0" not in kv.get("replaced_ahead", []) and kv.get("desired", {"decode": 1})["decode"] == 1, kv


def test_scale_down_does_not_pick_an_instance_a_role_switch_is_draining() -> None:
    """A scale-down picked an instance a role switch was draining; once switched (un-drained) it stayed in
    _draining and was force-released at the deadline while serving its new role."""
    p0 = FakeInstance("prefill-0", InstanceRole.PREFILL)
    ds = [FakeInstance(f"decode-{i}", InstanceRole.DECODE) for i in range(3)]
    ctrl = _controller([p0, *ds], {"prefill": 1, "decode": 3}, drain_timeout_s=0.0)
    sw = ctrl._switcher

    async def main() -> None:
        ctrl._snapshots = {d.iid: _snap(d.iid, 4, role=InstanceRole.DECODE) for d in ds}
        assert await sw.begin("decode-2", "prefill", "operator")
        ctrl._snapshots["decode-2"] = _snap("decode-2", 0, True, InstanceRole.DECODE)
        assert "decode-2" not in ctrl._active("decode")
        await ctrl._apply_scale(ScaleDecision("decode", delta=-1, reason="idle"))
        assert "decode-2" not in ctrl._draining
        ctrl._refresh_round = 20
        await sw.advance()
        assert ds[2].role is InstanceRole.PREFILL and not ds[2].draining and not sw.switching
        ctrl._snapshots["decode-2"] = _snap("decode-2", 6, False, InstanceRole.PREFILL)
        await ctrl._release_drained()
        assert "decode-2" not in ctrl.killed  # type: ignore[attr-defined]

    asyncio.run(main())


def test_admin_scale_during_a_drain_releases_the_draining_instance_first() -> None:
    """Scale(pool, 2) during a scale-down drain released the busy highest-index instance, then the drained one's
    release lowered desired again: asked 2, ended at 1."""
    insts = [FakeInstance(f"mixed-{i}") for i in range(3)]
    ctrl = _controller(insts, {"mixed": 3})
    ctrl._snapshots = {"mixed-0": _snap("mixed-0"), "mixed-1": _snap("mixed-1", 4), "mixed-2": _snap("mixed-2", 4)}

    async def main() -> None:
        await ctrl._begin_drain("mixed-0")  # the scaling policy's 3 -> 2 picked the idle mixed-0
        await ctrl.scale("mixed", 2)  # the operator asks for 2 as well
        assert ctrl.killed == ["mixed-0"] and not ctrl._draining  # type: ignore[attr-defined]
        assert ctrl._desired == {"mixed": 2} and sorted(ctrl._members) == ["mixed-1", "mixed-2"]

    asyncio.run(main())


def test_release_of_a_drained_instance_keeps_a_count_set_meanwhile() -> None:
    """_release_drained lowered desired even when an admin scale had already counted the draining instance out."""
    insts = [FakeInstance(f"mixed-{i}") for i in range(3)]
    ctrl = _controller(insts, {"mixed": 3})
    ctrl._draining = {"mixed-0": (time.time() + 60, 1)}
    ctrl._desired = {"mixed": 2}  # set while mixed-0 drains, before a reconcile ran
    ctrl._snapshots = {"mixed-0": _snap("mixed-0", 0, True)}
    asyncio.run(ctrl._release_drained())
    assert ctrl.killed == ["mixed-0"] and ctrl._desired == {"mixed": 2}  # type: ignore[attr-defined]
    # a plain scale-down still shrinks the pool by the one released
    ctrl._draining = {"mixed-1": (time.time() + 60, 1)}
    ctrl._snapshots = {"mixed-1": _snap("mixed-1", 0, True)}
    asyncio.run(ctrl._release_drained())
    assert ctrl._desired == {"mixed": 1}


def _two_prefill(p0: FakeInstance) -> Controller:
    return _controller([p0, FakeInstance("prefill-1", InstanceRole.PREFILL)], {"prefill": 2})


async def _switch_ran_dry(ctrl: Controller) -> None:
    """prefill-0 asked to switch to decode, then seen idle and draining: ``advance`` acts on it next."""
    assert await ctrl._switcher.begin("prefill-0", "decode")
    ctrl._refresh_round = 20
    ctrl._snapshots = {"prefill-0": _snap("prefill-0", 0, True, InstanceRole.PREFILL)}


def test_role_switch_that_times_out_stays_tracked() -> None:
    """advance() forgot the switch before set_role; its TimeoutError left the instance draining, tracked by
    nothing."""
    p0 = FakeInstance("prefill-0", InstanceRole.PREFILL, late=("set_role",))
    ctrl = _two_prefill(p0)
    sw = ctrl._switcher

    async def main() -> None:
        await _switch_ran_dry(ctrl)
        await sw.advance()
        assert p0.draining and "prefill-0" in sw.switching
        # past the deadline, still failing: abandoned, un-drained, forgotten
        role, _, since = sw.switching["prefill-0"]
        sw.switching["prefill-0"] = (role, time.time() - 1, since)
        await sw.advance()
        assert not p0.draining and not sw.switching and sw.stats["abandoned"] == 1

    asyncio.run(main())


def test_a_role_switch_that_landed_after_it_was_abandoned_is_adopted() -> None:
    """set_role timed out until the switch was abandoned, then landed: the instance served as DECODE while the
    Controller's member record said PREFILL (switches and the last-of-a-phase check judged by the wrong role)."""
    p0 = FakeInstance("prefill-0", InstanceRole.PREFILL, late=("set_role",))
    ctrl = _two_prefill(p0)
    sw = ctrl._switcher

    async def main() -> None:
        await _switch_ran_dry(ctrl)
        role, _, since = sw.switching["prefill-0"]
        sw.switching["prefill-0"] = (role, time.time() - 1, since)
        await sw.advance()
        assert sw.stats["abandoned"] == 1 and ctrl._members["prefill-0"].info.role is InstanceRole.PREFILL
        p0.role = InstanceRole.DECODE  # the late call lands
        await ctrl._refresh()
        assert ctrl._members["prefill-0"].info.role is InstanceRole.DECODE
        assert ctrl._snapshots["prefill-0"].role is InstanceRole.DECODE
        # prefill-1 is now the last PREFILL instance: switching it away is refused
        with pytest.raises(ValueError, match="last instance serving prefill"):
            await sw.begin("prefill-1", "decode")

    asyncio.run(main())


def test_a_snapshot_older_than_the_controllers_own_switch_does_not_undo_it() -> None:
    """A refresh round whose snapshots were asked for before a switch's set_role landed must not put the old role
    back (another instance's slow snapshot can hold the round's results until after the switch)."""
    p0 = FakeInstance("prefill-0", InstanceRole.PREFILL)
    ctrl = _two_prefill(p0)
    sw = ctrl._switcher

    async def main() -> None:
        await _switch_ran_dry(ctrl)
        rnd = ctrl._refresh_round  # a round in flight while the switch completes
        await sw.advance()
        assert ctrl._members["prefill-0"].info.role is InstanceRole.DECODE
        ctrl._adopt_role("prefill-0", _snap("prefill-0", role=InstanceRole.PREFILL), rnd)
        assert ctrl._members["prefill-0"].info.role is InstanceRole.DECODE
        # a later round's snapshot is the truth
        ctrl._adopt_role("prefill-0", _snap("prefill-0", role=InstanceRole.PREFILL), rnd + 1)
        assert ctrl._members["prefill-0"].info.role is InstanceRole.PREFILL

    asyncio.run(main())


def test_role_switch_whose_undrain_fails_stays_tracked() -> None:
    """A failing set_draining(False) after the switch left the instance draining, tracked by nothing."""
    p0 = FakeInstance("prefill-0", InstanceRole.PREFILL)
    ctrl = _two_prefill(p0)
    sw = ctrl._switcher

    async def main() -> None:
        await _switch_ran_dry(ctrl)

        async def refuse(flag: bool) -> None:
            raise RuntimeError("actor busy")

        handle = SimpleNamespace(set_draining=_Method(refuse), set_role=p0.set_role)
        ctrl._members["prefill-0"] = Member(handle, ctrl._members["prefill-0"].info)  # type: ignore[arg-type]
        await sw.advance()
        assert "prefill-0" in sw.switching and sw.stats["switches"] == 0
        ctrl._members["prefill-0"] = Member(p0, ctrl._members["prefill-0"].info)  # type: ignore[arg-type]
        await sw.advance()  # role already switched: only un-drains
        assert not p0.draining and not sw.switching and sw.stats["switches"] == 1
        assert p0.role is InstanceRole.DECODE

    asyncio.run(main())


def test_entries_of_a_silent_ingress_expire() -> None:
    """Entries of a dead ingress (random id, never reports them removed) stayed forever: its instances never
    counted as drained and num_requests counted ghosts."""
    ctrl = _controller([FakeInstance("mixed-0")], {"mixed": 1})
    ctrl._registry.ttl_s = 0.05

    async def main() -> None:
        entry = RegistryEntry("r1", "ingress-a", ("mixed-0",), 5, Phase.DECODE)
        await ctrl.report_requests("ingress-a", [entry], [], True)
        ctrl._snapshots = {"mixed-0": _snap("mixed-0", 0, True)}
        ctrl._refresh_round = 1000
        assert not ctrl._drained("mixed-0", 1)  # ingress-a is alive: its request holds the instance
        for _ in range(10):  # the Controller's loop sweeps every refresh; ingress-a is gone, ingress-b reports
            await asyncio.sleep(0.01)
            await ctrl.report_requests("ingress-b", [], [], True)
            ctrl._registry.expire()
        assert await ctrl.num_requests() == 0 and ctrl._drained("mixed-0", 1)

    asyncio.run(main())


def test_entries_of_an_ingress_that_only_polls_for_plans_stay() -> None:
    """An ingress with nothing new to report still polls take_migrations: its entries are live, not expired."""
    table = EntryTable(ttl_s=10.0)
    table.apply("ingress-a", [RegistryEntry("r1", "ingress-a", ("mixed-0",), 5, Phase.DECODE)], [], full=True,
                now=0.0)
    table.expire(5.0)
    table.seen("ingress-a", 9.0)
    table.expire(15.0)
    assert "r1" in table.entries
    table.expire(20.0)
    assert "r1" not in table.entries
    # a Controller stalled past the ttl proves no ingress dead
    table.apply("ingress-b", [RegistryEntry("r2", "ingress-b", ("mixed-0",), 5, Phase.DECODE)], [], full=True,
                now=20.0)
    assert table.expire(100.0) == [] and "r2" in table.entries


def test_scale_count_is_bounded() -> None:
    """Admin Scale accepted any count up to int32 max (persisted, sent to KubeRay, one creation task each)."""
    import grpc

    from scheduler._proto.llmsched.v1 import admin_pb2
    from scheduler.control.api import InvalidRequest
    from scheduler.server.grpc_server import AdminServicer, status_for

    ctrl = _controller([], {"mixed": 2})

    class Ing:  # what Ingress.scale does, minus Ray
        async def scale(self, pool: str, count: int) -> int:
            return await ctrl.scale(pool, count)

    async def main() -> None:
        with pytest.raises(InvalidRequest) as ei:
            await AdminServicer(Ing()).scale(admin_pb2.ScaleRequest(pool="mixed", count=50_000))  # type: ignore[arg-type]
        code, message, md = status_for(ei.value)
        assert code is grpc.StatusCode.INVALID_ARGUMENT and message.startswith("count:") and ("llmsched-field", "count") in md
        with pytest.raises(ValueError, match="^count:"):
            await ctrl.scale("mixed", 2**31 - 1)
        assert ctrl._desired == {"mixed": 2}
        await AdminServicer(Ing()).scale(admin_pb2.ScaleRequest(pool="mixed", count=3))  # type: ignore[arg-type]
        assert ctrl._desired == {"mixed": 3}

    asyncio.run(main())
    from scheduler.control.controller_admin import MAX_POOL_SIZE
    from scheduler.server.grpc_server import MAX_SCALE_COUNT

    assert MAX_SCALE_COUNT == MAX_POOL_SIZE


# -- the chart audit's findings in the control plane (twenty-ninth session) -------------------------------------------


@pytest.mark.parametrize("address", ["127.0.0.1:6379", ""])
def test_serve_joins_the_ray_cluster_named_by_ray_address(monkeypatch, address: str) -> None:
    """The chart's head pod sets RAY_ADDRESS to its KubeRay head; start_local_cluster (what `llmsched serve` runs)
    always started a private Ray (address="local"), so no GPU worker group was ever used. Unset: a local Ray."""
    import ray

    from scheduler.config.load import load_config
    from scheduler.control import cluster as cl

    inits: list[dict] = []
    monkeypatch.setenv("RAY_ADDRESS", address)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda *a, **kw: inits.append(kw))
    monkeypatch.setattr(cl, "start_ray", lambda workers: inits.append({"address": "local"}) or "runtime")
    monkeypatch.setattr(cl, "deploy", lambda config, **kw: SimpleNamespace(make_ingress=lambda **kw: "ingress"))
    local = cl.start_local_cluster(load_config("default"))
    assert [i["address"] for i in inits] == [address or "local"]
    assert (local.runtime is None) == bool(address)  # shutdown() never stops a cluster it did not start


def test_cpu_only_placement_takes_a_slot_of_the_pools_type_where_workers_advertise_them() -> None:
    """The chart's cpu-dev workers advertise llmsched_gpu_<type> slots; CPU-only bundles asked for none, so simulated
    instances landed on the head pod and the worker group did nothing."""
    from scheduler.config.models import PoolSpec
    from scheduler.control.placement import gpu_type_resource, plan_placement

    pool = PoolSpec(name="m", role=InstanceRole.MIXED, gpu="sim-a100", tp=2, count=1, backend="simulated")
    plain = plan_placement(pool, use_gpus=False)
    slots = plan_placement(pool, use_gpus=False, type_slots=True)
    assert all(gpu_type_resource("sim-a100") not in b for b in plain.bundles)
    assert [b[gpu_type_resource("sim-a100")] for b in slots.bundles] == [1.0, 1.0]


def test_an_operator_drain_of_the_last_instance_serving_a_phase_is_refused() -> None:
    """Admin DrainInstance of the only instance left for a phase drained it, found no destination for its requests
    and released it after a few rounds: its requests failed and the phase had no instance (SwitchRole already
    refused the same case). Instances drained or switching do not count as serving; a MIXED one serves both."""
    p0 = FakeInstance("prefill-0", InstanceRole.PREFILL)
    d0, d1 = FakeInstance("decode-0", InstanceRole.DECODE), FakeInstance("decode-1", InstanceRole.DECODE)
    ctrl = _controller([p0, d0, d1], {"prefill": 1, "decode": 2})

    async def main() -> None:
        with pytest.raises(ValueError, match="instance_id: prefill-0 is the last instance serving prefill"):
            await ctrl.set_draining("prefill-0", True)
        assert await ctrl.set_draining("decode-0", True)  # decode-1 serves decode
        with pytest.raises(ValueError, match="instance_id: decode-1 is the last instance serving decode"):
            await ctrl.set_draining("decode-1", True)
        assert not (p0.draining or d1.draining) and d0.draining
        ctrl._members["mixed-0"] = _member(FakeInstance("mixed-0"), "mixed")
        assert await ctrl.set_draining("decode-1", True) and await ctrl.set_draining("prefill-0", True)

    asyncio.run(main())


def test_a_closing_ingress_drops_its_entries_at_once() -> None:
    """An ingress replica that closes (a rolling update, a scale-in of the servers) says so: the Controller drops
    its entries now. Before, they stayed until ``ttl_s`` (30 s) of silence, and a scale-down's or role switch's
    drain of their instance waited for requests nobody served any more."""
    from scheduler.config.load import load_config
    from scheduler.control.ingress import Ingress

    ctrl = _controller([FakeInstance("mixed-0")], {"mixed": 1})

    class Handle:  # the Controller's actor methods, without Ray
        def __getattr__(self, name: str) -> Any:
            return SimpleNamespace(remote=getattr(ctrl, name))

    async def main() -> None:
        ing = Ingress(load_config("default"), controller=Handle())
        other = RegistryEntry("r2", "ingress-b", ("mixed-0",), 5, Phase.DECODE)
        await ctrl.report_requests("ingress-b", [other], [], True)
        await ctrl.report_requests(ing.ingress_id, [RegistryEntry("r1", ing.ingress_id, ("mixed-0",), 5,
                                                                  Phase.DECODE)], [], True)
        ing._controller_epoch = "e1"
        ctrl._snapshots = {"mixed-0": _snap("mixed-0", 0, True)}
        ctrl._refresh_round = 1000
        await ing.close()
        assert set(ctrl._registry.entries) == {"r2"}  # only its own, at once
        assert ing._controller_epoch is None  # started again, it reports its whole set
        await ctrl.report_requests("ingress-b", [], ["r2"], False)
        assert ctrl._drained("mixed-0", 1)


def test_admin_scale_to_zero_keeps_every_phase_served() -> None:
    """Admin Scale(decode, 0) on a P/D cluster released every decoder (`llmsched admin scale decode 0` on cpu-pd):
    each request after it was UNAVAILABLE ("no healthy instance can run decode"). A drain of the last one was
    already refused; a pool whose phase another pool serves may still go to 0."""
    p0 = FakeInstance("prefill-0", InstanceRole.PREFILL)
    ds = [FakeInstance(f"decode-{i}", InstanceRole.DECODE) for i in range(2)]
    spare = FakeInstance("spare-0", InstanceRole.DECODE)
    ctrl = _controller([p0, *ds], {"prefill": 1, "decode": 2})

    async def main() -> None:
        for pool, phase in (("decode", "decode"), ("prefill", "prefill")):
            with pytest.raises(ValueError, match=f"^count: 0 would leave no instance serving {phase}"):
                await ctrl.scale(pool, 0)
        assert ctrl._desired == {"prefill": 1, "decode": 2} and not ctrl._draining
        ctrl._members["spare-0"] = _member(spare, "spare")  # another pool decodes too
        ctrl._pools["spare"] = SimpleNamespace(name="spare", count=1, hang_timeout_s=60.0, start_timeout_s=900.0)
        ctrl._desired["spare"] = ctrl._next_index["spare"] = 1
        await ctrl.scale("decode", 0)
        assert ctrl._desired["decode"] == 0
        with pytest.raises(ValueError, match="^count: 0 would leave no instance serving decode"):
            await ctrl.scale("spare", 0)  # the decoders of pool decode are going: spare-0 is the last

    asyncio.run(main())



def test_admin_scale_down_keeps_every_phase_served_after_re_roling() -> None:
    """Re-roling mixes a pool's roles: pool decode holds decode-0 switched to PREFILL and decode-1 (DECODE), the last
    decoder. Scale(decode, 1) releases the newest, decode-1: refused, naming it (only a count of 0 was checked). A
    count whose releases leave a decoder (decode-0 switched back) goes through."""
    p0 = FakeInstance("prefill-0", InstanceRole.PREFILL)
    d0, d1 = FakeInstance("decode-0", InstanceRole.PREFILL), FakeInstance("decode-1", InstanceRole.DECODE)
    ctrl = _controller([p0, d0, d1], {"prefill": 1, "decode": 2})
    ctrl._members["decode-0"] = _member(d0, "decode")  # (its info says PREFILL: switched)

    async def main() -> None:
        with pytest.raises(ValueError, match=r"^count: 1 would leave no instance serving decode \(it releases "
                                             r"decode-1\)"):
            await ctrl.scale("decode", 1)
        assert ctrl._desired["decode"] == 2 and set(ctrl._members) == {"prefill-0", "decode-0", "decode-1"}
        d0.role = InstanceRole.DECODE
        ctrl._members["decode-0"] = _member(d0, "decode")
        await ctrl.scale("decode", 1)
        assert ctrl._desired["decode"] == 1 and set(ctrl._members) == {"prefill-0", "decode-0"}

    asyncio.run(main())
