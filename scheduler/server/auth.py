"""Token auth and TLS settings shared by the gRPC and HTTP servers.

Two credentials: *client* tokens may call Inference (and the OpenAI HTTP API); *admin* tokens may call everything,
including the Admin service. Both travel as ``authorization: Bearer <token>`` (gRPC metadata or HTTP header).
Health checks and reflection stay open so Kubernetes probes and ``grpcurl`` work without secrets.

Tokens are compared in constant time and never logged or echoed in error messages.
"""

from __future__ import annotations

import enum
import hmac
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import grpc

ADMIN_SERVICE = "llmsched.v1.Admin"
INFERENCE_SERVICE = "llmsched.v1.Inference"
# Services that never need a token (probes, tooling).
OPEN_SERVICES = frozenset(
    {
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
        "grpc.reflection.v1.ServerReflection",
    }
)


class Access(enum.Enum):
    """What a presented credential allows."""

    NONE = "none"
    CLIENT = "client"
    ADMIN = "admin"


@dataclass(frozen=True, slots=True)
class TLSConfig:
    """Server TLS material (PEM bytes). With ``client_ca`` set, clients must present a certificate it signed (mTLS)."""

    cert_chain: bytes
    private_key: bytes
    client_ca: bytes | None = None

    @classmethod
    def from_files(cls, cert: str | Path, key: str | Path, client_ca: str | Path | None = None) -> TLSConfig:
        return cls(
            cert_chain=Path(cert).read_bytes(),
            private_key=Path(key).read_bytes(),
            client_ca=Path(client_ca).read_bytes() if client_ca else None,
        )

    def server_credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials(
            [(self.private_key, self.cert_chain)],
            root_certificates=self.client_ca,
            require_client_auth=self.client_ca is not None,
        )


@dataclass(frozen=True, slots=True)
class AuthConfig:
    """Accepted bearer tokens. Empty ``client_tokens`` *and* ``admin_tokens`` means auth is off.

    When only ``admin_tokens`` is set, Inference is open and Admin is protected (never the other way round:
    configuring client tokens without an admin token leaves Admin unreachable rather than open).
    """

    client_tokens: frozenset[str] = frozenset()
    admin_tokens: frozenset[str] = frozenset()
    tls: TLSConfig | None = None

    def __post_init__(self) -> None:
        for name in ("client_tokens", "admin_tokens"):
            tokens = getattr(self, name)
            if isinstance(tokens, str):  # a single token passed by mistake would become a set of characters
                raise TypeError(f"AuthConfig.{name} must be a collection of tokens, not a str")
            if any(not t for t in tokens):
                raise ValueError(f"AuthConfig.{name} must not contain empty tokens")
            object.__setattr__(self, name, frozenset(tokens))

    @classmethod
    def tokens(
        cls, client: str | None = None, admin: str | None = None, tls: TLSConfig | None = None
    ) -> AuthConfig:
        """Convenience: one client token and/or one admin token."""
        return cls(
            client_tokens=frozenset([client] if client else []),
            admin_tokens=frozenset([admin] if admin else []),
            tls=tls,
        )

    @property
    def enabled(self) -> bool:
        return bool(self.client_tokens or self.admin_tokens)

    def access(self, authorization: str | None) -> Access:
        """Classify an ``authorization`` header value (``Bearer <token>``)."""
        token = _bearer(authorization)
        if token is None:
            return Access.NONE
        # NOTE: check every token (no early exit) so timing does not reveal which set matched.
        is_admin = _matches(token, self.admin_tokens)
        is_client = _matches(token, self.client_tokens)
        if is_admin:
            return Access.ADMIN
        return Access.CLIENT if is_client else Access.NONE

    def check(self, authorization: str | None, *, admin: bool) -> tuple[grpc.StatusCode, str] | None:
        """None when allowed; else the status and a message (which never contains the token)."""
        if not self.enabled:
            return None
        needed = self.admin_tokens if admin else self.client_tokens
        if not needed and not admin:
            return None  # only admin is protected
        got = self.access(authorization)
        if got is Access.ADMIN or (got is Access.CLIENT and not admin):
            return None
        if got is Access.CLIENT:
            return grpc.StatusCode.PERMISSION_DENIED, "authorization: the admin API needs an admin token"
        if authorization is None:
            return grpc.StatusCode.UNAUTHENTICATED, "authorization: missing 'authorization: Bearer <token>'"
        return grpc.StatusCode.UNAUTHENTICATED, "authorization: invalid token"


def _bearer(value: str | None) -> str | None:
    if not value:
        return None
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def _matches(token: str, accepted: frozenset[str]) -> bool:
    ok = False
    for t in accepted:
        ok |= hmac.compare_digest(token.encode(), t.encode())
    return ok


def _service_of(method: str) -> str:
    # "/llmsched.v1.Admin/Scale" -> "llmsched.v1.Admin"
    return method.lstrip("/").split("/", 1)[0]


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):
    """Rejects calls without the right bearer token before they reach a servicer."""

    def __init__(self, auth: AuthConfig) -> None:
        self._auth = auth

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        service = _service_of(handler_call_details.method)
        if service in OPEN_SERVICES or not self._auth.enabled:
            return await continuation(handler_call_details)
        authorization = None
        for key, value in handler_call_details.invocation_metadata or ():
            if key == "authorization":
                authorization = value if isinstance(value, str) else value.decode(errors="replace")
                break
        denied = self._auth.check(authorization, admin=service == ADMIN_SERVICE)
        handler = await continuation(handler_call_details)
        if denied is None or handler is None:
            return handler
        return _rejecting_handler(handler, *denied)


def _rejecting_handler(
    like: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str
) -> grpc.RpcMethodHandler:
    """A handler of the same streaming kind as ``like`` that only aborts (the kind decides how grpc reads/writes)."""

    async def abort(_request: object, context: grpc.aio.ServicerContext) -> None:
        await context.abort(code, message)

    async def abort_stream(_request: object, context: grpc.aio.ServicerContext):  # type: ignore[no-untyped-def]
        await context.abort(code, message)
        yield  # pragma: no cover - makes this an async generator

    if like.request_streaming and like.response_streaming:
        return grpc.stream_stream_rpc_method_handler(abort_stream)
    if like.request_streaming:
        return grpc.stream_unary_rpc_method_handler(abort)
    if like.response_streaming:
        return grpc.unary_stream_rpc_method_handler(abort_stream)
    return grpc.unary_unary_rpc_method_handler(abort)


def http_check(
    auth: AuthConfig | None, authorization: str | None, *, admin: bool = False
) -> tuple[int, str] | None:
    """HTTP flavour of :meth:`AuthConfig.check`: None when allowed, else (status, message)."""
    if auth is None:
        return None
    denied = auth.check(authorization, admin=admin)
    if denied is None:
        return None
    code, message = denied
    return (403 if code is grpc.StatusCode.PERMISSION_DENIED else 401), message
