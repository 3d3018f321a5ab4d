#!/usr/bin/env bash
# Installs what vman needs on a Debian machine (as root): QEMU with a
# matching qemu-img, the tools scripts/build_boot_disk.sh uses, wrk for
# the benchmarks, python3-venv for scripts/fuzz.sh (which installs its
# pinned schemathesis into target/fuzz-venv itself), user-mode networking
# (passt, socat for the slirp metadata relay, nftables for the guard table,
# iproute2), openssh-client (the debian guest's SSH test), bridge networking
# (dnsmasq-base), the web console's build and browser tests (nodejs and
# npm to build ui/, chromium and chromium-driver for tests/ui), etcd and
# protoc for the cluster (tests start their own members), xfsprogs (the
# reflink figure of bench/clones.sh on a loop XFS), and the
# vman-qemu and vman-passt users (QEMU and passt run as them). Safe to run
# again: it only installs what is missing.
set -euo pipefail

need=()
have() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }
for pkg in fdisk dosfstools mtools syslinux syslinux-common busybox-static cpio kmod \
           wrk curl ca-certificates xz-utils python3-venv \
           passt socat nftables iproute2 openssh-client dnsmasq-base \
           chromium chromium-driver etcd-server etcd-client protobuf-compiler xfsprogs; do
    have "$pkg" || need+=("$pkg")
done
# Node from Debian unless a node and npm are already there (e.g. NodeSource).
if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
    need+=(nodejs npm)
fi

qemu_ok() {
    command -v qemu-system-x86_64 >/dev/null && command -v qemu-img >/dev/null || return 1
    # Same version for both, or qemu-img may not read what QEMU writes.
    local a b
    a=$(qemu-system-x86_64 --version | head -n1 | awk '{print $4}')
    b=$(qemu-img --version | head -n1 | awk '{print $3}')
    [ "$a" = "$b" ]
}

if [ "$(id -u)" -ne 0 ]; then
    if ! qemu_ok || [ "${#need[@]}" -gt 0 ]; then
        echo "setup: run as root to install: qemu-system-x86 qemu-utils ${need[*]}" >&2
        exit 1
    fi
    exit 0
fi

export DEBIAN_FRONTEND=noninteractive
if ! qemu_ok || [ "${#need[@]}" -gt 0 ]; then
    echo "setup: apt-get update"
    apt-get update -qq
fi
if [ "${#need[@]}" -gt 0 ]; then
    echo "setup: installing ${need[*]}"
    apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
    # The etcd-server package enables an etcd service on 2379 where systemd
    # runs; vman's cluster tests start their own members, and a cluster
    # user configures theirs: one installed just now is stopped again.
    if [[ " ${need[*]} " == *" etcd-server "* ]] && [ -d /run/systemd/system ]; then
        systemctl disable --now etcd.service >/dev/null 2>&1 || true
    fi
fi
if ! qemu_ok; then
    # Some images ship a newer qemu-utils than the distribution's
    # qemu-system-x86, and the two refuse to be installed together: pin
    # qemu-img to the emulator's version.
    v=$(apt-cache policy qemu-system-x86 | awk '/Candidate:/ {print $2}')
    echo "setup: installing qemu-system-x86 and qemu-utils $v"
    apt-get install -y -qq --no-install-recommends --allow-downgrades \
        "qemu-system-x86=$v" "qemu-utils=$v" "qemu-block-extra=$v" >/dev/null
fi
qemu_ok || { echo "setup: qemu-system-x86_64 and qemu-img still missing or mismatched" >&2; exit 1; }
# QEMU runs as this unprivileged user (VMAN_QEMU_USER): no home, no shell,
# no password, its own group, in no other group.
if ! getent passwd vman-qemu >/dev/null; then
    echo "setup: creating system user vman-qemu"
    useradd --system --user-group --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin vman-qemu
fi
# passt runs as this user (VMAN_PASST_USER), not QEMU's: the nftables guard
# keeps its connections off the host's own addresses.
if ! getent passwd vman-passt >/dev/null; then
    echo "setup: creating system user vman-passt"
    useradd --system --user-group --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin vman-passt
fi
echo "setup: $(qemu-system-x86_64 --version | head -n1)"
