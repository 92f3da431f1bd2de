"""Online length learning shared by the ingress replicas through the Controller: the cluster learns once.

Each replica's ``TenantLengths`` (``ServingPredictor.online``) journals the requests it learns (``Sample``: lengths,
cut, the prior a cut one was spread by, history key). Every plans period (``Ingress._share_lengths``) the replica
sends the samples not merged yet; the Controller (``LengthLog``) learns them into its merged histories in arrival
order, appends them to a log, and answers with the log since the replica's cursor (or, to a new replica or one
behind the log, its merged state)::

    replica A: observe -> view (what it predicts from) + journal --report(first, samples, cursor)--> LengthLog
                                                                                             merged += samples
    replica A <--reply(acked, log since A's cursor | merged state)-- log.append(samples)
              base += reply ; view = base + journal (the samples not acked yet)

Every replica replays the same samples in the same order (the Controller's), so its ``base`` is the Controller's
merged state, bit for bit, as of its cursor; its view adds its own samples the Controller has not acknowledged
(kept until ``acked`` passes them; a report whose reply was lost is sent again and merged once: ``acked`` per
replica). One replica alone predicts exactly as without sharing: its samples come back in its own order.

The merged state is what one ingress that saw all the traffic in the Controller's merge order would hold: the
requests of one report period of different replicas are ordered by report, not by when they finished, which moves
only how much each weighs once a row is past ``memory`` (decay: at most a period's worth of requests apart) and
the TinyLFU sketch's halving point by as much; a cut request is spread by the merged posterior at merge time (its
own replica spread it by its local one until then). A Controller restart empties the log: the first replica that
reports with a cursor of the old Controller's seeds the new one with its base (``LengthReply.seed``), and the log
takes a new epoch (a replica answered before, the empty state, then gets the merged one); samples the other
replicas had merged after that replica's cursor are lost (at most one period's).

Replicas with other ``online`` settings (a rolling change of them) cannot share histories (one's samples and state
mean something else in the other's tables): the Controller keeps one log per settings (``SettingsLog``, its own
epoch), and each settings' replicas learn as one among themselves; the old settings' log is dropped once
``MAX_GROUPS`` newer ones are in use (a replica of it still running re-seeds it, as after a restart).
"""

from __future__ import annotations

import itertools
import logging
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from scheduler.predict.online import Sample, TenantLengths

log = logging.getLogger(__name__)

# The log the Controller keeps for replicas that fell behind (more than this since their cursor: the full state,
# 70-180 KB at the default 64 tenants, instead); ~100 bytes a sample held.
MAX_LOG = 8192
# Samples a replica keeps unacknowledged while the Controller is away (the oldest past this are not shared).
MAX_JOURNAL = 32768
MAX_REPLICAS = 256  # replicas whose acknowledged count the Controller keeps (the least recent forgotten)
MAX_REPORT = 4096  # samples in one report (a journal that grew while the Controller was away goes in several)
# ``online`` settings the Controller merges apart at once (a rolling change of them makes two; ~1 MB each at most).
MAX_GROUPS = 8


@dataclass(frozen=True, slots=True)
class LengthReport:
    """What a replica sends each period. ``first``: its own number of ``samples[0]`` (numbers count its samples
    since it started); ``epoch``/``cursor``: the Controller incarnation and log position its base is at (None/0:
    none yet); ``state``: its base, sent only when the Controller asked to be seeded."""

    settings: tuple[Any, ...]
    epoch: str | None
    cursor: int
    first: int
    samples: tuple[Sample, ...]
    state: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class LengthReply:
    """The Controller's answer: the replica's samples numbered below ``acked`` are merged; its base becomes
    ``state`` (when given) plus ``samples``, at log position ``start + len(samples)`` of ``epoch``. ``seed``: this
    Controller restarted with nothing learned; send your base."""

    epoch: str
    acked: int
    start: int
    samples: tuple[Sample, ...] = ()
    state: dict[str, Any] | None = None
    seed: bool = False


