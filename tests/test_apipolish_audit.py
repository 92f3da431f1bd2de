"""API polish on both front ends (an audit by a helper session): the HTTP server's errors and options as OpenAI's and
vLLM's, gRPC's ``add_special_tokens``. A server on loopback over test_http_audit's ``_Faulty`` (an ``EchoIngress``
with faults injected by request id), its own per module. Each test failed before its fix."""

from __future__ import annotations

import asyncio
import inspect
import json
from typing import Any

import grpc
import httpx
import openai
import pytest
import yaml

from scheduler.client import AsyncClient, Client, LLMSchedError
from scheduler.config.load import load_config
from scheduler.config.models import ClusterConfig
from scheduler.control.api import GenerateRequest
from scheduler.control.tokenizer import make_tokenizer
from scheduler.server.background import BackgroundServer
from tests.test_chat_template import MESSAGES as CHAT_MESSAGES
from tests.test_chat_template import RENDERED as CHAT_RENDERED
from tests.test_chat_template import TEMPLATE as CHAT_TEMPLATE
from tests.test_chat_template import _copy_tokenizer
from tests.test_cli_bad_input import run as run_cli
from tests.test_http_audit import _client, _Faulty, _post, _tries


@pytest.fixture(scope="module")
def srv():  # type: ignore[no-untyped-def]
    with BackgroundServer(lambda: _Faulty(max_model_len=4096), http=True) as s:
        yield s


def _body(chat: bool, **kw: Any) -> tuple[str, dict[str, Any]]:
    if chat:
        return "chat/completions", {"model": "echo", "messages": [{"role": "user", "content": "hi"}], **kw}
    return "completions", {"model": "echo", "prompt": "hi", **kw}


def _events(resp: httpx.Response) -> list[str]:
    """The ``data:`` payloads of an SSE body, in order."""
    return [line[len("data: ") :] for line in resp.text.splitlines() if line.startswith("data: ")]


# -- an ingress stream with no chunk is a server error, not a 200 -------------------------------------------------------


@pytest.mark.parametrize("chat", [False, True])
@pytest.mark.parametrize("stream", [False, True])
def test_empty_ingress_stream_is_a_500(srv, chat, stream) -> None:  # type: ignore[no-untyped-def]
    # It was answered 200 with finish_reason "error: empty stream" (and no tokens): a client counted it a success.
    path, body = _body(chat, max_tokens=4, stream=stream, request_id=f"empty-{chat}-{stream}")
    resp = _post(srv, path, body)
    assert resp.status_code == 500 and resp.headers["content-type"] == "application/json"
    err = resp.json()["error"]
    assert err["type"] == "server_error" and "without a chunk" in err["message"]


# -- a stream ending in an error event still ends with [DONE], as vLLM's --------------------------------------------------


@pytest.mark.parametrize("chat", [False, True])
@pytest.mark.parametrize("rid", ["poison-mid", "bug-mid"])
def test_stream_error_event_is_followed_by_done(srv, chat, rid) -> None:  # type: ignore[no-untyped-def]
    # The body ended right after the error event: vLLM's server (and clients reading to [DONE]) end with one.
    path, body = _body(chat, max_tokens=4, stream=True, request_id=f"{rid}-{chat}")
    resp = _post(srv, path, body)
    assert resp.status_code == 200
    *_, error, done = _events(resp)
    assert json.loads(error)["error"]["type"] == "server_error" and done == "[DONE]"


def test_openai_client_still_raises_the_error_event(srv) -> None:  # type: ignore[no-untyped-def]
    # [DONE] after the error event must not hide it from openai-python (it stops at [DONE]).
    client = _client(srv, max_retries=0)
    stream = client.completions.create(
        model="echo", prompt="hi", max_tokens=4, stream=True, extra_body={"request_id": "bug-mid-openai"}
    )
    with pytest.raises(openai.APIError) as exc:
        list(stream)
    assert exc.value.body["message"] == "internal error (RuntimeError)"


# -- a stream that ended in error is a 500 / an error event, as vLLM's ---------------------------------------------------


