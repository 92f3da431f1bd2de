"""The llumnix router's two load metrics (``metric``): the virtual usage fraction and the paper's freeness
(Sun et al., OSDI 2024, 4.4.2; AlibabaPAI/llumnix ``RemainingStepsLoad``), on hand-built snapshots where they pick
different instances, and the ``name:key=value`` router entries that let ``llmsched compare`` run both."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from scheduler.cli import main as cli_main
from scheduler.config.load import load_config
from scheduler.core.types import ClusterView, InstanceRole, InstanceSnapshot, RequestInfo
from scheduler.policy.route import RouteDecision, make_router
from sim.compare import router_factory, router_spec

M, P, D = InstanceRole.MIXED, InstanceRole.PREFILL, InstanceRole.DECODE


def _snap(iid: str, role: InstanceRole = M, *, running: int = 0, waiting: int = 0, used: int = 0,
          pending: int = 0, total: int = 1000, incoming: int = 0) -> InstanceSnapshot:
    return InstanceSnapshot(iid, role, num_running=running, num_waiting=waiting, num_decoding=running,
                            kv_blocks_used=used, kv_blocks_total=total, block_size=16,
                            prefill_tokens_pending=pending, num_incoming=incoming)


def _req(prompt: int = 512, priority: int = 0) -> RequestInfo:
    return RequestInfo("r", 0.0, prompt, 64, priority=priority)


def _pick(metric: str, *insts: InstanceSnapshot, request: RequestInfo | None = None) -> str:
    d = make_router("llumnix", metric=metric).route(request or _req(), ClusterView(0.0, insts))
    assert isinstance(d, RouteDecision)
    return d.prefill_instance


def test_freeness_prefers_a_small_batch_with_room_to_grow_over_the_lowest_usage() -> None:
    """a: 1 request on 300 of 1000 blocks (freeness 700 steps); b: 20 requests on 200 (40 steps each). Usage ratio
    sends to b (20% < 30%), freeness to a: b's batch runs out of KV in 40 decode steps, a's in 700."""
    a, b = _snap("a", running=1, used=300), _snap("b", running=20, used=200)
    assert _pick("usage_ratio", a, b) == "b"
    assert _pick("remaining_steps", a, b) == "a"


def test_freeness_counts_queued_prompts_in_both_numerator_and_batch() -> None:
    """The code's formula: (total - used - blocks of all waiting prompts) / (running + waiting). a: 2 running on
    100 blocks plus 2 queued prompts of 4000 tokens (500 blocks): (1000 - 600) / 4 = 100. b: 8 running on 201
    blocks: 799 / 8 = 99.9 steps. Usage ratio reads a at 63%, b at 23%."""
    r = make_router("llumnix", metric="remaining_steps")
    a = _snap("a", running=2, waiting=2, used=100, pending=8000)
    b = _snap("b", running=8, used=201)
    assert r.score(_req(), a, phase="colocated") == pytest.approx(-(1000 - 100 - 500) / 4)
    assert r.score(_req(), b, phase="colocated") == pytest.approx(-(1000 - 201) / 8)
    assert _pick("remaining_steps", a, b) == "a"
    assert _pick("usage_ratio", a, b) == "b"


def test_an_empty_instance_is_the_freest_whatever_its_size() -> None:
    """Freeness is +inf with no request (the code's ``RemainingStepsLoad(np.inf)``): a small empty instance beats a
    big one holding a request; by usage ratio the newcomer's 32 blocks are 32% of the small one, 4.2% of the
    big."""
    small, big = _snap("small", total=100), _snap("big", running=1, used=10, total=1000)
    assert _pick("usage_ratio", small, big) == "big"
    assert _pick("remaining_steps", small, big) == "small"


def test_freeness_leaves_decodes_on_their_way_out_as_usage_ratio_does() -> None:
    """A decode instance's ``num_incoming`` (requests whose KV is still in flight, counted in ``num_waiting``) is
    not in its batch: d0 with 4 running and 6 incoming reads (1000 - 400) / 4, not / 10."""
    r = make_router("llumnix", metric="remaining_steps")
    d0 = _snap("d0", D, running=4, waiting=6, incoming=6, used=400)
    assert r.score(_req(), d0, phase="decode") == pytest.approx(-600 / 4)


def test_priority_headroom_is_taken_from_the_free_blocks() -> None:
    """A high-priority request routed to a makes a report 10% of its blocks (``headroom``) as used to normal
    requests: a and b otherwise equal (a first, so a tie goes to a), a normal request now goes to b; a
    high-priority one sees no headroom and pays ``queue_weight`` per waiting request instead."""
    r = make_router("llumnix", metric="remaining_steps")
    a, b = _snap("a", running=2, used=100), _snap("b", running=2, used=100)
    view = ClusterView(0.0, (a, b))
    assert r.route(_req(), view).prefill_instance == "a"
    r.on_routed(RequestInfo("h", 0.0, 100, 10, priority=1), RouteDecision("a"))
    assert r.score(_req(), a, phase="colocated") == pytest.approx(-(1000 * 0.9 - 100) / 2)
    assert r.route(_req(), view).prefill_instance == "b"
    assert r.route(_req(priority=1), view).prefill_instance == "a"
    queued = _snap("a", running=2, waiting=1, used=100)
    assert r.score(_req(priority=1), queued, phase="colocated") == pytest.approx(-(1000 * 0.95 - 100) / 3)


def test_usage_ratio_stays_the_default_and_an_unknown_metric_is_refused() -> None:
    assert make_router("llumnix").metric == "usage_ratio"
    with pytest.raises(ValueError, match="metric 'freeness'"):
        make_router("llumnix", metric="freeness")


def test_a_router_entry_carries_parameters() -> None:
    assert router_spec("llumnix:metric=remaining_steps:headroom=0.2") == (
        "llumnix", {"metric": "remaining_steps", "headroom": 0.2})
    assert router_spec("scheduler.policy.routers_smart:LlumnixRouter") == (
        "scheduler.policy.routers_smart:LlumnixRouter", {})
    assert router_spec("llumnix:prefill_saturation_tokens=null") == ("llumnix", {"prefill_saturation_tokens": None})
    with pytest.raises(ValueError, match="repeated"):
        router_spec("llumnix:metric=usage_ratio:metric=remaining_steps")
    cfg = load_config("default")
    r = router_factory("llumnix:metric=remaining_steps", cfg)()
    assert (r.name, r.metric) == ("llumnix", "remaining_steps")
    with pytest.raises(ValueError, match="bogus"):
        router_factory("llumnix:bogus=1", cfg)()


def test_compare_runs_both_llumnix_metrics_as_rows(tmp_path: Path) -> None:
    out = tmp_path / "c.json"
    assert cli_main(["compare", "--limit", "300", "--instances", "4", "--load", "0.9", "--no-goodput",
                     "--routers", "llumnix,llumnix:metric=remaining_steps", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["routers"]
    assert set(rows) == {"llumnix", "llumnix:metric=remaining_steps"}
    assert all(s["completed"] == 300 for s in rows.values())


def test_on_a_p_d_view_freeness_picks_the_decoder_and_usage_ratio_the_prefill_instance() -> None:
    """Llumnix's P/D defaults: decode instances by remaining steps, prefill instances by KV blocks ratio. p1 is the
    freer prefill instance by steps (1 request) but the fuller by usage (300 blocks); d1 the freer decoder by
    steps. Freeness pairs p0 (usage 23% < 33%) with d1; usage ratio pairs p0 with d0."""
    view = ClusterView(0.0, (
        _snap("p0", P, running=20, used=200), _snap("p1", P, running=1, used=300),
        _snap("d0", D, running=20, used=200), _snap("d1", D, running=1, used=300),
    ))
    rs = make_router("llumnix", metric="remaining_steps").route(_req(), view)
    assert (rs.prefill_instance, rs.decode_instance) == ("p0", "d1")
    ur = make_router("llumnix").route(_req(), view)
    assert (ur.prefill_instance, ur.decode_instance) == ("p0", "d0")


def test_the_watermark_is_left_out_of_the_free_blocks() -> None:
    """``watermark=0.01``: int(1% of the blocks) come off the free blocks, as the OSDI-era Llumnix's
    ``num_free_gpu_blocks - num_watermark_blocks``: 10 of 1000, 30 of 3000. It moves the pick where batches differ:
    b, 4 running on 40 of 1000 blocks, reads 960 / 4 = 240 steps, c, 1 running on 755, 245 -- c; with the
    watermark b reads 950 / 4 = 237.5, c 235 -- b (a constant off the numerator costs a small batch more)."""
    r1 = make_router("llumnix", metric="remaining_steps", watermark=0.01)
    assert r1.score(_req(), _snap("a", running=1, used=500), phase="colocated") == pytest.approx(-490)
    big = _snap("big", running=2, used=1000, total=3000)
    assert r1.score(_req(), big, phase="colocated") == pytest.approx(-(3000 - 30 - 1000) / 2)
    b, c = _snap("b", running=4, used=40), _snap("c", running=1, used=755)
    assert _pick("remaining_steps", b, c) == "c"
    assert r1.route(_req(), ClusterView(0.0, (b, c))).prefill_instance == "b"


def test_llumnix_ties_go_where_its_sort_puts_them_not_to_the_first_candidate() -> None:
    """Four empty instances tie at freeness +inf: ``ties=first`` takes e0; ``ties=llumnix`` sorts as Llumnix's
    ``sort_instance_infos`` over ``RemainingStepsLoad`` (whose ``__lt__`` is ``>=``), which on CPython puts the last
    tie first: e3. An instance with any request loses to every empty one either way, and a freer one still wins
    outright."""
    empties = tuple(_snap(f"e{i}") for i in range(4))
    busy = _snap("busy", running=1, used=10)
    view = ClusterView(0.0, (busy, *empties))
    first = make_router("llumnix", metric="remaining_steps").route(_req(), view)
    llum = make_router("llumnix", metric="remaining_steps", ties="llumnix").route(_req(), view)
    assert (first.prefill_instance, llum.prefill_instance) == ("e0", "e3")
    free, tight = _snap("free", running=1, used=10), _snap("tight", running=5, used=10)
    assert make_router("llumnix", metric="remaining_steps", ties="llumnix").route(
        _req(), ClusterView(0.0, (tight, free))).prefill_instance == "free"
    # Finite ties too: two instances at 495 steps.
    x, y = _snap("x", running=2, used=10), _snap("y", running=2, used=10)
    assert make_router("llumnix", metric="remaining_steps", ties="llumnix").route(
        _req(), ClusterView(0.0, (x, y, tight))).prefill_instance == "y"


def test_watermark_and_ties_are_refused_where_they_would_change_nothing() -> None:
    with pytest.raises(ValueError, match="apply to metric=remaining_steps"):
        make_router("llumnix", watermark=0.01)
    with pytest.raises(ValueError, match="apply to metric=remaining_steps"):
        make_router("llumnix", ties="llumnix")
    with pytest.raises(ValueError, match="ties 'random'"):
        make_router("llumnix", metric="remaining_steps", ties="random")
    with pytest.raises(ValueError, match="watermark 1.5"):
        make_router("llumnix", metric="remaining_steps", watermark=1.5)
    r = router_factory("llumnix:metric=remaining_steps:watermark=0.01:ties=llumnix", load_config("default"))()
    assert (r.metric, r.watermark, r.ties) == ("remaining_steps", 0.01, "llumnix")
