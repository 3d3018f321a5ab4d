#!/usr/bin/env bash
# build_boot_disk.sh - build a bootable qcow2 boot disk (template) for vman.
#
# Usage: scripts/build_boot_disk.sh [--flavor tiny|debian|alpine] [--output PATH]
#                                   [--size SIZE] [--help]
#
# Flavors
#   tiny    Debian's cloud kernel + a busybox initramfs on a FAT partition booted
#           by syslinux (BIOS/MBR). ~16 MB, boots in a few seconds under TCG.
#           Built WITHOUT root and WITHOUT loop devices (only needs Debian's apt
#           mirror for the kernel .deb, cached in $VMAN_CACHE_DIR).
#           Default output: storage/templates/tiny.qcow2, default size 64M.
#   debian  debootstrap --variant=minbase (Debian bookworm) on ext4 + extlinux,
#           linux-image-cloud-amd64, ifupdown DHCP on eth0, openssh-server,
#           stock cloud-init (NoCloud; hostname + root's SSH keys from the
#           metadata service, see build_debian below), root autologin on
#           ttyS0. Needs root + loop devices; ~1.5-3 min with a warm cache.
#           Default output: storage/templates/debian-minimal.qcow2, size 2G.
#   alpine  (default) Alpine minirootfs + linux-virt + extlinux from
#           $ALPINE_MIRROR (default https://dl-cdn.alpinelinux.org/alpine),
#           $ALPINE_VERSION (default 3.20). Needs root + loop devices + the
#           mirror; the mirror is probed first and the build stops at once
#           (nothing left behind) when it does not answer.
#           Default output: storage/templates/alpine-minimal.qcow2, size 1G.
#
# The tiny guest (see scripts/tiny/) talks over the first serial port ttyS0
# (kernel cmdline console=ttyS0). Console markers, one per line:
#   vman-guest: boot ok hostname=<name>
#   vman-guest: disk added vdX        (every vd[a-z] present at boot, INCLUDING
#                                      the boot disk vda, and every hot-added one)
#   vman-guest: disk removed vdX
#   vman-guest: eth0 address <ip>     (only when a NIC exists and DHCP answers)
#   vman-guest: ip <ip>               (the same moment; then /etc/vman/net-up runs
#                                      /etc/vman/metadata if present)
#   busybox httpd serves /www on port 80; its index.html holds "vman-guest <hostname>"
#   vman-guest: ready                 (root shell on ttyS0 is open; type into it)
#   vman-guest: power button, powering off   (ACPI power button / QMP
#                                      system_powerdown; QEMU then exits by itself)
# Hostname of the tiny guest, first match wins:
#   1. kernel cmdline `vman.hostname=<name>`
#   2. SMBIOS OEM string:   qemu ... -smbios type=11,value=vman.hostname=<name>  (recommended)
#   3. SMBIOS system serial: qemu ... -smbios type=1,serial=<name>
#   4. `vman-guest`
#   Names must match [A-Za-z0-9._-]{1,64}, otherwise the next source is used.
# Typing into the shell: connect the serial port to a unix socket and log it:
#   -chardev socket,id=ser0,path=SOCK,server=on,wait=off,logfile=console.txt,logappend=on
#   -serial chardev:ser0
# then write "command\n" into SOCK after "vman-guest: ready".
# Disk hot-plug needs -machine q35 and a free PCIe root port created at start
# (-device pcie-root-port,id=rp1,chassis=1,slot=1), then QMP blockdev-add +
# device_add virtio-blk-pci,bus=rp1,... ; device_del to remove (the guest's
# pciehp waits ~5 s before releasing the device).
#
# Environment
#   VMAN_CACHE_DIR  download cache (default $HOME/.cache/vman)
#   DEBIAN_MIRROR   (default http://deb.debian.org/debian), DEBIAN_SUITE (default bookworm)
#   ALPINE_MIRROR, ALPINE_VERSION (see above)
#
# Output is written to a temporary file next to the destination and renamed at
# the end; on any failure, temporary files, mounts and loop devices are removed.
# The last line printed on success is: export VMAN_DEFAULT_BOOT_DISK=<absolute path>
set -Eeuo pipefail

PROG=build_boot_disk.sh
SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$SCRIPT_DIR/.." && pwd)
export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"
export LC_ALL=C

ALPINE_MIRROR=${ALPINE_MIRROR:-https://dl-cdn.alpinelinux.org/alpine}
ALPINE_VERSION=${ALPINE_VERSION:-3.20}
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
DEBIAN_SUITE=${DEBIAN_SUITE:-bookworm}
CACHE_DIR=${VMAN_CACHE_DIR:-${HOME:-/root}/.cache/vman}
SYSLINUX_MBR=/usr/lib/syslinux/mbr/mbr.bin

usage() {
    sed -n '2,/^set -euo pipefail$/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//'
}

die() {
    echo "$PROG: error: $*" >&2
    exit 1
}

# ---------------------------------------------------------------- arguments
flavor=alpine
output=""
size=""
while [ $# -gt 0 ]; do
    case "$1" in
        --flavor | --output | --size)
            [ $# -ge 2 ] || die "option $1 needs a value (see --help)"
            case "$1" in
                --flavor) flavor=$2 ;;
                --output) output=$2 ;;
                --size) size=$2 ;;
            esac
            shift 2
            ;;
        --flavor=*) flavor=${1#*=}; shift ;;
        --output=*) output=${1#*=}; shift ;;
        --size=*) size=${1#*=}; shift ;;
        -h | --help) usage; exit 0 ;;
        *) die "unknown argument '$1' (see --help)" ;;
    esac
