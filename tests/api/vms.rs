//! /vms: create (named or with a generated UUID), list with ?state=, get one,
//! delete, and every refusal. Start/stop actions are not covered here.

use serde_json::{json, Value};

use crate::common::{assert_bad_body_refused, assert_error, is_uuid_v4, Server};
use crate::{make_template, make_vm, names};

fn server_with_template() -> Server {
    let s = Server::start();
    make_template(&s, "small", 2, 4);
    s
}

#[test]
fn create_named_vm_is_201_stopped_with_its_template() {
    let s = server_with_template();
    let vm = make_vm(&s, "small", Some("my-vm"));
    assert_eq!(vm["id"], "my-vm", "the id is the given name");
    assert_eq!(vm["state"], "stopped");
    assert_eq!(vm["vm_template"]["name"], "small");
    assert_eq!(vm["vm_template"]["cpu_count"], 2);
    assert_eq!(vm["vm_template"]["ram_amount"], 4);
    assert!(
        vm.as_object().expect("object").contains_key("local_ip"),
        "local_ip is part of the VM object: {vm}"
    );

    let (status, got) = s.get("/vms/my-vm");
    assert_eq!(status, 200);
    assert_eq!(got["id"], "my-vm");
    assert_eq!(got["state"], "stopped");
    assert_eq!(got["vm_template"], vm["vm_template"]);

    let (status, list) = s.get("/vms");
    assert_eq!(status, 200);
    assert_eq!(names(&list, "id"), vec!["my-vm"]);
}

#[test]
fn create_without_name_generates_a_uuid_v4() {
    let s = server_with_template();
    let a = make_vm(&s, "small", None);
    let b = make_vm(&s, "small", None);
    let (ida, idb) = (a["id"].as_str().expect("id"), b["id"].as_str().expect("id"));
    assert!(is_uuid_v4(ida), "{ida} is not a UUID v4");
    assert!(is_uuid_v4(idb), "{idb} is not a UUID v4");
    assert_ne!(ida, idb);
    let (status, got) = s.get(&format!("/vms/{ida}"));
    assert_eq!(status, 200);
    assert_eq!(got["id"], ida);
    let (_, list) = s.get("/vms");
    let mut want = vec![ida.to_owned(), idb.to_owned()];
    want.sort();
    assert_eq!(names(&list, "id"), want);
}

#[test]
fn name_null_is_like_no_name() {
    let s = server_with_template();
    let (status, vm) = s.post_json("/vms", &json!({"template_name": "small", "name": null}));
    assert_eq!(status, 201, "{vm}");
    assert!(is_uuid_v4(vm["id"].as_str().expect("id")), "{vm}");
}

#[test]
fn duplicate_id_is_400() {
    let s = server_with_template();
    make_vm(&s, "small", Some("dup"));
    let r = s.post_json("/vms", &json!({"template_name": "small", "name": "dup"}));
    assert_eq!(assert_error(&r, 400), "VM with this ID already exists");
    let (_, list) = s.get("/vms");
    assert_eq!(names(&list, "id"), vec!["dup"]);
}

#[test]
fn unknown_template_is_400_and_creates_nothing() {
    let s = server_with_template();
    let r = s.post_json("/vms", &json!({"template_name": "nope", "name": "orphan"}));
    assert_eq!(assert_error(&r, 400), "Template not found");
    let r = s.post_json("/vms", &json!({"template_name": "nope"}));
    assert_eq!(assert_error(&r, 400), "Template not found");
    assert_eq!(s.get("/vms"), (200, json!([])));
    assert_error(&s.get("/vms/orphan"), 404);
    assert!(s.storage_entries_besides_db_and_logs().is_empty());
}

#[test]
fn list_filters_by_state() {
    let s = server_with_template();
    make_vm(&s, "small", Some("a"));
    make_vm(&s, "small", Some("b"));
    let (status, all) = s.get("/vms");
    assert_eq!(status, 200);
    assert_eq!(names(&all, "id"), vec!["a", "b"]);
    let (status, stopped) = s.get("/vms?state=stopped");
    assert_eq!(status, 200);
    assert_eq!(names(&stopped, "id"), vec!["a", "b"]);
    assert_eq!(s.get("/vms?state=running"), (200, json!([])));
    assert_eq!(s.get("/vms?state=error"), (200, json!([])));
}

