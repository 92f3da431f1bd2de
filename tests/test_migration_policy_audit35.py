"""Migration policy audit against Llumnix (Sun et al., OSDI 2024): which request a trigger moves, and whether a
drain reaches every draining instance. Pure policy: snapshots in, plans out. Each test fails on the code before
its fix, except the one marked a guard."""

from __future__ import annotations

from scheduler.policy.migration import LlumnixMigrationPolicy, MigrationPlan, MigrationReason
from tests.test_policies_migration import inst, rl, view


def test_load_balance_moves_the_request_that_would_stay_longest_not_one_about_to_finish() -> None:
    """Same KV, so the same copy: ``ending`` has 2 tokens left and frees its 20 blocks in two steps anyway;
    ``staying`` holds them for 400 more. The "shortest remaining first" default moved ``ending`` (a copy that
    bought two steps of 20 blocks); the goal is the most KV-time freed per KV token copied."""
    reqs = (rl("ending", ctx=320, rem=2.0), rl("staying", ctx=320, rem=400.0))
    plans = LlumnixMigrationPolicy().plan(view(inst("src", reqs, used=90), inst("cold", total=1000)), 0.0)
    assert plans == [MigrationPlan("staying", "src", "cold", MigrationReason.LOAD_BALANCE)]


def test_without_length_guesses_the_choice_is_llumnixs_shortest_sequence() -> None:
    """Guard (passes before and after): no request has a guess (every remaining is the default), so the choice
    falls back to the least KV to copy, as Llumnix's SRF (shortest ``request_len``) does -- listed last, so it is
    the key and not the order. The recorded simulator studies run without guesses: their moves do not change."""
    reqs = (rl("big", ctx=480, rem=None), rl("small", ctx=160, rem=None))
    plans = LlumnixMigrationPolicy().plan(view(inst("src", reqs, used=90), inst("cold", total=1000)), 0.0)
    assert [x.request_id for x in plans] == ["small"]


def test_load_balance_moves_low_priority_before_high_priority() -> None:
    """Llumnix prefers low-priority requests for migration (a move costs its request a stop-and-copy). Two equal
    decodes, the high-priority one listed first: load balance moved it (its key ignored priority)."""
    reqs = (rl("hi", ctx=160, rem=100.0, prio=1), rl("lo", ctx=160, rem=100.0))
    # Below ``pressure`` (0.85): priority isolation does not fire, load balance (0.82 > 0.8) does.
    plans = LlumnixMigrationPolicy().plan(view(inst("src", reqs, used=82), inst("cold", total=1000)), 0.0)
    assert plans == [MigrationPlan("lo", "src", "cold", MigrationReason.LOAD_BALANCE)]


def test_a_busy_draining_instance_does_not_stall_the_next_ones_drain() -> None:
    """Two instances drain (a scale-down of two). ``d1`` already has a move in flight (``max_per_instance`` 1):
    the drain returned from the whole round there, so ``d2`` got no plan until ``d1`` was empty."""
    p = LlumnixMigrationPolicy(max_concurrent=8, max_plans=8, max_per_s=8, cooldown_s=0.0)
    d1 = inst("d1", (rl("a", rem=300.0), rl("b", rem=200.0)), draining=True)
    d2 = inst("d2", (rl("c", rem=300.0),), draining=True)
    x, y = inst("x", total=200), inst("y", total=200)
    assert [pl.request_id for pl in p.plan(view(d1, x, y), 0.0)] == ["a"]
    # ``a`` still copying (listed on d1): d1 is busy, d2 must still drain, to the other free destination.
    plans = p.plan(view(d1, d2, x, y, t=0.5), 0.5)
    assert plans == [MigrationPlan("c", "d2", "y", MigrationReason.DRAIN)]


