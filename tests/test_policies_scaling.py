"""Scaling, re-roling, admission and placement policies (capacity-side decisions) over hand-built views."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scheduler.config.models import ClusterConfig, GPUSpec
from scheduler.core.types import SLO, ClusterView, InstanceRole, InstanceSnapshot, Rejected, RequestInfo
from scheduler.policy.admission import AdmissionPolicy, Admitted, Deferred, make_admission_policy
from scheduler.policy.filters import decode_candidates, prefill_candidates
from scheduler.policy.placement import enumerate_placements, instance_profile, within_catalog
from scheduler.policy.routers_lookahead import default_latency_model
from scheduler.policy.scaling import (
    RerolePolicy,
    ScaleDecision,
    SLAScaler,
    ThresholdScaler,
    WorkloadSummary,
    decode_batch_limit,
    decode_capacity_rps,
    make_scaling_policy,
    prefill_capacity_rps,
)

M, P, D = InstanceRole.MIXED, InstanceRole.PREFILL, InstanceRole.DECODE
LAT = default_latency_model()
MODEL = LAT.model


def snap(iid: str, role: InstanceRole = M, *, used: int = 0, total: int = 100, running: int = 0,
         pending: int = 0, draining: bool = False) -> InstanceSnapshot:
    return InstanceSnapshot(iid, role, num_running=running, kv_blocks_used=used, kv_blocks_total=total,
                            prefill_tokens_pending=pending, draining=draining)


def view(*insts: InstanceSnapshot) -> ClusterView:
    return ClusterView(0.0, insts)


# ---- decisions and capacity -----------------------------------------------------------------------------------------
def test_scale_decision_needs_exactly_one_of_delta_and_target() -> None:
    ScaleDecision("decode", delta=1)
    ScaleDecision("decode", target=3)
    with pytest.raises(ValueError, match="exactly one"):
        ScaleDecision("decode")
    with pytest.raises(ValueError, match="exactly one"):
        ScaleDecision("decode", delta=1, target=2)
    with pytest.raises(ValueError, match="target"):
        ScaleDecision("decode", target=-1)


def test_capacity_functions_follow_the_latency_model() -> None:
    b = decode_batch_limit(LAT, 1000, 200, tpot_slo_s=0.05)
    a, c = LAT.decode_coeffs(b)
    assert a + c * b * 1100 <= 0.05
    a1, c1 = LAT.decode_coeffs(b + 1)
    assert a1 + c1 * (b + 1) * 1100 > 0.05  # the largest such batch
    assert decode_batch_limit(LAT, 1000, 200, tpot_slo_s=1e-4) == 0
    assert decode_batch_limit(LAT, 1000, 200, kv_tokens=11_000) == 10  # KV-bound
    assert decode_capacity_rps(LAT, 1000, 200, tpot_slo_s=0.03) < decode_capacity_rps(LAT, 1000, 200, tpot_slo_s=0.1)
    loose = prefill_capacity_rps(LAT, 2000, ttft_slo_s=5.0)
    tight = prefill_capacity_rps(LAT, 2000, ttft_slo_s=1.2 * LAT.prefill_time(2000))
    assert 0 < tight < loose <= prefill_capacity_rps(LAT, 2000)
    assert prefill_capacity_rps(LAT, 2000, ttft_slo_s=0.5 * LAT.prefill_time(2000)) == 0.0


# ---- threshold scaler -------------------------------------------------------------------------------------------------
def test_threshold_scaler_sustain_cooldown_startup_and_hysteresis() -> None:
    s = ThresholdScaler(scale_up=0.8, scale_down=0.3, sustain_s=10, cooldown_s=30, startup_delay_s=60)
    busy = view(snap("d0", D, used=90), snap("d1", D, used=95))
    assert s.decide(busy, 0.0) == []  # not sustained yet
    assert s.decide(busy, 5.0) == []
    (up,) = s.decide(busy, 10.0)
    assert up.pool == "decode" and up.delta == 1
    # Still busy, cooldown over, but the new instance is starting: it counts as capacity (2 * 0.925 / 3 < 0.8).
    assert s.decide(busy, 45.0) == [] and s.decide(busy, 59.0) == []
    # Between the thresholds: nothing (hysteresis).
    mid = view(snap("d0", D, used=50), snap("d1", D, used=60), snap("d2", D, used=55))
    assert s.decide(mid, 100.0) == [] and s.decide(mid, 200.0) == []
    idle = view(snap("d0", D, used=10, running=3), snap("d1", D, used=5, running=1), snap("d2", D, used=20, running=2))
    assert s.decide(idle, 300.0) == []
    (down,) = s.decide(idle, 310.0)
    assert down.delta == -1 and down.drain == ("d1",)
    with pytest.raises(ValueError, match="hysteresis"):
        ThresholdScaler(scale_up=0.3, scale_down=0.5)


def test_a_scale_up_met_by_taking_back_draining_instances_books_no_start() -> None:
    """Both appliers take a pool's draining instances back before starting new ones: booked as starting, those
    counted twice (up to ``startup_delay_s``: an SLA target of 10 saw 15) and blocked scale-downs meanwhile."""
    s = ThresholdScaler(scale_up=0.8, scale_down=0.3, sustain_s=0, cooldown_s=0, startup_delay_s=60)
    busy = view(snap("d0", D, used=90), snap("d1", D, used=95), snap("d2", D, used=10, draining=True))
    (up,) = s.decide(busy, 0.0)
    assert up.delta == 1 and s.starting("decode", 1.0) == 0  # d2 comes back: nothing starts
    (up,) = s.decide(view(snap("d0", D, used=90), snap("d1", D, used=95)), 2.0)
    assert s.starting("decode", 3.0) == 1  # nothing draining: a start, capacity in 60 s
    sla = SLAScaler(LAT, slo=SLO(ttft_s=1.0, tpot_s=0.05), startup_delay_s=60, cooldown_s=0, max_instances=100)
    insts = [snap(f"m{k}", used=50) for k in range(2)] + [snap(f"x{k}", draining=True) for k in range(3)]
    (d,) = sla.decide(view(*insts), 0.0, WorkloadSummary(40.0, 1000, 300))
    assert d.target is not None and d.target - 2 > 3  # more than the three draining ones
    assert sla.starting("mixed", 1.0) == d.target - 2 - 3


def test_threshold_scaler_respects_min_and_max() -> None:
    s = ThresholdScaler(sustain_s=0, cooldown_s=0, min_instances=1, max_instances=2)
    assert s.decide(view(snap("a", used=99), snap("b", used=99)), 0.0) == []  # at max
    assert s.decide(view(snap("a", used=0)), 1.0) == []  # at min


# ---- SLA scaler -----------------------------------------------------------------------------------------------------------
def test_sla_scaler_sizes_pools_from_the_latency_model() -> None:
    s = SLAScaler(LAT, slo=SLO(ttft_s=1.0, tpot_s=0.05), startup_delay_s=0, max_instances=1000)
    w = WorkloadSummary(10.0, 1000, 300)
    t1 = s.targets({"prefill", "decode"}, w)
    t2 = s.targets({"prefill", "decode"}, WorkloadSummary(40.0, 1000, 300))
    assert all(t1[k] is not None and t2[k] is not None for k in t1)
    assert 3.5 * t1["decode"] <= t2["decode"] <= 4 * t1["decode"] + 1  # type: ignore[operator]
    assert t2["prefill"] >= t1["prefill"]  # type: ignore[operator]
    stricter = SLAScaler(LAT, slo=SLO(ttft_s=1.0, tpot_s=0.02), startup_delay_s=0).targets({"decode"}, w)
    assert stricter["decode"] > t1["decode"]  # type: ignore[operator]
    assert SLAScaler(LAT, slo=SLO(tpot_s=1e-5)).targets({"decode"}, w) == {"decode": None}


@pytest.mark.parametrize("by_name", [False, True])
def test_sla_scaler_splits_a_roles_rate_over_pools_of_two_gpu_types(by_name: bool) -> None:
    """2 H100 + 4 A100 MIXED instances: keyed by pool name (the live Controller) each pool was sized for the whole
    rate (2.36x the forecast); keyed by role, every A100 counted as an H100 (3 A100s kept for 20 req/s: 11.9).
    Now the capacity asked for covers the forecast with at most one instance per pool to spare."""
    from scheduler.config.load import load_config
    from sim.cluster import build_instances

    cfg = load_config("hetero-a100-h100")
    v = ClusterView(0.0, tuple(x.make_snapshot(0.0, detail=False) for x in build_instances(cfg)))
    kw = {"pool_of": lambda i: i.instance_id.rsplit("-", 1)[0]} if by_name else {}
    w1 = WorkloadSummary(1.0, 1000, 250)
    for rate in (20.0, 60.0):
        pol = SLAScaler(config=cfg, headroom=1.0, startup_delay_s=0, cooldown_s=0, down_sustain_s=0, **kw)
        cap = {g: pol.capacity(pol._lat_of_gpu[(g, 1)], "mixed", w1, pol._eng_of_gpu[("mixed", g, 1)]) for g in ("h100", "a100")}
        size = {g: sum(i.gpu == g for i in v.instances) for g in cap}
        for d in pol.decide(v, 0.0, WorkloadSummary(rate, 1000, 250)):
            if by_name:
                size[d.pool] = d.target
            elif d.target < len(v.instances):  # one role key: drained ones go
                for iid in d.drain:
                    size[iid.rsplit("-", 1)[0]] -= 1
            else:  # new ones start from the first pool's template (H100)
                size["h100"] += d.target - len(v.instances)
        provisioned = sum(size[g] * cap[g] for g in cap)
        assert rate <= provisioned <= rate + sum(cap.values()), (rate, size)


def test_sla_scaler_scales_up_now_down_later_and_forecasts_trend() -> None:
    s = SLAScaler(LAT, slo=SLO(ttft_s=1.0, tpot_s=0.05), startup_delay_s=30, down_sustain_s=60, cooldown_s=0)
    v = view(snap("m0"))
    (up,) = s.decide(v, 0.0, WorkloadSummary(20.0, 1000, 300))
    assert up.pool == "mixed" and up.target is not None and up.target > 1
    assert s.decide(v, 1.0, WorkloadSummary(20.0, 1000, 300)) == []  # the started ones count while they boot
    big = view(*(snap(f"m{k}") for k in range(up.target)))
    assert s.decide(big, 40.0, WorkloadSummary(0.5, 1000, 300)) == []  # low load: wait down_sustain_s
    (down,) = s.decide(big, 101.0, WorkloadSummary(0.5, 1000, 300))
    assert down.target is not None and down.target < up.target and len(down.drain) == up.target - down.target
    f = SLAScaler(LAT, slo=SLO(), startup_delay_s=30)
    for t, r in ((0, 1.0), (10, 2.0), (20, 3.0), (30, 4.0)):
        pred = f.forecast(t, r)
    assert pred > 4.0  # a rising rate is extrapolated over the start-up delay
    with pytest.raises(ValueError, match="observed"):
        s.decide(v, 200.0)
    with pytest.raises(ValueError, match="latency"):
        SLAScaler()


def test_sla_scaler_from_config_and_registry() -> None:
    gpu = GPUSpec(name="a100", memory_gib=80, fp16_tflops=312, hbm_gbps=2039)
    cfg = ClusterConfig(gpus={"a100": gpu}, model=MODEL,
                        pools=[{"name": "p", "role": "prefill", "gpu": "a100"}, {"name": "d", "role": "decode",
                                                                                  "gpu": "a100"}])
    s = make_scaling_policy("sla", config=cfg)
    assert s.slo.tpot_s == 0.1  # type: ignore[attr-defined]
    assert set(s.targets({"prefill", "decode"}, WorkloadSummary(5, 500, 200))) == {"prefill", "decode"}  # type: ignore
    assert make_scaling_policy("none").decide(view(snap("a")), 0.0) == []
    with pytest.raises(ValueError, match="allowed: none, sla, threshold"):
        make_scaling_policy("magic")


# ---- re-roling ------------------------------------------------------------------------------------------------------------
def test_reroling_moves_idle_prefill_into_saturated_decode_pool() -> None:
    r = RerolePolicy(sustain_s=5, cooldown_s=30)
    v = view(snap("p0", P, pending=0), snap("p1", P, pending=500, running=1),
             snap("d0", D, used=95), snap("d1", D, used=97))
    assert r.propose(v, 0.0) == []
    (ch,) = r.propose(v, 5.0)
    assert (ch.instance_id, ch.new_role) == ("p0", D) and "decode pool saturated" in ch.reason
    assert r.propose(v, 12.0) == []  # cooldown
    lone = view(snap("p0", P), snap("d0", D, used=95))
    assert RerolePolicy(sustain_s=0).propose(lone, 0.0) == []  # keeps one instance per role
    flip = view(snap("p0", P, pending=20_000), snap("p1", P, pending=9000), snap("d0", D, used=10),
                snap("d1", D, used=5))
    (ch,) = RerolePolicy(sustain_s=0).propose(flip, 0.0)
    assert ch.instance_id == "d1" and ch.new_role is P


def test_reroling_waits_while_a_switch_is_in_flight_and_restarts_its_clock() -> None:
    r = RerolePolicy(sustain_s=5, cooldown_s=0)
    busy = (snap("d0", D, used=95), snap("d1", D, used=97))
    assert r.propose(view(snap("p0", P), snap("p1", P), snap("p2", P), *busy), 0.0) == []
    # p2 switching (draining): nothing proposed, even though the condition has held 5 s ...
    assert r.propose(view(snap("p0", P), snap("p1", P), snap("p2", P, draining=True), *busy), 5.0) == []
    # ... and the sustain clock restarts once it has landed.
    landed = view(snap("p0", P), snap("p1", P), snap("p2", D, used=96), *busy)  # still saturated
    assert r.propose(landed, 6.0) == [] and r.propose(landed, 10.0) == []
    assert len(r.propose(landed, 11.0)) == 1


def test_reroling_keeps_the_donor_pool_below_its_own_trigger() -> None:
    # Decode idle on average (0.4) but two instances' load on one would be 0.8 -> allowed at decode_high 0.9,
    # refused at decode_high 0.7 (the instance would be moved straight back).
    v = view(snap("p0", P, pending=20_000), snap("p1", P, pending=20_000), snap("d0", D, used=40),
             snap("d1", D, used=40))
    assert len(RerolePolicy(sustain_s=0).propose(v, 0.0)) == 1
    assert RerolePolicy(sustain_s=0, decode_high=0.7).propose(v, 0.0) == []


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([P, D]), st.integers(0, 120), st.integers(0, 30_000), st.booleans()),
                min_size=2, max_size=8),
       st.integers(1, 3), st.lists(st.integers(0, 120), min_size=20, max_size=20))
def test_reroling_never_leaves_a_pool_below_min_per_role(insts, min_per_role, drift) -> None:
    """Apply every proposal to the view (the instance lands in its new role at once) over many ticks with
    changing loads: each pool keeps ``min_per_role`` accepting instances whenever it had them."""
    r = RerolePolicy(sustain_s=0, cooldown_s=0, min_per_role=min_per_role)
    roles = {f"i{k}": role for k, (role, *_) in enumerate(insts)}
    for t, u in enumerate(drift):
        snaps = [snap(f"i{k}", roles[f"i{k}"], used=(used + u * k) % 121, pending=(pend * (t + 1)) % 30_001,
                      draining=drain and t % 3 == 0) for k, (_, used, pend, drain) in enumerate(insts)]
        v = view(*snaps)
        before = {role: len(v.with_role(role)) for role in (P, D)}
        for ch in r.propose(v, float(t)):
            roles[ch.instance_id] = ch.new_role
        after = view(*[snap(s.instance_id, roles[s.instance_id], draining=s.draining) for s in snaps])
        for role in (P, D):
            if before[role] >= min_per_role:
                assert len(after.with_role(role)) >= min_per_role


# ---- admission ------------------------------------------------------------------------------------------------------------
def test_admission_bounds_queues_per_priority() -> None:
    a = AdmissionPolicy(max_queued={0: 2, 1: 10}, retry_after_s=0.5, drain_rps_per_instance=1.0)
    v = view(snap("a", total=1000), snap("b", total=1000))
    r0 = RequestInfo("x", 0.0, 100, 100)
    assert isinstance(a.admit(r0, v, {0: 1}), Admitted)
    no = a.admit(r0, v, {0: 2, 1: 0})
    assert isinstance(no, Rejected) and "priority 0" in no.reason and no.retry_after_s == pytest.approx(1.0)
    assert isinstance(a.admit(RequestInfo("y", 0.0, 100, 100, priority=1), v, {0: 2}), Admitted)
    huge = a.admit(RequestInfo("z", 0.0, 20_000, 10), v, {})
    assert isinstance(huge, Rejected) and "prompt_tokens" in huge.reason and huge.retry_after_s is None
    gone = a.admit(r0, view(snap("a", draining=True)), {})
    assert isinstance(gone, Deferred) and "prefill" in gone.reason  # rule 1 (next test)
    # A decoder's KV does not hold a prompt no prefill instance can: 1000 blocks x 16 there, 100 x 16 to prefill.
    pd = view(snap("p", P, total=100), snap("d", D, total=1000))
    big = a.admit(RequestInfo("w", 0.0, 5000, 10), pd, {})
    assert isinstance(big, Rejected) and "prefill-capable" in big.reason
    # Fits only an instance draining now (a role switch, a scale-down): come back later, not "never".
    big_one_draining = view(snap("small", total=100), snap("big", total=1000, draining=True))
    later = a.admit(RequestInfo("v", 0.0, 5000, 10), big_one_draining, {})
    assert isinstance(later, Rejected) and "draining" in later.reason and later.retry_after_s == 0.5


def test_admission_defers_to_the_router_when_no_instance_accepts_a_phase() -> None:
    """Rule 1: with no accepting instance for a phase there is no queue to bound; the router decides (its fallbacks
    may still place the request, a light decoder prefilling; its refusal is the caller's UNAVAILABLE). It was a
    ``Rejected`` (or rules 2-4 over what was left) that the Ingress and the Simulator each overrode beside the
    policy."""
    a = AdmissionPolicy(max_queued={0: 0}, retry_after_s=0.5)
    r = RequestInfo("x", 0.0, 100, 100)
    full = {0: 5}
    for v in (view(snap("a", draining=True)),  # nothing accepting
              view(InstanceSnapshot("u", M, kv_blocks_total=100, healthy=False)),
              view(snap("p", P, draining=True), snap("d", D)),  # no prefill: a router may borrow the decoder
              view(snap("p", P), snap("d", D, draining=True))):  # no decode
        got = a.admit(r, v, full)
        assert isinstance(got, Deferred), (v, got)
    # A prompt no accepting instance holds too: the router's refusal answers it, not rule 2.
    assert isinstance(a.admit(RequestInfo("h", 0.0, 10**6, 1), view(snap("p", P, draining=True), snap("d", D)), {}),
                      Deferred)
    # Both phases covered: the queue bound answers.
    no = a.admit(r, view(snap("p", P), snap("d", D)), full)
    assert isinstance(no, Rejected) and "priority 0 is full" in no.reason


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([M, P, D]), st.booleans(), st.booleans()), max_size=5))
def test_admission_defers_exactly_where_the_router_has_no_candidates(insts: list) -> None:
    """Rule 1 is the named filters' test (what the callers checked beside the policy), not a copy that may drift."""
    v = view(*[InstanceSnapshot(f"i{k}", role, kv_blocks_total=100, healthy=healthy, draining=draining)
               for k, (role, healthy, draining) in enumerate(insts)])
    deferred = isinstance(AdmissionPolicy().admit(RequestInfo("x", 0.0, 10, 10), v, {}), Deferred)
    assert deferred == (not prefill_candidates(v) or not decode_candidates(v))


def test_admission_sheds_low_priority_under_overload() -> None:
    a = make_admission_policy("bounded", shed_usage=0.9, protected_priority=1)
    hot = view(snap("a", used=95), snap("b", used=92))
    assert isinstance(a.admit(RequestInfo("x", 0.0, 10, 10), hot, {}), Rejected)
    assert isinstance(a.admit(RequestInfo("x", 0.0, 10, 10, priority=1), hot, {}), Admitted)
    assert isinstance(make_admission_policy("always").admit(RequestInfo("x", 0.0, 10, 10), hot, {0: 10**9}), Admitted)
    with pytest.raises(ValueError, match="allowed: always, bounded"):
        make_admission_policy("nope")


# ---- placement ------------------------------------------------------------------------------------------------------------
GPUS = {
    "big": GPUSpec(name="big", memory_gib=80, fp16_tflops=312, hbm_gbps=2039, price_per_hour=2.0),
    "small": GPUSpec(name="small", memory_gib=16, fp16_tflops=120, hbm_gbps=300, price_per_hour=0.5, count=8),
}


def test_placement_memory_feasibility() -> None:
    w = WorkloadSummary(10, 1000, 200)
    assert instance_profile(MODEL, GPUS["small"], 1, SLO(), w) is None  # 13.5 GB of weights + reserve > 16 GiB
    assert instance_profile(MODEL, GPUS["small"], 2, SLO(), w) is not None
    assert instance_profile(MODEL, GPUS["big"], 3, SLO(), w) is None  # 32 heads do not split 3 ways


def test_catalog_bound_packs_instances_on_nodes() -> None:
    """The planner's GPU inventory rule is the config's (``GPUSpec.holds``): an instance never spans nodes, so on
    2 nodes of 8 GPUs 4 x TP3 fit (2 per node) and 5 x TP3 do not, though 15 GPUs are under 16."""
    gpus = {"a100": GPUSpec.from_catalog("a100", count=16, gpus_per_node=8), "l4": GPUSpec.from_catalog("l4")}
    assert within_catalog([("a100", 3, 4), ("a100", 2, 2), ("l4", 8, 100)], gpus)
    assert not within_catalog([("a100", 3, 5)], gpus)
    assert not within_catalog([("a100", 3, 3), ("a100", 6, 1)], gpus)  # 6 | 3+3 | 3
    assert within_catalog([("a100", 3, 5)], {"a100": GPUSpec.from_catalog("a100", count=16)})  # one node


def test_placement_enumerates_feasible_non_dominated_candidates() -> None:
    slo = SLO(ttft_s=2.0, tpot_s=0.1)
    w = WorkloadSummary(20, 1000, 250)
    cands = enumerate_placements(GPUS, MODEL, slo, w)
    assert cands and cands == sorted(cands, key=lambda c: (c.cost_per_hour, c.num_gpus, -c.capacity_rps))
    assert {c.mode for c in cands} == {"colocated", "disaggregated"}
    for c in cands:
        assert c.capacity_rps >= w.rate_rps
        assert sum(p.num_gpus for p in c.pools if p.gpu == "small") <= 8  # catalog count
        for o in cands:  # nothing kept is dominated within its mode
            if o is not c and o.mode == c.mode:
                assert not (o.cost_per_hour <= c.cost_per_hour and o.num_gpus <= c.num_gpus
                            and o.capacity_rps > c.capacity_rps)
        specs = c.to_pool_specs()
        assert [s.count for s in specs] == [p.count for p in c.pools]
    unpruned = enumerate_placements(GPUS, MODEL, slo, w, prune=False)
    assert len(unpruned) > len(cands)
    busier = enumerate_placements(GPUS, MODEL, slo, WorkloadSummary(60, 1000, 250))
    assert busier[0].cost_per_hour > cands[0].cost_per_hour
    with pytest.raises(ValueError, match="modes"):
        enumerate_placements(GPUS, MODEL, slo, w, modes=("pipelined",))


def test_placement_names_gpus_by_the_catalogs_keys() -> None:
    """A config names GPU types by key ("a100"), not by GPUSpec.name ("A100-80GB"): candidates name them the same
    way (it raised KeyError in the catalog check, and to_pool_specs would have named no GPU of the config)."""
    gpus = {"a100": GPUSpec.from_catalog("a100"), "h100": GPUSpec.from_catalog("h100")}
    assert gpus["a100"].name != "a100"
    cands = enumerate_placements(gpus, MODEL, SLO(ttft_s=2.0, tpot_s=0.1), WorkloadSummary(20, 1000, 250))
    assert cands and {p.gpu for c in cands for p in c.pools} <= {"a100", "h100"}
    assert {s.gpu for c in cands for s in c.to_pool_specs()} <= {"a100", "h100"}


# ---- test-suite audit: rules the tests above did not pin (each names the mutant it kills) -------------------------
def test_capacity_formulas_hold_their_queueing_and_littles_law_bounds() -> None:
    """``prefill_capacity_rps`` under a TTFT SLO runs at the utilisation where the M/D/1 mean wait plus the service
    time is exactly the SLO (kills the bound's factor 2 dropped: a stricter rho still passed ``0 < tight < loose``);
    ``decode_capacity_rps`` is Little's law at the SLO batch times ``max_utilization`` (kills dropping the factor);
    ``mixed_capacity_rps`` time-shares the two phases (kills ``min`` for the harmonic combination)."""
    from scheduler.policy.scaling import mixed_capacity_rps

    s = LAT.prefill_time(2000)
    rho = 0.9 * prefill_capacity_rps(LAT, 2000, ttft_slo_s=1.2 * s) / prefill_capacity_rps(LAT, 2000)
    assert s + rho * s / (2 * (1 - rho)) == pytest.approx(1.2 * s)
    b = decode_batch_limit(LAT, 1000, 200, tpot_slo_s=0.05)
    a, c = LAT.decode_coeffs(b)
    for util in (0.9, 0.45):
        assert decode_capacity_rps(LAT, 1000, 200, tpot_slo_s=0.05, max_utilization=util) == pytest.approx(
            util * b / (200 * (a + c * b * 1100)))
    assert mixed_capacity_rps(2.0, 2.0) == pytest.approx(1.0) and mixed_capacity_rps(3.0, 6.0) == pytest.approx(2.0)
    assert mixed_capacity_rps(3.0, 0.0) == 0.0


def test_threshold_scaler_boundaries_cooldown_step_and_sustain_restart() -> None:
    """Mean virtual usage *at* ``scale_up`` / ``scale_down`` triggers (kills ``>=``/``<=`` -> ``>``/``<``); ``cooldown_s``
    holds a second action (kills skipping it: the test above only saw start-up capacity hold it); the step is capped
    at ``max_instances`` / ``min_instances`` (kills ``d = step``); after an action the sustain clock restarts (kills
    keeping the old start); no scale-down while instances are starting (kills dropping ``not starting``)."""
    at_up = view(snap("d0", D, used=80))
    assert ThresholdScaler(sustain_s=0, cooldown_s=0).decide(at_up, 0.0)[0].delta == 1
    (down,) = ThresholdScaler(sustain_s=0, cooldown_s=0, min_instances=0).decide(view(snap("d0", D, used=30)), 0.0)
    assert down.delta == -1
    busy = view(snap("d0", D, used=90), snap("d1", D, used=95))
    s = ThresholdScaler(sustain_s=0, cooldown_s=30, startup_delay_s=0)
    assert len(s.decide(busy, 0.0)) == 1 and s.decide(busy, 10.0) == [] and len(s.decide(busy, 30.0)) == 1
    (up,) = ThresholdScaler(sustain_s=0, cooldown_s=0, step=3, max_instances=4).decide(busy, 0.0)
    assert up.delta == 2
    idle = view(snap("d0", D, used=1), snap("d1", D, used=2), snap("d2", D, used=3))
    (down,) = ThresholdScaler(sustain_s=0, cooldown_s=0, step=3, min_instances=1).decide(idle, 0.0)
    assert down.delta == -2 and down.drain == ("d0", "d1")
    s = ThresholdScaler(sustain_s=10, cooldown_s=0, startup_delay_s=0)
    assert s.decide(busy, 0.0) == [] and len(s.decide(busy, 10.0)) == 1
    assert s.decide(busy, 11.0) == [] and len(s.decide(busy, 21.0)) == 1
    s = ThresholdScaler(sustain_s=0, cooldown_s=0, startup_delay_s=60)
    assert len(s.decide(busy, 0.0)) == 1
    assert s.decide(view(snap("d0", D), snap("d1", D)), 1.0) == []  # idle, but one is still starting


def test_scale_down_drains_the_least_kv_among_equally_busy() -> None:
    """``_least_loaded`` breaks ties in outstanding requests by KV in use (kills dropping the second key)."""
    idle = view(snap("d0", D, used=20, running=1), snap("d1", D, used=5, running=1))
    (down,) = ThresholdScaler(sustain_s=0, cooldown_s=0).decide(idle, 0.0)
    assert down.drain == ("d1",)


def test_an_unhealthy_draining_instance_is_not_taken_back() -> None:
    """A scale-up is met first by the pool's draining instances -- healthy ones only: a dead one cannot come back,
    so the new instance is booked as starting (kills ``draining()`` counting unhealthy instances)."""
    import dataclasses

    dead = dataclasses.replace(snap("d2", D, used=10, draining=True), healthy=False)
    s = ThresholdScaler(scale_up=0.8, scale_down=0.3, sustain_s=0, cooldown_s=0, startup_delay_s=60)
    (up,) = s.decide(view(snap("d0", D, used=90), snap("d1", D, used=95), dead), 0.0)
    assert up.delta == 1 and s.starting("decode", 1.0) == 1


def test_scaling_policy_validates_min_instances() -> None:
    """Kills dropping ``0 <=`` from the check: a negative floor was accepted."""
    with pytest.raises(ValueError, match="min_instances"):
        ThresholdScaler(min_instances=-1)


def test_sla_scaler_headroom_floor_cooldown_and_down_clock() -> None:
    """``SLAScaler``: ``headroom`` scales the rate it sizes for (kills dropping it in ``targets``); ``min_instances``
    is a floor on the target (kills dropping the ``max``); ``cooldown_s`` holds a second scale-up (kills dropping
    it); no scale-down while instances start (kills dropping ``not starting``); the down-sustain clock restarts
    when the load is back at the target (kills dropping the ``else: pop``)."""
    w = WorkloadSummary(40.0, 1000, 300)
    slo = SLO(ttft_s=1.0, tpot_s=0.05)
    one = SLAScaler(LAT, slo=slo, headroom=1.0, max_instances=1000).targets({"decode"}, w)["decode"]
    two = SLAScaler(LAT, slo=slo, headroom=2.0, max_instances=1000).targets({"decode"}, w)["decode"]
    assert one is not None and two is not None and 2 * one - 1 <= two <= 2 * one and two > one
    floor = SLAScaler(LAT, slo=slo, min_instances=2, startup_delay_s=0, cooldown_s=0)
    (d,) = floor.decide(view(snap("m0")), 0.0, WorkloadSummary(0.01, 1000, 300))
    assert d.target == 2
    s = SLAScaler(LAT, slo=slo, startup_delay_s=0, cooldown_s=10, smoothing=1.0, trend_smoothing=0.0)
    assert len(s.decide(view(snap("m0")), 0.0, WorkloadSummary(20.0, 1000, 300))) == 1
    assert s.decide(view(snap("m0")), 1.0, WorkloadSummary(20.0, 1000, 300)) == []  # cooling down
    assert len(s.decide(view(snap("m0")), 10.0, WorkloadSummary(20.0, 1000, 300))) == 1
    s = SLAScaler(LAT, slo=slo, startup_delay_s=30, cooldown_s=0, down_sustain_s=0, smoothing=1.0,
                  trend_smoothing=0.0)
    assert len(s.decide(view(snap("m0")), 0.0, WorkloadSummary(20.0, 1000, 300))) == 1
    assert s.decide(view(snap("m0")), 1.0, WorkloadSummary(0.01, 1000, 300)) == []  # the new ones still start
    s = SLAScaler(LAT, slo=slo, startup_delay_s=0, cooldown_s=0, down_sustain_s=60, smoothing=1.0,
                  trend_smoothing=0.0)
    n = s.targets({"mixed"}, WorkloadSummary(20.0, 1000, 300))["mixed"]
    assert n is not None and n > 1
    big = view(*(snap(f"m{k}") for k in range(n)))
    low, at_target = WorkloadSummary(0.5, 1000, 300), WorkloadSummary(20.0, 1000, 300)
    assert s.decide(big, 0.0, low) == [] and s.decide(big, 30.0, at_target) == []
    assert s.decide(big, 70.0, low) == []  # the clock restarted at 70 s, not 0 s
    assert len(s.decide(big, 130.0, low)) == 1


def test_sla_forecast_never_goes_negative() -> None:
    """A falling rate extrapolated over the start-up delay is clamped at 0 (kills dropping the ``max(..., 0)``)."""
    f = SLAScaler(LAT, slo=SLO(), startup_delay_s=60)
    preds = [f.forecast(t, r) for t, r in ((0, 10.0), (10, 5.0), (20, 0.0), (30, 0.0))]
    assert preds[-1] == 0.0 and min(preds) >= 0.0


def test_reroling_conditions_each_hold_their_own() -> None:
    """``RerolePolicy``: to-decode needs the prefill pool idle (kills dropping ``pre_q <= prefill_low_tokens``) and
    the donor prefill pool below its trigger with one instance fewer (kills dropping that check; only the
    to-prefill one was tested); to-prefill needs the decode pool idle (kills dropping ``dec_vu <= decode_low``);
    one change per ``cooldown_s`` (kills dropping the cooldown: ``sustain_s`` alone held the existing check)."""
    sat = (snap("d0", D, used=95), snap("d1", D, used=97))
    busy_prefill = view(snap("p0", P, pending=2000), snap("p1", P, pending=2000), *sat)
    assert RerolePolicy(sustain_s=0).propose(busy_prefill, 0.0) == []
    near = view(snap("p0", P, pending=1000), snap("p1", P, pending=1000), *sat)
    assert len(RerolePolicy(sustain_s=0).propose(near, 0.0)) == 1
    assert RerolePolicy(sustain_s=0, prefill_high_tokens=1500).propose(near, 0.0) == []  # 2000 / instance after
    half = view(snap("p0", P, pending=20_000), snap("p1", P, pending=20_000),
                *(snap(f"d{k}", D, used=50) for k in range(4)))
    assert RerolePolicy(sustain_s=0).propose(half, 0.0) == []  # decode at 0.5 > decode_low 0.4
    r = RerolePolicy(sustain_s=0, cooldown_s=30)
    assert len(r.propose(near, 0.0)) == 1 and r.propose(near, 10.0) == [] and len(r.propose(near, 30.0)) == 1


def test_a_pd_pair_ships_prompts_at_its_slower_links_rate() -> None:
    """The planner's analytic pass capped a PREFILL pool's capacity by its own GPU's link only: prefill on a fast-NIC
    GPU paired with decoders on a slow-NIC one counted the handoff at the fast end, where every clock times it over
    the slower (``kv_link``)."""
    from scheduler.policy.placement import pair_prefill_rps

    fast = GPUSpec.from_catalog("h100")
    slow = fast.model_copy(update={"name": "h100-slow-nic", "network_gbps": fast.network_gbps / 100})
    w = WorkloadSummary(20, 1000, 250)
    slo = SLO(ttft_s=2.0, tpot_s=0.1)
    pf, ps = (instance_profile(MODEL, g, 1, slo, w) for g in (fast, slow))
    assert ps.transfer_rps < pf.prefill_rps < pf.transfer_rps  # the slow link is what limits a pair
    assert pair_prefill_rps(pf, ps) == pytest.approx(ps.transfer_rps)
    assert pair_prefill_rps(pf, pf) == pytest.approx(min(pf.prefill_rps, pf.transfer_rps))
    cands = enumerate_placements({"fast": fast, "slow": slow}, MODEL, slo, w, modes=("disaggregated",),
                                 heterogeneous=True, prune=False)
    for c in cands:
        pre, dec = c.pools
        per = pair_prefill_rps(*(instance_profile(MODEL, {"fast": fast, "slow": slow}[p.gpu], p.tp, slo, w)
                                 for p in (pre, dec)))
        assert c.capacity_rps <= pre.count * per + 1e-6
