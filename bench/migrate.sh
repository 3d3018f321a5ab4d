#!/usr/bin/env bash
# Cold migration throughput: two release vman cluster nodes on this machine
# (on one etcd member the script starts on loopback), a stopped VM whose data
# disk holds 1 GiB of random data (qcow2, all allocated), migrated n1 -> n2
# and back over loopback. Compared in the same run with `cp` of the same
# file, `sha256sum` of it, and `curl` downloading it from a local
# `python3 -m http.server` (plain HTTP over loopback).
#
# Usage: bench/migrate.sh        (from anywhere; builds first)
# Env:   SIZE_MIB (default 1024)
set -euo pipefail

SIZE_MIB=${SIZE_MIB:-1024}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
for t in curl etcd etcdctl; do
    command -v $t >/dev/null || { echo "$t is required (scripts/setup.sh installs it)" >&2; exit 1; }
done

echo "== building the release binary"
cargo build --release --quiet
BIN="$ROOT/target/release/vman"

work=$(mktemp -d -t vman-bench-migrate.XXXXXX)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
now() { date +%s.%N; }
rate() { python3 -c "import sys; s=float(sys.argv[1]); print(f'{s:7.2f} s {int(sys.argv[2])/s:8.1f} MiB/s')" "$1" "$2"; }

TOKEN=bench-cluster-token-0123456789
ec=$(free_port); ep=$(free_port)
etcd --name e1 --data-dir "$work/etcd" \
    --listen-client-urls "http://127.0.0.1:$ec" --advertise-client-urls "http://127.0.0.1:$ec" \
    --listen-peer-urls "http://127.0.0.1:$ep" --initial-advertise-peer-urls "http://127.0.0.1:$ep" \
    --initial-cluster "e1=http://127.0.0.1:$ep" >"$work/etcd.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do
    ETCDCTL_API=3 etcdctl --endpoints "http://127.0.0.1:$ec" --command-timeout=2s put /bench/probe 1 >/dev/null 2>&1 && break
    sleep 0.2
done
start_node() { # name port
    mkdir -p "$work/$1"
    VMAN_STORAGE_PATH="$work/$1/storage" VMAN_LOG_DIR="$work/$1/logs" VMAN_PORT=$2 \
    VMAN_CLUSTER=1 VMAN_NODE_NAME=$1 VMAN_ADVERTISE_URL="http://127.0.0.1:$2" \
    VMAN_CLUSTER_TOKEN=$TOKEN VMAN_ETCD_ENDPOINTS="http://127.0.0.1:$ec" \
        "$BIN" serve >>"$work/$1.out" 2>&1 &
    pids+=($!)
    for _ in $(seq 1000); do curl -sf "http://127.0.0.1:$2/health" >/dev/null && return 0; sleep 0.01; done
    echo "vman $1 did not start:" >&2; cat "$work/$1.out" >&2; exit 1
}
p1=$(free_port); start_node n1 "$p1"
p2=$(free_port); start_node n2 "$p2"
api1="http://127.0.0.1:$p1"; api2="http://127.0.0.1:$p2"
post() { curl -sf -H 'content-type: application/json' -d "$2" "$1" >/dev/null; }

post "$api1/templates" '{"name":"t","cpu_count":1,"ram_mib":256}'
for _ in $(seq 100); do   # both nodes online and the template mirrored to n2
    curl -sf "$api2/templates/t" >/dev/null && [ "$(curl -sf "$api1/cluster/nodes" | grep -o '"online"' | wc -l)" = 2 ] && break
    sleep 0.1
done
post "$api1/vms" '{"name":"bm","template_name":"t","node":"n1"}'
post "$api1/disks" '{"name":"bd","size":1}'
post "$api1/disks/bd/attach" '{"vm_id":"bm"}'
disk="$work/n1/storage/disks/bd.qcow2"
echo "== filling the data disk with $SIZE_MIB MiB of random data"
head -c "${SIZE_MIB}M" /dev/urandom >"$work/random.raw"
qemu-img convert -f raw -O qcow2 "$work/random.raw" "$disk"
rm -f "$work/random.raw"
bytes=$(stat -c %s "$disk"); mib=$((bytes / 1048576))
echo "   disk file: $bytes bytes"
cat "$disk" >/dev/null   # warm the page cache like the baselines below

migrate() { # api node
    local t0 t1 out
    t0=$(now)
    out=$(curl -sf -H 'content-type: application/json' -d "{\"node\":\"$2\"}" "$1/vms/bm/actions/migrate")
    t1=$(now)
    echo "$out" >&2
    python3 -c "print($t1-$t0)"
}
echo "== results ($mib MiB file, loopback, page cache warm)"
s=$(migrate "$api1" n2 2>/dev/null); echo "vman migrate n1->n2 : $(rate "$s" "$mib")"
s=$(migrate "$api2" n1 2>/dev/null); echo "vman migrate n2->n1 : $(rate "$s" "$mib")"
disk="$work/n1/storage/disks/bd.qcow2"

t0=$(now); cp "$disk" "$work/copy.qcow2"; sync "$work/copy.qcow2"; t1=$(now)
echo "cp + sync           : $(rate "$(python3 -c "print($t1-$t0)")" "$mib")"
rm -f "$work/copy.qcow2"
t0=$(now); sha256sum "$disk" >/dev/null; t1=$(now)
echo "sha256sum           : $(rate "$(python3 -c "print($t1-$t0)")" "$mib")"
hp=$(free_port)
(cd "$(dirname "$disk")" && exec python3 -m http.server "$hp" --bind 127.0.0.1 >/dev/null 2>&1) &
pids+=($!)
for _ in $(seq 500); do curl -sf -o /dev/null -r 0-0 "http://127.0.0.1:$hp/bd.qcow2" && break; sleep 0.01; done
t0=$(now); curl -sf -o "$work/curl.qcow2" "http://127.0.0.1:$hp/bd.qcow2"; sync "$work/curl.qcow2"; t1=$(now)
echo "curl (http.server) + sync: $(rate "$(python3 -c "print($t1-$t0)")" "$mib")"
