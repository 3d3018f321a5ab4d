#!/usr/bin/env bash
# Start latency: POST /vms/{id}/actions/start -> 202 with an existing root
# disk, against bare qemu-system-x86_64 started with the very same arguments
# (read from the QEMU vman launched), measured in this run ROUNDS times each:
#  - floor 1: until its QMP greeting (the issue's baseline; target <= 1.5x).
#    QEMU sends the greeting from its monitor thread before the machine is
#    built, so this floor does not include machine initialisation;
#  - floor 2: until QMP answers a first command (`qmp_capabilities`), which
#    QEMU does only once the machine is built: the same work vman waits for
#    before answering 202 ("QEMU runs and QMP answered").
# Usage: bench/start.sh [ROUNDS]
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-15}
. bench/lib.sh
bench_init start
bench_serve
curl -sf -X POST "$api/templates" -H 'Content-Type: application/json' -d '{"name":"b","cpu_count":1,"ram_mib":256}' >/dev/null
curl -sf -X POST "$api/vms" -H 'Content-Type: application/json' -d '{"template_name":"b","name":"bench"}' >/dev/null
# First start copies the default; the rounds below reuse the root disk.
curl -sf -X POST "$api/vms/bench/actions/start" >/dev/null
pid=$(curl -sf "$api/vms/bench" | python3 -c 'import json,sys; print(json.load(sys.stdin)["pid"])')
tr '\0' '\n' < "/proc/$pid/cmdline" > "$work/argv"
curl -sf -X POST "$api/vms/bench/actions/stop" -H 'Content-Type: application/json' -d '{"force":true}' >/dev/null

vman_times=()
for _ in $(seq "$ROUNDS"); do
    t=$(curl -s -o /dev/null -w '%{http_code} %{time_total}' -X POST "$api/vms/bench/actions/start")
    [ "${t%% *}" = 202 ] || { echo "start failed: $t" >&2; exit 1; }
    vman_times+=("${t#* }")
    curl -sf -X POST "$api/vms/bench/actions/stop" -H 'Content-Type: application/json' -d '{"force":true}' >/dev/null
done

bare=$(python3 - "$work/argv" "$ROUNDS" <<'PY'
import os, socket, subprocess, sys, time
argv = open(sys.argv[1]).read().split("\n")[:-1]
rounds = int(sys.argv[2])
qmp = next(a for a in argv if a.startswith("unix:") and "qmp.sock" in a)[5:].split(",")[0]
greet, answer = [], []
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
    greet.append(time.monotonic() - t0)
    s.sendall(b'{"execute": "qmp_capabilities"}\n')
    while b"return" not in s.recv(4096):
        pass
    answer.append(time.monotonic() - t0)
    s.close(); p.kill(); p.wait()
print(" ".join(f"{t:.4f}" for t in greet) + "|" + " ".join(f"{t:.4f}" for t in answer))
PY
)
python3 - "${vman_times[*]}" "$bare" <<'PY'
import statistics, sys
v = [float(x) for x in sys.argv[1].split()]
g, a = ([float(x) for x in part.split()] for part in sys.argv[2].split("|"))
mv, mg, ma = statistics.median(v), statistics.median(g), statistics.median(a)
print(f"start latency over {len(v)} rounds (TCG, existing root disk), medians")
print(f"  vman POST start -> 202            : {mv*1000:7.1f} ms (max {max(v)*1000:.1f})")
print(f"  bare QEMU -> QMP greeting         : {mg*1000:7.1f} ms (max {max(g)*1000:.1f})  floor 1")
print(f"  bare QEMU -> first QMP answer     : {ma*1000:7.1f} ms (max {max(a)*1000:.1f})  floor 2")
print(f"  vman / floor 1 (greeting)         : {mv/mg:.2f}x (target <= 1.5x)")
print(f"  vman / floor 2 (same work)        : {mv/ma:.2f}x")
PY
