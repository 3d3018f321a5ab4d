//! Data disks: create, attach (hot-plug into a running VM, or recorded for
//! the next start), detach, grow, delete; what the observer checks about
//! them; and the check a restarted vman makes of what QEMU has plugged.
//!
//! Locking: every change that involves a VM runs under that VM's lock, so it
//! never races a start, stop or delete of the VM. Two attaches of one disk
//! to two VMs hold different locks; the store's conditional claim
//! (`UPDATE ... WHERE vm_id IS NULL`) lets exactly one of them win. A claim
//! is made before QEMU is asked and undone when QEMU refuses, so the
//! database never shows a disk attached that QEMU does not have once the
//! VM's lock is released.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use super::blocking::blocking;
use super::disk_plan::{self, DiskAction};
use super::{missing, Reason, Service, ServiceError};
use crate::model::{Name, VmState, GIB};
use crate::operator::hotplug::{self, HotplugError, Plug};
use crate::operator::image::{self, Chain, ImageError, ImageFormat, ImagePolicy, Top};
use crate::operator::qemu::{BootDisk, DiskFile};
use crate::operator::vm::Running;
use crate::store::{Disk, DiskClaim, DiskDelete, NewDisk, StoreError};
use crate::sync::LockExt;

/// The cold-attached disks a VM boots with, and the disks that move to
/// another slot (recorded once QEMU runs).
#[derive(Debug, Default)]
pub(crate) struct BootPlan {
    pub disks: Vec<BootDisk>,
    pub moves: Vec<(Name, u8)>,
}

/// Linux reads at most this many bytes of a virtio-blk serial, so the guest
/// names the disk `/dev/disk/by-id/virtio-<first 20 bytes of the id>`.
const VIRTIO_SERIAL_BYTES: usize = 20;

/// A disk to create, already validated.
#[derive(Debug, Clone)]
pub struct CreateDisk {
    pub id: Option<Name>,
    pub size_gb: u64,
    pub mount_point: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskState {
    Available,
    Attached,
    /// Its file is missing or unreadable.
    Error,
}

impl DiskState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Available => "available",
            Self::Attached => "attached",
            Self::Error => "error",
        }
    }
}

/// A disk as the API shows it: the record plus what its file says.
#[derive(Debug, Clone)]
pub struct DiskView {
    pub disk: Disk,
    pub state: DiskState,
    pub virtual_size: Option<u64>,
    pub allocated_size: Option<u64>,
    /// Why the state is `error`.
    pub error: Option<String>,
}

impl DiskView {
    /// Where the guest finds the disk: udev's by-id link for its serial.
    pub fn device(&self) -> String {
        guest_device(self.disk.id.as_str())
    }
}

/// `/dev/disk/by-id/virtio-<serial as the guest reads it>`.
pub fn guest_device(id: &str) -> String {
    let serial = &id[..id.len().min(VIRTIO_SERIAL_BYTES)];
    format!("/dev/disk/by-id/virtio-{serial}")
}

/// An observer finding: (issue_type, resource_id, details).
pub type DiskIssue = (String, String, String);

fn store_err(e: StoreError) -> ServiceError {
    missing("Disk")(e)
}

/// A data disk's file refused: `Reason::DiskFileRefused` with `e` kept.
fn file_refused(e: ImageError, detail: impl FnOnce(&ImageError) -> String) -> ServiceError {
    let detail = detail(&e);
    Reason::DiskFileRefused(Some(e)).refuse(detail)
}

fn hotplug_rejected(what: &str, e: HotplugError) -> ServiceError {
    ServiceError::because(e, |e| format!("{what}: {e}"))
}

/// The disk as the API shows it: the record plus a probe of its file.
fn view_of(qemu_img: &Path, disk: Disk) -> DiskView {
    let probed = image::probe(qemu_img, Path::new(&disk.path));
    let (state, virtual_size, allocated_size, error) = match probed {
        Ok(info) => (
            if disk.attachment.is_some() {
                DiskState::Attached
            } else {
                DiskState::Available
            },
            Some(info.virtual_size),
            info.actual_size,
            None,
        ),
        Err(e) => (DiskState::Error, None, None, Some(e.to_string())),
    };
    DiskView {
        disk,
        state,
        virtual_size,
        allocated_size,
        error,
    }
}

