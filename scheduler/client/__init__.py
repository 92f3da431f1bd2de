"""llmsched client SDK: ``Client`` (blocking) and ``AsyncClient`` (asyncio) for the ``llmsched.v1`` gRPC API.

See docs/api.md for the contract (sequence indices, retries with the idempotency key, errors).
"""

from scheduler.client._common import ClientTLS
from scheduler.client.aio_client import AsyncClient
from scheduler.client.client import Client
from scheduler.client.types import (
    Cancelled,
    ClusterStateInfo,
    DeadlineExceeded,
    GenerateResult,
    InstanceInfo,
    InvalidArgument,
    LLMSchedError,
    MigrationResult,
    NodeDrainInfo,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    StreamChunk,
    StreamGap,
    Unauthenticated,
    Unavailable,
    Unimplemented,
)

__all__ = [
    "AsyncClient",
    "Cancelled",
    "Client",
    "ClientTLS",
    "ClusterStateInfo",
    "DeadlineExceeded",
    "GenerateResult",
    "InstanceInfo",
    "InvalidArgument",
    "LLMSchedError",
    "MigrationResult",
    "NodeDrainInfo",
    "NotFound",
    "PermissionDenied",
    "ResourceExhausted",
    "StreamChunk",
    "StreamGap",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
]
