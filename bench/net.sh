#!/usr/bin/env bash
# User-mode network backends, raw QEMU (before vman drives them): the SAME
# tiny guest booted ROUNDS times under each of slirp (QEMU -netdev user with
# vman's metadata layout: net 169.254.169.0/24 + guestfwd to a unix socket)
# and passt (`passt --no-map-gw -a 10.0.2.15 -n 24 -g 10.0.2.2 -t ...`,
# QEMU -netdev stream), alternating, in this run. Baseline: slirp; each
# figure is printed for both with the passt/slirp ratio:
#  - start (process spawn) -> DHCP address marker on the serial console;
#  - host -> guest and guest -> host TCP throughput through a forwarded host
#    port (busybox nc + dd in the guest, MIB MiB per transfer);
#  - slirp only: the guest reads its meta-data at 169.254.169.254 (checked in
#    every slirp boot).
# All under TCG (the guest's CPU is the bottleneck; ratios matter, not MiB/s).
# Usage: bench/net.sh [ROUNDS] [MIB]   (default 3 rounds, 64 MiB)
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-3}
MIB=${2:-64}
for c in qemu-system-x86_64 qemu-img passt socat python3; do
    command -v "$c" >/dev/null || { echo "bench/net.sh: $c missing (scripts/setup.sh installs it)" >&2; exit 1; }
done
work=$(mktemp -d /tmp/vman-bench-net.XXXXXX)
trap 'rm -rf "$work"' EXIT
./scripts/build_boot_disk.sh --flavor tiny --output "$work/tiny.qcow2" >/dev/null
python3 bench/netguest.py net "$work/tiny.qcow2" "$work/run" "$ROUNDS" "$MIB"