/// Whether the disk's file is still there and still an image of its format.
pub(super) fn check_file_of(
    images: &ImagePolicy,
    disk: &Disk,
    writable: bool,
) -> Result<Chain, ServiceError> {
    let chain = images
        .open_chain(
            Path::new(&disk.path),
            Top::Trusted,
            Some(disk.format),
            writable,
        )
        .map_err(|e| match e {
            e @ ImageError::NotFound { .. } => file_refused(e, |_| {
                format!("Disk {} file {} has vanished", disk.id, disk.path)
            }),
            e @ ImageError::FormatChanged { found, .. } => file_refused(e, |_| {
                format!(
                    "Disk {} file {} is now a {found} image, not {}",
                    disk.id, disk.path, disk.format
                )
            }),
            e => file_refused(e, |e| format!("Disk {} file cannot be used: {e}", disk.id)),
        })?;
    if chain.files.len() > 1 || chain.top().backing_file.is_some() {
        return Err(Reason::DiskFileRefused(None).refuse(format!(
            "Disk {} file {} has a backing file; data disks cannot have one",
            disk.id, disk.path
        )));
    }
    Ok(chain)
}

impl Service {
    pub(crate) fn disk_path(&self, id: &Name) -> PathBuf {
        self.config.disks_dir().join(format!("{id}.qcow2"))
    }

    /// The disk with what its file says; the probe (which may run
    /// `qemu-img`) runs on a blocking thread.
    async fn view(&self, disk: Disk) -> Result<DiskView, ServiceError> {
        let qemu_img = self.config.qemu_img.clone();
        blocking("disk probe", move || view_of(&qemu_img, disk)).await
    }

    /// Creates `{storage}/disks/{id}.qcow2` and its record.
    pub async fn create_disk(&self, input: CreateDisk) -> Result<DiskView, ServiceError> {
        let id = input.id.unwrap_or_else(Name::generate);
        let exists = || Reason::AlreadyExists.refuse("Disk with this ID already exists");
        match self.store.get_disk(&id) {
            Ok(_) => return Err(exists()),
            Err(StoreError::NotFound) => {}
            Err(e) => return Err(e.into()),
        }
        let path = self.disk_path(&id);
        let (qemu_img, dir, dest) = (
            self.config.qemu_img.clone(),
            self.config.disks_dir(),
            path.clone(),
        );
        let size = input.size_gb * GIB;
        let created = blocking("disk create", move || {
            std::fs::create_dir_all(&dir).map_err(|source| ImageError::Io {
                what: format!("create {}", dir.display()),
                source,
            })?;
            image::create_empty(&qemu_img, &dest, size)
        })
        .await?;
        match created {
            Ok(()) => {}
            Err(ImageError::Exists { path }) => {
                return Err(Reason::AlreadyExists.refuse(format!(
                    "Disk with this ID already exists: {} is there (without a record); \
                     remove the file or choose another name",
                    path.display()
                )))
            }
            Err(e) if super::space::image_no_space(&e) => {
                return Err(ServiceError::NoSpace(format!(
                    "No space left on the storage to create the disk ({e}); free some space"
                )));
            }
            // No permission, no qemu-img: the caller can act on it.
            Err(e) => {
                return Err(ServiceError::image_failed(e, |e| {
                    format!("cannot create the disk: {e}")
                }))
            }
        }
        let new = NewDisk {
            id: id.clone(),
            size_gb: input.size_gb,
            mount_point: input.mount_point,
            path: path.to_string_lossy().into_owned(),
            format: ImageFormat::Qcow2,
        };
        match self.store.insert_disk(&new) {
            Ok(disk) => {
                tracing::info!(
                    "disk {id} created: {} GiB at {}",
                    input.size_gb,
                    path.display()
                );
                let size = serde_json::json!({ "size": input.size_gb });
                self.emit(super::EventKind::Disk, id.as_str(), "created", size);
                self.view(disk).await
            }
            Err(e) => {
                // The file is ours (create_empty never replaces one).
                let _ = std::fs::remove_file(&path);
                match e {
                    StoreError::AlreadyExists => Err(exists()),
                    other => Err(other.into()),
                }
            }
        }
    }

