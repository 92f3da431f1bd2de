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
from scheduler.predict.shared import LengthLog, SettingsLog, SharedLengths

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


def _one(log: LengthLog) -> SettingsLog:
    """The Controller's log of the one settings its replicas report with."""
    [group] = log.groups.values()
    return group


def _exchange(replica: str, shared: SharedLengths, log: LengthLog, lost: bool = False) -> None:
    reply = log.share(replica, pickle.loads(pickle.dumps(shared.report())))  # (as Ray sends it)
    if not lost:
        shared.apply(pickle.loads(pickle.dumps(reply)))


def test_a_lone_replica_predicts_bit_for_bit_as_without_sharing() -> None:
    """One replica: its samples come back in its own order, so after every exchange (and between them) its
    histories are the ones a replica that does not share holds -- with requests finishing while a report is on its
    way too (they stay in its view, and go with the next report)."""
    alone = _lengths()
    shared, log = SharedLengths(_lengths()), LengthLog("e1")
    reqs = iter(_requests(400))
    for k in range(100):
        for r in [next(reqs) for _ in range(k % 5)]:
            _observe(alone, r)
            _observe(shared.view, r)
        reply = log.share("a", shared.report())
        for r in [next(reqs) for _ in range(k % 3)]:  # finished meanwhile
            _observe(alone, r)
            _observe(shared.view, r)
        shared.apply(reply)
        _same(shared.view, alone)
    for r in reqs:
        _observe(alone, r)
        _observe(shared.view, r)
    _exchange("a", shared, log)
    _same(shared.view, alone)
    _same(_one(log).merged, alone)
    assert shared.view.journal == [] and shared.view.observed == 400


def test_two_replicas_learn_as_one_and_a_new_one_starts_from_it() -> None:
    """Requests observed on A only change B's prediction after an exchange; B then holds exactly what one replica
    that saw every request in the Controller's order holds (nothing counted twice, nothing lost), even when a reply
    is lost and its report sent again; a new replica C starts from it."""
    sa, sb, log = SharedLengths(_lengths()), SharedLengths(_lengths()), LengthLog("e1")
    one = _lengths()  # sees every request in the order the Controller merges them
    reqs = _requests(600, seed=1)
    for k in range(0, 600, 20):
        batch_a, batch_b = reqs[k:k + 15], reqs[k + 15:k + 20]
        before = sb.view.adjust(PRIOR, batch_a[0][0], batch_a[0][3])
        for r in batch_a:
            _observe(sa.view, r)
        assert sb.view.adjust(PRIOR, batch_a[0][0], batch_a[0][3]) == before  # (A's are not in B yet)
        for r in batch_b:
            _observe(sb.view, r)
        # Every third reply lost: the Controller merged the batch, and A sends it again next time (merged once).
        _exchange("a", sa, log, lost=k % 60 == 0)
        _exchange("b", sb, log)
        for r in batch_a + batch_b:
            _observe(one, r)
        _same(sb.view, one)
        _same(_one(log).merged, one)
    _exchange("a", sa, log)
    _same(sa.view, one)
    assert one.observed == sa.view.observed == sb.view.observed == _one(log).merged.observed == 600 == _one(log).seq
    sc = SharedLengths(_lengths())
    _exchange("c", sc, log)
    _same(sc.view, one)
    assert sb.view.adjust(PRIOR, 1000, "summarise") != _lengths().adjust(PRIOR, 1000, "summarise")


def test_a_replica_behind_the_log_gets_the_merged_state() -> None:
    sa, sb, log = SharedLengths(_lengths()), SharedLengths(_lengths()), LengthLog("e1", max_log=10)
    _exchange("b", sb, log)
    for r in _requests(50, seed=2):
        _observe(sa.view, r)
    _exchange("a", sa, log)
    assert len(_one(log).log) == 10 and _one(log).seq == 50
    reply = log.share("b", sb.report())
    assert reply.state is not None and not reply.samples  # 50 since B's cursor, 10 kept
    sb.apply(reply)
    _same(sb.view, sa.view)


