"""``policies.predictor``: the length guess the routers get, applied the same way by the simulator and the live
ingress (the ingress without Ray here; through a real cluster in test_control_plane.py)."""

from __future__ import annotations

import asyncio
import logging

import numpy as np
import pytest

from scheduler.config.load import ConfigError, load_config, parse_config
from scheduler.config.models import PolicySpec
from scheduler.control.api import GenerateRequest, InvalidRequest
from scheduler.control.ingress import Ingress
from scheduler.control.registry import RequestRecord
from scheduler.core.types import ClusterView, InstanceRole, InstanceSnapshot
from scheduler.engine.base import SamplingParams
from scheduler.policy.route import LeastOutstandingRouter
from scheduler.predict import count_tokens, load_predictor
from scheduler.predict.serving import ServingPredictor, serving_predictor
from scheduler.predict.trace import TracePredictor, fit_trace
from sim.commands import with_predictor
from sim.simulator import Simulator, Workload


class Recording(LeastOutstandingRouter):
    """Least-outstanding placement; remembers the length guess of every request it placed."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: dict[str, float | None] = {}
        self.tenants: dict[str, str | None] = {}

    def route(self, request, view):  # type: ignore[override]
        self.seen[request.request_id] = request.predicted_output_tokens
        self.tenants[request.request_id] = request.tenant
        return super().route(request, view)


def _workload(n: int = 60, seed: int = 0) -> Workload:
    rng = np.random.default_rng(seed)
    prompt = rng.choice([40, 700, 3000], n)  # three input-length buckets: three different guesses
    return Workload(np.sort(rng.uniform(0, 20, n)), prompt.astype(np.int64), rng.integers(5, 200, n))


def test_the_simulator_gives_routers_the_configured_predictors_guess() -> None:
    cfg = with_predictor(load_config("llama2-7b-a100-16"), "trace", tenant="azure_conv")
    w = _workload()
    router = Recording()
    res = Simulator(cfg, router=router).run(w)
    trace = load_predictor("trace")
    want = [trace.predict(None, prompt_tokens=int(p), tenant="azure_conv").point for p in w.prompt_tokens]
    assert [router.seen[str(i)] for i in range(len(w))] == pytest.approx(want)
    assert len(set(np.round(want, 3))) == 3  # the guess follows the prompt length
    assert res.workload.predicted_output == pytest.approx(want)  # reported with the run
    # A workload's own lengths (oracle, a client's hints) win; without a predictor routers get none.
    own = w.output_tokens.astype(float) + 0.5
    router = Recording()
    Simulator(cfg, router=router).run(Workload(w.arrival_s, w.prompt_tokens, w.output_tokens, predicted_output=own))
    assert [router.seen[str(i)] for i in range(len(w))] == pytest.approx(own)
    router = Recording()
    Simulator(with_predictor(cfg, None), router=router).run(w)
    assert set(router.seen.values()) == {None}


@pytest.mark.parametrize(("policies", "field", "why"), [
    ({"predictor": {"name": "oracle"}}, "policies.predictor.name", "allowed: default, ngram"),
    ({"predictor": {"name": "trace", "params": {"tenants": "x"}}}, "policies.predictor.params", "allowed: artifacts"),
])
def test_a_bad_predictor_config_is_refused_at_load_naming_the_field(policies: dict, field: str, why: str) -> None:
    raw = load_config("tiny-cpu").model_dump(mode="json")
    with pytest.raises(ConfigError) as e:
        parse_config({**raw, "policies": policies}, source="bad.yaml")
    assert field in str(e.value) and why in str(e.value)


def test_a_missing_predictor_artifact_names_the_field(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"policies.predictor.params.artifacts: .*ngram.npz is missing"):
        serving_predictor(PolicySpec(name="ngram", params={"artifacts": str(tmp_path)}))


def _ingress(predictor: str | None, router: Recording) -> Ingress:
    cfg = with_predictor(load_config("deploy/examples/cpu-pd.yaml"), predictor)
    ing = Ingress(cfg, controller=None, router=router)
    ing._view = ClusterView(0.0, (InstanceSnapshot("prefill-0", InstanceRole.PREFILL),
                                  InstanceSnapshot("decode-0", InstanceRole.DECODE)))
    return ing


def test_the_ingress_keeps_a_max_tokens_past_the_last_edge_for_the_renewals() -> None:
    """``max_tokens`` 10000 (past the last bucket edge, 8192) reached the distribution the instances renew from
    as nothing, so a request 9500 tokens in was read as ~4200 from its end; now as at most 500. With
    ``ignore_eos`` it is the replay's forced length and still caps nothing."""
    ing = _ingress("default", Recording())
    ids = tuple(range(1, 41))
    rec = RequestRecord("r", ids, SamplingParams(max_tokens=10_000))
    forced = RequestRecord("f", ids, SamplingParams(max_tokens=10_000, ignore_eos=True))
    for r in (rec, forced):
        asyncio.run(ing._predict(r, None))
    assert rec.length_dist is not None and 1.0 <= rec.length_dist.expected_remaining(9500.0) <= 500.0
    assert rec.length_dist.max_tokens == 10_000
    assert forced.length_dist is not None and forced.length_dist.max_tokens is None
    assert forced.length_dist.expected_remaining(9500.0) > 4000.0  # the octave's 0.44 g


