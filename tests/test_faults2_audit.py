"""Regressions from the second audit of live fault handling (engines that fail mid-stream, instances that never
finish starting, admin drains of a blocked instance, cancels on a failed engine). Each test failed before its fix.
No Ray: real ``Instance`` objects over the simulated backend behind in-process handles (``tests/test_chaos.py``),
and the Controller fakes of ``tests/test_controller_audit.py``."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from scheduler.control.api import GenerateRequest
from scheduler.engine.base import EngineRequest, SamplingParams, TokenChunk
from tests.test_faults_audit import _crash_after
from tests.test_ingress_audit import _consume


@pytest.fixture(autouse=True)
def no_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    """``Instance`` objects in this process without starting a Ray node (``get_runtime_context`` would)."""
    import ray

    def no_runtime() -> Any:
        raise RuntimeError("no Ray in this test")

    monkeypatch.setattr(ray, "get_runtime_context", no_runtime)


async def _cluster(name: str, n: int, time_scale: float, **ingress_kw: Any) -> tuple[dict[str, Any], Any]:
    """``n`` MIXED simulated instances and an ingress over them (in-process handles, direct channels)."""
    from bench.loadgen import cluster_config
    from scheduler.control.controller import Member
    from scheduler.control.ingress import Ingress
    from scheduler.control.instance import Instance
    from tests.test_chaos import _Controller, _Handle

    cfg = cluster_config(name, mixed=n)
    pool = cfg.pools[0]
    insts = {
        f"mixed-{k}": Instance(
            f"mixed-{k}", pool, cfg.model, cfg.gpus[pool.gpu], backend_kwargs={"time_scale": time_scale}
        )
        for k in range(n)
    }
    members = {iid: Member(_Handle(i), await i.start()) for iid, i in insts.items()}
    ing = Ingress(cfg, _Handle(_Controller(members)), refresh_s=0.01, **ingress_kw)
    await ing.start()
    return insts, ing


async def _teardown(insts: dict[str, Any], ing: Any) -> None:
    await ing.close()
    for i in insts.values():
        await i.shutdown()


# ---- 1: an engine that fails mid-stream ------------------------------------------------------------------------------
def test_a_stream_whose_engine_fails_continues_elsewhere() -> None:
    """A stream whose instance's engine failed under it ended ``error: engine failed: ...`` (FAILED at the client),
    while a dead, released or hung instance's streams are re-prefilled elsewhere -- though the failed instance is
    released and replaced all the same. It must continue on the other instance at the next index, each index once,
    with the tokens the request's context gives (the simulated token is a function of (seed, request, index))."""
    from scheduler.engine.simulated_backend import sim_token

    vocab = 0

    async def scenario() -> tuple[list[TokenChunk], int]:
        nonlocal vocab
        insts, ing = await _cluster("engine-fails", 2, 1.0)
        vocab = ing.config.model.vocab_size
        out: list[TokenChunk] = []
        try:
            req = GenerateRequest(
                "ef", prompt="hello", sampling=SamplingParams(max_tokens=60, ignore_eos=True)
            )
            task = asyncio.create_task(_consume(ing, req, out))
            while sum(len(c.token_ids) for c in out) < 5:
                await asyncio.sleep(0.005)
            _crash_after(insts[ing.registry.get("ef").instances[0]], 1)
            await asyncio.wait_for(task, 20)
            return out, ing.counters["recoveries"]
        finally:
            await _teardown(insts, ing)

    out, recoveries = asyncio.run(asyncio.wait_for(scenario(), 40))
    assert out[-1].finish_reason == "length", out[-1]
    assert [c.index + k for c in out for k in range(len(c.token_ids))] == list(range(60))
    assert [t for c in out for t in c.token_ids] == [sim_token(0, "ef", i, vocab) for i in range(60)]
    assert recoveries == 1
    assert len({c.instance_id for c in out if c.token_ids}) == 2


class _RaisingBackend:
    """A backend whose stream raises mid-way (as vLLM's output handler raises ``EngineDeadError`` into every stream
    of a dead engine core, or a request-level error into one), with ``stats`` failing or not."""

    def __init__(self, engine_dead: bool) -> None:
        self.engine_dead = engine_dead

    async def generate(self, request: EngineRequest) -> Any:
        yield TokenChunk(request.request_id, 0, (7,))
        raise RuntimeError(
            "EngineCore encountered an issue" if self.engine_dead else "bad logits for this request"
        )

    async def stats(self) -> Any:
        if self.engine_dead:
            raise RuntimeError("EngineDeadError")
        from scheduler.engine.base import EngineStats

        return EngineStats(0, 0, 0, 100, 16)

    async def abort(self, request_id: str) -> None:
        return None

    async def shutdown(self) -> None:
        return None


@pytest.mark.parametrize("engine_dead", [True, False])
def test_a_stream_that_raises_says_whether_its_engine_failed(engine_dead: bool) -> None:
    """The vLLM path: the engine's stream raises. With the engine dead (its stats raise) the stream's end must say
    so (``ENGINE_FAILED``: the ingress recovers it); a request's own error on a live engine stays a plain ``error:``
    (final: re-running a request that fails by itself elsewhere helps nobody)."""
    from bench.loadgen import cluster_config
    from scheduler.control.instance import ENGINE_FAILED, Instance

    cfg = cluster_config("raising", mixed=1)
    pool = cfg.pools[0]

    async def scenario() -> str | None:
        inst = Instance("mixed-0", pool, cfg.model, cfg.gpus[pool.gpu])
        inst._backend = _RaisingBackend(engine_dead)
        sub = await inst.submit(EngineRequest("r", (1, 2, 3), SamplingParams(max_tokens=8)))
        out = list(sub.chunks)
        while not out[-1].finished:
            out.append(await inst.poll("r", 1.0, 1))
        return out[-1].finish_reason

    reason = asyncio.run(asyncio.wait_for(scenario(), 10))
    assert reason is not None and reason.startswith("error:")
    assert reason.startswith(ENGINE_FAILED) is engine_dead, reason
