"""Predictor for requests without text, "trace": P(output bucket | input-length bucket, tenant).

Empirical conditional histograms fitted on real traces (Azure LLM 2023 conversation, Mooncake FAST'25 conversation
and synthetic, Vidur arxiv-summarisation lengths); the tenant is the trace/app name. Each (tenant, input bucket)
histogram is smoothed toward that tenant's marginal (``alpha`` pseudo-counts). For an unknown tenant the
prediction is the pooled tenants' fit taken as one trace: their conditionals mixed, each weighted by its requests
in that input bucket (Bayes with each tenant's share of the fitted requests as its prior), so a long prompt leans
toward the long-context trace and a tenant with a few requests in a log counts as a few requests.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from scheduler.predict.base import BUCKET_EDGES, LengthPrediction, bucket_of, predict_each

# sqrt(2)-spaced input-length edges from 64 to 128k tokens.
INPUT_EDGES: tuple[int, ...] = (0, *(round(64 * 2 ** (i / 2)) for i in range(23)))


@dataclass
class TracePredictor:
    """Conditional histograms: ``cond[tenant]`` is (input buckets, output buckets) probabilities;
    ``input_marginal[tenant]`` is P(input bucket | tenant). ``pool`` lists the tenants mixed for unknown ones."""

    cond: dict[str, np.ndarray]
    input_marginal: dict[str, np.ndarray]
    pool: tuple[str, ...]
    input_edges: tuple[int, ...] = INPUT_EDGES
    edges: tuple[int, ...] = BUCKET_EDGES
    meta: dict = field(default_factory=dict)
    name: str = "trace"

    def __post_init__(self) -> None:
        # Checked once here: a pool tenant without a histogram (or a histogram of other edges) was a KeyError or a
        # shape error at every request, each costing the routers that request's guess.
        shape = (len(self.input_edges) - 1, len(self.edges) - 1)
        missing = sorted(set(self.pool) - set(self.cond))
        if missing or not self.pool:
            why = f"names tenants without histograms: {missing}" if missing else "is empty"
            raise ValueError(f"trace predictor: pool {list(self.pool)} {why}")
        for t, c in self.cond.items():
            if np.shape(c) != shape or np.shape(self.input_marginal.get(t)) != shape[:1]:
                raise ValueError(
                    f"trace predictor: tenant {t!r} histograms are not {shape} (input x output buckets)"
                )

    def probs(self, prompt_tokens: int, tenant: str | None = None) -> np.ndarray:
        """Output-bucket probabilities for a prompt of ``prompt_tokens`` tokens."""
        i = bucket_of(prompt_tokens, self.input_edges)
        if tenant is not None and tenant in self.cond:
            return self.cond[tenant][i]
        # Each pooled tenant weighs as its fitted requests in this input bucket, n_t P(i | t): the marginal over
        # tenants. P(i | t) alone (a uniform prior over tenants) gave a 30-request tenant of a `fit-trace` log as
        # much say as the main one's 2867. An artifact without the row counts keeps the uniform prior.
        rows = self.meta.get("rows", {})
        counted = all(t in rows for t in self.pool)
        w = np.array([(rows[t] if counted else 1.0) * self.input_marginal[t][i] for t in self.pool])
        w = w / w.sum() if w.sum() > 0 else np.full(len(self.pool), 1.0 / len(self.pool))
        return sum(wt * self.cond[t][i] for wt, t in zip(w, self.pool))

    def known_tenants(self) -> frozenset[str]:
        """The tenants it has a conditional histogram for."""
        return frozenset(self.cond)

    def predict(
        self, prompt: str | None, *, prompt_tokens: int, tenant: str | None = None
    ) -> LengthPrediction:
        """Ignores ``prompt``; conditions on ``prompt_tokens`` and ``tenant`` (trace name)."""
        return LengthPrediction.from_probs(self.probs(prompt_tokens, tenant).tolist(), self.edges)

    def predict_batch(
        self,
        prompts: Sequence[str | None],
        prompt_tokens: Sequence[int],
        tenants: Sequence[str | None] | None = None,
    ) -> list[LengthPrediction]:
        """``predict`` over aligned sequences."""
        return predict_each(self, [None] * len(prompt_tokens), prompt_tokens, tenants)  # text is never used

    def save(self, path: str | Path) -> None:
        """Write JSON (probabilities rounded to 6 decimals)."""
        doc = {
            "input_edges": list(self.input_edges),
            "edges": list(self.edges),
            "pool": list(self.pool),
            "meta": self.meta,
            "tenants": {
                t: {
                    "cond": np.round(self.cond[t], 6).tolist(),
                    "input_marginal": np.round(self.input_marginal[t], 6).tolist(),
                }
                for t in sorted(self.cond)
            },
        }
        Path(path).write_text(json.dumps(doc, separators=(",", ":")))

    @classmethod
    def load(cls, path: str | Path) -> TracePredictor:
        """Load a file written by ``save``."""
        doc = json.loads(Path(path).read_text())
        ts = doc["tenants"]
        return cls(
            cond={t: np.asarray(v["cond"], dtype=np.float64) for t, v in ts.items()},
            input_marginal={t: np.asarray(v["input_marginal"], dtype=np.float64) for t, v in ts.items()},
            pool=tuple(doc["pool"]),
            input_edges=tuple(doc["input_edges"]),
            edges=tuple(doc["edges"]),
            meta=doc.get("meta", {}),
        )


def fit_trace(
    pairs: dict[str, Sequence[tuple[int, int]]],
    *,
    pool: Sequence[str] | None = None,
    alpha: float = 20.0,
    input_edges: Sequence[int] = INPUT_EDGES,
    edges: Sequence[int] = BUCKET_EDGES,
) -> TracePredictor:
    """Fit from ``{tenant: [(input tokens, output tokens), ...]}``.

    Args:
        pool: tenants mixed for unknown tenants (default: all).
        alpha: pseudo-counts pulling each input bucket's histogram toward the tenant marginal.
    """
    ni, no = len(input_edges) - 1, len(edges) - 1
    cond, marg = {}, {}
    for t, rows in pairs.items():
        if not rows:
            raise ValueError(f"trace tenant {t!r} has no rows")
        c = np.zeros((ni, no))
        for inp, out in rows:
            c[bucket_of(inp, input_edges), bucket_of(out, edges)] += 1
        out_marg = (c.sum(axis=0) + 0.5) / (c.sum() + 0.5 * no)
        cond[t] = (c + alpha * out_marg) / (c.sum(axis=1, keepdims=True) + alpha)
        # NOTE(predict): a small floor so an input bucket never seen for a tenant still has weight in the mixture.
        in_counts = c.sum(axis=1) + 1e-3
        marg[t] = in_counts / in_counts.sum()
    meta = {
        "alpha": alpha,
        "rows": {t: len(r) for t, r in pairs.items()},
        "median_output": {t: float(np.median([o for _, o in r])) for t, r in pairs.items()},
    }
    return TracePredictor(cond, marg, tuple(pool or sorted(pairs)), tuple(input_edges), tuple(edges), meta)


def split_pairs(
    pairs: dict[str, list[tuple[int, int]]], test_frac: float = 0.2
) -> tuple[dict[str, list[tuple[int, int]]], dict[str, list[tuple[int, int]]]]:
    """Time split: the last ``test_frac`` of each trace (arrival order) is held out."""
    train, test = {}, {}
    for t, rows in pairs.items():
        cut = math.floor(len(rows) * (1 - test_frac))
        train[t], test[t] = rows[:cut], rows[cut:]
    return train, test
