"""``llmsched run``: the product end to end on one machine, no GPU, no network.

1. a local Ray cluster with tiny vLLM-CPU instances in prefill/decode roles (``deploy/examples/cpu-pd.yaml``),
   the control plane and a gRPC server on loopback;
2. a latency profile of this machine, measured through the SDK (``llmsched profile``), in two parts: before and
   after step 3, so that the host's drift during the replay is in the profile too;
3. a slice of a real trace (the bundled Azure conversation sample) replayed through the gRPC SDK;
4. a live migration of a running request, checked token for token against an unmigrated run;
5. a decode instance switched to PREFILL and back through the admin API (dynamic re-roling, no engine restart),
   checked by serving a prefill there with the same tokens as before;
6. the same slice in the simulator with the measured profile; live and simulated side by side, with errors.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import itertools
import json
import os
import sys
import time
from multiprocessing.connection import Connection
from pathlib import Path

import numpy as np

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "deploy" / "examples" / "cpu-pd.yaml"
START_TIMEOUT_S = 600.0  # how long the main job waits for every instance (vLLM's own engine-start bound)


def _say(msg: str) -> None:
    print(f"[llmsched run] {msg}", flush=True)


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


async def measure_idle(cpu: HostCPU, idle_s: float = 1.0) -> dict:
    """CPU by role over ``idle_s`` of an idle cluster (its loops and polls): the background the per-request and
    per-token measurements remove."""
    a = cpu.snapshot()
    await asyncio.sleep(idle_s)
    return HostCPU.delta(a, cpu.snapshot())


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


async def _migration_check(target: str, *, vocab: int) -> dict:
    """Stream a long greedy request, migrate it mid-stream, compare with an unmigrated run of the same prompt."""
    from scheduler.client import AsyncClient

    client = AsyncClient(target)
    prompt = np.random.default_rng(7).integers(4, vocab, 200).tolist()
    try:
        ref = await client.generate(prompt, max_tokens=160, temperature=0.0, ignore_eos=True,
                                    request_id=f"demo-ref-{time.time_ns()}")
        rid = f"demo-migrate-{time.time_ns()}"
        got: list[int] = []
        indices: list[int] = []
        result = None
        gaps: list[float] = []
        last = time.perf_counter()
        async for ch in client.stream(prompt, max_tokens=160, temperature=0.0, ignore_eos=True, request_id=rid):
            now = time.perf_counter()
            if ch.token_ids:
                gaps.append(now - last)
                last = now
                indices.extend(range(ch.index, ch.index + len(ch.token_ids)))
                got.extend(ch.token_ids)
            if result is None and len(got) >= 40:
                result = asyncio.create_task(client.migrate(rid))
        mig = await result if result is not None else None
    finally:
        await client.close()
    return {
        "committed": bool(mig and mig.committed),
        "source": getattr(mig, "source", ""),
        "destination": getattr(mig, "destination", ""),
        "reason": getattr(mig, "reason", ""),
        "server_downtime_s": getattr(mig, "downtime_s", None),
        "max_client_gap_s": float(max(gaps[1:])) if len(gaps) > 1 else None,
        "median_client_gap_s": float(np.median(gaps[1:])) if len(gaps) > 1 else None,
        "indices_exact": indices == list(range(len(indices))),
        "identical_to_unmigrated": got == list(ref.token_ids),
        "tokens": len(got),
    }


async def _role_switch_check(target: str, *, vocab: int) -> dict | None:
    """Switch a DECODE instance to PREFILL through the admin API, prefill there, then switch it back."""
    from scheduler.client import AsyncClient
    from scheduler.core.types import InstanceRole

    client = AsyncClient(target)

    async def wait_role(iid: str, role: InstanceRole) -> float:
        t = time.perf_counter()
        while True:
            i = next(i for i in await client.instances() if i.instance_id == iid)
            if i.role is role and not i.draining:
                return time.perf_counter() - t
            if time.perf_counter() - t > 60:
                raise TimeoutError(f"{iid} did not become {role.value} within 60 s")
            await asyncio.sleep(0.05)

    try:
        insts = await client.instances()
        dec = sorted(i.instance_id for i in insts if i.role is InstanceRole.DECODE)
        if len(dec) < 2 or not any(i.role is InstanceRole.PREFILL for i in insts):
            return None  # the switch must leave a decoder behind
        iid = dec[-1]
        prompt = np.random.default_rng(11).integers(4, vocab, 96).tolist()
        ref = await client.generate(prompt, max_tokens=8, temperature=0.0, ignore_eos=True)
        asked = await client.switch_role(iid, "prefill")
        to_prefill_s = await wait_role(iid, InstanceRole.PREFILL)
        # Two at once: least-outstanding sends the second to whichever PREFILL instance the first left idle.
        runs = await asyncio.gather(*(client.generate(prompt, max_tokens=8, temperature=0.0, ignore_eos=True)
                                      for _ in range(2)))
        prefilled_by = [r.chunks[0].instance_id for r in runs]
        await client.switch_role(iid, "decode")
        back_s = await wait_role(iid, InstanceRole.DECODE)
    finally:
        await client.close()
    return {"instance": iid, "asked": asked, "to_prefill_s": to_prefill_s, "back_to_decode_s": back_s,
            "prefilled_by": prefilled_by, "served_prefill": iid in prefilled_by,
            "complete": all(len(r.token_ids) == 8 for r in runs),
            "identical": all(list(r.token_ids) == list(ref.token_ids) for r in runs)}


Timings = dict[str, tuple[float, ...]]


async def _from_each_instance(ingress, method: str, what: str) -> dict[str, object]:
    """``Instance.<method>()`` of every instance by id; one that fails is named and left out (diagnostics only:
    the run goes on without them)."""
    out: dict[str, object] = {}
    for iid, handle in ingress.instance_handles().items():
        try:
            out[iid] = await getattr(handle, method).remote()
        except Exception as e:  # noqa: BLE001 - see the docstring
            _say(f"  {what} of {iid} not read: {type(e).__name__}: {e}")
    return out


async def _instance_timings(ingress) -> tuple[Timings, Timings]:
    """``Instance.request_timings`` of every instance, per request id the record with the earliest first token
    (the prefill side of a P/D request) and the one with the latest (the decode leg's instance; the same record
    where there is no handoff)."""
    first: Timings = {}
    last: Timings = {}
    for timings in (await _from_each_instance(ingress, "request_timings", "server-side timings")).values():
        for rid, t in timings.items():
            if rid not in first or t[1] < first[rid][1]:
                first[rid] = tuple(t)
            if rid not in last or t[1] > last[rid][1]:
                last[rid] = tuple(t)
    return first, last


async def _engine_counters(ingress) -> dict[str, dict[str, int]]:
    """Per instance, its engine's counters so far (``Instance.stats``): preemptions, prompt tokens computed
    there and loaded from another instance's KV."""
    return {iid: {"preemptions": s.num_preemptions, "prompt_tokens_computed": s.prompt_tokens_computed,
                  "prompt_tokens_loaded": s.prompt_tokens_loaded}
            for iid, s in (await _from_each_instance(ingress, "stats", "engine counters")).items()}


