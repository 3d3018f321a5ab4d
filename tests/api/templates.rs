//! /templates: create, list, get one, delete, and every refusal.

use serde_json::json;

use crate::common::{assert_bad_body_refused, assert_error, detail, Server};
use crate::{make_template, make_vm, names};

#[test]
fn create_returns_the_template_and_lists_it() {
    let s = Server::start();
    let (status, list) = s.get("/templates");
    assert_eq!((status, &list), (200, &json!([])));

    let t = make_template(&s, "small", 2, 4);
    assert_eq!(t["name"], "small");
    assert_eq!(t["cpu_count"], 2);
    assert_eq!(t["ram_amount"], 4, "ram_amount is GiB, given back as is");

    let (status, list) = s.get("/templates");
    assert_eq!(status, 200);
    assert_eq!(list.as_array().expect("array").len(), 1);
    assert_eq!(list[0], t, "the list holds what POST returned");

    let (status, one) = s.get("/templates/small");
    assert_eq!(status, 200);
    assert_eq!(one, t);
}

#[test]
fn list_holds_every_template() {
    let s = Server::start();
    for (i, name) in ["a", "b-2", "C.3", "d_4"].iter().enumerate() {
        make_template(&s, name, i as u64 + 1, 1);
    }
    let (status, list) = s.get("/templates");
    assert_eq!(status, 200);
    assert_eq!(names(&list, "name"), vec!["C.3", "a", "b-2", "d_4"]);
}

#[test]
fn duplicate_name_is_400_and_keeps_the_first() {
    let s = Server::start();
    make_template(&s, "small", 1, 1);
    let r = s.post_json(
        "/templates",
        &json!({"name": "small", "cpu_count": 8, "ram_amount": 16}),
    );
    assert_eq!(assert_error(&r, 400), "Template already exists");
    let (_, one) = s.get("/templates/small");
    assert_eq!(
        (one["cpu_count"].clone(), one["ram_amount"].clone()),
        (json!(1), json!(1))
    );
    let (_, list) = s.get("/templates");
    assert_eq!(list.as_array().expect("array").len(), 1);
}

#[test]
fn get_unknown_is_404_with_detail() {
    let s = Server::start();
    let r = s.get("/templates/nope");
    assert_error(&r, 404);
    // A segment that cannot be a name cannot exist either.
    assert_error(&s.get("/templates/..%2F..%2Fetc"), 404);
}

#[test]
fn delete_is_204_then_gone() {
    let s = Server::start();
    make_template(&s, "small", 1, 1);
    make_template(&s, "big", 4, 8);
    let (status, body) = s.delete("/templates/small");
    assert_eq!(status, 204, "{body}");
    assert_error(&s.get("/templates/small"), 404);
    let (_, list) = s.get("/templates");
    assert_eq!(names(&list, "name"), vec!["big"]);
    assert_error(&s.delete("/templates/small"), 404);
}

#[test]
fn delete_unknown_is_404() {
    let s = Server::start();
    assert_error(&s.delete("/templates/never-made"), 404);
}

#[test]
fn delete_in_use_is_400_until_the_vm_is_gone() {
    let s = Server::start();
    make_template(&s, "small", 1, 1);
    make_vm(&s, "small", Some("vm1"));
    let r = s.delete("/templates/small");
    assert_eq!(assert_error(&r, 400), "Template is in use by 1 VM(s)");
    assert_eq!(s.get("/templates/small").0, 200, "still there");

    make_vm(&s, "small", Some("vm2"));
    let r = s.delete("/templates/small");
    assert_eq!(assert_error(&r, 400), "Template is in use by 2 VM(s)");

    assert_eq!(s.delete("/vms/vm1").0, 204);
    assert_eq!(s.delete("/vms/vm2").0, 204);
    assert_eq!(s.delete("/templates/small").0, 204);
    assert_error(&s.get("/templates/small"), 404);
}

