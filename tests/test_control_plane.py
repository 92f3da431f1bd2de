"""Control plane on a real local Ray cluster (fake GPU nodes) with the simulated backend.

Two deployments share the module's Ray cluster:

* ``pd``: 1 PREFILL instance (h100, TP=2) + 2 DECODE instances (a100, TP=1): placement and the P->D handoff;
* ``mixed``: 2 MIXED instances (a100, TP=1): cancel, instance crash recovery, Controller restart.

Token ids of the simulated engine are a function of (seed, request id, index), so every test checks the exact
stream a client would see: indices 0..n-1, each once, the right token at each.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

ray = pytest.importorskip("ray")

from scheduler.config.models import ClusterConfig
from scheduler.control.api import GenerateRequest, InvalidRequest
from scheduler.control.cluster import Deployment, deploy
from scheduler.control.ingress import Ingress
from scheduler.control.placement import gpu_type_resource
from scheduler.engine.base import SamplingParams, TokenChunk
from scheduler.engine.simulated_backend import sim_token

MODEL = {
    "name": "llama-7b", "num_layers": 32, "hidden_size": 4096, "num_heads": 32, "num_kv_heads": 32,
    "intermediate_size": 11008, "vocab_size": 32000, "max_model_len": 4096,
}
GPUS = {
    "h100": {"name": "h100", "memory_gib": 80, "fp16_tflops": 989, "hbm_gbps": 3350},
    "a100": {"name": "a100", "memory_gib": 80, "fp16_tflops": 312, "hbm_gbps": 2039},
}
SIM = {"simulated": {"time_scale": 0.5}}


def _config(name: str, pools: list[dict[str, Any]]) -> ClusterConfig:
    return ClusterConfig.model_validate({"name": name, "gpus": GPUS, "model": MODEL, "pools": pools})


PD = _config("pd", [
    {"name": "prefill", "role": "prefill", "gpu": "h100", "tp": 2, "count": 1},
    {"name": "decode", "role": "decode", "gpu": "a100", "tp": 1, "count": 2},
])
MIXED = _config("mixed", [{"name": "mixed", "role": "mixed", "gpu": "a100", "tp": 1, "count": 2}])


def _deploy(cfg: ClusterConfig) -> Deployment:
    return deploy(cfg, name=cfg.name, controller_name=f"llmsched-controller-{cfg.name}", backend_kwargs=SIM,
                  refresh_s=0.05)


@pytest.fixture(scope="module")
def pd(local_ray: Any, aloop: Any) -> Any:
    dep = _deploy(PD)
    ing = dep.make_ingress()
    aloop.run(ing.start())
    yield dep, ing
    aloop.run(ing.close())
    dep.shutdown()


@pytest.fixture(scope="module")
def mixed(local_ray: Any, aloop: Any) -> Any:
    dep = _deploy(MIXED)
    ing = dep.make_ingress()
    aloop.run(ing.start())
    yield dep, ing
    aloop.run(ing.close())
    dep.shutdown()


def _req(rid: str, n_prompt: int = 64, max_tokens: int = 16) -> GenerateRequest:
    return GenerateRequest(rid, prompt_token_ids=tuple(range(1, n_prompt + 1)),
                           sampling=SamplingParams(max_tokens=max_tokens))


async def _collect(ing: Ingress, req: GenerateRequest, on_chunk: Any = None) -> list[TokenChunk]:
    out = []
    async for c in ing.generate(req):
        out.append(c)
        if on_chunk is not None:
            await on_chunk(c, out)
    return out


def _check_exact(chunks: list[TokenChunk], rid: str, n: int) -> None:
    """Indices 0..n-1 exactly once, in order, each the engine's deterministic token; one final chunk."""
    idx = [c.index + k for c in chunks for k in range(len(c.token_ids))]
    assert idx == list(range(n)), idx
    toks = [t for c in chunks for t in c.token_ids]
    assert toks == [sim_token(0, rid, i, MODEL["vocab_size"]) for i in range(n)]
    assert chunks[-1].finished and not any(c.finished for c in chunks[:-1])


