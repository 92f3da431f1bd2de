"""``llmsched serve``'s default in-flight limit (``InflightLimiter.for_config``: the engines' batch slots) follows
the instances serving now. It was sized once from ``pools[].count`` at start: an autoscaled pool of one 256-slot
instance scaled to four still admitted 256 requests in all (the rest RESOURCE_EXHAUSTED at the door)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import pytest

from scheduler.config.load import load_config
from scheduler.control.api import Overloaded
from scheduler.core.types import InstanceRole, InstanceSnapshot
from scheduler.serve import _follow_cluster
from scheduler.server.admission import InflightLimiter, cluster_slots

CFG = load_config("deploy/examples/cpu-pd.yaml")  # one PREFILL pool and one DECODE pool


def _prefill(i: int, **kw) -> InstanceSnapshot:
    pool = next(p for p in CFG.pools if p.role is InstanceRole.PREFILL)
    return InstanceSnapshot(f"prefill-{i}", InstanceRole.PREFILL, gpu=pool.gpu, tp=pool.tp, **kw)


def _decode(i: int) -> InstanceSnapshot:
    pool = next(p for p in CFG.pools if p.role is InstanceRole.DECODE)
    return InstanceSnapshot(f"decode-{i}", InstanceRole.DECODE, gpu=pool.gpu, tp=pool.tp)


def test_cluster_slots_count_the_accepting_instances_that_take_new_requests() -> None:
    seqs = next(p for p in CFG.pools if p.role is InstanceRole.PREFILL).engine.max_num_seqs
    assert cluster_slots(CFG, []) is None  # nothing listed yet: keep the configured size
    assert cluster_slots(CFG, [_prefill(0), _decode(0)]) == seqs  # a DECODE instance takes no new prompts
    assert cluster_slots(CFG, [_prefill(i) for i in range(4)] + [_decode(0)]) == 4 * seqs
    assert cluster_slots(CFG, [_prefill(0), _prefill(1, draining=True), _prefill(2, healthy=False)]) == seqs


def test_resize_turns_new_requests_away_only() -> None:
    lim = InflightLimiter.for_config(CFG)
    assert lim.follows_cluster and not InflightLimiter().follows_cluster
    lim.resize(2)
    held = [lim.acquire(0), lim.acquire(0)]
    with pytest.raises(Overloaded):
        lim.acquire(0)
    lim.resize(1)  # smaller than what is admitted: those keep their slots
    assert lim.in_flight == 2
    held[0].release()
    held[1].release()
    lim.acquire(0)


@dataclass
class _State:
    instances: tuple[InstanceSnapshot, ...]


class _Ingress:
    def __init__(self) -> None:
        self.instances: tuple[InstanceSnapshot, ...] = (_prefill(0), _decode(0))

    async def cluster_state(self) -> _State:
        return _State(self.instances)


def test_serve_resizes_the_limit_as_the_cluster_scales() -> None:
    seqs = next(p for p in CFG.pools if p.role is InstanceRole.PREFILL).engine.max_num_seqs

    async def scenario() -> list[int]:
        ing, lim = _Ingress(), InflightLimiter.for_config(CFG)
        task = asyncio.create_task(_follow_cluster(ing, CFG, lim, every_s=0.01))
        seen = []
        for n in (4, 2):
            ing.instances = tuple(_prefill(i) for i in range(n)) + (_decode(0),)  # scaled to n prefill instances
            await asyncio.sleep(0.05)
            seen.append(lim.max_total)
        task.cancel()
        return seen

    assert asyncio.run(scenario()) == [4 * seqs, 2 * seqs]
