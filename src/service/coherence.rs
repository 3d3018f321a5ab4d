//! The observer's coherence pass: the database against the QEMU processes
//! on this host (found through the operator) and the files in the storage
//! folder. It repairs only what is unambiguous (a VM recorded `running`
//! whose QEMU is gone; a QEMU of a known VM that vman does not manage) and
//! reports everything else as an `Issue`. The observer (`crate::observer`)
//! only runs it on its timer.

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;

use serde::Serialize;
use utoipa::ToSchema;

use super::Service;
use crate::model::VmState;
use crate::operator::{leftovers, vm};

/// One thing the observer found.
#[derive(Debug, Clone, Serialize, ToSchema, PartialEq)]
pub struct Issue {
    /// `vm_state_mismatch`, `orphan_process`, `missing_disk`, `stale_pid_file`,
    /// `unresponsive_qemu`, `partial_file`, `bridge_leftover`, `dnsmasq_gone`,
    /// `bridge_adopted`, `orphan_passt`, `snapshot_interrupted`,
    /// `missing_snapshot_file`, ...
    pub issue_type: String,
    /// The VM or disk id (also for `orphan_process`: the VM whose folder
    /// the process runs from; its pid is in `details`).
    pub resource_id: String,
    pub details: String,
    /// The observer fixed it.
    pub repaired: bool,
}

impl Issue {
    pub(crate) fn new(
        issue_type: &str,
        resource_id: impl Into<String>,
        details: impl Into<String>,
    ) -> Self {
        Self {
            issue_type: issue_type.to_owned(),
            resource_id: resource_id.into(),
            details: details.into(),
            repaired: false,
        }
    }
}

/// What the last pass saw.
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub passes: u64,
    pub last_check_at: Option<String>,
    pub issues: Vec<Issue>,
}

impl Service {
    /// One coherence pass.
    pub async fn coherence_pass(self: &Arc<Self>) -> Vec<Issue> {
        let mut issues = Vec::new();
        let vms = match self.list_vms(None) {
            Ok(vms) => vms,
            Err(e) => {
                issues.push(Issue::new("database_error", "vms", e.to_string()));
                return issues;
            }
        };
        let known: HashSet<String> = vms.iter().map(|v| v.id.to_string()).collect();
        for vm in &vms {
            let live = self.is_live(&vm.id);
            let paths = self.paths(&vm.id);
            match (vm.state, live) {
                (VmState::Running, false) => {
                    let mut issue = Issue::new(
                        "vm_state_mismatch",
                        vm.id.as_str(),
                        "recorded running but its QEMU process is gone",
                    );
                    issue.repaired = self.repair_stale_running(&vm.id).await;
                    if issue.repaired {
                        issue.details.push_str("; record repaired");
                    }
                    issues.push(issue);
                }
                (VmState::Stopped | VmState::Error, true) => issues.push(Issue::new(
                    "vm_state_mismatch",
                    vm.id.as_str(),
                    format!("recorded {} but its QEMU process runs", vm.state),
                )),
                _ => {}
            }
            if !live && paths.pid.exists() {
                issues.push(Issue::new(
                    "stale_pid_file",
                    vm.id.as_str(),
                    format!("{} left by a QEMU that is gone", paths.pid.display()),
                ));
            }
            let root = match (&vm.qcow2_path, vm.root_disk_source) {
                (Some(explicit), _) => Some(std::path::PathBuf::from(explicit)),
                (None, Some(_)) => Some(paths.root.clone()),
                (None, None) => None,
            };
            if let Some(root) = root.filter(|r| !r.exists()) {
                issues.push(Issue::new(
                    "missing_disk",
                    vm.id.as_str(),
                    format!("root disk {} does not exist", root.display()),
                ));
            }
        }
        for (id, pid) in self.pending_vms() {
            issues.push(Issue::new(
                "unresponsive_qemu",
                id.as_str(),
                format!("QEMU pid {pid} runs but does not answer on QMP; adoption is retried"),
            ));
        }
        issues.extend(self.snapshot_issues());
        for path in leftovers::find_partials(&self.config.storage_path) {
            // A root disk copy under way is no finding. Checked after the
            // scan, then the file again: a copy that ended in between has
            // renamed its file (before it stops being tracked), so a file
            // still there once its VM is not provisioning is a leftover.
            let folder = path.parent().and_then(Path::file_name);
            if folder.is_some_and(|f| self.provisioning_in(&f.to_string_lossy()))
                || self.clone_writes(&path)
                || !path.exists()
            {
                continue;
            }
            issues.push(Issue::new(
                "partial_file",
                path.file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default(),
                format!(
                    "{} is an unfinished copy (in progress, or left by a crash and removed at the next start-up)",
                    path.display()
                ),
            ));
        }
        let vms_dir = self.config.vms_dir();
        let prefix = format!("{}/", vms_dir.to_string_lossy());
        for (pid, owner) in vm::qemus_under(&prefix) {
            // As the first VMAN: the VM id (its folder) is the resource, the
            // pid is in the details.
            if !known.contains(&owner) {
                issues.push(Issue::new(
                    "orphan_process",
                    owner.as_str(),
                    format!("QEMU pid {pid} runs from {prefix}{owner} but no VM {owner:?} exists"),
                ));
            } else if !self.is_live_pid(&owner, pid) {
                let mut issue = Issue::new(
                    "orphan_process",
                    owner.as_str(),
                    format!(
                        "QEMU pid {pid} runs from VM {owner}'s folder but vman does not manage it"
                    ),
                );
                issue.repaired = self.adopt_unmanaged(&owner).await;
                if issue.repaired {
                    issue.details.push_str("; taken over");
                }
                issues.push(issue);
            }
        }
        issues.extend(self.clone_observations());
        issues.extend(self.disk_observations().await);
        issues.extend(self.network_observations().await);
        issues.extend(self.space_observations());
        issues.extend(self.bridge_pass());
        issues
    }
}
