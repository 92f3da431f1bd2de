"""Online length learning: the deployment's own finished requests sharpen the trace predictor's guesses.

The shipped trace predictor knows the public traces it was fitted on; a deployment's traffic is rarely one of them
(the Intelligent Router mix: its ~130-token guesses are the same for a 30-token and a 550-token class). Every
finished request tells the ingress (and the simulator) its input and output length, so ``OnlineLengths`` keeps
P(output bucket | input bucket) counts of them and folds them into each prediction as a Dirichlet posterior whose
prior is the predictor's own distribution at ``strength`` pseudo-counts: an input bucket with no history keeps the
shipped guess; after ``strength`` finished requests it is half history. Counts decay so that a row holds at most
``memory`` requests' worth: the mix a deployment serves drifts (re-roling exists for that), and old traffic should
stop voting.

Only predictions from length alone (requests without text, and the trace predictor's, which never reads the text)
are adjusted (``ServingPredictor.predict_dist``). A text predictor's distribution is specific to its prompt; one
histogram per input bucket would wash its signal out.

Per tenant (``TenantLengths``, what ``params: {online: true}`` runs): a multi-tenant deployment mixes its apps'
length distributions in one input bucket (a chat app's 30-token answers and a summariser's 600-token ones), so a
request that names a tenant (gRPC field 11, ``ServingPredictor.tenant_for``) reads that tenant's own history, with
the others' as its prior: while its history is short it gets what the rest of the traffic says, and its own
requests take over after ``strength`` of them. A request with no tenant reads the shared history of every request,
as before. Memory is bounded: at most ``max_tenants`` histories (a fixed table each, counts decayed past
``memory``) plus one per ``pinned`` tenant. Once they are all taken, a new tenant replaces the one observed least
recently only after it has sent ``admit_after`` requests and at least as many as that one (TinyLFU's admission rule,
counted in ``TenantSketch``, a fixed-size count-min sketch): a flood of made-up names, each sent a few times, cannot
push an established tenant's history out; ``pinned`` tenants (an operator's allow-list) are never replaced.
"""

from __future__ import annotations

import hashlib
import threading
from array import array
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

import numpy as np

from scheduler.predict.base import BUCKET_EDGES, LengthPrediction, bucket_of
from scheduler.predict.trace import INPUT_EDGES


class Sample(NamedTuple):
    """One finished request as ``TenantLengths.observe`` took it: what another ingress (or the Controller) needs to
    learn it exactly the same way (``scheduler/predict/shared.py``). ``prior``: the probabilities of the
    length-only prediction a cut request was spread by (only those are read), else None."""

    prompt_tokens: int
    output_tokens: int
    cut: bool
    prior: tuple[float, ...] | None
    tenant: str | None


