"""``llmsched bench NAME``: benchmarks that print ratios against baselines measured in the same run."""

from __future__ import annotations

import importlib
import sys

# name -> module with main(argv) -> int
BENCHES = {
    "sim": "bench.bench_sim",
    "routing": "bench.bench_routing",
    "grpc": "bench.bench_grpc_overhead",
    "overload": "bench.bench_overload",
    "control-plane": "bench.bench_control_plane",
    "migration": "bench.bench_migration",
    "chaos": "bench.bench_chaos",
    "migration-scenario": "bench.bench_migration_scenario",
    "stream-cpu": "bench.bench_stream_cpu",
    "handoff": "bench.bench_handoff",
    "rerole-live": "bench.bench_rerole_live",
    "arrivals": "bench.bench_arrivals",
    "online-tenants": "bench.bench_online_tenants",
    "online-shared": "bench.bench_online_shared",
    "routing-tenants": "bench.bench_routing_tenants",
    "kv-replay": "bench.bench_kv_replay",
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    usage = (
        f"usage: llmsched bench {{{','.join(BENCHES)}}} [args]   (llmsched bench NAME --help: its options)"
    )
    if argv[:1] in (["-h"], ["--help"]):  # asked for: stdout, exit 0
        print(f"{usage}\n\n{__doc__}")
        return 0
    if not argv or argv[0] not in BENCHES:
        print(usage, file=sys.stderr)
        if argv:
            print(f"llmsched bench: error: unknown benchmark {argv[0]!r}", file=sys.stderr)
        return 2
    mod = importlib.import_module(BENCHES[argv[0]])
    res = mod.main(argv[1:])
    return res if isinstance(res, int) else 0  # (some return their results: they print and write them themselves)