def _node_resources() -> dict[str, dict[str, float]]:
    return {n["NodeID"]: n["Resources"] for n in ray.nodes() if n["Alive"]}


def test_placement_strict_pack_and_gpu_type_pinning(pd: Any) -> None:
    dep, _ = pd
    placement = ray.get(dep.controller.placement.remote())
    assert sorted(placement) == ["decode-0", "decode-1", "prefill-0"]
    nodes = _node_resources()
    prefill_nodes = placement["prefill-0"]
    assert len(prefill_nodes) == 2 and len(set(prefill_nodes)) == 1, "TP=2 group split across nodes"
    assert gpu_type_resource("h100") in nodes[prefill_nodes[0]]
    for iid in ("decode-0", "decode-1"):
        assert len(placement[iid]) == 1
        assert gpu_type_resource("a100") in nodes[placement[iid][0]]


def test_pd_split_streams_contiguous_and_decode_loads_prompt_kv(pd: Any, aloop: Any) -> None:
    _, ing = pd
    stats_before = {i: ray.get(m.handle.stats.remote()) for i, m in ing._members.items()}
    rid, n_prompt, n = "pd-1", 300, 24
    chunks = aloop.run(_collect(ing, _req(rid, n_prompt, n)))
    _check_exact(chunks, rid, n)
    assert chunks[-1].finish_reason == "length"
    assert ing.counters["handoffs"] >= 1
    after = {i: ray.get(m.handle.stats.remote()) for i, m in ing._members.items()}
    loaded = {i: after[i].prompt_tokens_loaded - stats_before[i].prompt_tokens_loaded for i in after}
    computed = {i: after[i].prompt_tokens_computed - stats_before[i].prompt_tokens_computed for i in after}
    assert computed["prefill-0"] == n_prompt
    # Exactly one decode instance took the request, with the prompt KV loaded rather than recomputed.
    dec = [i for i in ("decode-0", "decode-1") if loaded[i]]
    assert len(dec) == 1 and loaded[dec[0]] == n_prompt and computed[dec[0]] == 0
    # Server-side timings (llmsched run's TTFT split): the prefill side put out token 0, the decoder token 1 after.
    timings = {i: ray.get(m.handle.request_timings.remote()).get(rid) for i, m in ing._members.items()}
    (p_recv, p_first, *_), (d_recv, d_first, *_) = timings["prefill-0"], timings[dec[0]]
    assert p_recv <= p_first <= d_recv <= d_first


def test_pd_request_emits_stage_spans_and_instance_gauges(pd: Any, aloop: Any) -> None:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from prometheus_client import CollectorRegistry

    from scheduler.telemetry.metrics import NULL_RECORDER, Metrics, MetricsRecorder
    from scheduler.telemetry.tracing import Stage, Tracing

    _, ing = pd
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    ing.tracing, ing.recorder = Tracing(provider), MetricsRecorder(Metrics(CollectorRegistry()))
    try:
        chunks = aloop.run(_collect(ing, _req("pd-spans", 200, 8)))
        _check_exact(chunks, "pd-spans", 8)
        time.sleep(0.2)  # a view refresh sets the instance gauges
        spans = exporter.get_finished_spans()
        names = [sp.name for sp in spans if sp.attributes.get("llmsched.request_id") == "pd-spans"]
        for stage in (Stage.ROUTE, Stage.PREFILL, Stage.KV_TRANSFER, Stage.DECODE):
            assert stage.value in names, names
        exposed = {m.name for m in ing.recorder.registry.collect()}
        assert any("kv_usage" in n for n in exposed) and any("queue_depth" in n for n in exposed), exposed
    finally:
        ing.tracing, ing.recorder = Tracing.disabled(), NULL_RECORDER


