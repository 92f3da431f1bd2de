"""vLLM's KV cache events folded into llmsched's prompt block ids (``scheduler/engine/vllm_prefix.py``): the index
on hand-made event batches shaped as vLLM publishes them, and through a real ZMQ PUB socket with vLLM's own
msgspec types (no engine: tests/test_vllm_backend.py runs it on a real one)."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from typing import Any

import pytest

from scheduler.core.prefix import prompt_hash_ids
from scheduler.engine import vllm_prefix
from scheduler.engine.vllm_prefix import PrefixIndex, follow, subscribe

B = 32  # vLLM-CPU's block size here
RNG = random.Random(0)


def tokens(n: int) -> list[int]:
    return [RNG.randrange(4, 1000) for _ in range(n)]


class Stored:  # the fields ``PrefixIndex.on_batch`` reads of vLLM's BlockStored
    def __init__(self, hashes: list[int], parent: int | None, token_ids: list[int], block_size: int = B, *,
                 group_idx: int | None = None, extra_keys: list | None = None) -> None:
        self.block_hashes, self.parent_block_hash, self.token_ids, self.block_size = (
            hashes, parent, token_ids, block_size)
        self.group_idx, self.extra_keys = group_idx, extra_keys


Stored.__name__ = "BlockStored"


class Removed:
    def __init__(self, hashes: list[int]) -> None:
        self.block_hashes = hashes


Removed.__name__ = "BlockRemoved"


class AllBlocksCleared:
    pass


def store(index: PrefixIndex, seq: int, first: int, parent: int | None, toks: list[int]) -> list[int]:
    """Store ``toks`` (whole blocks) as the chain ``first, first + 1, ...`` after ``parent``; returns the hashes."""
    hashes = list(range(first, first + len(toks) // B))
    index.on_batch(seq, [Stored(hashes, parent, toks[: len(hashes) * B])])
    return hashes


def test_a_cached_prompt_lists_its_full_ids_and_a_shared_prefix_is_named_once() -> None:
    index = PrefixIndex()
    a = tokens(1100)
    ha = store(index, 0, 1, None, a)  # 34 full blocks: 1088 tokens
    assert index.cached == frozenset(prompt_hash_ids(a)[:2])  # the partial third id: listed only for a noted prompt
    # b shares a's first 576 tokens: vLLM stores only its new blocks, continuing a's 18th (tokens 544..576). Its
    # first id is a's; its second (tokens 512..1024) is named from a's blocks 16-17 and its own.
    b = a[:576] + tokens(600)
    store(index, 1, 100, ha[17], b[576:])
    assert prompt_hash_ids(b)[0] == prompt_hash_ids(a)[0] and prompt_hash_ids(b)[1] != prompt_hash_ids(a)[1]
    assert index.cached == frozenset(prompt_hash_ids(a)[:2]) | frozenset(prompt_hash_ids(b)[:2])
    assert len(index.cached) == 3
    # A continuation (the response's blocks, then the next turn's prompt) extends the chain: its id is the next.
    turn2 = a[:1088] + tokens(100)
    store(index, 2, 200, ha[-1], turn2[1088:])
    assert prompt_hash_ids(turn2)[2] not in index.cached  # 1088 + 96 = 1184 < 1536: not a full third id yet


def test_an_evicted_boundary_block_takes_its_id_out_and_a_gap_makes_the_cache_unknown() -> None:
    index = PrefixIndex()
    a = tokens(1024)
    ha = store(index, 0, 1, None, a)
    ids = prompt_hash_ids(a)
    index.on_batch(1, [Removed(ha[20:])])  # vLLM evicts a chain's tail first: the 2nd id's boundary block went
    assert index.cached == frozenset(ids[:1])
    index.on_batch(2, [Removed(ha[:20])])
    assert index.cached == frozenset()
    # Re-stored after eviction (vLLM caches the same hashes again): listed again, once.
    store(index, 3, 1, None, a)
    store(index, 4, 1, None, a)
    assert index.cached == frozenset(ids)
    index.on_batch(5, [Removed(ha)])
    assert index.cached == frozenset()
    # A batch missed: what was removed meanwhile is not known, so nothing is believed from then on.
    store(index, 6, 1, None, a)
    index.on_batch(8, [Removed(ha)])
    assert index.cached is None and index.behind and index.next_seq == 7
    store(index, 9, 1, None, a)
    assert index.cached is None


def test_a_block_whose_parent_is_unknown_names_nothing_and_odd_block_sizes_give_up() -> None:
    index = PrefixIndex()
    store(index, 0, 50, 12345, tokens(1024))  # the parent was never seen (evicted before we looked)
    assert index.cached == frozenset()
    odd = PrefixIndex()
    odd.on_batch(0, [Stored([1], None, tokens(48), block_size=48)])  # 512 is not a multiple of 48
    assert odd.cached is None


def test_a_second_kv_cache_group_makes_the_cache_unknown_for_good() -> None:
    """A hybrid model (full + sliding-window attention) has one KV cache group per kind, and vLLM hits only what
    every group holds: one group's blocks over-claim, so the index says it cannot tell rather than be wrong."""
    index = PrefixIndex()
    a = tokens(1024)
    hashes = list(range(1, 33))
    index.on_batch(0, [Stored(hashes, None, a, group_idx=0)])
    assert index.cached == frozenset(prompt_hash_ids(a))
    index.on_batch(1, [Stored(hashes, None, a, group_idx=1)])
    assert index.cached is None and index.hybrid
    index.on_batch(2, [AllBlocksCleared()])  # emptying the cache does not make one group tell the hits
    index.on_batch(3, [Stored(hashes, None, a, group_idx=0)])
    assert index.cached is None


