//! `vman disk create|list|show|attach|detach|resize|delete` over /disks.

use clap::Subcommand;
use serde_json::{json, Map, Value};

use super::client::{resolve_id, seg, with_id, CliError, Client, Kind};
use super::output::{Column, Out};

#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// Create a data disk. Without NAME the server picks a UUID.
    Create {
        name: Option<String>,
        /// Size in GiB.
        #[arg(long)]
        size: u64,
        /// Where you mean to mount it in the guest (a label; vman mounts nothing).
        #[arg(long)]
        mount_point: Option<String>,
    },
    /// List data disks.
    #[command(visible_alias = "ls")]
    List,
    /// Show one disk.
    Show { disk: String },
    /// Attach DISK to VM (hot-plugged when the VM runs).
    Attach { disk: String, vm: String },
    /// Detach DISK from its VM (waits for the guest to release it).
    Detach { disk: String },
    /// Grow DISK to SIZE GiB (online while attached).
    Resize { disk: String, size: u64 },
    /// Delete a disk (refused while attached).
    #[command(visible_alias = "rm")]
    Delete { disk: String },
}

pub const COLUMNS: &[Column] = &[
    Column::new("ID", "/id"),
    Column::new("SIZE_GB", "/size"),
    Column::new("STATE", "/state"),
    Column::new("VM", "/vm_id"),
    Column::new("DEVICE", "/device"),
    Column::new("MOUNT_POINT", "/mount_point"),
];

fn disk_path(id: &str) -> String {
    format!("/disks/{}", seg(id))
}

/// POST /disks/{id}/{verb}: returns the id used and the answer.
fn act(
    c: &Client,
    disk: &str,
    verb: &str,
    body: Option<&Value>,
) -> Result<(String, Value), CliError> {
    with_id(c, Kind::Disk, disk, |id| {
        let path = format!("{}/{verb}", disk_path(id));
        let answer = match body {
            Some(b) => c.post(&path, b)?,
            None => c.post_empty(&path)?,
        };
        Ok((id.to_owned(), answer))
    })
}

pub fn run(c: &Client, out: Out, cmd: Cmd) -> Result<(), CliError> {
    match cmd {
        Cmd::Create {
            name,
            size,
            mount_point,
        } => {
            let mut body = Map::new();
            body.insert("size".into(), json!(size));
            if let Some(n) = name {
                body.insert("name".into(), json!(n));
            }
            if let Some(m) = mount_point {
                body.insert("mount_point".into(), json!(m));
            }
            let d = c.post("/disks", &Value::Object(body))?;
            let id = d["id"].as_str().unwrap_or("?");
            out.created(&format!("created disk {id} ({} GiB)", d["size"]), id, &d)
        }
        Cmd::List => out.list(&c.get("/disks")?, COLUMNS),
        Cmd::Show { disk } => {
            let d = with_id(c, Kind::Disk, &disk, |id| c.get(&disk_path(id)))?;
            out.object(&d)
        }
        Cmd::Attach { disk, vm } => {
            // The VM may be given by name or prefix too: resolve it first
            // (a 404 names the VM, not the disk).
            let vm_id = resolve_id(c, Kind::Vm, &vm)?;
            let bar = out.progress(&format!("attaching {disk} to {vm_id}"));
            let result = act(c, &disk, "attach", Some(&json!({"vm_id": vm_id})));
            bar.finish_and_clear();
            let (id, answer) = result?;
            let device = answer
                .pointer("/device")
                .or_else(|| answer.pointer("/disk/device"))
                .and_then(Value::as_str)
                .unwrap_or("?");
            out.done(
                &format!("attached disk {id} to {vm_id} as {device}"),
                &answer,
            )
        }
        Cmd::Detach { disk } => {
            let bar = out.progress(&format!("detaching {disk}"));
            let result = act(c, &disk, "detach", None);
            bar.finish_and_clear();
            let (id, answer) = result?;
            out.done(&format!("detached disk {id}"), &answer)
        }
        Cmd::Resize { disk, size } => {
            let (id, answer) = act(c, &disk, "resize", Some(&json!({"size": size})))?;
            out.done(&format!("resized disk {id} to {size} GiB"), &answer)
        }
        Cmd::Delete { disk } => {
            let id = with_id(c, Kind::Disk, &disk, |id| {
                c.delete(&disk_path(id)).map(|_| id.to_owned())
            })?;
            out.done(
                &format!("deleted disk {id}"),
                &json!({"status": "deleted", "id": id}),
            )
        }
    }
}
