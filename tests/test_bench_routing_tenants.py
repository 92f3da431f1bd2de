"""bench/bench_routing_tenants.py: the two-app mixes it builds, and per-tenant vs shared online learning in one run."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from bench import bench_routing_tenants as brt
from scheduler.policy.routers_lookahead import BatchModel, LookaheadRouter
from tests.test_bench_routing import spy_routers

DATA = Path(__file__).resolve().parents[1] / "sim" / "data"


def test_the_real_mix_is_each_dataset_as_one_tenant_merged_by_arrival(tmp_path: Path) -> None:
    shutil.copy(DATA / "azure_llm_2023_conv_first10min.csv.gz", tmp_path / brt.CHAT)
    rng = np.random.default_rng(0)
    rows = ["num_prefill_tokens,num_decode_tokens,num_total_tokens,pd_ratio"]
    rows += [f"{p},{o},{p + o},{p / o}" for p, o in zip(rng.integers(1000, 4000, 5000), rng.integers(50, 300, 5000),
                                                          strict=True)]
    with gzip.open(tmp_path / brt.SUMMARISE, "wt") as f:
        f.write("\n".join(rows) + "\n")
    w = brt.mixed_workload(tmp_path, 2.0, seed=0)
    t = np.asarray(w.tenant)
    chat, summ = t == "chat", t == "summarise"
    assert chat.sum() == summ.sum() > 300 and (chat | summ).all()
    assert np.all(np.diff(w.arrival_s) >= 0) and w.arrival_s[0] >= 0.0
    # chat keeps the Azure trace's own first two minutes (timestamps from 0); summarise arrives over the same span
    assert w.arrival_s[chat].max() < 120.0 and 0.5 < w.arrival_s[summ].max() / w.arrival_s[chat].max() < 1.5
    assert set(w.output_tokens[summ].tolist()) <= {int(r.split(",")[1]) for r in rows[1:]}


def test_per_tenant_histories_beat_the_shared_one_on_the_synthetic_mix(tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    res = brt.main(["--mix", "synthetic", "--n", "2000", "--json", str(out)])
    assert json.loads(out.read_text())["command"].endswith(f"--mix synthetic --n 2000 --json {out}")
    assert {"oracle", "online_per_tenant", "online_shared", "shipped", "none"} <= set(res)
    per, shared = res["online_per_tenant"], res["online_shared"]
    # The tenant alone tells the lengths apart: per-tenant guesses are half as far off or less, and rank both apps.
    assert per["mae_chat"] < shared["mae_chat"] / 2 and per["kendall_tau"] > shared["kendall_tau"] + 0.3
    assert res["per_tenant_vs_shared"]["e2e_mean"] < 1.0


@pytest.mark.parametrize(("flags", "model"), [([], BatchModel.DRAIN), (["--steady-batch"], BatchModel.STEADY),
                                              (["--batch-model", "refill"], BatchModel.REFILL)])
def test_batch_model_flags_reach_every_row(monkeypatch: pytest.MonkeyPatch, flags: list[str],
                                           model: BatchModel) -> None:
    """``--steady-batch`` / ``--batch-model``: every row's lookahead is built with that model (120 requests)."""
    seen = spy_routers(monkeypatch, brt)
    res = brt.main(["--mix", "synthetic", "--n", "120", *flags])
    assert len(seen) == 5 and all(isinstance(r, LookaheadRouter) for r in seen)
    assert {r.batch_model for r in seen} == {model}  # type: ignore[attr-defined]
    assert res["lookahead_params"] == ({"batch_model": "refill"} if model is BatchModel.REFILL
                                       else {"steady_batch": True} if flags else {})
