//! Snapshots with a real tiny guest. The guest writes markers into its root
//! disk (`/dev/vda`, sector 1000: the unused gap between the MBR and the
//! first partition at 1 MiB) and its data disk (`/dev/vdb`, sector 16);
//! snapshots are taken stopped and running (no stop: the guest answers
//! right after), overwritten, merged away (delete in the middle of a chain,
//! running and stopped), restored, and the next boot reads the original
//! markers. `vman` is killed at each fault point of snapshot, delete and
//! restore (`VMAN_FAULT_POINT`), started again, and the VM still runs or
//! boots with the data of either the old or the new state.

use std::path::Path;
use std::process::Command;

use serde_json::json;

use crate::harness::{Vman, GUEST};

/// The bytes at `offset` of a qcow2 image (its whole chain), read on the
/// host while QEMU may have it open (`-U`).
fn host_read(image: &Path, offset: u64) -> String {
    let out = Command::new("qemu-io")
        .args(["-r", "-U", "-f", "qcow2", "-c"])
        .arg(format!("read -v {offset} 5"))
        .arg(image)
        .output()
        .expect("qemu-io");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// What the guest reads at 512-byte sector `sector` of `dev`.
fn read_at(vman: &Vman, id: &str, dev: &str, sector: u64, tag: &str) -> String {
    run(
        vman,
        id,
        &format!("dd if=/dev/{dev} bs=512 skip={sector} count=1 2>/dev/null | head -c 5"),
        tag,
    )
}

fn write_at(vman: &Vman, id: &str, dev: &str, sector: u64, marker: &str, tag: &str) {
    let out = run(
        vman,
        id,
        &format!(
            "printf {marker} | dd of=/dev/{dev} bs=512 seek={sector} conv=sync,fsync 2>/dev/null; sync; echo written"
        ),
        tag,
    );
    assert!(out.contains("written"), "{out}");
}

/// A stopped VM `id` from template `tiny` with a 1 GiB data disk `disk`
/// attached (cold).
fn vm_with_disk(vman: &Vman, id: &str, disk: &str) {
    let (s, b) = vman.create_vm(json!({"template_name": "tiny", "name": id}));
    assert_eq!(s, 201, "{b}");
    let (s, b) = vman.post("/disks", json!({"name": disk, "size": 1}));
    assert_eq!(s, 201, "{b}");
    let (s, b) = vman.post(&format!("/disks/{disk}/attach"), json!({"vm_id": id}));
    assert_eq!(s, 200, "{b}");
}

fn snapshot(vman: &Vman, id: &str, name: &str) -> serde_json::Value {
    let (s, b) = vman.post(&format!("/vms/{id}/snapshots"), json!({"name": name}));
    assert_eq!(s, 201, "snapshot {name}: {b}");
    b
}

fn names(vman: &Vman, id: &str) -> Vec<String> {
    vman.get(&format!("/vms/{id}/snapshots"))
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap().to_owned())
        .collect()
}

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

