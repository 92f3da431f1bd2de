"""The Controller's migration policy loop (``ControllerMigration``, a mixin of ``Controller``): plans on the
Controller's view, handed to the ingress that owns each request's stream (``take_migrations``), outcomes reported
back (``migration_done``) so the policy's rate limits see them. The ingresses execute the plans
(``scheduler.control.ingress_migration``).

An operator's drain runs on the one ingress replica its call reached; the requests other replicas serve on the
draining instance are moved through the same hand-off (``drain_moves``): plans without a destination, which the
owning replica picks as its own migrations do."""

from __future__ import annotations

import time
from dataclasses import dataclass

from scheduler.core.types import ClusterView, Phase
from scheduler.policy.migration import MigrationPlan, MigrationReason
from scheduler.transfer.migration import migration_policy

# Plans not taken by their ingress within this long are dropped (a replica gone, or cut off from the Controller).
PLAN_TTL_S = 5.0
# How many times a drain plans the move of one request of another replica (a move refused, aborted, or moot because
# the request was still prefilling), before it is left to be recovered by re-prefill at the release.
DRAIN_MOVE_TRIES = 20


@dataclass(slots=True)
class _DrainMove:
    """An operator drain's move of a request another ingress replica serves (``ControllerMigration.drain_moves``)."""

    instance_id: str  # the draining instance it moves off
    planned_s: float  # monotonic time of its last plan
    tries: int = 1
    taken: bool = False  # the owning ingress took the plan (``take_migrations``)
    ended: bool = False  # ... and reported its outcome (``migration_done``), or never took it
    committed: bool = False


