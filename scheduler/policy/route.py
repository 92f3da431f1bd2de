"""Routers: pick the instance(s) for an arriving request from a read-only ``ClusterView``.

A router is a pure class: no Ray, no asyncio, no I/O. The simulator and the live ingress call the same object.
Eligibility (role, health, draining) is decided by named filters in ``filters.py``; a router only ranks.

Disaggregated clusters (any accepting PREFILL or DECODE instance in the view): a router returns a prefill
instance and a decode instance. Colocated clusters: ``decode_instance`` is ``None`` and the request runs start to
end on one instance.
"""

from __future__ import annotations

import random as _random
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

from scheduler.config.models import ClusterConfig
from scheduler.core.types import ClusterView, InstanceSnapshot, Rejected, RequestInfo
from scheduler.policy.filters import decode_candidates, prefill_candidates


@dataclass(frozen=True, slots=True)
class RouteDecision:
    prefill_instance: str
    decode_instance: str | None = None  # None: colocated on ``prefill_instance``
    reason: str = ""


RouteResult = RouteDecision | Rejected


class Router:
    """Base class. Subclasses implement ``score`` (lower is better) or override ``route``.

    Hooks (``on_routed``, ``on_finished``) are no-ops unless a router keeps state (round-robin's cursor).
    ``needs_request_detail``: whether snapshots must carry the per-request ``requests`` tuple (costly to build
    in the simulator, so only routers that read it ask for it). ``needs_detail_with_migration``: the router reads
    it only for what a migration changes (requests that moved from where it placed them), so the simulator lists
    them only when a migration policy runs; a live snapshot always lists them.
    """

    name: ClassVar[str] = "base"
    needs_request_detail: ClassVar[bool] = False
    needs_detail_with_migration: ClassVar[bool] = False

    def route(self, request: RequestInfo, view: ClusterView) -> RouteResult:
        prefill = prefill_candidates(view)
        if not prefill:
            return Rejected("no healthy instance can run prefill")
        p = self.pick(request, prefill, view, phase="prefill")
        if not view.disaggregated:
            return RouteDecision(p.instance_id)
        decode = decode_candidates(view)
        if not decode:
            # Splitwise-style fallback: a MIXED-capable prefill instance decodes itself.
            if p.role.does_decode:
                return RouteDecision(p.instance_id, reason="no decode instance; colocated")
            return Rejected("no healthy instance can run decode")
        d = self.pick(request, decode, view, phase="decode")
        if d.instance_id == p.instance_id:
            return RouteDecision(p.instance_id)
        return RouteDecision(p.instance_id, d.instance_id)

    def pick(
        self, request: RequestInfo, candidates: tuple[InstanceSnapshot, ...], view: ClusterView, *, phase: str
    ) -> InstanceSnapshot:
        return min(candidates, key=lambda s: self.score(request, s, phase=phase))

    def score(self, request: RequestInfo, inst: InstanceSnapshot, *, phase: str) -> float:
        raise NotImplementedError

    # Optional hooks (no-ops by default).
    def initialize(self, config: ClusterConfig) -> None:
        """Bind the cluster config (latency models, SLOs); called once by the simulator / controller."""

    def on_routed(self, request: RequestInfo, decision: RouteDecision) -> None:
        return None

    def on_finished(self, request_id: str, instance_id: str) -> None:
        return None


class RoundRobinRouter(Router):
    name = "round_robin"

    def __init__(self) -> None:
        self._cursor: dict[str, int] = {}

    def pick(self, request, candidates, view, *, phase):  # type: ignore[override]
        i = self._cursor.get(phase, 0)
        self._cursor[phase] = i + 1
        return candidates[i % len(candidates)]


class RandomRouter(Router):
    name = "random"

    def __init__(self, seed: int = 0) -> None:
        self._rng = _random.Random(seed)

    def pick(self, request, candidates, view, *, phase):  # type: ignore[override]
        return candidates[self._rng.randrange(len(candidates))]


class LeastOutstandingRouter(Router):
    """Fewest running + waiting requests (the Ray Serve / Vidur default)."""

    name = "least_outstanding"

    def pick(self, request, candidates, view, *, phase):  # type: ignore[override]
        # A plain loop (not min() with a key): this is the simulator's hottest line at 64+ instances.
        best, best_v = candidates[0], candidates[0].num_running + candidates[0].num_waiting
        for s in candidates:
            v = s.num_running + s.num_waiting
            if v < best_v:  # ties: first in view order (deterministic)
                best, best_v = s, v
        return best

    def score(self, request, inst, *, phase):  # type: ignore[override]
        return inst.num_running + inst.num_waiting


# One registry, filled here; config picks by name; ``module:Class`` loads an out-of-tree router.
ROUTERS: dict[str, Callable[..., Router]] = {}


def register_router(cls: type[Router]) -> type[Router]:
    ROUTERS[cls.name] = cls
    return cls


for _cls in (RoundRobinRouter, RandomRouter, LeastOutstandingRouter):
    register_router(_cls)


def make_router(name: str, **params: object) -> Router:
    """Build a router by registry name (or ``package.module:Class``).

    Raises:
        ValueError: unknown name, or a parameter the router does not take (the message names both).
    """
    factory = router_class(name)
    check_router_params(name, factory, params)
    try:
        return factory(**params)
    except TypeError as e:  # a **kw router passes an unknown key down to a base class that refuses it
        if "unexpected keyword argument" not in str(e):
            raise
        raise ValueError(f"router {name!r}: {e}") from None


def router_class(name: str) -> Callable[..., Router]:
    """The factory a registry name or ``package.module:Class`` names (config validation reads it too).

    Raises:
        ValueError: an unknown name, or a ``module:Class`` that does not import (was a bare ImportError).
    """
    if ":" in name:
        import importlib

        mod, _, attr = name.partition(":")
        try:
            return getattr(importlib.import_module(mod), attr)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"router {name!r}: cannot load it as package.module:Class ({e})") from None
    _ensure_builtin_routers_loaded()
    try:
        return ROUTERS[name]
    except KeyError:
        raise ValueError(f"unknown router {name!r}; allowed: {', '.join(sorted(ROUTERS))}") from None


def router_takes(name: str, param: str) -> bool:
    """Whether the router ``name`` (registry name or ``package.module:Class``) names ``param`` in its signature."""
    import inspect

    factory = router_class(name)
    try:
        return param in inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return False


def check_router_params(name: str, factory: Callable[..., Router], params: dict[str, object]) -> None:
    """A config's ``policies.router.params`` key the router does not take is a config error, not a TypeError
    from deep inside the constructor."""
    import inspect

    try:
        sig = inspect.signature(factory)
    except (TypeError, ValueError):  # no introspectable signature: let the call decide
        return
    ps = sig.parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in ps):
        return
    allowed = sorted(p.name for p in ps if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise ValueError(f"router {name!r}: unknown parameter(s) {', '.join(unknown)}; "
                         f"allowed: {', '.join(allowed) or 'none'}")


def _ensure_builtin_routers_loaded() -> None:
    # Smart routers live in their own modules and register themselves on import.
    import importlib

    for mod in ("scheduler.policy.routers_smart",):
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:  # only tolerate the module itself being absent
            if e.name != mod:
                raise
