"""Routing, prediction and migration studies in the simulator (issue: routing by predicted length and mix).

    python bench/bench_routing.py ir          # Intelligent Router paper setting: 4 x Llama-2-7B, ~20 req/s
    python bench/bench_routing.py ir --steady-batch   # the same, lookahead's decode batch priced as steady
    python bench/bench_routing.py ir --batch-model refill   # ... as refilled at the observed arrival rate
    python bench/bench_routing.py predictor   # lookahead with oracle lengths vs the trace predictor vs none
    python bench/bench_routing.py migration   # migration on/off under bursty load (cost included)
    python bench/bench_routing.py scaling --json docs/results/scaling.json   # autoscaling vs static provisioning
    python bench/bench_routing.py rerole --json docs/results/routing_rerole.json  # P/D re-roling vs static roles
    python bench/bench_routing.py shed --json docs/results/routing_shed.json      # SLO shedding (lookahead_shed)
    python bench/bench_routing.py shed --head 400 --instances 2   # a quick check of the shed study (not a result)
    python bench/bench_routing.py shed_mooncake --json docs/results/routing_shed_mooncake.json
    python bench/bench_routing.py shed_learned_mooncake --json docs/results/routing_shed_learned_mooncake.json
    python bench/bench_routing.py length_hints --json docs/results/routing_length_hints.json  # length guesses
    python bench/bench_routing.py capacity --json docs/results/routing_azure_capacity.json  # overload, per router
    python bench/bench_routing.py batch_models --json docs/results/routing_batch_models_azure_16.json  # lookahead
    python bench/bench_routing.py all --json docs/results/routing_studies.json

Every number is a ratio against a baseline simulated in the same run, on the named trace and config.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

# Run as a script: import this checkout, not whatever `scheduler` an editable install elsewhere points at.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scheduler.cli_args import positive_int
from scheduler.config.load import load_config
from sim.commands import with_predictor
from sim.compare import GOODPUT_ITERS, at_load, router_factory, saturation_rate
from sim.metrics import request_metrics, sim_summary
from sim.simulator import Simulator, Workload
from sim.traces import load_trace, synthetic
from sim.traces.synthetic import LogNormal

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
DATA = Path(__file__).resolve().parents[1] / "sim" / "data"  # vendored trace slices


def azure_conv_trace():
    """The whole Azure conversation trace from ../shared when this checkout sits beside it, else the vendored
    10-minute slice."""
    path = SHARED / "azure_llm_2023_conv.csv.gz"
    return load_trace(path if path.exists() else DATA / "azure_llm_2023_conv_first10min.csv.gz")


def ir_workload(n: int = 6000, rate: float = 20.0, seed: int = 0) -> Workload:
    """Jain et al. 2024's mix: half prefill-heavy (long prompt, short answer), half decode-heavy."""
    rng = np.random.default_rng(seed)
    heavy_p = rng.random(n) < 0.5
    t = synthetic(n, rate, seed=seed)
    prompt = np.where(heavy_p, rng.integers(1500, 3000, n), rng.integers(50, 200, n))
    output = np.where(heavy_p, rng.integers(10, 60, n), rng.integers(300, 800, n))
    return Workload(t.arrival_s, prompt.astype(np.int64), output.astype(np.int64),
                    predicted_output=output.astype(float), name="ir_mixed_synthetic")


def fit_history_predictor(history: Workload, out_dir: Path, tenant: str) -> Path:
    """What ``llmsched predict fit-trace`` writes, fitted on an earlier stretch of the same deployment's requests:
    the trace predictor's artifact folder for ``policies.predictor: {name: trace, params: {artifacts: ...}}``."""
    from scheduler.predict.trace import fit_trace

    out_dir.mkdir(parents=True, exist_ok=True)
    rows = list(zip(history.prompt_tokens.tolist(), history.output_tokens.tolist(), strict=True))
    fit_trace({tenant: rows}).save(out_dir / "trace.json")
    return out_dir


# The Intelligent Router study measures mean E2E, so lookahead there prices a missed TPOT like 1 s of summed
# latency (its objective weight; the default, 10 s, is for SLO attainment: docs/routing.md).
IR_LOOKAHEAD = {"tpot_miss_penalty_s": 1.0}


def ir_router(name: str, cfg, **lookahead: object):
    """The router of the Intelligent Router study: ``name`` from the registry, lookahead with ``IR_LOOKAHEAD`` (and
    ``lookahead``'s further parameters)."""
    from scheduler.policy.route import make_router

    if name == "lookahead":
        return make_router(name, config=cfg, **{**IR_LOOKAHEAD, **lookahead})
    return router_factory(name, cfg)()


def run(cfg, w: Workload, router: str, **kw) -> dict:
    res = Simulator(cfg, router=router_factory(router, cfg)(), **kw).run(w)
    s = sim_summary(res)
    m = request_metrics(res)
    s["e2e_mean_s"] = float(np.nanmean(m.e2e_s))
    s["ttft_mean_s"] = float(np.nanmean(m.ttft_s))
    return s


def batch_model_params(batch_model: str) -> dict:
    """lookahead's parameters for ``--batch-model`` (``steady``: ``steady_batch``, as its recorded results name it)."""
    if batch_model == "drain":
        return {}
    return {"steady_batch": True} if batch_model == "steady" else {"batch_model": batch_model}


