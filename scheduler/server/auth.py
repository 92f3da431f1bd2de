"""Token auth and TLS settings shared by the gRPC and HTTP servers.

Two credentials: *client* tokens may call Inference (and the OpenAI HTTP API); *admin* tokens may call everything,
including the Admin service. Both travel as ``authorization: Bearer <token>`` (gRPC metadata or HTTP header).
Health checks and reflection stay open so Kubernetes probes and ``grpcurl`` work without secrets.

Tokens are compared in constant time and never logged or echoed in error messages.
"""

from __future__ import annotations

import enum
import hmac
import logging
import os
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import grpc

logger = logging.getLogger(__name__)

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


# The variables ``AuthConfig.from_env`` reads TLS files from: (cert chain, private key, client CA).
TLS_VARS = ("LLMSCHED_TLS_CERT_FILE", "LLMSCHED_TLS_KEY_FILE", "LLMSCHED_TLS_CLIENT_CA_FILE")


class Access(enum.Enum):
    """What a presented credential allows."""

    NONE = "none"
    CLIENT = "client"
    ADMIN = "admin"


@dataclass(frozen=True, slots=True)
class TLSConfig:
    """Server TLS material (PEM bytes). With ``client_ca`` set, clients must present a certificate it signed (mTLS)."""

    cert_chain: bytes = field(repr=False)
    private_key: bytes = field(repr=False)  # NOTE: never in repr/logs
    client_ca: bytes | None = field(default=None, repr=False)
    # Where the PEMs came from (uvicorn's TLS takes paths); None when built from bytes.
    files: tuple[str, str, str | None] | None = None

    @classmethod
    def from_files(
        cls,
        cert: str | Path,
        key: str | Path,
        client_ca: str | Path | None = None,
        *,
        names: tuple[str, str, str] = ("cert", "key", "client_ca"),
    ) -> TLSConfig:
        """Raises ValueError naming (as ``names``) a file that is unreadable or not PEM of its kind, or a key not
        of the cert."""

        def read(name: str, path: str | Path) -> bytes:
            try:
                return Path(path).read_bytes()
            except OSError as e:
                why = e.strerror or type(e).__name__
                raise ValueError(f"{name}: cannot read {str(path)!r} ({why})") from None

        out = cls(
            cert_chain=read(names[0], cert),
            private_key=read(names[1], key),
            client_ca=read(names[2], client_ca) if client_ca else None,
            files=(str(cert), str(key), str(client_ca) if client_ca else None),
        )
        _check_pems(out.files, names)  # type: ignore[arg-type]
        return out

    def uvicorn_kwargs(self) -> dict[str, object]:
        """``uvicorn.Config`` TLS arguments for the HTTP server (needs :attr:`files`)."""
        if self.files is None:
            raise ValueError("TLSConfig.uvicorn_kwargs: build it with from_files() (uvicorn reads PEM files)")
        import ssl

        cert, key, ca = self.files
        out: dict[str, object] = {"ssl_certfile": cert, "ssl_keyfile": key}
        if ca:
            out |= {"ssl_ca_certs": ca, "ssl_cert_reqs": ssl.CERT_REQUIRED}
        return out

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

    client_tokens: frozenset[str] = field(default=frozenset(), repr=False)  # NOTE: secrets stay out of repr
    admin_tokens: frozenset[str] = field(default=frozenset(), repr=False)
    tls: TLSConfig | None = None
    # Where the tokens came from (``from_env``): re-read when they change, so a rotation needs no restart.
    files: TokenFiles | None = field(default=None, repr=False, compare=False)

    def __repr__(self) -> str:
        return (f"AuthConfig(client_tokens=<{len(self.client_tokens)} redacted>, "
                f"admin_tokens=<{len(self.admin_tokens)} redacted>, tls={self.tls!r})")

    def __post_init__(self) -> None:
        for name in ("client_tokens", "admin_tokens"):
            tokens = getattr(self, name)
            if isinstance(tokens, str):  # a single token passed by mistake would become a set of characters
                raise TypeError(f"AuthConfig.{name} must be a collection of tokens, not a str")
            if any(not t for t in tokens):
                raise ValueError(f"AuthConfig.{name} must not contain empty tokens")
            # A token read from a file keeps its newline unless stripped: it could never match "Bearer <token>".
            if any(_has_space(t) for t in tokens):
                raise ValueError(f"AuthConfig.{name}: a token must not contain whitespace (strip it)")
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

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, *, reload_s: float = 10.0) -> AuthConfig:
        """Auth from the variables the Helm chart sets on ``llmsched serve`` (docs/deploy.md, "Security").

        - ``LLMSCHED_ADMIN_TOKEN_FILE``: admin token(s), one per line (several = rotation). The admin API always
          needs a token: when the variable is unset, a random token nobody knows is used (Admin unreachable,
          never open) and a warning says so.
        - ``LLMSCHED_CLIENT_TOKEN_FILE``: client token(s) for Inference and ``/v1/*``; ignored when
          ``LLMSCHED_AUTH_ENABLED`` is false (inference open; admin still protected). Unset = inference open.
        - ``LLMSCHED_TLS_CERT_FILE`` + ``LLMSCHED_TLS_KEY_FILE``: serve TLS; ``LLMSCHED_TLS_CLIENT_CA_FILE``: mTLS.

        The token files are checked for changes every ``reload_s`` seconds (a Kubernetes Secret update rewrites
        them in place): rotate by adding the new token, moving clients over, then removing the old one.

        Raises:
            ValueError: naming the variable (never a token): unreadable or empty token file, a bad boolean, equal
                client and admin tokens, TLS half configured, a TLS file unreadable or not PEM of its kind (or a
                key not of the cert).
        """
        env = os.environ if env is None else env
        enabled = _env_bool(env, "LLMSCHED_AUTH_ENABLED", default=True)
        admin_file = env.get("LLMSCHED_ADMIN_TOKEN_FILE")
        if admin_file:
            admin = _read_tokens("LLMSCHED_ADMIN_TOKEN_FILE", admin_file)
        else:
            logger.warning("LLMSCHED_ADMIN_TOKEN_FILE is not set: the admin API is locked (no token can call it)")
            admin = frozenset([secrets.token_urlsafe(32)])
        client_file = env.get("LLMSCHED_CLIENT_TOKEN_FILE")
        client: frozenset[str] = frozenset()
        if enabled and client_file:
            client = _read_tokens("LLMSCHED_CLIENT_TOKEN_FILE", client_file)
            if client & admin:
                raise ValueError("LLMSCHED_CLIENT_TOKEN_FILE: a client token equals an admin token; the admin API "
                                 "needs a distinct credential")
        elif enabled:
            logger.warning("LLMSCHED_CLIENT_TOKEN_FILE is not set: the inference API is open")
        cert, key = env.get("LLMSCHED_TLS_CERT_FILE"), env.get("LLMSCHED_TLS_KEY_FILE")
        ca = env.get("LLMSCHED_TLS_CLIENT_CA_FILE")
        tls = None
        if cert or key or ca:
            missing = [n for n, v in (("LLMSCHED_TLS_CERT_FILE", cert), ("LLMSCHED_TLS_KEY_FILE", key)) if not v]
            if missing:
                raise ValueError(f"{missing[0]}: must be set with the other TLS variables")
            for name, path in zip(TLS_VARS, (cert, key, ca), strict=True):
                if path and not Path(path).is_file():
                    raise ValueError(f"{name}: no such file {path!r}")
            tls = TLSConfig.from_files(cert, key, ca, names=TLS_VARS)  # type: ignore[arg-type]
        files = TokenFiles(client_file if enabled else None, admin_file, (client, admin), reload_s=reload_s)
        cfg = cls(client_tokens=client, admin_tokens=admin, tls=tls, files=files)
        logger.info("auth: inference %s, admin token required, tls=%s, mtls=%s",
                    "token required" if client else "open", tls is not None, bool(tls and tls.client_ca))
        return cfg

    @property
    def enabled(self) -> bool:
        return bool(self.client_tokens or self.admin_tokens)

    def uvicorn_kwargs(self) -> dict[str, object]:
        """``uvicorn.Config`` TLS arguments for the HTTP server: none without TLS (see TLSConfig.uvicorn_kwargs)."""
        return self.tls.uvicorn_kwargs() if self.tls is not None else {}

    def _reload(self) -> None:
        got = self.files.poll() if self.files is not None else None
        if got is not None:
            object.__setattr__(self, "client_tokens", got[0])
            object.__setattr__(self, "admin_tokens", got[1])

    def access(self, authorization: str | None) -> Access:
        """Classify an ``authorization`` header value (``Bearer <token>``)."""
        self._reload()
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
        self._reload()
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


