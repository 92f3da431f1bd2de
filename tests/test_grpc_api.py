"""The gRPC server over real loopback gRPC with the in-process ``EchoIngress``.

Covers: generated code freshness, stream indices, cancel/deadline propagation to the ingress, each bad request
-> the right status naming the field (and the server keeps serving), oversize payloads, overload, auth, health,
reflection, admin, TLS, and a hypothesis fuzz of malformed GenerateRequests.
"""

from __future__ import annotations

import collections
import filecmp
import math
import struct
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scheduler._proto import generate as protogen
from scheduler._proto.llmsched.v1 import admin_pb2, admin_pb2_grpc, inference_pb2, inference_pb2_grpc
from scheduler.client import Client
from scheduler.server.auth import AuthConfig, TLSConfig
from scheduler.server.background import BackgroundServer
from scheduler.server.echo import EchoIngress

GENERATE = "/llmsched.v1.Inference/Generate"


def wait_for(pred, timeout=3.0):  # type: ignore[no-untyped-def]
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.01)
    return pred()


@pytest.fixture(scope="module")
def srv():  # type: ignore[no-untyped-def]
    with BackgroundServer(
        lambda: EchoIngress(token_delay_s=0.001, max_model_len=4096), max_message_bytes=256 * 1024
    ) as s:
        yield s


@pytest.fixture(scope="module")
def channel(srv):  # type: ignore[no-untyped-def]
    ch = grpc.insecure_channel(srv.address)
    yield ch
    ch.close()


def raw_generate(
    channel: grpc.Channel, payload: bytes, timeout: float = 5.0
) -> tuple[grpc.StatusCode, str, list]:
    """Send raw bytes as a GenerateRequest; return (status, details, chunks)."""
    call = channel.unary_stream(
        GENERATE, request_serializer=None, response_deserializer=inference_pb2.GenerateChunk.FromString
    )
    chunks: list[inference_pb2.GenerateChunk] = []
    try:
        chunks.extend(call(payload, timeout=timeout))
    except grpc.RpcError as e:
        return e.code(), e.details() or "", chunks
    return grpc.StatusCode.OK, "", chunks


def good_request(**kw) -> inference_pb2.GenerateRequest:  # type: ignore[no-untyped-def]
    req = inference_pb2.GenerateRequest(text="hello", sampling=inference_pb2.SamplingParams(max_tokens=4))
    for k, v in kw.items():
        setattr(req, k, v)
    return req


def assert_still_serving(channel: grpc.Channel) -> None:
    code, details, chunks = raw_generate(channel, good_request().SerializeToString())
    assert code == grpc.StatusCode.OK, details
    assert [c.index for c in chunks] == [0, 1, 2, 3] and chunks[-1].finished


# ------------------------------------------------------------------------------------------- contract


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    fresh = protogen.generate(tmp_path)
    committed_root = Path(protogen.__file__).parent
    assert len(fresh) >= 8
    for path in fresh:
        rel = path.relative_to(tmp_path)
        committed = committed_root / rel
        assert committed.exists(), f"{rel} missing: run python -m scheduler._proto.generate"
        assert filecmp.cmp(path, committed, shallow=False), (
            f"{rel} is stale: run python -m scheduler._proto.generate"
        )


def test_stream_indices_complete_and_in_order(srv, channel) -> None:  # type: ignore[no-untyped-def]
    srv.ingress.chunk_tokens = 3
    try:
        req = inference_pb2.GenerateRequest(
            request_id="order-1",
            token_ids=inference_pb2.TokenIds(ids=[5, 6, 7]),
            sampling=inference_pb2.SamplingParams(max_tokens=50),
        )
        code, _, chunks = raw_generate(channel, req.SerializeToString())
    finally:
        srv.ingress.chunk_tokens = 1
    assert code == grpc.StatusCode.OK
    flat = [(c.index + k, t) for c in chunks for k, t in enumerate(c.token_ids)]
    assert [i for i, _ in flat] == list(range(50))
    assert [t for _, t in flat] == [[5, 6, 7][i % 3] for i in range(50)]
    assert all(c.request_id == "order-1" for c in chunks)
    assert chunks[-1].finished and chunks[-1].finish_reason == "length"
    assert not any(c.finished for c in chunks[:-1])


def test_server_assigns_request_id(channel) -> None:  # type: ignore[no-untyped-def]
    code, _, chunks = raw_generate(channel, good_request().SerializeToString())
    assert code == grpc.StatusCode.OK
    ids = {c.request_id for c in chunks}
    assert len(ids) == 1 and len(ids.pop()) >= 16


