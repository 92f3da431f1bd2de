"""Offline experiment (thirteenth session, docs/live_vs_sim.md): charge each request's CPU outside the engine step
to the host and re-simulate committed ``llmsched run`` reports. Not part of the simulator: it replaces
``Simulator._host_update`` for this process only.

Model: request i, arriving at a_i with P_i prompt tokens, uses ``cpu0 + cpu_tok * P_i`` CPU seconds outside its
engine steps (request handling, the actors' hops, KV export/import; measured by process role: 30-110 ms), spread
evenly over ``[a_i, a_i + w0 + w_tok * P_i]``. The load of the pulses in flight (cores) stretches the *decode*
instances' steps: ``table[busy] + load / cores`` with two or more engines busy, else ``max(1, (1.7 busy + load) /
cores)`` (1.7: an engine plus its lone stream's stack CPU, ``HostCPU``). Prefill instances keep the profile's
factor: their lone TTFT samples already hold their own request's CPU.

    python docs/results/live_vs_sim_s13/host_pulses.py 0.045 0.00004 0.04 0.00003 docs/results/live_vs_sim_s13/pd-*/
"""
import sys

import numpy as np

import sim.simulator as S
from scheduler import demo
from scheduler.config.load import load_config

CPU0, CPU_TOK, W0, W_TOK = (float(x) for x in sys.argv[1:5])
CORES = 2.0
_init, _run = S.Simulator.__init__, S.Simulator.run


def init(self, *a, **k):
    k["closed_form"] = False  # a step per event, so the factor follows the pulses
    _init(self, *a, **k)
    self._hkey = None


def run(self, w):
    arr, p = np.asarray(w.arrival_s), np.asarray(w.prompt_tokens)
    width = W0 + W_TOK * p
    self._pulses = (arr, arr + width, (CPU0 + CPU_TOK * p) / width)
    return _run(self, w)


def host_update(self, now):
    n = sum(1 for x in self.instances if x.engine.has_work)
    start, end, rate = self._pulses
    load = float(rate[(start <= now) & (end > now)].sum())
    base = self.instances[0].latency.contention(n)
    f = base + load / CORES if n >= 2 else max(1.0, (1.7 * n + load) / CORES)
    if (n, round(f, 3)) == self._hkey:
        return
    self._hkey = (n, round(f, 3))
    for x in self.instances:
        x.engine.time_scale = base if "PREFILL" in str(x.role).upper() else f
        if x.busy and x.span is not None:
            self.cut_span(x, now)


S.Simulator.__init__, S.Simulator.run, S.Simulator._host_update = init, run, host_update
demo.resimulate(load_config(demo.DEFAULT_CONFIG), sys.argv[5:])
