"""`helm upgrade` keeps the worker-group sizes the Controller set on the live RayCluster.

The chart is rendered as an upgrade with Helm's own ``lookup`` reading an in-memory Kubernetes API (kmock, as in
tests/test_k8s.py) that holds the RayCluster the install rendered, resized through the Controller's real patch
(:class:`~scheduler.deploy.k8s.KubeRayScaler`). Before, the upgrade rendered values' ``replicas``: the list
``workerGroupSpecs`` replaces the live one whole, so a grown group shrank and KubeRay deleted workers.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

pytest.importorskip("helm_python")
pytest.importorskip("kmock")
client = pytest.importorskip("kubernetes.client")

from scheduler.deploy.chart import DEFAULT_CHART, DEFAULT_VALUES_DIR, NAMESPACE, RELEASE_NAME, render_chart
from scheduler.deploy.k8s import KubeRayScaler
from tests.test_k8s import RC, _Server


def _values() -> dict[str, Any]:
    # h100: replicas 1 in [1, 3]; a100: replicas 2 in [1, 6].
    return yaml.safe_load((DEFAULT_VALUES_DIR / "hetero-pd.yaml").read_text())


def _group(values: dict[str, Any], name: str) -> dict[str, Any]:
    return next(g for g in values["gpuTypes"] if g["name"] == name)


def _render(values: dict[str, Any], upgrade_from: str | None = None) -> tuple[dict[str, Any], str]:
    """The RayCluster and NOTES.txt of an install (offline) or of an upgrade of the release at ``upgrade_from``."""
    rendered, findings = render_chart(DEFAULT_CHART, values, "test", upgrade_from=upgrade_from)
    assert findings == []
    (rc,) = [m for m in rendered.manifests if m["kind"] == "RayCluster"]
    return rc, rendered.notes or ""


def _min_available(values: dict[str, Any], upgrade_from: str | None = None) -> dict[str, int]:
    """Each worker PDB's minAvailable, by GPU type (its selector's llmsched.io/gpu-type)."""
    rendered, findings = render_chart(DEFAULT_CHART, values, "test", upgrade_from=upgrade_from)
    assert findings == []
    return {
        m["spec"]["selector"]["matchLabels"]["llmsched.io/gpu-type"]: m["spec"]["minAvailable"]
        for m in rendered.manifests
        if m["kind"] == "PodDisruptionBudget"
    }


def _replicas(rc: dict[str, Any]) -> dict[str, int]:
    return {g["groupName"]: g["replicas"] for g in rc["spec"]["workerGroupSpecs"]}


@pytest.fixture
def cluster() -> Iterator[_Server]:
    """An API server that serves RayClusters (discovery included: Helm's lookup asks it for the resource)."""
    with _Server() as s:
        s.k8s.resources["ray.io/v1/rayclusters"] = {
            "namespaced": True, "kind": "RayCluster", "singular": "raycluster", "verbs": ["get", "patch"],
        }
        yield s


def _install(cluster: _Server, values: dict[str, Any]) -> dict[str, Any]:
    rc, _ = _render(values)
    cluster.k8s.objects[RC, NAMESPACE, RELEASE_NAME] = copy.deepcopy(rc)
    return rc


def _resize(cluster: _Server, group: str, replicas: int) -> None:
    # What the Controller does (scheduler/deploy/autoscale.py): a JSON patch of the group's replicas.
    KubeRayScaler(client.CustomObjectsApi(cluster.api_client()), NAMESPACE, RELEASE_NAME).resize(group, replicas)


def test_upgrade_keeps_the_size_the_controller_set(cluster: _Server) -> None:
    values = _values()
    installed = _install(cluster, values)
    _resize(cluster, "a100", 5)

    upgraded, notes = _render(values, upgrade_from=cluster.url)
    assert _replicas(upgraded) == {"h100": 1, "a100": 5}, "the upgrade reset a worker group the Controller grew"
    expected = copy.deepcopy(installed)
    expected["spec"]["workerGroupSpecs"][1]["replicas"] = 5
    assert upgraded == expected  # nothing else moves
    # The operator is told why values' a100 replicas (2) did not apply; h100 ran at its values size.
    assert "Worker group a100 keeps 5 replicas" in notes and "Worker group h100" not in notes
    assert "keeps" not in _render(values)[1]  # an install says nothing


@pytest.mark.parametrize(
    ("live", "new", "expected"),
    [
        (5, {"maxReplicas": 3, "replicas": 2}, 3),  # bounds lowered below the running size: clamped down
        (1, {"minReplicas": 3, "replicas": 4}, 3),  # raised above it: clamped up (to the bound, not values)
        (4, {"replicas": 6}, 4),  # a changed values.replicas does not win over the running size
    ],
)
def test_the_running_size_is_clamped_to_the_new_bounds(
    cluster: _Server, live: int, new: dict[str, int], expected: int
) -> None:
    values = _values()
    _install(cluster, values)
    _resize(cluster, "a100", live)
    _group(values, "a100").update(new)
    upgraded, notes = _render(values, upgrade_from=cluster.url)
    assert _replicas(upgraded)["a100"] == expected
    assert (f"Worker group a100 keeps {expected} replicas" in notes) == (expected != new["replicas"])


def test_a_group_or_release_the_cluster_lacks_renders_the_values(cluster: _Server) -> None:
    values = _values()
    # No RayCluster yet (the first `helm upgrade --install`): every group at its values size.
    assert _replicas(_render(values, upgrade_from=cluster.url)[0]) == {"h100": 1, "a100": 2}

    _install(cluster, values)
    _resize(cluster, "a100", 6)
    l4 = {**copy.deepcopy(_group(values, "a100")), "name": "l4", "product": "NVIDIA-L4", "replicas": 3}
    values["gpuTypes"].append(l4)  # a GPU type added by this upgrade
    assert _replicas(_render(values, upgrade_from=cluster.url)[0]) == {"h100": 1, "a100": 6, "l4": 3}


@pytest.mark.parametrize(("live", "expected"), [(6, 5), (1, 0)])
def test_worker_pdbs_follow_the_size_the_upgrade_renders(cluster: _Server, live: int, expected: int) -> None:
    """A PDB's minAvailable is an absolute count: computed from values' replicas (2) after the Controller grew a100
    to 6, it let a drain evict 5 workers at once (podDisruptionBudget.maxUnavailable is 1); after it shrank the
    group to 1, minAvailable 1 blocked every drain of its last worker's node. The budget now counts from the
    replicas the RayCluster renders."""
    values = _values()
    assert _min_available(values) == {"h100": 0, "a100": 1}  # install: values' replicas - maxUnavailable
    _install(cluster, values)
    _resize(cluster, "a100", live)
    upgraded, _ = _render(values, upgrade_from=cluster.url)
    assert _replicas(upgraded)["a100"] == live
    assert _min_available(values, upgrade_from=cluster.url) == {"h100": 0, "a100": expected}


# ---- between upgrades: the Controller keeps the worker PDBs at the sizes it sets --------------------------------
PDB = "policy/v1/poddisruptionbudgets"


def _installed(cluster: _Server, values: dict[str, Any]) -> list[dict[str, Any]]:
    """Install: the RayCluster and the worker PDBs the chart renders, in the API server; all manifests back."""
    rendered, findings = render_chart(DEFAULT_CHART, values, "test")
    assert findings == []
    for m in rendered.manifests:
        if m["kind"] in ("RayCluster", "PodDisruptionBudget"):
            resource = RC if m["kind"] == "RayCluster" else PDB
            cluster.k8s.objects[resource, NAMESPACE, m["metadata"]["name"]] = copy.deepcopy(m)
    return rendered.manifests


def _controller_env(manifests: list[dict[str, Any]]) -> dict[str, str]:
    (rc,) = [m for m in manifests if m["kind"] == "RayCluster"]
    (sched,) = [c for c in rc["spec"]["headGroupSpec"]["template"]["spec"]["containers"] if c["name"] == "llmsched"]
    return {e["name"]: e["value"] for e in sched["env"] if "value" in e} | {"LLMSCHED_NAMESPACE": NAMESPACE}


def test_the_controllers_resizes_keep_the_worker_pdbs_in_step(cluster: _Server) -> None:
    """minAvailable is an absolute count: between upgrades a group the Controller grew from 2 to 6 kept the
    install's minAvailable 1, so one drain could evict 5 of its workers (maxUnavailable 1); shrunk to 1, it kept
    minAvailable 1 over one pod and blocked every drain of that node. The Controller (the env and Role the chart
    renders, the real KubernetesBackend) now sets the PDB with each resize, to what an upgrade would render."""
    from scheduler.deploy.autoscale import KubernetesBackend

    values = _values()
    manifests = _installed(cluster, values)
    env = _controller_env(manifests)
    assert env["LLMSCHED_PDB_MAX_UNAVAILABLE"] == "1"
    backend = KubernetesBackend.from_env(env)
    assert backend is not None
    backend.host = cluster.url
    pdb_name = f"{RELEASE_NAME}-a100"
    (role,) = [m for m in manifests if m["kind"] == "Role"]
    assert any(pdb_name in r.get("resourceNames", ()) and "patch" in r["verbs"]
               and r["resources"] == ["poddisruptionbudgets"] for r in role["rules"])  # allowed to

    for size, expected in [(6, 5), (1, 0), (3, 2)]:
        backend.applier.scaler.resize("a100", size)
        assert cluster.k8s.objects[PDB, NAMESPACE, pdb_name]["spec"]["minAvailable"] == expected
        assert _min_available(values, upgrade_from=cluster.url)["a100"] == expected  # what an upgrade renders
    assert cluster.k8s.objects[PDB, NAMESPACE, f"{RELEASE_NAME}-h100"]["spec"]["minAvailable"] == 0  # untouched


def test_a_pdb_the_controller_cannot_patch_leaves_the_resize_done(
    cluster: _Server, caplog: pytest.LogCaptureFixture
) -> None:
    values = _values()
    _install(cluster, values)  # the RayCluster only: no PDB to patch
    scaler = KubeRayScaler(client.CustomObjectsApi(cluster.api_client()), NAMESPACE, RELEASE_NAME,
                           policy=client.PolicyV1Api(cluster.api_client()), pdb_max_unavailable=1)
    assert scaler.resize("a100", 4).replicas == 4
    assert _replicas(cluster.k8s.objects[RC, NAMESPACE, RELEASE_NAME])["a100"] == 4
    assert f"patch PodDisruptionBudget {NAMESPACE}/{RELEASE_NAME}-a100: Kubernetes API 404" in caplog.text
    # with the chart's PDBs off, nothing is patched nor said
    values["podDisruptionBudget"] = {"enabled": False}
    env = _controller_env(render_chart(DEFAULT_CHART, values, "test")[0].manifests)
    assert "LLMSCHED_PDB_MAX_UNAVAILABLE" not in env