def test_sampling_fields_reach_ingress(srv, channel) -> None:  # type: ignore[no-untyped-def]
    req = good_request(request_id="fields-1", model="echo", priority=3, length_hint=7)
    req.sampling.temperature = 0.5
    req.sampling.top_p = 0.9
    req.sampling.top_k = 4
    req.sampling.seed = 11
    req.sampling.stop_token_ids.extend([1000])
    req.slo.ttft_ms = 250
    req.slo.tpot_ms = 20
    sent = time.time()
    assert raw_generate(channel, req.SerializeToString(), timeout=5.0)[0] == grpc.StatusCode.OK
    got = next(r for r in srv.ingress.requests if r.request_id == "fields-1")
    s = got.sampling
    assert (s.max_tokens, s.top_k, s.seed, s.stop_token_ids) == (4, 4, 11, (1000,))
    assert math.isclose(s.temperature, 0.5) and math.isclose(s.top_p, 0.9, rel_tol=1e-6)
    assert (got.model, got.priority, got.length_hint, got.prompt) == ("echo", 3, 7, "hello")
    assert math.isclose(got.ttft_slo_s, 0.25) and math.isclose(got.tpot_slo_s, 0.02)
    assert got.deadline_s is not None and abs(got.deadline_s - (sent + 5.0)) < 1.0


def test_tenant_reaches_ingress_and_empty_means_none(srv, channel) -> None:  # type: ignore[no-untyped-def]
    """``tenant`` (field 11) is the length predictor's per-request app; unset or empty leaves the config's."""
    for rid, tenant in (("tenant-1", "azure_conv"), ("tenant-2", "t" * 128), ("tenant-3", "")):
        assert raw_generate(channel, good_request(request_id=rid, tenant=tenant).SerializeToString())[0] == \
            grpc.StatusCode.OK
    got = {r.request_id: r.tenant for r in srv.ingress.requests if r.request_id.startswith("tenant-")}
    assert got == {"tenant-1": "azure_conv", "tenant-2": "t" * 128, "tenant-3": None}


# ------------------------------------------------------------------------------------------- bad input


def _both_prompts() -> bytes:
    a = inference_pb2.GenerateRequest(text="hi").SerializeToString()
    b = inference_pb2.GenerateRequest(token_ids=inference_pb2.TokenIds(ids=[1])).SerializeToString()
    return a + b  # protobuf merges concatenated messages: both oneof members on the wire


def _with(**sampling) -> bytes:  # type: ignore[no-untyped-def]
    req = good_request()
    for k, v in sampling.items():
        if k == "stop_token_ids":
            req.sampling.stop_token_ids.extend(v)
        else:
            setattr(req.sampling, k, v)
    return req.SerializeToString()


BAD_REQUESTS = {
    "empty text": (inference_pb2.GenerateRequest(text="").SerializeToString(), "prompt.text"),
    "empty token ids": (
        inference_pb2.GenerateRequest(token_ids=inference_pb2.TokenIds()).SerializeToString(),
        "prompt.token_ids",
    ),
    "no prompt": (inference_pb2.GenerateRequest(request_id="x").SerializeToString(), "prompt"),
    "both prompts": (_both_prompts(), "prompt"),
    "negative token id": (
        inference_pb2.GenerateRequest(token_ids=inference_pb2.TokenIds(ids=[3, -1])).SerializeToString(),
        "prompt.token_ids[1]",
    ),
    "zero max_tokens": (_with(max_tokens=0), "sampling.max_tokens"),
    "negative max_tokens": (_with(max_tokens=-5), "sampling.max_tokens"),
    "negative temperature": (_with(temperature=-0.1), "sampling.temperature"),
    "nan temperature": (_with(temperature=float("nan")), "sampling.temperature"),
    "zero top_p": (_with(top_p=0.0), "sampling.top_p"),
    "top_p above 1": (_with(top_p=1.5), "sampling.top_p"),
    "negative top_k": (_with(top_k=-1), "sampling.top_k"),
    "negative stop id": (_with(stop_token_ids=[-3]), "sampling.stop_token_ids[0]"),
    "negative length hint": (good_request(length_hint=-1).SerializeToString(), "length_hint"),
    "negative slo": (
        inference_pb2.GenerateRequest(text="a", slo=inference_pb2.SLO(ttft_ms=-1)).SerializeToString(),
        "slo.ttft_ms",
    ),
    "long request id": (good_request(request_id="r" * 300).SerializeToString(), "request_id"),
    "long tenant": (good_request(tenant="t" * 129).SerializeToString(), "tenant"),
    "control character in tenant": (good_request(tenant="app\x1b[2J").SerializeToString(), "tenant"),
    # field 11 as a varint: protobuf keeps it as an unknown field, so the tenant was dropped without a word
    "tenant not a string": (good_request().SerializeToString() + bytes([11 << 3 | 0, 5]), "tenant"),
    "malformed bytes": (b"\xff\xff\xff\xff\x0f", "request"),
    "unknown model (ingress)": (good_request(model="gpt-9").SerializeToString(), "model"),
    "beyond context (ingress)": (_with(max_tokens=5000), "sampling.max_tokens"),
}


