"""The discrete-event simulator: a virtual clock driving the same policies as the live control plane.

Events live in one heap keyed ``(time, EventKind, seq)``; the kind breaks ties (an arrival at ``t`` is seen by
a step starting at ``t``) and ``seq`` keeps the order stable. Arrivals are merged from the trace arrays rather
than pushed up front, so a 1M-request trace costs no heap space.

Speed comes from ``EngineModel.plan_span``: an instance whose batch cannot change advances many decode steps
as one event; an arrival routed to it mid-span interrupts the span at the next step boundary.
"""

from __future__ import annotations

import dataclasses
import enum
import heapq
import itertools
import math
import time as _time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from scheduler.config.models import ClusterConfig
from scheduler.core.types import (
    ClusterView,
    InstanceRole,
    InstanceSnapshot,
    Rejected,
    RequestInfo,
    RequestLoad,
)
from scheduler.engine_model import StepResult
from scheduler.latency import kv_transfer_between
from scheduler.latency.model import prefill_pairs
from scheduler.policy.admission import AdmissionPolicy, make_admission_policy
from scheduler.policy.route import RouteDecision, Router, make_router
from scheduler.policy.scaling import ScalingLoop, check_reroling_without_scaling
from scheduler.predict.base import LengthPrediction
from scheduler.predict.serving import serving_predictor
from sim.cluster import SimInstance, build_instances
from sim.migration import MigrationDriver
from sim.poll import IngressPoll


class EventKind(enum.IntEnum):
    """Same-time order: new work first, so a step starting at ``t`` sees everything that arrived at ``t``."""

    # A request's off-step CPU on the host is spent (``LatencyModel.request_cpu``); before a KV arrival at the
    # same time, so the handoff it ends does not charge the request's own first decode step.
    HOST = -1
    NOISE = -2  # the host's speed moves: a new draw of each engine's step multiplier (``LatencyModel.host_noise``)
    ARRIVAL = 0
    KV_ARRIVE = 1
    MIGRATE_COMMIT = 2  # last stage landed: the destination resumes the request
    MIGRATE_FINAL = 3  # pre-copy stages done: stop the request on the source, copy the rest
    # (Idle instances given work by the kinds above start their step here, after the instant's last of them:
    # ``Simulator.start``. The kinds below read the cluster with those steps started, as before; a tie with them is
    # two clocks meeting, not a burst.)
    POLICY = 4  # periodic policy loop (migration)
    STEP = 5
    SCALE = 6  # scaling policy tick, or a started instance becoming routable (sim/scaling.py)
    REROLE = 7  # re-roling policy tick, or a switching instance taking its new role (sim/reroling.py)
    POLL = 8  # the ingress's poll round (opt-in, ``ingress_poll_s``): an ask, a mid-span answer, a round's timeout


@dataclass
class Workload:
    """Per-request input columns (numpy arrays, index = request number)."""

    arrival_s: np.ndarray
    prompt_tokens: np.ndarray
    output_tokens: np.ndarray
    priority: np.ndarray | None = None
    predicted_output: np.ndarray | None = None
    # The distributions behind ``predicted_output`` where a predictor made it (renew a guess that ran out:
    # ``LengthPrediction.expected_remaining``); None for exact lengths and client hints.
    predicted_dist: list[LengthPrediction] | None = None
    hash_ids: list[tuple[int, ...]] | None = None
    # Each request's app / tenant (a trace's tenant column; None or "" = the config's): the predictor's, as a live
    # request's ``tenant`` (``ServingPredictor.tenant_for``).
    tenant: list[str | None] | None = None
    name: str = "workload"
    hash_block_tokens: int = 512  # prompt tokens per hash id (Mooncake's block size)

    def __post_init__(self) -> None:
        n = len(self.arrival_s)
        if len(self.prompt_tokens) != n or len(self.output_tokens) != n:
            raise ValueError("workload: arrival_s, prompt_tokens and output_tokens must have equal length")
        if n and not np.all(np.isfinite(self.arrival_s)):  # a NaN passed the order check below, then was never run
            raise ValueError("workload.arrival_s: arrivals must be finite")
        if n and np.any(np.diff(self.arrival_s) < 0):
            raise ValueError("workload.arrival_s: arrivals must be non-decreasing")
        for name in ("prompt_tokens", "output_tokens"):
            # A 0 was not refused here but by the engine at its arrival: counted as a rejection like a request too
            # long for the cluster, with nothing naming it (a ``Trace`` refuses it; its loaders drop such rows and
            # count them in ``skipped_rows``).
            col = np.asarray(getattr(self, name))
            if n and col.min() < 1:
                k = int(np.argmax(col < 1))
                raise ValueError(f"workload.{name}[{k}]: request {k} has {int(col[k])} tokens; must be >= 1")
        if self.hash_ids is not None and len(self.hash_ids) != n:  # request i would read another's prefix blocks
            raise ValueError(f"workload.hash_ids: {len(self.hash_ids)} entries for {n} requests")
        if self.tenant is not None:
            if len(self.tenant) != n:
                raise ValueError(f"workload.tenant: {len(self.tenant)} entries for {n} requests")
            # A trace's column is a numpy object array: plain names, and an empty one is none (as on the API).
            self.tenant = [str(t) if t is not None and str(t) else None for t in self.tenant]
        if self.predicted_dist is not None and (self.predicted_output is None or len(self.predicted_dist) != n):
            raise ValueError(f"workload.predicted_dist: needs predicted_output and {n} entries")
        if self.hash_block_tokens < 1:
            raise ValueError(f"workload.hash_block_tokens: must be >= 1, got {self.hash_block_tokens}")

    def __len__(self) -> int:
        return len(self.arrival_s)

    @property
    def rate_rps(self) -> float:
        """Mean arrival rate: requests over the span from first to last arrival (one request: the span is floored
        at 1 ns, not divided by zero)."""
        return len(self) / max(float(self.arrival_s[-1] - self.arrival_s[0]), 1e-9)

    @property
    def priorities(self) -> np.ndarray:
        """Each request's priority class (0 where the workload gives none)."""
        return self.priority if self.priority is not None else np.zeros(len(self), dtype=np.int64)

    @classmethod
    def from_trace(cls, trace, *, predicted_output: np.ndarray | None = None) -> Workload:
        return cls(
            arrival_s=np.asarray(trace.arrival_s, dtype=np.float64),
            prompt_tokens=np.asarray(trace.prompt_tokens, dtype=np.int64),
            output_tokens=np.asarray(trace.output_tokens, dtype=np.int64),
            predicted_output=predicted_output,
            hash_ids=getattr(trace, "hash_ids", None),
            tenant=getattr(trace, "tenant", None),
            name=getattr(trace, "name", "trace"),
        )


