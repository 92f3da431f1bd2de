"""Request validation shared by the gRPC and HTTP front ends.

Both build a :class:`GenerateRequest` and call :func:`validate_generate`; only the *names* of fields differ
(``sampling.max_tokens`` on gRPC, ``max_tokens`` in the OpenAI body), so each front end passes its own
:data:`FieldNames`. Errors are :class:`InvalidRequest` with ``field`` set: the servers map them to
INVALID_ARGUMENT / HTTP 400 with the field named.
"""

from __future__ import annotations

import math
import unicodedata
import uuid

from scheduler.control.api import GenerateRequest, IngressError, InvalidRequest, Overloaded, TooLarge
from scheduler.telemetry.metrics import RequestStatus

MAX_REQUEST_ID_CHARS = 256
# A tenant is an app name the length predictor looks up (and logs once when it does not know it), not free text.
MAX_TENANT_CHARS = 128
# The gRPC wire's integer types (int32 / int64): HTTP's JSON integers are held to them too, so both APIs take the same
# values (a length_hint of 10**400 passed over HTTP and overflowed float() in its instance's snapshots).
INT32, INT64 = 1 << 31, 1 << 63

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
    "seed": "sampling.seed",
    "ignore_eos": "sampling.ignore_eos",
    "stop_token_ids": "sampling.stop_token_ids",
    "priority": "priority",
    "model": "model",
    "ttft": "slo.ttft_ms",
    "tpot": "slo.tpot_ms",
    "length_hint": "length_hint",
    "tenant": "tenant",
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
    "seed": "seed",
    "ignore_eos": "ignore_eos",
    "stop_token_ids": "stop_token_ids",
    "priority": "priority",
    "model": "model",
    "ttft": "ttft_slo_s",
    "tpot": "tpot_slo_s",
    "length_hint": "length_hint",
    "tenant": "tenant",
}

# The chat endpoint's: its prompt is the client's ``messages`` (OpenAI's field), rendered to one text.
CHAT_FIELDS: FieldNames = {**HTTP_FIELDS, "prompt": "messages", "prompt.text": "messages"}

# Field names in the ingress' and the engines' errors (they name fields as the engine API does) -> the keys above.
_INGRESS_FIELDS: dict[str, str] = {
    "prompt_token_ids": "prompt.token_ids",
    "ttft_slo_s": "ttft",
    "tpot_slo_s": "tpot",
    **{k: k for k in ("request_id", "model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "seed",
                      "stop_token_ids", "ignore_eos", "priority", "length_hint")},
    **{f"sampling.{k}": k for k in ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop_token_ids",
                                    "ignore_eos")},
}


def relabel(e: BaseException, names: FieldNames) -> BaseException:
    """An ingress ``InvalidRequest`` re-labelled with the front end's field name (message prefix and ``field``); an
    admission ``TooLarge`` too (the prompt no instance holds: a chat's is its ``messages``), kept a ``TooLarge``."""
    key = _INGRESS_FIELDS.get(e.field or "") if type(e) in (InvalidRequest, TooLarge) else None
    if key is None or key not in names:
        return e
    old, new = e.field or "", names[key]
    msg = str(e)
    if msg.startswith(f"{old}:"):
        msg = new + msg[len(old):]
    if isinstance(e, TooLarge):
        return TooLarge(msg, field=new, reason_code=e.reason_code)
    return InvalidRequest(msg, field=new)


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
    if any(unicodedata.category(c) == "Cc" for c in req.request_id):  # C0, DEL and C1 (e.g. CSI) alike
        raise bad("request_id", "must not contain control characters")
    if req.tenant is not None:
        if not isinstance(req.tenant, str):
            raise bad("tenant", f"must be a string, got {type(req.tenant).__name__}")
        if len(req.tenant) > MAX_TENANT_CHARS:
            raise bad("tenant", f"must be at most {MAX_TENANT_CHARS} characters, got {len(req.tenant)}")
        if any(unicodedata.category(c) == "Cc" for c in req.tenant):  # it is logged, as request_id is
            raise bad("tenant", "must not contain control characters")
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
            if not 0 <= tok < INT32:
                raise bad("prompt.token_ids", f"token ids must be in [0, {INT32}), got {tok}", i)
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
        if not 0 <= tok < INT32:
            raise bad("stop_token_ids", f"token ids must be in [0, {INT32}), got {tok}", i)
    for key, value in (("ttft", req.ttft_slo_s), ("tpot", req.tpot_slo_s)):
        if value is not None and (not math.isfinite(value) or value < 0):
            raise bad(key, f"must be a finite number >= 0, got {value}")
    if req.length_hint is not None and req.length_hint < 0:
        raise bad("length_hint", f"must be >= 0, got {req.length_hint}")
    for key, value, bound in (("max_tokens", s.max_tokens, INT32), ("top_k", s.top_k, INT32),
                              ("priority", req.priority, INT32), ("seed", s.seed, INT64),
                              ("length_hint", req.length_hint, INT64)):
        if value is not None and not -bound <= value < bound:
            raise bad(key, f"must be in [{-bound}, {bound}), got {value}")


def request_status_for(exc: BaseException) -> RequestStatus:
    """The metrics/span status of a request that ended with ``exc`` (same on gRPC and HTTP: the ``IngressError``
    class names it)."""
    return RequestStatus(exc.status) if isinstance(exc, IngressError) else RequestStatus.FAILED


def admission_reason(exc: BaseException, *, started: bool) -> str | None:
    """The ``llmsched_admission_rejected_total{reason}`` of an error that refused a request, or None when it is no
    admission refusal: ``server_limit`` (the server's limiter, before the request started), else the ingress's
    ``reason_code`` (``admission``: ``policies.admission``; ``too_large``: that policy's "this prompt fits no
    instance"; ``ingress``: its in-flight bound or the router's refusal)."""
    if not isinstance(exc, IngressError) or exc.reason_code is None:
        return None
    return "server_limit" if isinstance(exc, Overloaded) and not started else exc.reason_code


def request_status_of_finish(reason: str | None) -> RequestStatus:
    """The status of a stream that ended with a finished chunk of ``finish_reason``."""
    if reason == "abort":
        return RequestStatus.CANCELLED
    if reason and reason.startswith("error"):
        return RequestStatus.FAILED
    return RequestStatus.FINISHED
