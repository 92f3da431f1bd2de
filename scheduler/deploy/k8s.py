"""Kubernetes integration through the official ``kubernetes`` client.

- :func:`read_gpu_inventory`: GPU nodes from their labels (``nvidia.com/gpu.product``, set by NVIDIA GPU feature
  discovery) and ``status.allocatable["nvidia.com/gpu"]``, grouped into the project's GPU types.
- :class:`KubeRayScaler`: reads and resizes the KubeRay worker groups (one per GPU type, see the Helm chart) of a
  ``RayCluster`` by patching ``spec.workerGroupSpecs[i].replicas``; the applier for scaling decisions.

Both take API objects built on any ``kubernetes.client.ApiClient`` (:func:`api_client` picks in-cluster or
kubeconfig), so tests point them at an in-memory API server; nothing here imports Ray.
The chart's Role/ClusterRole grant exactly these calls: list nodes; get/patch rayclusters in the namespace.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kubernetes.client import ApiClient, CoreV1Api, CustomObjectsApi

GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"
GPU_RESOURCE = "nvidia.com/gpu"
RAY_GROUP, RAY_VERSION, RAY_PLURAL = "ray.io", "v1", "rayclusters"
_JSON_PATCH = "application/json-patch+json"
_CONFLICT_STATUSES = (409, 422)  # a failed JSON-patch `test` op (the group moved) or a write conflict
log = logging.getLogger(__name__)


class KubernetesError(RuntimeError):
    """A Kubernetes API call failed; the message names the object and the API status."""


def api_client(context: str | None = None) -> ApiClient:
    """An ``ApiClient`` for the in-cluster service account when running in a pod, else the kubeconfig."""
    import os

    from kubernetes import client, config

    if os.environ.get("KUBERNETES_SERVICE_HOST") and context is None:
        config.load_incluster_config()
        return client.ApiClient()
    return config.new_client_from_config(context=context)


def gpu_type_from_product(product: str, products: dict[str, str] | None = None) -> str:
    """The GPU type name for an ``nvidia.com/gpu.product`` label value.

    An explicit ``products`` map (label value -> type, e.g. from the chart's ``gpuTypes[].product``) wins;
    otherwise the model token: ``NVIDIA-A100-SXM4-80GB`` -> ``a100``, ``NVIDIA-H100-80GB-HBM3`` -> ``h100``,
    ``Tesla-T4`` -> ``t4``, ``NVIDIA-L40S`` -> ``l40s``.
    """
    if products and product in products:
        return products[product]
    tokens = [
        t for t in re.split(r"[-_ ]+", product.lower()) if t and t not in ("nvidia", "tesla", "geforce")
    ]
    return tokens[0] if tokens else product.lower()


@dataclass(frozen=True, slots=True)
class GPUNode:
    """One node that carries GPUs."""

    name: str
    product: str
    gpu_type: str
    allocatable: int
    ready: bool
    schedulable: bool

    @property
    def usable(self) -> bool:
        """Counts toward capacity: Ready, not cordoned, and has GPUs the scheduler may allocate."""
        return self.ready and self.schedulable and self.allocatable > 0


@dataclass(frozen=True, slots=True)
class GPUInventory:
    """The cluster's GPU nodes, as read from the Kubernetes API."""

    nodes: tuple[GPUNode, ...]

    def gpus_by_type(self, *, usable_only: bool = True) -> dict[str, int]:
        """Allocatable GPUs per GPU type (by default only on Ready, schedulable nodes)."""
        out: dict[str, int] = {}
        for n in self.nodes:
            if n.usable or not usable_only:
                out[n.gpu_type] = out.get(n.gpu_type, 0) + n.allocatable
        return dict(sorted(out.items()))

    def nodes_by_type(self, *, usable_only: bool = True) -> dict[str, int]:
        """Node count per GPU type."""
        out: dict[str, int] = {}
        for n in self.nodes:
            if n.usable or not usable_only:
                out[n.gpu_type] = out.get(n.gpu_type, 0) + 1
        return dict(sorted(out.items()))


def _quantity_int(value: Any) -> int:
    # Extended resources are integer quantities ("8"); anything else is not a usable GPU count.
    try:
        return int(str(value))
    except (TypeError, ValueError):
        return 0


def _api_error(what: str, exc: Exception) -> KubernetesError:
    status = getattr(exc, "status", None)
    reason = getattr(exc, "reason", None) or type(exc).__name__
    return KubernetesError(f"{what}: Kubernetes API {status or ''} {reason}".strip())


def read_gpu_inventory(
    core: CoreV1Api,
    *,
    products: dict[str, str] | None = None,
    label_selector: str = GPU_PRODUCT_LABEL,
    page_size: int = 500,
) -> GPUInventory:
    """List the GPU nodes (paginated) and map each to a GPU type.

    Args:
        core: a ``CoreV1Api``.
        products: ``nvidia.com/gpu.product`` value -> GPU type name; unmapped products use
            :func:`gpu_type_from_product`.
        label_selector: server-side filter (nodes without the product label carry no NVIDIA GPUs).
        page_size: ``limit`` per list call; the ``continue`` token fetches the rest.
    """
    nodes: list[GPUNode] = []
    token: str | None = None
    while True:
        kwargs: dict[str, Any] = {"label_selector": label_selector, "limit": page_size}
        if token:
            kwargs["_continue"] = token
        try:
            page = core.list_node(**kwargs)
        except Exception as e:  # ApiException, urllib3 errors
            raise _api_error("list nodes", e) from e
        for node in page.items or []:
            labels = node.metadata.labels or {}
            product = labels.get(GPU_PRODUCT_LABEL)
            if not product:  # the selector is a server-side hint; never trust it alone
                continue
            status = node.status
            conditions = (status.conditions or []) if status else []
            ready = any(c.type == "Ready" and c.status == "True" for c in conditions)
            allocatable = _quantity_int(((status.allocatable or {}) if status else {}).get(GPU_RESOURCE))
            nodes.append(
                GPUNode(
                    name=node.metadata.name,
                    product=product,
                    gpu_type=gpu_type_from_product(product, products),
                    allocatable=allocatable,
                    ready=ready,
                    schedulable=not bool(node.spec and node.spec.unschedulable),
                )
            )
        token = page.metadata._continue if page.metadata else None
        if not token:
            break
    return GPUInventory(tuple(sorted(nodes, key=lambda n: n.name)))


def cluster_gpus(context: str | None = None) -> dict[str, int]:
    """Usable GPUs per GPU type of the cluster :func:`api_client` reaches (``llmsched plan --k8s-inventory``).

    Raises:
        KubernetesError: no kubeconfig / in-cluster credentials, or the node list failed.
    """
    from kubernetes.client import CoreV1Api
    from kubernetes.config import ConfigException

    try:
        api = api_client(context)
    except ConfigException as e:
        raise KubernetesError(f"no Kubernetes credentials (in-cluster or kubeconfig): {e}") from e
    with api:
        return read_gpu_inventory(CoreV1Api(api)).gpus_by_type()


@dataclass(frozen=True, slots=True)
class WorkerGroup:
    """One KubeRay worker group as the RayCluster spec declares it."""

    index: int
    name: str
    replicas: int
    min_replicas: int
    max_replicas: int
    gpus_per_worker: int = 0  # GPUs one worker pod of the group offers (0: none declared)


def _group_gpus(spec: dict[str, Any]) -> int:
    """GPUs one worker of a group offers: the project's ``llmsched_gpu_<type>`` Ray resource in
    ``rayStartParams.resources`` (what placement requests; also the fake-GPU count on CPU-only clusters), else
    ``rayStartParams.num-gpus``, else the ``nvidia.com/gpu`` limit of the pod's containers."""
    import json

    params = spec.get("rayStartParams") or {}
    raw = params.get("resources")
    res: Any = raw
    for _ in range(2):  # rayStartParams values are strings; the chart quotes the JSON once more
        if isinstance(res, str):
            try:
                res = json.loads(res)
            except ValueError:
                res = None
    if isinstance(res, dict):
        for k, v in res.items():
            if str(k).startswith("llmsched_gpu_"):
                try:
                    return int(float(v))
                except (TypeError, ValueError):
                    break
    if params.get("num-gpus") is not None:
        return _quantity_int(params["num-gpus"])
    containers = ((spec.get("template") or {}).get("spec") or {}).get("containers") or []
    return sum(_quantity_int(((c.get("resources") or {}).get("limits") or {}).get(GPU_RESOURCE)) for c in containers)


@dataclass(frozen=True, slots=True)
class ResizeResult:
    """What :meth:`KubeRayScaler.resize` did."""

    group: str
    previous: int
    replicas: int
    attempts: int

    @property
    def changed(self) -> bool:
        return self.previous != self.replicas


class KubeRayScaler:
    """Resizes the worker groups of one KubeRay ``RayCluster``.

    Scale-down should name the pods to remove (``workers_to_delete``), after their instances were drained: without
    it KubeRay removes arbitrary workers, and their running requests would have to be recovered instead of
    migrated. Leave ``spec.enableInTreeAutoscaling`` off (the chart default): KubeRay's autoscaler would
    otherwise overwrite these replicas.
    """

    def __init__(
        self,
        custom: CustomObjectsApi,
        namespace: str,
        cluster: str,
        *,
        max_attempts: int = 3,
        policy: Any = None,
        pdb_max_unavailable: int | None = None,
    ) -> None:
        """``policy`` (a ``PolicyV1Api``) and ``pdb_max_unavailable`` (the chart's
        ``podDisruptionBudget.maxUnavailable``): keep each group's PodDisruptionBudget in step (:meth:`_follow_pdb`);
        either ``None``: PDBs are left alone."""
        self.custom = custom
        self.namespace = namespace
        self.cluster = cluster
        self.max_attempts = max_attempts
        self.policy = policy
        self.pdb_max_unavailable = pdb_max_unavailable

    def _get(self) -> dict[str, Any]:
        try:
            return self.custom.get_namespaced_custom_object(
                RAY_GROUP, RAY_VERSION, self.namespace, RAY_PLURAL, self.cluster
            )
        except Exception as e:
            raise _api_error(f"get RayCluster {self.namespace}/{self.cluster}", e) from e

    def worker_groups(self) -> dict[str, WorkerGroup]:
        """The worker groups by name (one per GPU type in the chart)."""
        specs = self._get().get("spec", {}).get("workerGroupSpecs") or []
        out: dict[str, WorkerGroup] = {}
        for i, g in enumerate(specs):
            min_r = int(g.get("minReplicas", 0))
            out[g["groupName"]] = WorkerGroup(
                index=i,
                name=g["groupName"],
                replicas=int(g.get("replicas", min_r)),
                min_replicas=min_r,
                max_replicas=int(g.get("maxReplicas", 2**31 - 1)),
                gpus_per_worker=_group_gpus(g),
            )
        return out

    def resize(
        self, group: str, replicas: int, *, workers_to_delete: list[str] | None = None
    ) -> ResizeResult:
        """Set ``replicas`` of worker group ``group``.

        The patch is an RFC 6902 JSON patch that first *tests* the group name at the index it was read from, so a
        concurrent edit that reorders the groups fails the patch (422) instead of resizing the wrong GPU type; the
        read-patch cycle is then retried.

        Raises:
            ValueError: unknown group, or ``replicas`` outside [minReplicas, maxReplicas] (names the bounds).
            KubernetesError: the API refused (after ``max_attempts`` on conflicts).
        """
        from kubernetes.client.exceptions import ApiException

        for attempt in range(1, self.max_attempts + 1):
            groups = self.worker_groups()
            if group not in groups:
                raise ValueError(
                    f"RayCluster {self.namespace}/{self.cluster}: unknown worker group {group!r}; "
                    f"allowed: {', '.join(groups) or '(none)'}"
                )
            g = groups[group]
            if not g.min_replicas <= replicas <= g.max_replicas:
                raise ValueError(
                    f"worker group {group!r}: replicas {replicas} outside [minReplicas {g.min_replicas}, "
                    f"maxReplicas {g.max_replicas}]"
                )
            base = f"/spec/workerGroupSpecs/{g.index}"
            patch: list[dict[str, Any]] = [
                {"op": "test", "path": f"{base}/groupName", "value": group},
                # `add` replaces an existing member and creates an absent one (replicas is optional in the CRD).
                {"op": "add", "path": f"{base}/replicas", "value": replicas},
            ]
            if workers_to_delete:
                patch.append(
                    {
                        "op": "add",
                        "path": f"{base}/scaleStrategy",
                        "value": {"workersToDelete": list(workers_to_delete)},
                    }
                )
            try:
                self.custom.patch_namespaced_custom_object(
                    RAY_GROUP,
                    RAY_VERSION,
                    self.namespace,
                    RAY_PLURAL,
                    self.cluster,
                    patch,
                    _content_type=_JSON_PATCH,
                )
            except ApiException as e:
                if e.status in _CONFLICT_STATUSES and attempt < self.max_attempts:
                    continue
                raise _api_error(f"patch RayCluster {self.namespace}/{self.cluster} group {group}", e) from e
            except Exception as e:
                raise _api_error(f"patch RayCluster {self.namespace}/{self.cluster} group {group}", e) from e
            self._follow_pdb(group, replicas)
            return ResizeResult(group=group, previous=g.replicas, replicas=replicas, attempts=attempt)
        raise AssertionError("unreachable")  # pragma: no cover

    def _follow_pdb(self, group: str, replicas: int) -> None:
        """Set the group's PodDisruptionBudget (the chart's ``<cluster>-<group>``) to keep ``replicas -
        maxUnavailable`` workers up. Its ``minAvailable`` is an absolute count (a RayCluster has no ``/scale``
        subresource, so a ``maxUnavailable`` budget over its pods allows nothing): left as rendered, a grown group
        could lose more than ``maxUnavailable`` workers to one drain, and a shrunk one block every drain. A failure
        is logged, not raised: the group is resized already (the next resize or ``helm upgrade`` sets it again)."""
        if self.policy is None or self.pdb_max_unavailable is None:
            return
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        name = f"{self.cluster}-{group}"
        body = {"spec": {"minAvailable": max(0, replicas - self.pdb_max_unavailable)}}
        try:
            self.policy.patch_namespaced_pod_disruption_budget(
                name, self.namespace, body, _content_type="application/merge-patch+json"
            )
        except (ApiException, HTTPError, OSError) as e:  # refused, or unreachable
            log.warning("%s", _api_error(f"patch PodDisruptionBudget {self.namespace}/{name}", e))
