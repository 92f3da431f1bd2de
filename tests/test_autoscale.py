"""Autoscaling: pools -> KubeRay worker replicas (pure), the applier against recorded API responses through the real
``kubernetes`` client call paths (kmock, see tests/test_k8s.py), and the Controller's scaling loop on a small
local Ray cluster with the simulated backend (e2e).
"""

from __future__ import annotations

import asyncio
import json
import pickle
import time
from typing import Any

import pytest

from scheduler.config.models import ClusterConfig
from scheduler.deploy.autoscale import (
    KubernetesBackend,
    WorkerGroupApplier,
    desired_worker_replicas,
    gpus_needed,
    nodes_for,
)

MODEL = {
    "name": "llama-7b", "num_layers": 32, "hidden_size": 4096, "num_heads": 32, "num_kv_heads": 32,
    "intermediate_size": 11008, "vocab_size": 32000, "max_model_len": 4096,
}
GPUS = {
    "h100": {"name": "h100", "memory_gib": 80, "fp16_tflops": 989, "hbm_gbps": 3350},
    "a100": {"name": "a100", "memory_gib": 80, "fp16_tflops": 312, "hbm_gbps": 2039},
}


def _config(pools: list[dict[str, Any]], **extra: Any) -> ClusterConfig:
    return ClusterConfig.model_validate({"name": "t", "gpus": GPUS, "model": MODEL, "pools": pools, **extra})


# Heterogeneous P/D: prefill on H100 with TP=2, decode on A100 with TP=1 (the recorded RayCluster's groups).
HETERO = _config([
    {"name": "prefill", "role": "prefill", "gpu": "h100", "tp": 2, "count": 3},
    {"name": "decode", "role": "decode", "gpu": "a100", "tp": 1, "count": 10},
])


# ---- (a) desired replicas from configs ---------------------------------------------------------------------------------
def test_desired_replicas_heterogeneous_pools_round_up_to_whole_nodes() -> None:
    # h100: 3 x TP2 = 6 GPUs on 8-GPU nodes -> 1 node; a100: 10 x TP1 = 10 GPUs -> 2 nodes (not 1.25).
    assert gpus_needed(HETERO) == {"a100": 10, "h100": 6}
    assert desired_worker_replicas(HETERO, gpus_per_worker={"h100": 8, "a100": 8}) == {"a100": 2, "h100": 1}
    # The Controller's desired counts override the config's.
    counts = {"prefill": 5, "decode": 16}
    assert desired_worker_replicas(HETERO, counts, gpus_per_worker={"h100": 8, "a100": 8}) == {"a100": 2, "h100": 2}
    assert desired_worker_replicas(HETERO, {"prefill": 0, "decode": 17},
                                   gpus_per_worker={"h100": 8, "a100": 8}) == {"a100": 3, "h100": 0}


def test_desired_replicas_tp_packing_and_shared_gpu_type() -> None:
    # Two pools on one GPU type share its worker group: 2 x TP4 + 3 x TP2 = 14 GPUs -> 2 nodes of 8.
    cfg = _config([
        {"name": "big", "role": "mixed", "gpu": "a100", "tp": 4, "count": 2},
        {"name": "small", "role": "mixed", "gpu": "a100", "tp": 2, "count": 3},
    ])
    assert desired_worker_replicas(cfg, gpus_per_worker={"a100": 8}) == {"a100": 2}
    # An instance never spans nodes: TP=4 on 6-GPU nodes is one instance per node (8 GPUs, but 2 nodes).
    cfg4 = _config([{"name": "m", "role": "mixed", "gpu": "a100", "tp": 4, "count": 2}])
    assert desired_worker_replicas(cfg4, gpus_per_worker={"a100": 6}) == {"a100": 2}
    assert nodes_for([3, 3, 2, 1, 1], 4) == 3 and nodes_for([], 8) == 0 and nodes_for([8] * 3, 8) == 3
    # A group name that differs from the GPU type.
    assert desired_worker_replicas(cfg, gpus_per_worker={"gpu-a100": 4}, group_of={"a100": "gpu-a100"}) == {
        "gpu-a100": 4
    }


def test_desired_replicas_errors_name_the_pool() -> None:
    with pytest.raises(ValueError, match=r"pool 'prefill': tp 2 exceeds 1 GPUs per 'h100' worker node"):
        desired_worker_replicas(HETERO, gpus_per_worker={"h100": 1, "a100": 8})
    with pytest.raises(ValueError, match=r"pool 'decode': no GPUs-per-worker figure for worker group 'a100'"):
        desired_worker_replicas(HETERO, gpus_per_worker={"h100": 8})


