"""YAML loading with errors that name the file, the key path and the allowed values."""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path
from types import UnionType
from typing import Any, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from scheduler.config.models import ClusterConfig


class ConfigError(ValueError):
    """A config file is wrong. The message names file, key and what is allowed."""


def _key_path(loc: tuple[Any, ...]) -> str:
    """``("pools", 0, "gpu")`` -> ``pools[0].gpu``."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _is_model(t: Any) -> bool:
    return isinstance(t, type) and issubclass(t, BaseModel)


def _unwrap_optional(t: Any) -> Any:
    args = [a for a in get_args(t) if a is not type(None)]
    return args[0] if get_origin(t) in (Union, UnionType) and len(args) == 1 else t


def _model_at(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The pydantic model class that owns the last key of ``loc`` (to list its allowed keys)."""
    cls: Any = ClusterConfig
    for part in loc[:-1]:
        if _is_model(cls) and isinstance(part, str) and part in cls.model_fields:
            cls = _unwrap_optional(cls.model_fields[part].annotation)
        elif get_origin(cls) in (list, dict):
            cls = _unwrap_optional(get_args(cls)[-1])
        else:
            return None
    return cls if _is_model(cls) else None


def _format_validation(source: str, err: ValidationError) -> str:
    lines = [f"{source}: invalid config ({err.error_count()} problem(s))"]
    for e in err.errors():
        loc = tuple(e["loc"])
        key = _key_path(loc)
        msg = e["msg"].removeprefix("Value error, ")
        ctx = e.get("ctx") or {}
        if e["type"] == "extra_forbidden":
            owner = _model_at(loc)
            allowed = f"; allowed: {', '.join(owner.model_fields)}" if owner else ""
            msg = f"unknown key{allowed}"
        elif "expected" in ctx and str(ctx["expected"]) not in msg:
            msg += f" (allowed: {ctx['expected']})"
        # Validators name a sub-key at the start of their message ("pools[0].gpu: ..."): fold it into the path.
        m = re.match(r"^([A-Za-z0-9_\-]+(?:\[\d+\])?(?:\.[A-Za-z0-9_\-]+(?:\[\d+\])?)*): (.*)$", msg, re.DOTALL)
        if e["type"] == "value_error" and m:
            # A message that already spells the whole path (``check_spec``'s "policies.predictor.name: ...", also
            # raised outside validation) is not prefixed again.
            inside = not key or m[1] == key or m[1].startswith((f"{key}.", f"{key}["))
            key = m[1] if inside else f"{key}.{m[1]}"
            msg = m[2]
        lines.append(f"  {key or '<root>'}: {msg}")
    return "\n".join(lines)


def parse_config(data: dict[str, Any], source: str = "<config>") -> ClusterConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: top level must be a mapping, got {type(data).__name__}")
    try:
        return ClusterConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_validation(source, e)) from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping: PyYAML keeps the last one silently, so a
    pool's second ``engine:`` (or a second ``pools:``) replaced the first without a word."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            if isinstance(key, str | int | float | bool):  # unhashable keys: left to PyYAML's own error
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _parse_yaml(text: str, source: str) -> Any:
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader: no arbitrary objects
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1} column {mark.column + 1}:" if mark else ""
        raise ConfigError(f"{source}:{where} not valid YAML: {getattr(e, 'problem', None) or e}") from None


def load_config(path: str | Path | None = None) -> ClusterConfig:
    """Load a cluster config from ``path``, or the bundled default when ``None``.

    A bare name (``llama2-7b-a100-16``) finds a bundled example in ``scheduler/config/examples``.

    Raises:
        ConfigError: missing file, invalid YAML or invalid content; the message names the file, the key path and
            the allowed values.
    """
    data, source = read_config(path)
    return parse_config(data, source=source)


def read_config(path: str | Path | None = None) -> tuple[Any, str]:
    """:func:`load_config`'s YAML, not validated yet (to change it first: ``llmsched serve --model-path``), and the
    name its errors give. Raises ``ConfigError`` for a missing file or invalid YAML."""
    if path is None:
        path = "default"
    p = Path(path)
    if not p.exists() and not p.suffix:
        bundled = resources.files("scheduler.config") / "examples" / f"{path}.yaml"
        if bundled.is_file():
            source = f"scheduler/config/examples/{path}.yaml"
            return _parse_yaml(bundled.read_text(), source), source
    if not p.is_file():
        what = "a directory, not a config file" if p.is_dir() else "no such config file"  # "no such" misled
        raise ConfigError(f"{path}: {what} (bundled examples: {', '.join(bundled_configs())})")
    return _parse_yaml(p.read_text(), str(p)), str(p)


def bundled_configs() -> list[str]:
    """Names of the example configs shipped in ``scheduler/config/examples`` (for ``load_config(name)``)."""
    d = resources.files("scheduler.config") / "examples"
    return sorted(f.name.removesuffix(".yaml") for f in d.iterdir() if f.name.endswith(".yaml"))
