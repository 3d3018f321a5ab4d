//! CPU weight of QEMU processes, so that guests saturating the CPUs leave
//! vman's control plane responsive.
//!
//! Every QEMU goes into its own group `<hierarchy>/vman-<storage>-<vm>`
//! at the top of the hierarchy, with the low weight: each guest weighs that
//! much against any other process of the host (vman's included, 100), so a
//! waking vman preempts a guest at once, while many guests together still
//! get a share of a busy host (a common parent would squeeze all of them into
//! one small share). Backends, first that works:
//! - cgroup v2 with the `cpu` controller: `cpu.weight` (1..10000, 100 is the
//!   default of every other group);
//! - cgroup v1 `cpu` hierarchy: `cpu.shares` = weight * 1024 / 100;
//! - neither: the QEMU process gets a nice value (set in the child before
//!   exec, so every thread QEMU creates inherits it).
//!
//! `VMAN_QEMU_CPU_WEIGHT=off` disables all of this. The group of a VM is
//! named after the storage folder and the VM id, so two vman instances never
//! share one. It is removed when its QEMU exits, and empty groups left by
//! QEMUs that ended while vman was down are removed at vman's start.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use crate::config::CpuWeight;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Backend {
    Off,
    /// A cgroup hierarchy (v2 with the cpu controller, or v1 `cpu`): its
    /// mount point, and the weight file and value each VM group gets.
    Cgroup {
        mount: PathBuf,
        file: &'static str,
        value: String,
    },
    Nice(i32),
}

/// Prefix of every VM group vman makes.
const GROUP_PREFIX: &str = "vman-";

/// Where QEMU processes go; probed once at start-up.
#[derive(Debug, Clone)]
pub struct CpuPolicy {
    backend: Backend,
    /// Prefix of this storage's group names.
    prefix: String,
}

/// What `spawn` does for one QEMU.
#[derive(Debug, Clone, Default)]
pub struct Placement {
    /// The VM's group; the pid is written to its `cgroup.procs`.
    pub group: Option<Group>,
    /// Nice value set in the child before exec.
    pub nice: Option<i32>,
}

/// A VM's cgroup and the weight it must carry.
#[derive(Debug, Clone)]
pub struct Group {
    pub dir: PathBuf,
    file: &'static str,
    value: String,
}

impl Group {
    /// Makes the group (again) with its weight.
    fn make(&self) -> io::Result<()> {
        mkdir_p(&self.dir)?;
        fs::write(self.dir.join(self.file), &self.value)
    }

    /// Moves process `pid` (all its threads) into the group, making the
    /// group again when a sweep of another vman removed it in between.
    pub fn join(&self, pid: i32) -> io::Result<()> {
        let procs = self.dir.join("cgroup.procs");
        match fs::write(&procs, pid.to_string()) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                self.make()?;
                fs::write(&procs, pid.to_string())
            }
            other => other,
        }
    }
}

impl CpuPolicy {
    /// Picks the backend and prepares the `vman` group. `vms_dir` names this
    /// storage; empty groups it left behind (a crash) are removed.
    pub fn probe(weight: CpuWeight, vms_dir: &Path) -> Self {
        let prefix = format!(
            "{GROUP_PREFIX}{:08x}-",
            fnv1a(vms_dir.to_string_lossy().as_bytes()) as u32
        );
        let backend = match weight {
            CpuWeight::Off => Backend::Off,
            CpuWeight::Weight(w) => pick_backend(w, &mounts()),
        };
        let policy = Self { backend, prefix };
        policy.sweep();
        policy
    }

    /// One line for the start-up log and /health.
    pub fn describe(&self) -> String {
        match &self.backend {
            Backend::Off => "off".into(),
            Backend::Cgroup { mount, file, value } => {
                format!("{file} {value} in {}/{GROUP_PREFIX}*", mount.display())
            }
            Backend::Nice(n) => format!("nice {n}"),
        }
    }

    /// The group of the VM whose folder name is `vm_id`.
    fn group(&self, vm_id: &str) -> Option<Group> {
        match &self.backend {
            Backend::Cgroup { mount, file, value } => Some(Group {
                dir: mount.join(format!("{}{vm_id}", self.prefix)),
                file,
                value: value.clone(),
            }),
            Backend::Off | Backend::Nice(_) => None,
        }
    }

    /// Creates the VM's group (when cgroups are used); never fails a start:
    /// a group that cannot be made is logged and QEMU runs unweighted.
    pub fn placement(&self, vm_id: &str) -> Placement {
        if let Backend::Nice(n) = self.backend {
            return Placement {
                group: None,
                nice: Some(n),
            };
        }
        let Some(group) = self.group(vm_id) else {
            return Placement::default();
        };
        if let Err(e) = group.make() {
            tracing::warn!(
                "vm {vm_id}: cannot make cgroup {}: {e}",
                group.dir.display()
            );
            return Placement::default();
        }
        Placement {
            group: Some(group),
            nice: None,
        }
    }

