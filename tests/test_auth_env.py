"""``AuthConfig.from_env``: the Helm chart's variables -> tokens / TLS, admin always locked, secrets never shown."""

from __future__ import annotations

import logging
from pathlib import Path

import grpc
import pytest

from scheduler.client import Client, PermissionDenied, Unauthenticated
from scheduler.server.auth import Access, AuthConfig
from scheduler.server.background import BackgroundServer
from scheduler.server.echo import EchoIngress
from tests.test_grpc_api import _self_signed

CLIENT = "client-secret-0123456789"
ADMIN = "admin-secret-9876543210"


def _files(tmp_path: Path, client: str | None = CLIENT, admin: str | None = ADMIN) -> dict[str, str]:
    env = {}
    if client is not None:
        (tmp_path / "client-token").write_text(client + "\n")  # files from a Secret end with a newline
        env["LLMSCHED_CLIENT_TOKEN_FILE"] = str(tmp_path / "client-token")
    if admin is not None:
        (tmp_path / "admin-token").write_text(admin + "\n")
        env["LLMSCHED_ADMIN_TOKEN_FILE"] = str(tmp_path / "admin-token")
    return env


def test_chart_env_reads_token_files(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    cfg = AuthConfig.from_env({**_files(tmp_path), "LLMSCHED_AUTH_ENABLED": "true"})
    assert cfg.access(f"Bearer {CLIENT}") is Access.CLIENT and cfg.access(f"Bearer {ADMIN}") is Access.ADMIN
    assert cfg.check(None, admin=False) is not None  # inference needs a token
    assert cfg.check(f"Bearer {CLIENT}", admin=True)[0] is grpc.StatusCode.PERMISSION_DENIED  # type: ignore[index]
    assert cfg.tls is None
    for shown in (repr(cfg), str(cfg), caplog.text):
        assert CLIENT not in shown and ADMIN not in shown, shown


def test_auth_disabled_opens_inference_but_never_admin(tmp_path: Path) -> None:
    cfg = AuthConfig.from_env({**_files(tmp_path), "LLMSCHED_AUTH_ENABLED": "false"})
    assert cfg.check(None, admin=False) is None
    assert cfg.check(f"Bearer {CLIENT}", admin=False) is None
    assert cfg.check(None, admin=True) is not None
    assert cfg.check(f"Bearer {CLIENT}", admin=True) is not None  # the client token is no admin credential
    assert cfg.check(f"Bearer {ADMIN}", admin=True) is None


def test_no_admin_token_file_locks_admin(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cfg = AuthConfig.from_env({"LLMSCHED_AUTH_ENABLED": "false"})
    assert cfg.check(None, admin=False) is None
    for presented in (None, "Bearer ", f"Bearer {CLIENT}", f"Bearer {ADMIN}"):
        assert cfg.check(presented, admin=True) is not None, presented
    assert "admin API is locked" in caplog.text
    # Client token set, no admin file: inference protected, admin still locked (never open).
    cfg = AuthConfig.from_env(_files(tmp_path, admin=None))
    assert cfg.check(f"Bearer {CLIENT}", admin=False) is None
    assert cfg.check(f"Bearer {CLIENT}", admin=True) is not None


def test_token_rotation_one_per_line(tmp_path: Path) -> None:
    (tmp_path / "a").write_text("old-admin\n\n  new-admin  \n")
    cfg = AuthConfig.from_env({"LLMSCHED_ADMIN_TOKEN_FILE": str(tmp_path / "a")})
    assert cfg.access("Bearer old-admin") is Access.ADMIN and cfg.access("Bearer new-admin") is Access.ADMIN


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"LLMSCHED_ADMIN_TOKEN_FILE": "/nonexistent/admin"}, "LLMSCHED_ADMIN_TOKEN_FILE"),
        ({"LLMSCHED_ADMIN_TOKEN_FILE": "EMPTY"}, "LLMSCHED_ADMIN_TOKEN_FILE"),
        ({"LLMSCHED_AUTH_ENABLED": "maybe"}, "LLMSCHED_AUTH_ENABLED"),
        ({"LLMSCHED_TLS_CERT_FILE": "CERT"}, "LLMSCHED_TLS_KEY_FILE"),
        ({"LLMSCHED_TLS_CLIENT_CA_FILE": "CERT"}, "LLMSCHED_TLS_CERT_FILE"),
        ({"LLMSCHED_TLS_CERT_FILE": "CERT", "LLMSCHED_TLS_KEY_FILE": "/nonexistent/key"}, "LLMSCHED_TLS_KEY_FILE"),
        ({"SAME": "1"}, "LLMSCHED_CLIENT_TOKEN_FILE"),
    ],
)
def test_bad_env_names_the_variable_not_the_secret(tmp_path: Path, env: dict[str, str], named: str) -> None:
    (tmp_path / "empty").write_text("\n \n")
    (tmp_path / "cert").write_text("not really a cert")
    env = {k: {"EMPTY": str(tmp_path / "empty"), "CERT": str(tmp_path / "cert")}.get(v, v) for k, v in env.items()}
    if env.pop("SAME", None):
        env |= _files(tmp_path, client=ADMIN, admin=ADMIN)
    with pytest.raises(ValueError) as e:
        AuthConfig.from_env(env)
    assert str(e.value).startswith(named), str(e.value)
    assert ADMIN not in str(e.value) and CLIENT not in str(e.value)


