"""Kubernetes integration against recorded API responses, through the real client call paths.

The official ``kubernetes`` client talks HTTP to ``kmock`` (an in-memory Kubernetes API on 127.0.0.1) running in
a background event loop; the recorded responses are in tests/data/k8s/.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Self

import pytest

kmock = pytest.importorskip("kmock")
client = pytest.importorskip("kubernetes.client")

from scheduler.deploy.k8s import (
    GPU_PRODUCT_LABEL,
    KubeRayScaler,
    KubernetesError,
    gpu_type_from_product,
    read_gpu_inventory,
)

DATA = Path(__file__).parent / "data" / "k8s"
RC = "ray.io/v1/rayclusters"
NS, NAME = "llmsched", "pd-llmsched"


def _load(name: str) -> dict[str, Any]:
    return json.loads((DATA / name).read_text())


class _Server:
    """kmock's KubernetesEmulator on 127.0.0.1, served from its own event loop thread (the client is sync)."""

    def __enter__(self) -> Self:
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(
            target=self.loop.run_until_complete, args=(self._serve(),), daemon=True
        )
        self._thread.start()
        assert self._ready.wait(10), "kmock did not start"
        return self

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        async with kmock.KubernetesEmulator() as k8s, kmock.Server(k8s) as server:
            self.k8s, self.url = k8s, str(server.url).rstrip("/")
            self._ready.set()
            await self._stop.wait()

    def __exit__(self, *exc: object) -> None:
        self.loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)
        self.loop.close()

    def api_client(self) -> Any:
        cfg = client.Configuration()
        cfg.host = self.url
        cfg.retries = False
        return client.ApiClient(cfg)

    def requests(self) -> list[Any]:
        return list(self.k8s)


@pytest.fixture
def server() -> Iterator[_Server]:
    with _Server() as s:
        yield s


@pytest.fixture
def nodes_server(server: _Server) -> _Server:
    # Two recorded pages: the first answer carries a continue token, the second the rest.
    page1, page2 = _load("nodes-page1.json"), _load("nodes-page2.json")
    token = page1["metadata"]["continue"]
    server.k8s["get /api/v1/nodes", kmock.params(**{"continue": token})] << page2
    server.k8s["get /api/v1/nodes"] << page1
    return server


@pytest.fixture
def rc_server(server: _Server) -> _Server:
    server.k8s.objects[RC, NS, NAME] = _load("raycluster-pd.json")
    return server


def test_gpu_inventory_from_labels_and_allocatable(nodes_server: _Server) -> None:
    inv = read_gpu_inventory(client.CoreV1Api(nodes_server.api_client()), page_size=2)
    assert [n.name for n in inv.nodes] == ["gpu-a100-a", "gpu-a100-b", "gpu-h100-a", "gpu-h100-b", "gpu-l4-a"]
    # Cordoned A100 and NotReady L4 nodes do not count as capacity, but are listed.
    assert inv.gpus_by_type() == {"a100": 8, "h100": 16}
    assert inv.nodes_by_type() == {"a100": 1, "h100": 2}
    assert inv.gpus_by_type(usable_only=False) == {"a100": 16, "h100": 16, "l4": 1}
    cordoned = next(n for n in inv.nodes if n.name == "gpu-a100-b")
    assert (cordoned.schedulable, cordoned.ready, cordoned.allocatable) == (False, True, 8)
    # The real call path: label selector, page size, then the continue token.
    urls = [str(r.url) for r in nodes_server.requests()]
    assert len(urls) == 2
    assert "labelSelector=nvidia.com/gpu.product" in urls[0] and "limit=2" in urls[0]
    assert "continue=" in urls[1] and "continue=" not in urls[0]


def test_gpu_inventory_explicit_product_map(nodes_server: _Server) -> None:
    products = {"NVIDIA-H100-80GB-HBM3": "h100-sxm"}
    inv = read_gpu_inventory(client.CoreV1Api(nodes_server.api_client()), products=products)
    assert inv.gpus_by_type() == {"a100": 8, "h100-sxm": 16}


@pytest.mark.parametrize(
    ("product", "gpu_type"),
    [
        ("NVIDIA-A100-SXM4-80GB", "a100"),
        ("NVIDIA-H100-80GB-HBM3", "h100"),
        ("Tesla-T4", "t4"),
        ("NVIDIA-L40S", "l40s"),
    ],
)
def test_gpu_type_from_product(product: str, gpu_type: str) -> None:
    assert gpu_type_from_product(product) == gpu_type


def test_inventory_api_error_names_the_call(server: _Server) -> None:
    (
        server.k8s["get /api/v1/nodes"]
        << 403
        << {"kind": "Status", "status": "Failure", "reason": "Forbidden", "code": 403}
    )
    with pytest.raises(KubernetesError, match="list nodes.*403"):
        read_gpu_inventory(client.CoreV1Api(server.api_client()))


def test_worker_groups_read_from_raycluster(rc_server: _Server) -> None:
    scaler = KubeRayScaler(client.CustomObjectsApi(rc_server.api_client()), NS, NAME)
    groups = scaler.worker_groups()
    assert list(groups) == ["h100", "a100"]
    assert (groups["a100"].index, groups["a100"].replicas, groups["a100"].max_replicas) == (1, 2, 6)


