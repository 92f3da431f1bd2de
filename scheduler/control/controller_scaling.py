"""The Controller's scaling loop (``ControllerScaling``, a mixin of ``Controller``): the scaling policy decides on the
live view every ``scaling_interval_s`` (``_apply_scale``: scale-ups take draining instances back first, then raise
the pool's desired count; scale-downs call off instances being placed, then drain members), drained instances are
released once idle (``_release_drained``), KubeRay worker groups are grown and shrunk, and role switches advance
(``scheduler.control.reroling``). ``_WorkloadWindow`` is what the loop observes for the SLA scaler."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import Any

import ray

from scheduler.control.placement import bundle_nodes
from scheduler.control.util import _await, _index_of, _pool_of
from scheduler.core.types import ClusterView, InstanceRole, InstanceSnapshot
from scheduler.policy.scaling import (
    PrefixHitWindow,
    ScaleDecision,
    ScalingLoop,
    WorkloadSummary,
    make_scaling_policy,
    observed_span_s,
)

# NOTE: the Controller's logger: these are Controller methods, and deployments tune (benches silence) it by that name.
log = logging.getLogger("scheduler.control.controller")

# The roles that serve each phase.
_PREFILLS = frozenset({InstanceRole.PREFILL, InstanceRole.MIXED})
_DECODES = frozenset({InstanceRole.DECODE, InstanceRole.MIXED})


class ControllerScaling:
    """``Controller``'s scaling-loop methods. A mixin (the Controller is one Ray actor): they read and change its
    members, snapshots, desired sizes and drains, all set up in ``Controller.__init__``."""

    def _init_scaling_policy(self) -> None:
        spec = self.config.policies.scaling
        if spec is None:
            return
        where = "policies.scaling.params"
        try:  # the loop's values as ``llmsched simulate`` reads them (ScalingLoop)
            loop, params = ScalingLoop.split(spec.params)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        self._scaling_interval_s, self._drain_timeout_s = loop.interval_s, loop.drain_timeout_s
        self._workload = _WorkloadWindow(loop.window_s)
        if spec.name == "sla":
            params.setdefault("config", self.config)
        try:
            policy = make_scaling_policy(spec.name, pool_of=self._pool_of, **params)
        except TypeError as e:
            raise ValueError(f"{where}: {e}") from None
        self._scaling = None if policy.name == "none" else policy

    def _pool_of(self, snap: InstanceSnapshot) -> str:
        m = self._members.get(snap.instance_id)
        return m.info.pool if m is not None else _pool_of(snap.instance_id)

    def _save_draining(self) -> None:
        self._kv_put("draining", sorted(self._draining))

    def _load_draining(self) -> None:
        """After a restart: scale-downs in progress continue (their instances were adopted, still draining); one
        whose instance went while no Controller ran is counted out as its release would have (``_end_scale_down``:
        dropped, the reconcile replaced it and undid the scale-down)."""
        for iid in self._kv_get("draining") or []:
            self._draining[iid] = (time.time() + self._drain_timeout_s, 0)
            if iid not in self._members:
                self._end_scale_down(iid, _pool_of(iid))

    def _drop_operator_drain(self, iid: str) -> None:
        if iid in self._operator_drained:
            self._operator_drained.discard(iid)
            self._kv_put("operator_draining", sorted(self._operator_drained))

    def _held(self) -> set[str]:
        """Instances drained by someone other than the scaling loop -- an operator's drain, a role switch: not
        capacity, and not the scaling loop's to drain or take back (each un-drains its own when done)."""
        return self._operator_drained | set(self._switcher.switching)

    def _last_for(self, iid: str, going: frozenset[str] = frozenset()) -> str | None:
        """The phase ("prefill" / "decode") that no live instance but ``iid`` serves (others drained or switching
        do not count, nor those in ``going``), or None. Draining or switching it away would leave that phase to
        nobody: its requests could not move and new ones would fail."""
        held = self._held() | set(self._draining) | going
        others = [m.info.role for i, m in self._members.items() if i != iid and i not in held]
        for phase, roles in (("prefill", _PREFILLS), ("decode", _DECODES)):
            if self._members[iid].info.role in roles and not any(r in roles for r in others):
                return phase
        return None

    def _drained(self, iid: str, since_round: int) -> bool:
        """A snapshot taken after ``iid`` started draining (refresh round ``since_round``) shows it idle, and no
        ingress has a request registered on it."""
        snap = self._snapshots.get(iid)
        self._registry.expire()  # a dead ingress' entries would keep it from ever counting as drained
        return (
            snap is not None and snap.draining and self._refresh_round > since_round + 1
            and snap.num_running + snap.num_waiting == 0 and not self._registry.on_instance(iid)
        )

    async def _scaling_loop(self) -> None:
        """Every round (<= 1 s): observe the workload, release drained instances, shrink worker groups when due;
        every ``scaling_interval_s``: run the scaling policy and apply its decisions."""
        period = min(self._scaling_interval_s, 1.0)
        next_decide = time.monotonic() + self._scaling_interval_s
        switcher = self._switcher
        if switcher.policy is not None:
            period = min(period, switcher.interval_s)
        next_switch = time.monotonic() + switcher.interval_s
        try:
            self._load_draining()
            switcher.load()
        except Exception:
            log.exception("reading the draining / switching sets failed")
        while True:
            await asyncio.sleep(period)
            try:
                self._workload.observe(time.time(), self._snapshots.values(), self._registry.entries)
                await self._release_drained()
                await switcher.advance()
                if self._scaling is not None and time.monotonic() >= next_decide:
                    next_decide = time.monotonic() + self._scaling_interval_s
                    await self._scaling_tick()
                if switcher.policy is not None and time.monotonic() >= next_switch:
                    next_switch = time.monotonic() + switcher.interval_s
                    await switcher.tick(time.time())
                # Not while a release is in flight: its pod, no member's any more, would read as idle and go
                # (killing the instance in its streams' hand-over).
                if (self._k8s_shrink_due and self._k8s is not None and not self._pending and not self._draining
                        and not self._releasing):
                    await self._k8s_shrink()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("scaling round failed")

    async def _scaling_tick(self) -> None:
        assert self._scaling is not None
        now = time.time()
        view = ClusterView(now, tuple(self._snapshots[i] for i in sorted(self._snapshots) if i in self._members))
        if not view.instances:
            return
        for d in self._scaling.decide(view, now, self._workload.summary(now)):
            await self._apply_scale(d)

    def _active(self, pool: str, *, held: bool = False) -> list[str]:
        """Instances of ``pool`` that count as capacity: live and not draining for a scale-down, plus those being
        created. ``held``: also those an operator's drain or a role switch holds -- not capacity now, but members
        the pool's desired size counts (they serve again once un-drained)."""
        skip = set() if held else self._held()
        live = [i for i, m in self._members.items()
                if m.info.pool == pool and i not in self._draining and i not in skip]
        return live + [i for i in self._pending if _pool_of(i) == pool and i not in live]

    async def _apply_scale(self, d: ScaleDecision) -> None:
        if d.pool not in self._pools:
            log.warning("scaling policy named unknown pool %r; pools: %s", d.pool, ", ".join(sorted(self._pools)))
            return
        active = self._active(d.pool)
        n = len(active)
        new = max(n + d.delta if d.delta is not None else int(d.target or 0), 0)
        # The policy counts from its view, which lags a just-placed instance (a member before its first snapshot):
        # its delta applied to this count could pass its own bounds (seen: 1 -> 2 -> 3 with max_instances 2).
        lo, hi = getattr(self._scaling, "min_instances", 0), getattr(self._scaling, "max_instances", None)
        # Never below the minimum (unless already below it), nor below one instance: a pool without an instance
        # leaves the policy's view and no load could scale it up again (the simulator keeps one too).
        new = max(new, min(max(lo, 1), n))
        if hi is not None:
            new = min(new, max(hi, n))  # nor above the maximum
        event = {"time_s": time.time(), "pool": d.pool, "from": n, "to": new, "reason": d.reason}

        def load(i: str) -> tuple[int, int]:
            s = self._snapshots.get(i)
            return (s.num_running + s.num_waiting, s.kv_blocks_used) if s is not None else (0, 0)

        if new > n:
            # A delta comes from a view that may lag the instances being placed (its +1 may be for load they will
            # take): deferred while any is. A target counts them (``n`` does): applied at once, as the simulator
            # does -- deferring it dropped it, and the policy, which booked it as starting, asked again only
            # ``startup_delay_s`` later.
            if d.delta is not None and any(i in self._pending for i in active):
                log.info("pool %s: scale-up to %d deferred, a previous one is still being placed", d.pool, new)
                return
            # Instances of the pool still draining are up and warm: taken back first (busiest first), as the
            # simulator's applier does -- a start costs the model's load -- and as the policy books it.
            # Only the scaling loop's own drains: an operator's drain (or a role switch) of one of them still runs.
            held = self._held()
            back = sorted((i for i in self._draining if i in self._members and i not in held
                           and self._members[i].info.pool == d.pool), key=load, reverse=True)[: new - n]
            for iid in back:
                await self._end_drain(iid)
            if new - n - len(back):
                await self._set_desired(d.pool, self._desired.get(d.pool, 0) + new - n - len(back))
                assert self._lock is not None
                await self._reconcile(wait=False)
            self.scaling_stats["up"] += 1
            self._scaling_events.append({**event, "action": "up", "undrained": back})
            log.info("pool %s: scale up %d -> %d (%s)%s", d.pool, n, new, d.reason,
                     f", taking back {', '.join(back)}" if back else "")
        elif new < n:
            # Instances still being placed serve nothing yet: called off first (newest first), as the simulator's
            # applier cancels its starting ones -- draining members for them left the pool nothing to route to
            # until the new ones loaded. Then the chosen members drain.
            placing = sorted((i for i in active if i in self._pending), key=lambda i: _index_of(i) or 0)
            off = placing[::-1][: n - new]
            for iid in off:
                self._pending.pop(iid).cancel()  # ``_create`` removes what it had placed
            if off:
                await self._set_desired(d.pool, max(self._desired.get(d.pool, 0) - len(off), 0))
            members = [i for i in active if i in self._members]
            order = [i for i in d.drain if i in members]
            order += sorted((i for i in members if i not in order), key=load)
            chosen = order[: n - new - len(off)]
            for iid in chosen:
                await self._begin_drain(iid)
            self.scaling_stats["down"] += 1
            self._scaling_events.append({**event, "action": "down", "draining": chosen, "called_off": off})
            log.info("pool %s: scale down %d -> %d, draining %s%s (%s)", d.pool, n, new, ", ".join(chosen) or "none",
                     f", calling off {', '.join(off)}" if off else "", d.reason)

    async def _begin_drain(self, iid: str) -> None:
        m = self._members.get(iid)
        if m is None or iid in self._draining:
            return
        # Recorded before the call: a call whose reply comes late may still land, and an instance draining that
        # nothing tracks would never be released nor serve again. One that never drained is released at deadline.
        self._draining[iid] = (time.time() + self._drain_timeout_s, self._refresh_round)
        self._save_draining()
        try:
            await asyncio.wait_for(_await(m.handle.set_draining.remote(True)), 5.0)
        except Exception as e:  # noqa: BLE001 - the other chosen instances still drain
            log.warning("draining %s for a scale-down: %s (released at its deadline)", iid, type(e).__name__)

    async def _end_drain(self, iid: str) -> None:
        """A scale-up takes a draining instance back: it routes again, and is no longer released."""
        # Forgotten before the call: once it lands (even with a late reply) the instance serves again, and the
        # drain deadline must not force-release it with its requests.
        self._draining.pop(iid, None)
        self._save_draining()
        m = self._members.get(iid)
        if m is None:
            return
        try:
            await asyncio.wait_for(_await(m.handle.set_draining.remote(False)), 5.0)
        except Exception as e:  # noqa: BLE001 - a late call still lands; a dead instance is replaced
            log.warning("taking %s back from draining: %s", iid, type(e).__name__)

    async def _release_drained(self) -> None:
        """Release each draining instance once a snapshot taken after draining shows it idle and no request is
        registered on it (or at its deadline: its remaining requests are then recovered elsewhere)."""
        for iid, (deadline, since_round) in list(self._draining.items()):
            gone = iid not in self._members
            idle = self._drained(iid, since_round)
            if not (gone or idle or time.time() >= deadline):
                continue
            del self._draining[iid]
            self._save_draining()
            self._k8s_shrink_due = True
            if gone:
                continue
            if not idle:
                self.scaling_stats["forced_releases"] += 1
                log.warning("instance %s still busy after drain_timeout_s %.0fs: releasing it", iid,
                            self._drain_timeout_s)
            # The pool shrinks by this instance unless an admin scale already counted it out meanwhile.
            pool = self._members[iid].info.pool
            serving = sum(1 for i in self._active(pool, held=True) if i != iid)
            await self._release_from_pool(iid, replace=self._desired.get(pool, 0) <= serving)
            self.scaling_stats["released"] += 1
            self._scaling_events.append({"time_s": time.time(), "action": "released", "instance": iid})

    async def _set_desired(self, pool: str, count: int) -> int:
        """The one path that changes a pool's desired size (admin ``scale`` and the scaling loop): grows the
        KubeRay worker group first when the pool gets bigger; a smaller pool shrinks it later, once released."""
        before = self._desired.get(pool, 0)
        if count > before:
            await self._k8s_grow({**self._desired, pool: count})
        elif count < before:
            self._k8s_shrink_due = True
        self._desired[pool] = count
        self._save_desired()
        return before

    async def _k8s_grow(self, counts: dict[str, int]) -> None:
        if self._k8s is None:
            return
        try:
            results = await asyncio.wait_for(asyncio.to_thread(self._k8s.grow, self.config, counts), 60.0)
        except Exception as e:  # noqa: BLE001 - instances are still asked for; they place when capacity comes
            self.scaling_stats["k8s_errors"] += 1
            log.warning("growing KubeRay worker groups for %s failed: %s", counts, e)
            return
        for r in results:
            self.scaling_stats["k8s_resizes"] += 1
            self._scaling_events.append({"time_s": time.time(), "action": "k8s_grow", "group": r.group,
                                         "from": r.previous, "to": r.replicas})

    async def _k8s_shrink(self) -> None:
        assert self._k8s is not None
        try:
            idle = await asyncio.to_thread(self._idle_workers)
            results = await asyncio.wait_for(
                asyncio.to_thread(self._k8s.shrink, self.config, dict(self._desired), idle_workers=idle), 60.0
            )
        except Exception as e:  # noqa: BLE001 - retried next round
            self.scaling_stats["k8s_errors"] += 1
            log.warning("shrinking KubeRay worker groups failed: %s", e)
            return
        self._k8s_shrink_due = False
        for r in results:
            self.scaling_stats["k8s_resizes"] += 1
            self._scaling_events.append({"time_s": time.time(), "action": "k8s_shrink", "group": r.group,
                                         "from": r.previous, "to": r.replicas})

    def _idle_workers(self) -> dict[str, list[str]]:
        """Worker group -> pod names of alive Ray nodes of its GPU type that host none of this deployment's
        instances (a KubeRay pod's hostname is its name)."""
        from scheduler.control.placement import find_pg, gpu_type_resource, pg_name

        assert self._k8s is not None
        busy: set[str] = set()
        for iid, m in list(self._members.items()):
            if m.info.node_id:
                busy.add(m.info.node_id)
            pg = find_pg(pg_name(self.cluster, iid))
            if pg is not None:
                busy.update(bundle_nodes(pg))
        groups = {gpu_type_resource(p.gpu): self._k8s.group_of_gpu(p.gpu) for p in self.config.pools}
        out: dict[str, list[str]] = {}
        for node in ray.nodes():
            if not node.get("Alive") or node.get("NodeID") in busy:
                continue
            for res, group in groups.items():
                if res in (node.get("Resources") or {}):
                    out.setdefault(group, []).append(node.get("NodeManagerHostname") or node["NodeID"])
        return out

    async def scaling_counters(self) -> dict[str, int]:
        sw = self._switcher.stats
        return {**self.scaling_stats, "role_switches": sw["switches"], "role_switches_abandoned": sw["abandoned"]}

    async def scaling_events(self) -> list[dict[str, Any]]:
        """Recent scale-ups, scale-downs, releases, worker-group resizes and role switches (oldest first)."""
        return list(self._scaling_events)


