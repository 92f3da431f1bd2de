"""Regressions from an audit of the routers, the P/D pairing and their bookkeeping (route.py, pairing.py,
routers_smart.py and how the simulator and the live ingress drive them). Each test reproduces one confirmed bug."""

from __future__ import annotations

import dataclasses
from collections import Counter

import numpy as np
import pytest

from scheduler.config.models import ClusterConfig, EngineSpec, GPUSpec, ModelSpec, PoolSpec
from scheduler.core.types import ClusterView, InstanceRole, InstanceSnapshot, RequestInfo, RequestLoad
from scheduler.policy.route import RouteDecision, make_router
from scheduler.policy.routers_smart import LlumnixRouter
from sim.simulator import Simulator, Workload

M, P, D = InstanceRole.MIXED, InstanceRole.PREFILL, InstanceRole.DECODE
MODEL = ModelSpec(
    name="llama2-7b",
    num_layers=32,
    hidden_size=4096,
    num_heads=32,
    num_kv_heads=32,
    intermediate_size=11008,
    vocab_size=32000,
)
GPU = GPUSpec(name="a100", memory_gib=80, fp16_tflops=312, hbm_gbps=2039, price_per_hour=2.0)


def _config(*, mixed: int = 0, pd: tuple[int, int] | None = None, blocks: int = 400) -> ClusterConfig:
    eng = EngineSpec(block_size=16, max_num_batched_tokens=512, max_num_seqs=64, num_kv_blocks=blocks)
    pools = [PoolSpec(name="m", gpu="a100", count=mixed, engine=eng)] if mixed else []
    if pd:
        pools += [
            PoolSpec(name="p", role=P, gpu="a100", count=pd[0], engine=eng),
            PoolSpec(name="d", role=D, gpu="a100", count=pd[1], engine=eng),
        ]
    return ClusterConfig(gpus={"a100": GPU}, model=MODEL, pools=pools)


def _headroom(router: LlumnixRouter, iid: str, blocks: int = 400) -> float:
    """The priority headroom ``router`` puts on an idle ``iid`` for a normal-priority request."""
    return _headroom_on(router, InstanceSnapshot(iid, M, kv_blocks_total=blocks))


def _headroom_on(router: LlumnixRouter, inst: InstanceSnapshot) -> float:
    """The priority headroom ``router`` puts on ``inst`` for a normal-priority request."""
    probe = RequestInfo("probe", 0.0, 100, 10)
    untracked = dataclasses.replace(inst, instance_id="untracked", requests=())
    return router.score(probe, inst, phase="decode") - router.score(probe, untracked, phase="decode")


# ---- 1: the simulator told routers nothing of requests that ended without an engine's "finished" ------------------
@pytest.mark.parametrize("case", ["refused_at_admission", "refused_by_its_decoder", "one_token_pd"])
def test_simulator_tells_the_router_every_routed_request_that_ends(case: str) -> None:
    """A high-priority request the simulator routed but then refused (too big for its engine, or for its decoder's
    KV), or a one-token request on a P/D cluster (done at its prefill), never reached ``on_finished``: llumnix kept
    its priority headroom on that instance for the rest of the run. The live ingress tells the router at the end of
    every stream, refused or not."""
    r = LlumnixRouter()
    if case == "refused_at_admission":  # 64 blocks = 1024 tokens: a 2000-token prompt fits no engine
        cfg, w, on = (
            _config(mixed=2, blocks=64),
            Workload(np.zeros(1), np.array([2000]), np.array([10])),
            "m-0",
        )
    elif case == "refused_by_its_decoder":
        eng = EngineSpec(block_size=16, max_num_batched_tokens=512, max_num_seqs=64)
        cfg = ClusterConfig(
            gpus={"a100": GPU},
            model=MODEL,
            pools=[
                PoolSpec(name="p", role=P, gpu="a100", count=1, engine=eng),
                PoolSpec(
                    name="d", role=D, gpu="a100", count=1, engine=eng.model_copy(update={"num_kv_blocks": 64})
                ),
            ],
        )
        w, on = Workload(np.zeros(1), np.array([900]), np.array([400])), "d-0"
    else:
        cfg, w, on = _config(pd=(1, 1)), Workload(np.zeros(1), np.array([200]), np.array([1])), "d-0"
    w.priority = np.array([1])
    res = Simulator(cfg, router=r).run(w)
    assert res.rejected[0] == (case != "one_token_pd")
    assert _headroom(r, on) == 0.0


