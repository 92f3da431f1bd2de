"""``learned``: a linear cost model over (request, instance) features, trained as a contextual bandit.

Model: ``cost(request, instance) = w . phi(request, instance)``; route to the candidate of least predicted cost
(P/D pairs via ``PairingRouter``: per phase, the prefill and decode choices are separate arms). Exploration is
epsilon-greedy with a seeded RNG (``epsilon=0`` to evaluate). This is the contextual-bandit variant of the
Intelligent Router (Jain et al. 2024), whose features are the same workload-mix signals the heuristic routers use.

Training (``fit``) is ridge regression of the observed cost on the features of the chosen arm -- the standard
greedy linear bandit (LinUCB without the bonus) -- with the weights of ``LOAD_FEATURES`` bounded at >= 0, so the
cost never falls as an instance gets busier, whatever the request (see ``LOAD_FEATURES``). Samples are
``(features, reward)`` with reward higher = better (e.g. ``-e2e_latency_s``, or ``-e2e / slo`` with a bonus for
meeting the SLO); ``fit`` regresses on ``-reward``.

How the simulator trains it (see ``collect``): run with ``LearnedRouter(epsilon=0.1, collect=True)``; after each
request finishes, ``take(request_id)`` returns the feature vector logged at routing time; pair it with that
request's reward and call ``fit(samples)``; repeat a few rounds (DAgger-style, seeded from the default weights via
``prior``); ``save(path)``. The shipped artifact, ``artifacts/learned_router.json``, is that bandit's best round
refined by policy search (``bench/train_learned_router.py --method cem``: greedy replays of five 16-instance
clusters, three of mixed speed, one of them P/D); its meta names the command.

Two features are times, not counts: ``ttft_est`` and ``tpot_est`` read the instance's own latency model (by GPU
and TP, bound by ``initialize``) in units of the request's SLO, so one weight vector prices an H100 or a TP-4
instance as faster than an A100 TP-1 one -- what the counts cannot say on a cluster of mixed speeds.
"""

from __future__ import annotations

import json
import random as _random
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from scheduler.config.models import ClusterConfig
from scheduler.core.types import SLO, ClusterView, InstanceRole, InstanceSnapshot, RequestInfo
from scheduler.latency import LatencyModel
from scheduler.policy.pairing import HIGH_PRIORITY, PairingRouter, virtual_usage_with
from scheduler.policy.route import RouteDecision, RouteResult
from scheduler.policy.routers_lookahead import config_latency

FEATURES: tuple[str, ...] = (
    "bias",
    "outstanding",  # running + waiting, /32
    "waiting",  # /16
    "virtual_usage",  # with this request's prompt
    "kv_usage",
    "pending_prefill",  # queued prompt tokens, /8192
    "decode_batch",  # /64
    "decode_context",  # summed decode KV tokens, /1e5
    "mix_in",  # prompt x remaining decode tokens at the instance, /1e7 (Intelligent Router penalty)
    "mix_ex",  # existing decodes x prompt, /1e5
    "out_x_pending",  # predicted output x queued prompt tokens, /1e6
    "prompt",  # /4096
    "pred_output",  # /1024
    "high_x_waiting",  # high priority x waiting, /16
    "prefix_hit",  # fraction of leading hash_ids cached on the instance
    "is_mixed",
    # In units of the request's SLO, from the instance's own latency model (its GPU and TP): what the counts above
    # cannot say on a cluster of mixed speeds. Zero without a model (``features(..., lat=None)``).
    "ttft_est",  # (queued prompt tokens at the chunk's per-token pace + this prompt's uncached prefill) / TTFT SLO
    "tpot_est",  # decode step with this request joining the batch / TPOT SLO
)

# Features that grow with the work already on an instance. Their weights are kept >= 0 (``fit`` and the policy
# search are bounded; ``LearnedRouter`` refuses weights that break it): the cost must never fall as an instance gets
# busier, or the busiest instance draws the next request, and the next. A bandit fitted without length predictions
# (every guess the default 256) put -0.28 on ``out_x_pending`` -- there collinear with ``pending_prefill``, so
# harmless -- and a 500-token length hint then sent every request to one instance (Azure x16 SLO attainment 0.5%,
# twenty-fifth session). ``prefix_hit`` and ``is_mixed`` describe the instance, not its load: any sign.
LOAD_FEATURES: tuple[str, ...] = (
    "outstanding", "waiting", "virtual_usage", "kv_usage", "pending_prefill", "decode_batch", "decode_context",
    "mix_in", "mix_ex", "out_x_pending", "high_x_waiting", "ttft_est", "tpot_est",
)