class TokenFiles:
    """The token files an :class:`AuthConfig` was read from, re-read when one changes (its stat: a Kubernetes Secret
    update swaps the mounted files within a minute or so). Checked at most every ``reload_s`` on the request path
    (a stat, no read, while nothing changed). A file that cannot be read, holds no token or gives a client token
    equal to an admin token leaves the tokens in force (a half-written update must not lock every client out) and
    is logged, then tried again."""

    def __init__(self, client: str | None, admin: str | None, tokens: tuple[frozenset[str], frozenset[str]], *,
                 reload_s: float) -> None:
        self.client, self.admin, self.tokens, self.reload_s = client, admin, tokens, reload_s
        self._stamp = self._stat()
        self._due = time.monotonic() + reload_s

    def _stat(self) -> tuple[tuple[int, int, int] | None, ...]:
        out: list[tuple[int, int, int] | None] = []
        for path in (self.client, self.admin):
            try:
                st = os.stat(path) if path else None
            except OSError:
                st = None
            out.append((st.st_ino, st.st_mtime_ns, st.st_size) if st is not None else None)
        return tuple(out)

    def poll(self) -> tuple[frozenset[str], frozenset[str]] | None:
        """The new (client, admin) tokens when the files changed since the last read; None otherwise."""
        now = time.monotonic()
        if now < self._due or (self.client is None and self.admin is None):
            return None
        self._due = now + self.reload_s
        stamp = self._stat()
        if stamp == self._stamp:
            return None
        client, admin = self.tokens
        try:
            if self.admin:
                admin = _read_tokens("LLMSCHED_ADMIN_TOKEN_FILE", self.admin)
            if self.client:
                client = _read_tokens("LLMSCHED_CLIENT_TOKEN_FILE", self.client)
            if client & admin:
                raise ValueError("LLMSCHED_CLIENT_TOKEN_FILE: a client token equals an admin token")
        except ValueError as e:
            logger.warning("auth: token files changed but were not reloaded (the tokens in force stay): %s", e)
            return None
        self._stamp, self.tokens = stamp, (client, admin)
        logger.info("auth: tokens reloaded (%d client, %d admin)", len(client), len(admin))
        return self.tokens