@pytest.mark.parametrize("chat", [False, True])
@pytest.mark.parametrize(("rid", "stream"), [("err-first", False), ("err-first", True), ("err-mid", False)])
def test_error_finish_is_a_500(srv, chat, rid, stream) -> None:  # type: ignore[no-untyped-def]
    # It was a 200 with finish_reason "error: ..." (and the output so far): no OpenAI client knows that reason, and
    # one that reads the text took a failed request for a short answer. vLLM answers 500 for its "error" finish.
    path, body = _body(chat, max_tokens=4, stream=stream, request_id=f"{rid}-{chat}-{stream}")
    resp = _post(srv, path, body)
    assert resp.status_code == 500 and resp.headers["content-type"] == "application/json"
    assert resp.headers["x-should-retry"] == "false"  # final: OpenAI clients would re-run it twice
    assert resp.json()["error"] == {
        "message": "error: ValueError: the engine refused it",
        "type": "server_error",
        "param": None,
        "code": None,
    }


def test_error_finish_is_not_retried_by_openai_client(srv) -> None:  # type: ignore[no-untyped-def]
    # Final (a request's own error on a live engine): openai-python retries a 500 twice unless told not to.
    client = _client(srv, max_retries=2)
    with pytest.raises(openai.InternalServerError):
        client.completions.create(
            model="echo", prompt="hi", max_tokens=4, extra_body={"request_id": "err-first-oa"}
        )
    assert _tries(srv, "err-first-oa") == 1


@pytest.mark.parametrize("chat", [False, True])
def test_error_finish_mid_stream_is_an_error_event(srv, chat) -> None:  # type: ignore[no-untyped-def]
    path, body = _body(chat, max_tokens=4, stream=True, request_id=f"err-mid-{chat}-stream")
    resp = _post(srv, path, body)
    assert resp.status_code == 200
    first, second, error, done = _events(resp)
    tokens = [json.loads(e)["choices"][0] for e in (first, second)]
    assert [len(c["token_ids"]) for c in tokens] == [1, 1]  # what it made is delivered
    assert all(c["finish_reason"] is None for c in tokens)  # never "error: ...": the error event says it
    assert json.loads(error)["error"]["message"] == "error: ValueError: the engine refused it"
    assert done == "[DONE]"


# -- stream_options without stream is refused, as OpenAI -----------------------------------------------------------------


@pytest.mark.parametrize("chat", [False, True])
@pytest.mark.parametrize("stream", [False, None])
def test_stream_options_without_stream_is_refused(srv, chat, stream) -> None:  # type: ignore[no-untyped-def]
    # It was accepted and ignored (no usage chunk can come without a stream); OpenAI answers 400 naming it.
    rid = f"opts-{chat}-{stream}"
    path, body = _body(
        chat, max_tokens=2, stream=stream, request_id=rid, stream_options={"include_usage": True}
    )
    resp = _post(srv, path, body)
    assert resp.status_code == 400
    err = resp.json()["error"]
    assert err["param"] == "stream_options" and err["message"].startswith("stream_options")
    assert not any(r.request_id == rid for r in srv.ingress.requests)
    # null is unset (as any field): accepted
    path, body = _body(chat, max_tokens=2, stream_options=None)
    assert _post(srv, path, body).status_code == 200


# -- gRPC: add_special_tokens, as the HTTP API's ----------------------------------------------------------------------


def _sent(srv: Any, rid: str) -> GenerateRequest:
    (req,) = [r for r in srv.ingress.requests if r.request_id == rid]
    return req


def test_grpc_add_special_tokens(srv) -> None:  # type: ignore[no-untyped-def]
    # The proto had no such field: a gRPC text prompt always got the tokenizer's special tokens (BOS...), so a
    # client sending an already templated prompt got two BOS.
    with Client(srv.address, timeout_s=10) as c:
        assert c.generate("hi", max_tokens=2, request_id="ast-off", add_special_tokens=False).text == "hi"
        c.generate("hi", max_tokens=2, request_id="ast-on", add_special_tokens=True)
        c.generate("hi", max_tokens=2, request_id="ast-unset")
        list(c.stream("hi", max_tokens=2, request_id="ast-stream", add_special_tokens=False))

    async def run() -> None:
        async with AsyncClient(srv.address, timeout_s=10) as ac:
            await ac.generate("hi", max_tokens=2, request_id="ast-async", add_special_tokens=False)
            async with ac.stream(
                "hi", max_tokens=2, request_id="ast-async-stream", add_special_tokens=False
            ) as s:
                assert [x async for x in s]

    asyncio.run(run())
    assert _sent(srv, "ast-off").add_special_tokens is False
    assert _sent(srv, "ast-on").add_special_tokens is True
    assert _sent(srv, "ast-unset").add_special_tokens is True  # unset on the wire: today's behaviour
    for rid in ("ast-stream", "ast-async", "ast-async-stream"):
        assert _sent(srv, rid).add_special_tokens is False


