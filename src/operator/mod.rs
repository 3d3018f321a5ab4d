//! The LocalOperator: everything that touches QEMU and disk images on this
//! host. It knows processes, QMP and files; it does not know HTTP or SQL.

pub mod bridge;
pub mod cgroup;
pub mod console;
pub mod guard;
pub mod hotplug;
pub mod image;
pub mod leftovers;
pub mod nic;
pub mod passt;
pub mod privilege;
pub mod process;
pub mod qemu;
pub mod qmp;
pub mod snapshot_qmp;
pub mod stats;
pub mod tools;
pub mod transfer;
pub mod unixsock;
pub mod vm;

use std::path::Path;

use crate::config::Config;
use crate::model::Accel;

/// Facts about this host that decide how QEMU is started; probed once at
/// start-up.
#[derive(Debug, Clone)]
pub struct Host {
    pub accel: Accel,
    pub accel_reason: String,
    pub sandbox: bool,
    pub mem_total_mib: u64,
    /// Which files may be used as images (built once here).
    pub images: image::ImagePolicy,
    /// The user QEMU switches to (none: it keeps vman's).
    pub run_as: Option<privilege::RunAs>,
    /// Where QEMU processes go for a lower CPU weight.
    pub cpu: cgroup::CpuPolicy,
    /// The user passt switches to and its uid (vman is root and
    /// `VMAN_PASST_USER` exists); the guard table is made for this uid.
    pub passt_as: Option<(String, u32)>,
    /// The nftables guard (`guard`) can be used (root, nft works).
    pub guard: bool,
}

impl Host {
    /// Fails when `VMAN_QEMU_USER` names a user this host does not have, or
    /// the storage cannot be closed to it.
    pub fn probe(config: &Config) -> Result<Self, privilege::PrivilegeError> {
        let (accel, accel_reason) = match config.accel {
            Some(forced) => (forced, format!("VMAN_ACCEL={}", forced.as_str())),
            None => qemu::detect_accel(),
        };
        let run_as = privilege::resolve(&config.qemu_user, &config.qemu_binary)?;
        if run_as.is_some() {
            privilege::close_storage(&[&config.vms_dir(), &config.disks_dir()], &config.db_path())?;
        }
        Ok(Self {
            accel,
            accel_reason,
            sandbox: qemu::supports_sandbox(&config.qemu_binary),
            mem_total_mib: mem_total_mib(Path::new("/proc/meminfo")).unwrap_or(0),
            images: image::ImagePolicy::from_config(config),
            run_as,
            cpu: cgroup::CpuPolicy::probe(config.qemu_cpu_weight, &config.vms_dir()),
            passt_as: privilege::passt_user(&config.passt_user),
            guard: false,
        })
    }
}

/// `MemTotal` of /proc/meminfo in MiB.
pub fn mem_total_mib(meminfo: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(meminfo).ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024)
}
