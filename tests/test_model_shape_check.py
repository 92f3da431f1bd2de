"""``model.path``'s weights against the config's model shape: the shape fields size the KV cache, the latency model
and the simulator, and nothing checked that they describe the weights the engines load (a 70B's directory under a
7B's shape was served, its KV sized for the wrong model). The generated tiny model's ``config.json`` is the
reference; no engine starts, nothing is downloaded."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from scheduler.config.load import ConfigError, load_config, parse_config
from scheduler.config.models import ModelSpec
from tests.test_model_path_audit35 import CPU_PD, _backend, _config, _serve

_DROP = object()


@pytest.fixture(scope="module")
def tiny() -> Path:
    from scheduler.engine.tiny_model import ensure_tiny_model

    return ensure_tiny_model()


@pytest.fixture
def weights(tiny: Path, tmp_path: Path) -> Any:
    """A model directory whose ``config.json`` is the tiny model's with ``changes`` (``_DROP``: the key removed)."""

    def make(**changes: Any) -> Path:
        hf = json.loads((tiny / "config.json").read_text())
        for key, value in changes.items():
            if value is _DROP:
                hf.pop(key, None)
            else:
                hf[key] = value
        out = tmp_path / "model"
        out.mkdir(exist_ok=True)
        (out / "config.json").write_text(json.dumps(hf))
        return out

    return make


def _model(path: Path | str, **shape: Any) -> ModelSpec:
    """The cpu-pd example's model (the tiny model's shape, max_model_len 2048) with ``shape`` changed."""
    return _config(str(path), **shape).model


def test_the_tiny_model_under_its_own_shape_is_served(tiny: Path) -> None:
    assert _model(tiny).weights() == str(tiny)
    assert _model(tiny, max_model_len=16384).weights() == str(tiny)  # its max_position_embeddings
    assert load_config(CPU_PD).model.weights() == str(tiny)  # unset: the tiny fallback, under its own shape


# ---- model.path unset: the generated tiny model is the weights --------------------------------------------------
def test_an_unset_path_under_another_models_shape_is_refused_where_read(tiny: Path) -> None:
    """Unset, the tiny model was served under any shape unchecked (the chart's default values gave it Llama-2-7B's:
    KV, step times and routing sized for a model no engine ran). Its config.json is compared as a directory's."""
    model = load_config("llama2-70b-h100").model  # simulated pools: loads
    with pytest.raises(ValueError, match=r"model\.num_layers: 80, but .*tiny-llama-.*/config\.json has "
                                         r"num_hidden_layers 2;.* model\.path is unset"):
        model.weights()


def test_an_unset_path_in_another_dtype_is_refused(tiny: Path) -> None:
    """vLLM serves the tiny model in its own float32 (no config dtype is passed for it): a float16 config counted
    half its KV bytes per token."""
    with pytest.raises(ValueError, match=r"model\.dtype: float16, but the generated tiny test model has dtype float32 .*model\.path is unset"):
        _config(None, dtype="float16")
    model = ModelSpec.model_validate({**load_config(CPU_PD).model.model_dump(), "dtype": "bfloat16"})
    with pytest.raises(ValueError, match=r"^model\.dtype: bfloat16, but .*config\.json has dtype float32"):
        model.weights()


def test_config_load_refuses_vllm_pools_without_a_path_under_another_shape() -> None:
    """At load, without building the model (``llmsched chart check``, ``llmsched serve`` before Ray, ``simulate``),
    naming each field; simulated pools serve nothing, so any shape loads."""
    data = load_config("llama2-7b-a100-16").model_dump()
    parse_config(data, source="c.yaml")
    data["pools"][0]["backend"] = "vllm"
    with pytest.raises(ConfigError, match=r"model\.num_layers: 32, but the generated tiny test model has "
                                          r"num_hidden_layers 2; .*model\.vocab_size: 32000.*model\.path is unset"):
        parse_config(data, source="c.yaml")
    parse_config({**data, "model": {**data["model"], "path": "meta-llama/Llama-2-7b-hf"}}, source="c.yaml")


