"""This host's CPU by process role, and a probe of how much CPU a fixed task gets, through a ``llmsched run``.

Why: on a 2-core box the engines share the cores with the serving stack (Ray actors, gRPC, the ingress, the load
generator), and the box is shared with other tenants; the profile and the replay are minutes apart. What the
stack costs per request and per streamed token is measured here (``measure_request_cpu``, ``measure_token_cpu``)
and handed to the latency profile, so that the simulator charges it to the host's cores.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from multiprocessing.connection import Connection

import numpy as np


def _probe_loop(conn: Connection, period_s: float) -> None:
    """In its own process: every ``period_s``, time a fixed ~1 ms of pure-Python work; send the samples at the end."""
    samples = []
    while not conn.poll(period_s):
        t = time.perf_counter()
        x = 0
        for i in range(20_000):
            x += i * i
        samples.append((time.time(), time.perf_counter() - t))
    conn.send(samples)


# Who uses this host's CPU, by process role. Matched on the process title (Ray actors and vLLM's engine core set
# theirs) or the command line; first match wins.
CPU_CLASSES = (("engines", ("EngineCore",)), ("instance actors", ("ray::Instance",)),
               ("controller", ("ray::Controller",)), ("server", ("llmsched serve",)),
               ("ray system", ("raylet", "gcs_server", "dashboard", "ray::", "log_monitor", "monitor.py",
                               "runtime_env", "ray/_private")))


def cpu_class(title: str, cmdline: str, *, this_process: bool = False) -> str | None:
    """The role a process plays in ``llmsched run``'s cluster, or ``None`` for a process outside it."""
    if this_process:
        return "this process"  # llmsched run: gRPC server, ingress, load generator and SDK in one asyncio process
    for name, keys in CPU_CLASSES:
        if any(k in title or k in cmdline for k in keys):
            return name
    return None


class HostCPU:
    """CPU seconds used on this host between snapshots, by process role (``cpu_class``), plus what the rest of the
    machine used (``/proc/stat`` busy time less the cluster's: other tenants' jobs) and the hypervisor's steal.

    Why: on a 2-core box the engines share the cores with the serving stack (actors, gRPC, ingress, the load
    generator); each streamed token costs stack CPU as well as engine CPU, so how close the host is to saturation
    depends on the token rate, which the simulator's busy-engine contention factor does not see."""

    def __init__(self) -> None:
        import psutil

        self._psutil = psutil
        self._procs: dict[int, tuple[object, str]] = {}

    def _scan(self) -> None:
        me = os.getpid()
        for p in self._psutil.process_iter(["pid", "name", "cmdline"]):
            if p.pid in self._procs:
                continue
            try:
                cls = cpu_class(p.info["name"] or "", " ".join(p.info["cmdline"] or ()), this_process=p.pid == me)
                if cls is None:
                    # An instance actor's child is its engine, whatever its title reads (one run in fourteen
                    # booked the engines outside the cluster: their titles never matched).
                    parent = p.parent()
                    if parent is not None and self._procs.get(parent.pid, (None, None))[1] == "instance actors":
                        cls = "engines"
            except (self._psutil.Error, OSError):
                continue
            if cls is not None:
                self._procs[p.pid] = (p, cls)

    def processes(self) -> list[tuple[int, str]]:
        """``(pid, role)`` of the cluster's processes running now."""
        self._scan()
        return [(pid, cls) for pid, (_, cls) in self._procs.items()]

    def snapshot(self) -> dict:
        self._scan()
        used: dict[tuple[int, str], float] = {}  # (pid, role) -> CPU seconds so far
        for pid, (p, cls) in list(self._procs.items()):
            try:
                t = p.cpu_times()
            except (self._psutil.Error, OSError):
                del self._procs[pid]  # exited: its last CPU time is lost (short-lived helpers only)
                continue
            used[(pid, cls)] = t.user + t.system
        host = self._psutil.cpu_times()
        busy = host.user + host.nice + host.system + getattr(host, "irq", 0) + getattr(host, "softirq", 0)
        return {"t": time.time(), "procs": used, "busy": busy, "steal": getattr(host, "steal", 0.0)}

    @staticmethod
    def delta(a: dict, b: dict) -> dict:
        """Cores used on average between snapshots ``a`` and ``b``, by role, with ``outside the cluster`` and
        ``steal``; ``wall_s`` the interval."""
        wall = max(b["t"] - a["t"], 1e-9)
        out: dict[str, float] = {}
        for key, t in b["procs"].items():
            out[key[1]] = out.get(key[1], 0.0) + t - a["procs"].get(key, t)  # new since ``a``: not counted
        cluster = sum(out.values())
        out = {k: v / wall for k, v in out.items()}
        out["outside the cluster"] = max(b["busy"] - a["busy"] - cluster, 0.0) / wall
        out["steal"] = (b["steal"] - a["steal"]) / wall
        out["wall_s"] = wall
        return out

    @staticmethod
    def cluster_cores(d: dict) -> float:
        """Cores the cluster's processes used in a ``delta``."""
        return sum(v for k, v in d.items() if k not in ("outside the cluster", "steal", "wall_s"))


# The idle background: the median of a few short stretches. One 1 s stretch read it high enough, once, beside busy
# jobs on this 2-core host, to zero both the per-request and the per-token CPU (clamped at 0: the simulator then
# charged none and its TTFT p50 read -34% against live; the next run, quieter, +5%).
IDLE_WINDOWS = 3
IDLE_WINDOW_S = 0.5