def test_fake_local_cluster_starts_the_nodes_its_pools_pack_onto() -> None:
    """``serve --fake-gpus-per-node`` started one fake node per GPU type whatever the pools: HETERO's 3 x TP2
    prefill on 4-GPU nodes placed two instances and left the third waiting for good. It starts what a KubeRay
    worker group would be sized to now; ``nodes`` still sets the number."""
    from scheduler.control.cluster import nodes_for as local_nodes

    nodes = local_nodes(HETERO, fake_gpus_per_node=4)
    started = {t: sum(n.gpu == t for n in nodes) for t in ("h100", "a100")}
    assert started == desired_worker_replicas(HETERO, gpus_per_worker={"h100": 4, "a100": 4})
    assert all(n.num_gpus == 4 for n in nodes) and started["h100"] > 1
    assert len(local_nodes(HETERO, fake_gpus_per_node=4, nodes=1)) == 2
    idle = _config([{"name": "m", "role": "mixed", "gpu": "a100", "tp": 1, "count": 0}])
    assert len(local_nodes(idle, fake_gpus_per_node=4)) == 1  # a pool scaling may start still gets its node


def test_kubernetes_backend_from_env_and_pickles() -> None:
    assert KubernetesBackend.from_env({}) is None
    b = KubernetesBackend.from_env({"LLMSCHED_RAYCLUSTER": "pd-llmsched", "LLMSCHED_NAMESPACE": "llmsched"})
    assert b is not None and (b.namespace, b.cluster, b.host) == ("llmsched", "pd-llmsched", None)
    assert b.pdb_max_unavailable is None  # the chart's PDBs off: left alone
    env = {"LLMSCHED_RAYCLUSTER": "rc", "LLMSCHED_NAMESPACE": "ns", "LLMSCHED_PDB_MAX_UNAVAILABLE": "2"}
    assert KubernetesBackend.from_env(env).pdb_max_unavailable == 2  # type: ignore[union-attr]
    bad = KubernetesBackend.from_env({**env, "LLMSCHED_PDB_MAX_UNAVAILABLE": "-1"})  # resizes still, PDBs as rendered
    assert bad is not None and bad.cluster == "rc" and bad.pdb_max_unavailable is None
    b2 = pickle.loads(pickle.dumps(KubernetesBackend("ns", "rc", host="http://127.0.0.1:1")))
    assert b2.cluster == "rc" and b2._applier is None


def test_sla_scaler_keys_pools_by_name_as_the_controller_does() -> None:
    # The Controller keys pools by PoolSpec.name; the SLA scaler must still size "pf" with prefill capacity.
    from scheduler.policy.scaling import SLAScaler, WorkloadSummary

    cfg = _config([
        {"name": "pf", "role": "prefill", "gpu": "h100", "tp": 2, "count": 1},
        {"name": "dc", "role": "decode", "gpu": "a100", "tp": 1, "count": 1},
    ])
    by_name = SLAScaler(config=cfg).targets({"pf", "dc"}, WorkloadSummary(40.0, 2000, 200))
    by_role = SLAScaler(config=cfg).targets({"prefill", "decode"}, WorkloadSummary(40.0, 2000, 200))
    assert by_name == {"pf": by_role["prefill"], "dc": by_role["decode"]}


# ---- (b) the applier against recorded API responses -------------------------------------------------------------------
kmock = pytest.importorskip("kmock")
client = pytest.importorskip("kubernetes.client")

from tests.test_k8s import NAME, NS, RC, _load, _Server

RC_PATH = f"/apis/ray.io/v1/namespaces/{NS}/rayclusters/{NAME}"


@pytest.fixture
def rc_server() -> Any:
    with _Server() as s:
        s.k8s.objects[RC, NS, NAME] = _load("raycluster-pd.json")
        yield s


def _applier(server: Any) -> WorkerGroupApplier:
    from scheduler.deploy.k8s import KubeRayScaler

    return WorkerGroupApplier(KubeRayScaler(client.CustomObjectsApi(server.api_client()), NS, NAME))


def _patches(server: Any) -> list[Any]:
    return [r for r in server.requests() if str(r.method).upper().endswith("PATCH")]


def _groups(server: Any) -> dict[str, dict[str, Any]]:
    return {g["groupName"]: g for g in server.k8s.objects[RC, NS, NAME]["spec"]["workerGroupSpecs"]}


