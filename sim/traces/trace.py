"""The ``Trace``: per-request columns (arrival, prompt length, output length) that the simulator and the live
replayer read directly as numpy arrays.

Invariants (checked on construction, so every loader, generator and transform keeps them):

- ``arrival_s`` is float64, finite, non-decreasing, and the first arrival is at 0.0;
- ``prompt_tokens`` and ``output_tokens`` are int64 and >= 1;
- the optional columns (``hash_ids``, ``tenant``) have one entry per request.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np


class TraceFormatError(ValueError):
    """A trace file could not be read.

    The message names the place: ``"<path>:<line>: column '<name>': <problem> (got '<value>')"``; parts
    that do not apply (no column for a truncated gzip stream, no value for a missing column) are left out.
    JSON syntax errors give a character column instead: ``"<path>:<line>:<col>: invalid JSON: ..."``.
    The pieces are also attributes, for callers that want to point at the cell themselves.
    """

    def __init__(
        self,
        path: str,
        line: int | None,
        problem: str,
        *,
        column: str | int | None = None,
        value: object = None,
    ) -> None:
        self.path = str(path)
        self.line = line
        self.column = column
        self.problem = problem
        self.value = value
        where = self.path if line is None else f"{self.path}:{line}"
        if isinstance(column, int):
            where += f":{column}"  # a character column (JSON syntax errors)
        msg = f"{where}: "
        if isinstance(column, str):
            msg += f"column '{column}': "
        msg += problem
        if value is not None:
            shown = str(value)
            shown = shown if len(shown) <= 60 else shown[:57] + "..."
            msg += f" (got '{shown}')"
        super().__init__(msg)


def _percentile(x: np.ndarray, q: float) -> float:
    return round(float(np.percentile(x, q)), 2) if len(x) else 0.0


@dataclass(frozen=True, eq=False)
class Trace:
    """A request trace: one entry per request, sorted by arrival.

    ``eq=False``: numpy columns make field-wise ``==`` ambiguous; compare columns explicitly instead.
    ``skipped_rows`` counts source rows the loader dropped on purpose (BurstGPT failures with 0 response
    tokens); ``summary()`` reports it. ``drawn_arrivals`` names the arrival process that supplied the arrival times
    when the source had none (a lengths-only file, a synthetic workload); empty: the source's own timestamps.
    """

    name: str
    source: str
    arrival_s: np.ndarray
    prompt_tokens: np.ndarray
    output_tokens: np.ndarray
    hash_ids: list[tuple[int, ...]] | None = None
    tenant: np.ndarray | None = None
    skipped_rows: int = 0
    drawn_arrivals: str = ""

    def __post_init__(self) -> None:
        # Coerce once here so every consumer can rely on the dtypes (frozen -> object.__setattr__).
        arr = np.ascontiguousarray(self.arrival_s, dtype=np.float64)
        p = np.ascontiguousarray(self.prompt_tokens, dtype=np.int64)
        o = np.ascontiguousarray(self.output_tokens, dtype=np.int64)
        object.__setattr__(self, "arrival_s", arr)
        object.__setattr__(self, "prompt_tokens", p)
        object.__setattr__(self, "output_tokens", o)
        n = len(arr)
        if arr.ndim != 1 or p.shape != (n,) or o.shape != (n,):
            raise ValueError(
                f"trace {self.name!r}: arrival_s, prompt_tokens, output_tokens must be 1-D of equal length "
                f"(got {arr.shape}, {p.shape}, {o.shape})"
            )
        if n:
            if not np.all(np.isfinite(arr)):
                raise ValueError(f"trace {self.name!r}: arrival_s must be finite")
            if arr[0] != 0.0:
                raise ValueError(f"trace {self.name!r}: first arrival must be at 0.0 (got {arr[0]!r})")
            if np.any(np.diff(arr) < 0):
                i = int(np.argmax(np.diff(arr) < 0))
                raise ValueError(
                    f"trace {self.name!r}: arrival_s must be non-decreasing (request {i + 1}: "
                    f"{arr[i + 1]!r} < {arr[i]!r})"
                )
            if p.min() < 1:
                raise ValueError(f"trace {self.name!r}: prompt_tokens must be >= 1 (min {int(p.min())})")
            if o.min() < 1:
                raise ValueError(f"trace {self.name!r}: output_tokens must be >= 1 (min {int(o.min())})")
        if self.hash_ids is not None and len(self.hash_ids) != n:
            raise ValueError(f"trace {self.name!r}: hash_ids has {len(self.hash_ids)} entries, expected {n}")
        if self.tenant is not None:
            t = np.asarray(self.tenant)
            if t.shape != (n,):
                raise ValueError(f"trace {self.name!r}: tenant has shape {t.shape}, expected ({n},)")
            object.__setattr__(self, "tenant", t)

    def __len__(self) -> int:
        return len(self.arrival_s)

    def __repr__(self) -> str:
        return (
            f"Trace(name={self.name!r}, n={len(self)}, duration_s={self.duration_s:.1f}, "
            f"mean_rate={self.mean_rate:.3f}, source={self.source!r})"
        )

    @property
    def duration_s(self) -> float:
        """Time from the first to the last arrival (0 for fewer than two requests)."""
        return float(self.arrival_s[-1]) if len(self) else 0.0

    @property
    def mean_rate(self) -> float:
        """Requests per second: ``n / duration_s`` (the same estimate as ``sim.goodput``); 0 if undefined."""
        d = self.duration_s
        return len(self) / d if d > 0 else 0.0

    def _select(self, idx: slice | np.ndarray, arrival: np.ndarray, source: str) -> Trace:
        hash_ids = self.hash_ids
        if hash_ids is not None:
            hash_ids = hash_ids[idx] if isinstance(idx, slice) else [hash_ids[i] for i in idx]
        return replace(
            self,
            source=source,
            arrival_s=arrival,
            prompt_tokens=self.prompt_tokens[idx],
            output_tokens=self.output_tokens[idx],
            hash_ids=hash_ids,
            tenant=None if self.tenant is None else self.tenant[idx],
        )

    def scale_rate(self, factor: float) -> Trace:
        """``factor`` times the request rate: arrivals divided by ``factor`` (2 = twice as fast).

        Lengths are unchanged.
        """
        if not (isinstance(factor, (int, float)) and math.isfinite(factor) and factor > 0):
            raise ValueError(f"scale_rate: factor must be a finite number > 0 (got {factor!r})")
        if factor == 1:
            return self
        return replace(
            self, arrival_s=self.arrival_s / float(factor), source=f"{self.source} (rate x{factor:g})"
        )

    def spread_ties(self, seed: int = 0) -> Trace:
        """Requests that share one arrival time spread uniformly (file order kept) up to the next distinct time.

        Some traces log arrivals on a coarse clock: the Mooncake FAST'25 conversation trace's 12,031 timestamps take
        1,180 values 3 s apart (~10 requests per tick, per-tick counts Poisson: variance/mean 1.10). Replayed as
        read, each tick is a burst of ~10 simultaneous requests (inter-arrival CV 3.03); spread, the CV is 1.01.
        The last tick spreads over the median gap between distinct times. Order, lengths and ``hash_ids`` are
        unchanged (no request moves past another), so the columns stay aligned.
        """
        if len(self) < 2:
            return self
        u, first, counts = np.unique(self.arrival_s, return_index=True, return_counts=True)
        if len(u) == len(self):
            return self
        gaps = np.diff(u)
        tail = float(np.median(gaps)) if len(gaps) else 0.0
        span = np.append(gaps, tail)  # each tick's room: up to the next distinct arrival time
        rng = np.random.default_rng(seed)
        arr = self.arrival_s.copy()
        for k in np.flatnonzero(counts > 1):
            i, c = int(first[k]), int(counts[k])
            # the tick's first request stays on the tick (first arrival stays at 0.0); the rest in sorted order
            arr[i + 1 : i + c] = u[k] + np.sort(rng.uniform(0.0, span[k], c - 1))
        return replace(self, arrival_s=arr, source=f"{self.source} [ties spread, seed={seed}]")

    def window(self, start_s: float, end_s: float) -> Trace:
        """The requests arriving in ``[start_s, end_s)``, re-based so the first of them arrives at 0.0.

        Re-basing to the first kept arrival (not to ``start_s``) keeps the "first arrival at 0" invariant.
        """
        if not (start_s <= end_s) or math.isnan(start_s):
            raise ValueError(f"window: need start_s <= end_s (got {start_s!r}, {end_s!r})")
        lo, hi = np.searchsorted(self.arrival_s, [start_s, end_s], side="left")
        sl = slice(int(lo), int(hi))
        arr = self.arrival_s[sl]
        arr = arr - arr[0] if len(arr) else arr
        return self._select(sl, arr, f"{self.source} [window {start_s:g}s..{end_s:g}s]")

    def head(self, n: int) -> Trace:
        """The first ``n`` requests (all of them if ``n >= len``)."""
        if n < 0:
            raise ValueError(f"head: n must be >= 0 (got {n})")
        if n >= len(self):
            return self
        return self._select(slice(0, n), self.arrival_s[:n], f"{self.source} [first {n}]")

    def summary(self) -> dict:
        """Counts and length percentiles, JSON-ready (plain floats and ints)."""
        p, o = self.prompt_tokens, self.output_tokens
        out: dict = {
            "name": self.name,
            "source": self.source,
            "n": len(self),
            "duration_s": round(self.duration_s, 3),
            "mean_rate": round(self.mean_rate, 4),
            "prompt_p50": _percentile(p, 50),
            "prompt_p90": _percentile(p, 90),
            "prompt_mean": round(float(p.mean()), 2) if len(p) else 0.0,
            "output_p50": _percentile(o, 50),
            "output_p90": _percentile(o, 90),
            "output_mean": round(float(o.mean()), 2) if len(o) else 0.0,
            "skipped_rows": self.skipped_rows,
        }
        if len(self) > 2:
            gaps = np.diff(self.arrival_s)
            m = float(gaps.mean())
            out["interarrival_cv"] = round(float(gaps.std()) / m, 3) if m > 0 else 0.0
        if self.hash_ids is not None:
            out["has_hash_ids"] = True
        if self.tenant is not None:
            out["tenants"] = len(np.unique(self.tenant))
        return out
