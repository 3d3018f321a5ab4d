#!/usr/bin/env bash
# Sets up everything and runs vman: packages, a release build, the `tiny`
# default boot disk (built once), then `vman serve` on 127.0.0.1:8000 with
# ./storage as its storage. Extra arguments go to `vman serve`.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
cargo build --release
disk="$PWD/storage/templates/tiny.qcow2"
[ -f "$disk" ] || ./scripts/build_boot_disk.sh --flavor tiny --output "$disk"
export VMAN_STORAGE_PATH="${VMAN_STORAGE_PATH:-$PWD/storage}"
export VMAN_DEFAULT_BOOT_DISK="${VMAN_DEFAULT_BOOT_DISK:-$disk}"
exec ./target/release/vman serve "$@"
