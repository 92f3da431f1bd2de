"""Bad input on the APIs (an audit by a helper session): raw protobufs straight to the gRPC server (past the SDK's own
checks) and JSON bodies to the OpenAI-compatible HTTP app, over the in-process ``EchoIngress`` or a real ``Ingress``
on fake instances (``tests/test_ingress_audit.py``; no Ray). Each test failed before its fix."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import grpc
import httpx
import pytest

from scheduler._proto.llmsched.v1 import admin_pb2, admin_pb2_grpc, inference_pb2
from scheduler.server.background import BackgroundServer
from scheduler.server.echo import EchoIngress
from scheduler.server.http_server import build_app
from tests.test_grpc_api import raw_generate
from tests.test_ingress_audit import FakeInstance, _ingress

VOCAB, CONTEXT = 32000, 4096  # the default config's model (the real Ingress' checks)


def _req(*, ids: list[int] | None = None, **kw: Any) -> bytes:
    sampling = inference_pb2.SamplingParams(**{"max_tokens": 4, **kw.pop("sampling", {})})
    prompt = {"token_ids": inference_pb2.TokenIds(ids=ids)} if ids is not None else {"text": "hello"}
    return inference_pb2.GenerateRequest(**prompt, sampling=sampling, **kw).SerializeToString()


def _field(code: grpc.StatusCode, details: str) -> str:
    return details.split(":", 1)[0] if code is grpc.StatusCode.INVALID_ARGUMENT else f"<{code.name}>"


def _real_ingress() -> Any:
    return _ingress([FakeInstance("mixed-0"), FakeInstance("mixed-1")])


# -- gRPC: a refused request must not touch the one running ------------------------------------------------------------

# What each bad request must come back with: the field its INVALID_ARGUMENT names first.
BAD_GRPC = {
    "duplicate id": (_req(request_id="orig"), "request_id"),
    "id outside the vocab": (_req(ids=[1, VOCAB]), "prompt.token_ids"),
    "prompt alone over the context": (_req(ids=[1] * (CONTEXT + 10), sampling={"max_tokens": 1}), "prompt.token_ids"),
    "prompt + max_tokens over the context": (_req(ids=[1] * 4000, sampling={"max_tokens": 200}),
                                             "sampling.max_tokens"),
    "stop id outside the vocab": (_req(sampling={"stop_token_ids": [VOCAB]}), "sampling.stop_token_ids"),
    "unknown model": (_req(model="nope"), "model"),
    "request id with DEL": (_req(request_id="a\x7fb"), "request_id"),
    "request id with C1 CSI": (_req(request_id="a\x9b2J"), "request_id"),
    "resume past max_tokens": (_req(resume_from_index=100), "resume_from_index"),
}


def test_bad_requests_leave_the_running_request_whole() -> None:
    """A duplicate id refused as already in flight made the gRPC server cancel that id: the original request, which
    ended with finish_reason abort after a third of its tokens. (Every error the ingress raised was followed by a
    cancel of the request's id.) The other rows: the prompt alone over the context named sampling.max_tokens (no
    max_tokens can fit it), stop ids outside the vocab were taken (the simulator never stopped; vLLM refused them only
    after routing), DEL and C1 controls passed the control-character check, and a resume index past max_tokens ran the
    whole request to send nothing."""
    with BackgroundServer(_real_ingress) as s, grpc.insecure_channel(s.address) as ch:
        got: dict[str, Any] = {}
        first = threading.Thread(target=lambda: got.update(orig=raw_generate(
            ch, _req(request_id="orig", ids=[1, 2, 3], sampling={"max_tokens": 60}), timeout=20)))
        first.start()
        deadline = time.monotonic() + 5
        while not s.call(_in_flight(s.ingress, "orig")) and time.monotonic() < deadline:
            time.sleep(0.01)
        answers = {name: raw_generate(ch, payload)[:2] for name, (payload, _) in BAD_GRPC.items()}
        first.join(20)
    code, _, chunks = got["orig"]
    assert code is grpc.StatusCode.OK
    assert sum(len(c.token_ids) for c in chunks) == 60 and chunks[-1].finish_reason == "length"
    assert {n: _field(*a) for n, a in answers.items()} == {n: f for n, (_, f) in BAD_GRPC.items()}


async def _in_flight(ingress: Any, request_id: str) -> bool:
    return request_id in ingress.registry


def test_resume_from_index_up_to_max_tokens_is_still_accepted() -> None:
    """The bound above is max_tokens itself: a client that has every token but missed the final chunk resumes there."""
    with BackgroundServer(lambda: EchoIngress()) as s, grpc.insecure_channel(s.address) as ch:
        code, _, chunks = raw_generate(ch, _req(resume_from_index=4))
    assert code is grpc.StatusCode.OK and chunks[-1].finished and not any(c.token_ids for c in chunks)


def test_negative_slo_is_reported_in_the_unit_sent() -> None:
    """slo.ttft_ms = -5 was answered "slo.ttft_ms: ... got -0.005" (the value converted to seconds)."""
    with BackgroundServer(lambda: EchoIngress()) as s, grpc.insecure_channel(s.address) as ch:
        code, details, _ = raw_generate(ch, _req(slo=inference_pb2.SLO(ttft_ms=-5)))
    assert code is grpc.StatusCode.INVALID_ARGUMENT and details.startswith("slo.ttft_ms:") and details.endswith("-5.0")


def test_switch_role_to_an_unknown_enum_value_is_invalid_argument() -> None:
    """A role value this build does not know (a newer client's) was INTERNAL: naming it raised ValueError."""
    with (BackgroundServer(lambda: EchoIngress()) as s, grpc.insecure_channel(s.address) as ch,
          pytest.raises(grpc.RpcError) as e):
        admin_pb2_grpc.AdminStub(ch).SwitchRole(admin_pb2.SwitchRoleRequest(instance_id="echo-0", role=99), timeout=5)
    assert e.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.details().startswith("role:") and "99" in e.value.details()
    assert dict(e.value.trailing_metadata())["llmsched-field"] == "role"


# -- HTTP: `param` names the body's field --------------------------------------------------------------------------

def _post(ingress: Any, path: str, body: dict[str, Any]) -> tuple[int, Any]:
    async def run() -> tuple[int, Any]:
        transport = httpx.ASGITransport(app=build_app(ingress))
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            r = await c.post(path, json=body)
            return r.status_code, r.json().get("error", {}).get("param")

    return asyncio.run(run())


CHAT = {"messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize("path, body, param", [
    # The ingress' own names reached the client: prompt_token_ids, max_tokens for max_completion_tokens.
    ("/v1/completions", {"prompt": [1, VOCAB], "max_tokens": 2}, "prompt"),
    ("/v1/completions", {"prompt": [1] * (CONTEXT + 10), "max_tokens": 1}, "prompt"),
    ("/v1/chat/completions", {**CHAT, "max_completion_tokens": CONTEXT + 1}, "max_completion_tokens"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 2, "stop_token_ids": [VOCAB]}, "stop_token_ids"),
])
def test_http_names_the_body_field_for_ingress_errors(path: str, body: dict[str, Any], param: str) -> None:
    assert _post(_real_ingress(), path, body) == (400, param)


