"""Server-side admission: a bound on in-flight requests per priority class, in front of the ingress.

The servers take a slot before calling ``ingress.generate`` and give it back when the stream ends (finished,
cancelled, failed or disconnected). No slot -> :class:`~scheduler.control.api.Overloaded` -> gRPC
RESOURCE_EXHAUSTED with ``retry-after`` metadata / HTTP 429 with ``Retry-After``. Nothing is queued in the server:
a rejected request costs only its parse, so server memory is bounded by ``max_total`` streams whatever the offered
load. (The ingress' own ``AdmissionPolicy`` still applies behind this, with the cluster's view.)

    limiter = InflightLimiter(limits={0: 64, 1: 256}, default_limit=64, max_total=512)
    slot = limiter.acquire(priority)     # raises Overloaded(field="priority") when full
    ...
    await close_stream(stream)           # the ingress stream first: the slot bounds what is open there
    slot.release()                       # idempotent
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Iterable, Mapping
from typing import TYPE_CHECKING, Any

from scheduler.control.api import Overloaded

if TYPE_CHECKING:
    from scheduler.config.models import ClusterConfig
    from scheduler.control.api import IngressAPI
    from scheduler.core.types import InstanceSnapshot

logger = logging.getLogger(__name__)

_CANCELLING: set[asyncio.Task[Any]] = set()  # strong references: the event loop keeps only weak ones to tasks


async def cancel_quietly(ingress: IngressAPI, request_id: str) -> None:
    """Tell the ingress to cancel ``request_id`` (a stream that ended without finishing frees its engine).

    Shielded -- it runs while the server's task is being cancelled, and the ingress must still hear about it --
    and it never raises.
    """
    task = asyncio.ensure_future(ingress.cancel(request_id))
    _CANCELLING.add(task)
    task.add_done_callback(_CANCELLING.discard)
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        pass
    except Exception:
        logger.warning("ingress.cancel(%s) failed", request_id, exc_info=True)


async def close_stream(stream: AsyncIterator[Any], request_id: str = "") -> None:
    """Close an ingress stream now (its ``finally`` runs before the slot is given back, not at garbage collection).

    Never raises: it runs in the servers' clean-up paths, also while their task is being cancelled.
    """
    aclose = getattr(stream, "aclose", None)  # an AsyncIterator may be a plain iterator object
    if aclose is not None:
        try:
            await aclose()
        except (Exception, asyncio.CancelledError):
            logger.debug("closing the ingress stream of %s failed", request_id, exc_info=True)


class Slot:
    """One admitted request's place; :meth:`release` exactly once (further calls are no-ops)."""

    __slots__ = ("_limiter", "_released", "priority")

    def __init__(self, limiter: InflightLimiter, priority: int) -> None:
        self._limiter = limiter
        self.priority = priority
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._limiter._release(self.priority)


