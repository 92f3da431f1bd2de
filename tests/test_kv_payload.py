"""The KV wire helpers that need no engine: the bounded payload store (the worker's saved prompt KV and the
backend's pushed copies) and block-aligned slicing."""

from __future__ import annotations

import numpy as np

from scheduler.transfer.kv_payload import PayloadStore, slice_payload


def _payload(blocks: int, end: int | None = None) -> dict:
    bs = 4
    end = blocks * bs if end is None else end
    return {"block_size": bs, "start_token": 0, "end_token": end, "token_ids": list(range(end)),
            "layers": {"l0": np.zeros((blocks, 8), dtype=np.float32)}}  # 32 bytes per block


def test_store_evicts_oldest_by_bytes_and_always_keeps_the_newest() -> None:
    s = PayloadStore(capacity_bytes=100)
    s.put("a", _payload(1))
    s.put("b", _payload(1))
    s.put("c", _payload(1))  # 96 bytes: all fit
    assert len(s) == 3
    s.put("d", _payload(1))  # 128 > 100: the oldest goes
    assert "a" not in s and all(k in s for k in "bcd")
    s.put("big", _payload(10))  # over the bound alone: kept, everything older evicted
    assert len(s) == 1 and "big" in s


def test_store_replaces_and_pops_with_its_bytes() -> None:
    s = PayloadStore(capacity_bytes=64)
    s.put("a", _payload(2))
    s.put("a", _payload(2))  # a replacement does not count twice
    s.put("b", _payload(0))
    assert "a" in s and "b" in s
    assert s.pop("a") is not None and s.pop("a") is None and s.get("a") is None
    s.put("c", _payload(2))  # the popped bytes were given back
    assert "b" in s and "c" in s


def test_slice_rounds_down_to_a_block_and_clips_the_end() -> None:
    p = _payload(3, end=10)
    out = slice_payload(p, 5, None)
    assert (out["start_token"], out["end_token"], out["token_ids"]) == (4, 10, list(range(4, 10)))
    assert out["layers"]["l0"].shape[0] == 2
    assert slice_payload(p, 0, 99)["end_token"] == 10
