"""Live migration of a running request with its KV state: the protocol state machine and its driver.

One migration moves request R from source A to destination B (Llumnix, Sun et al., OSDI 2024)::

    ingress (driver)              source A (owns R until COMMITTED)         destination B
    ----------------              ---------------------------------         -------------
    HANDSHAKE  ---- context_tokens(R) -->                                   reserve(R, ctx + headroom)
                                                                            -> refused: ABORTED_DST (nothing held;
                                                                               also when R's prompt + max_tokens
                                                                               could never fit on B)
    STAGING    ---- export(R, from) --> copy of the filled blocks ---kv---> stage(R, piece)     (repeat while the
                    R keeps decoding on A                                   pieces shrink, <= max_stages)
    FINAL_COPY ---- stop(R, from) ----> pause R (KV kept), copy the last
                                        blocks + request state  ---kv+state--> commit(R): stage the last piece,
                                                                            admit R with its token history, load
                                                                            the KV, restore the sampler's RNG
    COMMITTED  ---- release(R) ------>  free R (its stream ends "migrated";  B streams R from the next index
                                        the ingress follows R to B)
    any abort  ---- resume(R) ------->  R continues on A                    cancel(R): free reservation + staged

``MigrationState`` and ``TRANSITIONS`` are the whole lifecycle; every abort is an ``AbortRecord`` naming the side
that aborted, the state it aborted in, and who frees what (``FREES``). The driver ``run_migration`` talks to the
two sides through ``SourceOps`` / ``DestinationOps`` (plain async protocols: the control plane adapts Ray actor
calls to them; tests can pass fakes), so it holds no Ray, no engine and no stream logic.

Modes (``MigrationMode``) share the driver, so the benchmark compares like with like:

* ``LIVE``: the multi-stage protocol above;
* ``BLOCKING``: no pre-copy stages: stop R, copy all of its KV, commit (downtime grows with the context);
* ``RECOMPUTE``: stop R, copy nothing, B re-prefills prompt + generated tokens (Llumnix's baseline).
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from scheduler.config.models import ClusterConfig
    from scheduler.policy.migration import MigrationPolicy


class MigrationState(enum.IntEnum):
    """Lifecycle of one migration. Members from ``COMMITTED`` on are terminal."""

    PENDING = 0
    HANDSHAKE = 1  # asking B to reserve KV for R
    STAGING = 2  # pre-copy stages while R keeps decoding on A
    FINAL_COPY = 3  # R paused on A; last blocks + state moving; B admitting R
    COMMITTED = 10  # B streams R; A freed it
    ABORTED_SRC = 11  # the source side ended it (R finished / is not migratable / A failed)
    ABORTED_DST = 12  # the destination side ended it (refused, failed, died, timed out)

    @property
    def is_terminal(self) -> bool:
        return self >= MigrationState.COMMITTED


S = MigrationState
TRANSITIONS: dict[MigrationState, frozenset[MigrationState]] = {
    S.PENDING: frozenset({S.HANDSHAKE, S.ABORTED_SRC, S.ABORTED_DST}),
    S.HANDSHAKE: frozenset({S.STAGING, S.FINAL_COPY, S.ABORTED_SRC, S.ABORTED_DST}),
    S.STAGING: frozenset({S.STAGING, S.FINAL_COPY, S.ABORTED_SRC, S.ABORTED_DST}),
    S.FINAL_COPY: frozenset({S.COMMITTED, S.ABORTED_SRC, S.ABORTED_DST}),
    S.COMMITTED: frozenset(),
    S.ABORTED_SRC: frozenset(),
    S.ABORTED_DST: frozenset(),
}


class Side(enum.Enum):
    SOURCE = "source"
    DESTINATION = "destination"
    DRIVER = "driver"  # the driver's caller gave up (cancelled): R stays on its source, as after a source abort


# Who frees what when a migration aborts in a given state (the source always keeps R until COMMITTED).
FREES: dict[MigrationState, str] = {
    S.PENDING: "nothing held",
    S.HANDSHAKE: "destination frees its reservation (if it made one); source untouched",
    S.STAGING: "destination frees its reservation and staged pieces; source untouched (R kept decoding)",
    S.FINAL_COPY: "destination frees its reservation, staged pieces and any admitted copy of R; "
    "source resumes R (it was paused, KV kept)",
}


class MigrationMode(enum.Enum):
    LIVE = "live"
    BLOCKING = "blocking"
    RECOMPUTE = "recompute"

    @classmethod
    def parse(cls, value: str | MigrationMode) -> MigrationMode:
        if isinstance(value, MigrationMode):
            return value
        try:
            return cls(value)
        except ValueError:
            raise ValueError(
                f"mode: unknown migration mode {value!r}; allowed: {', '.join(m.value for m in cls)}"
            ) from None


@dataclass(frozen=True, slots=True)
class MigrationConfig:
    """Knobs of the protocol.

    Args:
        mode: live (multi-stage), blocking (one stop-and-copy of everything) or recompute (re-prefill on B).
        max_stages: pre-copy stages at most (the final stop-and-copy comes on top).
        last_stage_max_tokens: go to the final stop-and-copy once a pre-copy stage moved at most this many new
            tokens (what is left for the downtime is then about that much).
        headroom_tokens: B reserves KV for the current context plus this many tokens (R grows meanwhile).
        step_timeout_s: each remote step (reserve, one stage, stop+commit, release) must answer within this;
            otherwise the side that did not answer is taken as failed and the migration aborts.
        preadmit: the destination admits R (held out of scheduling) during the first pre-copy stage, so the
            commit only appends the tail instead of admitting a whole history (work proportional to the context
            off the stop-and-copy; Llumnix pre-allocates likewise). Backends without it ignore it.
    """

    mode: MigrationMode = MigrationMode.LIVE
    max_stages: int = 4
    last_stage_max_tokens: int = 64
    headroom_tokens: int = 64
    step_timeout_s: float = 10.0
    preadmit: bool = True

    def __post_init__(self) -> None:
        if self.max_stages < 1:
            raise ValueError(f"max_stages: must be >= 1, got {self.max_stages}")
        if self.last_stage_max_tokens < 0:
            raise ValueError(f"last_stage_max_tokens: must be >= 0, got {self.last_stage_max_tokens}")
        if self.headroom_tokens < 0:
            raise ValueError(f"headroom_tokens: must be >= 0, got {self.headroom_tokens}")
        if self.step_timeout_s <= 0:
            raise ValueError(f"step_timeout_s: must be > 0, got {self.step_timeout_s}")


def migration_config(config: ClusterConfig) -> MigrationConfig:
    """Protocol knobs from ``policies.migration.params.protocol`` (max_stages, last_stage_max_tokens, ...): the live
    ingress's and the simulator's (``sim/migration.py``)."""
    spec = config.policies.migration
    raw = dict((spec.params.get("protocol") or {}) if spec is not None else {})
    if spec is not None and "headroom_tokens" in spec.params:  # one headroom: ``migration_policy``
        raw.setdefault("headroom_tokens", spec.params["headroom_tokens"])
    if "mode" in raw:
        raw["mode"] = MigrationMode.parse(raw["mode"])
    try:
        return MigrationConfig(**raw)
    except TypeError as e:
        raise ValueError(f"policies.migration.params.protocol: {e}") from None


def migration_policy(config: ClusterConfig) -> MigrationPolicy | None:
    """The policy ``policies.migration`` names, planning with the headroom the protocol reserves on a destination:
    one value, ``protocol.headroom_tokens`` (the policy's ``headroom_tokens`` param, given alone, sets both). With two
    values the policy planned moves the destination then refused (each refusal costing the request its
    ``request_cooldown_s``), or kept free KV the protocol never asked for."""
    from scheduler.policy.migration import make_migration_policy

    spec = config.policies.migration
    if spec is None:
        return None
    params = dict(spec.params)
    protocol = params.pop("protocol", None) or {}
    if "headroom_tokens" in protocol:
        params["headroom_tokens"] = migration_config(config).headroom_tokens
    return make_migration_policy(spec.name, **params)


def check_one_headroom(params: dict[str, Any]) -> None:
    """Config validation: ``policies.migration.params.headroom_tokens`` and ``protocol.headroom_tokens`` are one
    value (``migration_policy``); two that differ are refused naming both."""
    protocol = params.get("protocol") or {}
    if "headroom_tokens" in params and "headroom_tokens" in protocol and (
            params["headroom_tokens"] != protocol["headroom_tokens"]):
        raise ValueError(f"policies.migration.params.headroom_tokens ({params['headroom_tokens']}) differs from "
                         f"policies.migration.params.protocol.headroom_tokens ({protocol['headroom_tokens']}): the "
                         "policy plans with the headroom the destination reserves; give one")


@dataclass(frozen=True, slots=True)
class MigrationSnapshot:
    """R's state at the stop point (what B needs besides KV): the tokens so far (prompt + outputs) from
    ``token_offset`` on, how many of all tokens are outputs, and the sampler's RNG state (``None`` for greedy /
    unseeded requests or backends without one). Stop conditions and sampling parameters travel in the request
    template.

    ``token_offset > 0``: B already holds the earlier tokens with the staged KV pieces (each piece carries its
    token ids), so the stop-and-copy does not ship the whole history again; ``with_prefix`` joins them.

    ``predicted_output_tokens``: the response's length guess as the source's stream last read it, renewed there if
    it ran out (``Instance.migrate_stop`` sets it): B counts it down from there, as the simulator's migration
    carries its engine model's guess, rather than renewing the request's original guess afresh."""

    request_id: str
    token_ids: tuple[int, ...]
    num_output_tokens: int
    rng_state: bytes | None = None
    token_offset: int = 0
    predicted_output_tokens: float | None = None

    def with_prefix(self, staged: Sequence[int]) -> tuple[int, ...]:
        """Every token, given the staged tokens ``staged`` (at least ``token_offset`` of them)."""
        if len(staged) < self.token_offset:
            raise ValueError(f"token_offset: {self.token_offset} tokens needed from the staged KV, "
                             f"{len(staged)} staged")
        return tuple(staged[: self.token_offset]) + self.token_ids


@dataclass(frozen=True, slots=True)
class AbortRecord:
    side: Side
    state: MigrationState  # the state the migration was in when it aborted
    reason: str
    frees: str


@dataclass(slots=True)
class Migration:
    """One migration's state machine and timeline (``advance`` refuses transitions outside ``TRANSITIONS``)."""

    request_id: str
    source: str
    destination: str
    config: MigrationConfig = MigrationConfig()
    state: MigrationState = MigrationState.PENDING
    stages: list[int] = field(default_factory=list)  # tokens copied per pre-copy stage
    final_tokens: int = 0  # tokens copied in the stop-and-copy
    abort: AbortRecord | None = None
    history: list[tuple[MigrationState, float]] = field(default_factory=list)
    t_stop: float = 0.0  # perf_counter when R was paused (stop issued)
    t_commit: float = 0.0  # perf_counter when B admitted R

    def __post_init__(self) -> None:
        self.history.append((self.state, time.perf_counter()))

    def advance(self, new: MigrationState) -> None:
        if new not in TRANSITIONS[self.state]:
            raise ValueError(f"migration {self.request_id}: illegal transition {self.state.name} -> {new.name}")
        self.state = new
        self.history.append((new, time.perf_counter()))

    def fail(self, side: Side, reason: str) -> AbortRecord:
        before = self.state
        rec = AbortRecord(side, before, reason, FREES.get(before, "nothing held"))
        self.advance(MigrationState.ABORTED_DST if side is Side.DESTINATION else MigrationState.ABORTED_SRC)
        self.abort = rec
        return rec

    @property
    def committed(self) -> bool:
        return self.state is MigrationState.COMMITTED

    @property
    def total_s(self) -> float:
        return self.history[-1][1] - self.history[0][1]

    @property
    def downtime_s(self) -> float:
        """Driver-side downtime: stop issued -> B admitted R (the client-side gap adds one poll)."""
        return max(self.t_commit - self.t_stop, 0.0) if self.t_commit else 0.0


