//! User-mode networking with real tiny guests (issue 11): the guest gets
//! its address by DHCP, forwarded host ports reach its web server (slirp
//! and passt), a forward added to a running VM applies at once (slirp) or
//! at the next start (passt), a taken host port is a 400, forwards and
//! passt survive a vman restart, the guest cannot reach vman's API at any
//! address it can try, and a clean exit leaves no passt and no nftables
//! table behind.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::harness::{Vman, GUEST, SERVER};

/// A guard table of this test's own, so parallel tests (and other vman
/// instances on the host) never remove each other's; removed when the test
/// ends whatever happened (after the test's own check that vman did).
struct Table(String);

impl Table {
    fn new(test: &str) -> Self {
        Self(format!("vman_t_{test}_{}", std::process::id()))
    }
}

impl Drop for Table {
    fn drop(&mut self) {
        if nft_table_exists(&self.0) {
            let _ = std::process::Command::new("nft")
                .args(["delete", "table", "inet", &self.0])
                .status();
        }
    }
}

fn nft_table_exists(table: &str) -> bool {
    std::process::Command::new("nft")
        .args(["list", "table", "inet", table])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// One HTTP GET of / on 127.0.0.1:`port`; the whole answer, if any.
fn http_get(port: u64) -> Option<String> {
    let addr = format!("127.0.0.1:{port}");
    let mut s = TcpStream::connect_timeout(&addr.parse().ok()?, Duration::from_secs(5)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    s.write_all(b"GET / HTTP/1.0\r\nHost: guest\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    Some(out)
}

/// Waits until the guest's page, reached through host port `port`, names
/// the guest (a forward answers before the guest's server listens: poll).
fn wait_page(vman: &Vman, port: u64, needle: &str) {
    let start = Instant::now();
    loop {
        if http_get(port).is_some_and(|a| a.contains(needle)) {
            return;
        }
        assert!(
            start.elapsed() < GUEST,
            "host port {port} never reached the guest page {needle:?}; vman log:\n{}",
            vman.logs().join("\n")
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn free_port() -> u64 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    u64::from(l.local_addr().expect("addr").port())
}

fn add_port(vman: &Vman, id: &str, body: Value) -> Value {
    let (s, b) = vman.post(&format!("/vms/{id}/ports"), body);
    assert_eq!(s, 201, "{b}");
    b
}

/// Live passt processes serving a VM folder under `storage`.
fn passts(storage: &Path) -> Vec<i32> {
    let needle = storage.to_string_lossy().into_owned();
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let pid = e.file_name().to_str()?.parse::<i32>().ok()?;
            let raw = std::fs::read(e.path().join("cmdline")).ok()?;
            let cmd = String::from_utf8_lossy(&raw).replace('\0', " ");
            (cmd.starts_with("passt") && cmd.contains(&needle)).then_some(pid)
        })
        .collect()
}

fn wait_no_passt(storage: &Path) {
    let start = Instant::now();
    while !passts(storage).is_empty() {
        assert!(
            start.elapsed() < SERVER,
            "passt still runs: {:?}",
            passts(storage)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn stop(vman: &Vman, id: &str) {
    let (s, b) = vman.post(&format!("/vms/{id}/actions/stop"), json!({"force": true}));
    assert!(s == 200 || s == 202, "{s} {b}");
}

/// The host's first non-loopback IPv4 address, if it has one.
fn host_ip() -> Option<String> {
    let out = std::process::Command::new("hostname")
        .arg("-I")
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .find(|a| a.parse::<std::net::Ipv4Addr>().is_ok())
        .map(str::to_owned)
}

/// From inside the guest, sends `GET /health` (with a `Host` vman accepts)
/// to `host port` and prints `probe <tag> bytes=<n>`: the size of whatever
/// answered (0: refused, dropped or silent). Returns n. The request's side
/// stays open 3 s: vman drops a request whose client half-closed at once.
fn guest_probe(vman: &Vman, id: &str, tag: &str, host: &str, port: u64) -> i64 {
    let marker = format!("probe {tag} bytes=");
    vman.type_line(
        id,
        &format!(
            "(printf 'GET /health HTTP/1.0\\r\\nHost: 127.0.0.1\\r\\n\\r\\n'; sleep 3) | timeout 20 nc -w 5 {host} {port} >/tmp/p 2>/dev/null; echo \"probe {tag} bytes=$(wc -c </tmp/p)\""
        ),
    );
    let start = Instant::now();
    loop {
        let console = vman.console(id);
        // The typed line echoes `bytes=$(...)`; the answer has digits.
        if let Some(n) = console
            .lines()
            .filter_map(|l| l.trim().strip_prefix(&marker))
            .filter_map(|r| r.trim().parse::<i64>().ok())
            .next_back()
        {
            return n;
        }
        assert!(
            start.elapsed() < GUEST,
            "no {marker} on the console:\n{console}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// From inside guest `id`, vman's API port answers at none of `gateways`
/// nor at the host's own address.
fn assert_api_unreachable(vman: &Vman, id: &str, gateways: &[&str]) {
    let api_port: u64 = vman
        .base
        .rsplit(':')
        .next()
        .and_then(|p| p.trim_end_matches('/').parse().ok())
        .expect("vman port");
    let mut targets: Vec<String> = gateways.iter().map(|g| (*g).to_owned()).collect();
    targets.extend(host_ip());
    targets.push("127.0.0.1".into());
    for host in &targets {
        let n = guest_probe(vman, id, &format!("api-{host}"), host, api_port);
        assert_eq!(
            n, 0,
            "the guest {id} got an answer from vman's API port at {host}:{api_port}"
        );
    }
}

/// slirp (the default): address, forwards (at creation, added while
/// running, removed), a port in use, the guest kept off vman's API, a vman
/// restart while it runs, and nothing left after a clean exit.
#[test]
fn slirp_guest_gets_its_address_and_forwards_reach_its_web_server() {
    let table = Table::new("slirp");
    let guard = table.0.clone();
    let mut vman = Vman::builder()
        .with_tiny_default()
        .env("VMAN_USER_NET", "slirp")
        .env("VMAN_GUARD_TABLE", &guard)
        .start();
    vman.template("tiny", 256);
    let (s, vm) = vman.create_vm(json!({"template_name": "tiny", "name": "web"}));
    assert_eq!(s, 201, "{vm}");
    assert_eq!(vm["network"]["mode"], "user");
    let web = add_port(&vman, "web", json!({"guest_port": 80}));
    assert_eq!(web["applied"], "next_start");
    let web_port = web["host_port"].as_u64().expect("port");
    let (s, b) = vman.start_vm("web");
    assert_eq!(s, 202, "{b}");
    vman.wait_console("web", "vman-guest: ip 169.254.169.15", 1);
    let vm = vman.vm("web");
    assert_eq!(vm["local_ip"], "169.254.169.15");
    assert_eq!(vm["network"]["local_ip"], "169.254.169.15");
    wait_page(&vman, web_port, "vman-guest web");
    // slirp runs restricted (only forwards and the metadata relay): it
    // needs no guard table, and one would break the relay's plumbing.
    assert!(!nft_table_exists(&guard), "no guard table for slirp guests");

    // A forward added while it runs applies at once.
    let hot = free_port();
    let added = add_port(&vman, "web", json!({"guest_port": 80, "host_port": hot}));
    assert_eq!(added["applied"], "now");
    wait_page(&vman, hot, "vman-guest web");
    // A host port taken by a socket, or by a forward, is a 400.
    let held = TcpListener::bind("127.0.0.1:0").expect("bind");
    let taken = held.local_addr().expect("addr").port();
    for port in [u64::from(taken), web_port] {
        let (s, b) = vman.post(
            "/vms/web/ports",
            json!({"guest_port": 80, "host_port": port}),
        );
        assert_eq!((s, b["code"].as_str()), (400, Some("port_in_use")), "{b}");
    }
    drop(held);
    // Removed while it runs: the port closes at once.
    let (s, b) = vman.call("DELETE", &format!("/vms/web/ports/{hot}"), None);
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["applied"], "now");
    assert!(http_get(hot).is_none(), "removed forward still answers");

    // From inside the guest: its own server answers (the probe works) ...
    vman.wait_console("web", "vman-guest: ready", 1);
    assert!(guest_probe(&vman, "web", "self", "127.0.0.1", 80) > 0);
    // ... vman's API does not, at any address the guest can try.
    assert_api_unreachable(
        &vman,
        "web",
        &["169.254.169.2", "169.254.169.3", "10.0.2.2"],
    );

    // vman restarts while the guest runs: QEMU adopted, forwards still work.
    vman.restart();
    assert_eq!(vman.vm("web")["state"], "running");
    wait_page(&vman, web_port, "vman-guest web");

    stop(&vman, "web");
    assert_eq!(vman.vm("web")["local_ip"], Value::Null);
    assert!(
        !nft_table_exists(&guard),
        "guard table kept with no VM running"
    );
    vman.sigterm();
    assert!(
        !nft_table_exists(&guard),
        "guard table left after a clean exit"
    );
}

/// passt: address 10.0.2.15, forwards, a forward on a running VM applies at
/// the next start, passt is taken over across a vman restart, stopped with
/// the VM, and nothing is left after a clean exit.
#[test]
fn passt_guest_forwards_survive_a_vman_restart_and_passt_goes_with_the_vm() {
    let table = Table::new("passt");
    let guard = table.0.clone();
    let mut vman = Vman::builder()
        .with_tiny_default()
        .env("VMAN_USER_NET", "passt")
        .env("VMAN_GUARD_TABLE", &guard)
        .env("VMAN_OBSERVER_INTERVAL", "1")
        .start();
    vman.template("tiny", 256);
    let (s, vm) = vman.create_vm(json!({"template_name": "tiny", "name": "pw"}));
    assert_eq!(s, 201, "{vm}");
    let web_port = add_port(&vman, "pw", json!({"guest_port": 80}))["host_port"]
        .as_u64()
        .expect("port");
    let (s, b) = vman.start_vm("pw");
    assert_eq!(s, 202, "{b}");
    let running = passts(&vman.storage);
    assert_eq!(running.len(), 1, "one passt for the VM: {running:?}");
    vman.wait_console("pw", "vman-guest: ip 10.0.2.15", 1);
    assert_eq!(vman.vm("pw")["network"]["local_ip"], "10.0.2.15");
    if is_root() {
        assert!(
            nft_table_exists(&guard),
            "passt (its own user) is guarded as root"
        );
    }
    wait_page(&vman, web_port, "vman-guest pw");
    vman.wait_console("pw", "vman-guest: ready", 1);
    assert!(guest_probe(&vman, "pw", "self", "127.0.0.1", 80) > 0);
    assert_api_unreachable(&vman, "pw", &["10.0.2.2"]);

    // passt takes forwards at start only.
    let later = add_port(&vman, "pw", json!({"guest_port": 80}));
    assert_eq!(later["applied"], "next_start");

    // vman crashes and comes back: QEMU and passt are taken over.
    vman.restart();
    assert_eq!(vman.vm("pw")["state"], "running");
    assert_eq!(passts(&vman.storage), running, "the same passt serves on");
    wait_page(&vman, web_port, "vman-guest pw");
    assert!(
        vman.log_count(&format!("adopted its running passt pid {}", running[0])) == 1,
        "{}",
        vman.logs().join("\n")
    );

    // Restarted through the API: the later forward now works too.
    let (s, b) = vman.post("/vms/pw/actions/restart", json!({"force": true}));
    assert_eq!(s, 202, "{b}");
    vman.wait_console("pw", "vman-guest: ip 10.0.2.15", 2);
    wait_page(
        &vman,
        later["host_port"].as_u64().expect("port"),
        "vman-guest pw",
    );

    stop(&vman, "pw");
    wait_no_passt(&vman.storage);
    assert!(!vman.vm_dir("pw").join("passt.pid").exists());
    vman.sigterm();
    assert!(passts(&vman.storage).is_empty());
    assert!(
        !nft_table_exists(&guard),
        "guard table left after a clean exit"
    );
}

/// A passt whose QEMU is gone (here a stand-in process with a VM's passt
/// command line) is stopped and reported by the observer.
#[test]
fn an_orphaned_passt_is_stopped_by_the_observer() {
    let table = Table::new("orphan");
    let mut vman = Vman::builder()
        .env("VMAN_OBSERVER_INTERVAL", "1")
        .env("VMAN_GUARD_TABLE", &table.0)
        .start();
    vman.template("t", 64);
    let (s, b) = vman.create_vm(json!({"template_name": "t", "name": "o"}));
    assert_eq!(s, 201, "{b}");
    let dir = vman.vm_dir("o");
    std::fs::create_dir_all(&dir).expect("vm dir");
    let log = dir.join("passt.log");
    // argv[0] "passt" and the VM's `-l` path: what vman recognises.
    let mut fake = std::process::Command::new("bash")
        .arg("-c")
        .arg(format!(
            "exec -a passt perl -e 'sleep 600' -- -l {}",
            log.display()
        ))
        .spawn()
        .expect("stand-in passt");
    let start = Instant::now();
    loop {
        if let Ok(Some(_)) = fake.try_wait() {
            break;
        }
        assert!(
            start.elapsed() < SERVER,
            "orphaned passt not stopped; vman log:\n{}",
            vman.logs().join("\n")
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let start = Instant::now();
    while vman.log_count("but its QEMU is gone; stopped") == 0 {
        assert!(start.elapsed() < SERVER, "{}", vman.logs().join("\n"));
        std::thread::sleep(Duration::from_millis(50));
    }
    vman.sigterm();
    // No user-mode VM ever ran: vman never made its table.
    assert!(!nft_table_exists(&table.0));
}
