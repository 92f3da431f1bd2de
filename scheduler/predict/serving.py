"""The length predictor a deployment runs: ``policies.predictor`` in the cluster config.

It is applied where a request enters -- the live ingress (``scheduler/control/ingress.py``) and the simulator
(``sim/simulator.py``) -- and fills ``RequestInfo.predicted_output_tokens`` for the routers, the instances'
``predicted_remaining_tokens`` and the migration policy. A client's ``length_hint`` wins over it; without either,
routers fall back to their own default length.

    policies:
      predictor: {name: default}                       # ngram on prompt text, trace on token ids
      predictor: {name: trace, params: {tenant: azure_conv}}   # one app behind the deployment (a request's own
                                                               # ``tenant`` wins: ``ServingPredictor.tenant_for``)
      predictor: {name: ngram, params: {artifacts: /models/predictor}}   # `llmsched predict train --out DIR`
      predictor: {name: trace, params: {online: true}}  # learn P(output | input length) from finished requests
      predictor: {name: trace, params: {online: {max_tenants: 256, admit_after: 8, pinned: [chat, search]}}}
                                                        # the same, its per-tenant histories sized (``OnlineSpec``)

The guess is the prediction's median (``LengthPrediction.point``), capped by the client's ``max_tokens`` where that
is a cap (``LengthPrediction.capped``: a request asking for at most 16 tokens is not decode-heavy, whatever its
prompt looks like) -- but not with ``ignore_eos``: there ``max_tokens`` is the length a benchmark replay forces (the
trace's true length), and capping at it would hand the routers the oracle. The simulator's trace requests carry no
client cap either.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from scheduler.predict.base import LengthPrediction, LengthPredictor, count_tokens
from scheduler.predict.online import TenantLengths
from scheduler.predict.registry import PredictorKind, load_predictor
from scheduler.predict.trace import TracePredictor

PARAMS = ("artifacts", "tenant", "online")

log = logging.getLogger(__name__)


class OnlineSpec(BaseModel):
    """``policies.predictor.params.online`` as a mapping (``true`` is all defaults): the online histories'
    settings (``TenantLengths``; docs/routing.md, "Length predictor in the request path")."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Tenants with a history of their own besides ``pinned`` (0: the pinned ones only); each a fixed 23 x 9 table.
    max_tenants: int = Field(default=64, ge=0, le=10_000)  # (10k: ~16 MB of tables, ~16 MB of sketch)
    # Requests a new tenant sends before it may replace the least recently observed one's history (once all
    # ``max_tenants`` are taken): made-up names sent a few times cannot push real tenants' histories out.
    admit_after: int = Field(default=8, ge=1)
    # Tenants (an allow-list of known apps) that have a history from the start and never lose it.
    pinned: list[str] = Field(default_factory=list, max_length=10_000)
    strength: float = Field(default=20.0, gt=0)  # the predictor's guess weighs as this many requests
    memory: float = Field(default=1000.0, gt=0)  # requests an input bucket's counts hold (older ones decay)
    # The ingress replicas learn as one through the Controller (``scheduler/predict/shared.py``); false: each
    # learns from the requests it served alone, and a restarted one starts from the shipped guesses.
    share: bool = True

    @model_validator(mode="after")
    def _some_history(self) -> OnlineSpec:
        if self.max_tenants == 0 and not self.pinned:
            raise ValueError("max_tenants: 0 leaves no tenant a history of its own; give pinned tenants, or >= 1")
        if any(not t or len(t) > 128 for t in self.pinned):
            raise ValueError("pinned: tenant names are 1..128 characters (what a request may name)")
        return self

    def lengths(self) -> TenantLengths:
        return TenantLengths(max_tenants=self.max_tenants, admit_after=self.admit_after, pinned=self.pinned,
                             strength=self.strength, memory=self.memory)


