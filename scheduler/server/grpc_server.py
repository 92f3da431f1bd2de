"""gRPC front end: ``llmsched.v1.Inference`` and ``llmsched.v1.Admin`` over an :class:`IngressAPI`.

::

    client --Generate--> [auth interceptor] -> parse + validate -> ingress.generate() --chunks--> client
                              |                    |                      ^
                              | UNAUTHENTICATED    | INVALID_ARGUMENT     | deadline -> GenerateRequest.deadline_s
                              v                    v                      | disconnect/cancel -> ingress.cancel()

Requests are deserialized *inside* the handlers (the method handlers take raw bytes) so that a malformed payload is
INVALID_ARGUMENT naming the message rather than grpc's generic INTERNAL "Exception deserializing request", and so
that a GenerateRequest carrying both prompt forms on the wire (protobuf's oneof would silently keep the last) is
rejected. An oversize payload (over ``max_message_bytes``) is RESOURCE_EXHAUSTED naming ``prompt``; grpc's transport
limit sits at twice that, so only a payload past it gets grpc's own generic RESOURCE_EXHAUSTED.

Error mapping (each ``IngressError`` class names its status, for this server and the HTTP one: ``control/api.py``):
``InvalidRequest`` -> INVALID_ARGUMENT, ``NotFound`` -> NOT_FOUND, ``Overloaded`` -> RESOURCE_EXHAUSTED +
``retry-after`` trailing metadata, ``Unavailable`` -> UNAVAILABLE, ``DeadlineExceeded`` -> DEADLINE_EXCEEDED,
``RequestFailed`` -> INTERNAL, ``NotImplementedError`` -> UNIMPLEMENTED, anything else -> INTERNAL (logged).
Errors naming a field also carry it as ``llmsched-field`` trailing metadata, which the SDK exposes as ``.field``.

Observability and admission (all optional): ``recorder`` (Prometheus), ``tracing`` (OpenTelemetry; the client's
``traceparent`` metadata parents the ``llmsched.ingress`` span), ``limiter`` (in-flight bound per priority).
"""

from __future__ import annotations

import asyncio
import logging
import math
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import Message
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from scheduler._proto.llmsched.v1 import admin_pb2, inference_pb2
from scheduler.control.api import (
    IngressAPI,
    IngressError,
    InvalidRequest,
    RequestFailed,
    TooLarge,
)
from scheduler.core.types import InstanceRole
from scheduler.engine.base import TokenChunk, text_after
from scheduler.server.admission import InflightLimiter, Slot, cancel_quietly, close_stream
from scheduler.server.auth import ADMIN_SERVICE, INFERENCE_SERVICE, AuthConfig, TokenAuthInterceptor

# NOTE: the proto conversions live in convert.py; re-exported as this module's public names.
from scheduler.server.convert import (
    _parse,
    cluster_state_to_proto,
    generate_request_from_proto,
    migration_result_to_proto,
    role_from_proto,
)
from scheduler.server.validate import (
    GRPC_FIELDS,
    admission_reason,
    relabel,
    request_status_for,
    request_status_of_finish,
)
from scheduler.telemetry.metrics import NULL_RECORDER, Recorder, RequestStatus
from scheduler.telemetry.tracing import SpanKind, Stage, Tracing, set_outcome

logger = logging.getLogger(__name__)

DEFAULT_MAX_MESSAGE_BYTES = 4 * 1024 * 1024
# grpc's own receive limit is this multiple of ``max_message_bytes``: a payload between the two reaches the handler,
# which answers naming the field (grpc's built-in answer names none). Bounds a request's memory at 2x the limit.
TRANSPORT_SLACK = 2
FIELD_METADATA_KEY = "llmsched-field"
# Largest Admin Scale count: the Controller's MAX_POOL_SIZE (control/controller_admin.py; not imported: it needs Ray).
MAX_SCALE_COUNT = 1024
RETRY_AFTER_METADATA_KEY = "retry-after"
SERVICE_NAMES = (INFERENCE_SERVICE, ADMIN_SERVICE)