def test_pd_admin_role_switch_over_grpc(pd: Any, aloop: Any) -> None:
    # The main job's re-roling step (scheduler.demo) against this cluster: SDK -> gRPC Admin.SwitchRole -> ingress
    # -> Controller; decode-1 serves a prefill as PREFILL, then is DECODE again (the roles other tests expect).
    from scheduler.demo import _role_switch_check
    from scheduler.server.grpc_server import build_server

    dep, ing = pd

    async def run() -> Any:
        srv = build_server(ing, port=0)
        await srv.start()
        try:
            return await _role_switch_check(f"127.0.0.1:{srv.port}", vocab=MODEL["vocab_size"])
        finally:
            await srv.stop()

    res = aloop.run(run(), timeout=90)
    assert res is not None and res["instance"] == "decode-1", res
    # (Not "identical": the simulated engine's tokens are a function of the request id; with vLLM they are not.)
    assert res["asked"] and res["served_prefill"] and res["complete"], res
    roles = {i: m.info.role.value for i, m in ray.get(dep.controller.members.remote()).items()}
    assert roles == {"prefill-0": "prefill", "decode-0": "decode", "decode-1": "decode"}


def test_bad_requests_name_the_field(mixed: Any, aloop: Any) -> None:
    _, ing = mixed
    cases = {
        "prompt": GenerateRequest("bad-1", prompt=""),
        "prompt_token_ids": GenerateRequest("bad-2", prompt_token_ids=(1, 2, 10**9)),
        "model": GenerateRequest("bad-3", prompt="hi", model="nope"),
        "max_tokens": GenerateRequest("bad-4", prompt="hi", sampling=SamplingParams(max_tokens=10**6)),
    }
    for field, req in cases.items():
        with pytest.raises(InvalidRequest) as ei:
            aloop.run(_collect(ing, req))
        assert ei.value.field == field, (field, ei.value)
    chunks = aloop.run(_collect(ing, GenerateRequest("ok-1", prompt="hello", sampling=SamplingParams(max_tokens=4))))
    _check_exact(chunks, "ok-1", 4)
    assert len(ing.registry) == 0


def test_the_configured_length_predictor_reaches_the_router_and_the_instance(mixed: Any, aloop: Any) -> None:
    """``policies.predictor`` on a live ingress: a request without a ``length_hint`` is routed with the predictor's
    guess from its text, and the instance serving it reports that guess (less what it generated) as predicted
    remaining work; a client's hint wins."""
    from scheduler.config.models import PolicySpec
    from scheduler.control.tokenizer import make_tokenizer
    from scheduler.policy.route import LeastOutstandingRouter
    from scheduler.predict import count_tokens, load_predictor

    dep, _ = mixed
    seen: dict[str, float | None] = {}

    class Recording(LeastOutstandingRouter):
        def route(self, request, view):  # type: ignore[no-untyped-def, override]
            seen[request.request_id] = request.predicted_output_tokens
            return super().route(request, view)

    cfg = MIXED.model_copy(update={"policies": MIXED.policies.model_copy(
        update={"predictor": PolicySpec(name="default")})})
    ing = Ingress(cfg, dep.controller, router=Recording(), tokenizer=make_tokenizer(cfg, dep.backend_kwargs))
    text = "Write a long, detailed essay on the history of parallel computing, with examples."
    reported: list[float] = []

    async def on_chunk(c: TokenChunk, out: list[TokenChunk]) -> None:
        if len(out) == 2:  # mid-stream: the instance holds it
            m = ing._members[ing.registry.get("pred-1").instances[-1]]
            reported.append((await m.handle.snapshot.remote()).predicted_remaining_tokens)

    req = GenerateRequest("pred-1", prompt=text, sampling=SamplingParams(max_tokens=200))
    chunks = aloop.run(_collect(ing, req, on_chunk))
    _check_exact(chunks, "pred-1", 200)
    # the text's length in the predictor's own units (count_tokens, as trained), not the serving tokenizer's;
    # capped at max_tokens (the engine stops there)
    guess = load_predictor("default").predict(text, prompt_tokens=count_tokens(text)).capped(200).point
    assert seen["pred-1"] == pytest.approx(guess)
    assert 0 < reported[0] <= guess and reported[0] == pytest.approx(guess, abs=20)  # a few tokens generated
    hinted = GenerateRequest("pred-2", prompt=text, sampling=SamplingParams(max_tokens=4), length_hint=3)
    _check_exact(aloop.run(_collect(ing, hinted)), "pred-2", 4)
    assert seen["pred-2"] == 3
    aloop.run(ing.close())


