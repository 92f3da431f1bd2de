"""The SDK (``Client``, ``AsyncClient``) against a real loopback server with ``EchoIngress``."""

from __future__ import annotations

import asyncio
import random
import socket
import time
from dataclasses import dataclass, field

import grpc
import pytest

from scheduler._proto.llmsched.v1 import inference_pb2
from scheduler.client import (
    AsyncClient,
    Cancelled,
    Client,
    DeadlineExceeded,
    InvalidArgument,
    LLMSchedError,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    StreamGap,
    Unauthenticated,
    Unavailable,
)
from scheduler.client._common import StreamState
from scheduler.control.api import Unavailable as ControlUnavailable
from scheduler.core.types import InstanceRole
from scheduler.engine.base import TokenChunk
from scheduler.server.auth import AuthConfig
from scheduler.server.background import BackgroundServer
from scheduler.server.echo import EchoIngress
from tests.test_grpc_api import wait_for


@pytest.fixture(scope="module")
def srv():  # type: ignore[no-untyped-def]
    with BackgroundServer(lambda: EchoIngress(token_delay_s=0.001, max_model_len=4096)) as s:
        yield s


@pytest.fixture()
def client(srv):  # type: ignore[no-untyped-def]
    with Client(srv.address, timeout_s=10) as c:
        yield c


def _chunk(index: int, ids: list[int], finished: bool = False) -> inference_pb2.GenerateChunk:
    return inference_pb2.GenerateChunk(
        request_id="r",
        index=index,
        token_ids=ids,
        finished=finished,
        finish_reason="length" if finished else "",
    )


# ------------------------------------------------------------------------------------------- pure bookkeeping


def test_stream_state_drops_replayed_indices_and_trims_overlap() -> None:
    def seen(chunks):  # type: ignore[no-untyped-def]
        return [(c.index, c.token_ids, c.text, c.finished) for c in chunks]

    st = StreamState("r")
    assert seen(st.accept(_chunk(0, [1, 2]))) == [(0, (1,), "", False), (1, (2,), "", False)]
    assert st.accept(_chunk(0, [1])) == ()  # pure duplicate after a retry
    assert seen(st.accept(_chunk(1, [2, 3, 4]))) == [(2, (3,), "", False), (3, (4,), "", False)]  # overlap trimmed
    last = st.accept(_chunk(4, [], finished=True))
    assert seen(last) == [(4, (), "", True)] and last[0].finish_reason == "length" and st.next_index == 4


def test_stream_state_yields_one_chunk_per_token() -> None:
    """A message carrying several tokens (one ingress poll) becomes one chunk per token: ``index`` is the
    token's index; the text rides on the first; the last carries ``finished``."""
    st = StreamState("r")
    msg = inference_pb2.GenerateChunk(request_id="r", index=0, token_ids=[5, 6, 7], text="abc", finished=True,
                                      finish_reason="stop", instance_id="d0")
    out = st.accept(msg)
    assert [(c.index, c.token_ids, c.text) for c in out] == [(0, (5,), "abc"), (1, (6,), ""), (2, (7,), "")]
    assert [c.finished for c in out] == [False, False, True] and out[-1].finish_reason == "stop"
    assert {c.instance_id for c in out} == {"d0"} and st.finished and st.next_index == 3


def test_stream_state_detects_gap() -> None:
    st = StreamState("r")
    st.accept(_chunk(0, [1]))
    with pytest.raises(StreamGap) as info:
        st.accept(_chunk(2, [3]))
    assert info.value.code == grpc.StatusCode.DATA_LOSS and "expected index 1" in info.value.message


def test_prompt_type_checked_locally(client) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(TypeError):
        client.generate([1.5, 2])  # type: ignore[list-item]


# ------------------------------------------------------------------------------------------- Client


def test_generate_result(client) -> None:  # type: ignore[no-untyped-def]
    r = client.generate([7, 8, 9], max_tokens=5, request_id="sdk-1")
    assert r.token_ids == [7, 8, 9, 7, 8] and r.request_id == "sdk-1" and r.finish_reason == "length"
    assert [c.index for c in r.chunks] == [0, 1, 2, 3, 4]
    assert len(r.token_times) == 5 and r.token_times == sorted(r.token_times)
    assert 0 < r.ttft_s <= r.e2e_s and r.tpot_s is not None and r.attempts == 1
    assert client.generate("abc", max_tokens=4).text == "abca"


