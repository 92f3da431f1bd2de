"""Migration policy over hand-built ClusterViews, and the multi-stage copy sizes both sim and live path use."""

from __future__ import annotations

import dataclasses
import itertools
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scheduler.core.types import ClusterView, InstanceRole, InstanceSnapshot, RequestLoad
from scheduler.policy.migration import (
    LlumnixMigrationPolicy,
    MigrationPlan,
    MigrationReason,
    make_migration_policy,
    migration_cost,
    migration_stages,
)

D, M = InstanceRole.DECODE, InstanceRole.MIXED


def rl(rid: str, ctx: int = 160, rem: float | None = 50.0, prio: int = 0, prefill: bool = False) -> RequestLoad:
    return RequestLoad(rid, ctx, 10, rem, prio, prefill)


def inst(iid: str, reqs: tuple[RequestLoad, ...] = (), *, used: int | None = None, total: int = 100,
         waiting: int = 0, pending: int = 0, role: InstanceRole = D, draining: bool = False,
         healthy: bool = True) -> InstanceSnapshot:
    if used is None:
        used = sum(-(-r.context_tokens // 16) for r in reqs)
    return InstanceSnapshot(iid, role, num_running=len(reqs) - waiting, num_waiting=waiting,
                            num_decoding=sum(not r.in_prefill for r in reqs), kv_blocks_used=used,
                            kv_blocks_total=total, block_size=16, prefill_tokens_pending=pending,
                            requests=reqs, draining=draining, healthy=healthy)


def view(*insts: InstanceSnapshot, t: float = 0.0) -> ClusterView:
    return ClusterView(t, insts)


def hot(n: int = 6, iid: str = "hot") -> InstanceSnapshot:
    # 6 requests x 160 tokens = 60 blocks + 30 more in use: virtual usage 0.9 > 0.8. The first has the longest
    # remaining (10 * n tokens): the same copy frees its KV the longest, so it is the one to move.
    return inst(iid, tuple(rl(f"{iid}{k}", rem=10.0 * (n - k)) for k in range(n)), used=90)


# ---- stage sizes -------------------------------------------------------------------------------------------------
def test_stages_shrink_geometrically_and_last_respects_limit() -> None:
    s = migration_stages(10_000, decode_rate_tok_s=50.0, bandwidth_tok_s=500.0, max_stages=6,
                         last_stage_max_tokens=20)
    assert s[0] == 10_000 and s[-1] <= 20
    for a, b in itertools.pairwise(s):
        assert b == max(math.ceil(a * 50 / 500), 1)  # each stage = tokens produced during the previous one
        assert b <= a * 0.1 + 1
    assert all(x > 20 for x in s[:-1])  # stops as soon as a stage is small enough
    assert migration_stages(15, decode_rate_tok_s=50, bandwidth_tok_s=500) == [15]  # stop-and-copy at once
    assert migration_stages(0, decode_rate_tok_s=50, bandwidth_tok_s=500) == []
    # Decoding faster than the link: cannot converge; stages run out and the downtime stays large.
    bad = migration_stages(1000, decode_rate_tok_s=600, bandwidth_tok_s=500, max_stages=3, last_stage_max_tokens=20)
    assert len(bad) == 3 and bad[-1] > 20


def test_migration_cost_and_validation() -> None:
    c = migration_cost(10_000, decode_rate_tok_s=50.0, bandwidth_tok_s=500.0, latency_s=0.01, max_stages=6,
                       last_stage_max_tokens=20)
    assert c.total_s == pytest.approx(sum(0.01 + s / 500 for s in c.stages))
    assert c.downtime_s == pytest.approx(0.01 + c.stages[-1] / 500) and c.downtime_s < c.total_s / 100
    for kw, msg in (({"bandwidth_tok_s": 0}, "bandwidth"), ({"decode_rate_tok_s": -1}, "decode_rate"),
                    ({"max_stages": 0}, "max_stages"), ({"last_stage_max_tokens": -1}, "last_stage")):
        args = {"decode_rate_tok_s": 1.0, "bandwidth_tok_s": 10.0} | kw
        with pytest.raises(ValueError, match=msg):
            migration_stages(100, **args)  # type: ignore[arg-type]


# ---- triggers ------------------------------------------------------------------------------------------------------
def test_load_balance_moves_longest_remaining_to_least_loaded() -> None:
    p = LlumnixMigrationPolicy()
    plans = p.plan(view(hot(), inst("mid", (rl("m0"),), used=55), inst("cold", (rl("c0"),), used=20)), 0.0)
    assert plans == [MigrationPlan("hot0", "hot", "cold", MigrationReason.LOAD_BALANCE)]
    # Nothing above the high watermark: nothing moves.
    assert LlumnixMigrationPolicy().plan(view(inst("a", (rl("a0"),), used=70), inst("b", used=10)), 0.0) == []
    with pytest.raises(ValueError, match="choose"):
        LlumnixMigrationPolicy(choose="random")


def test_load_balance_is_relative_to_the_source() -> None:
    """Under a burst every instance is busy: a fixed low watermark (0.5) found no destination; the gap rule moves
    work from 0.9 to 0.65 but not to 0.71 (closer than ``balance_gap``), nor past the high watermark.

    (Audit: "near" was at 0.75 of 100 blocks, where the 10-block request already pushed it past the high watermark,
    and "x" had too little free KV for the request: the gap and the watermark rules could be deleted and the test
    passed. Each case now fails only on its own rule.)"""
    warm = inst("warm", (rl("w0"),), used=65)
    assert LlumnixMigrationPolicy(low_watermark=0.5).plan(view(hot(), warm), 0.0) == []
    assert LlumnixMigrationPolicy().plan(view(hot(), warm), 0.0) == [
        MigrationPlan("hot0", "hot", "warm", MigrationReason.LOAD_BALANCE)]
    assert LlumnixMigrationPolicy().plan(view(hot(), inst("near", (rl("n0"),), used=710, total=1000)), 0.0) == []
    # The destination would end above the high watermark (0.62 + a 60-block request = 0.92; 76 blocks free, room
    # enough for it): no move.
    big = inst("big", (rl("b0", ctx=960, rem=1.0),), used=90)
    assert LlumnixMigrationPolicy().plan(view(big, inst("x", (rl("x0"),), used=124, total=200)), 0.0) == []
    with pytest.raises(ValueError, match="balance_gap"):
        LlumnixMigrationPolicy(balance_gap=0.0)


def test_destination_is_never_draining_unhealthy_or_short_of_kv() -> None:
    p = LlumnixMigrationPolicy(max_concurrent=8, max_per_instance=8, max_plans=8)
    others = (inst("drain", draining=True), inst("sick", healthy=False),
              inst("tight", (rl("t0"),), used=46, total=50),  # 4 blocks free < 10 for ctx 160 + headroom
              inst("pre", role=InstanceRole.PREFILL))
    assert p.plan(view(hot(), *others), 0.0) == []
    plans = LlumnixMigrationPolicy(max_concurrent=8, max_per_instance=8, max_plans=8).plan(
        view(hot(), *others, inst("ok", total=100)), 0.0)
    assert plans and {x.destination for x in plans} == {"ok"}


def test_rate_limits_stop_thrashing() -> None:
    p = LlumnixMigrationPolicy(max_concurrent=1, cooldown_s=5.0, min_gap_s=1.0, request_cooldown_s=100.0)
    v = view(hot(), hot(iid="hot2"), inst("c1"), inst("c2"))
    first = p.plan(v, 0.0)
    assert len(first) == 1  # max_concurrent
    assert p.plan(v, 0.5) == []  # min gap
    assert p.plan(v, 2.0) == []  # still in flight (the request is still on its source)
    moved = first[0]
    src = next(i for i in v.instances if i.instance_id == moved.source)
    gone = inst(src.instance_id, tuple(r for r in src.requests if r.request_id != moved.request_id), used=80)
    v2 = view(*(gone if i.instance_id == src.instance_id else i for i in v.instances))
    nxt = p.plan(v2, 3.0)  # in flight cleared; the touched instances rest, the other hot one may go
    assert len(nxt) == 1 and moved.source not in (nxt[0].source, nxt[0].destination)
    assert moved.destination not in (nxt[0].source, nxt[0].destination)
    # A finished migration can be reported; the request itself is not moved again soon.
    p.on_migration_done(nxt[0].request_id, ok=True)
    later = p.plan(v2, 20.0)
    assert moved.request_id not in {x.request_id for x in later}


def test_cooldowns_of_retired_instances_are_forgotten() -> None:
    # An instance's last-migration time only matters for cooldown_s; the ids of instances scaled away must not
    # pile up in a long-running Controller.
    p = LlumnixMigrationPolicy(cooldown_s=5.0, min_gap_s=0.0)
    for k in range(20):
        hot_k, cold_k = hot(iid=f"hot{k}"), inst(f"cold{k}")
        assert p.plan(view(hot_k, cold_k), 10.0 * k)  # every round a fresh pair migrates
    assert set(p._touched) <= {"hot19", "cold19"}


def test_drain_moves_everything_longest_remaining_first() -> None:
    reqs = (rl("s", rem=5.0), rl("l", rem=500.0), rl("m", rem=50.0), rl("pf", prefill=True))
    p = LlumnixMigrationPolicy(max_concurrent=10, max_per_instance=10, max_plans=10, max_per_s=10)
    plans = p.plan(view(inst("d", reqs, draining=True), inst("x", total=200), inst("y", total=200)), 0.0)
    assert [x.request_id for x in plans] == ["l", "m", "s"]  # prefilling requests are not migrated
    assert all(x.reason is MigrationReason.DRAIN and x.destination in ("x", "y") for x in plans)
    # Drain ignores min_gap (a scale-down is waiting) but not the in-flight accounting.
    assert p.plan(view(inst("d", reqs, draining=True), inst("x", total=200)), 0.01) == []


def test_a_dropped_plan_is_planned_again() -> None:
    """The caller could not start a plan (the Controller had not heard of the request yet): the request gets no
    cooldown and the next round plans it again; a started-and-failed one keeps its cooldown."""
    reqs = (rl("a", rem=300.0),)
    p = LlumnixMigrationPolicy(max_concurrent=4, cooldown_s=0.0, request_cooldown_s=10.0)
    v = view(inst("d", reqs, draining=True), inst("x", total=200))
    assert [x.request_id for x in p.plan(v, 0.0)] == ["a"]
    p.on_migration_dropped("a")
    assert [x.request_id for x in p.plan(v, 0.1)] == ["a"]
    p.on_migration_done("a", ok=False)
    assert p.plan(v, 0.2) == []


def test_priority_isolation_moves_low_priority_off() -> None:
    reqs = (rl("hi", prio=1, ctx=800), rl("lo1", rem=300.0), rl("lo2", rem=30.0))
    p = LlumnixMigrationPolicy(max_per_instance=2, high_watermark=0.95)
    plans = p.plan(view(inst("busy", reqs, used=88), inst("free", total=100)), 0.0)
    assert [x.request_id for x in plans] == ["lo1"]  # longest remaining first; 88 -> 78 blocks relieves it
    assert all(x.reason is MigrationReason.PRIORITY for x in plans)
    # Still over the pressure after one move: the next low-priority decode goes too.
    plans = LlumnixMigrationPolicy(max_per_instance=2, high_watermark=0.95).plan(
        view(inst("busy", reqs, used=99), inst("free", total=100)), 0.0)
    assert [x.request_id for x in plans] == ["lo1", "lo2"]
    # No high-priority decode there: no isolation (and below the balance watermark: nothing).
    calm = (rl("lo1"), rl("lo2"))
    assert LlumnixMigrationPolicy(high_watermark=0.95).plan(view(inst("busy", calm, used=88), inst("free")), 0.0) == []


def test_defrag_frees_room_for_a_queued_prompt_that_fits_nowhere() -> None:
    big = rl("big", ctx=1200, rem=None, prefill=True)  # 75 blocks
    src = inst("s", (rl("a", ctx=320), rl("b", ctx=160), rl("c", ctx=480), big), used=60, waiting=1, pending=1200)
    p = LlumnixMigrationPolicy(max_per_instance=3, max_plans=5, max_concurrent=5, max_per_s=5, high_watermark=0.9)
    o1, o2 = inst("o1", (rl("x1", ctx=640),), used=40), inst("o2", (rl("x2", ctx=640),), used=40)
    plans = p.plan(view(src, o1, o2), 0.0)  # 60 blocks free at most anywhere: the 75-block prompt fits nowhere
    # Deficit 75 - 40 = 35 blocks: smallest first (b: 10, a: 20, c: 30 blocks) until it fits.
    assert [x.request_id for x in plans] == ["b", "a", "c"]
    assert all(x.reason is MigrationReason.DEFRAG and x.destination in ("o1", "o2") for x in plans)
    # One destination cannot take 35 blocks below the watermark: no partial (useless) defrag.
    p = LlumnixMigrationPolicy(max_per_instance=3, max_plans=5, max_concurrent=5, max_per_s=5, high_watermark=0.9)
    assert all(x.reason is not MigrationReason.DEFRAG for x in p.plan(view(src, o1), 0.0))
    # If it fits elsewhere, that is routing's job: no defrag. (Same limits as above: with max_per_instance=1 a defrag
    # could not free enough through one destination anyway, and the "fits elsewhere" rule went untested.)
    roomy = inst("o", used=10, total=100)
    plans = LlumnixMigrationPolicy(max_per_instance=3, max_plans=5, max_concurrent=5, high_watermark=0.9).plan(
        view(src, roomy), 0.0)
    assert plans and all(x.reason is MigrationReason.LOAD_BALANCE for x in plans)  # (s is virtually overloaded)


def test_defrag_finds_the_queue_head_when_decodes_are_on_their_way() -> None:
    """``num_waiting`` also counts requests whose KV is on its way (``num_incoming``; not in ``requests``): the
    queue's head is found among the listed prompts all the same. A prompt mid-prefill is listed ahead of the queue:
    counting the incoming ones as listed took it for the head (it fits: no defrag)."""
    big = rl("big", ctx=1200, rem=None, prefill=True)  # 75 blocks
    chunking = rl("pf", ctx=160, rem=None, prefill=True)  # running its prefill: listed first, not waiting
    o1, o2 = inst("o1", (rl("x1", ctx=640),), used=40), inst("o2", (rl("x2", ctx=640),), used=40)
    for incoming in (0, 2):
        src = dataclasses.replace(
            inst("s", (rl("a", ctx=320), rl("b", ctx=160), rl("c", ctx=480), chunking, big), used=60, waiting=1,
                 pending=1200),
            num_waiting=1 + incoming, num_incoming=incoming)
        p = LlumnixMigrationPolicy(max_per_instance=3, max_plans=5, max_concurrent=5, max_per_s=5, high_watermark=0.9)
        plans = p.plan(view(src, o1, o2), 0.0)
        # The reason too: load balance (s is virtually overloaded) moves the same three in the same order.
        assert [(x.request_id, x.reason) for x in plans] == [(k, MigrationReason.DEFRAG) for k in "bac"], incoming


def test_registry() -> None:
    assert make_migration_policy("none").plan(view(hot(), inst("c")), 0.0) == []
    assert isinstance(make_migration_policy("llumnix", max_concurrent=2), LlumnixMigrationPolicy)
    with pytest.raises(ValueError, match="allowed: llumnix, none"):
        make_migration_policy("magic")


# ---- invariants over random views ------------------------------------------------------------------------------------
@st.composite
def random_view(draw: st.DrawFn) -> ClusterView:
    n = draw(st.integers(2, 6))
    insts = []
    for i in range(n):
        k = draw(st.integers(0, 6))
        reqs = tuple(rl(f"i{i}r{j}", ctx=draw(st.integers(1, 400)), rem=draw(st.floats(0, 500)),
                        prio=draw(st.integers(0, 1))) for j in range(k))
        need = sum(-(-r.context_tokens // 16) for r in reqs)
        total = draw(st.integers(max(need, 1), max(need, 1) + 60))
        insts.append(inst(f"i{i}", reqs, used=need, total=total, draining=draw(st.booleans()),
                          healthy=draw(st.booleans() | st.just(True)), role=draw(st.sampled_from([D, M]))))
    return view(*insts)


@settings(max_examples=60, deadline=None)
@given(random_view(), st.integers(1, 4), st.integers(1, 3))
def test_plans_respect_limits_and_destination_rules(v: ClusterView, max_conc: int, per_inst: int) -> None:
    p = LlumnixMigrationPolicy(max_concurrent=max_conc, max_per_instance=per_inst, max_plans=10)
    plans = p.plan(v, 0.0)
    assert len(plans) <= max_conc
    assert len({x.request_id for x in plans}) == len(plans)
    load: dict[str, int] = {}
    free = {i.instance_id: i.kv_blocks_free for i in v.instances}
    for x in plans:
        dst, src = v.by_id(x.destination), v.by_id(x.source)
        assert dst.healthy and not dst.draining and dst.role.does_decode and dst is not src
        r = next(r for r in src.requests if r.request_id == x.request_id)
        free[x.destination] -= -(-r.context_tokens // 16)
        assert free[x.destination] >= -(-64 // 16) - 1  # room for the request plus (most of) the headroom
        for iid in (x.source, x.destination):
            load[iid] = load.get(iid, 0) + 1
    assert all(n <= per_inst for n in load.values())
    assert p.plan(v, 0.0) == [] or any(i.draining for i in v.instances)  # min gap holds unless draining


# ---- test-suite audit: rules the tests above did not pin (each names the mutant it kills) -------------------------
def test_stage_boundaries() -> None:
    """``migration_stages``: a stage of exactly ``last_stage_max_tokens`` is the stop-and-copy (kills ``<=`` -> ``<``,
    for the context and for a later stage); a stage copies at least 1 token even with nothing decoded (kills
    dropping the ``max(..., 1)``)."""
    assert migration_stages(64, decode_rate_tok_s=50, bandwidth_tok_s=500) == [64]
    assert migration_stages(1000, decode_rate_tok_s=20, bandwidth_tok_s=1000, last_stage_max_tokens=20) == [1000, 20]
    assert migration_stages(1000, decode_rate_tok_s=0, bandwidth_tok_s=500) == [1000, 1]


def test_max_plans_caps_a_round() -> None:
    """``max_plans`` caps the plans of one round below ``max_concurrent`` (kills ``_Round.full`` ignoring it)."""
    reqs = tuple(rl(f"r{k}", rem=10.0 * (k + 1)) for k in range(4))
    p = LlumnixMigrationPolicy(max_concurrent=8, max_per_instance=8, max_plans=2)
    assert len(p.plan(view(inst("d", reqs, draining=True), inst("x", total=200)), 0.0)) == 2


def test_a_request_is_planned_at_most_once_per_round() -> None:
    """Priority isolation moves ``lo``; the source is still above the high watermark, so load balance runs on it
    next: it must pick another request, not ``lo`` again (kills ``_Round.movable`` forgetting ``moved``)."""
    reqs = (rl("hi", prio=1, rem=100.0), rl("lo", rem=10.0))
    p = LlumnixMigrationPolicy(max_per_instance=2)
    plans = p.plan(view(inst("busy", reqs, used=95), inst("free", total=100)), 0.0)
    assert [(x.request_id, x.reason) for x in plans] == [("lo", MigrationReason.PRIORITY),
                                                         ("hi", MigrationReason.LOAD_BALANCE)]


def test_priority_isolation_never_moves_the_high_priority_request() -> None:
    """Still over the pressure after every low-priority decode left: the high-priority one stays (kills dropping
    ``r.priority < HIGH_PRIORITY`` from the candidates)."""
    reqs = (rl("hi", prio=1), rl("lo", rem=30.0))
    p = LlumnixMigrationPolicy(max_per_instance=3, high_watermark=0.95)
    plans = p.plan(view(inst("busy", reqs, used=99), inst("free", total=100)), 0.0)
    assert [x.request_id for x in plans] == ["lo"]


def test_load_balance_stops_once_the_source_is_relieved() -> None:
    """One 10-block move takes ``hot`` from 0.9 to 0.8 (not above the high watermark): no more moves even with
    room for four (kills dropping the ``rnd.vu(src) <= high_watermark`` stop)."""
    p = LlumnixMigrationPolicy(max_per_instance=4)
    assert [x.request_id for x in p.plan(view(hot(), inst("cold", total=1000)), 0.0)] == ["hot0"]


def test_choosers_order_by_their_own_key_first() -> None:
    """``shortest_remaining`` picks the shortest remaining request even when it holds more KV; ``least_kv`` the
    smallest KV (kills swapping the key's terms: every request in ``hot()`` has the same context); the default
    ``relief_per_copy`` the most KV-time freed per token copied: a longer remaining beats a smaller KV."""
    reqs = (rl("long_small", ctx=160, rem=500.0), rl("short_big", ctx=320, rem=5.0))
    v = view(inst("src", reqs, used=90), inst("cold", total=1000))
    old = LlumnixMigrationPolicy(choose="shortest_remaining")
    assert [x.request_id for x in old.plan(v, 0.0)] == ["short_big"]
    assert [x.request_id for x in LlumnixMigrationPolicy(choose="least_kv").plan(v, 0.0)] == ["long_small"]
    # 320 tokens held for 400 more steps: 650 token-steps freed per token copied, against 131 for 160 tokens held
    # for 100 (the other two rules both pick the small one).
    reqs = (rl("small_short", ctx=160, rem=100.0), rl("big_long", ctx=320, rem=400.0))
    v = view(inst("src", reqs, used=90), inst("cold", total=1000))
    assert [x.request_id for x in LlumnixMigrationPolicy().plan(v, 0.0)] == ["big_long"]


def test_inflight_entry_expires_after_the_timeout() -> None:
    """A migration whose request is still listed on its source stays in flight until ``inflight_timeout_s``, then
    frees its ``max_concurrent`` slot (kills dropping the timeout: the slot stayed taken forever)."""
    p = LlumnixMigrationPolicy(max_concurrent=1, inflight_timeout_s=10.0, request_cooldown_s=0.0, cooldown_s=0.0)
    v = view(hot(), inst("cold", total=1000))
    assert len(p.plan(v, 0.0)) == 1
    assert p.plan(v, 5.0) == []  # still in flight: the request is still on its source
    assert len(p.plan(v, 10.5)) == 1
