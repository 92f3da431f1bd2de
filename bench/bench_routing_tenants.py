"""Lookahead routing on a two-tenant mix with per-tenant vs shared online length learning (simulator).

No per-request trace in ../shared/data names a tenant (BurstGPT's ``<Model>/<Log Type>`` column is the loader's
tenant, but its data is stored only as Git-LFS pointers there), so the mix is built from two real datasets whose
answers differ at the same prompt length: ``chat`` = the Azure LLM 2023 conversation trace (its first
``--minutes``, its own timestamps) and ``summarise`` = Vidur's arXiv-summarisation length pairs (no timestamps:
Poisson arrivals at the chat requests' mean rate, a seeded sample). Between 1k and 2k prompt tokens chat answers
~400 tokens and summaries ~160; between 250 and 500, ~90 and ~2200. The tenant names are ones the shipped trace
predictor does not know, as a new deployment's apps are (it guesses their pooled mix), and the arrivals are
scaled to ``--load`` of the cluster's saturation rate (``sim.compare.saturation_rate``, least-outstanding).

Rows, all lookahead (the simulator predicts each request as it arrives and learns it when it finishes, as a live
ingress does): ``oracle`` (the true lengths), ``online_per_tenant`` (``params: {online: true}``, the tenant column
kept), ``online_shared`` (the same, the tenant column dropped: one history), ``shipped`` (the trace predictor,
no learning; its pooled guess, over every dataset it was fitted on), ``shipped_named`` (the same told each request's
dataset under the name it was fitted on: in-sample, a reference), ``none`` (no prediction). Printed: mean E2E,
P99 TTFT, SLO attainment, per-tenant MAE of the guess, and ratios against ``online_shared`` in the same run.

    python bench/bench_routing_tenants.py [--data DIR] [--minutes 20] [--load 0.8] [--config default] [--json OUT]
        [--tpot-miss-penalty S] [--steady-batch | --batch-model {drain,steady,refill}]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_routing import batch_model_params
from scheduler.config.load import load_config
from scheduler.policy.route import make_router
from scheduler.predict.metrics import kendall_tau
from sim.commands import with_predictor
from sim.compare import at_load, saturation_rate
from sim.metrics import request_metrics, sim_summary
from sim.simulator import Simulator, Workload
from sim.traces import load_trace

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
# The names the shipped trace predictor was fitted on these datasets under (``shipped_named``).
FITTED_AS = {"chat": "azure_conv", "summarise": "arxiv_summarization"}
CHAT, SUMMARISE = "azure_llm_2023_conv.csv.gz", "vidur_arxiv_summarization_stats_llama2_tok.csv.gz"


def mixed_workload(data: Path, minutes: float, seed: int) -> Workload:
    """``chat`` (Azure conversation, its first ``minutes``) + as many ``summarise`` requests (arXiv length pairs,
    Poisson at the same mean rate), merged by arrival."""
    chat = load_trace(data / CHAT)
    keep = chat.arrival_s < chat.arrival_s[0] + 60.0 * minutes
    arrival_c = np.asarray(chat.arrival_s[keep], dtype=float) - float(chat.arrival_s[0])
    n = len(arrival_c)
    summ = load_trace(data / SUMMARISE)
    rng = np.random.default_rng(seed)
    pick = rng.choice(len(summ), n, replace=False)
    arrival_s = np.cumsum(rng.exponential(arrival_c[-1] / n, n))
    arrival = np.concatenate([arrival_c, arrival_s])
    prompt = np.concatenate([chat.prompt_tokens[keep], summ.prompt_tokens[pick]]).astype(np.int64)
    output = np.concatenate([chat.output_tokens[keep], summ.output_tokens[pick]]).astype(np.int64)
    tenant = np.array(["chat"] * n + ["summarise"] * n, dtype=object)
    order = np.argsort(arrival, kind="stable")
    return Workload(arrival[order], prompt[order], output[order], tenant=tenant[order].tolist(),
                    name=f"azure_conv_{minutes:g}min+arxiv_summarization")


def twin_workload(n: int, seed: int) -> Workload:
    """``bench_online_tenants``'s synthetic mix (one prompt-length distribution; ``chat`` answers ~20 tokens,
    ``summarise`` ~500), Poisson arrivals: the tenant alone tells the lengths apart."""
    from bench.bench_online_tenants import workload

    prompt, output, tenants = workload(n, seed)
    arrival = np.cumsum(np.random.default_rng(seed + 1).exponential(1.0, n))
    return Workload(arrival, prompt, output, tenant=tenants, name="bench_online_tenants_synthetic")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="llmsched bench routing-tenants", description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=SHARED, help="the folder holding the two datasets")
    ap.add_argument("--minutes", type=float, default=20.0, help="of the Azure trace (--mix real)")
    ap.add_argument("--mix", choices=("real", "synthetic"), default="real",
                    help="real: Azure conversation + arXiv summarisation; synthetic: bench_online_tenants' mix")
    ap.add_argument("--n", type=int, default=6000, help="requests of --mix synthetic")
    ap.add_argument("--load", type=float, default=0.8)
    ap.add_argument("--config", default="default")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tpot-miss-penalty", type=float, default=None,
                    help="lookahead's tpot_miss_penalty_s (default: its own; 1.0 = the mean-E2E weight of the IR study)")
    ap.add_argument("--steady-batch", action="store_true",
                    help="lookahead's steady_batch (a newcomer's decode batch keeps its size; default: it drains)")
    ap.add_argument("--batch-model", choices=("drain", "steady", "refill"),
                    help="lookahead's batch_model (refill: residents leave, arrivals refill; default: drain)")
    ap.add_argument("--json")
    args = sys.argv[1:] if argv is None else argv
    a = ap.parse_args(args)
    cfg = load_config(a.config)
    w = mixed_workload(a.data, a.minutes, a.seed) if a.mix == "real" else twin_workload(a.n, a.seed)
    sat = saturation_rate(cfg, w)
    w = at_load(w, a.load, sat)
    tenants = np.asarray(w.tenant, dtype=object)
    params = {} if a.tpot_miss_penalty is None else {"tpot_miss_penalty_s": a.tpot_miss_penalty}
    if a.steady_batch and a.batch_model not in (None, "steady"):
        ap.error(f"--steady-batch contradicts --batch-model {a.batch_model}")
    params.update(batch_model_params("steady" if a.steady_batch else a.batch_model or "drain"))
    out: dict = {"trace": w.name, "requests": len(w), "config": a.config, "load": a.load, "saturation_rps": sat,
                 "seed": a.seed, "router": "lookahead", "lookahead_params": params,
                 "command": " ".join(["python bench/bench_routing_tenants.py", *args])}
    for name in ("chat", "summarise"):
        m = tenants == name
        out[f"{name}_lengths"] = {"requests": int(m.sum()),
                                  "prompt_median": float(np.median(w.prompt_tokens[m])),
                                  "output_median": float(np.median(w.output_tokens[m]))}
    plain = Workload(w.arrival_s, w.prompt_tokens, w.output_tokens, name=w.name)
    online = with_predictor(cfg, "trace", online=True)
    rows = {"oracle": (cfg, Workload(w.arrival_s, w.prompt_tokens, w.output_tokens, tenant=w.tenant,
                                     predicted_output=w.output_tokens.astype(float), name=w.name)),
            "online_per_tenant": (online, Workload(w.arrival_s, w.prompt_tokens, w.output_tokens, tenant=w.tenant,
                                                   name=w.name)),
            "online_shared": (online, plain),
            "shipped": (with_predictor(cfg, "trace"), plain),
            # the shipped predictor told each request's dataset by the name it was fitted on (in-sample: the
            # reference a refit on the deployment's own log with tenants would approach)
            **({"shipped_named": (with_predictor(cfg, "trace"), Workload(
                w.arrival_s, w.prompt_tokens, w.output_tokens, name=w.name,
                tenant=[FITTED_AS[t] for t in w.tenant]))} if a.mix == "real" else {}),
            "none": (cfg, plain)}
    y = w.output_tokens.astype(float)
    for label, (c, wl) in rows.items():
        res = Simulator(c, router=make_router("lookahead", config=c, **params), seed=a.seed).run(wl)
        s, m = sim_summary(res), request_metrics(res)
        row = out[label] = {"e2e_mean_s": float(np.nanmean(m.e2e_s)), "ttft_p99_s": s["ttft_s"]["p99"],
                            "slo_attainment": s["slo_attainment"]}
        guess = res.workload.predicted_output
        if guess is not None:
            row["kendall_tau"] = round(kendall_tau(guess, y), 4)
            for name in ("chat", "summarise"):
                k = tenants == name
                row[f"mae_{name}"] = round(float(np.mean(np.abs(guess[k] - y[k]))), 1)
        print(label, json.dumps(row), flush=True)
    base = out["online_shared"]
    out["per_tenant_vs_shared"] = {
        "e2e_mean": round(out["online_per_tenant"]["e2e_mean_s"] / base["e2e_mean_s"], 4),
        "ttft_p99": round(out["online_per_tenant"]["ttft_p99_s"] / base["ttft_p99_s"], 4),
        "slo_attainment_points": round(100 * (out["online_per_tenant"]["slo_attainment"]
                                              - base["slo_attainment"]), 2)}
    gap = base["e2e_mean_s"] - out["oracle"]["e2e_mean_s"]
    out["per_tenant_vs_shared"]["oracle_e2e_gap_closed"] = (
        round((base["e2e_mean_s"] - out["online_per_tenant"]["e2e_mean_s"]) / gap, 3) if gap else None)
    print(json.dumps(out["per_tenant_vs_shared"]))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
