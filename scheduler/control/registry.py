"""Request registry: which instance(s) hold each in-flight request and what it has emitted so far.

Two copies, one type:

* each Ingress keeps full ``RequestRecord``s of the streams it serves (prompt, sampling, every token emitted):
  that is what recovery needs -- if an instance dies mid-stream, the request is re-prefilled elsewhere as
  ``prompt + emitted`` and the stream continues at the next index, with nothing lost or duplicated;
* the Controller keeps ``RegistryEntry`` summaries (request -> ingress, instances, tokens emitted) reported in
  batches by the ingresses, for admin calls that land on another ingress replica (cancel, migrate) and for
  ``cluster_state``. After a Controller restart the ingresses re-send their full set.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from scheduler.core.types import SLO, InstanceRole, Phase
from scheduler.engine.base import EngineRequest, KVBlocks, SamplingParams
from scheduler.predict.base import LengthPrediction


@dataclass(frozen=True, slots=True)
class RegistryEntry:
    """What the Controller knows about one in-flight request."""

    request_id: str
    ingress_id: str
    instances: tuple[str, ...]  # current holder(s): (prefill, decode) during a handoff, else one
    tokens_emitted: int
    phase: Phase
    updated_s: float = 0.0


@dataclass(slots=True)
class RequestRecord:
    """Full state of one stream on the ingress that serves it."""

    request_id: str
    prompt_token_ids: tuple[int, ...]
    sampling: SamplingParams
    priority: int = 0
    predicted_output_tokens: float | None = None
    length_dist: LengthPrediction | None = None  # the predictor's distribution behind the guess (None: a hint)
    arrival_s: float = field(default_factory=time.time)
    instances: tuple[str, ...] = ()
    # NOTE: grown only through ``RequestRegistry.emit`` once registered: the admission queues count on it.
    output_token_ids: list[int] = field(default_factory=list)
    phase: Phase = Phase.QUEUED
    recoveries: int = 0
    # Instances that failed while it ran there -- died, stopped answering, or their engine failed (quarantine evidence)
    failed_engines: tuple[str, ...] = ()
    # Set by admin ops that move the request on purpose (migration, drain) before they abort the source.
    moving_to: str | None = None
    move_kv: Any = None  # ObjectRef of the exported KV the destination loads
    move_waiter: Any = None  # asyncio.Future resolved when the destination admitted the request
    cancelled: bool = False
    slo: SLO | None = None
    trace_context: Any = None  # the request's span context (the server span): parent of spans started elsewhere
    hash_ids: tuple[int, ...] = ()  # the prompt's block ids (scheduler.core.prefix): prefix-cache affinity
    tenant: str | None = None  # the app the client named: the length predictor's (``ServingPredictor.tenant_for``)
    # Each instance it was routed to, with its role as the view routed on showed it: its submits there say so
    # (``Instance.submit``'s ``view_role``), and one whose role switched since refuses them.
    view_roles: dict[str, InstanceRole] = field(default_factory=dict)

    @property
    def next_index(self) -> int:
        return len(self.output_token_ids)

    def guess(self) -> dict[str, Any]:
        """The length guess an instance reports this stream's remaining output from (``Instance.submit``'s
        keywords)."""
        return {"predicted_output_tokens": self.predicted_output_tokens, "length_dist": self.length_dist}

    @property
    def remaining_tokens(self) -> int:
        return self.sampling.max_tokens - len(self.output_token_ids)

    def resume_request(self, kv: tuple[KVBlocks, ...] = ()) -> EngineRequest:
        """The engine request that continues this stream elsewhere: ``prompt + emitted`` as context,
        ``max_tokens`` reduced by what was emitted, the sampler advanced past the emitted tokens."""
        out = tuple(self.output_token_ids)
        sp = self.sampling
        sampling = SamplingParams(
            max_tokens=max(self.remaining_tokens, 1),
            temperature=sp.temperature,
            top_p=sp.top_p,
            top_k=sp.top_k,
            seed=sp.seed,
            stop_token_ids=sp.stop_token_ids,
            ignore_eos=sp.ignore_eos,
        )
        return EngineRequest(
            self.request_id,
            self.prompt_token_ids + out,
            sampling,
            priority=self.priority,
            num_output_tokens_before=len(out),
            kv=kv,
        )

    def entry(self, ingress_id: str) -> RegistryEntry:
        return RegistryEntry(self.request_id, ingress_id, self.instances, len(self.output_token_ids), self.phase,
                             time.time())


class RequestRegistry:
    """In-memory map of in-flight requests. Not thread-safe: used from one event loop."""

    def __init__(self) -> None:
        self._records: dict[str, RequestRecord] = {}
        self._dirty: set[str] = set()
        self._removed: set[str] = set()
        # The admission policy's queues, kept where they change (a scan of every record per admitted request cost
        # ~0.3 ms at 4096 in flight): records with no token yet (id -> priority), and their count per priority.
        # A record leaves at its first tokens (``emit``, the one place output grows) or its removal (finish,
        # failure, cancel); recovery, handoffs and migrations keep both the record and its tokens.
        self._unstarted: dict[str, int] = {}
        self._queued: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self._records)

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._records

    def __iter__(self) -> Iterator[RequestRecord]:
        return iter(list(self._records.values()))

    def get(self, request_id: str) -> RequestRecord | None:
        return self._records.get(request_id)

    def add(self, record: RequestRecord) -> None:
        if record.request_id in self._records:
            raise ValueError(f"request_id: {record.request_id!r} is already in flight")
        self._records[record.request_id] = record
        self.touch(record.request_id)
        if not record.output_token_ids:
            self._unstarted[record.request_id] = record.priority
            self._queued[record.priority] = self._queued.get(record.priority, 0) + 1

    def emit(self, record: RequestRecord, tokens: Iterable[int]) -> None:
        """Append ``tokens`` to ``record``'s output (its first ones take it out of its priority's queue)."""
        n = len(record.output_token_ids)
        record.output_token_ids.extend(tokens)
        if n == 0 and record.output_token_ids and self._records.get(record.request_id) is record:
            self._dequeue(record.request_id)

    def queued_by_priority(self) -> dict[int, int]:
        """Records with no token yet, per priority (priorities with none left out)."""
        return dict(self._queued)

    def _dequeue(self, request_id: str) -> None:
        p = self._unstarted.pop(request_id, None)
        if p is not None:
            if self._queued[p] == 1:
                del self._queued[p]
            else:
                self._queued[p] -= 1

    def touch(self, request_id: str) -> None:
        """Mark a record changed (new holder, phase) so the next report carries it."""
        self._dirty.add(request_id)
        self._removed.discard(request_id)

    def remove(self, request_id: str) -> RequestRecord | None:
        rec = self._records.pop(request_id, None)
        if rec is not None:
            self._dirty.discard(request_id)
            self._removed.add(request_id)
            self._dequeue(request_id)
        return rec

    def on_instance(self, instance_id: str) -> list[RequestRecord]:
        return [r for r in self._records.values() if instance_id in r.instances]

    def take_delta(self, ingress_id: str, *, full: bool = False) -> tuple[list[RegistryEntry], list[str]]:
        """Entries changed (or all, when ``full``) and ids removed since the last call."""
        ids: Iterable[str] = self._records if full else self._dirty
        upserts = [self._records[i].entry(ingress_id) for i in ids if i in self._records]
        removed = sorted(self._removed)
        self._dirty.clear()
        self._removed.clear()
        return upserts, removed


class EntryTable:
    """The Controller's copy: entries from every ingress, replaced wholesale per ingress on a full report.

    Ingress ids are random per process, so a dead replica never reports its entries removed: an ingress not heard
    from (``seen``: its reports, and its ``take_migrations`` polls every 0.25 s even when it has nothing to report)
    for ``ttl_s`` is dropped (``expire``) -- else its ghosts would keep instances from ever counting as drained.
    A live one cut off that long re-sends its full set on its next successful report (it lost the epoch).
    """

    def __init__(self, ttl_s: float = 30.0) -> None:
        self.entries: dict[str, RegistryEntry] = {}
        self.ttl_s = ttl_s
        self._seen: dict[str, float] = {}  # ingress id -> monotonic time it was last heard from
        # ingress id -> the sequence numbers (``poll_seq``) of its last two ``take_migrations`` polls (``polled``).
        # Not per-ingress counts: a replica closed (``drop_ingress``) and started again under the same id counted
        # from 0 again, below a drain's count from before, and the drain took it as silent (``peer_wait_s``).
        self._polls: dict[str, tuple[int, int]] = {}
        self.poll_seq = 0  # polls by any ingress so far
        self._swept: float | None = None

    def seen(self, ingress_id: str, now: float | None = None) -> None:
        self._seen[ingress_id] = time.monotonic() if now is None else now

    def polled(self, ingress_id: str) -> None:
        """``ingress_id`` polled for migration plans: a heartbeat, counted (a drain's "heard from you since": an
        ingress flushes its unreported registry changes before each poll, ``IngressMigration._take_plans``)."""
        self.seen(ingress_id)
        self.poll_seq += 1
        self._polls[ingress_id] = (self._polls.get(ingress_id, (0, 0))[1], self.poll_seq)

    def polled_twice_since(self, ingress_id: str, seq: int) -> bool:
        """``ingress_id`` polled twice after ``poll_seq`` was ``seq``."""
        return self._polls.get(ingress_id, (0, 0))[0] > seq

    def silent_s(self, ingress_id: str, now: float | None = None) -> float:
        """How long ``ingress_id`` has not been heard from (``inf``: never, or dropped)."""
        t = self._seen.get(ingress_id)
        return float("inf") if t is None else (time.monotonic() if now is None else now) - t

    def heard(self, within_s: float, now: float | None = None) -> set[str]:
        """The ingresses heard from within ``within_s`` (however young this table is)."""
        now = time.monotonic() if now is None else now
        return {i for i, t in self._seen.items() if now - t < within_s}

    def apply(self, ingress_id: str, upserts: list[RegistryEntry], removed: list[str], *, full: bool,
              now: float | None = None) -> None:
        self.seen(ingress_id, now)
        if full:
            for rid in [r for r, e in self.entries.items() if e.ingress_id == ingress_id]:
                del self.entries[rid]
        for e in upserts:
            self.entries[e.request_id] = e
        for rid in removed:
            e = self.entries.get(rid)
            if e is not None and e.ingress_id == ingress_id:
                del self.entries[rid]

    def expire(self, now: float | None = None) -> list[str]:
        """Drop the entries of ingresses silent for ``ttl_s``; returns their ids."""
        now = time.monotonic() if now is None else now
        if self._swept is not None and now - self._swept > self.ttl_s:
            # Nobody swept for a whole ttl: the Controller itself was stalled, so silence proves nothing.
            self._seen = dict.fromkeys(self._seen, now)
        self._swept = now
        dead = [i for i, t in self._seen.items() if now - t > self.ttl_s]
        for ingress_id in dead:
            self.drop_ingress(ingress_id)
        return dead

    def drop_ingress(self, ingress_id: str) -> None:
        for rid in [r for r, e in self.entries.items() if e.ingress_id == ingress_id]:
            del self.entries[rid]
        self._seen.pop(ingress_id, None)
        self._polls.pop(ingress_id, None)

    def on_instance(self, instance_id: str) -> list[RegistryEntry]:
        return [e for e in self.entries.values() if instance_id in e.instances]