class OnlineLengths:
    """Counts of finished requests' (input bucket, output bucket), and the posterior they give a prediction.

    Args:
        strength: pseudo-counts the predictor's distribution weighs as (the prior's weight in requests).
        memory: a row's counts are scaled down past this many requests (exponential forgetting).
    """

    def __init__(
        self,
        *,
        strength: float = 20.0,
        memory: float = 1000.0,
        input_edges: Sequence[int] = INPUT_EDGES,
        edges: Sequence[int] = BUCKET_EDGES,
    ) -> None:
        if not strength > 0 or not memory > 0:
            raise ValueError(f"OnlineLengths: strength and memory must be > 0, got {strength}, {memory}")
        self.strength, self.memory = float(strength), float(memory)
        self.input_edges, self.edges = tuple(input_edges), tuple(edges)
        self.counts = np.zeros((len(self.input_edges) - 1, len(self.edges) - 1))
        self.observed = 0

    def fresh(self) -> OnlineLengths:
        """The same settings without history (a new replay starts from the shipped guesses)."""
        return OnlineLengths(
            strength=self.strength, memory=self.memory, input_edges=self.input_edges, edges=self.edges
        )

    def observe(
        self, prompt_tokens: int, output_tokens: int, *, cut: bool = False, prior: LengthPrediction | None = None
    ) -> None:
        """One finished request. ``cut``: it stopped at ``output_tokens`` because of ``max_tokens`` (or the
        context), so its own length is only known to be longer. Booked at that length, every client cap would
        pull the guesses down to it; instead its one count is spread over the buckets past ``output_tokens`` as
        the posterior for its input bucket spreads there (Efron's redistribution to the right, as Kaplan-Meier
        does). ``prior``: the predictor's length-only distribution for the request (without it, the history
        alone; with no history past the cut, the cut's own bucket: a lower bound)."""
        row = self.counts[bucket_of(prompt_tokens, self.input_edges)]
        weights = np.zeros_like(row)
        if cut:
            if prior is not None:
                self._check(prior)  # (``adjust`` checks it only once there is history)
            # The posterior ``adjust`` gives the prior; without one, the history alone.
            post = self.adjust(prior, prompt_tokens) if prior is not None else (
                LengthPrediction.from_probs(row.tolist(), self.edges) if row.any() else None)
            if post is not None:
                weights = np.asarray(post.mass_above(output_tokens))
        if weights.sum() > 0.0:
            row += weights / weights.sum()
        else:
            row[bucket_of(output_tokens, self.edges)] += 1.0
        total = row.sum()
        if total > self.memory:
            row *= self.memory / total
        self.observed += 1

    def _check(self, prediction: LengthPrediction) -> None:
        if prediction.bucket_edges != self.edges:
            raise ValueError(
                f"prediction buckets {prediction.bucket_edges} are not the online counts' {self.edges}"
            )

    def adjust(self, prediction: LengthPrediction, prompt_tokens: int) -> LengthPrediction:
        """``prediction`` updated with the history of its input bucket (unchanged without history)."""
        row = self.counts[bucket_of(prompt_tokens, self.input_edges)]
        if not row.any():
            return prediction
        self._check(prediction)
        post = self.strength * np.asarray(prediction.probs) + row
        return LengthPrediction.from_probs(post.tolist(), self.edges)


class TenantSketch:
    """Approximate request counts per tenant name in a fixed table (a count-min sketch: ``depth`` rows of ``width``
    counters, a name's count the least of its ``depth`` counters, so never under its true count). Every ``width``
    names counted, all counters are halved (TinyLFU's reset): a count is recent traffic, and the counters a flood of
    distinct names fills stay low (~2 per counter on average), so a name sent once reads ~0-2, far below an active
    tenant's. Memory: ``depth * width`` uint32, whatever the number of names.

    Hashing is blake2b under a fixed ``key`` (a simulated replay admits the same tenants every run). A made-up name
    reads high only where all ``depth`` of its counters collide with busy names: at the default size 2^-48 per name
    against one busy tenant, so names crafted to ride on a real tenant's count take ~10^14 tries.
    """

    def __init__(self, width: int = 4096, depth: int = 4, key: bytes = b"llmsched-tenants") -> None:
        if width < 1 or depth < 1 or depth > 8:
            raise ValueError(f"TenantSketch: width must be >= 1 and depth 1..8, got {width}, {depth}")
        self.width, self.depth, self.key = int(width), int(depth), bytes(key)
        # Flat, row after row; an ``array`` (not numpy): a handful of scalar reads per request, ~10x faster so.
        self.table = array("I", bytes(4 * self.depth * self.width))
        self._view = np.frombuffer(self.table, dtype=np.uint32)  # the same memory (``table`` never resizes)
        self._added = 0

    def _cells(self, name: str) -> list[int]:
        digest = hashlib.blake2b(name.encode("utf-8", "surrogatepass"), digest_size=4 * self.depth,
                                 key=self.key).digest()
        w = self.width
        return [r * w + h % w for r, h in enumerate(memoryview(digest).cast("I"))]  # (native byte order)

    def add(self, name: str) -> int:
        """Counts one request of ``name``; returns its count now."""
        t = self.table
        cells = self._cells(name)
        for c in cells:
            t[c] += 1
        count = min(t[c] for c in cells)
        self._added += 1
        if self._added >= self.width:
            np.right_shift(self._view, 1, out=self._view)  # in place, through numpy: ~ms for a 10k-tenant table
            self._added = 0
        return count

    def count(self, name: str) -> int:
        return min(self.table[c] for c in self._cells(name))


