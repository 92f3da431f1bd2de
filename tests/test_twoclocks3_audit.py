"""Regressions from a third audit of "one scheduling core, two clocks" (the pattern of ``test_twoclocks2_audit``: one
tiny setup run live -- ``Instance`` objects or backends on the simulated backend, an ``Ingress`` over fake actor
handles; no Ray -- and in the simulator). Each test failed before its fix."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest

from bench.loadgen import cluster_config
from scheduler.core.types import ClusterView, InstanceRole, RequestInfo
from scheduler.engine.base import EngineRequest, SamplingParams
from scheduler.engine.simulated_backend import SimulatedBackend
from scheduler.latency import kv_transfer_time
from scheduler.policy.migration import MigrationPlan, MigrationReason
from scheduler.policy.route import RouteDecision, Router, make_router
from sim.cluster import build_instances
from sim.simulator import Simulator, Workload

pytestmark = pytest.mark.usefixtures("no_ray")  # tests/conftest.py: Instance objects here, no Ray node

# Two NIC types: the H100's 400 Gb/s (50 GB/s) and the A100's 200 Gb/s, with different latencies.
NET = {"h100": (50.0, 5e-6), "a100": (25.0, 20e-6)}


def _networked(cfg: Any, net: dict[str, tuple[float, float]] = NET) -> Any:
    gpus = {
        k: g.model_copy(update={"network_gbps": net[k][0], "network_latency_s": net[k][1]})
        for k, g in cfg.gpus.items()
    }
    return cfg.model_copy(update={"gpus": gpus})


def _link_time(cfg: Any, tokens: int, a: str, b: str) -> float:
    """What a KV transfer between GPU types ``a`` and ``b`` takes: over the slower NIC, with the larger latency."""
    (ga, la), (gb, lb) = NET[a], NET[b]
    return kv_transfer_time(tokens, cfg.model, bandwidth_gbps=min(ga, gb), latency_s=max(la, lb))


def _two_gpu_types(cfg: Any) -> Any:
    """One MIXED instance per GPU type, ``h100-0`` and ``a100-0``; migrations blocking (one copy of the whole
    context at the stop, whose size the test reads off)."""
    pool = cfg.pools[0]
    pools = [pool.model_copy(update={"name": g, "gpu": g, "count": 1}) for g in ("h100", "a100")]
    mig = {"name": "llumnix", "params": {"protocol": {"mode": "blocking"}}}
    return cfg.model_validate(
        {
            **cfg.model_dump(),
            "pools": [p.model_dump() for p in pools],
            "policies": {**cfg.policies.model_dump(), "migration": mig},
        }
    )


# ---- 1: a KV transfer between GPU types runs over the slower end's link --------------------------------------------
def test_a_pd_handoff_from_an_h100_to_an_a100_runs_at_the_a100s_link() -> None:
    """The P/D tier of ``cluster_config`` prefills on H100 and decodes on A100. The simulator timed the handoff over
    the source's (the H100's) 50 GB/s NIC: half what the A100's 25 GB/s NIC on the receiving end lets through."""
    cfg = _networked(cluster_config("twoclocks", mixed=0, prefill=1, decode=1))
    prompt = 1000
    w = Workload(arrival_s=np.array([0.0]), prompt_tokens=np.array([prompt]), output_tokens=np.array([8]))
    res = Simulator(cfg).run(w)
    assert res.kv_transfers == 1
    assert res.kv_transfer_s == pytest.approx(_link_time(cfg, prompt, "h100", "a100"))


class _To(Router):
    """Every request to ``iid``, colocated."""

    name = "to"

    def __init__(self, iid: str) -> None:
        self.iid = iid

    def route(self, request: Any, view: Any) -> Any:
        return RouteDecision(self.iid)


class _MoveOnce:
    """A migration policy that moves request 0 from ``src`` to ``dst`` once it decodes there."""

    def __init__(self, src: str, dst: str) -> None:
        self.src, self.dst, self.done = src, dst, False

    def plan(self, view: ClusterView, now: float) -> list[MigrationPlan]:
        if self.done or not view.by_id(self.src).num_decoding:
            return []
        self.done = True
        return [MigrationPlan("0", self.src, self.dst, MigrationReason.LOAD_BALANCE)]


