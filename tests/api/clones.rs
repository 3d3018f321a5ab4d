//! Clones through the API, without a guest: the source's `root.qcow2` and
//! data disk are made by the test with known bytes (qemu-io), cloned full
//! and linked, and compared; bad input is a 4xx that changes nothing
//! (records and files compared before and after); a kill -9 at each fault
//! point of a clone, then a restart, leaves either no trace of the clone or
//! the whole clone.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{json, Value};

use crate::common::{assert_error, Server};
use crate::{make_template, make_vm};

fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Writes `pattern` at offset 0 (64 KiB) of the qcow2 `file`.
fn write_pattern(file: &Path, pattern: u8) {
    let cmd = format!("write -P {pattern:#x} 0 64k");
    run(
        "qemu-io",
        &["-f", "qcow2", "-c", &cmd, file.to_str().unwrap()],
    );
}

/// Whether the first 64 KiB of the qcow2 `file` (through its chain) are
/// `pattern`.
fn has_pattern(file: &Path, pattern: u8) -> bool {
    let cmd = format!("read -P {pattern:#x} 0 64k");
    let out = Command::new("qemu-io")
        .args([
            "-r",
            "-U",
            "-f",
            "qcow2",
            "-c",
            &cmd,
            file.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    out.status.success() && text.contains("read 65536") && !text.contains("verification failed")
}

fn backing(file: &Path) -> Option<String> {
    let info: Value = serde_json::from_str(&run(
        "qemu-img",
        &["info", "-U", "--output=json", file.to_str().unwrap()],
    ))
    .unwrap();
    info["backing-filename"].as_str().map(str::to_owned)
}

/// A server with VM `a`: a 64 MiB root disk holding 0x11 and data disk
/// `d1` (attached) holding 0x33, metadata set.
fn server_with_source(builder: crate::common::ServerBuilder) -> (Server, PathBuf, PathBuf) {
    let s = builder.start();
    make_template(&s, "t", 1, 1);
    make_vm(&s, "t", Some("a"));
    let dir = s.storage_path().join("vms/a");
    std::fs::create_dir_all(&dir).unwrap();
    let root = dir.join("root.qcow2");
    run(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", root.to_str().unwrap(), "64M"],
    );
    write_pattern(&root, 0x11);
    let (st, d) = s.post_json("/disks", &json!({"name": "d1", "size": 1}));
    assert_eq!(st, 201, "{d}");
    let disk = s.storage_path().join("disks/d1.qcow2");
    write_pattern(&disk, 0x33);
    let (st, b) = s.post_json("/disks/d1/attach", &json!({"vm_id": "a"}));
    assert_eq!(st, 200, "{b}");
    let (st, b) = s.put_json(
        "/vms/a/metadata",
        &json!({"hostname": "src-host", "user_data": "#cloud-config\n", "ssh_keys": "ssh-ed25519 AAAA k"}),
    );
    assert_eq!(st, 200, "{b}");
    (s, root, disk)
}

fn disks_of(s: &Server, vm: &str) -> Vec<Value> {
    let (_, all) = s.get("/disks");
    all.as_array()
        .unwrap()
        .iter()
        .filter(|d| d["vm_id"] == vm)
        .cloned()
        .collect()
}

#[test]
fn full_and_linked_clones_copy_every_disk_and_the_metadata_but_the_hostname() {
    let (s, root_a, disk_a) = server_with_source(Server::builder());
    let vm_a = s.get("/vms/a").1;

    // Full clone.
    let (st, b) = s.post_json("/vms/a/clone", &json!({"name": "b"}));
    assert_eq!(st, 201, "{b}");
    assert_eq!(b["id"], "b");
    assert_eq!(b["state"], "stopped");
    assert_eq!(b["vm_template"], vm_a["vm_template"]);
    assert_eq!(b["network"]["mode"], vm_a["network"]["mode"]);
    assert_ne!(b["network"]["mac"], vm_a["network"]["mac"]);
    let root_b = s.storage_path().join("vms/b/root.qcow2");
    assert_eq!(backing(&root_b), None);
    assert!(has_pattern(&root_b, 0x11));
    let disks_b = disks_of(&s, "b");
    assert_eq!(disks_b.len(), 1, "{disks_b:?}");
    assert_eq!(disks_b[0]["id"], "b-d1");
    assert_eq!(disks_b[0]["size"], 1);
    let disk_b = s.storage_path().join("disks/b-d1.qcow2");
    assert!(has_pattern(&disk_b, 0x33));
    // Independent: a write into the copy is not seen by the source.
    write_pattern(&root_b, 0x22);
    write_pattern(&disk_b, 0x44);
    assert!(has_pattern(&root_a, 0x11) && has_pattern(&disk_a, 0x33));
    let md = s.get("/vms/b/metadata").1;
    assert_eq!(md["hostname"], Value::Null);
    assert_eq!(md["user_data"], "#cloud-config\n");
    assert_eq!(md["ssh_keys"], "ssh-ed25519 AAAA k");
    assert_eq!(s.get("/vms/a/metadata").1["hostname"], "src-host");

    // Linked clone: an overlay on the new snapshot clone-c of a.
    let (st, c) = s.post_json("/vms/a/clone", &json!({"name": "c", "linked": true}));
    assert_eq!(st, 201, "{c}");
    let root_c = s.storage_path().join("vms/c/root.qcow2");
    let base = backing(&root_c).unwrap();
    assert!(base.ends_with("/vms/a/snapshots/clone-c.qcow2"), "{base}");
    assert!(has_pattern(&root_c, 0x11));
    let (st, snap) = s.get("/vms/a/snapshots/clone-c");
    assert_eq!(st, 200, "{snap}");
    assert!(has_pattern(
        &s.storage_path().join("disks/c-d1.qcow2"),
        0x33
    ));
    write_pattern(&root_c, 0x55);
    assert!(has_pattern(&root_a, 0x11) && has_pattern(&root_b, 0x22));

    // The snapshot and the source are pinned by the linked clone.
    let reply = s.delete("/vms/a/snapshots/clone-c");
    let detail = assert_error(&reply, 400);
    assert_eq!(reply.1["code"], "snapshot_in_use");
    assert!(
        detail.contains("linked clone") && detail.contains('c'),
        "{detail}"
    );
    let reply = s.delete("/vms/a");
    let detail = assert_error(&reply, 400);
    assert_eq!(reply.1["code"], "in_use");
    assert!(detail.contains("linked clone"), "{detail}");
    assert!(root_a.exists() && s.get("/vms/a").0 == 200);

    // A full clone of a VM with snapshots is one standalone image; a
    // snapshot of the linked clone works (its chain reaches a's snapshot).
    let (st, d) = s.post_json("/vms/a/clone", &json!({"name": "d"}));
    assert_eq!(st, 201, "{d}");
    let root_d = s.storage_path().join("vms/d/root.qcow2");
    assert_eq!(backing(&root_d), None);
    assert!(has_pattern(&root_d, 0x11));
    let (st, snap) = s.post_json("/vms/c/snapshots", &json!({"name": "s1"}));
    assert_eq!(st, 201, "{snap}");
    let (st, restored) = s.post_json("/vms/c/snapshots/s1/restore", &json!({}));
    assert_eq!(st, 200, "{restored}");
    assert!(has_pattern(&root_c, 0x55));

    // A linked clone of the linked clone: its chain crosses both VMs.
    let (st, e) = s.post_json("/vms/c/clone", &json!({"name": "e", "linked": true}));
    assert_eq!(st, 201, "{e}");
    assert!(has_pattern(
        &s.storage_path().join("vms/e/root.qcow2"),
        0x55
    ));
    let detail = assert_error(&s.delete("/vms/c"), 400);
    assert!(detail.contains("linked clone(s) (e)"), "{detail}");
    assert_eq!(s.delete("/vms/e").0, 204);

    // Deleting the linked clone releases the snapshot and the source.
    assert_eq!(s.delete("/vms/c").0, 204);
    // No clone pins it any more: it is merged into a's root disk.
    let (st, body) = s.delete("/vms/a/snapshots/clone-c");
    assert_eq!(st, 204, "{body}");
    assert_eq!(s.get("/vms/a/snapshots").1, json!([]));
    assert_eq!(s.delete("/vms/a").0, 204);
    // The full clones stay whole.
    assert!(has_pattern(&root_b, 0x22) && has_pattern(&root_d, 0x11));
}

/// Everything in the storage folder besides the database and logs, and the
/// records, before and after a refused request.
fn state(s: &Server) -> (BTreeSet<String>, Value, Value, Value) {
    (
        s.storage_entries_besides_db_and_logs(),
        s.get("/vms").1,
        s.get("/disks").1,
        s.get("/vms/a/snapshots").1,
    )
}

#[test]
fn bad_clone_requests_are_4xx_and_change_nothing() {
    let (s, _, _) = server_with_source(Server::builder());
    make_vm(&s, "t", Some("fresh"));
    std::fs::create_dir_all(s.storage_path().join("vms/stray")).unwrap();
    let before = state(&s);
    let same = |what: &str| assert_eq!(state(&s), before, "{what} changed something");

    assert_error(&s.post_json("/vms/nope/clone", &json!({"name": "x"})), 404);
    assert_error(
        &s.post_json("/vms/..%2Fa/clone", &json!({"name": "x"})),
        404,
    );
    same("unknown source");
    for bad in ["../x", "a/b", "", ".hidden", "x y", &"n".repeat(64)] {
        let reply = s.post_json("/vms/a/clone", &json!({"name": bad}));
        assert!(assert_error(&reply, 422).contains("name"), "{reply:?}");
        same(bad);
    }
    for (existing, linked) in [("a", false), ("fresh", false), ("fresh", true)] {
        let reply = s.post_json("/vms/a/clone", &json!({"name": existing, "linked": linked}));
        assert_error(&reply, 400);
        assert_eq!(reply.1["code"], "already_exists");
        same(existing);
    }
    // A folder of that name without a record: refused, left alone.
    let reply = s.post_json("/vms/a/clone", &json!({"name": "stray"}));
    assert!(
        assert_error(&reply, 400).contains("without a record"),
        "{reply:?}"
    );
    let reply = s.post_json("/vms/a/clone", &json!({"name": "stray", "linked": true}));
    assert!(
        assert_error(&reply, 400).contains("without a record"),
        "{reply:?}"
    );
    same("stray folder");
    for body in [
        json!({"name": "x", "linked": "yes"}),
        json!({"name": 5}),
        json!({"linked": true}),
        json!({"name": "x", "extra": 1}),
        json!(["x"]),
    ] {
        let reply = s.post_json("/vms/a/clone", &body);
        assert!((400..500).contains(&reply.0), "{body}: {reply:?}");
        same(&body.to_string());
    }
    let r = s.raw(
        "POST",
        "/vms/a/clone",
        Some(b"{\"name\":"),
        &[("content-type", "application/json")],
    );
    assert!((400..500).contains(&r.status), "{}", r.text);
    same("malformed JSON");
    // A linked clone of a VM without a root disk yet: no snapshot to build on.
    let reply = s.post_json("/vms/fresh/clone", &json!({"name": "x", "linked": true}));
    assert_error(&reply, 400);
    assert_eq!(reply.1["code"], "no_root_disk");
    same("linked clone of a fresh VM");
    // A full clone of it is a new VM that makes its root disk at its first
    // start, as its source would.
    let (st, x) = s.post_json("/vms/fresh/clone", &json!({"name": "x"}));
    assert_eq!(st, 201, "{x}");
    assert!(!s.storage_path().join("vms/x/root.qcow2").exists());
    assert_eq!(x["root_disk"]["source"], Value::Null, "{x}");
}

/// Every `.partial` or clone file left in the storage.
fn leftovers(s: &Server) -> Vec<String> {
    s.storage_entries()
        .into_iter()
        .filter(|p| p.contains(".partial-") || p.starts_with("vms/b") || p == "disks/b-d1.qcow2")
        .collect()
}

#[test]
fn kill9_at_each_clone_fault_point_leaves_no_half_made_clone() {
    for (point, linked) in [
        ("clone.after_snapshot", true),
        ("clone.after_job", false),
        ("clone.after_root", true),
        ("clone.after_copy", false),
        ("clone.before_commit", true),
        ("clone.after_commit", false),
    ] {
        let (mut s, root_a, _) =
            server_with_source(Server::builder().env("VMAN_FAULT_POINT", point));
        let reply = s.try_raw(
            "POST",
            "/vms/a/clone",
            Some(
                json!({"name": "b", "linked": linked})
                    .to_string()
                    .as_bytes(),
            ),
            &[("content-type", "application/json")],
        );
        assert!(
            reply.is_err(),
            "{point}: vman answered {:?}",
            reply.map(|r| r.text)
        );
        for _ in 0..500 {
            if !s.is_running() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert!(!s.is_running(), "{point}: vman still runs");
        let committed = point == "clone.after_commit";
        let s2 = Server::builder().storage(s.storage_handle()).start();
        let (_, vms) = s2.get("/vms");
        let ids: Vec<&str> = vms
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v["id"].as_str().unwrap())
            .collect();
        assert!(has_pattern(&root_a, 0x11), "{point}: source changed");
        if committed {
            assert_eq!(ids, ["a", "b"], "{point}");
            let root_b = s2.storage_path().join("vms/b/root.qcow2");
            assert!(has_pattern(&root_b, 0x11), "{point}");
            assert_eq!(disks_of(&s2, "b").len(), 1, "{point}");
            assert!(leftovers(&s2).iter().all(|p| !p.contains(".partial-")));
        } else {
            assert_eq!(ids, ["a"], "{point}");
            assert_eq!(leftovers(&s2), Vec::<String>::new(), "{point}");
            assert!(disks_of(&s2, "b").is_empty(), "{point}");
            assert!(
                s2.logs_contain("interrupted clone") || point == "clone.after_snapshot",
                "{point}"
            );
            // The name is free again and a clone of it now works.
            let (st, b) = s2.post_json("/vms/a/clone", &json!({"name": "b", "linked": linked}));
            assert_eq!(st, 201, "{point}: {b}");
        }
        // The observer has nothing half-made to report.
        let (_, obs) = s2.get("/observer/status");
        assert!(!obs.to_string().contains("partial_clone"), "{point}: {obs}");
        drop(s);
    }
}

/// A source whose start is making its root disk (a 512 MiB default boot
/// disk being copied): a clone is refused at once with `not_stopped`,
/// nothing of it is made, and the start is not disturbed. Once it runs, a
/// clone goes through a snapshot of the running VM and is made stopped.
#[test]
fn a_source_being_started_is_not_cloned_and_a_running_one_is_cloned_through_a_snapshot() {
    use std::io::Write;
    let images = tempfile::tempdir().unwrap();
    let small = images.path().join("small.qcow2");
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            small.to_str().unwrap(),
            "64M",
        ],
    );
    let default = images.path().join("big.qcow2");
    let mut f = std::io::BufWriter::new(std::fs::File::create(&default).unwrap());
    f.write_all(&std::fs::read(&small).unwrap()).unwrap();
    for _ in 0..512 {
        f.write_all(&[0xab; 1 << 20]).unwrap();
    }
    f.into_inner().unwrap().sync_all().unwrap();
    let s = Server::builder()
        .env("VMAN_DEFAULT_BOOT_DISK", default.to_str().unwrap())
        .env("VMAN_NETWORK_MODE", "none")
        .start();
    let _guests = crate::KillGuests(s.storage_path().to_owned());
    make_template(&s, "t", 1, 1);
    make_vm(&s, "t", Some("a"));
    let (start, refusals) = std::thread::scope(|scope| {
        let start = scope.spawn(|| s.post_json("/vms/a/actions/start", &json!({})));
        let mut refusals = Vec::new();
        while !start.is_finished() {
            if !s.get("/vms/a").1["provisioning"].is_null() {
                refusals.push(s.post_json("/vms/a/clone", &json!({"name": "b"})));
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        (start.join().unwrap(), refusals)
    });
    assert_eq!(start.0, 202, "{}", start.1);
    for reply in &refusals {
        let detail = assert_error(reply, 400);
        assert_eq!(reply.1["code"], "not_stopped", "{detail}");
        assert!(detail.contains("being started"), "{detail}");
    }
    assert_eq!(s.get("/vms/b").0, 404);
    assert!(!s.storage_path().join("vms/b").exists());
    assert_eq!(s.get("/vms/a/snapshots").1, json!([]));
    assert_eq!(s.get("/vms/a").1["state"], "running");
    // Running: cloned through a snapshot of the running VM, which stays up.
    let (code, body) = s.post_json("/vms/a/clone", &json!({"name": "b", "linked": true}));
    assert_eq!(code, 201, "{body}");
    assert_eq!(body["state"], "stopped", "{body}");
    assert_eq!(s.get("/vms/a").1["state"], "running");
    let snaps = s.get("/vms/a/snapshots").1;
    assert_eq!(snaps[0]["name"], "clone-b", "{snaps}");
    assert_eq!(snaps[0]["vm_state_at_snapshot"], "running", "{snaps}");
}
