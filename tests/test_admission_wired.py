"""``policies.admission``: accepted and validated at load (errors name the field), and applied by the simulator at
each arrival with its own queues (requests admitted without a first token yet) -- the live Ingress applies the
same policy (``tests/test_admission_live.py``). Before, the config refused it and nothing called the policy."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from scheduler.config.load import ConfigError, parse_config
from sim.metrics import sim_summary
from sim.simulator import Simulator, Workload
from tests.test_cli_bad_input import run

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[1]
RAW = yaml.safe_load((ROOT / "scheduler/config/examples/default.yaml").read_text())
ONE = {**RAW, "pools": [{**RAW["pools"][0], "count": 1}]}


def _with_admission(raw: dict, spec: dict) -> dict:
    return {**raw, "policies": {**raw["policies"], "admission": spec}}


def test_admission_spec_is_accepted_with_its_params() -> None:
    cfg = parse_config(_with_admission(RAW, {"name": "bounded", "params": {
        "max_queued": {0: 4, "1": 64}, "default_max_queued": 8, "shed_usage": 0.9, "protected_priority": 1,
        "retry_after_s": 0.5, "drain_rps_per_instance": 3}}))
    assert cfg.policies.admission is not None and cfg.policies.admission.name == "bounded"
    sim = Simulator(cfg)
    assert sim.admission is not None and sim.admission.max_queued == {0: 4, 1: 64}
    assert sim.admission.limit(2) == 8 and sim.admission.shed_usage == 0.9


@pytest.mark.parametrize("spec, needle", [
    ({"name": "bogus"}, "policies.admission.name: unknown admission policy 'bogus'; allowed: always, bounded"),
    ({"name": "bounded", "params": {"max_queued": {0: -1}}}, "policies.admission.params.max_queued[0]: must be >= 0"),
    ({"name": "bounded", "params": {"max_queued": {"high": 3}}},
     "policies.admission.params.max_queued['high']: priority must be an integer"),
    ({"name": "bounded", "params": {"max_queued": [1, 2]}}, "policies.admission.params.max_queued: a mapping"),
    ({"name": "bounded", "params": {"default_max_queued": 1.5}},
     "policies.admission.params.default_max_queued: value must be an integer"),
    ({"name": "bounded", "params": {"shed_usage": 0}}, "policies.admission.params.shed_usage: must be a finite"),
    ({"name": "bounded", "params": {"retry_after_s": -1}}, "policies.admission.params.retry_after_s: must be"),
    ({"name": "bounded", "params": {"drain_rps_per_instance": True}},
     "policies.admission.params.drain_rps_per_instance: must be"),
    ({"name": "bounded", "params": {"max_queue": 3}},
     "policies.admission.params.max_queue: unknown parameter of admission policy 'bounded'; allowed: max_queued"),
    ({"name": "always", "params": {"default_max_queued": 3}},
     "policies.admission.params.default_max_queued: unknown parameter of admission policy 'always'"),
    # "always" bounds no queue and sheds nothing: those settings would make it "bounded" under another name.
    ({"name": "always", "params": {"max_queued": {0: 1}}},
     "policies.admission.params.max_queued: unknown parameter of admission policy 'always'; allowed: retry_after_s"),
    ({"name": "always", "params": {"shed_usage": 0.5}},
     "policies.admission.params.shed_usage: unknown parameter of admission policy 'always'"),
])
def test_bad_admission_specs_fail_at_load_naming_the_field(spec: dict, needle: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_config(_with_admission(RAW, spec), source="c.yaml")
    assert needle in str(e.value), str(e.value)


def test_a_priority_named_twice_in_max_queued_fails_at_load() -> None:
    """YAML's ``1:`` and ``"1":`` are two keys of one priority: the limit was whichever came last, silently."""
    raw = yaml.safe_load('policies:\n  admission:\n    name: bounded\n    params:\n'
                         '      max_queued: {1: 4, "1": 64, 0: 2}\n')
    assert list(raw["policies"]["admission"]["params"]["max_queued"]) == [1, "1", 0]
    with pytest.raises(ConfigError) as e:
        parse_config(_with_admission(RAW, raw["policies"]["admission"]), source="c.yaml")
    assert "policies.admission.params.max_queued: priority 1 is given twice (1 and '1')" in str(e.value), str(e.value)


