//! Network settings of POST /vms and the /vms/{id}/ports API on the real
//! binary (no guest boots here): every user-mode VM gets guest 22 from a
//! free host port, a host port belongs to one VM and must be free on the
//! host, and every bad input is a 4xx JSON error that changes nothing.

use std::net::TcpListener;

use serde_json::{json, Value};

use crate::common::{assert_error, Server};
use crate::make_template;

fn code(reply: &(u16, Value)) -> &str {
    reply.1["code"].as_str().unwrap_or("")
}

fn ssh_port(vm: &Value) -> u64 {
    let ports = vm["network"]["ports"].as_array().expect("ports");
    let ssh: Vec<&Value> = ports.iter().filter(|p| p["guest_port"] == 22).collect();
    assert_eq!(ssh.len(), 1, "one guest-22 forward: {vm}");
    ssh[0]["host_port"].as_u64().expect("host_port")
}

#[test]
fn a_user_vm_gets_guest_22_from_a_free_host_port_and_a_stable_mac() {
    let s = Server::start();
    make_template(&s, "t", 1, 1);
    let (st, a) = s.post_json("/vms", &json!({"template_name": "t", "name": "a"}));
    assert_eq!(st, 201, "{a}");
    assert_eq!(a["network"]["mode"], "user");
    let mac = a["network"]["mac"].as_str().expect("mac");
    assert!(mac.starts_with("52:54:00:") && mac.len() == 17, "{mac}");
    assert_eq!(a["network"]["local_ip"], Value::Null);
    let port = ssh_port(&a);
    assert_eq!(a["network"]["ports"][0]["host_address"], "127.0.0.1");
    assert_eq!(a["network"]["ports"][0]["protocol"], "tcp");
    // The port was free when it was given: nothing holds it now either.
    assert!(TcpListener::bind(("127.0.0.1", port as u16)).is_ok());
    // Same id, same MAC (after a restart too); another VM, another port.
    let (_, b) = s.post_json("/vms", &json!({"template_name": "t", "name": "b"}));
    assert_ne!(ssh_port(&b), port);
    let (_, again) = s.get("/vms/a");
    assert_eq!(again["network"]["mac"], mac);
    let (st, list) = s.get("/vms/a/ports");
    assert_eq!(st, 200);
    assert_eq!(list, a["network"]["ports"]);
    // Mode none: no NIC, no forwards.
    let (st, n) = s.post_json(
        "/vms",
        &json!({"template_name": "t", "name": "n", "network": {"mode": "none"}}),
    );
    assert_eq!(st, 201, "{n}");
    assert_eq!(n["network"]["mode"], "none");
    assert_eq!(n["network"]["ports"], json!([]));
}

#[test]
fn vman_network_mode_none_is_the_default_when_configured() {
    let s = Server::builder().env("VMAN_NETWORK_MODE", "none").start();
    make_template(&s, "t", 1, 1);
    let (st, vm) = s.post_json("/vms", &json!({"template_name": "t", "name": "a"}));
    assert_eq!(st, 201, "{vm}");
    assert_eq!(vm["network"]["mode"], "none");
    assert_eq!(vm["network"]["ports"], json!([]));
}

