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

Steps 4 and 5 are one-off admin actions after the replay, not in the simulated slice. A config's
``policies.migration`` / ``policies.reroling`` run in the Controller all through the replay: the simulation (and
``--resimulate``, from ``report.json``'s ``live_policies``) runs them too.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from scheduler.telemetry.host import (
    CPU_CLASSES,
    HostCPU,
    HostProbe,
    measure_idle,
    measure_request_cpu,
    measure_token_cpu,
)
from sim.live_vs_sim import (
    Timings,
    decode_pace,
    engine_pace,
    live_policies,
    pace_ratio,
    pooled_sim_summary,
    replay_lone_pace,
    resimulate,
    say,
    say_ttft_by_in_flight,
    sim_errors,
    simulate_paced,
    simulate_slice,
    ttft_by_in_flight,
    ttft_flight_columns,
)

if TYPE_CHECKING:
    from scheduler.config.models import ClusterConfig
    from sim.replay import LiveResult

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "deploy" / "examples" / "cpu-pd.yaml"
START_TIMEOUT_S = 600.0  # how long the main job waits for every instance (vLLM's own engine-start bound)


async def _migration_check(target: str, *, vocab: int) -> dict:
    """Stream a long greedy request, migrate it mid-stream, compare with an unmigrated run of the same prompt.

    A migration started 40 tokens in races the stream's end on a loaded host (the stages take longer than the
    rest of the stream; the source then aborts, rightly: the request is gone): tried once more, 3x as long."""
    from scheduler.client import AsyncClient

    client = AsyncClient(target)
    prompt = np.random.default_rng(7).integers(4, vocab, 200).tolist()
    try:
        for attempt, n in enumerate((160, 480), 1):
            out = await _migrate_once(client, prompt, n)
            if out["committed"]:
                break
    finally:
        await client.close()
    return {**out, "attempts": attempt}


async def _migrate_once(client: Any, prompt: list[int], n: int) -> dict:
    ref = await client.generate(prompt, max_tokens=n, temperature=0.0, ignore_eos=True,
                                request_id=f"demo-ref-{time.time_ns()}")
    rid = f"demo-migrate-{time.time_ns()}"
    got: list[int] = []
    indices: list[int] = []
    result = None
    gaps: list[float] = []
    last = time.perf_counter()
    async for ch in client.stream(prompt, max_tokens=n, temperature=0.0, ignore_eos=True, request_id=rid):
        now = time.perf_counter()
        if ch.token_ids:
            gaps.append(now - last)
            last = now
            indices.extend(range(ch.index, ch.index + len(ch.token_ids)))
            got.extend(ch.token_ids)
        if result is None and len(got) >= 40:
            result = asyncio.create_task(client.migrate(rid))
    mig = await result if result is not None else None
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

async def _from_each_instance(ingress, method: str, what: str) -> dict[str, object]:
    """``Instance.<method>()`` of every instance by id; one that fails is named and left out (diagnostics only:
    the run goes on without them)."""
    out: dict[str, object] = {}
    for iid, handle in ingress.instance_handles().items():
        try:
            out[iid] = await getattr(handle, method).remote()
        except Exception as e:  # noqa: BLE001 - see the docstring
            say(f"  {what} of {iid} not read: {type(e).__name__}: {e}")
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

