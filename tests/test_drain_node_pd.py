"""Admin DrainNode under a P/D split, on a real multi-node local Ray cluster (simulated backend).

One l40 node (2 fake GPUs) runs the PREFILL instance (TP=2: a placement group of 2 bundles on one node); three
a100 nodes (1 fake GPU each) run the 2 DECODE instances, one spare. Prompts are long and the engines slowed
down so that a burst keeps the prefill instance busy for seconds: P->D handoffs are in flight (prefilled or
queued there, their decoder chosen at arrival) while a node drains. The tests run in order and use the nodes up.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

ray = pytest.importorskip("ray")

from scheduler.config.models import ClusterConfig
from scheduler.control.api import GenerateRequest, Unavailable
from scheduler.control.cluster import NodeSpec
from scheduler.control.placement import gpu_type_resource
from scheduler.core.types import Phase
from scheduler.engine.base import SamplingParams, TokenChunk
from scheduler.engine.simulated_backend import sim_token
from tests.test_drain_node import MODEL, _head, _nodes, drain_cluster

pytestmark = [pytest.mark.timeout(300)]

GPUS = {
    # A slow prefill GPU: a burst of long prompts queues seconds of prefill on it.
    "l40": {"name": "l40", "memory_gib": 80, "fp16_tflops": 60, "hbm_gbps": 864},
    "a100": {"name": "a100", "memory_gib": 80, "fp16_tflops": 312, "hbm_gbps": 2039},
}
CONFIG = ClusterConfig.model_validate({
    "name": "dnpd", "gpus": GPUS, "model": MODEL,
    "pools": [{"name": "prefill", "role": "prefill", "gpu": "l40", "tp": 2, "count": 1},
              {"name": "decode", "role": "decode", "gpu": "a100", "tp": 1, "count": 2}],
})
PROMPT = 3500  # tokens: a burst of these queues seconds of prefill
N = 8  # output tokens per request


@pytest.fixture(scope="module")
def cluster(aloop: Any) -> Any:
    yield from drain_cluster(aloop, [NodeSpec("l40", 2)] + [NodeSpec("a100", 1)] * 3, CONFIG, 0.5)


async def _collect(ing: Any, rid: str, prompt: int = PROMPT, n: int = N) -> list[TokenChunk]:
    req = GenerateRequest(rid, prompt_token_ids=tuple(range(1, prompt + 1)), sampling=SamplingParams(max_tokens=n))
    return [c async for c in ing.generate(req)]


def _check_exact(chunks: list[TokenChunk], rid: str, n: int = N) -> None:
    assert [c.index + k for c in chunks for k in range(len(c.token_ids))] == list(range(n)), rid
    assert [t for c in chunks for t in c.token_ids] == [sim_token(0, rid, i, MODEL["vocab_size"]) for i in range(n)]
    assert chunks[-1].finished and chunks[-1].finish_reason == "length", rid


def _wait_members(dep: Any, pred: Any, what: str, timeout_s: float = 60) -> dict[str, str]:
    deadline = time.monotonic() + timeout_s
    while not pred(now := _nodes(dep)):
        assert time.monotonic() < deadline, (what, now)
        time.sleep(0.2)
    return now


def test_drain_decode_node_repairs_handoffs_in_flight(cluster: Any, aloop: Any) -> None:
    """Requests prefilling (or queued) on the PREFILL instance, paired at arrival with the DECODE instance whose
    node drains, decode on the other one: none is re-prefilled (before, the drain waited ~3 s for them to land,
    released the instance under the rest, and each of those ran its prefill again elsewhere), and the drain does
    not wait for them."""
    _, dep, ing = cluster
    before = _nodes(dep)
    assert sorted(before) == ["decode-0", "decode-1", "prefill-0"] and len(set(before.values())) == 3
    node = before["decode-0"]
    recoveries = ing.counters["recoveries"]

    async def run() -> Any:
        rids = [f"pd-{i}" for i in range(16)]
        tasks = []
        for r in rids:
            tasks.append(asyncio.create_task(_collect(ing, r)))
            await asyncio.sleep(0)  # routed one by one: the router alternates the decoders
        deadline = time.monotonic() + 30
        while sum(d == "decode-0" for d in ing._expected.values()) < 6:
            assert time.monotonic() < deadline, ing._expected
            await asyncio.sleep(0.01)
        headed = sum(d == "decode-0" for d in ing._expected.values())
        t0 = time.monotonic()
        res = await ing.drain_node(node, deadline_s=60)
        return rids, res, headed, time.monotonic() - t0, await asyncio.gather(*tasks)

    rids, res, headed, took, outs = aloop.run(run(), timeout=120)
    assert res.node_id == node and res.drained == ("decode-0",) and res.kept == {}, res
    for rid, out in zip(rids, outs, strict=True):
        _check_exact(out, rid)
    # Every request headed to decode-0 when the drain began decoded elsewhere, its prompt prefilled once.
    assert ing.counters["recoveries"] == recoveries, (ing.counters, headed, took)
    # Nor did the drain wait for those still prefilling (it waited 50 rounds of >= 0.05 s for them: 3.0-5.2 s here).
    assert took < 2.5, took
    now = _wait_members(dep, lambda n: len(n) == 3 and "decode-0" not in n, "decode-0 replaced")
    assert node not in now.values() and now["decode-1"] == before["decode-1"], now


def test_drain_node_through_one_ingress_repairs_another_ingresss_handoffs(cluster: Any, aloop: Any) -> None:
    """Two ingress replicas: ingress A runs a DrainNode of a decoder while requests on ingress B, paired with that
    decoder at arrival, are queued on the PREFILL instance. Their handoffs, made while A's drain is still moving
    requests off (held before its release here, as a drain with requests to move is), go to the other decoder:
    B reads the admin drain from the instance's snapshot (``leaving``, set by the Controller). Before, only the
    ingress running the drain knew (``_admin_drains``): B handed them all to the leaving decoder, whose release
    then ended them there and B re-prefilled them."""
    rt, dep, ing = cluster
    spare = rt.cluster.add_node(num_cpus=1, num_gpus=1, resources={gpu_type_resource("a100"): 1.0})
    decoders = sorted(i for i in _nodes(dep) if i.startswith("decode-"))
    assert len(decoders) == 2, decoders
    going, stay = decoders
    node = _nodes(dep)[going]
    other = dep.make_ingress()
    aloop.run(other.start(), timeout=30)
    gate = asyncio.Event()
    admin = ing._admin

    async def held(method: str, *args: Any, **kwargs: Any) -> Any:
        if method == "release":  # A's drain holds here until B's requests have all been handed off
            await gate.wait()
        return await admin(method, *args, **kwargs)

    async def run() -> Any:
        ahead = [asyncio.create_task(_collect(ing, f"xa-{i}")) for i in range(6)]  # queued first on the prefill
        rids = [f"xb-{i}" for i in range(8)]
        tasks = []
        for r in rids:
            tasks.append(asyncio.create_task(_collect(other, r)))
            await asyncio.sleep(0)
        deadline = time.monotonic() + 30
        while sum(d == going for d in other._expected.values()) < 3:
            assert time.monotonic() < deadline, other._expected
            await asyncio.sleep(0.01)
        ing._admin = held
        drain = asyncio.create_task(ing.drain_node(node, deadline_s=60))
        before: set[str] | None = None  # B's requests on the decoder when B's view first showed it draining
        paired: set[str] = set()  # ... and those paired with it then, still to be prefilled
        late: set[str] = set()  # handed to it after that
        while not all(t.done() for t in tasks):
            on = {r.request_id for r in other.registry.on_instance(going)}
            if before is not None:
                late |= on - before
            elif any(s.instance_id == going and s.draining for s in other._view.instances):
                before = on
                paired = {r for r, d in other._expected.items() if d == going
                          and (rec := other.registry.get(r)) is not None and rec.phase in (Phase.QUEUED, Phase.PREFILL)}
            await asyncio.sleep(0.005)
        gate.set()
        return rids, paired, late, await drain, await asyncio.gather(*tasks), await asyncio.gather(*ahead)

    recoveries = other.counters["recoveries"]
    try:
        rids, paired, late, res, outs, _ = aloop.run(run(), timeout=120)
    finally:
        gate.set()
        ing.__dict__.pop("_admin", None)
        aloop.run(other.close(), timeout=30)
    assert res.drained == (going,) and res.kept == {}, res
    for rid, out in zip(rids, outs, strict=True):
        _check_exact(out, rid)
    # B's requests paired with the draining decoder and still to be prefilled then were handed to the other one,
    # and none was re-prefilled.
    assert paired, "no request of B was still headed to the decoder when the drain began"
    assert late == set(), (paired, late)
    assert other.counters["recoveries"] == recoveries, other.counters
    now = _wait_members(dep, lambda n: len(n) == 3 and going not in n, f"{going} replaced")
    assert now[stay] != spare.node_id and spare.node_id in now.values(), now


LONG = 300  # output tokens of the streams below: mid-stream when the drain starts


def test_drain_node_through_one_ingress_moves_another_ingresss_streams(cluster: Any, aloop: Any) -> None:
    """Two ingress replicas: streams of ingress B decode on a decoder whose node is drained through ingress A. A
    has the Controller plan a move of each (``drain_moves``), B runs them (to the decoder in service) and A waits
    for them before the release: every stream exact, none re-prefilled, the moves counted in ``requests_moved``.
    Before, A moved only the requests it served itself (none here) and released the decoder under B's streams,
    which B then recovered by re-prefilling each on the other decoder."""
    rt, dep, ing = cluster
    rt.cluster.add_node(num_cpus=1, num_gpus=1, resources={gpu_type_resource("a100"): 1.0})  # for the replacement
    nodes = _nodes(dep)
    decoders = sorted(i for i in nodes if i.startswith("decode-"))
    assert len(decoders) == 2, decoders
    other = dep.make_ingress()
    aloop.run(other.start(), timeout=30)
    recoveries, migrations = other.counters["recoveries"], other.counters["migrations"]

    def decoding(d: str) -> set[str]:  # B's streams decoding on ``d``, a few tokens out
        return {r.request_id for r in other.registry.on_instance(d)
                if r.phase is Phase.DECODE and r.instances == (d,) and r.next_index >= 4}

    async def run() -> Any:
        rids = [f"xm-{i}" for i in range(6)]
        tasks = [asyncio.create_task(_collect(other, r, prompt=64, n=LONG)) for r in rids]
        deadline = time.monotonic() + 30
        while max(len(decoding(d)) for d in decoders) < 2:
            assert time.monotonic() < deadline, [(r.request_id, r.phase, r.instances) for r in other.registry]
            await asyncio.sleep(0.01)
        going = max(decoders, key=lambda d: len(decoding(d)))
        on = decoding(going)
        res = await ing.drain_node(nodes[going], deadline_s=60)
        return rids, going, on, res, await asyncio.gather(*tasks)

    try:
        rids, going, on, res, outs = aloop.run(run(), timeout=120)
    finally:
        aloop.run(other.close(), timeout=30)
    assert res.drained == (going,) and res.kept == {}, res
    for rid, out in zip(rids, outs, strict=True):
        _check_exact(out, rid, LONG)
    # B's streams on the decoder moved (live, by B), none was re-prefilled, and the drain counted B's moves.
    assert other.counters["recoveries"] == recoveries, (on, res, other.counters)
    assert other.counters["migrations"] - migrations == res.requests_moved >= len(on) >= 2, (on, res, other.counters)
    now = _wait_members(dep, lambda n: len(n) == 3 and going not in n, f"{going} replaced")
    assert nodes[going] not in now.values(), now  # replaced on another node


def test_drain_node_of_the_last_prefill_replaces_it_first(cluster: Any, aloop: Any) -> None:
    """The node of the only PREFILL instance (TP=2) drains with prompts queued there: its replacement starts on
    another node first, then the queued prompts go there and it is released -- the pool keeps one instance (before,
    it was "kept": it served on until the node died, taking what it held with it)."""
    rt, dep, ing = cluster
    spare = rt.cluster.add_node(num_cpus=1, num_gpus=2, resources={gpu_type_resource("l40"): 2.0})
    deadline = time.monotonic() + 30  # (not wait_for_nodes: the node drained above has gone, as Ray ends it idle)
    while not any(n["NodeID"] == spare.node_id and n["Alive"] for n in ray.nodes()):
        assert time.monotonic() < deadline, "the spare node did not join"
        time.sleep(0.1)
    before = _nodes(dep)
    node = before["prefill-0"]
    assert spare.node_id not in before.values()

    async def run() -> Any:
        rids = [f"pp-{i}" for i in range(6)]
        tasks = [asyncio.create_task(_collect(ing, r)) for r in rids]
        deadline = time.monotonic() + 30
        while len(ing.registry.on_instance("prefill-0")) < 4:  # queued / prefilling there
            assert time.monotonic() < deadline, "no prompts on prefill-0"
            await asyncio.sleep(0.01)
        res = await ing.drain_node(node, deadline_s=60)
        return rids, res, await asyncio.gather(*tasks)

    rids, res, outs = aloop.run(run(), timeout=120)
    assert res.drained == ("prefill-0",) and res.kept == {}, res
    for rid, out in zip(rids, outs, strict=True):
        _check_exact(out, rid)
    now = _nodes(dep)
    (new,) = [i for i in now if i.startswith("prefill-")]
    assert new != "prefill-0" and now[new] == spare.node_id, now  # TP=2: both bundles on the spare node
    time.sleep(1.2)  # a few reconcile rounds: the pool stays at one (the replacement was counted, not added)
    assert sorted(_nodes(dep)) == sorted(now), _nodes(dep)
    events = [e for e in ray.get(dep.controller.scaling_events.remote()) if e["action"] == "replace_ahead"]
    assert events[-1]["instances"] == ["prefill-0"] and events[-1]["failed"] == [], events


def _groups(pool: str) -> set[str]:
    """The pool's placement groups not removed: its instances' and those still waiting for room."""
    prefix = f"llmsched/{CONFIG.name}/{pool}-"
    return {g["name"].rsplit("/", 1)[1] for g in ray.util.placement_group_table().values()
            if g["name"].startswith(prefix) and g["state"] != "REMOVED"}


def test_drain_node_retried_after_its_caller_gave_up_keeps_the_pool_size(cluster: Any, aloop: Any) -> None:
    """The preStop call timed out after the Controller had replaced the last PREFILL instance ahead, and the hook
    is retried (possibly through another ingress): the retry drains the instance onto its replacement and the pool
    ends at one instance (before, the retry released it *with* replacement: two for good)."""
    rt, dep, ing = cluster
    spare = rt.cluster.add_node(num_cpus=1, num_gpus=2, resources={gpu_type_resource("l40"): 2.0})
    (old,) = [i for i in _nodes(dep) if i.startswith("prefill-")]
    node = _nodes(dep)[old]
    ray.get(dep.controller.drain_node.remote(node, 30.0), timeout=60)  # the first call: its caller went away
    (new,) = [i for i in _nodes(dep) if i.startswith("prefill-") and i != old]
    res = aloop.run(ing.drain_node(node, deadline_s=30), timeout=60)
    assert res.drained == (old,) and res.kept == {}, res
    time.sleep(1.2)  # reconcile rounds
    assert _groups("prefill") == {new}, _groups("prefill")
    assert _nodes(dep)[new] == spare.node_id


def test_drain_node_of_an_instance_draining_for_a_scale_down_completes_the_scale_down(
        cluster: Any, aloop: Any) -> None:
    """The scaling loop drains decode-2 for a scale-down; its node then drains: released by DrainNode, it leaves
    the pool as the scale-down's release would have (before: replaced, the scale-down undone)."""
    _, dep, ing = cluster
    decoders = sorted(i for i in _nodes(dep) if i.startswith("decode-"))
    assert len(decoders) == 2, decoders
    stay, going = decoders
    ray.get(dep.controller._begin_drain.remote(going), timeout=30)  # what a scale-down decision does
    res = aloop.run(ing.drain_node(_nodes(dep)[going], deadline_s=30), timeout=60)
    assert res.drained == (going,) and res.kept == {}, res
    time.sleep(1.2)
    assert _groups("decode") == {stay}, _groups("decode")


