"""``lookahead``: our cost-model router. It prices each placement with the latency model and picks the cheapest.

For a request (prompt ``P``, predicted output ``O``) and a candidate (prefill instance ``p``, decode instance
``d``; ``p == d`` when colocated), the estimated marginal increase in total latency of everything involved is::

    cost = w * (ttft_weight * (TTFT + transfer) + own decode time)   # newcomer; w = 1 + priority_weight*prio
         + harm_p + harm_d                            # extra latency it inflicts on residents
         + kv_penalty                                 # expected preemption/recompute and waiting for KV
         + slo_penalty                                # fixed price per SLO predicted to be missed

Estimator (documented approximations; all times from ``LatencyModel``):

* TTFT on ``p`` = time to prefill the queued prompt tokens ``Q`` and then ``P`` itself in chunked steps of
  ``chunk_tokens`` (``step_time`` with the instance's resident decode batch riding along on MIXED instances).
  Queued prompts are assumed of equal size ``Q / max(waiting, 1)`` for their attention cost.
* Prefix cache: the leading blocks of the newcomer's ``hash_ids`` that the snapshot reports cached on ``p``
  (``cached_hash_ids``; ``hash_block_tokens`` each, at most ``P - 1``) are not computed: its prefill there is the
  rest, attending over the cached part (what the engine does). Without ``hash_ids`` nothing changes.
* harm_p: on a MIXED instance each of its ``B_p`` decodes waits for the newcomer's prefill steps:
  ``B_p * (prefill steps' time - the same number of decode-only steps)``. FCFS: queued prompts are not delayed.
* transfer = ``kv_transfer_time(P)`` over the link between the prefill and decode GPUs, the slower end's
  (``kv_link``), or the handoff a live profile measured (``LatencyModel.handoff_time``), as the simulator charges
  it; zero when colocated.
* On ``d`` with decode batch ``B``, summed context ``C`` and resident remaining lengths ``R_j`` (per request from
  a detailed snapshot when built with ``detail=True``, else the average ``R`` from ``predicted_remaining_tokens``
  -- remaining, not total: the live instance and the simulator's engine both report predicted minus generated --
  else ``default_output_tokens``)
  and decode-step coefficients ``a(B) + b * context`` (``decode_coeffs``)::

      step_now  = a(B) + b*C
      step_with = a(B+1) + b*(C + P + O/2)             # newcomer at its mean context
      harm_d    = (step_with - step_now) * sum_j min(R_j, O)   # residents slowed while they overlap
      own       = m * step_with + (O - m) * (a(1) + b*(P + O/2)),  m = min(O, mean R)  # batch drains after m
      TPOT      = step_with

  With ``steady_batch=True`` (off by default) ``m = O``: the batch keeps its size over the newcomer's whole life,
  departures replaced by arrivals, as the KV term below already assumes. The drain assumption (nothing arrives
  after the newcomer) made an instance look cheap to a long request in proportion to how soon its residents end:
  with exact lengths a long answer's price of an instance weighed its step time by the residents' mean remaining
  length, not by its own, and past the knee, where nothing drains, that sent long answers to prefill-queued
  instances whose batches were about to "empty" (Azure conversation + arXiv summaries at load 0.9, oracle
  lengths: mean E2E 21.41 -> 20.15 s, SLO attainment 78.3 -> 84.2%; docs/routing.md "Why the true lengths routed
  worse"). Without predictions ``O = R`` and nothing changes. Not the default: with the shipped trace predictor's
  coarse guesses it routed a little worse (Intelligent Router mix 16.0 -> 15.5%, Azure x16 goodput -0.6%).
  ``steady_batch=True`` is ``batch_model="steady"``; the default is ``"drain"``.

  ``batch_model="refill"`` (off by default) is the middle model: residents leave at their remaining lengths and
  arrivals refill the batch. Each newcomer's ``O`` steps are priced at the batch expected over its life,
  ``n_res + n_ref + 1`` with ``n_res = sum_j min(R_j, O) / O`` and ``n_ref`` the refills alive on average: ``rho``
  join per step, each for the arrivals' mean predicted length ``L``, ``n_ref = rho * O/2`` (``O <= L``) else
  ``rho * L * (1 - L / 2O)`` (``rho * L`` for a long life: Little's law); the context likewise (residents at
  ``C / B``, refills at the arrivals' mean ``P + O/2``). ``rho = lambda * step_with``, with ``lambda`` the
  router's own EWMA of what it placed (``on_routed``, decayed over ``pressure_window_s``) shared equally over the
  decoding instances -- not each instance's own history, which is the router's past choices (it balances those
  away: priced as a forecast it measured worse). No arrivals seen: the residents alone drain (near the
  ``drain`` price, at one mean batch rather than two phases).
  Measured (docs/routing.md "A batch that refills at the arrival rate"): not better than ``drain`` with the
  shipped predictor, so an option.

  A non-colocated MIXED decoder also charges the newcomer the time of its queued prefills (they interleave).
* Prefill pressure (MIXED decoders): prompts keep arriving after the newcomer, and every chunked-prefill step
  stalls its decodes. The router remembers the prefill time it sent to each instance, decayed over
  ``pressure_window_s`` (its own ``on_routed`` history, as Llumnix's dispatcher keeps its own counts), as the
  fraction ``f`` of the instance's time spent prefilling; the newcomer's decode time is ``own / (1 - f)``
  (``f`` capped at ``max_pressure``). A prompt counts at its whole prefill time, cached prefix included: netting
  the hit measured worse for routing (Mooncake tier: goodput -9%; the overstatement keeps a conversation's turns
  from piling up where they are cached), while the shedding rule below reads the net figure (what the engine
  runs; whole prompts made its TPOT rule refuse requests that met their SLO). This is what makes decode-heavy
  requests gather on instances that prefill-heavy ones avoid (their harm_p there is large): the Intelligent
  Router's segregation, from the cost model rather than from a class label.
* KV: a headroom check over a fixed horizon of ``H = kv_horizon_tokens`` decode steps (default
  ``default_output_tokens``), the same for every newcomer: peak demand on ``d`` = other KV + queued prompts +
  ``max(C + B*H + P + min(O, H), P + O)`` -- the batch keeps its size and grows one token per request per step
  (departures replaced by arrivals, as on a loaded instance), the newcomer with it, and the newcomer's own
  end state must fit. Overflow preempts whole requests (vLLM recompute): ``victims = ceil(overflow / (C / B))``,
  each costing ``kv_weight * (prefill_time(C / B) + step_with * H / 2)`` (recompute plus waiting for room); if
  the prompt does not fit right now, add the wait for an average resident to finish, ``R * step_now``.
  NOTE: the horizon was the newcomer's own life, ``min(O, R)``; with exact lengths that made KV pressure a
  function of the newcomer's length: short answers saw none and packed KV-tight instances (Azure, oracle
  lengths: 2x the preemptions), long ones were charged the residents' whole growth and pushed onto
  prefill-busy instances (Intelligent Router mix). Without predictions ``O = R = H`` and nothing changed.
* SLO: ``miss_penalty_s * w`` when predicted TTFT exceeds the request's SLO (its own, else the class SLO), plus
  ``miss_penalty_s`` per resident pushed over the default TPOT SLO by the newcomer; and
  ``tpot_miss_penalty_s * w * P(TPOT miss)`` for the newcomer's own TPOT. A life of ``O`` tokens at ``step_with``
  on a decoder with prefill pressure ``f`` meets the prompts routed there meanwhile as a compound Poisson
  process of stalls (the router's history: decayed sums of their prefill times and of their squares), so the
  stall total ``S`` over the life ``L = O * step_with / (1 - f)`` has mean ``f * L`` and variance
  ``sum(tau^2) / window * L``; it misses when ``S > O * (SLO - step_with)`` (normal tail). With no pressure this
  is the indicator ``step_with > SLO``; with pressure it is what tells a short answer from a long one: a few
  tokens averaged over one long prefill stall miss their TPOT, which the mean stretch ``1 / (1 - f)`` hides
  (Azure, exact lengths: TPOT misses of 32-127-token answers doubled under the indicator, docs/routing.md).

SLO shedding (``shed_ttft_factor`` / ``shed_tpot_factor``; off by default, on in ``lookahead_shed``): a request is
rejected (``Rejected`` with a retry-after) instead of queued when even at the chosen placement

* its predicted wait before its own prefill exceeds ``shed_ttft_factor`` x its TTFT SLO -- the wait: the queued
  prompts' prefill time plus, when the instance is out of batch slots (``max_num_seqs`` of the config's pool for
  its (gpu, tp)) or KV room, the residents that must finish first at its completion rate (``_admission_wait``);
  retry-after = that wait; or
* its predicted TPOT exceeds ``shed_tpot_factor`` x its TPOT SLO -- the decode step with it in the batch, divided
  by ``1 - prefill pressure`` on a MIXED decoder (its chunked-prefill steps stall the decodes), the pressure net
  of prefix-cache hits (``prefill_pressure(net=True)``).

Under a burst beyond capacity an FCFS queue makes every later request late and every prefill slows every decode;
refusing the few that would miss anyway keeps the rest inside their SLOs (goodput counts the refused ones as
misses). Never for requests of priority >= ``shed_below_priority`` or already accepted (``RequestInfo.accepted``:
recovery, decode placement after a prefill).

Disaggregated pairing is exact and linear: the cost splits into a prefill part (TTFT, transfer, harm_p and TTFT
SLO) and a decode part, so the best pair is the best of each; MIXED prefill instances are also costed colocated
(no transfer), and so are the DECODE instances Splitwise's prefill fallback offers (``pairing.prefill_pool``): those
only colocated, never as the prefill half of a pair. Latency models come from ``latency`` (one model, or a mapping by instance id), else from
``config`` by the snapshot's (gpu, tp), else a default 7B-on-A100 roofline (rankings only; pass a config).
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum

from scheduler.config.models import ClusterConfig, GPUSpec, ModelSpec
from scheduler.core.prefix import reused_prompt_tokens
from scheduler.core.types import SLO, ClusterView, InstanceRole, InstanceSnapshot, Rejected, RequestInfo
from scheduler.latency import (
    LatencyModel,
    kv_transfer_between,
    latency_factory,
    prefill_pairs,
    roofline_model,
)
from scheduler.policy.pairing import PairingRouter
from scheduler.policy.route import RouteDecision, Router, RouteResult, make_router

_NO_SLO = SLO()


class BatchModel(StrEnum):
    """How the newcomer's decode batch evolves over its life (module docstring, ``own``)."""

    DRAIN = "drain"  # the residents leave and nobody arrives: alone after the mean remaining length
    STEADY = "steady"  # departures replaced at once: the current batch for the whole life
    REFILL = "refill"  # residents leave at their remaining lengths, refills arrive at the observed rate