done

case "$flavor" in
    tiny) default_name=tiny.qcow2; default_size=64M; min_mib=32 ;;
    debian) default_name=debian-minimal.qcow2; default_size=2G; min_mib=1024 ;;
    alpine) default_name=alpine-minimal.qcow2; default_size=1G; min_mib=256 ;;
    *) die "unknown flavor '$flavor' (expected one of: tiny, debian, alpine)" ;;
esac

size=${size:-$default_size}
if [[ ! "$size" =~ ^([1-9][0-9]*)([KMGT]?)$ ]]; then
    die "invalid size '$size' (expected a number with an optional K, M, G or T suffix, e.g. 64M or 2G)"
fi
case "${BASH_REMATCH[2]}" in
    "") mult=1 ;;
    K) mult=1024 ;;
    M) mult=$((1024 * 1024)) ;;
    G) mult=$((1024 * 1024 * 1024)) ;;
    T) mult=$((1024 * 1024 * 1024 * 1024)) ;;
esac
[ "${#BASH_REMATCH[1]}" -le 12 ] || die "invalid size '$size' (too large)"
size_bytes=$((BASH_REMATCH[1] * mult))
size_bytes=$((size_bytes / 1048576 * 1048576)) # whole MiB
[ "$size_bytes" -ge $((min_mib * 1048576)) ] || die "size '$size' is too small for the $flavor flavor (minimum ${min_mib}M)"

output=${output:-$REPO_ROOT/storage/templates/$default_name}
case "$output" in
    */) die "output '$output' is a directory, expected a file path" ;;
esac
[ -d "$output" ] && die "output '$output' is a directory, expected a file path"
out_dir=$(dirname -- "$output")
out_base=$(basename -- "$output")

# ---------------------------------------------------------------- cleanup
WORK=""
TMP_OUT=""
CREATED_DIR=""
MOUNTS=()
LOOPS=()
DONE=0

