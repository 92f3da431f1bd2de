"""``policies.predictor.params.online``: the deployment's finished requests adjust length-only predictions
(``scheduler/predict/online.py``), fed the same way by the simulator and the live ingress."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest

from scheduler.config.load import ConfigError, load_config, parse_config
from scheduler.config.models import PolicySpec
from scheduler.control.api import GenerateRequest
from scheduler.engine.base import SamplingParams
from scheduler.predict import load_predictor
from scheduler.predict.base import LengthPrediction
from scheduler.predict.online import OnlineLengths, TenantLengths, TenantSketch
from scheduler.predict.serving import serving_predictor
from sim.commands import with_predictor
from sim.simulator import Simulator, Workload
from tests.test_ingress_audit import FakeInstance, _consume, _ingress
from tests.test_predict_serving import Recording

TRACE = load_predictor("trace")


def test_no_history_keeps_the_prediction_and_history_moves_only_its_input_bucket() -> None:
    online = OnlineLengths(strength=20.0)
    short, long_ = TRACE.predict(None, prompt_tokens=40), TRACE.predict(None, prompt_tokens=3000)
    assert online.adjust(short, 40) is short
    for _ in range(20):  # as many requests as the prior's pseudo-counts: half history, half shipped guess
        online.observe(40, 600)
    adjusted = online.adjust(short, 40)
    k = 6  # the 512-1024 bucket holds 600
    assert adjusted.probs[k] == pytest.approx(0.5 * short.probs[k] + 0.5)
    assert adjusted.point > 512 > short.point
    assert online.adjust(long_, 3000) is long_  # another input bucket: no history there
    assert online.observed == 20


def test_old_traffic_is_forgotten_past_memory() -> None:
    online = OnlineLengths(strength=1.0, memory=50.0)
    for _ in range(200):
        online.observe(100, 20)
    for _ in range(200):
        online.observe(100, 700)  # the mix shifted: 200 long answers after 200 short ones
    row = online.counts[np.nonzero(online.counts.sum(axis=1))[0][0]]
    assert row.sum() == pytest.approx(50.0)
    assert row[6] / row.sum() > 0.95  # the short answers have (almost) no vote left
    assert online.adjust(TRACE.predict(None, prompt_tokens=100), 100).point > 512


def test_online_must_be_a_boolean_naming_the_field() -> None:
    raw = load_config("tiny-cpu").model_dump(mode="json")
    with pytest.raises(ConfigError, match=r"policies.predictor.params.online: must be true, false or a mapping"):
        parse_config(
            {**raw, "policies": {"predictor": {"name": "trace", "params": {"online": "yes"}}}}, source="x"
        )
    assert serving_predictor(PolicySpec(name="trace", params={"online": True})).online is not None
    assert serving_predictor(PolicySpec(name="trace")).online is None


def _online_config(online: object) -> dict:
    raw = load_config("tiny-cpu").model_dump(mode="json")
    return {**raw, "policies": {"predictor": {"name": "trace", "params": {"online": online}}}}


@pytest.mark.parametrize(("online", "error"), [
    ({"max_tenants": -1}, r"params\.online\.max_tenants: Input should be greater than or equal to 0 \(got -1\)"),
    ({"max_tenants": 20_000}, r"params\.online\.max_tenants: Input should be less than or equal to 10000"),
    ({"max_tenants": "many"}, r"params\.online\.max_tenants: Input should be a valid integer"),
    ({"admit_after": 0}, r"params\.online\.admit_after: Input should be greater than or equal to 1"),
    ({"strength": 0}, r"params\.online\.strength: Input should be greater than 0"),
    ({"memory": -5.0}, r"params\.online\.memory: Input should be greater than 0"),
    ({"pinned": "chat"}, r"params\.online\.pinned: Input should be a valid list"),
    ({"pinned": [""]}, r"params\.online\.pinned: tenant names are 1\.\.128 characters"),
    ({"max_tenants": 0}, r"params\.online\.max_tenants: 0 leaves no tenant a history"),
    ({"max_tenant": 8}, r"params\.online\.max_tenant: unknown key; allowed: max_tenants, admit_after, pinned"),
])
def test_online_settings_are_checked_naming_the_field(online: dict, error: str) -> None:
    with pytest.raises(ConfigError, match=error):
        parse_config(_online_config(online), source="x")


def test_online_settings_size_the_tenant_histories() -> None:
    sp = serving_predictor(parse_config(_online_config(
        {"max_tenants": 3, "admit_after": 2, "pinned": ["chat", "chat", "search"], "strength": 5, "memory": 300}
    )).policies.predictor)
    tl = sp.online
    assert (tl.max_tenants, tl.admit_after, tl.pinned, tl.strength, tl.memory) == (3, 2, ("chat", "search"), 5.0,
                                                                                    300.0)
    assert tl._slots.shape[0] == 1 + 2 + 3 and tl.fresh().pinned == ("chat", "search")
    # ``true`` and an empty mapping are the defaults the recorded results ran with.
    for online in (True, {}):
        d = serving_predictor(parse_config(_online_config(online)).policies.predictor).online
        assert (d.max_tenants, d.admit_after, d.pinned, d.strength, d.memory) == (64, 8, (), 20.0, 1000.0)
    # Pinned only: no other tenant gets a history.
    only = TenantLengths(max_tenants=0, pinned=["chat"])
    for _ in range(50):
        only.observe(60, 20, tenant="other")
    only.observe(60, 20, tenant="chat")
    assert list(only.tenants) == [] and only.history("chat").counts.sum() == 1.0 and only.unadmitted == 50


def test_a_flood_of_made_up_tenants_does_not_evict_an_established_one() -> None:
    prior = TRACE.predict(None, prompt_tokens=60)
    tl = TenantLengths(max_tenants=8)
    for k in range(200):  # an established app (short answers) beside the rest of the traffic (long ones)
        tl.observe(60, 20, tenant="chat")
        tl.observe(60, 600, tenant=f"app{k % 7}")
    before = tl.adjust(prior, 60, "chat")
    assert before.point < 32
    rng = np.random.default_rng(0)
    names = [rng.bytes(12).hex() for _ in range(10_000)]
    for k, name in enumerate(names):  # 10k random names, most once, the last 1000 twice; none sends 8
        tl.observe(60, 600, tenant=name)
        if k >= 9000:
            tl.observe(60, 600, tenant=name)
    assert "chat" in tl.tenants and tl.adjust(prior, 60, "chat").point < 32
    assert tl.unadmitted == 11_000 and not set(names) & set(tl.tenants)
    # Memory stays bounded: the same tables as before the flood, whatever the number of names.
    assert tl._slots.shape[0] == 9 and len(tl._slot) == 8 and len(tl.sketch.table) == 4 * 4096
    # A real new app that keeps sending is admitted (replacing an idle tenant), and learns its own lengths.
    for _ in range(200):
        tl.observe(60, 20, tenant="chat")  # chat keeps sending: never the least recently observed
        tl.observe(60, 60, tenant="new")
    assert "new" in tl.tenants and "chat" in tl.tenants and 32 < tl.adjust(prior, 60, "new").point < 128
    # Pinned: never replaced, however many tenants come and go past it.
    pin = TenantLengths(max_tenants=1, admit_after=1, pinned=["chat"])
    pin.observe(60, 20, tenant="chat")
    for k in range(100):
        pin.observe(60, 600, tenant=f"t{k}")
    assert pin.history("chat").counts.sum() == 1.0 and "chat" not in pin.tenants and len(pin.tenants) == 1
    assert pin.adjust(prior, 60, "chat").probs != pin.adjust(prior, 60).probs  # its own history, not the shared


def test_the_tenant_sketch_counts_recent_requests_in_fixed_memory() -> None:
    sk = TenantSketch(width=64)
    assert [sk.add("a") for _ in range(5)] == [1, 2, 3, 4, 5] and sk.count("a") == 5 and sk.count("b") == 0
    for k in range(59):
        sk.add(f"x{k}")
    assert sk.count("a") == 2  # 64 names counted: every counter halved (5 -> 2)


def _two_class_workload(n: int = 400) -> Workload:
    """The Intelligent Router mix in miniature: long prompts answered briefly, short prompts answered at length
    (the shipped predictor guesses ~130 tokens for both)."""
    rng = np.random.default_rng(1)
    heavy = rng.random(n) < 0.5
    prompt = np.where(heavy, 2000, 60).astype(np.int64)
    output = np.where(heavy, rng.integers(20, 40, n), rng.integers(500, 800, n)).astype(np.int64)
    return Workload(np.sort(rng.uniform(0, 40, n)), prompt, output)


def test_the_simulator_predicts_each_arrival_from_the_requests_finished_before_it() -> None:
    w = _two_class_workload()
    cfg = with_predictor(load_config("default"), "trace", online=True)
    router = Recording()
    sim = Simulator(cfg, router=router)
    res = sim.run(w)
    seen = np.array([router.seen[str(i)] for i in range(len(w))])
    heavy = w.prompt_tokens == 2000
    shipped = {p: TRACE.predict(None, prompt_tokens=p).point for p in (60, 2000)}
    # Nothing finished yet: the shipped guess.
    assert seen[0] == pytest.approx(shipped[int(w.prompt_tokens[0])])
    late = np.arange(len(w)) >= len(w) // 2
    assert np.median(seen[late & heavy]) < 64 < shipped[2000]  # learned: brief answers (shipped: ~130)
    assert np.median(seen[late & ~heavy]) > 400 > shipped[60]  # learned: long answers
    assert res.workload.predicted_output == pytest.approx(seen)  # reported with the run
    # A second replay on the same simulator starts from the shipped guesses again (no history carried over).
    router2 = Recording()
    sim.router = router2
    sim.run(w)
    assert [router2.seen[str(i)] for i in range(len(w))] == pytest.approx(seen.tolist())
    # Without ``online`` every request gets the shipped guess.
    router3 = Recording()
    Simulator(with_predictor(cfg, "trace"), router=router3).run(w)
    assert {round(router3.seen[str(i)], 6) for i in range(len(w))} == {round(v, 6) for v in shipped.values()}


def test_the_live_ingress_learns_from_finished_requests_only() -> None:
    async def scenario() -> tuple:
        ing = _ingress([FakeInstance("mixed-0")])
        ing.predictor = serving_predictor(PolicySpec(name="trace", params={"online": True}))
        before = ing.predictor.predict_dist(None, 60).point

        async def one(rid: str) -> None:
            out: list = []
            await _consume(
                ing,
                GenerateRequest(  # ignore_eos: 20 tokens is the response's own length (a replay forcing it)
                    rid, prompt_token_ids=tuple(range(1, 61)), sampling=SamplingParams(max_tokens=20, ignore_eos=True)
                ),
                out,
            )
            assert out[-1].finish_reason == "length"

        await asyncio.gather(*(one(f"r{k}") for k in range(30)))
        # A cancelled request says nothing about its length.
        task = asyncio.create_task(
            _consume(
                ing,
                GenerateRequest(
                    "gone", prompt_token_ids=tuple(range(1, 61)), sampling=SamplingParams(max_tokens=700)
                ),
                [],
            )
        )
        await asyncio.sleep(0.1)
        assert await ing.cancel("gone")
        await asyncio.wait_for(task, 5)
        return ing.predictor, before

    predictor, before = asyncio.run(scenario())
    assert predictor.online.observed == 30
    assert predictor.predict_dist(None, 60).point < 32 < before  # 20-token answers learned


@pytest.mark.parametrize("cap", [1, 2, 8, 16, 20, 100, 511, 512, 3000, 8191])
def test_a_capped_prediction_is_the_length_the_engine_generates(cap: int) -> None:
    """min(response, max_tokens): below the cap the distribution is the predictor's, the rest sits at the cap."""
    for prompt in (40, 700, 5000):
        d = TRACE.predict(None, prompt_tokens=prompt)
        c = d.capped(cap)
        assert sum(c.probs) == pytest.approx(1.0)
        assert c.quantile(1.0) <= cap + 1 + 1e-9 and c.point <= cap + 1
        assert c.point == pytest.approx(min(d.point, c.point), abs=1.0)
        for t in (1, 5, 17, 100, 600, 4000):
            if t < cap:  # the response's own law below the cap
                assert c.prob_longer_than(t) == pytest.approx(d.prob_longer_than(t), abs=1e-9)
        # What ran past the cap stops at it: in the one-token bucket [cap, cap + 1), nothing beyond.
        assert c.prob_longer_than(cap) == pytest.approx(d.prob_longer_than(cap), abs=1e-9)
        assert c.prob_longer_than(cap + 1) == pytest.approx(0.0, abs=1e-9)
        assert c.expected_remaining(cap - 0.5) <= 1.5  # a guess cannot be renewed past the cap
    # Past the last edge that bucket already means "longer": the buckets stay, the cap is kept for the tail rule.
    far = d.capped(9000)
    assert (far.probs, far.point, far.max_tokens) == (d.probs, d.point, 9000)