# A hand-set starting point (cost units ~ seconds-equivalent): load, KV pressure and mixing raise cost, a prefix hit
# lowers it. Used when no artifact is found; the shipped artifact starts from the same vector.
DEFAULT_WEIGHTS: dict[str, float] = {
    "bias": 0.0, "outstanding": 0.5, "waiting": 1.0, "virtual_usage": 1.0, "kv_usage": 0.5,
    "pending_prefill": 2.0, "decode_batch": 0.3, "decode_context": 0.3, "mix_in": 0.5, "mix_ex": 0.3,
    "out_x_pending": 0.3, "prompt": 0.0, "pred_output": 0.0, "high_x_waiting": 2.0, "prefix_hit": -0.5,
    "is_mixed": 0.0, "ttft_est": 0.0, "tpot_est": 0.0,
}

ARTIFACT = Path(__file__).parent / "artifacts" / "learned_router.json"


def features(request: RequestInfo, inst: InstanceSnapshot, *, phase: str = "colocated",
             default_output_tokens: float = 256.0, lat: LatencyModel | _MemoLatency | None = None, slo: SLO | None = None,
             chunk_tokens: int = 2048) -> np.ndarray:
    """The feature vector ``phi(request, instance)`` in ``FEATURES`` order; reads only the snapshot summary and,
    for the two time features, ``inst``'s latency model ``lat`` and the request's ``slo``."""
    p = float(request.prompt_tokens) if phase != "decode" else 1.0
    o = request.predicted_output_tokens or default_output_tokens
    n = inst.num_decoding
    r = inst.decode_tokens_left(default_output_tokens)
    q = inst.prefill_tokens_pending
    hit = 0.0
    if request.hash_ids and inst.cached_hash_ids and phase != "decode":  # (None: the instance cannot tell)
        k = 0
        for h in request.hash_ids:
            if h not in inst.cached_hash_ids:
                break
            k += 1
        hit = k / len(request.hash_ids)
    high = 1.0 if request.priority >= HIGH_PRIORITY else 0.0
    ttft_est = tpot_est = 0.0
    if lat is not None:
        if phase != "decode":
            queued = inst.prefill_compute_tokens if inst.prefill_compute_tokens is not None else q
            cached = int(hit * request.prompt_tokens)
            ttft_est = (queued * lat.prefill_time(chunk_tokens) / chunk_tokens
                        + lat.prefill_time(request.prompt_tokens - cached, cached)) / ((slo and slo.ttft_s) or 2.0)
        if phase != "prefill":
            a, b = lat.decode_coeffs(n + 1)
            tpot_est = (a + b * (inst.decode_context_tokens + request.prompt_tokens)) / ((slo and slo.tpot_s) or 0.1)
    return np.array([
        1.0,
        (inst.num_running + inst.num_waiting) / 32,
        inst.num_waiting / 16,
        virtual_usage_with(inst, request.prompt_tokens),
        inst.kv_blocks_used / max(inst.kv_blocks_total, 1),
        q / 8192,
        n / 64,
        inst.decode_context_tokens / 1e5,
        p * r / 1e7,
        n * p / 1e5,
        (o if phase != "prefill" else 0.0) * q / 1e6,
        request.prompt_tokens / 4096,
        o / 1024,
        high * inst.num_waiting / 16,
        hit,
        1.0 if inst.role is InstanceRole.MIXED else 0.0,
        ttft_est,
        tpot_est,
    ])


class _MemoLatency:
    """A latency model's ``prefill_time`` / ``decode_coeffs``, memoized (bounded): one pick asks every candidate of
    a speed the same questions (the newcomer's prefill, the queue's per-token pace, a batch's step), so at 64
    instances most answers repeat."""

    def __init__(self, lat: LatencyModel, max_entries: int = 4096) -> None:
        self.lat = lat
        self.max_entries = max_entries
        self._prefill: dict[tuple[int, int], float] = {}
        self._decode: dict[int, tuple[float, float]] = {}

    def prefill_time(self, prompt_tokens: int, context_before: int = 0) -> float:
        key = (prompt_tokens, context_before)
        t = self._prefill.get(key)
        if t is None:
            if len(self._prefill) >= self.max_entries:
                self._prefill.clear()
            t = self._prefill[key] = self.lat.prefill_time(prompt_tokens, context_before)
        return t

    def decode_coeffs(self, batch: int) -> tuple[float, float]:
        ab = self._decode.get(batch)
        if ab is None:
            if len(self._decode) >= self.max_entries:
                self._decode.clear()
            ab = self._decode[batch] = self.lat.decode_coeffs(batch)
        return ab


