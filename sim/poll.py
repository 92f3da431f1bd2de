"""The live ingress's poll-round view of the instances, on the simulator's clock (opt-in:
``Simulator(ingress_poll_s=...)``, ``llmsched simulate --ingress-poll-s``).

Live (``scheduler/control/ingress_view.py``), the ingress routes on snapshots it polls in rounds::

    ask every member ---- each answers when its step in flight returns ---- last answer: publish all ---- sleep
    (bookings so far                                                         (bookings taken at the ask    refresh_s,
     taken)                                                                   leave the count)              ask again

and between rounds the router reads the published snapshots plus what the ingress routed since the round it
published was asked (each request as one waiting there, its prompt as queued prompt tokens, those not cached to
compute) and the P->D requests on their way to a decoder. A round waits ``timeout_s`` at most; an instance
that has not answered by then keeps its last snapshot. By default the simulator's routers see every instance as of
its last step's end (``Simulator._view_at``): no round, no lag.

The simulator drives the rounds (``Simulator._poll_ask`` / ``_poll_answer``); this class is the ingress's side.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import TYPE_CHECKING

from scheduler.core.prefix import cached_prefix_tokens
from scheduler.core.types import ClusterView, Counts, InstanceRole, InstanceSnapshot, with_bookings

if TYPE_CHECKING:
    from sim.cluster import SimInstance

POLL_TIMEOUT_S = 1.0  # the live round's bound on an answer (``ask_each(..., 1.0)`` in ``IngressView._refresh_view``)

_Booking = tuple[int, int, int]  # requests, their prompt tokens, of those to compute


class IngressPoll:
    """The ingress's cached view: the last published round's snapshots and its bookings since that round's ask.

    Args:
        period_s: the pause between a round's publication and the next ask (the ingress's ``refresh_s``, in the
            simulator's seconds: wall seconds / the engines' time scale).
        timeout_s: how long a round waits for its slowest answer.
    """

    def __init__(self, period_s: float, *, timeout_s: float = POLL_TIMEOUT_S) -> None:
        if not period_s > 0:
            raise ValueError(f"ingress_poll_s: must be > 0 (seconds between poll rounds), got {period_s!r}")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s: must be > 0, got {timeout_s!r}")
        self.period_s = period_s
        self.timeout_s = timeout_s
        self.rounds = 0  # rounds asked; the open one's number while ``waiting`` is not empty
        self.time_s = 0.0  # when the published snapshots were published (the view's time, as live)
        self.snapshots: dict[str, InstanceSnapshot] = {}
        self.pending: dict[str, _Booking] = {}
        self.waiting: set[str] = set()  # instances the open round waits for
        self._taken: dict[str, _Booking] = {}
        self._answers: dict[str, InstanceSnapshot] = {}
        self._adjusted: dict[str, tuple[InstanceSnapshot, Counts, InstanceSnapshot]] = {}

    def book(self, iid: str, prompt: int, *, compute: int | None = None, hash_ids: tuple = (),
             hash_block_tokens: int | None = None) -> None:
        """A request dispatched to ``iid`` with ``prompt`` tokens: counted there until a round asked after it
        publishes. ``compute``: the tokens it computes there (default: the prompt less the prefix the published
        snapshot's cache holds, as ``Ingress._route`` counts it)."""
        if compute is None:
            compute = prompt
            snap = self.snapshots.get(iid)
            if snap is not None and hash_ids and snap.cached_hash_ids:
                kw = {} if hash_block_tokens is None else {"block_tokens": hash_block_tokens}
                compute -= cached_prefix_tokens(hash_ids, snap.cached_hash_ids, prompt, kv_block=snap.block_size, **kw)
        n, p, c = self.pending.get(iid, (0, 0, 0))
        self.pending[iid] = (n + 1, p + prompt, c + compute)

    def mark_draining(self, iid: str) -> None:
        """``iid`` refused a request as draining: shown so until a round's answer replaces its snapshot, as
        ``IngressView._mark_draining`` shows it live (the routers skip it meanwhile)."""
        s = self.snapshots.get(iid)
        if s is not None and not s.draining:
            self.snapshots[iid] = dataclasses.replace(s, draining=True)

    def mark_role(self, iid: str, role: InstanceRole) -> None:
        """``iid`` refused a request routed for the role this view showed (its role switch finished since): shown in
        its new role until a round's answer replaces its snapshot, as ``IngressView._mark_role`` shows it live."""
        s = self.snapshots.get(iid)
        if s is not None and s.role is not role:
            self.snapshots[iid] = dataclasses.replace(s, role=role)

    def role_changed(self, iid: str, role: InstanceRole) -> bool:
        """Whether ``iid``, serving as ``role``, refuses a request routed on this view: its published snapshot shows
        another role (``Instance.submit``'s ``view_role``)."""
        s = self.snapshots.get(iid)
        return s is not None and s.role is not role

    def ask(self, ids: Iterable[str]) -> None:
        """A round starts: the bookings so far are the answers' to show from its publication on."""
        self.rounds += 1
        self._taken = dict(self.pending)
        self.waiting = set(ids)
        self._answers = {}

    def answer(self, iid: str, snap: InstanceSnapshot) -> bool:
        """``iid``'s answer to the open round; True when it was the last one awaited."""
        if iid not in self.waiting:
            return False
        self.waiting.discard(iid)
        self._answers[iid] = snap
        return not self.waiting

    def publish(self, now: float) -> None:
        """The open round ends: its answers replace the snapshots (an instance that did not answer keeps its last;
        one neither answered nor known stays out), and the bookings taken at its ask leave the count."""
        self.snapshots.update(self._answers)
        for iid, (n, p, c) in self._taken.items():
            left = self.pending.get(iid, (0, 0, 0))
            left = (left[0] - n, left[1] - p, left[2] - c)
            if left[0] > 0:
                self.pending[iid] = left
            else:
                self.pending.pop(iid, None)
        self._taken, self._answers, self.waiting = {}, {}, set()
        self.time_s = now

    def view(self, live: Iterable[SimInstance]) -> ClusterView:
        """What the router reads: the published snapshot of each live instance (one not polled yet is not routable),
        plus the bookings since and the P->D requests on their way there (``SimInstance.incoming``, which the
        ingress knows as it dispatched them). An instance whose counts did not change keeps its adjusted snapshot
        object, as ``IngressView.view`` does (routers keep per-snapshot terms)."""
        snaps, counts = [], {}
        for x in live:
            s = self.snapshots.get(x.instance_id)
            if s is None:
                continue
            snaps.append(s)
            n, prompt, compute = self.pending.get(x.instance_id, (0, 0, 0))
            if n or x.incoming:
                counts[x.instance_id] = (n + x.incoming, x.incoming, prompt, compute)
        out, self._adjusted = with_bookings(snaps, counts, self._adjusted)
        return ClusterView(self.time_s, out)
