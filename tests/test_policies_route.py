"""Smart routers over hand-built ClusterViews: each test is a case where the policy's idea must show."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from scheduler.config.load import load_config
from scheduler.config.models import ClusterConfig, GPUSpec, ModelSpec, PoolSpec
from scheduler.core.types import (
    SLO,
    ClusterView,
    InstanceRole,
    InstanceSnapshot,
    Rejected,
    RequestInfo,
    RequestLoad,
)
from scheduler.policy.pairing import decode_pool
from scheduler.policy.route import LeastOutstandingRouter, RouteDecision, make_router
from scheduler.policy.routers_learned import (
    ARTIFACT,
    DEFAULT_WEIGHTS,
    FEATURES,
    LOAD_FEATURES,
    LearnedRouter,
    features,
    monotone,
)
from scheduler.policy.routers_lookahead import BatchModel, LookaheadRouter, default_latency_model
from scheduler.policy.routers_smart import LlumnixRouter, MixingRouter, PowerOfTwoRouter, PrefixAffinityRouter

M, P, D = InstanceRole.MIXED, InstanceRole.PREFILL, InstanceRole.DECODE
SMART = ("power_of_two", "llumnix", "prefix_affinity", "mixing", "lookahead", "lookahead_shed", "learned", "shed")


def snap(iid: str, role: InstanceRole = M, *, running: int = 0, waiting: int = 0, decoding: int | None = None,
         used: int = 0, total: int = 1000, pending: int = 0, ctx: int = 0, pred: float = 0.0,
         requests: tuple[RequestLoad, ...] = (), draining: bool = False,
         cached: frozenset[int] = frozenset()) -> InstanceSnapshot:
    n = running if decoding is None else decoding
    return InstanceSnapshot(
        iid, role, num_running=running, num_waiting=waiting,
        num_decoding=n, kv_blocks_used=used, kv_blocks_total=total,
        block_size=16, prefill_tokens_pending=pending, decode_context_tokens=ctx, predicted_remaining_tokens=pred,
        requests=requests, draining=draining, cached_hash_ids=cached,
        num_predicted=n if pred else 0,  # ``pred``: the whole decode batch's guesses
    )


def req(prompt: int = 100, out: float | None = None, *, rid: str = "r", priority: int = 0,
        hash_ids: tuple[int, ...] = ()) -> RequestInfo:
    return RequestInfo(rid, 0.0, prompt, 4096, priority=priority, predicted_output_tokens=out, hash_ids=hash_ids)


def view(*insts: InstanceSnapshot) -> ClusterView:
    return ClusterView(0.0, insts)


@pytest.mark.parametrize("name", SMART)
def test_registered_routers_route_colocated_and_disaggregated(name: str) -> None:
    r = make_router(name)
    assert r.name == name
    assert r.needs_request_detail is False  # none asks for per-request detail by default
    d = r.route(req(), view(snap("a", running=3, used=100), snap("b", running=1, used=50)))
    assert isinstance(d, RouteDecision) and d.decode_instance is None and d.prefill_instance in ("a", "b")
    d = r.route(req(), view(snap("p0", P), snap("p1", P, waiting=2, pending=900), snap("d0", D), snap("d1", D)))
    assert isinstance(d, RouteDecision)
    assert d.prefill_instance in ("p0", "p1") and d.decode_instance in ("d0", "d1")
    assert isinstance(r.route(req(), view(snap("x", draining=True))), Rejected)


def test_power_of_two_is_seeded_and_never_picks_the_worst() -> None:
    v = view(*(snap(f"i{k}", running=k) for k in range(5)))
    a, b = PowerOfTwoRouter(seed=7), PowerOfTwoRouter(seed=7)
    picks = [a.route(req(), v).prefill_instance for _ in range(200)]  # type: ignore[union-attr]
    assert picks == [b.route(req(), v).prefill_instance for _ in range(200)]  # type: ignore[union-attr]
    assert "i4" not in picks and len(set(picks)) >= 3  # samples spread, the worst always loses its pair
    two = view(snap("x", running=5), snap("y", running=1))
    assert all(PowerOfTwoRouter(seed=s).route(req(), two).prefill_instance == "y" for s in range(5))  # type: ignore


def test_llumnix_counts_queued_prompts_and_keeps_headroom_for_high_priority() -> None:
    # a: little KV in use but a 12k-token prompt queued (750 blocks); b: more in use, nothing queued.
    v = view(snap("a", running=1, used=100, pending=12_000), snap("b", running=6, used=400))
    assert LeastOutstandingRouter().route(req(), v).prefill_instance == "a"  # type: ignore[union-attr]
    r = LlumnixRouter()
    assert r.route(req(), v).prefill_instance == "b"  # type: ignore[union-attr]
    # Equal instances: after a high-priority request lands on x, normal requests go to y, high ones see no headroom.
    eq = view(snap("x", used=300), snap("y", used=320))
    hi = req(priority=1, rid="h")
    d = r.route(hi, eq)
    assert d.prefill_instance == "x"  # type: ignore[union-attr]
    r.on_routed(hi, d)  # type: ignore[arg-type]
    assert r.route(req(), eq).prefill_instance == "y"  # type: ignore[union-attr]
    assert r.route(req(priority=1, rid="h2"), eq).prefill_instance == "x"  # type: ignore[union-attr]
    r.on_finished("h", "x")
    assert r.route(req(), eq).prefill_instance == "x"  # type: ignore[union-attr]


def test_prefix_affinity_trades_cache_hits_against_queue() -> None:
    r = PrefixAffinityRouter(hash_block_tokens=512)
    prompt = req(4096, hash_ids=tuple(range(8)))
    hot = frozenset(range(8))
    v = view(snap("a", pending=500), snap("b", pending=1500, cached=hot))
    assert r.route(prompt, v).prefill_instance == "b"  # saves 4096 tokens of prefill for 1000 of queue
    v = view(snap("a", pending=500), snap("b", pending=20_000, cached=hot))
    assert r.route(prompt, v).prefill_instance == "a"  # the hot instance's queue costs more than the reuse
    assert r.matched_blocks(req(hash_ids=(0, 1, 99, 3)), snap("b", cached=hot)) == 2  # leading blocks only
    # Without cache reports the router remembers where it sent the prefix.
    v = view(snap("a", pending=100), snap("b", pending=600))
    r.on_routed(prompt, RouteDecision("b"))
    assert r.route(req(4096, rid="next", hash_ids=tuple(range(8))), v).prefill_instance == "b"
    assert PrefixAffinityRouter().route(prompt, v).prefill_instance == "a"  # a fresh router knows nothing


def test_mixing_sends_prefill_heavy_away_from_decode_heavy() -> None:
    # "dec": 4 outstanding, all long decodes; "pre": 6 outstanding, mostly queued prompts, few decodes.
    dec = snap("dec", running=4, decoding=4, ctx=8000, pred=4000.0, used=500)
    pre = snap("pre", running=2, waiting=4, decoding=1, ctx=600, pred=50.0, pending=6000, used=450)
    v = view(dec, pre)
    assert LeastOutstandingRouter().route(req(), v).prefill_instance == "dec"  # type: ignore[union-attr]
    r = MixingRouter()
    d = r.route(req(3000, 20.0), v)
    assert d.prefill_instance == "pre" and "prefill-heavy" in d.reason  # type: ignore[union-attr]
    # A decode-heavy request avoids the queued prompts instead: they would stall its decodes.
    d = r.route(req(40, 1500.0), v)
    assert d.prefill_instance == "dec" and "decode-heavy" in d.reason  # type: ignore[union-attr]
    with pytest.raises(ValueError, match="alpha"):
        MixingRouter(alpha=1.5)


def test_lookahead_beats_least_outstanding_on_marginal_latency() -> None:
    # "q": one request, but a 30k-token prompt queued ahead; "b": three short decodes. Fewest outstanding is q,
    # yet a new request there waits for the whole prompt; on b it only slows three tiny decodes a little.
    q = snap("q", running=0, waiting=1, decoding=0, used=0, pending=30_000)
    b = snap("b", running=3, decoding=3, ctx=900, pred=300.0, used=60)
    v = view(q, b)
    assert LeastOutstandingRouter().route(req(500, 100.0), v).prefill_instance == "q"  # type: ignore[union-attr]
    r = LookaheadRouter(default_latency_model())
    assert r.route(req(500, 100.0), v).prefill_instance == "b"  # type: ignore[union-attr]
    eq, eb = r.estimate(req(500, 100.0), q), r.estimate(req(500, 100.0), b)
    assert eq.ttft_s > 10 * eb.ttft_s and eb.harm_s > 0 == eq.harm_s
    assert eq.total_s > eb.total_s


def test_lookahead_prices_kv_pressure_and_slo() -> None:
    from scheduler.core.types import SLO

    lat = default_latency_model()
    # Both hold ~70k decode tokens; "full" has 80k tokens of KV, "free" 320k: growth on "full" must preempt.
    full = snap("full", running=10, ctx=70_000, pred=4000.0, used=4900, total=5000)
    free = snap("free", running=12, ctx=75_000, pred=4800.0, used=4800, total=20_000)
    r = LookaheadRouter(lat)
    assert r.estimate(req(800, 400.0), full).kv_s > 0 == r.estimate(req(800, 400.0), free).kv_s
    assert r.route(req(800, 400.0), view(full, free)).prefill_instance == "free"  # type: ignore[union-attr]
    # A TTFT SLO it cannot meet is charged.
    tight = LookaheadRouter(lat, slo=SLO(ttft_s=1e-4))
    assert tight.estimate(req(800), free).slo_s > 0 == r.estimate(req(800), free).slo_s


def test_lookahead_shed_refuses_only_new_low_priority_requests_facing_a_long_wait() -> None:
    """``lookahead_shed``: Rejected (with the predicted wait as retry-after) when even the best instance's queue
    is over ``shed_ttft_factor`` x the TTFT SLO; a long prompt on an idle cluster, an accepted request (recovery)
    and a protected priority are always placed."""
    from scheduler.core.types import SLO

    lat = default_latency_model()
    r = make_router("lookahead_shed", latency=lat, slo=SLO(ttft_s=2.0))
    assert isinstance(r, LookaheadRouter) and r.shed_ttft_factor == 0.25
    busy = view(snap("a", waiting=4, pending=60_000), snap("b", waiting=4, pending=50_000))
    wait = min(r._terms(s).queue_s for s in busy.instances)
    assert wait > 0.5  # the best queue's predicted wait is over 0.25 x 2 s
    shed = r.route(req(200), busy)
    assert isinstance(shed, Rejected) and "shed" in shed.reason and shed.retry_after_s == pytest.approx(wait)
    assert isinstance(r.route(RequestInfo("r", 0.0, 200, 64, accepted=True), busy), RouteDecision)
    assert isinstance(r.route(req(200, priority=1), busy), RouteDecision)
    idle = view(snap("a"), snap("b"))
    assert isinstance(r.route(req(30_000), idle), RouteDecision)  # its own prefill is long, but it waits for none
    short = view(snap("a", waiting=1, pending=500), snap("b", waiting=1, pending=600))
    assert max(r._terms(s).queue_s for s in short.instances) < 0.5
    assert isinstance(r.route(req(200), short), RouteDecision)  # a short queue is waited for
    # Off by default; a bad factor is refused.
    assert isinstance(LookaheadRouter(lat, slo=SLO(ttft_s=2.0)).route(req(200), busy), RouteDecision)
    with pytest.raises(ValueError, match="shed_ttft_factor"):
        LookaheadRouter(lat, shed_ttft_factor=0.0)


def test_lookahead_shed_counts_the_wait_for_a_batch_slot() -> None:
    """With the config bound, the shed wait includes residents that must finish before a batch slot frees
    (``max_num_seqs``): a full instance with no prompt queued still makes a newcomer wait."""
    from scheduler.config.models import EngineSpec

    cfg = ClusterConfig(name="t", gpus={"a100": GPUSpec(name="a100", memory_gib=80, fp16_tflops=312, hbm_gbps=2039)},
                        model=ModelSpec(name="llama-2-7b", num_layers=32, hidden_size=4096, num_heads=32,
                                        num_kv_heads=32, intermediate_size=11008, vocab_size=32000),
                        pools=[PoolSpec(name="m", role="mixed", gpu="a100", count=2,
                                        engine=EngineSpec(max_num_seqs=8))])
    r = make_router("lookahead_shed", config=cfg)

    def full(iid: str) -> InstanceSnapshot:  # 8 decoding with ~300 tokens to go, 4 queued: no slot, no prompt work
        s = snap(iid, running=8, waiting=4, ctx=8 * 400, pred=8 * 300.0, used=400, total=100_000)
        return dataclasses.replace(s, gpu="a100")

    busy = view(full("a"), full("b"))
    t = r._terms(busy.instances[0])
    assert t.queue_s < 0.01 and r._admission_wait(r._request(req(200)), t) > 1.0
    assert isinstance(r.route(req(200), busy), Rejected)
    free = view(snap("a", running=2, ctx=800, pred=600.0), snap("b"))
    assert isinstance(r.route(req(200), free), RouteDecision)


def test_lookahead_shed_refuses_when_prefill_pressure_would_push_tpot_over_its_slo() -> None:
    """The TPOT rule: on a MIXED decoder the router has just sent many long prompts to, its chunked-prefill steps
    will stall the decodes; a newcomer whose predicted TPOT (step / (1 - pressure)) is over the TPOT SLO is refused.
    With the rule off (``shed_tpot_factor=None``) the same request is placed."""
    from scheduler.core.types import SLO

    lat = default_latency_model()
    slo = SLO(ttft_s=2.0, tpot_s=0.1)
    v = view(snap("a", running=4, ctx=4 * 500, pred=4 * 300.0, used=200, total=100_000))
    r = make_router("lookahead_shed", latency=lat, slo=slo)
    off = make_router("lookahead_shed", latency=lat, slo=slo, shed_tpot_factor=None)
    for router in (r, off):
        assert isinstance(router.route(req(200), v), RouteDecision)  # a light instance: served
        for _ in range(50):  # 50 long prompts just sent there
            router.on_routed(req(4000), RouteDecision("a"))
    assert r.prefill_pressure("a") == pytest.approx(r.max_pressure)
    shed = r.route(req(200), v)
    assert isinstance(shed, Rejected) and "TPOT" in shed.reason and shed.retry_after_s > 0
    assert isinstance(off.route(req(200), v), RouteDecision)
    with pytest.raises(ValueError, match="shed_tpot_factor"):
        LookaheadRouter(lat, shed_tpot_factor=-1.0)


@pytest.mark.parametrize("name", ["lookahead_shed", "shed"])
def test_the_tpot_rule_reads_prefill_pressure_net_of_prefix_cache_hits(name: str) -> None:
    """The stalls a MIXED decoder's residents meet are the prefills it computes: for the shedding rule a prompt
    whose leading blocks are cached there adds only its tail (attending over the cached part) to the prefill
    pressure. Counting whole prompts overstated it on a prefix-heavy trace (Mooncake) and the TPOT rule refused
    requests that would have met their SLO (``shed`` over the then ``learned``: 7.2% refused, goodput 1.62 vs 2.20 req/s
    alone). The routing cost keeps the whole prompt (measured better, docs/routing.md): two readings of one
    history, for the router's own placements and for another router's (judged by ``shed``) alike."""
    from scheduler.core.types import SLO

    lat = default_latency_model()
    slo = SLO(ttft_s=100.0, tpot_s=0.05)
    hashes = tuple(range(16))  # 16 blocks of 512 tokens: an 8k-token prompt
    warm = snap("a", running=4, ctx=2000, pred=1200.0, used=200, total=100_000, cached=frozenset(hashes[:14]))
    cold = dataclasses.replace(warm, cached_hash_ids=frozenset())
    f, refused = {}, {}
    for label, inst in (("warm", warm), ("cold", cold)):
        r = make_router(name, latency=lat, slo=slo) if name == "lookahead_shed" else make_router(
            "shed", base="round_robin")
        judge = r if name == "lookahead_shed" else r.judge
        judge.latency, judge.slo = lat, slo  # (the judge is built without a config here)
        for i in range(12):
            q = req(8192, rid=f"q{i}", priority=1, hash_ids=hashes)  # priority 1: never refused, always counted
            d = r.route(q, view(inst))
            assert isinstance(d, RouteDecision)
            r.on_routed(q, d)
        f[label] = (judge.prefill_pressure("a"), judge.prefill_pressure("a", net=True))
        refused[label] = isinstance(r.route(req(100, rid="new"), view(inst)), Rejected)
    window = LookaheadRouter(lat).pressure_window_s
    whole, net = 12 * lat.prefill_time(8192) / window, 12 * lat.prefill_time(8192 - 14 * 512, 14 * 512) / window
    assert f["cold"] == pytest.approx((min(whole, 0.9), min(whole, 0.9)))
    assert f["warm"] == pytest.approx((min(whole, 0.9), net)) and net < 0.3 * whole
    assert refused == {"cold": True, "warm": False}  # the same step, stretched by 1 / (1 - pressure)


def test_lookahead_prices_a_short_answers_tpot_miss_behind_prefill_stalls() -> None:
    """The newcomer's own TPOT is priced as a miss probability: over a few tokens one long prefill stall is enough
    to miss the TPOT SLO, over many tokens the stalls average out. On an instance the router has just sent two
    16k-token prompts (1.5 s of prefill each), the mean stretch ``step / (1 - f)`` is well inside the SLO for any
    length, yet a 10-token answer there is a likely miss and goes to the quiet (if fuller) instance; without the
    price it stays. A decoder with no prefill history gets the plain ``step > SLO`` test."""
    from scheduler.core.types import SLO

    lat = default_latency_model()
    slo = SLO(ttft_s=10.0, tpot_s=0.03)
    busy = snap("busy", running=8, ctx=8 * 600, pred=8 * 20.0, used=300, total=100_000)
    quiet = snap("quiet", running=24, ctx=24 * 600, pred=24 * 20.0, used=900, total=100_000)
    picks = {}
    for price in (10.0, 0.0):
        r = LookaheadRouter(lat, slo=slo, tpot_miss_penalty_s=price)
        r.route(req(100, 10.0), view(busy, quiet))  # binds the instances' latency models
        for _ in range(2):
            r.on_routed(req(16_000), RouteDecision("busy"))
        picks[price] = r.route(req(100, 10.0), view(busy, quiet)).prefill_instance  # type: ignore[union-attr]
    f = r.prefill_pressure("busy")
    step = r.estimate(req(100, 10.0), busy).tpot_s
    assert 0.2 < f < 0.5 and step / (1 - f) < 0.7 * slo.tpot_s  # the mean stretch alone: a hit
    p_short = r._tpot_miss_probability("busy", 10.0, step, slo.tpot_s)
    p_long = r._tpot_miss_probability("busy", 600.0, step, slo.tpot_s)
    assert p_short > 0.2 and p_long < 0.01
    assert picks == {10.0: "quiet", 0.0: "busy"}
    # No prefill history: the indicator on the decode step.
    assert r._tpot_miss_probability("quiet", 10.0, 0.02, slo.tpot_s) == 0.0
    assert r._tpot_miss_probability("quiet", 10.0, 0.04, slo.tpot_s) == 1.0


def test_lookahead_kv_headroom_does_not_depend_on_the_newcomers_predicted_length() -> None:
    # 100 residents, 95k tokens of context, 117.6k of KV: 100 x 256 tokens of growth over the horizon overflow it.
    # The instance is KV-tight for a short answer and a long one alike (the horizon used to be the newcomer's
    # own life: a 20-token answer saw no pressure, a 600-token one the residents' whole growth).
    tight = snap("tight", running=100, ctx=95_000, pred=30_000.0, used=5950, total=7350)
    r = LookaheadRouter(default_latency_model())
    short, long = r.estimate(req(2000, 20.0), tight), r.estimate(req(150, 600.0), tight)
    assert short.kv_s > 0 and long.kv_s > 0
    assert long.kv_s < 2 * short.kv_s
    # The newcomer's own end state still counts: a request that cannot fit at its end is charged on a
    # roomy instance too.
    roomy = snap("roomy", running=1, ctx=500, pred=100.0, used=40, total=250)
    assert r.estimate(req(1000, 3000.0), roomy).kv_s > 0 == r.estimate(req(1000, 100.0), roomy).kv_s


def test_lookahead_steady_batch_prices_a_long_answer_by_its_own_life_not_the_residents() -> None:
    """Exact lengths, two instances: ``ending`` decodes 48 requests that each have 20 tokens left, ``light`` 8 with
    400 left. Under the drain assumption (the default) a 2000-token answer is priced as if ``ending`` emptied after
    20 tokens and it then decoded alone: the busier instance looks cheaper and takes it. Under load the 48 are
    replaced as they leave, so the answer spends its 2000 steps in a batch of ~49 (the step ``tpot_s`` reports):
    ``steady_batch`` prices that and sends it to ``light``. A 20-token answer goes to ``light`` either way, and
    without predictions the two models are one (``O = R``)."""
    lat = default_latency_model()
    ending = snap("ending", running=48, ctx=48 * 600, pred=48 * 20.0, used=1800, total=100_000)
    light = snap("light", running=8, ctx=8 * 600, pred=8 * 400.0, used=300, total=100_000)
    picks = {}
    for steady in (False, True):
        r = LookaheadRouter(lat, steady_batch=steady)
        picks[steady] = [r.route(req(100, o), view(ending, light)).prefill_instance  # type: ignore[union-attr]
                         for o in (2000.0, 20.0)]
    assert picks == {False: ["ending", "light"], True: ["light", "light"]}
    est = LookaheadRouter(lat, steady_batch=True).estimate(req(100, 2000.0), ending)
    assert est.own_s == pytest.approx(2000 * est.tpot_s)  # its whole life at the batch's step
    # No length guesses anywhere: the same price under both models.
    blind = [snap("a", running=48, ctx=48 * 600, used=1800, total=100_000), snap("b", running=8, ctx=8 * 600)]
    for inst in blind:
        assert (LookaheadRouter(lat).estimate(req(100), inst)
                == LookaheadRouter(lat, steady_batch=True).estimate(req(100), inst))


def test_lookahead_reprices_an_instance_whose_snapshot_changed() -> None:
    # The router keeps each instance's request-independent terms while its snapshot object is current; a new
    # snapshot under the same id (the instance got busy) must be priced afresh, as a fresh router prices it.
    lat = default_latency_model()
    r = LookaheadRouter(lat)
    idle, other = snap("a"), snap("b", running=2, ctx=1000, pred=200.0, used=100)
    assert r.route(req(1000, 200.0), view(idle, other)).prefill_instance == "a"  # type: ignore[union-attr]
    busy = snap("a", running=60, waiting=3, pending=12_000, ctx=80_000, pred=15_000.0, used=900)
    assert r.route(req(1000, 200.0), view(busy, other)).prefill_instance == "b"  # type: ignore[union-attr]
    assert r.estimate(req(1000, 200.0), busy) == LookaheadRouter(lat).estimate(req(1000, 200.0), busy)
    assert r.estimate(req(1000, 200.0), idle) == LookaheadRouter(lat).estimate(req(1000, 200.0), idle)


def test_lookahead_forgets_instances_that_left_the_cluster() -> None:
    # Autoscaling retires ids for good; a long-running ingress must not keep every retired instance's pressure
    # history, latency model and cached terms (each holding a whole snapshot).
    r = LookaheadRouter(default_latency_model())
    for k in range(50):  # a cluster of two, replaced one instance at a time
        a, b = snap(f"i{k}"), snap(f"i{k + 1}", running=1, ctx=500, used=50)
        d = r.route(req(1000, 50.0, rid=f"r{k}"), ClusterView(float(k), (a, b)))
        r.on_routed(req(1000, 50.0, rid=f"r{k}"), d)  # type: ignore[arg-type]
    for state in (r._cache, r._lat_of_id, r._pressure):
        assert len(state) <= 4 and {"i49", "i50"} & set(state)  # at most twice the view's size
    assert r.prefill_pressure(d.prefill_instance) > 0  # type: ignore[union-attr]  # the live ones keep theirs


def test_lookahead_pairs_jointly_and_colocates_when_cheaper() -> None:
    lat = default_latency_model()
    r = LookaheadRouter(lat)
    v = view(snap("p0", P, waiting=3, pending=9000), snap("p1", P),
             snap("d0", D, running=40, ctx=60_000, pred=12_000.0, used=4000, total=5000),
             snap("d1", D, running=2, ctx=1000, pred=200.0, used=100, total=5000))
    d = r.route(req(1000, 200.0), v)
    assert (d.prefill_instance, d.decode_instance) == ("p1", "d1")  # type: ignore[union-attr]
    # An idle MIXED instance beats prefill + transfer + decode on busy separate pools.
    v = view(snap("p0", P, waiting=2, pending=8000), snap("m", M),
             snap("d0", D, running=30, ctx=40_000, pred=9000.0, used=3000, total=5000))
    d = r.route(req(1000, 200.0), v)
    assert d.prefill_instance == "m" and d.decode_instance is None  # type: ignore[union-attr]


def test_lookahead_counts_the_decodes_on_their_way_to_a_decode_instance() -> None:
    # A DECODE instance's waiting requests are decodes routed there whose KV has not arrived (and preempted ones):
    # they join its batch ahead of a newcomer. d0 decodes 10 with 30 more on their way, d1 decodes 25: d1 is the
    # lighter decoder. Counting only the running batch, a preempting decoder looked lightest and drew every next
    # request (Azure on 4 PREFILL + 12 DECODE: TPOT p50 0.78 s, 15k preemptions; with them counted 0.030 s, 1k).
    r = LookaheadRouter(default_latency_model())
    v = view(snap("p0", P),
             snap("d0", D, running=10, waiting=30, ctx=15_000, pred=2000.0, used=1100, total=7000),
             snap("d1", D, running=25, ctx=37_500, pred=5000.0, used=2600, total=7000))
    assert r.route(req(1000, 200.0), v).decode_instance == "d1"  # type: ignore[union-attr]
    # Without the waiting ones d0 is the lighter and is chosen: the waiting count is what decided.
    v = view(v.instances[0], dataclasses.replace(v.instances[1], num_waiting=0), v.instances[2])
    assert r.route(req(1000, 200.0), v).decode_instance == "d0"  # type: ignore[union-attr]


def test_lookahead_counts_the_decodes_on_their_way_to_a_mixed_instance() -> None:
    # The same on a MIXED decoder, where queued prompts wait too: ``num_incoming`` says which of its waiting
    # requests are decodes on their way (they join its batch), the rest are prompts (they queue for prefill).
    # m0 decodes 10 with 30 more coming, m1 decodes 25: m1 is the lighter decoder.
    r = LookaheadRouter(default_latency_model())
    m0 = dataclasses.replace(snap("m0", M, running=10, waiting=30, ctx=15_000, pred=2000.0, used=1100, total=7000),
                             num_incoming=30)
    m1 = snap("m1", M, running=25, ctx=37_500, pred=5000.0, used=2600, total=7000)
    p0 = snap("p0", P)
    assert r.route(req(1000, 200.0), view(p0, m0, m1)).decode_instance == "m1"  # type: ignore[union-attr]
    # Taken for prompts (no num_incoming: the snapshots before it), they had no pending tokens and no weight.
    m0_old = dataclasses.replace(m0, num_incoming=0)
    assert LookaheadRouter(default_latency_model()).route(
        req(1000, 200.0), view(p0, m0_old, m1)).decode_instance == "m0"  # type: ignore[union-attr]


def test_llumnix_keeps_a_pairs_priority_headroom_on_its_decoder_only() -> None:
    """A high-priority P/D request holds KV on its decoder for its whole life; on its prefill instance one step.
    Counted on both until it finished decoding, the emptied prefill instance kept repelling normal requests."""
    r = LlumnixRouter()
    hi = req(200, priority=1, rid="h")
    r.on_routed(hi, RouteDecision("p0", "d0"))
    v = view(snap("p0", P), snap("p1", P, used=50), snap("d0", D), snap("d1", D, used=50))
    d = r.route(req(200), v)
    assert d.prefill_instance == "p0" and d.decode_instance == "d1"  # type: ignore[union-attr]


def test_learned_logs_only_the_arms_a_request_used() -> None:
    """Kept on its MIXED prefill instance by the pairing, a request never used the decoder its decode arm picked:
    that arm is not logged as a training sample for it."""
    v = view(snap("p0", P, running=8, waiting=8, pending=20_000), snap("m0", M),
             snap("d0", D, running=4, used=200, ctx=3000))
    r = LearnedRouter(collect=True)
    q = req(100, rid="r")
    d = r.route(q, v)
    r.on_routed(q, d)  # type: ignore[arg-type]
    assert (d.prefill_instance, d.decode_instance) == ("m0", None)  # type: ignore[union-attr]
    assert len(r.take("r")) == 1


def test_lookahead_takes_latency_models_from_config() -> None:
    gpu = GPUSpec(name="g", memory_gib=80, fp16_tflops=300, hbm_gbps=2000)
    model = ModelSpec(name="m", num_layers=4, hidden_size=512, num_heads=8, num_kv_heads=8,
                      intermediate_size=1024, vocab_size=1000)
    cfg = ClusterConfig(gpus={"g": gpu}, model=model, pools=[PoolSpec(name="p", gpu="g", count=2)])
    r = make_router("lookahead", config=cfg)
    inst = InstanceSnapshot("p-0", M, gpu="g", tp=1)
    assert r.latency_of(inst).model == model  # type: ignore[attr-defined]
    assert r.slo_for(req()).ttft_s == 2.0  # type: ignore[attr-defined]


def test_splitwise_fallback_widens_saturated_decode_pool() -> None:
    sat = snap("d0", D, running=50, used=990, total=1000)
    pool = decode_pool(view(snap("p0", P), sat, snap("m0", M)))
    assert {i.instance_id for i in pool.candidates} == {"d0", "m0"} and pool.fallback
    assert decode_pool(view(snap("p0", P), sat, snap("d1", D, used=100))).fallback == ""
    # Only on request may a light PREFILL instance decode.
    v = view(snap("p0", P), snap("p1", P, waiting=3, pending=5000, used=400), sat)
    assert [i.instance_id for i in decode_pool(v).candidates] == ["d0"]
    wide = decode_pool(v, allow_prefill_decode=True)
    assert {i.instance_id for i in wide.candidates} == {"d0", "p0"}
    d = LlumnixRouter(allow_prefill_decode=True).route(req(), v)
    assert d.decode_instance == "p0" and "fallback" in d.reason  # type: ignore[union-attr]
    d = LlumnixRouter().route(req(), view(snap("p0", P), sat, snap("m0", M)))
    assert d.decode_instance in (None, "m0") and d.prefill_instance in ("p0", "m0")  # type: ignore[union-attr]
    assert "fallback" in d.reason  # type: ignore[union-attr]


def test_high_priority_avoids_long_queues() -> None:
    v = view(snap("a", running=2, waiting=6, used=200), snap("b", running=6, waiting=0, used=260))
    for name in ("power_of_two", "llumnix", "mixing", "learned"):
        r = make_router(name)
        assert r.route(req(priority=1), v).prefill_instance == "b", name  # type: ignore[union-attr]


def test_learned_router_fits_saves_loads_and_routes(tmp_path) -> None:
    rng = np.random.default_rng(0)
    load = np.array([k in LOAD_FEATURES for k in FEATURES])
    true = rng.normal(size=len(FEATURES))
    true[load] = np.abs(true[load])
    X = rng.normal(size=(400, len(FEATURES)))
    r = LearnedRouter(dict(DEFAULT_WEIGHTS))
    w = r.fit([(x, -float(x @ true)) for x in X], l2=1e-6)  # reward = -cost
    assert np.allclose([w[k] for k in FEATURES], true, atol=1e-2)
    # Data that asks for a negative load weight gets the bound (0), not a negative one; the rest still fits.
    true[FEATURES.index("out_x_pending")] = -0.5
    prior = r.w.copy()  # fit shrinks toward the current weights
    w = r.fit([(x, -float(x @ true)) for x in X], l2=1e-6)
    assert w["out_x_pending"] == 0.0 and w["pending_prefill"] == pytest.approx(true[FEATURES.index("pending_prefill")], abs=0.1)
    # ... and it is the bounded optimum (KKT): zero gradient on free weights, >= 0 on those held at their bound
    v = np.array([w[k] for k in FEATURES])
    grad = X.T @ (X @ v - X @ true) + 1e-6 * len(X) * (v - prior)
    held = load & (v == 0.0)
    assert np.abs(grad[~held]).max() < 1e-6 and (grad[held] > -1e-6).all() and held.any()
    path = tmp_path / "lr.json"
    r.save(path, meta={"trace": "synthetic"})
    assert json.loads(path.read_text())["meta"] == {"trace": "synthetic"}
    assert LearnedRouter.load(path).weights == pytest.approx(r.weights)
    with pytest.raises(ValueError, match="unknown features"):
        LearnedRouter({"nope": 1.0})
    with pytest.raises(ValueError, match="entries"):
        r.fit([([1.0, 2.0], 0.0)])
    bad = tmp_path / "old.json"
    LearnedRouter(monotone({"waiting": 1.0})).save(bad)
    bad.write_text(bad.read_text().replace('"waiting": 1.0', '"waiting": -1.0'))
    with pytest.raises(ValueError, match=r"old\.json: weights: waiting=-1: load features need weights >= 0"):
        LearnedRouter(path=bad)
    with pytest.raises(ValueError, match="not a learned-router artifact"):
        (tmp_path / "bad.json").write_text("{}")
        LearnedRouter(path=tmp_path / "bad.json")
    # The shipped artifact loads; collect mode logs the chosen arm's features for training.
    assert ARTIFACT.exists() and LearnedRouter().weights == pytest.approx(LearnedRouter(path=ARTIFACT).weights)
    c = LearnedRouter(collect=True)
    v = view(snap("a", running=8, waiting=4, used=700, pending=4000), snap("b", running=1, used=50))
    d = c.route(req(rid="x"), v)
    assert d.prefill_instance == "b"  # type: ignore[union-attr]
    c.on_routed(req(rid="x"), d)  # type: ignore[arg-type]
    (phi,) = c.take("x")
    assert np.allclose(phi, c.phi(req(rid="x"), v.by_id("b"), phase="colocated")) and c.take("x") == []
    # without a latency model the two time features are zero; the rest is the snapshot's summary
    bare = features(req(rid="x"), v.by_id("b"), phase="colocated")
    assert np.allclose(phi[:-2], bare[:-2]) and bare[-2:].tolist() == [0.0, 0.0] and (phi[-2:] > 0).all()


def test_learned_cost_never_falls_as_an_instance_gets_busier() -> None:
    """The shipped artifact's cost is non-decreasing in every kind of load an instance can carry, for any request:
    long or short prompt, any length guess (a client's hint), either priority, with or without a prefix hit. A
    negative load weight breaks this for some requests: the bandit's -0.28 on ``out_x_pending`` (fitted where every
    length guess was the default 256) made a 500-token hint prefer the longest queue, and the router then sent
    every request to one instance (Azure x16, SLO attainment 0.5%)."""
    replace = dataclasses.replace
    rng = np.random.default_rng(0)
    cfg = load_config("hetero-a100-h100")
    r = LearnedRouter()
    r.initialize(cfg)
    more = (  # each adds one kind of work to an instance
        lambda s: replace(s, num_waiting=s.num_waiting + 4, num_running=s.num_running + 4,
                          prefill_tokens_pending=s.prefill_tokens_pending + 8000),
        lambda s: replace(s, num_decoding=s.num_decoding + 16, num_running=s.num_running + 16,
                          decode_context_tokens=s.decode_context_tokens + 20_000,
                          kv_blocks_used=s.kv_blocks_used + 1250, predicted_remaining_tokens=s.predicted_remaining_tokens + 4000,
                          num_predicted=s.num_predicted + 16),
        lambda s: replace(s, prefill_tokens_pending=s.prefill_tokens_pending + 30_000,
                          prefill_compute_tokens=(s.prefill_compute_tokens or 0) + 30_000),
    )
    for _ in range(200):
        n = int(rng.integers(0, 40))
        inst = replace(snap("i", running=n + int(rng.integers(0, 5)), decoding=n, used=int(rng.integers(0, 4000)),
                            total=8000, pending=int(rng.integers(0, 20_000)), ctx=int(rng.integers(0, 50_000)),
                            pred=float(rng.integers(0, 9000)), cached=frozenset({1, 2})),
                       gpu=str(rng.choice(["a100", "h100"])), num_waiting=int(rng.integers(0, 8)))
        q = req(int(rng.integers(10, 8000)), rng.choice([None, 10.0, 500.0, 4000.0]), priority=int(rng.integers(0, 2)),
                hash_ids=(1, 2, 3) if rng.random() < 0.5 else ())
        for phase in ("colocated", "prefill", "decode"):
            for add in more:
                assert r.score(q, add(inst), phase=phase) >= r.score(q, inst, phase=phase) - 1e-12, (q, inst, phase)
    # and the router says so when handed weights that break it
    with pytest.raises(ValueError, match="out_x_pending=-0.28.*>= 0"):
        LearnedRouter({**DEFAULT_WEIGHTS, "out_x_pending": -0.28})
    assert monotone({"out_x_pending": -0.28, "prefix_hit": -0.5}) == {"out_x_pending": 0.0, "prefix_hit": -0.5}


def test_learned_router_sends_a_long_length_hint_to_the_idle_instance() -> None:
    """Whatever the guess, an idle instance beats one with a long queue and a full batch."""
    busy = snap("busy", running=90, waiting=30, used=900, pending=400_000, ctx=90_000, pred=20_000)
    idle = snap("idle")
    for out in (None, 100.0, 500.0, 2000.0):
        assert LearnedRouter().route(req(500, out), view(busy, idle)).prefill_instance == "idle", out  # type: ignore


def test_learned_time_features_read_each_instances_own_speed() -> None:
    """``ttft_est`` / ``tpot_est`` come from the instance's latency model (its GPU and TP) in units of the request's
    SLO: at equal queues an H100 instance's are smaller than an A100's, and a TP-4 instance prefills faster than a
    TP-1 one, so a router weighting them sends the prompt to the faster one -- which no count feature can tell. (A
    small decode batch is not faster at TP 4 in the fitted profile: the step is not compute-bound.)"""
    replace = dataclasses.replace
    cfg = load_config("hetero-a100-h100")
    r = LearnedRouter({"ttft_est": 1.0, "tpot_est": 1.0})
    r.initialize(cfg)
    slow = replace(snap("a100-0", running=4, pending=3000, ctx=4000), gpu="a100")
    fast = replace(snap("h100-0", running=4, pending=3000, ctx=4000), gpu="h100")
    tp4 = replace(slow, instance_id="a100-tp4", tp=4)
    q = req(prompt=2000)
    f_slow, f_fast, f_tp4 = (r.phi(q, s, phase="colocated")[-2:] for s in (slow, fast, tp4))
    assert (f_fast < f_slow).all() and f_tp4[0] < f_slow[0]
    assert r.route(q, view(slow, fast)).prefill_instance == "h100-0"  # type: ignore[union-attr]
    # SLO units: a class with half the TTFT target doubles ttft_est
    tight = replace(q, slo=SLO(ttft_s=cfg.slo_for(0).ttft_s / 2, tpot_s=cfg.slo_for(0).tpot_s))
    assert r.phi(tight, slow, phase="colocated")[-2] == pytest.approx(2 * f_slow[0])
    # a prefill-phase arm has no decode step, a decode-phase arm no prefill
    assert r.phi(q, slow, phase="prefill")[-1] == 0.0 and r.phi(q, slow, phase="decode")[-2] == 0.0


@pytest.mark.parametrize(("config", "trace"), [
    ("default", "azure_llm_2023_conv_first10min.csv.gz"),
    # prefix-cache hash ids: the judge's net prefill pressure must follow the same placements too
    ("scheduler/config/examples/llama3-8b-a100-16-longctx.yaml", "mooncake_fast25_conversation_first1000.jsonl.gz"),
])
def test_shed_composes_any_router_with_the_lookahead_refusal_rules(config: str, trace: str) -> None:
    """``shed`` = a base router's placements + ``LookaheadRouter._shed`` on them. Over ``lookahead`` it must decide
    exactly what ``lookahead_shed`` decides (the judge tracks the same prefill pressure from the same placements);
    over ``learned`` it refuses some of an overload (``learned`` alone refuses none) and serves the rest."""
    from pathlib import Path

    from scheduler.config.load import load_config
    from sim.commands import with_instances
    from sim.compare import at_load, saturation_rate
    from sim.simulator import Simulator, Workload
    from sim.traces import load_trace

    root = Path(__file__).resolve().parents[1]
    cfg = with_instances(load_config(config if config == "default" else str(root / config)), 4)
    w = Workload.from_trace(load_trace(root / "sim" / "data" / trace))
    n = 600
    w = Workload(w.arrival_s[:n], w.prompt_tokens[:n], w.output_tokens[:n],
                 hash_ids=None if w.hash_ids is None else w.hash_ids[:n], hash_block_tokens=w.hash_block_tokens)
    wl = at_load(w, 1.2, saturation_rate(cfg, w))
    runs = {name: Simulator(cfg, router=make_router(name, **kw)).run(wl)  # the simulator binds the config
            for name, kw in (("lookahead_shed", {}), ("shed", {"base": "lookahead"}), ("learned", {}))}
    a, b = runs["lookahead_shed"], runs["shed"]
    assert 0 < a.rejected.sum() < len(wl)
    assert np.array_equal(a.rejected, b.rejected)
    assert np.array_equal(a.instance, b.instance)
    np.testing.assert_array_equal(a.first_token_s, b.first_token_s)
    learned = Simulator(cfg, router=make_router("shed", base="learned")).run(wl)
    assert 0 < learned.rejected.sum() < len(wl) // 2
    assert not runs["learned"].rejected.any()


@pytest.mark.parametrize("name", ["lookahead_shed", "shed"])
def test_the_live_ingress_binds_the_config_to_the_router_it_names(name: str) -> None:
    """``policies.router: {name: lookahead_shed}`` in a served config: the ingress builds the router and binds the
    config (latency models, SLO classes), as the simulator does. Unbound, the shedding rules had no SLOs and the
    router never refused."""
    from scheduler.config.load import load_config
    from scheduler.config.models import PolicySpec
    from scheduler.control.ingress import Ingress

    cfg = load_config("deploy/examples/cpu-pd.yaml")
    cfg = cfg.model_copy(update={"policies": cfg.policies.model_copy(update={"router": PolicySpec(name=name)})})
    router = Ingress(cfg, None).router
    judge = getattr(router, "judge", router)
    assert router.name == name and judge.config is cfg
    assert judge.slo_for(req()).ttft_s == cfg.slos[0].ttft_s


def test_lookahead_credits_the_prefix_cached_on_an_instance() -> None:
    """The leading ``hash_ids`` blocks an instance reports cached are not recomputed there: the newcomer's TTFT on
    it is the rest's prefill (attending over the cached part), so it goes there even against a little queue."""
    r = LookaheadRouter(default_latency_model())
    q = req(4096, hash_ids=(1, 2, 3, 4, 5, 6, 7, 8))  # 8 blocks of 512
    cold = snap("a", waiting=1, pending=256)
    warm = dataclasses.replace(snap("b", waiting=1, pending=512), cached_hash_ids=frozenset({1, 2, 3, 4, 5, 6, 99}))
    assert r._cached_tokens(r._request(q), warm) == 6 * 512 and r._cached_tokens(r._request(q), cold) == 0
    lat = default_latency_model()
    e_cold, e_warm = r.estimate(q, cold), r.estimate(q, warm)
    assert e_warm.ttft_s < e_cold.ttft_s - 0.5 * lat.prefill_time(3 * 512)
    assert r.route(q, view(cold, warm)).prefill_instance == "b"
    # A request without hash_ids is priced as before: the cached blocks are someone else's.
    assert r.estimate(req(4096), warm).ttft_s > r.estimate(req(4096), cold).ttft_s


