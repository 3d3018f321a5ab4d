#!/usr/bin/env bash
# Snapshot figures under TCG (issue 13), a VM whose root disk is 1 GiB, all
# of it allocated (the tiny boot disk grown to 1 GiB, its last 960 MiB
# filled on the host before the first start), with a 1 GiB data disk:
#  1. POST /vms/{id}/snapshots of the RUNNING VM: request -> answer (median,
#     max over ROUNDS), with and without its data disk (include_data_disks),
#     and the guest's own clock gap: the largest step between two reads of
#     /proc/uptime by a busy loop in the guest, in a window that holds one
#     snapshot, next to the same window without one;
#  2. the same of the STOPPED VM; restore (stopped);
#  3. on copies of the same file: `qemu-img snapshot -c` (internal snapshot)
#     and `qemu-img create -f qcow2 -b root -F qcow2` (an overlay, what a
#     snapshot makes), each timed as one process; ratios printed.
# Usage: bench/snapshots.sh [ROUNDS]
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-5}
. bench/lib.sh
bench_init snapshots
bench_serve

python3 - "$api" "$ROUNDS" "$work" <<'PY'
import json, os, shutil, statistics, subprocess, sys, time, urllib.request
api, rounds, work = sys.argv[1], int(sys.argv[2]), sys.argv[3]
storage = os.path.join(work, "storage")
def call(method, path, body=None):
    req = urllib.request.Request(api + path, method=method,
                                 data=None if body is None else json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=600) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")
def ok(st, body, want):
    if st != want:
        sys.exit(f"unexpected {st}: {body}")
    return body
def console():
    return call("GET", "/vms/b/console")[1]["console"]
def wait_console(marker, count, deadline=300):
    t0 = time.monotonic()
    while console().count(marker) < count:
        if time.monotonic() - t0 > deadline:
            sys.exit(f"no {marker!r} x{count} after {deadline} s")
        time.sleep(0.05)
def type_line(line):
    st, b = call("POST", "/vms/b/console", {"data": line + "\n"})
    if st >= 300:
        sys.exit(f"console input: {st} {b}")
def timed(method, path, body=None, want=201):
    t0 = time.monotonic()
    st, b = call(method, path, body)
    dt = time.monotonic() - t0
    ok(st, b, want)
    return dt
def run(cmd):
    t0 = time.monotonic()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.monotonic() - t0
ms = lambda s: f"{s * 1000:7.1f} ms"

ok(*call("POST", "/templates", {"name": "t", "cpu_count": 1, "ram_mib": 256}), 201)
ok(*call("POST", "/vms", {"template_name": "t", "name": "b"}), 201)
vm = os.path.join(storage, "vms", "b")
os.makedirs(vm, exist_ok=True)
root = os.path.join(vm, "root.qcow2")
image = os.path.join(work, "tiny.qcow2")
shutil.copy(image, root)
subprocess.run(["qemu-img", "resize", "-q", root, "1G"], check=True)
subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 64M 960M", root],
               check=True, stdout=subprocess.DEVNULL)
ok(*call("POST", "/disks", {"name": "bd", "size": 1}), 201)
ok(*call("POST", "/disks/bd/attach", {"vm_id": "b"}), 200)
ok(*call("POST", "/vms/b/actions/start"), 202)
wait_console("vman-guest: ready", 1)

# The guest's clock gap: a busy loop reads /proc/uptime for `secs` seconds
# and prints the largest step between two reads.
GAP = ("awk -v w=%s 'BEGIN{p=0;m=0;s=0;while(1){getline l < \"/proc/uptime\";"
       "close(\"/proc/uptime\");split(l,a,\" \");t=a[1]+0;if(s==0)s=t;"
       "if(p>0&&t-p>m)m=t-p;p=t;if(t-s>w)break}printf \"gap%%s=%%d\\n\", \"%s\", m*1000}'")
def gap_window(tag, during=None, secs=4):
    type_line(GAP % (secs, tag))
    time.sleep(1.5)
    if during:
        during()
    marker = f"gap{tag}="
    wait_console(marker, 1, deadline=120)
    line = [l for l in console().splitlines() if marker in l and "awk" not in l][-1]
    return int(line.split("=")[1].strip())

base_gap = gap_window("base")
snap_gap = gap_window("snap", lambda: timed("POST", "/vms/b/snapshots", {"name": "g"}))
running_all, running_root = [], []
for i in range(rounds):
    running_all.append(timed("POST", "/vms/b/snapshots", {"name": f"ra{i}"}))
    running_root.append(timed("POST", "/vms/b/snapshots",
                              {"name": f"rr{i}", "include_data_disks": False}))
ok(*call("POST", "/vms/b/actions/stop", {"force": True}), 202)
for _ in range(600):
    if call("GET", "/vms/b")[1]["state"] == "stopped":
        break
    time.sleep(0.1)
stopped_all, restores = [], []
for i in range(min(rounds, 2)):
    stopped_all.append(timed("POST", "/vms/b/snapshots", {"name": f"sa{i}"}))
for i in range(rounds):
    restores.append(timed("POST", f"/vms/b/snapshots/ra{i % rounds}/restore", None, 200))

# qemu-img on copies of the same 1 GiB root file.
ref = os.path.join(work, "ref.qcow2")
subprocess.run(["qemu-img", "convert", "-O", "qcow2", root, ref], check=True)
internal, overlay = [], []
for i in range(rounds):
    internal.append(run(["qemu-img", "snapshot", "-c", f"s{i}", ref]))
    ov = os.path.join(work, f"ov{i}.qcow2")
    overlay.append(run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", ref, "-F", "qcow2", ov]))

med = statistics.median
print(f"snapshot, running VM, root + 1 GiB data disk: median {ms(med(running_all))}  max {ms(max(running_all))}")
print(f"snapshot, running VM, root only:              median {ms(med(running_root))}  max {ms(max(running_root))}")
print(f"snapshot, stopped VM, root + data disk:       median {ms(med(stopped_all))}  max {ms(max(stopped_all))}")
print(f"restore, stopped VM, root + data disk:        median {ms(med(restores))}  max {ms(max(restores))}")
print(f"guest clock: largest step between reads: {base_gap} ms without a snapshot, {snap_gap} ms with one")
print(f"qemu-img snapshot -c (internal), 1 GiB:       median {ms(med(internal))}")
print(f"qemu-img create -b (overlay):                 median {ms(med(overlay))}")
print(f"ratio running snapshot (root only) / qemu-img create -b: {med(running_root) / med(overlay):.1f}x")
print(f"ratio running snapshot (root only) / qemu-img snapshot -c: {med(running_root) / med(internal):.1f}x")
print(f"ratio restore / qemu-img create -b: {med(restores) / med(overlay):.1f}x")
PY
