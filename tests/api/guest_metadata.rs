//! The guest metadata service over a VM's own channel, as QEMU's relay
//! reaches it (the abstract UNIX socket named in QEMU's `guestfwd`): every
//! path, IMDSv2, bad tokens, oversize requests, path tricks, unknown paths,
//! other VMs named in paths and headers, peers of another user, and
//! `metadata_fetched_at`. The VMs run a real QEMU with an empty disk (no
//! guest: the test itself is the guest).

use std::io::{Read, Write};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixStream};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::common::{Server, DEADLINE};
use crate::{make_template, make_vm};

/// QEMUs of the test, killed when it ends (they outlive vman by design).
struct Qemus(Vec<i32>);

impl Drop for Qemus {
    fn drop(&mut self) {
        for pid in &self.0 {
            // SAFETY: kill(2) has no memory effects.
            unsafe { libc::kill(*pid, libc::SIGKILL) };
        }
    }
}

/// Starts VM `id`; returns its QEMU pid and its channel's name, read from
/// the relay command in QEMU's command line.
fn start(s: &Server, id: &str, qemus: &mut Qemus) -> String {
    let (status, b) = s.post_json(&format!("/vms/{id}/actions/start"), &json!({}));
    assert_eq!(status, 202, "{b}");
    let (_, vm) = s.get(&format!("/vms/{id}"));
    let pid = vm["pid"].as_i64().expect("pid") as i32;
    qemus.0.push(pid);
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).expect("cmdline");
    let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
    let at = cmdline
        .find("ABSTRACT-CONNECT:")
        .unwrap_or_else(|| panic!("no relay in {cmdline}"))
        + "ABSTRACT-CONNECT:".len();
    cmdline[at..]
        .split([' ', ','])
        .next()
        .expect("name")
        .to_owned()
}

struct Answer {
    status: u16,
    headers: String,
    body: String,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or(Value::Null)
    }
}

fn connect(channel: &str) -> std::io::Result<UnixStream> {
    let addr = SocketAddr::from_abstract_name(channel.as_bytes())?;
    let sock = UnixStream::connect_addr(&addr)?;
    sock.set_read_timeout(Some(Duration::from_secs(30)))?;
    Ok(sock)
}

/// One raw HTTP/1.1 request (`Connection: close`) on the channel.
fn ask_raw(channel: &str, request: &[u8]) -> Answer {
    let mut sock = connect(channel).expect("connect to the channel");
    sock.write_all(request).expect("send");
    let mut out = Vec::new();
    let _ = sock.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    Answer {
        status,
        headers: head.to_ascii_lowercase(),
        body: body.to_owned(),
    }
}