def test_stream_and_early_break_cancels(srv, client) -> None:  # type: ignore[no-untyped-def]
    stream = client.stream("x", max_tokens=3000, request_id="sdk-break")
    first = [next(stream) for _ in range(3)]
    assert [c.index for c in first] == [0, 1, 2]
    stream.close()  # what `break` in a for loop does
    deadline = time.monotonic() + 3
    while "sdk-break" not in srv.ingress.cancelled and time.monotonic() < deadline:
        time.sleep(0.01)
    assert "sdk-break" in srv.ingress.cancelled


def test_cancel_by_id(srv, client) -> None:  # type: ignore[no-untyped-def]
    stream = client.stream("x", max_tokens=3000, request_id="sdk-cancel")
    next(stream)
    assert client.cancel("sdk-cancel") is True
    assert list(stream)[-1].finish_reason == "abort"
    assert client.cancel("sdk-cancel") is False


def test_typed_errors(client) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InvalidArgument) as info:
        client.generate("x", top_p=0.0)
    assert info.value.field == "sampling.top_p" and info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(InvalidArgument) as info:
        client.generate([], max_tokens=2)
    assert info.value.field == "prompt.token_ids"
    with pytest.raises(DeadlineExceeded):
        client.generate("x", max_tokens=3000, timeout_s=0.2)
    with pytest.raises(NotFound) as nf:
        client.migrate("missing")
    assert nf.value.field == "request_id"


def test_overload_has_retry_after() -> None:
    with (
        BackgroundServer(lambda: EchoIngress(max_inflight=0)) as s,
        Client(s.address) as c,
        pytest.raises(ResourceExhausted) as info,
    ):
        c.generate("x")
    assert info.value.retry_after_s == 0.5


def test_retry_after_unavailable_resumes_without_duplicates() -> None:
    with BackgroundServer(lambda: EchoIngress(fail_once_after=4, chunk_tokens=3)) as s:
        with Client(s.address, retries=2) as c:
            r = c.generate([1, 2, 3, 4, 5], max_tokens=20, request_id="retry-1")
        assert r.attempts == 2
        assert r.token_ids == [[1, 2, 3, 4, 5][i % 5] for i in range(20)]
        flat = [c.index + k for c in r.chunks for k in range(len(c.token_ids))]
        assert flat == list(range(20))
        # Same idempotency key on both attempts, and the retry asked to resume where the first stopped.
        assert [q.request_id for q in s.ingress.requests] == ["retry-1", "retry-1"]
        with Client(s.address, retries=0) as c, pytest.raises(Unavailable) as info:
            c.generate([1], max_tokens=10, request_id="retry-2")
        assert info.value.request_id == "retry-2"


def test_server_down_retries_then_unavailable() -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens here now
    t = time.perf_counter()
    with Client(f"127.0.0.1:{port}", retries=2, timeout_s=5) as c, pytest.raises(Unavailable):
        c.cluster_state()
    assert time.perf_counter() - t < 4


def test_admin(srv, client) -> None:  # type: ignore[no-untyped-def]
    state = client.cluster_state()
    assert state.router == "echo" and [i.role for i in state.instances] == [InstanceRole.MIXED] * 2
    assert [i.instance_id for i in client.instances()] == ["echo-0", "echo-1"]
    assert client.scale("decode", 4) == 4 and srv.ingress.scaled["decode"] == 4
    assert client.drain("echo-0") == 0
    assert client.switch_role("echo-1", "decode") and srv.ingress.switched["echo-1"] is InstanceRole.DECODE
    assert not client.switch_role("echo-1", InstanceRole.DECODE)
    with pytest.raises(ValueError, match="sideways"):
        client.switch_role("echo-1", "sideways")  # refused before any RPC
    stream = client.stream("x", max_tokens=3000, request_id="sdk-mig")
    next(stream)
    m = client.migrate("sdk-mig", destination="echo-1")
    assert m.committed and m.destination == "echo-1"
    stream.close()


