"""Kubernetes side of autoscaling: size the KubeRay worker groups to the instances the Controller wants.

The Controller's scaling loop (``scheduler.control.controller_scaling``) decides *instances per pool*; this
module turns those counts into *worker pods per GPU type* and applies them to the release's ``RayCluster``:

* :func:`desired_worker_replicas` -- pure: pools (GPU type, TP, count) -> worker nodes needed per worker group.
  Instances are packed onto nodes first-fit-decreasing by TP (an instance never spans nodes: its placement group
  is STRICT_PACK), so with power-of-two TPs on 8-GPU nodes it is ``ceil(sum(count * tp) / gpus_per_node)``.
* :class:`WorkerGroupApplier` -- applies them through :class:`~scheduler.deploy.k8s.KubeRayScaler`:
  :meth:`~WorkerGroupApplier.grow` before new instances are placed (never shrinks), and
  :meth:`~WorkerGroupApplier.shrink` after instances were drained and released, naming only *idle* worker pods
  in ``workersToDelete`` (a pod that still hosts an instance is never given up).
* :class:`KubernetesBackend` -- what the Controller holds: namespace, RayCluster name, how to reach the API
  (in-cluster service account, or an explicit host in tests); picklable (it is a Ray actor argument), the API
  client is built lazily on first use. :meth:`KubernetesBackend.from_env` reads ``LLMSCHED_NAMESPACE`` /
  ``LLMSCHED_RAYCLUSTER`` (set by the Helm chart).

Nothing here imports Ray; worker groups are one per GPU type, named after it (the chart's ``gpuTypes[].name``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from scheduler.config.gpus import nodes_for
from scheduler.config.models import ClusterConfig
from scheduler.deploy.k8s import KubeRayScaler, ResizeResult, WorkerGroup

log = logging.getLogger(__name__)

ENV_NAMESPACE = "LLMSCHED_NAMESPACE"
ENV_RAYCLUSTER = "LLMSCHED_RAYCLUSTER"
# The chart's podDisruptionBudget.maxUnavailable, set while its worker PDBs are on: resizes keep them in step.
ENV_PDB_MAX_UNAVAILABLE = "LLMSCHED_PDB_MAX_UNAVAILABLE"
_SA_NAMESPACE_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"


# ---- pure: pools -> worker nodes -------------------------------------------------------------------------------------
def desired_worker_replicas(
    config: ClusterConfig,
    counts: Mapping[str, int] | None = None,
    *,
    gpus_per_worker: Mapping[str, int],
    group_of: Mapping[str, str] | None = None,
) -> dict[str, int]:
    """Worker nodes needed per worker group for the config's pools.

    Args:
        config: the deployment; each pool gives its GPU type and TP.
        counts: instances per pool (the Controller's desired counts); default each pool's ``count``.
        gpus_per_worker: GPU type (or group name) -> GPUs one worker pod offers (the chart's
            ``gpuTypes[].gpusPerNode``; :attr:`WorkerGroup.gpus_per_worker` reads it from the RayCluster).
        group_of: GPU type -> worker group name (default: the same name, as the chart renders them).

    Returns:
        group -> nodes, for every group that hosts at least one pool (also when it needs 0 nodes); groups without
        pools are not listed (not this deployment's to size).

    Raises:
        ValueError: a pool names an unknown count, a GPU type without a GPUs-per-worker figure, or a TP larger
            than a worker node (the message names the pool).
    """
    counts = dict(counts) if counts is not None else {p.name: p.count for p in config.pools}
    group_of = group_of or {}
    tps: dict[str, list[int]] = {}
    per_node: dict[str, int] = {}
    for p in config.pools:
        group = group_of.get(p.gpu, p.gpu)
        n = int(counts.get(p.name, p.count))
        if n < 0:
            raise ValueError(f"pool {p.name!r}: count must be >= 0, got {n}")
        gpn = gpus_per_worker.get(group, gpus_per_worker.get(p.gpu))
        if gpn is None or gpn < 1:
            raise ValueError(
                f"pool {p.name!r}: no GPUs-per-worker figure for worker group {group!r} (GPU type {p.gpu!r}); "
                f"known: {', '.join(sorted(k for k, v in gpus_per_worker.items() if v)) or '(none)'}"
            )
        if p.tp > gpn:
            raise ValueError(f"pool {p.name!r}: tp {p.tp} exceeds {gpn} GPUs per {group!r} worker node")
        per_node[group] = gpn
        tps.setdefault(group, []).extend([p.tp] * n)
    return {g: nodes_for(tps[g], per_node[g]) for g in sorted(tps)}


def gpus_needed(config: ClusterConfig, counts: Mapping[str, int] | None = None) -> dict[str, int]:
    """GPUs per GPU type: sum over its pools of count x tp (for logs and docs; nodes come from the packing)."""
    counts = dict(counts) if counts is not None else {p.name: p.count for p in config.pools}
    out: dict[str, int] = {}
    for p in config.pools:
        out[p.gpu] = out.get(p.gpu, 0) + int(counts.get(p.name, p.count)) * p.tp
    return dict(sorted(out.items()))


# ---- applier -----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class GroupPlan:
    """One worker group: what it has, what the pools need, and what it will be set to (within its bounds)."""

    group: str
    current: int
    needed: int
    target: int
    min_replicas: int
    max_replicas: int

    @property
    def capped(self) -> bool:
        """More nodes are needed than ``maxReplicas`` allows (instances beyond it stay unplaced)."""
        return self.needed > self.max_replicas


class WorkerGroupApplier:
    """Sizes worker groups to the Controller's desired instance counts through a :class:`KubeRayScaler`.

    Args:
        scaler: the RayCluster's scaler (real API call paths: GET, then a JSON patch with a ``test`` op).
        gpus_per_worker: override of GPUs per worker pod per group; default each group's own spec
            (``llmsched_gpu_<type>`` Ray resource / ``num-gpus`` / the ``nvidia.com/gpu`` limit).
        group_of: GPU type -> worker group name (default: same name).
    """

    def __init__(
        self,
        scaler: KubeRayScaler,
        *,
        gpus_per_worker: Mapping[str, int] | None = None,
        group_of: Mapping[str, str] | None = None,
    ) -> None:
        self.scaler = scaler
        self.gpus_per_worker = dict(gpus_per_worker or {})
        self.group_of = dict(group_of or {})

    def plan(self, config: ClusterConfig, counts: Mapping[str, int] | None = None) -> dict[str, GroupPlan]:
        """Read the RayCluster (one GET) and compute each of this deployment's groups' target."""
        groups: dict[str, WorkerGroup] = self.scaler.worker_groups()
        missing = sorted({self.group_of.get(p.gpu, p.gpu) for p in config.pools} - set(groups))
        if missing:
            raise ValueError(
                f"RayCluster {self.scaler.namespace}/{self.scaler.cluster}: no worker group for GPU type(s) "
                f"{', '.join(missing)}; groups: {', '.join(groups) or '(none)'}"
            )
        gpw = {name: g.gpus_per_worker for name, g in groups.items()}
        gpw.update(self.gpus_per_worker)
        need = desired_worker_replicas(config, counts, gpus_per_worker=gpw, group_of=self.group_of)
        out = {}
        for name, n in need.items():
            g = groups[name]
            out[name] = GroupPlan(
                name,
                g.replicas,
                n,
                min(max(n, g.min_replicas), g.max_replicas),
                g.min_replicas,
                g.max_replicas,
            )
        return out

    def grow(self, config: ClusterConfig, counts: Mapping[str, int] | None = None) -> list[ResizeResult]:
        """Raise every group that has fewer workers than its pools need; never lowers one."""
        out = []
        for p in self.plan(config, counts).values():
            if p.capped:
                log.warning(
                    "worker group %s: %d nodes needed, maxReplicas %d", p.group, p.needed, p.max_replicas
                )
            if p.target > p.current:
                res = self.scaler.resize(p.group, p.target)
                log.info(
                    "worker group %s: %d -> %d replicas (%d needed)",
                    p.group,
                    res.previous,
                    res.replicas,
                    p.needed,
                )
                out.append(res)
        return out

    def shrink(
        self,
        config: ClusterConfig,
        counts: Mapping[str, int] | None = None,
        *,
        idle_workers: Mapping[str, Sequence[str]] | None = None,
    ) -> list[ResizeResult]:
        """Lower every group that has more workers than its pools need; never raises one.

        Args:
            idle_workers: group -> names of its worker pods that host no instance. When given, a group shrinks by
                at most that many and names exactly those pods in ``workersToDelete`` (KubeRay removes them, not
                arbitrary workers). When ``None`` (unknown), groups shrink without naming pods: KubeRay picks.
        """
        out = []
        for p in self.plan(config, counts).values():
            if p.target >= p.current:
                continue
            target, names = p.target, None
            if idle_workers is not None:
                idle = sorted(idle_workers.get(p.group, ()))
                k = min(p.current - p.target, len(idle))
                if k == 0:
                    log.info(
                        "worker group %s: %d replicas, %d needed, but no idle worker to give up",
                        p.group,
                        p.current,
                        p.target,
                    )
                    continue
                target, names = p.current - k, idle[:k]
            res = self.scaler.resize(p.group, target, workers_to_delete=names)
            log.info(
                "worker group %s: %d -> %d replicas (removing %s)",
                p.group,
                res.previous,
                res.replicas,
                ", ".join(names) if names else "any",
            )
            out.append(res)
        return out


# ---- what the Controller holds --------------------------------------------------------------------------------------
@dataclass
class KubernetesBackend:
    """How the Controller reaches its RayCluster. Picklable; the API client is created on first use.

    Args:
        namespace / cluster: the release's namespace and RayCluster name.
        host: API server URL (tests: an in-memory server); ``None``: in-cluster service account, else kubeconfig.
        context: kubeconfig context (outside a cluster).
        gpus_per_worker / group_of: see :class:`WorkerGroupApplier`.
        pdb_max_unavailable: the chart's worker PodDisruptionBudgets follow each resize
            (:meth:`~scheduler.deploy.k8s.KubeRayScaler._follow_pdb`); ``None``: the chart renders none.
    """

    namespace: str
    cluster: str
    host: str | None = None
    context: str | None = None
    gpus_per_worker: dict[str, int] = field(default_factory=dict)
    group_of: dict[str, str] = field(default_factory=dict)
    pdb_max_unavailable: int | None = None
    _applier: WorkerGroupApplier | None = field(default=None, init=False, repr=False, compare=False)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> KubernetesBackend | None:
        """From the chart's env (``LLMSCHED_RAYCLUSTER``, ``LLMSCHED_NAMESPACE``, else the service account's
        namespace); ``None`` when ``LLMSCHED_RAYCLUSTER`` is unset (not running under the chart)."""
        env = os.environ if environ is None else environ
        cluster = env.get(ENV_RAYCLUSTER, "").strip()
        if not cluster:
            return None
        ns = env.get(ENV_NAMESPACE, "").strip()
        if not ns and os.path.exists(_SA_NAMESPACE_FILE):
            with open(_SA_NAMESPACE_FILE) as f:
                ns = f.read().strip()
        if not ns:
            raise ValueError(
                f"{ENV_RAYCLUSTER}={cluster!r} is set but {ENV_NAMESPACE} is not (and no service "
                "account namespace is mounted)"
            )
        pdb = env.get(ENV_PDB_MAX_UNAVAILABLE, "").strip()
        if pdb and not pdb.isdigit():  # the groups are still resized: only their PDBs are left as rendered
            log.warning("not keeping the worker PodDisruptionBudgets in step: %s=%r is no whole number >= 0",
                        ENV_PDB_MAX_UNAVAILABLE, pdb)
            pdb = ""
        return cls(namespace=ns, cluster=cluster, pdb_max_unavailable=int(pdb) if pdb else None)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_applier"] = None  # API clients hold sockets and thread pools
        return state

    @property
    def applier(self) -> WorkerGroupApplier:
        if self._applier is None:
            from kubernetes import client

            from scheduler.deploy.k8s import api_client

            if self.host is not None:
                cfg = client.Configuration()
                cfg.host = self.host
                api = client.ApiClient(cfg)
            else:
                api = api_client(self.context)
            scaler = KubeRayScaler(
                client.CustomObjectsApi(api),
                self.namespace,
                self.cluster,
                policy=client.PolicyV1Api(api),
                pdb_max_unavailable=self.pdb_max_unavailable,
            )
            self._applier = WorkerGroupApplier(
                scaler, gpus_per_worker=self.gpus_per_worker, group_of=self.group_of
            )
        return self._applier

    def grow(self, config: ClusterConfig, counts: Mapping[str, int]) -> list[ResizeResult]:
        return self.applier.grow(config, counts)

    def shrink(
        self,
        config: ClusterConfig,
        counts: Mapping[str, int],
        *,
        idle_workers: Mapping[str, Sequence[str]] | None = None,
    ) -> list[ResizeResult]:
        return self.applier.shrink(config, counts, idle_workers=idle_workers)

    def group_of_gpu(self, gpu: str) -> str:
        return self.group_of.get(gpu, gpu)


__all__ = [
    "ENV_NAMESPACE",
    "ENV_PDB_MAX_UNAVAILABLE",
    "ENV_RAYCLUSTER",
    "GroupPlan",
    "KubernetesBackend",
    "WorkerGroupApplier",
    "desired_worker_replicas",
    "gpus_needed",
    "nodes_for",
]