def study_ir(batch_model: str = "drain") -> dict:
    """Mean E2E vs round-robin on the Intelligent Router setting, split by request class.

    Lengths: routers see ``predicted_output_tokens`` = the true lengths here (the paper's setting assumes a
    length predictor; this study is labelled oracle-length). ``lookahead`` is also run with no prediction, with
    the shipped trace predictor (fitted on public traces; alone, and learning online from the requests finished
    so far) and with the trace predictor fitted on another hour of the same mix (``ir_workload(seed=100)``, what ``llmsched predict fit-trace`` does on a deployment's log).
    lookahead runs with the mean-E2E objective weight ``IR_LOOKAHEAD``; one row shows its default SLO weights.
    ``batch_model``: every lookahead row with ``LookaheadRouter(batch_model=...)`` (``--batch-model``;
    ``--steady-batch`` is ``steady``).
    """
    import tempfile

    cfg = load_config("default")  # 4 x Llama-2-7B on A100, MIXED
    w = ir_workload()
    heavy = w.prompt_tokens >= 1500
    extra = batch_model_params(batch_model)
    flag = {"drain": "", "steady": " --steady-batch"}.get(batch_model, f" --batch-model {batch_model}")
    out: dict = {"trace": w.name, "config": "default (4 x llama2-7b a100)", "rate_rps": 20.0,
                 "lengths": "oracle predicted_output_tokens (the paper assumes a predictor)",
                 "lookahead_params": {**IR_LOOKAHEAD, **extra}, "command": "python bench/bench_routing.py ir" + flag}

    def one(make, wl: Workload, c=cfg) -> dict:
        res = Simulator(c, router=make(c)).run(wl)
        m = request_metrics(res)
        guess = res.workload.predicted_output  # what the router was told (None: no prediction)
        return {"e2e_mean_s": float(np.nanmean(m.e2e_s)), "ttft_p99_s": float(np.nanpercentile(m.ttft_s, 99)),
                "e2e_mean_prefill_heavy_s": float(np.nanmean(m.e2e_s[heavy])),
                "e2e_mean_decode_heavy_s": float(np.nanmean(m.e2e_s[~heavy])),
                "predicted_output_median": None if guess is None else {
                    "prefill_heavy": float(np.median(guess[heavy])), "decode_heavy": float(np.median(guess[~heavy]))}}

    def study(name: str):  # the study's router (lookahead with the mean-E2E weight)
        return lambda c: ir_router(name, c, **extra)

    base = out["round_robin"] = one(study("round_robin"), w)
    runs = [(r, study(r), w) for r in ("least_outstanding", "power_of_two", "llumnix", "mixing", "lookahead", "learned")]
    no_pred = Workload(w.arrival_s, w.prompt_tokens, w.output_tokens, name=w.name)
    runs += [("lookahead_no_prediction", study("lookahead"), no_pred),
             ("lookahead_default_slo_weights",
              lambda c: router_factory(":".join(["lookahead", *(f"{k}={json.dumps(v)}" for k, v in extra.items())]), c)(), w)]
    with tempfile.TemporaryDirectory() as d:
        fitted = fit_history_predictor(ir_workload(seed=100), Path(d), "ir")
        configs = {"lookahead_shipped_trace_predictor": with_predictor(cfg, "trace"),
                   # the shipped predictor learning from the requests finished so far (``params.online``)
                   "lookahead_shipped_trace_predictor_online": with_predictor(cfg, "trace", online=True),
                   "lookahead_fitted_trace_predictor": with_predictor(cfg, "trace", artifacts=str(fitted),
                                                                      tenant="ir")}
        for label, make, wl in runs + [(k, study("lookahead"), no_pred) for k in configs]:
            s = out[label] = one(make, wl, configs.get(label, cfg))
            s["e2e_improvement_vs_rr"] = 1 - s["e2e_mean_s"] / base["e2e_mean_s"]
    return out


def study_predictor() -> dict:
    """Lookahead router fed oracle lengths vs the shipped trace predictor (alone and learning online) vs no
    prediction (Azure trace)."""
    trace = azure_conv_trace()
    cfg = load_config("llama2-7b-a100-16")
    w = Workload.from_trace(trace)
    w = at_load(w, 0.8, saturation_rate(cfg, w))
    out = {"trace": trace.name, "config": "llama2-7b-a100-16", "load": 0.8}
    for label, po, c in (("oracle", w.output_tokens.astype(float), cfg),
                         ("trace_predictor", None, with_predictor(cfg, "trace")),  # policies.predictor
                         ("trace_predictor_online", None, with_predictor(cfg, "trace", online=True)),
                         ("none", None, cfg)):
        wl = Workload(w.arrival_s, w.prompt_tokens, w.output_tokens, predicted_output=po, name=w.name)
        s = run(c, wl, "lookahead")
        out[label] = {"ttft_p99_s": s["ttft_s"]["p99"], "e2e_mean_s": s["e2e_mean_s"],
                      "slo_attainment": s["slo_attainment"]}
    return out


def study_batch_models() -> dict:
    """lookahead's decode-batch models (``batch_model``: drain, steady, refill) on Azure x16 at load 0.8 (the
    ``routing_azure_16.json`` setting), each fed the true lengths, the shipped trace predictor and no prediction:
    goodput at 90% SLO attainment, mean E2E, P99 TTFT, SLO attainment. Without predictions drain and steady are one
    model (``O = R``, bit-identical): that row runs once, as drain."""
    from sim.commands import with_instances
    from sim.compare import compare

    trace = azure_conv_trace()
    cfg = with_instances(load_config("default"), 16)
    w = Workload.from_trace(trace)
    oracle = Workload(w.arrival_s, w.prompt_tokens, w.output_tokens, predicted_output=w.output_tokens.astype(float),
                      name=w.name)
    out: dict = {"trace": trace.name, "config": "default x16", "load": 0.8,
                 "command": "python bench/bench_routing.py batch_models", "rows": {}}
    for label, c, wl in (("oracle", cfg, oracle), ("trace_predictor", with_predictor(cfg, "trace"), w),
                         ("none", cfg, w)):
        models = ("drain", "refill") if label == "none" else ("drain", "steady", "refill")
        summaries, _, out["saturation_rps"] = compare(c, wl, [f"lookahead:batch_model={m}" for m in models], load=0.8)
        for m in models:
            s = summaries[f"lookahead:batch_model={m}"]
            row = out["rows"][f"{m}/{label}"] = {
                "goodput_rps": s["goodput_rps"], "e2e_mean_s": s["e2e_s"]["mean"], "ttft_p99_s": s["ttft_s"]["p99"],
                "slo_attainment": s["slo_attainment"], "preemptions": s["preemptions"]}
            print(m, label, json.dumps(row), flush=True)
    return out


