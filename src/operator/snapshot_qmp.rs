//! The QMP side of snapshots of a running VM: the root disk's current top
//! node, one `transaction` that puts a new overlay (made and opened by vman,
//! passed by descriptor) on top of the root disk (`blockdev-snapshot`) and
//! starts a point-in-time copy of every data disk (`blockdev-backup`, same
//! instant), the wait for those copies, and `block-stream` of a snapshot's
//! data into the active top when a snapshot under it is deleted. Disk-only:
//! the guest keeps running and its RAM is not saved (crash-consistent).
//!
//! Jobs run with `auto-dismiss: false`, so a vman restarted while one ran
//! still finds its outcome with `query-jobs`.

use std::fs::File;
use std::time::Duration;

use serde_json::{json, Value};

use super::hotplug::{add_file_node, delete_nodes, HotplugError};
use super::image::ImageFormat;
use super::qmp::{Qmp, QmpError};

#[derive(Debug, thiserror::Error)]
pub enum SnapshotQmpError {
    /// A QMP step failed; `step` says which.
    #[error("{step}: {source}")]
    Qmp {
        step: &'static str,
        #[source]
        source: QmpError,
    },
    /// QEMU answered something this module does not understand.
    #[error("unexpected QMP answer to {step}: {detail}")]
    Unexpected { step: &'static str, detail: String },
    /// A block job ended with an error.
    #[error("block job {job} failed: {detail}")]
    Job { job: String, detail: String },
}

fn step(step: &'static str) -> impl FnOnce(QmpError) -> SnapshotQmpError {
    move |source| SnapshotQmpError::Qmp { step, source }
}

/// The errors of the node helpers shared with hot-plug (`add_file_node`).
fn from_hotplug(e: HotplugError) -> SnapshotQmpError {
    match e {
        HotplugError::Qmp { step, source } => SnapshotQmpError::Qmp { step, source },
        HotplugError::Unexpected { step, detail } => SnapshotQmpError::Unexpected { step, detail },
        other => SnapshotQmpError::Unexpected {
            step: "add-fd",
            detail: other.to_string(),
        },
    }
}

/// The QOM path prefix of the root disk's device (`id=root-disk`).
const ROOT_DEVICE: &str = "/machine/peripheral/root-disk/";

/// A new image vman made and holds open read-write, to become a block node.
#[derive(Debug)]
pub struct NewNode<'a> {
    pub file: &'a File,
    pub format: ImageFormat,
    /// Its format node's name (its file node is `<node>-f`); at most 29 bytes.
    pub node: String,
}

/// A point-in-time copy of a data disk's node into a new image.
#[derive(Debug)]
pub struct Backup<'a> {
    /// The data disk's format node (`qemu::disk_node`).
    pub device_node: String,
    pub target: NewNode<'a>,
    pub job: String,
}

/// The node name of the root disk's current top (what the device reads).
pub async fn root_top_node(qmp: &Qmp) -> Result<String, SnapshotQmpError> {
    let blocks = qmp
        .execute("query-block", None)
        .await
        .map_err(step("query-block"))?;
    blocks
        .as_array()
        .into_iter()
        .flatten()
        .find(|b| {
            b.get("qdev")
                .and_then(Value::as_str)
                .is_some_and(|q| q.starts_with(ROOT_DEVICE) || q == "root-disk")
        })
        .and_then(|b| b.pointer("/inserted/node-name"))
        .and_then(Value::as_str)
        .map(str::to_owned)
        .ok_or_else(|| SnapshotQmpError::Unexpected {
            step: "query-block",
            detail: "no root-disk device".into(),
        })
}

/// The format nodes under `top` along `backing` edges, top first (`top`
/// included), from QEMU's block graph.
pub async fn backing_nodes(qmp: &Qmp, top: &str) -> Result<Vec<String>, SnapshotQmpError> {
    let graph = qmp
        .execute("x-debug-query-block-graph", None)
        .await
        .map_err(step("x-debug-query-block-graph"))?;
    let nodes = graph["nodes"].as_array().cloned().unwrap_or_default();
    let edges = graph["edges"].as_array().cloned().unwrap_or_default();
    let id_of = |name: &str| {
        nodes
            .iter()
            .find(|n| n["type"] == "block-driver" && n["name"] == name)
            .and_then(|n| n["id"].as_u64())
    };
    let name_of = |id: u64| {
        nodes
            .iter()
            .find(|n| n["id"].as_u64() == Some(id))
            .and_then(|n| n["name"].as_str())
            .map(str::to_owned)
    };
    let mut out = vec![top.to_owned()];
    let mut cur = id_of(top);
    while let Some(id) = cur {
        let child = edges
            .iter()
            .find(|e| e["parent"].as_u64() == Some(id) && e["name"] == "backing")
            .and_then(|e| e["child"].as_u64());
        match child.and_then(|c| name_of(c).map(|n| (c, n))) {
            Some((c, n)) => {
                out.push(n);
                cur = Some(c);
            }
            None => cur = None,
        }
        if out.len() > 64 {
            break;
        }
    }
    Ok(out)
}

/// Adds a `file` node (by descriptor) and a format node without a backing.
async fn add_node(qmp: &Qmp, n: &NewNode<'_>) -> Result<(), SnapshotQmpError> {
    let file_node = format!("{}-f", n.node);
    add_file_node(qmp, n.file, &file_node)
        .await
        .map_err(from_hotplug)?;
    let mut format = json!({
        "driver": n.format.as_str(),
        "file": file_node,
        "node-name": n.node,
    });
    if n.format == ImageFormat::Qcow2 {
        format["backing"] = Value::Null;
    }
    if let Err(e) = qmp.execute("blockdev-add", Some(format)).await {
        delete_nodes(qmp, &[&file_node]).await;
        return Err(step("blockdev-add (format)")(e));
    }
    Ok(())
}

