"""Serving a real model: ``model.path`` from the config (and ``llmsched serve --model-path``, the chart's values)
reaches the vLLM engines and the ingress tokenizer. A vllm pool always loaded the generated tiny test model; the
only way to name weights was the Python-level ``backend_kwargs``. No vLLM engine starts, nothing is downloaded."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from scheduler.config.load import ConfigError, load_config, parse_config
from scheduler.config.models import ClusterConfig, GPUSpec, ModelSpec, PoolSpec
from scheduler.core.types import InstanceRole

CPU_PD = Path(__file__).resolve().parents[1] / "deploy" / "examples" / "cpu-pd.yaml"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def _config(path: str | None, **model: Any) -> ClusterConfig:
    data = load_config(CPU_PD).model_dump()
    data["model"].update(path=path, **model)
    return ClusterConfig.model_validate(data)


@pytest.fixture(scope="module")
def tiny() -> Path:
    from scheduler.engine.tiny_model import ensure_tiny_model

    return ensure_tiny_model()


@pytest.fixture(scope="module")
def own_model(tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model directory other than the tiny model's (its tokenizer files copied), so that a tokenizer loaded from
    it proves the configured path was read, not the default."""
    out = tmp_path_factory.mktemp("weights") / "my-model"
    out.mkdir()
    for name in TOKENIZER_FILES:
        if (tiny / name).is_file():
            shutil.copy(tiny / name, out / name)
    return out


