"""A P->D handoff whose decoder is lost before it takes the request hands the same prompt KV to another decoder (a
real local Ray cluster, simulated backend: 2 PREFILL + 2 DECODE instances on one node).

The decoder dies between the pairing and the handoff's submit: each replica here took its view (and membership)
before decode-0 was killed and never refreshes it (``refresh_s`` an hour), so its router still pairs requests with
decode-0 (``PinnedRouter``) and the handoff's submit meets the dead actor (``ActorDiedError``). Before, that was an
instance lost: the request was recovered by prefilling ``prompt + [t0]`` again (a recovery spent), though the KV
ref, which the ingress owns, was intact.
"""

from __future__ import annotations

import dataclasses
import types
from typing import Any

import pytest

ray = pytest.importorskip("ray")

from scheduler.control.api import GenerateRequest, RequestFailed
from scheduler.control.cluster import NodeSpec
from scheduler.engine.base import SamplingParams, TokenChunk
from scripts.time_drain_refusal import PinnedRouter
from tests.test_drain_node import drain_cluster
from tests.test_drain_node_pd import _check_exact
from tests.test_drain_refuse import CONFIG, PROMPT, N, _handles

pytestmark = [pytest.mark.timeout(300)]

RIDS = ("kv-on", "kv-gone", "kills-all")  # the stale replicas' requests


@pytest.fixture(scope="module")
def stale(aloop: Any) -> Any:
    """The deployment, and one replica per test whose view and membership show all four instances in service though
    decode-0 was killed (no restart) after they started; each pairs its request with prefill-0 and decode-0."""
    for _, dep, _ in drain_cluster(aloop, [NodeSpec("a100", 4, 2)], CONFIG, 0.5):
        replicas = {}
        for rid in RIDS:
            # quarantine_after 2: the last test's request kills both decoders it is handed to.
            # Membership stale too: the Controller drops a killed instance at once (0.06 s here) and starts its
            # replacement, and the replicas hear of it within members_s (0.5 s by default). The module passed
            # because its tests ran inside that half second; under load (CI) the last one's replica took its pick
            # of decode-0 as "not a live member" (no engine ran it: not counted for the quarantine).
            ing = dep.make_ingress(refresh_s=3600.0, members_s=3600.0, quarantine_after=2,
                                   router=PinnedRouter({rid: ("prefill-0", "decode-0")}))
            aloop.run(ing.start(), timeout=30)
            assert sorted(s.instance_id for s in ing.view().instances) == [
                "decode-0", "decode-1", "prefill-0", "prefill-1"]
            replicas[rid] = ing
        handle = ray.get(dep.controller.members.remote())["decode-0"].handle
        ray.kill(handle, no_restart=True)
        with pytest.raises(ray.exceptions.RayActorError):
            ray.get(handle.stats.remote(), timeout=30)
        try:
            yield dep, replicas
        finally:
            for ing in replicas.values():
                aloop.run(ing.close())


async def _collect(ing: Any, rid: str) -> list[TokenChunk]:
    req = GenerateRequest(rid, prompt_token_ids=tuple(range(1, PROMPT + 1)), sampling=SamplingParams(max_tokens=N))
    return [c async for c in ing.generate(req)]


def _stats(dep: Any) -> dict[str, Any]:
    """Engine stats of the instances alive (the Controller may still list a killed one)."""
    out = {}
    for iid, h in _handles(dep).items():
        try:
            out[iid] = ray.get(h.stats.remote(), timeout=30)
        except ray.exceptions.RayActorError:
            pass
    return out


def _delta(before: dict[str, Any], after: dict[str, Any]) -> tuple[dict[str, int], dict[str, int]]:
    """Prompt tokens computed and loaded per instance alive at both ends."""
    ids = sorted(set(before) & set(after))
    return ({i: after[i].prompt_tokens_computed - before[i].prompt_tokens_computed for i in ids},
            {i: after[i].prompt_tokens_loaded - before[i].prompt_tokens_loaded for i in ids})