def _simulated_copies(cfg: Any, src: str, dst: str) -> list[tuple[int, float]]:
    """The simulator's migration of one request from ``src`` to ``dst``: (tokens, seconds) of its final copy."""
    w = Workload(arrival_s=np.array([0.0]), prompt_tokens=np.array([1000]), output_tokens=np.array([400]))
    sim = Simulator(cfg, router=_To(src), migration=_MoveOnce(src, dst), migration_interval_s=0.05)
    copied: dict[int, int] = {}
    out: list[tuple[int, float]] = []
    real_run = sim.run

    def run(workload: Workload) -> Any:
        drv_cls = __import__("sim.migration", fromlist=["MigrationDriver"]).MigrationDriver
        on_final, on_commit = drv_cls.on_final, drv_cls.on_commit

        def final(self: Any, rid: int, now: float) -> None:
            copied[rid] = self.in_flight[rid].copied
            on_final(self, rid, now)

        def commit(self: Any, payload: tuple, now: float) -> None:
            rid, seq = payload
            out.append((seq.num_tokens - copied[rid], self.downtime_s[-1]))
            on_commit(self, payload, now)

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(drv_cls, "on_final", final)
            mp.setattr(drv_cls, "on_commit", commit)
            return real_run(workload)

    run(w)
    assert len(out) == 1 and out[0][0] > 0
    return out


def _live_copy(cfg: Any, src: str, dst: str, tokens: int) -> float:
    """A live destination on the simulated backend staging ``tokens`` of KV exported by a source of type ``src``:
    the seconds it sleeps for the copy (time_scale 1)."""
    model = cfg.model

    async def run() -> float:
        S = SimulatedBackend(model, cfg.gpus[src], role=InstanceRole.PREFILL)
        D = SimulatedBackend(model, cfg.gpus[dst])
        await S.start()
        await D.start()
        try:
            req = EngineRequest("r", tuple(range(1, tokens + 1)), SamplingParams(max_tokens=1))
            async for _ in S.generate(req):
                pass
            kv = await S.export_kv("r")
            assert kv.end_token - kv.start_token == tokens
            assert await D.reserve_kv("r", tokens + 16) is None
            slept: list[float] = []
            real = asyncio.sleep

            async def sleep(d: float, *a: Any) -> None:
                slept.append(d)
                await real(0)

            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(asyncio, "sleep", sleep)
                await D.stage_kv("r", kv)
            return sum(slept)
        finally:
            await S.shutdown()
            await D.shutdown()

    return asyncio.run(run())


@pytest.mark.parametrize(("src", "dst"), [("h100", "a100"), ("a100", "h100")])
def test_a_migration_between_gpu_types_copies_over_the_slower_link_in_both_clocks(src: str, dst: str) -> None:
    """A migration's copies: the simulator timed them over the source's NIC (H100 -> A100 at 50 GB/s), the live
    simulated backend over the destination's (A100 -> H100 at 50 GB/s): each clock wrong in one direction, and
    the two apart in both. Both run over the slower end's now."""
    cfg = _networked(_two_gpu_types(cluster_config("twoclocks", mixed=1)))
    [(tokens, simulated)] = _simulated_copies(cfg, f"{src}-0", f"{dst}-0")
    want = _link_time(cfg, tokens, src, dst)
    assert simulated == pytest.approx(want)
    assert _live_copy(cfg, src, dst, tokens) == pytest.approx(want)


