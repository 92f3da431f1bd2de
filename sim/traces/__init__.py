"""Trace replay inputs for the simulator and the live replayer.

    from sim.traces import load_trace, synthetic, default_trace
    tr = load_trace("azure_llm_2023_conv.csv.gz")          # format auto-detected, gzip by magic bytes
    tr = tr.window(0, 600).scale_rate(2.0)                  # first 10 minutes, twice the request rate
    syn = synthetic(100_000, rate=20.0, arrival="gamma", cv=3.0, pairs=tr)

See docs/traces.md for the formats and the measured statistics of each real trace.
"""

from sim.traces.bundled import bundled_traces, default_trace, load_bundled
from sim.traces.loaders import FORMATS, load_trace
from sim.traces.synthetic import (
    ARRIVALS,
    DEFAULT_OUTPUT,
    DEFAULT_PROMPT,
    Empirical,
    Fixed,
    LengthDist,
    LogNormal,
    arrival_times,
    interarrivals,
    synthetic,
)
from sim.traces.trace import Trace, TraceFormatError

__all__ = [
    "ARRIVALS",
    "DEFAULT_OUTPUT",
    "DEFAULT_PROMPT",
    "FORMATS",
    "Empirical",
    "Fixed",
    "LengthDist",
    "LogNormal",
    "Trace",
    "TraceFormatError",
    "arrival_times",
    "bundled_traces",
    "default_trace",
    "interarrivals",
    "load_bundled",
    "load_trace",
    "synthetic",
]
