"""``policies.admission`` in the live Ingress, on a real local Ray cluster (simulated backend) behind real loopback
gRPC and HTTP: a full priority-0 queue answers RESOURCE_EXHAUSTED (HTTP 429) with a retry-after while a protected
priority-1 request is admitted, and the request holding the queue loses nothing.

One MIXED instance; ``max_queued`` {0: 1, 1: 4}. The queue holder is a 3000-token prompt whose prefill, at
``time_scale`` 25, takes seconds: it has no first token (it is queued) while the others arrive.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import grpc
import httpx
import pytest

ray = pytest.importorskip("ray")

from scheduler._proto.llmsched.v1 import inference_pb2
from scheduler.config.models import ClusterConfig
from scheduler.control.cluster import deploy
from scheduler.engine.simulated_backend import sim_token
from scheduler.server.background import BackgroundServer
from tests.test_control_plane import GPUS, MODEL
from tests.test_telemetry import recorder, sample

pytestmark = [pytest.mark.timeout(300)]

GENERATE = "/llmsched.v1.Inference/Generate"
CONFIG = ClusterConfig.model_validate({
    "name": "adm", "gpus": GPUS, "model": MODEL,
    "pools": [{"name": "mixed", "role": "mixed", "gpu": "a100", "tp": 1, "count": 1}],
    "policies": {"admission": {"name": "bounded", "params": {"max_queued": {0: 1, 1: 4}, "retry_after_s": 2.0}}},
})
LONG = 3000  # prompt tokens of the queue holder: seconds of prefill at time_scale 25


@pytest.fixture(scope="module")
def served(local_ray: Any) -> Any:
    dep = deploy(CONFIG, name="adm", controller_name="llmsched-controller-adm",
                 backend_kwargs={"simulated": {"time_scale": 25.0}}, refresh_s=0.05)
    try:
        with BackgroundServer(lambda: dep.make_ingress(refresh_s=0.05), http=True, recorder=recorder()) as srv:
            yield srv
            srv.call(srv.ingress.close())
    finally:
        dep.shutdown()


def _request(rid: str, priority: int, n_prompt: int, max_tokens: int = 4) -> bytes:
    return inference_pb2.GenerateRequest(
        request_id=rid, token_ids=inference_pb2.TokenIds(ids=list(range(1, n_prompt + 1))), priority=priority,
        sampling=inference_pb2.SamplingParams(max_tokens=max_tokens, ignore_eos=True)).SerializeToString()


def _generate(channel: grpc.Channel, payload: bytes) -> tuple[grpc.StatusCode, dict[str, str], list[int]]:
    """Status, trailing metadata and the streamed token ids of one Generate call."""
    call = channel.unary_stream(GENERATE, request_serializer=None,
                                response_deserializer=inference_pb2.GenerateChunk.FromString)
    toks: list[int] = []
    try:
        for c in call(payload, timeout=120):
            toks.extend(c.token_ids)
    except grpc.RpcError as e:
        return e.code(), dict(e.trailing_metadata() or ()), toks
    return grpc.StatusCode.OK, {}, toks


def _queued(srv: Any) -> dict[int, int]:
    return srv.call(_async(srv.ingress.queued_by_priority))


async def _async(fn: Any) -> Any:
    return fn()


def test_full_low_priority_queue_rejects_with_retry_after_while_protected_is_admitted(served: Any) -> None:
    srv = served
    channel = grpc.insecure_channel(srv.address)
    holder: dict[str, Any] = {}
    t = threading.Thread(target=lambda: holder.update(out=_generate(channel, _request("hold", 0, LONG))))
    t.start()
    try:
        deadline = time.monotonic() + 30
        while _queued(srv).get(0, 0) < 1 and time.monotonic() < deadline:  # admitted, no first token yet
            time.sleep(0.02)
        assert _queued(srv) == {0: 1}
        # Priority 0's queue (1) is full: refused over gRPC and HTTP, each with a retry-after.
        code, md, toks = _generate(channel, _request("low", 0, 16))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and not toks, code
        assert float(md["retry-after"]) >= 2.0 and md.get("llmsched-field") == "priority", md
        r = httpx.post(f"http://127.0.0.1:{srv.http_port}/v1/completions", timeout=60,
                       json={"prompt": [1, 2, 3], "max_tokens": 2, "priority": 0})
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 2, (r.status_code, r.text)
        assert _queued(srv) == {0: 1}  # the holder still has no token: the refusals were its queue's
        # Priority 1 has its own queue: admitted, and served in full.
        code, _, toks = _generate(channel, _request("high", 1, 16))
        assert code == grpc.StatusCode.OK and toks == [sim_token(0, "high", i, MODEL["vocab_size"]) for i in range(4)]
    finally:
        t.join(120)
        channel.close()
    code, _, toks = holder["out"]  # nothing already accepted is lost
    assert code == grpc.StatusCode.OK and toks == [sim_token(0, "hold", i, MODEL["vocab_size"]) for i in range(4)]
    state = srv.call(srv.ingress.cluster_state())
    assert state.extra["admission_rejected_p0"] == 2 and "admission_rejected_p1" not in state.extra, state.extra
    assert sample(srv.recorder, "llmsched_admission_rejected_total", priority="0", reason="admission") == 2
    assert _queued(srv) == {}
