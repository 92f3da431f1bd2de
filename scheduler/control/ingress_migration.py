"""The Ingress's live-migration side (``IngressMigration``, a mixin of ``Ingress``): ``migrate`` (the multi-stage
protocol of ``scheduler.transfer.migration`` over Ray actor calls, ``_RaySource``/``_RayDestination``), where a
request moves when no destination is given, the commit's switch of the stream to the destination, and the
execution of the Controller's migration plans."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from typing import Any

from ray.exceptions import RayTaskError

from scheduler.control.api import MigrationResult, NotFound, Overloaded, Unavailable
from scheduler.control.instance_lost import _DEAD
from scheduler.control.registry import RequestRecord
from scheduler.control.util import _await
from scheduler.core.types import ClusterView, Phase
from scheduler.engine.base import EngineRequest
from scheduler.policy.filters import decode_candidates, is_accepting
from scheduler.telemetry.tracing import Stage
from scheduler.transfer.migration import Migration, MigrationMode, Side, StepFailed, run_migration

# NOTE: the Ingress's logger: these are Ingress methods, and deployments tune (benches silence) it by that name.
log = logging.getLogger("scheduler.control.ingress")

# ``RequestRecord.move_kv`` value meaning "the destination already admitted the request" (live migration commit).
_ADMITTED = object()


class IngressMigration:
    """``Ingress``'s migration methods. A mixin, not a collaborator: they read and write the same stream state as the
    hot path (the registry's records, the view's pending bookings, ``_migrating``, ``_members``, the router), all of
    it set up in ``Ingress.__init__``."""

    async def migrate(
        self, request_id: str, destination: str | None = None, *, mode: MigrationMode | str | None = None,
    ) -> MigrationResult:
        """Live-migrate a request this replica serves (multi-stage protocol, ``scheduler.transfer.migration``).

        The client's stream does not change: it sees a short pause, then the next index from the destination.
        Expected failures (no destination, refused reservation, a side failing mid-way) come back as
        ``committed=False`` with the reason; the request then simply continues on its source.

        Raises:
            NotFound: the request is not in flight here, or ``destination`` is not a live instance.
        """
        await self.start()
        rec = self.registry.get(request_id)
        if rec is None:
            raise NotFound(f"request_id: {request_id!r} is not in flight on this ingress", field="request_id")
        src = rec.instances[-1] if rec.instances else ""
        cfg = self.migration_config
        if mode is not None:
            cfg = dataclasses.replace(cfg, mode=MigrationMode.parse(mode))
        if request_id in self._migrating or rec.moving_to is not None:
            return MigrationResult(request_id, src, destination or "", False, "already migrating", started=False)
        if rec.phase is not Phase.DECODE or len(rec.instances) != 1:
            return MigrationResult(request_id, src, destination or "", False, f"request is in phase {rec.phase.name}", started=False)
        picked_at: int | None = None  # the booking generation of a destination this ingress picked and booked
        if destination is None:
            try:
                destination = self._migration_destination(rec, src)
            except (Overloaded, Unavailable) as e:
                return MigrationResult(request_id, src, "", False, f"no destination: {e}", started=False)
            # Booked at the pick, as the commit books it (a drain's concurrent picks spread out); the commit books it
            # again only if a refresh has taken this booking meanwhile (booked twice, it counted one extra request).
            self._book_landing(rec, destination)
            picked_at = self._bookings_taken
        if destination == src:
            return MigrationResult(request_id, src, destination, False, "destination is the source", started=False)
        if destination not in self._members:
            raise NotFound(f"destination: no live instance {destination!r}", field="destination")
        if src not in self._members:  # seen dead; its stream recovers the request on its own
            return MigrationResult(request_id, src, destination, False, f"source {src!r} is not a live instance", started=False)
        m = Migration(request_id, src, destination, cfg)
        self._migrating[request_id] = m
        ended = self._migration_ended[request_id] = asyncio.Event()
        try:
            # NOTE: parented on the request's trace, not the caller's (the controller's loop or an admin RPC):
            # the migration is a stage of that request, found in its trace.
            with self.tracing.span(Stage.MIGRATION, request_id=request_id, parent=rec.trace_context,
                                   attributes={"source": src, "destination": destination}):
                await run_migration(
                    m, _RaySource(self._handle(src), request_id),
                    _RayDestination(self._handle(destination), request_id, rec, self._template(rec),
                                    preadmit=cfg.preadmit),
                    on_committed=lambda: self._switch(rec, destination, picked_at),
                )
        finally:
            self._migrating.pop(request_id, None)
            self._migration_ended.pop(request_id, None)
            ended.set()
            self.migrations.append(m)
            del self.migrations[:-256]
            self.recorder.on_migration("committed" if m.committed else "aborted",
                                       m.downtime_s if m.committed else None)
        if m.committed:
            self.counters["migrations"] += 1
            if (off := self._moved_off.get(src)) is not None:  # a drain's, or a policy plan's during a drain
                off.add(request_id)
            return MigrationResult(request_id, src, destination, True, cfg.mode.value, m.downtime_s,
                                   len(m.stages) + 1)
        self.counters["migrations_aborted"] += 1
        ab = m.abort
        assert ab is not None
        reason = f"aborted by {ab.side.value} in {ab.state.name}: {ab.reason} ({ab.frees})"
        log.info("%s: migration %s -> %s %s", request_id, src, destination, reason)
        if ab.side is Side.DESTINATION and ("ActorDied" in ab.reason or "RayActorError" in ab.reason):
            self._mark_dead(destination)
        return MigrationResult(request_id, src, destination, False, reason, 0.0, len(m.stages))

    @staticmethod
    def _template(rec: RequestRecord) -> EngineRequest:
        """What the destination needs besides the snapshot: the original sampling (max_tokens counts the whole
        request; the destination subtracts the outputs so far), stop conditions, priority."""
        return EngineRequest(rec.request_id, (), rec.sampling, priority=rec.priority)

    def _migration_destination(self, rec: RequestRecord, src: str) -> str:
        """Where ``rec`` moves off ``src`` when no destination is given: the router's decode pick over the view less
        ``src`` when it names an accepting instance that decodes, else the least outstanding of ``decode_candidates``.
        Never a PREFILL instance (the router may name one: a prefill named alone, a Splitwise borrow): it would decode
        the request in full, where the simulator's migration policy only moves requests to instances that decode.

        Raises:
            Unavailable: no accepting DECODE or MIXED instance other than ``src``.
            Overloaded: the router refuses the request.
        """
        view = self.view()
        view = ClusterView(view.time_s, tuple(s for s in view.instances if s.instance_id != src))
        decoders = {s.instance_id for s in view.instances if s.role.does_decode and is_accepting(s)}
        if not decoders:
            raise Unavailable(f"destination: no accepting DECODE or MIXED instance other than the source {src!r}",
                              field="destination")
        try:
            _, d = self._decide(rec, exclude=frozenset({src}), accepted=True)
        except Unavailable:  # no instance to prefill on (all PREFILL ones draining): irrelevant to a migration
            d = None
        if d is not None and (d.decode_instance or d.prefill_instance) in decoders:
            return d.decode_instance or d.prefill_instance
        return min(decode_candidates(view), key=lambda s: s.num_running + s.num_waiting).instance_id

    def _book_landing(self, rec: RequestRecord, destination: str) -> None:
        """Count ``rec`` on ``destination`` until a refresh shows it there, as the simulator queues a migrated
        request at its commit: waiting with its context, all but its last token loaded."""
        n = len(rec.prompt_token_ids) + rec.next_index
        self._pending[destination] = self._pending.get(destination, 0) + 1
        self._pending_prompt[destination] = self._pending_prompt.get(destination, 0) + n
        self._pending_compute[destination] = self._pending_compute.get(destination, 0) + 1

    def _switch(self, rec: RequestRecord, destination: str, picked_at: int | None = None) -> None:
        """Commit point: the destination runs the request; follow it there once the source's stream ends.
        ``picked_at``: the booking generation at which this ingress picked and booked ``destination`` itself."""
        if rec.cancelled or self.registry.get(rec.request_id) is not rec:
            # The client left, or the stream already ended (a cancel through another replica aborted the
            # paused source during the stop-and-copy): do not leave a copy running. (No registry touch either:
            # it would un-report the removal of an ended request.)
            self._abort_quietly(destination, rec.request_id)
            return
        rec.moving_to, rec.move_kv = destination, _ADMITTED
        self.registry.touch(rec.request_id)
        # Counted there from now (its snapshots show it from the next refresh; without this a destination given by
        # the Controller's plans read idle until then) -- unless the pick's booking is still counted: no refresh
        # has taken it since.
        if picked_at is None or picked_at != self._bookings_taken:
            self._book_landing(rec, destination)

    async def _take_plans(self) -> None:
        """Execute the Controller's migration plans for requests this replica serves (its policy loop runs on
        the Controller's view; the streams live here). Outcomes go back so its rate limits see them."""
        take = getattr(self.controller, "take_migrations", None)
        if take is None:
            return
        # Unreported registry changes first: a drain through another replica waits for two polls of this one
        # since it began (``ControllerMigration.drain_moves``), and then knows every request of it on the instance.
        await self._report()
        try:
            plans = await asyncio.wait_for(_await(take.remote(self.ingress_id)), 2.0)
        except (TimeoutError, *_DEAD, RayTaskError):
            return
        if any(not p.destination for p in plans or ()):
            # A drain through another replica moves requests of this one (``ControllerMigration.drain_moves``):
            # its instances were out of service before it asked, and a fresh view shows them so -- the destinations
            # picked below are never one of them (this replica's view can be a refresh behind).
            await self._refresh_view()
        for plan in plans or ():
            asyncio.create_task(self._execute_plan(plan))

    async def _execute_plan(self, plan: Any) -> None:
        """Run one of the Controller's plans; one without a destination (a drain's move) goes where this replica's
        own migrations go (``_migration_destination``)."""
        ok = started = False
        rec = self.registry.get(plan.request_id)
        try:
            # Still where the plan moves it from: a request that moved since (an operator's drain of the same
            # instance, a handoff) went from its new instance, a move nothing had planned. Moot: dropped.
            if rec is not None and rec.instances[-1:] == (plan.source,) and (
                    not plan.destination or plan.destination in self._members):
                res = await self.migrate(plan.request_id, plan.destination or None)
                ok, started = res.committed, res.started
        except Exception:
            log.exception("migration plan %s failed", plan)
            started = True
        try:
            if plan.destination:
                self.controller.migration_done.remote(plan.request_id, ok, started)
            else:
                self.controller.migration_done.remote(plan.request_id, ok, started, drain=True)
        except Exception as e:  # noqa: BLE001 - the Controller restarting; its policy times the entry out
            log.debug("migration_done for %s not delivered: %s", plan.request_id, e)