    /// Every disk; the probes of their files run on one blocking thread.
    pub async fn list_disks(&self) -> Result<Vec<DiskView>, ServiceError> {
        let disks = self.store.list_disks()?;
        let qemu_img = self.config.qemu_img.clone();
        blocking("disk probe", move || {
            disks.into_iter().map(|d| view_of(&qemu_img, d)).collect()
        })
        .await
    }

    pub async fn get_disk(&self, id: &Name) -> Result<DiskView, ServiceError> {
        self.view(self.store.get_disk(id).map_err(store_err)?).await
    }

    /// Deletes an unattached disk: its record, then its file. A disk that
    /// snapshots hold a copy of is refused unless `force` (the copies stay
    /// with their snapshots; a restore makes the disk again).
    pub fn delete_disk(&self, id: &Name, force: bool) -> Result<(), ServiceError> {
        if !force {
            let held = self.store.snapshots_holding_disk(id)?;
            if !held.is_empty() {
                let names: Vec<String> = held.iter().map(|(vm, s)| format!("{vm}/{s}")).collect();
                self.store.get_disk(id).map_err(store_err)?;
                return Err(Reason::DiskInSnapshot.refuse(format!(
                    "Disk {id} belongs to snapshot(s) {}; delete those snapshots first, or delete \
                     the disk with ?force=true (the snapshots keep their copies)",
                    names.join(", ")
                )));
            }
        }
        match self.store.delete_disk(id).map_err(store_err)? {
            DiskDelete::Attached(vm) => {
                Err(Reason::DiskAttached.refuse(format!("Disk is attached to VM {vm}")))
            }
            DiskDelete::Deleted(disk) => {
                match std::fs::remove_file(&disk.path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => {
                        tracing::warn!("disk {id} deleted but its file {} stays: {e}", disk.path)
                    }
                }
                tracing::info!("disk {id} deleted");
                let none = serde_json::json!({});
                self.emit(super::EventKind::Disk, id.as_str(), "deleted", none);
                Ok(())
            }
        }
    }

    /// The lowest hot-plug slot of `vm` no disk uses. Call under the VM lock.
    pub(super) fn free_slot(&self, vm: &Name) -> Result<u8, ServiceError> {
        let used: HashSet<u8> = self
            .store
            .disks_of_vm(vm)?
            .iter()
            .filter_map(|d| d.attachment.as_ref().map(|(_, s)| *s))
            .collect();
        let slots = self.config.hotplug_slots;
        (0..slots).find(|s| !used.contains(s)).ok_or_else(|| {
            Reason::NoFreeSlot.refuse(format!(
                "VM {vm} has no free hot-plug slot: all {slots} (VMAN_HOTPLUG_SLOTS) are in use"
            ))
        })
    }

