//! Root disk progress while a start copies the boot disk: `provisioning`
//! on GET /vms/{id} (and the list) rises to its total while the start
//! request waits, and is null once the start answered. The boot disks are
//! real big files (1 GiB of data: long enough to watch, no test hook in
//! the server); QEMU starts from them without booting anything.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Value};

use crate::common::Server;
use crate::KillGuests;

const MIB: u64 = 1 << 20;

/// A file of `mib` MiB of data (no holes: a copy must move every byte)
/// after `head`.
fn big_file(path: &Path, head: &[u8], mib: u64) {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).expect("create"));
    f.write_all(head).expect("write");
    let chunk = vec![0xabu8; MIB as usize];
    for _ in 0..mib {
        f.write_all(&chunk).expect("write");
    }
    f.into_inner().expect("flush").sync_all().expect("sync");
}

/// A qcow2 with `mib` MiB of unreferenced data after its clusters: vman
/// copies the whole file (copy_file_range), QEMU does not care.
fn big_qcow2(dir: &Path, mib: u64) -> PathBuf {
    let small = dir.join("small.qcow2");
    let out = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&small)
        .arg("64M")
        .output()
        .expect("qemu-img");
    assert!(out.status.success(), "{out:?}");
    let path = dir.join("big.qcow2");
    big_file(&path, &std::fs::read(&small).expect("read"), mib);
    path
}

