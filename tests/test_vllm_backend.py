"""Real vLLM-CPU engines behind ``VLLMBackend``: HF parity, P->D handoff through the llmsched KV connector,
live KV export, abort, input validation.

Two engines for the whole module (they take ~20-50 s to start on a loaded 2-core box): ``prefill`` with
``kv_role="kv_producer"`` and prefix caching off, ``decode`` with the default role and prefix caching on.
Skipped when vllm is not installed (scripts/install_vllm_cpu.sh). Run: ``pytest -m e2e tests/test_vllm_backend.py``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("vllm")

from scheduler.core.types import InstanceRole
from scheduler.engine.base import EngineBackend, EngineRequest, SamplingParams, TokenChunk
from scheduler.engine.tiny_model import ensure_tiny_model
from scheduler.engine.vllm_backend import VLLMBackend

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

PROMPTS = [
    "The request token model cache",
    "Decode prefill engine cluster schedule latency batch memory queue instance router. " * 3,
    "0123 stream prompt sample greedy server client tensor layer",
]


class Engines:
    def __init__(
        self, loop: asyncio.AbstractEventLoop, prefill: VLLMBackend, decode: VLLMBackend, model: Any
    ):
        self.loop, self.prefill, self.decode, self.model_path = loop, prefill, decode, model

    def run(self, coro: Any, timeout: float = 120) -> Any:
        return self.loop.run_until_complete(asyncio.wait_for(coro, timeout))


# An engine start's bound: vLLM's own engine-ready wait (VLLM_ENGINE_READY_TIMEOUT_S), as the control plane's
# (``START_TIMEOUT_S``). Two engines started together took 249 s once on a CI host at load 12-17 on 2 cores, past
# the 240 s this was; a start that hangs still fails here (and vLLM's error, naming the cause, comes first).
ENGINE_START_S = 600.0


def engine_pair(tmp_path_factory: pytest.TempPathFactory, prefill_kw: dict[str, Any], decode_kw: dict[str, Any],
                **common: Any) -> Iterator[Engines]:
    """A prefill (``kv_producer``, no prefix caching) and a decode (``kv_both``, prefix caching) engine of the tiny
    model, started concurrently in one event loop, shut down after (a module fixture's body)."""
    cache = os.environ.get("LLMSCHED_CACHE") or str(tmp_path_factory.getbasetemp().parent / "llmsched-cache")
    os.environ["LLMSCHED_CACHE"] = cache
    # Shared CI boxes: let the OS place the engines' threads instead of pinning both to core 0.
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    model = ensure_tiny_model()
    loop = asyncio.new_event_loop()
    common = {"kv_cache_bytes": 32 << 20, "max_num_seqs": 8, "cpu_omp_threads": 1, **common}
    prefill = VLLMBackend(model, kv_role="kv_producer", enable_prefix_caching=False, **prefill_kw, **common)
    decode = VLLMBackend(model, kv_role="kv_both", enable_prefix_caching=True, **decode_kw, **common)

    async def both(method: str) -> None:
        await asyncio.gather(getattr(prefill, method)(), getattr(decode, method)())

    try:
        # Both engines start concurrently (start() runs vLLM's blocking construction in a thread).
        loop.run_until_complete(asyncio.wait_for(both("start"), ENGINE_START_S))
        yield Engines(loop, prefill, decode, model)
    finally:
        loop.run_until_complete(both("shutdown"))
        loop.close()


@pytest.fixture(scope="module")
def engines(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engines]:
    # ``decode`` as the control plane builds CPU engines (worker inside the EngineCore process); ``prefill`` with
    # vLLM's default executor (a separate worker process), so both layouts run the connector.
    yield from engine_pair(tmp_path_factory, {}, {"engine_kwargs": {"distributed_executor_backend": "uni"}})


def test_uni_executor_keeps_the_worker_in_the_engine_core_process(engines: Engines) -> None:
    """``distributed_executor_backend="uni"`` must survive vLLM's CPU platform, which turns it into "mp" unless
    ``VLLM_ENABLE_V1_MULTIPROCESSING`` reads 0 while the config is built: the "uni" engine's worker is the
    EngineCore process itself (a child of this one); the default engine's worker is a process of its own."""

    async def worker_process(b: VLLMBackend) -> tuple[int, int]:
        return (await b._engine.collective_rpc("llmsched_process"))[0]

    _, uni_parent = engines.run(worker_process(engines.decode))
    _, mp_parent = engines.run(worker_process(engines.prefill))
    assert uni_parent == os.getpid()
    assert mp_parent != os.getpid()


def _tokenize(model_path: Any, text: str) -> tuple[int, ...]:
    from transformers import AutoTokenizer

    return tuple(AutoTokenizer.from_pretrained(model_path)(text)["input_ids"])


async def _collect(backend: VLLMBackend, req: EngineRequest) -> tuple[list[int], list[TokenChunk]]:
    chunks = [c async for c in backend.generate(req)]
    return [t for c in chunks for t in c.token_ids], chunks


def _check_indices(chunks: list[TokenChunk], first: int) -> None:
    expect = first
    for c in chunks:
        assert c.index == expect
        expect += len(c.token_ids)
    assert chunks[-1].finished and not any(c.finished for c in chunks[:-1])


def test_protocol(engines: Engines) -> None:
    assert isinstance(engines.prefill, EngineBackend)
    assert engines.prefill.vocab_size == 1024


def test_greedy_matches_hf_transformers(engines: Engines) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(engines.model_path, dtype=torch.float32)
    hf.generation_config.eos_token_id = None  # both sides run exactly max_tokens
    n = 24
    for i, text in enumerate(PROMPTS):
        ids = _tokenize(engines.model_path, text)
        with torch.no_grad():
            out = hf.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, pad_token_id=0)
        expected = out[0, len(ids) :].tolist()
        got, chunks = engines.run(
            _collect(
                engines.prefill, EngineRequest(f"hf-{i}", ids, SamplingParams(max_tokens=n, ignore_eos=True))
            )
        )
        assert got == expected, f"prompt {i}"
        _check_indices(chunks, 0)
        assert chunks[-1].finish_reason == "length"


