"""Core types of the response-length predictors: the prediction (a distribution over length buckets), the
predictor protocol, the shared bucket edges and the deterministic token counter.

A prediction is a histogram over log2-spaced token buckets (``BUCKET_EDGES``) plus a point estimate (the median).
Inside a bucket the CDF is taken as linear in log(tokens), so quantiles are continuous and ranking by ``point``
has no ties between requests that fall into the same modal bucket.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

# NOTE(predict): log2 buckets from 16 tokens; the last edge is "inf-ish" (responses are capped by max_tokens anyway,
# and a finite edge keeps quantiles finite). 9 buckets.
BUCKET_EDGES: tuple[int, ...] = (0, 16, 32, 64, 128, 256, 512, 1024, 2048, 8192)

# E[L - g | L > g] of a length log-uniform on [g, 2g), over g: the rest ``expected_remaining`` gives at least a
# response the histogram no longer resolves (one more octave bucket from where it stands; its tail rule).
OCTAVE_REST = 1.0 / math.log(2.0) - 1.0

# Token counter: no Llama tokenizer is available offline, so count with a regex that mimics a BPE vocabulary:
# an ASCII word is one token per 8 letters, every digit is a token (Llama splits digits), every newline is a token,
# and a run of one repeated punctuation char ("**", "...", "---") is one token; other characters (CJK, emoji) count
# one each. Measured: 1.38 (LIMA), 1.54 (alpaca_eval), 1.77 (GPTeacher, code-heavy) tokens per whitespace word;
# Llama-2 gives ~1.3-1.5 on prose and more on code, so the counts are Llama-like within ~15%.
_TOKEN_RE = re.compile(r"[A-Za-z]{1,8}|\d|\n|([^\sA-Za-z\d])\1*")


def count_tokens(text: str) -> int:
    """Approximate token count of ``text`` (deterministic; see ``_TOKEN_RE``). Used for training and evaluation."""
    return sum(1 for _ in _TOKEN_RE.finditer(text))


def bucket_of(tokens: float, edges: Sequence[int] = BUCKET_EDGES) -> int:
    """Index of the bucket holding ``tokens``; values past the last edge land in the last bucket."""
    n = len(edges) - 1
    for i in range(1, n):
        if tokens < edges[i]:
            return i - 1
    return n - 1


@dataclass(frozen=True, slots=True)
class LengthPrediction:
    """A predicted response-length distribution.

    ``probs[i]`` is the probability that the response has ``bucket_edges[i] <= tokens < bucket_edges[i+1]``
    tokens (the last bucket also holds everything longer). ``point`` is the median in tokens. ``max_tokens``: the
    most the engine generates (``capped``; None: no cap), the one bound ``expected_remaining``'s tail reads -- past
    the last edge the histogram cannot hold it.
    """

    bucket_edges: tuple[int, ...]
    probs: tuple[float, ...]
    point: float
    max_tokens: int | None = None

    def __post_init__(self) -> None:
        if len(self.probs) != len(self.bucket_edges) - 1:
            raise ValueError(
                f"probs has {len(self.probs)} entries; bucket_edges needs {len(self.bucket_edges) - 1}"
            )

    @staticmethod
    def from_probs(
        probs: Sequence[float], edges: Sequence[int] = BUCKET_EDGES, max_tokens: int | None = None
    ) -> LengthPrediction:
        """Build a prediction from (possibly unnormalised, non-negative) bucket weights; point = median."""
        # Negatives, clipped after summing, left probs summing past 1; an infinite weight gave NaN probs and a
        # silent 8192-token median (the last edge); a NaN one was refused as "a positive sum" needed.
        if not all(0.0 <= float(x) < math.inf for x in probs):
            raise ValueError(f"bucket weights must be finite and non-negative, got {list(probs)}")
        total = float(sum(probs))
        if not total > 0.0:
            raise ValueError("bucket probabilities must have a positive sum")
        p = tuple(float(x) / total for x in probs)
        pred = LengthPrediction(tuple(int(e) for e in edges), p, 0.0)
        return LengthPrediction(pred.bucket_edges, p, pred.quantile(0.5), max_tokens)

    def quantile(self, q: float) -> float:
        """Token count below which the response falls with probability ``q`` (log-linear inside a bucket; a
        one-token bucket, as ``capped`` makes at the cap, is its one length)."""
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"quantile q must be in [0, 1], got {q}")
        edges = self.bucket_edges
        last = max((i for i, p in enumerate(self.probs) if p > 0.0), default=-1)
        acc = 0.0
        for i, p in enumerate(self.probs):
            # (a float sum short of 1 ends in the last bucket with mass, not past the last edge)
            if p > 0.0 and (acc + p >= q or i == last):
                if edges[i + 1] - edges[i] <= 1:  # interpolated, [cap, cap + 1) guessed past max_tokens
                    return float(edges[i])
                lo, hi = max(edges[i], 1), edges[i + 1]
                frac = min(max((q - acc) / p, 0.0), 1.0)
                return math.exp(math.log(lo) + frac * (math.log(hi) - math.log(lo)))
            acc += p
        return float(edges[-1])

    @property
    def mean(self) -> float:
        """Mean tokens of this distribution (log-uniform inside a bucket, as ``quantile``): E[L], what
        ``expected_remaining`` gives before the first token. (Each bucket's log-midpoint, as it was taken, is its
        median, not its mean: 4096 for the last bucket against 4432, 4 for the first against 5.4.)"""
        return self.expected_remaining(0.0)

    def expected_remaining(self, generated: float) -> float:
        """Expected tokens still to come once ``generated`` have been: E[L - g | L > g], at least 1 (the response
        is still running). A guess that ran out is renewed from this rather than read as "about to finish": a
        request past its median is, given the distribution, a long one (log-uniform inside a bucket, as
        ``quantile``).

        Tail rule: where the histogram no longer resolves the rest -- inside the open last bucket, whose upper edge
        is only there to keep quantiles finite, or past every bucket with mass -- the rest is at least that of one
        more octave bucket from ``g`` (log-uniform on [g, 2g): ``OCTAVE_REST * g``, 0.44 g), so it grows with ``g``
        and a 9000-token response is not read as ending at once; never past ``max_tokens`` where ``capped`` set
        it. ``quantile``, ``mass_above`` and ``mean`` keep the histogram's law (nothing past the last edge): the
        tail is only what the renewal of a response that outran it reads."""
        e = self.bucket_edges
        mass = tokens = 0.0  # P(L > g) and E[L; L > g]
        for i, p in enumerate(self.probs):
            lo, hi = max(e[i], 1), e[i + 1]
            if p <= 0.0 or hi <= generated:
                continue
            a, width = max(lo, generated), math.log(hi) - math.log(lo)
            mass += p * (math.log(hi) - math.log(a)) / width
            tokens += p * (hi - a) / width  # log-uniform density p / (x * width) times x, integrated over [a, hi]
        rest = tokens / mass - generated if mass > 0.0 else 0.0
        # The log-uniform shape runs its rest down to 0 at the bucket's upper edge: true of a closed bucket (the
        # lengths seen end there), an artifact of the open last one (at 8191 tokens: 1 more; at 4096 its rest is
        # the octave's, where the floor takes over, so the rule is continuous there).
        # The cap is the field, not the histogram: past the last edge (8192) ``capped`` leaves the buckets as they
        # are. Below it the last bucket is the cap's one-token one, where g >= cap makes the floor <= 0: no-op.
        cap = math.inf if self.max_tokens is None else self.max_tokens
        if mass == 0.0 or generated >= max(e[-2], 1):
            rest = max(rest, min(OCTAVE_REST * generated, cap - generated))
        return max(rest, 1.0)

    def mass_above(self, tokens: float) -> list[float]:
        """Each bucket's probability of a response longer than ``tokens`` (log-linear inside the bucket that
        holds ``tokens``; the buckets above it whole, the ones below 0)."""
        e = self.bucket_edges
        out = []
        for i, p in enumerate(self.probs):
            lo, hi = max(e[i], 1), e[i + 1]
            if tokens >= hi:
                out.append(0.0)
            elif tokens > lo:
                out.append(p * (math.log(hi) - math.log(tokens)) / (math.log(hi) - math.log(lo)))
            else:
                out.append(p)
        return out

    def prob_longer_than(self, tokens: float) -> float:
        """P(response > ``tokens``), interpolated log-linearly inside the bucket that holds ``tokens``."""
        return min(1.0, max(0.0, sum(self.mass_above(tokens))))

    def capped(self, max_tokens: int) -> LengthPrediction:
        """The length the engine will generate, min(response, ``max_tokens``): the mass past the cap lands in a
        one-token bucket ``[max_tokens, max_tokens + 1)`` (the bucket holding the cap keeps its share below it).
        Past the last edge the buckets are unchanged (that bucket already stands for "longer") and only
        ``max_tokens`` records the cap, for ``expected_remaining``'s tail."""
        if max_tokens < 1:  # (0 left a [0, 1) bucket whose log-width, 0, ``expected_remaining`` divided by)
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        e = self.bucket_edges
        if self.max_tokens is not None and max_tokens >= self.max_tokens:
            return self  # capped already, at or under it
        if max_tokens >= e[-1]:
            return LengthPrediction(e, self.probs, self.point, max_tokens)
        k = bucket_of(max_tokens, e)
        above = self.mass_above(max_tokens)
        edges = [*e[: k + 1], max_tokens, max_tokens + 1]
        probs = [*self.probs[:k], self.probs[k] - above[k], sum(above)]
        if max_tokens <= max(e[k], 1):  # the cap sits on the bucket's lower edge: nothing of it lies below
            del edges[k], probs[k]
        return LengthPrediction.from_probs(probs, edges, max_tokens)