class TenantLengths:
    """``OnlineLengths`` per tenant over a shared one: what ``ServingPredictor.online`` holds.

    ``shared`` learns every finished request and is what a request of no tenant reads (one history per ingress, as
    before tenants had their own: a deployment whose requests name no tenant predicts exactly as it did). A named
    tenant's prediction is its own history's posterior whose prior is the *other* requests' posterior (the
    predictor's distribution updated with every history but its own, so nothing is counted twice): no history of
    its own -> the rest of the traffic's guess; after ``strength`` requests of its own in an input bucket, half its
    own. Alone in the deployment, a tenant's prior is the predictor's distribution: the shared history's numbers.

    A tenant without a history (not admitted yet, or replaced) learns into and reads the shared one, as a request of
    no tenant does.

    Args:
        max_tenants: tenants with a history of their own besides ``pinned`` (0: the pinned ones only). A new tenant
            takes a free one at once; once all are taken, it replaces the one observed least recently (whose counts
            join the untracked ones: the others' history keeps them) when it has sent ``admit_after`` requests and
            at least as many as that one (recent counts: ``TenantSketch``).
        admit_after: requests a new tenant sends before it may replace another's history (1: at its first, if the
            one it replaces has sent no more).
        pinned: tenants with a history of their own from the start, never replaced (an allow-list of known apps).
        strength, memory, input_edges, edges: each history's (``OnlineLengths``).
    """

    def __init__(
        self,
        *,
        max_tenants: int = 64,
        admit_after: int = 8,
        pinned: Iterable[str] = (),
        strength: float = 20.0,
        memory: float = 1000.0,
        input_edges: Sequence[int] = INPUT_EDGES,
        edges: Sequence[int] = BUCKET_EDGES,
    ) -> None:
        pinned = tuple(dict.fromkeys(str(t) for t in pinned))  # (order kept, repeats once)
        if max_tenants < 0 or (max_tenants == 0 and not pinned):
            raise ValueError(f"TenantLengths: max_tenants must be >= 1 (or 0 with pinned tenants), got {max_tenants}")
        if admit_after < 1:
            raise ValueError(f"TenantLengths: admit_after must be >= 1, got {admit_after}")
        self.max_tenants, self.admit_after, self.pinned = int(max_tenants), int(admit_after), pinned
        self.shared = OnlineLengths(strength=strength, memory=memory, input_edges=input_edges, edges=edges)
        self.strength, self.memory, self.edges = self.shared.strength, self.shared.memory, self.shared.edges
        # Slot 0: the requests of no tenant with a history (none named, or replaced); 1..len(pinned): the pinned
        # tenants'; then one per admitted tenant. One table, so the others' counts of an input bucket are one sum
        # (``_total``, kept at ``observe``).
        self._slots = np.zeros((len(pinned) + self.max_tenants + 1, *self.shared.counts.shape))
        self._total = np.zeros_like(self.shared.counts)
        self._rest = self._history(0)
        self._pinned = {t: self._history(k + 1) for k, t in enumerate(pinned)}
        self.tenants: OrderedDict[str, OnlineLengths] = OrderedDict()  # admitted, least recently observed first
        self._slot: dict[str, int] = {}
        # ~64 counters per history (at least 4096): a tenant sending ~0.1% of the named requests or more reads
        # past ``admit_after`` = 8 at its steady state (2 x its share x width), a name sent once ~0-2.
        self.sketch = TenantSketch(width=max(4096, 1 << (64 * self.max_tenants - 1).bit_length()))
        self.unadmitted = 0  # requests whose tenant had no history of its own (learned into the shared one)
        # When a list: every ``observe`` is appended as a ``Sample`` (what an ingress reports: ``SharedLengths``).
        self.journal: list[Sample] | None = None
        # NOTE: a prediction may run in a worker thread (a slow predictor, a long text: ``Ingress._predict``) while
        # the event loop observes. One observe writes the tenant's row, decays it, then ``_total`` and the shared
        # row: read in between, a tenant's prior lost its own new count from the others' (``_total`` less the
        # row) and its row stood past ``memory``. Each observe, adjust and state load holds this lock.
        self._lock = threading.Lock()

    def _history(self, slot: int) -> OnlineLengths:
        h = self.shared.fresh()
        h.counts = self._slots[slot]  # a view: its observe writes the table
        return h

    @property
    def observed(self) -> int:
        return self.shared.observed

    def fresh(self) -> TenantLengths:
        """The same settings without history (a new replay starts from the shipped guesses)."""
        s = self.shared
        return TenantLengths(max_tenants=self.max_tenants, admit_after=self.admit_after, pinned=self.pinned,
                             strength=s.strength, memory=s.memory, input_edges=s.input_edges, edges=s.edges)

    def history(self, tenant: str | None) -> OnlineLengths | None:
        """``tenant``'s own history (pinned or admitted), else None."""
        if tenant is None:
            return None
        return self._pinned.get(tenant) or self.tenants.get(tenant)

    def _tenant_prior(self, own: OnlineLengths, prediction: LengthPrediction, prompt_tokens: int
                      ) -> LengthPrediction:
        """``prediction`` updated with every history but ``own``'s (unchanged where there is none)."""
        b = bucket_of(prompt_tokens, self.shared.input_edges)
        # (a float sum less one of its terms: clipped at 0; exactly 0 where ``own`` is the only history)
        others = np.maximum(self._total[b] - own.counts[b], 0.0)
        if not others.any():
            return prediction
        self.shared._check(prediction)
        return LengthPrediction.from_probs((self.strength * np.asarray(prediction.probs) + others).tolist(),
                                           self.edges)

    def adjust(self, prediction: LengthPrediction, prompt_tokens: int, tenant: str | None = None
               ) -> LengthPrediction:
        """``prediction`` updated with the history of ``tenant`` (a tenant without one, or none: the shared)."""
        with self._lock:
            own = self.history(tenant)
            if own is None:
                return self.shared.adjust(prediction, prompt_tokens)
            return own.adjust(self._tenant_prior(own, prediction, prompt_tokens), prompt_tokens)

    def observe(
        self,
        prompt_tokens: int,
        output_tokens: int,
        *,
        cut: bool = False,
        prior: LengthPrediction | None = None,
        tenant: str | None = None,
    ) -> None:
        """One finished request of ``tenant`` (``OnlineLengths.observe``; a cut one is spread as its tenant's
        posterior spreads): the shared history learns it, and its tenant's (a new tenant gets one, if admitted)."""
        if self.journal is not None:
            self.journal.append(Sample(int(prompt_tokens), int(output_tokens), bool(cut),
                                       None if prior is None else tuple(prior.probs), tenant))
        with self._lock:
            own = self._own(tenant)
            own_prior = prior if prior is None or own is self._rest else self._tenant_prior(own, prior, prompt_tokens)
            own.observe(prompt_tokens, output_tokens, cut=cut, prior=own_prior)
            b = bucket_of(prompt_tokens, self.shared.input_edges)
            self._total[b] = self._slots[: self._in_use, b].sum(axis=0)
            self.shared.observe(prompt_tokens, output_tokens, cut=cut, prior=prior)

    def replay(self, samples: Iterable[Sample]) -> None:
        """Learns ``samples`` as ``observe`` learned them (not journaled): the same samples in the same order give
        the same tables, bit for bit, wherever they are replayed."""
        journal, self.journal = self.journal, None
        try:
            for s in samples:
                prior = None if s.prior is None else LengthPrediction(self.edges, s.prior, 0.0)  # (probs alone read)
                self.observe(s.prompt_tokens, s.output_tokens, cut=s.cut, prior=prior, tenant=s.tenant)
        finally:
            self.journal = journal

    def settings(self) -> tuple[Any, ...]:
        """What two histories must share for one's samples and state to mean the same in the other."""
        s = self.shared
        return (self.max_tenants, self.admit_after, self.pinned, s.strength, s.memory, s.input_edges, s.edges)

    @classmethod
    def from_settings(cls, settings: Sequence[Any]) -> TenantLengths:
        """A new one with ``settings`` (``settings()`` of another): the Controller's merged histories."""
        max_tenants, admit_after, pinned, strength, memory, input_edges, edges = settings
        return cls(max_tenants=max_tenants, admit_after=admit_after, pinned=pinned, strength=strength,
                   memory=memory, input_edges=input_edges, edges=edges)

    def state(self) -> dict[str, Any]:
        """Everything learned, copied (``load_state`` puts it back): the histories in use (the others are zeros) and
        the sketch, ~70 KB pickled with a few tenants, ~177 KB with all 64 (the default) taken."""
        return {"settings": self.settings(), "slots": self._slots[: self._in_use].copy(), "total": self._total.copy(),
                "shared": self.shared.counts.copy(), "observed": self.shared.observed,
                "sketch": bytes(self._table_bytes()), "added": self.sketch._added, "unadmitted": self.unadmitted,
                "tenants": [(t, self._slot[t], h.observed) for t, h in self.tenants.items()],
                "rest": [h.observed for h in (self._rest, *self._pinned.values())]}

    def _table_bytes(self) -> memoryview:
        return memoryview(self.sketch.table).cast("B")

    def load_state(self, state: dict[str, Any]) -> None:
        """Replaces what this one learned with ``state`` (``state()`` of one with the same ``settings``), in place:
        the histories handed out before read the new counts."""
        if tuple(state["settings"]) != self.settings():
            raise ValueError(f"TenantLengths.load_state: settings {state['settings']} are not {self.settings()}")
        with self._lock:
            self._load_state(state)

    def _load_state(self, state: dict[str, Any]) -> None:
        n = len(state["slots"])
        self._slots[:n] = state["slots"]
        self._slots[n:] = 0.0
        self._total[:] = state["total"]
        self.shared.counts[:] = state["shared"]
        self.shared.observed = int(state["observed"])
        self._table_bytes()[:] = state["sketch"]
        self.sketch._added = int(state["added"])
        self.unadmitted = int(state["unadmitted"])
        self.tenants.clear()
        self._slot.clear()
        for name, slot, observed in state["tenants"]:
            self._admit(name, slot).observed = observed
        for h, observed in zip((self._rest, *self._pinned.values()), state["rest"], strict=True):
            h.observed = observed

    @property
    def _in_use(self) -> int:
        return 1 + len(self.pinned) + len(self.tenants)  # slots 0..: the rest, the pinned, the admitted

    def _own(self, tenant: str | None) -> OnlineLengths:
        """The history a finished request of ``tenant`` learns into: its own (admitting it if it may), else the
        untracked requests'."""
        if tenant is None:
            return self._rest
        if (own := self._pinned.get(tenant)) is not None:
            return own
        count = self.sketch.add(tenant)
        if (own := self.tenants.get(tenant)) is not None:
            self.tenants.move_to_end(tenant)
            return own
        if len(self.tenants) < self.max_tenants:
            return self._admit(tenant, len(self._pinned) + len(self.tenants) + 1)
        if self.max_tenants and count >= self.admit_after:
            victim = next(iter(self.tenants))
            if count >= self.sketch.count(victim):
                return self._admit(tenant, self._evict(victim))
        self.unadmitted += 1
        return self._rest

    def _evict(self, name: str) -> int:
        """Frees ``name``'s slot; its counts join the untracked requests' (decayed past ``memory``)."""
        old = self.tenants.pop(name)
        slot = self._slot.pop(name)
        rest = self._rest.counts
        rest += old.counts
        over = rest.sum(axis=1) > self.memory
        rest[over] *= (self.memory / rest[over].sum(axis=1))[:, None]
        old.counts[:] = 0.0
        self._total[:] = self._slots.sum(axis=0)
        return slot

    def _admit(self, tenant: str, slot: int) -> OnlineLengths:
        self._slot[tenant] = slot
        self.tenants[tenant] = h = self._history(slot)
        return h


__all__ = ["OnlineLengths", "Sample", "TenantLengths", "TenantSketch"]
