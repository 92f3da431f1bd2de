"""CLI / config audit (thirty-first session): each case failed before its fix.

Config errors must name the field path and come when the config is loaded -- not after a Ray cluster has started
(``llmsched serve``), and never as a silently wrong simulation.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from scheduler.cli import main as cli_main
from scheduler.config.load import ConfigError, load_config, parse_config
from tests.test_cli_bad_input import run  # (exit code, stderr) of `llmsched ARGV` in-process

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[1]
RAW = yaml.safe_load((ROOT / "scheduler/config/examples/default.yaml").read_text())
POOL = RAW["pools"][0]


def config_error(data: dict) -> str:
    with pytest.raises(ConfigError) as e:
        parse_config(data, source="c.yaml")
    return str(e.value)


def test_duplicate_pool_names_are_refused() -> None:
    """Two pools of one name gave the simulator two instances per id (``mixed-0`` twice): routing reached only
    half of them (TTFT p50 7.5 s instead of 0.09 s on the default trace slice), and the live pools are keyed by
    name too."""
    err = config_error({**RAW, "pools": [{**POOL, "count": 2}, {**POOL, "count": 2, "gpu": "h100"}]})
    assert "pools[1].name: duplicate pool name 'mixed'" in err


@pytest.mark.parametrize(
    "policies, needle",
    [
        ({"router": {"name": "bogus"}}, "policies.router.name: unknown router 'bogus'"),
        ({"router": {"name": "round_robin", "params": {"bogus": 1}}}, "policies.router.params: "),
        ({"migration": {"name": "bogus"}}, "policies.migration.name: unknown migration policy 'bogus'"),
        ({"scaling": {"name": "bogus"}}, "policies.scaling.name: unknown scaling policy 'bogus'"),
        ({"reroling": {"name": "bogus"}}, "policies.reroling.name: unknown re-roling policy 'bogus'"),
        ({"predictor": {"name": "bogus"}}, "  policies.predictor.name: unknown predictor 'bogus'"),
        ({"admission": {"name": "bogus"}}, "policies.admission.name: unknown admission policy 'bogus'"),
    ],
)
def test_unknown_policy_names_fail_at_load_naming_the_field(policies, needle) -> None:
    """These were checked only where the live Controller / Ingress build them (``llmsched serve`` failed after
    starting Ray, with an actor's traceback) and ``llmsched simulate`` ran without them; the predictor's message
    said ``policies.predictor.policies.predictor.name``."""
    err = config_error({**RAW, "policies": policies})
    assert needle in err
    assert "policies.predictor.policies" not in err


def test_known_policies_still_load() -> None:
    cfg = parse_config(
        {
            **RAW,
            "policies": {
                "router": {"name": "lookahead"},
                "migration": {"name": "llumnix"},
                "scaling": {"name": "sla"},
                "reroling": {"name": "threshold"},
            },
        }
    )
    assert cfg.policies.migration.name == "llumnix"


def test_out_of_tree_router_that_cannot_be_imported_is_a_clear_error(capsys) -> None:
    """``--router module:Class`` (the documented out-of-tree form) with a missing module was a traceback."""
    rc, err = run(
        ["simulate", "--quiet", "--synthetic", "20", "--instances", "2", "--router", "nomodule:X"], capsys
    )
    assert rc == 2 and "--router" in err and "nomodule:X" in err and "Traceback" not in err
    rc, err = run(
        [
            "simulate",
            "--quiet",
            "--synthetic",
            "20",
            "--instances",
            "2",
            "--router",
            "scheduler.policy.route:NoSuchRouter",
        ],
        capsys,
    )
    assert rc == 2 and "NoSuchRouter" in err


def test_duplicate_yaml_keys_are_refused(tmp_path: Path) -> None:
    """PyYAML keeps the last of two equal keys: a pool's second ``engine:`` (or a second ``pools:``) silently
    replaced the first."""
    text = (
        (ROOT / "scheduler/config/examples/default.yaml")
        .read_text()
        .replace("    count: 4\n", "    count: 4\n    count: 1\n")
    )
    p = tmp_path / "dup.yaml"
    p.write_text(text)
    with pytest.raises(
        ConfigError, match=r"dup.yaml: line \d+ column \d+: not valid YAML: duplicate key 'count'"
    ):
        load_config(p)


def test_missing_or_broken_latency_profile_names_the_field(tmp_path: Path, capsys) -> None:
    """A missing file read ``[Errno 2] No such file or directory``, a broken one ``Expecting value: line 1``:
    neither said which config field pointed there."""
    for name, body in (("missing.json", None), ("broken.json", "{not json")):
        prof = tmp_path / name
        if body is not None:
            prof.write_text(body)
        cfg = tmp_path / f"{name}.yaml"
        cfg.write_text(yaml.safe_dump({**RAW, "latency_profile": str(prof)}))
        rc, err = run(["simulate", "--quiet", "--synthetic", "20", "--config", str(cfg)], capsys)
        assert rc == 2 and f"latency_profile {prof}" in err, err


@pytest.mark.parametrize(
    "args, flag",
    [
        (["--port", "-5"], "--port"),
        (["--port", "70000"], "--port"),
        (["--http-port", "-1"], "--http-port"),
        (["--grace-s", "-1"], "--grace-s"),
        (["--fake-gpus-per-node", "-2"], "--fake-gpus-per-node"),
    ],
)
def test_serve_bad_numbers_fail_before_ray_starts(args, flag, no_cluster_start, capsys) -> None:
    """``serve --port -5`` started a Ray cluster and the engines, then failed (or hung) binding the port."""
    rc, err = run(["serve", "--config", "tiny-cpu", *args], capsys)
    assert rc == 2 and f"argument {flag}" in err


def test_serve_tp_wider_than_fake_gpu_nodes_fails_before_ray_starts(tmp_path: Path, no_cluster_start, capsys) -> None:
    """A TP-2 pool on 1-GPU fake nodes: its STRICT_PACK placement group could never be placed; serve waited out the
    start timeout, warned "only 0 of 2 instances came up" and served nothing."""
    raw = yaml.safe_load((ROOT / "scheduler/config/examples/tiny-cpu.yaml").read_text())
    raw["pools"][0]["tp"] = 2
    cfg = tmp_path / "tp2.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    rc, err = run(["serve", "--config", str(cfg), "--fake-gpus-per-node", "1"], capsys)
    assert rc == 2 and "--fake-gpus-per-node: " in err and "pools[0] (mixed): TP 2" in err
    assert run(["serve", "--config", str(cfg), "--fake-gpus-per-node", "x"], capsys)[0] == 2


def test_bench_help_exits_0_and_unknown_bench_is_named(capsys) -> None:
    """``llmsched bench --help`` was exit 2 (a help request is no usage error) and ``bench bogus`` did not say
    what was wrong."""
    rc = cli_main(["bench", "--help"])
    out = capsys.readouterr()
    assert rc == 0 and "sim" in out.out
    rc, err = run(["bench", "bogus"], capsys)
    assert rc == 2 and "unknown benchmark 'bogus'" in err


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["/nonexistent.csv"], "/nonexistent.csv: trace file not found"),
        (["--rate", "-1", "sim/data/azure_llm_2023_conv_first10min.csv.gz"], "argument --rate"),
        (["--limit", "0"], "argument --limit"),  # printed n 0 summaries
    ],
)
def test_trace_summary_command_bad_input_exits_2(argv, needle, capsys) -> None:
    """``python -m sim.traces`` (docs/traces.md): a missing file or a rate <= 0 was a traceback."""
    from sim.traces.__main__ import main

    try:
        rc = main([a if a.startswith(("-", "/")) or a.isdigit() else str(ROOT / a) for a in argv])
    except SystemExit as e:
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2 and needle in err and "Traceback" not in err


@pytest.mark.parametrize(
    "flags, needle", [(["--only", ""], "--only: nothing named"), (["--l2", "-1"], "argument --l2")]
)
def test_predict_train_refuses_an_empty_selection(flags, needle, tmp_path: Path, capsys) -> None:
    """``predict train --only ''`` trained nothing and exited 0 (an empty report); a negative L2 was taken."""
    rc, err = run(
        ["predict", "train", "--data-dir", str(tmp_path), "--out", str(tmp_path / "o"), *flags], capsys
    )
    assert rc == 2 and needle in err


def test_tp_must_split_the_kv_heads_as_vllm_does() -> None:
    """40 heads / 8 KV heads at TP 5: vLLM refuses it (TP must divide the KV heads or be a multiple of them), and so
    did the planner's instance_profile, but the config accepted it and the simulator ran it."""
    model = {**RAW["model"], "hidden_size": 5120, "num_heads": 40, "num_kv_heads": 8}
    err = config_error({**RAW, "model": model, "pools": [{**POOL, "tp": 5}]})
    assert "pools[0].tp: 5 GPUs do not split the model's 40 attention / 8 KV heads" in err
    for tp in (1, 2, 4, 8):  # divides both; 8 KV heads, one per GPU
        parse_config({**RAW, "model": model, "pools": [{**POOL, "tp": tp}]})
    model16 = {**model, "num_heads": 32, "hidden_size": 4096}
    parse_config({**RAW, "model": model16, "pools": [{**POOL, "tp": 16}]})  # 16 = 2 x 8 KV heads: replicated


def test_simulate_says_which_config_policies_it_does_not_apply(tmp_path: Path, capsys) -> None:
    """A config with ``policies.migration`` / ``scaling`` (the chart's hetero-pd values) simulated a static cluster
    without migration, and nothing said so. Since the fortieth session simulate runs the config's migration (and
    re-roling) policy: the note names only scaling, unless ``--scaling`` runs one."""
    cfg = tmp_path / "c.yaml"
    policies = {
        "router": {"name": "least_outstanding"},
        "migration": {"name": "llumnix"},
        "scaling": {"name": "sla"},
    }
    cfg.write_text(yaml.safe_dump({**RAW, "policies": policies}))
    base = ["simulate", "--quiet", "--synthetic", "30", "--config", str(cfg)]
    rc, err = run(base, capsys)
    assert rc == 0 and "policies.scaling not applied: the live Controller applies it;" in err
    assert "policies.migration" not in err
    rc, err = run([*base, "--scaling", "threshold"], capsys)  # the flag's scaling policy runs, not the config's
    assert rc == 0 and "not applied" not in err
    assert "policies.scaling names 'sla': its params are not read for --scaling threshold" in err
    rc, err = run([*base, "--scaling", "sla"], capsys)  # the config's policy, with its params
    assert rc == 0 and "policies.scaling" not in err
    rc, err = run(["simulate", "--quiet", "--synthetic", "30"], capsys)
    assert rc == 0 and "not applied" not in err


def test_instances_keeps_one_instance_in_every_pool(capsys) -> None:
    """``--instances 2`` on 3 PREFILL + 1 DECODE rounded to [2, 1] and took the overshoot from the last pool: [2, 0],
    so the decode pool was empty ("no instance can decode") though 2 instances fit one per pool."""
    from sim.commands import with_instances

    raw = yaml.safe_load((ROOT / "scheduler/config/examples/llama2-7b-pd-a100.yaml").read_text())
    raw["pools"][0]["count"], raw["pools"][1]["count"] = 3, 1
    cfg = parse_config(raw)
    assert [p.count for p in with_instances(cfg, 2).pools] == [1, 1]
    assert [p.count for p in with_instances(cfg, 8).pools] == [6, 2]  # proportional, as before
    tier = load_config("llama3-8b-a100-longctx-tier-pd")  # 12 MIXED + 4 PREFILL
    assert [p.count for p in with_instances(tier, 2).pools] == [1, 1]
    assert [p.count for p in with_instances(tier, 16).pools] == [12, 4]
    rc, err = run(
        [
            "simulate",
            "--quiet",
            "--synthetic",
            "20",
            "--config",
            "llama3-8b-a100-longctx-tier-pd",
            "--instances",
            "2",
        ],
        capsys,
    )
    assert rc == 0, err


def test_window_past_the_trace_says_where_the_trace_is(capsys) -> None:
    """``--window 700:800`` on the 600 s bundled slice said only "the workload is empty after --window/--limit"."""
    rc, err = run(["simulate", "--quiet", "--window", "700:800"], capsys)
    assert rc == 2 and "--window 700:800: no request arrives there" in err and "span 0-600.0 s" in err


def test_compare_and_plan_use_the_configs_router_params(tmp_path: Path) -> None:
    """``compare`` / ``plan`` built every router with default params: a config's ``policies.router: {name: llumnix,
    params: {headroom: 0.3}}`` (or a learned router's ``path``) ran as plain llumnix, unlike ``simulate``."""
    from sim.compare import router_factory
    from sim.planner import Candidate, make_config

    policies = {"router": {"name": "llumnix", "params": {"headroom": 0.3}}}
    cfg = parse_config({**RAW, "policies": policies})
    assert router_factory("llumnix", cfg)().headroom == 0.3
    assert router_factory("round_robin", cfg)().name == "round_robin"  # another router: no params of this one
    assert router_factory("lookahead", cfg)() is not None  # still bound to the config
    cand = Candidate("a100", 1, "mixed", "llumnix")
    planned = make_config(cfg, cand, (2,))
    assert planned.policies.router.params == {"headroom": 0.3}
    assert router_factory("llumnix", planned)().headroom == 0.3
    assert make_config(cfg, Candidate("a100", 1, "mixed", "round_robin"), (2,)).policies.router.params == {}


def test_plan_routers_take_parameters_as_compare_does(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """``plan --routers llumnix:metric=remaining_steps`` simulated the variant (router_factory parses the entry) but
    the planned config named its router ``llumnix:metric=remaining_steps``, no router ``serve`` knows, without
    the base config's params: best-cluster.yaml did not run what the table measured. The entry is parsed by
    compare's ``router_spec`` (one parser): router ``llumnix`` with the config's params and the entry's over them."""
    from scheduler.policy.route import make_router
    from sim import planner
    from sim.compare import router_factory
    from sim.planner import Candidate, make_config

    cfg = parse_config({**RAW, "policies": {"router": {"name": "llumnix", "params": {"headroom": 0.3}}}})
    cand = Candidate("a100", 1, "mixed", "llumnix:metric=remaining_steps")
    planned = make_config(cfg, cand, (2,))
    assert planned.policies.router.name == "llumnix"
    assert planned.policies.router.params == {"headroom": 0.3, "metric": "remaining_steps"}
    assert ":" not in planned.name and "=" not in planned.name, planned.name
    written = parse_config(yaml.safe_load(yaml.safe_dump(planned.model_dump(mode="json"))))  # best-cluster.yaml
    served = make_router(written.policies.router.name, **written.policies.router.params)
    simulated = router_factory(cand.router, planned)()
    assert (served.metric, served.headroom) == (simulated.metric, simulated.headroom) == ("remaining_steps", 0.3)
    other = make_config(cfg, Candidate("a100", 1, "mixed", "round_robin:x=1"), (2,)).policies.router
    assert (other.name, other.params) == ("round_robin", {"x": 1})  # another router: none of llumnix's params
    seen: list = []
    monkeypatch.setattr(planner, "plan", lambda base, w, **kw: seen.append(kw) or [])
    assert cli_main(["plan", "--synthetic", "50", "--gpus", "a100", "--tp", "1", "--routers",
                     "llumnix,llumnix:metric=remaining_steps", "--out", str(tmp_path / "p")]) == 1
    assert seen[0]["routers"] == ("llumnix", "llumnix:metric=remaining_steps")
    rc, err = run(["plan", "--synthetic", "50", "--routers", "llumnix:metric=bogus", "--out", str(tmp_path / "q")],
                  capsys)
    assert rc == 2 and "--routers" in err, err  # an unknown metric: refused before any simulation


def test_latency_profile_refuses_pools_it_cannot_time(tmp_path: Path) -> None:
    """One engine's measured profile timed a TP-1 and a TP-4 pool (or an A100 and an H100 one) alike in the
    simulator -- the planner refuses that, ``simulate`` ran it."""
    tier = yaml.safe_load((ROOT / "scheduler/config/examples/llama3-8b-a100-longctx-tier.yaml").read_text())
    err = config_error({**tier, "latency_profile": str(tmp_path / "p.json")})
    assert (
        "latency_profile: one engine's measured step times cannot time pools on a100 x TP1, a100 x TP4" in err
    )
    pd = yaml.safe_load((ROOT / "scheduler/config/examples/llama2-7b-pd-a100.yaml").read_text())
    parse_config({**pd, "latency_profile": str(tmp_path / "p.json")})  # two roles, one (GPU, TP): fine


@pytest.mark.parametrize(
    "gpus, pool, needle",
    [
        (
            {"a100": {"count": 2}},
            {"count": 4},
            "gpus.a100.count: 2 GPUs, but the pools need 4 (pools[0] mixed: 4 x TP1)",
        ),
        ({"a100": {"count": 2}}, {"count": 1, "tp": 4}, "gpus.a100.count: 2 GPUs, but the pools need 4"),
    ],
)
def test_pools_beyond_the_gpu_inventory_are_refused(gpus, pool, needle) -> None:
    """``gpus.<key>.count`` (GPUs of the type available; the chart sets it to the worker groups' maximum) was read by
    the planner only: a config whose pools need more loaded, simulated, and live left instances unplaced."""
    err = config_error({**RAW, "gpus": gpus, "pools": [{**POOL, **pool}]})
    assert needle in err
    parse_config(
        {**RAW, "gpus": {"a100": {"count": 4}}, "pools": [{**POOL, "count": 2, "tp": 2}]}
    )  # exactly fits


def test_json_outputs_into_a_new_folder_are_written(tmp_path: Path, capsys) -> None:
    """``output_file`` lets a path in a folder still to be made through (it can be created), but ``predict eval
    --json``, ``predict train --report``, ``profile --out`` and ``run --resimulate --json`` then wrote with a bare
    ``write_text``: FileNotFoundError after the work was done."""
    data = tmp_path / "e.jsonl"
    data.write_text(
        '{"prompt": "hello there", "response": "hi you"}\n{"prompt": "a long essay", "response": "ok"}\n'
    )
    out = tmp_path / "new" / "e.json"
    rc, err = run(["predict", "eval", "--data", str(data), "--json", str(out)], capsys)
    assert rc == 0 and out.is_file(), err
    runs = sorted((ROOT / "docs/results/live_vs_sim_s8").glob("s8-*/"))[:1]
    out = tmp_path / "new2" / "r.json"
    rc, err = run(["run", "--resimulate", *map(str, runs), "--json", str(out)], capsys)
    assert rc == 0 and out.is_file(), err


def test_serve_bad_log_level_is_one_line_naming_the_variable(no_cluster_start, monkeypatch, capsys) -> None:
    """``LLMSCHED_LOG_LEVEL=foo`` (the chart's ``logLevel``) was a ValueError traceback."""
    monkeypatch.setenv("LLMSCHED_LOG_LEVEL", "foo")
    rc, err = run(["serve", "--config", "tiny-cpu"], capsys)
    assert rc == 2 and "error: LLMSCHED_LOG_LEVEL: Unknown level: 'FOO'" in err


def test_config_that_is_a_directory_says_so(tmp_path: Path) -> None:
    """``--config some/folder`` said "no such config file" of a path that exists."""
    with pytest.raises(ConfigError, match="a directory, not a config file"):
        load_config(tmp_path)


def test_simulate_seed_reaches_the_simulators_host_noise(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """``llmsched simulate --seed`` seeded the arrivals but not the simulator's host-noise draws (a profiled
    config's spread), so two seeds of one replay drew the same noise."""
    from sim import commands

    seen: list[int] = []
    real = commands.Simulator

    class Spy(real):  # type: ignore[misc, valid-type]
        def __init__(self, *a, **kw):  # type: ignore[no-untyped-def]
            seen.append(kw.get("seed", 0))
            super().__init__(*a, **kw)

    monkeypatch.setattr(commands, "Simulator", Spy)
    rc, _ = run(["simulate", "--quiet", "--synthetic", "20", "--instances", "2", "--seed", "7"], capsys)
    assert rc == 0 and seen == [7]


@pytest.mark.parametrize("args, env", [(["--on-exit", "stay"], {}), ([], {"LLMSCHED_ON_EXIT": "stay"})])
def test_serve_bad_on_exit_fails_before_ray_starts(args, env, no_cluster_start, monkeypatch, capsys) -> None:
    """``--on-exit`` / ``LLMSCHED_ON_EXIT`` (the chart's container restart): a typo must not fall back to either."""
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    rc, err = run(["serve", "--config", "tiny-cpu", *args], capsys)
    assert rc == 2 and "argument --on-exit: use shutdown or keep, got 'stay'" in err and "LLMSCHED_ON_EXIT" in err


def test_serve_port_in_use_fails_before_ray_starts(no_cluster_start, capsys) -> None:
    """The servers bind once every engine is up: a taken ``--port`` was a gRPC traceback minutes later, a taken
    ``--http-port`` an error after "serving ... HTTP on" was printed, the gRPC server serving on without it."""
    import socket

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = str(held.getsockname()[1])
        for flag in ("--port", "--http-port"):
            args = {"--port": "0", "--http-port": "0", flag: port}
            rc, err = run(["serve", "--config", "tiny-cpu", *[a for kv in args.items() for a in kv]], capsys)
            assert rc == 2 and f"{flag}: cannot listen on 127.0.0.1:{port}" in err and "another process" in err
    rc, err = run(["serve", "--config", "tiny-cpu", "--port", "50999", "--http-port", "50999"], capsys)
    assert rc == 2 and "--http-port: 50999 is --port's too" in err
