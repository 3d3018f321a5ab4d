//! Cold migration between two real vman nodes on this machine (issue 14):
//! a stopped VM with a data disk holding a marker the tiny guest wrote
//! moves from n1 to n2 and boots there with the marker; refusals (running
//! VM, unknown node, tokens, a corrupted transfer) change nothing; a kill
//! -9 of the source at each step leaves the VM startable on exactly one
//! node after the restart.
//!
//! The nodes are real cluster nodes on three etcd members (`harness::Etcd`).
//! Because any node answers for any VM, the checks of where a VM lives ask
//! each node itself: requests carrying the cluster token are answered by
//! the receiving node and never forwarded (`local`).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::e2e::{qemu_io, Vman, GUEST};
use crate::harness::{host_mib, Etcd, TOKEN};

/// The API token every node of these tests has (node-to-node calls send it).
const API: &str = "api-token-0123456789abcdef";
/// Placement capacity of each node here, MiB.
const CAPACITY_MIB: u64 = 960;

/// Two cluster nodes n1 and n2 on `etcd`; n1 dies (SIGKILL) at `crash_at`.
fn pair(etcd: &Etcd, crash_at: Option<&str>) -> (Vman, Vman) {
    let overcommit = format!("{:.6}", CAPACITY_MIB as f64 / host_mib() as f64);
    let node = |name: &str, crash: Option<&str>| {
        let mut b = Vman::builder()
            .api_token(API)
            .with_tiny_default()
            .env("VMAN_CLUSTER", "1")
            .env("VMAN_ETCD_ENDPOINTS", etcd.endpoints())
            .env("VMAN_NODE_NAME", name)
            .env("VMAN_CLUSTER_TOKEN", TOKEN)
            .env("VMAN_NODE_TTL_SECS", crate::harness::TTL.to_string())
            .env("VMAN_MEMORY_OVERCOMMIT", &overcommit);
        if let Some(step) = crash {
            b = b.env("VMAN_TEST_MIGRATE_CRASH_AT", step);
        }
        b.start()
    };
    let n1 = node("n1", crash_at);
    let n2 = node("n2", None);
    for n in [&n1, &n2] {
        until("both nodes online", crate::e2e::SERVER, || {
            let list = n.get("/cluster/nodes");
            ["n1", "n2"].iter().all(|name| {
                list.as_array().is_some_and(|a| {
                    a.iter()
                        .any(|x| x["name"] == *name && x["status"] == "online")
                })
            })
        });
    }
    (n1, n2)
}

/// The tiny template, made through n1 and mirrored to n2.
fn template(n1: &Vman, n2: &Vman, name: &str, ram_mib: u64) {
    n1.template(name, ram_mib);
    until("template mirrored", crate::e2e::SERVER, || {
        n2.call("GET", &format!("/templates/{name}"), None).0 == 200
    });
}

/// A VM pinned to `node`, created through `via`.
fn create_on(via: &Vman, node: &str, id: &str, template: &str) {
    let (s, b) = via.create_vm(json!({"template_name": template, "name": id, "node": node}));
    assert_eq!(s, 201, "{b}");
}

/// A request answered by `vman` itself (never forwarded to the VM's owner).
fn local(vman: &Vman, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    let client = reqwest::blocking::Client::new();
    let mut req = client
        .request(
            method.parse().expect("method"),
            format!("{}{path}", vman.base),
        )
        .header("X-Vman-Cluster-Token", TOKEN)
        .bearer_auth(API);
    if let Some(b) = body {
        req = req.json(&b);
    }
    let r = req.send().expect("request");
    let status = r.status().as_u16();
    let text = r.text().unwrap_or_default();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

fn local_vm(vman: &Vman, id: &str) -> Value {
    local(vman, "GET", &format!("/vms/{id}"), None).1
}

fn local_start(vman: &Vman, id: &str) -> (u16, Value) {
    local(
        vman,
        "POST",
        &format!("/vms/{id}/actions/start"),
        Some(json!({})),
    )
}

fn disk_path(vman: &Vman, disk: &str) -> PathBuf {
    vman.storage.join("disks").join(format!("{disk}.qcow2"))
}

fn migrate(vman: &Vman, id: &str, to: &str) -> (u16, Value) {
    local(
        vman,
        "POST",
        &format!("/vms/{id}/actions/migrate"),
        Some(json!({ "node": to })),
    )
}

/// Names of every file under `dir` (recursively), for "nothing was left".
fn files_under(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(files_under(&p));
        } else {
            out.push(p.display().to_string());
        }
    }
    out
}

