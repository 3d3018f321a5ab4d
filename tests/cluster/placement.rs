//! Placement: every node lists the same VMs; creates (sequential and 30 at
//! once) spread by free memory; a full cluster refuses without any node
//! going over its capacity; pinned and duplicate creates.

use std::collections::BTreeMap;

use serde_json::{json, Value};

use crate::e2e::SERVER;
use crate::harness::{wait_until, Cluster};

/// id → node as node `n` lists them.
fn listing(c: &Cluster, n: usize) -> BTreeMap<String, String> {
    c.n(n)
        .get("/vms")
        .as_array()
        .expect("array")
        .iter()
        .map(|v| {
            (
                v["id"].as_str().unwrap().to_owned(),
                v["node"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

fn counts(c: &Cluster) -> Vec<(u64, u64, u64)> {
    c.nodes_seen_by(1)
        .iter()
        .map(|n| {
            (
                n["vm_count"].as_u64().unwrap(),
                n["memory_reserved_mib"].as_u64().unwrap(),
                n["memory_mib"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// Waits until every node lists exactly `want` VMs, the same ones.
fn wait_same_lists(c: &Cluster, want: usize) -> BTreeMap<String, String> {
    wait_until(SERVER, "the same VM list on every node", || {
        let l1 = listing(c, 1);
        l1.len() == want && listing(c, 2) == l1 && listing(c, 3) == l1
    });
    listing(c, 1)
}

fn create_at_once(c: &Cluster, ram: u64, n: usize) -> Vec<(u16, Value)> {
    let _ = ram;
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..n)
            .map(|i| {
                let node = c.n(1 + i % 3);
                s.spawn(move || node.post("/vms", json!({"template_name": "small"})))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("thread"))
            .collect()
    })
}

#[test]
fn every_node_lists_the_same_vms_and_creates_spread_by_free_memory_without_overcommit() {
    let c = Cluster::start();
    let memory = counts(&c)[0].2;
    // 24 VMs fill a node.
    let ram = memory / 24;
    c.template("small", ram);
    for i in 0..30 {
        let vm = c.create(1 + i % 3, json!({"template_name": "small"}));
        assert!(vm["node"].is_string(), "{vm}");
    }
    let list = wait_same_lists(&c, 30);
    for n in ["n1", "n2", "n3"] {
        assert_eq!(list.values().filter(|v| *v == n).count(), 10, "{list:?}");
    }
    // 30 at once through the three nodes: still spread evenly.
    let answers = create_at_once(&c, ram, 30);
    for (s, b) in &answers {
        assert_eq!(*s, 201, "{b}");
    }
    wait_same_lists(&c, 60);
    wait_until(SERVER, "reservations seen", || {
        counts(&c).iter().all(|x| x.0 == 20)
    });
    for (count, reserved, _) in counts(&c) {
        assert_eq!(count, 20);
        assert_eq!(reserved, 20 * ram);
    }
    // 30 more at once: only 12 fit (4 per node); the rest are refused and
    // no node goes over its capacity.
    let answers = create_at_once(&c, ram, 30);
    let created = answers.iter().filter(|(s, _)| *s == 201).count();
    for (s, b) in answers.iter().filter(|(s, _)| *s != 201) {
        assert_eq!(*s, 400, "{b}");
        assert_eq!(b["code"], "no_memory", "{b}");
    }
    assert_eq!(created, 12);
    wait_same_lists(&c, 72);
    wait_until(SERVER, "reservations seen", || {
        counts(&c).iter().all(|x| x.0 == 24)
    });
    for (count, reserved, capacity) in counts(&c) {
        assert_eq!(count, 24);
        assert_eq!(reserved, 24 * ram);
        assert!(reserved <= capacity, "{reserved} > {capacity}");
    }
    // Deleting through another node gives the memory back.
    let (id, node) = list.iter().next().expect("a vm");
    let via = if node == "n1" { 2 } else { 1 };
    let (s, b) = c.n(via).call("DELETE", &format!("/vms/{id}"), None);
    assert_eq!(s, 204, "{b}");
    wait_same_lists(&c, 71);
    let vm = c.create(3, json!({"template_name": "small"}));
    assert_eq!(vm["node"], node.as_str(), "{vm}");
}

#[test]
fn pinned_creates_go_to_their_node_and_names_are_unique_in_the_cluster() {
    let c = Cluster::start();
    c.template("small", 16);
    let vm = c.create_on(1, 3, "pinned", "small");
    assert_eq!(vm["node"], "n3");
    assert_eq!(vm["id"], "pinned");
    assert_eq!(vm["state"], "stopped");
    // Recorded on n3 only.
    assert_eq!(
        crate::e2e::Vman::call(c.n(3), "GET", "/vms/pinned", None).0,
        200
    );
    assert!(c.n(3).storage.join("vman.db").exists());
    // The same name through another node, on another node: refused.
    for via in 1..=3 {
        let (s, b) = c.n(via).post(
            "/vms",
            json!({"template_name": "small", "name": "pinned", "node": "n1"}),
        );
        assert_eq!(s, 400, "{b}");
        assert_eq!(b["code"], "already_exists", "{b}");
    }
    let (s, b) = c
        .n(2)
        .post("/vms", json!({"template_name": "small", "node": "n9"}));
    assert_eq!(s, 400, "{b}");
    assert_eq!(b["code"], "node_unavailable", "{b}");
    let (s, b) = c
        .n(2)
        .post("/vms", json!({"template_name": "small", "node": 7}));
    assert_eq!(s, 422, "{b}");
    // Refusals of the single-host handler come through unchanged, and
    // nothing is placed.
    let (s, b) = c.n(2).post("/vms", json!({"template_name": "nope"}));
    assert_eq!(s, 400, "{b}");
    assert_eq!(b["code"], "template_missing", "{b}");
    let (s, b) = c.n(2).post("/vms", json!({"name": "x"}));
    assert_eq!(s, 422, "{b}");
    wait_same_lists(&c, 1);
    let reserved: u64 = counts(&c).iter().map(|x| x.1).sum();
    assert_eq!(reserved, 16);
}

/// A clone lives on its source's node (its disks are there): it is placed
/// there in etcd like any create, so every node lists it with that node,
/// its memory is reserved there, and its name is taken cluster-wide.
#[test]
fn a_clone_is_placed_on_its_sources_node_and_its_name_is_cluster_wide() {
    let c = Cluster::start();
    c.template("t", 128);
    c.create_on(1, 2, "src", "t");
    c.create_on(1, 3, "other", "t");
    // Read your writes: the node a create went through lists it at once.
    assert_eq!(listing(&c, 1).len(), 2, "{:?}", listing(&c, 1));
    for n in 1..=3 {
        wait_until(SERVER, "both listed", || listing(&c, n).len() == 2);
    }
    let before = counts(&c);
    let (s, b) = c.n(1).post("/vms/src/clone", json!({"name": "cl"}));
    assert_eq!(s, 201, "{b}");
    for n in 1..=3 {
        wait_until(SERVER, "the clone listed with its node", || {
            listing(&c, n).get("cl").map(String::as_str) == Some("n2")
        });
    }
    wait_until(SERVER, "the clone's memory reserved on n2", || {
        let after = counts(&c);
        after[1].1 == before[1].1 + 128 && after[0] == before[0] && after[2] == before[2]
    });
    // A name taken on another node, and the clone's own name again.
    for name in ["other", "cl"] {
        let (s, b) = c.n(3).post("/vms/src/clone", json!({"name": name}));
        assert_eq!(
            (s, b["code"].as_str()),
            (400, Some("already_exists")),
            "{b}"
        );
    }
    let all = listing(&c, 1);
    assert_eq!(all.len(), 3, "{all:?}");
}