def test_blocks_hashed_with_extra_keys_name_no_prompt_id() -> None:
    """A block cached under a LoRA / cache salt / image input is not hit by a plain prompt of the same tokens."""
    a = tokens(1024)
    salted = PrefixIndex()
    salted.on_batch(0, [Stored(list(range(1, 33)), None, a, extra_keys=[("salt",)] * 32)])
    assert salted.cached == frozenset()
    # Extra keys from the 20th block on (an image after 608 text tokens): the first id, all text, is still named.
    mixed = PrefixIndex()
    mixed.on_batch(0, [Stored(list(range(1, 33)), None, a, extra_keys=[None] * 19 + [("mm", "img", 0)] * 13)])
    assert mixed.cached == frozenset(prompt_hash_ids(a)[:1])


async def until(done: Callable[[], bool], what: str, bound_s: float = 30.0) -> None:
    # Polled to a generous bound: on a loaded CI host (load 12-17 on 2 cores) fixed waits of 0.2 s for the
    # subscription and 1 s for the batches ran out, and both batches were lost before anyone listened.
    deadline = time.monotonic() + bound_s
    while not done():
        assert time.monotonic() < deadline, f"{what} within {bound_s} s"
        await asyncio.sleep(0.01)


def encoded(events: list) -> bytes:
    """A batch of vLLM event objects as vLLM's ZmqEventPublisher encodes it."""
    import msgspec
    from vllm.distributed.kv_events import KVEventBatch

    return msgspec.msgpack.Encoder().encode(KVEventBatch(ts=0.0, events=events))


async def live_publisher(endpoint: str) -> Any:
    """A stand-in for vLLM's PUB socket whose sends the test picks (a batch it skips is one lost on the way).
    XPUB is PUB on the wire (the subscriber cannot tell) and tells when the subscription has arrived: a PUB
    socket drops what it sends before then. Returns once the subscriber (already connecting) is there."""
    import zmq

    pub = zmq.Context.instance().socket(zmq.XPUB)
    pub.bind(endpoint)
    await until(lambda: pub.poll(0, zmq.POLLIN), "the subscription reaches the publisher")
    assert pub.recv() == b"\x01"  # subscribed to every topic
    return pub


def send(pub: Any, seq: int, events: list) -> None:
    # topic, 8-byte sequence number, payload
    pub.send_multipart((b"", seq.to_bytes(8, "big"), encoded(events)))


