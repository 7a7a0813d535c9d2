#!/usr/bin/env bash
# Run every kaio benchmark, one after another (they must not share the CPU with each other).
# Each prints a "RESULT ..." line and appends a JSON record to benchmarks/results.jsonl
# (or $KAIO_BENCH_RESULTS). About 25 minutes on a 2-core machine.
#
#   benchmarks/run_all.sh                 # all
#   benchmarks/run_all.sh startup poller  # some, by name
#   PYTHON=/path/to/venv/bin/python benchmarks/run_all.sh
set -uo pipefail
cd "$(dirname "$0")"
PY="${PYTHON:-python}"
ALL=(startup callback throughput poller memory report overhead stream job_report)
NAMES=("$@")
[ ${#NAMES[@]} -eq 0 ] && NAMES=("${ALL[@]}")
export COMET_ERROR_TRACKING_ENABLE=false
failed=()
for name in "${NAMES[@]}"; do
  echo "=== bench_${name} ($(date -u +%H:%M:%S)) ==="
  if ! "$PY" "bench_${name}.py"; then
    failed+=("$name")
  fi
done
if [ ${#failed[@]} -ne 0 ]; then
  echo "failed: ${failed[*]}" >&2
  exit 1
fi
