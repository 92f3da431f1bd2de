"""Trace file loaders: Azure LLM CSV, Mooncake JSONL, BurstGPT CSV, token-pair CSV (gzip or plain).

Auto-detection (``format=None``) looks at the first non-blank line:

- starts with ``{`` -> ``mooncake`` (JSON lines: ``timestamp`` in ms, ``input_length``, ``output_length``,
  optional ``hash_ids``);
- otherwise a CSV header. Column names are compared case-insensitively with spaces, ``_`` and ``-`` removed:
  ``Request tokens`` + ``Response tokens`` -> ``burstgpt``;
  ``ContextTokens`` + ``GeneratedTokens`` -> ``azure``;
  a prompt-length + output-length pair (``num_prefill_tokens``/``num_decode_tokens``, ``prompt_tokens``/
  ``output_tokens``, ``input_length``/``output_length``, ...) -> ``tokens``.

Gzip is recognised by its magic bytes (1f 8b), whatever the file is called. Rows are sorted by arrival
(stably) and re-based so the first arrival is at 0.0. Rows with 0 prompt or 0 output tokens are dropped and
counted in ``Trace.skipped_rows`` (BurstGPT logs failed requests as ``Response tokens == 0``). Every
malformed cell raises :class:`TraceFormatError` naming the file, the line and the column.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import math
import re
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from sim.traces.synthetic import arrival_times
from sim.traces.trace import Trace, TraceFormatError

FORMATS: tuple[str, ...] = ("azure", "mooncake", "burstgpt", "tokens")

# Accepted CSV column names per role, normalised by _norm(); the first is the canonical (shown in errors).
_COLUMNS: dict[str, dict[str, tuple[str, ...]]] = {
    "azure": {
        "time": ("TIMESTAMP",),
        "prompt": ("ContextTokens",),
        "output": ("GeneratedTokens",),
    },
    "burstgpt": {
        "time": ("Timestamp",),
        "prompt": ("Request tokens",),
        "output": ("Response tokens",),
    },
    "tokens": {
        "prompt": (
            "num_prefill_tokens",
            "prompt_tokens",
            "input_tokens",
            "input_length",
            "prompt_len",
            "prompt_length",
            "context_tokens",
        ),
        "output": (
            "num_decode_tokens",
            "output_tokens",
            "output_length",
            "output_len",
            "completion_tokens",
            "generated_tokens",
            "response_tokens",
        ),
    },
}
_OPTIONAL: dict[str, dict[str, tuple[str, ...]]] = {
    "burstgpt": {"model": ("Model",), "log_type": ("Log Type",)},
    "tokens": {"time": ("arrived_at", "arrival_s", "arrival_time", "timestamp_s")},
}
_ZERO = frozenset({"0", "0.0", "-0"})
# Time-like column names (normalised) that no format reads: a tokens file holding one is refused, not re-timed.
_UNREAD_TIME = frozenset({"timestamp", "time", "arrival", "arrivaltimems", "timestampms", "ts", "t"})
_TZ = re.compile(r"(Z|[+-]\d\d:?\d\d)$")


def _norm(name: str) -> str:
    return re.sub(r"[\s_\-]", "", name.strip().lstrip("\ufeff").lower())


def _trace_name(path: Path) -> str:
    name = path.name
    for suffix in (".gz", ".csv", ".jsonl", ".json", ".txt"):
        name = name.removesuffix(suffix)
    return name


# ------------------------------------------------------------------------------------------------ reading


def _open_binary(path: Path) -> io.BufferedIOBase:
    try:
        with open(path, "rb") as f:
            magic = f.read(2)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: trace file not found") from None
    if magic == b"\x1f\x8b":  # gzip by magic bytes, not by suffix
        return gzip.open(path, "rb")
    return open(path, "rb")


def _lines(path: Path, stream: io.BufferedIOBase, counter: list[int]) -> Iterator[str]:
    """Decoded lines of ``stream``; gzip and UTF-8 failures become TraceFormatError at the line being read.

    Decoding line by line (not through a TextIOWrapper) keeps the reported line number exact.
    """
    it = iter(stream)
    while True:
        try:
            raw = next(it)
        except StopIteration:
            return
        except (EOFError, gzip.BadGzipFile, zlib.error) as e:
            raise TraceFormatError(
                str(path), counter[0] + 1, f"truncated or corrupt gzip stream ({e})"
            ) from None
        counter[0] += 1
        try:
            yield raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise TraceFormatError(
                str(path),
                counter[0],
                f"not UTF-8 text ({e.reason} at byte {e.start} of the line)",
                value=raw.decode("utf-8", "replace").strip(),
            ) from None


# ----------------------------------------------------------------------------------------------- conversions


def _bad_cell(path: Path, values: list[str], lines: list[int], column: str, ok) -> TraceFormatError:
    """Locate the first value failing ``ok`` (slow path, only after the vectorised parse failed)."""
    for v, ln in zip(values, lines):
        problem = ok(v)
        if problem:
            return TraceFormatError(str(path), ln, problem, column=column, value=v)
    return TraceFormatError(str(path), None, "could not parse column", column=column)


def _check_int(v: str) -> str | None:
    try:
        x = float(v)
    except ValueError:
        return "not a number"
    if not math.isfinite(x) or x != int(x):
        return "not a whole number of tokens"
    if x < 0:
        return "negative token count"
    return None


def _to_tokens(path: Path, values: list[str], lines: list[int], column: str) -> np.ndarray:
    try:
        out = np.array(values, dtype=np.int64)
    except (ValueError, OverflowError):
        try:  # token counts written as floats ("54.0") are accepted when whole
            f = np.array(values, dtype=np.float64)
        except ValueError:
            raise _bad_cell(path, values, lines, column, _check_int) from None
        if not (np.all(np.isfinite(f)) and np.all(f == np.floor(f))):
            raise _bad_cell(path, values, lines, column, _check_int) from None
        out = f.astype(np.int64)
    if len(out) and out.min() < 0:
        raise _bad_cell(path, values, lines, column, _check_int)
    return out


def _check_seconds(v: str) -> str | None:
    try:
        x = float(v)
    except ValueError:
        return "not a number of seconds"
    return None if math.isfinite(x) else "not a finite number of seconds"


def _to_seconds(path: Path, values: list[str], lines: list[int], column: str) -> np.ndarray:
    try:
        out = np.array(values, dtype=np.float64)
    except ValueError:
        raise _bad_cell(path, values, lines, column, _check_seconds) from None
    if not np.all(np.isfinite(out)):
        raise _bad_cell(path, values, lines, column, _check_seconds)
    return out


def _check_datetime(v: str) -> str | None:
    try:
        np.datetime64(_TZ.sub("", v.strip()), "ns")
    except ValueError:
        return "not a timestamp like '2023-11-16 18:15:46.6805900'"
    return None


def _to_wallclock(path: Path, values: list[str], lines: list[int], column: str) -> np.ndarray:
    """Wall-clock strings (Azure: ``2023-11-16 18:15:46.6805900``, optional ``Z``/``+hh:mm``) -> seconds.

    Plain numbers are taken as seconds (re-timed copies of the Azure trace use them).
    """
    if not values:
        return np.zeros(0)
    if _check_seconds(values[0]) is None:
        return _to_seconds(path, values, lines, column)
    offsets = None
    if _TZ.search(values[0].strip()):
        offsets = np.zeros(len(values))
        stripped = []
        for i, v in enumerate(values):
            m = _TZ.search(v.strip())
            tz = m.group(1) if m else ""
            if tz and tz != "Z":
                sign = -1 if tz[0] == "-" else 1
                digits = tz[1:].replace(":", "")
                offsets[i] = sign * (int(digits[:2]) * 3600 + int(digits[2:]) * 60)
            stripped.append(_TZ.sub("", v.strip()))
        values_p = stripped
    else:
        values_p = values
    try:
        t = np.array(values_p, dtype="datetime64[ns]")
    except ValueError:
        raise _bad_cell(path, values, lines, column, _check_datetime) from None
    if np.any(np.isnat(t)):
        i = int(np.argmax(np.isnat(t)))
        raise TraceFormatError(str(path), lines[i], "empty or NaT timestamp", column=column, value=values[i])
    sec = (t - t.min()).astype(np.int64) / 1e9
    return sec - offsets if offsets is not None else sec


# ------------------------------------------------------------------------------------------------ formats


def _finish(
    path: Path,
    name: str,
    source: str,
    t: np.ndarray,
    p: np.ndarray,
    o: np.ndarray,
    *,
    skipped: int,
    hash_ids: list[tuple[int, ...]] | None = None,
    tenant: np.ndarray | None = None,
    limit: int | None = None,
    drawn_arrivals: str = "",
) -> Trace:
    keep = (p > 0) & (o > 0)  # "00"-style zeros that slipped past the string check
    if not np.all(keep):
        skipped += int((~keep).sum())
        t, p, o = t[keep], p[keep], o[keep]
        idx = np.flatnonzero(keep)
        hash_ids = None if hash_ids is None else [hash_ids[i] for i in idx]
        tenant = None if tenant is None else tenant[keep]
    if len(t) and np.any(
        np.diff(t) < 0
    ):  # real traces are nearly sorted; a stable sort keeps ties in file order
        order = np.argsort(t, kind="stable")
        t, p, o = t[order], p[order], o[order]
        hash_ids = None if hash_ids is None else [hash_ids[i] for i in order]
        tenant = None if tenant is None else tenant[order]
    if len(t):
        t = t - t[0]
    tr = Trace(
        name=name,
        source=source,
        arrival_s=t,
        prompt_tokens=p,
        output_tokens=o,
        hash_ids=hash_ids,
        tenant=tenant,
        skipped_rows=skipped,
        drawn_arrivals=drawn_arrivals,
    )
    return tr if limit is None else tr.head(limit)


def _find(header_norm: list[str], names: tuple[str, ...]) -> int | None:
    for cand in names:
        key = _norm(cand)
        if key in header_norm:
            return header_norm.index(key)
    return None


def _detect_csv(header_norm: list[str]) -> str | None:
    for fmt in ("burstgpt", "azure", "tokens"):
        if all(_find(header_norm, names) is not None for names in _COLUMNS[fmt].values()):
            return fmt
    return None


def _load_csv(
    path: Path,
    fmt: str | None,
    header_line: str,
    stream_lines: Iterator[str],
    counter: list[int],
    limit: int | None,
    rate: float,
    seed: int,
    arrival: str,
    cv: float,
) -> Trace:
    reader = csv.reader(stream_lines)
    try:
        header = next(reader)
    except csv.Error as e:
        raise TraceFormatError(
            str(path), counter[0], f"bad CSV header ({e})", value=header_line.strip()
        ) from None
    header_norm = [_norm(h) for h in header]
    if fmt is None:
        fmt = _detect_csv(header_norm)
        if fmt is None:
            raise TraceFormatError(
                str(path),
                counter[0],
                "cannot tell the trace format from the header; expected azure (TIMESTAMP,ContextTokens,"
                "GeneratedTokens), burstgpt (Timestamp,Model,Request tokens,Response tokens,...), tokens "
                "(num_prefill_tokens,num_decode_tokens or prompt_tokens,output_tokens) or mooncake JSONL; "
                f"name it (--format, or format= in Python): one of {', '.join(FORMATS)}",
                value=",".join(header),
            )
    cols: dict[str, int] = {}
    for role, names in _COLUMNS[fmt].items():
        i = _find(header_norm, names)
        if i is None:
            raise TraceFormatError(
                str(path),
                counter[0],
                f"missing from the {fmt} header",
                column=names[0],
                value=",".join(header),
            )
        cols[role] = i
    for role, names in _OPTIONAL.get(fmt, {}).items():
        i = _find(header_norm, names)
        if i is not None:
            cols[role] = i
    if fmt == "tokens" and "time" not in cols:
        timeish = [h for h, n in zip(header, header_norm) if n in _UNREAD_TIME]
        if timeish:  # drawing Poisson arrivals over a column of real ones would silently replace them
            raise TraceFormatError(
                str(path),
                counter[0],
                "looks like arrival times, which the tokens format reads only from a column named arrived_at, "
                "arrival_s, arrival_time or timestamp_s (seconds); rename it (or drop it to draw arrivals), or name "
                "the format whose timestamps these are (azure: wall clock, burstgpt: seconds)",
                column=timeish[0].strip(),
                value=",".join(header),
            )
    canon = {role: header[i].strip() for role, i in cols.items()}
    roles = list(cols)
    data: dict[str, list[str]] = {r: [] for r in roles}
    lines: list[int] = []
    width = max(cols.values()) + 1
    ip, io_ = cols["prompt"], cols["output"]
    skipped = 0
    try:
        for row in reader:
            if not row or (len(row) == 1 and not row[0].strip()):
                continue  # blank line
            if len(row) < width:
                raise TraceFormatError(
                    str(path),
                    counter[0],
                    f"expected {len(header)} fields, found {len(row)}",
                    value=",".join(row),
                )
            if row[ip].strip() in _ZERO or row[io_].strip() in _ZERO:
                skipped += 1  # failed request (BurstGPT) or an empty one: nothing to replay
                continue
            for r in roles:
                data[r].append(row[cols[r]])
            lines.append(counter[0])
            if limit is not None and len(lines) >= limit:
                break
    except csv.Error as e:
        raise TraceFormatError(str(path), counter[0], f"bad CSV ({e})") from None
    p = _to_tokens(path, data["prompt"], lines, canon["prompt"])
    o = _to_tokens(path, data["output"], lines, canon["output"])
    source, drawn = f"{path} ({fmt})", ""
    if "time" in cols:
        conv = _to_wallclock if fmt == "azure" else _to_seconds
        t = conv(path, data["time"], lines, canon["time"])
    else:
        # No timestamps (length statistics only): an arrival process supplies them.
        t = arrival_times(len(p), rate, np.random.default_rng(seed), arrival=arrival, cv=cv)
        proc = arrival if arrival == "poisson" else f"{arrival}(cv={cv:g})"
        drawn = f"{proc} at {rate:g} req/s, seed={seed}"
        source += f", arrivals: {drawn}"
    tenant = None
    if "model" in cols:
        models = np.array([s.strip() for s in data["model"]], dtype=object)
        if "log_type" in cols:
            models = np.array([f"{m}/{lt.strip()}" for m, lt in zip(models, data["log_type"])], dtype=object)
        tenant = models
    return _finish(path, _trace_name(path), source, t, p, o, skipped=skipped, tenant=tenant, drawn_arrivals=drawn)


def _json_int(path: Path, line: int, d: dict, key: str, *, required: bool = True) -> float | None:
    if key not in d:
        if required:
            raise TraceFormatError(
                str(path), line, f"missing key (keys: {', '.join(map(str, d))})", column=key
            )
        return None
    v = d[key]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
        raise TraceFormatError(str(path), line, "expected a number >= 0", column=key, value=json.dumps(v))
    return v


def _load_mooncake(
    path: Path, stream_lines: Iterator[str], first: tuple[int, str], limit: int | None
) -> Trace:
    ts: list[float] = []
    ins: list[int] = []
    outs: list[int] = []
    hashes: list[tuple[int, ...]] = []
    any_hash = False
    skipped = 0

    def rows() -> Iterator[tuple[int, str]]:
        yield first
        yield from enumerate(stream_lines, start=first[0] + 1)

    for ln, s in rows():
        if not s.strip():
            continue
        try:
            d = json.loads(s)
        except json.JSONDecodeError as e:
            raise TraceFormatError(
                str(path),
                ln,
                f"invalid JSON: {e.msg}",
                column=e.colno,
                value=s.strip()[max(0, e.colno - 20) : e.colno + 20],
            ) from None
        if not isinstance(d, dict):
            raise TraceFormatError(str(path), ln, "expected one JSON object per line", value=s.strip())
        t = _json_int(path, ln, d, "timestamp")
        i = _json_int(path, ln, d, "input_length")
        o = _json_int(path, ln, d, "output_length")
        if i != int(i) or o != int(o):
            raise TraceFormatError(
                str(path), ln, "token counts must be whole numbers", column="input_length", value=f"{i}/{o}"
            )
        h = d.get("hash_ids")
        if h is not None:
            if not isinstance(h, list) or not all(isinstance(x, int) and not isinstance(x, bool) for x in h):
                raise TraceFormatError(
                    str(path), ln, "expected a list of integers", column="hash_ids", value=json.dumps(h)
                )
            any_hash = True
        if i == 0 or o == 0:
            skipped += 1
            continue
        ts.append(t)
        ins.append(int(i))
        outs.append(int(o))
        hashes.append(tuple(h) if h else ())
        if limit is not None and len(ts) >= limit:
            break
    t_arr = np.array(ts, dtype=np.float64) / 1000.0  # Mooncake timestamps are milliseconds
    return _finish(
        path,
        _trace_name(path),
        f"{path} (mooncake)",
        t_arr,
        np.array(ins, dtype=np.int64),
        np.array(outs, dtype=np.int64),
        skipped=skipped,
        hash_ids=hashes if any_hash else None,
    )


def load_trace(
    path: str | Path,
    format: str | None = None,
    *,
    limit: int | None = None,
    rate: float = 1.0,
    seed: int = 0,
    arrival: str = "poisson",
    cv: float = 1.0,
) -> Trace:
    """Read a trace file.

    Args:
        path: plain or gzipped (detected by magic bytes) file.
        format: one of ``FORMATS``, or ``None`` to detect it from the header / first line.
        limit: keep only the first ``limit`` requests *in file order* (then sorted); stops reading early on large
            files. On a file that is not sorted by arrival these need not be the first ``limit`` arrivals:
            ``load_trace(path).head(n)`` gives those.
        rate, seed, arrival, cv: only for ``tokens`` files without an arrival column: the synthetic arrival
            process that times the requests (default Poisson at 1 req/s; use ``Trace.scale_rate`` or pass
            ``rate`` for another load).

    Raises:
        TraceFormatError: malformed content, naming ``path:line``, the column and the offending value.
        ValueError: an unknown ``format``.
        FileNotFoundError: no such file.
    """
    path = Path(path)
    if format is not None:
        format = format.lower()
        if format not in FORMATS:
            raise ValueError(f"unknown trace format (--format) {format!r}; allowed: {', '.join(FORMATS)}")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0 (got {limit})")
    counter = [0]
    with _open_binary(path) as stream:
        lines = _lines(path, stream, counter)
        first = ""
        for first in lines:
            if first.strip():
                break
        if not first.strip():
            raise TraceFormatError(str(path), counter[0] or 1, "empty file: no header and no requests")
        first = first.removeprefix("\ufeff")  # a UTF-8 BOM (Windows tools write one): json.loads refuses it
        is_json = first.lstrip(" \t").startswith("{")
        if format == "mooncake" or (format is None and is_json):
            if not is_json:
                raise TraceFormatError(
                    str(path),
                    counter[0],
                    "expected a JSON object per line (mooncake format)",
                    value=first.strip(),
                )
            return _load_mooncake(path, lines, (counter[0], first), limit)
        if is_json:
            raise TraceFormatError(
                str(path),
                counter[0],
                f"this is JSON lines, not a {format} CSV; use the format mooncake (--format mooncake) or leave it "
                "unset",
                value=first.strip(),
            )

        def chained() -> Iterator[str]:
            yield first
            yield from lines

        return _load_csv(path, format, first, chained(), counter, limit, rate, seed, arrival, cv)
