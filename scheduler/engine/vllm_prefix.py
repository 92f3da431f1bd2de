"""What a vLLM engine's prefix cache holds, in llmsched's prompt block ids, from vLLM's KV cache events.

vLLM publishes a ``BlockStored`` event when a full KV block enters its prefix cache (with the block's token ids and
its parent block's hash) and ``BlockRemoved`` when one is evicted (``KVEventsConfig``, ZMQ PUB; the interface
llm-d's and Dynamo's KV-aware routers read). ``PrefixIndex`` folds them into the ids ``prompt_hash_ids`` computes
for a prompt (one per 512 tokens, chained), so a vLLM instance's snapshot lists its cache
(``InstanceSnapshot.cached_hash_ids``) as the simulated engines do, and ``prefix_affinity``, ``lookahead`` and
``learned`` read the engine's own cache rather than a guess from where they sent each prefix.

An id is listed while every vLLM block under its 512 tokens is cached (the block ending on its boundary stands
for them: vLLM evicts a chain's tail first, and a block is only cached after its parent). A prompt's partial last
id (fewer than 512 tokens) names tokens that no event shows whole (vLLM caches full blocks of its own size only),
so the engine tells the index each prompt it is given (``note_prompt``): that id is listed while the prompt's
blocks up to its last one vLLM would reuse are cached (vLLM's hit on a repeat is ``(P - 1) // block * block``
tokens), as the simulated engines list a computed prompt's last id -- a repeated prompt reads as a full hit.
Batches not received (published before the subscription took, or a gap in the publisher's sequence numbers)
are asked again from vLLM's replay buffer (``KVEventsConfig.replay_endpoint``, ``follow``) and applied in
order, those already applied skipped. Those it cannot give (overrun, no answer) make the index unknown
(``cached`` is ``None``, as for an engine without events), never wrong, until a later replay brings them or
vLLM empties its cache (``AllBlocksCleared``: ``reset_prefix_cache``), after which every block is known again.
A model with several KV cache groups (hybrid attention: vLLM's hit is what every group holds) is unknown for
good, and blocks hashed with extra keys (LoRA, cache salt, multimodal inputs) name nothing: a plain prompt of
the same tokens would not hit them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from scheduler.core.prefix import HASH_BLOCK_TOKENS, prompt_hash_ids

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Block:
    parent: Any  # vLLM hash of the previous block (None: the first block of a sequence)
    tokens: tuple[int, ...]
    end: int  # tokens from the sequence's start to this block's end
    last_id: int  # llmsched id of the last 512-token boundary at or before ``end`` (0: none yet)
    own_id: int | None  # the id this block completes (its end is a boundary), else None
    # The blocks since the last boundary chained onto its id (``_run``): what ``note_prompt`` anchors a prompt's
    # partial last id to. O(1) per block, where hashing the tokens since the boundary was O(512) per block.
    run: int


class PrefixIndex:
    """vLLM blocks (by vLLM's hash) -> llmsched prompt block ids cached on the engine (module docstring).

    Args:
        block_tokens: tokens per llmsched id (``HASH_BLOCK_TOKENS``); a vLLM block size must divide it.
        kv_block: vLLM's block size (``None``: taken from the first ``BlockStored``), for ``note_prompt``.
    """

    def __init__(self, block_tokens: int = HASH_BLOCK_TOKENS, kv_block: int | None = None) -> None:
        self.block_tokens = block_tokens
        self.kv_block = kv_block
        self._blocks: dict[Any, _Block] = {}
        self._ids: dict[int, int] = {}  # id -> vLLM blocks completing it (the same prefix stored twice: 2)
        self._runs: dict[int, int] = {}  # ``_Block.run`` -> blocks with it
        # A noted prompt's partial last id -> its anchor (the ``run`` of its last block vLLM reuses, or the id
        # before it when that block ends on a boundary); the oldest forgotten past ``_partials_cap``.
        self._partials: OrderedDict[int, int] = OrderedDict()
        self._cached: frozenset[int] | None = frozenset()
        self._next_seq = 0  # batches are numbered from 0
        # Batches from ``next_seq`` on were missed (a later one came): ``cached`` is None until they are
        # applied (replayed) or vLLM empties its cache; the batches after them are not applied meanwhile.
        self.behind = False
        self.lost = False  # events could not be followed: ``cached`` is None until vLLM empties its cache
        self._group: int | None = None  # the KV cache group the events are about (vLLM's ``group_idx``)
        self.hybrid = False  # events of a second group came: ``cached`` is None for good

    @property
    def cached(self) -> frozenset[int] | None:
        """The ids resident now; ``None`` once the index cannot tell (events lost, an unsupported block size)."""
        if self.lost or self.behind or self.hybrid:
            return None
        if self._cached is None:
            runs, ids = self._runs, self._ids
            self._cached = frozenset(ids).union(p for p, a in self._partials.items() if a in runs or a in ids)
        return self._cached

    def note_prompt(self, token_ids: Sequence[int]) -> None:
        """The engine was given a prompt of ``token_ids``: its partial last id (if any) is listed from now on while
        vLLM holds the blocks a repeat of it would reuse (module docstring)."""
        bt, kvb, n = self.block_tokens, self.kv_block, len(token_ids)
        if not kvb or n % bt == 0:
            return  # no partial id (or vLLM's block size not known yet: nothing to anchor it to)
        reused = (n - 1) // kvb * kvb  # vLLM recomputes the last token: a repeat reuses its blocks up to here
        if reused == 0:
            return  # a repeat reuses nothing
        ids = prompt_hash_ids(token_ids, bt)
        start = n // bt * bt  # the partial id's first token
        anchor = ids[-2] if len(ids) > 1 else 0
        for pos in range(start, reused, kvb):
            anchor = _run(anchor, tuple(token_ids[pos : pos + kvb]))
        self._partials.pop(ids[-1], None)
        self._partials[ids[-1]] = anchor  # the most recent last: forgotten last
        while len(self._partials) > self._partials_cap():
            self._partials.popitem(last=False)
        self._cached = None

    def _partials_cap(self) -> int:
        # A partial id is listed only while its anchor block is cached: a few per cached block at most matter.
        return max(1024, 2 * len(self._blocks))

    @property
    def next_seq(self) -> int:
        """The sequence number of the first batch not applied: where a replay should start."""
        return self._next_seq

    def on_batch(self, seq: int, events: Iterable[Any]) -> None:
        """Apply one published batch (``seq``: the publisher's sequence number, consecutive from 0). One
        applied already (replayed, then received live) is skipped; one after a gap makes the index ``behind``
        until the missing ones come."""
        if seq < self._next_seq:
            return
        if seq == self._next_seq:
            if self.behind:
                log.info("vLLM KV events: the missed batches came; following the prefix cache again")
            self.behind = False
            self._next_seq = seq + 1
        elif not self.behind:
            log.warning("vLLM KV events: batch %d after %d (events lost); the prefix cache is unknown until"
                        " they are replayed or vLLM empties it", seq, self._next_seq - 1)
            self.behind = True
        for e in events:
            kind = type(e).__name__
            if kind == "AllBlocksCleared":
                # vLLM's cache is empty now (``reset_prefix_cache``): known again whatever was missed before, and
                # the events after it tell the rest (a block size we cannot follow gives up again at its next store).
                if self.lost or self.behind:
                    log.info("vLLM KV events: the prefix cache was emptied; following it again")
                self.lost = self.behind = False
                self._next_seq = seq + 1  # the batches missed before it no longer matter
                self.clear()
            elif self.lost or self.behind or not self._follows(getattr(e, "group_idx", None)):
                continue
            elif kind == "BlockStored":
                self.stored(e.block_hashes, e.parent_block_hash, e.token_ids, e.block_size,
                            getattr(e, "extra_keys", None))
            elif kind == "BlockRemoved":
                self.removed(e.block_hashes)

    def _follows(self, group: int | None) -> bool:
        """Whether an event of KV cache group ``group`` is followed: the first group seen; a second one means a
        hybrid model, whose hits one group's blocks cannot tell."""
        if group is None or group == self._group:
            return True
        if self._group is None:
            self._group = group
            return True
        if not self.hybrid:
            log.warning("vLLM KV events: KV cache groups %d and %d (a hybrid model); the prefix cache is unknown",
                        self._group, group)
            self.hybrid = True
        return False

    def stored(self, hashes: list[Any], parent: Any, token_ids: list[int], block_size: int,
               extra_keys: list[Any] | None = None) -> None:
        """Blocks ``hashes`` (a chain, in order, after ``parent``) entered the cache with ``token_ids``;
        ``extra_keys``: per block, what else vLLM hashed into it (LoRA, cache salt, multimodal input; ``None``:
        nothing)."""
        if block_size <= 0 or self.block_tokens % block_size:
            log.warning("vLLM KV events: block size %d does not divide %d; the prefix cache is unknown",
                        block_size, self.block_tokens)
            self.lost = True
            return
        if self.kv_block is None:
            self.kv_block = block_size
        prev = self._blocks.get(parent) if parent is not None else None
        if parent is not None and prev is None:
            return  # its parent is not known (evicted meanwhile): nothing under it can be named
        for k, h in enumerate(hashes):
            tokens = tuple(token_ids[k * block_size : (k + 1) * block_size])
            if len(tokens) < block_size:
                break  # only full blocks are cached
            if extra_keys and extra_keys[k]:
                break  # hashed with more than its tokens: no prompt id names it (nor, unknown parent, its children)
            end = (prev.end if prev is not None else 0) + block_size
            last_id = prev.own_id if prev is not None and prev.own_id is not None else (
                prev.last_id if prev is not None else 0)
            run = _run(prev.run if prev is not None and prev.end % self.block_tokens else last_id, tokens)
            self._runs[run] = self._runs.get(run, 0) + 1
            if self._partials:
                self._cached = None  # a noted prompt's anchor may be this block
            own_id = None
            chunk = self._chunk(tokens, prev) if end % self.block_tokens == 0 else None
            if chunk is not None:
                own_id = hash((last_id, hash(chunk)))  # as ``prompt_hash_ids``
                self._ids[own_id] = self._ids.get(own_id, 0) + 1
                self._cached = None
                last_id = own_id
            block = _Block(parent, tokens, end, last_id, own_id, run)
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
        """vLLM's cache is empty (the noted prompts stay: listed again once their blocks are back)."""
        self._blocks.clear()
        self._ids.clear()
        self._runs.clear()
        self._cached = None

    def _drop(self, block: _Block) -> None:
        for counts, key in ((self._ids, block.own_id), (self._runs, block.run)):
            if key is None:
                continue
            n = counts.get(key, 0) - 1
            if n > 0:
                counts[key] = n
            else:
                counts.pop(key, None)
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


def _run(base: int, tokens: tuple[int, ...]) -> int:
    """A block's ``run`` key: its tokens chained onto the previous block's key (onto the boundary id after one)."""
    return hash((base, tokens))


# NOTE(kv-replay): vLLM's publisher thread answers a replay between batches, polling every 0.1 s when idle; a
# silence this long means no answer is coming (endpoint down or not configured).
REPLAY_WAIT_S = 2.0
# After such a silence, a gap is not asked about again for this long: each ask holds the follower that long.
# An idle engine sends nothing that would show the gap, so the follower asks again on this timer too.
REPLAY_RETRY_S = 10.0
# ZMQ tells a subscriber nothing of when its subscription reached the publisher: a batch published between the
# first replay's answer and then, with none after it, shows no gap. Until a live batch arrives (the
# subscription has taken) the follower asks again after these idle waits, then no more.
SETTLE_ASKS_S = (0.25, 0.5, 1.0, 2.0, 4.0)


def subscribe(endpoint: str) -> Any:
    """A ZMQ SUB socket on a vLLM engine's KV events at ``endpoint`` (connected now: a PUB socket drops what it
    publishes before a subscriber is there; ``follow`` asks those again from the replay endpoint)."""
    import zmq
    import zmq.asyncio

    sock = zmq.asyncio.Context.instance().socket(zmq.SUB)
    sock.setsockopt(zmq.SUBSCRIBE, b"")
    sock.connect(endpoint)
    return sock


async def replay(endpoint: str, start: int, apply: Callable[[int, bytes], None],
                 wait_s: float = REPLAY_WAIT_S) -> bool:
    """Ask vLLM's replay endpoint (``KVEventsConfig.replay_endpoint``, a ROUTER socket) for the batches it
    keeps from sequence number ``start`` on, and ``apply(seq, payload)`` each, in order.

    Returns:
        True once its end marker came (whether or not its buffer still held ``start``); False when nothing
        came for ``wait_s``.
    """
    import zmq
    import zmq.asyncio
    from vllm.distributed.kv_events import ZmqEventPublisher

    # A DEALER, not vLLM's example's REQ: the answer is many messages (one per batch, then the end marker).
    # A new socket per ask: a late answer to an ask given up on never mixes into the next.
    sock = zmq.asyncio.Context.instance().socket(zmq.DEALER)
    sock.connect(endpoint)
    try:
        await asyncio.wait_for(sock.send_multipart((b"", start.to_bytes(8, "big"))), wait_s)
        while True:
            _empty, _topic, seq, payload = await asyncio.wait_for(sock.recv_multipart(), wait_s)
            if seq == ZmqEventPublisher.END_SEQ:
                return True
            apply(int.from_bytes(seq, "big"), payload)
    except TimeoutError:
        return False
    finally:
        sock.close(linger=0)


async def follow(sock: Any, index: PrefixIndex, on_change: Callable[[], None],
                 replay_endpoint: str | None = None, *, wait_s: float = REPLAY_WAIT_S,
                 retry_s: float = REPLAY_RETRY_S, settle_s: Sequence[float] = SETTLE_ASKS_S) -> None:
    """Apply the KV event batches on ``sock`` (``subscribe``) to ``index`` until cancelled; closes it.

    With ``replay_endpoint``, the batches not received are asked from vLLM's replay buffer (``replay``): from
    0 at once (those published before the subscription took), again after each idle wait of ``settle_s`` until
    a live batch shows the subscription has taken, and, at a gap, from the first one missing. One the buffer no
    longer holds leaves the index ``behind`` until vLLM empties its cache; after an ask with no answer (waited
    ``wait_s``) the gap is asked about again after ``retry_s``, whether or not a batch comes meanwhile.
    ``on_change`` is called for each batch received and after an idle ask that moved the index.
    """
    import msgspec
    import zmq
    from vllm.distributed.kv_events import KVEventBatch

    decode = msgspec.msgpack.Decoder(type=KVEventBatch).decode

    def apply(seq: int, payload: bytes) -> None:
        index.on_batch(seq, decode(payload).events)

    retry_at = 0.0  # while ``index.behind``: when the gap may be asked about again
    settle = list(settle_s) if replay_endpoint is not None else []  # idle asks left before a live batch

    async def catch_up() -> None:
        nonlocal retry_at
        if replay_endpoint is None or (index.behind and time.monotonic() < retry_at):
            return
        answered = await replay(replay_endpoint, index.next_seq, apply, wait_s)
        # Answered and still behind: the buffer has moved past the gap, no later ask can fill it.
        retry_at = math.inf if answered else time.monotonic() + retry_s
        if not answered:
            log.warning("vLLM KV events: no replay from %s within %.1f s", replay_endpoint, wait_s)

    def idle_wait_s() -> float | None:
        """How long to wait for a batch before asking on our own; None: wait for one."""
        waits = [settle[0]] if settle else []
        if replay_endpoint is not None and index.behind and retry_at < math.inf:
            waits.append(max(retry_at - time.monotonic(), 0.0))
        return min(waits) if waits else None

    try:
        if replay_endpoint is not None:
            await catch_up()
            on_change()
        while True:
            wait = idle_wait_s()
            if wait is not None and not await sock.poll(wait * 1000, zmq.POLLIN):
                if settle and wait == settle[0]:  # this settle wait is spent (not a retry's)
                    settle.pop(0)
                state = (index.next_seq, index.behind)
                await catch_up()
                if (index.next_seq, index.behind) != state:
                    on_change()
                continue
            _topic, seq, payload = await sock.recv_multipart()
            settle.clear()  # the subscription has taken: from now on a lost batch shows as a gap
            n = int.from_bytes(seq, "big")
            if n > index.next_seq:
                await catch_up()
            apply(n, payload)
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


__all__ = ["PrefixIndex", "follow", "replay", "subscribe"]