#[test]
fn forwards_are_added_listed_and_deleted() {
    let s = Server::start();
    make_template(&s, "t", 1, 1);
    s.post_json("/vms", &json!({"template_name": "t", "name": "a"}));
    let free = TcpListener::bind("127.0.0.1:0").expect("bind");
    let wanted = free.local_addr().expect("addr").port();
    drop(free);
    let r = s.post_json(
        "/vms/a/ports",
        &json!({"guest_port": 80, "host_port": wanted, "protocol": "tcp"}),
    );
    assert_eq!(r.0, 201, "{}", r.1);
    assert_eq!(r.1["host_port"], wanted);
    assert_eq!(r.1["guest_port"], 80);
    assert_eq!(r.1["applied"], "next_start");
    // Without host_port vman allocates one; udp works too.
    let r = s.post_json(
        "/vms/a/ports",
        &json!({"guest_port": 53, "protocol": "udp"}),
    );
    assert_eq!(r.0, 201, "{}", r.1);
    let udp = r.1["host_port"].as_u64().expect("port");
    assert!(udp > 0);
    let (_, list) = s.get("/vms/a/ports");
    assert_eq!(list.as_array().expect("list").len(), 3, "{list}");
    let (_, vm) = s.get("/vms/a");
    assert_eq!(vm["network"]["ports"], list);
    // Persisted: a restarted vman shows the same forwards.
    let mut s = s;
    s.restart();
    let (_, after) = s.get("/vms/a/ports");
    assert_eq!(after, list);
    let (st, body) = s.delete(&format!("/vms/a/ports/{wanted}"));
    assert_eq!(st, 200, "{body}");
    assert_eq!(body["applied"], "next_start");
    let r = s.delete(&format!("/vms/a/ports/{wanted}"));
    assert_error(&r, 404);
    let (_, list) = s.get("/vms/a/ports");
    assert_eq!(list.as_array().expect("list").len(), 2, "{list}");
}

#[test]
fn a_host_port_in_use_by_anything_is_a_400_and_nothing_is_recorded() {
    let s = Server::start();
    make_template(&s, "t", 1, 1);
    let (_, a) = s.post_json("/vms", &json!({"template_name": "t", "name": "a"}));
    s.post_json("/vms", &json!({"template_name": "t", "name": "b"}));
    let (_, before) = s.get("/vms/b/ports");
    // Another VM's forward (a stopped VM holds no socket: the database says).
    let r = s.post_json(
        "/vms/b/ports",
        &json!({"guest_port": 80, "host_port": ssh_port(&a)}),
    );
    assert_error(&r, 400);
    assert_eq!(code(&r), "port_in_use");
    assert!(
        r.1["detail"].as_str().unwrap_or("").contains("VM a"),
        "{}",
        r.1
    );
    // Any socket of the host.
    let held = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = held.local_addr().expect("addr").port();
    let r = s.post_json(
        "/vms/b/ports",
        &json!({"guest_port": 80, "host_port": port}),
    );
    assert_error(&r, 400);
    assert_eq!(code(&r), "port_in_use");
    assert!(
        r.1["detail"].as_str().unwrap_or("").contains("in use"),
        "{}",
        r.1
    );
    drop(held);
    let (_, after) = s.get("/vms/b/ports");
    assert_eq!(after, before);
}

