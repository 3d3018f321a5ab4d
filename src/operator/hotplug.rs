//! Data disk hot-plug over QMP: the command sequences that add a disk to a
//! running QEMU, remove it, grow it, and tell what is plugged. Pure of the
//! database: callers say which disk goes where; this module only talks QMP.
//!
//! A disk is three QEMU objects, named so a restarted vman recognises them
//! (see `qemu::disk_device`/`disk_node`): a `file` block node, a format node
//! on top of it, and a `virtio-blk-pci` device with `serial=<disk id>` on one
//! of the `pcie-root-port`s reserved at boot (`hp<n>`). Devices on `pcie.0`
//! itself cannot be hot-plugged on q35; root ports can.
//!
//! Every sequence is all-or-nothing: when a step fails, what the earlier
//! steps added is removed again before the error is returned.

use std::fs::File;
use std::os::fd::AsFd;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::sync::broadcast::error::RecvError;

use super::image::ImageFormat;
use super::qemu::{disk_device, disk_file_node, disk_node, slot_id};
use super::qmp::{Qmp, QmpError};

#[derive(Debug, thiserror::Error)]
pub enum HotplugError {
    /// A QMP step failed; `step` says which.
    #[error("{step}: {source}")]
    Qmp {
        step: &'static str,
        #[source]
        source: QmpError,
    },
    /// The guest did not release the device in time; the unplug request
    /// stays pending in the guest, the device and its nodes are still there.
    #[error("the guest did not release the device within {0} s")]
    NotReleased(u64),
    /// QEMU answered something this module does not understand.
    #[error("unexpected QMP answer to {step}: {detail}")]
    Unexpected { step: &'static str, detail: String },
}

fn step(step: &'static str) -> impl FnOnce(QmpError) -> HotplugError {
    move |source| HotplugError::Qmp { step, source }
}

/// A disk as QEMU should see it.
#[derive(Debug, Clone)]
pub struct Plug<'a> {
    pub id: &'a str,
    /// The disk file as vman checked it, open read-write: QEMU gets this
    /// descriptor, never the path (which could change after the check).
    pub file: &'a File,
    pub format: ImageFormat,
    pub slot: u8,
}

/// Adds the block nodes and the device. Returns once `device_add` has
/// answered, i.e. the device is realized and the guest was notified. On any
/// failure the nodes added so far are deleted again.
pub async fn attach(qmp: &Qmp, disk: &Plug<'_>) -> Result<(), HotplugError> {
    let file_node = disk_file_node(disk.id);
    let node = disk_node(disk.id);
    add_file_node(qmp, disk.file, &file_node).await?;
    // The format is the pinned one, and a qcow2 never opens a backing file
    // named in its header (data disks have none; one that grew one since
    // is refused before this, and this makes sure QEMU would not follow it).
    let mut format_node = json!({
        "driver": disk.format.as_str(),
        "file": file_node,
        "node-name": node,
    });
    if disk.format == ImageFormat::Qcow2 {
        format_node["backing"] = serde_json::Value::Null;
    }
    if let Err(e) = qmp.execute("blockdev-add", Some(format_node)).await {
        delete_nodes(qmp, &[&file_node]).await;
        return Err(step("blockdev-add (format)")(e));
    }
    let added = qmp
        .execute(
            "device_add",
            Some(json!({
                "driver": "virtio-blk-pci",
                "drive": node,
                "id": disk_device(disk.id),
                "serial": disk.id,
                "bus": slot_id(disk.slot),
            })),
        )
        .await;
    if let Err(e) = added {
        // A device_add that timed out may still have happened: only delete
        // the nodes when no device uses them.
        if !device_exists(qmp, disk.id).await.unwrap_or(true) {
            delete_nodes(qmp, &[&node, &file_node]).await;
        }
        return Err(step("device_add")(e));
    }
    Ok(())
}

