"""Regressions for loose ends other audits of session 35 found: the simulated backend's streamed text, the SDK's
resumed-stream text, a predictor tenant the trace does not know, and UNAVAILABLE's retry hint."""

from __future__ import annotations

import asyncio
import threading

import grpc
import pytest

from scheduler._proto.llmsched.v1.inference_pb2 import GenerateChunk
from scheduler.client import Client
from scheduler.client._common import StreamState
from scheduler.client.types import StreamGap
from scheduler.config.models import GPUSpec, ModelSpec, PolicySpec
from scheduler.control.api import Unavailable
from scheduler.control.ingress import Ingress
from scheduler.control.registry import RequestRecord
from scheduler.core.types import ClusterView, InstanceRole, InstanceSnapshot
from scheduler.engine.base import EngineRequest, SamplingParams
from scheduler.engine.simulated_backend import ByteTokenizer, SimulatedBackend, sim_token
from scheduler.predict.serving import serving_predictor
from scheduler.server.background import BackgroundServer
from scheduler.server.grpc_server import status_for
from scheduler.server.http_server import http_error_for
from tests.test_ingress_audit import FakeInstance, _ingress

# ---- the simulated backend's text -----------------------------------------------------------------------------------
# A byte-vocabulary model, so that every simulated token is a UTF-8 byte (a larger vocabulary's ids past 255 decode
# to nothing): "r4"'s 24 outputs under seed 0 hold two 2-byte characters and end on a whole one.
BYTES_MODEL = ModelSpec(
    name="bytes",
    num_layers=2,
    hidden_size=64,
    num_heads=4,
    num_kv_heads=4,
    intermediate_size=128,
    vocab_size=256,
)
RID, N_OUT = "r4", 24
PROMPT = tuple(b"hello ")


def _stream(backend: SimulatedBackend, request: EngineRequest) -> list[tuple[tuple[int, ...], str]]:
    async def run() -> list[tuple[tuple[int, ...], str]]:
        return [(c.token_ids, c.text) async for c in backend.generate(request)]

    return asyncio.run(_started(backend, run))


async def _started(backend: SimulatedBackend, run):
    await backend.start()
    try:
        return await run()
    finally:
        await backend.shutdown()


def _backend() -> SimulatedBackend:
    return SimulatedBackend(BYTES_MODEL, GPUSpec.from_catalog("h100"), time_scale=0.0)


def test_the_fixture_output_has_multibyte_characters() -> None:
    ids = [sim_token(0, RID, i, 256) for i in range(N_OUT)]
    text = ByteTokenizer(256).decode(ids)
    assert any(ord(c) > 127 and c != "\ufffd" for c in text) and not text.endswith("\ufffd")
    # Each byte alone decodes to U+FFFD: what the backend streamed for them.
    assert "".join(ByteTokenizer(256).decode((t,)) for t in ids) != text


def test_simulated_stream_text_joins_to_the_decoded_output() -> None:
    """The simulated backend decoded each token alone: a 2-byte character came out as two U+FFFD."""
    chunks = _stream(
        _backend(), EngineRequest(RID, PROMPT, SamplingParams(max_tokens=N_OUT, ignore_eos=True))
    )
    ids = [t for toks, _ in chunks for t in toks]
    assert len(ids) == N_OUT
    assert "".join(text for _, text in chunks) == ByteTokenizer(256).decode(ids)


def test_simulated_resumed_stream_text_joins_across_a_split_character() -> None:
    """A request resumed elsewhere (P->D handoff, migration) between the two bytes of a character: the first leg
    holds the incomplete character back, the second streams it whole with the byte that completes it."""
    tok = ByteTokenizer(256)
    ids = [sim_token(0, RID, i, 256) for i in range(N_OUT)]
    cut = next(
        n for n in range(1, N_OUT) if tok.decode(ids[:n]).endswith("\ufffd") and 0xC2 <= ids[n - 1] <= 0xDF
    )
    sp = SamplingParams(max_tokens=cut, ignore_eos=True)
    first = _stream(_backend(), EngineRequest(RID, PROMPT, sp))
    resumed = EngineRequest(
        RID,
        PROMPT + tuple(ids[:cut]),
        SamplingParams(max_tokens=N_OUT - cut, ignore_eos=True),
        num_output_tokens_before=cut,
    )
    second = _stream(_backend(), resumed)
    assert [t for toks, _ in first + second for t in toks] == ids
    assert "".join(text for _, text in first + second) == tok.decode(ids)


