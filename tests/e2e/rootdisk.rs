//! The default boot disk feature: precedence of root disks, the allowed
//! image folders, independence of copies, crash safety and a full disk.

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::harness::{qemu_io, qemu_processes, tiny_image, Vman, SERVER};

fn templates(vman: &Vman) -> std::path::PathBuf {
    vman.storage.join("templates")
}

fn new_vm(vman: &Vman, body: serde_json::Value) {
    let (s, b) = vman.create_vm(body);
    assert_eq!(s, 201, "{b}");
}

#[test]
fn explicit_qcow2_path_is_used_as_is() {
    let vman = Vman::builder().start();
    vman.template("tiny", 256);
    let own = templates(&vman).join("mine.qcow2");
    fs::copy(tiny_image(), &own).expect("copy");
    new_vm(
        &vman,
        json!({"template_name": "tiny", "name": "ex", "qcow2_path": own}),
    );
    let (s, b) = vman.start_vm("ex");
    assert_eq!(s, 202, "{b}");
    vman.wait_console("ex", "boot ok hostname=ex", 1);
    let vm = vman.vm("ex");
    assert_eq!(vm["root_disk"]["source"], "explicit");
    assert_eq!(vm["root_disk"]["path"], own.to_str().expect("utf8"));
    assert!(!vman.vm_dir("ex").join("root.qcow2").exists());
}

#[test]
fn an_existing_root_disk_wins_over_the_default() {
    let vman = Vman::builder().with_tiny_default().start();
    vman.template("tiny", 256);
    new_vm(&vman, json!({"template_name": "tiny", "name": "pre"}));
    let dir = vman.vm_dir("pre");
    fs::create_dir_all(&dir).expect("dir");
    fs::copy(tiny_image(), dir.join("root.qcow2")).expect("copy");
    assert!(qemu_io(&dir.join("root.qcow2"), "write -P 0x5a 60M 4k"));
    let (s, b) = vman.start_vm("pre");
    assert_eq!(s, 202, "{b}");
    assert_eq!(vman.vm("pre")["root_disk"]["source"], "existing");
    assert_eq!(vman.log_count("copied to"), 0);
    vman.wait_console("pre", "boot ok hostname=pre", 1);
    let (s, _) = vman.post("/vms/pre/actions/stop", json!({"force": true}));
    assert_eq!(s, 202);
    assert!(
        qemu_io(&dir.join("root.qcow2"), "read -P 0x5a 60M 4k"),
        "our own disk was replaced"
    );
}

#[test]
fn per_vm_boot_disk_is_copied_instead_of_the_default() {
    let vman = Vman::builder().start();
    vman.template("tiny", 256);
    let other = templates(&vman).join("other.qcow2");
    fs::copy(tiny_image(), &other).expect("copy");
    new_vm(
        &vman,
        json!({"template_name": "tiny", "name": "bd", "boot_disk": other}),
    );
    let (s, b) = vman.start_vm("bd");
    assert_eq!(s, 202, "{b}");
    let vm = vman.vm("bd");
    assert_eq!(vm["root_disk"]["source"], "boot_disk");
    assert!(vman.vm_dir("bd").join("root.qcow2").exists());
    vman.wait_console("bd", "boot ok hostname=bd", 1);
}

#[test]
fn a_missing_default_warns_and_falls_back_to_an_empty_10_gib_disk() {
    let vman = Vman::builder()
        .env("VMAN_DEFAULT_BOOT_DISK", "/nonexistent/base.qcow2")
        .start();
    let warning =
        "WARNING | vman::app | Default boot disk specified but not found: /nonexistent/base.qcow2";
    assert_eq!(vman.log_count(warning), 1, "{:#?}", vman.logs());
    vman.template("tiny", 256);
    new_vm(&vman, json!({"template_name": "tiny", "name": "blank"}));
    let (s, b) = vman.start_vm("blank");
    assert_eq!(s, 202, "{b}");
    let vm = vman.vm("blank");
    assert_eq!(vm["root_disk"]["source"], "empty");
    // 10 GiB, as `qemu-img create ... 10G` of the first VMAN.
    assert_eq!(vm["root_disk"]["virtual_size"], 10u64 << 30);
    assert!(
        vman.log_count("Default boot disk specified but not found: /nonexistent/base.qcow2") >= 2
    );
    let (s, _) = vman.post("/vms/blank/actions/stop", json!({"force": true}));
    assert_eq!(s, 202);
}

