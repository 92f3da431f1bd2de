"""Response-length predictors and their use by routers: an audit's findings (thirty-fifth session); each test
failed before its fix."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from scheduler.predict.base import LengthPrediction, bucket_of
from scheduler.predict.data import Record
from scheduler.predict.metrics import evaluate
from scheduler.predict.trace import fit_trace, split_pairs
from sim.traces.bundled import load_bundled


@pytest.fixture(scope="module")
def bundled_pairs() -> dict[str, list[tuple[int, int]]]:
    """(input, output) tokens of the two real trace slices shipped in sim/data, the trace name as the tenant."""
    out = {}
    for tenant, name in (("azure_conv", "azure_llm_2023_conv"), ("mooncake_conv", "mooncake_conversation")):
        t = load_bundled(name)
        out[tenant] = list(zip(t.prompt_tokens.tolist(), t.output_tokens.tolist(), strict=True))
    return out


def test_an_unknown_tenant_gets_the_tenants_pooled_histogram(bundled_pairs):
    """Without a tenant (or with one the fit never saw) the prediction is the fitted distribution for that input
    length with the tenants pooled, each weighing as its requests: unsmoothed, the histogram of the pooled rows.
    It weighed each tenant by P(input | tenant) alone (a uniform prior over tenants), so the 1000-row Mooncake
    slice counted ~3x per request against the 2867-row Azure one where both have prompts (724-4096 tokens)."""
    tiny = 1e-9  # no smoothing: the conditionals are the raw histograms
    tm = fit_trace(bundled_pairs, alpha=tiny)
    pooled = fit_trace({"all": [r for rows in bundled_pairs.values() for r in rows]}, alpha=tiny)
    both = 0
    for n in (100, 800, 1100, 1500, 2100, 3000, 4100, 6000, 20000):
        i = bucket_of(n, tm.input_edges)
        seen = [
            sum(1 for a, _ in rows if bucket_of(a, tm.input_edges) == i) for rows in bundled_pairs.values()
        ]
        both += min(seen) > 0
        for tenant in (None, "an-app-never-fitted"):
            assert tm.probs(n, tenant) == pytest.approx(pooled.probs(n, "all"), abs=2e-3), (n, tenant, seen)
    assert both >= 4  # input lengths where the two tenants mix, not just one tenant's rows


def test_a_few_request_tenant_in_a_log_does_not_steer_the_tenant_free_guess(bundled_pairs):
    """`llmsched predict fit-trace` on a log of one app's 2867 requests and 30 of another's, scored without a
    tenant (a deployment that names none) on the main app's held-out rows: as good as with the tenant. The 30
    long-prompt requests weighed as much as the 2867 and took bucket accuracy 0.733 -> 0.659, MAE 70 -> 90."""
    log = {"azure_conv": bundled_pairs["azure_conv"], "mooncake_conv": bundled_pairs["mooncake_conv"][:30]}
    train, test = split_pairs(log)
    tm = fit_trace(train)
    rows = [Record(None, a, b, "azure_conv") for a, b in test["azure_conv"]]
    named = evaluate(tm, rows, latency_sample=1)
    free = evaluate(tm, rows, use_tenant=False, latency_sample=1)
    assert free["bucket_accuracy"] >= named["bucket_accuracy"] - 0.01, (free, named)
    assert free["mae_tokens"] <= named["mae_tokens"] + 2.0, (free, named)
    assert free["kendall_tau"] >= named["kendall_tau"] - 0.01, (free, named)


@pytest.mark.parametrize(
    ("name", "fname", "content"),
    [
        ("trace", "trace.json", b'{"tenants": '),  # truncated
        ("trace", "trace.json", None),  # a pool tenant without histograms: KeyError 'gone' at every request
        ("ngram", "ngram.npz", b"not a zip"),
        ("ngram", "ngram.npz", b"PK\x03\x04 truncated"),
    ],
)
def test_an_unreadable_artifact_is_refused_at_load_naming_the_file_and_the_field(
    tmp_path, name, fname, content
):
    """A truncated or hand-edited artifact was refused in its parser's words ("Expecting value: line 1 column 14
    (char 13)", a numpy pickle notice), naming neither the file nor the config field; a trace.json whose pool
    named a tenant without histograms loaded, then raised KeyError on every request (the ingress logs it and
    drops that request's guess)."""
    from types import SimpleNamespace

    from scheduler.predict.registry import ARTIFACTS
    from scheduler.predict.serving import serving_predictor

    path = tmp_path / fname
    if content is None:
        doc = json.loads((ARTIFACTS / "trace.json").read_text())
        doc["pool"] = [*doc["pool"], "gone"]
        path.write_text(json.dumps(doc))
    else:
        path.write_bytes(content)
    spec = SimpleNamespace(name=name, params={"artifacts": str(tmp_path)})
    with pytest.raises(ValueError, match=rf"^policies\.predictor\.params\.artifacts: .*{fname}") as e:
        serving_predictor(spec).predict_dist(None, 1500)
    assert str(path) in str(e.value)


@pytest.mark.parametrize("bad", [math.inf, math.nan])
def test_a_non_finite_bucket_weight_is_refused_naming_it(bad):
    """An infinite weight was accepted: probs (nan, 0, ...) and a median of 8192 tokens (the last edge), the
    longest guess there is, handed to the routers; a NaN one was refused as needing "a positive sum"."""
    with pytest.raises(ValueError, match="finite and non-negative"):
        LengthPrediction.from_probs([bad, 1.0, 0, 0, 0, 0, 0, 0, 0])


def test_the_trace_predictor_learns_online_from_text_requests_too():
    """``{name: trace, params: {online: true}}`` behind clients that send text (an OpenAI-style prompt): the trace
    predictor reads the prompt's length alone, yet only requests sent as token ids were adjusted, so 30 finished
    20-token answers left the guess for the next such prompt where it was (167 tokens), while the simulator's
    replays (token counts, no text) did learn. Each request is also booked at the length its own prediction
    read: a text prompt's ``count_tokens``, not the ingress tokenizer's count (the byte tokenizer's ~4.5x put the
    history some four input buckets away from where text prompts are predicted). With ``default`` the text goes
    to the ngram, whose guess is its prompt's own (not adjusted): its history serves token-id requests, and is
    booked at their length, the tokenizer's count."""
    import asyncio

    from scheduler.config.models import PolicySpec
    from scheduler.control.api import GenerateRequest
    from scheduler.engine.base import SamplingParams
    from scheduler.predict.serving import serving_predictor
    from tests.test_ingress_audit import FakeInstance, _consume, _ingress

    prompt = "Summarise the following meeting notes for the team in a short paragraph. " * 10

    async def scenario(name: str):
        ing = _ingress([FakeInstance("mixed-0")])
        ing.predictor = serving_predictor(PolicySpec(name=name, params={"online": True}))
        ids = len(ing.tokenizer.encode(prompt, True))
        before = ing.predictor.predict_dist(prompt, ids).point, ing.predictor.predict_dist(None, ids).point

        async def one(rid: str) -> None:
            out: list = []
            sp = SamplingParams(max_tokens=20, ignore_eos=True)  # a 20-token answer, its own length
            await _consume(ing, GenerateRequest(rid, prompt=prompt, sampling=sp), out)
            assert out[-1].finish_reason == "length"

        await asyncio.gather(*(one(f"r{k}") for k in range(30)))
        p = ing.predictor
        assert p.online.observed == 30
        return before, (p.predict_dist(prompt, ids).point, p.predict_dist(None, ids).point)

    (text0, _), (text1, _) = asyncio.run(scenario("trace"))
    assert text1 < 32 < text0  # the 20-token answers learned
    (text0, ids0), (text1, ids1) = asyncio.run(scenario("default"))
    assert text1 == text0 and ids1 < 32 < ids0


def test_the_mean_is_the_distributions_mean():
    """``LengthPrediction.mean`` is E[L] of the distribution ``quantile`` draws from (integrated over its quantile
    function). It took each bucket's log-midpoint, the bucket's median: 2-35% short of its mean per bucket (4096
    for the last against 4432)."""
    u = (np.arange(20_000) + 0.5) / 20_000
    for probs in ([0, 0, 0, 0, 0, 0, 0, 0, 1.0], [1.0, 0, 0, 0, 0, 0, 0, 0, 0], [3, 1, 4, 1, 5, 9, 2, 6, 5]):
        d = LengthPrediction.from_probs(probs)
        assert d.mean == pytest.approx(np.mean([d.quantile(q) for q in u]), rel=1e-3), probs


def test_a_long_text_prompt_is_predicted_off_the_event_loop():
    """Predicting a text prompt counts its tokens (``count_tokens``) and, with the ngram, featurises it: for a
    500 KB prompt ~130 ms on this box, inline on the ingress's event loop, every other stream held meanwhile --
    the very stall the ingress avoids by tokenizing prompts past ``ENCODE_OFF_LOOP_CHARS`` in a thread. A long
    text is now predicted in a thread as a neural predictor is (a short one stays inline: the hop costs more)."""
    import asyncio
    import threading

    from scheduler.control.ingress import ENCODE_OFF_LOOP_CHARS
    from scheduler.control.registry import RequestRecord
    from scheduler.engine.base import SamplingParams
    from scheduler.predict import load_predictor
    from scheduler.predict.serving import ServingPredictor
    from tests.test_ingress_audit import FakeInstance, _ingress

    trace, release, threads = load_predictor("trace"), threading.Event(), []

    class Counting:  # stands for the real work on a long text: holds whichever thread it runs on
        name = "trace"

        def predict(self, prompt, *, prompt_tokens, tenant=None):
            threads.append(threading.current_thread())
            release.wait(2)
            return trace.predict(None, prompt_tokens=prompt_tokens)

    ing = _ingress([FakeInstance("mixed-0")])
    ing.predictor = ServingPredictor(Counting(), "trace")  # type: ignore[arg-type]
    long_text = "word " * (ENCODE_OFF_LOOP_CHARS // 5 + 1)

    async def scenario() -> None:
        rec = RequestRecord("long", tuple(range(1, 9)), SamplingParams(max_tokens=8))
        task = asyncio.create_task(ing._predict(rec, long_text))
        await asyncio.sleep(0.05)
        assert not task.done()  # the loop runs while it predicts
        release.set()
        await task
        assert rec.predicted_output_tokens is not None
        release.clear()
        short = RequestRecord("short", tuple(range(1, 9)), SamplingParams(max_tokens=8))
        release.set()
        await ing._predict(short, "a short prompt")
        assert threads[-1] is threading.main_thread()  # inline

    asyncio.run(scenario())
    assert threads[0] is not threading.main_thread()