def follow_published(batches: list[tuple[int, list]]) -> tuple[frozenset[int] | None, int]:
    """``batches`` of vLLM event objects, each ``(sequence number, events)``, msgpack-encoded and sent as
    vLLM's ZmqEventPublisher sends them (topic, 8-byte sequence number, payload) over a real ZMQ PUB socket,
    read through ``subscribe`` + ``follow`` (no replay endpoint): the index's ``cached`` and how many changes
    it reported."""
    import tempfile

    async def scenario(tmp: str) -> tuple[frozenset[int] | None, int]:
        endpoint = f"ipc://{tmp}/kv-events"
        index, changes = PrefixIndex(), []
        sub = subscribe(endpoint)
        pub = await live_publisher(endpoint)
        task = asyncio.create_task(follow(sub, index, lambda: changes.append(1)))
        for seq, events in batches:
            send(pub, seq, events)
        await until(lambda: len(changes) >= len(batches), "every batch read")
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        pub.close(linger=0)
        return index.cached, len(changes)

    with tempfile.TemporaryDirectory() as tmp:
        return asyncio.run(scenario(tmp))


def test_follow_reads_vllms_published_batches() -> None:
    """vLLM's own event types, as its publisher sends them, through ``subscribe`` + ``follow``."""
    pytest.importorskip("msgspec")
    pytest.importorskip("zmq")
    kv_events = pytest.importorskip("vllm.distributed.kv_events")
    a = tokens(1024)
    stored = kv_events.BlockStored(block_hashes=list(range(1, 33)), parent_block_hash=None, token_ids=a,
                                   block_size=B, lora_id=None, medium="CPU", lora_name=None)
    cached, changes = follow_published([(0, [stored]), (1, [kv_events.BlockRemoved(block_hashes=[32], medium="CPU")])])
    assert changes == 2
    assert cached == frozenset(prompt_hash_ids(a)[:1])  # the second id's boundary block (32) was evicted


# ---- lost batches asked again from vLLM's replay buffer (``KVEventsConfig.replay_endpoint``) ---------------


def test_a_batch_received_again_is_skipped_and_a_filled_gap_makes_the_cache_known() -> None:
    """The index's side of a replay: after a gap it is ``behind`` (unknown); the missing batch and those after
    it (replayed), then those again as they arrive live, leave it as if nothing had been missed."""
    index = PrefixIndex()
    a, b, c = tokens(512), tokens(512), tokens(512)
    store(index, 0, 1, None, a)
    store(index, 2, 200, None, c)  # batch 1 missed
    assert index.cached is None and index.behind and index.next_seq == 1
    store(index, 1, 100, None, b)  # the replay: 1, 2, 3
    hc = store(index, 2, 200, None, c)
    index.on_batch(3, [Removed(hc)])
    assert not index.behind and index.next_seq == 4
    store(index, 2, 200, None, c)  # batch 2 as received live: applied already (again, c would be listed)
    assert index.cached == frozenset(prompt_hash_ids(a) + prompt_hash_ids(b))


def replay_scenario(scenario: Callable[[str, Any], Any]) -> Any:
    """Run ``scenario(tmp, kv_events)`` (``kv_events``: vLLM's module) in a fresh event loop and folder."""
    import tempfile

    pytest.importorskip("msgspec")
    pytest.importorskip("zmq")
    kv = pytest.importorskip("vllm.distributed.kv_events")
    with tempfile.TemporaryDirectory() as tmp:
        return asyncio.run(scenario(tmp, kv))


def vllm_publisher(kv: Any, tmp: str, buffer_steps: int = 10_000) -> Any:
    """vLLM's own ZmqEventPublisher, in-process (its thread, PUB and replay ROUTER sockets; no engine),
    replaying at ``ipc://{tmp}/replay``."""
    return kv.ZmqEventPublisher(0, endpoint=f"ipc://{tmp}/vllm-events", replay_endpoint=f"ipc://{tmp}/replay",
                                buffer_steps=buffer_steps)