def test_pd_handoff_identical_and_not_recomputed(engines: Engines) -> None:
    p, d = engines.prefill, engines.decode
    prompt = _tokenize(engines.model_path, PROMPTS[1] * 2)  # several whole blocks plus a partial one
    assert len(prompt) % p.block_size != 0 and len(prompt) > 2 * p.block_size
    n = 40
    # Colocated reference on the prefill engine (its prefix cache is off, so it leaves nothing behind).
    reference, _ = engines.run(
        _collect(p, EngineRequest("pd-ref", prompt, SamplingParams(max_tokens=n, ignore_eos=True)))
    )

    first, chunks = engines.run(
        _collect(p, EngineRequest("pd-1", prompt, SamplingParams(max_tokens=1, ignore_eos=True)))
    )
    assert len(first) == 1 and chunks[-1].finished
    blocks = engines.run(p.export_kv("pd-1", 0))
    assert (blocks.start_token, blocks.end_token) == (0, len(prompt))
    assert blocks.token_ids == prompt and blocks.nbytes > 0

    before = engines.run(d.stats())
    req = EngineRequest(
        "pd-1",
        prompt + tuple(first),
        SamplingParams(max_tokens=n - 1, ignore_eos=True),
        num_output_tokens_before=1,
        kv=(blocks,),
    )
    rpcs: list[str] = []
    rpc = d._rpc

    def recording(name: str, args: tuple[Any, ...]) -> Any:
        rpcs.append(name)
        return rpc(name, args=args)

    d._rpc = recording  # type: ignore[method-assign]
    try:
        rest, chunks = engines.run(_collect(d, req))
    finally:
        d._rpc = rpc  # type: ignore[method-assign]
    # The worker runs in d's EngineCore process: the KV rode with the request, no staging RPC before it.
    assert "llmsched_stage_kv" not in rpcs
    after = engines.run(d.stats())
    assert first + rest == reference
    _check_indices(chunks, 1)
    # The whole prompt (partial last block included) was loaded; only the first output token was computed.
    assert after.prompt_tokens_loaded - before.prompt_tokens_loaded == len(prompt)
    assert after.prompt_tokens_computed - before.prompt_tokens_computed == 1
    assert engines.run(p.drop_kv("pd-1")) is True


def test_prefill_kv_comes_out_with_the_last_output(engines: Engines) -> None:
    """A producer's prompt KV travels with its finished output (``kv_transfer_params``), so the export for the
    handoff needs no call into the engine loop (which waits for the engine's next step: a whole prefill in a
    burst). It is the KV the engine computed (the same prompt's export from the other engine, which goes through
    the engine utility), and the engine keeps no copy of it (a copy per prompt grew the engine process' heap until
    every prefill step wrote into fresh pages). Only with the worker in the EngineCore process (the control
    plane's layout, ``decode`` here); with a worker process of its own the export utility remains."""
    p = engines.decode  # a max_tokens=1 leg is saved on any engine
    # Whole blocks: the slots past a prompt's end in its last block hold whatever the block held before.
    prompt = (_tokenize(engines.model_path, PROMPTS[2] * 2) * 8)[: 2 * p.block_size]
    engines.run(_collect(p, EngineRequest("push-1", prompt, SamplingParams(max_tokens=1, ignore_eos=True))))
    assert "push-1" in p._pushed
    assert engines.run(p._utility("llmsched_export_kv", "push-1", 0, None)) is None  # the engine let it go
    ref = engines.prefill
    engines.run(_collect(ref, EngineRequest("push-ref", prompt, SamplingParams(max_tokens=1, ignore_eos=True))))
    via_engine = engines.run(ref.export_kv("push-ref", 0))
    assert not ref._pushed  # exported through its engine utility

    async def no_engine_loop(*args: Any) -> Any:
        raise AssertionError("the export went through the engine loop")

    utility, p._utility = p._utility, no_engine_loop
    try:
        blocks = engines.run(p.export_kv("push-1", 0))
        tail = engines.run(p.export_kv("push-1", 40))  # a block-aligned slice of it, as a later stage asks
    finally:
        p._utility = utility
    assert (blocks.start_token, blocks.end_token, blocks.token_ids) == (0, len(prompt), prompt)
    assert via_engine.token_ids == prompt and via_engine.data["layers"].keys() == blocks.data["layers"].keys()
    for name, arr in via_engine.data["layers"].items():
        assert np.array_equal(blocks.data["layers"][name], arr)
    assert tail.start_token == 40 // p.block_size * p.block_size and tail.end_token == len(prompt)
    assert engines.run(p.drop_kv("push-1")) is True and "push-1" not in p._pushed
    assert engines.run(ref.drop_kv("push-ref")) is True


