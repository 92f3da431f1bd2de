"""The SDK (``Client``, ``AsyncClient``) against a real loopback server with ``EchoIngress``."""

from __future__ import annotations

import asyncio
import socket
import time

import grpc
import pytest

from scheduler._proto.llmsched.v1 import inference_pb2
from scheduler.client import (
    AsyncClient,
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
from scheduler.core.types import InstanceRole
from scheduler.server.auth import AuthConfig
from scheduler.server.background import BackgroundServer
from scheduler.server.echo import EchoIngress


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
