"""``Controller``: the one named actor that places instances and holds the global view. Never on the hot path.

::

    ClusterConfig.pools --place--> placement group per instance --> Instance actor (named, detached)
          ^                                                               |
          | scale / drain / release             snapshots every refresh_s |
          |                                                               v
      admin ops  <------------------------  cluster view  ------>  policy loops (migration, scaling)
                                                  ^
    ingress replicas --report_requests (batched)--+  (request registry for cross-replica cancel / recovery)
    ingress replicas --share_lengths (each plans period)-> merged online length histories (predict/shared.py)

Fault tolerance: the Controller is created with ``max_restarts=-1``; instances and their placement groups are
detached and named (``llmsched/<cluster>/...``), so they survive it. A restarted Controller re-runs ``__init__``,
which adopts every live named instance of its cluster (``_adopt``) but those it was releasing (killed); desired pool
sizes and the releases in flight live in Ray's internal KV.
Ingresses keep routing from their own cached view meanwhile and re-send their request registry on the next report.

Scaling loop (``policies.scaling``): every ``scaling_interval_s`` the scaling policy decides on the live view;
a scale-up raises the pool's desired count (after growing the KubeRay worker group of its GPU type when running
under Kubernetes, ``scheduler.deploy.autoscale``); a scale-down first calls off instances still being placed
(they serve nothing yet, as the simulator cancels its starting ones), then marks the chosen instances draining
(routers skip them; the migration policy, if any, moves their requests), releases each once it is idle (or after
``drain_timeout_s``), then shrinks the worker group, naming the worker pods left without an instance. The same
loop applies re-roling (``policies.reroling``, or an operator's ``switch_role``): ``scheduler.control.reroling``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import ray
from ray.actor import ActorHandle

from scheduler.config.models import UNHEALTHY_AFTER_S, ClusterConfig, PoolSpec
from scheduler.control.controller_admin import ControllerAdmin
from scheduler.control.controller_migration import ControllerMigration
from scheduler.control.controller_scaling import ControllerScaling, _WorkloadWindow
from scheduler.control.instance import Instance, InstanceInfo
from scheduler.control.placement import (
    InstancePlacement,
    actor_options,
    bundle_nodes,
    cluster_has_gpus,
    create_instance_pg,
    gpu_type_resource,
    pg_name,
    plan_placement,
    remove_instance_pg,
)
from scheduler.control.registry import EntryTable, RegistryEntry
from scheduler.control.reroling import RoleSwitcher
from scheduler.control.util import _await, _index_of, _pool_of
from scheduler.core.types import ClusterView, InstanceSnapshot
from scheduler.deploy.autoscale import KubernetesBackend
from scheduler.policy.migration import MigrationPlan, MigrationPolicy
from scheduler.policy.scaling import (
    ScalingLoop,
    ScalingPolicy,
)
from scheduler.predict.shared import LengthLog, LengthReply, LengthReport

log = logging.getLogger(__name__)

NAMESPACE = "llmsched"
CONTROLLER_NAME = "llmsched-controller"
# After an instance of a pool failed to start (its start raised or outlasted ``pools[].start_timeout_s``), the next
# start in that pool waits this long, doubling with each failure in a row up to the max: a start that fails at once
# (a bad model path) would otherwise place a new actor and group every reconcile round (0.5 s), for good.
START_RETRY_S = 1.0
START_RETRY_MAX_S = 120.0
# How long a release waits for ``Instance.shutdown`` (its streams' hand-over) before it kills the actor anyway.
RELEASE_TIMEOUT_S = 5.0


def actor_gone(e: BaseException) -> bool:
    """Ray confirmed the actor dead. ``ActorUnavailableError`` (a ``RayActorError``) says it may come back."""
    return isinstance(e, ray.exceptions.RayActorError) and not isinstance(e, ray.exceptions.ActorUnavailableError)


async def ask_each(
    items: list[tuple[str, Any]], ask: Callable[[str, Any], Awaitable[Any]], pending: dict[str, asyncio.Future[Any]],
    timeout_s: float,
) -> list[Any]:
    """``ask(key, item)`` for each of ``items`` at once (a refresh round's snapshots): its answer, or the error it
    raised (``TimeoutError`` past ``timeout_s``), in ``items``' order. A call that outlasts ``timeout_s`` is kept in
    ``pending``, and its key is neither asked nor waited for again until that call has ended (a timeout again, at
    once; then asked afresh). Waited for every round, one silent instance (a blocked actor, a step holding the stats
    lock: up to its ``hang_timeout_s``) held every round for ``timeout_s``: an ingress's view of the whole cluster was
    refreshed 4 times in 3 s instead of 300, and the Controller's loop (deaths, replacements, policies) ran as late."""
    keys = {key for key, _ in items}
    for key in set(pending) - keys:  # no longer asked (not a member any more)
        pending.pop(key).cancel()
    calls: dict[str, asyncio.Future[Any]] = {}
    for key, item in items:
        old = pending.pop(key, None)
        if old is not None and not old.done():
            pending[key] = old
            continue
        if old is not None and not old.cancelled():
            old.exception()  # retrieved; its answer is as old as the call: asked afresh
        calls[key] = asyncio.ensure_future(ask(key, item))
    try:
        if calls:
            await asyncio.wait(calls.values(), timeout=timeout_s)
    except BaseException:  # cancelled: no call left behind
        for t in calls.values():
            t.cancel()
        raise
    out: list[Any] = []
    for key, _ in items:
        t = calls.get(key)
        if t is None or not t.done():
            if t is not None:
                pending[key] = t
            out.append(TimeoutError())
        else:
            out.append(t.exception() or t.result())
    return out


def instance_actor_name(cluster: str, instance_id: str) -> str:
    return f"llmsched/{cluster}/inst/{instance_id}"


@dataclass(frozen=True, slots=True)
class Member:
    """One live instance as the Controller hands it to ingresses (handles pickle across processes)."""

    handle: ActorHandle
    info: InstanceInfo


class Controller(ControllerMigration, ControllerScaling, ControllerAdmin):
    """Async Ray actor. Create through ``cluster.deploy`` (name, namespace, ``max_restarts=-1``).

    Args:
        config: the deployment (pools, model, GPU catalog, policies).
        cluster: name used in actor/placement-group names (several clusters can share one Ray cluster).
        backend_kwargs: per backend kind, extra kwargs for every instance (``{"simulated": {"time_scale": .5}}``).
        refresh_s: period of the Controller's own snapshot poll (admin view, policy loops).
        detached_instances: create instances and groups detached (survive the Controller and the driver).
        kubernetes: the KubeRay RayCluster to size (tests inject one pointing at an in-memory API server);
            default from ``LLMSCHED_RAYCLUSTER`` / ``LLMSCHED_NAMESPACE`` (the Helm chart), else none.
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
        kubernetes: KubernetesBackend | None = None,
    ) -> None:
        self.config = config
        self.cluster = cluster
        self.namespace = namespace
        self._backend_kwargs = instance_backend_kwargs(config, backend_kwargs)
        self._refresh_s = refresh_s
        self._detached = detached_instances
        self._use_gpus = cluster_has_gpus()
        self._members: dict[str, Member] = {}
        self._snapshots: dict[str, InstanceSnapshot] = {}
        self._role_round: dict[str, int] = {}  # instance -> refresh round of the Controller's last switch of its role
        self._registry = EntryTable()
        self._pools = {p.name: p for p in config.pools}
        self._desired = self._load_desired()
        # Per pool, the next instance number; persisted (an instance that died while the Controller was down left
        # no trace among the adopted ones, and its replacement took its id and the state keyed by it).
        self._next_index: dict[str, int] = {p.name: 0 for p in config.pools}
        self._next_index.update({k: int(v) for k, v in (self._kv_get("next_index") or {}).items()
                                 if k in self._next_index})
        self._pending: dict[str, asyncio.Task[Any]] = {}  # instance_id -> creation task
        self._releasing: dict[str, asyncio.Task[None]] = {}  # instance_id -> its release in flight (see _release)
        self._adopted: list[str] = []  # adopted in __init__, to be started (see _start_adopted)
        # Adopted instances with no snapshot since: whether one is leaving (an admin drain) is known from its first
        # snapshot only, and ``_reconcile`` picks no member to release before it has it.
        self._unreported: set[str] = set()
        self._starting: set[str] = set()  # adopted instances being started: "not started" is no engine failure
        self._failing: dict[str, float] = {}  # instance -> monotonic time of its first failed snapshot in a row
        self._probes: dict[str, asyncio.Future[Any]] = {}  # instance -> its snapshot call that outlasted a round
        # pool -> (failed starts in a row, monotonic time before which none is started): see START_RETRY_S
        self._start_failures: dict[str, tuple[int, float]] = {}
        self._loop_task: asyncio.Task[None] | None = None
        self._lock: asyncio.Lock | None = None
        self.started_s = time.time()
        self.restarted = ray.get_runtime_context().was_current_actor_reconstructed
        self.epoch = f"{self.started_s:.6f}"
        # The ingress replicas' online length histories, merged (``share_lengths``); not persisted: a restarted
        # Controller is seeded by the first replica that reports (``scheduler/predict/shared.py``).
        self._lengths = LengthLog(self.epoch)
        self._migration: MigrationPolicy | None = None
        self._plans: dict[str, list[tuple[float, MigrationPlan]]] = {}  # ingress id -> plans it has to execute
        self.migration_stats = {"planned": 0, "dropped": 0, "committed": 0, "failed": 0}
        self._init_drain_moves(config.drain)
        self._init_migration_policy()
        self._k8s = kubernetes if kubernetes is not None else _kubernetes_from_env()
        self._scaling: ScalingPolicy | None = None
        self._scaling_interval_s = ScalingLoop.interval_s
        self._drain_timeout_s = ScalingLoop.drain_timeout_s
        self._scaling_task: asyncio.Task[None] | None = None
        self._draining: dict[str, tuple[float, int]] = {}  # id -> (release deadline, refresh round at drain)
        self._operator_drained: set[str] = set()  # drained by an operator (set_draining), not by the scaling loop
        # On a draining node, their replacement started ahead of them (``_replace_ahead``): counted out of their
        # pool when they go, however they go (``_end_replaced_ahead``).
        self._replaced_ahead: set[str] = set()
        self._refresh_round = 0
        self._k8s_shrink_due = False
        self._workload = _WorkloadWindow()
        self.scaling_stats = {"up": 0, "down": 0, "released": 0, "forced_releases": 0, "k8s_resizes": 0,
                              "k8s_errors": 0}
        self._scaling_events: deque[dict[str, Any]] = deque(maxlen=200)
        self._init_scaling_policy()
        self._switcher = RoleSwitcher.from_config(self)
        self._adopt()
        self._restore_marks()

    def _restore_marks(self) -> None:
        """After ``_adopt``: the marks of the instances adopted -- a replacement started ahead, an operator's drain
        (read here, not with the scaling loop's drains: a deployment without that loop lost them at a restart).
        A replacement-ahead mark of an instance that went while no Controller ran (it died, or ``_adopt`` killed
        it) counts it out of its pool as ``_leaves(..., "lost")`` would have: dropped, the pool stayed one bigger
        for good."""
        for iid in self._kv_get("replaced_ahead") or []:
            if iid in self._members:
                self._replaced_ahead.add(iid)
            elif (pool := _pool_of(iid)) in self._desired:
                log.info("instance %s, replaced ahead, went while no Controller ran; pool %s counts it out", iid, pool)
                self._desired[pool] = max(self._desired[pool] - 1, 0)
                self._save_desired()
        self._save_replaced_ahead()
        self._operator_drained.update(i for i in self._kv_get("operator_draining") or [] if i in self._members)

    # ---- state that survives restarts -----------------------------------------------------------------
    def _load_desired(self) -> dict[str, int]:
        return restored_desired({p.name: p.count for p in self.config.pools}, self._kv_get("desired"),
                                self._kv_get("configured"))

    def _save_desired(self) -> None:
        self._kv_put("desired", self._desired)
        self._kv_put("configured", {p.name: p.count for p in self.config.pools})

    # Work in progress that must survive a restart: one JSON record in Ray's internal KV, llmsched/<cluster>/state,
    # with these entries. Written once per step of the event loop that changed it (``_kv_put`` defers the write to
    # the loop's next turn), so the parts of one transition -- a pool's count and its instance's mark, a release
    # counted out of its pool and recorded "releasing" -- are persisted together or not at all. Each entry its own
    # key, written one after another, a Controller killed between two writes restarted with a count and a mark that
    # disagreed (a drain's replacement released in its place: CI, test_drain_node_pd).
    _KV_NAMES = ("desired", "configured", "draining", "switching", "operator_draining", "next_index", "releasing",
                 "replaced_ahead")
    _kv: dict[str, Any] | None = None  # the record as this Controller last wrote or read it
    _kv_due = False  # a write is scheduled on the loop
    _kv_closed = False  # shut down: the record is deleted, nothing written again

    def _kv_key(self, name: str) -> bytes:
        return f"llmsched/{self.cluster}/{name}".encode()

    def _kv_record(self) -> dict[str, Any]:
        if self._kv is None:
            from ray.experimental import internal_kv

            raw = internal_kv._internal_kv_get(self._kv_key("state"), namespace=self.namespace)
            self._kv = json.loads(raw) if raw else {}
        return self._kv

    def _kv_put(self, name: str, value: Any) -> None:
        assert name in self._KV_NAMES, name
        self._kv_record()[name] = value
        if self._kv_due:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # ``__init__`` runs outside the actor's loop: at once
            self._kv_write()
            return
        self._kv_due = True
        loop.call_soon(self._kv_write)

    def _kv_write(self) -> None:
        from ray.experimental import internal_kv

        self._kv_due = False
        if not self._kv_closed:
            internal_kv._internal_kv_put(self._kv_key("state"), json.dumps(self._kv_record()), overwrite=True,
                                         namespace=self.namespace)

    def _kv_get(self, name: str) -> Any:
        return self._kv_record().get(name)

    def _adopt(self) -> None:
        """Find this cluster's live named instances (after a restart, or a redeploy of the same name)."""
        prefix = instance_actor_name(self.cluster, "")
        releasing = set(self._kv_get("releasing") or [])
        for entry in ray.util.list_named_actors(all_namespaces=True):
            if entry.get("namespace") != self.namespace or not entry["name"].startswith(prefix):
                continue
            try:
                handle = ray.get_actor(entry["name"], namespace=self.namespace)
                if entry["name"][len(prefix):] in releasing:
                    # The previous Controller died releasing it (shutdown sent, the kill not yet): adopted, it
                    # stayed a member that nothing tracked -- shut down, or still draining -- for good.
                    log.warning("killing %s: the previous Controller was releasing it", entry["name"])
                    ray.kill(handle, no_restart=True)  # its group goes below (no adopted instance holds it)
                    continue
                info = ray.get(handle.get_info.remote(), timeout=5)
            except Exception as e:  # noqa: BLE001 - dead or dying: the reconcile loop replaces it
                log.warning("not adopting %s: %s", entry["name"], type(e).__name__)
                continue
            self._members[info.instance_id] = Member(handle, info)
            self._adopted.append(info.instance_id)
            self._unreported.add(info.instance_id)
            n = _index_of(info.instance_id)
            if info.pool in self._next_index and n is not None:
                self._next_index[info.pool] = max(self._next_index[info.pool], n + 1)
        if releasing:
            self._kv_put("releasing", [])
        if self._members:
            log.info("controller %s adopted %d live instance(s)", self.cluster, len(self._members))
        # A group of this cluster with no adopted instance: the previous Controller died between creating an
        # instance's group and its actor (its ``pg.ready()`` can wait minutes for a node), or the actor did not
        # answer above. Nothing else would ever remove it, and it held its GPUs for good; removing it also stops
        # such an actor. Replacements get their own groups.
        prefix = pg_name(self.cluster, "")
        for pg in ray.util.placement_group_table().values():
            name = pg.get("name") or ""
            iid = name[len(prefix):]
            if name.startswith(prefix) and pg.get("state") != "REMOVED" and iid not in self._members:
                log.warning("removing placement group %s: no live instance of this cluster holds it", name)
                remove_instance_pg(self.cluster, iid)

    async def _start_adopted(self, iid: str) -> None:
        """Start an adopted instance (``start`` is idempotent: a no-op for one that runs). The previous Controller
        may have died while the actor was being constructed: its ``start`` call, buffered in the dead caller, never
        ran, and the instance answered ``get_info`` but never served and was never replaced (its pool looked full).
        One whose start fails is released, so that the reconcile loop replaces it."""
        m = self._members.get(iid)
        if m is None:
            return
        if m.info.pool not in self._pools:
            # A redeploy dropped its pool: an extra, released as a scale-down releases one (its streams end
            # RELEASED and continue elsewhere). Before, the missing pool's KeyError read as a failed start: the
            # streams ended ENGINE_FAILED (counted against each request) and a start failure was booked.
            log.info("instance %s: pool %r is no longer in the config; releasing it", iid, m.info.pool)
            assert self._lock is not None
            async with self._lock:
                await self._release(iid)
            return
        self._starting.add(iid)
        try:
            # Bounded: a start that hangs kept the pool one instance short for good (its snapshots are no verdict
            # while it starts).
            timeout_s = self._pools[m.info.pool].start_timeout_s
            info = await asyncio.wait_for(_await(m.handle.start.remote()), timeout_s)
        except Exception as e:  # noqa: BLE001 - dead, or its engine cannot start: replaced either way
            log.warning("adopted instance %s did not start (%s); replacing it", iid, type(e).__name__)
            self._start_failed(m.info.pool)
            await self._replace(iid)
            return
        finally:
            self._starting.discard(iid)
        if iid in self._members:  # its channel address is known from the start on
            self._members[iid] = Member(self._members[iid].handle, info)

    # ---- loops ----------------------------------------------------------------------------------------
    def _ensure_loop(self) -> None:
        # NOTE: an async actor's __init__ runs outside its event loop; the loop starts on the first call.
        if self._loop_task is None:
            self._lock = asyncio.Lock()
            self._loop_task = asyncio.create_task(self._loop())
            for iid in self._adopted:
                asyncio.create_task(self._start_adopted(iid))
            self._adopted = []
            if self._scaling is not None or self._k8s is not None or self._switcher.policy is not None:
                self._scaling_task = asyncio.create_task(self._scaling_loop())

    async def _loop(self) -> None:
        last_reconcile = 0.0
        while True:
            try:
                self._registry.expire()
                await self._refresh()
                if time.monotonic() - last_reconcile > 0.5:
                    last_reconcile = time.monotonic()
                    await self._reconcile(wait=False)
                    self._policy_tick()
            except Exception:
                log.exception("controller loop round failed")
            await asyncio.sleep(self._refresh_s)

    async def _refresh(self) -> None:
        self._refresh_round += 1
        rnd = self._refresh_round
        items = list(self._members.items())
        if not items:
            return
        results = await ask_each(items, lambda _, m: _await(m.handle.snapshot.remote()), self._probes, 2.0)
        now = time.monotonic()
        broken: list[tuple[str, str]] = []  # (instance, why)
        for (iid, m), res in zip(items, results):
            if iid not in self._members:
                # Released while the round waited for the others (ids are never reused): its answer put it back
                # into the view, for good.
                continue
            if isinstance(res, InstanceSnapshot):
                self._failing.pop(iid, None)
                self._snapshots[iid] = res
                self._unreported.discard(iid)
                self._adopt_role(iid, res, rnd)
                if not res.healthy:
                    # Its engine held requests with no progress for the pool's hang_timeout_s (Instance.snapshot):
                    # a stuck engine in a live actor. Released as broken, its streams end ENGINE_FAILED and are
                    # re-prefilled elsewhere (the quarantine counting the hung engine against each); the reconcile
                    # loop starts a replacement.
                    log.warning("instance %s: no engine progress for %.0fs with requests on it; replacing it", iid,
                                self._hang_timeout_s(m))
                    broken.append((iid, f"hung: no progress for {self._hang_timeout_s(m):.0f}s"))
                continue
            if actor_gone(res):
                log.warning("instance %s died: %s", iid, type(res).__name__)
                self._forget(iid)
                continue
            # No report: a timeout, "temporarily unavailable" (forgetting it removed its placement group, killing a
            # live instance and its streams), or an error raised on the instance. A slow answer is no verdict: the
            # last snapshot stands for UNHEALTHY_AFTER_S (an adopted instance still starting reports nothing yet).
            if iid in self._starting:
                continue
            silent_s = now - self._failing.setdefault(iid, now)
            snap = self._snapshots.get(iid)
            failed = isinstance(res, ray.exceptions.RayTaskError)
            if (failed or silent_s > UNHEALTHY_AFTER_S) and snap is not None and snap.healthy:
                # Silent that long: neither capacity to the scaling policy nor a migration destination (it stood as
                # healthy for good; the ingresses already route around it). An error is a verdict at once, as the
                # ingresses take it (its engine failed): it stood as healthy capacity and destination for 10 s.
                self._snapshots[iid] = dataclasses.replace(snap, healthy=False)
            if silent_s > UNHEALTHY_AFTER_S and isinstance(res, ray.exceptions.RayTaskError):
                # It answers, but cannot report its load: its engine failed (vLLM's EngineDeadError, the simulated
                # engine's fault). Nothing else would replace it -- only actor deaths were -- and its pool stayed
                # one instance short for good.
                log.warning("instance %s: snapshots failing for %.0fs (%s); replacing it", iid, UNHEALTHY_AFTER_S,
                            res.cause if res.cause is not None else res)
                broken.append((iid, "failed: snapshots failing"))
            elif silent_s > self._hang_timeout_s(m):
                # Silent for the pool's hang_timeout_s (a blocked event loop, a stats call stuck behind a hung engine
                # step): hung. It stayed a member for good, its pool one instance short, its streams waiting.
                log.warning("instance %s: no snapshot for %.0fs (%s); replacing it", iid, silent_s, type(res).__name__)
                broken.append((iid, f"hung: no snapshot for {silent_s:.0f}s"))
        for iid, why in broken:
            self._failing.pop(iid, None)
            await self._replace(iid, why)

    async def _replace(self, iid: str, why: str = "did not start") -> None:
        """Release a broken instance (its engine failed or hung -- ``why`` -- or it did not start): its pool keeps
        its size, so the reconcile loop creates a replacement -- unless it was draining for a scale-down, which this
        completes. Counted before the release: the scaling loop would see it gone and drop its drain uncounted. Its
        streams end ENGINE_FAILED (``Instance.shutdown(broken=)``), not "released"."""
        m = self._members.get(iid)
        if m is None:
            return
        assert self._lock is not None
        async with self._lock:
            self._leaves(iid, "lost")
            await self._release(iid, broken=why)

    def _end_scale_down(self, iid: str, pool: str) -> None:
        """``iid`` leaves while draining for a scale-down -- it died, or is released as broken: counted out as its
        release would have (the next reconcile would otherwise replace it, undoing the scale-down), unless an admin
        scale already did."""
        if self._draining.pop(iid, None) is None:
            return
        self._save_draining()
        self._k8s_shrink_due = True
        if self._desired.get(pool, 0) > len([i for i in self._active(pool, held=True) if i != iid]):
            self._desired[pool] -= 1
            self._save_desired()

    def _end_replaced_ahead(self, iid: str, pool: str) -> None:
        """``iid`` leaves -- released, dead, broken -- and its replacement was started ahead of it (a draining
        node's last instance of a phase: ``_replace_ahead``): its pool counts it out. Released *with* replacement
        (a DrainNode retried, through another ingress or after its caller gave up) or replaced when its node died,
        it was replaced a second time and the pool stayed one bigger for good."""
        if iid not in self._replaced_ahead:
            return
        self._replaced_ahead.discard(iid)
        self._save_replaced_ahead()
        self._desired[pool] = max(self._desired.get(pool, 1) - 1, 0)
        self._save_desired()
        self._k8s_shrink_due = True

    def _save_replaced_ahead(self, but: set[str] | frozenset[str] = frozenset()) -> None:
        """Persist the marks of replacements started ahead (``but`` those whose pool's count is not saved yet)."""
        self._kv_put("replaced_ahead", sorted(self._replaced_ahead - but))

    def _hang_timeout_s(self, m: Member) -> float:
        return self._pools[m.info.pool].hang_timeout_s

    def _adopt_role(self, iid: str, snap: InstanceSnapshot, rnd: int) -> None:
        """The instance is the truth about its role: a ``set_role`` whose reply was lost (the switch abandoned at its
        deadline) may still have landed, and the Controller would go on judging switches and the last instance of a
        phase by the old one. A snapshot asked for in or before the round of the Controller's own last switch of it
        may predate that switch, and is not believed."""
        m = self._members.get(iid)
        if m is None or snap.role is m.info.role or rnd <= self._role_round.get(iid, -1):
            return
        log.warning("instance %s reports role %s, not %s: a role switch landed late; adopting it", iid,
                    snap.role.value, m.info.role.value)
        self._members[iid] = Member(m.handle, dataclasses.replace(m.info, role=snap.role))

    def _forget(self, iid: str) -> None:
        """``iid``'s actor died: out of the cluster (its pool keeps its size: the reconcile loop replaces it)."""
        self._leaves(iid, "lost")
        self._members.pop(iid, None)
        remove_instance_pg(self.cluster, iid)

    def _leaves(self, iid: str, how: str, *, replace: bool = True) -> None:
        """The one hook of an instance leaving the cluster, called by every path that takes it out, while it is
        still a member (idempotent: ``_release`` calls it again). What its pool counts of it, by ``how``:

        * ``"lost"`` -- it died (``_forget``) or is released as broken (``_replace``): a scale-down drain of it
          (``_end_scale_down``) and a replacement started ahead of it (``_end_replaced_ahead``) count it out;
        * ``"released"`` -- ``_release_from_pool`` (an admin release, a drain's, the scaling loop's of a drained
          one): its replacement ahead counts it out; else, with ``replace``, a scale-down drain of it does (it
          leaves as that drain's release would have); else, without ``replace``, its pool shrinks by one;
        * ``"counted"`` -- its pool's size counts it out already: the reconcile releases it as an extra, a redeploy
          dropped its pool, the teardown.

        Then its per-instance state goes: snapshot, a drain's moves of other ingresses' requests, failure clock, role
        round, an operator's drain, the mark of a replacement ahead (persisted)."""
        m = self._members.get(iid)
        if m is not None and how != "counted":
            pool = m.info.pool
            if how == "lost":
                self._end_scale_down(iid, pool)
                self._end_replaced_ahead(iid, pool)
            elif iid in self._replaced_ahead:
                self._end_replaced_ahead(iid, pool)  # its replacement runs already: the pool counts it out
            elif replace and iid in self._draining:
                # Draining for a scale-down (DrainNode released it first): it leaves as that drain's release would
                # have -- replaced, the scale-down was undone.
                self._end_scale_down(iid, pool)
            elif not replace:
                self._desired[pool] = max(self._desired.get(pool, 1) - 1, 0)
                self._save_desired()
                self._k8s_shrink_due = True
        self._snapshots.pop(iid, None)
        self._unreported.discard(iid)
        self._end_drain_moves(iid)
        self._failing.pop(iid, None)
        self._role_round.pop(iid, None)
        self._drop_operator_drain(iid)
        if iid in self._replaced_ahead:  # ("counted": not counted out again)
            self._replaced_ahead.discard(iid)
            self._save_replaced_ahead()

    def _pool_have(self, pool: str) -> list[str]:
        """``pool``'s members and instances being placed, oldest first."""
        return sorted([i for i, m in self._members.items() if m.info.pool == pool]
                      + [i for i in self._pending if _pool_of(i) == pool], key=lambda i: _index_of(i) or 0)

    def _release_order(self, have: list[str]) -> list[str]:
        """The order in which a pool over its size releases ``have`` (``_pool_have``): those already draining for
        a scale-down first (an admin scale overtook the drain), then those leaving anyway (an admin drain:
        DrainNode, Drain), then the newest -- releasing busy ones while an idle draining one stays would shrink
        the pool twice. (Newest first alone, a restart that found a drained instance beside its replacement started
        ahead, one over the pool's size, released the replacement. An adopted instance's own snapshot says whether
        it is leaving: the reconcile picks no member before each has sent one.)"""
        draining = [i for i in have if i in self._draining]
        leaving = [i for i in have[::-1] if i not in draining and (
            i in self._operator_drained or getattr(self._snapshots.get(i), "leaving", False))]
        return draining + leaving + [i for i in have[::-1] if i not in draining and i not in leaving]

    async def _reconcile(self, *, wait: bool) -> None:
        """Create instances until every pool has its desired count (replacing dead ones); remove extras."""
        assert self._lock is not None
        async with self._lock:
            for pool in self.config.pools:
                have = self._pool_have(pool.name)
                want = self._desired.get(pool.name, pool.count)
                if time.monotonic() < self._start_failures.get(pool.name, (0, 0.0))[1]:
                    want = min(want, len(have))  # backing off after failed starts; extras still go below
                for _ in range(want - len(have)):
                    iid = f"{pool.name}-{self._next_index[pool.name]}"
                    self._next_index[pool.name] += 1
                    self._kv_put("next_index", self._next_index)
                    self._pending[iid] = asyncio.create_task(self._create(pool, iid))
                if len(have) <= want:
                    continue
                # One still being placed is called off (``_create`` removes what it had placed), as the scaling
                # loop's scale-down does: left running, it started only to be released (or waited for good for a
                # group with no room), and an admin ``scale`` waited for it.
                extras = self._release_order(have)[: len(have) - want]
                if any(i in self._unreported for i in have) and any(i in self._members for i in extras):
                    continue  # next round, with every adopted member's snapshot
                for iid in extras:
                    if self._draining.pop(iid, None) is not None:
                        self._save_draining()
                    if iid in self._pending:
                        self._pending.pop(iid).cancel()
                    elif iid in self._members:
                        await self._release(iid)
        if wait and self._pending:
            # asyncio.wait, not gather: a caller that stops waiting (ready's timeout) must not call the creations
            # off -- cancelled, each kills its actor and removes its placement group.
            await asyncio.wait(list(self._pending.values()))

    async def _create(self, pool: PoolSpec, iid: str) -> None:
        handle = None
        try:
            slots = not self._use_gpus and ray.cluster_resources().get(gpu_type_resource(pool.gpu), 0) > 0
            plan: InstancePlacement = plan_placement(pool, use_gpus=self._use_gpus, type_slots=slots)
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
            # Bounded: an engine that hangs at start (a stuck model load, a worker that never joins) held its pool
            # one instance short for good -- nothing else ever looked at an instance still starting.
            info = await asyncio.wait_for(_await(handle.start.remote()), pool.start_timeout_s)
            self._members[iid] = Member(handle, info)
            self._start_failures.pop(pool.name, None)
            log.info("instance %s up on node %s (bundles on %s)", iid, info.node_id[:8], bundle_nodes(pg))
        except asyncio.CancelledError:  # a scale-down called it off: nothing of it left behind
            if handle is not None:
                ray.kill(handle, no_restart=True)
            remove_instance_pg(self.cluster, iid)
            raise
        except Exception as e:
            if isinstance(e, TimeoutError):
                t_s = pool.start_timeout_s
                log.error("instance %s did not start in %.0fs (start_timeout_s); releasing it", iid, t_s)
            else:
                log.exception("creating instance %s failed", iid)
            self._start_failed(pool.name)
            if handle is not None:  # its actor too, not only its group: a hung one would hold its memory
                ray.kill(handle, no_restart=True)
            remove_instance_pg(self.cluster, iid)
        finally:
            self._pending.pop(iid, None)

    def _start_failed(self, pool: str) -> None:
        """An instance of ``pool`` did not start: its replacement waits ``START_RETRY_S``, doubling per failure."""
        n = self._start_failures.get(pool, (0, 0.0))[0] + 1
        delay = min(START_RETRY_S * 2 ** (n - 1), START_RETRY_MAX_S)
        self._start_failures[pool] = (n, time.monotonic() + delay)
        log.warning("pool %s: %d instance start(s) failed in a row; next start in %.0fs", pool, n, delay)

    async def _release(self, iid: str, broken: str | None = None) -> bool:
        """The one release of an instance: out of the membership and the view at once (nothing routes to it, and
        its pool counts it gone: the reconcile loop may start its replacement), then stopped in a task tracked in
        ``_releasing`` (``_stop``). False when it is no member (released already: never released twice).
        ``broken``: why its engine is broken; its streams then end ENGINE_FAILED, not RELEASED."""
        self._leaves(iid, "counted")  # (the callers that count it otherwise called it first)
        m = self._members.pop(iid, None)
        if m is None:
            return False
        # NOTE: off the caller's path. Awaited here, a hung actor's shutdown held the Controller's refresh and lock
        # for RELEASE_TIMEOUT_S per broken instance: no death noticed, no replacement started, no policy run, every
        # admin call waiting.
        self._releasing[iid] = asyncio.create_task(self._stop(iid, m.handle, broken))
        self._kv_put("releasing", sorted(self._releasing))  # a restarted Controller finishes it (_adopt)
        return True

    async def _stop(self, iid: str, handle: ActorHandle, broken: str | None) -> None:
        """Shut the instance down (its streams' hand-over, at most ``RELEASE_TIMEOUT_S``), then kill its actor and
        remove its placement group -- also when cancelled (the Controller ends): detached, they would stay for good."""
        try:
            await asyncio.wait_for(_await(handle.shutdown.remote(broken=broken)), RELEASE_TIMEOUT_S)
        except Exception as e:  # noqa: BLE001 - killing it anyway
            log.info("instance %s did not shut down cleanly: %s", iid, type(e).__name__)
        finally:
            try:
                ray.kill(handle, no_restart=True)
            except Exception as e:  # noqa: BLE001 - its group's removal stops it too
                log.warning("killing instance %s failed: %s", iid, e)
            remove_instance_pg(self.cluster, iid)
            self._releasing.pop(iid, None)
            self._kv_put("releasing", sorted(self._releasing))

    async def _stopped(self, iids: list[str]) -> None:
        """Wait until the releases in flight of ``iids`` have ended; a waiter that stops waiting calls none off."""
        tasks = [t for i in iids if (t := self._releasing.get(i)) is not None]
        if tasks:
            await asyncio.wait(tasks)

    # ---- API ------------------------------------------------------------------------------------------
    async def ready(self, timeout_s: float = 120.0) -> dict[str, InstanceInfo]:
        """Place every pool's instances and wait until they run, at most ``timeout_s``; returns id -> info of those
        running. The others go on starting and join when up (they were killed at the timeout, and deploy raised)."""
        self._ensure_loop()
        try:
            await asyncio.wait_for(self._reconcile(wait=True), timeout_s)
        except TimeoutError:
            log.warning("%d instance(s) still starting after %.0fs; serving with those up", len(self._pending),
                        timeout_s)
        await self._refresh()
        return {i: m.info for i, m in self._members.items()}

    async def spec(self) -> tuple[ClusterConfig, dict[str, dict[str, Any]]]:
        """The deployment's config and per-backend kwargs (an ingress in another process builds from them)."""
        return self.config, self._backend_kwargs

    async def ping(self) -> dict[str, Any]:
        self._ensure_loop()
        return {"epoch": self.epoch, "restarted": self.restarted, "instances": len(self._members),
                "cluster": self.cluster, "node": ray.get_runtime_context().get_node_id()}

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

    async def ingress_closed(self, ingress_id: str) -> None:
        """An ingress replica closing (``Ingress.close``): its entries dropped now, not ``ttl_s`` after its last
        report -- its streams end with it, and held, they kept a scale-down's or a role switch's drain waiting for
        requests nobody serves (its instances' own streams still hold those until they end or their lease)."""
        self._ensure_loop()
        self._registry.drop_ingress(ingress_id)

    async def share_lengths(self, ingress_id: str, report: LengthReport) -> LengthReply:
        """An ingress's new online length samples, merged into the cluster's histories; the answer brings its copy
        of them up to date (``scheduler/predict/shared.py``). Each replica's plans period, off the request path."""
        self._ensure_loop()
        return self._lengths.share(ingress_id, report)

    async def lookup(self, request_id: str) -> RegistryEntry | None:
        self._ensure_loop()
        return self._registry.entries.get(request_id)

    async def requests_on(self, instance_id: str) -> list[RegistryEntry]:
        self._ensure_loop()
        return self._registry.on_instance(instance_id)

    async def num_requests(self) -> int:
        self._registry.expire()
        return len(self._registry.entries)

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
        if self._scaling_task is not None:
            self._scaling_task.cancel()
        # Called off, not awaited: one whose placement group never becomes ready (no node for it) held the teardown
        # for good, and the driver then killed this actor with every instance still up. ``_create`` cleans up.
        for t in list(self._pending.values()):
            t.cancel()
            await asyncio.gather(t, return_exceptions=True)
        # Side by side: each waits up to RELEASE_TIMEOUT_S for a hung instance, and one after another they outlasted
        # the driver's wait (Deployment.shutdown, 30 s), which then killed this actor with the rest still up. Those
        # already in flight (a broken instance the loop was releasing) are waited for too.
        await asyncio.gather(*(self._release(iid) for iid in list(self._members)), return_exceptions=True)
        await self._stopped(list(self._releasing))
        from ray.experimental import internal_kv

        self._kv_closed = True
        internal_kv._internal_kv_del(self._kv_key("state"), namespace=self.namespace)


def restored_desired(counts: dict[str, int], saved: dict[str, Any] | None,
                     configured: dict[str, Any] | None) -> dict[str, int]:
    """Each pool's desired size when a Controller starts: the config's ``counts``, or the size the previous
    Controller of this cluster saved (``saved``: an admin scale or the scaling loop moved it), unless the config's
    count of that pool changed since (``configured``: the counts saved beside it). A restart keeps the scaled sizes;
    a redeploy with a new ``count`` is the operator's new word (the saved size overrode it). Sizes saved without
    their counts (an older Controller) are kept, as before."""
    out = dict(counts)
    for pool, n in (saved or {}).items():
        if pool in out and (configured is None or configured.get(pool) == counts[pool]):
            out[pool] = int(n)
    return out


def instance_backend_kwargs(
    config: ClusterConfig, given: dict[str, dict[str, Any]] | None
) -> dict[str, dict[str, Any]]:
    """The backend kwargs every instance of a kind gets: ``given``, and for simulated engines the config's
    ``latency_profile`` (unless given): a profiled config's simulated engines ran at the roofline's step times
    while the simulator -- and the routers' cost models -- timed them by the profile."""
    out = {kind: dict(kw) for kind, kw in (given or {}).items()}
    if config.latency_profile:
        out.setdefault("simulated", {}).setdefault("latency_profile", config.latency_profile)
    return out



def _kubernetes_from_env() -> KubernetesBackend | None:
    """The chart's RayCluster when ``LLMSCHED_RAYCLUSTER`` is set; a bad env is logged, not fatal (the
    Controller still serves; worker groups are then sized by hand)."""
    try:
        return KubernetesBackend.from_env()
    except ValueError as e:
        log.warning("not resizing KubeRay worker groups: %s", e)
        return None
