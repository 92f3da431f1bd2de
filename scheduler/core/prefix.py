"""Prompt block ids for prefix-cache affinity, from token ids (the live path's ``hash_ids``).

Mooncake's traces carry ``hash_ids``: one id per 512 prompt tokens, chained, so that two prompts share their
leading ids exactly as far as they share a prefix. Live requests carry token ids instead; these are the same ids
computed from them, so the prefix-cache routers, the simulated engines' prefix cache and the simulator read a live
request as they read a trace's (vLLM hashes its KV blocks the same chained way, at block granularity).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

HASH_BLOCK_TOKENS = 512  # prompt tokens per id (Mooncake's block; ``Workload.hash_block_tokens``)


def cached_prefix_tokens(
    hash_ids: Sequence[int],
    cached: Collection[int],
    prompt_tokens: int,
    *,
    kv_block: int,
    block_tokens: int = HASH_BLOCK_TOKENS,
) -> int:
    """Prompt tokens an engine whose prefix cache holds ``cached`` spares a prompt of ``prompt_tokens`` with these
    ``hash_ids``: those of its leading cached ids, in whole KV blocks of ``kv_block`` tokens, short of the last
    token (recomputed) -- the engine model's rule (``EngineModel.cache_hit_tokens``), vLLM's."""
    n = 0
    for h in hash_ids:
        if h not in cached:
            break
        n += 1
    return reused_prompt_tokens(n, prompt_tokens, kv_block=kv_block, block_tokens=block_tokens)


def reused_prompt_tokens(cached_ids: int, prompt_tokens: int, *, kv_block: int,
                         block_tokens: int = HASH_BLOCK_TOKENS) -> int:
    """Prompt tokens ``cached_ids`` leading ids found in an engine's prefix cache spare a prompt of
    ``prompt_tokens``: the whole KV blocks of ``kv_block`` tokens they cover, short of the last token, which the
    engine recomputes to sample the first output token (vLLM's rule; a repeated prompt is not free)."""
    kv_block = max(kv_block, 1)
    return max(min(cached_ids * block_tokens, prompt_tokens - 1), 0) // kv_block * kv_block


def prompt_hash_ids(token_ids: Sequence[int], block_tokens: int = HASH_BLOCK_TOKENS) -> tuple[int, ...]:
    """One id per ``block_tokens`` of the prompt (the last block may be partial, as in Mooncake's ids), each a hash
    of the block's tokens and the previous id: equal ids at position ``k`` <=> equal prompts up to block ``k``."""
    out: list[int] = []
    h = 0
    for start in range(0, len(token_ids), block_tokens):
        # Python's hash of a tuple of ints is deterministic (no per-process salt, unlike str): ids agree across
        # the ingress replicas and the instances.
        h = hash((h, hash(tuple(token_ids[start : start + block_tokens]))))
        out.append(h)
    return tuple(out)