def _all_router_names() -> list[str]:
    from scheduler.policy.route import ROUTERS, _ensure_builtin_routers_loaded

    _ensure_builtin_routers_loaded()
    return sorted(ROUTERS)


@pytest.mark.parametrize("name", _all_router_names())
def test_no_router_reads_the_clients_max_tokens(name: str) -> None:
    """A trace replay asks for exactly the trace's output length (live and simulated alike), so ``max_tokens``
    would hand a router the true length: a router must read ``predicted_output_tokens`` instead. Same requests,
    same views, ``max_tokens`` from 1 to 8192: the same placements."""
    v_mixed = view(snap("a", running=3, used=100, ctx=900, pred=300.0), snap("b", running=1, used=50, pending=700),
                   snap("c", waiting=2, used=400, ctx=4000, pred=50.0))
    v_pd = view(snap("p0", P), snap("p1", P, waiting=2, pending=900), snap("d0", D, running=4, ctx=2000),
                snap("d1", D, running=1, ctx=300))
    runs = []
    for max_tokens in (1, 64, 8192):
        r = make_router(name)
        picks = []
        for k in range(12):
            rq = RequestInfo(f"r{k}", 0.1 * k, 50 + 400 * (k % 3), max_tokens, priority=k % 2,
                             predicted_output_tokens=(None, 20.0, 700.0)[k % 3], output_tokens=max_tokens)
            for v in (v_mixed, v_pd):
                d = r.route(rq, v)
                picks.append(d if isinstance(d, Rejected) else (d.prefill_instance, d.decode_instance))
                if isinstance(d, RouteDecision):
                    r.on_routed(rq, d)
        runs.append(picks)
    assert runs[0] == runs[1] == runs[2]


