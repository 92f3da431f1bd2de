"""Per-request latency metrics and the run summary, shared by the simulator and the live replayer.

TTFT: arrival -> first token.  TPOT: (finish - first token) / (output tokens - 1), none for a one-token response
(its TPOT target is met).  E2E: arrival -> last token.
Queueing: arrival -> first admission into a batch.  SLO attainment: share of *all* requests (rejected and
unfinished ones count as misses) meeting both their TTFT and TPOT targets.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

QUANTILES = (50, 90, 99)


def percentiles(x: np.ndarray) -> dict[str, float | None]:
    x = x[np.isfinite(x)]
    if not len(x):
        return {"p50": None, "p90": None, "p99": None, "mean": None}
    qs = np.percentile(x, QUANTILES)
    return {"p50": float(qs[0]), "p90": float(qs[1]), "p99": float(qs[2]), "mean": float(x.mean())}


@dataclass(frozen=True)
class RequestMetrics:
    """Columns derived from raw timestamps; shared by the simulator and the live replayer."""

    ttft_s: np.ndarray
    tpot_s: np.ndarray
    e2e_s: np.ndarray
    queue_s: np.ndarray
    completed: np.ndarray  # bool
    slo_met: np.ndarray  # bool

    @classmethod
    def from_times(
        cls,
        arrival_s: np.ndarray,
        first_token_s: np.ndarray,
        finish_s: np.ndarray,
        output_tokens: np.ndarray,
        *,
        admit_s: np.ndarray | None = None,
        slo_ttft_s: np.ndarray | float = np.inf,
        slo_tpot_s: np.ndarray | float = np.inf,
    ) -> RequestMetrics:
        ttft = first_token_s - arrival_s
        e2e = finish_s - arrival_s
        with np.errstate(invalid="ignore", divide="ignore"):
            # A one-token response has no time per output token after the first: no TPOT (left out of its
            # percentiles, as vLLM's benchmark leaves it out), not 0 s -- that pulled the percentiles down.
            tpot = np.where(output_tokens > 1, (finish_s - first_token_s) / np.maximum(output_tokens - 1, 1), np.nan)
        queue = (admit_s - arrival_s) if admit_s is not None else np.full_like(ttft, np.nan)
        completed = np.isfinite(finish_s)
        with np.errstate(invalid="ignore"):
            tpot_ok = (output_tokens <= 1) | (np.nan_to_num(tpot, nan=np.inf) <= slo_tpot_s)
            met = completed & (ttft <= slo_ttft_s) & tpot_ok
        return cls(ttft, tpot, e2e, queue, completed, met)


def summarize(
    m: RequestMetrics,
    *,
    requests: int,
    wall_seconds: float,
    events: int,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The summary object every report and ``--json`` writes (keys fixed by the CLI contract)."""
    out: dict[str, Any] = {
        "requests": int(requests),
        "completed": int(m.completed.sum()),
        "ttft_s": percentiles(m.ttft_s),
        "tpot_s": percentiles(m.tpot_s),
        "e2e_s": percentiles(m.e2e_s),
        "queue_s": percentiles(m.queue_s),
        "slo_attainment": float(m.slo_met.sum() / requests) if requests else 0.0,
        "wall_seconds": float(wall_seconds),
        "events": int(events),
    }
    if extra:
        out.update(extra)
    return out