# ---- 2: power of two choices with exactly two candidates -------------------------------------------------------------
def test_power_of_two_breaks_ties_between_two_candidates_at_random() -> None:
    """With two candidates po2 compared them in view order, so every tie (two idle decoders, two idle instances)
    went to the first: 1000 of 1000 requests on an idle pair. Its docstring's "ties go to the first sample" holds
    only for a random sample; with three or more candidates ties were already spread."""
    r = make_router("power_of_two", seed=3)
    idle = ClusterView(
        0.0, (InstanceSnapshot("a", M, kv_blocks_total=100), InstanceSnapshot("b", M, kv_blocks_total=100))
    )
    picks = Counter(r.route(RequestInfo(f"r{k}", 0.0, 100, 10), idle).prefill_instance for k in range(1000))
    assert 400 < picks["a"] < 600
    pd = ClusterView(0.0, (InstanceSnapshot("p", P), InstanceSnapshot("d0", D), InstanceSnapshot("d1", D)))
    decoders = Counter(r.route(RequestInfo(f"r{k}", 0.0, 100, 10), pd).decode_instance for k in range(1000))
    assert 400 < decoders["d0"] < 600
    # still never the busier of the two, and the same picks under the same seed
    busy = ClusterView(0.0, (InstanceSnapshot("a", M, num_running=3), InstanceSnapshot("b", M)))
    assert {r.route(RequestInfo(f"r{k}", 0.0, 100, 10), busy).prefill_instance for k in range(50)} == {"b"}
    runs = [make_router("power_of_two", seed=3) for _ in range(2)]
    a, b = (
        [x.route(RequestInfo(f"r{k}", 0.0, 100, 10), idle).prefill_instance for k in range(50)] for x in runs
    )
    assert a == b


