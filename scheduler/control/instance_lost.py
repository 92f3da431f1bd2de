"""Why the instance serving a stream is gone for it: the ``InstanceLost`` family the ingress's attempt loop raises
and reads (recover elsewhere, keep or drop the instance, count toward the query-of-death quarantine)."""

from __future__ import annotations

from ray.exceptions import ActorUnavailableError, RayActorError, RayTaskError

from scheduler.control.channel import RemoteError
from scheduler.control.controller import actor_gone
from scheduler.core.types import InstanceRole

# Ray could not reach the instance's actor: it died, or is unavailable (for now).
_DEAD = (RayActorError, ActorUnavailableError)
# The call raised on the instance (over Ray, or over the direct channel): the actor lives, what it runs failed.
_FAILED = (RayTaskError, RemoteError)


class InstanceLost(Exception):
    """The instance serving a stream is gone for it: released with it (a scale-down, drain or admin release), or not
    a live member here any more. Its subclasses say why otherwise."""


class InstanceReleased(InstanceLost):
    """The instance ended the stream ``released``: its shutdown began with the request on it (a scale-down, a drain
    that could not move it, an admin release). No failure of the instance: not counted by the quarantine."""


class InstanceDied(InstanceLost):
    """Ray confirmed the instance's actor dead (a kill, a node lost, a request that crashed or blocked it)."""


class RequestLost(InstanceLost):
    """The instance answers but no longer knows the request (``poll`` returned ``None``): recover the request, and
    keep routing to the instance -- a dead actor raises ``RayActorError`` instead."""


class InstanceUnresponsive(InstanceLost):
    """The instance did not answer (a poll timed out, Ray reports it temporarily unavailable): recover the request
    elsewhere and stop it there, but keep the instance -- the view routes around it while its snapshots fail, and it
    is marked dead once Ray confirms it died. (Marked dead at once, a live instance was never used again here.)"""


class EngineFailed(InstanceUnresponsive):
    """The instance answers, but its engine failed: a request's submit raised there (it was a gRPC INTERNAL), or a
    stream ended ``ENGINE_FAILED`` (it was FAILED): recover the request elsewhere, as for an instance that does not
    answer."""


class InstanceDraining(Exception):
    """The instance refused a new request: it drains (``Instance.submit``; the router that picked it read an older
    view). Nothing ran there: the request is routed again without it -- not a recovery, nor a failure of the
    instance (``max_recoveries``, the quarantine). ``leaving``: it refuses a handoff's KV too (``Submitted.leaving``).
    """

    def __init__(self, message: str, *, leaving: bool = False) -> None:
        super().__init__(message)
        self.leaving = leaving


class RoleChanged(InstanceDraining):
    """The instance refused a leg routed for the role the view showed: its role switch finished since that view
    (``Instance.submit``'s ``view_role``). Routed around as a drain refusal is; ``role`` is its role now, which the
    view shows from then on."""

    def __init__(self, message: str, *, role: InstanceRole) -> None:
        super().__init__(message)
        self.role = role


class HandoffLost(Exception):
    """A P->D handoff's decoder was lost before its first token: it died or did not answer during the submit with the
    KV, or after it (its poll failed, its engine failed: ``lost``), or was no live member here any more (``reached``
    false: nothing was sent). No token came from it, so the stream is where the prefill left it; and the KV is intact
    (the object store holds it for the ingress, its caller and owner, whatever becomes of its source): it goes to
    another decoder, as a draining decoder's refusal's does -- not a recovery (``max_recoveries``), nothing
    recomputed. A decoder the submit reached counts toward the quarantine (its death may be this request's doing)."""

    def __init__(self, lost: InstanceLost, *, reached: bool = True) -> None:
        super().__init__(str(lost))
        self.lost, self.reached = lost, reached


def _lost(iid: str, e: BaseException) -> InstanceLost:
    """The ``InstanceLost`` for Ray's error ``e`` (or a timeout) on a call to ``iid``."""
    cls = InstanceDied if actor_gone(e) else InstanceUnresponsive
    return cls(f"{iid}: {type(e).__name__}")


# The instance failed while the request ran there (it died, stopped answering, or its engine failed): evidence for
# the query-of-death quarantine (``Ingress.quarantine_after``). A request that blocks its instance's event loop ends
# as a timeout and then an actor death, never as an engine failure: counted only for those, it took out every
# instance in turn. Not a release (scale-down, drain, admin) nor a request the instance forgot (``RequestLost``).
_FAILED_UNDER = (InstanceDied, InstanceUnresponsive)