def remaining_tokens(left: float, dist: LengthPrediction | None, generated: float) -> float:
    """Predicted output still to come of a request ``generated`` tokens into its response, ``left`` of its guess
    unspent: what routers and the migration policy read, live (``snapshot_from_stats``) and simulated
    (``EngineModel``) alike. A guess that ran out is renewed from its distribution where there is one; a point
    guess (a client's ``length_hint``, exact lengths) stays at 0 -- nothing says how far past it a response goes."""
    if left <= 0.0 and dist is not None:
        return dist.expected_remaining(generated)
    return max(left, 0.0)


@runtime_checkable
class LengthPredictor(Protocol):
    """Anything that turns a prompt (or just its length) into a ``LengthPrediction``.

    ``tenant`` names the serving app / generating model where known (e.g. the alpaca_eval generator, or the trace
    a request came from); predictors use it when they have seen it in training and ignore it otherwise.
    """

    name: str

    def predict(
        self, prompt: str | None, *, prompt_tokens: int, tenant: str | None = None
    ) -> LengthPrediction: ...

    def predict_batch(
        self,
        prompts: Sequence[str | None],
        prompt_tokens: Sequence[int],
        tenants: Sequence[str | None] | None = None,
    ) -> list[LengthPrediction]: ...

    def known_tenants(self) -> frozenset[str]:
        """The tenants it conditions on (its fit saw them); any other name predicts as no tenant."""
        ...


def predict_each(
    predictor: LengthPredictor,
    prompts: Sequence[str | None],
    prompt_tokens: Sequence[int],
    tenants: Sequence[str | None] | None = None,
) -> list[LengthPrediction]:
    """``predict_batch`` for predictors with no batched path: ``predict`` over aligned sequences."""
    ts = tenants if tenants is not None else [None] * len(prompts)
    return [predictor.predict(p, prompt_tokens=n, tenant=t) for p, n, t in zip(prompts, prompt_tokens, ts, strict=True)]
