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


class LengthLog:
    """The Controller's side: one merged ``TenantLengths`` (the settings of the first report) and the log of the
    samples merged into it. Memory: the merged tables (as one ingress's), ``MAX_LOG`` samples, ``MAX_REPLICAS``
    counters."""

    def __init__(self, epoch: str, *, max_log: int = MAX_LOG, max_replicas: int = MAX_REPLICAS) -> None:
        self.epoch = epoch
        self.merged: TenantLengths | None = None
        self.log: deque[Sample] = deque(maxlen=max_log)
        self.seq = 0  # samples merged since this Controller started (the log holds the last ``len(log)``)
        self.learned = False  # anything merged or adopted: a restarted Controller asks to be seeded until then
        self._acked: OrderedDict[str, int] = OrderedDict()
        self._max_replicas = max_replicas
        self.refused = 0  # reports with other settings than the merged ones (their replica learns alone)

    def share(self, replica: str, report: LengthReport) -> LengthReply | None:
        """Merges ``report``'s new samples; the reply brings ``replica``'s base up to date. None: its settings are
        not the merged ones (it keeps learning alone)."""
        if self.merged is None:
            self.merged = TenantLengths.from_settings(report.settings)
        elif tuple(report.settings) != self.merged.settings():
            if not self.refused:
                log.warning("online lengths: replica %s has other settings than the merged ones (%s vs %s); it learns"
                            " alone", replica, report.settings, self.merged.settings())
            self.refused += 1
            return None
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
        self.refused = False  # the Controller merges other settings: this replica learns alone (``apply``)

    def report(self) -> LengthReport:
        journal = self.view.journal
        if self.refused or journal is None:
            raise RuntimeError("SharedLengths.report: the Controller refused this replica's settings; it learns alone")
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

    def apply(self, reply: LengthReply | None) -> None:
        """Brings the base up to the Controller's and rebuilds the view on it (the journal less what was merged).
        ``None``: the Controller refused the report (it merges other ``online`` settings, the first it was sent, for
        as long as it runs): this replica stops sharing and learns alone (``refused``; its journal dropped), rather
        than resend up to ``max_report`` samples every period for nothing."""
        if reply is None:
            if not self.refused:
                log.warning("online lengths: the Controller merges other settings than this replica's %s; it learns"
                            " alone from now on (restart it with the cluster's settings to share)",
                            self.view.settings())
            self.refused = True
            self.view.journal = None
            return
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


__all__ = ["MAX_JOURNAL", "MAX_LOG", "MAX_REPORT", "LengthLog", "LengthReply", "LengthReport", "SharedLengths"]
