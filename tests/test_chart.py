"""The Helm chart: lint, render, manifest validation and the rendered config, offline (helm-python-sdk)."""

from __future__ import annotations

import base64
import copy
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

pytest.importorskip("helm_python")
pytest.importorskip("kubernetes_validate")

from scheduler.config.load import parse_config
from scheduler.config.models import ClusterConfig
from scheduler.deploy.chart import (
    DEFAULT_CHART,
    DEFAULT_VALUES_DIR,
    Finding,
    check_chart,
    main,
    manifest_errors,
    render_chart,
)
from scheduler.deploy.values_schema import render_values_schema

EXAMPLES = ["cpu-dev.yaml", "single-gpu-type.yaml", "hetero-pd.yaml"]
BROKEN = Path(__file__).parent / "data" / "chart" / "broken-values.yaml"


def _values(name: str) -> dict[str, Any]:
    return yaml.safe_load((DEFAULT_VALUES_DIR / name).read_text())


def _render(values: dict[str, Any] | None) -> dict[tuple[str, str], dict[str, Any]]:
    rendered, findings = render_chart(DEFAULT_CHART, values, "test")
    assert findings == []
    return {(m["kind"], m["metadata"]["name"]): m for m in rendered.manifests}


def _of_kind(manifests: dict[tuple[str, str], dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [m for (k, _), m in manifests.items() if k == kind]


def _write(tmp_path: Path, values: dict[str, Any]) -> Path:
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_values_pass_every_check(name: str) -> None:
    assert check_chart(DEFAULT_CHART, [DEFAULT_VALUES_DIR / name]) == []


def test_examples_are_the_shipped_set() -> None:
    assert sorted(p.name for p in DEFAULT_VALUES_DIR.glob("*.yaml")) == sorted(EXAMPLES)


def test_broken_values_file_fails_naming_the_gpu_type() -> None:
    findings = check_chart(DEFAULT_CHART, [BROKEN])
    assert findings, "the deliberately broken values file passed the chart check"
    assert all(f.source == str(BROKEN) for f in findings)
    text = "\n".join(map(str, findings))
    assert "config.pools[1].gpu" in text and '"h100"' in text and "allowed: a100" in text


def _base() -> dict[str, Any]:
    return _values("single-gpu-type.yaml")


def _set(values: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    out = copy.deepcopy(values)
    node: Any = out
    keys = [int(k) if k.isdigit() else k for k in path.split(".")]
    for k in keys[:-1]:
        node = node.setdefault(k, {}) if isinstance(node, dict) else node[k]
    node[keys[-1]] = value
    return out


@pytest.mark.parametrize(
    ("path", "value", "stage", "expected"),
    [
        ("gpuTypes.0.gpusPerNode", "eight", "values", "/gpuTypes/0/gpusPerNode': got string, want integer"),
        ("gpuTypes.0.nodeSelectr", {"a": "b"}, "values", "'nodeSelectr' not allowed"),
        ("config.model.num_layer", 40, "values", "'num_layer' not allowed"),
        ("config.pools.0.role", "both", "values", "/config/pools/0/role"),
        ("config.pools.0.gpu", "a100", "render", 'unknown GPU type "a100"; allowed: h100'),
        ("config.pools.0.tp", 16, "render", "config.pools[0].tp: 16 exceeds gpuTypes h100 gpusPerNode 8"),
        ("gpuTypes.0.replicas", 9, "render", "minReplicas <= replicas <= maxReplicas"),
        ("auth.adminToken", "same-token", "render", "auth.adminToken: must differ from auth.clientToken"),
        ("tls", {"enabled": True}, "values", "/tls"),
        ("gpuTypes.0.gpusPerNode", 0, "values", "slots"),
    ],
)
def test_bad_values_fail_with_a_finding_naming_the_key(
    tmp_path: Path, path: str, value: Any, stage: str, expected: str
) -> None:
    values = _set(_base(), path, value)
    if path == "auth.adminToken":
        values["auth"]["clientToken"] = value
    findings = check_chart(DEFAULT_CHART, [_write(tmp_path, values)])
    assert findings, f"{path}={value!r} passed the chart check"
    assert any(f.stage == stage and expected in f.message for f in findings), "\n".join(map(str, findings))


def test_config_that_only_pydantic_rejects_is_a_config_finding(tmp_path: Path) -> None:
    # hidden_size not a multiple of num_heads: valid JSON types, rejected by ModelSpec's validator.
    values = _set(_base(), "config.model.num_heads", 48)
    findings = check_chart(DEFAULT_CHART, [_write(tmp_path, values)])
    assert [f.stage for f in findings] == ["config"]
    assert "not a multiple of num_heads 48" in findings[0].message


def test_pools_that_do_not_pack_on_the_workers_are_a_config_finding(tmp_path: Path) -> None:
    """The rendered gpus[].count was gpusPerNode x maxReplicas alone: 3 x TP5 (15 GPUs) passed on 2 workers of 8
    GPUs, though an instance never spans nodes (one TP-5 instance per worker: 3 workers)."""
    values = _set(_set(_base(), "config.pools.0.tp", 5), "config.pools.0.count", 3)
    values = _set(values, "gpuTypes.0.maxReplicas", 2)
    findings = check_chart(DEFAULT_CHART, [_write(tmp_path, values)])
    assert [f.stage for f in findings] == ["config"], "\n".join(map(str, findings))
    assert ("gpus.h100.count: 16 GPUs are 2 nodes of 8 (gpus_per_node), but the pools' 15 GPUs need 3 nodes"
            in findings[0].message)
    cm = _render(_set(values, "gpuTypes.0.maxReplicas", 3))["ConfigMap", "llmsched-config"]
    parse_config(yaml.safe_load(cm["data"]["config.yaml"]))  # a third worker holds the third instance


def test_cpu_only_workers_pack_by_slots() -> None:
    # gpusPerNode 0: a worker's simulated slots are its node.
    values = _values("cpu-dev.yaml")
    (g,) = values["gpuTypes"]
    cm = _render(values)["ConfigMap", "llmsched-config"]
    gpu = parse_config(yaml.safe_load(cm["data"]["config.yaml"])).gpus[g["name"]]
    assert (gpu.count, gpu.gpus_per_node) == (g["slots"] * g["maxReplicas"], g["slots"])


def test_unreadable_values_file_is_a_finding(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("gpuTypes: [\n")
    findings = check_chart(DEFAULT_CHART, [bad, tmp_path / "missing.yaml"])
    assert [f.stage for f in findings] == ["values", "values"]


@pytest.mark.parametrize("name", EXAMPLES)
def test_rendered_config_parses_into_the_project_schema(name: str) -> None:
    values = _values(name)
    cm = _render(values)["ConfigMap", "llmsched-config"]
    cfg = parse_config(yaml.safe_load(cm["data"]["config.yaml"]), source=name)
    assert isinstance(cfg, ClusterConfig)
    assert set(cfg.gpus) == {g["name"] for g in values["gpuTypes"]}
    assert [p.name for p in cfg.pools] == [p["name"] for p in values["config"]["pools"]]


def test_hetero_pd_config_and_worker_groups() -> None:
    m = _render(_values("hetero-pd.yaml"))
    cfg = parse_config(yaml.safe_load(m["ConfigMap", "llmsched-config"]["data"]["config.yaml"]))
    assert {p.name: (p.role.value, p.gpu, p.tp) for p in cfg.pools} == {
        "prefill": ("prefill", "h100", 4),
        "decode": ("decode", "a100", 4),
    }
    assert (cfg.gpus["h100"].count, cfg.gpus["a100"].count) == (8 * 3, 8 * 6)  # gpusPerNode x maxReplicas
    assert (cfg.gpus["h100"].gpus_per_node, cfg.gpus["a100"].gpus_per_node) == (8, 8)
    assert cfg.gpus["h100"].fp16_tflops == 989

    rc = m["RayCluster", "llmsched"]
    groups = {g["groupName"]: g for g in rc["spec"]["workerGroupSpecs"]}
    assert list(groups) == ["h100", "a100"]
    a100 = groups["a100"]
    # The Ray resource placement requests, in KubeRay's rayStartParams format.
    assert json.loads(json.loads(a100["rayStartParams"]["resources"])) == {"llmsched_gpu_a100": 8}
    assert a100["rayStartParams"]["num-gpus"] == "8"
    pod = a100["template"]["spec"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"}
    assert {"key": "gpu-pool", "operator": "Equal", "value": "a100", "effect": "NoSchedule"} in pod[
        "tolerations"
    ]
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 8
    assert (a100["replicas"], a100["minReplicas"], a100["maxReplicas"]) == (2, 1, 6)

    head = rc["spec"]["headGroupSpec"]["template"]["spec"]
    sched = next(c for c in head["containers"] if c["name"] == "llmsched")
    assert sched["command"] == [
        "llmsched",
        "serve",
        "--config",
        "/etc/llmsched/config.yaml",
        "--port",
        "50051",
    ]
    env = {e["name"]: e.get("value") for e in sched["env"]}
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel-collector.observability.svc:4317"
    assert env["LLMSCHED_TLS_CERT_FILE"] == "/etc/llmsched/tls/tls.crt"
    assert head["serviceAccountName"] == "llmsched"

    assert _of_kind(m, "ServiceMonitor") and len(_of_kind(m, "PodDisruptionBudget")) == 2
    dash = m["ConfigMap", "llmsched-dashboard"]
    assert json.loads(dash["data"]["llmsched.json"])["panels"]


def test_cpu_dev_workers_request_no_gpus() -> None:
    rc = _render(_values("cpu-dev.yaml"))["RayCluster", "llmsched"]
    (group,) = rc["spec"]["workerGroupSpecs"]
    assert json.loads(json.loads(group["rayStartParams"]["resources"])) == {"llmsched_gpu_sim_a100": 4}
    assert group["rayStartParams"]["num-gpus"] == "0"
    assert "nvidia.com/gpu" not in json.dumps(group["template"])


def test_services_for_grpc_and_http() -> None:
    m = _render(None)
    grpc, http = m["Service", "llmsched-grpc"], m["Service", "llmsched-http"]
    assert [(p["name"], p["port"]) for p in grpc["spec"]["ports"]] == [("grpc", 50051)]
    assert ("http", 8000) in [(p["name"], p["port"]) for p in http["spec"]["ports"]]
    assert grpc["spec"]["selector"]["app.kubernetes.io/component"] == "head"


def test_metrics_stay_off_a_public_service_type() -> None:
    """/metrics needs no token and shared the -http Service: with service.type LoadBalancer it was public."""
    m = _render(_set(_base(), "service.type", "LoadBalancer"))
    services = {name: svc for (kind, name), svc in m.items() if kind == "Service"}
    public = [(name, p["name"]) for name, svc in services.items() if svc["spec"]["type"] != "ClusterIP"
              for p in svc["spec"]["ports"]]
    assert public == [("llmsched-grpc", "grpc"), ("llmsched-http", "http")]
    metrics = services["llmsched-metrics"]
    assert [(p["name"], p["port"]) for p in metrics["spec"]["ports"]] == [("metrics", 9090)]
    monitor = _render(_set(_base(), "metrics.serviceMonitor.enabled", True))["ServiceMonitor", "llmsched"]
    selects = monitor["spec"]["selector"]["matchLabels"]
    matched = [name for name, svc in services.items() if selects.items() <= svc["metadata"]["labels"].items()]
    assert matched == ["llmsched-metrics"] and monitor["spec"]["endpoints"][0]["port"] == "metrics"


def _tokens(m: dict[tuple[str, str], dict[str, Any]]) -> dict[str, str]:
    secret = m["Secret", "llmsched-auth"]
    return {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}


def test_default_install_generates_distinct_tokens_never_in_the_config() -> None:
    m = _render(None)
    tokens = _tokens(m)
    assert len(tokens["client-token"]) >= 32 and len(tokens["admin-token"]) >= 32
    assert tokens["client-token"] != tokens["admin-token"]
    rendered = json.dumps([v for (k, _), v in m.items() if k != "Secret"])
    assert tokens["admin-token"] not in rendered and tokens["client-token"] not in rendered


def test_admin_token_exists_even_with_client_auth_off() -> None:
    m = _render({"auth": {"enabled": False}})
    assert _tokens(m)["admin-token"]
    head = m["RayCluster", "llmsched"]["spec"]["headGroupSpec"]["template"]["spec"]
    sched = next(c for c in head["containers"] if c["name"] == "llmsched")
    env = {e["name"]: e.get("value") for e in sched["env"]}
    assert env["LLMSCHED_ADMIN_TOKEN_FILE"] == "/etc/llmsched/auth/admin-token"
    assert env["LLMSCHED_AUTH_ENABLED"] == "false"


def test_existing_secret_is_used_and_none_created() -> None:
    m = _render({"auth": {"enabled": True, "existingSecret": "my-tokens"}})
    assert not _of_kind(m, "Secret")
    vols = m["RayCluster", "llmsched"]["spec"]["headGroupSpec"]["template"]["spec"]["volumes"]
    assert {"name": "auth", "secret": {"secretName": "my-tokens", "defaultMode": 0o400}} in vols


def test_manifest_validation_rejects_unknown_fields_and_types() -> None:
    m = _render(None)
    rc = copy.deepcopy(m["RayCluster", "llmsched"])
    assert manifest_errors(rc) == []
    rc["spec"]["workerGroupSpec"] = rc["spec"].pop("workerGroupSpecs")  # typo: the API server would reject it
    assert any("workerGroupSpec" in e for e in manifest_errors(rc))
    rc = copy.deepcopy(m["RayCluster", "llmsched"])
    rc["spec"]["workerGroupSpecs"][0]["replicas"] = "two"
    assert any("replicas" in e for e in manifest_errors(rc))
    svc = copy.deepcopy(m["Service", "llmsched-grpc"])
    svc["spec"]["ports"][0]["targetPrt"] = "grpc"
    assert any("targetPrt" in e for e in manifest_errors(svc))
    assert manifest_errors({"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}})


def test_values_schema_is_generated_from_the_config_models() -> None:
    # Fails when ClusterConfig changed: run `python -m scheduler.deploy.values_schema`.
    assert (DEFAULT_CHART / "values.schema.json").read_text() == render_values_schema()


def test_values_schema_cli_help_writes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """`python -m scheduler.deploy.values_schema --help` wrote the schema to a file named "--help"."""
    from scheduler.deploy.values_schema import main as schema_main

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        schema_main(["--help"])
    assert e.value.code == 0 and "usage:" in capsys.readouterr().out and not list(tmp_path.iterdir())
    assert schema_main([str(tmp_path / "s.json")]) == 0
    assert (tmp_path / "s.json").read_text() == render_values_schema()


def test_cli_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", "--values", str(DEFAULT_VALUES_DIR / "cpu-dev.yaml")]) == 0
    assert "chart check: OK" in capsys.readouterr().out
    assert main(["check", "--values", str(BROKEN)]) == 1
    out = capsys.readouterr().out
    assert "unknown GPU type" in out and str(BROKEN) in out


def test_finding_text_names_source_stage_and_place() -> None:
    f = Finding("v.yaml", "manifest", "RayCluster/x", "spec: bad")
    assert str(f) == "v.yaml: manifest: RayCluster/x: spec: bad"


def test_worker_resource_is_what_placement_requests() -> None:
    # The chart's Ray resource per GPU type must be the one scheduler.control.placement puts in its bundles.
    placement = pytest.importorskip("scheduler.control.placement")
    rc = _render(_values("cpu-dev.yaml"))["RayCluster", "llmsched"]
    (group,) = rc["spec"]["workerGroupSpecs"]
    assert set(json.loads(json.loads(group["rayStartParams"]["resources"]))) == {
        placement.gpu_type_resource("sim-a100")
    }


def test_direct_channel_switch_reaches_the_scheduler_container() -> None:
    """``scheduler.directChannel`` (default on) becomes ``LLMSCHED_DIRECT_CHANNEL``, which ``llmsched serve`` reads."""

    def env_of(values: dict[str, Any] | None) -> dict[str, str]:
        rc = _of_kind(_render(values), "RayCluster")[0]
        containers = rc["spec"]["headGroupSpec"]["template"]["spec"]["containers"]
        (c,) = [x for x in containers if any(e["name"] == "LLMSCHED_LOG_LEVEL" for e in x.get("env", []))]
        return {e["name"]: e.get("value") for e in c["env"]}

    assert env_of(None)["LLMSCHED_DIRECT_CHANNEL"] == "1"
    assert env_of({"scheduler": {"directChannel": False}})["LLMSCHED_DIRECT_CHANNEL"] == "0"


# -- an audit of the chart against what an operator's install does (twenty-ninth session); each failed before ---------


def _scheduler_container(values: dict[str, Any] | None) -> dict[str, Any]:
    rc = _of_kind(_render(values), "RayCluster")[0]
    containers = rc["spec"]["headGroupSpec"]["template"]["spec"]["containers"]
    (c,) = [x for x in containers if any(e["name"] == "LLMSCHED_LOG_LEVEL" for e in x.get("env", []))]
    return c


@pytest.mark.parametrize("level", ["debug", "info", "warning", "error"])
def test_every_log_level_the_chart_allows_is_one_python_logging_takes(level: str) -> None:
    """The schema allows lower-case levels and logging.basicConfig takes upper case only: `llmsched serve` died at
    start-up ("Unknown level: 'info'") on the chart's default."""
    import logging

    env = {e["name"]: e.get("value") for e in _scheduler_container({"scheduler": {"logLevel": level}})["env"]}
    assert isinstance(logging.getLevelName(env["LLMSCHED_LOG_LEVEL"]), int)


def test_the_scheduler_listens_where_its_services_and_probes_dial() -> None:
    """`llmsched serve` binds LLMSCHED_HOST (default loopback); Services and kubelet probes dial the pod IP."""
    c = _scheduler_container(None)
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["LLMSCHED_HOST"] == "0.0.0.0"


def test_liveness_waits_for_a_start_that_loads_every_instance() -> None:
    """The gRPC port opens after deploy() waits up to 120 + 10 s for every instance: liveness (60 s delay, 3 x 20 s)
    restarted the container at ~100 s, so a slow start looped in CrashLoopBackOff."""
    c = _scheduler_container(None)
    start = c["startupProbe"]
    assert start["periodSeconds"] * start["failureThreshold"] >= 130 + 60
    assert "initialDelaySeconds" not in c["livenessProbe"]


def test_worker_budgets_are_ones_kubernetes_can_evaluate_for_a_raycluster() -> None:
    """A RayCluster has no /scale subresource, so a maxUnavailable (or percentage) budget over its pods is SyncFailed
    with 0 disruptions allowed and blocks every node drain; an integer minAvailable works for any controller."""
    pdbs = _of_kind(_render(_values("hetero-pd.yaml")), "PodDisruptionBudget")
    assert pdbs
    for pdb in pdbs:
        assert "maxUnavailable" not in pdb["spec"] and isinstance(pdb["spec"]["minAvailable"], int)


def test_a_config_change_rolls_the_pods() -> None:
    """KubeRay applies a changed pod spec (the config checksum) only with upgradeStrategy Recreate; without it a
    `helm upgrade` changed the ConfigMap and the scheduler kept running the old config."""
    rc = _of_kind(_render(None), "RayCluster")[0]
    assert rc["spec"]["upgradeStrategy"] == {"type": "Recreate"}
    a = _of_kind(_render(None), "RayCluster")[0]["spec"]["headGroupSpec"]["template"]["metadata"]["annotations"]
    b = _of_kind(_render({"config": {"slos": {0: {"ttft_s": 3.0, "tpot_s": 0.1}}}}), "RayCluster")[0]
    assert a["checksum/config"] != b["spec"]["headGroupSpec"]["template"]["metadata"]["annotations"]["checksum/config"]


def test_a_ray_start_param_the_chart_sets_cannot_be_set_twice() -> None:
    """A second `num-gpus` rendered a duplicate YAML key: PyYAML kept the last silently, Flux/Kustomize refuse it."""
    values = _values("single-gpu-type.yaml")
    values["gpuTypes"][0]["rayStartParams"] = {"num-gpus": "4"}
    _, findings = render_chart(DEFAULT_CHART, values, "test")
    assert any("rayStartParams.num-gpus" in str(f) for f in findings)


def test_the_scheduler_shares_the_ray_heads_session_dir() -> None:
    """`llmsched serve` joins the head as a Ray driver in another container of the pod: a driver reaches its node's
    raylet and object store through the sockets under /tmp/ray, so both containers mount one volume there."""
    rc = _of_kind(_render(None), "RayCluster")[0]
    spec = rc["spec"]["headGroupSpec"]["template"]["spec"]
    mounts = {c["name"]: {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])} for c in spec["containers"]}
    assert mounts["ray-head"]["/tmp/ray"] == mounts["llmsched"]["/tmp/ray"]
    assert "emptyDir" in {v["name"]: v for v in spec["volumes"]}[mounts["ray-head"]["/tmp/ray"]]


def test_a_restart_of_the_scheduler_container_keeps_the_deployment_within_the_pods_grace() -> None:
    """SIGTERM of the llmsched container (a liveness restart, a rollout) shut the Controller and every engine down:
    every model reloaded although the Ray head and the workers ran on. The chart keeps them (`serve --on-exit`),
    and the pod's grace outlasts serve's own drain, or the kubelet's SIGKILL cut the streams still draining."""
    from scheduler.serve import exit_bound_s, parser

    rc = _of_kind(_render(None), "RayCluster")[0]
    spec = rc["spec"]["headGroupSpec"]["template"]["spec"]
    c = _scheduler_container(None)
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["LLMSCHED_ON_EXIT"] == "keep"
    assert c["command"][:2] == ["llmsched", "serve"]
    grace_s = parser().parse_args(c["command"][2:]).grace_s
    assert spec.get("terminationGracePeriodSeconds", 30) > exit_bound_s(grace_s)


def test_the_default_install_describes_the_model_its_engines_run() -> None:
    """The defaults run vllm pools without ``config.model.path`` (the generated tiny test model) but gave
    ``config.model`` Llama-2-7B's shape: KV, step times and routing sized for a model no engine ran."""
    cfg = parse_config(yaml.safe_load(_render(None)["ConfigMap", "llmsched-config"]["data"]["config.yaml"]))
    assert cfg.model.path is None and {p.backend for p in cfg.pools} == {"vllm"}
    from scheduler.engine.tiny_model import ensure_tiny_model

    hf = json.loads((ensure_tiny_model() / "config.json").read_text())
    m = cfg.model
    assert (m.num_layers, m.hidden_size, m.num_heads, m.num_kv_heads, m.intermediate_size, m.vocab_size) == (
        hf["num_hidden_layers"], hf["hidden_size"], hf["num_attention_heads"], hf["num_key_value_heads"],
        hf["intermediate_size"], hf["vocab_size"])
    assert m.dtype == hf.get("torch_dtype", hf.get("dtype")) == "float32"  # vLLM serves it in its own float32
    assert m.max_model_len <= hf["max_position_embeddings"]


def test_a_path_given_alone_over_the_default_tiny_shape_fails_naming_it(tmp_path: Path) -> None:
    """Helm merges ``config.model`` over the defaults: a path alone would be served under the tiny model's shape
    (a repo id unchecked until its engine downloads it)."""
    values = {"config": {"model": {"path": "meta-llama/Llama-2-7b-hf"}}}
    findings = check_chart(DEFAULT_CHART, [_write(tmp_path, values)])
    assert [f.stage for f in findings] == ["render"], "\n".join(map(str, findings))
    assert 'config.model.path: "meta-llama/Llama-2-7b-hf", but config.model is still the chart default' in (
        findings[0].message)
    llama = {"name": "llama2-7b", "path": "meta-llama/Llama-2-7b-hf", "num_layers": 32, "hidden_size": 4096,
             "num_heads": 32, "num_kv_heads": 32, "intermediate_size": 11008, "vocab_size": 32000,
             "dtype": "float16"}
    assert check_chart(DEFAULT_CHART, [_write(tmp_path, {"config": {"model": llama}})]) == []
