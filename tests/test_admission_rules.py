"""``policies.admission`` in the live Ingress, each rule answered in one place (no Ray: the real ``Ingress`` over the
fake instance handles of ``test_ingress_audit``, served over real loopback gRPC and HTTP).

- Rule 1 (no accepting instance runs a phase) is the policy's ``Deferred``: the router decides, and its refusal is
  UNAVAILABLE with a retry-after, not an admission refusal. The Ingress and the Simulator used to re-check it beside
  the policy, which answered a ``Rejected`` they then ignored.
- A prompt the policy finds can never fit (``TooLarge``: RESOURCE_EXHAUSTED / HTTP 413) is an admission refusal on
  every counter: the ingress's ``admission_rejected_p<N>``, ``llmsched_admission_rejected_total{reason="too_large"}``
  and ``llmsched_requests_total{status="rejected"}``. Prometheus used to count it as invalid input, the ingress as
  an admission refusal.
"""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import httpx
import pytest
from ray.exceptions import RayActorError

from scheduler._proto.llmsched.v1 import inference_pb2
from scheduler.control.api import GenerateRequest, IngressError
from scheduler.control.instance import Submitted
from scheduler.core.types import ClusterView, InstanceRole, InstanceSnapshot
from scheduler.engine.base import SamplingParams, TokenChunk
from scheduler.policy.admission import AdmissionPolicy
from scheduler.server.background import BackgroundServer
from tests.test_grpc_api import GENERATE
from tests.test_ingress_audit import FakeInstance, _ingress, _until
from tests.test_telemetry import recorder, sample

pytestmark = pytest.mark.timeout(60)

KV_TOKENS = 64 * 16  # the view's instance holds 1024 tokens


def _snap(iid: str, **kw: Any) -> InstanceSnapshot:
    return InstanceSnapshot(iid, InstanceRole.MIXED, kv_blocks_total=64, block_size=16, **kw)


def _generate(channel: grpc.Channel, rid: str, n_prompt: int) -> tuple[grpc.StatusCode, dict[str, str]]:
    call = channel.unary_stream(GENERATE, request_serializer=None,
                                response_deserializer=inference_pb2.GenerateChunk.FromString)
    payload = inference_pb2.GenerateRequest(
        request_id=rid, token_ids=inference_pb2.TokenIds(ids=list(range(1, n_prompt + 1))),
        sampling=inference_pb2.SamplingParams(max_tokens=4, ignore_eos=True)).SerializeToString()
    try:
        for _ in call(payload, timeout=10):
            pass
    except grpc.RpcError as e:
        return e.code(), dict(e.trailing_metadata() or ())
    return grpc.StatusCode.OK, {}


def test_a_prompt_that_fits_no_instance_is_one_admission_refusal_on_every_counter() -> None:
    rec = recorder()
    ing = _ingress([FakeInstance("i0")], admission=AdmissionPolicy(max_queued={0: 8}))
    ing._view = ClusterView(0.0, (_snap("i0"),))
    with BackgroundServer(lambda: ing, http=True, recorder=rec) as srv:
        channel = grpc.insecure_channel(srv.address)
        try:
            code, md = _generate(channel, "huge", KV_TOKENS + 1)
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "retry-after" not in md, (code, md)
            r = httpx.post(f"http://127.0.0.1:{srv.http_port}/v1/completions", timeout=10,
                           json={"prompt": list(range(1, KV_TOKENS + 2)), "max_tokens": 4})
            assert r.status_code == 413 and "retry-after" not in r.headers, (r.status_code, r.text)
            assert r.json()["error"]["param"] == "prompt", r.text
            # A chat's prompt is its messages (OpenAI's field): its refusal names them, not the completions' prompt.
            r = httpx.post(f"http://127.0.0.1:{srv.http_port}/v1/chat/completions", timeout=10,
                           json={"messages": [{"role": "user", "content": " ".join(["w"] * KV_TOKENS)}],
                                 "max_tokens": 4})
            assert r.status_code == 413 and "retry-after" not in r.headers, (r.status_code, r.text)
            assert r.json()["error"]["param"] == "messages", r.text
            assert _generate(channel, "fits", KV_TOKENS - 8) == (grpc.StatusCode.OK, {})  # the next one is served
        finally:
            channel.close()
    assert ing.admission_rejected == {0: 3}
    assert sample(rec, "llmsched_admission_rejected_total", priority="0", reason="too_large") == 3
    assert sum(sample(rec, "llmsched_requests_total", api=api, route="none", status="rejected")
               for api in ("grpc", "http")) == 3
    assert sample(rec, "llmsched_requests_total", api="grpc", route="none", status="invalid") == 0
    assert sample(rec, "llmsched_requests_total", api="http", route="none", status="invalid") == 0
    assert rec.in_flight == 0


@pytest.mark.parametrize("draining", [("i0", "i1"), ()])
def test_nothing_accepting_is_unavailable_not_an_admission_refusal(draining: tuple[str, ...]) -> None:
    """Every priority-0 request is over its queue bound (``max_queued`` 0). With no instance accepting, the policy
    defers (rule 1) and the request is UNAVAILABLE with a retry-after, as without admission; with instances
    accepting, the bound refuses it (RESOURCE_EXHAUSTED, counted as admission)."""
    rec = recorder()
    ing = _ingress([FakeInstance("i0"), FakeInstance("i1")], admission=AdmissionPolicy(max_queued={0: 0}))
    ing._view = ClusterView(0.0, tuple(_snap(i, draining=i in draining) for i in ("i0", "i1")))
    with BackgroundServer(lambda: ing, recorder=rec) as srv:
        channel = grpc.insecure_channel(srv.address)
        try:
            code, md = _generate(channel, "r", 16)
        finally:
            channel.close()
    if draining:
        assert code == grpc.StatusCode.UNAVAILABLE and float(md["retry-after"]) > 0, (code, md)
        assert ing.admission_rejected == {}
        assert sample(rec, "llmsched_admission_rejected_total", priority="0", reason="admission") == 0
    else:
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and float(md["retry-after"]) > 0, (code, md)
        assert ing.admission_rejected == {0: 1}
        assert sample(rec, "llmsched_admission_rejected_total", priority="0", reason="admission") == 1


