//! A full filesystem under a running vman: a small tmpfs the test mounts as
//! the storage (root only; CI runs as root), filled to the last byte. Every
//! refused request is a 507 (or the contract's 400 for a start) with the
//! reason, nothing is left behind, the recorded state stays true, and
//! everything works again once space is freed.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use serde_json::{json, Value};

use crate::harness::{qemu_processes, Vman, SERVER};

/// A tmpfs mounted on a temporary folder; unmounted when dropped (drop it
/// after the `Vman` that uses it, i.e. declare it first).
struct Tmpfs {
    dir: Arc<tempfile::TempDir>,
}

impl Tmpfs {
    fn mount(mib: u64) -> Option<Self> {
        // SAFETY: geteuid(2) has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: mounting a tmpfs needs root (CI runs as root)");
            return None;
        }
        let dir = Arc::new(
            tempfile::Builder::new()
                .prefix("vman-full-")
                .tempdir()
                .expect("tempdir"),
        );
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
            .arg(dir.path())
            .status()
            .expect("run mount");
        assert!(status.success(), "mount tmpfs: {status}");
        Some(Self { dir })
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

/// Writes a file until the filesystem refuses another byte.
fn fill(dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(name);
    let mut f = fs::File::create(&path).expect("create filler");
    for size in [1 << 20, 4096, 1] {
        let chunk = vec![0xa5u8; size];
        while let Ok(n) = f.write(&chunk) {
            if n == 0 {
                break;
            }
        }
    }
    assert!(
        fs::write(dir.join("probe"), b"x").is_err(),
        "the filesystem is not full"
    );
    let _ = fs::remove_file(dir.join("probe"));
    path
}

fn alive(pid: i64) -> bool {
    // SAFETY: kill(2) with signal 0 only checks the process exists.
    unsafe { libc::kill(pid as libc::pid_t, 0) == 0 }
}

fn health_files(storage: &Path) -> Vec<String> {
    fs::read_dir(storage)
        .expect("ls storage")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".health"))
        .collect()
}

/// Entries of a folder, sorted.
fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[track_caller]
fn assert_no_space(reply: &(u16, Value)) {
    assert_eq!(reply.0, 507, "{}", reply.1);
    assert_eq!(reply.1["code"], "insufficient_storage", "{}", reply.1);
    let detail = reply.1["detail"].as_str().unwrap_or("");
    assert!(detail.contains("No space left"), "{detail}");
}

fn boot(vman: &Vman, id: &str) -> i64 {
    let (s, b) = vman.create_vm(json!({"template_name": "tiny", "name": id}));
    assert_eq!(s, 201, "{b}");
    let (s, b) = vman.start_vm(id);
    assert_eq!(s, 202, "{b}");
    vman.wait_console(id, &format!("boot ok hostname={id}"), 1);
    vman.vm(id)["pid"].as_i64().expect("pid")
}

