"""API polish on both front ends (an audit by a helper session): the HTTP server's errors and options as OpenAI's and
vLLM's. A server on loopback over ``EchoIngress`` with faults injected by request id. Each test failed before its
fix."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import openai
import pytest

from scheduler.control.api import GenerateRequest, RequestFailed
from scheduler.engine.base import TokenChunk
from scheduler.server.background import BackgroundServer
from scheduler.server.echo import EchoIngress


@dataclass
class _Faulty(EchoIngress):
    """``EchoIngress`` whose stream, by request id prefix: ``empty`` ends with no chunk at all; ``poison-mid``
    raises ``RequestFailed`` and ``bug-mid`` a ``RuntimeError`` after its first chunk."""

    def generate(self, request: GenerateRequest) -> AsyncIterator[TokenChunk]:
        chunks = super().generate(request)
        rid = request.request_id
        if rid.startswith("empty"):
            return _no_chunks()
        if rid.startswith(("poison-mid", "bug-mid")):
            return _fail_after_first(chunks, rid)
        return chunks


async def _no_chunks() -> AsyncIterator[TokenChunk]:
    return
    yield  # pragma: no cover


async def _fail_after_first(chunks: AsyncIterator[TokenChunk], rid: str) -> AsyncIterator[TokenChunk]:
    async for c in chunks:
        yield c
        if rid.startswith("poison"):
            raise RequestFailed(
                f"request {rid} failed 2 engines it ran on (a, b): not recovered or retried further"
            )
        raise RuntimeError("an ingress bug")


@pytest.fixture(scope="module")
def srv():  # type: ignore[no-untyped-def]
    with BackgroundServer(lambda: _Faulty(max_model_len=4096), http=True) as s:
        yield s


def _post(srv: Any, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"http://127.0.0.1:{srv.http_port}/v1/{path}", json=body, timeout=10)


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
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{srv.http_port}/v1", api_key="unused", max_retries=0)
    stream = client.completions.create(
        model="echo", prompt="hi", max_tokens=4, stream=True, extra_body={"request_id": "bug-mid-openai"}
    )
    with pytest.raises(openai.APIError) as exc:
        list(stream)
    assert exc.value.body["message"] == "internal error (RuntimeError)"


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