def test_resize_patches_only_that_group(rc_server: _Server) -> None:
    scaler = KubeRayScaler(client.CustomObjectsApi(rc_server.api_client()), NS, NAME)
    res = scaler.resize("a100", 4, workers_to_delete=None)
    assert (res.previous, res.replicas, res.attempts, res.changed) == (2, 4, 1, True)

    obj = rc_server.k8s.objects[RC, NS, NAME]
    groups = {g["groupName"]: g for g in obj["spec"]["workerGroupSpecs"]}
    assert groups["a100"]["replicas"] == 4 and groups["h100"]["replicas"] == 1
    # Nothing else in the object changed (a JSON patch, not a read-modify-write of the whole spec).
    before = _load("raycluster-pd.json")
    before["spec"]["workerGroupSpecs"][1]["replicas"] = 4
    assert dict(obj) == before

    patch = [r for r in rc_server.requests() if str(r.method).upper().endswith("PATCH")]
    assert len(patch) == 1
    assert patch[0].headers["Content-Type"] == "application/json-patch+json"
    assert patch[0].data[0] == {"op": "test", "path": "/spec/workerGroupSpecs/1/groupName", "value": "a100"}
    assert str(patch[0].url).endswith(f"/apis/ray.io/v1/namespaces/{NS}/rayclusters/{NAME}")


def test_scale_down_names_the_drained_workers(rc_server: _Server) -> None:
    scaler = KubeRayScaler(client.CustomObjectsApi(rc_server.api_client()), NS, NAME)
    scaler.resize("a100", 1, workers_to_delete=["pd-llmsched-a100-worker-x7k2p"])
    g = rc_server.k8s.objects[RC, NS, NAME]["spec"]["workerGroupSpecs"][1]
    assert g["replicas"] == 1
    assert g["scaleStrategy"] == {"workersToDelete": ["pd-llmsched-a100-worker-x7k2p"]}


def test_resize_rejects_bad_input_without_patching(rc_server: _Server) -> None:
    scaler = KubeRayScaler(client.CustomObjectsApi(rc_server.api_client()), NS, NAME)
    with pytest.raises(ValueError, match=r"replicas 7 outside \[minReplicas 1, maxReplicas 6\]"):
        scaler.resize("a100", 7)
    with pytest.raises(ValueError, match="unknown worker group 'l4'; allowed: h100, a100"):
        scaler.resize("l4", 1)
    assert not [r for r in rc_server.requests() if str(r.method).upper().endswith("PATCH")]


def test_resize_missing_raycluster_is_a_clear_error(server: _Server) -> None:
    scaler = KubeRayScaler(client.CustomObjectsApi(server.api_client()), NS, "absent")
    with pytest.raises(KubernetesError, match=f"get RayCluster {NS}/absent.*404"):
        scaler.resize("a100", 1)


def test_product_label_constant_matches_recorded_nodes() -> None:
    labels = _load("nodes-page1.json")["items"][0]["metadata"]["labels"]
    assert GPU_PRODUCT_LABEL in labels


def test_plan_k8s_inventory_plans_within_the_clusters_gpus(nodes_server: _Server, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """``llmsched plan --k8s-inventory`` reads the node list (what the chart's ClusterRole grants) through the
    kubeconfig and plans within it: the config's GPU types the cluster has no usable GPU of (a40; l4, NotReady)
    are not planned, and each planned type is bounded by the cluster's GPUs of it (a100: 8, h100: 16)."""
    from scheduler.cli import main as cli_main
    from scheduler.config.load import load_config
    from sim.planner import with_inventory

    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "kmock",
        "clusters": [{"name": "kmock", "cluster": {"server": nodes_server.url}}],
        "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "u"}}],
        "users": [{"name": "u", "user": {"token": "t"}}],
    }))
    # What KUBECONFIG sets: the client reads the variable once, at import.
    monkeypatch.setattr("kubernetes.config.kube_config.KUBE_CONFIG_DEFAULT_LOCATION", str(kubeconfig))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    out = tmp_path / "plan"
    assert cli_main(["plan", "--k8s-inventory", "--limit", "200", "--tp", "1", "--layouts", "mixed", "--workers", "1",
                     "--max-instances", "12", "--out", str(out)]) == 0
    results = json.loads((out / "plan.json").read_text())["results"]
    assert {r["candidate"]["gpu"] for r in results} == {"a100", "h100"}
    assert all(r["gpus"] <= {"a100": 8, "h100": 16}[r["candidate"]["gpu"]] for r in results)

    cfg = load_config("default")
    bounded, keys = with_inventory(cfg, ["a100", "h100", "l4"], {"A100_80GB": 2, "h100": 0})  # aliases resolve
    assert keys == ["a100"] and bounded.gpus["a100"].count == 2 and bounded.gpus["l4"].count == 0
    with pytest.raises(ValueError, match="--k8s-inventory: the cluster has none of l4 \\(it has: a100 x 2\\)"):
        with_inventory(cfg, ["l4"], {"a100": 2})
