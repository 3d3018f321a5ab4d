//! GET /vms/{id}/console/ws without a guest OS: a QEMU under TCG with an
//! empty disk has a console to attach to. Refusals before the upgrade are
//! JSON; a graceful stop of vman closes open console sockets with 1001.

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

use crate::common::Server;
use crate::make_vm;

fn ws_url(s: &Server, path: &str) -> String {
    s.url(path).replace("http://", "ws://")
}

fn start_empty_vm(s: &Server, id: &str) {
    let (status, body) = s.post_json(
        "/templates",
        &json!({"name": "t", "cpu_count": 1, "ram_mib": 64}),
    );
    assert_eq!(status, 201, "{body}");
    make_vm(s, "t", Some(id));
    let (status, body) = s.post_json(&format!("/vms/{id}/actions/start"), &json!({}));
    assert_eq!(status, 202, "{body}");
}

#[test]
fn refusals_come_before_the_upgrade_as_json() {
    let s = Server::start();
    let _guests = crate::KillGuests(s.storage_path().to_owned());
    let (status, body) = s.get("/vms/nope/console/ws");
    assert_eq!(
        (status, body["code"].as_str()),
        (404, Some("not_found")),
        "{body}"
    );
    start_empty_vm(&s, "c");
    let (status, body) = s.get("/vms/c/console/ws");
    assert_eq!(
        (status, body["code"].as_str()),
        (426, Some("upgrade_required")),
        "{body}"
    );
    let (status, body) = s.get("/vms/c/console/ws?readonly=2");
    assert_eq!(
        (status, body["code"].as_str()),
        (422, Some("invalid")),
        "{body}"
    );
    let (status, body) = s.post_json("/vms/c/actions/stop", &json!({"force": true}));
    assert_eq!(status, 202, "{body}");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    match rt.block_on(tokio_tungstenite::connect_async(ws_url(
        &s,
        "/vms/c/console/ws",
    ))) {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            assert_eq!(resp.status().as_u16(), 400);
            let body: serde_json::Value =
                serde_json::from_slice(resp.body().as_deref().unwrap_or(b"null")).expect("JSON");
            assert_eq!(body["code"], "not_running", "{body}");
        }
        other => panic!("a stopped VM's console opened: {:?}", other.map(|_| ())),
    }
}

#[test]
fn a_graceful_stop_closes_open_console_sockets_with_1001() {
    let mut s = Server::start();
    let _guests = crate::KillGuests(s.storage_path().to_owned());
    start_empty_vm(&s, "c");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let (mut ws, _) = rt
        .block_on(tokio_tungstenite::connect_async(ws_url(
            &s,
            "/vms/c/console/ws",
        )))
        .expect("console socket");
    let t0 = Instant::now();
    assert!(s.sigterm().success());
    let code = rt.block_on(async {
        loop {
            match tokio::time::timeout(Duration::from_secs(30), ws.next()).await {
                Ok(Some(Ok(Message::Close(frame)))) => return frame.map(|f| u16::from(f.code)),
                Ok(Some(Ok(_))) => continue,
                other => panic!("no close frame: {other:?}"),
            }
        }
    });
    assert_eq!(code, Some(1001));
    eprintln!(
        "vman stopped in {:?} with a console socket open",
        t0.elapsed()
    );
}
