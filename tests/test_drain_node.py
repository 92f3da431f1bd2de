"""Admin DrainNode on a real multi-node local Ray cluster (a worker pod's preStop hook, ``kubectl drain``).

Three worker nodes with one fake a100 each and a 2-instance MIXED pool (simulated backend): one node is spare.
Draining a node migrates its instance's requests onto the other instance (streams exact), releases it and places
the replacement on the spare node -- never back on the drained one (Ray places nothing new there). The tests run
in order and use the nodes up: the last one finds no room for a replacement and keeps the last instance serving.
"""

from __future__ import annotations

import asyncio
import json
import shlex
import time
from collections.abc import Iterator
from typing import Any

import pytest

ray = pytest.importorskip("ray")
grpc = pytest.importorskip("grpc")

from scheduler.config.models import ClusterConfig
from scheduler.control.api import GenerateRequest, InvalidRequest
from scheduler.control.cluster import NodeSpec, deploy, start_ray
from scheduler.engine.base import SamplingParams, TokenChunk
from scheduler.engine.simulated_backend import sim_token

pytestmark = [pytest.mark.timeout(300)]

MODEL = {
    "name": "llama-7b", "num_layers": 32, "hidden_size": 4096, "num_heads": 32, "num_kv_heads": 32,
    "intermediate_size": 11008, "vocab_size": 32000, "max_model_len": 4096,
}
GPUS = {"a100": {"name": "a100", "memory_gib": 80, "fp16_tflops": 312, "hbm_gbps": 2039}}
CONFIG = ClusterConfig.model_validate({
    "name": "dn", "gpus": GPUS, "model": MODEL,
    "pools": [{"name": "mixed", "role": "mixed", "gpu": "a100", "tp": 1, "count": 2}],
})
N = 300  # tokens per request: long enough to be mid-stream when the drain starts


def drain_cluster(aloop: Any, nodes: list[NodeSpec], config: ClusterConfig, time_scale: float) -> Iterator[Any]:
    """A module's own multi-node Ray cluster and deployment of ``config`` (simulated backend): yields
    (runtime, deployment, ingress)."""
    if ray.is_initialized():
        ray.shutdown()
    rt = start_ray(nodes, head_cpus=2)
    dep = deploy(config, name=config.name, controller_name=f"llmsched-controller-{config.name}",
                 backend_kwargs={"simulated": {"time_scale": time_scale}}, refresh_s=0.05)
    ing = dep.make_ingress()
    aloop.run(ing.start())
    try:
        yield rt, dep, ing
    finally:
        aloop.run(ing.close())
        # Before Ray goes: a task left on the loop (a drain's un-drain in its finally) calling Ray after
        # ray.shutdown() auto-connected to the cluster being torn down, and Ray ended the whole pytest process
        # when that raylet died ("Failed to get the system config from raylet because it is dead"; once in CI).
        # tests/conftest.py also turns Ray's auto-connect off: such a call now raises instead of reconnecting.
        aloop.cancel_all()
        dep.shutdown()
        rt.shutdown()


@pytest.fixture(scope="module")
def cluster(aloop: Any) -> Any:
    for _, dep, ing in drain_cluster(aloop, [NodeSpec("a100", 1)] * 3, CONFIG, 0.5):
        yield dep, ing


def _nodes(dep: Any) -> dict[str, str]:
    return {i: m.info.node_id for i, m in ray.get(dep.controller.members.remote()).items()}


def _groups() -> set[str]:
    """The deployment's placement groups not removed (placed or waiting for room)."""
    return {g["name"] for g in ray.util.placement_group_table().values()
            if g["name"].startswith("llmsched/dn/") and g["state"] != "REMOVED"}


def _head() -> str:
    return next(n["NodeID"] for n in ray.nodes() if "node:__internal_head__" in n["Resources"])


async def _collect(ing: Any, rid: str) -> list[TokenChunk]:
    req = GenerateRequest(rid, prompt_token_ids=tuple(range(1, 65)), sampling=SamplingParams(max_tokens=N))
    return [c async for c in ing.generate(req)]


def _check_exact(chunks: list[TokenChunk], rid: str) -> None:
    idx = [c.index + k for c in chunks for k in range(len(c.token_ids))]
    assert idx == list(range(N)), rid
    assert [t for c in chunks for t in c.token_ids] == [sim_token(0, rid, i, MODEL["vocab_size"]) for i in range(N)]
    assert chunks[-1].finished