    /// Removes empty VM groups left behind (a vman killed with its guests,
    /// a test's storage gone); populated ones refuse. Another vman's fresh
    /// group may go too before its QEMU joined: `join` recreates it.
    fn sweep(&self) {
        let Backend::Cgroup { mount, .. } = &self.backend else {
            return;
        };
        for entry in fs::read_dir(mount).into_iter().flatten().flatten() {
            if entry
                .file_name()
                .to_string_lossy()
                .starts_with(GROUP_PREFIX)
                && entry.file_type().is_ok_and(|t| t.is_dir())
            {
                let _ = fs::remove_dir(entry.path());
            }
        }
    }
}

/// cgroup mounts of this host: (fstype, mount point, super options).
fn mounts() -> Vec<(String, PathBuf, String)> {
    let text = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            let point = left.split_whitespace().nth(4)?;
            let mut r = right.split_whitespace();
            let fstype = r.next()?;
            let _source = r.next()?;
            let opts = r.next().unwrap_or("");
            fstype
                .starts_with("cgroup")
                .then(|| (fstype.to_owned(), PathBuf::from(point), opts.to_owned()))
        })
        .collect()
}

fn pick_backend(weight: u32, mounts: &[(String, PathBuf, String)]) -> Backend {
    for (fstype, point, opts) in mounts {
        if fstype == "cgroup2" && v2_has_cpu(point) {
            return Backend::Cgroup {
                mount: point.clone(),
                file: "cpu.weight",
                value: weight.to_string(),
            };
        } else if fstype == "cgroup" && opts.split(',').any(|o| o == "cpu") {
            return Backend::Cgroup {
                mount: point.clone(),
                file: "cpu.shares",
                value: shares_for(weight).to_string(),
            };
        }
    }
    Backend::Nice(nice_for(weight))
}

/// True when the v2 hierarchy at `mount` has the cpu controller, enabled
/// for the groups at its top (the root is exempt from the
/// no-internal-process rule, so vman can enable it).
fn v2_has_cpu(mount: &Path) -> bool {
    let has = fs::read_to_string(mount.join("cgroup.controllers"))
        .is_ok_and(|c| c.split_whitespace().any(|c| c == "cpu"));
    if !has {
        return false;
    }
    match fs::write(mount.join("cgroup.subtree_control"), "+cpu") {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!("cgroup v2 at {}: cannot enable cpu: {e}", mount.display());
            false
        }
    }
}

fn mkdir_p(dir: &Path) -> io::Result<()> {
    match fs::create_dir(dir) {
        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => Err(e),
        _ => Ok(()),
    }
}

/// v1 `cpu.shares` for a v2 weight (1024 is v1's default, 100 v2's).
fn shares_for(weight: u32) -> u64 {
    (u64::from(weight) * 1024 / 100).max(2)
}

/// The nice value with about the same weight: each nice step is a factor
/// of 1.25 in CFS.
fn nice_for(weight: u32) -> i32 {
    let steps = (100.0 / f64::from(weight)).ln() / 1.25_f64.ln();
    (steps.round() as i32).clamp(0, 19)
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_map_to_shares_and_nice() {
        assert_eq!(shares_for(100), 1024);
        assert_eq!(shares_for(10), 102);
        assert_eq!(shares_for(1), 10);
        assert_eq!(nice_for(100), 0);
        assert_eq!(nice_for(10), 10);
        assert_eq!(nice_for(1), 19);
        assert_eq!(nice_for(10_000), 0);
    }

    #[test]
    fn without_cgroups_it_is_nice_and_off_is_nothing() {
        assert_eq!(pick_backend(10, &[]), Backend::Nice(10));
        let off = CpuPolicy::probe(CpuWeight::Off, Path::new("/s/vms"));
        assert_eq!(off.describe(), "off");
        let p = off.placement("v1");
        assert!(p.group.is_none() && p.nice.is_none());
    }

    #[test]
    fn group_names_depend_on_storage_and_vm() {
        let a = CpuPolicy {
            backend: Backend::Cgroup {
                mount: PathBuf::from("/cg"),
                file: "cpu.shares",
                value: "102".into(),
            },
            prefix: "vman-sa-".into(),
        };
        let g = a.group("v1").expect("group");
        assert_eq!(g.dir, PathBuf::from("/cg/vman-sa-v1"));
        assert_eq!((g.file, g.value.as_str()), ("cpu.shares", "102"));
        let mounts = [(
            "cgroup".to_owned(),
            PathBuf::from("/sys/fs/cgroup/cpu"),
            "rw,cpu".to_owned(),
        )];
        assert!(matches!(
            pick_backend(10, &mounts),
            Backend::Cgroup {
                file: "cpu.shares",
                ..
            }
        ));
        let p1 = CpuPolicy::probe(CpuWeight::Off, Path::new("/one/vms")).prefix;
        let p2 = CpuPolicy::probe(CpuWeight::Off, Path::new("/two/vms")).prefix;
        assert_ne!(p1, p2);
    }

    #[test]
    fn join_makes_a_swept_group_again() {
        // A plain folder stands in for the cgroup file system.
        let dir = tempfile::tempdir().expect("tempdir");
        let group = Group {
            dir: dir.path().join("vman-sX-v1"),
            file: "cpu.shares",
            value: "102".into(),
        };
        group.join(42).expect("join");
        let read = |f: &str| fs::read_to_string(group.dir.join(f)).unwrap();
        assert_eq!(read("cgroup.procs"), "42");
        assert_eq!(read("cpu.shares"), "102");
    }
}