@dataclass
class SimResult:
    """Per-request outcome columns plus run-level counters. ``nan`` = did not happen."""

    workload: Workload
    config_name: str
    router: str
    first_token_s: np.ndarray
    finish_s: np.ndarray
    admit_s: np.ndarray
    instance: np.ndarray
    decode_instance: np.ndarray
    preemptions: np.ndarray
    rejected: np.ndarray
    instance_ids: list[str]
    instance_busy_s: np.ndarray
    instance_gpus: np.ndarray
    instance_price_per_hour: np.ndarray
    makespan_s: float
    events: int
    steps: int
    wall_seconds: float
    kv_transfers: int = 0
    kv_transfer_s: float = 0.0
    timeline_t: np.ndarray = field(default_factory=lambda: np.zeros(0))
    timeline_load: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))
    migrations: int = 0
    slo_ttft_s: np.ndarray | None = None
    slo_tpot_s: np.ndarray | None = None
    prefix_hit_tokens: int = 0  # prompt tokens served from instances' prefix caches (not recomputed)
    # Per-instance lifetimes (autoscaling): alive from ``instance_started_s`` (start requested) to
    # ``instance_stopped_s`` (removed; the makespan for instances alive at the end). ``None``: static cluster,
    # every instance alive for the whole makespan.
    instance_started_s: np.ndarray | None = None
    instance_stopped_s: np.ndarray | None = None
    scale_events: int | None = None  # ScaleDecisions applied (None: no scaling policy)
    role_switches: int | None = None  # re-roling switches completed (None: no re-roling policy)
    # Requests whose prompt + output exceed the model's max_model_len: the live ingress refuses them; the simulator
    # serves them as if the context were longer (``over_context``).
    over_max_model_len: int = 0
    same_instant_batching: bool = False  # the run's ``Simulator`` option
    # Of ``rejected``: the requests the admission policy refused at arrival (None: no admission policy).
    admission_rejected: np.ndarray | None = None
    # Poll mode with scaling or re-roling: requests refused by an instance that drains since the round they were
    # routed on, and routed again (``Simulator._route_around``). None: no instance drains under a stale view.
    drain_refused: int | None = None
    # Poll mode with re-roling: requests (a prefill, or a handoff's KV) refused by an instance whose role switch
    # finished after the round they were routed on, and routed again (``Simulator._route_around``,
    # ``_decoder_now``). None: no role switches under a stale view.
    role_refused: int | None = None

    @property
    def instance_lifetime_s(self) -> np.ndarray:
        if self.instance_started_s is None or self.instance_stopped_s is None:
            return np.full(len(self.instance_ids), self.makespan_s)
        return self.instance_stopped_s - self.instance_started_s


