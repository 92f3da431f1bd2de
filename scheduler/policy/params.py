"""Checks of the parameters a policy takes from a config or a ``NAME:key=value`` flag, where a YAML value in quotes
or a flag's value that is not JSON arrives as a string."""

from __future__ import annotations

import numbers


def check_numbers(**values: object) -> None:
    """Raise ``ValueError`` naming the first of ``values`` that is not a number (a string, a bool, ``None``): the
    policies compare them only once a trigger holds, which failed mid-run as a bare ``TypeError`` or never."""
    for key, v in values.items():
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            raise ValueError(f"{key}: must be a number, got {v!r}")  # noqa: TRY004 (bad config input)