def test_a_handoff_whose_decoder_died_goes_to_another_decoder_with_its_kv(stale: Any, aloop: Any) -> None:
    """The handoff's submit meets decode-0 dead: its KV goes to decode-1 -- the right tokens, the prompt computed once
    (on prefill-0) and loaded on decode-1, no recovery. Before: a recovery, the prompt prefilled a second time."""
    dep, replicas = stale
    ing = replicas["kv-on"]
    before = _stats(dep)
    out = aloop.run(_collect(ing, "kv-on"), timeout=60)
    computed, loaded = _delta(before, _stats(dep))
    _check_exact(out, "kv-on")
    assert (out[0].instance_id, out[-1].instance_id) == ("prefill-0", "decode-1"), [(c.index, c.instance_id)
                                                                                   for c in out]
    c = ing.counters
    assert (c["handoffs"], c["handoff_rerouted"], c["recoveries"], c["quarantined"]) == (1, 1, 0, 0), c
    assert computed["prefill-0"] == PROMPT and computed["prefill-1"] == 0, computed  # prefilled once
    assert loaded["decode-1"] == PROMPT and computed["decode-1"] <= 1, (computed, loaded)  # its KV, not recomputed
    assert "decode-0" not in ing._members  # marked dead, as before


@ray.remote
def _kv_gone() -> None:
    raise KeyError("kv: evicted")  # what the simulated backend's export raises for KV it no longer holds


def test_a_handoff_whose_decoder_died_and_whose_kv_is_gone_recomputes_the_prompt(stale: Any, aloop: Any) -> None:
    """As above, but the KV's export failed (the object holds the source's error: its engine failed, or it no longer
    held the KV): the next decoder, decode-1, recomputes the prompt (re-prefilled there, as when the KV source dies
    mid-transfer) -- still no recovery, nothing lost. Before: a recovery, prefilled again on a PREFILL instance."""
    dep, replicas = stale
    ing = replicas["kv-gone"]
    m = ing._members["prefill-0"]

    class _Handle:  # prefill-0's handle, whose export fails
        export_kv = types.SimpleNamespace(remote=lambda *_a, **_k: _kv_gone.remote())

        def __getattr__(self, name: str) -> Any:
            return getattr(m.handle, name)

    ing._members["prefill-0"] = dataclasses.replace(m, handle=_Handle())
    before = _stats(dep)
    out = aloop.run(_collect(ing, "kv-gone"), timeout=60)
    computed, loaded = _delta(before, _stats(dep))
    _check_exact(out, "kv-gone")
    assert out[-1].instance_id == "decode-1", [(c.index, c.instance_id) for c in out]
    c = ing.counters
    assert (c["handoff_rerouted"], c["recoveries"]) == (1, 0), c
    assert computed["prefill-0"] == PROMPT and computed["prefill-1"] == 0, computed
    assert loaded["decode-1"] == 0 and computed["decode-1"] >= PROMPT, (computed, loaded)  # recomputed there


def _exits_at_its_first_poll(inst: Any, rid: str) -> None:
    """Run on an instance actor: ``rid``'s submit is answered at once ("taken, nothing yet", as an instance answers
    whose queue holds the request past half its lease), and the actor's process exits at the first poll of it: the
    instance died after it took the request, before a token of it could be read."""
    import os

    submit, take = inst._submit, inst._take

    async def _submit(request: Any, kv: Any, **kw: Any) -> Any:
        if request.request_id == rid:
            kw["wait_first"] = False
        return await submit(request, kv, **kw)

    async def _take(request_id: str, st: Any, **kw: Any) -> Any:
        if request_id == rid:
            os._exit(1)
        return await take(request_id, st, **kw)

    inst._submit, inst._take = _submit, _take


def test_a_decoder_that_dies_after_it_took_the_handoff_hands_its_kv_on(stale: Any, aloop: Any) -> None:
    """Real Ray: decode-1 answers the handoff's submit, then its process exits at the first poll (the direct channel
    drops, Ray's retry finds the actor dead), before any token of it is read: the same KV goes to the Controller's
    replacement of decode-0 -- the right tokens, the prompt computed once (on prefill-0) and loaded there, no recovery.
    Before: a recovery, the prompt prefilled a second time. (A fresh replica: decode-0's replacement in its view.)"""
    import time

    dep, _ = stale
    rid = "answered-then-died"
    ing = dep.make_ingress(router=PinnedRouter({rid: ("prefill-0", "decode-1")}))
    aloop.run(ing.start(), timeout=30)
    try:
        deadline = time.monotonic() + 60
        while not (spare := {s.instance_id for s in ing.view().instances if s.instance_id.startswith("decode-")}
                   - {"decode-0", "decode-1"}):
            assert time.monotonic() < deadline, "decode-0 was not replaced"
            time.sleep(0.1)
        ray.get(ing._members["decode-1"].handle.__ray_call__.remote(_exits_at_its_first_poll, rid), timeout=30)
        before = _stats(dep)
        out = aloop.run(_collect(ing, rid), timeout=60)
        computed, loaded = _delta(before, _stats(dep))
    finally:
        aloop.run(ing.close())
    _check_exact(out, rid)
    (other,) = spare
    assert (out[0].instance_id, out[-1].instance_id) == ("prefill-0", other), [(c.index, c.instance_id) for c in out]
    c = ing.counters
    assert (c["handoffs"], c["handoff_rerouted"], c["recoveries"]) == (1, 1, 0), c
    assert computed["prefill-0"] == PROMPT and computed["prefill-1"] == 0, computed  # prefilled once
    assert loaded[other] == PROMPT and computed[other] <= 1, (computed, loaded)  # its KV, not recomputed


