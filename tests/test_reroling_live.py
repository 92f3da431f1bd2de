"""Dynamic re-roling on a real local Ray cluster (simulated backend): ``RerolePolicy`` applied by the Controller
(``scheduler.control.reroling``), and an operator's ``switch_role``. Every request's stream is checked exactly."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

ray = pytest.importorskip("ray")

from scheduler.config.models import ClusterConfig
from scheduler.control.api import InvalidRequest, NotFound
from scheduler.control.reroling import RoleSwitcher
from scheduler.core.types import InstanceRole
from tests.test_control_plane import GPUS, MODEL, _check_exact, _collect, _deploy, _req

POLICY = {"name": "threshold", "params": {
    "interval_s": 0.2, "sustain_s": 0.4, "cooldown_s": 1.0, "prefill_high_tokens": 3000, "prefill_low_tokens": 256,
    "decode_low": 0.5, "decode_high": 0.9, "switch_timeout_s": 20.0}}


def _cfg(pools: list[dict[str, Any]], **policies: Any) -> ClusterConfig:
    return ClusterConfig.model_validate(
        {"name": "rerole", "gpus": GPUS, "model": MODEL, "pools": pools, "policies": policies})


PD = [{"name": "prefill", "role": "prefill", "gpu": "a100", "tp": 1, "count": 1},
      {"name": "decode", "role": "decode", "gpu": "a100", "tp": 1, "count": 2}]


class _Ctrl:  # what RoleSwitcher.from_config reads of a Controller
    def __init__(self, cfg: ClusterConfig) -> None:
        self.config = cfg


@pytest.mark.parametrize(("pools", "policies", "match"), [
    (PD, {"reroling": {"name": "nope"}}, r"policies.reroling.name: unknown re-roling policy 'nope'"),
    (PD, {"reroling": POLICY, "scaling": {"name": "threshold"}},
     r"policies.reroling \(threshold\): not with policies.scaling \(threshold\): .*drop one of the two$"),
    ([{"name": "m", "role": "mixed", "gpu": "a100", "count": 2}], {"reroling": POLICY},
     r"policies.reroling: needs a PREFILL and a DECODE pool"),
    (PD, {"reroling": {"name": "threshold", "params": {"decode_hihg": 1}}}, r"policies.reroling.params: .*decode_hihg"),
    (PD, {"reroling": {"name": "threshold", "params": {"interval_s": 0}}}, r"policies.reroling.params: need interval_s"),
])
def test_bad_reroling_config_names_the_field(pools: Any, policies: Any, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        RoleSwitcher.from_config(_Ctrl(_cfg(pools, **policies)))  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def rerole(local_ray: Any, aloop: Any) -> Any:
    dep = _deploy(_cfg(PD, reroling=POLICY))
    ing = dep.make_ingress()
    aloop.run(ing.start())
    yield dep, ing
    aloop.run(ing.close())
    dep.shutdown()


def _roles(dep: Any) -> dict[str, str]:
    return {i: m.info.role.value for i, m in ray.get(dep.controller.members.remote()).items()}


def _wait_event(dep: Any, action: str, n: int, timeout_s: float = 20.0) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        ev = ray.get(dep.controller.scaling_events.remote())
        if sum(e["action"] == action for e in ev) >= n:
            return ev
        time.sleep(0.1)
    raise AssertionError(f"no {n} x {action!r} in {ray.get(dep.controller.scaling_events.remote())}")


@pytest.mark.e2e
@pytest.mark.timeout(120)
def test_prefill_pressure_moves_a_decoder_to_prefill_without_losing_requests(rerole: Any, aloop: Any) -> None:
    dep, ing = rerole
    assert _roles(dep) == {"prefill-0": "prefill", "decode-0": "decode", "decode-1": "decode"}

    async def waves() -> tuple[list[Any], list[Any]]:
        # 16 x 2000-token prompts queue on the one PREFILL instance (~0.1 s each at time_scale 0.5): the
        # policy sees > 3000 queued prompt tokens per PREFILL instance with idle decoders and moves one over.
        first = [asyncio.ensure_future(_collect(ing, _req(f"w1-{i}", 2000, 4))) for i in range(16)]
        t0 = time.monotonic()
        while not any(e["action"] == "role_switched" for e in await dep.controller.scaling_events.remote()):
            assert time.monotonic() - t0 < 30, "no role switch"
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.2)  # the ingress' view picks the new role up (refresh every 25 ms)
        second = [asyncio.ensure_future(_collect(ing, _req(f"w2-{i}", 2000, 4))) for i in range(8)]
        return await asyncio.gather(*first), await asyncio.gather(*second)

    first, second = aloop.run(waves(), timeout=90)
    for i, chunks in enumerate(first):
        _check_exact(chunks, f"w1-{i}", 4)
    for i, chunks in enumerate(second):
        _check_exact(chunks, f"w2-{i}", 4)
    ev = ray.get(dep.controller.scaling_events.remote())
    (switch,) = [e for e in ev if e["action"] == "role_switch"]
    assert switch["from"] == "decode" and switch["to"] == "prefill" and "prefill pool saturated" in switch["reason"]
    moved = switch["instance"]
    assert _roles(dep)[moved] == "prefill"
    snap = {s.instance_id: s for s in ray.get(dep.controller.view.remote()).instances}[moved]
    assert snap.role is InstanceRole.PREFILL and not snap.draining
    # After the switch the new PREFILL instance takes prompts (token 0 comes from the prefill side); how many
    # depends on what prefill-0 still has queued from the first wave.
    assert moved in {c[0].instance_id for c in second} <= {"prefill-0", moved}
    assert ray.get(dep.controller.scaling_counters.remote())["role_switches"] == 1


@pytest.mark.e2e
@pytest.mark.timeout(120)
def test_operator_switch_waits_for_the_running_request_and_keeps_a_decoder(rerole: Any, aloop: Any) -> None:
    dep, ing = rerole
    ctrl = dep.controller
    n = sum(e["action"] == "role_switched" for e in ray.get(ctrl.scaling_events.remote()))
    # After the policy's switch: 2 PREFILL + 1 DECODE. An idle PREFILL instance goes back to DECODE at once.
    moved = next(i for i, r in _roles(dep).items() if r == "prefill" and i != "prefill-0")
    assert ray.get(ctrl.switch_role.remote(moved, "decode"))
    _wait_event(dep, "role_switched", n + 1)
    assert sorted(_roles(dep).values()) == ["decode", "decode", "prefill"]

    async def run() -> tuple[str, list[Any]]:
        # A long decode runs on one decoder; the operator asks that decoder to become PREFILL: it drains, the
        # stream finishes there untouched, and only then does the role change.
        where: asyncio.Future[str] = asyncio.get_running_loop().create_future()

        async def on_chunk(c: Any, _out: Any) -> None:
            if c.index >= 1 and not where.done():
                where.set_result(c.instance_id)

        task = asyncio.ensure_future(_collect(ing, _req("op-long", 64, 120), on_chunk))
        decoder = await asyncio.wait_for(where, 10)
        assert await ctrl.switch_role.remote(decoder, "prefill")
        assert not await ctrl.switch_role.remote(decoder, "prefill")  # already switching
        await asyncio.sleep(0.3)
        assert _roles(dep)[decoder] == "decode" and not task.done()  # still draining, stream still running
        return decoder, await task

    decoder, chunks = aloop.run(run(), timeout=60)
    _check_exact(chunks, "op-long", 120)
    assert {c.instance_id for c in chunks[1:]} == {decoder}
    _wait_event(dep, "role_switched", n + 2)
    assert _roles(dep)[decoder] == "prefill"
    _check_exact(aloop.run(_collect(ing, _req("op-after", 64, 8))), "op-after", 8)
    # Bad input (through the ingress, as the admin API calls it) names the field; the last decoder stays.
    (last,) = [i for i, r in _roles(dep).items() if r == "decode"]
    cases = [(last, "prefill", InvalidRequest, f"instance_id: {last} is the last instance serving decode"),
             ("nope", "prefill", NotFound, "instance_id: no live instance 'nope'"),
             (last, "mixed", InvalidRequest, "role: only PREFILL <-> DECODE"),
             (last, "sideways", InvalidRequest, "role: unknown instance role 'sideways'")]
    for iid, role, err, msg in cases:
        with pytest.raises(err, match=msg) as info:
            aloop.run(ing.switch_role(iid, role))
        assert info.value.field == msg.split(":")[0]
    assert _roles(dep)[last] == "decode"