/// Best-effort removal of block nodes, top first; failures are logged.
async fn remove_node(qmp: &Qmp, node: &str) {
    let file = format!("{node}-f");
    delete_nodes(qmp, &[node, &file]).await;
}

/// Adds the overlay and the copy targets, then one `transaction`: the
/// overlay goes on top of `root_node` and every copy starts at the same
/// instant. All or nothing: on failure the added nodes are removed again.
pub async fn snapshot(
    qmp: &Qmp,
    root_node: &str,
    overlay: &NewNode<'_>,
    backups: &[Backup<'_>],
) -> Result<(), SnapshotQmpError> {
    let mut added: Vec<&str> = Vec::new();
    let mut result = Ok(());
    for n in std::iter::once(overlay).chain(backups.iter().map(|b| &b.target)) {
        match add_node(qmp, n).await {
            Ok(()) => added.push(&n.node),
            Err(e) => {
                result = Err(e);
                break;
            }
        }
    }
    if result.is_ok() {
        let mut actions = vec![json!({
            "type": "blockdev-snapshot",
            "data": {"node": root_node, "overlay": overlay.node},
        })];
        for b in backups {
            actions.push(json!({
                "type": "blockdev-backup",
                "data": {
                    "job-id": b.job,
                    "device": b.device_node,
                    "target": b.target.node,
                    // Only what the disk holds (it has no backing file):
                    // the fresh target reads zeros everywhere else. "full"
                    // would write every byte of a sparse 64 TiB disk.
                    "sync": "top",
                    "auto-dismiss": false,
                },
            }));
        }
        result = qmp
            .execute("transaction", Some(json!({ "actions": actions })))
            .await
            .map(|_| ())
            .map_err(step("transaction"));
    }
    if result.is_err() {
        for node in added {
            if node != overlay.node || !is_top(qmp, node).await {
                remove_node(qmp, node).await;
            }
        }
    }
    result
}

/// True when `node` is the root disk's top (a transaction whose answer was
/// lost may still have happened).
async fn is_top(qmp: &Qmp, node: &str) -> bool {
    root_top_node(qmp).await.is_ok_and(|n| n == node)
}

/// A job as `query-jobs` reports it.
#[derive(Debug, Clone)]
pub struct JobState {
    pub id: String,
    pub status: String,
    pub error: Option<String>,
}

pub async fn jobs(qmp: &Qmp) -> Result<Vec<JobState>, SnapshotQmpError> {
    let all = qmp
        .execute("query-jobs", None)
        .await
        .map_err(step("query-jobs"))?;
    Ok(all
        .as_array()
        .into_iter()
        .flatten()
        .map(|j| JobState {
            id: j["id"].as_str().unwrap_or_default().to_owned(),
            status: j["status"].as_str().unwrap_or_default().to_owned(),
            error: j["error"].as_str().map(str::to_owned),
        })
        .collect())
}

/// Waits until each job of `ids` has concluded, dismisses it, and returns
/// the first failure. A job QEMU does not know is taken as failed.
pub async fn wait_jobs(qmp: &Qmp, ids: &[String]) -> Result<(), SnapshotQmpError> {
    let mut first_err = None;
    let mut left: Vec<String> = ids.to_vec();
    while !left.is_empty() {
        let now = jobs(qmp).await?;
        let mut still = Vec::new();
        for id in left {
            match now.iter().find(|j| j.id == id) {
                None => {
                    first_err.get_or_insert(SnapshotQmpError::Job {
                        job: id.clone(),
                        detail: "QEMU does not know it".into(),
                    });
                }
                Some(j) if j.status == "concluded" || j.status == "null" => {
                    if let Some(e) = &j.error {
                        first_err.get_or_insert(SnapshotQmpError::Job {
                            job: id.clone(),
                            detail: e.clone(),
                        });
                    }
                    if let Err(e) = qmp.execute("job-dismiss", Some(json!({ "id": id }))).await {
                        tracing::warn!("job-dismiss {id}: {e}");
                    }
                }
                Some(_) => still.push(id),
            }
        }
        left = still;
        if !left.is_empty() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    first_err.map_or(Ok(()), Err)
}

/// Ends the copies of a snapshot: waits for their jobs, then removes their
/// target nodes (the files stay, complete when this returns Ok).
pub async fn finish_backups(
    qmp: &Qmp,
    backups: &[(String, String)],
) -> Result<(), SnapshotQmpError> {
    let ids: Vec<String> = backups.iter().map(|(job, _)| job.clone()).collect();
    let waited = wait_jobs(qmp, &ids).await;
    for (_, node) in backups {
        remove_node(qmp, node).await;
    }
    waited
}

/// Copies into `top` (the active layer) the data of the nodes below it
/// down to `base` (exclusive; None: everything), and makes `base` its
/// backing; `backing_file` is the name written into `top`'s header (QEMU
/// only knows its files as `/dev/fdset/N`). Waits for the job.
pub async fn stream(
    qmp: &Qmp,
    top: &str,
    base: Option<&str>,
    backing_file: Option<&str>,
    job: &str,
) -> Result<(), SnapshotQmpError> {
    let mut args = json!({
        "job-id": job,
        "device": top,
        "auto-dismiss": false,
    });
    if let Some(b) = base {
        args["base-node"] = json!(b);
        if let Some(f) = backing_file {
            args["backing-file"] = json!(f);
        }
    }
    qmp.execute("block-stream", Some(args))
        .await
        .map_err(step("block-stream"))?;
    wait_jobs(qmp, &[job.to_owned()]).await
}
