//! Parallel requests: one winner for one name, no "database is locked".

use std::sync::Barrier;
use std::thread;

use serde_json::{json, Value};

use crate::common::{detail, Server};
use crate::{make_template, names};

/// Runs `n` requests at once (released together by a barrier).
fn parallel(s: &Server, n: usize, body: impl Fn(usize) -> Value + Sync) -> Vec<(u16, Value)> {
    let barrier = Barrier::new(n);
    thread::scope(|scope| {
        let handles: Vec<_> = (0..n)
            .map(|i| {
                let (barrier, body) = (&barrier, &body);
                scope.spawn(move || {
                    let b = body(i);
                    barrier.wait();
                    s.post_json(
                        if b.get("template_name").is_some() {
                            "/vms"
                        } else {
                            "/templates"
                        },
                        &b,
                    )
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("request thread"))
            .collect()
    })
}

#[track_caller]
fn assert_never_locked(s: &Server, replies: &[(u16, Value)]) {
    for (status, body) in replies {
        assert!(*status < 500, "{status} {body}");
        assert!(
            !body.to_string().to_lowercase().contains("locked"),
            "{body}"
        );
    }
    assert!(!s.logs_contain("database is locked"), "{:#?}", s.logs());
}

#[test]
fn twenty_parallel_creates_of_one_name_give_one_201() {
    let s = Server::start();
    make_template(&s, "small", 1, 1);
    let replies = parallel(
        &s,
        20,
        |_| json!({"template_name": "small", "name": "same"}),
    );
    assert_never_locked(&s, &replies);
    let created = replies.iter().filter(|(st, _)| *st == 201).count();
    assert_eq!(created, 1, "{replies:?}");
    for (status, body) in replies.iter().filter(|(st, _)| *st != 201) {
        assert_eq!(*status, 400, "{body}");
        assert_eq!(detail(body), "VM with this ID already exists");
    }
    let (_, list) = s.get("/vms");
    assert_eq!(names(&list, "id"), vec!["same"]);
}

#[test]
fn twenty_parallel_creates_of_one_template_give_one_201() {
    let s = Server::start();
    let replies = parallel(
        &s,
        20,
        |_| json!({"name": "same", "cpu_count": 1, "ram_amount": 1}),
    );
    assert_never_locked(&s, &replies);
    assert_eq!(
        replies.iter().filter(|(st, _)| *st == 201).count(),
        1,
        "{replies:?}"
    );
    for (status, body) in replies.iter().filter(|(st, _)| *st != 201) {
        assert_eq!(*status, 400, "{body}");
        assert_eq!(detail(body), "Template already exists");
    }
}

#[test]
fn many_parallel_different_creates_all_succeed() {
    let s = Server::start();
    make_template(&s, "small", 1, 1);
    let n = 50;
    let replies = parallel(&s, n, |i| {
        if i % 2 == 0 {
            json!({"template_name": "small", "name": format!("vm-{i}")})
        } else {
            json!({"template_name": "small"})
        }
    });
    assert_never_locked(&s, &replies);
    for (status, body) in &replies {
        assert_eq!(*status, 201, "{body}");
    }
    let (_, list) = s.get("/vms");
    assert_eq!(list.as_array().expect("array").len(), n);

    let templates = parallel(
        &s,
        n,
        |i| json!({"name": format!("t{i}"), "cpu_count": 1, "ram_amount": 1}),
    );
    assert_never_locked(&s, &templates);
    assert!(templates.iter().all(|(st, _)| *st == 201), "{templates:?}");
    let (_, list) = s.get("/templates");
    assert_eq!(list.as_array().expect("array").len(), n + 1);
}

#[test]
fn reads_and_writes_interleave_safely() {
    let s = Server::start();
    make_template(&s, "small", 1, 1);
    let n = 40;
    let barrier = Barrier::new(n);
    let statuses: Vec<u16> = thread::scope(|scope| {
        let handles: Vec<_> = (0..n)
            .map(|i| {
                let (s, barrier) = (&s, &barrier);
                scope.spawn(move || {
                    barrier.wait();
                    match i % 4 {
                        0 => {
                            s.post_json(
                                "/vms",
                                &json!({"template_name": "small", "name": format!("v{i}")}),
                            )
                            .0
                        }
                        1 => s.get("/vms").0,
                        2 => {
                            s.put_json("/vms/v0/metadata", &json!({"hostname": format!("h{i}")}))
                                .0
                        }
                        _ => s.get("/templates").0,
                    }
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("thread"))
            .collect()
    });
    for (i, st) in statuses.iter().enumerate() {
        match i % 4 {
            0 => assert_eq!(*st, 201, "create v{i}"),
            // v0 may not exist yet when a metadata PUT runs.
            2 => assert!(*st == 200 || *st == 404, "metadata put {st}"),
            _ => assert_eq!(*st, 200, "read {i}"),
        }
    }
    assert!(!s.logs_contain("database is locked"));
    let (_, list) = s.get("/vms");
    assert_eq!(list.as_array().expect("array").len(), n / 4);
}