/// A default that appears after start-up is used: it is checked at each start.
#[test]
fn a_default_that_appears_later_is_used() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let later = tmp.path().join("later.qcow2");
    let vman = Vman::builder()
        .env("VMAN_DEFAULT_BOOT_DISK", &later)
        .start();
    vman.template("tiny", 256);
    fs::copy(tiny_image(), &later).expect("copy");
    new_vm(&vman, json!({"template_name": "tiny", "name": "late"}));
    let (s, b) = vman.start_vm("late");
    assert_eq!(s, 202, "{b}");
    assert_eq!(vman.vm("late")["root_disk"]["source"], "default");
    assert!(
        vman.log_count(&format!("{} copied to", later.display())) == 1,
        "{:#?}",
        vman.logs()
    );
}

#[test]
fn paths_outside_the_image_folders_and_non_images_are_refused() {
    let vman = Vman::builder().with_tiny_default().start();
    vman.template("tiny", 256);
    let t = templates(&vman);
    std::os::unix::fs::symlink("/etc/shadow", t.join("shadow.qcow2")).expect("symlink");
    fs::write(t.join("notes.qcow2"), "just some text, not a disk\n").expect("write");
    let cases = [
        ("qcow2_path", "/etc/shadow".to_owned()),
        ("boot_disk", "/etc/passwd".to_owned()),
        ("qcow2_path", t.join("shadow.qcow2").display().to_string()),
        ("boot_disk", format!("{}/../vman.db", t.display())),
        ("qcow2_path", t.join("missing.qcow2").display().to_string()),
        ("boot_disk", t.join("notes.qcow2").display().to_string()),
    ];
    for (field, path) in cases {
        let (s, b) = vman.create_vm(json!({"template_name": "tiny", "name": "evil", field: path}));
        assert_eq!(s, 400, "{field}={path}: {b}");
        assert!(
            b["detail"].as_str().is_some_and(|d| d.starts_with(field)),
            "{b}"
        );
    }
    let (s, list) = vman.call("GET", "/vms", None);
    assert_eq!((s, list.as_array().map(Vec::len)), (200, Some(0)));
}

#[test]
fn every_vm_gets_an_independent_copy() {
    let default = tempfile::tempdir().expect("tempdir");
    let base = default.path().join("base.qcow2");
    fs::copy(tiny_image(), &base).expect("copy");
    let vman = Vman::builder().env("VMAN_DEFAULT_BOOT_DISK", &base).start();
    vman.template("tiny", 256);
    for id in ["a", "b"] {
        new_vm(&vman, json!({"template_name": "tiny", "name": id}));
        let (s, b) = vman.start_vm(id);
        assert_eq!(s, 202, "{b}");
        let (s, _) = vman.post(&format!("/vms/{id}/actions/stop"), json!({"force": true}));
        assert_eq!(s, 202);
    }
    let a = vman.vm_dir("a").join("root.qcow2");
    let b = vman.vm_dir("b").join("root.qcow2");
    assert!(qemu_io(&a, "write -P 0xa7 60M 4k"));
    assert!(qemu_io(&a, "read -P 0xa7 60M 4k"));
    assert!(!qemu_io(&b, "read -P 0xa7 60M 4k"), "b sees a's write");
    assert!(
        !qemu_io(&base, "read -P 0xa7 60M 4k"),
        "the default sees a's write"
    );
}