def _other() -> TenantLengths:
    return TenantLengths(max_tenants=3, admit_after=2, memory=40.0, strength=6.0)


def test_replicas_of_other_settings_learn_as_one_among_themselves() -> None:
    """A rolling change of the ``online`` settings: replicas X and Y with the new ones share between themselves,
    A and B with the old ones between themselves, each pair as one ingress of its settings would learn. Before,
    the Controller merged the first settings it was sent and refused the others: X and Y each learned alone."""
    sa, sb, sx, sy, log = (SharedLengths(_lengths()), SharedLengths(_lengths()), SharedLengths(_other()),
                           SharedLengths(_other()), LengthLog("e1"))
    old, new = _lengths(), _other()
    reqs = _requests(200, seed=8)
    for k in range(0, 200, 20):
        for r in reqs[k:k + 10]:
            _observe(sa.view, r)
            _observe(old, r)
        for r in reqs[k + 10:k + 20]:
            _observe(sx.view, r)
            _observe(new, r)
        for name, shared in [("a", sa), ("x", sx), ("b", sb), ("y", sy)]:
            _exchange(name, shared, log)
        _same(sb.view, old)
        _same(sy.view, new)
    assert sy.view.observed == 100 and sy.epoch != sb.epoch
    assert [g.merged.observed for g in log.groups.values()] == [100, 100]
    sz = SharedLengths(_other())  # a new replica of the new settings starts from what X learned
    _exchange("z", sz, log)
    _same(sz.view, new)


def test_a_dropped_settings_group_is_re_seeded_by_its_replicas(caplog: pytest.LogCaptureFixture) -> None:
    """Past ``max_groups`` settings the least recently reported one's log is dropped (its replicas, if any, re-seed
    it as after a Controller restart): a replica of it keeps what it learned, sends what it learned meanwhile, and
    the other replicas of its settings, a new one too, get all of it."""
    sa, sb, log = SharedLengths(_lengths()), SharedLengths(_lengths()), LengthLog("e1", max_groups=2)
    reqs = _requests(40, seed=9)
    for r in reqs[:30]:
        _observe(sa.view, r)
    _exchange("a", sa, log)
    _exchange("b", sb, log)
    dropped = sb.epoch
    _exchange("x", SharedLengths(_other()), log)
    with caplog.at_level("WARNING", logger="scheduler.predict.shared"):
        _exchange("z", SharedLengths(TenantLengths()), log)  # a third settings: A and B's log dropped
    assert len(log.groups) == 2 and _lengths().settings() not in log.groups
    assert log.dropped == 1 and sum("dropped" in r.message for r in caplog.records) == 1
    for r in reqs[30:]:
        _observe(sb.view, r)
    _exchange("b", sb, log)  # asked to seed
    _exchange("b", sb, log)  # its base (A's 30) adopted, its 10 merged
    _exchange("a", sa, log)
    sc = SharedLengths(_lengths())
    _exchange("c", sc, log)
    one = _lengths()
    for r in reqs:
        _observe(one, r)
    group = log.groups[_lengths().settings()]
    assert group.epoch != dropped and group.merged.observed == 40
    for view in (sa.view, sb.view, sc.view):
        _same(view, one)


def test_a_restarted_controller_is_seeded_by_the_first_replica_that_reports() -> None:
    """The Controller keeps nothing across a restart: the first replica that reports with the old epoch sends its
    base, which becomes the merged state; another replica then gets it back (its own samples not merged yet on
    top), and a replica with no Controller yet starts from it."""
    sa, sb, old = SharedLengths(_lengths()), SharedLengths(_lengths()), LengthLog("e1")
    reqs = _requests(200, seed=3)
    for r in reqs[:100]:
        _observe(sa.view, r)
    _exchange("a", sa, old)
    _exchange("b", sb, old)
    learned = _one(old).merged.state()
    new = LengthLog("e2")
    for r in reqs[100:110]:
        _observe(sb.view, r)
    _exchange("a", sa, new)  # asked to seed: nothing changes yet
    assert sa._seed and _one(new).seq == 0 and not _one(new).learned
    _exchange("a", sa, new)  # its base adopted
    assert _one(new).learned and sa.epoch == _one(new).epoch
    _exchange("b", sb, new)
    one = _lengths()
    one.load_state(learned)
    for r in reqs[100:110]:
        _observe(one, r)
    _same(_one(new).merged, one)
    _same(sb.view, one)
    sc = SharedLengths(_lengths())
    _exchange("c", sc, new)
    _same(sc.view, one)