def test_the_ingress_guesses_from_the_prompt_text_and_a_client_hint_wins() -> None:
    router = Recording()
    ing = _ingress("default", router)
    text = "Write a detailed, step-by-step tutorial on building a compiler, with code for every stage."
    ids = tuple(range(1, 41))
    recs = {"text": RequestRecord("text", ids, SamplingParams(max_tokens=64)),
            "ids": RequestRecord("ids", ids, SamplingParams(max_tokens=64)),
            "hint": RequestRecord("hint", ids, SamplingParams(max_tokens=64), predicted_output_tokens=7)}
    for rid, prompt in (("text", text), ("ids", None), ("hint", text)):
        asyncio.run(ing._predict(recs[rid], prompt))
        ing._route(recs[rid])
    default = load_predictor("default")
    # text: the length feature in count_tokens units, as in training and `predict eval` (not the 40 ids); capped
    # by max_tokens, as the engine stops there
    text_guess = default.predict(text, prompt_tokens=count_tokens(text))
    assert text_guess.point > 64
    assert router.seen["text"] == pytest.approx(text_guess.capped(64).point)
    assert router.seen["ids"] == pytest.approx(default.predict(None, prompt_tokens=40).capped(64).point)  # trace model
    # Both medians are past the cap, so both guesses are the cap itself (they differed only by where the cap's
    # one-token bucket was interpolated); the text shows in the distribution below it.
    assert router.seen["text"] == router.seen["ids"] == 64
    ids_dist = default.predict(None, prompt_tokens=40)
    assert text_guess.prob_longer_than(32) != pytest.approx(ids_dist.prob_longer_than(32))
    assert router.seen["hint"] == 7
    # No predictor configured: no guess.
    router = Recording()
    ing = _ingress(None, router)
    rec = RequestRecord("none", ids, SamplingParams(max_tokens=64))
    asyncio.run(ing._predict(rec, text))
    ing._route(rec)
    assert router.seen == {"none": None}


def test_a_predictor_fault_costs_the_guess_not_the_request() -> None:
    class Broken:
        name = "broken"

        def predict(self, *a, **k):
            raise RuntimeError("boom")

    router = Recording()
    ing = _ingress("trace", router)
    ing.predictor = ServingPredictor(Broken(), "broken")  # type: ignore[arg-type]
    rec = RequestRecord("r", tuple(range(1, 9)), SamplingParams(max_tokens=8))
    asyncio.run(ing._predict(rec, "hello"))
    assert rec.predicted_output_tokens is None
    ing._route(rec)
    assert router.seen == {"r": None}


