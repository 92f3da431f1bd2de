"""The Ingress's cluster view (``IngressView``, a mixin of ``Ingress``): membership from the Controller, every
instance's snapshot polled directly (``_refresh_view``), the request registry reported to the Controller
(``_report``), and ``view()``: the cached snapshots plus what this replica routed since (its pending bookings and
the P->D decodes on their way), which is what the router reads."""

from __future__ import annotations

import asyncio
import dataclasses
import re
import time

from ray.exceptions import RayTaskError

from scheduler.config.models import UNHEALTHY_AFTER_S
from scheduler.control.controller import Member, actor_gone, ask_each
from scheduler.control.instance_lost import _DEAD, _FAILED
from scheduler.control.util import _await
from scheduler.core.types import ClusterView, InstanceRole, InstanceSnapshot, with_bookings


class IngressView:
    """``Ingress``'s view methods. A mixin: the bookings they keep (``_pending*``, ``_incoming``, ``_expected``) are
    written by the hot path's routing and read by the router, all set up in ``Ingress.__init__``."""

    async def _refresh_members(self) -> None:
        try:
            members: dict[str, Member] = await asyncio.wait_for(_await(self.controller.members.remote()), 2.0)
            self.controller_ok = True
        except (TimeoutError, *_DEAD, RayTaskError):
            # NOTE: Controller down or restarting: keep routing on the membership we have (Llumnix degrades
            # the same way); instance crashes are still seen by the snapshot poll.
            self.controller_ok = False
            return
        self._members = {i: m for i, m in members.items() if m.info.incarnation not in self._dead}
        live = {m.info.incarnation for m in self._members.values()}
        for inc in [k for k in self._channels if k not in live]:
            self._channels.pop(inc).close()
        for state in (self._channel_down, self._channel_fails):  # back-off of incarnations that are gone
            for inc in [k for k in state if k not in live]:
                del state[inc]

    async def _refresh_view(self) -> None:
        items = list(self._members.items())
        # Only what was routed before the snapshots were asked for is in them: requests routed while they are in
        # flight stay counted (clearing all of _pending after the await dropped a burst from the view).
        taken, taken_prompt, taken_compute = dict(self._pending), dict(self._pending_prompt), dict(self._pending_compute)
        self._bookings_taken += 1  # bookings made before this point are the snapshots' to show from now on
        results = await ask_each(items, lambda iid, m: self._call(iid, m.handle, "snapshot"), self._probes, 1.0)
        snaps: dict[str, InstanceSnapshot] = {}
        now = time.time()
        last_ok = self.__dict__.setdefault("_last_ok", {})
        for (iid, m), res in zip(items, results):
            if isinstance(res, InstanceSnapshot):
                snaps[iid] = res
                last_ok[iid] = now
            elif actor_gone(res):
                self._mark_dead(iid)
            elif isinstance(res, _FAILED):
                # It answered that it cannot report its load (its engine failed): not a slow instance whose last
                # snapshot stands for a while -- kept, it drew requests for 10 s. Out until it reports again.
                continue
            elif iid in self._snapshots:
                # A slow answer is not a dead instance: a busy engine on a loaded host answers late. Keep the last
                # snapshot; only an instance silent for ``unhealthy_after_s`` stops receiving new requests. Nor is a
                # timeout a recovery: one whose last answer said unhealthy (hung: ``Instance.snapshot``) stays so.
                last = self._snapshots[iid]
                stale = now - last_ok.get(iid, now) > UNHEALTHY_AFTER_S
                snaps[iid] = dataclasses.replace(last, healthy=last.healthy and not stale)
        self._snapshots = snaps
        for pending, took in ((self._pending, taken), (self._pending_prompt, taken_prompt),
                              (self._pending_compute, taken_compute)):
            for iid, n in took.items():
                left = pending.get(iid, 0) - n
                if left > 0:
                    pending[iid] = left
                else:
                    pending.pop(iid, None)
        # Numbered as the simulator orders them (mixed-2 before mixed-10): argmin routers break ties in view order.
        self._view = ClusterView(time.time(), tuple(snaps[i] for i in sorted(snaps, key=_numbered)))
        self.view_refreshed_s = time.time()
        self.recorder.observe_instances(self._view.instances)

    def _mark_dead(self, iid: str) -> None:
        self.recorder.forget_instance(iid)
        m = self._members.pop(iid, None)
        if m is not None:
            self._dead.add(m.info.incarnation)
            ch = self._channels.pop(m.info.incarnation, None)
            if ch is not None:
                ch.close()
        self._hide(iid)

    def _hide(self, iid: str) -> None:
        """Out of the view until a snapshot of it arrives again (never, once it is marked dead)."""
        self._snapshots.pop(iid, None)
        self._view = ClusterView(self._view.time_s, tuple(s for s in self._view.instances if s.instance_id != iid))

    def _mark_draining(self, iid: str, *, leaving: bool = False) -> None:
        """``iid`` refused a request as draining: shown so in this view until its next snapshot (which says so by
        then), so that the routers skip it for the requests that come meanwhile. ``leaving``: it said it leaves
        (it refuses a handoff's KV too): shown leaving, so that a handoff paired with it before picks another
        decoder instead of paying one more refusal (``Ingress._leaving``)."""
        s = self._snapshots.get(iid)
        if s is None or (s.draining and (s.leaving or not leaving)):
            return
        self._show(dataclasses.replace(s, draining=True, leaving=s.leaving or leaving))

    def _mark_role(self, iid: str, role: InstanceRole) -> None:
        """``iid`` refused a leg as serving ``role`` now (its switch finished after this view's snapshot of it):
        shown so until its next snapshot, so that the routers read its new role meanwhile."""
        s = self._snapshots.get(iid)
        if s is None or s.role is role:
            return
        self._show(dataclasses.replace(s, role=role))

    def _show(self, snap: InstanceSnapshot) -> None:
        """``snap`` in place of its instance's snapshot in this view (the next refresh replaces it)."""
        iid = snap.instance_id
        self._snapshots[iid] = snap
        self._view = ClusterView(self._view.time_s, tuple(snap if x.instance_id == iid else x for x in self._view.instances))

    async def _report(self) -> None:
        """Send the registry delta to the Controller (full set after it restarted). One at a time (from the report
        loop, and before each plans poll): two deltas in flight could be applied out of order."""
        if getattr(self.controller, "report_requests", None) is None:
            return  # (no Controller to report to)
        async with self._report_lock:
            await self._report_delta()

    async def _report_delta(self) -> None:
        full = self._controller_epoch is None
        upserts, removed = self.registry.take_delta(self.ingress_id, full=full)
        if not full and not upserts and not removed:
            return
        # A P->D request on its way to its decoder names that one too, "(prefill, decode) during a handoff": its
        # snapshots cannot show it until the KV lands, and a drain (scale-down, role switch) judged the decoder idle
        # and released it under the request (a recovery then re-ran the prefill). The simulator waits for it
        # (``Simulator.is_empty``). Every change of ``_expected`` comes with a registry touch (route, attempt, end).
        upserts = [
            dataclasses.replace(e, instances=e.instances + (d,))
            if (d := self._expected.get(e.request_id)) is not None and d not in e.instances else e
            for e in upserts
        ]
        try:
            epoch = await asyncio.wait_for(
                _await(self.controller.report_requests.remote(self.ingress_id, upserts, removed, full)), 2.0
            )
        except (TimeoutError, *_DEAD, RayTaskError):
            self._controller_epoch = None  # resend everything once it is back
            return
        if self._controller_epoch is not None and epoch != self._controller_epoch:
            self._controller_epoch = None  # it restarted between reports: next report is full
        else:
            self._controller_epoch = epoch

    def view(self) -> ClusterView:
        """The cached view with requests routed since the last refresh (their prompts as queued prompt tokens), and
        P->D requests on their way to a decode instance, added as waiting there (so bursts spread out)."""
        if not self._pending and not self._incoming:
            return self._view
        extra = dict(self._pending)
        for iid, n in self._incoming.items():
            extra[iid] = extra.get(iid, 0) + n
        counts = {iid: (n, self._incoming.get(iid, 0), self._pending_prompt.get(iid, 0),
                        self._pending_compute.get(iid, 0)) for iid, n in extra.items()}
        out, self._adjusted = with_bookings(self._view.instances, counts, self._adjusted)
        return ClusterView(self._view.time_s, out)

    def _expect_decode(self, rid: str, iid: str | None, *, landed: int = 0, loaded: int = 0) -> None:
        """``rid`` is now on its way to decode instance ``iid`` (``None``: to none). ``landed``: it reached the one
        it was going to with a context of that many tokens, ``loaded`` of them with their KV, whose snapshots show
        it from the next refresh on (counted as routed until then: waiting, its context queued and the rest to
        compute, as an engine and the simulator count it)."""
        old = self._expected.pop(rid, None)
        if old is not None:
            n = self._incoming.get(old, 0) - 1
            if n > 0:
                self._incoming[old] = n
            else:
                self._incoming.pop(old, None)
            if landed:
                self._pending[old] = self._pending.get(old, 0) + 1
                self._pending_prompt[old] = self._pending_prompt.get(old, 0) + landed
                self._pending_compute[old] = self._pending_compute.get(old, 0) + landed - loaded
        if iid is not None:
            self._expected[rid] = iid
            self._incoming[iid] = self._incoming.get(iid, 0) + 1


def _numbered(iid: str) -> tuple[str | int, ...]:
    """Sort key reading the numbers in an instance id as numbers (``re.split`` alternates text and digits, so
    two keys compare position by position like with like)."""
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", iid))