def test_cancel_stops_stream_and_frees_kv(mixed: Any, aloop: Any) -> None:
    _, ing = mixed
    rid = "cancel-1"

    async def on_chunk(c: TokenChunk, out: list[TokenChunk]) -> None:
        if len(out) == 3:
            assert await ing.cancel(rid)

    chunks = aloop.run(_collect(ing, _req(rid, 128, 3000), on_chunk))
    assert chunks[-1].finished and chunks[-1].finish_reason == "abort"
    n = sum(len(c.token_ids) for c in chunks)
    assert 3 <= n < 3000
    _check_indices_only(chunks, n)
    deadline = time.time() + 5
    while time.time() < deadline:
        stats = [ray.get(m.handle.stats.remote()) for m in ing._members.values()]
        if all(s.num_running == 0 and s.num_waiting == 0 and s.kv_blocks_used == 0 for s in stats):
            break
        time.sleep(0.05)
    else:
        pytest.fail(f"KV not freed after cancel: {stats}")


def _wait_view(ing: Ingress, n: int, timeout_s: float = 10.0) -> None:
    """Membership reaches an ingress within ``members_s``; wait for it after the cluster changed."""
    deadline = time.time() + timeout_s
    while len(ing.view().instances) != n:
        assert time.time() < deadline, f"ingress view has {[s.instance_id for s in ing.view().instances]}"
        time.sleep(0.05)


def _check_indices_only(chunks: list[TokenChunk], n: int) -> None:
    idx = [c.index + k for c in chunks for k in range(len(c.token_ids))]
    assert idx == list(range(n))


@pytest.mark.e2e
def test_instance_killed_mid_stream_resumes_elsewhere(mixed: Any, aloop: Any) -> None:
    dep, ing = mixed
    rid, n = "kill-1", 120
    killed: list[str] = []

    async def on_chunk(c: TokenChunk, out: list[TokenChunk]) -> None:
        if not killed and sum(len(x.token_ids) for x in out) >= 10:
            iid = ing.registry.get(rid).instances[0]
            killed.append(iid)
            ray.kill(ing._members[iid].handle, no_restart=True)

    chunks = aloop.run(_collect(ing, _req(rid, 200, n), on_chunk), timeout=60)
    _check_exact(chunks, rid, n)
    assert killed and ing.counters["recoveries"] >= 1
    # The Controller replaces the dead instance (new id) and the pool is back to two.
    deadline = time.time() + 20
    while time.time() < deadline:
        members = ray.get(dep.controller.members.remote())
        if len(members) == 2 and killed[0] not in members:
            break
        time.sleep(0.2)
    else:
        pytest.fail(f"dead instance not replaced: {sorted(members)}")


def test_streams_use_the_direct_channel_and_survive_a_dropped_reply(mixed: Any, aloop: Any) -> None:
    """The hot path runs on the instances' direct channels; a reply lost on a channel (the call ran, the
    connection broke) is retried over Ray, which resends what was lost: the stream stays exact, no recovery."""
    _, ing = mixed
    before = dict(ing.counters)
    chunks = aloop.run(_collect(ing, _req("direct-1", 64, 40)), timeout=60)
    _check_exact(chunks, "direct-1", 40)
    assert ing.counters["channel_calls"] > before["channel_calls"]
    assert ing.counters["channel_fallbacks"] == before["channel_fallbacks"]

    rid, n = "direct-drop", 120
    dropped: list[str] = []

    async def on_chunk(c: TokenChunk, out: list[TokenChunk]) -> None:
        if not dropped and sum(len(x.token_ids) for x in out) >= 10:
            iid = ing.registry.get(rid).instances[0]
            dropped.append(iid)
            await ing._members[iid].handle.inject_fault.remote("channel", "drop")

    chunks = aloop.run(_collect(ing, _req(rid, 64, n), on_chunk), timeout=60)
    _check_exact(chunks, rid, n)
    assert dropped and ing.counters["channel_fallbacks"] > before["channel_fallbacks"]
    assert ing.counters["recoveries"] == before["recoveries"]  # the instance was never taken for dead

    # The reply to a submit lost: the request runs on the instance already; the Ray retry adopts that stream.
    ing._channel_down.clear()  # the drop above benched that channel for a few seconds
    mid = ing.counters["channel_fallbacks"]
    for m in ing._members.values():
        ray.get(m.handle.inject_fault.remote("channel", "drop_submit"), timeout=10)
    try:
        chunks = aloop.run(_collect(ing, _req("direct-submit", 64, 30)), timeout=60)
    finally:
        for m in ing._members.values():  # disarm the instance the router did not pick
            ray.get(m.handle.inject_fault.remote("channel", "clear"), timeout=10)
    _check_exact(chunks, "direct-submit", 30)
    assert ing.counters["channel_fallbacks"] > mid
    assert ing.counters["recoveries"] == before["recoveries"]


