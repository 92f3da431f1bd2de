"""Shared, I/O-free parts of ``Client`` and ``AsyncClient``: requests, chunk bookkeeping, errors, channel setup."""

from __future__ import annotations

import math
import operator
import random
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from scheduler._proto.llmsched.v1 import admin_pb2, inference_pb2
from scheduler.client.types import (
    ClusterStateInfo,
    GenerateResult,
    InstanceInfo,
    LLMSchedError,
    MigrationResult,
    NodeDrainInfo,
    StreamChunk,
    error_for,
)
from scheduler.core.types import InstanceRole
from scheduler.telemetry.tracing import Span, SpanKind, Stage, Tracing, set_outcome

FIELD_METADATA_KEY = "llmsched-field"
RETRY_AFTER_METADATA_KEY = "retry-after"
RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE})
_BACKOFF_BASE_S = 0.05
_BACKOFF_CAP_S = 2.0
_INT32 = 1 << 31  # token ids are int32 on the wire

_ROLE_FROM_PROTO = {
    admin_pb2.INSTANCE_ROLE_PREFILL: InstanceRole.PREFILL,
    admin_pb2.INSTANCE_ROLE_DECODE: InstanceRole.DECODE,
    admin_pb2.INSTANCE_ROLE_MIXED: InstanceRole.MIXED,
}
_ROLE_TO_PROTO = {v: k for k, v in _ROLE_FROM_PROTO.items()}


def role_to_proto(role: InstanceRole | str) -> int:
    """``"prefill"`` / ``InstanceRole.PREFILL`` -> the proto enum value (ValueError names an unknown role)."""
    return _ROLE_TO_PROTO[InstanceRole.parse(role)]


@dataclass(frozen=True, slots=True)
class ClientTLS:
    """TLS for the channel. All PEM bytes; None ``root_certificates`` = the system roots.
    ``private_key`` + ``certificate_chain`` enable mTLS; ``server_name`` overrides the name checked in the cert."""

    root_certificates: bytes | None = None
    private_key: bytes | None = field(default=None, repr=False)  # NOTE: a secret: never in repr/logs
    certificate_chain: bytes | None = None
    server_name: str | None = None

    def __post_init__(self) -> None:
        # NOTE: grpc's C core aborts the whole process (a failed CHECK, not an exception) on a key without its
        # chain or a chain without its key, and answers non-PEM bytes with a retried UNAVAILABLE "Failed to create
        # security handshaker": both are refused here, naming the field.
        if (self.private_key is None) != (self.certificate_chain is None):
            missing = "certificate_chain" if self.certificate_chain is None else "private_key"
            raise ValueError(
                f"ClientTLS: mTLS needs both private_key and certificate_chain; {missing} is missing"
            )
        for name in ("root_certificates", "private_key", "certificate_chain"):
            pem = getattr(self, name)
            if pem is not None and (not isinstance(pem, bytes) or b"-----BEGIN " not in pem):
                got = "bytes without one" if isinstance(pem, bytes) else type(pem).__name__
                raise ValueError(f"ClientTLS: {name} must be PEM bytes with a '-----BEGIN ' line, got {got}")

    @classmethod
    def from_files(
        cls,
        ca: str | Path | None = None,
        cert: str | Path | None = None,
        key: str | Path | None = None,
        server_name: str | None = None,
    ) -> ClientTLS:
        def read(p: str | Path | None) -> bytes | None:
            return Path(p).read_bytes() if p else None

        return cls(read(ca), read(key), read(cert), server_name)

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(self.root_certificates, self.private_key, self.certificate_chain)


def channel_setup(
    tls: ClientTLS | bool | None, max_message_bytes: int | None
) -> tuple[grpc.ChannelCredentials | None, list[tuple[str, Any]]]:
    """Credentials (None = plaintext) and channel options."""
    options: list[tuple[str, Any]] = []
    if max_message_bytes:
        options += [
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
        ]
    if tls is None or tls is False:
        return None, options
    cfg = ClientTLS() if tls is True else tls
    if cfg.server_name:
        options.append(("grpc.ssl_target_name_override", cfg.server_name))
    return cfg.credentials(), options


def auth_metadata(token: str | None, name: str = "token") -> tuple[tuple[str, str], ...]:
    """The ``authorization`` metadata for ``token`` (None/empty: none). ValueError naming ``name`` for a token that
    is not printable ASCII without whitespace: grpc refused such a header at every call with INTERNAL "Invalid
    metadata" (e.g. a token read from a file with its newline), and the servers accept no such token anyway."""
    if token and not all("!" <= ch <= "~" for ch in token):
        raise ValueError(
            f"{name}: a bearer token must be printable ASCII without whitespace (strip a file's newline)"
        )
    return (("authorization", f"Bearer {token}"),) if token else ()


