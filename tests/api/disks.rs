//! /disks answers that need no guest: the first VMAN's contract for attach
//! without a VM, and sizes in GiB.

use serde_json::json;

use crate::common::{detail, Server};
use crate::make_template;

/// The bug: the first VMAN answers an attach without `vm_id` with 400
/// `vm_id is required` (checked by hand; its OpenAPI lists 200/400/404
/// only); vman answered 422.
#[test]
fn attach_without_vm_id_is_a_400_vm_id_is_required() {
    let s = Server::start();
    let (status, b) = s.post_json("/disks", &json!({"name": "d1", "size": 1}));
    assert_eq!(status, 201, "{b}");
    for body in [json!({}), json!({"vm_id": null}), json!({"vm_id": ""})] {
        let (status, b) = s.post_json("/disks/d1/attach", &body);
        assert_eq!(status, 400, "{body}: {b}");
        assert_eq!(detail(&b), "vm_id is required", "{body}");
    }
    // A vm_id of the wrong type is still a validation error naming it.
    let (status, b) = s.post_json("/disks/d1/attach", &json!({"vm_id": 5}));
    assert_eq!(status, 422, "{b}");
    assert!(detail(&b).contains("vm_id"), "{b}");
    assert_eq!(s.get("/disks/d1").1["state"], "available");
}

/// Sizes are GiB (2^30 bytes), as `qemu-img create ... {size}G` and the
/// first VMAN: a data disk of `size` 1 is 1 GiB, and grows in GiB.
#[test]
fn disk_sizes_are_gib() {
    let s = Server::start();
    make_template(&s, "small", 1, 1);
    let (status, b) = s.post_json("/disks", &json!({"name": "d1", "size": 1}));
    assert_eq!(status, 201, "{b}");
    assert_eq!(b["virtual_size"], 1u64 << 30, "{b}");
    let (status, b) = s.post_json("/disks/d1/resize", &json!({"size": 3}));
    assert_eq!(status, 200, "{b}");
    assert_eq!(b["virtual_size"], 3u64 << 30, "{b}");
}
