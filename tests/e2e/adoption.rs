//! Taking over QEMU processes vman did not start in this run (issue 9,
//! holes 8, 12 and 13): a QEMU that does not answer QMP while vman starts
//! up, a VM folder deleted under a running QEMU, socket paths longer than a
//! UNIX socket address, and `.partial` copies left by a crash.

use std::fs;
use std::path::Path;
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

fn signal(pid: i32, sig: i32) {
    // SAFETY: kill(2) has no memory effects.
    assert_eq!(unsafe { libc::kill(pid, sig) }, 0, "kill -{sig} {pid}");
}

/// QEMU processes of the VM `id` (by the pid file on their command line).
fn qemus_of(storage: &Path, id: &str) -> Vec<i32> {
    let mark = format!("/vms/{id}/qemu.pid ");
    qemu_processes(storage)
        .into_iter()
        .filter(|(_, cmd)| cmd.contains(&mark))
        .map(|(pid, _)| pid)
        .collect()
}

fn wait_gone(pid: i32) {
    let start = Instant::now();
    while fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| !c.is_empty()) {
        assert!(start.elapsed() < SERVER, "pid {pid} still there");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn last_error(vm: &Value) -> &str {
    vm["last_error"].as_str().unwrap_or("")
}

/// Hole 8: two QEMUs stopped with SIGSTOP while vman restarts. The API
/// answers while they are still unadopted; they stay `running` with the
/// reason in `last_error` and their files in place; a start never makes a
/// second QEMU; DELETE kills one by pid; SIGCONT lets the other be adopted.
#[test]
fn unresponsive_qemu_at_start_up_stays_running_and_is_never_duplicated() {
    let mut vman = Vman::builder()
        .with_tiny_default()
        .env("VMAN_OBSERVER_INTERVAL", "1")
        .start();
    vman.template("tiny", 256);
    let frozen = boot(&vman, "frozen");
    let later = boot(&vman, "later");
    signal(frozen, libc::SIGSTOP);
    signal(later, libc::SIGSTOP);
    let t0 = Instant::now();
    vman.restart_listening();
    let listening = t0.elapsed();
    // The API answers at once, before any adoption could finish.
    for id in ["frozen", "later"] {
        let vm = vman.vm(id);
        assert_eq!(vm["state"], "running", "{vm}");
    }
    vman.wait_recovered();
    println!(
        "two stopped QEMUs: vman listening {:.2} s after its start, adoption attempts done after {:.2} s",
        listening.as_secs_f64(),
        t0.elapsed().as_secs_f64()
    );
    for (id, pid) in [("frozen", frozen), ("later", later)] {
        let vm = vman.vm(id);
        assert_eq!(vm["state"], "running", "{vm}");
        assert_eq!(vm["pid"].as_i64(), Some(i64::from(pid)), "{vm}");
        assert!(last_error(&vm).contains("adoption pending"), "{vm}");
        for f in ["qemu.pid", "qmp.sock", "console.sock"] {
            assert!(vman.vm_dir(id).join(f).exists(), "{id}: {f} was removed");
        }
    }
    let status = vman.get("/observer/status");
    let issues = status["last_issues"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(
        !issues
            .iter()
            .any(|i| i["issue_type"] == "vm_state_mismatch"),
        "{status}"
    );
    // A start is refused and makes no second QEMU; nor does a restart.
    let (s, b) = vman.start_vm("frozen");
    assert_eq!(s, 400, "{b}");
    assert!(
        crate::common::detail(&b).contains("adoption pending"),
        "{b}"
    );
    let (s, b) = vman.post("/vms/later/actions/start", json!({}));
    assert_eq!(s, 400, "{b}");
    assert_eq!(qemus_of(&vman.storage, "frozen"), vec![frozen]);
    assert_eq!(qemus_of(&vman.storage, "later"), vec![later]);
    // DELETE kills it by pid, then removes its files.
    let (s, b) = vman.call("DELETE", "/vms/frozen", None);
    assert_eq!(s, 204, "{b}");
    wait_gone(frozen);
    assert!(!vman.vm_dir("frozen").exists());
    assert!(qemus_of(&vman.storage, "frozen").is_empty());
    // SIGCONT: the retry adopts it; console and a graceful stop work.
    signal(later, libc::SIGCONT);
    let start = Instant::now();
    loop {
        let vm = vman.vm("later");
        if vm["state"] == "running" && vm["last_error"].is_null() {
            break;
        }
        assert!(start.elapsed() < GUEST, "not adopted after SIGCONT: {vm}");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(vman.log_count("vm later: adopted running QEMU"), 1);
    vman.type_line("later", "echo adopted-$((6*7))");
    vman.wait_console("later", "adopted-42", 1);
    assert_eq!(qemus_of(&vman.storage, "later"), vec![later]);
    let (s, b) = vman.post("/vms/later/actions/stop", json!({}));
    assert_eq!(s, 202, "{b}");
    assert_eq!(b["method"], "acpi", "{b}");
    assert!(qemus_of(&vman.storage, "later").is_empty());
}

/// Hole 8: a stop of a VM whose QEMU is stopped (SIGSTOP) kills it by pid.
#[test]
fn stop_of_an_unresponsive_qemu_kills_it_by_pid() {
    let mut vman = Vman::builder().with_tiny_default().start();
    vman.template("tiny", 256);
    let pid = boot(&vman, "stuck");
    signal(pid, libc::SIGSTOP);
    vman.restart();
    assert!(last_error(&vman.vm("stuck")).contains("adoption pending"));
    let (s, b) = vman.post("/vms/stuck/actions/stop", json!({}));
    assert_eq!(s, 202, "{b}");
    assert_eq!(b["method"], "killed", "{b}");
    wait_gone(pid);
    let vm = vman.wait_state("stuck", "stopped", SERVER);
    assert!(vm["last_error"].is_null(), "{vm}");
    assert!(!vman.vm_dir("stuck").join("qemu.pid").exists());
    // It starts again: one QEMU.
    let (s, b) = vman.start_vm("stuck");
    assert_eq!(s, 202, "{b}");
    assert_eq!(qemus_of(&vman.storage, "stuck").len(), 1);
}

/// Hole 13: the VM folder is deleted under a running QEMU (pid file and
/// sockets gone), then vman restarts. The process is found by its command
/// line: the VM stays `running` (unresponsive: its QMP socket is gone), a
/// start makes no second QEMU, stop ends it, and a start then boots one.
#[test]
fn vm_folder_deleted_under_running_qemu_gives_no_second_qemu() {
    let mut vman = Vman::builder().with_tiny_default().start();
    vman.template("tiny", 256);
    let pid = boot(&vman, "gone");
    fs::remove_dir_all(vman.vm_dir("gone")).expect("rm -r the VM folder");
    vman.restart();
    let vm = vman.vm("gone");
    assert_eq!(vm["state"], "running", "{vm}");
    assert_eq!(vm["pid"].as_i64(), Some(i64::from(pid)), "{vm}");
    assert!(last_error(&vm).contains("adoption pending"), "{vm}");
    let (s, b) = vman.start_vm("gone");
    assert_eq!(s, 400, "{b}");
    assert_eq!(qemus_of(&vman.storage, "gone"), vec![pid]);
    let (s, b) = vman.post("/vms/gone/actions/stop", json!({"force": true}));
    assert_eq!(s, 202, "{b}");
    wait_gone(pid);
    let (s, b) = vman.start_vm("gone");
    assert_eq!(s, 202, "{b}");
    vman.wait_console("gone", "boot ok hostname=gone", 1);
    assert_eq!(qemus_of(&vman.storage, "gone").len(), 1);
}

/// Starts a QEMU (no guest) with the command line of VM `id`'s QEMU, as a
/// vman that died before recording it would leave, and removes its pid file.
fn stray_qemu(vman: &Vman, id: &str) -> std::process::Child {
    let dir = vman.vm_dir(id);
    fs::create_dir_all(&dir).expect("vm dir");
    let stray = std::process::Command::new("qemu-system-x86_64")
        .args(["-machine", "none", "-nodefaults", "-display", "none", "-S"])
        .arg("-pidfile")
        .arg(dir.join("qemu.pid"))
        .args(["-qmp", "unix:qmp.sock,server=on,wait=off"])
        .current_dir(&dir)
        .spawn()
        .expect("qemu");
    let start = Instant::now();
    while !dir.join("qmp.sock").exists() {
        assert!(start.elapsed() < SERVER, "no QMP socket");
        std::thread::sleep(Duration::from_millis(20));
    }
    fs::remove_file(dir.join("qemu.pid")).expect("rm pid file");
    stray
}

/// Hole 13: a QEMU of the VM that vman does not know (no record of it, no
/// pid file) is found by its command line before a launch: the start adopts
/// it instead of launching a second QEMU.
#[test]
fn start_adopts_an_unmanaged_qemu_of_the_vm_instead_of_launching_a_second() {
    let vman = Vman::builder().with_tiny_default().start();
    vman.template("tiny", 256);
    let (s, b) = vman.create_vm(json!({"template_name": "tiny", "name": "twin"}));
    assert_eq!(s, 201, "{b}");
    let mut stray = stray_qemu(&vman, "twin");
    let pid = stray.id() as i32;
    let (s, b) = vman.start_vm("twin");
    assert_eq!(s, 202, "{b}");
    let vm = vman.vm("twin");
    assert_eq!(vm["state"], "running", "{vm}");
    assert_eq!(vm["pid"].as_i64(), Some(i64::from(pid)), "{vm}");
    assert_eq!(qemus_of(&vman.storage, "twin"), vec![pid]);
    let (s, b) = vman.post("/vms/twin/actions/stop", json!({"force": true}));
    assert_eq!(s, 202, "{b}");
    let _ = stray.wait();
    assert!(qemus_of(&vman.storage, "twin").is_empty());
}

/// The observer takes over such a QEMU by itself: the record becomes true
/// (`running` with its pid) within a pass or two, and a stop ends it.
#[test]
fn observer_takes_over_an_unmanaged_qemu_of_a_known_vm() {
    let vman = Vman::builder()
        .with_tiny_default()
        .env("VMAN_OBSERVER_INTERVAL", "1")
        .start();
    vman.template("tiny", 256);
    let (s, b) = vman.create_vm(json!({"template_name": "tiny", "name": "found"}));
    assert_eq!(s, 201, "{b}");
    let mut stray = stray_qemu(&vman, "found");
    let pid = stray.id() as i32;
    let vm = vman.wait_state("found", "running", SERVER);
    assert_eq!(vm["pid"].as_i64(), Some(i64::from(pid)), "{vm}");
    let (s, b) = vman.post("/vms/found/actions/stop", json!({"force": true}));
    assert_eq!(s, 202, "{b}");
    let _ = stray.wait();
    assert!(qemus_of(&vman.storage, "found").is_empty());
}

/// Hole 12: a 63-character name under a storage path of 60 characters
/// (its console socket path is 141 bytes, over the 107 a UNIX socket address
/// holds) starts, boots, answers on its console, and is adopted again after
/// a restart.
#[test]
fn a_63_character_name_under_a_long_storage_path_boots() {
    let base = tempfile::Builder::new()
        .prefix("vman-test-")
        .tempdir()
        .expect("tempdir");
    let mut storage = base.path().to_path_buf();
    let pad = 60usize.saturating_sub(storage.as_os_str().len() + 1);
    storage.push("s".repeat(pad.max(1)));
    fs::create_dir_all(storage.join("templates")).expect("storage");
    let mut vman = Vman::builder()
        .with_tiny_default()
        .env("VMAN_STORAGE_PATH", &storage)
        .start();
    vman.storage = storage.clone();
    vman.template("tiny", 256);
    let id = format!("v{}", "n".repeat(62));
    assert_eq!(id.len(), 63);
    let sock = storage.join("vms").join(&id).join("console.sock");
    assert!(sock.as_os_str().len() > 107, "{}", sock.display());
    let pid = boot(&vman, &id);
    vman.type_line(&id, "echo long-$((6*7))");
    vman.wait_console(&id, "long-42", 1);
    vman.restart();
    let vm = vman.vm(&id);
    assert_eq!(vm["state"], "running", "{vm}");
    assert!(vm["last_error"].is_null(), "{vm}");
    assert_eq!(
        vman.log_count(&format!("vm {id}: adopted running QEMU pid {pid}")),
        1
    );
    vman.type_line(&id, "echo again-$((6*7))");
    vman.wait_console(&id, "again-42", 1);
    let (s, b) = vman.post(&format!("/vms/{id}/actions/stop"), json!({}));
    assert_eq!(s, 202, "{b}");
    assert!(qemus_of(&storage, &id).is_empty());
}

/// Hole 13: `.partial` copies are reported by the observer while present
/// and removed at start-up.
#[test]
fn partial_copies_left_by_a_crash_are_reported_then_removed_at_start_up() {
    let mut vman = Vman::builder().env("VMAN_OBSERVER_INTERVAL", "1").start();
    let vm_dir = vman.vm_dir("crashed");
    fs::create_dir_all(&vm_dir).expect("vm dir");
    fs::create_dir_all(vman.storage.join("disks")).expect("disks");
    let root = vm_dir.join(".root.qcow2.partial-0123456789abcdef");
    let data = vman.storage.join("disks/.d1.qcow2.partial-0123");
    fs::write(&root, b"half a disk").expect("partial");
    fs::write(&data, b"half a disk").expect("partial");
    let start = Instant::now();
    loop {
        let status = vman.get("/observer/status");
        let found = status["last_issues"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter(|i| i["issue_type"] == "partial_file")
                    .count()
            })
            .unwrap_or(0);
        if found == 2 {
            break;
        }
        assert!(start.elapsed() < SERVER, "partials not reported: {status}");
        std::thread::sleep(Duration::from_millis(100));
    }
    vman.restart();
    assert!(!root.exists() && !data.exists());
    assert_eq!(vman.log_count("left by an interrupted copy"), 2);
}