@pytest.mark.parametrize("name", list(BAD_REQUESTS))
def test_bad_request_names_field_and_server_keeps_serving(channel, name: str) -> None:  # type: ignore[no-untyped-def]
    payload, field = BAD_REQUESTS[name]
    call = channel.unary_stream(
        GENERATE, request_serializer=None, response_deserializer=inference_pb2.GenerateChunk.FromString
    )
    with pytest.raises(grpc.RpcError) as info:
        list(call(payload, timeout=5))
    err = info.value
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (err.code(), err.details())
    assert err.details().startswith(field), err.details()
    assert ("llmsched-field", field) in tuple(err.trailing_metadata()), err.trailing_metadata()
    assert_still_serving(channel)


def test_oversize_payload_is_resource_exhausted(channel) -> None:  # type: ignore[no-untyped-def]
    """Over the server's limit (256 KiB here): RESOURCE_EXHAUSTED naming ``prompt``, no retry-after (a retry cannot
    help); past grpc's transport limit (twice that) grpc's own RESOURCE_EXHAUSTED. The server keeps serving."""
    req = inference_pb2.GenerateRequest(token_ids=inference_pb2.TokenIds(ids=[123456] * 100_000))
    assert 256 * 1024 < req.ByteSize() < 2 * 256 * 1024
    call = channel.unary_stream(GENERATE, request_serializer=None,
                                response_deserializer=inference_pb2.GenerateChunk.FromString)
    with pytest.raises(grpc.RpcError) as info:
        list(call(req.SerializeToString(), timeout=5))
    err = info.value
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and err.details().startswith("prompt:"), err.details()
    md = dict(err.trailing_metadata())
    assert md.get("llmsched-field") == "prompt" and "retry-after" not in md, md
    huge = inference_pb2.GenerateRequest(token_ids=inference_pb2.TokenIds(ids=[123456] * 200_000))
    assert huge.ByteSize() > 2 * 256 * 1024
    code, details, _ = raw_generate(channel, huge.SerializeToString())
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, details
    assert_still_serving(channel)


def test_overload_is_resource_exhausted_with_retry_after() -> None:
    with BackgroundServer(lambda: EchoIngress(max_inflight=0)) as s, grpc.insecure_channel(s.address) as ch:
        call = ch.unary_stream(
            GENERATE, request_serializer=None, response_deserializer=inference_pb2.GenerateChunk.FromString
        )
        with pytest.raises(grpc.RpcError) as info:
            list(call(good_request().SerializeToString(), timeout=5))
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert ("retry-after", "0.5") in tuple(info.value.trailing_metadata())


# ------------------------------------------------------------------------------------------- cancel, deadline


def test_client_cancel_mid_stream_reaches_ingress(srv, channel) -> None:  # type: ignore[no-untyped-def]
    stub = inference_pb2_grpc.InferenceStub(channel)
    req = good_request(request_id="cancel-1")
    req.sampling.max_tokens = 4000
    call = stub.Generate(req, timeout=10)
    got = [next(call) for _ in range(3)]
    assert [c.index for c in got] == [0, 1, 2]
    call.cancel()
    assert wait_for(lambda: "cancel-1" in srv.ingress.cancelled), srv.ingress.cancelled[-5:]
    assert wait_for(lambda: "cancel-1" not in srv.ingress._inflight)