@pytest.mark.parametrize("field, value, param", [
    # Integers past the gRPC wire's types were taken (200): a length_hint of 10**400 overflowed float() in its
    # instance's snapshots (every later snapshot of that instance failed); vLLM's msgspec carries int64 at most.
    ("length_hint", 10**400, "length_hint"),
    ("length_hint", 2**63, "length_hint"),
    ("seed", 2**64, "seed"),
    ("seed", -(2**63) - 1, "seed"),
    ("priority", 2**31, "priority"),
    ("top_k", 2**31, "top_k"),
    ("stop_token_ids", [2**70], "stop_token_ids[0]"),
])
def test_http_integers_beyond_the_grpc_wire_types_are_400(field: str, value: Any, param: str) -> None:
    assert _post(EchoIngress(), "/v1/completions", {"prompt": "hi", "max_tokens": 2, field: value}) == (400, param)


def test_http_integers_at_the_grpc_wire_bounds_are_taken() -> None:
    body = {"prompt": "hi", "max_tokens": 2, "seed": -(2**63), "length_hint": 2**63 - 1, "priority": -(2**31),
            "top_k": 2**31 - 1}
    assert _post(EchoIngress(), "/v1/completions", body) == (200, None)


# ---- test-suite audit: validate.py's bounds and status maps, called directly (each names the mutant it kills) ----
def test_validate_generate_bounds_at_their_edges() -> None:
    """The edges of ``validate_generate``: a request id of exactly 256 characters passes, 257 do not (kills ``> 257``);
    a token id of ``2**31 - 1`` passes, ``2**31`` does not (kills ``<= INT32``); an infinite or NaN SLO is refused
    (kills dropping ``isfinite``: ``inf < 0`` and ``nan < 0`` are both false); text and token ids together are
    refused naming ``prompt`` (kills dropping that check; neither API can send both, a direct caller can)."""
    import math

    from scheduler.control.api import GenerateRequest, InvalidRequest
    from scheduler.engine.base import SamplingParams
    from scheduler.server.validate import (
        GRPC_FIELDS,
        HTTP_FIELDS,
        INT32,
        MAX_REQUEST_ID_CHARS,
        validate_generate,
    )

    def field_of(req: GenerateRequest, names: dict[str, str] = GRPC_FIELDS) -> str | None:
        try:
            validate_generate(req, names)
        except InvalidRequest as e:
            return e.field
        return None

    ok = GenerateRequest("r", prompt="hi", sampling=SamplingParams(max_tokens=4))
    assert field_of(ok) is None
    assert field_of(GenerateRequest("x" * MAX_REQUEST_ID_CHARS, prompt="hi")) is None
    assert field_of(GenerateRequest("x" * (MAX_REQUEST_ID_CHARS + 1), prompt="hi")) == "request_id"
    assert field_of(GenerateRequest("r", prompt_token_ids=(0, INT32 - 1))) is None
    assert field_of(GenerateRequest("r", prompt_token_ids=(0, INT32))) == "prompt.token_ids[1]"
    for bad in (math.inf, math.nan):
        assert field_of(GenerateRequest("r", prompt="hi", ttft_slo_s=bad)) == "slo.ttft_ms"
        assert field_of(GenerateRequest("r", prompt="hi", tpot_slo_s=bad), HTTP_FIELDS) == "tpot_slo_s"
    assert field_of(GenerateRequest("r", prompt="hi", prompt_token_ids=(1,))) == "prompt"


def test_request_status_maps() -> None:
    """Metrics/span status of a failed request and of a finished stream: overload is REJECTED (kills FAILED), an
    ``abort`` finish is CANCELLED and an ``error...`` finish FAILED (kills dropping either branch: FINISHED)."""
    from scheduler.control.api import InvalidRequest, NotFound, Overloaded
    from scheduler.control.api import Unavailable as Down
    from scheduler.server.validate import request_status_for, request_status_of_finish
    from scheduler.telemetry.metrics import RequestStatus as S

    got = [request_status_for(e) for e in (InvalidRequest("x"), NotFound("x"), Overloaded("x"), Down("x"),
                                           RuntimeError("x"))]
    assert got == [S.INVALID, S.NOT_FOUND, S.REJECTED, S.UNAVAILABLE, S.FAILED]
    assert [request_status_of_finish(r) for r in ("abort", "error: engine died", "stop", "length", None)] == [
        S.CANCELLED, S.FAILED, S.FINISHED, S.FINISHED, S.FINISHED]
