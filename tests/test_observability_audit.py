"""Observability: what an audit (twenty-ninth session) found the metrics, traces and dashboard got wrong; each test
failed before its fix. Servers run in-process (``BackgroundServer`` + ``EchoIngress``), no Ray."""

from __future__ import annotations

import asyncio
import http.client
import json
import re
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from prometheus_client import CollectorRegistry, generate_latest

import scheduler.telemetry.tracing as tracing_mod
from scheduler.client import Client, InvalidArgument, ResourceExhausted
from scheduler.config.load import load_config
from scheduler.control.api import GenerateRequest, InvalidRequest
from scheduler.core.types import InstanceRole, InstanceSnapshot
from scheduler.engine.base import SamplingParams
from scheduler.predict.base import LengthPrediction
from scheduler.predict.serving import ServingPredictor
from scheduler.server.admission import InflightLimiter
from scheduler.server.background import BackgroundServer
from scheduler.server.echo import EchoIngress
from scheduler.server.http_server import build_app
from scheduler.telemetry.metrics import Metrics, MetricsRecorder, RequestStatus
from scheduler.telemetry.tracing import Stage, Tracing
from tests.test_ingress_audit import FakeInstance, _consume, _ingress, _until

# -- dashboard namespace ----------------------------------------------------------------------------------------------

DASHBOARD = Path(__file__).resolve().parents[1] / "deploy/helm/llmsched/dashboards/llmsched.json"


def test_namespace_variable_query_has_series_before_any_request() -> None:
    rec = MetricsRecorder(Metrics(CollectorRegistry()))
    rec.observe_instances([InstanceSnapshot("mixed-0", InstanceRole.MIXED)])  # the ingress' first refresh
    exposed = {line.split("{")[0].split(" ")[0] for line in generate_latest(rec.registry).decode().splitlines()
               if line and not line.startswith("#")}
    for var in json.loads(DASHBOARD.read_text())["templating"]["list"]:
        m = re.match(r"label_values\((\w+)", str(var.get("query", "")))
        if m:
            assert m.group(1) in exposed, var


# -- duplicate id -----------------------------------------------------------------------------------------------------

class _DupRefusing(EchoIngress):
    """Refuses an id already in flight, as the live Ingress does (``_validate``)."""

    def generate(self, request):  # type: ignore[no-untyped-def,override]
        if request.request_id in self._inflight:
            raise InvalidRequest(f"request_id: {request.request_id!r} is already in flight", field="request_id")
        return super().generate(request)


@pytest.mark.parametrize("limit, error", [(None, InvalidArgument), (1, ResourceExhausted)])
def test_a_duplicate_id_does_not_erase_the_running_request(limit, error) -> None:  # type: ignore[no-untyped-def]
    rec = MetricsRecorder(Metrics(CollectorRegistry()))
    limiter = InflightLimiter(limits={0: limit}, default_limit=limit, max_total=8) if limit else None
    with BackgroundServer(lambda: _DupRefusing(token_delay_s=0.01), recorder=rec, limiter=limiter) as s:
        c = Client(s.address, retries=0)
        first = threading.Thread(target=lambda: c.generate([1, 2], max_tokens=40, request_id="same"))
        first.start()
        deadline = time.monotonic() + 5
        while rec.in_flight == 0 and time.monotonic() < deadline:
            time.sleep(0.005)
        with pytest.raises(error):
            c.generate([1, 2], max_tokens=5, request_id="same")
        def gauge() -> float | None:
            return rec.registry.get_sample_value("llmsched_requests_in_flight", {"api": "grpc", "priority": "0"})

        # The server ends the refused call after the client has its status: wait for that, then the first is still
        # counted (before the fix the refused duplicate's end took the first's entry with it: 0).
        deadline = time.monotonic() + 5
        while (gauge() or 0) > 1 and time.monotonic() < deadline:
            time.sleep(0.005)
        assert gauge() == 1  # the first is still running
        first.join(10)
    labels = {"api": "grpc", "route": "none"}
    assert rec.registry.get_sample_value("llmsched_requests_total", {**labels, "status": "finished"}) == 1
    assert rec.registry.get_sample_value("llmsched_e2e_seconds_count", {"route": "none", "instance_id": ""}) == 1
    assert rec.in_flight == 0


# -- http 413 ---------------------------------------------------------------------------------------------------------

def test_oversize_body_is_counted_invalid() -> None:
    rec = MetricsRecorder(Metrics(CollectorRegistry()))
    app = build_app(EchoIngress(), recorder=rec, max_body_bytes=1000)

    async def run() -> int:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            return (await c.post("/v1/completions", json={"prompt": "x" * 5000, "max_tokens": 1})).status_code

    assert asyncio.run(run()) == 413
    assert rec.registry.get_sample_value("llmsched_requests_total",
                                         {"api": "http", "route": "none", "status": "invalid"}) == 1


# -- http disconnect --------------------------------------------------------------------------------------------------

