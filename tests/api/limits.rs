//! Issue 9, hole 6: 1,200 slow-header connections all stayed open. Headers
//! must arrive within `VMAN_HEADER_TIMEOUT`, and at most
//! `VMAN_MAX_CONNECTIONS` connections are served at once (the others wait).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use crate::common::{Server, DEADLINE};

/// A connection that sent half a request line's headers and then nothing.
fn slow_header_connection(s: &Server) -> TcpStream {
    let mut c = TcpStream::connect(("127.0.0.1", s.port())).expect("connect");
    c.write_all(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        .expect("write partial headers");
    c
}

/// True when the server closed `c` (EOF or reset) before `DEADLINE`.
fn closed_by_server(c: &mut TcpStream) -> bool {
    c.set_read_timeout(Some(DEADLINE)).expect("read timeout");
    let mut buf = [0u8; 1024];
    loop {
        match c.read(&mut buf) {
            Ok(0) => return true,
            // hyper may answer 408 first; keep reading until the close.
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
    }
}

#[test]
fn slow_header_connections_are_closed_after_the_header_timeout() {
    let s = Server::builder()
        .env("VMAN_HEADER_TIMEOUT", "1")
        .env("VMAN_MAX_CONNECTIONS", "8")
        .start();
    // Three times the limit: the limit is hit, later ones wait in the backlog.
    let mut slow: Vec<TcpStream> = (0..24).map(|_| slow_header_connection(&s)).collect();
    // A normal request is still answered (once the timeout frees a slot).
    let (status, body) = s.get("/templates");
    assert_eq!(status, 200, "{body}");
    for (i, c) in slow.iter_mut().enumerate() {
        assert!(closed_by_server(c), "slow connection {i} still open");
    }
    // Under the limit, a normal request is answered while slow ones wait.
    let mut slow: Vec<TcpStream> = (0..4).map(|_| slow_header_connection(&s)).collect();
    let (status, _) = s.get("/templates");
    assert_eq!(status, 200);
    for (i, c) in slow.iter_mut().enumerate() {
        assert!(closed_by_server(c), "slow connection {i} still open");
    }
}

#[test]
fn connection_limit_makes_new_clients_wait_for_a_free_slot() {
    let s = Server::builder()
        .env("VMAN_HEADER_TIMEOUT", "3600")
        .env("VMAN_MAX_CONNECTIONS", "2")
        .start();
    let first = slow_header_connection(&s);
    let _second = slow_header_connection(&s);
    let url = s.url("/templates");
    let (tx, rx) = mpsc::channel();
    let waiter = thread::spawn(move || {
        let client = reqwest::blocking::Client::builder()
            .timeout(DEADLINE * 4)
            .build()
            .expect("client");
        let status = client.get(url).send().map(|r| r.status().as_u16());
        let _ = tx.send(status);
    });
    // Both slots are held (and the header timeout is an hour): the request
    // must not be answered while they are.
    assert!(
        rx.recv_timeout(Duration::from_secs(2)).is_err(),
        "answered beyond VMAN_MAX_CONNECTIONS=2"
    );
    // Freeing one slot lets it through.
    first.shutdown(std::net::Shutdown::Both).expect("close");
    drop(first);
    let status = rx
        .recv_timeout(DEADLINE)
        .expect("answered once a slot is free");
    assert_eq!(status.expect("request"), 200);
    waiter.join().expect("waiter");
}
