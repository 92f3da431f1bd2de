"""Autoscaling and re-roling policies, and the analytic per-instance capacity they (and placement) use.

* ``ThresholdScaler`` -- Llumnix's load thresholds (Sun et al., OSDI 2024, section 4.4.3): scale a pool up when
  its mean virtual usage stays above ``scale_up`` for ``sustain_s``, down when it stays below ``scale_down``;
  hysteresis from the gap between the two and from ``sustain_s``; ``cooldown_s`` between actions; instances
  still starting (``startup_delay_s``) count as capacity so a burst does not trigger a scale-up per tick.
* ``SLAScaler`` -- NVIDIA Dynamo planner's SLA mode: from the observed arrival rate and prompt/output mix,
  forecast the rate ``startup_delay_s`` ahead (Holt's linear trend), and compute the instances needed with the
  latency model: prefill capacity from ``prefill_time`` of the tokens computed (the prompt less its observed
  prefix-cache hits) under an M/D/1 TTFT bound (DistServe, Zhong et al., OSDI 2024, section 3), decode capacity
  from ``decode_coeffs`` at the largest batch meeting the TPOT SLO and fitting in KV, each pool at its engine's
  limits. Scale-up at once, scale-down only after ``down_sustain_s``, to the largest target of that window.
* ``RerolePolicy`` -- dynamic re-roling (Splitwise's mixed pool made durable): when one P/D pool saturates and
  the other idles, propose ``RoleChange`` for the idlest instance of the light pool.

Pools are keyed by ``pool_of(snapshot)`` (default: the role's value, "prefill" / "decode" / "mixed").
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import ClassVar

from scheduler.config.models import ClusterConfig, EngineSpec
from scheduler.core.types import SLO, ClusterView, InstanceRole, InstanceSnapshot
from scheduler.latency import LatencyModel, latency_factory, prefill_pairs
from scheduler.policy.params import check_numbers


# ---- decisions ------------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class ScaleDecision:
    """Change pool ``pool`` by ``delta`` instances or to ``target``; exactly one is set.

    ``drain`` names instances the applier should drain first on a scale-down (least loaded first).
    """

    pool: str
    delta: int | None = None
    target: int | None = None
    reason: str = ""
    drain: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if (self.delta is None) == (self.target is None):
            raise ValueError(f"ScaleDecision({self.pool!r}): set exactly one of delta / target")
        if self.target is not None and self.target < 0:
            raise ValueError(f"ScaleDecision({self.pool!r}).target must be >= 0, got {self.target}")


@dataclass(frozen=True, slots=True)
class RoleChange:
    instance_id: str
    new_role: InstanceRole
    reason: str = ""


@dataclass(frozen=True, slots=True)
class WorkloadSummary:
    """Observed (or planned) load: arrival rate and mean lengths; ``mean_cached_prompt_tokens`` of the prompt were
    served from a prefix cache (not computed)."""

    rate_rps: float
    mean_prompt_tokens: float
    mean_output_tokens: float
    mean_cached_prompt_tokens: float = 0.0
    # Priority classes of the window's arrivals (``SLAScaler`` sizes for their SLOs); empty: unknown (class 0).
    priorities: tuple[int, ...] = ()


@dataclass(frozen=True)  # not slotted: the class attributes are the defaults other signatures name
class ScalingLoop:
    """How often and on what the scaling loop decides: one reading of ``policies.scaling.params`` for both appliers
    (the live Controller, ``llmsched simulate`` / ``sim/scaling.py``), so a config scales alike in both. They had
    their own defaults -- live: decide every 10 s on a 30 s window assuming 30 s start-ups; simulated: 5 s, 60 s,
    60 s -- and the simulator read none of the config's values.

    ``interval_s`` (``scaling_interval_s``): between decisions (also the SLA forecast's step). ``window_s``: span of
    the observed ``WorkloadSummary``. ``startup_delay_s``: start request -> serving, the policies' "starting"
    accounting (and the simulator's modelled load; the policy keeps it). ``drain_timeout_s``: live only, the
    longest wait for a drained instance to go idle (the simulator removes one once idle).
    """

    interval_s: float = 5.0
    window_s: float = 60.0
    startup_delay_s: float = 60.0
    drain_timeout_s: float = 120.0

    def __post_init__(self) -> None:
        for key, v, lo in (("scaling_interval_s", self.interval_s, None), ("window_s", self.window_s, None),
                           ("startup_delay_s", self.startup_delay_s, 0), ("drain_timeout_s", self.drain_timeout_s, 0)):
            if not (v >= lo if lo is not None else v > 0):
                raise ValueError(f"{key} must be {'>= 0' if lo is not None else '> 0'}, got {v}")

    @classmethod
    def split(cls, params: Mapping[str, object]) -> tuple[ScalingLoop, dict[str, object]]:
        """The loop's values from ``params`` (defaults where absent), and the policy's params (with
        ``startup_delay_s``). Bad values raise ``ValueError`` naming the key."""
        rest = dict(params)

        def num(key: str, default: float, *, keep: bool = False) -> float:
            v = rest.get(key, default) if keep else rest.pop(key, default)
            try:
                return float(v)  # type: ignore[arg-type]
            except (TypeError, ValueError):
                raise ValueError(f"{key} must be a number, got {v!r}") from None

        loop = cls(num("scaling_interval_s", cls.interval_s), num("window_s", cls.window_s),
                   num("startup_delay_s", cls.startup_delay_s, keep=True),
                   num("drain_timeout_s", cls.drain_timeout_s))
        rest["startup_delay_s"] = loop.startup_delay_s
        return loop, rest


def observed_span_s(window_s: float, elapsed_s: float) -> float:
    """What an observed ``WorkloadSummary``'s arrival rate divides by, ``elapsed_s`` into the observation: the window,
    or the time observed so far while shorter, at least 1 s (two arrivals in the first 0.1 s are no 20 req/s). One
    rule for the live Controller and the simulator's driver: the simulator divided by the time alone, and with
    decisions under 1 s apart it read twice the live rate at 0.5 s."""
    return min(window_s, max(elapsed_s, 1.0))


class PrefixHitWindow:
    """Prompt tokens the instances served from their prefix caches over the last ``window_s``: the growth of each
    snapshot's cumulative ``prompt_tokens_cached`` (an instance counts from its first sample). One estimator for
    the simulator's scaling driver and the live Controller."""

    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        self._last: dict[str, int] = {}
        self._hits: list[tuple[float, int]] = []

    def observe(self, now_s: float, snapshots: Iterable[InstanceSnapshot]) -> None:
        seen = {s.instance_id: s.prompt_tokens_cached for s in snapshots}
        gained = sum(max(n - self._last[i], 0) for i, n in seen.items() if i in self._last)
        self._last = seen
        if gained:
            self._hits.append((now_s, gained))
        self._hits = [(t, n) for t, n in self._hits if t > now_s - self.window_s]

    def per_request(self, arrivals: int, mean_prompt_tokens: float) -> float:
        """Mean cached tokens per request of the window's ``arrivals`` (at most the mean prompt)."""
        if arrivals <= 0:
            return 0.0
        return min(sum(n for _, n in self._hits) / arrivals, mean_prompt_tokens)


# ---- analytic capacity ----------------------------------------------------------------------------------------------
def prefill_capacity_rps(lat: LatencyModel, prompt_tokens: float, *, ttft_slo_s: float | None = None,
                         chunk_tokens: int = 2048, max_utilization: float = 0.9, cached_tokens: float = 0.0) -> float:
    """Requests/s one instance can prefill while (on average) meeting the TTFT SLO.

    Service: the ``prompt - cached_tokens`` tokens to compute (after the cached prefix), packed ``chunk_tokens``
    per step (``step_time`` with their attention pairs). Queueing: M/D/1 mean wait ``rho * S / (2 (1 - rho))``
    with ``S = prefill_time(computed, cached)``; ``S + wait <= T`` gives ``rho <= 2 (x - 1) / (2 x - 1)`` for
    ``x = T / S`` (0 if ``x < 1``). Capped at ``max_utilization``.
    """
    p, c = _computed(prompt_tokens, cached_tokens)
    if p <= chunk_tokens:
        k = max(chunk_tokens // p, 1)
        per_request = lat.step_time(prefill_tokens=k * p, prefill_pairs=k * prefill_pairs(p, c),
                                    prefill_seqs=k) / k
    else:
        steps = math.ceil(p / chunk_tokens)
        per_request = steps * lat.step_time(prefill_tokens=math.ceil(p / steps),
                                            prefill_pairs=prefill_pairs(p, c) / steps, prefill_seqs=1)
    rho = max_utilization
    if ttft_slo_s is not None:
        x = ttft_slo_s / lat.prefill_time(p, c)
        if x < 1:
            return 0.0
        rho = min(rho, 2 * (x - 1) / (2 * x - 1))
    return rho / per_request


def _computed(prompt_tokens: float, cached_tokens: float) -> tuple[int, int]:
    """(tokens a prefill computes, tokens cached before them): a full hit still computes the last one."""
    c = max(int(cached_tokens), 0)
    return max(int(prompt_tokens) - c, 1), c


def decode_batch_limit(lat: LatencyModel, prompt_tokens: float, output_tokens: float, *,
                       tpot_slo_s: float | None = None, max_batch: int = 256, kv_tokens: int | None = None) -> int:
    """Largest decode batch whose step (at mean context ``prompt + output / 2``) meets the TPOT SLO and whose KV
    fits in ``kv_tokens``; 0 if even one request misses."""
    ctx = prompt_tokens + output_tokens / 2

    def ok(b: int) -> bool:
        a, c = lat.decode_coeffs(b)
        if tpot_slo_s is not None and a + c * b * ctx > tpot_slo_s:
            return False
        return kv_tokens is None or b * ctx <= kv_tokens

    if not ok(1):
        return 0
    lo, hi = 1, max_batch  # step time is monotone in the batch: bisect
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid - 1)
    return lo


def decode_capacity_rps(lat: LatencyModel, prompt_tokens: float, output_tokens: float, *,
                        tpot_slo_s: float | None = None, max_batch: int = 256, kv_tokens: int | None = None,
                        max_utilization: float = 0.9) -> float:
    """Requests/s one instance can decode: Little's law at the SLO-meeting batch ``B``:
    ``B / (output * step(B))``, times ``max_utilization``."""
    b = decode_batch_limit(lat, prompt_tokens, output_tokens, tpot_slo_s=tpot_slo_s, max_batch=max_batch,
                           kv_tokens=kv_tokens)
    if b == 0:
        return 0.0
    a, c = lat.decode_coeffs(b)
    step = a + c * b * (prompt_tokens + output_tokens / 2)
    return max_utilization * b / (max(output_tokens, 1.0) * step)


def mixed_capacity_rps(prefill_rps: float, decode_rps: float) -> float:
    """A colocated instance time-shares both phases: ``1 / (1/prefill + 1/decode)``."""
    if prefill_rps <= 0 or decode_rps <= 0:
        return 0.0
    return 1.0 / (1.0 / prefill_rps + 1.0 / decode_rps)


def engine_kv_tokens(lat: LatencyModel, engine: EngineSpec) -> int:
    """KV capacity in tokens of an instance running ``engine``: its ``num_kv_blocks`` override, else what the
    GPU memory left after the weights holds (as the simulator's and vLLM's engines size it)."""
    blocks = engine.num_kv_blocks or lat.kv_blocks(engine.block_size,
                                                   gpu_memory_utilization=engine.gpu_memory_utilization,
                                                   activation_reserve_gib=engine.activation_reserve_gib)
    return blocks * engine.block_size


def instances_for(rate_rps: float, capacity_rps: float) -> int | None:
    """Instances needed for ``rate_rps`` at ``capacity_rps`` each; ``None`` when one instance cannot meet the SLO."""
    if rate_rps <= 0:
        return 0
    if capacity_rps <= 0:
        return None
    return math.ceil(rate_rps / capacity_rps - 1e-9)


def tightest_slo(slo_of_class: Callable[[int], SLO], priorities: Iterable[int]) -> SLO:
    """What pools serving the ``priorities`` classes are sized for: each target the tightest over their SLOs
    (``slo_of_class``; None where none sets it) -- an engine admits FCFS and decodes one batch, so every class waits
    in one queue and steps at one pace. ``SLAScaler.slo_of`` and the planner's analytic pass both read it."""
    slos = [slo_of_class(p) for p in priorities]
    return SLO(min((s.ttft_s for s in slos if s.ttft_s is not None), default=None),
               min((s.tpot_s for s in slos if s.tpot_s is not None), default=None))


# ---- scalers ---------------------------------------------------------------------------------------------------------
def _role_key(inst: InstanceSnapshot) -> str:
    return inst.role.value


class ScalingPolicy:
    name: ClassVar[str] = "base"

    def __init__(self, *, pool_of: Callable[[InstanceSnapshot], str] = _role_key,
                 startup_delay_s: float = ScalingLoop.startup_delay_s, min_instances: int = 1,
                 max_instances: int = 64) -> None:
        if not 0 <= min_instances <= max_instances:
            raise ValueError(f"need 0 <= min_instances ({min_instances}) <= max_instances ({max_instances})")
        _check(startup_delay_s=(startup_delay_s, 0, None))
        self.pool_of = pool_of
        self.startup_delay_s = startup_delay_s
        self.min_instances = min_instances
        self.max_instances = max_instances
        self._starting: dict[str, list[tuple[float, int]]] = {}  # pool -> (ready_s, count) of pending starts
        self._last_action: dict[str, float] = {}

    def decide(self, view: ClusterView, now_s: float,
               observed: WorkloadSummary | None = None) -> list[ScaleDecision]:
        raise NotImplementedError

    def pools(self, view: ClusterView) -> dict[str, list[InstanceSnapshot]]:
        out: dict[str, list[InstanceSnapshot]] = {}
        for i in view.instances:
            if i.healthy and not i.draining:
                out.setdefault(self.pool_of(i), []).append(i)
        return out

    def starting(self, pool: str, now_s: float) -> int:
        """Instances asked for and not yet up (modelled start-up delay)."""
        live = [(t, n) for t, n in self._starting.get(pool, []) if t > now_s]
        self._starting[pool] = live
        return sum(n for _, n in live)

    def draining(self, view: ClusterView, pool: str) -> int:
        """Instances of ``pool`` draining now: a scale-up takes them back first (they are up), as both appliers do
        (``sim/scaling.py``, the live Controller)."""
        return sum(1 for i in view.instances if i.healthy and i.draining and self.pool_of(i) == pool)

    def _record(self, pool: str, now_s: float, delta: int, *, undrain: int = 0) -> None:
        """Book a change: ``delta`` > 0 starts instances (they count as capacity ``startup_delay_s`` later), less
        the ``undrain`` draining ones the applier takes back at once (booked as starting, they were capacity twice:
        an SLA target of 10 saw 15)."""
        self._last_action[pool] = now_s
        if delta - undrain > 0:
            self._starting.setdefault(pool, []).append((now_s + self.startup_delay_s, delta - undrain))

    @staticmethod
    def _least_loaded(insts: list[InstanceSnapshot], n: int) -> tuple[str, ...]:
        ranked = sorted(insts, key=lambda i: (i.num_running + i.num_waiting, i.kv_blocks_used))
        return tuple(i.instance_id for i in ranked[:n])


def _check(**bounds: tuple[float | None, float, float | None]) -> None:
    """``name=(value, lo, hi)``: each value given (not None) must lie in ``[lo, hi]`` (``hi`` None: unbounded)."""
    for name, (v, lo, hi) in bounds.items():
        if v is not None and not (lo <= v and (hi is None or v <= hi)):
            rng = f">= {lo:g}" if hi is None else f"in [{lo:g}, {hi:g}]"
            raise ValueError(f"{name} must be {rng}, got {v}")


def _since(prev: float, now_s: float, holds: bool) -> float:
    """When a condition started holding (``inf`` while it does not)."""
    if not holds:
        return math.inf
    return now_s if prev == math.inf else prev


class NoScaling(ScalingPolicy):
    name = "none"

    def decide(self, view, now_s, observed=None):  # type: ignore[override]
        return []


class ThresholdScaler(ScalingPolicy):
    """Llumnix-style threshold autoscaling with hysteresis, cooldown and start-up delay (module docstring)."""

    name = "threshold"

    def __init__(self, *, scale_up: float = 0.8, scale_down: float = 0.3, sustain_s: float = 10.0,
                 cooldown_s: float = 60.0, step: int = 1, **kw: object) -> None:
        super().__init__(**kw)  # type: ignore[arg-type]
        if not scale_down < scale_up:
            raise ValueError(f"need scale_down ({scale_down}) < scale_up ({scale_up}) for hysteresis")
        # A step below 1 turned a scale-up under load into a no-op or a scale-down (delta -1).
        _check(sustain_s=(sustain_s, 0, None), cooldown_s=(cooldown_s, 0, None), step=(step, 1, None))
        self.scale_up, self.scale_down = scale_up, scale_down
        self.sustain_s, self.cooldown_s, self.step = sustain_s, cooldown_s, step
        self._above: dict[str, float] = {}
        self._below: dict[str, float] = {}

    def decide(self, view, now_s, observed=None):  # type: ignore[override]
        out = []
        for pool, insts in sorted(self.pools(view).items()):
            n, starting = len(insts), self.starting(pool, now_s)
            # Instances on their way will absorb load: spread the current demand over them too.
            load = sum(i.load.virtual_usage for i in insts) / max(n + starting, 1)
            self._above[pool] = _since(self._above.get(pool, math.inf), now_s, load >= self.scale_up)
            self._below[pool] = _since(self._below.get(pool, math.inf), now_s, load <= self.scale_down)
            if now_s - self._last_action.get(pool, -math.inf) < self.cooldown_s:
                continue
            if now_s - self._above[pool] >= self.sustain_s and n + starting < self.max_instances:
                d = min(self.step, self.max_instances - n - starting)
                out.append(ScaleDecision(pool, delta=d, reason=f"mean virtual usage {load:.2f} >= {self.scale_up}"))
                self._record(pool, now_s, d, undrain=min(d, self.draining(view, pool)))
                self._above[pool] = math.inf
            elif now_s - self._below[pool] >= self.sustain_s and n > self.min_instances and not starting:
                d = min(self.step, n - self.min_instances)
                out.append(ScaleDecision(pool, delta=-d, reason=f"mean virtual usage {load:.2f} <= {self.scale_down}",
                                         drain=self._least_loaded(insts, d)))
                self._record(pool, now_s, -d)
                self._below[pool] = math.inf
        return out


class SLAScaler(ScalingPolicy):
    """Dynamo-planner-style SLA autoscaling from the latency model (module docstring).

    Args:
        latency: one model for every pool, or a mapping pool -> model; or give ``config`` (first pool of each role).
        slo: TTFT/TPOT targets for every request. Default: from ``config``, each priority class's own SLO; the pools
            are sized for the tightest of the classes in the observed window (``slo_of``); else no target.
        headroom: over-provisioning factor on the forecast rate.
        chunk_tokens / max_batch / kv_tokens: an instance's prefill chunk, decode batch cap and KV capacity (tokens)
            for every pool; ``None``: each pool's engine (``max_num_batched_tokens``, ``max_num_seqs``, its KV) when
            built from ``config`` -- as the planner's ``instance_profile`` sizes it -- else 2048 / 256 / unbounded.
        smoothing / trend_smoothing: Holt's level and trend factors for the rate forecast.
    """

    name = "sla"

    def __init__(self, latency: LatencyModel | Mapping[str, LatencyModel] | None = None, *, slo: SLO | None = None,
                 config: ClusterConfig | None = None, headroom: float = 1.1, cooldown_s: float = 10.0,
                 down_sustain_s: float = 60.0, chunk_tokens: int | None = None, max_batch: int | None = None,
                 kv_tokens: int | None = None, smoothing: float = 0.5, trend_smoothing: float = 0.2,
                 **kw: object) -> None:
        super().__init__(**kw)  # type: ignore[arg-type]
        self._lat: dict[str, LatencyModel] = {}
        self._single = latency if isinstance(latency, LatencyModel) else None
        self._role: dict[str, str] = {}  # pool name -> role value, when pools are keyed by name (live Controller)
        self._lat_of_gpu: dict[tuple[str, int], LatencyModel] = {}  # an instance's own model, by (gpu, tp)
        self._eng: dict[str, EngineSpec] = {}  # pool (name or role) -> its engine settings, from config
        # (pool key, gpu, tp) -> the engine of that pool's instances there: two pools on one GPU type may run
        # different engines (a prefill pool's small KV is not its decoders')
        self._eng_of_gpu: dict[tuple[str, str, int], EngineSpec] = {}
        if isinstance(latency, Mapping):
            self._lat.update(latency)
        if config is not None:
            timed = latency_factory(config)
            for pool in config.pools:
                lat = timed(config.model, config.gpus[pool.gpu], pool.tp)
                self._lat.setdefault(pool.role.value, lat)
                self._lat.setdefault(pool.name, lat)
                self._role.setdefault(pool.name, pool.role.value)
                self._lat_of_gpu.setdefault((pool.gpu, pool.tp), lat)
                for key in (pool.role.value, pool.name):
                    self._eng.setdefault(key, pool.engine)
                    self._eng_of_gpu.setdefault((key, pool.gpu, pool.tp), pool.engine)
        # Per-class SLOs (the config's; an explicit ``slo`` holds for every class). Sized with class 0's alone, a
        # window of requests of a tighter class got class 0's instance count.
        self._slo_of_class = config.slo_for if config is not None and slo is None else None
        if self._single is None and not self._lat:
            raise ValueError("SLAScaler needs a latency model: pass latency= or config=")
        self.slo = slo or (config.slo_for(0) if config is not None else SLO())
        # smoothing 0 froze the forecast at the first rate seen; headroom 0 sized every pool for no load.
        _check(headroom=(headroom, 1e-9, None), cooldown_s=(cooldown_s, 0, None),
               down_sustain_s=(down_sustain_s, 0, None), smoothing=(smoothing, 1e-9, 1),
               trend_smoothing=(trend_smoothing, 0, 1), chunk_tokens=(chunk_tokens, 1, None),
               max_batch=(max_batch, 1, None), kv_tokens=(kv_tokens, 1, None))
        self.headroom, self.cooldown_s, self.down_sustain_s = headroom, cooldown_s, down_sustain_s
        self.chunk_tokens, self.max_batch, self.kv_tokens = chunk_tokens, max_batch, kv_tokens
        self.smoothing, self.trend_smoothing = smoothing, trend_smoothing
        self._level: float | None = None
        self._trend = 0.0
        self._t: float | None = None
        self._below: dict[str, tuple[float, int]] = {}  # pool -> (below since, largest target since)

    def latency_of(self, pool: str) -> LatencyModel:
        m = self._lat.get(pool) or self._single or next(iter(self._lat.values()))
        return m

    def forecast(self, now_s: float, rate_rps: float) -> float:
        """Holt's linear trend on irregular ticks; returns the rate expected ``startup_delay_s`` from now."""
        if self._level is None or self._t is None:
            self._level, self._t = rate_rps, now_s
            return rate_rps
        dt = max(now_s - self._t, 1e-9)
        prev = self._level
        self._level = self.smoothing * rate_rps + (1 - self.smoothing) * (prev + self._trend * dt)
        self._trend = self.trend_smoothing * (self._level - prev) / dt + (1 - self.trend_smoothing) * self._trend
        self._t = now_s
        return max(self._level + self._trend * self.startup_delay_s, 0.0)

    def engine_of(self, pool: str) -> EngineSpec | None:
        return self._eng.get(pool)

    def slo_of(self, w: WorkloadSummary) -> SLO:
        """The targets the pools are sized for: with per-class SLOs, the tightest over the window's classes
        (``tightest_slo``)."""
        if self._slo_of_class is None or not w.priorities:
            return self.slo
        return tightest_slo(self._slo_of_class, w.priorities)

    @staticmethod
    def reachable(lat: LatencyModel, role: str, w: WorkloadSummary, slo: SLO) -> tuple[SLO, tuple[str, ...]]:
        """``slo`` less the targets an instance of ``role`` misses even serving the mean request alone (its
        prefill longer than the TTFT target, a one-request decode step longer than the TPOT one), and why each:
        more instances cannot help those requests, only throughput can be bought for them."""
        ttft, tpot, why = slo.ttft_s, slo.tpot_s, []
        if ttft is not None and role != "decode":
            p, c = _computed(w.mean_prompt_tokens, w.mean_cached_prompt_tokens)
            if (t := lat.prefill_time(p, c)) > ttft:
                why.append(f"TTFT {ttft:g} s unreachable: one {p}-token prefill takes {t:.2f} s")
                ttft = None
        if tpot is not None and role != "prefill":
            a, b = lat.decode_coeffs(1)
            if (t := a + b * (w.mean_prompt_tokens + w.mean_output_tokens / 2)) > tpot:
                why.append(f"TPOT {tpot:g} s unreachable: a one-request decode step takes {t:.3f} s")
                tpot = None
        return SLO(ttft, tpot), tuple(why)

    def capacity(self, lat: LatencyModel, role: str, w: WorkloadSummary, engine: EngineSpec | None = None, *,
                 slo: SLO | None = None, best_effort: bool = False) -> float:
        """Requests/s one instance of ``role`` with latency model ``lat`` (running ``engine``) serves within
        ``slo`` (default ``slo_of(w)``). The explicit ``chunk_tokens`` / ``max_batch`` / ``kv_tokens`` win over the
        engine's. ``best_effort``: the targets no instance count can meet (``reachable``) are dropped, not 0."""
        chunk, batch, kv = self.chunk_tokens, self.max_batch, self.kv_tokens
        if engine is not None:
            chunk = chunk or engine.max_num_batched_tokens
            batch = batch or engine.max_num_seqs
            kv = kv or engine_kv_tokens(lat, engine)
        slo = slo or self.slo_of(w)
        if best_effort:
            slo = self.reachable(lat, role, w, slo)[0]
        pre = prefill_capacity_rps(lat, w.mean_prompt_tokens, ttft_slo_s=slo.ttft_s, chunk_tokens=chunk or 2048,
                                   cached_tokens=w.mean_cached_prompt_tokens)
        dec = decode_capacity_rps(lat, w.mean_prompt_tokens, w.mean_output_tokens, tpot_slo_s=slo.tpot_s,
                                  max_batch=batch or 256, kv_tokens=kv)
        return {"prefill": pre, "decode": dec}.get(role, mixed_capacity_rps(pre, dec))

    def targets(self, roles: set[str], w: WorkloadSummary) -> dict[str, int | None]:
        """Instances needed per pool for workload ``w`` (``None``: the SLO is unreachable on this hardware), each
        pool alone serving the whole rate (``decide`` splits it among pools of one role)."""
        rate = w.rate_rps * self.headroom
        return {pool: instances_for(rate, self.capacity(self.latency_of(pool), self._role.get(pool, pool), w,
                                                        self.engine_of(pool)))
                for pool in roles}

    def _targets_in(self, pools: dict[str, list[InstanceSnapshot]], now_s: float,
                    w: WorkloadSummary) -> dict[str, int | None]:
        """``targets`` for the pools of ``view``: the rate of a role split among its pools in proportion to their
        capacity (each sized for the whole rate, two pools of one role were twice what the rate needs: 2.36x on
        the hetero config), each instance at its own GPU's capacity (a key spanning two GPU types counted all at
        the first's: A100s as H100s), new ones at the capacity of the pool's template. Best effort: a target no
        instance count meets is not sized for (``reachable``); ``None`` only where an instance cannot serve the
        mean request at all (its KV does not fit)."""
        rate = w.rate_rps * self.headroom
        new_cap = {k: self.capacity(self.latency_of(k), self._role.get(k, k), w, self.engine_of(k), best_effort=True)
                   for k in pools}
        caps: dict[str, list[float]] = {}
        for k, insts in pools.items():
            role = self._role.get(k, k)
            caps[k] = [new_cap[k] if (i.gpu, i.tp) not in self._lat_of_gpu
                       else self.capacity(self._lat_of_gpu[(i.gpu, i.tp)], role, w,
                                          self._eng_of_gpu.get((k, i.gpu, i.tp), self.engine_of(k)), best_effort=True)
                       for i in insts]
        have = {k: sum(caps[k]) + self.starting(k, now_s) * new_cap[k] for k in pools}
        by_role: dict[str, list[str]] = {}
        for k in pools:
            by_role.setdefault(self._role.get(k, k), []).append(k)
        out: dict[str, int | None] = {}
        for keys in by_role.values():
            total = sum(have[k] for k in keys)
            for k in keys:
                need = rate * (have[k] / total if total > 0 else 1 / len(keys))
                c = new_cap[k]
                if all(abs(x - c) <= 1e-9 * max(c, 1.0) for x in caps[k]):
                    out[k] = instances_for(need, c)  # one GPU type: whole instances of it
                elif c <= 0:
                    out[k] = None
                elif need > have[k]:  # add template instances for the gap
                    out[k] = len(caps[k]) + self.starting(k, now_s) + math.ceil((need - have[k]) / c - 1e-9)
                else:  # drop the instances scale-down would drain (least loaded first) while the rest suffice
                    left, n = have[k], len(caps[k]) + self.starting(k, now_s)
                    order = {iid: j for j, iid in enumerate(self._least_loaded(pools[k], len(pools[k])))}
                    for x, inst in sorted(zip(caps[k], pools[k], strict=True), key=lambda t: order[t[1].instance_id]):
                        if left - x < need:
                            break
                        left, n = left - x, n - 1
                    out[k] = n
        return out

    def decide(self, view, now_s, observed=None):  # type: ignore[override]
        if observed is None:
            raise ValueError("SLAScaler.decide: observed (a WorkloadSummary of the recent window) is required")
        rate = self.forecast(now_s, observed.rate_rps)
        pools = self.pools(view)
        w = dataclasses.replace(observed, rate_rps=rate)
        out = []
        slo = self.slo_of(w)
        for pool, need in sorted(self._targets_in(pools, now_s, w).items()):
            insts = pools[pool]
            have = len(insts) + self.starting(pool, now_s)
            # NOTE: an unreachable target asked for max_instances before: more instances cannot shorten one
            # request's prefill or decode step. Such a pool is sized for throughput; one that cannot hold the
            # mean request at all keeps its size.
            unmet = self.reachable(self.latency_of(pool), self._role.get(pool, pool), w, slo)[1]
            target = min(max(have if need is None else need, self.min_instances), self.max_instances)
            why = (f"forecast {rate:.2f} req/s needs {need} {pool} instances" if need is not None else
                   f"{pool}: an instance cannot hold the mean request ({w.mean_prompt_tokens:.0f} + "
                   f"{w.mean_output_tokens:.0f} tokens): size kept")
            if unmet:
                why += f" ({'; '.join(unmet)}: sized for throughput)"
            if target > have and now_s - self._last_action.get(pool, -math.inf) >= self.cooldown_s:
                # NOTE: ``target`` counts instances still starting: the applier already asked for those.
                out.append(ScaleDecision(pool, target=target, reason=why))
                self._record(pool, now_s, target - have, undrain=min(target - have, self.draining(view, pool)))
                self._below.pop(pool, None)
            elif target < have:
                # NOTE: down to the largest target of the ``down_sustain_s`` window, not the latest alone (as
                # Kubernetes HPA's scale-down stabilization): one tick's dip drained what the window had needed
                # until the tick before, asked back -- a start-up delay away -- at the next tick.
                since, peak = self._below.get(pool, (now_s, target))
                peak = max(peak, target)
                self._below[pool] = (since, peak)
                if now_s - since >= self.down_sustain_s and not self.starting(pool, now_s) and peak < have:
                    if peak > target:
                        why += f"; {peak} needed within the last {self.down_sustain_s:g} s"
                    out.append(ScaleDecision(pool, target=peak, reason=why,
                                             drain=self._least_loaded(insts, len(insts) - peak)))
                    self._record(pool, now_s, peak - have)
                    self._below.pop(pool, None)
            else:
                self._below.pop(pool, None)
        return out


# ---- re-roling ----------------------------------------------------------------------------------------------------------
class RerolePolicy:
    """Propose moving one instance between the PREFILL and DECODE pools when one saturates and the other idles.

    Decode saturated: mean DECODE virtual usage >= ``decode_high`` while mean queued prompt tokens per PREFILL
    instance <= ``prefill_low_tokens``: the PREFILL instance with the least queued work becomes DECODE.
    Prefill saturated: mean queued prompt tokens per PREFILL instance >= ``prefill_high_tokens`` while mean DECODE
    virtual usage <= ``decode_low``: the least used DECODE instance becomes PREFILL (the applier drains or
    migrates its decodes first). Each pool keeps ``min_per_role`` accepting instances; the condition must hold
    ``sustain_s``; at most one change per ``cooldown_s``. While any PREFILL/DECODE instance is draining (a change
    being applied, or a scale-down) nothing is proposed and the sustain clocks restart: the pools' load is judged
    again only once the change has landed (drivers: ``sim/reroling.py``).
    """

    def __init__(self, *, decode_high: float = 0.9, decode_low: float = 0.4, prefill_high_tokens: int = 8192,
                 prefill_low_tokens: int = 1024, min_per_role: int = 1, sustain_s: float = 5.0,
                 cooldown_s: float = 30.0) -> None:
        check_numbers(decode_high=decode_high, decode_low=decode_low, prefill_high_tokens=prefill_high_tokens,
                      prefill_low_tokens=prefill_low_tokens, min_per_role=min_per_role, sustain_s=sustain_s,
                      cooldown_s=cooldown_s)
        if min_per_role < 1:
            raise ValueError(f"RerolePolicy.min_per_role: a P/D cluster needs both roles, got {min_per_role}")
        self.decode_high, self.decode_low = decode_high, decode_low
        self.prefill_high_tokens, self.prefill_low_tokens = prefill_high_tokens, prefill_low_tokens
        self.min_per_role, self.sustain_s, self.cooldown_s = min_per_role, sustain_s, cooldown_s
        self._since: dict[str, float] = {}
        self._last = -math.inf

    def propose(self, view: ClusterView, now_s: float) -> list[RoleChange]:
        pd = (InstanceRole.PREFILL, InstanceRole.DECODE)
        if any(i.draining and i.role in pd for i in view.instances):
            self._since.clear()
            return []
        pre = list(view.with_role(InstanceRole.PREFILL))
        dec = list(view.with_role(InstanceRole.DECODE))
        if not pre or not dec:
            return []
        dec_vu = sum(d.load.virtual_usage for d in dec) / len(dec)
        pre_q = sum(p.prefill_tokens_pending for p in pre) / len(pre)
        # The donor pool must stay below its own saturation trigger once its load is spread over one instance
        # fewer, or the next check would move the instance straight back (flapping).
        conds = {
            "to_decode": dec_vu >= self.decode_high and pre_q <= self.prefill_low_tokens
            and len(pre) > self.min_per_role and pre_q * len(pre) / (len(pre) - 1) < self.prefill_high_tokens,
            "to_prefill": pre_q >= self.prefill_high_tokens and dec_vu <= self.decode_low
            and len(dec) > self.min_per_role and dec_vu * len(dec) / (len(dec) - 1) < self.decode_high,
        }
        for k, on in conds.items():
            if on:
                self._since.setdefault(k, now_s)
            else:
                self._since.pop(k, None)
        if now_s - self._last < self.cooldown_s:
            return []
        for k in conds:
            t = self._since.get(k)
            if t is None or now_s - t < self.sustain_s:
                continue
            self._last = now_s
            self._since.pop(k, None)
            if k == "to_decode":
                p = min(pre, key=lambda i: (i.prefill_tokens_pending, i.num_running + i.num_waiting))
                return [RoleChange(p.instance_id, InstanceRole.DECODE,
                                   f"decode pool saturated (virtual usage {dec_vu:.2f}), prefill idle")]
            d = min(dec, key=lambda i: (i.load.virtual_usage, i.num_running))
            return [RoleChange(d.instance_id, InstanceRole.PREFILL,
                               f"prefill pool saturated ({pre_q:.0f} queued tokens/instance), decode idle")]
        return []


SCALING_POLICIES: dict[str, Callable[..., ScalingPolicy]] = {
    NoScaling.name: NoScaling,
    ThresholdScaler.name: ThresholdScaler,
    SLAScaler.name: SLAScaler,
}

# ``policies.reroling.name`` (applied by ``scheduler/control/reroling.py`` and ``sim/reroling.py``).
REROLING_POLICIES: dict[str, Callable[..., RerolePolicy]] = {"threshold": RerolePolicy}


@dataclass(frozen=True, slots=True)
class RerolingLoop:
    """The applier's keys of ``policies.reroling.params`` (the rest are the policy's): ``interval_s`` between the
    policy's checks; ``switch_timeout_s``, after which the live Controller abandons a switch still busy (the
    simulator does not model it: its switches always complete)."""

    interval_s: float = 5.0
    switch_timeout_s: float = 120.0

    def __post_init__(self) -> None:
        if not (self.interval_s > 0 and self.switch_timeout_s >= 0):  # NaN fails too
            raise ValueError("policies.reroling.params: need interval_s > 0 and switch_timeout_s >= 0, got "
                             f"{self.interval_s} and {self.switch_timeout_s}")


# What the simulating commands add to the refusal below (the live Controller has no such flag).
SIM_REROLING_REMEDY = "pass --reroling none to simulate without re-roling"


def check_reroling_without_scaling(reroling: str | None, scaling: str | None, *, remedy: str = "") -> None:
    """The one rule for re-roling beside autoscaling, for every applier (the live Controller and the simulating
    commands through ``reroling_policy``, ``simulate --scaling``, ``Simulator``). ``reroling``, ``scaling``: each as
    the error names it (``policies.reroling (threshold)``, ``--scaling threshold``); ``None``: not set. ``remedy``:
    the caller's own way out, said after "drop one of the two" (``SIM_REROLING_REMEDY``).

    Raises:
        ValueError: both set, naming both and the remedies.
    """
    if reroling is not None and scaling is not None:
        raise ValueError(f"{reroling}: not with {scaling}: the scaling policies size pools by role, re-roling moves "
                         "instances between them (an instance that changes role would be counted in the wrong "
                         f"pool); drop one of the two{', or ' + remedy if remedy else ''}")


def reroling_policy(config: ClusterConfig, *, remedy: str = "") -> tuple[RerolePolicy, RerolingLoop] | None:
    """``policies.reroling`` as both appliers read it (the live ``RoleSwitcher``, ``llmsched simulate`` / ``plan``):
    a fresh policy (its sustain clocks and cooldown remember) and its loop; ``None`` when the config has none.
    ``remedy``: the caller's own way out of the refusal beside ``policies.scaling``.

    Raises:
        ValueError: an unknown name, together with ``policies.scaling``, a cluster without both a PREFILL and a
            DECODE pool, or a bad parameter -- each naming the field.
    """
    spec = config.policies.reroling
    if spec is None:
        return None
    where = "policies.reroling"
    if spec.name not in REROLING_POLICIES:
        raise ValueError(f"{where}.name: unknown re-roling policy {spec.name!r}; allowed: "
                         f"{', '.join(sorted(REROLING_POLICIES))}")
    scaling = config.policies.scaling
    check_reroling_without_scaling(f"{where} ({spec.name})", None if scaling is None or scaling.name == "none"
                                   else f"policies.scaling ({scaling.name})", remedy=remedy)
    roles = {p.role for p in config.pools}
    if not {InstanceRole.PREFILL, InstanceRole.DECODE} <= roles:
        raise ValueError(f"{where}: needs a PREFILL and a DECODE pool; pools have roles "
                         f"{', '.join(sorted(r.value for r in roles))}")
    params = dict(spec.params)
    try:
        d = RerolingLoop()
        interval_s, timeout_s = params.pop("interval_s", d.interval_s), params.pop("switch_timeout_s", d.switch_timeout_s)
        check_numbers(interval_s=interval_s, switch_timeout_s=timeout_s)  # (float() took "5" and True)
        loop = RerolingLoop(float(interval_s), float(timeout_s))  # type: ignore[arg-type]
        return REROLING_POLICIES[spec.name](**params), loop
    except ValueError as e:
        raise ValueError(str(e) if str(e).startswith(where) else f"{where}.params: {e}") from None
    except TypeError as e:
        raise ValueError(f"{where}.params: {e}") from None


def make_scaling_policy(name: str, **params: object) -> ScalingPolicy:
    """Build a scaling policy by registry name; unknown names list the allowed ones."""
    try:
        factory = SCALING_POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown scaling policy {name!r}; allowed: {', '.join(sorted(SCALING_POLICIES))}") from None
    return factory(**params)