@dataclass(frozen=True, slots=True)
class CostBreakdown:
    """The estimate for one placement; ``total_s`` is what the router minimises."""

    total_s: float
    ttft_s: float
    tpot_s: float
    own_s: float  # newcomer's decode time
    harm_s: float  # latency added to residents (prefill and decode side)
    kv_s: float
    slo_s: float


@dataclass(frozen=True, slots=True)
class _Side:
    cost: float  # this side's contribution to total cost
    ttft_s: float = 0.0
    tpot_s: float = 0.0
    own_s: float = 0.0
    harm_s: float = 0.0
    kv_s: float = 0.0
    slo_s: float = 0.0


@dataclass(frozen=True, slots=True)
class _Req:
    """The newcomer, as the estimator reads it (computed once per decision)."""

    P: int  # prompt tokens
    O: float  # predicted output tokens (or the default)
    pairs: float  # attention pairs of its prefill
    w: float  # priority weight
    slo: SLO
    hash_ids: tuple[int, ...] = ()  # prompt block ids (prefix cache)


@dataclass(frozen=True, slots=True)
class _Terms:
    """Request-independent terms of one instance snapshot (``LookaheadRouter._terms``)."""

    snap: InstanceSnapshot
    lat: LatencyModel
    Bp: int  # decodes riding along a prefill step here (0 on a PREFILL instance)
    Cp: int
    Bd: int  # the decode batch a newcomer would join: the decodes, plus on a DECODE instance those waiting
    Cd: int  # their summed context
    queue_s: float  # prefilling what is queued
    decode_only_s: float  # a decode-only step of the ``Bp`` decodes
    rem: tuple[float, ...]  # residents' predicted remaining lengths (with per-request detail), ascending
    rem_sums: tuple[float, ...]  # their running sums, from 0
    r_avg: float
    a1: float  # decode step coefficients: a(B + 1), b, a(1)
    b: float
    a_alone: float
    step_now: float
    cap: int  # KV capacity, tokens
    other: int  # KV held beyond the decodes' contexts
    used: int
    victim_s: float  # recomputing an average resident (preemption)


