"""Regressions from an audit of the live ingress, its gRPC/HTTP surface and the SDK (session 35). No Ray: the real
``Ingress`` over the fake instance handles of ``test_ingress_audit``, served over real loopback gRPC/HTTP."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest

from scheduler._proto.llmsched.v1 import inference_pb2
from scheduler.client import Client
from scheduler.client.types import DeadlineExceeded
from scheduler.control.api import GenerateRequest, IngressError
from scheduler.control.registry import RequestRecord
from scheduler.control.tokenizer import HFTokenizer
from scheduler.engine.base import SamplingParams, TokenChunk
from scheduler.engine.tiny_model import ensure_tiny_model
from scheduler.server.background import BackgroundServer
from scheduler.server.grpc_server import status_for
from scheduler.server.http_server import build_app, http_error_for
from scheduler.server.validate import request_status_for
from scheduler.telemetry.metrics import NullRecorder, RequestStatus
from tests.test_grpc_api import raw_generate, wait_for
from tests.test_ingress_audit import FakeInstance, _ingress

# Multi-byte characters (2, 3 and 4 UTF-8 bytes): the tiny model's byte-level BPE splits each over several tokens.
TEXT = "the cache é ok 日本 and 🙂 model"


@pytest.fixture(scope="module")
def tok() -> HFTokenizer:
    return HFTokenizer(Path(ensure_tiny_model()) / "tokenizer.json")


def _engine_texts(tok: HFTokenizer, ids: list[int]) -> list[str]:
    """Each token's text as vLLM's incremental detokenizer streams it: the text the token completes, a character
    still incomplete held back ("" until its last byte)."""
    out, done = [], ""
    for n in range(1, len(ids) + 1):
        now = tok.decode(ids[:n]).rstrip("\ufffd")
        out.append(now[len(done) :])
        done = now
    return out


def _splits(tok: HFTokenizer, ids: list[int]) -> list[int]:
    """Indices that cut a character in two (decoding the head alone ends in U+FFFD)."""
    return [n for n in range(1, len(ids)) if tok.decode(ids[:n]).endswith("\ufffd")]


def test_the_text_fixture_splits_characters(tok: HFTokenizer) -> None:
    ids = tok.encode(TEXT, add_special_tokens=False)
    assert tok.decode(ids) == TEXT and len(_splits(tok, ids)) >= 4
    assert "".join(_engine_texts(tok, ids)) == TEXT


# ---- resumed stream text --------------------------------------------------------------------------------------------
class _TextIngress:
    """Streams ``text``'s tokens ``chunk`` at a time with the engine's texts; ``tokenizer`` as the real ingress's."""

    def __init__(self, tok: HFTokenizer, chunk: int, text: str = TEXT) -> None:
        self.tokenizer, self.chunk = tok, chunk
        self.ids = tok.encode(text, add_special_tokens=False)
        self.texts = _engine_texts(tok, self.ids)

    async def _stream(self, rid: str) -> AsyncIterator[TokenChunk]:
        n = len(self.ids)
        for i in range(0, n, self.chunk):
            j = min(i + self.chunk, n)
            yield TokenChunk(
                rid, i, tuple(self.ids[i:j]), j == n, "length" if j == n else None, "".join(self.texts[i:j])
            )
            await asyncio.sleep(0)

    def generate(self, request: GenerateRequest) -> AsyncIterator[TokenChunk]:
        return self._stream(request.request_id)

    async def cancel(self, request_id: str) -> bool:
        return False


def test_grpc_resumed_stream_text_joins_to_the_whole_text(tok: HFTokenizer) -> None:
    """A retry's ``resume_from_index`` inside a chunk: the server detokenized the kept tail alone, so a character split
    at the resume point came out as U+FFFD (and its head's bytes were lost). The client's text (what it holds before
    the resume point + the resumed stream's) must be the whole text, wherever the resume point falls."""
    with BackgroundServer(lambda: _TextIngress(tok, chunk=4)) as srv:
        ing = srv.ingress
        ids = ing.ids
        bad = []
        for resume in range(1, len(ids)):
            req = inference_pb2.GenerateRequest(text="x", request_id=f"r{resume}")
            req.sampling.max_tokens = len(ids)
            req.resume_from_index = resume
            code, details, chunks = raw_generate(grpc.insecure_channel(srv.address), req.SerializeToString())
            assert code == grpc.StatusCode.OK, details
            got = "".join(ing.texts[:resume]) + "".join(c.text for c in chunks)
            if got != TEXT:
                bad.append((resume, got))
        assert not bad, bad


def _accept_all(tok: HFTokenizer, chunks: list[TokenChunk]) -> str:
    ing = _ingress([], tokenizer=tok)
    rec = RequestRecord(
        "r", tuple(tok.encode("Hello", add_special_tokens=False)), SamplingParams(max_tokens=100)
    )
    return "".join(out.text for c in chunks if (out := ing._accept(rec, c)) is not None)