async def _live(cfg, ingress, args, probe: HostProbe) -> dict:
    """The live part of the main job through the SDK over loopback gRPC: profile, replay, profile again (the
    two halves of the profile around the replay), a live migration and a role switch."""
    from scheduler.profile import fit, merge_samples
    from scheduler.server.grpc_server import build_server

    srv = build_server(ingress, port=0)
    await srv.start()
    target = f"127.0.0.1:{srv.port}"
    say(f"gRPC server on {target}")
    try:
        vocab = cfg.model.vocab_size
        # The profile is taken in two parts, before and after the replay: this shared host's speed drifts over
        # minutes (single-stream decode 3 ms in one run, 5-7 ms in the next), and the replay sits between them.
        say("profiling this machine through the SDK (prefill and decode step times; 3 rounds now, 2 after "
             "the replay)...")
        sampled, before = await _profile_before(ingress, target, vocab, probe)
        replayed = await _replay(ingress, target, vocab, args, probe)
        say("profiling again (2 rounds)...")
        # New-size samples must be sizes these engines never ran (a run size stays cheap:
        # profile.SHAPE_CACHE_SIZE).
        ran = {*sampled["sizes_sent"], *(int(x) for x in replayed["prompts"])}
        sampled_after, after, decode_side = await _profile_after(ingress, target, vocab, probe, avoid=ran)
        pace = {"profile_lone_s": engine_pace([*sampled["lone_decodes"], *sampled_after["lone_decodes"]],
                                               decode_side),
                "replay_lone_s": replay_lone_pace(replayed["server"], replayed["outputs"])}
        profile = fit(merge_samples(before, after))
        say(_profile_line(profile))
        mig = None
        if not args.no_migration:
            say("live-migrating a running request...")
            mig = await _migration_check(target, vocab=vocab)
        say("switching a decode instance to PREFILL and back (admin API)...")
        role = await _role_switch_check(target, vocab=vocab)
        state = await ingress.cluster_state()
    finally:
        await srv.stop()
    return {"profile": profile, "live": replayed["live"], "migration": mig, "role_switch": role,
            "server": replayed["server"], "lengths": replayed["lengths"], "engine_pace": pace,
            "replay_engines": replayed["engines"],
            "instances": [(i.instance_id, i.role.value) for i in state.instances]}


async def _profile_before(ingress, target: str, vocab: int, probe: HostProbe) -> tuple[dict, dict]:
    """The first profile half (3 rounds) and the host CPU a request and a streamed token cost beside the engine
    steps (the simulator charges them to the host's cores): (the sampler's raw output, the samples)."""
    from scheduler.profile import attach_engine_times, measure

    with probe.phase("profile_before"):
        sampled = await measure(target, vocab=vocab, repeats=3)
        before = attach_engine_times(sampled, (await _instance_timings(ingress))[0])
        idle = await measure_idle(probe.cpu)  # one idle background for both
        before["request_cpu"] = await measure_request_cpu(target, probe.cpu, vocab=vocab, idle=idle)
        before["token_cpu"] = await measure_token_cpu(target, probe.cpu, vocab=vocab, idle=idle)
        before["host_cores"] = os.cpu_count() or 1
    if not any(c for _, c in before["request_cpu"]) or not any(before["token_cpu"]):
        # Clamped at 0: the background moved more than the requests cost (a busy host); the simulator then
        # charges no host CPU beside the steps and reads faster than live.
        say("  warning: host CPU per request / per streamed token measured as 0 (the idle background moved "
            "during the measurement: a busy host?); the simulation charges none")
    return sampled, before


async def _replay(ingress, target: str, vocab: int, args, probe: HostProbe) -> dict:
    """The bundled trace's head replayed through the SDK, with the engines' counters around it and the peaks of
    what the router saw (whether the engines preempted or queued; the simulator reports its own)."""
    from sim.replay import fit_lengths, replay_async
    from sim.traces import default_trace

    trace = default_trace().head(args.requests)
    if args.rate_scale != 1.0:
        trace = trace.scale_rate(args.rate_scale)
    pr, out = fit_lengths(trace.prompt_tokens, trace.output_tokens, 1024, args.max_output)
    say(f"replaying {len(pr)} requests of {trace.name} ({trace.duration_s:.1f} s of arrivals) through the SDK...")
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
    return {"live": live, "server": await _server_timings(ingress, live), "engines": engines, "prompts": pr,
            "outputs": out, "lengths": (trace.arrival_s, pr, out)}