def test_non_streaming_client_disconnect_cancels_and_counts_cancelled() -> None:
    rec = MetricsRecorder(Metrics(CollectorRegistry()))
    with BackgroundServer(lambda: EchoIngress(token_delay_s=0.01), recorder=rec, http=True) as s:
        sock = socket.create_connection(("127.0.0.1", s.http_port))
        body = json.dumps({"prompt": [1], "max_tokens": 1000, "request_id": "gone"}).encode()  # ~10 s of tokens
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(body) + body)
        deadline = time.monotonic() + 5
        while rec.in_flight == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.1)
        sock.close()
        t0 = time.monotonic()
        while rec.in_flight and time.monotonic() - t0 < 5:
            time.sleep(0.01)
        assert time.monotonic() - t0 < 2.0, "the request kept running after its client left"
        assert "gone" in s.ingress.cancelled
    labels = {"api": "http", "route": "none"}
    assert rec.registry.get_sample_value("llmsched_requests_total", {**labels, "status": "cancelled"}) == 1
    assert rec.registry.get_sample_value("llmsched_requests_total", {**labels, "status": "finished"}) is None


# -- http failed ------------------------------------------------------------------------------------------------------

class _Broken(EchoIngress):
    async def _stream(self, request):  # type: ignore[no-untyped-def,override]
        n = 0
        async for c in super()._stream(request):
            if n == 2:
                raise RuntimeError("engine bug")
            n += 1
            yield c


def test_http_server_error_is_counted_failed_not_cancelled() -> None:
    rec = MetricsRecorder(Metrics(CollectorRegistry()))
    with BackgroundServer(_Broken, recorder=rec, http=True) as s:
        for stream in (False, True):
            conn = http.client.HTTPConnection("127.0.0.1", s.http_port, timeout=10)
            conn.request("POST", "/v1/completions",
                         json.dumps({"prompt": [1, 2], "max_tokens": 8, "stream": stream}),
                         {"Content-Type": "application/json"})
            try:
                resp = conn.getresponse()
                resp.read()
            except (http.client.HTTPException, OSError):
                pass  # the streaming response breaks off
            conn.close()
        for _ in range(300):
            if rec.in_flight == 0:
                break
            time.sleep(0.01)
    labels = {"api": "http", "route": "none"}
    assert rec.registry.get_sample_value("llmsched_requests_total", {**labels, "status": "failed"}) == 2
    assert rec.registry.get_sample_value("llmsched_requests_total", {**labels, "status": "cancelled"}) is None


# -- instance series --------------------------------------------------------------------------------------------------

def test_latency_series_of_a_gone_instance_are_removed() -> None:
    rec = MetricsRecorder(Metrics(CollectorRegistry()))
    for n in range(50):
        live = [f"mixed-{n}", f"mixed-{n + 1}"]
        rec.observe_instances([InstanceSnapshot(i, InstanceRole.MIXED) for i in live])
        rid = f"r{n}"
        rec.on_request_start(rid)
        rec.on_route(rid, route="colocated", instance_id=live[0])
        rec.on_first_token(rid, instance_id=live[0])
        rec.on_finish(rid, status=RequestStatus.FINISHED, output_tokens=5, instance_id=live[0])
    text = generate_latest(rec.registry).decode()
    ids = {line.split('instance_id="')[1].split('"')[0] for line in text.splitlines()
           if line.startswith(("llmsched_ttft", "llmsched_tpot", "llmsched_e2e")) and 'instance_id="' in line}
    assert ids == {"mixed-49"}  # the live instance that served; mixed-0..48 are gone
    assert rec.registry.get_sample_value("llmsched_ttft_seconds_count",
                                         {"route": "colocated", "instance_id": "mixed-49"}) == 1


# -- migration span ---------------------------------------------------------------------------------------------------

def test_migration_span_joins_the_requests_trace() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing = Tracing(provider)
    ing = _ingress([FakeInstance("mixed-0"), FakeInstance("mixed-1")], routable=["mixed-0"], tracing=tracing)

    async def scenario() -> None:
        out: list = []
        with tracing.span(Stage.INGRESS, kind=SpanKind.SERVER):  # as the server does around ingress calls
            task = asyncio.create_task(
                _consume(ing, GenerateRequest("m", prompt="hi", sampling=SamplingParams(max_tokens=30)), out))
        await _until(lambda: len(out) >= 3)
        assert (await ing.migrate("m", "mixed-1")).committed  # from outside the request's context
        await asyncio.wait_for(task, 5)

    asyncio.run(scenario())
    spans = {s.name: s for s in exporter.get_finished_spans()}
    server, migration = spans[Stage.INGRESS.value], spans[Stage.MIGRATION.value]
    assert migration.context.trace_id == server.context.trace_id
    assert migration.parent is not None and migration.parent.span_id == server.context.span_id
    assert spans[Stage.PREDICT.value].parent.span_id == server.context.span_id


