"""The OpenAI-compatible HTTP server over a real loopback socket (uvicorn) with ``EchoIngress``."""

from __future__ import annotations

import http.client
import json
import time

import pytest

from scheduler.server.auth import AuthConfig
from scheduler.server.background import BackgroundServer
from scheduler.server.echo import EchoIngress


@pytest.fixture(scope="module")
def srv():  # type: ignore[no-untyped-def]
    with BackgroundServer(
        lambda: EchoIngress(token_delay_s=0.001, max_model_len=4096), http=True, max_message_bytes=64 * 1024
    ) as s:
        yield s


def request(srv, method: str, path: str, body=None, headers=None, raw: bytes | None = None):  # type: ignore[no-untyped-def]
    conn = http.client.HTTPConnection("127.0.0.1", srv.http_port, timeout=10)
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
    resp = conn.getresponse()
    payload = resp.read()
    conn.close()
    return resp.status, {k.lower(): v for k, v in resp.getheaders()}, payload


def sse_events(payload: bytes) -> list:  # type: ignore[type-arg]
    events = [line[len(b"data: ") :] for line in payload.split(b"\n\n") if line.startswith(b"data: ")]
    assert events[-1] == b"[DONE]", events[-3:]
    return [json.loads(e) for e in events[:-1]]


def test_completions_non_streaming(srv) -> None:  # type: ignore[no-untyped-def]
    status, headers, body = request(
        srv,
        "POST",
        "/v1/completions",
        {"model": "echo", "prompt": "hello", "max_tokens": 7, "request_id": "h-1"},
    )
    assert status == 200, body
    out = json.loads(body)
    assert out["object"] == "text_completion" and out["id"] == "cmpl-h-1" and headers["x-request-id"] == "h-1"
    choice = out["choices"][0]
    assert choice["text"] == "hellohe" and choice["finish_reason"] == "length"
    assert out["usage"]["completion_tokens"] == 7


def test_completions_streaming_token_ids(srv) -> None:  # type: ignore[no-untyped-def]
    status, headers, body = request(
        srv, "POST", "/v1/completions", {"prompt": [3, 4, 5], "max_tokens": 8, "stream": True}
    )
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    events = sse_events(body)
    choices = [e["choices"][0] for e in events]
    assert [c["first_index"] for c in choices] == list(range(8))
    assert [t for c in choices for t in c["token_ids"]] == [3, 4, 5, 3, 4, 5, 3, 4]
    assert [c["finish_reason"] for c in choices] == [None] * 7 + ["length"]


def test_chat_completions(srv) -> None:  # type: ignore[no-untyped-def]
    msgs = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "hi"}]},
    ]
    status, _, body = request(srv, "POST", "/v1/chat/completions", {"messages": msgs, "max_tokens": 6})
    assert status == 200, body
    out = json.loads(body)
    assert out["object"] == "chat.completion" and out["choices"][0]["message"]["role"] == "assistant"
    assert out["choices"][0]["message"]["content"] == "system"
    status, _, body = request(
        srv, "POST", "/v1/chat/completions", {"messages": msgs, "max_completion_tokens": 3, "stream": True}
    )
    events = sse_events(body)
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(e["choices"][0]["delta"]["content"] for e in events) == "sys"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": "", "max_tokens": 3}, "prompt"),
        ({"prompt": [1, -1]}, "prompt[1]"),
        ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "x", "temperature": -1}, "temperature"),
        ({"prompt": "x", "top_p": 2}, "top_p"),
        ({"prompt": "x", "n": 2}, "n"),
        ({"prompt": "x", "stop": ["\n", ""]}, "stop"),  # stop strings are honoured; an empty one is refused
        ({"prompt": ["a", "b"]}, "prompt"),
        ({"prompt": {"a": 1}}, "prompt"),
        ({"max_tokens": 3}, "prompt"),
        ({"prompt": "x", "max_tokens": "many"}, "max_tokens"),
        ({"prompt": "x", "model": "gpt-9"}, "model"),
        ({"prompt": "x", "max_tokens": 5000}, "max_tokens"),
        ({"prompt": "x", "tenant": 5}, "tenant"),  # an llmsched extension: a string, as gRPC's field
        ({"prompt": "x", "tenant": "t" * 129}, "tenant"),
    ],
)
def test_bad_requests_openai_errors(srv, body, param) -> None:  # type: ignore[no-untyped-def]
    status, _, payload = request(srv, "POST", "/v1/completions", body)
    assert status == 400, payload
    err = json.loads(payload)["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param, err
    assert err["message"].startswith(param), err


def test_tenant_extension_reaches_ingress(srv) -> None:  # type: ignore[no-untyped-def]
    """``tenant`` in the body is the length predictor's per-request app (completions and chat); "" or null: unset."""
    for path, body in (("/v1/completions", {"prompt": "x", "request_id": "ht-1", "tenant": "azure_conv"}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                                                 "request_id": "ht-2", "tenant": "mooncake_conv"}),
                       ("/v1/completions", {"prompt": "x", "request_id": "ht-3", "tenant": ""}),
                       ("/v1/completions", {"prompt": "x", "request_id": "ht-4", "tenant": None})):
        status, _, payload = request(srv, "POST", path, {"max_tokens": 2, **body})
        assert status == 200, payload
    got = {r.request_id: r.tenant for r in srv.ingress.requests if r.request_id.startswith("ht-")}
    assert got == {"ht-1": "azure_conv", "ht-2": "mooncake_conv", "ht-3": None, "ht-4": None}