def new_request_id() -> str:
    # NOTE: the SDK always picks the id itself so a retry after UNAVAILABLE reuses it (idempotency key).
    return uuid.uuid4().hex


def build_generate_request(
    prompt: str | Sequence[int],
    *,
    request_id: str,
    max_tokens: int = 16,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int | None = None,
    stop_token_ids: Sequence[int] = (),
    ignore_eos: bool = False,
    model: str | None = None,
    priority: int = 0,
    ttft_slo_s: float | None = None,
    tpot_slo_s: float | None = None,
    length_hint: int | None = None,
    add_special_tokens: bool = True,
    tenant: str | None = None,
) -> inference_pb2.GenerateRequest:
    """The wire request. Validation is the server's job (one place); only the prompt type is checked here, and
    what protobuf itself refuses (a type, a value outside int32/int64) is named by its keyword."""
    sampling = inference_pb2.SamplingParams()
    _fill(
        sampling,
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        seed=seed,
        stop_token_ids=stop_token_ids,
        ignore_eos=ignore_eos,
    )
    req = inference_pb2.GenerateRequest(sampling=sampling)
    _fill(req, request_id=request_id, model=model or "", priority=priority)
    if isinstance(prompt, str):
        req.text = prompt
    elif isinstance(prompt, (bytes, bytearray, memoryview)):
        # A bytes object is a sequence of ints: without this it would silently go out as token ids = byte values.
        raise TypeError("prompt must be str or a sequence of int token ids, got bytes; decode text to str first")
    else:
        ids = _token_ids(prompt)
        req.token_ids.ids.extend(ids)
        if not ids:
            req.token_ids.SetInParent()  # an explicit empty list: let the server name the field
    if ttft_slo_s is not None or tpot_slo_s is not None:
        req.slo.ttft_ms = (ttft_slo_s or 0.0) * 1e3
        req.slo.tpot_ms = (tpot_slo_s or 0.0) * 1e3
    _fill(req, length_hint=length_hint, tenant=tenant)
    if not add_special_tokens:  # unset means true on the server (and to a server from before the field)
        req.add_special_tokens = False
    return req


def _fill(msg: Any, **fields: Any) -> None:
    """Set ``msg``'s fields from the keywords of the same names (None: left unset). protobuf's errors name no field
    ("Value out of range: 2147483648", "must be real number, not str"): they are raised again naming the keyword."""
    for name, value in fields.items():
        if value is None:
            continue
        try:
            current = getattr(msg, name)
            if hasattr(current, "extend"):  # a repeated field
                current.extend(value)
            else:
                setattr(msg, name, value)
        except (TypeError, ValueError) as e:
            raise type(e)(f"{name}: {e}") from None


def _token_ids(prompt: object) -> list[int]:
    """Token ids from a sequence / array of integers (``int``, numpy integers); bools and floats are refused."""
    if not isinstance(prompt, Iterable) or isinstance(prompt, Mapping):
        raise TypeError(f"prompt must be str or a sequence of int, got {type(prompt).__name__}")
    ids: list[int] = []
    for i, t in enumerate(prompt):
        if isinstance(t, bool):
            raise TypeError("prompt: token ids must be int, got bool")
        try:
            ids.append(operator.index(t))
        except TypeError:
            raise TypeError(f"prompt must be str or a sequence of int, got an element of type {type(t).__name__}"
                            ) from None
        # protobuf's own error would name neither the prompt nor the index
        if not -_INT32 <= ids[-1] < _INT32:
            raise ValueError(f"prompt[{i}]: token id {ids[-1]} is outside the wire's int32 range")
    return ids


def backoff_s(attempt: int, retry_after_s: float | None = None) -> float:
    """Exponential backoff with jitter for retry ``attempt`` (0-based); at least the server's retry-after."""
    delay = min(_BACKOFF_CAP_S, _BACKOFF_BASE_S * (2**attempt)) * random.uniform(0.5, 1.0)
    return max(delay, retry_after_s or 0.0)


def retry_delay(attempt: int, retry_after_s: float | None, deadline: float | None) -> float | None:
    """The backoff before retry ``attempt``, or None when it would end at or past the call's deadline (an attempt
    then would have no time left: the retries stay within ``timeout_s``)."""
    delay = backoff_s(attempt, retry_after_s)
    if deadline is not None and time.monotonic() + delay >= deadline:
        return None
    return delay


# What grpc raises for a call on a channel already closed (sync: ValueError; aio: UsageError, at the call or its first
# read). The clients turn it into ``closed_error`` once they know they were closed.
CLOSED_CHANNEL_ERRORS: tuple[type[Exception], ...] = (ValueError, grpc.aio.UsageError)


