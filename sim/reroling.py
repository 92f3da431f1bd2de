"""Dynamic re-roling in the simulator: ``RerolePolicy`` (``scheduler.policy.scaling``) applied to P/D instances.

Every ``reroling_interval_s`` the driver hands the policy the simulator's view and applies its ``RoleChange``s
(``RerolePolicy`` proposes nothing while a switch is in flight: the switching instance shows as draining). A
switching instance goes through three phases:

1. **stop taking work of its old role**: it is marked draining, so routers (and the pairing's decode pool) skip
   it; requests already placed on it, and P->D transfers already on their way to it, still land there.
2. **finish or hand off what it has** (the policy's docstring): a PREFILL instance finishes its queued prompts
   (each hands its KV to a decoder as usual); a DECODE instance hands its decoding requests to the other DECODE
   instances by live migration (``sim/migration.py``: Llumnix's multi-stage copy, costed by the KV transfer
   time) when ``handoff`` is on and a destination has room, and finishes the rest in place.
3. **switch**: once it holds no request, no KV reservation and no transfer is on its way to it, it is idle for
   ``switch_delay_s`` (modelled cost of the switch: the engine re-configures its KV connector role and re-warms;
   the weights stay loaded, so this is less than a cold start), then serves in its new role.

The cluster keeps its instances and GPUs; only their roles move. Combining re-roling with autoscaling in one run
is not supported (the scaling driver keys pools by role).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from scheduler.core.types import InstanceRole

if TYPE_CHECKING:
    from sim.cluster import SimInstance
    from sim.simulator import Simulator


@dataclass
class RoleSwitch:
    """One applied ``RoleChange``: asked at ``asked_s``, instance empty at ``idle_s``, serving anew at ``done_s``."""

    instance_id: str
    old_role: InstanceRole
    new_role: InstanceRole
    reason: str
    asked_s: float
    idle_s: float | None = None
    done_s: float | None = None
    handed_off: int = 0  # decodes migrated away


class RerolingDriver:
    """Runs ``sim.reroling`` inside one simulation run (see the module docstring)."""

    def __init__(self, sim: Simulator, *, switch_delay_s: float = 10.0, handoff: bool = True) -> None:
        if switch_delay_s < 0:
            raise ValueError(f"reroling: need switch_delay_s >= 0, got {switch_delay_s}")
        self.sim = sim
        self.policy = sim.reroling
        self.switch_delay_s = switch_delay_s
        self.handoff = handoff
        self.switching: dict[str, RoleSwitch] = {}
        self.events: list[RoleSwitch] = []  # every switch begun, in order
        self.history: list[tuple[float, int, int, int]] = []  # (t, accepting PREFILL, accepting DECODE, switching)

    # ---- events ------------------------------------------------------------------------------------------------
    def on_event(self, payload: SimInstance | None, now: float) -> bool:
        """A policy tick (``payload`` None; True: schedule the next) or a switch delay that ran out."""
        if payload is not None:
            self._switch(payload, now)
            return False
        sim = self.sim
        view = sim.policy_view(now)
        for ch in self.policy.propose(view, now):  # type: ignore[union-attr]
            self.begin(ch.instance_id, ch.new_role, ch.reason, now)
        for sw in list(self.switching.values()):
            inst = sim._index[sw.instance_id]
            if self.handoff and sw.old_role is InstanceRole.DECODE and sw.idle_s is None:
                sw.handed_off += self._hand_off(inst, now)  # transfers that landed after the switch began
            self._check(inst, now)
        pre = sum(1 for x in sim.instances if x.role is InstanceRole.PREFILL and not x.draining)
        dec = sum(1 for x in sim.instances if x.role is InstanceRole.DECODE and not x.draining)
        self.history.append((now, pre, dec, len(self.switching)))
        return True

    def on_idle(self, inst: SimInstance, now: float) -> None:
        """The simulator found ``inst`` (draining) without work: start its switch if nothing is still on its way."""
        if inst.instance_id in self.switching:
            self._check(inst, now)

    # ---- applying changes ----------------------------------------------------------------------------------------
    def begin(self, instance_id: str, new_role: InstanceRole, reason: str, now: float) -> bool:
        inst = self.sim._index.get(instance_id)
        if (inst is None or inst.draining or instance_id in self.switching or inst.role is new_role
                or {inst.role, new_role} != {InstanceRole.PREFILL, InstanceRole.DECODE}):
            return False
        sw = RoleSwitch(instance_id, inst.role, new_role, reason, now)
        self.switching[instance_id] = sw
        self.events.append(sw)
        inst.draining = True
        inst.snap_dirty = True
        self.sim._view = None  # structural change: full refresh at the next route
        if self.handoff and inst.role is InstanceRole.DECODE:
            sw.handed_off = self._hand_off(inst, now)
        self._check(inst, now)
        return True

    def _hand_off(self, src: SimInstance, now: float) -> int:
        """Migrate ``src``'s decodes to the accepting DECODE instances with the most free KV (refusals stay)."""
        sim = self.sim
        if sim.migrations is None:
            from sim.migration import MigrationDriver

            sim.migrations = MigrationDriver(sim)  # executes plans only: no migration policy loop is started
        dests = [x for x in sim.instances if x.role is InstanceRole.DECODE and not x.draining and x is not src]
        moved = 0
        for rid in list(src.engine.decoding):
            if not dests:
                break
            dst = max(dests, key=lambda x: x.engine.total_blocks - x.engine.blocks_used())
            moved += sim.migrations.start(rid, src, dst, now)
        return moved

    def _check(self, inst: SimInstance, now: float) -> None:
        sw = self.switching[inst.instance_id]
        if sw.idle_s is None and not inst.busy and self.sim.is_empty(inst):
            sw.idle_s = now
            from sim.simulator import EventKind

            self.sim._push(now + self.switch_delay_s, EventKind.REROLE, inst, inst)

    def _switch(self, inst: SimInstance, now: float) -> None:
        sw = self.switching[inst.instance_id]
        if inst.busy or not self.sim.is_empty(inst):
            # Work reached it during the switch's delay (a handoff's KV paired on a stale poll-round view, which a
            # draining decoder still takes, as live's does): it switches once idle again, as live's Controller
            # waits for it (``Instance.set_role`` takes an idle instance only). Before, it decoded on the new role.
            sw.idle_s = None
            return
        del self.switching[inst.instance_id]
        inst.engine.role = sw.new_role
        inst.draining = False
        inst.snap_dirty = True
        sw.done_s = now
        self.sim._view = None

    # ---- reporting -----------------------------------------------------------------------------------------------
    def summary(self) -> dict:
        done = [s for s in self.events if s.done_s is not None]
        return {
            "role_switches": len(done),
            "to_decode": sum(1 for s in done if s.new_role is InstanceRole.DECODE),
            "to_prefill": sum(1 for s in done if s.new_role is InstanceRole.PREFILL),
            "switch_delay_s": self.switch_delay_s,
            "mean_switch_s": (sum(s.done_s - s.asked_s for s in done) / len(done)) if done else 0.0,  # type: ignore
            "decodes_handed_off": sum(s.handed_off for s in self.events),
            "switches": [{"instance": s.instance_id, "from": s.old_role.value, "to": s.new_role.value,
                          "asked_s": round(s.asked_s, 1), "done_s": None if s.done_s is None else round(s.done_s, 1),
                          "reason": s.reason} for s in self.events],
        }


__all__ = ["RerolingDriver", "RoleSwitch"]