def study_migration() -> dict:
    """Bursty arrivals (gamma CV 4) of long requests on KV-tight instances (Llama-2-7B on 24 GB L4s, so KV is the
    bottleneck and preemptions happen); migration off vs on (Llumnix policy), migration cost included. Four seeds
    per rate, under least-outstanding and Llumnix dispatch: one seed's P99 is a handful of requests in one burst."""
    from scheduler.policy.migration import make_migration_policy

    base = load_config("default")
    cfg = base.model_copy(update={"pools": [p.model_copy(update={"gpu": "l4"}) for p in base.pools]})
    seeds = (1, 2, 3, 4)
    out: dict = {"config": "default with gpu l4 (4 x llama2-7b, 24 GB)", "seeds": list(seeds), "runs": {}}
    for router in ("least_outstanding", "llumnix"):
        for rate in (0.3, 0.45):
            row: dict = {"trace": f"synthetic gamma cv=4, 1500 req @ {rate} req/s, seeds {list(seeds)}",
                         "router": router, "per_seed": []}
            for seed in seeds:
                t = synthetic(1500, rate, arrival="gamma", cv=4.0, seed=seed,
                              prompt=LogNormal.from_p50_p90(1000, 3000, max=3500),
                              output=LogNormal.from_p50_p90(300, 900, max=1500))
                w = Workload.from_trace(t)
                one: dict = {"seed": seed}
                for label, mig in (("off", None), ("on", make_migration_policy("llumnix"))):
                    sim = Simulator(cfg, router=router, migration=mig)
                    s = sim_summary(sim.run(w))
                    one[label] = {"ttft_p99_s": s["ttft_s"]["p99"], "ttft_p90_s": s["ttft_s"]["p90"],
                                  "tpot_p99_s": s["tpot_s"]["p99"], "preemptions": s["preemptions"],
                                  "migrations": s["migrations"], "slo_attainment": s["slo_attainment"]}
                    if sim.migrations is not None and sim.migrations.downtime_s:
                        one[label]["migration_downtime_p50_s"] = float(np.median(sim.migrations.downtime_s))
                        one[label]["migration_total_p50_s"] = float(np.median(sim.migrations.total_s))
                row["per_seed"].append(one)

            def ratio(key: str, rows=row["per_seed"]) -> float:  # geometric mean over seeds, on / off
                return float(np.exp(np.mean([np.log(r["on"][key] / r["off"][key]) for r in rows])))

            row["on_over_off"] = {"ttft_p99_geomean": ratio("ttft_p99_s"), "ttft_p90_geomean": ratio("ttft_p90_s"),
                                  "tpot_p99_geomean": ratio("tpot_p99_s")}
            for label in ("off", "on"):
                rs = [r[label] for r in row["per_seed"]]
                row[label] = {"preemptions": int(sum(r["preemptions"] for r in rs)),
                              "migrations": int(sum(r["migrations"] for r in rs)),
                              "slo_attainment_mean": float(np.mean([r["slo_attainment"] for r in rs]))}
            out["runs"][f"{router}@{rate}"] = row
    return out


def study_sweep() -> dict:
    """P99 TTFT of round-robin over the best router, across load, on the Azure trace (16 instances), and the floor
    under any router's P99: the P99 of the prompts' own prefill time on an idle instance (``prefill_p99_alone_s``);
    a 10x ratio needs round-robin's P99 at 10x that floor or more."""
    from sim.cluster import pool_latency
    from sim.commands import with_instances

    trace = azure_conv_trace()
    cfg = with_instances(load_config("default"), 16)
    w = Workload.from_trace(trace)
    sat = saturation_rate(cfg, w)
    lat = pool_latency(cfg, cfg.pools[0])
    floor = float(np.percentile([lat.prefill_time(int(p)) for p in w.prompt_tokens], 99))
    out: dict = {"trace": trace.name, "config": "default x16", "saturation_rps": sat, "prefill_p99_alone_s": floor,
                 "loads": {}}
    for load in (0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95):
        wl = at_load(w, load, sat)
        row = {r: run(cfg, wl, r) for r in ("round_robin", "least_outstanding", "llumnix", "mixing", "lookahead",
                                            "learned")}
        p99 = {r: s["ttft_s"]["p99"] for r, s in row.items()}
        best = min((v, r) for r, v in p99.items() if r != "round_robin")
        out["loads"][load] = {"ttft_p99_s": p99, "best": best[1], "rr_over_best": p99["round_robin"] / best[0],
                              "slo_attainment": {r: s["slo_attainment"] for r, s in row.items()}}
    return out


CAPACITY_ROUTERS = ("round_robin", "least_outstanding", "power_of_two", "llumnix", "mixing", "lookahead", "learned")


def study_capacity(routers: tuple[str, ...] = CAPACITY_ROUTERS) -> dict:
    """What each router completes of the Azure mix on 16 A100s under overload: ``saturation_rate`` routed by it
    (completions over the second half of evenly spaced arrivals), and at one offered rate for all (twice
    least-outstanding's saturation) the mix it completed in that window and the time it took to finish the whole
    sample. A placement router's goodput cannot pass what the cluster completes of the mix, so this bounds the
    goodput ratio on the homogeneous cluster (docs/routing.md, "Where the targets fall short")."""
    from sim.commands import with_instances
    from sim.compare import _sampled, mix_sample

    trace = azure_conv_trace()
    cfg = with_instances(load_config("default"), 16)
    w = Workload.from_trace(trace)
    sat = saturation_rate(cfg, w)
    k = 1000 * cfg.num_instances
    idx = mix_sample(w, k)
    offered = 2.0 * sat
    arrival = np.arange(k) / offered
    sw = _sampled(w, idx, arrival)
    half = 0.5 * float(arrival[-1])
    out: dict = {"trace": trace.name, "config": "default x16", "sample": k, "saturation_rps_least_outstanding": sat,
                 "offered_rps": offered, "mix_mean_prompt_tokens": float(np.mean(sw.prompt_tokens)),
                 "mix_mean_output_tokens": float(np.mean(sw.output_tokens)), "routers": {}}
    for r in routers:
        res = Simulator(cfg, router=r).run(sw)
        win = np.isfinite(res.finish_s) & (res.finish_s >= half) & (res.finish_s <= 2 * half)
        out["routers"][r] = {
            "saturation_rps": saturation_rate(cfg, w, router=r) if r != "least_outstanding" else sat,
            "window_rps": float(win.sum() / half),
            "window_prompt_tokens_per_s": float(sw.prompt_tokens[win].sum() / half),
            "window_output_tokens_per_s": float(sw.output_tokens[win].sum() / half),
            "window_mean_prompt_tokens": float(np.mean(sw.prompt_tokens[win])),
            "window_mean_output_tokens": float(np.mean(sw.output_tokens[win])),
            "makespan_s": float(np.nanmax(res.finish_s)),
            "completed": int(np.isfinite(res.finish_s).sum()),
        }
    return out


