"""Auth/TLS audit: one test per finding, each a real request over loopback (or the real config path) that failed
before its fix. See also test_auth_env.py (the chart's variables) and the auth tests of test_grpc_api/test_http_api."""

from __future__ import annotations

import asyncio
import http.client
import json
import socket
import ssl
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from scheduler.client import ClientTLS
from scheduler.server.auth import AuthConfig, TLSConfig
from scheduler.server.background import BackgroundServer
from scheduler.server.echo import EchoIngress
from scheduler.server.http_server import build_app
from tests.test_grpc_api import _self_signed

pytestmark = pytest.mark.timeout(60)

CLIENT, ADMIN = "client-secret-0123456789", "admin-secret-9876543210"
BODY = {"prompt": "hi", "max_tokens": 2}


@contextmanager
def _uvicorn(app: Any, **config: Any) -> Iterator[int]:
    """Serve ``app`` with uvicorn on a loopback port (its own loop thread); yields the port."""
    import uvicorn

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off", **config))
    server.install_signal_handlers = lambda: None  # type: ignore[method-assign]

    async def start() -> asyncio.Task[None]:
        task = asyncio.ensure_future(server.serve(sockets=[sock]))
        while not server.started:
            if task.done():
                task.result()
            await asyncio.sleep(0.01)
        return task

    task = asyncio.run_coroutine_threadsafe(start(), loop).result(10)
    try:
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        asyncio.run_coroutine_threadsafe(asyncio.wait_for(task, 5), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()


def _request(
    port: int, method: str, path: str, token: str | None = None, *, tls: ssl.SSLContext | None = None
):  # type: ignore[no-untyped-def]
    if tls is None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    else:
        conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=10, context=tls)
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
    conn.request(method, path, body=json.dumps(BODY) if method == "POST" else None, headers=headers)
    resp = conn.getresponse()
    out = resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    conn.close()
    return out


# ------------------------------------------------------------------------------------------- HTTP routes


def test_http_auth_holds_behind_root_path_and_when_mounted() -> None:
    """The token check looked at request.url.path.startswith("/v1/"): behind a proxy (uvicorn --root-path) or
    mounted in another app that path carries the prefix, and /v1/* answered anyone with 200."""
    from fastapi import FastAPI

    auth = AuthConfig.tokens(client=CLIENT, admin=ADMIN)
    with _uvicorn(build_app(EchoIngress(), auth=auth), root_path="/api") as port:
        for method, path in (
            ("POST", "/v1/completions"),
            ("POST", "/v1/chat/completions"),
            ("GET", "/v1/models"),
        ):
            assert _request(port, method, path)[0] == 401, path
        assert _request(port, "POST", "/v1/completions", CLIENT)[0] == 200
        assert _request(port, "GET", "/health")[0] == 200  # probes stay open
    parent = FastAPI()
    parent.mount("/llm", build_app(EchoIngress(), auth=auth))
    with _uvicorn(parent) as port:
        assert _request(port, "POST", "/llm/v1/completions")[0] == 401
        assert _request(port, "GET", "/llm/v1/models")[0] == 401
        assert _request(port, "POST", "/llm/v1/completions", CLIENT)[0] == 200
        assert _request(port, "GET", "/llm/health")[0] == 200


def test_http_401_names_the_bearer_scheme() -> None:
    """RFC 6750/7235: a 401 carries WWW-Authenticate (it had none)."""
    with BackgroundServer(EchoIngress, http=True, auth=AuthConfig.tokens(client=CLIENT, admin=ADMIN)) as s:
        for token in (None, "wrong"):
            status, headers, payload = _request(s.http_port, "POST", "/v1/completions", token)
            assert status == 401 and headers.get("www-authenticate") == "Bearer", headers
            assert json.loads(payload)["error"]["type"] == "authentication_error"
        assert "www-authenticate" not in _request(s.http_port, "POST", "/v1/completions", CLIENT)[1]


def test_http_auth_is_judged_before_the_body_is_read() -> None:
    """The body limit wrapped the app outside the token check: an unauthenticated client had the server buffer
    up to the limit and got 413 (counted as the API's invalid input) instead of 401."""
    big = json.dumps({"prompt": "x" * 5000, "max_tokens": 2}).encode()
    app = build_app(EchoIngress(), auth=AuthConfig.tokens(client=CLIENT, admin=ADMIN), max_body_bytes=1000)
    with _uvicorn(app) as port:
        for token, want in ((None, 401), ("wrong", 401), (CLIENT, 413)):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
            conn.request("POST", "/v1/completions", body=big, headers=headers)
            assert conn.getresponse().status == want, token
            conn.close()


# ------------------------------------------------------------------------------------------- TLS


