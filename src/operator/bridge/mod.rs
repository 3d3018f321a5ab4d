//! The host side of the `bridge` network mode (as root): the Linux bridge
//! and one TAP per VM (`link`), the DHCP server (`dnsmasq`) and the
//! nftables tables `inet vman_bridge` / `bridge vman_bridge` (`nft`).
//!
//! vman only ever changes interfaces it created: each one carries an
//! `ifalias` naming this vman's storage (`Owner`), and a bridge or TAP of
//! the same name without that mark is refused (`BridgeError::Foreign`),
//! never reused or removed. The service decides when each piece is made
//! and removed (`service::bridge`); this module only does it.

pub mod dnsmasq;
pub mod link;
pub mod nft;

use std::path::Path;
use std::process::{Command, Stdio};

/// Why a host networking step failed.
#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    /// This host cannot do bridge networking (not root, a tool missing).
    #[error("{0}")]
    Unsupported(String),
    /// An interface of the name vman wants exists and is not vman's.
    #[error("interface {0} exists and was not created by this vman; remove it or choose another VMAN_BRIDGE_NAME")]
    Foreign(String),
    /// An nftables table of vman's name made by another vman (another
    /// storage) in this network namespace.
    #[error("nftables table {0} belongs to another vman on this host (one bridge-mode vman per network namespace)")]
    ForeignTable(String),
    /// A tool (`ip`, `bridge`, `nft`) failed.
    #[error("{command} failed: {message}")]
    Command { command: String, message: String },
    /// dnsmasq did not start or stay up.
    #[error("dnsmasq: {0}")]
    Dnsmasq(String),
    #[error("{0}: {1}")]
    Io(String, std::io::Error),
}

/// The mark on every interface this vman creates: `vman:<tag>:...`, the
/// tag a hash of the storage folder, so two vman instances on one host
/// never take each other's interfaces for leftovers.
#[derive(Debug, Clone)]
pub struct Owner {
    tag: String,
}

impl Owner {
    pub fn for_storage(storage: &Path) -> Self {
        let canonical = std::fs::canonicalize(storage).unwrap_or_else(|_| storage.to_path_buf());
        let h = fnv(canonical.to_string_lossy().as_bytes());
        Self {
            tag: format!("{:08x}", h as u32),
        }
    }

    /// The comment on vman's nftables tables.
    pub fn mark(&self) -> String {
        format!("vman:{}", self.tag)
    }

    pub fn bridge_alias(&self) -> String {
        format!("vman:{}:bridge", self.tag)
    }

    pub fn tap_alias(&self, vm_id: &str) -> String {
        format!("vman:{}:tap:{vm_id}", self.tag)
    }

    /// The VM id of a TAP alias of this owner.
    pub fn vm_of_tap_alias<'a>(&self, alias: &'a str) -> Option<&'a str> {
        alias.strip_prefix(&format!("vman:{}:tap:", self.tag))
    }

    /// The VM's TAP: `vman` + 10 hex digits of (owner, VM) (15 bytes at
    /// most, as Linux wants).
    pub fn tap_name(&self, vm_id: &str) -> String {
        let h = fnv(format!("{}/{vm_id}", self.tag).as_bytes());
        format!("vman{:010x}", h & 0xff_ffff_ffff)
    }

    /// Folder of the runtime files (dnsmasq's pid, hosts and lease files):
    /// under /run, readable by dnsmasq after it drops its privileges.
    pub fn run_dir(&self) -> std::path::PathBuf {
        Path::new("/run/vman").join(format!("bridge-{}", self.tag))
    }
}

fn fnv(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// Root and the tools: `Err` says what is missing (the 400 of a `bridge`
/// VM on this host).
pub fn support() -> Result<(), String> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Err("network mode 'bridge' needs vman running as root (it creates a bridge, TAP devices and nftables rules); use mode 'user'".into());
    }
    let missing: Vec<&str> = ["ip", "bridge", "nft", "dnsmasq"]
        .into_iter()
        .filter(|t| which(t).is_none())
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "network mode 'bridge' needs {} on this host (scripts/setup.sh installs iproute2, nftables, dnsmasq-base)",
            missing.join(", ")
        ))
    }
}

pub(crate) fn which(tool: &str) -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/sbin:/usr/bin:/sbin:/bin".into());
    std::env::split_paths(&path)
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
}

/// Runs `program args` (argument vector, no shell), with `input` on stdin;
/// its stdout, or its stderr as the error.
pub(crate) fn run(
    program: &str,
    args: &[&str],
    input: Option<&str>,
) -> Result<String, BridgeError> {
    use std::io::Write;
    let command = format!("{program} {}", args.join(" "));
    let binary = which(program).unwrap_or_else(|| program.into());
    let mut child = Command::new(binary)
        .args(args)
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| BridgeError::Command {
            command: command.clone(),
            message: e.to_string(),
        })?;
    if let (Some(text), Some(mut stdin)) = (input, child.stdin.take()) {
        stdin
            .write_all(text.as_bytes())
            .map_err(|e| BridgeError::Io(command.clone(), e))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| BridgeError::Io(command.clone(), e))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(BridgeError::Command {
            command,
            message: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tap_names_fit_linux_and_differ_per_vm_and_per_storage() {
        let a = Owner::for_storage(Path::new("/srv/a"));
        let b = Owner::for_storage(Path::new("/srv/b"));
        let t = a.tap_name("vm-1");
        assert!(t.starts_with("vman") && t.len() <= 15, "{t}");
        assert_eq!(t, a.tap_name("vm-1"));
        assert_ne!(t, a.tap_name("vm-2"));
        assert_ne!(t, b.tap_name("vm-1"));
        assert_eq!(a.vm_of_tap_alias(&a.tap_alias("vm-1")), Some("vm-1"));
        assert_eq!(b.vm_of_tap_alias(&a.tap_alias("vm-1")), None);
        assert_ne!(a.bridge_alias(), b.bridge_alias());
    }
}
