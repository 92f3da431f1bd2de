"""The Ingress's admin side (``IngressAdmin``, a mixin of ``Ingress``): ``drain`` (migrate an instance's requests
off it, then release it), ``scale`` and ``switch_role``, each forwarded to the Controller by ``_admin``, which maps
its failures to the API's errors."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from typing import Any

from ray.exceptions import RayTaskError

from scheduler.control.api import (
    UNAVAILABLE_RETRY_AFTER_S,
    IngressError,
    InvalidRequest,
    MigrationResult,
    NotFound,
    Unavailable,
)
from scheduler.control.instance_lost import _DEAD
from scheduler.control.util import _await
from scheduler.core.types import ClusterView, InstanceRole

# NOTE: the Ingress's logger: these are Ingress methods, and deployments tune (benches silence) it by that name.
log = logging.getLogger("scheduler.control.ingress")

# How long ``drain`` waits, before releasing the instance, for committed migrations' streams to switch over.
_SWITCH_WAIT_S = 30.0


class IngressAdmin:
    """``Ingress``'s admin methods (the Admin gRPC service's, through ``IngressAPI``). A mixin: ``drain`` works on the
    Ingress's view, registry and ``migrate`` (``IngressMigration``)."""

    async def drain(self, instance_id: str) -> int:
        await self.start()
        if instance_id not in self._members:
            raise NotFound(f"instance_id: no live instance {instance_id!r}", field="instance_id")
        await self._admin("set_draining", instance_id, True)
        self._snapshots.pop(instance_id, None)
        self._view = ClusterView(self._view.time_s, tuple(
            dataclasses.replace(s, draining=True) if s.instance_id == instance_id else s for s in self._view.instances
        ))
        moved = 0
        released = False
        try:
            # NOTE(migration): requests still in prefill or queued finish their prefill first; retry them a few
            # rounds, then release (a request still there is recovered elsewhere by re-prefill).
            for _ in range(50):
                pending = [r for r in self.registry.on_instance(instance_id) if r.moving_to is None]
                # P->D requests whose decode goes here are on no instance here yet (prefilling elsewhere, their KV on
                # its way): wait for them to land, then move them, as the simulator waits for them. (Released under
                # them, their KV landed on a dead instance and they were re-prefilled elsewhere.)
                arriving = instance_id in self._expected.values()
                if not pending and not arriving:
                    break
                results = await asyncio.gather(*(self.migrate(r.request_id) for r in pending),
                                               return_exceptions=True)
                moved += sum(1 for r in results if isinstance(r, MigrationResult) and r.committed)
                await asyncio.sleep(0.05)
            # A committed migration's stream still reads what the source made before its stop out of the source's
            # buffer until it switches (a consumer slower than the engine): releasing the instance first destroys
            # those tokens and the stream fails on the gap. Wait for the switches (bounded: a stalled consumer's
            # source stream would be reaped by the instance's lease anyway).
            deadline = time.monotonic() + _SWITCH_WAIT_S
            while time.monotonic() < deadline and any(
                    r.moving_to is not None for r in self.registry.on_instance(instance_id)):
                await asyncio.sleep(0.01)
            await self._admin("release", instance_id)
            released = True
        finally:
            if not released:
                # Cancelled (the caller's deadline) or failed before the release: nothing else would ever release
                # or un-drain the instance (the Controller keeps an operator's drain until it is undone), so put it
                # back in service rather than leave it silently out of it.
                await self._undrain(instance_id)
        return moved

    async def _undrain(self, instance_id: str) -> None:
        fut = asyncio.ensure_future(_await(self.controller.set_draining.remote(instance_id, False)))
        fut.add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieved even if we stop waiting
        try:
            await asyncio.shield(fut)  # runs to the end even if this task is cancelled again
        except Exception as e:  # noqa: BLE001 - the Controller is down: the drain stays; the operator retries
            log.warning("drain of %s interrupted; un-draining it failed: %r", instance_id, e)
        else:
            self._view = ClusterView(self._view.time_s, tuple(
                dataclasses.replace(s, draining=False) if s.instance_id == instance_id else s
                for s in self._view.instances))

    async def _admin(self, method: str, *args: Any) -> Any:
        """``controller.<method>.remote(*args)`` for an admin call: the Controller down or restarting is
        ``Unavailable`` (retryable, as on the hot path), a ``ValueError`` it raises is ``InvalidRequest`` (it names
        the field first: "count: ...")."""
        try:
            return await getattr(self.controller, method).remote(*args)
        except _DEAD as e:
            raise Unavailable(f"the Controller is unavailable ({type(e).__name__}); retry",
                              retry_after_s=UNAVAILABLE_RETRY_AFTER_S) from None
        except RayTaskError as e:
            if isinstance(e.cause, ValueError):
                raise InvalidRequest(str(e.cause), field=str(e.cause).split(":", 1)[0]) from None
            if isinstance(e.cause, IngressError):  # the Controller's own answer (an instance that did not answer)
                raise e.cause from None
            raise

    async def scale(self, pool: str, count: int) -> int:
        """Set ``pool``'s size; returns its target size after the call (``count``; the Controller answers the
        previous one, which is not what Admin.Scale promises)."""
        await self.start()
        await self._admin("scale", pool, count)
        await self._refresh_members()
        await self._refresh_view()
        return int(count)

    async def switch_role(self, instance_id: str, role: InstanceRole | str) -> bool:
        """Ask the Controller to move ``instance_id`` to ``role`` (``scheduler.control.reroling``)."""
        await self.start()
        if instance_id not in self._members:
            raise NotFound(f"instance_id: no live instance {instance_id!r}", field="instance_id")
        try:
            new = InstanceRole.parse(role)
        except ValueError as e:
            raise InvalidRequest(f"role: {e}", field="role") from None
        started = await self._admin("switch_role", instance_id, new.value)
        await self._refresh_view()  # the instance shows as draining from now on
        return bool(started)
