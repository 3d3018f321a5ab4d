//! Snapshots of a stopped VM's root disk through the API, without a guest:
//! the VM's `root.qcow2` is made by the test (an existing root disk is used
//! as is), then taken, listed, restored and deleted; every bad input is a
//! 4xx that changes nothing (rows and files compared before and after).

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{json, Value};

use crate::common::{assert_error, Server};
use crate::{make_template, make_vm};

fn root_of(s: &Server, vm: &str) -> PathBuf {
    let dir = s.storage_path().join("vms").join(vm);
    std::fs::create_dir_all(&dir).unwrap();
    dir.join("root.qcow2")
}

fn qemu_img(args: &[&str]) -> String {
    let out = Command::new("qemu-img").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "qemu-img {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn backing(file: &Path) -> Option<String> {
    let info: Value = serde_json::from_str(&qemu_img(&[
        "info",
        "-U",
        "--output=json",
        file.to_str().unwrap(),
    ]))
    .unwrap();
    info["backing-filename"].as_str().map(str::to_owned)
}

/// Every file under the VM's folder, with its inode (what "nothing
/// changed" compares).
fn files(dir: &Path) -> Vec<(String, u64)> {
    use std::os::unix::fs::MetadataExt;
    let mut out = Vec::new();
    for sub in [dir.to_path_buf(), dir.join("snapshots")] {
        for e in std::fs::read_dir(&sub).into_iter().flatten().flatten() {
            let m = e.metadata().unwrap();
            if m.is_file() {
                out.push((e.path().display().to_string(), m.ino()));
            }
        }
    }
    out.sort();
    out
}

fn server_with_vm(vm: &str) -> (Server, PathBuf) {
    let s = Server::start();
    make_template(&s, "t", 1, 1);
    make_vm(&s, "t", Some(vm));
    let root = root_of(&s, vm);
    qemu_img(&["create", "-q", "-f", "qcow2", root.to_str().unwrap(), "64M"]);
    (s, root)
}

/// Reads `len` bytes at `offset` of an image's whole chain with qemu-io and
/// tells whether they are all `pattern`.
fn holds(file: &Path, pattern: u8, offset: u64, len: u64) -> bool {
    let out = Command::new("qemu-io")
        .args(["-r", "-U", "-f", "qcow2", "-c"])
        .arg(format!("read -P {pattern:#x} {offset} {len}"))
        .arg(file)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    out.status.success() && text.contains("read ") && !text.contains("verification failed")
}

