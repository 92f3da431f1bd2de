"""The Controller's admin entry points (``ControllerAdmin``, a mixin of ``Controller``): ``scale`` a pool,
``switch_role``, an operator's ``set_draining``, ``release`` an instance, ``drain_node`` (a node going away). The Ingress forwards the Admin service's
calls here (``scheduler.control.ingress_admin``)."""

from __future__ import annotations

import asyncio
import logging
import time

import ray

from scheduler.control.api import Unavailable
from scheduler.control.controller_scaling import _DECODES, _PREFILLS
from scheduler.control.placement import bundle_nodes, drain_ray_node, find_node, find_pg, pg_name
from scheduler.control.util import _await, _pool_of

# NOTE: the Controller's logger: these are Controller methods, and deployments tune (benches silence) it by that name.
log = logging.getLogger("scheduler.control.controller")

# Upper bound on a pool's size (Admin Scale): the count is persisted, sent to KubeRay, and every missing instance
# is one task + placement group started in a single reconcile pass. ``grpc_server.MAX_SCALE_COUNT`` mirrors it.
MAX_POOL_SIZE = 1024
# How long an admin call waits for an instance's answer (``set_draining``): the operator gets UNAVAILABLE naming the
# instance instead of a call that never returns.
ADMIN_CALL_TIMEOUT_S = 5.0
# How long an admin ``scale`` waits for the instances it starts to run (a CPU vLLM starts in tens of
# seconds), then answers; those still starting go on and join when up. Unbounded, the call waited up to
# ``start_timeout_s`` (900 s) per start, and for good for a placement group with no room.
SCALE_WAIT_S = 60.0


