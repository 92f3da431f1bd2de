"""Online length learning shared by ingress replicas through the Controller (``scheduler/predict/shared.py``),
without Ray: the replicas' and the Controller's sides exchanging reports by hand (through a real Controller in
test_online_shared_live.py)."""

from __future__ import annotations

import pickle
import random
from typing import Any

import numpy as np
import pytest

from scheduler.predict.base import LengthPrediction
from scheduler.predict.online import TenantLengths
from scheduler.predict.shared import LengthLog, SharedLengths

PRIOR = LengthPrediction.from_probs([1, 2, 4, 8, 8, 4, 2, 1, 1])


def _requests(n: int, seed: int = 0) -> list[tuple[int, int, bool, str | None]]:
    """(prompt, output, cut, tenant): two apps, some cut, some requests naming no tenant."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        tenant = rng.choice(["chat", "summarise", None, f"t{rng.randrange(6)}"])
        output = rng.randint(5, 40) if tenant == "chat" else rng.randint(200, 900)
        out.append((rng.randint(50, 3000), output, rng.random() < 0.1, tenant))
    return out


def _observe(tl: TenantLengths, req: tuple[int, int, bool, str | None]) -> None:
    n, out, cut, tenant = req
    tl.observe(n, out, cut=cut, prior=PRIOR if cut else None, tenant=tenant)


def _same(a: TenantLengths, b: TenantLengths) -> None:
    """Bit for bit the same histories (tables, sketch, tenants in order, counters)."""
    sa, sb = a.state(), b.state()
    for k, v in sa.items():
        if isinstance(v, np.ndarray):
            assert v.tobytes() == sb[k].tobytes(), k
        else:
            assert v == sb[k], k


def _lengths() -> TenantLengths:
    return TenantLengths(max_tenants=3, admit_after=2, memory=40.0, strength=5.0)  # small: decay and eviction run


def _exchange(replica: str, shared: SharedLengths, log: LengthLog, lost: bool = False) -> None:
    reply = log.share(replica, pickle.loads(pickle.dumps(shared.report())))  # (as Ray sends it)
    if not lost:
        shared.apply(pickle.loads(pickle.dumps(reply)))


def test_a_lone_replica_predicts_bit_for_bit_as_without_sharing() -> None:
    """One replica: its samples come back in its own order, so after every exchange (and between them) its
    histories are the ones a replica that does not share holds -- with requests finishing while a report is on its
    way too (they stay in its view, and go with the next report)."""
    alone, view = _lengths(), _lengths()
    shared, log = SharedLengths(view), LengthLog("e1")
    reqs = iter(_requests(400))
    for k in range(100):
        for r in [next(reqs) for _ in range(k % 5)]:
            _observe(alone, r)
            _observe(view, r)
        reply = log.share("a", shared.report())
        for r in [next(reqs) for _ in range(k % 3)]:  # finished meanwhile
            _observe(alone, r)
            _observe(view, r)
        shared.apply(reply)
        _same(view, alone)
    for r in reqs:
        _observe(alone, r)
        _observe(view, r)
    _exchange("a", shared, log)
    _same(view, alone)
    _same(log.merged, alone)
    assert view.journal == [] and view.observed == 400


def test_two_replicas_learn_as_one_and_a_new_one_starts_from_it() -> None:
    """Requests observed on A only change B's prediction after an exchange; B then holds exactly what one replica
    that saw every request in the Controller's order holds (nothing counted twice, nothing lost), even when a reply
    is lost and its report sent again; a new replica C starts from it."""
    a, b = _lengths(), _lengths()
    sa, sb, log = SharedLengths(a), SharedLengths(b), LengthLog("e1")
    one = _lengths()  # sees every request in the order the Controller merges them
    reqs = _requests(600, seed=1)
    for k in range(0, 600, 20):
        batch_a, batch_b = reqs[k:k + 15], reqs[k + 15:k + 20]
        before = b.adjust(PRIOR, batch_a[0][0], batch_a[0][3])
        for r in batch_a:
            _observe(a, r)
        assert b.adjust(PRIOR, batch_a[0][0], batch_a[0][3]) == before  # (A's are not in B yet)
        for r in batch_b:
            _observe(b, r)
        # Every third reply lost: the Controller merged the batch, and A sends it again next time (merged once).
        _exchange("a", sa, log, lost=k % 60 == 0)
        _exchange("b", sb, log)
        for r in batch_a + batch_b:
            _observe(one, r)
        _same(b, one)
        _same(log.merged, one)
    _exchange("a", sa, log)
    _same(a, one)
    assert one.observed == a.observed == b.observed == log.merged.observed == 600 == log.seq
    c = _lengths()
    SharedLengths(c).apply(log.share("c", SharedLengths(c).report()))
    _same(c, one)
    assert b.adjust(PRIOR, 1000, "summarise") != _lengths().adjust(PRIOR, 1000, "summarise")


def test_a_replica_behind_the_log_gets_the_merged_state_and_other_settings_learn_alone() -> None:
    a, b = _lengths(), _lengths()
    sa, sb, log = SharedLengths(a), SharedLengths(b), LengthLog("e1", max_log=10)
    _exchange("b", sb, log)
    for r in _requests(50, seed=2):
        _observe(a, r)
    _exchange("a", sa, log)
    assert len(log.log) == 10 and log.seq == 50
    reply = log.share("b", sb.report())
    assert reply is not None and reply.state is not None and not reply.samples  # 50 since B's cursor, 10 kept
    sb.apply(reply)
    _same(b, a)
    other = TenantLengths(max_tenants=3, admit_after=2, memory=40.0, strength=6.0)
    assert log.share("x", SharedLengths(other).report()) is None and log.refused == 1


def test_a_restarted_controller_is_seeded_by_the_first_replica_that_reports() -> None:
    """The Controller keeps nothing across a restart: the first replica that reports with the old epoch sends its
    base, which becomes the merged state; another replica then gets it back (its own samples not merged yet on
    top), and a replica with no Controller yet starts from it."""
    a, b = _lengths(), _lengths()
    sa, sb, old = SharedLengths(a), SharedLengths(b), LengthLog("e1")
    reqs = _requests(200, seed=3)
    for r in reqs[:100]:
        _observe(a, r)
    _exchange("a", sa, old)
    _exchange("b", sb, old)
    learned = old.merged.state()
    new = LengthLog("e2")
    for r in reqs[100:110]:
        _observe(b, r)
    _exchange("a", sa, new)  # asked to seed: nothing changes yet
    assert sa._seed and new.seq == 0 and not new.learned
    _exchange("a", sa, new)  # its base adopted
    assert new.learned and sa.epoch == new.epoch
    _exchange("b", sb, new)
    one = _lengths()
    one.load_state(learned)
    for r in reqs[100:110]:
        _observe(one, r)
    _same(new.merged, one)
    _same(b, one)
    c = _lengths()
    SharedLengths(c).apply(new.share("c", SharedLengths(c).report()))
    _same(c, one)


def test_a_long_journal_goes_in_bounded_reports_and_the_oldest_past_the_bound_are_not_shared() -> None:
    """While the Controller is away a replica keeps at most ``max_journal`` samples (its view keeps them all until
    the next exchange); back, it sends them ``max_report`` at a time, each merged once."""
    a, log = _lengths(), LengthLog("e1")
    sa = SharedLengths(a, max_journal=30, max_report=8)
    reqs = _requests(40, seed=5)
    for r in reqs:
        _observe(a, r)
    assert a.observed == 40
    sizes = []
    for _ in range(5):
        report = sa.report()
        sizes.append(len(report.samples))
        sa.apply(log.share("a", report))
    assert sizes == [8, 8, 8, 6, 0] and log.seq == 30 and a.journal == []
    one = _lengths()
    for r in reqs[10:]:
        _observe(one, r)
    _same(a, one)
    _same(log.merged, one)


def test_replay_refuses_a_state_of_other_settings() -> None:
    with pytest.raises(ValueError, match="settings"):
        _lengths().load_state(TenantLengths().state())


def _size(obj: Any) -> int:
    return len(pickle.dumps(obj))


def test_a_report_names_each_tenant_once() -> None:
    """A sample is ~20 bytes pickled (a cut one carries its prior's 9 probabilities), each request's own copy of
    its tenant's name sent once per report, not per sample."""
    view = TenantLengths()
    shared = SharedLengths(view)
    name = "summarise-app-" * 8  # (a long name, each request its own copy of it: as the ingress parses them)
    for k in range(100):
        view.observe(300 + k, 400, tenant="".join(name))
    assert _size(shared.report()) < 100 * 25 + len(name), _size(shared.report())


def test_sharing_is_on_with_online_and_off_with_share_false() -> None:
    from scheduler.config.models import PolicySpec
    from scheduler.predict.serving import serving_predictor

    assert serving_predictor(PolicySpec(name="trace", params={"online": True})).share_online
    off = serving_predictor(PolicySpec(name="trace", params={"online": {"share": False, "max_tenants": 4}}))
    assert not off.share_online and off.online.max_tenants == 4
    with pytest.raises(ValueError, match=r"params\.online\.share"):
        serving_predictor(PolicySpec(name="trace", params={"online": {"share": "sometimes"}}))


def test_a_replica_served_by_a_restarted_controller_before_its_seed_gets_the_seeded_state() -> None:
    """A restarted Controller asks A (old epoch) to seed it; meanwhile a new replica C reports and gets the
    Controller's state, empty then, at log position 0. A's base adopted, C's next exchange brings it the seeded
    state too (before: the log since C's cursor only, so C never learned what the cluster knew before the
    restart)."""
    a, c = _lengths(), _lengths()
    sa, sc, old = SharedLengths(a), SharedLengths(c), LengthLog("e1")
    reqs = _requests(120, seed=7)
    for r in reqs[:100]:
        _observe(a, r)
    _exchange("a", sa, old)
    new = LengthLog("e2")
    _exchange("a", sa, new)  # asked to seed
    _exchange("c", sc, new)  # a new replica: the empty state
    _exchange("a", sa, new)  # A's base adopted
    for r in reqs[100:]:
        _observe(a, r)
    _exchange("a", sa, new)
    _exchange("c", sc, new)
    one = _lengths()
    for r in reqs:
        _observe(one, r)
    _same(new.merged, one)
    _same(c, one)


def test_a_backlog_rebuilds_the_view_once_it_is_down_to_one_report(monkeypatch: pytest.MonkeyPatch) -> None:
    """Back from a Controller outage, a replica's journal goes ``max_report`` at a time; its view (replayed on the
    ingress's event loop, ~30 us a sample) is rebuilt once what is left fits one report, not on every exchange
    (before: 22 + 14 + 6 samples replayed for 30 here; 28k + 24k + ... ~130k, seconds of stalls, at the defaults),
    and ends as before."""
    a, log = _lengths(), LengthLog("e1")
    sa = SharedLengths(a, max_journal=30, max_report=8)
    reqs = _requests(40, seed=5)
    for r in reqs:
        _observe(a, r)
    replayed: list[int] = []
    replay = TenantLengths.replay

    def counted(self: TenantLengths, samples: Any) -> None:
        samples = list(samples)
        if self is a:
            replayed.append(len(samples))
        replay(self, samples)

    monkeypatch.setattr(TenantLengths, "replay", counted)
    for _ in range(5):
        _exchange("a", sa, log)
    assert replayed == [6, 0] and a.journal == []
    one = _lengths()
    for r in reqs[10:]:
        _observe(one, r)
    _same(a, one)
