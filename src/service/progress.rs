//! Root disks being made while VMs start: the progress of each, by VM, in
//! memory only. This is not VM state (nothing is recorded, `record` stays
//! the one writer): an entry lives exactly as long as one start, so a
//! reader sees `Some` only while that start is making a root disk.
//!
//! The map's lock is taken to add, remove and read an entry; the thread
//! copying only stores into the entry's atomics (`operator::image::Progress`).

use std::sync::Arc;

use super::Service;
use crate::model::Name;
use crate::operator::image::Progress;
use crate::sync::LockExt;

/// How far the root disk of a starting VM is made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Provisioning {
    /// reflink, copy_file_range, read_write, convert, overlay or empty.
    pub method: &'static str,
    pub bytes_done: u64,
    pub bytes_total: u64,
}

/// The entry of one start; removed when dropped (the start ended, either way).
pub(crate) struct Tracked {
    service: Arc<Service>,
    id: Name,
    pub(crate) progress: Arc<Progress>,
}

impl Drop for Tracked {
    fn drop(&mut self) {
        let mut map = self.service.provisioning.lock_or_recover();
        if map
            .get(&self.id)
            .is_some_and(|p| Arc::ptr_eq(p, &self.progress))
        {
            map.remove(&self.id);
        }
    }
}

impl Service {
    /// Starts following the root disk of `id`'s start (under its VM lock).
    pub(crate) fn track_provisioning(self: &Arc<Self>, id: &Name) -> Tracked {
        let progress = Arc::new(Progress::new());
        self.provisioning
            .lock_or_recover()
            .insert(id.clone(), progress.clone());
        Tracked {
            service: self.clone(),
            id: id.clone(),
            progress,
        }
    }

    /// The root disk being made for `id`'s start, if one is.
    pub fn provisioning(&self, id: &Name) -> Option<Provisioning> {
        let progress = self.provisioning.lock_or_recover().get(id).cloned()?;
        let seen = progress.snapshot();
        (seen.method != "pending").then_some(Provisioning {
            method: seen.method,
            bytes_done: seen.bytes_done,
            bytes_total: seen.bytes_total,
        })
    }

    /// Whether the VM whose folder is named `folder` is making its root
    /// disk now (its `.partial` file is a copy in progress, not a leftover).
    pub(crate) fn provisioning_in(&self, folder: &str) -> bool {
        self.provisioning
            .lock_or_recover()
            .keys()
            .any(|id| id.as_str() == folder)
    }

    /// Whether any start is under way (lists then show fresh progress).
    pub fn provisioning_any(&self) -> bool {
        !self.provisioning.lock_or_recover().is_empty()
    }
}
