#!/usr/bin/env bash
# bench/copy.sh - provisioning a default boot disk (1 GiB of real data in a
# qcow2): vman's copy against `cp` and Python's `shutil.copy2` on the same
# file and filesystem, then vman's reflink copy and overlay on a loop-mounted
# XFS (or btrfs) image.
#
# Usage: bench/copy.sh            (as root for the loop filesystem part)
# Environment:
#   SIZE_MIB   data in the source image (default 1024)
#   RUNS       runs per measurement, the best is kept (default 3)
#   BENCH_DIR  where the work folder is made (default /var/tmp; not a tmpfs,
#              so that the copy really goes to disk)
#   QEMU_IMG   qemu-img binary (default qemu-img)
#
# Every run starts with the destination removed and a `sync`. The source
# stays in the page cache (all tools read it warm). vman's copy fsyncs the
# file and its folder before it returns (crash safety); `cp` and
# `shutil.copy2` do not, so `cp + fsync` (cp then `sync <file>`) is printed
# too for an equal-work comparison. vman's figures are for the whole
# `examples/provision` process (exec, `qemu-img info` of the source, the
# copy, fsync, rename); its own report (`elapsed_ms`, the copy alone) is
# printed alongside.
#
# Everything made (files, loop device, mount) is removed on exit.
set -Eeuo pipefail

SIZE_MIB=${SIZE_MIB:-1024}
RUNS=${RUNS:-3}
QEMU_IMG=${QEMU_IMG:-qemu-img}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

log() { printf '%s\n' "$*" >&2; }
die() { log "copy.sh: $*"; exit 1; }

command -v "$QEMU_IMG" >/dev/null || die "$QEMU_IMG not found; install qemu-utils"
command -v python3 >/dev/null || die "python3 not found"

log "building examples/provision (release)..."
(cd "$ROOT" && cargo build --quiet --release --example provision) || die "cargo build failed"
PROVISION=$ROOT/target/release/examples/provision

WORK=$(mktemp -d "${BENCH_DIR:-/var/tmp}/vman-bench.XXXXXX")
MNT=$WORK/mnt
LOOP=""
cleanup() {
    set +e
    if mountpoint -q "$MNT" 2>/dev/null; then umount "$MNT"; fi
    if [[ -n $LOOP ]]; then losetup -d "$LOOP"; fi
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

now_ns() { local t=$EPOCHREALTIME; echo "${t/./}000"; }

# best_ms DEST CMD...: runs CMD $RUNS times (DEST removed and sync before
# each), prints the best wall time in ms; the best run's stdout is kept in
# $WORK/best.out.
best_ms() {
    local dest=$1; shift
    local best="" i t0 t1 ms
    for ((i = 0; i < RUNS; i++)); do
        rm -f "$dest"
        sync
        t0=$(now_ns)
        "$@" >"$WORK/last.out"
        t1=$(now_ns)
        ms=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.2f", (b - a) / 1e6 }')
        if [[ -z $best ]] || awk -v m="$ms" -v b="$best" 'BEGIN { exit !(m < b) }'; then
            best=$ms
            mv "$WORK/last.out" "$WORK/best.out"
        fi
    done
    rm -f "$dest"
    echo "$best"
}

mbps() { awk -v bytes="$1" -v ms="$2" 'BEGIN { printf "%.0f", bytes / 1e6 / (ms / 1000) }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'; }
json_field() { python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])' "$WORK/best.out" "$1"; }

cp_fsync() { cp "$1" "$2" && sync "$2"; }
shutil_copy2() { python3 -c 'import shutil, sys; shutil.copy2(sys.argv[1], sys.argv[2])' "$1" "$2"; }
vman_provision() { "$PROVISION" "$QEMU_IMG" "$1" "$2" "$3"; }

log "making a qcow2 with ${SIZE_MIB} MiB of random data in $WORK..."
head -c "$((SIZE_MIB * 1024 * 1024))" /dev/urandom >"$WORK/src.raw"
"$QEMU_IMG" convert -f raw -O qcow2 "$WORK/src.raw" "$WORK/src.qcow2"
rm -f "$WORK/src.raw"
SRC=$WORK/src.qcow2
BYTES=$(stat -c %s "$SRC")
DST=$WORK/vms/bench/root.qcow2
mkdir -p "$(dirname "$DST")"
cat "$SRC" >/dev/null # warm for everyone

