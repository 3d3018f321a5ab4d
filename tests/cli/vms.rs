//! `vman vm ...` against a real server; `start` runs a real QEMU (under
//! TCG, on the empty root disk: no guest needs to boot for these).

use std::time::Duration;

use serde_json::{json, Value};

use crate::common::is_uuid_v4;
use crate::harness::Vman;
use crate::{cell, Cli};

fn setup() -> (Vman, Cli) {
    let v = Vman::builder().start();
    let c = Cli::new(&v.base, &v.storage);
    c.ok(&[
        "template",
        "create",
        "small",
        "--cpus",
        "1",
        "--ram-mib",
        "128",
    ]);
    (v, c)
}

#[test]
fn vm_create_list_show_start_stop_restart_delete() {
    let (v, c) = setup();
    let out = c.ok(&["vm", "create", "web1", "--template", "small"]);
    assert!(out.contains("created VM web1"), "{out}");
    let anon = c.json(&["vm", "create", "-t", "small"]);
    let uuid = anon["id"].as_str().expect("id").to_owned();
    assert!(is_uuid_v4(&uuid), "{uuid}");
    assert_eq!(anon["state"], "stopped");

    let table = c.ok(&["vm", "list"]);
    assert_eq!(cell(&table, "web1", "STATE"), "stopped");
    assert_eq!(cell(&table, "web1", "TEMPLATE"), "small");
    assert_eq!(cell(&table, &uuid, "RAM_MIB"), "128");
    let list = c.json(&["vm", "ls"]);
    assert_eq!(list.as_array().map(Vec::len), Some(2));

    // A UUID is found by a unique prefix; the table view shows its fields.
    let shown = c.json(&["vm", "show", &uuid[..8]]);
    assert_eq!(shown["id"], uuid.as_str());
    let view = c.ok(&["vm", "show", "web1"]);
    assert!(
        view.lines()
            .any(|l| l.split_whitespace().collect::<Vec<_>>() == ["state", "stopped"]),
        "{view}"
    );

    let out = c.ok(&["vm", "start", "web1"]);
    assert!(out.contains("started VM web1"), "{out}");
    assert_eq!(v.vm("web1")["state"], "running");
    assert!(c
        .refused(&["vm", "start", "web1"])
        .contains("already running"));
    assert_eq!(c.ok(&["vm", "list", "--state", "running", "-q"]), "web1\n");
    assert_eq!(
        c.json(&["vm", "list", "--state", "stopped"])
            .as_array()
            .map(Vec::len),
        Some(1)
    );

    let r = c.json(&["vm", "restart", "web1", "--force"]);
    assert_eq!(r["status"], "restarted");
    assert_eq!(v.vm("web1")["state"], "running");

    let out = c.ok(&["vm", "stop", "web1", "--force"]);
    assert!(out.contains("stopped VM web1"), "{out}");
    assert_eq!(v.vm("web1")["state"], "stopped");
    assert!(c.refused(&["vm", "stop", "web1"]).contains("not running"));

    let out = c.ok(&["vm", "delete", "web1"]);
    assert!(out.contains("deleted VM web1"), "{out}");
    assert_eq!(v.call("GET", "/vms/web1", None).0, 404);
    let gone = c.json(&["vm", "rm", &uuid[..6]]);
    assert_eq!(gone, json!({"status": "deleted", "id": uuid}));
    // -q: a creation prints the id alone, an action nothing.
    assert_eq!(c.ok(&["vm", "create", "q1", "-t", "small", "-q"]), "q1\n");
    assert_eq!(c.ok(&["vm", "delete", "q1", "-q"]), "");
    assert_eq!(c.json(&["vm", "list"]), json!([]));
}

#[test]
fn vm_refusals_exit_1_and_change_nothing() {
    let (v, c) = setup();
    assert_eq!(
        c.refused(&["vm", "create", "x", "--template", "nope"]),
        "Template not found"
    );
    c.ok(&["vm", "create", "x", "--template", "small"]);
    assert!(c
        .refused(&["vm", "create", "x", "--template", "small"])
        .contains("already exists"));
    // A name the API cannot take: the server's 422 names the field.
    assert!(c
        .refused(&["vm", "create", "../x", "--template", "small"])
        .contains("name"));
    for verb in ["show", "start", "stop", "restart", "delete", "logs"] {
        let d = c.refused(&["vm", verb, "nope"]);
        assert!(d.contains("not found"), "{verb}: {d}");
    }
    let d = c.refused(&["vm", "list", "--state", "sleeping"]);
    assert!(d.contains("state"), "{d}");
    // A prefix that fits two ids names neither.
    c.ok(&["vm", "create", "abcd-1", "--template", "small"]);
    c.ok(&["vm", "create", "abcd-2", "--template", "small"]);
    let d = c.refused(&["vm", "delete", "abcd"]);
    assert!(d.contains("matches several: abcd-1, abcd-2"), "{d}");
    assert_eq!(v.get("/vms").as_array().map(Vec::len), Some(3));
}

