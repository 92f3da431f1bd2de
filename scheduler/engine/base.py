"""The one async interface every engine backend implements (vLLM, simulated).

An Instance actor owns exactly one backend. The control plane only talks to this interface, so a
simulated instance and a vLLM instance are interchangeable in the live cluster.

KV movement (P->D handoff and live migration) goes through ``KVBlocks``: the KV of a contiguous token range
of one request, as plain bytes/arrays that can travel through Ray's object store or a socket.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from scheduler.core.types import InstanceRole, RequestLoad

if TYPE_CHECKING:
    from scheduler.config.models import GPUSpec


@dataclass(frozen=True, slots=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = disabled
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False


@dataclass(frozen=True, slots=True)
class EngineRequest:
    """A request as an engine sees it. ``prompt_token_ids`` may include tokens generated elsewhere
    (P->D handoff, migration): ``num_output_tokens_before`` of them at the end are earlier outputs, so
    ``max_tokens`` counts only what is still to generate and the sampler's RNG position is advanced."""

    request_id: str
    prompt_token_ids: tuple[int, ...]
    sampling: SamplingParams = SamplingParams()
    priority: int = 0
    num_output_tokens_before: int = 0
    # When set, the engine loads KV for the leading tokens from these blocks instead of recomputing them.
    kv: tuple[KVBlocks, ...] = ()


@dataclass(frozen=True, slots=True)
class TokenChunk:
    """New output tokens of one request, in order. ``index`` is the sequence index of ``token_ids[0]``
    within the request's whole output (stable across handoffs and migrations)."""

    request_id: str
    index: int
    token_ids: tuple[int, ...]
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "migrated" | "error: ..."
    text: str = ""
    instance_id: str = ""  # which instance produced these tokens (set by the control plane)


# Tokens before a run that its text is decoded after: a UTF-8 character spans up to 4 byte tokens, and a BPE or
# sentencepiece word boundary needs one or two (vLLM's incremental detokenizer reads back 5). ``text_after`` reads
# further back past tokens that decode to nothing but U+FFFD (or to nothing).
TEXT_CONTEXT_TOKENS = 8


def text_after(
    decode: Callable[[list[int]], str],
    context: Sequence[int],
    token_ids: Sequence[int],
    *,
    before: Sequence[int] = (),
) -> str:
    """The text ``token_ids`` add to a stream whose earlier ids are ``before`` + ``context`` (a prompt and the
    outputs since, say), as vLLM's incremental detokenizer streams it, so that the texts of consecutive runs join
    to ``decode(all ids)``: decoded after the last context tokens (alone, a character split at the run's start came
    out as U+FFFD, and a sentencepiece word lost its leading space), and a character still incomplete at the end
    held back -- its text comes with the token that completes it (the engine streams "" for such a token, as
    here); so are bytes that can never decode (U+FFFD), until text follows them.

    The context read reaches back to a token that decodes to text (doubling from ``TEXT_CONTEXT_TOKENS``): held
    back past 8 ids (9 lone invalid bytes), the U+FFFDs beyond them were lost, and a window opening inside a
    character added its own (the simulator's random bytes: 3 of 3000 random streams joined off by U+FFFDs)."""
    n, total = TEXT_CONTEXT_TOKENS, len(before) + len(context)
    while True:
        k = n - len(context)  # of them from ``before``
        ctx = [*before[-k:], *context] if k > 0 else list(context[-n:])
        head = decode(ctx).rstrip("\ufffd") if ctx else ""
        if head or n >= total:
            break
        n *= 2
    return decode(ctx + list(token_ids)).rstrip("\ufffd")[len(head) :]


@dataclass(frozen=True, slots=True)
class KVBlocks:
    """KV cache of tokens ``[start_token, end_token)`` of ``request_id``. ``data`` is backend-specific
    (numpy arrays per layer for vLLM; ``None`` for the simulated backend, which only accounts bytes)."""

    request_id: str
    start_token: int
    end_token: int
    token_ids: tuple[int, ...]  # the tokens whose KV this is (the destination checks the prefix matches)
    nbytes: int
    data: Any = field(default=None, compare=False, repr=False)
    # The GPU type of the engine it comes from, where its backend times transfers (the simulated one): a transfer
    # runs over the slower end's link (``scheduler.latency.kv_link``), so the receiving side needs both.
    source_gpu: GPUSpec | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class EngineStats:
    num_running: int
    num_waiting: int
    kv_blocks_used: int
    kv_blocks_total: int
    block_size: int
    num_preemptions: int = 0
    # Prompt tokens this engine computed (prefill FLOPs) vs loaded from transferred KV; tests assert on them.
    prompt_tokens_computed: int = 0
    prompt_tokens_loaded: int = 0
    # Of the loaded: tokens whose KV a live migration had already written into this engine's blocks before the
    # request arrived (nothing copied at admission, so the migration's downtime does not grow with context).
    prompt_tokens_adopted: int = 0
    # Prompt tokens served from this engine's own prefix cache (``InstanceSnapshot.prompt_tokens_cached``).
    prompt_tokens_cached: int = 0
    requests: tuple[RequestLoad, ...] = ()
    # Prompt tokens still to prefill (``InstanceSnapshot.prefill_tokens_pending``): a queued prompt whole, one in
    # prefill less what it computed; ``None``: this backend cannot tell (the snapshot sums their contexts).
    prefill_tokens_pending: int | None = None
    # Prompt tokens the requests in prefill still have to compute (see ``InstanceSnapshot.prefill_compute_tokens``);
    # ``None``: this backend cannot tell.
    prefill_compute_tokens: int | None = None
    # Prompt block ids resident in this engine's prefix cache (``InstanceSnapshot.cached_hash_ids``); ``None`` when
    # the backend cannot tell (vLLM without its KV cache events: prefix_affinity remembers where it sent each prefix).
    cached_hash_ids: frozenset[int] | None = None


@runtime_checkable
class EngineBackend(Protocol):
    async def start(self) -> None: ...

    def generate(self, request: EngineRequest) -> AsyncIterator[TokenChunk]:
        """Run the request; yield chunks until one with ``finished=True``."""
        ...

    async def abort(self, request_id: str) -> None: ...

    async def stats(self) -> EngineStats: ...

    async def export_kv(self, request_id: str, start_token: int, end_token: int | None = None) -> KVBlocks:
        """Copy out the KV of a request that may still be running (live migration stages, P->D handoff)."""
        ...

    def set_role(self, role: InstanceRole) -> None:
        """Serve new requests in ``role`` (re-roling: the controller switches an instance only when it is idle)."""
        ...

    async def shutdown(self) -> None: ...
