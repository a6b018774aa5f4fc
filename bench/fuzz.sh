#!/usr/bin/env bash
# A million cases of each hostile-input property in tests/fuzz.rs (CI runs proptest's 256).
set -euo pipefail
cd "$(dirname "$0")/.."
time PROPTEST_CASES="${CASES:-1000000}" cargo test --release --test fuzz -- --test-threads 2
