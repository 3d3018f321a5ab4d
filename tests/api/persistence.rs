//! State survives a graceful stop (SIGTERM) and a crash (kill -9).

use serde_json::{json, Value};

use crate::common::Server;
use crate::{make_template, make_vm};

/// Everything a client can see.
fn snapshot(s: &Server) -> Value {
    let (st, templates) = s.get("/templates");
    assert_eq!(st, 200);
    let (st, vms) = s.get("/vms");
    assert_eq!(st, 200);
    let mut metadata = serde_json::Map::new();
    for vm in vms.as_array().expect("array") {
        let id = vm["id"].as_str().expect("id");
        let (st, m) = s.get(&format!("/vms/{id}/metadata"));
        assert_eq!(st, 200);
        metadata.insert(id.to_owned(), m);
    }
    json!({"templates": templates, "vms": vms, "metadata": metadata})
}

/// Creates a little world and returns the generated VM id.
fn populate(s: &Server) -> String {
    make_template(s, "small", 1, 1);
    make_template(s, "large", 8, 32);
    make_vm(s, "small", Some("web-1"));
    make_vm(s, "large", Some("db.1"));
    let generated = make_vm(s, "small", None)["id"]
        .as_str()
        .expect("id")
        .to_owned();
    let (st, _) = s.put_json(
        "/vms/web-1/metadata",
        &json!({"hostname": "web1", "user_data": "#cloud-config\n", "ssh_keys": ["ssh-ed25519 AAAA k"]}),
    );
    assert_eq!(st, 200);
    generated
}

#[track_caller]
fn assert_world(s: &Server, before: &Value, generated: &str) {
    let after = snapshot(s);
    assert_eq!(&after, before, "state changed across the restart");
    assert_eq!(after["templates"].as_array().expect("array").len(), 2);
    assert_eq!(after["vms"].as_array().expect("array").len(), 3);
    assert_eq!(after["metadata"]["web-1"]["hostname"], "web1");
    assert_eq!(s.get(&format!("/vms/{generated}")).0, 200);
    // The database really holds them: the same names are refused again.
    let r = s.post_json("/vms", &json!({"template_name": "small", "name": "web-1"}));
    assert_eq!(r.0, 400, "{}", r.1);
    let r = s.post_json(
        "/templates",
        &json!({"name": "large", "cpu_count": 1, "ram_amount": 1}),
    );
    assert_eq!(r.0, 400, "{}", r.1);
}

#[test]
fn state_survives_sigterm_and_restart() {
    let mut s = Server::start();
    let generated = populate(&s);
    let before = snapshot(&s);
    let status = s.sigterm();
    assert!(status.success(), "graceful stop exits 0, got {status:?}");
    s.restart();
    assert_world(&s, &before, &generated);
}

#[test]
fn state_survives_kill_9_and_restart() {
    let mut s = Server::start();
    let generated = populate(&s);
    let before = snapshot(&s);
    s.kill9();
    s.restart();
    assert_world(&s, &before, &generated);
}

#[test]
fn deletions_survive_a_restart() {
    let mut s = Server::start();
    populate(&s);
    assert_eq!(s.delete("/vms/db.1").0, 204);
    assert_eq!(s.delete("/templates/large").0, 204);
    assert_eq!(s.delete("/vms/web-1/metadata").0, 204);
    let before = snapshot(&s);
    s.kill9();
    s.restart();
    assert_eq!(snapshot(&s), before);
    assert_eq!(s.get("/vms/db.1").0, 404);
    assert_eq!(s.get("/templates/large").0, 404);
    assert_eq!(s.get("/vms/web-1/metadata").1["hostname"], Value::Null);
}

#[test]
fn a_second_server_on_the_same_storage_sees_the_data() {
    let mut first = Server::start();
    make_template(&first, "small", 1, 1);
    first.sigterm();
    let second = Server::builder().storage(first.storage_handle()).start();
    let (st, list) = second.get("/templates");
    assert_eq!(st, 200);
    assert_eq!(list[0]["name"], "small");
}