def test_serve_refuses_vllm_pools_without_a_path_under_another_shape_before_ray_starts(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = yaml.safe_load(CPU_PD.read_text())
    data["model"] = load_config("llama2-7b-a100-16").model.model_dump(exclude_none=True)  # the chart's old defaults
    (config := tmp_path / "c.yaml").write_text(yaml.safe_dump(data))
    rc, cfg = _serve(monkeypatch, config=config)
    assert rc == 2 and cfg is None
    assert "model.num_layers: 32, but the generated tiny test model has num_hidden_layers 2" in capsys.readouterr().err


def test_the_tiny_models_recipe_is_its_config_json(tiny: Path) -> None:
    """Config load compares against ``TinyModelSpec.hf_config`` (no build): the generated file must say the same."""
    from scheduler.engine.tiny_model import TinyModelSpec

    hf = json.loads((tiny / "config.json").read_text())
    own = TinyModelSpec().hf_config()
    assert {k: hf.get(k, hf.get("dtype")) for k in own} == own


@pytest.mark.parametrize("config", ["tiny-cpu", CPU_PD, CPU_PD.with_name("cpu-mixed.yaml")])
def test_the_shipped_tiny_model_configs_describe_it(tiny: Path, config: str | Path) -> None:
    cfg = load_config(config)  # the README's `llmsched run` serves tiny-cpu
    assert cfg.model.path is None and {p.backend for p in cfg.pools} == {"vllm"}
    assert cfg.model.weights() == str(tiny)


def test_a_70b_shape_over_the_tiny_weights_is_refused_naming_each_field(tiny: Path) -> None:
    model = load_config("llama2-70b-h100").model.model_copy(update={"path": str(tiny)})
    with pytest.raises(ValueError) as e:
        model.weights()
    msg = str(e.value)
    assert f"model.num_layers: 80, but {tiny}/config.json has num_hidden_layers 2" in msg
    for field, key, value in (("hidden_size", "hidden_size", 128), ("num_heads", "num_attention_heads", 4),
                              ("num_kv_heads", "num_key_value_heads", 4), ("intermediate_size",
                              "intermediate_size", 256), ("vocab_size", "vocab_size", 1024)):
        assert f"model.{field}: {getattr(model, field)}, but {tiny}/config.json has {key} {value}" in msg


@pytest.mark.parametrize(("shape", "named"), [
    ({"num_layers": 3}, "model.num_layers: 3, but .* has num_hidden_layers 2"),
    ({"num_heads": 8}, "model.num_heads: 8, but .* has num_attention_heads 4"),
    ({"num_kv_heads": 2}, "model.num_kv_heads: 2, but .* has num_key_value_heads 4"),
    ({"intermediate_size": 512}, "model.intermediate_size: 512, but .* has intermediate_size 256"),
    ({"vocab_size": 32000}, "model.vocab_size: 32000, but .* has vocab_size 1024"),
    ({"hidden_size": 256}, "model.hidden_size: 256, but .* has hidden_size 128"),
])
def test_one_differing_field_is_named_alone(tiny: Path, shape: dict[str, Any], named: str) -> None:
    with pytest.raises(ValueError, match=named) as e:
        _model(tiny, **shape).weights()
    assert str(e.value).count("model.") == 2  # the field, and the advice naming model.path


def test_kv_heads_default_to_the_attention_heads(weights: Any) -> None:
    path = weights(num_key_value_heads=_DROP)
    assert _model(path).weights() == str(path)  # 4 KV heads: no grouped-query attention
    with pytest.raises(ValueError, match="model.num_kv_heads: 2, but .* has num_key_value_heads 4"):
        _model(path, num_kv_heads=2).weights()


def test_a_head_dim_the_config_cannot_give_is_refused(weights: Any) -> None:
    with pytest.raises(ValueError, match=r"model.hidden_size: 128 / num_heads 4 is head_dim 32, but .* has head_dim 64"):
        _model(weights(head_dim=64)).weights()


def test_max_model_len_may_be_shorter_than_the_models_not_longer(
    tiny: Path, weights: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ValueError, match=r"model.max_model_len: 16385, but .* allows 16384"):
        _model(tiny, max_model_len=16385).weights()
    scaled = weights(rope_scaling={"rope_type": "linear", "factor": 2.0})
    assert _model(scaled, max_model_len=32768).weights() == str(scaled)
    with pytest.raises(ValueError, match=r"allows 32768"):
        _model(scaled, max_model_len=32769).weights()
    monkeypatch.setenv("VLLM_ALLOW_LONG_MAX_MODEL_LEN", "1")  # vLLM's own override
    assert _model(tiny, max_model_len=16385).weights() == str(tiny)


_LLAMA31_ROPE = {"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 8192,
                 "low_freq_factor": 1.0, "high_freq_factor": 4.0}


# (config.json changes over the tiny model's, the longest max_model_len allowed, what the refusal names);
# tests/test_max_len_vllm.py runs them through vLLM's own rule too
MAX_LEN_CASES = [
    # Llama-3.1: max_position_embeddings is the scaled length already; vLLM never multiplies it by 8
    ({"max_position_embeddings": 131072, "rope_scaling": _LLAMA31_ROPE}, 131072,
     "max_position_embeddings 131072 (rope_scaling llama3: already scaled"),
    # transformers 5's rope_parameters, keyed by layer type
    ({"max_position_embeddings": 131072, "rope_parameters": {"full_attention": _LLAMA31_ROPE}}, 131072,
     "max_position_embeddings 131072 (rope_parameters llama3"),
    # DeepSeek-V3's YaRN: 4096 x 40 = its max_position_embeddings (not 163840 x 40)
    ({"max_position_embeddings": 163840, "rope_scaling": {
        "type": "yarn", "factor": 40, "original_max_position_embeddings": 4096}}, 163840,
     "max_position_embeddings 163840"),
    # Qwen2.5's YaRN recipe (32768 x 4): what vLLM before PR 56446 accepts
    ({"max_position_embeddings": 32768, "rope_scaling": {
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}}, 131072,
     "rope_scaling yarn: original_max_position_embeddings 32768 x factor 4.0"),
    # Phi-3's longrope: per-dimension factor lists, max_position_embeddings already scaled
    ({"max_position_embeddings": 131072, "original_max_position_embeddings": 4096, "rope_scaling": {
        "type": "longrope", "long_factor": [1.0, 2.0], "short_factor": [1.0, 1.0]}}, 131072,
     "max_position_embeddings 131072 (rope_scaling longrope"),
    # a legacy "type" key and a linear-style factor: scaled
    ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, 32768,
     "max_position_embeddings 16384 x rope_scaling dynamic factor 2.0"),
    # Gemma 3 declares its scaled length: never multiplied
    ({"model_type": "gemma3_text", "max_position_embeddings": 131072, "rope_scaling": {
        "rope_type": "linear", "factor": 8.0}}, 131072, "max_position_embeddings 131072"),
    # vLLM takes the smallest length key present, and model_max_length over them
    ({"seq_length": 2048}, 2048, "seq_length 2048"),
    ({"max_position_embeddings": _DROP, "n_positions": 1024}, 1024, "n_positions 1024"),
    ({"model_max_length": 32000}, 32000, "model_max_length 32000"),
]


