"""Config loading: every bundled example parses; bad input names the file, the key path and the allowed values."""

from __future__ import annotations

import pytest

from scheduler.config.gpus import GPU_CATALOG
from scheduler.config.load import ConfigError, bundled_configs, load_config, parse_config
from scheduler.config.models import GPUSpec
from scheduler.core.types import InstanceRole

EXPECTED = {"default", "llama2-7b-a100-16", "llama2-70b-h100", "llama2-7b-pd-a100", "hetero-a100-h100", "tiny-cpu"}

MODEL = """
model: {name: m, num_layers: 2, hidden_size: 128, num_heads: 4, num_kv_heads: 4, intermediate_size: 256,
        vocab_size: 1024}
"""


def _write(tmp_path, text: str, name: str = "c.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def _error(tmp_path, text: str) -> str:
    p = _write(tmp_path, text)
    with pytest.raises(ConfigError) as ei:
        load_config(p)
    msg = str(ei.value)
    assert str(p) in msg  # always names the file
    return msg


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_bundled_example_parses(name):
    assert name in bundled_configs()
    cfg = load_config(name)
    assert cfg.num_instances > 0
    for pool in cfg.pools:
        assert pool.gpu in cfg.gpus


def test_default_is_the_documented_cluster():
    cfg = load_config()
    assert cfg.model.num_layers == 32 and cfg.model.hidden_size == 4096 and cfg.model.vocab_size == 32000
    assert [(p.role, p.gpu, p.tp, p.count) for p in cfg.pools] == [(InstanceRole.MIXED, "a100", 1, 4)]
    slo = cfg.slo_for(0)
    assert (slo.ttft_s, slo.tpot_s) == (2.0, 0.1)
    assert cfg.policies.router.name == "least_outstanding"
    assert cfg.gpus["a100"].memory_gib == 80


def test_example_shapes():
    assert load_config("llama2-7b-a100-16").num_instances == 16
    big = load_config("llama2-70b-h100")
    assert big.model.num_kv_heads == 8 and big.model.intermediate_size == 28672 and big.pools[0].tp in (4, 8)
    pd = load_config("llama2-7b-pd-a100")
    assert {p.role for p in pd.pools} == {InstanceRole.PREFILL, InstanceRole.DECODE}
    assert len({p.gpu for p in load_config("hetero-a100-h100").pools}) == 2
    tiny = load_config("tiny-cpu")
    m = tiny.model
    assert (m.vocab_size, m.hidden_size, m.num_layers, m.num_heads, m.num_kv_heads, m.dtype, m.max_model_len) == (
        1024, 128, 2, 4, 4, "float32", 2048)
    assert tiny.pools[0].gpu == "cpu"


def test_gpu_catalog_entries_validate():
    for key in GPU_CATALOG:
        spec = GPUSpec.from_catalog(key)
        assert spec.memory_gib > 0 and spec.hbm_gbps > 0
    assert GPUSpec.from_catalog("A100-80GB").hbm_gbps == 2039
    assert GPUSpec.from_catalog("h100", count=8).count == 8
    with pytest.raises(ValueError, match="catalog: a100, a40, cpu, h100, h200, l4"):
        GPUSpec.from_catalog("tpu-v5")


def test_gpus_section_forms():
    cfg = parse_config({"gpus": ["a100"], "model": _model(), "pools": [{"name": "p", "gpu": "a100"}]})
    assert cfg.gpus["a100"].name == "A100-80GB"
    cfg = parse_config({"gpus": {"h100": {"price_per_hour": 1.0}}, "model": _model(),
                        "pools": [{"name": "p", "gpu": "h100"}]})
    assert cfg.gpus["h100"].price_per_hour == 1.0 and cfg.gpus["h100"].hbm_gbps == 3350
    custom = {"memory_gib": 16, "fp16_tflops": 50, "hbm_gbps": 400}
    cfg = parse_config({"gpus": {"mine": custom}, "model": _model(), "pools": [{"name": "p", "gpu": "mine"}]})
    assert cfg.gpus["mine"].name == "mine"
    cfg = parse_config({"model": _model(), "pools": [{"name": "p", "gpu": "l4"}]})  # default: whole catalog
    assert set(cfg.gpus) == set(GPU_CATALOG)


def _model() -> dict:
    return {"name": "m", "num_layers": 2, "hidden_size": 128, "num_heads": 4, "num_kv_heads": 4,
            "intermediate_size": 256, "vocab_size": 1024}


def _on_nodes(gpus: dict, *pools: tuple[int, int]):
    """A config of ``(tp, count)`` pools on a100 whose model splits over TP 3 and 6."""
    model = {**_model(), "hidden_size": 192, "num_heads": 6, "num_kv_heads": 6}
    return parse_config({"gpus": gpus, "model": model,
                         "pools": [{"name": f"p{i}", "gpu": "a100", "tp": tp, "count": n}
                                   for i, (tp, n) in enumerate(pools)]}, source="c.yaml")


def test_pools_must_pack_on_whole_nodes():
    """An instance never spans nodes (its placement group is STRICT_PACK): TP 3 on 8-GPU nodes is 2 per node. The
    check added GPUs only, so 5 x TP3 (15 GPUs) loaded on 2 nodes of 8, and 3 x TP3 + 1 x TP6 too."""
    two_nodes = {"a100": {"count": 16, "gpus_per_node": 8}}
    with pytest.raises(ConfigError) as e:
        _on_nodes(two_nodes, (3, 5))
    assert ("gpus.a100.count: 16 GPUs are 2 nodes of 8 (gpus_per_node), but the pools' 15 GPUs need 3 nodes, an "
            "instance never spanning nodes (pools[0] p0: 5 x TP3)") in str(e.value)
    with pytest.raises(ConfigError) as e:
        _on_nodes(two_nodes, (3, 3), (6, 1))
    assert "pools' 15 GPUs need 3 nodes" in str(e.value)
    assert "(pools[0] p0: 3 x TP3, pools[1] p1: 1 x TP6)" in str(e.value)
    assert _on_nodes(two_nodes, (3, 4), (2, 2)).num_instances == 6  # 3+3+2 on each node
    # Without gpus_per_node the GPUs are one node (as before): 5 x TP3 fit 16.
    assert _on_nodes({"a100": {"count": 16}}, (3, 5)).gpus["a100"].node_gpus == 16


def test_node_size_errors_name_the_field():
    # A pool of count 0 too: scaling would start instances no node holds.
    with pytest.raises(ConfigError, match=r"pools\[1\].tp: 6 GPUs, but gpus.a100.gpus_per_node is 4 \(an"):
        _on_nodes({"a100": {"gpus_per_node": 4}}, (1, 1), (6, 0))
    with pytest.raises(ConfigError, match="gpus.a100.count: 12 GPUs are not whole nodes of gpus_per_node 8"):
        _on_nodes({"a100": {"count": 12, "gpus_per_node": 8}}, (1, 1))


def test_bad_yaml_names_file_and_line(tmp_path):
    msg = _error(tmp_path, "model: [1, 2\npools: {\n")
    assert "line 2" in msg and "not valid YAML" in msg


def test_unknown_key_names_path_and_allowed_keys(tmp_path):
    msg = _error(tmp_path, MODEL + "pools:\n  - {name: p, gpu: a100, engine: {blok_size: 8}}\n")
    assert "pools[0].engine.blok_size: unknown key" in msg
    assert "block_size" in msg and "max_num_batched_tokens" in msg
    msg = _error(tmp_path, MODEL + "pools: [{name: p, gpu: a100}]\ncolour: red\n")
    assert "colour: unknown key" in msg and "pools" in msg and "slos" in msg


def test_unknown_gpu_in_pool_lists_configured_gpus(tmp_path):
    msg = _error(tmp_path, MODEL + "gpus: {a100: {}, h100: {}}\npools: [{name: p, gpu: tpu9}]\n")
    assert "pools[0].gpu" in msg and "tpu9" in msg and "allowed: a100, h100" in msg


def test_unknown_gpu_type_lists_catalog(tmp_path):
    msg = _error(tmp_path, MODEL + "gpus: {tpu9: {}}\npools: [{name: p, gpu: tpu9}]\n")
    assert "gpus.tpu9" in msg and "a100, a40, cpu, h100, h200, l4" in msg and "memory_gib" in msg


def test_unknown_role_lists_roles(tmp_path):
    msg = _error(tmp_path, MODEL + "pools: [{name: p, gpu: a100, role: verifier}]\n")
    assert "pools[0].role" in msg and "verifier" in msg and "prefill, decode, mixed" in msg


def test_bad_literal_lists_allowed(tmp_path):
    msg = _error(tmp_path, MODEL + "pools: [{name: p, gpu: a100, backend: magic}]\n")
    assert "pools[0].backend" in msg and "'simulated'" in msg and "'vllm'" in msg


def test_bad_model_shape(tmp_path):
    msg = _error(tmp_path, MODEL.replace("num_kv_heads: 4", "num_kv_heads: 3") + "pools: [{name: p, gpu: a100}]\n")
    assert "model" in msg and "num_kv_heads 3" in msg


def test_missing_file_lists_bundled():
    with pytest.raises(ConfigError, match="bundled examples: .*default"):
        load_config("no-such-config")


def test_top_level_must_be_mapping(tmp_path):
    msg = _error(tmp_path, "- 1\n- 2\n")
    assert "mapping" in msg
