"""``/v1/chat/completions`` renders the model's chat template, as vLLM's OpenAI server does: the HTTP app over a real
``Ingress`` (fake instances recording what they are sent, no Ray, no engine) whose ``HFTokenizer`` is a copy of the
tiny model's tokenizer with a small Jinja template added. Before, every chat was a ``role: content`` transcript."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from tokenizers import Tokenizer, processors

from scheduler.config.load import load_config
from scheduler.control.ingress import Ingress
from scheduler.control.tokenizer import HFTokenizer
from scheduler.engine.tiny_model import ensure_tiny_model
from scheduler.server.background import BackgroundServer
from tests.test_ingress_audit import FakeInstance, _ingress

BOS = 1  # the tiny model's <s>
# Llama-like: opens with the BOS token, refuses roles it does not know, takes a template variable.
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('Conversation roles must be system, user or assistant') }}{% endif %}"
    "<|{{ m['role'] }}|>{% if m['name'] %}({{ m['name'] }}){% endif %}{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% if enable_thinking is defined and not enable_thinking %}"
    "<nothink>{% endif %}{% endif %}"
)
MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
RENDERED = "<s><|system|>be brief</s><|user|>hi</s><|assistant|>"


class _Recording(FakeInstance):
    """Keeps the engine requests it is sent."""

    def __init__(self, iid: str) -> None:
        super().__init__(iid)
        self.submitted: list[Any] = []

    async def _submit(self, req: Any, kv: Any = None, **kw: Any) -> Any:
        self.submitted.append(req)
        return await super()._submit(req, kv, **kw)


def _copy_tokenizer(dest: Path, template: str | None) -> Path:
    """The tiny model's tokenizer files (the cached model is never touched), its post-processor adding BOS as
    Llama's does, and ``template`` as ``tokenizer_config.json``'s ``chat_template``."""
    src = ensure_tiny_model()
    dest.mkdir()
    tok = Tokenizer.from_file(str(src / "tokenizer.json"))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS)])
    tok.save(str(dest / "tokenizer.json"))
    config = json.loads((src / "tokenizer_config.json").read_text())
    if template is not None:
        config["chat_template"] = template
    (dest / "tokenizer_config.json").write_text(json.dumps(config))
    return dest / "tokenizer.json"


class _Server:
    def __init__(self, tokenizer_file: Path) -> None:
        self.tokenizer_file = tokenizer_file
        self.instance = _Recording("mixed-0")
        self.bg = BackgroundServer(
            lambda: _ingress([self.instance], tokenizer=HFTokenizer(tokenizer_file)), http=True
        )

    def post(self, path: str, body: dict[str, Any]) -> httpx.Response:
        return httpx.post(f"http://127.0.0.1:{self.bg.http_port}{path}", json=body, timeout=20)

    def ids(self, text: str, *, special: bool) -> list[int]:
        return Tokenizer.from_file(str(self.tokenizer_file)).encode(text, add_special_tokens=special).ids

    def last_prompt(self) -> list[int]:
        return list(self.instance.submitted[-1].prompt_token_ids)


@pytest.fixture(scope="module")
def templated(tmp_path_factory: pytest.TempPathFactory) -> Any:
    s = _Server(_copy_tokenizer(tmp_path_factory.mktemp("tok") / "templated", TEMPLATE))
    with s.bg:
        yield s


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> Any:
    s = _Server(_copy_tokenizer(tmp_path_factory.mktemp("tok") / "plain", None))
    with s.bg:
        yield s


def _chat(srv: _Server, stream: bool, **kw: Any) -> tuple[int, dict[str, Any]]:
    """Status and body (a stream's usage chunk as its body)."""
    body = {"messages": MESSAGES, "max_tokens": 2, "stream": stream, **kw}
    if stream:
        body["stream_options"] = {"include_usage": True}
    r = srv.post("/v1/chat/completions", body)
    if not stream or r.status_code != 200:
        return r.status_code, r.json()
    events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
    assert r.text.rstrip().endswith("data: [DONE]")
    return r.status_code, events[-1]


@pytest.mark.parametrize("stream", [False, True])
def test_chat_prompt_is_the_model_chat_template(templated: _Server, stream: bool) -> None:
    """The engine got the transcript "system: be brief\\nuser: hi\\nassistant:" (BOS added by the tokenizer)."""
    status, body = _chat(templated, stream)
    assert status == 200, body
    # Tokenized as vLLM tokenizes a chat: the template's own BOS, none added on top of it.
    want = templated.ids(RENDERED, special=False)
    assert templated.last_prompt() == want and want.count(BOS) == 1 and want[0] == BOS
    assert body["usage"]["prompt_tokens"] == len(want)  # the rendered prompt is what is counted


def test_completion_prompt_still_gets_the_tokenizer_special_tokens(templated: _Server) -> None:
    r = templated.post("/v1/completions", {"prompt": "hi", "max_tokens": 2})
    assert r.status_code == 200, r.text
    assert templated.last_prompt() == templated.ids("hi", special=True) and templated.last_prompt()[0] == BOS


@pytest.mark.parametrize("stream", [False, True])
def test_template_options_reach_the_template(templated: _Server, stream: bool) -> None:
    """vLLM's add_generation_prompt and chat_template_kwargs (were unread, dropped with the unknown fields), a
    message's name, and add_special_tokens."""
    status, _ = _chat(templated, stream, chat_template_kwargs={"enable_thinking": False})
    assert status == 200
    assert templated.last_prompt() == templated.ids(RENDERED + "<nothink>", special=False)
    status, _ = _chat(templated, stream, add_generation_prompt=False)
    assert status == 200
    assert templated.last_prompt() == templated.ids(RENDERED.removesuffix("<|assistant|>"), special=False)
    named = [MESSAGES[0], {**MESSAGES[1], "name": "ann"}]
    status, _ = _chat(templated, stream, messages=named, add_special_tokens=True)
    assert status == 200
    assert templated.last_prompt() == templated.ids(RENDERED.replace("|>hi", "|>(ann)hi"), special=True)


@pytest.mark.parametrize("stream", [False, True])
def test_template_error_is_400_naming_messages(templated: _Server, stream: bool) -> None:
    """A role the template raises on (vLLM: 400), before anything reaches an engine."""
    sent = len(templated.instance.submitted)
    status, body = _chat(templated, stream, messages=[*MESSAGES, {"role": "tool", "content": "42"}])
    assert status == 400 and body["error"]["param"] == "messages", body
    assert "Conversation roles must be" in body["error"]["message"]
    assert len(templated.instance.submitted) == sent


@pytest.mark.parametrize(
    ("kw", "param"),
    [
        ({"chat_template_kwargs": {"tokenize": True}}, "chat_template_kwargs"),  # the server's own argument
        ({"chat_template_kwargs": {"messages": []}}, "chat_template_kwargs"),
        ({"chat_template": "{{ messages }}"}, "chat_template"),  # a client's Jinja: refused, not dropped
        ({"continue_final_message": True}, "continue_final_message"),
    ],
)
def test_template_overrides_are_refused(templated: _Server, kw: dict[str, Any], param: str) -> None:
    status, body = _chat(templated, False, **kw)
    assert status == 400 and body["error"]["param"] == param, body


@pytest.mark.parametrize("stream", [False, True])
def test_tokenizer_without_template_keeps_the_transcript(plain: _Server, stream: bool) -> None:
    status, body = _chat(plain, stream)
    assert status == 200, body
    want = plain.ids("system: be brief\nuser: hi\nassistant:", special=True)
    assert plain.last_prompt() == want and body["usage"]["prompt_tokens"] == len(want)


def test_byte_tokenizer_has_no_template() -> None:
    """The simulated backend's tokenizer: the HTTP server falls back to the transcript."""
    ing = Ingress(load_config("default"), controller=None)
    assert ing.render_chat(MESSAGES) is None