#[test]
fn bad_network_input_is_a_4xx_json_error_and_creates_nothing() {
    // Without ip/bridge/nft/dnsmasq (in /usr/sbin, off this PATH) the host
    // cannot run bridge VMs, root or not.
    let s = Server::builder().env("PATH", "/usr/bin:/bin").start();
    make_template(&s, "t", 1, 1);
    // Unknown mode, a mode that is not a string, unknown fields.
    for network in [
        json!({"mode": "nat"}),
        json!({"mode": 1}),
        json!({"mode": "user", "extra": true}),
        json!("user"),
    ] {
        let r = s.post_json(
            "/vms",
            &json!({"template_name": "t", "name": "x", "network": network}),
        );
        // serde answers a number where an enum is expected as a syntax
        // error (400 malformed_json); the others name the field (422).
        let status = if network == json!({"mode": 1}) {
            400
        } else {
            422
        };
        let d = assert_error(&r, status);
        if status == 422 {
            assert!(d.contains("network"), "{network}: {d}");
        }
    }
    // bridge: root and its tools only; a clear 400 at creation without
    // them, never a failed start.
    let r = s.post_json(
        "/vms",
        &json!({"template_name": "t", "name": "x", "network": {"mode": "bridge"}}),
    );
    let d = assert_error(&r, 400);
    assert_eq!(code(&r), "network_unavailable");
    assert!(d.contains("bridge"), "{d}");
    let (_, list) = s.get("/vms");
    assert_eq!(list, json!([]), "nothing created");
    assert!(
        s.storage_entries_besides_db_and_logs().is_empty(),
        "{:?}",
        s.storage_entries_besides_db_and_logs()
    );

    s.post_json("/vms", &json!({"template_name": "t", "name": "a"}));
    let (_, before) = s.get("/vms/a/ports");
    for (body, field) in [
        (json!({"guest_port": 0}), "guest_port"),
        (json!({"guest_port": 65536}), "guest_port"),
        (json!({"guest_port": -22}), "guest_port"),
        (json!({"guest_port": 80, "host_port": 0}), "host_port"),
        (json!({"guest_port": 80, "host_port": 70000}), "host_port"),
        (json!({"guest_port": 80, "protocol": "sctp"}), "protocol"),
        (json!({"guest_port": "80"}), "guest_port"),
        (json!({"host_port": 8080}), "guest_port"),
    ] {
        let r = s.post_json("/vms/a/ports", &body);
        let d = assert_error(&r, 422);
        assert!(d.contains(field), "{body}: {d}");
    }
    let (_, after) = s.get("/vms/a/ports");
    assert_eq!(after, before, "nothing recorded");
    // Forwards of a VM that does not exist.
    assert_error(
        &s.post_json("/vms/nope/ports", &json!({"guest_port": 80})),
        404,
    );
    assert_error(&s.get("/vms/nope/ports"), 404);
    assert_error(&s.delete("/vms/nope/ports/8080"), 404);
    // A host port that is not a port.
    assert_error(&s.delete("/vms/a/ports/0"), 422);
    assert_error(&s.delete("/vms/a/ports/99999"), 422);
    assert_error(&s.delete("/vms/a/ports/x"), 422);
    assert_error(&s.delete("/vms/a/ports/8080?protocol=icmp"), 422);
    // Forwards of a VM that is not in user mode.
    s.post_json(
        "/vms",
        &json!({"template_name": "t", "name": "n", "network": {"mode": "none"}}),
    );
    let r = s.post_json("/vms/n/ports", &json!({"guest_port": 80}));
    assert_error(&r, 400);
    assert_eq!(code(&r), "not_user_network");
}

#[test]
fn deleting_a_port_forwarded_in_tcp_and_udp_needs_the_protocol() {
    let s = Server::start();
    make_template(&s, "t", 1, 1);
    s.post_json("/vms", &json!({"template_name": "t", "name": "a"}));
    let free = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    let port = free.local_addr().expect("addr").port();
    drop(free);
    for proto in ["udp", "tcp"] {
        let r = s.post_json(
            "/vms/a/ports",
            &json!({"guest_port": 53, "host_port": port, "protocol": proto}),
        );
        assert_eq!(r.0, 201, "{proto}: {}", r.1);
    }
    let r = s.delete(&format!("/vms/a/ports/{port}"));
    let d = assert_error(&r, 422);
    assert!(d.contains("protocol"), "{d}");
    let (st, _) = s.delete(&format!("/vms/a/ports/{port}?protocol=udp"));
    assert_eq!(st, 200);
    let (st, _) = s.delete(&format!("/vms/a/ports/{port}"));
    assert_eq!(st, 200);
}

#[test]
fn a_deleted_vm_frees_its_host_ports() {
    let s = Server::start();
    make_template(&s, "t", 1, 1);
    let (_, a) = s.post_json("/vms", &json!({"template_name": "t", "name": "a"}));
    let port = ssh_port(&a);
    s.post_json("/vms", &json!({"template_name": "t", "name": "b"}));
    let (st, _) = s.delete("/vms/a");
    assert_eq!(st, 204);
    let r = s.post_json(
        "/vms/b/ports",
        &json!({"guest_port": 22, "host_port": port}),
    );
    assert_eq!(r.0, 201, "{}", r.1);
}

#[test]
fn vman_user_net_passt_without_passt_is_refused_at_start_up() {
    let out = Server::builder()
        .env("VMAN_USER_NET", "passt")
        .env("VMAN_PASST_BINARY", "/nonexistent/passt")
        .run_to_exit();
    assert!(!out.timed_out, "vman started without passt: {out:?}");
    assert_ne!(out.code, Some(0), "{out:?}");
    let err = out.stderr_lines().join("\n");
    assert!(
        err.contains("/nonexistent/passt") && err.contains("passt package"),
        "{err}"
    );
}