def test_auth_tokens() -> None:
    auth = AuthConfig.tokens(client="c-tok", admin="a-tok")
    with BackgroundServer(EchoIngress, auth=auth) as s:
        with Client(s.address) as c, pytest.raises(Unauthenticated):
            c.generate("x")
        with Client(s.address, token="c-tok") as c:
            assert c.generate("x", max_tokens=1).token_ids == [ord("x")]
            with pytest.raises(PermissionDenied):
                c.cluster_state()
        with Client(s.address, token="c-tok", admin_token="a-tok") as c:
            assert c.cluster_state().router == "echo"


# ------------------------------------------------------------------------------------------- AsyncClient


def test_async_client() -> None:
    with BackgroundServer(lambda: EchoIngress(token_delay_s=0.001, fail_once_after=2)) as s:

        async def main() -> None:
            async with AsyncClient(s.address, timeout_s=10) as c:
                r = await c.generate([4, 5], max_tokens=6, request_id="aio-1")
                assert r.token_ids == [4, 5, 4, 5, 4, 5] and r.attempts == 2
                seen = [ch.index async for ch in c.stream("ab", max_tokens=5)]
                assert seen == [0, 1, 2, 3, 4]
                results = await asyncio.gather(*(c.generate([i + 1], max_tokens=3) for i in range(20)))
                assert [res.token_ids for res in results] == [[i + 1] * 3 for i in range(20)]
                with pytest.raises(InvalidArgument) as info:
                    await c.generate("x", temperature=-1.0)
                assert info.value.field == "sampling.temperature"
                agen = c.stream("x", max_tokens=3000, request_id="aio-break")
                await agen.__anext__()
                await agen.aclose()
                assert (await c.cluster_state()).requests_in_flight >= 0
                assert await c.scale("prefill", 2) == 2
                assert await c.switch_role("echo-0", "prefill")
                with pytest.raises(LLMSchedError):
                    await c.drain("nope")

        asyncio.run(main())
        deadline = time.monotonic() + 3
        while "aio-break" not in s.ingress.cancelled and time.monotonic() < deadline:
            time.sleep(0.01)
        assert "aio-break" in s.ingress.cancelled


# -- an SDK audit's findings (twenty-ninth session); each failed before its fix ---------------------------------------


@dataclass
class _SampledEcho(EchoIngress):
    """An engine that samples: temperature > 0 without a seed draws fresh tokens on each attempt (a seed or greedy
    decoding repeats them, as vLLM's per-request seed does); the first attempt of each id fails after 4 tokens."""

    samples: dict = field(default_factory=dict)

    async def _stream(self, request):  # type: ignore[no-untyped-def,override]
        rid, sp = request.request_id, request.sampling
        attempt = self._attempts.get(rid, 0)
        self._attempts[rid] = attempt + 1
        rng = random.Random(sp.seed) if (sp.temperature == 0 or sp.seed is not None) else random.Random()
        toks = [rng.randrange(1, 1000) for _ in range(sp.max_tokens)]
        self.samples.setdefault(rid, []).append(toks)
        for i, t in enumerate(toks):
            await asyncio.sleep(0)
            if attempt == 0 and i == 4:
                raise ControlUnavailable("instance lost")
            done = i == len(toks) - 1
            yield TokenChunk(rid, i, (t,), finished=done, finish_reason="length" if done else None)


def test_a_retried_sampled_request_is_one_sample_not_two_spliced() -> None:
    """A retry re-runs the request from token 0: an unseeded sampled retry is a new sample, and the SDK glued its
    tail to the first attempt's head. generate() now starts over; stream() raises; greedy/seeded still resume."""
    with BackgroundServer(lambda: _SampledEcho()) as s, Client(s.address, retries=2, timeout_s=10) as c:
        r = c.generate("hello", max_tokens=10, request_id="sampled", temperature=0.8)
        assert r.token_ids == s.ingress.samples["sampled"][-1] and r.attempts == 2
        r = c.generate("hello", max_tokens=10, request_id="seeded", temperature=0.8, seed=7)
        assert r.token_ids == s.ingress.samples["seeded"][0] == s.ingress.samples["seeded"][1]
        with pytest.raises(Unavailable):
            list(c.stream("hello", max_tokens=10, request_id="sampled-stream", temperature=0.8))


