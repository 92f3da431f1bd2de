"""Predictor A, "ngram": hashed n-grams + a multinomial logistic head over length buckets.

Inference is numpy only: a sparse dot product and a softmax (well under 1 ms per request). Training
(``fit_ngram``) uses scipy's L-BFGS on the weighted cross-entropy with L2 regularisation. An optional per-tenant
bias vector (one logit offset per bucket) models who generates the answer (alpaca_eval generators differ by ~4x in
median length); unknown tenants get no offset.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from scheduler.predict.base import BUCKET_EDGES, LengthPrediction, bucket_of, predict_each
from scheduler.predict.features import featurize


@dataclass
class NgramPredictor:
    """Hashed n-gram multinomial predictor. ``weights`` is (buckets, dim); ``tenant_bias`` maps tenant -> (buckets,)."""

    weights: np.ndarray
    bias: np.ndarray
    tenant_bias: dict[str, np.ndarray] = field(default_factory=dict)
    edges: tuple[int, ...] = BUCKET_EDGES
    meta: dict = field(default_factory=dict)
    name: str = "ngram"

    @property
    def dim(self) -> int:
        return int(self.weights.shape[1])

    def probs(self, prompt: str | None, prompt_tokens: int, tenant: str | None = None) -> np.ndarray:
        """Bucket probabilities as an array (the hot path; ``predict`` wraps it)."""
        idx, val = featurize(prompt or "", max(int(prompt_tokens), 0), self.dim)
        z = self.weights[:, idx] @ val + self.bias
        if tenant is not None and tenant in self.tenant_bias:
            z = z + self.tenant_bias[tenant]
        z = np.exp(z - z.max())
        return z / z.sum()

    def known_tenants(self) -> frozenset[str]:
        """The tenants it learned a bias for."""
        return frozenset(self.tenant_bias)

    def predict(
        self, prompt: str | None, *, prompt_tokens: int, tenant: str | None = None
    ) -> LengthPrediction:
        """Predict the response-length distribution. ``prompt=None`` uses the prompt length only."""
        return LengthPrediction.from_probs(self.probs(prompt, prompt_tokens, tenant).tolist(), self.edges)

    def predict_batch(
        self,
        prompts: Sequence[str | None],
        prompt_tokens: Sequence[int],
        tenants: Sequence[str | None] | None = None,
    ) -> list[LengthPrediction]:
        """``predict`` over aligned sequences."""
        return predict_each(self, prompts, prompt_tokens, tenants)

    # -- persistence ---------------------------------------------------------------------------------------------

    def save(self, path: str | Path) -> None:
        """Write one compressed .npz (float16 weights; no pickles)."""
        names = sorted(self.tenant_bias)
        tb = np.stack([self.tenant_bias[n] for n in names]) if names else np.zeros((0, len(self.bias)))
        np.savez_compressed(
            path,
            weights=self.weights.astype(np.float16),
            bias=self.bias.astype(np.float32),
            tenant_names=np.array(names, dtype=str),
            tenant_bias=tb.astype(np.float32),
            edges=np.array(self.edges, dtype=np.int64),
            meta=np.array(json.dumps(self.meta)),
        )

    @classmethod
    def load(cls, path: str | Path) -> NgramPredictor:
        """Load a file written by ``save``."""
        with np.load(path, allow_pickle=False) as z:
            names = [str(n) for n in z["tenant_names"]]
            tb = z["tenant_bias"]
            return cls(
                weights=z["weights"].astype(np.float32),
                bias=z["bias"].astype(np.float64),
                tenant_bias={n: tb[i].astype(np.float64) for i, n in enumerate(names)},
                edges=tuple(int(e) for e in z["edges"]),
                meta=json.loads(str(z["meta"])),
            )


def soft_targets(tokens: Sequence[int], edges: Sequence[int], smooth: float) -> np.ndarray:
    """One-hot bucket targets with ``smooth`` mass spread to the two neighbours (ordinal-aware label smoothing)."""
    k = len(edges) - 1
    y = np.zeros((len(tokens), k))
    for r, t in enumerate(tokens):
        b = bucket_of(t, edges)
        nbrs = [j for j in (b - 1, b + 1) if 0 <= j < k]
        y[r, b] = 1.0 - smooth
        for j in nbrs:
            y[r, j] += smooth / len(nbrs)
    return y


def fit_ngram(
    prompts: Sequence[str],
    prompt_tokens: Sequence[int],
    output_tokens: Sequence[int],
    *,
    tenants: Sequence[str | None] | None = None,
    weights: Sequence[float] | None = None,
    dim: int = 1 << 15,
    l2: float = 1e-4,
    l2_tenant: float = 1e-3,
    smooth: float = 0.1,
    edges: Sequence[int] = BUCKET_EDGES,
    max_iter: int = 300,
) -> NgramPredictor:
    """Fit the hashed n-gram multinomial head (needs scipy).

    Args:
        weights: per-record sample weights (default 1); training balances sources through these.
        l2: L2 strength on the n-gram weights, relative to the total sample weight.
        smooth: ordinal label smoothing (see ``soft_targets``).
    """
    from scipy.optimize import minimize

    from scheduler.predict.features import featurize_many

    n, k = len(prompts), len(edges) - 1
    x = featurize_many(list(prompts), list(prompt_tokens), dim)
    y = soft_targets(output_tokens, edges, smooth)
    w = np.ones(n) if weights is None else np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    names = sorted({t for t in (tenants or []) if t is not None})
    tid = np.array([names.index(t) if t is not None else -1 for t in (tenants or [None] * n)])
    has_t = tid >= 0
    nt = len(names)

    def unpack(theta: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        wm = theta[: k * dim].reshape(k, dim)
        b = theta[k * dim : k * dim + k]
        tb = theta[k * dim + k :].reshape(nt, k)
        return wm, b, tb

    def loss_grad(theta: np.ndarray) -> tuple[float, np.ndarray]:
        wm, b, tb = unpack(theta)
        z = np.asarray(x @ wm.T) + b
        z[has_t] += tb[tid[has_t]]
        z -= z.max(axis=1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        loss = -float((w[:, None] * y * logp).sum()) + 0.5 * l2 * float((wm * wm).sum())
        loss += 0.5 * l2_tenant * float((tb * tb).sum())
        g = (np.exp(logp) - y) * w[:, None]
        gw = np.asarray((x.T @ g).T) + l2 * wm
        gt = np.zeros((nt, k))
        np.add.at(gt, tid[has_t], g[has_t])
        gt += l2_tenant * tb
        return loss, np.concatenate([gw.ravel(), g.sum(axis=0), gt.ravel()])

    theta0 = np.zeros(k * dim + k + nt * k)
    prior = y.T @ w
    theta0[k * dim : k * dim + k] = np.log(np.maximum(prior, 1e-6))
    res = minimize(loss_grad, theta0, jac=True, method="L-BFGS-B", options={"maxiter": max_iter})
    wm, b, tb = unpack(res.x)
    meta = {
        "dim": dim,
        "l2": l2,
        "l2_tenant": l2_tenant,
        "smooth": smooth,
        "n_train": n,
        "iterations": int(res.nit),
        "final_loss": float(res.fun),
        "log_loss_prior": _entropy(prior),
    }
    return NgramPredictor(
        wm.astype(np.float32), b, {t: tb[i] for i, t in enumerate(names)}, tuple(edges), meta
    )


def _entropy(p: np.ndarray) -> float:
    return -sum(float(x) * math.log(float(x)) for x in p if x > 0)