/// A running VM with a data disk: two snapshots taken while it runs (the
/// guest answers right after each), the one in the middle of the chain
/// deleted while it runs (streamed into the root disk), the bottom one
/// refused while it runs (the running QEMU reads the file built on it);
/// then stopped: a chain of stopped snapshots merged in the middle, and
/// the first running snapshot restored: root and data disk markers back.
#[test]
fn running_snapshots_hold_root_and_data_disks_and_merge_in_the_middle() {
    let vman = Vman::builder()
        .with_tiny_default()
        .env("VMAN_ACCEL", "tcg")
        .start();
    vman.template("tiny", 256);
    vm_with_disk(&vman, "sr", "dsr");
    boot(&vman, "sr", 1);
    write_at(&vman, "sr", "vda", 1000, "AAAAA", "w1");
    write_at(&vman, "sr", "vdb", 16, "DDDDA", "w2");

    let s1 = snapshot(&vman, "sr", "s1");
    assert_eq!(s1["vm_state_at_snapshot"], "running", "{s1}");
    let disks: Vec<&str> = s1["disks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["id"].as_str().unwrap())
        .collect();
    assert_eq!(disks, ["root", "dsr"], "{s1}");
    assert_eq!(vman.vm("sr")["state"], "running");
    // The guest went on running: it answers, and still writes.
    write_at(&vman, "sr", "vda", 1000, "BBBBB", "w3");
    write_at(&vman, "sr", "vdb", 16, "DDDDB", "w4");
    let dir = vman.vm_dir("sr");
    assert!(host_read(&dir.join("snapshots/s1.qcow2"), 512_000).contains("AAAAA"));
    assert!(host_read(&dir.join("snapshots/s1.disks/dsr.img"), 8192).contains("DDDDA"));

    let s2 = snapshot(&vman, "sr", "s2");
    assert_eq!(s2["parent"], "s1");
    write_at(&vman, "sr", "vda", 1000, "CCCCC", "w5");
    assert!(host_read(&dir.join("snapshots/s2.qcow2"), 512_000).contains("BBBBB"));

    // s1 has s2 on it, which the running QEMU reads: refused, nothing changed.
    let reply = vman.call("DELETE", "/vms/sr/snapshots/s1", None);
    assert_eq!(reply.0, 400, "{}", reply.1);
    assert_eq!(reply.1["code"], "not_stopped");
    assert!(reply.1["detail"]
        .as_str()
        .unwrap()
        .contains("stop the VM first"));
    assert_eq!(names(&vman, "sr"), ["s1", "s2"]);

    // s2, in the middle (s1 <- s2 <- root), deleted while the VM runs.
    let (st, b) = vman.call("DELETE", "/vms/sr/snapshots/s2", None);
    assert_eq!(st, 204, "{b}");
    assert!(!dir.join("snapshots/s2.qcow2").exists());
    assert_eq!(names(&vman, "sr"), ["s1"]);
    let root = dir.join("root.qcow2");
    assert!(host_read(&root, 512_000).contains("CCCCC"));
    let r = read_at(&vman, "sr", "vda", 1000, "r1");
    assert!(r.contains("CCCCC"), "{r}");
    stop(&vman, "sr");
    assert!(host_read(&root, 512_000).contains("CCCCC"));

    // Stopped: s3 and s4 on top of s1, then s3 (the middle) merged away.
    snapshot(&vman, "sr", "s3");
    let s4 = snapshot(&vman, "sr", "s4");
    assert_eq!(
        (s4["vm_state_at_snapshot"].as_str(), s4["parent"].as_str()),
        (Some("stopped"), Some("s3"))
    );
    let (st, b) = vman.call("DELETE", "/vms/sr/snapshots/s3", None);
    assert_eq!(st, 204, "{b}");
    assert_eq!(vman.get("/vms/sr/snapshots/s4")["parent"], "s1");
    assert!(host_read(&dir.join("snapshots/s4.qcow2"), 512_000).contains("CCCCC"));

    // Restore the first running snapshot: root and data disk go back.
    let reply = vman.post("/vms/sr/snapshots/s1/restore", json!({}));
    assert_eq!(reply.0, 200, "{}", reply.1);
    boot(&vman, "sr", 2);
    let r = read_at(&vman, "sr", "vda", 1000, "r2");
    assert!(r.contains("AAAAA"), "{r}");
    let r = read_at(&vman, "sr", "vdb", 16, "r3");
    assert!(r.contains("DDDDA"), "{r}");
    // Restore while running: refused.
    let reply = vman.post("/vms/sr/snapshots/s4/restore", json!({}));
    assert_eq!(reply.0, 400, "{}", reply.1);
    assert_eq!(reply.1["code"], "not_stopped");
    let (s, b) = vman.post("/vms/sr/actions/stop", json!({"force": true}));
    assert_eq!(s, 202, "{b}");
    vman.wait_state("sr", "stopped", GUEST);
    // s4 (taken after s1) is still there and still holds its data.
    assert!(host_read(&dir.join("snapshots/s4.qcow2"), 512_000).contains("CCCCC"));
    // The data disk belongs to snapshots: not deleted without force.
    vman.post("/disks/dsr/detach", json!({}));
    let reply = vman.call("DELETE", "/disks/dsr", None);
    assert_eq!(reply.0, 400, "{}", reply.1);
    assert_eq!(reply.1["code"], "disk_in_snapshot");
    assert_eq!(vman.call("DELETE", "/disks/dsr?force=true", None).0, 204);
}

/// Starts vman on `storage` with `VMAN_FAULT_POINT` set (or not).
fn vman_on(storage: &std::sync::Arc<tempfile::TempDir>, fault: Option<&str>) -> Vman {
    let mut b = Vman::builder()
        .with_tiny_default()
        .env("VMAN_ACCEL", "tcg")
        .storage(storage.clone());
    if let Some(f) = fault {
        b = b.env("VMAN_FAULT_POINT", f);
    }
    let v = b.start();
    v.wait_recovered();
    v
}

/// Writes `marker` at `offset` of a qcow2 image on the host (VM stopped).
fn host_write(image: &Path, offset: u64, marker: &str) {
    let out = Command::new("qemu-io")
        .args(["-f", "qcow2", "-c"])
        .arg(format!("write -P 0x58 {offset} 512"))
        .arg(image)
        .output()
        .expect("qemu-io");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(host_read(image, offset).contains(marker));
}

/// vman aborts at each fault point (as a kill -9 there would stop it); a
/// vman started again settles the interrupted operation: the running VM
/// keeps running (adopted) with its data, the snapshot exists completely
/// or not at all, and the VM boots with the markers of the old or the new
/// state. (A dropped `Vman` kills the storage's QEMUs, so the killed
/// instances are kept until the end.)
#[test]
fn a_crash_at_each_snapshot_fault_point_leaves_every_vm_bootable() {
    let first = Vman::builder()
        .with_tiny_default()
        .env("VMAN_ACCEL", "tcg")
        .start();
    first.template("tiny", 256);
    vm_with_disk(&first, "fp", "dfp");
    boot(&first, "fp", 1);
    write_at(&first, "fp", "vda", 1000, "AAAAA", "w0");
    write_at(&first, "fp", "vdb", 16, "DDDDA", "w1");
    let storage = first.storage_handle();
    let mut gone: Vec<Vman> = Vec::new();
    let mut current = first;
    let crash_at = |current: Vman,
                    gone: &mut Vec<Vman>,
                    point: &str,
                    method: &str,
                    path: &str,
                    body: Option<serde_json::Value>|
     -> Vman {
        let mut current = current;
        current.kill9();
        gone.push(current);
        let mut crashing = vman_on(&storage, Some(point));
        let reply = crashing.try_call(method, path, body);
        assert!(reply.is_none(), "{point}: vman answered {reply:?}");
        crashing.kill9();
        gone.push(crashing);
        let again = vman_on(&storage, None);
        assert_eq!(
            again.log_count("interrupted snapshot"),
            1,
            "{point}: {:#?}",
            again.logs()
        );
        // The observer reports what start-up settled.
        let status = again.get("/observer/status");
        let reported = status["last_issues"]
            .as_array()
            .unwrap()
            .iter()
            .any(|i| i["issue_type"] == "snapshot_interrupted" && i["resource_id"] == "fp");
        assert!(reported, "{point}: {status}");
        again
    };
    // Running VM: each point of a snapshot.
    for (i, (point, outcome)) in [
        // QEMU still wrote into the old root: the files are put back.
        (
            "snapshot.after_overlay",
            "rolled back (the QMP transaction had not happened)",
        ),
        // The root overlay is in use, the data disk copy's file was not
        // complete: the snapshot is merged back into the running root.
        ("snapshot.after_transaction", "rolled back (merged away"),
        // Everything but the row: finished.
        ("snapshot.before_db_commit", "finished (1 data disk copies)"),
    ]
    .iter()
    .enumerate()
    {
        let name = format!("c{i}");
        current = crash_at(
            current,
            &mut gone,
            point,
            "POST",
            "/vms/fp/snapshots",
            Some(json!({"name": name})),
        );
        assert_eq!(
            current.log_count(outcome),
            1,
            "{point}: {:#?}",
            current.logs()
        );
        assert_eq!(current.vm("fp")["state"], "running", "{point}");
        let list = names(&current, "fp");
        if *point == "snapshot.before_db_commit" {
            assert!(list.contains(&name), "{point}: {list:?}");
        } else {
            assert!(!list.contains(&name), "{point}: {list:?}");
        }
        // The guest still runs on a valid chain and still writes.
        let m = format!("M{i}{i}{i}{i}");
        write_at(&current, "fp", "vda", 1000, &m, &format!("fw{i}"));
        let r = read_at(&current, "fp", "vda", 1000, &format!("fr{i}"));
        assert!(r.contains(&m), "{point}: {r}");
    }
    let (s, b) = current.post("/vms/fp/actions/stop", json!({"force": true}));
    assert_eq!(s, 202, "{b}");
    current.wait_state("fp", "stopped", GUEST);
    let dir = current.vm_dir("fp");
    let root = dir.join("root.qcow2");
    assert!(host_read(&root, 512_000).contains("M2222"));
    // The recorded snapshot holds the data of its moment, root and data disk.
    assert!(host_read(&dir.join("snapshots/c2.qcow2"), 512_000).contains("M1111"));
    assert!(host_read(&dir.join("snapshots/c2.disks/dfp.img"), 8192).contains("DDDDA"));

    // Stopped VM: `top` (root M2222, disk DDDDA), then both overwritten on
    // the host; a delete merge, a restore and a snapshot each cut off.
    snapshot(&current, "fp", "top");
    let disk = current.storage.join("disks/dfp.qcow2");
    host_write(&root, 512_000, "XXXXX");
    host_write(&disk, 8192, "XXXXX");
    current = crash_at(
        current,
        &mut gone,
        "delete.after_merge",
        "DELETE",
        "/vms/fp/snapshots/c2",
        None,
    );
    // Finished: c2 is gone, `top` (built on it) holds its data alone.
    assert!(!names(&current, "fp").contains(&"c2".to_owned()));
    assert!(!dir.join("snapshots/c2.qcow2").exists());
    assert!(host_read(&dir.join("snapshots/top.qcow2"), 512_000).contains("M2222"));
    current = crash_at(
        current,
        &mut gone,
        "restore.after_disk",
        "POST",
        "/vms/fp/snapshots/top/restore",
        Some(json!({})),
    );
    // Done again at start-up: root and data disk are `top`'s.
    assert!(host_read(&root, 512_000).contains("M2222"));
    assert!(host_read(&disk, 8192).contains("DDDDA"));
    current = crash_at(
        current,
        &mut gone,
        "snapshot.after_overlay",
        "POST",
        "/vms/fp/snapshots",
        Some(json!({"name": "late"})),
    );
    // The files were complete (only the row was missing): finished.
    let list = names(&current, "fp");
    assert_eq!(list, ["top", "late"], "{list:?}");
    assert_eq!(current.get("/vms/fp/snapshots/late")["parent"], "top");

    boot(&current, "fp", 2);
    let r = read_at(&current, "fp", "vda", 1000, "e1");
    assert!(r.contains("M2222"), "{r}");
    let r = read_at(&current, "fp", "vdb", 16, "e2");
    assert!(r.contains("DDDDA"), "{r}");
    let (s, b) = current.post("/vms/fp/actions/stop", json!({"force": true}));
    assert_eq!(s, 202, "{b}");
    current.wait_state("fp", "stopped", GUEST);
    drop(gone);
}

/// Regression (found by the fuzz suite: a snapshot request hung for more
/// than 60 s): a running snapshot copied every byte of its data disks
/// (`blockdev-backup` `sync: full`), so a sparse 60 TiB disk took hours.
/// Now only what the disk holds is copied: the snapshot answers at once
/// and its copy holds the marker written at the disk's far end.
#[test]
fn running_snapshot_of_a_huge_sparse_data_disk_copies_only_what_it_holds() {
    let vman = Vman::builder()
        .with_tiny_default()
        .env("VMAN_ACCEL", "tcg")
        .start();
    vman.template("tiny", 256);
    let (s, b) = vman.create_vm(json!({"template_name": "tiny", "name": "h"}));
    assert_eq!(s, 201, "{b}");
    let (s, b) = vman.post("/disks", json!({"name": "huge", "size": 61440}));
    assert_eq!(s, 201, "{b}");
    let (s, b) = vman.post("/disks/huge/attach", json!({"vm_id": "h"}));
    assert_eq!(s, 200, "{b}");
    boot(&vman, "h", 1);
    // A marker 1 GiB in, written by the guest.
    write_at(&vman, "h", "vdb", 2 * 1024 * 1024, "FAR01", "wf");
    // The harness's client gives up after its own timeout: a full copy of
    // 60 TiB never answers in time.
    let snap = snapshot(&vman, "h", "s1");
    assert!(
        snap["disks"]
            .as_array()
            .is_some_and(|d| d.iter().any(|x| x["id"] == "huge")),
        "{snap}"
    );
    let copy = vman.vm_dir("h").join("snapshots/s1.disks/huge.img");
    assert!(
        host_read(&copy, 1024 * 1024 * 1024).contains("FAR01"),
        "{}",
        host_read(&copy, 1024 * 1024 * 1024)
    );
    let allocated = std::fs::metadata(&copy).map(|m| {
        use std::os::unix::fs::MetadataExt;
        m.blocks() * 512
    });
    assert!(
        allocated.as_ref().is_ok_and(|b| *b < 256 * 1024 * 1024),
        "{allocated:?}"
    );
    stop(&vman, "h");
}