# ---- the base routers' P/D path and the pairing helpers (test-suite audit: each test names the mutant it kills) --
def test_least_outstanding_pd_paths() -> None:
    """The default router (``least_outstanding``) on P/D views. Kills, in ``route.py`` / ``filters.py``: an explicit
    ``(p, p)`` pair for a MIXED instance that is both the best prefill and the best decoder (``decode_instance`` must
    be None: colocated); a PREFILL-only cluster routed "colocated" on a PREFILL instance instead of Rejected;
    ``decode_candidates`` offering an unhealthy DECODE or a draining MIXED instance; ties going to the last
    instance in view order instead of the first."""
    r = LeastOutstandingRouter()
    d = r.route(req(), view(snap("p0", P, running=2), snap("d0", D), snap("d1", D)))
    assert d == RouteDecision("p0", "d0")  # tie between d0 and d1: the first in view order
    sick = dataclasses.replace(snap("d0", D), healthy=False)
    assert r.route(req(), view(snap("p0", P), sick, snap("d1", D, running=5))) == RouteDecision("p0", "d1")
    # No DECODE instance: MIXED ones decode; the draining one (idle) must not be offered.
    v = view(snap("p0", P, running=5), snap("m0", M, draining=True), snap("m1", M, running=3))
    assert v.disaggregated
    assert r.route(req(), v) == RouteDecision("m1")  # colocated on m1, not (m1, m1) nor (m1, m0)
    no_decoder = r.route(req(), view(snap("p0", P), snap("d0", D, draining=True)))
    assert isinstance(no_decoder, Rejected) and "decode" in no_decoder.reason


