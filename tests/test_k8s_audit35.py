"""Kubernetes deployment audit: what the chart's manifests become once KubeRay and Kubernetes default them.

Offline (helm-python-sdk renders the chart); no cluster.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import yaml

pytest.importorskip("helm_python")

from scheduler.deploy.chart import DEFAULT_CHART, DEFAULT_VALUES_DIR, render_chart

# KubeRay appends this port to the Ray container (containers[0]) of every pod whose Ray container declares no port
# named "metrics" (ray-operator common/pod.go: utils.MetricsPortName, utils.DefaultMetricsPort): Ray's own
# metrics agent listens there (ray start --metrics-export-port).
KUBERAY_METRICS_PORT = {"name": "metrics", "containerPort": 8080, "protocol": "TCP"}


def _manifests(values: dict[str, Any] | None) -> list[dict[str, Any]]:
    rendered, findings = render_chart(DEFAULT_CHART, values, "test")
    assert findings == []
    return rendered.manifests


def _head_pod_as_kuberay_builds_it(raycluster: dict[str, Any]) -> dict[str, Any]:
    pod = copy.deepcopy(raycluster["spec"]["headGroupSpec"]["template"])
    ray = pod["spec"]["containers"][0]
    if not any(p.get("name") == "metrics" for p in ray.get("ports", [])):
        ray.setdefault("ports", []).append(dict(KUBERAY_METRICS_PORT))
    return pod


def _resolve(pod: dict[str, Any], service_port: dict[str, Any]) -> tuple[str, int]:
    """(container, port) a Service port reaches: a named targetPort is the first container port of that name and
    protocol in the pod's container order (Kubernetes podutil.FindPort), a number is itself."""
    target, proto = service_port.get("targetPort", service_port["port"]), service_port.get("protocol", "TCP")
    for c in pod["spec"]["containers"]:
        for p in c.get("ports", []):
            if isinstance(target, int) and p["containerPort"] == target:
                return c["name"], target
            if p.get("name") == target and p.get("protocol", "TCP") == proto:
                return c["name"], p["containerPort"]
    raise AssertionError(f"targetPort {target!r} matches no container port")


def _values(name: str | None) -> dict[str, Any] | None:
    return yaml.safe_load((DEFAULT_VALUES_DIR / name).read_text()) if name else None


@pytest.mark.parametrize("name", [None, "cpu-dev.yaml", "hetero-pd.yaml"])
def test_every_head_service_reaches_the_scheduler_after_kuberay_adds_its_ports(name: str | None) -> None:
    values = _values(name)
    manifests = _manifests(values)
    rc = next(m for m in manifests if m["kind"] == "RayCluster")
    pod = _head_pod_as_kuberay_builds_it(rc)
    metrics_port = ((values or {}).get("metrics") or {}).get("port", 9090)
    want = {"grpc": 50051, "http": 8000, "metrics": metrics_port}
    services = [m for m in manifests if m["kind"] == "Service"]
    assert {p["name"] for s in services for p in s["spec"]["ports"]} == set(want)
    for svc in services:
        for port in svc["spec"]["ports"]:
            # Before: the -metrics Service's targetPort "metrics" resolved to ray-head's 8080 (Ray's metrics).
            assert _resolve(pod, port) == ("llmsched", want[port["name"]]), svc["metadata"]["name"]


@pytest.mark.parametrize("port", [8080, 8000, 50051, 6379, 8265, 10001])
def test_a_metrics_port_the_head_pod_already_uses_fails_naming_the_value(port: int) -> None:
    rendered, findings = render_chart(DEFAULT_CHART, {"metrics": {"port": port}}, "test")
    assert rendered.manifests == []
    assert len(findings) == 1 and "metrics.port" in findings[0].message, findings
    assert str(port) in findings[0].message


def _gpu_types(**override: Any) -> list[dict[str, Any]]:
    chart_values = yaml.safe_load((DEFAULT_CHART / "values.yaml").read_text())
    return [{**chart_values["gpuTypes"][0], **override}]


@pytest.mark.parametrize(
    ("values", "where"),
    [
        # A product label value with spaces: KubeRay's worker pods fail creation (invalid nodeSelector) after a
        # successful install; before, chart check passed it.
        ({"gpuTypes": _gpu_types(product="NVIDIA A100 80GB")}, "/gpuTypes/0/product"),
        ({"gpuTypes": _gpu_types(nodeSelector={"pool": "gpu a"})}, "/gpuTypes/0/nodeSelector/pool"),
        ({"gpuTypes": _gpu_types(nodeSelector={"pool": "x" * 64})}, "/gpuTypes/0/nodeSelector/pool"),
        (
            {"metrics": {"serviceMonitor": {"labels": {"release": "kube prometheus"}}}},
            "serviceMonitor/labels",
        ),
        ({"ray": {"version": "2.40.0", "head": {"nodeSelector": {"bad key!": "x"}}}}, "bad key!"),
    ],
)
def test_a_label_the_api_server_would_refuse_fails_the_values_check(
    values: dict[str, Any], where: str
) -> None:
    rendered, findings = render_chart(DEFAULT_CHART, values, "test")
    assert rendered.manifests == []
    assert [f.stage for f in findings] == ["values"] and where in findings[0].message, findings


def test_valid_qualified_label_keys_and_product_values_pass() -> None:
    values = {
        "gpuTypes": _gpu_types(
            product="NVIDIA-H100-80GB-HBM3", nodeSelector={"node.kubernetes.io/instance-type": "p5.48xlarge"}
        ),
        "ray": {"version": "2.40.0", "head": {"nodeSelector": {"node-role/system": "true"}}},
    }
    _manifests(values)
