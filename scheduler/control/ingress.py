"""``Ingress``: the Ray-backed ``IngressAPI`` the gRPC/HTTP servers call. Plain class, one per server process.

Hot path (no Controller on it)::

    generate(req) -> validate/tokenize -> router.route(info, cached view) -> Instance.submit / poll ... -> chunks
                                                   ^
             refresh task: Instance.snapshot() of every member every refresh_s (20-50 ms), directly;
             membership from the Controller every members_s (kept as-is while the Controller is down)

Dispatch::

    colocated      : I.submit(req)                          -> I.poll ... finished
    disaggregated  : P.submit(req, max_tokens=1)            -> token 0 (streamed at once: TTFT)
                     kv = P.export_kv(rid)  (ObjectRef)     -> D.submit(prompt+[t0], before=1, kv)  -> D.poll ...
    instance dies  : route again, submit prompt + emitted tokens (before=len(emitted)) on a live instance
    migrate/drain  : multi-stage live migration (scheduler.transfer.migration): D reserves; stages
                     S.export_kv -> D.migrate_stage while S decodes; S.migrate_stop -> D.migrate_commit (D admits
                     and starts decoding); the stream switches to D when S's stream ends (S released); abort at any
                     step leaves the request on S. The Controller's migration policy sends plans here.

Every chunk goes through ``_Stream.accept``, which enforces the one invariant clients rely on: indices contiguous
from 0, each exactly once, across handoffs, recoveries and migrations.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
import zlib
from collections.abc import AsyncIterator
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayTaskError

from scheduler.config.models import ClusterConfig
from scheduler.control.api import (
    UNAVAILABLE_RETRY_AFTER_S,
    ClusterState,
    DeadlineExceeded,
    GenerateRequest,
    IngressError,
    InvalidRequest,
    Overloaded,
    RequestFailed,
    TooLarge,
    Unavailable,
)
from scheduler.control.channel import ChannelClient, ChannelError, RemoteError
from scheduler.control.controller import CONTROLLER_NAME, NAMESPACE, Member
from scheduler.control.ingress_admin import IngressAdmin
from scheduler.control.ingress_migration import _ADMITTED, IngressMigration
from scheduler.control.ingress_view import IngressView
from scheduler.control.instance import DRAINING, ENGINE_FAILED, RELEASED, ROLE_CHANGED
from scheduler.control.instance_lost import (
    _DEAD,
    _FAILED,
    _FAILED_UNDER,
    EngineFailed,
    HandoffLost,
    InstanceDraining,
    InstanceLost,
    InstanceReleased,
    InstanceUnresponsive,
    RequestLost,
    RoleChanged,
    _lost,
)
from scheduler.control.read_ahead import _Ahead
from scheduler.control.registry import RequestRecord, RequestRegistry
from scheduler.control.tokenizer import HFTokenizer, Tokenizer, make_tokenizer  # noqa: F401 - HFTokenizer re-exported
from scheduler.control.util import _await
from scheduler.core.prefix import cached_prefix_tokens, prompt_hash_ids
from scheduler.core.types import (
    SLO,
    ClusterView,
    InstanceRole,
    InstanceSnapshot,
    Phase,
    Rejected,
    RequestInfo,
)
from scheduler.engine.base import EngineRequest, SamplingParams, TokenChunk, text_after
from scheduler.policy.admission import AdmissionPolicy, make_admission_policy
from scheduler.policy.filters import decode_candidates, prefill_candidates
from scheduler.policy.route import RouteDecision, Router, make_router, router_takes
from scheduler.predict.base import LengthPrediction
from scheduler.predict.serving import ServingPredictor, serving_predictor
from scheduler.predict.shared import SharedLengths
from scheduler.telemetry.metrics import NULL_RECORDER, Recorder
from scheduler.telemetry.tracing import Stage, Tracing
from scheduler.transfer.migration import (
    Migration,
    MigrationConfig,
    migration_config,
)

log = logging.getLogger(__name__)

# A text prompt at least this long (characters) is tokenized in a thread: on the event loop a 200 KB prompt held
# every other stream ~150 ms (a 4 MB one, the largest message, seconds). Below, the hop costs more than it frees.
ENCODE_OFF_LOOP_CHARS = 16384


# After a direct-channel failure, Ray calls to that instance for this long, doubling with each failure in a row up
# to the max: a channel that cannot connect at all (a firewall between pods) then costs one connect timeout per
# five minutes, not one every few seconds.
CHANNEL_RETRY_S = 5.0
CHANNEL_RETRY_MAX_S = 300.0


# From ``_attempt`` to ``_run_attempts``: the leg's KV ref proved unusable (its export hung and was called off, or
# failed): the decoder recomputes the prompt, and a hand-on must not pass the ref on (never reaches clients).
_KV_DROPPED = object()


@dataclasses.dataclass
class _Legs:
    """A request's route from one leg (an attempt on one instance) to the next (``Ingress._run_attempts``)."""

    target: RouteDecision
    kv_ref: Any = None  # the prompt KV its next leg takes (a P->D handoff's, a move's)
    kv_src: str = ""  # the instance exporting kv_ref
    admitted: bool = False  # the next instance runs it already (a committed live migration): only poll
    # Instances that refused this leg as draining: left out of its next picks (until a leg is taken or lost: one
    # drained for a scale-down or role switch comes back, and a later leg may need it).
    refused: set[str] = dataclasses.field(default_factory=set)
    lost_to: set[str] = dataclasses.field(default_factory=set)  # decoders lost before this leg's first token

    def taken(self) -> None:
        """A leg ended (taken, or lost to a recovery): the next may go anywhere again."""
        self.admitted = False
        self.refused.clear()
        self.lost_to.clear()


class _SpanHandoff:
    """Internal marker from the attempt loop to ``_run``: a KV-transfer span began (never reaches clients)."""

    __slots__ = ("span",)

    def __init__(self, span: Any) -> None:
        self.span = span


