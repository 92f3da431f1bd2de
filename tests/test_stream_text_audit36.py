"""Stream text decoded run by run (``engine.base.text_after``) joins to the text of all the ids, whatever the ids.

It decoded each run after the last 8 context ids: held back past them (9 or more tokens that decode only to U+FFFD,
a model's stray bytes), the U+FFFDs before the window were lost, and a window opening inside a character added one
of its own. Its callers (simulated backend, vLLM resumed stream, ingress, gRPC resume) cut the context to 8 ids
themselves; they pass all of it now.
"""

from __future__ import annotations

from itertools import pairwise
from pathlib import Path

import grpc
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from scheduler._proto.llmsched.v1 import inference_pb2
from scheduler.control.tokenizer import HFTokenizer
from scheduler.engine.base import EngineRequest, SamplingParams, TokenChunk, text_after
from scheduler.engine.simulated_backend import ByteTokenizer
from scheduler.engine.tiny_model import ensure_tiny_model
from scheduler.server.background import BackgroundServer
from tests.test_grpc_api import raw_generate
from tests.test_ingress_audit35 import _accept_all, _engine_texts, _TextIngress
from tests.test_loose_ends_audit35 import _backend, _stream

TOK = HFTokenizer(Path(ensure_tiny_model()) / "tokenizer.json")
VOCAB = TOK._tok.get_vocab_size()
LONE = [i for i in range(VOCAB) if TOK.decode([i]) == "\ufffd"]  # a byte that is no character alone
CONT = TOK.encode("é", add_special_tokens=False)[-1]  # a continuation byte: 12 of them are 12 U+FFFD
BYTES = ByteTokenizer(256)


def _joined(decode, ids: list[int], cuts: list[int]) -> str:
    """The stream's text: ``ids`` in runs split at ``cuts``, each decoded after the ids before it."""
    bounds = [0, *sorted(set(cuts)), len(ids)]
    return "".join(text_after(decode, ids[:a], ids[a:b]) for a, b in pairwise(bounds))


def _ids_and_cuts(ids: st.SearchStrategy[int]) -> st.SearchStrategy[tuple[list[int], list[int]]]:
    return st.lists(ids, min_size=1, max_size=48).flatmap(
        lambda xs: st.tuples(st.just(xs), st.lists(st.integers(1, max(len(xs) - 1, 1)), max_size=len(xs)))
    )


@settings(max_examples=300, deadline=None)
@given(_ids_and_cuts(st.one_of(st.sampled_from(LONE), st.integers(0, VOCAB - 1))))
@example(([CONT] * 12 + TOK.encode("A", add_special_tokens=False), list(range(1, 13))))
def test_tiny_tokenizer_stream_text_joins_to_the_whole_decode(case: tuple[list[int], list[int]]) -> None:
    """What a stream that ends on an incomplete or invalid tail never sends is that tail (held back)."""
    ids, cuts = case
    assert _joined(TOK.decode, ids, cuts) == TOK.decode(ids).rstrip("\ufffd")


@settings(max_examples=300, deadline=None)
@given(_ids_and_cuts(st.integers(0, 299)))  # ids past 255 decode to nothing (a larger vocabulary's)
@example(([0x80] * 10 + [0x41], list(range(1, 11))))  # 2 of the 10 U+FFFD lost
# The window opens inside a 2-byte character (0xDD 0xB9) and adds a U+FFFD of its own.
@example(([165, 140, 212, 165, 166, 204, 85, 176, 221, 185, 164, 225, 248, 155, 156, 144, 155, 150, 130, 148, 46],
          [3, 17]))
def test_simulator_byte_stream_text_joins_to_the_whole_decode(case: tuple[list[int], list[int]]) -> None:
    ids, cuts = case
    assert _joined(BYTES.decode, ids, cuts) == BYTES.decode(ids).rstrip("\ufffd")


@pytest.mark.parametrize("rid", ["r9", "r32"])
def test_simulated_backend_stream_text_past_a_run_of_stray_bytes(rid: str) -> None:
    """Under seed 0 these requests' 200 random bytes hold such a run: their streams joined off by U+FFFDs."""
    chunks = _stream(_backend(), EngineRequest(rid, tuple(b"hello "), SamplingParams(max_tokens=200, ignore_eos=True)))
    ids = [t for toks, _ in chunks for t in toks]
    assert "".join(text for _, text in chunks) == BYTES.decode(ids).rstrip("\ufffd")


STRAY = [CONT] * 12 + TOK.encode("ok then", add_special_tokens=False)
STRAY_TEXT = TOK.decode(STRAY)


def test_vllm_resumed_stream_text_after_stray_bytes() -> None:
    """A stream resumed (recovery, migration) right after 12 stray bytes, which the first engine held back."""
    from scheduler.engine.vllm_backend import VLLMBackend

    backend = object.__new__(VLLMBackend)
    backend.model_path, backend._tokenizer = Path(ensure_tiny_model()), None
    prompt = TOK.encode("Hello", add_special_tokens=False)
    req = EngineRequest("r", tuple(prompt + STRAY[:12]), SamplingParams(max_tokens=100), num_output_tokens_before=12)
    own_text = backend._resume_text_stream(req)
    assert own_text is not None
    texts = _engine_texts(TOK, STRAY)
    assert "".join(texts[:12]) == ""  # all held back
    assert "".join(own_text((t,)) for t in STRAY[12:]) == STRAY_TEXT


def test_ingress_text_of_resent_tokens_after_stray_bytes() -> None:
    """The ingress decodes tokens an instance resends without text after the outputs it has (``_accept``)."""
    texts = _engine_texts(TOK, STRAY)
    head = [TokenChunk("r", i, (STRAY[i],), False, None, texts[i]) for i in range(12)]
    resend = TokenChunk("r", 12, tuple(STRAY[12:]), True, "length")
    assert _accept_all(TOK, [*head, resend]) == STRAY_TEXT


class _StrayIngress(_TextIngress):
    def __init__(self) -> None:
        self.tokenizer, self.chunk, self.ids = TOK, len(STRAY), STRAY
        self.texts = _engine_texts(TOK, STRAY)


def test_grpc_resume_after_stray_bytes() -> None:
    """A retry resuming right after the stray bytes: the server decodes the kept tail after the ids it dropped."""
    with BackgroundServer(_StrayIngress) as srv:
        req = inference_pb2.GenerateRequest(text="x", request_id="r")
        req.sampling.max_tokens = len(STRAY)
        req.resume_from_index = 12
        code, details, chunks = raw_generate(grpc.insecure_channel(srv.address), req.SerializeToString())
        assert code == grpc.StatusCode.OK, details
        assert "".join(srv.ingress.texts[:12]) + "".join(c.text for c in chunks) == STRAY_TEXT
