"""Regressions from an audit of the P/D pairing (``scheduler/policy/pairing.py``, lookahead's ``pair``) and of the
appliers of a ``RouteDecision`` (the simulator, the live ingress). Each test reproduces one confirmed defect, but
the vLLM one: it checks that the live path needed no change for the first."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest

from scheduler.config.models import ClusterConfig, EngineSpec, PoolSpec
from scheduler.control.api import GenerateRequest
from scheduler.control.instance import Instance
from scheduler.core.types import ClusterView, InstanceRole, InstanceSnapshot, Rejected, RequestInfo
from scheduler.engine.base import SamplingParams
from scheduler.policy.route import LeastOutstandingRouter, RouteDecision, make_router
from scheduler.telemetry.metrics import NullRecorder
from sim.simulator import Simulator, Workload
from tests.test_chaos import _Handle  # an Instance called as through a Ray actor handle
from tests.test_ingress_audit import FakeInstance, _consume, _ingress
from tests.test_routers_audit import GPU, MODEL

P, D = InstanceRole.PREFILL, InstanceRole.DECODE
PAIRING = ("power_of_two", "llumnix", "prefix_affinity", "mixing", "lookahead", "lookahead_shed", "learned")


def _snap(
    iid: str, role: InstanceRole, *, waiting: int = 0, pending: int = 0, used: int = 0, decoding: int = 0
) -> InstanceSnapshot:
    return InstanceSnapshot(
        iid,
        role,
        num_running=decoding,
        num_waiting=waiting,
        num_decoding=decoding,
        kv_blocks_used=used,
        kv_blocks_total=1000,
        block_size=16,
        prefill_tokens_pending=pending,
        decode_context_tokens=used * 16,
    )


def _req(prompt: int = 500) -> RequestInfo:
    return RequestInfo("r", 0.0, prompt, 64, predicted_output_tokens=64.0)


def _pd(prefill_pending: int) -> ClusterView:
    """One PREFILL instance with ``prefill_pending`` prompt tokens queued, a light and a KV-heavy DECODE one."""
    return ClusterView(
        0.0,
        (
            _snap("p0", P, waiting=max(prefill_pending // 2000, 1), pending=prefill_pending, used=100),
            _snap("d0", D, used=100, decoding=4),
            _snap("d1", D, used=800, decoding=30),
        ),
    )


# ---- 1: Splitwise borrowing was one-way ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", PAIRING)
def test_a_saturated_prefill_pool_borrows_a_light_decode_instance(name: str) -> None:
    """Every PREFILL instance overloaded (20k prompt tokens queued) and a DECODE instance nearly idle: the request
    prefilled behind the queue all the same (``decode_pool`` widened the decode side only). Splitwise (ISCA'24,
    section 4.2) moves a machine of the idle pool into the mixed pool: the light decoder runs it, colocated."""
    d = make_router(name).route(_req(), _pd(20_000))
    assert isinstance(d, RouteDecision)
    assert (d.prefill_instance, d.decode_instance) == ("d0", None), d
    assert "prefill pool saturated" in d.reason and "mixed-pool fallback" in d.reason


@pytest.mark.parametrize("name", PAIRING)
def test_a_prefill_pool_with_room_keeps_the_decode_instances_decoding(name: str) -> None:
    d = make_router(name).route(_req(), _pd(1_000))
    assert isinstance(d, RouteDecision)
    assert d.prefill_instance == "p0" and d.decode_instance in ("d0", "d1") and "prefill pool" not in d.reason


def test_the_prefill_fallback_offers_only_decode_instances_with_headroom() -> None:
    # Imported here: new with the fix, and the other tests of this file run on the code before it.
    from scheduler.policy.pairing import prefill_pool

    v = _pd(20_000)
    pool = prefill_pool(v, _req())
    assert [s.instance_id for s in pool.candidates] == [
        "p0",
        "d0",
    ] and pool.fallback == "prefill pool saturated"
    assert prefill_pool(v, _req(), saturation_tokens=None).fallback == ""  # off
    assert prefill_pool(v, _req(), saturation_tokens=30_000).fallback == ""  # the prefill pool has room
    # A decoder with a prompt queue of its own over the threshold is saturated too: nothing to add.
    busy = ClusterView(0.0, (v.instances[0], _snap("d0", D, waiting=5, pending=9000, used=100)))
    assert prefill_pool(busy, _req()) == prefill_pool(busy, _req(), saturation_tokens=None)
    # No prefill instance at all (the pool lost): a light decoder serves it rather than every request refused.
    only = ClusterView(0.0, v.instances[1:])
    d = make_router("llumnix").route(_req(), only)
    assert isinstance(d, RouteDecision) and (d.prefill_instance, d.decode_instance) == ("d0", None)
    assert "no prefill instance" in d.reason


def test_a_borrow_never_pushes_a_decoder_past_what_reroling_calls_idle() -> None:
    """The fallback is the transient fix, re-roling the durable one: ``RerolePolicy`` moves a decoder to PREFILL
    only while the decoders' mean virtual usage is at most its ``decode_low``. A borrow that took a decoder past it
    (light was 0.5) could hold that off for as long as the prefill pool stayed saturated."""
    from scheduler.policy.pairing import virtual_usage_with
    from scheduler.policy.scaling import RerolePolicy

    low = RerolePolicy().decode_low
    for used in range(0, 500, 20):  # the decoder's own KV, 0 .. 0.5 of it
        v = ClusterView(0.0, (_snap("p0", P, waiting=10, pending=20_000), _snap("d0", D, used=used)))
        d = make_router("llumnix").route(_req(1000), v)
        if isinstance(d, RouteDecision) and d.prefill_instance == "d0":
            assert virtual_usage_with(v.instances[1], 1000) < low, used


def _config() -> ClusterConfig:
    eng = EngineSpec(block_size=16, max_num_batched_tokens=512, max_num_seqs=64, num_kv_blocks=2000)
    return ClusterConfig(
        gpus={"a100": GPU},
        model=MODEL,
        pools=[
            PoolSpec(name="p", role=P, gpu="a100", count=1, engine=eng),
            PoolSpec(name="d", role=D, gpu="a100", count=2, engine=eng),
        ],
    )


@pytest.mark.parametrize("name", ["llumnix", "lookahead"])
def test_the_simulator_prefills_on_a_decode_instance_only_when_the_prefill_pool_is_saturated(
    name: str,
) -> None:
    """A burst of 16 2000-token prompts at once onto one PREFILL and two DECODE instances: the PREFILL queue passes
    8192 tokens after four, and from there the light decoders take prompts themselves (colocated: no decode
    partner, no KV hand-off) -- before, all 16 queued on the one PREFILL instance. Four spread over time never
    saturate it: every one prefills there and decodes on a decoder."""
    cfg = _config()
    n = 16
    burst = Workload(arrival_s=np.zeros(n), prompt_tokens=np.full(n, 2000), output_tokens=np.full(n, 16))
    res = Simulator(cfg, router=make_router(name)).run(burst)
    assert not res.rejected.any() and np.isfinite(res.finish_s).all()
    on = [res.instance_ids[k] for k in res.instance]
    borrowed = [i for i, iid in enumerate(on) if iid.startswith("d")]
    assert borrowed and on.count("p-0") >= 4, on
    assert all(res.decode_instance[i] == -1 for i in borrowed)  # kept there, no hand-off
    assert all(
        res.instance_ids[res.decode_instance[i]].startswith("d") for i, iid in enumerate(on) if iid == "p-0"
    )

    calm = Workload(
        arrival_s=np.arange(4) * 5.0, prompt_tokens=np.full(4, 2000), output_tokens=np.full(4, 16)
    )
    res = Simulator(cfg, router=make_router(name)).run(calm)
    assert [res.instance_ids[k] for k in res.instance] == ["p-0"] * 4
    assert all(res.instance_ids[k].startswith("d") for k in res.decode_instance)


# ---- the live ingress applies the fallback's decision: a DECODE instance runs the whole request ---------------------
def test_the_live_ingress_runs_a_borrowed_prompt_on_a_decode_instance(no_ray: None) -> None:
    """The live side: the router (the same pure policy) places the prompt on the light DECODE instance; the ingress
    submits it there whole (no max_tokens=1 prefill leg, no export), and a DECODE ``Instance`` with the simulated
    backend prefills and decodes it to the end. The saturated PREFILL instance sees nothing."""
    cfg = _config()
    pool = cfg.pools[1]

    async def scenario() -> tuple[list[Any], list[str]]:
        dec = Instance("d-0", pool, cfg.model, cfg.gpus[pool.gpu])
        await dec.start()
        try:
            pre = FakeInstance("p-0", P)
            ing = _ingress([pre, FakeInstance("d-0", D)], router=make_router("llumnix"))
            ing._members["d-0"] = type(ing._members["d-0"])(_Handle(dec), ing._members["d-0"].info)
            ing._view = ClusterView(
                0.0, (_snap("p-0", P, waiting=10, pending=20_000, used=100), _snap("d-0", D))
            )
            out: list[Any] = []
            req = GenerateRequest(
                "b", prompt_token_ids=tuple(range(1, 301)), sampling=SamplingParams(max_tokens=12)
            )
            await asyncio.wait_for(_consume(ing, req, out), 30)
            return out, pre.calls
        finally:
            await dec.shutdown()

    out, prefill_calls = asyncio.run(scenario())
    assert prefill_calls == []
    assert [c.index for c in out if c.token_ids] == list(range(12)) and out[-1].finish_reason == "length"


@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_a_vllm_decode_instance_runs_a_borrowed_prompt_whole() -> None:
    """The vLLM side of the fallback: a DECODE pool's engine, built as the Controller builds it (``kv_both``),
    prefills and decodes a prompt given to it whole, and keeps no prompt KV behind for a hand-off nobody asks for."""
    pytest.importorskip("vllm")
    from scheduler.config.load import load_config
    from scheduler.control.instance import make_vllm_backend
    from scheduler.engine.base import EngineRequest

    cfg = load_config("deploy/examples/cpu-pd.yaml")
    pool = next(p for p in cfg.pools if p.role is D)
    backend = make_vllm_backend(model=cfg.model, gpu=cfg.gpus[pool.gpu], pool=pool, role=pool.role)

    async def run() -> tuple[list[Any], bool]:
        await backend.start()
        try:
            req = EngineRequest(
                "borrowed", tuple(range(5, 69)), SamplingParams(max_tokens=8, ignore_eos=True)
            )
            chunks = [c async for c in backend.generate(req)]
            return chunks, await backend.drop_kv("borrowed")
        finally:
            await backend.shutdown()

    chunks, kept = asyncio.run(asyncio.wait_for(run(), 280))
    tokens = [t for c in chunks for t in c.token_ids]
    assert len(tokens) == 8 and chunks[-1].finished and chunks[-1].finish_reason == "length"
    assert kept is False


# ---- 3: the live ingress labelled a request "disaggregated" that it ran on one instance ---------------------------
class _Fixed(LeastOutstandingRouter):
    """Places every request as told: ``(prefill, decode)``."""

    name = "fixed"

    def __init__(self, prefill: str, decode: str | None) -> None:
        super().__init__()
        self.where = (prefill, decode)

    def route(self, request: RequestInfo, view: ClusterView) -> Any:
        return RouteDecision(*self.where)


class _Routes(NullRecorder):
    def __init__(self) -> None:
        self.routes: dict[str, str] = {}

    def on_route(self, request_id: str, *, route: str, instance_id: str = "") -> None:
        self.routes[request_id] = route


@pytest.mark.parametrize(
    ("decode", "max_tokens", "route"),
    [
        ("decode-0", 5, "disaggregated"),  # a hand-off
        ("decode-0", 1, "colocated"),  # one token: it ends with its prefill, never handed off
        ("prefill-0", 5, "colocated"),  # the Splitwise borrow: the PREFILL instance runs it whole
    ],
)
def test_the_route_label_names_the_path_the_ingress_takes(decode: str, max_tokens: int, route: str) -> None:
    """The ``route`` label of the request counters and the TTFT / TPOT / E2E histograms said "disaggregated"
    whenever the decision named a decoder, though the ingress runs a one-token request, and a PREFILL instance named
    twice (the borrow), on the prefill instance alone (``_hands_off``): colocated latencies in the P/D series."""

    async def scenario() -> dict[str, str]:
        rec = _Routes()
        pre, dec = FakeInstance("prefill-0", P), FakeInstance("decode-0", D)
        ing = _ingress([pre, dec], router=_Fixed("prefill-0", decode), recorder=rec)
        out: list[Any] = []
        req = GenerateRequest("x", prompt_token_ids=(1, 2, 3), sampling=SamplingParams(max_tokens=max_tokens))
        await asyncio.wait_for(_consume(ing, req, out), 10)
        assert [c.index for c in out if c.token_ids] == list(range(max_tokens))
        return rec.routes

    assert asyncio.run(scenario()) == {"x": route}


def test_a_p_d_cluster_without_prefill_instances_says_why_it_refuses() -> None:
    """No PREFILL instance left and every decoder too loaded to borrow: the refusal said "no healthy instance can
    run prefill", untrue since the fallback lets a healthy DECODE instance prefill -- they are all too loaded."""
    v = ClusterView(0.0, (_snap("d0", D, used=900, decoding=30), _snap("d1", D, used=800, decoding=30)))
    d = make_router("llumnix").route(_req(), v)
    assert isinstance(d, Rejected) and d.reason == (
        "no healthy prefill instance and no decode instance light enough to borrow"
    )
    d = make_router("llumnix", prefill_saturation_tokens=None).route(_req(), v)
    assert isinstance(d, Rejected) and d.reason == "no healthy prefill instance"