def test_from_env_end_to_end_over_tls(tmp_path: Path) -> None:
    """The chart's full contract on a live server: TLS from files, client vs admin token on gRPC."""
    from scheduler.client import ClientTLS

    cert, key = _self_signed()
    (tmp_path / "tls.crt").write_bytes(cert)
    (tmp_path / "tls.key").write_bytes(key)
    env = {
        **_files(tmp_path),
        "LLMSCHED_TLS_CERT_FILE": str(tmp_path / "tls.crt"),
        "LLMSCHED_TLS_KEY_FILE": str(tmp_path / "tls.key"),
    }
    cfg = AuthConfig.from_env(env)
    assert cfg.tls is not None and cfg.tls.files is not None
    assert cfg.tls.uvicorn_kwargs()["ssl_certfile"] == str(tmp_path / "tls.crt")
    assert "BEGIN" not in repr(cfg)  # key material stays out of repr
    tls = ClientTLS(root_certificates=cert, server_name="localhost")
    with BackgroundServer(EchoIngress, auth=cfg) as s:
        with Client(s.address, tls=tls, token=CLIENT, retries=0) as c:
            assert c.generate("ok", max_tokens=2).token_ids == [ord("o"), ord("k")]
            with pytest.raises(PermissionDenied):
                c.instances()
        with Client(s.address, tls=tls, token="wrong", retries=0) as c, pytest.raises(Unauthenticated):
            c.generate("x")
        with Client(s.address, tls=tls, token=CLIENT, admin_token=ADMIN, retries=0) as c:
            assert [i.instance_id for i in c.instances()] == ["echo-0", "echo-1"]


def test_rotated_token_files_take_effect_without_a_restart(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The files were read once at start: a rotated Secret reached the server only with a restart of the head pod
    (its whole Ray cluster). Now a change is re-read; a broken update keeps the tokens in force."""
    env = _files(tmp_path)
    auth = AuthConfig.from_env(env, reload_s=0.0)

    def swap(name: str, text: str) -> None:  # as the kubelet updates a Secret volume: a new file replaces the old
        (tmp_path / f"{name}.new").write_text(text)
        (tmp_path / f"{name}.new").replace(tmp_path / name)

    with BackgroundServer(EchoIngress, auth=auth) as s:
        def works(token: str, admin: bool = False) -> bool:
            with Client(s.address, token=token, timeout_s=10, retries=0) as c:
                try:
                    c.instances() if admin else c.generate("hi", max_tokens=2)
                except (Unauthenticated, PermissionDenied):
                    return False
                return True

        assert works(CLIENT) and works(ADMIN, admin=True)
        swap("client-token", f"{CLIENT}\nclient-new-42\n")  # step 1: the new token beside the old one
        assert works(CLIENT) and works("client-new-42")
        swap("client-token", "client-new-42\n")  # step 2: the old one gone
        assert not works(CLIENT) and works("client-new-42")
        swap("admin-token", "admin-new-42\n")
        assert works("admin-new-42", admin=True) and not works(ADMIN, admin=True)
        swap("client-token", "\n")  # a broken update: nothing is locked out, and it says so
        assert works("client-new-42")
        assert "not reloaded" in caplog.text and "client-new-42" not in caplog.text
