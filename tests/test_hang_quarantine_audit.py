"""Regressions from an audit of the query-of-death quarantine together with the hang watchdog. Each failed before
its fix.

One Ray cluster and one deployment (3 MIXED simulated instances, ``hang_timeout_s`` 10, its minimum; test_faults_hang_audit's
``hang_deployment``) for the module; the engine stall is patched into each instance's simulated engine inside its
actor (``__ray_call__``)."""

from __future__ import annotations

import types
from collections.abc import Iterator
from typing import Any

import pytest

ray = pytest.importorskip("ray")

from tests.test_control_plane import _collect, _req
from tests.test_faults_hang_audit import HANG_S, hang_config, hang_deployment


@pytest.fixture(scope="module")
def hangq(local_ray: Any, aloop: Any) -> Iterator[tuple[Any, Any]]:
    with hang_deployment(aloop, hang_config("hangq", 3), quarantine_after=2, max_recoveries=3) as dep_ing:
        yield dep_ing


def _stalls_while_decoding(inst: Any, rid: str = "qod-hang") -> None:
    """Make the instance's simulated engine stall while ``rid`` decodes there: its steps go on (stats and polls
    answer) but make no progress -- a request that hangs a kernel, say."""
    engine = inst._backend.engine
    real = engine.step

    def step(*a: Any, **kw: Any) -> Any:
        if rid in engine.decoding:
            return types.SimpleNamespace(duration_s=0.05, finished=(), emitted=())
        return real(*a, **kw)

    engine.step = step


def test_a_request_that_hangs_every_engine_it_runs_on_is_quarantined(hangq: Any, aloop: Any) -> None:
    """The watchdog marked each hung instance unhealthy and the Controller released it; the request's stream then
    ended "released", which the ingress took for a scale-down's release, so the quarantine never counted the hung
    engines: the request was recovered max_recoveries times (and retried twice by the SDK on its UNAVAILABLE),
    hanging an engine for hang_timeout_s each time. Released as hung, the engine counts as failed under it: after
    ``quarantine_after`` (2) hung engines it ends ``RequestFailed``."""
    from scheduler.control.api import RequestFailed

    dep, ing = hangq
    for m in ray.get(dep.controller.members.remote()).values():
        ray.get(m.handle.__ray_call__.remote(_stalls_while_decoding))
    q0 = ing.counters.get("quarantined", 0)
    with pytest.raises(RequestFailed, match="failed 2 engines"):
        aloop.run(_collect(ing, _req("qod-hang", 64, 200)), timeout=8 * HANG_S + 30)
    assert ing.counters["quarantined"] == q0 + 1


def test_a_hung_instance_released_as_broken_ends_its_streams_without_its_engine(no_ray: None) -> None:
    """The release of a hung instance ended its streams through the engine's abort -- which a hung vLLM engine
    never answers (the abort drops the request's saved KV by a call into the engine core) --, so ``shutdown`` hung
    on the first stream until the Controller killed the actor 5 s in, and each stream's end was an actor death to
    the ingress: a hung engine the quarantine did not count. Released as broken, the instance ends them itself."""
    import asyncio

    from bench.loadgen import cluster_config
    from scheduler.control.instance import ENGINE_FAILED, Instance
    from scheduler.engine.base import EngineRequest, SamplingParams

    cfg = cluster_config("hung-abort", mixed=1)
    pool = cfg.pools[0]

    async def scenario() -> Any:
        inst = Instance("mixed-0", pool, cfg.model, cfg.gpus[pool.gpu], backend_kwargs={"time_scale": 0.5})
        await inst.start()
        _stalls_while_decoding(inst, "r")

        async def hangs(request_id: str) -> None:
            await asyncio.sleep(3600)

        real_abort = inst._backend.abort  # type: ignore[union-attr]
        inst._backend.abort = hangs  # type: ignore[union-attr]
        await inst.submit(EngineRequest("r", tuple(range(1, 65)), SamplingParams(max_tokens=50)))
        poll = asyncio.create_task(inst.poll("r", 10.0, 1))
        await asyncio.sleep(0.2)
        try:
            await asyncio.wait_for(inst.shutdown(broken="hung: test"), 4.0)  # the Controller waits 5 s
        except TimeoutError:
            pass
        try:
            return await asyncio.wait_for(poll, 1.0)
        finally:  # what the kill would end
            inst._backend.abort = real_abort  # type: ignore[union-attr]
            await inst.shutdown()

    end = asyncio.run(asyncio.wait_for(scenario(), 20))
    assert end.finished and end.finish_reason.startswith(ENGINE_FAILED), end
