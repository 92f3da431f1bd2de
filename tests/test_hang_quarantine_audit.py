"""Regressions from an audit of the query-of-death quarantine together with the hang watchdog. Each failed before
its fix.

One Ray cluster and one deployment (3 MIXED simulated instances, ``hang_timeout_s`` 5) for the module; the engine
stall is patched into each instance's simulated engine inside its actor (``__ray_call__``)."""

from __future__ import annotations

import types
from typing import Any

import pytest

ray = pytest.importorskip("ray")

from scheduler.config.models import ClusterConfig
from scheduler.control.cluster import deploy
from tests.test_control_plane import GPUS, MODEL, SIM, _collect, _req

HANG_S = 5.0
CFG = ClusterConfig.model_validate(
    {
        "name": "hangq",
        "gpus": GPUS,
        "model": MODEL,
        "pools": [{"name": "mixed", "role": "mixed", "gpu": "a100", "count": 3, "hang_timeout_s": HANG_S}],
    }
)


@pytest.fixture(scope="module")
def hangq(local_ray: Any, aloop: Any) -> Any:
    dep = deploy(
        CFG, name="hangq", controller_name="llmsched-controller-hangq", backend_kwargs=SIM, refresh_s=0.05
    )
    ing = dep.make_ingress(quarantine_after=2, max_recoveries=3)
    aloop.run(ing.start())
    yield dep, ing
    aloop.run(ing.close())
    dep.shutdown()


def _stalls_while_decoding(inst: Any, rid: str = "qod-hang") -> None:
    """Make the instance's simulated engine stall while ``rid`` decodes there: its steps go on (stats and polls
    answer) but make no progress -- a request that hangs a kernel, say."""
    engine = inst._backend.engine
    real = engine.step

    def step(*a: Any, **kw: Any) -> Any:
        if rid in engine.decoding:
            return types.SimpleNamespace(duration_s=0.05, finished=(), emitted=())
        return real(*a, **kw)

    engine.step = step


def test_a_request_that_hangs_every_engine_it_runs_on_is_quarantined(hangq: Any, aloop: Any) -> None:
    """The watchdog marked each hung instance unhealthy and the Controller released it; the request's stream then
    ended "released", which the ingress took for a scale-down's release, so the quarantine never counted the hung
    engines: the request was recovered max_recoveries times (and retried twice by the SDK on its UNAVAILABLE),
    hanging an engine for hang_timeout_s each time. Released as hung, the engine counts as failed under it: after
    ``quarantine_after`` (2) hung engines it ends ``RequestFailed``."""
    from scheduler.control.api import RequestFailed

    dep, ing = hangq
    for m in ray.get(dep.controller.members.remote()).values():
        ray.get(m.handle.__ray_call__.remote(_stalls_while_decoding))
    q0 = ing.counters.get("quarantined", 0)
    with pytest.raises(RequestFailed, match="failed 2 engines"):
        aloop.run(_collect(ing, _req("qod-hang", 64, 200)), timeout=8 * HANG_S + 30)
    assert ing.counters["quarantined"] == q0 + 1