/// Starts `vm` on a thread and polls GET /vms/{vm} (and GET /vms) until
/// the start answered: its answer and every `provisioning` seen.
fn start_watching(s: &Server, vm: &str) -> ((u16, Value), Vec<Value>, Vec<Value>) {
    std::thread::scope(|scope| {
        let start = scope.spawn(|| s.post_json(&format!("/vms/{vm}/actions/start"), &json!({})));
        let (mut seen, mut listed) = (Vec::new(), Vec::new());
        while !start.is_finished() {
            let (status, body) = s.get(&format!("/vms/{vm}"));
            assert_eq!(status, 200, "{body}");
            // Not VM state: the VM stays stopped while its disk is made.
            if !body["provisioning"].is_null() {
                assert_eq!(body["state"], "stopped", "{body}");
                seen.push(body["provisioning"].clone());
                let (_, list) = s.get("/vms");
                let mine = list
                    .as_array()
                    .expect("list")
                    .iter()
                    .find(|v| v["id"] == vm)
                    .expect("listed")
                    .clone();
                listed.push(mine["provisioning"].clone());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        (start.join().expect("start thread"), seen, listed)
    })
}

/// Checks the samples: one method, one total, bytes only rising, within
/// the total, values in between seen (unless the filesystem cloned the
/// file at once), the last one the total.
#[track_caller]
fn check_rising(seen: &[Value], method_in: &[&str], total: Option<u64>) -> u64 {
    assert!(!seen.is_empty(), "no provisioning seen during the start");
    let method = seen[0]["method"].as_str().expect("method").to_owned();
    let want_total = seen[0]["bytes_total"].as_u64().expect("total");
    assert!(
        method_in.contains(&method.as_str()) || method == "reflink",
        "{method}"
    );
    if let Some(t) = total {
        assert_eq!(want_total, t, "{seen:?}");
    }
    assert!(want_total > 0);
    let mut last = 0;
    for p in seen {
        assert_eq!(p["method"], method.as_str(), "{p}");
        assert_eq!(p["bytes_total"].as_u64(), Some(want_total), "{p}");
        let done = p["bytes_done"].as_u64().expect("done");
        assert!(done >= last, "went back from {last} to {done}: {seen:?}");
        assert!(done <= want_total, "{p}");
        last = done;
    }
    let between: Vec<u64> = seen
        .iter()
        .filter_map(|p| p["bytes_done"].as_u64())
        .filter(|d| *d > 0 && *d < want_total)
        .collect();
    if method != "reflink" {
        let mut distinct: Vec<u64> = seen
            .iter()
            .filter_map(|p| p["bytes_done"].as_u64())
            .collect();
        distinct.dedup();
        assert!(
            !between.is_empty(),
            "no value between 0 and {want_total} seen in {} samples: {distinct:?}",
            seen.len()
        );
    }
    // Shown until the start answers, done: the copy's end is seen too.
    assert_eq!(last, want_total, "{seen:?}");
    eprintln!(
        "{} samples, {} in between, method {method}, total {want_total}",
        seen.len(),
        between.len()
    );
    want_total
}

fn template(s: &Server) {
    let (status, body) = s.post_json(
        "/templates",
        &json!({"name": "t", "cpu_count": 1, "ram_mib": 64}),
    );
    assert_eq!(status, 201, "{body}");
}

#[test]
fn start_copying_a_big_default_boot_disk_shows_bytes_rising_to_the_total() {
    let images = tempfile::tempdir().expect("tempdir");
    let default = big_qcow2(images.path(), 1024);
    let len = std::fs::metadata(&default).expect("stat").len();
    let s = Server::builder()
        .env("VMAN_DEFAULT_BOOT_DISK", default.to_str().expect("utf-8"))
        .env("VMAN_NETWORK_MODE", "none")
        .start();
    let _guests = KillGuests(s.storage_path().to_owned());
    template(&s);
    let (status, vm) = s.post_json("/vms", &json!({"template_name": "t", "name": "big"}));
    assert_eq!(status, 201, "{vm}");
    assert!(vm["provisioning"].is_null(), "{vm}");

    let ((status, body), seen, listed) = start_watching(&s, "big");
    assert_eq!(status, 202, "{body}");
    check_rising(&seen, &["copy_file_range", "read_write"], Some(len));
    // The list carries it too (not a stale cached answer). Each list is
    // read after a GET that saw progress; the start may end in between.
    assert!(listed.iter().any(|p| !p.is_null()), "{listed:?}");
    for p in listed.iter().filter(|p| !p.is_null()) {
        assert_eq!(p["bytes_total"].as_u64(), Some(len), "{p}");
    }
    let (_, after) = s.get("/vms/big");
    assert_eq!(after["state"], "running", "{after}");
    assert!(after["provisioning"].is_null(), "{after}");
    assert_eq!(after["root_disk"]["source"], "default", "{after}");
    let (_, list) = s.get("/vms");
    assert!(list[0]["provisioning"].is_null(), "{list}");

    // A start that makes nothing (the root disk exists now) shows nothing.
    let (status, body) = s.post_json("/vms/big/actions/stop", &json!({"force": true}));
    assert_eq!(status, 202, "{body}");
    let ((status, body), seen, _) = start_watching(&s, "big");
    assert_eq!(status, 202, "{body}");
    assert!(seen.is_empty(), "{seen:?}");
}

#[test]
fn start_converting_a_big_raw_boot_disk_shows_qemu_img_progress() {
    let s = Server::builder().env("VMAN_NETWORK_MODE", "none").start();
    let _guests = KillGuests(s.storage_path().to_owned());
    // Inside the default image folder, {storage}/templates.
    let images = s.storage_path().join("templates");
    std::fs::create_dir_all(&images).expect("mkdir");
    let raw = images.join("big.img");
    big_file(&raw, &[], 768);
    template(&s);
    let (status, vm) = s.post_json(
        "/vms",
        &json!({"template_name": "t", "name": "conv", "boot_disk": raw}),
    );
    assert_eq!(status, 201, "{vm}");
    let ((status, body), seen, _) = start_watching(&s, "conv");
    assert_eq!(status, 202, "{body}");
    // The total is what the source holds (its allocated size).
    let total = check_rising(&seen, &["convert"], None);
    assert!(total >= 768 * MIB, "{total}");
    let (_, after) = s.get("/vms/conv");
    assert!(after["provisioning"].is_null(), "{after}");
    assert_eq!(after["root_disk"]["source"], "boot_disk", "{after}");
}
