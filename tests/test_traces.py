"""Trace loaders, transforms and the synthetic generator (sim.traces).

Real-file tests read ../shared/data beside the repository when it exists (CI has it) and skip otherwise; the
vendored samples in sim/data are always tested.
"""

from __future__ import annotations

import gzip
import json
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sim.traces import (
    FORMATS,
    Empirical,
    Fixed,
    LogNormal,
    Trace,
    TraceFormatError,
    bundled_traces,
    default_trace,
    load_bundled,
    load_trace,
    synthetic,
)

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def shared(name: str) -> Path:
    p = SHARED / name
    if not p.exists():
        pytest.skip(f"{p} not present (real data lives in ../shared/data beside the repo)")
    return p


def write(tmp_path: Path, name: str, text: str, *, gz: bool = False) -> Path:
    p = tmp_path / name
    data = text.encode()
    p.write_bytes(gzip.compress(data) if gz else data)
    return p


# --------------------------------------------------------------------------------------------- real files


@pytest.mark.parametrize(
    "fname, fmt, n, p50_in, p50_out, duration",
    [
        ("azure_llm_2023_conv.csv.gz", "azure", 19_366, 1020, 129, 3501.7),
        ("mooncake_fast25_conversation_trace.jsonl.gz", "mooncake", 12_031, 6909, 350, 3537.0),
        ("mooncake_fast25_synthetic_trace.jsonl.gz", "mooncake", 3_993, 11587, 69, 1022.0),
        ("vidur_arxiv_summarization_stats_llama2_tok.csv.gz", "tokens", 28_257, 2730, 167, None),
    ],
)
def test_real_files(fname: str, fmt: str, n: int, p50_in: int, p50_out: int, duration: float | None) -> None:
    tr = load_trace(shared(fname))
    assert tr.source.endswith(f"({fmt})") or f"({fmt})," in tr.source
    assert len(tr) == n
    assert tr.arrival_s[0] == 0.0 and np.all(np.diff(tr.arrival_s) >= 0)
    s = tr.summary()
    # medians published in shared/data/README.md
    assert s["prompt_p50"] == p50_in and s["output_p50"] == p50_out
    if duration is not None:
        assert tr.duration_s == pytest.approx(duration, abs=0.1)
    if fmt == "mooncake":
        assert tr.hash_ids is not None and len(tr.hash_ids) == n
        # one hash id per 512-token block: the prompt fills every block but the last (maybe partial) one
        lens = np.array([len(h) for h in tr.hash_ids])
        assert np.all((lens - 1) * 512 < tr.prompt_tokens) and np.all(tr.prompt_tokens <= lens * 512)
    # the explicit format reads the same thing
    again = load_trace(SHARED / fname, fmt, limit=100)
    assert np.array_equal(again.prompt_tokens, tr.prompt_tokens[:100])


def test_tokens_file_gets_poisson_arrivals_at_rate() -> None:
    tr = load_trace(shared("vidur_arxiv_summarization_stats_llama2_tok.csv.gz"), rate=25.0, seed=3)
    assert tr.mean_rate == pytest.approx(25.0, rel=0.03)
    assert "poisson at 25 req/s" in tr.source
    same = load_trace(SHARED / "vidur_arxiv_summarization_stats_llama2_tok.csv.gz", rate=25.0, seed=3)
    assert np.array_equal(same.arrival_s, tr.arrival_s)


def test_vendored_azure_is_the_head_of_the_real_trace() -> None:
    small = default_trace()
    full = load_trace(shared("azure_llm_2023_conv.csv.gz"))
    n = len(small)
    assert np.array_equal(small.arrival_s, full.arrival_s[:n])
    assert np.array_equal(small.prompt_tokens, full.prompt_tokens[:n])
    assert full.arrival_s[n] >= 600.0 > small.arrival_s[-1]


# ------------------------------------------------------------------------------------------ vendored files