def _env_bool(env: Mapping[str, str], name: str, *, default: bool) -> bool:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    v = raw.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{name}: expected true or false, got {raw!r}")


def _read_tokens(name: str, path: str) -> frozenset[str]:
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ValueError(f"{name}: cannot read {path!r} ({e.strerror or type(e).__name__})") from None
    tokens = frozenset(line.strip() for line in text.splitlines() if line.strip())
    if not tokens:
        raise ValueError(f"{name}: {path!r} holds no token")
    if any(_has_space(t) for t in tokens):  # "Bearer a b" could never match: fail at start, not per call
        raise ValueError(f"{name}: {path!r}: a token must not contain whitespace")
    return tokens


def _has_space(token: str) -> bool:
    return any(c.isspace() for c in token)


def _check_pems(files: tuple[str, str, str | None], names: tuple[str, str, str]) -> None:
    """ValueError naming the bad file: grpc only logs why and fails start-up with a misleading "Failed to bind"."""
    import ssl

    cert, key, ca = files
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    for name, path in ((names[0], cert), (names[2], ca)):
        if path:
            try:
                ctx.load_verify_locations(cafile=path)
            except ssl.SSLError as e:
                raise ValueError(f"{name}: {path!r} holds no PEM certificate ({e.reason or e})") from None
    try:
        # NOTE: a password, so that an encrypted key fails here rather than prompting on the terminal.
        ctx.load_cert_chain(cert, key, password=b"")
    except ssl.SSLError as e:
        raise ValueError(
            f"{names[1]}: {key!r} is not the unencrypted PEM private key of {names[0]} ({e.reason or e})"
        ) from None


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
