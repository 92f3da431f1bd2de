"""``Ingress.close`` is bounded: a background task that does not honour cancellation (a poll stuck on a Ray
reply whose cancellation never lands) must not hang shutdown. Pure asyncio; no Ray cluster."""

from __future__ import annotations

import asyncio
import time

from scheduler.config.load import load_config
from scheduler.control.ingress import Ingress


def test_close_returns_within_its_timeout_when_a_task_ignores_cancellation() -> None:
    ing = Ingress(load_config("default"), controller=None)

    async def scenario() -> tuple[float, bool]:
        stop = asyncio.Event()

        async def stubborn() -> None:
            while not stop.is_set():
                try:
                    await asyncio.sleep(0.02)
                except asyncio.CancelledError:
                    continue  # swallowed, as a stuck await would

        task = asyncio.create_task(stubborn())
        polite = asyncio.create_task(asyncio.sleep(60))
        await asyncio.sleep(0)
        ing._tasks = [task, polite]
        t0 = time.perf_counter()
        await ing.close(timeout_s=0.2)
        elapsed = time.perf_counter() - t0
        stop.set()
        await task
        return elapsed, polite.cancelled()

    elapsed, polite_cancelled = asyncio.run(scenario())
    assert 0.15 <= elapsed < 2.0
    assert polite_cancelled and ing._tasks == []