def test_default_trace_bundled() -> None:
    tr = default_trace()
    assert tr.name == "azure_llm_2023_conv"
    assert len(tr) == 2867 and 599 < tr.duration_s < 600
    assert tr.prompt_tokens.dtype == np.int64 and tr.arrival_s.dtype == np.float64
    assert set(bundled_traces()) == {"azure_llm_2023_conv", "mooncake_conversation"}
    for p in bundled_traces().values():
        assert p.exists() and p.read_bytes()[:2] == b"\x1f\x8b"  # gzipped originals


def test_bundled_mooncake() -> None:
    tr = load_bundled("mooncake_conversation")
    assert len(tr) == 1000 and tr.hash_ids is not None
    assert tr.hash_ids[0][:3] == (0, 1, 2) and tr.duration_s == pytest.approx(330.0)
    with pytest.raises(ValueError, match="allowed: azure_llm_2023_conv"):
        load_bundled("nope")


def test_gzip_detected_by_magic_not_suffix(tmp_path: Path) -> None:
    src = bundled_traces()["azure_llm_2023_conv"]
    disguised = tmp_path / "trace.csv"
    disguised.write_bytes(src.read_bytes())
    plain = tmp_path / "plain.csv.gz"  # not gzipped despite the name
    plain.write_bytes(gzip.decompress(src.read_bytes()))
    a, b = load_trace(disguised), load_trace(plain)
    assert len(a) == len(b) == 2867 and np.array_equal(a.output_tokens, b.output_tokens)


# ---------------------------------------------------------------------------------------- hand-written files

BURST = """Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type
5,ChatGPT,472,18,490,Conversation log
45,ChatGPT,1087,0,1087,Conversation log
118,GPT-4,417,276,693,API log
118,ChatGPT,1360,0,1360,Conversation log
120,GPT-4,33,12,45,Conversation log
"""


def test_burstgpt_csv(tmp_path: Path) -> None:
    tr = load_trace(write(tmp_path, "burst.csv", BURST))
    assert "(burstgpt)" in tr.source
    assert len(tr) == 3 and tr.skipped_rows == 2  # failures (Response tokens == 0) dropped, counted
    assert tr.arrival_s.tolist() == [0.0, 113.0, 115.0]
    assert tr.prompt_tokens.tolist() == [472, 417, 33] and tr.output_tokens.tolist() == [18, 276, 12]
    assert tr.tenant is not None and tr.tenant.tolist()[1] == "GPT-4/API log"
    s = tr.summary()
    assert s["skipped_rows"] == 2 and s["tenants"] == 3
    assert len(load_trace(tmp_path / "burst.csv", "burstgpt", limit=2)) == 2


def test_unsorted_rows_are_sorted_stably(tmp_path: Path) -> None:
    text = "Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n"
    text += "10,A,1,1,2,x\n3,B,2,2,4,x\n10,C,3,3,6,x\n"
    tr = load_trace(write(tmp_path, "b.csv", text))
    assert tr.prompt_tokens.tolist() == [2, 1, 3] and tr.arrival_s.tolist() == [0.0, 7.0, 7.0]


def test_azure_2024_names_and_timezones(tmp_path: Path) -> None:
    text = "timestamp,context_tokens,generated_tokens\n"
    text += "2024-05-10 00:00:00.0087020+00:00,100,10\n2024-05-10 02:00:01.5+02:00,200,20\n"
    tr = load_trace(write(tmp_path, "az24.csv", text))
    assert "(azure)" in tr.source
    assert tr.arrival_s.tolist() == pytest.approx([0.0, 1.5 - 0.008702])


def test_token_pairs_with_arrival_column(tmp_path: Path) -> None:
    text = "arrived_at,num_prefill_tokens,num_decode_tokens\n0.5,10,2\n1.25,20.0,4\n"
    tr = load_trace(write(tmp_path, "vidur.csv", text))
    assert tr.arrival_s.tolist() == [0.0, 0.75] and tr.prompt_tokens.tolist() == [10, 20]