def test_a_slow_predictor_runs_off_the_loop_and_a_duplicate_id_meanwhile_is_refused() -> None:
    """The embedding predictor is awaited in a thread; a second request with the same id that got registered in
    the meantime must not be routed twice."""
    import threading

    release = threading.Event()

    class Slow:
        name = "slow"

        def predict(self, prompt, *, prompt_tokens, tenant=None):
            release.wait(5)
            return load_predictor("trace").predict(None, prompt_tokens=prompt_tokens)

    ing = _ingress(None, Recording())
    ing.predictor = ServingPredictor(Slow(), "slow", slow=True)  # type: ignore[arg-type]

    async def race() -> None:
        first = RequestRecord("dup", tuple(range(1, 9)), SamplingParams(max_tokens=8))
        task = asyncio.create_task(ing._predict(first, None))
        await asyncio.sleep(0.05)
        assert not task.done()  # the loop is free while it predicts
        ing.registry.add(RequestRecord("dup", tuple(range(1, 9)), SamplingParams(max_tokens=8)))
        release.set()
        with pytest.raises(InvalidRequest, match="request_id"):
            await task

    asyncio.run(race())


def test_fit_trace_refits_the_trace_predictor_on_a_request_log(tmp_path, capsys) -> None:
    """``llmsched predict fit-trace``: held-out metrics on the log's tail, an artifact a config can name."""
    import json
    from pathlib import Path

    from scheduler.cli import main as cli

    log = Path(__file__).resolve().parents[1] / "sim/data/azure_llm_2023_conv_first10min.csv.gz"
    out, report = tmp_path / "pred", tmp_path / "fit.json"
    assert cli(["predict", "fit-trace", "--trace", str(log), "--tenant", "chat", "--out", str(out),
                "--json", str(report)]) == 0
    r = json.loads(report.read_text())
    assert r["tenants"] == {"chat": 2867} and r["held_out"]["n"] == 574
    assert r["held_out"]["kendall_tau"] > 0.4  # Azure chat: input length is informative (measured 0.57)
    sp = serving_predictor(PolicySpec(name="trace", params={"artifacts": str(out), "tenant": "chat"}))
    assert sp is not None and sp.predict_dist(None, 1000).point != pytest.approx(sp.predict_dist(None, 50).point)
    for argv, flag in ((["--trace", str(tmp_path / "nope.csv"), "--out", str(out)], "nope.csv"),
                       (["--trace", str(log), "--out", str(out), "--holdout", "1"], "--holdout")):
        capsys.readouterr()
        assert cli(["predict", "fit-trace", *argv]) == 2
        assert flag in capsys.readouterr().err


def test_fit_trace_fits_a_tenant_too_small_to_score(tmp_path) -> None:
    """A BurstGPT log's tenants are its models: one with a single request is fitted but not held out."""
    import json

    from scheduler.cli import main as cli

    rows = [(100, 50), (2000, 20), (120, 60), (1900, 25), (90, 55), (2100, 22), (110, 58), (2050, 21), (95, 52)]
    lines = ["Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type"]
    lines += [f"{i},ChatGPT,{a},{b},{a + b},Conversation log" for i, (a, b) in enumerate(rows)]
    lines.append("9,GPT-4,300,400,700,Conversation log")
    log = tmp_path / "burst.csv"
    log.write_text("\n".join(lines) + "\n")
    report = tmp_path / "fit.json"
    assert cli(["predict", "fit-trace", "--trace", str(log), "--out", str(tmp_path / "p"), "--json", str(report)]) == 0
    r = json.loads(report.read_text())
    assert r["not_scored"] == ["GPT-4/Conversation log"] and r["held_out"]["n"] == 2
    sp = serving_predictor(PolicySpec(name="trace", params={"artifacts": str(tmp_path / "p"),
                                                            "tenant": "ChatGPT/Conversation log"}))
    assert sp is not None and sp.predict_dist(None, 2000).point < sp.predict_dist(None, 100).point  # long prompts, short answers here


