"""The user's journey through the docs (README, api, deploy, simulator, traces, scaling, observability): what they
point to exists, and the command-line help names the command a user types."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
USER_DOCS = [
    "README.md",
    *(f"docs/{n}.md" for n in ("api", "deploy", "simulator", "traces", "scaling", "observability")),
]


def _headings(path: Path) -> list[str]:
    return [
        re.sub(r"^#+\s+", "", line).strip() for line in path.read_text().splitlines() if line.startswith("#")
    ]


def _anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces as dashes."""
    return re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")


def broken_references(doc: Path) -> list[str]:
    """Links to missing files or anchors, and `file.md, "Section"` references to no heading of that file."""
    text = doc.read_text()
    bad = []
    for link in re.findall(r"\]\(([^)\s]+)\)", text):
        if link.startswith(("http://", "https://")):
            continue
        path, _, anchor = link.partition("#")
        target = (doc.parent / path).resolve() if path else doc
        if not target.exists():
            bad.append(f"{link}: no such file")
        elif anchor and target.suffix == ".md" and anchor not in {_anchor(h) for h in _headings(target)}:
            bad.append(f"{link}: no such heading")
    # `routing.md, "Dynamic re-roling"` or `[routing.md](routing.md), "..."`: a section named in prose
    for name, section in re.findall(r"([\w/]+\.md)\)?,\s+\"([^\"]+)\"", text):
        target = doc.parent / name if (doc.parent / name).exists() else ROOT / name
        wanted = " ".join(section.split()).lower()
        if not target.exists() or not any(wanted in h.lower() for h in _headings(target)):
            bad.append(f'{name}, "{section}": no such section')
    return bad


@pytest.mark.parametrize("doc", USER_DOCS)
def test_user_docs_point_to_what_exists(doc):
    assert broken_references(ROOT / doc) == []


def test_the_reference_check_catches_a_moved_section(tmp_path):
    """The check itself: simulator.md named a routing.md section that had moved to history/routing.md."""
    doc = tmp_path / "docs" / "sim.md"
    doc.parent.mkdir()
    (doc.parent / "routing.md").write_text("# Routing\n\n## Prefix ids in the request path\n")
    doc.write_text(
        'see (routing.md, "Prefix\n  cache in the engine model"), [r](routing.md#prefix-ids-in-the-request-path)\n'
    )
    assert broken_references(doc) == ['routing.md, "Prefix\n  cache in the engine model": no such section']


def test_bench_help_names_the_command_typed():
    """`llmsched bench NAME --help` printed `usage: cli.py` (sim, routing, grpc) or `python -m bench.bench_overload`."""
    from bench.cli import BENCHES, main

    wrong = {}
    for name in BENCHES:
        out = io.StringIO()
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as e:
            main([name, "--help"])
        assert e.value.code == 0
        if not out.getvalue().startswith(f"usage: llmsched bench {name} "):
            wrong[name] = out.getvalue().splitlines()[0]
    assert wrong == {}


def _help(main, argv: list[str]) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 0
    return out.getvalue()


def test_plan_help_does_not_offer_the_instances_it_refuses():
    """`llmsched plan --help` listed --instances as "override the instance count"; plan refuses it (exit 2)."""
    from sim.planner import main

    text = " ".join(_help(main, ["--help"]).split())
    assert "--instances INSTANCES not for plan" in text
    assert "override the instance count" not in text
    with pytest.raises(SystemExit) as e:
        main(["--instances", "4"])
    assert e.value.code == 2


def _serve_config(tmp_path: Path, predictor: dict) -> str:
    import yaml

    from scheduler.config.load import load_config

    data = load_config(str(ROOT / "deploy/examples/cpu-pd.yaml")).model_dump(mode="json")
    data["policies"]["predictor"] = predictor
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"tenant": "my-app"}, "policies.predictor.params.tenant"),
        ({"artifacts": "/nonexistent"}, "policies.predictor.params.artifacts"),
        ({"online": {"admit_after": 0}}, "policies.predictor.params.online.admit_after"),
    ],
)
def test_serve_refuses_a_bad_predictor_before_starting_a_cluster(
    tmp_path, params, field, no_cluster_start, capsys
):
    """deploy.md: a tenant the artifacts do not know is refused where they load -- for `llmsched serve` that was the
    Ingress, built after Ray and every engine had started (minutes; a traceback, no cluster shutdown)."""
    from scheduler import serve

    rc = serve.main(["--config", _serve_config(tmp_path, {"name": "trace", "params": params})])
    err = capsys.readouterr().err
    # (a bad value is refused with the config file named, an artifact problem where the predictor loads)
    assert rc == 2 and (f"error: {field}: " in err or f"invalid config (1 problem(s))\n  {field}: " in err)


def test_serve_hands_the_checked_predictor_to_the_ingress(tmp_path, monkeypatch):
    from scheduler import serve

    seen = []

    async def fake_serve(args) -> int:
        seen.append(args.predictor)
        return 0

    monkeypatch.setattr(serve, "_serve", fake_serve)
    cfg = _serve_config(tmp_path, {"name": "trace", "params": {"tenant": "azure_conv"}})
    assert serve.main(["--config", cfg]) == 0
    assert seen[0].tenant == "azure_conv"