def closed_error(request_id: str | None = None) -> LLMSchedError:
    """What a call on a closed client raises: the ``Cancelled`` that a call cut off by ``close()`` gets, so one
    ``except LLMSchedError`` covers a shutdown race (grpc itself raises ValueError or UsageError)."""
    return error_for(grpc.StatusCode.CANCELLED, "the client is closed", request_id=request_id)


def convert_rpc_error(e: grpc.RpcError, request_id: str | None = None) -> LLMSchedError:
    """A typed :class:`LLMSchedError` from a grpc error (sync or aio)."""
    code = e.code() if callable(getattr(e, "code", None)) else grpc.StatusCode.UNKNOWN
    details = e.details() if callable(getattr(e, "details", None)) else str(e)
    field = retry_after = None
    md = e.trailing_metadata() if callable(getattr(e, "trailing_metadata", None)) else None
    for key, value in md or ():
        if key == FIELD_METADATA_KEY:
            field = value
        elif key == RETRY_AFTER_METADATA_KEY:
            try:
                retry_after = float(value)
            except ValueError:
                pass
    return error_for(
        code or grpc.StatusCode.UNKNOWN,
        details or "",
        field=field,
        retry_after_s=retry_after,
        request_id=request_id,
    )


def resumable(req: inference_pb2.GenerateRequest) -> bool:
    """Whether a retry can *resume* this request's stream. A retry re-runs the request from token 0 and the server
    trims what the client has: only greedy or seeded sampling draws the same tokens again. An unseeded sampled
    retry is a new sample, whose tail must not be glued to the head the caller already holds."""
    return req.sampling.temperature == 0.0 or req.sampling.HasField("seed")


def before_retry(req: inference_pb2.GenerateRequest, state: StreamState, err: LLMSchedError,
                 deadline: float | None, *, restart: bool) -> float:
    """The backoff before retrying a Generate that failed with the retryable ``err``; raises ``err`` instead when
    the retry could not continue the stream the caller holds or would not start before ``deadline``.

    An unseeded sampled request that already produced tokens draws a new sample on retry: gluing its tail to the
    tokens already handed out would be no sample at all, so ``generate()`` (``restart``) starts over and a stream,
    which cannot take tokens back, raises."""
    if state.next_index and not resumable(req):
        if not restart:
            raise err from None
        state.restart()
    delay = retry_delay(state.attempts - 1, err.retry_after_s, deadline)
    if delay is None:  # no time left for another attempt: the real cause, now
        raise err from None
    return delay


class StreamState:
    """Index bookkeeping across attempts: drops what was already delivered, detects gaps."""

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self.next_index = 0
        self.finished = False
        self.started = time.perf_counter()
        self.attempts = 0
        self.epoch = 0  # bumped when a retry restarts the stream from index 0 (generate() drops what it had)

    def restart(self) -> None:
        self.next_index = 0
        self.finished = False
        self.epoch += 1

    def accept(self, msg: inference_pb2.GenerateChunk) -> tuple[StreamChunk, ...]:
        """The chunks to hand to the caller: one per new token, so ``chunk.index`` is that token's sequence index
        (the server batches the tokens of one poll into one message); empty for a pure duplicate. A message that
        finishes the stream without new tokens becomes one empty finished chunk.

        Raises:
            StreamGap: the server skipped indices, or re-sent indices the client has with text (see below).
        """
        ids = tuple(msg.token_ids)
        index, text = msg.index, msg.text
        if index > self.next_index:
            raise error_for(
                grpc.StatusCode.DATA_LOSS,
                f"stream gap: expected index {self.next_index}, got {index}",
                request_id=self.request_id,
            )
        if index < self.next_index:  # a replay after a retry: keep only the new tail
            skip = self.next_index - index
            if skip >= len(ids) and not msg.finished:
                return ()
            if text and skip < len(ids):
                # The text belongs to the whole run, part of which the caller already has: without a tokenizer the
                # new tokens' share cannot be told (dropping it lost their text silently). This server trims to
                # ``resume_from_index``; one that does not breaks the protocol.
                raise error_for(
                    grpc.StatusCode.DATA_LOSS,
                    f"stream replay: indices {index}..{self.next_index - 1} re-sent with text for the whole run"
                    f" (expected the stream to resume at index {self.next_index}): the new tokens' text is unknown",
                    request_id=self.request_id,
                )
            ids, index, text = ids[skip:], self.next_index, ""
        self.next_index = index + len(ids)
        self.finished = msg.finished
        rid = msg.request_id or self.request_id
        reason = msg.finish_reason or None if msg.finished else None
        now = time.perf_counter() - self.started
        if not ids:  # finishes the stream, no new token
            return (StreamChunk(rid, index, ids, text, msg.finished, reason, msg.instance_id, now),)
        # The message's text belongs to its tokens together (detokenized as a run): it rides on the first one.
        last = len(ids) - 1
        return tuple(
            StreamChunk(rid, index + k, (t,), text if k == 0 else "", msg.finished and k == last,
                        reason if k == last else None, msg.instance_id, now)
            for k, t in enumerate(ids)
        )