# ---- the two sides, as the driver sees them -------------------------------------------------------------------
class StepFailed(Exception):
    """A side could not perform a step (it answered with a failure, raised, died or timed out)."""

    def __init__(self, side: Side, reason: str) -> None:
        super().__init__(reason)
        self.side = side
        self.reason = reason


class SourceOps(Protocol):
    async def context_tokens(self) -> int | None:
        """Tokens of R's context on A now (``None``: R is not decoding there, e.g. finished or queued)."""
        ...

    def export(self, start_token: int) -> Any:
        """Start copying R's filled blocks from ``start_token`` (block-aligned down) while R keeps decoding.
        Returns a handle the destination's ``stage`` resolves (e.g. an ObjectRef: the KV goes A -> B directly)."""
        ...

    def stop(self, start_token: int) -> Any:
        """Pause R and copy the blocks from ``start_token`` plus its ``MigrationSnapshot``; returns a handle the
        destination's ``commit`` resolves (``None`` inside it: R already finished on A)."""
        ...

    async def resume(self) -> bool:
        """Abort path: R continues on A. Returns whether it was paused."""
        ...

    async def release(self) -> None:
        """Commit path: A frees R (its stream there ends with ``finish_reason="migrated"``)."""
        ...


class DestinationOps(Protocol):
    async def reserve(self, tokens: int) -> str | None:
        """Reserve KV for ``tokens``; ``None`` on success, else why not (also when R's whole context, prompt +
        max_tokens, could never fit on B: the commit would refuse it after R paused for the stop)."""
        ...

    async def stage(self, piece: Any) -> int:
        """Receive one pre-copy piece (resolves the source's handle); returns the end token staged so far.
        Raises ``StepFailed(Side.SOURCE, ...)`` when the source could not produce the piece."""
        ...

    async def commit(self, stopped: Any, mode: MigrationMode) -> str | None:
        """Stage the final piece and admit R from its snapshot (``stopped`` is the source's ``stop`` handle).
        ``None`` on success; ``"source: ..."`` when the source had nothing to stop; else why B failed."""
        ...

    async def cancel(self) -> None:
        """Free the reservation, staged pieces and any admitted copy of R."""
        ...


