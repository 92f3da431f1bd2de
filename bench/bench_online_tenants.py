"""Online length learning on a two-tenant mix: per-tenant accuracy of ``params: {online: true}`` predictions.

Two apps share one deployment and one input-length distribution (lognormal, median 400 tokens): ``chat`` answers
short (median ~20 tokens), ``summarise`` long (~500); within each app the answer grows with the prompt
(x (prompt / 400) ** 0.3). The requests arrive in a random 50/50 order, each predicted by the shipped trace
predictor with online learning as it arrives (its median, ``LengthPrediction.point``) and learned
(``ServingPredictor.observe``) ``--lag`` requests later, as in-flight requests finish after later ones arrive.
Scored past the first ``--warmup`` of the stream: per tenant, MAE of the guess and Kendall tau (guess vs true
length), and tau over both tenants together (the order the routers read).

    python bench/bench_online_tenants.py [--n 4000] [--lag 32] [--seed 0] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
from collections import deque
from collections.abc import Callable

import numpy as np

from scheduler.config.models import PolicySpec
from scheduler.predict.metrics import kendall_tau
from scheduler.predict.serving import ServingPredictor, serving_predictor

TENANTS = {"chat": 20.0, "summarise": 500.0}  # median answer at a 400-token prompt


def workload(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Prompt lengths, true output lengths and each request's tenant."""
    rng = np.random.default_rng(seed)
    names = list(TENANTS)
    which = rng.integers(0, len(names), n)
    prompt = np.clip(np.rint(400 * rng.lognormal(0.0, 0.8, n)), 8, 8000).astype(np.int64)
    base = np.array([TENANTS[names[k]] for k in which])
    noise = rng.lognormal(0.0, np.where(base < 100, 0.5, 0.3))
    output = np.clip(np.rint(base * (prompt / 400) ** 0.3 * noise), 1, 4000).astype(np.int64)
    return prompt, output, [names[k] for k in which]


def online_predictor() -> ServingPredictor:
    """The shipped trace predictor learning online (``params: {online: true}``), as a new ingress starts it."""
    return serving_predictor(PolicySpec(name="trace", params={"online": True}))


def replay(prompt: np.ndarray, output: np.ndarray, tenants: list[str], lag: int,
           serving: Callable[[int], ServingPredictor], *,
           before: Callable[[int], None] | None = None, after: Callable[[int], None] | None = None) -> np.ndarray:
    """Each request's online guess as it arrives; a request is learned ``lag`` arrivals after its own.
    ``serving(i)``: the predictor that predicts request ``i`` and learns it (asked again then). ``before(i)`` /
    ``after(i)``: called at arrival ``i``, before its prediction / after the learning it let go."""
    guess = np.empty(len(prompt))
    pending: deque[int] = deque()
    for i, (n, t) in enumerate(zip(prompt.tolist(), tenants, strict=True)):
        if before is not None:
            before(i)
        guess[i] = serving(i).predict_dist(None, n, tenant=t).point
        pending.append(i)
        if len(pending) > lag:
            j = pending.popleft()
            serving(j).observe(int(prompt[j]), int(output[j]), tenant=tenants[j])
        if after is not None:
            after(i)
    return guess


def per_tenant(guess: np.ndarray, output: np.ndarray, tenants: list[str], keep: np.ndarray) -> dict[str, dict]:
    """Per tenant, over the requests ``keep`` marks: their number, Kendall tau (guess vs true length) and MAE."""
    out = {}
    t = np.asarray(tenants)
    for name in TENANTS:
        m = keep & (t == name)
        g, y = guess[m], output[m].astype(float)
        out[name] = {"requests": int(m.sum()), "tau": round(kendall_tau(g, y), 4),
                     "mae": round(float(np.mean(np.abs(g - y))), 1)}
    return out


def score(guess: np.ndarray, output: np.ndarray, tenants: list[str], start: int) -> dict:
    keep = np.arange(len(guess)) >= start
    g, y, t = guess[keep], output[keep].astype(float), np.asarray(tenants)[keep]
    out = {"all": {"tau": round(kendall_tau(g, y), 4), "mae": round(float(np.mean(np.abs(g - y))), 1)}}
    out.update(per_tenant(guess, output, tenants, keep))
    for name in TENANTS:
        m = t == name
        out[name].update(median_guess=round(float(np.median(g[m])), 1), median_true=float(np.median(y[m])))
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="llmsched bench online-tenants", description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=4000)
    ap.add_argument("--lag", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--warmup", type=float, default=0.1, help="fraction of the stream not scored")
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    prompt, output, tenants = workload(a.n, a.seed)
    sp = online_predictor()  # (one ingress serving every request)
    guess = replay(prompt, output, tenants, a.lag, lambda _: sp)
    res = {"n": a.n, "lag": a.lag, "seed": a.seed, "warmup": a.warmup,
           "scored": score(guess, output, tenants, int(a.warmup * a.n))}
    return emit(res, a.json)


def emit(res: dict, path: str | None) -> dict:
    """Prints ``res`` and writes it to ``path`` (``--json``) when given."""
    print(json.dumps(res, indent=1))
    if path:
        with open(path, "w") as f:
            json.dump(res, f, indent=1)
    return res


if __name__ == "__main__":
    main()
