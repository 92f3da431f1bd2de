"""A draining instance refuses new requests; the ingress routes them elsewhere (a real local Ray cluster, simulated
backend: 2 PREFILL + 2 DECODE instances on one node).

Every replica's router skips a draining instance once its view has the snapshot saying so; until then (one refresh
period, longer on a loaded host) a replica can still send it a new request, or a P->D handoff's KV. Before, the
instance took it: the request ran on an instance about to be released (re-prefilled elsewhere at the release) and a
handoff decoded on the leaving decoder. Here the replica with the stale view is an ingress that never refreshes its
view after it started (``refresh_s`` an hour), and the drain is the Controller's (Admin DrainInstance's first step).
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

ray = pytest.importorskip("ray")

from scheduler.config.models import ClusterConfig
from scheduler.control.api import GenerateRequest, Unavailable
from scheduler.control.cluster import NodeSpec
from scheduler.engine.base import EngineRequest, SamplingParams, TokenChunk
from scripts.time_drain_refusal import LONG_PROMPT, PinnedRouter, switch_and_wait
from tests.test_drain_node import MODEL, drain_cluster
from tests.test_drain_node_pd import _check_exact

pytestmark = [pytest.mark.timeout(300)]

GPUS = {"a100": {"name": "a100", "memory_gib": 80, "fp16_tflops": 312, "hbm_gbps": 2039}}
CONFIG = ClusterConfig.model_validate({
    "name": "drf", "gpus": GPUS, "model": MODEL,
    "pools": [{"name": "prefill", "role": "prefill", "gpu": "a100", "tp": 1, "count": 2},
              {"name": "decode", "role": "decode", "gpu": "a100", "tp": 1, "count": 2}],
})
PROMPT = 512
N = 8


@pytest.fixture(scope="module")
def cluster(aloop: Any) -> Any:
    for _, dep, _ in drain_cluster(aloop, [NodeSpec("a100", 4, 2)], CONFIG, 0.5):
        yield dep


def _stale(dep: Any, aloop: Any, **kw: Any) -> Any:
    """An ingress whose view is the one it took at its start (all four in service), for good; a refusal is neither a
    recovery (``max_recoveries`` 0) nor a failure (quarantined at the first)."""
    ing = dep.make_ingress(**{"refresh_s": 3600.0, "max_recoveries": 0, "quarantine_after": 1, **kw})
    aloop.run(ing.start(), timeout=30)
    assert sorted(s.instance_id for s in ing.view().instances if not s.draining) == [
        "decode-0", "decode-1", "prefill-0", "prefill-1"]
    return ing


def _handles(dep: Any) -> dict[str, Any]:
    return {i: m.handle for i, m in ray.get(dep.controller.members.remote()).items()}


def _stats(dep: Any) -> dict[str, Any]:
    return {i: ray.get(h.stats.remote()) for i, h in _handles(dep).items()}


async def _collect(ing: Any, rid: str, prompt: int = PROMPT) -> list[TokenChunk]:
    req = GenerateRequest(rid, prompt_token_ids=tuple(range(1, prompt + 1)), sampling=SamplingParams(max_tokens=N))
    return [c async for c in ing.generate(req)]


def _through_stale_view(dep: Any, aloop: Any, drained: str, rid: str) -> tuple[list[TokenChunk], Any, dict, dict]:
    """``rid`` through a stale replica while ``drained`` is out of service (an admin drain through the Controller,
    undone after): its chunks, the replica, and every instance's engine stats before and after."""
    stale = _stale(dep, aloop)
    before = _stats(dep)
    assert ray.get(dep.controller.set_draining.remote(drained, True))
    try:
        out = aloop.run(_collect(stale, rid), timeout=60)
    finally:
        ray.get(dep.controller.set_draining.remote(drained, False))
        aloop.run(stale.close())
    _check_exact(out, rid)
    return out, stale, before, _stats(dep)


def _check_kv_went_to_decode_1(out: list[TokenChunk], stale: Any, before: dict, after: dict, refused: str) -> None:
    """Prefilled once on prefill-0, its KV refused by decode-0 (counted in ``refused``) and loaded on decode-1, not
    recomputed; nothing ran on decode-0."""
    assert (out[0].instance_id, out[-1].instance_id) == ("prefill-0", "decode-1"), [(c.index, c.instance_id)
                                                                                   for c in out]
    counters = stale.counters
    assert (counters[refused], counters["handoffs"], counters["recoveries"], counters["kv_refused"]) == (
        1, 1, 0, 0), counters
    computed = {i: after[i].prompt_tokens_computed - before[i].prompt_tokens_computed for i in after}
    loaded = {i: after[i].prompt_tokens_loaded - before[i].prompt_tokens_loaded for i in after}
    assert computed["prefill-0"] == PROMPT and computed["prefill-1"] == 0, computed  # prefilled once
    assert loaded["decode-1"] == PROMPT and computed["decode-1"] <= 1, (computed, loaded)  # its KV, not recomputed
    assert loaded["decode-0"] == computed["decode-0"] == 0, (computed, loaded)