def test_grpc_add_special_tokens_unset_on_the_wire_keeps_the_default(srv) -> None:  # type: ignore[no-untyped-def]
    # An old client's request (no field 10 on the wire) still gets the special tokens.
    from scheduler._proto.llmsched.v1 import inference_pb2

    req = inference_pb2.GenerateRequest(
        request_id="ast-old", text="hi", sampling=inference_pb2.SamplingParams(max_tokens=1)
    )
    assert not req.HasField("add_special_tokens")
    with grpc.insecure_channel(srv.address) as ch:
        call = ch.unary_stream(
            "/llmsched.v1.Inference/Generate",
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=inference_pb2.GenerateChunk.FromString,
        )
        assert [m.finished for m in call(req, timeout=10)] == [True]
    assert _sent(srv, "ast-old").add_special_tokens is True


@pytest.mark.parametrize("method", ["generate", "stream"])
def test_sync_and_async_clients_take_the_same_arguments(method) -> None:  # type: ignore[no-untyped-def]
    sync, aio = inspect.signature(getattr(Client, method)), inspect.signature(getattr(AsyncClient, method))
    assert [(p.name, p.kind, p.default) for p in sync.parameters.values()] == [
        (p.name, p.kind, p.default) for p in aio.parameters.values()
    ]
    assert "add_special_tokens" in sync.parameters


def test_grpc_empty_ingress_stream_is_internal(srv) -> None:  # type: ignore[no-untyped-def]
    # It was OK with no chunk at all: the SDK's generate() returned an empty result (finish_reason None) as if the
    # request had run. An ingress bug, as on HTTP (a 500): INTERNAL, logged on the server.
    with Client(srv.address, timeout_s=10, retries=0) as c, pytest.raises(LLMSchedError) as exc:
        c.generate("hi", max_tokens=2, request_id="empty-grpc")
    assert exc.value.code == grpc.StatusCode.INTERNAL


# -- a server-side chat template (vLLM's --chat-template): the config's chat_template ---------------------------------

SERVER_TEMPLATE = (
    "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}[assistant] {% endif %}"
)
SERVER_RENDERED = "[system] be brief\n[user] hi\n[assistant] "


def _config(chat_template: str | None, source: str = "tiny-cpu") -> ClusterConfig:
    data = load_config(source).model_dump()
    return ClusterConfig.model_validate({**data, "chat_template": chat_template})


@pytest.mark.parametrize("model_has_one", [True, False])
@pytest.mark.parametrize("as_file", [False, True])
def test_config_chat_template_renders_chats(tmp_path, model_has_one, as_file) -> None:  # type: ignore[no-untyped-def]
    # There was no way to set the template server-side: a model without one (or with a wrong one) could only be
    # served chats as a "role: content" transcript (or through its own template); vLLM has --chat-template.
    tok_file = _copy_tokenizer(tmp_path / "model", CHAT_TEMPLATE if model_has_one else None)
    value = SERVER_TEMPLATE
    if as_file:
        (tmp_path / "server.jinja").write_text(SERVER_TEMPLATE)
        value = str(tmp_path / "server.jinja")
    tok = make_tokenizer(_config(value), {"vllm": {"model_path": str(tok_file.parent)}})
    assert tok.render_chat(CHAT_MESSAGES) == SERVER_RENDERED  # type: ignore[attr-defined]
    # without it, the model's own (or none)
    own = make_tokenizer(_config(None), {"vllm": {"model_path": str(tok_file.parent)}})
    assert own.render_chat(CHAT_MESSAGES) == (CHAT_RENDERED if model_has_one else None)  # type: ignore[attr-defined]


def test_config_chat_template_on_a_simulated_cluster_is_refused_at_load() -> None:
    # The simulated backend's byte tokenizer has no template machinery: it would be silently unused.
    with pytest.raises(ValueError, match="chat_template: only a vllm pool"):
        _config(SERVER_TEMPLATE, "default")


def test_serve_with_an_unreadable_chat_template_file_exits_2_before_starting(  # type: ignore[no-untyped-def]
    no_cluster_start, tmp_path, capsys
) -> None:
    data = load_config("tiny-cpu").model_dump(mode="json")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({**data, "chat_template": str(tmp_path / "missing.jinja")}))
    rc, err = run_cli(["serve", "--config", str(cfg)], capsys)
    assert rc == 2 and "error: chat_template: cannot read the file" in err