/// Adds the `file` node of a disk from the file vman checked and holds
/// open, as a descriptor (`add-fd`, then `/dev/fdset/N`): what QEMU opens is
/// exactly what was checked, and QEMU, running as an unprivileged user (see
/// `privilege`), could not open disk files by path anyway. The fd set is
/// removed right after; the node keeps its own copy of the descriptor.
pub(crate) async fn add_file_node(
    qmp: &Qmp,
    file: &File,
    file_node: &str,
) -> Result<(), HotplugError> {
    let added = qmp
        .execute_with_fd(
            "add-fd",
            Some(json!({ "opaque": format!("vman {file_node}") })),
            file.as_fd(),
        )
        .await
        .map_err(step("add-fd"))?;
    let Some(set) = added.get("fdset-id").and_then(Value::as_u64) else {
        return Err(HotplugError::Unexpected {
            step: "add-fd",
            detail: added.to_string(),
        });
    };
    let result = qmp
        .execute(
            "blockdev-add",
            Some(json!({
                "driver": "file",
                "filename": format!("/dev/fdset/{set}"),
                "node-name": file_node,
                "cache": {"direct": false},
            })),
        )
        .await
        .map_err(step("blockdev-add (file)"));
    if let Err(e) = qmp
        .execute("remove-fd", Some(json!({ "fdset-id": set })))
        .await
    {
        tracing::warn!("remove-fd {set}: {e}");
    }
    result.map(|_| ())
}

/// Best-effort removal of block nodes, top first; failures are logged.
pub(crate) async fn delete_nodes(qmp: &Qmp, nodes: &[&str]) {
    for node in nodes {
        if let Err(e) = qmp
            .execute("blockdev-del", Some(json!({ "node-name": node })))
            .await
        {
            tracing::warn!("blockdev-del {node}: {e}");
        }
    }
}

/// How long an unplug request may stay unanswered before it is sent again.
/// A guest can miss the first one (sent while it was still booting, before
/// its hot-plug driver listened); Linux expects the request again then. More
/// than 5 s: a native PCIe guest takes a second attention-button press
/// within 5 s of the first as "cancel".
pub const UNPLUG_RESEND: Duration = Duration::from_secs(6);

/// What QEMU said to one `device_del`.
enum UnplugRequest {
    /// The request is with the guest.
    Sent,
    /// The device is not there (any more).
    Gone,
}

async fn request_unplug(qmp: &Qmp, device: &str) -> Result<UnplugRequest, HotplugError> {
    match qmp
        .execute("device_del", Some(json!({ "id": device })))
        .await
    {
        Ok(_) => Ok(UnplugRequest::Sent),
        Err(QmpError::Command { class, .. }) if class == "DeviceNotFound" => {
            Ok(UnplugRequest::Gone)
        }
        Err(e) => Err(step("device_del")(e)),
    }
}

/// Asks the guest to release the device (`device_del`, sent again every
/// `UNPLUG_RESEND` while unanswered), waits up to `timeout` in all for
/// QEMU's `DEVICE_DELETED`, then deletes the block nodes. `NotReleased`
/// leaves the device, its nodes and the pending unplug request in place. A
/// device that is already gone is not an error.
pub async fn detach(qmp: &Qmp, disk_id: &str, timeout: Duration) -> Result<(), HotplugError> {
    detach_resending(qmp, disk_id, timeout, UNPLUG_RESEND).await
}

async fn detach_resending(
    qmp: &Qmp,
    disk_id: &str,
    timeout: Duration,
    resend: Duration,
) -> Result<(), HotplugError> {
    let device = disk_device(disk_id);
    let mut events = qmp.subscribe();
    let deadline = tokio::time::Instant::now() + timeout;
    if let UnplugRequest::Sent = request_unplug(qmp, &device).await? {
        let mut sent = 1u32;
        loop {
            let next = deadline.min(tokio::time::Instant::now() + resend);
            let wait = wait_deleted(qmp, &mut events, disk_id);
            match tokio::time::timeout_at(next, wait).await {
                Ok(true) => break,
                Ok(false) => return Err(step("waiting for DEVICE_DELETED")(QmpError::Closed)),
                Err(_) if next >= deadline => {
                    return Err(HotplugError::NotReleased(timeout.as_secs()))
                }
                Err(_) => {}
            }
            // Not released yet: the guest may have missed the request.
            match request_unplug(qmp, &device).await {
                Ok(UnplugRequest::Sent) => {
                    sent += 1;
                    tracing::info!(
                        "{device}: the guest has not released it yet; unplug request sent again ({sent})"
                    );
                }
                // Released between the wait and the request.
                Ok(UnplugRequest::Gone) => break,
                // QEMU refuses while an earlier request is in progress.
                Err(HotplugError::Qmp {
                    source: QmpError::Command { .. },
                    ..
                }) => {}
                Err(e) => return Err(e),
            }
        }
    }
    remove_nodes(qmp, disk_id).await
}

