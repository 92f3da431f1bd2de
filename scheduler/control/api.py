"""What the gRPC/HTTP servers call: the ingress API of the control plane.

``scheduler.server`` (gRPC + OpenAI HTTP) depends only on this protocol; ``scheduler.control`` implements it
(Ray-backed ingress). Errors are typed so each server maps them to the right status once.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol

from scheduler.core.types import InstanceRole, InstanceSnapshot
from scheduler.engine.base import SamplingParams, TokenChunk


class IngressError(Exception):
    """Base: carries the offending field so servers can name it.

    Each class says once how both servers answer it: ``grpc_code`` (a ``grpc.StatusCode`` name), ``http_status`` and
    ``http_type`` (OpenAI's error type), ``status`` (the ``llmsched_requests_total`` label: a ``RequestStatus``
    value) and ``final`` (a 5xx that no retry can help: HTTP ``x-should-retry: false``, OpenAI clients retry other
    5xx; gRPC's SDK retries UNAVAILABLE only). ``retry_after_s``, where set, goes out as ``retry-after`` (gRPC
    trailing metadata, HTTP header): the SDK waits at least that long before its retry. ``reason_code``, where set,
    makes it an admission refusal: counted in ``llmsched_admission_rejected_total{reason}`` and as a ``rejected``
    request (``scheduler.server.validate.admission_reason``)."""

    grpc_code = "UNKNOWN"
    http_status = 500
    http_type = "server_error"
    status = "failed"
    final = False
    retry_after_s: float | None = None
    reason_code: str | None = None

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class InvalidRequest(IngressError):
    grpc_code, http_status, http_type, status = "INVALID_ARGUMENT", 400, "invalid_request_error", "invalid"


class TooLarge(InvalidRequest):  # no retry-after: a retry cannot help
    grpc_code, http_status = "RESOURCE_EXHAUSTED", 413

    def __init__(self, message: str, *, field: str | None = None, reason_code: str | None = None) -> None:
        super().__init__(message, field=field)
        # "too_large": the admission policy's (a prompt no instance of this cluster can hold); None: bad input (a
        # request over the server's byte limit), counted as invalid.
        self.reason_code = reason_code


class NotFound(IngressError):
    grpc_code, http_status, http_type, status = "NOT_FOUND", 404, "not_found_error", "not_found"


class Overloaded(IngressError):  # always with a retry-after
    grpc_code, http_status, http_type, status = "RESOURCE_EXHAUSTED", 429, "rate_limit_error", "rejected"

    def __init__(self, message: str, *, field: str | None = None, retry_after_s: float = 1.0,
                 reason_code: str = "ingress") -> None:
        super().__init__(message, field=field)
        self.retry_after_s = retry_after_s
        # Who said no, for ``llmsched_admission_rejected_total{reason}`` when the ingress raised it ("admission":
        # the ``policies.admission`` policy; "ingress": its in-flight bound or the router's refusal).
        self.reason_code = reason_code


# The retry-after of an UNAVAILABLE that waits on the cluster (no instance up or accepting, an id whose aborts are
# under way, the Controller restarting): it replaces a dead instance in ~1-2 s, which the SDK's own backoff (two
# retries within ~150 ms) never covered -- a second-long outage failed every request that arrived in it.
UNAVAILABLE_RETRY_AFTER_S = 1.0


class Unavailable(IngressError):
    """The SDK retries it; ``retry_after_s`` (``UNAVAILABLE_RETRY_AFTER_S`` where the cluster needs time) or none."""

    grpc_code, http_status, http_type, status = "UNAVAILABLE", 503, "service_unavailable", "unavailable"

    def __init__(self, message: str, *, field: str | None = None, retry_after_s: float | None = None) -> None:
        super().__init__(message, field=field)
        self.retry_after_s = retry_after_s


class RequestFailed(IngressError):
    """The request itself is the likely fault (a "query of death": engines failed while it ran on them)."""

    grpc_code, final = "INTERNAL", True


class DeadlineExceeded(IngressError):
    """The request's deadline (``GenerateRequest.deadline_s``) passed: no retry of it can succeed. Counted as gRPC
    counts a deadline that passes mid-stream (it cancels the call): cancelled."""

    grpc_code, http_status, http_type = "DEADLINE_EXCEEDED", 504, "timeout_error"
    status, final = "cancelled", True


@dataclass(frozen=True, slots=True)
class GenerateRequest:
    request_id: str  # client-chosen idempotency key, or server-assigned
    prompt: str | None = None
    prompt_token_ids: tuple[int, ...] | None = None
    sampling: SamplingParams = field(default_factory=SamplingParams)
    model: str | None = None
    priority: int = 0
    ttft_slo_s: float | None = None
    tpot_slo_s: float | None = None
    length_hint: int | None = None
    deadline_s: float | None = None  # absolute wall-clock deadline (time.time()) propagated from gRPC
    # vLLM's: tokenize a text prompt with the tokenizer's special tokens (BOS...); False for a chat template's
    # rendering, which holds its own.
    add_special_tokens: bool = True
    # The app / tenant it comes from, for the length predictor (``ServingPredictor.tenant_for``); None: the config's.
    tenant: str | None = None


@dataclass(frozen=True, slots=True)
class ClusterState:
    instances: tuple[InstanceSnapshot, ...]
    router: str
    requests_in_flight: int
    extra: dict[str, float] = field(default_factory=dict)
    nodes: dict[str, str] = field(default_factory=dict)  # instance id -> the Ray node it runs on


@dataclass(frozen=True, slots=True)
class MigrationResult:
    request_id: str
    source: str
    destination: str
    committed: bool
    reason: str = ""
    downtime_s: float = 0.0
    stages: int = 0
    # False: refused before any step (already moving, not decoding, no destination...): nothing was tried, so a
    # planner drops the plan rather than counting a failure (and resting the request).
    started: bool = True


@dataclass(frozen=True, slots=True)
class NodeDrainResult:
    """What Admin DrainNode did: the Ray node's id; the instances drained off it (requests migrated, released,
    replaced elsewhere); those left serving there, with why (the last instance of a phase: its requests had
    nowhere to go); requests moved (live-migrated off them by every ingress replica: the one the call reached moves
    its own, the others theirs on the Controller's plans)."""

    node_id: str
    drained: tuple[str, ...] = ()
    kept: dict[str, str] = field(default_factory=dict)
    requests_moved: int = 0


class IngressAPI(Protocol):
    """Optional, looked up by the HTTP front end: ``prompt_tokens(request) -> int`` (usage counts) and
    ``render_chat(messages, *, add_generation_prompt, chat_template_kwargs) -> str | None`` (the model's chat
    template; ``None``: it has none). ``scheduler.control.ingress.Ingress`` has both."""

    def generate(self, request: GenerateRequest) -> AsyncIterator[TokenChunk]:
        """Validate, route, dispatch; yield chunks with contiguous ``index`` from 0 until ``finished``.
        Raises ``IngressError`` subclasses before the first chunk for bad input / overload."""
        ...

    async def cancel(self, request_id: str) -> bool: ...

    async def cluster_state(self) -> ClusterState: ...

    async def migrate(self, request_id: str, destination: str | None = None) -> MigrationResult: ...

    async def drain(self, instance_id: str) -> int:
        """Migrate everything off ``instance_id``, then release it; returns requests moved (by every replica)."""
        ...

    async def drain_node(self, node: str, deadline_s: float = 0.0) -> NodeDrainResult:
        """A node is going away: nothing new placed on it; each instance on it drained and replaced elsewhere."""
        ...

    async def scale(self, pool: str, count: int) -> int: ...

    async def switch_role(self, instance_id: str, role: InstanceRole) -> bool:
        """Move an instance between PREFILL and DECODE (drain, then switch); False when nothing to start."""
        ...
