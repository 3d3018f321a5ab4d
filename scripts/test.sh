#!/usr/bin/env bash
# Sets up everything and runs all tests: unit tests, the API tests against
# the real binary, the boot disk builder, end-to-end tests that boot real
# QEMU guests under TCG from a disk the run builds itself, the web console
# in headless Chromium (tests/ui, screenshots in target/ui-artifacts/), then
# the OpenAPI fuzz suite (scripts/fuzz.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
# The web console, built before cargo so build.rs embeds ui/dist.
(cd ui && npm ci --no-audit --no-fund && npm run build)
export VMAN_ACCEL=tcg
# The debian boot disk (debootstrap, ~2 min to build, ~30 s to boot under
# TCG) is built and booted too; VMAN_TEST_DEBIAN=0 skips it.
export VMAN_TEST_DEBIAN="${VMAN_TEST_DEBIAN:-1}"
# Style and lints first: a red here is cheaper than after the guests.
cargo fmt --check
cargo clippy --all-targets -- -D warnings
cargo build --all-targets
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
cargo test --no-fail-fast -- --test-threads="${VMAN_TEST_THREADS:-4}" 2>&1 | tee "$log" || status=$?
# The OpenAPI fuzz suite (release build, a few minutes) counts as one test;
# after the cargo tests so it does not slow the guests' boots. VMAN_FUZZ=0 skips it.
fuzz_p=0 fuzz_f=0
if [ "${VMAN_FUZZ:-1}" != 0 ]; then
    if ./scripts/fuzz.sh; then fuzz_p=1; else fuzz_f=1; status=1; fi
fi
# One closing line over every test binary (cargo prints one per binary,
# the last of which is the doc tests').
awk -v p="$fuzz_p" -v f="$fuzz_f" '/^test result:/ { for (i = 1; i <= NF; i++) { if ($i ~ /^passed;?$/) p += $(i-1); if ($i ~ /^failed;?$/) f += $(i-1) } }
     END { printf "all: %d passed, %d failed\n", p, f }' "$log"
# The figures of the fault-injection suite (tests/e2e/faults.rs).
cat target/tmp/fault-injection.txt 2>/dev/null || true
exit "$status"