fn partials(vman: &Vman) -> Vec<String> {
    files_under(&vman.storage)
        .into_iter()
        .filter(|p| p.contains(".partial-"))
        .collect()
}

/// Runs `command` in the guest shell; its output with a marker the shell
/// computes (the typed echo never matches it).
fn run(vman: &Vman, id: &str, command: &str, tag: &str) -> String {
    vman.type_line(
        id,
        &format!("echo \"$({command} 2>&1 | tr '\\n' ' ') {tag}-$((100+1))\""),
    );
    let marker = format!("{tag}-101");
    vman.wait_console(id, &marker, 1);
    vman.console(id)
        .lines()
        .filter(|l| l.contains(&marker))
        .collect::<Vec<_>>()
        .join(" ")
}

fn status(vman: &Vman, path: &str) -> u16 {
    local(vman, "GET", path, None).0
}

fn internal(vman: &Vman, method: &str, path: &str, token: Option<&str>, body: Vec<u8>) -> u16 {
    let client = reqwest::blocking::Client::new();
    let mut req = client.request(
        method.parse().expect("method"),
        format!("{}{path}", vman.base),
    );
    if let Some(t) = token {
        req = req.header("X-Vman-Cluster-Token", t);
    }
    req = req.bearer_auth(API);
    req.header("X-Vman-Size", body.len().to_string())
        .header("X-Vman-Sha256", "0".repeat(64))
        .body(body)
        .send()
        .expect("request")
        .status()
        .as_u16()
}

#[test]
fn a_stopped_vm_with_a_data_disk_moves_to_another_node_and_boots_there_with_its_data() {
    let etcd = Etcd::start();
    let (n1, n2) = pair(&etcd, None);
    template(&n1, &n2, "tiny", 256);
    create_on(&n1, "n1", "m1", "tiny");
    let (s, b) = n1.post("/disks", json!({"name": "md1", "size": 1}));
    assert_eq!(s, 201, "{b}");
    let (s, b) = n1.post("/disks/md1/attach", json!({"vm_id": "m1"}));
    assert_eq!(s, 200, "{b}");

    // The guest writes a marker on its data disk.
    let (s, b) = local_start(&n1, "m1");
    assert_eq!(s, 202, "{b}");
    n1.wait_console("m1", "vman-guest: ready", 1);
    let wrote = run(
        &n1,
        "m1",
        "printf 'vman-moved-%s' ok | dd of=/dev/vdb bs=512 seek=16 conv=fsync 2>/dev/null && sync && echo synced",
        "wr",
    );
    assert!(wrote.contains("synced"), "{wrote}");

    // Running: refused, nothing changed.
    let (s, b) = migrate(&n1, "m1", "n2");
    assert_eq!((s, b["code"].as_str()), (400, Some("not_stopped")), "{b}");
    assert_eq!(local_vm(&n1, "m1")["state"], "running");
    assert_eq!(status(&n2, "/vms/m1"), 404);
    assert!(!disk_path(&n2, "md1").exists());

    let (s, b) = n1.call("POST", "/vms/m1/actions/stop", Some(json!({})));
    assert_eq!(s, 202, "{b}");
    let root_before = std::fs::metadata(n1.vm_dir("m1").join("root.qcow2"))
        .expect("root disk")
        .len();

    let (s, b) = migrate(&n1, "m1", "n2");
    assert_eq!(s, 200, "{b}");
    assert_eq!(
        (b["from"].as_str(), b["to"].as_str()),
        (Some("n1"), Some("n2"))
    );
    assert_eq!(b["files"], 2, "{b}");

    // Gone from n1, files included; on n2, stopped, with its disk.
    assert_eq!(status(&n1, "/vms/m1"), 404);
    assert_eq!(status(&n1, "/disks/md1"), 404);
    assert!(!n1.vm_dir("m1").exists());
    assert!(!disk_path(&n1, "md1").exists());
    let moved = local_vm(&n2, "m1");
    assert_eq!(moved["state"], "stopped", "{moved}");
    // Recorded as its existing root disk, not to be made again from the boot disk.
    assert_eq!(moved["root_disk"]["source"], "existing", "{moved}");
    let disk = n2.get("/disks/md1");
    assert_eq!(disk["vm_id"], "m1", "{disk}");
    assert_eq!(
        std::fs::metadata(n2.vm_dir("m1").join("root.qcow2"))
            .expect("root disk moved")
            .len(),
        root_before
    );
    assert!(partials(&n1).is_empty() && partials(&n2).is_empty());

    // It boots on n2 from the moved root disk and reads the marker back.
    // Any node now finds it on n2.
    assert_eq!(n1.vm("m1")["node"], "n2");
    let (s, b) = local_start(&n2, "m1");
    assert_eq!(s, 202, "{b}");
    n2.wait_console("m1", "vman-guest: ready", 1);
    assert_eq!(local_vm(&n2, "m1")["root_disk"]["source"], "existing");
    let back = run(
        &n2,
        "m1",
        "dd if=/dev/vdb bs=512 skip=16 count=1 2>/dev/null | head -c 14",
        "rd",
    );
    assert!(back.contains("vman-moved-ok"), "{back}");
    let (s, b) = n2.call("POST", "/vms/m1/actions/stop", Some(json!({"force": true})));
    assert_eq!(s, 202, "{b}");
}

