//! The QEMU command line, built as a vector (never through a shell), and the
//! files a VM's folder holds. Pure functions, unit-tested without QEMU.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use super::cgroup::Placement;
use super::image::ImageFormat;
use super::privilege::RunAs;

/// The files of one VM, all inside `{storage}/vms/{vm_id}/`.
#[derive(Debug, Clone)]
pub struct VmPaths {
    pub dir: PathBuf,
    pub root: PathBuf,
    pub pid: PathBuf,
    pub qmp: PathBuf,
    pub console_sock: PathBuf,
    pub console: PathBuf,
    pub log: PathBuf,
}

impl VmPaths {
    pub fn new(vms_dir: &Path, vm_id: &str) -> Self {
        let dir = vms_dir.join(vm_id);
        Self {
            root: dir.join("root.qcow2"),
            pid: dir.join("qemu.pid"),
            qmp: dir.join("qmp.sock"),
            console_sock: dir.join("console.sock"),
            console: dir.join("console.txt"),
            log: dir.join("qemu.log"),
            dir,
        }
    }

    /// Files that belong to a running QEMU only; removed after it is gone.
    pub fn runtime_files(&self) -> [&Path; 3] {
        [&self.pid, &self.qmp, &self.console_sock]
    }
}

/// The accelerator a VM actually runs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Kvm => "kvm",
            Self::Tcg => "tcg",
        }
    }
}

/// A data disk plugged at boot.
#[derive(Debug, Clone)]
pub struct BootDisk {
    pub id: String,
    pub path: PathBuf,
    pub format: ImageFormat,
    /// Index of the hot-plug root port it sits on.
    pub slot: u8,
}

/// Everything needed to start one VM.
#[derive(Debug, Clone)]
pub struct LaunchSpec {
    pub vm_id: String,
    pub hostname: String,
    pub paths: VmPaths,
    pub cpus: u32,
    pub ram_mib: u64,
    pub accel: Accel,
    pub root_disk: PathBuf,
    pub root_format: ImageFormat,
    pub hotplug_slots: u8,
    pub sandbox: bool,
    pub data_disks: Vec<BootDisk>,
    /// The user QEMU switches to once its start-up files are open.
    pub run_as: Option<RunAs>,
    /// The CPU weight of the process (see `cgroup`).
    pub placement: Placement,
}

/// Id of the `n`th hot-pluggable PCIe root port.
pub fn slot_id(n: u8) -> String {
    format!("hp{n}")
}

/// Device id of a data disk in QEMU (`/machine/peripheral/disk-<id>`); a
/// restarted vman recognises its disks by it. QEMU ids have no length limit.
pub fn disk_device(disk_id: &str) -> String {
    format!("disk-{disk_id}")
}

/// Block node name of a data disk's format layer. QEMU limits node names to
/// 31 bytes, which a UUID-named disk (`disk-` + 36) would exceed, so the
/// node is named by a 64-bit FNV-1a hash of the id: `dk-<16 hex>`.
pub fn disk_node(disk_id: &str) -> String {
    let hash = disk_id.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    format!("dk-{hash:016x}")
}

/// Block node name of a data disk's file (protocol) layer.
pub fn disk_file_node(disk_id: &str) -> String {
    format!("{}-file", disk_node(disk_id))
}

/// QEMU's `-drive`/`-blockdev` values separate options with commas; a path
/// containing one must double it.
fn escape_commas(path: &Path) -> String {
    path.to_string_lossy().replace(',', ",,")
}

/// The argument vector (without the binary).
pub fn argv(spec: &LaunchSpec) -> Vec<OsString> {
    let p = &spec.paths;
    let mut a: Vec<String> = vec![
        "-name".into(),
        format!("guest={},debug-threads=on", spec.vm_id),
        "-machine".into(),
        format!("q35,accel={}", spec.accel.as_str()),
        "-cpu".into(),
        match spec.accel {
            Accel::Kvm => "host".into(),
            Accel::Tcg => "max".into(),
        },
        "-smp".into(),
        spec.cpus.to_string(),
        "-m".into(),
        format!("{}M", spec.ram_mib),
        "-nodefaults".into(),
        "-no-user-config".into(),
        "-display".into(),
        "none".into(),
        "-pidfile".into(),
        p.pid.to_string_lossy().into_owned(),
        "-qmp".into(),
        format!("unix:{},server=on,wait=off", escape_commas(&p.qmp)),
        "-chardev".into(),
        format!(
            "socket,id=serial0,path={},server=on,wait=off",
            escape_commas(&p.console_sock)
        ),
        "-serial".into(),
        "chardev:serial0".into(),
        "-smbios".into(),
        format!("type=1,serial={}", spec.vm_id),
        "-smbios".into(),
        format!("type=11,value=vman.hostname={}", spec.hostname),
        "-blockdev".into(),
        format!(
            "driver=file,filename={},node-name=root-file,cache.direct=off",
            escape_commas(&spec.root_disk)
        ),
        "-blockdev".into(),
        format!(
            "driver={},file=root-file,node-name=root",
            spec.root_format.as_str()
        ),
        "-device".into(),
        "virtio-blk-pci,drive=root,id=root-disk,bootindex=1".into(),
        "-msg".into(),
        "timestamp=on".into(),
    ];
    for n in 0..spec.hotplug_slots {
        a.push("-device".into());
        a.push(format!(
            "pcie-root-port,id={},chassis={},slot={}",
            slot_id(n),
            n + 1,
            n + 1
        ));
    }
    for d in &spec.data_disks {
        let node = disk_node(&d.id);
        a.push("-blockdev".into());
        a.push(format!(
            "driver=file,filename={},node-name={},cache.direct=off",
            escape_commas(&d.path),
            disk_file_node(&d.id)
        ));
        a.push("-blockdev".into());
        a.push(format!(
            "driver={},file={},node-name={node}",
            d.format.as_str(),
            disk_file_node(&d.id)
        ));
        a.push("-device".into());
        a.push(format!(
            "virtio-blk-pci,drive={node},id={},serial={},bus={}",
            disk_device(&d.id),
            d.id,
            slot_id(d.slot)
        ));
    }
    a.extend(privilege_args(spec));
    a.into_iter().map(OsString::from).collect()
}