fn write_pattern(file: &Path, pattern: u8, offset: u64, len: u64) {
    let out = Command::new("qemu-io")
        .args(["-f", "qcow2", "-c"])
        .arg(format!("write -P {pattern:#x} {offset} {len}"))
        .arg(file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn snapshots_are_taken_listed_restored_and_deleted_as_a_tree() {
    let (s, root) = server_with_vm("a");
    write_pattern(&root, 0x11, 0, 65536);
    let (st, one) = s.post_json(
        "/vms/a/snapshots",
        &json!({"name": "one", "description": "first"}),
    );
    assert_eq!(st, 201, "{one}");
    assert_eq!(one["name"], "one");
    assert_eq!(one["description"], "first");
    assert_eq!(one["vm_state_at_snapshot"], "stopped");
    assert_eq!(one["disks"].as_array().unwrap().len(), 1);
    assert_eq!(one["disks"][0]["id"], "root");
    assert_eq!(one["disks"][0]["kind"], "root");
    assert_eq!(one["parent"], Value::Null);
    assert!(one["size_bytes"].as_u64().is_some());
    assert_eq!(one["virtual_size"], 64 << 20);
    let snap_one = root.parent().unwrap().join("snapshots/one.qcow2");
    assert!(backing(&root).unwrap().ends_with("/snapshots/one.qcow2"));
    assert_eq!(backing(&snap_one), None);

    let (st, two) = s.post_json("/vms/a/snapshots", &json!({"name": "two"}));
    assert_eq!(st, 201, "{two}");
    assert_eq!(two["parent"], "one");
    assert_eq!(two["description"], Value::Null);
    assert!(backing(&root).unwrap().ends_with("/snapshots/two.qcow2"));

    let (st, list) = s.get("/vms/a/snapshots");
    assert_eq!(st, 200);
    let names: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["one", "two"]);
    let (st, got) = s.get("/vms/a/snapshots/one");
    assert_eq!((st, got["name"].as_str()), (200, Some("one")));

    // Restore the first: the root is a new overlay on it; `two` stays.
    let (st, r) = s.post_json("/vms/a/snapshots/one/restore", &json!({}));
    assert_eq!(st, 200, "{r}");
    assert!(backing(&root).unwrap().ends_with("/snapshots/one.qcow2"));
    assert_eq!(s.get("/vms/a/snapshots").1.as_array().unwrap().len(), 2);

    // `one` has `two` and the root on it: its data is merged into both,
    // which no longer have a backing file; `two` keeps its data and has no
    // parent any more.
    let snap_two = root.parent().unwrap().join("snapshots/two.qcow2");
    let (st, body) = s.delete("/vms/a/snapshots/one");
    assert_eq!(st, 204, "{body}");
    assert!(!snap_one.exists());
    assert_eq!(backing(&root), None);
    assert_eq!(backing(&snap_two), None);
    assert!(holds(&root, 0x11, 0, 65536));
    assert!(holds(&snap_two, 0x11, 0, 65536));
    assert_eq!(s.get("/vms/a/snapshots/two").1["parent"], Value::Null);
    assert_eq!(s.get("/vms/a/snapshots/one").0, 404);
    // `two` is a leaf now: deleted, file and row.
    let (st, _) = s.delete("/vms/a/snapshots/two");
    assert_eq!(st, 204);
    assert!(!snap_two.exists());
    assert_eq!(s.get("/vms/a/snapshots/two").0, 404);

    // A new snapshot, then the VM goes with its snapshots.
    let (st, three) = s.post_json("/vms/a/snapshots", &json!({"name": "three"}));
    assert_eq!((st, three["parent"].as_str()), (201, None));
    assert_eq!(s.delete("/vms/a").0, 204);
    assert!(!root.parent().unwrap().exists());
    make_vm(&s, "t", Some("a"));
    assert_eq!(s.get("/vms/a/snapshots").1, json!([]));
}

#[test]
fn bad_snapshot_requests_are_4xx_and_change_nothing() {
    let (s, root) = server_with_vm("b");
    let dir = root.parent().unwrap().to_path_buf();
    assert_eq!(
        s.post_json("/vms/b/snapshots", &json!({"name": "base"})).0,
        201
    );
    let before = (files(&dir), s.get("/vms/b/snapshots").1);
    let same = |what: &str| {
        assert_eq!(
            (files(&dir), s.get("/vms/b/snapshots").1),
            before,
            "{what} changed something"
        );
    };

    let reply = s.post_json("/vms/b/snapshots", &json!({"name": "base"}));
    assert_error(&reply, 400);
    assert_eq!(reply.1["code"], "already_exists");
    same("duplicate");
    for bad in ["../x", "a/b", "", ".hidden", "x y", &"n".repeat(64)] {
        let reply = s.post_json("/vms/b/snapshots", &json!({"name": bad}));
        assert_error(&reply, 422);
        same(bad);
    }
    let reply = s.post_json(
        "/vms/b/snapshots",
        &json!({"name": "d", "description": "x".repeat(1025)}),
    );
    assert_error(&reply, 422);
    let reply = s.post_json("/vms/b/snapshots", &json!({"name": "d", "extra": 1}));
    assert!(reply.0 >= 400 && reply.0 < 500, "{reply:?}");
    assert_error(&s.post_json("/vms/b/snapshots", &json!({})), 422);
    same("bad bodies");
    for path in [
        "/vms/b/snapshots/nope/restore",
        "/vms/b/snapshots/..%2Fbase/restore",
        "/vms/nope/snapshots/base/restore",
    ] {
        assert_error(&s.post_json(path, &json!({})), 404);
        same(path);
    }
    assert_error(&s.delete("/vms/b/snapshots/nope"), 404);
    assert_error(&s.delete("/vms/b/snapshots/..%2F..%2Fb"), 404);
    assert_error(&s.get("/vms/b/snapshots/nope"), 404);
    assert_error(&s.get("/vms/nope/snapshots"), 404);
    assert_error(
        &s.post_json("/vms/nope/snapshots", &json!({"name": "x"})),
        404,
    );
    same("unknown names");

    // A VM that has no root disk yet (never started).
    make_vm(&s, "t", Some("fresh"));
    let reply = s.post_json("/vms/fresh/snapshots", &json!({"name": "x"}));
    assert_error(&reply, 400);
    assert_eq!(reply.1["code"], "no_root_disk");
    assert_eq!(s.get("/vms/fresh/snapshots").1, json!([]));
}

#[test]
fn the_snapshot_limit_is_a_clear_400() {
    let s = Server::builder().env("VMAN_MAX_SNAPSHOTS", "2").start();
    make_template(&s, "t", 1, 1);
    make_vm(&s, "t", Some("c"));
    let root = root_of(&s, "c");
    qemu_img(&["create", "-q", "-f", "qcow2", root.to_str().unwrap(), "1M"]);
    assert_eq!(
        s.post_json("/vms/c/snapshots", &json!({"name": "s1"})).0,
        201
    );
    assert_eq!(
        s.post_json("/vms/c/snapshots", &json!({"name": "s2"})).0,
        201
    );
    let reply = s.post_json("/vms/c/snapshots", &json!({"name": "s3"}));
    let detail = assert_error(&reply, 400);
    assert_eq!(reply.1["code"], "too_many_snapshots");
    assert!(detail.contains("VMAN_MAX_SNAPSHOTS"), "{detail}");
    assert!(!root.parent().unwrap().join("snapshots/s3.qcow2").exists());
}

#[test]
fn the_backing_chain_depth_limit_caps_snapshots() {
    let s = Server::start();
    make_template(&s, "t", 1, 1);
    make_vm(&s, "t", Some("d"));
    let root = root_of(&s, "d");
    qemu_img(&["create", "-q", "-f", "qcow2", root.to_str().unwrap(), "1M"]);
    // root + 15 snapshots = 16 files, the limit.
    for i in 0..15 {
        let (st, body) = s.post_json("/vms/d/snapshots", &json!({"name": format!("s{i}")}));
        assert_eq!(st, 201, "{i}: {body}");
    }
    let reply = s.post_json("/vms/d/snapshots", &json!({"name": "s15"}));
    let detail = assert_error(&reply, 400);
    assert_eq!(reply.1["code"], "too_many_snapshots");
    assert!(detail.contains("16"), "{detail}");
}

/// The states a kill -9 can leave between the file steps of a snapshot,
/// made by hand, then the same request again: each one ends in a sound
/// snapshot and a root disk built on it. A `.partial` in `snapshots/` is
/// swept at the next start.
#[test]
fn leftovers_of_an_interrupted_snapshot_are_repaired() {
    use std::os::unix::fs::MetadataExt;
    let (mut s, root) = server_with_vm("k");
    let dir = root.parent().unwrap().to_path_buf();
    std::fs::create_dir_all(dir.join("snapshots")).unwrap();

    // Killed after the snapshot link got its name, before root moved: the
    // "snapshot" is still the root disk's own inode.
    let one = dir.join("snapshots/one.qcow2");
    std::fs::hard_link(&root, &one).unwrap();
    let (st, body) = s.post_json("/vms/k/snapshots", &json!({"name": "one"}));
    assert_eq!(st, 201, "{body}");
    assert_ne!(
        std::fs::metadata(&one).unwrap().ino(),
        std::fs::metadata(&root).unwrap().ino()
    );
    assert!(backing(&root).unwrap().ends_with("/snapshots/one.qcow2"));
    assert_eq!(std::fs::metadata(&one).unwrap().nlink(), 1);

    // Killed after root moved onto a new overlay, before the row: the root
    // is built on `two`, which has no row. Made by hand the same way.
    let two = dir.join("snapshots/two.qcow2");
    std::fs::rename(&root, &two).unwrap();
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-u",
        "-F",
        "qcow2",
        "-b",
        two.canonicalize().unwrap().to_str().unwrap(),
        root.to_str().unwrap(),
        "64M",
    ]);
    assert_eq!(s.get("/vms/k/snapshots/two").0, 404);
    let (st, body) = s.post_json("/vms/k/snapshots", &json!({"name": "two"}));
    assert_eq!(st, 201, "{body}");
    assert_eq!(body["parent"], "one");
    // Adopted, not stacked again: root is still directly on `two`.
    assert!(backing(&root).unwrap().ends_with("/snapshots/two.qcow2"));

    // A stray file of that name that is neither: refused, kept.
    std::fs::copy(&two, dir.join("snapshots/three.qcow2")).unwrap();
    let reply = s.post_json("/vms/k/snapshots", &json!({"name": "three"}));
    assert_error(&reply, 400);
    assert_eq!(reply.1["code"], "already_exists");

    // Killed while a file was being made: the start-up sweep removes it.
    let partial = dir.join("snapshots/.four.qcow2.partial-0123456789abcdef");
    std::fs::write(&partial, b"half").unwrap();
    s.restart();
    assert!(!partial.exists(), "the sweep left {}", partial.display());
    assert_eq!(s.get("/vms/k/snapshots").1.as_array().unwrap().len(), 2);

    // A row whose file is gone (killed between the file and the row of a
    // delete): the delete completes.
    std::fs::remove_file(dir.join("snapshots/three.qcow2")).unwrap();
    assert_eq!(
        s.post_json("/vms/k/snapshots", &json!({"name": "x"})).0,
        201
    );
    assert_eq!(
        s.post_json("/vms/k/snapshots/two/restore", &json!({})).0,
        200
    );
    std::fs::remove_file(dir.join("snapshots/x.qcow2")).unwrap();
    assert_eq!(s.delete("/vms/k/snapshots/x").0, 204);
    assert_eq!(s.get("/vms/k/snapshots/x").0, 404);
}

