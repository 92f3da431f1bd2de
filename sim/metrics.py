"""Simulator-side summary: the shared metrics (``scheduler.core.metrics``) plus cost, utilisation and speed."""

from __future__ import annotations

from typing import Any

import numpy as np

from scheduler.core.metrics import QUANTILES, RequestMetrics, percentiles, summarize

__all__ = ["QUANTILES", "RequestMetrics", "percentiles", "request_metrics", "sim_summary", "summarize"]


def sim_summary(res) -> dict[str, Any]:
    """Summary of a ``SimResult`` (simulator-only extras: GPU utilisation, cost, preemptions, speed)."""
    w = res.workload
    m = RequestMetrics.from_times(
        w.arrival_s,
        res.first_token_s,
        res.finish_s,
        w.output_tokens,
        admit_s=res.admit_s,
        slo_ttft_s=res.slo_ttft_s if res.slo_ttft_s is not None else np.inf,
        slo_tpot_s=res.slo_tpot_s if res.slo_tpot_s is not None else np.inf,
    )
    span = max(res.makespan_s, 1e-9)
    # Each instance counts from its start request to its removal (static clusters: the whole makespan).
    life = getattr(res, "instance_lifetime_s", None)
    life = np.full(len(res.instance_ids), span) if life is None else np.asarray(life, dtype=float)
    gpu_hours = float((res.instance_gpus * life).sum()) / 3600
    cost = float((res.instance_gpus * res.instance_price_per_hour * life).sum()) / 3600
    util = res.instance_busy_s / np.maximum(life, 1e-9)
    return summarize(
        m,
        requests=len(w),
        wall_seconds=res.wall_seconds,
        events=res.events,
        extra={
            "source": "simulator",
            "trace": w.name,
            "config": res.config_name,
            "router": res.router,
            "instances": len(res.instance_ids),
            "rejected": int(res.rejected.sum()),
            "preemptions": int(res.preemptions.sum()),
            "kv_transfers": int(res.kv_transfers),
            "migrations": int(res.migrations),
            "prefix_hit_tokens": int(getattr(res, "prefix_hit_tokens", 0)),
            "over_max_model_len": int(getattr(res, "over_max_model_len", 0)),
            "slo": _slo_targets(res, m.slo_met),
            "makespan_s": float(res.makespan_s),
            "throughput_rps": float(m.completed.sum() / span),
            "output_tokens_per_s": float(w.output_tokens[m.completed].sum() / span),
            "gpu_utilization": float(util.mean()) if len(util) else 0.0,
            "gpu_hours": gpu_hours,
            "cost_usd": cost,
            "engine_steps": int(res.steps),
            "requests_per_wall_s": float(len(w) / max(res.wall_seconds, 1e-9)),
            "events_per_wall_s": float(res.events / max(res.wall_seconds, 1e-9)),
            **_scaling_extras(res, life, span),
            # Named only when on: the recorded runs predate it (off).
            **({"same_instant_batching": True} if getattr(res, "same_instant_batching", False) else {}),
            **_admission_extras(res),
            # Named only where an instance can drain under the poll-round view: the recorded runs predate it.
            **({"drain_refused": res.drain_refused} if getattr(res, "drain_refused", None) is not None else {}),
            **({"role_refused": res.role_refused} if getattr(res, "role_refused", None) is not None else {}),
        },
    )


def _slo_targets(res, met: np.ndarray) -> dict[str, Any]:
    """The targets ``slo_attainment`` scored and the attainment, per priority class (``None``: no target; a class
    with none counts its completed requests as met). The top level repeats class 0's targets, as the live
    replay's summary has them."""
    prio = res.workload.priorities

    def target(col, i: int) -> float | None:
        v = None if col is None else float(np.broadcast_to(col, prio.shape)[i])
        return v if v is not None and np.isfinite(v) else None

    refused = getattr(res, "admission_rejected", None)
    classes = {int(p): {"ttft_s": target(res.slo_ttft_s, i), "tpot_s": target(res.slo_tpot_s, i),
                        "requests": int((prio == p).sum()), "attainment": float(met[prio == p].mean()),
                        # with an admission policy: its refusals in the class (they count as misses above)
                        **({"admission_rejected": int(refused[prio == p].sum())} if refused is not None else {})}
               for p, i in zip(*np.unique(prio, return_index=True), strict=True)}
    top = classes.get(0) or (next(iter(classes.values())) if classes else {})
    return {"ttft_s": top.get("ttft_s"), "tpot_s": top.get("tpot_s"), "classes": classes}


def _admission_extras(res) -> dict[str, Any]:
    """With an admission policy: the requests it refused (also in ``rejected``, as the router's refusals are)."""
    refused = getattr(res, "admission_rejected", None)
    return {} if refused is None else {"admission_rejected": int(refused.sum())}


def _scaling_extras(res, life: np.ndarray, span: float) -> dict[str, Any]:
    """Autoscaled runs only: scale events and the time-averaged instance count."""
    if getattr(res, "scale_events", None) is None:
        return {}
    return {"scale_events": int(res.scale_events), "mean_instances": float(life.sum() / span)}


def request_metrics(res) -> RequestMetrics:
    w = res.workload
    return RequestMetrics.from_times(
        w.arrival_s, res.first_token_s, res.finish_s, w.output_tokens, admit_s=res.admit_s,
        slo_ttft_s=res.slo_ttft_s if res.slo_ttft_s is not None else np.inf,
        slo_tpot_s=res.slo_tpot_s if res.slo_tpot_s is not None else np.inf,
    )
