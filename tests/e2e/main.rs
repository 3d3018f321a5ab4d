//! End-to-end tests: the real `vman` binary starts real QEMU guests under
//! TCG from the `tiny` boot disk this run builds with
//! `scripts/build_boot_disk.sh`. They wait for what the guest itself prints
//! on its serial console, never for a fixed time.

mod adoption;
mod bridge;
#[path = "../common/mod.rs"]
mod common;
mod console_ws;
mod debian_ssh;
mod disks;
mod faults;
mod full_disk;
mod harness;
mod hostile_images;
mod lifecycle;
mod metadata;
mod migrate;
mod network_user;
mod privilege;
mod rootdisk;
mod snapshots;
mod supervision;