#[test]
fn vm_usage_errors_exit_2() {
    let (_v, c) = setup();
    c.fails(2, &["vm", "create", "x"]); // --template missing
    c.fails(
        2,
        &[
            "vm",
            "create",
            "x",
            "-t",
            "small",
            "--qcow2-path",
            "a",
            "--boot-disk",
            "b",
        ],
    );
    c.fails(2, &["vm", "stop"]);
    c.fails(2, &["vm", "logs", "x", "--interval", "0"]);
    c.fails(2, &["vm", "list", "--format", "xml"]);
    assert_eq!(c.run(&["vm"]).code, Some(2));
    assert_eq!(c.json(&["vm", "list"]), json!([]));
}

#[test]
fn vm_metadata_set_show_clear() {
    let (v, c) = setup();
    c.ok(&["vm", "create", "m1", "--template", "small"]);
    let empty = c.json(&["vm", "metadata", "m1"]);
    assert_eq!(empty["hostname"], Value::Null);
    let keys = v.storage.join("keys.pub");
    std::fs::write(
        &keys,
        "ssh-ed25519 AAAA one\n# a comment\n\nssh-rsa BBBB two\n",
    )
    .unwrap();
    let user_data = v.storage.join("user-data");
    std::fs::write(&user_data, "#cloud-config\npackages: [htop]\n").unwrap();
    let keys_arg = keys.to_str().unwrap();
    let ud_arg = user_data.to_str().unwrap();
    let out = c.ok(&[
        "vm",
        "metadata",
        "m1",
        "set",
        "--hostname",
        "web",
        "--ssh-keys-file",
        keys_arg,
        "--user-data-file",
        ud_arg,
    ]);
    assert!(out.contains("metadata of m1 set"), "{out}");
    let m = v.get("/vms/m1/metadata");
    assert_eq!(m["hostname"], "web");
    assert_eq!(m["ssh_keys"], "ssh-ed25519 AAAA one\nssh-rsa BBBB two");
    assert_eq!(m["user_data"], "#cloud-config\npackages: [htop]\n");
    // Only given fields change.
    let m = c.json(&[
        "vm",
        "metadata",
        "m1",
        "set",
        "--ssh-key",
        "ssh-ed25519 CCCC three",
    ]);
    assert_eq!(m["hostname"], "web");
    assert_eq!(m["ssh_keys"], "ssh-ed25519 CCCC three");
    let view = c.ok(&["vm", "metadata", "m1", "show"]);
    assert!(view.contains("hostname") && view.contains("web"), "{view}");

    // Nothing to set, or a file that cannot be read: usage, nothing sent.
    c.fails(2, &["vm", "metadata", "m1", "set"]);
    c.fails(
        2,
        &[
            "vm",
            "metadata",
            "m1",
            "set",
            "--user-data-file",
            "/nonexistent/ud",
        ],
    );
    assert_eq!(v.get("/vms/m1/metadata")["hostname"], "web");
    assert!(c
        .refused(&["vm", "metadata", "nope", "set", "--hostname", "x"])
        .contains("not found"));

    let cleared = c.json(&["vm", "metadata", "m1", "clear"]);
    assert_eq!(cleared["status"], "cleared");
    assert_eq!(v.get("/vms/m1/metadata")["hostname"], Value::Null);
}

#[test]
fn vm_logs_prints_the_console_of_a_vm() {
    let (v, c) = setup();
    c.ok(&["vm", "create", "l1", "--template", "small"]);
    // Nothing printed yet: empty output, exit 0; JSON says why.
    assert_eq!(c.ok(&["vm", "logs", "l1"]), "");
    let j = c.json(&["vm", "logs", "l1"]);
    assert_eq!(j["file_size"], 0);
    assert_eq!(j["message"], "No console output yet");
    // What the server keeps is printed as is.
    std::fs::create_dir_all(v.vm_dir("l1")).unwrap();
    let console = v.vm_dir("l1").join("console.txt");
    std::fs::write(&console, "line one\nline two\n").unwrap();
    assert_eq!(c.ok(&["vm", "logs", "l1"]), "line one\nline two\n");
}

