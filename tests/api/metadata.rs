//! /vms/{vm_id}/metadata: partial PUT, GET with nulls, DELETE, 404s.

use std::thread::sleep;
use std::time::Duration;

use serde_json::{json, Value};

use crate::common::{assert_error, detail, Server};
use crate::{make_template, make_vm};

fn server_with_vm() -> Server {
    let s = Server::start();
    make_template(&s, "small", 1, 1);
    make_vm(&s, "small", Some("vm1"));
    s
}

/// Waits so the next write gets a later millisecond timestamp.
fn tick() {
    sleep(Duration::from_millis(15));
}

#[test]
fn never_set_metadata_is_all_nulls() {
    let s = server_with_vm();
    let (status, m) = s.get("/vms/vm1/metadata");
    assert_eq!(status, 200);
    assert_eq!(m["vm_id"], "vm1");
    for key in ["hostname", "user_data", "ssh_keys"] {
        assert!(
            m.as_object().expect("object").contains_key(key),
            "{key} missing from {m}"
        );
        assert_eq!(m[key], Value::Null, "{key} in {m}");
    }
}

#[test]
fn put_changes_only_the_given_fields_and_moves_updated_at() {
    let s = server_with_vm();
    let (status, m1) = s.put_json("/vms/vm1/metadata", &json!({"hostname": "web1"}));
    assert_eq!(status, 200, "{m1}");
    assert_eq!(m1["vm_id"], "vm1");
    assert_eq!(m1["hostname"], "web1");
    assert_eq!(m1["user_data"], Value::Null);
    assert_eq!(m1["ssh_keys"], Value::Null);
    let created = m1["created_at"].as_str().expect("created_at").to_owned();
    let updated1 = m1["updated_at"].as_str().expect("updated_at").to_owned();

    tick();
    let keys = json!([
        "ssh-ed25519 AAAAC3Nza user@host",
        "ssh-rsa AAAAB3Nza other@host"
    ]);
    let (status, m2) = s.put_json("/vms/vm1/metadata", &json!({"ssh_keys": keys}));
    assert_eq!(status, 200, "{m2}");
    assert_eq!(m2["hostname"], "web1", "hostname kept");
    // Answered in the first VMAN's form: one string, a key per line.
    let keys = json!("ssh-ed25519 AAAAC3Nza user@host\nssh-rsa AAAAB3Nza other@host");
    assert_eq!(m2["ssh_keys"], keys);
    assert_eq!(m2["user_data"], Value::Null);
    assert_eq!(m2["created_at"], created.as_str(), "created_at never moves");
    let updated2 = m2["updated_at"].as_str().expect("updated_at").to_owned();
    assert!(updated2 > updated1, "updated_at {updated1} -> {updated2}");

    tick();
    let user_data = "#cloud-config\npackages: [nginx]\n";
    let (status, m3) = s.put_json(
        "/vms/vm1/metadata",
        &json!({"user_data": user_data, "hostname": "web2"}),
    );
    assert_eq!(status, 200, "{m3}");
    assert_eq!(m3["hostname"], "web2");
    assert_eq!(m3["user_data"], user_data);
    assert_eq!(m3["ssh_keys"], keys, "ssh_keys kept");
    assert_eq!(m3["created_at"], created.as_str());
    let updated3 = m3["updated_at"].as_str().expect("updated_at").to_owned();
    assert!(updated3 > updated2, "updated_at {updated2} -> {updated3}");

    let (status, got) = s.get("/vms/vm1/metadata");
    assert_eq!(status, 200);
    assert_eq!(got, m3, "GET shows what the last PUT returned");
}

#[test]
fn empty_put_changes_nothing() {
    let s = server_with_vm();
    let (status, m1) = s.put_json("/vms/vm1/metadata", &json!({"hostname": "web1"}));
    assert_eq!(status, 200);
    let (status, m2) = s.put_json("/vms/vm1/metadata", &json!({}));
    assert_eq!(status, 200, "{m2}");
    assert_eq!(m2["hostname"], "web1");
    assert_eq!(m2["created_at"], m1["created_at"]);
}

#[test]
fn metadata_is_per_vm() {
    let s = server_with_vm();
    make_vm(&s, "small", Some("vm2"));
    assert_eq!(
        s.put_json("/vms/vm1/metadata", &json!({"hostname": "one"}))
            .0,
        200
    );
    assert_eq!(
        s.put_json("/vms/vm2/metadata", &json!({"hostname": "two"}))
            .0,
        200
    );
    assert_eq!(s.get("/vms/vm1/metadata").1["hostname"], "one");
    assert_eq!(s.get("/vms/vm2/metadata").1["hostname"], "two");
    assert_eq!(s.delete("/vms/vm1/metadata").0, 204);
    assert_eq!(s.get("/vms/vm1/metadata").1["hostname"], Value::Null);
    assert_eq!(s.get("/vms/vm2/metadata").1["hostname"], "two");
}

