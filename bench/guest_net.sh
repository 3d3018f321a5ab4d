#!/usr/bin/env bash
# The tiny guest's network through vman (not raw QEMU: bench/net.sh has
# that): for each user-mode backend (slirp, then passt, each with its own
# `vman serve` on the same storage), ROUNDS starts of a fresh VM, timed from
# POST .../start to each console marker:
#   boot     `vman-guest: boot ok`       (the baseline: userspace reached)
#   ip       `vman-guest: ip <addr>`     (DHCP lease through the backend)
#   metadata `vman-guest: metadata ...`  (fetched from 169.254.169.254; slirp
#                                          only: passt has no metadata channel)
# Medians, and the ratio of each to the boot marker of the same backend.
# Usage: bench/guest_net.sh [ROUNDS]
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-5}
. bench/lib.sh
bench_init guest-net

for backend in slirp passt; do
    if [ -n "$server" ]; then kill "$server"; wait "$server" 2>/dev/null || true; server=""; fi
    export VMAN_USER_NET=$backend VMAN_NETWORK_MODE=user
    bench_serve
    curl -sf -X POST "$api/templates" -H 'Content-Type: application/json' \
        -d '{"name":"b","cpu_count":1,"ram_mib":256}' >/dev/null || true
    python3 - "$api" "$backend" "$ROUNDS" <<'PY'
import json, statistics, sys, time, urllib.request
api, backend, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])
markers = {"boot": "vman-guest: boot ok", "ip": "vman-guest: ip ",
           "metadata": "vman-guest: metadata "}
if backend == "passt":
    del markers["metadata"]

def call(method, path, body=None):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(api + path, data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return r.read()

seen = {k: [] for k in markers}
for i in range(rounds):
    name = f"{backend}-{i}"
    call("POST", "/vms", {"template_name": "b", "name": name})
    t0 = time.monotonic()
    call("POST", f"/vms/{name}/actions/start", {})
    left = dict(markers)
    while left:
        if time.monotonic() - t0 > 300:
            sys.exit(f"{name}: markers {list(left)} not seen in 300 s")
        text = call("GET", f"/vms/{name}/console").decode(errors="replace")
        now = time.monotonic() - t0
        for k, m in list(left.items()):
            if m in text:
                seen[k].append(now)
                del left[k]
        time.sleep(0.05)
    call("POST", f"/vms/{name}/actions/stop", {"force": True})
    call("DELETE", f"/vms/{name}")
boot = statistics.median(seen["boot"])
for k, v in seen.items():
    med = statistics.median(v)
    print(f"{backend:6} start -> {k:9} median {med:6.2f} s  "
          f"({med / boot:4.2f}x the boot marker)  all: "
          + " ".join(f"{x:.2f}" for x in v))
PY
done
