"""Simulated instances built from a ``ClusterConfig``: one ``EngineModel`` each, plus the driver's state."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from scheduler.config.models import ClusterConfig, PoolSpec
from scheduler.core.types import InstanceRole, InstanceSnapshot
from scheduler.engine_model import EngineModel, Span, StepResult
from scheduler.latency import LatencyModel, latency_factory


@dataclass(eq=False)
class SimInstance:
    """An engine model plus what the event loop needs to drive it."""

    instance_id: str
    pool: PoolSpec
    engine: EngineModel
    latency: LatencyModel
    index: int
    busy: bool = False  # a STEP or SPAN_END event is pending
    version: int = 0  # bumps invalidate pending events (a span interrupted by an arrival)
    span: Span | None = None
    # A single step in flight: (its outcome, end time, start time). The engine model books a step's outcome when it
    # starts; routers see it at the step's end, as a real engine's state changes (``Simulator._kick``).
    in_step: tuple[StepResult, float, float] | None = None
    rebuild_at_step_end: bool = False  # work came mid-step: its snapshot is rebuilt from the engine at the end
    span_start: float = 0.0
    snapshot: InstanceSnapshot | None = None
    snap_dirty: bool = True
    # When the routers' entry was last refreshed; ``snapshot.time_s`` is when its state was read, earlier where an
    # unchanged engine kept its snapshot (``make_snapshot``).
    snap_t: float = -math.inf
    # What ``snapshot`` was read from: the engine's version, the state written on it from outside, the driver's own
    # (``_read_key``); None when the entry is no longer the engine's read (``amend_snapshot``).
    snap_key: tuple | None = None
    draining: bool = False
    started_s: float = 0.0
    stopped_s: float | None = None
    meta: dict = field(default_factory=dict)
    # Requests routed here to decode whose prompt KV has not arrived: the engine does not hold them yet, but the
    # live ingress counts what it dispatched as waiting until its next refresh, so the next route sees them.
    incoming: int = 0
    noise: float = 1.0  # the host's step multiplier on this engine now (``LatencyModel.host_noise``)
    # The last answer to the ingress's poll (``poll_answer``) and what it was read from.
    poll_snap: InstanceSnapshot | None = None
    poll_key: tuple | None = None

    @property
    def role(self) -> InstanceRole:
        return self.engine.role

    @property
    def gpus(self) -> int:
        return self.pool.tp

    def mark_changed(self) -> None:
        """Work came or left: the routers' snapshot is rebuilt -- at the end of a step in flight, as that step's own
        outcome shows then (``Simulator._kick``)."""
        if self.in_step is None:
            self.snap_dirty = True
        else:
            self.rebuild_at_step_end = True

    def pre_step_snapshot(self, now_s: float, *, detail: bool) -> bool:
        """Before a single step starts: the snapshot that stands until its end, rebuilt if dirty (True then)."""
        if self.snap_dirty or self.snapshot is None:
            self.make_snapshot(now_s, detail=detail)
            return True
        return False

    def make_snapshot(self, now_s: float, *, detail: bool) -> InstanceSnapshot:
        """The routers' snapshot of this instance, kept until marked dirty (``snap_dirty``). Read from the engine
        only if it changed since the last read: an unchanged one's snapshot is the same state, and is kept (a
        periodic refresh mid-span or of an idle instance rebuilt ~40% of the snapshots of an Azure x16 run
        unchanged)."""
        if self.snapshot is None or self.snap_key != self._read_key(detail):
            self.snapshot = self.fresh_snapshot(now_s, detail=detail)
            self.snap_key = self._read_key(detail)  # after the read: it may drop spent predictions (a new version)
        self.snap_t = now_s
        self.snap_dirty = False
        return self.snapshot

    def _read_key(self, detail: bool) -> tuple:
        eng = self.engine
        return eng.version, eng.prefill_blocks, eng.role, self.draining, self.incoming, detail

    def poll_answer(self, now_s: float, *, detail: bool, ahead: int = 0) -> InstanceSnapshot:
        """This instance's answer to the ingress's poll round, read ``ahead`` steps into its span (``EngineModel.ahead``;
        0: as the engine stands). An engine unchanged since the last answer's read, read as far ahead, answers with
        that snapshot object: the same state (its read time aside), and a second read would drop no prediction --
        the first dropped those due by then (an idle or waiting instance was read again every round: most of the
        poll rounds' cost)."""
        if self.poll_snap is None or self.poll_key != self._poll_key(detail, ahead):
            if ahead:
                with self.engine.ahead(ahead):
                    self.poll_snap = self.fresh_snapshot(now_s, detail=detail, incoming=False)
            else:
                self.poll_snap = self.fresh_snapshot(now_s, detail=detail, incoming=False)
            self.poll_key = self._poll_key(detail, ahead)  # after the read: it may drop spent predictions
        return self.poll_snap

    def _poll_key(self, detail: bool, ahead: int) -> tuple:
        # ``_read_key`` less the requests on their way here (an answer has none), plus how far ahead it was read.
        eng = self.engine
        return eng.version, ahead, eng.prefill_blocks, eng.role, self.draining, detail

    def amend_snapshot(self, now_s: float, **changes: object) -> None:
        """The routers' entry as of ``now_s`` with ``changes`` the ingress knows of and the engine's read does not
        show (mid-step: a request queued, KV on its way); the next ``make_snapshot`` reads the engine again."""
        self.snapshot = replace(self.snapshot, time_s=now_s, **changes)  # type: ignore[arg-type]
        self.snap_t = now_s
        self.snap_key = None

    def fresh_snapshot(self, now_s: float, *, detail: bool, incoming: bool = True) -> InstanceSnapshot:
        """The engine's state now (the routers' snapshot left as it is). ``incoming``: with the requests on their way
        here counted as waiting (the driver's count; an instance's own answer to the live ingress has none)."""
        snap = self.engine.snapshot(
            self.instance_id,
            now_s,
            detail=detail,
            gpu=self.pool.gpu,
            tp=self.pool.tp,
            draining=self.draining,
        )
        if incoming and self.incoming:
            snap = replace(snap, num_waiting=snap.num_waiting + self.incoming, num_incoming=self.incoming)
        return snap


def pool_latency(config: ClusterConfig, pool: PoolSpec) -> LatencyModel:
    """The latency model of ``pool``'s instances."""
    return latency_factory(config)(config.model, config.gpus[pool.gpu], pool.tp)


def new_instance(pool: PoolSpec, latency: LatencyModel, instance_id: str, index: int, *,
                 started_s: float = 0.0) -> SimInstance:
    """One more instance of ``pool`` (autoscaling adds these mid-run)."""
    return SimInstance(instance_id, pool, EngineModel(latency, pool.engine, role=pool.role), latency, index,
                       started_s=started_s)


def build_instances(config: ClusterConfig) -> list[SimInstance]:
    """One ``SimInstance`` per configured instance, ids ``<pool>-<n>``; latency models shared per pool."""
    out: list[SimInstance] = []
    for k, pool in enumerate(config.pools):
        latency = pool_latency(config, pool)
        for n in range(pool.count):
            try:
                engine = EngineModel(latency, pool.engine, role=pool.role)
            except ValueError as e:  # the weights leave no KV memory: say which pool, and what to change
                raise ValueError(f"pools[{k}] ({pool.name}): {config.model.name} on {pool.gpu} x TP{pool.tp}: {e}; "
                                 "use more GPUs per instance (tp) or a larger GPU") from None
            out.append(SimInstance(f"{pool.name}-{n}", pool, engine, latency, len(out)))
    if not out:
        raise ValueError("pools: the config defines no instances (every pool has count 0)")
    # Every request needs both phases: without either it would wait forever (a run that never ends).
    for phase, can in (("prefill", lambda r: r.does_prefill), ("decode", lambda r: r.does_decode)):
        if not any(can(x.role) for x in out):
            raise ValueError(f"pools: no instance can {phase} (roles: "
                             f"{', '.join(sorted({x.role.value for x in out}))}); add a mixed or {phase} pool")
    return out
