"""``_Ahead``: a request's stream polled from its instances ahead of its consumer (the gRPC/HTTP client), into a
buffer the consumer reads from, merged per read as vLLM's per-request output collector does."""

from __future__ import annotations

import asyncio
import collections
import dataclasses
from collections.abc import AsyncIterator
from typing import Any

from scheduler.control.instance import merge_chunks
from scheduler.engine.base import TokenChunk


class _Ahead:
    """A request's chunks, polled from its instances by a task of their own rather than at its consumer's pace, into a
    buffer the consumer reads from. Polled only when the gRPC/HTTP client pulled, a client that stopped reading (flow
    control, a slow reader, a debugger) stopped renewing the instance's poll lease: past ``lease_s`` the instance
    reaped the stream and the request was re-prefilled elsewhere (UNAVAILABLE at the fourth pause); and an instance
    released under it (scale-down, drain) handed its ``released`` end over only for ``SHUTDOWN_HANDOVER_S``: missed,
    the kill read as an actor death, counted toward the request's quarantine. As vLLM's per-request output collector,
    a read takes everything one instance made since the last read, merged into one chunk; the buffer holds at most the
    request's output (its ``max_tokens``), which ``rec`` keeps anyway. Errors reach the consumer in order, after the
    chunks before them."""

    _END = object()

    def __init__(self, source: AsyncIterator[TokenChunk]) -> None:
        self._source = source
        self._items: collections.deque[Any] = collections.deque()  # chunks, then an exception or _END
        self._ready = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def __aiter__(self) -> _Ahead:
        return self

    async def __anext__(self) -> TokenChunk:
        if self._task is None:  # started by the first read: in the consumer's loop and (tracing) context
            self._task = asyncio.create_task(self._pump())
        while not self._items:
            self._ready.clear()
            await self._ready.wait()
        item = self._items[0]
        if item is self._END:
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            raise item
        # What one instance made since the last read, as one chunk: merged once per read, not at each poll (merging
        # each poll's chunk into the backlog copied all of it every time: quadratic over a long pause).
        run = [self._items.popleft()]
        while self._items and _follows(run[-1], self._items[0]):
            run.append(self._items.popleft())
        return item if len(run) == 1 else dataclasses.replace(merge_chunks(run), instance_id=item.instance_id)

    async def _pump(self) -> None:
        try:
            async for chunk in self._source:
                self._items.append(chunk)
                self._ready.set()
            self._items.append(self._END)
        except BaseException as e:
            # The consumer's to raise, after the chunks before it; a CancelledError too (only ``cancel`` below means
            # this task's own, and then nobody reads): one from an await inside the polls ended the stream as before.
            self._items.append(e)
            if not isinstance(e, Exception):
                raise
        finally:
            self._ready.set()

    def cancel(self) -> None:
        """Stop polling (the consumer left, or read the end). Not awaited: ``generate``'s clean-up after it must run
        even if its task is cancelled again meanwhile (a registry entry and the engines' aborts were left behind)."""
        if self._task is not None:
            self._task.cancel()


def _follows(chunk: TokenChunk, nxt: Any) -> bool:
    """Whether ``nxt`` continues ``chunk`` on the same instance (the two merge into one chunk)."""
    return (
        isinstance(nxt, TokenChunk)
        and not chunk.finished
        and nxt.instance_id == chunk.instance_id
        and nxt.index == chunk.index + len(chunk.token_ids)
    )
