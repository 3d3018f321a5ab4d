#!/usr/bin/env bash
# Cluster benchmark (issue 14), everything in one run on this machine:
# 3 etcd members + 3 `vman serve --cluster` nodes, and one single-host vman
# as the baseline. Prints GET /vms and POST /vms latency and throughput
# (cluster vs single-host, wrk), the time from `kill -9` of a node to its VMs
# shown `unknown`, and 100 concurrent creates across the 3 nodes
# (placement conflicts retried, total time, no node over capacity).
#
# Usage: bench/cluster.sh      Env: DURATION (5s), CONNECTIONS (16), VMS (100),
#        PROFILE (release|debug, default release), TTL (node lease, 3 s)
set -euo pipefail

DURATION=${DURATION:-5s}
CONNECTIONS=${CONNECTIONS:-16}
VMS=${VMS:-100}
PROFILE=${PROFILE:-release}
TTL=${TTL:-3}
TOKEN=bench-cluster-token-0123456789

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
for t in wrk curl etcd python3; do
    command -v "$t" >/dev/null || { echo "$t is required (scripts/setup.sh)" >&2; exit 1; }
done
if [ "$PROFILE" = release ]; then cargo build --release --quiet; else cargo build --quiet; fi
BIN="$ROOT/target/$PROFILE/vman"

TMP=$(mktemp -d -t vman-bench-cluster.XXXXXX)
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$TMP"
}
trap cleanup EXIT INT TERM

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# --- etcd: 3 members on loopback
declare -a CP PP
INITIAL=""
for i in 1 2 3; do
    CP[$i]=$(free_port); PP[$i]=$(free_port)
    INITIAL="${INITIAL:+$INITIAL,}e$i=http://127.0.0.1:${PP[$i]}"
done
ENDPOINTS=""
for i in 1 2 3; do
    ENDPOINTS="${ENDPOINTS:+$ENDPOINTS,}http://127.0.0.1:${CP[$i]}"
    etcd --name "e$i" --data-dir "$TMP/e$i" \
        --listen-client-urls "http://127.0.0.1:${CP[$i]}" --advertise-client-urls "http://127.0.0.1:${CP[$i]}" \
        --listen-peer-urls "http://127.0.0.1:${PP[$i]}" --initial-advertise-peer-urls "http://127.0.0.1:${PP[$i]}" \
        --initial-cluster "$INITIAL" --initial-cluster-state new >"$TMP/e$i.log" 2>&1 &
    PIDS+=($!)
done
for _ in $(seq 1 100); do
    ETCDCTL_API=3 etcdctl --endpoints "$ENDPOINTS" --command-timeout=2s put /bench/probe 1 >/dev/null 2>&1 && break
    sleep 0.2
done

# start NAME [cluster args...]: a vman on port 0; sets PORT_<NAME> and PID_<NAME>.
start() {
    local name=$1; shift
    mkdir -p "$TMP/$name"
    env VMAN_STORAGE_PATH="$TMP/$name" VMAN_LOG_DIR="$TMP/$name/logs" VMAN_ACCEL=tcg \
        VMAN_GUARD_TABLE="vman_bench_$name" \
        "$@" "$BIN" serve --host 127.0.0.1 --port 0 >"$TMP/$name.out" 2>&1 &
    local pid=$! port=""
    PIDS+=("$pid")
    for _ in $(seq 1 300); do
        port=$(sed -n 's|.*listening on http://127\.0\.0\.1:\([0-9]*\).*|\1|p' "$TMP/$name.out" | head -n1)
        [ -n "$port" ] && break
        sleep 0.1
    done
    [ -n "$port" ] || { echo "vman $name did not start:" >&2; cat "$TMP/$name.out" >&2; exit 1; }
    printf -v "PORT_$name" '%s' "$port"
    printf -v "PID_$name" '%s' "$pid"
}
start single
for i in 1 2 3; do
    start "n$i" VMAN_CLUSTER=1 VMAN_ETCD_ENDPOINTS="$ENDPOINTS" VMAN_NODE_NAME="n$i" \
        VMAN_CLUSTER_TOKEN="$TOKEN" VMAN_NODE_TTL_SECS="$TTL" VMAN_MEMORY_OVERCOMMIT=100
done
S="http://127.0.0.1:$PORT_single"
N1="http://127.0.0.1:$PORT_n1"; N2="http://127.0.0.1:$PORT_n2"; N3="http://127.0.0.1:$PORT_n3"
for _ in $(seq 1 100); do
    [ "$(curl -s "$N1/cluster/nodes" | grep -o '"online"' | wc -l)" = 3 ] && break
    sleep 0.1
done

json() { curl -s -H 'content-type: application/json' "$@"; }
# No NIC: a create then allocates no host port (the bench measures placement).
BODY='{"template_name":"b","network":{"mode":"none"}}'
for u in "$S" "$N1"; do
    json -X POST "$u/templates" -d '{"name":"b","cpu_count":1,"ram_mib":16}' >/dev/null
