"""Online length learning shared by ingress replicas through a real Controller (local Ray, simulated backend):
requests served by one replica teach the others within a plans period, a new replica starts from what they all
learned, and every request is counted once (``scheduler/predict/shared.py``; the exchange itself, without Ray, in
test_predict_shared.py)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

ray = pytest.importorskip("ray")

from scheduler.config.models import ClusterConfig
from scheduler.control.api import GenerateRequest
from scheduler.control.cluster import deploy
from scheduler.engine.base import SamplingParams
from tests.test_control_plane import GPUS, MODEL

pytestmark = [pytest.mark.timeout(240)]


def _config(online: Any) -> ClusterConfig:
    return ClusterConfig.model_validate({
        "name": "olshare", "gpus": GPUS, "model": MODEL,
        "pools": [{"name": "mixed", "role": "mixed", "gpu": "a100", "tp": 1, "count": 1}],
        "policies": {"predictor": {"name": "trace", "params": {"online": online}}},
    })


@pytest.fixture(scope="module")
def dep(local_ray: Any) -> Any:
    d = deploy(_config(True), name="olshare", controller_name="llmsched-controller-olshare",
               backend_kwargs={"simulated": {"time_scale": 0.05}}, refresh_s=0.05)
    yield d
    d.shutdown()


async def _serve(ing: Any, rid: str, prompt: int, n: int, tenant: str) -> None:
    req = GenerateRequest(rid, prompt_token_ids=tuple(range(1, prompt + 1)), tenant=tenant,
                          sampling=SamplingParams(max_tokens=n, ignore_eos=True))
    chunks = [c async for c in ing.generate(req)]
    assert chunks[-1].finished and chunks[-1].finish_reason == "length", rid


async def _until(what: str, cond: Any, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.05)


def _guess(ing: Any, tenant: str) -> float:
    return ing.predictor.predict_dist(None, 1000, tenant=tenant).point


def test_replicas_learn_from_each_others_requests_once_and_a_new_one_starts_from_them(dep: Any, aloop: Any) -> None:
    a, b = dep.make_ingress(ingress_id="olA"), dep.make_ingress(ingress_id="olB")

    async def run() -> None:
        await asyncio.gather(a.start(), b.start())
        shipped = _guess(b, "summarise")
        # 12 long answers of `summarise` served by A only.
        await asyncio.gather(*(_serve(a, f"sa{k}", 1000, 400, "summarise") for k in range(12)))
        await _until("A learned its own", lambda: a.predictor.online.observed == 12)
        await _until("B learned A's", lambda: b.predictor.online.observed == 12)
        learned = _guess(b, "summarise")
        assert learned > shipped + 10 and learned == _guess(a, "summarise"), (shipped, learned)
        # 8 short answers of `chat` served by B only: A learns them, and nothing is counted twice.
        await asyncio.gather(*(_serve(b, f"sb{k}", 1000, 10, "chat") for k in range(8)))
        await _until("A learned B's", lambda: a.predictor.online.observed == 20)
        await _until("A's reported", lambda: not a._lengths.view.journal and not b._lengths.view.journal)
        await asyncio.sleep(3 * a.plans_s)  # (more exchanges: still 20)
        for ing in (a, b):
            online = ing.predictor.online
            assert online.observed == 20 and online.history("summarise").observed == 12
            assert online.history("chat").observed == 8
        assert _guess(a, "chat") == _guess(b, "chat") < shipped
        # A new replica starts from what A and B learned, before it serves anything.
        c = dep.make_ingress(ingress_id="olC")
        await c.start()
        try:
            assert c.predictor.online.observed == 20
            assert (_guess(c, "chat"), _guess(c, "summarise")) == (_guess(a, "chat"), _guess(a, "summarise"))
        finally:
            await c.close()

    async def close() -> None:
        await asyncio.gather(a.close(), b.close())

    try:
        aloop.run(run(), timeout=180)
    finally:
        aloop.run(close())


def test_a_restarted_controller_starts_from_a_replicas_copy(dep: Any, aloop: Any) -> None:
    """The Controller keeps the merged histories in memory only: restarted by Ray, it takes them from the first
    replica that reports (what the previous test's replicas learned), and a replica started after it begins with
    them; requests served after the restart are shared as before."""
    a = dep.make_ingress(ingress_id="olA2")
    d = None

    async def run() -> None:
        nonlocal d
        await a.start()
        assert a.predictor.online.observed == 20
        old = a._lengths.epoch
        ray.kill(dep.controller, no_restart=False)
        await _until("the Controller restarted", lambda: a._lengths.epoch not in (None, old), timeout_s=60)
        assert a.predictor.online.observed == 20
        d = dep.make_ingress(ingress_id="olD")
        await d.start()
        assert d.predictor.online.observed == 20 and _guess(d, "chat") == _guess(a, "chat")
        await asyncio.gather(*(_serve(d, f"sd{k}", 1000, 10, "chat") for k in range(3)))
        await _until("A learned D's", lambda: a.predictor.online.observed == 23)
        assert a.predictor.online.history("chat").observed == 11

    async def close() -> None:
        await asyncio.gather(a.close(), *([d.close()] if d is not None else []))

    try:
        aloop.run(run(), timeout=180)
    finally:
        aloop.run(close())


def test_replicas_with_other_settings_share_among_themselves(dep: Any, aloop: Any) -> None:
    """A rolling change of the ``online`` settings: two replicas started with new ones (``strength``) learn each
    other's requests through the same Controller, and a replica of the old settings learns none of them (before:
    the Controller refused the new settings for as long as it ran, each new replica learned alone)."""
    from scheduler.config.models import PolicySpec
    from scheduler.predict.serving import serving_predictor

    def other() -> Any:
        return serving_predictor(PolicySpec(name="trace", params={"online": {"strength": 6.0}}))

    g = dep.make_ingress(ingress_id="olG")
    e, f = dep.make_ingress(ingress_id="olE", predictor=other()), dep.make_ingress(ingress_id="olF", predictor=other())

    async def run() -> None:
        await asyncio.gather(g.start(), e.start(), f.start())
        before = g.predictor.online.observed
        assert e.predictor.online.observed == f.predictor.online.observed == 0
        await asyncio.gather(*(_serve(e, f"se{k}", 1000, 10, "chat") for k in range(5)))
        await _until("F learned E's", lambda: f.predictor.online.observed == 5)
        await asyncio.sleep(3 * e.plans_s)
        assert e.predictor.online.observed == 5 and g.predictor.online.observed == before
        assert _guess(f, "chat") == _guess(e, "chat")

    async def close() -> None:
        await asyncio.gather(e.close(), f.close(), g.close())

    try:
        aloop.run(run(), timeout=180)
    finally:
        aloop.run(close())
