#!/usr/bin/env bash
# Sets up everything and runs all tests: unit tests, the API tests against
# the real binary, the boot disk builder, and end-to-end tests that boot
# real QEMU guests under TCG from a disk the run builds itself.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
export VMAN_ACCEL=tcg
# The debian boot disk (debootstrap, ~2 min to build, ~30 s to boot under
# TCG) is built and booted too; VMAN_TEST_DEBIAN=0 skips it.
export VMAN_TEST_DEBIAN="${VMAN_TEST_DEBIAN:-1}"
cargo build --all-targets
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
cargo test --no-fail-fast -- --test-threads="${VMAN_TEST_THREADS:-4}" 2>&1 | tee "$log" || status=$?
# One closing line over every test binary (cargo prints one per binary,
# the last of which is the doc tests').
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($i ~ /^passed;?$/) p += $(i-1); if ($i ~ /^failed;?$/) f += $(i-1) } }
     END { printf "all: %d passed, %d failed\n", p, f }' "$log"
# The figures of the fault-injection suite (tests/e2e/faults.rs).
cat target/tmp/fault-injection.txt 2>/dev/null || true
exit "$status"
