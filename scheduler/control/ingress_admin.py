"""The Ingress's admin side (``IngressAdmin``, a mixin of ``Ingress``): ``drain`` (migrate an instance's requests
off it, then release it), ``scale`` and ``switch_role``, each forwarded to the Controller by ``_admin``, which maps
its failures to the API's errors."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from typing import Any

from ray.exceptions import RayTaskError

from scheduler.control.api import (
    UNAVAILABLE_RETRY_AFTER_S,
    IngressError,
    InvalidRequest,
    NodeDrainResult,
    NotFound,
    Unavailable,
)
from scheduler.control.instance_lost import _DEAD
from scheduler.control.util import _await
from scheduler.core.types import ClusterView, InstanceRole, Phase

# NOTE: the Ingress's logger: these are Ingress methods, and deployments tune (benches silence) it by that name.
log = logging.getLogger("scheduler.control.ingress")

# How long a drain's release is retried while the Controller is down or restarting (it restarts in seconds).
_RELEASE_RETRY_S = 30.0
# (How long a drain waits for its moves' streams to switch over, and for other replicas' moves: ``config.drain``.)


class IngressAdmin:
    """``Ingress``'s admin methods (the Admin gRPC service's, through ``IngressAPI``). A mixin: ``drain`` works on the
    Ingress's view, registry and ``migrate`` (``IngressMigration``)."""

    async def drain(self, instance_id: str, *, replace: bool = False) -> int:
        """Migrate every request off ``instance_id``, then release it (``replace``: the Controller starts another
        in its pool; else the pool shrinks by one). Returns the requests moved, by every ingress replica."""
        await self.start()
        if instance_id not in self._members:
            raise NotFound(f"instance_id: no live instance {instance_id!r}", field="instance_id")
        await self._begin_drain(instance_id)
        return await self._move_off(instance_id, replace=replace)

    async def _begin_drain(self, instance_id: str) -> None:
        """Out of service: no new request routed to it (the Controller's operator drain, and this view at once)."""
        await self._admin("set_draining", instance_id, True)
        self._admin_drains.add(instance_id)  # released once its requests moved: P->D handoffs pick another decoder
        self._snapshots.pop(instance_id, None)
        self._view = ClusterView(self._view.time_s, tuple(
            dataclasses.replace(s, draining=True, leaving=True) if s.instance_id == instance_id else s
            for s in self._view.instances
        ))

    async def _move_off(self, instance_id: str, *, replace: bool, until: float | None = None) -> int:
        """The rest of ``drain``: migrate its requests away, wait for their streams to switch, release it. The
        requests other ingress replicas serve there are moved by them, on the Controller's plans
        (``_move_peers_off``), waited for until ``until`` (monotonic; a node's deadline) at the latest.

        Counts each request moved off once, whoever ran its move: this loop, or a plan of the Controller's migration
        policy that this replica ran meanwhile (``migrate`` notes the commit in ``_moved_off``)."""
        released = False
        off = self._moved_off.setdefault(instance_id, set())  # (shared with a second drain call of it meanwhile)
        peers = asyncio.create_task(self._move_peers_off(instance_id, until))
        try:
            # NOTE(migration): requests still in prefill or queued finish their prefill first; retry them a few
            # rounds, then release (a request still there is recovered elsewhere by re-prefill).
            for _ in range(50):
                pending = [r for r in self.registry.on_instance(instance_id) if r.moving_to is None]
                # P->D requests whose decode goes here are on no instance here yet (their KV on its way): wait for
                # them to land, then move them, as the simulator waits for them. (Released under them, their KV
                # landed on a dead instance and they were re-prefilled elsewhere.) Not those still prefilling: their
                # handoff picks a decoder in service (``Ingress._handoff_decoder``), so waiting for them only held the
                # drain ~3 s (50 rounds) to no end.
                arriving = any(d == instance_id and (r := self.registry.get(rid)) is not None
                               and r.phase is not Phase.PREFILL and r.phase is not Phase.QUEUED
                               for rid, d in list(self._expected.items()))
                if not pending and not arriving:
                    break
                await asyncio.gather(*(self.migrate(r.request_id) for r in pending), return_exceptions=True)
                await asyncio.sleep(0.05)
            # A committed migration's stream still reads what the source made before its stop out of the source's
            # buffer until it switches (a consumer slower than the engine): releasing the instance first destroys
            # those tokens and the stream fails on the gap. Wait for the switches (bounded: a stalled consumer's
            # source stream would be reaped by the instance's lease anyway).
            deadline = time.monotonic() + self.config.drain.switch_wait_s
            if until is not None:
                deadline = min(deadline, until)
            while time.monotonic() < deadline and any(
                    r.moving_to is not None for r in self.registry.on_instance(instance_id)):
                await asyncio.sleep(0.01)
            moved = len(off) + await peers
            await self._release_retried(instance_id, replace)
            released = True  # (stays in _admin_drains: an id is never reused, and the view may still list it)
        finally:
            peers.cancel()  # (done already unless this failed or was cancelled before it)
            self._moved_off.pop(instance_id, None)
            if not released:
                # Cancelled (the caller's deadline) or failed before the release: nothing else would ever release
                # or un-drain the instance (the Controller keeps an operator's drain until it is undone), so put it
                # back in service rather than leave it silently out of it.
                await self._undrain(instance_id)
        return moved

    async def _move_peers_off(self, instance_id: str, until: float | None) -> int:
        """Have the other ingress replicas move the requests they serve on ``instance_id`` off it, and wait for them
        to leave it: the Controller plans a move for each (``drain_moves``; the registry says who serves what) and
        hands it to that replica, which picks the destination and runs it. Returns the moves committed. Waits
        ``config.drain.peer_wait_s`` at most, or until ``until``; what is still there then is released with the
        instance and recovered by re-prefill, as before any of this (each replica moved only its own requests off a
        drain it ran, and a drain through another replica re-prefilled them all)."""
        drain_moves = getattr(self.controller, "drain_moves", None)
        if drain_moves is None:
            return 0
        now = time.monotonic()
        end = now + self.config.drain.peer_wait_s
        if until is not None:
            end = min(end, until)
        moved = waiting = 0
        heard = False
        while True:
            try:
                # ``heard``: every other live replica has told the Controller of its requests since the instance
                # went out of service (nothing reaches it after that: no route, no hand-off picks it) -- at once
                # when none is live. Not a fixed wait: a replica's report can come late on a loaded host.
                waiting, moved, heard = await asyncio.wait_for(
                    _await(drain_moves.remote(instance_id, self.ingress_id)), 2.0)
            except (TimeoutError, *_DEAD, RayTaskError) as e:  # restarting: its registry comes back with the reports
                log.info("drain of %s: other ingresses' requests: %r", instance_id, e)
            else:
                if not waiting and heard:
                    return moved
            if time.monotonic() >= end:
                log.warning("drain of %s: %d request(s) of other ingresses still there at its deadline%s; released "
                            "under them (recovered elsewhere)", instance_id, waiting,
                            "" if heard else ", and a replica not heard from since it began")
                return moved
            await asyncio.sleep(0.1)

    async def _release_retried(self, instance_id: str, replace: bool) -> None:
        """The drain's release, retried while the Controller is unavailable (restarting: ``max_restarts=-1``), for
        ``_RELEASE_RETRY_S``. The new one adopted the instance with the drain's marks (Ray's KV: the operator's
        drain, a replacement started ahead) and releases it; one the old Controller was releasing when it died is
        killed by the new one (``Controller._adopt``), and the retry finds it gone: released all the same. Before,
        the drain gave up at the first refusal: its un-drain failed too (the Controller still down), and the instance
        stayed out of service on its going node, reported ``kept`` ("drain failed: Unavailable"), with its
        replacement running beside it."""
        deadline = time.monotonic() + _RELEASE_RETRY_S
        while True:
            try:
                await self._admin("release", instance_id, replace=replace)
                return
            except Unavailable as e:
                if time.monotonic() >= deadline:
                    raise
                log.info("release of drained %s: %s; retrying", instance_id, e)
                await asyncio.sleep(e.retry_after_s or UNAVAILABLE_RETRY_AFTER_S)

    async def _undrain(self, instance_id: str) -> None:
        self._admin_drains.discard(instance_id)
        fut = asyncio.ensure_future(_await(self.controller.set_draining.remote(instance_id, False)))
        fut.add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieved even if we stop waiting
        try:
            await asyncio.shield(fut)  # runs to the end even if this task is cancelled again
        except Exception as e:  # noqa: BLE001 - the Controller is down: the drain stays; the operator retries
            log.warning("drain of %s interrupted; un-draining it failed: %r", instance_id, e)
        else:
            self._view = ClusterView(self._view.time_s, tuple(
                dataclasses.replace(s, draining=False, leaving=False) if s.instance_id == instance_id else s
                for s in self._view.instances))

    async def drain_node(self, node: str, deadline_s: float = 0.0) -> NodeDrainResult:
        """A node is going away (a worker pod's preStop hook, ``llmsched admin drain-node``): the Controller has
        Ray place nothing new on it; every instance there is taken out of service at once (so no request moves
        from one of them to another), its requests are migrated onto the rest, and it is released *with*
        replacement -- the pools keep their sizes, the replacements start on other nodes. The last instance
        serving a phase has its replacement started first (``Controller.drain_node``; its pool then counts it out
        when it goes); when that one finds no room in time it stays in service (its requests would have nowhere to go): it is
        ``kept``, with why. ``deadline_s``: when the node will be killed (seconds from now): Ray's record, and
        half of it bounds the wait for those replacements.

        The drain runs to its end even when the caller stops waiting (the preStop hook's timeout, a client gone):
        the node goes away all the same. Cancelled with its caller, it put the instances there back in service
        and left a replacement started ahead idle beside the one it replaced. A second call for the same node
        while it runs (the hook retried) waits for the same drain."""
        await self.start()
        if not node:
            raise InvalidRequest("node: must not be empty", field="node")
        drains = self._node_drains
        task = drains.get(node)
        if task is None:
            task = drains[node] = asyncio.create_task(self._drain_node(node, deadline_s))

            def done(t: asyncio.Task[NodeDrainResult]) -> None:
                if drains.get(node) is t:
                    del drains[node]
                if not t.cancelled():
                    t.exception()  # retrieved: no caller may be left to

            task.add_done_callback(done)
        return await asyncio.shield(task)

    async def _drain_node(self, node: str, deadline_s: float) -> NodeDrainResult:
        until = time.monotonic() + deadline_s if deadline_s > 0 else None
        node_id, hosted = await self._admin("drain_node", node, float(deadline_s))
        await self._refresh_members()
        await self._refresh_view()  # replacements started ahead: destinations for the requests below
        kept: dict[str, str] = {}
        begun: list[str] = []
        try:
            for iid in hosted:  # one at a time: each next "last instance of a phase" check sees the ones before
                if iid not in self._members:
                    continue  # released meanwhile
                try:
                    await self._begin_drain(iid)
                    begun.append(iid)
                except IngressError as e:
                    kept[iid] = str(e)
        except BaseException:  # cancelled (the Ingress closes): nothing else would put these back in service
            for iid in begun:
                await self._undrain(iid)
            raise
        results = await asyncio.gather(*(self._move_off(i, replace=True, until=until) for i in begun),
                                       return_exceptions=True)
        drained, moved = [], 0
        for iid, r in zip(begun, results, strict=True):
            if isinstance(r, BaseException):
                kept[iid] = f"drain failed: {r!r}"
                log.warning("drain of node %s: instance %s: %r", node, iid, r)
            else:
                drained.append(iid)
                moved += r
        await self._refresh_members()
        await self._refresh_view()
        log.info("node %s drained: %d instance(s) released for replacement, %d request(s) moved, kept %s",
                 node, len(drained), moved, kept or "none")
        return NodeDrainResult(node_id, tuple(drained), kept, moved)

    async def _admin(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """``controller.<method>.remote(*args)`` for an admin call: the Controller down or restarting is
        ``Unavailable`` (retryable, as on the hot path), a ``ValueError`` it raises is ``InvalidRequest`` (it names
        the field first: "count: ...")."""
        try:
            return await getattr(self.controller, method).remote(*args, **kwargs)
        except _DEAD as e:
            raise Unavailable(f"the Controller is unavailable ({type(e).__name__}); retry",
                              retry_after_s=UNAVAILABLE_RETRY_AFTER_S) from None
        except RayTaskError as e:
            if isinstance(e.cause, ValueError):
                raise InvalidRequest(str(e.cause), field=str(e.cause).split(":", 1)[0]) from None
            if isinstance(e.cause, IngressError):  # the Controller's own answer (an instance that did not answer)
                raise e.cause from None
            raise

    async def scale(self, pool: str, count: int) -> int:
        """Set ``pool``'s size; returns its target size after the call (``count``; the Controller answers the
        previous one, which is not what Admin.Scale promises)."""
        await self.start()
        await self._admin("scale", pool, count)
        await self._refresh_members()
        await self._refresh_view()
        return int(count)

    async def switch_role(self, instance_id: str, role: InstanceRole | str) -> bool:
        """Ask the Controller to move ``instance_id`` to ``role`` (``scheduler.control.reroling``)."""
        await self.start()
        if instance_id not in self._members:
            raise NotFound(f"instance_id: no live instance {instance_id!r}", field="instance_id")
        try:
            new = InstanceRole.parse(role)
        except ValueError as e:
            raise InvalidRequest(f"role: {e}", field="role") from None
        started = await self._admin("switch_role", instance_id, new.value)
        await self._refresh_view()  # the instance shows as draining from now on
        return bool(started)