/// A qcow2 with 1 GiB of data, so a copy takes long enough to be interrupted.
fn big_default(dir: &Path) -> std::path::PathBuf {
    let raw = dir.join("big.raw");
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!("head -c 1G /dev/urandom > {}", raw.display()))
        .status()
        .expect("head");
    assert!(out.success());
    let big = dir.join("big.qcow2");
    let ok = Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "qcow2"])
        .arg(&raw)
        .arg(&big)
        .status()
        .expect("qemu-img");
    assert!(ok.success());
    fs::remove_file(raw).expect("rm raw");
    big
}

/// kill -9 of vman in the middle of copying the default: no root.qcow2 is
/// left, and the next start succeeds.
#[test]
fn a_crash_during_the_copy_leaves_no_root_disk() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let big = big_default(tmp.path());
    let mut vman = Vman::builder().env("VMAN_DEFAULT_BOOT_DISK", &big).start();
    vman.template("tiny", 256);
    new_vm(&vman, json!({"template_name": "tiny", "name": "crash"}));
    let dir = vman.vm_dir("crash");
    let base = vman.base.clone();
    let starter = std::thread::spawn(move || {
        let _ = reqwest::blocking::Client::new()
            .post(format!("{base}/vms/crash/actions/start"))
            .send();
    });
    let started = Instant::now();
    loop {
        let found = fs::read_dir(&dir)
            .into_iter()
            .flatten()
            .flatten()
            .find(|e| e.file_name().to_string_lossy().contains(".partial"));
        if let Some(p) = found {
            let _ = p;
            break;
        }
        assert!(
            !dir.join("root.qcow2").exists(),
            "the copy finished before the test saw it"
        );
        assert!(started.elapsed() < SERVER, "no partial file appeared");
        std::thread::sleep(Duration::from_micros(200));
    }
    vman.kill9();
    let _ = starter.join();
    assert!(!dir.join("root.qcow2").exists(), "a crash left a root disk");
    vman.restart();
    let (s, b) = vman.start_vm("crash");
    assert_eq!(s, 202, "{b}");
    let vm = vman.vm("crash");
    assert_eq!(vm["root_disk"]["source"], "default");
    let leftovers: Vec<_> = fs::read_dir(&dir)
        .expect("dir")
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains(".partial"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    let (s, _) = vman.post("/vms/crash/actions/stop", json!({"force": true}));
    assert_eq!(s, 202);
    assert!(qemu_processes(&vman.storage).is_empty());
}

/// A full filesystem during the copy: 400 naming the reason, no partial file.
#[test]
fn a_full_disk_during_the_copy_is_a_clear_400() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mnt = tmp.path().join("small");
    fs::create_dir_all(&mnt).expect("mkdir");
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=12m", "tmpfs"])
        .arg(&mnt)
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        eprintln!("SKIPPED: cannot mount a tmpfs here (needs root)");
        return;
    }
    struct Unmount<'a>(&'a Path);
    impl Drop for Unmount<'_> {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg("-l").arg(self.0).status();
        }
    }
    let _unmount = Unmount(&mnt);
    let vms = mnt.join("vms");
    fs::create_dir_all(&vms).expect("vms");
    let vman = Vman::builder().with_tiny_default().start();
    fs::create_dir_all(vman.storage.join("vms")).expect("vms dir");
    fs::remove_dir(vman.storage.join("vms")).expect("rm vms");
    std::os::unix::fs::symlink(&vms, vman.storage.join("vms")).expect("symlink vms");
    vman.template("tiny", 256);
    new_vm(&vman, json!({"template_name": "tiny", "name": "full"}));
    let (s, b) = vman.start_vm("full");
    assert_eq!(s, 400, "{b}");
    assert!(
        b["detail"]
            .as_str()
            .is_some_and(|d| d.contains("No space left")),
        "{b}"
    );
    assert_eq!(b["code"], "image_failed", "{b}");
    let left: Vec<_> = fs::read_dir(vms.join("full"))
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(
        !left
            .iter()
            .any(|n| n.to_string_lossy().contains("root.qcow2")),
        "{left:?}"
    );
    assert!(qemu_processes(&vman.storage).is_empty());
}