cleanup() {
    local rc=$?
    set +e
    trap - EXIT ERR INT TERM
    local i
    for ((i = ${#MOUNTS[@]} - 1; i >= 0; i--)); do
        umount -R "${MOUNTS[i]}" 2>/dev/null || umount -R -l "${MOUNTS[i]}" 2>/dev/null
    done
    for ((i = ${#LOOPS[@]} - 1; i >= 0; i--)); do
        losetup -d "${LOOPS[i]}" 2>/dev/null
    done
    [ -n "$WORK" ] && rm -rf --one-file-system -- "$WORK"
    [ -n "$TMP_OUT" ] && rm -f -- "$TMP_OUT"
    if [ "$DONE" != 1 ] && [ -n "$CREATED_DIR" ]; then
        rmdir -p -- "$CREATED_DIR" 2>/dev/null
    fi
    if [ "$rc" != 0 ] && [ "$DONE" != 1 ] && [ -n "$WORK" ]; then
        echo "$PROG: build of the $flavor boot disk failed; temporary files removed" >&2
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'echo "$PROG: error: command failed (line $LINENO): $BASH_COMMAND" >&2' ERR
trap 'exit 130' INT
trap 'exit 143' TERM

is_root() { [ "$(id -u)" = 0 ]; }

# ---------------------------------------------------------------- alpine probe
# Done before anything is created, so an unreachable mirror leaves nothing behind.
fetch() { # fetch URL FILE
    if command -v curl >/dev/null 2>&1; then
        curl -fsSL --connect-timeout 10 --retry 2 -o "$2" "$1"
    else
        wget -q -T 10 -O "$2" "$1"
    fi
}
if [ "$flavor" = alpine ]; then
    probe_url="$ALPINE_MIRROR/v$ALPINE_VERSION/releases/x86_64/latest-releases.yaml"
    probe_ok=0
    if command -v curl >/dev/null 2>&1; then
        curl -fsS --max-time 10 -o /dev/null "$probe_url" 2>/dev/null && probe_ok=1
    elif command -v wget >/dev/null 2>&1; then
        wget -q -T 10 -t 1 -O /dev/null "$probe_url" 2>/dev/null && probe_ok=1
    fi
    if [ "$probe_ok" != 1 ]; then
        echo "$PROG: error: Alpine mirror $ALPINE_MIRROR is not reachable (no answer for $probe_url); flavors that build offline: tiny, debian (--flavor tiny)" >&2
        exit 1
    fi
fi

# ---------------------------------------------------------------- output dir
if [ ! -d "$out_dir" ]; then
    # remember the top-most directory we create, to remove it on failure
    d=$out_dir
    while [ ! -e "$d" ] && [ "$d" != / ] && [ "$d" != . ]; do
        CREATED_DIR=$d
        d=$(dirname -- "$d")
    done
    if ! mkdir -p -- "$out_dir" 2>/dev/null; then
        CREATED_DIR=""
        die "cannot create output directory '$out_dir'"
    fi
    [ -n "$CREATED_DIR" ] && CREATED_DIR=$(cd "$out_dir" && pwd)
fi
out_dir=$(cd "$out_dir" && pwd)
output="$out_dir/$out_base"
TMP_OUT=$(mktemp "$out_dir/.$out_base.tmp.XXXXXX" 2>/dev/null) ||
    die "output directory '$out_dir' is not writable"
[ -w "$TMP_OUT" ] || die "output directory '$out_dir' is not writable"

WORK=$(mktemp -d "${TMPDIR:-/tmp}/vman-boot-disk.XXXXXX")
mkdir -p "$CACHE_DIR" 2>/dev/null || CACHE_DIR="$WORK/cache"
mkdir -p "$CACHE_DIR/debs"

# ---------------------------------------------------------------- helpers
STEP=0
STEPS=6
step() {
    STEP=$((STEP + 1))
    echo "[$STEP/$STEPS] $*"
}

# ensure_tools "cmd:package" ... ; a "cmd" starting with / is a file to check,
# "pkg:<name>" checks that the Debian package is installed.
ensure_tools() {
    local spec cmd pkg missing=()
    for spec in "$@"; do
        cmd=${spec%%:*}
        pkg=${spec#*:}
        case "$cmd" in
            pkg) dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null | grep -qx installed && continue ;;
            /*) [ -e "$cmd" ] && continue ;;
            *) command -v "$cmd" >/dev/null 2>&1 && continue ;;
        esac
        case " ${missing[*]-} " in *" $pkg "*) ;; *) missing+=("$pkg") ;; esac
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    if is_root && command -v apt-get >/dev/null 2>&1; then
        echo "      installing missing packages: ${missing[*]}"
        if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null; then
            DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null ||
                die "apt-get update failed"
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null ||
                die "cannot install packages: ${missing[*]}"
        fi
    else
        die "missing Debian packages: ${missing[*]} (install them with: apt-get install --no-install-recommends ${missing[*]}, or run this script as root)"
    fi
}

APT_OPTS=()
is_root && APT_OPTS=(-o APT::Sandbox::User=root)

# Download the newest linux-image-<version>-cloud-amd64 .deb (cached); sets KDEB.
fetch_cloud_kernel() {
    local kpkg ver file
    kpkg=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null |
        sed -n 's/^ *Depends: \(linux-image-[0-9][^ ]*-cloud-amd64\)$/\1/p' | head -n 1 || true)
    if [ -z "$kpkg" ] && is_root; then
        apt-get update -qq >/dev/null 2>&1 || true
        kpkg=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null |
            sed -n 's/^ *Depends: \(linux-image-[0-9][^ ]*-cloud-amd64\)$/\1/p' | head -n 1 || true)
    fi
    if [ -n "$kpkg" ]; then
        ver=$(apt-cache policy "$kpkg" 2>/dev/null | sed -n 's/^ *Candidate: //p' | head -n 1)
        file="$CACHE_DIR/debs/${kpkg}_${ver//:/%3a}_amd64.deb"
        if [ -n "$ver" ] && [ "$ver" != "(none)" ] && [ -s "$file" ] && dpkg-deb --info "$file" >/dev/null 2>&1; then
            echo "      using cached $(basename "$file")"
            KDEB=$file
            return 0
        fi
        mkdir -p "$WORK/dl"
        if (cd "$WORK/dl" && apt-get "${APT_OPTS[@]}" download -qq "$kpkg" >/dev/null 2>&1); then
            local got
            got=$(ls "$WORK"/dl/"$kpkg"_*.deb 2>/dev/null | head -n 1)
            if [ -n "$got" ]; then
                # unique temporary name: concurrent builds may share the cache
                mv -f "$got" "$CACHE_DIR/debs/.$(basename "$got").$$.part"
                mv -f "$CACHE_DIR/debs/.$(basename "$got").$$.part" "$CACHE_DIR/debs/$(basename "$got")"
                KDEB="$CACHE_DIR/debs/$(basename "$got")"
                echo "      downloaded $(basename "$got")"
                return 0
            fi
        fi
        echo "      warning: cannot download $kpkg, trying the cache" >&2
    fi
    KDEB=$(ls -t "$CACHE_DIR"/debs/linux-image-*-cloud-amd64_*.deb 2>/dev/null | head -n 1 || true)
    [ -n "$KDEB" ] || die "cannot find or download Debian's cloud kernel (linux-image-cloud-amd64); is the apt mirror reachable? (try: apt-get update)"
    echo "      using cached $(basename "$KDEB")"
}

# find_module MODDIR NAME -> path of NAME.ko (NAME with _ or -)
find_module() {
    local pat=${2//[_-]/[_-]}
    find "$1/kernel" \( -name "$pat.ko" -o -name "$pat.ko.*" \) -print -quit
}

human_size() { numfmt --to=iec-i --suffix=B "$1" 2>/dev/null || echo "$1 bytes"; }

finish() {
    chmod 644 "$TMP_OUT"
    mv -f -- "$TMP_OUT" "$output"
    TMP_OUT=""
    DONE=1
    local bytes
    bytes=$(stat -c %s "$output")
    echo "Boot disk ($flavor): $output"
    echo "Size: $(human_size "$bytes") file ($bytes bytes), virtual disk size $(human_size "$size_bytes")"
    echo "export VMAN_DEFAULT_BOOT_DISK=$output"
}

# ================================================================ tiny
build_tiny() {
    STEPS=6
    step "Checking tools (fdisk dosfstools mtools syslinux busybox-static cpio kmod qemu-utils)"
    ensure_tools sfdisk:fdisk mkfs.vfat:dosfstools mcopy:mtools syslinux:syslinux \
        "$SYSLINUX_MBR:syslinux-common" pkg:busybox-static cpio:cpio depmod:kmod \
        modinfo:kmod qemu-img:qemu-utils apt-get:apt dpkg-deb:dpkg gzip:gzip
    local bb=/bin/busybox
    [ -x "$bb" ] || bb=$(command -v busybox)
    if ldd "$bb" >/dev/null 2>&1 && ! ldd "$bb" 2>&1 | grep -q 'not a dynamic'; then
        die "$bb is not statically linked (install busybox-static)"
    fi

    step "Fetching Debian's cloud kernel"
    fetch_cloud_kernel
    mkdir -p "$WORK/kernel"
    dpkg-deb -x "$KDEB" "$WORK/kernel"
    local vmlinuz kver moddir
    vmlinuz=$(ls "$WORK"/kernel/boot/vmlinuz-* 2>/dev/null | head -n 1 || true)
    [ -f "$vmlinuz" ] || die "no kernel image in $KDEB"
    kver=${vmlinuz##*/vmlinuz-}
    moddir="$WORK/kernel/lib/modules/$kver"
    [ -d "$moddir" ] || moddir="$WORK/kernel/usr/lib/modules/$kver"
    [ -d "$moddir" ] || die "no modules for $kver in $KDEB"
    echo "      kernel $kver"

    step "Building the busybox initramfs"
    local root="$WORK/initramfs" tiny="$SCRIPT_DIR/tiny"
    mkdir -p "$root"/{bin,dev,proc,sys,run,tmp,root,etc/vman,etc/acpi/PWRF,var/log,usr,lib/modules/"$kver"}
    chmod 1777 "$root/tmp"
    chmod 700 "$root/root"
    ln -s bin "$root/sbin"
    ln -s ../bin "$root/usr/bin"
    ln -s ../bin "$root/usr/sbin"
    cp "$bb" "$root/bin/busybox"
    local a
    for a in $("$root/bin/busybox" --list); do
        [ "$a" = busybox ] || ln -sf busybox "$root/bin/$a"
    done
    install -m 755 "$tiny/init" "$root/init"
    install -m 644 "$tiny/inittab" "$root/etc/inittab"
    install -m 644 "$tiny/profile" "$root/etc/profile"
    install -m 755 "$tiny/shell" "$tiny/uevent" "$tiny/disk" "$tiny/udhcpc" "$tiny/metadata" "$root/etc/vman/"
    install -m 755 "$tiny/power-button" "$root/etc/acpi/PWRF/00000080"
    install -m 755 "$tiny/net-up" "$root/etc/vman/"
    echo 'root::0:0:root:/root:/bin/sh' >"$root/etc/passwd"
    echo 'root:x:0:' >"$root/etc/group"
    echo 'vman-guest' >"$root/etc/hostname"

    # modules + their dependencies (closure via modinfo), then depmod -b
    local queue=(virtio_pci virtio_blk virtio_net button evdev) seen=" " m f rel dep
    while [ ${#queue[@]} -gt 0 ]; do
        m=${queue[0]}
        queue=("${queue[@]:1}")
        case "$seen" in *" $m "*) continue ;; esac
        seen="$seen$m "
        if grep -Eq "/${m//[_-]/[_-]}\.ko" "$moddir/modules.builtin" 2>/dev/null; then
            continue
        fi
        f=$(find_module "$moddir" "$m")
        [ -n "$f" ] || die "module $m not found in kernel $kver"
        rel=${f#"$moddir"/}
        mkdir -p "$root/lib/modules/$kver/$(dirname "$rel")"
        cp "$f" "$root/lib/modules/$kver/$rel"
        for dep in $(modinfo -F depends "$f" | tr ',' ' '); do
            queue+=("$dep")
        done
    done
    echo "      modules:$seen"
    for f in modules.builtin modules.builtin.modinfo modules.order; do
        [ -f "$moddir/$f" ] && cp "$moddir/$f" "$root/lib/modules/$kver/"
    done
    depmod -b "$root" "$kver"
    [ -s "$root/lib/modules/$kver/modules.dep" ] || die "depmod produced no modules.dep"
    (cd "$root" && find . -mindepth 1 | sort | cpio --quiet -o -H newc -R 0:0) | gzip -9 -n >"$WORK/initrd.gz"
    echo "      initramfs $(human_size "$(stat -c %s "$WORK/initrd.gz")")"

    step "Formatting the FAT boot partition and installing syslinux"
    local part_bytes=$((size_bytes - 1048576)) fat=16 ptype=0e
    if [ "$part_bytes" -ge $((1024 * 1048576)) ]; then
        fat=32
        ptype=0c
    fi
    cp "$vmlinuz" "$WORK/vmlinuz"
    # no_timer_check: a TCG guest starved of CPU (a busy host, QEMU's low
    # CPU weight) misses the IO-APIC timer check and panics at boot
    # ("IO-APIC + timer doesn't work!"); the check proves nothing in a VM.
    cat >"$WORK/syslinux.cfg" <<EOF
DEFAULT vman
PROMPT 0
TIMEOUT 10
LABEL vman
  KERNEL /vmlinuz
  INITRD /initrd.gz
  APPEND console=ttyS0,115200 quiet loglevel=3 panic=10 no_timer_check
EOF
    truncate -s "$part_bytes" "$WORK/part.img"
    mkfs.vfat -F "$fat" -n VMANBOOT "$WORK/part.img" >/dev/null
    export MTOOLS_SKIP_CHECK=1
    syslinux --install "$WORK/part.img"
    mcopy -i "$WORK/part.img" "$WORK/vmlinuz" "$WORK/initrd.gz" "$WORK/syslinux.cfg" ::/

    step "Assembling the disk (MBR, partition table, boot partition)"
    truncate -s "$size_bytes" "$WORK/disk.raw"
    printf 'label: dos\nstart=2048, size=%d, type=%s, bootable\n' $((part_bytes / 512)) "$ptype" |
        sfdisk --quiet --no-reread --no-tell-kernel "$WORK/disk.raw" >/dev/null
    dd if="$WORK/part.img" of="$WORK/disk.raw" bs=1M seek=1 conv=notrunc,sparse status=none
    dd if="$SYSLINUX_MBR" of="$WORK/disk.raw" bs=440 count=1 conv=notrunc status=none

    step "Converting to qcow2"
    qemu-img convert -f raw -O qcow2 "$WORK/disk.raw" "$TMP_OUT"
    finish
}

# ================================================================ loop disk helpers (debian, alpine)
# new_loop_disk FS_LABEL: raw disk with one bootable Linux partition, formatted
# ext4, mounted at $WORK/mnt; sets LOOP, PART, ROOT_UUID.
new_loop_disk() {
    truncate -s "$size_bytes" "$WORK/disk.raw"
    echo 'label: dos
start=2048, type=83, bootable' | sfdisk --quiet --no-reread --no-tell-kernel "$WORK/disk.raw" >/dev/null
    LOOP=$(losetup -f --show -P "$WORK/disk.raw") || die "cannot attach a loop device (losetup -f)"
    LOOPS+=("$LOOP")
    PART="${LOOP}p1"
    local i=0
    while [ ! -b "$PART" ] && [ $i -lt 20 ]; do
        sleep 0.1
        i=$((i + 1))
    done
    # Some hosts (VMs/containers without udev) do not create the partition
    # device on their own: ask the kernel explicitly.
    [ -b "$PART" ] || partx -a "$LOOP" 2>/dev/null || true
    i=0
    while [ ! -b "$PART" ] && [ $i -lt 20 ]; do
        sleep 0.1
        i=$((i + 1))
    done
    [ -b "$PART" ] || die "partition device $PART did not appear (losetup -P / partx -a)"
    # extlinux (syslinux 6.04) cannot boot ext4 with the 64bit feature.
    mkfs.ext4 -q -L "$1" -O ^64bit,^metadata_csum "$PART"
    ROOT_UUID=$(blkid -s UUID -o value "$PART")
    mkdir -p "$WORK/mnt"
    mount "$PART" "$WORK/mnt"
    MOUNTS+=("$WORK/mnt")
}

bind_mounts() {
    local d
    for d in proc sys dev dev/pts; do
        mkdir -p "$WORK/mnt/$d"
        mount --bind "/$d" "$WORK/mnt/$d"
        MOUNTS+=("$WORK/mnt/$d")
    done
}

close_loop_disk() {
    sync
    local i
    for ((i = ${#MOUNTS[@]} - 1; i >= 0; i--)); do
        umount "${MOUNTS[i]}"
    done
    MOUNTS=()
    losetup -d "$LOOP"
    LOOPS=()
    dd if="$SYSLINUX_MBR" of="$WORK/disk.raw" bs=440 count=1 conv=notrunc status=none
}

# ================================================================ debian
# A guest that stock cloud-init configures (no vman-specific code inside):
# the NoCloud datasource finds its seed URL in the SMBIOS system serial
#   qemu ... -smbios type=1,serial=ds=nocloud-net;s=http://169.254.169.254/nocloud/
# (vman sets it when the VM has a metadata channel). It must be
# `nocloud-net`: bookworm's cloud-init 22.4 takes `ds=nocloud` as "local
# mode", loads the http seed in the network stage and then exits without
# applying it (DataSourceNone). cloud-init 22.x documents `nocloud-net` as
# the form for http(s) seeds (`nocloud` for / and file://); later releases
# document `nocloud` for both and keep `nocloud-net` as an alias (not
# checked here). Once eth0 has its
# DHCP lease, fetches meta-data (instance-id, local-hostname, public-keys),
# user-data and vendor-data from there. cloud-init then sets the hostname and
# writes the keys (meta-data public-keys and #cloud-config
# ssh_authorized_keys) to root's authorized_keys: there is no default user
# (`users: []`) and root may log in with a key (`disable_root: false`;
# sshd's stock PermitRootLogin prohibit-password). Only NoCloud and None are
# probed, so a VM without a seed boots without waiting on absent sources.
# Network: ifupdown, `auto eth0` by DHCP (net.ifnames=0: the first NIC is
# eth0), written here; cloud-init's own network rendering is off so the two
# never fight over eth0.
# Packages come from $DEBIAN_MIRROR through debootstrap's and apt's caches
# in $VMAN_CACHE_DIR (debootstrap/, debian-apt/): a second build downloads
# nothing.
build_debian() {
    STEPS=7
    is_root || die "the debian flavor needs root (loop devices, mount, chroot); use --flavor tiny without root"
    step "Checking tools (debootstrap extlinux e2fsprogs fdisk syslinux-common qemu-utils)"
    ensure_tools debootstrap:debootstrap extlinux:extlinux mkfs.ext4:e2fsprogs sfdisk:fdisk \
        losetup:mount partx:util-linux blkid:util-linux "$SYSLINUX_MBR:syslinux-common" qemu-img:qemu-utils

    step "Partitioning and formatting (ext4 on a loop device)"
    new_loop_disk vman-root
    local mnt="$WORK/mnt"

    step "debootstrap --variant=minbase $DEBIAN_SUITE + kernel, openssh, cloud-init"
    mkdir -p "$CACHE_DIR/debootstrap" "$CACHE_DIR/debian-apt/partial"
    debootstrap --variant=minbase --components=main --cache-dir="$CACHE_DIR/debootstrap" \
        "$DEBIAN_SUITE" "$mnt" "$DEBIAN_MIRROR" >"$WORK/debootstrap.log" 2>&1 || {
        tail -n 20 "$WORK/debootstrap.log" "$mnt/debootstrap/debootstrap.log" >&2 2>/dev/null
        die "debootstrap failed"
    }
    # The rest with apt inside the chroot (installing it through debootstrap's
    # --include breaks on dependency ordering); no services start meanwhile.
    # apt's download folder is the shared cache (bind mount), so packages are
    # fetched once per machine.
    # debootstrap leaves its .debs in the target (they are in its cache too)
    rm -f "$mnt"/var/cache/apt/archives/*.deb
    bind_mounts
    mount --bind "$CACHE_DIR/debian-apt" "$mnt/var/cache/apt/archives"
    MOUNTS+=("$mnt/var/cache/apt/archives")
    printf '#!/bin/sh\nexit 101\n' >"$mnt/usr/sbin/policy-rc.d"
    chmod 755 "$mnt/usr/sbin/policy-rc.d"
    cp /etc/resolv.conf "$mnt/etc/resolv.conf" 2>/dev/null || true
    # no documentation, man pages or translations in the image
    cat >"$mnt/etc/dpkg/dpkg.cfg.d/01-vman-nodoc" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
EOF
    # flock: concurrent builds share the apt cache (apt refuses a locked one)
    flock "$CACHE_DIR/debian-apt.lock" \
        chroot "$mnt" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        systemd-sysv udev dbus linux-image-cloud-amd64 initramfs-tools ifupdown isc-dhcp-client \
        openssh-server cloud-init cloud-guest-utils netbase iproute2 ca-certificates procps \
        >"$WORK/apt.log" 2>&1 || {
        tail -n 30 "$WORK/apt.log" >&2
        die "apt-get install in the Debian chroot failed"
    }
    rm -f "$mnt/usr/sbin/policy-rc.d"

    step "Configuring the system (cloud-init NoCloud, ssh, DHCP on eth0)"
    echo debian >"$mnt/etc/hostname"
    printf '127.0.0.1 localhost\n127.0.1.1 debian\n' >"$mnt/etc/hosts"
    echo "UUID=$ROOT_UUID / ext4 errors=remount-ro 0 1" >"$mnt/etc/fstab"
    # `auto` (not allow-hotplug): networking.service waits for the lease, and
    # cloud-init's network stage (which fetches the seed) runs after it.
    cat >"$mnt/etc/network/interfaces" <<'EOF'
source /etc/network/interfaces.d/*
auto lo
iface lo inet loopback
auto eth0
iface eth0 inet dhcp
EOF
    cat >"$mnt/etc/cloud/cloud.cfg.d/90-vman.cfg" <<'EOF'
# vman's debian guest (scripts/build_boot_disk.sh --flavor debian).
# Seed: SMBIOS serial ds=nocloud;s=http://169.254.169.254/nocloud/ (set by vman).
datasource_list: [NoCloud, None]
# No default user: keys go to root, which may log in with them (key only).
users: []
disable_root: false
ssh_pwauth: false
# eth0 by DHCP comes from /etc/network/interfaces
network: {config: disabled}
# minbase has no locales package
locale: false
# one host key type: RSA key generation alone costs seconds under TCG
ssh_genkeytypes: [ed25519]
EOF
    mkdir -p "$mnt/etc/systemd/system/serial-getty@ttyS0.service.d" "$mnt/etc/systemd/system/ssh.service.d"
    cat >"$mnt/etc/systemd/system/serial-getty@ttyS0.service.d/autologin.conf" <<'EOF'
[Service]
ExecStart=
ExecStart=-/sbin/agetty --autologin root --keep-baud 115200,57600,38400,9600 %I $TERM
EOF
    # One ed25519 host key, generated on first boot (cloud-init's ssh module,
    # or here when cloud-init did not run), never shared between VMs.
    cat >"$mnt/etc/systemd/system/ssh.service.d/hostkeys.conf" <<'EOF'
[Service]
ExecStartPre=
ExecStartPre=/bin/sh -c 'test -s /etc/ssh/ssh_host_ed25519_key || exec /usr/bin/ssh-keygen -q -t ed25519 -N "" -f /etc/ssh/ssh_host_ed25519_key'
ExecStartPre=/usr/sbin/sshd -t
EOF
    mkdir -p "$mnt/etc/ssh/sshd_config.d"
    echo 'HostKey /etc/ssh/ssh_host_ed25519_key' >"$mnt/etc/ssh/sshd_config.d/10-vman-hostkey.conf"
    # nothing periodic competes with the guest's work (apt, e2scrub)
    chroot "$mnt" systemctl mask apt-daily.timer apt-daily-upgrade.timer \
        e2scrub_all.timer e2scrub_reap.service >/dev/null 2>&1 || true
    rm -f "$mnt"/etc/ssh/ssh_host_*
    chroot "$mnt" passwd -d root >/dev/null
    chroot "$mnt" systemctl enable serial-getty@ttyS0.service >/dev/null 2>&1 || true
    : >"$mnt/etc/machine-id"
    rm -f "$mnt/var/lib/dbus/machine-id"
    rm -rf "$mnt"/var/lib/apt/lists/* "$mnt"/var/cache/apt/*.bin "$mnt"/var/log/*.log "$mnt"/var/lib/cloud/*
    # what debootstrap unpacked before the nodoc rules applied
    find "$mnt"/usr/share/doc -mindepth 1 ! -name copyright ! -type d -delete 2>/dev/null || true
    rm -rf "$mnt"/usr/share/man/* "$mnt"/usr/share/info/*
    find "$mnt"/usr/share/locale -mindepth 1 -maxdepth 1 ! -name locale.alias -exec rm -rf {} + 2>/dev/null || true

    step "Installing extlinux"
    local vmlinuz initrd
    vmlinuz=$(cd "$mnt/boot" && ls vmlinuz-* | sort -V | tail -n 1)
    initrd=$(cd "$mnt/boot" && ls initrd.img-* | sort -V | tail -n 1)
    if [ -z "$vmlinuz" ] || [ -z "$initrd" ]; then
        die "no kernel/initrd in the debootstrapped system"
    fi
    mkdir -p "$mnt/boot/extlinux"
    extlinux --install "$mnt/boot/extlinux" >/dev/null 2>&1
    cat >"$mnt/boot/extlinux/extlinux.conf" <<EOF
DEFAULT debian
PROMPT 0
TIMEOUT 10
LABEL debian
  LINUX /boot/$vmlinuz
  INITRD /boot/$initrd
  APPEND root=UUID=$ROOT_UUID ro console=ttyS0,115200 net.ifnames=0 quiet no_timer_check
EOF

    step "Unmounting"
    # free blocks become holes in disk.raw (loop passes discards through):
    # deleted files do not end up in the image
    umount "$mnt/var/cache/apt/archives"
    unset 'MOUNTS[${#MOUNTS[@]}-1]'
    fstrim "$mnt" 2>/dev/null || true
    close_loop_disk

    step "Converting to compressed qcow2"
    qemu-img convert -c -f raw -O qcow2 "$WORK/disk.raw" "$TMP_OUT"
    finish
}

# ================================================================ alpine
# NOTE: this path cannot be tested on the vman development machines (the
# Alpine mirror is not reachable from them); it follows the usual
# minirootfs + apk + extlinux recipe.
build_alpine() {
    STEPS=7
    is_root || die "the alpine flavor needs root (loop devices, mount, chroot); use --flavor tiny without root"
    step "Checking tools (extlinux e2fsprogs fdisk syslinux-common qemu-utils)"
    ensure_tools extlinux:extlinux mkfs.ext4:e2fsprogs sfdisk:fdisk losetup:mount \
        partx:util-linux blkid:util-linux "$SYSLINUX_MBR:syslinux-common" qemu-img:qemu-utils tar:tar

    step "Downloading the Alpine $ALPINE_VERSION minirootfs"
    local rel="$ALPINE_MIRROR/v$ALPINE_VERSION/releases/x86_64" tarball
    fetch "$rel/latest-releases.yaml" "$WORK/latest-releases.yaml" || die "cannot download $rel/latest-releases.yaml"
    tarball=$(sed -n 's/^ *file: \(alpine-minirootfs-[^ ]*-x86_64\.tar\.gz\)$/\1/p' "$WORK/latest-releases.yaml" | head -n 1)
    [ -n "$tarball" ] || die "no minirootfs in $rel/latest-releases.yaml"
    mkdir -p "$CACHE_DIR/alpine"
    if [ ! -s "$CACHE_DIR/alpine/$tarball" ]; then
        fetch "$rel/$tarball" "$CACHE_DIR/alpine/.$tarball.$$.part" || {
            rm -f "$CACHE_DIR/alpine/.$tarball.$$.part"
            die "cannot download $rel/$tarball"
        }
        mv -f "$CACHE_DIR/alpine/.$tarball.$$.part" "$CACHE_DIR/alpine/$tarball"
    fi

    step "Partitioning and formatting (ext4 on a loop device)"
    new_loop_disk alpine-root
    local mnt="$WORK/mnt"
    tar -xzf "$CACHE_DIR/alpine/$tarball" -C "$mnt"

    step "Installing linux-virt, openssh and base services (apk in chroot)"
    cp /etc/resolv.conf "$mnt/etc/resolv.conf"
    printf '%s\n' "$ALPINE_MIRROR/v$ALPINE_VERSION/main" "$ALPINE_MIRROR/v$ALPINE_VERSION/community" >"$mnt/etc/apk/repositories"
    bind_mounts
    chroot "$mnt" /sbin/apk add --no-progress -q alpine-base linux-virt openssh e2fsprogs ifupdown-ng chrony ||
        die "apk add failed in the Alpine chroot"

    step "Configuring the system"
    echo alpine >"$mnt/etc/hostname"
    echo "UUID=$ROOT_UUID / ext4 rw,relatime 0 1" >"$mnt/etc/fstab"
    printf 'auto lo\niface lo inet loopback\n\nauto eth0\niface eth0 inet dhcp\n' >"$mnt/etc/network/interfaces"
    grep -q '^ttyS0' "$mnt/etc/inittab" || echo 'ttyS0::respawn:/sbin/getty -L 115200 ttyS0 vt100' >>"$mnt/etc/inittab"
    grep -qx ttyS0 "$mnt/etc/securetty" 2>/dev/null || echo ttyS0 >>"$mnt/etc/securetty"
    chroot "$mnt" passwd -d root >/dev/null
    local svc
    for svc in devfs dmesg mdev hwdrivers; do chroot "$mnt" rc-update add "$svc" sysinit >/dev/null; done
    for svc in modules sysctl hostname bootmisc syslog networking; do chroot "$mnt" rc-update add "$svc" boot >/dev/null; done
    for svc in sshd chronyd acpid; do chroot "$mnt" rc-update add "$svc" default >/dev/null; done
    for svc in mount-ro killprocs savecache; do chroot "$mnt" rc-update add "$svc" shutdown >/dev/null; done
    : >"$mnt/etc/resolv.conf"

    step "Installing extlinux"
    mkdir -p "$mnt/boot/extlinux"
    extlinux --install "$mnt/boot/extlinux" >/dev/null 2>&1
    cat >"$mnt/boot/extlinux/extlinux.conf" <<EOF
DEFAULT alpine
PROMPT 0
TIMEOUT 10
LABEL alpine
  LINUX /boot/vmlinuz-virt
  INITRD /boot/initramfs-virt
  APPEND root=UUID=$ROOT_UUID modules=sd-mod,usb-storage,ext4,virtio_blk,virtio_pci rootfstype=ext4 console=ttyS0,115200 quiet no_timer_check
EOF
    close_loop_disk

    step "Converting to compressed qcow2"
    qemu-img convert -c -f raw -O qcow2 "$WORK/disk.raw" "$TMP_OUT"
    finish
}

echo "Building the $flavor boot disk -> $output (size $size)"
case "$flavor" in
    tiny) build_tiny ;;
    debian) build_debian ;;
    alpine) build_alpine ;;
esac
