//! Supervision: exits noticed at once, a bounded console, re-adoption after
//! vman crashes, and the observer's reports and repairs.

use std::fs;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::harness::{qemu_processes, Vman, GUEST, SERVER};

fn boot(vman: &Vman, id: &str) -> i32 {
    let (s, b) = vman.create_vm(json!({"template_name": "tiny", "name": id}));
    assert_eq!(s, 201, "{b}");
    let (s, b) = vman.start_vm(id);
    assert_eq!(s, 202, "{b}");
    vman.wait_console(id, &format!("boot ok hostname={id}"), 1);
    vman.vm(id)["pid"].as_i64().expect("pid") as i32
}

fn kill9(pid: i32) {
    // SAFETY: kill(2) has no memory effects.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0, "kill {pid}");
}

/// The bound the issue names: `error` within 1 s of QEMU's death.
#[test]
fn kill_9_of_qemu_is_an_error_within_a_second() {
    let vman = Vman::builder().with_tiny_default().start();
    vman.template("tiny", 256);
    let pid = boot(&vman, "k");
    let killed = Instant::now();
    kill9(pid);
    let vm = vman.wait_state("k", "error", SERVER);
    let seen = killed.elapsed();
    assert!(seen < Duration::from_secs(1), "took {seen:?}");
    let err = vm["last_error"].as_str().unwrap_or("");
    assert!(err.contains("signal 9"), "{vm}");
    assert!(
        err.contains("boot ok hostname=k"),
        "console lines missing: {err}"
    );
    assert_eq!(vm["pid"], Value::Null);
    assert!(!vman.vm_dir("k").join("qemu.pid").exists());
    assert!(vman
        .logs()
        .iter()
        .any(|l| l.contains("WARNING") && l.contains("QEMU exited unexpectedly")));
    // An errored VM starts again.
    let (s, b) = vman.start_vm("k");
    assert_eq!(s, 202, "{b}");
}

#[test]
fn power_off_from_inside_the_guest_is_a_clean_stop() {
    let vman = Vman::builder().with_tiny_default().start();
    vman.template("tiny", 256);
    boot(&vman, "p");
    vman.wait_console("p", "vman-guest: ready", 1);
    vman.type_line("p", "poweroff -f");
    let vm = vman.wait_state("p", "stopped", GUEST);
    assert_eq!(vm["last_error"], Value::Null, "{vm}");
    assert!(qemu_processes(&vman.storage).is_empty());
}

