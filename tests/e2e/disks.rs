//! Data disks: the API's answers to bad input (no guest needed), real
//! hot-plug and unplug that the tiny guest reports on its console, cold
//! attach at start, data that follows a disk from one VM to another,
//! attachments across VM and vman restarts, VM deletion, concurrent
//! attaches, and a guest that is slow to release a disk.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use serde_json::{json, Value};

use crate::harness::{qemu_io, Vman, GUEST};

fn create_disk(vman: &Vman, name: &str, size: u64) -> Value {
    let (s, b) = vman.post("/disks", json!({"name": name, "size": size}));
    assert_eq!(s, 201, "create disk {name}: {b}");
    b
}

fn attach(vman: &Vman, disk: &str, vm: &str) -> (u16, Value) {
    vman.post(&format!("/disks/{disk}/attach"), json!({"vm_id": vm}))
}

fn detach(vman: &Vman, disk: &str) -> (u16, Value) {
    vman.post(&format!("/disks/{disk}/detach"), json!({}))
}

fn disk_path(vman: &Vman, disk: &str) -> PathBuf {
    vman.storage.join("disks").join(format!("{disk}.qcow2"))
}

/// A stopped VM from the `tiny` template (which must exist).
fn vm(vman: &Vman, id: &str) {
    let (s, b) = vman.create_vm(json!({"template_name": "tiny", "name": id}));
    assert_eq!(s, 201, "{b}");
}

/// Starts a VM and waits until its shell takes input.
fn boot(vman: &Vman, id: &str, boots: usize) {
    let (s, b) = vman.start_vm(id);
    assert_eq!(s, 202, "{b}");
    vman.wait_console(id, "vman-guest: ready", boots);
}

/// Console lines that contain `marker` (a shell-computed one, so the echo
/// of the typed command never matches).
fn lines_with(vman: &Vman, id: &str, marker: &str) -> Vec<String> {
    vman.console(id)
        .lines()
        .filter(|l| l.contains(marker))
        .map(str::to_owned)
        .collect()
}

