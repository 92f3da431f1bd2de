"""Blocking SDK client. ``AsyncClient`` (``aio_client.py``) mirrors it method for method.

Example::

    from scheduler.client import Client

    with Client("localhost:50051", token="...") as c:
        r = c.generate("Hello", max_tokens=32)
        print(r.text, r.ttft_s)
        for chunk in c.stream([1, 2, 3], max_tokens=8):
            print(chunk.index, chunk.token_ids)
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator, Iterator, Sequence
from typing import Any, Self, TypeVar

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

T = TypeVar("T")


class Stream(Iterator[StreamChunk]):
    """The iterator ``Client.stream`` returns; also a context manager. ``break`` alone cancels the request only
    once the iterator is garbage-collected (a variable that still holds it keeps the request running): leave a
    ``with`` block, or call ``close()``, to cancel it deterministically."""

    __slots__ = ("_gen",)

    def __init__(self, gen: Generator[StreamChunk, None, None]) -> None:
        self._gen = gen

    def __iter__(self) -> Self:
        return self

    def __next__(self) -> StreamChunk:
        return next(self._gen)

    def close(self) -> None:
        self._gen.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self._gen.close()


class Client:
    """Blocking client for ``llmsched.v1`` (Inference + Admin).

    Args:
        target: ``host:port``.
        token: bearer token for Inference.
        admin_token: bearer token for Admin calls (falls back to ``token``).
        tls: None/False = plaintext; True = TLS with system roots; a :class:`ClientTLS` for CA / mTLS / name.
        timeout_s: default deadline per call (a whole generate, including retries): seconds > 0, finite; None
            = no deadline. Each call's ``timeout_s`` overrides it.
        retries: retries after UNAVAILABLE (same request id; streams resume without duplicated indices).
        max_message_bytes: channel message-size limit (default: grpc's 4 MiB).
        tracing: OpenTelemetry spans; each generate gets a CLIENT span whose W3C ``traceparent`` travels in the
            metadata (the server's span is its child). None = the global provider (a no-op unless the application
            configured OpenTelemetry; the caller's current trace context is still propagated).
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
            grpc.secure_channel(target, creds, options)
            if creds is not None
            else grpc.insecure_channel(target, options)
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
    ) -> Stream:
        """Yield chunks as they arrive: contiguous ``index`` from 0, last one ``finished``.

        Leaving a ``with c.stream(...) as s:`` block, or ``s.close()``, cancels the request on the server; a bare
        ``break`` does so only once nothing references the iterator any more.

        ``add_special_tokens``: the server tokenizes a text prompt with the tokenizer's special tokens (BOS...), as
        vLLM does; pass False for a prompt that holds them already (e.g. rendered by a chat template).

        ``tenant``: the app / tenant the request comes from; the server's length predictor conditions on it where it
        knows the name (else it guesses without one). ``None``: the deployment's configured tenant.

        Raises:
            LLMSchedError: a subclass per status (``InvalidArgument`` with ``.field``, ``ResourceExhausted`` with
                ``.retry_after_s``, ``DeadlineExceeded``, ``Unavailable`` after the retries, ...).
        """
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
        return Stream(self._stream(req, state, timeout))

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

    def _stream(
        self, req: inference_pb2.GenerateRequest, state: c.StreamState, timeout_s: float | None,
        *, restart: bool = False,
    ) -> Iterator[StreamChunk]:
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
                    for msg in call:
                        yield from state.accept(msg)
                        if state.finished:
                            return
                    return  # stream ended without a finished chunk: treat as done (server closed OK)
                except grpc.RpcError as e:
                    err = c.convert_rpc_error(e, req.request_id)
                    if not self._may_retry(err, state.attempts, deadline):
                        raise err from None
                    delay = c.before_retry(req, state, err, deadline, restart=restart)
                    span.add_event("retry", {"llmsched.code": err.code.name if err.code else ""})
                    time.sleep(delay)
                finally:
                    call.cancel()  # no-op after a clean finish; frees the server's work on early exit
        except BaseException as e:
            error = e
            raise
        finally:
            c.end_generate_span(span, state, error)

    def generate(
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
        """Run a request to completion; same arguments as :meth:`stream`.

        Returns:
            :class:`GenerateResult` with ``token_ids``, ``text``, ``request_id``, ``finish_reason``, ``chunks``,
            ``ttft_s``, ``token_times`` (seconds after sending), ``e2e_s``.
        """
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
        for chunk in self._stream(req, state, timeout, restart=True):
            if state.epoch != epoch:  # a retry restarted an unseeded sampled request from scratch
                chunks.clear()
                epoch = state.epoch
            chunks.append(chunk)
        return c.collect(state.request_id, chunks, state.attempts, time.perf_counter() - state.started)

    def cancel(self, request_id: str, *, timeout_s: float | None = None) -> bool:
        """Cancel a running request; True when it was running. Retried after UNAVAILABLE (a cancel is idempotent),
        so False may also mean that an attempt whose reply was lost cancelled it."""
        resp = self._unary(
            self._inference.Cancel,
            inference_pb2.CancelRequest(request_id=request_id),
            self._md,
            timeout_s,
            retry=True,
            request_id=request_id,
        )
        return resp.cancelled

    # ------------------------------------------------------------------------------------------ admin

    def cluster_state(self, *, timeout_s: float | None = None) -> ClusterStateInfo:
        resp = self._unary(
            self._admin.GetClusterState,
            admin_pb2.GetClusterStateRequest(),
            self._admin_md,
            timeout_s,
            retry=True,
        )
        return c.cluster_state_from_proto(resp)

    def instances(self, *, timeout_s: float | None = None) -> list[InstanceInfo]:
        resp = self._unary(
            self._admin.ListInstances, admin_pb2.ListInstancesRequest(), self._admin_md, timeout_s, retry=True
        )
        return [c.instance_from_proto(i) for i in resp.instances]

    def migrate(
        self, request_id: str, destination: str | None = None, *, timeout_s: float | None = None
    ) -> MigrationResult:
        """Live-migrate a running request (not retried: a migration is not idempotent)."""
        msg = admin_pb2.MigrateRequestRequest(request_id=request_id)
        if destination is not None:
            msg.destination = destination
        return c.migration_from_proto(
            self._unary(self._admin.MigrateRequest, msg, self._admin_md, timeout_s, retry=False,
                        request_id=request_id)
        )

    def drain(self, instance_id: str, *, timeout_s: float | None = None) -> int:
        """Migrate everything off an instance and release it; returns the number of requests moved. Not retried:
        a retry after a lost reply would find the instance draining already and report 0 moved."""
        resp = self._unary(
            self._admin.DrainInstance,
            admin_pb2.DrainInstanceRequest(instance_id=instance_id),
            self._admin_md,
            timeout_s,
            retry=False,
        )
        return resp.requests_moved

    def drain_node(
        self, node: str, *, deadline_s: float = 0.0, timeout_s: float | None = None
    ) -> NodeDrainInfo:
        """Admin DrainNode: a node is going away (a worker pod's preStop hook): Ray places nothing new on it, each
        instance there is drained onto the rest and released with a replacement started elsewhere (pools keep
        their sizes); the last instance serving a phase is kept in service. ``node``: Ray node id, hostname (under
        KubeRay the pod's name) or IP; ``deadline_s``: when it will be killed (seconds from now). Not retried (a
        retry would find the instances gone and report nothing drained)."""
        resp = self._unary(
            self._admin.DrainNode,
            admin_pb2.DrainNodeRequest(node=node, deadline_s=deadline_s),
            self._admin_md,
            timeout_s,
            retry=False,
        )
        return c.node_drain_from_proto(resp)

    def scale(self, pool: str, count: int, *, timeout_s: float | None = None) -> int:
        """Set a pool's size; returns the pool's target size after the call (``count``). Answers once the new
        instances run, or after 60 s (the Controller's ``SCALE_WAIT_S``; those still starting join when up)."""
        resp = self._unary(
            self._admin.Scale,
            admin_pb2.ScaleRequest(pool=pool, count=count),
            self._admin_md,
            timeout_s,
            retry=True,
        )
        return resp.count

    def switch_role(self, instance_id: str, role: InstanceRole | str, *, timeout_s: float | None = None) -> bool:
        """Move an instance between the PREFILL and DECODE roles: it drains, then switches once idle (no engine
        restart). False when it has that role already, or is already switching or draining. Not retried: a retry
        after a lost reply would find the switch under way and report False."""
        resp = self._unary(
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

    def _unary(
        self,
        method: Callable[..., T],
        msg: Any,
        md: tuple[tuple[str, str], ...],
        timeout_s: float | None,
        *,
        retry: bool,
        request_id: str | None = None,
    ) -> T:
        timeout_s = c.call_timeout(timeout_s, self.timeout_s)
        deadline = time.monotonic() + timeout_s if timeout_s is not None else None
        attempts = 0
        while True:
            attempts += 1
            try:
                return method(msg, timeout=c.remaining(deadline), metadata=md + self._tracing.metadata())
            except grpc.RpcError as e:
                err = c.convert_rpc_error(e, request_id)
                if not retry or not self._may_retry(err, attempts, deadline):
                    raise err from None
                delay = c.retry_delay(attempts - 1, err.retry_after_s, deadline)
                if delay is None:
                    raise err from None
                time.sleep(delay)
            except c.CLOSED_CHANNEL_ERRORS:
                if self._closed:
                    raise c.closed_error(request_id) from None
                raise

    def close(self) -> None:
        """Close the channel: calls in flight end ``Cancelled``, later calls raise ``Cancelled`` too."""
        self._closed = True
        self._channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
