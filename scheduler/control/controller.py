"""``Controller``: the one named actor that places instances and holds the global view. Never on the hot path.

::

    ClusterConfig.pools --place--> placement group per instance --> Instance actor (named, detached)
          ^                                                               |
          | scale / drain / release             snapshots every refresh_s |
          |                                                               v
      admin ops  <------------------------  cluster view  ------>  policy loops (migration, scaling)
                                                  ^
    ingress replicas --report_requests (batched)--+  (request registry for cross-replica cancel / recovery)

Fault tolerance: the Controller is created with ``max_restarts=-1``; instances and their placement groups are
detached and named (``llmsched/<cluster>/...``), so they survive it. A restarted Controller re-runs ``__init__``,
which adopts every live named instance of its cluster (``_adopt``); desired pool sizes live in Ray's internal KV.
Ingresses keep routing from their own cached view meanwhile and re-send their request registry on the next report.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from typing import Any

import ray
from ray.actor import ActorHandle

from scheduler.config.models import ClusterConfig, PoolSpec
from scheduler.control.instance import Instance, InstanceInfo
from scheduler.control.placement import (
    InstancePlacement,
    actor_options,
    bundle_nodes,
    cluster_has_gpus,
    create_instance_pg,
    plan_placement,
    remove_instance_pg,
)
from scheduler.control.registry import EntryTable, RegistryEntry
from scheduler.core.types import ClusterView, InstanceSnapshot
from scheduler.policy.migration import MigrationPlan, MigrationPolicy, make_migration_policy

log = logging.getLogger(__name__)

NAMESPACE = "llmsched"
CONTROLLER_NAME = "llmsched-controller"


def instance_actor_name(cluster: str, instance_id: str) -> str:
    return f"llmsched/{cluster}/inst/{instance_id}"


@dataclass(frozen=True, slots=True)
class Member:
    """One live instance as the Controller hands it to ingresses (handles pickle across processes)."""

    handle: ActorHandle
    info: InstanceInfo


class Controller:
    """Async Ray actor. Create through ``cluster.deploy`` (name, namespace, ``max_restarts=-1``).

    Args:
        config: the deployment (pools, model, GPU catalog, policies).
        cluster: name used in actor/placement-group names (several clusters can share one Ray cluster).
        backend_kwargs: per backend kind, extra kwargs for every instance (``{"simulated": {"time_scale": .5}}``).
        refresh_s: period of the Controller's own snapshot poll (admin view, policy loops).
        detached_instances: create instances and groups detached (survive the Controller and the driver).
    """

    def __init__(
        self,
        config: ClusterConfig,
        *,
        cluster: str = "default",
        backend_kwargs: dict[str, dict[str, Any]] | None = None,
        refresh_s: float = 0.1,
        detached_instances: bool = True,
        namespace: str = NAMESPACE,
    ) -> None:
        self.config = config
        self.cluster = cluster
        self.namespace = namespace
        self._backend_kwargs = backend_kwargs or {}
        self._refresh_s = refresh_s
        self._detached = detached_instances
        self._use_gpus = cluster_has_gpus()
        self._members: dict[str, Member] = {}
        self._snapshots: dict[str, InstanceSnapshot] = {}
        self._registry = EntryTable()
        self._pools = {p.name: p for p in config.pools}
        self._desired = self._load_desired()
        self._next_index: dict[str, int] = {p.name: 0 for p in config.pools}
        self._pending: dict[str, asyncio.Task[Any]] = {}  # instance_id -> creation task
        self._loop_task: asyncio.Task[None] | None = None
        self._lock: asyncio.Lock | None = None
        self.started_s = time.time()
        self.restarted = ray.get_runtime_context().was_current_actor_reconstructed
        self.epoch = f"{self.started_s:.6f}"
        self._migration: MigrationPolicy | None = None
        self._migration_max_per_s = 2.0
        self._plans: dict[str, list[tuple[float, MigrationPlan]]] = {}  # ingress id -> plans it has to execute
        self._plan_times: list[float] = []
        self.migration_stats = {"planned": 0, "dropped": 0, "committed": 0, "failed": 0}
        self._init_migration_policy()
        self._adopt()

    # ---- state that survives restarts -----------------------------------------------------------------
    def _kv_key(self) -> bytes:
        return f"llmsched/{self.cluster}/desired".encode()

    def _load_desired(self) -> dict[str, int]:
        from ray.experimental import internal_kv

        desired = {p.name: p.count for p in self.config.pools}
        raw = internal_kv._internal_kv_get(self._kv_key(), namespace=self.namespace)
        if raw:
            desired.update({k: int(v) for k, v in json.loads(raw).items() if k in desired})
        return desired

    def _save_desired(self) -> None:
        from ray.experimental import internal_kv

        internal_kv._internal_kv_put(self._kv_key(), json.dumps(self._desired), overwrite=True,
                                     namespace=self.namespace)

    def _adopt(self) -> None:
        """Find this cluster's live named instances (after a restart, or a redeploy of the same name)."""
        prefix = instance_actor_name(self.cluster, "")
        for entry in ray.util.list_named_actors(all_namespaces=True):
            if entry.get("namespace") != self.namespace or not entry["name"].startswith(prefix):
                continue
            try:
                handle = ray.get_actor(entry["name"], namespace=self.namespace)
                info = ray.get(handle.get_info.remote(), timeout=5)
            except Exception as e:  # noqa: BLE001 - dead or dying: the reconcile loop replaces it
                log.warning("not adopting %s: %s", entry["name"], type(e).__name__)
                continue
            self._members[info.instance_id] = Member(handle, info)
            n = _index_of(info.instance_id)
            if info.pool in self._next_index and n is not None:
                self._next_index[info.pool] = max(self._next_index[info.pool], n + 1)
        if self._members:
            log.info("controller %s adopted %d live instance(s)", self.cluster, len(self._members))

    # ---- loops ----------------------------------------------------------------------------------------
    def _ensure_loop(self) -> None:
        # NOTE: an async actor's __init__ runs outside its event loop; the loop starts on the first call.
        if self._loop_task is None:
            self._lock = asyncio.Lock()
            self._loop_task = asyncio.create_task(self._loop())

    async def _loop(self) -> None:
        last_reconcile = 0.0
        while True:
            try:
                await self._refresh()
                if time.monotonic() - last_reconcile > 0.5:
                    last_reconcile = time.monotonic()
                    await self._reconcile(wait=False)
                    self._policy_tick()
            except Exception:
                log.exception("controller loop round failed")
            await asyncio.sleep(self._refresh_s)

    async def _refresh(self) -> None:
        items = list(self._members.items())
        if not items:
            return
        results = await asyncio.gather(
            *(asyncio.wait_for(_await(m.handle.snapshot.remote()), 2.0) for _, m in items), return_exceptions=True
        )
        for (iid, m), res in zip(items, results):
            if isinstance(res, InstanceSnapshot):
                self._snapshots[iid] = res
            elif isinstance(res, ray.exceptions.RayActorError):
                log.warning("instance %s died: %s", iid, type(res).__name__)
                self._forget(iid)
            # timeouts: keep the last snapshot; a hung instance is caught by its ingress' poll timeouts

    def _forget(self, iid: str) -> None:
        self._members.pop(iid, None)
        self._snapshots.pop(iid, None)
        remove_instance_pg(self.cluster, iid)

    def _init_migration_policy(self) -> None:
        spec = self.config.policies.migration
        if spec is None:
            return
        params = dict(spec.params)
        params.pop("protocol", None)  # protocol knobs are the ingress' (scheduler.transfer.migration)
        self._migration_max_per_s = float(params.pop("max_per_s", self._migration_max_per_s))
        self._migration = make_migration_policy(spec.name, **params)

    def _policy_tick(self) -> None:
        """Migration policy loop: plan on the live view, hand each plan to the ingress that owns the request's
        stream (from the request registry); ingresses pick them up with ``take_migrations``.

        Rate limits: the policy's own (in flight cluster-wide / per instance, cooldowns, per-request cooldown)
        plus ``max_per_s`` plans per second here. Plans nobody takes within 5 s are dropped.
        """
        # NOTE(control): config.policies.scaling is accepted but not acted on yet.
        policy = self._migration
        if policy is None or not self._snapshots:
            return
        now = time.time()
        for ing, plans in list(self._plans.items()):
            for t, p in plans:
                if now - t >= 5.0:
                    policy.on_migration_done(p.request_id, ok=False)
            self._plans[ing] = [(t, p) for t, p in plans if now - t < 5.0]
        self._plan_times = [t for t in self._plan_times if now - t < 1.0]
        view = ClusterView(now, tuple(self._snapshots[i] for i in sorted(self._snapshots)))
        for plan in policy.plan(view, now):
            entry = self._registry.entries.get(plan.request_id)
            if entry is None or len(self._plan_times) >= self._migration_max_per_s:
                policy.on_migration_done(plan.request_id, ok=False)
                self.migration_stats["dropped"] += 1
                continue
            self._plan_times.append(now)
            self._plans.setdefault(entry.ingress_id, []).append((now, plan))
            self.migration_stats["planned"] += 1

    async def take_migrations(self, ingress_id: str) -> list[MigrationPlan]:
        """The migration plans for requests served by ``ingress_id`` (taken once)."""
        self._ensure_loop()
        return [p for _, p in self._plans.pop(ingress_id, [])]

    async def migration_done(self, request_id: str, ok: bool) -> None:
        """An ingress reports a planned migration's outcome (the policy's in-flight limits release it)."""
        self.migration_stats["committed" if ok else "failed"] += 1
        if self._migration is not None:
            self._migration.on_migration_done(request_id, ok=ok)

    async def migration_counters(self) -> dict[str, int]:
        return dict(self.migration_stats)

    async def _reconcile(self, *, wait: bool) -> None:
        """Create instances until every pool has its desired count (replacing dead ones); remove extras."""
        assert self._lock is not None
        async with self._lock:
            for pool in self.config.pools:
                have = sorted(
                    [i for i, m in self._members.items() if m.info.pool == pool.name]
                    + [i for i in self._pending if i.rsplit("-", 1)[0] == pool.name],
                    key=lambda i: _index_of(i) or 0,
                )
                want = self._desired.get(pool.name, pool.count)
                for _ in range(want - len(have)):
                    iid = f"{pool.name}-{self._next_index[pool.name]}"
                    self._next_index[pool.name] += 1
                    self._pending[iid] = asyncio.create_task(self._create(pool, iid))
                for iid in have[want:][::-1] if len(have) > want else ():
                    if iid in self._members:
                        await self._release(iid)
        if wait and self._pending:
            await asyncio.gather(*self._pending.values(), return_exceptions=True)

    async def _create(self, pool: PoolSpec, iid: str) -> None:
        try:
            plan: InstancePlacement = plan_placement(pool, use_gpus=self._use_gpus)
            pg = create_instance_pg(self.cluster, iid, plan, detached=self._detached)
            await pg.ready()
            opts = actor_options(pg, plan)
            handle = (
                ray.remote(Instance)
                .options(
                    name=instance_actor_name(self.cluster, iid),
                    namespace=self.namespace,
                    lifetime="detached" if self._detached else None,
                    max_restarts=0,
                    max_concurrency=1000,
                    **opts,
                )
                .remote(iid, pool, self.config.model, self.config.gpus[pool.gpu],
                        backend_kwargs=self._backend_kwargs.get(pool.backend))
            )
            info = await handle.start.remote()
            self._members[iid] = Member(handle, info)
            log.info("instance %s up on node %s (bundles on %s)", iid, info.node_id[:8], bundle_nodes(pg))
        except Exception:
            log.exception("creating instance %s failed", iid)
            remove_instance_pg(self.cluster, iid)
        finally:
            self._pending.pop(iid, None)

    async def _release(self, iid: str) -> bool:
        m = self._members.pop(iid, None)
        self._snapshots.pop(iid, None)
        if m is None:
            return False
        try:
            await asyncio.wait_for(_await(m.handle.shutdown.remote()), 5.0)
        except Exception as e:  # noqa: BLE001 - killing it anyway
            log.info("instance %s did not shut down cleanly: %s", iid, type(e).__name__)
        ray.kill(m.handle, no_restart=True)
        remove_instance_pg(self.cluster, iid)
        return True

    # ---- API ------------------------------------------------------------------------------------------
    async def ready(self, timeout_s: float = 120.0) -> dict[str, InstanceInfo]:
        """Place every pool's instances and wait until they run; returns id -> info."""
        self._ensure_loop()
        await asyncio.wait_for(self._reconcile(wait=True), timeout_s)
        await self._refresh()
        return {i: m.info for i, m in self._members.items()}

    async def spec(self) -> tuple[ClusterConfig, dict[str, dict[str, Any]]]:
        """The deployment's config and per-backend kwargs (an ingress in another process builds from them)."""
        return self.config, self._backend_kwargs

    async def ping(self) -> dict[str, Any]:
        self._ensure_loop()
        return {"epoch": self.epoch, "restarted": self.restarted, "instances": len(self._members)}

    async def members(self) -> dict[str, Member]:
        """Live instances with their handles: what an ingress needs to poll them directly."""
        self._ensure_loop()
        return dict(self._members)

    async def view(self) -> ClusterView:
        self._ensure_loop()
        return ClusterView(time.time(), tuple(self._snapshots[i] for i in sorted(self._snapshots)))

    async def report_requests(
        self, ingress_id: str, upserts: list[RegistryEntry], removed: list[str], full: bool = False
    ) -> str:
        """Ingresses report in-flight requests in batches; the answer is this Controller's epoch, which
        changes on restart (the ingress then re-sends everything with ``full=True``)."""
        self._ensure_loop()
        self._registry.apply(ingress_id, upserts, removed, full=full)
        return self.epoch

    async def lookup(self, request_id: str) -> RegistryEntry | None:
        self._ensure_loop()
        return self._registry.entries.get(request_id)

    async def requests_on(self, instance_id: str) -> list[RegistryEntry]:
        self._ensure_loop()
        return self._registry.on_instance(instance_id)

    async def num_requests(self) -> int:
        return len(self._registry.entries)

    async def scale(self, pool: str, count: int) -> int:
        """Set pool ``pool`` to ``count`` instances; returns the previous desired count."""
        self._ensure_loop()
        if pool not in self._pools:
            raise ValueError(f"pool: unknown pool {pool!r}; allowed: {', '.join(sorted(self._pools))}")
        if count < 0:
            raise ValueError(f"count: must be >= 0, got {count}")
        before = self._desired.get(pool, 0)
        self._desired[pool] = count
        self._save_desired()
        await self._reconcile(wait=True)
        return before

    async def set_draining(self, instance_id: str, draining: bool = True) -> bool:
        self._ensure_loop()
        m = self._members.get(instance_id)
        if m is None:
            return False
        await m.handle.set_draining.remote(draining)
        return True

    async def release(self, instance_id: str, *, replace: bool = False) -> bool:
        """Stop an instance. Without ``replace`` its pool shrinks by one (a drained instance stays gone)."""
        self._ensure_loop()
        m = self._members.get(instance_id)
        if m is None:
            return False
        if not replace:
            self._desired[m.info.pool] = max(self._desired.get(m.info.pool, 1) - 1, 0)
            self._save_desired()
        assert self._lock is not None
        async with self._lock:
            return await self._release(instance_id)

    async def placement(self) -> dict[str, list[str]]:
        """Instance id -> node id of each of its bundles (tests check STRICT_PACK and GPU-type pinning)."""
        from scheduler.control.placement import find_pg, pg_name

        out = {}
        for iid in self._members:
            pg = find_pg(pg_name(self.cluster, iid))
            out[iid] = bundle_nodes(pg) if pg is not None else []
        return out

    async def shutdown(self) -> None:
        """Release every instance and forget the desired sizes (a full teardown, not a crash)."""
        if self._loop_task is not None:
            self._loop_task.cancel()
        for t in list(self._pending.values()):
            await asyncio.gather(t, return_exceptions=True)
        for iid in list(self._members):
            await self._release(iid)
        from ray.experimental import internal_kv

        internal_kv._internal_kv_del(self._kv_key(), namespace=self.namespace)


async def _await(ref: Any) -> Any:
    return await ref


def _index_of(instance_id: str) -> int | None:
    tail = instance_id.rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else None
