"""``learned``: a linear cost model over (request, instance) features, trained as a contextual bandit.

Model: ``cost(request, instance) = w . phi(request, instance)``; route to the candidate of least predicted cost
(P/D pairs via ``PairingRouter``: per phase, the prefill and decode choices are separate arms). Exploration is
epsilon-greedy with a seeded RNG (``epsilon=0`` to evaluate). This is the contextual-bandit variant of the
Intelligent Router (Jain et al. 2024), whose features are the same workload-mix signals the heuristic routers use.

Training (``fit``) is ridge regression of the observed cost on the features of the chosen arm -- the standard
greedy linear bandit (LinUCB without the bonus). Samples are ``(features, reward)`` with reward higher = better
(e.g. ``-e2e_latency_s``, or ``-e2e / slo`` with a bonus for meeting the SLO); ``fit`` regresses on ``-reward``.

How the simulator trains it (see ``collect``): run with ``LearnedRouter(epsilon=0.1, collect=True)``; after each
request finishes, ``take(request_id)`` returns the feature vector logged at routing time; pair it with that
request's reward and call ``fit(samples)``; repeat a few rounds (DAgger-style, seeded from the default weights via
``prior``); ``save(path)``. The shipped artifact is ``artifacts/learned_router.json``.
"""

from __future__ import annotations

import json
import random as _random
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from scheduler.core.types import InstanceRole, InstanceSnapshot, RequestInfo
from scheduler.policy.pairing import HIGH_PRIORITY, PairingRouter, virtual_usage_with
from scheduler.policy.route import RouteDecision

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
)

# A hand-set starting point (cost units ~ seconds-equivalent): load, KV pressure and mixing raise cost, a prefix hit
# lowers it. Used when no artifact is found; the shipped artifact starts from the same vector.
DEFAULT_WEIGHTS: dict[str, float] = {
    "bias": 0.0, "outstanding": 0.5, "waiting": 1.0, "virtual_usage": 1.0, "kv_usage": 0.5,
    "pending_prefill": 2.0, "decode_batch": 0.3, "decode_context": 0.3, "mix_in": 0.5, "mix_ex": 0.3,
    "out_x_pending": 0.3, "prompt": 0.0, "pred_output": 0.0, "high_x_waiting": 2.0, "prefix_hit": -0.5,
    "is_mixed": 0.0,
}

ARTIFACT = Path(__file__).parent / "artifacts" / "learned_router.json"


def features(request: RequestInfo, inst: InstanceSnapshot, *, phase: str = "colocated",
             default_output_tokens: float = 256.0) -> np.ndarray:
    """The feature vector ``phi(request, instance)`` in ``FEATURES`` order; reads only the snapshot summary."""
    p = float(request.prompt_tokens) if phase != "decode" else 1.0
    o = request.predicted_output_tokens or default_output_tokens
    n = inst.num_decoding
    r = inst.predicted_remaining_tokens if inst.predicted_remaining_tokens > 0 else n * default_output_tokens
    q = inst.prefill_tokens_pending
    hit = 0.0
    if request.hash_ids and phase != "decode":
        k = 0
        for h in request.hash_ids:
            if h not in inst.cached_hash_ids:
                break
            k += 1
        hit = k / len(request.hash_ids)
    high = 1.0 if request.priority >= HIGH_PRIORITY else 0.0
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
    ])


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
        if weights is None:
            src = Path(path) if path is not None else ARTIFACT
            weights = _read(src) if (path is not None or src.exists()) else dict(DEFAULT_WEIGHTS)
        self.w = _vector(weights)
        self.epsilon = epsilon
        self._rng = _random.Random(seed)
        self.collect = collect
        self.max_logged = max_logged
        self.default_output_tokens = default_output_tokens
        self._pending: dict[str, np.ndarray] = {}  # this route() call's chosen arms, by phase
        self._log: OrderedDict[str, list[np.ndarray]] = OrderedDict()

    @property
    def weights(self) -> dict[str, float]:
        return {k: float(v) for k, v in zip(FEATURES, self.w)}

    def score(self, request: RequestInfo, inst: InstanceSnapshot, *, phase: str) -> float:
        return float(self.w @ features(request, inst, phase=phase, default_output_tokens=self.default_output_tokens))

    def pick(self, request, candidates, view, *, phase):  # type: ignore[override]
        phis = [features(request, c, phase=phase, default_output_tokens=self.default_output_tokens)
                for c in candidates]
        if self.epsilon > 0 and self._rng.random() < self.epsilon:
            k = self._rng.randrange(len(candidates))
        else:
            costs = np.stack(phis) @ self.w
            k = int(np.argmin(costs))
        if self.collect:
            self._pending[phase] = phis[k]
        return candidates[k]

    # ---- training hooks --------------------------------------------------------------------------------------------
    def on_routed(self, request: RequestInfo, decision: RouteDecision) -> None:
        if not self.collect:
            return
        self._log[request.request_id] = list(self._pending.values())
        self._pending.clear()
        while len(self._log) > self.max_logged:
            self._log.popitem(last=False)

    def take(self, request_id: str) -> list[np.ndarray]:
        """Feature vectors of the arms chosen for ``request_id`` (prefill and decode), removed from the log."""
        return self._log.pop(request_id, [])

    def fit(self, samples: Iterable[tuple[Sequence[float], float]], *, l2: float = 1e-2,
            prior: dict[str, float] | None = None) -> dict[str, float]:
        """Ridge regression of ``-reward`` on features, shrunk toward ``prior`` (default: current weights).

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
        w0 = _vector(prior) if prior is not None else self.w
        # argmin |Xw - y|^2 + l2 * n * |w - w0|^2
        lam = l2 * len(rows)
        A = X.T @ X + lam * np.eye(X.shape[1])
        self.w = np.linalg.solve(A, X.T @ y + lam * w0)
        return self.weights

    def save(self, path: str | Path, *, meta: dict[str, object] | None = None) -> None:
        doc = {"kind": "llmsched.learned_router", "version": 1, "features": list(FEATURES),
               "weights": self.weights, "meta": meta or {}}
        Path(path).write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: str | Path, **kw: object) -> LearnedRouter:
        return cls(_read(Path(path)), **kw)  # type: ignore[arg-type]


def _vector(weights: dict[str, float]) -> np.ndarray:
    unknown = sorted(set(weights) - set(FEATURES))
    if unknown:
        raise ValueError(f"weights: unknown features {unknown}; allowed: {', '.join(FEATURES)}")
    return np.array([float(weights.get(k, 0.0)) for k in FEATURES])


def _read(path: Path) -> dict[str, float]:
    try:
        doc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read learned-router artifact: {e}") from None
    if not isinstance(doc, dict) or doc.get("kind") != "llmsched.learned_router":
        raise ValueError(f"{path}: not a learned-router artifact (kind must be 'llmsched.learned_router')")
    return {str(k): float(v) for k, v in doc["weights"].items()}
