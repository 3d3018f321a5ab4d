#!/usr/bin/env bash
# bench/clones.sh - POST /vms/{id}/clone through a release `vman serve`: a
# full clone (reflink when the filesystem can, else copy_file_range) and a
# linked clone (snapshot + qcow2 overlay) of a stopped VM whose root disk
# holds SIZE_MIB MiB of random data, against the same work done by hand on
# the same files: `cp --reflink=never` + fsync (vman fsyncs), `cp
# --reflink=always` where it works, `qemu-img create -b` (linked) and
# `qemu-img convert` (a full clone of a VM with snapshots is flattened).
#
# Usage: bench/clones.sh
# Environment:
#   SIZE_MIB   data in the source root disk (default 1024)
#   RUNS       runs per measurement, the best is kept (default 3)
#   BENCH_DIR  where the work folder is made (default /var/tmp, not a tmpfs)
#
# When run as root and mkfs.xfs or mkfs.btrfs is installed, the same is
# measured again with the storage on a loop-mounted XFS/btrfs image
# (reflink); otherwise that part says why it is skipped (nothing is
# installed). vman's times are whole HTTP requests (curl), including the
# fsyncs and the database transaction. Everything made (server, files,
# loop device, mount) is removed on exit.
set -Eeuo pipefail

SIZE_MIB=${SIZE_MIB:-1024}
RUNS=${RUNS:-3}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

log() { printf '%s\n' "$*" >&2; }
die() { log "clones.sh: $*"; exit 1; }
for tool in qemu-img curl python3; do
    command -v $tool >/dev/null || die "$tool not found"
done

log "building vman (release)..."
cargo build --quiet --release || die "cargo build failed"