/// Regression: restoring a snapshot that has a parent snapshot was refused
/// (`image_refused`: the parent "outside the allowed image folders"), as the
/// snapshot file's own folder was taken for the VM folder.
#[test]
fn restoring_a_snapshot_with_a_parent_was_refused_as_outside_the_image_folders() {
    let (s, root) = server_with_vm("p");
    for name in ["s1", "s2", "s3"] {
        assert_eq!(
            s.post_json("/vms/p/snapshots", &json!({"name": name})).0,
            201
        );
    }
    let (st, body) = s.post_json("/vms/p/snapshots/s2/restore", &json!({}));
    assert_eq!(st, 200, "{body}");
    assert!(backing(&root).unwrap().ends_with("/snapshots/s2.qcow2"));
}

/// A stopped VM with a data disk: the snapshot holds a copy of it
/// (`include_data_disks`, default true) or not (false); the disk cannot be
/// deleted while a snapshot holds it, unless `?force=true`; a restore
/// puts its data back, and makes it again when it was deleted.
#[test]
fn data_disks_are_part_of_a_snapshot_and_guarded() {
    let (s, root) = server_with_vm("dd");
    let dir = root.parent().unwrap().to_path_buf();
    let (st, b) = s.post_json("/disks", &json!({"name": "d1", "size": 1}));
    assert_eq!(st, 201, "{b}");
    let (st, b) = s.post_json("/disks/d1/attach", &json!({"vm_id": "dd"}));
    assert_eq!(st, 200, "{b}");
    let disk = s.storage_path().join("disks/d1.qcow2");
    write_pattern(&disk, 0x21, 4096, 4096);

    let (st, one) = s.post_json("/vms/dd/snapshots", &json!({"name": "one"}));
    assert_eq!(st, 201, "{one}");
    assert_eq!(one["disks"][1]["id"], "d1");
    assert_eq!(one["disks"][1]["kind"], "data");
    assert_eq!(one["disks"][1]["virtual_size"], 1u64 << 30);
    let copy = dir.join("snapshots/one.disks/d1.img");
    assert!(holds(&copy, 0x21, 4096, 4096));
    let (st, bare) = s.post_json(
        "/vms/dd/snapshots",
        &json!({"name": "bare", "include_data_disks": false}),
    );
    assert_eq!(st, 201, "{bare}");
    assert_eq!(bare["disks"].as_array().unwrap().len(), 1);
    assert!(!dir.join("snapshots/bare.disks").exists());
    let reply = s.post_json(
        "/vms/dd/snapshots",
        &json!({"name": "x", "include_data_disks": "yes"}),
    );
    assert_error(&reply, 422);

    // The disk changes; the snapshot's copy does not.
    write_pattern(&disk, 0x22, 4096, 4096);
    assert!(holds(&copy, 0x21, 4096, 4096));

    // Guarded: detached, it still cannot go without force; nothing changed.
    assert_eq!(s.post_json("/disks/d1/detach", &json!({})).0, 200);
    let reply = s.delete("/disks/d1");
    let detail = assert_error(&reply, 400);
    assert_eq!(reply.1["code"], "disk_in_snapshot");
    assert!(
        detail.contains("dd/one") && detail.contains("force=true"),
        "{detail}"
    );
    assert!(disk.exists());
    assert_error(&s.delete("/disks/d1?force=maybe"), 422);
    assert!(disk.exists());
    assert_eq!(s.delete("/disks/d1?force=true").0, 204);
    assert!(!disk.exists());
    assert!(copy.exists());

    // Restore makes the disk again, attached, with the snapshot's data.
    let (st, b) = s.post_json("/vms/dd/snapshots/one/restore", &json!({}));
    assert_eq!(st, 200, "{b}");
    let (st, d) = s.get("/disks/d1");
    assert_eq!(st, 200, "{d}");
    assert_eq!(d["state"], "attached", "{d}");
    assert!(holds(&disk, 0x21, 4096, 4096));

    // Deleting the VM deletes its snapshots and their copies.
    assert_eq!(s.post_json("/disks/d1/detach", &json!({})).0, 200);
    assert_eq!(s.delete("/vms/dd").0, 204);
    assert!(!dir.exists());
    assert_eq!(s.delete("/disks/d1").0, 204);
}
