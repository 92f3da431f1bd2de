"""Bad command-line input is a clear error: exit 2 (usage) with a message naming the flag or config field -- never a
traceback, a hang, or a silently ignored value. One case per finding of the CLI usability audit; each fails fast,
before any simulation, Ray cluster or engine starts (the timeout turns a regression into a hang into a failure)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from scheduler.cli import main as cli_main

pytestmark = pytest.mark.timeout(30)

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_YAML = ROOT / "scheduler/config/examples/default.yaml"


def run(argv: list[str], capsys) -> tuple[int, str]:
    """(exit code, stderr) of ``llmsched ARGV`` run in-process; argparse's ``SystemExit`` is an exit code too."""
    try:
        rc = cli_main(argv)
    except SystemExit as e:
        rc = e.code
    return rc, capsys.readouterr().err


@pytest.fixture
def files(tmp_path: Path) -> dict[str, str]:
    """Paths the cases refer to as ``{name}``."""
    raw = yaml.safe_load(DEFAULT_YAML.read_text())
    zero = {**raw, "pools": [{**p, "count": 0} for p in raw["pools"]]}
    (tmp_path / "count0.yaml").write_text(yaml.safe_dump(zero))
    router = {**raw, "policies": {"router": {"name": "least_outstanding", "params": {"bogus": 1}}}}
    (tmp_path / "router_param.yaml").write_text(yaml.safe_dump(router))
    tp3 = {**raw, "pools": [{**p, "tp": 3} for p in raw["pools"]]}  # 32 heads do not split over 3 GPUs
    (tmp_path / "tp3.yaml").write_text(yaml.safe_dump(tp3))
    (tmp_path / "bad.yaml").write_text("model: [unclosed\n")
    row = '{"timestamp": 0, "input_length": 500, "output_length": 100}\n'
    (tmp_path / "same_ts.jsonl").write_text(row * 20)
    (tmp_path / "one.jsonl").write_text(row)
    (tmp_path / "bad.jsonl").write_text(row + '{"timestamp": 5, "input_length" 7}\n')
    (tmp_path / "file.txt").write_text("x")
    (tmp_path / "dir").mkdir()
    decode_only = {**raw, "pools": [{**p, "role": "decode"} for p in raw["pools"]]}  # nothing prefills: hung
    (tmp_path / "decode_only.yaml").write_text(yaml.safe_dump(decode_only))
    big = {**raw, "model": {**raw["model"], "num_layers": 80, "hidden_size": 8192, "num_heads": 64,
                            "num_kv_heads": 8, "intermediate_size": 28672}}  # 70B on one A100: no KV memory
    (tmp_path / "big.yaml").write_text(yaml.safe_dump(big))
    return {k: str(tmp_path / v) for k, v in {
        "count0": "count0.yaml", "router_param": "router_param.yaml", "bad_yaml": "bad.yaml", "tp3": "tp3.yaml",
        "same_ts": "same_ts.jsonl", "one": "one.jsonl", "bad_trace": "bad.jsonl", "file": "file.txt", "dir": "dir",
        "missing": "missing.csv", "png_txt": "fig.txt", "decode_only": "decode_only.yaml",
        "big": "big.yaml"}.items()}


# Small, fast settings first; the case's own flags come after and win (argparse keeps the last value).
SIM = ["simulate", "--quiet", "--synthetic", "50", "--instances", "2"]
CMP = ["compare", "--limit", "100", "--instances", "2", "--no-goodput", "--routers", "round_robin"]
PLAN = ["plan", "--limit", "100", "--gpus", "a100", "--tp", "1", "--layouts", "mixed", "--workers", "1",
        "--max-instances", "2", "--out", "{dir}/plan"]
REPLAY = ["replay", "--target", "127.0.0.1:1"]

