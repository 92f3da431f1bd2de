"""Regressions from a second audit of "one scheduling core, two clocks": the live control plane (``Instance`` objects
on the simulated backend, an ``Ingress`` over fake actor handles; no Ray) and the simulator run one tiny scenario
each, and must decide and book alike. Each test failed before its fix."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest

from bench.loadgen import cluster_config
from scheduler.control.api import GenerateRequest
from scheduler.control.instance import Instance, InstanceInfo, snapshot_from_stats
from scheduler.control.registry import RequestRecord
from scheduler.core.types import ClusterView, InstanceRole, InstanceSnapshot, RequestInfo
from scheduler.engine.base import EngineRequest, EngineStats, SamplingParams
from scheduler.policy.route import LeastOutstandingRouter, RouteDecision, make_router
from scheduler.predict.base import LengthPrediction
from sim.cluster import build_instances
from sim.simulator import Simulator, Workload
from tests.test_ingress_audit import FakeInstance, _consume, _ingress

# Mass on 128-256 and 512-1024 tokens: the guess (the median, ~181) runs out, and the renewal is long.
DIST = LengthPrediction.from_probs([0, 0, 0, 0, 0.6, 0, 0.4, 0, 0])


pytestmark = pytest.mark.usefixtures("no_ray")  # tests/conftest.py: Instance objects here, no Ray node


# ---- 1: a live migration carries the renewed length guess ------------------------------------------------------------
async def _read_past(inst: Instance, rid: str, n: int) -> tuple[int, float]:
    """Once ``rid`` streamed ``n`` outputs in all, read ``inst``'s snapshot (the one read, so the one renewal point):
    (outputs then, its predicted remaining)."""
    out = inst._streams[rid].before
    while out < n:
        chunk = await inst.poll(rid, 5.0)
        assert chunk is not None and not chunk.finished
        if chunk.token_ids:
            out = chunk.index + len(chunk.token_ids)
    snap = await inst.snapshot()
    (r,) = (r for r in snap.requests if r.request_id == rid)
    assert not r.in_prefill and r.predicted_remaining is not None
    return inst._streams[rid].before + r.generated_tokens, r.predicted_remaining


def _simulated_guess(cfg: Any, prompt: int, max_tokens: int, read: int, stop: int, dest_read: int) -> float:
    """The simulator's engines on the same path: read at ``read`` outputs (the guess renews), migrated at ``stop``
    (``sim.migration``: detach, re-add with the seq's guess), read on the destination at ``dest_read``."""
    src, dst = (x.engine for x in build_instances(cfg)[:2])
    src.add_request("r", prompt, max_tokens, predicted_remaining=DIST.point, length_dist=DIST)
    for target in (read, stop):
        while src.generated_of(src.get("r")) < target:  # type: ignore[arg-type]
            src.step()
        if target == read:
            src.snapshot("s", 0.0)
    seq = src.detach("r")
    assert seq is not None
    dst.add_request(
        "r",
        seq.num_tokens,
        seq.max_new,
        cached_tokens=seq.num_tokens - 1,
        predicted_remaining=seq.predicted_remaining,
        length_dist=seq.length_dist,
        generated_before=seq.dist_base,
    )
    while True:
        dst.step()
        snap = dst.snapshot("d", 0.0, detail=True)
        r = snap.requests[0]
        if not r.in_prefill and seq.dist_base + r.generated_tokens >= dest_read:
            assert seq.dist_base + r.generated_tokens == dest_read
            assert r.predicted_remaining is not None
            return r.predicted_remaining


def test_a_live_migration_carries_the_renewed_length_guess_as_the_simulator_does() -> None:
    """The source's stream renewed the guess when it ran out (read at ~250 outputs: E[L - g | L > g] from there);
    the simulator's migration hands the destination that renewed guess, counting down. The live destination got
    the ingress's copy of the original guess (``RequestRecord.guess``) and renewed it afresh at its first read:
    a different count in the decode batch's sum from there on (here 16 tokens apart)."""
    cfg = cluster_config("twoclocks", mixed=2)
    pool = cfg.pools[0]
    prompt, max_tokens = 50, 900
    tmpl = EngineRequest("r", (), SamplingParams(max_tokens=max_tokens, ignore_eos=True))

    async def live() -> tuple[int, int, int, float]:
        S, D = (
            Instance(f"mixed-{k}", pool, cfg.model, cfg.gpus[pool.gpu], backend_kwargs={"time_scale": 0.02})
            for k in range(2)
        )
        await S.start()
        await D.start()
        try:
            guess = {"predicted_output_tokens": DIST.point, "length_dist": DIST}  # what the ingress passes
            req = EngineRequest("r", tuple(range(1, prompt + 1)), tmpl.sampling)
            await S.submit(req, **guess, wait_first=False)
            read, _ = await _read_past(S, "r", 250)  # past the guess: renewed here
            await _read_past(S, "r", read + 60)
            ctx = await S.migrate_context("r")
            assert ctx is not None and await D.migrate_reserve("r", ctx + max_tokens, tmpl) is None
            stop = asyncio.ensure_future(S.migrate_stop("r", 0))
            assert await D.migrate_commit("r", tmpl, [stop], **guess) is None
            stopped = (await stop)[0].num_output_tokens
            await S.migrate_release("r")
            dest_read, remaining = await _read_past(D, "r", stopped + 10)
            return read, stopped, dest_read, remaining
        finally:
            await S.shutdown()
            await D.shutdown()

    read, stopped, dest_read, remaining = asyncio.run(live())
    assert read < stopped < dest_read
    simulated = _simulated_guess(cfg, prompt, max_tokens, read, stopped, dest_read)
    assert simulated == pytest.approx(DIST.expected_remaining(read) - (dest_read - read))
    assert remaining == pytest.approx(simulated, abs=1e-6)


# ---- 2: a PREFILL instance named twice (the Splitwise borrow) decodes the request itself ----------------------------
class SamePrefill(LeastOutstandingRouter):
    """The pairing routers' Splitwise borrow, alone: the PREFILL instance prefills and decodes."""

    name = "same_prefill"

    def route(self, request: Any, view: Any) -> Any:
        return RouteDecision("prefill-0", "prefill-0")


def test_a_prefill_instance_named_twice_decodes_the_whole_response_in_the_simulator_as_live() -> None:
    """``RouteDecision(p, p)`` with ``p`` a PREFILL instance: live, one engine request on ``p``, start to end
    (``_hands_off``). The simulator handed the prompt's KV off to ``p`` itself (one KV transfer, counted on its way
    there), and the PREFILL engine, which forces a handoff on every request it is given, admitted the landed decode
    leg with one token to make: the response "finished" one decode step after its first token (40 tokens asked)."""
    cfg = cluster_config("twoclocks", mixed=0, prefill=1, decode=1)
    prompt, output = 64, 40
    w = Workload(
        arrival_s=np.array([0.0]), prompt_tokens=np.array([prompt]), output_tokens=np.array([output])
    )
    res = Simulator(cfg, router=SamePrefill()).run(w)
    assert res.instance_ids[res.instance[0]] == "prefill-0"
    assert res.decode_instance[0] == -1 and res.kv_transfers == 0
    # Its decode takes what the same request's takes colocated on a MIXED instance of the same GPU (h100).
    mixed = cluster_config("twoclocks", mixed=1)
    mixed = mixed.model_copy(update={"pools": [mixed.pools[0].model_copy(update={"gpu": cfg.pools[0].gpu})]})
    alone = Simulator(mixed).run(w)
    assert res.finish_s[0] - res.first_token_s[0] == pytest.approx(alone.finish_s[0] - alone.first_token_s[0])

    async def live() -> tuple[list[str], list[str], int, list[int]]:
        P, D = FakeInstance("prefill-0", InstanceRole.PREFILL), FakeInstance("decode-0", InstanceRole.DECODE)
        ing = _ingress([P, D], router=SamePrefill())
        rec = RequestRecord("a", tuple(range(1, prompt + 1)), SamplingParams(max_tokens=output), 0, None)
        ing._route(rec)
        incoming = ing.view().by_id("prefill-0").num_incoming
        req = GenerateRequest(
            "b", prompt_token_ids=list(range(1, prompt + 1)), sampling=SamplingParams(max_tokens=output)
        )
        out: list[Any] = []
        await _consume(ing, req, out)
        return (
            P.calls,
            D.calls,
            incoming,
            [i for c in out for i in range(c.index, c.index + len(c.token_ids))],
        )

    p_calls, d_calls, incoming, indices = asyncio.run(live())
    assert p_calls.count("submit") == 1 and not d_calls and incoming == 0
    assert indices == list(range(output))


# ---- 3: a P->D request whose KV just landed on its decoder ----------------------------------------------------------
def _landing(s: InstanceSnapshot) -> tuple[int, int, int, int | None]:
    return s.num_waiting, s.num_incoming, s.prefill_tokens_pending, s.prefill_compute_tokens


class _Decoder(FakeInstance):
    """A decode instance that records what the ingress's view shows of it when a decode leg is submitted to it."""

    def __init__(self, iid: str, role: InstanceRole) -> None:
        super().__init__(iid, role)
        self.ingress: Any = None
        self.seen: list[tuple[int, int, int, int | None]] = []

    async def _submit(self, req: Any, kv: Any = None, **kw: Any) -> Any:
        self.seen.append(_landing(self.ingress.view().by_id(self.iid)))
        return await super()._submit(req, kv, **kw)


def _landed_both_ways(cfg: Any, prompt: int) -> tuple[list[Any], list[Any]]:
    """What the decoder's entry in the view reads right after a P->D request's KV landed there: in the simulator,
    and live (the view starting from the simulator's idle snapshots)."""
    w = Workload(arrival_s=np.array([0.0]), prompt_tokens=np.array([prompt]), output_tokens=np.array([8]))
    sim = Simulator(cfg)
    landed = sim._on_kv_arrive
    simulated: list[Any] = []

    def on_kv_arrive(inst: Any, i: int, now: float) -> None:
        landed(inst, i, now)
        simulated.append(_landing(sim._view_at(now).by_id("decode-0")))  # what a request routed now would see

    sim._on_kv_arrive = on_kv_arrive  # type: ignore[method-assign]
    sim.run(w)

    async def live() -> list[Any]:
        P, D = FakeInstance("prefill-0", InstanceRole.PREFILL), _Decoder("decode-0", InstanceRole.DECODE)
        ing = _ingress([P, D])
        ing._view = ClusterView(0.0, tuple(x.fresh_snapshot(0.0, detail=False) for x in build_instances(cfg)))
        ing._snapshots = {s.instance_id: s for s in ing._view.instances}
        D.ingress = ing
        ids = list(range(1, prompt + 1))
        await _consume(
            ing, GenerateRequest("a", prompt_token_ids=ids, sampling=SamplingParams(max_tokens=8)), []
        )
        return D.seen

    return simulated, asyncio.run(live())


def test_a_landed_pd_request_is_queued_on_its_decoder_with_its_context_in_both_clocks() -> None:
    """When a P->D request's KV lands, its decoder queues its whole context (prompt + token 0), as an engine counts a
    waiting request (``prefill_tokens_pending``; vLLM alike). The simulator's view had it twice until the decoder's
    step ended: queued in the engine and still on its way (2 waiting, 1 incoming: the step's snapshot was taken before
    the incoming count dropped); the live view had it waiting with none of its tokens until the next refresh."""
    cfg = cluster_config("twoclocks", mixed=0, prefill=1, decode=1)
    prompt = 1000
    simulated, live = _landed_both_ways(cfg, prompt)
    assert simulated == [
        (1, 0, prompt + 1, None)
    ]  # (waiting, incoming, pending, to compute: no prefix caching)
    assert live == simulated


def test_a_landed_pd_request_has_one_token_to_compute_on_a_caching_decoder_in_both_clocks() -> None:
    """With prefix caching on (the reporters then count prompt tokens to compute), a landed request's KV is loaded,
    not computed: one token to compute, as vLLM counts it (test below). Both clocks counted its whole context."""
    cfg = cluster_config("twoclocks", mixed=0, prefill=1, decode=1)
    cfg = cfg.model_copy(
        update={
            "pools": [
                p.model_copy(update={"engine": p.engine.model_copy(update={"enable_prefix_caching": True})})
                for p in cfg.pools
            ]
        }
    )
    prompt = 1000
    simulated, live = _landed_both_ways(cfg, prompt)
    assert simulated == [(1, 0, prompt + 1, 1)]
    assert live == simulated


# ---- 4: lookahead on a live snapshot, which always lists its requests --------------------------------------------------
def test_lookahead_prices_a_live_snapshot_as_the_simulators_when_it_asked_for_no_detail() -> None:
    """Lookahead (``detail=False``, as shipped and benchmarked) prices residents' overlap with a newcomer from the
    average remaining length: the simulator builds no per-request detail for it. A live snapshot lists its requests
    whatever the router asked (``snapshot_from_stats``), and lookahead read them when present: on the same engine
    state it picked the other instance live (three residents about to finish beside a long one)."""
    cfg = cluster_config("twoclocks", mixed=2)
    a, b = build_instances(cfg)
    for k, guess in enumerate([2, 2, 2, 2000]):
        a.engine.add_request(f"a{k}", 300, 3000, predicted_remaining=guess)
    for k, guess in enumerate([400, 400]):
        b.engine.add_request(f"b{k}", 600, 3000, predicted_remaining=guess)
    for e in (a.engine, b.engine):
        for _ in range(3):
            e.step()
    picks = []
    for detail in (False, True):  # the simulator's snapshots, then the live ones (the same engines)
        view = ClusterView(0.0, (a.fresh_snapshot(0.0, detail=detail), b.fresh_snapshot(0.0, detail=detail)))
        assert bool(view.instances[0].requests) is detail
        router = make_router("lookahead")
        router.initialize(cfg)
        assert not router.needs_request_detail
        req = RequestInfo("n", 0.0, 200, 4000, predicted_output_tokens=200.0)
        picks.append(router.route(req, view).prefill_instance)
    assert picks[1] == picks[0]


# ---- 5: "0 predicted tokens left": no guesses, or every guess spent ---------------------------------------------------
def _two_batches(a_guesses: list[float | None], b_guesses: list[float | None]) -> tuple[Any, ClusterView]:
    """Two MIXED instances decoding requests with these length guesses (``None``: none; 2: spent by now), as the
    simulator snapshots them for a router that asks for no detail, and as a live instance does (``snapshot_from_stats``
    over its engine's stats)."""
    cfg = cluster_config("twoclocks", mixed=2)
    insts = build_instances(cfg)
    for x, guesses in zip(insts, (a_guesses, b_guesses), strict=True):
        for k, g in enumerate(guesses):
            x.engine.add_request(f"{x.instance_id}/{k}", 300, 3000, predicted_remaining=g)
        for _ in range(3):
            x.engine.step()
    view = ClusterView(0.0, tuple(x.fresh_snapshot(0.0, detail=False) for x in insts))
    for x, s in zip(insts, view.instances, strict=True):
        d = x.engine.snapshot(x.instance_id, 0.0, detail=True)
        stats = EngineStats(
            d.num_running,
            d.num_waiting,
            d.kv_blocks_used,
            d.kv_blocks_total,
            d.block_size,
            requests=d.requests,
        )
        info = InstanceInfo(x.instance_id, "mixed", InstanceRole.MIXED, "a100", 1, "m", "simulated", "i")
        live = snapshot_from_stats(stats, info, 0.0)
        assert (live.num_predicted, live.predicted_remaining_tokens) == (
            s.num_predicted,
            s.predicted_remaining_tokens,
        )
    return cfg, view


@pytest.mark.parametrize("router", ["mixing", "lookahead"])
@pytest.mark.parametrize(
    ("a_guesses", "b_guesses", "lighter"),
    [
        ([None] * 4 + [8.0], [None] * 2, "mixed-1"),  # 4 unguessed + 5 tokens left, against 2 unguessed
        ([2.0] * 4, [2.0, 2.0, 2.0, 60.0], "mixed-0"),  # every guess spent, against 57 tokens left
    ],
)
def test_routers_tell_a_spent_guess_from_no_guess(
    router: str, a_guesses: list[float | None], b_guesses: list[float | None], lighter: str
) -> None:
    """Snapshots summed the decode batch's guesses (a request without one adds 0, a spent point guess 0 too), and
    the routers read ``n * default_output_tokens`` when the sum was 0, else the sum: a batch of unguessed requests
    beside one guess with 5 tokens left read 5 tokens (5 requests) against 512 for 2 unguessed ones, and a batch of
    spent guesses read 4 x 256 against 57 for one with a guess left -- each time the heavier one drew the newcomer.
    Now a snapshot counts the guessed requests (``num_predicted``) and the rest are priced at the default."""
    cfg, view = _two_batches(a_guesses, b_guesses)
    r = make_router(router)
    r.initialize(cfg)
    req = RequestInfo("n", 0.0, 200, 4000, predicted_output_tokens=300.0)
    assert r.route(req, view).prefill_instance == lighter


# ---- 6: a burst of prompts sharing a cached prefix, between two refreshes of the live view -----------------------------
@pytest.mark.parametrize("router", ["lookahead", "prefix_affinity"])
def test_a_burst_on_a_cached_prefix_is_routed_live_as_in_the_simulator(router: str) -> None:
    """Three 4096-token prompts sharing 7 of their 8 blocks with a conversation's first turn, which left them in
    mixed-0's prefix cache. The simulator's view queues each routed prompt at what the engine will compute (its
    cached prefix spared); the live view added each one whole to the prompt tokens to compute, so mixed-0 looked
    busy after one of them: lookahead sent the second to mixed-1 (simulated: all three to mixed-0)."""
    cfg = cluster_config("twoclocks", mixed=2, router=router)
    cfg = cfg.model_copy(
        update={
            "pools": [
                p.model_copy(update={"engine": p.engine.model_copy(update={"enable_prefix_caching": True})})
                for p in cfg.pools
            ]
        }
    )
    prompt, n = 4096, 3
    first = tuple(range(1, 9))
    burst = [(*range(1, 8), 100 + k) for k in range(n)]

    def workload(ids: list[tuple[int, ...]], at: list[float]) -> Workload:
        k = len(ids)
        return Workload(
            arrival_s=np.array(at),
            prompt_tokens=np.full(k, prompt),
            hash_ids=ids,
            output_tokens=np.array([4] + [20] * (k - 1)),
        )

    res = Simulator(cfg).run(workload([first, *burst], [0.0] + [5.0] * n))
    simulated = [res.instance_ids[k] for k in res.instance[1:]]
    warm = Simulator(cfg)  # the same cluster after the first turn alone (it ends long before 5 s)
    warm.run(workload([first], [0.0]))

    async def live() -> list[str]:
        ing = _ingress([FakeInstance("mixed-0"), FakeInstance("mixed-1")], router=make_router(router))
        ing.router.initialize(cfg)
        ing._view = ClusterView(5.0, tuple(x.fresh_snapshot(5.0, detail=False) for x in warm.instances))
        ing._snapshots = {s.instance_id: s for s in ing._view.instances}  # as a refresh leaves them
        ids = tuple(range(1, prompt + 1))
        recs = [
            RequestRecord(f"r{k}", ids, SamplingParams(max_tokens=20), 0, None, hash_ids=h)
            for k, h in enumerate(burst)
        ]
        return [ing._route(r).prefill_instance for r in recs]

    assert asyncio.run(live()) == simulated


# ---- 7: a request queued with its KV (a landed P->D decode, a migration) -------------------------------------------------
def test_a_request_queued_with_its_kv_counts_what_it_computes_as_vllm_does() -> None:
    """A P->D decode leg whose prompt KV landed waits for admission holding it: vLLM's stats count its whole context
    pending (nothing computed yet) but one token to compute (``_add_compute_left``: the KV it brings is loaded). The
    engine model counted its whole context to compute too, so a MIXED decoder of the P/D tier (prefix caching on)
    read a 1000-token prefill queued until the next step: lookahead priced prefills behind it."""
    from types import SimpleNamespace

    from scheduler.config.models import EngineSpec
    from scheduler.engine_model import EngineModel
    from scheduler.latency import roofline_model
    from scheduler.transfer.vllm_connector import _add_compute_left
    from tests.test_engine_model import GPU, MODEL

    prompt = 1000
    r = SimpleNamespace(num_computed_tokens=0, num_tokens=prompt + 1, block_hashes=())
    sched = SimpleNamespace(kv_cache_manager=SimpleNamespace(prefix_cache_lookup_enabled=lambda r: False))
    conn = SimpleNamespace(
        _loadable_end=lambda r: prompt
    )  # the landed KV (``LlmschedConnector._loadable_end``)
    vllm = _add_compute_left(0, sched, conn, r)
    assert vllm == 1

    eng = EngineModel(roofline_model(MODEL, GPU, 1), EngineSpec(block_size=16, enable_prefix_caching=True))
    eng.add_request("landed", prompt + 1, 8, cached_tokens=prompt)
    snap = eng.snapshot("d", 0.0)
    assert (
        snap.prefill_tokens_pending == prompt + 1
    )  # vLLM: num_tokens - num_computed_tokens (0 while waiting)
    assert snap.prefill_compute_tokens == vllm


# ---- 8: the route a request's latency metrics are filed under -------------------------------------------------------
def test_a_request_run_on_one_instance_is_filed_as_colocated() -> None:
    """TTFT, TPOT and E2E histograms are labelled with the dispatch path (``on_route``). The ingress filed every
    decision naming a decode instance as "disaggregated": the Splitwise borrow (one instance twice) and a one-token
    request on a P/D pair, both run on one instance without a KV transfer (``_hands_off``), as the simulator runs
    them too (``decode_instance`` -1)."""

    async def routes() -> list[str]:
        P, D = FakeInstance("prefill-0", InstanceRole.PREFILL), FakeInstance("decode-0", InstanceRole.DECODE)
        filed: list[str] = []
        out = []
        for router, n in ((SamePrefill(), 8), (None, 1), (None, 8)):
            ing = _ingress([P, D], **({"router": router} if router is not None else {}))
            ing.recorder.on_route = lambda rid, *, route, instance_id="": filed.append(route)  # type: ignore[method-assign]
            req = GenerateRequest(
                f"r{len(out)}", prompt_token_ids=[1, 2, 3], sampling=SamplingParams(max_tokens=n)
            )
            await _consume(ing, req, out)
        return filed

    assert asyncio.run(routes()) == ["colocated", "colocated", "disaggregated"]