async def _step(side: Side, what: str, aw: Awaitable[Any], timeout_s: float) -> Any:
    try:
        return await asyncio.wait_for(aw, timeout_s)
    except StepFailed:
        raise
    except TimeoutError:
        raise StepFailed(side, f"{what}: no answer in {timeout_s:.1f}s") from None
    except Exception as e:  # noqa: BLE001 - a dead actor or a bug on that side: the migration aborts cleanly
        cause = getattr(e, "cause", None) or e  # Ray wraps a remote exception; name the original
        text = str(cause).strip().splitlines()
        raise StepFailed(side, f"{what}: {type(cause).__name__}: {text[-1] if text else ''}") from None


async def run_migration(
    m: Migration,
    src: SourceOps,
    dst: DestinationOps,
    *,
    on_committed: Callable[[], Awaitable[None] | None] | None = None,
) -> Migration:
    """Drive ``m`` to a terminal state. Never raises for a side's failure: the outcome is ``m.state`` and
    ``m.abort``; cleanup (destination cancel, source resume) has been done when it returns.

    ``on_committed`` runs after B admitted R and before A releases it (the ingress switches the stream there).
    """
    cfg = m.config
    t = cfg.step_timeout_s
    reserved = False
    try:
        m.advance(MigrationState.HANDSHAKE)
        ctx = await _step(Side.SOURCE, "context", src.context_tokens(), t)
        if ctx is None:
            raise StepFailed(Side.SOURCE, "request is not decoding on the source")
        reserved = True  # from here a destination cancel is due on abort (a refused reserve holds nothing)
        refusal = await _step(Side.DESTINATION, "reserve", dst.reserve(ctx + cfg.headroom_tokens), t)
        if refusal is not None:
            reserved = False
            raise StepFailed(Side.DESTINATION, f"reserve refused: {refusal}")
        start = 0
        if cfg.mode is MigrationMode.LIVE and ctx > cfg.last_stage_max_tokens:
            prev_end = 0
            while len(m.stages) < cfg.max_stages:
                m.advance(MigrationState.STAGING)
                piece = src.export(start)
                end = await _step(Side.DESTINATION, f"stage {len(m.stages) + 1}", dst.stage(piece), t)
                m.stages.append(end - start)
                new_tokens = end - prev_end
                prev_end = end
                start = end  # the source rounds down to a block: the partial last block is re-sent, fuller
                if new_tokens <= cfg.last_stage_max_tokens:
                    break
        elif cfg.mode is MigrationMode.RECOMPUTE:
            start = -1  # the source copies no KV
        m.advance(MigrationState.FINAL_COPY)
        m.t_stop = time.perf_counter()
        err = await _step(Side.DESTINATION, "commit", dst.commit(src.stop(start), cfg.mode), t)
        if err is not None:
            if err.startswith("source:"):
                raise StepFailed(Side.SOURCE, err.split(":", 1)[1].strip())
            raise StepFailed(Side.DESTINATION, f"commit: {err}")
        m.t_commit = time.perf_counter()
        m.advance(MigrationState.COMMITTED)
    except StepFailed as e:
        state = m.state
        m.fail(e.side, e.reason)
        await _undo(state, reserved, src, dst, t)
        return m
    except asyncio.CancelledError:
        # The caller gave up mid-way (an admin RPC's deadline, a cancelled drain). Undo exactly as for a failure,
        # shielded from the cancellation, then re-raise: otherwise R stays paused on A for good (the ingress keeps
        # polling it, so no lease ever frees it) and B keeps its reservation / admitted copy.
        state = m.state
        m.fail(Side.DRIVER, "the migration's caller cancelled it")
        await asyncio.shield(_undo(state, reserved, src, dst, t))
        raise
    if on_committed is not None:
        res = on_committed()
        if res is not None:
            await res
    try:
        await _step(Side.SOURCE, "release", src.release(), t)
    except StepFailed:
        pass  # R is on B already; a dead source has nothing left to free
    return m


async def _undo(state: MigrationState, reserved: bool, src: SourceOps, dst: DestinationOps, t: float) -> None:
    """Abort cleanup of a migration that was in ``state``: B frees what it holds, a paused R resumes on A."""
    if reserved:
        try:
            await _step(Side.DESTINATION, "cancel", dst.cancel(), t)
        except StepFailed:
            pass  # a dead destination frees everything with its process
    if state is MigrationState.FINAL_COPY:
        try:
            await _step(Side.SOURCE, "resume", src.resume(), t)
        except StepFailed:
            pass  # a dead source is the ingress' recovery case
