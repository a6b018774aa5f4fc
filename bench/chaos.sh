#!/usr/bin/env bash
# The chaos test of tests/chaos.rs for longer (CI runs 150 operations): OPS operations per
# run, RUNS runs with fresh seeds (each printed; CHAOS_SEED=N replays one). Exits 1 if any
# run broke the invariant. Needs root.
set -uo pipefail
cd "$(dirname "$0")/.."
ops="${OPS:-2000}"
runs="${RUNS:-5}"
failed=0
for _ in $(seq "$runs"); do
    start=$(date +%s)
    if output=$(CHAOS_OPS="$ops" cargo test --release --test chaos -- --nocapture 2>&1); then
        verdict=ok
    else
        verdict=FAILED
        failed=1
    fi
    echo "$output" | grep -m1 'CHAOS_SEED'
    echo "  $verdict in $(( $(date +%s) - start )) s"
    [ "$verdict" = ok ] || echo "$output" | grep -A32 'panicked'
done
exit "$failed"