def test_cancel_rpc_stops_stream(srv, channel) -> None:  # type: ignore[no-untyped-def]
    stub = inference_pb2_grpc.InferenceStub(channel)
    req = good_request(request_id="cancel-2")
    req.sampling.max_tokens = 4000
    call = stub.Generate(req, timeout=10)
    next(call)
    assert stub.Cancel(inference_pb2.CancelRequest(request_id="cancel-2"), timeout=5).cancelled
    rest = list(call)
    assert rest[-1].finished and rest[-1].finish_reason == "abort"
    assert not stub.Cancel(inference_pb2.CancelRequest(request_id="cancel-2"), timeout=5).cancelled
    with pytest.raises(grpc.RpcError) as info:
        stub.Cancel(inference_pb2.CancelRequest(), timeout=5)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "request_id" in info.value.details()


def test_deadline_propagates_and_cancels(srv, channel) -> None:  # type: ignore[no-untyped-def]
    stub = inference_pb2_grpc.InferenceStub(channel)
    req = good_request(request_id="deadline-1")
    req.sampling.max_tokens = 4000
    sent = time.time()
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Generate(req, timeout=0.3))
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    got = next(r for r in srv.ingress.requests if r.request_id == "deadline-1")
    assert got.deadline_s is not None and abs(got.deadline_s - (sent + 0.3)) < 0.2
    assert wait_for(lambda: "deadline-1" in srv.ingress.cancelled)
    assert_still_serving(channel)


# ------------------------------------------------------------------------------------------- health, reflection, admin


def test_health_serving_then_not_serving_while_draining() -> None:
    with BackgroundServer(EchoIngress) as s, grpc.insecure_channel(s.address) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        for service in ("", "llmsched.v1.Inference", "llmsched.v1.Admin"):
            resp = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING
        s.call(s.grpc.set_serving(False))
        resp = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        assert resp.status == health_pb2.HealthCheckResponse.NOT_SERVING


def test_reflection_lists_services(channel) -> None:  # type: ignore[no-untyped-def]
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    responses = stub.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
    )
    names = {s.name for r in responses for s in r.list_services_response.service}
    assert {"llmsched.v1.Inference", "llmsched.v1.Admin", "grpc.health.v1.Health"} <= names


def test_admin_calls_and_errors(channel) -> None:  # type: ignore[no-untyped-def]
    admin = admin_pb2_grpc.AdminStub(channel)
    state = admin.GetClusterState(admin_pb2.GetClusterStateRequest(), timeout=5)
    assert [i.instance_id for i in state.instances] == ["echo-0", "echo-1"]
    assert state.instances[0].role == admin_pb2.INSTANCE_ROLE_MIXED and state.router == "echo"
    assert len(admin.ListInstances(admin_pb2.ListInstancesRequest(), timeout=5).instances) == 2
    assert admin.Scale(admin_pb2.ScaleRequest(pool="decode", count=3), timeout=5).count == 3
    switch = admin_pb2.SwitchRoleRequest(instance_id="echo-0", role=admin_pb2.INSTANCE_ROLE_PREFILL)
    assert admin.SwitchRole(switch, timeout=5).started
    assert not admin.SwitchRole(switch, timeout=5).started  # already asked
    assert (
        admin.DrainInstance(admin_pb2.DrainInstanceRequest(instance_id="echo-1"), timeout=5).requests_moved
        == 0
    )
    cases = [
        (
            admin.MigrateRequest,
            admin_pb2.MigrateRequestRequest(request_id="nope"),
            grpc.StatusCode.NOT_FOUND,
            "request_id",
        ),
        (
            admin.MigrateRequest,
            admin_pb2.MigrateRequestRequest(),
            grpc.StatusCode.INVALID_ARGUMENT,
            "request_id",
        ),
        (
            admin.DrainInstance,
            admin_pb2.DrainInstanceRequest(instance_id="x"),
            grpc.StatusCode.NOT_FOUND,
            "instance_id",
        ),
        (
            admin.Scale,
            admin_pb2.ScaleRequest(pool="decode", count=-1),
            grpc.StatusCode.INVALID_ARGUMENT,
            "count",
        ),
        (admin.Scale, admin_pb2.ScaleRequest(count=1), grpc.StatusCode.INVALID_ARGUMENT, "pool"),
        (admin.SwitchRole, admin_pb2.SwitchRoleRequest(role=admin_pb2.INSTANCE_ROLE_DECODE),
         grpc.StatusCode.INVALID_ARGUMENT, "instance_id"),
        (admin.SwitchRole, admin_pb2.SwitchRoleRequest(instance_id="echo-0"), grpc.StatusCode.INVALID_ARGUMENT,
         "role"),  # unspecified
        (admin.SwitchRole, admin_pb2.SwitchRoleRequest(instance_id="echo-0", role=admin_pb2.INSTANCE_ROLE_MIXED),
         grpc.StatusCode.INVALID_ARGUMENT, "role"),
        (admin.SwitchRole, admin_pb2.SwitchRoleRequest(instance_id="x", role=admin_pb2.INSTANCE_ROLE_DECODE),
         grpc.StatusCode.NOT_FOUND, "instance_id"),
    ]
    for method, msg, code, field in cases:
        with pytest.raises(grpc.RpcError) as info:
            method(msg, timeout=5)
        assert info.value.code() == code and info.value.details().startswith(field), info.value.details()


