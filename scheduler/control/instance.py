"""``Instance``: the Ray actor that owns one engine backend (one model instance, one placement group).

Streaming: an actor-side buffer per request, drained by the ingress with long polls::

    ingress                          Instance actor                      backend
    submit(req) -----------------> pump task: async for chunk in generate(req) -> buffer
           <---- first chunk(s) --  (submit waits for the first chunk: TTFT is one round trip)
    poll(rid) -------------------> waits until the buffer is non-empty, returns it merged into one chunk
           <---- chunk ------------
    ...until a chunk with finished=True

NOTE(control): measured here (``docs/architecture.md``), a Ray streaming generator from an async actor method costs
~1.3-1.8 ms to the first item and ~0.7 ms lag per item; submit + long poll costs ~0.7-1.1 ms to the first item and
~0.4 ms per poll, and a poll carries every token produced since the last one, so slow consumers batch for free.
The same submit/poll/abort/snapshot calls are also served on a direct TCP channel (``control/channel.py``, ~0.1 ms
a round trip); the ingress uses it when ``InstanceInfo.channel`` is set and falls back to Ray on any channel error.

Actor calls return values for expected outcomes (``Submitted.rejected``, ``None`` for unknown requests); an
exception from a call means a bug or a dead actor (``RayActorError``), which the ingress treats as a crash.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import importlib
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from scheduler.config.models import GPUSpec, ModelSpec, PoolSpec
from scheduler.control.channel import ChannelServer
from scheduler.core.types import InstanceRole, InstanceSnapshot, RequestLoad
from scheduler.engine.base import EngineBackend, EngineRequest, EngineStats, KVBlocks, TokenChunk
from scheduler.predict.base import LengthPrediction, remaining_tokens

log = logging.getLogger(__name__)

_TIMINGS_KEPT = 4096  # request_timings entries (a live run reads them after its replay)
# How long ``shutdown`` waits for the ends of the streams it stopped to be polled before it closes the channel.
SHUTDOWN_HANDOVER_S = 1.0
_FINISHED_KEPT = 1024  # final answers kept for a poll retry (a lost one is noticed within one poll timeout)
# The finish_reason of a stream ended by ``shutdown`` (the instance is released with it still running): the ingress
# recovers it elsewhere. Read as the "abort" it is underneath, the client's stream ended as cancelled half-way.
# A release of a broken instance (``shutdown(broken=...)``: its engine hung or failed) ends them ``ENGINE_FAILED``
# instead: the engine failed under them, and the ingress's quarantine counts it (as "released" it never counted a
# hung engine, so a request that hangs every engine was re-run on each).
RELEASED = "released"
# The finish_reason prefix of a stream that ended because its engine failed (``_pump`` asks the engine: it no longer
# reports its load), not because of the request: the ingress recovers it elsewhere as it does a dead instance's. (The
# simulated engine's own fault chunks read so already.) Any other ``error: ...`` is the request's own: final.
ENGINE_FAILED = "error: engine failed"
# The field of ``Submitted.rejected`` when a draining instance refuses a new request (``submit``): the ingress routes
# it elsewhere -- not the client's error, nor a failure of the instance.
DRAINING = "draining"
# The field of ``Submitted.rejected`` when the instance's role changed since the view its router read (a finished
# role switch the view predates: ``submit``'s ``view_role``): routed around as a drain refusal is.
ROLE_CHANGED = "role_changed"

# backend kind (PoolSpec.backend) -> "module:factory"; factory(model=, gpu=, pool=, role=, **backend_kwargs)
BACKENDS: dict[str, str] = {
    "simulated": "scheduler.control.instance:make_simulated_backend",
    "vllm": "scheduler.control.instance:make_vllm_backend",
}


def make_simulated_backend(
    *, model: ModelSpec, gpu: GPUSpec, pool: PoolSpec, role: InstanceRole, latency_profile: str | None = None,
    **kwargs: Any,
) -> EngineBackend:
    """The engine model in real time for ``pool``. ``latency_profile``: the cluster config's (``llmsched profile``),
    which the Controller hands to every simulated pool: the steps then take what the simulator times them at
    (``scheduler.latency.latency_factory``), not the roofline's."""
    from scheduler.engine.simulated_backend import SimulatedBackend

    if latency_profile and "latency" not in kwargs:
        from scheduler.profile import latency_from_profile

        kwargs["latency"] = latency_from_profile(latency_profile, model, gpu, pool.tp)
    return SimulatedBackend(model, gpu, tp=pool.tp, engine=pool.engine, role=role, **kwargs)


