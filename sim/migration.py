"""Live migration in the simulator: the same multi-stage protocol as the live path, costed by the latency model.

    handshake (destination reserves KV for context + headroom, or refuses)
      -> pre-copy stages while the request keeps decoding on the source
      -> final stop-and-copy of what the request produced meanwhile (the downtime; its KV still held on the source)
      -> commit (destination resumes; the source frees the request's KV)

The stage sizes come from ``scheduler.policy.migration.migration_stages``; the live driver
(``scheduler.transfer.migration.run_migration``) applies the same rule to measured stage sizes: each is a pre-copy,
the one at or under ``last_stage_max_tokens`` too (``max_stages`` counts pre-copies), and the stop copies what the
request made during the last (a token or two); a context of at most ``last_stage_max_tokens`` has no pre-copy, the
stop copies it all. The knobs are the live ingress's:
``policies.migration.params.protocol`` (``migration_config``); mode ``blocking`` copies everything at the stop,
``recompute`` is not modelled (refused).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from scheduler.latency import kv_link, kv_transfer_between
from scheduler.policy.migration import kv_bandwidth_tok_s, migration_stages
from scheduler.transfer.migration import MigrationMode, migration_config

if TYPE_CHECKING:
    from sim.cluster import SimInstance
    from sim.simulator import Simulator


@dataclass
class _InFlight:
    rid: int
    src: SimInstance
    dst: SimInstance
    reserved: int
    copied: int
    started_s: float
    key: object  # the request id as the plan carried it: the policy's hooks get back the key it planned with
    held: int = 0  # the stopped request's blocks, kept on the source until the commit


class MigrationDriver:
    """Executes the migration policy's plans inside one simulation run."""

    def __init__(self, sim: Simulator) -> None:
        self.sim = sim
        self.policy = sim.migration
        # The protocol knobs the live ingress runs with (they were this class's defaults, whatever the config said).
        protocol = migration_config(sim.config)
        if protocol.mode is MigrationMode.RECOMPUTE:
            raise ValueError("policies.migration.params.protocol.mode: the simulator models live and blocking "
                             "migration, not recompute")
        self.blocking = protocol.mode is MigrationMode.BLOCKING
        self.headroom_tokens = protocol.headroom_tokens
        self.max_stages = protocol.max_stages
        self.last_stage_max_tokens = protocol.last_stage_max_tokens
        self.in_flight: dict[int, _InFlight] = {}
        self.committed = 0
        self.aborted_dst = 0  # destination refused at handshake
        self.aborted_src = 0  # request finished/preempted on the source before the stop
        self.downtime_s: list[float] = []
        self.total_s: list[float] = []
        self.started_by_reason: dict[str, int] = {}  # plans started, by trigger (a study's "what moved")
        self.copied_tokens = 0  # KV tokens copied, pre-copies and stops, of every started move

    def _xfer(self, src: SimInstance, dst: SimInstance, tokens: int) -> float:
        gpus = self.sim.config.gpus
        return kv_transfer_between(tokens, self.sim.config.model, gpus[src.pool.gpu], gpus[dst.pool.gpu])

    def on_policy(self, now: float) -> None:
        sim = self.sim
        view = sim.policy_view(now)
        for plan in self.policy.plan(view, now):  # type: ignore[union-attr]
            refused = self.aborted_dst
            if self.start(int(plan.request_id), sim._index[plan.source], sim._index[plan.destination], now,
                          key=plan.request_id):
                reason = str(getattr(plan.reason, "value", plan.reason))  # test policies give plain strings
                self.started_by_reason[reason] = self.started_by_reason.get(reason, 0) + 1
                continue
            if self.aborted_dst > refused:
                # As the live ingress reports a refused reservation (ABORTED_DST in HANDSHAKE): a failed migration,
                # whose request rests request_cooldown_s rather than being planned onto that destination again.
                self._tell("on_migration_done", plan.request_id, ok=False)
            else:  # never started (no longer decoding there, already moving): no in-flight entry, no cooldown
                self._tell("on_migration_dropped", plan.request_id)

    def _tell(self, hook: str, rid: object, **kw: object) -> None:
        fn = getattr(self.policy, hook, None)  # plain test policies have no hooks
        if fn is not None:
            fn(rid, **kw)

    def start(self, rid: int, src: SimInstance, dst: SimInstance, now: float, *, key: object = None) -> bool:
        seq = src.engine.get(rid)
        if seq is None or not seq.in_decode or rid in self.in_flight or src is dst:
            return False
        # A closed-form span books its steps at its end: read both engines as of now, or the handshake takes the
        # context and free blocks of the span's start (201 of 529 tokens).
        for inst in (src, dst):
            self.sim.materialise(inst, now)
        seq = src.engine.get(rid)
        if seq is None or not seq.in_decode:
            return False
        eng = dst.engine
        context = src.engine.computed_of(seq) + 1
        need = -(-(context + self.headroom_tokens) // eng.block_size)
        whole = -(-(context + seq.max_new - src.engine.generated_of(seq)) // eng.block_size)
        # Refused as the live destination refuses (``Instance.migrate_reserve``): too few free blocks, a whole
        # context it could never hold (smaller KV: heterogeneous), or on its way out (draining).
        if need > eng.total_blocks - eng.blocks_used() or whole > eng.total_blocks or dst.draining:
            self.aborted_dst += 1
            return False
        eng.prefill_blocks += need  # the reservation: held blocks no request owns yet
        a, b = src.latency.decode_coeffs(max(len(src.engine.decoding), 1))
        # As the source steps now (host contention and noise: ``time_scale``): the live driver's stages are what the
        # request made meanwhile, at the speed it ran (on a 3x host the unscaled rate planned stages 3x too big).
        step = (a + b * (src.engine._n_sum + len(src.engine.decoding))) * src.engine.time_scale
        gpus = self.sim.config.gpus
        bw_tok = kv_bandwidth_tok_s(self.sim.config.model, kv_link(gpus[src.pool.gpu], gpus[dst.pool.gpu])[0])
        stages = migration_stages(context, decode_rate_tok_s=1.0 / step, bandwidth_tok_s=bw_tok,
                              max_stages=self.max_stages, last_stage_max_tokens=self.last_stage_max_tokens)
        # The live driver's rule (``run_migration``): no pre-copy in blocking mode or for a context of at most
        # ``last_stage_max_tokens`` (the stop copies it all); else every stage is a pre-copy, the one at or under
        # the limit too, and the stop copies what the request made during the last. The last stage was the stop
        # here: downtime 16.8 ms where live pauses for ~1 token's 0.3 ms (4000-token context, 2 GB/s link), and a
        # pre-copy of a small context made its stop a token's copy (41 us for 45 tokens against 0.9 ms).
        pre = [] if self.blocking or context <= self.last_stage_max_tokens else stages
        t_pre = sum(self._xfer(src, dst, k) for k in pre)
        self.copied_tokens += sum(pre)
        self.in_flight[rid] = _InFlight(rid, src, dst, need, sum(pre), now, rid if key is None else key)
        self.sim._push(now + t_pre, self._kind("MIGRATE_FINAL"), None, rid)
        return True

    def on_final(self, rid: int, now: float) -> None:
        m = self.in_flight.get(rid)
        if m is None:
            return
        sim = self.sim
        sim.materialise(m.src, now)
        # The step in flight (booked) makes this request's token: the last copy starts at its end (it started at
        # the stop, and the destination resumed up to 0.38 s before the source's step ended).
        t_b = m.src.in_step[1] if m.src.in_step is not None else now
        seq = m.src.engine.detach(rid)
        if seq is None:  # finished, preempted or aborted meanwhile: the source keeps ownership; free the reservation
            self._release(m)
            # The destination is poked, as new work pokes an engine: the blocks may admit a prompt the reservation
            # held back -- at once if idle (it waited for good, and the run never ended: the policy ticks went on
            # while it had work), at the next step boundary mid-span (it waited for the span's end: 9 s) -- and one
            # drained meanwhile, only the reservation keeping it, may go (it stayed, counted to the run's end).
            sim._poke(m.dst, now)
            self.aborted_src += 1
            self._tell("on_migration_done", m.key, ok=False)
            del self.in_flight[rid]
            return
        # Its KV stays on the source until the commit, as live (``pause`` holds the blocks, the release after the
        # commit frees them): freed at the stop, a prompt queued there took them a whole copy early (26 ms).
        m.held = -(-seq.num_tokens // m.src.engine.block_size)
        m.src.engine.prefill_blocks += m.held
        m.src.mark_changed()  # mid-step it leaves at the step's end (the stop)
        if not m.src.busy:  # (idle: no step in flight, ``t_b`` is now)
            sim.start(m.src, now)
        last = max(seq.num_tokens - m.copied, 1)
        self.copied_tokens += last
        downtime = self._xfer(m.src, m.dst, last)
        self.downtime_s.append(downtime)
        sim._push(t_b + downtime, self._kind("MIGRATE_COMMIT"), None, (rid, seq))

    def on_commit(self, payload: tuple, now: float) -> None:
        rid, seq = payload
        m = self.in_flight.pop(rid)
        self._release(m)
        if m.held:  # the source releases it now: a prompt may fit there, a drained source may go
            m.src.engine.prefill_blocks -= m.held
            self.sim._poke(m.src, now)
        # Ahead of the queued prompts: it keeps running (Llumnix), as the live backends queue it (vLLM's connector
        # prepends it, as vLLM does a preempted request). Its blocks were reserved for it: prompts admitted first
        # took them and left its copied KV unaccounted (206 blocks held on a 200-block engine).
        new = m.dst.engine.add_request(rid, seq.num_tokens, seq.max_new, cached_tokens=seq.num_tokens - 1,
                                       priority=seq.priority, predicted_remaining=seq.predicted_remaining,
                                       length_dist=seq.length_dist, generated_before=seq.dist_base, front=True,
                                       **self.sim.prefix_ids(rid))
        new.tag = rid
        self.sim.dec_of[rid] = m.dst.index
        if self.sim.poll is not None:  # the ingress counts it there until a round shows it (``_book_landing``)
            self.sim.poll.book(m.dst.instance_id, seq.num_tokens, compute=1)
        if m.dst.in_step is not None:  # mid-step: on the pre-step snapshot now, as an arrival is (else on none)
            self.sim._queue_on_snapshot(m.dst, new, now, front=True)
        self.sim._poke(m.dst, now)
        self.committed += 1
        self._tell("on_migration_done", m.key, ok=True)
        self.total_s.append(now - m.started_s)

    def _release(self, m: _InFlight) -> None:
        m.dst.engine.prefill_blocks -= m.reserved

    @staticmethod
    def _kind(name: str):
        from sim.simulator import EventKind

        return EventKind[name]


def migration_stats(d: MigrationDriver) -> dict[str, object]:
    """What a run's migrations did: moves started by trigger, committed and aborted (destination refused; request
    gone from the source before its stop), KV tokens copied, and the moves' durations (median and P99, seconds)."""
    def pct(xs: list[float], q: float) -> float | None:
        return float(np.percentile(xs, q)) if xs else None

    return {"started": dict(sorted(d.started_by_reason.items())), "committed": d.committed,
            "aborted_dst": d.aborted_dst, "aborted_src": d.aborted_src, "copied_tokens": d.copied_tokens,
            "downtime_p50_s": pct(d.downtime_s, 50), "downtime_p99_s": pct(d.downtime_s, 99),
            "total_p50_s": pct(d.total_s, 50), "total_p99_s": pct(d.total_s, 99)}