    /// Checks that the disk's file is still there and still an image of its
    /// pinned format, without a backing file or an external data file (the
    /// same check as root disks, `ImagePolicy::open_chain`), on a blocking
    /// thread. Returns the file, open (read-write when `writable`), for QEMU.
    async fn check_file(&self, disk: &Disk, writable: bool) -> Result<Chain, ServiceError> {
        let (images, disk) = (self.host.images.clone(), disk.clone());
        blocking("disk check", move || {
            check_file_of(&images, &disk, writable)
        })
        .await?
    }
    /// Attaches a disk to a VM: hot-plugged when the VM runs (answered once
    /// QEMU has realized the device), recorded for the next start otherwise.
    pub async fn attach_disk(&self, id: &Name, vm_id: &Name) -> Result<DiskView, ServiceError> {
        let _guard = self.lock_vm(vm_id).await;
        let vm = self.store.get_vm(vm_id).map_err(missing("VM"))?;
        let disk = self.store.get_disk(id).map_err(store_err)?;
        if let Some((owner, _)) = &disk.attachment {
            return Err(
                Reason::DiskAttached.refuse(format!("Disk is already attached to VM {owner}"))
            );
        }
        let checked = self.check_file(&disk, true).await?;
        let slot = self.free_slot(vm_id)?;
        match self.store.claim_disk(id, vm_id, slot) {
            Ok(DiskClaim::Claimed) => {}
            Ok(DiskClaim::Attached(owner)) => {
                return Err(
                    Reason::DiskAttached.refuse(format!("Disk is already attached to VM {owner}"))
                )
            }
            Err(StoreError::NotFound) => {
                // The disk or the VM went away after the reads above.
                return Err(match self.store.get_vm(vm_id) {
                    Err(StoreError::NotFound) => ServiceError::NotFound("VM"),
                    _ => ServiceError::NotFound("Disk"),
                });
            }
            Err(e) => return Err(e.into()),
        }
        let run = self.live(vm_id).filter(|_| vm.state == VmState::Running);
        if let Some(run) = run {
            let plug = Plug {
                id: id.as_str(),
                file: &checked.top().file,
                format: disk.format,
                slot,
            };
            let t0 = std::time::Instant::now();
            if let Err(e) = hotplug::attach(&run.qmp, &plug).await {
                if let Err(re) = self.store.release_disk(id, vm_id) {
                    tracing::error!("disk {id}: cannot undo the claim on vm {vm_id}: {re}");
                }
                tracing::warn!("disk {id}: hot-plug into vm {vm_id} failed: {e}");
                return Err(hotplug_rejected("Cannot hot-plug the disk", e));
            }
            tracing::info!(
                "disk {id} hot-plugged into vm {vm_id} on hp{slot} in {:.1} ms",
                t0.elapsed().as_secs_f64() * 1000.0
            );
        } else {
            tracing::info!("disk {id} attached to stopped vm {vm_id} (hp{slot} at next start)");
        }
        let to = serde_json::json!({ "vm": vm_id.as_str(), "slot": slot });
        self.emit(super::EventKind::Disk, id.as_str(), "attached", to);
        self.get_disk(id).await
    }

    /// Detaches a disk: unplugged from a running VM (once the guest released
    /// it), or only recorded when the VM is not running.
    pub async fn detach_disk(self: &Arc<Self>, id: &Name) -> Result<DiskView, ServiceError> {
        // The disk may move between the read and the lock: read again.
        for _ in 0..3 {
            let disk = self.store.get_disk(id).map_err(store_err)?;
            let Some((vm_id, _)) = disk.attachment else {
                return Err(Reason::NotAttached.refuse("Disk is not attached"));
            };
            let _guard = self.lock_vm(&vm_id).await;
            let disk = self.store.get_disk(id).map_err(store_err)?;
            if disk.attachment.as_ref().map(|(v, _)| v) != Some(&vm_id) {
                continue;
            }
            if let Some(run) = self.live(&vm_id) {
                let timeout = Duration::from_secs(self.config.detach_timeout);
                let t0 = std::time::Instant::now();
                match hotplug::detach(&run.qmp, id.as_str(), timeout).await {
                    Ok(()) => tracing::info!(
                        "disk {id} unplugged from vm {vm_id} in {:.1} ms",
                        t0.elapsed().as_secs_f64() * 1000.0
                    ),
                    Err(HotplugError::NotReleased(secs)) => {
                        self.finish_detach_later(id.clone(), vm_id.clone(), run);
                        tracing::warn!(
                            "disk {id}: the guest of vm {vm_id} did not release it within {secs} s"
                        );
                        return Err(Reason::GuestDidNotRelease.refuse(format!(
                            "The guest of VM {vm_id} did not release the disk within {secs} s \
                             (VMAN_DETACH_TIMEOUT); it stays attached. The unplug request stays \
                             pending in the guest: if the guest releases the disk later, vman \
                             completes the detach"
                        )));
                    }
                    Err(e) => {
                        tracing::warn!("disk {id}: unplug from vm {vm_id} failed: {e}");
                        return Err(hotplug_rejected("Cannot unplug the disk", e));
                    }
                }
            } else {
                tracing::info!("disk {id} detached from stopped vm {vm_id}");
            }
            self.store.release_disk(id, &vm_id)?;
            let from = serde_json::json!({ "vm": vm_id.as_str() });
            self.emit(super::EventKind::Disk, id.as_str(), "detached", from);
            return self.get_disk(id).await;
        }
        Err(Reason::DiskBusy.refuse("Disk is being moved by another request; try again"))
    }

