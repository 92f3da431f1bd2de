"""A replica's online length backlog after a Controller outage: its event-loop time to hand it over.

A replica's ``SharedLengths`` journal filled to ``--backlog`` samples (the Controller away: at most ``MAX_JOURNAL``),
then exchanged with a ``LengthLog`` until it is empty (``MAX_REPORT`` a report): prints the exchanges, the time
``apply`` took on the replica in all and the longest one (its event loop is held that long; the Controller's merge
is not counted). Samples: ``--tenants`` names, prompt 10-4000 and output 1-2000 tokens, uniform.

    python bench/bench_online_backlog.py [--backlog 32768] [--tenants 80] [--seed 0]
"""

from __future__ import annotations

import argparse
import random
import time

from scheduler.predict.online import TenantLengths
from scheduler.predict.shared import MAX_JOURNAL, LengthLog, SharedLengths


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backlog", type=int, default=MAX_JOURNAL)
    ap.add_argument("--tenants", type=int, default=80)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    rng = random.Random(args.seed)
    shared, log = SharedLengths(TenantLengths()), LengthLog("e1")
    shared.apply(log.share("a", shared.report()))
    for _ in range(args.backlog):
        shared.view.observe(rng.randint(10, 4000), rng.randint(1, 2000), tenant=f"t{rng.randrange(args.tenants)}")
    exchanges, total, worst = 0, 0.0, 0.0
    while shared.view.journal:  # (``apply`` swaps a rebuilt view in)
        reply = log.share("a", shared.report())
        t0 = time.perf_counter()
        shared.apply(reply)
        dt = time.perf_counter() - t0
        exchanges, total, worst = exchanges + 1, total + dt, max(worst, dt)
    out = {"exchanges": exchanges, "apply_total_s": round(total, 3), "apply_worst_s": round(worst, 3)}
    print(out)
    return out


if __name__ == "__main__":
    main()