# -- otel env ---------------------------------------------------------------------------------------------------------

def test_traces_protocol_variable_is_honoured(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[str] = []
    monkeypatch.setattr(tracing_mod, "_otlp_exporter", lambda protocol: seen.append(protocol))  # -> None: disabled
    env = {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces",
           "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf"}
    tracing_mod.setup_tracing(env, set_global=False)
    assert seen == ["http/protobuf"]


# -- predictor metric -------------------------------------------------------------------------------------------------

class _Four:
    def predict(self, prompt, *, prompt_tokens, tenant=None):  # type: ignore[no-untyped-def]
        return LengthPrediction.from_probs([1.0] + [0.0] * 8)  # all in [1, 16): median 4


def test_the_ingress_records_the_predictors_error() -> None:
    rec = MetricsRecorder(Metrics(CollectorRegistry()))
    ing = _ingress([FakeInstance("mixed-0")], recorder=rec)
    ing.predictor = ServingPredictor(_Four(), "four")  # type: ignore[arg-type]

    async def run() -> None:
        out: list = []
        await _consume(ing, GenerateRequest("p", prompt="hello", sampling=SamplingParams(max_tokens=10)), out)
        assert out[-1].finished and sum(len(c.token_ids) for c in out) == 10
        hinted: list = []
        await _consume(ing, GenerateRequest("h", prompt="hello", sampling=SamplingParams(max_tokens=3),
                                            length_hint=3), hinted)

    asyncio.run(run())
    get = rec.registry.get_sample_value
    assert get("llmsched_predictor_abs_error_tokens_count", {"predictor": "four"}) == 1
    assert get("llmsched_predictor_abs_error_tokens_sum", {"predictor": "four"}) == 6.0


# -- slo buckets ------------------------------------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[1]


def _quantile(q: float, buckets: list[tuple[float, float]]) -> float:
    """Prometheus' histogram_quantile (linear interpolation inside the bucket)."""
    rank, prev_le, prev_c = q * buckets[-1][1], 0.0, 0.0
    for le, c in buckets:
        if c >= rank:
            return prev_le if le == float("inf") else prev_le + (le - prev_le) * (rank - prev_c) / (c - prev_c)
        prev_le, prev_c = le, c
    raise AssertionError("unreachable")


def _boundaries(rec: MetricsRecorder, name: str) -> set[float]:
    rec.metrics.ttft.labels("colocated", "i0")  # a series to expose (a labelled histogram has none until used)
    rec.metrics.tpot.labels("colocated", "i0")
    return {float(s.labels["le"]) for f in rec.registry.collect() for s in f.samples if s.name == name}


def test_ttft_p99_well_inside_the_default_slo_does_not_read_as_a_breach() -> None:
    class Clock:
        t = 0.0

        def __call__(self) -> float:
            return self.t

    clock = Clock()
    rec = MetricsRecorder(Metrics(CollectorRegistry()), clock=clock)
    for i in range(100):
        clock.t = 0.0
        rec.on_request_start(f"r{i}")
        clock.t = 1.1  # every request: TTFT 1.1 s, the default SLO is 2.0 s
        rec.on_first_token(f"r{i}", instance_id="i0")
        rec.on_finish(f"r{i}", status=RequestStatus.FINISHED, output_tokens=1)
    buckets = sorted((float(s.labels["le"]), s.value) for f in rec.registry.collect() for s in f.samples
                     if s.name == "llmsched_ttft_seconds_bucket")
    assert _quantile(0.99, buckets) <= 1.5
    assert load_config("default").slos[0].ttft_s in _boundaries(rec, "llmsched_ttft_seconds_bucket")


def test_every_shipped_slo_is_a_bucket_boundary() -> None:
    configs = sorted((ROOT / "scheduler/config/examples").glob("*.yaml")) + sorted((ROOT / "deploy/examples").glob("*.yaml"))
    assert configs
    for path in configs:
        cfg = load_config(str(path))
        rec = MetricsRecorder(Metrics(CollectorRegistry(), slos=cfg.slos))
        for spec in cfg.slos.values():
            if spec.ttft_s:
                assert spec.ttft_s in _boundaries(rec, "llmsched_ttft_seconds_bucket"), (path.name, spec)
            if spec.tpot_s:
                assert spec.tpot_s in _boundaries(rec, "llmsched_tpot_seconds_bucket"), (path.name, spec)


# -- span cancel ------------------------------------------------------------------------------------------------------

def test_a_cancelled_span_is_an_error() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing = Tracing(provider)

    async def migrate() -> None:
        with tracing.span(Stage.MIGRATION, request_id="r"):
            await asyncio.sleep(10)

    async def scenario() -> None:
        task = asyncio.create_task(migrate())
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(scenario())
    (span,) = exporter.get_finished_spans()
    assert span.status.status_code is StatusCode.ERROR
    assert any(e.name == "exception" for e in span.events)