def test_a_request_routed_to_an_instance_drained_since_runs_elsewhere(cluster: Any, aloop: Any) -> None:
    """prefill-0 goes out of service (an admin drain) after the replica's view was taken: the replica's router
    still picks it (least outstanding, first of the idle ones). It refuses the request; the replica routes it to
    prefill-1, unharmed: the right tokens, no recovery, not counted against it. Before, it ran on prefill-0."""
    out, stale, before, after = _through_stale_view(cluster, aloop, "prefill-0", "r1")
    # Paired anew: decode-0 is idle (the refused route's booking of it is dropped, not counted against it).
    assert (out[0].instance_id, out[-1].instance_id) == ("prefill-1", "decode-0"), [(c.index, c.instance_id)
                                                                                   for c in out]
    assert (stale.counters["drain_refused"], stale.counters["recoveries"], stale.counters["quarantined"]) == (1, 0, 0)
    assert after["prefill-0"].prompt_tokens_computed == before["prefill-0"].prompt_tokens_computed  # nothing ran


def test_a_handoff_to_a_decoder_drained_since_lands_on_another_with_its_kv(cluster: Any, aloop: Any) -> None:
    """decode-0 goes out of service (an admin drain) after the replica's view was taken: the request is paired with
    it at arrival, and at its handoff the view still shows it in service, so the prompt KV's submit goes there. It
    refuses it; the same KV goes to decode-1: the prompt is prefilled once (on prefill-0) and loaded on decode-1, not
    recomputed. Before, it decoded on decode-0 (the drain then moved it, or released it and it was re-prefilled)."""
    out, stale, before, after = _through_stale_view(cluster, aloop, "decode-0", "r2")
    _check_kv_went_to_decode_1(out, stale, before, after, "drain_refused")


def test_a_request_no_other_instance_takes_ends_unavailable_naming_the_drain(cluster: Any, aloop: Any) -> None:
    """Both PREFILL instances drain (a scale-down's or a role switch's drain) after the replica's view was taken:
    each refuses the request in turn, and it ends UNAVAILABLE (retried by the SDK) saying why. Before, it ran on
    prefill-0."""
    dep = cluster
    stale = _stale(dep, aloop)
    handles = _handles(dep)
    ray.get([handles[i].set_draining.remote(True) for i in ("prefill-0", "prefill-1")])
    try:
        with pytest.raises(Unavailable) as err:
            aloop.run(_collect(stale, "r3"), timeout=60)
    finally:
        ray.get([handles[i].set_draining.remote(False) for i in ("prefill-0", "prefill-1")])
        aloop.run(stale.close())
    assert "prefill-0, prefill-1 refused it (draining) and no other instance takes it" in str(err.value), err.value
    assert (stale.counters["drain_refused"], stale.counters["recoveries"]) == (2, 0)


def test_a_decoder_that_refused_a_handoff_as_leaving_gets_no_other_handoff_paired_with_it(
        cluster: Any, aloop: Any) -> None:
    """Two requests are paired with decode-0 at arrival, before it leaves (an admin drain) in a view that does not
    show it: the first one's handoff is refused there and goes to decode-1. The second one's handoff, later (its
    3,000-token prompt prefills on prefill-1 meanwhile), goes to decode-1 at once: the refusal said decode-0 leaves,
    and the view shows it so. Before, the view showed it draining only (as a scale-down's drain, which still takes
    the KV paired with it), so that handoff was sent there too and refused again: 2 refusals, not 1."""
    dep = cluster
    pins = {"long": ("prefill-1", "decode-0"), "short": ("prefill-0", "decode-0")}
    stale = _stale(dep, aloop, router=PinnedRouter(pins))
    assert ray.get(dep.controller.set_draining.remote("decode-0", True))

    async def both() -> tuple[list[TokenChunk], list[TokenChunk]]:
        long = asyncio.create_task(_collect(stale, "long", prompt=LONG_PROMPT))
        while stale.counters["routed"] < 1:  # paired (with decode-0) before the short one's refusal
            await asyncio.sleep(0.001)
        short = await _collect(stale, "short")
        assert not long.done()
        return await long, short

    try:
        long, short = aloop.run(both(), timeout=60)
    finally:
        ray.get(dep.controller.set_draining.remote("decode-0", False))
        aloop.run(stale.close())
    for out, rid in ((long, "long"), (short, "short")):
        _check_exact(out, rid, N)
        assert out[-1].instance_id == "decode-1", (rid, [(c.index, c.instance_id) for c in out])
    counters = stale.counters
    assert (counters["drain_refused"], counters["handoffs"], counters["recoveries"]) == (1, 2, 0), counters


