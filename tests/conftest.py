"""Shared fixtures. Ray is imported lazily: modules that do not use these fixtures never start it.

* ``local_ray``: one real local Ray cluster per test module -- a CPU head plus one worker per fake GPU type
  (``h100`` and ``a100``, 4 fake GPUs each, labelled ``llmsched_gpu_<type>``), so placement groups, STRICT_PACK
  and GPU-type pinning run for real. Shut down at the end of the module.
* ``ray_head``: a bare local Ray node per test module (no fake GPUs: CPU slivers do), for tests whose bug is in the
  Ray layer, and for ``llmsched serve`` subprocesses that join it (``RAY_ADDRESS``) as the chart's join its head.
* ``aloop``: an asyncio event loop on a background thread, for async code shared across a module's tests
  (``aloop.run(coro, timeout=...)``); Ingress objects live in it.
* ``no_ray``: no Ray node for a test that runs ``Instance`` objects (or anything else Ray-aware) in this process.
  Opt in by naming it, or for a whole module with ``pytestmark = pytest.mark.usefixtures("no_ray")``.
* ``no_cluster_start``: a command (``llmsched serve`` / ``run``) that must fail before it starts a cluster fails the
  test if it reaches one.

Ray never connects on its own in a test process (``RAY_ENABLE_AUTO_CONNECT=0``, set below before anything imports
Ray; Ray 2.60 reads it once, at import, in ``ray/_private/auto_init_hook.py``): every module starts its cluster
explicitly (the fixtures above, ``start_ray``, ``start_local_cluster``), and a Ray call made with none up raises
``RaySystemError`` ("Ray has not been started yet") instead of ``ray.init()``-ing. Without it, a call left over after
a module's ``ray.shutdown()`` -- an actor method's ``.remote()`` (Ray wraps ``ActorMethod._remote`` with its
auto-init too) or ``ray.get_actor`` from a task's ``finally`` or a thread -- joined the cluster being torn down, and
Ray ended the whole pytest process when that raylet died (test_drain_node's teardown, once in CI:
docs/fault_tolerance.md, "Test harness"). Subprocesses (``llmsched serve``) inherit it; they call ``ray.init``
themselves.
"""

from __future__ import annotations

import os
import sys

os.environ["RAY_ENABLE_AUTO_CONNECT"] = "0"  # before Ray is imported anywhere in the tests (see above)
if "ray._private.auto_init_hook" in sys.modules:  # imported already (a plugin): it has read the variable
    sys.modules["ray._private.auto_init_hook"].enable_auto_connect = False

import asyncio
import threading
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

import pytest
from hypothesis import settings

# CI replays a fixed set of examples (derandomized) so a submission's result does not depend on the draw; local
# runs keep exploring new random examples (that is how the HTTP fuzzer found the `text: null` 500).
settings.register_profile("ci", derandomize=True, print_blob=True)
settings.load_profile("ci" if os.environ.get("CI") else "default")

# The end-to-end tests ``importorskip`` these so a developer without them still runs the rest; in CI a missing one
# would turn the real-Ray / real-vLLM tests into silent skips, so there it is an error.
CI_REQUIRED = ("ray", "vllm", "torch", "transformers")


def pytest_configure(config: pytest.Config) -> None:
    import importlib.util

    if os.environ.get("CI"):
        missing = [m for m in CI_REQUIRED if importlib.util.find_spec(m) is None]
        if missing:
            raise pytest.UsageError(f"CI runs the end-to-end tests, but {', '.join(missing)} is not installed "
                                    "(scripts/setup.sh installs it)")

T = TypeVar("T")

FAKE_GPU_TYPES = ("h100", "a100")
FAKE_GPUS_PER_NODE = 4


class LoopThread:
    """An event loop running on its own thread; ``run`` submits a coroutine and waits for its result."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="test-loop", daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def cancel_all(self, timeout: float = 10.0) -> None:
        """Cancel every task still on the loop and wait for them (their ``finally`` blocks run now)."""
        async def _cancel_all() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        self.run(_cancel_all(), timeout=timeout)

    def close(self) -> None:
        try:
            self.cancel_all()
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=10)
            self.loop.close()


@pytest.fixture(scope="module")
def aloop() -> Iterator[LoopThread]:
    lt = LoopThread()
    yield lt
    lt.close()


@pytest.fixture(scope="module")
def local_ray() -> Iterator[Any]:
    """A head + one 4-fake-GPU worker per type in ``FAKE_GPU_TYPES``; yields the ``RayRuntime``."""
    import ray

    from scheduler.control.cluster import NodeSpec, start_ray

    if ray.is_initialized():  # a previous module leaked it; never share state between modules
        ray.shutdown()
    rt = start_ray([NodeSpec(t, FAKE_GPUS_PER_NODE) for t in FAKE_GPU_TYPES], head_cpus=2)
    try:
        yield rt
    finally:
        rt.shutdown()


@pytest.fixture(scope="module")
def ray_head() -> Iterator[Any]:
    """A bare local Ray node; yields the ``RayRuntime``."""
    import ray

    from scheduler.control.cluster import start_ray

    if ray.is_initialized():
        ray.shutdown()
    rt = start_ray(head_cpus=2)
    try:
        yield rt
    finally:
        rt.shutdown()


@pytest.fixture
def no_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    """``ray.get_runtime_context`` (``Instance.__init__`` asks it for its node id) and ``ray.init`` raise instead of
    starting a local Ray node: code that starts Ray itself (``start_ray``) is refused too; the other Ray APIs already
    raise with no node up (no auto-connect in tests, above). Not autouse: the Ray tests need Ray, and a module may
    hold both kinds (test_faults_audit)."""
    import ray

    def refuse(*a: Any, **kw: Any) -> Any:
        raise RuntimeError("no Ray in this test (tests/conftest.py: no_ray)")

    monkeypatch.setattr(ray, "get_runtime_context", refuse)
    monkeypatch.setattr(ray, "init", refuse)


@pytest.fixture
def no_cluster_start(monkeypatch: pytest.MonkeyPatch) -> None:
    """A stand-in ``scheduler.control.cluster`` whose ``start_local_cluster``, ``start_ray`` and ``deploy`` fail
    the test if reached; ``nodes_for`` (the placement check ``serve`` runs first) and ``NodeSpec`` are the real
    ones."""
    import sys
    import types

    from scheduler.control.cluster import NodeSpec, nodes_for

    def started(*a: Any, **kw: Any) -> Any:
        raise AssertionError("the command started a cluster despite a bad argument")

    fake = types.ModuleType("scheduler.control.cluster")
    fake.start_local_cluster = fake.start_ray = fake.deploy = started  # type: ignore[attr-defined]
    fake.nodes_for, fake.NodeSpec = nodes_for, NodeSpec  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "scheduler.control.cluster", fake)