def _pems(tmp_path: Path) -> dict[str, Path]:
    """Two self-signed certificates (server, client) and their keys, plus a file that is no PEM, by name."""
    out = {"garbage": tmp_path / "garbage.pem"}
    out["garbage"].write_text("not a PEM file\n")
    for who in ("server", "client"):
        cert, key = _self_signed()
        out[f"{who}_cert"], out[f"{who}_key"] = tmp_path / f"{who}.crt", tmp_path / f"{who}.key"
        out[f"{who}_cert"].write_bytes(cert)
        out[f"{who}_key"].write_bytes(key)
    return out


def test_background_server_http_serves_tls_and_requires_client_cert(tmp_path: Path) -> None:
    """With TLS (mTLS) configured the gRPC port was TLS but BackgroundServer's HTTP port plaintext, open to a
    client without any certificate."""
    p = _pems(tmp_path)
    tls = TLSConfig.from_files(p["server_cert"], p["server_key"], client_ca=p["client_cert"])
    with BackgroundServer(EchoIngress, http=True, auth=AuthConfig(tls=tls)) as s:
        with pytest.raises((ConnectionError, http.client.HTTPException)):
            _request(s.http_port, "GET", "/v1/models")  # plaintext is refused
        ctx = ssl.create_default_context(cafile=str(p["server_cert"]))
        with pytest.raises((ssl.SSLError, ConnectionError)):  # TLS without a client certificate is refused
            _request(s.http_port, "GET", "/v1/models", tls=ctx)
        ctx.load_cert_chain(p["client_cert"], p["client_key"])
        assert _request(s.http_port, "GET", "/v1/models", tls=ctx)[0] == 200
    # TLS from bytes cannot reach uvicorn (it reads files): a clear error, never a plaintext HTTP port.
    in_memory = AuthConfig(
        tls=TLSConfig(cert_chain=p["server_cert"].read_bytes(), private_key=p["server_key"].read_bytes())
    )
    srv = BackgroundServer(EchoIngress, http=True, auth=in_memory)
    try:
        with pytest.raises(ValueError, match="from_files"):
            srv.start()
        assert srv.grpc is None  # refused before anything listens
    finally:
        srv.stop()


@pytest.mark.parametrize(
    ("cert", "key", "ca", "named"),
    [
        ("garbage", "server_key", None, "LLMSCHED_TLS_CERT_FILE"),
        ("server_cert", "garbage", None, "LLMSCHED_TLS_KEY_FILE"),
        ("server_cert", "client_key", None, "LLMSCHED_TLS_KEY_FILE"),  # a key of another certificate
        ("server_key", "server_cert", None, "LLMSCHED_TLS_CERT_FILE"),  # the two swapped
        ("server_cert", "server_key", "garbage", "LLMSCHED_TLS_CLIENT_CA_FILE"),
    ],
)
def test_bad_pem_is_an_error_naming_the_variable(
    tmp_path: Path, cert: str, key: str, ca: str | None, named: str
) -> None:
    """A TLS file that exists but is not PEM of its kind was accepted; grpc then failed start-up with
    "cannot bind gRPC server to ...: Failed to bind" (pointing at the port, not the file)."""
    p = _pems(tmp_path)
    env = {
        "LLMSCHED_ADMIN_TOKEN_FILE": str(tmp_path / "admin"),
        "LLMSCHED_TLS_CERT_FILE": str(p[cert]),
        "LLMSCHED_TLS_KEY_FILE": str(p[key]),
    }
    (tmp_path / "admin").write_text(ADMIN + "\n")
    if ca:
        env["LLMSCHED_TLS_CLIENT_CA_FILE"] = str(p[ca])
    with pytest.raises(ValueError) as e:
        AuthConfig.from_env(env)
    assert str(e.value).startswith(named + ":"), str(e.value)
    assert "BEGIN" not in str(e.value)  # no key material in the message


# ------------------------------------------------------------------------------------------- secrets


@pytest.mark.parametrize("token", [CLIENT + "\n", CLIENT + " ", "two words"])
def test_token_with_whitespace_is_rejected_not_silently_unusable(token: str) -> None:
    """``AuthConfig.tokens(client=open(secret).read())`` kept the newline: no "Bearer <token>" header can match it
    (the bearer value is stripped), so every client got 401 with no hint why."""
    for kw in ("client", "admin"):
        with pytest.raises(ValueError, match="whitespace") as e:
            AuthConfig.tokens(**{kw: token})
        assert CLIENT not in str(e.value)


def test_client_tls_repr_hides_the_private_key() -> None:
    """The SDK's ClientTLS printed its private key in repr (the server's TLSConfig already hides it)."""
    cert, key = _self_signed()
    shown = repr(ClientTLS(root_certificates=cert, private_key=key, certificate_chain=cert))
    assert "PRIVATE KEY" not in shown and key.decode() not in shown