class SettingsLog:
    """The merged ``TenantLengths`` of the replicas with one ``online`` settings, and the log of the samples merged
    into it. Memory: the merged tables (as one ingress's), ``MAX_LOG`` samples, ``MAX_REPLICAS`` counters."""

    def __init__(self, merged: TenantLengths, epoch: str, *, max_log: int = MAX_LOG,
                 max_replicas: int = MAX_REPLICAS) -> None:
        self.epoch = epoch
        self.merged = merged
        self.log: deque[Sample] = deque(maxlen=max_log)
        self.seq = 0  # samples merged since this log started (it holds the last ``len(log)``)
        self.learned = False  # anything merged or adopted: a new log asks to be seeded until then
        self._acked: OrderedDict[str, int] = OrderedDict()
        self._max_replicas = max_replicas

    def share(self, replica: str, report: LengthReport) -> LengthReply:
        """Merges ``report``'s new samples; the reply brings ``replica``'s base up to date."""
        cursor = report.cursor if report.epoch == self.epoch else None
        if report.epoch is not None and cursor is None and not self.learned:
            # Restarted: the replica's base is what the cluster learned before; adopted, it is this log's start.
            if report.state is None:
                return LengthReply(self.epoch, report.first, self.seq, seed=True)
            self.merged.load_state(report.state)
            # A base handed out before (a new replica's: the empty state) is not this one plus the log: a new
            # epoch sends those replicas the merged state.
            self.epoch += "+seed"
            cursor = self.seq
        acked = self._acked.pop(replica, report.first)
        new = report.samples[max(0, acked - report.first):]  # (those below ``acked`` were merged: a lost reply)
        self._acked[replica] = max(acked, report.first + len(report.samples))
        if len(self._acked) > self._max_replicas:
            self._acked.popitem(last=False)
        self.merged.replay(new)
        self.log.extend(new)
        self.seq += len(new)
        self.learned = self.learned or bool(new) or report.state is not None
        start = self.seq - len(self.log)
        if cursor is not None and start <= cursor <= self.seq:
            return LengthReply(self.epoch, self._acked[replica], cursor,
                               tuple(itertools.islice(self.log, cursor - start, None)))
        return LengthReply(self.epoch, self._acked[replica], self.seq, state=self.merged.state())


class LengthLog:
    """The Controller's side: one ``SettingsLog`` per ``online`` settings reported, so the replicas of each
    settings learn as one among themselves (a rolling change of the settings: the new replicas share from the
    first, the old ones go on with theirs). At most ``max_groups`` (the least recently reported dropped past it)."""

    def __init__(self, epoch: str, *, max_log: int = MAX_LOG, max_replicas: int = MAX_REPLICAS,
                 max_groups: int = MAX_GROUPS) -> None:
        self.epoch = epoch
        self.groups: OrderedDict[tuple[Any, ...], SettingsLog] = OrderedDict()  # least recently reported first
        self._made = 0
        self.dropped = 0  # settings logs dropped for a newer settings (past ``max_groups``)
        self._max_log, self._max_replicas, self._max_groups = max_log, max_replicas, max_groups

    def share(self, replica: str, report: LengthReport) -> LengthReply:
        """Merges ``report``'s new samples into its settings' histories; the reply brings ``replica``'s base up to
        date."""
        key = tuple(report.settings)
        group = self.groups.pop(key, None)
        if group is None:
            if len(self.groups) >= self._max_groups:
                # NOTE: a replica of the dropped group that still runs re-seeds it at its next report, as after a
                # Controller restart (its own epoch: ``_made`` never repeats, so the old epoch matches no group).
                old, _ = self.groups.popitem(last=False)
                self.dropped += 1
                if self.dropped & (self.dropped - 1) == 0:  # (1st, 2nd, 4th, ...: more than max_groups live churn)
                    log.warning("online lengths: more than %d online settings reported; the least recently reported"
                                " one's log dropped (%s; %d dropped so far)", self._max_groups, old, self.dropped)
            elif self.groups:
                log.info("online lengths: replica %s has other settings than the others (%s); the replicas of each"
                         " settings learn as one among themselves", replica, key)
            # Its own epoch: a replica's cursor means a position in its group's log only (the first: the
            # Controller's, so one settings' exchange is byte for byte what it was with one log).
            epoch = f"{self.epoch}/{self._made}" if self._made else self.epoch
            group = SettingsLog(TenantLengths.from_settings(key), epoch, max_log=self._max_log,
                                max_replicas=self._max_replicas)
            self._made += 1
        self.groups[key] = group
        return group.share(replica, report)


