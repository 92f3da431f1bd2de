"""Training pipeline for the shipped artifacts (``llmsched predict train``).

Sources are balanced by sample weight ``n_source ** (balance - 1)`` (balance=0.5: a source's total weight grows
with sqrt of its size, so the 29k alpaca_eval rows do not drown LIMA's 1k). Tenants are dropped for
``tenant_dropout`` of the training rows so the tenant-free path (unknown model) is learned too. Every source is
split by prompt (``data.split``) and scored on its held-out part.
"""

from __future__ import annotations

import collections
import gzip
import hashlib
import json
import random
import time
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from scheduler.predict.base import BUCKET_EDGES, bucket_of, count_tokens
from scheduler.predict.data import Record, load_mtbench, load_text_sources, load_trace_pairs, text_split
from scheduler.predict.metrics import ConstantPredictor, evaluate
from scheduler.predict.registry import LogLinearPool

# Sources vendored (held-out rows only) into the package for tests: permissively licensed ones.
VENDORED_SOURCES = {
    "gpteacher_roleplay": 50,
    "gpteacher_codegen": 50,
    "gpteacher_toolformer": 50,
    "vicuna_bench": 50,
}


def source_family(source: str) -> str:
    """Balancing unit: gpteacher's three subsets are one source."""
    return "gpteacher" if source.startswith("gpteacher") else source


def sample_weights(records: Sequence[Record], balance: float = 0.5) -> list[float]:
    """Per-record weights so that source s totals ``n_s ** balance``."""
    cnt = collections.Counter(source_family(r.source) for r in records)
    return [cnt[source_family(r.source)] ** (balance - 1.0) for r in records]


def dropped_tenants(records: Sequence[Record], dropout: float, seed: int = 0) -> list[str | None]:
    rng = random.Random(seed)
    return [r.tenant if rng.random() >= dropout else None for r in records]


def marginal(
    records: Sequence[Record], weights: Sequence[float], edges: Sequence[int] = BUCKET_EDGES
) -> list[float]:
    p = np.zeros(len(edges) - 1)
    for r, w in zip(records, weights):
        p[bucket_of(r.output_tokens, edges)] += w
    return (p / p.sum()).tolist()


def per_source(predictor: Any, records: Sequence[Record], *, use_tenant: bool = True) -> dict[str, dict]:
    """``evaluate`` per source plus an "all" row."""
    by: dict[str, list[Record]] = collections.defaultdict(list)
    for r in records:
        by[r.source].append(r)
    out = {s: evaluate(predictor, rs, use_tenant=use_tenant) for s, rs in sorted(by.items())}
    out["all"] = evaluate(predictor, records, use_tenant=use_tenant)
    return out


def embed_prompts(prompts: Sequence[str], cache: Path | None) -> np.ndarray:
    """Embeddings for ``prompts``, reusing/extending an optional .npz cache keyed by sha1 of the prompt text."""
    from scheduler.predict.embedding import Embedder

    def key(text: str) -> str:
        return hashlib.sha1(text.encode("utf-8")).hexdigest()

    known: dict[str, np.ndarray] = {}
    if cache is not None and cache.exists():
        with np.load(cache, allow_pickle=False) as z:
            known = dict(zip((str(k) for k in z["keys"]), z["emb"]))
    missing = sorted({p for p in prompts if key(p) not in known}, key=len)
    if missing:
        for t, e in zip(missing, Embedder(threads=None).encode(missing)):
            known[key(t)] = e
        if cache is not None:
            keys = sorted(known)
            np.savez(cache, keys=np.array(keys), emb=np.stack([known[k] for k in keys]))
    return np.stack([known[key(p)] for p in prompts])


def write_vendored_sample(test: Sequence[Record], path: Path, raw: dict[str, list[str]]) -> int:
    """Vendor a small held-out sample (prompt + response text) for the package's tests."""
    by: dict[str, list[Record]] = collections.defaultdict(list)
    for r in test:
        if r.source in VENDORED_SOURCES:
            by[r.source].append(r)
    rows = []
    for s, n in VENDORED_SOURCES.items():
        pick = sorted(by[s], key=lambda r: (zlib.crc32((r.prompt or "").encode()), r.tenant or ""))[:n]
        for r in pick:
            # Two vicuna-13b builds share a tenant: take the response whose length is this record's label.
            cands = raw[(r.prompt or "") + "\x00" + (r.tenant or "")]
            resp = next((c for c in cands if count_tokens(c) == r.output_tokens), None)
            if resp is None:
                raise ValueError(f"vendored sample: no raw response matches {s} row {r.prompt[:40]!r}")
            cands.remove(resp)
            rows.append({"prompt": r.prompt, "response": resp, "tenant": r.tenant, "source": s})
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return len(rows)


def _raw_responses(data_dir: Path) -> dict[str, list[str]]:
    """(prompt, tenant) -> response texts for the vendored sources (gpteacher, vicuna bench); a list, since
    vicuna-13b:20230322-clean-lang and vicuna-13b:20230322-new-hp-fp16 both map to tenant "vicuna-13b"."""
    from scheduler.predict.data import _join, _jsonl, tenant_name

    raw: dict[str, list[str]] = collections.defaultdict(list)
    for r in _jsonl(data_dir / "gpteacher_gpt4_roleplay_codegen_toolformer.jsonl.gz"):
        raw[_join(r["instruction"], r.get("input")) + "\x00gpteacher-gpt4"].append(r["response"])
    for r in _jsonl(data_dir / "fastchat_vicuna_bench_answers_7models.jsonl.gz"):
        raw[r["question"] + "\x00" + tenant_name(r["model"])].append(r["answer"])
    return raw