def test_a_long_journal_goes_in_bounded_reports_and_the_oldest_past_the_bound_are_not_shared() -> None:
    """While the Controller is away a replica keeps at most ``max_journal`` samples (its view keeps them all until
    the next exchange); back, it sends them ``max_report`` at a time, each merged once."""
    log = LengthLog("e1")
    sa = SharedLengths(_lengths(), max_journal=30, max_report=8)
    reqs = _requests(40, seed=5)
    for r in reqs:
        _observe(sa.view, r)
    assert sa.view.observed == 40
    sizes = []
    for _ in range(5):
        report = sa.report()
        sizes.append(len(report.samples))
        sa.apply(log.share("a", report))
    assert sizes == [8, 8, 8, 6, 0] and _one(log).seq == 30 and sa.view.journal == []
    one = _lengths()
    for r in reqs[10:]:
        _observe(one, r)
    _same(sa.view, one)
    _same(_one(log).merged, one)


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
    sa, sc, old = SharedLengths(_lengths()), SharedLengths(_lengths()), LengthLog("e1")
    reqs = _requests(120, seed=7)
    for r in reqs[:100]:
        _observe(sa.view, r)
    _exchange("a", sa, old)
    new = LengthLog("e2")
    _exchange("a", sa, new)  # asked to seed
    _exchange("c", sc, new)  # a new replica: the empty state
    _exchange("a", sa, new)  # A's base adopted
    for r in reqs[100:]:
        _observe(sa.view, r)
    _exchange("a", sa, new)
    _exchange("c", sc, new)
    one = _lengths()
    for r in reqs:
        _observe(one, r)
    _same(_one(new).merged, one)
    _same(sc.view, one)


def test_a_backlog_rebuilds_the_view_once_it_is_down_to_one_report(monkeypatch: pytest.MonkeyPatch) -> None:
    """Back from a Controller outage, a replica's journal goes ``max_report`` at a time; its view (replayed on the
    ingress's event loop, ~30 us a sample) is rebuilt once what is left fits one report, not on every exchange
    (before: 22 + 14 + 6 samples replayed for 30 here; 28k + 24k + ... ~130k, seconds of stalls, at the defaults),
    and ends as before."""
    log = LengthLog("e1")
    sa = SharedLengths(_lengths(), max_journal=30, max_report=8)
    reqs = _requests(40, seed=5)
    for r in reqs:
        _observe(sa.view, r)
    replayed: list[int] = []
    replay = TenantLengths.replay

    def counted(self: TenantLengths, samples: Any) -> None:
        samples = list(samples)
        if self is not sa.base and all(self is not g.merged for g in log.groups.values()):  # (a view rebuilt)
            replayed.append(len(samples))
        replay(self, samples)

    monkeypatch.setattr(TenantLengths, "replay", counted)
    for _ in range(5):
        _exchange("a", sa, log)
    assert replayed == [6, 0] and sa.view.journal == []
    one = _lengths()
    for r in reqs[10:]:
        _observe(one, r)
    _same(sa.view, one)


