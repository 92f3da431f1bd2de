"""Engine model and simulator core: closed-form stepping is exact; invariants hold on random workloads."""

from __future__ import annotations

import re

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scheduler.config.models import ClusterConfig, EngineSpec, GPUSpec, ModelSpec, PoolSpec
from scheduler.core.types import ClusterView, InstanceRole, Rejected
from scheduler.engine_model import EngineModel
from scheduler.latency import roofline_model
from scheduler.policy.route import RouteDecision, Router
from sim.simulator import Simulator, Workload

MODEL = ModelSpec(
    name="llama2-7b", num_layers=32, hidden_size=4096, num_heads=32, num_kv_heads=32,
    intermediate_size=11008, vocab_size=32000,
)
GPU = GPUSpec(name="a100", memory_gib=80, fp16_tflops=312, hbm_gbps=2039, price_per_hour=2.0)


def config(
    n: int = 1, *, blocks: int | None = None, budget: int = 512, block_size: int = 16, pd: tuple[int, int] | None = None
) -> ClusterConfig:
    eng = EngineSpec(block_size=block_size, max_num_batched_tokens=budget, max_num_seqs=64, num_kv_blocks=blocks)
    if pd:
        pools = [
            PoolSpec(name="p", role=InstanceRole.PREFILL, gpu="a100", count=pd[0], engine=eng),
            PoolSpec(name="d", role=InstanceRole.DECODE, gpu="a100", count=pd[1], engine=eng),
        ]
    else:
        pools = [PoolSpec(name="m", gpu="a100", count=n, engine=eng)]
    return ClusterConfig(gpus={"a100": GPU}, model=MODEL, pools=pools)


def random_workload(seed: int, n: int, *, rate: float, max_prompt: int = 400, max_out: int = 120) -> Workload:
    rng = np.random.default_rng(seed)
    return Workload(
        np.cumsum(rng.exponential(1 / rate, n)),
        rng.integers(1, max_prompt, n),
        rng.integers(1, max_out, n),
    )


def run_both(cfg: ClusterConfig, w: Workload, router: str = "round_robin"):
    fast = Simulator(cfg, router=router, closed_form=True).run(w)
    slow = Simulator(cfg, router=router, closed_form=False).run(w)
    return fast, slow


def assert_same_timings(fast, slow) -> None:
    for col in ("first_token_s", "finish_s", "admit_s"):
        a, b = getattr(fast, col), getattr(slow, col)
        assert np.array_equal(np.isnan(a), np.isnan(b)), col
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12, err_msg=col)
    assert np.array_equal(fast.preemptions, slow.preemptions)
    assert np.array_equal(fast.instance, slow.instance)


@pytest.mark.parametrize("router", ["round_robin", "least_outstanding"])
@pytest.mark.parametrize("seed", range(6))
def test_closed_form_matches_naive_stepping(seed: int, router: str) -> None:
    # Small KV on purpose: preemptions and admission stalls happen, and spans must stop before them. A router that
    # reads load sees the same in both: a single step's outcome shows at its end, as a span's does (it showed at
    # the step's start, so least-outstanding chose differently one step early).
    cfg = config(2, blocks=60 + 20 * seed, block_size=16)
    w = random_workload(seed, 300, rate=8.0 + seed)
    fast, slow = run_both(cfg, w, router)
    assert_same_timings(fast, slow)
    assert fast.events < slow.events  # the point of the fast path


def test_closed_form_exact_under_pd_disaggregation() -> None:
    w = random_workload(7, 300, rate=12.0)
    fast, slow = run_both(config(pd=(1, 2), blocks=200), w)
    assert_same_timings(fast, slow)
    assert fast.kv_transfers == np.sum(w.output_tokens > 1)


