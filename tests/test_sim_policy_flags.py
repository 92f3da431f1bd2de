"""The simulating commands read their periodic policies in one place (``sim/policies.py``): one parser of
``--migration`` / ``--reroling``, one factory whose keywords every caller splats, one spec dump, and one refusal of
re-roling beside autoscaling (``scheduler.policy.scaling.check_reroling_without_scaling``) for the live Controller,
the commands and the ``Simulator``. Until the forty-first session each command copied them and the refusal had four
wordings, the live one without a remedy."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

import sim.compare
from scheduler.cli import main as cli_main
from scheduler.config.load import load_config
from scheduler.policy.scaling import SIM_REROLING_REMEDY, RerolePolicy, ThresholdScaler, reroling_policy
from sim.policies import policy_flags, policy_specs, sim_policies
from sim.simulator import Simulator
from tests.test_sim_cli_policies import REROLING, _config


def _refusal(message: str) -> str:
    """What a refusal says after naming the two policies: the reason and the remedy."""
    return message.split(": not with ", 1)[1].split(": ", 1)[1]


def test_reroling_beside_autoscaling_is_one_refusal_naming_the_remedy(tmp_path: Path, capsys) -> None:
    both = load_config(_config(tmp_path, "llama2-7b-pd-a100", reroling=REROLING, scaling={"name": "threshold"}))
    said = []
    with pytest.raises(ValueError) as live:  # what the live Controller's RoleSwitcher.from_config reads
        reroling_policy(both)
    said.append(str(live.value))
    with pytest.raises(ValueError) as direct:
        Simulator(both, scaling=ThresholdScaler(), reroling=RerolePolicy())
    said.append(str(direct.value))
    rerole = _config(tmp_path, "llama2-7b-pd-a100", reroling=REROLING)
    assert cli_main(["simulate", "--config", rerole, "--synthetic", "20", "--scaling", "threshold"]) == 2
    said.append(capsys.readouterr().err)
    assert said[0].startswith("policies.reroling (threshold): not with policies.scaling (threshold): ")
    assert "policies.reroling (threshold): not with --scaling threshold: " in said[2]  # the flag, as given
    rule = _refusal(said[0])
    # The live Controller and a Simulator built in code have no --reroling flag to suggest; the commands do.
    assert rule.endswith("drop one of the two") and _refusal(said[1]) == rule, said
    assert all(_refusal(s).strip() == f"{rule}, or {SIM_REROLING_REMEDY}" for s in said[2:]), said


def test_flags_parse_once_and_the_factory_always_splats() -> None:
    plain = load_config("default")
    cfg, flags = policy_flags(plain, argparse.Namespace(migration="llumnix:max_per_s=2", reroling="none"))
    assert flags == ("migration", "reroling") and cfg.policies.reroling is None
    assert policy_specs(cfg) == {"migration_policy": {"name": "llumnix", "params": {"max_per_s": 2}}}
    assert policy_flags(plain, argparse.Namespace(migration=None, reroling=None)) == (plain, ())
    with pytest.raises(ValueError, match="--reroling none: takes no parameters"):
        policy_flags(plain, argparse.Namespace(migration=None, reroling="none:sustain_s=2"))
    # No policy: an empty dict to splat (the plain run), not None; a policy: fresh objects per call.
    assert sim_policies(plain)() == {} and policy_specs(plain) == {}
    make = sim_policies(cfg)
    assert set(make()) == {"migration"} and make()["migration"] is not make()["migration"]


def test_compare_builds_its_policies_once(tmp_path: Path, capsys, monkeypatch) -> None:
    built: list[object] = []
    real = sim.compare.sim_policies

    def counting(config, **kw):
        built.append(config)
        return real(config, **kw)

    monkeypatch.setattr(sim.compare, "sim_policies", counting)
    out = tmp_path / "c.json"
    assert cli_main(["compare", "--synthetic", "40", "--routers", "least_outstanding", "--no-goodput",
                     "--migration", "llumnix", "--json", str(out)]) == 0
    capsys.readouterr()
    assert len(built) == 1  # the fail-fast check's factory is the runs' (two until the forty-first session)


def test_reroling_flag_beside_scaling_flag_is_named_as_given(capsys) -> None:
    """``simulate --reroling threshold --scaling threshold`` on a config without ``policies.reroling``: the refusal
    names the flag the user typed (until the forty-first session's review it named ``policies.reroling``, a key
    the config does not set)."""
    assert cli_main(["simulate", "--config", "llama2-7b-pd-a100", "--synthetic", "20", "--scaling", "threshold",
                     "--reroling", "threshold:sustain_s=2", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "error: --reroling threshold:sustain_s=2: not with --scaling threshold: " in err, err
    assert "policies.reroling" not in err and err.rstrip().endswith(SIM_REROLING_REMEDY), err
