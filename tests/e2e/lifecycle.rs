//! Start, stop (ACPI, force, a guest that ignores ACPI), restart, delete,
//! per-VM serialisation, admission and QEMU failures.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::harness::{qemu_processes, Vman, GUEST};

fn booted_vm(vman: &Vman, id: &str) {
    let (s, b) = vman.create_vm(json!({"template_name": "tiny", "name": id}));
    assert_eq!(s, 201, "{b}");
    let (s, b) = vman.start_vm(id);
    assert_eq!((s, b["status"].as_str()), (202, Some("started")), "{b}");
    vman.wait_console(id, &format!("vman-guest: boot ok hostname={id}"), 1);
}

/// The seed's workflow: default boot disk, template, VM, start, boot marker
/// with the VM's name, stop, start again on the same root disk.
#[test]
fn seed_workflow_boots_the_default_disk_and_reuses_it() {
    let vman = Vman::builder().with_tiny_default().start();
    let health = vman.get("/health");
    let qemu = health["checks"]["qemu"]["detail"].as_str().unwrap_or("");
    assert!(
        qemu.starts_with("qemu-system-x86_64: QEMU emulator version"),
        "{health}"
    );
    let accel = health["checks"]["accelerator"]["detail"]
        .as_str()
        .unwrap_or("");
    assert!(accel.starts_with("tcg"), "{health}");
    vman.template("tiny", 256);
    // No wait for "ready": a stop pressed while the guest still boots must
    // work too (the button is pressed again until the guest listens).
    booted_vm(&vman, "web-1");
    let vm = vman.vm("web-1");
    assert_eq!(vm["state"], "running");
    assert_eq!(vm["root_disk"]["source"], "default");
    assert!(vm["pid"].as_i64().is_some_and(|p| p > 1), "{vm}");
    let root = vman.vm_dir("web-1").join("root.qcow2");
    assert_eq!(vm["root_disk"]["path"], root.to_str().expect("utf8"));
    assert_eq!(vman.log_count("copied to"), 1);

    let memory = vman.get("/health")["checks"]["memory"]["detail"].clone();
    assert!(
        memory.as_str().is_some_and(|m| m.starts_with("256 MiB of")),
        "{memory}"
    );
    let (s, b) = vman.post("/vms/web-1/actions/stop", json!({}));
    assert_eq!((s, b["status"].as_str()), (202, Some("stopped")), "{b}");
    assert_eq!(
        b["method"], "acpi",
        "the tiny guest powers off on the ACPI button: {b}"
    );
    let vm = vman.vm("web-1");
    assert_eq!(
        (vm["state"].as_str(), vm["pid"].as_i64()),
        (Some("stopped"), None)
    );
    assert!(qemu_processes(&vman.storage).is_empty());
    for f in ["qemu.pid", "qmp.sock", "console.sock"] {
        assert!(!vman.vm_dir("web-1").join(f).exists(), "{f} left behind");
    }
    // The console stays readable after the stop.
    assert!(vman.console("web-1").contains("boot ok hostname=web-1"));

    let inode = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&root).expect("root"));
    let (s, b) = vman.start_vm("web-1");
    assert_eq!(s, 202, "{b}");
    vman.wait_console("web-1", "vman-guest: boot ok hostname=web-1", 2);
    let vm = vman.vm("web-1");
    assert_eq!(vm["root_disk"]["source"], "existing");
    assert_eq!(
        vman.log_count("copied to"),
        1,
        "the default was copied again"
    );
    let inode2 = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&root).expect("root"));
    assert_eq!(inode, inode2);

    let (s, b) = vman.post("/vms/web-1/actions/start", json!({}));
    assert_eq!(
        (s, b["detail"].as_str()),
        (400, Some("VM is already running"))
    );
    assert_eq!(b["code"], "already_running", "{b}");
}

#[test]
fn force_stop_skips_acpi_and_restart_boots_again() {
    let vman = Vman::builder().with_tiny_default().start();
    vman.template("tiny", 256);
    booted_vm(&vman, "f1");
    let (s, b) = vman.post("/vms/f1/actions/restart", json!({}));
    assert_eq!((s, b["status"].as_str()), (202, Some("restarted")), "{b}");
    vman.wait_console("f1", "boot ok hostname=f1", 2);
    let (s, b) = vman.post("/vms/f1/actions/stop", json!({"force": true}));
    assert_eq!(s, 202, "{b}");
    assert_eq!(b["method"], "quit", "{b}");
    assert!(qemu_processes(&vman.storage).is_empty());
    let (s, b) = vman.post("/vms/f1/actions/stop", json!({}));
    assert_eq!((s, b["detail"].as_str()), (400, Some("VM is not running")));
    let (s, b) = vman.post("/vms/f1/actions/stop", json!({"force": "yes"}));
    assert_eq!(s, 422, "{b}");
}

/// A guest that ignores the power button is still stopped within the
/// timeout plus 2 s (the bound the issue names).
#[test]
fn guest_ignoring_acpi_is_stopped_within_the_timeout() {
    let vman = Vman::builder()
        .with_tiny_default()
        .env("VMAN_STOP_TIMEOUT", "3")
        .start();
    vman.template("tiny", 256);
    booted_vm(&vman, "deaf");
    vman.wait_console("deaf", "vman-guest: ready", 1);
    // The marker is computed by the shell, so the echo of the typed line
    // does not match it.
    vman.type_line("deaf", "killall acpid; echo acpid-gone-$((40+2))");
    vman.wait_console("deaf", "acpid-gone-42", 1);
    let started = Instant::now();
    let (s, b) = vman.post("/vms/deaf/actions/stop", json!({}));
    let took = started.elapsed();
    assert_eq!(s, 202, "{b}");
    assert_ne!(b["method"], "acpi", "{b}");
    assert!(took < Duration::from_secs(3 + 2), "stop took {took:?}");
    assert_eq!(vman.vm("deaf")["state"], "stopped");
    assert!(qemu_processes(&vman.storage).is_empty());
}