def _through_stale_view_after_switch(dep: Any, aloop: Any, switched: str, role: str, rid: str
                                     ) -> tuple[list[TokenChunk], Any, dict, dict]:
    """``rid`` through a stale replica (its view: every instance in its pool's role) after ``switched``'s switch to
    ``role`` finished (switched back after): its chunks, the replica, and every instance's engine stats before and
    after."""
    stale = _stale(dep, aloop)
    before = _stats(dep)
    back = ray.get(dep.controller.members.remote())[switched].info.role.value
    aloop.run(switch_and_wait(dep, switched, role), timeout=60)
    try:
        out = aloop.run(_collect(stale, rid), timeout=60)
        assert stale._role_of(switched).value == role  # its view shows the new role since the refusal
    finally:
        # Its request's end reported before it closes: the Controller's registry would hold the switch back until
        # the entry expired (30 s).
        aloop.run(stale._report())
        aloop.run(stale.close())
        after = _stats(dep)
        aloop.run(switch_and_wait(dep, switched, back), timeout=60)
    _check_exact(out, rid)
    return out, stale, before, after


def test_a_request_routed_to_an_instance_switched_to_decode_since_prefills_elsewhere(cluster: Any, aloop: Any
                                                                                    ) -> None:
    """prefill-0 became DECODE (a finished role switch) after the replica's view was taken: its router still sees it
    PREFILL and sends it the prefill-only leg (first of the idle ones). It refuses it (``view_role`` prefill, its
    role decode); the replica routes the request to prefill-1, unharmed: the right tokens, nothing run on prefill-0,
    no recovery, no quarantine count. Before, prefill-0 ran the prefill leg on the decode pool."""
    out, stale, before, after = _through_stale_view_after_switch(cluster, aloop, "prefill-0", "decode", "rr1")
    assert (out[0].instance_id, out[-1].instance_id) == ("prefill-1", "decode-0"), [(c.index, c.instance_id)
                                                                                   for c in out]
    counters = stale.counters
    assert (counters["role_refused"], counters["drain_refused"], counters["recoveries"], counters["quarantined"]
            ) == (1, 0, 0, 0), counters
    assert after["prefill-0"].prompt_tokens_computed == before["prefill-0"].prompt_tokens_computed  # nothing ran


def test_a_handoff_to_a_decoder_switched_to_prefill_since_lands_on_another_with_its_kv(cluster: Any, aloop: Any
                                                                                       ) -> None:
    """decode-0 became PREFILL (a finished role switch) after the replica's view was taken: the request is paired
    with it at arrival on that view, and the prompt KV's submit goes there for DECODE. It refuses it; the same KV
    goes to decode-1: prefilled once on prefill-0, loaded on decode-1. Before, decode-0 decoded the whole answer on
    the prefill pool."""
    out, stale, before, after = _through_stale_view_after_switch(cluster, aloop, "decode-0", "prefill", "rr2")
    _check_kv_went_to_decode_1(out, stale, before, after, "role_refused")