#[test]
fn a_guest_printing_forever_keeps_its_console_bounded() {
    const MAX: u64 = 64 * 1024;
    let vman = Vman::builder()
        .with_tiny_default()
        .env("VMAN_CONSOLE_MAX_BYTES", MAX.to_string())
        .start();
    vman.template("tiny", 256);
    boot(&vman, "chatty");
    vman.wait_console("chatty", "vman-guest: ready", 1);
    vman.type_line(
        "chatty",
        "i=0; while true; do i=$((i+1)); echo flood-line-$i-padding-padding-padding; done",
    );
    let file = vman.vm_dir("chatty").join("console.txt");
    let start = Instant::now();
    let mut max_seen = 0;
    // Until the first lines were dropped, i.e. the bound was reached.
    loop {
        let size = fs::metadata(&file).map(|m| m.len()).unwrap_or(0);
        max_seen = max_seen.max(size);
        assert!(size <= MAX, "console.txt is {size} bytes, bound {MAX}");
        let body = vman.get("/vms/chatty/console");
        if !body["console"].as_str().unwrap_or("").contains("boot ok")
            && body["file_size"].as_u64() > Some(MAX / 4)
        {
            assert!(body["size"].as_u64() <= Some(50 * 1024), "{}", body["size"]);
            assert!(body["console"]
                .as_str()
                .unwrap_or("")
                .contains("flood-line-"));
            break;
        }
        assert!(
            start.elapsed() < GUEST,
            "the console never rotated (max seen {max_seen})"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    for _ in 0..20 {
        let size = fs::metadata(&file).map(|m| m.len()).unwrap_or(0);
        assert!(size <= MAX, "console.txt is {size} bytes, bound {MAX}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Three VMs run, vman is killed, comes back: all three are still running
/// (same pids, no duplicates), their consoles still work, stop works.
#[test]
fn vms_are_re_adopted_after_kill_9_of_vman() {
    let mut vman = Vman::builder().with_tiny_default().start();
    vman.template("tiny", 256);
    let pids: Vec<i32> = ["r1", "r2", "r3"]
        .iter()
        .map(|id| boot(&vman, id))
        .collect();
    vman.wait_console("r1", "vman-guest: ready", 1);
    vman.restart();
    for (id, pid) in ["r1", "r2", "r3"].iter().zip(&pids) {
        let vm = vman.vm(id);
        assert_eq!(vm["state"], "running", "{vm}");
        assert_eq!(vm["pid"].as_i64(), Some(i64::from(*pid)));
    }
    assert_eq!(qemu_processes(&vman.storage).len(), 3);
    assert_eq!(vman.log_count("adopted running QEMU"), 3);
    // The console is attached again: typed input is answered.
    vman.type_line("r1", "echo after-restart-$((6*7))");
    vman.wait_console("r1", "after-restart-42", 1);
    let (s, b) = vman.post("/vms/r2/actions/stop", json!({}));
    assert_eq!(s, 202, "{b}");
    assert_eq!(b["method"], "acpi", "{b}");
    assert_eq!(qemu_processes(&vman.storage).len(), 2);
    // And exits of adopted VMs are still noticed at once.
    kill9(pids[2]);
    let vm = vman.wait_state("r3", "error", SERVER);
    assert!(
        vm["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("unexpectedly")),
        "{vm}"
    );
}

/// A VM whose QEMU died while vman was down is marked at start-up, and a
/// pid file whose pid now belongs to another process is not taken for it.
#[test]
fn deaths_while_vman_is_down_are_marked_and_stale_pids_not_trusted() {
    let mut vman = Vman::builder().with_tiny_default().start();
    vman.template("tiny", 256);
    let dead = boot(&vman, "dead");
    let reused = boot(&vman, "reused");
    vman.kill9();
    kill9(dead);
    kill9(reused);
    let mut imposter = Command::new("sleep").arg("300").spawn().expect("sleep");
    let deadline = Instant::now() + SERVER;
    while !qemu_processes(&vman.storage).is_empty() {
        assert!(Instant::now() < deadline, "QEMU still there");
        std::thread::sleep(Duration::from_millis(20));
    }
    fs::write(
        vman.vm_dir("reused").join("qemu.pid"),
        imposter.id().to_string(),
    )
    .expect("pid file");
    vman.restart();
    for id in ["dead", "reused"] {
        let vm = vman.vm(id);
        assert_eq!(vm["state"], "error", "{vm}");
        assert!(
            vm["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("gone when vman started")),
            "{vm}"
        );
    }
    assert!(
        imposter.try_wait().expect("try_wait").is_none(),
        "the imposter was touched"
    );
    let _ = imposter.kill();
    let _ = imposter.wait();
}

fn observer_issues(vman: &Vman, wanted: &str) -> Vec<Value> {
    let start = Instant::now();
    loop {
        let status = vman.get("/observer/status");
        let issues: Vec<Value> = status["last_issues"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .filter(|i| i["issue_type"] == wanted)
            .collect();
        if !issues.is_empty() {
            return issues;
        }
        assert!(start.elapsed() < SERVER, "no {wanted} reported: {status}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn observer_reports_orphans_and_missing_disks_and_repairs_stale_running() {
    let vman = Vman::builder()
        .with_tiny_default()
        .env("VMAN_OBSERVER_INTERVAL", "1")
        .start();
    let health = vman.get("/health");
    assert_eq!(health["checks"]["observer"]["ok"], true, "{health}");
    vman.template("tiny", 256);

    // An orphan QEMU: runs from our storage, no VM record.
    let ghost = vman.vm_dir("ghost");
    fs::create_dir_all(&ghost).expect("ghost dir");
    let mut orphan = Command::new("qemu-system-x86_64")
        .args([
            "-machine",
            "none",
            "-nodefaults",
            "-display",
            "none",
            "-S",
            "-qmp",
        ])
        .arg(format!(
            "unix:{}/qmp.sock,server=on,wait=off",
            ghost.display()
        ))
        .spawn()
        .expect("qemu");
    // As the first VMAN: the VM id is the resource, the pid in the details.
    let orphan_pid = orphan.id().to_string();
    let issues = observer_issues(&vman, "orphan_process");
    assert!(
        issues
            .iter()
            .any(|i| i["resource_id"].as_str() == Some("ghost")
                && i["details"]
                    .as_str()
                    .is_some_and(|d| d.contains(&format!("pid {orphan_pid} ")))),
        "{issues:?}"
    );
    let _ = orphan.kill();
    let _ = orphan.wait();

    // A stopped VM whose root disk vanished.
    let (s, _) = vman.create_vm(json!({"template_name": "tiny", "name": "nodisk"}));
    assert_eq!(s, 201);
    let (s, b) = vman.start_vm("nodisk");
    assert_eq!(s, 202, "{b}");
    let (s, _) = vman.post("/vms/nodisk/actions/stop", json!({"force": true}));
    assert_eq!(s, 202);
    fs::remove_file(vman.vm_dir("nodisk").join("root.qcow2")).expect("rm root");
    let issues = observer_issues(&vman, "missing_disk");
    assert!(
        issues.iter().any(|i| i["resource_id"] == "nodisk"),
        "{issues:?}"
    );

    // Data disks: a file without a record, a record without a file.
    fs::create_dir_all(vman.storage.join("disks")).expect("disks dir");
    fs::write(vman.storage.join("disks/stray.qcow2"), b"").expect("stray");
    let issues = observer_issues(&vman, "orphan_disk_file");
    assert!(
        issues.iter().any(|i| i["details"]
            .as_str()
            .is_some_and(|d| d.contains("stray.qcow2"))),
        "{issues:?}"
    );
    let (s, b) = vman.post("/disks", json!({"name": "lost", "size": 1}));
    assert_eq!(s, 201, "{b}");
    fs::remove_file(vman.storage.join("disks/lost.qcow2")).expect("rm disk");
    let issues = observer_issues(&vman, "missing_disk_file");
    assert!(
        issues.iter().any(|i| i["resource_id"] == "lost"),
        "{issues:?}"
    );

    // A VM recorded running without any QEMU: repaired.
    let db = rusqlite::Connection::open(vman.storage.join("vman.db")).expect("db");
    db.busy_timeout(Duration::from_secs(10)).expect("busy");
    let (s, _) = vman.create_vm(json!({"template_name": "tiny", "name": "stale"}));
    assert_eq!(s, 201);
    db.execute(
        "UPDATE vms SET state = 'running', pid = 999999 WHERE id = 'stale'",
        [],
    )
    .expect("update");
    let vm = vman.wait_state("stale", "error", SERVER);
    assert!(
        vm["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("observer")),
        "{vm}"
    );
    let issues = observer_issues(&vman, "vm_state_mismatch");
    assert!(
        issues
            .iter()
            .any(|i| i["resource_id"] == "stale" && i["repaired"] == true),
        "{issues:?}"
    );
}
