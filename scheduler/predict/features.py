"""Hashed n-gram features of a prompt, numpy only (no sklearn at inference).

Features: lower-cased word unigrams and bigrams, the first three words by position (the instruction's verb
matters: "List", "Write an essay", "Translate"), "<number> <unit>" pairs by log2 magnitude ("in 500 words"), and a
one-hot log2 prompt-length bucket. Each is hashed (crc32, stable across processes, unlike ``hash()``) into
``dim`` slots with a sign bit to cancel collision bias, and the vector is scaled to unit L2 norm.
"""

from __future__ import annotations

import math
import re
import zlib
from functools import lru_cache
from itertools import pairwise

import numpy as np

_WORD_RE = re.compile(r"[a-z0-9]+(?:'[a-z]+)?|[^\sa-z0-9]")
# NOTE(predict): long prompts are cut to head + tail; the instruction usually sits at one end, and it bounds
# featurisation cost (~0.3 ms for the cap).
_HEAD, _TAIL = 384, 64
_UNITS = frozenset(
    {
        "words",
        "word",
        "sentences",
        "sentence",
        "paragraphs",
        "paragraph",
        "lines",
        "line",
        "items",
        "points",
        "examples",
        "tokens",
        "characters",
        "bullet",
        "steps",
        "tips",
        "ideas",
        "questions",
        "names",
        "reasons",
        "ways",
    }
)


@lru_cache(maxsize=1 << 16)
def _slot(feature: str, dim: int) -> int:
    """Signed slot: ``+(i+1)`` or ``-(i+1)``."""
    h = zlib.crc32(feature.encode("utf-8"))
    i = (h >> 1) % dim
    return i + 1 if h & 1 else -(i + 1)


# Characters of text scanned at each end of a long prompt: enough for _HEAD / _TAIL words of up to 32 chars.
_HEAD_CHARS, _TAIL_CHARS = _HEAD * 32, _TAIL * 32


def feature_names(prompt: str, prompt_tokens: int) -> list[str]:
    """The (unhashed) feature strings of one prompt; exposed for tests and debugging."""
    if len(prompt) > _HEAD_CHARS + _TAIL_CHARS:
        # Scan only the two ends the features keep: lower() + findall over a 500 KB prompt took ~48 ms inline
        # on the ingress's event loop. The cut middle yields no feature (only head + tail words are kept).
        head = _WORD_RE.findall(prompt[:_HEAD_CHARS].lower())[:_HEAD]
        tail = _WORD_RE.findall(prompt[-_TAIL_CHARS:].lower())[-_TAIL:]
        words = head + tail
    else:
        words = _WORD_RE.findall(prompt.lower())
    if len(words) > _HEAD + _TAIL:
        words = words[:_HEAD] + words[-_TAIL:]
    feats = [f"u:{w}" for w in words]
    feats += [f"b:{a} {b}" for a, b in pairwise(words)]
    feats += [f"p{i}:{w}" for i, w in enumerate(words[:3])]
    for a, b in pairwise(words):
        # isdecimal, not isdigit: "²", "①" are digits that int() rejects (ValueError on "x² points")
        if a.isdecimal() and b in _UNITS:
            feats.append(f"n:{int(math.log2(int(a[:9]) + 1))}:{b}")
    feats.append(f"len:{int(math.log2(prompt_tokens + 1))}")
    return feats


def featurize(prompt: str, prompt_tokens: int, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Sparse hashed features of one prompt as (indices, values), unit L2 norm, duplicates summed."""
    acc: dict[int, float] = {}
    for f in feature_names(prompt, prompt_tokens):
        s = _slot(f, dim)
        i = abs(s) - 1
        acc[i] = acc.get(i, 0.0) + (1.0 if s > 0 else -1.0)
    idx = np.fromiter(acc.keys(), dtype=np.int64, count=len(acc))
    val = np.fromiter(acc.values(), dtype=np.float64, count=len(acc))
    norm = float(np.sqrt(val @ val))
    return idx, (val / norm if norm > 0 else val)


def featurize_many(prompts: list[str], prompt_tokens: list[int], dim: int):  # -> scipy.sparse.csr_matrix
    """Stack ``featurize`` rows into a CSR matrix (training only; needs scipy)."""
    from scipy import sparse

    indptr, indices, values = [0], [], []
    for p, t in zip(prompts, prompt_tokens):
        i, v = featurize(p, t, dim)
        indices.append(i)
        values.append(v)
        indptr.append(indptr[-1] + len(i))
    return sparse.csr_matrix(
        (np.concatenate(values), np.concatenate(indices), np.asarray(indptr)), shape=(len(prompts), dim)
    )
