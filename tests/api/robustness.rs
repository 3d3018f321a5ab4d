//! No request may cause a 5xx: every route of the service's own OpenAPI
//! document, with path ids that do not exist or cannot exist, and bodies
//! that are malformed, of the wrong shape or absurd, must get a 4xx with a
//! JSON `detail` (or a success), never a 5xx, and the server must go on.

use serde_json::Value;

use crate::common::{detail, Server};

const IDS: &[&str] = &["nope", "..", "%2e%2e%2fetc", "a%20b", "%00", "-x", "x%2Fy"];

const BODIES: &[&str] = &[
    "",
    "{",
    "[]",
    "null",
    "\"text\"",
    "12",
    "{}",
    r#"{"name": 1e400}"#,
    r#"{"size": -1, "vm_id": null, "force": "yes", "data": 5}"#,
    r#"{"template_name": ["a"], "name": {"x": 1}}"#,
    r#"{"cpu_count": 18446744073709551616, "ram_amount": 1}"#,
    "\u{0}\u{1}\u{2}",
];

#[test]
fn no_route_answers_5xx_to_bad_input() {
    let s = Server::start();
    let (status, doc) = s.get("/openapi.json");
    assert_eq!(status, 200);
    let paths = doc["paths"].as_object().expect("paths").clone();
    assert!(paths.len() >= 10, "{}", paths.len());
    let mut tried = 0;
    for (template, ops) in &paths {
        let ops = ops.as_object().expect("operations");
        for method in ops.keys().filter(|m| *m != "parameters") {
            let method = method.to_uppercase();
            let concrete: Vec<String> = if template.contains('{') {
                IDS.iter()
                    .map(|id| {
                        let mut p = template.clone();
                        while let (Some(a), Some(b)) = (p.find('{'), p.find('}')) {
                            p.replace_range(a..=b, id);
                        }
                        p
                    })
                    .collect()
            } else if template == "/events" {
                // Streams until the client leaves: ask for the list.
                vec!["/events?follow=false".to_owned()]
            } else {
                vec![template.clone()]
            };
            for path in &concrete {
                for body in BODIES {
                    let r = s.raw(
                        &method,
                        path,
                        Some(body.as_bytes()),
                        &[("content-type", "application/json")],
                    );
                    tried += 1;
                    assert!(
                        r.status < 500,
                        "{method} {path} {body:?} -> {} {}",
                        r.status,
                        r.text
                    );
                    if r.status >= 400 {
                        assert!(
                            matches!(r.body, Value::Object(_)) && !detail(&r.body).is_empty(),
                            "{method} {path} {body:?} -> {} {}",
                            r.status,
                            r.text
                        );
                    }
                }
            }
        }
    }
    assert!(tried > 500, "only {tried} requests");
    assert_eq!(s.get("/health").0, 200, "the server is still well");
}
