"""Admission control in the simulator: a real trace past saturation, two priority classes, with and without
``policies.admission`` (the policy the live Ingress applies: ``bench/bench_overload.py --phases admission``).

The Azure LLM 2023 conversation trace (``--trace``; default the vendored first 10 minutes) on the ``default``
cluster cut to ``--instances`` (Llama-2-7B, A100, MIXED), arrivals scaled to ``--load`` x the cluster's saturation
rate (``sim.compare.saturation_rate``, least-outstanding). A seeded ``--protected-share`` of the requests is
priority 1, the rest 0; both classes have the config's SLO (TTFT 2 s, TPOT 100 ms). Rows: ``none`` (no admission
policy: every request queues) and ``admission`` (``bounded``, ``max_queued`` {0: ``--queue-low``, 1:
``--queue-protected``}). Per class: refused fraction, SLO attainment (a refused request is a miss), TTFT / TPOT
p99 of the served.

    python bench/bench_admission_sim.py [--trace PATH] [--load 1.8] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scheduler.config.load import load_config
from scheduler.policy.admission import AdmissionPolicy
from sim.commands import with_instances
from sim.compare import at_load, saturation_rate
from sim.metrics import request_metrics
from sim.simulator import Simulator, Workload
from sim.traces import load_trace

VENDORED = Path(__file__).resolve().parents[1] / "sim/data/azure_llm_2023_conv_first10min.csv.gz"


def per_class(res, w: Workload) -> dict[int, dict[str, float | int | None]]:
    m = request_metrics(res)
    ttft, tpot = res.first_token_s - w.arrival_s, m.tpot_s
    refused = res.admission_rejected if res.admission_rejected is not None else np.zeros(len(w), dtype=bool)
    out: dict[int, dict[str, float | int | None]] = {}
    for p in np.unique(w.priority):
        sel = w.priority == p
        served = sel & ~res.rejected

        def p99(x: np.ndarray, sel: np.ndarray = served) -> float | None:
            x = x[sel & np.isfinite(x)]
            return round(float(np.percentile(x, 99)), 3) if len(x) else None

        out[int(p)] = {"requests": int(sel.sum()), "refused": int(refused[sel].sum()),
                       "refused_fraction": round(float(refused[sel].mean()), 4),
                       "slo_attainment": round(float(m.slo_met[sel].mean()), 4),
                       "ttft_p99_s": p99(ttft), "tpot_p99_s": p99(tpot)}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trace", type=Path, default=VENDORED)
    p.add_argument("--instances", type=int, default=2)
    p.add_argument("--load", type=float, default=1.8, help="offered rate / the cluster's saturation rate")
    p.add_argument("--protected-share", type=float, default=0.25)
    p.add_argument("--queue-low", type=int, default=1)
    p.add_argument("--queue-protected", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    base = load_config("default")
    cfg = with_instances(base.model_copy(update={"slos": {**base.slos, 1: base.slos[0]}}), args.instances)
    trace = load_trace(str(args.trace))
    w = Workload.from_trace(trace)
    sat = saturation_rate(cfg, w, seed=args.seed)
    w = at_load(w, args.load, sat)
    prio = (np.random.default_rng(args.seed).random(len(w)) < args.protected_share).astype(np.int64)
    w = Workload(arrival_s=w.arrival_s, prompt_tokens=w.prompt_tokens, output_tokens=w.output_tokens, priority=prio,
                 name=w.name)
    policy = AdmissionPolicy(max_queued={0: args.queue_low, 1: args.queue_protected}, protected_priority=1)
    rows = {name: per_class(Simulator(cfg, admission=adm, seed=args.seed).run(w), w)
            for name, adm in (("none", None), ("admission", policy))}
    result = {"trace": trace.name, "requests": len(w), "config": f"default x{args.instances} (llama2-7b, a100)",
              "saturation_rps": round(sat, 3), "load": args.load, "offered_rps": round(w.rate_rps, 3),
              "protected_share": args.protected_share, "max_queued": policy.max_queued, "rows": rows}
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