def test_gpus_per_worker_read_from_the_recorded_group_spec(rc_server: Any) -> None:
    plan = _applier(rc_server).plan(HETERO)
    # Recorded: h100 1 replica (min 1, max 3), a100 2 replicas (min 1, max 6), 8 GPUs per worker.
    assert {g: (p.current, p.needed, p.target) for g, p in plan.items()} == {"a100": (2, 2, 2), "h100": (1, 1, 1)}


def test_scale_up_patches_the_group_replicas(rc_server: Any) -> None:
    res = _applier(rc_server).grow(HETERO, {"prefill": 3, "decode": 20})  # 20 GPUs -> 3 a100 nodes
    assert [(r.group, r.previous, r.replicas) for r in res] == [("a100", 2, 3)]
    assert _groups(rc_server)["a100"]["replicas"] == 3 and _groups(rc_server)["h100"]["replicas"] == 1
    (patch,) = _patches(rc_server)
    assert str(patch.url).endswith(RC_PATH)
    assert patch.headers["Content-Type"] == "application/json-patch+json"
    assert patch.data == [
        {"op": "test", "path": "/spec/workerGroupSpecs/1/groupName", "value": "a100"},
        {"op": "add", "path": "/spec/workerGroupSpecs/1/replicas", "value": 3},
    ]
    # grow never lowers: fewer instances leave the groups alone.
    assert _applier(rc_server).grow(HETERO, {"prefill": 1, "decode": 1}) == []
    assert len(_patches(rc_server)) == 1


def test_scale_up_is_capped_at_max_replicas(rc_server: Any) -> None:
    res = _applier(rc_server).grow(HETERO, {"prefill": 20, "decode": 1})  # 40 GPUs -> 5 h100 nodes, max 3
    assert [(r.group, r.replicas) for r in res] == [("h100", 3)]


def test_scale_down_names_the_idle_workers(rc_server: Any) -> None:
    applier = _applier(rc_server)
    # 3 decode instances need 1 a100 node of the 2; the Controller knows which pod hosts none of them.
    res = applier.shrink(HETERO, {"prefill": 3, "decode": 3},
                         idle_workers={"a100": ["pd-llmsched-a100-worker-x7k2p"], "h100": []})
    assert [(r.group, r.previous, r.replicas) for r in res] == [("a100", 2, 1)]
    g = _groups(rc_server)["a100"]
    assert g["replicas"] == 1
    assert g["scaleStrategy"] == {"workersToDelete": ["pd-llmsched-a100-worker-x7k2p"]}
    (patch,) = _patches(rc_server)
    assert patch.data[-1] == {"op": "add", "path": "/spec/workerGroupSpecs/1/scaleStrategy",
                              "value": {"workersToDelete": ["pd-llmsched-a100-worker-x7k2p"]}}


def test_scale_down_never_gives_up_a_busy_worker(rc_server: Any) -> None:
    applier = _applier(rc_server)
    # Needed: 0 a100 nodes (clamped to minReplicas 1), but no a100 pod is idle: nothing is patched.
    assert applier.shrink(HETERO, {"prefill": 3, "decode": 0}, idle_workers={"a100": []}) == []
    assert applier.shrink(HETERO, {"prefill": 3, "decode": 0}, idle_workers={}) == []
    assert _patches(rc_server) == []
    # Unknown idle pods (None): shrink to the bound and let KubeRay pick.
    res = applier.shrink(HETERO, {"prefill": 3, "decode": 0}, idle_workers=None)
    assert [(r.group, r.replicas) for r in res] == [("a100", 1)]
    assert "scaleStrategy" not in _groups(rc_server)["a100"]


def test_no_op_when_already_right(rc_server: Any) -> None:
    applier = _applier(rc_server)
    assert applier.grow(HETERO) == [] and applier.shrink(HETERO, idle_workers={"a100": ["x"], "h100": ["y"]}) == []
    methods = [str(r.method).upper() for r in rc_server.requests()]
    assert methods and all(m.endswith("GET") for m in methods)  # reads only
    assert dict(rc_server.k8s.objects[RC, NS, NAME]) == _load("raycluster-pd.json")


def test_conflict_is_retried_after_a_fresh_read(rc_server: Any) -> None:
    # The first patch meets a conflicting write (409); the scaler re-reads and patches again.
    conflict = {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Conflict", "code": 409,
                "message": "the object has been modified"}
    rc_server.k8s[f"patch {RC_PATH}"][:1] << 409 << conflict
    res = _applier(rc_server).grow(HETERO, {"prefill": 3, "decode": 24})
    assert [(r.group, r.replicas, r.attempts) for r in res] == [("a100", 3, 2)]
    assert len(_patches(rc_server)) == 2
    assert _groups(rc_server)["a100"]["replicas"] == 3
    gets = [r for r in rc_server.requests() if str(r.method).upper().endswith("GET")]
    assert len(gets) == 3  # plan + one read per patch attempt