@pytest.fixture
def no_tiny(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fails any fall-back to the generated tiny model."""

    def refuse(*_: Any, **__: Any) -> Path:
        raise AssertionError("the tiny test model was loaded instead of the configured one")

    monkeypatch.setattr("scheduler.engine.tiny_model.ensure_tiny_model", refuse)


# ---- config ----------------------------------------------------------------------------------------------------
def test_config_names_the_weights_and_keeps_the_tiny_model_by_default() -> None:
    assert load_config(CPU_PD).model.path is None
    assert _config("meta-llama/Llama-2-7b-hf").model.path == "meta-llama/Llama-2-7b-hf"


def test_an_empty_model_path_is_refused_at_load_naming_it() -> None:
    data = load_config(CPU_PD).model_dump()
    data["model"]["path"] = "  "
    with pytest.raises(ConfigError, match=r"model\.path: an empty path"):
        parse_config(data, source="c.yaml")


def test_a_missing_local_model_path_loads_but_fails_where_read_naming_it(tmp_path: Path) -> None:
    # The directory lives on the worker nodes: a config loaded elsewhere (a chart check, the head) is not wrong.
    cfg = _config(str(tmp_path / "absent"))
    with pytest.raises(ValueError, match=r"model\.path: no model directory .*absent"):
        cfg.model.weights()
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match=r"model\.path: no model directory"):
        _config(str(tmp_path / "file")).model.weights()


def test_weights_local_dir_repo_id_and_override(own_model: Path, no_tiny: None) -> None:
    assert _config(str(own_model)).model.weights() == str(own_model)
    assert _config("meta-llama/Llama-2-7b-hf").model.weights() == "meta-llama/Llama-2-7b-hf"
    assert _config("gpt2").model.weights() == "gpt2"
    # a backend kwarg (tests, benches) overrides the config
    assert _config("gpt2").model.weights("/else") == "/else"


# ---- engines -----------------------------------------------------------------------------------------------------
class _Recorder:
    def __init__(self, model_path: Any, **kw: Any) -> None:
        self.model_path, self.kw = model_path, kw


def _backend(monkeypatch: pytest.MonkeyPatch, model: ModelSpec, **kw: Any) -> _Recorder:
    from scheduler.control.instance import make_vllm_backend

    monkeypatch.setattr("scheduler.engine.vllm_backend.VLLMBackend", _Recorder)
    pool = PoolSpec(name="p", gpu="cpu", backend="vllm")
    backend = make_vllm_backend(
        model=model, gpu=GPUSpec.from_catalog("cpu"), pool=pool, role=InstanceRole.MIXED, **kw
    )
    assert isinstance(backend, _Recorder)
    return backend


def test_make_vllm_backend_loads_the_configured_weights_in_the_config_dtype(
    monkeypatch: pytest.MonkeyPatch, own_model: Path, no_tiny: None
) -> None:
    model = _config(str(own_model), dtype="bfloat16").model
    b = _backend(monkeypatch, model)
    assert b.model_path == str(own_model)
    # not the backend's float32 default (the tiny model's), which upcast real weights
    assert b.kw["dtype"] == "bfloat16"
    assert _backend(monkeypatch, _config("org/name").model).model_path == "org/name"
    assert _backend(monkeypatch, _config("org/name", dtype="fp8").model).kw["dtype"] == "auto"
    # a backend kwarg still overrides it
    assert _backend(monkeypatch, model, model_path="/else").model_path == "/else"


def test_make_vllm_backend_without_a_path_serves_the_tiny_model_as_before(
    monkeypatch: pytest.MonkeyPatch, tiny: Path
) -> None:
    b = _backend(monkeypatch, _config(None).model)
    assert b.model_path == str(tiny)
    assert "dtype" not in b.kw  # the tiny model's own float32


def test_make_vllm_backend_refuses_a_missing_directory_naming_model_path(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    with pytest.raises(ValueError, match=r"model\.path: no model directory"):
        _backend(monkeypatch, _config(str(tmp_path / "absent")).model)


def test_an_engine_may_download_a_repo_id_but_a_local_model_stays_offline(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from scheduler.engine.tiny_model import configure_cache_env

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    configure_cache_env(tmp_path, offline=False)  # a repo id: HF_HUB_OFFLINE=1 refused its download
    assert "HF_HUB_OFFLINE" not in os.environ
    configure_cache_env(tmp_path)
    assert os.environ["HF_HUB_OFFLINE"] == "1"


# ---- ingress tokenizer ---------------------------------------------------------------------------------------------
def test_the_ingress_tokenizes_with_the_configured_model(own_model: Path, tiny: Path, no_tiny: None) -> None:
    from tokenizers import Tokenizer

    from scheduler.control.tokenizer import HFTokenizer, make_tokenizer

    tok = make_tokenizer(_config(str(own_model)))
    assert isinstance(tok, HFTokenizer)
    text = "the request token model cache"
    assert tok.encode(text) == Tokenizer.from_file(str(tiny / "tokenizer.json")).encode(text).ids


def test_the_ingress_fetches_a_repo_ids_tokenizer_only(
    monkeypatch: pytest.MonkeyPatch, own_model: Path, no_tiny: None
) -> None:
    from scheduler.control.tokenizer import HFTokenizer, make_tokenizer

    calls: list[tuple[str, Any]] = []

    def snapshot_download(repo_id: str, allow_patterns: Any = None, **_: Any) -> str:
        calls.append((repo_id, allow_patterns))
        return str(own_model)

    monkeypatch.setattr("huggingface_hub.snapshot_download", snapshot_download)
    assert isinstance(make_tokenizer(_config("org/name")), HFTokenizer)
    assert calls and calls[0][0] == "org/name"
    assert "tokenizer.json" in calls[0][1] and not any("safetensors" in p for p in calls[0][1])


def test_the_ingress_names_model_path_for_a_model_without_a_tokenizer(tmp_path: Path, no_tiny: None) -> None:
    from scheduler.control.tokenizer import make_tokenizer

    with pytest.raises(ValueError, match=r"model\.path: no tokenizer\.json"):
        make_tokenizer(_config(str(tmp_path)))
    with pytest.raises(ValueError, match=r"model\.path: no model directory"):
        make_tokenizer(_config(str(tmp_path / "absent")))


# ---- llmsched serve --model-path -------------------------------------------------------------------------------------
def _serve(
    monkeypatch: pytest.MonkeyPatch, *argv: str, config: Path = CPU_PD
) -> tuple[int, ClusterConfig | None]:
    """``llmsched serve`` up to the point it would start Ray: its exit code and the config it would serve."""
    from scheduler import serve

    served: list[ClusterConfig] = []

    async def fake_serve(args: Any) -> int:
        served.append(args.cfg)
        return 0

    monkeypatch.setattr(serve, "_serve", fake_serve)
    rc = serve.main(["--config", str(config), *argv])
    return rc, (served[0] if served else None)


def test_serve_model_path_overrides_the_config(monkeypatch: pytest.MonkeyPatch, own_model: Path) -> None:
    assert _serve(monkeypatch)[1].model.path is None  # type: ignore[union-attr]
    rc, cfg = _serve(monkeypatch, "--model-path", str(own_model))
    assert rc == 0 and cfg is not None and cfg.model.path == str(own_model)
    assert _serve(monkeypatch, "--model-path", "org/name")[1].model.path == "org/name"  # type: ignore[union-attr]


def test_serve_refuses_a_missing_model_dir_before_starting_naming_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc, cfg = _serve(monkeypatch, "--model-path", str(tmp_path / "absent"))
    assert rc == 2 and cfg is None
    assert "model.path: no model directory" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        _serve(monkeypatch, "--model-path", "")
    assert e.value.code == 2
    assert "--model-path: empty" in capsys.readouterr().err


# ---- Helm chart ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def chart() -> Any:
    pytest.importorskip("helm_python")
    pytest.importorskip("kubernetes_validate")
    import yaml

    from scheduler.deploy import chart

    def render(**weights: Any) -> tuple[dict[str, Any], list[Any]]:
        values = yaml.safe_load((chart.DEFAULT_VALUES_DIR / "hetero-pd.yaml").read_text())
        values["weights"] = {**values["weights"], **weights}
        rendered, findings = chart.render_chart(chart.DEFAULT_CHART, values, "test")
        by_kind = {m["kind"]: m for m in rendered.manifests if m["kind"] == "RayCluster"}
        return {**by_kind, "config.yaml": rendered.config_yaml}, findings

    return render


def _containers(raycluster: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The llmsched container and each worker group's, by name, with their pod's volumes."""
    head = raycluster["spec"]["headGroupSpec"]["template"]["spec"]
    out = {"llmsched": {**next(c for c in head["containers"] if c["name"] == "llmsched"), "pod": head}}
    for group in raycluster["spec"]["workerGroupSpecs"]:
        pod = group["template"]["spec"]
        out[group["groupName"]] = {**pod["containers"][0], "pod": pod}
    return out


def test_the_chart_passes_model_path_hf_env_and_the_weights_volume(chart: Any) -> None:
    import yaml

    from scheduler.deploy.chart import DEFAULT_CHART, DEFAULT_VALUES_DIR, check_chart

    assert check_chart(DEFAULT_CHART, [DEFAULT_VALUES_DIR / "hetero-pd.yaml"]) == []
    manifests, findings = chart()
    assert findings == []
    config = yaml.safe_load(manifests["config.yaml"])
    assert config["model"]["path"] == "meta-llama/Llama-2-70b-hf"
    containers = _containers(manifests["RayCluster"])
    assert set(containers) == {"llmsched", "h100", "a100"}  # the ingress tokenizer and every engine
    for name, c in containers.items():
        env = {e["name"]: e for e in c["env"]}
        assert env["HF_HOME"]["value"] == "/models/hf", name
        assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "hf-token", "key": "HF_TOKEN"}, name
        mount = next(m for m in c["volumeMounts"] if m["name"] == "weights")
        assert mount == {"name": "weights", "mountPath": "/models", "readOnly": False}, name
        volume = next(v for v in c["pod"]["volumes"] if v["name"] == "weights")
        assert volume["persistentVolumeClaim"] == {"claimName": "llmsched-models", "readOnly": False}, name