def test_a_request_handed_to_decoders_that_all_die_is_quarantined(stale: Any, aloop: Any) -> None:
    """A query of death at the handoff: every decoder its KV is handed to dies under the submit (here decode-1 is
    killed too, and this replica's view still shows both). Each counts toward its quarantine (``quarantine_after``
    2): it ends ``RequestFailed`` after the second, without a recovery or a second prefill -- the hand-ons are bounded
    by the quarantine. Before: the first death was a recovery, the prompt prefilled again before the second.
    (Last in the module: both decoders are dead.)"""
    dep, replicas = stale
    ing = replicas["kills-all"]
    handle = ing._members["decode-1"].handle  # (dead already when the test above ran: gone from the Controller's)
    ray.kill(handle, no_restart=True)
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(handle.stats.remote(), timeout=30)
    before = _stats(dep)
    with pytest.raises(RequestFailed, match="failed 2 engines it ran on"):
        aloop.run(_collect(ing, "kills-all"), timeout=60)
    computed, _ = _delta(before, _stats(dep))
    c = ing.counters
    assert (c["handoff_rerouted"], c["recoveries"], c["quarantined"]) == (1, 0, 1), c
    assert computed["prefill-0"] + computed["prefill-1"] == PROMPT, computed  # prefilled once


@pytest.fixture
def ray_like(monkeypatch: pytest.MonkeyPatch) -> None:
    """In-process handles (``tests/test_chaos.py``) that resolve a call's KV argument as Ray does: a caller that stops
    waiting for a call does not cancel its arguments (the KV future is handed on to the next decoder)."""
    import asyncio

    import tests.test_chaos as chaos

    class RayMethod(chaos._Method):
        async def _call(self, *args: Any, **kw: Any) -> Any:
            args = tuple([await asyncio.shield(a) if isinstance(a, asyncio.Future) else a for a in args])
            return await self.fn(*args, **kw)

    monkeypatch.setattr(chaos, "_Method", RayMethod)


@pytest.mark.usefixtures("ray_like")
def test_a_handoff_whose_decoder_does_not_answer_goes_to_another_decoder() -> None:
    """The first decoder the KV is handed to never answers the submit (its event loop blocked; in-process instances,
    ``submit_timeout_s`` 1 s): it is counted toward the request's quarantine and hidden, and the same KV goes to the
    other decoder -- no recovery, the prompt prefilled once. Before: an instance lost, the prompt prefilled again."""
    import asyncio

    from bench.loadgen import cluster_config
    from tests.test_faults2_audit import _cluster_of, _teardown
    from tests.test_ingress_audit import _consume

    hung: list[str] = []

    async def scenario() -> tuple[list[Any], Any, dict[str, int]]:
        insts, ing = await _cluster_of(cluster_config("pd-silent-decoder", mixed=0, prefill=1, decode=2), 0.0,
                                       submit_timeout_s=1.0)
        for iid in ("decode-0", "decode-1"):
            real = insts[iid].submit

            async def submit(request: Any, kv: Any = None, *, _iid: str = iid, _real: Any = real, **kw: Any) -> Any:
                if kv is not None and not hung:  # the first handoff's decoder hangs on it
                    hung.append(_iid)
                    await asyncio.sleep(3600)
                return await _real(request, kv, **kw)

            insts[iid].submit = submit  # type: ignore[method-assign]  # the handles look it up per call
        out: list[Any] = []
        try:
            req = GenerateRequest("pds", prompt_token_ids=tuple(range(1, PROMPT + 1)),
                                  sampling=SamplingParams(max_tokens=N, ignore_eos=True))
            task = asyncio.create_task(_consume(ing, req, out))
            while not out:
                await asyncio.sleep(0.005)
            rec = ing.registry.get("pds")
            await asyncio.wait_for(task, 20)
            computed = {i: (await inst.stats()).prompt_tokens_computed for i, inst in insts.items()}
            return out, (rec, dict(ing.counters)), computed
        finally:
            await _teardown(insts, ing)

    out, (rec, counters), computed = asyncio.run(asyncio.wait_for(scenario(), 40))
    other = ({"decode-0", "decode-1"} - set(hung)).pop()
    assert out[-1].finish_reason == "length", out[-1]
    assert [c.index + k for c in out for k in range(len(c.token_ids))] == list(range(N))
    assert {c.instance_id for c in out if c.index > 0 and c.token_ids} == {other}, out
    assert (rec.recoveries, rec.failed_engines) == (0, tuple(hung)), (rec.recoveries, rec.failed_engines)
    assert counters["handoff_rerouted"] == 1, counters
    assert computed["prefill-0"] == PROMPT and computed[other] <= 1, computed  # prefilled once, its KV loaded


