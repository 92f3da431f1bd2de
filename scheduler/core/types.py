"""Plain data shared by every layer: requests, instance snapshots, the cluster view.

Policies (``scheduler.policy``) read only these types. They hold ids and numbers, never live objects
(actors, engines, sockets), so the same policy runs unchanged in the simulator and the live control plane.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass, field, replace


class InstanceRole(enum.Enum):
    """What an engine instance does with a request."""

    PREFILL = "prefill"  # runs the prompt, then hands the KV cache to a DECODE instance
    DECODE = "decode"  # accepts KV from a PREFILL instance and streams tokens
    MIXED = "mixed"  # colocated: both phases on one instance

    @classmethod
    def parse(cls, value: str | InstanceRole) -> InstanceRole:
        if isinstance(value, InstanceRole):
            return value
        try:
            return cls(str(value).lower())
        except ValueError:
            allowed = ", ".join(r.value for r in cls)
            raise ValueError(f"unknown instance role {value!r}; allowed: {allowed}") from None

    @property
    def does_prefill(self) -> bool:
        return self in (InstanceRole.PREFILL, InstanceRole.MIXED)

    @property
    def does_decode(self) -> bool:
        return self in (InstanceRole.DECODE, InstanceRole.MIXED)


class Phase(enum.IntEnum):
    """Request lifecycle. Members from FINISHED on are terminal (as in vLLM's RequestStatus)."""

    QUEUED = 0
    PREFILL = 1
    TRANSFER = 2  # KV moving from prefill to decode instance
    DECODE = 3
    MIGRATING = 4
    FINISHED = 10
    CANCELLED = 11
    FAILED = 12

    @property
    def is_terminal(self) -> bool:
        return self >= Phase.FINISHED


@dataclass(frozen=True, slots=True)
class SLO:
    """Latency targets in seconds; ``None`` means no target on that metric."""

    ttft_s: float | None = None
    tpot_s: float | None = None

    def met(self, ttft_s: float, tpot_s: float) -> bool:
        # Written as "not over" so a NaN (a one-token request has no TPOT) meets its target.
        over_ttft = self.ttft_s is not None and ttft_s > self.ttft_s
        over_tpot = self.tpot_s is not None and tpot_s > self.tpot_s
        return not (over_ttft or over_tpot)


@dataclass(frozen=True, slots=True)
class RequestInfo:
    """What a router knows about a request when it arrives.

    ``output_tokens`` is the true output length where known (traces, the simulator's ground truth); policies must
    not read it -- they read ``predicted_output_tokens`` (from a predictor, a client hint, or ``None``). Nor
    ``max_tokens``: a trace replay (live or simulated) asks for exactly the trace's output length, so there it is
    the true length too (``test_no_router_reads_the_clients_max_tokens``).
    """

    request_id: str
    arrival_s: float
    prompt_tokens: int
    max_tokens: int
    priority: int = 0
    slo: SLO | None = None
    predicted_output_tokens: float | None = None
    hash_ids: tuple[int, ...] = ()
    tenant: str | None = None
    output_tokens: int | None = field(default=None, compare=False)
    # Already accepted (a recovery after its instance died, a decode placement after its prefill): a router must
    # place it and never shed it -- nothing accepted is lost.
    accepted: bool = False


@dataclass(frozen=True, slots=True)
class RequestLoad:
    """One running request as an instance reports it."""

    request_id: str
    context_tokens: int  # prompt + generated so far (KV length)
    # Made on this engine: a request that came with outputs made elsewhere (a P->D decode leg, a migration, a
    # recovery) has them in its prompt here.
    generated_tokens: int
    predicted_remaining: float | None = None
    priority: int = 0
    in_prefill: bool = False


@dataclass(frozen=True, slots=True)
class Load:
    """The one load vocabulary (Llumnix's BaseLoad), computed once per snapshot and read by every policy."""

    kv_usage: float  # fraction of KV blocks in use (0..1+)
    virtual_usage: float  # Llumnix virtual usage: (used + queued demand + headroom) / total
    outstanding: int  # running + waiting requests
    decode_batch: int  # requests currently decoding
    prefill_tokens_pending: int  # prompt tokens still to prefill (``InstanceSnapshot.prefill_tokens_pending``)
    decode_context_tokens: int  # sum of KV lengths of decoding requests
    predicted_remaining_tokens: float  # sum of the decoding requests' predicted remaining output tokens

    @staticmethod
    def of(snapshot: InstanceSnapshot) -> Load:
        s = snapshot
        total = max(s.kv_blocks_total, 1)
        queued_blocks = -(-s.prefill_tokens_pending // max(s.block_size, 1))
        return Load(
            kv_usage=s.kv_blocks_used / total,
            virtual_usage=(s.kv_blocks_used + queued_blocks) / total,
            outstanding=s.num_running + s.num_waiting,
            decode_batch=s.num_decoding,
            prefill_tokens_pending=s.prefill_tokens_pending,
            decode_context_tokens=s.decode_context_tokens,
            predicted_remaining_tokens=s.predicted_remaining_tokens,
        )


@dataclass(frozen=True, slots=True)
class InstanceSnapshot:
    """Read-only state of one engine instance at ``time_s``: when it was read (the simulator keeps an unchanged
    engine's snapshot, read time and all, rather than reading it again; policies take "now" from the view)."""

    instance_id: str
    role: InstanceRole
    gpu: str = "cpu"
    tp: int = 1
    model: str = "default"
    time_s: float = 0.0
    num_running: int = 0
    num_waiting: int = 0
    num_decoding: int = 0
    kv_blocks_used: int = 0
    kv_blocks_total: int = 1
    block_size: int = 16
    # Prompt tokens still to prefill: every queued prompt whole (its context), a prompt in (chunked) prefill less
    # what it has computed -- the KV it has yet to allocate, the prefill work it has left.
    prefill_tokens_pending: int = 0
    decode_context_tokens: int = 0
    predicted_remaining_tokens: float = 0.0  # of the decoding requests (each clipped at 0)
    requests: tuple[RequestLoad, ...] = ()
    healthy: bool = True
    draining: bool = False
    # Draining for an admin drain (DrainInstance, DrainNode): released once its requests have moved. Set by the
    # Controller with its record of the drain (``Controller.set_draining``), so every ingress replica reads it: a
    # P->D handoff paired with it picks another decoder (``Ingress._leaving``). A scale-down or role-switch drain
    # does not set it (its decoder still takes the KV on its way, in both clocks); the simulator never does (it has
    # no admin drains).
    leaving: bool = False
    # Mooncake-style prefix cache: block hash ids resident on this instance (bounded by the reporter); empty when
    # nothing is cached (or caching is off). ``None``: the reporter cannot tell (vLLM with its KV cache events off or lost) -- not "nothing cached".
    cached_hash_ids: frozenset[int] | None = None
    # Prompt tokens still to *compute*: ``prefill_tokens_pending`` less the leading blocks of the waiting prompts
    # that this instance's prefix cache holds now (or that come with transferred KV). ``None``: the reporter cannot
    # tell; take ``prefill_tokens_pending``. KV accounting keeps using that: a cache hit saves compute, not the
    # request's KV reservation.
    prefill_compute_tokens: int | None = None
    # Prompt tokens this engine has served from its own prefix cache since it started (cumulative; not KV that came
    # with a transfer or a migration). The scaling window reads its growth: the SLA scaler sizes prefill on the
    # tokens actually computed.
    prompt_tokens_cached: int = 0
    # Of ``num_waiting``: requests routed here to decode whose prompt KV is still on its way from their prefill
    # instance (the engine does not hold them yet). Lets a policy tell them from queued prompts on a MIXED
    # instance, where both wait.
    num_incoming: int = 0
    # Of ``num_decoding``: requests with a length guess, spent or not (``predicted_remaining_tokens`` sums theirs).
    # A sum of 0 alone read "no guesses" and "every guess spent" alike: see ``decode_tokens_left``.
    num_predicted: int = 0

    @property
    def load(self) -> Load:
        return Load.of(self)

    def decode_tokens_left(self, default_output_tokens: float) -> float:
        """The decode batch's predicted remaining output: the guesses' sum plus ``default_output_tokens`` for each
        request without one -- as a router reading per-request detail counts them. The routers read the sum alone,
        and ``n * default`` when it was 0: a batch whose guesses were all spent counted as wholly unguessed (4 x 256
        tokens against 57 for a batch with one guess left), and a batch of unguessed requests beside one guess
        counted that guess alone (5 tokens for 5 requests against 512 for 2 unguessed ones)."""
        return self.predicted_remaining_tokens + (self.num_decoding - self.num_predicted) * default_output_tokens

    @property
    def kv_blocks_free(self) -> int:
        return self.kv_blocks_total - self.kv_blocks_used

    @property
    def accepting(self) -> bool:
        return self.healthy and not self.draining


def with_pending(s: InstanceSnapshot, waiting: int, incoming: int, prompt: int, compute: int) -> InstanceSnapshot:
    """``s`` plus ``waiting`` requests not in it yet (``incoming`` of them P->D decodes on their way), and the
    ``prompt`` tokens of those routed there queued, ``compute`` of them to compute (cached prefixes spared): what an
    ingress routed since the snapshot was read (``IngressView.view``; the simulator's ``IngressPoll``)."""
    base = s.prefill_compute_tokens
    return replace(
        s, num_waiting=s.num_waiting + waiting, num_incoming=incoming,
        prefill_tokens_pending=s.prefill_tokens_pending + prompt,
        prefill_compute_tokens=None if base is None else base + compute)


Counts = tuple[int, int, int, int]  # ``with_pending``'s (waiting, incoming, prompt, compute)


def with_bookings(
    instances: Iterable[InstanceSnapshot], counts: dict[str, Counts],
    last: dict[str, tuple[InstanceSnapshot, Counts, InstanceSnapshot]],
) -> tuple[tuple[InstanceSnapshot, ...], dict[str, tuple[InstanceSnapshot, Counts, InstanceSnapshot]]]:
    """``instances``, each with its ``counts`` added (``with_pending``), and the cache for the next call: an instance
    whose snapshot and counts are as in ``last`` keeps its adjusted snapshot object -- routers keep per-snapshot
    terms (lookahead, llumnix), and a replace() per instance per request cost more than the routing at 64."""
    out, adjusted = [], {}
    for s in instances:
        iid = s.instance_id
        c = counts.get(iid)
        if c is None:
            out.append(s)
            continue
        prev = last.get(iid)
        if prev is None or prev[0] is not s or prev[1] != c:
            prev = (s, c, with_pending(s, *c))
        adjusted[iid] = prev
        out.append(prev[2])
    return tuple(out), adjusted


@dataclass(frozen=True, slots=True)
class ClusterView:
    """All instances at one moment. Built by the simulator or the controller, handed to policies."""

    time_s: float
    instances: tuple[InstanceSnapshot, ...]

    def by_id(self, instance_id: str) -> InstanceSnapshot:
        for inst in self.instances:
            if inst.instance_id == instance_id:
                return inst
        raise KeyError(f"no instance {instance_id!r} in view; have {[i.instance_id for i in self.instances]}")

    def with_role(self, *roles: InstanceRole) -> tuple[InstanceSnapshot, ...]:
        return tuple(i for i in self.instances if i.role in roles and i.accepting)

    @property
    def disaggregated(self) -> bool:
        """Any accepting PREFILL or DECODE instance. Not "any PREFILL instance": MIXED + DECODE ran colocated on
        the MIXED ones, the DECODE ones idle, and a drained PREFILL instance still in the view made it P/D."""
        mixed = InstanceRole.MIXED
        for i in self.instances:
            if i.role is not mixed and i.healthy and not i.draining:
                return True
        return False


@dataclass(frozen=True, slots=True)
class Rejected:
    """An expected "no" (vLLM style: a value, not an exception)."""

    reason: str
    retry_after_s: float | None = None