/// A qcow2 whose backing file points outside the image folders would make
/// QEMU open that file: refused for explicit and existing disks alike.
#[test]
fn backing_files_outside_the_image_folders_are_refused() {
    let vman = Vman::builder().with_tiny_default().start();
    vman.template("tiny", 256);
    let sneaky = templates(&vman).join("sneaky.qcow2");
    let made = Command::new("qemu-img")
        .args([
            "create",
            "-f",
            "qcow2",
            "-F",
            "raw",
            "-u",
            "-b",
            "/etc/passwd",
        ])
        .arg(&sneaky)
        .arg("64M")
        .status()
        .expect("qemu-img");
    assert!(made.success());
    let (s, b) =
        vman.create_vm(json!({"template_name": "tiny", "name": "s1", "qcow2_path": sneaky}));
    assert_eq!(s, 400, "{b}");
    assert!(
        b["detail"]
            .as_str()
            .is_some_and(|d| d.contains("backing file")),
        "{b}"
    );
    // Deeper in the chain: top -> mid (allowed) -> /etc/passwd (not).
    let top = templates(&vman).join("top.qcow2");
    let made = Command::new("qemu-img")
        .args(["create", "-f", "qcow2", "-F", "qcow2", "-u", "-b"])
        .arg(&sneaky)
        .arg(&top)
        .arg("64M")
        .status()
        .expect("qemu-img");
    assert!(made.success());
    let (s, b) = vman.create_vm(json!({"template_name": "tiny", "name": "s3", "qcow2_path": top}));
    assert_eq!(s, 400, "{b}");
    assert!(
        b["detail"]
            .as_str()
            .is_some_and(|d| d.contains("backing file")),
        "{b}"
    );
    new_vm(&vman, json!({"template_name": "tiny", "name": "s2"}));
    fs::create_dir_all(vman.vm_dir("s2")).expect("dir");
    fs::copy(&sneaky, vman.vm_dir("s2").join("root.qcow2")).expect("copy");
    let (s, b) = vman.start_vm("s2");
    assert_eq!(s, 400, "{b}");
    assert!(
        b["detail"]
            .as_str()
            .is_some_and(|d| d.contains("backing file")),
        "{b}"
    );
    assert!(qemu_processes(&vman.storage).is_empty());
}

/// `VMAN_BOOT_DISK_MODE=overlay`: a linked clone backed by the default, and
/// the template's `disk_size_gb` grows the root disk.
#[test]
fn overlay_mode_and_disk_size_gb() {
    let vman = Vman::builder()
        .with_tiny_default()
        .env("VMAN_BOOT_DISK_MODE", "overlay")
        .start();
    let (s, b) = vman.post(
        "/templates",
        json!({"name": "grown", "cpu_count": 1, "ram_mib": 256, "disk_size_gb": 2}),
    );
    assert_eq!(s, 201, "{b}");
    new_vm(&vman, json!({"template_name": "grown", "name": "ov"}));
    let (s, b) = vman.start_vm("ov");
    assert_eq!(s, 202, "{b}");
    let vm = vman.vm("ov");
    assert_eq!(vm["root_disk"]["source"], "default");
    assert_eq!(vm["root_disk"]["virtual_size"], 2u64 << 30);
    let out = Command::new("qemu-img")
        .args(["info", "-U", "--output=json"])
        .arg(vman.vm_dir("ov").join("root.qcow2"))
        .output()
        .expect("qemu-img info");
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(
        info["backing-filename"].as_str(),
        Some(
            tiny_image()
                .canonicalize()
                .expect("canonical")
                .to_str()
                .expect("utf8")
        ),
        "{info}"
    );
    vman.wait_console("ov", "boot ok hostname=ov", 1);
    // The second start uses the overlay as an existing disk: its backing
    // file, the default, passes the backing chain check.
    let (s, _) = vman.post("/vms/ov/actions/stop", json!({"force": true}));
    assert_eq!(s, 202);
    let (s, b) = vman.start_vm("ov");
    assert_eq!(s, 202, "{b}");
    assert_eq!(vman.vm("ov")["root_disk"]["source"], "existing");
    vman.wait_console("ov", "boot ok hostname=ov", 2);
}