def test_text_survives_a_resume_whose_chunks_split_differently() -> None:
    """The server blanked the text of a message straddling resume_from_index; chunk boundaries differ between
    attempts, so ``text`` lost characters the token ids still had."""

    class ChrTok:
        def decode(self, ids):  # type: ignore[no-untyped-def]
            return "".join(map(chr, ids))

    @dataclass
    class ReChunk(EchoIngress):
        tokenizer: object = field(default_factory=ChrTok)

        def _stream(self, request):  # type: ignore[no-untyped-def,override]
            self.chunk_tokens = 3 if self._attempts.get(request.request_id, 0) == 0 else 4
            return super()._stream(request)

    with BackgroundServer(lambda: ReChunk(fail_once_after=3)) as s, Client(s.address, timeout_s=10) as c:
        r = c.generate("abcdefghij", max_tokens=10, request_id="t1")
        assert r.attempts == 2 and r.text == "".join(map(chr, r.token_ids)) == "abcdefghij"


def test_tenant_round_trips_through_both_clients(srv, client) -> None:  # type: ignore[no-untyped-def]
    """``tenant=`` reaches the ingress from the sync and the async client; a bad one is named ``tenant``."""
    assert client.generate("abc", max_tokens=2, request_id="sdk-tenant", tenant="mooncake_conv").token_ids
    with client.stream([3], max_tokens=2, request_id="sdk-tenant-stream", tenant="azure_conv") as st:
        assert [ch.index for ch in st] == [0, 1]
    with pytest.raises(InvalidArgument) as info:
        client.generate("abc", tenant="t" * 129)
    assert info.value.field == "tenant"
    with pytest.raises(TypeError, match="^tenant: "):
        client.generate("abc", tenant=7)  # type: ignore[arg-type]

    async def main() -> None:
        async with AsyncClient(srv.address, timeout_s=10) as ac:
            await ac.generate([5], max_tokens=2, request_id="aio-tenant", tenant="arxiv_summarization")
            assert [ch.index async for ch in ac.stream([5], max_tokens=2, request_id="aio-tenant-stream",
                                                       tenant="x")] == [0, 1]

    asyncio.run(main())
    got = {r.request_id: r.tenant for r in srv.ingress.requests if "tenant" in r.request_id}
    assert got == {"sdk-tenant": "mooncake_conv", "sdk-tenant-stream": "azure_conv",
                   "aio-tenant": "arxiv_summarization", "aio-tenant-stream": "x"}
    assert client.generate("abc", max_tokens=2, request_id="sdk-no-tenant").token_ids
    assert next(r for r in srv.ingress.requests if r.request_id == "sdk-no-tenant").tenant is None


def test_a_field_has_its_wire_name_whichever_layer_rejects_it() -> None:
    with BackgroundServer(lambda: EchoIngress(max_model_len=64)) as s, Client(s.address, timeout_s=10) as c:
        fields = []
        for kw in ({"max_tokens": 0}, {"max_tokens": 100}):  # refused by validate.py, then by the ingress
            with pytest.raises(InvalidArgument) as e:
                c.generate("hello", **kw)
            fields.append(e.value.field)
        assert fields == ["sampling.max_tokens", "sampling.max_tokens"]


def test_closing_an_async_client_under_a_call_raises_cancelled_like_the_sync_one(srv) -> None:  # type: ignore[no-untyped-def]
    """A bare asyncio.CancelledError in a task nobody cancelled made gather()/TaskGroup treat it as cancelled."""

    async def main() -> BaseException | None:
        ac = AsyncClient(srv.address, timeout_s=10)
        t = asyncio.create_task(ac.generate("x" * 10, max_tokens=3000))
        await asyncio.sleep(0.2)
        await ac.close()
        try:
            await t
        except BaseException as e:  # noqa: BLE001 - the test inspects it
            assert not t.cancelled()
            return e
        return None

    assert isinstance(asyncio.run(main()), LLMSchedError)