@pytest.mark.e2e
def test_controller_restart_rebuilds_view_while_ingress_keeps_routing(mixed: Any, aloop: Any) -> None:
    dep, ing = mixed
    before = ray.get(dep.controller.members.remote())
    ray.kill(dep.controller, no_restart=False)
    # The ingress routes from its cached view: requests complete while the Controller is down or restarting.
    chunks = aloop.run(_collect(ing, _req("during-restart", 64, 8)))
    _check_exact(chunks, "during-restart", 8)
    deadline = time.time() + 30
    info: dict[str, Any] = {}
    while time.time() < deadline:
        try:
            info = ray.get(dep.controller.ping.remote(), timeout=2)
            if info["restarted"] and info["instances"] == len(before):
                break
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            pass
        time.sleep(0.2)
    else:
        pytest.fail(f"controller did not come back with its instances: {info}")
    after = ray.get(dep.controller.members.remote())
    assert sorted(after) == sorted(before), "instances were recreated instead of adopted"
    assert {i: m.info.incarnation for i, m in after.items()} == {i: m.info.incarnation for i, m in before.items()}
    chunks = aloop.run(_collect(ing, _req("after-restart", 64, 8)))
    _check_exact(chunks, "after-restart", 8)


def test_migrate_moves_stream_with_kv(mixed: Any, aloop: Any) -> None:
    _, ing = mixed
    rid, n = "mig-1", 80
    results: list[Any] = []
    _wait_view(ing, 2)

    async def on_chunk(c: TokenChunk, out: list[TokenChunk]) -> None:
        if not results and sum(len(x.token_ids) for x in out) >= 10:
            # An admin call runs beside the stream (as the gRPC Admin service does), not inside its consumer.
            results.append(asyncio.ensure_future(ing.migrate(rid)))

    before = {i: ray.get(m.handle.stats.remote()).prompt_tokens_loaded for i, m in ing._members.items()}
    chunks = aloop.run(_collect(ing, _req(rid, 256, n), on_chunk))
    _check_exact(chunks, rid, n)
    res = aloop.run(asyncio.wait_for(results[0], 10))
    assert res.committed and res.destination != res.source, res
    loaded = ray.get(ing._members[res.destination].handle.stats.remote()).prompt_tokens_loaded
    assert loaded - before[res.destination] >= 256  # the prompt KV came along: not recomputed


@pytest.mark.e2e
def test_drain_moves_requests_and_releases_instance(mixed: Any, aloop: Any) -> None:
    dep, ing = mixed
    rid, n = "drain-1", 80
    drained: list[Any] = []
    _wait_view(ing, 2)

    async def on_chunk(c: TokenChunk, out: list[TokenChunk]) -> None:
        if not drained and sum(len(x.token_ids) for x in out) >= 5:
            iid = ing.registry.get(rid).instances[0]
            drained.append((iid, asyncio.ensure_future(ing.drain(iid))))

    chunks = aloop.run(_collect(ing, _req(rid, 128, n), on_chunk))
    _check_exact(chunks, rid, n)
    iid, task = drained[0]
    moved = aloop.run(asyncio.wait_for(task, 20))
    assert moved == 1
    assert iid not in ray.get(dep.controller.members.remote())
    assert aloop.run(ing.scale("mixed", 2)) == 2  # the target size after the call
    assert len(ray.get(dep.controller.members.remote())) == 2
