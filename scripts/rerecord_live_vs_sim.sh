#!/usr/bin/env bash
# Re-record every docs/results/live_vs_sim*.json with the current fit + simulator, each over the runs it already
# holds (after a change to either: test_recorded_live_vs_sim_errors_match_the_current_simulator checks them).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
for f in docs/results/live_vs_sim*.json; do
  mapfile -t runs < <($PY -c 'import json, sys; print("\n".join(sorted(json.load(open(sys.argv[1]))["runs"])))' "$f")
  $PY -m scheduler.cli run --resimulate "${runs[@]}" --json "$f" > /dev/null
  echo "$f: ${#runs[@]} runs"
done
