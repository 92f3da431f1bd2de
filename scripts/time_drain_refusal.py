"""Where a request goes when a replica's view is older than a drain, and what the drained instance's refusal costs.

A local Ray cluster of simulated instances (2 PREFILL h100, 2 DECODE a100, llama-7b); per request a fresh ingress
whose view is the one it took at its start (``refresh_s`` an hour): its router pairs prefill-0 with decode-0 (least
outstanding, ties in view order). Then, in turn: nothing drained, prefill-0 drained, decode-0 drained (an admin
drain through the Controller, undone after the request). Prints per case the median time to the first token and to
the last, where they came from, the refusals, and the prompt tokens computed and loaded per request (all engines).
Then ``decode-0, 2 paired``: two requests paired with decode-0 at arrival (``PinnedRouter``), the second one's
handoff later (a long prompt on prefill-1): the refused submits per handoff once the first one's was refused.
The ``switched`` cases: prefill-0 switched to DECODE, or decode-0 to PREFILL (an operator's ``switch_role``, finished
before the request; switched back after), under the same stale view: refused for the role the view showed
(``Instance.submit``'s ``view_role``).

    PYTHONPATH=. python scripts/time_drain_refusal.py --rounds 10
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.loadgen import cluster_config
from scheduler.control.api import GenerateRequest
from scheduler.control.cluster import start_local_cluster
from scheduler.engine.base import SamplingParams
from scheduler.policy.route import Router

CASES = ("none", "prefill-0", "decode-0", "prefill-0 switched", "decode-0 switched")
_SWITCH = {"prefill-0": ("decode", "prefill"), "decode-0": ("prefill", "decode")}  # (to, back)
LONG_PROMPT = 3000  # prefills on prefill-1 while the short request's handoff is refused


class PinnedRouter(Router):
    """Pairs each request with the instances named for it (request id -> ids), the accepting ones in id order else:
    the pairings at arrival a stale replica's router made, whatever the load."""

    name = "pinned"

    def __init__(self, pins: dict[str, tuple[str, ...]]) -> None:
        self.pins = pins

    def score(self, request: Any, inst: Any, *, phase: str) -> Any:
        return (inst.instance_id not in self.pins.get(request.request_id, ()), inst.instance_id)


async def _prompt_tokens(dep: Any) -> tuple[int, int]:
    members = await dep.controller.members.remote()
    stats = await asyncio.gather(*(m.handle.stats.remote() for m in members.values()))
    return sum(s.prompt_tokens_computed for s in stats), sum(s.prompt_tokens_loaded for s in stats)


async def switch_and_wait(dep: Any, iid: str, role: str, timeout_s: float = 30.0) -> None:
    """``iid`` switched to ``role`` through the Controller (an operator's ``switch_role``: drained, switched once idle,
    un-drained), and serving again."""
    assert await dep.controller.switch_role.remote(iid, role)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        view = await dep.controller.view.remote()
        snap = next((x for x in view.instances if x.instance_id == iid), None)
        if snap is not None and snap.role.value == role and not snap.draining:
            return
        await asyncio.sleep(0.05)
    raise RuntimeError(f"{iid} not switched to {role} in {timeout_s} s")


