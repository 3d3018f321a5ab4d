//! Clones with real tiny guests. The source guest writes a marker into its
//! root disk (`/dev/vda`, sector 1000, the gap before the first partition)
//! and into its data disk (`/dev/vdb`, sector 16); the VM is stopped and
//! cloned full and linked; source and both clones boot at once, each reads
//! both markers, each writes its own, and no VM sees another's write (in
//! the guests, then on the host after they stop). A running source is
//! cloned through a snapshot of all its disks and its clone boots beside it
//! with both markers.
//! Then a kill -9 of vman in the middle of a linked clone (fault point
//! `clone.after_copy`): after a restart nothing of the clone is left, the
//! source boots with its data, and the clone made again boots.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use serde_json::json;

use crate::harness::{Vman, GUEST};

/// Runs `command` in the guest shell; returns the console line(s) with the
/// marker the shell computes (the typed echo never matches).
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

const ROOT_AT: &str = "/dev/vda bs=512 skip=1000";
const DATA_AT: &str = "/dev/vdb bs=512 skip=16";

/// The 5 bytes the guest reads at `at` (`device bs skip`).
fn read5(vman: &Vman, id: &str, at: &str, tag: &str) -> String {
    run(
        vman,
        id,
        &format!("dd if={at} count=1 2>/dev/null | head -c 5"),
        tag,
    )
}

