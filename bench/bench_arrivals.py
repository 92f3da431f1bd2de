"""Arrival interference, live vs simulated: how much a stream of arriving requests slows the streams already running.

Two long greedy streams decode, one per decoder of a ``cpu-pd`` cluster (64-token prompts, ``--long`` tokens); in
every scenario but the baseline, ``--arrivals`` requests of one size arrive ``--gap`` seconds apart while they run.
The number is the long streams' TPOT (first to last token) over the baseline's in the same round (paired: the host
drifts by 1.3x within minutes). The simulator gets the same schedule with a profile measured by ``llmsched run``
on this host (its ``report.json``), and the same ratio. It checks one thing in isolation that a trace replay mixes
with everything else: what the simulator charges the running streams for a prefill on another engine of the host,
its request CPU and its KV handoff.

    llmsched run --no-migration --out out/run                 # a profile of this host (and a replay)
    llmsched bench arrivals --profile out/run/report.json --json docs/results/arrivals.json

``--target HOST:PORT`` uses a running ``llmsched serve`` (cpu-pd); without it the bench starts one for the run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "deploy" / "examples" / "cpu-pd.yaml"


@dataclass(frozen=True, slots=True)
class Scenario:
    """Arrivals of ``prompt`` tokens, ``max_tokens`` each (``prompt`` 0: the baseline, no arrivals)."""

    prompt: int
    max_tokens: int

    @property
    def name(self) -> str:
        return "baseline" if not self.prompt else f"{self.prompt}x{self.max_tokens}"


SCENARIOS = (Scenario(0, 0), Scenario(32, 2), Scenario(400, 2), Scenario(900, 2), Scenario(900, 1),
             Scenario(400, 32))
LONG_PROMPT = 64
SECOND_AFTER_S = 0.05  # the second stream: late enough that the router sees the first on its decoder


def schedule(sc: Scenario, *, long: int, arrivals: int, gap_s: float, start_s: float
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(arrival_s, prompt_tokens, output_tokens) of one scenario; requests 0 and 1 are the long streams."""
    arr, prompt, out = [0.0, SECOND_AFTER_S], [LONG_PROMPT, LONG_PROMPT], [long, long]
    if sc.prompt:
        arr += [start_s + gap_s * k for k in range(arrivals)]
        prompt += [sc.prompt] * arrivals
        out += [sc.max_tokens] * arrivals
    return np.asarray(arr), np.asarray(prompt), np.asarray(out)


def simulated_tpot(profile_path: Path, sc: Scenario, **kw: Any) -> float:
    """The long streams' TPOT in the simulator (median over its draws of the host's spread and both streams)."""
    from scheduler.config.load import load_config
    from sim.live_vs_sim import simulate_slice

    arr, prompt, out = schedule(sc, **kw)
    runs = simulate_slice(load_config(CONFIG), profile_path, arr, prompt, out, sc.name)
    return float(np.median([(r.finish_s[i] - r.first_token_s[i]) / (out[i] - 1) for r in runs for i in (0, 1)]))


def fitted_profile(report: Path, tmp: Path) -> Path:
    """A profile JSON: the report's own samples re-fitted (a ``report.json``), or a fitted profile as given."""
    from scheduler.profile import fit

    doc = json.loads(report.read_text())
    if "profile_samples" not in doc:
        return report
    path = tmp / "profile.json"
    path.write_text(json.dumps(fit(doc["profile_samples"])))
    return path