#[test]
fn ten_concurrent_starts_run_one_qemu() {
    let vman = Vman::builder().with_tiny_default().start();
    vman.template("tiny", 256);
    let (s, _) = vman.create_vm(json!({"template_name": "tiny", "name": "busy"}));
    assert_eq!(s, 201);
    let statuses: Vec<u16> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..10)
            .map(|_| scope.spawn(|| vman.start_vm("busy").0))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("thread"))
            .collect()
    });
    assert_eq!(
        statuses.iter().filter(|s| **s == 202).count(),
        1,
        "{statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|s| **s == 400).count(),
        9,
        "{statuses:?}"
    );
    assert_eq!(qemu_processes(&vman.storage).len(), 1);
}

#[test]
fn admission_refuses_a_start_beyond_host_memory() {
    let vman = Vman::builder()
        .with_tiny_default()
        .env("VMAN_MEMORY_OVERCOMMIT", "0.0001")
        .start();
    vman.template("tiny", 256);
    let (s, _) = vman.create_vm(json!({"template_name": "tiny", "name": "big"}));
    assert_eq!(s, 201);
    let (s, b) = vman.start_vm("big");
    assert_eq!(s, 400, "{b}");
    let detail = b["detail"].as_str().unwrap_or("");
    assert!(
        detail.contains("256 MiB") && detail.contains("allowed"),
        "{detail}"
    );
    assert_eq!(b["code"], "no_memory", "{b}");
    assert!(qemu_processes(&vman.storage).is_empty());
    assert_ne!(vman.vm("big")["state"], "running");
}

/// QEMU refuses the machine: 400 with QEMU's own words, nothing left over.
#[test]
fn qemu_that_cannot_start_gives_its_reason() {
    let vman = Vman::builder().with_tiny_default().start();
    let (s, b) = vman.post(
        "/templates",
        json!({"name": "huge", "cpu_count": 512, "ram_mib": 256}),
    );
    assert_eq!(s, 201, "{b}");
    let (s, _) = vman.create_vm(json!({"template_name": "huge", "name": "nope"}));
    assert_eq!(s, 201);
    let (s, b) = vman.start_vm("nope");
    assert_eq!(s, 400, "{b}");
    let detail = b["detail"].as_str().unwrap_or("");
    assert!(
        detail.to_lowercase().contains("cpus"),
        "QEMU's reason missing: {detail}"
    );
    assert_eq!(b["code"], "qemu_failed", "{b}");
    let vm = vman.vm("nope");
    assert_eq!(vm["state"], "error");
    assert!(
        vm["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("CPUs")),
        "{vm}"
    );
    assert!(qemu_processes(&vman.storage).is_empty());
    for f in ["qemu.pid", "qmp.sock", "console.sock"] {
        assert!(!vman.vm_dir("nope").join(f).exists(), "{f} left behind");
    }
}

#[test]
fn missing_qemu_binary_is_a_clear_400() {
    let vman = Vman::builder()
        .with_tiny_default()
        .env("VMAN_QEMU_BINARY", "/nonexistent/qemu-system-x86_64")
        .start();
    vman.template("tiny", 256);
    let (s, _) = vman.create_vm(json!({"template_name": "tiny", "name": "q"}));
    assert_eq!(s, 201);
    let (s, b) = vman.start_vm("q");
    assert_eq!(s, 400, "{b}");
    assert!(
        b["detail"]
            .as_str()
            .unwrap_or("")
            .contains("/nonexistent/qemu-system-x86_64"),
        "{b}"
    );
    assert_eq!(b["code"], "qemu_failed", "{b}");
}

#[test]
fn deleting_a_running_vm_stops_it_and_removes_its_folder() {
    let vman = Vman::builder().with_tiny_default().start();
    vman.template("tiny", 256);
    booted_vm(&vman, "gone");
    assert!(vman.vm_dir("gone").exists());
    let (s, b) = vman.call("DELETE", "/vms/gone", None);
    assert_eq!(s, 204, "{b}");
    assert!(!vman.vm_dir("gone").exists());
    assert!(qemu_processes(&vman.storage).is_empty());
    let (s, _) = vman.call("GET", "/vms/gone", None);
    assert_eq!(s, 404);
    let _ = GUEST;
}

/// A root disk QEMU cannot open: 400 with QEMU's own words, no leftovers.
#[test]
fn a_corrupt_root_disk_gives_qemus_reason() {
    let vman = Vman::builder().with_tiny_default().start();
    vman.template("tiny", 256);
    let (s, _) = vman.create_vm(json!({"template_name": "tiny", "name": "bad"}));
    assert_eq!(s, 201);
    let dir = vman.vm_dir("bad");
    std::fs::create_dir_all(&dir).expect("dir");
    let mut garbage = b"QFI\xfb\x00\x00\x00\x03".to_vec();
    garbage.resize(64 * 1024, 0);
    std::fs::write(dir.join("root.qcow2"), garbage).expect("write");
    let (s, b) = vman.start_vm("bad");
    assert_eq!(s, 400, "{b}");
    let detail = b["detail"].as_str().unwrap_or("");
    assert!(
        detail.contains("QEMU failed to start") && detail.contains("root"),
        "{detail}"
    );
    assert!(qemu_processes(&vman.storage).is_empty());
    for f in ["qemu.pid", "qmp.sock", "console.sock"] {
        assert!(!dir.join(f).exists(), "{f} left behind");
    }
    assert_eq!(vman.vm("bad")["state"], "error");
}
