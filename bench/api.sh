#!/usr/bin/env bash
# API benchmark of vman: a release build with 1 template and 100 VMs, loaded
# with wrk from the same machine. Prints req/s, p50/p99 latency, non-2xx
# counts and the server's RSS, compared with the Python service it replaces.
#
# Usage: bench/api.sh            (from anywhere; builds first)
# Env:   DURATION (default 10s), THREADS (2), CONNECTIONS (64), VMS (100)
set -euo pipefail

DURATION=${DURATION:-10s}
THREADS=${THREADS:-2}
CONNECTIONS=${CONNECTIONS:-64}
VMS=${VMS:-100}

# Baseline: the Python/FastAPI service on one of these 2-core machines.
BASE_GET_ONE=443   # req/s, GET /vms/{id}
BASE_LIST=27       # req/s, GET /vms with 100 VMs
BASE_RSS_MB=78     # MB
# Targets from issue 2.
TARGET_GET_ONE=20000
TARGET_LIST=5000
TARGET_RSS_MB=20

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

if ! command -v wrk >/dev/null; then
    echo "wrk is missing; installing it (apt-get install -y wrk)" >&2
    if [ "$(id -u)" = 0 ]; then apt-get install -y wrk >&2; else sudo apt-get install -y wrk >&2; fi
fi
command -v curl >/dev/null || { echo "curl is required" >&2; exit 1; }

echo "== building the release binary"
cargo build --release --quiet
BIN="$ROOT/target/release/vman"

TMP=$(mktemp -d -t vman-bench.XXXXXX)
SERVER_PID=""
cleanup() {
    if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
        kill -TERM "$SERVER_PID" 2>/dev/null || true
        for _ in $(seq 1 50); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$SERVER_PID" 2>/dev/null || true
        wait "$SERVER_PID" 2>/dev/null || true
    fi
    rm -rf "$TMP"
}
trap cleanup EXIT INT TERM

mkdir -p "$TMP/storage" "$TMP/logs"
# The server logs one line per request; keep it off the terminal.
env VMAN_STORAGE_PATH="$TMP/storage" VMAN_LOG_DIR="$TMP/logs" VMAN_ACCEL=tcg \
    "$BIN" serve --host 127.0.0.1 --port 0 >"$TMP/server.out" 2>&1 &
SERVER_PID=$!

PORT=""
for _ in $(seq 1 300); do
    PORT=$(sed -n 's|.*listening on http://127\.0\.0\.1:\([0-9]*\).*|\1|p' "$TMP/server.out" | head -n1)
    [ -n "$PORT" ] && break
    kill -0 "$SERVER_PID" 2>/dev/null || { echo "server exited:" >&2; cat "$TMP/server.out" >&2; exit 1; }
    sleep 0.1
done
[ -n "$PORT" ] || { echo "server did not get ready:" >&2; cat "$TMP/server.out" >&2; exit 1; }
URL="http://127.0.0.1:$PORT"
echo "== server pid $SERVER_PID on $URL, storage $TMP/storage"

rss_mb() { awk '/^VmRSS:/ { printf "%.1f", $2 / 1024 }' "/proc/$SERVER_PID/status"; }

post() {
    local path=$1 body=$2 code
    code=$(curl -s -o /dev/null -w '%{http_code}' -X POST "$URL$path" \
        -H 'Content-Type: application/json' -d "$body")
    [ "$code" = 201 ] || { echo "POST $path $body -> $code" >&2; exit 1; }
}

echo "== defining 1 template and $VMS VMs"
post /templates '{"name":"small","cpu_count":1,"ram_amount":1}'
for i in $(seq 1 "$VMS"); do
    post /vms "{\"template_name\":\"small\",\"name\":\"vm-$i\"}"
done
count=$(curl -s "$URL/vms" | grep -o '"id":' | wc -l)
[ "$count" = "$VMS" ] || { echo "GET /vms lists $count VMs, expected $VMS" >&2; exit 1; }

sleep 1
RSS_IDLE=$(rss_mb)
echo "== idle RSS: $RSS_IDLE MB"

cat >"$TMP/post_templates.lua" <<'LUA'
-- Unique template names: thread number plus a per-thread counter.
local next_id = 0
function setup(thread)
    thread:set("tid", next_id)
    next_id = next_id + 1
end
local counter = 0
request = function()
    counter = counter + 1
    local body = string.format('{"name":"b%d-%d","cpu_count":1,"ram_amount":1}', tid, counter)
    return wrk.format("POST", "/templates", { ["Content-Type"] = "application/json" }, body)
