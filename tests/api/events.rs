//! GET /events: the journal of state changes and actions, streamed as
//! Server-Sent Events (resumable without loss) or listed as JSON. VMs are
//! started for real: a QEMU under TCG with an empty root disk (it sits in
//! the firmware, which is enough to start, stop and kill it).

use std::io::{BufRead, BufReader};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::common::Server;
use crate::{make_template, make_vm};

/// Generous: a busy 2-core CI starting QEMU under TCG.
const DEADLINE: Duration = Duration::from_secs(60);

/// An open event stream read by a thread; events arrive on a channel.
struct Stream {
    rx: mpsc::Receiver<Value>,
    /// The status and content type of the answer.
    status: u16,
    content_type: String,
}

impl Stream {
    fn open(s: &Server, query: &str, last_event_id: Option<i64>) -> Stream {
        let client = reqwest::blocking::Client::builder()
            .timeout(None)
            .build()
            .expect("client");
        let mut req = client.get(s.url(&format!("/events{query}")));
        if let Some(id) = last_event_id {
            req = req.header("Last-Event-ID", id.to_string());
        }
        let resp = req.send().expect("GET /events");
        let status = resp.status().as_u16();
        let content_type = resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            let mut id: Option<i64> = None;
            for line in BufReader::new(resp).lines() {
                let Ok(line) = line else { return };
                if let Some(v) = line.strip_prefix("id: ").or(line.strip_prefix("id:")) {
                    id = v.trim().parse().ok();
                } else if let Some(data) =
                    line.strip_prefix("data: ").or(line.strip_prefix("data:"))
                {
                    let mut event: Value = serde_json::from_str(data).expect("event JSON");
                    // The SSE id is the event's id.
                    assert_eq!(Some(event["id"].as_i64().expect("id")), id, "{event}");
                    event["sse_id"] = json!(id);
                    if tx.send(event).is_err() {
                        return;
                    }
                }
            }
        });
        Stream {
            rx,
            status,
            content_type,
        }
    }

    /// The next event, or a panic after the deadline.
    #[track_caller]
    fn next(&self) -> Value {
        self.rx
            .recv_timeout(DEADLINE)
            .unwrap_or_else(|e| panic!("no event within {DEADLINE:?}: {e}"))
    }

    /// Events until one matches `(resource, action)`; returns all of them.
    #[track_caller]
    fn until(&self, resource: &str, action: &str) -> Vec<Value> {
        let mut seen = Vec::new();
        loop {
            let e = self.next();
            let done = e["resource"] == resource && e["action"] == action;
            seen.push(e);
            if done {
                return seen;
            }
        }
    }

    /// Nothing more arrives within `wait`.
    #[track_caller]
    fn quiet_for(&self, wait: Duration) {
        if let Ok(e) = self.rx.recv_timeout(wait) {
            panic!("unexpected event {e}");
        }
    }
}

fn actions(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .map(|e| {
            format!(
                "{} {} {}",
                e["type"].as_str().unwrap_or("?"),
                e["resource"].as_str().unwrap_or("?"),
                e["action"].as_str().unwrap_or("?")
            )
        })
        .collect()
}

fn ids(events: &[Value]) -> Vec<i64> {
    events
        .iter()
        .map(|e| e["id"].as_i64().expect("id"))
        .collect()
}

/// A template small enough for many QEMUs under TCG.
fn tiny_template(s: &Server, name: &str) {
    let (status, body) = s.post_json(
        "/templates",
        &json!({"name": name, "cpu_count": 1, "ram_mib": 64}),
    );
    assert_eq!(status, 201, "{body}");
}

fn start(s: &Server, vm: &str) {
    let (status, body) = s.post_json(&format!("/vms/{vm}/actions/start"), &json!({}));
    assert_eq!(status, 202, "start {vm}: {body}");
}

fn force_stop(s: &Server, vm: &str) {
    let (status, body) = s.post_json(&format!("/vms/{vm}/actions/stop"), &json!({"force": true}));
    assert_eq!(status, 202, "stop {vm}: {body}");
}

fn past(s: &Server, query: &str) -> Vec<Value> {
    let (status, body) = s.get(&format!("/events?follow=false{query}"));
    assert_eq!(status, 200, "{body}");
    body.as_array().expect("a JSON list").clone()
}

