//! etcd members lost: with one of three down everything works; with two
//! down writes answer 503 `cluster_unavailable`, reads answer from the
//! cache and guests keep running; once quorum is back the nodes catch up.

use serde_json::json;

use crate::e2e::{GUEST, SERVER};
use crate::harness::{wait_until, Cluster};

#[test]
fn one_etcd_member_down_works_two_down_refuse_writes_but_read_and_quorum_back_catches_up() {
    let mut c = Cluster::start();
    c.template("tiny", 128);
    c.etcd.stop_member(2);
    // Creates and starts still work.
    c.create_on(2, 1, "q1", "tiny");
    let vm = c.create(3, json!({"template_name": "tiny"}));
    let other = vm["id"].as_str().unwrap().to_owned();
    let (s, b) = c.n(2).start_vm("q1");
    assert_eq!(s, 202, "{b}");
    c.n(2)
        .wait_console("q1", "vman-guest: boot ok hostname=q1", 1);
    wait_until(SERVER, "published", || {
        c.n(3).vm("q1")["state"] == "running"
    });
    let pid = c.n(1).vm("q1")["pid"].as_i64().expect("pid");

    c.etcd.stop_member(1);
    // Writes: 503 with a clear detail, on every node, nothing changed.
    let (s, b) = c.n(2).post("/vms", json!({"template_name": "tiny"}));
    assert_eq!(s, 503, "{b}");
    assert_eq!(b["code"], "cluster_unavailable", "{b}");
    assert!(b["detail"].as_str().unwrap().contains("quorum"), "{b}");
    let (s, b) = c.n(3).post(
        "/templates",
        json!({"name": "t2", "cpu_count": 1, "ram_mib": 64}),
    );
    assert_eq!(s, 503, "{b}");
    assert_eq!(c.n(3).call("GET", "/templates/t2", None).0, 404);
    let (s, b) = c.n(1).post("/vms/q1/actions/stop", json!({}));
    assert_eq!(s, 503, "{b}");
    // Reads answer, from every node.
    for n in 1..=3 {
        let list = c.n(n).get("/vms");
        assert_eq!(list.as_array().unwrap().len(), 2, "{list}");
        assert_eq!(c.n(n).vm("q1")["state"], "running");
        assert_eq!(c.n(n).get("/cluster/nodes").as_array().unwrap().len(), 3);
    }
    // The guest keeps running; its QEMU is the same.
    // SAFETY: kill(pid, 0) only checks the process exists.
    assert_eq!(unsafe { libc::kill(pid as i32, 0) }, 0);
    // Something changes meanwhile: the guest's QEMU dies.
    // SAFETY: kill(2) has no memory effects.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    wait_until(GUEST, "n1 records the exit", || {
        c.n(1).vm("q1")["state"] != "running"
    });
    let after = c.n(1).vm("q1")["state"].clone();

    c.etcd.start_member(1);
    c.etcd.start_member(2);
    c.etcd.wait_quorum();
    // Catch-up: every node sees the state n1 recorded during the outage.
    for n in 2..=3 {
        wait_until(SERVER, "caught up", || c.n(n).vm("q1")["state"] == after);
    }
    // Writes work again; nothing was lost.
    let vm = c.create(2, json!({"template_name": "tiny"}));
    assert!(vm["node"].is_string());
    for n in 1..=3 {
        wait_until(SERVER, "three VMs everywhere", || {
            let l = c.n(n).get("/vms");
            let ids: Vec<&str> = l
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v["id"].as_str().unwrap())
                .collect();
            ids.len() == 3 && ids.contains(&"q1") && ids.contains(&other.as_str())
        });
    }
    c.wait_online(&["n1", "n2", "n3"]);
}