def test_the_ingress_predicts_for_the_requests_tenant_else_the_configs(caplog) -> None:
    """A request's ``tenant`` wins over ``policies.predictor.params.tenant``; one the predictor does not know gets
    the tenant-free guess (not the config's app), is counted and logged once, and still runs."""
    router = Recording()
    ing = _ingress(None, router)
    ing.predictor = serving_predictor(PolicySpec(name="trace", params={"tenant": "azure_conv"}))
    # 1500 prompt tokens: the three guesses differ there (azure 82, pooled 114, mooncake 343 tokens)
    ids, sp = (5,) * 1500, SamplingParams(max_tokens=400, ignore_eos=True)
    sent = {"own": "mooncake_conv", "none": None, "unknown": "nope", "unknown2": "nope"}
    with caplog.at_level(logging.WARNING, logger="scheduler.predict.serving"):
        for rid, tenant in sent.items():
            rec = ing._validate(GenerateRequest(rid, prompt_token_ids=ids, sampling=sp, tenant=tenant), None)
            asyncio.run(ing._predict(rec, None))
            ing._route(rec)
    trace = load_predictor("trace")
    used = {"own": "mooncake_conv", "none": "azure_conv", "unknown": None, "unknown2": None}
    want = {rid: trace.predict(None, prompt_tokens=1500, tenant=t).point for rid, t in used.items()}
    assert len({round(v, 3) for v in want.values()}) == 3
    assert router.seen == pytest.approx(want)
    assert router.tenants == sent  # the router's RequestInfo carries it too
    assert ing.predictor.unknown_tenants.requests == 2
    assert caplog.text.count("'nope' is not one it knows") == 1


def test_a_predictor_that_knows_no_tenants_ignores_a_requests() -> None:
    class Blind:
        name = "blind"

        def known_tenants(self) -> frozenset[str]:
            return frozenset()

        def predict(self, prompt, *, prompt_tokens, tenant=None):
            assert tenant is None
            return load_predictor("trace").predict(None, prompt_tokens=prompt_tokens)

    sp = ServingPredictor(Blind(), "blind")  # type: ignore[arg-type]
    assert sp.predict_dist(None, 100, tenant="any").point > 0 and sp.unknown_tenants.requests == 0


@pytest.mark.parametrize("online", [False, True])
def test_the_simulator_predicts_each_request_for_its_traces_tenant(tmp_path, caplog, online: bool) -> None:
    """A trace's tenant column (BurstGPT: model / log type) is each simulated request's ``tenant``, decided where a
    live request's is: its own where the predictor knows it, the config's where the column has none, the
    tenant-free guess (counted) for an app it does not know. (The config's tenant was used for every request.)"""
    short, long_ = "ChatGPT/Conversation log", "GPT-4/API log"
    fit_trace({short: [(400, 20)] * 60, long_: [(400, 1500)] * 60}).save(tmp_path / "trace.json")
    rows = [short, long_, "Claude/API log", long_]
    csv = ["Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type"]
    # One arrival time: no request finishes before the last is predicted (``online`` has no history yet).
    csv += [f"0,{t.split('/')[0]},400,30,430,{t.split('/')[1]}" for t in rows]
    (tmp_path / "burst.csv").write_text("\n".join(csv) + "\n")
    from sim.traces import load_trace

    w = Workload.from_trace(load_trace(tmp_path / "burst.csv"))
    cfg = with_predictor(load_config("default"), "trace", artifacts=str(tmp_path), tenant=short, online=online)
    router, sim = Recording(), None
    with caplog.at_level(logging.WARNING, logger="scheduler.predict.serving"):
        sim = Simulator(cfg, router=router)
        sim.run(w)
    fitted = TracePredictor.load(tmp_path / "trace.json")
    want = [fitted.predict(None, prompt_tokens=400, tenant=t).point for t in (short, long_, None, long_)]
    assert want[1] > 10 * want[0] and want[0] < want[2] < want[1]
    assert [router.seen[str(i)] for i in range(4)] == pytest.approx(want)
    assert [router.tenants[str(i)] for i in range(4)] == rows
    assert sim.predictor.unknown_tenants.requests == 1 and "'Claude/API log' is not one it knows" in caplog.text
    router = Recording()  # no column: the config's tenant, as before
    Simulator(cfg, router=router).run(Workload(w.arrival_s, w.prompt_tokens, w.output_tokens))
    assert [router.seen[str(i)] for i in range(4)] == pytest.approx([want[0]] * 4)