# ----------------------------------------------------------------------------------------------- errors


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str, tuple[tuple[str, str], ...]]:
    """The gRPC status, message and trailing metadata for an exception raised by the ingress or validation (the
    status an ``IngressError`` class names: ``scheduler.control.api``)."""
    if isinstance(exc, IngressError):
        md: list[tuple[str, str]] = [(FIELD_METADATA_KEY, exc.field)] if exc.field else []
        if exc.retry_after_s is not None:
            md.append((RETRY_AFTER_METADATA_KEY, f"{max(exc.retry_after_s, 0.0):g}"))
        return grpc.StatusCode[exc.grpc_code], str(exc), tuple(md)
    if isinstance(exc, NotImplementedError):
        return grpc.StatusCode.UNIMPLEMENTED, str(exc) or "not implemented by this ingress", ()
    return grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__})", ()


async def _abort(context: grpc.aio.ServicerContext, exc: BaseException) -> None:
    code, message, md = status_for(exc)
    if code is grpc.StatusCode.INTERNAL and not isinstance(exc, IngressError):
        logger.error("ingress raised an unexpected error", exc_info=exc)
    await context.abort(code, message, trailing_metadata=md)


# ----------------------------------------------------------------------------------------------- servicers

_GRPC_SPAN_ATTRS = {"rpc.system": "grpc", "rpc.service": INFERENCE_SERVICE, "rpc.method": "Generate"}