def test_a_handoff_to_a_decoder_being_released_goes_to_another_with_its_kv(cluster: Any, aloop: Any) -> None:
    """decode-0 drains for a scale-down and is released (the Controller's release: its ``shutdown`` hands over a
    stream nobody polls for up to 1 s, the actor killed after) while a replica whose view shows it in service pairs
    a request with it. The handoff's KV is refused there as leaving and goes to decode-1: prefilled once. Before, the
    instance took it (a scale-down's drain waits for a handoff paired with it) and ended it ``released`` at once:
    a recovery, the prompt prefilled a second time. (Last in the module: decode-0 is replaced after.)"""
    dep = cluster
    stale = _stale(dep, aloop, max_recoveries=3, quarantine_after=3)
    handles = _handles(dep)
    others = ("prefill-0", "prefill-1", "decode-1")
    before = {i: ray.get(handles[i].stats.remote()) for i in others}
    # A stream nobody polls: the release's hand-over waits for its end for SHUTDOWN_HANDOVER_S.
    ray.get(handles["decode-0"].submit.remote(
        EngineRequest("held", tuple(range(1, 65)), SamplingParams(max_tokens=10_000)), wait_first=False))
    ray.get(handles["decode-0"].set_draining.remote(True))  # a scale-down's drain (Controller._begin_drain)
    released = dep.controller.release.remote("decode-0", replace=True)

    async def run() -> list[TokenChunk]:
        await asyncio.sleep(0.2)  # the release began: decode-0 is in its shutdown
        return await _collect(stale, "r5")

    try:
        out = aloop.run(run(), timeout=60)
    finally:
        aloop.run(stale.close())
        assert ray.get(released, timeout=30)
    _check_exact(out, "r5", N)
    assert (out[0].instance_id, out[-1].instance_id) == ("prefill-0", "decode-1"), [(c.index, c.instance_id)
                                                                                   for c in out]
    counters = stale.counters
    assert (counters["drain_refused"], counters["recoveries"], counters["quarantined"]) == (1, 0, 0), counters
    after = {i: ray.get(handles[i].stats.remote()) for i in others}
    computed = {i: after[i].prompt_tokens_computed - before[i].prompt_tokens_computed for i in others}
    loaded = {i: after[i].prompt_tokens_loaded - before[i].prompt_tokens_loaded for i in others}
    assert computed == {"prefill-0": PROMPT, "prefill-1": 0, "decode-1": computed["decode-1"]}, computed
    assert loaded["decode-1"] == PROMPT and computed["decode-1"] <= 1, (computed, loaded)


# ---- the rules on the instance (no Ray: in-process instances over the simulated backend) --------------------------
@pytest.mark.usefixtures("no_ray")
def test_what_a_draining_instance_refuses_and_what_it_still_takes() -> None:
    """A new request is refused while an instance drains (``draining:``); a P->D handoff's KV paired with it is
    refused only when it leaves (an admin drain) -- a scale-down or role-switch drain waits for it; a live migration
    whose reservation was granted before the drain began still commits there (the source has stopped it already)."""
    from scheduler.engine.base import EngineRequest
    from tests.test_handoff_audit35 import _instances, _streaming
    from tests.test_migration_audit import Handle, make_ingress, set_routable, until

    prompt = tuple(range(1, 100))

    async def scenario() -> tuple[list[str | None], Any, list[Any]]:
        S_inst, D_inst = await _instances((None, None))
        try:
            # The prompt KV of a prefilled request, exported as for a handoff.
            first = await S_inst.submit(EngineRequest("h", prompt, SamplingParams(max_tokens=1)),
                                        export_on_finish=True)
            kv = await S_inst.export_kv("h")
            decode = EngineRequest("h", prompt + first.chunks[0].token_ids, SamplingParams(max_tokens=4),
                                   num_output_tokens_before=1)
            answers: list[str | None] = []
            await D_inst.set_draining(True)  # a scale-down's (or role switch's) drain
            answers.append((await D_inst.submit(EngineRequest("n", prompt, SamplingParams(max_tokens=4)))).rejected)
            await D_inst.set_draining(True, leaving=True)  # an admin drain
            answers.append((await D_inst.submit(decode, kv)).rejected)
            await D_inst.set_draining(True)
            answers.append((await D_inst.submit(decode, kv)).rejected)
            await D_inst.abort("h")
            await D_inst.set_draining(False)

            S, D = Handle(S_inst), Handle(D_inst)
            ing = make_ingress([S, D], routable=["mixed-0"])

            async def drain_then_commit(fn: Any, *a: Any, **kw: Any) -> Any:
                await D_inst.set_draining(True, leaving=True)  # after the handshake's reservation
                return await fn(*a, **kw)

            D.hooks["migrate_commit"] = drain_then_commit
            out: list[Any] = []
            t = _streaming(ing, out, max_tokens=200)
            await until(lambda: len(out) >= 2)
            set_routable(ing, ["mixed-0", "mixed-1"])
            res = await ing.migrate("r", "mixed-1")
            await asyncio.wait_for(t, 30)
            return answers, res, out
        finally:
            for i in (S_inst, D_inst):
                await i.shutdown()

    answers, res, out = asyncio.run(scenario())
    new, kv_leaving, kv_scale_down = answers
    assert new is not None and new.startswith("draining: mixed-1 is draining"), new
    assert kv_leaving is not None and kv_leaving.startswith("draining: mixed-1 is leaving"), kv_leaving
    assert kv_scale_down is None
    assert res.committed, res.reason
    assert out[-1].finish_reason == "length" and out[-1].instance_id == "mixed-1", out[-1]
    assert [c.index + k for c in out for k in range(len(c.token_ids))] == list(range(200))