#[test]
fn bad_migrations_and_bad_internal_calls_change_nothing() {
    let etcd = Etcd::start();
    // Both nodes have an API token: node-to-node calls send it as well.
    let (n1, n2) = pair(&etcd, None);
    template(&n1, &n2, "tiny", 256);
    create_on(&n1, "n1", "r1", "tiny");
    let (s, b) = n1.post("/disks", json!({"name": "rd1", "size": 1}));
    assert_eq!(s, 201, "{b}");
    let (s, b) = n1.post("/disks/rd1/attach", json!({"vm_id": "r1"}));
    assert_eq!(s, 200, "{b}");
    assert!(qemu_io(&disk_path(&n1, "rd1"), "write -P 0x6b 0 64k"));
    let n2_files = files_under(&n2.storage);

    for (to, code) in [("n9", "unknown_node"), ("n1", "unknown_node")] {
        let (s, b) = migrate(&n1, "r1", to);
        assert_eq!((s, b["code"].as_str()), (400, Some(code)), "{to}: {b}");
    }
    let (s, b) = migrate(&n1, "nope", "n2");
    assert_eq!(s, 404, "{b}");
    let (s, b) = n1.post("/vms/r1/actions/migrate", json!({"node": "../x"}));
    assert_eq!(s, 422, "{b}");

    // Node-to-node routes: no token and a wrong token are 401 (the
    // cluster's dispatch refuses them before any route runs).
    let put = "/cluster/internal/import/r1/disk/rd1";
    assert_eq!(internal(&n2, "PUT", put, None, vec![0; 512]), 401);
    assert_eq!(
        internal(
            &n2,
            "PUT",
            put,
            Some("wrong-token-0123456789"),
            vec![0; 512]
        ),
        401
    );
    assert_eq!(
        internal(
            &n2,
            "POST",
            "/cluster/internal/adopt/r1",
            None,
            b"{}".to_vec()
        ),
        401
    );
    assert_eq!(
        internal(
            &n2,
            "POST",
            "/cluster/internal/adopt/r1",
            Some("x"),
            b"{}".to_vec()
        ),
        401
    );
    assert_eq!(
        internal(&n2, "DELETE", "/cluster/internal/import/r1", None, vec![]),
        401
    );
    assert_eq!(
        internal(
            &n2,
            "DELETE",
            "/cluster/internal/import/r1",
            Some("y"),
            vec![]
        ),
        401
    );

    // A corrupted transfer: the right bytes and size, a wrong SHA-256.
    let bytes = std::fs::read(disk_path(&n1, "rd1")).expect("disk file");
    assert_eq!(internal(&n2, "PUT", put, Some(TOKEN), bytes.clone()), 400);
    // A record without its files is refused too.
    let s = internal(
        &n2,
        "POST",
        "/cluster/internal/adopt/r1",
        Some(TOKEN),
        b"{}".to_vec(),
    );
    assert_eq!(s, 422);
    assert_eq!(files_under(&n2.storage), n2_files, "n2 kept something");
    assert_eq!(status(&n2, "/vms/r1"), 404);
    assert_eq!(status(&n2, "/disks/rd1"), 404);
    assert_eq!(local_vm(&n1, "r1")["state"], "stopped");
    assert_eq!(n1.get("/disks/rd1")["vm_id"], "r1");

    // Not enough memory free on the target.
    // n2 holds a 700 MiB VM of its 960; "big" (400 MiB) fits on n1 only.
    template(&n1, &n2, "fill", 700);
    template(&n1, &n2, "big", 400);
    create_on(&n1, "n2", "fill", "fill");
    create_on(&n1, "n1", "big", "big");
    let (s, b) = migrate(&n1, "big", "n2");
    assert_eq!((s, b["code"].as_str()), (400, Some("no_memory")), "{b}");
    assert_eq!(status(&n2, "/vms/big"), 404);

    // A file of the disk's name already on the target (no record there):
    // refused, and the roll-back leaves that file alone.
    let stray = disk_path(&n2, "rd1");
    std::fs::create_dir_all(stray.parent().expect("dir")).expect("disks dir");
    std::fs::write(&stray, b"not vman's doing").expect("stray");
    let (s, b) = migrate(&n1, "r1", "n2");
    assert_eq!(
        (s, b["code"].as_str()),
        (400, Some("already_exists")),
        "{b}"
    );
    assert_eq!(
        std::fs::read(&stray).expect("stray kept"),
        b"not vman's doing"
    );
    assert_eq!(n1.get("/disks/rd1")["vm_id"], "r1");
    assert_eq!(status(&n2, "/vms/r1"), 404);
    std::fs::remove_file(&stray).expect("rm stray");

    // The same VM then moves (never started: no root disk, one data disk).
    let (s, b) = migrate(&n1, "r1", "n2");
    assert_eq!((s, b["files"].as_u64()), (200, Some(1)), "{b}");
    assert!(qemu_io(&disk_path(&n2, "rd1"), "read -P 0x6b 0 64k"));
    assert_eq!(status(&n1, "/vms/r1"), 404);
    // Back again, then a single-host vman has no internal routes at all.
    let (s, b) = migrate(&n2, "r1", "n1");
    assert_eq!(s, 200, "{b}");
    assert_eq!(n1.get("/disks/rd1")["vm_id"], "r1");
    let single = Vman::builder().start();
    assert_eq!(
        internal(&single, "PUT", put, Some(TOKEN), vec![0; 512]),
        404
    );
    let (s, b) = single.post("/vms/x/actions/migrate", json!({"node": "n2"}));
    assert!(s == 404 || b["code"] == "migration_refused", "{s} {b}");
}

