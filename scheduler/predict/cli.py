"""``llmsched predict train|eval|fit-trace``.

    llmsched predict train --data-dir DIR [--out DIR] [--only ngram,trace,embedding] [--report PATH.json]
    llmsched predict eval --data PATH.jsonl [--predictor default|ngram|embedding|trace|ensemble] [--artifacts DIR]
                          [--json OUT] [--no-tenant]
    llmsched predict fit-trace --trace LOG --out DIR [--tenant NAME] [--holdout 0.2] [--json OUT]
        (the trace predictor refitted on a deployment's own request log: sim/commands.py, fit_predictor_main)

``eval`` reads JSONL lines with ``prompt`` and ``response`` text (see ``data.read_eval_jsonl``); both are counted
with ``count_tokens``, the same counter used in training.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from scheduler.cli_args import nonneg_float, output_file

_USAGE = "usage: llmsched predict {train,eval,fit-trace} [options]   (-h after the subcommand for help)"


def main(argv: list[str] | None = None) -> int:
    """Dispatch ``train`` / ``eval``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    sub, rest = argv[0], argv[1:]
    if sub == "train":
        return train_main(rest)
    if sub == "eval":
        return eval_main(rest)
    # fit-trace is dispatched by scheduler/cli.py (it reads traces with the simulator's loaders) but is ours to list
    print(f"llmsched predict: unknown subcommand {sub!r}; allowed: train, eval, fit-trace", file=sys.stderr)
    return 2


def train_main(argv: list[str] | None = None) -> int:
    """Train predictors from the shared data folder and write artifacts + a held-out metrics report."""
    from scheduler.predict.registry import ARTIFACTS
    from scheduler.predict.train import train_all
    from scheduler.telemetry.report import write_json

    ap = argparse.ArgumentParser(prog="llmsched predict train")
    ap.add_argument("--data-dir", required=True, help="folder with the prompt/response datasets and traces")
    ap.add_argument(
        "--out", default=str(ARTIFACTS), help="artifact folder (default: the package's artifacts/)"
    )
    ap.add_argument("--only", default="ngram,trace,embedding", help="comma list of ngram, trace, embedding")
    ap.add_argument("--report", type=output_file, default=None, help="write the held-out metrics JSON here")
    ap.add_argument(
        "--embed-cache", default=None, help=".npz cache of prompt embeddings (speeds up re-training)"
    )
    ap.add_argument("--balance", type=float, default=0.5, help="source weight = n_source ** balance")
    ap.add_argument("--l2", type=nonneg_float, default=3e-5, help="ngram L2 strength")
    a = ap.parse_args(argv)
    if not Path(a.data_dir).is_dir():
        ap.error(f"--data-dir: {a.data_dir!r} is not a directory")
    which = [w.strip() for w in a.only.split(",") if w.strip()]
    bad = [w for w in which if w not in ("ngram", "trace", "embedding")]
    if bad or not which:  # none: it trained nothing, wrote an empty report and exited 0
        ap.error(f"--only: {f'unknown {bad}' if bad else 'nothing named'}; allowed: ngram, trace, embedding")
    try:
        report = train_all(
            a.data_dir,
            a.out,
            which=which,
            balance=a.balance,
            l2=a.l2,
            embed_cache=a.embed_cache,
            log=lambda m: print(m, file=sys.stderr),
        )
    except FileNotFoundError as e:  # the datasets are read first: nothing was trained yet
        ap.error(f"--data-dir: {a.data_dir!r} lacks {Path(e.filename or '?').name!r} (the prompt/response datasets "
                 "and traces named in shared/data/README.md)")
    _print_report(report)
    if a.report:
        # NaN (the constant baseline's undefined tau) is not JSON: write null, as `predict eval` does. write_json
        # creates the folder output_file let through (a missing one was a traceback after the training).
        write_json(a.report, _finite(report))
    return 0


def eval_main(argv: list[str] | None = None) -> int:
    """Evaluate a predictor on a prompt/response JSONL; print and optionally write the metrics JSON."""
    from scheduler.predict.data import read_eval_jsonl
    from scheduler.predict.metrics import evaluate
    from scheduler.predict.registry import load_predictor
    from scheduler.telemetry.report import write_json

    ap = argparse.ArgumentParser(prog="llmsched predict eval")
    ap.add_argument("--data", required=True, help="JSONL with 'prompt' and 'response' text per line")
    ap.add_argument("--predictor", default="default", help="default, ngram, embedding, trace or ensemble")
    ap.add_argument("--artifacts", default=None, help="artifact folder (default: the shipped one)")
    ap.add_argument("--json", type=output_file, default=None, help="write metrics JSON here")
    ap.add_argument("--no-tenant", action="store_true", help="ignore tenant/generator/model fields")
    a = ap.parse_args(argv)
    if not Path(a.data).is_file():
        ap.error(f"--data: {a.data!r} is not a file")
    try:
        blank: list[str] = []
        records = read_eval_jsonl(a.data, use_tenant=not a.no_tenant, blank=blank)
        predictor = load_predictor(a.predictor, artifacts=a.artifacts)
    except (ValueError, OSError, RuntimeError) as e:
        print(f"llmsched predict eval: {e}", file=sys.stderr)
        return 2
    try:
        metrics = evaluate(predictor, records)
    except (ValueError, OSError, RuntimeError) as e:  # e.g. EmbeddingUnavailable when the encoder first loads
        print(f"llmsched predict eval: {e}", file=sys.stderr)
        return 2
    # A rank correlation is undefined on one record or all-equal lengths: NaN is not JSON, so write null and say why.
    undefined = sorted(k for k, v in metrics.items() if isinstance(v, float) and not math.isfinite(v))
    for k in undefined:
        metrics[k] = None
    if undefined:
        print(f"llmsched predict eval: {', '.join(undefined)} undefined on these {len(records)} record(s) (too few, or "
              "all lengths equal): written as null", file=sys.stderr)
    if blank:
        print(f"llmsched predict eval: {len(blank)} line(s) with a blank response left out (first: {blank[0]})",
              file=sys.stderr)
    result = {
        "predictor": predictor.name,
        "data": str(a.data),
        "token_counter": "scheduler.predict.count_tokens",
        "skipped_blank_responses": len(blank),
        **metrics,
    }
    print(json.dumps(result, indent=1))
    if a.json:
        write_json(a.json, result)
    return 0


def _finite(obj):
    """``obj`` with every non-finite float replaced by ``None`` (recursively)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


def _print_report(report: dict) -> None:
    for name, res in report["predictors"].items():
        for mode, rows in res.items():
            if not isinstance(rows, dict):
                continue
            print(f"\n{name} ({mode})")
            print(
                f"  {'source':22s} {'n':>6s} {'tau':>6s} {'acc':>6s} {'mae':>7s} {'cov80':>6s} {'ece':>6s} {'ms':>6s}"
            )
            for s, m in rows.items():
                print(
                    f"  {s:22s} {m['n']:6d} {m['kendall_tau']:6.3f} {m['bucket_accuracy']:6.3f} "
                    f"{m['mae_tokens']:7.1f} {m['coverage_10_90']:6.2f} {m['ece']:6.3f} {m['latency_ms_p50']:6.3f}"
                )