def test_round_robin_cycles_each_phase_on_its_own_cursor() -> None:
    """Round-robin keeps one cursor per phase: prefill and decode instances both cycle. Kills a cursor not
    written back under the phase (every request on the first pair) or one cursor shared by both phases."""
    r = make_router("round_robin")
    v = view(snap("p0", P), snap("p1", P), snap("d0", D), snap("d1", D))
    picks = [r.route(req(rid=f"r{k}"), v) for k in range(4)]
    assert picks == [RouteDecision("p0", "d0"), RouteDecision("p1", "d1")] * 2
    r, colocated = make_router("round_robin"), view(snap("a"), snap("b"), snap("c"))
    assert [r.route(req(), colocated).prefill_instance for _ in range(4)] == ["a", "b", "c", "a"]  # type: ignore[union-attr]


@pytest.mark.parametrize("name", SMART)
def test_smart_routers_reject_a_cluster_with_no_decoder(name: str) -> None:
    """A P/D cluster whose only decoder is draining: ``PairingRouter.route`` must reject (no instance can decode),
    not place the request "colocated" on a PREFILL instance (mutant: the ``p.role.does_decode`` check dropped)."""
    d = make_router(name).route(req(), view(snap("p0", P), snap("d0", D, draining=True)))
    assert isinstance(d, Rejected) and "decode" in d.reason