# ------------------------------------------------------------------------------------------- auth, TLS


def test_token_auth() -> None:
    auth = AuthConfig.tokens(client="client-secret", admin="admin-secret")
    with BackgroundServer(EchoIngress, auth=auth) as s, grpc.insecure_channel(s.address) as ch:
        stub = inference_pb2_grpc.InferenceStub(ch)
        admin = admin_pb2_grpc.AdminStub(ch)

        def gen(md):  # type: ignore[no-untyped-def]
            return list(stub.Generate(good_request(), metadata=md, timeout=5))

        def bearer(t: str) -> tuple[tuple[str, str], ...]:
            return (("authorization", f"Bearer {t}"),)

        for md in ((), bearer("wrong"), (("authorization", "client-secret"),)):
            with pytest.raises(grpc.RpcError) as info:
                gen(md)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "secret" not in info.value.details()
        assert gen(bearer("client-secret"))[-1].finished
        assert gen(bearer("admin-secret"))[-1].finished  # admin may do everything
        with pytest.raises(grpc.RpcError) as info:
            admin.GetClusterState(
                admin_pb2.GetClusterStateRequest(), metadata=bearer("client-secret"), timeout=5
            )
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        with pytest.raises(grpc.RpcError) as info:
            admin.GetClusterState(admin_pb2.GetClusterStateRequest(), timeout=5)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert (
            admin.GetClusterState(
                admin_pb2.GetClusterStateRequest(), metadata=bearer("admin-secret"), timeout=5
            ).router
            == "echo"
        )
        # Probes stay open.
        health = health_pb2_grpc.HealthStub(ch)
        assert (
            health.Check(health_pb2.HealthCheckRequest(), timeout=5).status
            == health_pb2.HealthCheckResponse.SERVING
        )


def _self_signed() -> tuple[bytes, bytes]:
    x509 = pytest.importorskip("cryptography.x509")
    import datetime
    import ipaddress

    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def test_tls_and_mtls() -> None:
    from scheduler.client import ClientTLS, Unavailable

    cert, key = _self_signed()
    auth = AuthConfig(tls=TLSConfig(cert_chain=cert, private_key=key))
    with BackgroundServer(EchoIngress, auth=auth) as s:
        with Client(
            s.address, tls=ClientTLS(root_certificates=cert, server_name="localhost"), retries=0
        ) as c:
            assert c.generate("tls", max_tokens=3).token_ids == [ord("t"), ord("l"), ord("s")]
        with Client(s.address, retries=0, timeout_s=2) as plain, pytest.raises(Unavailable):
            plain.generate("x")  # plaintext client cannot talk to a TLS server
    client_cert, client_key = _self_signed()
    mtls = AuthConfig(tls=TLSConfig(cert_chain=cert, private_key=key, client_ca=client_cert))
    with BackgroundServer(EchoIngress, auth=mtls) as s:
        ok = ClientTLS(
            root_certificates=cert,
            private_key=client_key,
            certificate_chain=client_cert,
            server_name="localhost",
        )
        with Client(s.address, tls=ok, retries=0) as c:
            assert c.generate("m", max_tokens=1).token_ids == [ord("m")]
        no_cert = ClientTLS(root_certificates=cert, server_name="localhost")
        with Client(s.address, tls=no_cert, retries=0, timeout_s=2) as c, pytest.raises(Unavailable):
            c.generate("m", max_tokens=1)


# ------------------------------------------------------------------------------------------- fuzz

VALID_FUZZ_CODES = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED}
FUZZ_COUNTS: collections.Counter[str] = collections.Counter()

