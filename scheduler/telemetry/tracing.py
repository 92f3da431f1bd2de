"""OpenTelemetry spans per request, with W3C trace context carried from the client SDK to the server and beyond.

One trace per request::

    llmsched.client.generate (SDK, CLIENT)            traceparent in gRPC metadata / HTTP header
      └─ llmsched.ingress (server, SERVER)            the server handler; current while the ingress runs
           ├─ llmsched.predict / llmsched.route       the control plane, via Tracing.span(Stage.X)
           ├─ llmsched.prefill -> llmsched.kv_transfer -> llmsched.decode
           └─ llmsched.migration (+ llmsched.migration.stage per copy stage, .stop_copy, .commit)

Usage from the control plane (sync or async code alike; spans nest through contextvars, and tasks created with
``asyncio.create_task`` inherit the current span)::

    with tracing.span(Stage.ROUTE, request_id=rid) as span:
        decision = router.route(info, view)
        span.set_attribute("llmsched.instance_id", decision.instance_id)

    ctx = tracing.current_context()               # hand to another task / keep for a long-lived span
    decode = tracing.start_span(Stage.DECODE, parent=ctx, request_id=rid); ...; decode.end()
    carrier = tracing.inject()                    # dict for a Ray actor call; the actor does tracing.extract(...)

``Tracing`` wraps one tracer (from a provider you pass, or the global one) and the W3C propagator; it is passed
around like the metrics registry. :func:`setup_tracing` builds one from the standard ``OTEL_*`` variables the
Helm chart sets; ``OTEL_SDK_DISABLED=true`` (or no endpoint and no exporter) gives a disabled instance whose spans
are non-recording and cost a few microseconds.
"""

from __future__ import annotations

import asyncio
import enum
import functools
import inspect
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, TypeVar

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import NonRecordingSpan, Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

logger = logging.getLogger(__name__)

TRACER_NAME = "llmsched"
TRACE_HEADERS = ("traceparent", "tracestate")
F = TypeVar("F", bound=Callable[..., Any])


class Stage(enum.Enum):
    """Span names of a request's life (the issue's list), so call sites do not spell strings."""

    CLIENT = "llmsched.client.generate"
    INGRESS = "llmsched.ingress"
    PREDICT = "llmsched.predict"
    ROUTE = "llmsched.route"
    PREFILL = "llmsched.prefill"
    KV_TRANSFER = "llmsched.kv_transfer"
    DECODE = "llmsched.decode"
    RECOVER = "llmsched.recover"  # re-prefill elsewhere after an instance died
    MIGRATION = "llmsched.migration"
    MIGRATION_STAGE = "llmsched.migration.stage"  # one multi-stage copy round (attribute llmsched.stage)
    MIGRATION_STOP_COPY = "llmsched.migration.stop_copy"
    MIGRATION_COMMIT = "llmsched.migration.commit"


def _name(stage: Stage | str) -> str:
    return stage.value if isinstance(stage, Stage) else stage


def _attrs(request_id: str | None, attributes: Mapping[str, Any] | None) -> dict[str, Any]:
    out = dict(attributes or {})
    if request_id:
        out["llmsched.request_id"] = request_id
    return out


class Tracing:
    """A tracer plus W3C propagation.

    Args:
        provider: a ``TracerProvider`` (tests: one with an in-memory exporter). None = the global provider at call
            time (set by :func:`setup_tracing` with ``set_global=True``, or by the embedding application).
        enabled: False = never record nor propagate (``OTEL_SDK_DISABLED=true``).
    """

    def __init__(self, provider: trace.TracerProvider | None = None, *, enabled: bool = True) -> None:
        self.enabled = enabled
        self.provider = provider
        if not enabled:
            self._tracer: trace.Tracer = trace.NoOpTracer()
        elif provider is not None:
            self._tracer = provider.get_tracer(TRACER_NAME)
        else:
            self._tracer = trace.get_tracer(TRACER_NAME)  # a proxy: follows a global provider set later
        self._propagator = TraceContextTextMapPropagator()

    @classmethod
    def disabled(cls) -> Tracing:
        return cls(enabled=False)

    # ------------------------------------------------------------------------------------------ spans

    @contextmanager
    def span(
        self,
        stage: Stage | str,
        *,
        request_id: str | None = None,
        parent: Context | None = None,
        kind: SpanKind = SpanKind.INTERNAL,
        attributes: Mapping[str, Any] | None = None,
    ) -> Iterator[Span]:
        """A span that is *current* inside the block (children nest under it); ended on exit.

        An exception escaping the block marks the span as an error (``asyncio.CancelledError`` included: the
        request was cancelled). ``parent`` defaults to the current context.
        """
        with self._tracer.start_as_current_span(
            _name(stage), context=parent, kind=kind, attributes=_attrs(request_id, attributes)
        ) as span:
            try:
                yield span
            except asyncio.CancelledError as e:
                # NOTE: OpenTelemetry records only Exception subclasses; CancelledError is a BaseException.
                if span.is_recording():
                    span.record_exception(e)
                    span.set_status(Status(StatusCode.ERROR, "cancelled"))
                raise

    def start_span(
        self,
        stage: Stage | str,
        *,
        request_id: str | None = None,
        parent: Context | None = None,
        kind: SpanKind = SpanKind.INTERNAL,
        attributes: Mapping[str, Any] | None = None,
    ) -> Span:
        """A span that is *not* made current: for work that outlives a block (a decode phase); call ``.end()``."""
        return self._tracer.start_span(
            _name(stage), context=parent, kind=kind, attributes=_attrs(request_id, attributes)
        )

    @staticmethod
    @contextmanager
    def activate(span: Span) -> Iterator[Span]:
        """Make a span from :meth:`start_span` current inside the block without ending it or touching its status
        on exceptions (the caller decides the outcome; used by the servers around a whole stream)."""
        with trace.use_span(span, end_on_exit=False, record_exception=False, set_status_on_exception=False):
            yield span

    @staticmethod
    def current_context() -> Context:
        """The context to parent spans started later or in other tasks (e.g. the ingress' background dispatch)."""
        return otel_context.get_current()

    @staticmethod
    def context_with(span: Span) -> Context:
        """A context whose current span is ``span`` (parent for :meth:`start_span` without attaching)."""
        return trace.set_span_in_context(span)

    # ------------------------------------------------------------------------------------------ propagation

    def inject(self, carrier: dict[str, str] | None = None, *, context: Context | None = None) -> dict[str, str]:
        """Write ``traceparent``/``tracestate`` for ``context`` (default: current) into ``carrier`` and return it."""
        carrier = {} if carrier is None else carrier
        if self.enabled:
            self._propagator.inject(carrier, context=context)
        return carrier

    def metadata(self, *, context: Context | None = None) -> tuple[tuple[str, str], ...]:
        """gRPC metadata pairs carrying the trace context (empty when disabled or there is no valid span)."""
        return tuple(self.inject(context=context).items())

    def extract(self, carrier: Mapping[str, str] | Iterable[tuple[str, Any]] | None) -> Context | None:
        """The remote parent from HTTP headers, a dict, or gRPC invocation metadata; None when absent/invalid."""
        if not self.enabled or not carrier:
            return None
        if isinstance(carrier, Mapping):
            found = {k: carrier[k] for k in TRACE_HEADERS if k in carrier}
        else:
            found = {}
            for key, value in carrier:
                if key in TRACE_HEADERS:
                    found[key] = value if isinstance(value, str) else bytes(value).decode(errors="replace")
        if "traceparent" not in found:
            return None
        ctx = self._propagator.extract(found)
        return ctx if trace.get_current_span(ctx).get_span_context().is_valid else None