def default_latency_model() -> LatencyModel:
    """A Llama-2-7B-class model on one A100-80GB (roofline), for when no config is bound."""
    model = ModelSpec(name="llama-2-7b", num_layers=32, hidden_size=4096, num_heads=32, num_kv_heads=32,
                      intermediate_size=11008, vocab_size=32000)
    gpu = GPUSpec(name="a100-80gb", memory_gib=80, fp16_tflops=312, hbm_gbps=2039)
    return roofline_model(model, gpu, 1)


def config_latency(config: ClusterConfig | None, gpu: str, tp: int) -> LatencyModel:
    """The latency model of a (GPU type, TP) instance as the simulator times ``config`` (a named
    ``latency_profile`` included); the default 7B roofline when no config knows the GPU (rankings only)."""
    if config is not None and gpu in config.gpus:
        return latency_factory(config)(config.model, config.gpus[gpu], tp)
    return default_latency_model()


class LookaheadRouter(PairingRouter):
    """Cost-model lookahead router (see the module docstring for the estimator)."""

    name = "lookahead"

    def __init__(
        self,
        latency: LatencyModel | Mapping[str, LatencyModel] | None = None,
        *,
        latency_by_instance: Mapping[str, LatencyModel] | None = None,
        config: ClusterConfig | None = None,
        slo: SLO | None = None,
        slo_by_priority: Mapping[int, SLO] | None = None,
        default_output_tokens: float = 256.0,
        chunk_tokens: int | None = None,
        priority_weight: float = 1.0,
        ttft_weight: float = 16.0,
        miss_penalty_s: float = 1.0,
        tpot_miss_penalty_s: float = 10.0,
        kv_weight: float = 2.0,
        pressure_window_s: float = 10.0,
        max_pressure: float = 0.9,
        kv_horizon_tokens: float | None = None,
        steady_batch: bool = False,
        batch_model: str | None = None,
        hash_block_tokens: int = 512,
        detail: bool = False,
        shed_ttft_factor: float | None = None,
        shed_tpot_factor: float | None = None,
        shed_below_priority: int = 1,
        **kw: object,
    ) -> None:
        super().__init__(**kw)  # type: ignore[arg-type]
        for name, v in (("shed_ttft_factor", shed_ttft_factor), ("shed_tpot_factor", shed_tpot_factor)):
            if v is not None and not v > 0:
                raise ValueError(f"{name} must be > 0 (or None: no shedding on it), got {v}")
        self.shed_ttft_factor = shed_ttft_factor
        self.shed_tpot_factor = shed_tpot_factor
        self.shed_below_priority = shed_below_priority
        self._single: LatencyModel | None = latency if isinstance(latency, LatencyModel) else None
        self._by_id: dict[str, LatencyModel] = dict(latency_by_instance or {})
        if isinstance(latency, Mapping):
            self._by_id.update(latency)
        self._by_gpu: dict[tuple[str, int], LatencyModel] = {}
        self.config: ClusterConfig | None = None
        self.slo = slo
        self.slo_by_priority: dict[int, SLO] = dict(slo_by_priority or {})
        self.default_output_tokens = default_output_tokens
        self.chunk_tokens = chunk_tokens or 2048
        self._chunk_given = chunk_tokens is not None
        self.priority_weight = priority_weight
        # NOTE: > 1 weighs the newcomer's wait for its first token above its decode time. 16 was best for both
        # TTFT and mean E2E in a 4-instance synthetic mixed-workload check (1 to 32 tried); tune in the simulator.
        self.ttft_weight = ttft_weight
        self.miss_penalty_s = miss_penalty_s
        # NOTE: a missed TPOT priced like 10 s of summed latency. On Azure x16 (load 0.6 / 0.8, lengths none and
        # exact) 10 / 30 / 100 s gave 98.4-98.8 / 99.4-99.7 / 99.8-99.9% and 71.4-72.9 / 74.3-75.6 / 71.6-76.6%
        # SLO attainment (the old indicator at 1 s: 95.9-97.9% / 68.9-70.9%), but the price is paid in mean E2E:
        # on the Intelligent Router mix 16.6% better than round-robin at 10, 9.3% at 30 (19.3% at 1).
        self.tpot_miss_penalty_s = tpot_miss_penalty_s
        self.kv_weight = kv_weight
        self.pressure_window_s = pressure_window_s
        if not 0 <= max_pressure < 1:  # a decode's time is divided by 1 - pressure
            raise ValueError(f"max_pressure: must be in [0, 1), got {max_pressure}")
        self.max_pressure = max_pressure
        self.kv_horizon_tokens = kv_horizon_tokens if kv_horizon_tokens is not None else default_output_tokens
        # How the newcomer's decode batch evolves over its life (module docstring); ``steady_batch=True`` is
        # ``batch_model="steady"``, kept for the configs and commands that name it.
        if not isinstance(steady_batch, bool):  # a string ("False" from a --routers entry) is truthy: steady
            raise ValueError(f"steady_batch: must be true or false, got {steady_batch!r}")  # noqa: TRY004 (config)
        if batch_model is None:
            batch_model = BatchModel.STEADY if steady_batch else BatchModel.DRAIN
        elif steady_batch and batch_model != BatchModel.STEADY:
            raise ValueError(f"steady_batch=True contradicts batch_model={batch_model!r}: give one of them")
        try:
            self.batch_model = BatchModel(batch_model)
        except ValueError:
            raise ValueError(f"batch_model: must be one of {', '.join(m.value for m in BatchModel)}, "
                             f"got {batch_model!r}") from None
        if self.batch_model is BatchModel.REFILL and not pressure_window_s > 0:  # else no rate: priced as none
            raise ValueError(f"pressure_window_s: batch_model='refill' measures the arrival rate over it; must be > 0, "
                             f"got {pressure_window_s}")
        self.hash_block_tokens = hash_block_tokens
        self._now = 0.0
        # instance -> (decayed prefill seconds, decayed sum of their squares, decayed prefill seconds net of
        # prefix-cache hits, as of time)
        self._pressure: dict[str, tuple[float, float, float, float]] = {}
        # (decayed count of the requests this router placed, decayed sum of their predicted output tokens, of their
        # mean contexts P + O/2, as of time): the refills of ``batch_model="refill"``; ``_decoders`` share them.
        self._arrivals: tuple[float, float, float, float] | None = None
        self._decoders = 1
        self._refill_read: tuple[object, tuple[float, float, float]] = (None, (0.0, 0.0, 0.0))
        # (request id, prefill instance, cached prompt tokens there) of the last placement judged (``admit``):
        # ``on_routed`` adds the prefill the engine will run to the net pressure.
        self._placed_hit: tuple[str, str, int] | None = None
        self._lat_of_id: dict[str, LatencyModel] = {}
        self._cache: dict[str, _Terms] = {}  # instance -> terms of its current snapshot
        # Per-request remaining lengths sharpen harm_d; ask for them only when told to (costly to build).
        self.needs_request_detail = detail  # type: ignore[misc]
        if config is not None:
            self.initialize(config)

    def initialize(self, config: ClusterConfig) -> None:
        """Bind a cluster config: latency models by (gpu, tp), class SLOs and the chunk size come from it."""
        self.config = config
        for p, spec in config.slos.items():
            self.slo_by_priority.setdefault(p, spec.to_slo())
        if not self._chunk_given and config.pools:
            self.chunk_tokens = config.pools[0].engine.max_num_batched_tokens

    # ---- inputs ----------------------------------------------------------------------------------------------------
    def latency_of(self, inst: InstanceSnapshot) -> LatencyModel:
        m = self._lat_of_id.get(inst.instance_id)
        if m is None:
            m = self._lat_of_id[inst.instance_id] = self._latency_of(inst)
        return m

    def _latency_of(self, inst: InstanceSnapshot) -> LatencyModel:
        m = self._by_id.get(inst.instance_id)
        if m is not None:
            return m
        if self.config is not None and inst.gpu in self.config.gpus:
            key = (inst.gpu, inst.tp)
            m = self._by_gpu.get(key)
            if m is None:
                m = self._by_gpu[key] = config_latency(self.config, inst.gpu, inst.tp)
            return m
        if self._single is None:
            self._single = default_latency_model()
        return self._single

    def slo_for(self, request: RequestInfo) -> SLO:
        if request.slo is not None:
            return request.slo
        return self.slo_by_priority.get(request.priority) or self.slo_by_priority.get(0) or self.slo or _NO_SLO

    def output_of(self, request: RequestInfo) -> float:
        o = request.predicted_output_tokens
        return float(o) if o is not None and o > 0 else self.default_output_tokens

    def _weight(self, request: RequestInfo) -> float:
        return 1.0 + self.priority_weight * max(request.priority, 0)

    # ---- estimator pieces ---------------------------------------------------------------------------------------------
    def _prefill_span(self, lat: LatencyModel, tokens: float, pairs: float, batch: int, context: int) -> float:
        """Time to prefill ``tokens`` in chunked steps, ``batch`` decodes (summed ``context``) riding along."""
        if tokens <= 0:
            return 0.0
        per_step = max(self.chunk_tokens - batch, 1)
        steps = math.ceil(tokens / per_step)
        return steps * lat.step_time(prefill_tokens=math.ceil(tokens / steps), prefill_pairs=pairs / steps,
                                     decode_batch=batch, decode_context=context, prefill_seqs=1)

    def _request(self, request: RequestInfo) -> _Req:
        P = request.prompt_tokens
        return _Req(P, self.output_of(request), prefill_pairs(P, 0), self._weight(request), self.slo_for(request),
                    request.hash_ids)

    def _cached_tokens(self, q: _Req, inst: InstanceSnapshot) -> int:
        """Prompt tokens of ``q`` the engine on ``inst`` will not compute: its leading cached blocks."""
        if not q.hash_ids or not inst.cached_hash_ids:
            return 0
        n = 0
        for h in q.hash_ids:
            if h not in inst.cached_hash_ids:
                break
            n += 1
        return reused_prompt_tokens(n, q.P, kv_block=inst.block_size, block_tokens=self.hash_block_tokens)

    def _terms(self, inst: InstanceSnapshot) -> _Terms:
        """The request-independent part of the estimate for ``inst``, kept while its snapshot object is current
        (a router prices every instance for every request; snapshots change far less often)."""
        t = self._cache.get(inst.instance_id)
        if t is not None and t.snap is inst:
            return t
        lat = self.latency_of(inst)
        B, C = inst.num_decoding, inst.decode_context_tokens
        Bp, Cp = (B, C) if inst.role.does_decode else (0, 0)
        bs = max(inst.block_size, 1)
        used = inst.kv_blocks_used * bs
        other = max(used - C, 0)
        Q = inst.prefill_tokens_pending
        # The queue's prefill time counts what the engine will compute: queued prompts' cached prefixes are skipped.
        Qc = Q if inst.prefill_compute_tokens is None else inst.prefill_compute_tokens
        # Only when asked for (``needs_request_detail``): a live snapshot lists its requests whatever the router
        # asked, the simulator's only when asked, and the two priced the same engine state differently.
        rem = tuple(r.predicted_remaining if r.predicted_remaining is not None else self.default_output_tokens
                    for r in inst.requests if not r.in_prefill) if self.needs_request_detail else ()
        if rem:
            r_avg = sum(rem) / len(rem)
        else:
            r_avg = inst.decode_tokens_left(self.default_output_tokens) / B if B else self.default_output_tokens
        # Decodes about to join the batch ahead of a newcomer. On a DECODE instance every waiting request: those
        # whose KV is on its way (the snapshot counts them as waiting) and preempted ones. Unseen, a decoder that
        # preempts looks lighter and draws more (Azure on 4 PREFILL + 12 DECODE, prefill-bound: one decoder
        # took 4890 of 18k requests, 15k preemptions, TPOT p50 0.78 s; least-outstanding 0.026 s). On a MIXED one
        # only those on their way (``num_incoming``): the rest of its queue are prompts.
        W = inst.num_waiting if inst.role is InstanceRole.DECODE else min(inst.num_incoming, inst.num_waiting)
        prompts_waiting = inst.num_waiting - (W if inst.role is not InstanceRole.DECODE else 0)
        if W and inst.role.does_decode:
            extra = int(W * C / B) if B else 0  # their contexts, as the residents' (unknown when none decode)
            B, C, used = B + W, C + extra, used + extra
            rem = rem + (r_avg,) * W if rem else rem
        a0, b = lat.decode_coeffs(max(B, 1))
        cap = inst.kv_blocks_total * bs
        rem = tuple(sorted(rem))  # ascending, with running sums: ``_decode_side`` prices a newcomer in O(log B)
        t = _Terms(
            snap=inst, lat=lat, Bp=Bp, Cp=Cp, Bd=B, Cd=C,
            # Queued prompts, assumed of equal size Q / max(waiting, 1) for their attention cost.
            queue_s=self._prefill_span(lat, Qc, Qc * (Q / max(prompts_waiting, 1) + 1) / 2, Bp, Cp),
            decode_only_s=lat.step_time(decode_batch=Bp, decode_context=Cp) if Bp else 0.0,
            rem=rem, rem_sums=tuple(itertools.accumulate(rem, initial=0.0)),
            r_avg=r_avg, a1=lat.decode_coeffs(B + 1)[0], b=b, a_alone=lat.decode_coeffs(1)[0],
            step_now=a0 + b * C if B else 0.0, cap=cap, other=other, used=used,
            victim_s=lat.prefill_time(int(min(C / B, cap))) if B else 0.0,
        )
        self._cache[inst.instance_id] = t
        return t

    def _prefill_side(self, q: _Req, t: _Terms, *, to: GPUSpec | None) -> _Side:
        """``to``: the decoder's GPU type, whose link with this one's carries the KV (``None``: colocated)."""
        lat, P, B = t.lat, q.P, t.Bp
        hit = self._cached_tokens(q, t.snap)
        computed = P - hit
        self_s = self._prefill_span(lat, computed, prefill_pairs(computed, hit) if hit else q.pairs, B, t.Cp)
        harm = 0.0
        if B:
            steps = math.ceil(computed / max(self.chunk_tokens - B, 1))
            harm = B * max(self_s - steps * t.decode_only_s, 0.0)
        ttft = t.queue_s + self_s
        if to is not None:
            # What the clocks charge (``Simulator._handoff``): the handoff measured end to end where a live profile
            # has it, else the KV over the link between the two GPU types.
            measured = lat.handoff_time(P)
            ttft += measured if measured is not None else kv_transfer_between(P, lat.model, lat.gpu, to)
        w, slo = q.w, q.slo
        pen = self.miss_penalty_s * w if slo.ttft_s is not None and ttft > slo.ttft_s else 0.0
        return _Side(w * self.ttft_weight * ttft + harm + pen, ttft_s=ttft, harm_s=harm, slo_s=pen)

    def _decode_side(self, q: _Req, t: _Terms, *, colocated: bool) -> _Side:
        d = t.snap
        P, O = q.P, q.O
        B, C = t.Bd, t.Cd
        r_avg, b, step_now = t.r_avg, t.b, t.step_now
        overlap = self._overlap(t, O)
        ctx_new = P + O / 2
        step_with = t.a1 + b * (C + ctx_new)
        harm = (step_with - step_now) * overlap if B else 0.0
        if self.batch_model is BatchModel.REFILL:
            own = self._refill_own(q, t, step_with)
        else:
            m = (O if self.batch_model is BatchModel.STEADY else min(O, r_avg)) if B else 0.0
            own = m * step_with + (O - m) * (t.a_alone + b * ctx_new)
        # One read of the prefill history for both of its uses below (a decay factor per instance per request).
        stalls = self._stalls(d.instance_id)
        if d.role is InstanceRole.MIXED:
            own /= 1.0 - min(stalls[0], self.max_pressure)  # prefill_pressure
        if d.role is InstanceRole.MIXED and not colocated and d.prefill_tokens_pending:
            own += t.queue_s  # its queued prefills interleave with the newcomer's decode
        # KV: headroom for the batch's growth over the fixed horizon H (module docstring), and the newcomer's end.
        cap = t.cap
        # Its queued prompts take KV before the newcomer, whether it prefills there or only decodes. NOTE: until the
        # twenty-eighth session a colocated placement left them (and the newcomer's prompt in the "no room now"
        # check) out; counting them: Azure x16 lookahead goodput +1.1%, P/D tier +2.8%, Intelligent Router mix
        # without lengths 16.1 -> 18.1% better than round-robin on seed 1, Mooncake x16 and the MIXED tier unchanged.
        other = t.other + d.prefill_tokens_pending
        H = self.kv_horizon_tokens
        peak = max(C + B * H + P + min(O, H), P + O)
        overflow = other + peak - cap
        kv = 0.0
        if overflow > 0:
            victim_ctx = C / B if B else P
            victims = math.ceil(overflow / max(victim_ctx, 1))
            recompute = t.victim_s if B else t.lat.prefill_time(int(min(victim_ctx, cap)))
            kv = self.kv_weight * victims * (recompute + step_with * H / 2)
        if t.used + P > cap:
            kv += r_avg * step_now  # no room now: wait for a resident to finish
        w, slo = q.w, q.slo
        pen = 0.0
        if slo.tpot_s is not None:
            miss = self._tpot_miss_probability(d.instance_id, O, step_with, slo.tpot_s, stalls=stalls)
            pen = self.tpot_miss_penalty_s * w * miss
        base = (self.slo_by_priority.get(0) or self.slo or _NO_SLO).tpot_s
        if base is not None and B and step_now <= base < step_with:
            pen += self.miss_penalty_s * B  # residents pushed over their TPOT target
        return _Side(w * own + harm + kv + pen, tpot_s=step_with, own_s=own, harm_s=harm, kv_s=kv, slo_s=pen)

    @staticmethod
    def _overlap(t: _Terms, k: float) -> float:
        """Resident-steps within a newcomer's first ``k`` steps, each resident staying its remaining length:
        ``sum(min(R_j, k))`` -- those shorter than ``k`` whole, the rest ``k`` each."""
        if t.rem:
            i = bisect.bisect_right(t.rem, k)
            return t.rem_sums[i] + k * (len(t.rem) - i)
        return t.Bd * min(t.r_avg, k)

    def _refill_own(self, q: _Req, t: _Terms, step_s: float) -> float:
        """The newcomer's decode time under ``batch_model="refill"`` (module docstring): its ``O`` steps at the
        batch expected over its life -- the residents still decoding plus the refills arrived and not yet done --
        and that batch's summed context. ``step_s``: the decode step now, which turns the arrival rate into refills
        per step. NOTE: one mean batch, not the life cut in stretches each priced at its own: 2 or 4 stretches
        routed within noise of it (IR mix, 4 seeds) at more cost. Not stretched by this instance's prefill
        pressure (its own history, as the rate would be): that priced the stall twice for the prefill-busy ones
        (IR mix seeds 0-3, no lengths: 11.1% better than round-robin on average vs 15.5%; docs/routing.md)."""
        O = q.O
        rate, L, ctx_refill = self._refills()
        # Refill-steps over the life: rho per step join, each stays L (sum over the life of min(age, L)).
        n_ref = rate * step_s * (O / 2 if O <= L else L * (1 - L / (2 * O)))
        n_res = self._overlap(t, O) / O  # residents' mean count: each stays min(R_j, O)
        ctx = n_res * (t.Cd / t.Bd if t.Bd else 0.0) + n_ref * ctx_refill + q.P + O / 2
        # A fractional batch: the step's GEMM table interpolates between its neighbours.
        return O * (t.lat.decode_coeffs(n_res + n_ref + 1.0)[0] + t.b * ctx)  # type: ignore[arg-type]

    def _refills(self) -> tuple[float, float, float]:
        """An instance's share of the arrivals: (requests per second this router placed recently over the decoding
        instances, their mean predicted output tokens and mean context ``P + O/2``). Read once per decision.
        NOTE: the cluster's rate shared out, not each instance's own history: that one is the router's past
        choices, which it balances away -- priced as a forecast it steered new requests from recently chosen
        instances (IR mix seeds 0-3, mean gain over round-robin: true lengths 16.8 vs 19.0%, shipped predictor
        13.8 vs 14.8%; docs/routing.md)."""
        key = (self._now, self._arrivals, self._decoders)
        if self._refill_read[0] == key:
            return self._refill_read[1]
        v = (0.0, 0.0, 0.0)
        if self._arrivals is not None:
            n, out, ctx, t = self._arrivals
            k = math.exp(-max(self._now - t, 0.0) / self.pressure_window_s) / self.pressure_window_s
            v = (n * k / self._decoders, out / n, ctx / n)
        self._refill_read = (key, v)
        return v

    # ---- prefill pressure (router-side history) ---------------------------------------------------------------------
    def prefill_pressure(self, instance_id: str, *, net: bool = False) -> float:
        """Fraction of ``instance_id``'s recent time spent prefilling what this router sent it (capped); ``net``:
        each prompt less its prefix-cache hit there (what the engine ran), else whole (module docstring)."""
        rate, _, rate_net = self._stalls(instance_id)
        return min(rate_net if net else rate, self.max_pressure)

    def _stalls(self, instance_id: str) -> tuple[float, float, float]:
        """(prefill seconds per second, squared prefill seconds per second, the first net of prefix-cache hits)
        this router sent ``instance_id`` recently: the mean and the variance rate of the stalls its decodes meet."""
        v = self._pressure.get(instance_id)
        if v is None or self.pressure_window_s <= 0:
            return 0.0, 0.0, 0.0
        work, sq, net, t = v
        k = math.exp(-max(self._now - t, 0.0) / self.pressure_window_s) / self.pressure_window_s
        return work * k, sq * k, net * k

    def _tpot_miss_probability(self, instance_id: str, O: float, step_s: float, slo_s: float, *,
                               stalls: tuple[float, float, float] | None = None) -> float:
        """P(the newcomer's TPOT > ``slo_s``) over a life of ``O`` tokens of ``step_s`` each plus the prefill
        stalls met meanwhile (module docstring, "SLO"). ``stalls``: ``_stalls(instance_id)`` when already read."""
        O = max(O, 1.0)
        slack = O * (slo_s - step_s)
        if slack <= 0:
            return 1.0
        rate, sq_rate, _ = stalls if stalls is not None else self._stalls(instance_id)
        f = min(rate, self.max_pressure)  # prefill_pressure, from the one read of the history
        life = O * step_s / (1.0 - f)
        mean, var = f * life, sq_rate * life
        if var <= 0:
            return 1.0 if mean > slack else 0.0
        return 0.5 * math.erfc((slack - mean) / math.sqrt(2.0 * var))

    def route(self, request: RequestInfo, view: ClusterView) -> RouteResult:
        self._now = view.time_s
        if self.batch_model is BatchModel.REFILL:
            self._decoders = max(sum(1 for s in view.instances if s.role.does_decode and s.accepting), 1)
        return self.admit(request, super().route(request, view), view)

    def admit(self, request: RequestInfo, decision: RouteResult, view: ClusterView) -> RouteResult:
        """``decision``, or a ``Rejected`` when the shedding rules refuse that placement (module docstring); never
        for already-accepted requests or priority >= ``shed_below_priority``. Also judges other routers' placements
        (``ShedRouter``)."""
        self._now = view.time_s
        self._forget_departed(view)
        if not isinstance(decision, RouteDecision):
            return decision
        q = self._request(request)
        snaps = {s.instance_id: s for s in view.instances}
        p = snaps.get(decision.prefill_instance)
        if p is not None:
            self.latency_of(p)  # ``on_routed`` prices the placed prefill with it, judged or not
            if q.hash_ids:
                self._placed_hit = (request.request_id, p.instance_id, self._cached_tokens(q, p))
        if request.accepted or request.priority >= self.shed_below_priority:
            return decision
        return self._shed(q, decision, snaps) or decision

    def _forget_departed(self, view: ClusterView) -> None:
        """Drop per-instance state of instances no longer in the view. Instance ids are never reused (the Controller
        numbers them on), so under autoscaling the pressure history, latency models and cached terms (which hold a
        whole snapshot) of every instance ever seen would pile up in a long-running ingress. Only once the state
        outgrows twice the view: a steady cluster pays a length check per request, and a view briefly short of an
        instance (the ingress retrying around a failed one) does not wipe that instance's history."""
        n = 2 * len(view.instances)
        if len(self._cache) <= n and len(self._pressure) <= n and len(self._lat_of_id) <= n:
            return
        live = {s.instance_id for s in view.instances}
        for state in (self._cache, self._pressure, self._lat_of_id):
            for iid in [k for k in state if k not in live]:
                del state[iid]

    def _shed(self, q: _Req, decision: RouteDecision, snaps: Mapping[str, InstanceSnapshot]) -> Rejected | None:
        """SLO shedding (module docstring): a ``Rejected`` when the placement is predicted to miss an SLO."""
        p = snaps[decision.prefill_instance]
        if self.shed_ttft_factor is not None and q.slo.ttft_s is not None:
            # NOTE: the wait before its own prefill, not the whole TTFT: a long prompt is never refused for its length.
            t = self._terms(p)
            wait = t.queue_s + self._admission_wait(q, t)
            if wait > self.shed_ttft_factor * q.slo.ttft_s:
                return Rejected(f"shed: predicted wait {wait:.2f} s on {p.instance_id} is over "
                                f"{self.shed_ttft_factor:g} x the {q.slo.ttft_s:g} s TTFT SLO", retry_after_s=wait)
        if self.shed_tpot_factor is not None and q.slo.tpot_s is not None:
            d = snaps[decision.decode_instance or decision.prefill_instance]
            tpot = self._decode_side(q, self._terms(d), colocated=d is p).tpot_s
            if d.role is InstanceRole.MIXED:  # its prefill steps stall the decodes: tokens come that much slower
                tpot /= 1.0 - self.prefill_pressure(d.instance_id, net=True)
            if tpot > self.shed_tpot_factor * q.slo.tpot_s:
                return Rejected(f"shed: predicted TPOT {tpot * 1e3:.0f} ms on {d.instance_id} is over "
                                f"{self.shed_tpot_factor:g} x the {q.slo.tpot_s * 1e3:g} ms TPOT SLO",
                                retry_after_s=self.pressure_window_s / 2)  # prefill pressure decays over the window
        return None

    def _max_num_seqs(self, inst: InstanceSnapshot) -> int | None:
        """The engine's batch-slot limit, from the bound config's pools of the instance's (gpu, tp); None unknown."""
        if self.config is None:
            return None
        caps = [p.engine.max_num_seqs for p in self.config.pools if p.gpu == inst.gpu and p.tp == inst.tp]
        return min(caps) if caps else None

    def _admission_wait(self, q: _Req, t: _Terms) -> float:
        """Before the newcomer is admitted at all: residents that must finish to free a batch slot (everything
        running and queued ahead holds one) or KV room for the queue and its prompt, at the instance's completion
        rate ``B / (mean remaining x step)``."""
        snap = t.snap
        B = snap.num_decoding
        if not B:
            return 0.0
        seqs = self._max_num_seqs(snap)
        need = max(snap.num_running + snap.num_waiting + 1 - seqs, 0) if seqs else 0
        short = t.used + snap.prefill_tokens_pending + q.P - t.cap  # KV tokens missing
        if short > 0:
            need = max(need, math.ceil(short / max(snap.decode_context_tokens / B, 1.0)))
        return need * t.r_avg * t.step_now / B

    def on_routed(self, request: RequestInfo, decision: RouteDecision) -> None:
        if self.pressure_window_s <= 0:
            return
        now = self._now
        # Arrivals only: a re-route of an accepted request (a recovery, a drain's refusal) adds no new decode to
        # the cluster (the simulator routes each request once; the live ingress re-routes, and counted them).
        if self.batch_model is BatchModel.REFILL and not request.accepted:
            n, out, ctx, t = self._arrivals or (0.0, 0.0, 0.0, now)
            k = math.exp(-max(now - t, 0.0) / self.pressure_window_s)
            O = self.output_of(request)
            self._arrivals = (n * k + 1.0, out * k + O, ctx * k + request.prompt_tokens + O / 2, now)
        lat = self._lat_of_id.get(decision.prefill_instance)
        if lat is None:
            return
        iid = decision.prefill_instance
        work, sq, net, t = self._pressure.get(iid, (0.0, 0.0, 0.0, now))
        k = math.exp(-max(now - t, 0.0) / self.pressure_window_s)
        tau = lat.prefill_time(request.prompt_tokens)
        placed = self._placed_hit
        hit = placed[2] if placed is not None and placed[:2] == (request.request_id, iid) else 0
        tau_net = lat.prefill_time(request.prompt_tokens - hit, hit) if hit else tau
        self._pressure[iid] = (work * k + tau, sq * k + tau * tau, net * k + tau_net, now)

    # ---- public ------------------------------------------------------------------------------------------------------
    def estimate(self, request: RequestInfo, prefill: InstanceSnapshot,
                 decode: InstanceSnapshot | None = None) -> CostBreakdown:
        """Cost of prefilling on ``prefill`` and decoding on ``decode`` (``None``: colocated on ``prefill``)."""
        return self._estimate(self._request(request), prefill, decode)

    def _estimate(self, q: _Req, prefill: InstanceSnapshot, decode: InstanceSnapshot | None = None) -> CostBreakdown:
        colocated = decode is None or decode.instance_id == prefill.instance_id
        tp = self._terms(prefill)
        td = tp if decode is None else self._terms(decode)
        f = self._prefill_side(q, tp, to=None if colocated else td.lat.gpu)
        g = self._decode_side(q, td, colocated=colocated)
        return CostBreakdown(f.cost + g.cost, f.ttft_s, g.tpot_s, g.own_s, f.harm_s + g.harm_s, g.kv_s,
                             f.slo_s + g.slo_s)

    def score(self, request: RequestInfo, inst: InstanceSnapshot, *, phase: str) -> float:
        return self._score(self._request(request), inst, phase)

    def _score(self, q: _Req, inst: InstanceSnapshot, phase: str) -> float:
        if phase == "prefill":
            # Its decoder unknown here: the transfer over this GPU's own link (a lower bound: the other end can
            # only slow it, ``kv_link``).
            t = self._terms(inst)
            return self._prefill_side(q, t, to=t.lat.gpu).cost
        if phase == "decode":
            return self._decode_side(q, self._terms(inst), colocated=False).cost
        # ``_estimate(q, inst).total_s`` without its breakdown: a router prices every candidate for every request.
        t = self._terms(inst)
        return self._prefill_side(q, t, to=None).cost + self._decode_side(q, t, colocated=True).cost

    def pick(self, request, candidates, view, *, phase):  # type: ignore[override]
        q = self._request(request)  # once per decision, not once per candidate
        return min(candidates, key=lambda s: self._score(q, s, phase))

    def pair(self, request, prefill, decode, view: ClusterView) -> RouteResult:  # type: ignore[override]
        q = self._request(request)
        dec = InstanceRole.DECODE
        # A DECODE instance among the prefill candidates (Splitwise's fallback, ``prefill_pool``) only runs the
        # prompt to keep it: costed colocated below, never as the prefill half of a pair.
        f = [k for k, p in enumerate(prefill) if p.role is not dec]
        best, choice = math.inf, (prefill[0], prefill[0])
        if f:
            # The transfer runs over the slower end's link (``kv_link``), so a prefill's cost depends on its
            # decoder's GPU: the best decoder per link (one on a cluster of one NIC type), then the best prefill
            # for each -- the exact best pair, at one prefill pricing per link rather than per decoder.
            by_link: dict[tuple[float, float], tuple[float, int]] = {}
            for k, d in enumerate(decode):
                gpu = self._terms(d).lat.gpu
                c = (self._decode_side(q, self._terms(d), colocated=False).cost, k)
                key = (gpu.network_gbps, gpu.network_latency_s)
                if key not in by_link or c < by_link[key]:
                    by_link[key] = c
            for gd, kd in by_link.values():
                to = self._terms(decode[kd]).lat.gpu
                fp, kp = min((self._prefill_side(q, self._terms(prefill[k]), to=to).cost, k) for k in f)
                if fp + gd < best:
                    best, choice = fp + gd, (prefill[kp], decode[kd])
        for p in prefill:  # MIXED (and fallback DECODE) instances may keep the request: no transfer, no second queue
            if p.role.does_decode:
                c = self._estimate(q, p).total_s
                if c < best:
                    best, choice = c, (p, p)
        p, d = choice
        if p.instance_id == d.instance_id and d.role is not InstanceRole.PREFILL:  # PREFILL: explicit borrow pair
            why = "; decode instance prefills" if p.role is dec else ""
            return RouteDecision(p.instance_id, reason=f"lookahead cost {best:.3f}s colocated{why}")
        return RouteDecision(p.instance_id, d.instance_id, reason=f"lookahead cost {best:.3f}s")