    /// After a detach timed out: when the guest releases the device later,
    /// delete its nodes and record the disk detached, under the VM lock and
    /// only if nothing changed meanwhile.
    fn finish_detach_later(self: &Arc<Self>, id: Name, vm_id: Name, run: Arc<Running>) {
        let service = self.clone();
        tokio::spawn(async move {
            let mut events = run.qmp.subscribe();
            let gone = match hotplug::device_exists(&run.qmp, id.as_str()).await {
                Ok(false) => true,
                Ok(true) => hotplug::wait_deleted(&run.qmp, &mut events, id.as_str()).await,
                Err(_) => false,
            };
            if !gone {
                return;
            }
            let _guard = service.lock_vm(&vm_id).await;
            let still = service
                .registered(&vm_id)
                .is_some_and(|r| Arc::ptr_eq(&r, &run))
                && matches!(service.store.get_disk(&id), Ok(d) if d.attachment.as_ref().map(|(v, _)| v) == Some(&vm_id));
            if !still {
                return;
            }
            if let Err(e) = hotplug::remove_nodes(&run.qmp, id.as_str()).await {
                tracing::warn!("disk {id}: released late by vm {vm_id}, but {e}");
                return;
            }
            match service.store.release_disk(&id, &vm_id) {
                Ok(_) => {
                    tracing::info!(
                        "disk {id}: the guest of vm {vm_id} released it late; detach completed"
                    );
                    let from = serde_json::json!({ "vm": vm_id.as_str(), "late": true });
                    service.emit(super::EventKind::Disk, id.as_str(), "detached", from);
                }
                Err(e) => tracing::error!("disk {id}: cannot record the late detach: {e}"),
            }
        });
    }

    /// Grows a disk to `size_gb` (never shrinks): `block_resize` while it is
    /// plugged into a running VM, `qemu-img resize` otherwise.
    pub async fn resize_disk(&self, id: &Name, size_gb: u64) -> Result<DiskView, ServiceError> {
        let disk = self.store.get_disk(id).map_err(store_err)?;
        let _guard = match &disk.attachment {
            Some((vm, _)) => Some(self.lock_vm(vm).await),
            None => None,
        };
        // Read again under the lock.
        let disk = self.store.get_disk(id).map_err(store_err)?;
        if size_gb < disk.size_gb {
            return Err(Reason::CannotShrink.refuse(format!(
                "Disks can only grow: disk {id} is {} GiB, {size_gb} GiB asked",
                disk.size_gb
            )));
        }
        if size_gb == disk.size_gb {
            return self.get_disk(id).await;
        }
        self.check_file(&disk, false).await?;
        let bytes = size_gb * GIB;
        let run = disk.attachment.as_ref().and_then(|(vm, _)| self.live(vm));
        if let Some(run) = run {
            hotplug::resize(&run.qmp, id.as_str(), bytes)
                .await
                .map_err(|e| hotplug_rejected("Cannot grow the disk", e))?;
        } else {
            let (qemu_img, path, format) =
                (self.config.qemu_img.clone(), disk.path.clone(), disk.format);
            blocking("disk resize", move || {
                image::grow(&qemu_img, Path::new(&path), format, bytes)
            })
            .await?
            .map_err(|e| ServiceError::image_failed(e, |e| format!("Cannot grow the disk: {e}")))?;
        }
        self.store.set_disk_size(id, size_gb)?;
        tracing::info!("disk {id} grown to {size_gb} GiB");
        let sizes = serde_json::json!({ "from": disk.size_gb, "size": size_gb });
        self.emit(super::EventKind::Disk, id.as_str(), "resized", sizes);
        self.get_disk(id).await
    }