@pytest.mark.parametrize(("changes", "allowed", "named"), MAX_LEN_CASES)
def test_max_model_len_is_refused_past_what_vllm_derives_naming_the_fields(
    weights: Any, changes: dict[str, Any], allowed: int, named: str
) -> None:
    path = weights(**changes)
    assert _model(path, max_model_len=allowed).weights() == str(path)
    with pytest.raises(ValueError, match=rf"model\.max_model_len: {allowed + 1}, but .* allows {allowed} "
                                         rf"\({re.escape(named)}"):
        _model(path, max_model_len=allowed + 1).weights()


def test_a_multimodal_models_language_shape_is_compared(tiny: Path, weights: Any) -> None:
    text = json.loads((tiny / "config.json").read_text())
    path = weights(text_config={**text, "num_hidden_layers": 80}, num_hidden_layers=_DROP)
    with pytest.raises(ValueError, match="model.num_layers: 2, but .* has num_hidden_layers 80"):
        _model(path).weights()
    assert _model(path, num_layers=80).weights() == str(path)


def test_serve_model_path_refuses_other_weights_before_ray_starts(
    monkeypatch: pytest.MonkeyPatch, weights: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    rc, cfg = _serve(monkeypatch, "--model-path", str(weights(num_hidden_layers=80)))
    assert rc == 2 and cfg is None
    assert "error: model.num_layers: 2, but" in capsys.readouterr().err


def test_an_engine_refuses_other_weights_on_its_node(monkeypatch: pytest.MonkeyPatch, weights: Any) -> None:
    # the worker's directory may not be the head's: the engine checks the one it loads
    path = weights(num_hidden_layers=80)
    with pytest.raises(ValueError, match="model.num_layers: 2, but"):
        _backend(monkeypatch, _model(path))
    with pytest.raises(ValueError, match="model.num_layers: 2, but"):  # a backend kwarg's directory too
        _backend(monkeypatch, _model("org/name"), model_path=str(path))


def test_what_cannot_be_read_is_logged_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="scheduler.config.models")
    for _ in range(2):
        assert _model("org/shape-unchecked").weights() == "org/shape-unchecked"
        assert _model(tmp_path).weights() == str(tmp_path)  # a directory without config.json
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 2
    assert "org/shape-unchecked" in said[0] and "repo id is not read" in said[0]
    assert str(tmp_path) in said[1] and "no config.json" in said[1]


