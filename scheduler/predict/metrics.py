"""Evaluation of a length predictor on records with known response lengths."""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from scheduler.predict.base import LengthPredictor, bucket_of, count_tokens
from scheduler.predict.data import Record


def kendall_tau(x: np.ndarray, y: np.ndarray) -> float:
    """Kendall tau-b (ties handled); scipy when present, else an O(n^2) numpy fallback. NaN if undefined."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if len(x) < 2:
        return float("nan")
    try:
        from scipy.stats import kendalltau
    except ImportError:  # NOTE(predict): scipy is a training-only dependency; eval must work without it.
        conc = tie_x = tie_y = 0.0
        n = len(x)
        for i in range(0, n, 512):
            dx = np.sign(x[i : i + 512, None] - x[None, :])
            dy = np.sign(y[i : i + 512, None] - y[None, :])
            conc += float((dx * dy).sum())
            tie_x += float((dx != 0).sum())
            tie_y += float((dy != 0).sum())
        denom = math.sqrt(tie_x * tie_y)
        return conc / denom if denom > 0 else float("nan")
    return float(kendalltau(x, y).statistic)


def _as_record(r: Record | Mapping[str, Any]) -> Record:
    if isinstance(r, Record):
        return r
    prompt = r.get("prompt")
    pt = r.get("prompt_tokens")
    out = r.get("output_tokens")
    if out is None:
        resp = r.get("response")
        if not isinstance(resp, str):
            raise ValueError(f"record needs 'output_tokens' or 'response' text: {sorted(r)}")
        out = count_tokens(resp)
    if pt is None:
        pt = count_tokens(prompt) if isinstance(prompt, str) else 0
    return Record(prompt, int(pt), int(out), r.get("tenant"), str(r.get("source", "unknown")))


def evaluate(
    predictor: LengthPredictor,
    records: Iterable[Record | Mapping[str, Any]],
    *,
    use_tenant: bool = True,
    latency_sample: int = 200,
) -> dict[str, float | int]:
    """Score ``predictor`` on records with true output lengths.

    Records are ``Record`` objects or mappings with ``prompt`` and either ``output_tokens`` or ``response`` text
    (counted with ``count_tokens``); ``prompt_tokens`` and ``tenant`` are optional.

    Returns:
        ``n``; ``kendall_tau`` (point estimate vs truth, tau-b); ``bucket_accuracy`` (argmax bucket == true bucket);
        ``bucket_within_one``; ``mae_tokens`` (|median - truth|); ``mean_true_tokens``; ``ece`` (top-label expected
        calibration error, 10 bins); ``coverage_10_90`` (share of truths inside the predicted 10-90% interval;
        0.8 is calibrated); ``nll`` (mean negative log bucket probability); ``latency_ms_p50`` / ``_p99`` (one
        ``predict`` call, timed on the first ``latency_sample`` records; metrics use ``predict_batch``).
    """
    recs = [_as_record(r) for r in records]
    if not recs:
        raise ValueError("evaluate: no records")
    n = len(recs)
    point = np.empty(n)
    truth = np.array([r.output_tokens for r in recs], dtype=np.float64)
    conf = np.empty(n)
    hit = np.empty(n, dtype=bool)
    near = np.empty(n, dtype=bool)
    covered = np.empty(n, dtype=bool)
    nll = np.empty(n)
    tenants = [r.tenant if use_tenant else None for r in recs]
    preds = predictor.predict_batch([r.prompt for r in recs], [r.prompt_tokens for r in recs], tenants)
    lat = np.empty(max(min(latency_sample, n), 1))
    for i in range(len(lat)):
        r = recs[i]
        t0 = time.perf_counter()
        predictor.predict(r.prompt, prompt_tokens=r.prompt_tokens, tenant=tenants[i])
        lat[i] = time.perf_counter() - t0
    for i, (r, p) in enumerate(zip(recs, preds, strict=True)):
        b = bucket_of(r.output_tokens, p.bucket_edges)
        top = int(np.argmax(p.probs))
        point[i] = p.point
        conf[i] = p.probs[top]
        hit[i] = top == b
        near[i] = abs(top - b) <= 1
        covered[i] = p.quantile(0.1) <= max(r.output_tokens, 1) <= p.quantile(0.9)
        nll[i] = -math.log(max(p.probs[b], 1e-12))
    ece = 0.0
    bins = np.minimum((conf * 10).astype(int), 9)
    for k in range(10):
        m = bins == k
        if m.any():
            ece += m.mean() * abs(float(hit[m].mean()) - float(conf[m].mean()))
    return {
        "n": n,
        "kendall_tau": kendall_tau(point, truth),
        "bucket_accuracy": float(hit.mean()),
        "bucket_within_one": float(near.mean()),
        "mae_tokens": float(np.abs(point - truth).mean()),
        "mean_true_tokens": float(truth.mean()),
        "ece": float(ece),
        "coverage_10_90": float(covered.mean()),
        "nll": float(nll.mean()),
        "latency_ms_p50": float(np.percentile(lat, 50) * 1e3),
        "latency_ms_p99": float(np.percentile(lat, 99) * 1e3),
    }


class ConstantPredictor:
    """Baseline: the same distribution for every request (the training marginal)."""

    def __init__(self, probs: list[float], edges: tuple[int, ...], name: str = "constant") -> None:
        from scheduler.predict.base import LengthPrediction

        self._pred = LengthPrediction.from_probs(probs, edges)
        self.name = name

    def predict(self, prompt: str | None, *, prompt_tokens: int, tenant: str | None = None):
        """Always the marginal."""
        return self._pred

    def predict_batch(self, prompts, prompt_tokens, tenants=None):
        """Always the marginal."""
        return [self._pred for _ in prompts]

    def known_tenants(self) -> frozenset[str]:
        """None: the marginal is everyone's."""
        return frozenset()