class Ingress(IngressView, IngressMigration, IngressAdmin):
    """Validates, routes from a locally cached view, dispatches to instances, streams tokens back.

    Args:
        config: the deployment config (model limits, router policy).
        controller: the Controller actor handle (membership and admin ops; never per token).
        router: overrides ``config.policies.router``.
        refresh_s: snapshot poll period of the cached view.
        max_in_flight: admission bound of this replica (``Overloaded`` beyond it).
        max_recoveries: re-prefills allowed per request after instance crashes.
        quarantine_after: a request on this many distinct instances whose engine failed while it ran there ends
            ``RequestFailed`` (final, not retried) instead of being recovered again: it is likely what fails them
            (docs/fault_tolerance.md, "query of death").
        submit_timeout_s: an instance answers a submit within its ``lease_s / 2`` (15 s by default), first chunk or
            not; one that has not answered in this long is unresponsive: the request is recovered elsewhere.
        direct: use the instances' direct channels (``control/channel.py``) for submit/poll/abort/snapshot;
            ``False``: Ray actor calls only (the bench's baseline).
        predictor: overrides ``config.policies.predictor`` (the output-length guess for requests without a
            ``length_hint``; ``scheduler/predict/serving.py``).
        admission: overrides ``config.policies.admission`` (``scheduler/policy/admission.py``; ``_admit``).
    """

    def __init__(
        self,
        config: ClusterConfig,
        controller: Any,
        *,
        router: Router | None = None,
        refresh_s: float = 0.025,
        members_s: float = 0.5,
        report_s: float = 0.2,
        max_in_flight: int = 4096,
        max_recoveries: int = 3,
        quarantine_after: int = 3,
        poll_timeout_s: float = 5.0,
        submit_timeout_s: float = 30.0,
        ingress_id: str | None = None,
        tokenizer: Tokenizer | None = None,
        migration: MigrationConfig | None = None,
        plans_s: float = 0.25,
        recorder: Recorder | None = None,
        tracing: Tracing | None = None,
        direct: bool = True,
        predictor: ServingPredictor | None = None,
        admission: AdmissionPolicy | None = None,
    ) -> None:
        self.config = config
        # Telemetry: the servers own request start/finish; the ingress adds routes, instance gauges and the
        # per-stage spans (route, prefill, kv_transfer, decode, migration). Null objects by default.
        self.recorder: Recorder = recorder or NULL_RECORDER
        self.tracing: Tracing = tracing or Tracing.disabled()
        self.controller = controller
        self.ingress_id = ingress_id or f"ingress-{uuid.uuid4().hex[:8]}"
        spec = config.policies.router
        if router is None:
            params = dict(spec.params)
            if "seed" not in params and router_takes(spec.name, "seed"):
                # Each replica its own random sequence: all at seed 0, N ingresses sampled in lockstep (power_of_two
                # compared the same two instances on every replica for the same arrival count).
                params["seed"] = zlib.crc32(self.ingress_id.encode())
            router = make_router(spec.name, **params)
        # The router gets the config too (latency models, SLO classes), a given one as well, as in the simulator:
        # without it `lookahead_shed` had no SLOs and never refused, and lookahead priced every instance with the
        # default model's latencies instead of the cluster's GPUs.
        if hasattr(router, "initialize"):
            router.initialize(config)
        self.router = router
        # ``policies.admission``: checked before each new request is routed (``_admit``); None admits all (bounded
        # by ``max_in_flight`` and the server's limiter only).
        spec = config.policies.admission
        if admission is None and spec is not None:
            admission = make_admission_policy(spec.name, **spec.params)
        self.admission = admission
        self.admission_rejected: dict[int, int] = {}  # priority -> requests the admission policy refused
        self.predictor = predictor or serving_predictor(config.policies.predictor)
        self._lengths: SharedLengths | None = None  # ``online`` shared with the other replicas (``_share_lengths``)
        self._share_failing = False  # the Controller's last ``share_lengths`` raised (said once until one succeeds)
        self.refresh_s = refresh_s
        self.members_s = members_s
        self.report_s = report_s
        self.max_in_flight = max_in_flight
        self.max_recoveries = max_recoveries
        self.quarantine_after = quarantine_after
        self.poll_timeout_s = poll_timeout_s
        self.submit_timeout_s = submit_timeout_s
        self.tokenizer = tokenizer or make_tokenizer(config)
        self.registry = RequestRegistry()
        self._report_lock = asyncio.Lock()  # one registry report at a time (``_report``)
        self._members: dict[str, Member] = {}
        self._snapshots: dict[str, InstanceSnapshot] = {}
        self._dead: set[str] = set()  # incarnations seen dead; never routed to again
        self._pending: dict[str, int] = {}  # routed since the last refresh, per instance (optimistic load)
        # ... and their prompt tokens, queued there as the simulator's snapshots show them at once: routers that read
        # queued prompt tokens (llumnix's virtual usage, prefix_affinity, lookahead) saw a count only and put a whole
        # burst between two refreshes on one instance.
        self._pending_prompt: dict[str, int] = {}
        # ... of which the engine will compute this many: less the prefix its cache holds (per the last snapshot),
        # as the simulator queues them. Counted whole, a burst sharing a cached prefix made its instance look busy.
        self._pending_compute: dict[str, int] = {}
        # P->D requests routed to a decode instance that does not hold them yet (prefilling elsewhere, or their KV
        # on its way): that instance's snapshots cannot show them, so the view adds them until they land (as the
        # simulator's ``incoming``). Without it a refresh dropped them and a burst piled onto one decoder.
        self._incoming: dict[str, int] = {}
        self._expected: dict[str, str] = {}  # request id -> the decode instance it is on its way to
        self._bookings_taken = 0  # refreshes that took the bookings above (their snapshots show them)
        self._view: ClusterView = ClusterView(0.0, ())
        # instance -> (its snapshot in _view, (routed + incoming, incoming, routed prompt tokens) counts, the snapshot view() adds them to)
        self._adjusted: dict[str, tuple[InstanceSnapshot, tuple[int, int, int, int], InstanceSnapshot]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        # Instances an admin drain here releases (IngressAdmin._begin_drain); other replicas' read in the view
        self._admin_drains: set[str] = set()
        # draining instance -> the requests moved off it (committed) during its drain, by any migration of this replica
        self._moved_off: dict[str, set[str]] = {}
        self._node_drains: dict[str, asyncio.Task[Any]] = {}  # node name -> its DrainNode (IngressAdmin.drain_node)
        self._probes: dict[str, asyncio.Future[Any]] = {}  # instance -> its snapshot call that outlasted a round
        self._starting: asyncio.Future[None] | None = None
        self._controller_epoch: str | None = None
        self.controller_ok = False
        self.view_refreshed_s = 0.0
        self.counters = {"recoveries": 0, "handoffs": 0, "migrations": 0, "migrations_aborted": 0, "routed": 0,
                         "channel_calls": 0, "channel_fallbacks": 0, "kv_refused": 0, "quarantined": 0,
                         "drain_refused": 0, "role_refused": 0, "handoff_rerouted": 0, "released_rerouted": 0}
        self.migration_config = migration or migration_config(config)
        self.plans_s = plans_s
        self.direct = direct
        self._channels: dict[str, ChannelClient] = {}  # incarnation -> its channel
        self._channel_down: dict[str, float] = {}  # incarnation -> monotonic time until which Ray is used
        self._channel_fails: dict[str, int] = {}  # incarnation -> channel failures in a row
        self._migrating: dict[str, Migration] = {}  # request id -> its migration in progress
        self._migration_ended: dict[str, asyncio.Event] = {}  # request id -> set when that migration returned
        self.migrations: list[Migration] = []  # finished migrations (bounded), for tests and the bench

    @classmethod
    async def connect(
        cls, *, namespace: str = NAMESPACE, controller_name: str = CONTROLLER_NAME, **kw: Any
    ) -> Ingress:
        """An ingress attached to the named Controller (config and tokenizer from it), started.
        This is how a gRPC server process or actor gets its ingress."""
        handle = await asyncio.to_thread(ray.get_actor, controller_name, namespace=namespace)
        config, backend_kwargs = await handle.spec.remote()
        kw.setdefault("tokenizer", make_tokenizer(config, backend_kwargs))
        ing = cls(config, handle, **kw)
        await ing.start()
        return ing

    # ---- background: the cached view ------------------------------------------------------------------
    async def start(self) -> None:
        """Load membership and a first view, then keep both fresh in the background. Idempotent; every
        public coroutine calls it, so an Ingress starts in the event loop that first uses it."""
        if self._tasks:
            return
        if self._starting is None:
            self._starting = asyncio.get_running_loop().create_future()
            try:
                await self._start()
            finally:
                self._starting.set_result(None)
        else:
            await asyncio.shield(self._starting)

    async def _start(self) -> None:
        await self._refresh_members()
        await self._refresh_view()
        # Heard from before it routes anything: a drain through another replica waits for the live ones
        # (``ControllerMigration.drain_moves``); one it never heard from, started just before, was not waited for
        # and its streams on the drained instance were re-prefilled (the first report came a period later).
        await self._report()
        loops = [(self._refresh_view, self.refresh_s), (self._refresh_members, self.members_s),
                 (self._report, self.report_s), (self._take_plans, self.plans_s)]
        # NOTE: only with online histories to share: without, the task woke every plans period to find nothing.
        if self._shares_lengths():
            await self._share_lengths()  # (a new replica starts from what the others learned)
            loops.append((self._share_lengths, self.plans_s))
        self._tasks = [asyncio.create_task(self._loop(fn, period)) for fn, period in loops]

    async def close(self, timeout_s: float = 5.0) -> None:
        for t in [*self._tasks, *self._node_drains.values()]:
            t.cancel()
        if self._tasks:
            # Bounded: a background poll stuck awaiting a Ray reply whose cancellation never lands must not
            # hang shutdown (seen once in the e2e suite: close() never returned).
            _, stuck = await asyncio.wait(self._tasks, timeout=timeout_s)
            if stuck:
                log.warning("ingress close: %d background task(s) did not stop within %.0fs", len(stuck), timeout_s)
        self._tasks = []
        self._starting = None
        await self._say_closed()
        for probe in self._probes.values():
            probe.cancel()
        self._probes.clear()
        for ch in self._channels.values():
            ch.close()
        self._channels.clear()

    async def _say_closed(self) -> None:
        """Tell the Controller this replica's requests are gone (``Controller.ingress_closed``): before, it held them
        until they expired (``EntryTable.ttl_s``, 30 s), and a scale-down or role switch waited for them. Best effort
        and bounded: a Controller away expires them as before. A replica started again reports its whole set."""
        self._controller_epoch = None
        closed = getattr(self.controller, "ingress_closed", None)
        if closed is None:
            return
        try:
            await asyncio.wait_for(_await(closed.remote(self.ingress_id)), 1.0)
        except Exception as e:  # noqa: BLE001 - closing goes on whatever the Controller answers
            log.info("ingress %s close: the Controller did not take it (%s); its requests expire there",
                     self.ingress_id, type(e).__name__)

    def _shares_lengths(self) -> bool:
        """Whether this replica shares online length histories through its Controller (``_share_lengths``): its
        predictor learns online, sharing is on, and the Controller takes them."""
        p = self.predictor
        return (p is not None and p.online is not None and p.share_online
                and getattr(self.controller, "share_lengths", None) is not None)

    async def _share_lengths(self) -> None:
        """The online length samples learned here since the last time to the Controller, which merges every
        replica's; its answer replaces this replica's histories with the merged ones plus its own samples not
        merged yet (``scheduler/predict/shared.py``). Kept as they are while the Controller is away."""
        p = self.predictor
        if p is None or p.online is None or not self._shares_lengths():
            return
        if self._lengths is None or self._lengths.view is not p.online:  # (a predictor set after __init__ too)
            self._lengths = SharedLengths(p.online, adopt=p.use_online)  # (its rebuilt views swapped into ``p``)
        lengths = self._lengths
        try:
            reply = await asyncio.wait_for(
                _await(self.controller.share_lengths.remote(self.ingress_id, lengths.report())), 2.0)
        except (TimeoutError, *_DEAD):
            return  # the Controller away (restarting): its next exchange catches up
        except RayTaskError as e:
            # The Controller up but failing the exchange is a bug, not an outage: said once, not every period.
            if not self._share_failing:
                log.warning("ingress %s: sharing length histories failed on the Controller (learning alone until "
                            "an exchange succeeds): %r", self.ingress_id, e.cause)
            self._share_failing = True
            return
        if self._share_failing:
            log.info("ingress %s: sharing length histories works again", self.ingress_id)
            self._share_failing = False
        lengths.apply(reply)

    @staticmethod
    async def _loop(fn: Any, period: float) -> None:
        while True:
            await asyncio.sleep(period)
            try:
                await fn()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("ingress background task %s failed", getattr(fn, "__name__", fn))

    # ---- validation and routing -----------------------------------------------------------------------
    async def _encode_prompt(self, req: GenerateRequest) -> tuple[int, ...] | None:
        """A text prompt's token ids (``None`` for a request without one), a long one's off the event loop."""
        if req.prompt is None:
            return None
        args = (req.prompt, req.add_special_tokens)
        if len(req.prompt) < ENCODE_OFF_LOOP_CHARS:
            return tuple(self.tokenizer.encode(*args))
        return tuple(await asyncio.to_thread(self.tokenizer.encode, *args))

    def _validate(self, req: GenerateRequest, prompt_ids: tuple[int, ...] | None) -> RequestRecord:
        """``prompt_ids``: the text prompt's ids (``_encode_prompt``)."""
        m = self.config.model
        if not req.request_id:
            raise InvalidRequest("request_id: must not be empty", field="request_id")
        self._check_new_id(req.request_id)
        if req.model not in (None, "", m.name):
            raise InvalidRequest(f"model: unknown model {req.model!r}; allowed: {m.name}", field="model")
        if (req.prompt is None) == (req.prompt_token_ids is None):
            raise InvalidRequest("prompt: set exactly one of prompt, prompt_token_ids", field="prompt")
        if req.prompt is not None:
            ids = prompt_ids or ()
            field_name = "prompt"
        else:
            ids = tuple(req.prompt_token_ids or ())
            field_name = "prompt_token_ids"
            bad = next((t for t in ids if not isinstance(t, int) or not 0 <= t < m.vocab_size), None)
            if bad is not None:
                raise InvalidRequest(f"prompt_token_ids: token {bad!r} outside [0, {m.vocab_size})",
                                     field="prompt_token_ids")
        if not ids:
            raise InvalidRequest(f"{field_name}: must not be empty", field=field_name)
        if len(ids) >= m.max_model_len:  # no max_tokens can fit: the prompt is what to shorten
            raise InvalidRequest(f"{field_name}: {len(ids)} tokens leave no room for output in the model's context "
                                 f"({m.max_model_len})", field=field_name)
        sp = req.sampling
        if sp.max_tokens < 1:
            raise InvalidRequest(f"max_tokens: must be >= 1, got {sp.max_tokens}", field="max_tokens")
        bad = next((t for t in sp.stop_token_ids if not 0 <= t < m.vocab_size), None)
        if bad is not None:  # as the prompt's ids (vLLM refused it after routing; the simulator never stopped)
            raise InvalidRequest(f"stop_token_ids: token {bad!r} outside [0, {m.vocab_size})", field="stop_token_ids")
        if len(ids) + sp.max_tokens > m.max_model_len:
            raise InvalidRequest(
                f"max_tokens: prompt ({len(ids)}) + max_tokens ({sp.max_tokens}) exceeds the model's context "
                f"({m.max_model_len})", field="max_tokens")
        if sp.temperature < 0:
            raise InvalidRequest(f"temperature: must be >= 0, got {sp.temperature}", field="temperature")
        if not 0 < sp.top_p <= 1:
            raise InvalidRequest(f"top_p: must be in (0, 1], got {sp.top_p}", field="top_p")
        if req.deadline_s is not None and req.deadline_s <= time.time():
            raise DeadlineExceeded("the call's deadline passed before the request was admitted")
        if len(self.registry) >= self.max_in_flight:
            raise Overloaded(f"ingress {self.ingress_id} has {len(self.registry)} requests in flight",
                             retry_after_s=1.0)
        hint = req.length_hint
        if hint is not None and (cap := _length_cap(sp)) is not None:
            hint = min(hint, cap)  # the engine stops there whatever the client expected
        return RequestRecord(req.request_id, ids, sp, req.priority, hint, hash_ids=prompt_hash_ids(ids),
                             tenant=req.tenant)

    async def _predict(self, rec: RequestRecord, prompt: str | None) -> int | None:
        """The configured predictor's guess of the output length, unless the client gave a ``length_hint``.
        ``prompt``: the request's text (``None`` for token ids: the prediction then uses the length only).
        Returns the input length its length-only guess read (``ServingPredictor.input_length``), where the
        finished request is booked (``None``: no such guess; its ``prompt_token_ids`` count then)."""
        p = self.predictor
        if p is None or rec.predicted_output_tokens is not None:
            return None
        n, booked = len(rec.prompt_token_ids), None
        try:
            cap = _length_cap(rec.sampling)

            def guess() -> tuple[int | None, LengthPrediction]:
                k = p.input_length(prompt, n)
                return (k if p.length_only(prompt) else None), p.predict_dist(prompt, n, max_tokens=cap, counted=k,
                                                                              tenant=rec.tenant)

            # In a thread: a neural encoder (ms), or a long text -- counting and featurising a 500 KB prompt held
            # every stream ~130 ms, the stall _encode_prompt avoids past the same length. Else tens of
            # microseconds, cheaper than a thread hop.
            off = p.slow or (prompt is not None and len(prompt) >= ENCODE_OFF_LOOP_CHARS)
            booked, dist = await asyncio.to_thread(guess) if off else guess()
            rec.predicted_output_tokens, rec.length_dist = float(dist.point), dist
        except Exception:
            # A predictor fault costs the routers their guess, never the request (nor the re-check below:
            # the thread hop yielded either way).
            log.exception("length predictor %s failed on request %s", p.name, rec.request_id)
        self._check_new_id(rec.request_id)  # the same id validated again while this one was predicted
        return booked

    def _check_new_id(self, request_id: str) -> None:
        """Refuse an id this ingress is serving. One whose client left (``cancelled``: its engines are being
        aborted, up to ``_abort_bounded``'s deadline, before its stream closes) is most likely that client's own
        retry after a broken connection: UNAVAILABLE, which the SDK retries, not a final INVALID_ARGUMENT."""
        rec = self.registry.get(request_id)
        if rec is None:
            return
        if rec.cancelled:
            raise Unavailable(f"request_id: {request_id!r} is still being cancelled; retry", field="request_id",
                              retry_after_s=UNAVAILABLE_RETRY_AFTER_S)
        raise InvalidRequest(f"request_id: {request_id!r} is already in flight", field="request_id")

    def prompt_tokens(self, request: GenerateRequest) -> int:
        """The request's prompt length in tokens, as this ingress tokenizes it (the HTTP front end's usage). While
        the request is in flight here, the count of its own tokenization: encoding it again cost as much as the
        first time (~50 ms at 16k tokens)."""
        if request.prompt_token_ids is not None:
            return len(request.prompt_token_ids)
        rec = self.registry.get(request.request_id)
        if rec is not None:
            return len(rec.prompt_token_ids)
        return len(self.tokenizer.encode(request.prompt or "", add_special_tokens=request.add_special_tokens))

    def render_chat(self, messages: list[dict[str, Any]], **options: Any) -> str | None:
        """Chat ``messages`` as the model's chat template renders them into a prompt (the HTTP front end's chat):
        :meth:`HFTokenizer.render_chat` and its options; ``None`` when the tokenizer has no template (the simulated
        backend's ``ByteTokenizer``)."""
        render = getattr(self.tokenizer, "render_chat", None)
        return None if render is None else render(messages, **options)

    def _route(self, rec: RequestRecord, *, exclude: frozenset[str] = frozenset(), accepted: bool = False
               ) -> RouteDecision:
        """Place ``rec``'s prefill (and decode): the router's pick, booked where the request goes next."""
        info, decision = self._decide(rec, exclude=exclude, accepted=accepted)
        self.router.on_routed(info, decision)
        self._note_roles(rec, decision.prefill_instance, decision.decode_instance)
        # The decode instance of a P->D pair is counted while the request is on its way there (_expect_decode).
        p = decision.prefill_instance
        self._pending[p] = self._pending.get(p, 0) + 1
        self._pending_prompt[p] = self._pending_prompt.get(p, 0) + info.prompt_tokens
        snap = self._snapshots.get(p)
        hit = cached_prefix_tokens(rec.hash_ids, snap.cached_hash_ids, info.prompt_tokens, kv_block=snap.block_size
                                   ) if snap is not None and rec.hash_ids and snap.cached_hash_ids else 0
        self._pending_compute[p] = self._pending_compute.get(p, 0) + info.prompt_tokens - hit
        handoff = _hands_off(decision, rec, self._is_prefill(p))
        self._expect_decode(rec.request_id, decision.decode_instance if handoff else None)
        self.counters["routed"] += 1
        return decision

    def _info(self, rec: RequestRecord, *, accepted: bool = False) -> RequestInfo:
        return RequestInfo(
            rec.request_id, time.time(), len(rec.prompt_token_ids) + rec.next_index, max(rec.remaining_tokens, 1),
            priority=rec.priority, slo=rec.slo, predicted_output_tokens=rec.predicted_output_tokens,
            accepted=accepted, hash_ids=rec.hash_ids, tenant=rec.tenant,
        )

    def queued_by_priority(self) -> dict[int, int]:
        """Requests this replica admitted that have no first token yet, per priority (the admission policy's
        queues), kept by the registry as they change. NOTE: this replica's own only: the snapshots' waiting counts
        are not split by priority and hold this replica's requests too; with N replicas each bounds its own share
        (size ``max_queued`` per replica)."""
        return self.registry.queued_by_priority()

    def _admit(self, rec: RequestRecord) -> None:
        """``policies.admission`` on a new request: ``Overloaded`` (RESOURCE_EXHAUSTED / 429 with its retry-after)
        if it says no; nothing is booked either way. ``Admitted`` and ``Deferred`` (no instance accepts a phase:
        ``_decide`` answers the router's refusal UNAVAILABLE) go on to ``_route``."""
        if self.admission is None:
            return
        decision = self.admission.admit(self._info(rec), self.view(), self.queued_by_priority())
        if not isinstance(decision, Rejected):
            return
        self.admission_rejected[rec.priority] = self.admission_rejected.get(rec.priority, 0) + 1
        if decision.retry_after_s is None:  # it can never run on this cluster: a retry cannot help
            raise TooLarge(decision.reason, field="prompt", reason_code="too_large")
        raise Overloaded(decision.reason, field="priority", retry_after_s=decision.retry_after_s,
                         reason_code="admission")

    def _decide(self, rec: RequestRecord, *, exclude: frozenset[str], accepted: bool
                ) -> tuple[RequestInfo, RouteDecision]:
        """The router's pick for ``rec`` over the live view less ``exclude``; nothing booked."""
        view = self.view()
        if exclude:
            view = ClusterView(view.time_s, tuple(s for s in view.instances if s.instance_id not in exclude))
        if not view.instances:
            raise Unavailable("no live engine instance in the cluster view", retry_after_s=UNAVAILABLE_RETRY_AFTER_S)
        info = self._info(rec, accepted=accepted)
        decision = self.router.route(info, view)
        if isinstance(decision, Rejected):
            if not prefill_candidates(view) or not decode_candidates(view):
                # Nothing to wait for in a queue (no instance can run a phase): UNAVAILABLE, not RESOURCE_EXHAUSTED.
                raise Unavailable(f"no instance accepts requests: {decision.reason}",
                                  retry_after_s=UNAVAILABLE_RETRY_AFTER_S)
            raise Overloaded(decision.reason, retry_after_s=decision.retry_after_s or 1.0)
        return info, decision

    def instance_handles(self) -> dict[str, Any]:
        """Actor handles of the live instances this replica knows (admin tools, benchmarks)."""
        return {iid: m.handle for iid, m in self._members.items()}

    def _channel(self, iid: str) -> ChannelClient | None:
        """The open (or to-be-opened) direct channel to ``iid``, or ``None``: use Ray."""
        m = self._members.get(iid)
        if not self.direct or m is None or not m.info.channel:
            return None
        key = m.info.incarnation
        if self._channel_down.get(key, 0.0) > time.monotonic():
            return None
        ch = self._channels.get(key)
        if ch is None or ch.closed or (ch.loop is not None and ch.loop is not asyncio.get_running_loop()):
            ch = self._channels[key] = ChannelClient(m.info.channel, m.info.channel_token)
        return ch

    async def _call(
        self, iid: str, handle: Any, method: str, *args: Any, on_retry: dict[str, Any] | None = None, **kwargs: Any
    ) -> Any:
        """``handle.<method>.remote(*args)`` on the hot path: over the direct channel when there is one, else (or
        if the channel fails) over Ray -- which then decides whether the actor is gone (``RayActorError``).
        ``on_retry``: extra keyword arguments for the Ray call after a channel failure (the first call may have
        run)."""
        ch = self._channel(iid)
        if ch is not None:
            self.counters["channel_calls"] += 1
            try:
                out = await ch.call(method, *args, **kwargs)
            except ChannelError as e:
                self.counters["channel_fallbacks"] += 1
                m = self._members.get(iid)
                wait = CHANNEL_RETRY_S
                if m is not None:
                    n = self._channel_fails[m.info.incarnation] = self._channel_fails.get(m.info.incarnation, 0) + 1
                    wait = min(CHANNEL_RETRY_S * 2 ** (n - 1), CHANNEL_RETRY_MAX_S)
                    self._channel_down[m.info.incarnation] = time.monotonic() + wait
                # Expected of one going away (released once drained: its shutdown closes the channel): no warning.
                s = self._snapshots.get(iid)
                level = logging.INFO if self._leaving(iid) or (s is not None and s.draining) else logging.WARNING
                log.log(level, "%s: direct channel failed (%s); using Ray calls for %.0fs", iid, e, wait)
                kwargs.update(on_retry or {})
            else:
                if self._channel_fails:
                    m = self._members.get(iid)
                    if m is not None:
                        self._channel_fails.pop(m.info.incarnation, None)
                return out
        return await getattr(handle, method).remote(*args, **kwargs)

    def _handle(self, iid: str) -> Any:
        m = self._members.get(iid)
        if m is None:
            raise InstanceLost(f"instance {iid} is not a live member")
        return m.handle

    # ---- generate -------------------------------------------------------------------------------------
    async def generate(self, request: GenerateRequest) -> AsyncIterator[TokenChunk]:
        """Validate, route, dispatch; yield chunks with contiguous indices from 0 until one is ``finished``."""
        if not self._tasks:
            await self.start()
        rec = self._validate(request, await self._encode_prompt(request))
        rec.trace_context = self.tracing.current_context()  # the server span: migrations started elsewhere join it
        with self.tracing.span(Stage.PREDICT, request_id=rec.request_id):
            booked_at = await self._predict(rec, request.prompt)
        # The predictor's guess (not a client's length_hint): scored against the actual length at the end.
        predicted = rec.predicted_output_tokens if request.length_hint is None else None
        if request.ttft_slo_s or request.tpot_slo_s:
            rec.slo = SLO(request.ttft_slo_s, request.tpot_slo_s)
        else:
            rec.slo = self.config.slo_for(request.priority)
        with self.tracing.span(Stage.ROUTE, request_id=rec.request_id, attributes={"router": self.router.name}):
            self._admit(rec)  # NOTE: no await from here to registry.add: the queued counts it read stay true
            decision = self._route(rec)
        # The path taken, not the decision's shape: a one-token request, or a PREFILL instance named twice (the
        # Splitwise borrow), runs on the prefill instance alone although the decision names a decoder.
        handoff = _hands_off(decision, rec, self._is_prefill(decision.prefill_instance))
        self.recorder.on_route(rec.request_id, route="disaggregated" if handoff else "colocated",
                               instance_id=decision.prefill_instance)
        self.registry.add(rec)
        finished = False
        reason: str | None = None
        # Prefill lasts until the first token; decode from there on (across handoffs and migrations).
        phase = self.tracing.start_span(Stage.PREFILL, request_id=rec.request_id,
                                        attributes={"instance": decision.prefill_instance})
        decoding = False
        # Polled ahead of the consumer: see _Ahead.
        ahead = _Ahead(self._run(rec, decision))
        try:
            async for chunk in ahead:
                finished = chunk.finished
                reason = chunk.finish_reason
                if not decoding and chunk.token_ids:
                    phase.end()
                    phase = self.tracing.start_span(Stage.DECODE, request_id=rec.request_id)
                    decoding = True
                yield chunk
        finally:
            ahead.cancel()
            phase.end()
            if finished and reason in ("stop", "length") and self.predictor is not None:
                if predicted is not None:
                    self.recorder.on_prediction(predicted, rec.next_index, predictor=self.predictor.name)
                try:  # ``online`` learns lengths; a response max_tokens cut is only known to be longer
                    at = booked_at if booked_at is not None else len(rec.prompt_token_ids)
                    self.predictor.observe(at, rec.next_index, tenant=rec.tenant,
                                           cut=reason == "length" and _length_cap(rec.sampling) is not None)
                except Exception:  # a predictor fault must not skip the clean-up below
                    log.exception("length predictor %s failed to observe request %s", self.predictor.name,
                                  rec.request_id)
            if not finished:  # the client went away (or we failed): free the engine(s)
                rec.cancelled = True
                for iid in rec.instances:
                    self._abort_quietly(iid, rec.request_id)
            if rec.moving_to:
                # A committed migration's destination that never took over (the stream ended on the source: a
                # cancel, an error) still runs its copy: free it, finished or not.
                self._abort_quietly(rec.moving_to, rec.request_id)
            if rec.move_waiter is not None and not rec.move_waiter.done():
                rec.move_waiter.set_result(None)  # finished before the destination took over
            self.registry.remove(rec.request_id)
            self._expect_decode(rec.request_id, None)  # ended (or failed) before its decode leg began
            for iid in rec.instances:
                self.router.on_finished(rec.request_id, iid)

    async def _run(self, rec: RequestRecord, decision: RouteDecision) -> AsyncIterator[TokenChunk]:
        """``_run_attempts`` plus the KV-transfer span of a P->D handoff (until the decode side's first chunk)."""
        xfer: Any = None
        try:
            async for chunk in self._run_attempts(rec, decision):
                if isinstance(chunk, _SpanHandoff):
                    xfer = chunk.span
                    continue
                if xfer is not None:
                    xfer.end()
                    xfer = None
                yield chunk
        finally:
            if xfer is not None:
                xfer.end()

    async def _run_attempts(self, rec: RequestRecord, decision: RouteDecision) -> AsyncIterator[Any]:
        """Attempts on instances until the stream ends: prefill, P->D handoff, recoveries, migrations."""
        rid = rec.request_id
        leg = _Legs(decision)
        while True:
            iid = leg.target.prefill_instance
            handoff = not leg.admitted and _hands_off(leg.target, rec, self._is_prefill(iid))
            ereq = rec.resume_request()
            if not handoff and self._expected.get(rid) == iid:
                # Its decode leg starts: the instance has it next, queued with its whole context (all but its
                # last token loaded, not computed, when the prompt's KV comes along).
                n = len(ereq.prompt_token_ids)
                self._expect_decode(rid, None, landed=n, loaded=n - 1 if leg.kv_ref is not None else 0)
            if handoff:
                ereq = dataclasses.replace(ereq, sampling=dataclasses.replace(ereq.sampling, max_tokens=1))
            rec.instances = (iid,)
            if rec.next_index == 0:
                rec.phase = Phase.PREFILL
            self.registry.touch(rid)
            start = rec.next_index  # where this leg found the stream: still there when lost, it gave the client nothing
            last: TokenChunk | None = None
            try:
                async for chunk in self._attempt(rec, iid, ereq, leg.kv_ref, admitted=leg.admitted, export=handoff,
                                                 kv_src=leg.kv_src):
                    if chunk is _KV_DROPPED:
                        leg.kv_ref = None
                        continue
                    last = chunk
                    if chunk.finished and self._continues(rec, handoff, chunk.finish_reason):
                        if chunk.token_ids:  # e.g. token 0 from the prefill instance: stream it now (TTFT)
                            yield dataclasses.replace(chunk, finished=False, finish_reason=None)
                        continue
                    if chunk.finished and chunk.finish_reason == "migrated":
                        # A hand-over nobody follows (the request was cancelled meanwhile): the client's end is an abort.
                        chunk = dataclasses.replace(chunk, finish_reason="abort")
                    yield chunk
            except (HandoffLost, InstanceLost, InstanceDraining) as e:
                if isinstance(e, InstanceLost):
                    ended = self._migration_ended.get(rid)
                    if ended is not None:
                        # A migration of this request is in flight from the instance just lost. It cannot commit
                        # any more unless it already has (``_after_lost``), and its abort cancels whatever the
                        # destination holds under this id: a recovery that landed there first would be killed by
                        # that cancel. Let it finish (its steps are bounded by step_timeout_s), then recover.
                        await ended.wait()
                if rec.cancelled:
                    yield TokenChunk(rid, rec.next_index, (), True, "abort")
                    return
                if isinstance(e, HandoffLost):
                    self._hand_on(rec, iid, e, leg)
                elif isinstance(e, InstanceLost):
                    self._after_lost(rec, iid, e, leg, lost_first=not leg.admitted and rec.next_index == start)
                else:
                    self._route_around(rec, iid, e, leg)
                continue
            leg.taken()
            assert last is not None and last.finished
            if not self._continues(rec, handoff, last.finish_reason):
                rec.phase = Phase.CANCELLED if last.finish_reason in ("abort", "migrated") else Phase.FINISHED
                return
            if rec.moving_to is not None and last.finish_reason == "migrated":
                leg.target, leg.kv_ref = RouteDecision(rec.moving_to), rec.move_kv
                rec.moving_to, rec.move_kv = None, None
                if leg.kv_ref is _ADMITTED:  # live migration: the destination is decoding it already
                    leg.admitted, leg.kv_ref = True, None
                continue
            # P->D: the prompt KV moves through the object store, node to node; decode goes on at index 1.
            # (Pulled over the instances' direct channels instead, 2 MB of KV took longer than through the
            # object store on one node: docs/architecture.md.)
            decoder = self._handoff_decoder(rec, leg.target.decode_instance)
            try:
                leg.kv_ref, leg.kv_src = self._handle(iid).export_kv.remote(rid, 0, None), iid
            except InstanceLost:
                # The prefill instance was seen dead after it streamed token 0: the decode side recomputes
                # the prompt (as when the KV source dies mid-transfer) rather than failing the request.
                self._mark_dead(iid)
                leg.kv_ref = None
            yield _SpanHandoff(self.tracing.start_span(
                Stage.KV_TRANSFER, request_id=rid, attributes={"source": iid, "destination": decoder}))
            leg.target = RouteDecision(decoder)
            rec.phase = Phase.TRANSFER
            self.counters["handoffs"] += 1

    def _after_lost(self, rec: RequestRecord, iid: str, e: InstanceLost, leg: _Legs, *, lost_first: bool) -> None:
        """``leg``'s next route after its instance ``iid`` was lost (``lost_first``: before the leg's first token)."""
        if rec.moving_to is not None and rec.move_kv is _ADMITTED:
            # The source died right after a migration committed: the destination already runs it, and re-sends the
            # outputs the source produced before the stop but never delivered (Instance.poll from an index below the
            # snapshot's).
            leg.taken()
            leg.target, leg.kv_ref, leg.admitted = RouteDecision(rec.moving_to), None, True
            rec.moving_to, rec.move_kv = None, None
            self._left(iid, rec.request_id, e)
            return
        if lost_first:
            # The stream stands where the leg found it, so a handoff's KV, which covers exactly that, goes on as it
            # is (the ingress owns it). Released (a submit that landed as the Controller released the instance,
            # before its shutdown began refusing): as its refusal would have been. Otherwise only a handoff's leg:
            # without KV there is nothing to keep.
            if isinstance(e, InstanceReleased):
                self._route_around(rec, iid, e, leg)
                return
            if leg.kv_ref is not None:
                self._hand_on(rec, iid, HandoffLost(e), leg)
                return
        leg.taken()
        leg.target, leg.kv_ref = self._recover(rec, iid, e), None

    def _handoff_decoder(self, rec: RequestRecord, decoder: str | None) -> str:
        """Where a P->D request decodes after its prefill: the decoder paired at arrival, ``decoder``, unless it is
        out of service since or shown in another role."""
        if decoder is not None and self._role_changed(rec, decoder):
            # This view shows it in another role than at the pairing (another request's refusal said so, or a
            # refresh): it would refuse the KV (``view_role``), so picked again without it.
            return self._decoder_after_prefill(rec, exclude=frozenset({decoder}))
        if decoder is None or self._leaving(decoder):
            # The pairing was made at arrival; its decoder is going away since (an admin drain, DrainNode, through
            # this ingress or another: released once its requests moved; or released already): pick one now. Sent
            # there, the KV landed on an instance about to go -- moved again, or lost and the prompt re-prefilled. A
            # decoder drained for a role switch or a scale-down still takes it (it waits for the KV on its way, as
            # the simulator's pairing does; tests/test_sim_scaling.py). One that leaves but that this view shows in
            # service yet refuses the submit: _route_around.
            return self._decoder_after_prefill(rec, keep=decoder)
        return decoder

    def _role_of(self, iid: str) -> InstanceRole | None:
        """``iid``'s role as the view shows it, else as the Controller lists it (``None``: unknown here)."""
        s = self._snapshots.get(iid)
        if s is not None:
            return s.role
        m = self._members.get(iid)
        return m.info.role if m is not None else None

    def _is_prefill(self, iid: str) -> bool:
        return self._role_of(iid) is InstanceRole.PREFILL

    def _leaving(self, iid: str) -> bool:
        """``iid`` is gone from the view, or an admin drain releases it once its requests have moved: one through
        any ingress replica, as its snapshots say (``InstanceSnapshot.leaving``: the Controller sets it with the
        drain), or one through this ingress (``IngressAdmin._begin_drain``: also before a snapshot shows it)."""
        if iid in self._admin_drains:
            return True
        s = next((s for s in self._view.instances if s.instance_id == iid), None)
        return s is None or s.leaving

    def _decoder_after_prefill(self, rec: RequestRecord, keep: str | None = None,
                               exclude: frozenset[str] = frozenset()) -> str:
        """Where a request prefilled on a PREFILL instance named alone decodes: the router's answer now (accepted)
        over the view less ``exclude``, a colocated answer's instance when it decodes -- as ``Simulator._handoff``
        decides. Raises ``Unavailable`` when the answer names no instance that decodes (the simulator refuses the
        request there) -- unless ``keep`` (the decoder paired at arrival, out of service since) is given: it is kept
        then."""
        try:
            _, decision = self._decide(rec, exclude=exclude, accepted=True)
            name = decision.decode_instance or decision.prefill_instance
            role = self._role_of(name)
            if role is None or not role.does_decode:
                raise Unavailable(f"request {rec.request_id}: no instance to decode it after its prefill ({name})",
                                  retry_after_s=UNAVAILABLE_RETRY_AFTER_S)
        except IngressError:
            if keep is None:
                raise
            return keep
        self._note_roles(rec, name)
        self._expect_decode(rec.request_id, name)
        self.registry.touch(rec.request_id)  # its report names the decoder while the KV is on its way
        return name

    def _role_changed(self, rec: RequestRecord, iid: str) -> bool:
        """Whether this view shows ``iid`` in another role than when ``rec`` was routed there (``_note_roles``)."""
        seen = rec.view_roles.get(iid)
        return seen is not None and self._role_of(iid) not in (None, seen)

    def _note_roles(self, rec: RequestRecord, *iids: str | None) -> None:
        """``rec`` was routed to ``iids`` on the view as it is now: their roles there go with its submits to them
        (``view_role``), so that one whose role switch finished after that view refuses them."""
        for iid in iids:
            role = None if iid is None else self._role_of(iid)
            if iid is not None and role is not None:
                rec.view_roles[iid] = role

    @staticmethod
    def _continues(rec: RequestRecord, handoff: bool, reason: str | None) -> bool:
        """Whether a finished engine stream is a hand-over rather than the end of the client's stream."""
        if rec.cancelled:
            return False
        if handoff and reason == "length" and rec.remaining_tokens > 0:
            return True
        return reason == "migrated" and rec.moving_to is not None

    async def _attempt(
        self, rec: RequestRecord, iid: str, ereq: EngineRequest, kv_ref: Any, *, admitted: bool = False,
        export: bool = False, kv_src: str = "",
    ) -> AsyncIterator[TokenChunk]:
        """Stream one engine request from one instance; raises ``InstanceLost`` if it dies. ``admitted``: the
        instance already runs it (a committed live migration): only poll. ``export``: a P->D prefill, whose
        instance starts exporting the prompt KV the moment it finishes (the decode side then finds it ready)."""
        try:
            handle = self._handle(iid)
        except InstanceLost as e:
            if kv_ref is None or admitted:
                raise
            raise HandoffLost(e, reached=False) from e  # seen dead since its pick: the KV goes elsewhere
        if admitted:
            async for chunk in self._poll_loop(rec, iid, handle, []):
                yield chunk
            return
        # Every submit below (the resubmits without KV too: this instance can die during one) maps a death to
        # InstanceLost; one outside this try escaped generate() as INTERNAL. Bounded, as the poll is: a hung
        # instance held every request submitted to it for good.
        try:
            sub = None if kv_ref is None else await self._submit_with_kv(rec, iid, handle, ereq, kv_ref, kv_src)
            if kv_ref is not None and sub is None:
                yield _KV_DROPPED  # before the submit without it: this instance may be lost during that one
            if sub is None:
                sub = await asyncio.wait_for(
                    self._call(iid, handle, "submit", ereq, None, on_retry={"adopt": True}, **rec.guess(),
                               export_on_finish=export, view_role=rec.view_roles.get(iid)), self.submit_timeout_s)
        except TimeoutError as e:
            raise _lost(iid, e) from e
        except RayTaskError as e:
            raise EngineFailed(f"{iid}: submit failed: {e.cause!r}") from e
        except RemoteError as e:
            raise EngineFailed(f"{iid}: submit failed: {e}") from e
        except _DEAD as e:
            raise _lost(iid, e) from e
        if sub.rejected is not None:
            field = sub.rejected.split(":", 1)[0] if ":" in sub.rejected else None
            if field == DRAINING:
                raise InstanceDraining(sub.rejected, leaving=sub.leaving)
            if field == ROLE_CHANGED and sub.role is not None:
                raise RoleChanged(sub.rejected, role=sub.role)
            if field == "request_id":
                # A copy of this id runs there (this replica admitted it as new): the stream of a replica that died
                # with it, reaped at the instance's lease, and this is its client's retry. Not the client's error
                # (it was INVALID_ARGUMENT): run it on another instance.
                raise RequestLost(f"{iid}: {sub.rejected}")
            if rec.next_index == 0:
                raise InvalidRequest(sub.rejected, field=field)
            yield TokenChunk(rec.request_id, rec.next_index, (), True, f"error: {sub.rejected}")
            return
        if rec.cancelled:
            # Cancelled while the submit was in flight: its abort may have run before the submit did and found
            # nothing to stop, so stop it here rather than stream a cancelled request to the end.
            self._abort_quietly(iid, rec.request_id)
            yield TokenChunk(rec.request_id, rec.next_index, (), True, "abort")
            return
        waiter = rec.move_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(time.perf_counter())
        async for chunk in self._poll_loop(rec, iid, handle, list(sub.chunks)):
            yield chunk

    async def _submit_with_kv(
        self, rec: RequestRecord, iid: str, handle: Any, ereq: EngineRequest, kv_ref: Any, src: str
    ) -> Any:
        """Submit with the prompt KV as an ObjectRef (Ray resolves it on the instance: KV moves node to node); without
        it if this instance cannot load it (it recomputes the prompt). ``None`` (nothing submitted) if its source
        ``src`` did not export it (died, its export failed or hung: called off): the KV is no use to any instance,
        and the caller submits without it. Each submit is bounded by ``submit_timeout_s``."""

        async def submit(kv: Any) -> Any:
            return await asyncio.wait_for(_await(handle.submit.remote(
                ereq, kv, **rec.guess(), view_role=rec.view_roles.get(iid))), self.submit_timeout_s)

        try:
            sub = await submit(kv_ref)
        except TimeoutError:
            # Ray holds the submit until its KV argument exists: an export hung on the source timed the healthy decode
            # instance out (it was taken for unresponsive, left out of the recovery's route and counted toward the
            # quarantine). Only a submit whose KV exists is this instance's to answer.
            if _ended(kv_ref):
                # This instance did not answer (it may run a copy: _left stops it there); no token came from it.
                raise HandoffLost(_lost(iid, TimeoutError())) from None
            _cancel(kv_ref)  # the hung export; the submit waiting on it then never runs here
            log.warning("%s: the KV export on %s hung; %s recomputes the prompt", rec.request_id, src, iid)
            self._failed_under(rec, src)  # it stopped answering for this request, as a poll that times out
            return None
        except RayTaskError as e:
            # Ray raises the KV source's own error here when its export failed (its engine failed after token 0):
            # not this instance's fault. Taken for one (EngineFailed), the healthy decode instance was left out of the
            # recovery's route -- with one decode instance, the request failed UNAVAILABLE.
            # (Not counted for the quarantine: the KV may just be gone from its source, evicted under its byte cap.)
            if not _is_lost(e) and not await _failed(kv_ref):
                raise
            return None
        except _DEAD as e:
            # This decoder died (or Ray finds it unavailable) before it answered: a KV source's death arrives as
            # RayTaskError(ActorDiedError), above. Its KV goes to another decoder (_hand_on), not re-prefilled; as
            # when it is lost once it answered, before its first token (_after_lost).
            raise HandoffLost(_lost(iid, e)) from e
        if sub.rejected is not None and sub.rejected.startswith("kv"):
            # KV this instance cannot load (the pools' engines differ: TP degree, dtype, block size): it recomputes
            # the prompt rather than fail the request.
            log.warning("%s: %s refused the prompt KV (%s); recomputing it there", rec.request_id, iid, sub.rejected)
            self.counters["kv_refused"] += 1
            sub = await submit(None)
        return sub

    async def _poll_loop(
        self, rec: RequestRecord, iid: str, handle: Any, chunks: list[TokenChunk]
    ) -> AsyncIterator[TokenChunk]:
        while True:
            for chunk in chunks:
                reason = chunk.finish_reason or ""
                if chunk.finished and (reason == RELEASED or reason.startswith(ENGINE_FAILED)):
                    # The instance is being shut down with the request on it (released before every request could
                    # move off: it is killed next, marked dead), or its engine failed under it (the Controller
                    # releases it; out of the view meanwhile, as for a failed submit) -- a release of it as hung or
                    # failed ends ENGINE_FAILED too, counted by the quarantine: keep what it made, recover the rest
                    # elsewhere, bounded by max_recoveries. (An engine failure ended the stream FAILED.)
                    out = self._accept(rec, dataclasses.replace(chunk, finished=False, finish_reason=None))
                    if out is not None:
                        yield out if out.instance_id else dataclasses.replace(out, instance_id=iid)
                    if reason == RELEASED:
                        raise InstanceReleased(f"{iid}: released with the request running")
                    raise EngineFailed(f"{iid}: {reason}")
                out = self._accept(rec, chunk)
                if out is not None:
                    yield out if out.instance_id else dataclasses.replace(out, instance_id=iid)
                if chunk.finished:
                    return
            try:
                nxt = await asyncio.wait_for(
                    self._call(iid, handle, "poll", rec.request_id, self.poll_timeout_s, rec.next_index),
                    self.poll_timeout_s + 5.0,
                )
            except (TimeoutError, *_DEAD) as e:
                raise _lost(iid, e) from e
            if nxt is None:  # the instance forgot it: the request is lost, not the instance
                raise RequestLost(f"{iid}: request unknown to the instance")
            chunks = [nxt]

    def _accept(self, rec: RequestRecord, chunk: TokenChunk) -> TokenChunk | None:
        """Keep the stream exact: drop tokens already emitted, refuse gaps, record the rest."""
        if not chunk.token_ids:
            return dataclasses.replace(chunk, index=rec.next_index) if chunk.finished else None
        start = rec.next_index
        if chunk.index > start:
            raise RuntimeError(f"{rec.request_id}: gap in stream, expected index {start}, got {chunk.index}")
        skip = start - chunk.index
        tokens = chunk.token_ids[skip:]
        if not tokens:
            return dataclasses.replace(chunk, index=start, token_ids=()) if chunk.finished else None
        text = chunk.text
        if skip or not text:
            # Text for these tokens alone (an overlap's tail; an instance's resend of outputs emitted before it took
            # over, sent without text -- or vLLM's "" for a token inside a character, which this keeps ""): decoded
            # after the tokens before them, as the engine's text is.
            text = text_after(self.tokenizer.decode, rec.output_token_ids, tokens, before=rec.prompt_token_ids)
        self.registry.emit(rec, tokens)
        rec.phase = Phase.DECODE
        return dataclasses.replace(chunk, index=start, token_ids=tokens, text=text)

    def _recover(self, rec: RequestRecord, iid: str, err: Exception) -> RouteDecision:
        with self.tracing.span(Stage.RECOVER, request_id=rec.request_id,
                               attributes={"failed_instance": iid, "llmsched.index": rec.next_index}):
            return self._recover_route(rec, iid, err)

    def _recover_route(self, rec: RequestRecord, iid: str, err: Exception) -> RouteDecision:
        rec.recoveries += 1
        self.counters["recoveries"] += 1
        log.warning("%s: instance %s lost (%s); recovering at index %d", rec.request_id, iid, err, rec.next_index)
        self._left(iid, rec.request_id, err)
        if isinstance(err, _FAILED_UNDER):
            self._failed_under(rec, iid)
        if rec.recoveries > self.max_recoveries:
            raise Unavailable(f"request {rec.request_id} lost its instance {rec.recoveries} times",
                              retry_after_s=UNAVAILABLE_RETRY_AFTER_S)
        return self._route(rec, exclude=frozenset({iid}), accepted=True)

    def _route_around(self, rec: RequestRecord, iid: str, err: InstanceDraining | InstanceReleased, leg: _Legs
                      ) -> None:
        """``leg.target``: ``rec``'s next pick after ``iid`` refused it as draining, or as switched to another role
        since the view (``RoleChanged``: counted apart, its new role shown in the view from now on), or ended it
        ``released`` before its first token (its submit landed between the Controller's decision to release it and
        its shutdown's start, when it began refusing), without ``iid`` and the others in ``leg.refused``: with a KV
        (a handoff's, a move's), an instance to decode it, the same ref going on as it is, nothing recomputed; else
        a whole route -- nor the decoders ``leg.lost_to`` before this leg's first token (a hung one is back in the
        view once its snapshot answers: picked again, its submit hung again). Not a recovery, nor a failure. Raises
        ``Unavailable`` naming the refusal when no other instance takes it."""
        leg.refused.add(iid)
        refused = frozenset(leg.refused)
        log.info("%s: %s; routing it elsewhere", rec.request_id, err)
        if isinstance(err, InstanceReleased):
            self.counters["released_rerouted"] += 1
            self._left(iid, rec.request_id, err)  # gone: the Controller kills it next
        elif isinstance(err, RoleChanged):
            self.counters["role_refused"] += 1
            self._mark_role(iid, err.role)
        else:
            self.counters["drain_refused"] += 1
            self._mark_draining(iid, leaving=err.leaving)
        self._expect_decode(rec.request_id, None)  # not on its way to the decoder paired with the refused route
        exclude = refused | leg.lost_to
        try:
            if leg.kv_ref is not None:
                leg.target = RouteDecision(self._decoder_after_prefill(rec, exclude=exclude))
            else:
                leg.target = self._route(rec, exclude=exclude, accepted=True)
        except Unavailable as e:
            why = ("its role switched" if isinstance(err, RoleChanged) else "released" if isinstance(err, InstanceReleased)
                   else "draining")
            raise Unavailable(f"request {rec.request_id}: {', '.join(sorted(refused))} refused it ({why}) and no "
                              f"other instance takes it: {e}", retry_after_s=UNAVAILABLE_RETRY_AFTER_S) from e

    def _hand_on(self, rec: RequestRecord, iid: str, err: HandoffLost, leg: _Legs) -> None:
        """``leg``'s next route and KV after its decoder ``iid`` was lost before its first token (``HandoffLost``):
        the decoder that takes ``leg.kv_ref`` as it is, without the instances of ``leg.refused`` and ``leg.lost_to``
        (``iid`` joins it) -- or, when no other decoder takes it, a lost instance's recovery (re-prefilled, no KV;
        ``leg.taken()``). ``iid`` is left as a lost instance is (dead: never routed to again; silent: hidden,
        its copy stopped) and, when the submit reached it, counted toward the quarantine: a request that kills each
        decoder it is handed to ends ``RequestFailed`` after ``quarantine_after`` of them, which bounds the hand-ons
        with the decoders left out of the picks."""
        log.warning("%s: decoder %s lost before its first token (%s); handing the KV to another", rec.request_id,
                    iid, err.lost)
        leg.lost_to.add(iid)
        self._left(iid, rec.request_id, err.lost)
        if err.reached and isinstance(err.lost, _FAILED_UNDER):
            self._failed_under(rec, iid)
        self._expect_decode(rec.request_id, None)  # not on its way to the lost decoder
        try:
            decoder = self._decoder_after_prefill(rec, exclude=frozenset(leg.refused | leg.lost_to))
        except IngressError:
            leg.taken()
            leg.target, leg.kv_ref = self._recover(rec, iid, err.lost), None
            return
        self.counters["handoff_rerouted"] += 1
        leg.target = RouteDecision(decoder)

    def _failed_under(self, rec: RequestRecord, iid: str) -> None:
        """``iid`` failed while ``rec`` ran there. Raises ``RequestFailed`` once ``quarantine_after`` distinct instances
        did: a query of death -- an instance failure is evidence against every request that ran there, and the one that
        causes them is present at each. Ended UNAVAILABLE it was retried by the SDK, and so failed up to
        (max_recoveries + 1) x 3 engines. A co-located request is recovered as before unless it was on the same failing
        instances as often (the limit of this rule: docs/fault_tolerance.md)."""
        if iid in rec.failed_engines:
            return
        rec.failed_engines += (iid,)
        if len(rec.failed_engines) >= self.quarantine_after:
            self.counters["quarantined"] += 1
            raise RequestFailed(
                f"request {rec.request_id} failed {len(rec.failed_engines)} engines it ran on "
                f"({', '.join(rec.failed_engines)}): not recovered or retried further")

    def _left(self, iid: str, rid: str, err: InstanceLost) -> None:
        """``rid`` left ``iid`` because of ``err``: a dead instance is never routed to again; a live one that lost
        the request stays routable; one that did not answer stays a member and is told to stop the request (it may
        come back, and would otherwise decode a copy nobody reads until its lease)."""
        if isinstance(err, InstanceUnresponsive):
            self._abort_quietly(iid, rid)
            self._hide(iid)
        elif not isinstance(err, RequestLost):
            self._mark_dead(iid)

    def _abort_quietly(self, iid: str, rid: str) -> None:
        """Stop ``rid`` on ``iid``, whose stream this ingress polls no more (``forget``: the instance drops it)."""
        m = self._members.get(iid)
        if m is not None:
            m.handle.abort.remote(rid, forget=True)  # fire and forget

    # ---- admin ----------------------------------------------------------------------------------------
    async def cancel(self, request_id: str) -> bool:
        await self.start()
        rec = self.registry.get(request_id)
        if rec is not None:
            rec.cancelled = True
            # A committed migration's destination runs a copy too (the stream moves there once the source ends).
            await asyncio.gather(*(self._abort_bounded(iid, request_id)
                                   for iid in rec.instances + ((rec.moving_to,) if rec.moving_to else ())))
            return True
        # Another ingress replica serves it: abort where the Controller's registry says it runs.
        try:
            entry = await asyncio.wait_for(_await(self.controller.lookup.remote(request_id)), 2.0)
        except (TimeoutError, *_DEAD, RayTaskError):
            return False
        if entry is None:
            return False
        return any(await asyncio.gather(*(self._abort_bounded(iid, request_id) for iid in entry.instances)))

    async def _abort_bounded(self, iid: str, request_id: str) -> bool:
        """``abort`` on ``iid``, for an admin Cancel: a dead instance holds nothing to stop (the others still need
        the abort), nor does one whose engine failed (vLLM's abort raises ``EngineDeadError`` then: the Cancel was
        INTERNAL), and one that does not answer must not hang the caller -- it had no deadline."""
        m = self._members.get(iid)
        if m is None:
            return False
        try:
            return bool(await asyncio.wait_for(_await(m.handle.abort.remote(request_id)), 2.0))
        except (TimeoutError, *_DEAD, *_FAILED) as e:
            log.info("cancel of %s on %s: %s", request_id, iid, type(e).__name__)
            return False

    async def cluster_state(self) -> ClusterState:
        await self.start()
        return ClusterState(
            instances=self.view().instances,
            router=self.router.name,
            requests_in_flight=len(self.registry),
            nodes={i: m.info.node_id for i, m in self._members.items() if m.info.node_id},
            extra={
                "view_age_s": time.time() - self.view_refreshed_s,
                "controller_ok": float(self.controller_ok),
                **{k: float(v) for k, v in self.counters.items()},
                # Requests the admission policy refused, per priority (``admission_rejected_p<priority>``).
                **{f"admission_rejected_p{p}": float(n) for p, n in sorted(self.admission_rejected.items())},
                # Requests that named a tenant the length predictor does not know (predicted without one).
                **({"predictor_unknown_tenant": float(self.predictor.unknown_tenants.requests)}
                   if self.predictor is not None else {}),
                # Online length learning: tenant histories held, and requests whose tenant had none (not admitted
                # yet: ``TenantLengths``) -- a rising count with few histories is a flood of names, or a full table.
                **({"predictor_online_tenants": float(len(online.tenants) + len(online.pinned)),
                    "predictor_online_unadmitted": float(online.unadmitted)}
                   if self.predictor is not None and (online := self.predictor.online) is not None else {}),
            },
        )


def _length_cap(sp: SamplingParams) -> int | None:
    """The most tokens the engine will generate for a request, as a cap on length guesses: ``max_tokens``, except
    with ``ignore_eos``, where it is the length a benchmark replay forces (the trace's true length: capping at it
    would hand the routers the oracle; ``scheduler/predict/serving.py``)."""
    return None if sp.ignore_eos else sp.max_tokens


def _hands_off(decision: RouteDecision, rec: RequestRecord, prefill_only: bool) -> bool:
    """Whether ``rec`` prefills on ``decision``'s prefill instance and decodes on another: a decode instance other
    than the prefill one (the same one twice is colocated, on a PREFILL instance too: the pairing routers' Splitwise
    borrow), or none named with a PREFILL instance (``prefill_only``: it prefills, then hands off to the decoder
    the router names after the prefill, ``_decoder_after_prefill``) -- and more than one token to make (a one-token
    request ends with its prefill). ``Simulator._on_arrival`` decides alike."""
    if rec.remaining_tokens <= 1:
        return False
    if decision.decode_instance is None:
        return prefill_only
    return decision.decode_instance != decision.prefill_instance


def _ended(ref: Any) -> bool:
    """Whether the task behind ``ref`` has ended (its value or its error exists), without fetching the value."""
    if isinstance(ref, ray.ObjectRef):
        return bool(ray.wait([ref], timeout=0, fetch_local=False)[0])
    return bool(ref.done())  # an in-process handle's future (tests/test_chaos.py)


def _cancel(ref: Any) -> None:
    """Call off the task behind ``ref`` (an actor task: its coroutine is cancelled); tasks waiting on it fail."""
    if isinstance(ref, ray.ObjectRef):
        ray.cancel(ref)
    else:
        ref.cancel()


async def _failed(ref: Any) -> bool:
    """Whether the task behind ``ref`` failed (fetches its value otherwise: only on a submit's error path)."""
    try:
        await ref
    except Exception:  # noqa: BLE001 - any error of the task is the answer
        return True
    return False


def _is_lost(e: RayTaskError) -> bool:
    cause = getattr(e, "cause", None)
    # LookupError: the KV is gone from its source (vLLM's LookupError, the simulated backend's KeyError).
    return isinstance(cause, (*_DEAD, LookupError, GetTimeoutError)) or "ActorDied" in str(e)