def test_the_sdks_tenant_reaches_the_live_ingresss_predictor() -> None:
    """End to end without Ray: ``Client(tenant=)`` -> gRPC -> the real ``Ingress`` (fake instances) -> the length
    predictor -> the router's guess; an unknown name runs and is counted in the cluster state."""
    from scheduler.client import Client
    from scheduler.server.background import BackgroundServer
    from tests.test_ingress_audit import FakeInstance
    from tests.test_ingress_audit import _ingress as live_ingress

    router = Recording()
    predictor = serving_predictor(PolicySpec(name="trace", params={"tenant": "azure_conv"}))
    sent = {"sdk-own": "mooncake_conv", "sdk-none": None, "sdk-unknown": "nope"}
    with BackgroundServer(lambda: live_ingress([FakeInstance("mixed-0")], router=router, predictor=predictor)) as s, \
            Client(s.address, timeout_s=10) as c:
        for rid, tenant in sent.items():
            assert c.generate([5] * 1500, max_tokens=3, ignore_eos=True, request_id=rid, tenant=tenant).token_ids
        extra = c.cluster_state().extra
    trace = load_predictor("trace")
    used = {"sdk-own": "mooncake_conv", "sdk-none": "azure_conv", "sdk-unknown": None}
    assert router.seen == pytest.approx({r: trace.predict(None, prompt_tokens=1500, tenant=t).point
                                         for r, t in used.items()})
    assert router.tenants == sent and extra["predictor_unknown_tenant"] == 1


def test_the_live_ingress_reports_its_online_tenant_histories() -> None:
    """``params.online`` settings reach the live ingress's predictor; its cluster state counts the tenant histories
    held and the requests whose tenant got none (past ``max_tenants``, not yet admitted)."""
    import time

    from scheduler.client import Client
    from scheduler.server.background import BackgroundServer
    from tests.test_ingress_audit import FakeInstance
    from tests.test_ingress_audit import _ingress as live_ingress

    predictor = serving_predictor(PolicySpec(name="trace", params={
        "online": {"max_tenants": 1, "admit_after": 3, "pinned": ["search"]}}))
    sent = ["chat", "flood-1", "search", "flood-2", "chat"]
    with BackgroundServer(lambda: live_ingress([FakeInstance("mixed-0")], router=Recording(),
                                               predictor=predictor)) as s, Client(s.address, timeout_s=10) as c:
        for k, tenant in enumerate(sent):
            assert c.generate([5] * 100, max_tokens=3, ignore_eos=True, request_id=f"t{k}", tenant=tenant).token_ids
        deadline = time.monotonic() + 10  # (a stream's end reaches the client before the ingress books it)
        while (extra := c.cluster_state().extra).get("predictor_online_unadmitted") != 2 and time.monotonic() < deadline:
            time.sleep(0.05)
    assert extra["predictor_online_tenants"] == 2 and extra["predictor_online_unadmitted"] == 2
    assert list(predictor.online.tenants) == ["chat"] and predictor.online.history("search").observed == 1