def test_a_lengths_only_file_says_its_arrivals_were_drawn(tmp_path: Path, capsys) -> None:
    import argparse

    from scheduler.config.load import load_config
    from sim.commands import load_workload

    lengths = write(tmp_path, "lengths.csv", "num_prefill_tokens,num_decode_tokens\n10,2\n20,4\n30,6\n")
    tr = load_trace(lengths, rate=4.0, seed=1)
    assert tr.drawn_arrivals == "poisson at 4 req/s, seed=1"
    for t in (tr.head(2), tr.window(0.0, 1e9), tr.scale_rate(2.0)):  # what the CLI does to a trace keeps it
        assert t.drawn_arrivals == tr.drawn_arrivals
    timed = write(tmp_path, "timed.csv", "arrived_at,num_prefill_tokens,num_decode_tokens\n0.5,10,2\n1.25,20,4\n")
    assert load_trace(timed).drawn_arrivals == ""
    assert synthetic(5, 2.0, seed=0).drawn_arrivals == "poisson at 2 req/s, seed=0"
    args = argparse.Namespace(synthetic=None, trace=str(lengths), format=None, rate=4.0, seed=1, window=None,
                              limit=None, rate_scale=1.0)
    load_workload(args, load_config("default"))
    assert "arrivals are synthetic (poisson at 4 req/s, seed=1; --rate and --cv set them)" in capsys.readouterr().err
    load_workload(argparse.Namespace(**{**vars(args), "cv": 3.0, "rate": 4.0}), load_config("default"))
    assert "gamma(cv=3) at 4 req/s" in capsys.readouterr().err  # --cv reaches the drawn arrivals
    load_workload(argparse.Namespace(**{**vars(args), "trace": str(timed), "rate": None}), load_config("default"))
    assert "synthetic" not in capsys.readouterr().err
    with pytest.raises(ValueError, match="--rate: .*own timestamps"):  # not silently ignored
        load_workload(argparse.Namespace(**{**vars(args), "trace": str(timed)}), load_config("default"))
    with pytest.raises(ValueError, match="--cv: .*own timestamps"):
        load_workload(argparse.Namespace(**{**vars(args), "trace": None, "rate": None, "cv": 2.0}),
                      load_config("default"))


def test_mooncake_without_hash_ids_and_blank_lines(tmp_path: Path) -> None:
    text = (
        '{"timestamp": 0, "input_length": 5, "output_length": 1}\n\n'
        '{"timestamp": 1500, "input_length": 6, "output_length": 2}\n'
    )
    tr = load_trace(write(tmp_path, "m.jsonl", text, gz=True))
    assert tr.hash_ids is None and tr.arrival_s.tolist() == [0.0, 1.5]


# ------------------------------------------------------------------------------------------------ bad files


def err(path: Path, **kw) -> TraceFormatError:
    with pytest.raises(TraceFormatError) as ei:
        load_trace(path, **kw)
    return ei.value


def test_non_number_names_path_line_column(tmp_path: Path) -> None:
    p = write(
        tmp_path,
        "az.csv",
        "TIMESTAMP,ContextTokens,GeneratedTokens\n"
        "2023-11-16 18:15:46.6805900,374,44\n2023-11-16 18:15:50.9951690,lots,109\n",
    )
    e = err(p)
    assert str(e) == f"{p}:3: column 'ContextTokens': not a number (got 'lots')"
    assert (e.line, e.column, e.value) == (3, "ContextTokens", "lots")


def test_bad_timestamp_and_negative_and_fractional(tmp_path: Path) -> None:
    head = "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.6805900,374,44\n"
    assert "column 'TIMESTAMP'" in str(err(write(tmp_path, "a.csv", head + "yesterday,1,2\n")))
    assert ":3: column 'GeneratedTokens': negative" in str(
        err(write(tmp_path, "b.csv", head + "2023-11-16 18:15:47,1,-2\n"))
    )
    assert "whole number" in str(err(write(tmp_path, "c.csv", head + "2023-11-16 18:15:47,1.5,2\n")))