def _crafted() -> Workload:
    """1 instance. Six arrivals 1 ms apart, each prefill (2000 tokens) far longer than that: none has its first token
    while the others arrive. Then one more at 30 s, when all are done."""
    prio = np.array([0, 0, 1, 1, 1, 0, 0])
    arrival = np.array([0.0, 0.001, 0.002, 0.003, 0.004, 0.005, 30.0])
    return Workload(arrival_s=arrival, prompt_tokens=np.full(7, 2000), output_tokens=np.full(7, 8), priority=prio)


def test_simulator_applies_the_policy_at_arrival_with_its_own_queues() -> None:
    cfg = parse_config(_with_admission(ONE, {"name": "bounded", "params": {"max_queued": {0: 1, 1: 2}}}))
    res = Simulator(cfg).run(_crafted())
    # p0 queue 1: #0 in, #1 and #5 out; p1 queue 2: #2, #3 in, #4 out; #6 finds empty queues.
    assert res.admission_rejected.tolist() == [False, True, False, False, True, True, False]
    assert res.rejected.tolist() == res.admission_rejected.tolist()
    assert np.isfinite(res.finish_s[~res.rejected]).all() and np.isnan(res.first_token_s[res.rejected]).all()
    s = sim_summary(res)
    assert s["admission_rejected"] == 3 and s["rejected"] == 3
    assert {p: c["admission_rejected"] for p, c in s["slo"]["classes"].items()} == {0: 2, 1: 1}


def test_admit_all_changes_no_timing_and_no_policy_adds_no_key() -> None:
    """A policy that admits everything leaves every per-request time as without one (the hook perturbs nothing);
    without a policy the summary has no admission keys (results recorded before stay as they are)."""
    w = _crafted()
    plain = Simulator(parse_config(ONE)).run(w)
    always = Simulator(parse_config(_with_admission(ONE, {"name": "always"}))).run(w)
    for col in ("first_token_s", "finish_s", "admit_s", "instance"):
        np.testing.assert_array_equal(getattr(plain, col), getattr(always, col))
    assert not always.admission_rejected.any() and plain.admission_rejected is None
    s = sim_summary(plain)
    assert "admission_rejected" not in s and all("admission_rejected" not in c for c in s["slo"]["classes"].values())


def test_simulate_cli_runs_a_config_with_admission(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "adm.yaml"
    cfg.write_text(yaml.safe_dump(_with_admission(ONE, {"name": "bounded", "params": {"max_queued": {0: 0}}})))
    out = tmp_path / "s.json"
    rc, err = run(["simulate", "--synthetic", "200", "--rate", "20", "--config", str(cfg), "--priority-mix",
                   "1:0.25", "--quiet", "--json", str(out)], capsys)
    assert rc == 0, err
    s = json.loads(out.read_text())
    classes = s["slo"]["classes"]
    # Priority 0's queue holds none: every class-0 request is refused, none of class 1 (default queue, 1024).
    assert classes["0"]["admission_rejected"] == classes["0"]["requests"] > 100
    assert classes["1"]["admission_rejected"] == 0 and classes["1"]["requests"] > 20
    assert s["admission_rejected"] == s["rejected"] == classes["0"]["requests"]
    rc, err = run(["simulate", "--synthetic", "10", "--priority-mix", "1:1.5", "--quiet"], capsys)
    assert rc == 2 and "--priority-mix" in err


def test_priority_mix_names_each_class_once() -> None:
    """``--priority-mix 1:0.2,1:0.3``: a class named twice kept the last share and dropped the first without a
    word (30% of the requests in class 1 where the user may have meant 50%, or a typo for another class).
    Refused, as a share out of (0, 1] is; a well-formed mix parses as before."""
    import argparse

    from sim.commands import priority_mix_arg

    with pytest.raises(argparse.ArgumentTypeError, match="class 1 given twice"):
        priority_mix_arg("1:0.2,1:0.3")
    assert priority_mix_arg("1:0.25,2:0.05") == {1: 0.25, 2: 0.05}
