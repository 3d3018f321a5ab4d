//! A VM placed on n2, driven through n1: start (202 once QEMU runs on n2),
//! console, metadata, stop, delete — the answers are n2's own.

use serde_json::{json, Value};

use crate::e2e::{qemu_processes, GUEST, SERVER};
use crate::harness::{wait_until, Cluster};

/// The VM as a node answers it, without the `node` field and the fields
/// that change by themselves.
fn comparable(mut v: Value) -> Value {
    if let Some(o) = v.as_object_mut() {
        o.remove("node");
    }
    v
}

#[test]
fn start_stop_console_metadata_of_a_vm_on_n2_work_through_n1() {
    let c = Cluster::start();
    c.template("tiny", 128);
    let vm = c.create_on(1, 2, "far", "tiny");
    assert_eq!(vm["node"], "n2");
    let (n1, n2) = (c.n(1), c.n(2));
    let (s, b) = n1.start_vm("far");
    assert_eq!(s, 202, "{b}");
    // Running on n2, not on n1.
    assert_eq!(qemu_processes(&n2.storage).len(), 1);
    assert!(qemu_processes(&n1.storage).is_empty());
    n1.wait_state("far", "running", GUEST);
    n1.wait_console("far", "vman-guest: boot ok hostname=far", 1);
    // GET through n1 is n2's answer plus `node`.
    wait_until(SERVER, "same answer", || {
        comparable(n1.vm("far")) == comparable(n2.vm("far"))
    });
    assert_eq!(n1.vm("far")["node"], "n2");
    // Refusals are n2's, unchanged.
    let through = n1.start_vm("far");
    let direct = n2.start_vm("far");
    assert_eq!(through, direct);
    assert_eq!(through.0, 400);
    // Console input and output through n1.
    n1.type_line("far", "echo through-$((6*7))-n1");
    n1.wait_console("far", "through-42-n1", 1);
    // Metadata through n1 lands on n2.
    let (s, b) = n1.call(
        "PUT",
        "/vms/far/metadata",
        Some(json!({"hostname": "farhost"})),
    );
    assert_eq!(s, 200, "{b}");
    assert_eq!(n2.get("/vms/far/metadata")["hostname"], "farhost");
    assert_eq!(n1.get("/vms/far/metadata"), n2.get("/vms/far/metadata"));
    // Stop through n3.
    let (s, b) = c.n(3).post("/vms/far/actions/stop", json!({}));
    assert_eq!(s, 202, "{b}");
    assert_eq!(b["status"], "stopped");
    assert_eq!(n2.vm("far")["state"], "stopped");
    wait_until(SERVER, "stopped everywhere", || {
        (1..=3).all(|n| {
            c.n(n)
                .get("/vms")
                .as_array()
                .unwrap()
                .iter()
                .any(|v| v["id"] == "far" && v["state"] == "stopped")
        })
    });
    // Delete through n1: gone from n2's store and from every list.
    let (s, b) = n1.call("DELETE", "/vms/far", None);
    assert_eq!(s, 204, "{b}");
    assert_eq!(n2.call("GET", "/vms/far", None).0, 404);
    assert_eq!(n1.call("GET", "/vms/far", None).0, 404);
    wait_until(SERVER, "gone everywhere", || {
        (1..=3).all(|n| c.n(n).get("/vms").as_array().unwrap().is_empty())
    });
    wait_until(SERVER, "memory released", || {
        c.nodes_seen_by(1)
            .iter()
            .all(|n| n["memory_reserved_mib"] == 0)
    });
}