fn wait_health_ok(vman: &Vman) -> Value {
    let start = std::time::Instant::now();
    loop {
        let (s, h) = vman.call("GET", "/health", None);
        if s == 200 {
            return h;
        }
        assert!(start.elapsed() < SERVER, "health still {s}: {h}");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// The bug: DELETE of a running VM killed QEMU, then failed with 500 on the
/// database write, leaving a VM recorded running with a dead pid. Without a
/// space reserve the deletion is now refused first, with nothing changed; a
/// stop that cannot be recorded says so and the observer records it once
/// space is back.
#[test]
fn full_disk_delete_of_a_running_vm_is_a_507_and_the_vm_keeps_running() {
    let Some(tmpfs) = Tmpfs::mount(64) else {
        return;
    };
    let logs = tempfile::tempdir().expect("logs");
    let vman = Vman::builder()
        .with_tiny_default()
        .storage(tmpfs.dir.clone())
        .env("VMAN_LOG_DIR", logs.path())
        .env("VMAN_DB_RESERVE_MIB", "0")
        .env("VMAN_OBSERVER_INTERVAL", "1")
        .start();
    vman.template("tiny", 256);
    let pid = boot(&vman, "full");
    let filler = fill(tmpfs.path(), "filler");

    let put = vman.call(
        "PUT",
        "/vms/full/metadata",
        Some(json!({"hostname": "h", "user_data": "x".repeat(64 * 1024)})),
    );
    assert_no_space(&put);
    assert_eq!(vman.get("/vms/full/metadata")["hostname"], Value::Null);

    let disk = vman.post("/disks", json!({"name": "d2", "size": 1}));
    assert_no_space(&disk);
    assert_eq!(entries(&tmpfs.path().join("disks")), Vec::<String>::new());
    assert_eq!(vman.get("/disks"), json!([]));

    assert_no_space(&vman.create_vm(json!({"template_name": "tiny", "name": "more"})));

    assert_no_space(&vman.call("DELETE", "/vms/full", None));
    assert!(alive(pid), "QEMU was killed");
    let vm = vman.vm("full");
    assert_eq!(vm["state"], "running", "{vm}");
    assert_eq!(vm["pid"], pid, "{vm}");
    assert!(vman.vm_dir("full").join("root.qcow2").exists());

    let (s, h) = vman.call("GET", "/health", None);
    assert_eq!(s, 503, "{h}");
    assert_eq!(h["checks"]["storage"]["ok"], false, "{h}");
    assert_eq!(health_files(tmpfs.path()), Vec::<String>::new());

    // A stop cannot be recorded either: the answer says so, and the
    // observer records it once space is back.
    let (s, b) = vman.post("/vms/full/actions/stop", json!({}));
    assert_eq!(s, 507, "{b}");
    assert!(
        b["detail"]
            .as_str()
            .is_some_and(|d| d.contains("is stopped")),
        "{b}"
    );
    assert!(!alive(pid), "QEMU still runs after the stop");

    // Space back: everything works.
    fs::remove_file(filler).expect("rm filler");
    let vm = vman.wait_state("full", "stopped", SERVER);
    assert_eq!(vm["last_error"], Value::Null, "{vm}");
    assert_eq!(vm["pid"], Value::Null, "{vm}");
    let (s, b) = vman.call("DELETE", "/vms/full", None);
    assert_eq!(s, 204, "{b}");
    assert!(qemu_processes(&vman.storage).is_empty());
    assert!(!vman.vm_dir("full").exists());
    wait_health_ok(&vman);
    assert_eq!(health_files(tmpfs.path()), Vec::<String>::new());
}

/// A stop on a full disk is recorded through the space reserve; a start is
/// refused with the reason (400, as the contract says for a copy that
/// fails) and leaves no partial disk; once space is back the observer puts
/// the reserve back and the VM starts again.
#[test]
fn full_disk_stop_is_recorded_through_the_reserve_and_start_is_refused_cleanly() {
    let Some(tmpfs) = Tmpfs::mount(64) else {
        return;
    };
    let logs = tempfile::tempdir().expect("logs");
    let vman = Vman::builder()
        .with_tiny_default()
        .storage(tmpfs.dir.clone())
        .env("VMAN_LOG_DIR", logs.path())
        .env("VMAN_OBSERVER_INTERVAL", "1")
        .start();
    let reserve = tmpfs.path().join("vman.db-reserve");
    assert_eq!(fs::metadata(&reserve).expect("reserve").len(), 4 << 20);
    vman.template("tiny", 256);
    let pid = boot(&vman, "b");
    let (s, b) = vman.create_vm(json!({"template_name": "tiny", "name": "fresh"}));
    assert_eq!(s, 201, "{b}");
    let filler = fill(tmpfs.path(), "filler");

    let (s, b) = vman.post("/vms/b/actions/stop", json!({}));
    assert_eq!(s, 202, "{b}");
    assert!(!alive(pid) || qemu_processes(&vman.storage).is_empty());
    let vm = vman.vm("b");
    assert_eq!(vm["state"], "stopped", "{vm}");
    assert!(!reserve.exists(), "the reserve was not given up");
    let (s, h) = vman.call("GET", "/health", None);
    assert_eq!(s, 503, "{h}");
    assert!(
        h["checks"]["database"]["detail"]
            .as_str()
            .is_some_and(|d| d.contains("space reserve")),
        "{h}"
    );
    // The reserve's space is free now; fill it too.
    let filler2 = fill(tmpfs.path(), "filler2");

    let (s, b) = vman.start_vm("fresh");
    assert_eq!(s, 400, "{b}");
    assert!(
        b["detail"]
            .as_str()
            .is_some_and(|d| d.contains("No space left")),
        "{b}"
    );
    assert_eq!(entries(&vman.vm_dir("fresh")), Vec::<String>::new());

    let (s, b) = vman.start_vm("b");
    assert!(s == 400 || s == 507, "{s} {b}");
    assert_ne!(vman.vm("b")["state"], "running");
    assert!(qemu_processes(&vman.storage).is_empty());
    assert_eq!(health_files(tmpfs.path()), Vec::<String>::new());

    fs::remove_file(filler).expect("rm filler");
    fs::remove_file(filler2).expect("rm filler2");
    wait_health_ok(&vman);
    assert_eq!(fs::metadata(&reserve).expect("reserve back").len(), 4 << 20);
    let (s, b) = vman.start_vm("b");
    assert_eq!(s, 202, "{b}");
    vman.wait_console("b", "boot ok hostname=b", 2);
}

/// vman restarted (after a crash) on a full disk comes up, answers reads,
/// refuses writes with 507 and works again once space is freed.
#[test]
fn full_disk_vman_restarts_answers_reads_and_refuses_writes_with_507() {
    let Some(tmpfs) = Tmpfs::mount(16) else {
        return;
    };
    let logs = tempfile::tempdir().expect("logs");
    let mut vman = Vman::builder()
        .storage(tmpfs.dir.clone())
        .env("VMAN_LOG_DIR", logs.path())
        .start();
    vman.template("tiny", 64);
    for id in ["v1", "v2", "v3"] {
        let (s, b) = vman.create_vm(json!({"template_name": "tiny", "name": id}));
        assert_eq!(s, 201, "{b}");
    }
    let filler = fill(tmpfs.path(), "filler");
    vman.restart();
    assert_eq!(vman.get("/vms").as_array().map(Vec::len), Some(3));
    assert_no_space(&vman.call(
        "PUT",
        "/vms/v1/metadata",
        Some(json!({"hostname": "h", "user_data": "x".repeat(64 * 1024)})),
    ));
    let (s, h) = vman.call("GET", "/health", None);
    assert_eq!(s, 503, "{h}");
    assert_eq!(health_files(tmpfs.path()), Vec::<String>::new());
    fs::remove_file(filler).expect("rm filler");
    let (s, b) = vman.call("PUT", "/vms/v1/metadata", Some(json!({"hostname": "h"})));
    assert_eq!(s, 200, "{b}");
    wait_health_ok(&vman);
}