def test_a_call_on_a_closed_client_raises_cancelled_not_grpcs_usage_error(srv) -> None:  # type: ignore[no-untyped-def]
    """grpc raised ValueError (sync) / UsageError (aio): outside ``except LLMSchedError``, so a shutdown race
    (a worker calling while the application closes the client) escaped the SDK's error handling."""
    c = Client(srv.address, timeout_s=10)
    c.close()
    for call in (lambda: c.generate("x"), lambda: list(c.stream("x")), c.instances, lambda: c.cancel("r")):
        with pytest.raises(Cancelled, match="client is closed"):
            call()

    async def main() -> list[BaseException]:
        ac = AsyncClient(srv.address, timeout_s=10)
        await ac.close()
        errors = []
        for call in (lambda: ac.generate("x"), ac.instances):
            try:
                await call()
            except BaseException as e:  # noqa: BLE001 - the test inspects it
                errors.append(e)
        try:
            async for _ in ac.stream("x"):
                pass
        except BaseException as e:  # noqa: BLE001 - the test inspects it
            errors.append(e)
        return errors

    errors = asyncio.run(main())
    assert len(errors) == 3 and all(isinstance(e, Cancelled) for e in errors), errors


def test_leaving_a_stream_block_cancels_even_while_the_iterator_is_referenced() -> None:
    with BackgroundServer(lambda: EchoIngress(token_delay_s=0.002, max_model_len=100000)) as s:
        with Client(s.address, timeout_s=30) as c:
            with c.stream("x", max_tokens=3000, request_id="held") as stream:
                for ch in stream:
                    if ch.index == 2:
                        break
            assert wait_for(lambda: "held" in s.ingress.cancelled)

        async def main() -> None:
            async with AsyncClient(s.address, timeout_s=30) as ac:
                async with ac.stream("x", max_tokens=3000, request_id="held-aio") as stream:
                    async for ch in stream:
                        if ch.index == 2:
                            break
                for _ in range(300):
                    if "held-aio" in s.ingress.cancelled:
                        return
                    await asyncio.sleep(0.01)
                raise AssertionError("not cancelled")

        asyncio.run(main())


def test_prompt_types_are_what_they_look_like(client) -> None:  # type: ignore[no-untyped-def]
    """bytes is a Sequence of ints: a binary-read prompt was sent as token ids; numpy ids were refused oddly."""
    np = pytest.importorskip("numpy")
    for bad in (b"Hi!", bytearray(b"Hi!"), [True, False], [1.0, 2.0]):
        with pytest.raises((InvalidArgument, TypeError, ValueError)):
            client.generate(bad, max_tokens=3)
    r = client.generate(list(np.array([5, 6], dtype=np.int64)), max_tokens=2)
    assert r.token_ids == [5, 6]


def test_retries_end_by_the_calls_deadline() -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    with Client(f"127.0.0.1:{port}", retries=8, timeout_s=0.3) as c:
        t = time.perf_counter()
        with pytest.raises(LLMSchedError):
            c.generate("x")
        assert time.perf_counter() - t < 0.45


def test_unary_errors_name_their_request(client) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(NotFound) as e:
        client.migrate("req-42")
    assert e.value.request_id == "req-42"


def test_drain_and_switch_role_are_not_retried() -> None:
    """Neither is idempotent: after a lost reply a retry finds the drain or switch under way and reports 0 moved /
    False. Like migrate, they surface the UNAVAILABLE instead (scale, which sets a size, is still retried)."""

    @dataclass
    class Flaky(EchoIngress):
        calls: dict = field(default_factory=dict)

        def _flaky(self, name: str) -> None:
            self.calls[name] = self.calls.get(name, 0) + 1
            if self.calls[name] == 1:
                raise ControlUnavailable(f"{name}: controller unavailable")

        async def drain(self, instance_id: str) -> int:  # type: ignore[override]
            self._flaky("drain")
            return await super().drain(instance_id)

        async def switch_role(self, instance_id: str, role: InstanceRole) -> bool:  # type: ignore[override]
            self._flaky("switch_role")
            return await super().switch_role(instance_id, role)

        async def scale(self, pool: str, count: int) -> int:  # type: ignore[override]
            self._flaky("scale")
            return await super().scale(pool, count)

    with BackgroundServer(lambda: Flaky()) as s, Client(s.address, retries=3, timeout_s=10) as c:
        with pytest.raises(Unavailable):
            c.drain("echo-0")
        with pytest.raises(Unavailable):
            c.switch_role("echo-1", InstanceRole.PREFILL)
        assert c.scale("mixed", 3) == 3
        assert s.ingress.calls == {"drain": 1, "switch_role": 1, "scale": 2}

        async def aio() -> None:
            async with AsyncClient(s.address, retries=3, timeout_s=10) as ac:
                with pytest.raises(Unavailable):
                    await ac.drain("echo-1")  # its first call: fails, not retried
        s.ingress.calls.pop("drain")
        asyncio.run(aio())
        assert s.ingress.calls["drain"] == 1


