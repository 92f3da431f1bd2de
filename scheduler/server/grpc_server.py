"""gRPC front end: ``llmsched.v1.Inference`` and ``llmsched.v1.Admin`` over an :class:`IngressAPI`.

::

    client --Generate--> [auth interceptor] -> parse + validate -> ingress.generate() --chunks--> client
                              |                    |                      ^
                              | UNAUTHENTICATED    | INVALID_ARGUMENT     | deadline -> GenerateRequest.deadline_s
                              v                    v                      | disconnect/cancel -> ingress.cancel()

Requests are deserialized *inside* the handlers (the method handlers take raw bytes) so that a malformed payload is
INVALID_ARGUMENT naming the message rather than grpc's generic INTERNAL "Exception deserializing request", and so
that a GenerateRequest carrying both prompt forms on the wire (protobuf's oneof would silently keep the last) is
rejected. Oversize payloads never reach us: grpc answers RESOURCE_EXHAUSTED (``max_receive_message_length``).

Error mapping (also the HTTP server's, see ``http_server.py``): ``InvalidRequest`` -> INVALID_ARGUMENT,
``NotFound`` -> NOT_FOUND, ``Overloaded`` -> RESOURCE_EXHAUSTED + ``retry-after`` trailing metadata,
``Unavailable`` -> UNAVAILABLE, ``NotImplementedError`` -> UNIMPLEMENTED, anything else -> INTERNAL (logged).
Errors naming a field also carry it as ``llmsched-field`` trailing metadata, which the SDK exposes as ``.field``.
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
from google.protobuf.message import DecodeError, Message
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from scheduler._proto.llmsched.v1 import admin_pb2, inference_pb2
from scheduler.control.api import (
    ClusterState,
    GenerateRequest,
    IngressAPI,
    IngressError,
    InvalidRequest,
    MigrationResult,
    NotFound,
    Overloaded,
    Unavailable,
)
from scheduler.core.types import InstanceRole, InstanceSnapshot
from scheduler.engine.base import SamplingParams, TokenChunk
from scheduler.server.auth import ADMIN_SERVICE, INFERENCE_SERVICE, AuthConfig, TokenAuthInterceptor
from scheduler.server.validate import GRPC_FIELDS, new_request_id, validate_generate

logger = logging.getLogger(__name__)

DEFAULT_MAX_MESSAGE_BYTES = 4 * 1024 * 1024
FIELD_METADATA_KEY = "llmsched-field"
RETRY_AFTER_METADATA_KEY = "retry-after"
SERVICE_NAMES = (INFERENCE_SERVICE, ADMIN_SERVICE)

_ROLE_TO_PROTO = {
    InstanceRole.PREFILL: admin_pb2.INSTANCE_ROLE_PREFILL,
    InstanceRole.DECODE: admin_pb2.INSTANCE_ROLE_DECODE,
    InstanceRole.MIXED: admin_pb2.INSTANCE_ROLE_MIXED,
}


# ----------------------------------------------------------------------------------------------- conversions


def _parse(cls: type[Message], raw: bytes) -> Any:
    try:
        return cls.FromString(raw)
    except (DecodeError, RuntimeError, ValueError) as e:  # upb raises DecodeError; be lenient across backends
        name = cls.DESCRIPTOR.name
        raise InvalidRequest(f"request: malformed {name} protobuf ({e})", field="request") from None


def _top_level_fields(raw: bytes) -> set[int] | None:
    """Field numbers present at the top level of an encoded message (None if the walk fails)."""
    seen: set[int] = set()
    i, n = 0, len(raw)

    def varint() -> int:
        nonlocal i
        shift = result = 0
        while True:
            if i >= n or shift > 63:
                raise IndexError
            b = raw[i]
            i += 1
            result |= (b & 0x7F) << shift
            if not b & 0x80:
                return result
            shift += 7

    try:
        while i < n:
            tag = varint()
            number, wire = tag >> 3, tag & 7
            seen.add(number)
            if wire == 0:
                varint()
            elif wire == 1:
                i += 8
            elif wire == 2:
                length = varint()  # NOTE: not `i += varint()`: that reads i before varint() advances it
                i += length
            elif wire == 5:
                i += 4
            else:
                return None  # groups: not used by our protos; let the parsed message speak
    except IndexError:
        return None
    return seen if i == n else None


_DEFAULT_SAMPLING = (
    SamplingParams()
)  # NOTE: slotted dataclass: class attributes are descriptors, not defaults
_PROMPT_TEXT = inference_pb2.GenerateRequest.TEXT_FIELD_NUMBER
_PROMPT_IDS = inference_pb2.GenerateRequest.TOKEN_IDS_FIELD_NUMBER


def generate_request_from_proto(
    msg: inference_pb2.GenerateRequest, *, raw: bytes | None = None, deadline_s: float | None = None
) -> GenerateRequest:
    """Map a proto request to the ingress' :class:`GenerateRequest` and validate it.

    Raises:
        InvalidRequest: naming the offending field (``sampling.max_tokens``, ``prompt.token_ids[3]``, ...).
    """
    if raw is not None:
        fields = _top_level_fields(raw)
        if fields is not None and _PROMPT_TEXT in fields and _PROMPT_IDS in fields:
            raise InvalidRequest("prompt: set exactly one of text or token_ids, got both", field="prompt")
    which = msg.WhichOneof("prompt")
    s, d = msg.sampling, _DEFAULT_SAMPLING
    sampling = SamplingParams(
        max_tokens=s.max_tokens if s.HasField("max_tokens") else d.max_tokens,
        temperature=s.temperature if s.HasField("temperature") else d.temperature,
        top_p=s.top_p if s.HasField("top_p") else d.top_p,
        top_k=s.top_k,
        seed=s.seed if s.HasField("seed") else None,
        stop_token_ids=tuple(s.stop_token_ids),
        ignore_eos=s.ignore_eos,
    )
    slo = msg.slo if msg.HasField("slo") else None
    req = GenerateRequest(
        request_id=msg.request_id or new_request_id(),
        prompt=msg.text if which == "text" else None,
        prompt_token_ids=tuple(msg.token_ids.ids) if which == "token_ids" else None,
        sampling=sampling,
        model=msg.model or None,
        priority=msg.priority,
        ttft_slo_s=slo.ttft_ms / 1e3 if slo is not None and slo.ttft_ms else None,
        tpot_slo_s=slo.tpot_ms / 1e3 if slo is not None and slo.tpot_ms else None,
        length_hint=msg.length_hint if msg.HasField("length_hint") else None,
        deadline_s=deadline_s,
    )
    validate_generate(req, GRPC_FIELDS)
    if slo is not None:  # negative ms would be folded away above; reject it explicitly
        for name, value in (("slo.ttft_ms", slo.ttft_ms), ("slo.tpot_ms", slo.tpot_ms)):
            if not math.isfinite(value) or value < 0:
                raise InvalidRequest(f"{name}: must be a finite number >= 0, got {value}", field=name)
    if msg.resume_from_index < 0:
        raise InvalidRequest(
            f"resume_from_index: must be >= 0, got {msg.resume_from_index}", field="resume_from_index"
        )
    return req


def instance_to_proto(s: InstanceSnapshot) -> admin_pb2.Instance:
    return admin_pb2.Instance(
        instance_id=s.instance_id,
        role=_ROLE_TO_PROTO.get(s.role, admin_pb2.INSTANCE_ROLE_UNSPECIFIED),
        gpu=s.gpu,
        tp=s.tp,
        model=s.model,
        running=s.num_running,
        waiting=s.num_waiting,
        decoding=s.num_decoding,
        kv_blocks_used=s.kv_blocks_used,
        kv_blocks_total=s.kv_blocks_total,
        block_size=s.block_size,
        healthy=s.healthy,
        draining=s.draining,
    )


def cluster_state_to_proto(state: ClusterState) -> admin_pb2.ClusterState:
    return admin_pb2.ClusterState(
        instances=[instance_to_proto(i) for i in state.instances],
        router=state.router,
        requests_in_flight=state.requests_in_flight,
        extra=dict(state.extra),
    )


def migration_result_to_proto(r: MigrationResult) -> admin_pb2.MigrationResult:
    return admin_pb2.MigrationResult(
        request_id=r.request_id,
        source=r.source,
        destination=r.destination,
        committed=r.committed,
        reason=r.reason,
        downtime_s=r.downtime_s,
        stages=r.stages,
    )


# ----------------------------------------------------------------------------------------------- errors


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str, tuple[tuple[str, str], ...]]:
    """The gRPC status, message and trailing metadata for an exception raised by the ingress or validation."""
    md: list[tuple[str, str]] = []
    if isinstance(exc, IngressError) and exc.field:
        md.append((FIELD_METADATA_KEY, exc.field))
    if isinstance(exc, InvalidRequest):
        code = grpc.StatusCode.INVALID_ARGUMENT
    elif isinstance(exc, NotFound):
        code = grpc.StatusCode.NOT_FOUND
    elif isinstance(exc, Overloaded):
        code = grpc.StatusCode.RESOURCE_EXHAUSTED
        md.append((RETRY_AFTER_METADATA_KEY, f"{max(exc.retry_after_s, 0.0):g}"))
    elif isinstance(exc, Unavailable):
        code = grpc.StatusCode.UNAVAILABLE
    elif isinstance(exc, IngressError):
        code = grpc.StatusCode.UNKNOWN
    elif isinstance(exc, NotImplementedError):
        return grpc.StatusCode.UNIMPLEMENTED, str(exc) or "not implemented by this ingress", ()
    else:
        return grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__})", ()
    return code, str(exc), tuple(md)


async def _abort(context: grpc.aio.ServicerContext, exc: BaseException) -> None:
    code, message, md = status_for(exc)
    if code is grpc.StatusCode.INTERNAL:
        logger.error("ingress raised an unexpected error", exc_info=exc)
    await context.abort(code, message, trailing_metadata=md)


# ----------------------------------------------------------------------------------------------- servicers


class InferenceServicer:
    """``llmsched.v1.Inference``: Generate (server streaming) and Cancel."""

    def __init__(self, ingress: IngressAPI) -> None:
        self._ingress = ingress
        self._background: set[asyncio.Task[Any]] = set()

    async def Generate(
        self, raw: bytes, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[inference_pb2.GenerateChunk]:
        stream: AsyncIterator[TokenChunk] | None = None
        finished = False
        request_id = ""
        try:
            msg = _parse(inference_pb2.GenerateRequest, raw)
            remaining = context.time_remaining()
            deadline_s = time.time() + remaining if remaining is not None else None
            req = generate_request_from_proto(msg, raw=raw, deadline_s=deadline_s)
            request_id = req.request_id
            resume = msg.resume_from_index
            stream = self._ingress.generate(req)
            chunk_cls = inference_pb2.GenerateChunk
            async for chunk in stream:
                ids, index, text = chunk.token_ids, chunk.index, chunk.text
                if index < resume:  # retry after UNAVAILABLE: drop what the client already has
                    skip = min(resume - index, len(ids))
                    ids, index, text = ids[skip:], index + skip, ""
                    if not ids and not chunk.finished:
                        continue
                # NOTE: TokenChunk has no instance_id yet (engine/base.py); read it when the ingress provides it.
                instance_id = getattr(chunk, "instance_id", "") or ""
                yield chunk_cls(
                    request_id=request_id,
                    index=index,
                    token_ids=ids,
                    text=text,
                    finished=chunk.finished,
                    finish_reason=(chunk.finish_reason or "") if chunk.finished else "",
                    instance_id=instance_id,
                )
                if chunk.finished:
                    finished = True
                    break
        except (IngressError, NotImplementedError) as e:
            await _abort(context, e)
        except asyncio.CancelledError:
            # Client cancelled, disconnected or its deadline passed: grpc cancels this task. Tell the ingress.
            raise
        except Exception as e:
            if isinstance(e, grpc.aio.AbortError):
                raise
            await _abort(context, e)
        finally:
            if stream is not None:
                if not finished:
                    await self._cancel_in_background(request_id)
                aclose = getattr(stream, "aclose", None)  # AsyncIterator may be a plain iterator object
                if aclose is not None:
                    try:
                        await aclose()
                    except (Exception, asyncio.CancelledError):
                        logger.debug("closing the ingress stream of %s failed", request_id, exc_info=True)

    async def _cancel_in_background(self, request_id: str) -> None:
        # Shielded: this runs while our task is being cancelled; the ingress must still hear about it.
        task = asyncio.ensure_future(self._ingress.cancel(request_id))
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            pass
        except Exception:
            logger.warning("ingress.cancel(%s) failed", request_id, exc_info=True)

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
        state = await self._ingress.cluster_state()
        return admin_pb2.ListInstancesResponse(instances=[instance_to_proto(i) for i in state.instances])

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

    async def scale(self, msg: admin_pb2.ScaleRequest) -> admin_pb2.ScaleResponse:
        if not msg.pool:
            raise InvalidRequest("pool: must not be empty", field="pool")
        if msg.count < 0:
            raise InvalidRequest(f"count: must be >= 0, got {msg.count}", field="count")
        return admin_pb2.ScaleResponse(count=await self._ingress.scale(msg.pool, msg.count))

    def handlers(self) -> dict[str, grpc.RpcMethodHandler]:
        return {
            "GetClusterState": _unary(self.get_cluster_state, admin_pb2.GetClusterStateRequest),
            "ListInstances": _unary(self.list_instances, admin_pb2.ListInstancesRequest),
            "MigrateRequest": _unary(self.migrate, admin_pb2.MigrateRequestRequest),
            "DrainInstance": _unary(self.drain, admin_pb2.DrainInstanceRequest),
            "Scale": _unary(self.scale, admin_pb2.ScaleRequest),
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
) -> GrpcServer:
    """Build (not start) the gRPC server: Inference + Admin + health + reflection on ``host:port``.

    Args:
        ingress: the control plane's ingress (or a test double).
        port: TCP port; 0 picks a free one (read it from ``.port``).
        host: bind address; default loopback only.
        auth: tokens (and TLS); None = open, plaintext.
        max_message_bytes: larger requests get RESOURCE_EXHAUSTED.

    Returns:
        A :class:`GrpcServer`; ``await srv.start()`` to serve.
    """
    interceptors = [TokenAuthInterceptor(auth)] if auth is not None and auth.enabled else []
    options = [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max(max_message_bytes, DEFAULT_MAX_MESSAGE_BYTES)),
        ("grpc.so_reuseport", 0),  # NOTE: two servers silently sharing a port hides bugs (and test flakes)
        *extra_options,
    ]
    server = grpc.aio.server(interceptors=interceptors, options=options)

    inference = InferenceServicer(ingress)
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
) -> None:
    """Serve until ``stop`` is set or SIGTERM/SIGINT arrives, then drain and stop.

    Shutdown order: health -> NOT_SERVING, ``drain()`` (e.g. migrate requests off), then stop accepting and wait up
    to ``grace_s`` for in-flight streams.
    """
    srv = build_server(ingress, port=port, host=host, auth=auth, max_message_bytes=max_message_bytes)
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
