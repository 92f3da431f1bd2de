"""The poll rounds' cost (``SimInstance.poll_answer``): an instance whose engine has not changed since its last
answer answers with the same snapshot object, unread -- and the run is bit-identical to reading every answer."""

from __future__ import annotations

import numpy as np
import pytest

from scheduler.config.load import load_config
from scheduler.engine_model import EngineModel
from sim.cluster import SimInstance
from sim.commands import with_instances
from sim.metrics import sim_summary
from sim.simulator import Simulator, Workload
from sim.traces import bundled_traces, load_trace


def _read_every_answer(self, now_s, *, detail, ahead=0):
    """The rounds as first written: every answer read from the engine."""
    with self.engine.ahead(ahead):
        return self.fresh_snapshot(now_s, detail=detail, incoming=False)


def _run(router: str, monkeypatch, *, reference: bool) -> tuple[dict, np.ndarray, np.ndarray, int]:
    reads = [0]
    snapshot = EngineModel.snapshot

    def counted(self, *a, **k):
        reads[0] += 1
        return snapshot(self, *a, **k)

    with monkeypatch.context() as m:
        m.setattr(EngineModel, "snapshot", counted)
        if reference:
            m.setattr(SimInstance, "poll_answer", _read_every_answer)
        cfg = with_instances(load_config("llama2-7b-a100-16"), 4)
        w = Workload.from_trace(load_trace(bundled_traces()["azure_llm_2023_conv"]).head(300))
        res = Simulator(cfg, router=router, ingress_poll_s=0.025).run(w)
    summary = {k: v for k, v in sim_summary(res).items() if "wall" not in k}
    return summary, res.instance.copy(), res.finish_s.copy(), reads[0]


@pytest.mark.parametrize("router", ["least_outstanding", "lookahead"])
def test_an_unchanged_engine_answers_unread_and_the_run_is_bit_identical(router, monkeypatch) -> None:
    """lookahead reads each request's detail and its predictions (a read drops the spent ones: a second read of an
    unchanged engine must not be skipped unless it would drop none). Reading every answer, as the rounds did
    before, and answering an unchanged engine from its last read give the same summary, routes and finish times,
    with fewer engine reads."""
    fast, inst, finish, reads = _run(router, monkeypatch, reference=False)
    slow, inst0, finish0, reads0 = _run(router, monkeypatch, reference=True)
    assert fast == slow
    assert inst.tolist() == inst0.tolist()
    assert finish.tolist() == finish0.tolist()
    assert reads < 0.9 * reads0, (reads, reads0)