# ---- a leg lost after its instance answered the submit, before its first token ---------------------------------------
def _loses_its_first_leg(inst: Any, how: str, lost: list[str], closing: list[Any], *, kv_only: bool) -> None:
    """The first submit of the module's request that ``inst`` takes (only one with KV when ``kv_only``: a handoff's) is
    answered at once (``wait_first`` off: "taken, nothing yet", as an instance answers whose queue holds the request
    past half its lease), and ``inst`` is lost before a token of it is read: ``how`` "dies" (every later call raises
    ``ActorDiedError``), "engine fails" (its engine's next step raises: the stream ends ``engine failed``), "released"
    (its release starts, ``Instance.shutdown``: the stream ends ``released``, as for a submit that landed as the
    Controller released it). One instance of the cluster only: the first to take it (its id goes to ``lost``)."""
    import asyncio

    from ray.exceptions import ActorDiedError

    from tests.test_faults3_audit import _CALLS
    from tests.test_faults_audit import _crash_after

    real = {name: getattr(inst, name) for name in _CALLS}

    async def submit(request: Any, kv: Any = None, **kw: Any) -> Any:
        if lost or (kv_only and kv is None):
            return await real["submit"](request, kv, **kw)
        sub = await real["submit"](request, kv, **kw, wait_first=False)
        lost.append(inst.instance_id)
        if how == "dies":
            for name in _CALLS:
                setattr(inst, name, died)
        elif how == "engine fails":
            _crash_after(inst, 1)
        else:
            closing.append(asyncio.create_task(inst.shutdown()))
            await asyncio.sleep(0)  # its first step ends every stream there (no engine step can come in between)
        return sub

    async def died(*_a: Any, **_k: Any) -> Any:
        raise ActorDiedError()

    inst.submit = submit


def _run_losing_first_leg(cfg: Any, rid: str, how: str, *, kv_only: bool) -> tuple[list[TokenChunk], Any, dict[str, int],
                                                                                   dict[str, Any], str]:
    """``rid`` (a ``PROMPT``-token prompt, ``N`` tokens) through in-process instances of ``cfg`` whose first to take it
    is lost before its first token (``_loses_its_first_leg``). Returns its chunks, its record, the ingress's counters,
    the other instances' engine stats and the lost instance's id."""
    import asyncio

    from tests.test_faults2_audit import _cluster_of, _teardown
    from tests.test_faults3_audit import _CALLS
    from tests.test_ingress_audit import _consume

    async def scenario() -> tuple[list[TokenChunk], Any, dict[str, int], dict[str, Any], str]:
        insts, ing = await _cluster_of(cfg, 0.2, direct=False)
        lost: list[str] = []
        closing: list[Any] = []
        for inst in insts.values():
            _loses_its_first_leg(inst, how, lost, closing, kv_only=kv_only)
        out: list[TokenChunk] = []
        try:
            req = GenerateRequest(rid, prompt_token_ids=tuple(range(1, PROMPT + 1)),
                                  sampling=SamplingParams(max_tokens=N, ignore_eos=True))
            task = asyncio.create_task(_consume(ing, req, out))
            while (rec := ing.registry.get(rid)) is None:
                await asyncio.sleep(0.001)
            await asyncio.wait_for(task, 20)
            await asyncio.gather(*closing)
            stats = {i: await inst.stats() for i, inst in insts.items() if i not in lost}
            return out, rec, dict(ing.counters), stats, lost[0]
        finally:
            for inst in insts.values():  # up again, for the teardown's shutdown
                for name in _CALLS:
                    vars(inst).pop(name, None)
            await asyncio.gather(*closing)
            await _teardown(insts, ing)

    return asyncio.run(asyncio.wait_for(scenario(), 40))