end
LUA

# run NAME PATH [LUA]: runs wrk, keeps its output, prints a summary line.
declare -A RPS P50 P99 NON2XX ERRS
run() {
    local name=$1 path=$2 script=${3:-} out="$TMP/wrk-$1.txt"
    local args=(-t"$THREADS" -c"$CONNECTIONS" -d"$DURATION" --latency)
    [ -n "$script" ] && args+=(-s "$script")
    echo "== wrk ${args[*]} $URL$path"
    wrk "${args[@]}" "$URL$path" >"$out"
    RPS[$name]=$(awk '/^Requests\/sec:/ { printf "%.0f", $2 }' "$out")
    P50[$name]=$(awk '$1 == "50%" { print $2 }' "$out")
    P99[$name]=$(awk '$1 == "99%" { print $2 }' "$out")
    NON2XX[$name]=$(awk '/Non-2xx or 3xx responses:/ { print $NF }' "$out")
    NON2XX[$name]=${NON2XX[$name]:-0}
    ERRS[$name]=$(awk '/Socket errors:/ { sub(/.*Socket errors: /, ""); print }' "$out")
    ERRS[$name]=${ERRS[$name]:-none}
    printf '   %s req/s, p50 %s, p99 %s, non-2xx %s, socket errors: %s\n' \
        "${RPS[$name]}" "${P50[$name]}" "${P99[$name]}" "${NON2XX[$name]}" "${ERRS[$name]}"
}

run get_one "/vms/vm-50"
run list "/vms"
run post_templates "/templates" "$TMP/post_templates.lua"

sleep 1
RSS_AFTER=$(rss_mb)
created=$(curl -s "$URL/templates" | grep -o '"name":' | wc -l)

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2fx", a / b }'; }
verdict() { awk -v v="$1" -v t="$2" -v dir="$3" 'BEGIN {
    ok = (dir == "min") ? (v >= t) : (v < t); print ok ? "met" : "MISSED" }'; }

echo
echo "== results ($(nproc) CPUs, wrk -t$THREADS -c$CONNECTIONS -d$DURATION, same machine)"
printf '%-26s %12s %10s %10s %12s %10s %14s %8s\n' \
    "endpoint" "req/s" "p50" "p99" "non-2xx" "baseline" "ours/baseline" "target"
printf '%-26s %12s %10s %10s %12s %10s %14s %8s\n' \
    "GET /vms/{id}" "${RPS[get_one]}" "${P50[get_one]}" "${P99[get_one]}" "${NON2XX[get_one]}" \
    "$BASE_GET_ONE" "$(ratio "${RPS[get_one]}" $BASE_GET_ONE)" \
    "$(verdict "${RPS[get_one]}" $TARGET_GET_ONE min)"
printf '%-26s %12s %10s %10s %12s %10s %14s %8s\n' \
    "GET /vms ($VMS VMs)" "${RPS[list]}" "${P50[list]}" "${P99[list]}" "${NON2XX[list]}" \
    "$BASE_LIST" "$(ratio "${RPS[list]}" $BASE_LIST)" \
    "$(verdict "${RPS[list]}" $TARGET_LIST min)"
printf '%-26s %12s %10s %10s %12s %10s %14s %8s\n' \
    "POST /templates" "${RPS[post_templates]}" "${P50[post_templates]}" "${P99[post_templates]}" \
    "${NON2XX[post_templates]}" "-" "-" "-"
echo
printf '%-26s %12s %10s %14s %8s\n' "memory" "MB" "baseline" "ours/baseline" "target"
printf '%-26s %12s %10s %14s %8s\n' "RSS idle (before load)" "$RSS_IDLE" "$BASE_RSS_MB" \
    "$(ratio "$RSS_IDLE" $BASE_RSS_MB)" "$(verdict "$RSS_IDLE" $TARGET_RSS_MB max)"
printf '%-26s %12s %10s %14s %8s\n' "RSS after load" "$RSS_AFTER" "$BASE_RSS_MB" \
    "$(ratio "$RSS_AFTER" $BASE_RSS_MB)" "-"
echo
echo "POST /templates created $((created - 1)) templates (201s); non-2xx: ${NON2XX[post_templates]}"
echo "targets: GET /vms/{id} >= $TARGET_GET_ONE req/s, GET /vms >= $TARGET_LIST req/s, idle RSS < $TARGET_RSS_MB MB"