def test_a_move_never_pushes_an_instance_with_high_priority_decodes_into_priority_pressure() -> None:
    """With ``high_watermark`` (0.95) above ``pressure`` (0.85), priority isolation shed ``lo1`` from ``a`` onto
    ``b`` (0.80 -> 0.90), which holds a high-priority decode too: ``b`` was then over the pressure itself and the
    next round shed a low-priority decode back onto ``a`` -- ping-pong. ``c`` (nothing to protect) takes it."""
    a = inst("a", (rl("hi_a", prio=1), rl("lo1", rem=100.0)), used=88)
    b = inst("b", (rl("hi_b", prio=1), rl("lo2", rem=100.0)), used=80)
    c = inst("c", (rl("c0"),), used=80)
    p = LlumnixMigrationPolicy(high_watermark=0.95)
    assert p.plan(view(a, b, c), 0.0) == [MigrationPlan("lo1", "a", "c", MigrationReason.PRIORITY)]
    # Only b there: no move rather than one that bounces back.
    assert LlumnixMigrationPolicy(high_watermark=0.95).plan(view(a, b), 0.0) == []
    # A drain still goes there: its source must empty, and nothing is shed back to a draining instance.
    d = inst("d", (rl("lo3", rem=100.0),), draining=True)
    assert LlumnixMigrationPolicy().plan(view(d, b), 0.0) == [
        MigrationPlan("lo3", "d", "b", MigrationReason.DRAIN)
    ]


def test_defrag_moves_one_decode_that_frees_enough_rather_than_the_smallest_first() -> None:
    """The queue's head needs 65 blocks, the source has 30 free (deficit 35), no instance has 65. Defrag took the
    smallest decodes first (b: 10 blocks); with ``max_per_instance`` 1 (the default) that was its only move this
    round, 10 < 35, so it rolled back: defrag never fired, though ``c`` alone (40 blocks) lets the head in. Load
    balance then moved ``b``, which does not. (Even with 3 moves allowed: b + a = 30, and ``o`` had no room left
    for ``c``.)"""
    head = rl("head", ctx=1040, rem=None, prefill=True)
    src = inst(
        "s", (rl("b", ctx=160), rl("a", ctx=320), rl("c", ctx=640), head), used=70, waiting=1, pending=1040
    )
    o = inst("o", (rl("x", ctx=576),), used=36)  # 64 free: the head fits nowhere; c fits here (0.36 -> 0.76)
    for per_instance in (1, 3):
        plans = LlumnixMigrationPolicy(max_per_instance=per_instance).plan(view(src, o), 0.0)
        assert plans[0] == MigrationPlan("c", "s", "o", MigrationReason.DEFRAG), per_instance


# ---- the live (vLLM) snapshot's queue order, which defrag reads ---------------------------------------------------
class _Req:
    """The fields of a vLLM ``Request`` that ``llmsched_stats`` reads."""

    def __init__(self, rid: str, tokens: int, computed: int, prompt: int | None = None) -> None:
        self.request_id, self.kv_transfer_params, self.priority = rid, {"llmsched_id": rid}, 0
        self.num_tokens, self.num_computed_tokens = tokens, computed
        self.num_prompt_tokens = tokens if prompt is None else prompt
        self.num_output_tokens = tokens - self.num_prompt_tokens

    def is_finished(self) -> bool:
        return False