def test_drain_node_goes_on_when_its_caller_stops_waiting(cluster: Any, aloop: Any) -> None:
    """The caller of DrainNode stops waiting (the preStop hook's timeout) while the last DECODE instance's
    replacement starts: the drain goes on -- the instance is drained onto its replacement and released (before,
    cancelled with the call, it was left serving on the going node beside an idle replacement)."""
    rt, dep, ing = cluster
    spare = rt.cluster.add_node(num_cpus=1, num_gpus=1, resources={gpu_type_resource("a100"): 1.0})
    (last,) = [i for i in _nodes(dep) if i.startswith("decode-")]
    node = _nodes(dep)[last]

    async def run() -> None:
        call = asyncio.create_task(ing.drain_node(node, deadline_s=30))
        await asyncio.sleep(0.3)  # the Controller is starting the replacement
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call

    aloop.run(run(), timeout=30)
    now = _wait_members(dep, lambda n: last not in n, f"{last} released", timeout_s=60)
    (new,) = [i for i in now if i.startswith("decode-")]
    assert now[new] == spare.node_id, now
    time.sleep(1.2)
    assert _groups("decode") == {new}, _groups("decode")



async def _retried(call: Any, *args: Any, **kwargs: Any) -> Any:
    """``call`` retried while UNAVAILABLE, after the ``retry_after_s`` it names, as an operator (a preStop hook)
    retries: the new Controller may still be starting (on a loaded host, seconds; retried at once, the call met
    "The actor is restarting" -- once in three runs beside two busy CPU hogs)."""
    deadline = time.monotonic() + 60
    while True:
        try:
            return await call(*args, **kwargs)
        except Unavailable as e:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(e.retry_after_s or 0.5)


