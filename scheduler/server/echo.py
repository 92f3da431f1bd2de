"""``EchoIngress``: a deterministic, dependency-free :class:`IngressAPI` for server/SDK tests, benches and smoke runs.

It streams the prompt back (token ids cyclically; text prompts as code points) with an optional per-token sleep,
honours cancel, stop tokens and deadlines, and can inject the faults the servers must map (overload, unavailable
mid-stream once per request id, unknown model). It records what it saw so tests can assert on the ingress side.
No Ray, no engine: the real ingress lives in ``scheduler.control``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from scheduler.control.api import (
    ClusterState,
    GenerateRequest,
    InvalidRequest,
    MigrationResult,
    NotFound,
    Overloaded,
    Unavailable,
)
from scheduler.core.types import InstanceRole, InstanceSnapshot
from scheduler.engine.base import TokenChunk


@dataclass
class EchoIngress:
    """Streams ``max_tokens`` tokens echoing the prompt.

    Args:
        token_delay_s: sleep before each chunk (0 = just yield to the loop).
        chunk_tokens: tokens per chunk.
        max_inflight: more concurrent requests than this -> ``Overloaded`` (retry-after 0.5 s).
        max_model_len: prompt + max_tokens beyond this -> ``InvalidRequest(field="max_tokens")``.
        models: accepted model names (None or "" = default); others -> ``InvalidRequest(field="model")``.
        fail_once_after: if set, the first attempt of each request id raises ``Unavailable`` after this many
            tokens; a retry with the same id then succeeds (exercises the SDK's idempotent retry).
        enforce_deadline: end the stream with ``finish_reason="abort"`` once ``deadline_s`` passes.
    """

    token_delay_s: float = 0.0
    chunk_tokens: int = 1
    max_inflight: int = 1_000_000
    max_model_len: int = 1 << 20
    models: tuple[str, ...] = ("echo",)
    fail_once_after: int | None = None
    instance_ids: tuple[str, ...] = ("echo-0", "echo-1")
    # Off by default: the gRPC layer enforces deadlines itself (cancels the handler, then ingress.cancel()).
    enforce_deadline: bool = False
    requests: list[GenerateRequest] = field(default_factory=list)
    cancelled: list[str] = field(default_factory=list)
    finished: list[str] = field(default_factory=list)
    _inflight: dict[str, asyncio.Event] = field(default_factory=dict)
    _attempts: dict[str, int] = field(default_factory=dict)
    draining: set[str] = field(default_factory=set)
    scaled: dict[str, int] = field(default_factory=dict)
    switched: dict[str, InstanceRole] = field(default_factory=dict)

    def generate(self, request: GenerateRequest) -> AsyncIterator[TokenChunk]:
        # Checks happen here, synchronously, so errors surface before the first chunk (as the protocol says).
        if request.model not in (None, "", *self.models):
            raise InvalidRequest(
                f"model: unknown model {request.model!r}; serving {list(self.models)}", field="model"
            )
        prompt_len = len(request.prompt_token_ids or request.prompt or "")
        if prompt_len + request.sampling.max_tokens > self.max_model_len:
            raise InvalidRequest(
                f"max_tokens: prompt ({prompt_len}) + max_tokens ({request.sampling.max_tokens}) exceeds the "
                f"model's context ({self.max_model_len})",
                field="max_tokens",
            )
        if len(self._inflight) >= self.max_inflight:
            raise Overloaded("too many requests in flight; retry later", retry_after_s=0.5)
        self.requests.append(request)
        return self._stream(request)

    async def _stream(self, request: GenerateRequest) -> AsyncIterator[TokenChunk]:
        rid = request.request_id
        attempt = self._attempts.get(rid, 0)
        self._attempts[rid] = attempt + 1
        cancel = asyncio.Event()
        self._inflight[rid] = cancel
        source = list(request.prompt_token_ids or [ord(c) for c in request.prompt or ""])
        stops = set(request.sampling.stop_token_ids)
        n = request.sampling.max_tokens
        try:
            i = 0
            while i < n:
                if self.token_delay_s:
                    await asyncio.sleep(self.token_delay_s)
                else:
                    await asyncio.sleep(0)
                if cancel.is_set():
                    yield TokenChunk(rid, i, (), finished=True, finish_reason="abort")
                    return
                if (
                    self.enforce_deadline
                    and request.deadline_s is not None
                    and time.time() > request.deadline_s
                ):
                    yield TokenChunk(rid, i, (), finished=True, finish_reason="abort")
                    return
                if self.fail_once_after is not None and attempt == 0 and i >= self.fail_once_after:
                    raise Unavailable("echo: injected instance failure", field=None)
                ids = tuple(source[(i + k) % len(source)] for k in range(min(self.chunk_tokens, n - i)))
                stop_at = next((k for k, t in enumerate(ids) if t in stops), None)
                if stop_at is not None:
                    ids = ids[: stop_at + 1]
                done = stop_at is not None or i + len(ids) >= n
                reason = ("stop" if stop_at is not None else "length") if done else None
                text = "".join(chr(t) if 0 <= t < 0x110000 and chr(t).isprintable() else "" for t in ids)
                yield TokenChunk(rid, i, ids, finished=done, finish_reason=reason, text=text)
                i += len(ids)
                if done:
                    self.finished.append(rid)
                    return
        finally:
            self._inflight.pop(rid, None)

    def prompt_tokens(self, request: GenerateRequest) -> int:
        """The prompt's length in this echo's tokens (one per character of a text prompt, as ``_stream``)."""
        return len(request.prompt_token_ids or request.prompt or "")

    async def cancel(self, request_id: str) -> bool:
        self.cancelled.append(request_id)
        ev = self._inflight.get(request_id)
        if ev is None:
            return False
        ev.set()
        return True

    async def cluster_state(self) -> ClusterState:
        insts = tuple(
            InstanceSnapshot(
                instance_id=iid,
                role=self.switched.get(iid, InstanceRole.MIXED),  # (a switch_role is done at once here)
                model=self.models[0] if self.models else "default",
                num_running=len(self._inflight) if k == 0 else 0,
                kv_blocks_total=1024,
                draining=iid in self.draining,
                leaving=iid in self.draining,  # drain() is an admin drain: released once its requests moved
            )
            for k, iid in enumerate(self.instance_ids)
        )
        return ClusterState(
            instances=insts, router="echo", requests_in_flight=len(self._inflight), extra={"echo": 1.0}
        )

    async def migrate(self, request_id: str, destination: str | None = None) -> MigrationResult:
        if request_id not in self._inflight:
            raise NotFound(f"request_id: no running request {request_id!r}", field="request_id")
        if destination is not None and destination not in self.instance_ids:
            raise NotFound(f"destination: no instance {destination!r}", field="destination")
        return MigrationResult(request_id, self.instance_ids[0], destination or self.instance_ids[-1], True)

    async def drain(self, instance_id: str) -> int:
        if instance_id not in self.instance_ids:
            raise NotFound(f"instance_id: no instance {instance_id!r}", field="instance_id")
        self.draining.add(instance_id)
        return 0

    async def scale(self, pool: str, count: int) -> int:
        self.scaled[pool] = count
        return count

    async def switch_role(self, instance_id: str, role: InstanceRole) -> bool:
        if instance_id not in self.instance_ids:
            raise NotFound(f"instance_id: no instance {instance_id!r}", field="instance_id")
        started = self.switched.get(instance_id) is not role
        self.switched[instance_id] = role
        return started
