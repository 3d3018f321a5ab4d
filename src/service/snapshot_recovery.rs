//! Start-up reconciliation of snapshot operations a crash interrupted
//! (`snapshot_ops` rows left over): each is finished or rolled back so that
//! every VM's backing chains are valid and the rows match the files, and
//! what was done is logged and kept for /observer/status.
//!
//! - `create`: root disk not moved yet → roll back (the snapshot file, if
//!   it is the root disk's own inode, and its copies go). Moved, stopped
//!   VM → finish (the copies were complete before the root moved). Moved,
//!   running VM whose QEMU still writes into the old root (the
//!   transaction did not happen) → roll back (`untake`). Transaction done
//!   → finish, with the data disk copies whose jobs QEMU reports complete;
//!   copies whose outcome is unknown (QEMU gone) are dropped from the
//!   snapshot (reported).
//! - `delete`: nothing is built on the snapshot any more → finish (file,
//!   copies, row); else roll back (it stays; reported).
//! - `restore`: run the restore's file steps again (they are repeatable).

use super::snapshots::{built_on, CreatePlan};
use super::Service;
use crate::model::Name;
use crate::operator::image::snapshot::{
    self as files, disk_copy, disk_copy_dir, same_file, snapshot_file,
};
use crate::operator::snapshot_qmp as live;
use crate::store::SnapshotOp;
use crate::sync::LockExt;

/// What start-up did with an interrupted operation.
#[derive(Debug, Clone)]
pub struct Settled {
    pub vm_id: String,
    pub name: String,
    pub op: String,
    /// `finished` or `rolled back`, with details.
    pub outcome: String,
}

impl Service {
    /// Settles every interrupted snapshot operation (call after adoption).
    pub async fn recover_snapshot_ops(&self) -> Vec<Settled> {
        let ops = match self.store.snapshot_ops() {
            Ok(ops) => ops,
            Err(e) => {
                tracing::error!("cannot read snapshot operations: {e}");
                return Vec::new();
            }
        };
        let mut out = Vec::new();
        for op in ops {
            let _guard = self.lock_vm(&op.vm_id).await;
            let outcome = match op.op.as_str() {
                "create" => self.settle_create(&op).await,
                "delete" => self.settle_delete(&op).await,
                "restore" => self.settle_restore(&op).await,
                other => Err(format!("unknown operation {other}")),
            };
            let outcome = match outcome {
                Ok(o) => o,
                Err(e) => {
                    // Ended anyway: the files are valid in every state the
                    // steps can leave (see the module doc).
                    if let Err(e2) = self.store.end_snapshot_op(&op.vm_id, &op.name) {
                        tracing::error!("snapshot op {}/{}: {e2}", op.vm_id, op.name);
                    }
                    format!("left as is: {e}")
                }
            };
            tracing::warn!(
                "interrupted snapshot {} of {}/{}: {outcome}",
                op.op,
                op.vm_id,
                op.name
            );
            out.push(Settled {
                vm_id: op.vm_id.to_string(),
                name: op.name.to_string(),
                op: op.op.clone(),
                outcome,
            });
        }
        *self.settled_snapshot_ops.lock_or_recover() = out.clone();
        out
    }

    async fn settle_create(&self, op: &SnapshotOp) -> Result<String, String> {
        let plan: CreatePlan = serde_json::from_str(&op.plan).map_err(|e| e.to_string())?;
        let paths = self.paths(&op.vm_id);
        let (root, snap) = (
            paths.root.clone(),
            snapshot_file(&paths.dir, op.name.as_str()),
        );
        let copies = disk_copy_dir(&paths.dir, op.name.as_str());
        let moved = root.is_file() && snap.is_file() && built_on(&root, &snap);
        let end = |s: &Service| {
            s.store
                .end_snapshot_op(&op.vm_id, &op.name)
                .map_err(|e| e.to_string())
        };
        if !moved {
            if snap.exists() && same_file(&snap, &root) {
                files::remove(&snap).map_err(|e| e.to_string())?;
            }
            files::remove_dir(&copies).map_err(|e| e.to_string())?;
            end(self)?;
            return Ok("rolled back (the root disk had not moved)".into());
        }
        if !plan.running {
            self.finish_create_record(&op.vm_id, &op.name, plan)
                .map_err(|e| e.to_string())?;
            return Ok("finished".into());
        }
        if let Some(run) = self.live(&op.vm_id) {
            let top = live::root_top_node(&run.qmp)
                .await
                .map_err(|e| e.to_string())?;
            if Some(&top) != plan.overlay_node.as_ref() {
                // QEMU still writes into the old root: undo the files.
                files::untake(&root, &snap).map_err(|e| e.to_string())?;
                files::remove_dir(&copies).map_err(|e| e.to_string())?;
                end(self)?;
                return Ok("rolled back (the QMP transaction had not happened)".into());
            }
            // Let copies still running end (their targets were `.partial`
            // files, swept at start-up) and remove their nodes.
            let jobs = live::jobs(&run.qmp).await.unwrap_or_default();
            for (job, node, _) in &plan.jobs {
                if jobs.iter().any(|j| &j.id == job) {
                    let _ = live::finish_backups(&run.qmp, &[(job.clone(), node.clone())]).await;
                }
            }
        }
        let mut dropped: Vec<String> = Vec::new();
        // The copies were made under `.partial` names (swept at start-up)
        // and renamed once complete.
        dropped.extend(
            plan.disks
                .iter()
                .filter(|d| !disk_copy(&paths.dir, op.name.as_str(), &d.id).is_file())
                .map(|d| d.id.clone()),
        );
        if dropped.is_empty() {
            let kept = plan.disks.len();
            self.finish_create_record(&op.vm_id, &op.name, plan)
                .map_err(|e| e.to_string())?;
            return Ok(format!("finished ({kept} data disk copies)"));
        }
        // A copy was cut off: the snapshot would be half made. Merge its
        // root part back (stream into the running root, or rebase the
        // stopped one) and remove it.
        end(self)?;
        let run = self.live(&op.vm_id);
        self.merge_away(&op.vm_id, &op.name, plan.parent.as_deref(), run.as_ref())
            .await
            .map_err(|e| e.to_string())?;
        Ok(format!(
            "rolled back (merged away: the copy of data disk(s) {} was cut off)",
            dropped.join(", ")
        ))
    }