def test_decode_pool_saturation_boundary_and_prefill_borrow_rules() -> None:
    """``decode_pool``: a DECODE instance *at* ``saturation`` is saturated (kills ``<`` -> ``<=``); a PREFILL instance
    is borrowed only if it has nothing waiting AND is below ``prefill_light`` (kills dropping either condition:
    the existing test's excluded instance failed both); the fallback names why (no decoder vs. saturated)."""
    at = snap("d0", D, used=950, total=1000)  # virtual usage exactly 0.95
    pool = decode_pool(view(snap("p0", P), at, snap("m0", M)))
    assert {i.instance_id for i in pool.candidates} == {"d0", "m0"} and pool.fallback == "decode pool saturated"
    below = snap("d0", D, used=949, total=1000)
    assert [i.instance_id for i in decode_pool(view(snap("p0", P), below, snap("m0", M))).candidates] == ["d0"]
    queued = snap("pq", P, waiting=1)  # idle KV, but a prompt waiting
    heavy = snap("ph", P, used=300)  # nothing waiting, but at prefill_light
    light = snap("pl", P, used=299)
    wide = decode_pool(view(queued, heavy, light, at), allow_prefill_decode=True)
    assert {i.instance_id for i in wide.candidates} == {"d0", "pl"}
    none = decode_pool(view(snap("p0", P), snap("m0", M)))
    assert [i.instance_id for i in none.candidates] == ["m0"] and none.fallback == "no decode instance"