class InflightLimiter:
    """Bounded in-flight requests per priority plus a total cap.

    Args:
        limits: per-priority caps; priorities not listed share ``default_limit`` each.
        default_limit: cap for a priority not in ``limits``.
        max_total: cap over all priorities (bounds memory even when clients invent priorities).
        retry_after_s: what a rejection tells clients to wait.
    """

    def __init__(
        self,
        limits: Mapping[int, int] | None = None,
        *,
        default_limit: int = 256,
        max_total: int = 1024,
        retry_after_s: float = 1.0,
    ) -> None:
        for p, n in (limits or {}).items():
            if n < 0:
                raise ValueError(f"limits[{p}] must be >= 0, got {n}")
        if default_limit < 0 or max_total < 0:
            raise ValueError(f"default_limit and max_total must be >= 0, got {default_limit}, {max_total}")
        if retry_after_s < 0:
            raise ValueError(f"retry_after_s must be >= 0, got {retry_after_s}")
        self.limits = {int(k): int(v) for k, v in (limits or {}).items()}
        self.default_limit = default_limit
        self.max_total = max_total
        self.retry_after_s = retry_after_s
        self._by_priority: dict[int, int] = {}
        self._total = 0
        self.peak_total = 0  # high-water mark (tests, overload reports)
        self.follows_cluster = False  # sized from the cluster (``for_config``), not set by hand or env
        self._lock = threading.Lock()  # NOTE: the HTTP and gRPC servers may run on different threads

    def limit(self, priority: int) -> int:
        return self.limits.get(priority, self.default_limit)

    @property
    def in_flight(self) -> int:
        return self._total

    def in_flight_of(self, priority: int) -> int:
        return self._by_priority.get(priority, 0)

    def acquire(self, priority: int) -> Slot:
        """A slot for a request of ``priority``.

        Raises:
            Overloaded: the priority's cap or the total cap is reached (``field="priority"``).
        """
        limit = self.limit(priority)
        with self._lock:
            held = self._by_priority.get(priority, 0)
            if held >= limit:
                raise Overloaded(
                    f"priority: {held} requests of priority {priority} in flight (limit {limit}); retry later",
                    field="priority",
                    retry_after_s=self.retry_after_s,
                )
            if self._total >= self.max_total:
                raise Overloaded(
                    f"priority: {self._total} requests in flight (server limit {self.max_total}); retry later",
                    field="priority",
                    retry_after_s=self.retry_after_s,
                )
            self._by_priority[priority] = held + 1
            self._total += 1
            self.peak_total = max(self.peak_total, self._total)
        return Slot(self, priority)

    def _release(self, priority: int) -> None:
        with self._lock:
            n = self._by_priority.get(priority, 0) - 1
            if n > 0:
                self._by_priority[priority] = n
            else:
                self._by_priority.pop(priority, None)  # keep the table as small as the set of live priorities
            self._total -= 1

    def resize(self, slots: int) -> None:
        """Set the per-priority default and the total cap to ``slots`` (a limiter ``for_config`` made, following
        the cluster's size). Requests already admitted keep their slots: a smaller cap only turns new ones away
        until enough have finished."""
        slots = max(int(slots), 1)
        with self._lock:
            self.default_limit = self.max_total = slots

    @classmethod
    def for_config(cls, config: ClusterConfig, *, retry_after_s: float = 1.0) -> InflightLimiter:
        """Sized to the cluster: requests beyond the engines' batch slots (``count x max_num_seqs`` over the pools
        that accept new requests) would only wait in engine queues, so they are turned away at the door instead.
        ``follows_cluster``: ``llmsched serve`` re-sizes it as instances come and go (``cluster_slots``)."""
        from scheduler.core.types import InstanceRole

        slots = sum(p.count * p.engine.max_num_seqs for p in config.pools if p.role is not InstanceRole.DECODE)
        limiter = cls(default_limit=max(slots, 1), max_total=max(slots, 1), retry_after_s=retry_after_s)
        limiter.follows_cluster = True
        return limiter

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> InflightLimiter | None:
        """``LLMSCHED_MAX_INFLIGHT`` (total), ``LLMSCHED_MAX_INFLIGHT_PER_PRIORITY`` (default per class),
        ``LLMSCHED_MAX_INFLIGHT_BY_PRIORITY`` (``"0=64,1=256"``), ``LLMSCHED_RETRY_AFTER_S``; None when none is set.

        Raises:
            ValueError: naming the variable and the bad value.
        """
        keys = ("LLMSCHED_MAX_INFLIGHT", "LLMSCHED_MAX_INFLIGHT_PER_PRIORITY", "LLMSCHED_MAX_INFLIGHT_BY_PRIORITY",
                "LLMSCHED_RETRY_AFTER_S")
        if not any(env.get(k) for k in keys):
            return None

        def num(key: str, default: float, kind: type = int) -> float:
            raw = env.get(key)
            if not raw:
                return default
            try:
                return kind(raw)
            except ValueError:
                raise ValueError(f"{key}: expected {kind.__name__}, got {raw!r}") from None

        limits: dict[int, int] = {}
        spec = env.get("LLMSCHED_MAX_INFLIGHT_BY_PRIORITY", "")
        for part in filter(None, (p.strip() for p in spec.split(","))):
            p, sep, n = part.partition("=")
            try:
                if not sep:
                    raise ValueError
                limits[int(p)] = int(n)
            except ValueError:
                raise ValueError(f"LLMSCHED_MAX_INFLIGHT_BY_PRIORITY: expected 'priority=limit,...', got {part!r}") from None
        total = int(num("LLMSCHED_MAX_INFLIGHT", 1024))
        return cls(limits, default_limit=int(num("LLMSCHED_MAX_INFLIGHT_PER_PRIORITY", min(256, total))),
                   max_total=total, retry_after_s=float(num("LLMSCHED_RETRY_AFTER_S", 1.0, float)))


def cluster_slots(config: ClusterConfig, instances: Iterable[InstanceSnapshot]) -> int | None:
    """``for_config``'s batch slots over the instances serving now instead of the configured counts: an
    accepting (healthy, not draining) instance that takes new requests (not DECODE) adds its pool's
    ``max_num_seqs`` (its pool found by role, GPU and TP; else the largest of the config's). ``None`` when no
    instance is listed (starting up: keep the configured size). The scaling loop and an admin Scale change the
    instance count; a limit fixed at start turned an autoscaled cluster's added capacity away at the door."""
    from scheduler.core.types import InstanceRole

    listed = list(instances)
    if not listed:
        return None
    seqs: dict[tuple[InstanceRole, str, int], int] = {}
    for p in config.pools:
        seqs.setdefault((p.role, p.gpu, p.tp), p.engine.max_num_seqs)
    widest = max(p.engine.max_num_seqs for p in config.pools)
    return sum(seqs.get((i.role, i.gpu, i.tp), widest) for i in listed
               if i.role is not InstanceRole.DECODE and i.healthy and not i.draining)