def test_a_cut_response_is_learned_as_longer_not_as_the_cap() -> None:
    """Clients capping two thirds of their requests at 100 tokens of answers that run ~600: booked as 100-token
    answers, the cut ones dragged the guess to the cap; spread over the longer buckets they leave it at ~600."""
    prior = TRACE.predict(None, prompt_tokens=300)
    rng = np.random.default_rng(0)
    naive, censored = OnlineLengths(), OnlineLengths()
    for k in range(300):
        length = int(rng.integers(520, 1000))
        if k % 3:
            naive.observe(300, 100)
            censored.observe(300, 100, cut=True, prior=prior)
        else:
            naive.observe(300, length)
            censored.observe(300, length)
    assert naive.adjust(prior, 300).point < 128  # the cap learned as the answers' length
    learned = censored.adjust(prior, 300)
    row = censored.counts[censored.counts.sum(axis=1) > 0][0]
    assert row[:3].sum() == 0.0 and row[3] < 0.05 * row.sum()  # a cut is longer than 100 tokens: none below 64
    assert learned.prob_longer_than(128) > 0.9  # (the shipped prior's 20 pseudo-counts hold the rest)
    assert 512 < learned.point < 1024
    assert censored.counts.sum() == pytest.approx(300.0)  # one count per request, spread
    # With no history and no prior past the cut, the cut's bucket is all there is to book (a lower bound).
    bare = OnlineLengths()
    bare.observe(300, 100, cut=True)
    assert bare.counts.sum() == pytest.approx(1.0) and bare.counts[:, 3].sum() == pytest.approx(1.0)