def test_bad_json_and_oversize(srv) -> None:  # type: ignore[no-untyped-def]
    status, _, payload = request(srv, "POST", "/v1/completions", raw=b"{nope")
    assert status == 400 and json.loads(payload)["error"]["type"] == "invalid_request_error"
    status, _, payload = request(srv, "POST", "/v1/completions", {"prompt": "x" * 100_000})
    err = json.loads(payload)["error"]
    assert status == 413 and "exceeds" in err["message"] and err["param"] == "prompt", err
    # A chat's prompt is its messages: the error names that field (it named the completions' prompt).
    status, _, payload = request(srv, "POST", "/v1/chat/completions",
                                 {"messages": [{"role": "user", "content": "x" * 100_000}]})
    err = json.loads(payload)["error"]
    assert status == 413 and err["param"] == "messages" and err["message"].startswith("messages: "), err
    assert request(srv, "POST", "/v1/completions", {"prompt": "ok", "max_tokens": 1})[0] == 200


def test_models_and_health(srv) -> None:  # type: ignore[no-untyped-def]
    status, _, body = request(srv, "GET", "/v1/models")
    assert status == 200 and [m["id"] for m in json.loads(body)["data"]] == ["echo"]
    status, _, body = request(srv, "GET", "/health")
    assert status == 200 and json.loads(body)["status"] == "ok"


def test_client_disconnect_cancels_ingress(srv) -> None:  # type: ignore[no-untyped-def]
    conn = http.client.HTTPConnection("127.0.0.1", srv.http_port, timeout=10)
    body = json.dumps({"prompt": "x", "max_tokens": 4000, "stream": True, "request_id": "h-disc"})
    conn.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200
    resp.fp.readline()  # first event
    conn.sock.close()  # hard disconnect mid-stream
    conn.close()
    deadline = time.monotonic() + 5
    while "h-disc" not in srv.ingress.cancelled and time.monotonic() < deadline:
        time.sleep(0.02)
    assert "h-disc" in srv.ingress.cancelled


def test_overload_429_retry_after() -> None:
    with BackgroundServer(lambda: EchoIngress(max_inflight=0), http=True) as s:
        status, headers, payload = request(s, "POST", "/v1/completions", {"prompt": "x"})
    assert status == 429 and headers["retry-after"] == "1"
    assert json.loads(payload)["error"]["type"] == "rate_limit_error"


def test_http_token_auth() -> None:
    with BackgroundServer(EchoIngress, http=True, auth=AuthConfig.tokens(client="c-tok", admin="a-tok")) as s:
        body = {"prompt": "x", "max_tokens": 1}
        status, _, payload = request(s, "POST", "/v1/completions", body)
        assert status == 401 and "c-tok" not in payload.decode()
        assert request(s, "POST", "/v1/completions", body, {"Authorization": "Bearer wrong"})[0] == 401
        assert request(s, "POST", "/v1/completions", body, {"Authorization": "Bearer c-tok"})[0] == 200
        assert request(s, "POST", "/v1/completions", body, {"Authorization": "Bearer a-tok"})[0] == 200
        assert request(s, "GET", "/health")[0] == 200  # probes stay open


@pytest.mark.parametrize("msg", [{"role": "user"}, {"role": "system", "content": None}])
def test_chat_a_non_assistant_message_needs_content(srv, msg) -> None:  # type: ignore[no-untyped-def]
    # A user turn without content was rendered as "" and answered 200 (OpenAI's API refuses it).
    status, _, payload = request(srv, "POST", "/v1/chat/completions", {"messages": [msg], "max_tokens": 2})
    assert status == 400, payload
    err = json.loads(payload)["error"]
    assert err["param"] == "messages[0].content" and repr(msg["role"]) in err["message"]
    ok = [{"role": "user", "content": "hi"}, {"role": "assistant"}, {"role": "user", "content": "again"}]
    assert request(srv, "POST", "/v1/chat/completions", {"messages": ok, "max_tokens": 2})[0] == 200


@pytest.mark.parametrize("part", [{"type": "text", "text": None}, {"type": "text"}, {"type": "text", "text": 3},
                                  {"type": "image_url", "image_url": {"url": "x"}}])
def test_chat_content_parts_must_be_text_strings(srv, part) -> None:  # type: ignore[no-untyped-def]
    # Found by the HTTP fuzzer: {"text": null} used to reach "".join and answer 500.
    msgs = [{"role": "user", "content": [part]}]
    status, _, payload = request(srv, "POST", "/v1/chat/completions", {"messages": msgs, "max_tokens": 2})
    assert status == 400, payload
    assert json.loads(payload)["error"]["param"] == "messages[0].content"
