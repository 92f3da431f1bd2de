"""``bench/bench_step_faults.py``: per-step attribution of sampled per-thread counters."""

from __future__ import annotations

import numpy as np

from bench.bench_step_faults import attribute


def test_a_step_gets_the_growth_between_the_samples_around_it() -> None:
    t = np.array([0.0, 1.0, 2.0, 3.0, 4.0])
    # two threads, counters (run ns, wait ns, faults), cumulative
    s = np.zeros((5, 2, 3), dtype=np.int64)
    s[:, 0, 0] = [0, 10, 30, 60, 100]
    s[:, 1, 2] = [0, 0, 5, 5, 7]
    d = attribute(t, s, [(1.5, 2.5), (1.0, 3.0), (3.5, 9.0)])
    assert d[0, 0, 0] == 50 and d[0, 1, 2] == 5  # samples 1 -> 3 bracket [1.5, 2.5]
    assert d[1, 0, 0] == 50  # a window on sample times takes exactly those samples
    assert d[2, 0, 0] == 40 and d[2, 1, 2] == 2  # past the end: up to the last sample