    /// The data disks a VM boots with (cold attach), for `launch`, with
    /// their files checked and open. A disk on a slot the VM no longer has
    /// (VMAN_HOTPLUG_SLOTS lowered) moves to a free one
    /// (`disk_plan::boot_slots`); nothing is written here: `launch` records
    /// the moves once QEMU runs (`record_boot_moves`). Call under the VM lock.
    pub(crate) fn boot_disks(&self, vm: &Name) -> Result<BootPlan, ServiceError> {
        let disks = self.store.disks_of_vm(vm)?;
        let mut files = std::collections::HashMap::new();
        for d in &disks {
            let chain = check_file_of(&self.host.images, d, true).map_err(|e| {
                e.reworded(|e| format!(
                    "{e}; it is attached to VM {vm}: detach it (POST /disks/{}/detach) to start without it",
                    d.id
                ))
            })?;
            files.insert(d.id.clone(), DiskFile::chain(&chain));
        }
        let recorded: Vec<_> = disks
            .iter()
            .map(|d| (d.id.clone(), d.attachment.as_ref().map(|(_, s)| *s)))
            .collect();
        let placed =
            disk_plan::boot_slots(&recorded, self.config.hotplug_slots).map_err(|too_many| {
                Reason::NoFreeSlot.refuse(format!(
                    "VM {vm} has {} data disks but only {} hot-plug slots (VMAN_HOTPLUG_SLOTS)",
                    too_many.disks, too_many.slots
                ))
            })?;
        let mut plan = BootPlan::default();
        for p in placed {
            if p.moved {
                plan.moves.push((p.id.clone(), p.slot));
            }
            if let Some(file) = files.remove(&p.id).and_then(|f| f.into_iter().next()) {
                plan.disks.push(BootDisk {
                    id: p.id.to_string(),
                    file,
                    slot: p.slot,
                });
            }
        }
        Ok(plan)
    }

    /// Records the slots disks moved to at boot, once QEMU runs with them
    /// there. A failure is only logged: the start-up reconciliation records
    /// what QEMU has plugged.
    pub(crate) fn record_boot_moves(&self, vm: &Name, moves: &[(Name, u8)]) {
        for (id, slot) in moves {
            match self.store.set_disk_attachment(id, vm, *slot) {
                Ok(()) => tracing::info!("vm {vm}: disk {id} moved to hp{slot}"),
                Err(e) => tracing::warn!(
                    "vm {vm}: disk {id} runs on hp{slot} but cannot be recorded there: {e}"
                ),
            }
        }
    }

    /// For start-up recovery, after the running VMs were adopted: makes the
    /// database agree with what each running QEMU has plugged (QMP
    /// `query-block`). A plugged disk the database does not show attached is
    /// recorded; a recorded one QEMU lacks is plugged again (or, when only
    /// its block nodes are left because the guest released it while vman was
    /// down, its detach is completed). Takes each VM's lock.
    pub async fn recover_disk_attachments(self: &Arc<Self>) {
        let vms = match self.store.list_vms(Some(VmState::Running)) {
            Ok(vms) => vms,
            Err(e) => {
                tracing::error!("disk recovery: cannot list VMs: {e}");
                return;
            }
        };
        for vm in vms {
            let _guard = self.lock_vm(&vm.id).await;
            let Some(run) = self.live(&vm.id) else {
                continue;
            };
            if let Err(e) = self.reconcile_vm_disks(&vm.id, &run).await {
                tracing::warn!("vm {}: cannot check its data disks with QEMU: {e}", vm.id);
            }
        }
    }

