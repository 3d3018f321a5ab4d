//! kill -9 of a node: its VMs become `unknown` on the others within the
//! lease TTL (plus a heartbeat interval), one `node_lost` event is told in
//! the whole cluster; the node's restart re-adopts its running QEMU (no
//! second QEMU, nothing lost) and the states agree again.

use std::time::Instant;

use serde_json::Value;

use crate::e2e::{qemu_processes, GUEST, SERVER};
use crate::harness::{wait_until, Cluster, TTL};

fn node_lost_events(c: &Cluster) -> usize {
    (1..=3)
        .filter(|n| *n != 2)
        .map(|n| {
            c.n(n)
                .get("/events?follow=false&type=node")
                .as_array()
                .map_or(0, |a| {
                    a.iter().filter(|e| e["action"] == "node_lost").count()
                })
        })
        .sum()
}

#[test]
fn kill9_of_n2_shows_its_vms_unknown_and_its_restart_readopts_them() {
    let mut c = Cluster::start();
    c.template("tiny", 128);
    c.create_on(1, 2, "lost1", "tiny");
    c.create_on(3, 2, "lost2", "tiny");
    c.create_on(1, 1, "kept", "tiny");
    let (s, b) = c.n(1).start_vm("lost1");
    assert_eq!(s, 202, "{b}");
    c.n(1)
        .wait_console("lost1", "vman-guest: boot ok hostname=lost1", 1);
    let pid = c.n(2).vm("lost1")["pid"].clone();
    assert!(pid.is_i64(), "{pid}");

    c.n_mut(2).kill9();
    let killed = Instant::now();
    // The list answers from the lease: unknown once it expired.
    wait_until(SERVER, "unknown in n1's list", || {
        let list = c.n(1).get("/vms");
        let unknown = |id: &str| {
            list.as_array()
                .unwrap()
                .iter()
                .any(|v| v["id"] == id && v["state"] == "unknown" && v["node"] == "n2")
        };
        unknown("lost1") && unknown("lost2")
    });
    let took = killed.elapsed();
    for id in ["lost1", "lost2"] {
        let vm = c.n(1).vm(id);
        assert_eq!(vm["state"], "unknown", "{vm}");
        assert_eq!(vm["node"], "n2");
    }
    let _ = std::fs::write(
        std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("cluster-unknown.txt"),
        format!(
            "kill -9 of n2 -> its VMs unknown on n1: {:.2} s (TTL {TTL} s)\n",
            took.as_secs_f64()
        ),
    );
    let list = c.n(3).get("/vms");
    let states: Vec<(Value, Value)> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|v| (v["id"].clone(), v["state"].clone()))
        .collect();
    assert!(
        states.contains(&("lost1".into(), "unknown".into())),
        "{states:?}"
    );
    assert!(
        states.contains(&("kept".into(), "stopped".into())),
        "{states:?}"
    );
    assert!(c
        .nodes_seen_by(3)
        .iter()
        .any(|n| n["name"] == "n2" && n["status"] == "offline"));
    // One node_lost event in the cluster (n1 or n3 tells it).
    wait_until(SERVER, "node_lost told", || node_lost_events(&c) >= 1);
    assert_eq!(node_lost_events(&c), 1);
    // Actions need the owner: refused, nothing started elsewhere.
    let (s, b) = c.n(1).start_vm("lost2");
    assert_eq!(s, 503, "{b}");
    assert_eq!(b["code"], "node_offline", "{b}");
    // The guest kept running without its vman.
    assert_eq!(qemu_processes(&c.n(2).storage).len(), 1);

    c.n_mut(2).restart();
    let vm = c.n(1).wait_state("lost1", "running", SERVER);
    assert_eq!(vm["pid"], pid, "re-adopted, not started again");
    c.n(1).wait_state("lost2", "stopped", SERVER);
    assert_eq!(qemu_processes(&c.n(2).storage).len(), 1);
    c.wait_online(&["n1", "n2", "n3"]);
    wait_until(SERVER, "the same list everywhere", || {
        let l: Vec<Value> = (1..=3).map(|n| c.n(n).get("/vms")).collect();
        l[0].as_array().unwrap().len() == 3 && l[0] == l[1] && l[1] == l[2]
    });
    // Still one node_lost: the restart is not a second loss.
    assert_eq!(node_lost_events(&c), 1);
    // And it is driven through n3 again.
    let (s, b) = c
        .n(3)
        .post("/vms/lost1/actions/stop", serde_json::json!({}));
    assert_eq!(s, 202, "{b}");
    let _ = GUEST;
}
