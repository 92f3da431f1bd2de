"""llmsched's own vLLM KV connector: export the KV of a (finished or still running) request, import it elsewhere.

vLLM-CPU runs three processes per engine, and each part of this module lives where the data is:

    backend process (AsyncLLM client)      EngineCore process (scheduler)          Worker process (model runner)
    ---------------------------------      ---------------------------------       -----------------------------
    VLLMBackend.export_kv  --utility-->    llmsched_export_kv (EngineCore)  -rpc-> llmsched_copy_blocks /
                                           knows block ids + computed tokens       llmsched_get_saved (extension)
    VLLMBackend.generate(kv=...) -rpc------------------------------------------->  llmsched_stage_kv (extension)
                   \\--add_request(kv_transfer_params)--> LlmschedConnector        LlmschedConnector (WORKER)
                                           (SCHEDULER): get_num_new_matched_        start_load_kv: staged -> blocks
                                           tokens, update_state_after_alloc,        wait_for_save: prompt KV of
                                           build_connector_meta                     producer requests -> host store
    VLLMBackend.stats      --utility-->    llmsched_stats (EngineCore)

The EngineCore utilities are added to vLLM's ``EngineCore`` class when this module is imported in the EngineCore
process (vLLM imports it to build the scheduler-side connector, via ``kv_connector_module_path``); the worker
side is reached through ``parallel_config.worker_extension_cls`` (``LlmschedWorkerExtension``).

Per-request control goes in ``SamplingParams.extra_args["kv_transfer_params"]``:
``{"llmsched_id": str, "load_tokens": int, "save": bool}``.
"""

from __future__ import annotations

import collections
import math
import os
import threading
import time
import warnings
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)
from vllm.logger import init_logger

from scheduler.transfer.kv_payload import (
    PUSHED_KV,
    PayloadStore,
    check_payload,
    from_wire,
    slice_payload,
    to_wire,
)

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

logger = init_logger(__name__)

CONNECTOR_NAME = "LlmschedConnector"
MODULE_PATH = __name__
_TIMINGS_KEPT = 4096  # per-request engine timings kept (llmsched_timings)
WORKER_EXTENSION = f"{__name__}.LlmschedWorkerExtension"

# One engine per EngineCore/Worker process (vLLM-CPU always uses the multiprocess executor), so module globals
# are per engine. They let the EngineCore utilities and the worker extension find the connector instances.
_SCHEDULER_CONNECTOR: LlmschedConnector | None = None
_WORKER_CONNECTOR: LlmschedConnector | None = None


@dataclass
class _Load:
    llmsched_id: str
    start_token: int  # block aligned
    end_token: int
    block_ids: list[int]


@dataclass
class _Save:
    llmsched_id: str
    end_token: int
    block_ids: list[int]
    token_ids: list[int]


@dataclass
class LlmschedConnectorMetadata(KVConnectorMetadata):
    loads: list[_Load] = field(default_factory=list)
    saves: list[_Save] = field(default_factory=list)
    # (llmsched id, vLLM id) of seeded requests scheduled for the first time: the worker restores a migrated
    # request's sampler RNG for them. Not tied to ``loads``: when the migrated context is block-aligned, every
    # token is a prefix-cache hit on adopted blocks and nothing is loaded through the connector.
    first_seen: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class _PauseAt:
    """A pause waiting for its request to reach ``output_tokens`` (``llmsched_pause`` with ``at_output``)."""

    request: Request
    output_tokens: int  # made on this engine (``Request.num_output_tokens``)
    start_token: int
    result: Future  # the pause utility's deferred answer (vLLM sends it when it is set)
    core: Any


@dataclass
class _Counters:
    prompt_tokens_computed: int = 0
    prompt_tokens_loaded: int = 0
    prompt_tokens_cached: int = 0  # local prefix-cache hits
    prompt_tokens_adopted: int = 0  # of the loaded: migrated blocks written before admission (prefix-cache hits)
    num_preemptions: int = 0


