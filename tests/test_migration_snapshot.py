"""``MigrationSnapshot``: the stop-and-copy ships only the tokens after the staged KV; the destination joins them."""

from __future__ import annotations

import pytest

from scheduler.transfer.migration import MigrationSnapshot


def test_with_prefix_joins_staged_tokens_and_the_shipped_tail() -> None:
    snap = MigrationSnapshot("r", (7, 8, 9), num_output_tokens=4, token_offset=2)
    assert snap.with_prefix([1, 2, 3, 4]) == (1, 2, 7, 8, 9)  # staged beyond the offset is superseded


def test_with_prefix_without_enough_staged_tokens_names_the_field() -> None:
    snap = MigrationSnapshot("r", (7, 8), num_output_tokens=1, token_offset=5)
    with pytest.raises(ValueError, match="token_offset: 5 tokens needed .* 3 staged"):
        snap.with_prefix([1, 2, 3])


def test_full_snapshot_needs_no_prefix() -> None:
    assert MigrationSnapshot("r", (1, 2), num_output_tokens=1).with_prefix([]) == (1, 2)