# ---- the SDK's resumed stream ---------------------------------------------------------------------------------------
def test_sdk_refuses_a_replay_whose_text_covers_tokens_it_already_has() -> None:
    """A resumed stream whose server (or proxy) re-sends a run the client half has: its text belongs to the whole
    run, and the SDK set the new tail's text to "" -- ``c`` was lost from the output without a word. Now it is
    a ``StreamGap`` (DATA_LOSS) naming the replayed indices; a replay without text still keeps its tail."""
    st = StreamState("r")
    assert [
        c.text for c in st.accept(GenerateChunk(request_id="r", index=0, token_ids=[1, 2], text="ab"))
    ] == [
        "ab",
        "",
    ]
    with pytest.raises(StreamGap) as info:
        st.accept(GenerateChunk(request_id="r", index=1, token_ids=[2, 3], text="bc"))
    assert info.value.code == grpc.StatusCode.DATA_LOSS and "indices 1..1" in info.value.message
    assert st.next_index == 2  # nothing taken from the refused message
    tail = st.accept(GenerateChunk(request_id="r", index=1, token_ids=[2, 3]))
    assert [(c.index, c.token_ids, c.text) for c in tail] == [(2, (3,), "")]
    assert (
        st.accept(GenerateChunk(request_id="r", index=0, token_ids=[1, 2, 3], text="abc")) == ()
    )  # duplicate


# ---- a predictor tenant its artifacts do not know -------------------------------------------------------------------
def test_a_predictor_tenant_the_artifacts_do_not_know_is_refused_naming_the_field() -> None:
    """``tenant: azure_cnv`` (a typo) predicted every request from the tenants' pooled mix, the same as naming no
    tenant, without a word. Refused where the artifacts load (as a missing ``artifacts`` is), listing the known."""
    with pytest.raises(
        ValueError, match=r"policies\.predictor\.params\.tenant: 'azure_cnv' .*known: .*azure_conv"
    ):
        serving_predictor(PolicySpec(name="trace", params={"tenant": "azure_cnv"}))
    assert serving_predictor(PolicySpec(name="trace", params={"tenant": "azure_conv"})).tenant == "azure_conv"
    # `default`: the trace fallback's tenants and the text predictor's (generating models) both condition it.
    for tenant in ("azure_conv", "gpt4"):
        assert serving_predictor(PolicySpec(name="default", params={"tenant": tenant})).tenant == tenant
    with pytest.raises(ValueError, match=r"policies\.predictor\.params\.tenant: 'azure_conv' .*ngram"):
        serving_predictor(PolicySpec(name="ngram", params={"tenant": "azure_conv"}))


# ---- UNAVAILABLE's retry hint ---------------------------------------------------------------------------------------
def test_a_request_arriving_while_no_instance_is_up_waits_for_the_replacement() -> None:
    """A cluster with no live instance for 0.6 s (the Controller replacing a dead one takes ~1-2 s): the ingress's
    UNAVAILABLE carried no retry-after, so the SDK's two retries (25-50 ms, then 50-100 ms) were spent before any
    instance was back and the request failed. With the hint (gRPC trailer, HTTP header) they wait for it."""
    inst = FakeInstance("i0")
    with BackgroundServer(lambda: _ingress([inst], routable=[])) as srv:
        ing = srv.ingress
        err = _unavailable(ing)
        code, _, md = status_for(err)
        assert code is grpc.StatusCode.UNAVAILABLE and ("retry-after", "1") in md
        assert http_error_for(err).headers == {"Retry-After": "1"}
        back = threading.Timer(
            0.6,
            lambda: setattr(ing, "_view", ClusterView(0.0, (InstanceSnapshot("i0", InstanceRole.MIXED),))),
        )
        back.start()
        try:
            with Client(srv.address, retries=2) as c:
                res = c.generate("hello", request_id="outage", max_tokens=3, timeout_s=10)
        finally:
            back.cancel()
        assert res.token_ids == [7, 7, 7] and res.attempts >= 2


def _unavailable(ing: Ingress) -> Unavailable:
    async def route() -> None:
        ing._route(RequestRecord("x", (1, 2), SamplingParams()))

    with pytest.raises(Unavailable) as info:
        asyncio.run(route())
    return info.value