class _Pair(Router):
    """Prefill on the first instance, decode on the second: a P/D pair whose prefill side is MIXED."""

    name = "pair"

    def __init__(self) -> None:
        self.views: list[ClusterView] = []

    def route(self, request, view):  # type: ignore[override]
        self.views.append(view)
        return RouteDecision(view.instances[0].instance_id, view.instances[1].instance_id)


def test_a_pair_from_a_mixed_instance_hands_the_kv_off_to_its_decoder() -> None:
    # The live ingress hands off whenever the router names a decoder; the simulator ran such a pair colocated on a
    # MIXED prefill instance and ignored the decoder (a third of learned's placements on the Mooncake tier as P/D).
    w = random_workload(2, 40, rate=4.0)
    res = Simulator(config(2, blocks=400), router=_Pair()).run(w)
    assert np.isfinite(res.finish_s).all()
    assert res.kv_transfers == np.sum(w.output_tokens > 1)
    assert res.instance_busy_s[1] > 0  # the decoder decoded


def test_the_view_tells_decodes_on_their_way_from_queued_prompts_on_a_mixed_decoder() -> None:
    """Requests whose KV is on its way to a MIXED decoder wait there with its queued prompts; the snapshot says how
    many of its ``num_waiting`` they are (``num_incoming``), as the live ingress's view does."""
    w = random_workload(2, 60, rate=40.0)
    r = _Pair()
    Simulator(config(2, blocks=400), router=r).run(w)
    dec = [v.instances[1] for v in r.views]
    assert all(0 <= d.num_incoming <= d.num_waiting for d in dec)
    assert max(d.num_incoming for d in dec) >= 2  # a burst: several on their way at once
    assert all(v.instances[0].num_incoming == 0 for v in r.views)  # the prefill side gets none


def test_a_prefill_only_placement_decodes_where_the_re_route_says_colocated_too() -> None:
    """Prefilled on a PREFILL instance with no decoder named, a request is re-routed at its handoff; an answer
    naming one MIXED instance (colocated) means "decode there" -- it was taken for a refusal and the request lost."""
    eng = EngineSpec(block_size=16, max_num_batched_tokens=512, max_num_seqs=64, num_kv_blocks=400)
    pools = [PoolSpec(name="p", role=InstanceRole.PREFILL, gpu="a100", count=1, engine=eng),
             PoolSpec(name="m", role=InstanceRole.MIXED, gpu="a100", count=1, engine=eng)]

    class PrefillThenMixed(Router):
        name = "prefill_then_mixed"

        def route(self, request, view):  # type: ignore[override]
            return RouteDecision("m-0" if request.accepted else "p-0")

    w = Workload(np.array([0.0, 0.2]), np.array([300, 200]), np.array([50, 40]))
    res = Simulator(ClusterConfig(gpus={"a100": GPU}, model=MODEL, pools=pools), router=PrefillThenMixed()).run(w)
    assert not res.rejected.any() and np.isfinite(res.finish_s).all()
    assert (res.decode_instance == 1).all() and res.kv_transfers == 2


def test_a_handed_off_request_keeps_its_priority_and_length_guess_on_the_decoder() -> None:
    w = Workload(np.array([0.0, 0.5]), np.array([300, 10]), np.array([400, 5]), priority=np.array([2, 0]),
                 predicted_output=np.array([300.0, 5.0]))
    r = _Pair()
    Simulator(config(2, blocks=400), router=r).run(w)
    dec = r.views[1].instances[1]  # request 0 decodes there when request 1 arrives
    assert dec.num_decoding == 1 and 0 < dec.predicted_remaining_tokens < 300


def test_a_handoff_that_does_not_fit_its_decoder_is_refused_not_a_crash() -> None:
    eng = EngineSpec(block_size=16, max_num_batched_tokens=512, max_num_seqs=64)
    pools = [PoolSpec(name="p", role=InstanceRole.PREFILL, gpu="a100", count=1, engine=eng),
             PoolSpec(name="d", role=InstanceRole.DECODE, gpu="a100", count=1,
                      engine=eng.model_copy(update={"num_kv_blocks": 64}))]  # 1024 tokens
    w = Workload(np.array([0.0, 0.1]), np.array([900, 100]), np.array([400, 50]))  # the first fits only the prefill side
    res = Simulator(ClusterConfig(gpus={"a100": GPU}, model=MODEL, pools=pools), router="least_outstanding").run(w)
    assert res.rejected.tolist() == [True, False] and np.isfinite(res.finish_s[1])


