"""asyncio SDK client on ``grpc.aio``; the same methods as :class:`scheduler.client.Client`, awaitable.

Example::

    async with AsyncClient("localhost:50051") as c:
        r = await c.generate("Hello", max_tokens=32)
        async for chunk in c.stream("Hello"):
            ...
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from typing import Any, Self

import grpc

from scheduler._proto.llmsched.v1 import admin_pb2, admin_pb2_grpc, inference_pb2, inference_pb2_grpc
from scheduler.client import _common as c
from scheduler.client.types import (
    ClusterStateInfo,
    GenerateResult,
    InstanceInfo,
    MigrationResult,
    NodeDrainInfo,
    StreamChunk,
)
from scheduler.core.types import InstanceRole
from scheduler.telemetry.tracing import Tracing


def _channel_cancelled(request_id: str | None) -> Exception | None:
    """The typed ``Cancelled`` when grpc.aio raised CancelledError for a call that the *channel* cancelled (closed
    under it) while the awaiting task itself was not cancelled; None when the task is being cancelled (re-raise).
    ``Client`` raises ``Cancelled`` for the same event."""
    task = asyncio.current_task()
    if task is None or task.cancelling():
        return None
    return c.error_for(grpc.StatusCode.CANCELLED, "the call was cancelled (channel closed)", request_id=request_id)


class AsyncStream(AsyncIterator[StreamChunk]):
    """The async iterator ``AsyncClient.stream`` returns; also an async context manager. ``break`` alone cancels
    the request only once the iterator is garbage-collected: leave an ``async with`` block, or ``await
    aclose()``, to cancel it deterministically."""

    __slots__ = ("_gen",)

    def __init__(self, gen: AsyncGenerator[StreamChunk, None]) -> None:
        self._gen = gen

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> StreamChunk:
        return await self._gen.__anext__()

    async def aclose(self) -> None:
        await self._gen.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._gen.aclose()


class AsyncClient:
    """asyncio client for ``llmsched.v1``. Arguments as :class:`~scheduler.client.Client`.

    Create it inside the event loop that uses it (a ``grpc.aio`` channel is bound to its loop).
    """

    def __init__(
        self,
        target: str,
        *,
        token: str | None = None,
        admin_token: str | None = None,
        tls: c.ClientTLS | bool | None = None,
        timeout_s: float | None = None,
        retries: int = 2,
        max_message_bytes: int | None = None,
        tracing: Tracing | None = None,
    ) -> None:
        if retries < 0:
            raise ValueError(f"retries must be >= 0, got {retries}")
        creds, options = c.channel_setup(tls, max_message_bytes)
        self.target = target
        self._channel = (
            grpc.aio.secure_channel(target, creds, options)
            if creds is not None
            else grpc.aio.insecure_channel(target, options)
        )
        self._inference = inference_pb2_grpc.InferenceStub(self._channel)
        self._admin = admin_pb2_grpc.AdminStub(self._channel)
        self._md = c.auth_metadata(token)
        self._admin_md = c.auth_metadata(admin_token, "admin_token") if admin_token else self._md
        self.timeout_s = c.call_timeout(timeout_s, None)
        self.retries = retries
        self._tracing = tracing if tracing is not None else Tracing()
        self._closed = False

    # ------------------------------------------------------------------------------------------ inference

    def stream(
        self,
        prompt: str | Sequence[int],
        *,
        max_tokens: int = 16,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
        stop_token_ids: Sequence[int] = (),
        ignore_eos: bool = False,
        model: str | None = None,
        priority: int = 0,
        request_id: str | None = None,
        ttft_slo_s: float | None = None,
        tpot_slo_s: float | None = None,
        length_hint: int | None = None,
        add_special_tokens: bool = True,
        tenant: str | None = None,
        timeout_s: float | None = None,
    ) -> AsyncStream:
        """Async-iterate chunks (contiguous indices from 0). Leaving an ``async with ac.stream(...) as s:`` block
        (or ``await s.aclose()``) cancels the request; a bare ``break`` only once the iterator is collected."""
        req, state, timeout = self._build(
            prompt,
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            seed=seed,
            stop_token_ids=stop_token_ids,
            ignore_eos=ignore_eos,
            model=model,
            priority=priority,
            request_id=request_id,
            ttft_slo_s=ttft_slo_s,
            tpot_slo_s=tpot_slo_s,
            length_hint=length_hint,
            add_special_tokens=add_special_tokens,
            tenant=tenant,
            timeout_s=timeout_s,
        )
        return AsyncStream(self._stream(req, state, timeout))

    async def generate(
        self,
        prompt: str | Sequence[int],
        *,
        max_tokens: int = 16,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
        stop_token_ids: Sequence[int] = (),
        ignore_eos: bool = False,
        model: str | None = None,
        priority: int = 0,
        request_id: str | None = None,
        ttft_slo_s: float | None = None,
        tpot_slo_s: float | None = None,
        length_hint: int | None = None,
        add_special_tokens: bool = True,
        tenant: str | None = None,
        timeout_s: float | None = None,
    ) -> GenerateResult:
        """Run a request to completion (see :meth:`Client.generate`)."""
        req, state, timeout = self._build(
            prompt,
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            seed=seed,
            stop_token_ids=stop_token_ids,
            ignore_eos=ignore_eos,
            model=model,
            priority=priority,
            request_id=request_id,
            ttft_slo_s=ttft_slo_s,
            tpot_slo_s=tpot_slo_s,
            length_hint=length_hint,
            add_special_tokens=add_special_tokens,
            tenant=tenant,
            timeout_s=timeout_s,
        )
        chunks: list[StreamChunk] = []
        epoch = 0
        async for chunk in self._stream(req, state, timeout, restart=True):
            if state.epoch != epoch:  # a retry restarted an unseeded sampled request from scratch
                chunks.clear()
                epoch = state.epoch
            chunks.append(chunk)
        return c.collect(state.request_id, chunks, state.attempts, time.perf_counter() - state.started)

    def _build(
        self,
        prompt: str | Sequence[int],
        *,
        request_id: str | None = None,
        timeout_s: float | None = None,
        **params: Any,
    ) -> tuple[inference_pb2.GenerateRequest, c.StreamState, float | None]:
        rid = request_id or c.new_request_id()
        req = c.build_generate_request(prompt, request_id=rid, **params)
        return req, c.StreamState(rid), c.call_timeout(timeout_s, self.timeout_s)

    async def _stream(
        self, req: inference_pb2.GenerateRequest, state: c.StreamState, timeout_s: float | None,
        *, restart: bool = False,
    ) -> AsyncIterator[StreamChunk]:
        deadline = time.monotonic() + timeout_s if timeout_s is not None else None
        # The request goes out now (the first next()), not when stream() built it: the times count from here.
        state.started = time.perf_counter()
        span, md = c.start_generate_span(self._tracing, req, self._md)
        error: BaseException | None = None
        try:
            while True:
                req.resume_from_index = state.next_index
                state.attempts += 1
                try:
                    call = self._inference.Generate(req, timeout=c.remaining(deadline), metadata=md)
                except c.CLOSED_CHANNEL_ERRORS:
                    if self._closed:
                        raise c.closed_error(req.request_id) from None
                    raise
                try:
                    async for msg in call:
                        for chunk in state.accept(msg):
                            yield chunk
                        if state.finished:
                            return
                    return
                except grpc.RpcError as e:
                    err = c.convert_rpc_error(e, req.request_id)
                    if not self._may_retry(err, state.attempts, deadline):
                        raise err from None
                    delay = c.before_retry(req, state, err, deadline, restart=restart)
                    span.add_event("retry", {"llmsched.code": err.code.name if err.code else ""})
                    await asyncio.sleep(delay)
                except asyncio.CancelledError:
                    err2 = _channel_cancelled(req.request_id)
                    if err2 is None:
                        raise
                    raise err2 from None
                finally:
                    call.cancel()
        except BaseException as e:
            error = e
            raise
        finally:
            c.end_generate_span(span, state, error)

    async def cancel(self, request_id: str, *, timeout_s: float | None = None) -> bool:
        """See :meth:`Client.cancel` (retried: idempotent)."""
        resp = await self._unary(
            self._inference.Cancel,
            inference_pb2.CancelRequest(request_id=request_id),
            self._md,
            timeout_s,
            retry=True,
            request_id=request_id,
        )
        return resp.cancelled

    # ------------------------------------------------------------------------------------------ admin

    async def cluster_state(self, *, timeout_s: float | None = None) -> ClusterStateInfo:
        resp = await self._unary(
            self._admin.GetClusterState,
            admin_pb2.GetClusterStateRequest(),
            self._admin_md,
            timeout_s,
            retry=True,
        )
        return c.cluster_state_from_proto(resp)

    async def instances(self, *, timeout_s: float | None = None) -> list[InstanceInfo]:
        resp = await self._unary(
            self._admin.ListInstances, admin_pb2.ListInstancesRequest(), self._admin_md, timeout_s, retry=True
        )
        return [c.instance_from_proto(i) for i in resp.instances]

    async def migrate(
        self, request_id: str, destination: str | None = None, *, timeout_s: float | None = None
    ) -> MigrationResult:
        """See :meth:`Client.migrate` (not retried)."""
        msg = admin_pb2.MigrateRequestRequest(request_id=request_id)
        if destination is not None:
            msg.destination = destination
        resp = await self._unary(self._admin.MigrateRequest, msg, self._admin_md, timeout_s, retry=False,
                        request_id=request_id)
        return c.migration_from_proto(resp)

    async def drain(self, instance_id: str, *, timeout_s: float | None = None) -> int:
        """See :meth:`Client.drain` (not retried)."""
        resp = await self._unary(
            self._admin.DrainInstance,
            admin_pb2.DrainInstanceRequest(instance_id=instance_id),
            self._admin_md,
            timeout_s,
            retry=False,
        )
        return resp.requests_moved

    async def drain_node(
        self, node: str, *, deadline_s: float = 0.0, timeout_s: float | None = None
    ) -> NodeDrainInfo:
        """See :meth:`Client.drain_node` (not retried)."""
        resp = await self._unary(
            self._admin.DrainNode,
            admin_pb2.DrainNodeRequest(node=node, deadline_s=deadline_s),
            self._admin_md,
            timeout_s,
            retry=False,
        )
        return c.node_drain_from_proto(resp)

    async def scale(self, pool: str, count: int, *, timeout_s: float | None = None) -> int:
        """Set a pool's size; returns the pool's target size after the call (``count``). Answers once the new
        instances run, or after 60 s (the Controller's ``SCALE_WAIT_S``; those still starting join when up)."""
        resp = await self._unary(
            self._admin.Scale,
            admin_pb2.ScaleRequest(pool=pool, count=count),
            self._admin_md,
            timeout_s,
            retry=True,
        )
        return resp.count

    async def switch_role(self, instance_id: str, role: InstanceRole | str, *,
                          timeout_s: float | None = None) -> bool:
        """See :meth:`Client.switch_role` (not retried)."""
        resp = await self._unary(
            self._admin.SwitchRole,
            admin_pb2.SwitchRoleRequest(instance_id=instance_id, role=c.role_to_proto(role)),
            self._admin_md,
            timeout_s,
            retry=False,
        )
        return resp.started

    # ------------------------------------------------------------------------------------------ plumbing

    def _may_retry(self, err: Exception, attempts: int, deadline: float | None) -> bool:
        if getattr(err, "code", None) not in c.RETRYABLE or attempts > self.retries:
            return False
        return deadline is None or time.monotonic() < deadline

    async def _unary(
        self,
        method: Callable[..., Any],
        msg: Any,
        md: tuple[tuple[str, str], ...],
        timeout_s: float | None,
        *,
        retry: bool,
        request_id: str | None = None,
    ) -> Any:
        timeout_s = c.call_timeout(timeout_s, self.timeout_s)
        deadline = time.monotonic() + timeout_s if timeout_s is not None else None
        attempts = 0
        while True:
            attempts += 1
            try:
                return await method(msg, timeout=c.remaining(deadline), metadata=md + self._tracing.metadata())
            except grpc.RpcError as e:
                err = c.convert_rpc_error(e, request_id)
                if not retry or not self._may_retry(err, attempts, deadline):
                    raise err from None
                delay = c.retry_delay(attempts - 1, err.retry_after_s, deadline)
                if delay is None:
                    raise err from None
                await asyncio.sleep(delay)
            except asyncio.CancelledError:
                err2 = _channel_cancelled(request_id)
                if err2 is None:
                    raise
                raise err2 from None
            except c.CLOSED_CHANNEL_ERRORS:
                if self._closed:
                    raise c.closed_error(request_id) from None
                raise

    async def close(self) -> None:
        """Close the channel: calls in flight end ``Cancelled``, later calls raise ``Cancelled`` too."""
        self._closed = True
        await self._channel.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