def test_ingress_keeps_a_held_back_character_whole(tok: HFTokenizer) -> None:
    """vLLM streams "" for a token that ends inside a character (its text comes with the token that completes it):
    the ingress took the empty text for missing and detokenized the token alone, so every non-ASCII character
    reached the client as U+FFFD followed by the character."""
    ids = tok.encode(TEXT, add_special_tokens=False)
    texts = _engine_texts(tok, ids)
    chunks = [TokenChunk("r", i, (t,), i == len(ids) - 1, None, texts[i]) for i, t in enumerate(ids)]
    assert _accept_all(tok, chunks) == TEXT


@pytest.mark.parametrize("cut", [5, 10, 13, 19])
def test_ingress_text_of_resent_and_overlapping_tokens(tok: HFTokenizer, cut: int) -> None:
    """Tokens the ingress must detokenize itself -- an instance's resend of outputs emitted before it took over
    (sent without text), and the new tail of a chunk overlapping what was already streamed -- were decoded alone:
    a character split at their start came out as U+FFFD."""
    ids = tok.encode(TEXT, add_special_tokens=False)
    assert cut in _splits(tok, ids)
    texts = _engine_texts(tok, ids)
    head = [TokenChunk("r", i, (ids[i],), False, None, texts[i]) for i in range(cut)]
    # The destination resends [cut, cut + 3) without text (Instance.poll below ``before``), then streams on.
    resend = TokenChunk("r", cut, tuple(ids[cut : cut + 3]))
    rest = TokenChunk("r", cut + 3, tuple(ids[cut + 3 :]), True, "length", "".join(texts[cut + 3 :]))
    assert _accept_all(tok, [*head, resend, rest]) == TEXT
    # A chunk from two tokens back (a poll's answer sent again): the new tail only.
    overlap = TokenChunk("r", cut - 2, tuple(ids[cut - 2 :]), True, "length", "".join(texts[cut - 2 :]))
    assert _accept_all(tok, [*head, overlap]) == TEXT


@pytest.mark.parametrize("cut", [5, 10, 13, 19])
def test_vllm_resumed_stream_text_after_a_split_character(tok: HFTokenizer, cut: int) -> None:
    """A resumed engine stream (recovery, migration) decodes its new tokens after the last ones of its context
    (``VLLMBackend._resume_text_stream``); with the context ending inside a character, tokenizers' DecodeStream
    returned the whole primed text again (up to 8 tokens of text duplicated) with the completed character."""
    from scheduler.engine.base import EngineRequest
    from scheduler.engine.vllm_backend import VLLMBackend

    ids = tok.encode(TEXT, add_special_tokens=False)
    texts = _engine_texts(tok, ids)
    backend = object.__new__(VLLMBackend)
    backend.model_path, backend._tokenizer = Path(ensure_tiny_model()), None
    prompt = tok.encode("Hello", add_special_tokens=False)
    req = EngineRequest(
        "r", tuple(prompt + ids[:cut]), SamplingParams(max_tokens=100), num_output_tokens_before=cut
    )
    own_text = backend._resume_text_stream(req)
    assert own_text is not None
    tail = "".join(own_text((t,)) for t in ids[cut:])
    assert "".join(texts[:cut]) + tail == TEXT


# ---- deadlines ------------------------------------------------------------------------------------------------------
class _Statuses(NullRecorder):
    """Each finished request's status, as the servers report it to metrics."""

    def __init__(self) -> None:
        self.statuses: dict[str, RequestStatus] = {}

    def on_request_start(self, request_id: str, *, priority: int = 0, api: str = "grpc") -> str:
        return request_id

    def on_finish(self, request_id: str, *, status: RequestStatus, **kw: Any) -> None:
        self.statuses[request_id] = status


class _SlowTokenizer:
    """The tiny model's tokenizer, holding the event loop ``delay_s`` per encode (a long prompt, a busy host)."""

    def __init__(self, tok: HFTokenizer, delay_s: float) -> None:
        self.tok, self.delay_s = tok, delay_s

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        time.sleep(self.delay_s)
        return self.tok.encode(text, add_special_tokens)

    def decode(self, token_ids: Any) -> str:
        return self.tok.decode(token_ids)


def test_expired_deadline_is_deadline_exceeded_not_unavailable(tok: HFTokenizer) -> None:
    """A request whose deadline passed before the ingress admitted it was refused ``Unavailable`` (UNAVAILABLE /
    HTTP 503: "retry me", and counted as "no instance could serve it"), though no retry of it can succeed: it is
    DEADLINE_EXCEEDED / HTTP 504, final, counted with the requests whose deadline passed later (cancelled)."""
    ing = _ingress([FakeInstance("i0")], tokenizer=tok)
    late = GenerateRequest("late", prompt="hello", deadline_s=time.time() - 0.01)
    with pytest.raises(IngressError) as info:
        ing._validate(late, tuple(tok.encode("hello")))
    err = info.value
    assert status_for(err)[0] is grpc.StatusCode.DEADLINE_EXCEEDED
    http = http_error_for(err)
    assert http.status == 504 and http.headers == {"x-should-retry": "false"}
    assert request_status_for(err) is RequestStatus.CANCELLED

    # Over gRPC: the deadline passes while the prompt is tokenized (the loop held), before admission.
    inst = FakeInstance("i0")
    rec = _Statuses()
    with BackgroundServer(lambda: _ingress([inst], tokenizer=_SlowTokenizer(tok, 0.4)), recorder=rec) as srv:
        with Client(srv.address, retries=2) as c, pytest.raises(DeadlineExceeded):
            c.generate("hello", request_id="slow", max_tokens=4, timeout_s=0.2)
        assert wait_for(lambda: "slow" in rec.statuses)
        assert rec.statuses["slow"] is RequestStatus.CANCELLED
        assert inst.calls == [] and len(srv.ingress.registry) == 0