def _check_last_decoder_drained(dep: Any, res: Any, last: str, spare: str, rids: list[str],
                                outs: list[list[TokenChunk]]) -> None:
    """``res`` drained the last DECODE instance ``last``, the streams ``rids`` were exact, its replacement runs on
    node ``spare``, and each pool ends at its size (one instance: none lost, none replaced twice)."""
    assert res.drained == (last,) and res.kept == {}, res
    for rid, out in zip(rids, outs, strict=True):
        _check_exact(out, rid)
    now = _wait_members(dep, lambda n: last not in n, f"{last} released")
    (new,) = [i for i in now if i.startswith("decode-")]
    assert now[new] == spare, now
    time.sleep(1.2)  # reconcile rounds
    assert _groups("decode") == {new} and len(_groups("prefill")) == 1, (_groups("decode"), _groups("prefill"))
    # Restarted on the head too: on a worker, a drain of that node took the Controller with it mid-test (once in CI).
    assert ray.get(dep.controller.ping.remote(), timeout=10)["node"] == _head()


def test_drain_node_retried_after_a_controller_restart_drains_onto_the_replacement(cluster: Any, aloop: Any) -> None:
    """The Controller restarts (killed; ``max_restarts=-1``) while a DrainNode waits for the replacement of the
    last DECODE instance: the call fails UNAVAILABLE ("retry"); the new Controller (sizes and marks from Ray's KV)
    starts the replacement afresh, and the retried call waits for it, then drains the instance onto it -- the pool
    ends at its size, the requests in flight exact. Before, the retry answered at once and kept the instance ("the
    last instance serving decode") while its replacement was still starting: it served on the going node."""
    rt, dep, ing = cluster
    spare = rt.cluster.add_node(num_cpus=1, num_gpus=1, resources={gpu_type_resource("a100"): 1.0})
    (last,) = [i for i in _nodes(dep) if i.startswith("decode-")]
    node = _nodes(dep)[last]

    async def run() -> Any:
        rids = [f"rs-{i}" for i in range(4)]
        tasks = [asyncio.create_task(_collect(ing, r)) for r in rids]
        call = asyncio.create_task(ing.drain_node(node, deadline_s=60))
        deadline = time.monotonic() + 30
        while len(_groups("decode")) < 2:  # the replacement is being placed
            assert time.monotonic() < deadline, _groups("decode")
            await asyncio.sleep(0.01)
        await asyncio.to_thread(ray.kill, dep.controller, no_restart=False)
        with pytest.raises(Unavailable, match="the Controller is unavailable"):
            await call
        return rids, await _retried(ing.drain_node, node, deadline_s=60), await asyncio.gather(*tasks)

    rids, res, outs = aloop.run(run(), timeout=120)
    _check_last_decoder_drained(dep, res, last, spare.node_id, rids, outs)