class SheddingLookaheadRouter(LookaheadRouter):
    """``lookahead`` with SLO shedding on (module docstring): refuses a request that would wait more than 0.25 x its
    TTFT SLO before its own prefill, or whose predicted TPOT is over its TPOT SLO, even on the best placement.

    Measured (docs/routing.md "SLO shedding"; 16 instances at 0.8 of saturation, goodput at 90% attainment over the
    best of least-outstanding / Llumnix; twenty-eighth session): Azure conversation 1.52x (``lookahead`` alone 1.06x),
    where the TPOT rule does most of the work; Mooncake conversation 1.76x (``lookahead`` alone 1.79x: there the
    rules add attainment, not goodput). The TTFT factor is small because the wait estimate leaves out the prompts that arrive after the
    newcomer; the table there has the other factors.
    """

    name = "lookahead_shed"

    # TTFT factor 0.25 (0.1 until the twenty-first session): chosen over five 16-instance clusters and both traces
    # (docs/routing.md, SLO shedding); at 0.1 the rule refused 7% of a P/D tier's requests that would have met it.
    def __init__(self, *, shed_ttft_factor: float | None = 0.25, shed_tpot_factor: float | None = 1.0,
                 **kw: object) -> None:
        super().__init__(shed_ttft_factor=shed_ttft_factor, shed_tpot_factor=shed_tpot_factor,
                         **kw)  # type: ignore[arg-type]