def test_drain_node_migrates_streams_and_replaces_on_another_node(cluster: Any, aloop: Any) -> None:
    dep, ing = cluster
    before = _nodes(dep)
    assert sorted(before) == ["mixed-0", "mixed-1"] and len(set(before.values())) == 2
    node = before["mixed-0"]

    async def run() -> Any:
        rids = [f"dn-{i}" for i in range(4)]
        tasks = [asyncio.create_task(_collect(ing, r)) for r in rids]
        deadline = time.monotonic() + 30
        # Mid-stream on the node's instance: decoding there, not finished.
        while not any(len(r.output_token_ids) >= 5 for r in ing.registry.on_instance("mixed-0")):
            assert time.monotonic() < deadline, "no request decoding on mixed-0"
            await asyncio.sleep(0.01)
        res = await ing.drain_node(node, deadline_s=60)
        return rids, res, await asyncio.gather(*tasks)

    rids, res, outs = aloop.run(run(), timeout=120)
    assert res.node_id == node and res.drained == ("mixed-0",) and res.kept == {}, res
    assert res.requests_moved >= 1, res
    for rid, out in zip(rids, outs, strict=True):
        _check_exact(out, rid)  # every stream whole and exact across the move
    # The pool keeps its size: the replacement runs on the spare node, never the drained one.
    deadline = time.monotonic() + 60
    while True:
        now = _nodes(dep)
        if len(now) == 2 and "mixed-0" not in now:
            break
        assert time.monotonic() < deadline, now
        time.sleep(0.2)
    assert node not in now.values() and now["mixed-1"] == before["mixed-1"], now


def test_controller_runs_on_the_head_never_on_a_node_a_drain_takes_away(cluster: Any) -> None:
    """The Controller is pinned to the Ray head (a sliver of its ``node:__internal_head__`` resource), as Ray Serve
    pins its own: with ``num_cpus=0`` and nothing else, Ray placed it on any node -- a GPU worker whose DrainNode
    (KubeRay then deletes the pod) killed it mid-drain, and it restarted under the drain it was running."""
    dep, _ = cluster
    assert ray.get(dep.controller.ping.remote(), timeout=10)["node"] == _head()


def test_drain_node_bad_input_names_the_field(cluster: Any, aloop: Any) -> None:
    _, ing = cluster
    for name, why in (("", "must not be empty"), ("no-such-node", "no alive Ray node"), (_head(), "Ray head")):
        with pytest.raises(InvalidRequest, match=f"^node: .*{why}") as e:
            aloop.run(ing.drain_node(name), timeout=30)
        assert e.value.field == "node"
    # All local nodes share one hostname and IP: ambiguous, so the node id is asked for.
    host = next(n["NodeManagerHostname"] for n in ray.nodes() if n["Alive"])
    with pytest.raises(InvalidRequest, match=r"names \d Ray nodes; give the node id"):
        aloop.run(ing.drain_node(host), timeout=30)


