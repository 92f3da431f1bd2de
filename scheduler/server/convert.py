"""Protobuf <-> ingress types for the gRPC server: request parsing + validation, admin responses.

Requests are parsed from raw bytes here (not by grpc) so malformed payloads become INVALID_ARGUMENT naming the
message, and a GenerateRequest with both prompt forms on the wire is rejected (protobuf's oneof would silently keep
the last). ``scheduler.server.grpc_server`` re-exports these names.
"""

from __future__ import annotations

import math
from typing import Any

from google.protobuf.message import DecodeError, Message

from scheduler._proto.llmsched.v1 import admin_pb2, inference_pb2
from scheduler.control.api import ClusterState, GenerateRequest, InvalidRequest, MigrationResult
from scheduler.core.types import InstanceRole, InstanceSnapshot
from scheduler.engine.base import SamplingParams
from scheduler.server.validate import GRPC_FIELDS, new_request_id, validate_generate

_ROLE_TO_PROTO = {
    InstanceRole.PREFILL: admin_pb2.INSTANCE_ROLE_PREFILL,
    InstanceRole.DECODE: admin_pb2.INSTANCE_ROLE_DECODE,
    InstanceRole.MIXED: admin_pb2.INSTANCE_ROLE_MIXED,
}
_ROLE_FROM_PROTO = {v: k for k, v in _ROLE_TO_PROTO.items()}


def role_from_proto(value: int) -> InstanceRole | None:
    """``None`` for INSTANCE_ROLE_UNSPECIFIED (or a value this build does not know)."""
    return _ROLE_FROM_PROTO.get(value)


def _parse(cls: type[Message], raw: bytes) -> Any:
    try:
        return cls.FromString(raw)
    except (DecodeError, RuntimeError, ValueError) as e:  # upb raises DecodeError; be lenient across backends
        name = cls.DESCRIPTOR.name
        raise InvalidRequest(f"request: malformed {name} protobuf ({e})", field="request") from None


def _top_level_fields(raw: bytes) -> dict[int, set[int]] | None:
    """Field numbers present at the top level of an encoded message, each with the wire types it came in (None if
    the walk fails)."""
    seen: dict[int, set[int]] = {}
    i, n = 0, len(raw)

    def varint() -> int:
        nonlocal i
        shift = result = 0
        while True:
            if i >= n or shift > 63:
                raise IndexError
            b = raw[i]
            i += 1
            result |= (b & 0x7F) << shift
            if not b & 0x80:
                return result
            shift += 7

    try:
        while i < n:
            tag = varint()
            number, wire = tag >> 3, tag & 7
            seen.setdefault(number, set()).add(wire)
            if wire == 0:
                varint()
            elif wire == 1:
                i += 8
            elif wire == 2:
                length = varint()  # NOTE: not `i += varint()`: that reads i before varint() advances it
                i += length
            elif wire == 5:
                i += 4
            else:
                return None  # groups: not used by our protos; let the parsed message speak
    except IndexError:
        return None
    return seen if i == n else None


_DEFAULT_SAMPLING = (
    SamplingParams()
)  # NOTE: slotted dataclass: class attributes are descriptors, not defaults
_PROMPT_TEXT = inference_pb2.GenerateRequest.TEXT_FIELD_NUMBER
_PROMPT_IDS = inference_pb2.GenerateRequest.TOKEN_IDS_FIELD_NUMBER
_TENANT = inference_pb2.GenerateRequest.TENANT_FIELD_NUMBER
_LENGTH_DELIMITED = 2