def test_missing_column(tmp_path: Path) -> None:
    p = write(tmp_path, "az.csv", "TIMESTAMP,ContextTokens,Tokens\n2023-11-16 18:15:46,1,2\n")
    e = err(p, format="azure")
    assert str(e).startswith(f"{p}:1: column 'GeneratedTokens': missing")
    e = err(p)  # undetectable header: lists what is expected
    assert f"{p}:1:" in str(e) and "burstgpt" in str(e) and "TIMESTAMP,ContextTokens,Tokens" in str(e)


def test_short_row(tmp_path: Path) -> None:
    p = write(tmp_path, "b.csv", BURST.replace("118,GPT-4,417,276,693,API log", "118,GPT-4"))
    assert str(err(p)).startswith(f"{p}:4: expected 6 fields, found 2")


def test_truncated_gzip(tmp_path: Path) -> None:
    src = bundled_traces()["azure_llm_2023_conv"].read_bytes()
    p = tmp_path / "cut.csv.gz"
    p.write_bytes(src[: len(src) // 2])
    e = err(p)
    assert str(e).startswith(f"{p}:") and "truncated or corrupt gzip" in str(e)
    assert e.line is not None and e.line > 100  # the line where the stream ended, not line 1


def test_empty_files(tmp_path: Path) -> None:
    for p in (
        write(tmp_path, "e.csv", ""),
        write(tmp_path, "w.csv", "\n  \n"),
        write(tmp_path, "e.gz", "", gz=True),
    ):
        assert str(err(p)).startswith(f"{p}:") and "empty file" in str(err(p))


def test_header_only_is_an_empty_trace(tmp_path: Path) -> None:
    tr = load_trace(write(tmp_path, "h.csv", "TIMESTAMP,ContextTokens,GeneratedTokens\n"))
    assert len(tr) == 0 and tr.mean_rate == 0.0 and tr.summary()["n"] == 0


def test_json_syntax_error(tmp_path: Path) -> None:
    good = json.dumps({"timestamp": 0, "input_length": 5, "output_length": 1, "hash_ids": [0]})
    p = write(tmp_path, "m.jsonl", good + "\n" + '{"timestamp": 5, "input_length" 7}\n')
    e = err(p)
    assert str(e).startswith(f"{p}:2:33: invalid JSON: Expecting ':' delimiter")
    assert (e.line, e.column) == (2, 33)


def test_mooncake_bad_values(tmp_path: Path) -> None:
    p = write(tmp_path, "m.jsonl", '{"timestamp": 0, "output_length": 1}\n')
    assert str(err(p)).startswith(f"{p}:1: column 'input_length': missing key")
    p = write(tmp_path, "n.jsonl", '{"timestamp": "soon", "input_length": 1, "output_length": 1}\n')
    assert str(err(p)) == f"{p}:1: column 'timestamp': expected a number >= 0 (got '\"soon\"')"
    p = write(
        tmp_path, "h.jsonl", '{"timestamp": 0, "input_length": 1, "output_length": 1, "hash_ids": [1, "x"]}\n'
    )
    assert "column 'hash_ids'" in str(err(p))
    assert "JSON lines, not a azure CSV" in str(err(p, format="azure"))


def test_format_argument(tmp_path: Path) -> None:
    p = write(tmp_path, "b.csv", BURST)
    with pytest.raises(ValueError, match="allowed: azure, mooncake, burstgpt, tokens"):
        load_trace(p, "parquet")
    assert FORMATS == ("azure", "mooncake", "burstgpt", "tokens")
    assert "expected a JSON object" in str(err(p, format="mooncake"))
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        load_trace(tmp_path / "nope.csv")


# ------------------------------------------------------------------------------------- Trace invariants


def make(arr, p=None, o=None) -> Trace:
    n = len(arr)
    return Trace(
        "t",
        "test",
        np.asarray(arr, float),
        np.ones(n, int) if p is None else p,
        np.ones(n, int) if o is None else o,
    )


def test_trace_validation() -> None:
    with pytest.raises(ValueError, match="first arrival must be at 0.0"):
        make([1.0, 2.0])
    with pytest.raises(ValueError, match="non-decreasing"):
        make([0.0, 2.0, 1.0])
    with pytest.raises(ValueError, match="prompt_tokens must be >= 1"):
        make([0.0], p=np.array([0]))
    with pytest.raises(ValueError, match="equal length"):
        make([0.0, 1.0], p=np.array([1]))
    with pytest.raises(ValueError, match="hash_ids has 1 entries"):
        Trace("t", "s", np.zeros(2), np.ones(2), np.ones(2), hash_ids=[()])
    with pytest.raises(ValueError, match="factor must be"):
        make([0.0]).scale_rate(0)
    with pytest.raises(ValueError, match="start_s <= end_s"):
        make([0.0]).window(5, 1)


sorted_arrivals = st.lists(st.floats(0, 1e6, allow_nan=False), min_size=1, max_size=60).map(
    lambda xs: np.sort(np.array(xs)) - min(xs)
)


@settings(max_examples=60, deadline=None)
@given(arr=sorted_arrivals, factor=st.floats(0.01, 100))
def test_scale_rate_properties(arr: np.ndarray, factor: float) -> None:
    tr = make(arr, p=np.arange(1, len(arr) + 1))
    sc = tr.scale_rate(factor)
    assert len(sc) == len(tr) and sc.arrival_s[0] == 0.0
    assert np.all(np.diff(sc.arrival_s) >= 0)
    assert np.allclose(sc.arrival_s * factor, tr.arrival_s, rtol=1e-9, atol=1e-6)
    assert np.array_equal(sc.prompt_tokens, tr.prompt_tokens)
    if tr.duration_s > 0:
        assert sc.mean_rate == pytest.approx(tr.mean_rate * factor, rel=1e-9)


@settings(max_examples=60, deadline=None)
@given(arr=sorted_arrivals, a=st.floats(-10, 1.1e6), b=st.floats(-10, 1.1e6))
def test_window_properties(arr: np.ndarray, a: float, b: float) -> None:
    start, end = min(a, b), max(a, b)
    tr = make(arr, p=np.arange(1, len(arr) + 1))
    w = tr.window(start, end)
    inside = (arr >= start) & (arr < end)
    assert len(w) == int(inside.sum())
    # the kept requests are exactly those in [start, end), shifted so the first is at 0
    assert np.array_equal(w.prompt_tokens, tr.prompt_tokens[inside])
    if len(w):
        assert w.arrival_s[0] == 0.0 and np.all(np.diff(w.arrival_s) >= 0)
        assert np.allclose(w.arrival_s + arr[inside][0], arr[inside])
        assert w.duration_s <= end - start


@settings(max_examples=30, deadline=None)
@given(arr=sorted_arrivals, n=st.integers(0, 80))
def test_head_properties(arr: np.ndarray, n: int) -> None:
    tr = make(arr)
    h = tr.head(n)
    assert len(h) == min(n, len(tr)) and np.array_equal(h.arrival_s, arr[: len(h)])


def test_window_and_head_keep_hash_ids_and_tenant() -> None:
    tr = load_bundled("mooncake_conversation")
    w = tr.window(100, 200)
    i0 = int(np.searchsorted(tr.arrival_s, 100))
    assert w.hash_ids is not None and w.hash_ids[0] == tr.hash_ids[i0] and len(w.hash_ids) == len(w)
    assert len(tr.head(10).hash_ids) == 10
    assert "[window 100s..200s]" in w.source and "(rate x2)" in tr.scale_rate(2).source


# ------------------------------------------------------------------------------------------------ synthetic


@pytest.mark.parametrize(
    "arrival, cv",
    [
        ("poisson", 1.0),
        ("gamma", 0.5),
        ("gamma", 2.0),
        ("gamma", 4.0),
        ("weibull", 2.0),
        ("weibull", 0.7),
        ("constant", 0.0),
    ],
)
def test_synthetic_rate_and_cv(arrival: str, cv: float) -> None:
    tr = synthetic(200_000, 40.0, arrival=arrival, cv=cv, seed=7)
    gaps = np.diff(tr.arrival_s)
    assert tr.mean_rate == pytest.approx(40.0, rel=0.03)
    measured_cv = gaps.std() / gaps.mean()
    assert measured_cv == pytest.approx(cv, rel=0.10, abs=1e-9)


def test_synthetic_lengths() -> None:
    tr = synthetic(100_000, 5.0, prompt=LogNormal(1000, 0.8, max=4000), output=Fixed(7), seed=1)
    assert np.median(tr.prompt_tokens) == pytest.approx(1000, rel=0.03)
    assert tr.prompt_tokens.max() <= 4000 and tr.prompt_tokens.min() >= 1 and set(tr.output_tokens) == {7}
    src = default_trace()
    emp = synthetic(1000, 5.0, prompt=Empirical(src.prompt_tokens), output=src.output_tokens, seed=2)
    assert set(emp.prompt_tokens) <= set(src.prompt_tokens) and set(emp.output_tokens) <= set(
        src.output_tokens
    )
    joint = synthetic(2000, 5.0, pairs=src, seed=3)
    pairs = set(zip(src.prompt_tokens.tolist(), src.output_tokens.tolist()))
    assert set(zip(joint.prompt_tokens.tolist(), joint.output_tokens.tolist())) <= pairs
    assert "pairs from azure_llm_2023_conv" in joint.source


def test_synthetic_deterministic_and_bad_args() -> None:
    a, b = synthetic(500, 3.0, seed=5), synthetic(500, 3.0, seed=5)
    assert np.array_equal(a.arrival_s, b.arrival_s) and np.array_equal(a.prompt_tokens, b.prompt_tokens)
    assert not np.array_equal(a.arrival_s, synthetic(500, 3.0, seed=6).arrival_s)
    assert len(synthetic(0, 1.0)) == 0 and synthetic(1, 1.0).arrival_s.tolist() == [0.0]
    with pytest.raises(ValueError, match="allowed: poisson, gamma, weibull, constant"):
        synthetic(10, 1.0, arrival="hawkes")
    with pytest.raises(ValueError, match="rate must be"):
        synthetic(10, 0.0)
    with pytest.raises(ValueError, match="cv must be"):
        synthetic(10, 1.0, arrival="gamma", cv=-1)
    with pytest.raises(ValueError, match="LogNormal"):
        LogNormal(0, 1)


def test_synthetic_one_million_timing() -> None:
    t0 = time.perf_counter()
    tr = synthetic(1_000_000, 100.0, arrival="gamma", cv=2.0, seed=0)
    dt = time.perf_counter() - t0
    print(f"\nsynthetic(1_000_000, gamma cv=2): {dt * 1000:.0f} ms")
    assert len(tr) == 1_000_000  # speed itself is a bench/ target, not asserted here


def test_summary_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from sim.traces.__main__ import main

    assert main(["--markdown"]) == 0
    out = capsys.readouterr().out
    assert "| bundled: azure_llm_2023_conv | azure | 2,867 |" in out
    assert "| bundled: mooncake_conversation | mooncake | 1,000 |" in out
    bad = write(tmp_path, "bad.csv", "a,b\n1,2\n")
    assert main([str(bad)]) == 2
    assert f"error: {bad}:1: cannot tell the trace format" in capsys.readouterr().err


def test_not_utf8_names_the_line(tmp_path: Path) -> None:
    p = tmp_path / "bin.csv"
    p.write_bytes(b"TIMESTAMP,ContextTokens,GeneratedTokens\r\n2023-11-16 18:15:46,1,2\r\n\xff\xfe,1,2\r\n")
    assert str(err(p)).startswith(f"{p}:3: not UTF-8 text")


def test_goodput_refuses_a_zero_span_workload(capsys) -> None:
    """Ten Mooncake requests share timestamp 0: the trace's rate is unmeasurable, goodput must not read ~6e11 req/s."""
    from scheduler.config.load import load_config
    from sim.commands import simulate_main
    from sim.goodput import goodput
    from sim.simulator import Workload

    tr = load_bundled("mooncake_conversation").head(10)
    assert tr.duration_s == 0.0
    with pytest.raises(ValueError, match="span no time"):
        goodput(load_config("default"), Workload.from_trace(tr), lambda: None)
    rc = simulate_main(["--trace", str(bundled_traces()["mooncake_conversation"]), "--limit", "10", "--goodput",
                        "--quiet", "--config", "llama3-8b-a100-16-longctx"])
    assert rc == 2 and "span no time" in capsys.readouterr().err
def test_spread_ties_undoes_a_coarse_clock() -> None:
    """The bundled Mooncake slice logs ~10 requests per 3 s tick: 89% zero gaps, CV 2.84 from the clock alone."""
    tr = load_bundled("mooncake_conversation")
    gaps = np.diff(tr.arrival_s)
    assert np.mean(gaps == 0) > 0.8 and gaps.std() / gaps.mean() > 2.5
    s = tr.spread_ties(seed=1)
    g = np.diff(s.arrival_s)
    assert s.arrival_s[0] == 0.0 and np.all(g >= 0) and np.mean(g == 0) == 0.0
    assert 0.85 < g.std() / g.mean() < 1.2  # per-tick counts are Poisson: spread, the process is too
    assert s.hash_ids == tr.hash_ids and np.array_equal(s.prompt_tokens, tr.prompt_tokens)  # nothing reordered
    assert np.all(np.abs(s.arrival_s - tr.arrival_s) < 3.0 + 1e-9)  # each request stays within its tick
    assert default_trace().spread_ties() is not None and len(default_trace().spread_ties()) == 2867
def test_tokens_file_with_an_unread_time_column_is_refused(tmp_path: Path) -> None:
    """A 'timestamp' column the tokens format does not read must not be silently replaced by Poisson arrivals."""
    p = write(tmp_path, "ts.csv", "timestamp,input_length,output_length\n1000,10,5\n2000,20,5\n")
    with pytest.raises(TraceFormatError, match="column 'timestamp': looks like arrival times"):
        load_trace(p)
    az = write(tmp_path, "az.csv", "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.68,374,44\n")
    with pytest.raises(TraceFormatError, match="column 'TIMESTAMP'"):
        load_trace(az, "tokens")  # the Azure trace forced to tokens kept its lengths and lost its clock
    assert load_trace(az).drawn_arrivals == ""
def test_cli_limit_takes_the_first_arrivals_of_an_unsorted_file(tmp_path: Path, capsys) -> None:
    from sim.traces.__main__ import main

    p = write(tmp_path, "u.csv", "arrived_at,num_prefill_tokens,num_decode_tokens\n5,10,5\n1,20,5\n3,30,5\n0.5,40,5\n")
    assert main([str(p), "--limit", "2"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["n"] == 2 and s["duration_s"] == 0.5  # arrivals 0.5 and 1 (file order would give 5 and 1: 4.0 s)
def test_mooncake_jsonl_with_a_utf8_bom(tmp_path: Path) -> None:
    p = tmp_path / "bom.jsonl"
    p.write_bytes(b'\xef\xbb\xbf{"timestamp": 0, "input_length": 10, "output_length": 5}\n'
                  b'{"timestamp": 1000, "input_length": 20, "output_length": 5}\n')
    tr = load_trace(p)
    assert tr.arrival_s.tolist() == [0.0, 1.0] and tr.prompt_tokens.tolist() == [10, 20]
