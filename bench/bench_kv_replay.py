"""How fast lost vLLM KV event batches come back through vLLM's replay endpoint.

``follow`` (``scheduler/engine/vllm_prefix.py``) against vLLM's own ZmqEventPublisher in-process (its
publisher thread and sockets; no engine):

    in order       the baseline: a batch received as published, from its send to the index applying it
    gap            one batch lost on the way: from the next batch's send to the index holding both (it asks
                   the replay endpoint from the missing one); without a replay the cache reads unknown until
                   vLLM empties it
    connect race   a batch published before the subscriber connected: from ``follow`` starting to the index
                   holding it; without a replay it is never seen (the index reads empty until the next batch,
                   which then finds a gap)

    llmsched bench kv-replay --json docs/results/kv_replay.json
"""

from __future__ import annotations

import argparse
import asyncio
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scheduler.engine.vllm_prefix import PrefixIndex, follow, subscribe
from scheduler.telemetry.report import write_json

BOUND_S = 30.0


async def _until(done: Any) -> float:
    """Seconds until ``done()`` (polled every ms; an error past ``BOUND_S``)."""
    t0 = time.perf_counter()
    while not done():
        if time.perf_counter() - t0 > BOUND_S:
            raise RuntimeError(f"not done within {BOUND_S} s")
        await asyncio.sleep(0.001)
    return time.perf_counter() - t0


def _batch(kv: Any, seq: int) -> list[Any]:
    """One 32-token block stored (its own chain): a batch as small as vLLM publishes for a short prompt."""
    return [kv.BlockStored(block_hashes=[seq + 1], parent_block_hash=None,
                           token_ids=list(range(seq, seq + 32)), block_size=32, lora_id=None, medium="CPU",
                           lora_name=None)]


async def _publish(kv: Any, pub: Any, events: list[Any]) -> None:
    pub.publish(kv.KVEventBatch(ts=time.time(), events=events))
    await _until(lambda: pub._event_queue.unfinished_tasks == 0)  # sent and in its replay buffer


async def _gaps(kv: Any, tmp: str, rounds: int) -> dict[str, list[float]]:
    """Rounds of an in-order batch, then a lost one and the next: the index's lag after each send."""
    import msgspec
    import zmq

    pub = kv.ZmqEventPublisher(0, endpoint=f"ipc://{tmp}/vllm-events", replay_endpoint=f"ipc://{tmp}/replay")
    # The live stream the subscriber reads, a stand-in for vLLM's PUB socket that leaves out the batch to lose
    # (XPUB: PUB on the wire, and it tells when the subscription has arrived).
    live = zmq.Context.instance().socket(zmq.XPUB)
    index, changes = PrefixIndex(), []
    sub = subscribe(f"ipc://{tmp}/live")
    live.bind(f"ipc://{tmp}/live")
    task = asyncio.create_task(follow(sub, index, lambda: changes.append(1), f"ipc://{tmp}/replay"))
    encode = msgspec.msgpack.Encoder().encode
    out: dict[str, list[float]] = {"in_order": [], "gap": []}
    try:
        await _until(lambda: live.poll(0, zmq.POLLIN) and changes)
        seq = 0
        for _ in range(rounds):
            for kind, lost in (("in_order", 0), ("gap", 1)):
                for _ in range(lost + 1):
                    await _publish(kv, pub, _batch(kv, seq))
                    seq += 1
                t0 = time.perf_counter()
                live.send_multipart((b"", (seq - 1).to_bytes(8, "big"), encode(
                    kv.KVEventBatch(ts=0.0, events=_batch(kv, seq - 1)))))
                await _until(lambda: index.next_seq == seq)  # noqa: B023 (awaited here, in this iteration)
                out[kind].append(time.perf_counter() - t0)
                assert index.cached is not None, "the index fell behind"
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        live.close(linger=0)
        pub.shutdown()
    return out


async def _connect_race(kv: Any, tmp: str) -> float:
    pub = kv.ZmqEventPublisher(0, endpoint=f"ipc://{tmp}/race-events",
                               replay_endpoint=f"ipc://{tmp}/race-replay")
    index = PrefixIndex()
    try:
        await _publish(kv, pub, _batch(kv, 0))  # nobody subscribed: its PUB socket drops it
        task = asyncio.create_task(
            follow(subscribe(f"ipc://{tmp}/race-events"), index, lambda: None, f"ipc://{tmp}/race-replay"))
        took = await _until(lambda: index.next_seq == 1)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return took
    finally:
        pub.shutdown()


def _summary(xs: list[float]) -> dict[str, float]:
    ms = sorted(x * 1e3 for x in xs)
    p90 = ms[math.ceil(0.9 * len(ms)) - 1]  # nearest rank
    return {"n": len(ms), "median_ms": statistics.median(ms), "p90_ms": p90, "max_ms": ms[-1]}


async def bench(rounds: int) -> dict[str, Any]:
    import vllm.distributed.kv_events as kv

    with tempfile.TemporaryDirectory() as tmp:
        lags = await _gaps(kv, tmp, rounds)
        race = [await _connect_race(kv, tmp) for _ in range(max(1, rounds // 4))]
    res = {kind: _summary(xs) for kind, xs in lags.items()}
    res["connect_race"] = _summary(race)
    res["gap_over_in_order"] = res["gap"]["median_ms"] / res["in_order"]["median_ms"]
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="llmsched bench kv-replay", description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=40,
                   help="in-order and gap rounds (connect races: a quarter)")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)

    res = asyncio.run(bench(args.rounds))
    for kind in ("in_order", "gap", "connect_race"):
        r = res[kind]
        print(f"  {kind:13s} n={r['n']:3d}  median {r['median_ms']:7.1f} ms  p90 {r['p90_ms']:7.1f} ms  "
              f"max {r['max_ms']:7.1f} ms")
    print(f"  gap / in order (medians): {res['gap_over_in_order']:.1f}x")
    if args.json:
        write_json(args.json, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
