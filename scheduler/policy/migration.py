"""Live-migration policy (Llumnix, Sun et al., OSDI 2024) and the multi-stage copy cost model.

``MigrationPolicy.plan(view, now_s)`` returns ``MigrationPlan``s; the simulator (``sim/migration.py``) or the
controller executes them with the multi-stage protocol; the simulator costs it with the stage sizes
``migration_stages`` computes here, by the live driver's rule (``sim/migration.py``: every entry is a pre-copy, the
stop copies what the request made during the last; ``migration_cost`` below takes the last entry for the stop)::

    stage 1: copy the whole context while the request keeps decoding on the source
    stage k: copy the tokens produced during stage k-1          (shrinks by decode_rate / bandwidth each time)
    last   : stop the request, copy the remainder (the downtime), commit on the destination

Triggers of ``LlumnixMigrationPolicy``, in this order each round (a request is planned at most once):

1. drain       -- every decoding request on a ``draining`` instance leaves (longest remaining first: short ones
                  would finish before their copy pays off);
2. priority    -- an instance holding high-priority decodes with KV usage >= ``pressure`` sheds low-priority
                  decodes until it is below (Llumnix's priority headroom);
3. defrag      -- the head of some instance's queue needs more KV blocks than any instance has free: move off
                  that instance the smallest decode that alone frees enough, else the smallest decodes until the
                  head fits (only if they can free enough);
4. balance     -- instances above ``high_watermark`` virtual usage send decodes to instances at least
                  ``balance_gap`` less used (Llumnix pairs the least free with the most free, a relative rule)
                  and, if set, below ``low_watermark``.

Which decode a trigger moves (``choose``; priority isolation and balance): the default ``relief_per_copy`` moves
the one that spares its source the most KV-time per KV token copied -- its context held (and growing) for its
predicted remaining steps, over its context. A request about to finish frees its KV soon anyway: moving it costs a
copy and buys a few steps. Without length guesses (every remaining the default) that is the least KV, Llumnix's
choice (its SRF: the shortest running sequence, the cheapest copy). Balance moves low priority first, as
Llumnix prefers to (a move costs its request a stop-and-copy).

Destinations: accepting (healthy, not draining), decode-capable, enough free KV for the request plus
``headroom_tokens`` after everything already planned this round, not pushed above ``high_watermark``, and, if it
holds a high-priority decode, not up to ``pressure`` (a drain takes any that fits: its source must empty).
Rate limits so migrations do not thrash: at most ``max_concurrent`` in flight cluster-wide and
``max_per_instance`` per instance (as source or destination), and at most ``max_per_s`` planned in any second
(cluster-wide, drains included); an instance rests ``cooldown_s`` after a migration starts (drain sources
excepted); rounds are at least ``min_gap_s`` apart (unless something drains); a migrated request is not moved again
for ``request_cooldown_s``. The limits live here, so the live Controller and the simulator apply the same ones.
In-flight entries clear when the request leaves the source's snapshot, on ``on_migration_done``, or after
``inflight_timeout_s``. A plan the caller dropped without starting it (``on_migration_dropped``) leaves no trace on
its request: no cooldown, no ``max_per_s`` slot for what never moved.
"""

from __future__ import annotations

import enum
import math
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

from scheduler.config.models import ModelSpec
from scheduler.core.types import ClusterView, InstanceSnapshot, RequestLoad
from scheduler.policy.params import check_numbers

HIGH_PRIORITY = 1


class MigrationReason(enum.Enum):
    DRAIN = "drain"
    PRIORITY = "priority"
    DEFRAG = "defrag"
    LOAD_BALANCE = "load_balance"


@dataclass(frozen=True, slots=True)
class MigrationPlan:
    request_id: str
    source: str
    destination: str
    reason: MigrationReason


# ---- the cost model ---------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class MigrationCost:
    total_s: float  # handshake to commit
    downtime_s: float  # the request produces no token: the final stop-and-copy
    stages: tuple[int, ...]  # tokens copied per stage; the last is the stop-and-copy