_i32 = st.integers(-(2**31), 2**31 - 1)
_f32 = st.floats(width=32, allow_nan=True, allow_infinity=True)


@st.composite
def fuzz_payload(draw) -> bytes:  # type: ignore[no-untyped-def]
    kind = draw(st.sampled_from(["bytes", "fields", "mutated"]))
    if kind == "bytes":
        return draw(st.binary(max_size=64))
    req = inference_pb2.GenerateRequest(
        request_id=draw(st.text(max_size=40)),
        model=draw(st.sampled_from(["", "echo", "other"])),
        priority=draw(_i32),
    )
    prompt = draw(st.sampled_from(["text", "ids", "none"]))
    if prompt == "text":
        req.text = draw(st.text(max_size=20))
    elif prompt == "ids":
        req.token_ids.ids.extend(draw(st.lists(st.one_of(st.integers(0, 5000), _i32), max_size=8)))
        req.token_ids.SetInParent()
    s = req.sampling
    # Mostly-valid numbers with the odd bad one, so both accepted and rejected paths get exercised.
    temp = st.one_of(st.floats(0.0, 2.0, width=32), _f32)
    top_p = st.one_of(st.floats(0.0625, 1.0, width=32), _f32)
    for name, strat in (
        ("max_tokens", st.integers(-3, 40)),
        ("temperature", temp),
        ("top_p", top_p),
        ("seed", st.integers(-(2**63), 2**63 - 1)),
    ):
        if draw(st.booleans()):
            setattr(s, name, draw(strat))
    s.top_k = draw(st.integers(-1, 50))
    s.stop_token_ids.extend(draw(st.lists(st.one_of(st.integers(0, 1000), _i32), max_size=2)))
    if draw(st.booleans()):
        req.slo.ttft_ms = draw(st.one_of(st.floats(0, 1e4), st.floats(allow_nan=True)))
    if draw(st.booleans()):
        req.length_hint = draw(st.one_of(st.integers(0, 100), st.integers(-(2**63), 2**63 - 1)))
    req.resume_from_index = draw(st.integers(-2, 10))
    raw = req.SerializeToString()
    if kind == "mutated" and raw:  # flip / truncate bytes of a structurally plausible message
        pos = draw(st.integers(0, len(raw) - 1))
        raw = (
            raw[:pos]
            + struct.pack("B", draw(st.integers(0, 255)))
            + raw[pos + 1 : draw(st.integers(pos, len(raw)))]
        )
    return raw


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(payload=fuzz_payload())
def test_fuzz_malformed_generate_requests(channel, payload: bytes) -> None:  # type: ignore[no-untyped-def]
    code, details, chunks = raw_generate(channel, payload)
    FUZZ_COUNTS[code.name] += 1
    assert code in VALID_FUZZ_CODES, (code, details, payload)
    if code == grpc.StatusCode.OK:  # indices contiguous from where the (resuming) client asked
        start = inference_pb2.GenerateRequest.FromString(payload).resume_from_index
        got = [c.index + k for c in chunks for k in range(len(c.token_ids))]
        assert got == list(range(start, start + len(got))) and chunks[-1].finished
    elif code == grpc.StatusCode.INVALID_ARGUMENT:
        assert details.split(":", 1)[0], details  # names a field


def test_fuzz_left_server_serving(channel) -> None:  # type: ignore[no-untyped-def]
    # Runs after the fuzz test (file order); prints the counts recorded in docs/api.md.
    print("fuzz status counts:", dict(FUZZ_COUNTS), "total", sum(FUZZ_COUNTS.values()))
    assert_still_serving(channel)


def test_serve_drains_then_stops() -> None:
    import asyncio

    from scheduler.server.grpc_server import serve

    events: list[str] = []

    async def main() -> None:
        stop = asyncio.Event()
        started: list = []

        async def drain() -> None:
            health = started[0].health
            status = (await health.Check(health_pb2.HealthCheckRequest(service=""), None)).status
            events.append(f"drain:{health_pb2.HealthCheckResponse.ServingStatus.Name(status)}")

        def on_started(srv) -> None:  # type: ignore[no-untyped-def]
            started.append(srv)
            events.append("started")
            asyncio.get_running_loop().call_later(0.05, stop.set)

        await asyncio.wait_for(
            serve(EchoIngress(), port=0, stop=stop, on_started=on_started, drain=drain, grace_s=0.1), 10
        )

    asyncio.run(main())
    assert events == ["started", "drain:NOT_SERVING"]