class LearnedRouter(PairingRouter):
    """Linear contextual-bandit router (see module docstring).

    Args:
        weights: feature name -> weight; default: the artifact at ``path`` if present, else ``DEFAULT_WEIGHTS``.
        path: artifact to load (JSON written by ``save``).
        epsilon: exploration probability (seeded by ``seed``).
        collect: log the chosen arm's features per request for ``take`` (bounded by ``max_logged``).
    """

    name = "learned"

    def __init__(self, weights: dict[str, float] | None = None, *, path: str | Path | None = None,
                 epsilon: float = 0.0, seed: int = 0, collect: bool = False, max_logged: int = 1_000_000,
                 default_output_tokens: float = 256.0, **kw: object) -> None:
        super().__init__(**kw)  # type: ignore[arg-type]
        origin = ""  # names the artifact in errors
        if weights is None:
            src = Path(path) if path is not None else ARTIFACT
            if path is not None or src.exists():
                weights, origin = read_weights(src), f"{src}: "
            else:
                weights = dict(DEFAULT_WEIGHTS)
        self.w = _vector(weights, origin)
        # NaN or inf makes every cost NaN (inf x a zero feature), and argmin then sends everything to the first candidate
        odd = [f"{k}={v:g}" for k, v in zip(FEATURES, self.w) if not np.isfinite(v)]
        if odd:
            raise ValueError(f"{origin}weights: {', '.join(odd)}: weights must be finite")
        falls = [f"{k}={v:g}" for k, v, floor in zip(FEATURES, self.w, WEIGHT_FLOOR) if v < floor]
        if falls:
            raise ValueError(f"{origin}weights: {', '.join(falls)}: load features need weights >= 0 (a negative "
                             f"one makes a busier instance cheaper and draws traffic onto it); `monotone` clips them")
        self.epsilon = epsilon
        self._rng = _random.Random(seed)
        self.collect = collect
        self.max_logged = max_logged
        self.default_output_tokens = default_output_tokens
        self._pending: dict[str, np.ndarray] = {}  # this route() call's chosen arms, by phase
        self._log: OrderedDict[str, list[np.ndarray]] = OrderedDict()
        self.config: ClusterConfig | None = None
        self.chunk_tokens = 2048
        self._lat: dict[tuple[str, int], _MemoLatency] = {}

    def initialize(self, config: ClusterConfig) -> None:
        """Bind a cluster config: per-(GPU, TP) latency models, class SLOs and the chunk size (time features)."""
        self.config = config
        self._lat.clear()
        if config.pools:
            self.chunk_tokens = config.pools[0].engine.max_num_batched_tokens

    def latency_of(self, inst: InstanceSnapshot) -> _MemoLatency:
        key = (inst.gpu, inst.tp)
        m = self._lat.get(key)
        if m is None:
            m = self._lat[key] = _MemoLatency(config_latency(self.config, inst.gpu, inst.tp))
        return m

    def slo_of(self, request: RequestInfo) -> SLO | None:
        return request.slo or (self.config.slo_for(request.priority) if self.config is not None else None)

    def phi(self, request: RequestInfo, inst: InstanceSnapshot, *, phase: str, slo: SLO | None = None) -> np.ndarray:
        """``features`` with this router's latency model for ``inst`` and the request's SLO (``slo_of``)."""
        return features(request, inst, phase=phase, default_output_tokens=self.default_output_tokens,
                        lat=self.latency_of(inst), slo=slo or self.slo_of(request), chunk_tokens=self.chunk_tokens)

    @property
    def weights(self) -> dict[str, float]:
        return {k: float(v) for k, v in zip(FEATURES, self.w)}

    def score(self, request: RequestInfo, inst: InstanceSnapshot, *, phase: str) -> float:
        return float(self.w @ self.phi(request, inst, phase=phase))

    def pick(self, request, candidates, view, *, phase):  # type: ignore[override]
        slo = self.slo_of(request)
        phis = [self.phi(request, c, phase=phase, slo=slo) for c in candidates]
        if self.epsilon > 0 and self._rng.random() < self.epsilon:
            k = self._rng.randrange(len(candidates))
        else:
            costs = np.stack(phis) @ self.w
            k = int(np.argmin(costs))
        if self.collect:
            self._pending[phase] = phis[k]
        return candidates[k]

    # ---- training hooks --------------------------------------------------------------------------------------------
    def route(self, request: RequestInfo, view: ClusterView) -> RouteResult:
        self._pending.clear()  # arms picked for a request that was then refused are not this one's
        return super().route(request, view)

    def on_routed(self, request: RequestInfo, decision: RouteDecision) -> None:
        if not self.collect:
            return
        if decision.decode_instance in (None, decision.prefill_instance):
            # The pairing kept it on its MIXED prefill instance: the decoder picked was never used.
            self._pending.pop("decode", None)
        self._log[request.request_id] = list(self._pending.values())
        self._pending.clear()
        while len(self._log) > self.max_logged:
            self._log.popitem(last=False)

    def take(self, request_id: str) -> list[np.ndarray]:
        """Feature vectors of the arms chosen for ``request_id`` (prefill and decode), removed from the log."""
        return self._log.pop(request_id, [])

    def fit(self, samples: Iterable[tuple[Sequence[float], float]], *, l2: float = 1e-2,
            prior: dict[str, float] | None = None) -> dict[str, float]:
        """Ridge regression of ``-reward`` on features, shrunk toward ``prior`` (default: current weights), with the
        ``LOAD_FEATURES`` weights bounded at >= 0 (solved with the bounds, not clipped afterwards).

        Returns the new weights (also installed). Raises ``ValueError`` on no samples or wrong feature length.
        """
        rows = [(np.asarray(f, dtype=float), float(r)) for f, r in samples]
        if not rows:
            raise ValueError("samples: need at least one (features, reward) pair")
        bad = [len(f) for f, _ in rows if len(f) != len(FEATURES)]
        if bad:
            raise ValueError(f"samples: feature vectors must have {len(FEATURES)} entries ({FEATURES}); got {bad[0]}")
        X = np.stack([f for f, _ in rows])
        y = -np.array([r for _, r in rows])
        if not (np.isfinite(X).all() and np.isfinite(y).all()):  # one NaN makes every weight NaN
            raise ValueError("samples: features and rewards must be finite (score an unserved request, e.g. -10)")
        w0 = _vector(prior) if prior is not None else self.w
        # argmin |Xw - y|^2 + l2 * n * |w - w0|^2  subject to  w[LOAD_FEATURES] >= 0
        lam = l2 * len(rows)
        self.w = _bounded_quadratic_min(X.T @ X + lam * np.eye(X.shape[1]), X.T @ y + lam * w0, WEIGHT_FLOOR)
        return self.weights

    def save(self, path: str | Path, *, meta: dict[str, object] | None = None) -> None:
        doc = {"kind": "llmsched.learned_router", "version": 1, "features": list(FEATURES),
               "weights": self.weights, "meta": meta or {}}
        Path(path).write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: str | Path, **kw: object) -> LearnedRouter:
        return cls(read_weights(path), **kw)  # type: ignore[arg-type]