# (ttft factor, tpot factor) variants of lookahead_shed; the first is its default. None: that rule off.
SHED_VARIANTS = ((0.25, 1.0), (0.1, 1.0), (0.05, 1.0), (1.0, 1.0), (0.25, None), (None, 1.0))
# The learned router alone and under the same refusal rules (``shed`` over it).
SHED_LEARNED = (("learned", "learned", {}), ("shed base=learned", "shed", {"base": "learned"}))


# The goodput target's baseline (docs/routing.md, "best of LO/P2/Llumnix"): the best of these, Llumnix under the
# better of its two dispatch metrics (usage ratio, the default, and the paper's freeness), as compare names the rows.
BASELINE_DISPATCHERS = ("least_outstanding", "power_of_two", "llumnix", "llumnix:metric=remaining_steps")


def best_dispatcher(rows: dict[str, dict]) -> tuple[str, float]:
    """The baseline row of ``rows`` (router -> a row with ``goodput_rps``): the best of :data:`BASELINE_DISPATCHERS`
    by goodput, and its goodput."""
    return max(((n, rows[n]["goodput_rps"]) for n in BASELINE_DISPATCHERS), key=lambda x: x[1])


def study_shed(variants: tuple[tuple[float | None, float | None], ...] = SHED_VARIANTS, load: float = 0.8, *,
               mooncake: bool = False, extra: tuple[tuple[str, str, dict], ...] = (), head: int | None = None,
               instances: int = 16) -> dict:
    """SLO shedding: ``lookahead_shed`` with several (``shed_ttft_factor``, ``shed_tpot_factor``) vs the dispatchers,
    16 instances, at ``load`` of saturation and as goodput (rejected requests count as SLO misses). Azure
    conversation trace on ``default`` (Llama-2-7B), or with ``mooncake`` the Mooncake conversation trace on the
    long-context config. ``extra``: more routers, (label, registry name, params). Goodput ratios are over the best
    of :data:`BASELINE_DISPATCHERS` (``best_dispatcher``). ``head`` (the trace's first requests) and ``instances``:
    a small run that checks the study, not a result."""
    from scheduler.policy.route import make_router
    from sim.commands import with_instances
    from sim.goodput import goodput

    if mooncake:  # the full trace when ../shared is there, else the vendored slice
        name, vendored = "mooncake_fast25_conversation_trace.jsonl.gz", "mooncake_fast25_conversation_first1000.jsonl.gz"
        config = str(Path(__file__).resolve().parents[1] / "scheduler/config/examples/llama3-8b-a100-16-longctx.yaml")
    else:
        name, vendored, config = "azure_llm_2023_conv.csv.gz", "azure_llm_2023_conv_first10min.csv.gz", "default"
    trace = load_trace(SHARED / name) if (SHARED / name).exists() else load_trace(DATA / vendored)
    if head is not None:
        trace = trace.head(head)
    cfg = with_instances(load_config(config), instances)
    w = Workload.from_trace(trace)
    sat = saturation_rate(cfg, w)
    wl = at_load(w, load, sat)
    out: dict = {"trace": trace.name, "requests": len(w), "config": f"{cfg.name} x{instances}", "load": load,
                 "saturation_rps": sat, "routers": {}}

    def one(name: str, make, with_goodput: bool = True) -> dict:
        res = Simulator(cfg, router=make()).run(wl)
        s = sim_summary(res)
        m = request_metrics(res)
        # P99 over every request, a rejected one counting as never served (inf): shedding cannot hide a miss.
        ttft_all = np.where(res.rejected, np.inf, m.ttft_s)
        row = {"slo_attainment": s["slo_attainment"], "rejected_fraction": float(res.rejected.mean()),
               "ttft_p99_served_s": s["ttft_s"]["p99"],
               "ttft_p99_all_s": float(np.percentile(ttft_all, 99, method="higher")),
               "ttft_p90_served_s": s["ttft_s"]["p90"], "tpot_p90_s": s["tpot_s"]["p90"]}
        if with_goodput:
            row["goodput_rps"] = goodput(cfg, wl, make, target=0.9, lo=0.05, hi=8.0, iters=GOODPUT_ITERS).goodput_rps
        out["routers"][name] = row
        print(name, json.dumps(row), flush=True)
        return row

    one("round_robin", router_factory("round_robin", cfg), with_goodput=False)
    for name in (*BASELINE_DISPATCHERS, "lookahead"):
        one(name, router_factory(name, cfg))
    for ttft, tpot in variants:
        one(f"lookahead_shed ttft={ttft} tpot={tpot}",
            lambda ttft=ttft, tpot=tpot: make_router("lookahead_shed", config=cfg, shed_ttft_factor=ttft,
                                                     shed_tpot_factor=tpot))
    for label, name, params in extra:
        one(label, lambda name=name, params=params: make_router(name, **params))  # the simulator binds cfg
    r = out["routers"]
    out["best_dispatcher"], base = best_dispatcher(r)
    out["goodput_over_best_dispatcher"] = {n: v["goodput_rps"] / base for n, v in r.items() if "goodput_rps" in v}
    return out


