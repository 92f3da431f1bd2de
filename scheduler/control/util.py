"""Small helpers the Controller, the Ingress and their mixins share."""

from __future__ import annotations

from typing import Any


async def _await(ref: Any) -> Any:
    return await ref


def _pool_of(instance_id: str) -> str:
    """The pool an instance id names (``<pool>-<n>``): for instances still being created, with no member yet."""
    return instance_id.rsplit("-", 1)[0]


def _index_of(instance_id: str) -> int | None:
    tail = instance_id.rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else None
