"""Load- and workload-aware routers. Importing this module registers every smart router.

Registered names: ``power_of_two``, ``llumnix``, ``prefix_affinity``, ``mixing`` (defined here), ``lookahead``,
``lookahead_shed``, ``shed`` (``routers_lookahead.py``) and ``learned`` (``routers_learned.py``). All share the P/D pairing and Splitwise
fallback of ``pairing.PairingRouter``. Priority: larger is more important; high-priority requests avoid queues.
"""

from __future__ import annotations

import math
import random as _random
from collections import Counter, OrderedDict
from collections.abc import Container

from scheduler.config.models import ClusterConfig
from scheduler.core.prefix import reused_prompt_tokens
from scheduler.core.types import ClusterView, InstanceSnapshot, Rejected, RequestInfo
from scheduler.policy.pairing import (
    HIGH_PRIORITY,
    PairingRouter,
    PriorityTracker,
    queue_penalty,
    virtual_blocks_with,
    virtual_usage_with,
)
from scheduler.policy.route import RouteDecision, RouteResult, register_router
from scheduler.policy.routers_learned import LearnedRouter
from scheduler.policy.routers_lookahead import (
    LookaheadRouter,
    SheddingLookaheadRouter,
    ShedRouter,
    config_latency,
)


# ---- power of two choices ---------------------------------------------------------------------------------------
class PowerOfTwoRouter(PairingRouter):
    """Power of two choices (Mitzenmacher 2001; Ray Serve's ``pow_2_router``).

    Sample two distinct candidates uniformly (seeded), send to the one with fewer outstanding (running +
    waiting) requests; ties go to the first sample. High-priority requests add ``queue_weight`` per waiting
    request so they avoid long queues.
    """

    name = "power_of_two"

    def __init__(self, seed: int = 0, *, queue_weight: float = 1.0, **kw: object) -> None:
        super().__init__(**kw)  # type: ignore[arg-type]
        self._rng = _random.Random(seed)
        self.queue_weight = queue_weight

    def score(self, request: RequestInfo, inst: InstanceSnapshot, *, phase: str) -> float:
        return inst.num_running + inst.num_waiting + queue_penalty(request, inst, self.queue_weight)

    def pick(self, request, candidates, view, *, phase):  # type: ignore[override]
        if len(candidates) == 1:
            return candidates[0]
        # Two candidates are sampled too (both, in a random order): taken in view order, every tie -- an idle pair
        # of decoders, say -- went to the first one.
        a, b = self._rng.sample(range(len(candidates)), 2)
        return min((candidates[a], candidates[b]), key=lambda s: self.score(request, s, phase=phase))


# ---- Llumnix dispatch ---------------------------------------------------------------------------------------------
class _StepsLoad:
    """A freeness as AlibabaPAI/llumnix's ``RemainingStepsLoad`` compares: ``a < b`` is ``a >= b`` in steps (the
    freer sorts first), so a tie is "less" both ways and Python's sort, not a rule, orders tied instances."""

    __slots__ = ("steps",)

    def __init__(self, steps: float) -> None:
        self.steps = steps

    def __lt__(self, other: _StepsLoad) -> bool:
        return self.steps >= other.steps


