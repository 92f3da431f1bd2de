"""Dynamic re-roling on the live cluster: ``RerolePolicy`` (``scheduler.policy.scaling``) applied by the Controller.

The simulator's twin is ``sim/reroling.py``; the policy object is the same. A switch goes through:

1. **stop taking work of the old role**: the instance is marked draining, so routers (and the P/D pairing's
   decode pool) skip it. With a migration policy configured, Llumnix's drain trigger moves its decodes to the
   other decoders (``policy/migration.py``); otherwise they finish in place. A PREFILL instance finishes its
   queued prompts, each handing its KV to a decoder as usual.
2. **switch**: once a snapshot taken after the drain shows it idle and no request is registered on it, the
   instance serves in its new role (``Instance.set_role``) and stops draining. Every backend imports and exports
   KV whatever its role, so no engine restarts and the weights stay loaded; the switch costs the drain only.

A switch that is still busy after ``switch_timeout_s`` is abandoned (the instance keeps its role and serves
again). The instance stays in its pool: pools keep their names and desired counts, only roles move, so an
instance the Controller re-creates after a crash comes back in its pool's role. Re-roling and an autoscaling
policy together are refused at start (the scaling policies size pools by role).

Config::

    policies:
      reroling: {name: threshold, params: {interval_s: 5, switch_timeout_s: 120, decode_high: 0.9, ...}}

Switches in progress survive a Controller restart (kept in Ray's internal KV, like scale-down drains).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

from scheduler.core.types import ClusterView, InstanceRole
from scheduler.policy.scaling import RerolePolicy, RerolingLoop, reroling_policy

if TYPE_CHECKING:
    from scheduler.control.controller import Controller

log = logging.getLogger(__name__)

_PD = frozenset((InstanceRole.PREFILL, InstanceRole.DECODE))  # the roles a switch moves between


class RoleSwitcher:
    """Applies role changes for one Controller (module docstring): ``tick`` asks the policy, ``advance`` finishes
    the switches whose instance ran dry, ``begin`` starts an operator's (the policy's skip its input checks)."""

    def __init__(self, ctrl: Controller, policy: RerolePolicy | None, loop: RerolingLoop | None = None) -> None:
        loop = RerolingLoop() if loop is None else loop  # validated when built (``reroling_policy``)
        self.ctrl = ctrl
        self.policy = policy
        self.interval_s = loop.interval_s
        self.switch_timeout_s = loop.switch_timeout_s
        # instance -> (new role, deadline, the Controller's refresh round when the drain began)
        self.switching: dict[str, tuple[InstanceRole, float, int]] = {}
        self.stats = {"switches": 0, "abandoned": 0}

    @classmethod
    def from_config(cls, ctrl: Controller) -> RoleSwitcher:
        """The configured policy (``policies.reroling``: ``reroling_policy``, as ``llmsched simulate`` reads it), or
        an operator-only switcher when there is none."""
        built = reroling_policy(ctrl.config)
        if built is None:
            return cls(ctrl, None)
        return cls(ctrl, *built)

    # ---- the loop's two steps -------------------------------------------------------------------------------
    async def tick(self, now_s: float) -> None:
        """Ask the policy on the live view and begin what it proposes. Only with a policy (the scaling loop, its
        one caller, checks that once: the policy is set at start and never changes)."""
        assert self.policy is not None
        c = self.ctrl
        view = ClusterView(now_s, tuple(c._snapshots[i] for i in sorted(c._snapshots) if i in c._members))
        if not view.instances:
            return
        # NOTE: ``begin``'s checks of an operator's input are not repeated here: the policy proposes a RoleChange
        # (an InstanceRole) of a PREFILL / DECODE instance to the other role, and an instance's role stays within
        # its pool's P/D pair. ``_begin`` checks what changes at run time (membership, drains, the last of a phase).
        for ch in self.policy.propose(view, now_s):
            await self._begin(ch.instance_id, ch.new_role, ch.reason)

    async def advance(self) -> None:
        """Finish each switch whose instance is idle; abandon those past their deadline."""
        c = self.ctrl
        for iid, (role, deadline, since_round) in list(self.switching.items()):
            m = c._members.get(iid)
            if m is None:  # died meanwhile: the Controller re-creates it in its pool's role
                self._forget(iid)
                continue
            idle = c._drained(iid, since_round)
            if not idle and time.time() < deadline:
                continue
            # Forgotten only once it serves again: a step that fails (a late reply, a busy actor) leaves it tracked,
            # to be retried next round -- else it stays draining, tracked by nothing, and takes no work for good.
            event: dict[str, Any] = {"time_s": time.time(), "instance": iid, "to": role.value}
            if idle and m.info.role is not role:
                try:
                    info = await asyncio.wait_for(_await(m.handle.set_role.remote(role)), 5.0)
                except ValueError as e:  # a request arrived between the snapshot and now: try again later
                    log.info("role switch of %s deferred: %s", iid, e)
                    self._remember(iid, role, deadline, c._refresh_round)
                    continue
                except Exception as e:  # noqa: BLE001 - retried next round; abandoned (un-drained) past the deadline
                    log.warning("role switch of %s: set_role failed: %s", iid, type(e).__name__)
                    if time.time() < deadline:
                        continue
                else:
                    if iid not in c._members:  # released (or died) during the call: written back, it came back
                        self._forget(iid)
                        continue
                    m = type(m)(m.handle, info)
                    c._members[iid] = m
                    c._role_round[iid] = c._refresh_round
            try:
                await asyncio.wait_for(_await(m.handle.set_draining.remote(False)), 5.0)
            except Exception as e:  # noqa: BLE001 - still tracked: a later round un-drains it again
                log.warning("un-draining %s after its role switch: %s", iid, type(e).__name__)
                continue
            self._forget(iid)
            if m.info.role is role:
                self.stats["switches"] += 1
                event["action"] = "role_switched"
                log.info("instance %s now serves as %s", iid, role.value)
            else:
                self.stats["abandoned"] += 1
                event["action"] = "role_switch_abandoned"
                log.warning("instance %s not switched within switch_timeout_s %.0fs: keeps its role", iid,
                            self.switch_timeout_s)
            c._scaling_events.append(event)

    # ---- starting one ------------------------------------------------------------------------------------------------
    async def begin(self, instance_id: str, role: InstanceRole | str, reason: str = "") -> bool:
        """Start moving ``instance_id`` to ``role`` (PREFILL <-> DECODE). False when it already has that role or
        is already switching or draining for a scale-down."""
        try:
            new = InstanceRole.parse(role)
        except ValueError as e:
            raise ValueError(f"role: {e}") from None
        m = self._member(instance_id)
        if new not in _PD or m.info.role not in _PD:
            raise ValueError(f"role: only PREFILL <-> DECODE switches are supported; {instance_id} is "
                             f"{m.info.role.value}, asked {new.value}")
        return await self._begin(instance_id, new, reason)

    def _member(self, instance_id: str) -> Any:
        m = self.ctrl._members.get(instance_id)
        if m is None:
            raise ValueError(f"instance_id: unknown instance {instance_id!r}; live: "
                             f"{', '.join(sorted(self.ctrl._members))}")
        return m

    async def _begin(self, instance_id: str, new: InstanceRole, reason: str) -> bool:
        """``begin`` past the checks of its input: what can change between two switches (membership, a drain or
        switch under way, the instance being the last serving its phase)."""
        c = self.ctrl
        m = self._member(instance_id)
        # c._held(): switching, or drained by an operator (its drain ends in a release, not in serving again)
        held = c._held()
        if new is m.info.role or instance_id in held or instance_id in c._draining:
            return False
        phase = c._last_for(instance_id)
        if phase is not None:
            raise ValueError(f"instance_id: {instance_id} is the last instance serving {phase}; "
                             "switching it would leave no instance for that phase")
        # Remembered before the call: a late reply may still drain it, and only a tracked switch un-drains it.
        self._remember(instance_id, new, time.time() + self.switch_timeout_s, c._refresh_round)
        try:
            await asyncio.wait_for(_await(m.handle.set_draining.remote(True)), 5.0)
        except Exception as e:  # noqa: BLE001 - tracked: advance() un-drains it at the deadline if it never ran dry
            log.warning("draining %s for a role switch: %s", instance_id, type(e).__name__)
        c._scaling_events.append({"time_s": time.time(), "action": "role_switch", "instance": instance_id,
                                  "from": m.info.role.value, "to": new.value, "reason": reason})
        log.info("instance %s: %s -> %s (%s)", instance_id, m.info.role.value, new.value, reason)
        return True

    # ---- state that survives a Controller restart ------------------------------------------------------------------
    def _remember(self, iid: str, role: InstanceRole, deadline: float, since_round: int) -> None:
        self.switching[iid] = (role, deadline, since_round)
        self._save()

    def _forget(self, iid: str) -> None:
        self.switching.pop(iid, None)
        self._save()

    def _save(self) -> None:
        self.ctrl._kv_put("switching", {i: r.value for i, (r, _, _) in self.switching.items()})

    def load(self) -> None:
        """After a restart: switches in progress go on (their instances were adopted, still draining)."""
        for iid, role in (self.ctrl._kv_get("switching") or {}).items():
            if iid in self.ctrl._members:
                self.switching[iid] = (InstanceRole.parse(role), time.time() + self.switch_timeout_s, 0)


async def _await(ref: Any) -> Any:
    return await ref
