"""What a vLLM engine's prefix cache holds, in llmsched's prompt block ids, from vLLM's KV cache events.

vLLM publishes a ``BlockStored`` event when a full KV block enters its prefix cache (with the block's token ids and
its parent block's hash) and ``BlockRemoved`` when one is evicted (``KVEventsConfig``, ZMQ PUB; the interface
llm-d's and Dynamo's KV-aware routers read). ``PrefixIndex`` folds them into the ids ``prompt_hash_ids`` computes
for a prompt (one per 512 tokens, chained), so a vLLM instance's snapshot lists its cache
(``InstanceSnapshot.cached_hash_ids``) as the simulated engines do, and ``prefix_affinity``, ``lookahead`` and
``learned`` read the engine's own cache rather than a guess from where they sent each prefix.

An id is listed while every vLLM block under its 512 tokens is cached (the block ending on its boundary stands
for them: vLLM evicts a chain's tail first, and a block is only cached after its parent). A prompt's partial last
id (fewer than 512 tokens) is never listed: the routers' hit counts at most its full ids -- short of vLLM's own
hit by under 512 tokens. Events lost (a gap in the publisher's sequence numbers) make the index unknown for good
(``cached`` is ``None``, as for an engine without events), never wrong.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from scheduler.core.prefix import HASH_BLOCK_TOKENS

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Block:
    parent: Any  # vLLM hash of the previous block (None: the first block of a sequence)
    tokens: tuple[int, ...]
    end: int  # tokens from the sequence's start to this block's end
    last_id: int  # llmsched id of the last 512-token boundary at or before ``end`` (0: none yet)
    own_id: int | None  # the id this block completes (its end is a boundary), else None


class PrefixIndex:
    """vLLM blocks (by vLLM's hash) -> llmsched prompt block ids cached on the engine (module docstring).

    Args:
        block_tokens: tokens per llmsched id (``HASH_BLOCK_TOKENS``); a vLLM block size must divide it.
    """

    def __init__(self, block_tokens: int = HASH_BLOCK_TOKENS) -> None:
        self.block_tokens = block_tokens
        self._blocks: dict[Any, _Block] = {}
        self._ids: dict[int, int] = {}  # id -> vLLM blocks completing it (the same prefix stored twice: 2)
        self._cached: frozenset[int] | None = frozenset()
        self._next_seq = 0  # batches are numbered from 0; the subscriber connects before the first request
        self.lost = False  # events were missed: ``cached`` is None from then on

    @property
    def cached(self) -> frozenset[int] | None:
        """The ids resident now; ``None`` once the index cannot tell (events lost, an unsupported block size)."""
        if self.lost:
            return None
        if self._cached is None:
            self._cached = frozenset(self._ids)
        return self._cached

    def on_batch(self, seq: int, events: Iterable[Any]) -> None:
        """Apply one published batch (``seq``: the publisher's sequence number, consecutive from 0)."""
        if seq != self._next_seq:
            log.warning("vLLM KV events: batch %d after %d (events lost); the prefix cache is unknown from now on",
                        seq, self._next_seq - 1)
            self.lost = True
        self._next_seq = seq + 1
        if self.lost:
            return
        for e in events:
            kind = type(e).__name__
            if kind == "BlockStored":
                self.stored(e.block_hashes, e.parent_block_hash, e.token_ids, e.block_size)
            elif kind == "BlockRemoved":
                self.removed(e.block_hashes)
            elif kind == "AllBlocksCleared":
                self.clear()

    def stored(self, hashes: list[Any], parent: Any, token_ids: list[int], block_size: int) -> None:
        """Blocks ``hashes`` (a chain, in order, after ``parent``) entered the cache with ``token_ids``."""
        if block_size <= 0 or self.block_tokens % block_size:
            log.warning("vLLM KV events: block size %d does not divide %d; the prefix cache is unknown",
                        block_size, self.block_tokens)
            self.lost = True
            return
        prev = self._blocks.get(parent) if parent is not None else None
        if parent is not None and prev is None:
            return  # its parent is not known (evicted meanwhile): nothing under it can be named
        for k, h in enumerate(hashes):
            tokens = tuple(token_ids[k * block_size : (k + 1) * block_size])
            if len(tokens) < block_size:
                break  # only full blocks are cached
            end = (prev.end if prev is not None else 0) + block_size
            last_id = prev.own_id if prev is not None and prev.own_id is not None else (
                prev.last_id if prev is not None else 0)
            own_id = None
            chunk = self._chunk(tokens, prev) if end % self.block_tokens == 0 else None
            if chunk is not None:
                own_id = hash((last_id, hash(chunk)))  # as ``prompt_hash_ids``
                self._ids[own_id] = self._ids.get(own_id, 0) + 1
                self._cached = None
                last_id = own_id
            block = _Block(parent, tokens, end, last_id, own_id)
            old = self._blocks.get(h)
            if old is not None:
                self._drop(old)  # stored again (vLLM re-caches a hash it evicted): one entry
            self._blocks[h] = block
            prev, parent = block, h

    def removed(self, hashes: Iterable[Any]) -> None:
        for h in hashes:
            block = self._blocks.pop(h, None)
            if block is not None:
                self._drop(block)

    def clear(self) -> None:
        self._blocks.clear()
        self._ids.clear()
        self._cached = None

    def _drop(self, block: _Block) -> None:
        if block.own_id is None:
            return
        n = self._ids.get(block.own_id, 0) - 1
        if n > 0:
            self._ids[block.own_id] = n
        else:
            self._ids.pop(block.own_id, None)
        self._cached = None

    def _chunk(self, tokens: tuple[int, ...], prev: _Block | None) -> tuple[int, ...] | None:
        """The 512 tokens ending with ``tokens``: this block's and its ancestors' back to the last boundary
        (``None`` if one of them is no longer known: no id is named from part of its tokens)."""
        parts = [tokens]
        need = self.block_tokens - len(tokens)
        while need > 0 and prev is not None:
            parts.append(prev.tokens)
            need -= len(prev.tokens)
            prev = self._blocks.get(prev.parent) if prev.parent is not None else None
        if need:
            return None
        return tuple(t for part in reversed(parts) for t in part)


def subscribe(endpoint: str) -> Any:
    """A ZMQ SUB socket on a vLLM engine's KV events at ``endpoint`` (connected now: a PUB socket drops what it
    publishes before a subscriber is there)."""
    import zmq
    import zmq.asyncio

    sock = zmq.asyncio.Context.instance().socket(zmq.SUB)
    sock.setsockopt(zmq.SUBSCRIBE, b"")
    sock.connect(endpoint)
    return sock


async def follow(sock: Any, index: PrefixIndex, on_change: Callable[[], None]) -> None:
    """Apply the KV event batches arriving on ``sock`` (``subscribe``) to ``index`` until cancelled; closes it."""
    import msgspec
    from vllm.distributed.kv_events import KVEventBatch

    decode = msgspec.msgpack.Decoder(type=KVEventBatch).decode
    try:
        while True:
            _topic, seq, payload = await sock.recv_multipart()
            index.on_batch(int.from_bytes(seq, "big"), decode(payload).events)
            on_change()
    except asyncio.CancelledError:
        raise
    except Exception:  # the index must not take the engine down: the cache becomes unknown instead
        log.exception("vLLM KV events: the subscriber failed; the prefix cache is unknown from now on")
        index.lost = True
        on_change()
    finally:
        with contextlib.suppress(Exception):
            sock.close(linger=0)


__all__ = ["PrefixIndex", "follow", "subscribe"]