def _exact(out: list[TokenChunk], rid: str, vocab: int) -> None:
    """Every index once, in order, each the token an unfaulted run streams (the simulated engine's token is a function
    of (seed, request, index))."""
    from scheduler.engine.simulated_backend import sim_token

    assert [c.index + k for c in out for k in range(len(c.token_ids))] == list(range(N)), out
    assert [t for c in out for t in c.token_ids] == [sim_token(0, rid, i, vocab) for i in range(N)], out
    assert out[-1].finish_reason == "length", out[-1]


@pytest.mark.usefixtures("no_ray", "ray_like")
@pytest.mark.parametrize("how", ["dies", "engine fails", "released"])
def test_a_decoder_lost_after_it_took_the_handoff_before_its_first_token_hands_its_kv_on(how: str) -> None:
    """The handoff's decoder answered the submit, then was lost before it streamed a token: it died (its poll meets
    the dead actor), its engine failed, or it was released with the request on it. The stream stands where the
    prefill left it, which the KV covers: the same KV goes to the other decoder -- the right tokens, the prompt
    computed once (on prefill-0) and loaded there, no recovery. A decoder that died or failed counts toward the
    request's quarantine, as before; a released one does not. Before: a recovery, the prompt prefilled a second time
    on prefill-0."""
    from bench.loadgen import cluster_config

    cfg = cluster_config("pd-lost-first", mixed=0, prefill=1, decode=2)
    rid = f"pd-{how.replace(' ', '-')}"
    out, rec, counters, stats, lost = _run_losing_first_leg(cfg, rid, how, kv_only=True)
    other = ({"decode-0", "decode-1"} - {lost}).pop()
    _exact(out, rid, cfg.model.vocab_size)
    assert {c.instance_id for c in out if c.index > 0 and c.token_ids} == {other}, out
    assert rec.recoveries == 0 and counters["recoveries"] == 0, (rec.recoveries, counters)
    rerouted = "released_rerouted" if how == "released" else "handoff_rerouted"
    assert counters.get(rerouted) == 1 and counters["handoffs"] == 1, counters
    assert rec.failed_engines == (() if how == "released" else (lost,)), rec.failed_engines
    assert stats["prefill-0"].prompt_tokens_computed == PROMPT, stats  # prefilled once
    assert stats[other].prompt_tokens_loaded == PROMPT and stats[other].prompt_tokens_computed <= 1, stats


@pytest.mark.usefixtures("no_ray", "ray_like")
def test_a_request_ended_released_before_its_first_token_is_routed_again_not_recovered() -> None:
    """A new request (no KV) lands on a MIXED instance as its release starts, which ends it ``released`` before its
    first token: routed again without that instance, as the instance's refusal of it would have been -- not a
    recovery (``max_recoveries``), nor counted by the quarantine. Before: a recovery."""
    from bench.loadgen import cluster_config

    cfg = cluster_config("mixed-released-first", mixed=2)
    out, rec, counters, stats, lost = _run_losing_first_leg(cfg, "mx-released", "released", kv_only=False)
    other = ({"mixed-0", "mixed-1"} - {lost}).pop()
    _exact(out, "mx-released", cfg.model.vocab_size)
    assert {c.instance_id for c in out if c.token_ids} == {other}, out
    assert (rec.recoveries, rec.failed_engines) == (0, ()), (rec.recoveries, rec.failed_engines)
    assert (counters["recoveries"], counters.get("released_rerouted")) == (0, 1), counters
    assert stats[other].prompt_tokens_computed == PROMPT, stats


