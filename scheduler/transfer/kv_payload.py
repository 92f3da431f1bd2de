"""The wire format of KV blocks moved between vLLM engines, and helpers to build and merge it.

vLLM engines keep KV in paged blocks of ``block_size`` tokens. We move *whole blocks* (layout-agnostic: a
block's bytes are copied as they are, whatever the attention backend's inner layout), so the token range of a
payload always starts on a block boundary; the last block may be partial (``end_token`` says how many of its
slots are valid, the rest are ignored by the destination, which overwrites them when it computes those tokens).

A payload is a plain dict (msgpack/pickle friendly, numpy arrays zero-copy through vLLM's IPC and Ray):

    {"block_size": 32, "start_token": 0, "end_token": 70, "token_ids": [...ids of tokens 0..69...],
     "dtype": "float32", "layers": {"model.layers.0.self_attn.attn": ndarray[num_blocks, ...], ...}}

``token_ids`` are the tokens ``[start_token, end_token)`` whose KV this is. ``dtype`` is the KV cache's torch dtype:
numpy has no bfloat16, so a bfloat16 cache's blocks travel as int16 arrays of the same bits (a payload without the
key has its arrays' dtype). ``KVBlocks.data`` (scheduler.engine.base) holds exactly this dict.
"""

from __future__ import annotations

import collections
import threading
from typing import Any

import numpy as np

from scheduler.engine.base import KVBlocks

Payload = dict[str, Any]
PUSHED_KV = "llmsched_kv"  # key of the saved prompt KV in a finished producer request's kv_transfer_params


def payload_nbytes(payload: Payload) -> int:
    return int(sum(a.nbytes for a in payload["layers"].values()))


def payload_dtype(payload: Payload) -> str:
    """The dtype of the KV cache the payload was copied from (see the module docstring)."""
    return str(payload.get("dtype") or next(iter(payload["layers"].values())).dtype)