class _Guesses(FakeInstance):
    """Records the length guess each request was submitted with."""

    def __init__(self, iid: str) -> None:
        super().__init__(iid)
        self.guesses: dict[str, float | None] = {}

    async def _submit(self, req, kv=None, **kw):
        self.guesses[req.request_id] = kw.get("predicted_output_tokens")
        return await super()._submit(req, kv, **kw)


def test_the_live_guess_is_capped_by_max_tokens_and_a_cut_is_learned_as_longer() -> None:
    async def scenario() -> tuple:
        inst = _Guesses("mixed-0")
        ing = _ingress([inst])
        ing.predictor = serving_predictor(PolicySpec(name="trace", params={"online": True}))
        before = ing.predictor.predict_dist(None, 60).point

        async def one(rid: str, max_tokens: int, *, ignore_eos: bool = False, hint: int | None = None) -> None:
            sp = SamplingParams(max_tokens=max_tokens, ignore_eos=ignore_eos)
            await _consume(ing, GenerateRequest(rid, prompt_token_ids=tuple(range(1, 61)), sampling=sp,
                                                length_hint=hint), [])

        await one("capped", 8)
        await one("replay", 8, ignore_eos=True)  # max_tokens is the forced length, not a cap: no oracle
        await one("hinted", 8, hint=500)
        await asyncio.gather(*(one(f"cut{k}", 20) for k in range(30)))
        return inst.guesses, before, ing.predictor

    guesses, before, predictor = asyncio.run(scenario())
    assert before > 20
    assert guesses["capped"] <= 9 < before
    assert guesses["replay"] == pytest.approx(before, rel=0.01)  # (one cut request learned since)
    assert guesses["hinted"] == 8
    assert predictor.online.observed == 33
    # 30 answers cut at 20 tokens: the guess for the next one stays above the cut (booked as 20-token answers, it
    # fell below 32: test_the_live_ingress_learns_from_finished_requests_only).
    assert predictor.predict_dist(None, 60).point > 20