class LlumnixRouter(PairingRouter):
    """Llumnix dispatch (Sun et al., OSDI 2024, section 4.4.2), by one of Llumnix's two load metrics (``metric``).

    * ``usage_ratio`` (the default): the lowest virtual usage fraction, (KV blocks used + blocks of queued prompts
      + this request's prompt blocks) / total blocks -- the KV demand the instance will have once its queue is
      admitted (the code's ``kv_blocks_ratio``/``usage_ratio`` load, here with the newcomer's prompt counted).
    * ``remaining_steps``: the highest *freeness*, the paper's F = (M - sum V) / B -- the free blocks left after the
      virtual usages, divided by the batch size: how many decode steps the batch can still run. As the code's
      default dispatch metric (AlibabaPAI/llumnix ``RemainingStepsLoad``, ``DISPATCH_LOAD_METRIC =
      'remaining_steps'``): (total - used - blocks of all queued prompts) / (running + waiting requests), the
      newcomer not counted, an instance with no request the best (freeness +inf; ties: ``ties`` below). The
      score is -F (lower is better, as every router's). On a P/D view it picks the decode instance; the
      prefill instance is still picked by usage ratio, as the code's P/D defaults do
      (``DISPATCH_DECODE_LOAD_METRIC = 'remaining_steps'``, ``DISPATCH_PREFILL_LOAD_METRIC`` and
      ``DISPATCH_DECODE_AS_PREFILL_LOAD_METRIC = 'kv_blocks_ratio'``).

    Decodes on their way here (``num_incoming``) are left out of both, as Llumnix's virtual usage has no such
    term: counted, this baseline did worse on the Mooncake tier as P/D (SLO 86.7 -> 85.0% counted on the decode
    side, 69.9% on both; twenty-seventh session, ``usage_ratio``).

    Priority headroom: an instance holding high-priority requests reports ``headroom`` extra virtual usage per such
    request (capped at ``max_headroom``; a fraction of its KV blocks) to normal-priority requests, so normal load
    stays away and the high-priority requests keep room to grow; a high-priority request sees no headroom but pays
    ``queue_weight`` per waiting request. Under ``remaining_steps`` the same fraction of the instance's blocks is
    taken from the free blocks F divides (the paper's headroom is virtual usage too).

    Two details of Llumnix's freeness, off by default (the defaults keep every recorded row), each as one release
    of AlibabaPAI/llumnix has it (``remaining_steps`` only; usage ratio has neither):

    * ``watermark``: the fraction of blocks vLLM's block manager keeps free (``BlockSpaceManagerV1``:
      ``watermark_blocks = int(watermark * num_gpu_blocks)``, vLLM's default 0.01), left out of the free blocks,
      as the OSDI-era code does (``InstanceInfo``: ``num_available_gpu_blocks = num_free_gpu_blocks -
      num_watermark_blocks``); the current code's ``__post_init__`` takes total - used and leaves it in.
    * ``ties``: ``first`` (ties go to the first candidate, as the OSDI-era code's stable sort of float loads) or
      ``llumnix``: the current code's ``sort_instance_infos`` over ``RemainingStepsLoad`` objects, whose ``__lt__``
      is ``>=`` -- true both ways on a tie, so the order ties come out in is whatever Python's sort makes of it
      (on CPython 3.11, almost always the last tied candidate: every empty instance ties at +inf).
    """

    name = "llumnix"
    METRICS = ("usage_ratio", "remaining_steps")
    TIES = ("first", "llumnix")

    def __init__(self, *, headroom: float = 0.1, max_headroom: float = 0.5, queue_weight: float = 0.05,
                 metric: str = "usage_ratio", watermark: float = 0.0, ties: str = "first", **kw: object) -> None:
        super().__init__(**kw)  # type: ignore[arg-type]
        if metric not in self.METRICS:
            raise ValueError(f"router 'llumnix': metric {metric!r}; expected one of {', '.join(self.METRICS)}")
        if ties not in self.TIES:
            raise ValueError(f"router 'llumnix': ties {ties!r}; expected one of {', '.join(self.TIES)}")
        if not 0.0 <= watermark < 1.0:
            raise ValueError(f"router 'llumnix': watermark {watermark!r}; expected a fraction in [0, 1)")
        if metric != "remaining_steps" and (watermark or ties != "first"):
            # Llumnix's usage ratio counts neither: set here, they would change nothing and look as if they did.
            raise ValueError("router 'llumnix': watermark and ties apply to metric=remaining_steps")
        self.headroom = headroom
        self.max_headroom = max_headroom
        self.queue_weight = queue_weight
        self.metric = metric
        self.watermark = watermark
        self.ties = ties
        self._prio = PriorityTracker()
        # The headroom reads the listed high-priority requests its memory does not place (``PriorityTracker.count``):
        # in the simulator only migrated ones, none without a migration policy; headroom 0 reads none at all.
        self.needs_detail_with_migration = headroom > 0  # type: ignore[misc]

    def pick(self, request, candidates, view, *, phase):  # type: ignore[override]
        if self.ties == "first" or phase == "prefill":
            return super().pick(request, candidates, view, phase=phase)
        # Llumnix's sort_instance_infos: sorted by (load, instance_id), candidates in the order it holds them (ours:
        # view order); the loads never compare equal (no __eq__), so the id is never read and only __lt__ counts.
        # Not min(): with this __lt__ min() takes the last tie always, the sort not quite always.
        return sorted(candidates, key=lambda s: _StepsLoad(-self.score(request, s, phase=phase)))[0]  # noqa: FURB192

    def score(self, request: RequestInfo, inst: InstanceSnapshot, *, phase: str) -> float:
        if request.priority >= HIGH_PRIORITY:
            penalty = queue_penalty(request, inst, self.queue_weight)
        else:
            penalty = min(self.headroom * self._prio.count(inst), self.max_headroom)
        if self.metric == "remaining_steps" and phase != "prefill":
            batch = inst.num_running + inst.num_waiting - inst.num_incoming
            if batch <= 0:
                return -math.inf
            free = (inst.kv_blocks_total * (1.0 - penalty) - int(self.watermark * inst.kv_blocks_total)
                    - virtual_blocks_with(inst))
            return -free / batch
        extra = request.prompt_tokens + (1 if phase != "prefill" else 0)
        return virtual_usage_with(inst, extra) + penalty

    def on_routed(self, request: RequestInfo, decision: RouteDecision) -> None:
        self._prio.add(request, decision)

    def on_finished(self, request_id: str, instance_id: str) -> None:
        self._prio.finished(request_id)


