//! Cluster tests (issue 14): three etcd members and three `vman serve
//! --cluster` nodes on one machine (`harness.rs`), tiny guests under TCG.
//! They wait for states, console markers and events, never for a time.

#[path = "../common/mod.rs"]
mod common;
#[path = "../e2e/harness.rs"]
#[allow(dead_code)]
mod e2e;
mod etcd_loss;
mod forward;
mod harness;
mod migrate;
mod node_loss;
mod placement;

use serde_json::json;

use common::Server;
use harness::{Cluster, TOKEN};

#[test]
fn without_cluster_mode_the_cluster_routes_answer_404() {
    let s = Server::start();
    let (status, body) = s.get("/cluster/nodes");
    assert_eq!(status, 404, "{body}");
    assert_eq!(body["code"], "not_clustered");
    assert!(common::detail(&body).contains("--cluster"), "{body}");
    let r = s.request("POST", "/cluster/internal/adopt/x", Some(&json!({})));
    assert_eq!(r.status, 404, "{}", r.text);
}

#[test]
fn internal_routes_refuse_requests_without_the_right_cluster_token() {
    let c = Cluster::start();
    let base = c.n(1).base.clone();
    let http = reqwest::blocking::Client::new();
    let r = http
        .post(format!("{base}/cluster/internal/adopt/x"))
        .json(&json!({}))
        .send()
        .expect("request");
    assert_eq!(r.status().as_u16(), 401);
    let body: serde_json::Value = r.json().expect("json");
    assert_eq!(body["code"], "cluster_token");
    for wrong in ["nope", "cluster-test-token-012345678X", ""] {
        let r = http
            .get(format!("{base}/vms"))
            .header("X-Vman-Cluster-Token", wrong)
            .send()
            .expect("request");
        assert_eq!(r.status().as_u16(), 401, "token {wrong:?}");
    }
    // The right token: answered by the node itself.
    let r = http
        .get(format!("{base}/vms"))
        .header("X-Vman-Cluster-Token", TOKEN)
        .send()
        .expect("request");
    assert_eq!(r.status().as_u16(), 200);
}

#[test]
fn cluster_nodes_lists_every_node_with_its_capacity() {
    let c = Cluster::start();
    for n in 1..=3 {
        let nodes = c.nodes_seen_by(n);
        assert_eq!(nodes.len(), 3, "{nodes:?}");
        for (i, node) in nodes.iter().enumerate() {
            assert_eq!(node["name"], format!("n{}", i + 1));
            assert_eq!(node["status"], "online");
            assert!(node["memory_mib"].as_u64().unwrap() > 0);
            assert!(node["cpus"].as_u64().unwrap() > 0);
            assert_eq!(node["memory_reserved_mib"], 0);
            assert_eq!(node["vm_count"], 0);
            assert!(node["last_heartbeat"].as_str().unwrap().len() > 10);
        }
    }
}
