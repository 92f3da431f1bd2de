"""Train the ``learned`` router (linear contextual bandit) in the simulator and save its artifact.

    python bench/train_learned_router.py                       # Azure conv, first half, 16 x default, load 0.9
    python bench/train_learned_router.py --trace PATH --config NAME --rounds 4 --out PATH

Each round replays the training workload with ``LearnedRouter(epsilon, collect=True)``: every request's chosen
arm (its feature vector at routing time) is paired with the request's reward, the negative SLO-normalised
latency::

    reward = -(TTFT / ttft_slo + E2E / (ttft_slo + tpot_slo * output_tokens))

(a missed request scores > 2; rejected requests score -10). ``fit`` regresses the cost on the features (ridge,
shrunk toward the previous round's weights), and the next round explores around the new policy (DAgger-style).
The round whose greedy evaluation (``epsilon=0``) has the highest mean reward (the training objective) is
saved. Training uses the FIRST half of the trace. A compare on the whole trace replays those requests too (half
of what it scores); the artifact's meta names the rest, ``held_out``: ``llmsched compare --window START:`` replays
only requests the training never saw. Its meta also records the ``commit`` and ``seed``.

The router never reads ground-truth output lengths: ``output_tokens`` is used only in the reward, after the fact.

``--method cem`` searches the weights instead (cross-entropy method, ``train_cem``), starting from ``--start`` (the
shipped artifact by default), over several traces (``--trace A --config CA --trace B --config CB``) and loads
(``--load 0.7 --load 0.9``) if given; ``--objective slo`` ranks by SLO attainment, ``robust`` by the worst run's
gain over the start in mean reward plus a TTFT tail. Only weights that can change a choice in the training runs
are searched (``signal_features``). The shipped artifact is the bandit's (``--rounds 4 --out
docs/results/learned_router_bandit.json``) refined by ``--method cem --rounds 6 --load 0.8 --start
docs/results/learned_router_bandit.json`` over the first halves of five 16-instance clusters (Azure conv on a
homogeneous and a mixed-speed cluster, Mooncake conv on a homogeneous one, a long-context tier and the same tier
as a PREFILL pool; the full command is in its meta and docs/routing.md). Measured there (docs/history/routing.md,
"What changed", twenty-fourth session): a search on one trace overfits it, on the two homogeneous clusters it gives
up Azure's P99 TTFT; with the mixed-speed runs (and the time features) it gains on every cluster. Both methods keep the
``LOAD_FEATURES`` weights >= 0 (twenty-fifth session: the bandit's one negative weight, harmless at the default
length guess its runs all had, sent every request to one instance under a 500-token length hint).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

# Run as a script: import this checkout, not whatever `scheduler` an editable install elsewhere points at.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scheduler.config.load import load_config
from scheduler.policy.routers_learned import (
    ARTIFACT,
    DEFAULT_WEIGHTS,
    FEATURES,
    WEIGHT_FLOOR,
    LearnedRouter,
    monotone,
    read_weights,
)
from sim.commands import with_instances
from sim.compare import at_load, saturation_rate
from sim.metrics import request_metrics
from sim.simulator import Simulator, Workload
from sim.traces import load_trace

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def rewards(res, cfg) -> np.ndarray:
    """Per-request reward (higher is better): negative SLO-normalised TTFT plus E2E."""
    w = res.workload
    m = request_metrics(res)
    slo = cfg.slo_for(0)
    ttft_slo = slo.ttft_s or 2.0
    tpot_slo = slo.tpot_s or 0.1
    r = -(m.ttft_s / ttft_slo + m.e2e_s / (ttft_slo + tpot_slo * w.output_tokens))
    return np.where(np.isfinite(r), r, -10.0)


def head_size(trace, fraction: float) -> int:
    """How many leading requests of ``trace`` the training runs replay."""
    return max(int(len(trace) * fraction), 1)


def training_workload(cfg, trace, *, fraction: float = 0.5, load: float = 0.9) -> tuple[Workload, float]:
    """The leading ``fraction`` of ``trace`` offered at ``load`` of the whole trace's measured saturation on
    ``cfg``; returns (workload, saturation req/s)."""
    sat = saturation_rate(cfg, Workload.from_trace(trace))
    head = Workload.from_trace(trace.head(head_size(trace, fraction)))
    return at_load(head, load, sat), sat


def held_out_window(trace, fraction: float) -> str | None:
    """``START:`` for ``--window``: the requests after the training head, none of them trained on. START is the
    first arrival after the head's last, so requests tied with it (a coarse clock: Mooncake's 3 s ticks) are in
    neither. ``None`` when the head is the whole trace."""
    arr = trace.arrival_s
    later = arr[arr > arr[head_size(trace, fraction) - 1]]
    return f"{float(later[0])!r}:" if len(later) else None


def checkout_commit() -> str | None:
    """This checkout's commit, ``-dirty`` with uncommitted changes to tracked files (``None`` outside git)."""
    root = str(Path(__file__).resolve().parents[1])
    try:
        head, dirty = (subprocess.run(["git", "-C", root, *cmd], capture_output=True, text=True, check=True).stdout
                       for cmd in (["rev-parse", "HEAD"], ["status", "--porcelain", "--untracked-files=no"]))
    except (OSError, subprocess.CalledProcessError):
        return None
    return head.strip() + ("-dirty" if dirty.strip() else "")