def test_a_prediction_during_a_rebuild_reads_the_old_view_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    """A slow predictor predicts in a worker thread while ``apply`` rebuilds the view on the event loop. Each step
    of the rebuild (every sample replayed) is a point where such a thread may read: it reads the view as it was
    before the exchange, whole -- its own tenant's history with the replica's unmerged samples -- and the rebuilt one
    after. Before, the view was rebuilt in place: from the merged state without the replica's samples (``chat``'s
    history gone: the shared one read) until the replay was done."""
    from scheduler.config.models import PolicySpec
    from scheduler.predict.serving import serving_predictor

    def predictor() -> Any:
        return serving_predictor(PolicySpec(name="trace", params={"online": {"max_tenants": 3, "strength": 5.0}}))

    a, b, log = predictor(), predictor(), LengthLog("e1")
    sa = SharedLengths(a.online, adopt=a.use_online)
    sb = SharedLengths(b.online, adopt=b.use_online)
    _exchange("a", sa, log)
    _exchange("b", sb, log)
    for k in range(40):
        a.observe(500 + k, 700, tenant="summarise")
    _exchange("a", sa, log)
    report = sb.report()
    for k in range(30):  # finished while B's report was on its way: not merged, in B's view only
        b.observe(500 + k, 12, tenant="chat")
    reply = log.share("b", report)
    before = b.predict_dist(None, 520, tenant="chat")
    seen: list[Any] = []
    observe = TenantLengths.observe

    def racing(self: TenantLengths, *args: Any, **kwargs: Any) -> None:
        seen.append(b.predict_dist(None, 520, tenant="chat"))  # (what a worker thread would read now)
        observe(self, *args, **kwargs)

    monkeypatch.setattr(TenantLengths, "observe", racing)
    sb.apply(reply)
    monkeypatch.setattr(TenantLengths, "observe", observe)
    assert len(seen) == 40 + 30  # A's samples onto the base, then B's onto the new view
    assert all(s == before for s in seen)
    assert b.online is sb.view and b.online.observed == 70 and b.online.history("chat").observed == 30
    after = b.predict_dist(None, 520, tenant="chat")
    assert after.point < 40 and after != predictor().predict_dist(None, 520, tenant="chat")


def test_an_ingress_with_other_settings_shares_with_its_settings_replicas() -> None:
    """An ingress whose ``online`` settings are not those of the replicas that reported first (a rolling change of
    them) shares every period with the replicas of its own settings: another one of them learns its requests.
    Before, the Controller refused it (it kept only the first settings, until it restarted) and it learned alone,
    its task still waking every plans period."""
    import asyncio

    from scheduler.config.load import load_config
    from scheduler.config.models import PolicySpec
    from scheduler.control.ingress import Ingress
    from scheduler.predict.serving import serving_predictor

    class Controller:  # the real Controller's ``share_lengths``, without Ray
        def __init__(self) -> None:
            self.lengths, self.reports = LengthLog("e1"), []
            self.share_lengths = self

        async def _share(self, ingress_id: str, report: Any) -> Any:
            self.reports.append(report)
            return self.lengths.share(ingress_id, pickle.loads(pickle.dumps(report)))

        def remote(self, ingress_id: str, report: Any) -> Any:
            return self._share(ingress_id, report)

    controller = Controller()
    first = SharedLengths(TenantLengths())  # another replica, the defaults: the settings reported first
    first.apply(controller.lengths.share("x", first.report()))
    predictor = serving_predictor(PolicySpec(name="trace", params={"online": {"strength": 6.0}}))
    ing = Ingress(load_config("default"), controller=controller, predictor=predictor)

    async def periods(n: int) -> None:
        for _ in range(n):
            await ing._share_lengths()

    asyncio.run(periods(1))  # (``Ingress._start``: before it serves anything)
    for _ in range(2):
        for k in range(50):
            predictor.observe(300 + k, 40, tenant="chat")
        asyncio.run(periods(5))
    assert [len(r.samples) for r in controller.reports] == [0, 50, 0, 0, 0, 0, 50, 0, 0, 0, 0]  # (before: [0])
    assert predictor.online.observed == 100 and predictor.online.journal == []
    peer = SharedLengths(predictor.online.fresh())  # a replica of the same settings, new
    peer.apply(controller.lengths.share("y", peer.report()))
    assert peer.view.history("chat").observed == 100 and first.view.observed == 0
    first.apply(controller.lengths.share("x", first.report()))
    assert first.view.observed == 0  # (the defaults' replicas learn none of them)