@pytest.mark.usefixtures("no_ray", "ray_like")
def test_a_decoder_lost_before_its_first_token_stays_out_of_the_picks_after_another_refuses() -> None:
    """decode-0 hangs on the handoff's submit (its snapshots still answer: back in the view a refresh later); the KV
    goes to decode-1, whose role switch to PREFILL finished just before the submit landed: it refuses it. The next
    decoder is decode-2, not decode-0 again -- a decoder lost before this leg's first token stays out of the leg's
    picks after a refusal too, as after a loss. Before: the refusal's pick took decode-0 (its pinned decoder, back in
    the view), whose submit hung a second time (``submit_timeout_s`` more to the first token: 30 s by default)."""
    import asyncio
    import time

    from bench.loadgen import cluster_config
    from scheduler.core.types import InstanceRole
    from tests.test_faults2_audit import _cluster_of, _teardown
    from tests.test_ingress_audit import _consume

    rid = "lost-then-refused"
    hung: list[float] = []

    async def scenario() -> tuple[list[TokenChunk], Any, dict[str, int], float]:
        insts, ing = await _cluster_of(cluster_config("pd-lost-refused", mixed=0, prefill=1, decode=3), 0.0,
                                       submit_timeout_s=1.0, router=PinnedRouter({rid: ("prefill-0", "decode-0")}))
        real0, real1 = insts["decode-0"].submit, insts["decode-1"].submit

        async def hangs(request: Any, kv: Any = None, **kw: Any) -> Any:
            if kv is not None:  # every handoff's submit: its event loop's submit path is stuck
                hung.append(time.monotonic())
                await asyncio.sleep(3600)
            return await real0(request, kv, **kw)

        async def switched(request: Any, kv: Any = None, **kw: Any) -> Any:
            if kv is not None and insts["decode-1"].role is InstanceRole.DECODE:
                await asyncio.sleep(0.2)  # on its way while the replica's view refreshes (decode-0 back in it)
                await insts["decode-1"].set_role(InstanceRole.PREFILL)  # the switch finished before it landed
            return await real1(request, kv, **kw)

        insts["decode-0"].submit, insts["decode-1"].submit = hangs, switched  # type: ignore[method-assign]
        out: list[TokenChunk] = []
        try:
            req = GenerateRequest(rid, prompt_token_ids=tuple(range(1, PROMPT + 1)),
                                  sampling=SamplingParams(max_tokens=N, ignore_eos=True))
            t0 = time.monotonic()
            await asyncio.wait_for(_consume(ing, req, out), 20)
            return out, ing.registry.get(rid), dict(ing.counters), time.monotonic() - t0
        finally:
            await _teardown(insts, ing)

    out, _, counters, took = asyncio.run(asyncio.wait_for(scenario(), 40))
    assert out[-1].finish_reason == "length", out[-1]
    assert [c.index + k for c in out for k in range(len(c.token_ids))] == list(range(N))
    assert {c.instance_id for c in out if c.index > 0 and c.token_ids} == {"decode-2"}, out
    assert len(hung) == 1, f"decode-0's submit hung {len(hung)} times ({took:.1f} s)"
    assert (counters["handoff_rerouted"], counters["role_refused"], counters["recoveries"]) == (1, 1, 0), counters


