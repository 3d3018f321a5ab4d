//! The console over a WebSocket (GET /vms/{id}/console/ws) with the tiny
//! guest: typed input reaches its shell and the output comes back, to every
//! viewer; a read-only viewer's input is dropped; the token may come as a
//! query parameter; leaving keeps the VM running; a stop closes the socket;
//! oversized frames close only that socket. And a killed QEMU becomes an
//! `exited` event with its reason on the event stream.

use std::io::{BufRead, BufReader};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

use crate::harness::{Vman, GUEST, SERVER};

const TOKEN: &str = "console-ws-test-token-0123";

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A blocking WebSocket client (the harness is blocking).
struct Ws {
    rt: tokio::runtime::Runtime,
    socket: Socket,
    /// Everything received so far.
    seen: String,
    /// The close frame's code, once closed.
    closed: Option<u16>,
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// Opens `path` with the given headers; the status of a refused handshake.
fn connect(vman: &Vman, path: &str, headers: &[(&str, &str)]) -> Result<Ws, u16> {
    let rt = runtime();
    let url = format!("{}{path}", vman.base.replace("http://", "ws://"));
    let mut req = url.into_client_request().expect("request");
    for (k, v) in headers {
        let name = tokio_tungstenite::tungstenite::http::HeaderName::from_bytes(k.as_bytes())
            .expect("header name");
        req.headers_mut()
            .insert(name, v.parse().expect("header value"));
    }
    match rt.block_on(tokio_tungstenite::connect_async(req)) {
        Ok((socket, _)) => Ok(Ws {
            rt,
            socket,
            seen: String::new(),
            closed: None,
        }),
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => Err(resp.status().as_u16()),
        Err(e) => panic!("connect {path}: {e}"),
    }
}

impl Ws {
    fn send(&mut self, msg: Message) {
        self.rt
            .block_on(self.socket.send(msg))
            .expect("send to the console");
    }

    fn type_line(&mut self, line: &str) {
        self.send(Message::text(format!("{line}\n")));
    }

    /// Reads until `found(seen)` holds; panics after `deadline`.
    fn read_until(&mut self, what: &str, deadline: Duration, found: impl Fn(&str) -> bool) {
        let start = Instant::now();
        while !found(&self.seen) {
            let left = deadline.saturating_sub(start.elapsed());
            assert!(
                !left.is_zero() && self.closed.is_none(),
                "no {what} after {:?} (closed: {:?}); seen:\n{}",
                start.elapsed(),
                self.closed,
                self.seen
            );
            let socket = &mut self.socket;
            let next = self
                .rt
                .block_on(async { tokio::time::timeout(left, socket.next()).await });
            match next {
                Err(_) => {}
                Ok(None) => self.closed = Some(0),
                Ok(Some(Ok(Message::Binary(b)))) => {
                    self.seen.push_str(&String::from_utf8_lossy(&b))
                }
                Ok(Some(Ok(Message::Text(t)))) => self.seen.push_str(&t),
                Ok(Some(Ok(Message::Close(frame)))) => {
                    self.closed = Some(frame.map_or(0, |f| u16::from(f.code)))
                }
                Ok(Some(Ok(_))) => {}
                Ok(Some(Err(e))) => panic!("console socket: {e}; seen:\n{}", self.seen),
            }
        }
    }

    /// Waits for the server's close frame; returns its code.
    fn wait_closed(&mut self, deadline: Duration) -> u16 {
        match self.closed_within(deadline) {
            Some(code) => code,
            None => panic!("not closed after {deadline:?}"),
        }
    }

    /// Types `line` again every few seconds until the server closes the
    /// socket (a line typed while the guest's shell is still being
    /// started can go unseen); returns the close code.
    fn type_until_closed(&mut self, line: &str, deadline: Duration) -> u16 {
        let start = Instant::now();
        loop {
            self.type_line(line);
            if let Some(code) = self.closed_within(Duration::from_secs(10)) {
                return code;
            }
            assert!(
                start.elapsed() < deadline,
                "not closed after {deadline:?}; seen:\n{}",
                self.seen
            );
        }
    }

    /// The server's close code, if it closes within `deadline`.
    fn closed_within(&mut self, deadline: Duration) -> Option<u16> {
        let start = Instant::now();
        while self.closed.is_none() {
            let left = deadline.saturating_sub(start.elapsed());
            if left.is_zero() {
                return None;
            }
            let socket = &mut self.socket;
            match self
                .rt
                .block_on(async { tokio::time::timeout(left, socket.next()).await })
            {
                Err(_) => {}
                Ok(Some(Ok(Message::Close(frame)))) => {
                    self.closed = Some(frame.map_or(0, |f| u16::from(f.code)))
                }
                Ok(None) | Ok(Some(Err(_))) => self.closed = Some(0),
                Ok(Some(Ok(Message::Binary(b)))) => {
                    self.seen.push_str(&String::from_utf8_lossy(&b))
                }
                Ok(Some(Ok(_))) => {}
            }
        }
        self.closed
    }