/// Waits for the `DEVICE_DELETED` of the disk's device: true once it came,
/// false when the QMP connection closed first (QEMU is gone). When events
/// were lost (a lagging receiver), QEMU is asked directly whether the device
/// still exists. Subscribe before the `device_del`.
pub async fn wait_deleted(
    qmp: &Qmp,
    events: &mut tokio::sync::broadcast::Receiver<super::qmp::QmpEvent>,
    disk_id: &str,
) -> bool {
    let device = disk_device(disk_id);
    loop {
        let ev = tokio::select! {
            biased;
            ev = events.recv() => ev,
            () = qmp.closed() => return false,
        };
        match ev {
            Ok(ev) => {
                if ev.event == "DEVICE_DELETED"
                    && ev.data.get("device").and_then(Value::as_str) == Some(device.as_str())
                {
                    return true;
                }
            }
            Err(RecvError::Lagged(_)) => {
                if matches!(device_exists(qmp, disk_id).await, Ok(false)) {
                    return true;
                }
            }
            Err(RecvError::Closed) => return false,
        }
    }
}

/// Deletes the disk's block nodes (format, then file) once no device uses
/// them. Nodes that are not there are skipped.
pub async fn remove_nodes(qmp: &Qmp, disk_id: &str) -> Result<(), HotplugError> {
    let present = node_names(qmp).await?;
    for node in [disk_node(disk_id), disk_file_node(disk_id)] {
        if present.contains(&node) {
            qmp.execute("blockdev-del", Some(json!({ "node-name": node })))
                .await
                .map_err(step("blockdev-del"))?;
        }
    }
    Ok(())
}

/// Grows the disk online; the guest is told the new capacity.
pub async fn resize(qmp: &Qmp, disk_id: &str, size: u64) -> Result<(), HotplugError> {
    qmp.execute(
        "block_resize",
        Some(json!({ "node-name": disk_node(disk_id), "size": size })),
    )
    .await
    .map_err(step("block_resize"))?;
    Ok(())
}

/// True when QEMU has the disk's device.
pub async fn device_exists(qmp: &Qmp, disk_id: &str) -> Result<bool, HotplugError> {
    let list = qmp
        .execute("qom-list", Some(json!({ "path": "/machine/peripheral" })))
        .await
        .map_err(step("qom-list"))?;
    let device = disk_device(disk_id);
    Ok(list
        .as_array()
        .is_some_and(|a| a.iter().any(|p| p["name"].as_str() == Some(&device))))
}

/// True when QEMU still has a block node of the disk (with or without its
/// device).
pub async fn has_nodes(qmp: &Qmp, disk_id: &str) -> Result<bool, HotplugError> {
    let present = node_names(qmp).await?;
    let (node, file) = (disk_node(disk_id), disk_file_node(disk_id));
    Ok(present.iter().any(|n| *n == node || *n == file))
}

/// Names of all named block nodes.
async fn node_names(qmp: &Qmp) -> Result<Vec<String>, HotplugError> {
    let nodes = qmp
        .execute("query-named-block-nodes", Some(json!({ "flat": true })))
        .await
        .map_err(step("query-named-block-nodes"))?;
    let Some(nodes) = nodes.as_array() else {
        return Err(HotplugError::Unexpected {
            step: "query-named-block-nodes",
            detail: "not a list".into(),
        });
    };
    Ok(nodes
        .iter()
        .filter_map(|n| n["node-name"].as_str().map(str::to_owned))
        .collect())
}

/// A data disk QEMU has plugged, as found by `plugged`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plugged {
    /// The disk id (the device id without `disk-`).
    pub disk_id: String,
    /// The hot-plug root port it sits on, when it is one of ours.
    pub slot: Option<u8>,
    /// The file QEMU has open for it.
    pub file: Option<String>,
}

/// Every `disk-<id>` device QEMU has, with its slot and file, from
/// `query-block` and each device's `parent_bus`.
pub async fn plugged(qmp: &Qmp) -> Result<Vec<Plugged>, HotplugError> {
    let blocks = qmp
        .execute("query-block", None)
        .await
        .map_err(step("query-block"))?;
    let Some(blocks) = blocks.as_array() else {
        return Err(HotplugError::Unexpected {
            step: "query-block",
            detail: "not a list".into(),
        });
    };
    let mut found = Vec::new();
    for b in blocks {
        let Some(disk_id) = b["qdev"].as_str().and_then(device_disk_id) else {
            continue;
        };
        let bus = qmp
            .execute(
                "qom-get",
                Some(json!({
                    "path": format!("/machine/peripheral/{}", disk_device(disk_id)),
                    "property": "parent_bus",
                })),
            )
            .await
            .map_err(step("qom-get parent_bus"))?;
        found.push(Plugged {
            disk_id: disk_id.to_owned(),
            slot: bus.as_str().and_then(bus_slot),
            file: b["inserted"]["file"].as_str().map(str::to_owned),
        });
    }
    Ok(found)
}