def migration_stages(
    context_tokens: int,
    *,
    decode_rate_tok_s: float,
    bandwidth_tok_s: float,
    max_stages: int = 4,
    last_stage_max_tokens: int = 64,
) -> list[int]:
    """Tokens copied per stage of a Llumnix multi-stage migration.

    Stage 1 copies ``context_tokens``; each next stage copies what the request generated meanwhile,
    ``ceil(previous / bandwidth * decode_rate)`` (at least 1: the block being written). Stops once a stage is at
    most ``last_stage_max_tokens`` or ``max_stages`` are used; the last entry is the stop-and-copy. With
    ``decode_rate < bandwidth`` the sizes shrink geometrically; otherwise the copy cannot converge and the last
    stage exceeds the limit -- check ``migration_cost(...).downtime_s`` before migrating.

    Raises:
        ValueError: a non-positive bandwidth or ``max_stages``, or a negative rate or limit.
    """
    if bandwidth_tok_s <= 0:
        raise ValueError(f"bandwidth_tok_s must be > 0, got {bandwidth_tok_s}")
    if decode_rate_tok_s < 0:
        raise ValueError(f"decode_rate_tok_s must be >= 0, got {decode_rate_tok_s}")
    if max_stages < 1:
        raise ValueError(f"max_stages must be >= 1, got {max_stages}")
    if last_stage_max_tokens < 0:
        raise ValueError(f"last_stage_max_tokens must be >= 0, got {last_stage_max_tokens}")
    if context_tokens <= 0:
        return []
    stages = [int(context_tokens)]
    if context_tokens <= last_stage_max_tokens:
        return stages  # small enough to stop and copy at once
    while len(stages) < max_stages:
        produced = max(math.ceil(stages[-1] / bandwidth_tok_s * decode_rate_tok_s), 1)
        stages.append(produced)
        if produced <= last_stage_max_tokens:
            break
    return stages


def migration_cost(
    context_tokens: int,
    *,
    decode_rate_tok_s: float,
    bandwidth_tok_s: float,
    latency_s: float = 0.0,
    max_stages: int = 4,
    last_stage_max_tokens: int = 64,
) -> MigrationCost:
    """Time of a whole migration and its downtime: each stage costs ``latency_s + tokens / bandwidth``."""
    stages = migration_stages(context_tokens, decode_rate_tok_s=decode_rate_tok_s, bandwidth_tok_s=bandwidth_tok_s,
                              max_stages=max_stages, last_stage_max_tokens=last_stage_max_tokens)
    times = [latency_s + s / bandwidth_tok_s for s in stages]
    return MigrationCost(sum(times), times[-1] if times else 0.0, tuple(stages))


def kv_bandwidth_tok_s(model: ModelSpec, bandwidth_gbps: float) -> float:
    """A link's bandwidth in KV tokens per second for ``model``."""
    return bandwidth_gbps * 1e9 / model.kv_bytes_per_token


# ---- policies -----------------------------------------------------------------------------------------------------
class MigrationPolicy:
    """Base: ``plan`` returns migrations to start now; hooks are no-ops. Policies read per-request detail."""

    name: ClassVar[str] = "base"
    needs_request_detail: ClassVar[bool] = True

    def plan(self, view: ClusterView, now_s: float) -> list[MigrationPlan]:
        raise NotImplementedError

    def on_migration_done(self, request_id: str, *, ok: bool) -> None:
        return None

    def on_migration_dropped(self, request_id: str) -> None:
        """A plan the caller never started (no owner known yet, moot when it arrived, never taken)."""
        self.on_migration_done(request_id, ok=False)


class NoMigration(MigrationPolicy):
    name = "none"

    def plan(self, view: ClusterView, now_s: float) -> list[MigrationPlan]:
        return []