async def publish(pub: Any, batches: list[list]) -> None:
    """``batches`` through vLLM's publisher; returns once its thread has sent and buffered them."""
    from vllm.distributed.kv_events import KVEventBatch

    for events in batches:
        pub.publish(KVEventBatch(ts=0.0, events=events))
    await until(lambda: pub._event_queue.unfinished_tasks == 0, "the publisher's thread sent them")


def stored_event(kv: Any, first: int, toks: list[int]) -> Any:
    n = len(toks) // B
    return kv.BlockStored(block_hashes=list(range(first, first + n)), parent_block_hash=None,
                          token_ids=toks[: n * B], block_size=B, lora_id=None, medium="CPU", lora_name=None)


def test_a_batch_published_before_the_subscriber_connected_is_replayed() -> None:
    """vLLM's publisher sends batch 0 before anyone subscribed (its PUB socket drops it): the follower asks
    the replay endpoint from 0 as it starts, and lists it (before: the index read empty until a next one)."""
    a = tokens(1024)

    async def scenario(tmp: str, kv: Any) -> frozenset[int] | None:
        pub = vllm_publisher(kv, tmp)
        await publish(pub, [[stored_event(kv, 1, a)]])
        index = PrefixIndex()
        task = asyncio.create_task(
            follow(subscribe(f"ipc://{tmp}/vllm-events"), index, lambda: None, f"ipc://{tmp}/replay"))
        try:
            await until(lambda: index.next_seq == 1, "batch 0 replayed")
            return index.cached
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            pub.shutdown()

    assert replay_scenario(scenario) == frozenset(prompt_hash_ids(a))


def test_a_gap_is_filled_from_vllms_replay_buffer_and_batches_received_twice_count_once() -> None:
    """Batches 0-3 go through vLLM's publisher (its replay buffer); the subscriber receives 0 and 2 only. At 2
    the follower asks from 1, gets 1-3, then skips 2 as received: c, stored in 2 and evicted in 3, is not
    listed again (before: unknown from batch 2 on)."""
    a, b, c = tokens(512), tokens(512), tokens(512)

    async def scenario(tmp: str, kv: Any) -> tuple[frozenset[int] | None, int]:
        pub = vllm_publisher(kv, tmp)
        index, changes = PrefixIndex(), []
        sub = subscribe(f"ipc://{tmp}/live")
        live = await live_publisher(f"ipc://{tmp}/live")
        task = asyncio.create_task(follow(sub, index, lambda: changes.append(1), f"ipc://{tmp}/replay"))
        try:
            await until(lambda: changes, "the first replay answered (nothing yet)")
            batches = [[stored_event(kv, 1, a)], [stored_event(kv, 100, b)], [stored_event(kv, 200, c)],
                       [kv.BlockRemoved(block_hashes=list(range(200, 216)), medium="CPU")]]
            await publish(pub, batches)
            for seq in (0, 2):
                send(live, seq, batches[seq])
            await until(lambda: len(changes) == 3, "the live batches read")
            return index.cached, index.next_seq
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            live.close(linger=0)
            pub.shutdown()

    cached, next_seq = replay_scenario(scenario)
    assert next_seq == 4
    assert cached == frozenset(prompt_hash_ids(a) + prompt_hash_ids(b))