async def _watch_peaks(ingress, peaks: dict[str, dict[str, float]], period_s: float = 0.05) -> None:
    """Until cancelled: per instance the highest KV usage, running and waiting counts in the ingress' cached view
    (what the router sees; no extra call into the engines)."""
    while True:
        for s in ingress.view().instances:
            p = peaks.setdefault(s.instance_id, {"kv_usage": 0.0, "running": 0, "waiting": 0})
            p["kv_usage"] = max(p["kv_usage"], s.kv_blocks_used / max(s.kv_blocks_total, 1))
            p["running"] = max(p["running"], s.num_running)
            p["waiting"] = max(p["waiting"], s.num_waiting)
        await asyncio.sleep(period_s)


async def _server_timings(ingress, live, prefix: str = "replay") -> dict[str, list[float]]:
    """Per replayed request, when an instance received it and when that instance's engine put out its first
    token, then the engine's own stamps (seconds from the replay start): TTFT minus these is the stack's part
    (client, gRPC, ingress, Ray/channel hops)."""
    n = len(live.arrival_s)
    # Per request: received, first out, engine arrival, first scheduled, finished -- on the instance that put
    # out its first token (the prefill side of a P/D request), then the same on the one that decoded it.
    cols = np.full((n, 10), np.nan)
    for side, rows in enumerate(await _instance_timings(ingress)):
        for rid, t in rows.items():
            head, _, idx = rid.rpartition("-")
            if head == prefix and idx.isdigit() and int(idx) < n:
                t = np.asarray(t[:5], dtype=float) - live.started_wall_s
                cols[int(idx), 5 * side:5 * side + len(t)] = t
    names = ("server_received_s", "server_first_s", "engine_arrival_s", "engine_scheduled_s", "engine_finished_s",
             "decode_received_s", "decode_first_s", "decode_arrival_s", "decode_scheduled_s", "decode_finished_s")
    return {k: cols[:, j].tolist() for j, k in enumerate(names)}


def _engine_pace(lone: list[tuple[int, str, int]], timings: Timings) -> list[float]:
    """Per lone decode stream of the profile ``(prompt, request id, tokens)``, its decode engine's time per token:
    the engine's first token out to its finish stamp (``Instance.request_timings``), free of the stack's noise."""
    out = []
    for _, rid, n in lone:
        t = timings.get(rid)
        if t is not None and len(t) >= 5 and n > 3 and t[4] > t[1]:
            out.append(float(t[4] - t[1]) / (n - 2))
    return out


def _decode_pace(server: dict[str, list[float]], output) -> np.ndarray:
    """Per replayed stream of 8+ tokens, its decode engine's time per token (first token out to finish stamp);
    NaN where either stamp is missing or the stream is shorter."""
    first = np.asarray(server["decode_first_s"], dtype=float)
    fin = np.asarray(server["decode_finished_s"], dtype=float)
    o = np.asarray(output, dtype=float)
    pace = (fin - first) / np.maximum(o - 2, 1)
    return np.where((o >= 8) & (fin > first), pace, np.nan)


