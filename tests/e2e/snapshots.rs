//! Snapshots of a stopped VM's root disk with a real tiny guest: the guest
//! writes a marker into its root disk (`/dev/vda`, sector 1000: the unused
//! gap between the MBR and the first partition at 1 MiB), the VM is
//! stopped and snapshotted, boots again from the new backing chain and
//! still reads the marker, overwrites it, is stopped and restored, and the
//! third boot reads the original marker again. Running VMs are refused.

use std::path::Path;
use std::process::Command;

use serde_json::json;

use crate::harness::{Vman, GUEST};

/// Runs `command` in the guest shell and returns its output line (joined),
/// followed by a marker the shell computes (the typed echo never matches).
fn run(vman: &Vman, id: &str, command: &str, tag: &str) -> String {
    vman.type_line(
        id,
        &format!("echo \"$({command} 2>&1 | tr '\\n' ' ') {tag}-$((40+2))\""),
    );
    let marker = format!("{tag}-42");
    vman.wait_console(id, &marker, 1);
    vman.console(id)
        .lines()
        .filter(|l| l.contains(&marker))
        .collect::<Vec<_>>()
        .join("\n")
}

/// What the guest reads at sector 1000 of its root disk.
fn read_marker(vman: &Vman, id: &str, tag: &str) -> String {
    run(
        vman,
        id,
        "dd if=/dev/vda bs=512 skip=1000 count=1 2>/dev/null | head -c 5",
        tag,
    )
}

fn write_marker(vman: &Vman, id: &str, marker: &str, tag: &str) {
    let out = run(
        vman,
        id,
        &format!("printf {marker} | dd of=/dev/vda bs=512 seek=1000 conv=sync 2>/dev/null; sync; echo written"),
        tag,
    );
    assert!(out.contains("written"), "{out}");
}

fn boot(vman: &Vman, id: &str, boots: usize) {
    let (s, b) = vman.start_vm(id);
    assert_eq!(s, 202, "{b}");
    vman.wait_console(id, "vman-guest: ready", boots);
}

fn stop(vman: &Vman, id: &str) {
    let (s, b) = vman.post(&format!("/vms/{id}/actions/stop"), json!({}));
    assert!(s == 200 || s == 202, "{s} {b}");
    vman.wait_state(id, "stopped", GUEST);
}

/// The bytes at sector 1000 of an image (its whole chain), read on the host.
fn host_marker(image: &Path) -> String {
    let out = Command::new("qemu-io")
        .args(["-r", "-f", "qcow2", "-c", "read -v 512000 5"])
        .arg(image)
        .output()
        .expect("qemu-io");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn a_restored_snapshot_boots_with_the_root_disk_data_it_had() {
    let vman = Vman::builder()
        .with_tiny_default()
        .env("VMAN_ACCEL", "tcg")
        .start();
    vman.template("tiny", 256);
    let (s, b) = vman.create_vm(json!({"template_name": "tiny", "name": "sn"}));
    assert_eq!(s, 201, "{b}");

    boot(&vman, "sn", 1);
    write_marker(&vman, "sn", "AAAAA", "w1");
    // A running VM: refused, nothing made.
    let reply = vman.post("/vms/sn/snapshots", json!({"name": "before"}));
    assert_eq!(reply.0, 400, "{}", reply.1);
    assert_eq!(reply.1["code"], "not_stopped");
    assert!(reply.1["detail"]
        .as_str()
        .unwrap()
        .contains("stop the VM first"));
    assert!(!vman.vm_dir("sn").join("snapshots/before.qcow2").exists());
    stop(&vman, "sn");

    let (s, snap) = vman.post(
        "/vms/sn/snapshots",
        json!({"name": "before", "description": "A"}),
    );
    assert_eq!(s, 201, "{snap}");
    let snap_file = vman.vm_dir("sn").join("snapshots/before.qcow2");
    assert!(host_marker(&snap_file).contains("AAAAA"));

    // Boots from the chain (root overlay -> snapshot -> ...): the marker is there.
    boot(&vman, "sn", 2);
    assert!(read_marker(&vman, "sn", "r1").contains("AAAAA"));
    write_marker(&vman, "sn", "BBBBB", "w2");
    let reply = vman.post("/vms/sn/snapshots/before/restore", json!({}));
    assert_eq!(reply.0, 400, "{}", reply.1);
    assert_eq!(reply.1["code"], "not_stopped");
    let reply = vman.call("DELETE", "/vms/sn/snapshots/before", None);
    assert_eq!(reply.0, 400, "{}", reply.1);
    assert_eq!(reply.1["code"], "not_stopped");
    assert!(vman.vm_dir("sn").join("snapshots/before.qcow2").exists());
    stop(&vman, "sn");
    let root = vman.vm_dir("sn").join("root.qcow2");
    assert!(host_marker(&root).contains("BBBBB"));
    // The snapshot file did not change.
    assert!(host_marker(&snap_file).contains("AAAAA"));

    let (s, b) = vman.post("/vms/sn/snapshots/before/restore", json!({}));
    assert_eq!(s, 200, "{b}");
    assert!(host_marker(&root).contains("AAAAA"));
    boot(&vman, "sn", 3);
    let back = read_marker(&vman, "sn", "r2");
    assert!(back.contains("AAAAA") && !back.contains("BBBBB"), "{back}");
    let (s, b) = vman.post("/vms/sn/actions/stop", json!({"force": true}));
    assert_eq!(s, 202, "{b}");
    vman.wait_state("sn", "stopped", GUEST);
}