@pytest.mark.usefixtures("no_ray")
def test_an_instance_that_refused_an_earlier_leg_takes_a_later_one() -> None:
    """The instances a request was refused by are left out of that leg's next picks only: mixed-0 refuses the
    request (a scale-down's drain, called off since), it runs on mixed-1, which dies; its recovery goes to
    mixed-2, which refuses it (draining); mixed-0, back in service, takes it. Before, mixed-0 was still left out
    and the request failed UNAVAILABLE ("mixed-0, mixed-2 refused it")."""
    from scheduler.control.api import GenerateRequest as Req
    from tests.test_migration_audit import Handle, consume, make_ingress, set_routable, start_instances, until

    async def scenario() -> tuple[list[TokenChunk], list[BaseException], dict[str, int]]:
        insts = await start_instances(3)
        handles = [Handle(i) for i in insts]
        ing = make_ingress(handles, routable=["mixed-0", "mixed-1"])  # least outstanding: mixed-0 first
        out: list[TokenChunk] = []
        errors: list[BaseException] = []
        req = Req("r", prompt_token_ids=tuple(range(1, 50)), sampling=SamplingParams(max_tokens=200))
        try:
            await insts[0].set_draining(True)
            task = asyncio.create_task(consume(ing, req, out, errors))
            await until(lambda: len(out) >= 2 or bool(errors))
            await insts[0].set_draining(False)
            await insts[2].set_draining(True)
            set_routable(ing, ["mixed-2", "mixed-0", "mixed-1"])  # the recovery picks mixed-2 first
            handles[1].dead = True
            await asyncio.wait_for(task, 60)
            return out, errors, dict(ing.counters)
        finally:
            for i in insts:
                await i.shutdown()

    out, errors, counters = asyncio.run(scenario())
    assert not errors, errors
    assert out[0].instance_id == "mixed-1" and out[-1].instance_id == "mixed-0", [c.instance_id for c in out]
    assert out[-1].finish_reason == "length"
    assert [c.index + k for c in out for k in range(len(c.token_ids))] == list(range(200))
    assert (counters["drain_refused"], counters["recoveries"]) == (2, 1), counters


@pytest.mark.usefixtures("no_ray")
def test_what_an_instance_switched_since_the_view_refuses_and_what_it_takes() -> None:
    """An instance whose role changed since the caller's view (``view_role``) refuses the leg, a handoff's KV too,
    saying its role now; one sent for its current role -- whatever the leg -- is taken, and so is every submit that
    names no view (tests, tools: the old callers) and an ``adopt`` retry of a stream that runs there."""
    from scheduler.control.instance import ROLE_CHANGED
    from scheduler.core.types import InstanceRole
    from tests.test_handoff_audit35 import _instances

    prompt = tuple(range(1, 100))

    def req(rid: str, n: int = 4) -> EngineRequest:
        return EngineRequest(rid, prompt, SamplingParams(max_tokens=n))

    async def scenario() -> list[Any]:
        S, D = await _instances((None, None))
        try:
            first = await S.submit(req("h", 1), export_on_finish=True)
            kv = await S.export_kv("h")
            decode = EngineRequest("h", prompt + first.chunks[0].token_ids, SamplingParams(max_tokens=4),
                                   num_output_tokens_before=1)
            await D.set_role(InstanceRole.DECODE)
            return [
                await D.submit(req("a"), view_role=InstanceRole.MIXED),  # routed on a view from before the switch
                await D.submit(decode, kv, view_role="mixed"),  # a handoff's KV, likewise
                await D.submit(req("b", 1), export_on_finish=True, view_role="decode"),  # a prefill leg, role seen
                await D.submit(req("c")),  # no view named
                await D.submit(req("b", 1), adopt=True, view_role="mixed"),  # a retry of "b", which runs there
            ]
        finally:
            for i in (S, D):
                await i.shutdown()

    stale, stale_kv, seen, unnamed, adopted = asyncio.run(scenario())
    for sub in (stale, stale_kv):
        assert sub.rejected is not None and sub.rejected.startswith(f"{ROLE_CHANGED}: mixed-1 serves as decode now")
        assert sub.role is InstanceRole.DECODE
    for sub in (seen, unnamed, adopted):
        assert sub.rejected is None, sub.rejected
