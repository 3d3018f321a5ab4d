//! What the observer needs from the service: who is live, the one repair it
//! may make, and where its findings are kept for /observer/status and
//! /health.

use std::sync::Arc;

use super::record::Detail;
use super::Service;
use super::{Issue, Report};
use crate::model::{Name, VmEvent, VmState};
use crate::sync::LockExt;

impl Service {
    /// A QEMU of this VM runs: one vman manages, or one whose adoption is
    /// pending (it does not answer on QMP yet).
    pub fn is_live(&self, id: &Name) -> bool {
        self.live(id).is_some() || self.pending_pid(id).is_some()
    }

    /// `pid` is the QEMU vman manages for the VM named `owner`.
    pub fn is_live_pid(&self, owner: &str, pid: i32) -> bool {
        Name::parse("id", owner).ok().is_some_and(|id| {
            self.live(&id).is_some_and(|r| r.pid == pid) || self.pending_pid(&id) == Some(pid)
        })
    }

    /// Marks a VM recorded `running` whose QEMU is gone as `error`. Checked
    /// again under the VM's lock, so a start or stop in progress is never
    /// overruled.
    pub async fn repair_stale_running(self: &Arc<Self>, id: &Name) -> bool {
        let _guard = self.lock_vm(id).await;
        let Ok(vm) = self.store.get_vm(id) else {
            return false;
        };
        if vm.state != VmState::Running || self.is_live(id) {
            return false;
        }
        // Its QEMU may run unmanaged (found by command line): adopt it or
        // mark it pending, never `error` while it lives.
        if self.adopt_found(&vm).await {
            return false;
        }
        // A stop or exit that could not be recorded (full disk) is recorded
        // as it happened; anything else is an error.
        let pending = self.take_unrecorded(id);
        let (event, detail) = pending.clone().unwrap_or_else(|| {
            (
                VmEvent::Gone,
                Detail::error("QEMU process was gone (found by the observer)"),
            )
        });
        let repaired = self.record(id, event, detail);
        if let (Err(_), Some((event, detail))) = (&repaired, pending) {
            // Tried again at the next pass.
            self.keep_unrecorded(id, event, detail);
        }
        match repaired {
            Ok(vm) => {
                tracing::warn!(
                    "observer: vm {id} was recorded running without a QEMU; now recorded {}",
                    vm.state
                );
                true
            }
            Err(e) => {
                tracing::error!("observer: cannot repair vm {id}: {e}");
                false
            }
        }
    }

    /// A QEMU with the command line of the known VM `owner` runs without
    /// vman managing it (e.g. a start cut short by a crash of vman): under
    /// the VM's lock, it is adopted, or recorded pending when it does not
    /// answer. True when it is now managed or pending; false when another
    /// QEMU is the VM's (a duplicate, only reported) or nothing was found.
    pub async fn adopt_unmanaged(self: &Arc<Self>, owner: &str) -> bool {
        let Ok(id) = Name::parse("id", owner) else {
            return false;
        };
        let _guard = self.lock_vm(&id).await;
        if self.is_live(&id) {
            return false;
        }
        let Ok(vm) = self.store.get_vm(&id) else {
            return false;
        };
        self.adopt_found(&vm).await
    }

    pub fn record_observation(&self, issues: Vec<Issue>) {
        self.emit_new_findings(&self.observer.lock_or_recover().issues, &issues);
        let mut report = self.observer.lock_or_recover();
        report.passes += 1;
        report.last_check_at = Some(crate::model::now());
        report.issues = issues;
    }

    pub fn observer_report(&self) -> Report {
        self.observer.lock_or_recover().clone()
    }

    /// Findings about data disks: files without records and the reverse,
    /// and attachments QEMU does not confirm.
    pub async fn disk_observations(&self) -> Vec<Issue> {
        let mut found = self.disk_issues();
        found.extend(self.attachment_issues().await);
        found
            .into_iter()
            .map(|(issue_type, resource_id, details)| Issue {
                issue_type,
                resource_id,
                details,
                repaired: false,
            })
            .collect()
    }
}
