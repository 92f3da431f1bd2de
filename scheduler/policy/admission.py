"""Admission control: bounded queues per priority class, checked before a request is routed.

``AdmissionPolicy.admit(request, view, queued_by_priority)`` returns ``Admitted``, ``Deferred(reason)`` or
``Rejected(reason, retry_after_s)`` (an expected "no" is a value). Rules, in order:

1. no accepting instance can run one of the request's phases (no ``prefill_candidates`` or no
   ``decode_candidates``)                       -> Deferred: there is no queue to bound; the router decides. Its
   fallbacks may still place the request (a light DECODE instance prefills, a PREFILL one decodes); its refusal is
   "nothing accepts requests", which each caller answers as without admission (live: UNAVAILABLE with a
   retry-after; simulator: a router refusal, not an admission one);
2. the prompt exceeds every healthy instance's KV -> Rejected, no retry (it can never run here); one that fits
   only instances draining now                   -> Rejected, retry later;
3. overload shedding: mean virtual usage of accepting instances >= ``shed_usage`` and the request's priority is
   below ``protected_priority``                  -> Rejected, retry later;
4. the request's priority queue holds ``limit(priority)`` requests -> Rejected, retry after an estimate of when
   the queue drains: ``queued / (accepting instances * drain_rps_per_instance)``, at least ``retry_after_s``.

``limit(priority)``: ``max_queued[priority]`` if given, else ``default_max_queued``. Higher classes usually get
longer queues (they are worth waiting for). ``policies.admission`` builds it; the live Ingress (``Ingress._admit``)
and the simulator (``Simulator._admit``) ask it for each new request, each counting its own queues: requests
admitted that have no first token yet, per priority. Both refuse exactly the ``Rejected`` answers and route the
others.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import ClassVar

from scheduler.core.types import ClusterView, Rejected, RequestInfo


@dataclass(frozen=True, slots=True)
class Admitted:
    reason: str = ""


@dataclass(frozen=True, slots=True)
class Deferred:
    """Rule 1: no accepting instance runs one of the request's phases, so admission has nothing to bound: the router
    decides (module docstring). Not a refusal: callers route it, as they would with no admission policy."""

    reason: str


AdmissionResult = Admitted | Deferred | Rejected


class AdmissionPolicy:
    """Bounded per-priority queues with overload shedding (module docstring)."""

    name: ClassVar[str] = "bounded"

    def __init__(self, *, max_queued: Mapping[int, int] | None = None, default_max_queued: int = 1024,
                 shed_usage: float | None = None, protected_priority: int = 1, retry_after_s: float = 1.0,
                 drain_rps_per_instance: float = 2.0) -> None:
        # NOTE: errors name the parameter (the config prefixes ``policies.admission.params.``); bools are no counts.
        if max_queued is not None and not isinstance(max_queued, Mapping):
            raise ValueError(f"max_queued: a mapping priority -> queue length, got {max_queued!r}")
        self.max_queued: dict[int, int] = {}
        named: dict[int, object] = {}  # priority -> the key that named it
        for k, v in (max_queued or {}).items():
            p = _int(f"max_queued[{k!r}]", k, key=True)
            if p in named:  # YAML's 1 and "1" (or "01") are two keys: one would silently win
                raise ValueError(f"max_queued: priority {p} is given twice ({named[p]!r} and {k!r})")
            named[p] = k
            self.max_queued[p] = _int(f"max_queued[{k!r}]", v, low=0)
        self.default_max_queued = _int("default_max_queued", default_max_queued, low=0)
        self.shed_usage = None if shed_usage is None else _positive("shed_usage", shed_usage)
        self.protected_priority = _int("protected_priority", protected_priority)
        self.retry_after_s = _positive("retry_after_s", retry_after_s)
        self.drain_rps_per_instance = _positive("drain_rps_per_instance", drain_rps_per_instance)

    def limit(self, priority: int) -> int:
        return self.max_queued.get(priority, self.default_max_queued)

    def admit(self, request: RequestInfo, view: ClusterView, queued_by_priority: Mapping[int, int]) -> AdmissionResult:
        accepting = [i for i in view.instances if i.healthy and not i.draining]
        # NOTE: ``prefill_candidates`` / ``decode_candidates`` non-empty, without building them (once per request).
        if not any(i.role.does_prefill for i in accepting):
            return Deferred("no accepting instance can run prefill: the router decides")
        if not any(i.role.does_decode for i in accepting):
            return Deferred("no accepting instance can decode: the router decides")
        # Where it can be prefilled (a DECODE instance's KV does not help a prompt no prefill instance holds).
        def cap(insts: list) -> int:
            return max((i.kv_blocks_total * i.block_size for i in insts if i.role.does_prefill), default=0)

        held = cap(accepting)
        if request.prompt_tokens > held:
            # Final only when no healthy instance could ever hold it: one that fits an instance draining now (a
            # role switch, a scale-down that may be undone) is asked to come back, not told it never can.
            if request.prompt_tokens > cap([i for i in view.instances if i.healthy]):
                return Rejected(f"prompt_tokens: {request.prompt_tokens} exceeds every prefill-capable instance's "
                                f"KV capacity ({held} tokens)")
            return Rejected(f"prompt_tokens: {request.prompt_tokens} fits only instances draining now (accepting "
                            f"ones hold {held} tokens)", retry_after_s=self.retry_after_s)
        if self.shed_usage is not None and request.priority < self.protected_priority:
            usage = sum(i.load.virtual_usage for i in accepting) / len(accepting)
            if usage >= self.shed_usage:
                return Rejected(f"cluster overloaded (mean virtual usage {usage:.2f} >= {self.shed_usage}); "
                                f"priority {request.priority} is shed", retry_after_s=self.retry_after_s)
        queued = int(queued_by_priority.get(request.priority, 0))
        limit = self.limit(request.priority)
        if queued >= limit:
            drain = len(accepting) * self.drain_rps_per_instance
            retry = max(self.retry_after_s, queued / drain if drain > 0 else self.retry_after_s)
            return Rejected(f"queue for priority {request.priority} is full ({queued}/{limit})", retry_after_s=retry)
        return Admitted()


class AdmitAll(AdmissionPolicy):
    """Admits everything that can ever run (rules 1-2 only)."""

    name = "always"
    # Only rule 2's retry-after (a prompt that fits only draining instances): a queue bound or shedding would make it
    # "bounded" under another name.
    params: ClassVar[tuple[str, ...]] = ("retry_after_s",)

    def __init__(self, *, retry_after_s: float = 1.0) -> None:
        super().__init__(default_max_queued=2**62, retry_after_s=retry_after_s)


ADMISSION_POLICIES: dict[str, Callable[..., AdmissionPolicy]] = {
    AdmissionPolicy.name: AdmissionPolicy,
    AdmitAll.name: AdmitAll,
}


def make_admission_policy(name: str, **params: object) -> AdmissionPolicy:
    """Build an admission policy by registry name; unknown names, parameters or bad values raise ``ValueError``
    naming them (unknown names list the allowed ones)."""
    try:
        factory = ADMISSION_POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown admission policy {name!r}; allowed: {', '.join(sorted(ADMISSION_POLICIES))}") from None
    allowed = list(getattr(factory, "params", None) or inspect.signature(AdmissionPolicy).parameters)
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise ValueError(f"{unknown[0]}: unknown parameter of admission policy {name!r}; allowed: "
                         f"{', '.join(allowed)}")
    return factory(**params)


def _int(field: str, v: object, *, low: int | None = None, key: bool = False) -> int:
    """``v`` as an int (a mapping key may be a string of one: JSON and some YAML keys are)."""
    if key and isinstance(v, str) and v.strip().lstrip("-").isdigit():
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int):  # NOTE: a ValueError, as every config error
        raise ValueError(f"{field}: {'priority' if key else 'value'} must be an integer, got {v!r}")  # noqa: TRY004
    if low is not None and v < low:
        raise ValueError(f"{field}: must be >= {low}, got {v}")
    return v


def _positive(field: str, v: object) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float) or not v > 0 or v == float("inf"):
        raise ValueError(f"{field}: must be a finite number > 0, got {v!r}")
    return float(v)
