"""A client's retry under the id of its own request still being cancelled (SDK audit, thirty-fourth session)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from scheduler.control.api import GenerateRequest, InvalidRequest, Unavailable
from scheduler.engine.base import SamplingParams, TokenChunk
from tests.test_ingress_audit import FakeInstance, _consume, _ingress, _until


def test_a_retry_while_its_old_stream_is_being_cancelled_is_unavailable_not_invalid(no_ray: None) -> None:
    """A client whose connection broke retries under the same request id (the SDK does, on UNAVAILABLE). The server
    cancels the old stream first (``Ingress.cancel``: each engine abort bounded at 2 s) and only then closes it, so
    the retry found the id in flight and got INVALID_ARGUMENT -- final, the request lost. A cancelled one answers
    UNAVAILABLE (retried); a live duplicate is still INVALID_ARGUMENT; once the old stream is gone the id is free."""
    inst = FakeInstance("mixed-0")
    release = asyncio.Event()

    async def slow_abort(rid: str, forget: bool = False) -> bool:
        await release.wait()  # an engine slow to abort: the old stream is held open meanwhile
        return await FakeInstance._abort(inst, rid, forget)

    def req() -> GenerateRequest:
        return GenerateRequest("r", prompt_token_ids=(1, 2, 3), sampling=SamplingParams(max_tokens=200))

    async def scenario() -> tuple[Any, Any, list[TokenChunk]]:
        ing = _ingress([inst])
        out: list[TokenChunk] = []
        first = asyncio.create_task(_consume(ing, req(), out))
        await _until(lambda: len(out) >= 3)
        with pytest.raises(InvalidRequest, match="already in flight"):  # a live duplicate: the caller's mistake
            await anext(ing.generate(req()))
        inst._abort = slow_abort  # type: ignore[method-assign]
        cancel = asyncio.create_task(ing.cancel("r"))  # what the server does when the client goes away
        await _until(lambda: ing.registry.get("r") is not None and ing.registry.get("r").cancelled)
        with pytest.raises(Unavailable, match="still being cancelled") as during:
            await anext(ing.generate(req()))
        release.set()
        await cancel
        await first
        retry: list[TokenChunk] = []
        await _consume(ing, GenerateRequest("r", prompt_token_ids=(1, 2, 3), sampling=SamplingParams(max_tokens=4)),
                       retry)
        return during.value, out, retry

    err, out, retry = asyncio.run(scenario())
    assert err.field == "request_id"
    assert out[-1].finish_reason == "abort"
    assert retry[-1].finish_reason == "length" and sum(len(c.token_ids) for c in retry) == 4
