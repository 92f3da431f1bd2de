"""Where a migrated or preempted request lands, in the simulator and live (audit). Each test failed before its fix.

A migrated request keeps running (Llumnix): on its destination it is queued ahead of the prompts waiting there, as
vLLM queues a request it preempted (``waiting.prepend_request``) -- in the simulator's driver, the simulated backend
and the vLLM connector alike."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest

from bench.loadgen import cluster_config
from scheduler.config.models import EngineSpec
from scheduler.engine.base import EngineRequest, KVBlocks, SamplingParams
from scheduler.engine.simulated_backend import SimulatedBackend
from scheduler.engine_model import EngineModel
from scheduler.latency import roofline_model
from sim.migration import MigrationDriver, _InFlight

CONTEXT = 300  # the migrated request's tokens (its KV: all but the last)


def _busy_engine_spec() -> EngineSpec:
    # One running request fills the engine: a prompt queued behind it waits, so the queue order shows.
    return EngineSpec(block_size=16, max_num_seqs=1, max_num_batched_tokens=512, num_kv_blocks=400)


def _live_queue_after_migration() -> list[str]:
    """The simulated backend's waiting queue once a migrated request arrived behind a waiting prompt."""
    cfg = cluster_config("twoclocks", mixed=1)
    gpu = cfg.gpus[cfg.pools[0].gpu]

    async def run() -> list[str]:
        D = SimulatedBackend(cfg.model, gpu, engine=_busy_engine_spec(), time_scale=0.0)
        await D.start()
        try:
            D.generate(
                EngineRequest("busy", tuple(range(1, 65)), SamplingParams(max_tokens=5000, ignore_eos=True))
            )
            for _ in range(20):  # admitted and decoding
                await asyncio.sleep(0)
            D.generate(EngineRequest("late", tuple(range(1, 65)), SamplingParams(max_tokens=8)))
            tokens = tuple(range(2, CONTEXT + 2))
            assert await D.reserve_kv("m", CONTEXT + 16) is None
            await D.stage_kv("m", KVBlocks("m", 0, CONTEXT - 1, tokens[: CONTEXT - 1], 0, source_gpu=gpu))
            D.generate(EngineRequest("m", tokens, SamplingParams(max_tokens=8), num_output_tokens_before=100))
            return [s.rid for s in D.engine.waiting]
        finally:
            await D.shutdown()

    return asyncio.run(run())


