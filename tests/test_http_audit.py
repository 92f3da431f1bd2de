"""The OpenAI-compatible HTTP server against the real ``openai`` client (an audit by a helper session): a server on
loopback over ``EchoIngress`` with faults injected by request id. Each test failed before its fix."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import socket
import time
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
    """``EchoIngress`` failing requests by id prefix (this module's and test_apipolish_audit's server):
    ``poison`` = quarantined (``RequestFailed``), ``bug`` = a server bug (``RuntimeError``), with ``-mid`` after the
    first chunk, else before it; ``queued``: 3 s to the first chunk; ``empty``: no chunk at all; ``err-``: ends
    with an ``error: ...`` finish (``err-first`` on its first chunk)."""

    def generate(self, request: GenerateRequest) -> AsyncIterator[TokenChunk]:
        rid = request.request_id
        if rid.startswith(("poison", "bug")) and "-mid" not in rid:
            self.requests.append(request)
            raise _fault(rid)
        chunks = super().generate(request)
        if rid.startswith("empty"):
            return _no_chunks()
        if rid.startswith("err-"):
            return _end_in_error(chunks, first="err-first" in rid)
        return self._faulty(chunks, rid)

    async def _faulty(self, chunks: AsyncIterator[TokenChunk], rid: str) -> AsyncIterator[TokenChunk]:
        if rid.startswith("queued"):  # a long wait for the first token (a queue, a long prefill)
            await asyncio.sleep(3.0)
        async for c in chunks:
            yield c
            if rid.startswith(("poison", "bug")):
                raise _fault(rid)


def _fault(rid: str) -> Exception:
    if rid.startswith("poison"):
        return RequestFailed(
            f"request {rid} failed 2 engines it ran on (a, b): not recovered or retried further"
        )
    return RuntimeError("an ingress bug")


async def _end_in_error(chunks: AsyncIterator[TokenChunk], *, first: bool) -> AsyncIterator[TokenChunk]:
    """As the ingress ends a stream whose engine raised on it: a finished chunk with ``error: ...``."""
    async for c in chunks:
        if first or c.index > 0:
            yield dataclasses.replace(
                c, finished=True, finish_reason="error: ValueError: the engine refused it"
            )
            return
        yield c


async def _no_chunks() -> AsyncIterator[TokenChunk]:
    return
    yield  # pragma: no cover


@pytest.fixture(scope="module")
def srv():  # type: ignore[no-untyped-def]
    with BackgroundServer(lambda: _Faulty(max_model_len=4096), http=True) as s:
        yield s


def _client(srv: Any, **kw: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{srv.http_port}/v1", api_key="unused", **kw)


def _post(srv: Any, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"http://127.0.0.1:{srv.http_port}/v1/{path}", json=body, timeout=10)


def _tries(srv: Any, rid: str) -> int:
    return sum(r.request_id == rid for r in srv.ingress.requests)


# -- a quarantined request is final: the client must not re-send it ----------------------------------------------------


@pytest.mark.parametrize(
    ("rid", "stream"), [("poison-1", False), ("poison-2", True), ("poison-mid-3", False)]
)
def test_quarantined_request_is_not_retried_by_openai_client(srv, rid, stream) -> None:  # type: ignore[no-untyped-def]
    # openai-python retries any 5xx twice by default: a 500 re-sent the query of death to more engines.
    client = _client(srv, max_retries=2)
    with pytest.raises(openai.InternalServerError) as exc:
        client.completions.create(
            model="echo", prompt="hi", max_tokens=4, stream=stream, extra_body={"request_id": rid}
        )
    assert _tries(srv, rid) == 1
    assert exc.value.status_code == 500 and exc.value.response.headers["x-should-retry"] == "false"
    assert exc.value.body["type"] == "server_error" and "not recovered" in exc.value.body["message"]


# -- a server bug is still an OpenAI error -----------------------------------------------------------------------------


@pytest.mark.parametrize("rid", ["bug-1", "bug-mid-2"])
def test_server_bug_is_openai_shaped_500(srv, rid) -> None:  # type: ignore[no-untyped-def]
    # Starlette's default was a text/plain "Internal Server Error": no error body for the client to read.
    with pytest.raises(openai.InternalServerError) as exc:
        _client(srv, max_retries=0).completions.create(
            model="echo", prompt="hi", max_tokens=4, extra_body={"request_id": rid}
        )
    assert exc.value.response.headers["content-type"] == "application/json"
    assert exc.value.body == {
        "message": "internal error (RuntimeError)",
        "type": "server_error",
        "param": None,
        "code": None,
    }


def test_server_bug_mid_stream_is_an_error_event(srv) -> None:  # type: ignore[no-untyped-def]
    # The body used to end abruptly: openai-python reported a network failure (APIConnectionError), not the server's.
    stream = _client(srv, max_retries=0).completions.create(
        model="echo", prompt="hi", max_tokens=4, stream=True, extra_body={"request_id": "bug-mid-3"}
    )
    got = []
    with pytest.raises(openai.APIError) as exc:
        for chunk in stream:
            got.append(chunk.choices[0].text)
    assert type(exc.value) is openai.APIError and got == ["h"]
    assert exc.value.body == {
        "message": "internal error (RuntimeError)",
        "type": "server_error",
        "param": None,
        "code": None,
    }


# -- stream_options.include_usage --------------------------------------------------------------------------------------


@pytest.mark.parametrize("chat", [False, True])
def test_stream_include_usage_sends_the_usage_chunk(srv, chat) -> None:  # type: ignore[no-untyped-def]
    # It was ignored: a streaming client asking for usage (to bill, to count tokens) got none.
    client = _client(srv, max_retries=0)
    kw: dict[str, Any] = {"model": "echo", "max_tokens": 3, "stream": True}
    if chat:
        chunks = list(
            client.chat.completions.create(
                messages=[{"role": "user", "content": "hi"}], stream_options={"include_usage": True}, **kw
            )
        )
        prompt_tokens = len("user: hi\nassistant:")  # the echo's tokens: one per character of the transcript
    else:
        chunks = list(client.completions.create(prompt="hello", stream_options={"include_usage": True}, **kw))
        prompt_tokens = 5
    *tokens, last = chunks
    assert len(tokens) == 3 and all(c.usage is None for c in tokens)
    assert last.choices == [] and last.usage is not None
    assert (last.usage.prompt_tokens, last.usage.completion_tokens, last.usage.total_tokens) == (
        prompt_tokens,
        3,
        prompt_tokens + 3,
    )
    without = list(client.completions.create(prompt="hello", **kw))  # not asked: no usage chunk, as OpenAI
    assert len(without) == 3 and all(c.choices for c in without)


# -- options that would change the output are refused, not dropped -----------------------------------------------------

_CHAT = [{"role": "user", "content": "hi"}]
_TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}


@pytest.mark.parametrize(
    ("chat", "kw", "param"),
    [
        (False, {"presence_penalty": 0.5}, "presence_penalty"),
        (False, {"frequency_penalty": -1.0}, "frequency_penalty"),
        (False, {"logit_bias": {"50256": -100}}, "logit_bias"),
        (False, {"suffix": "}"}, "suffix"),
        (False, {"logprobs": 0}, "logprobs"),  # 0 asks for the sampled tokens' logprobs (OpenAI, vLLM)
        (True, {"response_format": {"type": "json_object"}}, "response_format"),
        (True, {"tools": [_TOOL]}, "tools"),
        (True, {"top_logprobs": 2}, "top_logprobs"),
        (True, {"extra_body": {"repetition_penalty": 1.2}}, "repetition_penalty"),  # vLLM's own
        (True, {"extra_body": {"min_tokens": 3}}, "min_tokens"),
        (True, {"extra_body": {"guided_choice": ["yes", "no"]}}, "guided_choice"),
        (True, {"extra_body": {"echo": True}}, "echo"),
        (False, {"extra_body": {"truncate_prompt_tokens": 1}}, "truncate_prompt_tokens"),
    ],
)
def test_output_changing_options_are_refused(srv, chat, kw, param) -> None:  # type: ignore[no-untyped-def]
    # They were dropped with the unknown fields: e.g. JSON mode or tools asked and plain text answered, as if honoured.
    client = _client(srv, max_retries=0)
    rid = f"opt-{param}"
    kw = {**kw, "extra_body": {**kw.get("extra_body", {}), "request_id": rid}}
    with pytest.raises(openai.BadRequestError) as exc:
        if chat:
            client.chat.completions.create(model="echo", messages=_CHAT, max_tokens=2, **kw)
        else:
            client.completions.create(model="echo", prompt="hi", max_tokens=2, **kw)
    assert exc.value.body["param"] == param and exc.value.body["message"].startswith(param)
    assert _tries(srv, rid) == 0


def test_neutral_values_of_refused_options_are_accepted(srv) -> None:  # type: ignore[no-untyped-def]
    client = _client(srv, max_retries=0)
    out = client.chat.completions.create(
        model="echo",
        messages=_CHAT,
        max_tokens=2,
        presence_penalty=0,
        frequency_penalty=0.0,
        logit_bias={},
        logprobs=False,
        response_format={"type": "text"},
        tools=[],
        extra_body={"repetition_penalty": 1.0, "min_tokens": 0},
    )
    assert out.choices[0].message.content == "us"
    assert (
        client.completions.create(model="echo", prompt="hi", max_tokens=2, suffix="").choices[0].text == "hi"
    )


# -- null is "not set" -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("chat", [False, True])
def test_null_options_mean_their_defaults(srv, chat) -> None:  # type: ignore[no-untyped-def]
    # OpenAI and vLLM take null as unset; a client passing None (sent as null) got "temperature: Input should be a
    # valid number" and the like.
    client = _client(srv, max_retries=0)
    nulls: dict[str, Any] = dict.fromkeys(("temperature", "top_p", "n", "max_tokens", "seed", "stop"))
    nulls["extra_body"] = dict.fromkeys(("logprobs", "top_k", "ignore_eos", "priority", "stop_token_ids"))
    if chat:
        out = client.chat.completions.create(model="echo", messages=_CHAT, **nulls)
    else:
        out = client.completions.create(model="echo", prompt="abc", **nulls)
        assert out.choices[0].text == ("abc" * 6)[:16]
    # max_tokens null: the default (16), as not sent
    assert out.usage.completion_tokens == 16 and out.choices[0].finish_reason == "length"


# -- a client that hangs up while its request waits for the first token ------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
def test_disconnect_before_first_token_cancels_at_once(srv, stream) -> None:  # type: ignore[no-untyped-def]
    # The wait for the first chunk was not watched: a client gone while queued kept its place, and its prefill ran
    # (and took KV) until the first token came; only then was it cancelled.
    rid = f"queued-{stream}"
    body = json.dumps({"prompt": "hi", "max_tokens": 2, "stream": stream, "request_id": rid}).encode()
    head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d"
    with socket.create_connection(("127.0.0.1", srv.http_port), timeout=5) as sock:
        sock.sendall(head % len(body) + b"\r\n\r\n" + body)
        time.sleep(0.3)
    deadline = time.monotonic() + 1.5  # the first token comes 3 s after the request
    while rid not in srv.ingress.cancelled and time.monotonic() < deadline:
        time.sleep(0.02)
    assert rid in srv.ingress.cancelled


# -- stop strings (vLLM honours them) ----------------------------------------------------------------------------------


def _complete(srv: Any, stream: bool, **kw: Any) -> tuple[str, str | None, int | None]:
    """(text, finish_reason, completion tokens) of one completion, streamed or not."""
    client = _client(srv, max_retries=0)
    if not stream:
        out = client.completions.create(model="echo", **kw)
        return out.choices[0].text, out.choices[0].finish_reason, out.usage.completion_tokens
    chunks = list(
        client.completions.create(model="echo", stream=True, stream_options={"include_usage": True}, **kw)
    )
    text = "".join(c.choices[0].text for c in chunks[:-1])
    return text, chunks[-2].choices[0].finish_reason, chunks[-1].usage.completion_tokens


@pytest.mark.parametrize("stream", [False, True])
def test_stop_strings_end_the_text_before_them(srv, stream) -> None:  # type: ignore[no-untyped-def]
    # They were refused (400), where vLLM honours them (and OpenAI clients and frameworks send them).
    rid = f"stop-{stream}"
    text, reason, n = _complete(
        srv, stream, prompt="hello world", max_tokens=50, stop=["xyz", "o w"], extra_body={"request_id": rid}
    )
    # "o w" is completed by the 7th token; its text is left out; the request is stopped in the ingress
    assert (text, reason, n) == ("hell", "stop", 7)
    assert rid in srv.ingress.cancelled and rid not in srv.ingress.finished


@pytest.mark.parametrize("stream", [False, True])
def test_text_held_back_for_a_stop_string_is_sent_at_the_end(srv, stream) -> None:  # type: ignore[no-untyped-def]
    # a stream holds back its last 2 characters (len("lxx") - 1): sent with the last chunk when it ends otherwise
    assert _complete(srv, stream, prompt="abcl", max_tokens=4, stop="lxx") == ("abcl", "length", 4)
    assert _complete(srv, stream, prompt="ab", max_tokens=5, stop="bab") == ("a", "stop", 4)


@pytest.mark.parametrize(
    ("stop", "words"),
    [(["x", ""], "empty"), (["x" * 1025], "1024 characters"), ([str(i) for i in range(17)], "16")],
)
def test_empty_or_too_many_stop_strings_are_refused(srv, stop, words) -> None:  # type: ignore[no-untyped-def]
    # each is searched in every chunk's text (and a stream holds back as many characters): bounded
    with pytest.raises(openai.BadRequestError) as exc:
        _complete(srv, False, prompt="ab", max_tokens=5, stop=stop)
    assert exc.value.body["param"] == "stop" and words in exc.value.body["message"]


def test_chat_stop_string(srv) -> None:  # type: ignore[no-untyped-def]
    out = _client(srv, max_retries=0).chat.completions.create(
        model="echo", messages=_CHAT, max_tokens=10, stop="hi"
    )  # the echo streams back the transcript "user: hi\nassistant:"
    assert (out.choices[0].message.content, out.choices[0].finish_reason) == ("user: ", "stop")


def test_vllm_top_k_minus_one_means_disabled(srv) -> None:  # type: ignore[no-untyped-def]
    # vLLM takes top_k=-1 as "all tokens" (its examples send it); ours answered 400 "top_k: must be >= 0".
    rid = "topk-minus-one"
    out = _client(srv, max_retries=0).completions.create(
        model="echo", prompt="ab", max_tokens=2, extra_body={"top_k": -1, "request_id": rid}
    )
    assert out.choices[0].text == "ab"
    assert [r.sampling.top_k for r in srv.ingress.requests if r.request_id == rid] == [0]
    with pytest.raises(openai.BadRequestError):  # other negatives are still refused
        _client(srv, max_retries=0).completions.create(model="echo", prompt="ab", extra_body={"top_k": -2})