WORK=$(mktemp -d "${BENCH_DIR:-/var/tmp}/vman-bench-clones.XXXXXX")
MNT=$WORK/mnt
LOOP=""
server=""
stop_server() {
    if [[ -n $server ]]; then kill "$server" 2>/dev/null; wait "$server" 2>/dev/null || true; fi
    server=""
}
cleanup() {
    set +e
    stop_server
    if mountpoint -q "$MNT" 2>/dev/null; then umount "$MNT"; fi
    if [[ -n $LOOP ]]; then losetup -d "$LOOP"; fi
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

now_ns() { local t=$EPOCHREALTIME; echo "${t/./}000"; }
ms_since() { awk -v a="$1" -v b="$(now_ns)" 'BEGIN { printf "%.2f", (b - a) / 1e6 }'; }
min() { awk -v a="$1" -v b="$2" 'BEGIN { print (b == "" || a < b) ? a : b }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'; }

log "making a qcow2 with ${SIZE_MIB} MiB of random data..."
head -c "$((SIZE_MIB * 1024 * 1024))" /dev/urandom >"$WORK/src.raw"
qemu-img convert -f raw -O qcow2 "$WORK/src.raw" "$WORK/src.qcow2"
rm -f "$WORK/src.raw"

# serve STORAGE: starts vman on STORAGE, sets $api.
serve() {
    local port
    port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
    api="http://127.0.0.1:$port"
    VMAN_STORAGE_PATH="$1" VMAN_LOG_DIR="$WORK/logs" VMAN_PORT=$port VMAN_NETWORK_MODE=none \
        VMAN_MAX_SNAPSHOTS=64 ./target/release/vman serve >>"$WORK/vman.out" 2>&1 &
    server=$!
    for _ in $(seq 1000); do curl -sf "$api/health" >/dev/null && return 0; sleep 0.01; done
    cat "$WORK/vman.out" >&2
    die "vman did not start"
}

# call METHOD PATH [JSON]: the request; fails unless 2xx.
call() {
    local out
    out=$(curl -s -o "$WORK/reply" -w '%{http_code}' -X "$1" -H 'content-type: application/json' \
        ${3:+--data "$3"} "$api$2")
    [[ $out == 2* ]] || die "$1 $2: $out $(cat "$WORK/reply")"
}

# timed_ms METHOD PATH JSON: wall time of one request in ms.
timed_ms() { local t0; t0=$(now_ns); call "$@"; ms_since "$t0"; }

# suite STORAGE LABEL: every measurement with vman's storage in STORAGE.
suite() {
    local storage=$1 label=$2 i t t0 best_full="" best_linked="" best_chain="" \
        best_cp="" best_cpr="" best_qcreate="" best_convert="" reflink=yes method
    serve "$storage"
    call POST /templates '{"name":"t","cpu_count":1,"ram_mib":128}'
    call POST /vms '{"template_name":"t","name":"src"}'
    # Its root disk, placed before its first start (used as is).
    mkdir -p "$storage/vms/src"
    cp "$WORK/src.qcow2" "$storage/vms/src/root.qcow2"
    sync
    local src=$storage/vms/src/root.qcow2 dst=$storage/baseline.qcow2
    for ((i = 0; i < RUNS; i++)); do
        sync
        best_full=$(min "$(timed_ms POST /vms/src/clone '{"name":"full"}')" "$best_full")
        call DELETE /vms/full
        sync
        t0=$(now_ns); cp --reflink=never "$src" "$dst"; sync "$dst"; t=$(ms_since "$t0")
        best_cp=$(min "$t" "$best_cp"); rm -f "$dst"; sync
        t0=$(now_ns)
        if cp --reflink=always "$src" "$dst" 2>/dev/null; then
            sync "$dst"; best_cpr=$(min "$(ms_since "$t0")" "$best_cpr")
        else reflink=no; fi
        rm -f "$dst"
    done
    # How the server copied the root disk (its log line of the last clone).
    method=$(grep -o 'root disk by [a-z_]*' "$WORK/vman.out" | tail -1 | awk '{print $4}')
    for ((i = 0; i < RUNS; i++)); do
        sync
        best_linked=$(min "$(timed_ms POST /vms/src/clone "{\"name\":\"linked$i\",\"linked\":true}")" "$best_linked")
        t0=$(now_ns)
        qemu-img create -q -f qcow2 -F qcow2 -b "$src" -u "$dst" "$((SIZE_MIB))M"; sync "$dst"
        best_qcreate=$(min "$(ms_since "$t0")" "$best_qcreate"); rm -f "$dst"
    done
    # src now has RUNS snapshots: a full clone flattens its chain.
    for ((i = 0; i < RUNS; i++)); do
        sync
        best_chain=$(min "$(timed_ms POST /vms/src/clone '{"name":"flat"}')" "$best_chain")
        call DELETE /vms/flat
        t0=$(now_ns); qemu-img convert -O qcow2 "$src" "$dst"; sync "$dst"
        best_convert=$(min "$(ms_since "$t0")" "$best_convert"); rm -f "$dst"
    done
    stop_server
    : >"$WORK/vman.out"
    echo "== $label: clone of a stopped VM with a ${SIZE_MIB} MiB-data root disk, best of $RUNS"
    printf '%-44s %9s ms   (method %s)\n' "vman full clone (POST, fsynced)" "$best_full" "${method:-?}"
    printf '%-44s %9s ms\n' "cp --reflink=never + fsync" "$best_cp"
    if [[ $reflink == yes ]]; then
        printf '%-44s %9s ms\n' "cp --reflink=always + fsync" "$best_cpr"
        echo "ratio full clone / cp --reflink=always:   $(ratio "$best_full" "$best_cpr")"
    else
        echo "cp --reflink=always: not supported on this filesystem (vman used copy_file_range)"
    fi
    echo "ratio full clone / (cp --reflink=never + fsync): $(ratio "$best_full" "$best_cp")"
    printf '%-44s %9s ms\n' "vman linked clone (snapshot + overlay)" "$best_linked"
    printf '%-44s %9s ms\n' "qemu-img create -b + fsync" "$best_qcreate"
    echo "ratio linked clone / qemu-img create -b:  $(ratio "$best_linked" "$best_qcreate")"
    echo "ratio full clone / linked clone:          $(ratio "$best_full" "$best_linked")"
    printf '%-44s %9s ms\n' "vman full clone of a VM with $RUNS snapshots" "$best_chain"
    printf '%-44s %9s ms\n' "qemu-img convert of that chain + fsync" "$best_convert"
    echo "ratio flattening clone / qemu-img convert: $(ratio "$best_chain" "$best_convert")"
}

FS=$(stat -f -c %T "$WORK")
suite "$WORK/storage" "$FS ($WORK)"

echo "== reflink: the same on a loop-mounted XFS or btrfs image"
loop_fs() {
    if [[ $(id -u) != 0 ]]; then log "not root"; return 1; fi
    local mkfs=""
    if command -v mkfs.xfs >/dev/null; then mkfs="mkfs.xfs -q -m reflink=1"
    elif command -v mkfs.btrfs >/dev/null; then mkfs="mkfs.btrfs -q"
    else log "neither mkfs.xfs (xfsprogs) nor mkfs.btrfs (btrfs-progs) is installed"; return 1; fi
    truncate -s "$((SIZE_MIB * 4 + 1024))M" "$WORK/fs.img"
    $mkfs "$WORK/fs.img" || return 1
    LOOP=$(losetup -f --show "$WORK/fs.img") || { log "no loop device"; return 1; }
    mkdir -p "$MNT"
    mount "$LOOP" "$MNT" || { log "mount failed"; return 1; }
}
if loop_fs; then
    suite "$MNT/storage" "$(stat -f -c %T "$MNT") on a loop device"
else
    echo "skipped: no loop-mounted reflink filesystem here (see the message above)"
fi