def online_spec(value: Any) -> OnlineSpec | None:
    """``params.online`` read: ``false`` / absent -> None, ``true`` -> the defaults, a mapping -> checked.

    Raises:
        ValueError: anything else, or a mapping with an unknown key or a bad value (naming the field).
    """
    if value is None or value is False:
        return None
    if value is True:
        return OnlineSpec()
    where = "policies.predictor.params.online"
    if not isinstance(value, dict):
        # A ValueError, as every check here: the config loader reports it naming the field.
        raise ValueError(  # noqa: TRY004
            f"{where}: must be true, false or a mapping of {', '.join(OnlineSpec.model_fields)}; got {value!r}")
    try:
        return OnlineSpec.model_validate(value)
    except ValidationError as e:
        err = e.errors()[0]
        key = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = f"unknown key; allowed: {', '.join(OnlineSpec.model_fields)}"
        elif not key and ": " in msg:  # the model's own check names its field first
            key, msg = msg.split(": ", 1)
        given = f" (got {err['input']!r})" if err["type"] not in ("extra_forbidden", "value_error") else ""
        raise ValueError(f"{where}{'.' + key if key else ''}: {msg}{given}") from None


@dataclass
class UnknownTenants:
    """Requests that named a tenant the predictor does not know (``ServingPredictor.tenant_for``): counted, the
    first one logged. Not refused: a new app's requests still run, on the tenant-free guess."""

    requests: int = 0

    def note(self, name: str, predictor: str, known: frozenset[str]) -> None:
        if not self.requests:  # once: every request of an unknown app would log otherwise
            log.warning("length predictor %s: request tenant %r is not one it knows (%s); such requests are predicted"
                        " without a tenant (counted, not logged again)", predictor, name[:128],
                        ", ".join(sorted(known)[:8]) + (", ..." if len(known) > 8 else ""))
        self.requests += 1