FS=$(stat -f -c %T "$WORK")
echo "== copy of a ${SIZE_MIB} MiB-data qcow2 ($BYTES bytes) on $FS, best of $RUNS"
cp_ms=$(best_ms "$DST" cp "$SRC" "$DST")
cpf_ms=$(best_ms "$DST" cp_fsync "$SRC" "$DST")
py_ms=$(best_ms "$DST" shutil_copy2 "$SRC" "$DST")
vm_ms=$(best_ms "$DST" vman_provision "$SRC" "$DST" copy)
vm_method=$(json_field method)
vm_inner=$(json_field elapsed_ms)
printf '%-22s %9s ms %7s MB/s\n' "cp" "$cp_ms" "$(mbps "$BYTES" "$cp_ms")"
printf '%-22s %9s ms %7s MB/s\n' "cp + fsync" "$cpf_ms" "$(mbps "$BYTES" "$cpf_ms")"
printf '%-22s %9s ms %7s MB/s\n' "shutil.copy2" "$py_ms" "$(mbps "$BYTES" "$py_ms")"
printf '%-22s %9s ms %7s MB/s   (method %s; provision() alone %.1f ms)\n' \
    "vman copy (+fsync)" "$vm_ms" "$(mbps "$BYTES" "$vm_ms")" "$vm_method" "$vm_inner"
echo "ratio vman/cp speed:         $(ratio "$cp_ms" "$vm_ms")  (target >= 0.9)"
echo "ratio vman/(cp + fsync):     $(ratio "$cpf_ms" "$vm_ms")"
echo "ratio vman/shutil.copy2:     $(ratio "$py_ms" "$vm_ms")"
ov_ms=$(best_ms "$DST" vman_provision "$SRC" "$DST" overlay)
printf '%-22s %9s ms   (provision() alone %.1f ms; target < 50)\n' "vman overlay on $FS" "$ov_ms" "$(json_field elapsed_ms)"

# ---- reflink on a loop-mounted XFS or btrfs
echo "== reflink copy and overlay on a loop filesystem"
reflink_fs() {
    if [[ $(id -u) != 0 ]]; then log "not root"; return 1; fi
    if ! command -v mkfs.xfs >/dev/null && ! command -v mkfs.btrfs >/dev/null; then
        log "installing xfsprogs..."
        { apt-get install -y -q xfsprogs >/dev/null 2>&1 ||
            { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q xfsprogs >/dev/null 2>&1; }; } ||
            { log "cannot install xfsprogs"; return 1; }
    fi
    truncate -s "$((SIZE_MIB * 3 + 1024))M" "$WORK/fs.img"
    if command -v mkfs.xfs >/dev/null; then
        mkfs.xfs -q -m reflink=1 "$WORK/fs.img" || return 1
        LOOPFS=xfs
    else
        mkfs.btrfs -q "$WORK/fs.img" || return 1
        LOOPFS=btrfs
    fi
    LOOP=$(losetup -f --show "$WORK/fs.img") || { log "no loop device"; return 1; }
    mkdir -p "$MNT"
    mount "$LOOP" "$MNT" || { log "mount failed"; return 1; }
}
if reflink_fs; then
    cp "$SRC" "$MNT/src.qcow2"
    mkdir -p "$MNT/vms/bench"
    LDST=$MNT/vms/bench/root.qcow2
    rf_ms=$(best_ms "$LDST" vman_provision "$MNT/src.qcow2" "$LDST" copy)
    rf_method=$(json_field method)
    rf_inner=$(json_field elapsed_ms)
    rov_ms=$(best_ms "$LDST" vman_provision "$MNT/src.qcow2" "$LDST" overlay)
    rov_inner=$(json_field elapsed_ms)
    rcp_ms=$(best_ms "$LDST" cp "$MNT/src.qcow2" "$LDST")
    printf '%-22s %9s ms   (method %s; provision() alone %.1f ms; target < 50)\n' \
        "vman copy on $LOOPFS" "$rf_ms" "$rf_method" "$rf_inner"
    printf '%-22s %9s ms   (provision() alone %.1f ms; target < 50)\n' \
        "vman overlay on $LOOPFS" "$rov_ms" "$rov_inner"
    printf '%-22s %9s ms   (coreutils cp reflinks by default too)\n' "cp on $LOOPFS" "$rcp_ms"
else
    echo "skipped: no loop-mounted XFS/btrfs here (see the message above)"
fi