def test_lookahead_prices_the_transfer_to_each_decoder_over_its_link_and_pairs_exactly() -> None:
    """Lookahead charged every pair the prefill GPU's link: an H100 prefill paired with a decoder behind a slow NIC
    (here 1 GB/s: 0.5 s for a 1000-token prompt of llama-7b) at the H100's 50 GB/s, and the slow decoder drew the
    request for a slightly lighter batch. Now each pair pays its own link, and the pick is the cheapest pair."""
    net = {"h100": (50.0, 5e-6), "a100": (1.0, 20e-6)}
    cfg = _networked(cluster_config("twoclocks", mixed=0, prefill=1, decode=1, router="lookahead"), net)
    pools = [*cfg.pools, cfg.pools[1].model_copy(update={"name": "hdecode", "gpu": "h100"})]
    cfg = cfg.model_copy(update={"pools": pools})
    insts = build_instances(cfg)
    by_id = {x.instance_id: x for x in insts}
    for k in range(6):  # the H100 decoder decodes a batch: costlier for a newcomer than the idle A100 one
        by_id["hdecode-0"].engine.add_request(f"h{k}", 2000, 3000, predicted_remaining=500)
    for _ in range(3):
        by_id["hdecode-0"].engine.step()
    view = ClusterView(0.0, tuple(x.fresh_snapshot(0.0, detail=False) for x in insts))
    router = make_router("lookahead")
    router.initialize(cfg)
    req = RequestInfo("n", 0.0, 1000, 4000, predicted_output_tokens=64.0)
    p, slow, fast = (view.by_id(i) for i in ("prefill-0", "decode-0", "hdecode-0"))
    extra = router.estimate(req, p, slow).ttft_s - router.estimate(req, p, fast).ttft_s

    def xfer(a: str, b: str) -> float:
        (ga, la), (gb, lb) = net[a], net[b]
        return kv_transfer_time(1000, cfg.model, bandwidth_gbps=min(ga, gb), latency_s=max(la, lb))

    assert extra == pytest.approx(xfer("h100", "a100") - xfer("h100", "h100"))
    best = min((router.estimate(req, p, d).total_s, d.instance_id) for d in (slow, fast))
    assert best[1] == "hdecode-0"
    assert router.route(req, view).decode_instance == best[1]


# ---- 3: a migration to a given destination (the Controller's plans) is counted there from its commit ----------------
def _landing(s: Any) -> tuple[int, int, int, int | None]:
    return s.num_waiting, s.num_incoming, s.prefill_tokens_pending, s.prefill_compute_tokens


def _simulated_commit(cfg: Any, prompt: int) -> tuple[int, int, tuple[int, int, int, int | None]]:
    """The simulator migrating one request from mixed-0 to mixed-1: (prompt, outputs at the stop, what mixed-1's
    entry in the routers' view reads right after the commit)."""
    w = Workload(arrival_s=np.array([0.0]), prompt_tokens=np.array([prompt]), output_tokens=np.array([400]))
    sim = Simulator(
        cfg, router=_To("mixed-0"), migration=_MoveOnce("mixed-0", "mixed-1"), migration_interval_s=0.3
    )
    out: list[Any] = []
    from sim.migration import MigrationDriver

    on_commit = MigrationDriver.on_commit

    def commit(self: Any, payload: tuple, now: float) -> None:
        on_commit(self, payload, now)
        out.append((payload[1].num_tokens, _landing(sim._view_at(now).by_id("mixed-1"))))

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(MigrationDriver, "on_commit", commit)
        sim.run(w)
    [(context, seen)] = out
    return prompt, context - prompt, seen


def test_a_migration_to_a_given_destination_is_counted_there_from_its_commit_in_both_clocks() -> None:
    """At the commit the simulator queues the request on its destination with its context (``on_commit``: waiting,
    all but one token loaded), and a request routed next sees it there. The live ingress booked nothing on a
    destination it was given (the Controller's plans, an admin's ``migrate(rid, dst)``): until the next refresh,
    the destination read idle."""
    from scheduler.control.registry import Phase, RequestRecord
    from tests.test_ingress_audit import FakeInstance, _ingress

    cfg = cluster_config("twoclocks", mixed=2)
    prompt, outputs, simulated = _simulated_commit(cfg, 1000)

    async def live() -> tuple[int, int, int, int | None]:
        S, D = FakeInstance("mixed-0"), FakeInstance("mixed-1")
        ing = _ingress([S, D])
        ing._view = ClusterView(0.0, tuple(x.fresh_snapshot(0.0, detail=False) for x in build_instances(cfg)))
        ing._snapshots = {s.instance_id: s for s in ing._view.instances}
        rec = RequestRecord(
            "r",
            tuple(range(1, prompt + 1)),
            SamplingParams(max_tokens=400),
            instances=("mixed-0",),
            output_token_ids=[7] * outputs,
            phase=Phase.DECODE,
        )
        ing.registry.add(rec)
        S.streams["r"] = {
            "next": outputs,
            "left": 400 - outputs,
            "paused": False,
            "done": False,
            "ev": asyncio.Event(),
        }
        seen: list[Any] = []
        switch = ing._switch

        def on_commit(r: Any, destination: str, *a: Any) -> None:
            switch(r, destination, *a)
            seen.append(_landing(ing.view().by_id("mixed-1")))

        ing._switch = on_commit  # type: ignore[method-assign]
        res = await ing.migrate("r", "mixed-1")
        assert res.committed
        return seen[0]

    assert simulated[:3] == (1, 0, prompt + outputs)
    assert asyncio.run(live()) == simulated