@dataclass(frozen=True)
class ServingPredictor:
    """A loaded predictor plus the deployment's defaults for it.

    ``tenant``: the app name requests that name none are predicted for (the trace predictor conditions on it;
    ``serving_predictor`` refuses one its artifacts do not know); a request's own wins (``tenant_for``). ``slow``: the predictor runs a neural encoder (ms per request), so the live ingress
    calls it off its event loop (any predictor on a text past ``ENCODE_OFF_LOOP_CHARS``: counting its tokens
    takes ms); the others take ~20-130 us and run inline. ``online``: the finished requests' lengths adjust
    predictions made from length alone (``scheduler/predict/online.py``), from the history of the request's own
    tenant where it names one (``history_key``); fed by ``observe``; shared by the live ingress replicas
    through the Controller where ``share_online`` (``scheduler/predict/shared.py``).
    """

    predictor: LengthPredictor
    name: str
    tenant: str | None = None
    slow: bool = False
    online: TenantLengths | None = None
    share_online: bool = True  # ``OnlineSpec.share``: the live ingress shares ``online`` through the Controller
    unknown_tenants: UnknownTenants = field(default_factory=UnknownTenants, compare=False)

    @functools.cached_property
    def known_tenants(self) -> frozenset[str]:
        """The tenants the predictor conditions on (asked once: the answer is fixed by its artifacts)."""
        return self.predictor.known_tenants()

    def tenant_for(self, requested: str | None, *, note: bool = True) -> str | None:
        """The tenant a request is predicted for: the one place that decides, live (``Ingress._predict``) and
        simulated (a trace's tenant column). The request's own where it names one, else the deployment's
        (``tenant``). A name the predictor does not know gives the tenant-free guess -- not the deployment's tenant:
        the request said it is another app -- and is counted in ``unknown_tenants`` (``note``; the first logged),
        never refused. A predictor that knows no tenants ignores the name."""
        if requested is None:
            return self.tenant
        if requested in self.known_tenants:
            return requested
        if note and self.known_tenants:
            self.unknown_tenants.note(requested, self.name, self.known_tenants)
        return None

    def predict_dist(
        self,
        prompt: str | None,
        prompt_tokens: int,
        *,
        max_tokens: int | None = None,
        counted: int | None = None,
        tenant: str | None = None,
    ) -> LengthPrediction:
        """The predicted output-length distribution of one request (``prompt=None``: its length only), capped at
        ``max_tokens`` when given (the most the engine will generate for it).

        With text, the length feature is recounted with ``count_tokens`` -- the unit the text predictors were
        trained and evaluated in -- not the caller's tokenizer (the ingress's ByteTokenizer counts ~4.5x more,
        the tiny vLLM model's ~2.5x), so the serving guess equals ``llmsched predict eval``'s for the same prompt.
        ``counted``: that length (``input_length``) where the caller has it already (the ingress keeps it to book
        the finished request at, ``observe``). ``tenant``: the request's own (``tenant_for``).
        """
        n = counted if counted is not None else self.input_length(prompt, prompt_tokens)
        return self._dist(prompt, n, self.tenant_for(tenant), max_tokens, self.history_key(tenant))

    def _dist(self, prompt: str | None, n: int, tenant: str | None, max_tokens: int | None,
              history: str | None = None) -> LengthPrediction:
        """``predict_dist`` at input length ``n`` for the resolved ``tenant``, online from ``history``'s."""
        dist = self.predictor.predict(prompt, prompt_tokens=n, tenant=tenant)
        if self.online is not None and self.length_only(prompt):
            dist = self.online.adjust(dist, n, history)
        return dist.capped(max_tokens) if max_tokens is not None else dist

    def use_online(self, online: TenantLengths) -> None:
        """Swaps ``online`` in for the online histories (a rebuilt copy with the same settings:
        ``SharedLengths.apply``) by one reference assignment, so a prediction running in a worker thread (``slow``)
        reads the old histories or the new ones, never a half-rebuilt table."""
        if online.settings() != (self.online.settings() if self.online is not None else None):
            raise ValueError(f"use_online: settings {online.settings()} are not the predictor's")
        object.__setattr__(self, "online", online)  # (frozen for its configuration; the histories are its state)

    def history_key(self, requested: str | None) -> str | None:
        """The online history a request learns from and is predicted with (``TenantLengths``): its own tenant's
        -- any name, one the predictor does not know included (a new app is what the history is for) -- else the
        shared one (no tenant, or the config's ``tenant``: the deployment's default app is what the shared history
        holds, so a single-app deployment predicts as it did whether or not its requests name the app)."""
        return None if requested is None or requested == self.tenant else requested

    def length_only(self, prompt: str | None) -> bool:
        """Whether a request's prediction depends on its input length alone, the ones ``online`` adjusts: without
        text, and any from the trace predictor, which never reads the text (with text it was not adjusted: `trace`
        + `online` behind text clients never learned). A text predictor's is its prompt's own."""
        return prompt is None or isinstance(self.predictor, TracePredictor)

    @staticmethod
    def input_length(prompt: str | None, prompt_tokens: int) -> int:
        """The input length a request is predicted at (``predict_dist``): ``count_tokens`` of its text, else
        ``prompt_tokens``. Counting a long text takes a while (~130 ms at 500 KB)."""
        return count_tokens(prompt) if prompt is not None else int(prompt_tokens)

    def observe(self, prompt_tokens: int, output_tokens: int, *, cut: bool = False, tenant: str | None = None
                ) -> None:
        """A request finished with ``output_tokens`` (the online history learns it; nothing without ``online``).
        ``prompt_tokens``: the length its length-only prediction read (``input_length``; a text prompt's
        ``count_tokens`` where ``length_only``), so its count lands in the input bucket the next such request
        reads. ``cut``: ``max_tokens`` or the context
        stopped it, so its length is only known to be longer (``OnlineLengths.observe``); the length-only
        prediction spreads that count -- except from a neural predictor, which is not run on the caller's event
        loop for it (the history alone spreads it then). ``tenant``: the request's own, as ``predict_dist`` took it
        (not counted again)."""
        if self.online is None:
            return
        n = int(prompt_tokens)
        prior = None
        if cut and not self.slow:
            prior = self.predictor.predict(None, prompt_tokens=n, tenant=self.tenant_for(tenant, note=False))
        self.online.observe(n, output_tokens, cut=cut, prior=prior, tenant=self.history_key(tenant))

    def predict_dists(
        self, prompt_tokens: Sequence[int] | np.ndarray, tenants: Sequence[str | None] | None = None
    ) -> list[LengthPrediction]:
        """Predictions for requests known by prompt length only (trace replays): one per distinct length and
        tenant, since without text that is all a prediction depends on (and on the online history as it stands now:
        a replay with ``online`` predicts each request as it arrives instead). ``tenants``: each request's own
        (a trace's tenant column; ``tenant_for`` per request, so unknown names count per request)."""
        if tenants is None:  # by numpy: ~3x faster than the per-request walk below on a million requests
            lengths, inverse = np.unique(np.asarray(prompt_tokens, dtype=np.int64), return_inverse=True)
            dists = [self.predict_dist(None, int(n)) for n in lengths]
            return [dists[k] for k in inverse.reshape(-1).tolist()]
        seen: dict[tuple[int, str | None, str | None], LengthPrediction] = {}
        out = []
        for n, t in zip(np.asarray(prompt_tokens, dtype=np.int64).tolist(), tenants, strict=True):
            key = (n, self.tenant_for(t), self.history_key(t) if self.online is not None else None)
            if key not in seen:
                seen[key] = self._dist(None, n, key[1], None, key[2])
            out.append(seen[key])
        return out


