"""Routing snapshots carry per-request detail only for a router that reads it, migration on or off (fortieth
session): a migration policy's own views keep theirs, and the runs are the same as when every routing snapshot
carried it."""

from __future__ import annotations

import numpy as np
import pytest

from scheduler.core.types import ClusterView
from scheduler.policy.migration import LlumnixMigrationPolicy
from scheduler.policy.route import make_router
from scheduler.policy.routers_lookahead import ShedRouter
from scheduler.policy.routers_smart import LlumnixRouter
from sim.simulator import Simulator, Workload
from tests.test_engine_model import config

COLUMNS = ("first_token_s", "finish_s", "admit_s", "instance", "decode_instance", "preemptions", "rejected")


def bursty(n: int = 240, *, seed: int = 3) -> Workload:
    """Gamma arrivals (CV 4), a quarter of the requests high priority: KV binds in bursts, so migration moves."""
    rng = np.random.default_rng(seed)
    gaps = rng.gamma(1 / 16, 16 / 6.0, n)  # shape 1/CV^2, mean 1/6 s
    return Workload(np.cumsum(gaps), rng.integers(50, 600, n), rng.integers(20, 300, n),
                    priority=(rng.random(n) < 0.25).astype(int))


def seen_detail(router):
    """``router`` recording whether each routing view listed any instance's requests."""
    seen: list[bool] = []
    route = router.route

    def recording(request, view: ClusterView):
        seen.append(any(s.requests for s in view.instances))
        return route(request, view)

    router.route = recording  # type: ignore[method-assign]
    return seen


class CountingPolicy(LlumnixMigrationPolicy):
    """The llumnix policy, counting the ticks whose view listed requests (it reads them to pick what to move)."""

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.detailed = 0

    def plan(self, view, now_s):
        self.detailed += any(s.requests for s in view.instances)
        return super().plan(view, now_s)


def run(router, *, migration: bool = True, pd: bool = True, old_rule: bool = False) -> tuple[Simulator, object]:
    """A run; ``old_rule``: every routing snapshot lists requests when a migration policy runs (the rule before)."""
    cfg = config(pd=(1, 2), blocks=300) if pd else config(3, blocks=300)
    policy = CountingPolicy(high_watermark=0.5, balance_gap=0.1) if migration else None
    sim = Simulator(cfg, router=router, migration=policy)
    if old_rule:
        sim._detail = True
    return sim, sim.run(bursty())


def test_a_router_that_reads_no_detail_routes_on_snapshots_without_it() -> None:
    # Before: a migration policy made every routing snapshot list its requests, for routers that never read them.
    router = make_router("least_outstanding")
    seen = seen_detail(router)
    sim, res = run(router)
    assert seen and not any(seen)
    assert res.migrations > 0 and sim.migration.detailed > 0  # the policy's own views still list them


@pytest.mark.parametrize("name", ["llumnix", "lookahead:detail=true"])
def test_a_router_that_reads_it_gets_it(name: str) -> None:
    base, _, params = name.partition(":")
    router = make_router(base, **({"detail": True} if params else {}))
    seen = seen_detail(router)
    run(router)
    assert any(seen)
    if base == "llumnix":  # reads it only for what a migration moved: nothing without a migration policy
        router = make_router(base)
        seen = seen_detail(router)
        run(router, migration=False)
        assert seen and not any(seen)


def test_which_routers_read_it_with_migration() -> None:
    assert LlumnixRouter().needs_detail_with_migration
    assert not LlumnixRouter(headroom=0.0).needs_detail_with_migration  # no headroom: the listing is never read
    assert ShedRouter("llumnix").needs_detail_with_migration
    assert not ShedRouter("learned").needs_detail_with_migration
    for name in ("least_outstanding", "learned", "lookahead", "power_of_two", "mixing", "prefix_affinity"):
        r = make_router(name)
        assert not r.needs_request_detail and not r.needs_detail_with_migration, name


@pytest.mark.parametrize("pd", [True, False])
@pytest.mark.parametrize("name", ["least_outstanding", "lookahead", "learned", "llumnix"])
def test_runs_are_the_same_as_with_detail_everywhere(name: str, pd: bool) -> None:
    # The old rule (every routing snapshot listed requests under migration) against the new, on a bursty P/D
    # workload with priorities: every per-request column and the moves are identical.
    _, a = run(make_router(name), pd=pd, old_rule=True)
    new = make_router(name)
    seen = seen_detail(new)
    _, b = run(new, pd=pd)
    assert a.migrations == b.migrations and a.migrations > 0
    for c in COLUMNS:
        np.testing.assert_array_equal(getattr(a, c), getattr(b, c), err_msg=c)
    assert any(seen) == (name == "llumnix")  # only the router that reads the listing got it


def test_llumnix_needs_it_under_migration() -> None:
    # Why llumnix keeps the detail: without it, its headroom misses the migrated high-priority requests and the
    # run changes (the identity test above would catch a rule that dropped it).
    _, a = run(make_router("llumnix"), pd=False)
    r = make_router("llumnix")
    r.needs_detail_with_migration = False  # type: ignore[misc]
    _, b = run(r, pd=False)
    assert not np.array_equal(a.finish_s, b.finish_s, equal_nan=True)