def servegen_workload(pairs, *, duration_s: float = 3600.0, mean_rps: float = 5.5, model: str = "m-large",
                      days: int = 1, seed: int = 0) -> Workload:
    """A bursty arrival pattern derived from ServeGen (Alibaba Bailian): the summed per-client request rate of
    ``model`` over its first ``days`` day(s) (600-s windows), time-compressed into ``duration_s`` and scaled to
    ``mean_rps``; within each window, gamma inter-arrivals with the window's rate-weighted client CV (clipped to
    [1, 4]). Lengths: (prompt, output) pairs resampled from ``pairs`` (ServeGen ships no per-request lengths)."""
    import csv
    import gzip

    rate: dict[float, float] = {}
    cvw: dict[float, float] = {}
    with gzip.open(SHARED / "servegen_client_window_arrivals.csv.gz", "rt") as f:
        for row in csv.DictReader(f):
            t = float(row["window_start_s"])
            if row["model"] != model or t >= days * 86400:
                continue
            r = float(row["rate_rps"])
            rate[t] = rate.get(t, 0.0) + r
            cv = float(row["cv"]) if row["cv"] not in ("", "nan") else 1.0
            cvw[t] = cvw.get(t, 0.0) + r * cv
    ts = sorted(rate)
    curve = np.array([rate[t] for t in ts])
    cvs = np.clip(np.array([cvw[t] / max(rate[t], 1e-9) for t in ts]), 1.0, 4.0)
    win = duration_s / len(ts)
    curve = curve * mean_rps / curve.mean()
    rng = np.random.default_rng(seed)
    arr: list[np.ndarray] = []
    for k, (r, cv) in enumerate(zip(curve, cvs)):
        shape = 1.0 / cv**2
        gaps = rng.gamma(shape, 1.0 / (r * shape), int(r * win * 3) + 20)
        t = k * win + rng.uniform(0, gaps[0]) + np.concatenate([[0.0], np.cumsum(gaps[1:])])
        arr.append(t[t < (k + 1) * win])
    a = np.concatenate(arr)
    idx = rng.integers(0, len(pairs), len(a))
    return Workload(a, np.asarray(pairs.prompt_tokens)[idx].astype(np.int64),
                    np.asarray(pairs.output_tokens)[idx].astype(np.int64),
                    name=f"servegen_{model}_day{days}_x{86400 * days / duration_s:.0f}_azure_lengths")


def _curve(w: Workload, bin_s: float = 60.0) -> dict:
    h = np.histogram(w.arrival_s, bins=np.arange(0, float(w.arrival_s[-1]) + bin_s, bin_s))[0] / bin_s
    return {"bin_s": bin_s, "rate_min_rps": float(h[:-1].min()), "rate_mean_rps": float(len(w) / w.arrival_s[-1]),
            "rate_max_rps": float(h.max()), "peak_over_mean": float(h.max() / (len(w) / w.arrival_s[-1]))}


def study_scaling(static_sizes: tuple[int, ...] = (3, 4, 5, 6, 7, 8), startup_s: float = 60.0,
                  interval_s: float = 5.0) -> dict:
    """Autoscaling vs static provisioning on bursty real traces (Llama-2-7B on A40-48GB MIXED instances,
    least-outstanding router, SLO TTFT 2 s / TPOT 0.1 s at 90% attainment).

    Static: every size in ``static_sizes``; the smallest meeting 90% SLO attainment is marked. Scalers start at
    the smallest static size, ``min_instances`` 2, ``max_instances`` 16, start-up delay ``startup_s``; each
    instance's GPU time counts from its start request to its removal.
    """
    from scheduler.policy.scaling import make_scaling_policy
    from sim.cluster import build_instances
    from sim.commands import with_instances

    base = load_config("default")
    base = base.model_copy(update={"pools": [p.model_copy(update={"gpu": "a40"}) for p in base.pools]})
    azure = azure_conv_trace()
    traces = {"azure_conv": Workload.from_trace(azure)}
    if (SHARED / "servegen_client_window_arrivals.csv.gz").exists():
        traces["servegen_bursty"] = servegen_workload(azure, mean_rps=len(azure) / float(azure.arrival_s[-1]))
    out: dict = {"config": "default with gpu a40 (llama2-7b, MIXED, tp1, $/h from the catalog)",
                 "router": "least_outstanding", "slo": "ttft 2 s, tpot 0.1 s; target 90% attainment",
                 "startup_delay_s": startup_s, "scaling_interval_s": interval_s,
                 "command": "python bench/bench_routing.py scaling --json docs/results/scaling.json", "traces": {}}

    def row(s: dict, sim: Simulator | None = None) -> dict:
        r = {"gpu_hours": s["gpu_hours"], "cost_usd": s["cost_usd"], "slo_attainment": s["slo_attainment"],
             "ttft_p99_s": s["ttft_s"]["p99"], "tpot_p99_s": s["tpot_s"]["p99"], "preemptions": s["preemptions"],
             "completed": s["completed"], "makespan_s": s["makespan_s"]}
        if sim is not None and sim.scaler is not None:
            r.update(sim.scaler.summary())
            r["mean_instances"] = s["mean_instances"]
        return r

    for tname, w in traces.items():
        t_out: dict = {"requests": len(w), "duration_s": float(w.arrival_s[-1]), "arrivals": _curve(w),
                       "static": {}, "scaled": {}}
        smallest = None
        for n in static_sizes:
            s = sim_summary(Simulator(with_instances(base, n), router="least_outstanding").run(w))
            t_out["static"][n] = row(s)
            if smallest is None and s["slo_attainment"] >= 0.9:
                smallest = n
        t_out["smallest_static_meeting_slo"] = smallest
        start = smallest or static_sizes[-1]
        cfg = with_instances(base, start)
        eng = build_instances(cfg)[0].engine
        kv_tokens = int(eng.total_blocks * eng.block_size)  # the SLA model's decode batch must fit in KV
        lim = {"min_instances": 2, "max_instances": 16}
        variants = {
            "threshold": ("threshold", {}),
            "threshold_tuned": ("threshold", {"scale_up": 0.5, "scale_down": 0.15, "sustain_s": 10.0,
                                              "cooldown_s": 30.0}),
            "sla": ("sla", {"config": cfg}),
            "sla_tuned": ("sla", {"config": cfg, "kv_tokens": kv_tokens, "headroom": 1.3, "down_sustain_s": 120.0}),
        }
        for label, (name, kw) in variants.items():
            pol = make_scaling_policy(name, **lim, **kw)
            sim = Simulator(cfg, router="least_outstanding", scaling=pol, scaling_interval_s=interval_s,
                            scaling_startup_s=startup_s)
            s = sim_summary(sim.run(w))
            t_out["scaled"][label] = {"policy": name, "params": {k: v for k, v in kw.items() if k != "config"},
                                      "start_instances": start, **row(s, sim)}
        ref = t_out["static"].get(smallest) if smallest else None
        if ref:
            for r in t_out["scaled"].values():
                r["gpu_hours_vs_smallest_static"] = r["gpu_hours"] / ref["gpu_hours"]
        out["traces"][tname] = t_out
    return out