    pub(super) async fn reconcile_vm_disks(
        &self,
        vm: &Name,
        run: &Running,
    ) -> Result<(), ServiceError> {
        let plugged = hotplug::plugged(&run.qmp)
            .await
            .map_err(|e| ServiceError::Internal(e.to_string()))?;
        let mut facts = Vec::with_capacity(plugged.len());
        for p in &plugged {
            let Ok(id) = Name::parse("id", &p.disk_id) else {
                continue;
            };
            let record = match self.store.get_disk(&id) {
                Ok(d) => Some(d.attachment),
                Err(StoreError::NotFound) => None,
                Err(e) => return Err(e.into()),
            };
            facts.push(disk_plan::Plugged {
                id,
                slot: p.slot,
                record,
            });
        }
        let disks = self.store.disks_of_vm(vm)?;
        let recorded: Vec<_> = disks
            .iter()
            .map(|d| (d.id.clone(), d.attachment.as_ref().map(|(_, s)| *s)))
            .collect();
        for action in disk_plan::reconcile(vm, &facts, &recorded) {
            match action {
                DiskAction::Confirmed { id, slot } => {
                    tracing::info!("vm {vm}: disk {id} confirmed plugged on hp{slot}");
                }
                DiskAction::Record { id, slot, was } => {
                    self.store.set_disk_attachment(&id, vm, slot)?;
                    match was {
                        None => tracing::warn!(
                            "vm {vm}: QEMU has disk {id} plugged on hp{slot}; recorded it attached"
                        ),
                        Some(_) => {
                            tracing::info!("vm {vm}: disk {id} confirmed plugged, on hp{slot}")
                        }
                    }
                }
                DiskAction::Conflict {
                    id,
                    slot,
                    recorded_on,
                } => tracing::warn!(
                    "vm {vm}: QEMU has disk {id} plugged (slot {slot:?}) but it is recorded {}",
                    recorded_on.map_or("detached".to_owned(), |o| format!("attached to {o}"))
                ),
                DiskAction::Unknown { id } => {
                    tracing::warn!("vm {vm}: QEMU has a disk {id} vman has no record of")
                }
                DiskAction::Missing { id, slot } => {
                    if let Some(d) = disks.iter().find(|d| d.id == id) {
                        self.replug_or_finish_detach(vm, run, d, slot).await?;
                    }
                }
            }
        }
        Ok(())
    }

    /// A disk recorded attached to `vm` that QEMU does not have plugged:
    /// when only its block nodes are left (the guest released it while vman
    /// was down) its detach is completed, else it is plugged again.
    async fn replug_or_finish_detach(
        &self,
        vm: &Name,
        run: &Running,
        d: &Disk,
        slot: u8,
    ) -> Result<(), ServiceError> {
        let id = d.id.as_str();
        let leftover = hotplug::has_nodes(&run.qmp, id)
            .await
            .map_err(|e| ServiceError::Internal(e.to_string()))?;
        if leftover {
            hotplug::remove_nodes(&run.qmp, id)
                .await
                .map_err(|e| ServiceError::Internal(e.to_string()))?;
            self.store.release_disk(&d.id, vm)?;
            tracing::warn!(
                "vm {vm}: the guest released disk {id} while vman was down; detach completed"
            );
            return Ok(());
        }
        let replug = match check_file_of(&self.host.images, d, true) {
            Ok(checked) => {
                let plug = Plug {
                    id,
                    file: &checked.top().file,
                    format: d.format,
                    slot,
                };
                hotplug::attach(&run.qmp, &plug)
                    .await
                    .map_err(|e| e.to_string())
            }
            Err(e) => Err(e.to_string()),
        };
        match replug {
            Ok(()) => tracing::warn!(
                "vm {vm}: disk {id} was recorded attached but not plugged; plugged it on hp{slot}"
            ),
            Err(e) => tracing::warn!(
                "vm {vm}: disk {id} is recorded attached but QEMU does not have it, and plugging it failed: {e}"
            ),
        }
        Ok(())
    }