class Simulator:
    """Replays a ``Workload`` on the cluster described by ``config`` with ``router``.

    Args:
        closed_form: advance identical-composition decode steps as one event (the fast path). ``False`` runs
            the naive one-event-per-step reference; both give the same per-request timings (for a router that
            reads gradual state, up to when that state is refreshed).
        view_refresh_s: how stale the routers' view of *gradual* state (KV usage, context lengths) may get.
            Structural changes (a request admitted, finished, preempted, handed off; the instance a request was
            just routed to) are in the next view at once, as the live ingress's own dispatch accounting is -- at
            the end of the engine step that makes them, as a real engine's state changes when its step returns.
        progress: show a progress bar.
        migration: a migration policy (``plan(view, now_s) -> list[MigrationPlan]``) run every
            ``migration_interval_s``; each plan is executed with Llumnix's multi-stage copy, costed by the
            latency model's KV transfer time (``sim/migration.py``).
        scaling: a scaling policy (``decide(view, now_s, observed) -> list[ScaleDecision]``) run every
            ``scaling_interval_s``; scale-ups start instances that become routable ``scaling_startup_s`` later,
            scale-downs drain instances and remove them once empty (``sim/scaling.py``). ``scaling_options``
            go to ``ScalingDriver`` (e.g. ``window_s``).
        reroling: a re-roling policy (``propose(view, now_s) -> list[RoleChange]``, e.g. ``RerolePolicy``) run
            every ``reroling_interval_s`` on a P/D cluster: a switching instance stops taking work of its old
            role, finishes or hands off what it has, then pays a modelled switch delay (``sim/reroling.py``;
            ``reroling_options`` go to ``RerolingDriver``: ``switch_delay_s``, ``handoff``). Not with ``scaling``.
        admission: an admission policy (``admit(request, view, queued_by_priority)``); default: the config's
            ``policies.admission``, if any. Its queues: requests admitted without a first token yet.
        ingress_poll_s: route on the live ingress's poll-round view instead (``sim/poll.py``): instances as of the
            last round (asked every ``ingress_poll_s`` after the previous one published; each answers at its step
            in flight's end, the round publishes with its last answer) plus the requests routed since its ask.
            ``None`` (default): each instance as of its last step's end.
        same_instant_batching: requests that reach an idle instance at one instant share its next step, as live
            vLLM's engine loop batches whatever reached it before its next ``schedule()`` (``start``). ``False``
            (default, what the recorded results ran): the first starts a step alone, the rest wait for its end.
    """

    def __init__(
        self,
        config: ClusterConfig,
        *,
        router: Router | str | None = None,
        closed_form: bool = True,
        view_refresh_s: float = 1.0,
        timeline_points: int = 200,
        progress: bool = False,
        migration: object | None = None,
        migration_interval_s: float = 0.5,
        scaling: object | None = None,
        scaling_interval_s: float = ScalingLoop.interval_s,
        scaling_startup_s: float = ScalingLoop.startup_delay_s,
        scaling_options: dict | None = None,
        reroling: object | None = None,
        reroling_interval_s: float = 5.0,
        reroling_options: dict | None = None,
        seed: int = 0,
        ingress_poll_s: float | None = None,
        same_instant_batching: bool = False,
        admission: AdmissionPolicy | None = None,
    ) -> None:
        check_reroling_without_scaling(None if reroling is None else "reroling", None if scaling is None else "scaling")
        self.config = config
        self.seed = seed  # of the host-noise draws (``LatencyModel.host_noise``): the rest is deterministic
        self.reroling = reroling
        self.reroling_interval_s = reroling_interval_s
        self.reroling_options = reroling_options or {}
        self.migration = migration
        self.migration_interval_s = migration_interval_s
        self.scaling = scaling
        self.scaling_interval_s = scaling_interval_s
        self.scaling_startup_s = scaling_startup_s
        self.scaling_options = scaling_options or {}
        if router is None:
            router = make_router(config.policies.router.name, **config.policies.router.params)
        elif isinstance(router, str):
            router = make_router(router)
        if hasattr(router, "initialize"):
            router.initialize(config)
        self.router = router
        # ``policies.admission`` (or ``admission``): asked at each arrival before the router, as the live ingress
        # asks it (``Ingress._admit``); None admits every request.
        spec = config.policies.admission
        if admission is None and spec is not None:
            admission = make_admission_policy(spec.name, **spec.params)
        self.admission = admission
        # ``policies.predictor``: the routers' length guess for workloads that bring none (as the live ingress).
        self.predictor = serving_predictor(config.policies.predictor)
        self.closed_form = closed_form
        self.view_refresh_s = view_refresh_s
        self.ingress_poll_s = ingress_poll_s
        self.same_instant_batching = same_instant_batching
        self.poll: IngressPoll | None = None  # the run's rounds (``run``)
        if ingress_poll_s is not None:
            IngressPoll(ingress_poll_s)  # a bad period fails here, not at run()
        self.timeline_points = timeline_points
        self.progress = progress
        self.instances = build_instances(config)
        # The routers' snapshots list their requests only for a router that reads them; the policy ticks' views
        # (``policy_view``) for a migration policy too, which always reads them.
        self._detail = bool(getattr(router, "needs_request_detail", False)) or (
            migration is not None and bool(getattr(router, "needs_detail_with_migration", False)))
        self._policy_detail = self._detail or migration is not None
        self._ids = [i.instance_id for i in self.instances]
        self._index = {i.instance_id: i for i in self.instances}
        self._live = self.instances  # instances in the routers' view (the scaling driver keeps its own list)

    # ---- the loop -----------------------------------------------------------------------------------------
    def run(self, workload: Workload) -> SimResult:
        wall0 = _time.perf_counter()
        n = len(workload)
        # An online predictor learns from the requests finished so far (as the live ingress does): it predicts each
        # request as it arrives (``_on_arrival``), not the whole trace up front.
        self._predict_live = False
        if self.predictor is not None and workload.predicted_output is None and n:
            if self.predictor.online is None:
                dists = self.predictor.predict_dists(workload.prompt_tokens, workload.tenant)
                points = np.array([d.point for d in dists], dtype=np.float64)
            else:
                dists, points, self._predict_live = [None] * n, np.full(n, np.nan), True
                self.predictor = dataclasses.replace(self.predictor, online=self.predictor.online.fresh())
            workload = dataclasses.replace(workload, predicted_dist=dists, predicted_output=points)
        self.w = workload
        self.first = np.full(n, np.nan)
        self.finish = np.full(n, np.nan)
        self.admit = np.full(n, np.nan)
        self.inst_of = np.full(n, -1, dtype=np.int32)
        self.dec_of = np.full(n, -1, dtype=np.int32)
        self.preempt = np.zeros(n, dtype=np.int32)
        self.rejected = np.zeros(n, dtype=bool)
        self.admission_rejected = np.zeros(n, dtype=bool)  # of ``rejected``: refused by the admission policy
        self._queued: dict[int, int] = {}  # priority -> admitted requests without a first token (admission's queues)
        self._in_queue = np.zeros(n, dtype=bool)
        self.kv_transfers = 0
        self.kv_transfer_s = 0.0
        self.drain_refused = 0  # poll mode: refusals of a request routed to a draining instance (``_route_around``)
        self.role_refused = 0  # poll mode: refusals by an instance whose role switched since the round
        self._stale_pair: set[int] = set()  # poll mode: requests paired with a decoder whose role switched since
        self.heap: list = []
        self.seq = itertools.count()
        self._starts: list[SimInstance] = []  # idle instances given work at ``now``: they start at its end
        # Co-located engines sharing a host's cores (live CPU profiles): step times scale with the busy count.
        self._contended = any(len(x.latency.host_contention) > 1 for x in self.instances)
        # ... and with the CPU each request costs outside its engine steps, spent while it is set up, prefilled
        # and handed off: engines slow down while it is (``_host_load`` cores in flight; ``_own_cpu``).
        self._host_cpu = any(x.latency.request_cpu_s > 0 or x.latency.request_cpu_s_per_token > 0
                             for x in self.instances)
        self._contended = self._contended or self._host_cpu
        # ... and with the stack CPU of the tokens streamed beyond one per busy engine (``token_cpu_s``).
        self._tok_cpu = any(x.latency.token_cpu_s > 0 for x in self.instances)
        self._contended = self._contended or self._tok_cpu
        self._host_load = 0.0
        self._cpu_rate: dict[int, float] = {}  # request -> its share of ``_host_load`` (cores) while in flight
        self._host_key: tuple | None = None
        # Seeded: a noisy host, but the same draws on every run of one workload (tests, re-simulations).
        self._noise_rng = np.random.default_rng(self.seed)
        self._noise_epoch = 0
        self._noisy = [x for x in self.instances if x.latency.host_noise]
        self._contended = self._contended or bool(self._noisy)
        self.events = 0
        self._view: ClusterView | None = None
        self._view_t = -math.inf
        self._view_one_changed = False

        arrivals = workload.arrival_s
        prompt = workload.prompt_tokens
        output = workload.output_tokens
        horizon = float(arrivals[-1]) if n else 0.0
        tl_step = max(horizon / max(self.timeline_points, 1), 1e-9)
        tl_next = 0.0
        tl_t: list[float] = []
        tl_load: list[list[int]] = []
        heap = self.heap
        i = 0
        now = 0.0
        # The run ends with its last piece of work; a policy tick or a start still pending after it is not part of
        # it (a start asked for near the end stretched the makespan to its ready event, charging every instance).
        last_work = 0.0
        bar = _progress(n) if self.progress else None
        self.migrations = MigrationDriver(self) if self.migration is not None else None
        if self.migrations is not None:
            self._push(self.migration_interval_s, EventKind.POLICY, None, None)
        self.scaler = None
        if self.scaling is not None:
            from sim.scaling import ScalingDriver

            self.scaler = ScalingDriver(self, startup_delay_s=self.scaling_startup_s, **self.scaling_options)
            self._push(self.scaling_interval_s, EventKind.SCALE, None, None)
        self.reroler = None
        if self.reroling is not None:
            from sim.reroling import RerolingDriver

            self.reroler = RerolingDriver(self, **self.reroling_options)
            self._push(self.reroling_interval_s, EventKind.REROLE, None, None)
        if self._noisy:
            self._push(0.0, EventKind.NOISE, None, None)
        self.poll = None if self.ingress_poll_s is None else IngressPoll(self.ingress_poll_s)
        if self.poll is not None:
            self._poll_ask(self.poll, 0.0)  # the ingress starts with a first view
        starts = self._starts
        while i < n or heap or starts:
            # The instant's last event that brings work is done: the idle instances given work at it start their
            # step now, on everything that reached them at this instant (``start``).
            if starts and not (i < n and arrivals[i] == now) and not (
                    heap and heap[0][0] == now and heap[0][1] <= EventKind.MIGRATE_FINAL):
                self._start_pending(now)
                continue
            # Arrivals are merged in at their place in the heap's order: at a tie, after the kinds that sort
            # before ARRIVAL (a host-noise draw at t=0 came after the arrivals at t=0, so their prefill ran on
            # the undrawn host: TTFT 1/3 of a request's arriving 1 ns later on a 3x host; simcore audit).
            if i < n and (not heap or arrivals[i] < heap[0][0]
                          or (arrivals[i] == heap[0][0] and heap[0][1] > EventKind.ARRIVAL)):
                now = last_work = float(arrivals[i])
                self._on_arrival(i, now, int(prompt[i]), int(output[i]))
                i += 1
                if bar is not None and i % 20000 == 0:
                    bar.update(i)
            else:
                now, kind, _, inst, payload = heapq.heappop(heap)
                if kind is EventKind.STEP:
                    if payload != inst.version:
                        continue  # a span interrupted by an arrival left this behind
                    self._on_step_end(inst, now)
                    last_work = now
                elif kind is EventKind.KV_ARRIVE:
                    self._on_kv_arrive(inst, payload, now)
                    last_work = now
                elif kind is EventKind.POLICY:
                    self.migrations.on_policy(now)  # type: ignore[union-attr]
                    if self._ticks_go_on(i < n):
                        self._push(now + self.migration_interval_s, EventKind.POLICY, None, None)
                elif kind is EventKind.SCALE:
                    if self.scaler.on_event(payload, now) and self._ticks_go_on(i < n):  # type: ignore[union-attr]
                        self._push(now + self.scaling_interval_s, EventKind.SCALE, None, None)
                elif kind is EventKind.REROLE:
                    if self.reroler.on_event(payload, now) and self._ticks_go_on(i < n):  # type: ignore[union-attr]
                        self._push(now + self.reroling_interval_s, EventKind.REROLE, None, None)
                elif kind is EventKind.NOISE:
                    for x in self._noisy:
                        x.noise = float(self._noise_rng.choice(x.latency.host_noise))
                    self._noise_epoch += 1
                    self._host_update(now)
                    if self._ticks_go_on(i < n):
                        self._push(now + self._noisy[0].latency.host_noise_period_s, EventKind.NOISE, None, None)
                elif kind is EventKind.HOST:
                    self._host_load = max(self._host_load - self._cpu_rate.pop(payload, 0.0), 0.0)
                    self._host_update(now)
                elif kind is EventKind.POLL:
                    self._on_poll(self.poll, inst, payload, now, i < n)  # type: ignore[arg-type]
                elif kind is EventKind.MIGRATE_FINAL:
                    self.migrations.on_final(payload, now)  # type: ignore[union-attr]
                    last_work = now
                else:
                    self.migrations.on_commit(payload, now)  # type: ignore[union-attr]
                    last_work = now
            self.events += 1
            while now >= tl_next and tl_next <= horizon:
                tl_t.append(tl_next)
                tl_load.append([x.engine.num_requests for x in self.instances])
                tl_next += tl_step
        if bar is not None:
            bar.finish(n)
        return self._result(workload, last_work, _time.perf_counter() - wall0, tl_t, tl_load)

    def join_host(self, inst: SimInstance, now: float) -> None:
        """``inst`` started mid-run (autoscaling) on the host the others share: its steps draw host noise as theirs
        do (it was left out of the draws: on a 3x-noise host, a started instance stepped 3x faster than its
        siblings for the rest of the run)."""
        if not inst.latency.host_noise:
            return
        inst.noise = float(self._noise_rng.choice(inst.latency.host_noise))
        if not self._noisy:  # the first noisy engine: the draws begin
            self._push(now + inst.latency.host_noise_period_s, EventKind.NOISE, None, None)
        self._noisy.append(inst)
        self._contended = True
        self._noise_epoch += 1  # a new draw: step times are rescaled at the next host update

    def _ticks_go_on(self, arrivals_left: bool) -> bool:
        """Whether a periodic tick (migration, scaling, re-roling policy; host noise) schedules its next: while
        arrivals are left or any work is, KV only moving included -- a P->D handoff or a migration's copy, with no
        engine busy. Each tick had its own test; those of scaling and re-roling saw busy engines only, so a tick
        during a handoff after the last arrival ended them for good (1P+1D, an 8000-token prompt: one scaling tick
        in a 5.5 s run; tests/test_sim_audit35.py)."""
        return (arrivals_left or bool(self.migrations is not None and self.migrations.in_flight)
                or any(x.busy or x.engine.has_work or x.incoming for x in self.instances))

    def _push(self, t: float, kind: EventKind, inst: SimInstance | None, payload: object) -> None:
        heapq.heappush(self.heap, (t, kind, next(self.seq), inst, payload))

    # ---- routing ------------------------------------------------------------------------------------------
    def is_empty(self, inst: SimInstance) -> bool:
        """Nothing left on ``inst``: no requests, no migration's KV reservation, no request paired with it to decode
        (from routing, while it still prefills elsewhere, until its KV lands: a decoder that looked empty while its
        partner prefilled was removed or re-roled, and the KV landed on it anyway) -- a draining instance may be
        removed or switch role only then."""
        return not (inst.engine.has_work or inst.engine.prefill_blocks > 0 or inst.incoming)

    def policy_view(self, now: float) -> ClusterView:
        """A view for a periodic policy tick (migration, scaling, re-roling), every snapshot fresh -- their decisions
        must not act on a snapshot the routers' refresh period let go stale -- and built apart from the routers'
        view, as the live Controller's policy loop reads the engines itself: a tick changes nothing the routers see
        (a policy that decides nothing leaves the run as it was). Each engine is read as of the end of its step in
        flight (``_fresh``); a span read as of its start under-read KV by up to 17.5% of capacity (bursty L4
        study, 77% of ticks mid-span; twenty-seventh session's audit)."""
        return ClusterView(now, tuple(self._fresh(x, now) for x in self._live))

    def _fresh(self, inst: SimInstance, now: float) -> InstanceSnapshot:
        span = inst.span
        if span is None:  # idle, or a single step in flight (booked: read as of its end)
            return inst.fresh_snapshot(now, detail=self._policy_detail)
        # Mid-span, read as of the step in flight's end, short of the span's last (its finishes are booked at the
        # span's end: left out rather than changing the run by reading them).
        k = min(span.steps_done_by(now - inst.span_start), span.steps - 1)
        with inst.engine.ahead(k):
            return inst.fresh_snapshot(now, detail=self._policy_detail)

    def materialise(self, inst: SimInstance, now: float) -> None:
        """Turn ``inst``'s closed-form span, which books its steps at its end, into what naive stepping has at
        ``now``: the steps before it booked, the one in flight a single step (booked, recorded at its end). A
        migration's handshake or stop-and-copy then reads the request as it is, not as it was when the span began
        (a stop-and-copy took it so, and the destination re-made every token of the span). A policy view reads
        without changing anything (``_fresh``)."""
        span = inst.span
        if span is None:
            return
        j = span.steps_done_by(now - inst.span_start)  # the step in flight at ``now`` is the j-th
        inst.span = None
        inst.version += 1  # the span's end event lapses
        t = inst.span_start
        if j > 1:
            res = inst.engine.advance(span, j - 1)
            t += res.duration_s
            self._record(res, t, inst=inst)
        if inst.pre_step_snapshot(t, detail=self._detail):  # as ``_kick`` takes it
            self._view_one_changed = True
        res = inst.engine.step()
        inst.in_step = (res, t + res.duration_s, t)
        self._push(t + res.duration_s, EventKind.STEP, inst, inst.version)

    def _view_at(self, now: float) -> ClusterView:
        full = self._view is None or now - self._view_t >= self.view_refresh_s
        changed = self._view_one_changed or full
        for inst in self._live:
            # a periodic refresh keeps a single step's pre-step snapshot: its outcome shows at its end
            if (full and inst.in_step is None) or inst.snap_dirty or inst.snapshot is None:
                inst.make_snapshot(now, detail=self._detail)
                changed = True
        if changed:
            self._view = ClusterView(now, tuple([x.snapshot for x in self._live]))  # type: ignore[misc]
            self._view_one_changed = False
            if full:
                self._view_t = now
        if self._view.time_s != now:  # unchanged snapshots, but policies read the view's time as now
            self._view = dataclasses.replace(self._view, time_s=now)
        return self._view  # type: ignore[return-value]

    def _routing_view(self, now: float) -> ClusterView:
        return self._view_at(now) if self.poll is None else self.poll.view(self._live)

    # ---- the ingress's poll rounds (opt-in: ``ingress_poll_s``; sim/poll.py) ------------------------------------
    def _poll_ask(self, poll: IngressPoll, now: float) -> None:
        """A round asks every live instance: an idle one answers now, a busy one at its step in flight's end (a
        single step's, or a span's cut one: its STEP event, ``_on_step_end``; a span's step: a POLL event)."""
        poll.ask(x.instance_id for x in self._live)
        for x in self._live:
            if not x.busy:
                poll.answer(x.instance_id, x.poll_answer(now, detail=self._detail))
            elif x.span is not None:
                j = x.span.steps_done_by(now - x.span_start)
                if j < x.span.steps:  # the span's last step ends with its STEP event
                    self._push(x.span_start + x.span.time_of(j), EventKind.POLL, x, (poll.rounds, x.span, j))
        if not poll.waiting:
            self._poll_publish(poll, now)
        else:
            self._push(now + poll.timeout_s, EventKind.POLL, None, poll.rounds)

    def _on_poll(self, poll: IngressPoll, inst: SimInstance | None, payload: object, now: float,
                 arrivals_left: bool) -> None:
        if payload is None:  # the next round's ask: while work is left
            if self._ticks_go_on(arrivals_left):
                self._poll_ask(poll, now)
        elif isinstance(payload, int):  # a round's timeout: publish what came (if it is still open)
            if payload == poll.rounds and poll.waiting:
                self._poll_publish(poll, now)
        elif inst is not None:  # a span's step returned: the answer as of its end (a cut span's: its STEP event)
            rnd, span, j = payload  # type: ignore[misc]
            if rnd == poll.rounds and inst.span is span and inst.instance_id in poll.waiting:
                self._poll_answer(poll, inst, inst.poll_answer(now, detail=self._detail, ahead=j), now)

    def _poll_answer(self, poll: IngressPoll, inst: SimInstance, snap: InstanceSnapshot, now: float) -> None:
        if poll.answer(inst.instance_id, snap):
            self._poll_publish(poll, now)

    def _poll_publish(self, poll: IngressPoll, now: float) -> None:
        poll.publish(now)
        self._push(now + poll.period_s, EventKind.POLL, None, None)

    def _refresh_one(self, inst: SimInstance, now: float) -> None:
        """The ingress knows what it just dispatched: refresh that instance's entry at once (a step that started at
        the dispatch took its snapshot, new request included, just before it began: ``_kick``)."""
        if inst.in_step is None or inst.snap_dirty or inst.snapshot is None:
            inst.make_snapshot(now, detail=self._detail)
        self._view_one_changed = True

    def _queue_on_snapshot(self, inst: SimInstance, seq, now: float, *, front: bool = False) -> None:
        """``inst`` is mid-step and ``seq`` just joined its queue: its pre-step snapshot, plus ``seq`` queued (the
        ingress's own dispatch accounting; the engine's state is the step's outcome already). ``front``: it joined
        at the queue's head (a migrated request, ``add_request(front=True)``), where the policies read the head."""
        snap = inst.snapshot
        if snap is None:
            return
        compute = snap.prefill_compute_tokens
        if compute is not None:
            compute += seq.num_tokens - (seq.num_computed or inst.engine.cache_hit_tokens(seq))  # its KV came along
        requests = snap.requests
        if self._detail:
            load = RequestLoad(seq.rid, seq.num_tokens, 0, seq.predicted_remaining, seq.priority, True)
            # Listed: running, prefilling, then the queue (its last num_waiting - num_incoming entries).
            at = len(requests)
            if front:
                at -= min(max(snap.num_waiting - snap.num_incoming, 0), sum(r.in_prefill for r in requests))
            requests = requests[:at] + (load,) + requests[at:]
        inst.amend_snapshot(
            now, num_waiting=snap.num_waiting + 1,
            prefill_tokens_pending=snap.prefill_tokens_pending + seq.num_tokens, prefill_compute_tokens=compute,
            requests=requests)
        self._view_one_changed = True

    def _request_info(self, i: int, now: float, prompt: int, output: int, *, accepted: bool = False) -> RequestInfo:
        w = self.w
        return RequestInfo(
            request_id=str(i),
            arrival_s=now,
            prompt_tokens=prompt,
            max_tokens=output,
            priority=int(w.priority[i]) if w.priority is not None else 0,
            predicted_output_tokens=float(w.predicted_output[i]) if w.predicted_output is not None else None,
            hash_ids=tuple(w.hash_ids[i]) if w.hash_ids is not None and w.hash_ids[i] is not None else (),
            tenant=self._tenant(i),
            output_tokens=output,
            accepted=accepted,
        )

    def _on_arrival(self, i: int, now: float, prompt: int, output: int) -> None:
        if self._predict_live:
            dist = self.w.predicted_dist[i] = self.predictor.predict_dist(None, prompt, tenant=self._tenant(i))
            self.w.predicted_output[i] = dist.point
        req = self._request_info(i, now, prompt, output)
        if self.admission is not None and not self._admit(i, req, now):
            return
        decision = self.router.route(req, self._routing_view(now))
        if self.poll is not None:
            req, decision = self._route_around(i, req, decision, prompt, now)
        if isinstance(decision, Rejected):
            self.rejected[i] = True
            return
        if self.admission is not None:
            self._in_queue[i] = True
            self._queued[req.priority] = self._queued.get(req.priority, 0) + 1
        self.router.on_routed(req, decision)
        inst = self._index[decision.prefill_instance]
        self.inst_of[i] = inst.index
        # A pair (prefill here, decode there) hands the KV off after the prefill, from a MIXED instance too (as the
        # live ingress does); it used to run colocated there, the decoder ignored (a third of learned's placements
        # on the Mooncake tier as P/D, twenty-sixth session). Not a one-token request: it ends with its prefill,
        # and the live ingress neither hands it off nor counts it on its way to the decoder (``Ingress._route``).
        # One instance named twice is colocated, on a PREFILL one too: the pairing routers' Splitwise borrow ("a
        # PREFILL instance decodes", ``PairingRouter.pair``) runs there start to end, as the live ingress runs it
        # (``_hands_off``). Its KV went back to it through a handoff, and the PREFILL engine made one token of the
        # landed decode leg: the response ended a decode step after its first token.
        colocated = decision.decode_instance == decision.prefill_instance
        pair = decision.decode_instance is not None and output > 1 and not colocated
        if pair:
            self.dec_of[i] = self._index[decision.decode_instance].index
        pred = req.predicted_output_tokens
        handoff = pair or (inst.role is InstanceRole.PREFILL and not colocated)
        try:
            seq = inst.engine.add_request(i, prompt, 1 if handoff else output, priority=req.priority,
                                          predicted_remaining=pred, length_dist=self._dist(i), handoff=handoff,
                                          **self.prefix_ids(i))
        except ValueError:
            self._refuse(i, inst)  # does not fit this engine at all
            return
        seq.tag = i
        if self.poll is not None:
            self.poll.book(inst.instance_id, prompt, **self.prefix_ids(i))
        if self._host_cpu:
            self._spend_request_cpu(i, inst, prompt, now, handoff=self.dec_of[i] >= 0)
        if inst.in_step is not None:  # mid-step: the pre-step snapshot plus this request in the queue
            self._queue_on_snapshot(inst, seq, now)
        self._poke(inst, now)
        self._refresh_one(inst, now)
        if self.dec_of[i] >= 0 and handoff:  # a handoff will follow its prefill
            dec = self.instances[self.dec_of[i]]
            self._expect_kv(dec, +1, now)
            if self.poll is not None and self.poll.role_changed(dec.instance_id, dec.role):
                self._stale_pair.add(i)  # paired on the round's old role: it refuses the KV (``_handoff``)

    def _route_around(self, i: int, req: RequestInfo, decision: RouteDecision | Rejected, prompt: int, now: float
                      ) -> tuple[RequestInfo, RouteDecision | Rejected]:
        """Poll mode: ``decision`` read a round from before its instance began to drain (a scale-down, a role
        switch), or from before its role switch finished. As live, that instance refuses the prompt
        (``Instance.submit``: a draining instance takes no request without KV, a handoff's KV paired with it is
        still taken; one whose role changed since the view takes nothing routed for its old role) and the ingress
        routes it again without it (``Ingress._route_around``): counted in ``drain_refused`` (``role_refused``),
        shown draining (in its new role) until a round's answer replaces its snapshot, the refused route routed and
        booked as live's was before its submit."""
        refused: set[str] = set()
        poll = self.poll
        assert poll is not None
        while not isinstance(decision, Rejected):
            p = decision.prefill_instance
            inst = self._index[p]
            draining = inst.draining
            # A draining one refuses first; then one whose role switch finished since the round (the round shows
            # its old role: ``Instance.submit``'s ``view_role``), shown in its new role from then on.
            if not draining and not poll.role_changed(p, inst.role):
                break
            self.router.on_routed(req, decision)
            poll.book(p, prompt, **self.prefix_ids(i))
            if draining:
                poll.mark_draining(p)
                self.drain_refused += 1
            else:
                self._role_refusal(inst)
            refused.add(p)
            req = dataclasses.replace(req, accepted=True)
            view = self._routing_view(now)
            view = ClusterView(view.time_s, tuple(s for s in view.instances if s.instance_id not in refused))
            decision = self.router.route(req, view)
        return req, decision

    def _admit(self, i: int, req: RequestInfo, now: float) -> bool:
        """The admission policy on arrival ``i`` (as ``Ingress._admit``: ``Deferred`` goes on to the router, whose
        refusal is counted as without admission); ``False``: refused, counted in ``rejected`` and
        ``admission_rejected``."""
        decision = self.admission.admit(req, self._routing_view(now), self._queued)  # type: ignore[union-attr]
        if not isinstance(decision, Rejected):
            return True
        self.rejected[i] = self.admission_rejected[i] = True
        return False

    def _dequeue(self, i: int) -> None:
        """Request ``i`` has its first token, or ended without one: out of its admission queue."""
        if self._in_queue[i]:
            self._in_queue[i] = False
            p = int(self.w.priority[i]) if self.w.priority is not None else 0
            self._queued[p] -= 1

    def _learn_length(self, i: int) -> None:
        """A finished request's lengths reach an online predictor, as the live ingress tells it of each."""
        if self._predict_live:
            self.predictor.observe(int(self.w.prompt_tokens[i]), int(self.w.output_tokens[i]), tenant=self._tenant(i))

    def _tenant(self, i: int) -> str | None:
        """Request ``i``'s own tenant (its trace's column), or None."""
        return self.w.tenant[i] if self.w.tenant is not None else None

    def prefix_ids(self, i: int) -> dict[str, Any]:
        """``add_request``'s prefix-cache keywords for request ``i``: its prompt's ids, wherever its KV is computed or
        lands (a decode leg, a migration), since vLLM caches the blocks it loaded as its own."""
        ids = self.w.hash_ids[i] if self.w.hash_ids is not None else None
        return {"hash_ids": tuple(ids), "hash_block_tokens": self.w.hash_block_tokens} if ids else {}

    def _dist(self, i: int) -> LengthPrediction | None:
        return self.w.predicted_dist[i] if self.w.predicted_dist is not None else None

    def _spend_request_cpu(self, i: int, inst: SimInstance, prompt: int, now: float, *, handoff: bool) -> None:
        """A request's off-step CPU (``LatencyModel.request_cpu``), spread evenly over the time it takes alone
        from arrival until its KV lands on the decode instance: prefill step and handoff."""
        lat = inst.latency
        span = lat.step_time(prefill_tokens=prompt, prefill_pairs=prefill_pairs(prompt, 0), prefill_seqs=1)
        if handoff:
            span += lat.handoff_time(prompt) or 0.0
        rate = lat.request_cpu(prompt) / max(span, 1e-6)
        self._host_load += rate
        self._cpu_rate[i] = rate
        self._push(now + span, EventKind.HOST, None, i)
        self._host_update(now)

    def _expect_kv(self, inst: SimInstance, delta: int, now: float, *, landed: bool = False) -> None:
        """A request routed to ``inst`` to decode (+1) or no longer on its way there (-1; ``landed``: its KV arrived
        and it waits in the engine now, still counted as waiting)."""
        inst.incoming = max(inst.incoming + delta, 0)
        if delta < 0 and not landed and inst.draining and not inst.busy:
            self._idle(inst, now)  # no longer waited for (refused there): it may have run dry
        if inst.in_step is not None and inst.snapshot is not None:  # mid-step: adjust the pre-step snapshot
            # (landed: the caller queues it on the snapshot next, ``_queue_on_snapshot``)
            inst.amend_snapshot(now, num_waiting=max(inst.snapshot.num_waiting + delta, 0),
                                num_incoming=max(inst.snapshot.num_incoming + delta, 0))
            self._view_one_changed = True
            inst.rebuild_at_step_end = True
            return
        self._refresh_one(inst, now)

    def _on_kv_arrive(self, inst: SimInstance, i: int, now: float) -> None:
        """P->D: the prompt's KV landed on the decode instance; it decodes from token 2 on."""
        prompt, output = int(self.w.prompt_tokens[i]), int(self.w.output_tokens[i])
        req = self._request_info(i, now, prompt, output)
        pred = req.predicted_output_tokens
        try:  # the request keeps its priority and length guess (less the token the prefill made)
            seq = inst.engine.add_request(i, prompt + 1, output - 1, cached_tokens=prompt, priority=req.priority,
                                          predicted_remaining=None if pred is None else max(pred - 1.0, 0.0),
                                          length_dist=self._dist(i), generated_before=1, handoff=False,
                                          **self.prefix_ids(i))
        except ValueError:
            self._refuse(i, inst)  # its context does not fit this decoder at all: refused, not a crash
            self._expect_kv(inst, -1, now)
            return
        seq.tag = i
        # No longer on its way before a step it starts takes its snapshot (that one counted it twice: queued, and
        # incoming); mid-step, the pre-step snapshot has it queued, whole context, as an arrival's.
        self._expect_kv(inst, -1, now, landed=True)
        if self.poll is not None:  # counted there with its context, all but the last token loaded (``Ingress``)
            self.poll.book(inst.instance_id, prompt + 1, compute=1)
        if inst.in_step is not None:
            self._queue_on_snapshot(inst, seq, now)
        self._poke(inst, now)

    # ---- instances ----------------------------------------------------------------------------------------
    def _poke(self, inst: SimInstance, now: float) -> None:
        """New work on ``inst``: start it if idle; cut a running span at the next step boundary. (Mid-step, its
        snapshot waits for the step's end, as the step's own outcome does: ``_kick``.)"""
        inst.mark_changed()
        if not inst.busy:
            self.start(inst, now)
            return
        self.cut_span(inst, now)

    def start(self, inst: SimInstance, now: float) -> None:
        """Start idle ``inst``'s next step -- with ``same_instant_batching``, once every arrival, KV landing and
        migration event at ``now`` is done (``EventKind``): live vLLM's engine loop schedules whatever reached it
        before its next ``schedule()``, so requests arriving together share one step. Off, at once: the first of a
        burst runs a step alone and the rest wait for it (docs/simulator.md, "Same-instant arrivals")."""
        if not self.same_instant_batching:
            self._kick(inst, now)
        elif inst not in self._starts:
            self._starts.append(inst)

    def _start_pending(self, now: float) -> None:
        starts = self._starts[:]
        self._starts.clear()  # in place: the loop holds the list
        for inst in starts:
            if not inst.busy:  # a guard: one kicked directly meanwhile is not started twice
                self._kick(inst, now)

    def cut_span(self, inst: SimInstance, now: float) -> float:
        """End ``inst``'s span at the step boundary at or after ``now``; returns that boundary's time."""
        span = inst.span
        if span is None:
            return now  # a single step is in flight; changes are considered at its end
        j = span.steps_done_by(now - inst.span_start)
        if j >= span.steps:
            return inst.span_start + span.duration_s
        res = inst.engine.advance(span, j)
        t_b = inst.span_start + res.duration_s
        self._record(res, t_b, inst=inst)
        inst.span = None
        inst.version += 1
        self._push(t_b, EventKind.STEP, inst, inst.version)
        return t_b

    def _on_step_end(self, inst: SimInstance, now: float) -> None:
        inst.busy = False
        if inst.in_step is not None:
            res, end, started = inst.in_step
            inst.in_step = None
            self._record(res, end, started=started, inst=inst)
            if inst.rebuild_at_step_end or (inst.snapshot is not None and now - inst.snap_t >= self.view_refresh_s):
                inst.snap_dirty = True  # work came mid-step, or a periodic refresh passed it by
            inst.rebuild_at_step_end = False
        span = inst.span
        if span is not None:
            inst.span = None
            res = inst.engine.advance(span, span.steps)
            self._record(res, now, inst=inst)
        poll = self.poll
        if poll is not None and inst.instance_id in poll.waiting:  # its answer to the round: the step returned
            self._poll_answer(poll, inst, inst.poll_answer(now, detail=self._detail), now)
        self._kick(inst, now)

    def _busy_engines(self) -> int:
        """Engines with work on the (one, shared) host: what the contention factors are indexed by. A step in
        flight counts even when the engine model has already booked its outcome (a single prefill step leaves the
        engine empty until the step's end: the other engines share the host with it all that time)."""
        return sum(1 for x in self.instances if x.busy or x.engine.has_work)

    def _host_update(self, now: float) -> None:
        """Engines busy on the host, or the request CPU in flight, changed: rescale every engine's steps (spans in
        flight are cut at their next step boundary and re-planned with the new factor)."""
        n = self._busy_engines()
        tok = self._token_load(n) if self._tok_cpu else 0.0
        own = tuple(self._own_cpu(x) if self._cpu_rate else 0.0 for x in self.instances)
        key = (n, self._host_load, own, round(tok, 2), self._noise_epoch)
        if key == self._host_key:
            return
        self._host_key = key
        for x, mine in zip(self.instances, own):
            # The request CPU in flight slows every engine (a prefill engine not by its own requests'); the
            # streamed tokens' stack CPU too.
            load = max(self._host_load - mine, 0.0) + tok
            x.engine.time_scale = x.latency.host_factor(n, load, decode=x.role is InstanceRole.DECODE) * x.noise
            if x.busy and x.span is not None:
                self.cut_span(x, now)

    def _own_cpu(self, x: SimInstance) -> float:
        """Cores of the request CPU in flight that ``x``'s steps do not feel as load: a prefill engine's lone
        samples already hold the CPU of the request they prefill (set-up, the prompt's own path), so its own
        requests -- waiting for their prefill there or in it -- are no load to it. The others' (another request's
        handoff) are: live, a prefill beside one ran ~1.2x its lone step (docs/history/live_vs_sim.md, nineteenth
        session)."""
        if x.role is InstanceRole.DECODE:
            return 0.0
        return sum(self._cpu_rate.get(q.tag, 0.0) for q in itertools.chain(x.engine.waiting, x.engine.prefilling))

    def _token_load(self, busy: int) -> float:
        """Cores of stack CPU the decode batches stream beyond one token per engine step (``token_load``), each
        engine's token rate taken at its batch's contended step time (not stretched by this load itself)."""
        total = 0.0
        for x in self.instances:
            b, ctx = x.engine.decode_batch_context()
            if b < 2:
                continue
            a, per_tok = x.latency.decode_coeffs(b)
            step = (a + per_tok * ctx) * x.latency.contention(busy, decode=x.role is InstanceRole.DECODE)
            total += x.latency.token_load((b - 1) / max(step, 1e-6))
        return total

    def _idle(self, inst: SimInstance, now: float) -> None:
        if inst.draining and self.scaler is not None:
            self.scaler.on_idle(inst, now)  # a draining instance ran dry: remove it
        elif inst.draining and self.reroler is not None:
            self.reroler.on_idle(inst, now)  # a switching instance ran dry: start its switch

    def _kick(self, inst: SimInstance, now: float) -> None:
        eng = inst.engine
        if self._contended:
            self._host_update(now)
        if not eng.has_work:
            self._idle(inst, now)
            return
        span = eng.plan_span() if self.closed_form else None
        if span is not None:
            inst.span = span
            inst.span_start = now
            end = now + span.duration_s
        else:
            # The engine model books the step's outcome now; routers see it at the step's end, as a real engine's
            # state changes (vLLM frees a finished request's KV when its last step returns): the snapshot taken
            # here stands until then, and ``_record`` runs at the STEP event. Booked at the start, a finish or a
            # computed chunk showed up to a step early (Azure x16 at 0.8: P99 TTFT of the load-aware routers
            # -16..+21% against the end-of-step view; twenty-sixth session).
            if inst.pre_step_snapshot(now, detail=self._detail):
                self._view_one_changed = True
            res = eng.step()
            if res.duration_s <= 0.0 and not res.preempted:
                return  # nothing schedulable (cannot happen with validated requests; guards a livelock)
            end = now + res.duration_s
            inst.in_step = (res, end, now)
        inst.busy = True
        self._push(end, EventKind.STEP, inst, inst.version)

    def _record(self, res: StepResult, t: float, *, started: float | None = None, inst: SimInstance | None = None
                ) -> None:
        """Fold a step's outcome into the per-request columns at the step's end time ``t``."""
        if inst is not None and (res.admitted or res.first_token or res.finished or res.preempted
                                 or res.prefill_done):
            inst.snap_dirty = True  # structural change: routers see it in the next view
        for seq in res.admitted:
            i = seq.tag
            if self.admit[i] != self.admit[i]:  # nan: first admission only
                self.admit[i] = started if started is not None else t
        # The request path (gRPC, ingress, actor hops) is host CPU work too: slowed by the same contention factor
        # as the engine's steps (the profile's contended-TTFT ratio is measured over path + step).
        def lat(i: int) -> float:
            if inst is None:
                return 0.0
            return inst.latency.path_latency(int(self.w.prompt_tokens[i])) * inst.engine.time_scale

        for seq in res.first_token:
            i = seq.tag
            if self.first[i] != self.first[i]:
                self.first[i] = t + lat(i)
                self._dequeue(i)
        for seq in res.finished:
            i = seq.tag
            self.finish[i] = t + lat(i)
            self._learn_length(i)
            # The instance it ends on (its decoder, after a handoff or a migration), as the live ingress names it.
            d = self.dec_of[i]
            self.router.on_finished(str(i), self._ids[d if d >= 0 else self.inst_of[i]])
        for seq in res.preempted:
            self.preempt[seq.tag] += 1
        for seq in res.prefill_done:
            self._handoff(seq.tag, t)

    def _refuse(self, i: int, inst: SimInstance) -> None:
        """Request ``i``, routed, cannot go on at ``inst``: it ends there. The router hears of it, as the live
        ingress tells it of every routed request's end (a tracker of where requests are would keep it forever)."""
        self.rejected[i] = True
        self._dequeue(i)
        self.router.on_finished(str(i), inst.instance_id)

    def _handoff(self, i: int, t: float) -> None:
        output = int(self.w.output_tokens[i])
        d = self.dec_of[i]
        if output <= 1:  # its one token was its last (never paired: ``_on_arrival``)
            self.finish[i] = self.first[i]
            self._learn_length(i)
            self.router.on_finished(str(i), self._ids[self.inst_of[i]])
            return
        refused: set[str] = set()
        if i in self._stale_pair:
            # Paired on a round from before its decoder's role switch finished: it refuses the KV, as live's
            # (``Instance.submit``'s ``view_role``), which goes as it is to the decoder the router names now --
            # not even sent there when the view shows its new role by now (a round, another refusal), as live's
            # ``Ingress._role_changed`` re-picks before the submit.
            self._stale_pair.discard(i)
            dst = self.instances[d]
            if self.poll is not None and self.poll.role_changed(dst.instance_id, dst.role):
                self._role_refusal(dst)
            self._expect_kv(dst, -1, t)
            refused.add(dst.instance_id)
            d = self.dec_of[i] = -1
        if d < 0:  # routed to a PREFILL instance without a decode partner: decode where the router says now
            d = self._decoder_now(i, t, output, refused)
            if d < 0:
                self._refuse(i, self.instances[self.inst_of[i]])
                return
            self.dec_of[i] = d
            self._expect_kv(self.instances[d], +1, t)
        dst = self.instances[d]
        src = self.instances[self.inst_of[i]]
        dt = src.latency.handoff_time(int(self.w.prompt_tokens[i]))  # measured end to end (live profiles)
        if dt is not None and self._contended:
            # Measured alone; on a shared host it is CPU work (export, Ray hops, import) that stretches with the
            # engines busy beside it, as one more party on the cores (live: 15 ms alone, 26-29 ms with one other
            # request in flight, 35-44 ms with two; docs/history/live_vs_sim.md, fourteenth session). Not with the
            # request CPU in flight: the measured handoff holds its own request's.
            dt *= dst.latency.host_factor(self._busy_engines() + 1, 0.0) * dst.noise
        if dt is None:
            gpus = self.config.gpus
            dt = kv_transfer_between(int(self.w.prompt_tokens[i]), self.config.model, gpus[src.pool.gpu],
                                     gpus[dst.pool.gpu])
        self.kv_transfers += 1
        self.kv_transfer_s += dt
        self._push(t + dt, EventKind.KV_ARRIVE, dst, i)

    def _decoder_now(self, i: int, t: float, output: int, refused: set[str]) -> int:
        """The instance that decodes request ``i`` after its prefill, as ``Ingress._decoder_after_prefill`` picks
        it: the router's answer now over the view less ``refused``; -1 when it names none that decodes (as the view
        shows it). Poll mode: one whose role switch finished since the round refuses the KV (``_role_refusal``)
        and the router answers again without it."""
        while True:
            view = self._routing_view(t)
            if refused:
                view = ClusterView(view.time_s, tuple(s for s in view.instances if s.instance_id not in refused))
                if not view.instances:
                    return -1
            decision = self.router.route(self._request_info(i, t, int(self.w.prompt_tokens[i]), output,
                                                            accepted=True), view)
            # A colocated answer names a MIXED instance to do both: the prompt is done, so it decodes there.
            name = None if isinstance(decision, Rejected) else decision.decode_instance or decision.prefill_instance
            if name is None:
                return -1
            inst = self._index[name]
            shown = inst.role if self.poll is None else self.poll.snapshots[name].role
            if not shown.does_decode:
                return -1
            if shown is inst.role:
                return inst.index
            self._role_refusal(inst)
            refused.add(name)

    def _role_refusal(self, inst: SimInstance) -> None:
        """Poll mode: ``inst`` refused a request routed on a round that shows its role from before its switch
        finished: counted, and shown in its new role until a round's answer replaces its snapshot."""
        assert self.poll is not None
        self.poll.mark_role(inst.instance_id, inst.role)
        self.role_refused += 1

    # ---- results --------------------------------------------------------------------------------------------
    def _result(self, w: Workload, end: float, wall: float, tl_t: list, tl_load: list) -> SimResult:
        cfg = self.config
        prio = w.priorities
        slos = {p: cfg.slo_for(int(p)) for p in np.unique(prio)} if len(w) else {}
        if self.scaler is not None:
            self.scaler.finish(end)
            width = len(self.instances)  # instances added mid-run have no entry in earlier timeline rows
            tl_load = [row + [0] * (width - len(row)) for row in tl_load]
        ttft_slo = np.array([slos[p].ttft_s if slos[p].ttft_s is not None else np.inf for p in prio])
        tpot_slo = np.array([slos[p].tpot_s if slos[p].tpot_s is not None else np.inf for p in prio])
        return SimResult(
            workload=w,
            config_name=cfg.name,
            router=self.router.name,
            first_token_s=self.first,
            finish_s=self.finish,
            admit_s=self.admit,
            instance=self.inst_of,
            decode_instance=self.dec_of,
            preemptions=self.preempt,
            rejected=self.rejected,
            instance_ids=self._ids,
            instance_busy_s=np.array([x.engine.busy_time_s for x in self.instances]),
            instance_gpus=np.array([x.gpus for x in self.instances]),
            instance_price_per_hour=np.array([cfg.gpus[x.pool.gpu].price_per_hour for x in self.instances]),
            makespan_s=end,
            events=self.events,
            steps=sum(x.engine.steps_run for x in self.instances),
            wall_seconds=wall,
            kv_transfers=self.kv_transfers,
            kv_transfer_s=self.kv_transfer_s,
            migrations=self.migrations.committed if self.migrations is not None else 0,
            timeline_t=np.array(tl_t),
            timeline_load=np.array(tl_load),
            slo_ttft_s=ttft_slo,
            slo_tpot_s=tpot_slo,
            prefix_hit_tokens=sum(x.engine.prefix_hit_tokens for x in self.instances),
            instance_started_s=(np.array([min(x.started_s, end) for x in self.instances])
                                if self.scaler is not None else None),
            instance_stopped_s=(np.array([min(x.stopped_s if x.stopped_s is not None else end, end)
                                          for x in self.instances]) if self.scaler is not None else None),
            scale_events=self.scaler.applied if self.scaler is not None else None,
            role_switches=self.reroler.summary()["role_switches"] if self.reroler is not None else None,
            over_max_model_len=over_context(cfg, w),
            same_instant_batching=self.same_instant_batching,
            admission_rejected=self.admission_rejected if self.admission is not None else None,
            # Where an instance can drain under a stale view (poll mode with scaling or re-roling) only.
            drain_refused=(self.drain_refused if self.poll is not None
                           and (self.scaler is not None or self.reroler is not None) else None),
            role_refused=self.role_refused if self.poll is not None and self.reroler is not None else None,
        )


def over_context(config: ClusterConfig, w: Workload) -> int:
    """How many of ``w``'s requests need more context (prompt + output) than ``config.model.max_model_len``."""
    return int(np.sum(w.prompt_tokens + w.output_tokens > config.model.max_model_len))


def simulate(config: ClusterConfig, workload: Workload, *, router: Router | str | None = None, **kw) -> SimResult:
    """One simulation run (see ``Simulator`` for options)."""
    return Simulator(config, router=router, **kw).run(workload)


class _progress:
    """A rich progress bar over arrivals (only built when asked for)."""

    def __init__(self, total: int) -> None:
        from rich.progress import Progress

        self._p = Progress(transient=True)
        self._task = self._p.add_task("simulating", total=total)
        self._p.start()

    def update(self, done: int) -> None:
        self._p.update(self._task, completed=done)

    def finish(self, done: int) -> None:
        self._p.update(self._task, completed=done)
        self._p.stop()


__all__ = ["EventKind", "RouteDecision", "SimResult", "Simulator", "Workload", "simulate"]
