"""Run a gRPC server (and optionally the HTTP app) on its own event-loop thread.

For tests, benches and embedding a server beside blocking code (the SDK's ``Client`` is blocking)::

    with BackgroundServer(lambda: EchoIngress()) as srv:
        Client(srv.address).generate("hi")
        srv.call(srv.ingress.cancel("id"))  # run a coroutine on the server's loop
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Awaitable, Callable
from concurrent.futures import Future
from typing import Any, Self, TypeVar

from scheduler.control.api import IngressAPI
from scheduler.server.admission import InflightLimiter
from scheduler.server.auth import AuthConfig
from scheduler.server.grpc_server import DEFAULT_MAX_MESSAGE_BYTES, GrpcServer, build_server
from scheduler.telemetry.metrics import Recorder
from scheduler.telemetry.tracing import Tracing

T = TypeVar("T")


class BackgroundServer:
    """A started server on ``127.0.0.1`` (ports picked by the OS) whose loop runs in a daemon thread.

    Args:
        ingress_factory: called on the server loop (asyncio objects must be created there).
        auth: tokens / TLS for both servers.
        http: also serve the OpenAI-compatible HTTP app (``.http_port``).
        recorder, tracing, limiter: shared by both servers (see ``build_server``).
    """

    def __init__(
        self,
        ingress_factory: Callable[[], IngressAPI],
        *,
        auth: AuthConfig | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        http: bool = False,
        host: str = "127.0.0.1",
        recorder: Recorder | None = None,
        tracing: Tracing | None = None,
        limiter: InflightLimiter | None = None,
    ) -> None:
        self._factory = ingress_factory
        self.recorder, self.tracing, self.limiter = recorder, tracing, limiter
        self._auth = auth
        self._max = max_message_bytes
        self._http = http
        self.host = host
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="llmsched-server", daemon=True)
        self.ingress: Any = None
        self.grpc: GrpcServer | None = None
        self.http_port: int | None = None
        self._uvicorn: Any = None
        self._http_task: asyncio.Task[Any] | None = None

    @property
    def port(self) -> int:
        assert self.grpc is not None, "server not started"
        return self.grpc.port

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def call(self, coro: Awaitable[T], timeout: float | None = 10.0) -> T:
        """Run a coroutine on the server loop and wait for its result."""
        fut: Future[T] = asyncio.run_coroutine_threadsafe(coro, self.loop)  # type: ignore[arg-type]
        return fut.result(timeout)

    def start(self) -> BackgroundServer:
        self._thread.start()
        self.call(self._start())
        return self

    async def _start(self) -> None:
        # HTTP is TLS iff gRPC is (checked first: TLS from bytes cannot reach uvicorn, which reads files).
        tls = self._auth.uvicorn_kwargs() if self._http and self._auth is not None else {}
        self.ingress = self._factory()
        self.grpc = build_server(
            self.ingress, port=0, host=self.host, auth=self._auth, max_message_bytes=self._max,
            recorder=self.recorder, tracing=self.tracing, limiter=self.limiter,
        )
        await self.grpc.start()
        if self._http:
            import uvicorn  # NOTE: lazy: only HTTP users need uvicorn/fastapi

            from scheduler.server.http_server import build_app

            app = build_app(
                self.ingress, auth=self._auth, max_body_bytes=self._max,
                recorder=self.recorder, tracing=self.tracing, limiter=self.limiter,
            )
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, 0))
            self.http_port = sock.getsockname()[1]
            config = uvicorn.Config(app, log_level="warning", lifespan="off", access_log=False, **tls)
            self._uvicorn = uvicorn.Server(config)
            self._uvicorn.install_signal_handlers = lambda: None  # type: ignore[method-assign]
            self._http_task = asyncio.ensure_future(self._uvicorn.serve(sockets=[sock]))
            while not self._uvicorn.started:
                if self._http_task.done():
                    self._http_task.result()
                await asyncio.sleep(0.01)

    async def _stop(self) -> None:
        if self._uvicorn is not None:
            self._uvicorn.should_exit = True
            if self._http_task is not None:
                await asyncio.wait_for(self._http_task, 5.0)
        if self.grpc is not None:
            await self.grpc.stop(0.5)

    def stop(self) -> None:
        if not self._thread.is_alive():
            return
        try:
            self.call(self._stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(5.0)
            self.loop.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
