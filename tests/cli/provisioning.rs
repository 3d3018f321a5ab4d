//! `vman vm start` of a VM whose root disk is copied from a big default
//! boot disk (1 GiB of data, a real copy): on a non-terminal it prints one
//! line when the copy begins and one when it is done (no bar, no escape
//! codes), its usual answer on stdout, and exits 0; `-q` prints nothing.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::harness::Vman;
use crate::Cli;

/// A qcow2 followed by `mib` MiB of data: vman copies the whole file.
fn big_qcow2(dir: &Path, mib: usize) -> PathBuf {
    let small = dir.join("small.qcow2");
    let out = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&small)
        .arg("64M")
        .output()
        .expect("qemu-img");
    assert!(out.status.success(), "{out:?}");
    let path = dir.join("big.qcow2");
    let mut f = std::io::BufWriter::new(std::fs::File::create(&path).expect("create"));
    f.write_all(&std::fs::read(&small).expect("read"))
        .expect("write");
    let chunk = vec![0xabu8; 1 << 20];
    for _ in 0..mib {
        f.write_all(&chunk).expect("write");
    }
    f.into_inner().expect("flush").sync_all().expect("sync");
    path
}

#[test]
fn vm_start_on_a_non_terminal_prints_the_copy_as_lines_and_exits_0() {
    let images = tempfile::tempdir().expect("tempdir");
    let default = big_qcow2(images.path(), 1024);
    let v = Vman::builder()
        .env("VMAN_DEFAULT_BOOT_DISK", &default)
        .env("VMAN_NETWORK_MODE", "none")
        .start();
    let c = Cli::new(&v.base, &v.storage);
    c.ok(&[
        "template",
        "create",
        "small",
        "--cpus",
        "1",
        "--ram-mib",
        "64",
    ]);
    c.ok(&["vm", "create", "big", "--template", "small"]);

    let r = c.run(&["vm", "start", "big"]);
    assert_eq!(r.code, Some(0), "{r:?}");
    assert_eq!(r.stdout.trim(), "started VM big", "{r:?}");
    // No bar, no cursor movement on a non-terminal.
    assert!(
        !r.stderr.contains('\x1b') && !r.stderr.contains('\r'),
        "{r:?}"
    );
    let lines: Vec<&str> = r.stderr.lines().collect();
    assert_eq!(v.vm("big")["root_disk"]["source"], "default", "{r:?}");
    // The copy is seen unless the filesystem cloned the file at once.
    let reflinked = v.logs().iter().any(|l| l.contains("by reflink"));
    if !reflinked {
        assert_eq!(lines.len(), 2, "{r:?}");
        assert!(
            lines[0].starts_with("making the root disk of big: 1.00 GiB by "),
            "{r:?}"
        );
        assert!(
            lines[1].starts_with("root disk of big ready: 1.00 GiB by "),
            "{r:?}"
        );
    } else {
        assert!(lines.len() <= 2, "{r:?}");
    }

    // -q: nothing at all, same exit.
    c.ok(&["vm", "create", "quiet", "--template", "small"]);
    let r = c.run(&["vm", "start", "quiet", "-q"]);
    assert_eq!(r.code, Some(0), "{r:?}");
    assert_eq!((r.stdout.as_str(), r.stderr.as_str()), ("", ""), "{r:?}");
    assert_eq!(v.vm("quiet")["state"], "running");

    // --format json: stdout is the server's answer alone.
    c.ok(&["vm", "stop", "big", "--force"]);
    std::fs::remove_file(v.vm_dir("big").join("root.qcow2")).expect("rm root disk");
    let r = c.run(&["vm", "start", "big", "--format", "json"]);
    assert_eq!(r.code, Some(0), "{r:?}");
    let answer: serde_json::Value = serde_json::from_str(&r.stdout).expect("json");
    assert_eq!(answer["status"], "started", "{r:?}");
}