def train(cfg, w: Workload, *, rounds: int = 4, epsilon: float = 0.1, l2: float = 1e-2, seed: int = 0
          ) -> tuple[dict[str, float], list[dict]]:
    weights = dict(DEFAULT_WEIGHTS)
    history: list[dict] = []
    best: tuple[tuple[float, float], dict[str, float]] | None = None
    for k in range(rounds + 1):
        # Evaluate the current weights greedily.
        res = Simulator(cfg, router=LearnedRouter(weights)).run(w)
        rew = rewards(res, cfg)
        att = float(request_metrics(res).slo_met.mean())
        history.append({"round": k, "slo_attainment": att, "mean_reward": float(rew.mean()), "weights": weights})
        print(f"round {k}: greedy SLO attainment {att:.3f}, mean reward {rew.mean():.3f}", flush=True)
        key = (float(rew.mean()), att)
        if best is None or key > best[0]:
            best = (key, dict(weights))
        if k == rounds:
            break
        # Explore around it and refit.
        router = LearnedRouter(weights, epsilon=epsilon, seed=seed + k, collect=True)
        res = Simulator(cfg, router=router).run(w)
        rew = rewards(res, cfg)
        samples = []
        for i in range(len(w)):
            for phi in router.take(str(i)):
                samples.append((phi, float(rew[i])))
        weights = router.fit(samples, l2=l2, prior=weights)
    assert best is not None
    return best[1], history


TAIL = 0.01  # the tail term's fraction: the worst 1% of TTFTs, P99's neighbourhood


def replay_score(cfg, w: Workload, weights: dict[str, float], *, tail: float = TAIL) -> dict[str, float]:
    """One greedy replay of ``w`` on ``cfg`` under ``weights``: SLO attainment, mean reward and the tail term
    (``cvar``: minus the mean SLO-normalised TTFT of the worst ``tail`` fraction of requests -- P99 TTFT's
    neighbourhood -- so that, like the reward, higher is better)."""
    return _scores(Simulator(cfg, router=LearnedRouter(weights)).run(w), cfg, tail)


def _scores(res, cfg, tail: float) -> dict[str, float]:
    m = request_metrics(res)
    ttft = m.ttft_s / (cfg.slo_for(0).ttft_s or 2.0)
    ttft = np.sort(np.where(np.isfinite(ttft), ttft, 10.0))[::-1]
    return {"slo_attainment": float(m.slo_met.mean()), "mean_reward": float(rewards(res, cfg).mean()),
            "cvar": -float(ttft[:max(int(len(ttft) * tail), 1)].mean())}


class _SignalProbe(LearnedRouter):
    """A greedy ``LearnedRouter`` that records which features ever differ between the candidates of one pick."""

    def __init__(self, weights: dict[str, float]) -> None:
        super().__init__(weights)
        self.varies = np.zeros(len(FEATURES), dtype=bool)

    def pick(self, request, candidates, view, *, phase):  # type: ignore[override]
        if len(candidates) > 1:
            phis = np.stack([self.phi(request, c, phase=phase) for c in candidates])
            self.varies |= np.ptp(phis, axis=0) > 0
        return super().pick(request, candidates, view, phase=phase)


def signal_features(runs: list[tuple[object, Workload]], weights: dict[str, float]) -> list[str]:
    """Features that ever separate two candidates of one routing decision in greedy replays of ``runs``.

    Only these can change an argmin there; a weight on any other (``bias``, the request's own ``prompt``, or
    ``prefix_hit`` on a trace without hash_ids) is invisible to the training runs, so a search would move it at
    random -- and it acts out of distribution (a search on Azure moved ``prefix_hit`` from -0.5 to -3.1, the
    twenty-fourth session). Like the bandit's ridge prior, the search leaves those weights where they start."""
    return _probe(runs, weights)[0]