class ShedRouter(Router):
    """Another router's placements with ``lookahead_shed``'s refusal rules (``LookaheadRouter._shed``, one place for
    that decision): ``base`` places every request; a ``LookaheadRouter`` with the shedding factors judges the
    placement it chose and refuses when it is predicted to miss an SLO. The judge hears every placement
    (``on_routed``), so its prefill-pressure term reads the base router's traffic. Config:
    ``policies.router: {name: shed, params: {base: learned}}``.

    Measured (docs/routing.md "SLO shedding"): over ``lookahead`` it decides exactly what ``lookahead_shed`` does;
    over ``learned`` it lifts Azure goodput (1.04x -> 1.37x the best dispatcher). The TPOT rule reads prefill
    pressure net of prefix-cache hits: counting whole prompts, it refused 7.2% of ``learned``'s Mooncake
    placements and cut goodput below ``learned`` alone (1.62 vs 2.20 req/s, the artifact of that time).
    """

    name = "shed"

    def __init__(self, base: str | Router = "learned", *, config: ClusterConfig | None = None,
                 shed_ttft_factor: float | None = 0.25, shed_tpot_factor: float | None = 1.0,
                 shed_below_priority: int = 1, **base_params: object) -> None:
        if isinstance(base, Router):
            self.base = base
        else:
            self.base = make_router(base, **base_params)
            if config is not None:
                self.base.initialize(config)
        self.judge = LookaheadRouter(config=config, shed_ttft_factor=shed_ttft_factor,
                                     shed_tpot_factor=shed_tpot_factor, shed_below_priority=shed_below_priority)
        self.needs_request_detail = self.base.needs_request_detail  # type: ignore[misc]
        self.needs_detail_with_migration = self.base.needs_detail_with_migration  # type: ignore[misc]

    def initialize(self, config: ClusterConfig) -> None:
        self.base.initialize(config)
        self.judge.initialize(config)

    def route(self, request: RequestInfo, view: ClusterView) -> RouteResult:
        return self.judge.admit(request, self.base.route(request, view), view)

    def on_routed(self, request: RequestInfo, decision: RouteDecision) -> None:
        self.base.on_routed(request, decision)
        self.judge.on_routed(request, decision)

    def on_finished(self, request_id: str, instance_id: str) -> None:
        self.base.on_finished(request_id, instance_id)
        self.judge.on_finished(request_id, instance_id)