# ---- test-suite audit: the I/O-free helpers' promises (each names the mutant of ``_common.py`` it kills) ---------
def test_stream_state_replays_keep_the_finish_and_drop_the_runs_text() -> None:
    """A replayed message that only repeats tokens but finishes the stream still finishes it (kills returning ``()``
    for every pure duplicate: the caller never saw the end); a partly replayed message without text keeps its new
    tail (one with text is refused: ``test_loose_ends_audit35``); only the last chunk of a message carries its
    ``finish_reason`` (kills stamping it on every chunk)."""
    st = StreamState("r")
    first = st.accept(inference_pb2.GenerateChunk(request_id="r", index=0, token_ids=[1, 2], text="ab"))
    assert [c.text for c in first] == ["ab", ""] and [c.finish_reason for c in first] == [None, None]
    again = st.accept(inference_pb2.GenerateChunk(request_id="r", index=1, token_ids=[2, 3]))
    assert [(c.index, c.token_ids, c.text) for c in again] == [(2, (3,), "")]
    end = st.accept(inference_pb2.GenerateChunk(request_id="r", index=2, token_ids=[3], finished=True,
                                                finish_reason="stop"))
    assert [(c.index, c.token_ids, c.finished, c.finish_reason) for c in end] == [(3, (), True, "stop")]
    assert st.finished
    st = StreamState("r")
    out = st.accept(inference_pb2.GenerateChunk(request_id="r", index=0, token_ids=[5, 6, 7], finished=True,
                                                finish_reason="length"))
    assert [c.finish_reason for c in out] == [None, None, "length"]


def test_collect_times_one_entry_per_token() -> None:
    """``token_times`` has one arrival per token: the empty chunk that finishes a stream adds none (kills one entry
    per chunk)."""
    from scheduler.client._common import collect

    st = StreamState("r")
    chunks = [*st.accept(_chunk(0, [1, 2])), *st.accept(_chunk(2, [], finished=True))]
    res = collect("r", chunks, attempts=1, e2e_s=1.0)
    assert res.token_ids == [1, 2] and len(res.token_times) == 2 and res.finish_reason == "length"


def test_request_building_channel_and_auth_helpers() -> None:
    """``build_generate_request`` sends SLOs in ms (kills dropping ``* 1e3``), the length hint (kills dropping it)
    and an empty token list as an explicit (empty) ``token_ids`` so the server names that field (kills dropping
    ``SetInParent``: the request then had no prompt at all); ``channel_setup`` passes ``server_name`` as the TLS
    target override (kills dropping it); ``auth_metadata`` sends no header without a token (kills an empty
    ``Bearer``)."""
    from scheduler.client._common import ClientTLS, auth_metadata, build_generate_request, channel_setup

    req = build_generate_request("hi", request_id="r", ttft_slo_s=0.5, tpot_slo_s=0.02, length_hint=7)
    assert req.slo.ttft_ms == pytest.approx(500.0) and req.slo.tpot_ms == pytest.approx(20.0)
    assert req.HasField("length_hint") and req.length_hint == 7
    assert not build_generate_request("hi", request_id="r").HasField("length_hint")
    empty = build_generate_request([], request_id="r")
    assert empty.WhichOneof("prompt") == "token_ids" and list(empty.token_ids.ids) == []
    creds, opts = channel_setup(ClientTLS(server_name="llmsched.internal"), 1 << 20)
    assert creds is not None and ("grpc.ssl_target_name_override", "llmsched.internal") in opts
    assert ("grpc.max_send_message_length", 1 << 20) in opts
    assert channel_setup(None, None) == (None, [])
    assert auth_metadata(None) == () and auth_metadata("") == ()
    assert auth_metadata("tok") == (("authorization", "Bearer tok"),)