    /// File-system findings for the observer (no QEMU, no lock): files in
    /// `{storage}/disks` without a record (`orphan_disk_file`) and records
    /// without a file (`missing_disk_file`).
    pub(crate) fn disk_issues(&self) -> Vec<DiskIssue> {
        let mut issues = Vec::new();
        let disks = match self.store.list_disks() {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!("observer: cannot list disks: {e}");
                return issues;
            }
        };
        let known: HashSet<&str> = disks.iter().map(|d| d.path.as_str()).collect();
        let dir = self.config.disks_dir();
        if let Ok(entries) = std::fs::read_dir(&dir) {
            for entry in entries.flatten() {
                let name = entry.file_name();
                let name = name.to_string_lossy();
                // `.name.partial-*` are creations in progress.
                if name.starts_with('.') || !entry.file_type().is_ok_and(|t| t.is_file()) {
                    continue;
                }
                let path = entry.path();
                if !known.contains(path.to_string_lossy().as_ref()) {
                    issues.push((
                        "orphan_disk_file".to_owned(),
                        name.strip_suffix(".qcow2").unwrap_or(&name).to_owned(),
                        format!("{} has no disk record", path.display()),
                    ));
                }
            }
        }
        for d in &disks {
            if !Path::new(&d.path).exists() {
                issues.push((
                    "missing_disk_file".to_owned(),
                    d.id.to_string(),
                    format!("disk {} has no file at {}", d.id, d.path),
                ));
            }
        }
        issues
    }

    /// QEMU findings for the observer: disks recorded attached to a running
    /// VM that its QEMU does not have (`unconfirmed_attachment`), and disks
    /// QEMU has that are not recorded there (`unrecorded_attachment`). A VM
    /// whose lock is held (an action in progress) is skipped this pass.
    pub(crate) async fn attachment_issues(&self) -> Vec<DiskIssue> {
        let mut issues = Vec::new();
        let Ok(vms) = self.store.list_vms(Some(VmState::Running)) else {
            return issues;
        };
        for vm in vms {
            let lock = {
                let locks = self.locks.lock_or_recover();
                locks.get(&vm.id).cloned()
            };
            let _guard = match &lock {
                Some(l) => match l.clone().try_lock_owned() {
                    Ok(g) => Some(g),
                    Err(_) => continue,
                },
                None => None,
            };
            let Some(run) = self.live(&vm.id) else {
                continue;
            };
            let Ok(plugged) = hotplug::plugged(&run.qmp).await else {
                continue;
            };
            let Ok(recorded) = self.store.disks_of_vm(&vm.id) else {
                continue;
            };
            for d in &recorded {
                if !plugged.iter().any(|p| p.disk_id == d.id.as_str()) {
                    issues.push((
                        "unconfirmed_attachment".to_owned(),
                        d.id.to_string(),
                        format!(
                            "disk {} is recorded attached to VM {} but its QEMU does not have it",
                            d.id, vm.id
                        ),
                    ));
                }
            }
            for p in &plugged {
                if !recorded.iter().any(|d| d.id.as_str() == p.disk_id) {
                    issues.push((
                        "unrecorded_attachment".to_owned(),
                        p.disk_id.clone(),
                        format!(
                            "QEMU of VM {} has disk {} plugged but it is not recorded there",
                            vm.id, p.disk_id
                        ),
                    ));
                }
            }
        }
        issues
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_guest_device_uses_the_first_20_bytes_of_the_id() {
        assert_eq!(guest_device("data1"), "/dev/disk/by-id/virtio-data1");
        assert_eq!(
            guest_device("0f8fad5b-d9cb-469f-a165-70867728950e"),
            "/dev/disk/by-id/virtio-0f8fad5b-d9cb-469f-a"
        );
    }
}
