#!/usr/bin/env bash
# Data disk hot-plug figures under TCG, over ROUNDS rounds (median, max):
#  1. POST /disks/{id}/attach -> its answer (QEMU realized the device), and
#     -> the guest's "vman-guest: disk added vdb" console line;
#  2. POST /disks/{id}/detach -> its answer (QEMU's DEVICE_DELETED and the
#     block nodes deleted).
# The console is polled back to back through the API, so the guest figure
# includes up to one poll round trip. QEMU 7.2 on q35 signals the plug to
# the guest through ACPI (GPE 1), which Linux acts on at once; the native
# PCIe attention button would add a 5 s wait to every detach. The Python
# service had no working hot-plug, so there is no baseline to compare with.
# Usage: bench/disks.sh [ROUNDS]
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-10}
. bench/lib.sh
bench_init disks
bench_serve

python3 - "$api" "$ROUNDS" <<'PY'
import json, statistics, sys, time, urllib.request
api, rounds = sys.argv[1], int(sys.argv[2])
def call(method, path, body=None):
    req = urllib.request.Request(api + path, method=method,
                                 data=None if body is None else json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")
def console():
    return call("GET", "/vms/b1/console")[1]["console"]
def wait_console(marker, count, deadline=180):
    t0 = time.monotonic()
    while console().count(marker) < count:
        if time.monotonic() - t0 > deadline:
            sys.exit(f"no {marker!r} x{count} after {deadline} s")
    return time.monotonic()
assert call("POST", "/templates", {"name": "b", "cpu_count": 1, "ram_mib": 256})[0] == 201
assert call("POST", "/vms", {"template_name": "b", "name": "b1"})[0] == 201
assert call("POST", "/vms/b1/actions/start")[0] == 202
wait_console("vman-guest: ready", 1)
s, b = call("POST", "/disks", {"name": "bench", "size": 1})
assert s == 201, b
answer, seen, gone = [], [], []
for i in range(1, rounds + 1):
    t0 = time.monotonic()
    s, b = call("POST", "/disks/bench/attach", {"vm_id": "b1"})
    t1 = time.monotonic()
    assert s == 200, b
    t2 = wait_console("vman-guest: disk added vdb", i)
    answer.append(t1 - t0)
    seen.append(t2 - t0)
    t0 = time.monotonic()
    s, b = call("POST", "/disks/bench/detach", {})
    t1 = time.monotonic()
    assert s == 200, b
    gone.append(t1 - t0)
    wait_console("vman-guest: disk removed vdb", i)
def fmt(xs):
    return f"median {statistics.median(xs)*1000:7.1f} ms, max {max(xs)*1000:7.1f} ms"
print(f"data disk hot-plug under TCG, {rounds} rounds (tiny guest, 256 MiB, q35 + pcie-root-port)")
print(f"  attach: POST -> answer (device realized)   {fmt(answer)}")
print(f"  attach: POST -> guest 'disk added vdb'     {fmt(seen)}")
print(f"  detach: POST -> answer (DEVICE_DELETED)    {fmt(gone)}")
PY