def _replay_lone_pace(server: dict[str, list[float]], output) -> list[float]:
    """The same for the replay's streams that decoded alone: no other decode leg and no other request's prefill
    forward (prefill side ``engine_scheduled_s`` .. ``engine_finished_s``) in their window, 8+ tokens. A prefill
    beside a stream slows it on this host, and the simulator has that: counted in, it read as drift (a 120-request
    replay's "lone" streams at 1.3-1.6x the profile's pace)."""
    first = np.asarray(server["decode_first_s"], dtype=float)
    fin = np.asarray(server["decode_finished_s"], dtype=float)
    p0 = np.asarray(server.get("engine_scheduled_s", np.full(len(first), np.nan)), dtype=float)
    p1 = np.asarray(server.get("engine_finished_s", np.full(len(first), np.nan)), dtype=float)
    pace = _decode_pace(server, output)
    legs = np.isfinite(first) & np.isfinite(fin)
    fwd = np.isfinite(p0) & np.isfinite(p1)
    out = []
    for i in np.flatnonzero(np.isfinite(pace)):
        others = np.arange(len(pace)) != i
        busy = (legs & others & (first < fin[i]) & (fin > first[i])) | \
            (fwd & others & (p0 < fin[i]) & (p1 > first[i]))
        if not busy.any():
            out.append(float(pace[i]))
    return out


async def _live(cfg, ingress, args, probe: HostProbe) -> dict:
    from scheduler.profile import attach_engine_times, fit, measure, merge_samples
    from scheduler.server.grpc_server import build_server
    from sim.replay import fit_lengths, replay_async
    from sim.traces import default_trace

    srv = build_server(ingress, port=0)
    await srv.start()
    target = f"127.0.0.1:{srv.port}"
    _say(f"gRPC server on {target}")
    try:
        vocab = cfg.model.vocab_size
        # The profile is taken in two parts, before and after the replay: this shared host's speed drifts over
        # minutes (single-stream decode 3 ms in one run, 5-7 ms in the next), and the replay sits between them.
        _say("profiling this machine through the SDK (prefill and decode step times; 3 rounds now, 2 after "
             "the replay)...")
        with probe.phase("profile_before"):
            sampled = await measure(target, vocab=vocab, repeats=3)
            before = attach_engine_times(sampled, (await _instance_timings(ingress))[0])
            # The CPU a request costs beside its engine steps (the simulator charges it to the host's cores).
            idle = await measure_idle(probe.cpu)  # one idle background for both
            before["request_cpu"] = await measure_request_cpu(target, probe.cpu, vocab=vocab, idle=idle)
            before["token_cpu"] = await measure_token_cpu(target, probe.cpu, vocab=vocab, idle=idle)
            before["host_cores"] = os.cpu_count() or 1
        trace = default_trace().head(args.requests)
        if args.rate_scale != 1.0:
            trace = trace.scale_rate(args.rate_scale)
        pr, out = fit_lengths(trace.prompt_tokens, trace.output_tokens, 1024, args.max_output)
        _say(f"replaying {len(pr)} requests of {trace.name} ({trace.duration_s:.1f} s of arrivals) through the SDK...")
        # Whether the engines preempted or queued during the replay (the simulator reports its own preemptions):
        # the engines' counters around it, and the peaks of what the router saw.
        counters = await _engine_counters(ingress)
        peaks: dict[str, dict[str, float]] = {}
        watch = asyncio.create_task(_watch_peaks(ingress, peaks))
        try:
            with probe.phase("replay"):
                live = await replay_async(target, trace.arrival_s, pr, out, name=trace.name, vocab=vocab)
        finally:
            watch.cancel()
        after_counters = await _engine_counters(ingress)
        engines = {iid: {**{k: v - counters.get(iid, {}).get(k, 0) for k, v in c.items()}, **peaks.get(iid, {})}
                   for iid, c in after_counters.items()}
        server = await _server_timings(ingress, live)
        _say("profiling again (2 rounds)...")
        # New-size samples must be sizes these engines never ran (a run size stays cheap: profile.SHAPE_CACHE_SIZE).
        ran = {*sampled["sizes_sent"], *(int(x) for x in pr)}
        with probe.phase("profile_after"):
            sampled_after = await measure(target, vocab=vocab, repeats=2, avoid=ran)
            prefill_side, decode_side = await _instance_timings(ingress)
            after = attach_engine_times(sampled_after, prefill_side)
        pace = {"profile_lone_s": _engine_pace([*sampled["lone_decodes"], *sampled_after["lone_decodes"]],
                                               decode_side),
                "replay_lone_s": _replay_lone_pace(server, out)}
        profile = fit(merge_samples(before, after))
        line = (f"  profile: step overhead {profile['overhead_s'] * 1e3:.2f} ms, "
                f"{profile['gemm_s_per_token'] * 1e6:.1f} us/token, fit error {profile['fit_mape'] * 100:.1f}%")
        if profile.get("new_shape_table"):
            extra = [e for _, e in profile["new_shape_table"]]
            line += f", kernel build at a new prompt size {min(extra) * 1e3:.1f}-{max(extra) * 1e3:.1f} ms"
        if "request_cpu_s" in profile:
            line += (f", host CPU per request beside its steps {profile['request_cpu_s'] * 1e3:.0f} ms + "
                     f"{profile['request_cpu_s_per_token'] * 1e6:.0f} us/prompt token")
        if profile.get("token_cpu_s"):
            line += f", stack CPU per streamed token {profile['token_cpu_s'] * 1e3:.2f} ms"
        _say(line)
        mig = None
        if not args.no_migration:
            _say("live-migrating a running request...")
            mig = await _migration_check(target, vocab=vocab)
        _say("switching a decode instance to PREFILL and back (admin API)...")
        role = await _role_switch_check(target, vocab=vocab)
        state = await ingress.cluster_state()
    finally:
        await srv.stop()
    return {"profile": profile, "live": live, "migration": mig, "role_switch": role, "server": server,
            "lengths": (trace.arrival_s, pr, out), "engine_pace": pace, "replay_engines": engines,
            "instances": [(i.instance_id, i.role.value) for i in state.instances]}