def test_pairing_stays_colocated_on_a_mixed_instance_that_decodes_as_well() -> None:
    """``PairingRouter.pair``: a MIXED prefill instance keeps the request when it would decode *about as well* as
    the chosen decoder -- a tie included (kills ``<=`` -> ``<``, which paid a KV transfer for nothing)."""
    d = LlumnixRouter().route(req(), view(snap("m0", M, used=100), snap("d0", D, used=100)))
    assert d == RouteDecision("m0", reason="llumnix")
    d = LlumnixRouter().route(req(), view(snap("m0", M, used=100), snap("d0", D, used=99)))
    assert isinstance(d, RouteDecision) and (d.prefill_instance, d.decode_instance) == ("m0", "d0")


def test_priority_tracker_bound_and_detailed_snapshots() -> None:
    """``PriorityTracker``: at most ``max_tracked`` requests remembered, the oldest dropped (kills an off-by-one in
    the bound); a detailed snapshot adds the high-priority requests it lists to the router's memory (kills
    ignoring ``inst.requests``, or counting every listed request)."""
    from scheduler.policy.pairing import PriorityTracker

    t = PriorityTracker(max_tracked=2)
    for k in range(3):
        t.add(req(rid=f"h{k}", priority=1), RouteDecision(f"i{k}"))
    t.add(req(rid="low"), RouteDecision("i0"))  # normal priority: not tracked
    assert [t.count(snap(f"i{k}")) for k in range(3)] == [0, 1, 1]
    t.finished("h1")
    assert t.count(snap("i1")) == 0
    listed = (RequestLoad("a", 100, 5, priority=1), RequestLoad("b", 100, 5), RequestLoad("c", 100, 5))
    assert t.count(snap("i1", requests=listed)) == 1  # the snapshot's one high (memory has none there), not 3
    assert t.count(snap("i2", requests=listed[1:])) == 1  # memory's, not listed yet (on its way there)


