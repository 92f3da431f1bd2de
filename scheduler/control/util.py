"""Small helpers the Controller, the Ingress and their mixins share."""

from __future__ import annotations

from typing import Any


async def _await(ref: Any) -> Any:
    return await ref


def _index_of(instance_id: str) -> int | None:
    tail = instance_id.rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else None