def test_no_replay_leaves_the_cache_unknown_until_a_later_replay_or_a_clear() -> None:
    """No replay endpoint answering (bounded wait): a gap makes the cache unknown, as before replays; a later
    ask, once it answers, fills it -- on the retry timer, with no batch after the gap (the engine idle). A gap
    older than the replay buffer stays unknown until vLLM empties it."""
    a, b, c, d = tokens(512), tokens(512), tokens(512), tokens(512)

    async def scenario(tmp: str, kv: Any) -> list[frozenset[int] | None]:
        seen: list[frozenset[int] | None] = []
        index = PrefixIndex()
        sub = subscribe(f"ipc://{tmp}/live")
        live = await live_publisher(f"ipc://{tmp}/live")
        task = asyncio.create_task(follow(sub, index, lambda: None, f"ipc://{tmp}/replay",
                                          wait_s=0.5, retry_s=0.2, settle_s=()))
        pub = None
        try:
            batches = [[stored_event(kv, 1, a)], [stored_event(kv, 100, b)], [stored_event(kv, 200, c)],
                       [stored_event(kv, 300, d)]]
            for seq in (0, 2):  # nothing listens at the replay endpoint yet
                send(live, seq, batches[seq])
            await until(lambda: index.next_seq == 1 and index.behind, "batches 0 and 2 read")
            seen.append(index.cached)
            pub = vllm_publisher(kv, tmp, buffer_steps=3)  # now it answers; no live batch follows
            await publish(pub, batches)
            await until(lambda: index.next_seq == 4, "the gap filled on the retry timer")
            seen.append(index.cached)
            # 4-7 published, the subscriber receives 7: the buffer (3 batches) starts at 5.
            more = [[kv.BlockRemoved(block_hashes=list(range(1, 17)), medium="CPU")], [], [], []]
            await publish(pub, more)
            send(live, 7, more[3])
            await until(lambda: index.behind, "batch 7 read")
            await asyncio.sleep(1.0)  # answered, still behind: nothing more to ask (a retry would not fill it)
            seen.append(index.cached)
            await publish(pub, [[kv.AllBlocksCleared(), stored_event(kv, 400, d)]])
            send(live, 8, [kv.AllBlocksCleared(), stored_event(kv, 400, d)])
            await until(lambda: index.next_seq == 9, "batch 8 read")
            seen.append(index.cached)
            return seen
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            live.close(linger=0)
            if pub is not None:
                pub.shutdown()

    unknown, filled, overrun, cleared = replay_scenario(scenario)
    assert unknown is None
    assert filled == frozenset(id_ for toks in (a, b, c, d) for id_ in prompt_hash_ids(toks))
    assert overrun is None
    assert cleared == frozenset(prompt_hash_ids(d))


def test_a_batch_published_before_the_subscription_took_with_none_after_it_is_replayed() -> None:
    """The connect race's residue: the first replay answers (nothing yet), then vLLM publishes a batch the
    subscriber never receives (its subscription had not reached the publisher) and nothing after it -- no gap to
    see. The follower asks again after idle waits until a live batch shows the subscription took (before: the
    batch stayed unlisted until a later one showed the gap). A live batch ends those asks."""
    a = tokens(1024)

    async def scenario(tmp: str, kv: Any) -> tuple[frozenset[int] | None, int]:
        pub = vllm_publisher(kv, tmp)
        index, asks = PrefixIndex(), []
        sub = subscribe(f"ipc://{tmp}/live")  # vLLM's PUB is elsewhere: what it sends never reaches this socket
        live = await live_publisher(f"ipc://{tmp}/live")
        real_replay = vllm_prefix.replay

        async def counted(*args: Any, **kw: Any) -> bool:
            asks.append(1)
            return await real_replay(*args, **kw)

        vllm_prefix.replay = counted
        task = asyncio.create_task(follow(sub, index, lambda: None, f"ipc://{tmp}/replay",
                                          settle_s=(0.2, 0.2, 0.2, 0.2, 0.2, 0.2)))
        try:
            await until(lambda: asks, "the first replay asked")
            await publish(pub, [[stored_event(kv, 1, a)]])
            await until(lambda: index.next_seq == 1, "batch 0 replayed with nothing after it")
            cached = index.cached
            send(live, 1, [])  # the subscription has taken: no more idle asks
            await until(lambda: index.next_seq == 2, "batch 1 read live")
            n = len(asks)
            await asyncio.sleep(1.0)
            return cached, len(asks) - n
        finally:
            vllm_prefix.replay = real_replay
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            live.close(linger=0)
            pub.shutdown()

    cached, asks_after_live = replay_scenario(scenario)
    assert cached == frozenset(prompt_hash_ids(a))
    assert asks_after_live == 0
