"""Configuration schema (pydantic v2). One YAML file describes a whole deployment or simulation.

Errors name the file, the key path and the allowed values (see ``load.py``).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from scheduler.config.gpus import GPU_CATALOG, catalog_key, catalog_names, nodes_for
from scheduler.core.types import SLO, InstanceRole

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "fp8": 1}
# A Hugging Face repo id ("name" or "org/name"; huggingface_hub's REPO_ID_REGEX): what ``model.path`` names when it
# is no local path. Anything else (an absolute path, two slashes, "./", "~") is a directory.
_HF_REPO_ID = re.compile(r"^(\b[\w\-.]+\b/)?\b[\w\-.]+\b$")
# ``ModelSpec`` shape fields and the Hugging Face ``config.json`` keys they must equal (``ModelSpec.check_weights``).
_HF_SHAPE = {
    "num_layers": "num_hidden_layers",
    "hidden_size": "hidden_size",
    "num_heads": "num_attention_heads",
    "num_kv_heads": "num_key_value_heads",
    "intermediate_size": "intermediate_size",
    "vocab_size": "vocab_size",
}
log = logging.getLogger(__name__)
# An instance whose snapshots fail this long is out of service: routed around by the ingresses while they time out,
# released (so replaced) by the Controller when they fail with an error -- its actor lives, its engine does not.
# (Here, not in ``control.controller``: ``PoolSpec.hang_timeout_s`` may not be below it.)
UNHEALTHY_AFTER_S = 10.0


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class GPUSpec(_Strict):
    """One GPU type in the catalog."""

    name: str
    memory_gib: float = Field(gt=0)
    fp16_tflops: float = Field(gt=0, description="dense fp16/bf16 tensor TFLOP/s")
    hbm_gbps: float = Field(gt=0, description="HBM bandwidth, GB/s")
    interconnect_gbps: float = Field(default=300.0, gt=0, description="intra-node GPU link (NVLink), GB/s")
    network_gbps: float = Field(default=25.0, gt=0, description="inter-node link per GPU, GB/s")
    network_latency_s: float = Field(default=20e-6, ge=0)
    price_per_hour: float = Field(default=0.0, ge=0, description="$ per GPU-hour")
    count: int = Field(default=0, ge=0, description="GPUs of this type available (0 = unbounded)")
    gpus_per_node: int | None = Field(
        default=None, ge=1,
        description="GPUs per node of this type; an instance (its tp GPUs) never spans nodes. Default: count "
                    "(one node)",
    )
    # Fraction of peak actually reached; the roofline multiplies peaks by these.
    mfu: float = Field(default=0.6, gt=0, le=1)
    mbu: float = Field(default=0.8, gt=0, le=1)
    # Fixed per-step cost (scheduling, sampling, launches) used by the roofline model for this GPU type.
    step_overhead_s: float = Field(default=2e-3, ge=0)

    @model_validator(mode="after")
    def _whole_nodes(self) -> GPUSpec:
        if self.gpus_per_node and self.count % self.gpus_per_node:
            raise ValueError(f"count: {self.count} GPUs are not whole nodes of gpus_per_node {self.gpus_per_node}")
        return self

    @property
    def node_gpus(self) -> int:
        """GPUs per node: ``gpus_per_node``, else ``count`` (one node); 0 = unbounded."""
        return self.gpus_per_node or self.count

    def holds(self, tps: Sequence[int]) -> bool:
        """Whether instances of these TP degrees fit this type's ``count`` GPUs (0 = unbounded) in nodes of
        ``node_gpus``, each instance on one node (:func:`~scheduler.config.gpus.nodes_for`): the capacity rule of
        config load and the planner."""
        node = self.node_gpus
        if node and any(tp > node for tp in tps):
            return False
        return not self.count or nodes_for(tps, node) <= self.count // node

    @classmethod
    def from_catalog(cls, name: str, **overrides: Any) -> GPUSpec:
        """The catalog entry ``name`` (see ``scheduler/config/gpus.py``), with ``overrides`` applied.

        Raises:
            ValueError: ``name`` is not in the catalog (the message lists the catalog).
        """
        key = catalog_key(name)
        if key is None:
            raise ValueError(f"unknown GPU type {name!r}; catalog: {', '.join(catalog_names())}")
        return cls.model_validate({**GPU_CATALOG[key], **overrides})


class ModelSpec(_Strict):
    """Architecture shape: enough to count FLOPs, bytes, and KV size."""

    name: str
    num_layers: int = Field(gt=0)
    hidden_size: int = Field(gt=0)
    num_heads: int = Field(gt=0)
    num_kv_heads: int = Field(gt=0)
    intermediate_size: int = Field(gt=0)
    vocab_size: int = Field(gt=0)
    dtype: Literal["float32", "float16", "bfloat16", "fp8"] = "float16"
    max_model_len: int = Field(default=4096, gt=0)
    gated_mlp: bool = True
    # Name of the model in profiled tables (Vidur / Splitwise / DistServe), when it differs from ``name``.
    profile_name: str | None = None
    path: str | None = Field(
        default=None,
        description="the weights vllm pools serve (and the ingress tokenizes with): a Hugging Face repo id, or a "
                    "model directory on the worker (and head) nodes; unset: the generated tiny test model",
    )

    @field_validator("path")
    @classmethod
    def _path_named(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            raise ValueError("an empty path; name a Hugging Face repo id or a model directory, or leave it unset "
                             "for the generated tiny test model")
        return v

    def weights(self, override: str | Path | None = None) -> str:
        """What a vLLM engine loads and the ingress tokenizes with: ``override`` (a ``vllm`` backend kwarg
        ``model_path``: tests, benches), else ``path``, else the generated tiny test model (CPU demo, tests).

        Checked here, where it is read (an engine on a worker node, the ingress on the head), not at config load:
        the directory lives on those nodes. Raises ``ValueError`` naming ``model.path`` for a local path that does
        not exist here (anything that is not a repo id, "org/name", is one), and naming the shape fields for a
        directory whose ``config.json`` is another model's (:meth:`check_weights`; the tiny model's too, and its
        float32)."""
        if override is not None:
            where = str(override)
        elif self.path is None:
            from scheduler.engine.tiny_model import ensure_tiny_model

            tiny = ensure_tiny_model()
            found = _hf_config(tiny)
            if found is None:  # built with one, or not returned
                raise RuntimeError(f"the generated tiny test model {tiny} has no config.json")
            self._check_shape(*found, tiny=True)
            return str(tiny)
        else:
            where = self.path
            local = Path(self.path).expanduser()
            if local.exists() or not _HF_REPO_ID.match(self.path):
                if not local.is_dir():
                    raise ValueError(f"model.path: no model directory {self.path!r} on this node "
                                     f"({os.uname().nodename}); mount the weights there (the chart's weights.volume) "
                                     "or name a Hugging Face repo id (org/name)")
                where = str(local)
        self.check_weights(where)
        return where

    def check_weights(self, where: str) -> None:
        """Refuses weights that are not the model the shape fields describe: they size the KV cache, the latency
        model and the simulator, and vLLM would serve other weights without a word (a 70B's directory under a 7B's
        shape: KV sized for 32 layers, not 80). Compares a model directory's ``config.json`` (Hugging Face's keys;
        a multimodal model's ``text_config``); ``max_model_len`` may be below the length vLLM derives from it
        (:func:`_longest_context`: ``max_position_embeddings`` and RoPE scaling), not above (unless
        ``VLLM_ALLOW_LONG_MAX_MODEL_LEN``). Called by :meth:`weights`, so wherever the weights are read: the head
        before Ray starts and the ingress, each engine on its worker (whose directory may differ from the head's).
        A repo id is read from the local Hugging Face cache (:func:`_cached_repo`, offline) where its engine would
        find it; one not cached there is not read before its engine downloads it, nor is a directory without
        ``config.json``: logged once.

        Raises ``ValueError`` naming each field that differs (``model.num_layers: 32, but <dir>/config.json has
        num_hidden_layers 80``)."""
        found, cache = _local_hf_config(Path(where), where)
        if found is None and cache is not None:
            _log_unchecked(where, "no model directory here: a Hugging Face repo id is not read before its "
                                  f"engine downloads it, and the local cache {cache} has no config.json of it")
            return
        if found is None:
            _log_unchecked(where, "no config.json in the directory" if Path(where).is_dir() else "no model here")
            return
        self._check_shape(*found)

    def check_tiny_shape(self) -> None:
        """:meth:`check_weights` against the generated tiny test model, which vllm pools serve while ``path`` is
        unset, without building it (its ``config.json`` is its recipe's, ``TinyModelSpec.hf_config``): config load
        refuses a config whose vllm pools would serve it under another model's shape."""
        from scheduler.engine.tiny_model import TinyModelSpec

        self._check_shape("the generated tiny test model", TinyModelSpec().hf_config(), tiny=True)

    def _check_shape(self, file: Path | str, hf: dict[str, Any], *, tiny: bool = False) -> None:
        """The comparison of :meth:`check_weights`. ``tiny``: the weights are the generated tiny model, which vLLM
        serves in its own dtype (float32), so ``dtype`` (the KV bytes per token) must be that too."""
        wrong = [f"model.{field}: {getattr(self, field)}, but {file} has {key} {hf[key]}"
                 for field, key in _HF_SHAPE.items() if hf.get(key) is not None and hf[key] != getattr(self, field)]
        # KV bytes per token are by head_dim (a differing hidden_size or num_heads says it already)
        if not wrong and hf.get("head_dim") not in (None, self.head_dim):
            wrong.append(f"model.hidden_size: {self.hidden_size} / num_heads {self.num_heads} is head_dim "
                         f"{self.head_dim}, but {file} has head_dim {hf['head_dim']} (which the config cannot give)")
        own_dtype = _hf_dtype(hf)
        if tiny and own_dtype is not None and own_dtype != self.dtype:
            wrong.append(f"model.dtype: {self.dtype}, but {file} has dtype {own_dtype} (vLLM serves it in that)")
        longest = _longest_context(hf)
        if longest is not None and self.max_model_len > longest[0] and not _allow_long_context():
            wrong.append(f"model.max_model_len: {self.max_model_len}, but {file} allows {longest[0]} ({longest[1]}; "
                         "vLLM refuses more unless VLLM_ALLOW_LONG_MAX_MODEL_LEN=1)")
        if wrong and tiny:
            raise ValueError("; ".join(wrong) + ": model.path is unset, so vllm pools serve the generated tiny test "
                             "model; give its shape (scheduler/config/examples/tiny-cpu.yaml), or set model.path "
                             "to the weights the config's shape describes")
        if wrong:
            raise ValueError("; ".join(wrong) + ": the config's model shape is not these weights'; give the "
                             "weights' shape, or point model.path at the model it describes")

    @model_validator(mode="after")
    def _heads_divide(self) -> ModelSpec:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of num_heads {self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        return self

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def splits_over(self, tp: int) -> bool:
        """vLLM splits the attention heads evenly over the tensor-parallel GPUs (``tp`` divides them), and the KV
        heads too, or replicates them (``tp`` a multiple of them: ``QKVParallelLinear``)."""
        return self.num_heads % tp == 0 and (self.num_kv_heads % tp == 0 or tp % self.num_kv_heads == 0)

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V, all layers: the model's logical KV (what one copy of it is, e.g. over a link)."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.dtype_bytes

    def kv_bytes_per_token_per_gpu(self, tp: int) -> int:
        """K and V, all layers, that each of ``tp`` tensor-parallel GPUs holds: vLLM splits the KV heads over them
        and, where ``tp`` exceeds them, replicates them so each GPU holds one (``ModelConfig.get_num_kv_heads``:
        ``max(1, num_kv_heads // tp)``). Not ``kv_bytes_per_token / tp``: that undercounts a replicated head."""
        return 2 * self.num_layers * max(1, self.num_kv_heads // tp) * self.head_dim * self.dtype_bytes

    @property
    def num_params(self) -> int:
        h, i, L = self.hidden_size, self.intermediate_size, self.num_layers
        kv = self.num_kv_heads * self.head_dim
        attn = h * h * 2 + h * kv * 2  # q, o, k, v
        mlp = h * i * (3 if self.gated_mlp else 2)
        return L * (attn + mlp) + 2 * self.vocab_size * h

    @property
    def weight_bytes(self) -> int:
        return self.num_params * self.dtype_bytes


class EngineSpec(_Strict):
    """vLLM-like iteration scheduler settings (names follow vLLM's)."""

    block_size: int = Field(default=16, gt=0)
    max_num_seqs: int = Field(default=256, gt=0)
    max_num_batched_tokens: int = Field(default=2048, gt=0, description="token budget per step (chunked prefill)")
    gpu_memory_utilization: float = Field(default=0.9, gt=0, le=1)
    activation_reserve_gib: float = Field(default=2.0, ge=0)
    num_kv_blocks: int | None = Field(default=None, gt=0, description="override the KV capacity computed from memory")
    enable_chunked_prefill: bool = True
    enable_prefix_caching: bool = Field(
        default=False,
        description="reuse the KV of prompt blocks (trace hash_ids) seen before on the instance; LRU bounded by KV",
    )

    @model_validator(mode="after")
    def _budget_fits_a_full_batch(self) -> EngineSpec:
        # NOTE: vLLM refuses it at engine start (SchedulerConfig.verify_max_model_len): a simulation of it is of a
        # cluster no live vLLM pool starts as.
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(f"max_num_batched_tokens: {self.max_num_batched_tokens} is below max_num_seqs "
                             f"{self.max_num_seqs}: a step could not decode a full batch (vLLM refuses it)")
        return self


class PoolSpec(_Strict):
    """A homogeneous set of instances."""

    name: str
    role: InstanceRole = InstanceRole.MIXED
    gpu: str
    tp: int = Field(default=1, gt=0)
    count: int = Field(default=1, ge=0)
    backend: Literal["simulated", "vllm"] = "simulated"
    engine: EngineSpec = EngineSpec()
    # Live serving only (the simulator's engines cannot hang). NOTE: CPU vLLM can take several seconds for one step
    # (a long chunked prefill, the first step after start), and the Controller's snapshot poll waits 2 s: a timeout
    # near those would replace busy instances. Not below UNHEALTHY_AFTER_S: a snapshot that slow is only late
    # (the ingresses keep the last one that long), and a shorter silence released the instance as hung.
    hang_timeout_s: float = Field(
        default=60.0, ge=UNHEALTHY_AFTER_S,
        description="an instance holding requests with no engine progress (no token, no prompt token computed) "
                    "for this long, or whose snapshots time out this long, is hung: routed around, released (its "
                    "requests re-prefilled elsewhere) and replaced",
    )
    # Above vLLM's own engine-ready wait (VLLM_ENGINE_READY_TIMEOUT_S, 600 s), whose error names the cause; CPU vLLM
    # starts in tens of seconds.
    start_timeout_s: float = Field(
        default=900.0, ge=5.0,
        description="an instance whose engine has not started after this long is released (actor and placement "
                    "group) and another one started, with a growing delay while starts keep failing",
    )

    @field_validator("role", mode="before")
    @classmethod
    def _role(cls, v: Any) -> InstanceRole:
        return InstanceRole.parse(v)


class SLOSpec(_Strict):
    ttft_s: float | None = Field(default=None, gt=0)
    tpot_s: float | None = Field(default=None, gt=0)

    def to_slo(self) -> SLO:
        return SLO(self.ttft_s, self.tpot_s)


class PolicySpec(_Strict):
    name: str
    params: dict[str, Any] = Field(default_factory=dict)


class PoliciesSpec(_Strict):
    router: PolicySpec = PolicySpec(name="least_outstanding")
    migration: PolicySpec | None = None
    scaling: PolicySpec | None = None
    reroling: PolicySpec | None = None  # PREFILL <-> DECODE role switches (scheduler.control.reroling)
    admission: PolicySpec | None = None
    predictor: PolicySpec | None = None  # output-length guess for requests without a hint (predict/serving.py)

    @field_validator("predictor")
    @classmethod
    def _known_predictor(cls, v: PolicySpec | None) -> PolicySpec | None:
        if v is not None:
            from scheduler.predict.serving import check_spec

            check_spec(v.name, v.params)
        return v


class DrainSpec(_Strict):
    """An operator's drain (Admin Drain / DrainNode, a worker pod's preStop hook): how long it waits, and how often
    it retries, to move an instance's requests off before it releases the instance. What is still there then is
    recovered elsewhere by re-prefill (its output so far kept). A node's deadline (DrainNode ``deadline_s``) bounds
    the waits too."""

    switch_wait_s: float = Field(
        default=30.0, ge=0,
        description="after its own moves commit, the drain waits up to this long for their streams to switch to "
                    "the destination before the release (a slow consumer still reads the source's buffer)",
    )
    peer_wait_s: float = Field(
        default=30.0, ge=0,
        description="the longest wait for the other ingress replicas to move the requests they serve on the "
                    "instance (the Controller plans each move, the owning replica runs it); 0: not waited for, "
                    "re-prefilled",
    )
    move_tries: int = Field(
        default=20, ge=1,
        description="how many times the Controller plans the move of one request of another ingress replica "
                    "(refused, aborted, or the request still prefilling) before leaving it to re-prefill",
    )


class ClusterConfig(_Strict):
    """The whole deployment: GPU catalog, model, pools, SLOs and policies."""

    name: str = "cluster"
    # GPU types by key. A key naming a catalog type takes ``{}`` / ``null`` (catalog numbers) or a partial mapping
    # of overrides; other keys need a full spec. A list of catalog names is accepted too. Default: the catalog.
    gpus: dict[str, GPUSpec] = Field(default_factory=lambda: list(GPU_CATALOG), validate_default=True)
    model: ModelSpec
    pools: list[PoolSpec]
    slos: dict[int, SLOSpec] = Field(default_factory=lambda: {0: SLOSpec(ttft_s=2.0, tpot_s=0.1)})
    policies: PoliciesSpec = PoliciesSpec()
    drain: DrainSpec = DrainSpec()
    latency_profile: str | None = Field(default=None, description="path to a latency table (llmsched profile)")
    chat_template: str | None = Field(
        default=None,
        description="renders /v1/chat/completions instead of the model's own template (vLLM's --chat-template): a "
                    "Jinja template, or the path of a file holding one; vllm pools only",
    )

    @field_validator("gpus", mode="before")
    @classmethod
    def _catalog_gpus(cls, v: Any) -> Any:
        return _resolve_gpus(v)

    @model_validator(mode="after")
    def _pools_name_known_gpus(self) -> ClusterConfig:
        for i, pool in enumerate(self.pools):
            if pool.gpu not in self.gpus:
                raise ValueError(
                    f"pools[{i}].gpu: unknown GPU type {pool.gpu!r}; allowed: {', '.join(sorted(self.gpus))}"
                )
        if not self.pools:
            raise ValueError("pools: at least one instance pool is required")
        # Instance ids are ``<pool>-<n>`` and pools are keyed by name (scaling, placement): two pools of one name
        # would share ids, and the simulator would route to only one instance of each pair.
        seen: dict[str, int] = {}
        for i, pool in enumerate(self.pools):
            if pool.name in seen:
                raise ValueError(f"pools[{i}].name: duplicate pool name {pool.name!r} (pools[{seen[pool.name]}] has "
                                 "it); give each pool its own name")
            seen[pool.name] = i
        for i, pool in enumerate(self.pools):
            if not self.model.splits_over(pool.tp):
                raise ValueError(f"pools[{i}].tp: {pool.tp} GPUs do not split the model's {self.model.num_heads} "
                                 f"attention / {self.model.num_kv_heads} KV heads (vLLM: TP divides the heads, and "
                                 "divides the KV heads or is a multiple of them)")
        # ``gpus.<key>.count`` is how many GPUs of the type there are (the planner sizes within it; the chart sets it
        # to the worker groups' maximum), in nodes of ``gpus_per_node``: pools that cannot be packed on them (an
        # instance never spans nodes) would never all be placed live.
        for key, spec in self.gpus.items():
            on = [(i, p) for i, p in enumerate(self.pools) if p.gpu == key]
            per_node = spec.gpus_per_node
            for i, p in on:  # pools of count 0 too: scaling may start one
                if per_node and p.tp > per_node:
                    raise ValueError(f"pools[{i}].tp: {p.tp} GPUs, but gpus.{key}.gpus_per_node is {per_node} (an "
                                     "instance never spans nodes)")
            use = [(i, p) for i, p in on if p.count]
            tps = [p.tp for _, p in use for _ in range(p.count)]
            if not spec.holds(tps):
                pools = ", ".join(f"pools[{i}] {p.name}: {p.count} x TP{p.tp}" for i, p in use)
                if per_node:
                    raise ValueError(f"gpus.{key}.count: {spec.count} GPUs are {spec.count // per_node} nodes of "
                                     f"{per_node} (gpus_per_node), but the pools' {sum(tps)} GPUs need "
                                     f"{nodes_for(tps, per_node)} nodes, an instance never spanning nodes ({pools})")
                raise ValueError(f"gpus.{key}.count: {spec.count} GPUs, but the pools need {sum(tps)} ({pools})")
        kinds = sorted({(p.gpu, p.tp) for p in self.pools})
        if self.latency_profile and len(kinds) > 1:  # the simulator would time every pool with it alike
            raise ValueError(f"latency_profile: one engine's measured step times cannot time pools on "
                             f"{', '.join(f'{g} x TP{tp}' for g, tp in kinds)} alike; give each its own config, or "
                             "drop latency_profile (the profiled tables and the roofline know GPU and TP)")
        if self.model.path is None and any(p.backend == "vllm" for p in self.pools):
            # Those pools serve the generated tiny model: another shape would size KV and step times for a model no
            # engine runs (the chart's defaults did, Llama-2-7B's). Here, not only where it is read: it is the
            # same model on every node, and a chart's lint or `llmsched simulate` sees the mistake too.
            self.model.check_tiny_shape()
        if self.chat_template is not None and not any(p.backend == "vllm" for p in self.pools):
            raise ValueError("chat_template: only a vllm pool's model has a tokenizer to render chats with (a "
                             "simulated cluster's byte tokenizer has none); remove it")
        self._check_policy_names()
        return self

    def chat_template_text(self) -> str | None:
        """``chat_template`` as a template, by vLLM's rule: a value holding Jinja's ``{``, ``}`` or a newline is the
        template itself, any other names the file holding it, read here (where the ingress runs: not at load, which
        may be elsewhere, e.g. a chart's lint). Raises ``ValueError`` naming the field if it cannot be read."""
        value = self.chat_template
        if value is None or any(c in value for c in "{}\n"):
            return value
        try:
            return Path(value).read_text()
        except OSError as e:
            raise ValueError(f"chat_template: cannot read the file {value!r} ({e.strerror}); give a Jinja template "
                             "or the path of a file holding one") from None

    def _check_policy_names(self) -> None:
        """Unknown policy names (and router parameters) fail at load, naming the field: the live Controller and
        Ingress build the policies only once Ray is up, and ``llmsched simulate`` never builds a scaling policy
        from the config (migration and re-roling parameters: where each command builds them,
        ``sim/policies.py``). (Lazy imports: the policy modules import this one.)"""
        from scheduler.policy.migration import MIGRATION_POLICIES
        from scheduler.policy.route import check_router_params, router_class
        from scheduler.policy.scaling import REROLING_POLICIES, SCALING_POLICIES

        router = self.policies.router
        if ":" not in router.name:  # an out-of-tree module:Class is imported where the router is built
            try:
                factory = router_class(router.name)
            except ValueError as e:
                raise ValueError(f"policies.router.name: {e}") from None
            try:
                check_router_params(router.name, factory, router.params)
            except ValueError as e:
                raise ValueError(f"policies.router.params: {e}") from None
        for field, kind, registry in (("migration", "migration policy", MIGRATION_POLICIES),
                                      ("scaling", "scaling policy", SCALING_POLICIES),
                                      ("reroling", "re-roling policy", REROLING_POLICIES)):
            spec = getattr(self.policies, field)
            if spec is not None and spec.name not in registry:
                raise ValueError(f"policies.{field}.name: unknown {kind} {spec.name!r}; allowed: "
                                 f"{', '.join(sorted(registry))}")
        if self.policies.migration is not None:
            from scheduler.transfer.migration import check_one_headroom

            check_one_headroom(self.policies.migration.params)
        if self.policies.admission is not None:  # built where it is applied (Ingress, Simulator): checked here
            from scheduler.policy.admission import make_admission_policy

            spec = self.policies.admission
            try:
                make_admission_policy(spec.name, **spec.params)
            except ValueError as e:
                if str(e).startswith("unknown admission policy"):
                    raise ValueError(f"policies.admission.name: {e}") from None
                raise ValueError(f"policies.admission.params.{e}") from None

    def slo_for(self, priority: int) -> SLO:
        spec = self.slos.get(priority) or self.slos.get(0) or SLOSpec()
        return spec.to_slo()

    @property
    def num_instances(self) -> int:
        return sum(p.count for p in self.pools)


def fill_model_shape(model: dict[str, Any]) -> dict[str, Any]:
    """A config's ``model:`` mapping with the fields it omits taken from its ``path``'s ``config.json``, where that
    is a model directory here, or a Hugging Face repo id whose ``config.json`` the local hub cache holds (offline,
    as :meth:`ModelSpec.check_weights` reads it: :func:`_local_hf_config`) (``llmsched serve``, e.g. ``--model-path
    DIR`` or ``--model-path org/name``: no shape to copy into the config).
    Shape fields, ``dtype``, ``max_model_len`` (the default, or the model's own if shorter) and ``name`` (the
    directory's name, or the repo id); the fields given stay, for :meth:`ModelSpec.check_weights` to compare."""
    path = model.get("path")
    if not (isinstance(path, str) and path.strip()):
        return model
    found, cache = _local_hf_config(Path(path).expanduser(), path)
    if found is None:
        return model
    file, hf = found
    shape: dict[str, Any] = {field: hf[key] for field, key in _HF_SHAPE.items() if hf.get(key) is not None}
    dtype = _hf_dtype(hf)
    if dtype in DTYPE_BYTES:
        shape["dtype"] = dtype
    longest = _longest_context(hf)
    default_len = ModelSpec.model_fields["max_model_len"].default
    shape["max_model_len"] = default_len if longest is None else min(default_len, longest[0])
    # A repo id's name is the id, as vLLM serves it by default (``org/name``); a directory's, its own name.
    shape["name"] = path if cache is not None else Path(path).expanduser().name
    filled = {k: v for k, v in shape.items() if k not in model}
    if filled:
        log.info("model: %s from %s", ", ".join(f"{k}={v}" for k, v in filled.items()), file)
    return {**filled, **model}


def _local_hf_config(model_dir: Path, where: str) -> tuple[tuple[Path | str, dict[str, Any]] | None, Path | None]:
    """The ``config.json`` of weights named ``where``, as :func:`_hf_config` reads it from ``model_dir`` (``where``
    as a path), else, where ``where`` is a Hugging Face repo id and no directory here, from the local hub cache
    (:func:`_cached_repo`, offline; its file named ``<id>'s cached <file>``). The second item is the hub cache that
    was looked in (``None``: ``where`` was read as a directory). Both :meth:`ModelSpec.check_weights` and
    :func:`fill_model_shape` find the weights' ``config.json`` here."""
    found = _hf_config(model_dir)
    if found is not None or model_dir.is_dir() or not _HF_REPO_ID.match(where):
        return found, None
    snapshot, cache = _cached_repo(where)
    found = _hf_config(snapshot) if snapshot is not None else None
    return (None if found is None else (f"{where}'s cached {found[0]}", found[1])), cache


def _hf_config(model_dir: Path) -> tuple[Path, dict[str, Any]] | None:
    """A model directory's ``config.json`` (``None``: it has none), a multimodal model's ``text_config`` over it,
    ``num_key_value_heads`` defaulted. Raises ``ValueError`` naming ``model.path`` if it is no JSON object."""
    file = model_dir / "config.json"
    if not file.is_file():
        return None
    try:
        hf = json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"model.path: cannot read {file} ({e}); a Hugging Face config.json is JSON") from None
    if not isinstance(hf, dict):
        raise ValueError(f"model.path: {file} is not a JSON object (a Hugging Face config.json)")  # noqa: TRY004
    if "num_hidden_layers" not in hf and isinstance(hf.get("text_config"), dict):
        hf = {**hf, **hf["text_config"]}  # a multimodal model: its language model's shape
    if hf.get("num_key_value_heads") is None:  # Hugging Face's default: no grouped-query attention
        hf = {**hf, "num_key_value_heads": hf.get("num_attention_heads")}
    return file, hf


def _hub_cache() -> Path:
    """The Hugging Face hub cache as ``huggingface_hub`` resolves it (``HF_HUB_CACHE``, ``HUGGINGFACE_HUB_CACHE``,
    else ``HF_HOME``/hub, else ``$XDG_CACHE_HOME``/huggingface/hub), read from the environment now: its
    ``constants`` are read once, at its import, which may come before the environment is set."""
    hub = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if not hub:
        home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
        hub = os.path.join(home, "hub")
    return Path(os.path.expandvars(os.path.expanduser(hub)))


def _cached_repo(repo_id: str) -> tuple[Path | None, Path]:
    """The snapshot directory of ``repo_id``'s ``main`` revision in the local hub cache, where it holds a
    ``config.json`` (``None``: it does not, or ``huggingface_hub`` is not installed), and that cache. Offline: the
    cache's files only (``huggingface_hub.try_to_load_from_cache``), no request to the hub."""
    cache = _hub_cache()
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None, cache
    try:
        file = try_to_load_from_cache(repo_id, "config.json", cache_dir=cache)
    except ValueError:  # an id huggingface_hub's stricter check refuses (HFValidationError): vLLM would too
        return None, cache
    return (Path(file).parent if isinstance(file, str) else None), cache


def _hf_dtype(hf: dict[str, Any]) -> Any:
    """A ``config.json``'s weights dtype (transformers 5 writes ``dtype``, earlier ones ``torch_dtype``)."""
    return hf.get("torch_dtype") or hf.get("dtype")


@functools.cache
def _log_unchecked(where: str, why: str) -> None:
    """Once per process and model: the engines and the ingress each read the weights."""
    log.warning("model.path %r: the config's model shape is not checked against it (%s)", where, why)


# config.json keys vLLM derives a model's length from (the smallest present; ``model_max_length`` wins when set).
_HF_LENGTH_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "model_max_length",
                   "max_target_positions", "max_sequence_length", "max_seq_length", "seq_len")
# RoPE types whose max_position_embeddings is already the scaled length: vLLM applies no factor to it.
_ROPE_PRESCALED = ("su", "longrope", "llama3", "deepseek_llama_scaling")
# YaRN: before vLLM PR 56446 (2026-09) original_max_position_embeddings x factor, since then max_position_embeddings.
_ROPE_YARN = ("yarn", "deepseek_yarn", "telechat3-yarn")


def _longest_context(hf: dict[str, Any]) -> tuple[int, str] | None:
    """The longest ``max_model_len`` vLLM accepts for a ``config.json`` (its ``_get_and_verify_max_len``), and the
    fields that give it; ``None``: it does not say. The length is the smallest of :data:`_HF_LENGTH_KEYS` present
    (``model_max_length`` when set), times the RoPE scaling ``factor`` -- except for the types whose
    ``max_position_embeddings`` is already scaled (Llama-3.1's ``llama3``, ``longrope``: no factor) and YaRN, whose
    length is ``original_max_position_embeddings`` x ``factor`` for vLLM before PR 56446 and
    ``max_position_embeddings`` since: the longer is taken, so that only what no vLLM accepts is refused; Gemma 3
    is never scaled. ``model_max_length`` above it is accepted too. ``tokenizer_config.json`` is not read (vLLM 0.32
    caps by its ``model_max_length`` only for pooling models). tests/test_max_len_vllm.py holds it to vLLM's."""
    given = {k: hf[k] for k in _HF_LENGTH_KEYS if isinstance(hf.get(k), int) and not isinstance(hf[k], bool)}
    if not given:
        return None
    own = given.get("model_max_length")
    key = "model_max_length" if own is not None else min(given, key=given.__getitem__)
    base = given[key]
    longest, why = base, f"{key} {base}"
    rope_key = "rope_scaling" if isinstance(hf.get("rope_scaling"), dict) else "rope_parameters"
    rope = hf.get(rope_key)
    rope = rope if isinstance(rope, dict) else {}
    # transformers 5 may key the parameters by layer type ({"full_attention": {...}, ...})
    ropes = [rope] if "factor" in rope or "rope_type" in rope or "type" in rope else [
        r for r in rope.values() if isinstance(r, dict)]
    if "gemma3" in str(hf.get("model_type", "")):
        ropes = []  # its max_position_embeddings is already scaled (vLLM's exception)
    note = ""
    for r in ropes:
        kind, factor = r.get("rope_type") or r.get("type") or "default", r.get("factor")
        if kind in _ROPE_PRESCALED:
            note = f" ({rope_key} {kind}: already scaled, vLLM applies no factor)"
        if not isinstance(factor, int | float) or isinstance(factor, bool) or kind in _ROPE_PRESCALED:
            continue
        if kind in _ROPE_YARN:
            orig = r.get("original_max_position_embeddings") or hf.get("original_max_position_embeddings")
            if isinstance(orig, int) and int(orig * factor) > longest:
                longest = int(orig * factor)
                why = f"{rope_key} {kind}: original_max_position_embeddings {orig} x factor {factor}"
        elif int(base * factor) > longest:
            longest, why = int(base * factor), f"{key} {base} x {rope_key} {kind} factor {factor}"
    if own is not None and own > longest:
        longest, why = own, f"model_max_length {own}"
    return longest, why + (note if longest == base else "")


def _allow_long_context() -> bool:
    """vLLM's own escape hatch for a ``max_model_len`` above the model's (``VLLM_ALLOW_LONG_MAX_MODEL_LEN``)."""
    return os.environ.get("VLLM_ALLOW_LONG_MAX_MODEL_LEN", "").strip().lower() in ("1", "true")


def _resolve_gpus(v: Any) -> Any:
    """Fill ``gpus:`` entries from the catalog (see ``ClusterConfig.gpus``); leaves other shapes to pydantic."""
    if isinstance(v, list | tuple):
        v = {str(k): None for k in v}
    if not isinstance(v, dict):
        return v
    out: dict[str, Any] = {}
    for key, spec in v.items():
        if isinstance(spec, GPUSpec):
            out[key] = spec
            continue
        if spec is None:
            spec = {}
        if not isinstance(spec, dict):
            # NOTE: ValueError (not TypeError) so pydantic reports it as a validation error with its key path.
            msg = f"{key}: expected a mapping of GPU fields or {{}} for a catalog type, got {spec!r}"
            raise ValueError(msg)  # noqa: TRY004
        cat = catalog_key(str(key))
        if cat is not None:
            out[key] = {**GPU_CATALOG[cat], **spec}
        elif {"memory_gib", "fp16_tflops", "hbm_gbps"} <= spec.keys():
            out[key] = {"name": str(key), **spec}
        else:
            raise ValueError(
                f"{key}: unknown GPU type {key!r}; catalog: {', '.join(catalog_names())} "
                "(or give a full spec: memory_gib, fp16_tflops, hbm_gbps)"
            )
    return out
