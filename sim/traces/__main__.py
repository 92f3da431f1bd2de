"""``python -m sim.traces FILE... [--format F] [--markdown]``: load traces and print their summaries.

With no FILE, summarises the bundled traces. Exit status 2 on a missing or malformed file (a TraceFormatError
names path:line) or a bad flag.
"""

from __future__ import annotations

import argparse
import json
import re
import sys

from scheduler.cli_args import positive_float, positive_int
from sim.traces.bundled import bundled_traces, load_bundled
from sim.traces.loaders import FORMATS, load_trace
from sim.traces.trace import Trace

_COLS = (
    "| trace | format | n | duration s | rate req/s | inter-arrival CV "
    "| prompt p50 / p90 / mean | output p50 / p90 / mean |"
)
_FMT = re.compile(r"\((" + "|".join(FORMATS) + r")\)")


def _row(label: str, t: Trace) -> str:
    s = t.summary()
    m = _FMT.search(t.source)
    fmt = m.group(1) if m else "?"
    return (
        f"| {label} | {fmt} | {s['n']:,} | {s['duration_s']:.1f} | {s['mean_rate']:.3f} | "
        f"{s.get('interarrival_cv', 0.0):.2f} | "
        f"{s['prompt_p50']:g} / {s['prompt_p90']:g} / {s['prompt_mean']:.0f} | "
        f"{s['output_p50']:g} / {s['output_p90']:g} / {s['output_mean']:.0f} |"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sim.traces", description=__doc__)
    ap.add_argument("files", nargs="*", help="trace files (default: the bundled ones)")
    ap.add_argument("--format", choices=FORMATS, help="skip auto-detection")
    ap.add_argument("--limit", type=positive_int, help="first N requests only")
    ap.add_argument("--rate", type=positive_float, default=1.0, help="arrival rate for token-pair files (req/s)")
    ap.add_argument("--markdown", action="store_true", help="one markdown table row per trace, not JSON")
    args = ap.parse_args(argv)
    try:
        if args.files:
            traces = [
                (f.rsplit("/", 1)[-1], load_trace(f, args.format, rate=args.rate)) for f in args.files
            ]
        else:
            traces = [(f"bundled: {n}", load_bundled(n)) for n in bundled_traces()]
        if args.limit is not None:  # the first N arrivals (limit= in load_trace: the first N rows of the file)
            traces = [(label, t.head(args.limit)) for label, t in traces]
    except (ValueError, OSError) as e:  # TraceFormatError is a ValueError; a missing file an OSError
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.markdown:
        print(_COLS)
        print("|---" * 8 + "|")
        for label, t in traces:
            print(_row(label, t))
    else:
        for _, t in traces:
            print(json.dumps(t.summary()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