# ---- 2: a PREFILL instance named alone hands off after the prefill ----------------------------------------------------
class _PrefillAlone(Router):
    """Names the PREFILL instance alone for a new request; an accepted one (its decode, after the prefill) goes
    where ``least_outstanding`` pairs it."""

    name = "prefill_alone"

    def __init__(self) -> None:
        self.base = make_router("least_outstanding")
        self.asked: list[bool] = []

    def route(self, request: Any, view: Any) -> Any:
        self.asked.append(request.accepted)
        return self.base.route(request, view) if request.accepted else RouteDecision("prefill-0")


def test_a_prefill_instance_named_alone_hands_off_after_the_prefill_in_both_clocks() -> None:
    """A router answer naming a PREFILL instance and no decoder: the simulator prefills there, hands the KV off and
    decodes where the router says after the prefill (``Simulator._handoff``); the live ingress ran the whole
    request on the PREFILL instance (``_hands_off``: no decode instance, no handoff), and both engines decode
    there in full whatever their role (the simulated backend by ``max_tokens``, vLLM's ``kv_producer`` only keeps
    the prompt KV) -- a PREFILL pool decoding beside its prefills, which P/D exists to avoid."""
    from scheduler.control.api import GenerateRequest
    from scheduler.core.types import InstanceRole
    from tests.test_ingress_audit import FakeInstance, _consume, _ingress

    cfg = cluster_config("twoclocks", mixed=0, prefill=1, decode=1)
    prompt, output = 64, 12
    w = Workload(
        arrival_s=np.array([0.0]), prompt_tokens=np.array([prompt]), output_tokens=np.array([output])
    )
    sim_router = _PrefillAlone()
    res = Simulator(cfg, router=sim_router).run(w)
    assert res.instance_ids[res.instance[0]] == "prefill-0"
    assert res.instance_ids[res.decode_instance[0]] == "decode-0" and res.kv_transfers == 1
    assert sim_router.asked == [False, True]

    async def live() -> tuple[list[str], list[str], list[int], list[bool], list[str]]:
        P, D = FakeInstance("prefill-0", InstanceRole.PREFILL), FakeInstance("decode-0", InstanceRole.DECODE)
        router = _PrefillAlone()
        ing = _ingress([P, D], router=router)
        filed: list[str] = []
        ing.recorder.on_route = lambda rid, *, route, instance_id="": filed.append(route)  # type: ignore[method-assign]
        req = GenerateRequest(
            "a", prompt_token_ids=list(range(1, prompt + 1)), sampling=SamplingParams(max_tokens=output)
        )
        out: list[Any] = []
        await _consume(ing, req, out)
        indices = [i for c in out for i in range(c.index, c.index + len(c.token_ids))]
        return P.calls, D.calls, indices, router.asked, filed

    p_calls, d_calls, indices, asked, filed = asyncio.run(live())
    assert (p_calls.count("submit"), d_calls.count("submit")) == (1, 1)
    assert indices == list(range(output))
    assert asked == sim_router.asked
    assert filed == ["disaggregated"]