def check_spec(name: str, params: dict[str, Any]) -> PredictorKind:
    """The predictor kind ``name`` names, with ``params`` checked (config validation: no artifact is loaded)."""
    unknown = sorted(set(params) - set(PARAMS))
    if unknown:
        raise ValueError(f"policies.predictor.params: unknown {', '.join(unknown)}; allowed: {', '.join(PARAMS)}")
    online_spec(params.get("online"))  # (a ValueError, as every check here: the loader reports it naming the field)
    try:
        return PredictorKind.parse(name)
    except ValueError as e:
        raise ValueError(f"policies.predictor.name: {e}") from None


def serving_predictor(spec: Any) -> ServingPredictor | None:
    """The predictor ``policies.predictor`` names (``spec``: its ``PolicySpec``, or ``None`` for no prediction).

    Raises:
        ValueError: an unknown name or parameter, a missing or unreadable artifact, or a ``tenant`` its artifacts
            do not know, with the config field in the message.
    """
    if spec is None:
        return None
    kind = check_spec(spec.name, spec.params)
    artifacts = spec.params.get("artifacts")
    try:
        predictor = load_predictor(kind, artifacts=Path(artifacts) if artifacts is not None else None)
    except (FileNotFoundError, ValueError) as e:  # missing, or there and unreadable (named in the message)
        raise ValueError(f"policies.predictor.params.artifacts: {e}") from None
    except RuntimeError as e:  # EmbeddingUnavailable: the optional embedding stack is not installed
        raise ValueError(f"policies.predictor.name: {spec.name!r} cannot load here: {e}") from None
    tenant = spec.params.get("tenant")
    if tenant is not None and str(tenant) not in (known := predictor.known_tenants()):
        # Checked where the artifacts are loaded, as ``artifacts`` is: an unknown tenant predicts every request as
        # if none were named (the pooled mix), so a typo went unnoticed.
        raise ValueError(
            f"policies.predictor.params.tenant: {str(tenant)!r} is not a tenant of the {kind.value} predictor's"
            f" artifacts (known: {', '.join(sorted(known)) or 'none'}); omit it for the pooled prediction"
        )
    online = online_spec(spec.params.get("online"))
    return ServingPredictor(predictor, kind.value, str(tenant) if tenant is not None else None,
                            slow=kind in (PredictorKind.EMBEDDING, PredictorKind.ENSEMBLE),
                            online=online.lengths() if online is not None else None,
                            share_online=online is None or online.share)


__all__ = ["PARAMS", "OnlineSpec", "ServingPredictor", "UnknownTenants", "check_spec", "online_spec",
           "serving_predictor"]