def collect(request_id: str, chunks: list[StreamChunk], attempts: int, e2e_s: float) -> GenerateResult:
    token_ids: list[int] = []
    times: list[float] = []
    for c in chunks:
        token_ids.extend(c.token_ids)
        times.extend([c.arrival_s] * len(c.token_ids))
    return GenerateResult(
        request_id=request_id,
        token_ids=token_ids,
        text="".join(c.text for c in chunks),
        finish_reason=chunks[-1].finish_reason if chunks else None,
        chunks=chunks,
        ttft_s=times[0] if times else None,
        token_times=times,
        e2e_s=e2e_s,
        attempts=attempts,
    )


def instance_from_proto(m: admin_pb2.Instance) -> InstanceInfo:
    return InstanceInfo(
        instance_id=m.instance_id,
        role=_ROLE_FROM_PROTO.get(m.role),
        gpu=m.gpu,
        tp=m.tp,
        model=m.model,
        running=m.running,
        waiting=m.waiting,
        decoding=m.decoding,
        kv_blocks_used=m.kv_blocks_used,
        kv_blocks_total=m.kv_blocks_total,
        block_size=m.block_size,
        healthy=m.healthy,
        draining=m.draining,
        node_id=m.node_id,
        leaving=m.leaving,
    )


def cluster_state_from_proto(m: admin_pb2.ClusterState) -> ClusterStateInfo:
    return ClusterStateInfo(
        instances=tuple(instance_from_proto(i) for i in m.instances),
        router=m.router,
        requests_in_flight=m.requests_in_flight,
        extra=dict(m.extra),
    )


def migration_from_proto(m: admin_pb2.MigrationResult) -> MigrationResult:
    return MigrationResult(
        request_id=m.request_id,
        source=m.source,
        destination=m.destination,
        committed=m.committed,
        reason=m.reason,
        downtime_s=m.downtime_s,
        stages=m.stages,
    )


def node_drain_from_proto(m: admin_pb2.DrainNodeResponse) -> NodeDrainInfo:
    return NodeDrainInfo(node_id=m.node_id, drained=tuple(m.drained), kept=dict(m.kept),
                         requests_moved=m.requests_moved)


def start_generate_span(
    tracing: Tracing, req: inference_pb2.GenerateRequest, md: tuple[tuple[str, str], ...]
) -> tuple[Span, tuple[tuple[str, str], ...]]:
    """The client span of one generate (parent: the caller's current span) and the metadata carrying it.

    NOTE: the span is never made current: a generator's body runs in its consumer's context, so attaching here
    would leak the span into the caller's code between chunks.
    """
    span = tracing.start_span(
        Stage.CLIENT,
        request_id=req.request_id,
        kind=SpanKind.CLIENT,
        attributes={"rpc.system": "grpc", "rpc.service": "llmsched.v1.Inference", "rpc.method": "Generate"},
    )
    return span, md + tracing.metadata(context=Tracing.context_with(span))


def end_generate_span(span: Span, state: StreamState, err: BaseException | None) -> None:
    span.set_attribute("llmsched.attempts", state.attempts)
    span.set_attribute("llmsched.output_tokens", state.next_index)
    if err is None:
        set_outcome(span, ok=True, status="finished" if state.finished else "closed")
    elif isinstance(err, GeneratorExit) or type(err).__name__ == "CancelledError":
        span.set_attribute("llmsched.status", "cancelled")  # the caller stopped early: not an error
    else:
        code = getattr(err, "code", None)
        set_outcome(span, ok=False, status=getattr(code, "name", type(err).__name__).lower(),
                    description=str(err))
    span.end()


def call_timeout(timeout_s: float | None, default: float | None) -> float | None:
    """A call's timeout: its own ``timeout_s``, else the client's ``default`` (None: no deadline).

    Raises:
        ValueError: neither None nor a finite number of seconds > 0. grpc ran a call whose deadline had already
            passed (``timeout_s=-1``) as if it had none, and failed one with ``math.inf`` at once.
    """
    t = timeout_s if timeout_s is not None else default
    if t is not None and not 0 < t < math.inf:
        raise ValueError(f"timeout_s: must be a finite number of seconds > 0 (None: no deadline), got {t!r}")
    return t


def remaining(deadline: float | None) -> float | None:
    """Seconds left until a ``time.monotonic()`` deadline (None = no deadline)."""
    return None if deadline is None else max(deadline - time.monotonic(), 0.0)