class SharedLengths:
    """A replica's side: ``view`` is the ``TenantLengths`` its predictor reads and learns into (journaled);
    ``base`` the Controller's merged state as of ``cursor``. Invariant: view == base + the journal, replayed
    (but while a backlog of more than one report goes: ``apply``).

    ``apply`` rebuilds the view as a new object and swaps it in (``view``, and the predictor's reference through
    ``adopt``, e.g. ``ServingPredictor.use_online``): a slow predictor predicts in a worker thread
    (``Ingress._predict``), and a view rebuilt in place read the merged state without the replica's own samples, or
    the shared history for a tenant's, until the replay was done. Hold ``view`` afresh after an ``apply``."""

    def __init__(self, view: TenantLengths, *, adopt: Callable[[TenantLengths], None] | None = None,
                 max_journal: int = MAX_JOURNAL, max_report: int = MAX_REPORT) -> None:
        self.view = view
        self._adopt = adopt
        self.base = view.fresh()
        view.journal = []
        self.epoch: str | None = None
        self.cursor = 0
        self.first = 0  # the number of ``view.journal[0]``
        self.max_journal, self.max_report = max_journal, max_report
        self._seed = False
        self._stale = False  # the base moved since the view was rebuilt on it

    def report(self) -> LengthReport:
        journal = self.view.journal
        assert journal is not None
        if len(journal) > self.max_journal:  # the Controller away for long: the oldest are not shared
            over = len(journal) - self.max_journal
            del journal[:over]
            self.first += over
        # One string object per tenant name: pickled once, the other samples of the report refer to it (each
        # request brought its own copy of the name).
        names: dict[str, str] = {}
        samples = tuple(x if x.tenant is None else x._replace(tenant=names.setdefault(x.tenant, x.tenant))
                        for x in journal[:self.max_report])
        return LengthReport(self.view.settings(), self.epoch, self.cursor, self.first, samples,
                            self.base.state() if self._seed else None)

    def apply(self, reply: LengthReply) -> None:
        """Brings the base up to the Controller's and rebuilds the view on it (the journal less what was merged)."""
        self._seed = reply.seed
        if reply.seed:
            return
        journal = self.view.journal
        assert journal is not None
        del journal[:max(0, reply.acked - self.first)]
        self.first = max(self.first, reply.acked)
        if reply.state is not None:
            self.base.load_state(reply.state)
        self.base.replay(reply.samples)
        self.epoch, self.cursor = reply.epoch, reply.start + len(reply.samples)
        self._stale = self._stale or reply.state is not None or bool(reply.samples)
        # Not while a backlog (the Controller was away) goes ``max_report`` at a time: each rebuild replays the
        # whole journal on the ingress's event loop (~30 us a sample); the view holds it all meanwhile.
        if not self._stale or len(journal) > self.max_report:
            return
        self._stale = False
        # Built aside and swapped in by one reference assignment (atomic under the GIL): a prediction in a worker
        # thread reads the old view or the new one, each whole. Observe runs on the event loop, as this does, so
        # nothing learns into the old view once it is swapped out.
        view = self.base.fresh()
        view.load_state(self.base.state())
        view.replay(journal)
        view.journal = journal
        self.view = view
        if self._adopt is not None:
            self._adopt(view)


__all__ = ["MAX_GROUPS", "MAX_JOURNAL", "MAX_LOG", "MAX_REPORT", "LengthLog", "LengthReply", "LengthReport",
           "SettingsLog", "SharedLengths"]
