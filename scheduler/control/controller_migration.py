"""The Controller's migration policy loop (``ControllerMigration``, a mixin of ``Controller``): plans on the
Controller's view, handed to the ingress that owns each request's stream (``take_migrations``), outcomes reported
back (``migration_done``) so the policy's rate limits see them. The ingresses execute the plans
(``scheduler.control.ingress_migration``).

An operator's drain runs on the one ingress replica its call reached; the requests other replicas serve on the
draining instance are moved through the same hand-off (``drain_moves``): plans without a destination, which the
owning replica picks as its own migrations do. While a drain runs, the migration policy plans no move off its
instance; a policy plan handed out before it began is the drain's move of that request (counted by the drain, not
planned again)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from scheduler.core.types import ClusterView, Phase
from scheduler.policy.migration import MigrationPlan, MigrationReason
from scheduler.transfer.migration import migration_policy

if TYPE_CHECKING:
    from scheduler.config.models import DrainSpec

# Plans not taken by their ingress within this long are dropped (a replica gone, or cut off from the Controller); an
# ingress not heard from this long is gone to a drain; a drain not heard from this long is over. (A protocol bound,
# a few of the ingresses' poll periods, not an operator's setting; how often a drain retries a move is
# ``config.drain.move_tries``.)
PLAN_TTL_S = 5.0


@dataclass(slots=True)
class _DrainMove:
    """An operator drain's move of a request another ingress replica serves (``ControllerMigration.drain_moves``)."""

    instance_id: str  # the draining instance it moves off
    planned_s: float  # monotonic time of its last plan
    tries: int = 1
    taken: bool = False  # the owning ingress took the plan (``take_migrations``)
    ended: bool = False  # ... and reported its outcome (``migration_done``), or never took it
    committed: bool = False
    policy: bool = False  # the migration policy's plan, handed out before the drain began: adopted, not planned again