async def _profile_after(ingress, target: str, vocab: int, probe: HostProbe, *, avoid: set[int]
                         ) -> tuple[dict, dict, Timings]:
    """The second profile half (2 rounds, new prompt sizes other than ``avoid``): (the sampler's raw output, the
    samples, the decode side's server timings for the engine pace)."""
    from scheduler.profile import attach_engine_times, measure

    with probe.phase("profile_after"):
        sampled_after = await measure(target, vocab=vocab, repeats=2, avoid=avoid)
        prefill_side, decode_side = await _instance_timings(ingress)
        after = attach_engine_times(sampled_after, prefill_side)
    return sampled_after, after, decode_side


def _profile_line(profile: dict) -> str:
    """One line on the fitted profile: step overhead, per-token cost, fit error and the live-only costs."""
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
    return line


def _parser() -> argparse.ArgumentParser:
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
    p.add_argument("--ingress-poll-s", type=positive_float, metavar="S",
                   help="with --resimulate: route on the ingress's poll-round view, rounds S s apart (the live "
                        "ingress: 0.025); default: each instance as of its last step")
    return p


def _run_cluster(cfg: ClusterConfig, args: argparse.Namespace, t0: float) -> tuple[dict, dict] | None:
    """Start the local cluster, run ``_live`` against it and shut it down: ``_live``'s results and the host
    probe's, or None (said why) when not every instance started."""
    from scheduler.control.cluster import start_local_cluster

    say(f"starting a local Ray cluster with {cfg.num_instances} vLLM-CPU instances "
         f"({', '.join(f'{q.count} {q.role.value}' for q in cfg.pools)}) of {cfg.model.name}...")
    # Every instance, or nothing to show: the P/D split and the migration need them all. vLLM bounds its own
    # engine start at 600 s (VLLM_ENGINE_READY_TIMEOUT_S); on a loaded 2-core host a start takes minutes.
    cluster = start_local_cluster(cfg, ready_timeout_s=START_TIMEOUT_S)
    up = len(cluster.deployment.instances)
    if up < cfg.num_instances:
        cluster.shutdown()
        say(f"error: only {up} of {cfg.num_instances} instances started within {START_TIMEOUT_S:.0f} s "
             "(see the Ray logs under /tmp/ray/session_latest/logs)")
        return None
    say(f"  cluster up in {time.perf_counter() - t0:.1f} s")
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
    return res, host


