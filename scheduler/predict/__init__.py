"""Response-length predictors: a distribution over length buckets (plus median / quantiles) per request.

    from scheduler.predict import load_predictor
    p = load_predictor("default").predict("Write a haiku about GPUs", prompt_tokens=7)
    p.point, p.quantile(0.9), p.probs

Predictors: ``ngram`` (numpy only, shipped), ``embedding`` (MiniLM + LightGBM head, optional packages),
``trace`` (no text: input length + tenant), ``default`` (ngram, trace when the prompt is unknown).
Token counts are the deterministic regex approximation in ``count_tokens``.
"""

from scheduler.predict.base import BUCKET_EDGES, LengthPrediction, LengthPredictor, bucket_of, count_tokens
from scheduler.predict.data import Record, read_eval_jsonl
from scheduler.predict.metrics import evaluate, kendall_tau
from scheduler.predict.registry import PredictorKind, TextWithTraceFallback, load_predictor


def train_main(argv: list[str] | None = None) -> int:
    """``llmsched predict train`` (see ``scheduler.predict.cli``)."""
    from scheduler.predict.cli import train_main as _train

    return _train(argv)


def eval_main(argv: list[str] | None = None) -> int:
    """``llmsched predict eval`` (see ``scheduler.predict.cli``)."""
    from scheduler.predict.cli import eval_main as _eval

    return _eval(argv)


__all__ = [
    "BUCKET_EDGES",
    "LengthPrediction",
    "LengthPredictor",
    "PredictorKind",
    "Record",
    "TextWithTraceFallback",
    "bucket_of",
    "count_tokens",
    "eval_main",
    "evaluate",
    "kendall_tau",
    "load_predictor",
    "read_eval_jsonl",
    "train_main",
]
