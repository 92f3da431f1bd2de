"""Bring up a local Ray cluster, a Controller, its instances and an Ingress (tests, ``llmsched serve``, the demo).

::

    start_ray(nodes)        ray.init (one node) or ray.cluster_utils.Cluster (head + workers with fake GPUs,
                            each worker labelled with its GPU type: llmsched_gpu_<type>)
    deploy(config)          Controller actor (named, max_restarts=-1) -> placement groups -> Instance actors
    Ingress(config, ctrl)   in the caller's process; starts lazily in the caller's event loop

``start_local_cluster`` does all three; ``LocalCluster.shutdown()`` undoes them, ``LocalCluster.detach()`` leaves a
detached deployment running for the next ``deploy`` of the same name to attach to (``llmsched serve --on-exit keep``).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

from scheduler.config.gpus import nodes_for as packed_nodes
from scheduler.config.models import ClusterConfig
from scheduler.control.controller import CONTROLLER_NAME, NAMESPACE, Controller, instance_backend_kwargs
from scheduler.control.instance import InstanceInfo
from scheduler.control.placement import HEAD_RESOURCE, gpu_type_resource

log = logging.getLogger(__name__)

# NOTE(control): Ray 2.60 binds to the external interface unless this is 0; a dev cluster stays on loopback.
RAY_LOCAL_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


@dataclass(frozen=True, slots=True)
class NodeSpec:
    """One (fake) node of a local cluster."""

    gpu: str | None = None  # GPU type label; None: a CPU-only node
    num_gpus: int = 0
    num_cpus: int = 1


@dataclass
class RayRuntime:
    """A Ray runtime this process started (and so must stop)."""

    address: str
    cluster: Any = None  # ray.cluster_utils.Cluster when multi-node
    nodes: tuple[NodeSpec, ...] = ()

    def shutdown(self) -> None:
        import ray

        ray.shutdown()
        if self.cluster is not None:
            self.cluster.shutdown()
            self.cluster = None


def nodes_for(config: ClusterConfig, *, fake_gpus_per_node: int, nodes: int | None = None) -> list[NodeSpec]:
    """Worker nodes for ``config``: ``nodes`` per GPU type its pools use, each with ``fake_gpus_per_node`` fake
    GPUs -- by default the nodes that type's instances pack onto (``scheduler.config.gpus.nodes_for``, as a KubeRay
    worker group is sized; at least 1). No GPUs asked: no worker nodes (CPU-only head).

    Raises:
        ValueError: a pool's TP is over ``fake_gpus_per_node``: an instance's GPUs are one STRICT_PACK placement
            group on one node, so it would never be placed (the start waited out its timeout, then served without
            those instances).
    """
    if fake_gpus_per_node <= 0:
        return []
    for i, p in enumerate(config.pools):
        if p.tp > fake_gpus_per_node:
            raise ValueError(f"{fake_gpus_per_node} fake GPUs per node cannot hold an instance of pools[{i}] "
                             f"({p.name}): TP {p.tp} needs {p.tp} GPUs on one node")
    out: list[NodeSpec] = []
    for t in sorted({p.gpu for p in config.pools}):
        # One node per type placed only what fit on it: 3 x TP2 on 4-GPU nodes left the third instance unplaced.
        need = packed_nodes([p.tp for p in config.pools if p.gpu == t for _ in range(p.count)], fake_gpus_per_node)
        out += [NodeSpec(t, fake_gpus_per_node)] * max(nodes or need, 1)
    return out


def start_ray(
    workers: list[NodeSpec] | None = None,
    *,
    head_cpus: int = 2,
    object_store_bytes: int = 100 * 2**20,
    namespace: str = NAMESPACE,
) -> RayRuntime:
    """Start Ray for this process: a single node, or a head plus ``workers`` (fake GPU nodes)."""
    import ray

    os.environ.update(RAY_LOCAL_ENV)
    t0 = time.perf_counter()
    common = {"include_dashboard": False, "object_store_memory": object_store_bytes}
    if not workers:
        # "local": always a new instance of our own, never another Ray found on the machine (ray.init() would join
        # a cluster some other process started, and then refuse num_cpus).
        ray.init(address="local", num_cpus=head_cpus, namespace=namespace, log_to_driver=False, **common)
        rt = RayRuntime(ray.get_runtime_context().gcs_address)
    else:
        from ray.cluster_utils import Cluster

        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": head_cpus, **common})
        for w in workers:
            res = {gpu_type_resource(w.gpu): float(w.num_gpus or 1)} if w.gpu else {}
            cluster.add_node(num_cpus=w.num_cpus, num_gpus=w.num_gpus, resources=res,
                             object_store_memory=object_store_bytes)
        ray.init(address=cluster.address, namespace=namespace, log_to_driver=False)
        cluster.wait_for_nodes()
        rt = RayRuntime(cluster.address, cluster, tuple(workers))
    log.info("ray up in %.2fs at %s", time.perf_counter() - t0, rt.address)
    return rt


@dataclass
class Deployment:
    """One llmsched cluster (Controller + instances) inside a Ray cluster."""

    config: ClusterConfig
    controller: Any
    name: str
    namespace: str
    controller_name: str
    instances: dict[str, InstanceInfo] = field(default_factory=dict)
    backend_kwargs: dict[str, dict[str, Any]] = field(default_factory=dict)
    attached: bool = False  # found running (``deploy`` attached to its Controller), not created by this driver

    def make_ingress(self, **kw: Any) -> Any:
        """A new Ingress for this deployment (starts lazily in the event loop that first uses it)."""
        from scheduler.control.ingress import Ingress
        from scheduler.control.tokenizer import make_tokenizer

        kw.setdefault("tokenizer", make_tokenizer(self.config, self.backend_kwargs))
        return Ingress(self.config, self.controller, **kw)

    def shutdown(self, timeout_s: float = 30.0) -> None:
        """Release every instance and placement group, then stop the Controller."""
        import ray

        try:
            ray.get(self.controller.shutdown.remote(), timeout=timeout_s)
        except Exception:
            log.exception("controller shutdown failed")
        ray.kill(self.controller, no_restart=True)


def deploy(
    config: ClusterConfig,
    *,
    name: str = "default",
    namespace: str = NAMESPACE,
    controller_name: str = CONTROLLER_NAME,
    detached: bool = False,
    backend_kwargs: dict[str, dict[str, Any]] | None = None,
    refresh_s: float = 0.1,
    ready_timeout_s: float = 120.0,
) -> Deployment:
    """Start the Controller (``detached`` in production; owned by this driver in tests) and wait until every
    pool's instances run. Instances and their placement groups are always detached: they must outlive a
    Controller crash (a non-detached actor dies with its owner).

    A live Controller of this name already running ``config`` (and the same backend kwargs) is attached to, not
    created again: a restarted ``llmsched serve`` finds the deployment it left running (``--on-exit keep``), and
    its instances go on serving without a model reload (before: ``ActorAlreadyExistsError``). One running
    another config is shut down first and ``config`` deployed: the file is the operator's new word (as a changed
    pool count is, ``restored_desired``), and an ingress built from it must match its Controller."""
    import ray

    ctrl = _running(config, name, namespace, controller_name, backend_kwargs)
    if ctrl is not None:
        infos = ray.get(ctrl.ready.remote(ready_timeout_s), timeout=ready_timeout_s + 10)
        log.info("attached to the running controller %s (%d instances)", controller_name, len(infos))
        return Deployment(config, ctrl, name, namespace, controller_name, infos, dict(backend_kwargs or {}),
                          attached=True)
    ctrl = (
        ray.remote(Controller)
        .options(
            name=controller_name,
            namespace=namespace,
            lifetime="detached" if detached else None,
            max_restarts=-1,
            num_cpus=0,
            # On the head, as Ray Serve pins its controller: placed anywhere, it could land on a GPU worker that a
            # DrainNode then takes away (KubeRay deletes the pod), and it died -- restarting mid-drain -- with the
            # very node whose drain it ran.
            resources={HEAD_RESOURCE: 0.001},
            max_concurrency=1000,
        )
        .remote(config, cluster=name, backend_kwargs=backend_kwargs, refresh_s=refresh_s, namespace=namespace)
    )
    infos = ray.get(ctrl.ready.remote(ready_timeout_s), timeout=ready_timeout_s + 10)
    want = config.num_instances
    if len(infos) < want:
        log.warning("only %d of %d instances came up", len(infos), want)
    return Deployment(config, ctrl, name, namespace, controller_name, infos, dict(backend_kwargs or {}))


def _running(config: ClusterConfig, name: str, namespace: str, controller_name: str,
             backend_kwargs: dict[str, dict[str, Any]] | None) -> Any | None:
    """The live Controller ``deploy`` attaches to, or None (none runs, or one of another deployment was shut
    down)."""
    import ray

    try:
        ctrl = ray.get_actor(controller_name, namespace=namespace)
    except ValueError:  # no actor of that name
        return None
    try:
        running, kwargs = ray.get(ctrl.spec.remote(), timeout=30)
        cluster = ray.get(ctrl.ping.remote(), timeout=30)["cluster"]
    except ray.exceptions.RayActorError:  # dead (a kill still under way): its name is about to be free
        return None
    if cluster != name:  # another deployment's: neither ours to attach to nor to shut down
        raise ValueError(f"controller_name: {controller_name!r} is the Controller of cluster {cluster!r}, "
                         f"not {name!r}")
    if (running.model_dump(mode="json"), kwargs) == (config.model_dump(mode="json"),
                                                     instance_backend_kwargs(config, backend_kwargs)):
        return ctrl
    log.warning("controller %s runs another config (%s); shutting that deployment down to deploy %s",
                controller_name, running.name, config.name)
    Deployment(running, ctrl, name, namespace, controller_name).shutdown()
    deadline = time.monotonic() + 10.0  # the kill lands asynchronously; its name is free once it has
    while time.monotonic() < deadline:
        try:
            ray.get_actor(controller_name, namespace=namespace)
        except ValueError:
            break
        time.sleep(0.1)
    return None


@dataclass
class LocalCluster:
    """Ray + one deployment + an Ingress, all owned by this process."""

    runtime: RayRuntime | None
    deployment: Deployment
    ingress: Any

    @property
    def controller(self) -> Any:
        return self.deployment.controller

    def shutdown(self) -> None:
        self.deployment.shutdown()
        if self.runtime is not None:
            self.runtime.shutdown()

    def detach(self) -> None:
        """Disconnect, leaving the deployment running (a detached Controller outlives this driver; its instances
        always do). A Ray runtime this process started stops with it all the same."""
        import ray

        if self.runtime is not None:
            self.runtime.shutdown()
        else:
            ray.shutdown()


def start_local_cluster(
    config: ClusterConfig,
    *,
    fake_gpus_per_node: int = 0,
    nodes: int | None = None,
    name: str = "default",
    backend_kwargs: dict[str, dict[str, Any]] | None = None,
    ingress_kwargs: dict[str, Any] | None = None,
    ready_timeout_s: float = 120.0,
    detached: bool = False,
    runtime: RayRuntime | None = None,
) -> LocalCluster:
    """Start Ray (unless already initialised), deploy ``config`` (or attach to it: :func:`deploy`) and build an
    Ingress.

    Args:
        fake_gpus_per_node: > 0 starts worker nodes per GPU type of the pools (``nodes`` each, default what its
            instances pack onto: :func:`nodes_for`) with that many fake GPUs, so placement groups and GPU-type
            pinning run for real; 0 is a CPU-only single node.
        backend_kwargs: per backend kind, e.g. ``{"simulated": {"time_scale": 0.5}}``.
        ready_timeout_s: how long to wait for every instance; those still starting then join when up.
        detached: a Controller that outlives this process (``LocalCluster.detach``).
        runtime: a Ray the caller started for it (:func:`start_ray`), stopped with the cluster.
    """
    import ray

    address = os.environ.get("RAY_ADDRESS", "").strip()
    if not ray.is_initialized():
        if address and fake_gpus_per_node <= 0:
            # A running cluster (the KubeRay head in the chart's head pod): join it, never start a private one;
            # runtime stays None so shutdown() does not stop a cluster this process did not start.
            ray.init(address=address, namespace=NAMESPACE, log_to_driver=False)
        else:
            runtime = start_ray(nodes_for(config, fake_gpus_per_node=fake_gpus_per_node, nodes=nodes))
    dep = deploy(config, name=name, backend_kwargs=backend_kwargs, ready_timeout_s=ready_timeout_s,
                 detached=detached)
    return LocalCluster(runtime, dep, dep.make_ingress(**(ingress_kwargs or {})))