def test_missing_worker_group_is_a_clear_error(rc_server: Any) -> None:
    cfg = _config([{"name": "m", "role": "mixed", "gpu": "l4", "tp": 1, "count": 1}],
                  gpus={"l4": {"name": "l4", "memory_gib": 24, "fp16_tflops": 121, "hbm_gbps": 300}})
    with pytest.raises(ValueError, match=f"RayCluster {NS}/{NAME}: no worker group for GPU type.*l4.*h100, a100"):
        _applier(rc_server).grow(cfg)


def test_kubernetes_backend_reaches_the_api_by_host(rc_server: Any) -> None:
    backend = KubernetesBackend(NS, NAME, host=rc_server.url)
    assert [(r.group, r.replicas) for r in backend.grow(HETERO, {"prefill": 7, "decode": 1})] == [("h100", 2)]


# ---- (c) the Controller's scaling loop on a local Ray cluster ---------------------------------------------------------
@pytest.mark.e2e
@pytest.mark.timeout(120)
def test_controller_scales_up_under_load_and_back_down_without_losing_requests(aloop: Any) -> None:
    ray = pytest.importorskip("ray")

    from scheduler.control.cluster import Deployment, NodeSpec, start_ray
    from scheduler.control.controller import NAMESPACE, Controller
    from scheduler.engine.base import SamplingParams
    from tests.test_control_plane import GenerateRequest, _check_exact, _collect

    # One fake A100 per Ray worker node, two nodes: each instance gets its own node, so after the scale-down
    # the released instance's node is idle and the worker group shrinks by naming it.
    cfg = _config(
        [{"name": "mixed", "role": "mixed", "gpu": "a100", "tp": 1, "count": 1,
          "engine": {"num_kv_blocks": 64, "max_num_seqs": 8}}],
        policies={"scaling": {"name": "threshold", "params": {
            "scaling_interval_s": 0.25, "scale_up": 0.6, "scale_down": 0.05, "sustain_s": 0.5,
            "cooldown_s": 1.0, "startup_delay_s": 0.5, "min_instances": 1, "max_instances": 2,
            "drain_timeout_s": 20.0}}},
    )
    SIM = {"simulated": {"time_scale": 1.0}}
    if ray.is_initialized():
        ray.shutdown()
    rt = start_ray([NodeSpec("a100", 1), NodeSpec("a100", 1)], head_cpus=2)
    with _Server() as k8s:
        rc = _load("raycluster-pd.json")
        rc["spec"]["workerGroupSpecs"][1]["replicas"] = 1
        k8s.k8s.objects[RC, NS, NAME] = rc
        backend = KubernetesBackend(NS, NAME, host=k8s.url, gpus_per_worker={"a100": 1})
        ctrl = (
            ray.remote(Controller)
            .options(name="llmsched-controller-autoscale", namespace=NAMESPACE, max_restarts=0, num_cpus=0,
                     max_concurrency=1000)
            .remote(cfg, cluster="autoscale", backend_kwargs=SIM, refresh_s=0.05,
                    kubernetes=backend)
        )
        dep = Deployment(cfg, ctrl, "autoscale", NAMESPACE, "llmsched-controller-autoscale",
                         ray.get(ctrl.ready.remote(60), timeout=70), SIM)
        ing = dep.make_ingress()
        try:
            aloop.run(ing.start())
            assert sorted(ray.get(ctrl.members.remote())) == ["mixed-0"]

            N_OUT = 96

            def req(i: int) -> Any:
                return GenerateRequest(f"as-{i}", prompt_token_ids=tuple(range(1, 257)),
                                       sampling=SamplingParams(max_tokens=N_OUT))

            async def load() -> list[list[Any]]:
                # A burst that fills mixed-0's KV (and queues), then a second wave once a new instance exists.
                first = [asyncio.ensure_future(_collect(ing, req(i))) for i in range(12)]
                t0 = time.monotonic()
                while len(await ctrl.members.remote()) < 2 and time.monotonic() - t0 < 15:
                    await asyncio.sleep(0.1)
                await ing._refresh_members()
                second = [asyncio.ensure_future(_collect(ing, req(100 + i))) for i in range(6)]
                return await asyncio.gather(*first, *second)

            results = aloop.run(load(), timeout=60)
            ids = [f"as-{i}" for i in range(12)] + [f"as-{100 + i}" for i in range(6)]
            for rid, chunks in zip(ids, results):
                _check_exact(chunks, rid, N_OUT)  # every request completes, every token once, in order

            events = ray.get(ctrl.scaling_events.remote())
            assert any(e["action"] == "up" and e["to"] == 2 for e in events), events
            assert any(e["action"] == "k8s_grow" and e["group"] == "a100" and e["to"] == 2 for e in events), events

            # Idle now: below scale_down -> one instance drains, is released, and its worker pod is given up.
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                ev = ray.get(ctrl.scaling_events.remote())
                if any(e["action"] == "k8s_shrink" for e in ev):
                    break
                time.sleep(0.2)
            ev = ray.get(ctrl.scaling_events.remote())
            assert [e["action"] for e in ev if e["action"] in ("down", "released")] == ["down", "released"], ev
            assert len(ray.get(ctrl.members.remote())) == 1
            a100 = {g["groupName"]: g for g in k8s.k8s.objects[RC, NS, NAME]["spec"]["workerGroupSpecs"]}["a100"]
            assert a100["replicas"] == 1 and len(a100["scaleStrategy"]["workersToDelete"]) == 1
            stats = ray.get(ctrl.scaling_counters.remote())
            assert stats["forced_releases"] == 0 and stats["k8s_errors"] == 0, stats
            assert json.dumps(ev)  # events are plain data (admin/debug output)
        finally:
            aloop.run(ing.close())
            dep.shutdown()
            rt.shutdown()


