"""`llmsched serve` as a user runs it: foreground process, health SERVING, SDK calls, SIGTERM -> exit 0."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from scheduler.client import Client

pytestmark = pytest.mark.e2e


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _simulated_config(tmp_path: Path) -> Path:
    cfg = yaml.safe_load(Path("deploy/examples/cpu-pd.yaml").read_text())
    for pool in cfg["pools"]:
        pool["backend"] = "simulated"  # the vLLM flavour of this test lives in test_vllm_e2e.py
    path = tmp_path / "sim-pd.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _start_serve(tmp_path: Path, port: int, *args: str, **env: str) -> subprocess.Popen:
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", **env)
    return subprocess.Popen(
        [sys.executable, "-m", "scheduler.cli", "serve", "--config", str(_simulated_config(tmp_path)),
         "--port", str(port), *args],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )


def _wait_serving(addr: str, proc: subprocess.Popen, timeout_s: float = 120) -> None:
    deadline = time.time() + timeout_s
    with grpc.insecure_channel(addr) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while time.time() < deadline:
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else "server exited"
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.5)
    raise AssertionError("server never reported SERVING")


def _stop(proc: subprocess.Popen) -> tuple[int, float, str]:
    """SIGTERM: exit code, seconds to exit, output."""
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        rc = proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    return rc, time.monotonic() - t0, proc.stdout.read() if proc.stdout else ""


def test_serve_foreground_health_generate_and_sigterm(tmp_path: Path) -> None:
    port = _free_port()
    proc = _start_serve(tmp_path, port)
    try:
        addr = f"127.0.0.1:{port}"
        _wait_serving(addr, proc)
        c = Client(addr)
        r = c.generate([5, 6, 7, 8, 9], max_tokens=12, temperature=0.0, request_id="serve-1")
        assert len(r.token_ids) == 12 and r.request_id == "serve-1"
        chunks = [ch for ch in c.stream("hello there", max_tokens=9) if ch.token_ids]
        idx = [ch.index for ch in chunks]
        assert idx == sorted(set(idx)) and idx[0] == 0
        # which instance produced the tokens: the prefill instance for token 0, a decode instance after
        assert chunks[0].instance_id.startswith("prefill") and chunks[-1].instance_id.startswith("decode")
        with pytest.raises(Exception) as e:
            c.generate("", max_tokens=4)
        assert "prompt" in str(e.value)
        c.close()
    finally:
        rc, _, out = _stop(proc)
    assert rc == 0, out


def test_serve_sigterm_while_starting_exits_0(tmp_path: Path) -> None:
    """A SIGTERM before the server is up (engines still starting) lets start-up finish, shuts the cluster down and
    exits 0, like one after it is up."""
    port = _free_port()
    proc = _start_serve(tmp_path, port)
    try:
        assert proc.stdout is not None
        # "starting" is printed once the handlers are in place, before Ray starts (log lines may come first: the
        # auth settings are read before it).
        first = ""
        while "starting" not in first:
            line = proc.stdout.readline()
            assert line, f"serve exited before starting: {first}"
            first += line
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    out = proc.stdout.read() if proc.stdout else ""
    assert rc == 0, out
    assert "stopped while starting" in out and "serving" not in out.replace("stopped while starting", ""), out



def test_serve_on_fake_gpu_nodes_with_http(tmp_path: Path) -> None:
    """``serve --fake-gpus-per-node`` died before serving (``ValueError: signal only works in main thread``: Ray's
    multi-node cluster was started in the executor thread); and the "serving" line named the gRPC address only, not
    the HTTP one ``--http-port`` had opened."""
    import urllib.request

    port, http_port = _free_port(), _free_port()
    proc = _start_serve(tmp_path, port, "--fake-gpus-per-node", "2", "--http-port", str(http_port))
    try:
        _wait_serving(f"127.0.0.1:{port}", proc)
        with Client(f"127.0.0.1:{port}") as c:
            assert len(c.generate([5, 6, 7], max_tokens=4, temperature=0.0).token_ids) == 4
            nodes = {i.node_id for i in c.instances()}
        assert len(nodes) == 2, nodes  # the head (no fake GPU) hosts none: two 2-GPU nodes for 3 instances
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/health", timeout=10) as r:
            assert r.status == 200
    finally:
        rc, _, out = _stop(proc)
    assert rc == 0, out
    assert f"on 127.0.0.1:{port}, OpenAI-compatible HTTP on 127.0.0.1:{http_port}" in out, out


# -- a restart of the chart's llmsched container (thirty-sixth session); ray_head: tests/conftest.py -------------------


def _instances() -> dict[str, str]:
    """Live instance actors of the deployment `serve` names ``default``: actor name -> actor id."""
    import ray

    from scheduler.control.controller import NAMESPACE, instance_actor_name

    prefix = instance_actor_name("default", "")
    return {e["name"]: ray.get_actor(e["name"], namespace=NAMESPACE)._actor_id.hex()
            for e in ray.util.list_named_actors(all_namespaces=True)
            if e["namespace"] == NAMESPACE and e["name"].startswith(prefix)}


def test_a_kept_deployment_survives_sigterm_and_the_next_start_attaches_to_it(ray_head, tmp_path: Path) -> None:
    """A restart of the chart's llmsched container (liveness probe, rollout): `serve` shut the whole deployment down
    on SIGTERM, so every model reloaded (minutes). With LLMSCHED_ON_EXIT=keep the servers drain (an HTTP stream in
    flight finishes: it was cut after 4 of 400 tokens) and the Controller and instances stay; the next start
    attaches to them (same actors, no new instance); the default still shuts the deployment down."""
    import http.client
    import json

    import ray

    from scheduler.control.controller import CONTROLLER_NAME, NAMESPACE

    port, http_port = _free_port(), _free_port()
    addr = f"127.0.0.1:{port}"
    proc = _start_serve(tmp_path, port, "--http-port", str(http_port), RAY_ADDRESS=ray_head.address,
                        LLMSCHED_ON_EXIT="keep")
    try:
        _wait_serving(addr, proc)
        ctrl = ray.get_actor(CONTROLLER_NAME, namespace=NAMESPACE)
        before = _instances()
        assert len(before) == 3
        # An HTTP stream in flight when SIGTERM arrives, and no gRPC one: HTTP was cancelled as soon as gRPC stopped.
        conn = http.client.HTTPConnection("127.0.0.1", http_port, timeout=30)
        conn.request("POST", "/v1/completions", body=json.dumps({"prompt": [3, 4, 5], "max_tokens": 400,
                                                                  "stream": True}),
                     headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 200
        first = resp.readline()
        assert first.startswith(b"data: "), first
    finally:
        rc, exit_s, out = _stop(proc)
    body = first + resp.read()
    conn.close()
    assert rc == 0, out
    events = [json.loads(e[len(b"data: "):]) for e in body.split(b"\n\n") if e.startswith(b"data: {")]
    assert sum(len(e["choices"][0]["token_ids"]) for e in events) == 400, body[-300:]
    assert events[-1]["choices"][0]["finish_reason"] == "length" and body.rstrip().endswith(b"[DONE]")
    assert ray.get(ctrl.ping.remote(), timeout=10)["instances"] == 3 and _instances() == before, out

    t0 = time.monotonic()
    proc = _start_serve(tmp_path, port, RAY_ADDRESS=ray_head.address)  # the default: shutdown
    try:
        _wait_serving(addr, proc)
        start_s = time.monotonic() - t0
        again = ray.get_actor(CONTROLLER_NAME, namespace=NAMESPACE)
        assert again._actor_id == ctrl._actor_id  # the same Controller, not a second one
        with Client(addr) as c:
            chunks = [ch for ch in c.stream([5, 6, 7], max_tokens=6) if ch.token_ids]
        assert sum(len(ch.token_ids) for ch in chunks) == 6
        assert {f"llmsched/default/inst/{ch.instance_id}" for ch in chunks} <= set(before)
        assert _instances() == before  # nothing re-deployed
    finally:
        rc, _, out = _stop(proc)
    assert rc == 0 and "attached to the running" in out, out
    deadline = time.monotonic() + 10
    while _instances() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _instances() == {}
    with pytest.raises(ValueError):
        ray.get_actor(CONTROLLER_NAME, namespace=NAMESPACE)
    print(f"keep: SIGTERM -> exit {exit_s:.1f}s (an HTTP stream drained); restart -> SERVING {start_s:.1f}s")


def _incarnations(dep) -> set[str]:
    return {i.incarnation for i in dep.instances.values()}


def test_deploy_attaches_to_a_running_controller_of_its_config_and_replaces_one_of_another(
    ray_head, tmp_path: Path
) -> None:
    """What the restarted `serve` runs: ``deploy`` of the config the named Controller runs attaches to it (before:
    ActorAlreadyExistsError, the name was taken); of another config (the operator changed the file) it shuts that
    deployment down and deploys the new one, whose ingress would otherwise route by a config its Controller does
    not run."""
    import ray

    from scheduler.config.load import load_config, parse_config
    from scheduler.control.cluster import deploy

    cfg = load_config(_simulated_config(tmp_path))
    first = deploy(cfg, detached=True)
    try:
        again = deploy(cfg)
        assert again.attached and not first.attached
        assert again.controller._actor_id == first.controller._actor_id
        assert _incarnations(again) == _incarnations(first) and len(first.instances) == 3
        with pytest.raises(ValueError, match="controller_name: 'llmsched-controller' is the Controller of cluster "
                                             "'default', not 'other'"):
            deploy(cfg, name="other")  # another cluster's Controller by that name: neither attached nor shut down
        data = cfg.model_dump()
        data["pools"][1]["count"] = 1
        other = parse_config(data, source="one decode instance fewer")
        changed = deploy(other)
    except BaseException:
        first.shutdown()
        raise
    try:
        assert not changed.attached and changed.controller._actor_id != first.controller._actor_id
        config, _ = ray.get(changed.controller.spec.remote())
        assert config == other and len(changed.instances) == 2
        assert not _incarnations(changed) & _incarnations(first)  # new instances
    finally:
        changed.shutdown()