def generate_request_from_proto(
    msg: inference_pb2.GenerateRequest, *, raw: bytes | None = None, deadline_s: float | None = None
) -> GenerateRequest:
    """Map a proto request to the ingress' :class:`GenerateRequest` and validate it.

    Raises:
        InvalidRequest: naming the offending field (``sampling.max_tokens``, ``prompt.token_ids[3]``, ...).
    """
    if raw is not None:
        fields = _top_level_fields(raw)
        if fields is not None and _PROMPT_TEXT in fields and _PROMPT_IDS in fields:
            raise InvalidRequest("prompt: set exactly one of text or token_ids, got both", field="prompt")
        if fields is not None and fields.get(_TENANT, {_LENGTH_DELIMITED}) != {_LENGTH_DELIMITED}:
            # protobuf keeps a field of the wrong wire type as an unknown field: the tenant would be dropped silently.
            raise InvalidRequest("tenant: must be a string (wire type 2)", field="tenant")
    which = msg.WhichOneof("prompt")
    s, d = msg.sampling, _DEFAULT_SAMPLING
    sampling = SamplingParams(
        max_tokens=s.max_tokens if s.HasField("max_tokens") else d.max_tokens,
        temperature=s.temperature if s.HasField("temperature") else d.temperature,
        top_p=s.top_p if s.HasField("top_p") else d.top_p,
        top_k=s.top_k,
        seed=s.seed if s.HasField("seed") else None,
        stop_token_ids=tuple(s.stop_token_ids),
        ignore_eos=s.ignore_eos,
    )
    slo = msg.slo if msg.HasField("slo") else None
    req = GenerateRequest(
        request_id=msg.request_id or new_request_id(),
        prompt=msg.text if which == "text" else None,
        prompt_token_ids=tuple(msg.token_ids.ids) if which == "token_ids" else None,
        sampling=sampling,
        model=msg.model or None,
        priority=msg.priority,
        ttft_slo_s=slo.ttft_ms / 1e3 if slo is not None and slo.ttft_ms else None,
        tpot_slo_s=slo.tpot_ms / 1e3 if slo is not None and slo.tpot_ms else None,
        length_hint=msg.length_hint if msg.HasField("length_hint") else None,
        deadline_s=deadline_s,
        # Unset (a client from before the field): the special tokens, as always.
        add_special_tokens=msg.add_special_tokens if msg.HasField("add_special_tokens") else True,
        tenant=msg.tenant or None,  # empty (a client from before the field too): the config's tenant
    )
    if slo is not None:  # before validate_generate: it would report the value converted to seconds
        for name, value in (("slo.ttft_ms", slo.ttft_ms), ("slo.tpot_ms", slo.tpot_ms)):
            if not math.isfinite(value) or value < 0:
                raise InvalidRequest(f"{name}: must be a finite number >= 0, got {value}", field=name)
    validate_generate(req, GRPC_FIELDS)
    if not 0 <= msg.resume_from_index <= sampling.max_tokens:
        # Past max_tokens the request cannot reach it: it would run to the end to send nothing.
        raise InvalidRequest(f"resume_from_index: must be in [0, sampling.max_tokens = {sampling.max_tokens}], "
                             f"got {msg.resume_from_index}", field="resume_from_index")
    return req


def instance_to_proto(s: InstanceSnapshot, node_id: str = "") -> admin_pb2.Instance:
    return admin_pb2.Instance(
        node_id=node_id,
        instance_id=s.instance_id,
        role=_ROLE_TO_PROTO.get(s.role, admin_pb2.INSTANCE_ROLE_UNSPECIFIED),
        gpu=s.gpu,
        tp=s.tp,
        model=s.model,
        running=s.num_running,
        waiting=s.num_waiting,
        decoding=s.num_decoding,
        kv_blocks_used=s.kv_blocks_used,
        kv_blocks_total=s.kv_blocks_total,
        block_size=s.block_size,
        healthy=s.healthy,
        draining=s.draining,
        leaving=s.leaving,
    )


def cluster_state_to_proto(state: ClusterState) -> admin_pb2.ClusterState:
    return admin_pb2.ClusterState(
        instances=[instance_to_proto(i, state.nodes.get(i.instance_id, "")) for i in state.instances],
        router=state.router,
        requests_in_flight=state.requests_in_flight,
        extra=dict(state.extra),
    )


def migration_result_to_proto(r: MigrationResult) -> admin_pb2.MigrationResult:
    return admin_pb2.MigrationResult(
        request_id=r.request_id,
        source=r.source,
        destination=r.destination,
        committed=r.committed,
        reason=r.reason,
        downtime_s=r.downtime_s,
        stages=r.stages,
    )
