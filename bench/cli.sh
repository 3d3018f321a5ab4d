#!/usr/bin/env bash
# CLI latency: `vman vm list` (the whole client process, start to exit:
# argument parsing, HTTP request, table) against `curl` of GET /vms, both
# against a release vman serving 100 defined VMs. Runs them in turn (A B A B
# ...) so drift of a busy machine hits both alike, and prints min / median /
# max wall milliseconds and the median ratio. Needs only bash, curl and date.
#
# Usage: bench/cli.sh          (from anywhere; builds first)
# Env:   RUNS (default 50), VMS (default 100)
set -euo pipefail

RUNS=${RUNS:-50}
VMS=${VMS:-100}

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
command -v curl >/dev/null || { echo "curl is required" >&2; exit 1; }

echo "== building the release binary"
cargo build --release --quiet
BIN="$ROOT/target/release/vman"

TMP=$(mktemp -d -t vman-bench-cli.XXXXXX)
SERVER_PID=""
cleanup() {
    if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
        kill -TERM "$SERVER_PID" 2>/dev/null || true
        wait "$SERVER_PID" 2>/dev/null || true
    fi
    rm -rf "$TMP"
}
trap cleanup EXIT INT TERM

env -u VMAN_URL -u VMAN_API_TOKEN VMAN_STORAGE_PATH="$TMP/storage" VMAN_LOG_DIR="$TMP/logs" \
    "$BIN" serve --host 127.0.0.1 --port 0 >"$TMP/server.out" 2>&1 &
SERVER_PID=$!
PORT=""
for _ in $(seq 1 300); do
    PORT=$(sed -n 's|.*listening on http://127\.0\.0\.1:\([0-9]*\).*|\1|p' "$TMP/server.out" | head -n1)
    [ -n "$PORT" ] && break
    kill -0 "$SERVER_PID" 2>/dev/null || { echo "server exited:" >&2; cat "$TMP/server.out" >&2; exit 1; }
    sleep 0.1
done
[ -n "$PORT" ] || { echo "server did not get ready" >&2; exit 1; }
export VMAN_URL="http://127.0.0.1:$PORT"

echo "== defining 1 template and $VMS VMs (through the CLI)"
"$BIN" template create small --cpus 1 --ram 1 -q >/dev/null
for i in $(seq 1 "$VMS"); do "$BIN" vm create "vm-$i" -t small -q >/dev/null; done
rows=$("$BIN" vm list -q | wc -l)
[ "$rows" = "$VMS" ] || { echo "vman vm list shows $rows VMs, expected $VMS" >&2; exit 1; }

# One run's wall time in microseconds, output discarded.
us() {
    local t0 t1
    t0=$(date +%s%N)
    "$@" >/dev/null
    t1=$(date +%s%N)
    echo $(((t1 - t0) / 1000))
}
A=("$BIN" vm list)
B=(curl -s "$VMAN_URL/vms")
# Warm-up (page cache, first connection).
us "${A[@]}" >/dev/null; us "${B[@]}" >/dev/null
: >"$TMP/a"; : >"$TMP/b"
for _ in $(seq 1 "$RUNS"); do
    us "${A[@]}" >>"$TMP/a"
    us "${B[@]}" >>"$TMP/b"
done

stats() { sort -n "$1" | awk '{ v[NR] = $1 } END { printf "%.2f %.2f %.2f", v[1] / 1000, v[int((NR + 1) / 2)] / 1000, v[NR] / 1000 }'; }
read -r a_min a_med a_max <<<"$(stats "$TMP/a")"
read -r b_min b_med b_max <<<"$(stats "$TMP/b")"
echo
echo "== wall ms per process, $RUNS runs each, $VMS VMs, $(nproc) CPUs (min / median / max)"
printf '%-34s %8s %8s %8s\n' "command" "min" "median" "max"
printf '%-34s %8s %8s %8s\n' "vman vm list (table)" "$a_min" "$a_med" "$a_max"
printf '%-34s %8s %8s %8s\n' "curl -s GET /vms (raw JSON)" "$b_min" "$b_med" "$b_max"
awk -v a="$a_med" -v b="$b_med" 'BEGIN { printf "median ratio vman/curl: %.2fx\n", a / b }'