# ---- per-tenant histories (``TenantLengths``) ---------------------------------------------------------------


def test_the_live_ingress_learns_each_tenants_lengths_apart() -> None:
    """Two apps behind one ingress, the same 60-token prompts: ``chat`` answers in 20 tokens, ``summarise`` in 300.
    One history for the ingress guessed the mix for both; each tenant now reads its own (a request naming none the
    shared one, the mix)."""
    async def scenario() -> Any:
        ing = _ingress([FakeInstance("mixed-0")])
        ing.predictor = serving_predictor(PolicySpec(name="trace", params={"online": True}))

        async def one(rid: str, tenant: str, n: int) -> None:
            sp = SamplingParams(max_tokens=n, ignore_eos=True)  # the response's own length (a replay forcing it)
            await _consume(ing, GenerateRequest(rid, prompt_token_ids=tuple(range(1, 61)), sampling=sp,
                                                tenant=tenant), [])

        await asyncio.gather(*(one(f"c{k}", "chat", 20) for k in range(30)),
                             *(one(f"s{k}", "summarise", 300) for k in range(30)))
        return ing.predictor

    predictor = asyncio.run(scenario())
    assert predictor.online.observed == 60
    chat, long_ = (predictor.predict_dist(None, 60, tenant=t).point for t in ("chat", "summarise"))
    mix = predictor.predict_dist(None, 60).point
    assert chat < 40 < mix < 256 < long_, (chat, mix, long_)  # one history: ~60-90 tokens for both
    assert set(predictor.online.tenants) == {"chat", "summarise"}