def check_payload(payload: Payload, layout: dict[str, tuple[str, tuple[int, ...]]], block_size: int) -> None:
    """Refuse KV this engine cannot load as it is. ``layout``: the engine's KV cache per layer, (dtype, shape of
    one block). Whole blocks are copied byte for byte into the cache, so a payload from another model, block size
    or dtype, or one short of its token range, would decode from wrong or stale KV without a word.

    Raises:
        ValueError: naming the offending field.
    """
    if int(payload["block_size"]) != block_size:
        raise ValueError(f"kv.block_size: {payload['block_size']} != this engine's {block_size}")
    dtype = payload_dtype(payload)
    blocks = -(-int(payload["end_token"]) // block_size) - int(payload["start_token"]) // block_size
    carrier = "int16" if dtype == "bfloat16" else dtype
    for name, arr in payload["layers"].items():
        if str(arr.dtype) != carrier:
            raise ValueError(f"kv.layers[{name!r}]: {arr.dtype} array for {dtype} KV")
        if arr.shape[0] != blocks:
            raise ValueError(
                f"kv.layers[{name!r}]: {arr.shape[0]} blocks for tokens [{payload['start_token']}, "
                f"{payload['end_token']}), which take {blocks} (truncated?)"
            )
    for name, (cache_dtype, block_shape) in layout.items():
        arr = payload["layers"].get(name)
        if arr is None or tuple(arr.shape[1:]) != tuple(block_shape):
            got = None if arr is None else tuple(arr.shape[1:])
            raise ValueError(
                f"kv.layers[{name!r}]: block shape {got} does not match this engine's {tuple(block_shape)} "
                "(different model or block size?)"
            )
        if dtype != cache_dtype:
            raise ValueError(f"kv.dtype: {dtype} KV, this engine's cache is {cache_dtype}")


class PayloadStore:
    """Payloads by request id, bounded by their bytes: the oldest are evicted first, the newest is always kept.
    Thread-safe (the worker's extension RPCs and its model step run on different threads)."""

    def __init__(self, capacity_bytes: int) -> None:
        self.capacity_bytes = capacity_bytes
        self._items: collections.OrderedDict[str, Payload] = collections.OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def put(self, key: str, payload: Payload) -> None:
        with self._lock:
            self._pop(key)
            self._items[key] = payload
            self._bytes += payload_nbytes(payload)
            while self._bytes > self.capacity_bytes and len(self._items) > 1:
                self._pop(next(iter(self._items)))

    def get(self, key: str) -> Payload | None:
        with self._lock:
            return self._items.get(key)

    def pop(self, key: str) -> Payload | None:
        with self._lock:
            return self._pop(key)

    def _pop(self, key: str) -> Payload | None:
        old = self._items.pop(key, None)
        if old is not None:
            self._bytes -= payload_nbytes(old)
        return old

    def __contains__(self, key: object) -> bool:
        return key in self._items

    def __len__(self) -> int:
        return len(self._items)


def slice_payload(payload: Payload, start_token: int, end_token: int | None) -> Payload:
    """Tokens ``[start_token (rounded down to a block), end_token)`` of a payload that starts at token 0
    (``end_token`` ``None`` or past its end: to its end). Arrays are views."""
    bs = int(payload["block_size"])
    end = payload["end_token"] if end_token is None else min(end_token, payload["end_token"])
    j_start = start_token // bs
    return {
        "block_size": bs,
        "start_token": j_start * bs,
        "end_token": end,
        "dtype": payload_dtype(payload),
        "token_ids": payload["token_ids"][j_start * bs : end],
        "layers": {n: a[j_start : -(-end // bs)] for n, a in payload["layers"].items()},
    }


def to_kv_blocks(request_id: str, payload: Payload) -> KVBlocks:
    """Wrap an engine payload into the backend-neutral ``KVBlocks``."""
    return KVBlocks(
        request_id=request_id,
        start_token=int(payload["start_token"]),
        end_token=int(payload["end_token"]),
        token_ids=tuple(int(t) for t in payload["token_ids"]),
        nbytes=payload_nbytes(payload),
        data=payload,
    )


def merge_kv_blocks(blocks: tuple[KVBlocks, ...] | list[KVBlocks]) -> Payload:
    """Combine stage copies (live migration) into one payload covering ``[0, end)``.

    For a block covered by several pieces, the piece reaching furthest wins (the partial last block of a stage
    is re-sent, fuller, by the next stage).

    Raises:
        ValueError: naming the offending field when the pieces do not form one contiguous range from token 0,
            disagree on block size or layers, or carry no vLLM payload.
    """
    if not blocks:
        raise ValueError("kv: empty tuple of KVBlocks")
    for b in blocks:
        if not isinstance(b.data, dict) or "layers" not in b.data:
            raise ValueError(
                f"kv.data: KVBlocks of {b.request_id!r} carries no vLLM KV payload (simulated backend?)"
            )
    ordered = sorted(blocks, key=lambda b: (b.start_token, b.end_token))
    bs = int(ordered[0].data["block_size"])
    names = list(ordered[0].data["layers"])
    dtype = payload_dtype(ordered[0].data)
    if ordered[0].start_token != 0:
        raise ValueError(
            f"kv.start_token: KV must start at token 0, first piece starts at {ordered[0].start_token}"
        )
    end = 0
    for b in ordered:
        if int(b.data["block_size"]) != bs:
            raise ValueError(f"kv.block_size: pieces disagree ({bs} vs {b.data['block_size']})")
        if list(b.data["layers"]) != names:
            raise ValueError("kv.layers: pieces come from engines with different layers")
        if payload_dtype(b.data) != dtype:
            raise ValueError(f"kv.dtype: pieces disagree ({dtype} vs {payload_dtype(b.data)})")
        if b.start_token % bs:
            raise ValueError(f"kv.start_token: {b.start_token} is not a multiple of block size {bs}")
        if b.start_token > end:
            raise ValueError(
                f"kv.start_token: gap in KV range, have [0, {end}) then a piece from {b.start_token}"
            )
        end = max(end, b.end_token)
    if len(ordered) == 1:
        return ordered[0].data
    num_blocks = -(-end // bs)
    first = ordered[0].data["layers"]
    layers = {n: np.empty((num_blocks, *first[n].shape[1:]), dtype=first[n].dtype) for n in names}
    token_ids = [0] * end
    # KV of a request only grows, so a piece with a larger end_token was copied later: apply in that order so
    # each block ends up with its most recent (most filled) copy.
    for b in sorted(ordered, key=lambda b: b.end_token):
        j0 = b.start_token // bs
        for n in names:
            src = b.data["layers"][n]
            layers[n][j0 : j0 + src.shape[0]] = src
        token_ids[b.start_token : b.end_token] = b.token_ids
    return {
        "block_size": bs,
        "start_token": 0,
        "end_token": end,
        "dtype": dtype,
        "token_ids": token_ids,
        "layers": layers,
    }


def to_wire(payload: Payload) -> Payload:
    """Arrays -> ``(dtype, shape, bytes)`` triples: vLLM's msgpack IPC carries untyped utility arguments and
    results, and only plain bytes survive it unchanged (ndarrays would arrive as lists)."""
    out = {k: v for k, v in payload.items() if k != "layers"}
    out["token_ids"] = [int(t) for t in payload.get("token_ids", [])]
    out["layers"] = {
        n: (str(a.dtype), list(a.shape), np.ascontiguousarray(a).tobytes())
        for n, a in payload["layers"].items()
    }
    return out


def from_wire(wire: Payload) -> Payload:
    """Inverse of ``to_wire`` (arrays are read-only views on the received bytes)."""
    out = {k: v for k, v in wire.items() if k != "layers"}
    out["layers"] = {
        n: np.frombuffer(buf, dtype=np.dtype(dt)).reshape(tuple(shape))
        for n, (dt, shape, buf) in wire["layers"].items()
    }
    return out