# ---- llmsched serve fills the model fields a config omits from the weights' config.json -------------------------
def _without_shape(tmp_path: Path, **model: Any) -> Path:
    """The cpu-pd example with only ``model`` as its model mapping."""
    data = yaml.safe_load(CPU_PD.read_text())
    data["model"] = model
    out = tmp_path / "no-shape.yaml"
    out.write_text(yaml.safe_dump(data))
    return out


def test_serve_model_path_fills_the_shape_a_config_omits(
    monkeypatch: pytest.MonkeyPatch, tiny: Path, tmp_path: Path
) -> None:
    rc, cfg = _serve(monkeypatch, "--model-path", str(tiny), config=_without_shape(tmp_path))
    assert rc == 0 and cfg is not None
    hf = json.loads((tiny / "config.json").read_text())
    assert (cfg.model.num_layers, cfg.model.hidden_size, cfg.model.num_heads, cfg.model.num_kv_heads,
            cfg.model.intermediate_size, cfg.model.vocab_size) == (
        hf["num_hidden_layers"], hf["hidden_size"], hf["num_attention_heads"], hf["num_key_value_heads"],
        hf["intermediate_size"], hf["vocab_size"])
    assert cfg.model.dtype == hf["dtype"] and cfg.model.name == tiny.name and cfg.model.path == str(tiny)
    assert cfg.model.max_model_len == min(ModelSpec.model_fields["max_model_len"].default,
                                          hf["max_position_embeddings"])
    # the config's model.path does the same; what it gives stays
    rc, cfg = _serve(monkeypatch, config=_without_shape(tmp_path, path=str(tiny), name="mine", max_model_len=512))
    assert rc == 0 and cfg is not None
    assert (cfg.model.name, cfg.model.max_model_len, cfg.model.num_layers) == ("mine", 512, hf["num_hidden_layers"])


