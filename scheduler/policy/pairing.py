"""P/D pairing shared by the smart routers, with Splitwise's mixed-pool fallback, and small shared helpers.

P/D pairing (``PairingRouter.route``), for disaggregated views::

    prefill candidates (PREFILL + MIXED, accepting)      decode candidates (see ``decode_pool``)
              |                                                   |
              +------------- pair(request, P, D) -----------------+
                                     |
         default: best prefill by score(phase="prefill"), best decode by score(phase="decode");
         a MIXED prefill instance keeps the request (colocated) when it is also the best decoder.
         ``lookahead`` overrides ``pair`` and costs each (prefill, decode) combination jointly.

Colocated views (every accepting instance MIXED) pick one instance with ``phase="colocated"``.

Splitwise mixed-pool fallback (Patel et al., ISCA 2024, section 4.2), both ways:

* decode pool saturated: when every DECODE instance is saturated by KV (virtual usage at or above ``saturation``),
  MIXED instances join the decode candidates, and -- only with ``allow_prefill_decode`` -- lightly loaded PREFILL
  instances too (the engine must then accept decodes on a PREFILL instance).
* prefill pool saturated (``prefill_pool``): when every prefill candidate has ``prefill_saturation_tokens`` or more
  prompt tokens queued to compute (``queued_prefill_tokens``; the re-roling policy's ``prefill_high_tokens``, 8192,
  by default) -- or there is none -- a DECODE instance below that itself, whose virtual usage with the prompt stays
  under ``decode_light`` (0.4, the re-roling policy's ``decode_low``: a borrow never pushes a decoder past the load
  at which ``RerolePolicy`` may still move one to PREFILL for good), joins the prefill candidates. Picked, it
  keeps the request: colocated on it, no KV hand-off (it decodes anyway; a transfer to another decoder would only
  add to a decode pool it belongs to).

Either way the decision's reason names the fallback; the re-roling policy in ``scaling.py`` is the durable fix.

Priority: larger is more important; ``priority >= HIGH_PRIORITY`` is "high", and routers penalise queues for it.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from scheduler.core.types import ClusterView, InstanceRole, InstanceSnapshot, Rejected, RequestInfo
from scheduler.policy.filters import prefill_candidates
from scheduler.policy.route import RouteDecision, Router, RouteResult

HIGH_PRIORITY = 1  # priority at or above which a request counts as high priority (larger is more important)


# ---- shared helpers ---------------------------------------------------------------------------------------
def blocks_for(tokens: float, block_size: int) -> int:
    return -(-int(tokens) // max(block_size, 1))


def virtual_blocks_with(inst: InstanceSnapshot, extra_tokens: float = 0.0) -> int:
    """Llumnix virtual usage in KV blocks after adding ``extra_tokens`` of KV demand: used + queued + extra."""
    bs = max(inst.block_size, 1)
    return inst.kv_blocks_used + blocks_for(inst.prefill_tokens_pending, bs) + blocks_for(extra_tokens, bs)


def virtual_usage_with(inst: InstanceSnapshot, extra_tokens: float = 0.0) -> float:
    """Llumnix virtual usage after adding ``extra_tokens`` of KV demand: (used + queued + extra) / total."""
    return virtual_blocks_with(inst, extra_tokens) / max(inst.kv_blocks_total, 1)


def queue_penalty(request: RequestInfo, inst: InstanceSnapshot, weight: float) -> float:
    """High-priority requests avoid queues: ``weight`` per waiting request, zero for normal priority."""
    return weight * inst.num_waiting if request.priority >= HIGH_PRIORITY else 0.0


def queued_prefill_tokens(inst: InstanceSnapshot) -> int:
    """Prompt tokens ``inst`` will compute before a newcomer's prefill: its queue net of prefix-cache hits when the
    snapshot knows them (``prefill_compute_tokens``), else every queued prompt token."""
    c = inst.prefill_compute_tokens
    return inst.prefill_tokens_pending if c is None else c


@dataclass(frozen=True, slots=True)
class PrefillPool:
    candidates: tuple[InstanceSnapshot, ...]
    fallback: str = ""  # non-empty when the Splitwise fallback added DECODE instances, naming why


def prefill_pool(
    view: ClusterView,
    request: RequestInfo,
    *,
    saturation_tokens: int | None = 8192,
    decode_light: float = 0.4,
) -> PrefillPool:
    """Prefill candidates (``prefill_candidates``) with Splitwise's mixed-pool fallback from the decode side.

    Args:
        saturation_tokens: a prefill candidate with this many prompt tokens or more queued to compute
            (``queued_prefill_tokens``) is saturated; ``None`` turns the fallback off.
        decode_light: when every prefill candidate is saturated (or there is none), a DECODE instance joins if its
            own queue is below ``saturation_tokens`` and its virtual usage with the prompt is below this.
    """
    pre = prefill_candidates(view)
    if saturation_tokens is None or any(queued_prefill_tokens(p) < saturation_tokens for p in pre):
        return PrefillPool(pre)
    dec = InstanceRole.DECODE
    extra = tuple([d for d in view.instances if d.role is dec and d.healthy and not d.draining
                   and queued_prefill_tokens(d) < saturation_tokens
                   and virtual_usage_with(d, request.prompt_tokens) < decode_light])
    why = "prefill pool saturated" if pre else "no prefill instance"
    return PrefillPool(pre + extra, why if extra else "")


@dataclass(frozen=True, slots=True)
class DecodePool:
    candidates: tuple[InstanceSnapshot, ...]
    fallback: str = ""  # non-empty when the Splitwise fallback widened the pool, naming why


def decode_pool(
    view: ClusterView,
    *,
    saturation: float = 0.95,
    allow_prefill_decode: bool = False,
    prefill_light: float = 0.3,
) -> DecodePool:
    """Decode candidates with Splitwise's mixed-pool fallback.

    Args:
        saturation: a DECODE instance at or above this virtual usage is saturated.
        allow_prefill_decode: when all decoders are saturated, also offer PREFILL instances whose virtual usage
            is below ``prefill_light`` and that have nothing waiting.
    """
    dec, mixed, pre = [], [], []
    for i in view.instances:
        if not (i.healthy and not i.draining):
            continue
        if i.role is InstanceRole.DECODE:
            dec.append(i)
        elif i.role is InstanceRole.MIXED:
            mixed.append(i)
        else:
            pre.append(i)
    if any(virtual_usage_with(d) < saturation for d in dec):
        return DecodePool(tuple(dec))
    extra = list(mixed)
    if allow_prefill_decode:
        extra += [p for p in pre if p.num_waiting == 0 and virtual_usage_with(p) < prefill_light]
    why = "decode pool saturated" if dec else "no decode instance"
    return DecodePool(tuple(dec + extra), why if extra else "")


class PriorityTracker:
    """Which instances hold in-flight high-priority requests, from the router's own ``on_routed`` history.

    Snapshots need not carry per-request detail, so a router remembers where it sent high-priority work and
    forgets it on ``on_finished`` (bounded: the oldest entries are dropped past ``max_tracked``).
    """

    def __init__(self, max_tracked: int = 100_000) -> None:
        self.max_tracked = max_tracked
        self._where: OrderedDict[str, tuple[str, ...]] = OrderedDict()
        self._at: dict[str, set[str]] = {}  # instance -> the request ids ``_where`` places there
        # instance -> (its current detailed snapshot, the high-priority requests it lists as (id, in prefill)): a
        # router asks for every candidate on every request, and a live snapshot's ``requests`` holds its whole batch
        # (O(instances x batch) a pick); the high-priority few are read once per snapshot.
        self._listed: dict[str, tuple[InstanceSnapshot, tuple[tuple[str, bool], ...]]] = {}

    def add(self, request: RequestInfo, decision: RouteDecision) -> None:
        if request.priority < HIGH_PRIORITY:
            return
        # Where it will hold KV for its whole life: its decoder (a pair's prefill instance hands it off after one
        # step; counted there until it finished decoding, an emptied PREFILL instance kept its headroom).
        d = decision.decode_instance
        ids = (d,) if d not in (None, decision.prefill_instance) else (decision.prefill_instance,)
        self._drop(request.request_id)
        self._where[request.request_id] = ids  # type: ignore[assignment]
        for i in ids:
            self._at.setdefault(i, set()).add(request.request_id)  # type: ignore[arg-type]
        while len(self._where) > self.max_tracked:
            self._drop(next(iter(self._where)))

    def _drop(self, request_id: str) -> None:
        for i in self._where.pop(request_id, ()):
            here = self._at.get(i)
            if here is not None:
                here.discard(request_id)
                if not here:
                    del self._at[i]

    def finished(self, request_id: str) -> None:
        self._drop(request_id)

    def count(self, inst: InstanceSnapshot) -> int:
        mine = self._at.get(inst.instance_id, ())
        if not inst.requests:
            return len(mine)
        # A detailed snapshot (a live instance's) adds the high-priority requests it lists that memory does not
        # place here: another ingress' or a migrated one -- but not one in prefill on its way to the decoder memory
        # names. Memory's own count here still holds: those not listed are on their way (prefilling elsewhere, KV
        # in transit, routed since the snapshot), or migrated away (routers hear nothing of migrations: the
        # instance a request left keeps its headroom until it finishes). Before, the listed ones alone counted
        # whenever any were listed: live, a pair's headroom sat on its PREFILL instance during the prefill and on
        # its decoder only once the KV landed, the reverse of the simulator's (which lists requests to llumnix only
        # under migration: ``needs_detail_with_migration``).
        read = self._listed.get(inst.instance_id)
        if read is None or read[0] is not inst:
            high = tuple((r.request_id, r.in_prefill) for r in inst.requests if r.priority >= HIGH_PRIORITY)
            read = self._listed[inst.instance_id] = (inst, high)
        where = self._where
        return len(mine) + sum(1 for rid, in_prefill in read[1] if rid not in mine and not (in_prefill and rid in where))


# ---- the pairing base ---------------------------------------------------------------------------------------
class PairingRouter(Router):
    """Router base for the smart routers: P/D pairing with the mixed-pool fallback (see module docstring)."""

    name = "pairing"

    def __init__(self, *, saturation: float = 0.95, allow_prefill_decode: bool = False,
                 prefill_saturation_tokens: int | None = 8192, decode_light: float = 0.4) -> None:
        self.saturation = saturation
        self.allow_prefill_decode = allow_prefill_decode
        self.prefill_saturation_tokens = prefill_saturation_tokens
        self.decode_light = decode_light

    def route(self, request: RequestInfo, view: ClusterView) -> RouteResult:
        if not view.disaggregated:
            prefill = prefill_candidates(view)
            if not prefill:
                return Rejected("no healthy instance can run prefill")
            p = self.pick(request, prefill, view, phase="colocated")
            return RouteDecision(p.instance_id, reason=self.name)
        ppool = prefill_pool(view, request, saturation_tokens=self.prefill_saturation_tokens,
                             decode_light=self.decode_light)
        prefill = ppool.candidates
        if not prefill:
            # The view is P/D, so healthy DECODE instances exist: the fallback found none light enough to borrow.
            why = "" if self.prefill_saturation_tokens is None else " and no decode instance light enough to borrow"
            return Rejected(f"no healthy prefill instance{why}")
        pool = decode_pool(view, saturation=self.saturation, allow_prefill_decode=self.allow_prefill_decode)
        if not pool.candidates:
            p = self.pick(request, prefill, view, phase="prefill")
            if p.role.does_decode:
                return RouteDecision(p.instance_id, reason="no decode instance; colocated")
            return Rejected("no healthy instance can run decode")
        decision = self.pair(request, prefill, pool.candidates, view)
        if isinstance(decision, Rejected):
            return decision
        # The prefill fallback is named when the pick used it (a DECODE instance prefills, colocated there); the
        # decode side's whenever it widened the pool, as before.
        why = []
        if ppool.fallback and view.by_id(decision.prefill_instance).role is InstanceRole.DECODE:
            why.append(ppool.fallback)
        if pool.fallback:
            why.append(pool.fallback)
        if why:
            return RouteDecision(decision.prefill_instance, decision.decode_instance,
                                 f"{decision.reason}; {', '.join(why)}: mixed-pool fallback")
        return decision

    def pair(
        self,
        request: RequestInfo,
        prefill: tuple[InstanceSnapshot, ...],
        decode: tuple[InstanceSnapshot, ...],
        view: ClusterView,
    ) -> RouteResult:
        """Default pairing: best prefill, best decode; stay colocated when a MIXED prefill is the best decoder, and
        on a DECODE instance the prefill fallback offered (``prefill_pool``)."""
        p = self.pick(request, prefill, view, phase="prefill")
        if p.role is InstanceRole.DECODE:
            return RouteDecision(p.instance_id, reason=f"{self.name}; decode instance prefills")
        d = self.pick(request, decode, view, phase="decode")
        # Keeping the request on a MIXED instance saves the KV transfer; do it when the instance would decode
        # about as well as the chosen decoder.
        if (p.role is InstanceRole.MIXED and d.instance_id != p.instance_id
                and self.score(request, p, phase="decode") <= self.score(request, d, phase="decode")):
            d = p
        if d.role is InstanceRole.PREFILL:
            # Splitwise borrow: an explicit pair (even p == d) tells the applier a PREFILL instance decodes.
            return RouteDecision(p.instance_id, d.instance_id, reason=f"{self.name}; prefill instance decodes")
        if d.instance_id == p.instance_id:
            return RouteDecision(p.instance_id, reason=self.name)
        return RouteDecision(p.instance_id, d.instance_id, reason=self.name)