async def measure_idle(cpu: HostCPU, idle_s: float = IDLE_WINDOW_S, windows: int = IDLE_WINDOWS) -> dict:
    """CPU by role of an idle cluster (its loops and polls): each role's median over ``windows`` stretches of
    ``idle_s`` -- the background the per-request and per-token measurements remove."""
    deltas = []
    for _ in range(windows):
        a = cpu.snapshot()
        await asyncio.sleep(idle_s)
        deltas.append(HostCPU.delta(a, cpu.snapshot()))
    return {k: float(np.median([d.get(k, 0.0) for d in deltas])) for k in dict.fromkeys(k for d in deltas for k in d)}


async def measure_request_cpu(target: str, cpu: HostCPU, *, vocab: int = 1024, sizes: tuple[int, ...] = (32, 384, 1024),
                              n: int = 10, gap_s: float = 0.05, idle_s: float = 1.0, idle: dict | None = None
                              ) -> list[tuple[int, float]]:
    """``(prompt tokens, host CPU seconds per request)``: lone requests with a decode leg (``max_tokens=2``: on a
    P/D cluster a prefill, a KV handoff and one decode step), ``n`` per size, ``gap_s`` apart, the cluster's
    idle background (``idle``, else measured first over ``idle_s``) removed. Sizes of the profile's grid: no
    kernel build."""
    from scheduler.client import AsyncClient

    client = AsyncClient(target)
    rng = np.random.default_rng()
    try:
        idle = idle if idle is not None else await measure_idle(cpu, idle_s)
        background = HostCPU.cluster_cores(idle)  # cores the idle cluster uses (loops, polls)
        out = []
        for P in sizes:
            a = cpu.snapshot()
            for _ in range(n):
                await client.generate(rng.integers(4, vocab, P).tolist(), max_tokens=2, temperature=0.0,
                                      ignore_eos=True)
                await asyncio.sleep(gap_s)
            d = HostCPU.delta(a, cpu.snapshot())
            out.append((P, max(HostCPU.cluster_cores(d) - background, 0.0) * d["wall_s"] / n))
    finally:
        await client.close()
    return out


# Roles whose CPU a streamed token costs outside the engines (``llmsched run`` puts the gRPC server, ingress and
# load generator in "this process").
STACK_ROLES = ("this process", "instance actors", "controller", "ray system", "server")


async def measure_token_cpu(target: str, cpu: HostCPU, *, vocab: int = 1024, n: int = 8, tokens: int = 66,
                            idle_s: float = 1.0, idle: dict | None = None) -> list[float]:
    """Host CPU seconds per streamed output token outside the engines (gRPC, ingress, instance actors): lone
    requests of a short prompt, ``n`` with 2 output tokens and ``n`` with ``tokens``, one at a time; the stack's
    CPU difference over the extra tokens, the idle background (``idle``, else measured first over ``idle_s``)
    removed. One value per pair of batches (two)."""
    from scheduler.client import AsyncClient

    client = AsyncClient(target)
    rng = np.random.default_rng()

    def stack(d: dict) -> float:
        return sum(v for k, v in d.items() if k in STACK_ROLES) * d["wall_s"]

    try:
        idle = idle if idle is not None else await measure_idle(cpu, idle_s)
        background = sum(v for k, v in idle.items() if k in STACK_ROLES)  # cores the idle stack uses
        out = []
        for _ in range(2):
            used = {}
            for T in (2, tokens):
                a = cpu.snapshot()
                for _ in range(n):
                    await client.generate(rng.integers(4, vocab, 32).tolist(), max_tokens=T, temperature=0.0,
                                          ignore_eos=True)
                d = HostCPU.delta(a, cpu.snapshot())
                used[T] = stack(d) - background * d["wall_s"]
            out.append(max(used[tokens] - used[2], 0.0) / (n * (tokens - 2)))
    finally:
        await client.close()
    return out


class HostProbe:
    """How much CPU a fixed task gets on this host, sampled through the run (diagnostic: the profile and the replay
    are minutes apart on a shared box, and the simulator only knows the profile's speed). ~0.4% of a core."""

    def __init__(self, period_s: float = 0.25) -> None:
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_probe_loop, args=(child, period_s), daemon=True)
        self._proc.start()
        self.phases: list[tuple[str, float, float]] = []
        self.cpu = HostCPU()
        self.cpu_by_phase: dict[str, dict] = {}

    @contextlib.contextmanager
    def phase(self, name: str):
        """Time a phase of the run (probe samples inside it) and the CPU each role used during it."""
        start, before = time.time(), self.cpu.snapshot()
        yield
        self.phases.append((name, start, time.time()))
        self.cpu_by_phase[name] = HostCPU.delta(before, self.cpu.snapshot())

    def stop(self) -> dict:
        """Per-phase median probe time (ms) and the replay's over the profile's."""
        self._conn.send(None)
        samples = self._conn.recv() if self._conn.poll(10) else []
        self._proc.join(5)
        out: dict = {"samples": samples, "median_ms": {}, "cpu_cores": self.cpu_by_phase}
        for name, a, b in self.phases:
            xs = [dt for t, dt in samples if a <= t <= b]
            out["median_ms"][name] = float(np.median(xs)) * 1e3 if xs else None
        med = out["median_ms"]
        prof = [v for k, v in med.items() if k.startswith("profile") and v]
        if med.get("replay") and prof:
            out["replay_over_profile"] = med["replay"] / float(np.median(prof))
        return out
