"""Typed results and errors of the llmsched SDK (no grpc objects leak out of the client)."""

from __future__ import annotations

from dataclasses import dataclass, field

import grpc

from scheduler.core.types import InstanceRole


@dataclass(frozen=True, slots=True)
class StreamChunk:
    """One new token of a request (``token_ids`` holds it; a last chunk that only says ``finished`` holds none).

    ``index`` is the token's sequence index: 0, 1, 2, ... with no gap or repeat across retries, P->D handoffs and
    migrations (``instance_id`` may change, the index never repeats). ``text`` is the detokenized text of the
    tokens that reached the client together, carried by the first of them (joining every chunk's text gives the
    whole output)."""

    request_id: str
    index: int
    token_ids: tuple[int, ...]
    text: str = ""
    finished: bool = False
    finish_reason: str | None = None
    instance_id: str = ""
    arrival_s: float = 0.0  # seconds since the request was sent (first attempt)


@dataclass(slots=True)
class GenerateResult:
    """A finished request as the client observed it."""

    request_id: str
    token_ids: list[int]
    text: str
    finish_reason: str | None
    chunks: list[StreamChunk]
    ttft_s: float | None  # first token's arrival, seconds after sending
    token_times: list[
        float
    ]  # arrival of each token, seconds after sending (tokens of one chunk share a time)
    e2e_s: float
    attempts: int = 1  # 1 + retries used

    @property
    def tpot_s(self) -> float | None:
        """Mean time per output token after the first (None with fewer than two tokens)."""
        if len(self.token_times) < 2:
            return None
        return (self.token_times[-1] - self.token_times[0]) / (len(self.token_times) - 1)

    @property
    def instance_ids(self) -> list[str]:
        """Instances that produced tokens, in order of first appearance."""
        seen: list[str] = []
        for c in self.chunks:
            if c.instance_id and c.instance_id not in seen:
                seen.append(c.instance_id)
        return seen


@dataclass(frozen=True, slots=True)
class InstanceInfo:
    instance_id: str
    role: InstanceRole | None
    gpu: str
    tp: int
    model: str
    running: int
    waiting: int
    decoding: int
    kv_blocks_used: int
    kv_blocks_total: int
    block_size: int
    healthy: bool
    draining: bool
    node_id: str = ""  # the Ray node it runs on (what ``drain_node`` takes); "" from an older server
    # Draining for an admin drain (``drain``/``drain_node``): released once its requests have moved; a scale-down
    # or role-switch drain is ``draining`` but not leaving. False from an older server.
    leaving: bool = False

    @property
    def kv_usage(self) -> float:
        return self.kv_blocks_used / self.kv_blocks_total if self.kv_blocks_total else 0.0


@dataclass(frozen=True, slots=True)
class ClusterStateInfo:
    instances: tuple[InstanceInfo, ...]
    router: str
    requests_in_flight: int
    extra: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class NodeDrainInfo:
    """Admin DrainNode's answer: the Ray node id, instances drained off it (and replaced elsewhere), those kept
    in service there (instance -> why), requests moved."""

    node_id: str
    drained: tuple[str, ...]
    kept: dict[str, str]
    requests_moved: int


@dataclass(frozen=True, slots=True)
class MigrationResult:
    request_id: str
    source: str
    destination: str
    committed: bool
    reason: str = ""
    downtime_s: float = 0.0
    stages: int = 0


# ------------------------------------------------------------------------------------------------ errors


class LLMSchedError(Exception):
    """A failed call. ``code`` is the gRPC status; ``field`` names the offending request field when known."""

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        *,
        field: str | None = None,
        retry_after_s: float | None = None,
        request_id: str | None = None,
    ) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message
        self.field = field
        self.retry_after_s = retry_after_s
        self.request_id = request_id


class InvalidArgument(LLMSchedError):
    pass


class NotFound(LLMSchedError):
    pass


class ResourceExhausted(LLMSchedError):
    """Overloaded (``retry_after_s`` set) or payload too large."""


class Unavailable(LLMSchedError):
    pass


class DeadlineExceeded(LLMSchedError):
    pass


class Unauthenticated(LLMSchedError):
    pass


class PermissionDenied(LLMSchedError):
    pass


class Cancelled(LLMSchedError):
    pass


class Unimplemented(LLMSchedError):
    pass


class StreamGap(LLMSchedError):
    """The server skipped a sequence index, or re-sent indices before ``resume_from_index`` with text for the whole
    run (protocol violations: tokens or text would be lost)."""


_BY_CODE: dict[grpc.StatusCode, type[LLMSchedError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.CANCELLED: Cancelled,
    grpc.StatusCode.UNIMPLEMENTED: Unimplemented,
    grpc.StatusCode.DATA_LOSS: StreamGap,
}


def error_for(
    code: grpc.StatusCode,
    message: str,
    *,
    field: str | None = None,
    retry_after_s: float | None = None,
    request_id: str | None = None,
) -> LLMSchedError:
    """The typed exception for a status code."""
    cls = _BY_CODE.get(code, LLMSchedError)
    return cls(code, message, field=field, retry_after_s=retry_after_s, request_id=request_id)