def traced(tracing: Tracing | Callable[[], Tracing], stage: Stage | str) -> Callable[[F], F]:
    """Decorator: run a function (sync or ``async def``) inside ``tracing.span(stage)``.

    ``tracing`` may be a callable returning the instance (resolved per call, e.g. ``lambda: self.tracing``).
    """

    def resolve() -> Tracing:
        return tracing if isinstance(tracing, Tracing) else tracing()

    def deco(fn: F) -> F:
        if inspect.iscoroutinefunction(fn):

            @functools.wraps(fn)
            async def awrapper(*args: Any, **kwargs: Any) -> Any:
                with resolve().span(stage):
                    return await fn(*args, **kwargs)

            return awrapper  # type: ignore[return-value]

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            with resolve().span(stage):
                return fn(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return deco


def set_outcome(span: Span, *, ok: bool, status: str, description: str | None = None) -> None:
    """Record a request outcome on ``span``: attribute ``llmsched.status`` and the span status."""
    if isinstance(span, NonRecordingSpan) or not span.is_recording():
        return
    span.set_attribute("llmsched.status", status)
    span.set_status(Status(StatusCode.OK) if ok else Status(StatusCode.ERROR, description))


def _env_true(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def setup_tracing(
    env: Mapping[str, str] | None = None,
    *,
    exporter: Any = None,
    set_global: bool = True,
    service_name: str = "llmsched",
) -> Tracing:
    """Build :class:`Tracing` from the standard OpenTelemetry environment (what the Helm chart sets).

    - ``OTEL_SDK_DISABLED=true`` -> disabled (no spans, no propagation).
    - ``exporter`` given (tests: ``InMemorySpanExporter``) -> exported synchronously.
    - else ``OTEL_EXPORTER_OTLP_ENDPOINT`` set -> batched OTLP export over ``OTEL_EXPORTER_OTLP_PROTOCOL``
      (``grpc`` default, or ``http/protobuf``); the exporter reads endpoint/headers itself.
    - else -> disabled (nowhere to send spans).

    ``OTEL_SERVICE_NAME`` names the service; the sampler comes from ``OTEL_TRACES_SAMPLER(_ARG)`` (read by the SDK).

    Returns:
        The instance to pass to ``build_server(tracing=...)`` / ``Client(tracing=...)``; with ``set_global`` its
        provider also becomes OpenTelemetry's global one.
    """
    env = os.environ if env is None else env
    if _env_true(env.get("OTEL_SDK_DISABLED")):
        return Tracing.disabled()
    endpoint = env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    if exporter is None and not endpoint:
        return Tracing.disabled()

    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

    provider = TracerProvider(resource=Resource.create({SERVICE_NAME: env.get("OTEL_SERVICE_NAME") or service_name}))
    if exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    else:
        # The signal-specific variable wins (OpenTelemetry's spec), as TRACES_ENDPOINT does above.
        otlp = _otlp_exporter(env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
                              or env.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "grpc")
        if otlp is None:
            return Tracing.disabled()
        provider.add_span_processor(BatchSpanProcessor(otlp))
    if set_global:
        trace.set_tracer_provider(provider)
    return Tracing(provider)


def _otlp_exporter(protocol: str) -> Any:
    # NOTE: imported lazily: the exporter packages are optional (pip install opentelemetry-exporter-otlp).
    try:
        if protocol.strip().lower() in ("http/protobuf", "http"):
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        else:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter  # type: ignore[assignment]
    except ImportError:
        logger.warning("OTEL_EXPORTER_OTLP_ENDPOINT is set but opentelemetry-exporter-otlp is not installed; "
                       "tracing disabled")
        return None
    return OTLPSpanExporter()
