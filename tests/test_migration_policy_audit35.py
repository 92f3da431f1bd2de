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