def test_a_worker_process_gives_up_a_released_prompt_kv(engines: Engines) -> None:
    """With the worker in a process of its own (vLLM's default executor here; the Ray executor for TP > 1) the
    prompt KV stays in the worker and the export goes through the engine: once nobody will ask for it
    (``release_kv``: the handoff was served, or none follows) the worker is told to let it go, in the background;
    a KV not released yet stays exportable."""
    p = engines.prefill
    prompt = _tokenize(engines.model_path, PROMPTS[1])
    for rid in ("kept-1", "kept-2"):
        engines.run(_collect(p, EngineRequest(rid, prompt, SamplingParams(max_tokens=1, ignore_eos=True))))
    assert not p._pushed  # nothing came out with the output: the worker holds both

    async def release() -> bool:
        dropped = p.release_kv("kept-1")
        await asyncio.gather(*p._background)
        return dropped

    assert engines.run(release()) is False  # no front-end copy to drop...
    assert engines.run(p._utility("llmsched_export_kv", "kept-1", 0, None)) is None  # ...the worker's went
    assert engines.run(p.export_kv("kept-2", 0)).token_ids == prompt
    assert engines.run(p.drop_kv("kept-2")) is True and not {"kept-1", "kept-2"} & p._kept_by_worker


def test_engine_ipc_sockets_live_in_a_folder_of_their_own(engines: Engines) -> None:
    """vLLM's ZMQ IPC sockets (front end <-> engine core) go into the backend's own folder, removed at shutdown
    (in /tmp at large they were left behind, ~4 per engine); the variable is not left set for others."""
    for b in (engines.prefill, engines.decode):
        assert b._rpc_dir is not None and any(q.is_socket() for q in Path(b._rpc_dir).iterdir())
    assert engines.prefill._rpc_dir != engines.decode._rpc_dir

    class FakeLLM:  # what _construct hands vLLM's engine args to: makes its sockets where the variable says
        @classmethod
        def from_engine_args(cls, args: Any) -> FakeLLM:
            Path(os.environ["VLLM_RPC_BASE_PATH"], "socket").touch()
            return cls()

        def shutdown(self) -> None:
            pass

    before = os.environ.get("VLLM_RPC_BASE_PATH")
    b = VLLMBackend(engines.model_path)
    b._engine = b._construct(FakeLLM, None)
    folder = Path(b._rpc_dir)
    assert (folder / "socket").exists() and os.environ.get("VLLM_RPC_BASE_PATH") == before
    engines.run(b.shutdown())
    assert not folder.exists()


def test_role_switch_needs_no_restart(engines: Engines) -> None:
    """Re-roling (scheduler.control.reroling) switches a running engine: the one built as ``kv_producer`` decodes a
    handed-off request once it is DECODE and then keeps no finished request's KV; the decode engine, made PREFILL,
    serves the prefill leg."""
    p, d = engines.prefill, engines.decode
    prompt = _tokenize(engines.model_path, PROMPTS[0] * 2)
    n = 12
    reference, _ = engines.run(
        _collect(p, EngineRequest("rs-ref", prompt, SamplingParams(max_tokens=n, ignore_eos=True)))
    )
    assert engines.run(p.drop_kv("rs-ref")) is True  # as PREFILL it keeps every finished request's prompt KV
    p.set_role(InstanceRole.DECODE)
    d.set_role(InstanceRole.PREFILL)
    try:
        first, _ = engines.run(
            _collect(d, EngineRequest("rs-1", prompt, SamplingParams(max_tokens=1, ignore_eos=True)))
        )
        blocks = engines.run(d.export_kv("rs-1", 0))
        req = EngineRequest("rs-1", prompt + tuple(first), SamplingParams(max_tokens=n - 1, ignore_eos=True),
                            num_output_tokens_before=1, kv=(blocks,))
        rest, chunks = engines.run(_collect(p, req))
        assert first + rest == reference
        _check_indices(chunks, 1)
        assert engines.run(p.drop_kv("rs-1")) is False  # as DECODE it leaves nothing behind
        assert engines.run(d.drop_kv("rs-1")) is True
    finally:
        p.set_role(InstanceRole.PREFILL)
        d.set_role(InstanceRole.DECODE)


