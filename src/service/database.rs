//! The database as a whole, beyond single records: the WAL checkpoint of a
//! graceful stop, and `vman db recover`, which rebuilds records from the
//! storage folders when the database was lost.
//!
//! What `recover` can honestly rebuild: one VM record per folder under
//! `vms/` (state `stopped`; a `root.qcow2` there is used as is at the next
//! start, and a QEMU still running is adopted by the next `vman serve`),
//! and one disk record per file under `disks/` (size and format read from
//! the image; `available`). What it cannot: the templates' real sizes (the
//! VMs get one template, `--template`), a VM's explicit `qcow2_path` or
//! `boot_disk`, cloud-init metadata, disk mount points, and attachments of
//! VMs that are not running (those of running VMs come back at the next
//! `vman serve`, which records what each QEMU has plugged).

use std::path::Path;

use super::Service;
use crate::config::Config;
use crate::model::GIB;
use crate::model::{Name, Template};
use crate::operator::image;
use crate::store::{CheckLevel, Holdings, Lock, NewDisk, NewVm, OpenOptions, Store, StoreError};

impl Service {
    /// Empties the WAL into the database file (graceful shutdown), so a
    /// stopped vman leaves one self-contained file.
    pub fn checkpoint_database(&self) {
        match self.store.checkpoint() {
            Ok(()) => tracing::info!("database checkpointed (WAL emptied)"),
            Err(e) => tracing::warn!("database checkpoint at shutdown: {e}"),
        }
    }
}

/// The template recovered VMs get.
#[derive(Debug, Clone)]
pub struct RecoverTemplate {
    pub name: Name,
    pub cpu_count: u32,
    pub ram_mib: u64,
}

/// What `recover` did, one line per record or skipped item.
#[derive(Debug, Default)]
pub struct RecoverReport {
    pub recorded: Vec<String>,
    pub skipped: Vec<String>,
}

/// Rebuilds the records of VM folders and disk files that the database
/// (created when missing or empty) does not know. A damaged database is
/// refused: move it away first. Refused while a `vman serve` uses it.
pub fn recover(config: &Config, template: &RecoverTemplate) -> Result<RecoverReport, StoreError> {
    let db = config.db_path();
    let store = Store::open_with(
        &db,
        &OpenOptions {
            check: CheckLevel::Quick,
            lock: Lock::Exclusive,
            ..Default::default()
        },
    )?;
    let mut report = RecoverReport::default();
    let held = Holdings::scan(&config.vms_dir(), &config.disks_dir());
    if !held.vm_folders.is_empty() {
        match store.get_template(&template.name) {
            Ok(_) => {}
            Err(StoreError::NotFound) => {
                store.insert_template(&Template {
                    name: template.name.clone(),
                    cpu_count: template.cpu_count,
                    ram_mib: template.ram_mib,
                    disk_size_gb: None,
                    created_at: crate::model::now(),
                })?;
                report.recorded.push(format!(
                    "template {}: {} vCPU, {} MiB (for the recovered VMs)",
                    template.name, template.cpu_count, template.ram_mib
                ));
            }
            Err(e) => return Err(e),
        }
    }
    for folder in &held.vm_folders {
        let Ok(id) = Name::parse("id", folder) else {
            report
                .skipped
                .push(format!("vms/{folder}: not a valid VM id"));
            continue;
        };
        let new = NewVm {
            id: id.clone(),
            template: template.name.clone(),
            qcow2_path: None,
            boot_disk: None,
            qcow2_path_format: None,
            boot_disk_format: None,
            network_mode: crate::model::NetworkMode::None,
            ports: Vec::new(),
        };
        match store.insert_vm(&new) {
            Ok(_) => {
                let root = config.vms_dir().join(folder).join("root.qcow2");
                report.recorded.push(format!(
                    "vm {id}: stopped, template {}{}",
                    template.name,
                    if root.is_file() {
                        "; its root.qcow2 is used as is at the next start"
                    } else {
                        "; no root.qcow2: the next start provisions one"
                    }
                ));
            }
            Err(StoreError::AlreadyExists) => {
                report.skipped.push(format!("vm {id}: already recorded"));
            }
            Err(e) => return Err(e),
        }
    }
    for file in &held.disk_files {
        let Some(id) = file
            .strip_suffix(".qcow2")
            .and_then(|s| Name::parse("id", s).ok())
        else {
            report
                .skipped
                .push(format!("disks/{file}: not named <disk id>.qcow2"));
            continue;
        };
        let path = config.disks_dir().join(file);
        let info = match image::probe(&config.qemu_img, &path) {
            Ok(info) => info,
            Err(e) => {
                report
                    .skipped
                    .push(format!("disk {id}: cannot read the image: {e}"));
                continue;
            }
        };
        let new = NewDisk {
            id: id.clone(),
            size_gb: info.virtual_size.div_ceil(GIB).max(1),
            mount_point: None,
            path: path.to_string_lossy().into_owned(),
            format: info.format,
        };
        match store.insert_disk(&new) {
            Ok(d) => report.recorded.push(format!(
                "disk {id}: {} GiB {}, available",
                d.size_gb,
                d.format.as_str()
            )),
            Err(StoreError::AlreadyExists) => {
                report.skipped.push(format!("disk {id}: already recorded"));
            }
            Err(e) => return Err(e),
        }
    }
    store.checkpoint()?;
    Ok(report)
}

/// `vman db backup`: a consistent copy of the configured database.
pub fn backup(config: &Config, dest: &Path) -> Result<i32, StoreError> {
    crate::store::backup(&config.db_path(), dest)
}