SIM_SEEDS = 8  # draws of the host's noise per simulated slice (``_simulate``)


def _simulate(cfg, profile_path: Path, arrival, prompt, output, name: str) -> list:
    """The slice in the simulator with the profile: one ``SimResult`` per draw of the host's noise (``SIM_SEEDS``
    when the profile measured the host's spread, ``host_noise``; else the one deterministic run). A noisy host's
    percentiles are those of many draws: one draw of 40 requests moved a p90 by +-10 points from seed to seed."""
    from sim.simulator import Simulator, Workload

    sim_cfg = cfg.model_copy(update={
        "latency_profile": str(profile_path),
        "pools": [p.model_copy(update={"backend": "simulated"}) for p in cfg.pools],
    })
    seeds = SIM_SEEDS if json.loads(Path(profile_path).read_text()).get("host_noise") else 1
    return [Simulator(sim_cfg, seed=k).run(Workload(arrival, prompt, output, name=name)) for k in range(seeds)]


def pooled_metrics(results: list):
    """``RequestMetrics`` of several ``SimResult``s (or of one) with their requests pooled."""
    from sim.metrics import RequestMetrics, request_metrics

    ms = [request_metrics(r) for r in results]
    return RequestMetrics(*(np.concatenate([getattr(m, f.name) for m in ms]) for f in dataclasses.fields(ms[0])))


def pooled_sim_summary(results: list) -> dict:
    """``sim_summary`` of the first draw with the latency percentiles and SLO attainment of every draw pooled."""
    from scheduler.core.metrics import percentiles
    from sim.metrics import sim_summary

    out = sim_summary(results[0])
    if len(results) > 1:
        m = pooled_metrics(results)
        for k in ("ttft_s", "tpot_s", "e2e_s", "queue_s"):
            out[k] = percentiles(getattr(m, k))
        out["slo_attainment"] = float(m.slo_met.mean())
        prio = np.concatenate([r.workload.priorities for r in results])
        for p, c in out["slo"]["classes"].items():
            c["attainment"] = float(m.slo_met[prio == p].mean())
        out["noise_draws"] = len(results)
    return out


METRICS = [(m, q) for m in ("ttft_s", "tpot_s", "e2e_s") for q in ("p50", "p90")]
PACE_MIN_STREAMS = 5  # lone streams on each side for a pace ratio


def pooled_errors(pools: list) -> dict[str, float]:
    """(simulated - live) / live of ``METRICS`` over several runs' requests pooled: ``pools`` holds a (live,
    simulated) ``RequestMetrics`` pair per run. A 40-request run's p90 is its 4th-slowest request, so one
    request's hiccup on a shared host moves it by 10-30%; pooled, each percentile rests on every run."""
    from scheduler.core.metrics import percentiles

    def pool(side: int, metric: str) -> dict:
        return percentiles(np.concatenate([getattr(p[side], metric) for p in pools]))

    live = {m: pool(0, m) for m, _ in METRICS}
    sim = {m: pool(1, m) for m, _ in METRICS}
    return sim_errors(live, sim)


IN_FLIGHT_BINS = (0, 1, 2, 3)  # other requests in flight; the last bin holds that many or more


def in_flight_at_ttft(sent: np.ndarray, first: np.ndarray, finish: np.ndarray) -> np.ndarray:
    """Per request, how many other requests were in flight (sent, not finished) halfway to its first token, as
    the live run saw it; -1 for a request that never got one."""
    mid = (sent + first) / 2
    done = np.isfinite(finish)  # a request that never finished (it failed) is left out of the counts
    s, f = np.sort(sent[done]), np.sort(finish[done])
    # In flight at t: sent by t less finished by t (a request finishes after it is sent). Sorted: O(n log n).
    busy = np.searchsorted(s, mid, side="right") - np.searchsorted(f, mid, side="right")
    own = done & (sent <= mid) & (finish > mid)
    return np.where(np.isfinite(mid), busy - own, -1)


def ttft_by_in_flight(in_flight: np.ndarray, live_ttft: np.ndarray, sim_ttft: np.ndarray,
                      live_queue: np.ndarray | None = None, sim_queue: np.ndarray | None = None) -> list[dict]:
    """Live against simulated TTFT of the same requests, binned by the others in flight live (``IN_FLIGHT_BINS``):
    count, the two medians and the median per-request ratio. Where a set median's TTFT error comes from: alone on
    the host the simulator should match the profile; with others in flight, its contention model is what shows.
    With ``live_queue`` / ``sim_queue`` (each request's wait at its first engine, arrival there to first scheduled)
    also their means: whether the gap is waiting behind other requests' steps or the request's own step and path.
    Live, even a request alone waits ~1.5 ms (vLLM's hop into its engine loop), which the simulator holds in the
    request's path latency instead."""
    rows = []
    for k, lo in enumerate(IN_FLIGHT_BINS):
        hi = IN_FLIGHT_BINS[k + 1] if k + 1 < len(IN_FLIGHT_BINS) else np.inf
        m = (in_flight >= lo) & (in_flight < hi) & np.isfinite(live_ttft) & np.isfinite(sim_ttft) & (live_ttft > 0)
        if m.any():
            row = {"in_flight": f"{lo}+" if hi == np.inf else str(lo), "requests": int(m.sum()),
                   "live_p50_s": float(np.median(live_ttft[m])), "sim_p50_s": float(np.median(sim_ttft[m])),
                   "sim_over_live": float(np.median(sim_ttft[m] / live_ttft[m]))}
            if live_queue is not None and sim_queue is not None:
                q = m & np.isfinite(live_queue) & np.isfinite(sim_queue)
                if q.any():
                    row.update(live_queue_mean_s=float(live_queue[q].mean()),
                               sim_queue_mean_s=float(sim_queue[q].mean()))
            rows.append(row)
    return rows


