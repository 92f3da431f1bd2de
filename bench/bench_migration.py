"""``llmsched bench migration``: live-migration downtime vs context length, against recompute and blocking copy.

One local Ray cluster with two tiny-Llama vLLM-CPU instances (prefix caching on, caches emptied before each run).
For each context length, one unmigrated reference run, then ``--repeats`` runs of each mode, each migrating the
request A -> B once after ``--after`` tokens:

* ``live``      -- the multi-stage protocol (pre-copy while decoding, short stop-and-copy, commit);
* ``blocking``  -- stop, copy all KV, commit (same driver, no pre-copy stage);
* ``recompute`` -- stop, copy nothing, the destination re-prefills prompt + generated tokens.

Downtime is what the consumer of the token stream sees (``IngressAPI.generate``, the stream the gRPC server
forwards): the gap between the arrival of the last chunk produced by A and the first chunk produced by B. The
median over repeats is reported. ``identical_outputs``: every migrated run's tokens equal the reference's.

    llmsched bench migration --json docs/results/migration.json
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import itertools
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from scheduler.engine.tiny_model import TinyModelSpec

CONTEXTS = (256, 1024, 2048, 4096, 8192, 16384)  # up to the tiny model's max (TinyModelSpec)
MODES = ("live", "blocking", "recompute")
# Ablation of the live mode: the destination admits R at the commit instead of during the pre-copy
# (``MigrationConfig.preadmit=False``, the protocol before pre-admission).
ABLATION = "live_admit_at_commit"


def _median(values: list[float]) -> float:
    """Median of a mode's repeats; NaN when none committed."""
    return statistics.median(values) if values else float("nan")


async def _one(ing: Any, rid: str, prompt: tuple[int, ...], n: int, after: int, mode: str | None,
               dst: str | None) -> dict[str, Any]:
    if mode == ABLATION:
        base = ing.migration_config
        ing.migration_config = dataclasses.replace(base, preadmit=False)
        try:
            return await _one(ing, rid, prompt, n, after, "live", dst)
        finally:
            ing.migration_config = base
    from scheduler.control.api import GenerateRequest
    from scheduler.engine.base import SamplingParams

    arrivals: list[tuple[float, int, str]] = []  # (time, tokens so far, instance that produced the chunk)
    tokens: list[int] = []
    res: list[Any] = []

    async def mover() -> None:
        while len(tokens) < after:
            await asyncio.sleep(0.001)
        t0 = time.perf_counter()
        r = await ing.migrate(rid, dst, mode=mode)
        res.append((r, time.perf_counter() - t0))

    task = asyncio.create_task(mover()) if mode is not None else None
    req = GenerateRequest(rid, prompt_token_ids=prompt, sampling=SamplingParams(max_tokens=n, ignore_eos=True))
    async for c in ing.generate(req):
        if c.token_ids:
            # The chunk's own instance_id (stamped by the control plane), not the registry at arrival time: a
            # chunk from A that arrives after the commit must still count as A's.
            arrivals.append((time.perf_counter(), len(tokens), c.instance_id))
            tokens.extend(c.token_ids)
    if task is not None:
        await task
    out: dict[str, Any] = {"tokens": tokens}
    if res:
        r, total = res[0]
        out.update(committed=r.committed, reason=r.reason, total_s=total, stages=r.stages,
                   admit_s=r.downtime_s)  # driver-side: stop issued -> destination admitted the request
        src_last = [a for a in arrivals if a[2] == r.source]
        dst_first = [a for a in arrivals if a[2] == r.destination]
        if r.committed and src_last and dst_first:
            out["downtime_s"] = dst_first[0][0] - src_last[-1][0]
            out["context_tokens"] = len(prompt) + dst_first[0][1] - 1
        # NOTE(bench): the normal inter-token gap on A, for scale, and on B once it streams (at the same context
        # as the gap; what an unmigrated request would have waited for that token anyway).
        gaps = [y[0] - x[0] for x, y in itertools.pairwise(src_last)]
        out["tpot_s"] = statistics.median(gaps) if gaps else 0.0
        dgaps = [y[0] - x[0] for x, y in itertools.pairwise(dst_first[:9])]
        if "downtime_s" in out and dgaps:
            out["excess_s"] = out["downtime_s"] - statistics.median(dgaps)
    return out


async def _reset_caches(ing: Any) -> None:
    ok = await asyncio.gather(*(h.reset_prefix_cache.remote() for h in ing.instance_handles().values()))
    if not all(ok):
        raise RuntimeError("prefix cache reset refused (blocks still in use?)")