class _WorkloadWindow:
    """Arrival rate and mean prompt/output lengths over the last ``window_s``, from what the Controller sees:
    requests in instance snapshots (prompt = KV length - generated) and in the ingresses' registry reports; the
    prompt tokens the instances served from their prefix caches (``PrefixHitWindow``, as the simulator's driver).
    Feeds the SLA scaler's ``observed``; an estimate (requests shorter than a refresh round may be missed)."""

    def __init__(self, window_s: float = ScalingLoop.window_s) -> None:
        self.window_s = window_s
        self.started_s: float | None = None
        self._live: dict[str, int] = {}  # request id -> generated tokens last seen
        self._prompt: dict[str, int] = {}  # request id -> its prompt tokens as first seen
        self._ended: dict[str, float] = {}  # recently ended ids (a P->D handoff gap is not a new arrival)
        self._arrivals: deque[tuple[float, int | None, int | None]] = deque()  # (time, prompt, priority)
        self._outputs: deque[tuple[float, int]] = deque()
        self._hits = PrefixHitWindow(window_s)

    def observe(self, now: float, snapshots: Any, registry: Any) -> None:
        # NOTE: the first look finds requests already in flight (a Controller restarted under load): load already
        # placed, not arrivals -- counted as arrivals, 60 of them read 12 req/s at the first decision.
        first = self.started_s is None
        if first:
            self.started_s = now
        snapshots = list(snapshots)
        self._hits.observe(now, snapshots)
        loads: dict[str, list[Any]] = {}
        for s in snapshots:
            for r in s.requests:
                loads.setdefault(r.request_id, []).append(r)
        current: dict[str, tuple[int | None, int, int | None]] = {}  # id -> (prompt, made, priority)
        for rid, rs in loads.items():
            # The prompt as first seen, and the outputs as the KV grown past it: ``generated_tokens`` counts those
            # made on the engine listing it, and a decode leg, a migrated or a recovered request has the ones made
            # elsewhere in its prompt there (read alone, a migrated request's output was what it made after the move).
            prompt = self._prompt.get(rid)
            if prompt is None:
                prompt = min(max(r.context_tokens - r.generated_tokens, 0) for r in rs)
            made = max(max(r.context_tokens - prompt, r.generated_tokens) for r in rs)
            current[rid] = (prompt, max(made, self._live.get(rid, 0)), rs[0].priority)
        for rid in list(registry):
            current.setdefault(rid, (None, self._live.get(rid, 0), None))
        for rid, (prompt, _, prio) in current.items():
            if rid not in self._live and rid not in self._ended and not first:
                self._arrivals.append((now, prompt, prio))
        for rid in self._live.keys() - current.keys():
            self._ended[rid] = now
            self._outputs.append((now, self._live[rid]))
        self._live = {rid: gen for rid, (_, gen, _) in current.items()}
        self._prompt = {rid: p for rid, (p, _, _) in current.items() if p is not None}
        cut = now - self.window_s
        while self._arrivals and self._arrivals[0][0] < cut:
            self._arrivals.popleft()
        while self._outputs and self._outputs[0][0] < cut:
            self._outputs.popleft()
        self._ended = {k: t for k, t in self._ended.items() if t >= cut}

    def summary(self, now: float) -> WorkloadSummary:
        span = observed_span_s(self.window_s, now - (self.started_s or now))
        prompts = [p for _, p, _ in self._arrivals if p is not None]
        outs = [o for _, o in self._outputs if o > 0]
        prompt = sum(prompts) / len(prompts) if prompts else 512.0
        return WorkloadSummary(
            rate_rps=len(self._arrivals) / span,
            mean_prompt_tokens=prompt,
            mean_output_tokens=sum(outs) / len(outs) if outs else 128.0,
            mean_cached_prompt_tokens=self._hits.per_request(len(self._arrivals), prompt),
            priorities=tuple(sorted({c for _, _, c in self._arrivals if c is not None})),
        )