async def _one(dep: Any, case: str, rid: str, prompt: int, tokens: int) -> dict[str, Any]:
    ing = dep.make_ingress(refresh_s=3600.0)
    await ing.start()
    computed, loaded = await _prompt_tokens(dep)
    drained, switched = case.removesuffix(" switched"), case.endswith(" switched")
    if switched:
        await switch_and_wait(dep, drained, _SWITCH[drained][0])
    elif drained != "none":
        await dep.controller.set_draining.remote(drained, True)
    req = GenerateRequest(rid, prompt_token_ids=tuple(range(1, prompt + 1)),
                          sampling=SamplingParams(max_tokens=tokens, ignore_eos=True))
    try:
        t0 = time.perf_counter()
        chunks, first = [], None
        async for c in ing.generate(req):
            if first is None and c.token_ids:
                first = time.perf_counter() - t0
            chunks.append(c)
        end = time.perf_counter() - t0
    finally:
        await ing._report()  # its request's end: the Controller's registry would hold a switch back 30 s
        if switched:
            await switch_and_wait(dep, drained, _SWITCH[drained][1])
        elif drained != "none":
            await dep.controller.set_draining.remote(drained, False)
        await ing.close()
    computed2, loaded2 = await _prompt_tokens(dep)
    return {"first_s": first, "end_s": end, "first_on": chunks[0].instance_id, "last_on": chunks[-1].instance_id,
            "refused": ing.counters.get("drain_refused", 0) + ing.counters.get("role_refused", 0),
            "recoveries": ing.counters["recoveries"], "computed": computed2 - computed, "loaded": loaded2 - loaded}


async def _two_paired(dep: Any, r: int, prompt: int, tokens: int) -> dict[str, Any]:
    """Two requests paired with decode-0 before it leaves: the refusals their two handoffs paid."""
    long, short = f"r{r}-long", f"r{r}-short"
    ing = dep.make_ingress(refresh_s=3600.0, router=PinnedRouter({long: ("prefill-1", "decode-0"),
                                                                  short: ("prefill-0", "decode-0")}))
    await ing.start()
    await dep.controller.set_draining.remote("decode-0", True)

    async def one(rid: str, n: int) -> str:
        req = GenerateRequest(rid, prompt_token_ids=tuple(range(1, n + 1)),
                              sampling=SamplingParams(max_tokens=tokens, ignore_eos=True))
        return [c async for c in ing.generate(req)][-1].instance_id

    try:
        first = asyncio.create_task(one(long, LONG_PROMPT))
        while ing.counters["routed"] < 1:  # paired before the short one's refusal
            await asyncio.sleep(0.001)
        on = [await one(short, prompt), await first]
    finally:
        await dep.controller.set_draining.remote("decode-0", False)
        await ing.close()
    return {"refused": ing.counters["drain_refused"], "handoffs": ing.counters["handoffs"], "last_on": on}


async def _run(dep: Any, rounds: int, prompt: int, tokens: int) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {c: [] for c in (*CASES, "paired")}
    for r in range(rounds):
        for case in CASES:
            out[case].append(await _one(dep, case, f"r{r}-{case}", prompt, tokens))
        out["paired"].append(await _two_paired(dep, r, prompt, tokens))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--tokens", type=int, default=8)
    args = ap.parse_args()
    cluster = start_local_cluster(cluster_config("drain-refusal", mixed=0, prefill=2, decode=2),
                                  backend_kwargs={"simulated": {"time_scale": 0.5}})
    try:
        res = asyncio.run(_run(cluster.deployment, args.rounds, args.prompt, args.tokens))
    finally:
        cluster.shutdown()
    paired = res.pop("paired")
    for case, rows in res.items():
        first = statistics.median(r["first_s"] for r in rows) * 1e3
        end = statistics.median(r["end_s"] for r in rows) * 1e3
        on = collections.Counter(f"{r['first_on']}->{r['last_on']}" for r in rows)
        print(f"drained {case:18s}: first token median {first:.1f} ms, last {end:.1f} ms; ran {dict(on)}; "
              f"refusals {sum(r['refused'] for r in rows)}, recoveries {sum(r['recoveries'] for r in rows)}; "
              f"prompt tokens computed {sorted({r['computed'] for r in rows})}, "
              f"loaded {sorted({r['loaded'] for r in rows})} per request")
    refused, handoffs = sum(r["refused"] for r in paired), sum(r["handoffs"] for r in paired)
    on = collections.Counter(i for r in paired for i in r["last_on"])
    print(f"drained decode-0, 2 paired: {refused} refused submits for {handoffs} handoffs "
          f"({refused / max(handoffs, 1):.2f} per handoff); decoded on {dict(on)}")


if __name__ == "__main__":
    main()