def _blocks(tokens: float, block_size: int) -> int:
    return -(-int(tokens) // max(block_size, 1))


class _Round:
    """Mutable bookkeeping for one planning round: KV and counts after the moves planned so far."""

    def __init__(self, policy: LlumnixMigrationPolicy, view: ClusterView, now_s: float) -> None:
        self.p = policy
        self.now = now_s
        self.free = {i.instance_id: i.kv_blocks_free for i in view.instances}
        self.used = {i.instance_id: i.kv_blocks_used + _blocks(i.prefill_tokens_pending, i.block_size)
                     for i in view.instances}
        self.busy: dict[str, int] = {}
        for src, dst, _ in policy._inflight.values():
            self.busy[src] = self.busy.get(src, 0) + 1
            self.busy[dst] = self.busy.get(dst, 0) + 1
        self.inflight = len(policy._inflight)
        self.rate_left = policy.max_per_s - len(policy._starts)  # ``_expire`` left the last second's starts
        self.plans: list[MigrationPlan] = []
        self.moved: set[str] = set(policy._inflight)
        self.changes = 0  # bumped by every plan added or rolled back: what ``vu``, ``free`` read moved
        # Each instance's requests split once a round into its decodes (what a move takes) and its queue, in the
        # snapshot's order: an overloaded instance lists ~100 queued requests behind ~10 decodes, and every
        # trigger scanned them all (most of a migration run's time went to these scans; fortieth session).
        self._split: dict[str, tuple[list[RequestLoad], list[RequestLoad], bool]] = {}

    def _split_of(self, inst: InstanceSnapshot) -> tuple[list[RequestLoad], list[RequestLoad], bool]:
        split = self._split.get(inst.instance_id)
        if split is None:
            decodes = [r for r in inst.requests if not r.in_prefill]
            queued = [r for r in inst.requests if r.in_prefill]
            high = any(r.priority >= HIGH_PRIORITY for r in decodes)
            split = self._split[inst.instance_id] = (decodes, queued, high)
        return split

    def decodes(self, inst: InstanceSnapshot) -> list[RequestLoad]:
        """``inst``'s decoding requests, in its snapshot's order."""
        return self._split_of(inst)[0]

    def queued(self, inst: InstanceSnapshot) -> list[RequestLoad]:
        """``inst``'s requests in prefill (prefilling, then the FCFS queue), in its snapshot's order."""
        return self._split_of(inst)[1]

    def holds_high_priority(self, inst: InstanceSnapshot) -> bool:
        """A high-priority request decodes on ``inst``: what priority isolation protects."""
        return self._split_of(inst)[2]

    def vu(self, inst: InstanceSnapshot) -> float:
        return self.used[inst.instance_id] / max(inst.kv_blocks_total, 1)

    def full(self) -> bool:
        return self.inflight >= self.p.max_concurrent or len(self.plans) >= min(self.p.max_plans, self.rate_left)

    def can_touch(self, inst: InstanceSnapshot, *, cooldown: bool = True) -> bool:
        iid = inst.instance_id
        if self.busy.get(iid, 0) >= self.p.max_per_instance:
            return False
        return not cooldown or self.now - self.p._touched.get(iid, -math.inf) >= self.p.cooldown_s

    def movable(self, r: RequestLoad) -> bool:
        if r.in_prefill or r.request_id in self.moved:
            return False
        t = self.p._recent.get(r.request_id)
        return t is None or self.now - t >= self.p.request_cooldown_s

    def checkpoint(self) -> tuple:
        return dict(self.free), dict(self.used), dict(self.busy), self.inflight, len(self.plans), set(self.moved)

    def rollback(self, cp: tuple) -> None:
        self.free, self.used, self.busy, self.inflight, n, self.moved = cp
        del self.plans[n:]
        self.changes += 1

    def add(self, r: RequestLoad, src: InstanceSnapshot, dst: InstanceSnapshot, reason: MigrationReason) -> None:
        n = _blocks(r.context_tokens, src.block_size)
        m = _blocks(r.context_tokens, dst.block_size)
        # NOTE: the source's blocks free only at commit, so they are not credited to ``free`` this round
        # (crediting them let a later plan in the same round over-commit an instance that was a source).
        self.used[src.instance_id] -= n
        # The handshake reserves context + headroom until the commit: debit that (debiting the context alone
        # planned two 14-block reservations into 26 free blocks; the executor refused the second).
        self.free[dst.instance_id] -= _blocks(r.context_tokens + self.p.headroom_tokens, dst.block_size)
        self.used[dst.instance_id] += m
        for iid in (src.instance_id, dst.instance_id):
            self.busy[iid] = self.busy.get(iid, 0) + 1
        self.inflight += 1
        self.moved.add(r.request_id)
        self.plans.append(MigrationPlan(r.request_id, src.instance_id, dst.instance_id, reason))
        self.changes += 1


class _Finder:
    """``_destination`` for one source's requests, skipping the calls whose answer is known while nothing is
    planned (``rnd.changes`` unchanged): none for a request at least as large as one that found none (``_destination``
    is monotone in the context moved, with or without ``protect``), and the destination already found for the same
    request (the defrag asks for its smallest decode before its loop). The skip holds in any order the trigger
    asks in: ``fail`` only ever shrinks (a call is made only below it)."""

    def __init__(self, policy: LlumnixMigrationPolicy, rnd: _Round, src: InstanceSnapshot,
                 dests: list[InstanceSnapshot], *, below: float, protect: bool = True) -> None:
        self.p, self.rnd, self.src, self.dests = policy, rnd, src, dests
        self.below, self.protect = below, protect
        self.seen = rnd.changes
        self.fail = math.inf  # smallest context that found no destination, as of ``seen``
        self.found: dict[str, InstanceSnapshot] = {}  # request -> its destination, as of ``seen``

    def __call__(self, r: RequestLoad) -> InstanceSnapshot | None:
        if self.rnd.changes != self.seen:
            self.seen, self.fail, self.found = self.rnd.changes, math.inf, {}
        if r.context_tokens >= self.fail:
            return None
        d = self.found.get(r.request_id)
        if d is None:
            d = self.p._destination(self.rnd, r, self.src, self.dests, below=self.below, protect=self.protect)
            if d is None:
                self.fail = r.context_tokens
            else:
                self.found[r.request_id] = d
        return d


class LlumnixMigrationPolicy(MigrationPolicy):
    """Llumnix-style migration: triggers, request choice, destinations and rate limits (module docstring)."""

    name = "llumnix"

    def __init__(
        self,
        *,
        high_watermark: float = 0.8,
        balance_gap: float = 0.2,
        low_watermark: float | None = None,
        pressure: float = 0.85,
        max_concurrent: int = 4,
        max_per_instance: int = 1,
        max_plans: int = 4,
        max_per_s: float = 2.0,
        cooldown_s: float = 1.0,
        min_gap_s: float = 0.2,
        request_cooldown_s: float = 10.0,
        inflight_timeout_s: float = 10.0,
        headroom_tokens: int = 64,
        choose: str = "relief_per_copy",
        default_output_tokens: float = 256.0,
    ) -> None:
        check_numbers(high_watermark=high_watermark, balance_gap=balance_gap, pressure=pressure,
                      max_concurrent=max_concurrent, max_per_instance=max_per_instance, max_plans=max_plans,
                      max_per_s=max_per_s, cooldown_s=cooldown_s, min_gap_s=min_gap_s,
                      request_cooldown_s=request_cooldown_s, inflight_timeout_s=inflight_timeout_s,
                      headroom_tokens=headroom_tokens, default_output_tokens=default_output_tokens,
                      **({} if low_watermark is None else {"low_watermark": low_watermark}))
        if low_watermark is not None and not 0 <= low_watermark <= high_watermark:
            raise ValueError(f"watermarks: need 0 <= low_watermark ({low_watermark}) <= high_watermark "
                             f"({high_watermark})")
        if not 0 < balance_gap <= 1:
            raise ValueError(f"balance_gap: must be in (0, 1], got {balance_gap}")
        if choose not in _CHOOSERS:
            raise ValueError(f"choose: unknown {choose!r}; allowed: {', '.join(_CHOOSERS)}")
        self.high_watermark = high_watermark
        self.low_watermark = 1.0 if low_watermark is None else low_watermark
        self.balance_gap = balance_gap
        self.pressure = pressure
        self.max_concurrent = max_concurrent
        self.max_per_instance = max_per_instance
        self.max_plans = max_plans
        if not max_per_s > 0:
            raise ValueError(f"max_per_s: must be > 0, got {max_per_s}")
        self.max_per_s = max_per_s
        self.cooldown_s = cooldown_s
        self.min_gap_s = min_gap_s
        self.request_cooldown_s = request_cooldown_s
        self.inflight_timeout_s = inflight_timeout_s
        self.headroom_tokens = headroom_tokens
        self.default_output_tokens = default_output_tokens
        self._key = _CHOOSERS[choose]
        self._inflight: dict[str, tuple[str, str, float]] = {}  # request -> (source, destination, started)
        self._touched: dict[str, float] = {}  # instance -> last migration start
        self._recent: OrderedDict[str, float] = OrderedDict()  # request -> last migration start
        # (time, request) of the plans made in the last second, for ``max_per_s``.
        self._starts: list[tuple[float, str]] = []
        self._last_round = -math.inf

    # ---- bookkeeping ----------------------------------------------------------------------------------------------
    def on_migration_done(self, request_id: str, *, ok: bool) -> None:
        self._inflight.pop(request_id, None)

    def on_migration_dropped(self, request_id: str) -> None:
        # NOTE: without this a drain plan dropped once (the Controller had not heard of the request yet) kept its
        # request out of every plan for request_cooldown_s -- longer than the request lived.
        self._inflight.pop(request_id, None)
        self._recent.pop(request_id, None)
        # Never started: it does not count against ``max_per_s`` either.
        for i in range(len(self._starts) - 1, -1, -1):
            if self._starts[i][1] == request_id:
                del self._starts[i]
                break

    def _expire(self, view: ClusterView, now_s: float) -> None:
        by_id = {i.instance_id: i for i in view.instances}
        for rid, (src, _dst, t0) in list(self._inflight.items()):
            s = by_id.get(src)
            # Without per-request detail we cannot tell; then only the timeout clears the entry.
            gone = s is None or ((s.requests or not s.num_running) and all(r.request_id != rid for r in s.requests))
            if gone or now_s - t0 >= self.inflight_timeout_s:
                del self._inflight[rid]
        self._starts = [(t, rid) for t, rid in self._starts if now_s - t < 1.0]
        while self._recent and len(self._recent) > 100_000:
            self._recent.popitem(last=False)
        # Past its cooldown an entry decides nothing; dropping it keeps retired instances' ids from piling up.
        for iid in [i for i, t in self._touched.items() if now_s - t >= self.cooldown_s]:
            del self._touched[iid]

    def _remaining(self, r: RequestLoad) -> float:
        return r.predicted_remaining if r.predicted_remaining is not None else self.default_output_tokens

    # ---- the round ----------------------------------------------------------------------------------------------------
    def plan(self, view: ClusterView, now_s: float) -> list[MigrationPlan]:
        self._expire(view, now_s)
        draining = [i for i in view.instances if i.draining and i.healthy]
        if not draining and now_s - self._last_round < self.min_gap_s:
            return []
        rnd = _Round(self, view, now_s)
        dests = [i for i in view.instances if i.healthy and not i.draining and i.role.does_decode]
        self._drain(rnd, draining, dests)
        self._priority(rnd, view, dests)
        self._defrag(rnd, view, dests)
        self._balance(rnd, view, dests)
        for plan in rnd.plans:
            self._inflight[plan.request_id] = (plan.source, plan.destination, now_s)
            self._touched[plan.source] = self._touched[plan.destination] = now_s
            self._recent[plan.request_id] = now_s
            self._recent.move_to_end(plan.request_id)
            self._starts.append((now_s, plan.request_id))
        if rnd.plans:
            self._last_round = now_s
        return rnd.plans

    def _destination(self, rnd: _Round, r: RequestLoad, src: InstanceSnapshot, dests: list[InstanceSnapshot], *,
                     below: float, protect: bool = True) -> InstanceSnapshot | None:
        """Least virtually used eligible destination that stays below ``below`` after taking ``r`` -- and, with
        ``protect``, below ``pressure`` if it holds a high-priority decode: with ``high_watermark`` above
        ``pressure``, priority isolation shed such a move straight back (a low-priority decode bouncing between two
        protected instances). A drain does not protect: its source must empty, and nothing goes back to it.

        None for a request means none for a larger one while nothing is planned meanwhile: every test a candidate
        fails (free blocks, usage after, pressure) is monotone in the context moved. ``_Finder`` skips those calls."""
        best, best_vu = None, math.inf
        for d in dests:
            if d.instance_id == src.instance_id or not rnd.can_touch(d):
                continue
            need = _blocks(r.context_tokens + self.headroom_tokens, d.block_size)
            if rnd.free[d.instance_id] < need:
                continue
            vu = rnd.vu(d)
            after = vu + _blocks(r.context_tokens, d.block_size) / max(d.kv_blocks_total, 1)
            if after > below or vu >= best_vu or (protect and after >= self.pressure and rnd.holds_high_priority(d)):
                continue
            best, best_vu = d, vu
        return best

    def _drain(self, rnd: _Round, draining: list[InstanceSnapshot], dests: list[InstanceSnapshot]) -> None:
        for src in draining:
            reqs = sorted((r for r in rnd.decodes(src) if rnd.movable(r)), key=self._remaining, reverse=True)
            find = _Finder(self, rnd, src, dests, below=1.0, protect=False)
            for r in reqs:
                if rnd.full():
                    return
                if not rnd.can_touch(src, cooldown=False):
                    break  # only this source waits (a return here drained one instance at a time)
                d = find(r)
                if d is not None:
                    rnd.add(r, src, d, MigrationReason.DRAIN)

    def _priority(self, rnd: _Round, view: ClusterView, dests: list[InstanceSnapshot]) -> None:
        for src in view.instances:
            if rnd.full():
                return
            if src.draining or not src.healthy or src.kv_blocks_used / max(src.kv_blocks_total, 1) < self.pressure:
                continue
            if not rnd.holds_high_priority(src):
                continue
            low = sorted((r for r in rnd.decodes(src) if r.priority < HIGH_PRIORITY and rnd.movable(r)),
                         key=lambda r: (r.priority, self._key(self, r)))
            used0 = rnd.used[src.instance_id]
            find = _Finder(self, rnd, src, dests, below=self.high_watermark)
            for r in low:
                # Until the pressure is relieved (it went on shedding: 4 moves where one took 0.86 to 0.80).
                left = src.kv_blocks_used - (used0 - rnd.used[src.instance_id])
                if rnd.full() or not rnd.can_touch(src) or left / max(src.kv_blocks_total, 1) < self.pressure:
                    break
                d = find(r)
                if d is not None:
                    rnd.add(r, src, d, MigrationReason.PRIORITY)

    def _defrag(self, rnd: _Round, view: ClusterView, dests: list[InstanceSnapshot]) -> None:
        accepting = [i for i in view.instances if i.healthy and not i.draining]
        if not accepting:
            return
        most_free = max(rnd.free[i.instance_id] for i in accepting)
        for src in accepting:
            # Requests whose KV is on its way count as waiting but are not listed (the engine does not hold them).
            nq = src.num_waiting - src.num_incoming
            if rnd.full() or nq <= 0 or not rnd.can_touch(src):
                continue
            queued = rnd.queued(src)
            # NOTE: snapshots list prefilling requests first, then the FCFS queue; the head is the first waiting.
            waiting = queued[-nq:] if len(queued) >= nq else queued
            if not waiting:
                continue
            need = _blocks(waiting[0].context_tokens, src.block_size)
            deficit = need - rnd.free[src.instance_id]
            if deficit <= 0 or need <= most_free:
                continue  # it fits here or elsewhere: routing/admission's job, not migration's
            movable = [r for r in rnd.decodes(src) if rnd.movable(r)]
            if sum(_blocks(r.context_tokens, src.block_size) for r in movable) < deficit:
                continue  # cannot free enough: moving some would only cost
            # No destination for the smallest: none for any (``_destination``), and the partial defrag would roll
            # back -- under load, every tick, on every instance whose queue head fits nowhere. (``find`` keeps the
            # answer: the loop below asks for the smallest again.)
            find = _Finder(self, rnd, src, dests, below=self.high_watermark)
            if find(min(movable, key=lambda r: r.context_tokens)) is None:
                continue
            small = sorted(movable, key=lambda r: r.context_tokens)
            # One move if one decode frees enough (the smallest such): smallest-first took a 10-block decode
            # against a 35-block deficit, had no second move (max_per_instance 1) and rolled back, every round.
            one = next((r for r in small if _blocks(r.context_tokens, src.block_size) >= deficit), None)
            if one is not None:
                small.remove(one)
                small.insert(0, one)
            freed, cp = 0, rnd.checkpoint()
            for r in small:
                if freed >= deficit or rnd.full() or not rnd.can_touch(src):
                    break
                d = find(r)
                if d is not None:
                    rnd.add(r, src, d, MigrationReason.DEFRAG)
                    freed += _blocks(r.context_tokens, src.block_size)
            if freed < deficit:
                rnd.rollback(cp)  # a partial defrag only costs: the queued prompt still would not fit

    def _balance(self, rnd: _Round, view: ClusterView, dests: list[InstanceSnapshot]) -> None:
        sources = sorted((i for i in view.instances if i.healthy and not i.draining and i.role.does_decode
                          and rnd.vu(i) > self.high_watermark), key=rnd.vu, reverse=True)
        usage: tuple[int, list[float]] = (-1, [])  # the destinations' usages, as of ``rnd.changes``

        def less_used(src: InstanceSnapshot) -> list[InstanceSnapshot]:
            # Relative, as Llumnix pairs instances by freeness: under bursts every instance is above a fixed
            # low watermark and none qualified (bursty L4 study, 4 seeds x 2 rates: preemptions -13% / -9%
            # with a 0.5 watermark, -43% / -30% with a 0.2 gap; twenty-seventh session).
            nonlocal usage
            if usage[0] != rnd.changes:
                usage = (rnd.changes, [rnd.vu(d) for d in dests])
            below = min(self.low_watermark, rnd.vu(src) - self.balance_gap)
            return [d for d, vu in zip(dests, usage[1], strict=True) if vu < below]

        for src in sources:
            # NOTE: the candidates change only with a plan added (``rnd.changes``): none now, none for any of this
            # source's requests until one is -- the common case under load, every instance about as full (the
            # request scan and sort for nothing were a third of a migration run's policy time).
            low, seen = less_used(src), rnd.changes
            if not low:
                continue
            # Low priority first (it moved a high-priority decode ahead of an equal low-priority one).
            reqs = sorted((r for r in rnd.decodes(src) if rnd.movable(r)),
                          key=lambda r: (r.priority, self._key(self, r)))
            find = _Finder(self, rnd, src, low, below=self.high_watermark)
            for r in reqs:
                if rnd.full() or not rnd.can_touch(src) or rnd.vu(src) <= self.high_watermark:
                    break
                if rnd.changes != seen:
                    low, seen = less_used(src), rnd.changes
                    if not low:
                        break
                    find = _Finder(self, rnd, src, low, below=self.high_watermark)
                d = find(r)
                if d is not None:
                    rnd.add(r, src, d, MigrationReason.LOAD_BALANCE)


def _relief_per_copy(p: LlumnixMigrationPolicy, r: RequestLoad) -> tuple[float, ...]:
    """Most KV-time freed on the source per KV token copied first: ``ctx`` tokens held, growing by one a step, for
    ``rem`` more steps (``ctx * rem + rem**2 / 2`` token-steps), over the ``ctx`` tokens the copy moves."""
    rem, ctx = max(p._remaining(r), 0.0), max(r.context_tokens, 1)
    return -rem * (ctx + rem / 2) / ctx, r.context_tokens


_CHOOSERS: dict[str, Callable[[LlumnixMigrationPolicy, RequestLoad], tuple[float, ...]]] = {
    "relief_per_copy": _relief_per_copy,
    "least_kv": lambda p, r: (r.context_tokens, p._remaining(r)),  # Llumnix's SRF: the cheapest copy
    # The old default, for A/B only: it moves what would leave soonest anyway (2 tokens left: a copy for 2 steps).
    "shortest_remaining": lambda p, r: (p._remaining(r), r.context_tokens),
}

MIGRATION_POLICIES: dict[str, Callable[..., MigrationPolicy]] = {
    NoMigration.name: NoMigration,
    LlumnixMigrationPolicy.name: LlumnixMigrationPolicy,
}


def make_migration_policy(name: str, **params: object) -> MigrationPolicy:
    """Build a migration policy by registry name; unknown names list the allowed ones."""
    try:
        factory = MIGRATION_POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown migration policy {name!r}; allowed: {', '.join(sorted(MIGRATION_POLICIES))}") from None
    return factory(**params)