# Lower bound per weight, in ``FEATURES`` order: 0 for ``LOAD_FEATURES``, none for the rest (fit, search, checks).
WEIGHT_FLOOR = np.where([k in LOAD_FEATURES for k in FEATURES], 0.0, -np.inf)


def _bounded_quadratic_min(A: np.ndarray, b: np.ndarray, lower: np.ndarray, *, tol: float = 1e-12,
                           max_sweeps: int = 10_000) -> np.ndarray:
    """argmin 0.5 w'Aw - b'w subject to w >= lower, for A symmetric positive definite (the ridge normal equations):
    cyclic coordinate descent, each coordinate set to its exact minimiser given the others, clipped to its bound --
    it converges to the optimum of this convex problem. (numpy only: policies import nothing heavier.)"""
    w = np.maximum(np.linalg.solve(A, b), lower)  # the unbounded optimum, clipped: exact when no bound binds
    for _ in range(max_sweeps):
        step = 0.0
        for j in range(len(w)):
            new = max((b[j] - A[j] @ w + A[j, j] * w[j]) / A[j, j], lower[j])
            step = max(step, abs(new - w[j]))
            w[j] = new
        if step <= tol * (1.0 + float(np.abs(w).max())):
            break
    return w


def monotone(weights: dict[str, float]) -> dict[str, float]:
    """``weights`` with every ``LOAD_FEATURES`` weight clipped at 0 (the nearest weights a router accepts)."""
    return {k: (max(v, 0.0) if k in LOAD_FEATURES else v) for k, v in weights.items()}


def _vector(weights: dict[str, float], origin: str = "") -> np.ndarray:
    unknown = sorted(set(weights) - set(FEATURES))
    if unknown:
        raise ValueError(f"{origin}weights: unknown features {unknown}; allowed: {', '.join(FEATURES)}")
    return np.array([float(weights.get(k, 0.0)) for k in FEATURES])


def read_weights(path: str | Path) -> dict[str, float]:
    """An artifact's weights as written, numbers by feature name; ``ValueError`` naming ``path`` otherwise. Their
    bounds are ``LearnedRouter``'s check (``monotone`` makes an old artifact acceptable)."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read learned-router artifact: {e}") from None
    if not isinstance(doc, dict) or doc.get("kind") != "llmsched.learned_router":
        raise ValueError(f"{path}: not a learned-router artifact (kind must be 'llmsched.learned_router')")
    if doc.get("version", 1) != 1:  # another version may scale or mean its features differently
        raise ValueError(f"{path}: learned-router artifact version {doc['version']!r}; this llmsched reads version 1")
    weights = doc.get("weights")
    if not isinstance(weights, dict):
        raise ValueError(f"{path}: weights: must be an object of feature name -> number")  # noqa: TRY004
    try:
        return {str(k): float(v) for k, v in weights.items()}
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: weights: {e}") from None