def test_a_short_tenant_history_falls_back_to_the_others_and_a_lone_tenant_is_the_shared_history() -> None:
    prior = TRACE.predict(None, prompt_tokens=60)
    tl = TenantLengths()
    for _ in range(100):
        tl.observe(60, 600)  # requests naming no tenant: long answers
    shared = tl.adjust(prior, 60)
    assert tl.adjust(prior, 60, "new").probs == shared.probs  # no history of its own: the shared one
    tl.observe(60, 20, tenant="new")
    one = tl.adjust(prior, 60, "new")
    assert 256 < one.point < shared.point  # one short answer of its own: still mostly the others' (long) guess
    for _ in range(100):
        tl.observe(60, 20, tenant="new")
    assert tl.adjust(prior, 60, "new").point < 32  # its own now
    assert 32 < tl.adjust(prior, 60).point < 512  # the shared history: the mix of both
    # The other tenants' history is the prior, not the shared one (its own requests are not counted twice).
    assert tl.adjust(prior, 60, "new").probs == tl.tenants["new"].adjust(
        LengthPrediction.from_probs((20.0 * np.asarray(prior.probs) + 100.0 * np.eye(9)[6]).tolist()), 60).probs
    # A deployment whose requests all name one app predicts bit for bit as the shared history (cut ones included).
    alone, old = TenantLengths(), OnlineLengths()
    rng = np.random.default_rng(3)
    for k in range(300):
        p, out = int(rng.integers(10, 5000)), int(rng.integers(1, 2000))
        d = TRACE.predict(None, prompt_tokens=p)
        assert alone.adjust(d, p, "app").probs == old.adjust(d, p).probs
        alone.observe(p, out, cut=k % 4 == 0, prior=d, tenant="app")
        old.observe(p, out, cut=k % 4 == 0, prior=d)
    assert np.array_equal(alone.tenants["app"].counts, old.counts) and np.array_equal(alone.shared.counts, old.counts)