@pytest.mark.parametrize("online", [False, True])
def test_the_ingress_runs_the_sharing_task_only_with_online_histories(online: bool) -> None:
    """Without an online predictor there is nothing to share: the ingress still ran ``_share_lengths`` every plans
    period (0.25 s by default) to find that out. With one it exchanges with the Controller every period."""
    import asyncio

    from scheduler.config.load import load_config
    from scheduler.config.models import PolicySpec
    from scheduler.control.ingress import Ingress
    from scheduler.predict.serving import serving_predictor
    from tests.test_chaos import _Controller, _Handle

    class Controller(_Controller):  # members, reports and the real Controller's ``share_lengths``, without Ray
        def __init__(self) -> None:
            super().__init__({})
            self.lengths, self.shared = LengthLog("e1"), 0

        async def share_lengths(self, ingress_id: str, report: Any) -> Any:
            self.shared += 1
            return self.lengths.share(ingress_id, pickle.loads(pickle.dumps(report)))

    controller = Controller()
    predictor = serving_predictor(PolicySpec(name="trace", params={"online": True})) if online else None
    ing = Ingress(load_config("default"), _Handle(controller), plans_s=0.01, predictor=predictor)
    assert (ing.predictor is not None) is online
    calls = 0
    share = ing._share_lengths

    async def counted() -> None:
        nonlocal calls
        calls += 1
        await share()

    ing._share_lengths = counted  # type: ignore[method-assign]

    async def run() -> None:
        await ing.start()
        await asyncio.sleep(0.2)  # ~20 plans periods
        await ing.close()

    asyncio.run(run())
    if online:
        assert calls >= 5 and controller.shared == calls, (calls, controller.shared)
    else:
        assert calls == 0 and controller.shared == 0, calls


def test_a_controller_failing_the_exchange_is_said_once_until_it_works_again(caplog) -> None:
    """A Controller that answers ``share_lengths`` with an error (a bug there, not an outage) is logged once, not
    every 0.25 s period, and again after an exchange succeeded in between. Before, every error was swallowed: the
    replicas learned alone with nothing in the logs. A Controller away (timeout, dead) stays quiet."""
    import asyncio
    import logging

    from ray.exceptions import RayActorError, RayTaskError

    from scheduler.config.load import load_config
    from scheduler.config.models import PolicySpec
    from scheduler.control.ingress import Ingress
    from scheduler.predict.serving import serving_predictor

    class Controller:
        def __init__(self) -> None:
            self.lengths, self.fail = LengthLog("e1"), True
            self.share_lengths = self

        async def _share(self, ingress_id: str, report: Any) -> Any:
            if self.fail == "away":
                raise RayActorError()
            if self.fail:
                raise RayTaskError("share_lengths", "Traceback ...", KeyError("epoch"))
            return self.lengths.share(ingress_id, pickle.loads(pickle.dumps(report)))

        def remote(self, ingress_id: str, report: Any) -> Any:
            return self._share(ingress_id, report)

    controller = Controller()
    predictor = serving_predictor(PolicySpec(name="trace", params={"online": True}))
    ing = Ingress(load_config("default"), controller=controller, predictor=predictor)

    def periods(n: int) -> list[str]:
        caplog.clear()
        for _ in range(n):
            asyncio.run(ing._share_lengths())
        return [r.getMessage() for r in caplog.records if "sharing length histories" in r.getMessage()]

    with caplog.at_level(logging.INFO, logger="scheduler.control.ingress"):
        said = periods(5)
        assert len(said) == 1 and "failed on the Controller" in said[0] and "KeyError('epoch')" in said[0]
        controller.fail = False
        assert periods(2) == [f"ingress {ing.ingress_id}: sharing length histories works again"]
        controller.fail = True
        assert len(periods(3)) == 1
        controller.fail = "away"  # dead or restarting: an outage, quiet (its next exchange catches up)
        assert periods(3) == [] and ing._share_failing