# ---- 3: the live ingress's optimistic load between two view refreshes ------------------------------------------------
@pytest.mark.parametrize("name", ["llumnix", "prefix_affinity", "lookahead"])
def test_a_burst_between_two_view_refreshes_spreads_live_as_in_the_simulator(name: str) -> None:
    """Requests routed since the ingress's last snapshot poll (every 25 ms) were added to the view as a waiting
    count only. Routers that read queued prompt tokens (llumnix's virtual usage, prefix_affinity's queue, lookahead's
    prefill span) did not see them: a burst of six 2000-token prompts all went to mixed-0 live, while the simulator,
    whose snapshots hold a routed prompt at once, alternates."""
    from scheduler.control.registry import RequestRecord
    from scheduler.engine.base import SamplingParams
    from tests.test_ingress_audit import FakeInstance, _ingress

    n, prompt, blocks = 6, 2000, 400
    sim = Simulator(_config(mixed=2, blocks=blocks), router=name).run(
        Workload(np.zeros(n), np.full(n, prompt), np.full(n, 50))
    )
    ing = _ingress([FakeInstance("mixed-0"), FakeInstance("mixed-1")])
    ing.router = make_router(name)
    ing.router.initialize(_config(mixed=2, blocks=blocks))
    ing._view = ClusterView(
        0.0, tuple(InstanceSnapshot(f"mixed-{k}", M, kv_blocks_total=blocks) for k in range(2))
    )
    live = [
        ing._route(
            RequestRecord(f"r{k}", tuple(range(1, prompt + 1)), SamplingParams(max_tokens=50))
        ).prefill_instance
        for k in range(n)
    ]
    assert [int(x[-1]) for x in live] == sim.instance.tolist() == [0, 1] * (n // 2)


# ---- 4: llumnix's priority headroom on a live (detailed) view --------------------------------------------------------
def test_llumnix_headroom_follows_a_pair_to_its_decoder_on_detailed_snapshots_too() -> None:
    """Live snapshots list their requests, and ``PriorityTracker.count`` took that list alone whenever it was not
    empty: while a high-priority request prefilled on p0 on its way to d0, p0 carried its headroom and d0 none, so a
    normal request was sent to p1 and decoded on d0 -- the simulator (no detail for llumnix) sends it to p0/d1."""
    r = LlumnixRouter()
    r.on_routed(RequestInfo("h", 0.0, 800, 100, priority=1), RouteDecision("p0", "d0"))

    def inst(iid: str, role: InstanceRole, listed: RequestLoad) -> InstanceSnapshot:
        prefill = role is P
        return InstanceSnapshot(
            iid,
            role,
            num_running=1,
            num_decoding=0 if prefill else 1,
            kv_blocks_used=50,
            kv_blocks_total=1000,
            prefill_tokens_pending=800 if prefill else 0,
            requests=(listed,),
        )

    live = ClusterView(
        0.0,
        (
            inst("p0", P, RequestLoad("h", 800, 0, priority=1, in_prefill=True)),
            inst("p1", P, RequestLoad("n1", 800, 0, in_prefill=True)),
            inst("d0", D, RequestLoad("n2", 900, 10)),
            inst("d1", D, RequestLoad("n3", 900, 10)),
        ),
    )
    sim = ClusterView(0.0, tuple(dataclasses.replace(s, requests=()) for s in live.instances))
    normal = RequestInfo("n", 0.0, 800, 100)
    assert r.route(normal, sim) == RouteDecision("p0", "d1", reason="llumnix")
    assert r.route(normal, live) == r.route(normal, sim)
    # Once h decodes on d0 it is counted once there, listed and remembered; a high-priority request only listed
    # (another ingress' or migrated there) counts too.
    d0 = inst("d0", D, RequestLoad("h", 900, 10, priority=1))
    other = inst("d1", D, RequestLoad("x", 900, 10, priority=1))
    assert _headroom_on(r, d0) == _headroom_on(r, other) == pytest.approx(r.headroom)


def test_ingress_replicas_draw_their_own_random_sequences() -> None:
    """Every ingress built its router at seed 0: N replicas of a `power_of_two` / `random` / `learned` deployment
    sampled the same instances in lockstep. Now an unseeded router is seeded from the ingress id; a seed in the
    config still wins (reproducible runs)."""
    from scheduler.config.load import load_config
    from scheduler.config.models import PolicySpec
    from scheduler.control.ingress import Ingress
    from scheduler.core.types import ClusterView, InstanceSnapshot, RequestInfo
    from scheduler.policy.route import router_takes

    view = ClusterView(0.0, tuple(InstanceSnapshot(f"m-{i}", InstanceRole.MIXED) for i in range(8)))

    def picks(ingress_id: str, **params: object) -> list[str]:
        cfg = load_config("default")
        cfg = cfg.model_copy(update={"policies": cfg.policies.model_copy(
            update={"router": PolicySpec(name="random", params=params)})})
        router = Ingress(cfg, controller=None, ingress_id=ingress_id, direct=False).router
        return [router.route(RequestInfo(str(k), 0.0, 10, 10), view).prefill_instance for k in range(32)]

    assert picks("ingress-a") != picks("ingress-b")
    assert picks("ingress-a") == picks("ingress-a")
    assert picks("ingress-a", seed=7) == picks("ingress-b", seed=7)
    assert router_takes("power_of_two", "seed") and not router_takes("least_outstanding", "seed")


def test_no_instance_for_a_phase_is_unavailable_not_overloaded() -> None:
    """A P/D cluster whose decoders are all gone answered RESOURCE_EXHAUSTED (Overloaded: "retry after 1 s"), as if
    a queue were full; nothing can serve the request there until a decoder returns: UNAVAILABLE. A busy cluster
    whose router refuses (shedding) stays Overloaded."""
    from scheduler.control.api import Overloaded, Unavailable
    from scheduler.control.registry import RequestRecord
    from scheduler.engine.base import SamplingParams
    from tests.test_ingress_audit import FakeInstance, _ingress

    rec = RequestRecord("r", (1, 2, 3), SamplingParams(max_tokens=8))
    ing = _ingress([FakeInstance("prefill-0", InstanceRole.PREFILL)])
    with pytest.raises(Unavailable, match="decode"):
        ing._route(rec)

    class Refuses:
        def route(self, request, view):  # type: ignore[no-untyped-def]
            from scheduler.core.types import Rejected

            return Rejected("shed: predicted wait too long", retry_after_s=2.0)

    ing = _ingress([FakeInstance("mixed-0")], router=Refuses())
    with pytest.raises(Overloaded):
        ing._route(rec)


def test_live_view_orders_instances_by_number_as_the_simulator() -> None:
    """The live view sorted ids as strings (mixed-10 before mixed-2) and the simulator by number; argmin routers
    break ties in view order, so the same tie went to different instances."""
    from scheduler.config.load import load_config
    from scheduler.control.ingress_view import _numbered
    from sim.commands import with_instances
    from sim.simulator import build_instances

    sim_order = [i.instance_id for i in build_instances(with_instances(load_config("default"), 12))]
    assert sorted(sim_order, key=_numbered) == sim_order
    assert sorted(["m-10", "m-2", "m-1"], key=_numbered) == ["m-1", "m-2", "m-10"]
