//! A VM placed on n2, driven through n1: start (202 once QEMU runs on n2),
//! console, metadata, stop, delete — the answers are n2's own.

use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

use crate::e2e::{qemu_processes, GUEST, SERVER};
use crate::harness::{wait_until, Cluster};

/// What a console WebSocket through a node saw: the text, and the close
/// code once closed.
struct Seen {
    text: String,
    closed: Option<u16>,
}

/// Opens the console WebSocket of `id` through `base`, types `line`, and
/// reads until `until(seen)` holds or the deadline passes.
async fn console_ws(
    base: &str,
    id: &str,
    line: &str,
    until: impl Fn(&Seen) -> bool,
    deadline: Duration,
) -> Seen {
    let url = format!("{}/vms/{id}/console/ws", base.replace("http://", "ws://"));
    let req = url.into_client_request().expect("request");
    let (mut socket, _) = tokio_tungstenite::connect_async(req)
        .await
        .expect("console ws");
    socket
        .send(Message::text(format!("{line}\n")))
        .await
        .expect("type");
    let mut seen = Seen {
        text: String::new(),
        closed: None,
    };
    let start = Instant::now();
    while !until(&seen) && seen.closed.is_none() {
        let left = deadline.saturating_sub(start.elapsed());
        assert!(
            !left.is_zero(),
            "console ws: nothing after {deadline:?}: {}",
            seen.text
        );
        match tokio::time::timeout(left, socket.next()).await {
            Ok(Some(Ok(Message::Binary(b)))) => seen.text.push_str(&String::from_utf8_lossy(&b)),
            Ok(Some(Ok(Message::Text(t)))) => seen.text.push_str(&t),
            Ok(Some(Ok(Message::Close(f)))) => {
                seen.closed = Some(f.map_or(0, |f| u16::from(f.code)))
            }
            Ok(Some(Ok(_))) => {}
            Ok(None) => seen.closed = Some(0),
            Ok(Some(Err(e))) => panic!("console ws: {e}"),
            Err(_) => {}
        }
    }
    seen
}

/// The VM as a node answers it, without the `node` field and the fields
/// that change by themselves.
fn comparable(mut v: Value) -> Value {
    if let Some(o) = v.as_object_mut() {
        o.remove("node");
    }
    v
}

#[test]
fn start_stop_console_metadata_of_a_vm_on_n2_work_through_n1() {
    let c = Cluster::start();
    c.template("tiny", 128);
    let vm = c.create_on(1, 2, "far", "tiny");
    assert_eq!(vm["node"], "n2");
    let (n1, n2) = (c.n(1), c.n(2));
    let (s, b) = n1.start_vm("far");
    assert_eq!(s, 202, "{b}");
    // Running on n2, not on n1.
    assert_eq!(qemu_processes(&n2.storage).len(), 1);
    assert!(qemu_processes(&n1.storage).is_empty());
    n1.wait_state("far", "running", GUEST);
    n1.wait_console("far", "vman-guest: boot ok hostname=far", 1);
    // GET through n1 is n2's answer plus `node`.
    wait_until(SERVER, "same answer", || {
        comparable(n1.vm("far")) == comparable(n2.vm("far"))
    });
    assert_eq!(n1.vm("far")["node"], "n2");
    // Refusals are n2's, unchanged.
    let through = n1.start_vm("far");
    let direct = n2.start_vm("far");
    assert_eq!(through, direct);
    assert_eq!(through.0, 400);
    // Console input and output through n1.
    n1.type_line("far", "echo through-$((6*7))-n1");
    n1.wait_console("far", "through-42-n1", 1);
    // The console WebSocket through n1: typed input reaches the guest on
    // n2 and its output comes back.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("rt");
    let seen = rt.block_on(console_ws(
        &n1.base,
        "far",
        "echo ws-$((6*7))-relay",
        |s| s.text.contains("ws-42-relay"),
        GUEST,
    ));
    assert!(seen.text.contains("ws-42-relay"), "{}", seen.text);
    // An unknown VM: 404, as on a single host.
    let req = format!(
        "{}/vms/nope/console/ws",
        n1.base.replace("http://", "ws://")
    )
    .into_client_request()
    .expect("request");
    match rt.block_on(tokio_tungstenite::connect_async(req)) {
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => assert_eq!(r.status().as_u16(), 404),
        other => panic!("expected 404, got {:?}", other.map(|(_, r)| r.status())),
    }
    // Metadata through n1 lands on n2.
    let (s, b) = n1.call(
        "PUT",
        "/vms/far/metadata",
        Some(json!({"hostname": "farhost"})),
    );
    assert_eq!(s, 200, "{b}");
    assert_eq!(n2.get("/vms/far/metadata")["hostname"], "farhost");
    assert_eq!(n1.get("/vms/far/metadata"), n2.get("/vms/far/metadata"));
    // Stop through n3.
    let (s, b) = c.n(3).post("/vms/far/actions/stop", json!({}));
    assert_eq!(s, 202, "{b}");
    assert_eq!(b["status"], "stopped");
    assert_eq!(n2.vm("far")["state"], "stopped");
    wait_until(SERVER, "stopped everywhere", || {
        (1..=3).all(|n| {
            c.n(n)
                .get("/vms")
                .as_array()
                .unwrap()
                .iter()
                .any(|v| v["id"] == "far" && v["state"] == "stopped")
        })
    });
    // Delete through n1: gone from n2's store and from every list.
    let (s, b) = n1.call("DELETE", "/vms/far", None);
    assert_eq!(s, 204, "{b}");
    assert_eq!(n2.call("GET", "/vms/far", None).0, 404);
    assert_eq!(n1.call("GET", "/vms/far", None).0, 404);
    wait_until(SERVER, "gone everywhere", || {
        (1..=3).all(|n| c.n(n).get("/vms").as_array().unwrap().is_empty())
    });
    wait_until(SERVER, "memory released", || {
        c.nodes_seen_by(1)
            .iter()
            .all(|n| n["memory_reserved_mib"] == 0)
    });
}