@dataclass
class _Report:
    """``llmsched run`` after its live part, one method per phase: simulate the slice, say what was seen, write
    the report. The phases share the live run (``_live``'s results, the host probe's) and add theirs below."""

    cfg: ClusterConfig
    out_dir: Path
    t0: float  # when the main job started
    res: dict  # ``_live``'s
    host: dict  # ``HostProbe.stop``'s
    sim_runs: list = field(default_factory=list)  # one per draw of the host's noise
    live_sum: dict = field(default_factory=dict)
    sim_sum: dict = field(default_factory=dict)
    errors: dict[str, float] = field(default_factory=dict)
    title: str = ""
    by_in_flight: dict | None = None
    paced: dict | None = None  # the errors with the engines' drift divided out

    @property
    def live(self) -> LiveResult:
        return self.res["live"]

    @property
    def migration(self) -> dict:
        return self.res["migration"] or {"indices_exact": True}

    def simulate(self) -> None:
        """The same slice in the simulator with the measured profile; the summaries and errors said."""
        from scheduler.telemetry.report import print_summaries

        live, cfg = self.live, self.cfg
        prof_path = self.out_dir / "profile.json"
        prof_path.write_text(json.dumps(self.res["profile"], indent=2) + "\n")
        arrival, pr, out = self.res["lengths"]
        say("simulating the same slice with the measured profile...")
        self.sim_runs = simulate_slice(cfg, prof_path, arrival, pr, out, live.name)
        if len(self.sim_runs) > 1:
            noise = self.res["profile"]["host_noise"]
            say(f"  the host's spread in the profile: {len(noise)} lone decode streams at {min(noise):.2f}-"
                f"{max(noise):.2f}x their median pace; simulated with {len(self.sim_runs)} draws of it, "
                "pooled")
        slo = cfg.slo_for(0)
        self.live_sum = live.summary(slo_ttft_s=slo.ttft_s or np.inf, slo_tpot_s=slo.tpot_s or np.inf)
        self.sim_sum = pooled_sim_summary(self.sim_runs)
        self.errors = sim_errors(self.live_sum, self.sim_sum)
        self.title = (f"{live.name}: {len(pr)} requests on {cfg.name} (live vLLM-CPU) vs the simulator "
                      "(profiled latency)")
        print_summaries({"live (gRPC SDK)": self.live_sum, "simulated": self.sim_sum}, title=self.title)
        say("simulator error vs live: " + ", ".join(f"{k} {v * 100:+.0f}%" for k, v in self.errors.items()))

    def say_latency_splits(self) -> None:
        """Where the live TTFT and TPOT went (load generator, stack, engines); TTFT by requests in flight."""
        live, srv = self.live, self.res["server"]
        arrival, _, out = self.res["lengths"]
        late = self.live_sum.get("send_late_s") or {}
        if late.get("p50") is not None:
            say(f"load generator: sent {late['p50'] * 1e3:.2f} ms (p50) / {late['p99'] * 1e3:.2f} ms (p99) "
                "after the scheduled arrivals; live TTFT and E2E count from the send")
        engine_part = np.asarray(srv["server_first_s"]) - np.asarray(srv["server_received_s"])
        stack_part = live.first_token_s - live.start_s() - engine_part
        if np.isfinite(engine_part).any():
            line = (f"TTFT split (p50): instance receipt -> engine's first token "
                    f"{np.nanmedian(engine_part) * 1e3:.1f} ms, the rest (SDK, gRPC, ingress, hops) "
                    f"{np.nanmedian(stack_part) * 1e3:.1f} ms")
            marks = [np.asarray(srv[k]) for k in ("server_received_s", "engine_arrival_s",
                                                  "engine_scheduled_s", "engine_finished_s",
                                                  "server_first_s")]
            if np.isfinite(marks[2]).any():
                parts = [np.nanmedian(b - a) * 1e3 for a, b in itertools.pairwise(marks)]
                line += ("; inside: to vLLM's front end {:.1f}, to first scheduled {:.1f}, scheduled -> "
                         "finished {:.1f}, back out {:.1f} ms").format(*parts)
            say(line)
        self.by_in_flight = ttft_by_in_flight(*ttft_flight_columns(live, self.sim_runs, arrival, srv))
        say_ttft_by_in_flight(self.by_in_flight)
        if np.isfinite(np.asarray(srv.get("decode_finished_s", [np.nan]), dtype=float)).any():
            # Inside the decode engine (its first token out to its finish stamp) against what the client saw,
            # per stream: a TPOT above the engine's is the stack's (streaming, hops); the engine's own against
            # the profile.
            eng = decode_pace(srv, out)
            seen = (live.finish_s - live.first_token_s) / np.maximum(np.asarray(out, dtype=float) - 1, 1)
            ok = np.isfinite(eng) & np.isfinite(seen)
            if ok.any():
                say(f"TPOT split (p50 over streams of 8+ tokens): inside the decode engine "
                    f"{np.median(eng[ok]) * 1e3:.2f} ms/token, as the client saw it "
                    f"{np.median(seen[ok]) * 1e3:.2f} ms/token (handoff included)")

    def say_drift(self) -> None:
        """The decode engines' pace in the profile and the replay; the error with that drift divided out."""
        pace = self.res["engine_pace"]
        if pace["profile_lone_s"] and pace["replay_lone_s"]:
            a, b = np.median(pace["profile_lone_s"]), np.median(pace["replay_lone_s"])
            say(f"decode engine pace, lone streams (inside the engine): profile {a * 1e3:.2f} ms/token "
                f"({len(pace['profile_lone_s'])}), replay {b * 1e3:.2f} ms/token "
                f"({len(pace['replay_lone_s'])}): the replay's engines ran at {a / b:.2f}x the profile's "
                "speed")
        if (ratio := pace_ratio(pace)) is not None:
            # A diagnostic beside the error above, never instead of it: the same model with the host's drift
            # between the profile and the replay divided out, so what is left is the model's own error.
            arrival, pr, out = self.res["lengths"]
            paced_res = simulate_paced(self.cfg, self.res["profile"], ratio,
                                       self.out_dir / "profile_paced.json", arrival, pr, out, self.live.name)
            self.paced = {"pace_ratio": ratio, **sim_errors(self.live_sum, pooled_sim_summary(paced_res))}
            say(f"simulator error with the engines' drift (x{ratio:.2f}) divided out: " + ", ".join(
                f"{k} {v * 100:+.0f}%" for k, v in self.paced.items() if k != "pace_ratio"))

    def say_engines_and_checks(self) -> None:
        """The engines' preemptions and peaks during the replay; the migration and re-roling checks."""
        roles = dict(self.res["instances"])
        for iid, e in sorted(self.res["replay_engines"].items()):
            say(f"  {iid} ({roles.get(iid, '?')}) during the replay: {e['preemptions']} preemptions, prompt "
                f"tokens computed {e['prompt_tokens_computed']}, loaded {e['prompt_tokens_loaded']}; peaks "
                f"seen by the router: KV {e.get('kv_usage', 0) * 100:.0f}%, "
                f"running {e.get('running', 0):.0f}, waiting {e.get('waiting', 0):.0f}")
        say(f"  simulated: {self.sim_sum.get('preemptions', 0)} preemptions")
        m = self.migration
        if self.res["migration"] is not None:
            say(f"migration: committed={m['committed']} {m['source']} -> {m['destination']}, "
                f"indices exact={m['indices_exact']}, "
                f"identical to unmigrated={m['identical_to_unmigrated']}, "
                f"client-seen max gap {m['max_client_gap_s'] or 0:.3f} s "
                f"(median {m['median_client_gap_s'] or 0:.4f} s)"
                + (f"; attempt {m['attempts']} ({m['tokens']} tokens)" if m.get("attempts", 1) > 1 else "")
                + ("" if m["committed"] else f"; aborted: {m['reason']}"))
        rs = self.res["role_switch"]
        if rs is not None:
            say(f"re-roling: {rs['instance']} -> prefill in {rs['to_prefill_s']:.2f} s, prefilled "
                f"{rs['prefilled_by'].count(rs['instance'])} of {len(rs['prefilled_by'])} requests (tokens "
                f"identical={rs['identical']}), back to decode in {rs['back_to_decode_s']:.2f} s; no engine "
                "restart")

    def say_host(self) -> None:
        """The host probe's speeds and the host's CPU during the replay; the live requests that failed."""
        host = self.host
        med = host["median_ms"]
        if host.get("replay_over_profile"):
            say("host probe (fixed ~1 ms task, median): "
                + ", ".join(f"{k} {v:.2f} ms" for k, v in med.items() if v)
                + f"; the replay ran at {1 / host['replay_over_profile']:.2f}x the profile's host speed")
        cores = host["cpu_cores"].get("replay")
        if cores:
            cluster_cores = HostCPU.cluster_cores(cores)
            out = self.res["lengths"][2]
            # ms of CPU per streamed token, per core used
            per_token = cores["wall_s"] / max(int(np.sum(out)), 1) * 1e3
            roles = [name for name, _ in CPU_CLASSES] + ["this process"]
            say(f"host CPU during the replay (cores of {os.cpu_count()}): cluster {cluster_cores:.2f} = "
                + ", ".join(f"{k} {cores[k]:.2f}" for k in roles if k in cores)
                + f"; outside the cluster {cores['outside the cluster']:.2f}, steal {cores['steal']:.2f}; "
                f"per streamed token: engines {cores.get('engines', 0) * per_token:.2f} ms, the rest of the "
                f"cluster {(cluster_cores - cores.get('engines', 0)) * per_token:.2f} ms")
        if self.live.errors:
            say(f"{len(self.live.errors)} live requests failed, first: {self.live.errors[0]}")

    def write(self) -> None:
        """report.json and report.png under ``out_dir``."""
        from scheduler.core.metrics import RequestMetrics
        from scheduler.telemetry.report import write_figure, write_json

        res, live, out_dir = self.res, self.live, self.out_dir
        arrival, pr, out = res["lengths"]
        sim_res = self.sim_runs[0]  # per-request columns and the figure: the first draw
        report = {"config": self.cfg.name, "trace": live.name, "requests": len(pr),
                  "instances": res["instances"], "live": self.live_sum, "simulated": self.sim_sum,
                  "sim_error": self.errors, "migration": self.migration, "role_switch": res["role_switch"],
                  # What the Controller ran through the replay (the simulation ran the same): --resimulate reads it.
                  "live_policies": live_policies(self.cfg),
                  "profile": {k: v for k, v in res["profile"].items() if k != "samples"},
                  "wall_seconds": time.perf_counter() - self.t0,
                  # Per-request columns (seconds from the replay start), for diagnosing where live and sim
                  # differ.
                  "per_request": {"arrival_s": np.asarray(arrival).tolist(),
                                  "prompt_tokens": np.asarray(pr).tolist(),
                                  "output_tokens": np.asarray(out).tolist(),
                                  "live_sent_s": live.sent_s.tolist() if live.sent_s is not None else None,
                                  "live_first_s": live.first_token_s.tolist(),
                                  "live_finish_s": live.finish_s.tolist(),
                                  "sim_first_s": sim_res.first_token_s.tolist(),
                                  "sim_finish_s": sim_res.finish_s.tolist(),
                                  "sim_decode_instance": sim_res.decode_instance.tolist(), **res["server"]},
                  "profile_samples": res["profile"].get("samples"), "host_probe": self.host,
                  "engine_pace": res["engine_pace"], "sim_error_paced": self.paced,
                  "replay_engines": res["replay_engines"], "ttft_by_in_flight": self.by_in_flight}
        write_json(out_dir / "report.json", report)
        sim_m = RequestMetrics.from_times(arrival, sim_res.first_token_s, sim_res.finish_s, out)
        write_figure(out_dir / "report.png", {"live": live.metrics(), "simulated": sim_m}, title=self.title)
        say(f"report: {out_dir / 'report.json'}, figure: {out_dir / 'report.png'} "
            f"({time.perf_counter() - self.t0:.0f} s in all)")

    def ok(self) -> bool:
        """Every request served, and the migration and re-roling checks (where run) passed."""
        m, rs, requests = self.migration, self.res["role_switch"], len(self.res["lengths"][1])
        ok = not self.live.errors and m["indices_exact"] and self.live_sum["completed"] == requests
        if self.res["migration"] is not None:
            ok = ok and m["committed"] and m["identical_to_unmigrated"]
        if rs is not None:
            ok = ok and rs["asked"] and rs["served_prefill"] and rs["complete"] and rs["identical"]
        return ok


def main(argv: list[str] | None = None) -> int:
    p = _parser()
    args = p.parse_args(argv)
    if args.resimulate:
        from scheduler.config.load import load_config

        try:
            resimulate(load_config(args.config), args.resimulate, args.json, ingress_poll_s=args.ingress_poll_s)
        except (OSError, ValueError) as e:  # a missing or older report: say which, no traceback
            p.error(f"--resimulate: {e}")
        return 0
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

    from scheduler.config.load import ConfigError, load_config

    try:
        cfg = load_config(args.config)
    except (ConfigError, OSError) as e:  # missing file, bad YAML, bad field: before Ray starts
        p.error(f"--config: {e}")

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    ran = _run_cluster(cfg, args, t0)
    if ran is None:
        return 1
    report = _Report(cfg, out_dir, t0, *ran)
    report.simulate()
    report.say_latency_splits()
    report.say_drift()
    report.say_engines_and_checks()
    report.say_host()
    report.write()
    return 0 if report.ok() else 1


if __name__ == "__main__":
    sys.exit(main())