def test_backoff_retry_delay_and_remaining() -> None:
    """``backoff_s`` is capped at 2 s (kills dropping the cap: attempt 20 waited 14 hours) and waits at least the
    server's retry-after (kills ignoring it); ``retry_delay`` gives up when the wait would end past the deadline
    (kills never giving up); ``remaining`` is never negative (kills dropping the clamp: a negative timeout)."""
    from scheduler.client._common import backoff_s, remaining, retry_delay

    assert all(1.0 <= backoff_s(20) <= 2.0 for _ in range(20))
    assert backoff_s(0, retry_after_s=3.0) == 3.0
    now = time.monotonic()
    assert retry_delay(0, 1.0, now + 0.5) is None
    d = retry_delay(0, None, now + 60.0)
    assert d is not None and 0.025 <= d <= 0.05
    assert remaining(time.monotonic() - 5.0) == 0.0 and remaining(None) is None


def test_convert_rpc_error_ignores_a_malformed_retry_after() -> None:
    """A ``retry-after`` trailer that is not a number is ignored (``retry_after_s`` None), not read as 0 (kills
    replacing the ``pass``); a well-formed one and the field are carried over."""
    from scheduler.client._common import convert_rpc_error

    class Err(grpc.RpcError):
        def __init__(self, md: tuple[tuple[str, str], ...]) -> None:
            self.md = md

        def code(self) -> grpc.StatusCode:
            return grpc.StatusCode.UNAVAILABLE

        def details(self) -> str:
            return "busy"

        def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
            return self.md

    bad = convert_rpc_error(Err((("retry-after", "soon"),)), "r")
    assert bad.retry_after_s is None and bad.code == grpc.StatusCode.UNAVAILABLE and bad.request_id == "r"
    good = convert_rpc_error(Err((("retry-after", "1.5"), ("llmsched-field", "prompt"))))
    assert good.retry_after_s == 1.5 and good.field == "prompt"


def test_before_retry_of_a_sampled_request_with_nothing_delivered_retries() -> None:
    """An unseeded sampled request that failed before its first token is simply retried, stream or not: nothing
    was handed out, so there is nothing a new sample could contradict (kills raising whenever the request is not
    resumable)."""
    from scheduler.client._common import before_retry, build_generate_request

    req = build_generate_request("hi", request_id="r", temperature=0.8)
    st = StreamState("r")
    st.attempts = 1
    err = Unavailable(grpc.StatusCode.UNAVAILABLE, "down")
    assert before_retry(req, st, err, None, restart=False) > 0
    st.accept(_chunk(0, [1]))
    with pytest.raises(Unavailable):
        before_retry(req, st, err, None, restart=False)  # a token is out: a stream cannot take it back


def test_a_cancelled_generate_span_is_not_an_error() -> None:
    """The caller stopping an async stream (``CancelledError``) marks the client span "cancelled" without an error
    status (kills treating only ``GeneratorExit`` so: the span became an ERROR "cancellederror")."""
    from scheduler.client._common import end_generate_span

    class FakeSpan:
        def __init__(self) -> None:
            self.attrs: dict[str, object] = {}
            self.status: object = None
            self.ended = False

        def is_recording(self) -> bool:
            return True

        def set_attribute(self, k: str, v: object) -> None:
            self.attrs[k] = v

        def set_status(self, s: object) -> None:
            self.status = s

        def end(self) -> None:
            self.ended = True

    for err in (asyncio.CancelledError(), GeneratorExit()):
        span = FakeSpan()
        end_generate_span(span, StreamState("r"), err)  # type: ignore[arg-type]
        assert span.attrs["llmsched.status"] == "cancelled" and span.status is None and span.ended
    span = FakeSpan()
    end_generate_span(span, StreamState("r"), Unavailable(grpc.StatusCode.UNAVAILABLE, "down"))  # type: ignore[arg-type]
    assert span.attrs["llmsched.status"] == "unavailable" and span.status is not None


