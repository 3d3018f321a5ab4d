#!/usr/bin/env bash
# Figures of the web console in headless Chromium (tests/ui/bench.rs):
# page load with 100 VMs defined (first paint, first contentful paint, the
# table filled; the first load with a cold cache, then the median of the
# warm ones) and the time from a state change to its row updating (a
# start's answer -> running, kill -9 of QEMU -> error). Tiny TCG guests;
# the debug build of the tests' vman. Results: stdout and
# target/ui-artifacts/bench.txt.
#   VMAN_BENCH_VMS=100 VMAN_BENCH_LOADS=10 VMAN_BENCH_ROUNDS=5 bench/ui.sh
set -euo pipefail
cd "$(dirname "$0")/.."
[ -f ui/dist/index.html ] || (cd ui && npm ci --no-audit --no-fund && npm run build)
rm -f target/ui-artifacts/bench.txt
VMAN_ACCEL=tcg cargo test --test ui bench_ui -- --ignored --test-threads=1 2>&1 \
    | grep -E 'test result|panicked' || true
cat target/ui-artifacts/bench.txt
