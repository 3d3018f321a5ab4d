//! `vman events`: the journal as a table or JSON in order, `--follow`
//! printing events as they happen (JSON lines), and the server's refusal
//! of a bad filter as exit 1 with its detail.

use std::io::{BufRead, BufReader};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::harness::{Vman, GUEST};
use crate::{rows, Cli};

#[test]
fn events_list_a_vms_create_start_stop_in_order_and_follow_prints_a_start() {
    let v = Vman::builder().with_tiny_default().start();
    let c = Cli::new(&v.base, &v.storage);
    c.ok(&[
        "template",
        "create",
        "tiny",
        "--cpus",
        "1",
        "--ram-mib",
        "256",
    ]);
    c.ok(&["vm", "create", "e1", "-t", "tiny"]);
    c.ok(&["vm", "start", "e1"]);
    c.ok(&["vm", "stop", "e1", "--force"]);

    let actions = |list: &Value| -> Vec<String> {
        list.as_array()
            .expect("a list")
            .iter()
            .map(|e| e["action"].as_str().unwrap_or("").to_owned())
            .collect()
    };
    let list = c.json(&["events", "--type", "vm", "--resource", "e1"]);
    assert_eq!(actions(&list), ["created", "started", "stopped"], "{list}");
    let ids: Vec<i64> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["id"].as_i64().unwrap())
        .collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
    assert!(list
        .as_array()
        .unwrap()
        .iter()
        .all(|e| e["resource"] == "e1"));

    // The table: a header and one row per event, in the same order.
    let table = c.ok(&["events", "--resource", "e1"]);
    let t = rows(&table);
    assert_eq!(
        t[0][..5],
        ["ID", "TIME", "TYPE", "RESOURCE", "ACTION"],
        "{table}"
    );
    let acts: Vec<&str> = t[1..].iter().map(|r| r[4].as_str()).collect();
    assert_eq!(acts, ["created", "started", "stopped"], "{table}");
    // YAML too; --since keeps only later events.
    assert!(c
        .ok(&["events", "--format", "yaml"])
        .contains("action: created"));
    let since = ids[0].to_string();
    let later = c.json(&["events", "--resource", "e1", "--since", &since]);
    assert_eq!(actions(&later), ["started", "stopped"], "{later}");

    // --follow: once it says it follows (on stderr, after the server
    // subscribed it), the next start shows up as a JSON line, live.
    let mut child = c
        .command(&["events", "--follow", "--type", "vm", "--format", "json"])
        .spawn()
        .expect("spawn events --follow");
    let stdout = child.stdout.take().expect("stdout");
    let stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let _ = tx.send(line);
        }
    });
    let mut err_lines = BufReader::new(stderr).lines();
    let first = err_lines.next().expect("a line on stderr").expect("stderr");
    assert!(first.starts_with("vman: following events at "), "{first}");
    c.ok(&["vm", "start", "e1"]);
    let start = Instant::now();
    let event: Value = loop {
        let left = GUEST.saturating_sub(start.elapsed());
        let line = rx
            .recv_timeout(left.max(Duration::from_millis(1)))
            .expect("a line from events --follow");
        let e: Value = serde_json::from_str(&line).expect("a JSON line");
        if e["action"] == "started" {
            break e;
        }
    };
    assert_eq!(event["resource"], "e1", "{event}");
    assert!(event["id"].as_i64().unwrap() > ids[2], "{event}");
    let _ = child.kill();
    let _ = child.wait();
    c.ok(&["vm", "stop", "e1", "--force"]);
}

#[test]
fn bad_event_filters_exit_1_with_the_servers_detail() {
    let v = Vman::builder().start();
    let c = Cli::new(&v.base, &v.storage);
    for args in [
        &["events", "--type", "nope"][..],
        &["events", "--follow", "--type", "nope"],
    ] {
        let d = c.refused(args);
        assert!(
            d.contains("type") && d.contains("vm, disk"),
            "{args:?}: {d}"
        );
    }
    let d = c.refused(&["events", "--since=-1"]);
    assert!(d.contains("since"), "{d}");
    let d = c.refused(&["events", "--follow", "--since", "x"]);
    assert!(d.contains("Last-Event-ID") || d.contains("since"), "{d}");
    let d = c.refused(&["events", "--limit", "0"]);
    assert!(d.contains("limit"), "{d}");
}

/// Serves one SSE request on `listener`: answers `body` and closes (when
/// `close`) or keeps the connection open; returns the request's head.
fn serve_sse(listener: &std::net::TcpListener, body: &str, close: bool) -> String {
    use std::io::{Read, Write};
    let (mut conn, _) = listener.accept().expect("accept");
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if conn.read(&mut byte).expect("read request") == 0 {
            break;
        }
        head.push(byte[0]);
    }
    write!(
        conn,
        "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n{body}"
    )
    .expect("answer");
    conn.flush().expect("flush");
    if !close {
        // Held open until the test ends (the client is killed first).
        std::mem::forget(conn);
    }
    String::from_utf8_lossy(&head).to_lowercase()
}

/// A stream the server drops while it is still up is resumed after the
/// last event printed: the next request carries `Last-Event-ID`, and no
/// event is printed twice. (A scripted SSE endpoint: the real server only
/// ends streams when it shuts down, where exit 3 is the right answer.)
#[test]
fn follow_resumes_a_dropped_stream_with_last_event_id() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let server = std::thread::spawn(move || {
        let first = serve_sse(
            &listener,
            ": keep-alive\n\nid: 5\ndata: {\"id\":5,\"action\":\"created\"}\n\n",
            true,
        );
        let second = serve_sse(
            &listener,
            "id: 6\ndata: {\"id\":6,\"action\":\"started\"}\n\n",
            false,
        );
        (first, second)
    });
    let dir = tempfile::tempdir().unwrap();
    let c = Cli::new(&url, dir.path());
    let mut child = c
        .command(&["events", "--follow", "--format", "json"])
        .spawn()
        .expect("spawn events --follow");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let _ = tx.send(line);
        }
    });
    let mut next = || -> Value {
        let line = rx.recv_timeout(GUEST);
        let line = line.unwrap_or_else(|_| {
            let _ = child.kill();
            panic!("events --follow printed no further event")
        });
        serde_json::from_str(&line).expect("a JSON line")
    };
    let one = next();
    let two = next();
    let (first, second) = server.join().unwrap();
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!((one["id"].as_i64(), two["id"].as_i64()), (Some(5), Some(6)));
    assert!(first.starts_with("get /events "), "{first}");
    assert!(!first.contains("last-event-id"), "{first}");
    assert!(second.contains("last-event-id: 5\r\n"), "{second}");
}
