//! The stable `code` of each refusal (docs/errors.md), for the refusals that
//! need no guest: clients branch on the code, the detail stays as it was.
//! (`already_running` needs a running guest: tests/e2e/lifecycle.rs.)

use serde_json::{json, Value};

use crate::common::{detail, Server};
use crate::{make_template, make_vm};

/// Asserts a 400 with `code` and `want_detail` (exact, or a prefix when it
/// ends with `…`), and returns the body.
#[track_caller]
fn refused(reply: (u16, Value), code: &str, want_detail: &str) -> Value {
    let (status, body) = reply;
    assert_eq!((status, body["code"].as_str()), (400, Some(code)), "{body}");
    match want_detail.strip_suffix('…') {
        Some(prefix) => assert!(detail(&body).starts_with(prefix), "{body}"),
        None => assert_eq!(detail(&body), want_detail, "{body}"),
    }
    body
}

#[test]
fn already_exists_for_templates_vms_and_disks() {
    let s = Server::start();
    make_template(&s, "small", 1, 1);
    make_vm(&s, "small", Some("a"));
    let t = json!({"name": "small", "cpu_count": 1, "ram_amount": 1});
    refused(
        s.post_json("/templates", &t),
        "already_exists",
        "Template already exists",
    );
    let vm = json!({"template_name": "small", "name": "a"});
    refused(
        s.post_json("/vms", &vm),
        "already_exists",
        "VM with this ID already exists",
    );
    let d = json!({"name": "d1", "size": 1});
    assert_eq!(s.post_json("/disks", &d).0, 201);
    refused(
        s.post_json("/disks", &d),
        "already_exists",
        "Disk with this ID already exists",
    );
}

#[test]
fn template_missing_and_template_in_use() {
    let s = Server::start();
    let vm = json!({"template_name": "nope", "name": "a"});
    refused(
        s.post_json("/vms", &vm),
        "template_missing",
        "Template not found",
    );
    make_template(&s, "small", 1, 1);
    make_vm(&s, "small", Some("a"));
    refused(
        s.delete("/templates/small"),
        "in_use",
        "Template is in use by 1 VM(s)",
    );
}

#[test]
fn not_running_for_stop_and_console_input() {
    let s = Server::start();
    make_template(&s, "small", 1, 1);
    make_vm(&s, "small", Some("a"));
    refused(
        s.post_json("/vms/a/actions/stop", &json!({})),
        "not_running",
        "VM is not running",
    );
    let input = json!({"data": "ls\n"});
    refused(
        s.post_json("/vms/a/console", &input),
        "not_running",
        "VM is not running",
    );
}

#[test]
fn image_refused_for_an_image_outside_the_allowed_folders() {
    let allowed = tempfile::tempdir().expect("tempdir");
    let dirs = allowed.path().to_str().expect("utf8");
    let s = Server::builder().env("VMAN_IMAGE_DIRS", dirs).start();
    make_template(&s, "small", 1, 1);
    let outside = tempfile::tempdir().expect("tempdir");
    let img = outside.path().join("x.img");
    std::fs::write(&img, vec![0u8; 4096]).expect("write");
    let body = json!({"template_name": "small", "name": "a", "qcow2_path": img});
    let b = refused(s.post_json("/vms", &body), "image_refused", "qcow2_path: …");
    assert!(
        detail(&b).contains("outside the allowed image folders"),
        "{b}"
    );
    assert_eq!(s.get("/vms/a").0, 404, "nothing created");
}

#[test]
fn disk_attached_not_attached_no_free_slot_and_cannot_shrink() {
    let s = Server::builder().env("VMAN_HOTPLUG_SLOTS", "1").start();
    make_template(&s, "small", 1, 1);
    make_vm(&s, "small", Some("a"));
    for d in ["d1", "d2"] {
        assert_eq!(s.post_json("/disks", &json!({"name": d, "size": 2})).0, 201);
    }
    refused(
        s.post_json("/disks/d1/detach", &json!({})),
        "not_attached",
        "Disk is not attached",
    );
    // A cold attach to the stopped VM.
    let (status, b) = s.post_json("/disks/d1/attach", &json!({"vm_id": "a"}));
    assert_eq!(status, 200, "{b}");
    refused(
        s.delete("/disks/d1"),
        "disk_attached",
        "Disk is attached to VM a",
    );
    let again = s.post_json("/disks/d1/attach", &json!({"vm_id": "a"}));
    refused(again, "disk_attached", "Disk is already attached to VM a");
    let full = s.post_json("/disks/d2/attach", &json!({"vm_id": "a"}));
    refused(full, "no_free_slot", "VM a has no free hot-plug slot…");
    let shrink = s.post_json("/disks/d2/resize", &json!({"size": 1}));
    refused(
        shrink,
        "cannot_shrink",
        "Disks can only grow: disk d2 is 2 GiB, 1 GiB asked",
    );
}
