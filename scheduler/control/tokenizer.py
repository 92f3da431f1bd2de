"""The ingress's tokenizer: ``Tokenizer`` (what ``Ingress`` needs), ``HFTokenizer`` (the vLLM pools' model, with its
chat template) and ``make_tokenizer`` (the one a cluster config calls for). Tokenizing happens in the ingress, never
as a hop to an instance."""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any, Protocol

from scheduler.config.models import ClusterConfig
from scheduler.control.api import InvalidRequest
from scheduler.engine.simulated_backend import ByteTokenizer


class Tokenizer(Protocol):
    """Optional: ``render_chat(messages, *, add_generation_prompt, chat_template_kwargs) -> str | None`` (see
    :meth:`HFTokenizer.render_chat`); a tokenizer without it has no chat template."""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def decode(self, token_ids: tuple[int, ...] | list[int]) -> str: ...


class HFTokenizer:
    """A ``tokenizers`` tokenizer file (the vLLM pools' model), loaded in the ingress so that tokenizing is
    never a hop to an instance. When the model directory declares a chat template (``tokenizer_config.json``'s
    ``chat_template``, ``chat_template.jinja`` or ``additional_chat_templates/``, as transformers saves them),
    transformers' tokenizer is loaded too, to render chat messages with it as vLLM's OpenAI server does.
    ``chat_template`` (the config's, vLLM's ``--chat-template``): a Jinja template used instead of the model's."""

    def __init__(self, path: str | Path, chat_template: str | None = None) -> None:
        from tokenizers import Tokenizer as _Tok

        self._tok = _Tok.from_file(str(path))
        self._chat: Any = None  # transformers' tokenizer, for its chat template; None: the model has none
        model_dir = Path(path).parent
        if chat_template is not None or _declares_chat_template(model_dir):
            # NOTE: imported only then: transformers takes seconds to import. The generic fast class, not
            # AutoTokenizer: rendering needs the template and the special tokens only, never a model's own class
            # (which may be remote code).
            from transformers import PreTrainedTokenizerFast

            chat = PreTrainedTokenizerFast.from_pretrained(str(model_dir))
            if chat_template is not None:
                chat.chat_template = chat_template
            self._chat = chat if chat.chat_template is not None else None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        # NOTE: encode_batch, not encode: the same ids, but it releases the GIL (tokenizers' encode holds it), so
        # the ingress tokenizing a long prompt in a thread frees its event loop.
        return list(self._tok.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids)

    def decode(self, token_ids: tuple[int, ...] | list[int]) -> str:
        return str(self._tok.decode(list(token_ids)))

    def render_chat(
        self,
        messages: list[dict[str, Any]],
        *,
        add_generation_prompt: bool = True,
        chat_template_kwargs: dict[str, Any] | None = None,
    ) -> str | None:
        """``messages`` rendered by the model's chat template (``apply_chat_template(..., tokenize=False)``), or
        ``None`` when it has none. ``chat_template_kwargs``: more template variables (e.g. ``enable_thinking``).
        Raises ``InvalidRequest`` naming ``messages`` when the template refuses them (a role it does not take, an
        order it raises on: vLLM's 400 too), ``chat_template_kwargs`` for a name the server sets itself."""
        if self._chat is None:
            return None
        kwargs = dict(chat_template_kwargs or {})
        taken = sorted(k for k in kwargs if k in _chat_call_args(self._chat))
        if taken:
            raise InvalidRequest(
                f"chat_template_kwargs: {taken[0]!r} is set by the server, not a template variable a request sets",
                field="chat_template_kwargs",
            )
        import jinja2

        try:
            text = self._chat.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt, **kwargs
            )
        except (jinja2.TemplateError, ValueError, TypeError, RuntimeError) as e:  # vLLM's 400s for the same
            raise InvalidRequest(
                f"messages: the model's chat template refused them: {e}", field="messages"
            ) from None
        return str(text)


def _declares_chat_template(model_dir: Path) -> bool:
    if (model_dir / "chat_template.jinja").is_file() or (model_dir / "additional_chat_templates").is_dir():
        return True
    config = model_dir / "tokenizer_config.json"
    return config.is_file() and json.loads(config.read_text()).get("chat_template") is not None


def _chat_call_args(chat: Any) -> frozenset[str]:
    """Names ``chat_template_kwargs`` may not take: ``apply_chat_template``'s own parameters (this server sets
    them, or they are refused) and ``messages`` (the template's variable for the conversation)."""
    params = inspect.signature(chat.apply_chat_template).parameters
    return frozenset(n for n, p in params.items() if p.kind is not p.VAR_KEYWORD) | {"messages"}


def make_tokenizer(
    config: ClusterConfig, backend_kwargs: dict[str, dict[str, Any]] | None = None
) -> Tokenizer:
    """Byte tokenizer for simulated clusters (no chat template); the served model's ``tokenizer.json`` (and chat
    template, or the config's ``chat_template``) when any pool runs vLLM: ``model.weights`` decides which, as for
    the engines. Raises ``ValueError`` naming ``model.path`` when it has no ``tokenizer.json``."""
    if any(p.backend == "vllm" for p in config.pools):
        path = config.model.weights((backend_kwargs or {}).get("vllm", {}).get("model_path"))
        model_dir = Path(path)
        if not model_dir.is_dir():  # a Hugging Face repo id: its tokenizer files only (HF_HOME, HF_TOKEN)
            from huggingface_hub import snapshot_download

            model_dir = Path(snapshot_download(path, allow_patterns=_TOKENIZER_FILES))
        tokenizer = model_dir / "tokenizer.json"
        if not tokenizer.is_file():
            raise ValueError(
                f"model.path: no tokenizer.json in {path!r}; the ingress tokenizes with it (a fast "
                "tokenizer, as transformers saves one)"
            )
        return HFTokenizer(tokenizer, chat_template=config.chat_template_text())
    return ByteTokenizer(max(config.model.vocab_size, 256))


# What HFTokenizer reads from a model directory (the tokenizer and its chat template), fetched for a repo id.
_TOKENIZER_FILES = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "additional_chat_templates/*",
]