def test_online_histories_are_bounded_and_a_replaced_tenant_reads_the_shared_one() -> None:
    tl = TenantLengths(max_tenants=2, memory=50.0, admit_after=1)
    for t in ("a", "b", "a", "c"):  # c replaces b, the tenant observed least recently (as often as c)
        tl.observe(60, 20 if t == "a" else 600, tenant=t)
    assert list(tl.tenants) == ["a", "c"] and tl.observed == 4
    prior = TRACE.predict(None, prompt_tokens=60)
    assert tl.adjust(prior, 60, "b").probs == tl.adjust(prior, 60).probs
    assert tl._slots.sum() == pytest.approx(4.0)  # b's count joined the untracked ones: the others still see it
    for k in range(500):  # many tenants, many requests: still two histories, each row within ``memory``
        tl.observe(60 + k, 600, tenant=f"t{k % 7}")
    assert len(tl.tenants) == 2 and tl._slots.shape[0] == 3
    assert tl._slots.sum(axis=2).max() <= 50.0 + 1e-9
    with pytest.raises(ValueError, match="max_tenants"):
        TenantLengths(max_tenants=0)


def test_the_simulator_learns_each_tenants_lengths_from_its_trace_column() -> None:
    rng = np.random.default_rng(2)
    n = 400
    chat = rng.random(n) < 0.5
    output = np.where(chat, rng.integers(10, 30, n), rng.integers(500, 800, n)).astype(np.int64)
    w = Workload(np.sort(rng.uniform(0, 40, n)), np.full(n, 300, dtype=np.int64), output,
                 tenant=["chat" if c else "summarise" for c in chat])
    cfg = with_predictor(load_config("default"), "trace", online=True)
    router = Recording()
    Simulator(cfg, router=router).run(w)
    seen = np.array([router.seen[str(i)] for i in range(n)])
    late = np.arange(n) >= n // 2
    assert np.median(seen[late & chat]) < 64 and np.median(seen[late & ~chat]) > 400


def test_a_prediction_in_a_thread_never_reads_an_observe_half_done() -> None:
    """The ingress predicts off its event loop (a slow predictor, a long text) while the loop observes finished
    requests. One observe writes the tenant's row, then its decay, the others' sum and the shared row: a prediction
    in between read the new count in the tenant's own row and took it off the others' (before: ~1 in 15 predictions
    torn with a 1 us switch interval). Here every observe leaves the histories as they were (the row of ``a`` at
    ``memory`` = 1023, all in one bucket: + 1, x 1023 / 1024, exact), so every prediction must equal the one before."""
    import sys
    import threading
    import time

    tl = TenantLengths(memory=1023.0, pinned=("a", "b"))
    for _ in range(3000):
        tl.observe(500, 5, tenant="a")
    for _ in range(30):
        tl.observe(500, 300, tenant="b")  # (the others' history of ``a``: its prior reads it)
    prior = TRACE.predict(None, prompt_tokens=500)
    want = tl.adjust(prior, 500, "a").probs
    row = tl.history("a").counts.copy()
    tl.observe(500, 5, tenant="a")
    assert np.array_equal(tl.history("a").counts, row) and tl.adjust(prior, 500, "a").probs == want  # (fixed point)

    stop = threading.Event()

    def learn() -> None:
        while not stop.is_set():
            tl.observe(500, 5, tenant="a")

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as the interpreter can
    writer = threading.Thread(target=learn)
    writer.start()
    try:
        # 4000 predictions, and on until the writer has observed 200 beside them: on a loaded CI box it ran only 67
        # observes during the 4000 once (the side-by-side check below failed, not the torn count).
        torn, n, end = 0, 0, time.monotonic() + 20.0
        while (n < 4000 or tl.observed < 3031 + 200) and time.monotonic() < end:
            torn += tl.adjust(prior, 500, "a").probs != want
            n += 1
    finally:
        stop.set()
        writer.join()
        sys.setswitchinterval(interval)
    assert tl.observed > 3031 + 100  # (they did run side by side)
    assert torn == 0