# ---- prefix-cache affinity ------------------------------------------------------------------------------------------
class PrefixAffinityRouter(PairingRouter):
    """Prefix-cache affinity, after Mooncake's Conductor (Qin et al., FAST 2025, section 6).

    For each prefill candidate, estimate TTFT as prompt tokens to compute times the instance's prefill pace
    (``pace_of``: seconds per token, by its GPU and TP): ``load_weight`` times the queued prompt tokens the
    instance will compute (``prefill_compute_tokens``: queued prompts less their own cache hits, as the newcomer's)
    plus the newcomer's prompt tokens NOT already cached there (its leading ``hash_ids`` blocks that
    ``cached_blocks`` says are resident), plus a KV-pressure term once virtual usage passes ``kv_soft_limit``.
    Pick the minimum. Reuse wins when it saves more prefill than the extra queue costs; otherwise the request goes
    to a lighter instance (which then caches the prefix too -- Mooncake's hot-prefix replication falls out of that).

    What is cached where: a snapshot that lists its prefix cache (``cached_hash_ids`` not ``None``: the simulator,
    the simulated backend, vLLM from its KV cache events) is believed, so a prefix its engine evicted earns nothing; blocks of requests routed
    there and not finished count too until a listing shows them (queued, they are computed before a newcomer is
    admitted). A snapshot that cannot tell (vLLM with its events off or lost) is read from the router's memory of where it sent each
    block, an LRU per instance bounded by the instance's KV capacity (the most an engine's cache can hold), so old
    sends expire as the engine's would.

    Decode instances (disaggregated) are chosen by virtual usage: the prefix cache matters only for prefill.
    """

    name = "prefix_affinity"

    def __init__(self, *, hash_block_tokens: int = 512, load_weight: float = 1.0, kv_soft_limit: float = 0.9,
                 max_entries: int = 200_000, queue_weight: float = 256.0, **kw: object) -> None:
        super().__init__(**kw)  # type: ignore[arg-type]
        self.hash_block_tokens = hash_block_tokens
        self.load_weight = load_weight
        self.kv_soft_limit = kv_soft_limit
        self.max_entries = max_entries
        self.queue_weight = queue_weight
        # instance -> the blocks sent there, least recently first, for instances whose snapshot lists no cache;
        # bounded by ``_capacity`` (its KV in hash blocks, read from its snapshot).
        self._sent: dict[str, OrderedDict[int, None]] = {}
        self._capacity: dict[str, int] = {}
        # Routed, not finished: request -> (prefill instance, its blocks); instance -> how many of them carry a block.
        self._inflight: OrderedDict[str, tuple[str, frozenset[int]]] = OrderedDict()
        self._inflight_at: dict[str, Counter[int]] = {}
        self._listed: dict[str, frozenset[int]] = {}  # instance -> the listing its in-flight blocks were checked on
        self.config: ClusterConfig | None = None
        self.chunk_tokens = 2048
        self._pace: dict[tuple[str, int], float] = {}

    def initialize(self, config: ClusterConfig) -> None:
        """Bind a cluster config: each instance's prefill pace comes from its (GPU, TP) latency model."""
        self.config = config
        self._pace.clear()
        if config.pools:
            self.chunk_tokens = config.pools[0].engine.max_num_batched_tokens

    def pace_of(self, inst: InstanceSnapshot) -> float:
        """Seconds per prompt token prefilled on ``inst`` (a full chunk's time over its tokens): Conductor's TTFT is
        time, and a token queued on a TP-4 A100 instance drains ~2.5x sooner than on a TP-1 one. 1.0 (token
        units, every instance alike) with no config bound."""
        cfg = self.config
        if cfg is None:
            return 1.0
        key = (inst.gpu, inst.tp)
        pace = self._pace.get(key)
        if pace is None:
            lat = config_latency(cfg, inst.gpu, inst.tp)
            pace = self._pace[key] = lat.prefill_time(self.chunk_tokens) / self.chunk_tokens
        return pace

    def cached_blocks(self, inst: InstanceSnapshot) -> Container[int]:
        """Block ids the router takes as resident on ``inst`` (see the class docstring), in-flight ones aside."""
        cached = inst.cached_hash_ids
        if cached is not None:
            going = self._inflight_at.get(inst.instance_id)
            if going and self._listed.get(inst.instance_id) is not cached:
                # In-flight blocks the listing shows have arrived: from now on it tells whether they are still
                # there (a P/D prefill instance may evict them while their request decodes elsewhere).
                for h in [h for h in going if h in cached]:
                    del going[h]
                self._listed[inst.instance_id] = cached
            return cached
        kv_tokens = inst.kv_blocks_total * inst.block_size
        self._capacity[inst.instance_id] = kv_tokens // max(self.hash_block_tokens, 1)
        return self._sent.get(inst.instance_id, {})

    def matched_blocks(self, request: RequestInfo, inst: InstanceSnapshot) -> int:
        """Leading ``hash_ids`` resident on ``inst`` (``cached_blocks``) or on their way there."""
        n = 0
        cached, going = self.cached_blocks(inst), self._inflight_at.get(inst.instance_id, {})
        for h in request.hash_ids:
            if h in cached or h in going:
                n += 1
            else:
                break
        return n

    def score(self, request: RequestInfo, inst: InstanceSnapshot, *, phase: str) -> float:
        p = request.prompt_tokens
        if phase == "decode":  # (no num_incoming term either: counted, 42.0 -> 39.5% SLO on the tier as P/D)
            return virtual_usage_with(inst, p)
        # A repeat is not free: the engine recomputes the last token (``reused_prompt_tokens``, its rule).
        hit = reused_prompt_tokens(self.matched_blocks(request, inst), p, kv_block=inst.block_size,
                                   block_tokens=self.hash_block_tokens)
        vu = virtual_usage_with(inst, p - hit)
        pressure = p * 10.0 * max(vu - self.kv_soft_limit, 0.0)  # a full instance would evict the prefix anyway
        # The queue in the newcomer's units: tokens to compute. ``prefill_tokens_pending`` counts queued prompts
        # whole (their KV), cached prefixes included, and made a hot instance look loaded by the very hits it serves.
        queued = inst.prefill_compute_tokens
        if queued is None:
            queued = inst.prefill_tokens_pending
        penalty = queue_penalty(request, inst, self.queue_weight)
        return (self.load_weight * queued + (p - hit) + pressure + penalty) * self.pace_of(inst)

    def on_routed(self, request: RequestInfo, decision: RouteDecision) -> None:
        if not request.hash_ids:
            return
        pid = decision.prefill_instance
        self._drop(request.request_id)  # re-routed (a recovery): it is going elsewhere now
        ids = frozenset(request.hash_ids)
        self._inflight[request.request_id] = (pid, ids)
        self._inflight_at.setdefault(pid, Counter()).update(ids)
        self._listed.pop(pid, None)  # check the new ones against the next listing, even an unchanged one
        while len(self._inflight) > self.max_entries:
            self._drop(next(iter(self._inflight)))
        cap = self._capacity.get(pid)
        if cap is None:
            return  # its snapshot lists its cache (or was never read): nothing to remember
        sent = self._sent.setdefault(pid, OrderedDict())
        # The head most recently used: forgotten last, as the engines evict.
        for h in reversed(request.hash_ids):
            sent[h] = None
            sent.move_to_end(h)
        while len(sent) > cap:
            sent.popitem(last=False)

    def on_finished(self, request_id: str, instance_id: str) -> None:
        self._drop(request_id)

    def _drop(self, request_id: str) -> None:
        entry = self._inflight.pop(request_id, None)
        if entry is None:
            return
        pid, ids = entry
        at = self._inflight_at[pid]
        at.subtract(ids)
        for h in ids:
            if at[h] <= 0:
                del at[h]