def test_an_admin_drain_lists_the_instance_leaving(capsys: pytest.CaptureFixture[str]) -> None:
    """An admin drain marks the instance ``leaving`` (``InstanceSnapshot.leaving``); ListInstances, the SDK's
    ``InstanceInfo`` and ``llmsched admin instances`` did not carry it, so an operator could not tell an admin
    drain (released once its requests moved) from a scale-down or role-switch one."""
    import json

    from scheduler.client._common import instance_from_proto
    from scheduler.client.admin import main as admin_main
    from scheduler.core.types import InstanceSnapshot
    from scheduler.server.convert import instance_to_proto

    for draining, leaving in ((False, False), (True, False), (True, True)):
        info = instance_from_proto(instance_to_proto(
            InstanceSnapshot(instance_id="i", role=InstanceRole.MIXED, draining=draining, leaving=leaving)))
        assert (info.draining, info.leaving) == (draining, leaving)
    with BackgroundServer(EchoIngress) as s:
        with Client(s.address) as c:
            assert not any(i.leaving for i in c.instances())
            assert c.drain("echo-1") == 0
            assert {i.instance_id: (i.draining, i.leaving) for i in c.instances()} == {
                "echo-0": (False, False), "echo-1": (True, True)}
        assert admin_main(["--target", s.address, "--json", "instances"]) == 0
        listed = {i["instance_id"]: i["leaving"] for i in json.loads(capsys.readouterr().out)}
        assert listed == {"echo-0": False, "echo-1": True}
        assert admin_main(["--target", s.address, "instances"]) == 0
        lines = capsys.readouterr().out.splitlines()
        assert [line.endswith("draining (leaving)") for line in lines] == [False, True], lines


def test_admin_cli_takes_its_options_after_the_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    """`llmsched admin instances --json` (as its help's first line reads) was "unrecognized arguments: --json":
    the connection and output options were the top-level parser's only. Either place works now; one given before
    the subcommand is not reset by the subcommand's own defaults."""
    import json

    from scheduler.client.admin import main as admin_main

    with BackgroundServer(EchoIngress) as s:
        assert admin_main(["instances", "--target", s.address, "--json"]) == 0
        assert sorted(i["instance_id"] for i in json.loads(capsys.readouterr().out)) == ["echo-0", "echo-1"]
        assert admin_main(["--json", "--target", s.address, "scale", "mixed", "3", "--timeout-s", "5"]) == 0
        assert json.loads(capsys.readouterr().out) == {"count": 3}


def test_admin_cli_switches_roles_migrates_and_shows_the_state(capsys: pytest.CaptureFixture[str]) -> None:
    """``llmsched admin`` had no way to re-role an instance, migrate a request or read the cluster's counters: the
    SDK had (``switch_role``, ``migrate``, ``cluster_state``), an operator's shell did not."""
    import asyncio
    import json

    from scheduler.client.admin import main as admin_main

    with BackgroundServer(EchoIngress) as s:
        t = ["--target", s.address]
        assert admin_main([*t, "switch-role", "echo-1", "prefill", "--wait", "--timeout-s", "5"]) == 0
        assert capsys.readouterr().out.strip() == "echo-1: serves as prefill"
        assert admin_main([*t, "--json", "switch-role", "echo-1", "prefill"]) == 0  # already: not started
        assert json.loads(capsys.readouterr().out) == {"started": False}
        assert admin_main([*t, "instances", "--json"]) == 0
        assert {i["instance_id"]: i["role"] for i in json.loads(capsys.readouterr().out)}["echo-1"] == "prefill"
        with pytest.raises(SystemExit) as e:  # prefill or decode only
            admin_main([*t, "switch-role", "echo-0", "mixed"])
        assert e.value.code == 2
        assert "invalid choice" in capsys.readouterr().err
        assert admin_main([*t, "migrate", "nope"]) == 1
        assert "request_id" in capsys.readouterr().err
        ing = s.ingress  # a request in flight to migrate
        ing._inflight["r1"] = asyncio.Event()
        assert admin_main([*t, "migrate", "r1", "--to", "echo-0", "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["committed"] is True
        assert admin_main([*t, "state", "--json"]) == 0
        state = json.loads(capsys.readouterr().out)
        assert state["router"] == "echo" and state["instances"] == 2 and state["counters"] == {"echo": 1.0}