/// Waits until `pred` holds.
fn until(what: &str, deadline: Duration, mut pred: impl FnMut() -> bool) {
    let end = Instant::now() + deadline;
    while !pred() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A kill -9 of the source at each step: after the restart the VM is on
/// exactly one node, startable there and refused on the other, and no
/// temporary file is left.
#[test]
fn a_source_killed_at_any_step_leaves_the_vm_startable_on_exactly_one_node() {
    for (step, lands_on_target) in [("copied", false), ("adopted", false), ("committed", true)] {
        let etcd = Etcd::start();
        let (mut n1, n2) = pair(&etcd, Some(step));
        template(&n1, &n2, "tiny", 256);
        create_on(&n1, "n1", "k1", "tiny");
        let (s, b) = n1.post("/disks", json!({"name": "kd1", "size": 1}));
        assert_eq!(s, 201, "{b}");
        let (s, b) = n1.post("/disks/kd1/attach", json!({"vm_id": "k1"}));
        assert_eq!(s, 200, "{b}");
        assert!(qemu_io(&disk_path(&n1, "kd1"), "write -P 0x4d 0 64k"));

        let died = reqwest::blocking::Client::builder()
            .timeout(GUEST)
            .build()
            .expect("client")
            .post(format!("{}/vms/k1/actions/migrate", n1.base))
            .bearer_auth(API)
            .json(&json!({"node": "n2"}))
            .send();
        assert!(
            died.is_err(),
            "{step}: the source was to die mid-request: {died:?}"
        );
        if step == "adopted" {
            // The target's copy is not startable while the placement says n1.
            let (s, b) = local_start(&n2, "k1");
            assert_eq!(
                (s, b["code"].as_str()),
                (400, Some("migration_refused")),
                "{b}"
            );
        }
        n1.restart();
        let (owner, other) = if lands_on_target {
            (&n2, &n1)
        } else {
            (&n1, &n2)
        };
        until(&format!("{step}: settled"), GUEST, || {
            status(other, "/vms/k1") == 404 && status(owner, "/vms/k1") == 200
        });
        until(&format!("{step}: files settled"), GUEST, || {
            !disk_path(other, "kd1").exists() && !other.vm_dir("k1").exists()
        });
        assert!(
            qemu_io(&disk_path(owner, "kd1"), "read -P 0x4d 0 64k"),
            "{step}"
        );
        assert!(
            partials(&n1).is_empty() && partials(&n2).is_empty(),
            "{step}"
        );
        let (s, b) = local_start(owner, "k1");
        assert_eq!(s, 202, "{step}: {b}");
        let (s, b) = local(
            owner,
            "POST",
            "/vms/k1/actions/stop",
            Some(json!({"force": true})),
        );
        assert_eq!(s, 202, "{step}: {b}");
        let (s, _) = local_start(other, "k1");
        assert_eq!(s, 404, "{step}");
    }
}

/// A target killed (-9) in the middle of receiving a file: the half file
/// carries the `.partial-` name, nothing else appears, and the target's
/// start-up sweep removes it; the source keeps everything.
#[test]
fn a_target_killed_mid_import_keeps_nothing_after_its_restart() {
    use std::io::Write;
    let etcd = Etcd::start();
    let (_n1, mut n2) = pair(&etcd, None);
    let before = files_under(&n2.storage);
    let port = n2.base.rsplit(':').next().expect("port").to_owned();
    let mut sock = std::net::TcpStream::connect(format!("127.0.0.1:{port}")).expect("connect");
    let size = 4 << 20;
    write!(
        sock,
        "PUT /cluster/internal/import/h1/disk/hd1 HTTP/1.1\r\nHost: 127.0.0.1\r\n\
         Authorization: Bearer {API}\r\nX-Vman-Cluster-Token: {TOKEN}\r\nX-Vman-Size: {size}\r\nX-Vman-Sha256: {}\r\n\
         Content-Length: {size}\r\n\r\n",
        "0".repeat(64)
    )
    .expect("headers");
    sock.write_all(&vec![0u8; size / 2]).expect("half the body");
    sock.flush().expect("flush");
    until("the partial file", GUEST, || !partials(&n2).is_empty());
    let half: Vec<String> = files_under(&n2.storage)
        .into_iter()
        .filter(|f| !before.contains(f) && (f.contains("/disks/") || f.contains("/vms/")))
        .collect();
    assert_eq!(half.len(), 1, "{half:?}");
    assert!(half[0].contains("/disks/.hd1.qcow2.partial-"), "{half:?}");
    n2.restart();
    assert!(partials(&n2).is_empty());
    assert_eq!(status(&n2, "/disks/hd1"), 404);
    assert!(!disk_path(&n2, "hd1").exists());
    drop(sock);
}