class ControllerMigration:
    """``Controller``'s migration-plan methods. A mixin (the Controller is one Ray actor): it reads the Controller's
    snapshots and request registry; ``_plans`` and ``migration_stats`` are set up in ``Controller.__init__``."""

    def _init_migration_policy(self) -> None:
        # Protocol knobs are the ingress' (scheduler.transfer.migration); the policy plans with its headroom.
        self._migration = migration_policy(self.config)

    def _init_drain_moves(self, spec: DrainSpec) -> None:
        """The operator drains' state (``drain_moves``): from ``Controller.__init__``, and tests that build one
        without it."""
        self._drain_move_tries = spec.move_tries
        self._drain_moves: dict[str, _DrainMove] = {}  # request -> an operator drain's move of it
        self._drain_moved: dict[str, int] = {}  # draining instance -> other ingresses' moves committed off it
        self._drains: dict[str, float] = {}  # draining instance -> monotonic time of its drain's last drain_moves
        self._drain_polls: dict[str, int] = {}  # draining instance -> the registry's ``poll_seq`` when it began
        self._policy_moves: dict[str, str] = {}  # request -> source of a policy plan taken, its outcome not reported

    def _drop_policy_plan(self, request_id: str) -> None:
        """A policy plan that never started (not taken in time, its request gone, or its source being drained)."""
        assert self._migration is not None
        self._migration.on_migration_dropped(request_id)
        self.migration_stats["dropped"] += 1
        if (mv := self._drain_moves.get(request_id)) is not None and mv.policy and not mv.ended:
            mv.ended = True  # the drain adopted it: it plans its own move next

    def _drain_move_ended(self, mv: _DrainMove, ok: bool) -> None:
        mv.ended, mv.committed = True, ok
        if ok:
            self._drain_moved[mv.instance_id] = self._drain_moved.get(mv.instance_id, 0) + 1

    def _policy_tick(self) -> None:
        """Migration policy loop: plan on the live view, hand each plan to the ingress that owns the request's
        stream (from the request registry); ingresses pick them up with ``take_migrations``.

        Rate limits are the policy's (in flight cluster-wide / per instance, ``max_per_s``, cooldowns, per-request
        cooldown), which the simulator applies alike. Plans nobody takes within 5 s are dropped.
        """
        policy = self._migration
        if policy is None or not self._snapshots:
            return
        now, mono = time.time(), time.monotonic()
        for ing, plans in list(self._plans.items()):
            for t, p in plans:
                if now - t >= PLAN_TTL_S and p.destination:  # (a drain's move, no destination: drain_moves times it)
                    # Never started: dropped, not failed (that held the request out of plans 5 s more).
                    self._drop_policy_plan(p.request_id)  # counted as planned: its end is counted too
            # An ingress that is gone never takes its key away (ids are random per process): kept empty, it stayed
            # for good, one per dead ingress.
            if kept := [(t, p) for t, p in plans if now - t < PLAN_TTL_S]:
                self._plans[ing] = kept
            else:
                del self._plans[ing]
        view = ClusterView(now, tuple(self._snapshots[i] for i in sorted(self._snapshots)))
        for plan in policy.plan(view, now):
            entry = self._registry.entries.get(plan.request_id)
            # Its request gone (never started: planned again next tick if still due), or its source being drained:
            # the drain moves every request off it (its own ingress's itself, the others' by ``drain_moves``), and
            # a second plan for one of them made it count under the policy's moves, not the drain's.
            if entry is None or mono - self._drains.get(plan.source, float("-inf")) < PLAN_TTL_S:
                self._drop_policy_plan(plan.request_id)
                continue
            self._plans.setdefault(entry.ingress_id, []).append((now, plan))
            self.migration_stats["planned"] += 1

    async def take_migrations(self, ingress_id: str) -> list[MigrationPlan]:
        """The migration plans for requests served by ``ingress_id`` (taken once)."""
        self._ensure_loop()
        self._registry.polled(ingress_id)  # polled every plans_s by every live ingress: its heartbeat
        plans = [p for _, p in self._plans.pop(ingress_id, [])]
        for p in plans:
            mv = self._drain_moves.get(p.request_id)
            if p.destination:
                self._policy_moves[p.request_id] = p.source
            if mv is not None and (mv.policy or not p.destination):
                mv.taken = True
        return plans

    async def migration_done(self, request_id: str, ok: bool, started: bool = True, drain: bool = False) -> None:
        """An ingress reports a planned migration's outcome (the policy's in-flight limits release it). ``started``
        False: the plan was moot when it arrived (the request finished, moved or left its instance): dropped, as the
        simulator's driver reports it, not a failure that rests the request. ``drain``: the plan was a drain's move
        (``drain_moves``), which the policy did not plan: only the drain counts it."""
        mv = self._drain_moves.get(request_id)
        if drain:
            if mv is not None and not mv.ended:
                self._drain_move_ended(mv, ok)
            return
        self._policy_moves.pop(request_id, None)
        if mv is not None and mv.policy and not mv.ended:  # a policy move the drain adopted: the drain counts it
            self._drain_move_ended(mv, ok)
        self.migration_stats["committed" if ok else "failed" if started else "dropped"] += 1
        if self._migration is None:
            return
        if started:
            self._migration.on_migration_done(request_id, ok=ok)
        else:
            self._migration.on_migration_dropped(request_id)

    async def drain_moves(self, instance_id: str, ingress_id: str) -> tuple[int, int, bool]:
        """An operator's drain of ``instance_id`` runs on ingress ``ingress_id`` (``IngressAdmin._move_off``), which
        moves the requests it serves itself; this moves the others': every request the registry shows decoding there
        for another ingress gets a plan without a destination, handed to that ingress like the policy's
        (``take_migrations``), which picks the destination as its own migrations do (an instance in service) and
        reports the outcome (``migration_done(drain=True)``). A move that did not commit (or could not start: the
        request still prefilling there) is planned again, up to ``config.drain.move_tries`` times. Called again and
        again until the drain releases the instance. A request the migration policy's plan moves off already
        (handed out before the drain began) is not planned again: that plan is its move, counted here if it commits.

        Returns (the requests of other live ingresses -- heard from within ``PLAN_TTL_S`` -- the drain should
        still wait for: on the instance with a move to come, in flight, or committed but not yet switched over
        in the registry; the moves committed off the instance so far; whether the registry is complete for the
        instance: every other live ingress has polled (``take_migrations``) twice since the drain began -- at
        once when none is live; within ``PLAN_TTL_S`` of a restart, every other heard from so far). An ingress
        flushes its unreported changes before each poll, so the second poll's flush came after the first's
        answer, sent after the drain began: after the instance went out of service, so every request of that
        ingress there is in the registry. (A fixed two report periods missed a replica whose report came later
        on a loaded host: its streams were re-prefilled.) A live but slow ingress is waited for
        (``peer_wait_s``, the node's deadline at most); one silent for ``PLAN_TTL_S`` is gone and not. A
        request paired with the instance while it prefills elsewhere is not waited for: its hand-off picks a
        decoder in service (``Ingress._leaving``); one whose KV is on its way there is planned once its
        ingress reports it landed."""
        self._ensure_loop()
        now, wall = time.monotonic(), time.time()
        moves = self._drain_moves
        if now - self._drains.get(instance_id, float("-inf")) >= PLAN_TTL_S:  # it begins (an earlier one is over)
            self._drain_polls[instance_id] = self._registry.poll_seq
        self._drains[instance_id] = now
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
            if mv is None and self._policy_moving(e.request_id, e.ingress_id, instance_id):
                mv = moves[e.request_id] = _DrainMove(instance_id, now, 0, policy=True)  # (its TTL: _policy_tick)
            if (mv is not None and not mv.policy and not mv.taken and not mv.ended
                    and now - mv.planned_s >= PLAN_TTL_S):
                mv.ended = True  # its ingress never took it (gone, or cut off): planned again below
                if kept := [(t, p) for t, p in self._plans.get(e.ingress_id, []) if p.request_id != e.request_id]:
                    self._plans[e.ingress_id] = kept
                else:
                    self._plans.pop(e.ingress_id, None)
            if mv is None or (mv.ended and not mv.committed):
                tries = mv.tries if mv is not None else 0
                if tries >= self._drain_move_tries:
                    continue  # left to its recovery at the release
                # (Whatever its phase says: an ingress reports a request when its holder changes, so one decoding
                # there for a while can read TRANSFER, or PREFILL on a MIXED instance. The ingress that runs the plan
                # knows: a move it could not start yet ends uncommitted and is planned again.)
                if e.instances == (instance_id,):
                    plan = MigrationPlan(e.request_id, instance_id, "", MigrationReason.DRAIN)
                    self._plans.setdefault(e.ingress_id, []).append((wall, plan))
                    moves[e.request_id] = _DrainMove(instance_id, now, tries + 1)
            waiting += 1
        # (Within PLAN_TTL_S of a restart, those heard from so far: a live one that has not reported or polled yet
        # is not known. An ingress reports once as it starts, before it routes anything.)
        live = self._registry.heard(PLAN_TTL_S, now)
        began = self._drain_polls[instance_id]
        heard = all(self._registry.polled_twice_since(i, began) for i in live - {ingress_id})
        return waiting, self._drain_moved.get(instance_id, 0), heard

    def _policy_moving(self, request_id: str, ingress_id: str, instance_id: str) -> bool:
        """A policy plan moves ``request_id`` off ``instance_id``: handed out, or queued for ``ingress_id``."""
        return self._policy_moves.get(request_id) == instance_id or any(
            p.request_id == request_id and p.destination and p.source == instance_id
            for _, p in self._plans.get(ingress_id, ()))

    def _end_drain_moves(self, instance_id: str) -> None:
        """``instance_id`` left (``Controller._leaves``): its drain's moves are over."""
        self._drain_moved.pop(instance_id, None)
        self._drains.pop(instance_id, None)
        self._drain_polls.pop(instance_id, None)
        for rid in [r for r, mv in self._drain_moves.items() if mv.instance_id == instance_id]:
            del self._drain_moves[rid]
        for rid in [r for r, src in self._policy_moves.items() if src == instance_id]:
            del self._policy_moves[rid]

    async def migration_counters(self) -> dict[str, int]:
        return dict(self.migration_stats)
