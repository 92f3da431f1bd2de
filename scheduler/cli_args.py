"""argparse ``type=`` checks shared by the ``llmsched`` subcommands.

A bad value exits 2 with ``argument --flag: ...`` instead of a traceback, a hang (``--scaling-interval 0``) or a
silently ignored flag (``--limit 0``). Standard library only (matplotlib lazily, for ``figure_file``): every
subcommand, ``sim/`` included, imports these without pulling anything heavy in.
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path


def _number(cast, s: str, *, low: float, strict: bool) -> float:
    kind = "an integer" if cast is int else "a finite number"
    try:
        v = cast(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {kind}, got {s!r}") from None
    if not math.isfinite(v) or v < low or (strict and v == low):
        raise argparse.ArgumentTypeError(f"must be {kind} {'>' if strict else '>='} {low:g}, got {s!r}")
    return v


def positive_int(s: str) -> int:
    return _number(int, s, low=0, strict=True)


def nonneg_int(s: str) -> int:
    return _number(int, s, low=0, strict=False)


def positive_float(s: str) -> float:
    return _number(float, s, low=0.0, strict=True)


def nonneg_float(s: str) -> float:
    return _number(float, s, low=0.0, strict=False)


def port(s: str) -> int:
    """A TCP port to listen on, 0-65535 (0: any free port). Checked before a server starts its cluster."""
    v = nonneg_int(s)
    if v > 65535:
        raise argparse.ArgumentTypeError(f"must be a TCP port 0-65535, got {s!r}")
    return v


def token_vocab(s: str) -> int:
    """``--vocab`` of the load generators: prompt ids are drawn from ``[4, vocab)`` (0-3: special tokens)."""
    v = positive_int(s)
    if v <= 4:
        raise argparse.ArgumentTypeError(f"must be > 4 (ids 0-3 are special tokens), got {s!r}")
    return v


def _creatable(s: str) -> None:
    """Refuse a path whose nearest existing ancestor is a file or cannot be written into: it would fail only
    when the result is written, at the end of the run."""
    parent = Path(s).absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise argparse.ArgumentTypeError(f"cannot create {s!r}: {str(parent)!r} is a file")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"cannot create {s!r}: no permission to write in {str(parent)!r}")


def output_file(s: str) -> str:
    """A file to write at the end: refused up front when it names a folder or cannot be created (the work would
    be lost)."""
    if not s or Path(s).is_dir():
        raise argparse.ArgumentTypeError(f"{s!r} is a directory, not a file" if s else "empty path")
    _creatable(s)
    return s


def figure_file(s: str) -> str:
    """``output_file`` whose extension matplotlib can write (none: PNG)."""
    output_file(s)
    ext = Path(s).suffix.lower().lstrip(".")
    if ext:
        from matplotlib.backend_bases import FigureCanvasBase

        formats = FigureCanvasBase.get_supported_filetypes()
        if ext not in formats:
            raise argparse.ArgumentTypeError(f"unsupported figure format {ext!r} in {s!r}; use one of "
                                             f"{', '.join(sorted(formats))}")
    return s


def output_dir(s: str) -> str:
    """A folder to write into (created if missing): refused up front when it is an existing file."""
    if not s or (Path(s).exists() and not Path(s).is_dir()):
        raise argparse.ArgumentTypeError(f"{s!r} exists and is not a directory" if s else "empty path")
    if not Path(s).exists():
        _creatable(s)
    return s
