"""A direct ingress <-> Instance channel for the per-token hot path: framed pickle over one TCP connection.

Why not only Ray actor calls: on the 2-core CI machine one Ray async-actor round trip costs ~1.3-1.9 ms p50 and
about as much CPU split over both processes, and the hot path pays one per streamed chunk (the long poll) plus one
for TTFT (submit). The same round trip over an already-open asyncio TCP connection costs ~0.1 ms. Llumnix made the
same move for its token outputs (a ZeroMQ queue beside Ray). Ray stays the control plane and the source of truth
for liveness: every call that fails on the channel is retried once over Ray by the caller, which then sees
``RayActorError`` if the actor is really gone (``Ingress._call``).

Only the methods an Instance exports (``submit`` without KV, ``poll``, ``abort``, ``snapshot``) are callable; the
KV paths (P/D handoff, migration) keep passing ``ObjectRef``s through Ray so the blocks move node to node.

Wire format: 4-byte big-endian length + pickle. The first frame of a connection is the instance's token (raw bytes,
never unpickled); a peer that does not present it is dropped before anything is unpickled. The token travels
inside ``InstanceInfo`` through Ray, so the channel is exactly as trusted as the Ray cluster itself.
Request frame: ``(call_id, method, args, kwargs)``; reply: ``(call_id, ok, value)``, value the result or, when
``ok`` is false, the error's text.
"""

from __future__ import annotations

import asyncio
import hmac
import itertools
import logging
import pickle
import struct
from collections.abc import Awaitable, Callable
from typing import Any

log = logging.getLogger(__name__)

_LEN = struct.Struct("!I")
CONNECT_TIMEOUT_S = 1.0  # same node or same cluster network: a connect that takes longer will not work
MAX_FRAME = 64 << 20  # a snapshot of a busy instance is tens of KiB; refuse anything absurd


class ChannelError(ConnectionError):
    """The channel could not carry the call (not connected, refused, closed mid-call). Retry over Ray."""


class RemoteError(RuntimeError):
    """The called method raised on the instance (the message is the remote error's type and text)."""


async def _read_frame(reader: asyncio.StreamReader) -> bytes:
    (n,) = _LEN.unpack(await reader.readexactly(_LEN.size))
    if n > MAX_FRAME:
        raise ChannelError(f"frame of {n} bytes exceeds {MAX_FRAME}")
    return await reader.readexactly(n)


def _frame(payload: bytes) -> bytes:
    return _LEN.pack(len(payload)) + payload


class ChannelServer:
    """Serves ``methods`` (name -> coroutine function) to authenticated peers on the running event loop."""

    def __init__(self, methods: dict[str, Callable[..., Awaitable[Any]]], token: str) -> None:
        self.methods = methods
        self._token = token.encode()
        self._server: asyncio.Server | None = None
        self._conns: set[asyncio.StreamWriter] = set()
        self.address = ""
        self.drop_next: str | None = None  # fault injection: the next reply of this method closes the connection

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        self._server = await asyncio.start_server(self._serve, host, port)
        sock_host, sock_port = self._server.sockets[0].getsockname()[:2]
        self.address = f"{sock_host}:{sock_port}"
        return self.address

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for w in list(self._conns):
            w.close()
        self._conns.clear()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            token = await asyncio.wait_for(_read_frame(reader), 5.0)
        except (TimeoutError, asyncio.IncompleteReadError, ChannelError, OSError):
            writer.close()
            return
        if not hmac.compare_digest(token, self._token):
            log.warning("channel: peer %s presented a wrong token; dropped", writer.get_extra_info("peername"))
            writer.close()
            return
        self._conns.add(writer)
        tasks: set[asyncio.Task[None]] = set()
        try:
            while True:
                call_id, method, args, kwargs = pickle.loads(await _read_frame(reader))
                # Each call in its own task: long polls of many requests share the connection.
                t = asyncio.create_task(self._answer(writer, call_id, method, args, kwargs))
                tasks.add(t)
                t.add_done_callback(tasks.discard)
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            pass  # the peer went away; its requests' leases expire on the instance as for a dead ingress
        finally:
            self._conns.discard(writer)
            for t in tasks:
                t.cancel()
            writer.close()

    async def _answer(self, writer: asyncio.StreamWriter, call_id: int, method: str, args: Any, kwargs: Any) -> None:
        fn = self.methods.get(method)
        try:
            if fn is None:
                raise AttributeError(f"channel: no method {method!r}")
            reply = (call_id, True, await fn(*args, **kwargs))
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - reported to the caller, as Ray would
            reply = (call_id, False, f"{type(e).__name__}: {e}")
        if self.drop_next == method:  # as if the connection broke after the call ran, before its reply arrived
            self.drop_next = None
            writer.transport.abort()
            return
        if not writer.is_closing():
            # Small frames; the transport buffers them (no drain: concurrent answers share one writer).
            writer.write(_frame(pickle.dumps(reply, protocol=pickle.HIGHEST_PROTOCOL)))


class ChannelClient:
    """One connection to one instance, multiplexing concurrent calls. Bound to the event loop that first uses it;
    after any failure it is closed for good (the caller makes a new one)."""

    def __init__(self, address: str, token: str) -> None:
        self.address = address
        self._token = token.encode()
        self._ids = itertools.count()
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._connecting: asyncio.Task[None] | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.closed = False

    async def _connect(self) -> None:
        host, _, port = self.address.rpartition(":")
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, int(port)), CONNECT_TIMEOUT_S)
        writer.write(_frame(self._token))
        self._writer = writer
        self._reader_task = asyncio.create_task(self._read(reader))

    async def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        if self.closed:
            raise ChannelError(f"channel to {self.address} is closed")
        if self._writer is None:
            if self._connecting is None:
                self.loop = asyncio.get_running_loop()
                self._connecting = asyncio.create_task(self._connect())
            try:
                await asyncio.shield(self._connecting)
            except Exception as e:  # refused, timed out, bad address: all mean "use Ray"
                self.close()
                raise ChannelError(f"connect {self.address}: {type(e).__name__}: {e}") from e
        if self.closed or self._writer is None:  # failed while we waited for the connection: nothing would answer
            raise ChannelError(f"channel to {self.address} is closed")
        call_id = next(self._ids)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[call_id] = fut  # from here on a failure of the connection fails this future too
        try:
            self._writer.write(_frame(pickle.dumps((call_id, method, args, kwargs), protocol=pickle.HIGHEST_PROTOCOL)))
            return await fut
        finally:
            self._pending.pop(call_id, None)  # also on timeout/cancel: a late reply is dropped

    async def _read(self, reader: asyncio.StreamReader) -> None:
        err: Exception = ChannelError(f"channel to {self.address} closed by the peer")
        try:
            while True:
                call_id, ok, value = pickle.loads(await _read_frame(reader))
                fut = self._pending.get(call_id)
                if fut is not None and not fut.done():
                    if ok:
                        fut.set_result(value)
                    else:
                        fut.set_exception(RemoteError(value))
        except (asyncio.IncompleteReadError, ConnectionError, OSError) as e:
            err = ChannelError(f"channel to {self.address}: {type(e).__name__}: {e}")
        except asyncio.CancelledError:
            err = ChannelError(f"channel to {self.address} closed")
            raise
        finally:
            self._fail_all(err)

    def _fail_all(self, err: Exception) -> None:
        self.closed = True
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(err)
        self._pending.clear()
        if self._writer is not None:
            self._writer.close()

    def close(self) -> None:
        if self._reader_task is not None and not self._reader_task.done():
            self._reader_task.cancel()
        self._fail_all(ChannelError(f"channel to {self.address} closed"))