def _fake_controller(n: int, desired: int, **kw: Any) -> tuple[Any, list[int], list[Any]]:
    """The shared fake Controller (tests/test_controller_audit) with ``n`` MIXED members, its start path recorded:
    the counts asked of ``_set_desired``, and the instances."""
    from tests.test_controller_audit import FakeInstance, _controller

    insts = [FakeInstance(f"mixed-{i}") for i in range(n)]
    ctrl = _controller(insts, {"mixed": desired}, **kw)
    asked: list[int] = []

    async def set_desired(pool: str, count: int) -> int:
        asked.append(count)
        return count

    async def reconcile(*, wait: bool) -> None:
        pass

    ctrl._set_desired, ctrl._reconcile = set_desired, reconcile
    return ctrl, asked, insts


def test_controller_clamps_a_decision_to_the_policys_bounds() -> None:
    """The policy decides from its view, which lags an instance placed but not yet snapshotted: its +1 applied to
    the controller's own count must not pass the policy's max_instances (seen: 1 -> 2 -> 3 with a max of 2), nor a
    -1 its min_instances."""
    from scheduler.policy.scaling import ScaleDecision, ThresholdScaler

    ctrl, asked, insts = _fake_controller(2, 2)  # mixed-1 placed, its first snapshot not in yet (no snapshots at all)
    ctrl._scaling = ThresholdScaler(min_instances=1, max_instances=2)

    asyncio.run(ctrl._apply_scale(ScaleDecision("mixed", delta=1, reason="view saw one")))
    assert asked == [] and ctrl.scaling_stats["up"] == 0  # already at max_instances
    asyncio.run(ctrl._apply_scale(ScaleDecision("mixed", delta=-5, reason="idle")))
    assert len(ctrl._draining) == 1 and sum(i.draining for i in insts) == 1  # down to min_instances = 1, not to 0
    assert ctrl._scaling_events[-1]["to"] == 1


def test_controller_takes_a_draining_instance_back_before_starting_one() -> None:
    """A scale-up while an instance of the pool still drains takes it back (it is up and warm; a start costs the
    model's load) -- as the simulator's applier does and as the policies book it -- and starts only the rest."""
    from scheduler.policy.scaling import ScaleDecision, ThresholdScaler

    ctrl, asked, insts = _fake_controller(3, 3)
    ctrl._scaling = ThresholdScaler(min_instances=1, max_instances=8)
    insts[2].draining = True
    ctrl._draining = {"mixed-2": (time.time() + 120.0, 0)}

    asyncio.run(ctrl._apply_scale(ScaleDecision("mixed", delta=1, reason="busy")))
    assert not insts[2].draining and not ctrl._draining and asked == []  # taken back, nothing started
    assert ctrl._scaling_events[-1]["undrained"] == ["mixed-2"]
    asyncio.run(ctrl._apply_scale(ScaleDecision("mixed", delta=2, reason="busier")))
    assert asked == [5]  # nothing left draining: two new ones