def _rendered_prestop(values: dict[str, Any]) -> list[str] | None:
    """The worker pods' preStop command as the chart renders it (argv after ``sh -c``, ``$HOSTNAME`` left)."""
    from scheduler.deploy.chart import DEFAULT_CHART, render_chart

    rendered, findings = render_chart(DEFAULT_CHART, values, "test")
    assert not findings, findings
    (rc,) = [d for d in rendered.manifests if d.get("kind") == "RayCluster"]
    container = rc["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    if "lifecycle" not in container:
        return None
    sh, flag, script = container["lifecycle"]["preStop"]["exec"]["command"]
    assert (sh, flag) == ("sh", "-c")
    argv = shlex.split(script)
    assert argv[:3] == ["exec", "llmsched", "admin"], argv
    return argv[3:]


def test_admin_cli_and_grpc_drain_node(cluster: Any, aloop: Any, tmp_path: Any,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    from scheduler._proto.llmsched.v1 import admin_pb2, admin_pb2_grpc
    from scheduler.client.admin import main as admin_main
    from scheduler.server.auth import AuthConfig
    from scheduler.server.grpc_server import build_server

    dep, ing = cluster

    async def start() -> Any:  # built inside the loop that serves it (grpc.aio binds to the running loop)
        srv = build_server(ing, port=0, auth=AuthConfig.tokens(client="c-secret", admin="a-secret"))
        await srv.start()
        return srv

    srv = aloop.run(start())
    target = f"127.0.0.1:{srv.port}"
    token = tmp_path / "admin-token"
    token.write_text("a-secret\n")
    admin = ["--target", target, "--admin-token-file", str(token)]
    try:
        with grpc.insecure_channel(target) as ch:
            stub = admin_pb2_grpc.AdminStub(ch)
            for bad, field in (({"node": ""}, "node"), ({"node": "x", "deadline_s": -1.0}, "deadline_s"),
                               ({"node": "x", "deadline_s": float("nan")}, "deadline_s")):
                with pytest.raises(grpc.RpcError) as e:
                    stub.DrainNode(admin_pb2.DrainNodeRequest(**bad), timeout=30,
                                   metadata=(("authorization", "Bearer a-secret"),))
                assert e.value.code() is grpc.StatusCode.INVALID_ARGUMENT
                assert e.value.details().startswith(f"{field}: "), e.value.details()
            with pytest.raises(grpc.RpcError) as e:  # the admin API: the client token is not enough
                stub.DrainNode(admin_pb2.DrainNodeRequest(node="x"), timeout=30,
                               metadata=(("authorization", "Bearer c-secret"),))
            assert e.value.code() is grpc.StatusCode.PERMISSION_DENIED
        assert admin_main([*admin, "drain-node", "no-such-node"]) == 1
        assert "INVALID_ARGUMENT" in capsys.readouterr().err
        # The node of mixed-1, by the chart's own preStop command (its Service and token path swapped for this
        # server's): it drains onto the other instance; its replacement finds no room (the first test's node is
        # drained, the other holds an instance) and waits.
        nodes = _nodes(dep)
        (other,) = [i for i in nodes if i != "mixed-1"]
        argv = _rendered_prestop({})
        argv[argv.index("--target") + 1] = target
        argv[argv.index("--admin-token-file") + 1] = str(token)
        argv[argv.index("$HOSTNAME")] = nodes["mixed-1"]
        assert admin_main(["--json", *argv]) == 0
        out = json.loads(capsys.readouterr().out)
        assert out == {"node_id": nodes["mixed-1"], "drained": ["mixed-1"], "kept": {}, "requests_moved": 0}
        assert sorted(_nodes(dep)) == [other]
        # The last instance serving: its replacement, started first, finds no room in half the deadline (both
        # other nodes drained): kept in service on its draining node (its requests would have nowhere to go), and
        # the pool set back to its size.
        deadline = time.monotonic() + 10
        while len(groups := _groups()) < 2:  # mixed-1's replacement asked for (the reconcile's next round)
            assert time.monotonic() < deadline, groups
            time.sleep(0.1)
        assert admin_main([*admin, "--json", "drain-node", nodes[other], "--deadline-s", "2"]) == 0
        out = json.loads(capsys.readouterr().out)
        assert out["drained"] == [] and list(out["kept"]) == [other], out
        assert "last instance serving" in out["kept"][other]
        (event,) = [e for e in ray.get(dep.controller.scaling_events.remote()) if e["action"] == "replace_ahead"]
        assert event["instances"] == [] and event["failed"] == [other], event
        time.sleep(1.5)  # reconcile rounds: the replacement that found no room is called off, not left waiting
        assert _groups() == groups  # other's and mixed-1's replacement (waiting for room), nothing more
        assert admin_main([*admin, "instances"]) == 0
        listed = capsys.readouterr().out
        assert other in listed and "draining" not in listed, listed
        assert admin_main([*admin, "--json", "instances"]) == 0  # where each instance runs: what drain-node takes
        assert {i["instance_id"]: i["node_id"] for i in json.loads(capsys.readouterr().out)} == {other: nodes[other]}
    finally:
        aloop.run(srv.stop())


def test_chart_worker_prestop_and_its_values() -> None:
    argv = _rendered_prestop({})
    # What the hook dials: the chart's gRPC Service on its port, with the admin token the pod mounts.
    assert argv[argv.index("--target") + 1] == "llmsched-grpc:50051"
    assert argv[argv.index("--admin-token-file") + 1] == "/etc/llmsched/auth/admin-token"
    assert argv[-4:] == ["drain-node", "$HOSTNAME", "--deadline-s", "120"]
    assert argv[argv.index("--timeout-s") + 1] == "115"  # the call ends before Kubernetes kills the pod
    tls = _rendered_prestop({"tls": {"enabled": True, "secretName": "srv"},
                             "workerDrain": {"tlsServerName": "sched.example"}})
    assert tls[tls.index("--tls-ca") + 1] == "/etc/llmsched/tls/ca.crt"
    assert tls[tls.index("--tls-server-name") + 1] == "sched.example"
    assert _rendered_prestop({"workerDrain": {"enabled": False}}) is None
    from scheduler.deploy.chart import DEFAULT_CHART, render_chart

    _, findings = render_chart(DEFAULT_CHART, {"tls": {"enabled": True, "secretName": "srv",
                                                       "clientCASecretName": "ca"}}, "test")
    assert any("workerDrain.enabled" in f.message for f in findings), findings