# ---- the queues the policy reads, kept incrementally ---------------------------------------------------------------
class _Gated(FakeInstance):
    """No token before ``GATES[rid]`` opens; ``dead``: every call raises ``RayActorError`` (the actor is gone)."""

    def __init__(self, iid: str, gates: dict[str, asyncio.Event]) -> None:
        super().__init__(iid)
        self.gates, self.dead = gates, False

    async def _submit(self, req: Any, kv: Any = None, **kw: Any) -> Submitted:
        if self.dead:
            raise RayActorError()
        self.streams[req.request_id] = {"next": req.num_output_tokens_before, "left": req.sampling.max_tokens,
                                        "paused": False, "done": False, "ev": asyncio.Event()}
        return Submitted(chunks=())

    async def _poll(self, rid: str, timeout: float, from_index: int) -> TokenChunk | None:
        while not (self.gates[rid].is_set() or self.dead or self.streams.get(rid, {}).get("aborted")):
            await asyncio.sleep(0.005)
        if self.dead:
            raise RayActorError()
        return await super()._poll(rid, timeout, from_index)


def _scan(ing: Any) -> dict[int, int]:
    """The queues by definition (what ``queued_by_priority`` computed per admitted request before): every record
    with no token yet, per priority."""
    out: dict[int, int] = {}
    for r in ing.registry:
        if r.next_index == 0:
            out[r.priority] = out.get(r.priority, 0) + 1
    return out


def test_incremental_queue_counts_equal_a_full_scan_through_a_mixed_workload() -> None:
    """Requests of three priorities through every transition of "admitted, no token yet": first tokens, finishes,
    a client cancel and an admin cancel before the first token, a live migration, an instance death (its requests
    recovered elsewhere, queued ones still queued), admission refusals. At each step the counts the policy reads are the
    scan's; at the end both are empty."""
    gates: dict[str, asyncio.Event] = {}
    a, b = _Gated("i0", gates), _Gated("i1", gates)
    checks: list[dict[int, int]] = []

    async def scenario() -> None:
        ing = _ingress([a, b], admission=AdmissionPolicy(max_queued={0: 4, 1: 4, 2: 4}))
        ing._view = ClusterView(0.0, (_snap("i0"), _snap("i1")))

        def check() -> None:
            assert ing.queued_by_priority() == _scan(ing), (ing.queued_by_priority(), _scan(ing))
            checks.append(_scan(ing))

        async def run(rid: str, prio: int, n: int) -> str:
            gates.setdefault(rid, asyncio.Event())
            try:
                async for c in ing.generate(GenerateRequest(rid, prompt_token_ids=tuple(range(1, 17)), priority=prio,
                                                            sampling=SamplingParams(max_tokens=n))):
                    if c.finished:
                        return c.finish_reason or ""
            except IngressError as e:
                return type(e).__name__
            return "open"

        # r4 streams long enough to be migrated mid-stream below (10 ms a token)
        tasks = {f"r{k}": asyncio.create_task(run(f"r{k}", k % 3, 100 if k == 4 else 3 + k)) for k in range(12)}
        await _until(lambda: len(ing.registry) == 12 and a.streams.keys() | b.streams.keys() >= set(tasks))
        check()
        assert checks[-1] == {0: 4, 1: 4, 2: 4}
        assert await run("over", 0, 2) == "Overloaded"  # priority 0's queue is full: refused, never counted
        check()
        tasks["r0"].cancel()  # the client goes away before its first token
        assert await ing.cancel("r1")  # an admin cancel before the first token
        await _until(lambda: "r0" not in ing.registry and "r1" not in ing.registry)
        check()
        for rid in ("r2", "r3", "r4", "r5"):  # first tokens (r2 then finishes: 5 tokens)
            gates[rid].set()
        await _until(lambda: all(ing.registry.get(r) is None or ing.registry.get(r).next_index > 0
                                 for r in ("r2", "r3", "r4", "r5")))
        check()
        assert await tasks["r2"] == "length"
        check()
        src = ing.registry.get("r4").instances[0]  # a live migration (of a request with tokens) keeps its record
        assert (await ing.migrate("r4", "i1" if src == "i0" else "i0")).committed
        check()
        a.dead = True  # i0 dies: its requests, with tokens or without, are re-prefilled on i1
        ing._view = ClusterView(0.0, (_snap("i1"),))
        await _until(lambda: all(r.request_id in b.streams for r in ing.registry))
        check()
        assert checks[-1] == _scan(ing) and sum(checks[-1].values()) == 6  # r6..r11 still wait for a token
        for rid in tasks:
            gates[rid].set()
        ends = [await t for rid, t in tasks.items() if rid != "r0"]
        assert ends.count("length") == 10 and ends.count("abort") == 1, ends
        check()
        assert checks[-1] == {} and ing.queued_by_priority() == {}

    asyncio.run(scenario())
    assert len(checks) == 8
