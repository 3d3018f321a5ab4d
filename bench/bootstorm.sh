#!/usr/bin/env bash
# Boot storm: N tiny guests (1 vCPU, RAM MiB each, TCG) started at once,
# while a client asks GET /vms/{id} every 20 ms over one keep-alive
# connection. Reports the API latency (p50, p90, p99, max) during the storm
# and the time until every guest printed its boot marker on its console
# (read from the console files, so the bench adds no API load of its own).
#
# Two phases in the same run, each on a fresh vman with fresh VMs:
#   before: VMAN_QEMU_CPU_WEIGHT=off (QEMU weighs as much as vman)
#   after : VMAN_QEMU_CPU_WEIGHT=$WEIGHT (default 10: cgroup, else nice)
# and the ratios after/before. Target: API p99 < 20 ms while the guests
# saturate the CPUs.
#
# The client is paced (50 requests/s) rather than wrk's back-to-back loop:
# wrk -c1 keeps a core busy by itself and measures a saturated server, not
# a control plane answering a user.
#
# Usage: bench/bootstorm.sh [N] [RAM_MIB]     (WEIGHT=10 by default)
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-50}
RAM=${2:-96}
WEIGHT=${WEIGHT:-10}
. bench/lib.sh
bench_init bootstorm
json=(-H 'Content-Type: application/json')

sampler=""
trap '[ -z "$sampler" ] || kill "$sampler" 2>/dev/null; bench_cleanup' EXIT
# How many guests' consoles show $1.
count_consoles() { grep -ls -- "$1" "$work"/storage/vms/g*/console.txt 2>/dev/null | wc -l || true; }

storm() { # $1 = label; prints one result line into $work/result.$1
    local label=$1
    curl -sf "${json[@]}" -X POST "$api/templates" \
        -d "{\"name\":\"storm\",\"cpu_count\":1,\"ram_mib\":$RAM}" >/dev/null
    for i in $(seq "$N"); do
        curl -sf "${json[@]}" -X POST "$api/vms" -d "{\"template_name\":\"storm\",\"name\":\"g$i\"}" >/dev/null
    done
    local stop="$work/stop.$label" lat="$work/lat.$label"
    python3 - "$port" "$stop" "$lat" <<'PY' &
import http.client, os, sys, time
port, stop, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
lat, errors, tick = [], 0, time.monotonic()
while not os.path.exists(stop):
    t0 = time.perf_counter()
    try:
        conn.request("GET", "/vms/g1")
        r = conn.getresponse(); r.read()
        if r.status != 200: errors += 1
    except OSError:
        errors += 1
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    lat.append(time.perf_counter() - t0)
    tick += 0.02
    time.sleep(max(0.0, tick - time.monotonic()))
with open(out, "w") as f:
    f.write(f"{errors}\n" + "\n".join(f"{x:.6f}" for x in lat) + "\n")
PY
    sampler=$!
    sleep 1 # a calm second first
    local t0; t0=$(date +%s.%N)
    local pids=()
    for i in $(seq "$N"); do
        curl -s -o /dev/null "${json[@]}" -X POST "$api/vms/g$i/actions/start" &
        pids+=($!)
    done
    local booted=0 panicked=0 deadline=$((SECONDS + ${STORM_TIMEOUT:-900}))
    while [ $((booted + panicked)) -lt "$N" ] && [ "$SECONDS" -lt "$deadline" ]; do
        booted=$(count_consoles "boot ok hostname=")
        panicked=$(count_consoles "Kernel panic - not syncing")
        sleep 0.1
    done
    local t1; t1=$(date +%s.%N)
    touch "$stop"
    wait "$sampler" "${pids[@]}"
    sampler=""
    local running
    running=$(curl -sf "$api/vms" | python3 -c 'import json,sys; print(sum(v["state"]=="running" for v in json.load(sys.stdin)))')
    python3 - "$label" "$lat" "$t0" "$t1" "$running" "$booted" "$panicked" > "$work/result.$label" <<'PY'
import sys
label, path, t0, t1, running, booted, panicked = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4]), sys.argv[5], sys.argv[6], sys.argv[7]
lines = open(path).read().split()
errors, lat = int(lines[0]), sorted(float(x) * 1000 for x in lines[1:])
q = lambda p: lat[min(len(lat) - 1, int(p * len(lat)))]
print(f"{label} {t1 - t0:.1f} {q(0.5):.2f} {q(0.9):.2f} {q(0.99):.2f} {lat[-1]:.2f} {len(lat)} {errors} {running} {booted} {panicked}")
PY
    pids=()
    for i in $(seq "$N"); do
        curl -s -o /dev/null -X DELETE "$api/vms/g$i" &
        pids+=($!)
    done
    wait "${pids[@]}"
    curl -s -o /dev/null -X DELETE "$api/templates/storm" || true
    kill "$server"; wait "$server" 2>/dev/null || true; server=""
}

export VMAN_BOOT_DISK_MODE=overlay
VMAN_QEMU_CPU_WEIGHT=off bench_serve
storm before
VMAN_QEMU_CPU_WEIGHT=$WEIGHT bench_serve
grep -o "QEMU CPU weight [^,]*$" "$work/vman.out" | tail -n1 > "$work/weight" || true
storm after

python3 - "$work/result.before" "$work/result.after" "$N" "$RAM" "$(cat "$work/weight")" <<'PY'
import sys
b, a = (open(p).read().split() for p in sys.argv[1:3])
n, ram, how = sys.argv[3], sys.argv[4], sys.argv[5]
print(f"boot storm: {n} guests x 1 vCPU x {ram} MiB, TCG, {__import__('os').cpu_count()} cores, GET /vms/g1 every 20 ms")
print(f"  after = {how or 'see vman log'}")
rows = [("storm (s)", 1), ("API p50 (ms)", 2), ("API p90 (ms)", 3), ("API p99 (ms)", 4), ("API max (ms)", 5)]
print(f"  {'':16} {'before (off)':>13} {'after':>10} {'after/before':>13}")
for name, i in rows:
    x, y = float(b[i]), float(a[i])
    print(f"  {name:16} {x:13.2f} {y:10.2f} {y / x if x else 0:12.2f}x")
print(f"  requests {b[6]} / {a[6]}, errors {b[7]} / {a[7]}, running at the end {b[8]} / {a[8]}")
print(f"  guests booted {b[9]} / {a[9]}, guest kernel panics {b[10]} / {a[10]} (before / after)")
print(f"  target: API p99 < 20 ms after -> {'met' if float(a[4]) < 20 else 'NOT met'}")
PY
