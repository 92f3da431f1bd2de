"""Autoscaling in the simulator: the same scaling policies as the live controller, applied to simulated instances.

Every ``scaling_interval_s`` the driver hands the policy (``scheduler.policy.scaling``) the simulator's view and
an observed ``WorkloadSummary`` of the last ``window_s`` seconds, and applies its ``ScaleDecision``s:

* **scale-up**: first un-drain instances of the pool that are draining (their engine is still loaded: they take
  traffic again at once); then start new ``SimInstance``s of the pool. A started instance costs GPU time from the
  start request on, but only joins the routers' view ``startup_delay_s`` later (model load + engine warm-up;
  default 60 s, about what a 7B-13B vLLM engine takes to pull weights from a local cache and capture graphs).
* **scale-down**: first cancel instances still starting (newest first; they serve nothing yet); then mark
  instances draining -- the decision's ``drain`` ids first, then the least loaded. Routers skip draining
  instances (``scheduler.policy.filters``); their requests finish in place, or move if a migration policy runs
  (Llumnix's drain trigger). An instance is removed when it holds no request, no KV reservation and no P->D KV
  transfer is on its way to it. At least one accepting instance per pool is always kept.

GPU-hours count each instance from its start request (``started_s``; 0 for the configured instances) to its
removal (``stopped_s``; the makespan for instances alive at the end): ``SimResult.instance_lifetime_s``.

The observed summary: arrival rate and mean prompt tokens of the requests that arrived in the window; mean output
tokens of the requests that *finished* in the window (what a live controller can measure); the prompt tokens the
instances served from their prefix caches in the window, per arrival (``PrefixHitWindow``, as the Controller); the
priority classes of the window's arrivals (``SLAScaler`` sizes for their SLOs).
Before any request has finished, the mean output of the window's arrivals stands in (a cold-start oracle, for the
first seconds only).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from scheduler.policy.scaling import (
    PrefixHitWindow,
    ScaleDecision,
    ScalingLoop,
    WorkloadSummary,
    observed_span_s,
)
from sim.cluster import SimInstance, new_instance, pool_latency

if TYPE_CHECKING:
    from sim.simulator import Simulator


@dataclass(frozen=True, slots=True)
class ScaleEvent:
    """One applied change: ``change`` > 0 instances started / un-drained, < 0 cancelled / drained."""

    time_s: float
    pool: str
    change: int
    reason: str


class ScalingDriver:
    """Runs ``sim.scaling`` inside one simulation run (see the module docstring)."""

    def __init__(self, sim: Simulator, *, startup_delay_s: float = ScalingLoop.startup_delay_s,
                 window_s: float = ScalingLoop.window_s, min_accepting: int = 1) -> None:
        if startup_delay_s < 0 or window_s <= 0:
            raise ValueError(f"scaling: need startup_delay_s >= 0 and window_s > 0, got {startup_delay_s}, {window_s}")
        self.sim = sim
        self.policy = sim.scaling
        self.startup_delay_s = startup_delay_s
        self.window_s = window_s
        self.min_accepting = min_accepting
        if hasattr(self.policy, "startup_delay_s"):
            self.policy.startup_delay_s = startup_delay_s  # the policy's own "starting" accounting must agree
        self.live: list[SimInstance] = list(sim.instances)  # routable or draining
        sim._live = self.live
        self.starting: list[SimInstance] = []  # started, not routable yet
        self.applied = 0  # decisions that changed something
        self.started = 0
        self.removed = 0
        self.events: list[ScaleEvent] = []
        self.history: list[tuple[float, int, int, int]] = []  # (t, accepting, starting, draining) per tick
        self._key: dict[str, str] = {}  # instance id -> pool key (the policy's pool_of)
        self._spec: dict[str, object] = {}  # pool key -> PoolSpec new instances are made from
        self._lat: dict[str, object] = {}  # PoolSpec name -> latency model
        self._next_n: dict[str, int] = {}  # PoolSpec name -> next instance number
        for inst in sim.instances:
            key = self.policy.pool_of(inst.make_snapshot(0.0, detail=False))  # type: ignore[union-attr]
            self._key[inst.instance_id] = key
            self._spec.setdefault(key, inst.pool)
            self._lat.setdefault(inst.pool.name, inst.latency)
            self._next_n[inst.pool.name] = self._next_n.get(inst.pool.name, 0) + 1
        self._last_output: float | None = None
        self._hits = PrefixHitWindow(window_s)

    # ---- events ------------------------------------------------------------------------------------------------
    def on_event(self, payload: SimInstance | None, now: float) -> bool:
        """A tick (``payload`` None; returns True so the simulator schedules the next) or an instance ready."""
        if payload is not None:
            self._ready(payload, now)
            return False
        sim = self.sim
        view = sim.policy_view(now)
        self._hits.observe(now, view.instances)
        for d in self.policy.decide(view, now, self.observe(now)):  # type: ignore[union-attr]
            self.apply(d, now)
        drn = sum(1 for x in self.live if x.draining)
        self.history.append((now, len(self.live) - drn, len(self.starting), drn))
        return True

    def on_idle(self, inst: SimInstance, now: float) -> None:
        """The simulator found ``inst`` (draining) without work: remove it if nothing is still on its way."""
        if inst.draining and inst.stopped_s is None and self.sim.is_empty(inst):
            self._remove(inst, now)

    def finish(self, end: float) -> None:
        """End of run: instances still alive (or starting) stay counted up to ``end`` (``stopped_s`` None)."""

    # ---- observation ---------------------------------------------------------------------------------------------
    def observe(self, now: float) -> WorkloadSummary:
        w, sim = self.sim.w, self.sim
        lo_t = now - self.window_s
        lo = int(np.searchsorted(w.arrival_s, lo_t, side="right"))
        hi = int(np.searchsorted(w.arrival_s, now, side="right"))
        rate = (hi - lo) / observed_span_s(self.window_s, now)
        prompt = float(w.prompt_tokens[lo:hi].mean()) if hi > lo else 0.0
        done = (sim.finish > lo_t) & (sim.finish <= now)
        if done.any():
            self._last_output = float(w.output_tokens[done].mean())
        output = self._last_output
        if output is None:  # nothing finished yet: cold-start stand-in (see module docstring)
            output = float(w.output_tokens[lo:hi].mean()) if hi > lo else 1.0
        return WorkloadSummary(rate, prompt, output, self._hits.per_request(hi - lo, prompt),
                               tuple(int(p) for p in np.unique(w.priority[lo:hi])) if w.priority is not None
                               else (0,) * (hi > lo))

    # ---- applying decisions --------------------------------------------------------------------------------------
    def pool_key(self, inst: SimInstance) -> str:
        return self._key[inst.instance_id]

    def apply(self, d: ScaleDecision, now: float) -> int:
        """Apply one decision; returns the change made (instances)."""
        if d.pool not in self._spec:
            return 0  # a pool this cluster has no template for
        accepting = [x for x in self.live if not x.draining and self._key[x.instance_id] == d.pool]
        starting = [x for x in self.starting if self._key[x.instance_id] == d.pool]
        have = len(accepting) + len(starting)
        change = d.delta if d.delta is not None else d.target - have  # type: ignore[operator]
        done = 0
        if change > 0:
            draining = sorted((x for x in self.live if x.draining and self._key[x.instance_id] == d.pool),
                              key=lambda x: -x.engine.num_requests)
            for x in draining[:change]:
                x.draining = False
                x.snap_dirty = True
                done += 1
            for _ in range(change - done):
                self._start(d.pool, now)
                done += 1
        elif change < 0:
            k = -change
            for x in reversed(starting):
                if done == k:
                    break
                self.starting.remove(x)
                x.stopped_s = now
                self.removed += 1
                done += 1
            by_id = {x.instance_id: x for x in accepting}
            order = [by_id[i] for i in d.drain if i in by_id]
            order += sorted((x for x in accepting if x.instance_id not in set(d.drain)),
                            key=lambda x: (x.engine.num_requests, x.engine.blocks_used()))
            left = len(accepting)
            for x in order:
                if done == k or left <= self.min_accepting:
                    break
                x.draining = True
                x.snap_dirty = True
                left -= 1
                done += 1
                if not x.busy and self.sim.is_empty(x):
                    self._remove(x, now)
            done = -done
        if done:
            self.applied += 1
            self.events.append(ScaleEvent(now, d.pool, done, d.reason))
            self.sim._view = None  # structural change: full refresh at the next route
        return done

    def _start(self, key: str, now: float) -> SimInstance:
        sim = self.sim
        spec = self._spec[key]
        lat = self._lat.get(spec.name)  # type: ignore[attr-defined]
        if lat is None:
            lat = self._lat[spec.name] = pool_latency(sim.config, spec)  # type: ignore[attr-defined,arg-type]
        n = self._next_n.get(spec.name, 0)  # type: ignore[attr-defined]
        self._next_n[spec.name] = n + 1  # type: ignore[attr-defined]
        inst = new_instance(spec, lat, f"{spec.name}-{n}", len(sim.instances), started_s=now)  # type: ignore[arg-type]
        self._key[inst.instance_id] = key
        sim.instances.append(inst)
        sim._ids.append(inst.instance_id)
        sim._index[inst.instance_id] = inst
        sim.join_host(inst, now)
        self.starting.append(inst)
        self.started += 1
        from sim.simulator import EventKind

        sim._push(now + self.startup_delay_s, EventKind.SCALE, None, inst)
        return inst

    def _ready(self, inst: SimInstance, now: float) -> None:
        if inst not in self.starting:
            return  # cancelled while starting
        self.starting.remove(inst)
        self.live.append(inst)
        inst.snap_dirty = True
        self.sim._view = None

    def _remove(self, inst: SimInstance, now: float) -> None:
        inst.stopped_s = now
        self.live.remove(inst)
        self.removed += 1
        self.sim._view = None

    # ---- reporting -----------------------------------------------------------------------------------------------
    def summary(self) -> dict:
        ups = sum(1 for e in self.events if e.change > 0)
        return {"scale_events": self.applied, "scale_ups": ups, "scale_downs": self.applied - ups,
                "instances_started": self.started, "instances_removed": self.removed,
                "peak_instances": max((a + s + d for _, a, s, d in self.history), default=len(self.live)),
                "startup_delay_s": self.startup_delay_s}


__all__ = ["ScaleEvent", "ScalingDriver"]