class ControllerMigration:
    """``Controller``'s migration-plan methods. A mixin (the Controller is one Ray actor): it reads the Controller's
    snapshots and request registry; ``_plans`` and ``migration_stats`` are set up in ``Controller.__init__``."""

    def _init_migration_policy(self) -> None:
        # Protocol knobs are the ingress' (scheduler.transfer.migration); the policy plans with its headroom.
        self._migration = migration_policy(self.config)

    def _policy_tick(self) -> None:
        """Migration policy loop: plan on the live view, hand each plan to the ingress that owns the request's
        stream (from the request registry); ingresses pick them up with ``take_migrations``.

        Rate limits are the policy's (in flight cluster-wide / per instance, ``max_per_s``, cooldowns, per-request
        cooldown), which the simulator applies alike. Plans nobody takes within 5 s are dropped.
        """
        policy = self._migration
        if policy is None or not self._snapshots:
            return
        now = time.time()
        for ing, plans in list(self._plans.items()):
            for t, p in plans:
                if now - t >= PLAN_TTL_S and p.destination:  # (a drain's move, no destination: drain_moves times it)
                    # Never started: dropped, not failed (that held the request out of plans 5 s more).
                    policy.on_migration_dropped(p.request_id)
                    self.migration_stats["dropped"] += 1  # counted as planned: its end is counted too
            # An ingress that is gone never takes its key away (ids are random per process): kept empty, it stayed
            # for good, one per dead ingress.
            if kept := [(t, p) for t, p in plans if now - t < PLAN_TTL_S]:
                self._plans[ing] = kept
            else:
                del self._plans[ing]
        view = ClusterView(now, tuple(self._snapshots[i] for i in sorted(self._snapshots)))
        for plan in policy.plan(view, now):
            entry = self._registry.entries.get(plan.request_id)
            if entry is None:
                policy.on_migration_dropped(plan.request_id)  # never started: planned again next tick if still due
                self.migration_stats["dropped"] += 1
                continue
            self._plans.setdefault(entry.ingress_id, []).append((now, plan))
            self.migration_stats["planned"] += 1

    async def take_migrations(self, ingress_id: str) -> list[MigrationPlan]:
        """The migration plans for requests served by ``ingress_id`` (taken once)."""
        self._ensure_loop()
        self._registry.seen(ingress_id)  # polled every plans_s by every live ingress: its heartbeat
        plans = [p for _, p in self._plans.pop(ingress_id, [])]
        for p in plans:
            if not p.destination and (mv := self._drain_moves.get(p.request_id)) is not None:
                mv.taken = True
        return plans

    async def migration_done(self, request_id: str, ok: bool, started: bool = True, drain: bool = False) -> None:
        """An ingress reports a planned migration's outcome (the policy's in-flight limits release it). ``started``
        False: the plan was moot when it arrived (the request finished, moved or left its instance): dropped, as the
        simulator's driver reports it, not a failure that rests the request. ``drain``: the plan was a drain's move
        (``drain_moves``), which the policy did not plan: only the drain counts it."""
        if drain:
            mv = self._drain_moves.get(request_id)
            if mv is not None and not mv.ended:
                mv.ended, mv.committed = True, ok
                if ok:
                    self._drain_moved[mv.instance_id] = self._drain_moved.get(mv.instance_id, 0) + 1
            return
        self.migration_stats["committed" if ok else "failed" if started else "dropped"] += 1
        if self._migration is None:
            return
        if started:
            self._migration.on_migration_done(request_id, ok=ok)
        else:
            self._migration.on_migration_dropped(request_id)

    async def drain_moves(self, instance_id: str, ingress_id: str) -> tuple[int, int]:
        """An operator's drain of ``instance_id`` runs on ingress ``ingress_id`` (``IngressAdmin._move_off``), which
        moves the requests it serves itself; this moves the others': every request the registry shows decoding there
        for another ingress gets a plan without a destination, handed to that ingress like the policy's
        (``take_migrations``), which picks the destination as its own migrations do (an instance in service) and
        reports the outcome (``migration_done(drain=True)``). A move that did not commit (or could not start: the
        request still prefilling there) is planned again, up to ``DRAIN_MOVE_TRIES`` times. Called again and again
        until the drain releases the instance.

        Returns (the requests of other live ingresses -- heard from within ``PLAN_TTL_S`` -- the drain should still
        wait for: on the instance with a move to come, in flight, or committed but not yet switched over in the
        registry; the moves committed off the
        instance so far). A request paired with the instance while it prefills elsewhere is not waited for: its
        hand-off picks a decoder in service (``Ingress._leaving``); one whose KV is on its way there is planned
        once its ingress reports it landed."""
        self._ensure_loop()
        now, wall = time.monotonic(), time.time()
        moves = self._drain_moves
        waiting = 0
        for e in self._registry.on_instance(instance_id):
            if e.ingress_id == ingress_id:
                continue  # the drain's own ingress moves those
            if self._registry.silent_s(e.ingress_id, now) >= PLAN_TTL_S:
                continue  # one that polls no more (gone: its entries expire) would never take a plan
            if e.instances[0] != instance_id and e.phase in (Phase.QUEUED, Phase.PREFILL):
                continue  # headed here after its prefill elsewhere: it will go elsewhere
            mv = moves.get(e.request_id)
            if mv is not None and mv.instance_id != instance_id:
                mv = None  # an earlier drain's move off another instance
            if mv is not None and not mv.taken and not mv.ended and now - mv.planned_s >= PLAN_TTL_S:
                mv.ended = True  # its ingress never took it (gone, or cut off): planned again below
                if kept := [(t, p) for t, p in self._plans.get(e.ingress_id, []) if p.request_id != e.request_id]:
                    self._plans[e.ingress_id] = kept
                else:
                    self._plans.pop(e.ingress_id, None)
            if mv is None or (mv.ended and not mv.committed):
                tries = mv.tries if mv is not None else 0
                if tries >= DRAIN_MOVE_TRIES:
                    continue  # left to its recovery at the release
                # (Whatever its phase says: an ingress reports a request when its holder changes, so one decoding
                # there for a while can read TRANSFER, or PREFILL on a MIXED instance. The ingress that runs the plan
                # knows: a move it could not start yet ends uncommitted and is planned again.)
                if e.instances == (instance_id,):
                    plan = MigrationPlan(e.request_id, instance_id, "", MigrationReason.DRAIN)
                    self._plans.setdefault(e.ingress_id, []).append((wall, plan))
                    moves[e.request_id] = _DrainMove(instance_id, now, tries + 1)
            waiting += 1
        return waiting, self._drain_moved.get(instance_id, 0)

    def _end_drain_moves(self, instance_id: str) -> None:
        """``instance_id`` left: its drain's moves are over. (From ``Controller._leaves``, which tests also run on a
        Controller built without ``__init__``: nothing to end there.)"""
        moves, moved = self.__dict__.get("_drain_moves", {}), self.__dict__.get("_drain_moved", {})
        moved.pop(instance_id, None)
        for rid in [r for r, mv in moves.items() if mv.instance_id == instance_id]:
            del moves[rid]

    async def migration_counters(self) -> dict[str, int]:
        return dict(self.migration_stats)