/// The disk id in a `query-block` qdev path such as
/// `/machine/peripheral/disk-<id>/virtio-backend`.
fn device_disk_id(qdev: &str) -> Option<&str> {
    let rest = qdev.strip_prefix("/machine/peripheral/disk-")?;
    let id = rest.split('/').next()?;
    (!id.is_empty()).then_some(id)
}

/// The slot of a bus path such as `/machine/peripheral/hp3/hp3`.
fn bus_slot(bus: &str) -> Option<u8> {
    let port = bus
        .strip_prefix("/machine/peripheral/")?
        .split('/')
        .next()?;
    port.strip_prefix("hp")?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qom_paths_are_read() {
        assert_eq!(
            device_disk_id("/machine/peripheral/disk-a.b_c-1/virtio-backend"),
            Some("a.b_c-1")
        );
        assert_eq!(
            device_disk_id("/machine/peripheral/root-disk/virtio-backend"),
            None
        );
        assert_eq!(device_disk_id("/machine/peripheral/disk-"), None);
        assert_eq!(bus_slot("/machine/peripheral/hp3/hp3"), Some(3));
        assert_eq!(bus_slot("/machine/peripheral/hp12/hp12"), Some(12));
        assert_eq!(bus_slot("/machine/q35/pcie.0"), None);
        assert_eq!(bus_slot("/machine/peripheral/hpx/hpx"), None);
    }

    /// A fake QMP peer: answers every command, and sends `DEVICE_DELETED`
    /// for `disk-d1` after the `release_after`-th `device_del` (never when
    /// None). Returns how many `device_del` it got.
    async fn fake_qemu(listener: tokio::net::UnixListener, release_after: Option<usize>) -> usize {
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
        let (s, _) = listener.accept().await.expect("accept");
        let (r, mut w) = s.into_split();
        w.write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\n")
            .await
            .expect("greet");
        let mut lines = BufReader::new(r).lines();
        let mut dels = 0;
        while let Ok(Some(line)) = lines.next_line().await {
            let mut out = String::new();
            if line.contains("query-named-block-nodes") {
                out.push_str("{\"return\": []}\n");
            } else {
                out.push_str("{\"return\": {}}\n");
            }
            if line.contains("device_del") {
                dels += 1;
                if release_after == Some(dels) {
                    out.push_str(
                        "{\"event\": \"DEVICE_DELETED\", \"data\": {\"device\": \"disk-d1\"}}\n",
                    );
                }
            }
            w.write_all(out.as_bytes()).await.expect("answer");
        }
        dels
    }

    async fn detach_with(release_after: Option<usize>) -> (Result<(), HotplugError>, usize) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("qmp.sock");
        let listener = tokio::net::UnixListener::bind(&path).expect("bind");
        let server = tokio::spawn(fake_qemu(listener, release_after));
        let qmp = Qmp::connect(&path).await.expect("connect");
        let r = detach_resending(
            &qmp,
            "d1",
            Duration::from_secs(30),
            Duration::from_millis(50),
        )
        .await;
        drop(qmp);
        (r, server.await.expect("server"))
    }

    /// The bug: a disk hot-plugged while the guest was still booting could
    /// not be detached (the guest missed the one unplug request).
    #[tokio::test]
    async fn a_missed_unplug_request_is_sent_again() {
        let (r, dels) = detach_with(Some(3)).await;
        assert!(r.is_ok(), "{r:?}");
        assert_eq!(dels, 3);
    }

    #[tokio::test]
    async fn a_guest_that_never_releases_is_not_released_at_the_deadline() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("qmp.sock");
        let listener = tokio::net::UnixListener::bind(&path).expect("bind");
        let server = tokio::spawn(fake_qemu(listener, None));
        let qmp = Qmp::connect(&path).await.expect("connect");
        let r = detach_resending(
            &qmp,
            "d1",
            Duration::from_millis(400),
            Duration::from_millis(100),
        )
        .await;
        drop(qmp);
        let dels = server.await.expect("server");
        assert!(matches!(r, Err(HotplugError::NotReleased(_))), "{r:?}");
        assert!(dels >= 2, "{dels}");
    }
}
