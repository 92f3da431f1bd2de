"""Where a live prefill step's time goes, thread by thread: CPU, run-queue wait and page faults.

    python bench/bench_step_faults.py [--no-profile] [--requests 40] [--json OUT]

Brings up the cpu-pd cluster (``deploy/examples/cpu-pd.yaml``), optionally runs one profile round first (as
``llmsched run`` does), then replays the bundled Azure slice through the gRPC SDK while a sampler process reads,
every few ms, each engine thread's ``/proc/.../schedstat`` (on-CPU and run-queue wait, ns) and ``stat`` (minor +
major faults), and the engines' ``statm``. Each replayed request's prefill step (the engine's scheduled ->
finished stamps) is then attributed: wall time, the prefill engine's CPU, its wait for a core, its page faults.
The baseline is in the same run: a prompt size's later steps against its first. This is how the eighteenth
session found the prefill engine's growing heap (docs/history/live_vs_sim.md): the first ~960-token step 40-54 ms with
2300-2700 faults against ~22 ms with ~5 once the engine stopped keeping every prompt's KV.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _sampler(conn, pids: list[tuple[int, str]], period_s: float, out_path: str) -> None:
    """In its own process: sample until told to stop, then save ``t``, per-thread (run ns, wait ns, faults) and
    the engines' (VmSize, RSS) pages to ``out_path`` (npz). The /proc files stay open and are re-read (seek 0):
    a few us a read, so a 4 ms period costs the host little."""
    with contextlib.ExitStack() as files:
        def keep(path: str):
            return files.enter_context(open(path, "rb", buffering=0))

        tasks = []
        for pid, role in pids:
            if role != "engines":
                continue
            try:
                for tid in os.listdir(f"/proc/{pid}/task"):
                    base = f"/proc/{pid}/task/{tid}"
                    tasks.append((pid, int(tid), keep(f"{base}/schedstat"), keep(f"{base}/stat")))
            except OSError:
                continue
        epids = sorted({p for p, _, _, _ in tasks})
        statm = [keep(f"/proc/{p}/statm") for p in epids]
        conn.send([(p, t) for p, t, _, _ in tasks])
        ts, rows, mem = [], [], []
        while not conn.poll(0):
            ts.append(time.time())
            row = []
            for _, _, sched, stat in tasks:
                try:
                    sched.seek(0)
                    a = sched.read().split()
                    stat.seek(0)
                    b = stat.read().rsplit(b")", 1)[1].split()  # after the command name: state is field 3
                    row.append((int(a[0]), int(a[1]), int(b[7]) + int(b[9])))  # minflt (10), majflt (12)
                except (OSError, IndexError, ValueError):
                    row.append((0, 0, 0))
            rows.append(row)
            m = []
            for f in statm:
                f.seek(0)
                v = f.read().split()
                m += [int(v[0]), int(v[1])]
            mem.append(m)
            time.sleep(period_s)
    np.savez(out_path, t=np.array(ts), s=np.array(rows, dtype=np.int64), mem=np.array(mem), epids=np.array(epids))
    conn.send("done")


def attribute(t: np.ndarray, samples: np.ndarray, windows: list[tuple[float, float]]) -> np.ndarray:
    """Per window ``(start, end)`` (wall clock) and per thread: the growth of each sampled counter between the
    last sample before the window and the first after it. ``samples``: (time, thread, counter) cumulative.
    Returns (window, thread, counter)."""
    out = np.zeros((len(windows), samples.shape[1], samples.shape[2]), dtype=np.int64)
    for k, (a, b) in enumerate(windows):
        i = max(int(np.searchsorted(t, a, side="right")) - 1, 0)
        j = min(int(np.searchsorted(t, b, side="left")), len(t) - 1)
        out[k] = samples[j] - samples[i]
    return out


async def _run(args, out_npz: str) -> dict:
    import multiprocessing as mp

    from scheduler.config.load import load_config
    from scheduler.control.cluster import start_local_cluster
    from scheduler.demo import DEFAULT_CONFIG, _server_timings
    from scheduler.profile import measure
    from scheduler.server.grpc_server import build_server
    from scheduler.telemetry.host import HostCPU
    from sim.replay import fit_lengths, replay_async
    from sim.traces import default_trace

    cluster = start_local_cluster(load_config(str(DEFAULT_CONFIG)))
    try:
        ing = cluster.ingress
        await ing.start()
        srv = build_server(ing, port=0)
        await srv.start()
        target = f"127.0.0.1:{srv.port}"
        try:
            trace = default_trace().head(args.requests)
            pr, out = fit_lengths(trace.prompt_tokens, trace.output_tokens, 1024, 64)
            if args.profile:
                await measure(target, vocab=1024, repeats=1)
            if args.warm:  # one prompt of this size first (does a warmed heap keep the replay's steps fault-free?)
                from scheduler.client import AsyncClient

                warm = AsyncClient(target)
                try:
                    ids = np.random.default_rng().integers(4, 1024, args.warm).tolist()
                    await warm.generate(ids, max_tokens=2, temperature=0.0, ignore_eos=True)
                finally:
                    await warm.close()
            ctx = mp.get_context("spawn")
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_sampler, args=(child, HostCPU().processes(), args.period_ms / 1e3, out_npz),
                               daemon=True)
            proc.start()
            tasks = parent.recv()
            live = await replay_async(target, trace.arrival_s, pr, out, name=trace.name, vocab=1024)
            parent.send("stop")
            parent.recv()
            proc.join(5)
            server = await _server_timings(ing, live)
        finally:
            await srv.stop()
            await ing.close()
    finally:
        cluster.shutdown()
    z = np.load(out_npz)
    w0 = live.started_wall_s
    start = np.asarray(server["engine_scheduled_s"], dtype=float) + w0
    end = np.asarray(server["engine_finished_s"], dtype=float) + w0
    ok = np.flatnonzero(np.isfinite(start) & np.isfinite(end))
    d = attribute(z["t"], z["s"], [(start[i], end[i]) for i in ok])
    # The prefill engine: the process whose threads ran most during the prefill steps; its busiest thread runs them.
    pids = np.array([p for p, _ in tasks])
    run_by_pid = {p: int(d[:, pids == p, 0].sum()) for p in set(pids.tolist())}
    pe = max(run_by_pid, key=run_by_pid.get)
    main = int(np.flatnonzero(pids == pe)[np.argmax(d[:, pids == pe, 0].sum(axis=0))])
    rows = [{"request": int(i), "prompt_tokens": int(pr[i]), "step_ms": (end[i] - start[i]) * 1e3,
             "cpu_ms": d[k, main, 0] / 1e6, "wait_ms": d[k, main, 1] / 1e6, "faults": int(d[k, main, 2])}
            for k, i in enumerate(ok)]
    mem = z["mem"]
    k = list(z["epids"]).index(pe)
    rss_mb = mem[:, 2 * k + 1] * os.sysconf("SC_PAGE_SIZE") / 2**20
    return {"rows": rows, "prefill_rss_mb": [float(rss_mb[0]), float(rss_mb[-1])], "profile_first": args.profile}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=40)
    p.add_argument("--no-profile", dest="profile", action="store_false", help="replay on fresh engines")
    p.add_argument("--period-ms", type=float, default=4.0)
    p.add_argument("--warm", type=int, default=0, help="send one prompt of this many tokens before the replay")
    p.add_argument("--json")
    args = p.parse_args(argv)
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        res = asyncio.run(_run(args, os.path.join(tmp, "samples.npz")))
    rows = res["rows"]
    print(f"{'req':>4} {'tokens':>6} {'step ms':>8} {'CPU ms':>7} {'wait ms':>7} {'faults':>7}")
    for r in rows:
        print(f"{r['request']:>4} {r['prompt_tokens']:>6} {r['step_ms']:>8.1f} {r['cpu_ms']:>7.1f} "
              f"{r['wait_ms']:>7.1f} {r['faults']:>7}")
    big = [r for r in rows if r["prompt_tokens"] > 900]
    if len(big) > 1:
        later = float(np.median([r["cpu_ms"] for r in big[1:]]))
        print(f"first >900-token step: CPU {big[0]['cpu_ms']:.1f} ms, {big[0]['faults']} faults; later ones "
              f"(median) {later:.1f} ms, {np.median([r['faults'] for r in big[1:]]):.0f} faults: "
              f"first / later {big[0]['cpu_ms'] / later:.2f}x")
    a, b = res["prefill_rss_mb"]
    print(f"prefill engine RSS over the replay: {a:.0f} -> {b:.0f} MB")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