def ttft_flight_columns(live, sim_runs: list, arrival, stamps: dict | None = None) -> tuple[np.ndarray, ...]:
    """``ttft_by_in_flight``'s inputs for one run: the others in flight live, the live TTFT (from the send), the
    simulated one (median over the noise draws), and each request's wait at its first engine, live (the engines'
    stamps in ``stamps``: ``engine_arrival_s`` to ``engine_scheduled_s``; NaN without them) and simulated."""
    arrival = np.asarray(arrival)
    sim_ttft = np.median([r.first_token_s - arrival for r in sim_runs], axis=0)
    sim_queue = np.median([r.admit_s - arrival for r in sim_runs], axis=0)
    nan = np.full(len(arrival), np.nan)
    stamps = stamps or {}
    live_queue = (np.asarray(stamps.get("engine_scheduled_s", nan), dtype=float)
                  - np.asarray(stamps.get("engine_arrival_s", nan), dtype=float))
    return (in_flight_at_ttft(live.start_s(), live.first_token_s, live.finish_s),
            live.first_token_s - live.start_s(), sim_ttft, live_queue, sim_queue)


def _say_ttft_by_in_flight(rows: list[dict]) -> None:
    def queue(r: dict) -> str:
        if "live_queue_mean_s" not in r:
            return ""
        return f", wait at the engine {r['live_queue_mean_s'] * 1e3:.1f} / {r['sim_queue_mean_s'] * 1e3:.1f} ms"

    _say("TTFT by other requests in flight (live), live / simulated p50: " + "; ".join(
        f"{r['in_flight']}: {r['live_p50_s'] * 1e3:.1f} / {r['sim_p50_s'] * 1e3:.1f} ms ({r['requests']} requests, "
        f"x{r['sim_over_live']:.2f}{queue(r)})" for r in rows) + ("; waits: means, live / simulated" if any(
        "live_queue_mean_s" in r for r in rows) else ""))


def pace_ratio(pace: dict | None) -> float | None:
    """How much slower the decode engines ran during the replay than during the profile: the median engine time
    per token of lone streams, replay over profile (``engine_pace``), or ``None`` with too few of either."""
    if not pace:
        return None
    a, b = pace.get("profile_lone_s") or (), pace.get("replay_lone_s") or ()
    if len(a) < PACE_MIN_STREAMS or len(b) < PACE_MIN_STREAMS:
        return None
    return float(np.median(b) / np.median(a))


def _simulate_paced(cfg, profile: dict, ratio: float, tmp: Path, arrival, prompt, output, name: str):
    """The slice simulated with the profile's decode steps scaled by ``ratio`` (``scale_decode_steps``)."""
    from scheduler.profile import scale_decode_steps

    tmp.write_text(json.dumps(scale_decode_steps(profile, ratio)))
    return _simulate(cfg, tmp, arrival, prompt, output, name)


def sim_errors(live_sum: dict, sim_sum: dict) -> dict[str, float]:
    """(simulated - live) / live for each of ``METRICS`` the live run has a non-zero value for."""
    return {f"{m}.{q}": (sim_sum[m][q] - live_sum[m][q]) / live_sum[m][q] for m, q in METRICS if live_sum[m][q]}


