"""SDK audit (a helper): each test failed before its fix; ``Client`` / ``AsyncClient`` against a real loopback server
with ``EchoIngress`` where a server is needed."""

from __future__ import annotations

import asyncio
import math
import threading
import time

import pytest

from scheduler.client import AsyncClient, Cancelled, Client, ClientTLS
from scheduler.server.background import BackgroundServer
from scheduler.server.echo import EchoIngress
from tests.test_grpc_api import _self_signed


class _SlowCancelEcho(EchoIngress):
    """An ingress whose Cancel takes a while (an engine abort over Ray): a unary call stays in flight."""

    async def cancel(self, request_id: str) -> bool:
        await asyncio.sleep(3)
        return await super().cancel(request_id)


@pytest.fixture(scope="module")
def srv():  # type: ignore[no-untyped-def]
    with BackgroundServer(lambda: _SlowCancelEcho(token_delay_s=0.001)) as s:
        yield s


def test_half_mtls_client_tls_is_a_value_error_not_a_process_abort() -> None:
    """A key without its chain (or the reverse) made grpc's C core abort the interpreter (a failed CHECK in
    grpc_tls_certificate_distributor.cc) when ``Client``/``AsyncClient`` built the channel: no exception, the
    whole process gone (so this checks ClientTLS itself: the old code would take the test run down)."""
    cert, key = _self_signed()
    with pytest.raises(ValueError, match="certificate_chain is missing"):
        ClientTLS(root_certificates=cert, private_key=key)
    with pytest.raises(ValueError, match="private_key is missing"):
        ClientTLS(certificate_chain=cert)
    ClientTLS(root_certificates=cert, private_key=key, certificate_chain=cert)  # full mTLS material is fine