def _probe(runs: list[tuple[object, Workload]], weights: dict[str, float]
           ) -> tuple[list[str], list[dict[str, float]]]:
    """``signal_features`` and, from the same greedy replays (the probe routes as ``LearnedRouter(weights)``
    does), each run's ``replay_score``."""
    varies = np.zeros(len(FEATURES), dtype=bool)
    scores = []
    for cfg, w in runs:
        probe = _SignalProbe(weights)
        scores.append(_scores(Simulator(cfg, router=probe).run(w), cfg, TAIL))
        varies |= probe.varies
    return [n for n, v in zip(FEATURES, varies) if v], scores


def train_cem(runs: list[tuple[object, Workload]], *, start: dict[str, float] | None = None, iters: int = 6,
              population: int = 12, elite: int = 3, sigma: float = 0.5, seed: int = 0, objective: str = "reward"
              ) -> tuple[dict[str, float], list[dict]]:
    """Policy search instead of the bandit refit: the cross-entropy method over the weight vector, each candidate
    scored by greedy replays of every ``(cfg, workload)`` in ``runs``. The bandit regresses one request's outcome on
    the features of its own arm, though the outcome depends on every other placement; a replay scores the policy
    whole. Only the weights of ``signal_features`` are searched (the others -- ``bias`` always -- never change a
    choice in the training runs; they keep their start values). The search starts at
    ``start`` (default ``DEFAULT_WEIGHTS``; ``main`` passes the shipped artifact), the "prior" below, and returns it
    unless a candidate scores higher.

    Objectives (candidates ranked by the first, ties by the second):
      * ``reward``: mean over runs of the mean reward, then of SLO attainment;
      * ``slo``: mean SLO attainment, then mean reward;
      * ``robust``: the WORST run's relative gain over the prior in ``mean reward + cvar`` (the tail term), then
        mean attainment. Ranking by the worst run keeps a candidate from buying one trace's mean with another
        trace's (or its own) tail -- what the single-trace searches did (docs/history/routing.md, "What changed").
    """
    rng = np.random.default_rng(seed)
    names = list(FEATURES)  # the order of WEIGHT_FLOOR
    start = monotone({**DEFAULT_WEIGHTS, **(start or {})})  # an artifact from before the bounds starts clipped
    searched, prior = _probe(runs, start)  # one replay per run: the search space and the prior's score
    free = np.array([n in searched and n != "bias" for n in names])
    mu = np.array([start[n] for n in names], dtype=float)
    sd = sigma * np.maximum(np.abs(mu), 0.25) * free

    def replays(v: np.ndarray) -> list[dict[str, float]]:
        weights = dict(zip(names, v.tolist()))
        return [replay_score(cfg, w, weights) for cfg, w in runs]

    def key(rs: list[dict[str, float]]) -> tuple[float, float]:
        att = float(np.mean([r["slo_attainment"] for r in rs]))
        if objective == "slo":
            return att, float(np.mean([r["mean_reward"] for r in rs]))
        if objective == "robust":
            # rewards are negative: a gain is the fraction of the prior's (negative) score that is gone
            gains = [1.0 - (r["mean_reward"] + r["cvar"]) / (p["mean_reward"] + p["cvar"]) for r, p in zip(rs, prior)]
            return min(gains), att
        return float(np.mean([r["mean_reward"] for r in rs])), att

    seen: dict[bytes, tuple[tuple[float, float], list[dict[str, float]]]] = {mu.tobytes(): (key(prior), prior)}

    def score(v: np.ndarray) -> tuple[float, float]:
        k = v.tobytes()  # a replay is deterministic: each round's mean is scored once
        if k not in seen:
            rs = replays(v)
            seen[k] = (key(rs), rs)
        return seen[k][0]

    def entry(k: int, v: np.ndarray) -> dict:
        return {"round": k, "score": list(score(v)), "runs": seen[v.tobytes()][1],
                "weights": dict(zip(names, v.tolist())), **({"searched": searched} if k == 0 else {})}

    history: list[dict] = [entry(0, mu)]
    best = (score(mu), mu.copy())
    print(f"round 0 (prior): {objective} first {best[0]}", flush=True)
    for k in range(1, iters + 1):
        # load weights stay >= 0 (LOAD_FEATURES)
        cands = [mu] + [np.maximum(mu + sd * rng.standard_normal(len(mu)), WEIGHT_FLOOR)
                        for _ in range(population - 1)]
        scored = sorted(((score(c), c) for c in cands), key=lambda x: x[0], reverse=True)
        if scored[0][0] > best[0]:
            best = (scored[0][0], scored[0][1].copy())
        top = np.stack([c for _, c in scored[:elite]])
        mu, sd = top.mean(axis=0), np.maximum(top.std(axis=0), 0.02) * free
        history.append(entry(k, scored[0][1]))
        print(f"round {k}: best of {population}: {objective} first {scored[0][0]}", flush=True)
    return dict(zip(names, best[1].tolist())), history


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trace", action="append",
                   help="training trace (repeat for several; default: Azure conv). cem only takes more than one")
    p.add_argument("--config", action="append",
                   help="cluster config per --trace, in order (one is used for all; default: default)")
    p.add_argument("--instances", type=int, default=16)
    # Trained where routing decisions matter: at 0.8 of the steady-state saturation (twenty-first session) no
    # refit beat the hand-set prior's reward in 4 rounds, so the artifact was the prior; at 0.9 round 2 does.
    p.add_argument("--load", type=float, action="append",
                   help="offered load as a fraction of saturation (default 0.9); cem: repeat to train every trace "
                        "at several loads")
    p.add_argument("--fraction", type=float, default=0.5, help="leading fraction of the trace to train on")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--seed", type=int, default=0, help="exploration (bandit) or sampling (cem) seed")
    p.add_argument("--epsilon", type=float, default=0.1)
    p.add_argument("--method", choices=("bandit", "cem"), default="bandit",
                   help="bandit refit (epsilon-greedy, ridge) or cross-entropy policy search (--rounds iterations)")
    p.add_argument("--objective", choices=("reward", "slo", "robust"), default="reward",
                   help="cem: rank candidates by mean reward, SLO attainment, or the worst trace's gain over the "
                        "prior in mean reward + tail (train_cem)")
    p.add_argument("--start", default=str(ARTIFACT) if ARTIFACT.exists() else None,
                   help="cem: the artifact the search starts from (default: the shipped one; '' for the hand-set "
                        "DEFAULT_WEIGHTS)")
    p.add_argument("--out", default=str(ARTIFACT))
    p.add_argument("--history", help="write per-round attainment/reward/weights JSON here")
    args = p.parse_args(argv)
    traces = args.trace or [str(SHARED / "azure_llm_2023_conv.csv.gz")]
    configs = args.config or ["default"]
    if len(configs) not in (1, len(traces)):
        p.error(f"--config: give one, or one per --trace ({len(traces)}); got {len(configs)}")
    if len(traces) > 1 and args.method != "cem":
        p.error("--trace: the bandit trains on one trace; several need --method cem")
    loads = args.load or [0.9]
    if len(loads) > 1 and args.method != "cem":
        p.error("--load: the bandit trains at one load; several need --method cem")
    cfgs = [with_instances(load_config(c), args.instances) for c in (configs * len(traces))[:len(traces)]]
    commit = checkout_commit()  # before --out (maybe a tracked file) is written
    runs = []  # (cfg, workload, saturation) per trace and load
    held_out = []
    for c, t in zip(cfgs, traces):
        trace = load_trace(t)
        w, sat = training_workload(c, trace, fraction=args.fraction, load=loads[0])
        runs += [(c, w, sat)] + [(c, at_load(w, x, sat), sat) for x in loads[1:]]
        held_out.append({"trace": Path(t).name, "config": f"{c.name} x{c.num_instances}",
                         "window": held_out_window(trace, args.fraction)})
    if args.method == "cem":
        start = read_weights(args.start) if args.start else None
        weights, history = train_cem([(c, w) for c, w, _ in runs], start=start, iters=args.rounds,
                                     objective=args.objective, seed=args.seed)
    else:
        weights, history = train(cfgs[0], runs[0][1], rounds=args.rounds, epsilon=args.epsilon, seed=args.seed)
    command = "python bench/train_learned_router.py " + " ".join(argv if argv is not None else sys.argv[1:])
    search = {"objective": args.objective, "start": Path(args.start).name if args.start else "DEFAULT_WEIGHTS"}
    if args.method != "cem":
        search = {}
    LearnedRouter(weights).save(args.out, meta={
        "trace": "; ".join(f"{Path(t).name} (first {args.fraction:.0%}, {len(w)} requests)"
                           for t, (_, w, _) in zip(traces, runs[::len(loads)])),
        "config": "; ".join(f"{c.name} x{c.num_instances}" for c in cfgs),
        "load": loads if len(loads) > 1 else loads[0],
        "saturation_rps": [sat for _, _, sat in runs[::len(loads)]] if len(traces) > 1 else runs[0][2],
        "held_out": held_out, "commit": commit, "seed": args.seed,
        "command": command.strip(), "method": args.method, "rounds": args.rounds, "epsilon": args.epsilon,
        **search,
        "reward": "-(ttft/ttft_slo + e2e/(ttft_slo + tpot_slo*output_tokens))",
        "history": [{k: v for k, v in h.items() if k != "weights"} for h in history],
    })
    print(f"saved {args.out}")
    if args.history:
        Path(args.history).write_text(json.dumps(history, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
