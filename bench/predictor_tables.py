"""Markdown tables of docs/results/predictor.md from a `llmsched predict train --report R.json` report.

    python bench/predictor_tables.py R.json > /tmp/tables.md

Prints the summary table (held-out, with tenant), the trace predictor's table and the full per-source tables,
in the order the doc shows them; non-finite values (the constant's undefined tau) print as "–".
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

TEXT = ("ngram", "embedding", "ensemble")
COLUMNS = (("kendall_tau", "Kendall tau", 3), ("bucket_accuracy", "bucket acc", 3),
           ("bucket_within_one", "within ±1 bucket", 3), ("mae_tokens", "MAE (tok)", 1),
           ("mean_true_tokens", "mean true (tok)", 1), ("coverage_10_90", "10-90% coverage", 2), ("ece", "ECE", 3),
           ("nll", "NLL", 3), ("latency_ms_p50", "p50 latency (ms)", 3))


def _f(v: float | None, digits: int) -> str:
    return "–" if v is None or not math.isfinite(v) else f"{v:.{digits}f}"


def summary(report: dict) -> list[str]:
    p = report["predictors"]
    const = p["constant"]["training_marginal"]
    out = ["| source | n | constant acc / MAE | " + " | ".join(f"{k} tau / acc / MAE" for k in TEXT if k in p) + " |",
           "|---|---:|---|" + "---|" * sum(k in p for k in TEXT)]
    for s, c in const.items():
        cells = [f"{_f(p[k]['with_tenant'][s]['kendall_tau'], 3)} / {_f(p[k]['with_tenant'][s]['bucket_accuracy'], 2)}"
                 f" / {_f(p[k]['with_tenant'][s]['mae_tokens'], 0)}" for k in TEXT if k in p]
        out.append(f"| {s} | {c['n']} | {_f(c['bucket_accuracy'], 2)} / {_f(c['mae_tokens'], 0)} | "
                   + " | ".join(cells) + " |")
    return out


def trace_table(report: dict) -> list[str]:
    t = report["predictors"]["trace"]
    out = ["| trace | n | tau | bucket acc | MAE | coverage 10-90 | tau / acc without tenant |",
           "|---|---:|---:|---:|---:|---:|---|"]
    for s, m in t["with_tenant"].items():
        o = t["without_tenant"][s]
        out.append(f"| {s} | {m['n']} | {_f(m['kendall_tau'], 3)} | {_f(m['bucket_accuracy'], 3)} | "
                   f"{_f(m['mae_tokens'], 0)} | {_f(m['coverage_10_90'], 2)} | {_f(o['kendall_tau'], 3)} / "
                   f"{_f(o['bucket_accuracy'], 3)} |")
    return out


def full(report: dict) -> list[str]:
    out = []
    titles = {"constant": ("training_marginal", "training marginal")}
    for name, res in report["predictors"].items():
        modes = [(m, m.replace("_", " ")) for m in ("with_tenant", "without_tenant") if m in res]
        if name in titles:
            modes = [titles[name]]
        for mode, title in modes:
            out += ["", f"**{name} — {title}**", "",
                    "| source | n | " + " | ".join(c[1] for c in COLUMNS) + " |",
                    "|---|---:|" + "---:|" * len(COLUMNS)]
            for s, m in res[mode].items():
                out.append(f"| {s} | {m['n']} | " + " | ".join(_f(m.get(k), d) for k, _, d in COLUMNS) + " |")
    return out


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    report = json.loads(Path(args[0]).read_text(encoding="utf-8"))
    print("\n".join(["## Summary (held-out, with tenant where the record has one)", "", *summary(report), "",
                     "Trace predictor:", "", *trace_table(report), "", "## Full per-source tables", *full(report)]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
