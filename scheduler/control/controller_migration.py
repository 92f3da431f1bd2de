"""The Controller's migration policy loop (``ControllerMigration``, a mixin of ``Controller``): plans on the
Controller's view, handed to the ingress that owns each request's stream (``take_migrations``), outcomes reported
back (``migration_done``) so the policy's rate limits see them. The ingresses execute the plans
(``scheduler.control.ingress_migration``)."""

from __future__ import annotations

import time

from scheduler.core.types import ClusterView
from scheduler.policy.migration import MigrationPlan
from scheduler.transfer.migration import migration_policy


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
                if now - t >= 5.0:  # never started: dropped, not failed (that held the request out of plans 5 s more)
                    policy.on_migration_dropped(p.request_id)
                    self.migration_stats["dropped"] += 1  # counted as planned: its end is counted too
            # An ingress that is gone never takes its key away (ids are random per process): kept empty, it stayed
            # for good, one per dead ingress.
            if kept := [(t, p) for t, p in plans if now - t < 5.0]:
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
        return [p for _, p in self._plans.pop(ingress_id, [])]

    async def migration_done(self, request_id: str, ok: bool, started: bool = True) -> None:
        """An ingress reports a planned migration's outcome (the policy's in-flight limits release it). ``started``
        False: the plan was moot when it arrived (the request finished, moved or left its instance): dropped, as the
        simulator's driver reports it, not a failure that rests the request."""
        self.migration_stats["committed" if ok else "failed" if started else "dropped"] += 1
        if self._migration is None:
            return
        if started:
            self._migration.on_migration_done(request_id, ok=ok)
        else:
            self._migration.on_migration_dropped(request_id)

    async def migration_counters(self) -> dict[str, int]:
        return dict(self.migration_stats)
