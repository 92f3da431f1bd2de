"""A vLLM-like iteration scheduler with paged KV accounting, timed by the latency model.

One ``EngineModel`` is one instance. It is driven two ways:

* ``step()`` -- one engine iteration, exactly as the live simulated backend and the naive reference need;
* ``plan_span()`` / ``advance()`` -- the simulator's fast path: while the batch composition cannot change
  (only decodes running, nothing admittable, no KV exhaustion, no completion) the next ``k`` steps are
  identical up to the growing context, and their total time is a closed-form arithmetic series because the
  decode step time is affine in the summed context (``LatencyModel.decode_coeffs``).

Both paths make the same decisions; ``tests/test_engine_model.py`` checks them against each other.

Semantics (documented choices where vLLM has knobs):

* Running requests are served first (decodes 1 token, partial prefills a chunk from the token budget
  ``max_num_batched_tokens``); waiting requests are admitted FCFS while budget, ``max_num_seqs`` and KV allow.
* Admission reserves KV blocks for the request's whole current context (prompt + tokens to recompute), so a
  chunked prefill never stalls half-way; decodes allocate a block each time their KV crosses a block boundary.
* When a step's decodes cannot get their blocks, the least important, most recently admitted request is
  preempted by recompute (KV dropped, re-queued at the front), as vLLM v1 does; no admission in that step.
* Priority: larger ``priority`` is more important.
* Prefix cache (``EngineSpec.enable_prefix_caching``, as vLLM's automatic prefix caching): a request may carry
  ``hash_ids``, one id per ``hash_block_tokens`` of its prompt (Mooncake's trace format). When it is admitted,
  its leading ids found in the instance's cache count as already computed, in whole KV blocks and at most
  ``prompt - 1`` tokens (as vLLM: the last block is recomputed to sample the first token), so only the rest is
  prefilled. Ids enter the cache as the chunk that fills them is scheduled (vLLM caches a block when it allocates
  it: a prompt admitted later in the same step hits it), and those of KV that arrived with the request (a P->D
  decode leg, a migration) as it is admitted (vLLM caches what its KV connector loaded). The cache is an LRU of
  ids bounded by the instance's KV capacity in tokens; a prompt's ids are touched last-to-first, so its tail is
  evicted before its head (vLLM frees a request's blocks in reverse). A request preempted while decoding has its
  whole context cached, its generated tokens' blocks under ids of its own, as vLLM caches every full block of a
  request: its recompute hits them (``_cache_context``). NOTE: admission still reserves KV for the
  whole context (no block sharing between concurrent requests): cached blocks save compute, not memory --
  conservative on memory; and cached ids do not give way to running requests' KV (vLLM's do: they are its free
  blocks), so under KV pressure hits are optimistic.

Per-request bookkeeping of decoding requests is lazy: a request stores the step counter and its counts when it
joined the decode set, so advancing ``k`` steps is O(1) regardless of batch size.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import math
from collections import OrderedDict, deque
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from scheduler.config.models import EngineSpec
from scheduler.core.prefix import reused_prompt_tokens
from scheduler.core.types import InstanceRole, InstanceSnapshot, RequestLoad
from scheduler.latency.model import LatencyModel, prefill_pairs
from scheduler.predict.base import LengthPrediction, remaining_tokens


class Seq:
    """One request inside an engine. Decode-set members read their counts through ``EngineModel``."""

    __slots__ = (
        "admit_no",
        "blocks",
        "dist_base",
        "done",
        "finish_step",
        "generated",
        "handoff",
        "hash_block_tokens",
        "hash_ids",
        "in_decode",
        "join_step",
        "length_dist",
        "load",
        "max_new",
        "num_computed",
        "num_tokens",
        "pred_due",
        "predicted_remaining",
        "priority",
        "rid",
        "tag",
    )

    def __init__(self, rid: str, num_tokens: int, num_computed: int, max_new: int, priority: int) -> None:
        self.rid = rid
        self.priority = priority
        self.admit_no = 0
        self.num_tokens = num_tokens  # context length: prompt + tokens generated so far
        self.num_computed = num_computed  # tokens whose KV is in this engine
        self.max_new = max_new  # tokens to generate on this engine
        self.generated = 0
        self.join_step = 0
        self.finish_step = 0
        self.blocks = 0  # blocks held (prefilling requests only; decode members are counted lazily)
        self.in_decode = False
        self.done = False
        self.predicted_remaining: float | None = None
        self.pred_due: float | None = None  # decode step at which its prediction runs out, while in the sum
        # The predictor's distribution, to renew a guess that ran out (``LengthPrediction.expected_remaining``), and
        # the tokens generated before this engine (a P->D handoff's first, a migrated request's) it counts from.
        self.length_dist: LengthPrediction | None = None
        self.dist_base = 0
        self.tag: object = None  # free slot for the driver (the simulator keeps its request index here)
        self.hash_ids: tuple[int, ...] = ()  # prompt block ids for the prefix cache
        self.hash_block_tokens = 0
        self.handoff = False  # prefill only, then hand the KV to another instance
        # Its entry in a detailed snapshot while queued (prefilling or waiting), built at the first read: what it
        # shows is fixed there. Cleared when it re-enters the queue by preemption, the one way back after its
        # counts moved (a prefill completed, decode steps, a migration's ``detach``: all outside the queue).
        self.load: RequestLoad | None = None


def _remaining(seq: Seq, generated: int) -> float | None:
    """``seq``'s predicted remaining output once ``generated`` tokens are out here (``None``: no guess); a guess
    that ran out is renewed from its distribution where it has one, as the live instance's snapshot does."""
    if seq.predicted_remaining is None:
        return None
    return remaining_tokens(seq.predicted_remaining - generated, seq.length_dist, seq.dist_base + generated)