class InferenceServicer:
    """``llmsched.v1.Inference``: Generate (server streaming) and Cancel.

    Args:
        ingress: the control plane's ingress.
        recorder: metrics (request start / first token / finish / rejections); None = off.
        tracing: spans + W3C context from the ``traceparent`` metadata; None = the global OpenTelemetry provider.
        limiter: in-flight bound per priority (RESOURCE_EXHAUSTED + retry-after when full); None = unbounded.
        max_message_bytes: a larger GenerateRequest is RESOURCE_EXHAUSTED naming ``prompt``.
    """

    def __init__(
        self,
        ingress: IngressAPI,
        *,
        recorder: Recorder | None = None,
        tracing: Tracing | None = None,
        limiter: InflightLimiter | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ) -> None:
        self._ingress = ingress
        self._max_bytes = max_message_bytes
        self._rec: Recorder = recorder if recorder is not None else NULL_RECORDER
        self._tracing = tracing if tracing is not None else Tracing()
        self._limiter = limiter

    async def Generate(
        self, raw: bytes, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[inference_pb2.GenerateChunk]:
        stream: AsyncIterator[TokenChunk] | None = None
        finished = False
        request_id = ""
        key = ""  # the recorder's key of this request (its id, unless that id was already in flight)
        started = False  # on_request_start called: on_finish / on_reject owes it an end
        slot: Slot | None = None
        rec = self._rec
        status = RequestStatus.CANCELLED  # what a CancelledError (client cancel/deadline/disconnect) leaves
        n_tokens, last_instance, priority = 0, "", 0
        parent = self._tracing.extract(context.invocation_metadata())
        activate = self._tracing.activate
        span = self._tracing.start_span(
            Stage.INGRESS, parent=parent, kind=SpanKind.SERVER, attributes=_GRPC_SPAN_ATTRS
        )
        try:
            try:
                if len(raw) > self._max_bytes:
                    raise TooLarge(f"prompt: the request is {len(raw)} bytes, over the server's limit of "
                                   f"{self._max_bytes} bytes; send a shorter prompt", field="prompt")
                msg = _parse(inference_pb2.GenerateRequest, raw)
                remaining = context.time_remaining()
                deadline_s = time.time() + remaining if remaining is not None else None
                req = generate_request_from_proto(msg, raw=raw, deadline_s=deadline_s)
                request_id, priority = req.request_id, req.priority
                span.set_attribute("llmsched.request_id", request_id)
                span.set_attribute("llmsched.priority", priority)
                if self._limiter is not None:
                    slot = self._limiter.acquire(priority)
                key = rec.on_request_start(request_id, priority=priority, api="grpc")
                started = True
                resume = msg.resume_from_index
                # NOTE: the span is current only around ingress calls, never across a yield (a generator
                # finalized from another task could not detach it); the ingress' spans nest under it.
                with activate(span):
                    stream = self._ingress.generate(req)
                    chunks = aiter(stream)
                chunk_cls = inference_pb2.GenerateChunk
                tokenizer = getattr(self._ingress, "tokenizer", None)
                detokenize = getattr(tokenizer, "decode", None)
                seen = False  # a chunk came from the ingress
                dropped: list[int] = []  # the ids dropped below ``resume``: the kept tail's text follows them
                while True:
                    try:
                        with activate(span):
                            chunk = await anext(chunks)
                    except StopAsyncIteration:
                        if not seen:  # an ingress bug: OK with nothing was a silent empty answer (HTTP: a 500)
                            raise RuntimeError("the ingress stream ended without a chunk") from None
                        status = RequestStatus.FINISHED  # ended without a finished chunk: the ingress closed it
                        break
                    seen = True
                    ids, index, text = chunk.token_ids, chunk.index, chunk.text
                    instance_id = chunk.instance_id
                    if ids and n_tokens == 0:
                        rec.on_first_token(key, instance_id=instance_id)
                    n_tokens += len(ids)
                    last_instance = instance_id or last_instance
                    if index < resume:  # retry after UNAVAILABLE: drop what the client already has
                        skip = min(resume - index, len(ids))
                        dropped.extend(ids[:skip])
                        ids, index = ids[skip:], index + skip
                        # The kept tail still needs its text (the SDK joins chunk texts into the output): the
                        # chunk's text belongs to all its tokens, so detokenize the tail after the ids before it
                        # (alone, a character split at the resume point came out as U+FFFD). Without a tokenizer
                        # the tail goes without text: only an ``IngressAPI`` double can lack one (``Ingress``
                        # always has one, ``make_tokenizer``), and ``EchoIngress`` chunks the same way on a retry,
                        # so a resume index never splits its chunks.
                        text = text_after(detokenize, dropped, ids) if ids and text and detokenize is not None else ""
                        if not ids and not chunk.finished:
                            continue
                    reason = chunk.finish_reason
                    if chunk.finished and request_status_of_finish(reason) is RequestStatus.FAILED:
                        # An engine raised on the request (the ingress's "error: ..." end): a status, INTERNAL
                        # with the reason as HTTP answers 500, not an OK stream whose finish_reason no client
                        # checks. Final (the ingress recovers engine failures itself). Its tokens go first.
                        if ids:
                            yield chunk_cls(
                                request_id=request_id,
                                index=index,
                                token_ids=ids,
                                text=text,
                                instance_id=instance_id,
                            )
                        raise RequestFailed(reason or "error")
                    if chunk.finished:
                        # NOTE: before the yield: a client that hangs up on its last chunk cancels us at the yield,
                        # and the request has finished in the ingress all the same (nothing to cancel there).
                        finished = True
                        status = request_status_of_finish(chunk.finish_reason)
                    yield chunk_cls(
                        request_id=request_id,
                        index=index,
                        token_ids=ids,
                        text=text,
                        finished=chunk.finished,
                        finish_reason=(chunk.finish_reason or "") if chunk.finished else "",
                        instance_id=instance_id,
                    )
                    if finished:
                        break
            except (IngressError, NotImplementedError) as e:
                # The ingress ended the stream itself, or never took it: no cancel below, which would abort the
                # request already holding this id (a duplicate refused as in flight cancelled the original).
                finished = True
                status = self._on_error(e, key, started, priority)
                started = started and status is not RequestStatus.REJECTED  # on_reject ended it
                await _abort(context, relabel(e, GRPC_FIELDS))
            except asyncio.CancelledError:
                # Client cancelled, disconnected or its deadline passed: grpc cancels this task. Tell the ingress.
                raise
            except Exception as e:
                if isinstance(e, grpc.aio.AbortError):
                    raise
                status = RequestStatus.FAILED
                await _abort(context, e)
        finally:
            try:
                if started:
                    rec.on_finish(key, status=status, output_tokens=n_tokens, instance_id=last_instance)
                span.set_attribute("llmsched.output_tokens", n_tokens)
                set_outcome(span, ok=status is RequestStatus.FINISHED, status=status.value)
                span.end()
                if stream is not None:
                    if not finished:
                        await cancel_quietly(self._ingress, request_id)
                    await close_stream(stream, request_id)
            finally:
                # NOTE: the slot bounds the streams open in the ingress, so it is given back only once this one is
                # closed (a client that hangs up after its last token made the cancel above yield with the slot
                # already free, and a fourth stream of a priority capped at 3 reached the ingress).
                if slot is not None:
                    slot.release()

    def _on_error(self, e: BaseException, key: str, started: bool, priority: int) -> RequestStatus:
        """Record an error that ends a Generate call; returns the request status for the span/finish."""
        reason = admission_reason(e, started=started)
        if reason is not None:
            # NOTE: the server limiter rejects before start; the ingress' admission after it (its own reason).
            # Only a started request has an entry to end: another request may be in flight under the same id.
            self._rec.on_reject(priority=priority, reason=reason, api="grpc", request_id=key if started else None)
            return RequestStatus.REJECTED
        status = request_status_for(e)
        if not started and status is RequestStatus.INVALID:
            self._rec.on_invalid(api="grpc")
        return status

    async def Cancel(self, raw: bytes, context: grpc.aio.ServicerContext) -> inference_pb2.CancelResponse:
        try:
            msg = _parse(inference_pb2.CancelRequest, raw)
            if not msg.request_id:
                raise InvalidRequest("request_id: must not be empty", field="request_id")
            return inference_pb2.CancelResponse(cancelled=bool(await self._ingress.cancel(msg.request_id)))
        except Exception as e:
            if isinstance(e, grpc.aio.AbortError):
                raise
            await _abort(context, e)
            raise  # unreachable: abort raises


def _unary(fn: Callable[[Any], Awaitable[Message]], request_cls: type[Message]) -> grpc.RpcMethodHandler:
    """A unary handler that parses raw bytes itself and maps every error to a status."""

    async def handler(raw: bytes, context: grpc.aio.ServicerContext) -> Message:
        try:
            return await fn(_parse(request_cls, raw))
        except Exception as e:
            if isinstance(e, grpc.aio.AbortError):
                raise
            await _abort(context, e)
            raise

    return grpc.unary_unary_rpc_method_handler(handler, response_serializer=lambda m: m.SerializeToString())


class AdminServicer:
    """``llmsched.v1.Admin``: cluster state, migration, draining, scaling."""

    def __init__(self, ingress: IngressAPI) -> None:
        self._ingress = ingress

    async def get_cluster_state(self, _msg: admin_pb2.GetClusterStateRequest) -> admin_pb2.ClusterState:
        return cluster_state_to_proto(await self._ingress.cluster_state())

    async def list_instances(self, _msg: admin_pb2.ListInstancesRequest) -> admin_pb2.ListInstancesResponse:
        state = cluster_state_to_proto(await self._ingress.cluster_state())  # one conversion (node ids included)
        return admin_pb2.ListInstancesResponse(instances=state.instances)

    async def migrate(self, msg: admin_pb2.MigrateRequestRequest) -> admin_pb2.MigrationResult:
        if not msg.request_id:
            raise InvalidRequest("request_id: must not be empty", field="request_id")
        destination = msg.destination if msg.HasField("destination") else None
        if destination == "":
            raise InvalidRequest(
                "destination: must not be empty when set (unset it to let the policy pick)",
                field="destination",
            )
        return migration_result_to_proto(await self._ingress.migrate(msg.request_id, destination))

    async def drain(self, msg: admin_pb2.DrainInstanceRequest) -> admin_pb2.DrainInstanceResponse:
        if not msg.instance_id:
            raise InvalidRequest("instance_id: must not be empty", field="instance_id")
        return admin_pb2.DrainInstanceResponse(requests_moved=await self._ingress.drain(msg.instance_id))

    async def drain_node(self, msg: admin_pb2.DrainNodeRequest) -> admin_pb2.DrainNodeResponse:
        if not msg.node:
            raise InvalidRequest("node: must not be empty", field="node")
        if not math.isfinite(msg.deadline_s) or msg.deadline_s < 0:
            raise InvalidRequest(f"deadline_s: must be a finite number >= 0, got {msg.deadline_s}",
                                 field="deadline_s")
        r = await self._ingress.drain_node(msg.node, msg.deadline_s)
        return admin_pb2.DrainNodeResponse(node_id=r.node_id, drained=list(r.drained), kept=dict(r.kept),
                                           requests_moved=r.requests_moved)

    async def scale(self, msg: admin_pb2.ScaleRequest) -> admin_pb2.ScaleResponse:
        if not msg.pool:
            raise InvalidRequest("pool: must not be empty", field="pool")
        if msg.count < 0:
            raise InvalidRequest(f"count: must be >= 0, got {msg.count}", field="count")
        if msg.count > MAX_SCALE_COUNT:
            raise InvalidRequest(f"count: must be <= {MAX_SCALE_COUNT}, got {msg.count}", field="count")
        return admin_pb2.ScaleResponse(count=await self._ingress.scale(msg.pool, msg.count))

    async def switch_role(self, msg: admin_pb2.SwitchRoleRequest) -> admin_pb2.SwitchRoleResponse:
        if not msg.instance_id:
            raise InvalidRequest("instance_id: must not be empty", field="instance_id")
        role = role_from_proto(msg.role)
        if role not in (InstanceRole.PREFILL, InstanceRole.DECODE):
            # An unknown enum value (a newer client) has no name: Name() raised ValueError (INTERNAL).
            name = admin_pb2.InstanceRole.Name(msg.role) if msg.role in admin_pb2.InstanceRole.values() else msg.role
            raise InvalidRequest(f"role: must be PREFILL or DECODE, got {name}", field="role")
        return admin_pb2.SwitchRoleResponse(started=await self._ingress.switch_role(msg.instance_id, role))

    def handlers(self) -> dict[str, grpc.RpcMethodHandler]:
        return {
            "GetClusterState": _unary(self.get_cluster_state, admin_pb2.GetClusterStateRequest),
            "ListInstances": _unary(self.list_instances, admin_pb2.ListInstancesRequest),
            "MigrateRequest": _unary(self.migrate, admin_pb2.MigrateRequestRequest),
            "DrainInstance": _unary(self.drain, admin_pb2.DrainInstanceRequest),
            "DrainNode": _unary(self.drain_node, admin_pb2.DrainNodeRequest),
            "Scale": _unary(self.scale, admin_pb2.ScaleRequest),
            "SwitchRole": _unary(self.switch_role, admin_pb2.SwitchRoleRequest),
        }


# ----------------------------------------------------------------------------------------------- server


class GrpcServer:
    """A started-or-not ``grpc.aio.Server`` plus its bound port and health state.

    Quacks like ``grpc.aio.Server`` for ``start``/``stop``/``wait_for_termination``; the raw server is ``.server``.
    """

    def __init__(self, server: grpc.aio.Server, *, host: str, port: int, health_servicer: Any) -> None:
        self.server = server
        self.host = host
        self.port = port
        self.health = health_servicer

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    async def start(self, *, serving: bool = True) -> None:
        """Start listening; health reports SERVING unless ``serving=False`` (then call :meth:`set_serving`)."""
        await self.set_serving(serving)  # before listening: no probe may see the default SERVING early
        await self.server.start()

    async def set_serving(self, serving: bool) -> None:
        """SERVING when ready; NOT_SERVING while draining (load balancers stop sending new work)."""
        status = (
            health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", *SERVICE_NAMES):
            await self.health.set(name, status)

    async def stop(self, grace: float | None = None) -> None:
        await self.set_serving(False)
        await self.server.stop(grace)

    async def wait_for_termination(self, timeout: float | None = None) -> bool:
        return await self.server.wait_for_termination(timeout)


def build_server(
    ingress: IngressAPI,
    *,
    port: int,
    host: str = "127.0.0.1",
    auth: AuthConfig | None = None,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    extra_options: tuple[tuple[str, Any], ...] = (),
    recorder: Recorder | None = None,
    tracing: Tracing | None = None,
    limiter: InflightLimiter | None = None,
) -> GrpcServer:
    """Build (not start) the gRPC server: Inference + Admin + health + reflection on ``host:port``.

    Args:
        ingress: the control plane's ingress (or a test double).
        port: TCP port; 0 picks a free one (read it from ``.port``).
        host: bind address; default loopback only.
        auth: tokens (and TLS); None = open, plaintext.
        max_message_bytes: larger requests get RESOURCE_EXHAUSTED.
        recorder: Prometheus recorder (``MetricsRecorder``); None = no metrics.
        tracing: OpenTelemetry spans (``setup_tracing()``); None = the global provider (no-op unless configured).
        limiter: in-flight bound per priority; None = unbounded (the ingress' admission still applies).

    Returns:
        A :class:`GrpcServer`; ``await srv.start()`` to serve.
    """
    interceptors = [TokenAuthInterceptor(auth)] if auth is not None and auth.enabled else []
    options = [
        ("grpc.max_receive_message_length", TRANSPORT_SLACK * max_message_bytes),
        ("grpc.max_send_message_length", max(max_message_bytes, DEFAULT_MAX_MESSAGE_BYTES)),
        ("grpc.so_reuseport", 0),  # NOTE: two servers silently sharing a port hides bugs (and test flakes)
        *extra_options,
    ]
    server = grpc.aio.server(interceptors=interceptors, options=options)

    inference = InferenceServicer(ingress, recorder=recorder, tracing=tracing, limiter=limiter,
                                  max_message_bytes=max_message_bytes)
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                INFERENCE_SERVICE,
                {
                    "Generate": grpc.unary_stream_rpc_method_handler(
                        inference.Generate, response_serializer=inference_pb2.GenerateChunk.SerializeToString
                    ),
                    "Cancel": grpc.unary_unary_rpc_method_handler(
                        inference.Cancel, response_serializer=inference_pb2.CancelResponse.SerializeToString
                    ),
                },
            ),
            grpc.method_handlers_generic_handler(ADMIN_SERVICE, AdminServicer(ingress).handlers()),
        )
    )
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )

    address = f"{host}:{port}"
    try:
        if auth is not None and auth.tls is not None:
            bound = server.add_secure_port(address, auth.tls.server_credentials())
        else:
            bound = server.add_insecure_port(address)
    except RuntimeError as e:
        raise OSError(f"cannot bind gRPC server to {address}: {e}") from e
    if bound == 0:
        raise OSError(f"cannot bind gRPC server to {address}")
    return GrpcServer(server, host=host, port=bound, health_servicer=health_servicer)