#[test]
fn delete_forgets_everything() {
    let s = server_with_vm();
    let (status, _) = s.put_json(
        "/vms/vm1/metadata",
        &json!({"hostname": "web1", "user_data": "x", "ssh_keys": ["k1"]}),
    );
    assert_eq!(status, 200);
    let (status, body) = s.delete("/vms/vm1/metadata");
    assert_eq!(status, 204, "{body}");
    let (status, m) = s.get("/vms/vm1/metadata");
    assert_eq!(status, 200);
    for key in ["hostname", "user_data", "ssh_keys"] {
        assert_eq!(m[key], Value::Null, "{key} after delete: {m}");
    }
    // The VM itself stays.
    assert_eq!(s.get("/vms/vm1").0, 200);
}

#[test]
fn delete_never_set_metadata_of_an_existing_vm_is_204() {
    let s = server_with_vm();
    let (status, body) = s.delete("/vms/vm1/metadata");
    assert_eq!(status, 204, "{body}");
}

#[test]
fn unknown_vm_is_404_on_every_method() {
    let s = server_with_vm();
    assert_error(&s.get("/vms/nope/metadata"), 404);
    assert_error(
        &s.put_json("/vms/nope/metadata", &json!({"hostname": "h"})),
        404,
    );
    assert_error(&s.delete("/vms/nope/metadata"), 404);
    assert_error(&s.get("/vms/..%2Fvm1/metadata"), 404);
    // Nothing was created for the unknown VM.
    assert_error(&s.get("/vms/nope"), 404);
    assert_error(&s.get("/vms/nope/metadata"), 404);
}

#[test]
fn bad_bodies_are_4xx_and_change_nothing() {
    let s = server_with_vm();
    let (status, before) = s.put_json("/vms/vm1/metadata", &json!({"hostname": "web1"}));
    assert_eq!(status, 200);
    let cases: &[(&str, Option<&str>)] = &[
        (r#"{"hostname": 5}"#, Some("hostname")),
        (r#"{"hostname": ["a"]}"#, Some("hostname")),
        (r#"{"hostname": "bad host"}"#, Some("hostname")),
        (r#"{"hostname": "../../etc"}"#, Some("hostname")),
        (r#"{"hostname": "-lead"}"#, Some("hostname")),
        (r#"{"user_data": 1e30}"#, Some("user_data")),
        (r#"{"user_data": {"a": 1}}"#, Some("user_data")),
        (r#"{"ssh_keys": 5}"#, Some("ssh_keys")),
        (r#"{"ssh_keys": {"k": "v"}}"#, Some("ssh_keys")),
        (r#"{"ssh_keys": [1, 2]}"#, Some("ssh_keys")),
        (r#"{"ssh_keys": [""]}"#, Some("ssh_keys")),
        (r#"{"ssh_keys": ["a\nb"]}"#, Some("ssh_keys")),
        ("", None),
        ("[]", None),
        ("null", None),
        (r#"{"hostname": "web2""#, None),
        ("{hostname: web2}", None),
    ];
    for (body, field) in cases {
        let r = s.raw(
            "PUT",
            "/vms/vm1/metadata",
            Some(body.as_bytes()),
            &[("content-type", "application/json")],
        );
        assert!(
            r.status == 400 || r.status == 422,
            "{body:?} gave {} {}",
            r.status,
            r.text
        );
        let d = detail(&r.body);
        if let Some(f) = field {
            assert_eq!(r.status, 422, "{body:?}: {}", r.text);
            assert!(d.contains(f), "{body:?}: detail {d:?} does not name {f}");
        }
    }
    let (status, after) = s.get("/vms/vm1/metadata");
    assert_eq!(status, 200);
    assert_eq!(after, before, "a refused PUT changed the metadata");
    assert!(s.storage_entries_besides_db_and_logs().is_empty());
}

/// The bug: the first VMAN takes `ssh_keys` as one newline-separated
/// string (its schema, its database, its metadata server splitting it by
/// lines); vman answered 422 to it and wanted an array.
#[test]
fn ssh_keys_as_a_newline_separated_string_is_not_a_422() {
    let s = server_with_vm();
    let keys = "ssh-ed25519 AAAAC3Nza user@host\nssh-rsa AAAAB3Nza other@host";
    let (status, m) = s.put_json("/vms/vm1/metadata", &json!({ "ssh_keys": keys }));
    assert_eq!(status, 200, "{m}");
    assert_eq!(m["ssh_keys"], keys);
    assert_eq!(s.get("/vms/vm1/metadata").1["ssh_keys"], keys);

    // One key alone, with a trailing newline and CRLF line ends: the keys
    // are stored, blank lines dropped.
    let (status, m) = s.put_json(
        "/vms/vm1/metadata",
        &json!({"ssh_keys": "ssh-rsa AAAA one@host\r\n\r\n"}),
    );
    assert_eq!(status, 200, "{m}");
    assert_eq!(m["ssh_keys"], "ssh-rsa AAAA one@host");

    // The array form (extension) is answered as the same string.
    let (status, m) = s.put_json(
        "/vms/vm1/metadata",
        &json!({"ssh_keys": ["ssh-ed25519 AAAAC3Nza user@host", "ssh-rsa AAAAB3Nza other@host"]}),
    );
    assert_eq!(status, 200, "{m}");
    assert_eq!(m["ssh_keys"], keys);

    // The stored keys survive a restart of vman.
    let mut s = s;
    s.restart();
    assert_eq!(s.get("/vms/vm1/metadata").1["ssh_keys"], keys);
}