/// Runs `command` in the guest shell and returns its output (lines joined
/// by single spaces) followed by ` <tag>-<n>`, a marker the shell computes.
fn run(vman: &Vman, id: &str, command: &str, tag: &str) -> String {
    let n = 100 + tag.len() as u64;
    vman.type_line(
        id,
        &format!("echo \"$({command} 2>&1 | tr '\\n' ' ') {tag}-$(({n}+1))\""),
    );
    let marker = format!("{tag}-{}", n + 1);
    vman.wait_console(id, &marker, 1);
    let out = lines_with(vman, id, &marker).join("\n");
    out.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn wait_disk(vman: &Vman, disk: &str, state: &str) -> Value {
    vman.wait_state_of(&format!("/disks/{disk}"), state, GUEST)
}

#[test]
fn bad_requests_get_clear_errors_and_records_follow_the_rules() {
    let vman = Vman::builder().env("VMAN_HOTPLUG_SLOTS", "2").start();
    vman.template("tiny", 256);
    vm(&vman, "cold");
    vm(&vman, "other");

    // Creation: sizes, mount points, names.
    for (body, field) in [
        (json!({}), "size"),
        (json!({"size": 0}), "size"),
        (json!({"size": -1}), "size"),
        (json!({"size": 1.5}), "size"),
        (json!({"size": "1"}), "size"),
        (json!({"size": 1_000_000}), "size"),
        (json!({"size": 1, "mount_point": "data"}), "mount_point"),
        (json!({"size": 1, "mount_point": 7}), "mount_point"),
        (json!({"size": 1, "name": "../x"}), "name"),
    ] {
        let (s, b) = vman.post("/disks", body.clone());
        assert_eq!(s, 422, "{body}: {b}");
        let detail = b["detail"].as_str().unwrap_or("");
        assert!(detail.contains(field), "{body}: {b}");
    }
    let (s, b) = vman.post("/disks", json!({"size": 1, "mount_point": "/mnt/data"}));
    assert_eq!(s, 201, "{b}");
    let id = b["id"].as_str().expect("id").to_owned();
    assert!(uuid_like(&id), "{b}");
    assert_eq!(
        (
            b["state"].as_str(),
            b["size"].as_u64(),
            b["mount_point"].as_str()
        ),
        (Some("available"), Some(1), Some("/mnt/data")),
        "{b}"
    );
    assert_eq!(b["virtual_size"], 1u64 << 30, "{b}");
    assert_eq!(b["vm_id"], Value::Null);
    assert_eq!(
        b["device"],
        format!("/dev/disk/by-id/virtio-{}", &id[..20]),
        "{b}"
    );
    let path = PathBuf::from(b["path"].as_str().expect("path"));
    assert_eq!(path, disk_path(&vman, &id));
    assert!(path.exists());

    create_disk(&vman, "d1", 1);
    let (s, b) = vman.post("/disks", json!({"name": "d1", "size": 1}));
    assert_eq!(
        (s, b["detail"].as_str()),
        (400, Some("Disk with this ID already exists"))
    );
    assert_eq!(vman.get("/disks").as_array().map(Vec::len), Some(2));

    // Unknown things.
    for (method, path, body) in [
        ("GET", "/disks/nope".to_owned(), None),
        ("DELETE", "/disks/nope".to_owned(), None),
        (
            "POST",
            "/disks/nope/attach".to_owned(),
            Some(json!({"vm_id": "cold"})),
        ),
        ("POST", "/disks/nope/detach".to_owned(), Some(json!({}))),
        (
            "POST",
            "/disks/nope/resize".to_owned(),
            Some(json!({"size": 5})),
        ),
        (
            "POST",
            "/disks/d1/attach".to_owned(),
            Some(json!({"vm_id": "ghost"})),
        ),
        (
            "POST",
            "/disks/d1/attach".to_owned(),
            Some(json!({"vm_id": "../x"})),
        ),
    ] {
        let (s, b) = vman.call(method, &path, body);
        assert_eq!(s, 404, "{method} {path}: {b}");
        assert!(
            b["detail"]
                .as_str()
                .is_some_and(|d| d.contains("not found")),
            "{b}"
        );
    }
    // The first VMAN's answer to a missing vm_id: 400 `vm_id is required`.
    for body in [json!({}), json!({"vm_id": null}), json!({"vm_id": ""})] {
        let (s, b) = vman.post("/disks/d1/attach", body.clone());
        assert_eq!(
            (s, b["detail"].as_str()),
            (400, Some("vm_id is required")),
            "{body}: {b}"
        );
    }
    let (s, b) = vman.post("/disks/d1/attach", json!({"vm_id": 5}));
    assert_eq!(s, 422, "{b}");
    assert!(
        b["detail"].as_str().is_some_and(|d| d.contains("vm_id")),
        "{b}"
    );
    let (s, b) = detach(&vman, "d1");
    assert_eq!(
        (s, b["detail"].as_str()),
        (400, Some("Disk is not attached"))
    );

    // Attach to a stopped VM: recorded.
    let (s, b) = attach(&vman, "d1", "cold");
    assert_eq!(s, 200, "{b}");
    assert_eq!(
        (
            b["status"].as_str(),
            b["state"].as_str(),
            b["vm_id"].as_str()
        ),
        (Some("attached"), Some("attached"), Some("cold")),
        "{b}"
    );
    assert_eq!(b["device"], "/dev/disk/by-id/virtio-d1");
    let (s, b) = attach(&vman, "d1", "cold");
    assert_eq!(
        (s, b["detail"].as_str()),
        (400, Some("Disk is already attached to VM cold"))
    );
    let (s, b) = attach(&vman, "d1", "other");
    assert_eq!(
        (s, b["detail"].as_str()),
        (400, Some("Disk is already attached to VM cold"))
    );
    let (s, b) = vman.call("DELETE", "/disks/d1", None);
    assert_eq!(
        (s, b["detail"].as_str()),
        (400, Some("Disk is attached to VM cold"))
    );

    // Slots run out (VMAN_HOTPLUG_SLOTS=2).
    let (s, b) = attach(&vman, &id, "cold");
    assert_eq!(s, 200, "{b}");
    create_disk(&vman, "d3", 1);
    let (s, b) = attach(&vman, "d3", "cold");
    assert_eq!(s, 400, "{b}");
    assert!(
        b["detail"]
            .as_str()
            .is_some_and(|d| d.contains("no free hot-plug slot")),
        "{b}"
    );
    assert_eq!(vman.get("/disks/d3")["state"], "available");

    // Resize: grow only, offline with qemu-img.
    let (s, b) = vman.post("/disks/d3/resize", json!({"size": 3}));
    assert_eq!(s, 200, "{b}");
    assert_eq!(
        (b["size"].as_u64(), b["virtual_size"].as_u64()),
        (Some(3), Some(3 << 30))
    );
    let (s, b) = vman.post("/disks/d3/resize", json!({"size": 2}));
    assert_eq!(s, 400, "{b}");
    assert!(
        b["detail"]
            .as_str()
            .is_some_and(|d| d.contains("only grow")),
        "{b}"
    );
    let (s, b) = vman.post("/disks/d3/resize", json!({"size": 0}));
    assert_eq!(s, 422, "{b}");
    let (s, b) = vman.post("/disks/d3/resize", json!({}));
    assert_eq!(s, 422, "{b}");

    // Detach from a stopped VM: recorded; the slot is free again.
    let (s, b) = detach(&vman, "d1");
    assert_eq!(
        (s, b["status"].as_str(), b["vm_id"].clone()),
        (200, Some("detached"), Value::Null),
        "{b}"
    );
    let (s, b) = attach(&vman, "d3", "cold");
    assert_eq!(s, 200, "{b}");

    // Deleting the VM frees its disks.
    let (s, b) = vman.call("DELETE", "/vms/cold", None);
    assert_eq!(s, 204, "{b}");
    for d in [id.as_str(), "d3"] {
        let got = vman.get(&format!("/disks/{d}"));
        assert_eq!(
            (got["state"].as_str(), got["vm_id"].clone()),
            (Some("available"), Value::Null),
            "{got}"
        );
    }

    // A disk whose file vanished: state error, attach refused, delete works.
    std::fs::remove_file(disk_path(&vman, "d3")).expect("remove file");
    assert_eq!(vman.get("/disks/d3")["state"], "error");
    let (s, b) = attach(&vman, "d3", "other");
    assert_eq!(s, 400, "{b}");
    assert!(
        b["detail"].as_str().is_some_and(|d| d.contains("vanished")),
        "{b}"
    );
    assert_eq!(b["code"], "disk_file_refused", "{b}");
    assert_eq!(vman.get("/disks/d3")["state"], "error");
    let (s, _) = vman.call("DELETE", "/disks/d3", None);
    assert_eq!(s, 204);

    // Concurrent attach of one disk to two VMs: exactly one wins.
    vm(&vman, "third");
    for round in 0..5 {
        let name = format!("race{round}");
        create_disk(&vman, &name, 1);
        let answers: Vec<(u16, Value)> = std::thread::scope(|s| {
            let handles: Vec<_> = ["other", "third"]
                .into_iter()
                .map(|v| {
                    let (vman, name) = (&vman, &name);
                    s.spawn(move || attach(vman, name, v))
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("thread"))
                .collect()
        });
        let wins = answers.iter().filter(|(s, _)| *s == 200).count();
        assert_eq!(wins, 1, "{answers:?}");
        assert!(
            answers.iter().any(|(s, b)| *s == 400
                && b["detail"]
                    .as_str()
                    .is_some_and(|d| d.starts_with("Disk is already attached"))),
            "{answers:?}"
        );
        detach(&vman, &name);
    }

    // Delete removes the file.
    let (s, _) = vman.call("DELETE", &format!("/disks/{id}"), None);
    assert_eq!(s, 204);
    assert!(!path.exists());
    let (s, _) = vman.call("GET", &format!("/disks/{id}"), None);
    assert_eq!(s, 404);
}

fn uuid_like(id: &str) -> bool {
    id.len() == 36 && id.chars().filter(|c| *c == '-').count() == 4
}

/// Hot-plug into a running guest: it sees the disk (by serial), sees it
/// grow online, sees it go; with two disks, unplugging the first leaves the
/// second. A QEMU refusal midway leaves nothing behind.
#[test]
fn hot_plug_and_unplug_are_seen_by_the_guest() {
    let vman = Vman::builder().with_tiny_default().start();
    vman.template("tiny", 256);
    vm(&vman, "hp");
    boot(&vman, "hp", 1);
    create_disk(&vman, "alpha", 1);
    create_disk(&vman, "beta", 1);

    let (s, b) = attach(&vman, "alpha", "hp");
    assert_eq!(s, 200, "{b}");
    assert_eq!(
        (
            b["status"].as_str(),
            b["device"].as_str(),
            b["slot"].as_u64()
        ),
        (
            Some("attached"),
            Some("/dev/disk/by-id/virtio-alpha"),
            Some(0)
        ),
        "{b}"
    );
    vman.wait_console("hp", "vman-guest: disk added vdb", 1);
    let serial = run(&vman, "hp", "cat /sys/block/vdb/serial", "sn");
    assert!(serial.contains("alpha sn-"), "{serial}");

    let (s, b) = attach(&vman, "beta", "hp");
    assert_eq!((s, b["slot"].as_u64()), (200, Some(1)), "{b}");
    vman.wait_console("hp", "vman-guest: disk added vdc", 1);

    // Online growth: the guest sees the new capacity (in 512-byte sectors).
    let (s, b) = vman.post("/disks/beta/resize", json!({"size": 2}));
    assert_eq!((s, b["virtual_size"].as_u64()), (200, Some(2 << 30)), "{b}");
    let size = run(&vman, "hp", "cat /sys/block/vdc/size", "sz");
    assert!(size.contains("4194304 sz-"), "{size}");

    let (s, b) = detach(&vman, "alpha");
    assert_eq!((s, b["status"].as_str()), (200, Some("detached")), "{b}");
    assert_eq!(b["state"], "available");
    vman.wait_console("hp", "vman-guest: disk removed vdb", 1);
    let blocks = run(&vman, "hp", "ls /sys/block", "blk");
    assert!(
        blocks.contains("vdc") && !blocks.contains("vdb"),
        "{blocks}"
    );
    assert_eq!(vman.get("/disks/beta")["state"], "attached");
    let (s, b) = detach(&vman, "alpha");
    assert_eq!(
        (s, b["detail"].as_str()),
        (400, Some("Disk is not attached"))
    );

    // A data disk that grew a backing file is refused before QEMU sees it
    // (issue 9: data disks have none; QEMU would open it from the header).
    create_disk(&vman, "broken", 1);
    let path = disk_path(&vman, "broken");
    let qemu_img = |args: &[&str]| {
        let ok = Command::new("qemu-img")
            .args(args)
            .arg(&path)
            .status()
            .expect("qemu-img")
            .success();
        assert!(ok, "qemu-img {args:?}");
    };
    qemu_img(&[
        "rebase",
        "-u",
        "-F",
        "qcow2",
        "-b",
        "/nonexistent/base.qcow2",
    ]);
    let (s, b) = attach(&vman, "broken", "hp");
    assert_eq!(s, 400, "{b}");
    assert!(
        b["detail"]
            .as_str()
            .is_some_and(|d| d.contains("backing file")),
        "{b}"
    );
    qemu_img(&["rebase", "-u", "-b", ""]);

    // QEMU refuses the format layer (a cluster size it does not support,
    // which vman's header check does not judge): the file node added
    // before is removed again, the record stays available, and once the
    // file is fixed the same disk plugs fine (no node left over).
    let cluster_bits = |bits: u32| {
        use std::os::unix::fs::FileExt;
        std::fs::File::options()
            .write(true)
            .open(&path)
            .expect("open")
            .write_all_at(&bits.to_be_bytes(), 20)
            .expect("write");
    };
    cluster_bits(30);
    let (s, b) = attach(&vman, "broken", "hp");
    assert_eq!(s, 400, "{b}");
    assert!(
        b["detail"]
            .as_str()
            .is_some_and(|d| d.contains("blockdev-add")),
        "{b}"
    );
    assert_eq!(vman.get("/disks/broken")["state"], "available");
    cluster_bits(16);
    let (s, b) = attach(&vman, "broken", "hp");
    assert_eq!((s, b["slot"].as_u64()), (200, Some(0)), "{b}");
    vman.wait_console("hp", "vman-guest: disk added vdb", 2);

    for d in ["beta", "broken"] {
        let (s, b) = detach(&vman, d);
        assert_eq!(s, 200, "{b}");
    }
    vman.wait_console("hp", "vman-guest: disk removed vdc", 1);
    vman.wait_console("hp", "vman-guest: disk removed vdb", 2);
}

/// Cold attach to a stopped VM: the guest has the disk at boot. Data
/// written before the attach and from the guest is still there after a
/// detach and an attach to another running VM. Concurrent hot attaches of
/// one disk to two running VMs: one wins. Deleting a running VM frees its
/// disks.
#[test]
fn cold_attach_data_follows_the_disk_and_one_attach_wins() {
    let vman = Vman::builder().with_tiny_default().start();
    vman.template("tiny", 256);
    vm(&vman, "c1");
    vm(&vman, "c2");
    create_disk(&vman, "shared", 1);
    assert!(qemu_io(&disk_path(&vman, "shared"), "write -P 0x5a 0 4k"));

    let (s, b) = attach(&vman, "shared", "c1");
    assert_eq!((s, b["status"].as_str()), (200, Some("attached")), "{b}");
    boot(&vman, "c1", 1);
    boot(&vman, "c2", 1);
    vman.wait_console("c1", "vman-guest: disk added vdb", 1);
    assert!(!vman.console("c2").contains("disk added vdb"));
    let first = run(
        &vman,
        "c1",
        "dd if=/dev/vdb bs=4096 count=1 2>/dev/null | od -An -tx1 | head -1",
        "od",
    );
    assert!(first.contains("5a 5a 5a 5a"), "{first}");
    run(
        &vman,
        "c1",
        "printf 'vman-data-%s' ok | dd of=/dev/vdb bs=512 seek=16 conv=fsync 2>/dev/null && sync",
        "wr",
    );

    let (s, b) = detach(&vman, "shared");
    assert_eq!(s, 200, "{b}");
    vman.wait_console("c1", "vman-guest: disk removed vdb", 1);
    assert!(qemu_io(&disk_path(&vman, "shared"), "read -P 0x5a 0 4k"));
    let (s, b) = attach(&vman, "shared", "c2");
    assert_eq!(s, 200, "{b}");
    vman.wait_console("c2", "vman-guest: disk added vdb", 1);
    let back = run(
        &vman,
        "c2",
        "dd if=/dev/vdb bs=512 skip=16 count=1 2>/dev/null | head -c 12",
        "rd",
    );
    assert!(back.contains("vman-data-ok rd-"), "{back}");
    let first = run(
        &vman,
        "c2",
        "dd if=/dev/vdb bs=4096 count=1 2>/dev/null | od -An -tx1 | head -1",
        "od2",
    );
    assert!(first.contains("5a 5a 5a 5a"), "{first}");

    // Two running VMs, one disk, two attaches at once.
    create_disk(&vman, "race", 1);
    let answers: Vec<(u16, Value)> = std::thread::scope(|s| {
        let handles: Vec<_> = ["c1", "c2"]
            .into_iter()
            .map(|v| {
                let vman = &vman;
                s.spawn(move || attach(vman, "race", v))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("thread"))
            .collect()
    });
    assert_eq!(
        answers.iter().filter(|(s, _)| *s == 200).count(),
        1,
        "{answers:?}"
    );
    let winner = vman.get("/disks/race")["vm_id"]
        .as_str()
        .expect("attached")
        .to_owned();
    let disk_name = if winner == "c1" { "vdb" } else { "vdc" };
    vman.wait_console(&winner, &format!("vman-guest: disk added {disk_name}"), 1);

    // Deleting a running VM frees its disks.
    let (s, b) = vman.call("DELETE", "/vms/c2", None);
    assert_eq!(s, 204, "{b}");
    let shared = vman.get("/disks/shared");
    assert_eq!(
        (shared["state"].as_str(), shared["vm_id"].clone()),
        (Some("available"), Value::Null)
    );
    if winner == "c2" {
        assert_eq!(vman.get("/disks/race")["state"], "available");
    }
    assert!(qemu_io(&disk_path(&vman, "shared"), "read -P 0x5a 0 4k"));
}

/// Attachments survive a VM restart (plugged again at boot) and a vman
/// crash (still attached, and the unplug still works afterwards).
#[test]
fn attachments_survive_vm_and_vman_restarts() {
    let mut vman = Vman::builder().with_tiny_default().start();
    vman.template("tiny", 256);
    vm(&vman, "keep");
    boot(&vman, "keep", 1);
    create_disk(&vman, "kept", 1);
    let (s, b) = attach(&vman, "kept", "keep");
    assert_eq!(s, 200, "{b}");
    vman.wait_console("keep", "vman-guest: disk added vdb", 1);

    let (s, b) = vman.post("/vms/keep/actions/restart", json!({}));
    assert!(s == 200 || s == 202, "{s} {b}");
    vman.wait_console("keep", "vman-guest: ready", 2);
    vman.wait_console("keep", "vman-guest: disk added vdb", 2);

    vman.restart();
    assert_eq!(
        vman.wait_state("keep", "running", Duration::from_secs(30))["state"],
        "running"
    );
    let d = vman.get("/disks/kept");
    assert_eq!(
        (d["state"].as_str(), d["vm_id"].as_str()),
        (Some("attached"), Some("keep")),
        "{d}"
    );
    let (s, b) = detach(&vman, "kept");
    assert_eq!(s, 200, "{b}");
    vman.wait_console("keep", "vman-guest: disk removed vdb", 1);
    let (s, b) = attach(&vman, "kept", "keep");
    assert_eq!(s, 200, "{b}");
    vman.wait_console("keep", "vman-guest: disk added vdb", 3);
}

/// A guest that does not release the disk (its ACPI hot-plug event is
/// disabled) gets a 400 after the detach timeout and the disk stays
/// attached; once the guest listens again, a detach goes through and the
/// disk plugs again cleanly (no block node was left behind).
#[test]
fn a_deaf_guest_gets_a_400_and_the_disk_stays_attached() {
    let vman = Vman::builder()
        .with_tiny_default()
        .env("VMAN_DETACH_TIMEOUT", "2")
        .start();
    vman.template("tiny", 256);
    vm(&vman, "slow");
    boot(&vman, "slow", 1);
    create_disk(&vman, "sticky", 1);
    let (s, b) = attach(&vman, "sticky", "slow");
    assert_eq!(s, 200, "{b}");
    vman.wait_console("slow", "vman-guest: disk added vdb", 1);
    // QEMU signals PCI hot-plug to the guest through ACPI GPE 1; with it
    // disabled, the guest does not hear the unplug request.
    run(
        &vman,
        "slow",
        "echo disable > /sys/firmware/acpi/interrupts/gpe01",
        "deaf",
    );

    let (s, b) = detach(&vman, "sticky");
    assert_eq!(s, 400, "{b}");
    assert!(
        b["detail"]
            .as_str()
            .is_some_and(|d| d.contains("did not release")),
        "{b}"
    );
    assert_eq!(b["code"], "guest_did_not_release", "{b}");
    let d = vman.get("/disks/sticky");
    assert_eq!(
        (d["state"].as_str(), d["vm_id"].as_str()),
        (Some("attached"), Some("slow")),
        "{d}"
    );
    let (s, _) = vman.call("DELETE", "/disks/sticky", None);
    assert_eq!(s, 400);

    // Still attached a while later, and a second try meets the same deaf
    // guest: nothing gave up on the consistency.
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(vman.get("/disks/sticky")["state"], "attached");
    let (s, b) = detach(&vman, "sticky");
    assert_eq!(s, 400, "{b}");
    assert!(!vman.console("slow").contains("disk removed vdb"));

    // The guest listens again: the next detach goes through.
    run(
        &vman,
        "slow",
        "echo enable > /sys/firmware/acpi/interrupts/gpe01",
        "hear",
    );
    let (s, b) = detach(&vman, "sticky");
    assert_eq!((s, b["status"].as_str()), (200, Some("detached")), "{b}");
    vman.wait_console("slow", "vman-guest: disk removed vdb", 1);
    wait_disk(&vman, "sticky", "available");
    let (s, b) = attach(&vman, "sticky", "slow");
    assert_eq!(s, 200, "{b}");
    vman.wait_console("slow", "vman-guest: disk added vdb", 2);
}

/// The bug: a disk hot-plugged while the guest was still booting could not
/// be detached (the guest missed the one unplug request, and the detach
/// timed out). The attach and the detach both come right after QEMU runs,
/// before the guest's kernel listens; vman sends the request again until
/// the guest releases the disk.
#[test]
fn a_disk_attached_during_boot_can_be_detached() {
    let vman = Vman::builder()
        .with_tiny_default()
        .env("VMAN_DETACH_TIMEOUT", "150")
        .start();
    vman.template("tiny", 256);
    vm(&vman, "early");
    create_disk(&vman, "bootplug", 1);
    let (s, b) = vman.start_vm("early");
    assert_eq!(s, 202, "{b}");
    let (s, b) = attach(&vman, "bootplug", "early");
    assert_eq!(s, 200, "{b}");
    let booting = !vman.console("early").contains("vman-guest: ready");
    let (s, b) = detach(&vman, "bootplug");
    assert_eq!((s, b["status"].as_str()), (200, Some("detached")), "{b}");
    assert_eq!(b["state"], "available", "{b}");
    eprintln!(
        "attach and detach while booting: {booting}; unplug requests sent again: {}",
        vman.log_count("unplug request sent again")
    );

    // The guest comes up without the disk, and the disk plugs again.
    vman.wait_console("early", "vman-guest: ready", 1);
    let blocks = run(&vman, "early", "ls /sys/block", "blk");
    assert!(!blocks.contains("vdb"), "{blocks}");
    let (s, b) = attach(&vman, "bootplug", "early");
    assert_eq!(s, 200, "{b}");
    vman.wait_console("early", "vman-guest: disk added vdb", 1);
    let (s, b) = detach(&vman, "bootplug");
    assert_eq!(s, 200, "{b}");
    vman.wait_console("early", "vman-guest: disk removed vdb", 1);
}

/// The slot of one disk as the database records it.
fn recorded_slot(vman: &Vman, disk: &str) -> Option<i64> {
    let db = rusqlite::Connection::open(vman.storage.join("vman.db")).expect("db");
    db.busy_timeout(Duration::from_secs(10)).expect("busy");
    db.query_row("SELECT slot FROM disks WHERE id = ?1", [disk], |r| r.get(0))
        .expect("slot")
}

/// The bug: a start planned the slots of cold-attached disks and wrote the
/// moved ones (VMAN_HOTPLUG_SLOTS lowered) to the database before QEMU ran,
/// so a start that failed still changed the records. Now the move is
/// recorded only once QEMU runs with the disk there.
#[test]
fn boot_slot_moves_are_recorded_only_once_qemu_runs() {
    let storage = std::sync::Arc::new(tempfile::tempdir().expect("storage"));
    {
        let vman = Vman::builder()
            .storage(storage.clone())
            .with_tiny_default()
            .env("VMAN_HOTPLUG_SLOTS", "2")
            .start();
        vman.template("tiny", 256);
        vm(&vman, "v");
        create_disk(&vman, "d1", 1);
        create_disk(&vman, "d2", 1);
        for d in ["d1", "d2"] {
            let (s, b) = attach(&vman, d, "v");
            assert_eq!(s, 200, "{b}");
        }
        let (s, b) = detach(&vman, "d1");
        assert_eq!(s, 200, "{b}");
        assert_eq!(recorded_slot(&vman, "d2"), Some(1));
    }
    // One slot now, and a QEMU that cannot start: nothing is written.
    {
        let vman = Vman::builder()
            .storage(storage.clone())
            .with_tiny_default()
            .env("VMAN_HOTPLUG_SLOTS", "1")
            .env("VMAN_QEMU_BINARY", "/nonexistent/qemu-system-x86_64")
            .start();
        let (s, b) = vman.start_vm("v");
        assert_eq!(s, 400, "{b}");
        assert_eq!(recorded_slot(&vman, "d2"), Some(1));
    }
    // A QEMU that runs: the disk is recorded on the slot it boots on.
    let vman = Vman::builder()
        .storage(storage)
        .with_tiny_default()
        .env("VMAN_HOTPLUG_SLOTS", "1")
        .start();
    let (s, b) = vman.start_vm("v");
    assert_eq!(s, 202, "{b}");
    assert_eq!(recorded_slot(&vman, "d2"), Some(0));
    let (s, b) = vman.post("/vms/v/actions/stop", json!({"force": true}));
    assert_eq!(s, 202, "{b}");
}
