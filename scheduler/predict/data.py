"""Prompt/response records: loaders for the training sources, the held-out split, and the JSONL reader used by
``llmsched predict eval``.

Training sources live outside the package (``--data-dir``, the team's shared data folder); nothing here is read at
import time. Splits are by prompt (``group``), so one prompt answered by many models never straddles train/test.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from scheduler.predict.base import count_tokens


@dataclass(frozen=True, slots=True)
class Record:
    """One request with its true response length."""

    prompt: str | None
    prompt_tokens: int
    output_tokens: int
    tenant: str | None = None  # generating model / app, where known
    source: str = "unknown"
    group: str = ""  # split key: records sharing it go to the same side of the split


def _open_text(path: Path) -> io.TextIOBase:
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path), encoding="utf-8-sig")
    return open(path, encoding="utf-8-sig")  # a UTF-8 BOM (Windows editors, PowerShell) is not JSON


def _jsonl(path: Path) -> Iterator[dict]:
    with _open_text(path) as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def _join(instruction: str, extra: str | None) -> str:
    return instruction if not extra else f"{instruction}\n\n{extra}"


def prompt_key(prompt: str | None) -> str:
    """Split key of a prompt: its text, case- and whitespace-normalised. One key for every source, so a prompt
    that two sources share (alpaca_eval holds the 80 vicuna-bench questions and MT-bench's "common elements"
    one) can never be trained on through one source and scored through the other."""
    return " ".join((prompt or "").lower().split())


def _rec(prompt: str, response: str, *, tenant: str | None, source: str) -> Record:
    return Record(prompt, count_tokens(prompt), count_tokens(response), tenant, source, prompt_key(prompt))


def tenant_name(model: str) -> str:
    """Tenant of a model name as training saw it: FastChat-style ``name:version`` tags are dropped
    ("vicuna-13b:20230322-clean-lang" -> "vicuna-13b"). Training and ``read_eval_jsonl`` both use it."""
    return model.split(":")[0]


def load_alpaca_eval(d: Path) -> list[Record]:
    """alpaca_eval: 805 prompts x 36 generators; tenant = generator (length depends on it strongly)."""
    return [
        _rec(
            r["instruction"],
            r["output"],
            tenant=r["generator"],
            source="alpaca_eval",
        )
        for r in _jsonl(d / "alpaca_eval_outputs_text_36models.jsonl.gz")
    ]


def load_gpteacher(d: Path) -> list[Record]:
    """GPTeacher (GPT-4 answers) roleplay / codegen / toolformer; tenant = "gpteacher-gpt4" (an app, not just a model)."""
    out = []
    for r in _jsonl(d / "gpteacher_gpt4_roleplay_codegen_toolformer.jsonl.gz"):
        prompt = _join(r["instruction"], r.get("input"))
        out.append(
            _rec(
                prompt,
                r["response"],
                tenant="gpteacher-gpt4",
                source=f"gpteacher_{r['subset']}",
            )
        )
    return out


def load_vicuna_bench(d: Path) -> list[Record]:
    """FastChat vicuna bench: 80 questions x 7 models; tenant = model name without the ':vN' suffix."""
    return [
        _rec(
            r["question"],
            r["answer"],
            tenant=tenant_name(r["model"]),
            source="vicuna_bench",
        )
        for r in _jsonl(d / "fastchat_vicuna_bench_answers_7models.jsonl.gz")
    ]


def load_lima(d: Path) -> list[Record]:
    """LIMA: human-written answers (no model tenant)."""
    out = []
    for r in _jsonl(d / "lima_1k.jsonl.gz"):
        prompt = _join(r["instruction"], r.get("input"))
        out.append(_rec(prompt, r["output"], tenant=None, source="lima"))
    return out


def load_alpaca_demo(d: Path) -> list[Record]:
    """LLaMA-Factory alpaca_en_demo (Alpaca-GPT4 style answers)."""
    out = []
    for r in _jsonl(d / "llamafactory_alpaca_en_demo_1k.jsonl.gz"):
        prompt = _join(r["instruction"], r.get("input"))
        out.append(_rec(prompt, r["output"], tenant="alpaca-gpt4-demo", source="alpaca_demo"))
    return out


def load_mtbench(d: Path) -> list[Record]:
    """MT-bench GPT-4 reference answers, first turn only (30 rows): never trained on, an out-of-source check."""
    return [
        _rec(
            r["turns"][0],
            r["answer_turns"][0],
            tenant="gpt-4",
            source="mtbench_ood",
        )
        for r in _jsonl(d / "fastchat_mtbench_gpt4_reference_answers.jsonl.gz")
    ]


TEXT_SOURCES = {
    "alpaca_eval": load_alpaca_eval,
    "gpteacher": load_gpteacher,
    "vicuna_bench": load_vicuna_bench,
    "lima": load_lima,
    "alpaca_demo": load_alpaca_demo,
}


def load_text_sources(data_dir: str | Path, names: Iterable[str] | None = None) -> list[Record]:
    """Load the named training sources (default: all of ``TEXT_SOURCES``) from ``data_dir``."""
    d = Path(data_dir)
    out: list[Record] = []
    for name in names or TEXT_SOURCES:
        if name not in TEXT_SOURCES:
            raise ValueError(f"unknown text source {name!r}; allowed: {', '.join(TEXT_SOURCES)}")
        out.extend(TEXT_SOURCES[name](d))
    return out


def is_test(group: str, test_frac: float = 0.2, seed: int = 0) -> bool:
    """Deterministic held-out assignment by split key (crc32, so it is stable across runs and machines)."""
    return (zlib.crc32(f"{seed}:{group}".encode()) % 10_000) < test_frac * 10_000


def split(records: list[Record], test_frac: float = 0.2, seed: int = 0) -> tuple[list[Record], list[Record]]:
    """(train, test) by ``Record.group``."""
    train, test = [], []
    for r in records:
        (test if is_test(r.group, test_frac, seed) else train).append(r)
    return train, test


def text_split(records: list[Record], out_of_source: Iterable[Record] = ()) -> tuple[list[Record], list[Record]]:
    """The text predictors' (train, test): ``split`` by normalised prompt, so no prompt is on both sides through
    two sources, plus the ``out_of_source`` rows (MT-bench: never trained on) whose prompt no training row holds."""
    train, test = split(records)
    seen = {r.group for r in train}
    return train, test + [r for r in out_of_source if r.group not in seen]


# -- traces without text ---------------------------------------------------------------------------------------------


def load_trace_pairs(data_dir: str | Path) -> dict[str, list[tuple[int, int]]]:
    """(input tokens, output tokens) per trace, in arrival order; the trace name is the tenant/app."""
    d = Path(data_dir)
    out: dict[str, list[tuple[int, int]]] = {}
    with _open_text(d / "azure_llm_2023_conv.csv.gz") as f:
        out["azure_conv"] = [(int(r["ContextTokens"]), int(r["GeneratedTokens"])) for r in csv.DictReader(f)]
    for name, fn in [
        ("mooncake_conv", "mooncake_fast25_conversation_trace.jsonl.gz"),
        ("mooncake_synthetic", "mooncake_fast25_synthetic_trace.jsonl.gz"),
    ]:
        out[name] = [(int(r["input_length"]), int(r["output_length"])) for r in _jsonl(d / fn)]
    with _open_text(d / "vidur_arxiv_summarization_stats_llama2_tok.csv.gz") as f:
        out["arxiv_summarization"] = [
            (int(float(r["num_prefill_tokens"])), int(float(r["num_decode_tokens"])))
            for r in csv.DictReader(f)
        ]
    return out


# -- user JSONL (llmsched predict eval) ------------------------------------------------------------------------------

_PROMPT_KEYS = ("prompt", "instruction", "question")
_RESPONSE_KEYS = ("response", "output", "answer")
_TENANT_KEYS = ("tenant", "generator", "model")


def _bad_line(where: str, why: str) -> ValueError:
    # NOTE(predict): ValueError (not TypeError) for every bad line: it is bad input data, reported uniformly.
    return ValueError(f"{where}: {why}")


def _byte_lines(p: Path) -> Iterator[bytes]:
    """``p``'s lines as bytes (``.gz`` decompressed): the caller decodes each, so a non-UTF-8 byte is named by its
    line (a text stream names only its offset in a read buffer)."""
    try:
        with gzip.open(p) if p.suffix == ".gz" else open(p, "rb") as f:
            yield from f
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:  # a truncated .gz was a traceback (EOFError)
        raise ValueError(f"{p}: not a complete gzip file ({e})") from None


def read_eval_jsonl(path: str | Path, *, use_tenant: bool = True, blank: list[str] | None = None) -> list[Record]:
    """Read a JSONL file whose lines have ``prompt`` and ``response`` text (aliases: instruction/question,
    output/answer; optional ``input`` is appended to the prompt; optional tenant/generator/model).

    Raises:
        ValueError: naming the file and 1-based line number of the first bad line (not UTF-8, not JSON, not an
            object, missing/non-string prompt or response).

    A blank response (a failed generation, not a 0-token answer: scored, it would skew every metric) is left out,
    its ``file:line`` appended to ``blank`` when given; only a file of nothing else is an error.
    """
    p = Path(path)
    out: list[Record] = []
    for no, raw in enumerate(_byte_lines(p), 1):
        where = f"{p}:{no}"
        try:
            line = raw.decode("utf-8-sig")  # a UTF-8 BOM (Windows editors, PowerShell) is not JSON
        except UnicodeDecodeError as e:
            why = f"not UTF-8 (byte {raw[e.start]:#04x} at column {e.start + 1})"
            raise _bad_line(where, why) from None
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not valid JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise _bad_line(where, f"expected a JSON object, got {type(obj).__name__}")
        prompt = next((obj[k] for k in _PROMPT_KEYS if k in obj), None)
        rkey = next((k for k in _RESPONSE_KEYS if k in obj), "response")
        response = obj.get(rkey)
        if not isinstance(prompt, str):
            raise _bad_line(where, "field 'prompt' missing or not a string")
        if not isinstance(response, str):
            raise _bad_line(where, "field 'response' missing or not a string")
        if not response.strip():
            if blank is not None:
                blank.append(f"{where} ({rkey!r})")
            continue
        extra = obj.get("input")
        prompt = _join(prompt, extra if isinstance(extra, str) else None)
        tenant = (
            next((tenant_name(obj[k]) for k in _TENANT_KEYS if isinstance(obj.get(k), str)), None)
            if use_tenant
            else None
        )
        out.append(
            Record(
                prompt,
                count_tokens(prompt),
                count_tokens(response),
                tenant,
                str(obj.get("source", p.stem)),
                prompt_key(prompt),
            )
        )
    if not out:
        raise ValueError(f"{p}: no records")
    return out