def test_serve_checks_the_fields_a_config_gives_and_needs_them_without_weights(
    monkeypatch: pytest.MonkeyPatch, tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc, _ = _serve(monkeypatch, "--model-path", str(tiny), config=_without_shape(tmp_path, num_layers=32))
    assert rc == 2 and "model.num_layers: 32, but" in capsys.readouterr().err
    rc, _ = _serve(monkeypatch, "--model-path", "org/name", config=_without_shape(tmp_path))
    assert rc == 2 and "model.num_layers: Field required" in capsys.readouterr().err


# ---- a repo id already in the local Hugging Face cache is read from it (offline) ----------------------------------
def _cache_repo(hub: Path, repo: str, hf: dict[str, Any], rev: str = "0123abcd") -> Path:
    """``repo`` in a hub cache laid out as huggingface_hub writes it: models--org--name/refs/main names the snapshot
    snapshots/<rev>/ that holds ``config.json``."""
    repo_dir = hub / ("models--" + repo.replace("/", "--"))
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(rev)
    snapshot = repo_dir / "snapshots" / rev
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(json.dumps(hf))
    return snapshot


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """An empty hub cache that HF_HUB_CACHE names (set after huggingface_hub's import: read at check time)."""
    for name in ("HUGGINGFACE_HUB_CACHE", "HF_HOME", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    out = tmp_path / "hub"
    out.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(out))
    return out


def test_a_cached_repo_ids_config_json_is_checked_naming_every_field(tiny: Path, hub: Path) -> None:
    hf = json.loads((tiny / "config.json").read_text())
    _cache_repo(hub, "org/cached-70b", {**hf, "num_hidden_layers": 80, "vocab_size": 32000})
    with pytest.raises(ValueError, match=r"model\.num_layers: 2, but org/cached-70b's cached .*snapshots/0123abcd/"
                                         r"config\.json has num_hidden_layers 80; model\.vocab_size: \d+, but "
                                         r".* has vocab_size 32000: the config's model shape is not these weights'"):
        _model("org/cached-70b").weights()
    _cache_repo(hub, "cached-solo", {**hf, "num_hidden_layers": 80})  # a repo id without an org
    with pytest.raises(ValueError, match=r"model\.num_layers: 2, but cached-solo's cached"):
        _model("cached-solo").weights()


def test_a_cached_repo_id_of_the_configs_shape_is_served_unlogged(
    tiny: Path, hub: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    caplog.set_level(logging.WARNING, logger="scheduler.config.models")
    hf = json.loads((tiny / "config.json").read_text())
    _cache_repo(hub, "org/cached-same", hf)
    assert _model("org/cached-same").weights() == "org/cached-same"  # the engine still loads it by its id
    assert caplog.records == []
    # HF_HOME's hub/ when HF_HUB_CACHE is unset (huggingface_hub's order)
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    _cache_repo(tmp_path / "home" / "hub", "org/home-cached", {**hf, "hidden_size": 256})
    with pytest.raises(ValueError, match=r"model\.hidden_size: 128, but org/home-cached's cached"):
        _model("org/home-cached").weights()


def test_a_repo_id_the_cache_lacks_is_logged_once_as_before(
    tiny: Path, hub: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="scheduler.config.models")
    hf = json.loads((tiny / "config.json").read_text())
    # another repo; and one whose refs/main names a snapshot not downloaded (only that revision is read)
    _cache_repo(hub, "org/other", {**hf, "num_hidden_layers": 80})
    snapshot = _cache_repo(hub, "org/half-cached", {**hf, "num_hidden_layers": 80})
    (snapshot.parents[1] / "refs" / "main").write_text("fedcba98")
    for _ in range(2):
        assert _model("org/not-cached").weights() == "org/not-cached"
        assert _model("org/half-cached").weights() == "org/half-cached"
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 2
    assert all("repo id is not read" in s and str(hub) in s for s in said)
    assert "org/not-cached" in said[0] and "org/half-cached" in said[1]


def test_serve_model_path_fills_the_shape_from_a_cached_repo_ids_config_json(
    monkeypatch: pytest.MonkeyPatch, tiny: Path, tmp_path: Path, hub: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--model-path org/name`` filled nothing from the hub cache that the shape check reads it from: a config
    without the shape was refused (``model.num_layers: Field required``) although the cache held its config.json."""
    hf = json.loads((tiny / "config.json").read_text())
    _cache_repo(hub, "org/cached-tiny", hf)
    rc, cfg = _serve(monkeypatch, "--model-path", "org/cached-tiny", config=_without_shape(tmp_path))
    assert rc == 0 and cfg is not None, capsys.readouterr().err
    assert (cfg.model.num_layers, cfg.model.hidden_size, cfg.model.num_heads, cfg.model.num_kv_heads,
            cfg.model.intermediate_size, cfg.model.vocab_size, cfg.model.dtype) == (
        hf["num_hidden_layers"], hf["hidden_size"], hf["num_attention_heads"], hf["num_key_value_heads"],
        hf["intermediate_size"], hf["vocab_size"], hf["dtype"])
    assert cfg.model.name == "org/cached-tiny" and cfg.model.path == "org/cached-tiny"  # served as vLLM names it
    # what the config gives stays, and is checked against the cached file
    rc, cfg = _serve(monkeypatch, config=_without_shape(tmp_path, path="org/cached-tiny", name="mine"))
    assert rc == 0 and cfg is not None and (cfg.model.name, cfg.model.num_layers) == ("mine", hf["num_hidden_layers"])
    rc, _ = _serve(monkeypatch, "--model-path", "org/cached-tiny", config=_without_shape(tmp_path, num_layers=32))
    assert rc == 2 and "model.num_layers: 32, but org/cached-tiny's cached" in capsys.readouterr().err
    # a repo id the cache lacks still needs the shape in the config
    rc, _ = _serve(monkeypatch, "--model-path", "org/not-cached", config=_without_shape(tmp_path))
    assert rc == 2 and "model.num_layers: Field required" in capsys.readouterr().err
