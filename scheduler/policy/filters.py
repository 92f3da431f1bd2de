"""Named eligibility filters, kept apart from ranking so logs can say why an instance was skipped (Llumnix)."""

from __future__ import annotations

from scheduler.core.types import ClusterView, InstanceRole, InstanceSnapshot


def is_accepting(inst: InstanceSnapshot) -> bool:
    return inst.healthy and not inst.draining


def prefill_candidates(view: ClusterView) -> tuple[InstanceSnapshot, ...]:
    """Instances that may run a prompt: PREFILL, plus MIXED ones (Splitwise's mixed pool)."""
    return tuple(i for i in view.instances if i.role.does_prefill and is_accepting(i))


def decode_candidates(view: ClusterView) -> tuple[InstanceSnapshot, ...]:
    return tuple(i for i in view.instances if i.role is InstanceRole.DECODE and is_accepting(i)) or tuple(
        i for i in view.instances if i.role is InstanceRole.MIXED and is_accepting(i)
    )