async def serve(
    ingress: IngressAPI,
    *,
    port: int,
    host: str = "127.0.0.1",
    auth: AuthConfig | None = None,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    grace_s: float = 10.0,
    stop: asyncio.Event | None = None,
    on_started: Callable[[GrpcServer], None] | None = None,
    drain: Callable[[], Awaitable[None]] | None = None,
    recorder: Recorder | None = None,
    tracing: Tracing | None = None,
    limiter: InflightLimiter | None = None,
) -> None:
    """Serve until ``stop`` is set or SIGTERM/SIGINT arrives, then drain and stop.

    Shutdown order: health -> NOT_SERVING, ``drain()`` (e.g. migrate requests off), then stop accepting and wait up
    to ``grace_s`` for in-flight streams.
    """
    srv = build_server(
        ingress,
        port=port,
        host=host,
        auth=auth,
        max_message_bytes=max_message_bytes,
        recorder=recorder,
        tracing=tracing,
        limiter=limiter,
    )
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    installed: list[signal.Signals] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop.set)
            installed.append(sig)
        except (NotImplementedError, RuntimeError, ValueError):  # not the main thread / platform
            pass
    try:
        await srv.start()
        logger.info(
            "llmsched gRPC serving on %s (auth=%s, tls=%s)",
            srv.address,
            bool(auth and auth.enabled),
            bool(auth and auth.tls),
        )
        if on_started is not None:
            on_started(srv)
        await stop.wait()
        await srv.set_serving(False)
        if drain is not None:
            await drain()
        await srv.server.stop(grace_s)
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)
