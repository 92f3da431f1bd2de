"""Placement groups for engine instances: one group per instance, sized for its tensor-parallel degree.

::

    pool (gpu=a100, tp=2)  ->  placement group "llmsched/<cluster>/<instance>"  (STRICT_PACK: one node)
                                 bundle 0: {GPU: 1, llmsched_gpu_a100: 0.001}   <- Instance actor (+ TP rank 0)
                                 bundle 1: {GPU: 1, llmsched_gpu_a100: 0.001}   <- TP rank 1 (vLLM's Ray executor)

A node advertises its GPU type as the custom resource ``llmsched_gpu_<type>`` (the Helm chart sets it in
``rayStartParams.resources``; ``cluster.py`` does it for fake local nodes). Each bundle asks a sliver of it
(``0.001``), so the label pins a pool to its GPU type whatever amount a node advertises, while ``GPU: 1`` does the
counting. On a cluster without GPUs (CPU dev, tests) a bundle is a CPU sliver and the label is dropped.

Groups are detached and named, so they outlive a Controller crash and a restarted Controller finds them again.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Any

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from scheduler.config.models import PoolSpec

GPU_TYPE_RESOURCE_PREFIX = "llmsched_gpu_"
_LABEL_SLIVER = 0.001
_CPU_SLIVER = 0.01  # CPU-only bundles: something non-zero so the group has a node, nothing that blocks a 2-core box


def gpu_type_resource(gpu: str) -> str:
    """Ray custom resource naming GPU type ``gpu`` on a node (``a100`` -> ``llmsched_gpu_a100``)."""
    return GPU_TYPE_RESOURCE_PREFIX + re.sub(r"[^A-Za-z0-9_]", "_", gpu)


def pg_name(cluster: str, instance_id: str) -> str:
    return f"llmsched/{cluster}/{instance_id}"


@dataclass(frozen=True, slots=True)
class InstancePlacement:
    """How one instance is laid out: its bundles and what the Instance actor itself asks for."""

    bundles: tuple[dict[str, float], ...]
    strategy: str
    actor_num_gpus: float
    actor_num_cpus: float
    uses_gpus: bool


def plan_placement(pool: PoolSpec, *, use_gpus: bool, type_slots: bool = False) -> InstancePlacement:
    """Bundles for one instance of ``pool``.

    Args:
        pool: the pool spec (GPU type, TP degree, backend).
        use_gpus: whether the cluster has GPUs (fake or real); ``False`` gives CPU-sliver bundles.
        type_slots: (CPU-only clusters) nodes advertise ``llmsched_gpu_<type>`` as slots (the chart's
            ``gpuTypes[].slots``): each bundle then takes one slot, so instances land on that group's workers
            and a worker holds at most ``slots`` of them.
    """
    if use_gpus:
        bundle = {"GPU": 1.0, gpu_type_resource(pool.gpu): _LABEL_SLIVER}
        # NOTE: a vLLM engine at TP=1 runs in the actor's own process and needs the GPU visible there; at TP>1
        # vLLM's Ray executor starts one worker per bundle and the actor itself only coordinates.
        actor_gpus = 1.0 if pool.backend == "vllm" and pool.tp == 1 else 0.0
    else:
        bundle = {"CPU": _CPU_SLIVER}
        if type_slots:
            bundle[gpu_type_resource(pool.gpu)] = 1.0
        actor_gpus = 0.0
    return InstancePlacement(
        bundles=tuple(dict(bundle) for _ in range(pool.tp)),
        strategy="STRICT_PACK",
        actor_num_gpus=actor_gpus,
        actor_num_cpus=0.0,
        uses_gpus=use_gpus,
    )


def cluster_has_gpus() -> bool:
    return ray.cluster_resources().get("GPU", 0.0) > 0


def create_instance_pg(
    cluster: str, instance_id: str, plan: InstancePlacement, *, detached: bool = True
) -> PlacementGroup:
    """Create (or find, after a Controller restart) the named group of one instance. Does not wait."""
    name = pg_name(cluster, instance_id)
    existing = find_pg(name)
    if existing is not None:
        return existing
    return placement_group(
        [dict(b) for b in plan.bundles],
        strategy=plan.strategy,
        name=name,
        lifetime="detached" if detached else None,
    )


def find_pg(name: str) -> PlacementGroup | None:
    try:
        return ray.util.get_placement_group(name)
    except ValueError:
        return None


def remove_instance_pg(cluster: str, instance_id: str) -> bool:
    pg = find_pg(pg_name(cluster, instance_id))
    if pg is None:
        return False
    remove_placement_group(pg)
    return True


def actor_options(pg: PlacementGroup, plan: InstancePlacement) -> dict[str, Any]:
    """``.options(...)`` for an Instance actor living in bundle 0 of ``pg``; TP workers inherit the group."""
    return {
        "num_cpus": plan.actor_num_cpus,
        "num_gpus": plan.actor_num_gpus,
        "scheduling_strategy": PlacementGroupSchedulingStrategy(
            placement_group=pg, placement_group_bundle_index=0, placement_group_capture_child_tasks=True
        ),
    }


def bundle_nodes(pg: PlacementGroup) -> list[str]:
    """Node id of each bundle (empty until the group is placed)."""
    table = ray.util.placement_group_table(pg)
    mapping = table.get("bundles_to_node_id") or {}
    return [mapping[i] for i in sorted(mapping)]


# Ray marks its head node with this resource (the control plane lives there -- the Controller asks for a sliver of it,
# ``deploy`` -- and it is never drained).
HEAD_RESOURCE = "node:__internal_head__"


def find_node(name: str) -> dict[str, Any]:
    """The alive Ray node that ``name`` names: its node id (hex), its hostname (under KubeRay the worker pod's name,
    what a pod's preStop hook knows as ``$HOSTNAME``) or its IP (the pod IP).

    Raises:
        ValueError: naming ``node``: no alive node has that name, several do (say the node id), or it is the head.
    """
    alive = [n for n in ray.nodes() if n.get("Alive")]
    hits = [n for n in alive if n.get("NodeID") == name] or [
        n for n in alive if name in (n.get("NodeManagerHostname"), n.get("NodeManagerAddress"))
    ]
    if not hits:
        raise ValueError(f"node: no alive Ray node is named {name!r} (a node id, hostname or IP)")
    if len(hits) > 1:
        raise ValueError(f"node: {name!r} names {len(hits)} Ray nodes; give the node id: "
                         + ", ".join(sorted(n["NodeID"] for n in hits)))
    if HEAD_RESOURCE in (hits[0].get("Resources") or {}):
        raise ValueError(f"node: {name!r} is the Ray head, where the control plane runs; it is never drained")
    return hits[0]


def drain_ray_node(node_id: str, reason: str, deadline_s: float) -> None:
    """Tell Ray the node is going away (a preemption, as KubeRay's autoscaler v2 does before deleting a pod): no new
    task, actor or placement group lands on it from now on, so a replacement placed while it still runs goes
    elsewhere; what runs there keeps running. ``deadline_s`` (seconds from now) is informational for Ray.

    Raises:
        RuntimeError: Ray refused the drain (its message).
    """
    from ray.core.generated import autoscaler_pb2

    # NOTE(control): the GCS call behind `ray drain-node` (not a public API in Ray 2.60; its CLI is hidden).
    gcs = ray._private.worker.global_worker.gcs_client
    deadline_ms = int((time.time() + max(deadline_s, 0.0)) * 1000)
    accepted, why = gcs.drain_node(
        node_id, autoscaler_pb2.DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION"), reason, deadline_ms)
    if not accepted:
        raise RuntimeError(f"Ray refused to drain node {node_id}: {why}")
