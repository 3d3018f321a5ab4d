//! `vman vm clone` against a real server: full and linked clones of a
//! stopped VM whose root disk a start made (a real QEMU under TCG on the
//! empty root disk: no guest needs to boot), refusals and usage errors.

use std::process::Command;

use serde_json::Value;

use crate::harness::Vman;
use crate::Cli;

fn backing(file: &std::path::Path) -> Option<String> {
    let out = Command::new("qemu-img")
        .args(["info", "-U", "--output=json"])
        .arg(file)
        .output()
        .unwrap();
    let info: Value = serde_json::from_slice(&out.stdout).unwrap();
    info["backing-filename"].as_str().map(str::to_owned)
}

#[test]
fn vm_clone_makes_full_and_linked_clones_and_says_why_it_refuses() {
    let v = Vman::builder().start();
    let c = Cli::new(&v.base, &v.storage);
    c.ok(&[
        "template",
        "create",
        "small",
        "--cpus",
        "1",
        "--ram-mib",
        "128",
    ]);
    c.ok(&[
        "vm",
        "create",
        "src",
        "--template",
        "small",
        "--network",
        "none",
    ]);
    c.ok(&["vm", "start", "src"]);
    // A running source is cloned through a snapshot of it.
    let out = c.ok(&["vm", "clone", "src", "--name", "c0"]);
    assert!(out.contains("created VM c0 (clone of src)"), "{out}");
    assert_eq!(v.vm("c0")["state"], "stopped");
    c.ok(&["vm", "stop", "src", "--force"]);

    let out = c.ok(&["vm", "clone", "src", "--name", "c1"]);
    assert!(out.contains("created VM c1 (clone of src)"), "{out}");
    assert_eq!(v.vm("c1")["state"], "stopped");
    assert_eq!(backing(&v.vm_dir("c1").join("root.qcow2")), None);

    let linked = c.json(&["vm", "clone", "src", "--name", "c2", "--linked"]);
    assert_eq!(linked["id"], "c2");
    let base = backing(&v.vm_dir("c2").join("root.qcow2")).unwrap();
    assert!(
        base.ends_with("/vms/src/snapshots/clone-c2.qcow2"),
        "{base}"
    );
    assert_eq!(c.ok(&["vm", "clone", "src", "--name", "c3", "-q"]), "c3\n");

    assert!(c
        .refused(&["vm", "clone", "src", "--name", "c1"])
        .contains("already exists"));
    assert!(c.refused(&["vm", "delete", "src"]).contains("linked clone"));
    c.fails(1, &["vm", "clone", "nope", "--name", "x"]);
    c.fails(2, &["vm", "clone", "src"]);
    assert_eq!(v.call("GET", "/vms/x", None).0, 404);
}