def test_live_export_while_decoding(engines: Engines) -> None:
    """Copy a running request's KV without stopping it, then resume it elsewhere from that copy (migration)."""
    p, d = engines.prefill, engines.decode
    prompt = _tokenize(engines.model_path, PROMPTS[2])
    total = 200

    async def run_and_export() -> tuple[list[int], Any, bool]:
        out: list[int] = []
        exported = None
        finished_at_export = True
        async for c in p.generate(
            EngineRequest("live", prompt, SamplingParams(max_tokens=total, ignore_eos=True))
        ):
            out.extend(c.token_ids)
            if exported is None and len(out) >= 40:
                exported = await p.export_kv("live", 0)
                finished_at_export = c.finished
        return out, exported, finished_at_export

    source, kv, finished = engines.run(run_and_export())
    assert len(source) == total and not finished
    history = list(prompt) + source
    assert len(prompt) + 39 <= kv.end_token < len(history)
    assert list(kv.token_ids) == history[: kv.end_token]
    before = len(history[: kv.end_token + 1]) - len(prompt)
    req = EngineRequest(
        "live-moved",
        tuple(history[: kv.end_token + 1]),
        SamplingParams(max_tokens=total - before, ignore_eos=True),
        num_output_tokens_before=before,
        kv=(kv,),
    )
    s0 = engines.run(d.stats())
    resumed, chunks = engines.run(_collect(d, req))
    s1 = engines.run(d.stats())
    assert resumed == source[before:]
    _check_indices(chunks, before)
    assert s1.prompt_tokens_loaded - s0.prompt_tokens_loaded == kv.end_token
    assert s1.prompt_tokens_computed - s0.prompt_tokens_computed == 1


