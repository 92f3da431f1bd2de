"""Reports: a terminal table (rich), JSON, and a PNG figure (latency CDFs, load over time)."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from scheduler.core.metrics import RequestMetrics


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v * 1e3:.1f}"


def summary_table(summaries: Mapping[str, Mapping[str, Any]], *, title: str = "llmsched"):
    """One row per run (simulator, live replay, a router...), latencies in ms."""
    from rich.table import Table

    t = Table(title=title)
    t.add_column("run")
    for col in ("done/req", "TTFT p50 ms", "TTFT p90 ms", "TTFT p99 ms", "TPOT p50 ms", "TPOT p99 ms", "E2E p50 ms",
                "E2E p99 ms", "SLO"):
        t.add_column(col, justify="right")
    for name, s in summaries.items():
        t.add_row(
            name,
            f"{s['completed']}/{s['requests']}",
            _ms(s["ttft_s"]["p50"]),
            _ms(s["ttft_s"]["p90"]),
            _ms(s["ttft_s"]["p99"]),
            _ms(s["tpot_s"]["p50"]),
            _ms(s["tpot_s"]["p99"]),
            _ms(s["e2e_s"]["p50"]),
            _ms(s["e2e_s"]["p99"]),
            _slo_cell(s),
        )
    return t


def _slo_cell(s: Mapping[str, Any]) -> str:
    """Attainment, or "no SLO" where no target was set (the attainment is then only the completed share)."""
    targets = s.get("slo") or {}
    classes = targets.get("classes") or {"0": targets}
    if targets and all(c.get("ttft_s") is None and c.get("tpot_s") is None for c in classes.values()):
        return "no SLO"
    a = s["slo_attainment"] * 100
    return f"{min(a, 99.9) if a < 100 else a:.1f}%"  # one miss in 3000 is not 100.0%


def print_summaries(summaries: Mapping[str, Mapping[str, Any]], *, title: str = "llmsched", console=None) -> None:
    import sys

    from rich.console import Console

    # Pipes and CI logs get a wide table rather than rich's 80-column default.
    console = console or (Console() if sys.stdout.isatty() else Console(width=150))
    console.print(summary_table(summaries, title=title))


def write_json(path: str | Path, obj: Any) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(obj, indent=2, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def write_figure(
    path: str | Path,
    metrics: Mapping[str, RequestMetrics],
    *,
    timeline: tuple[np.ndarray, np.ndarray, list[str]] | None = None,
    title: str = "",
) -> Path:
    """Latency CDFs (TTFT, TPOT, E2E) per run, and per-instance outstanding requests over time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    ncols = 4 if timeline is not None else 3
    fig, axes = plt.subplots(1, ncols, figsize=(4.2 * ncols, 3.6))
    for ax, (attr, label) in zip(axes, (("ttft_s", "TTFT (s)"), ("tpot_s", "TPOT (s)"), ("e2e_s", "E2E (s)"))):
        for name, m in metrics.items():
            x = np.sort(getattr(m, attr)[np.isfinite(getattr(m, attr))])
            if len(x):
                ax.plot(x, np.arange(1, len(x) + 1) / len(x), label=name)
        ax.set_xlabel(label)
        ax.set_ylabel("CDF")
        ax.set_xscale("log")
        # Plain numbers, minor ones as the span leaves room: the default minor labels (3x10^-1, 4x10^-1, ...) ran
        # into each other on CDFs spanning less than a decade.
        lo, hi = ax.get_xlim()
        decades = math.log10(hi / lo) if lo > 0 and hi > lo else 0.0
        minor = (2, 3, 5) if decades < 1.2 else (2, 5) if decades < 2.2 else ()
        ax.xaxis.set_major_formatter(FuncFormatter(_tick))
        ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _, m=minor: _tick(v) if _mantissa(v) in m else ""))
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    if timeline is not None:
        t, load, ids = timeline
        ax = axes[3]
        if len(t) and load.shape[1] <= 4:
            for k in range(load.shape[1]):
                ax.plot(t, load[:, k], lw=0.8, label=ids[k])
        elif len(t):  # many instances: the spread, not a line each
            ax.plot(t, load.max(axis=1), lw=0.8, label="max instance")
            ax.plot(t, load.mean(axis=1), lw=0.8, label="mean instance")
            ax.plot(t, load.min(axis=1), lw=0.8, label="min instance")
        ax.set_xlabel("time (s)")
        ax.set_ylabel("requests on instance")
        ax.legend(fontsize=6)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def _mantissa(v: float) -> int:
    """The leading digit of ``v`` > 0 (2 for 0.2, 20 and 2000)."""
    return round(v / 10 ** math.floor(math.log10(v))) if v > 0 else 0


def _tick(v: float, _pos: object = None) -> str:
    return f"{v:g}"
