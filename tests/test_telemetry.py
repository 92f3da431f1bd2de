"""Prometheus metrics and OpenTelemetry tracing, through the real gRPC / HTTP servers over loopback."""

from __future__ import annotations

import asyncio
import http.client
import json
import re
import time
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from prometheus_client import CollectorRegistry

from scheduler.client import Client, InvalidArgument, ResourceExhausted
from scheduler.control.api import GenerateRequest
from scheduler.core.types import InstanceRole, InstanceSnapshot
from scheduler.engine.base import TokenChunk
from scheduler.server.background import BackgroundServer
from scheduler.server.echo import EchoIngress
from scheduler.telemetry.metrics import Metrics, MetricsRecorder, RequestStatus, start_metrics_server
from scheduler.telemetry.tracing import Stage, Tracing, setup_tracing, traced

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "deploy/helm/llmsched/dashboards/llmsched.json"


def recorder() -> MetricsRecorder:
    return MetricsRecorder(Metrics(CollectorRegistry()))


def sample(rec: MetricsRecorder, name: str, **labels: str) -> float:
    return rec.registry.get_sample_value(name, labels) or 0.0


def memory_tracing() -> tuple[Tracing, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return Tracing(provider), exporter


# ----------------------------------------------------------------------------------------------- metrics


class FakeClock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_recorder_lifecycle_math_and_labels() -> None:
    clock = FakeClock()
    rec = MetricsRecorder(Metrics(CollectorRegistry()), clock=clock)
    rec.on_request_start("r1", priority=1, api="grpc")
    assert sample(rec, "llmsched_requests_in_flight", api="grpc", priority="1") == 1
    rec.on_route("r1", route="disaggregated", instance_id="p0")
    clock.t += 0.2
    rec.on_first_token("r1", instance_id="p0")
    clock.t += 0.9
    rec.on_finish("r1", status=RequestStatus.FINISHED, output_tokens=10, instance_id="d3")
    rec.on_finish("r1", status=RequestStatus.FINISHED, output_tokens=10)  # idempotent
    lat = {"route": "disaggregated"}
    assert sample(rec, "llmsched_ttft_seconds_sum", instance_id="p0", **lat) == pytest.approx(0.2)
    assert sample(rec, "llmsched_tpot_seconds_sum", instance_id="d3", **lat) == pytest.approx(0.1)  # 0.9 / 9
    assert sample(rec, "llmsched_e2e_seconds_sum", instance_id="d3", **lat) == pytest.approx(1.1)
    assert sample(rec, "llmsched_requests_total", api="grpc", route="disaggregated", status="finished") == 1
    assert sample(rec, "llmsched_requests_in_flight", api="grpc", priority="1") == 0
    assert rec.in_flight == 0
    # Client-chosen priorities cannot create unbounded series.
    for p in (-5, 10, 2**31 - 1):
        rec.on_reject(priority=p, reason="server_limit")
    assert sample(rec, "llmsched_admission_rejected_total", priority="other", reason="server_limit") == 3
    # The ingress rejecting a started request ends it once, as rejected.
    rec.on_request_start("r2", priority=0)
    rec.on_reject(priority=0, reason="ingress", request_id="r2")
    assert rec.in_flight == 0 and sample(rec, "llmsched_requests_in_flight", api="grpc", priority="0") == 0
    assert sample(rec, "llmsched_requests_total", api="grpc", route="none", status="rejected") == 4


def test_instances_migrations_predictor() -> None:
    rec = recorder()
    a = InstanceSnapshot("i0", InstanceRole.DECODE, num_running=3, num_waiting=2, kv_blocks_used=30,
                         kv_blocks_total=120)
    b = InstanceSnapshot("i1", InstanceRole.PREFILL, num_waiting=7)
    rec.observe_instances([a, b])
    assert sample(rec, "llmsched_kv_usage_ratio", instance_id="i0", role="decode") == 0.25
    assert sample(rec, "llmsched_queue_depth", instance_id="i0", role="decode") == 2
    assert sample(rec, "llmsched_running_requests", instance_id="i0", role="decode") == 3
    assert sample(rec, "llmsched_queue_depth", instance_id="i1", role="prefill") == 7
    rec.observe_instances([a])  # i1 died: its series go (a stale gauge would lie on the dashboard)
    assert rec.registry.get_sample_value("llmsched_queue_depth", {"instance_id": "i1", "role": "prefill"}) is None
    rec.on_migration("committed", 0.004)
    rec.on_migration(RequestStatus.FAILED)  # enums are accepted (their value)
    assert sample(rec, "llmsched_migrations_total", outcome="committed") == 1
    assert sample(rec, "llmsched_migrations_total", outcome="failed") == 1
    assert sample(rec, "llmsched_migration_downtime_seconds_count", outcome="committed") == 1
    rec.on_prediction(100.0, 60)
    assert sample(rec, "llmsched_predictor_abs_error_tokens_sum", predictor="default") == 40


class SlowEcho(EchoIngress):
    """Echo that tags chunks with an instance id (as the real ingress does)."""

    def generate(self, request: GenerateRequest) -> AsyncIterator[TokenChunk]:
        inner = super().generate(request)

        async def tagged() -> AsyncIterator[TokenChunk]:
            async for c in inner:
                yield TokenChunk(c.request_id, c.index, c.token_ids, c.finished, c.finish_reason, c.text, "echo-1")

        return tagged()


def test_grpc_and_http_servers_record_metrics() -> None:
    rec = recorder()
    with BackgroundServer(lambda: SlowEcho(token_delay_s=0.001, max_model_len=1024), recorder=rec, http=True) as s:
        with Client(s.address, retries=0) as c:
            assert len(c.generate([1, 2, 3], max_tokens=5).token_ids) == 5
            with pytest.raises(InvalidArgument):
                c.generate([1], max_tokens=0)
            with pytest.raises(InvalidArgument):  # passes server validation, the ingress rejects it
                c.generate([1], max_tokens=2000)
            stream = c.stream([1], max_tokens=500)
            next(stream)
            stream.close()  # client cancels mid-stream
        conn = http.client.HTTPConnection("127.0.0.1", s.http_port, timeout=10)
        conn.request("POST", "/v1/completions", json.dumps({"prompt": [5, 6], "max_tokens": 4}),
                      {"Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 200
        resp.read()
        conn.request("POST", "/v1/completions", json.dumps({"prompt": [5, 6], "max_tokens": -1}),
                     {"Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 400
        resp.read()
        conn.close()
        for _ in range(200):  # the cancelled stream ends on the server shortly after the client leaves
            if rec.in_flight == 0:
                break
            time.sleep(0.01)
    g = {"api": "grpc", "route": "none"}
    assert sample(rec, "llmsched_requests_total", status="finished", **g) == 1
    assert sample(rec, "llmsched_requests_total", status="invalid", **g) == 2
    assert sample(rec, "llmsched_requests_total", status="cancelled", **g) == 1
    assert sample(rec, "llmsched_requests_total", api="http", route="none", status="finished") == 1
    assert sample(rec, "llmsched_requests_total", api="http", route="none", status="invalid") == 1
    # TTFT observed for every request that produced a token (grpc 5-token, the cancelled one, http).
    assert sample(rec, "llmsched_ttft_seconds_count", route="none", instance_id="echo-1") == 3
    assert sample(rec, "llmsched_tpot_seconds_count", route="none", instance_id="echo-1") == 2
    assert sample(rec, "llmsched_output_tokens_sum", route="none") == 9
    assert rec.in_flight == 0


def test_overload_is_counted_as_rejection() -> None:
    rec = recorder()
    with (BackgroundServer(lambda: EchoIngress(max_inflight=0), recorder=rec) as s,
          Client(s.address, retries=0) as c, pytest.raises(ResourceExhausted)):
        c.generate("x", priority=2)
    assert sample(rec, "llmsched_admission_rejected_total", priority="2", reason="ingress") == 1
    assert sample(rec, "llmsched_requests_total", api="grpc", route="none", status="rejected") == 1
    assert sample(rec, "llmsched_requests_in_flight", api="grpc", priority="2") == 0


def test_exposition_metrics_port_and_http_path() -> None:
    rec = recorder()
    rec.on_migration("committed", 0.01)
    server, port = start_metrics_server(0, rec.registry, addr="127.0.0.1")
    try:
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    finally:
        server.shutdown()
        server.server_close()
    assert 'llmsched_migrations_total{outcome="committed"} 1.0' in body
    assert "# TYPE llmsched_ttft_seconds histogram" in body
    from starlette.testclient import TestClient

    from scheduler.server.http_server import build_app

    with TestClient(build_app(EchoIngress(), recorder=rec, metrics_path="/metrics")) as tc:
        r = tc.get("/metrics/")
    assert r.status_code == 200 and "llmsched_migrations_total" in r.text


def test_dashboard_queries_only_exported_metrics_and_labels() -> None:
    """Every metric (and grouping label) the Grafana dashboard queries exists: names cannot drift apart."""
    metrics = Metrics(CollectorRegistry())
    names = metrics.names()
    labels = {f.name: set() for f in metrics.registry.collect()}
    for attr in vars(metrics).values():
        if hasattr(attr, "_labelnames"):
            labels[attr._name] = set(attr._labelnames)
    exprs = [t["expr"] for p in json.loads(DASHBOARD.read_text())["panels"] for t in p["targets"]]
    assert len(exprs) >= 8
    for expr in exprs:
        used = re.findall(r"\b(llmsched_[a-z0-9_]+)", expr)
        assert used, expr
        for name in used:
            assert name in names, f"dashboard queries {name}, not exported; have {sorted(names)}"
        base = re.sub(r"_(bucket|count|sum|total)$", "", used[0])
        for group in re.findall(r"by \(([^)]*)\)", expr):
            for label in (x.strip() for x in group.split(",")):
                assert label == "le" or label in labels[base], f"{expr}: label {label} not on {base}"


# ----------------------------------------------------------------------------------------------- tracing


class TracedEcho(EchoIngress):
    """Echo whose generate opens control-plane-style spans (route in generate, decode in the stream)."""

    tracing: Tracing

    def generate(self, request: GenerateRequest) -> AsyncIterator[TokenChunk]:
        with self.tracing.span(Stage.ROUTE, request_id=request.request_id):
            inner = super().generate(request)
        tracing = self.tracing

        async def stream() -> AsyncIterator[TokenChunk]:
            with tracing.span(Stage.DECODE, request_id=request.request_id):
                async for c in inner:
                    yield c

        return stream()


def _by_name(spans: tuple[ReadableSpan, ...], name: Stage) -> ReadableSpan:
    found = [s for s in spans if s.name == name.value]
    assert len(found) == 1, [s.name for s in spans]
    return found[0]


def test_grpc_trace_context_client_to_server_to_ingress_spans() -> None:
    client_tracing, client_spans = memory_tracing()  # separate providers: as if in two processes
    server_tracing, server_spans = memory_tracing()

    def factory() -> TracedEcho:
        ing = TracedEcho()
        ing.tracing = server_tracing
        return ing

    with (BackgroundServer(factory, tracing=server_tracing) as s,
          Client(s.address, tracing=client_tracing) as c):
        r = c.generate("trace", max_tokens=3, request_id="t-1")
    assert len(r.token_ids) == 3
    client = _by_name(client_spans.get_finished_spans(), Stage.CLIENT)
    spans = server_spans.get_finished_spans()
    server = _by_name(spans, Stage.INGRESS)
    assert client.kind is SpanKind.CLIENT and server.kind is SpanKind.SERVER
    assert server.parent is not None and server.parent.is_remote
    assert server.parent.span_id == client.context.span_id
    assert server.context.trace_id == client.context.trace_id
    assert server.attributes["llmsched.request_id"] == "t-1"
    assert server.attributes["llmsched.status"] == "finished" and server.attributes["llmsched.output_tokens"] == 3
    for stage in (Stage.ROUTE, Stage.DECODE):  # the ingress' spans nest under the server span
        child = _by_name(spans, stage)
        assert child.parent is not None and child.parent.span_id == server.context.span_id, stage


def test_http_traceparent_header_parents_server_span() -> None:
    tracing, exporter = memory_tracing()
    trace_id, parent_id = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    with BackgroundServer(EchoIngress, tracing=tracing, http=True) as s:
        conn = http.client.HTTPConnection("127.0.0.1", s.http_port, timeout=10)
        for stream in (False, True):
            conn.request("POST", "/v1/completions", json.dumps({"prompt": "hi", "max_tokens": 2, "stream": stream}),
                         {"Content-Type": "application/json", "traceparent": f"00-{trace_id}-{parent_id}-01"})
            resp = conn.getresponse()
            assert resp.status == 200
            resp.read()
        conn.close()
    spans = [sp for sp in exporter.get_finished_spans() if sp.name == Stage.INGRESS.value]
    assert len(spans) == 2
    for sp in spans:
        assert sp.parent is not None and f"{sp.parent.span_id:016x}" == parent_id
        assert f"{sp.context.trace_id:032x}" == trace_id and sp.attributes["llmsched.status"] == "finished"


def test_otel_sdk_disabled_records_and_propagates_nothing() -> None:
    exporter = InMemorySpanExporter()
    off = setup_tracing({"OTEL_SDK_DISABLED": "true", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://x:4317"},
                        exporter=exporter, set_global=False)
    assert not off.enabled and off.metadata() == () and off.extract({"traceparent": "00-" + "1" * 32 + "-" + "2" * 16
                                                                    + "-01"}) is None
    server_tracing, server_spans = memory_tracing()
    with BackgroundServer(EchoIngress, tracing=server_tracing) as s, Client(s.address, tracing=off) as c:
        c.generate("x", max_tokens=1)
    assert exporter.get_finished_spans() == ()
    (server,) = server_spans.get_finished_spans()
    assert server.parent is None  # the disabled client sent no traceparent
    # Without an endpoint or exporter there is nowhere to send spans: disabled too.
    assert not setup_tracing({}, set_global=False).enabled
    on = setup_tracing({"OTEL_SERVICE_NAME": "svc"}, exporter=exporter, set_global=False)
    with on.span(Stage.PREDICT):
        pass
    (sp,) = exporter.get_finished_spans()
    assert sp.name == "llmsched.predict" and sp.resource.attributes["service.name"] == "svc"


def test_traced_decorator_and_carrier_roundtrip() -> None:
    tracing, exporter = memory_tracing()

    @traced(tracing, Stage.KV_TRANSFER)
    async def transfer() -> dict[str, str]:
        return tracing.inject()  # what the ingress hands to a Ray actor call

    @traced(lambda: tracing, Stage.PREFILL)
    def prefill(carrier: dict[str, str]) -> None:
        pass

    carrier = asyncio.run(transfer())
    with tracing.span(Stage.MIGRATION_STAGE, parent=tracing.extract(carrier), attributes={"llmsched.stage": 1}):
        prefill(carrier)
    spans = {s.name: s for s in exporter.get_finished_spans()}
    kv, stage = spans["llmsched.kv_transfer"], spans["llmsched.migration.stage"]
    assert stage.parent is not None and stage.parent.span_id == kv.context.span_id
    assert spans["llmsched.prefill"].parent.span_id == stage.context.span_id  # type: ignore[union-attr]