def test_a_router_sees_the_time_it_routes_at() -> None:
    # After a refusal nothing changed and the view's snapshots are reused, but its time is the arrival's (lookahead
    # decays its prefill pressure by it; it read the first refusal's time).
    class Refuse(_Pair):
        def route(self, request, view):  # type: ignore[override]
            self.views.append(view)
            return Rejected("full")

    r = Refuse()
    Simulator(config(2, blocks=400), router=r).run(Workload(np.array([0.0, 0.3, 0.6]), np.array([100] * 3),
                                                             np.array([10] * 3)))
    assert [v.time_s for v in r.views] == [0.0, 0.3, 0.6]


def test_preemptions_happen_and_everyone_finishes() -> None:
    res = Simulator(config(1, blocks=40), router="round_robin").run(random_workload(3, 200, rate=30.0))
    assert res.preemptions.sum() > 0
    assert np.isfinite(res.finish_s).all()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 10_000),
    n=st.integers(1, 80),
    blocks=st.integers(40, 200),
    budget=st.sampled_from([64, 256, 2048]),
    router=st.sampled_from(["round_robin", "random", "least_outstanding"]),
)
def test_no_request_lost_or_duplicated_and_time_monotone(seed, n, blocks, budget, router) -> None:
    w = random_workload(seed, n, rate=20.0, max_prompt=300, max_out=60)
    res = Simulator(config(2, blocks=blocks, budget=budget), router=router).run(w)
    done = np.isfinite(res.finish_s)
    assert done.sum() + res.rejected.sum() == n  # each request ends exactly once
    assert not (done & res.rejected).any()
    # causality: arrival <= admission <= first token <= finish
    assert (res.admit_s[done] >= w.arrival_s[done] - 1e-12).all()
    assert (res.first_token_s[done] >= res.admit_s[done]).all()
    assert (res.finish_s[done] >= res.first_token_s[done]).all()


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), blocks=st.integers(20, 120), steps=st.integers(1, 400))
def test_kv_never_over_allocated(seed: int, blocks: int, steps: int) -> None:
    rng = np.random.default_rng(seed)
    eng = EngineModel(roofline_model(MODEL, GPU, 1), EngineSpec(block_size=16, max_num_batched_tokens=256,
                                                                 num_kv_blocks=blocks))
    tokens_out = 0
    for i in range(20):
        p, o = int(rng.integers(1, 200)), int(rng.integers(1, 100))
        if -(-(p + o) // 16) <= blocks:
            eng.add_request(str(i), p, o)
            tokens_out += o
    produced = 0
    for _ in range(steps):
        if not eng.has_work:
            break
        r = eng.step()
        assert eng.blocks_used() <= eng.total_blocks
        produced += r.decoded + len(r.first_token)
    if not eng.has_work:
        # recompute-preemption never loses or duplicates output tokens
        assert produced == tokens_out


def assert_predicted_sum_is_per_request(eng: EngineModel) -> None:
    """The O(1) ``predicted_remaining_tokens`` equals the sum a detailed snapshot lists over the decode batch, and
    ``num_predicted`` the decode-batch requests it lists with a guess (spent or not)."""
    snap = eng.snapshot("x", 0.0, detail=True)
    per = sum(r.predicted_remaining for r in snap.requests if not r.in_prefill and r.predicted_remaining)
    assert snap.predicted_remaining_tokens == pytest.approx(per, abs=1e-6)
    guessed = sum(1 for r in snap.requests if not r.in_prefill and r.predicted_remaining is not None)
    assert snap.num_predicted == guessed


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), blocks=st.integers(30, 200))
def test_snapshot_predicted_remaining_is_predicted_minus_generated(seed: int, blocks: int) -> None:
    """The O(1) aggregate equals the per-request sum a detailed snapshot (and the live instance) reports,
    through spans, preemptions and a migration's detach/re-add (exact predictions: nobody outlives one)."""
    rng = np.random.default_rng(seed)
    eng = EngineModel(roofline_model(MODEL, GPU, 1), EngineSpec(block_size=16, max_num_batched_tokens=256,
                                                                 num_kv_blocks=blocks))
    for i in range(12):
        p, o = int(rng.integers(1, 150)), int(rng.integers(2, 120))
        if -(-(p + o) // 16) <= blocks:
            eng.add_request(str(i), p, o, predicted_remaining=float(o) if i % 3 else None)

    for k in range(400):
        if not eng.has_work:
            break
        span = eng.plan_span()
        eng.advance(span, span.steps) if span is not None else eng.step()
        assert_predicted_sum_is_per_request(eng)
        if k == 5 and eng.decoding:  # a migration: detach, re-add elsewhere (here: back) with what is left
            seq = eng.detach(next(iter(eng.decoding)))
            assert seq is not None
            eng.add_request(seq.rid, seq.num_tokens, seq.max_new, cached_tokens=seq.num_tokens - 1,
                            predicted_remaining=seq.predicted_remaining)
            assert_predicted_sum_is_per_request(eng)


def test_decode_span_time_is_arithmetic_series() -> None:
    lm = roofline_model(MODEL, GPU, 1)
    eng = EngineModel(lm, EngineSpec(num_kv_blocks=4000))
    for i in range(4):
        eng.add_request(str(i), 100, 50, cached_tokens=99)  # P->D style: context cached, decode at once
    first = eng.step()  # admits all four straight into the decode batch
    assert first.decoded == 4 and first.duration_s == lm.step_time(decode_batch=4, decode_context=4 * 100)
    span = eng.plan_span()
    assert span is not None and span.steps == 49
    t = sum(lm.step_time(decode_batch=4, decode_context=4 * 101 + 4 * j) for j in range(span.steps))
    assert span.duration_s == pytest.approx(t, rel=1e-12)
    assert eng.prompt_tokens_computed == 0 and eng.prompt_tokens_loaded == 4 * 99


def test_prefill_role_hands_off_after_first_token() -> None:
    eng = EngineModel(roofline_model(MODEL, GPU, 1), EngineSpec(), role=InstanceRole.PREFILL)
    eng.add_request("a", 300, 100)
    r = eng.step()
    assert [s.rid for s in r.prefill_done] == ["a"] and not eng.has_work
    assert eng.blocks_used() == 0


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"prompt_tokens": 0, "max_tokens": 1}, "prompt_tokens"),
        ({"prompt_tokens": 5, "max_tokens": 0}, "max_tokens"),
        ({"prompt_tokens": 5, "max_tokens": 1, "cached_tokens": 6}, "cached_tokens"),
        ({"prompt_tokens": 10**7, "max_tokens": 1}, "prompt_tokens+max_tokens"),
    ],
)
def test_bad_requests_name_the_field(kwargs, field) -> None:
    eng = EngineModel(roofline_model(MODEL, GPU, 1), EngineSpec())
    with pytest.raises(ValueError, match=re.escape(field)):
        eng.add_request("x", **kwargs)
    assert not eng.has_work  # nothing half-added


def test_decode_never_beats_hbm_roofline() -> None:
    lm = roofline_model(MODEL, GPU, 1)
    for bs in (1, 8, 64, 256):
        for ctx in (128, 1024, 4096):
            assert lm.step_time(decode_batch=bs, decode_context=bs * ctx) >= lm.hbm_floor(bs, bs * ctx)