    fn close(mut self) {
        let _ = self.rt.block_on(self.socket.close(None));
    }
}

/// `prefix` followed by digits then `-nonce`: output of `echo prefix$RANDOM-nonce`
/// (its echo on the terminal shows `$RANDOM` unexpanded).
fn printed(seen: &str, prefix: &str, nonce: &str) -> bool {
    seen.match_indices(prefix).any(|(i, _)| {
        let rest = &seen[i + prefix.len()..];
        let digits = rest.chars().take_while(char::is_ascii_digit).count();
        digits > 0 && rest[digits..].starts_with(&format!("-{nonce}"))
    })
}

fn nonce() -> String {
    let n = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .subsec_nanos();
    format!("n{n}")
}

fn boot(vman: &Vman, id: &str) {
    let (s, b) = vman.create_vm(json!({"template_name": "tiny", "name": id}));
    assert_eq!(s, 201, "{b}");
    let (s, b) = vman.start_vm(id);
    assert_eq!(s, 202, "{b}");
    vman.wait_console(id, "vman-guest: ready", 1);
}

#[test]
fn typed_input_comes_back_to_every_viewer_and_readonly_input_is_dropped() {
    let vman = Vman::builder().with_tiny_default().api_token(TOKEN).start();
    vman.template("tiny", 256);
    boot(&vman, "c");
    let path = "/vms/c/console/ws";
    let bearer = format!("Bearer {TOKEN}");
    // The token rule: header or ?token=, nothing else.
    assert_eq!(connect(&vman, path, &[]).err(), Some(401));
    assert_eq!(
        connect(&vman, &format!("{path}?token=wrong-token-0123456789"), &[]).err(),
        Some(401)
    );
    let mut typer = connect(&vman, path, &[("authorization", &bearer)]).expect("typer");
    let mut viewer =
        connect(&vman, &format!("{path}?readonly=1&token={TOKEN}"), &[]).expect("viewer");

    let n = nonce();
    typer.type_line(&format!("echo hi-$RANDOM-{n}"));
    typer.read_until("the echo", GUEST, |s| printed(s, "hi-", &n));
    viewer.read_until("the echo (second viewer)", GUEST, |s| printed(s, "hi-", &n));

    // The read-only viewer types; then the typer does. Only the second runs.
    viewer.type_line(&format!("echo ro-$RANDOM-{n}"));
    typer.type_line(&format!("echo after-$RANDOM-{n}"));
    typer.read_until("the second echo", GUEST, |s| printed(s, "after-", &n));
    viewer.read_until("the second echo", GUEST, |s| printed(s, "after-", &n));
    assert!(!printed(&typer.seen, "ro-", &n), "{}", typer.seen);
    assert!(
        !vman.console("c").contains("ro-$RANDOM"),
        "{}",
        vman.console("c")
    );
    // The console file got the same output.
    assert!(printed(&vman.console("c"), "hi-", &n));

    // Leaving keeps the VM running, and its console working.
    typer.close();
    viewer.close();
    assert_eq!(vman.vm("c")["state"], "running");
    vman.type_line("c", &format!("echo back-$RANDOM-{n}"));
    let start = Instant::now();
    while !printed(&vman.console("c"), "back-", &n) {
        assert!(start.elapsed() < GUEST, "{}", vman.console("c"));
        std::thread::sleep(Duration::from_millis(100));
    }

    // An oversized frame closes that socket only.
    let mut big = connect(&vman, path, &[("authorization", &bearer)]).expect("big");
    let mut other = connect(&vman, path, &[("authorization", &bearer)]).expect("other");
    big.send(Message::binary(vec![b'x'; 1024 * 1024]));
    let code = big.wait_closed(SERVER);
    assert_ne!(code, 1000, "closed for the frame, not as a normal end");
    assert_eq!(vman.vm("c")["state"], "running");
    other.type_line(&format!("echo still-$RANDOM-{n}"));
    other.read_until("an echo after the big frame", GUEST, |s| {
        printed(s, "still-", &n)
    });

    // A stop closes the open sockets with 1000.
    let (s, b) = vman.post("/vms/c/actions/stop", json!({"force": true}));
    assert_eq!(s, 202, "{b}");
    assert_eq!(other.wait_closed(SERVER), 1000);
    // No console to open on a stopped VM: a JSON refusal, not an upgrade.
    let (s, b) = vman.call("GET", path, None);
    assert_eq!((s, b["code"].as_str()), (400, Some("not_running")), "{b}");
}

#[test]
fn plain_get_of_the_console_socket_is_426_and_bad_readonly_422() {
    let vman = Vman::builder().with_tiny_default().start();
    vman.template("tiny", 256);
    boot(&vman, "g");
    let (s, b) = vman.call("GET", "/vms/g/console/ws", None);
    assert_eq!(
        (s, b["code"].as_str()),
        (426, Some("upgrade_required")),
        "{b}"
    );
    let (s, b) = vman.call("GET", "/vms/g/console/ws?readonly=maybe", None);
    assert_eq!((s, b["code"].as_str()), (422, Some("invalid")), "{b}");
    let (s, b) = vman.call("GET", "/vms/nope/console/ws", None);
    assert_eq!(s, 404, "{b}");
    // At most 32 viewers per console; one more is refused, and a place
    // that frees up can be taken again.
    let mut viewers: Vec<Ws> = (0..32)
        .map(|i| {
            connect(&vman, "/vms/g/console/ws?readonly=1", &[])
                .unwrap_or_else(|s| panic!("viewer {i}: {s}"))
        })
        .collect();
    assert_eq!(connect(&vman, "/vms/g/console/ws", &[]).err(), Some(400));
    if let Some(one) = viewers.pop() {
        one.close();
    }
    let start = Instant::now();
    loop {
        match connect(&vman, "/vms/g/console/ws", &[]) {
            Ok(ws) => {
                viewers.push(ws);
                break;
            }
            Err(s) => assert!(s == 400 && start.elapsed() < SERVER, "{s}"),
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(vman.vm("g")["state"], "running");
}

/// The figure: from `kill -9` of QEMU to the `exited` event at an
/// SSE client (printed; no bound asserted).
#[test]
fn a_killed_qemu_gives_an_exited_event_with_its_reason() {
    let vman = Vman::builder().with_tiny_default().start();
    vman.template("tiny", 256);
    boot(&vman, "k");
    let pid = vman.vm("k")["pid"].as_i64().expect("pid") as i32;
    let client = reqwest::blocking::Client::builder()
        .timeout(None)
        .build()
        .expect("client");
    let resp = client
        .get(format!("{}/events?resource=k", vman.base))
        .send()
        .expect("GET /events");
    assert_eq!(resp.status().as_u16(), 200);
    let (tx, rx) = std::sync::mpsc::channel::<(Value, Instant)>();
    std::thread::spawn(move || {
        for line in BufReader::new(resp).lines() {
            let Ok(line) = line else { return };
            if let Some(data) = line.strip_prefix("data:") {
                let event: Value = serde_json::from_str(data.trim()).expect("event JSON");
                if tx.send((event, Instant::now())).is_err() {
                    return;
                }
            }
        }
    });
    let killed = Instant::now();
    // SAFETY: kill(2) of the guest's QEMU.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    let (event, at) = rx.recv_timeout(SERVER).expect("an event after the kill");
    assert_eq!(event["action"], "exited", "{event}");
    assert_eq!(event["detail"]["state"], "error", "{event}");
    let reason = event["detail"]["reason"].as_str().unwrap_or("");
    assert!(reason.contains("signal 9"), "{event}");
    eprintln!(
        "figure: kill -9 of QEMU -> exited event at the SSE client: {:.1} ms",
        (at - killed).as_secs_f64() * 1000.0
    );
}

#[test]
fn a_guest_power_off_closes_the_console_and_is_an_exited_event() {
    let vman = Vman::builder().with_tiny_default().start();
    vman.template("tiny", 256);
    boot(&vman, "p");
    let mut ws = connect(&vman, "/vms/p/console/ws", &[]).expect("console");
    assert_eq!(
        ws.type_until_closed("poweroff -f", GUEST),
        1000,
        "seen:\n{}",
        ws.seen
    );
    vman.wait_state("p", "stopped", SERVER);
    let (s, events) = vman.call("GET", "/events?follow=false&resource=p", None);
    assert_eq!(s, 200, "{events}");
    let last = events
        .as_array()
        .and_then(|l| l.last())
        .cloned()
        .expect("events");
    assert_eq!(last["action"], "exited", "{events}");
    assert_eq!(last["detail"]["state"], "stopped", "{last}");
    let reason = last["detail"]["reason"].as_str().unwrap_or("");
    assert!(reason.starts_with("guest powered off"), "{last}");
}