def _both(predictor: Any, records: Sequence[Record]) -> dict[str, dict]:
    return {
        "with_tenant": per_source(predictor, records),
        "without_tenant": per_source(predictor, records, use_tenant=False),
    }


def _train_embedding(
    train: Sequence[Record],
    test: Sequence[Record],
    w: Sequence[float],
    tenants: Sequence[str | None],
    out: Path,
    cache: Path | None,
    ngram: Any,
    log: Any,
) -> dict[str, Any]:
    """Fit + save the embedding head; report it and (when ``ngram`` is given) the ensemble."""
    from scheduler.predict.embedding import fit_embedding

    t = time.perf_counter()
    emb_train = embed_prompts([r.prompt or "" for r in train], cache)
    log(f"embedding: encoded train prompts in {time.perf_counter() - t:.1f}s")
    em = fit_embedding(
        emb_train,
        [r.prompt_tokens for r in train],
        [r.output_tokens for r in train],
        tenants,
        weights=np.asarray(w) * len(w),
    )
    em.meta["train_s"] = time.perf_counter() - t
    em.save(out / "embedding_head.npz")
    log(f"embedding: trained in {em.meta['train_s']:.1f}s")
    # NOTE(predict): metrics reuse cached embeddings; latency is then re-timed with the real encoder.
    prompts = [r.prompt or "" for r in test]
    em.embedder.memo = dict(zip(prompts, embed_prompts(prompts, cache)))
    res = {"embedding": {"train_s": em.meta["train_s"], **_both(em, test)}}
    if ngram is not None:
        res["ensemble"] = {"train_s": 0.0, **_both(LogLinearPool([ngram, em], (0.5, 0.5)), test)}
    em.embedder.memo = None
    lat = evaluate(em, test[:: max(len(test) // 100, 1)], latency_sample=100)
    for pred in res.values():
        for mode in ("with_tenant", "without_tenant"):
            for m in pred[mode].values():
                m["latency_ms_p50"], m["latency_ms_p99"] = lat["latency_ms_p50"], lat["latency_ms_p99"]
    return res


def train_all(
    data_dir: str | Path,
    out_dir: str | Path,
    *,
    which: Sequence[str] = ("ngram", "trace", "embedding"),
    balance: float = 0.5,
    tenant_dropout: float = 0.3,
    l2: float = 3e-5,
    dim: int = 1 << 15,
    embed_cache: str | Path | None = None,
    log: Any = print,
) -> dict[str, Any]:
    """Train the requested predictors, write artifacts to ``out_dir``, return the held-out metrics report."""
    d, out = Path(data_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"data_dir": str(d), "bucket_edges": list(BUCKET_EDGES), "predictors": {}}
    t0 = time.perf_counter()
    ngram = None
    if {"ngram", "embedding"} & set(which):
        recs = load_text_sources(d)
        train, test = text_split(recs, load_mtbench(d))
        w = sample_weights(train, balance)
        tenants = dropped_tenants(train, tenant_dropout)
        report["split"] = {
            "train": len(train),
            "test": len(test),
            "test_by_source": dict(collections.Counter(r.source for r in test)),
        }
        base = ConstantPredictor(marginal(train, w), BUCKET_EDGES)
        report["predictors"]["constant"] = {"training_marginal": per_source(base, test)}
        log(f"loaded {len(recs)} text records in {time.perf_counter() - t0:.1f}s")
    if "ngram" in which:
        from scheduler.predict.ngram import NgramPredictor, fit_ngram

        t = time.perf_counter()
        m = fit_ngram(
            [r.prompt or "" for r in train],
            [r.prompt_tokens for r in train],
            [r.output_tokens for r in train],
            tenants=tenants,
            weights=w,
            dim=dim,
            l2=l2,
        )
        m.meta.update(
            {"balance": balance, "tenant_dropout": tenant_dropout, "train_s": time.perf_counter() - t}
        )
        m.save(out / "ngram.npz")
        # Scored (and pooled in the ensemble) as shipped: the file holds float16 weights, the fit float32 ones.
        ngram = NgramPredictor.load(out / "ngram.npz")
        report["predictors"]["ngram"] = {"train_s": m.meta["train_s"], **_both(ngram, test)}
        n = write_vendored_sample(test, out / "heldout_sample.jsonl.gz", _raw_responses(d))
        log(f"ngram: trained in {m.meta['train_s']:.1f}s; vendored {n} held-out rows")
    if "trace" in which:
        from scheduler.predict.trace import fit_trace, split_pairs

        t = time.perf_counter()
        tr_train, tr_test = split_pairs(load_trace_pairs(d))
        tm = fit_trace(tr_train, pool=("azure_conv", "mooncake_conv"))
        tm.save(out / "trace.json")
        rows = [Record(None, i, o, name, name) for name, pairs in tr_test.items() for i, o in pairs]
        report["predictors"]["trace"] = {"train_s": time.perf_counter() - t, **_both(tm, rows)}
        log(f"trace: fitted in {time.perf_counter() - t:.1f}s")
    if "embedding" in which:
        cache = Path(embed_cache) if embed_cache else None
        report["predictors"].update(_train_embedding(train, test, w, tenants, out, cache, ngram, log))
    report["total_s"] = time.perf_counter() - t0
    return report