CASES = [
    # P1: hangs
    (SIM + ["--scaling", "threshold", "--scaling-interval", "0"], "--scaling-interval"),
    (SIM + ["--scaling", "threshold", "--scaling-interval", "-1"], "--scaling-interval"),
    (SIM + ["--startup-delay", "-1"], "--startup-delay"),
    (CMP + ["--load", "0"], "--load"),
    (CMP + ["--load", "nan"], "--load"),
    (CMP + ["--load", "inf"], "--load"),
    (CMP + ["--load", "-0.5"], "--load"),
    # P2: tracebacks
    (PLAN + ["--tp", "0"], "--tp"),
    (PLAN + ["--tp", "abc"], "--tp"),
    (PLAN + ["--tp", "-1"], "--tp"),
    (PLAN + ["--tp", "3"], "--tp"),  # 32 heads do not split over 3 GPUs
    (PLAN + ["--layouts", "bogus"], "--layouts"),
    (PLAN + ["--layouts", ""], "--layouts"),
    (PLAN + ["--layouts", "pd:abc"], "--layouts"),
    (PLAN + ["--layouts", "pd:1.5"], "--layouts"),
    (PLAN + ["--layouts", "pd:0"], "--layouts"),
    (PLAN + ["--routers", "bogus"], "--routers"),
    (PLAN + ["--routers", ""], "--routers"),
    (PLAN + ["--target", "0"], "--target"),
    (PLAN + ["--target", "-1"], "--target"),
    (PLAN + ["--target", "1.5"], "--target"),
    (PLAN + ["--target", "nan"], "--target"),
    (PLAN + ["--workers", "0"], "--workers"),
    (PLAN + ["--workers", "-3"], "--workers"),
    (PLAN + ["--out", "{file}"], "--out"),
    (REPLAY + ["--trace", "{missing}"], "--trace"),
    (REPLAY + ["--trace", "{bad_trace}"], "--trace"),
    (REPLAY + ["--rate-scale", "0"], "--rate-scale"),
    (REPLAY + ["--limit", "-1"], "--limit"),
    (REPLAY + ["--max-model-len", "0"], "--max-model-len"),
    (REPLAY + ["--vocab", "0"], "--vocab"),
    (REPLAY + ["--max-output", "4000"], "--max-output"),
    (REPLAY + ["--json", "{dir}"], "--json"),
    (["simulate", "--quiet", "--config", "{count0}"], "count"),
    (["simulate", "--quiet", "--config", "{tp3}"], "pools[0].tp"),
    (["simulate", "--quiet", "--synthetic", "50", "--config", "{router_param}"], "policies.router"),
    (["profile", "--target", "127.0.0.1:1", "--repeats", "-1"], "--repeats"),
    (["profile", "--target", "127.0.0.1:1", "--vocab", "0"], "--vocab"),
    (["predict", "train", "--data-dir", "{missing}"], "--data-dir"),
    (["predict", "train", "--data-dir", "{dir}", "--out", "{dir}/out"], "--data-dir"),  # exists, but empty
    (["predict", "eval", "--data", "{dir}"], "--data"),
    (["predict", "eval", "--data", "{file}", "--json", "{dir}"], "--json"),
    (["predict", "fit-trace", "--trace", "{one}", "--out", "{file}"], "--out"),
    (SIM + ["--json", "{dir}"], "--json"),
    (SIM + ["--png", "{png_txt}"], "--png"),
    (CMP + ["--json", "{dir}"], "--json"),
    (CMP + ["--png", "{png_txt}"], "--png"),
    # P3: silently wrong or ignored
    (SIM + ["--synthetic", "0"], "--synthetic"),
    (SIM + ["--rate", "0"], "--rate"),
    (["simulate", "--quiet", "--limit", "0"], "--limit"),
    (CMP + ["--routers", ""], "--routers"),
    (CMP + ["--routers", ","], "--routers"),
    (CMP + ["--trace", "{same_ts}", "--limit", "20"], "same_ts.jsonl"),
    (CMP + ["--trace", "{one}"], "one.jsonl"),
    (PLAN + ["--trace", "{same_ts}", "--limit", "20"], "same_ts.jsonl"),
    # Second CLI audit (twenty-seventh session)
    (SIM + ["--config", "{decode_only}"], "no instance can prefill"),
    (CMP + ["--config", "{decode_only}"], "no instance can prefill"),
    (SIM + ["--config", "{big}"], "pools[0]"),
    (CMP + ["--config", "{big}"], "pools[0]"),
    (SIM + ["--json", "{file}/x.json"], "--json"),
    (SIM + ["--png", "{file}/x.png"], "--png"),
    (CMP + ["--json", "{file}/x.json"], "--json"),
    (PLAN + ["--out", "{file}/sub"], "--out"),
    (SIM + ["--trace", "{one}"], "--synthetic"),
    (["simulate", "--quiet", "--format", "azure"], "--format"),
    (SIM + ["--min-instances", "3"], "--scaling"),
    (SIM + ["--scaling", "threshold", "--goodput"], "--goodput"),
    (SIM + ["--scaling", "threshold", "--min-instances", "5", "--max-instances", "2"], "--min-instances"),
    (CMP + ["--rate-scale", "2"], "--rate-scale"),
    # P4: messages name the flag
    (SIM + ["--window", "abc"], "--window"),
    (SIM + ["--window", "5:1"], "--window"),
    (SIM + ["--limit", "-5"], "--limit"),
    (SIM + ["--rate-scale", "0"], "--rate-scale"),
    (SIM + ["--seed", "-1"], "--seed"),
]


@pytest.mark.parametrize("argv, needle", CASES, ids=[" ".join(a[:1] + a[-2:]) for a, _ in CASES])
def test_bad_input_exits_2_naming_the_flag(argv, needle, files, capsys) -> None:
    rc, err = run([a.format(**files) for a in argv], capsys)
    assert rc == 2, err
    assert needle in err
    assert "Traceback" not in err


