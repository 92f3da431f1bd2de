"""Prometheus metrics for the live cluster, on a dedicated :class:`CollectorRegistry` that callers pass around.

Nothing is registered at import time: :class:`Metrics` builds every family on the registry it is given, so tests
(and several servers in one process) never collide on prometheus_client's global registry.

Who records what (the :class:`Recorder` API; both callers share one recorder per process)::

    server (gRPC / HTTP)            on_request_start -> on_first_token -> on_finish      | on_reject
    control plane (ingress)         on_route(request_id, route, instance_id)             | on_prediction
                                    observe_instances(snapshots) every refresh            | on_migration

Families (names are what the Grafana dashboard in deploy/helm/llmsched/dashboards/ queries)::

    llmsched_ttft_seconds{route,instance_id}          histogram  time to first token (instance = first token's)
    llmsched_tpot_seconds{route,instance_id}          histogram  (e2e - ttft) / (tokens - 1) (instance = last)
    llmsched_e2e_seconds{route,instance_id}           histogram  request latency, start to last token
    llmsched_output_tokens{route}                     histogram  tokens streamed per request
    llmsched_requests_total{api,route,status}         counter    finished|cancelled|failed|invalid|rejected|...
    llmsched_requests_in_flight{api,priority}         gauge      admitted and not yet finished
    llmsched_admission_rejected_total{priority,reason} counter   admission refusals: server_limit | ingress |
                                                                 admission (RESOURCE_EXHAUSTED / 429) | too_large
                                                                 (the policy's "fits no instance": 413)
    llmsched_queue_depth{instance_id,role}            gauge      waiting requests on the instance
    llmsched_running_requests{instance_id,role}       gauge      running requests on the instance
    llmsched_kv_usage_ratio{instance_id,role}         gauge      KV blocks used / total
    llmsched_migrations_total{outcome}                counter    committed | aborted_src | aborted_dst | ...
    llmsched_migration_downtime_seconds{outcome}      histogram  stop-and-copy pause seen by the request
    llmsched_predictor_abs_error_tokens{predictor}    histogram  |predicted - actual| output length

Label values that come from clients (priority) are clamped so a client cannot blow up the series count.
"""

from __future__ import annotations

import enum
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import make_asgi_app, start_http_server

from scheduler.core.types import InstanceSnapshot

# Latency buckets: sub-ms (echo, overhead) up to minutes (long generations).
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
# TTFT: dense where SLOs live (0.1-10 s; the shipped configs use 1, 1.5, 2, 5, 10 s) so histogram_quantile and
# le="<slo>" attainment queries are exact at the SLO instead of interpolated across a 1 -> 2.5 s bucket.
TTFT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 1.25, 1.5,
                2.0, 2.5, 3.0, 4.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 60.0, 120.0)
TPOT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.035, 0.04, 0.05, 0.06, 0.075, 0.08,
                0.1, 0.125, 0.15, 0.2, 0.25, 0.3, 0.5, 1.0)


def _with_slos(buckets: tuple[float, ...], slos: Iterable[float | None]) -> tuple[float, ...]:
    """``buckets`` plus every configured SLO threshold as a boundary (exact attainment at the SLO)."""
    return tuple(sorted(set(buckets) | {float(v) for v in slos if v}))