class ControllerAdmin:
    """``Controller``'s admin methods. A mixin (the Controller is one Ray actor): they change its desired sizes,
    drains and members, all set up in ``Controller.__init__``."""

    async def scale(self, pool: str, count: int) -> int:
        """Set pool ``pool`` to ``count`` instances; returns the previous desired count once the pool's new
        instances run, or after ``SCALE_WAIT_S`` with those still starting left to join when up."""
        self._ensure_loop()
        if pool not in self._pools:
            raise ValueError(f"pool: unknown pool {pool!r}; allowed: {', '.join(sorted(self._pools))}")
        if count < 0:
            raise ValueError(f"count: must be >= 0, got {count}")
        if count > MAX_POOL_SIZE:
            raise ValueError(f"count: must be <= {MAX_POOL_SIZE}, got {count}")
        have = self._pool_have(pool)
        if count < len(have):
            # As a drain of the last instance of a phase is refused: a scale-down releasing the only instances
            # serving prefill or decode leaves every request after it UNAVAILABLE (`llmsched admin scale decode 0`
            # on cpu-pd did; so did a smaller count once re-roling had left the pool's newest the last decoders).
            # The ones the reconcile will release, in its order.
            going = frozenset(i for i in self._release_order(have)[: len(have) - count] if i in self._members)
            for iid in sorted(going):
                phase = self._last_for(iid, going)
                if phase is not None:
                    raise ValueError(f"count: {count} would leave no instance serving {phase} (it releases "
                                     f"{', '.join(sorted(going))}); scale up another pool serving {phase} first")
        before = await self._set_desired(pool, count)
        await self._reconcile(wait=False)
        # Only this pool's creations (another pool's, started by the loop, are none of this call's
        # business); not cancelled at the timeout (asyncio.wait): they go on starting.
        starting = [t for i, t in self._pending.items() if _pool_of(i) == pool]
        if starting:
            _, late = await asyncio.wait(starting, timeout=SCALE_WAIT_S)
            if late:
                log.warning("scale %s: %d instance(s) still starting; they join when up", pool, len(late))
        return before

    async def switch_role(self, instance_id: str, role: str, reason: str = "operator") -> bool:
        """Move an instance between the PREFILL and DECODE roles: it drains, then switches once idle (see
        ``scheduler.control.reroling``). False when it has that role already or is already switching/draining."""
        self._ensure_loop()
        if self._scaling_task is None:  # the loop that finishes switches; started here when no policy needs it
            self._scaling_task = asyncio.create_task(self._scaling_loop())
        return await self._switcher.begin(instance_id, role, reason)

    async def set_draining(self, instance_id: str, draining: bool = True) -> bool:
        """The operator's drain (Admin DrainInstance, DrainNode: ``IngressAdmin._begin_drain``). Recorded, so the
        scaling loop neither counts the instance as capacity, nor drains it, nor takes it back on a scale-up while
        the operator's drain moves requests off. The instance's snapshots say it is ``leaving`` (released once its
        requests moved): every ingress replica reads that, not only the one running the drain, and a P->D handoff
        paired with it there picks another decoder (``Ingress._leaving``)."""
        self._ensure_loop()
        m = self._members.get(instance_id)
        if m is None:
            return False
        ops = self._operator_drained
        if draining and instance_id not in ops:
            phase = self._last_for(instance_id)
            if phase is not None:  # the drain would release it with its requests nowhere to go
                raise ValueError(f"instance_id: {instance_id} is the last instance serving {phase}; "
                                 "scale its pool up first")
        if draining:
            ops.add(instance_id)  # before the call: see _begin_drain
            self._kv_put("operator_draining", sorted(ops))
        else:
            self._drop_operator_drain(instance_id)
            # Serving again also ends a scale-down drain of it: it must not be released at that drain's deadline.
            if self._draining.pop(instance_id, None) is not None:
                self._save_draining()
        try:
            # Bounded: a blocked actor (a hung engine holding its event loop) held the admin's Drain for good.
            await asyncio.wait_for(_await(m.handle.set_draining.remote(draining, leaving=draining)),
                                   ADMIN_CALL_TIMEOUT_S)
        except (TimeoutError, ray.exceptions.RayActorError) as e:
            # The intent recorded above stays (the scaling loop keeps off the instance; a watchdog or death replaces
            # a blocked one); the instance may not have it yet: a retry sends it again.
            raise Unavailable(
                f"instance_id: {instance_id} did not answer set_draining({draining}) in "
                f"{ADMIN_CALL_TIMEOUT_S:.0f}s ({type(e).__name__}); recorded, retry to deliver it",
                field="instance_id",
            ) from None
        return True

    async def drain_node(self, node: str, deadline_s: float = 0.0) -> tuple[str, list[str]]:
        """A Ray node is going away (a worker pod's preStop, ``kubectl drain``; Admin DrainNode): Ray places
        nothing new on it from now on, so replacements land elsewhere. Returns (its node id, the instances it
        hosts), which the Ingress drains onto the rest and releases *with* replacement (``IngressAdmin.drain_node``):
        the pools keep their sizes. Instances still being placed there are called off and started again (by the
        reconcile round) elsewhere.

        An instance there that is the last serving its phase off the node (a 1-decode P/D deployment) has its
        replacement started first and waited for (``_replace_ahead``): drained without one, its phase would have
        had nowhere to go, and it stayed in service until the node died under its requests. Its pool counts it
        out when it goes, whoever releases it (``_end_replaced_ahead``).

        Raises:
            ValueError: naming ``node`` (no such alive node, ambiguous, the head).
            Unavailable: Ray refused the drain.
        """
        self._ensure_loop()
        found = await asyncio.to_thread(find_node, node)
        nid = found["NodeID"]
        try:
            await asyncio.to_thread(drain_ray_node, nid, f"llmsched: drain of node {node}", deadline_s)
        except RuntimeError as e:
            raise Unavailable(f"node: {e}", field="node") from None
        hosted = sorted(i for i, m in self._members.items() if m.info.node_id == nid)
        for iid, task in list(self._pending.items()):
            pg = find_pg(pg_name(self.cluster, iid))
            if pg is not None and nid in await asyncio.to_thread(bundle_nodes, pg):
                task.cancel()  # its _create removes what it placed; the next reconcile starts it elsewhere
        log.info("node %s (%s) draining: instances %s", node, nid[:8], ", ".join(hosted) or "none")
        self._scaling_events.append({"time_s": time.time(), "action": "drain_node", "node": nid,
                                     "instances": hosted})
        # Half the node's remaining life at most: the other half moves the requests off.
        wait_s = min(SCALE_WAIT_S, deadline_s / 2) if deadline_s > 0 else SCALE_WAIT_S
        await self._replace_ahead(node, hosted, wait_s)
        return nid, hosted

    async def _replace_ahead(self, node: str, hosted: list[str], wait_s: float) -> None:
        """Start one more instance of the pool of each instance in ``hosted`` that is the last serving its phase
        off the node, and wait for them (at most ``wait_s``). A pool whose new instance did not come up (no room)
        is set back (the reconcile calls it off) and its instance is left to the Ingress's "last instance"
        refusal.

        One replaced ahead already (a DrainNode retried -- its caller gave up, or the Controller restarted under
        it) is not replaced a second time, but its replacement is waited for too: the retry answered at once, and
        the ingress kept the instance ("the last instance serving decode") while its replacement was still starting
        -- after a Controller restart, started afresh by the new one."""
        going = frozenset(hosted)
        ahead: dict[str, str] = {}  # instance -> its pool
        again: set[str] = set()  # pools of those replaced ahead by an earlier call
        covered: set[str] = set()
        for iid in hosted:
            if iid not in self._members:
                continue  # released while the node was being looked at
            if iid in self._replaced_ahead:
                again.add(self._members[iid].info.pool)
                continue
            phase = self._last_for(iid, going)
            if phase is None or phase in covered:
                continue
            pool = self._members[iid].info.pool
            ahead[iid] = pool
            covered |= {ph for ph, roles in (("prefill", _PREFILLS), ("decode", _DECODES))
                        if self._pools[pool].role in roles}
        if not ahead and not again:
            return
        self._replaced_ahead.update(ahead)  # (at once: a concurrent retry does not replace them a second time)
        uncounted = set(ahead)
        pools = set(ahead.values())
        for pool in pools:
            await self._set_desired(pool, self._desired.get(pool, 0) + 1)
            # Persisted once the pool's count has its replacement (saved just now, no await between): saved first,
            # a Controller dying while ``_set_desired`` grew the KubeRay worker group left the mark without the
            # count -- the new one started no replacement, and counted the instance out of its pool when it went:
            # the phase lost an instance, its last one for a 1-instance pool.
            uncounted -= {i for i, p in ahead.items() if p == pool}
            self._save_replaced_ahead(but=uncounted)
        await self._reconcile(wait=False)
        starting = [t for i, t in self._pending.items() if _pool_of(i) in pools | again]
        if starting:
            await asyncio.wait(starting, timeout=wait_s)
        if not ahead:
            return
        done: list[str] = []
        for iid, pool in ahead.items():
            if iid in self._members and self._last_for(iid, going) is None:
                done.append(iid)
                continue
            log.warning("node %s: no replacement for %s up in %.0fs; it serves there until the node goes", node,
                        iid, wait_s)
            if iid in self._replaced_ahead:  # (still a member: not counted out meanwhile)
                self._replaced_ahead.discard(iid)
                await self._set_desired(pool, max(self._desired.get(pool, 0) - 1, 0))
        self._save_replaced_ahead()
        if len(done) < len(ahead):
            await self._reconcile(wait=False)
        self._scaling_events.append({"time_s": time.time(), "action": "replace_ahead", "node": node,
                                     "instances": done, "failed": sorted(set(ahead) - set(done))})

    async def release(self, instance_id: str, *, replace: bool = False) -> bool:
        """Stop an instance (answers once it is stopped). Without ``replace`` its pool shrinks by one (a drained
        instance stays gone)."""
        self._ensure_loop()
        if not await self._release_from_pool(instance_id, replace=replace):
            return False
        await self._stopped([instance_id])
        return True

    async def _release_from_pool(self, instance_id: str, *, replace: bool) -> bool:
        """``release`` without waiting for the instance to stop (the scaling loop's release of a drained one)."""
        if instance_id not in self._members:
            return False
        self._leaves(instance_id, "released", replace=replace)
        assert self._lock is not None
        async with self._lock:
            return await self._release(instance_id)