@pytest.mark.usefixtures("no_ray", "ray_like")
def test_a_request_paired_with_a_decoder_that_refused_another_for_its_new_role_is_not_sent_there() -> None:
    """r1 and r2 are both paired at arrival with decode-0 as DECODE; its switch to PREFILL finishes as r1's KV lands
    there: refused (``role_changed``). r2's prefill ends after that: the view shows decode-0's new role by then, so
    its KV goes to decode-1 at once, not to decode-0 to be refused again. Before: refused twice (a round trip each,
    as the simulator's poll rounds also counted it)."""
    import asyncio

    from bench.loadgen import cluster_config
    from scheduler.core.types import InstanceRole
    from tests.test_faults2_audit import _cluster_of, _teardown
    from tests.test_ingress_audit import _consume

    sent: list[str] = []

    async def scenario() -> tuple[dict[str, list[TokenChunk]], dict[str, int]]:
        pins = {"r1": ("prefill-0", "decode-0"), "r2": ("prefill-1", "decode-0")}
        insts, ing = await _cluster_of(cluster_config("pd-role-twice", mixed=0, prefill=2, decode=2), 0.0,
                                       router=PinnedRouter(pins), direct=False)  # (every submit by the hooks)
        real_d0, real_p1 = insts["decode-0"].submit, insts["prefill-1"].submit

        async def switches(request: Any, kv: Any = None, **kw: Any) -> Any:
            if kv is not None:
                sent.append(request.request_id)
                if insts["decode-0"].role is InstanceRole.DECODE:
                    await insts["decode-0"].set_role(InstanceRole.PREFILL)  # the switch finished as r1's KV lands
            return await real_d0(request, kv, **kw)

        async def after_the_refusal(request: Any, kv: Any = None, **kw: Any) -> Any:
            while ing.counters["role_refused"] < 1:  # r2 routed (paired) already; its prefill waits for r1's refusal
                await asyncio.sleep(0.005)
            return await real_p1(request, kv, **kw)

        insts["decode-0"].submit, insts["prefill-1"].submit = switches, after_the_refusal  # type: ignore[method-assign]
        outs: dict[str, list[TokenChunk]] = {"r1": [], "r2": []}
        try:
            reqs = [GenerateRequest(r, prompt_token_ids=tuple(range(1, PROMPT + 1)),
                                    sampling=SamplingParams(max_tokens=N, ignore_eos=True)) for r in outs]
            await asyncio.wait_for(asyncio.gather(*(_consume(ing, q, outs[q.request_id]) for q in reqs)), 20)
            return outs, dict(ing.counters)
        finally:
            await _teardown(insts, ing)

    outs, counters = asyncio.run(asyncio.wait_for(scenario(), 40))
    for rid, out in outs.items():
        assert out[-1].finish_reason == "length", (rid, out[-1])
        assert [c.index + k for c in out for k in range(len(c.token_ids))] == list(range(N)), rid
        assert {c.instance_id for c in out if c.index > 0 and c.token_ids} == {"decode-1"}, (rid, out)
    assert sent == ["r1"], sent
    assert (counters["role_refused"], counters["recoveries"]) == (1, 0), counters



@pytest.mark.usefixtures("no_ray", "ray_like")
def test_the_only_decoder_released_before_its_first_token_is_unavailable_naming_why() -> None:
    """decode-0, the only decoder, is released with the handoff's KV before its first token: no other instance
    decodes it, so the request ends UNAVAILABLE (which the SDK retries) saying so -- the refusal's path, not a
    recovery's "lost its instance"."""
    from bench.loadgen import cluster_config
    from scheduler.control.api import Unavailable

    cfg = cluster_config("pd-only-released", mixed=0, prefill=1, decode=1)
    with pytest.raises(Unavailable, match=r"decode-0 refused it \(released\) and no other instance takes it"):
        _run_losing_first_leg(cfg, "only-released", "released", kv_only=True)


@pytest.mark.usefixtures("no_ray", "ray_like")
def test_the_only_decoder_switched_to_prefill_as_the_kv_lands_is_unavailable_naming_why() -> None:
    """decode-0, the only decoder, finishes a switch to PREFILL as the KV lands: refused (``role_changed``), no other
    decodes it: UNAVAILABLE saying its role switched, nothing counted as a recovery."""
    import asyncio

    from bench.loadgen import cluster_config
    from scheduler.control.api import Unavailable
    from scheduler.core.types import InstanceRole
    from tests.test_faults2_audit import _cluster_of, _teardown
    from tests.test_ingress_audit import _consume

    async def scenario() -> tuple[str, dict[str, int]]:
        insts, ing = await _cluster_of(cluster_config("pd-only-role", mixed=0, prefill=1, decode=1), 0.0,
                                       direct=False)
        d0 = insts["decode-0"]
        real = d0.submit

        async def lands(request: Any, kv: Any = None, **kw: Any) -> Any:
            if kv is not None and d0.role is InstanceRole.DECODE:
                await d0.set_role(InstanceRole.PREFILL)
            return await real(request, kv, **kw)

        d0.submit = lands  # type: ignore[method-assign]
        try:
            req = GenerateRequest("only", prompt_token_ids=tuple(range(1, PROMPT + 1)),
                                  sampling=SamplingParams(max_tokens=N, ignore_eos=True))
            with pytest.raises(Unavailable) as e:
                await asyncio.wait_for(_consume(ing, req, []), 20)
            return str(e.value), dict(ing.counters)
        finally:
            await _teardown(insts, ing)

    message, counters = asyncio.run(asyncio.wait_for(scenario(), 40))
    assert "decode-0 refused it (its role switched) and no other instance takes it" in message, message
    assert (counters["recoveries"], counters["role_refused"]) == (0, 1), counters