def test_the_chart_mounts_a_host_path_and_sets_nothing_unasked(chart: Any) -> None:
    manifests, findings = chart(
        hfHome="",
        hfTokenSecret={"name": ""},
        volume={"existingClaim": "", "hostPath": "/mnt/m", "readOnly": True},
    )
    assert findings == []
    for name, c in _containers(manifests["RayCluster"]).items():
        assert not {"HF_HOME", "HF_TOKEN"} & {e["name"] for e in c.get("env", [])}, name
        volume = next(v for v in c["pod"]["volumes"] if v["name"] == "weights")
        assert volume["hostPath"]["path"] == "/mnt/m", name
    manifests, findings = chart(hfHome="", hfTokenSecret={"name": ""}, volume={"existingClaim": ""})
    assert findings == []
    for name, c in _containers(manifests["RayCluster"]).items():
        assert "weights" not in {v["name"] for v in c["pod"]["volumes"]}, name


@pytest.mark.parametrize(
    ("weights", "named"),
    [
        (
            {"volume": {"existingClaim": "m", "hostPath": "/mnt/m"}},
            "weights.volume: set existingClaim or hostPath",
        ),
        ({"volume": {"mountPath": "/tmp/ray"}}, "weights.volume.mountPath: /tmp/ray overlaps"),
        (
            {"volume": {"mountPath": "/etc"}},
            "weights.volume.mountPath: /etc overlaps the chart's own mount /etc/llmsched",
        ),
        ({"volume": {"hostPath": "mnt/m"}}, "/weights/volume/hostPath"),
        ({"volume": {"claim": "m"}}, "/weights/volume"),
        ({"hfHome": "hf"}, "/weights/hfHome"),
        ({"hfTokenSecret": {"name": "Bad_Name"}}, "/weights/hfTokenSecret/name"),
    ],
)
def test_bad_weights_values_are_named(chart: Any, weights: dict[str, Any], named: str) -> None:
    _, findings = chart(**weights)  # over hetero-pd's weights (a PVC at /models)
    assert findings and named in str(findings[0]), findings