def test_deadline_passing_while_running_aborts_the_engine(tok: HFTokenizer) -> None:
    """A deadline that passes mid-stream: the client gets DEADLINE_EXCEEDED, the ingress aborts the request on its
    instance (its KV freed), forgets it, and the request is counted cancelled."""
    inst = FakeInstance("i0")
    rec = _Statuses()
    with BackgroundServer(lambda: _ingress([inst], tokenizer=tok), recorder=rec) as srv:
        with Client(srv.address) as c, pytest.raises(DeadlineExceeded):
            c.generate("hello", request_id="run", max_tokens=1000, timeout_s=0.3)
        assert wait_for(lambda: "run" in inst.aborted and len(srv.ingress.registry) == 0)
        assert wait_for(lambda: "run" in rec.statuses) and rec.statuses["run"] is RequestStatus.CANCELLED
        assert not inst.running("run")


# ---- HTTP usage -----------------------------------------------------------------------------------------------------
class _CountingTokenizer:
    def __init__(self, tok: HFTokenizer) -> None:
        self.tok, self.encodes = tok, 0

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        self.encodes += 1
        return self.tok.encode(text, add_special_tokens)

    def decode(self, token_ids: Any) -> str:
        return self.tok.decode(token_ids)


@pytest.mark.parametrize("stream", [False, True])
def test_http_usage_counts_the_prompt_the_ingress_tokenized(tok: HFTokenizer, stream: bool) -> None:
    """The usage's prompt_tokens came from a second encode of the prompt (``Ingress.prompt_tokens``, after the
    stream ended): a 16k-token prompt cost ~50 ms of tokenizer time twice. It is the ingress's own count now."""
    counting = _CountingTokenizer(tok)
    prompt = "the cache model stream " * 50
    n = len(tok.encode(prompt))

    async def scenario() -> httpx.Response:
        ing = _ingress([FakeInstance("i0")], tokenizer=counting)
        app = build_app(ing)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            body: dict[str, Any] = {"prompt": prompt, "max_tokens": 2}
            if stream:
                body |= {"stream": True, "stream_options": {"include_usage": True}}
            return await c.post("/v1/completions", json=body)

    r = asyncio.run(scenario())
    assert r.status_code == 200, r.text
    if stream:
        events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
        usage = events[-1]["usage"]
    else:
        usage = r.json()["usage"]
    assert usage == {"prompt_tokens": n, "completion_tokens": 2, "total_tokens": n + 2}
    assert counting.encodes == 1


class _SentencePieceLike:
    """A sentencepiece-style tokenizer (words carry their leading space as "▁", dropped at the start of a decode),
    built in place: decoded alone, a run of tokens loses its first word's space."""

    def __init__(self) -> None:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers

        words = ["<unk>", *(f"▁{w}" for w in ["hello", "world", "the", "cache", "model", "stream"])]
        self._tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
        self._tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
        self._tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self._tok.encode(text).ids)

    def decode(self, token_ids: Any) -> str:
        return str(self._tok.decode(list(token_ids)))


def test_resumed_text_keeps_a_word_boundary() -> None:
    """Sentencepiece words: the text of a resumed tail (gRPC ``resume_from_index``) or of tokens the ingress
    detokenizes (an instance's resend) lost the space before its first word ("hello worldthe cache")."""
    sp = _SentencePieceLike()
    text = "hello world the cache model stream"
    ids = sp.encode(text)
    assert sp.decode(ids) == text and sp.decode(ids[2:]) == "the cache model stream"
    ing = _TextIngress(sp, chunk=4, text=text)  # type: ignore[arg-type]
    with BackgroundServer(lambda: ing) as srv:
        for resume in (1, 2, 3):
            req = inference_pb2.GenerateRequest(text="x", request_id=f"sp{resume}")
            req.sampling.max_tokens = len(ids)
            req.resume_from_index = resume
            code, details, chunks = raw_generate(grpc.insecure_channel(srv.address), req.SerializeToString())
            assert code == grpc.StatusCode.OK, details
            assert "".join(ing.texts[:resume]) + "".join(c.text for c in chunks) == text
    head = [TokenChunk("r", i, (ids[i],), False, None, ing.texts[i]) for i in range(2)]
    resend = TokenChunk("r", 2, tuple(ids[2:]), True, "length")  # without text
    assert _accept_all(sp, [*head, resend]) == text  # type: ignore[arg-type]