done
sleep 1
for i in $(seq 1 "$VMS"); do
    json -X POST "$S/vms" -d "$BODY" >/dev/null
    case $((i % 3)) in 0) u=$N1;; 1) u=$N2;; *) u=$N3;; esac
    json -X POST "$u/vms" -d "$BODY" >/dev/null
done
sleep 2

cat >"$TMP/post.lua" <<'LUA'
wrk.method = "POST"
wrk.body = '{"template_name":"b","network":{"mode":"none"}}'
wrk.headers["Content-Type"] = "application/json"
LUA
# bench KEY NAME URL [LUA]: wrk, then a "req/s p50 p99" line of NAME.
bench() {
    local key=$1 name=$2 url=$3 script=${4:-}
    local args=(-t2 -c"$CONNECTIONS" -d"$DURATION" --latency)
    [ -n "$script" ] && args+=(-s "$script")
    wrk "${args[@]}" "$url" >"$TMP/wrk-$key.txt"
    local rps p50 p99 non2xx
    rps=$(awk '/Requests\/sec/ {print $2}' "$TMP/wrk-$key.txt")
    p50=$(awk '$1=="50%" {print $2}' "$TMP/wrk-$key.txt")
    p99=$(awk '$1=="99%" {print $2}' "$TMP/wrk-$key.txt")
    non2xx=$(awk '/Non-2xx/ {print $NF}' "$TMP/wrk-$key.txt")
    printf '%-34s %10s req/s  p50 %8s  p99 %8s  non-2xx %s\n' "$name" "$rps" "$p50" "$p99" "${non2xx:-0}" | tee -a "$TMP/results"
}
echo "== wrk -t2 -c$CONNECTIONS -d$DURATION, $VMS VMs each side, $(nproc) CPUs, $PROFILE build"
bench get1 "GET /vms single-host" "$S/vms"
bench getc "GET /vms cluster (n1, 3 nodes)" "$N1/vms"
bench post1 "POST /vms single-host" "$S/vms" "$TMP/post.lua"
bench postc "POST /vms cluster (n1, placement)" "$N1/vms" "$TMP/post.lua"

# --- 100 concurrent creates across the 3 nodes
retries() { curl -s "$N1/cluster/nodes" | python3 -c 'import json,sys; print(sum(n["placement_retries"] for n in json.load(sys.stdin)))'; }
sleep 1
before=$(retries)
t0=$(date +%s.%N)
seq 1 100 | xargs -P 100 -I{} sh -c '
    case $(({} % 3)) in 0) u='"$N1"';; 1) u='"$N2"';; *) u='"$N3"';; esac
    curl -s -o /dev/null -w "%{http_code}\n" -H "content-type: application/json" -X POST "$u/vms"  -d "{\"template_name\":\"b\",\"name\":\"burst-{}\",\"network\":{\"mode\":\"none\"}}"' >"$TMP/burst.txt"
t1=$(date +%s.%N)
sleep "$TTL"   # the next heartbeat carries each node's retry count
after=$(retries)
ok=$(grep -c '^201$' "$TMP/burst.txt" || true)
printf '%-34s %d/100 created in %.2f s, placement retries %d\n' "100 concurrent creates (3 nodes)" "$ok" \
    "$(echo "$t1 - $t0" | bc)" "$((after - before))" | tee -a "$TMP/results"
curl -s "$N1/cluster/nodes" | python3 -c '
import json,sys
for n in json.load(sys.stdin):
    over = " OVER CAPACITY" if n["memory_reserved_mib"] > n["memory_mib"] else ""
    print("   %s: %d VMs, %d of %d MiB reserved%s" % (n["name"], n["vm_count"], n["memory_reserved_mib"], n["memory_mib"], over))' | tee -a "$TMP/results"

# --- kill -9 of n3: time until n1 shows n3 offline and its VMs unknown
t0=$(date +%s.%N)
kill -KILL "$PID_n3"
for _ in $(seq 1 2000); do
    curl -s "$N1/cluster/nodes" | grep -q '"name":"n3","status":"offline"' && break
    sleep 0.05
done
t1=$(date +%s.%N)
unknown=$(curl -s "$N1/vms" | python3 -c '
import json,sys
vms=[v for v in json.load(sys.stdin) if v["node"]=="n3"]
print("%d of %d" % (sum(v["state"]=="unknown" for v in vms), len(vms)))')
printf '%-34s %.2f s (VMAN_NODE_TTL_SECS=%s, heartbeat every TTL/3); n3 VMs unknown: %s\n' \
    "kill -9 n3 -> n3 offline on n1" "$(echo "$t1 - $t0" | bc)" "$TTL" "$unknown" | tee -a "$TMP/results"
echo "== results"
cat "$TMP/results"