TOKEN_BUCKETS = (1, 4, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
ERROR_TOKEN_BUCKETS = (0, 4, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
DOWNTIME_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0)

MAX_PRIORITY_LABEL = 9  # priorities 0..9 get their own series; anything else is "other"
NO_ROUTE = "none"  # route label before (or without) the ingress reporting one


class RequestStatus(enum.Enum):
    """The ``status`` label of ``llmsched_requests_total``."""

    FINISHED = "finished"  # streamed to its end (stop / length)
    CANCELLED = "cancelled"  # client cancel, disconnect, deadline, or an "abort" finish
    FAILED = "failed"  # the ingress or server failed it (INTERNAL / UNKNOWN)
    UNAVAILABLE = "unavailable"  # no instance could serve it (the SDK retries these)
    INVALID = "invalid"  # bad input (INVALID_ARGUMENT / 400), rejected before routing
    REJECTED = "rejected"  # admission control (RESOURCE_EXHAUSTED / 429; 413 for its too_large)
    NOT_FOUND = "not_found"


def priority_label(priority: int) -> str:
    """Bounded label value for a client-supplied priority."""
    return str(priority) if 0 <= priority <= MAX_PRIORITY_LABEL else "other"


def _label(value: object) -> str:
    if isinstance(value, enum.Enum):
        value = value.value if isinstance(value.value, str) else value.name
    return str(value).lower()


class Metrics:
    """Every llmsched metric family, registered on ``registry`` (a fresh one when None).

    Attributes are the prometheus_client objects; most code should go through :class:`Recorder` instead.
    """

    def __init__(self, registry: CollectorRegistry | None = None, *, slos: Mapping[Any, Any] | None = None) -> None:
        """``slos``: the config's SLO classes (``cfg.slos``: objects with ``ttft_s`` / ``tpot_s``); their thresholds
        become bucket boundaries of the TTFT / TPOT histograms."""
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        lat = ("route", "instance_id")
        inst = ("instance_id", "role")
        classes = list((slos or {}).values())
        self.ttft = Histogram("llmsched_ttft_seconds", "Time to first token.", lat,
                              buckets=_with_slos(TTFT_BUCKETS, (getattr(c, "ttft_s", None) for c in classes)),
                              registry=r)
        self.tpot = Histogram("llmsched_tpot_seconds", "Time per output token after the first.", lat,
                              buckets=_with_slos(TPOT_BUCKETS, (getattr(c, "tpot_s", None) for c in classes)),
                              registry=r)
        self.e2e = Histogram("llmsched_e2e_seconds", "Request latency, start to last token.", lat,
                             buckets=LATENCY_BUCKETS, registry=r)
        self.output_tokens = Histogram("llmsched_output_tokens", "Tokens streamed per request.", ("route",),
                                       buckets=TOKEN_BUCKETS, registry=r)
        self.requests = Counter("llmsched_requests", "Requests by final status.", ("api", "route", "status"),
                                registry=r)
        self.in_flight = Gauge("llmsched_requests_in_flight", "Admitted requests not yet finished.",
                               ("api", "priority"), registry=r)
        self.rejected = Counter("llmsched_admission_rejected", "Requests rejected by admission control.",
                                ("priority", "reason"), registry=r)
        self.queue_depth = Gauge("llmsched_queue_depth", "Waiting requests on an instance.", inst, registry=r)
        self.running = Gauge("llmsched_running_requests", "Running requests on an instance.", inst, registry=r)
        self.kv_usage = Gauge("llmsched_kv_usage_ratio", "KV cache blocks used / total.", inst, registry=r)
        self.migrations = Counter("llmsched_migrations", "Live migrations by outcome.", ("outcome",), registry=r)
        self.migration_downtime = Histogram("llmsched_migration_downtime_seconds",
                                            "Stop-and-copy downtime of a migration.", ("outcome",),
                                            buckets=DOWNTIME_BUCKETS, registry=r)
        self.predictor_error = Histogram("llmsched_predictor_abs_error_tokens",
                                         "Absolute error of the response-length prediction (tokens).",
                                         ("predictor",), buckets=ERROR_TOKEN_BUCKETS, registry=r)

    def names(self) -> set[str]:
        """Sample names this registry can expose (``_bucket``/``_count``/``_sum``/``_total`` included)."""
        out: set[str] = set()
        for family in self.registry.collect():
            out.add(family.name)
            kind = family.type
            if kind == "counter":
                out |= {family.name + "_total", family.name + "_created"}
            elif kind == "histogram":
                out |= {family.name + s for s in ("_bucket", "_count", "_sum", "_created")}
        return out


@dataclass(slots=True)
class _Live:
    api: str
    priority: str
    started: float
    route: str = NO_ROUTE
    first_token_s: float | None = None
    first_instance: str = ""


class Recorder(Protocol):
    """What servers and the control plane call. :class:`MetricsRecorder` records; :class:`NullRecorder` does not."""

    def on_request_start(self, request_id: str, *, priority: int = 0, api: str = "grpc") -> str: ...
    def on_route(self, request_id: str, *, route: str, instance_id: str = "") -> None: ...
    def on_first_token(self, request_id: str, *, instance_id: str = "") -> None: ...
    def on_finish(self, request_id: str, *, status: RequestStatus, output_tokens: int = 0,
                  instance_id: str = "") -> None: ...
    def on_invalid(self, *, api: str = "grpc") -> None: ...
    def on_reject(self, *, priority: int, reason: str, api: str = "grpc", request_id: str | None = None) -> None: ...
    def observe_instance(self, snapshot: InstanceSnapshot) -> None: ...
    def observe_instances(self, snapshots: Iterable[InstanceSnapshot]) -> None: ...
    def forget_instance(self, instance_id: str) -> None: ...
    def on_migration(self, outcome: str | enum.Enum, downtime_s: float | None = None) -> None: ...
    def on_prediction(self, predicted_tokens: float, actual_tokens: int, *, predictor: str = "default") -> None: ...


class MetricsRecorder:
    """Records request lifecycles and cluster state into :class:`Metrics`.

    Request state is keyed by ``request_id`` (kept only while the request is in flight), so the server and the
    ingress can both report on one request without passing objects through ``IngressAPI``. Safe to call from
    several threads (prometheus_client is thread-safe; the small per-request table has a lock).

    Args:
        metrics: the families to record into (``Metrics(registry)``).
        clock: seconds, monotonic (tests pass a fake).
    """

    def __init__(self, metrics: Metrics | None = None, *, clock: Any = time.perf_counter) -> None:
        self.metrics = metrics if metrics is not None else Metrics()
        self._clock = clock
        self._live: dict[str, _Live] = {}
        self._instances: dict[str, str] = {}  # instance_id -> role label, to remove stale series
        # instance_id -> routes of its TTFT/TPOT/E2E series: removed with the instance (ids are never reused, so
        # these would otherwise pile up with every replacement and scale-up).
        self._latency_routes: dict[str, set[str]] = {}
        self._lock = threading.Lock()
        self._dups = 0  # keys handed to requests whose id was already in flight

    @property
    def registry(self) -> CollectorRegistry:
        return self.metrics.registry

    @property
    def in_flight(self) -> int:
        """Requests started and not finished (the per-request table's size: bounded by admission)."""
        return len(self._live)

    # ------------------------------------------------------------------------------------------ requests

    def on_request_start(self, request_id: str, *, priority: int = 0, api: str = "grpc") -> str:
        """Start a request; returns the key the server passes to ``on_first_token`` / ``on_finish`` / ``on_reject``.

        The key is ``request_id``, unless a request with that id is already in flight (a client reusing an id: the
        ingress refuses the second): then the newcomer gets a key of its own, so neither ends the other's entry
        (the ingress' ``on_route(request_id)`` keeps reaching the request it routes).
        """
        live = _Live(api=api, priority=priority_label(priority), started=self._clock())
        with self._lock:
            key = request_id
            if key in self._live:
                self._dups += 1
                key = f"{request_id}\x00dup{self._dups}"
            self._live[key] = live
        self.metrics.in_flight.labels(api, live.priority).inc()
        return key

    def on_route(self, request_id: str, *, route: str, instance_id: str = "") -> None:
        """The ingress names the dispatch path (``colocated``, ``disaggregated``, ``recovered``, ...)."""
        live = self._live.get(request_id)
        if live is not None:
            live.route = route or NO_ROUTE
            if instance_id and not live.first_instance:
                live.first_instance = instance_id

    def on_first_token(self, request_id: str, *, instance_id: str = "") -> None:
        live = self._live.get(request_id)
        if live is None or live.first_token_s is not None:
            return
        live.first_token_s = self._clock()
        if instance_id:
            live.first_instance = instance_id
        self._observe(self.metrics.ttft, live.route, live.first_instance, live.first_token_s - live.started)

    def on_finish(self, request_id: str, *, status: RequestStatus, output_tokens: int = 0,
                  instance_id: str = "") -> None:
        """End of a started request (idempotent: a second call for the same id is ignored)."""
        with self._lock:
            live = self._live.pop(request_id, None)
        if live is None:
            return
        m = self.metrics
        m.in_flight.labels(live.api, live.priority).dec()
        m.requests.labels(live.api, live.route, status.value).inc()
        if status is not RequestStatus.FINISHED or output_tokens <= 0:
            return
        now = self._clock()
        inst = instance_id or live.first_instance
        self._observe(m.e2e, live.route, inst, now - live.started)
        m.output_tokens.labels(live.route).observe(output_tokens)
        if live.first_token_s is not None and output_tokens > 1:
            self._observe(m.tpot, live.route, inst, (now - live.first_token_s) / (output_tokens - 1))

    def _observe(self, hist: Histogram, route: str, instance_id: str, value: float) -> None:
        hist.labels(route, instance_id).observe(value)
        if instance_id:
            self._latency_routes.setdefault(instance_id, set()).add(route)

    def on_invalid(self, *, api: str = "grpc") -> None:
        """A request rejected as bad input before it started."""
        self.metrics.requests.labels(api, NO_ROUTE, RequestStatus.INVALID.value).inc()

    def on_reject(self, *, priority: int, reason: str, api: str = "grpc", request_id: str | None = None) -> None:
        """Admission control said no (server limiter or the ingress' admission policy). ``reason``: a short code.

        With ``request_id`` of a started request (the ingress rejected it after the server started it), that
        request ends here: it leaves the in-flight gauge and is counted once, as rejected.
        """
        if request_id is not None:
            with self._lock:
                live = self._live.pop(request_id, None)
            if live is not None:
                self.metrics.in_flight.labels(live.api, live.priority).dec()
        self.metrics.rejected.labels(priority_label(priority), reason).inc()
        self.metrics.requests.labels(api, NO_ROUTE, RequestStatus.REJECTED.value).inc()

    # ------------------------------------------------------------------------------------------ cluster

    def observe_instance(self, snapshot: InstanceSnapshot) -> None:
        s = snapshot
        role = _label(s.role)
        with self._lock:
            old_role = self._instances.get(s.instance_id)
            self._instances[s.instance_id] = role
        if old_role is not None and old_role != role:
            self._remove_series(s.instance_id, old_role)
        m = self.metrics
        m.queue_depth.labels(s.instance_id, role).set(s.num_waiting)
        m.running.labels(s.instance_id, role).set(s.num_running)
        m.kv_usage.labels(s.instance_id, role).set(s.kv_blocks_used / max(s.kv_blocks_total, 1))

    def observe_instances(self, snapshots: Iterable[InstanceSnapshot]) -> None:
        """Set the gauges of every instance in ``snapshots`` and drop the series of instances no longer there."""
        seen = set()
        for s in snapshots:
            self.observe_instance(s)
            seen.add(s.instance_id)
        for iid in set(self._instances) - seen:
            self.forget_instance(iid)

    def forget_instance(self, instance_id: str) -> None:
        """Remove a dead or released instance's series (else its last values would linger on the dashboard)."""
        with self._lock:
            role = self._instances.pop(instance_id, None)
            routes = self._latency_routes.pop(instance_id, set())
        if role is not None:
            self._remove_series(instance_id, role)
        for route in routes:
            for h in (self.metrics.ttft, self.metrics.tpot, self.metrics.e2e):
                try:
                    h.remove(route, instance_id)
                except KeyError:
                    pass

    def _remove_series(self, instance_id: str, role: str) -> None:
        for g in (self.metrics.queue_depth, self.metrics.running, self.metrics.kv_usage):
            try:
                g.remove(instance_id, role)
            except KeyError:
                pass

    def on_migration(self, outcome: str | enum.Enum, downtime_s: float | None = None) -> None:
        """One finished migration attempt; ``outcome`` e.g. ``MigrationState.COMMITTED`` or ``"aborted_dst"``."""
        label = _label(outcome)
        self.metrics.migrations.labels(label).inc()
        if downtime_s is not None:
            self.metrics.migration_downtime.labels(label).observe(max(downtime_s, 0.0))

    def on_prediction(self, predicted_tokens: float, actual_tokens: int, *, predictor: str = "default") -> None:
        """Predicted vs actual output length of a finished request."""
        self.metrics.predictor_error.labels(predictor).observe(abs(predicted_tokens - actual_tokens))


class NullRecorder:
    """The no-op :class:`Recorder` (metrics off)."""

    def on_request_start(self, request_id: str, *, priority: int = 0, api: str = "grpc") -> str:
        return request_id

    def on_route(self, request_id: str, *, route: str, instance_id: str = "") -> None:
        pass

    def on_first_token(self, request_id: str, *, instance_id: str = "") -> None:
        pass

    def on_finish(self, request_id: str, *, status: RequestStatus, output_tokens: int = 0,
                  instance_id: str = "") -> None:
        pass

    def on_invalid(self, *, api: str = "grpc") -> None:
        pass

    def on_reject(self, *, priority: int, reason: str, api: str = "grpc", request_id: str | None = None) -> None:
        pass

    def observe_instance(self, snapshot: InstanceSnapshot) -> None:
        pass

    def observe_instances(self, snapshots: Iterable[InstanceSnapshot]) -> None:
        pass

    def forget_instance(self, instance_id: str) -> None:
        pass

    def on_migration(self, outcome: str | enum.Enum, downtime_s: float | None = None) -> None:
        pass

    def on_prediction(self, predicted_tokens: float, actual_tokens: int, *, predictor: str = "default") -> None:
        pass


NULL_RECORDER = NullRecorder()


def start_metrics_server(port: int, registry: CollectorRegistry, *, addr: str = "0.0.0.0") -> tuple[Any, int]:
    """Serve ``registry`` at ``http://addr:port/metrics`` from a daemon thread (the chart's metrics port).

    Returns:
        (server, bound port); ``port=0`` picks a free one. Stop with ``server.shutdown(); server.server_close()``.
    """
    server, _thread = start_http_server(port, addr=addr, registry=registry)
    return server, server.server_address[1]


def metrics_asgi_app(registry: CollectorRegistry) -> Any:
    """An ASGI app exposing ``registry`` (mount it, e.g. ``app.mount("/metrics", metrics_asgi_app(reg))``)."""
    return make_asgi_app(registry=registry)