#[test]
fn create_start_stop_delete_come_in_order_on_the_stream() {
    let s = Server::start();
    let _guests = crate::KillGuests(s.storage_path().to_owned());
    let stream = Stream::open(&s, "", None);
    assert_eq!(stream.status, 200);
    assert!(
        stream.content_type.starts_with("text/event-stream"),
        "{}",
        stream.content_type
    );
    tiny_template(&s, "t");
    make_vm(&s, "t", Some("vm1"));
    start(&s, "vm1");
    force_stop(&s, "vm1");
    assert_eq!(s.delete("/vms/vm1").0, 204);
    let seen = stream.until("vm1", "deleted");
    assert_eq!(
        actions(&seen),
        [
            "template t created",
            "vm vm1 created",
            "vm vm1 started",
            "vm vm1 stopped",
            "vm vm1 deleted"
        ]
    );
    let ids = ids(&seen);
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
    let started = &seen[2];
    assert_eq!(started["detail"]["state"], "running", "{started}");
    assert!(started["detail"]["pid"].as_i64().is_some(), "{started}");
    let stopped = &seen[3];
    assert_eq!(stopped["detail"]["state"], "stopped", "{stopped}");
    assert!(stopped["detail"]["method"].is_string(), "{stopped}");
    assert!(stopped["time"].as_str().is_some_and(|t| t.ends_with('Z')));
    // The same events, listed.
    assert_eq!(actions(&past(&s, "")), actions(&seen));
}

#[test]
fn a_killed_qemu_gives_an_exited_event_with_its_reason() {
    let s = Server::start();
    let _guests = crate::KillGuests(s.storage_path().to_owned());
    tiny_template(&s, "t");
    make_vm(&s, "t", Some("victim"));
    let stream = Stream::open(&s, "?resource=victim", None);
    start(&s, "victim");
    let (_, vm) = s.get("/vms/victim");
    let pid = vm["pid"].as_i64().expect("pid") as i32;
    // SAFETY: plain kill(2) of the VM's QEMU.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0, "kill {pid}");
    let seen = stream.until("victim", "exited");
    assert_eq!(actions(&seen), ["vm victim started", "vm victim exited"]);
    let exited = &seen[1];
    assert_eq!(exited["detail"]["state"], "error", "{exited}");
    let reason = exited["detail"]["reason"].as_str().unwrap_or("");
    assert!(reason.contains("QEMU exited unexpectedly"), "{exited}");
    assert!(reason.contains('9'), "the signal is named: {exited}");
}

#[test]
fn reconnecting_with_last_event_id_misses_nothing_and_repeats_nothing() {
    let s = Server::start();
    let first = Stream::open(&s, "", None);
    make_template(&s, "a", 1, 1);
    make_template(&s, "b", 1, 1);
    let seen = first.until("b", "created");
    let last = seen.last().expect("an event")["id"].as_i64().expect("id");
    drop(first);
    // While nobody listens.
    make_template(&s, "c", 1, 1);
    make_template(&s, "d", 1, 1);
    let again = Stream::open(&s, "", Some(last));
    let missed = again.until("d", "created");
    assert_eq!(
        actions(&missed),
        ["template c created", "template d created"]
    );
    assert_eq!(ids(&missed), [last + 1, last + 2]);
    // Then live ones, without a duplicate.
    make_template(&s, "e", 1, 1);
    let live = again.next();
    assert_eq!(actions(std::slice::from_ref(&live)), ["template e created"]);
    assert_eq!(live["id"].as_i64(), Some(last + 3));
    again.quiet_for(Duration::from_millis(500));
    // ?since= does the same; Last-Event-ID wins over it.
    let since = Stream::open(&s, &format!("?since={last}"), None);
    assert_eq!(actions(&since.until("e", "created")).len(), 3);
    let both = Stream::open(&s, "?since=0", Some(last + 2));
    assert_eq!(actions(&[both.next()]), ["template e created"]);
}

