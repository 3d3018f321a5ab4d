//! The LocalOperator: everything that touches QEMU and disk images on this
//! host. It knows processes, QMP and files; it does not know HTTP or SQL.

pub mod console;
pub mod hotplug;
pub mod image;
pub mod leftovers;
pub mod process;
pub mod qemu;
pub mod qmp;
pub mod tools;
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
}

impl Host {
    pub fn probe(config: &Config) -> Self {
        let (accel, accel_reason) = match config.accel {
            Some(forced) => (forced, format!("VMAN_ACCEL={}", forced.as_str())),
            None => qemu::detect_accel(),
        };
        Self {
            accel,
            accel_reason,
            sandbox: qemu::supports_sandbox(&config.qemu_binary),
            mem_total_mib: mem_total_mib(Path::new("/proc/meminfo")).unwrap_or(0),
            images: image::ImagePolicy::from_config(config),
        }
    }
}

/// `MemTotal` of /proc/meminfo in MiB.
pub fn mem_total_mib(meminfo: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(meminfo).ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024)
}
