"""Synthetic traces: an arrival process plus a length distribution for prompts and outputs, fully vectorised.

Arrival processes (inter-arrival gaps, mean ``1 / rate``):

- ``poisson``: exponential gaps (CV = 1);
- ``gamma``: gamma gaps with the requested coefficient of variation ``cv`` (shape ``1 / cv**2``);
  ``cv > 1`` is bursty, ``cv < 1`` smoother than Poisson, ``cv = 0`` evenly spaced;
- ``weibull``: Weibull gaps with the requested ``cv`` (ServeGen fits many Bailian clients with Weibull);
- ``constant``: evenly spaced.

Lengths: ``LogNormal(median, sigma)``, ``Empirical(values)`` (resample another trace's column),
``Fixed(n)``, all clipped to ``[1, max]``. ``pairs=trace`` resamples (prompt, output) *pairs* so their
correlation is kept.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np

from sim.traces.trace import Trace

ARRIVALS: tuple[str, ...] = ("poisson", "gamma", "weibull", "constant")


@runtime_checkable
class LengthDist(Protocol):
    """Anything that draws ``n`` token counts (int64, >= 1)."""

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray: ...


def _clip(x: np.ndarray, hi: int) -> np.ndarray:
    return np.clip(x, 1, hi).astype(np.int64, copy=False)


@dataclass(frozen=True)
class LogNormal:
    """Lognormal token counts: ``median * exp(sigma * N(0,1))``, rounded, clipped to ``[1, max]``."""

    median: float
    sigma: float
    max: int = 131_072

    def __post_init__(self) -> None:
        if not (self.median > 0 and self.sigma >= 0 and self.max >= 1):
            raise ValueError(f"LogNormal: need median > 0, sigma >= 0, max >= 1 (got {self})")

    @classmethod
    def from_p50_p90(cls, p50: float, p90: float, max: int = 131_072) -> LogNormal:
        """Fit from two quantiles (z(0.9) = 1.2816)."""
        return cls(p50, math.log(p90 / p50) / 1.2815516, max)

    def __repr__(self) -> str:
        return f"LogNormal(median={self.median:g}, sigma={self.sigma:.3g}, max={self.max})"

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        x = rng.lognormal(math.log(self.median), self.sigma, n)
        return _clip(np.rint(x), self.max)


@dataclass(frozen=True)
class Empirical:
    """Resample (with replacement) from observed token counts, e.g. ``Empirical(trace.output_tokens)``."""

    values: np.ndarray = field(repr=False)
    max: int = 1 << 62

    def __post_init__(self) -> None:
        v = np.asarray(self.values)
        if v.ndim != 1 or len(v) == 0:
            raise ValueError("Empirical: values must be a non-empty 1-D array")
        object.__setattr__(self, "values", v.astype(np.int64))

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        return _clip(self.values[rng.integers(0, len(self.values), n)], self.max)


@dataclass(frozen=True)
class Fixed:
    """Every request gets the same token count."""

    value: int

    def __post_init__(self) -> None:
        if self.value < 1:
            raise ValueError(f"Fixed: value must be >= 1 (got {self.value})")

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        return np.full(n, self.value, dtype=np.int64)


# Defaults fitted to the Azure LLM 2023 conversation trace
# (prompt p50 1020 / p90 2734, output p50 129 / p90 424).
DEFAULT_PROMPT = LogNormal.from_p50_p90(1020, 2734, max=32_768)
DEFAULT_OUTPUT = LogNormal.from_p50_p90(129, 424, max=4_096)


def _as_dist(d: LengthDist | int | np.ndarray, what: str) -> LengthDist:
    if isinstance(d, (int, np.integer)) and not isinstance(d, bool):
        return Fixed(int(d))
    if isinstance(d, np.ndarray):
        return Empirical(d)
    if isinstance(d, LengthDist):
        return d
    raise TypeError(
        f"synthetic: {what} must be a LengthDist (LogNormal, Empirical, Fixed), int or array "
        f"(got {type(d).__name__})"
    )


def _weibull_shape(cv: float) -> float:
    """Weibull shape k whose CV is ``cv``.

    CV^2 = G(1+2/k) / G(1+1/k)^2 - 1 is decreasing in k, so bisect on log k.
    """

    def cv_of(k: float) -> float:
        return math.sqrt(math.exp(math.lgamma(1 + 2 / k) - 2 * math.lgamma(1 + 1 / k)) - 1)

    lo, hi = math.log(0.05), math.log(200.0)  # cv(0.05) ~ 1.8e5, cv(200) ~ 0.0064
    for _ in range(80):
        mid = 0.5 * (lo + hi)
        if cv_of(math.exp(mid)) > cv:
            lo = mid
        else:
            hi = mid
    return math.exp(0.5 * (lo + hi))


def interarrivals(
    n: int, rate: float, rng: np.random.Generator, *, arrival: str = "poisson", cv: float = 1.0
) -> np.ndarray:
    """``n`` inter-arrival gaps (seconds) with mean ``1 / rate`` and the given process/CV."""
    if not (math.isfinite(rate) and rate > 0):
        raise ValueError(f"synthetic: rate must be a finite number > 0 req/s (got {rate!r})")
    if not (math.isfinite(cv) and cv >= 0):
        raise ValueError(f"synthetic: cv must be a finite number >= 0 (got {cv!r})")
    mean = 1.0 / rate
    if arrival == "poisson":
        return rng.exponential(mean, n)
    if arrival == "constant" or (arrival in ("gamma", "weibull") and cv == 0):
        return np.full(n, mean)
    if arrival == "gamma":
        shape = 1.0 / (cv * cv)
        return rng.gamma(shape, mean / shape, n)
    if arrival == "weibull":
        k = _weibull_shape(cv)
        return rng.weibull(k, n) * (mean / math.gamma(1 + 1 / k))
    raise ValueError(f"synthetic: unknown arrival process {arrival!r}; allowed: {', '.join(ARRIVALS)}")


def arrival_times(
    n: int, rate: float, rng: np.random.Generator, *, arrival: str = "poisson", cv: float = 1.0
) -> np.ndarray:
    """``n`` arrival times starting at 0.0 (``n - 1`` gaps from :func:`interarrivals`)."""
    out = np.zeros(n, dtype=np.float64)
    if n > 1:
        np.cumsum(interarrivals(n - 1, rate, rng, arrival=arrival, cv=cv), out=out[1:])
    elif n == 1:
        interarrivals(0, rate, rng, arrival=arrival, cv=cv)  # still validate the arguments
    return out


def synthetic(
    n: int,
    rate: float,
    *,
    arrival: str = "poisson",
    cv: float = 1.0,
    prompt: LengthDist | int | np.ndarray = DEFAULT_PROMPT,
    output: LengthDist | int | np.ndarray = DEFAULT_OUTPUT,
    pairs: Trace | None = None,
    seed: int = 0,
    name: str | None = None,
) -> Trace:
    """``n`` requests arriving at ``rate`` req/s.

    Args:
        arrival: one of ``ARRIVALS``; ``cv`` applies to ``gamma`` and ``weibull``
            (``poisson`` is always CV 1).
        prompt, output: length distributions (an int means fixed, an array means empirical resampling).
            Defaults are lognormals fitted to the Azure 2023 conversation trace.
        pairs: when given, (prompt, output) pairs are resampled jointly from this trace; ``prompt``/``output``
            are then ignored.
        seed: the one seed; the same arguments give the same trace.
    """
    if n < 0:
        raise ValueError(f"synthetic: n must be >= 0 (got {n})")
    rng = np.random.default_rng(seed)
    arr = arrival_times(n, rate, rng, arrival=arrival, cv=cv)
    proc = "poisson" if arrival == "poisson" else f"{arrival}(cv={cv:g})"
    if pairs is not None:
        if len(pairs) == 0:
            raise ValueError("synthetic: pairs trace is empty")
        idx = rng.integers(0, len(pairs), n)
        p, o = pairs.prompt_tokens[idx], pairs.output_tokens[idx]
        lengths = f"pairs from {pairs.name}"
    else:
        pd, od = _as_dist(prompt, "prompt"), _as_dist(output, "output")
        p, o = pd.sample(n, rng), od.sample(n, rng)
        lengths = f"prompt {pd!r}, output {od!r}"
    src = f"synthetic: {proc} arrivals at {rate:g} req/s, {lengths}, seed={seed}"
    return Trace(
        name=name or f"synthetic_{arrival}", source=src, arrival_s=arr, prompt_tokens=p, output_tokens=o,
        drawn_arrivals=f"{proc} at {rate:g} req/s, seed={seed}",
    )