def _simulated_queue_after_migration() -> list[str]:
    """The simulator's destination engine model after ``MigrationDriver.on_commit``, in the same situation."""
    cfg = cluster_config("twoclocks", mixed=1)
    eng = EngineModel(roofline_model(cfg.model, cfg.gpus[cfg.pools[0].gpu], 1), _busy_engine_spec())
    eng.add_request("busy", 64, 5000)
    eng.step()
    eng.add_request("late", 64, 8)
    sim = SimpleNamespace(prefix_ids=lambda rid: {}, dec_of={}, _poke=lambda inst, now: None, poll=None)
    drv = MigrationDriver.__new__(MigrationDriver)  # the commit alone: no simulation run
    drv.sim, drv.policy, drv.committed, drv.total_s = sim, None, 0, []
    dst = SimpleNamespace(engine=eng, index=1, in_step=None)
    need = -(-(CONTEXT + 16) // eng.block_size)
    eng.prefill_blocks += need  # the handshake's reservation
    drv.in_flight = {"m": _InFlight("m", None, dst, need, CONTEXT - 1, 0.0, "m")}  # type: ignore[arg-type]
    seq = SimpleNamespace(
        num_tokens=CONTEXT, max_new=8, priority=0, predicted_remaining=None, length_dist=None, dist_base=100
    )
    drv.on_commit(("m", seq), 1.0)
    return [s.rid for s in eng.waiting]


def test_a_migrated_request_is_queued_ahead_of_waiting_prompts_in_both_clocks() -> None:
    """The simulator queued a migrated request at the front of its destination's queue, the live simulated backend
    at the back (behind every prompt that arrived during its move: in a burst, a running request stalled for
    their whole prefill queue -- and, on vLLM, its adopted KV left cached but free for them to evict). Both clocks
    put it at the front now."""
    assert _simulated_queue_after_migration() == ["m", "late"]
    assert _live_queue_after_migration() == ["m", "late"]


# ---- vLLM connector: its scheduler-side queueing, over vLLM's own queue and enqueue -------------------------------
class _Scheduler:
    """The parts of vLLM's ``Scheduler`` the connector's migration path touches (its own methods)."""

    def __init__(self) -> None:
        from vllm.v1.core.sched.request_queue import FCFSRequestQueue
        from vllm.v1.core.sched.scheduler import Scheduler

        self.waiting, self.kv_holding_waiting = FCFSRequestQueue(), FCFSRequestQueue()
        self.deferred_waiting: set[Any] = set()
        self.running: list[Any] = []
        self._enqueue = Scheduler._enqueue_waiting_request

    def schedule(self) -> None:  # (bind_scheduler wraps it: a pause due at an output count is taken before a step)
        raise AssertionError("not stepped here")

    def add_request(self, request: Any, conn: Any) -> None:
        """vLLM's ``Scheduler.add_request``: queue it, then tell the connector."""
        self._enqueue(self, request)
        conn.on_new_request(request)

    _is_blocked_waiting_status = staticmethod(lambda status: False)
    _holds_kv_blocks = staticmethod(lambda request: request.num_computed_tokens > 0)
    has_finished_requests = staticmethod(lambda: False)


class _Request:
    """A new vLLM request's fields the path reads (hashable by identity, as vLLM's)."""

    def __init__(self, rid: str, **params: Any) -> None:
        from vllm.v1.request import RequestStatus

        self.request_id, self.kv_transfer_params = rid, {"llmsched_id": rid, **params}
        self.status, self.num_computed_tokens = RequestStatus.WAITING, 0
        self.prompt_token_ids, self.sampling_params, self.max_tokens = [1, 2, 3], None, 8

    def is_finished(self) -> bool:
        return False


@pytest.fixture
def connector() -> Any:
    pytest.importorskip("vllm")
    from scheduler.transfer import vllm_connector as vc

    conn = vc.LlmschedConnector.__new__(
        vc.LlmschedConnector
    )  # scheduler-side state only; no vLLM config needed
    conn._live, conn._by_llmsched_id, conn._held, conn._paused, conn._adopted = {}, {}, {}, {}, {}
    conn._reservations, conn._scheduler, conn._kv_cache_manager = {}, None, None
    sched = _Scheduler()
    conn.bind_scheduler(sched)
    conn._reservations["m"] = []  # the handshake's (empty here: nothing to adopt)
    core = SimpleNamespace(scheduler=sched, collective_rpc=lambda *a, **k: [None])
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(vc, "_SCHEDULER_CONNECTOR", conn)
        mp.setattr(vc, "_WORKER_CONNECTOR", None)
        yield vc, conn, core


def test_vllm_queues_a_migrated_request_ahead_of_waiting_prompts(connector: Any) -> None:
    """Live vLLM queued a migrated request at the back of the waiting queue (``_enqueue_waiting_request``), behind
    the prompts that arrived during its pre-copy; it goes to the front now (``prepend_request``)."""
    _, conn, core = connector
    sched = core.scheduler
    late = _Request("late")
    sched.add_request(late, conn)
    sched.add_request(_Request("m"), conn)
    assert [r.request_id for r in sched.waiting] == ["m", "late"]
    assert "m" not in conn._reservations  # handed back to the pool as before
    sched.add_request(_Request("other"), conn)  # a plain prompt still queues at the back
    assert [r.request_id for r in sched.waiting] == ["m", "late", "other"]


def test_vllm_releases_a_pre_admitted_migration_ahead_of_waiting_prompts(connector: Any) -> None:
    """The pre-admitted path (the default): the commit's ``llmsched_release`` queued the held request at the back."""
    vc, conn, core = connector
    sched = core.scheduler
    sched.add_request(_Request("m", hold=True), conn)
    assert not sched.waiting and "m" in conn._held
    sched.add_request(_Request("late"), conn)
    assert vc._engine_release(core, "m", [], 8, CONTEXT - 1, 0) is True
    assert [r.request_id for r in sched.waiting] == ["m", "late"]
    assert "m" not in conn._reservations


# ---- a preempted request's recompute and the prefix cache ----------------------------------------------------------
@pytest.mark.parametrize("with_ids", [True, False], ids=["prompt-ids", "no-ids"])
def test_a_preempted_request_recomputes_only_what_the_prefix_cache_lost(with_ids: bool) -> None:
    """vLLM caches every full block of a request, its generated tokens' included (``Request.block_hashes`` grow with
    its output), and a preempted request's freed blocks stay cached: its recompute hits all but the last partial
    block (``get_computed_blocks``: up to ``num_tokens - 1``). The engine model hit only the prompt's ids -- none
    for a prompt without ids -- and recomputed every generated token."""
    cfg = cluster_config("twoclocks", mixed=1)
    spec = EngineSpec(
        block_size=16,
        max_num_seqs=8,
        max_num_batched_tokens=512,
        num_kv_blocks=20,
        enable_prefix_caching=True,
    )
    eng = EngineModel(roofline_model(cfg.model, cfg.gpus[cfg.pools[0].gpu], 1), spec)
    ids = {"hash_ids": (1, 2, 3, 4), "hash_block_tokens": 16} if with_ids else {}
    eng.add_request("a", 64, 200, **ids)
    eng.add_request("b", 64, 200, **{k: (5, 6, 7, 8) if k == "hash_ids" else v for k, v in ids.items()})
    victim = None
    while eng.has_work:
        res = eng.step()
        if res.preempted and victim is None:
            [seq] = res.preempted
            victim, context = seq.rid, seq.num_tokens
            computed_before = eng.prompt_tokens_computed
    assert victim == "b" and context > 64 + 16
    hit = (context - 1) // 16 * 16  # all its full blocks: prompt and generated
    assert eng.prefix_hit_tokens == hit
    assert eng.prompt_tokens_computed - computed_before == context - hit
