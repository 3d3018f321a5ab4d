//! QEMU as an unprivileged user: a running guest's QEMU has the
//! `vman-qemu` uid and no capabilities, sits in its low-weight cgroup, and
//! cannot open host files by path over its own QMP socket (what a guest that
//! escaped into QEMU could try), while files passed by vman still work.

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::Path;

use serde_json::{json, Value};

use crate::harness::Vman;

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// uid of `user` from /etc/passwd.
fn uid_of(user: &str) -> Option<u32> {
    fs::read_to_string("/etc/passwd")
        .ok()?
        .lines()
        .find(|l| l.split(':').next() == Some(user))?
        .split(':')
        .nth(2)?
        .parse()
        .ok()
}

fn status_field(pid: i32, field: &str) -> String {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .map(|v| v.split_whitespace().collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn boot(vman: &Vman, id: &str) -> i32 {
    vman.template("tiny", 128);
    let (s, b) = vman.create_vm(json!({"template_name": "tiny", "name": id}));
    assert_eq!(s, 201, "{b}");
    let (s, b) = vman.start_vm(id);
    assert_eq!(s, 202, "{b}");
    vman.wait_console(id, &format!("boot ok hostname={id}"), 1);
    vman.vm(id)["pid"].as_i64().expect("pid") as i32
}

/// A minimal QMP client on a VM's socket (vman must not hold it).
struct RawQmp {
    out: UnixStream,
    lines: BufReader<UnixStream>,
}

impl RawQmp {
    fn connect(path: &Path) -> Self {
        let out = UnixStream::connect(path).expect("connect qmp");
        out.set_read_timeout(Some(std::time::Duration::from_secs(60)))
            .expect("timeout");
        let mut qmp = Self {
            lines: BufReader::new(out.try_clone().expect("clone")),
            out,
        };
        let greeting = qmp.read();
        assert!(greeting.get("QMP").is_some(), "{greeting}");
        let caps = qmp.execute("qmp_capabilities", json!({}));
        assert!(caps.get("return").is_some(), "{caps}");
        qmp
    }

    fn read(&mut self) -> Value {
        let mut line = String::new();
        self.lines.read_line(&mut line).expect("read qmp");
        serde_json::from_str(&line).expect("qmp json")
    }

    fn execute(&mut self, command: &str, arguments: Value) -> Value {
        let msg = json!({"execute": command, "arguments": arguments});
        writeln!(self.out, "{msg}").expect("write qmp");
        loop {
            let reply = self.read();
            if reply.get("event").is_none() {
                return reply;
            }
        }
    }

    fn open_file(&mut self, path: &Path, node: &str) -> Value {
        self.execute(
            "blockdev-add",
            json!({"driver": "file", "filename": path, "node-name": node, "read-only": true}),
        )
    }
}

#[test]
fn qemu_runs_as_the_unprivileged_user_in_its_cgroup() {
    if !is_root() {
        eprintln!("skipped: vman switches QEMU's user only when it runs as root");
        return;
    }
    let uid = uid_of("vman-qemu").expect("user vman-qemu (scripts/setup.sh creates it)");
    let vman = Vman::builder().with_tiny_default().start();
    let pid = boot(&vman, "un");
    assert_eq!(status_field(pid, "Uid"), format!("{uid} {uid} {uid} {uid}"));
    assert_eq!(status_field(pid, "CapEff"), "0000000000000000");
    assert_eq!(status_field(pid, "Seccomp"), "2", "sandbox filter active");
    for dir in ["vms", "disks"] {
        let mode = fs::metadata(vman.storage.join(dir))
            .expect(dir)
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o700, "{dir} closed to the QEMU user");
    }
    let mode = fs::metadata(vman.storage.join("vman.db"))
        .expect("db")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "database closed to the QEMU user");
    let mode = fs::metadata(vman.vm_dir("un"))
        .expect("vm dir")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o700, "VM folder closed to the QEMU user");
    // The CPU weight: its own group under vman's, or a nice value.
    let cgroups = fs::read_to_string(format!("/proc/{pid}/cgroup")).expect("cgroup");
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    let nice: i32 = stat
        .rsplit(')')
        .next()
        .and_then(|s| s.split_whitespace().nth(16))
        .and_then(|n| n.parse().ok())
        .expect("nice");
    let group = cgroups.lines().find_map(|l| {
        let (_, path) = l.rsplit_once(':')?;
        (path.starts_with("/vman-") && path.ends_with("-un")).then(|| path.to_owned())
    });
    assert!(
        group.is_some() || nice > 0,
        "not weighted: nice {nice}, {cgroups}"
    );
    let (s, b) = vman.post("/vms/un/actions/stop", json!({"force": true}));
    assert_eq!(s, 202, "{b}");
    vman.wait_state("un", "stopped", crate::harness::GUEST);
    if let Some(group) = group {
        // The VM's group goes with its QEMU (v1 cpu or v2 mount).
        for mount in ["/sys/fs/cgroup/cpu", "/sys/fs/cgroup"] {
            let dir = format!("{mount}{group}");
            let start = std::time::Instant::now();
            while Path::new(&dir).exists() {
                assert!(start.elapsed() < crate::harness::GUEST, "{dir} left behind");
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
        }
    }
}

/// What a guest that took over its QEMU could do: ask QEMU to open host
/// files. Root-only files, the database and anything in the VM folders
/// (its own or other VMs' disks, even when 0644) are refused; a world-readable file outside the
/// storage opens, so the refusals are the user's rights and nothing else.
#[test]
fn guest_qemu_cannot_open_root_only_host_files() {
    if !is_root() {
        eprintln!("skipped: vman switches QEMU's user only when it runs as root");
        return;
    }
    let mut vman = Vman::builder().with_tiny_default().start();
    let pid = boot(&vman, "esc");
    let host = tempfile::tempdir().expect("tempdir");
    fs::set_permissions(host.path(), fs::Permissions::from_mode(0o755)).expect("chmod");
    let secret = host.path().join("secret");
    fs::write(&secret, "root only\n").expect("secret");
    fs::set_permissions(&secret, fs::Permissions::from_mode(0o600)).expect("chmod");
    let public = host.path().join("public");
    fs::write(&public, "anyone\n").expect("public");
    fs::set_permissions(&public, fs::Permissions::from_mode(0o644)).expect("chmod");
    let db = vman.storage.join("vman.db");
    let own_root = vman.vm_dir("esc").join("root.qcow2");
    // Even a world-readable file is out of reach inside the VM folders.
    fs::set_permissions(&own_root, fs::Permissions::from_mode(0o644)).expect("chmod root");
    // vman holds the QMP connection while it runs; a crash frees it and
    // QEMU goes on.
    vman.kill9();
    let mut qmp = RawQmp::connect(&vman.vm_dir("esc").join("qmp.sock"));
    for (n, path) in [&secret, &db, &own_root].into_iter().enumerate() {
        let reply = qmp.open_file(path, &format!("x{n}"));
        let desc = reply["error"]["desc"].as_str().unwrap_or("");
        assert!(
            desc.contains("Permission denied"),
            "{} opened by the guest's QEMU: {reply}",
            path.display()
        );
    }
    let reply = qmp.open_file(&public, "ok");
    assert!(reply.get("return").is_some(), "control file: {reply}");
    assert_eq!(
        status_field(pid, "Uid").split(' ').next(),
        uid_of("vman-qemu").map(|u| u.to_string()).as_deref()
    );
    let _ = qmp.execute("quit", json!({}));
}
