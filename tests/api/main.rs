//! End-to-end tests of the REST API: each test starts the real `vman` binary
//! on an ephemeral port with its own temporary storage.

#[path = "../common/mod.rs"]
mod common;

mod auth;
mod clones;
mod codes;
mod concurrency;
mod config;
mod console_ws;
mod cross_site;
mod database;
mod disks;
mod events;
mod guest_metadata;
mod limits;
mod metadata;
mod metrics;
mod persistence;
mod ports;
mod provisioning;
mod robustness;
mod routes;
mod snapshots;
mod system;
mod templates;
mod ui;
mod vms;

use common::Server;
use serde_json::{json, Value};

/// Creates a template and asserts the 201.
#[track_caller]
pub fn make_template(s: &Server, name: &str, cpu: u64, ram_gib: u64) -> Value {
    let (status, body) = s.post_json(
        "/templates",
        &json!({"name": name, "cpu_count": cpu, "ram_amount": ram_gib}),
    );
    assert_eq!(status, 201, "create template {name}: {body}");
    body
}

/// Creates a VM (named, or with a generated id when `name` is None).
#[track_caller]
pub fn make_vm(s: &Server, template: &str, name: Option<&str>) -> Value {
    let body = match name {
        Some(n) => json!({"template_name": template, "name": n}),
        None => json!({"template_name": template}),
    };
    let (status, vm) = s.post_json("/vms", &body);
    assert_eq!(status, 201, "create vm {name:?}: {vm}");
    vm
}

/// The sorted `key` values of a JSON array.
#[track_caller]
pub fn names(list: &Value, key: &str) -> Vec<String> {
    let mut out: Vec<String> = list
        .as_array()
        .unwrap_or_else(|| panic!("not an array: {list}"))
        .iter()
        .map(|v| v[key].as_str().expect("string key").to_owned())
        .collect();
    out.sort();
    out
}

/// Kills, when dropped (also when a test fails half-way), every QEMU
/// started from the storage folder of a test that starts real VMs.
pub struct KillGuests(pub std::path::PathBuf);

impl Drop for KillGuests {
    fn drop(&mut self) {
        let needle = self.0.to_string_lossy().into_owned();
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<i32>().ok())
            else {
                continue;
            };
            let Ok(raw) = std::fs::read(entry.path().join("cmdline")) else {
                continue;
            };
            let cmd = String::from_utf8_lossy(&raw).replace('\0', " ");
            if pid > 1 && cmd.contains("qemu-system") && cmd.contains(&needle) {
                // SAFETY: kill(2) of a QEMU this test started.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
}