fn write5(vman: &Vman, id: &str, dev: &str, sector: u32, marker: &str, tag: &str) {
    let out = run(
        vman,
        id,
        &format!("printf {marker} | dd of={dev} bs=512 seek={sector} conv=sync,fsync 2>/dev/null; sync; echo written"),
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
    let (s, b) = vman.post(&format!("/vms/{id}/actions/stop"), json!({"force": true}));
    assert!(s == 200 || s == 202, "{s} {b}");
    vman.wait_state(id, "stopped", GUEST);
}

/// The 5 bytes at byte `offset` of a qcow2 image (its whole chain), on the host.
fn host_read(image: &Path, offset: u64) -> String {
    let out = Command::new("qemu-io")
        .args([
            "-r",
            "-U",
            "-f",
            "qcow2",
            "-c",
            &format!("read -v {offset} 5"),
        ])
        .arg(image)
        .output()
        .expect("qemu-io");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn disk_file(vman: &Vman, id: &str) -> std::path::PathBuf {
    vman.storage.join("disks").join(format!("{id}.qcow2"))
}

fn source_with_markers(vman: &Vman, id: &str, disk: &str, root_marker: &str, data_marker: &str) {
    vman.template("tiny", 256);
    let (s, b) = vman.create_vm(json!({"template_name": "tiny", "name": id}));
    assert_eq!(s, 201, "{b}");
    let (s, b) = vman.post("/disks", json!({"name": disk, "size": 1}));
    assert_eq!(s, 201, "{b}");
    let (s, b) = vman.post(&format!("/disks/{disk}/attach"), json!({"vm_id": id}));
    assert_eq!(s, 200, "{b}");
    boot(vman, id, 1);
    vman.wait_console(id, "vman-guest: disk added vdb", 1);
    write5(vman, id, "/dev/vda", 1000, root_marker, "w1");
    write5(vman, id, "/dev/vdb", 16, data_marker, "w2");
}

#[test]
fn full_and_linked_clones_boot_at_once_with_the_source_data_and_their_own_writes() {
    let vman = Vman::builder()
        .with_tiny_default()
        .env("VMAN_ACCEL", "tcg")
        .start();
    source_with_markers(&vman, "src", "sd", "ROOT1", "DATA1");
    // Running: cloned through one snapshot of its root and data disk; the
    // source keeps running, and the clone boots beside it with both markers.
    let (s, live) = vman.post("/vms/src/clone", json!({"name": "live"}));
    assert_eq!(s, 201, "{live}");
    assert_eq!(vman.vm("src")["state"], "running");
    boot(&vman, "live", 1);
    let root = read5(&vman, "live", ROOT_AT, "liver");
    assert!(root.contains("ROOT1"), "{root}");
    let data = read5(&vman, "live", DATA_AT, "lived");
    assert!(data.contains("DATA1"), "{data}");
    stop(&vman, "live");
    let (s, b) = vman.call("DELETE", "/vms/live", None);
    assert_eq!(s, 204, "{b}");
    stop(&vman, "src");

    let (s, full) = vman.post("/vms/src/clone", json!({"name": "full"}));
    assert_eq!(s, 201, "{full}");
    let (s, linked) = vman.post("/vms/src/clone", json!({"name": "linked", "linked": true}));
    assert_eq!(s, 201, "{linked}");

    let vms = ["src", "full", "linked"];
    for id in vms {
        let (s, b) = vman.start_vm(id);
        assert_eq!(s, 202, "{id}: {b}");
    }
    for (id, boots) in [("src", 2), ("full", 1), ("linked", 1)] {
        vman.wait_console(id, "vman-guest: ready", boots);
    }
    for id in vms {
        let root = read5(&vman, id, ROOT_AT, &format!("{id}r1"));
        assert!(root.contains("ROOT1"), "{id}: {root}");
        let data = read5(&vman, id, DATA_AT, &format!("{id}d1"));
        assert!(data.contains("DATA1"), "{id}: {data}");
    }
    write5(&vman, "full", "/dev/vda", 1000, "FULLR", "fw1");
    write5(&vman, "full", "/dev/vdb", 16, "FULLD", "fw2");
    write5(&vman, "linked", "/dev/vda", 1000, "LINKR", "lw1");
    write5(&vman, "linked", "/dev/vdb", 16, "LINKD", "lw2");
    for (id, root_want, data_want) in [
        ("src", "ROOT1", "DATA1"),
        ("full", "FULLR", "FULLD"),
        ("linked", "LINKR", "LINKD"),
    ] {
        let root = read5(&vman, id, ROOT_AT, &format!("{id}r2"));
        assert!(root.contains(root_want), "{id}: {root}");
        let data = read5(&vman, id, DATA_AT, &format!("{id}d2"));
        assert!(data.contains(data_want), "{id}: {data}");
    }
    for id in vms {
        stop(&vman, id);
    }
    // On the host: each VM's files hold its own writes only.
    for (id, disk, root_want, data_want) in [
        ("src", "sd", "ROOT1", "DATA1"),
        ("full", "full-sd", "FULLR", "FULLD"),
        ("linked", "linked-sd", "LINKR", "LINKD"),
    ] {
        let root = host_read(&vman.vm_dir(id).join("root.qcow2"), 512_000);
        assert!(root.contains(root_want), "{id}: {root}");
        let data = host_read(&disk_file(&vman, disk), 16 * 512);
        assert!(data.contains(data_want), "{id}: {data}");
    }
    // The linked clone's base is the source's snapshot, unchanged.
    let base = host_read(
        &vman.vm_dir("src").join("snapshots/clone-linked.qcow2"),
        512_000,
    );
    assert!(base.contains("ROOT1"), "{base}");
}

#[test]
fn kill9_during_a_clone_leaves_every_vm_bootable_and_nothing_half_made() {
    let storage = Arc::new(
        tempfile::Builder::new()
            .prefix("vman-e2e-clone-")
            .tempdir()
            .unwrap(),
    );
    let mut first = Vman::builder()
        .with_tiny_default()
        .env("VMAN_ACCEL", "tcg")
        .env("VMAN_FAULT_POINT", "clone.after_copy")
        .storage(storage.clone())
        .start();
    source_with_markers(&first, "ks", "kd", "KROOT", "KDATA");
    stop(&first, "ks");
    let answer = reqwest::blocking::Client::new()
        .post(format!("{}/vms/ks/clone", first.base.trim_end_matches('/')))
        .json(&json!({"name": "kc", "linked": true}))
        .send();
    assert!(answer.is_err(), "vman answered: {answer:?}");
    // The clone's files were all made when vman died.
    assert!(first.vm_dir("kc").join("root.qcow2").exists());
    assert!(disk_file(&first, "kc-kd").exists());
    first.kill9();
    drop(first);

    let vman = Vman::builder()
        .with_tiny_default()
        .env("VMAN_ACCEL", "tcg")
        .storage(storage)
        .start();
    vman.wait_recovered();
    assert_eq!(vman.call("GET", "/vms/kc", None).0, 404);
    assert!(!vman.vm_dir("kc").exists());
    assert!(!disk_file(&vman, "kc-kd").exists());
    let disks = vman.get("/disks");
    assert_eq!(disks.as_array().unwrap().len(), 1, "{disks}");
    let obs = vman.get("/observer/status");
    assert!(!obs.to_string().contains("partial"), "{obs}");
    assert!(vman.log_count("interrupted clone") > 0);

    // The source boots with its data (its root is an overlay on the
    // snapshot the interrupted clone took).
    boot(&vman, "ks", 2);
    let root = read5(&vman, "ks", ROOT_AT, "kr");
    assert!(root.contains("KROOT"), "{root}");
    stop(&vman, "ks");
    // The clone made again boots with the data.
    let (s, b) = vman.post("/vms/ks/clone", json!({"name": "kc", "linked": true}));
    assert_eq!(s, 201, "{b}");
    boot(&vman, "kc", 1);
    let root = read5(&vman, "kc", ROOT_AT, "kcr");
    assert!(root.contains("KROOT"), "{root}");
    let data = read5(&vman, "kc", DATA_AT, "kcd");
    assert!(data.contains("KDATA"), "{data}");
    stop(&vman, "kc");
}