async def _bench(args: argparse.Namespace) -> dict[str, Any]:
    from scheduler.config.load import load_config
    from scheduler.config.models import ClusterConfig
    from scheduler.control.cluster import start_local_cluster

    root = Path(__file__).resolve().parents[1]
    raw = load_config(root / "scheduler" / "config" / "examples" / "tiny-cpu.yaml").model_dump()
    raw["pools"][0]["count"] = 2
    raw["model"]["max_model_len"] = args.max_model_len
    raw["pools"][0]["engine"]["num_kv_blocks"] = 4 * args.max_model_len // raw["pools"][0]["engine"]["block_size"]
    cfg = ClusterConfig.model_validate(raw)
    # Prefix caching on, as in a real deployment (the live fast path adopts staged blocks through it); every
    # run starts from empty caches, so recompute cannot hit blocks an earlier run left behind.
    kw = {"kv_cache_bytes": 160 << 20, "enable_prefix_caching": True, "max_num_seqs": 8, "cpu_threads_bind": "nobind"}
    cluster = await asyncio.to_thread(start_local_cluster, cfg, backend_kwargs={"vllm": kw})
    ing = cluster.ingress
    result: dict[str, Any] = {k: [] for k in ("context_tokens", "downtime_s", "recompute_downtime_s",
                                               "blocking_downtime_s", "total_s", "recompute_total_s",
                                               "blocking_total_s", "tpot_s", "stages", "admit_s",
                                               "recompute_admit_s", "excess_downtime_s",
                                               "recompute_excess_downtime_s")}
    identical = True
    try:
        await ing.start()
        n = args.after + args.decode
        for ctx in args.contexts:
            prompt_len = min(ctx, cfg.model.max_model_len - n) - args.after
            prompt = tuple((i * 7919 + ctx) % 1000 + 3 for i in range(prompt_len))
            ref = (await _one(ing, f"ref-{ctx}", prompt, n, args.after, None, None))["tokens"]
            modes = (*MODES, ABLATION) if args.ablation else MODES
            per: dict[str, list[dict[str, Any]]] = {m: [] for m in modes}
            for rep in range(args.repeats):
                for mode in modes:
                    await _reset_caches(ing)
                    r = await _one(ing, f"{mode}-{ctx}-{rep}", prompt, n, args.after, mode, None)
                    if not r.get("committed"):
                        print(f"  {mode} ctx={ctx}: not committed: {r.get('reason')}", file=sys.stderr)
                        identical = False
                        continue
                    identical &= r["tokens"] == ref
                    per[mode].append(r)
            med = {m: _median([x["downtime_s"] for x in per[m]]) for m in modes}
            tot = {m: _median([x["total_s"] for x in per[m]]) for m in modes}
            exc = {m: _median([x["excess_s"] for x in per[m] if "excess_s" in x]) for m in modes}
            result["excess_downtime_s"].append(exc["live"])
            result["recompute_excess_downtime_s"].append(exc["recompute"])
            if args.ablation:
                result.setdefault("admit_at_commit_downtime_s", []).append(med[ABLATION])
                result.setdefault("admit_at_commit_excess_downtime_s", []).append(exc[ABLATION])
                result.setdefault("admit_at_commit_admit_s", []).append(_median([x["admit_s"] for x in per[ABLATION]]))
            live = per["live"]
            result["context_tokens"].append(int(statistics.median(x["context_tokens"] for x in live)) if live else ctx)
            result["downtime_s"].append(med["live"])
            result["recompute_downtime_s"].append(med["recompute"])
            result["blocking_downtime_s"].append(med["blocking"])
            result["total_s"].append(tot["live"])
            result["recompute_total_s"].append(tot["recompute"])
            result["blocking_total_s"].append(tot["blocking"])
            result["tpot_s"].append(_median([x["tpot_s"] for x in live]))
            result["admit_s"].append(_median([x["admit_s"] for x in live]))
            result["recompute_admit_s"].append(_median([x["admit_s"] for x in per["recompute"]]))
            result["stages"].append(statistics.median(x["stages"] for x in live) if live else 0)
            print(f"ctx {result['context_tokens'][-1]:5d}: downtime live {med['live'] * 1e3:6.1f} ms "
                  f"(excess over B's TPOT {exc['live'] * 1e3:5.1f} ms), blocking {med['blocking'] * 1e3:6.1f} ms, "
                  f"recompute {med['recompute'] * 1e3:6.1f} ms; total live {tot['live'] * 1e3:6.1f} ms"
                  + (f"; admit-at-commit {med[ABLATION] * 1e3:6.1f} ms (excess {exc[ABLATION] * 1e3:5.1f})"
                     if args.ablation else ""), file=sys.stderr)
    finally:
        await ing.close()
        await asyncio.to_thread(cluster.shutdown)
    d = result["downtime_s"]
    result["identical_outputs"] = bool(identical)
    result["downtime_flatness"] = max(d) / min(d) if d and min(d) > 0 else float("nan")
    e = result["excess_downtime_s"]
    result["excess_downtime_flatness"] = max(e) / min(e) if e and min(e) > 0 else float("nan")
    result["recompute_over_live_at_longest"] = (result["recompute_downtime_s"][-1] / d[-1]) if d else float("nan")
    result["blocking_over_live_at_longest"] = (result["blocking_downtime_s"][-1] / d[-1]) if d else float("nan")
    result["config"] = {"model": "tiny-llama (2 layers, hidden 128, fp32)", "instances": 2, "backend": "vllm-cpu",
                        "after_tokens": args.after, "decode_tokens": args.decode, "repeats": args.repeats,
                        "downtime": "client-observed gap, last chunk from A -> first chunk from B (median)",
                        "excess_downtime": "that gap minus the median gap between B's next chunks (B's own TPOT at "
                                           "this context: what the token would have taken unmigrated)"}
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="llmsched bench migration", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", type=Path, help="write the result JSON here")
    ap.add_argument("--contexts", type=int, nargs="+", default=list(CONTEXTS))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-model-len", type=int, default=TinyModelSpec().max_position_embeddings,
                    help="the engines' max_model_len (default: the tiny model's max)")
    ap.add_argument("--after", type=int, default=16, help="migrate after this many tokens")
    ap.add_argument("--ablation", action="store_true",
                    help="also run live migrations that admit at the commit (no pre-admission)")
    ap.add_argument("--decode", type=int, default=160,
                    help="tokens generated after the migration point (long enough for the pre-copy stages of the longest context)")
    args = ap.parse_args(argv)
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    res = asyncio.run(_bench(args))
    text = json.dumps(res, indent=2)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    print(text)
    return 0 if res["identical_outputs"] else 1


if __name__ == "__main__":
    sys.exit(main())
