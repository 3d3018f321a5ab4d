#!/usr/bin/env bash
# The debian guest (scripts/build_boot_disk.sh --flavor debian, stock
# cloud-init), raw QEMU under TCG with vman's slirp metadata layout and
# SMBIOS serial ds=nocloud-net;s=http://169.254.169.254/nocloud/, served by
# bench/nocloud.py on the guestfwd unix socket: start -> first metadata
# request, start -> `ssh -i key -p PORT root@127.0.0.1 hostname` prints the
# served hostname (checked). Also the image's build time (warm cache; the
# first build on a machine downloads ~100 MB more).
# Usage: bench/debian_ssh.sh [ROUNDS] [IMAGE]   (needs root; default 2 rounds;
# IMAGE given: no build)
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-2}
IMAGE=${2:-}
work=$(mktemp -d /tmp/vman-bench-debian.XXXXXX)
trap 'rm -rf "$work"' EXIT
if [ -z "$IMAGE" ]; then
    IMAGE="$work/debian.qcow2"
    t0=$(date +%s%N)
    ./scripts/build_boot_disk.sh --flavor debian --output "$IMAGE" >/dev/null
    t1=$(date +%s%N)
    echo "debian image build: $(((t1 - t0) / 1000000000)) s, $(($(stat -c %s "$IMAGE") / 1048576)) MiB"
fi
python3 bench/netguest.py ssh "$IMAGE" "$work/run" "$ROUNDS"
