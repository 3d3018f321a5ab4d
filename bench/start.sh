#!/usr/bin/env bash
# Start latency: POST /vms/{id}/actions/start -> 202 with an existing root
# disk, against the floor of bare qemu-system-x86_64 started with the very
# same arguments (read from the QEMU vman launched) until its QMP greeting.
# Both measured in this run, ROUNDS times each; prints medians and the ratio
# (target <= 1.5x). Usage: bench/start.sh [ROUNDS]
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-15}
cargo build --release -q
work=$(mktemp -d /tmp/vman-bench-start.XXXXXX)
server=""
cleanup() {
    [ -n "$server" ] && kill "$server" 2>/dev/null || true
    pkill -9 -f "$work/storage/vms" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT
image="$work/tiny.qcow2"
./scripts/build_boot_disk.sh --flavor tiny --output "$image" >/dev/null
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
VMAN_STORAGE_PATH="$work/storage" VMAN_LOG_DIR="$work/logs" VMAN_ACCEL=tcg \
VMAN_DEFAULT_BOOT_DISK="$image" VMAN_PORT=$port \
    ./target/release/vman serve >"$work/vman.out" 2>&1 &
server=$!
api="http://127.0.0.1:$port"
for _ in $(seq 100); do curl -sf "$api/health" >/dev/null && break; sleep 0.1; done
curl -sf -X POST "$api/templates" -d '{"name":"b","cpu_count":1,"ram_mib":256}' >/dev/null
curl -sf -X POST "$api/vms" -d '{"template_name":"b","name":"bench"}' >/dev/null
# First start copies the default; the rounds below reuse the root disk.
curl -sf -X POST "$api/vms/bench/actions/start" >/dev/null
pid=$(curl -sf "$api/vms/bench" | python3 -c 'import json,sys; print(json.load(sys.stdin)["pid"])')
tr '\0' '\n' < "/proc/$pid/cmdline" > "$work/argv"
curl -sf -X POST "$api/vms/bench/actions/stop" -d '{"force":true}' >/dev/null

vman_times=()
for _ in $(seq "$ROUNDS"); do
    t=$(curl -s -o /dev/null -w '%{http_code} %{time_total}' -X POST "$api/vms/bench/actions/start")
    [ "${t%% *}" = 202 ] || { echo "start failed: $t" >&2; exit 1; }
    vman_times+=("${t#* }")
    curl -sf -X POST "$api/vms/bench/actions/stop" -d '{"force":true}' >/dev/null
done

bare=$(python3 - "$work/argv" "$ROUNDS" <<'PY'
import os, socket, subprocess, sys, time
argv = open(sys.argv[1]).read().split("\n")[:-1]
rounds = int(sys.argv[2])
qmp = next(a for a in argv if a.startswith("unix:") and "qmp.sock" in a)[5:].split(",")[0]
times = []
for _ in range(rounds):
    for f in (qmp, qmp.replace("qmp.sock", "console.sock")):
        try: os.unlink(f)
        except FileNotFoundError: pass
    t0 = time.monotonic()
    p = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while True:
        try:
            s = socket.socket(socket.AF_UNIX); s.connect(qmp)
            if b"QMP" in s.recv(4096): break
        except OSError:
            time.sleep(0.002)
    times.append(time.monotonic() - t0)
    s.close(); p.kill(); p.wait()
print(" ".join(f"{t:.4f}" for t in times))
PY
)
python3 - "${vman_times[*]}" "$bare" <<'PY'
import statistics, sys
v = [float(x) for x in sys.argv[1].split()]
b = [float(x) for x in sys.argv[2].split()]
mv, mb = statistics.median(v), statistics.median(b)
print(f"start latency over {len(v)} rounds (TCG, existing root disk)")
print(f"  vman POST start -> 202 : median {mv*1000:7.1f} ms  max {max(v)*1000:7.1f} ms")
print(f"  bare QEMU -> QMP greeting: median {mb*1000:7.1f} ms  max {max(b)*1000:7.1f} ms  (baseline)")
print(f"  ratio vman / bare QEMU : {mv/mb:.2f}x  (target <= 1.5x)")
PY
