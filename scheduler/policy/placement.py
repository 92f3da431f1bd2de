"""Placement candidates for capacity planning: which GPU type x TP x instance counts could serve a workload.

``enumerate_placements`` is the analytic first pass of the planner: the simulator-driven ``sim/planner.py`` takes
each candidate's feasibility, starting instance count and P/D share from ``instance_profile``, and simulates only
the heterogeneous P/D pairs (prefill and decode on different GPU types / TPs) this enumeration keeps::

    for each GPU type g, TP degree t, role (its pool's engine settings, ``engine`` per role):  # feasibility
        weights / t + activation reserve fit, KV holds >= one max-context request, heads divide by t
        per-instance capacity (scaling.py): prefill (M/D/1 under the TTFT SLO), decode (batch meeting TPOT and
        KV), KV-transfer link bound for prefill instances, colocated = time-shared prefill + decode
    colocated:      n = ceil(rate / mixed capacity) .. + extra
    disaggregated:  for prefill (g, t) and decode (g', t') (the same unless ``heterogeneous``):
                    n_p = ceil(rate / min(prefill, link)) .. + extra, n_d = ceil(rate / decode) .. + extra
    keep: capacity bound >= rate, GPU counts within the catalog, at most ``max_instances`` instances;
    prune: per mode, anything dominated on (cost, capacity) -- another is no dearer and serves at least as much.

Capacities are estimates at mean lengths in steady state, not bounds: on the committed Azure plans they are 9-50 %
below what the simulator serves on a short burst and above it over a steady hour (docs/scaling.md), so pruning on
them is a heuristic that can drop a configuration the simulator would rank first; the simulator decides among
the rest.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from scheduler.config.models import EngineSpec, GPUSpec, ModelSpec, PoolSpec
from scheduler.core.types import SLO, InstanceRole
from scheduler.latency import LatencyModel, latency_for
from scheduler.policy.scaling import (
    WorkloadSummary,
    decode_capacity_rps,
    engine_kv_tokens,
    instances_for,
    mixed_capacity_rps,
    prefill_capacity_rps,
)


@dataclass(frozen=True, slots=True)
class InstanceProfile:
    """Analytic capacity of one instance of ``model`` on ``tp`` GPUs of type ``gpu`` for a workload."""

    gpu: str
    tp: int
    kv_tokens: int
    prefill_rps: float
    decode_rps: float
    mixed_rps: float
    transfer_rps: float  # prompts/s whose KV the instance's network link can ship (disaggregated prefill)
    price_per_hour: float  # all its GPUs


@dataclass(frozen=True, slots=True)
class PoolPlan:
    role: InstanceRole
    gpu: str
    tp: int
    count: int

    @property
    def num_gpus(self) -> int:
        return self.tp * self.count


@dataclass(frozen=True, slots=True)
class PlacementCandidate:
    mode: str  # "colocated" | "disaggregated"
    pools: tuple[PoolPlan, ...]
    cost_per_hour: float
    capacity_rps: float  # analytic upper bound on the rate served within the SLO
    num_gpus: int

    @property
    def label(self) -> str:
        return " + ".join(f"{p.count}x{p.role.value}[{p.gpu} tp{p.tp}]" for p in self.pools)

    def to_pool_specs(self, engine: EngineSpec | Mapping[InstanceRole, EngineSpec] | None = None,
                      ) -> list[PoolSpec]:
        """Pools ready for a ``ClusterConfig``; ``engine``: every pool's settings, or each role's (as
        ``enumerate_placements`` sized them)."""
        return [PoolSpec(name=f"{p.role.value}-{p.gpu}-tp{p.tp}", role=p.role, gpu=p.gpu, tp=p.tp, count=p.count,
                         engine=_of_role(engine, p.role) or EngineSpec()) for p in self.pools]


def _of_role(x, role: InstanceRole):
    """``x`` when it is one setting for every role, else its entry for ``role`` (None when it has none)."""
    return x.get(role) if isinstance(x, Mapping) else x


def instance_profile(
    model: ModelSpec,
    gpu: GPUSpec,
    tp: int,
    slo: SLO,
    workload: WorkloadSummary,
    *,
    engine: EngineSpec | None = None,
    max_context_tokens: int | None = None,
    latency_factory: Callable[[ModelSpec, GPUSpec, int], LatencyModel] = latency_for,
) -> InstanceProfile | None:
    """Capacity of one instance, or ``None`` if the model does not fit (weights, KV for one request, TP split)."""
    eng = engine or EngineSpec()
    if not model.splits_over(tp):
        return None
    lat = latency_factory(model, gpu, tp)
    kv_tokens = engine_kv_tokens(lat, eng)
    need = max_context_tokens or min(model.max_model_len,
                                     int(workload.mean_prompt_tokens + workload.mean_output_tokens))
    # What the memory left after the weights and the activation reserve holds: ``engine_kv_tokens`` takes a
    # ``num_kv_blocks`` override as is, so with one a 70B model "fit" on a single 24 GB L4 (the engine could not
    # allocate the KV it is told to, nor load the weights).
    room = eng.block_size * lat.kv_blocks(eng.block_size, gpu_memory_utilization=eng.gpu_memory_utilization,
                                          activation_reserve_gib=eng.activation_reserve_gib)
    if kv_tokens < need or kv_tokens > room:
        return None
    p, o = workload.mean_prompt_tokens, workload.mean_output_tokens
    pre = prefill_capacity_rps(lat, p, ttft_slo_s=slo.ttft_s, chunk_tokens=eng.max_num_batched_tokens)
    dec = decode_capacity_rps(lat, p, o, tpot_slo_s=slo.tpot_s, max_batch=eng.max_num_seqs, kv_tokens=kv_tokens)
    # Prompts/s this GPU's link carries; a pair is limited by its slower end (``pair_prefill_rps``).
    link = gpu.network_gbps * 1e9 / (max(p, 1.0) * model.kv_bytes_per_token)
    return InstanceProfile(gpu.name, tp, kv_tokens, pre, dec, mixed_capacity_rps(pre, dec), link,
                           gpu.price_per_hour * tp)


def pair_prefill_rps(prefill: InstanceProfile, decode: InstanceProfile) -> float:
    """Prompts/s one PREFILL instance of ``prefill`` serves for DECODE instances of ``decode``: its prefill
    capacity, or what the KV link carries -- the slower end's (``kv_link``, as every clock times the handoff; the
    prefill side's alone counted an H100 -> A100 handoff at the H100's 50 GB/s)."""
    return min(prefill.prefill_rps, prefill.transfer_rps, decode.transfer_rps)


def _cost(pools: tuple[PoolPlan, ...],
          prof: Mapping[InstanceRole, Mapping[tuple[str, int], InstanceProfile]]) -> float:
    return sum(prof[p.role][(p.gpu, p.tp)].price_per_hour * p.count for p in pools)


def within_catalog(usage: Iterable[tuple[str, int, int]], gpus: Mapping[str, GPUSpec]) -> bool:
    """Whether (GPU type, TP, instances) uses, together per type, fit each type's ``count`` GPUs (0 = unbounded) in
    its nodes (``GPUSpec.holds``: an instance never spans nodes, so TP 3 on 8-GPU nodes is 2 per node)."""
    tps: dict[str, list[int]] = {}
    for g, tp, n in usage:
        tps.setdefault(g, []).extend([tp] * n)
    return all(gpus[g].holds(t) for g, t in tps.items())


def pareto(cands: list[PlacementCandidate]) -> list[PlacementCandidate]:
    """Drop candidates dominated on (cost, GPUs) vs capacity: sorted by cost, keep strictly rising capacity."""
    out, best = [], -1.0
    for c in sorted(cands, key=lambda c: (c.cost_per_hour, c.num_gpus, -c.capacity_rps)):
        if c.capacity_rps > best:
            out.append(c)
            best = c.capacity_rps
    return out


def enumerate_placements(
    gpus: Mapping[str, GPUSpec],
    model: ModelSpec,
    slo: SLO,
    workload: WorkloadSummary,
    *,
    tp_choices: tuple[int, ...] = (1, 2, 4, 8),
    modes: tuple[str, ...] = ("colocated", "disaggregated"),
    heterogeneous: bool = True,
    extra: int = 1,
    max_instances: int = 64,
    gpus_per_node: int = 8,
    engine: EngineSpec | Mapping[InstanceRole, EngineSpec] | None = None,
    max_context_tokens: int | Mapping[InstanceRole, int] | None = None,
    prune: bool = True,
    latency_factory: Callable[[ModelSpec, GPUSpec, int], LatencyModel] = latency_for,
) -> list[PlacementCandidate]:
    """Candidate clusters for ``workload`` under ``slo``, cheapest first (see the module docstring).

    ``engine`` / ``max_context_tokens`` (``instance_profile``'s): one for every role, or per role -- a P/D
    cluster's PREFILL pool is sized and fitted with the PREFILL entry, its DECODE pool with the DECODE one, a
    colocated pool with the MIXED one (one engine for every role sized decode with a prefill pool's settings).

    Raises:
        ValueError: an unknown mode, or a non-positive rate.
    """
    bad = [m for m in modes if m not in ("colocated", "disaggregated")]
    if bad:
        raise ValueError(f"modes: unknown {bad}; allowed: colocated, disaggregated")
    if workload.rate_rps <= 0:
        raise ValueError(f"workload.rate_rps must be > 0, got {workload.rate_rps}")
    roles = ((InstanceRole.MIXED,) if "colocated" in modes else ()) + (
        (InstanceRole.PREFILL, InstanceRole.DECODE) if "disaggregated" in modes else ())
    # Per role: an instance's capacity and fit come from the engine settings of the pool it would run in.
    prof: dict[InstanceRole, dict[tuple[str, int], InstanceProfile]] = {r: {} for r in roles}
    # Keyed by the mapping's keys (a config's GPU names), not GPUSpec.name: pools name GPUs by key.
    for key, g in gpus.items():
        for tp in tp_choices:
            if tp > gpus_per_node or not g.holds([tp]):
                continue
            for role in roles:
                pr = instance_profile(model, g, tp, slo, workload, engine=_of_role(engine, role),
                                      max_context_tokens=_of_role(max_context_tokens, role),
                                      latency_factory=latency_factory)
                if pr is not None:
                    prof[role][(key, tp)] = pr
    rate = workload.rate_rps
    cands: list[PlacementCandidate] = []

    def add(mode: str, pools: tuple[PoolPlan, ...], capacity: float) -> None:
        fits = within_catalog(((p.gpu, p.tp, p.count) for p in pools), gpus)
        if capacity + 1e-9 < rate or sum(p.count for p in pools) > max_instances or not fits:
            return
        cands.append(PlacementCandidate(mode, pools, _cost(pools, prof), capacity, sum(p.num_gpus for p in pools)))

    if "colocated" in modes:
        for (g, tp), pr in prof[InstanceRole.MIXED].items():
            n0 = instances_for(rate, pr.mixed_rps)
            for n in range(n0, n0 + extra + 1) if n0 else ():
                add("colocated", (PoolPlan(InstanceRole.MIXED, g, tp, n),), n * pr.mixed_rps)
    if "disaggregated" in modes:
        for kp, pp in prof[InstanceRole.PREFILL].items():
            for kd, dp in prof[InstanceRole.DECODE].items():
                if kd != kp and not heterogeneous:
                    continue
                pcap = pair_prefill_rps(pp, dp)
                np0 = instances_for(rate, pcap)
                if not np0:
                    continue
                nd0 = instances_for(rate, dp.decode_rps)
                if not nd0:
                    continue
                for n_p in range(np0, np0 + extra + 1):
                    for n_d in range(nd0, nd0 + extra + 1):
                        pools = (PoolPlan(InstanceRole.PREFILL, *kp, n_p), PoolPlan(InstanceRole.DECODE, *kd, n_d))
                        add("disaggregated", pools, min(n_p * pcap, n_d * dp.decode_rps))
    if prune:
        cands = [c for m in modes for c in pareto([c for c in cands if c.mode == m])]
    return sorted(cands, key=lambda c: (c.cost_per_hour, c.num_gpus, -c.capacity_rps))
