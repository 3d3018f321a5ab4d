//! `vman disk ...` against a real server (attach to a stopped VM: a cold
//! attach, no guest needed).

use serde_json::json;

use crate::common::is_uuid_v4;
use crate::harness::Vman;
use crate::{cell, Cli};

#[test]
fn disk_create_list_show_attach_resize_detach_delete() {
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
    c.ok(&["vm", "create", "host1", "--template", "small"]);

    let out = c.ok(&[
        "disk",
        "create",
        "data1",
        "--size",
        "1",
        "--mount-point",
        "/srv/data",
    ]);
    assert!(out.contains("created disk data1 (1 GiB)"), "{out}");
    let anon = c.json(&["disk", "create", "--size", "2"]);
    let uuid = anon["id"].as_str().expect("id").to_owned();
    assert!(is_uuid_v4(&uuid), "{uuid}");

    let table = c.ok(&["disk", "list"]);
    assert_eq!(cell(&table, "data1", "STATE"), "available");
    assert_eq!(cell(&table, "data1", "MOUNT_POINT"), "/srv/data");
    assert_eq!(cell(&table, &uuid, "SIZE_GB"), "2");
    assert_eq!(c.json(&["disk", "ls"]).as_array().map(Vec::len), Some(2));
    assert_eq!(c.json(&["disk", "show", &uuid[..8]])["id"], uuid.as_str());

    let out = c.ok(&["disk", "attach", "data1", "host1"]);
    assert!(out.contains("attached disk data1 to host1"), "{out}");
    let d = v.get("/disks/data1");
    assert_eq!(d["state"], "attached");
    assert_eq!(d["vm_id"], "host1");
    assert_eq!(cell(&c.ok(&["disk", "list"]), "data1", "VM"), "host1");
    // Refusals while attached: delete, a second attach.
    assert!(c
        .refused(&["disk", "delete", "data1"])
        .to_lowercase()
        .contains("attached"));
    assert!(c
        .refused(&["disk", "attach", "data1", "host1"])
        .to_lowercase()
        .contains("attached"));

    let r = c.json(&["disk", "resize", "data1", "3"]);
    assert_eq!(r["size"], 3, "{r}");
    assert_eq!(v.get("/disks/data1")["size"], 3);
    assert!(c
        .refused(&["disk", "resize", "data1", "1"])
        .contains("only grow"));

    let out = c.ok(&["disk", "detach", "data1"]);
    assert!(out.contains("detached disk data1"), "{out}");
    assert_eq!(v.get("/disks/data1")["state"], "available");
    assert!(c
        .refused(&["disk", "detach", "data1"])
        .to_lowercase()
        .contains("not attached"));

    let out = c.ok(&["disk", "delete", "data1"]);
    assert!(out.contains("deleted disk data1"), "{out}");
    assert_eq!(
        c.json(&["disk", "rm", &uuid]),
        json!({"status": "deleted", "id": uuid})
    );
    assert_eq!(c.json(&["disk", "list"]), json!([]));
}

#[test]
fn disk_refusals_exit_1_and_usage_exit_2() {
    let v = Vman::builder().start();
    let c = Cli::new(&v.base, &v.storage);
    c.ok(&["disk", "create", "d1", "--size", "1"]);
    assert!(c
        .refused(&["disk", "create", "d2", "--size", "0"])
        .contains("size"));
    assert!(c
        .refused(&[
            "disk",
            "create",
            "d3",
            "--size",
            "1",
            "--mount-point",
            "rel"
        ])
        .contains("mount_point"));
    assert!(c
        .refused(&["disk", "attach", "d1", "novm"])
        .contains("not found"));
    for args in [
        &["disk", "show", "nope"][..],
        &["disk", "detach", "nope"],
        &["disk", "delete", "nope"],
        &["disk", "resize", "nope", "2"],
    ] {
        assert!(c.refused(args).contains("not found"), "{args:?}");
    }
    c.fails(2, &["disk", "create", "x"]); // --size missing
    c.fails(2, &["disk", "resize", "d1", "-1"]);
    c.fails(2, &["disk", "attach", "d1"]);
    let list = v.get("/disks");
    assert_eq!(list.as_array().map(Vec::len), Some(1), "{list}");
    assert_eq!(list[0]["state"], "available");
}