/// `-runas` and `-sandbox`: QEMU's own user switch needs the set*id calls
/// that `elevateprivileges=deny` forbids (see `privilege`).
fn privilege_args(spec: &LaunchSpec) -> Vec<String> {
    let mut a = Vec::new();
    if let Some(run_as) = &spec.run_as {
        a.extend(run_as.args());
    }
    if spec.sandbox {
        let elevate = if spec.run_as.is_some() {
            "allow"
        } else {
            "deny"
        };
        a.push("-sandbox".into());
        a.push(format!(
            "on,obsolete=deny,elevateprivileges={elevate},spawn=deny,resourcecontrol=deny"
        ));
    }
    a
}

/// Picks the accelerator for `auto`: KVM only when `/dev/kvm` opens and the
/// host is not itself a guest. Nested KVM on the hosts we know of opens fine
/// and then fails guests ("emulation failure" or a hang after the
/// bootloader), so a nested host gets TCG unless the user forces `kvm`.
pub fn detect_accel() -> (Accel, String) {
    let kvm = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm");
    if let Err(e) = kvm {
        return (Accel::Tcg, format!("/dev/kvm not usable ({e})"));
    }
    let nested = std::fs::read_to_string("/proc/cpuinfo")
        .map(|c| {
            c.lines()
                .any(|l| l.starts_with("flags") && l.split_whitespace().any(|f| f == "hypervisor"))
        })
        .unwrap_or(false);
    if nested {
        (
            Accel::Tcg,
            "host is itself a VM (nested KVM is unreliable); set VMAN_ACCEL=kvm to force it".into(),
        )
    } else {
        (Accel::Kvm, "/dev/kvm usable".into())
    }
}

/// True when this QEMU knows `-sandbox` (built with seccomp).
pub fn supports_sandbox(qemu: &Path) -> bool {
    std::process::Command::new(qemu)
        .arg("-help")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("-sandbox"))
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> LaunchSpec {
        LaunchSpec {
            vm_id: "vm1".into(),
            hostname: "vm1".into(),
            paths: VmPaths::new(Path::new("/s/vms"), "vm1"),
            cpus: 2,
            ram_mib: 256,
            accel: Accel::Tcg,
            root_disk: PathBuf::from("/s/vms/vm1/root.qcow2"),
            root_format: ImageFormat::Qcow2,
            hotplug_slots: 2,
            sandbox: true,
            data_disks: vec![BootDisk {
                id: "d1".into(),
                path: PathBuf::from("/s/disks/d1.qcow2"),
                format: ImageFormat::Qcow2,
                slot: 1,
            }],
            run_as: None,
            placement: Placement::default(),
        }
    }

    fn joined(spec: &LaunchSpec) -> String {
        argv(spec)
            .iter()
            .map(|s| s.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ")
    }

    #[test]
    fn every_drive_has_an_explicit_format() {
        let line = joined(&spec());
        assert!(line.contains("driver=qcow2,file=root-file,node-name=root"));
        assert!(line.contains("-machine q35,accel=tcg -cpu max -smp 2 -m 256M"));
        assert!(line.contains("-qmp unix:/s/vms/vm1/qmp.sock,server=on,wait=off"));
        assert!(line.contains("-pidfile /s/vms/vm1/qemu.pid"));
        assert!(line.contains("pcie-root-port,id=hp1,chassis=2,slot=2"));
        let node = disk_node("d1");
        assert!(line.contains(&format!(
            "virtio-blk-pci,drive={node},id=disk-d1,serial=d1,bus=hp1"
        )));
        assert!(line.contains("-sandbox on"));
        assert!(!line.contains("if=ide"));
    }

    #[test]
    fn runas_keeps_the_sandbox_but_allows_the_user_switch() {
        let mut s = spec();
        assert!(joined(&s).contains(
            "-sandbox on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
        ));
        assert!(!joined(&s).contains("-runas"));
        s.run_as = Some(RunAs {
            user: "vman-qemu".into(),
            uid: 999,
            gid: 999,
            flag: super::super::privilege::RunAsFlag::Runas,
        });
        let line = joined(&s);
        assert!(line.contains(
            "-runas vman-qemu -sandbox on,obsolete=deny,elevateprivileges=allow,spawn=deny,resourcecontrol=deny"
        ));
    }

    #[test]
    fn node_names_fit_qemu_limits() {
        let id = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcde";
        assert!(disk_file_node(id).len() <= 31);
        assert_ne!(disk_node("a"), disk_node("b"));
        assert_eq!(disk_node("a"), disk_node("a"));
        assert!(disk_node("a").starts_with("dk-"));
    }

    #[test]
    fn kvm_uses_host_cpu_and_commas_are_escaped() {
        let mut s = spec();
        s.accel = Accel::Kvm;
        s.root_disk = PathBuf::from("/a,b/root.qcow2");
        s.sandbox = false;
        let line = joined(&s);
        assert!(line.contains("accel=kvm -cpu host"));
        assert!(line.contains("filename=/a,,b/root.qcow2"));
        assert!(!line.contains("-sandbox"));
    }
}
