"""A config's periodic policies as the simulator commands run them, beside the router (``simulate``, ``plan``,
``compare``, and ``llmsched run``'s simulation of its live slice, ``sim/live_vs_sim.py``), and the
``NAME[:KEY=VALUE...]`` flags that override them.

* ``policies.migration`` plans every 0.5 s, the live Controller's policy tick (``Simulator``'s
  ``migration_interval_s`` default), and its moves run the config's protocol knobs (``sim/migration.py``).
* ``policies.reroling`` is read as the live Controller reads it (``scheduler.policy.scaling.reroling_policy``:
  ``interval_s`` between checks, the rest the policy's), and switches cost what a live one costs
  (``AS_LIVE_REROLING``).

Each run (and each goodput probe) gets fresh policy objects: their rate limits, cooldowns and sustain clocks
remember.
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Callable
from typing import TYPE_CHECKING

from scheduler.config.models import ClusterConfig, PolicySpec
from scheduler.policy.scaling import SIM_REROLING_REMEDY, reroling_policy
from scheduler.transfer.migration import migration_policy
from sim.migration import migration_stats

if TYPE_CHECKING:
    from sim.simulator import Simulator

# A live switch costs the drain only: no engine restart (every backend exports and imports KV whatever its role),
# and a switching decoder's requests move only by a configured migration policy's drain trigger, otherwise they
# finish in place (scheduler/control/reroling.py). ``RerolingDriver``'s defaults (a 10 s switch, its own hand-off)
# model a restarting engine instead; ``llmsched bench rerole-live`` compares live with these.
AS_LIVE_REROLING: dict[str, object] = {"switch_delay_s": 0.0, "handoff": False}


def router_spec(spec: str, *, what: str = "router") -> tuple[str, dict[str, object]]:
    """``--routers`` / ``--migration`` / ``--reroling`` entry -> (name, params): ``name:key=value[:key=value...]``
    sets constructor parameters (``llumnix:metric=remaining_steps``); a value reads as JSON (numbers, ``true``,
    ``null``) or else as a string. Segments without ``=`` stay in the name, so ``package.module:Class`` (and
    ``package.module:Class:key=value``) still work. ``what``: the errors' name of it (``--migration``).

    Raises:
        ValueError: an empty key, or a key given twice.
    """
    parts = spec.split(":")
    name = ":".join(p for p in parts if "=" not in p)
    params: dict[str, object] = {}
    for p in parts:
        if "=" not in p:
            continue
        key, _, raw = p.partition("=")
        key = key.strip()
        if not key or key in params:
            raise ValueError(f"{what} {spec!r}: {'empty' if not key else 'repeated'} parameter name in {p!r}")
        try:
            params[key] = json.loads(raw)
        except ValueError:
            params[key] = raw
    return name, params


# The periodic policies the simulating commands run beside the router, from the config or their flags.
POLICY_FIELDS = ("migration", "reroling")


def add_policy_args(p: argparse.ArgumentParser, *, where: str) -> None:
    """``--migration`` and ``--reroling``: policies over the config's (``policy_flags``); ``where``: what runs them."""
    p.add_argument("--migration", metavar="NAME[:KEY=VALUE...]",
                   help=f"live migration {where}, over the config's policies.migration "
                   "(llumnix, llumnix:high_watermark=0.3:balance_gap=0.1; none: without)")
    p.add_argument("--reroling", metavar="NAME[:KEY=VALUE...]",
                   help=f"P/D re-roling {where}, over the config's policies.reroling (threshold, "
                   "threshold:interval_s=2:sustain_s=2; none: without); P/D clusters only, not with autoscaling")


def policy_flags(config: ClusterConfig, args: argparse.Namespace) -> tuple[ClusterConfig, tuple[str, ...]]:
    """``config`` with each policy a command's ``--migration`` / ``--reroling`` gives (``router_spec``'s syntax) as
    its ``policies.<field>`` (``none`` removes it), and the fields they set (``sim_policies``' ``flags``). A bad
    flag raises ``ValueError`` naming it."""
    flags = tuple(f for f in POLICY_FIELDS if getattr(args, f) is not None)
    update: dict[str, PolicySpec | None] = {}
    for field in flags:
        name, params = router_spec(getattr(args, field), what=f"--{field}")
        if name == "none" and params:  # nothing would read them
            raise ValueError(f"--{field} none: takes no parameters, got {', '.join(params)}")
        update[field] = None if name == "none" else PolicySpec(name=name, params=params)
    return config.model_copy(update={"policies": config.policies.model_copy(update=update)}), flags


