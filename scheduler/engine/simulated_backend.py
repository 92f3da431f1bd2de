"""Simulated engine backend: the engine model (``scheduler.engine_model``) run in real time.

One asyncio task drives the model::

    while has_work:
        r = em.step()                  # what one vLLM iteration would do
        await asyncio.sleep(r.duration_s * time_scale)
        deliver one token to every rid in r.emitted; close finished ones

Token ids are deterministic pseudo-random in ``[0, vocab)`` from ``(seed, request_id, index)``, so a stream that
moves between instances (P->D handoff, migration, recovery after a crash) is checkably continuous: the same
request produces the same token at the same index wherever it runs. KV is only accounted (``KVBlocks.nbytes``
from the model's ``kv_bytes_per_token``; ``data`` is ``None``); a destination given ``EngineRequest.kv`` admits
the request with those tokens cached, so it does not recompute them (see ``EngineStats.prompt_tokens_loaded``),
once that KV has crossed the link from its source's GPU type (``KVBlocks.source_gpu``), as the simulator times it.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from scheduler.config.models import EngineSpec, GPUSpec, ModelSpec
from scheduler.core.prefix import HASH_BLOCK_TOKENS, prompt_hash_ids
from scheduler.core.types import InstanceRole, InstanceSnapshot
from scheduler.engine.base import (
    EngineRequest,
    EngineStats,
    KVBlocks,
    TokenChunk,
    text_after,
)
from scheduler.engine_model import EngineModel
from scheduler.latency import LatencyModel, kv_transfer_between, latency_for
from scheduler.transfer.migration import MigrationSnapshot

log = logging.getLogger(__name__)

_HANDOFF_KEEP = 4096  # finished prefill legs whose KV can still be exported (P->D handoff)


def sim_token(seed: int, request_id: str, index: int, vocab_size: int) -> int:
    """The token a simulated engine emits at output ``index`` of ``request_id`` (same on every instance)."""
    h = hashlib.blake2b(f"{seed}:{request_id}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") % vocab_size


class ByteTokenizer:
    """Trivial tokenizer for the simulated backend: UTF-8 bytes are token ids (vocab must be >= 256)."""

    def __init__(self, vocab_size: int) -> None:
        if vocab_size < 256:
            raise ValueError(f"vocab_size: the byte tokenizer needs >= 256, got {vocab_size}")
        self.vocab_size = vocab_size

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(text.encode("utf-8"))  # no special tokens to add

    def decode(self, token_ids: tuple[int, ...] | list[int]) -> str:
        return bytes(t for t in token_ids if t < 256).decode("utf-8", errors="replace")


@dataclass(slots=True)
class _Req:
    request: EngineRequest
    seed: int
    queue: asyncio.Queue[TokenChunk]
    next_index: int  # sequence index of the next token (stable across handoffs)
    remaining: int  # tokens still to generate here
    outputs: list[int] = field(default_factory=list)  # tokens generated on this engine
    done: bool = False


class SimulatedBackend:
    """``EngineBackend`` over the engine model, sleeping the modelled step time.

    Args:
        model, gpu, tp: what the latency model is built for (``latency`` overrides it).
        engine: vLLM-like scheduler settings (block size, token budget, KV blocks).
        role: what a finished request leaves behind: a PREFILL engine keeps every prompt's KV exportable, the
            others only those of ``max_tokens=1`` requests (P->D prefill legs), as ``VLLMBackend`` does. How many
            tokens a request produces is its ``max_tokens`` whatever the role (the ingress sends prefill legs
            with 1), so a decode leg that lands on an instance just switched to PREFILL still decodes in full.
        seed: token-id seed; every instance of one cluster must share it for stream continuity.
        time_scale: multiply modelled step times (``0.1`` runs 10x faster than the modelled GPU).
    """

    def __init__(
        self,
        model: ModelSpec,
        gpu: GPUSpec,
        *,
        tp: int = 1,
        engine: EngineSpec | None = None,
        role: InstanceRole = InstanceRole.MIXED,
        seed: int = 0,
        time_scale: float = 1.0,
        latency: LatencyModel | None = None,
        num_blocks: int | None = None,
    ) -> None:
        if time_scale < 0:
            raise ValueError(f"time_scale: must be >= 0, got {time_scale}")
        self.model = model
        self.gpu = gpu
        self.role = InstanceRole.parse(role)
        self.seed = seed
        self.time_scale = time_scale
        self.vocab_size = model.vocab_size
        self.tokenizer = ByteTokenizer(max(model.vocab_size, 256))
        self.engine = EngineModel(
            latency or latency_for(model, gpu, tp), engine or EngineSpec(), num_blocks=num_blocks
        )
        self._reqs: dict[str, _Req] = {}
        # Prompt token ids of finished prefill legs, for export_kv after the engine freed them.
        self._handoff: OrderedDict[str, tuple[int, ...]] = OrderedDict()
        # Live migration: destination reservations (blocks) and staged KV (end token, token ids); source requests
        # paused for the final stop-and-copy (their engine-model seq and the blocks held for it).
        self._reserved: dict[str, int] = {}
        self._staged: dict[str, tuple[int, tuple[int, ...]]] = {}
        self._paused: dict[str, tuple[object, int]] = {}
        self._wake: asyncio.Event | None = None
        # Held by the engine loop from a step's computation to the delivery of its tokens (the modelled step
        # time in between): ``pause`` takes it, so a request stops between two steps, as vLLM's pause utility
        # does -- never with a token of the step in flight still to come out on the source after its snapshot.
        self._step_lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._failed: str | None = None  # why the engine loop died (then every call says so)

    # ---- lifecycle ------------------------------------------------------------------------------------
    async def start(self) -> None:
        if self._task is None:
            self._wake = asyncio.Event()
            self._task = asyncio.create_task(self._run(), name="simulated-engine")

    async def shutdown(self) -> None:
        self._closed = True
        for rid in list(self._reqs):
            self._finish(rid, "abort")
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    # ---- requests -------------------------------------------------------------------------------------
    def generate(self, request: EngineRequest) -> AsyncIterator[TokenChunk]:
        """Queue ``request`` and return its chunk stream. Raises ``ValueError`` for bad input (at call time)."""
        if self._closed:
            raise RuntimeError("engine is shut down")
        if self._task is None:
            raise RuntimeError("engine not started: await start() first")
        self._check_alive()
        rid = request.request_id
        if rid in self._reqs:
            raise ValueError(f"request_id: {rid!r} is already running on this engine")
        prompt = request.prompt_token_ids
        if not prompt:
            raise ValueError("prompt_token_ids: must not be empty")
        bad = next((t for t in prompt if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise ValueError(f"prompt_token_ids: token {bad} outside [0, {self.vocab_size})")
        cached = self._cached_tokens(request)
        migrated = rid in self._reserved  # a migration's commit: the handshake reserved its blocks here
        self._release_reservation(rid)  # the request takes the blocks it was reserved
        max_tokens = request.sampling.max_tokens
        self.engine.check_request(rid, len(prompt), max_tokens, cached)  # refused now, even if admitted later
        seed = request.sampling.seed if request.sampling.seed is not None else self.seed
        req = _Req(request, seed, asyncio.Queue(), request.num_output_tokens_before, max_tokens)
        self._reqs[rid] = req
        landing = self._kv_landing_s(request) * self.time_scale
        if landing > 0:  # its KV is on its way: admitted when it lands, as the simulator queues it (KV_ARRIVE)
            asyncio.get_running_loop().call_later(landing, self._admit, req, cached)
        else:
            self._admit(req, cached, front=migrated)
        return self._stream(req)

    def _kv_landing_s(self, request: EngineRequest) -> float:
        """Modelled time for the KV another simulated engine sent with ``request`` (a P->D handoff) to cross the
        link between the two GPU types, as the simulator charges the handoff (``kv_transfer_between``). None where
        the latency model has the handoff measured end to end (a live profile: the real path is what it measured),
        nor for KV of unknown source (a vLLM engine's)."""
        if self.engine.latency.handoff_s is not None:
            return 0.0
        return sum(kv_transfer_between(kv.end_token - kv.start_token, self.model, kv.source_gpu, self.gpu)
                   for kv in request.kv if kv.source_gpu is not None)

    def _admit(self, req: _Req, cached: int, *, front: bool = False) -> None:
        """``front``: a migrated request, queued ahead of the prompts waiting here, as the simulator's driver and
        the vLLM connector queue it (it keeps running, Llumnix; it does not wait behind later arrivals)."""
        request = req.request
        rid, prompt = request.request_id, request.prompt_token_ids
        if self._reqs.get(rid) is not req:  # aborted (or the engine shut down) while its KV was on its way
            return
        # The prompt's block ids, as a trace's hash_ids: the engine model's prefix cache hits on a shared prefix
        # (vLLM's does on its own), and the snapshots report what is cached.
        self.engine.add_request(rid, len(prompt), req.remaining, cached_tokens=cached, priority=request.priority,
                                hash_ids=prompt_hash_ids(prompt), hash_block_tokens=HASH_BLOCK_TOKENS, front=front)
        assert self._wake is not None
        self._wake.set()

    def _cached_tokens(self, request: EngineRequest) -> int:
        """Leading prompt tokens whose KV arrived with the request (contiguous from 0, prefix-checked)."""
        covered = 0
        staged = self._staged.pop(request.request_id, None) if not request.kv else None
        if staged is not None:
            end, toks = staged
            if tuple(request.prompt_token_ids[:end]) == toks[:end]:
                covered = min(end, len(request.prompt_token_ids))
            else:
                log.warning("staged kv for %s does not match the prompt; recomputing", request.request_id)
        for kv in sorted(request.kv, key=lambda b: b.start_token):
            if kv.start_token > covered:
                break
            end = min(kv.end_token, len(request.prompt_token_ids))
            if tuple(request.prompt_token_ids[kv.start_token : end]) != tuple(kv.token_ids[: end - kv.start_token]):
                log.warning("kv for %s does not match the prompt at [%d, %d); recomputing", request.request_id,
                            kv.start_token, end)
                break
            covered = max(covered, end)
        # NOTE: the last prompt token is always computed here (as in vLLM): it produces the next token's logits.
        return min(covered, len(request.prompt_token_ids) - 1)

    async def _stream(self, req: _Req) -> AsyncIterator[TokenChunk]:
        try:
            while True:
                chunk = await req.queue.get()
                yield chunk
                if chunk.finished:
                    return
        finally:
            if not req.done:  # consumer went away: free the engine
                await self.abort(req.request.request_id)

    async def abort(self, request_id: str) -> None:
        paused = self._paused.pop(request_id, None)
        if paused is not None:
            self.engine.prefill_blocks -= paused[1]
        if request_id in self._reqs:
            self.engine.abort(request_id)
            self._finish(request_id, "abort")
        self._changed()

    def _finish(
        self, rid: str, reason: str, tokens: tuple[int, ...] = (), index: int | None = None, text: str = ""
    ) -> None:
        req = self._reqs.pop(rid, None)
        if req is None:
            return
        req.done = True
        idx = req.next_index if index is None else index
        req.queue.put_nowait(TokenChunk(rid, idx, tokens, finished=True, finish_reason=reason, text=text))

    # ---- the engine loop ------------------------------------------------------------------------------
    def _check_alive(self) -> None:
        if self._failed is not None:
            raise RuntimeError(f"engine failed: {self._failed}")

    async def _run(self) -> None:
        try:
            await self._steps()
        except Exception as e:
            # NOTE: this loop is the engine. Ended silently, every stream on it waited forever (its polls answered
            # "nothing yet") and new requests were queued into it; now they end with the fault, as vLLM's do when its
            # engine core dies, and stats/generate raise, so the instance stops reporting itself fit for work.
            log.exception("simulated engine failed")
            self._failed = f"{type(e).__name__}: {e}"
            for rid in list(self._reqs):
                self._finish(rid, f"error: engine failed: {self._failed}")

    async def _steps(self) -> None:
        assert self._wake is not None
        em = self.engine
        due: float | None = None  # the modelled end of the step before, when this one follows it at once
        last_s = 0.0  # that step's scaled time (the most debt a step takes over)
        while True:
            if not em.has_work:
                due = None
                self._wake.clear()
                await self._wake.wait()
                continue
            async with self._step_lock:
                self._wake.clear()  # from here a change (work, freed KV) wakes a step that scheduled nothing
                now = time.perf_counter()
                # NOTE: a step back to back with the one before starts at that one's modelled end: the CPU spent
                # since -- the sleep's overshoot, emitting its tokens (ids, text, queues), a stats read -- is this
                # step's time, not added to it. Started at ``now``, every decode step ran late by its batch's
                # emitting, more on a busier host: live TPOT 1.1-1.2x the model's on the
                # shared 2-core box (docs/routing.md, "Live vs simulated, under load"). A debt of more than one
                # step is dropped (no catching up in a burst of short steps after a stall).
                t0 = now if due is None else max(due, now - last_s)
                r = em.step(want_emitted=True)
                # sleep until the modelled end of the step, less what the bookkeeping and the step before overran
                last_s = r.duration_s * self.time_scale
                due = t0 + last_s
                await asyncio.sleep(max(due - time.perf_counter(), 0.0))
                done = {s.rid for s in r.finished}
                for rid in done:
                    self._remember_handoff(rid)
                for rid in r.emitted or ():
                    self._emit(rid, rid in done)
            if r.duration_s <= 0.0 and not r.preempted:
                due = None
                # Nothing schedulable: queued prompts the KV a migration holds (a reservation, a paused request)
                # keeps out, nothing running. Wait for a change; it stepped in a loop, ~100k empty steps a second
                # on the host's cores, until the KV was freed.
                await self._wake.wait()

    def _emit(self, rid: str, engine_done: bool) -> None:
        req = self._reqs.get(rid)
        if req is None:  # aborted while the step was "running"
            return
        idx = req.next_index
        tok = sim_token(req.seed, rid, idx, self.vocab_size)
        # Decoded after the ids before it, as vLLM streams text: alone, each byte of a multi-byte character came
        # out as its own U+FFFD (a resumed request's prompt ends with the outputs streamed before).
        text = text_after(self.tokenizer.decode, req.outputs, (tok,), before=req.request.prompt_token_ids)
        req.next_index += 1
        req.outputs.append(tok)
        req.remaining -= 1
        sp = req.request.sampling
        if tok in sp.stop_token_ids and not sp.ignore_eos:
            if not engine_done:
                self.engine.abort(rid)
            self._finish(rid, "stop", (tok,), idx, text)
        elif engine_done or req.remaining <= 0:
            if not engine_done:
                self.engine.abort(rid)
            self._finish(rid, "length", (tok,), idx, text)
        else:
            req.queue.put_nowait(TokenChunk(rid, idx, (tok,), text=text))

    def set_role(self, role: InstanceRole) -> None:
        self.role = InstanceRole.parse(role)

    def _remember_handoff(self, rid: str) -> None:
        req = self._reqs.get(rid)
        if req is None or (self.role is not InstanceRole.PREFILL and req.request.sampling.max_tokens != 1):
            return
        self._handoff[rid] = tuple(req.request.prompt_token_ids)
        while len(self._handoff) > _HANDOFF_KEEP:
            self._handoff.popitem(last=False)

    # ---- stats and KV ---------------------------------------------------------------------------------
    async def stats(self) -> EngineStats:
        self._check_alive()
        # Read between two steps, as vLLM answers its stats call: the engine model books a step's outcome when the
        # step starts, so a read during its modelled time showed finishes (KV freed) and computed chunks up to a step
        # before their tokens came out -- ahead of a real engine and of the simulator (which shows them at the end).
        async with self._step_lock:
            return self._stats()

    def _stats(self) -> EngineStats:
        em = self.engine
        snap = em.snapshot("", 0.0, detail=True)
        return EngineStats(
            num_running=em.num_running,
            num_waiting=len(em.waiting),
            kv_blocks_used=em.blocks_used(),
            kv_blocks_total=em.total_blocks,
            block_size=em.block_size,
            num_preemptions=em.num_preemptions,
            prompt_tokens_computed=em.prompt_tokens_computed,
            prompt_tokens_loaded=em.prompt_tokens_loaded,
            prompt_tokens_cached=em.prefix_hit_tokens,
            requests=snap.requests,
            prefill_tokens_pending=snap.prefill_tokens_pending,
            prefill_compute_tokens=snap.prefill_compute_tokens,
            cached_hash_ids=snap.cached_hash_ids,
        )

    def snapshot(self, instance_id: str, now_s: float, **static: object) -> InstanceSnapshot:
        """The engine model's own snapshot (richer than one derived from ``stats``)."""
        return self.engine.snapshot(instance_id, now_s, detail=True, **static)

    async def export_kv(self, request_id: str, start_token: int = 0, end_token: int | None = None) -> KVBlocks:
        """KV of ``[start_token, end_token)``: a running request's computed context, or a handed-off prompt."""
        req = self._reqs.get(request_id)
        if req is not None:
            tokens = tuple(req.request.prompt_token_ids) + tuple(req.outputs)
            seq = self.engine.get(request_id)
            have = self.engine.computed_of(seq) if seq is not None else 0
        elif request_id in self._handoff:
            tokens = self._handoff[request_id]
            have = len(tokens)
        else:
            raise KeyError(f"request_id: {request_id!r} is not on this engine")
        end = have if end_token is None else min(end_token, have)
        if not 0 <= start_token <= end:
            raise ValueError(f"start_token: {start_token} outside [0, {end}] for {request_id!r}")
        n = end - start_token
        return KVBlocks(request_id, start_token, end, tokens[start_token:end], n * self.model.kv_bytes_per_token,
                        source_gpu=self.gpu)

    # ---- live migration (scheduler.transfer.migration) ----------------------------------------------------
    def _blocks(self, tokens: int) -> int:
        return -(-int(tokens) // self.engine.block_size)

    def _release_reservation(self, request_id: str) -> None:
        held = self._reserved.pop(request_id, 0)
        if held:
            self.engine.prefill_blocks -= held
            self._changed()

    def _changed(self) -> None:
        """Changed outside a step -- KV no request owned given back (a reservation, a paused request's), a queued
        request gone: a queued prompt may fit now; an engine loop waiting on an empty step steps again."""
        if self._wake is not None:
            self._wake.set()

    async def reserve_kv(self, request_id: str, tokens: int, template: EngineRequest | None = None, *,
                         whole_tokens: int | None = None) -> str | None:
        """Destination handshake: hold blocks for ``tokens`` (as held-by-nobody prefill blocks, like the
        simulator's driver). Returns why not, or ``None``: also when ``whole_tokens`` (the request's prompt +
        max_tokens) exceeds the whole KV here, which the commit's admission would refuse (the simulator's driver
        refuses it here too). (``template``: unused, nothing to pre-admit here.)"""
        if request_id in self._reqs:
            return f"request {request_id!r} is already running on this engine"
        if whole_tokens is not None and self._blocks(whole_tokens) > self.engine.total_blocks:
            return (f"its whole context ({whole_tokens} tokens) needs {self._blocks(whole_tokens)} KV blocks, "
                    f"the engine has {self.engine.total_blocks}")
        self._release_reservation(request_id)
        need = self._blocks(tokens)
        free = self.engine.total_blocks - self.engine.blocks_used()
        if need > free:
            return f"needs {need} KV blocks, {free} free"
        self.engine.prefill_blocks += need
        self._reserved[request_id] = need
        return None

    async def stage_kv(
        self, request_id: str, kv: KVBlocks | None, rng_state: bytes | None = None, *, final: bool = False
    ) -> int:
        """Destination: receive one stage copy, taking the transfer time over the link from its source's GPU type
        (``kv.source_gpu``; this one's when unknown) to this one's, as the simulator's migration does."""
        if kv is None:
            return 0
        end, toks = self._staged.get(request_id, (0, ()))
        if kv.start_token > end:
            raise ValueError(f"kv.start_token: gap in staged KV, have [0, {end}) then {kv.start_token}")
        dt = kv_transfer_between(kv.end_token - kv.start_token, self.model, kv.source_gpu or self.gpu, self.gpu)
        await asyncio.sleep(dt * self.time_scale)
        self._staged[request_id] = (max(end, kv.end_token), toks[: kv.start_token] + tuple(kv.token_ids))
        return kv.nbytes

    async def cancel_incoming(self, request_id: str) -> None:
        self._staged.pop(request_id, None)
        self._release_reservation(request_id)
        if request_id in self._reqs:
            await self.abort(request_id)

    async def pause(self, request_id: str, start_token: int) -> tuple[MigrationSnapshot, KVBlocks | None] | str:
        """Source stop-and-copy: take the decoding request out of the engine model (its blocks stay held) and
        return its state and the KV of ``[start_token, context - 1)``."""
        async with self._step_lock:  # between two steps (see _step_lock)
            return self._pause(request_id, start_token)

    def _pause(self, request_id: str, start_token: int) -> tuple[MigrationSnapshot, KVBlocks | None] | str:
        req = self._reqs.get(request_id)
        if req is None:
            return "request is not running on this engine (finished?)"
        seq = self.engine.detach(request_id)
        if seq is None:
            return "request is not decoding (queued or prefilling)"
        held = self._blocks(seq.num_tokens)
        self.engine.prefill_blocks += held
        self._paused[request_id] = (seq, held)
        tokens = tuple(req.request.prompt_token_ids) + tuple(req.outputs)
        snap = MigrationSnapshot(request_id, tokens, req.next_index)
        n = len(tokens) - 1
        kv = None
        if 0 <= start_token < n:
            kv = KVBlocks(request_id, start_token, n, tokens[start_token:n],
                          (n - start_token) * self.model.kv_bytes_per_token, source_gpu=self.gpu)
        return snap, kv

    async def resume(self, request_id: str) -> bool:
        """Source abort path: the paused request continues here (re-admitted with its KV cached)."""
        paused = self._paused.pop(request_id, None)
        if paused is None:
            return False
        seq, held = paused
        self.engine.prefill_blocks -= held  # given back whether or not the request is still here
        self._changed()
        if request_id not in self._reqs:
            return False
        # Back where it was: ahead of queued prompts (vLLM's paused request never left its running batch), with
        # its prompt's ids (a later preemption recomputes only what the prefix cache lost, as before the pause).
        self.engine.add_request(request_id, seq.num_tokens, max(seq.max_new, 1),  # type: ignore[attr-defined]
                                cached_tokens=seq.num_tokens - 1,  # type: ignore[attr-defined]
                                priority=seq.priority, hash_ids=seq.hash_ids,  # type: ignore[attr-defined]
                                hash_block_tokens=seq.hash_block_tokens or HASH_BLOCK_TOKENS,  # type: ignore[attr-defined]
                                front=True)
        assert self._wake is not None
        self._wake.set()
        return True

    def release_kv(self, request_id: str) -> bool:
        """Forget a handed-off request's exportable KV (the decode side has it)."""
        return self._handoff.pop(request_id, None) is not None
