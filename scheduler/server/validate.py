"""Request validation shared by the gRPC and HTTP front ends.

Both build a :class:`GenerateRequest` and call :func:`validate_generate`; only the *names* of fields differ
(``sampling.max_tokens`` on gRPC, ``max_tokens`` in the OpenAI body), so each front end passes its own
:data:`FieldNames`. Errors are :class:`InvalidRequest` with ``field`` set: the servers map them to
INVALID_ARGUMENT / HTTP 400 with the field named.
"""

from __future__ import annotations

import math
import uuid

from scheduler.control.api import GenerateRequest, InvalidRequest, NotFound, Overloaded, Unavailable
from scheduler.telemetry.metrics import RequestStatus

MAX_REQUEST_ID_CHARS = 256

# Canonical field -> wire name. Keys are the names used in messages below.
FieldNames = dict[str, str]

GRPC_FIELDS: FieldNames = {
    "request_id": "request_id",
    "prompt": "prompt",
    "prompt.text": "prompt.text",
    "prompt.token_ids": "prompt.token_ids",
    "max_tokens": "sampling.max_tokens",
    "temperature": "sampling.temperature",
    "top_p": "sampling.top_p",
    "top_k": "sampling.top_k",
    "stop_token_ids": "sampling.stop_token_ids",
    "ttft": "slo.ttft_ms",
    "tpot": "slo.tpot_ms",
    "length_hint": "length_hint",
}

HTTP_FIELDS: FieldNames = {
    "request_id": "request_id",
    "prompt": "prompt",
    "prompt.text": "prompt",
    "prompt.token_ids": "prompt",
    "max_tokens": "max_tokens",
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "stop_token_ids": "stop_token_ids",
    "ttft": "ttft_slo_s",
    "tpot": "tpot_slo_s",
    "length_hint": "length_hint",
}


def new_request_id() -> str:
    """A server-assigned request id (when the client sent none)."""
    return uuid.uuid4().hex


def validate_generate(req: GenerateRequest, names: FieldNames = GRPC_FIELDS) -> None:
    """Raise :class:`InvalidRequest` naming the first bad field of ``req``; return None when it is valid."""

    def bad(key: str, message: str, index: int | None = None) -> InvalidRequest:
        name = names[key] + (f"[{index}]" if index is not None else "")
        return InvalidRequest(f"{name}: {message}", field=name)

    if len(req.request_id) > MAX_REQUEST_ID_CHARS:
        raise bad(
            "request_id", f"must be at most {MAX_REQUEST_ID_CHARS} characters, got {len(req.request_id)}"
        )
    if any(ord(c) < 0x20 for c in req.request_id):
        raise bad("request_id", "must not contain control characters")
    has_text = req.prompt is not None
    has_ids = req.prompt_token_ids is not None
    if has_text and has_ids:
        raise bad("prompt", "set exactly one of text or token_ids, got both")
    if not has_text and not has_ids:
        raise bad("prompt", "missing: set text or token_ids")
    if has_text and not req.prompt:
        raise bad("prompt.text", "must not be empty")
    if has_ids:
        ids = req.prompt_token_ids or ()
        if not ids:
            raise bad("prompt.token_ids", "must not be empty")
        for i, tok in enumerate(ids):
            if tok < 0:
                raise bad("prompt.token_ids", f"token ids must be >= 0, got {tok}", i)
    s = req.sampling
    if s.max_tokens <= 0:
        raise bad("max_tokens", f"must be > 0, got {s.max_tokens}")
    if not math.isfinite(s.temperature) or s.temperature < 0:
        raise bad("temperature", f"must be a finite number >= 0, got {s.temperature}")
    if not math.isfinite(s.top_p) or not 0.0 < s.top_p <= 1.0:
        raise bad("top_p", f"must be in (0, 1], got {s.top_p}")
    if s.top_k < 0:
        raise bad("top_k", f"must be >= 0 (0 disables), got {s.top_k}")
    for i, tok in enumerate(s.stop_token_ids):
        if tok < 0:
            raise bad("stop_token_ids", f"token ids must be >= 0, got {tok}", i)
    for key, value in (("ttft", req.ttft_slo_s), ("tpot", req.tpot_slo_s)):
        if value is not None and (not math.isfinite(value) or value < 0):
            raise bad(key, f"must be a finite number >= 0, got {value}")
    if req.length_hint is not None and req.length_hint < 0:
        raise bad("length_hint", f"must be >= 0, got {req.length_hint}")


def request_status_for(exc: BaseException) -> RequestStatus:
    """The metrics/span status of a request that ended with ``exc`` (same mapping on gRPC and HTTP)."""
    if isinstance(exc, InvalidRequest):
        return RequestStatus.INVALID
    if isinstance(exc, NotFound):
        return RequestStatus.NOT_FOUND
    if isinstance(exc, Overloaded):
        return RequestStatus.REJECTED
    if isinstance(exc, Unavailable):
        return RequestStatus.UNAVAILABLE
    return RequestStatus.FAILED


def request_status_of_finish(reason: str | None) -> RequestStatus:
    """The status of a stream that ended with a finished chunk of ``finish_reason``."""
    if reason == "abort":
        return RequestStatus.CANCELLED
    if reason and reason.startswith("error"):
        return RequestStatus.FAILED
    return RequestStatus.FINISHED
