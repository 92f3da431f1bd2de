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
    """Base: carries the offending field so servers can name it."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class InvalidRequest(IngressError):  # -> INVALID_ARGUMENT / HTTP 400
    pass


class TooLarge(InvalidRequest):  # -> RESOURCE_EXHAUSTED (no retry-after: a retry cannot help) / HTTP 413
    pass


class NotFound(IngressError):  # -> NOT_FOUND / HTTP 404
    pass


class Overloaded(IngressError):  # -> RESOURCE_EXHAUSTED / HTTP 429 (+ retry-after)
    def __init__(self, message: str, *, field: str | None = None, retry_after_s: float = 1.0) -> None:
        super().__init__(message, field=field)
        self.retry_after_s = retry_after_s


class Unavailable(IngressError):  # -> UNAVAILABLE / HTTP 503
    pass


class RequestFailed(IngressError):  # -> INTERNAL / HTTP 500: final, the SDK does not retry it
    """The request itself is the likely fault (a "query of death": engines failed while it ran on them)."""


@dataclass(frozen=True, slots=True)
class GenerateRequest:
    request_id: str  # client-chosen idempotency key, or server-assigned
    prompt: str | None = None
    prompt_token_ids: tuple[int, ...] | None = None
    sampling: SamplingParams = SamplingParams()
    model: str | None = None
    priority: int = 0
    ttft_slo_s: float | None = None
    tpot_slo_s: float | None = None
    length_hint: int | None = None
    deadline_s: float | None = None  # absolute wall-clock deadline (time.time()) propagated from gRPC
    # vLLM's: tokenize a text prompt with the tokenizer's special tokens (BOS...); False for a chat template's
    # rendering, which holds its own.
    add_special_tokens: bool = True


@dataclass(frozen=True, slots=True)
class ClusterState:
    instances: tuple[InstanceSnapshot, ...]
    router: str
    requests_in_flight: int
    extra: dict[str, float] = field(default_factory=dict)


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
        """Migrate everything off ``instance_id``, then release it; returns requests moved."""
        ...

    async def scale(self, pool: str, count: int) -> int: ...

    async def switch_role(self, instance_id: str, role: InstanceRole) -> bool:
        """Move an instance between PREFILL and DECODE (drain, then switch); False when nothing to start."""
        ...