def resimulate(cfg, dirs: list[str], json_path: str | None = None) -> dict[str, dict[str, float]]:
    """Re-fit the profile samples saved by earlier runs (``DIR/report.json``) with the current ``fit`` and
    simulate their slices again: the simulator's error against those live runs, without running them again
    (how a change to the fit or the simulator is checked against several noisy live runs at once). Nothing is
    written into ``DIR``; ``json_path`` gets the per-run errors and their median."""
    import tempfile

    from scheduler.profile import fit
    from scheduler.telemetry.report import write_json
    from sim.replay import LiveResult

    errors: dict[str, dict[str, float]] = {}
    paced: dict[str, dict[str, float]] = {}
    pools: list[tuple] = []  # (live, simulated) RequestMetrics per run with per-request columns
    flights: list[tuple] = []  # (in flight, live TTFT, simulated TTFT) per request, every run
    with tempfile.TemporaryDirectory() as tmp:
        for n, d in enumerate(dirs):
            report = json.loads((Path(d) / "report.json").read_text())
            if not report.get("profile_samples") or not report.get("per_request"):
                raise ValueError(f"{d}/report.json: no profile_samples/per_request (written by an older llmsched run)")
            path = Path(tmp) / f"profile-{n}.json"
            profile = fit(report["profile_samples"])
            path.write_text(json.dumps(profile))
            pr = report["per_request"]
            slice_ = (np.asarray(pr["arrival_s"]), np.asarray(pr["prompt_tokens"]), np.asarray(pr["output_tokens"]),
                      report.get("trace", "trace"))
            res = _simulate(cfg, path, *slice_)
            # The live side is recomputed from its per-request columns where saved, so every run is scored by the
            # current rules (TTFT from when the request was sent; reports without ``live_sent_s``: from arrival).
            live = report["live"]
            if pr.get("live_first_s") is not None:
                slo = cfg.slo_for(0)
                lr = LiveResult.from_columns(pr, name=report.get("trace", "trace"))
                live = lr.summary(slo_ttft_s=slo.ttft_s or np.inf, slo_tpot_s=slo.tpot_s or np.inf)
                pools.append((lr.metrics(), pooled_metrics(res)))
                flights.append(ttft_flight_columns(lr, res, slice_[0], pr))
            errors[d] = sim_errors(live, pooled_sim_summary(res))
            _say(f"{d}: " + ", ".join(f"{k} {v * 100:+.0f}%" for k, v in errors[d].items()))
            pace = dict(report.get("engine_pace") or {})
            if pace and pr.get("decode_first_s") is not None:  # the replay side by the current rule
                pace["replay_lone_s"] = _replay_lone_pace(pr, pr["output_tokens"])
            ratio = pace_ratio(pace)
            if ratio is not None:
                res = _simulate_paced(cfg, profile, ratio, Path(tmp) / f"paced-{n}.json", *slice_)
                paced[d] = {"pace_ratio": ratio, **sim_errors(live, pooled_sim_summary(res))}
                _say(f"  engine drift x{ratio:.2f} divided out: " + ", ".join(
                    f"{k} {v * 100:+.0f}%" for k, v in paced[d].items() if k != "pace_ratio"))
    med = {k: float(np.median([e[k] for e in errors.values()])) for k in next(iter(errors.values()))}
    if len(errors) > 1:
        _say(f"median over {len(errors)} runs: " + ", ".join(f"{k} {v * 100:+.0f}%" for k, v in med.items()))
    pooled = pooled_errors(pools) if len(pools) == len(errors) > 1 else None
    if pooled:
        _say(f"pooled over the {len(pools)} runs' requests: " + ", ".join(
            f"{k} {v * 100:+.0f}%" for k, v in pooled.items()))
    if flights:
        _say_ttft_by_in_flight(ttft_by_in_flight(*(np.concatenate(c) for c in zip(*flights))))
    med_paced = {k: float(np.median([e[k] for e in paced.values()])) for k in next(iter(paced.values()))} \
        if paced else None
    if med_paced and len(paced) > 1:
        _say(f"median over {len(paced)} runs, engine drift divided out: " + ", ".join(
            f"{k} {v * 100:+.0f}%" for k, v in med_paced.items() if k != "pace_ratio"))
    if json_path:
        doc = {"config": cfg.name, "what": "(simulated - live) / live per run, simulator re-fitted from each run's "
               "own profile samples", "runs": errors, "median": med}
        if pooled:
            doc.update(pooled_what="the percentiles of all runs' requests pooled, live against simulated: one "
                       "sample of every request of every run, so a p90 rests on ~10% of all of them, not of one run",
                       pooled=pooled)
        if paced:
            doc.update(paced_what="the same with the profile's decode steps scaled by the run's engine pace "
                       "(replay over profile, lone decode streams): the error with the host's drift divided out",
                       runs_paced=paced, median_paced=med_paced)
        write_json(json_path, doc)  # creates the folder --json's output_file let through
    return errors