def policy_specs(config: ClusterConfig) -> dict[str, dict[str, object]]:
    """``<field>_policy``: the spec of each periodic policy ``config`` sets, as ``simulate``, ``compare`` and ``plan``
    write it (and ``llmsched run``'s report, ``live_policies``)."""
    return {f"{k}_policy": spec.model_dump() for k in POLICY_FIELDS if (spec := getattr(config.policies, k)) is not None}


def migration_factory(config: ClusterConfig):
    """A zero-argument factory of the config's ``policies.migration`` (fresh state per run: its rate limits and
    cooldowns remember), or ``None`` when the config has none (or ``none``)."""
    spec = config.policies.migration
    if spec is None or spec.name == "none":
        return None
    migration_policy(config)  # fail fast on bad parameters
    return lambda: migration_policy(config)


def sim_policies(config: ClusterConfig, *, flags: tuple[str, ...] = ()) -> Callable[[], dict[str, object]]:
    """A factory of one run's ``Simulator`` keywords for the config's migration and re-roling policies (fresh
    objects per call), for callers to splat: ``{}`` when it has neither, the plain run bit for bit. ``flags``: the
    fields a command's flags set (``policy_flags``), which its errors name instead.

    Raises:
        ValueError: a bad policy or parameter, naming ``policies.migration`` / ``policies.reroling`` (or the flag);
            re-roling beside ``policies.scaling`` (``reroling_policy``).
    """
    try:
        migration = migration_factory(config)
    except (TypeError, ValueError) as e:  # an unknown parameter is a TypeError
        raise ValueError(flag_named(f"policies.migration: {e}", "migration", flags)) from None
    try:
        rerole = reroling_policy(config, remedy=SIM_REROLING_REMEDY) is not None  # fails fast, naming the field
    except ValueError as e:
        raise ValueError(flag_named(str(e), "reroling", flags)) from None

    def kwargs() -> dict[str, object]:
        kw: dict[str, object] = {}
        if migration is not None:
            kw["migration"] = migration()
        if rerole:
            policy, loop = reroling_policy(config)  # type: ignore[misc]
            kw.update(reroling=policy, reroling_interval_s=loop.interval_s, reroling_options=dict(AS_LIVE_REROLING))
        return kw

    return kwargs


def flag_named(message: str, field: str, flags: tuple[str, ...]) -> str:
    """``message`` naming ``--<field>`` for ``policies.<field>`` (and its ``.name`` / ``.params``) when the flag set
    it (``flags``: ``policy_flags``'): the user typed no config key. ``sim_policies``' errors and ``plan``'s note
    on MIXED candidates use it."""
    if field not in flags:
        return message
    return re.sub(rf"^policies\.{field}(\.name|\.params)?", f"--{field}", message)


def policy_stats(sim: Simulator, config: ClusterConfig | None = None, *, switches: bool = True) -> dict[str, object]:
    """A run's ``migration`` and ``reroling`` stats, for those of its policies that ran (the keys of ``simulate``'s
    summary and ``compare``'s rows). ``config``: the run's, each stat followed by its policy's spec
    (``migration_policy``, ``reroling_policy``: ``simulate``'s summary); ``switches``: with the re-roling's list of
    switches, not its counts only."""
    specs = policy_specs(config) if config is not None else None
    out: dict[str, object] = {}
    if sim.migrations is not None:
        out["migration"] = migration_stats(sim.migrations)
        if specs is not None:
            out["migration_policy"] = specs["migration_policy"]
    if sim.reroler is not None:
        r = sim.reroler.summary()
        out["reroling"] = r if switches else {k: v for k, v in r.items() if k != "switches"}
        if specs is not None:
            out["reroling_policy"] = specs["reroling_policy"]
    return out


__all__ = ["AS_LIVE_REROLING", "POLICY_FIELDS", "add_policy_args", "flag_named", "migration_factory",
           "policy_flags", "policy_specs", "policy_stats", "router_spec", "sim_policies"]
