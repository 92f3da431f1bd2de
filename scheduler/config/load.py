"""YAML loading with errors that name the file, the key path and the allowed values."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from scheduler.config.models import ClusterConfig


class ConfigError(ValueError):
    """A config file is wrong. The message names file, key and what is allowed."""


def _format_validation(source: str, err: ValidationError) -> str:
    lines = [f"{source}: invalid config ({err.error_count()} problem(s))"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = e["msg"]
        ctx = e.get("ctx") or {}
        if "expected" in ctx:
            msg += f" (allowed: {ctx['expected']})"
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        lines.append(f"  {key}: {msg}")
    return "\n".join(lines)


def parse_config(data: dict[str, Any], source: str = "<config>") -> ClusterConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: top level must be a mapping, got {type(data).__name__}")
    try:
        return ClusterConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_validation(source, e)) from None


def load_config(path: str | Path | None = None) -> ClusterConfig:
    """Load a cluster config from ``path``, or the bundled default when ``None``.

    A bare name (``llama2-7b-a100``) finds a bundled example in ``scheduler/config/examples``.
    """
    if path is None:
        path = "default"
    p = Path(path)
    if not p.exists() and not p.suffix:
        bundled = resources.files("scheduler.config") / "examples" / f"{path}.yaml"
        if bundled.is_file():
            return parse_config(yaml.safe_load(bundled.read_text()), source=str(path))
    if not p.exists():
        raise ConfigError(f"{path}: no such config file (bundled examples: {', '.join(bundled_configs())})")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1} column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{p}:{where} not valid YAML: {getattr(e, 'problem', e)}") from None
    return parse_config(data, source=str(p))


def bundled_configs() -> list[str]:
    d = resources.files("scheduler.config") / "examples"
    return sorted(f.name.removesuffix(".yaml") for f in d.iterdir() if f.name.endswith(".yaml"))
