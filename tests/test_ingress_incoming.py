"""The ingress counts a P->D request on its decode instance from routing until that instance holds it (pure;
no Ray): a view refresh in between must not forget it, or a burst piles onto one decoder (seen live: two
streams 50 ms apart both on decode-0, six arrivals on one decoder)."""

from __future__ import annotations

from scheduler.config.load import load_config
from scheduler.control.ingress import Ingress
from scheduler.control.registry import RequestRecord
from scheduler.core.types import ClusterView, InstanceRole, InstanceSnapshot
from scheduler.engine.base import SamplingParams

ROLES = {"prefill-0": InstanceRole.PREFILL, "decode-0": InstanceRole.DECODE, "decode-1": InstanceRole.DECODE}


def _ingress() -> Ingress:
    ing = Ingress(load_config("deploy/examples/cpu-pd.yaml"), controller=None)
    _refresh(ing)
    return ing


def _refresh(ing: Ingress, running: dict[str, int] | None = None) -> None:
    """What ``_refresh_view`` does with fresh snapshots: the view replaced, the routed-since counts dropped."""
    running = running or {}
    ing._view = ClusterView(0.0, tuple(InstanceSnapshot(iid, role, num_running=running.get(iid, 0))
                                       for iid, role in sorted(ROLES.items())))
    ing._pending.clear()


def _rec(rid: str, max_tokens: int = 64) -> RequestRecord:
    return RequestRecord(rid, tuple(range(1, 33)), SamplingParams(max_tokens=max_tokens))


def test_a_refresh_does_not_forget_a_request_on_its_way_to_a_decoder() -> None:
    ing = _ingress()
    first = ing._route(_rec("a"))
    _refresh(ing, {"prefill-0": 1})  # decode-0 does not hold it yet: its snapshot is empty
    second = ing._route(_rec("b"))
    assert {first.decode_instance, second.decode_instance} == {"decode-0", "decode-1"}
    # The view tells policies which of the waiting are decodes on their way (``num_incoming``).
    seen = {s.instance_id: (s.num_waiting, s.num_incoming) for s in ing.view().instances}
    assert seen["decode-0"] == seen["decode-1"] == (1, 1)


def test_a_landed_request_counts_until_the_next_refresh_then_the_snapshot_has_it() -> None:
    ing = _ingress()
    d = ing._route(_rec("a")).decode_instance
    ing._expect_decode("a", None, landed=True)  # its decode leg was submitted there
    assert not ing._incoming
    s = next(s for s in ing.view().instances if s.instance_id == d)
    assert (s.num_waiting, s.num_incoming) == (1, 0)  # landed: the engine has it (its next report shows it)
    _refresh(ing, {d: 1})  # the instance reports it now
    assert next(s for s in ing.view().instances if s.instance_id == d).num_waiting == 0


def test_a_request_that_ends_before_its_handoff_or_needs_none_is_not_counted() -> None:
    ing = _ingress()
    ing._route(_rec("a"))
    ing._expect_decode("a", None)  # cancelled while prefilling
    assert not ing._incoming and not ing._expected
    ing._route(_rec("one", max_tokens=1))  # one token: the prefill instance alone answers it
    assert not ing._incoming


def test_a_recovery_moves_the_expectation_to_the_new_decoder() -> None:
    ing = _ingress()
    d = ing._route(_rec("a")).decode_instance
    ing._route(_rec("a"), exclude=frozenset({d}), accepted=True)  # re-routed (its decoder was lost)
    assert list(ing._incoming.values()) == [1] and d not in ing._incoming


def test_a_migration_destination_pick_leaves_no_expectation() -> None:
    """``migrate`` picks its destination with the router; that is not a P->D request on its way there."""
    import asyncio

    import pytest

    from scheduler.control.registry import Phase

    ing = _ingress()

    async def started() -> None:
        return None

    ing.start = started  # type: ignore[method-assign]  # no controller here
    rec = _rec("m")
    rec.phase, rec.instances = Phase.DECODE, ("decode-0",)
    ing.registry.add(rec)
    ing._members = {}  # the picked destination is then unknown: migrate stops right after the pick
    with pytest.raises(Exception, match="destination"):
        asyncio.run(ing.migrate("m"))
    assert not ing._incoming and not ing._expected