async def live_rounds(target: str, *, rounds: int, seed: int = 7, **kw: Any) -> dict[str, list[float]]:
    """Per scenario, the long streams' mean TPOT of each round; rounds rotate the scenarios' order."""
    from scheduler.client import AsyncClient

    rng = random.Random(seed)
    client = AsyncClient(target)

    async def one(prompt_len: int, max_tokens: int, at: float, t0: float) -> list[float]:
        await asyncio.sleep(max(0.0, t0 + at - time.perf_counter()))
        prompt = [rng.randrange(50, 1000) for _ in range(prompt_len)]  # fresh: no prefix-cache hit
        stamps = []
        async for ch in client.stream(prompt, max_tokens=max_tokens, ignore_eos=True):
            if ch.token_ids:
                stamps.append(time.perf_counter())
        return stamps

    await one(32, 4, 0.0, time.perf_counter())  # warm the channels
    out: dict[str, list[float]] = {sc.name: [] for sc in SCENARIOS}
    for r in range(rounds):
        k = r % len(SCENARIOS)
        for sc in SCENARIOS[k:] + SCENARIOS[:k]:
            arr, prompt, toks = schedule(sc, **kw)
            t0 = time.perf_counter()
            got = await asyncio.gather(*(one(int(p), int(n), float(a), t0) for a, p, n in zip(arr, prompt, toks)))
            out[sc.name].append(statistics.mean((s[-1] - s[0]) / (len(s) - 1) for s in got[:2]))
            await asyncio.sleep(0.5)
    await client.close()
    return out


def paired(rounds: dict[str, list[float]]) -> dict[str, float]:
    """Median over rounds of each scenario's TPOT over the baseline's in the same round."""
    base = rounds["baseline"]
    return {k: float(np.median([x / b for x, b in zip(v, base)])) for k, v in rounds.items()}


@contextlib.contextmanager
def serving(config: Path):
    """``llmsched serve`` on a free loopback port until the block ends."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen([sys.executable, "-m", "scheduler.cli", "serve", "--config", str(config), "--port",
                                 str(port)], env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            _wait_serving(f"127.0.0.1:{port}", proc, timeout_s=180)
            yield f"127.0.0.1:{port}"
        finally:
            proc.terminate()
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()


def _wait_serving(target: str, proc: subprocess.Popen, timeout_s: float) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"llmsched serve exited with {proc.returncode}")
        with contextlib.suppress(grpc.RpcError), grpc.insecure_channel(target) as ch:
            resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=1.0)
            if resp.status == health_pb2.HealthCheckResponse.SERVING:
                return
        time.sleep(1.0)
    raise TimeoutError(f"llmsched serve at {target} not SERVING after {timeout_s:.0f} s")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="llmsched bench arrivals", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", required=True, help="an `llmsched run` report.json (or a fitted profile.json)")
    p.add_argument("--target", help="a running `llmsched serve` of cpu-pd (default: start one)")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--long", type=int, default=200, help="tokens of each long stream")
    p.add_argument("--arrivals", type=int, default=6)
    p.add_argument("--gap", type=float, default=0.15, help="seconds between arrivals")
    p.add_argument("--json")
    args = p.parse_args(argv)
    kw = {"long": args.long, "arrivals": args.arrivals, "gap_s": args.gap, "start_s": 0.1}

    with tempfile.TemporaryDirectory() as tmp:
        try:
            prof = fitted_profile(Path(args.profile), Path(tmp))
        except (OSError, ValueError) as e:  # missing, unreadable or not JSON: say which, no traceback
            p.error(f"--profile: {e}")
        sim = {sc.name: simulated_tpot(prof, sc, **kw) for sc in SCENARIOS}
    with contextlib.ExitStack() as stack:
        target = args.target or stack.enter_context(serving(CONFIG))
        live = asyncio.run(live_rounds(target, rounds=args.rounds, **kw))
    live_ratio = paired(live)
    sim_ratio = {k: v / sim["baseline"] for k, v in sim.items()}
    print(f"{'arrivals':>10} | {'live TPOT':>9} | {'x baseline':>10} | {'sim TPOT':>8} | {'x baseline':>10}")
    for sc in SCENARIOS:
        k = sc.name
        print(f"{k:>10} | {statistics.median(live[k]) * 1e3:7.2f}ms | {live_ratio[k]:10.3f} | "
              f"{sim[k] * 1e3:6.2f}ms | {sim_ratio[k]:10.3f}")
    if args.json:
        doc = {"what": "long streams' TPOT with arrivals over the baseline's (live: paired per round, median)",
               "profile": args.profile, "params": kw, "rounds": args.rounds, "live_tpot_s": live,
               "live_ratio": live_ratio, "sim_tpot_s": sim, "sim_ratio": sim_ratio}
        Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
