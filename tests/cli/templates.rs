//! `vman template ...` against a real server.

use crate::common::Server;
use crate::{cell, rows, Cli};

fn cli(s: &Server) -> Cli {
    Cli::new(&s.url(""), s.storage_path())
}

#[test]
fn template_create_list_show_delete() {
    let s = Server::start();
    let c = cli(&s);
    let out = c.ok(&["template", "create", "small", "--cpus", "2", "--ram", "4"]);
    assert!(out.contains("created template small"), "{out}");
    let t = c.json(&[
        "template",
        "create",
        "tiny",
        "--cpus",
        "1",
        "--ram-mib",
        "256",
        "--disk-size",
        "3",
    ]);
    assert_eq!(t["name"], "tiny");
    assert_eq!(t["ram_mib"], 256);
    assert_eq!(t["disk_size_gb"], 3);
    // The server has both.
    let (st, list) = s.get("/templates");
    assert_eq!(st, 200);
    assert_eq!(list.as_array().map(Vec::len), Some(2));

    let table = c.ok(&["template", "list"]);
    assert_eq!(rows(&table)[0][0], "NAME", "{table}");
    assert_eq!(cell(&table, "small", "CPUS"), "2");
    assert_eq!(cell(&table, "small", "RAM_MIB"), "4096");
    assert_eq!(cell(&table, "tiny", "DISK_GB"), "3");
    let list = c.json(&["template", "ls"]);
    assert_eq!(list.as_array().map(Vec::len), Some(2));
    let yaml = c.ok(&["template", "list", "--format", "yaml"]);
    assert!(yaml.contains("name: small"), "{yaml}");
    assert_eq!(c.ok(&["template", "list", "-q"]), "small\ntiny\n");

    let shown = c.json(&["template", "show", "small"]);
    assert_eq!(shown["cpu_count"], 2);
    let view = c.ok(&["template", "show", "small"]);
    assert!(
        view.lines()
            .any(|l| l.split_whitespace().collect::<Vec<_>>() == ["ram_mib", "4096"]),
        "{view}"
    );

    let out = c.ok(&["template", "delete", "small"]);
    assert!(out.contains("deleted template small"), "{out}");
    let gone = c.json(&["template", "rm", "tiny"]);
    assert_eq!(gone["status"], "deleted");
    assert_eq!(s.get("/templates").1, serde_json::json!([]));
}

#[test]
fn template_refusals_exit_1_with_the_server_detail() {
    let s = Server::start();
    let c = cli(&s);
    c.ok(&["template", "create", "small", "--cpus", "1", "--ram", "1"]);
    assert_eq!(
        c.refused(&["template", "create", "small", "--cpus", "1", "--ram", "1"]),
        "Template already exists"
    );
    // Validation by the server (not the CLI): cpu_count 0 is a 422.
    let d = c.refused(&["template", "create", "zero", "--cpus", "0", "--ram", "1"]);
    assert!(d.contains("cpu_count"), "{d}");
    assert!(c
        .refused(&["template", "show", "nope"])
        .to_lowercase()
        .contains("not found"));
    assert!(c
        .refused(&["template", "delete", "nope"])
        .to_lowercase()
        .contains("not found"));
    // In use by a VM.
    c.ok(&["vm", "create", "v1", "--template", "small"]);
    let d = c.refused(&["template", "delete", "small"]);
    assert!(d.contains("in use"), "{d}");
    // Nothing changed.
    assert_eq!(s.get("/templates/small").0, 200);
    assert_eq!(s.get("/templates/zero").0, 404);
}

#[test]
fn template_usage_errors_exit_2() {
    let s = Server::start();
    let c = cli(&s);
    // Memory missing, both memory flags, a non-number: refused before any request.
    c.fails(2, &["template", "create", "x", "--cpus", "1"]);
    c.fails(
        2,
        &[
            "template",
            "create",
            "x",
            "--cpus",
            "1",
            "--ram",
            "1",
            "--ram-mib",
            "512",
        ],
    );
    c.fails(
        2,
        &["template", "create", "x", "--cpus", "two", "--ram", "1"],
    );
    c.fails(2, &["template", "frobnicate"]);
    assert_eq!(s.get("/templates").1, serde_json::json!([]));
}
