"""Regressions from the third audit of live fault handling. Each test failed before its fix.

No Ray: real ``Instance`` objects over the simulated backend behind in-process handles (``tests/test_chaos.py``),
as in ``tests/test_faults2_audit.py``."""

from __future__ import annotations

import pytest

from scheduler.config.models import UNHEALTHY_AFTER_S, ClusterConfig
from tests.test_control_plane import GPUS, MODEL


def test_a_hang_timeout_below_the_unhealthy_bound_is_refused_naming_the_field() -> None:
    """``pools[].hang_timeout_s`` took 5 s, below the 10 s (``UNHEALTHY_AFTER_S``) for which a silent instance's last
    snapshot still stands: a snapshot merely slow on a loaded host then read as hung, and the Controller released a
    busy instance with its streams. Refused at config load, naming the field; the bound itself is accepted."""
    pool = {"name": "mixed", "gpu": "a100", "hang_timeout_s": UNHEALTHY_AFTER_S - 0.5}
    with pytest.raises(ValueError, match=r"pools\.0\.hang_timeout_s\n.*greater than or equal to 10"):
        ClusterConfig.model_validate({"gpus": GPUS, "model": MODEL, "pools": [pool]})
    pool["hang_timeout_s"] = UNHEALTHY_AFTER_S
    cfg = ClusterConfig.model_validate({"gpus": GPUS, "model": MODEL, "pools": [pool]})
    assert cfg.pools[0].hang_timeout_s == UNHEALTHY_AFTER_S