def make_vllm_backend(
    *, model: ModelSpec, gpu: GPUSpec, pool: PoolSpec, role: InstanceRole, model_path: str | None = None,
    **kwargs: Any,
) -> EngineBackend:
    """A vLLM engine for ``pool`` serving ``model.weights(model_path)`` (``model.path``, else the generated tiny
    model; a ``model_path`` backend kwarg overrides both), in the config's dtype; PREFILL instances save
    every prompt's KV for export (``kv_producer``); TP > 1 runs vLLM's Ray executor in the instance's group.

    On the CPU build (TP 1) every engine's worker runs ONE unbound OpenMP thread (``cpu_threads_bind="nobind"``,
    ``cpu_omp_threads=1``) unless the pool's backend kwargs say otherwise. vLLM's "auto" binding gives every engine
    an OMP team over all allowed cores (on a 2-core host: cores [0, 1], 2 threads, each), so co-located engines'
    teams spin-wait against each other; that made live latencies unrepeatable (docs/history/live_vs_sim.md,
    2026-11-22).
    Its worker runs in the engine-core process (``distributed_executor_backend="uni"``; see below)."""
    from vllm.platforms import current_platform

    from scheduler.engine.vllm_backend import VLLMBackend

    weights = model.weights(model_path)  # first: a missing model.path fails before anything else is built
    on_cpu = current_platform.is_cpu()
    e = pool.engine
    # vLLM-CPU needs a multiple of 32; a GPU takes the config's (rounded there, live prefix hits and KV came in
    # coarser blocks than the engine model's).
    block = max(32, -(-e.block_size // 32) * 32) if on_cpu else e.block_size
    kw: dict[str, Any] = {
        "block_size": block,
        "max_model_len": model.max_model_len,
        "max_num_seqs": e.max_num_seqs,
        # The config's per-step token budget, as the simulator's engine model chunks prefills by (the backend's
        # default was the whole max_model_len).
        "max_num_batched_tokens": e.max_num_batched_tokens,
        "kv_role": "kv_producer" if role is InstanceRole.PREFILL else "kv_both",
        # The config decides, as in the simulator (vLLM's own default is on; live migration's fast path needs it).
        "enable_prefix_caching": e.enable_prefix_caching,
    }
    engine_kwargs: dict[str, Any] = {}
    if e.num_kv_blocks is not None:
        # The config's KV capacity, as the engine model has it: its tokens (in the config's block size), plus the
        # block vLLM keeps as its null block, per GPU. It was the backend's fixed 256 MiB: 16x the cpu-pd example's
        # 256 blocks, so live KV usage read a sixteenth of the simulator's and never bound where it did.
        tokens = e.num_kv_blocks * e.block_size + block
        kw["kv_cache_bytes"] = tokens * model.kv_bytes_per_token_per_gpu(pool.tp)
    elif not on_cpu:
        # On a GPU vLLM sizes the KV from the pool's gpu_memory_utilization, as the engine model does. It was the
        # backend's fixed 256 MiB (a CPU host-memory size): an 80 GiB GPU got a few hundred tokens of KV.
        kw["kv_cache_bytes"] = None
    if not on_cpu:
        engine_kwargs["gpu_memory_utilization"] = e.gpu_memory_utilization
    if pool.tp > 1:
        engine_kwargs.update(tensor_parallel_size=pool.tp, distributed_executor_backend="ray")
    elif on_cpu:
        kw["cpu_threads_bind"] = "nobind"
        kw["cpu_omp_threads"] = 1
        # The worker inside the EngineCore process: vLLM's default here is a separate worker process whose
        # shared-memory queue readers busy-spin (sched_yield) for 1 s after every message, so co-located
        # engines burn the host's few cores waiting on each other, and each step pays one more IPC hop.
        engine_kwargs["distributed_executor_backend"] = "uni"
    if model_path is not None or model.path is not None:
        # The config's dtype: the backend's default is the tiny model's float32, which upcast real weights (twice
        # their bf16 memory). fp8 names a quantized checkpoint: vLLM reads its dtype from the checkpoint.
        kw["dtype"] = "auto" if model.dtype == "fp8" else model.dtype
    kw["engine_kwargs"] = engine_kwargs
    kw.update(kwargs)
    return VLLMBackend(weights, **kw)


def make_backend(
    kind: str, *, model: ModelSpec, gpu: GPUSpec, pool: PoolSpec, role: InstanceRole, **kwargs: Any
) -> EngineBackend:
    """Build the backend of a pool: a registered kind or a ``module:callable`` path."""
    target = BACKENDS.get(kind, kind if ":" in kind else None)
    if target is None:
        raise ValueError(f"backend: unknown kind {kind!r}; allowed: {', '.join(sorted(BACKENDS))} or module:callable")
    mod, _, attr = target.partition(":")
    factory = getattr(importlib.import_module(mod), attr)
    return factory(model=model, gpu=gpu, pool=pool, role=role, **kwargs)


@dataclass(frozen=True, slots=True)
class InstanceInfo:
    """Static facts about one instance; ``incarnation`` differs for every actor ever created."""

    instance_id: str
    pool: str
    role: InstanceRole
    gpu: str
    tp: int
    model: str
    backend: str
    incarnation: str
    node_id: str = ""
    pid: int = 0
    channel: str = ""  # "host:port" of the direct hot-path channel ("" = none: use Ray calls only)
    channel_token: str = ""  # what a peer presents to use it (travels through Ray, like the handle)


@dataclass(frozen=True, slots=True)
class Submitted:
    """Answer to ``submit``: the first chunk(s), or why the engine refused the request."""

    chunks: tuple[TokenChunk, ...] = ()
    rejected: str | None = None  # message naming the field (engine-side validation)
    # With a ``draining:`` refusal: the instance leaves (an admin drain, or its release began) and refuses a P->D
    # handoff's KV too -- the ingress then pairs no handoff with it; a scale-down's drain still takes those.
    leaving: bool = False
    role: InstanceRole | None = None  # with a ``role_changed:`` refusal: the role it serves as now


@dataclass(slots=True)
class _Stream:
    buffer: list[TokenChunk] = field(default_factory=list)
    event: asyncio.Event = field(default_factory=asyncio.Event)
    done: bool = False
    predicted: float | None = None
    dist: LengthPrediction | None = None  # the predictor's distribution behind ``predicted``: renews it
    before: int = 0
    last_poll: float = field(default_factory=time.monotonic)
    task: asyncio.Task[None] | None = None
    sent: TokenChunk | None = None  # the last chunk handed out, kept until a poll shows it arrived
    export: bool = False  # P->D prefill: start exporting the prompt KV the moment the stream ends
    migrated: bool = False  # released by a committed migration: its end reads "migrated", not "abort"
    paused: bool = False  # stopped for a migration's stop-and-copy: waits on its driver, not on the engine
    unread: bool = False  # its caller polls it no more (``abort(forget=True)``): dropped once ended
    polls: int = 0  # polls waiting on it: its ingress is alive, whatever ``last_poll`` says (see _reap)
    received: float = field(default_factory=time.time)  # wall clock at submit (request_timings)
    # The request's context (prompt + the ``before`` outputs emitted elsewhere): a poll from an index below
    # ``before`` gets those outputs again (a migration's source died before delivering its last tokens).
    context: tuple[int, ...] = ()


def _not_received(chunk: TokenChunk | None, from_index: int | None) -> bool:
    """Whether a caller that has everything before ``from_index`` still lacks some of ``chunk``'s tokens."""
    return chunk is not None and from_index is not None and from_index < chunk.index + len(chunk.token_ids)


def merge_chunks(chunks: list[TokenChunk]) -> TokenChunk:
    """Consecutive chunks of one request as one chunk (indices are contiguous by construction)."""
    if len(chunks) == 1:
        return chunks[0]
    first, last = chunks[0], chunks[-1]
    tokens = tuple(t for c in chunks for t in c.token_ids)
    text = "".join(c.text for c in chunks)
    return TokenChunk(first.request_id, first.index, tokens, last.finished, last.finish_reason, text)


class Instance:
    """One engine instance. Create with ``ray.remote(Instance).options(...)``; see ``Controller``.

    Args:
        instance_id: unique within the cluster (``<pool>-<n>``).
        pool: the pool spec (role, GPU type, TP, backend kind, engine settings).
        model, gpu: model shape and GPU spec (the simulated backend's latency model reads them).
        backend_kwargs: extra keyword arguments for the backend factory (``time_scale``, ``seed``, paths).
        lease_s: abort a request nobody polled for this long (its ingress died); likewise free an incoming
            migration's reservation, staged KV and pre-admitted copy that no migration step touched for this long.
    """

    def __init__(
        self,
        instance_id: str,
        pool: PoolSpec,
        model: ModelSpec,
        gpu: GPUSpec,
        *,
        backend_kwargs: dict[str, Any] | None = None,
        lease_s: float = 30.0,
    ) -> None:
        import os

        self.instance_id = instance_id
        self.pool = pool
        self.role = pool.role
        self._model = model
        self._gpu = gpu
        self._backend_kwargs = dict(backend_kwargs or {})
        self._lease_s = lease_s
        self._backend: EngineBackend | None = None
        self._streams: dict[str, _Stream] = {}
        # Last answers of finished streams (bounded): resent if that answer was lost on a direct channel.
        self._finished: collections.OrderedDict[str, TokenChunk] = collections.OrderedDict()
        # Incoming live migrations (destination side) -> last protocol step seen: the driving ingress may die
        # between the handshake and the commit, and nothing else would ever free what the handshake reserved.
        self._incoming: dict[str, float] = {}
        # Source: a migration's stop (pause) still running, per request id; its resume waits for it (see migrate_resume).
        self._stopping: dict[str, asyncio.Event] = {}
        self._draining = False
        self._leaving = False  # draining for an admin drain: released once its requests moved (snapshot.leaving)
        # Set when shutdown began: the finish_reason of streams ended from here on (RELEASED, or ENGINE_FAILED: ...).
        self._closing: str | None = None
        self._faults: dict[str, str] = {}  # migration step -> injected fault kind (tests: fail / hang / exit)
        self._reaper: asyncio.Task[None] | None = None
        self._starting: asyncio.Future[None] | None = None
        self._channel: ChannelServer | None = None
        # P->D prefill side: exports started when a handoff request's prefill ended (request id -> (started, task)).
        self._exports: dict[str, tuple[float, asyncio.Task[KVBlocks]]] = {}
        # request_id -> (submit received, first token out of the engine), wall clock, newest _TIMINGS_KEPT.
        self._timings: collections.OrderedDict[str, tuple[float, float]] = collections.OrderedDict()
        # Progress watchdog (``PoolSpec.hang_timeout_s``): streams still running, the last sign of engine progress
        # (a chunk out, or prompt tokens computed as the stats show: a long chunked prefill emits nothing for many
        # steps), and the engine's computed-prompt count at the last stats read.
        self._running = 0
        self._progress_s = time.monotonic()
        self._computed = 0
        node_id = ""
        try:
            import ray

            node_id = ray.get_runtime_context().get_node_id()
        except Exception:  # noqa: BLE001 - also usable without Ray (unit tests)
            node_id = ""
        self.info = InstanceInfo(
            instance_id, pool.name, pool.role, pool.gpu, pool.tp, model.name, pool.backend, uuid.uuid4().hex,
            node_id, os.getpid(),
        )

    # ---- lifecycle ------------------------------------------------------------------------------------
    async def start(self) -> InstanceInfo:
        """Build and start the backend. Idempotent and single-flight: a second call while the first runs (a restarted
        Controller adopting an instance whose start it did not see finish) waits for that one -- it built a second
        engine, and answered before the channel was up. Returns the instance's static info."""
        if self._starting is None:
            self._starting = asyncio.ensure_future(self._start())
        await asyncio.shield(self._starting)
        return self.info

    async def _start(self) -> None:
        backend = make_backend(
            self.pool.backend, model=self._model, gpu=self._gpu, pool=self.pool, role=self.role,
            **self._backend_kwargs,
        )
        await backend.start()
        self._backend = backend
        self._reaper = asyncio.create_task(self._reap())
        await self._start_channel()

    async def _start_channel(self) -> None:
        """The hot path (submit without KV, poll, abort, snapshot) also served on a direct TCP channel
        (``scheduler.control.channel``): a Ray round trip costs ~1.3-1.9 ms here, the channel's ~0.1 ms."""
        host = "127.0.0.1"
        try:
            import ray

            if ray.is_initialized():
                host = ray.util.get_node_ip_address()
        except Exception:  # noqa: BLE001 - outside Ray (unit tests): loopback
            log.debug("%s: no Ray node address; channel on loopback", self.instance_id)
        token = uuid.uuid4().hex
        server = ChannelServer(
            {"submit": self.submit, "poll": self.poll, "abort": self.abort, "snapshot": self.snapshot}, token
        )
        try:
            address = await server.start(host)
        except OSError:
            log.exception("%s: direct channel not started; ingresses use Ray calls only", self.instance_id)
            return
        self._channel = server
        self.info = dataclasses.replace(self.info, channel=address, channel_token=token)

    async def get_info(self) -> InstanceInfo:
        return self.info

    async def health(self) -> bool:
        """Whether this instance serves: started, its engine reports its load, and it is not hung -- its snapshot's
        verdict (this said True for any started instance, a failed or hung engine included)."""
        try:
            return (await self.snapshot()).healthy
        except Exception:  # noqa: BLE001 - not started, or its engine failed
            return False

    async def shutdown(self, broken: str | None = None) -> None:
        """Stop the engine; streams still running end RELEASED, or ``ENGINE_FAILED: <broken>`` when the Controller
        releases the instance because its engine is broken (``broken`` says how: hung, failed)."""
        self._closing = RELEASED if broken is None else f"{ENGINE_FAILED}: {broken} (instance released)"
        for rid, st in list(self._streams.items()):
            if broken is None:
                try:
                    await self.abort(rid)  # through the engine: it frees the request's KV; the stream ends RELEASED
                    continue
                except Exception as e:  # noqa: BLE001 - ended here instead; one failure stopped the whole shutdown
                    # (vLLM's abort raises EngineDeadError on a dead engine core): the other streams ended in the
                    # kill, an actor death the ingress's quarantine counts, and nothing was closed.
                    log.warning("%s: abort of %s failed (%s); ending its stream here", self.instance_id, rid, e)
            # Broken: ended here, not through the engine -- a hung engine may never answer an abort (vLLM's drops the
            # request's saved KV by a call into its engine core), and the actor is killed 5 s into this call.
            if not st.done and st.task is not None:
                st.task.cancel()
                st.buffer.append(TokenChunk(rid, -1, (), True, self._closing))
                st.event.set()
        # Let the waiting polls take those ends (bounded: the Controller kills the actor 5 s into this call). The
        # channel closed at once and dropped them, and the ingress's retry over Ray met the killed actor: the end
        # read as a plain actor death, never as RELEASED or an engine failure.
        deadline = time.monotonic() + SHUTDOWN_HANDOVER_S
        while self._streams and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        if self._reaper is not None:
            self._reaper.cancel()
        if self._channel is not None:
            await self._channel.close()
        if self._backend is not None:
            await self._backend.shutdown()

    async def set_draining(self, draining: bool = True, leaving: bool = False) -> None:
        """A draining instance says so in its snapshot; routers then skip it, and ``submit`` refuses what one routed
        here on an older view. ``leaving``: an admin drain, which releases it once its requests have moved
        (``InstanceSnapshot.leaving``); un-draining ends it too."""
        self._draining = draining
        self._leaving = draining and leaving

    async def set_role(self, role: InstanceRole | str) -> InstanceInfo:
        """Serve as ``role`` from now on (dynamic re-roling between PREFILL and DECODE, applied by the
        Controller). Only an idle instance switches: a request in flight keeps the role it was placed for."""
        new = InstanceRole.parse(role)
        backend = self._require_backend()
        # An ended stream holds nothing but its last answer, and one that nobody will poll (its client left, a
        # migration's freed copy) stays until the lease: counted, it held a re-roling back for lease_s.
        running = sum(not st.done for st in self._streams.values())
        if running or self._incoming:
            raise ValueError(f"role: {self.instance_id} still has {running} request(s) and "
                             f"{len(self._incoming)} incoming migration(s); drain it first")
        backend.set_role(new)
        self.role = new
        self.info = dataclasses.replace(self.info, role=new)
        return self.info

    # ---- requests -------------------------------------------------------------------------------------
    async def submit(
        self,
        request: EngineRequest,
        kv: KVBlocks | None = None,
        *,
        predicted_output_tokens: float | None = None,
        length_dist: LengthPrediction | None = None,
        wait_first: bool = True,
        adopt: bool = False,
        export_on_finish: bool = False,
        view_role: InstanceRole | str | None = None,
    ) -> Submitted:
        """Start ``request``; with ``wait_first``, return once its first chunk exists.

        ``kv`` is a top-level argument so that the caller can pass an ``ObjectRef`` from another instance's
        ``export_kv``: Ray resolves it here, moving the KV node-to-node without passing through the caller.
        ``adopt``: the caller's own earlier submit of this request may have run here with its reply lost (a direct
        channel dropped it; the ingress retries over Ray): answer with that stream instead of refusing the id.
        ``export_on_finish``: a P->D prefill: export the prompt KV as soon as the stream ends, so that the
        ingress' ``export_kv`` for the decode side finds it ready (or under way) instead of starting it a hop later.

        A draining instance refuses a new request (``rejected`` starts ``draining:``; the ingress routes it
        elsewhere): one that leaves (an admin drain, released once its requests moved; or one being released)
        refuses every one (``Submitted.leaving``); one that drains for a scale-down or a role switch refuses those
        without KV -- it still takes a P->D handoff's prompt KV, paired with it at arrival, which its drain waits for
        (as the simulator's pairing does). A router skips a draining instance once its view has the snapshot; these
        are the ones routed on an older view.

        ``view_role``: this instance's role as the view the caller routed the request here on showed it. Refused
        (``rejected`` starts ``role_changed:``, ``Submitted.role`` the role now; the ingress routes it elsewhere) when
        the role differs now: a role switch finished after that view was taken, and the leg was meant for the old
        role (a prefill-only leg sent to what decodes now, a whole request or a handoff's KV to what prefills now).
        The rule is "changed since the view", never "the wrong role for the leg": a router may send work across
        roles on purpose (a Splitwise borrow, a fallback), with the role it saw. ``None``: not checked (a caller
        that routed on no view). An ``adopt`` retry whose first submit ran here gets that stream, as before.
        """
        return await self._submit(request, kv, predicted_output_tokens=predicted_output_tokens,
                                  length_dist=length_dist, wait_first=wait_first, adopt=adopt,
                                  export_on_finish=export_on_finish, refuse_draining=True,
                                  view_role=None if view_role is None else InstanceRole.parse(view_role))

    async def _submit(
        self, request: EngineRequest, kv: KVBlocks | None, *, predicted_output_tokens: float | None,
        length_dist: LengthPrediction | None, wait_first: bool, adopt: bool, export_on_finish: bool,
        refuse_draining: bool, view_role: InstanceRole | None = None,
    ) -> Submitted:
        """``submit``; ``refuse_draining`` off for a committed migration's admission (``migrate_commit``): its
        reservation was granted before the drain, and its source has stopped it already."""
        backend = self._require_backend()
        rid = request.request_id
        ran_here = rid in self._streams or _not_received(self._finished.get(rid), request.num_output_tokens_before)
        if adopt and ran_here:
            out = await self.poll(rid, self._lease_s / 2, request.num_output_tokens_before)  # bounded: see below
            return Submitted(chunks=(out,) if out is not None and (out.token_ids or out.finished) else ())
        # Being released (``shutdown`` began; the actor is killed next) counts as leaving: a request sent now, a
        # handoff's KV included, goes elsewhere. Taken, it ended at once as the released streams do -- "released",
        # re-prefilled elsewhere (a handoff's KV thrown away), or "engine failed", counted by the quarantine against
        # a request that never ran there.
        leaving = self._leaving or self._closing is not None
        if refuse_draining and (leaving or (self._draining and kv is None)):
            why = ("being released" if self._closing is not None else "leaving the cluster (an admin drain)"
                   if self._leaving else "draining (a scale-down or role switch)")
            return Submitted(rejected=f"{DRAINING}: {self.instance_id} is {why}; it takes no new requests",
                             leaving=leaving)
        if view_role is not None and view_role is not self.role:
            return Submitted(rejected=f"{ROLE_CHANGED}: {self.instance_id} serves as {self.role.value} now, not "
                             f"{view_role.value} as the view it was routed on showed it (a role switch since)",
                             role=self.role)
        if self._closing is not None:  # a committed migration's admission: it stays on its source
            return Submitted(rejected=f"{self.instance_id} is being released")
        old = self._streams.get(rid)
        if old is not None and old.done:
            # Ended (aborted: its client left, or its ingress failed it) and never polled to its end: nothing runs.
            # A new submit of the id is that client's retry; refused as "already running" until the lease dropped
            # the stream, the retry failed with INVALID_ARGUMENT.
            del self._streams[rid]
        if rid in self._streams:
            return Submitted(rejected=f"request_id: {rid!r} is already running on {self.instance_id}")
        self._finished.pop(rid, None)
        if kv is not None:
            request = dataclasses.replace(request, kv=request.kv + (kv,))
        try:
            chunks = backend.generate(request)
        except ValueError as e:
            return Submitted(rejected=str(e))
        st = _Stream(predicted=predicted_output_tokens, dist=length_dist, before=request.num_output_tokens_before,
                     export=export_on_finish, context=request.prompt_token_ids)
        self._streams[rid] = st
        if self._running == 0:  # work starts now: an idle spell before it is no stall
            self._progress_s = time.monotonic()
        self._running += 1
        st.task = asyncio.create_task(self._pump(rid, st, chunks))
        if not wait_first:
            return Submitted()
        # Bounded: a request queued for KV can wait longer than the lease for its first chunk, and a caller parked
        # here does not renew it (the reaper aborted such requests under overload). Answer "accepted, nothing yet"
        # in time; the caller's polls renew the lease from then on.
        out = await self._take(rid, st, timeout_s=self._lease_s / 2)
        return Submitted(chunks=(out,) if out is not None else ())

    async def _pump(self, rid: str, st: _Stream, chunks: Any) -> None:
        try:
            async for chunk in chunks:
                self._progress_s = time.monotonic()
                if chunk.token_ids and rid not in self._timings:
                    self._timings[rid] = (st.received, time.time())
                    if len(self._timings) > _TIMINGS_KEPT:
                        self._timings.popitem(last=False)
                if chunk.finished and st.migrated and chunk.finish_reason == "abort":
                    chunk = dataclasses.replace(chunk, finish_reason="migrated")
                elif chunk.finished and self._closing is not None and chunk.finish_reason == "abort":
                    chunk = dataclasses.replace(chunk, finish_reason=self._closing)
                if chunk.finished and chunk.finish_reason and chunk.finish_reason.startswith("error:"):
                    reason = await self._error_reason(chunk.finish_reason)
                    chunk = dataclasses.replace(chunk, finish_reason=reason)
                st.buffer.append(chunk)
                st.event.set()
                if chunk.finished:
                    if st.export and chunk.finish_reason == "length":
                        task = asyncio.create_task(self._require_backend().export_kv(rid, 0, None))
                        # Its error (if any) is re-raised to whoever asks; never "exception never retrieved".
                        task.add_done_callback(lambda t: t.cancelled() or t.exception())
                        self._exports[rid] = (time.monotonic(), task)
                    else:
                        self._drop_kv(rid)  # no handoff follows: nobody will ask for its prompt KV
                    break
        except Exception as e:
            log.exception("engine stream of %s failed", rid)
            reason = await self._error_reason(f"error: {type(e).__name__}: {e}")
            st.buffer.append(TokenChunk(rid, -1, (), True, reason))
            st.event.set()
        finally:
            st.done = True
            self._running -= 1
            if st.unread:
                self._drop_unread(rid, st)

    async def _error_reason(self, reason: str) -> str:
        """``reason`` (``error: ...``) of a stream that ended in error, as ``ENGINE_FAILED: ...`` when the engine
        failed under it (vLLM's EngineDeadError, the simulated loop's fault): asked, it cannot report its load, as the
        Controller judges a failed engine. Such a stream ended ``error:`` (FAILED at the client), though the instance
        is released and replaced anyway and a hung or dead one's streams were re-run elsewhere."""
        if reason.startswith(ENGINE_FAILED):
            return reason
        try:
            await asyncio.wait_for(self._require_backend().stats(), 5.0)
        except TimeoutError:
            return reason  # slow, not failed: a hung engine is the watchdog's (hang_timeout_s)
        except Exception:  # noqa: BLE001 - any error is the engine's verdict on itself
            return f"{ENGINE_FAILED}: {reason.removeprefix('error: ')}"
        return reason

    async def poll(
        self, request_id: str, timeout_s: float | None = 5.0, from_index: int | None = None
    ) -> TokenChunk | None:
        """Everything produced since the last poll, merged; waits up to ``timeout_s`` for something.

        ``from_index``: the first index the caller has not received. If the previous answer never arrived (a
        direct channel dropped it, the ingress retried over Ray), it is sent again; the ingress drops overlap.
        Returns ``None`` for an unknown request, an empty non-finished chunk on timeout.
        """
        st = self._streams.get(request_id)
        if st is None:
            last = self._finished.get(request_id)
            # A zero-token end (abort, engine error) has no index range to compare: a poll after it means its
            # answer was lost (the ingress stops polling once it sees the end), so it is sent again. Answering
            # None instead read as "request unknown" and the ingress gave up on a healthy instance.
            if _not_received(last, from_index) or (last is not None and not last.token_ids):
                return self._finished.pop(request_id)
            return None
        if from_index is not None and 0 <= from_index < st.before <= len(st.context):
            # Outputs emitted before this instance took over (the tail of its context) that the caller lacks:
            # after a committed migration whose source died before delivering them, the stream would have a gap.
            # Sent alone and without text (the caller decodes it): merged, the engine chunks' text would stand for
            # all of it.
            st.last_poll = time.monotonic()
            n = len(st.context) - st.before
            return TokenChunk(request_id, from_index, st.context[n + from_index:])
        if st.sent is not None and _not_received(st.sent, from_index):
            st.buffer.insert(0, st.sent)
            st.sent = None
        out = await self._take(request_id, st, timeout_s=timeout_s)
        return out if out is not None else TokenChunk(request_id, -1, ())

    async def _take(self, rid: str, st: _Stream, *, timeout_s: float | None) -> TokenChunk | None:
        st.last_poll = time.monotonic()
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        st.polls += 1
        try:
            # A loop, not one wait: two polls of one stream can overlap for a moment (a dropped channel's poll not
            # yet cancelled here while its Ray retry arrives), and the other one may have emptied the buffer.
            while not st.buffer:
                st.event.clear()
                try:
                    timeout = None if deadline is None else max(deadline - time.monotonic(), 0)
                    await asyncio.wait_for(st.event.wait(), timeout)
                except TimeoutError:
                    return None
        finally:
            # The lease runs from the poll's end: renewed only at its start, a poll waiting longer than the lease
            # (a request queued for KV, polled with a timeout above ``lease_s``) had its stream reaped under it.
            st.polls -= 1
            st.last_poll = time.monotonic()
        chunks, st.buffer = st.buffer, []
        merged = merge_chunks(chunks)
        if merged.token_ids:
            st.sent = merged
        if merged.finished:
            if self._streams.get(rid) is st:  # (a retry's new stream of the id may have replaced it: see submit)
                del self._streams[rid]
            # Kept for a retry of this poll whose answer was lost, token-less ends included (see poll).
            self._finished[rid] = merged
            while len(self._finished) > _FINISHED_KEPT:
                self._finished.popitem(last=False)
        return merged

    async def abort(self, request_id: str, forget: bool = False) -> bool:
        """Stop ``request_id`` and free its KV; its stream ends with ``finish_reason="abort"``. ``forget``: the
        caller polls it no more (its client left): the stream is dropped once ended. Kept, nothing took its end
        until the lease reaper, and a release meanwhile waited ``SHUTDOWN_HANDOVER_S`` for it in vain."""
        st = self._streams.get(request_id)
        if st is None or self._backend is None:
            return False
        st.unread = st.unread or forget
        await self._backend.abort(request_id)
        if st.unread and st.done:  # ended before this call (else its _pump drops it)
            self._drop_unread(request_id, st)
        return True

    def _drop_unread(self, rid: str, st: _Stream) -> None:
        if self._streams.get(rid) is st:  # (a retry's new stream of the id may have replaced it: see submit)
            del self._streams[rid]

    async def _reap(self) -> None:
        """Abort streams whose ingress stopped polling (it crashed), so their KV is not held forever."""
        while True:
            await asyncio.sleep(max(self._lease_s / 4, 0.05))
            now = time.monotonic()
            for rid, st in list(self._streams.items()):
                if not st.polls and now - st.last_poll > self._lease_s:
                    log.warning("%s: no poll for %s in %.1fs; aborting", self.instance_id, rid, self._lease_s)
                    await self._reap_one(self.abort, rid)
                    # Only this stream: a retry's new stream of the id may have replaced it during the abort.
                    if self._streams.get(rid) is st:
                        del self._streams[rid]
            for rid, (started, task) in list(self._exports.items()):
                if now - started > self._lease_s:  # nobody came for it (the decode side or the ingress died)
                    self._exports.pop(rid, None)
                    task.cancel()
                    self._drop_kv(rid)
            for rid, seen in list(self._incoming.items()):
                if now - seen > self._lease_s:
                    log.warning("%s: incoming migration of %s idle for %.1fs; freeing its reservation",
                                self.instance_id, rid, self._lease_s)
                    await self._reap_one(self.migrate_cancel, rid)
                    self._incoming.pop(rid, None)

    async def _reap_one(self, free: Any, rid: str) -> None:
        # One failure (an engine error while freeing) must not end the reaper: every later lease depends on it.
        try:
            await free(rid)
        except Exception:
            log.exception("%s: freeing %s after its lease failed", self.instance_id, rid)

    # ---- state ----------------------------------------------------------------------------------------
    async def stats(self) -> EngineStats:
        return await self._require_backend().stats()

    async def request_timings(self) -> dict[str, tuple[float, ...]]:
        """Per request this instance streamed: (submit received, first token out of its engine), wall clock --
        the server-side part of a live run's TTFT (``llmsched run`` keeps it per request) -- followed, where the
        backend records them (vLLM), by the engine's own (arrival at its front end, first scheduled, finished)."""
        engine_timings = getattr(self._require_backend(), "engine_timings", None)
        inner = await engine_timings() if engine_timings is not None else {}
        return {rid: t + inner.get(rid, ()) for rid, t in self._timings.items()}

    async def snapshot(self) -> InstanceSnapshot:
        """Load report for routers: engine counts plus per-request context/generated lengths. Unhealthy once the
        engine has held requests without progress for ``hang_timeout_s`` (``stalled_s``): a stuck engine whose
        actor still answers (a deadlocked worker, a step loop that stopped) kept its streams waiting for good and
        drew new requests; routers skip it now, and the Controller releases and replaces it."""
        s = await self._require_backend().stats()
        now = time.monotonic()
        if s.prompt_tokens_computed != self._computed:
            self._computed = s.prompt_tokens_computed
            self._progress_s = now
        hung = self.stalled_s(now) > self.pool.hang_timeout_s
        return snapshot_from_stats(s, self.info, time.time(), self._streams, draining=self._draining, healthy=not hung,
                                   leaving=self._leaving)

    def stalled_s(self, now: float | None = None) -> float:
        """Seconds the engine has held running requests without progress (0 while idle)."""
        now = time.monotonic() if now is None else now
        if not any(not st.done and not st.paused for st in self._streams.values()):
            # Idle, or holding only requests paused for a migration (a dead driver leaves one paused until its
            # lease): nothing the engine owes. Timed from here when work comes back.
            self._progress_s = now
            return 0.0
        return now - self._progress_s

    async def export_kv(self, request_id: str, start_token: int = 0, end_token: int | None = None) -> KVBlocks:
        early = self._exports.pop(request_id, None) if start_token == 0 and end_token is None else None
        if early is not None:
            kv = await early[1]
            # The handoff's one export: from here the object store holds the KV (the arrays stay alive with the
            # reply), and a decode side that dies recomputes rather than asks again.
            self._drop_kv(request_id)
            return kv
        return await self._require_backend().export_kv(request_id, start_token, end_token)

    def _drop_kv(self, request_id: str) -> None:
        """Free the prompt KV a finished request kept for a handoff (held up to a byte cap: without this, every
        prompt's KV stayed until the cap pushed it out). Never waits on the engine."""
        release = getattr(self._backend, "release_kv", None)
        if release is not None:
            release(request_id)

    async def reset_prefix_cache(self) -> bool:
        """Drop the engine's prefix cache (benchmarks that repeat a prompt; after a model/weights change).
        ``False`` when the backend has none or blocks are in use."""
        reset = getattr(self._require_backend(), "reset_prefix_cache", None)
        return bool(await reset()) if reset is not None else False

    # ---- live migration (protocol: scheduler.transfer.migration; driven by the ingress that owns the stream) ----
    async def inject_fault(self, step: str, kind: str = "fail") -> None:
        """Make this instance's next migration ``step`` (reserve | stage | commit) fail (raise), hang, or exit
        the actor process -- for fault tests of the destination side. One-shot.
        ``("channel", "drop")`` / ``("channel", "drop_submit")``: the direct channel runs the next poll / submit,
        then drops the connection unanswered (``"clear"`` disarms)."""
        drops = {"drop": "poll", "drop_submit": "submit", "clear": None}
        if step == "channel" and kind in drops and self._channel is not None:
            self._channel.drop_next = drops[kind]
            return
        if step not in ("reserve", "stage", "commit") or kind not in ("fail", "hang", "exit"):
            raise ValueError(f"step/kind: {step!r}/{kind!r}; allowed steps reserve, stage, commit (kinds fail, "
                             "hang, exit) and channel (kinds drop, drop_submit, clear)")
        self._faults[step] = kind

    async def _fault(self, step: str) -> None:
        kind = self._faults.pop(step, None)
        if kind == "fail":
            raise RuntimeError(f"{self.instance_id}: injected fault at migration step {step!r}")
        if kind == "hang":
            await asyncio.sleep(3600)
        if kind == "exit":
            import os

            log.warning("%s: injected exit at migration step %s", self.instance_id, step)
            os._exit(1)

    async def migrate_context(self, request_id: str) -> int | None:
        """Source, handshake: the request's context length here, or ``None`` if it is not decoding here."""
        if request_id not in self._streams:
            return None
        for r in (await self._require_backend().stats()).requests:
            if r.request_id == request_id:
                return None if r.in_prefill else int(r.context_tokens)
        return None

    async def migrate_reserve(self, request_id: str, tokens: int, template: EngineRequest | None = None, *,
                              whole_tokens: int | None = None) -> str | None:
        """Destination, handshake: reserve KV for ``tokens``; ``None`` or why not. ``template`` (sampling,
        priority) lets the backend pre-admit the request during the pre-copy. ``whole_tokens`` (prompt +
        max_tokens): refused when this engine could never hold that context, as the commit would be."""
        await self._fault("reserve")
        if self._draining:
            return f"{self.instance_id} is draining"
        if request_id in self._streams:
            return f"request_id: {request_id!r} is already running on {self.instance_id}"
        why = await self._migration_backend().reserve_kv(request_id, tokens, template, whole_tokens=whole_tokens)
        if why is None:
            self._incoming[request_id] = time.monotonic()
        return why

    async def migrate_stage(self, request_id: str, piece: list[Any]) -> tuple[str, Any]:
        """Destination, pre-copy stage: ``piece[0]`` is the ObjectRef of the source's ``export_kv`` (wrapped in
        a list so that a source failure is told apart from ours). Returns ("ok", end token staged) or
        ("source", why the source could not copy)."""
        try:
            kv = await piece[0]
        except Exception as e:  # noqa: BLE001 - the source's failure, reported as such
            return "source", f"export failed: {_cause(e)}"
        await self._fault("stage")
        self._touch_incoming(request_id)
        await self._migration_backend().stage_kv(request_id, kv)
        self._touch_incoming(request_id)
        return "ok", int(kv.end_token)

    async def migrate_stop(self, request_id: str, start_token: int) -> tuple[Any, KVBlocks | None] | str:
        """Source, final stop-and-copy: pause the request (KV kept) and return its ``MigrationSnapshot`` (with this
        stream's length guess) and the KV from ``start_token`` (``< 0``: none). A reason string if it cannot be
        paused."""
        st = self._streams.get(request_id)
        if st is None:
            return "request is not running on this instance"
        stopped = self._stopping[request_id] = asyncio.Event()
        try:
            res = await self._migration_backend().pause(request_id, start_token)
            st.paused = not isinstance(res, str)  # waits on its migration's driver now, not on the engine (watchdog)
        finally:
            stopped.set()
            if self._stopping.get(request_id) is stopped:
                del self._stopping[request_id]
        if isinstance(res, str) or st.predicted is None:
            return res
        snap, kv = res
        return dataclasses.replace(snap, predicted_output_tokens=st.predicted), kv

    async def migrate_commit(
        self, request_id: str, template: EngineRequest, stopped: list[Any], *, predicted_output_tokens: float | None
        = None, length_dist: LengthPrediction | None = None,
    ) -> str | None:
        """Destination, final copy + commit: resolve the source's ``migrate_stop`` result, stage the last piece
        and the RNG state, admit the request from its snapshot (it starts decoding; the ingress polls it).

        Returns ``None`` when admitted, ``"source: <why>"`` if the source had nothing to hand over, else why not.
        """
        try:
            res = await stopped[0]
        except Exception as e:  # noqa: BLE001
            return f"source: stop failed: {_cause(e)}"
        if isinstance(res, str):
            return f"source: {res}"
        snap, kv = res
        if snap.predicted_output_tokens is not None:
            # The source's guess, renewed there if it ran out; the caller's is the request's original one.
            predicted_output_tokens = snap.predicted_output_tokens
        await self._fault("commit")
        if request_id not in self._incoming:
            # Cancelled (the driver timed out on this step or was cancelled; or the lease expired) while the
            # source's stop-and-copy was on its way: admitting now would leave a copy nobody polls.
            return "migration was cancelled on the destination"
        self._touch_incoming(request_id)
        sp = template.sampling
        remaining = sp.max_tokens - snap.num_output_tokens
        if remaining < 1:
            return "source: request already produced all its tokens"
        backend = self._migration_backend()
        await backend.stage_kv(request_id, kv, snap.rng_state, final=True)
        if request_id not in self._incoming:  # cancelled during the copy: drop what this piece staged again
            await backend.cancel_incoming(request_id)
            return "migration was cancelled on the destination"
        try:
            tokens = snap.with_prefix(backend.staged_token_ids(request_id)) if snap.token_offset else snap.token_ids
        except ValueError as e:
            return str(e)
        ereq = EngineRequest(
            request_id, tokens, dataclasses.replace(sp, max_tokens=remaining), priority=template.priority,
            num_output_tokens_before=snap.num_output_tokens,
        )
        sub = await self._submit(ereq, None, predicted_output_tokens=predicted_output_tokens, length_dist=length_dist,
                                 wait_first=False, adopt=False, export_on_finish=False, refuse_draining=False)
        if sub.rejected is None:  # a stream now: the poll lease covers it from here on
            self._incoming.pop(request_id, None)
        return sub.rejected

    async def migrate_release(self, request_id: str) -> bool:
        """Source, commit path: free the request (the destination runs it now). Its stream ends with
        ``finish_reason="migrated"``, so that the ingress tells this hand-over apart from a cancel (an abort from
        another ingress replica) that reached this instance during the stop-and-copy."""
        st = self._streams.get(request_id)
        if st is None or self._backend is None:
            return False
        st.migrated = True
        await self._backend.abort(request_id)
        return True

    async def migrate_resume(self, request_id: str) -> bool:
        """Source, abort path: the paused request continues here."""
        stopping = self._stopping.get(request_id)
        if stopping is not None:
            # The stop still waits for the step in flight (a driver cancelled or timed out just after sending it):
            # resumed first, the resume found nothing paused and the stop then paused the request for good.
            await stopping.wait()
        st = self._streams.get(request_id)
        if st is not None:
            st.paused = False
        return await self._migration_backend().resume(request_id)

    async def migrate_cancel(self, request_id: str) -> None:
        """Destination, abort path: free the reservation, staged KV and any admitted copy."""
        self._incoming.pop(request_id, None)
        await self._migration_backend().cancel_incoming(request_id)
        st = self._streams.pop(request_id, None)
        if st is not None and st.task is not None and not st.done:
            await self._require_backend().abort(request_id)

    def _touch_incoming(self, request_id: str) -> None:
        if request_id in self._incoming:
            self._incoming[request_id] = time.monotonic()

    def _migration_backend(self) -> Any:
        backend = self._require_backend()
        if not hasattr(backend, "pause"):  # NOTE(migration): out-of-tree backends may not implement it
            raise RuntimeError(f"{self.instance_id}: backend {type(backend).__name__} does not support migration")
        return backend

    def _require_backend(self) -> EngineBackend:
        if self._backend is None:
            raise RuntimeError(f"instance {self.instance_id} not started")
        return self._backend


def _cause(e: Exception) -> str:
    cause = getattr(e, "cause", None) or e
    return f"{type(cause).__name__}: {cause}"


def snapshot_from_stats(
    s: EngineStats,
    info: InstanceInfo,
    now_s: float,
    streams: dict[str, _Stream] | None = None,
    *,
    draining: bool = False,
    healthy: bool = True,
    leaving: bool = False,
) -> InstanceSnapshot:
    """Build an ``InstanceSnapshot`` from any backend's ``EngineStats`` (one code path for vLLM and simulated)."""
    streams = streams or {}
    reqs: list[RequestLoad] = []
    pending = decode_ctx = decoding = guessed = 0
    predicted = 0.0
    for r in s.requests:
        st = streams.get(r.request_id)
        pr = r.predicted_remaining
        if st is not None and st.predicted is not None:
            g = st.before + r.generated_tokens
            left = st.predicted - g
            pr = remaining_tokens(left, st.dist, g)
            if left <= 0.0 and st.dist is not None and not r.in_prefill:
                # Renewed once, then spent token by token until it runs out again, as the engine model keeps it
                # (``EngineModel._renewed_due``): read afresh at every snapshot, live and simulated parted after the
                # first renewal (E[L-g | L>g] at each g against the renewal's countdown).
                st.predicted = g + pr
        if pr is not None:
            r = dataclasses.replace(r, predicted_remaining=pr)
        if r.in_prefill:
            pending += r.context_tokens
        else:
            decoding += 1
            decode_ctx += r.context_tokens
            # Of the decode batch only, as the engine model sums it: routers divide it by ``num_decoding``.
            predicted += pr or 0.0
            guessed += pr is not None
        reqs.append(r)
    return InstanceSnapshot(
        instance_id=info.instance_id,
        role=info.role,
        gpu=info.gpu,
        tp=info.tp,
        model=info.model,
        time_s=now_s,
        num_running=s.num_running,
        num_waiting=s.num_waiting,
        num_decoding=decoding,
        kv_blocks_used=s.kv_blocks_used,
        kv_blocks_total=s.kv_blocks_total,
        block_size=s.block_size,
        # The backend's own count where it has one: a prompt in chunked prefill counts what it has left, as in the
        # simulator's engine model (its whole context here read 5300 where the simulator's read 3252).
        prefill_tokens_pending=pending if s.prefill_tokens_pending is None else s.prefill_tokens_pending,
        prefill_compute_tokens=s.prefill_compute_tokens,
        cached_hash_ids=s.cached_hash_ids,
        prompt_tokens_cached=s.prompt_tokens_cached,
        decode_context_tokens=decode_ctx,
        predicted_remaining_tokens=predicted,
        num_predicted=guessed,
        requests=tuple(reqs),
        healthy=healthy,
        draining=draining,
        leaving=leaving,
    )