def test_non_pem_tls_material_is_refused_naming_the_field(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Non-PEM bytes (a DER file, a path passed as bytes) reached grpc, whose answer was UNAVAILABLE "Failed to
    create security handshaker" after every retry: nothing named the field at fault."""
    cert, key = _self_signed()
    with pytest.raises(ValueError, match="root_certificates must be PEM"):
        ClientTLS(root_certificates=b"/etc/ssl/ca.crt")
    with pytest.raises(ValueError, match="private_key must be PEM"):
        ClientTLS(root_certificates=cert, private_key=b"\x30\x82junk", certificate_chain=cert)
    with pytest.raises(ValueError, match="certificate_chain must be PEM.*got str"):
        ClientTLS(private_key=key, certificate_chain=cert.decode())  # type: ignore[arg-type]
    (tmp_path / "cert.pem").write_bytes(cert)
    with pytest.raises(ValueError, match="certificate_chain is missing"):
        ClientTLS.from_files(ca=tmp_path / "cert.pem", key=tmp_path / "cert.pem")


@pytest.mark.parametrize("token", ["c-tok\n", "c tok", "t\u00f6k"])
def test_an_unsendable_token_is_a_value_error_at_construction(token: str) -> None:
    """A token with whitespace or outside printable ASCII (typically a file's trailing newline) made every call
    fail with INTERNAL "Invalid metadata" (grpc refuses the header), naming nothing; the servers refuse such tokens
    at construction (AuthConfig), so the client does too, naming its argument."""
    with pytest.raises(ValueError, match="^token: a bearer token must be printable ASCII"):
        Client("127.0.0.1:1", token=token)
    with pytest.raises(ValueError, match="^admin_token: "):
        Client("127.0.0.1:1", token="c-tok", admin_token=token)

    async def main() -> None:
        with pytest.raises(ValueError, match="^token: "):
            AsyncClient("127.0.0.1:1", token=token)
        with pytest.raises(ValueError, match="^admin_token: "):
            AsyncClient("127.0.0.1:1", admin_token=token)

    asyncio.run(main())


@pytest.mark.parametrize("bad", [0, -1.0, math.inf, math.nan])
def test_a_timeout_that_is_no_deadline_is_a_value_error(bad: float) -> None:
    """``timeout_s=-1`` (a deadline already past) ran calls as if there were none (cluster_state answered OK on a
    loopback server every time; ``0`` mostly) while ``math.inf`` failed every call DEADLINE_EXCEEDED at
    once: both are refused, per client and per call, sync and async alike."""
    with pytest.raises(ValueError, match="^timeout_s: must be a finite number of seconds > 0"):
        Client("127.0.0.1:1", timeout_s=bad)
    with Client("127.0.0.1:1", timeout_s=5) as c:
        for call in (
            lambda: c.cluster_state(timeout_s=bad),
            lambda: c.stream("x", timeout_s=bad),
            lambda: c.generate("x", timeout_s=bad),
            lambda: c.cancel("r", timeout_s=bad),
        ):
            with pytest.raises(ValueError, match="^timeout_s: "):
                call()

    async def main() -> None:
        with pytest.raises(ValueError, match="^timeout_s: "):
            AsyncClient("127.0.0.1:1", timeout_s=bad)
        async with AsyncClient("127.0.0.1:1", timeout_s=5) as ac:
            with pytest.raises(ValueError, match="^timeout_s: "):
                await ac.instances(timeout_s=bad)
            with pytest.raises(ValueError, match="^timeout_s: "):
                ac.stream("x", timeout_s=bad)
            with pytest.raises(ValueError, match="^timeout_s: "):
                await ac.generate("x", timeout_s=bad)

    asyncio.run(main())


def test_an_async_unary_call_cut_off_by_close_names_its_request(srv) -> None:  # type: ignore[no-untyped-def]
    """``AsyncClient.cancel`` cut off by ``close()`` raised ``Cancelled`` with ``request_id`` None (the sync client,
    and the async one's streams, name it): the handler of the channel-cancel path was passed None."""
    c = Client(srv.address, timeout_s=10)
    threading.Timer(0.3, c.close).start()
    with pytest.raises(Cancelled) as sync_err:
        c.cancel("sync-rid")

    async def main() -> BaseException:
        ac = AsyncClient(srv.address, timeout_s=10)
        t = asyncio.create_task(ac.cancel("aio-rid"))
        await asyncio.sleep(0.3)
        await ac.close()
        with pytest.raises(Cancelled) as info:
            await t
        return info.value

    assert sync_err.value.request_id == "sync-rid"
    assert asyncio.run(main()).request_id == "aio-rid"


def test_stream_times_count_from_the_send_not_from_building_the_stream(srv) -> None:  # type: ignore[no-untyped-def]
    """``stream()`` sends the request at the first ``next()``, but ``arrival_s`` (documented as seconds since the
    request was sent) counted from the ``stream()`` call: a stream iterated 0.5 s later reported a first token
    0.5 s late. The deadline already counted from the send."""
    with Client(srv.address, timeout_s=10) as c:
        s = c.stream("x", max_tokens=2)
        time.sleep(0.5)
        with s:
            first = next(s)
    assert first.arrival_s < 0.4, first.arrival_s

    async def main() -> float:
        async with AsyncClient(srv.address, timeout_s=10) as ac:
            s = ac.stream("x", max_tokens=2)
            await asyncio.sleep(0.5)
            async with s:
                return (await s.__anext__()).arrival_s

    assert asyncio.run(main()) < 0.4


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"max_tokens": 1 << 31}, "max_tokens"),
        ({"priority": -(1 << 31) - 1}, "priority"),
        ({"seed": 1 << 63}, "seed"),
        ({"length_hint": 1 << 63}, "length_hint"),
        ({"top_k": 1 << 31}, "top_k"),
        ({"stop_token_ids": [1, 1 << 31]}, "stop_token_ids"),
        ({"temperature": "0.7"}, "temperature"),
        ({"max_tokens": 1.5}, "max_tokens"),
    ],
)
def test_a_value_protobuf_refuses_names_its_keyword(kwargs: dict, named: str) -> None:  # type: ignore[type-arg]
    """A value outside the wire's int32/int64 range, or of the wrong type, raised protobuf's own error, which names
    no field ("Value out of range: 2147483648"): the caller could not tell which keyword was at fault."""
    with Client("127.0.0.1:1") as c, pytest.raises((ValueError, TypeError), match=f"^{named}: "):
        c.generate("x", **kwargs)
    with (
        Client("127.0.0.1:1") as c,
        pytest.raises(ValueError, match=r"^prompt\[2\]: token id 4294967296 is outside"),
    ):
        c.stream([1, 2, 1 << 32])