#[test]
fn vm_logs_follow_prints_what_is_appended() {
    let (v, c) = setup();
    c.ok(&["vm", "create", "f1", "--template", "small"]);
    std::fs::create_dir_all(v.vm_dir("f1")).unwrap();
    let console = v.vm_dir("f1").join("console.txt");
    std::fs::write(&console, "first\n").unwrap();
    let mut child = c
        .command(&["vm", "logs", "f1", "--follow", "--interval", "50"])
        .spawn()
        .expect("spawn");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let _ = tx.send(line);
        }
    });
    let next = |rx: &std::sync::mpsc::Receiver<String>| {
        rx.recv_timeout(Duration::from_secs(30))
            .expect("a line from logs --follow")
    };
    assert_eq!(next(&rx), "first");
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&console)
            .unwrap();
        f.write_all(b"second\nthird\n").unwrap();
    }
    assert_eq!(next(&rx), "second");
    assert_eq!(next(&rx), "third");
    // Still following: nothing printed twice, nothing else.
    assert!(rx.recv_timeout(Duration::from_millis(500)).is_err());
    // The VM goes away: follow ends with the server's 404 (exit 1).
    c.ok(&["vm", "delete", "f1"]);
    let r = crate::wait(child, Duration::from_secs(30), &["logs --follow"]);
    assert_eq!(r.code, Some(1), "{r:?}");
    assert!(r.stderr.contains("not found"), "{r:?}");
}

/// /vms/{id}/ports (port forwards) come with the networking work; until the
/// server has the route, the CLI reports the server's 404 as a refusal.
#[test]
fn vm_ports_list_add_remove() {
    let (v, c) = setup();
    c.ok(&["vm", "create", "p1", "--template", "small"]);
    let doc = v.get("/openapi.json");
    if doc["paths"].get("/vms/{vm_id}/ports").is_none() {
        c.refused(&["vm", "ports", "p1"]);
        c.refused(&["vm", "ports", "p1", "add", "80"]);
        c.refused(&["vm", "ports", "p1", "remove", "2222"]);
        return;
    }
    // The forwards of guest port 80 (a user-mode VM also has guest 22's).
    let of_80 = |c: &Cli| -> Vec<Value> {
        let list = c.json(&["vm", "ports", "p1"]);
        list.as_array()
            .unwrap_or_else(|| panic!("not a list: {list}"))
            .iter()
            .filter(|p| p["guest_port"] == 80)
            .cloned()
            .collect()
    };
    assert!(of_80(&c).is_empty());
    let added = c.json(&["vm", "ports", "p1", "add", "80"]);
    assert_eq!(added["guest_port"], 80, "{added}");
    let host = added["host_port"].as_u64().expect("host_port");
    assert_eq!(of_80(&c).len(), 1);
    assert_eq!(
        v.get("/vms/p1/ports")
            .as_array()
            .map(|l| l.iter().any(|p| p["host_port"] == host)),
        Some(true)
    );
    let host_arg = host.to_string();
    let table = c.ok(&["vm", "ports", "p1", "list"]);
    assert_eq!(cell(&table, &host_arg, "GUEST_PORT"), "80", "{table}");
    assert!(cell(&c.ok(&["vm", "list"]), "p1", "PORTS").contains(&format!("{host}->80/tcp")));
    assert!(c
        .refused(&["vm", "ports", "nope", "add", "80"])
        .contains("not found"));
    c.fails(2, &["vm", "ports", "p1", "add", "99999"]);
    let out = c.ok(&["vm", "ports", "p1", "remove", &host_arg]);
    assert!(
        out.contains(&format!("removed the forward of host port {host} from p1")),
        "{out}"
    );
    assert!(of_80(&c).is_empty());
    c.refused(&["vm", "ports", "p1", "remove", &host_arg]);
}

/// `vm migrate` posts the node and shows the server's refusal: a
/// single-host server refuses any migration (exit 1, the detail shown).
#[test]
fn vm_migrate_outside_cluster_mode_is_refused_with_the_servers_detail() {
    let (_v, c) = setup();
    c.ok(&["vm", "create", "mg1", "--template", "small"]);
    let err = c.refused(&["vm", "migrate", "mg1", "--node", "n2"]);
    assert!(err.contains("cluster mode"), "{err}");
    let err = c.refused(&["vm", "migrate", "nope", "--node", "n2"]);
    assert!(!err.is_empty());
}