class LlmschedConnector(KVConnectorBase_V1):
    """KV connector used by every llmsched vLLM engine (see the module docstring for the data flow)."""

    def __init__(
        self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig
    ) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        self._block_size = vllm_config.cache_config.block_size
        extra = self._kv_transfer_config.kv_connector_extra_config or {}
        # Host-side store of saved prompt KV (producer role), bounded: oldest entries are evicted first.
        self._saved_capacity_bytes = int(extra.get("saved_kv_capacity_bytes", 256 << 20))
        global _SCHEDULER_CONNECTOR, _WORKER_CONNECTOR
        if role == KVConnectorRole.SCHEDULER:
            self._live: dict[str, Request] = {}  # internal vLLM id -> request
            self._by_llmsched_id: dict[str, str] = {}  # llmsched id -> internal vLLM id
            self._pending_loads: dict[str, _Load] = {}
            # llmsched ids whose staged KV was loaded (not reloaded after a preemption)
            self._consumed: set[str] = set()
            # Live migration: KV blocks a destination holds for an incoming request (freed when it arrives),
            # and requests a source paused for the final stop-and-copy (out of ``running``, blocks kept).
            self._reservations: dict[str, list[Any]] = {}
            self._paused: dict[str, Request] = {}
            self._pause_at: dict[str, _PauseAt] = {}  # llmsched id -> pause due at an output count
            self._adopted: dict[str, int] = {}  # llmsched id -> tokens of reserved blocks put in the prefix cache
            # Live migration, destination: requests pre-admitted during the pre-copy stages and held out of
            # scheduling until the commit (``_engine_release``) appends the tail and queues them.
            self._held: dict[str, Request] = {}
            self._scheduler: Any = None  # set by the first migration utility (the connector has no other path)
            self.counters = _Counters()
            # llmsched id -> [arrival (vLLM's front end), first scheduled, finished], wall clock: where a request's
            # time inside the engine went (``llmsched_timings``; newest _TIMINGS_KEPT).
            self.timings: collections.OrderedDict[str, list[float]] = collections.OrderedDict()
            _SCHEDULER_CONNECTOR = self
        else:
            self._kv_caches: dict[str, torch.Tensor] = {}
            # llmsched id -> staged pieces (one for P->D, one per stage for a migration), applied in order
            self._staged: dict[str, list[dict[str, Any]]] = {}
            self._rng: dict[str, bytes] = {}  # llmsched id -> sampler RNG state to restore on load
            self._runner: Any = None  # the worker's model runner (set by the extension; RNG restore needs it)
            self._saved = PayloadStore(self._saved_capacity_bytes)
            self._lock = threading.Lock()  # extension RPCs and the model step run on different threads
            _WORKER_CONNECTOR = self

    # ------------------------------------------------------------------ scheduler side

    @staticmethod
    def _params(request: Request) -> dict[str, Any]:
        return request.kv_transfer_params or {}

    def on_new_request(self, request: Request) -> None:
        self._live[request.request_id] = request
        lid = self._params(request).get("llmsched_id")
        wire = self._params(request).pop(PUSHED_KV, None)
        if wire is not None and lid is not None:
            # KV that came with the request (worker in this process): staged here, as the request is added, instead
            # of by a separate RPC that waits for a step boundary of its own before the request can be sent.
            worker = _WORKER_CONNECTOR
            if worker is not None:
                worker.stage(str(lid), from_wire(wire))
            else:  # cannot happen with the in-process worker the backend checks for; recompute rather than crash
                logger.warning("llmsched connector: KV of %s came with the request but no worker here", lid)
                self._params(request)["load_tokens"] = 0
        if lid is not None:
            self._by_llmsched_id[str(lid)] = request.request_id
            if self._params(request).get("hold") and self._scheduler is not None:
                # Pre-admitted migration: vLLM queued it a moment ago (same call); keep it out of scheduling,
                # with its reservation, until the commit releases it.
                self._scheduler.waiting.remove_requests([request])
                self._held[str(lid)] = request
                self._adopt_reserved(str(lid), request)  # the bulk of it, off the critical path
                return
            if self._arrive(str(lid), request):
                # vLLM queued it behind the prompts waiting here a moment ago (same call): to the front instead.
                self._scheduler.waiting.remove_request(request)
                self._scheduler.waiting.prepend_request(request)

    def _arrive(self, llmsched_id: str, request: Request) -> bool:
        """A request enters scheduling (admitted now, or released after a pre-admission). A migrated one (its
        handshake reserved blocks here): adopt what was written into its reservation, then hand the reservation
        back to the pool. Returns whether it is migrated: the caller queues it at the front of the waiting queue --
        it keeps running (Llumnix), as a request vLLM preempts does (``prepend_request``), instead of waiting
        behind the prompts that arrived during its move; the simulator's driver queues it so too."""
        if llmsched_id not in self._reservations:
            return False
        self._adopt_reserved(llmsched_id, request)
        # NOTE(migration): the reservation made at the handshake is handed back to the pool right when the
        # migrated request arrives (same EngineCore thread, before the next schedule), so it allocates them.
        self.unreserve(llmsched_id)
        return True

    def _adopt_reserved(self, llmsched_id: str, request: Request) -> None:
        """Migration fast path: the stage copies were written straight into the reserved blocks (worker side,
        ``stage(..., block_ids=...)``). Register those full blocks in vLLM's prefix cache under the arriving
        request's own block hashes, so the scheduler's prefix lookup hands them to the request as local hits:
        nothing proportional to the context is copied when it arrives, only the tail is loaded."""
        blocks = self._reservations.get(llmsched_id)
        written = int(self._params(request).get("reserved_tokens", 0))
        mgr = self._kv_cache_manager
        if not blocks or written <= 0 or mgr is None or not mgr.enable_caching:
            return
        if len(self._kv_cache_config.kv_cache_groups) != 1:
            return  # NOTE(migration): one reservation pool serves one KV cache group (all llmsched models)
        bs = self._block_size
        hashed = len(request.block_hashes) * mgr.block_pool.hash_block_size // bs
        n_full = min(written // bs, len(blocks), (request.num_tokens - 1) // bs, hashed)
        done = self._adopted.get(llmsched_id, 0) // bs  # a pre-admitted request adopts in two steps
        if n_full <= done:
            return
        mgr.block_pool.cache_full_blocks(request, blocks, done, n_full, bs, kv_cache_group_id=0)
        self._adopted[llmsched_id] = n_full * bs

    def bind_scheduler(self, scheduler: Any) -> None:
        """Called by the migration utilities (the connector has no other path to its scheduler). Makes the
        engine's busy loop treat parked requests -- held for a pending commit, paused for a stop-and-copy --
        as idle work, so an engine waiting for a migration blocks on its input queue instead of spinning."""
        if self._scheduler is scheduler:
            return
        self._scheduler = scheduler
        # NOTE(migration): vLLM counts a request that is in ``scheduler.requests`` but neither running nor
        # waiting as "finished, not yet cleaned up", and keeps stepping (empty steps, ~0.4 ms each, back to
        # back) until it goes. A held or paused request is exactly that for up to the whole pre-copy (0.5 s
        # at 16k tokens): a core burnt on a 2-core host, next to the source that is still decoding. Our
        # connector never delays a finished request's cleanup (``request_finished`` returns False), so
        # "more requests than running + waiting + parked" is the exact test.
        vllm_has_finished = scheduler.has_finished_requests

        def has_finished_requests() -> bool:
            if not (self._held or self._paused):
                return vllm_has_finished()
            if scheduler.finished_req_ids:
                return True
            running, waiting = scheduler.get_request_counts()
            return len(scheduler.requests) > running + waiting + len(self._held) + len(self._paused)

        scheduler.has_finished_requests = has_finished_requests
        vllm_schedule = scheduler.schedule

        def schedule(*args: Any, **kwargs: Any) -> Any:
            if self._pause_at:
                self._pause_due(scheduler)
            return vllm_schedule(*args, **kwargs)

        scheduler.schedule = schedule

    def _pause_due(self, scheduler: Any) -> None:
        """Before vLLM schedules a step: pause each running request that has made the output tokens its pending
        pause waits for (the last step's outputs are on their way to the client already) and answer that pause."""
        for lid, due in list(self._pause_at.items()):
            request = due.request
            if request not in scheduler.running:
                continue  # preempted: it comes back to running (a finished one had ``request_finished`` answer)
            if request.num_output_tokens >= due.output_tokens:
                del self._pause_at[lid]
                scheduler.running.remove(request)
                self._paused[lid] = request
                due.result.set_result(_stop_state(due.core, request, due.start_token))

    def drop_pause_at(self, llmsched_id: str, why: str) -> bool:
        """Answer a pending pause of ``llmsched_id`` with ``why`` (it will not stop). Returns whether one was."""
        due = self._pause_at.pop(llmsched_id, None)
        if due is None:
            return False
        due.result.set_result(why)
        return True

    def reserve(self, llmsched_id: str, num_blocks: int) -> list[int] | str:
        """Hold ``num_blocks`` free KV blocks for an incoming migration. Returns their ids (stage copies are
        written into them), or why not."""
        if self._kv_cache_manager is None:
            return "no KV cache manager bound to the connector"
        pool = self._kv_cache_manager.block_pool
        self.unreserve(llmsched_id)
        free = pool.get_num_free_blocks()
        if num_blocks > free:
            return f"needs {num_blocks} KV blocks, {free} free"
        self._reservations[llmsched_id] = list(pool.get_new_blocks(num_blocks))
        return [b.block_id for b in self._reservations[llmsched_id]]

    def unreserve(self, llmsched_id: str) -> bool:
        blocks = self._reservations.pop(llmsched_id, None)
        if blocks is None or self._kv_cache_manager is None:
            return False
        self._kv_cache_manager.block_pool.free_blocks(blocks)
        return True

    def _loadable_end(self, request: Request) -> int:
        p = self._params(request)
        if p.get("llmsched_id") in self._consumed:
            return 0
        # vLLM must compute at least the last token itself (it needs its logits).
        return max(0, min(int(p.get("load_tokens", 0)), request.num_tokens - 1))

    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        return max(0, self._loadable_end(request) - num_computed_tokens), False

    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None:
        if num_external_tokens <= 0:
            return
        end = self._loadable_end(request)
        start = end - num_external_tokens  # == the block-aligned local hit the scheduler passed us
        self._pending_loads[request.request_id] = _Load(
            llmsched_id=str(self._params(request)["llmsched_id"]),
            start_token=start,
            end_token=end,
            block_ids=list(blocks.get_block_ids()[0]),
        )

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        meta = LlmschedConnectorMetadata()
        for load in self._pending_loads.values():
            meta.loads.append(load)
            self._consumed.add(load.llmsched_id)
        self._pending_loads.clear()

        # Prompt-token accounting (what tests assert on): loaded = from transferred KV, cached = local
        # prefix-cache hits (both known at first schedule), computed = prompt tokens run through the model.
        loaded_now = {ld.llmsched_id: ld.end_token - ld.start_token for ld in meta.loads}
        scheduled: dict[str, int] = {}
        now = time.time()
        for new in scheduler_output.scheduled_new_reqs:
            scheduled[new.req_id] = new.num_computed_tokens
            request = self._live.get(new.req_id)
            if request is not None:
                lid = self._params(request).get("llmsched_id")
                if lid is not None and str(lid) not in self.timings:
                    self.timings[str(lid)] = [float(request.arrival_time), now, math.nan]
                    if len(self.timings) > _TIMINGS_KEPT:
                        self.timings.popitem(last=False)
                sp = request.sampling_params
                if lid is not None and sp is not None and sp.seed is not None:
                    meta.first_seen.append((str(lid), new.req_id))
                n_loaded = loaded_now.get(lid, 0)
                local = max(0, min(new.num_computed_tokens, request.num_prompt_tokens) - n_loaded)
                # Prefix hits on blocks a migration staged count as transferred KV, not as local cache.
                adopted = min(local, self._adopted.pop(str(lid), 0))
                self.counters.prompt_tokens_loaded += n_loaded + adopted
                self.counters.prompt_tokens_adopted += adopted
                self.counters.prompt_tokens_cached += local - adopted
        cached = scheduler_output.scheduled_cached_reqs
        resumed = getattr(cached, "resumed_req_ids", None) or set()
        self.counters.num_preemptions += len(resumed)
        for i, req_id in enumerate(cached.req_ids):
            scheduled.setdefault(req_id, cached.num_computed_tokens[i])
        for req_id, n_computed in scheduled.items():
            request = self._live.get(req_id)
            if request is None:
                continue
            n_sched = scheduler_output.num_scheduled_tokens.get(req_id, 0)
            n_prompt = request.num_prompt_tokens
            lid = self._params(request).get("llmsched_id")
            self.counters.prompt_tokens_computed += max(0, min(n_computed + n_sched, n_prompt) - n_computed)
            if (
                self._params(request).get("save")
                and lid is not None
                and n_computed < n_prompt <= n_computed + n_sched
                and self._kv_cache_manager is not None
            ):
                # This step completes the prompt: have the worker copy its KV out after the forward.
                meta.saves.append(
                    _Save(
                        llmsched_id=str(lid),
                        end_token=n_prompt,
                        block_ids=list(self._kv_cache_manager.get_block_ids(req_id)[0]),
                        token_ids=list(request.prompt_token_ids or []),
                    )
                )
        return meta

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        self._live.pop(request.request_id, None)
        lid = self._params(request).get("llmsched_id")
        if lid is not None:
            t = self.timings.get(str(lid))
            if t is not None and math.isnan(t[2]):
                t[2] = time.time()
            self._adopted.pop(str(lid), None)
            if self._held.get(str(lid)) is request:
                del self._held[str(lid)]
            if self._paused.get(str(lid)) is request:
                del self._paused[str(lid)]
            due = self._pause_at.get(str(lid))
            if due is not None and due.request is request:
                self.drop_pause_at(str(lid), f"request finished before it made {due.output_tokens} output tokens")
            if self._by_llmsched_id.get(str(lid)) == request.request_id:
                del self._by_llmsched_id[str(lid)]
            self._consumed.discard(str(lid))
            # A producer's prompt KV leaves with the request's last output (vLLM carries ``kv_transfer_params`` to
            # the front end), so the handoff does not wait for an export utility, which runs only between this
            # engine's steps: in a burst of prompts that was the next whole prefill step (~100 ms of a 150 ms
            # hop). The worker saved it during this step's forward; with the in-process ("uni") executor its
            # store is right here (with "mp" it is not, and the export utility remains the path).
            # Taken out of the worker's store, not copied: the front end holds it from here (``export_kv``
            # serves it), and a copy left behind for every prompt grew this process' heap to the store's cap,
            # so that each later prefill step wrote its buffers into fresh pages (page faults cost a 960-token
            # step up to 2x on the CPU host: docs/history/live_vs_sim.md, eighteenth session).
            worker = _WORKER_CONNECTOR
            if self._params(request).get("save") and worker is not None:
                saved = worker.pop_saved(str(lid))
                if saved is not None:
                    return False, {PUSHED_KV: to_wire(saved)}
        return False, None

    def live_request(self, llmsched_id: str) -> Request | None:
        internal = self._by_llmsched_id.get(llmsched_id)
        return self._live.get(internal) if internal is not None else None

    # ------------------------------------------------------------------ worker side

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self._kv_caches = dict(kv_caches)

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        meta = self._connector_metadata
        if not isinstance(meta, LlmschedConnectorMetadata):
            return
        for lid, req_id in meta.first_seen:
            with self._lock:
                rng = self._rng.pop(lid, None)
            if rng is not None:
                self._restore_rng(req_id, rng)
        bs = self._block_size
        for load in meta.loads:
            with self._lock:
                pieces = self._staged.pop(load.llmsched_id, None)
            if not pieces:
                # Cannot happen unless staging was skipped; fail loudly rather than decode from garbage KV.
                raise RuntimeError(f"llmsched connector: no staged KV for request {load.llmsched_id!r}")
            j_start, j_end = load.start_token // bs, -(-load.end_token // bs)
            # Stage copies of a live request overlap on their partial last block: apply in copy order (KV only
            # grows, so a later copy reaches further) and the most filled copy of each block wins.
            for payload in sorted(pieces, key=lambda p: int(p["end_token"])):
                p0 = int(payload["start_token"]) // bs
                n = next(iter(payload["layers"].values())).shape[0]
                lo, hi = max(j_start, p0), min(j_end, p0 + n)
                if lo >= hi:
                    continue
                self._write_blocks(load.block_ids[lo:hi], payload, lo - p0, hi - p0)

    def _restore_rng(self, req_id: str, state: bytes) -> None:
        """Continue the source's sampler stream: this step samples R's next token with the RNG exactly where the
        source left it (the request was added to the runner's state earlier in this step, before sampling)."""
        runner = self._runner
        req = None if runner is None else getattr(runner, "requests", {}).get(req_id)
        gen = None if req is None else req.generator
        if gen is None:
            logger.warning("llmsched connector: no seeded generator for %s; RNG state not restored", req_id)
            return
        gen.set_state(torch.frombuffer(bytearray(state), dtype=torch.uint8))

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # loads are synchronous in start_load_kv

    def save_kv_layer(
        self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: AttentionMetadata, **kwargs: Any
    ) -> None:
        return  # saves copy whole blocks after the forward, in wait_for_save

    def wait_for_save(self) -> None:
        meta = self._connector_metadata
        if not isinstance(meta, LlmschedConnectorMetadata):
            return
        for save in meta.saves:
            payload = self.copy_blocks(save.block_ids, 0, save.end_token)
            payload["token_ids"] = save.token_ids[: save.end_token]
            self._saved.put(save.llmsched_id, payload)

    # ------------------------------------------------------------------ worker-side helpers (extension RPCs)

    def copy_blocks(self, block_ids: list[int], start_token: int, end_token: int) -> dict[str, Any]:
        """Copy the blocks holding tokens ``[start_token (rounded down to a block), end_token)``."""
        bs = self._block_size
        j_start, j_end = start_token // bs, -(-end_token // bs)
        idx = torch.tensor(block_ids[j_start:j_end], dtype=torch.long)
        layers = {name: _as_numpy(cache.index_select(0, idx)) for name, cache in self._kv_caches.items()}
        return {"block_size": bs, "start_token": j_start * bs, "end_token": end_token, "dtype": self._dtype(),
                "layers": layers}

    def _dtype(self) -> str:
        return str(next(iter(self._kv_caches.values())).dtype).removeprefix("torch.")

    def kv_layout(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        """Per layer: (dtype, shape of one block) -- what a payload must match to be loaded here."""
        return {name: (self._dtype(), tuple(cache.shape[1:])) for name, cache in self._kv_caches.items()}

    def _write_blocks(self, block_ids: list[int], payload: dict[str, Any], lo: int, hi: int) -> None:
        """Blocks ``[lo, hi)`` of ``payload`` into this engine's blocks ``block_ids``, bytes as they are (the
        payload was checked against ``kv_layout``)."""
        dst = torch.tensor(block_ids, dtype=torch.long)
        for name, cache in self._kv_caches.items():
            with warnings.catch_warnings():
                # The staged arrays are read-only views on the received bytes; we only read them.
                warnings.simplefilter("ignore", UserWarning)
                src = torch.from_numpy(payload["layers"][name][lo:hi])
            cache.index_copy_(0, dst, src.view(cache.dtype))

    def stage(
        self, llmsched_id: str, payload: dict[str, Any], append: bool = False, rng_state: bytes | None = None,
        block_ids: list[int] | None = None,
    ) -> int:
        """Keep ``payload`` for the load at admission and, given the destination's reserved ``block_ids`` (a
        migration), also write its blocks into them now, while the source keeps decoding."""
        check_payload(payload, self.kv_layout(), self._block_size)
        if block_ids:
            p0 = int(payload["start_token"]) // self._block_size
            n = min(next(iter(payload["layers"].values())).shape[0], len(block_ids) - p0)
            if n > 0:
                self._write_blocks(block_ids[p0 : p0 + n], payload, 0, n)
        with self._lock:
            if append:
                self._staged.setdefault(llmsched_id, []).append(payload)
            else:
                self._staged[llmsched_id] = [payload]
            if rng_state is not None:
                self._rng[llmsched_id] = rng_state
        return sum(a.nbytes for a in payload["layers"].values())

    def unstage(self, llmsched_id: str) -> None:
        with self._lock:
            self._staged.pop(llmsched_id, None)
            self._rng.pop(llmsched_id, None)

    def get_saved(self, llmsched_id: str, start_token: int, end_token: int | None) -> dict[str, Any] | None:
        payload = self._saved.get(llmsched_id)
        return None if payload is None else slice_payload(payload, start_token, end_token)

    def pop_saved(self, llmsched_id: str) -> dict[str, Any] | None:
        """The saved prompt KV of ``llmsched_id``, removed from the store (it leaves with the request)."""
        return self._saved.pop(llmsched_id)

    def drop_saved(self, llmsched_id: str) -> bool:
        return self._saved.pop(llmsched_id) is not None


def _as_numpy(blocks: torch.Tensor) -> Any:
    # numpy has no bfloat16: its blocks travel as int16 of the same bits (the payload's "dtype" says what they are).
    return (blocks.view(torch.int16) if blocks.dtype == torch.bfloat16 else blocks).numpy()


class LlmschedWorkerExtension:
    """Mixed into vLLM's worker class (``worker_extension_cls``): RPC entry points into the worker connector."""

    @staticmethod
    def _conn() -> LlmschedConnector:
        if _WORKER_CONNECTOR is None:
            raise RuntimeError(
                "llmsched connector not initialised in this worker (engine built without kv_role?)"
            )
        return _WORKER_CONNECTOR

    def llmsched_copy_blocks(self, block_ids: list[int], start_token: int, end_token: int) -> dict[str, Any]:
        return self._conn().copy_blocks(block_ids, start_token, end_token)

    def llmsched_stage_kv(
        self, llmsched_id: str, wire: dict[str, Any], append: bool = False, rng_state: bytes | None = None,
        block_ids: list[int] | None = None,
    ) -> int:
        conn = self._conn()
        conn._runner = getattr(self, "model_runner", None)
        return conn.stage(llmsched_id, from_wire(wire), append, rng_state, block_ids)

    def llmsched_stage_rng(self, llmsched_id: str, rng_state: bytes) -> None:
        conn = self._conn()
        conn._runner = getattr(self, "model_runner", None)
        with conn._lock:
            conn._rng[llmsched_id] = rng_state

    def llmsched_rng_state(self, req_id: str) -> bytes | None:
        """The sampler RNG state of a (paused) request: vLLM keeps one ``torch.Generator`` per seeded request."""
        req = getattr(self, "model_runner", None)
        req = None if req is None else req.requests.get(req_id)
        gen = None if req is None else req.generator
        return None if gen is None else bytes(gen.get_state().numpy().tobytes())

    def llmsched_kv_layout(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        return self._conn().kv_layout()

    def llmsched_unstage_kv(self, llmsched_id: str) -> None:
        self._conn().unstage(llmsched_id)

    def llmsched_get_saved(
        self, llmsched_id: str, start_token: int, end_token: int | None
    ) -> dict[str, Any] | None:
        return self._conn().get_saved(llmsched_id, start_token, end_token)

    def llmsched_drop_saved(self, llmsched_id: str) -> bool:
        return self._conn().drop_saved(llmsched_id)

    def llmsched_process(self) -> tuple[int, int]:
        """(pid, parent pid) of the process the worker runs in. With the "uni" executor that is the EngineCore,
        a child of the AsyncLLM client; with "mp" a grandchild (a process of its own, see ``VLLMBackend``)."""
        return os.getpid(), os.getppid()


# ---------------------------------------------------------------------- EngineCore utilities


def _engine_export_kv(
    core: Any, llmsched_id: str, start_token: int, end_token: int | None
) -> dict[str, Any] | None:
    """EngineCore utility: KV of a live request (blocks filled so far) or of a saved (finished) one.

    Runs between engine steps in the EngineCore busy loop, so the copy is consistent and the request keeps
    decoding right after it.
    """
    conn = _SCHEDULER_CONNECTOR
    request = conn.live_request(llmsched_id) if conn is not None else None
    if request is not None and request.num_computed_tokens > 0:
        n = request.num_computed_tokens  # tokens whose KV is in the cache (not the last sampled one)
        end = n if end_token is None else min(end_token, n)
        if start_token >= end:
            raise ValueError(
                f"start_token: {start_token} >= {end} tokens of KV computed so far for {llmsched_id!r}"
            )
        block_ids = list(core.scheduler.kv_cache_manager.get_block_ids(request.request_id)[0])
        payload = core.collective_rpc("llmsched_copy_blocks", args=(block_ids, start_token, end))[0]
        payload["token_ids"] = list(request.all_token_ids[payload["start_token"] : end])
        return to_wire(payload)
    payload = core.collective_rpc("llmsched_get_saved", args=(llmsched_id, start_token, end_token))[0]
    return None if payload is None else to_wire(payload)


def _engine_reserve(core: Any, llmsched_id: str, num_blocks: int) -> list[int] | str:
    """EngineCore utility: migration handshake on the destination (hold KV blocks and return their ids, or say
    why not)."""
    conn = _SCHEDULER_CONNECTOR
    if conn is None:
        return "llmsched connector not initialised"
    conn.bind_scheduler(core.scheduler)  # pre-admission (on_new_request) needs the waiting queue
    return conn.reserve(llmsched_id, int(num_blocks))


def _engine_unreserve(core: Any, llmsched_id: str) -> bool:
    conn = _SCHEDULER_CONNECTOR
    return conn.unreserve(llmsched_id) if conn is not None else False


def _engine_pause(
    core: Any, llmsched_id: str, start_token: int, at_output: int | None = None
) -> dict[str, Any] | str | Future:
    """EngineCore utility: the source's stop-and-copy. Takes a *running, decoding* request out of the
    scheduler's running list (its blocks stay allocated, so ``resume`` can put it back as if it had simply not
    been scheduled for a few steps -- vLLM's worker keeps the cached state of unscheduled running requests) and
    returns its state plus the KV from ``start_token`` (``start_token < 0``: no KV, recompute migration).
    A request paused already: its state again.

    ``at_output``: stop once the request has made that many output tokens here (``num_output_tokens``), before
    the step after (exactly there: one token a step). Fewer so far: it decodes on -- a paused one is put back to
    running -- and the answer is a ``Future`` that vLLM sends when ``LlmschedConnector._pause_due`` sets it.

    Returns a reason string when the request cannot be paused (finished, queued, preempted, prefilling, past
    ``at_output``).
    """
    from vllm.v1.request import RequestStatus

    conn = _SCHEDULER_CONNECTOR
    request = conn.live_request(llmsched_id) if conn is not None else None
    if conn is None or request is None or request.is_finished():
        return "request is not running on this engine (finished?)"
    sched = core.scheduler
    conn.bind_scheduler(sched)
    conn.drop_pause_at(llmsched_id, "a later pause of the request replaced this one")
    made = request.num_output_tokens
    if at_output is not None and made > at_output:
        return f"request has made {made} output tokens here, past {at_output}"
    paused = conn._paused.get(llmsched_id) is request
    if at_output is not None and made < at_output:
        if paused:
            del conn._paused[llmsched_id]
            sched.running.append(request)
        due = _PauseAt(request, int(at_output), int(start_token), Future(), core)
        conn._pause_at[llmsched_id] = due
        return due.result
    if not paused:
        if request.status != RequestStatus.RUNNING or request not in sched.running:
            return f"request is not running (status {request.status.name})"
        if request.num_computed_tokens < request.num_prompt_tokens:
            return "request is still in prefill"
        sched.running.remove(request)
        conn._paused[llmsched_id] = request
    return _stop_state(core, request, start_token)


def _stop_state(core: Any, request: Request, start_token: int) -> dict[str, Any]:
    """A paused request's state for the stop-and-copy: token ids, output count, sampler RNG, KV from
    ``start_token``."""
    n = request.num_computed_tokens  # == num_tokens - 1: the last sampled token has no KV yet
    out: dict[str, Any] = {
        "token_ids": list(request.all_token_ids),
        "token_offset": 0,
        "num_output_tokens": request.num_output_tokens,
        "rng_state": None,
        "kv": None,
    }
    if request.sampling_params is not None and request.sampling_params.seed is not None:
        out["rng_state"] = core.collective_rpc("llmsched_rng_state", args=(request.request_id,))[0]
    if start_token >= 0 and start_token < n:
        block_ids = list(core.scheduler.kv_cache_manager.get_block_ids(request.request_id)[0])
        payload = core.collective_rpc("llmsched_copy_blocks", args=(block_ids, start_token, n))[0]
        payload["token_ids"] = list(request.all_token_ids[payload["start_token"] : n])
        out["kv"] = to_wire(payload)
        if start_token > 0:
            # The destination holds the tokens before this piece with the staged ones: ship only the rest
            # (the whole history is O(context) on the stop-and-copy's critical path).
            out["token_offset"] = payload["start_token"]
            out["token_ids"] = list(request.all_token_ids[payload["start_token"] :])
    return out


def _engine_resume(core: Any, llmsched_id: str) -> bool:
    """EngineCore utility: abort path of a migration; the paused request goes back to the running list. A pause
    still waiting for an output count is answered (it will not stop) and the request decodes on."""
    conn = _SCHEDULER_CONNECTOR
    if conn is not None and conn.drop_pause_at(llmsched_id, "the request was resumed before it stopped"):
        return True
    request = conn._paused.pop(llmsched_id, None) if conn is not None else None
    if request is None or request.is_finished():
        return False
    core.scheduler.running.append(request)
    return True


def _engine_release(
    core: Any, llmsched_id: str, tail_token_ids: list[int], max_tokens: int, load_tokens: int, reserved_tokens: int,
    final_stage: tuple[Any, ...] | None = None,
) -> bool | str | None:
    """EngineCore utility: the destination's commit for a pre-admitted migration. Stages the stop-and-copy's KV
    in the worker (``final_stage``: the ``llmsched_stage_kv`` arguments; one engine round trip instead of two),
    appends the tokens R produced on the source since its pre-admission (few: only what came after the first
    stage) to its prompt, sets what is left of its output budget and what to load, adopts the reserved blocks
    and queues it.

    Everything proportional to the context (request object, block hashes of 16k tokens, input validation and
    serialisation) was done at pre-admission, off the stop-and-copy's critical path (Llumnix pre-allocates the
    same way). Returns ``True``; ``None`` if the pre-admission has not reached the engine yet (retry); a reason
    string otherwise.
    """
    conn = _SCHEDULER_CONNECTOR
    if conn is None:
        return "llmsched connector not initialised"
    request = conn._held.get(llmsched_id)
    if request is None:
        return None if conn.live_request(llmsched_id) is None else "request is not held (already released?)"
    del conn._held[llmsched_id]
    if request.is_finished():
        return "held request was aborted"
    if final_stage is not None:
        core.collective_rpc("llmsched_stage_kv", args=tuple(final_stage))
    if tail_token_ids:
        request.prompt_token_ids.extend(tail_token_ids)
        request._all_token_ids.extend(tail_token_ids)
        request.num_prompt_tokens = len(request.prompt_token_ids)
        request.update_block_hashes()
    request.max_tokens = int(max_tokens)
    if request.sampling_params is not None:
        request.sampling_params.max_tokens = int(max_tokens)
    params = conn._params(request)
    params.pop("hold", None)
    params["load_tokens"] = int(load_tokens)
    if reserved_tokens:
        params["reserved_tokens"] = int(reserved_tokens)
    conn._arrive(llmsched_id, request)
    # At the front of the waiting queue, as every migrated request (``LlmschedConnector._arrive``): not behind the
    # prompts that arrived during its pre-copy. It holds no blocks yet (its adopted ones are cached, free), so
    # vLLM's own ``_enqueue_waiting_request`` would have put it in ``waiting`` too, at the back.
    core.scheduler.waiting.prepend_request(request)
    return True


def _engine_timings(core: Any) -> dict[str, list[float]]:
    """EngineCore utility: per request (llmsched id), [arrival, first scheduled, finished], wall clock."""
    conn = _SCHEDULER_CONNECTOR
    return dict(conn.timings) if conn is not None else {}


def _engine_stats(core: Any) -> dict[str, Any]:
    """EngineCore utility: exact scheduler state and the connector's counters, read between steps."""
    sched = core.scheduler
    pool = sched.kv_cache_manager.block_pool
    total = pool.num_gpu_blocks - 1  # block 0 is vLLM's reserved null block
    running, waiting = sched.get_request_counts()
    conn = _SCHEDULER_CONNECTOR
    requests = []
    counters = _Counters()
    compute: int | None = 0
    pending = 0  # prompt tokens still to prefill: a prompt in chunked prefill counts what it has left
    if conn is not None:
        counters = conn.counters
        held = {id(r) for r in conn._held.values()}
        # In the scheduler's order (running, then each waiting queue front to back), as the engine model lists its
        # requests: the migration policy's defrag reads the queue's head there. Arrival order put a preempted (or
        # migrated-in) request, which vLLM queues at the front, behind later arrivals.
        queues = (sched.running, sched.waiting, getattr(sched, "kv_holding_waiting", ()))
        rank = {id(r): k for k, r in enumerate(r for q in queues for r in q)}
        live = sorted(conn._live.items(), key=lambda kv: rank.get(id(kv[1]), len(rank)))
        for internal_id, r in live:
            if r.is_finished() or id(r) in held:  # a held request is still the source's until the commit
                continue
            if r.num_computed_tokens < r.num_prompt_tokens:
                pending += r.num_tokens - r.num_computed_tokens
                if compute is not None:
                    compute = _add_compute_left(compute, sched, conn, r)
            requests.append(
                {
                    "llmsched_id": conn._params(r).get("llmsched_id", internal_id),
                    "context_tokens": r.num_tokens,
                    "output_tokens": r.num_output_tokens,
                    "in_prefill": r.num_computed_tokens < r.num_prompt_tokens,
                    "priority": r.priority,
                }
            )
    return {
        "num_running": running,
        "num_waiting": waiting,
        "kv_blocks_used": total - pool.get_num_free_blocks(),
        "kv_blocks_total": total,
        "block_size": sched.block_size,
        "num_preemptions": counters.num_preemptions,
        "prompt_tokens_computed": counters.prompt_tokens_computed,
        "prompt_tokens_loaded": counters.prompt_tokens_loaded,
        "prompt_tokens_cached": counters.prompt_tokens_cached,
        "prompt_tokens_adopted": counters.prompt_tokens_adopted,
        "prefill_tokens_pending": pending,
        "prefill_compute_tokens": compute,
        "requests": requests,
    }


def _add_compute_left(total: int, sched: Any, conn: LlmschedConnector, r: Request) -> int | None:
    """``total`` plus the tokens ``r`` (in prefill) still has to run through the model: less what it computed,
    and, not yet scheduled, less the larger of its local prefix-cache hit and the KV it brings (loaded, not
    computed) -- what vLLM will find when it admits ``r``. ``None`` when this vLLM's layout hides the hit."""
    done = r.num_computed_tokens
    if done == 0:
        kvm = sched.kv_cache_manager
        try:
            if kvm.prefix_cache_lookup_enabled(r):
                # NOTE: the read half of get_computed_blocks (which also records hit stats and emits KV events).
                done = int(kvm.coordinator.find_longest_cache_hit(r.block_hashes, r.num_tokens - 1)[1])
        except (AttributeError, TypeError, IndexError):  # pragma: no cover - vLLM layout changed
            return None
        done = max(done, conn._loadable_end(r))
    return total + max(r.num_tokens - done, 0)


def _install_engine_core_utilities() -> None:
    # NOTE(vllm-backend): AsyncLLM can only call EngineCore methods by name (call_utility_async), and the data we
    # need (block tables, computed-token counts) lives in the EngineCore's scheduler. Adding two new methods is
    # the least invasive hook; nothing of vLLM's is overridden.
    try:
        from vllm.v1.engine.core import EngineCore
    except ImportError:  # pragma: no cover - vLLM layout changed
        return
    if not hasattr(EngineCore, "llmsched_export_kv"):
        EngineCore.llmsched_export_kv = _engine_export_kv  # type: ignore[attr-defined]
        EngineCore.llmsched_stats = _engine_stats  # type: ignore[attr-defined]
        EngineCore.llmsched_reserve = _engine_reserve  # type: ignore[attr-defined]
        EngineCore.llmsched_unreserve = _engine_unreserve  # type: ignore[attr-defined]
        EngineCore.llmsched_pause = _engine_pause  # type: ignore[attr-defined]
        EngineCore.llmsched_resume = _engine_resume  # type: ignore[attr-defined]
        EngineCore.llmsched_release = _engine_release  # type: ignore[attr-defined]
        EngineCore.llmsched_timings = _engine_timings  # type: ignore[attr-defined]


_install_engine_core_utilities()


def register() -> None:
    """Register the connector with vLLM's factory under ``LlmschedConnector`` (idempotent).

    Engines built by ``VLLMBackend`` also pass ``kv_connector_module_path``, which is what the EngineCore
    process (a fresh interpreter) uses to find the class.
    """
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    if CONNECTOR_NAME not in KVConnectorFactory._registry:
        KVConnectorFactory.register_connector(CONNECTOR_NAME, MODULE_PATH, "LlmschedConnector")