class _RaySource:
    """``SourceOps`` over an Instance actor handle."""

    def __init__(self, handle: Any, request_id: str) -> None:
        self.h, self.rid = handle, request_id

    async def context_tokens(self) -> int | None:
        return await self.h.migrate_context.remote(self.rid)

    def export(self, start_token: int) -> Any:
        return self.h.export_kv.remote(self.rid, start_token, None)

    def stop(self, start_token: int) -> Any:
        return self.h.migrate_stop.remote(self.rid, start_token)

    async def resume(self) -> bool:
        return bool(await self.h.migrate_resume.remote(self.rid))

    async def release(self) -> None:
        await self.h.migrate_release.remote(self.rid)


class _RayDestination:
    """``DestinationOps`` over an Instance actor handle; KV pieces go source -> destination as ObjectRefs."""

    def __init__(
        self, handle: Any, request_id: str, rec: RequestRecord, template: EngineRequest, *, preadmit: bool = True
    ) -> None:
        self.h, self.rid, self.rec, self.template, self.preadmit = handle, request_id, rec, template, preadmit

    async def reserve(self, tokens: int) -> str | None:
        # The most the context can reach here (what the commit admits: history + remaining max_tokens), so that a
        # destination that could never hold it refuses now, not at the commit after the request paused for it.
        whole = len(self.rec.prompt_token_ids) + self.rec.sampling.max_tokens
        return await self.h.migrate_reserve.remote(self.rid, tokens, self.template if self.preadmit else None,
                                                   whole_tokens=whole)

    async def stage(self, piece: Any) -> int:
        kind, value = await self.h.migrate_stage.remote(self.rid, [piece])
        if kind == "source":
            raise StepFailed(Side.SOURCE, str(value))
        return int(value)

    async def commit(self, stopped: Any, mode: MigrationMode) -> str | None:
        return await self.h.migrate_commit.remote(
            self.rid, self.template, [stopped], **self.rec.guess()
        )

    async def cancel(self) -> None:
        await self.h.migrate_cancel.remote(self.rid)