@pytest.mark.parametrize("preadmit", [False, True], ids=["admit-at-commit", "preadmitted"])
def test_live_migration_adopts_precopied_blocks(engines: Engines, preadmit: bool) -> None:
    """Backend-level migration protocol (reserve, pre-copy stages, pause + final copy, admit): the destination
    (prefix caching on) takes every whole pre-copied block as already in place -- written into its reserved
    blocks while the source kept decoding -- and copies only the partial tail at admission; greedy output is
    identical and no prompt token but the last is computed. ``preadmitted``: the reservation carries the request
    template, so the first stage admits R on the destination (held, invisible in its stats); the commit appends
    the tokens decoded since then."""
    p, d = engines.prefill, engines.decode
    rid = f"adopt-{preadmit}"
    prompt = tuple((i * 7919 + preadmit) % 1000 + 3 for i in range(333))  # seen by no other test: no stale hits
    total = 1000  # long enough that the source is still decoding at the stop on a fast idle box too (300 finished first)
    ref, ref_chunks = engines.run(_collect(p, EngineRequest(f"{rid}-ref", prompt, SamplingParams(max_tokens=total))))

    async def migrate() -> tuple[list[int], list[TokenChunk], Any, Any]:
        src_out: list[int] = []
        gen = p.generate(EngineRequest(rid, prompt, SamplingParams(max_tokens=total)))
        async for c in gen:
            src_out.extend(c.token_ids)
            if len(src_out) >= 30:
                break
        template = EngineRequest(rid, prompt, SamplingParams(max_tokens=total)) if preadmit else None
        assert await d.reserve_kv(rid, len(prompt) + total, template) is None
        pre = await p.export_kv(rid, 0)  # pre-copy: the source keeps decoding
        await d.stage_kv(rid, pre)
        async for c in gen:  # the source decodes on: these tokens reach the destination with the commit
            src_out.extend(c.token_ids)
            if len(src_out) >= 60:
                break
        pre2 = await p.export_kv(rid, pre.end_token // d.block_size * d.block_size)
        await d.stage_kv(rid, pre2)
        async for c in gen:  # a slow box may not have run a step since pre2: make sure the stop has a tail
            src_out.extend(c.token_ids)
            if len(prompt) + len(src_out) - 1 > pre2.end_token:
                break
        seen = await d.stats()
        assert rid not in [r.request_id for r in seen.requests] and seen.num_waiting == 0 and seen.num_running == 0
        res = await p.pause(rid, pre2.end_token)
        assert not isinstance(res, str), res
        snap, tail = res
        staged = await d.stage_kv(rid, tail, snap.rng_state, final=True)  # preadmitted: goes with the release
        assert staged > 0
        assert 0 < snap.token_offset == tail.start_token  # only the tail's tokens shipped with the stop
        snap = dataclasses.replace(snap, token_ids=snap.with_prefix(d.staged_token_ids(rid)), token_offset=0)
        s0 = await d.stats()
        before = snap.num_output_tokens
        req = EngineRequest(rid, snap.token_ids, SamplingParams(max_tokens=total - before),
                            num_output_tokens_before=before)
        out, chunks = await _collect(d, req)
        s1 = await d.stats()
        await p.abort(rid)
        await gen.aclose()
        return list(snap.token_ids[len(prompt):]) + out, chunks, (s0, s1), snap

    tokens, chunks, (s0, s1), snap = engines.run(migrate())
    assert tokens == ref
    _check_indices(chunks, snap.num_output_tokens)
    # The resumed stream's text (decoded by the backend, not vLLM) is what vLLM gave the unmigrated run.
    resumed_text = "".join(c.text for c in chunks)
    assert resumed_text and "".join(c.text for c in ref_chunks).endswith(resumed_text)
    context = len(snap.token_ids) - 1  # the last sampled token has no KV yet: the destination computes it
    assert s1.prompt_tokens_computed - s0.prompt_tokens_computed == 1
    assert s1.prompt_tokens_loaded - s0.prompt_tokens_loaded == context
    assert s1.prompt_tokens_adopted - s0.prompt_tokens_adopted == context // d.block_size * d.block_size


@pytest.mark.parametrize("preadmit", [False, True], ids=["admit-at-commit", "preadmitted"])
def test_seeded_migration_at_a_block_boundary_continues_the_rng(engines: Engines, preadmit: bool) -> None:
    """Seeded sampling, stopped where the migrated context is a whole number of blocks: every token is then a
    prefix-cache hit on adopted blocks and nothing is loaded through the connector, and the sampler RNG must still
    be restored (it used to ride on the load: the destination then resampled from a freshly seeded generator).
    The source stops wherever the engine is, then decodes on to the next block boundary and stops there
    (``pause(at_output=...)``): it used to be paused, resumed and paused again until a stop landed on one, which
    missed them all on a loaded box (each resume let a load-dependent number of tokens through)."""
    p, d = engines.prefill, engines.decode
    rid = f"rng-aligned-{preadmit}"
    prompt = tuple((i * 613 + 11 + preadmit) % 1000 + 3 for i in range(250))
    total, bs = 720, d.block_size

    def sampling(n: int) -> SamplingParams:
        return SamplingParams(max_tokens=n, temperature=1.0, seed=1234, ignore_eos=True)

    ref, _ = engines.run(_collect(p, EngineRequest(f"{rid}-ref", prompt, sampling(total))))

    async def migrate() -> tuple[list[int], int, Any, Any]:
        gen = p.generate(EngineRequest(rid, prompt, sampling(total)))
        got = 0
        async for c in gen:
            got += len(c.token_ids)
            if got >= 8:
                break
        res = await p.pause(rid, -1)  # wherever the engine is now
        assert not isinstance(res, str), res
        made = res[0].num_output_tokens
        assert made < total - 2 * bs, made  # room to decode on to a boundary (it would finish first otherwise)
        # The next output count past ``made`` whose context is whole blocks (the last sampled token has no KV yet):
        # never ``made`` itself, so the paused request always decodes on to it.
        target = made + bs - (len(prompt) + made - 1) % bs
        res = await p.pause(rid, -1, at_output=target)
        assert not isinstance(res, str), res
        snap, _ = res
        assert snap.num_output_tokens == target
        context = len(prompt) + snap.num_output_tokens - 1
        assert context % bs == 0
        template = EngineRequest(rid, prompt, sampling(total)) if preadmit else None
        assert await d.reserve_kv(rid, context + 64, template) is None
        kv = await p.export_kv(rid, 0, context)
        assert kv.end_token == context
        await d.stage_kv(rid, kv, snap.rng_state, final=True)
        s0 = await d.stats()
        before = snap.num_output_tokens
        out, _ = await _collect(d, EngineRequest(rid, snap.token_ids, sampling(total - before),
                                                  num_output_tokens_before=before))
        s1 = await d.stats()
        await p.abort(rid)
        await gen.aclose()
        return list(snap.token_ids[len(prompt):]) + out, context, s0, s1

    tokens, context, s0, s1 = engines.run(migrate())
    assert s1.prompt_tokens_adopted - s0.prompt_tokens_adopted == context  # all of it adopted: no connector load
    assert s1.prompt_tokens_computed - s0.prompt_tokens_computed == 1
    assert tokens == ref


def test_pause_at_an_output_count_stops_exactly_there(engines: Engines) -> None:
    """``pause(at_output=n)`` stops the request when it has made exactly n output tokens, whatever the engine's
    pace (a paused request decodes on to n), with the KV of everything before its last token; refuses a count it
    has passed (staying paused); answers with a reason, and stops nothing, when the request is resumed or finishes
    first. The stream loses nothing: its tokens are the unpaused run's."""
    p = engines.prefill
    rid, total = "pause-at", 800
    prompt = tuple((i * 389 + 17) % 1000 + 3 for i in range(100))
    sampling = SamplingParams(max_tokens=total, ignore_eos=True)
    ref, _ = engines.run(_collect(p, EngineRequest(f"{rid}-ref", prompt, sampling)))

    async def scenario() -> tuple[list[Any], list[TokenChunk]]:
        gen = p.generate(EngineRequest(rid, prompt, sampling))
        chunks = [await gen.__anext__()]
        first = await p.pause(rid, -1)
        assert not isinstance(first, str), first
        made = first[0].num_output_tokens
        got = [
            first,
            await p.pause(rid, -1, at_output=made - 1),  # passed: refused, still paused
            await p.pause(rid, -1, at_output=made),  # paused there already: its state again
            await p.pause(rid, 0, at_output=made + 5),  # decodes on for exactly 5 tokens
            await p.pause(rid, -1, at_output=made + 6),
        ]
        far = asyncio.ensure_future(p.pause(rid, -1, at_output=total - 10))
        while (await p.stats()).num_running == 0:  # back in vLLM's running list: the pause waits
            await asyncio.sleep(0.005)
        got += [await p.resume(rid), await far]  # a resume answers the waiting pause; the request decodes on
        got.append(await p.pause(rid, -1, at_output=total + 1))  # finishes first
        chunks += [c async for c in gen]
        return got, chunks

    got, chunks = engines.run(scenario())
    first, past, again, at, next_one, resumed, far, finished = got
    made = first[0].num_output_tokens
    assert isinstance(past, str) and "past" in past, past
    assert again[0] == first[0]
    snap, kv = at
    assert snap.num_output_tokens == made + 5 and list(snap.token_ids) == list(prompt) + ref[: made + 5]
    assert kv.start_token == 0 and kv.end_token == len(snap.token_ids) - 1  # the last sampled token has no KV yet
    assert next_one[0].num_output_tokens == made + 6
    assert resumed is True and isinstance(far, str) and "resumed" in far, far
    assert isinstance(finished, str) and "finished" in finished, finished
    assert [t for c in chunks for t in c.token_ids] == ref
    _check_indices(chunks, 0)


def test_cancel_of_preadmitted_migration_frees_everything(engines: Engines) -> None:
    """Abort after the destination pre-admitted R (held): the held request, the reservation and the staged KV
    all go; the source keeps R and finishes it."""
    p, d = engines.prefill, engines.decode
    prompt = tuple((i * 131 + 5) % 1000 + 3 for i in range(300))

    async def scenario() -> tuple[int, Any, Any, list[int]]:
        idle = (await d.stats()).kv_blocks_used
        gen = p.generate(EngineRequest("held-cancel", prompt, SamplingParams(max_tokens=80)))
        out: list[int] = []
        async for c in gen:
            out.extend(c.token_ids)
            if len(out) >= 10:
                break
        template = EngineRequest("held-cancel", prompt, SamplingParams(max_tokens=80))
        assert await d.reserve_kv("held-cancel", len(prompt) + 96, template) is None
        await d.stage_kv("held-cancel", await p.export_kv("held-cancel", 0))
        held = await d.stats()
        await d.cancel_incoming("held-cancel")
        await asyncio.sleep(0.2)
        after = await d.stats()
        async for c in gen:
            out.extend(c.token_ids)
        return idle, held, after, out

    idle, held, after, out = engines.run(scenario())
    assert held.kv_blocks_used > idle  # the reservation
    assert after.kv_blocks_used == idle and after.num_running == 0 and after.num_waiting == 0
    assert len(out) == 80  # the source finished it
    assert "held-cancel" not in d._active and "held-cancel" not in d._incoming


def test_abort_frees_kv_blocks(engines: Engines) -> None:
    d = engines.decode
    prompt = _tokenize(engines.model_path, PROMPTS[0] * 20)

    async def scenario() -> tuple[int, int, TokenChunk, int]:
        idle = (await d.stats()).kv_blocks_used
        gen = d.generate(EngineRequest("abort-me", prompt, SamplingParams(max_tokens=1500, ignore_eos=True)))
        await gen.__anext__()
        busy = await d.stats()
        assert busy.num_running == 1 and [r.request_id for r in busy.requests] == ["abort-me"]
        await d.abort("abort-me")
        last = [c async for c in gen][-1]
        return idle, busy.kv_blocks_used, last, (await d.stats()).kv_blocks_used

    idle, busy, last, after = engines.run(scenario())
    assert busy >= len(prompt) // d.block_size
    assert last.finished and last.finish_reason == "abort"
    assert after == idle
    assert engines.run(d.stats()).num_running == 0


def test_stats_report_the_requests_llmsched_priority(engines: Engines) -> None:
    """The engines run FCFS, whose vLLM priority is 0 for every request: the snapshots (the migration policy's
    priority trigger) read 0 for a high-priority request. Under vLLM's "priority" policy the value goes negated
    (vLLM schedules the smallest first; llmsched's larger is more important)."""
    d = engines.decode
    prompt = _tokenize(engines.model_path, PROMPTS[0])

    async def scenario() -> dict[str, int]:
        gen = d.generate(EngineRequest("vip", prompt, SamplingParams(max_tokens=400, ignore_eos=True), priority=2))
        await gen.__anext__()
        seen = {r.request_id: r.priority for r in (await d.stats()).requests}
        await d.abort("vip")
        _ = [c async for c in gen]
        return seen

    assert engines.run(scenario()) == {"vip": 2}
    assert d._priority == {}
    vip = EngineRequest("x", prompt, SamplingParams(), priority=2)
    assert d._engine_priority(vip) == 0  # FCFS
    d._scheduling_policy = "priority"
    try:
        assert d._engine_priority(vip) == -2
    finally:
        d._scheduling_policy = "fcfs"
        d._priority.clear()


def test_stats_count_the_prompt_tokens_a_waiting_request_still_has_to_compute(engines: Engines) -> None:
    """A queued prompt whose leading blocks the prefix cache holds will cost only its tail: ``prefill_compute_tokens``
    (what the lookahead router prices a queue by; the engine model reports the same) counts that, while
    ``prefill_tokens_pending`` keeps the whole prompt for KV accounting."""
    d = engines.decode
    bs = d.block_size
    rng = np.random.default_rng(11)

    def ids(n: int) -> tuple[int, ...]:
        return tuple(int(t) for t in rng.integers(5, 1000, size=n))

    shared, tail, fresh = ids(5 * bs + 7), ids(40), ids(3 * bs + 5)
    engines.run(_collect(d, EngineRequest("pc-warm", shared, SamplingParams(max_tokens=1, ignore_eos=True))))
    blockers = [ids(20) for _ in range(d._engine_args["max_num_seqs"])]  # every slot busy: the next ones queue

    async def scenario() -> Any:
        gens = [
            d.generate(EngineRequest(f"pc-block-{i}", p, SamplingParams(max_tokens=1500, ignore_eos=True)))
            for i, p in enumerate(blockers)
        ]
        for g in gens:
            await g.__anext__()  # running and decoding
        queued = [
            asyncio.ensure_future(_collect(d, EngineRequest(rid, p, SamplingParams(max_tokens=2, ignore_eos=True))))
            for rid, p in (("pc-hit", shared + tail), ("pc-fresh", fresh))
        ]
        try:
            for _ in range(400):
                s = await d.stats()
                if s.num_waiting == 2:
                    return s
                await asyncio.sleep(0.005)
            raise AssertionError("the two requests never queued behind the blockers")
        finally:
            for i in range(len(gens)):
                await d.abort(f"pc-block-{i}")
            for g in gens:
                _ = [c async for c in g]
            await asyncio.gather(*queued)

    s = engines.run(scenario())
    waiting = {r.request_id: r for r in s.requests if r.in_prefill}
    assert set(waiting) == {"pc-hit", "pc-fresh"}
    hit = (len(shared) // bs) * bs  # the cached prompt's full blocks
    assert s.prefill_compute_tokens == len(shared) + len(tail) - hit + len(fresh)
    assert sum(r.context_tokens for r in waiting.values()) == len(shared) + len(tail) + len(fresh)
    assert s.prefill_tokens_pending == len(shared) + len(tail) + len(fresh)  # queued prompts count whole
    # What the instance reports to routers, and what lookahead prices the queue by.
    from scheduler.control.instance import InstanceInfo, snapshot_from_stats
    from scheduler.policy.routers_lookahead import LookaheadRouter

    snap = snapshot_from_stats(s, InstanceInfo("d", "p", InstanceRole.MIXED, "cpu", 1, "tiny", "vllm", "i"), 0.0)
    assert snap.prefill_compute_tokens == s.prefill_compute_tokens
    assert snap.prefill_tokens_pending == len(shared) + len(tail) + len(fresh)
    whole = dataclasses.replace(snap, prefill_compute_tokens=None)
    router = LookaheadRouter()
    assert router._terms(snap).queue_s < 0.8 * router._terms(whole).queue_s


def test_engine_timings_place_a_request_inside_the_engine(engines: Engines) -> None:
    """(arrival at vLLM's front end, first scheduled, finished), wall clock, per llmsched id: llmsched run's split."""
    d = engines.decode
    prompt = _tokenize(engines.model_path, PROMPTS[2])
    t0 = time.time()
    engines.run(_collect(d, EngineRequest("timed-1", prompt, SamplingParams(max_tokens=4, ignore_eos=True))))
    arrival, scheduled, finished = engines.run(d.engine_timings())["timed-1"]
    assert t0 <= arrival <= scheduled <= finished <= time.time()


def test_idle_stats_skip_the_engine_until_something_changes(engines: Engines) -> None:
    """An idle engine's report is reused (the ingress polls every 25 ms), and every change shows at once: a new
    request's prompt counters, a reservation's blocks, their release."""
    d = engines.decode
    core = d._engine.engine_core
    calls: list[str] = []
    real = core.call_utility_async

    def counting(name: str, *args: Any) -> Any:
        calls.append(name)
        return real(name, *args)

    prompt = _tokenize(engines.model_path, PROMPTS[1])

    async def scenario() -> None:
        first = await d.stats()
        assert not (first.num_running or first.kv_blocks_used or first.requests)
        assert await d.stats() == first and calls.count("llmsched_stats") <= 1
        await _collect(d, EngineRequest("idle-1", prompt, SamplingParams(max_tokens=3, ignore_eos=True)))
        after = await d.stats()
        assert after.prompt_tokens_computed > first.prompt_tokens_computed
        assert await d.stats() == after
        n = calls.count("llmsched_stats")
        assert await d.reserve_kv("idle-2", 4 * d.block_size) is None
        held = await d.stats()
        assert held.kv_blocks_used >= 4
        await d.cancel_incoming("idle-2")
        assert (await d.stats()).kv_blocks_used == 0
        assert calls.count("llmsched_stats") == n + 2  # both read the engine: neither state was idle-cached

    core.call_utility_async = counting
    try:
        engines.run(scenario())
    finally:
        core.call_utility_async = real


@pytest.mark.parametrize(
    ("request_kwargs", "field"),
    [
        ({"prompt_token_ids": ()}, "prompt_token_ids"),
        ({"prompt_token_ids": (5, 1024)}, "prompt_token_ids[1]"),
        ({"prompt_token_ids": (5, -1)}, "prompt_token_ids[1]"),
        ({"prompt_token_ids": (5, 6), "sampling": SamplingParams(max_tokens=2047)}, "sampling.max_tokens"),
        ({"prompt_token_ids": (5, 6), "sampling": SamplingParams(max_tokens=0)}, "sampling.max_tokens"),
        ({"prompt_token_ids": (5, 6), "sampling": SamplingParams(temperature=-1.0)}, "sampling.temperature"),
    ],
)
def test_invalid_input_names_field(engines: Engines, request_kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=field.replace("[", r"\[").replace("]", r"\]")):
        engines.decode.generate(EngineRequest("bad", **request_kwargs))
    # The engine keeps serving.
    got, _ = engines.run(
        _collect(engines.decode, EngineRequest("ok", (5, 6, 7), SamplingParams(max_tokens=3)))
    )
    assert len(got) == 3


def test_kv_that_does_not_match_prompt_is_rejected(engines: Engines) -> None:
    p = engines.prefill
    prompt = _tokenize(engines.model_path, PROMPTS[0])
    engines.run(_collect(p, EngineRequest("mm", prompt, SamplingParams(max_tokens=1))))
    blocks = engines.run(p.export_kv("mm", 0))
    other = (prompt[0] + 1,) + prompt[1:] + (7,)
    with pytest.raises(ValueError, match="kv.token_ids"):
        engines.decode.generate(EngineRequest("mm2", other, SamplingParams(max_tokens=2), kv=(blocks,)))
    with pytest.raises(LookupError, match="request_id"):
        engines.run(p.export_kv("never-ran", 0))


def test_parked_requests_do_not_keep_the_engine_stepping() -> None:
    """A request the connector holds (pre-admitted, waiting for its commit) or paused (stop-and-copy) is in vLLM's
    ``scheduler.requests`` but neither running nor waiting, which vLLM reads as "finished, not cleaned up yet" and
    answers with back-to-back empty steps -- a core spinning for the whole pre-copy. ``bind_scheduler`` counts
    them as parked instead, and leaves everything else to vLLM's own test."""
    from scheduler.transfer.vllm_connector import LlmschedConnector

    class FakeScheduler:
        def __init__(self) -> None:
            self.requests: dict[str, object] = {}
            self.running: list[object] = []
            self.waiting: list[object] = []
            self.finished_req_ids: set[str] = set()

        def get_request_counts(self) -> tuple[int, int]:
            return len(self.running), len(self.waiting)

        def has_finished_requests(self) -> bool:  # vLLM's test, as in 0.32
            return bool(self.finished_req_ids) or len(self.requests) > len(self.running) + len(self.waiting)

        def has_requests(self) -> bool:
            return bool(self.running or self.waiting) or self.has_finished_requests()

        def schedule(self) -> None:  # wrapped too (pauses due at an output count)
            return None

    conn = LlmschedConnector.__new__(LlmschedConnector)  # scheduler-side state only; no vLLM config needed
    conn._held, conn._paused, conn._pause_at, conn._scheduler = {}, {}, {}, None
    sched = FakeScheduler()
    conn.bind_scheduler(sched)
    held, paused, other = object(), object(), object()
    sched.requests = {"h": held, "p": paused}
    conn._held["h"], conn._paused["p"] = held, paused
    assert not sched.has_requests()  # parked only: the engine may block on its input queue
    sched.running.append(other)
    sched.requests["o"] = other
    assert sched.has_requests()
    sched.running.clear()  # "o" finished but is still in requests: vLLM must step once more to clean it up
    assert sched.has_requests()
    del sched.requests["o"]
    sched.finished_req_ids.add("o")
    assert sched.has_requests()
    sched.finished_req_ids.clear()
    conn._held.clear()
    conn._paused.clear()
    del sched.requests["h"], sched.requests["p"]
    assert not sched.has_requests()
    conn.bind_scheduler(sched)  # idempotent: no second wrapper
    assert not sched.has_requests()


def test_snapshots_list_what_the_prefix_cache_holds_from_vllms_kv_events(engines: Engines) -> None:
    """The decode engine (prefix caching on) follows vLLM's KV cache events: after a 1100-token prompt its stats list
    the prompt's ids (``prompt_hash_ids``, what the routers match): its two full 512-token ones and its partial
    third (a repeat reuses its blocks up to 1088 tokens, all cached), and a second prompt sharing its first 576
    tokens adds only its own ids. The prefill engine caches nothing: it cannot tell (None)."""
    from scheduler.core.prefix import prompt_hash_ids

    rng = np.random.default_rng(7)
    a = tuple(int(t) for t in rng.integers(4, 1000, 1100))
    b = a[:576] + tuple(int(t) for t in rng.integers(4, 1000, 600))

    async def cached_after(rid: str, prompt: tuple[int, ...], want: set[int]) -> frozenset[int] | None:
        await _collect(engines.decode, EngineRequest(rid, prompt, SamplingParams(max_tokens=2, ignore_eos=True)))
        for _ in range(100):  # the events travel from the engine core's publisher thread
            cached = (await engines.decode.stats()).cached_hash_ids
            if cached is not None and want <= cached:
                break
            await asyncio.sleep(0.05)
        return cached

    ids_a, ids_b = prompt_hash_ids(a), prompt_hash_ids(b)
    cached = engines.run(cached_after("events-a", a, set(ids_a)))
    assert cached is not None and set(ids_a) <= cached
    cached = engines.run(cached_after("events-b", b, set(ids_b)))
    assert set(ids_a) | set(ids_b) <= cached
    assert engines.run(engines.prefill.stats()).cached_hash_ids is None
