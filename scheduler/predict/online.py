"""Online length learning: the deployment's own finished requests sharpen the trace predictor's guesses.

The shipped trace predictor knows the public traces it was fitted on; a deployment's traffic is rarely one of them
(the Intelligent Router mix: its ~130-token guesses are the same for a 30-token and a 550-token class). Every
finished request tells the ingress (and the simulator) its input and output length, so ``OnlineLengths`` keeps
P(output bucket | input bucket) counts of them and folds them into each prediction as a Dirichlet posterior whose
prior is the predictor's own distribution at ``strength`` pseudo-counts: an input bucket with no history keeps the
shipped guess; after ``strength`` finished requests it is half history. Counts decay so that a row holds at most
``memory`` requests' worth: the mix a deployment serves drifts (re-roling exists for that), and old traffic should
stop voting.

Only predictions from length alone (requests without text, and the trace predictor's, which never reads the text)
are adjusted (``ServingPredictor.predict_dist``). A text predictor's distribution is specific to its prompt; one
histogram per input bucket would wash its signal out.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from scheduler.predict.base import BUCKET_EDGES, LengthPrediction, bucket_of
from scheduler.predict.trace import INPUT_EDGES


class OnlineLengths:
    """Counts of finished requests' (input bucket, output bucket), and the posterior they give a prediction.

    Args:
        strength: pseudo-counts the predictor's distribution weighs as (the prior's weight in requests).
        memory: a row's counts are scaled down past this many requests (exponential forgetting).
    """

    def __init__(
        self,
        *,
        strength: float = 20.0,
        memory: float = 1000.0,
        input_edges: Sequence[int] = INPUT_EDGES,
        edges: Sequence[int] = BUCKET_EDGES,
    ) -> None:
        if not strength > 0 or not memory > 0:
            raise ValueError(f"OnlineLengths: strength and memory must be > 0, got {strength}, {memory}")
        self.strength, self.memory = float(strength), float(memory)
        self.input_edges, self.edges = tuple(input_edges), tuple(edges)
        self.counts = np.zeros((len(self.input_edges) - 1, len(self.edges) - 1))
        self.observed = 0

    def fresh(self) -> OnlineLengths:
        """The same settings without history (a new replay starts from the shipped guesses)."""
        return OnlineLengths(
            strength=self.strength, memory=self.memory, input_edges=self.input_edges, edges=self.edges
        )

    def observe(
        self, prompt_tokens: int, output_tokens: int, *, cut: bool = False, prior: LengthPrediction | None = None
    ) -> None:
        """One finished request. ``cut``: it stopped at ``output_tokens`` because of ``max_tokens`` (or the
        context), so its own length is only known to be longer. Booked at that length, every client cap would
        pull the guesses down to it; instead its one count is spread over the buckets past ``output_tokens`` as
        the posterior for its input bucket spreads there (Efron's redistribution to the right, as Kaplan-Meier
        does). ``prior``: the predictor's length-only distribution for the request (without it, the history
        alone; with no history past the cut, the cut's own bucket: a lower bound)."""
        row = self.counts[bucket_of(prompt_tokens, self.input_edges)]
        weights = np.zeros_like(row)
        if cut:
            if prior is not None:
                self._check(prior)  # (``adjust`` checks it only once there is history)
            # The posterior ``adjust`` gives the prior; without one, the history alone.
            post = self.adjust(prior, prompt_tokens) if prior is not None else (
                LengthPrediction.from_probs(row.tolist(), self.edges) if row.any() else None)
            if post is not None:
                weights = np.asarray(post.mass_above(output_tokens))
        if weights.sum() > 0.0:
            row += weights / weights.sum()
        else:
            row[bucket_of(output_tokens, self.edges)] += 1.0
        total = row.sum()
        if total > self.memory:
            row *= self.memory / total
        self.observed += 1

    def _check(self, prediction: LengthPrediction) -> None:
        if prediction.bucket_edges != self.edges:
            raise ValueError(
                f"prediction buckets {prediction.bucket_edges} are not the online counts' {self.edges}"
            )

    def adjust(self, prediction: LengthPrediction, prompt_tokens: int) -> LengthPrediction:
        """``prediction`` updated with the history of its input bucket (unchanged without history)."""
        row = self.counts[bucket_of(prompt_tokens, self.input_edges)]
        if not row.any():
            return prediction
        self._check(prediction)
        post = self.strength * np.asarray(prediction.probs) + row
        return LengthPrediction.from_probs(post.tolist(), self.edges)


__all__ = ["OnlineLengths"]
