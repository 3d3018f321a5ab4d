//! A full filesystem: what the service answers (507 with the reason, never
//! a 500) and how it keeps the recorded state true. Writes that record what
//! already happened (a QEMU gone after a stop, an exit, a deletion) go
//! through `Store::reserved`, which gives up the database's space reserve
//! on ENOSPC (state writes: `record.rs`); a deletion is recorded before its
//! QEMU is killed, so a full disk refuses it with nothing changed. The
//! observer puts the reserve back, and records the state changes kept here
//! that even the reserve could not hold.

use std::collections::HashMap;

use super::record::Detail;
use super::Issue;
use super::{Service, ServiceError};
use crate::model::{Name, VmEvent};
use crate::operator::image::ImageError;
use crate::sync::LockExt;

/// The detail of a 507.
pub(crate) const NO_SPACE: &str =
    "No space left on the storage to record this change; nothing was changed. \
     Free some space (delete VMs or disks) and try again";

/// True when an image operation failed because the filesystem is full.
pub(crate) fn image_no_space(e: &ImageError) -> bool {
    match e {
        ImageError::Io { source, .. } => {
            source.kind() == std::io::ErrorKind::StorageFull
                || source.raw_os_error() == Some(libc::ENOSPC)
        }
        ImageError::QemuImg { detail, .. } => detail.contains("No space left on device"),
        _ => false,
    }
}

impl Service {
    fn unrecorded_map(&self) -> std::sync::MutexGuard<'_, HashMap<Name, (VmEvent, Detail)>> {
        self.unrecorded.lock_or_recover()
    }

    /// The event `record` could not write for this VM (full disk), if any.
    pub(crate) fn take_unrecorded(&self, id: &Name) -> Option<(VmEvent, Detail)> {
        self.unrecorded_map().remove(id)
    }

    /// Keeps the last event that happened to a VM but could not be
    /// recorded, for the observer (`repair_stale_running`).
    pub(crate) fn keep_unrecorded(&self, id: &Name, event: VmEvent, detail: Detail) {
        self.unrecorded_map().insert(id.clone(), (event, detail));
    }

    /// Records the deletion of a VM (and frees its disks) before anything
    /// is done to its QEMU or folder. A deletion frees space, so it may use
    /// the space reserve.
    pub(crate) fn forget_vm(&self, id: &Name) -> Result<(), ServiceError> {
        let freed = self
            .store
            .reserved(|s| s.delete_vm_and_free_disks(id))
            .map_err(super::missing("VM"))?;
        for disk in freed {
            tracing::info!("disk {disk} detached: vm {id} is deleted");
        }
        Ok(())
    }

    /// For the observer: puts the database's space reserve back when there
    /// is room, and reports it while it is missing.
    pub fn space_observations(&self) -> Vec<Issue> {
        self.store
            .refill_reserve()
            .map(|why| Issue {
                issue_type: "database_reserve_missing".into(),
                resource_id: "database".into(),
                details: why,
                repaired: false,
            })
            .into_iter()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    #[test]
    fn no_space_is_recognised_in_io_errors_and_qemu_img_output() {
        let io = ImageError::Io {
            what: "copy".into(),
            source: std::io::Error::from_raw_os_error(libc::ENOSPC),
        };
        assert!(image_no_space(&io));
        let qemu_img = ImageError::QemuImg {
            action: "create".into(),
            detail: "Could not write qcow2 header: No space left on device".into(),
        };
        assert!(image_no_space(&qemu_img));
        let other = ImageError::Exists {
            path: PathBuf::from("/x"),
        };
        assert!(!image_no_space(&other));
        let denied = ImageError::Io {
            what: "copy".into(),
            source: std::io::Error::from_raw_os_error(libc::EACCES),
        };
        assert!(!image_no_space(&denied));
    }
}