#[test]
fn ram_mib_extension_and_name_boundaries() {
    let s = Server::start();
    let (status, t) = s.post_json(
        "/templates",
        &json!({"name": "tiny", "cpu_count": 1, "ram_mib": 256}),
    );
    assert_eq!(status, 201, "{t}");
    assert_eq!(t["ram_mib"], 256);
    assert_eq!(t["ram_amount"].as_f64(), Some(0.25));

    // 63 characters is the longest name; one character is the shortest.
    let longest = "x".repeat(63);
    make_template(&s, &longest, 1, 1);
    make_template(&s, "9", 1, 1);
    assert_eq!(s.get(&format!("/templates/{longest}")).0, 200);
    let r = s.post_json(
        "/templates",
        &json!({"name": "y".repeat(64), "cpu_count": 1, "ram_amount": 1}),
    );
    assert!(assert_error(&r, 422).contains("name"));
}

/// Bodies that must all be refused with a 4xx and a JSON detail, and the
/// field the detail must name (None for syntax errors).
fn bad_template_bodies() -> Vec<(String, Option<&'static str>)> {
    let named = |name: &str| json!({"name": name, "cpu_count": 1, "ram_amount": 1}).to_string();
    let mut cases: Vec<(String, Option<&'static str>)> = vec![
        // missing fields
        (r#"{"cpu_count": 1, "ram_amount": 1}"#.into(), Some("name")),
        (
            r#"{"name": "t", "ram_amount": 1}"#.into(),
            Some("cpu_count"),
        ),
        (
            r#"{"name": "t", "cpu_count": 1}"#.into(),
            Some("ram_amount"),
        ),
        ("{}".into(), Some("name")),
        // wrong types
        (
            r#"{"name": 5, "cpu_count": 1, "ram_amount": 1}"#.into(),
            Some("name"),
        ),
        (
            r#"{"name": "t", "cpu_count": "2", "ram_amount": 1}"#.into(),
            Some("cpu_count"),
        ),
        (
            r#"{"name": "t", "cpu_count": true, "ram_amount": 1}"#.into(),
            Some("cpu_count"),
        ),
        (
            r#"{"name": "t", "cpu_count": null, "ram_amount": 1}"#.into(),
            Some("cpu_count"),
        ),
        (
            r#"{"name": "t", "cpu_count": 1, "ram_amount": "4"}"#.into(),
            Some("ram_amount"),
        ),
        (
            r#"{"name": "t", "cpu_count": 1, "ram_amount": [4]}"#.into(),
            Some("ram_amount"),
        ),
        (
            r#"{"name": ["t"], "cpu_count": 1, "ram_amount": 1}"#.into(),
            Some("name"),
        ),
        // zero, negative, fractional, huge
        (
            r#"{"name": "t", "cpu_count": 0, "ram_amount": 1}"#.into(),
            Some("cpu_count"),
        ),
        (
            r#"{"name": "t", "cpu_count": -1, "ram_amount": 1}"#.into(),
            Some("cpu_count"),
        ),
        (
            r#"{"name": "t", "cpu_count": 1.5, "ram_amount": 1}"#.into(),
            Some("cpu_count"),
        ),
        (
            r#"{"name": "t", "cpu_count": 1e30, "ram_amount": 1}"#.into(),
            Some("cpu_count"),
        ),
        (
            r#"{"name": "t", "cpu_count": 18446744073709551616, "ram_amount": 1}"#.into(),
            Some("cpu_count"),
        ),
        (
            r#"{"name": "t", "cpu_count": 4294967297, "ram_amount": 1}"#.into(),
            Some("cpu_count"),
        ),
        (
            r#"{"name": "t", "cpu_count": 1, "ram_amount": 0}"#.into(),
            Some("ram_amount"),
        ),
        (
            r#"{"name": "t", "cpu_count": 1, "ram_amount": -4}"#.into(),
            Some("ram_amount"),
        ),
        (
            r#"{"name": "t", "cpu_count": 1, "ram_amount": 1e30}"#.into(),
            Some("ram_amount"),
        ),
        (
            r#"{"name": "t", "cpu_count": 1, "ram_amount": 18446744073709551615}"#.into(),
            Some("ram_amount"),
        ),
        (
            r#"{"name": "t", "cpu_count": 1, "ram_amount": 18446744073709551616}"#.into(),
            Some("ram_amount"),
        ),
        (
            r#"{"name": "t", "cpu_count": 1, "ram_mib": 0}"#.into(),
            Some("ram_mib"),
        ),
        (
            r#"{"name": "t", "cpu_count": 1, "ram_amount": 1, "ram_mib": 512}"#.into(),
            Some("ram"),
        ),
        (
            r#"{"name": "t", "cpu_count": 1, "ram_amount": 1, "disk_size_gb": 0}"#.into(),
            Some("disk_size_gb"),
        ),
        (
            r#"{"name": "t", "cpu_count": 1, "ram_amount": 1, "disk_size_gb": -1}"#.into(),
            Some("disk_size_gb"),
        ),
        // not an object, or not JSON at all
        ("".into(), None),
        ("   ".into(), None),
        ("[]".into(), None),
        (
            r#"[{"name": "t", "cpu_count": 1, "ram_amount": 1}]"#.into(),
            None,
        ),
        ("null".into(), None),
        ("\"small\"".into(), None),
        ("42".into(), None),
        (
            r#"{"name": "t", "cpu_count": 1, "ram_amount": 1"#.into(),
            None,
        ),
        (
            r#"{"name": "t", "cpu_count": 1, "ram_amount": 1} trailing"#.into(),
            None,
        ),
        (r#"{name: "t", cpu_count: 1, ram_amount: 1}"#.into(), None),
        (
            r#"{"name": "t",, "cpu_count": 1, "ram_amount": 1}"#.into(),
            None,
        ),
        ("\u{0}\u{1}binary".into(), None),
    ];
    for bad in [
        "a/b",
        "/abs",
        "..",
        "../../etc",
        "a b",
        " lead",
        ".hidden",
        "-dash",
        "",
        "é",
        "a\\b",
        "a\nb",
        "x".repeat(200).as_str(),
    ] {
        cases.push((named(bad), Some("name")));
    }
    cases
}

#[test]
fn bad_bodies_are_4xx_with_detail_and_create_nothing() {
    let s = Server::start();
    let before = s.storage_entries_besides_db_and_logs();
    for (body, field) in bad_template_bodies() {
        assert_bad_body_refused(&s, "/templates", &body, field);
    }
    let (status, list) = s.get("/templates");
    assert_eq!((status, list), (200, json!([])), "nothing was created");
    assert_eq!(s.storage_entries_besides_db_and_logs(), before);
    assert!(
        before.is_empty(),
        "storage has only the db and logs: {before:?}"
    );
}

#[test]
fn oversized_body_gets_413_and_nothing_breaks() {
    // Regression: the server used to answer before reading the body, so the
    // client saw a reset, or reused a connection the server had closed.
    let s = Server::start();
    let huge = "x".repeat(2 * 1024 * 1024);
    let body = json!({"name": "big", "cpu_count": 1, "ram_amount": 1, "pad": huge}).to_string();
    for _ in 0..5 {
        let r = s
            .try_raw(
                "POST",
                "/templates",
                Some(body.as_bytes()),
                &[("content-type", "application/json")],
            )
            .expect("an answer, not a reset");
        assert_eq!(r.status, 413, "{}", r.text);
        assert!(detail(&r.body).contains("too large"), "{}", r.text);
        assert_eq!(s.get("/templates"), (200, json!([])));
    }
}

#[test]
fn body_without_content_type_is_still_json() {
    // Scripts written for the first service send `curl -d` bodies.
    let s = Server::start();
    let r = s.raw(
        "POST",
        "/templates",
        Some(br#"{"name": "small", "cpu_count": 1, "ram_amount": 4}"#),
        &[],
    );
    assert_eq!(r.status, 201, "{}", r.text);
    let (_, list) = s.get("/templates");
    assert_eq!(names(&list, "name"), vec!["small"]);
}