#[test]
fn many_events_while_a_client_resumes_arrive_each_once_in_order() {
    // Events written while the replay runs: none lost between the store
    // and the live channel, none given twice.
    let s = Server::start();
    for i in 0..20 {
        make_template(&s, &format!("old{i}"), 1, 1);
    }
    let writer = {
        let url = s.url("/templates");
        thread::spawn(move || {
            let c = reqwest::blocking::Client::new();
            for i in 0..100 {
                let r = c
                    .post(&url)
                    .json(&json!({"name": format!("new{i}"), "cpu_count": 1, "ram_amount": 1}))
                    .send()
                    .expect("post");
                assert_eq!(r.status().as_u16(), 201);
            }
        })
    };
    let stream = Stream::open(&s, "?since=0", None);
    let seen = stream.until("new99", "created");
    writer.join().expect("writer");
    assert_eq!(ids(&seen), (1..=120).collect::<Vec<i64>>());
    stream.quiet_for(Duration::from_millis(500));
}

#[test]
fn type_and_resource_filters() {
    let s = Server::start();
    let vms_only = Stream::open(&s, "?type=vm", None);
    let one = Stream::open(&s, "?resource=vm2", None);
    make_template(&s, "t", 1, 1);
    make_vm(&s, "t", Some("vm1"));
    make_vm(&s, "t", Some("vm2"));
    let (status, _) = s.put_json("/vms/vm2/metadata", &json!({"hostname": "h"}));
    assert_eq!(status, 200);
    assert_eq!(
        s.post_json("/disks", &json!({"name": "d1", "size": 1})).0,
        201
    );
    assert_eq!(s.delete("/vms/vm1").0, 204);
    assert_eq!(
        actions(&vms_only.until("vm1", "deleted")),
        [
            "vm vm1 created",
            "vm vm2 created",
            "vm vm2 metadata_updated",
            "vm vm1 deleted"
        ]
    );
    assert_eq!(
        actions(&one.until("vm2", "metadata_updated")),
        ["vm vm2 created", "vm vm2 metadata_updated"]
    );
    one.quiet_for(Duration::from_millis(500));
    assert_eq!(actions(&past(&s, "&type=disk")), ["disk d1 created"]);
    assert_eq!(
        actions(&past(&s, "&type=vm&resource=vm1")),
        ["vm vm1 created", "vm vm1 deleted"]
    );
}

#[test]
fn follow_false_lists_past_events_as_json() {
    let s = Server::start();
    assert_eq!(past(&s, ""), Vec::<Value>::new());
    for name in ["a", "b", "c", "d"] {
        make_template(&s, name, 1, 1);
    }
    let all = past(&s, "");
    assert_eq!(ids(&all), [1, 2, 3, 4]);
    let e = &all[0];
    for key in ["id", "time", "type", "resource", "action", "detail"] {
        assert!(!e[key].is_null(), "{key} missing: {e}");
    }
    assert_eq!(e["detail"]["cpu_count"], 1, "{e}");
    assert_eq!(ids(&past(&s, "&since=2")), [3, 4]);
    assert_eq!(
        ids(&past(&s, "&limit=2")),
        [3, 4],
        "the newest, oldest first"
    );
    assert_eq!(ids(&past(&s, "&since=1&limit=2")), [2, 3]);
    for bad in [
        "?follow=maybe",
        "?since=-1",
        "?since=x",
        "?type=vmm",
        "?limit=0",
        "?limit=10001",
        "?resource=",
    ] {
        let (status, body) = s.get(&format!("/events{bad}"));
        assert_eq!(status, 422, "{bad}: {body}");
        assert_eq!(body["code"], "invalid", "{bad}: {body}");
    }
    let r = s.raw("GET", "/events", None, &[("Last-Event-ID", "nope")]);
    assert_eq!(r.status, 422, "{}", r.text);
}

#[test]
fn events_are_bounded_by_vman_events_keep() {
    let s = Server::builder().env("VMAN_EVENTS_KEEP", "3").start();
    for name in ["a", "b", "c", "d", "e"] {
        make_template(&s, name, 1, 1);
    }
    assert_eq!(ids(&past(&s, "")), [3, 4, 5]);
    // A client resuming from a pruned id gets what is left.
    assert_eq!(ids(&past(&s, "&since=1")), [3, 4, 5]);
}