def shifting_workload(path: Path = DATA / "azure_llm_2023_conv_first10min.csv.gz", *, rate_scale: float = 1.5,
                      decode_first: bool = False) -> Workload:
    """A real trace whose mix shifts halfway: the trace's own arrival times, and its own (prompt, output) pairs
    reordered so the first half of the arrivals get the pairs with prompt/output ratio at or above the median
    (prefill-heavy) and the second half the rest (decode-heavy); ``decode_first`` swaps the halves. Arrivals are
    compressed ``rate_scale`` times."""
    from sim.goodput import scale_rate

    t = load_trace(path)
    p, o = np.asarray(t.prompt_tokens, dtype=np.int64), np.asarray(t.output_tokens, dtype=np.int64)
    ratio = p / np.maximum(o, 1)
    heavy = ratio >= np.median(ratio)
    halves = [(p[heavy], o[heavy]), (p[~heavy], o[~heavy])]
    if decode_first:
        halves.reverse()
    a = np.asarray(t.arrival_s, dtype=np.float64)
    order = "decode_then_prefill" if decode_first else "prefill_then_decode"
    w = Workload(a - a[0], np.concatenate([h[0] for h in halves]), np.concatenate([h[1] for h in halves]),
                 name=f"{t.name}_shift_{order}")
    return scale_rate(w, rate_scale)