def _queued_load(seq: Seq) -> RequestLoad:
    """``seq``'s entry in a detailed snapshot while it is queued (kept on it: ``Seq.load``)."""
    seq.load = RequestLoad(seq.rid, seq.num_tokens, seq.generated, _remaining(seq, seq.generated), seq.priority, True)
    return seq.load


@dataclass(slots=True)
class StepResult:
    """What one engine iteration did. ``duration_s`` is the modelled time of the step."""

    duration_s: float = 0.0
    first_token: list[Seq] = field(default_factory=list)  # emitted their first token on this engine
    finished: list[Seq] = field(default_factory=list)  # emitted their last token
    prefill_done: list[Seq] = field(default_factory=list)  # prefilled to hand off (KV freed here): see ``handoff``
    preempted: list[Seq] = field(default_factory=list)
    admitted: list[Seq] = field(default_factory=list)  # left the waiting queue this step
    decoded: int = 0  # decode tokens produced (excluding first tokens)
    emitted: list[str] | None = None  # rids with a new token this step (only when asked: O(batch))
    # The step's composition, for a driver that executes it on a real engine (``bench/bench_gpu_replay.py``):
    # (context before, chunk length) of each prompt chunk (only when ``want_emitted``), decodes and their context.
    chunks: list[tuple[int, int]] | None = None
    decode_batch: int = 0
    decode_context: int = 0


@dataclass(frozen=True, slots=True)
class Span:
    """``steps`` identical-composition decode steps starting now, taking ``duration_s`` in total."""

    steps: int
    duration_s: float
    a: float  # per-step constant (s)
    b: float  # seconds per context token
    d0: int  # summed decode context of the first step
    batch: int

    def time_of(self, j: int) -> float:
        """Time from span start to the end of step ``j`` (1-based)."""
        return j * self.a + self.b * (j * self.d0 + self.batch * j * (j - 1) / 2)

    def steps_done_by(self, dt: float) -> int:
        """Smallest ``j >= 1`` whose end is at or after ``dt`` (the step in flight at ``dt`` completes)."""
        if dt <= 0:
            return 1
        qa, qb = self.b * self.batch / 2, self.a + self.b * self.d0 - self.b * self.batch / 2
        # math, not numpy, on these Python floats: the same IEEE results at a fraction of the call cost (a poll
        # round asks this of every instance mid-span); the loops below make ``j`` exact either way.
        if qa > 0:
            j = math.ceil((-qb + math.sqrt(qb * qb + 4 * qa * dt)) / (2 * qa))
        else:
            j = math.ceil(dt / qb)
        j = min(max(j, 1), self.steps)
        while j < self.steps and self.time_of(j) < dt:
            j += 1
        while j > 1 and self.time_of(j - 1) >= dt:
            j -= 1
        return j


