"""Named eligibility filters, kept apart from ranking so logs can say why an instance was skipped (Llumnix)."""

from __future__ import annotations

from scheduler.core.types import ClusterView, InstanceRole, InstanceSnapshot


def is_accepting(inst: InstanceSnapshot) -> bool:
    return inst.healthy and not inst.draining


def prefill_candidates(view: ClusterView) -> tuple[InstanceSnapshot, ...]:
    """Instances that may run a prompt: PREFILL, plus MIXED ones (Splitwise's mixed pool)."""
    # NOTE: inlined predicates: this runs once per routed request, over every instance, in the simulator.
    dec = InstanceRole.DECODE  # identity checks: Enum.__hash__ is slow in a set lookup
    return tuple([i for i in view.instances if i.role is not dec and i.healthy and not i.draining])


def decode_candidates(view: ClusterView) -> tuple[InstanceSnapshot, ...]:
    """DECODE instances; MIXED ones only when no DECODE instance is accepting."""
    dec = InstanceRole.DECODE
    return tuple([i for i in view.instances if i.role is dec and i.healthy and not i.draining]) or tuple(
        [i for i in view.instances if i.role is InstanceRole.MIXED and i.healthy and not i.draining]
    )
