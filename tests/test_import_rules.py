"""Import-linter-style layering checks (DESIGN.md "Dependency direction"), by parsing every module's imports.

* ``scheduler/policy`` imports only ``scheduler.{core,latency,engine_model,predict,config,policy}``, the standard
  library and numpy;
* nothing under ``scheduler/`` imports ``sim``;
* nothing imports ``scheduler.control`` except ``scheduler/control`` itself, ``scheduler/server`` and
  ``scheduler/cli.py``.

Imports anywhere in a module count (function-local ones too: a hidden cycle is still a cycle). ``cli.py``'s
lazy ``"module:function"`` strings are not imports and are not checked.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
POLICY_ALLOWED = ("scheduler.core", "scheduler.latency", "scheduler.engine_model", "scheduler.predict",
                  "scheduler.config", "scheduler.policy")
THIRD_PARTY_ALLOWED = ("numpy",)


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path, root: Path = ROOT) -> list[tuple[int, str]]:
    """(line, absolute module) for every import in ``path``, relative imports resolved."""
    tree = ast.parse(path.read_text(), filename=str(path))
    pkg = module_name(path, root).split(".")
    if path.name != "__init__.py":
        pkg = pkg[:-1]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg[: len(pkg) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.append((node.lineno, mod))
            # ``from scheduler import control`` imports the submodule.
            out += [(node.lineno, f"{mod}.{a.name}") for a in node.names if a.name != "*"]
    return out


def within(mod: str, prefixes: tuple[str, ...]) -> bool:
    return any(mod == p or mod.startswith(p + ".") for p in prefixes)


def is_stdlib(mod: str) -> bool:
    return mod.split(".")[0] in sys.stdlib_module_names or mod == "__future__"


def files(*dirs: str) -> list[Path]:
    return sorted(p for d in dirs for p in (ROOT / d).rglob("*.py"))


def violations(paths: list[Path], bad: Callable[[Path, str], bool], root: Path = ROOT) -> list[str]:
    """One line per offending import statement: ``file:line imports module``."""
    out = []
    for p in paths:
        seen: set[int] = set()
        for line, mod in imports_of(p, root):
            if line not in seen and bad(p, mod):
                seen.add(line)
                out.append(f"{p.relative_to(root)}:{line} imports {mod}")
    return out


def test_policy_imports_only_lower_layers() -> None:
    paths = files("scheduler/policy")
    assert paths, "scheduler/policy has no modules?"

    def bad(p: Path, mod: str) -> bool:
        if is_stdlib(mod) or within(mod, POLICY_ALLOWED) or within(mod, THIRD_PARTY_ALLOWED):
            return False
        # ``from scheduler.core import types`` also yields "scheduler.core.types": covered by the prefix.
        return mod != "scheduler"

    assert violations(paths, bad) == []


# The composition root: commands that wire the control plane, the servers and the simulator together (the README's
# main job compares a live run with a simulated one). Nothing imports them back.
ENTRY_POINTS = tuple(ROOT / "scheduler" / f for f in ("cli.py", "serve.py", "demo.py"))


def test_scheduler_never_imports_sim() -> None:
    paths = [p for p in files("scheduler") if p not in ENTRY_POINTS]
    assert violations(paths, lambda p, mod: within(mod, ("sim",))) == []


def test_nothing_imports_the_entry_points() -> None:
    mods = ("scheduler.cli", "scheduler.serve", "scheduler.demo")
    paths = [p for p in files("scheduler", "sim") if p not in ENTRY_POINTS]
    assert violations(paths, lambda p, mod: within(mod, mods)) == []


def test_only_server_and_cli_import_control() -> None:
    ok_dirs = (ROOT / "scheduler" / "control", ROOT / "scheduler" / "server")

    def bad(p: Path, mod: str) -> bool:
        if not within(mod, ("scheduler.control",)):
            return False
        return not (p in ENTRY_POINTS or any(d in p.parents for d in ok_dirs))

    assert violations(files("scheduler", "sim"), bad) == []


def test_the_checker_catches_violations(tmp_path: Path) -> None:
    """The rules must be able to fail: a planted bad module (in a scratch tree) is reported with its line."""
    planted = tmp_path / "scheduler" / "policy" / "bad.py"
    planted.parent.mkdir(parents=True)
    planted.write_text("import os\nfrom sim.simulator import Simulator\nfrom ..control import api\nimport ray\n"
                       "def f():\n    from scheduler import control\n")
    found = imports_of(planted, tmp_path)
    assert (2, "sim.simulator") in found and (3, "scheduler.control") in found and (4, "ray") in found
    assert (6, "scheduler.control") in found  # function-local imports count too
    assert not is_stdlib("ray") and is_stdlib("os")
    assert violations([planted], lambda p, m: within(m, ("sim",)), tmp_path) == [
        "scheduler/policy/bad.py:2 imports sim.simulator"]
    assert len(violations([planted], lambda p, m: within(m, ("scheduler.control",)), tmp_path)) == 2


@pytest.mark.parametrize("mod", ["scheduler.policy.route", "scheduler.policy.routers_smart",
                                 "scheduler.policy.migration", "scheduler.policy.scaling",
                                 "scheduler.policy.admission", "scheduler.policy.placement"])
def test_policy_modules_import_without_heavy_deps(mod: str) -> None:
    """Importing a policy pulls in no Ray, asyncio, gRPC or simulator (checked in a fresh interpreter)."""
    import subprocess

    code = (f"import sys, {mod}; bad = [m for m in ('ray', 'asyncio', 'grpc', 'sim') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