# ---- Intelligent Router mixing heuristic --------------------------------------------------------------------------------
class MixingRouter(PairingRouter):
    """Workload-mix heuristic of the Intelligent Router (Jain et al. 2024, "Intelligent Router for LLM Workloads:
    Improving Performance Through Workload-Aware Load Balancing", section 4: heuristic-guided reward).

    Mixing a prefill-heavy request into a decode-heavy batch hurts both: its prompt stalls every running decode,
    and the decodes slow its prefill. For request (prompt ``P``, predicted output ``O``) and instance (decode
    batch ``N``, remaining decode tokens ``R``, queued prefill tokens ``Q``)::

        incoming = P * R + O * Q        # penalty on the newcomer: its prefill vs resident decodes,
                                        #   its decodes behind queued prompts
        existing = N * P                # penalty on resident decodes: each stalls for the new prompt
        load     = outstanding requests
        backlog  = Q + P                # prompt tokens ahead of (and including) the newcomer's first token
        queue    = waiting requests, for high-priority requests only (they avoid queues)
        score = alpha * norm(incoming) + (1 - alpha) * norm(existing) + load_weight * norm(load)
                + backlog_weight * norm(backlog) + queue_weight * norm(queue)

    ``norm`` divides by the maximum over the candidates (so terms are comparable, in [0, 1]). ``O`` is the
    predicted output length (``default_output_tokens`` when unknown); ``R`` is the instance's predicted remaining
    tokens, else ``N * default_output_tokens``. The request is classed prefill-heavy when ``P >= heavy_ratio * O``
    (recorded in the decision's reason); the penalty terms weigh the two classes differently by construction.
    """

    name = "mixing"

    def __init__(self, *, alpha: float = 0.5, load_weight: float = 0.3, backlog_weight: float = 1.0,
                 default_output_tokens: float = 256.0, heavy_ratio: float = 1.0, queue_weight: float = 1.0,
                 **kw: object) -> None:
        super().__init__(**kw)  # type: ignore[arg-type]
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha: {alpha} is outside [0, 1]")
        self.alpha = alpha
        self.load_weight = load_weight
        self.backlog_weight = backlog_weight
        self.default_output_tokens = default_output_tokens
        self.heavy_ratio = heavy_ratio
        self.queue_weight = queue_weight

    def output_of(self, request: RequestInfo) -> float:
        o = request.predicted_output_tokens
        return float(o) if o is not None and o > 0 else self.default_output_tokens

    def classify(self, request: RequestInfo) -> str:
        return "prefill-heavy" if request.prompt_tokens >= self.heavy_ratio * self.output_of(request) else (
            "decode-heavy")

    def terms(self, request: RequestInfo, inst: InstanceSnapshot, phase: str) -> tuple[float, ...]:
        p, o = float(request.prompt_tokens), self.output_of(request)
        if phase == "decode":
            p = 1.0  # the prompt ran elsewhere: only a one-token step joins this batch
        n = inst.num_decoding
        r = inst.decode_tokens_left(self.default_output_tokens)
        q = float(inst.prefill_tokens_pending)
        if phase == "prefill":
            o = 0.0  # a PREFILL instance never decodes it
        incoming = p * r + o * q
        existing = n * p
        load = float(inst.num_running + inst.num_waiting)
        backlog = q + p if phase != "decode" else 0.0
        return incoming, existing, load, backlog, queue_penalty(request, inst, 1.0)

    def pick(self, request, candidates, view, *, phase):  # type: ignore[override]
        terms = [self.terms(request, c, phase) for c in candidates]
        mx = [max(t[k] for t in terms) or 1.0 for k in range(5)]
        a = self.alpha

        def score(t: tuple[float, ...]) -> float:
            return (a * t[0] / mx[0] + (1 - a) * t[1] / mx[1] + self.load_weight * t[2] / mx[2]
                    + self.backlog_weight * t[3] / mx[3] + self.queue_weight * t[4] / mx[4])

        best = min(range(len(candidates)), key=lambda k: score(terms[k]))
        return candidates[best]

    def score(self, request: RequestInfo, inst: InstanceSnapshot, *, phase: str) -> float:
        # Unnormalised single-instance score (used by ``pair`` for the colocation check).
        i, e, l, b, q = self.terms(request, inst, phase)
        return (self.alpha * i + (1 - self.alpha) * e + self.load_weight * l + self.backlog_weight * b
                + self.queue_weight * q)

    def route(self, request: RequestInfo, view: ClusterView) -> RouteResult:
        d = super().route(request, view)
        if isinstance(d, Rejected):
            return d
        return RouteDecision(d.prefill_instance, d.decode_instance, f"{d.reason}; {self.classify(request)}")


for _cls in (PowerOfTwoRouter, LlumnixRouter, PrefixAffinityRouter, MixingRouter, LookaheadRouter,
             SheddingLookaheadRouter, LearnedRouter, ShedRouter):
    register_router(_cls)
