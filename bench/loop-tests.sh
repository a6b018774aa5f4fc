#!/usr/bin/env bash
# The hunt for tests that depend on time or order: runs test binaries again and again, alone
# or beside a CPU hog (two `yes` processes: CI's machine while it builds), and counts.
#   bench/loop-tests.sh [-n RUNS] [--hog] [TEST ...]
# Default: every binary that starts a daemon, an IGD or backends. Needs root (as
# tests/run.sh). A failed run's output is kept in $LOOP_LOGS (default /tmp/kpf-loop).
# LOOP_ARGS go to every test binary (e.g. `--ignored` for tests/cross.rs).
set -euo pipefail
cd "$(dirname "$0")/.."

runs=20
hog=0
tests=()
while [ $# -gt 0 ]; do
    case "$1" in
        -n) runs=$2; shift 2 ;;
        --hog) hog=1; shift ;;
        *) tests+=("$1"); shift ;;
    esac
done
[ "${#tests[@]}" -gt 0 ] || tests=(upstream dns backends e2e cluster router datapath chaos luci)
logs=${LOOP_LOGS:-/tmp/kpf-loop}
mkdir -p "$logs"

# Built once, as tests/run.sh builds them; each binary is then run on its own.
declare -A binary
args=()
for t in "${tests[@]}"; do args+=(--test "$t"); done
while IFS= read -r line; do
    name=$(grep -o '"target":{[^}]*"name":"[^"]*"' <<<"$line" | grep -o '"name":"[^"]*"' | cut -d'"' -f4)
    exe=$(grep -o '"executable":"[^"]*"' <<<"$line" | cut -d'"' -f4)
    [ -n "$exe" ] && binary[$name]=$exe
done < <(cargo test --release --no-run --message-format=json "${args[@]}" 2>/dev/null | grep '"executable":"/')

hogs=()
stop_hogs() { [ "${#hogs[@]}" -eq 0 ] || kill "${hogs[@]}" 2>/dev/null || true; }
trap stop_hogs EXIT
if [ "$hog" -eq 1 ]; then
    for _ in 1 2; do yes >/dev/null & hogs+=($!); done
fi

echo "loop: ${runs} runs of ${tests[*]}$([ "$hog" -eq 1 ] && echo ' beside two yes hogs')"
for t in "${tests[@]}"; do
    passed=0
    failed=0
    started=$SECONDS
    for i in $(seq 1 "$runs"); do
        # shellcheck disable=SC2086 # LOOP_ARGS are meant to split into words
        if "${binary[$t]}" ${LOOP_ARGS:-} >"$logs/$t-$i.log" 2>&1; then
            passed=$((passed + 1))
            rm -f "$logs/$t-$i.log"
        else
            failed=$((failed + 1))
            echo "  $t run $i failed: $logs/$t-$i.log ($(grep -m1 -o 'panicked at [^ ]*' "$logs/$t-$i.log" || true))"
        fi
    done
    echo "$t: $runs runs, $passed passed, $failed failed, $((SECONDS - started)) s"
done