#[test]
fn events_need_the_token() {
    let token = "0123456789abcdef0123";
    let s = Server::builder().api_token(token).start();
    let r = s.raw("GET", "/events?follow=false", None, &[]);
    assert_eq!(r.status, 401, "{}", r.text);
    let r = s.raw("GET", "/events", None, &[]);
    assert_eq!(r.status, 401, "{}", r.text);
    assert_eq!(s.get("/events?follow=false").0, 200);
}

#[test]
fn a_graceful_stop_ends_open_event_streams() {
    let mut s = Server::start();
    let stream = Stream::open(&s, "", None);
    let t0 = Instant::now();
    let status = s.sigterm();
    assert!(status.success(), "{status:?}");
    // The stream ended rather than holding the shutdown.
    assert!(matches!(
        stream.rx.recv_timeout(DEADLINE),
        Err(mpsc::RecvTimeoutError::Disconnected)
    ));
    eprintln!("stopped in {:?}", t0.elapsed());
}

#[test]
fn an_observer_finding_is_an_event_told_once_while_it_lasts() {
    let s = Server::builder().env("VMAN_OBSERVER_INTERVAL", "1").start();
    let stream = Stream::open(&s, "?type=observer", None);
    std::fs::write(s.storage_path().join("disks").join("stray.qcow2"), b"x").expect("stray file");
    let seen = stream.until("stray", "finding");
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(
        seen[0]["detail"]["issue"], "orphan_disk_file",
        "{}",
        seen[0]
    );
    // Several more passes see it again; it is not told again.
    let passes = |s: &Server| s.get("/observer/status").1["passes"].as_u64().unwrap_or(0);
    let now = passes(&s);
    let start = Instant::now();
    while passes(&s) < now + 3 {
        assert!(start.elapsed() < DEADLINE, "the observer stopped");
        thread::sleep(Duration::from_millis(100));
    }
    stream.quiet_for(Duration::from_millis(200));
}

#[test]
fn disk_actions_are_events() {
    let s = Server::start();
    let stream = Stream::open(&s, "?type=disk", None);
    make_template(&s, "t", 1, 1);
    make_vm(&s, "t", Some("vm1"));
    assert_eq!(
        s.post_json("/disks", &json!({"name": "d1", "size": 1})).0,
        201
    );
    let (status, body) = s.post_json("/disks/d1/attach", &json!({"vm_id": "vm1"}));
    assert_eq!(status, 200, "{body}");
    let (status, body) = s.post_json("/disks/d1/resize", &json!({"size": 2}));
    assert_eq!(status, 200, "{body}");
    let (status, body) = s.post_json("/disks/d1/detach", &json!({}));
    assert_eq!(status, 200, "{body}");
    assert_eq!(s.delete("/disks/d1").0, 204);
    let seen = stream.until("d1", "deleted");
    assert_eq!(
        actions(&seen),
        [
            "disk d1 created",
            "disk d1 attached",
            "disk d1 resized",
            "disk d1 detached",
            "disk d1 deleted"
        ]
    );
    assert_eq!(seen[1]["detail"]["vm"], "vm1", "{}", seen[1]);
    assert_eq!(
        (
            seen[2]["detail"]["from"].as_u64(),
            seen[2]["detail"]["size"].as_u64()
        ),
        (Some(1), Some(2))
    );
}

#[test]
fn a_qemu_taken_over_after_a_vman_restart_is_an_adopted_event() {
    let mut s = Server::start();
    let _guests = crate::KillGuests(s.storage_path().to_owned());
    tiny_template(&s, "t");
    make_vm(&s, "t", Some("vm1"));
    start(&s, "vm1");
    let last = ids(&past(&s, "")).last().copied().expect("events");
    s.kill9();
    s.restart();
    // Resuming after the last event seen before the crash.
    let stream = Stream::open(&s, "?resource=vm1", Some(last));
    let seen = stream.until("vm1", "adopted");
    assert_eq!(actions(&seen), ["vm vm1 adopted"]);
    assert_eq!(seen[0]["detail"]["state"], "running", "{}", seen[0]);
    assert!(seen[0]["id"].as_i64() > Some(last));
    force_stop(&s, "vm1");
}