class EngineModel:
    """Continuous batching + chunked prefill + paged KV + preemption, for one instance."""

    def __init__(
        self,
        latency: LatencyModel,
        spec: EngineSpec,
        *,
        role: InstanceRole = InstanceRole.MIXED,
        num_blocks: int | None = None,
    ) -> None:
        self.latency = latency
        self.spec = spec
        self.role = role
        self.block_size = spec.block_size
        if num_blocks is None:
            num_blocks = spec.num_kv_blocks or latency.kv_blocks(
                spec.block_size,
                gpu_memory_utilization=spec.gpu_memory_utilization,
                activation_reserve_gib=spec.activation_reserve_gib,
            )
        if num_blocks <= 0:
            raise ValueError(f"num_blocks: the model does not fit: {num_blocks} KV blocks left after weights")
        self.total_blocks = num_blocks
        self.waiting: deque[Seq] = deque()
        self.prefilling: list[Seq] = []  # admitted, still computing their context
        self.decoding: dict[str, Seq] = {}
        self._finish_heap: list[tuple[int, int, Seq]] = []
        self._by_rid: dict[str, Seq] = {}
        self._admit_counter = itertools.count(1)
        self._heap_tie = itertools.count()
        self.step_no = 0  # decode step counter (advances once per iteration that has decodes)
        self._n_sum = 0  # sum of num_computed over the decode set, at ``step_no``
        self._n_guessed = 0  # members of the decode set with a length guess (``InstanceSnapshot.num_predicted``)
        self.prefill_blocks = 0  # blocks held by ``prefilling``
        # Predicted remaining output of the decode set in O(1): sum of (prediction - generated + join_step) over
        # members with a prediction, minus ``step_no`` per member (each decode step generates one token each).
        # Members leave the sum when their prediction runs out (``_due_heap``), as a live instance clips each
        # request at 0: one past its guess no longer cancels the others' remaining.
        self._pred_sum = 0.0
        self._pred_n = 0
        self._due_heap: list[tuple[float, int, Seq]] = []
        # Bumped by every change a snapshot can show that the engine makes itself (requests in and out, steps and
        # span advances, predictions dropped or renewed -- by a snapshot too, which drops spent ones for good, inside
        # ``ahead`` as well): a driver keeps its snapshot while this stands (``SimInstance.make_snapshot``). Not by
        # writes from outside (``prefill_blocks``, ``role``): the driver keys on those itself.
        self.version = 0
        # The detailed snapshot's entries of ``prefilling`` and ``waiting`` (``snapshot(detail=True)``), kept until
        # either list changes: what they show of a queued request (context, generated, guess, priority) is fixed
        # while it is queued, and a step changes the queue only when it admits, completes a prefill or preempts. An
        # overloaded instance lists ~100 queued requests: rebuilding them on every read was most of a migration
        # run's time (the policy reads every instance each 0.5 s tick). None: rebuild at the next read.
        self._queue_loads: tuple[RequestLoad, ...] | None = None
        self._waiting_tokens: int | None = None  # summed contexts of ``waiting`` (the same rule)
        # Counters (a live engine reports the same ones).
        self.num_preemptions = 0
        self.prompt_tokens_computed = 0
        self.prompt_tokens_loaded = 0
        self.busy_time_s = 0.0
        self.steps_run = 0
        self._coeffs: dict[int, tuple[float, float]] = {}  # decode_coeffs by batch size (hot in the simulator)
        # Step-time multiplier set by the driver (host contention between co-located engines; 1 = alone).
        self.time_scale = 1.0
        # Prefix cache: hash id -> tokens it covers, least recently used first (None: caching disabled).
        self.prefix_cache: OrderedDict[int, int] | None = (
            OrderedDict() if getattr(spec, "enable_prefix_caching", False) else None
        )
        self._prefix_tokens = 0
        # The snapshot's frozen copy of the cache's ids, rebuilt only after an insert or an eviction (a snapshot per
        # routing decision and instance copied thousands of ids: 29% of a Mooncake run's time). Rebuilt from
        # ``_cached_id_set``, the cache's keys kept as a set: frozenset() copies a set's hash table whole, ~3x
        # faster than hashing the OrderedDict's keys one by one (ids enter per scheduled chunk: a rebuild per step).
        self._cached_ids: frozenset[int] | None = None
        self._cached_id_set: set[int] = set()
        self.prefix_capacity_tokens = num_blocks * spec.block_size
        self.prefix_hit_tokens = 0
        self._own_ids = itertools.count(-1, -1)  # ids of preempted requests' generated blocks (``_cache_context``)
        # Batch token counts whose GEMM kernels the engine has built, least recently used first (the vLLM CPU
        # build's oneDNN primitive cache); None: the latency model has no such cost.
        self._shapes: OrderedDict[int, None] | None = OrderedDict() if latency.shape_cache_size > 0 else None
        self.new_shapes = 0

    # ---- requests in/out ------------------------------------------------------------------------------
    def add_request(
        self,
        rid: str,
        prompt_tokens: int,
        max_tokens: int,
        *,
        cached_tokens: int = 0,
        priority: int = 0,
        predicted_remaining: float | None = None,
        length_dist: LengthPrediction | None = None,
        generated_before: int = 0,
        hash_ids: tuple[int, ...] = (),
        hash_block_tokens: int = 512,
        handoff: bool | None = None,
        front: bool = False,
    ) -> Seq:
        """Queue a request whose context is ``prompt_tokens`` long, ``cached_tokens`` of it already in KV here
        (loaded by a P->D transfer or a migration), with ``max_tokens`` still to generate. ``hash_ids``: one id
        per ``hash_block_tokens`` prompt tokens, for the prefix cache (ignored when it is disabled). ``handoff``:
        prefill only and report it in ``prefill_done`` to decode elsewhere -- by default on a PREFILL instance only;
        the simulator says so on a MIXED one the router paired with another decoder, and not on a PREFILL one named
        to decode too (the Splitwise borrow) or given a decode leg. ``front``: ahead of the queue (a migrated request
        whose KV blocks were reserved for it). ``length_dist``: the distribution ``predicted_remaining`` came from
        (renews it when it runs out), ``generated_before`` tokens into the response."""
        self.check_request(rid, prompt_tokens, max_tokens, cached_tokens)
        self.version += 1
        if handoff is None:
            handoff = self.role is InstanceRole.PREFILL
        if handoff:
            max_tokens = 1  # only the first token here, then the KV goes to the decoder
        seq = Seq(rid, prompt_tokens, cached_tokens, max_tokens, priority)
        seq.handoff = handoff
        seq.predicted_remaining = predicted_remaining
        if predicted_remaining is not None:
            seq.length_dist, seq.dist_base = length_dist, generated_before
        if self.prefix_cache is not None and hash_ids:
            if hash_block_tokens < 1:
                raise ValueError(f"hash_block_tokens: must be >= 1, got {hash_block_tokens}")
            seq.hash_ids = tuple(hash_ids)
            seq.hash_block_tokens = hash_block_tokens
        self._by_rid[rid] = seq
        if front:
            self.waiting.appendleft(seq)
        else:
            self.waiting.append(seq)
        self._queue_changed()
        return seq

    def _queue_changed(self) -> None:
        """``prefilling`` or ``waiting`` changed: a snapshot reads them again (``_queue_loads``)."""
        self._queue_loads = None
        self._waiting_tokens = None

    def check_request(self, rid: str, prompt_tokens: int, max_tokens: int, cached_tokens: int = 0) -> None:
        """Raise ``ValueError`` if ``add_request`` would refuse this request (a caller that admits it later checks
        now: the simulated backend while a P->D request's KV is on its way)."""
        if rid in self._by_rid:
            raise ValueError(f"request_id: {rid!r} is already on this engine")
        if prompt_tokens < 1:
            raise ValueError(f"prompt_tokens: must be >= 1, got {prompt_tokens}")
        if max_tokens < 1:
            raise ValueError(f"max_tokens: must be >= 1, got {max_tokens}")
        if not 0 <= cached_tokens <= prompt_tokens:
            raise ValueError(f"cached_tokens: must be in [0, prompt_tokens={prompt_tokens}], got {cached_tokens}")
        need = -(-(prompt_tokens + max_tokens) // self.block_size)
        if need > self.total_blocks:
            raise ValueError(
                f"prompt_tokens+max_tokens: {prompt_tokens + max_tokens} tokens need {need} KV blocks, "
                f"the engine has {self.total_blocks}"
            )

    def abort(self, rid: str) -> bool:
        seq = self._by_rid.pop(rid, None)
        if seq is None:
            return False
        self.version += 1
        if seq.in_decode:
            self._leave_decode(seq)
        elif seq in self.prefilling:
            self.prefilling.remove(seq)
            self.prefill_blocks -= seq.blocks
            seq.blocks = 0
            self._queue_changed()
        else:
            self.waiting.remove(seq)
            self._queue_changed()
        seq.done = True
        return True

    def detach(self, rid: str) -> Seq | None:
        """Take a *decoding* request out for migration (the stop-and-copy point), counts materialised.

        Returns ``None`` (and changes nothing) if the request is not decoding here: only requests with a full KV
        cache move; queued or prefilling ones are cheaper to re-route.
        """
        seq = self._by_rid.get(rid)
        if seq is None or not seq.in_decode:
            return None
        self.version += 1
        self._leave_decode(seq)
        del self._by_rid[rid]
        seq.max_new -= seq.generated
        if seq.predicted_remaining is not None:  # it counts from the new baseline too
            seq.predicted_remaining = max(seq.predicted_remaining - seq.generated, 0.0)
        seq.dist_base += seq.generated
        seq.generated = 0
        return seq

    def get(self, rid: str) -> Seq | None:
        return self._by_rid.get(rid)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.prefilling or self.decoding)

    @property
    def num_running(self) -> int:
        return len(self.prefilling) + len(self.decoding)

    @property
    def num_requests(self) -> int:
        return len(self._by_rid)

    # ---- lazy decode-set bookkeeping -------------------------------------------------------------------
    def computed_of(self, seq: Seq) -> int:
        """``num_computed`` of ``seq`` now (decode members advance implicitly with ``step_no``)."""
        if seq.in_decode:
            return seq.num_computed + (self.step_no - seq.join_step)
        return seq.num_computed

    def generated_of(self, seq: Seq) -> int:
        if seq.in_decode:
            return seq.generated + (self.step_no - seq.join_step)
        return seq.generated

    def _join_decode(self, seq: Seq) -> None:
        seq.in_decode = True
        seq.join_step = self.step_no
        seq.finish_step = self.step_no + (seq.max_new - seq.generated)
        self.decoding[seq.rid] = seq
        self._n_sum += seq.num_computed
        if seq.predicted_remaining is not None:
            self._n_guessed += 1
            due = seq.predicted_remaining - seq.generated + seq.join_step
            if due <= self.step_no and seq.length_dist is not None:  # ran out before it got here: renewed
                due = self._renewed_due(seq, due)
            if due > self.step_no:
                self._track_prediction(seq, due)
        heapq.heappush(self._finish_heap, (seq.finish_step, next(self._heap_tie), seq))

    def _leave_decode(self, seq: Seq) -> None:
        """Materialise the lazy counts and drop ``seq`` from the decode set (its heap entry goes stale)."""
        k = self.step_no - seq.join_step
        self._n_sum -= seq.num_computed + k
        self._n_guessed -= seq.predicted_remaining is not None
        self._drop_prediction(seq)
        seq.num_computed += k
        seq.generated += k
        seq.num_tokens += k
        seq.in_decode = False
        del self.decoding[seq.rid]

    def _decode_blocks_needed(self, extra_steps: int) -> int:
        """Blocks the decode set holds after computing ``extra_steps + 1`` more tokens each (exact)."""
        if not self.decoding:
            return 0
        return int(np.sum(-(-(self._decode_computed() + extra_steps + 1) // self.block_size)))

    def _decode_computed(self) -> np.ndarray:
        """``num_computed`` of every decode-set member now (O(batch): only near KV exhaustion and for snapshots)."""
        return np.fromiter(
            (s.num_computed + self.step_no - s.join_step for s in self.decoding.values()),
            dtype=np.int64,
            count=len(self.decoding),
        )

    def _decode_blocks_upper(self, extra_steps: int) -> float:
        bs = len(self.decoding)
        return (self._n_sum + bs * (extra_steps + 1)) / self.block_size + bs

    def _decode_fits(self, extra_steps: int, budget_blocks: int) -> bool:
        if self._decode_blocks_upper(extra_steps) <= budget_blocks:
            return True
        return self._decode_blocks_needed(extra_steps) <= budget_blocks

    def decode_batch_context(self) -> tuple[int, int]:
        """(requests decoding, their summed context) as of the last step boundary."""
        bs = len(self.decoding)
        return bs, self._n_sum + bs

    def blocks_used(self) -> int:
        """Exact blocks held now (O(batch); for snapshots and invariant checks)."""
        held = self.prefill_blocks
        if self.decoding:
            held += int(np.sum(-(-self._decode_computed() // self.block_size)))
        return held

    # ---- one iteration ----------------------------------------------------------------------------------
    def step(self, *, want_emitted: bool = False) -> StepResult:
        """Run one engine iteration: schedule, account KV, advance tokens. Returns what happened."""
        res = StepResult()
        self.version += 1
        B = self.block_size
        # 1. Decodes need blocks for the token each computes now; preempt until they fit.
        while self.decoding and not self._decode_fits(0, self.total_blocks - self.prefill_blocks):
            res.preempted.append(self._preempt_one())
        budget = self.spec.max_num_batched_tokens - len(self.decoding)
        # 2. Partial prefills continue (FCFS), then admit waiting requests if nothing was preempted.
        chunks: list[tuple[Seq, int]] = []
        for seq in self.prefilling:
            if budget <= 0:
                break
            c = self._chunk(seq, budget)
            chunks.append((seq, c))
            budget -= c
            self._prefix_insert(seq, seq.num_computed + c)
        if not res.preempted:
            decode_blocks = None
            while self.waiting and budget > 0 and self.num_running < self.spec.max_num_seqs:
                head = self.waiting[0]
                if self._waits_unchunked(head, budget):
                    break
                need = -(-head.num_tokens // B)
                free_lb = self.total_blocks - self.prefill_blocks - self._decode_blocks_upper(0)
                if need > free_lb:
                    if decode_blocks is None:
                        decode_blocks = self._decode_blocks_needed(0)
                    if need > self.total_blocks - self.prefill_blocks - decode_blocks:
                        break
                self.waiting.popleft()
                self._queue_changed()
                res.admitted.append(head)
                head.admit_no = next(self._admit_counter)
                head.blocks = need
                self.prefill_blocks += need
                self.prompt_tokens_loaded += head.num_computed
                if head.num_computed and head.num_tokens - head.num_computed == 1:
                    # Its whole context is cached (P->D or migration): a plain decode from now on. vLLM caches the
                    # blocks its connector loaded as its own (``allocate_slots``): a later prompt sharing them hits.
                    self._prefix_insert(head, head.num_tokens)
                    self.prefill_blocks -= need
                    head.blocks = 0
                    self._join_decode(head)
                    budget -= 1
                    continue
                if head.hash_ids and not head.num_computed:
                    self._prefix_hit(head)
                self.prefilling.append(head)
                c = self._chunk(head, budget)
                chunks.append((head, c))
                budget -= c
                self._prefix_insert(head, head.num_computed + c)
        bs = len(self.decoding)
        if not chunks and not bs:
            return res
        # 3. Time the step, then fold it back.
        p_tokens = sum(c for _, c in chunks)
        p_pairs = sum(prefill_pairs(c, s.num_computed) for s, c in chunks)
        res.duration_s = (self.latency.step_time(
            prefill_tokens=p_tokens, prefill_pairs=p_pairs, decode_batch=bs, decode_context=self._n_sum + bs,
            prefill_seqs=len(chunks),
        ) + self._shape_cost(p_tokens + bs)) * self.time_scale
        res.decode_batch, res.decode_context = bs, self._n_sum + bs
        if want_emitted:
            res.emitted = list(self.decoding)
            res.chunks = [(s.num_computed, c) for s, c in chunks]
        self._advance_decodes(1, res)
        for seq, c in chunks:
            seq.num_computed += c
            self.prompt_tokens_computed += c
            if seq.num_computed == seq.num_tokens:
                self._prefill_complete(seq, res)
                if want_emitted:
                    res.emitted.append(seq.rid)  # type: ignore[union-attr]
        self.busy_time_s += res.duration_s
        self.steps_run += 1
        return res

    def _shape_cost(self, tokens: int) -> float:
        """The kernel-build cost of a step of ``tokens`` batch tokens: 0 when cached (marked recently used)."""
        shapes = self._shapes
        if shapes is None:
            return 0.0
        if tokens in shapes:
            shapes.move_to_end(tokens)
            return 0.0
        shapes[tokens] = None
        if len(shapes) > self.latency.shape_cache_size:
            shapes.popitem(last=False)
        self.new_shapes += 1
        return self.latency.new_shape_time(tokens)

    def _chunk(self, seq: Seq, budget: int) -> int:
        left = seq.num_tokens - seq.num_computed
        return min(left, budget) if self.spec.enable_chunked_prefill else left

    def _waits_unchunked(self, seq: Seq, budget: int) -> bool:
        """Chunked prefill off: ``seq`` waits for a step with room for all it computes, as in vLLM. One over the
        whole budget (a config vLLM refuses) runs in a step of its own rather than never."""
        if self.spec.enable_chunked_prefill or budget >= self.spec.max_num_batched_tokens:
            return False
        return seq.num_tokens - (seq.num_computed or self.cache_hit_tokens(seq)) > budget

    # ---- prefix cache -------------------------------------------------------------------------------------
    def _prefix_hit(self, seq: Seq) -> None:
        """At admission: the leading cached blocks of ``seq``'s prompt count as computed (and are touched)."""
        cache = self.prefix_cache
        assert cache is not None
        n = self.cached_prefix_blocks(seq.hash_ids)
        for h in reversed(seq.hash_ids[:n]):  # the head most recently used: evicted last
            cache.move_to_end(h)
        hit = self._hit_tokens(seq, n)
        if hit:
            seq.num_computed = hit
            self.prefix_hit_tokens += hit
            self.prompt_tokens_loaded += hit

    def _prefix_insert(self, seq: Seq, computed: int) -> None:
        """A chunk of ``seq`` up to ``computed`` tokens is scheduled: the ids it fills (all of them at the context's
        end) are cached here, last to first; evict least recently used past capacity."""
        cache = self.prefix_cache
        if cache is None or not seq.hash_ids:
            return
        hbt = seq.hash_block_tokens
        ids = seq.hash_ids if computed >= seq.num_tokens else seq.hash_ids[: computed // hbt]
        for k in range(len(ids) - 1, -1, -1):
            h = ids[k]
            if h in cache:
                cache.move_to_end(h)
            else:
                # The KV the id's tokens hold: a prompt's last id covers what is left of it (a partial block
                # charged whole held ~4% fewer Mooncake prefixes than the KV fits; vLLM charges its blocks).
                tokens = max(min(hbt, seq.num_tokens - k * hbt), 1)
                cache[h] = tokens
                self._cached_id_set.add(h)
                self._prefix_tokens += tokens
                self._cached_ids = None
        while self._prefix_tokens > self.prefix_capacity_tokens and cache:
            h, tokens = cache.popitem(last=False)
            self._cached_id_set.remove(h)
            self._prefix_tokens -= tokens
            self._cached_ids = None

    def _cached_hash_ids(self) -> frozenset[int]:
        if not self.prefix_cache:
            return frozenset()
        if self._cached_ids is None:
            self._cached_ids = frozenset(self._cached_id_set)
        return self._cached_ids

    def _waiting_not_computed(self) -> int:
        """Tokens of the waiting requests' contexts their admission will not compute: the KV they brought (a P->D
        decode leg, a migration), else what the prefix cache holds now (as ``_prefix_hit`` will count it, unless the
        cache changes before then)."""
        return sum(s.num_computed or self.cache_hit_tokens(s) for s in self.waiting)

    def cache_hit_tokens(self, seq: Seq) -> int:
        """Prompt tokens of ``seq`` this instance's prefix cache would spare it if admitted now."""
        return self._hit_tokens(seq, self.cached_prefix_blocks(seq.hash_ids)) if seq.hash_ids else 0

    def _hit_tokens(self, seq: Seq, n: int) -> int:
        """Prompt tokens ``n`` leading cached ids spare ``seq``: the whole KV blocks they cover, short of the last
        token, which is recomputed."""
        return reused_prompt_tokens(n, seq.num_tokens, kv_block=self.block_size, block_tokens=seq.hash_block_tokens)

    def cached_prefix_blocks(self, hash_ids: tuple[int, ...]) -> int:
        """How many leading ``hash_ids`` are in this instance's prefix cache now (0 when caching is off)."""
        cache = self.prefix_cache
        if not cache:
            return 0
        n = 0
        for h in hash_ids:
            if h not in cache:
                break
            n += 1
        return n

    def _prefill_complete(self, seq: Seq, res: StepResult) -> None:
        """The context is computed: sample the first token on this engine."""
        self.prefilling.remove(seq)
        self._queue_changed()
        seq.generated += 1
        seq.num_tokens += 1
        res.first_token.append(seq)
        if seq.handoff or seq.generated >= seq.max_new:
            self.prefill_blocks -= seq.blocks
            seq.blocks = 0
            del self._by_rid[seq.rid]
            seq.done = True
            (res.prefill_done if seq.handoff else res.finished).append(seq)
            return
        self.prefill_blocks -= seq.blocks
        seq.blocks = 0
        self._join_decode(seq)

    def _advance_decodes(self, k: int, res: StepResult) -> None:
        bs = len(self.decoding)
        if not bs:
            return
        self.step_no += k
        self._n_sum += bs * k
        res.decoded += bs * k
        heap = self._finish_heap
        while heap and heap[0][0] <= self.step_no:
            _, _, seq = heapq.heappop(heap)
            if not seq.in_decode or seq.finish_step > self.step_no:
                continue  # stale entry (preempted or aborted)
            self._leave_decode(seq)
            del self._by_rid[seq.rid]
            seq.done = True
            res.finished.append(seq)

    def _preempt_one(self) -> Seq:
        """Recompute-preemption of the least important, most recently admitted running request."""
        pool = list(self.decoding.values()) + self.prefilling
        victim = min(pool, key=lambda s: (s.priority, -s.admit_no))
        if victim.in_decode:
            self._leave_decode(victim)
            self._cache_context(victim)
        else:  # (its scheduled chunks' ids are in the cache already)
            self.prefilling.remove(victim)
            self.prefill_blocks -= victim.blocks
        victim.blocks = 0
        victim.load = None  # its context and generated count moved while it decoded
        victim.num_computed = 0  # KV dropped: prompt and generated tokens are recomputed (less the cache's hits)
        self.waiting.appendleft(victim)
        self._queue_changed()
        self.num_preemptions += 1
        return victim

    def _cache_context(self, seq: Seq) -> None:
        """A decoding request is preempted. vLLM caches a request's full blocks as they fill, its generated tokens'
        too, and keeps them cached once freed: the recompute hits all of them not evicted meanwhile. The ids cover a
        prompt only, so the rest of the context gets ids of this request's own (its tokens are nobody else's;
        negative: a trace's are not), and the whole context is cached now, as its blocks are freed."""
        if self.prefix_cache is None:
            return
        if not seq.hash_ids:  # a prompt without ids (nothing to share) still hits its own blocks
            seq.hash_block_tokens = self.block_size
        n = -(-seq.num_tokens // seq.hash_block_tokens)
        if n > len(seq.hash_ids):
            seq.hash_ids += tuple(next(self._own_ids) for _ in range(n - len(seq.hash_ids)))
        self._prefix_insert(seq, seq.num_tokens)

    # ---- the closed-form fast path ------------------------------------------------------------------------
    def plan_span(self, max_steps: int | None = None) -> Span | None:
        """The identical-composition decode steps from now, or ``None`` when the next step is not one."""
        bs = len(self.decoding)
        if not bs or self.prefilling:
            return None
        if self.waiting and self._admittable_now():
            return None
        if self._shapes is not None:
            if bs not in self._shapes:
                return None  # its first step builds the kernels: ``step`` charges that
            self._shapes.move_to_end(bs)
        k = self._finish_heap_min() - self.step_no
        if max_steps is not None:
            k = min(k, max_steps)
        budget = self.total_blocks - self.prefill_blocks
        if not self._decode_fits(k - 1, budget):
            lo, hi = 0, k - 1  # first infeasible step index lies in (lo-1, hi]
            if not self._decode_fits(0, budget):
                return None
            lo = 0
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if self._decode_fits(mid, budget):
                    lo = mid
                else:
                    hi = mid
            k = hi  # steps 0..hi-1 fit
        if k <= 0:
            return None
        coeffs = self._coeffs.get(bs)
        if coeffs is None:
            coeffs = self._coeffs[bs] = self.latency.decode_coeffs(bs)
        a, b = coeffs
        if self.time_scale != 1.0:
            a, b = a * self.time_scale, b * self.time_scale
        d0 = self._n_sum + bs
        span = Span(k, 0.0, a, b, d0, bs)
        return Span(k, span.time_of(k), a, b, d0, bs)

    def _finish_heap_min(self) -> int:
        heap = self._finish_heap
        while heap and (not heap[0][2].in_decode or heap[0][2].finish_step != heap[0][0]):
            heapq.heappop(heap)
        return heap[0][0]

    def _admittable_now(self) -> bool:
        budget = self.spec.max_num_batched_tokens - len(self.decoding)
        if self.num_running >= self.spec.max_num_seqs or budget <= 0 or self._waits_unchunked(self.waiting[0], budget):
            return False
        need = -(-self.waiting[0].num_tokens // self.block_size)
        free = self.total_blocks - self.prefill_blocks
        if need <= free - self._decode_blocks_upper(0):
            return True
        return need <= free - self._decode_blocks_needed(0)

    def advance(self, span: Span, steps: int) -> StepResult:
        """Apply the first ``steps`` steps of ``span`` (all of it, or up to an interruption)."""
        res = StepResult()
        self.version += 1
        res.duration_s = span.time_of(steps)
        self._advance_decodes(steps, res)
        self.busy_time_s += res.duration_s
        self.steps_run += steps
        return res

    def _track_prediction(self, seq: Seq, due: float) -> None:
        self.version += 1
        seq.pred_due = due
        self._pred_sum += due
        self._pred_n += 1
        heapq.heappush(self._due_heap, (due, next(self._heap_tie), seq))

    def _renewed_due(self, seq: Seq, due: float) -> float:
        """The decode step at which ``seq``'s renewed guess runs out (its old one ran out at ``due``): the expected
        rest of a response already this long, by its distribution; ``predicted_remaining`` moves with it."""
        g = seq.dist_base + self.generated_of(seq)
        new = self.step_no + seq.length_dist.expected_remaining(g)  # type: ignore[union-attr]
        seq.predicted_remaining += new - due  # type: ignore[operator]
        return new

    def _drop_prediction(self, seq: Seq) -> None:
        if seq.pred_due is not None:
            self.version += 1
            self._pred_sum -= seq.pred_due
            self._pred_n -= 1
            seq.pred_due = None

    # ---- what routers see -------------------------------------------------------------------------------
    @contextlib.contextmanager
    def ahead(self, steps: int) -> Iterator[EngineModel]:
        """The engine as if ``steps`` more decode steps of its batch had run, for a read (a snapshot mid-span: a
        span books its steps at its end); restored after. ``steps`` must stop short of the span's end, where
        requests finish."""
        k = len(self.decoding) * steps
        self.step_no += steps
        self._n_sum += k
        try:
            yield self
        finally:
            self.step_no -= steps
            self._n_sum -= k

    def snapshot(self, instance_id: str, now_s: float, *, detail: bool = False, **static: object) -> InstanceSnapshot:
        # NOTE: drops the members whose prediction ran out by ``step_no`` for good (or renews it), inside ``ahead``
        # too: a span books at least the steps a mid-span read saw, less one for the simulator's pre-step snapshot
        # (a member missing there counts at most one token).
        heap = self._due_heap
        while heap and heap[0][0] <= self.step_no:
            due, _, s = heapq.heappop(heap)
            if s.pred_due == due:  # else stale: it left the decode set (and maybe rejoined with another due)
                self._drop_prediction(s)
                if s.length_dist is not None:
                    self._track_prediction(s, self._renewed_due(s, due))
        pred = max(self._pred_sum - self._pred_n * self.step_no, 0.0)
        requests: tuple[RequestLoad, ...] = ()
        if detail:
            rl = []
            step_no = self.step_no
            for s in self.decoding.values():  # (``computed_of`` and ``generated_of`` inlined: per decode, per read)
                k = step_no - s.join_step
                g = s.generated + k
                rl.append(RequestLoad(s.rid, s.num_computed + k + 1, g, _remaining(s, g), s.priority))
            queue = self._queue_loads
            if queue is None:
                queue = self._queue_loads = tuple(
                    s.load or _queued_load(s) for s in itertools.chain(self.prefilling, self.waiting))
            requests = (*rl, *queue)
        waiting_tokens = self._waiting_tokens
        if waiting_tokens is None:
            waiting_tokens = self._waiting_tokens = sum(s.num_tokens for s in self.waiting)
        pending = sum(s.num_tokens - s.num_computed for s in self.prefilling) + waiting_tokens
        # (``is not None``: an empty cache still knows its queue; a falsy one read as "cannot tell" until a first id.)
        compute = pending - self._waiting_not_computed() if self.prefix_cache is not None else None
        bs = len(self.decoding)
        return InstanceSnapshot(
            instance_id=instance_id,
            role=self.role,
            time_s=now_s,
            num_running=self.num_running,
            num_waiting=len(self.waiting),
            num_decoding=bs,
            # NOTE: ceil-per-request estimate; exact ``blocks_used()`` is O(batch) and routers don't need it.
            kv_blocks_used=self.prefill_blocks + (self._n_sum + bs * (self.block_size - 1) // 2) // self.block_size
            if bs
            else self.prefill_blocks,
            kv_blocks_total=self.total_blocks,
            block_size=self.block_size,
            prefill_tokens_pending=pending,
            decode_context_tokens=self._n_sum + bs,
            predicted_remaining_tokens=pred,
            num_predicted=self._n_guessed,
            requests=requests,
            cached_hash_ids=self._cached_hash_ids(),
            prefill_compute_tokens=compute,
            prompt_tokens_cached=self.prefix_hit_tokens,
            **static,  # type: ignore[arg-type]
        )