def test_live_snapshot_lists_vllms_queue_in_its_order_so_defrag_finds_the_head() -> None:
    """Defrag takes the head of an instance's queue from the snapshot ("prefilling first, then the FCFS queue", as
    the engine model lists them). vLLM's ``llmsched_stats`` listed requests in arrival order, and vLLM puts a
    preempted request back at the *front* of its waiting queue: here the 1200-token request ``a`` (75 blocks, no
    instance has them) heads the queue, but the listing put ``b`` (running its chunked prefill, fits) where the
    head is read. No defrag: the prompt that fits nowhere stayed stuck (load balance moved the same decodes, for
    the wrong reason and only while the instance was above its watermark)."""
    import dataclasses
    from types import SimpleNamespace

    import pytest

    pytest.importorskip("vllm")
    from vllm.v1.core.sched.request_queue import FCFSRequestQueue

    from scheduler.core.types import RequestLoad
    from scheduler.transfer import vllm_connector as vc

    dec = [_Req("d1", 320, 319, 300), _Req("d2", 160, 159, 150), _Req("d3", 480, 479, 460)]
    a = _Req("a", 1200, 0, 1000)  # decoded 200 tokens, preempted: recomputes its whole context
    b, c = _Req("b", 160, 64), _Req("c", 160, 0)
    conn = vc.LlmschedConnector.__new__(vc.LlmschedConnector)  # scheduler-side state only
    conn._live = {r.request_id: r for r in (*dec[:1], a, *dec[1:], b, c)}  # arrival order
    conn._held, conn.counters = {}, vc._Counters()
    waiting = FCFSRequestQueue()
    waiting.add_request(c)
    waiting.prepend_request(a)  # vLLM's ``_preempt_request``
    pool = SimpleNamespace(num_gpu_blocks=101, get_num_free_blocks=lambda: 40)
    sched = SimpleNamespace(
        kv_cache_manager=SimpleNamespace(block_pool=pool),
        block_size=16,
        running=[*dec, b],
        waiting=waiting,
        kv_holding_waiting=FCFSRequestQueue(),
        get_request_counts=lambda: (4, 2),
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(vc, "_SCHEDULER_CONNECTOR", conn)
        d = vc._engine_stats(SimpleNamespace(scheduler=sched))
    reqs = tuple(
        RequestLoad(
            r["llmsched_id"], r["context_tokens"], r["output_tokens"], None, r["priority"], r["in_prefill"]
        )
        for r in d["requests"]
    )
    src = dataclasses.replace(
        inst("s", reqs, used=d["kv_blocks_used"], total=d["kv_blocks_total"]),
        num_running=d["num_running"],
        num_waiting=d["num_waiting"],
        prefill_tokens_pending=d["prefill_tokens_pending"],
    )
    o1, o2 = inst("o1", (rl("x1", ctx=640),), used=40), inst("o2", (rl("x2", ctx=640),), used=40)
    p = LlumnixMigrationPolicy(
        max_per_instance=3, max_plans=5, max_concurrent=5, max_per_s=5, high_watermark=0.9
    )
    plans = p.plan(view(src, o1, o2), 0.0)
    # Deficit 75 - 40 = 35 blocks: the smallest decodes (10, 20, 30 blocks) until it fits.
    assert [(x.request_id, x.reason) for x in plans] == [
        (k, MigrationReason.DEFRAG) for k in ("d2", "d1", "d3")
    ]


# ---- the live ingress executing the Controller's plans ------------------------------------------------------------
def test_a_plan_whose_request_moved_since_is_dropped_not_run_from_its_new_instance() -> None:
    """The Controller planned ``r`` a -> c on its view; by the time the ingress took the plan, ``r`` had moved to
    ``b`` (an operator's drain of ``a`` through ``Ingress.drain`` migrates it too, and the Controller's policy sees
    the same draining instance). The ingress ran ``migrate(r, c)`` from wherever ``r`` was: a second copy and
    downtime from ``b``, which nothing had planned. Now it is dropped (not started), as a moot plan is."""
    import asyncio
    from types import SimpleNamespace

    from scheduler.control.ingress_migration import IngressMigration
    from scheduler.control.registry import RequestRecord, RequestRegistry
    from scheduler.engine.base import SamplingParams

    reg = RequestRegistry()
    reg.add(RequestRecord("r", (1, 2, 3), SamplingParams(), instances=("b",)))
    calls: list[tuple] = []

    async def migrate(rid: str, dst: str) -> object:
        calls.append(("migrate", rid, dst))
        return SimpleNamespace(committed=True, started=True)

    done = SimpleNamespace(remote=lambda *a: calls.append(("done", *a)))
    ing = SimpleNamespace(
        registry=reg,
        _members={"a", "b", "c"},
        migrate=migrate,
        controller=SimpleNamespace(migration_done=done),
    )
    asyncio.run(IngressMigration._execute_plan(ing, MigrationPlan("r", "a", "c", MigrationReason.DRAIN)))
    assert calls == [("done", "r", False, False)]
    # Still on its planned source: the plan runs.
    calls.clear()
    asyncio.run(IngressMigration._execute_plan(ing, MigrationPlan("r", "b", "c", MigrationReason.DRAIN)))
    assert calls == [("migrate", "r", "c"), ("done", "r", True, True)]