# ---- 4: lookahead's transfer term on a profiled cluster --------------------------------------------------------------
def test_lookahead_charges_a_pd_pair_the_measured_handoff_as_the_simulator_does() -> None:
    """With a live profile's measured handoff (``LatencyModel.handoff_time``: 12-23 ms on the vLLM CPU build,
    whatever the prompt -- Ray and IPC hops, not bytes) the simulator charges a P->D request that; lookahead priced
    its TTFT with the link model all the same (here 10.5 ms for 500 tokens of llama-7b over 25 GB/s, against 20.5 ms
    measured): its P/D pairs looked cheaper against colocation than the clocks run them."""
    import dataclasses

    from scheduler.latency import latency_factory
    from scheduler.policy.routers_lookahead import LookaheadRouter

    cfg = cluster_config("twoclocks", mixed=0, prefill=1, decode=1)
    timed = latency_factory(cfg)
    lat = {p.name + "-0": timed(cfg.model, cfg.gpus[p.gpu], p.tp) for p in cfg.pools}
    profiled = dataclasses.replace(lat["prefill-0"], handoff_s=0.02, handoff_s_per_token=1e-6)
    view = ClusterView(0.0, tuple(x.fresh_snapshot(0.0, detail=False) for x in build_instances(cfg)))
    p, d = view.by_id("prefill-0"), view.by_id("decode-0")
    req = RequestInfo("n", 0.0, 500, 4000, predicted_output_tokens=64.0)
    plain = LookaheadRouter(latency=lat).estimate(req, p, d).ttft_s
    measured = LookaheadRouter(latency={**lat, "prefill-0": profiled}).estimate(req, p, d).ttft_s
    gp, gd = cfg.gpus["h100"], cfg.gpus["a100"]
    bw, latency = min(gp.network_gbps, gd.network_gbps), max(gp.network_latency_s, gd.network_latency_s)
    link = kv_transfer_time(500, cfg.model, bandwidth_gbps=bw, latency_s=latency)
    assert measured - plain == pytest.approx(profiled.handoff_time(500) - link)


# ---- 5: the live simulated backend's P->D handoff takes the link's time ---------------------------------------------
def test_a_live_pd_decode_leg_is_admitted_when_its_kv_has_crossed_the_link_as_simulated() -> None:
    """The simulator queues a P->D decode leg on its decoder when the KV lands (``kv_transfer_s`` after the prefill;
    21 ms for 1000 llama-7b tokens at the A100's 25 GB/s). The live simulated backend admitted a decode leg the
    moment its KV object arrived (the Ray hop: no modelled transfer at all): the decoder started on it a whole
    link time early, at any ``time_scale``."""
    import time

    cfg = _networked(cluster_config("twoclocks", mixed=0, prefill=1, decode=1))
    prompt = 1000
    w = Workload(arrival_s=np.array([0.0]), prompt_tokens=np.array([prompt]), output_tokens=np.array([8]))
    simulated = Simulator(cfg).run(w).kv_transfer_s

    async def live() -> tuple[bool, float]:
        P = SimulatedBackend(cfg.model, cfg.gpus["h100"], role=InstanceRole.PREFILL)
        D = SimulatedBackend(cfg.model, cfg.gpus["a100"])
        await P.start()
        await D.start()
        try:
            ids = tuple(range(1, prompt + 1))
            out = [c async for c in P.generate(EngineRequest("r", ids, SamplingParams(max_tokens=1)))]
            kv = await P.export_kv("r")
            leg = EngineRequest(
                "r",
                (*ids, *out[-1].token_ids),
                SamplingParams(max_tokens=7),
                num_output_tokens_before=1,
                kv=(kv,),
            )
            t0 = time.perf_counter()
            stream = D.generate(leg)
            queued_at_once = D.engine.get("r") is not None
            await stream.__anext__()
            elapsed = time.perf_counter() - t0
            await stream.aclose()
            return queued_at_once, elapsed
        finally:
            await P.shutdown()
            await D.shutdown()

    queued_at_once, elapsed = asyncio.run(live())
    assert not queued_at_once
    assert simulated == pytest.approx(_link_time(cfg, prompt, "h100", "a100"))
    assert elapsed >= simulated