def main(argv: list[str] | None = None) -> int:
    from scheduler.cli_args import output_dir, output_file, positive_float, positive_int

    p = argparse.ArgumentParser(prog="llmsched run", description=__doc__)
    p.add_argument("--config", default=str(DEFAULT_CONFIG))
    # Checked here, before a Ray cluster and its engines take a minute to start.
    p.add_argument("--requests", type=positive_int, default=40, help="requests of the trace slice to replay")
    p.add_argument("--max-output", type=positive_int, default=64, help="clip output lengths (CPU engines are slow)")
    p.add_argument("--rate-scale", type=positive_float, default=1.0)
    p.add_argument("--out", type=output_dir, default="out/run",
                   help="folder for report.json, profile.json and report.png")
    p.add_argument("--no-migration", action="store_true", help="skip the live-migration step (one-instance configs)")
    p.add_argument("--resimulate", nargs="+", metavar="DIR",
                   help="no live run: re-fit and re-simulate earlier runs' saved reports (DIR/report.json)")
    p.add_argument("--json", type=output_file, help="with --resimulate: write the per-run errors and their median to this file")
    args = p.parse_args(argv)
    if args.resimulate:
        from scheduler.config.load import load_config

        try:
            resimulate(load_config(args.config), args.resimulate, args.json)
        except (OSError, ValueError) as e:  # a missing or older report: say which, no traceback
            p.error(f"--resimulate: {e}")
        return 0
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

    from scheduler.config.load import ConfigError, load_config

    try:
        cfg = load_config(args.config)
    except (ConfigError, OSError) as e:  # missing file, bad YAML, bad field: before Ray starts
        p.error(f"--config: {e}")

    from scheduler.control.cluster import start_local_cluster
    from scheduler.core.metrics import RequestMetrics
    from scheduler.telemetry.report import print_summaries, write_figure, write_json

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    _say(f"starting a local Ray cluster with {cfg.num_instances} vLLM-CPU instances "
         f"({', '.join(f'{q.count} {q.role.value}' for q in cfg.pools)}) of {cfg.model.name}...")
    # Every instance, or nothing to show: the P/D split and the migration need them all. vLLM bounds its own
    # engine start at 600 s (VLLM_ENGINE_READY_TIMEOUT_S); on a loaded 2-core host a start takes minutes.
    cluster = start_local_cluster(cfg, ready_timeout_s=START_TIMEOUT_S)
    up = len(cluster.deployment.instances)
    if up < cfg.num_instances:
        cluster.shutdown()
        _say(f"error: only {up} of {cfg.num_instances} instances started within {START_TIMEOUT_S:.0f} s "
             "(see the Ray logs under /tmp/ray/session_latest/logs)")
        return 1
    _say(f"  cluster up in {time.perf_counter() - t0:.1f} s")
    try:
        async def run_live():
            await cluster.ingress.start()
            try:
                return await _live(cfg, cluster.ingress, args, probe)
            finally:
                await cluster.ingress.close()

        probe = HostProbe()
        try:
            res = asyncio.run(run_live())
        finally:
            host = probe.stop()
    finally:
        cluster.shutdown()
    live = res["live"]
    prof_path = out_dir / "profile.json"
    prof_path.write_text(json.dumps(res["profile"], indent=2) + "\n")
    arrival, pr, out = res["lengths"]
    _say("simulating the same slice with the measured profile...")
    sim_runs = _simulate(cfg, prof_path, arrival, pr, out, live.name)
    sim_res = sim_runs[0]  # per-request columns and the figure: the first draw
    if len(sim_runs) > 1:
        noise = res["profile"]["host_noise"]
        _say(f"  the host's spread in the profile: {len(noise)} lone decode streams at {min(noise):.2f}-"
             f"{max(noise):.2f}x their median pace; simulated with {len(sim_runs)} draws of it, pooled")
    slo = cfg.slo_for(0)
    live_sum = live.summary(slo_ttft_s=slo.ttft_s or np.inf, slo_tpot_s=slo.tpot_s or np.inf)
    sim_sum = pooled_sim_summary(sim_runs)
    errors = sim_errors(live_sum, sim_sum)
    title = f"{live.name}: {len(pr)} requests on {cfg.name} (live vLLM-CPU) vs the simulator (profiled latency)"
    print_summaries({"live (gRPC SDK)": live_sum, "simulated": sim_sum}, title=title)
    _say("simulator error vs live: " + ", ".join(f"{k} {v * 100:+.0f}%" for k, v in errors.items()))
    late = live_sum.get("send_late_s") or {}
    if late.get("p50") is not None:
        _say(f"load generator: sent {late['p50'] * 1e3:.2f} ms (p50) / {late['p99'] * 1e3:.2f} ms (p99) after the "
             "scheduled arrivals; live TTFT and E2E count from the send")
    srv = res["server"]
    engine_part = np.asarray(srv["server_first_s"]) - np.asarray(srv["server_received_s"])
    stack_part = live.first_token_s - live.start_s() - engine_part
    if np.isfinite(engine_part).any():
        line = (f"TTFT split (p50): instance receipt -> engine's first token {np.nanmedian(engine_part) * 1e3:.1f} "
                f"ms, the rest (SDK, gRPC, ingress, hops) {np.nanmedian(stack_part) * 1e3:.1f} ms")
        marks = [np.asarray(srv[k]) for k in ("server_received_s", "engine_arrival_s", "engine_scheduled_s",
                                              "engine_finished_s", "server_first_s")]
        if np.isfinite(marks[2]).any():
            parts = [np.nanmedian(b - a) * 1e3 for a, b in itertools.pairwise(marks)]
            line += ("; inside: to vLLM's front end {:.1f}, to first scheduled {:.1f}, scheduled -> finished "
                     "{:.1f}, back out {:.1f} ms").format(*parts)
        _say(line)
    by_in_flight = ttft_by_in_flight(*ttft_flight_columns(live, sim_runs, arrival, srv))
    _say_ttft_by_in_flight(by_in_flight)
    if np.isfinite(np.asarray(srv.get("decode_finished_s", [np.nan]), dtype=float)).any():
        # Inside the decode engine (its first token out to its finish stamp) against what the client saw, per
        # stream: a TPOT above the engine's is the stack's (streaming, hops); the engine's own against the profile.
        eng = _decode_pace(srv, out)
        seen = (live.finish_s - live.first_token_s) / np.maximum(np.asarray(out, dtype=float) - 1, 1)
        ok = np.isfinite(eng) & np.isfinite(seen)
        if ok.any():
            _say(f"TPOT split (p50 over streams of 8+ tokens): inside the decode engine {np.median(eng[ok]) * 1e3:.2f} "
                 f"ms/token, as the client saw it {np.median(seen[ok]) * 1e3:.2f} ms/token (handoff included)")
    pace = res["engine_pace"]
    if pace["profile_lone_s"] and pace["replay_lone_s"]:
        a, b = np.median(pace["profile_lone_s"]), np.median(pace["replay_lone_s"])
        _say(f"decode engine pace, lone streams (inside the engine): profile {a * 1e3:.2f} ms/token "
             f"({len(pace['profile_lone_s'])}), replay {b * 1e3:.2f} ms/token ({len(pace['replay_lone_s'])}): the "
             f"replay's engines ran at {a / b:.2f}x the profile's speed")
    paced = None
    if (ratio := pace_ratio(pace)) is not None:
        # A diagnostic beside the error above, never instead of it: the same model with the host's drift between
        # the profile and the replay divided out, so what is left is the model's own error.
        paced_res = _simulate_paced(cfg, res["profile"], ratio, out_dir / "profile_paced.json", arrival, pr, out,
                                    live.name)
        paced = {"pace_ratio": ratio, **sim_errors(live_sum, pooled_sim_summary(paced_res))}
        _say(f"simulator error with the engines' drift (x{ratio:.2f}) divided out: " + ", ".join(
            f"{k} {v * 100:+.0f}%" for k, v in paced.items() if k != "pace_ratio"))
    roles = dict(res["instances"])
    for iid, e in sorted(res["replay_engines"].items()):
        _say(f"  {iid} ({roles.get(iid, '?')}) during the replay: {e['preemptions']} preemptions, prompt tokens "
             f"computed {e['prompt_tokens_computed']}, loaded {e['prompt_tokens_loaded']}; peaks seen by the router: "
             f"KV {e.get('kv_usage', 0) * 100:.0f}%, running {e.get('running', 0):.0f}, waiting {e.get('waiting', 0):.0f}")
    _say(f"  simulated: {sim_sum.get('preemptions', 0)} preemptions")
    m = res["migration"] or {"indices_exact": True}
    if res["migration"] is not None:
        _say(f"migration: committed={m['committed']} {m['source']} -> {m['destination']}, "
             f"indices exact={m['indices_exact']}, identical to unmigrated={m['identical_to_unmigrated']}, "
             f"client-seen max gap {m['max_client_gap_s'] or 0:.3f} s (median {m['median_client_gap_s'] or 0:.4f} s)")
    rs = res["role_switch"]
    if rs is not None:
        _say(f"re-roling: {rs['instance']} -> prefill in {rs['to_prefill_s']:.2f} s, prefilled "
             f"{rs['prefilled_by'].count(rs['instance'])} of {len(rs['prefilled_by'])} requests (tokens identical="
             f"{rs['identical']}), back to decode in {rs['back_to_decode_s']:.2f} s; no engine restart")
    med = host["median_ms"]
    if host.get("replay_over_profile"):
        _say("host probe (fixed ~1 ms task, median): " + ", ".join(f"{k} {v:.2f} ms" for k, v in med.items() if v)
             + f"; the replay ran at {1 / host['replay_over_profile']:.2f}x the profile's host speed")
    cores = host["cpu_cores"].get("replay")
    if cores:
        cluster_cores = HostCPU.cluster_cores(cores)
        per_token = cores["wall_s"] / max(int(np.sum(out)), 1) * 1e3  # ms of CPU per streamed token, per core used
        roles = [name for name, _ in CPU_CLASSES] + ["this process"]
        _say(f"host CPU during the replay (cores of {os.cpu_count()}): cluster {cluster_cores:.2f} = "
             + ", ".join(f"{k} {cores[k]:.2f}" for k in roles if k in cores)
             + f"; outside the cluster {cores['outside the cluster']:.2f}, steal {cores['steal']:.2f}; "
             f"per streamed token: engines {cores.get('engines', 0) * per_token:.2f} ms, the rest of the cluster "
             f"{(cluster_cores - cores.get('engines', 0)) * per_token:.2f} ms")
    if live.errors:
        _say(f"{len(live.errors)} live requests failed, first: {live.errors[0]}")
    report = {"config": cfg.name, "trace": live.name, "requests": len(pr), "instances": res["instances"],
              "live": live_sum, "simulated": sim_sum, "sim_error": errors, "migration": m, "role_switch": rs,
              "profile": {k: v for k, v in res["profile"].items() if k != "samples"},
              "wall_seconds": time.perf_counter() - t0,
              # Per-request columns (seconds from the replay start), for diagnosing where live and sim differ.
              "per_request": {"arrival_s": np.asarray(arrival).tolist(), "prompt_tokens": np.asarray(pr).tolist(),
                              "output_tokens": np.asarray(out).tolist(),
                              "live_sent_s": live.sent_s.tolist() if live.sent_s is not None else None,
                              "live_first_s": live.first_token_s.tolist(), "live_finish_s": live.finish_s.tolist(),
                              "sim_first_s": sim_res.first_token_s.tolist(), "sim_finish_s": sim_res.finish_s.tolist(),
                              "sim_decode_instance": sim_res.decode_instance.tolist(), **res["server"]},
              "profile_samples": res["profile"].get("samples"), "host_probe": host,
              "engine_pace": res["engine_pace"], "sim_error_paced": paced, "replay_engines": res["replay_engines"],
              "ttft_by_in_flight": by_in_flight}
    write_json(out_dir / "report.json", report)
    sim_m = RequestMetrics.from_times(arrival, sim_res.first_token_s, sim_res.finish_s, out)
    write_figure(out_dir / "report.png", {"live": live.metrics(), "simulated": sim_m}, title=title)
    _say(f"report: {out_dir / 'report.json'}, figure: {out_dir / 'report.png'} "
         f"({time.perf_counter() - t0:.0f} s in all)")
    ok = not live.errors and m["indices_exact"] and live_sum["completed"] == len(pr)
    if res["migration"] is not None:
        ok = ok and m["committed"] and m["identical_to_unmigrated"]
    if rs is not None:
        ok = ok and rs["asked"] and rs["served_prefill"] and rs["complete"] and rs["identical"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