#[test]
fn list_with_bad_state_is_422_naming_state() {
    let s = server_with_template();
    make_vm(&s, "small", Some("a"));
    for q in ["bogus", "RUNNING", "", "stopped%20", "1"] {
        let r = s.get(&format!("/vms?state={q}"));
        let d = assert_error(&r, 422);
        assert!(d.contains("state"), "{q:?}: {d}");
    }
}

#[test]
fn get_unknown_is_404() {
    let s = server_with_template();
    assert_error(&s.get("/vms/nope"), 404);
    assert_error(&s.get("/vms/00000000-0000-4000-8000-000000000000"), 404);
    assert_error(&s.get("/vms/..%2F..%2Fetc%2Fpasswd"), 404);
    assert_error(&s.get("/vms/.hidden"), 404);
}

#[test]
fn delete_is_204_then_404() {
    let s = server_with_template();
    make_vm(&s, "small", Some("a"));
    make_vm(&s, "small", Some("b"));
    let (status, body) = s.delete("/vms/a");
    assert_eq!(status, 204, "{body}");
    assert_error(&s.get("/vms/a"), 404);
    let (_, list) = s.get("/vms");
    assert_eq!(names(&list, "id"), vec!["b"]);
    assert_error(&s.delete("/vms/a"), 404);
    assert_error(&s.delete("/vms/never"), 404);
    // The id is free again.
    make_vm(&s, "small", Some("a"));
}

#[test]
fn deleting_a_vm_forgets_its_metadata() {
    let s = server_with_template();
    make_vm(&s, "small", Some("a"));
    let (status, _) = s.put_json("/vms/a/metadata", &json!({"hostname": "web1"}));
    assert_eq!(status, 200);
    assert_eq!(s.delete("/vms/a").0, 204);
    assert_error(&s.get("/vms/a/metadata"), 404);
    make_vm(&s, "small", Some("a"));
    let (status, m) = s.get("/vms/a/metadata");
    assert_eq!(status, 200);
    assert_eq!(m["hostname"], Value::Null, "old metadata came back: {m}");
}

fn bad_vm_bodies() -> Vec<(String, Option<&'static str>)> {
    let named = |name: &str| json!({"template_name": "small", "name": name}).to_string();
    let mut cases: Vec<(String, Option<&'static str>)> = vec![
        ("{}".into(), Some("template_name")),
        (r#"{"name": "x"}"#.into(), Some("template_name")),
        (r#"{"template_name": 5}"#.into(), Some("template_name")),
        (r#"{"template_name": null}"#.into(), Some("template_name")),
        (
            r#"{"template_name": ["small"]}"#.into(),
            Some("template_name"),
        ),
        (
            r#"{"template_name": "small", "name": 5}"#.into(),
            Some("name"),
        ),
        (
            r#"{"template_name": "small", "name": 1e30}"#.into(),
            Some("name"),
        ),
        (
            r#"{"template_name": "small", "name": {"a": 1}}"#.into(),
            Some("name"),
        ),
        (
            r#"{"template_name": "../small"}"#.into(),
            Some("template_name"),
        ),
        (
            r#"{"template_name": "sm all"}"#.into(),
            Some("template_name"),
        ),
        ("".into(), None),
        ("[]".into(), None),
        (r#"[{"template_name": "small"}]"#.into(), None),
        ("null".into(), None),
        ("true".into(), None),
        (r#"{"template_name": "small""#.into(), None),
        (r#"{"template_name": 'small'}"#.into(), None),
        (r#"{"template_name": "small"}{}"#.into(), None),
    ];
    for bad in [
        "a/b",
        "../../etc",
        "..",
        ".",
        "my vm",
        "x".repeat(200).as_str(),
        ".hidden",
        "_under",
        "",
        "a%2Fb",
        "tab\tname",
    ] {
        cases.push((named(bad), Some("name")));
    }
    cases
}

#[test]
fn bad_bodies_are_4xx_with_detail_and_create_nothing() {
    let s = server_with_template();
    let before = s.storage_entries_besides_db_and_logs();
    for (body, field) in bad_vm_bodies() {
        assert_bad_body_refused(&s, "/vms", &body, field);
    }
    assert_eq!(s.get("/vms"), (200, json!([])), "nothing was created");
    assert_eq!(s.storage_entries_besides_db_and_logs(), before);
    assert!(before.is_empty(), "{before:?}");
    // The template is still free: no VM refers to it.
    assert_eq!(s.delete("/templates/small").0, 204);
}