    async fn settle_delete(&self, op: &SnapshotOp) -> Result<String, String> {
        let plan: super::snapshots::DeletePlan =
            serde_json::from_str(&op.plan).map_err(|e| e.to_string())?;
        let paths = self.paths(&op.vm_id);
        let snap = snapshot_file(&paths.dir, op.name.as_str());
        let mut users: Vec<String> = std::fs::read_dir(files::snapshot_dir(&paths.dir))
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| {
                let p = e.path();
                p.extension().is_some_and(|x| x == "qcow2")
                    && !same_file(&p, &snap)
                    && built_on(&p, &snap)
            })
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        if snap.exists() && built_on(&paths.root, &snap) {
            users.push("root disk".into());
        }
        if !users.is_empty() {
            self.store
                .end_snapshot_op(&op.vm_id, &op.name)
                .map_err(|e| e.to_string())?;
            return Ok(format!("rolled back (still used by {})", users.join(", ")));
        }
        files::remove(&snap).map_err(|e| e.to_string())?;
        files::remove_dir(&disk_copy_dir(&paths.dir, op.name.as_str()))
            .map_err(|e| e.to_string())?;
        self.store
            .finish_snapshot_delete(&op.vm_id, &op.name, plan.parent.as_deref())
            .map_err(|e| e.to_string())?;
        Ok("finished".into())
    }

    async fn settle_restore(&self, op: &SnapshotOp) -> Result<String, String> {
        let snap = self
            .store
            .get_snapshot(&op.vm_id, &op.name)
            .map_err(|e| e.to_string())?;
        if self.live(&op.vm_id).is_some() {
            return Err("the VM runs again; restore it again when stopped".into());
        }
        let root = self.paths(&op.vm_id).root;
        self.redo_restore(&op.vm_id, &snap, &root)
            .await
            .map_err(|e| e.to_string())?;
        self.store
            .end_snapshot_op(&op.vm_id, &op.name)
            .map_err(|e| e.to_string())?;
        Ok("finished (restore done again)".into())
    }

    /// The observer's findings about snapshots: what start-up settled
    /// (`snapshot_interrupted`, repaired), and rows whose file is gone
    /// (`missing_snapshot_file`) outside an operation under way.
    pub(crate) fn snapshot_issues(&self) -> Vec<super::Issue> {
        let mut out: Vec<super::Issue> = self
            .settled_snapshot_ops()
            .into_iter()
            .map(|s| {
                let mut i = super::Issue::new(
                    "snapshot_interrupted",
                    s.vm_id.as_str(),
                    format!("snapshot {} of {} was cut off: {}", s.op, s.name, s.outcome),
                );
                i.repaired = !s.outcome.starts_with("left as is");
                i
            })
            .collect();
        let pending = self.store.snapshot_ops().unwrap_or_default();
        for vm in self.list_vms(None).unwrap_or_default() {
            let dir = self.paths(&vm.id).dir;
            for snap in self.store.snapshots_of_vm(&vm.id).unwrap_or_default() {
                if pending
                    .iter()
                    .any(|o| o.vm_id == vm.id && o.name == snap.name)
                {
                    continue;
                }
                let file = snapshot_file(&dir, snap.name.as_str());
                let copies_missing = snap
                    .disks
                    .iter()
                    .any(|d| !disk_copy(&dir, snap.name.as_str(), &d.id).is_file());
                if !file.is_file() || copies_missing {
                    out.push(super::Issue::new(
                        "missing_snapshot_file",
                        vm.id.as_str(),
                        format!(
                            "snapshot {} has lost a file under {}",
                            snap.name,
                            dir.display()
                        ),
                    ));
                }
            }
        }
        out
    }

    /// What the last start-up did with interrupted snapshot operations.
    pub fn settled_snapshot_ops(&self) -> Vec<Settled> {
        self.settled_snapshot_ops.lock_or_recover().clone()
    }

    /// Is an operation on snapshot `name` of `vm` recorded?
    pub fn snapshot_op_pending(&self, vm: &Name, name: &Name) -> bool {
        self.store
            .snapshot_ops()
            .map(|ops| ops.iter().any(|o| &o.vm_id == vm && &o.name == name))
            .unwrap_or(false)
    }
}