fn ask(channel: &str, method: &str, path: &str, headers: &[(&str, &str)]) -> Answer {
    let mut req =
        format!("{method} {path} HTTP/1.1\r\nHost: 169.254.169.254\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    ask_raw(channel, req.as_bytes())
}

fn get(channel: &str, path: &str) -> Answer {
    ask(channel, "GET", path, &[])
}

#[track_caller]
fn ok_text(channel: &str, path: &str) -> String {
    let a = get(channel, path);
    assert_eq!(a.status, 200, "{path}: {}", a.body);
    a.body
}

#[track_caller]
fn not_found(a: &Answer, what: &str) {
    assert_eq!(a.status, 404, "{what}: {} {}", a.status, a.body);
    assert_eq!(a.json()["code"], "not_found", "{what}: {}", a.body);
    assert!(a.json()["detail"].is_string(), "{what}: {}", a.body);
}

fn server_with_two_vms() -> (Server, Qemus, String, String) {
    let s = Server::start();
    make_template(&s, "small", 1, 1);
    make_vm(&s, "small", Some("vm1"));
    make_vm(&s, "small", Some("vm2"));
    let (status, b) = s.put_json(
        "/vms/vm1/metadata",
        &json!({"hostname": "one.example", "ssh_keys": "ssh-ed25519 AAAA1 a@b\n\nssh-rsa AAAA2 c@d\n"}),
    );
    assert_eq!(status, 200, "{b}");
    let (status, b) = s.put_json(
        "/vms/vm2/metadata",
        &json!({"user_data": "#cloud-config\nruncmd: [secret-of-vm2]\n", "ssh_keys": "ssh-ed25519 BBBB b@b"}),
    );
    assert_eq!(status, 200, "{b}");
    let mut qemus = Qemus(Vec::new());
    let c1 = start(&s, "vm1", &mut qemus);
    let c2 = start(&s, "vm2", &mut qemus);
    (s, qemus, c1, c2)
}

#[test]
fn guest_metadata_paths_over_the_vm_channel() {
    let (s, _qemus, c1, c2) = server_with_two_vms();
    assert_ne!(c1, c2);
    let (_, vm) = s.get("/vms/vm1");
    assert!(vm["metadata_fetched_at"].is_null(), "{vm}");

    // EC2, under every version cloud-init asks.
    for v in [
        "latest",
        "2009-04-04",
        "2016-09-02",
        "2018-09-24",
        "2021-03-23",
        "1.0",
    ] {
        assert_eq!(ok_text(&c1, &format!("/{v}/meta-data/instance-id")), "vm1");
    }
    let listing = ok_text(&c1, "/latest/meta-data/");
    for item in [
        "instance-id",
        "hostname",
        "local-hostname",
        "mac",
        "network/",
        "public-keys/",
    ] {
        assert!(listing.lines().any(|l| l == item), "{item} in {listing}");
    }
    assert_eq!(ok_text(&c1, "/latest/meta-data/hostname"), "one.example");
    assert_eq!(
        ok_text(&c1, "/latest/meta-data/local-hostname"),
        "one.example"
    );
    let mac = ok_text(&c1, "/latest/meta-data/mac");
    assert!(mac.starts_with("52:54:00:") && mac.len() == 17, "{mac}");
    assert_eq!(
        ok_text(&c1, "/latest/meta-data/public-keys/"),
        "0=key0\n1=key1"
    );
    assert_eq!(
        ok_text(&c1, "/latest/meta-data/public-keys/0"),
        "openssh-key"
    );
    assert_eq!(
        ok_text(&c1, "/latest/meta-data/public-keys/1/openssh-key"),
        "ssh-rsa AAAA2 c@d"
    );
    assert_eq!(
        ok_text(&c1, "/latest/meta-data/network/interfaces/macs/"),
        format!("{mac}/")
    );
    assert_eq!(
        ok_text(
            &c1,
            &format!("/latest/meta-data/network/interfaces/macs/{mac}/mac")
        ),
        mac
    );
    let a = get(&c1, "/latest/meta-data/hostname");
    assert!(
        a.headers.contains("content-type: text/plain"),
        "{}",
        a.headers
    );
    not_found(&get(&c1, "/latest/user-data"), "user-data of vm1 (none)");
    let doc = get(&c1, "/latest/dynamic/instance-identity/document");
    assert_eq!(doc.status, 200, "{}", doc.body);
    assert_eq!(doc.json()["instanceId"], "vm1");
    assert!(ok_text(&c1, "/").lines().any(|l| l == "2009-04-04"));
    // HEAD is GET without a body.
    assert_eq!(
        ask(&c1, "HEAD", "/latest/meta-data/hostname", &[]).status,
        200
    );

    // The VM's own data on its own channel: vm2 has user-data.
    assert_eq!(
        ok_text(&c2, "/latest/meta-data/hostname"),
        "vm2",
        "hostname defaults to the name"
    );
    assert_eq!(
        ok_text(&c2, "/latest/user-data"),
        "#cloud-config\nruncmd: [secret-of-vm2]\n"
    );

    // NoCloud.
    assert_eq!(
        ok_text(&c1, "/nocloud/meta-data"),
        "instance-id: \"vm1\"\nlocal-hostname: \"one.example\"\npublic-keys:\n  - \"ssh-ed25519 AAAA1 a@b\"\n  - \"ssh-rsa AAAA2 c@d\"\n"
    );
    let ud = ok_text(&c1, "/nocloud/user-data");
    assert!(
        ud.starts_with("#cloud-config\nhostname: \"one.example\"\n"),
        "{ud}"
    );
    assert!(
        ud.contains(
            "ssh_authorized_keys:\n  - \"ssh-ed25519 AAAA1 a@b\"\n  - \"ssh-rsa AAAA2 c@d\"\n"
        ),
        "{ud}"
    );
    assert_eq!(
        ok_text(&c2, "/nocloud/user-data"),
        "#cloud-config\nruncmd: [secret-of-vm2]\n"
    );
    assert_eq!(ok_text(&c1, "/nocloud/vendor-data"), "#cloud-config\n");
    not_found(&get(&c1, "/nocloud/network-config"), "network-config");

    // The fetch of meta-data is recorded.
    let start = Instant::now();
    loop {
        let (_, vm) = s.get("/vms/vm1");
        if vm["metadata_fetched_at"].is_string() {
            break;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "metadata_fetched_at not set: {vm}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    // A change through the API shows at once.
    let (status, b) = s.put_json("/vms/vm1/metadata", &json!({"hostname": "uno"}));
    assert_eq!(status, 200, "{b}");
    assert_eq!(ok_text(&c1, "/latest/meta-data/hostname"), "uno");
}

#[test]
fn other_vms_named_anywhere_in_a_request_still_get_the_channels_own_data() {
    let (s, _qemus, c1, c2) = server_with_two_vms();
    let cases: [(&str, &[(&str, &str)]); 6] = [
        ("/latest/meta-data/instance-id?instance-id=vm2", &[]),
        (
            "/latest/meta-data/instance-id",
            &[("X-Forwarded-For", "10.0.0.2")],
        ),
        (
            "/latest/meta-data/instance-id",
            &[("X-Real-IP", "169.254.169.16")],
        ),
        (
            "/latest/meta-data/instance-id",
            &[("X-Vman-Id", "vm2"), ("Host", "vm2")],
        ),
        ("/latest/meta-data/instance-id", &[("Forwarded", "for=vm2")]),
        (
            "/latest/meta-data/instance-id",
            &[("Authorization", "Bearer x")],
        ),
    ];
    for (path, headers) in cases {
        let a = ask(&c1, "GET", path, headers);
        assert_eq!(
            (a.status, a.body.as_str()),
            (200, "vm1"),
            "{path} {headers:?}"
        );
    }
    for path in [
        "/vm2/latest/meta-data/instance-id",
        "/latest/meta-data/vm2/instance-id",
        "/vms/vm2/metadata",
        "/latest/meta-data/../../vms/vm2/metadata",
        "/latest/meta-data/%2e%2e/%2e%2e/vms/vm2",
        "/latest//meta-data/instance-id",
        "/vms",
        "/health",
        "/openapi.json",
        "/templates",
        "/latest/meta-data/public-keys/2/openssh-key",
        "/latest/meta-data/public-keys/00/openssh-key",
        "/nocloud/../vms",
        "/2099-01-01/meta-data/instance-id",
    ] {
        not_found(&get(&c1, path), path);
    }
    // Absolute-form request targets name no other host.
    let a = get(&c1, "http://127.0.0.1:1/vms");
    assert!(
        a.status == 404 || a.status == 400,
        "{} {}",
        a.status,
        a.body
    );
    // Writes of the API are not reachable either.
    for (m, p) in [
        ("POST", "/vms"),
        ("DELETE", "/vms/vm2"),
        ("PUT", "/vms/vm2/metadata"),
    ] {
        not_found(&ask(&c1, m, p, &[("Content-Length", "0")]), p);
    }
    let a = ask(
        &c1,
        "POST",
        "/latest/meta-data/hostname",
        &[("Content-Length", "0")],
    );
    assert_eq!(a.status, 405, "{}", a.body);
    // Nothing of vm2 was ever answered on vm1's channel, and vm2 is intact.
    assert_eq!(ok_text(&c2, "/latest/meta-data/instance-id"), "vm2");
    let (_, m) = s.get("/vms/vm2/metadata");
    assert_eq!(m["ssh_keys"], "ssh-ed25519 BBBB b@b");
}

#[test]
fn imdsv2_tokens_over_the_vm_channel() {
    let (_s, _qemus, c1, c2) = server_with_two_vms();
    let ttl = "x-aws-ec2-metadata-token-ttl-seconds";
    let a = ask(
        &c1,
        "PUT",
        "/latest/api/token",
        &[(ttl, "60"), ("Content-Length", "0")],
    );
    assert_eq!(a.status, 200, "{}", a.body);
    assert!(a.headers.contains(&format!("{ttl}: 60")), "{}", a.headers);
    let token = a.body.clone();
    assert!(token.len() >= 32, "{token}");
    let with = |c: &str, t: &str| {
        ask(
            c,
            "GET",
            "/latest/meta-data/instance-id",
            &[("X-aws-ec2-metadata-token", t)],
        )
    };
    let a = with(&c1, &token);
    assert_eq!((a.status, a.body.as_str()), (200, "vm1"));
    // IMDSv1 (no token) works too.
    assert_eq!(ok_text(&c1, "/latest/meta-data/instance-id"), "vm1");
    // A wrong token, or vm1's token on vm2's channel: 401.
    for (c, t) in [(&c1, "not-a-token"), (&c1, ""), (&c2, token.as_str())] {
        let a = with(c, t);
        assert_eq!(a.status, 401, "{t}: {}", a.body);
        assert_eq!(a.json()["code"], "unauthorized");
    }
    for bad in ["0", "21601", "-5", "abc", "1e3"] {
        let a = ask(&c1, "PUT", "/latest/api/token", &[(ttl, bad)]);
        assert_eq!(a.status, 400, "ttl {bad}: {}", a.body);
        assert_eq!(a.json()["code"], "bad_request");
    }
    assert_eq!(ask(&c1, "PUT", "/latest/api/token", &[]).status, 400);
    assert_eq!(
        ask(&c1, "PUT", "/latest/api/token", &[(ttl, "21600")]).status,
        200
    );
    let a = ask(
        &c1,
        "PUT",
        "/latest/api/token",
        &[(ttl, "60"), ("X-Forwarded-For", "1.2.3.4")],
    );
    assert_eq!(a.status, 403, "{}", a.body);
    // An expired token: 401.
    let a = ask(&c1, "PUT", "/latest/api/token", &[(ttl, "1")]);
    assert_eq!(a.status, 200);
    let short = a.body;
    let start = Instant::now();
    while with(&c1, &short).status == 200 {
        assert!(start.elapsed() < DEADLINE, "a 1 s token never expired");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(with(&c1, &short).status, 401);
}

#[test]
fn oversize_requests_and_strangers_are_refused_and_the_channel_goes_with_qemu() {
    let (s, _qemus, c1, _c2) = server_with_two_vms();
    let a = ask(
        &c1,
        "GET",
        "/latest/meta-data/hostname",
        &[("Content-Length", "100000")],
    );
    assert_eq!(a.status, 413, "{}", a.body);
    assert_eq!(a.json()["code"], "too_large");
    // Headers beyond the limit: refused by the HTTP layer, never served.
    let big = "x".repeat(64 * 1024);
    let a = ask(&c1, "GET", "/latest/meta-data/hostname", &[("X-Big", &big)]);
    assert!(a.status == 431 || a.status == 0, "{} {}", a.status, a.body);
    // Garbage is no request.
    let a = ask_raw(&c1, b"\x16\x03\x01\x00\x05hello\r\n\r\n");
    assert!(a.status == 400 || a.status == 0, "{}", a.status);
    // Still serving after all that.
    assert_eq!(ok_text(&c1, "/latest/meta-data/instance-id"), "vm1");

    // As root: QEMU's user (the relay it forks) is answered; a peer of
    // another user (not vman's, not QEMU's) is cut off unanswered.
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        if let Some(qemu_uid) = uid_of("vman-qemu") {
            let out = as_user(&qemu_uid, &c1).expect("setpriv socat as vman-qemu");
            assert!(out.contains("\r\n\r\nvm1"), "vman-qemu not answered: {out}");
        }
        match as_user("65534", &c1) {
            Ok(out) => assert!(!out.contains("vm1"), "uid 65534 was answered: {out}"),
            Err(e) => eprintln!("setpriv/socat not usable, stranger check skipped: {e}"),
        }
    }

    // Stopped: the channel is gone with QEMU.
    let (status, b) = s.post_json("/vms/vm1/actions/stop", &json!({"force": true}));
    assert_eq!(status, 202, "{b}");
    let err = connect(&c1).expect_err("vm1's channel outlived its QEMU");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err}");
}

fn uid_of(user: &str) -> Option<String> {
    let out = std::process::Command::new("id")
        .args(["-u", user])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// A request for the instance id on `channel`, sent by socat as `uid`
/// (`-t 30`: after sending, socat waits up to 30 s for the answer).
fn as_user(uid: &str, channel: &str) -> std::io::Result<String> {
    let mut child = std::process::Command::new("setpriv")
        .arg(format!("--reuid={uid}"))
        .args(["--regid=65534", "--clear-groups", "socat", "-t", "30", "-"])
        .arg(format!("ABSTRACT-CONNECT:{channel}"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(
            b"GET /latest/meta-data/instance-id HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )?;
    }
    let out = child.wait_with_output()?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Regression: a restart (stop, then start at once) failed with a 500
/// "cannot open the metadata channel ... Address already in use" when the
/// closed channel's listener had not been dropped yet.
#[test]
fn restart_reopens_the_channel_without_address_in_use() {
    let (s, mut qemus, c1, _c2) = server_with_two_vms();
    for round in 0..5 {
        let (status, b) = s.post_json("/vms/vm1/actions/restart", &json!({"force": true}));
        assert_eq!(status, 202, "round {round}: {b}");
        let (_, vm) = s.get("/vms/vm1");
        qemus.0.push(vm["pid"].as_i64().expect("pid") as i32);
        assert_eq!(
            ok_text(&c1, "/latest/meta-data/instance-id"),
            "vm1",
            "round {round}"
        );
    }
}