def test_lookahead_refill_prices_a_life_at_the_batch_its_residents_and_the_arrivals_make() -> None:
    """``batch_model="refill"``: ``ending`` decodes 48 requests with 20 tokens left. A 2000-token answer there is
    priced at the batch it would meet: with nothing arriving, the 48 gone after 20 of its steps (near the drain
    price, about half the steady one); with the router placing requests at the rate that keeps 48 decoding there
    (Little's law: rate x step x their length), near the steady price; in between, in between. The rate is the
    router's own placements, decayed over ``pressure_window_s`` and shared over the decoding instances."""
    lat = default_latency_model()
    ending = snap("ending", running=48, ctx=48 * 600, pred=48 * 20.0, used=1800, total=100_000)
    light = snap("light", running=8, ctx=8 * 600, pred=8 * 400.0, used=300, total=100_000)
    long = req(100, 20_000.0)
    drain, steady = (LookaheadRouter(lat, batch_model=m).estimate(long, ending) for m in ("drain", "steady"))

    def refill(placed: int, *insts: InstanceSnapshot, later_s: float = 0.0) -> float:
        r = LookaheadRouter(lat, batch_model="refill")
        r.route(req(), view(*insts))
        for _ in range(placed):  # each arrival: 400-token prompt, 400-token answer (context 600, the residents')
            r.on_routed(req(400, 400.0), RouteDecision("light"))
        r.route(req(), ClusterView(later_s, insts))
        return r.estimate(long, ending).own_s

    step = steady.tpot_s  # the decode step with the 48 and the newcomer
    # Placements that keep 48 busy on each of the two: per second per decoder, times the 10 s window, times two.
    little = round(48 / (400 * step) * 10.0 * 2)
    alone = refill(0, ending, light)
    assert alone == pytest.approx(drain.own_s, rel=0.05) and alone < 0.6 * steady.own_s
    assert refill(little, ending, light) == pytest.approx(steady.own_s, rel=0.03)
    half = refill(little // 2, ending, light)
    assert alone < half < refill(little, ending, light)
    # Shared over the decoders: with two more instances each gets half the rate.
    more = (ending, light, snap("c"), snap("d"))
    assert refill(little, *more) == pytest.approx(half, rel=0.01)
    assert refill(little, *more[:2], snap("p", InstanceRole.PREFILL)) == refill(little, ending, light)
    # The history decays: three windows later little is left of it.
    assert refill(little, ending, light, later_s=30.0) < alone * 1.1


def test_lookahead_refill_counts_arrivals_not_re_routes_of_accepted_requests() -> None:
    """The live ingress re-routes an accepted request (a recovery, a draining instance's refusal) through
    ``route`` + ``on_routed`` with ``accepted=True``: no new decode joins the cluster, so the refill rate must not
    rise (it did: each re-route counted as an arrival; the simulator routes each request once)."""
    lat = default_latency_model()
    ending = snap("ending", running=48, ctx=48 * 600, pred=48 * 20.0, used=1800, total=100_000)
    light = snap("light", running=8, ctx=8 * 600, pred=8 * 400.0, used=300, total=100_000)

    def priced(rerouted: int) -> float:
        r = LookaheadRouter(lat, batch_model="refill")
        r.route(req(), view(ending, light))
        for _ in range(40):
            r.on_routed(req(400, 400.0), RouteDecision("light"))
        for _ in range(rerouted):
            r.on_routed(dataclasses.replace(req(400, 400.0), accepted=True), RouteDecision("light"))
        r.route(req(), view(ending, light))
        return r.estimate(req(100, 20_000.0), ending).own_s

    assert priced(200) == priced(0)


def test_lookahead_batch_model_names_the_allowed_ones() -> None:
    with pytest.raises(ValueError, match="batch_model: must be one of drain, steady, refill, got 'fill'"):
        LookaheadRouter(batch_model="fill")
    with pytest.raises(ValueError, match="steady_batch=True contradicts batch_model='refill'"):
        LookaheadRouter(steady_batch=True, batch_model="refill")
    assert LookaheadRouter(steady_batch=True).batch_model == LookaheadRouter(batch_model="steady").batch_model


def test_lookahead_steady_batch_takes_a_bool_only() -> None:
    """``compare --routers lookahead:steady_batch=False`` passes the string ``"False"`` (not JSON): truthy, it
    priced the run as ``steady`` without a word (and ``batch_model=refill`` beside it read as a contradiction).
    Refused naming the parameter; ``true`` / ``false`` (JSON, YAML) are bools and work as before."""
    from sim.compare import router_spec

    name, params = router_spec("lookahead:steady_batch=False")
    with pytest.raises(ValueError, match="steady_batch: must be true or false, got 'False'"):
        make_router(name, **params)
    name, params = router_spec("lookahead:steady_batch=false")
    assert make_router(name, **params).batch_model is BatchModel.DRAIN


def test_lookahead_refill_needs_a_window_to_measure_the_arrival_rate() -> None:
    """``batch_model="refill"`` measures its arrival rate over ``pressure_window_s``; a window of 0 (prefill pressure
    off) left it no rate at all, so it priced every placement as if nothing ever arrived -- the ``drain``-like
    price under another name, silently. Refused naming both; the other models still take a window of 0."""
    with pytest.raises(ValueError, match="pressure_window_s: batch_model='refill' measures the arrival rate over it"):
        LookaheadRouter(batch_model="refill", pressure_window_s=0.0)
    for model in ("drain", "steady"):
        assert LookaheadRouter(batch_model=model, pressure_window_s=0.0).pressure_window_s == 0.0