def study_rerole(rate_scale: float = 1.5) -> dict:
    """Static P/D roles vs ``RerolePolicy`` applied by the simulator (``sim/reroling.py``) on the Azure conv trace
    with its mix shifted halfway (``shifting_workload``), both directions; 2 PREFILL + 2 DECODE Llama-2-7B A100s
    (``llama2-7b-pd-a100``), its ``least_outstanding`` router, re-roling with the policy's defaults. Also: the
    other static splits of the same 4 GPUs, and the switch delay raised from 10 s to a cold start's 60 s."""
    from scheduler.policy.scaling import RerolePolicy

    cfg = load_config("llama2-7b-pd-a100")
    pre, dec = cfg.pools

    def split(n_pre: int):
        return cfg.model_copy(update={"pools": [pre.model_copy(update={"count": n_pre}),
                                                dec.model_copy(update={"count": 4 - n_pre})]})

    def one(c, w: Workload, reroling: RerolePolicy | None = None, **opts) -> dict:
        sim = Simulator(c, router=router_factory("least_outstanding", c)(), reroling=reroling,
                        reroling_options=opts)
        res = sim.run(w)
        m = request_metrics(res)
        first = np.arange(len(w)) < len(w) // 2
        r = {"slo_attainment": float(m.slo_met.mean()), "ttft_p99_s": float(np.nanpercentile(m.ttft_s, 99)),
             "tpot_p99_s": float(np.nanpercentile(m.tpot_s, 99)), "e2e_mean_s": float(np.nanmean(m.e2e_s)),
             "e2e_mean_first_half_s": float(np.nanmean(m.e2e_s[first])),
             "e2e_mean_second_half_s": float(np.nanmean(m.e2e_s[~first])),
             "completed": int(np.isfinite(res.finish_s).sum()), "migrations": int(res.migrations)}
        if sim.reroler is not None:
            r.update(sim.reroler.summary())
        return r

    traces = {"azure_conv_first10min": DATA / "azure_llm_2023_conv_first10min.csv.gz"}
    if (SHARED / "azure_llm_2023_conv.csv.gz").exists():
        traces["azure_conv_full"] = SHARED / "azure_llm_2023_conv.csv.gz"
    out: dict = {"config": "llama2-7b-pd-a100 (2 PREFILL + 2 DECODE, llama2-7b, a100)", "router": "least_outstanding",
                 "slo": "ttft 2 s, tpot 0.1 s", "rate_scale": rate_scale, "policy": "RerolePolicy() defaults",
                 "switch_delay_s": 10.0, "command": "python bench/bench_routing.py rerole --json "
                 "docs/results/routing_rerole.json", "runs": {}}
    for tname, path in traces.items():
        for decode_first in (False, True):
            w = shifting_workload(path, rate_scale=rate_scale, decode_first=decode_first)
            row: dict = {"requests": len(w), "rate_rps": len(w) / float(w.arrival_s[-1]),
                         "shift_at_s": float(w.arrival_s[len(w) // 2])}
            row["static_2p2d"] = one(cfg, w)
            row["rerole"] = one(cfg, w, RerolePolicy())
            row["rerole_delay_60s"] = one(cfg, w, RerolePolicy(), switch_delay_s=60.0)
            row["static_1p3d"] = one(split(1), w)
            row["static_3p1d"] = one(split(3), w)
            out["runs"][f"{tname}/{w.name.rsplit('_shift_', 1)[1]}"] = row
    return out


def study_prefill_speed(multipliers: tuple[float | None, ...] = (1.0, 2.5, None), load: float = 0.8,
                        trace_path: Path | None = None) -> dict:
    """What-if for the Mooncake P99-TTFT target: the long-context config's A100 prefill attention multiplier
    (``k_prefill``, 5.28 from DistServe's fits at <= 2k-token prompts; ``None``: as shipped) set lower, towards
    FlashAttention-2's long-sequence efficiency (1.0 is the roofline at the catalog's 60% of peak; the FA2 paper
    reports 50-73% of A100 peak). Saturation is re-measured per multiplier, so each row is at ``load``
    of its own cluster's capacity. The question: does the round-robin / best-router P99 TTFT ratio depend on how
    slow the longest prefills are? (The best router's P99 sits near the P99 of the prompts' own prefill time.)
    ``trace_path``: another Mooncake-format trace (default: the full conversation trace, else the vendored slice)."""
    import dataclasses
    from unittest import mock

    from scheduler.latency import profiles
    from sim.cluster import pool_latency
    from sim.commands import with_instances

    name, vendored = "mooncake_fast25_conversation_trace.jsonl.gz", "mooncake_fast25_conversation_first1000.jsonl.gz"
    if trace_path is None:
        trace_path = SHARED / name if (SHARED / name).exists() else DATA / vendored
    trace = load_trace(trace_path)
    config = str(Path(__file__).resolve().parents[1] / "scheduler/config/examples/llama3-8b-a100-16-longctx.yaml")
    w = Workload.from_trace(trace)
    shipped = profiles.calibration_for("a100").k_prefill
    out: dict = {"trace": trace.name, "config": "llama3-8b-a100-16-longctx x16", "load": load,
                 "shipped_k_prefill": shipped, "rows": []}
    real = profiles.calibration_for
    for k in multipliers:
        def cal(family: str, k: float | None = k):
            c = real(family)
            return dataclasses.replace(c, k_prefill=k) if k is not None and family == "a100" else c

        with mock.patch.object(profiles, "calibration_for", cal):
            cfg = with_instances(load_config(config), 16)
            sat = saturation_rate(cfg, w)
            wl = at_load(w, load, sat)
            lat = pool_latency(cfg, cfg.pools[0])
            row: dict = {"k_prefill": k if k is not None else shipped, "saturation_rps": sat,
                         "prefill_p99_alone_s": float(np.percentile(
                             [lat.prefill_time(int(p)) for p in w.prompt_tokens], 99))}
            for r in ("round_robin", "prefix_affinity", "lookahead", "learned"):
                res = Simulator(cfg, router=router_factory(r, cfg)()).run(wl)
                row[r] = {"ttft_p99_s": sim_summary(res)["ttft_s"]["p99"]}
        best = min(row[r]["ttft_p99_s"] for r in ("prefix_affinity", "lookahead", "learned"))
        row["rr_over_best"] = row["round_robin"]["ttft_p99_s"] / best
        out["rows"].append(row)
        print(json.dumps(row), flush=True)
    return out


def study_learned_training(load: float = 0.8) -> dict:
    """How the ``learned`` router is trained: the bandit artifact (``docs/results/learned_router_bandit.json``)
    against the cross-entropy policy searches of ``bench/train_learned_router.py --method cem`` that start from it:
    mean reward on the first half of Azure conv (``default`` x16, 0.9 of saturation), on the first halves of Azure
    and Mooncake conv (Mooncake on ``llama3-8b-a100-16-longctx`` x16) at ``load``, and on those two plus the three
    mixed-speed clusters (Azure on ``hetero-a100-h100`` x16, Mooncake on ``llama3-8b-a100-longctx-tier`` and on
    ``llama3-8b-a100-longctx-tier-pd``) at ``load`` -- the shipped artifact's recipe (``same_as_shipped`` says
    whether it reproduced it). (The SLO and robust objectives, and the four-cluster search shipped before the P/D
    tier joined, were measured at commit beea876.) Evaluated at ``load`` on the whole Azure
    and Mooncake conversation traces: SLO attainment, P99 TTFT, mean E2E, goodput@90% (6 bisection steps);
    ``lookahead`` for reference."""
    from scheduler.policy.routers_learned import LearnedRouter, read_weights
    from sim.commands import with_instances
    from sim.goodput import goodput

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from train_learned_router import train_cem, training_workload

    azure_name, mooncake_name = "azure_llm_2023_conv.csv.gz", "mooncake_fast25_conversation_trace.jsonl.gz"
    traces = {name: load_trace(SHARED / name) for name in (azure_name, mooncake_name)}  # read once: train + eval
    examples = Path(__file__).resolve().parents[1] / "scheduler/config/examples"
    cfg = with_instances(load_config("default"), 16)
    mc_cfg = with_instances(load_config(str(examples / "llama3-8b-a100-16-longctx.yaml")), 16)
    hetero = with_instances(load_config("hetero-a100-h100"), 16)
    tier = with_instances(load_config(str(examples / "llama3-8b-a100-longctx-tier.yaml")), 16)
    tier_pd = with_instances(load_config(str(examples / "llama3-8b-a100-longctx-tier-pd.yaml")), 16)
    train_w, azure_sat = training_workload(cfg, traces[azure_name])  # at 0.9, as the bandit was trained
    # the other runs built as the CLI builds them (``--load``), so the four-cluster arm replays the shipped recipe
    runs = {name: training_workload(c, traces[t], load=load)
            for name, c, t in (("azure", cfg, azure_name), ("mooncake", mc_cfg, mooncake_name),
                               ("azure_hetero", hetero, azure_name), ("mooncake_tier", tier, mooncake_name),
                               ("mooncake_tier_pd", tier_pd, mooncake_name))}
    mc_sat = runs["mooncake"][1]
    both = [(cfg, runs["azure"][0]), (mc_cfg, runs["mooncake"][0])]
    five = both + [(hetero, runs["azure_hetero"][0]), (tier, runs["mooncake_tier"][0]),
                   (tier_pd, runs["mooncake_tier_pd"][0])]
    bandit = Path(__file__).resolve().parents[1] / "docs/results/learned_router_bandit.json"
    start = read_weights(bandit)
    out: dict = {"load": load, "start": bandit.name, "training": {}, "rows": []}
    makers = {"learned, bandit artifact (the searches' start)": lambda: LearnedRouter(start)}
    arms = (("cem_reward", "reward", [(cfg, train_w)]), ("cem_reward_both", "reward", both),
            ("cem_reward_five (shipped)", "reward", five))
    for arm, objective, arm_runs in arms:
        weights, history = train_cem(arm_runs, start=start, iters=6, objective=objective)
        out["training"][arm] = {"weights": weights, "history": history}
        makers[arm] = lambda weights=weights: LearnedRouter(weights)
    shipped = LearnedRouter().weights
    out["same_as_shipped"] = all(abs(shipped[k] - v) < 1e-12
                                 for k, v in out["training"]["cem_reward_five (shipped)"]["weights"].items())
    for trace_name, c, sat in ((azure_name, cfg, azure_sat), (mooncake_name, mc_cfg, mc_sat)):
        wl = at_load(Workload.from_trace(traces[trace_name]), load, sat)
        for name, make in [*makers.items(), ("lookahead", router_factory("lookahead", c))]:
            s = sim_summary(Simulator(c, router=make()).run(wl))
            row = {"trace": trace_name, "config": f"{c.name} x16", "router": name,
                   "slo_attainment": s["slo_attainment"], "ttft_p99_s": s["ttft_s"]["p99"],
                   "e2e_mean_s": s["e2e_s"]["mean"],
                   "goodput_rps": goodput(c, wl, make, target=0.9, lo=0.05, hi=8.0, iters=GOODPUT_ITERS).goodput_rps}
            out["rows"].append(row)
            print(json.dumps(row), flush=True)
    return out


def study_length_hints(load: float = 0.8) -> dict:
    """Routers that read a length guess (``learned``, ``lookahead``, ``mixing``) under every source of one a
    deployment can have: none (each router's default), the trace predictor (``policies.predictor: {name:
    trace}``), exact lengths, and a client's ``length_hint`` of 10 / 500 / 2000 tokens on every request. Azure
    conv, ``default`` x16, at ``load``. No source should wreck a router: before the twenty-fifth session bounded
    ``learned``'s load weights, a 500-token guess gave it 0.5% SLO attainment (its training runs carry no guesses,
    so a weight only the default guess kept harmless went unseen)."""
    from sim.commands import with_instances

    trace = azure_conv_trace()
    cfg = with_instances(load_config("default"), 16)
    w = Workload.from_trace(trace)
    w = at_load(w, load, saturation_rate(cfg, w))
    n = len(w)
    sources = (("none", None, cfg), ("trace_predictor", None, with_predictor(cfg, "trace")),
               ("oracle", w.output_tokens.astype(float), cfg), ("hint_10", np.full(n, 10.0), cfg),
               ("hint_500", np.full(n, 500.0), cfg), ("hint_2000", np.full(n, 2000.0), cfg))
    out: dict = {"trace": trace.name, "config": "default x16", "load": load, "routers": {}}
    for router in ("learned", "lookahead", "mixing"):
        rows = out["routers"][router] = {}
        for label, po, c in sources:
            wl = Workload(w.arrival_s, w.prompt_tokens, w.output_tokens, predicted_output=po, name=w.name)
            s = sim_summary(Simulator(c, router=router_factory(router, c)()).run(wl))
            rows[label] = {"slo_attainment": s["slo_attainment"], "ttft_p99_s": s["ttft_s"]["p99"],
                           "e2e_mean_s": s["e2e_s"]["mean"]}
            print(router, label, json.dumps(rows[label]), flush=True)
    return out


# The shed studies take --head / --instances (a small run).
SHED_STUDIES = {"shed": study_shed, "shed_mooncake": lambda **kw: study_shed(mooncake=True, **kw),
                "shed_learned": lambda **kw: study_shed((), extra=SHED_LEARNED, **kw),
                "shed_learned_mooncake": lambda **kw: study_shed((), mooncake=True, extra=SHED_LEARNED, **kw)}
STUDIES = {"ir": study_ir, "predictor": study_predictor, "migration": study_migration, "sweep": study_sweep,
           "scaling": study_scaling, "rerole": study_rerole, **SHED_STUDIES,
           "prefill_speed": study_prefill_speed, "learned_training": study_learned_training,
           "length_hints": study_length_hints, "capacity": study_capacity, "batch_models": study_batch_models}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="llmsched bench routing")
    p.add_argument("study", choices=[*STUDIES, "all"])
    p.add_argument("--json")
    p.add_argument("--head", type=positive_int, help="shed studies: the trace's first N requests only (a check)")
    p.add_argument("--instances", type=positive_int, help="shed studies: this many instances, not 16 (a check)")
    p.add_argument("--steady-batch", action="store_true",
                   help="ir: lookahead with steady_batch (a newcomer's decode batch keeps its size; default: drains)")
    p.add_argument("--batch-model", choices=("drain", "steady", "refill"),
                   help="ir: lookahead's batch_model (refill: residents leave, arrivals refill; default: drain)")
    args = p.parse_args(argv)
    kw = {k: v for k, v in (("head", args.head), ("instances", args.instances)) if v is not None}
    if kw and args.study not in SHED_STUDIES:
        p.error(f"--head/--instances: only with {', '.join(SHED_STUDIES)}")
    if args.steady_batch and args.batch_model not in (None, "steady"):
        p.error(f"--steady-batch contradicts --batch-model {args.batch_model}")
    model = "steady" if args.steady_batch else args.batch_model
    if model is not None:
        if args.study != "ir":
            p.error("--steady-batch/--batch-model: only with ir")
        kw["batch_model"] = model
    names = list(STUDIES) if args.study == "all" else [args.study]
    out = {n: STUDIES[n](**kw) for n in names}
    print(json.dumps(out, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