def test_controller_restart_while_a_drain_node_moves_requests_off(cluster: Any, aloop: Any) -> None:
    """The Controller restarts while a DrainNode moves the last DECODE instance's requests off (after its
    replacement came up; held before the release here): the release, refused while the Controller is down, is
    retried until the new one answers -- it adopted the instance with the drain's marks from Ray's KV -- and the
    drain completes: the instance released, its replacement counted, the pool at its size. Before, the drain gave up
    at the first refusal and reported the instance ``kept`` ("drain failed: Unavailable"), which stayed drained
    (its un-drain refused too) on the going node beside its replacement."""
    rt, dep, ing = cluster
    spare = rt.cluster.add_node(num_cpus=1, num_gpus=1, resources={gpu_type_resource("a100"): 1.0})
    (last,) = [i for i in _nodes(dep) if i.startswith("decode-")]
    node = _nodes(dep)[last]
    gate, at = asyncio.Event(), asyncio.Event()
    admin = ing._admin

    async def held(method: str, *args: Any, **kwargs: Any) -> Any:
        if method == "release":  # the first time: the Controller dies while the drain is here
            at.set()
            await gate.wait()
        return await admin(method, *args, **kwargs)

    async def run() -> Any:
        rids = [f"rb-{i}" for i in range(4)]
        tasks = [asyncio.create_task(_collect(ing, r)) for r in rids]
        ing._admin = held
        call = asyncio.create_task(ing.drain_node(node, deadline_s=60))
        await asyncio.wait_for(at.wait(), 60)
        await asyncio.to_thread(ray.kill, dep.controller, no_restart=False)
        gate.set()
        return rids, await call, await asyncio.gather(*tasks)

    try:
        rids, res, outs = aloop.run(run(), timeout=120)
    finally:
        gate.set()
        ing.__dict__.pop("_admin", None)
    _check_last_decoder_drained(dep, res, last, spare.node_id, rids, outs)


