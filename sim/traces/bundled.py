"""Small real trace slices shipped inside the package (``sim/data``), in their original formats.

They are read through ``importlib.resources``, so an installed wheel works without the repository's
``../shared``.
Sources and licenses: ``sim/data/README.md``.
"""

from __future__ import annotations

from dataclasses import replace
from importlib.resources import as_file, files
from pathlib import Path

from sim.traces.loaders import load_trace
from sim.traces.trace import Trace

# name -> file in sim/data. The name is what reports print; the files keep the upstream byte format.
_BUNDLED: dict[str, str] = {
    "azure_llm_2023_conv": "azure_llm_2023_conv_first10min.csv.gz",
    "mooncake_conversation": "mooncake_fast25_conversation_first1000.jsonl.gz",
}
DEFAULT_TRACE = "azure_llm_2023_conv"


def bundled_traces() -> dict[str, Path]:
    """Bundled trace name -> file path (needs a regular, unzipped install, as ``pip install`` gives)."""
    root = files("sim.data")
    out: dict[str, Path] = {}
    for name, fname in _BUNDLED.items():
        with as_file(root / fname) as p:  # a no-op for on-disk packages
            out[name] = Path(p)
    return out


def load_bundled(name: str, **kwargs) -> Trace:
    """Load one bundled trace by name (``bundled_traces()`` keys); the trace is named after ``name``."""
    paths = bundled_traces()
    if name not in paths:
        raise ValueError(f"unknown bundled trace {name!r}; allowed: {', '.join(paths)}")
    return replace(load_trace(paths[name], **kwargs), name=name)


def default_trace() -> Trace:
    """The first 10 minutes (2,867 requests) of the Azure LLM 2023 conversation trace (CC-BY-4.0)."""
    return load_bundled(DEFAULT_TRACE)