@pytest.mark.parametrize("argv, needle", [
    (["--config", "{missing}"], "--config"),
    (["--config", "{bad_yaml}"], "--config"),
    (["--requests", "0"], "--requests"),
    (["--max-output", "-1"], "--max-output"),
    (["--rate-scale", "0"], "--rate-scale"),
    (["--out", "{file}"], "--out"),
])
def test_run_bad_input_fails_before_ray_starts(argv, needle, files, no_cluster_start, capsys) -> None:
    rc, err = run(["run", *(a.format(**files) for a in argv)], capsys)
    assert rc == 2, err
    assert needle in err


# Auth audit: these variables were read only once the cluster had started (a traceback minutes in); a TLS key
# without its certificate was ignored on loopback (plaintext); a file that is no PEM failed as "cannot bind".
@pytest.mark.parametrize(
    "env, needle",
    [
        ({"LLMSCHED_ADMIN_TOKEN_FILE": "{missing}"}, "LLMSCHED_ADMIN_TOKEN_FILE"),
        ({"LLMSCHED_TLS_CERT_FILE": "{file}", "LLMSCHED_TLS_KEY_FILE": "{file}"}, "LLMSCHED_TLS_CERT_FILE"),
        ({"LLMSCHED_TLS_KEY_FILE": "{file}"}, "LLMSCHED_TLS_CERT_FILE"),
    ],
)
def test_serve_bad_auth_env_fails_before_ray_starts(env, needle, files, no_cluster_start, monkeypatch, capsys) -> None:
    monkeypatch.delenv("LLMSCHED_HOST", raising=False)  # loopback: the open-by-default case
    for name, value in env.items():
        monkeypatch.setenv(name, value.format(**files))
    rc, err = run(["serve", "--config", str(ROOT / "deploy/examples/cpu-mixed.yaml")], capsys)
    assert rc == 2, err
    assert f"error: {needle}:" in err and "Traceback" not in err


def test_profile_unreachable_target_is_a_clear_error(capsys) -> None:
    rc, err = run(["profile", "--target", "127.0.0.1:1", "--out", "/dev/null"], capsys)
    assert rc == 1
    assert "--target 127.0.0.1:1" in err and "Unavailable" in err


@pytest.mark.parametrize("version", ["1.10", "abc", "1.99", "01.30"])
def test_chart_check_unknown_kube_version(version, capsys) -> None:
    pytest.importorskip("kubernetes_validate")
    rc, err = run(["chart", "check", "--kube-version", version], capsys)
    assert rc == 2 and "--kube-version" in err


def test_predict_unknown_subcommand_lists_fit_trace(capsys) -> None:
    rc, err = run(["predict", "bogus"], capsys)
    assert rc == 2 and "fit-trace" in err


def _strict_json(text: str) -> dict:
    def refuse(c):
        raise ValueError(f"invalid JSON constant {c}")

    return json.loads(text, parse_constant=refuse)


def test_predict_eval_undefined_kendall_tau_is_null(tmp_path: Path, capsys) -> None:
    """One record: Kendall's tau is undefined. The file stays valid JSON (null, not NaN), the rest are numbers."""
    data = tmp_path / "one.jsonl"
    data.write_text('{"prompt": "hello there", "response": "hi"}\n')
    out = tmp_path / "m.json"
    rc, err = run(["predict", "eval", "--data", str(data), "--json", str(out)], capsys)
    assert rc == 0
    m = _strict_json(out.read_text())
    assert m["kendall_tau"] is None and m["n"] == 1 and isinstance(m["mae_tokens"], float)
    assert "kendall_tau" in err


def test_make_router_unknown_parameter_names_router_and_parameter() -> None:
    from scheduler.policy.route import make_router

    with pytest.raises(ValueError, match=r"least_outstanding.*bogus"):
        make_router("least_outstanding", bogus=1)
    with pytest.raises(ValueError, match=r"llumnix.*bogus"):  # **kw passed on to a base class that refuses it
        make_router("llumnix", bogus=1)
    make_router("lookahead", config=None)  # a parameter the router does take still passes
    with pytest.raises(ValueError, match="max_pressure"):  # 1 - pressure divides a decode's time
        make_router("lookahead", max_pressure=1.0)


def test_fit_trace_undefined_kendall_tau_is_null(tmp_path: Path, capsys) -> None:
    """Held-out output lengths all equal: tau is undefined; the report is valid JSON with null."""
    trace = tmp_path / "eq.jsonl"
    trace.write_text("".join(f'{{"timestamp": {i}, "input_length": {100 + i}, "output_length": 50}}\n'
                             for i in range(30)))
    out = tmp_path / "m.json"
    rc, _ = run(["predict", "fit-trace", "--trace", str(trace), "--out", str(tmp_path / "a"), "--json", str(out)],
                capsys)
    assert rc == 0
    assert _strict_json(out.read_text())["held_out"]["kendall_tau"] is None