def test_controller_plans_the_moves_of_other_ingresses_requests_off_a_drained_instance(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """``Controller.drain_moves`` (no Ray: its registry and plans alone): a drain through ingress A has a move
    planned, without a destination, for each request another live ingress holds on the instance, whatever phase its
    last report says -- handed to that ingress once, planned again when it did not commit (or could not start) or
    was not taken in time, at most ``config.drain.move_tries`` times -- and is told to wait while such a request is still
    there. A's own requests, those only headed there from a prefill elsewhere, and those of an ingress that polls
    no more are not its business. The moves count apart from the policy's."""
    from scheduler.config.models import DrainSpec
    from scheduler.control.controller import Controller
    from scheduler.control.controller_migration import PLAN_TTL_S
    from scheduler.control.registry import EntryTable, RegistryEntry

    monkeypatch.setattr(Controller, "_ensure_loop", lambda self: None)
    ctrl = Controller.__new__(Controller)
    ctrl._registry, ctrl._plans = EntryTable(), {}
    ctrl._init_drain_moves(DrainSpec(move_tries=5))
    ctrl._migration = None
    ctrl.migration_stats = {"planned": 0, "dropped": 0, "committed": 0, "failed": 0}
    ctrl._registry.apply("A", [RegistryEntry("a", "A", ("d",), 5, Phase.DECODE)], [], full=True)
    ctrl._registry.apply("B", [RegistryEntry("b1", "B", ("d",), 5, Phase.DECODE),
                               RegistryEntry("b2", "B", ("p", "d"), 0, Phase.PREFILL),  # its hand-off goes elsewhere
                               RegistryEntry("b3", "B", ("d",), 3, Phase.TRANSFER),  # landed, decoding since
                               RegistryEntry("b4", "B", ("x",), 5, Phase.DECODE)], [], full=True)
    ctrl._registry.apply("G", [RegistryEntry("g", "G", ("d",), 5, Phase.DECODE)], [], full=True,
                         now=time.monotonic() - PLAN_TTL_S)  # gone: silent since

    def moves() -> tuple[int, int]:
        waiting, moved, _ = asyncio.run(ctrl.drain_moves("d", "A"))
        return waiting, moved

    def take() -> list[str]:
        plans = asyncio.run(ctrl.take_migrations("B"))
        assert all((p.source, p.destination) == ("d", "") for p in plans), plans
        return [p.request_id for p in plans]

    assert moves() == (2, 0) and moves() == (2, 0)  # planned once each
    assert take() == ["b1", "b3"] and take() == []
    asyncio.run(ctrl.migration_done("b1", False, True, drain=True))  # aborted: planned again
    asyncio.run(ctrl.migration_done("b3", True, True, drain=True))
    assert moves() == (2, 1) and take() == ["b1"]  # b3 committed, not switched yet: still waited for
    assert ctrl.migration_stats == {"planned": 0, "dropped": 0, "committed": 0, "failed": 0}
    ctrl._registry.apply("B", [RegistryEntry("b3", "B", ("x",), 9, Phase.DECODE)], [], full=False)
    assert moves() == (1, 1)
    asyncio.run(ctrl.migration_done("b1", False, False, drain=True))  # could not start: planned again ...
    assert moves() == (1, 1) and ctrl._drain_moves["b1"].tries == 3
    ctrl._drain_moves["b1"].planned_s -= PLAN_TTL_S  # ... and B never took it: dropped, planned anew
    assert moves() == (1, 1) and take() == ["b1"] and ctrl._drain_moves["b1"].tries == 4
    ctrl._drain_moves["b1"].tries = 5  # move_tries
    asyncio.run(ctrl.migration_done("b1", False, True, drain=True))
    assert moves() == (0, 1) and take() == []  # given up: recovered at the release
    ctrl._end_drain_moves("d")
    assert ctrl._drain_moves == {} and ctrl._drain_moved == {}
