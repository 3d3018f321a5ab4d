//! The QEMU command line, built as a vector (never through a shell), and the
//! files a VM's folder holds. Pure functions, unit-tested without QEMU.

use std::ffi::OsString;
use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::cgroup::Placement;
use super::privilege::RunAs;
use serde_json::json;

use super::image::{Chain, ImageFormat};
use crate::model::Accel;

/// File name of the QMP socket in a VM folder.
pub const QMP_SOCK: &str = "qmp.sock";
/// File name of the serial console socket in a VM folder.
pub const CONSOLE_SOCK: &str = "console.sock";

/// The files of one VM, all inside `{storage}/vms/{vm_id}/`. QEMU runs with
/// that folder as its working directory and binds its sockets by their bare
/// file names, so their paths never hit the 107-byte limit of a UNIX socket
/// address whatever the storage path and VM name (`operator::unixsock`
/// reaches them from vman). The absolute `-pidfile` path is what tells a
/// VM's QEMU apart in the process table.
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
            qmp: dir.join(QMP_SOCK),
            console_sock: dir.join(CONSOLE_SOCK),
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

/// One file of a disk's block graph, as vman checked it. QEMU gets it by
/// descriptor (`-add-fd` + `/dev/fdset/N`) when `fd` is set, so a path
/// swapped after the check cannot redirect it; by canonical path otherwise.
#[derive(Debug, Clone)]
pub struct DiskFile {
    pub path: PathBuf,
    pub format: ImageFormat,
    pub fd: Option<Arc<File>>,
}

impl DiskFile {
    /// The files of a checked chain, top first, passed by descriptor.
    pub fn chain(chain: &Chain) -> Vec<DiskFile> {
        chain
            .files
            .iter()
            .map(|f| DiskFile {
                path: f.path.clone(),
                format: f.format,
                fd: Some(f.file.clone()),
            })
            .collect()
    }
}

/// A data disk plugged at boot (a single file: data disks have no backing).
#[derive(Debug, Clone)]
pub struct BootDisk {
    pub id: String,
    pub file: DiskFile,
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
    /// The root disk's backing chain as vman checked it, top first; QEMU
    /// gets every file as its own node with `backing` set explicitly.
    pub root_chain: Vec<DiskFile>,
    pub hotplug_slots: u8,
    pub sandbox: bool,
    /// The network card (None: no NIC).
    pub nic: Option<super::nic::Nic>,
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

/// Node names of the `i`th file of a chain whose top is `node`: the format
/// node and its file (protocol) node. Fits QEMU's 31-byte limit for the
/// names used here (`root`, `dk-<16 hex>`) and chains of up to 99 files.
pub fn chain_node(node: &str, i: usize) -> (String, String) {
    let n = if i == 0 {
        node.to_owned()
    } else {
        format!("{node}-b{i}")
    };
    let f = format!("{n}-file");
    (n, f)
}

/// The block graph of one disk, bottom first (a node must exist before a
/// node names it): per file an optional `-add-fd`, a `file` node and a
/// format node whose `backing` is set explicitly to the next file's node,
/// or to null at the bottom, so QEMU never opens a backing file named in a
/// header by itself. Files below the top are read-only.
fn push_chain(a: &mut Vec<String>, chain: &[DiskFile], node: &str, fdsets: &mut u32) {
    for (i, f) in chain.iter().enumerate().rev() {
        let (fmt_node, file_node) = chain_node(node, i);
        let filename = match &f.fd {
            Some(fd) => {
                *fdsets += 1;
                a.push("-add-fd".into());
                a.push(format!("fd={},set={}", fd.as_raw_fd(), *fdsets));
                format!("/dev/fdset/{}", *fdsets)
            }
            None => f.path.to_string_lossy().into_owned(),
        };
        let read_only = i > 0;
        let mut file = json!({
            "driver": "file",
            "filename": filename,
            "node-name": file_node,
            "cache": {"direct": false},
        });
        let mut format = json!({
            "driver": f.format.as_str(),
            "file": file_node,
            "node-name": fmt_node,
        });
        if read_only {
            file["read-only"] = json!(true);
            format["read-only"] = json!(true);
        }
        if f.format == ImageFormat::Qcow2 {
            format["backing"] = match chain.get(i + 1) {
                Some(_) => json!(chain_node(node, i + 1).0),
                None => serde_json::Value::Null,
            };
        }
        a.push("-blockdev".into());
        a.push(file.to_string());
        a.push("-blockdev".into());
        a.push(format.to_string());
    }
}

/// The descriptors `argv` hands to QEMU with `-add-fd`: the child must
/// inherit them (see `process::spawn_keeping`).
pub fn passed_fds(spec: &LaunchSpec) -> Vec<RawFd> {
    spec.root_chain
        .iter()
        .chain(spec.data_disks.iter().map(|d| &d.file))
        .filter_map(|f| f.fd.as_ref().map(|fd| fd.as_raw_fd()))
        .collect()
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
        format!("unix:{QMP_SOCK},server=on,wait=off"),
        "-chardev".into(),
        format!("socket,id=serial0,path={CONSOLE_SOCK},server=on,wait=off"),
        "-serial".into(),
        "chardev:serial0".into(),
        "-smbios".into(),
        format!("type=1,serial={}", spec.vm_id),
        "-smbios".into(),
        format!("type=11,value=vman.hostname={}", spec.hostname),
    ];
    let mut fdsets = 0;
    push_chain(&mut a, &spec.root_chain, "root", &mut fdsets);
    a.extend([
        "-device".into(),
        "virtio-blk-pci,drive=root,id=root-disk,bootindex=1".into(),
        "-msg".into(),
        "timestamp=on".into(),
    ]);
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
        push_chain(&mut a, std::slice::from_ref(&d.file), &node, &mut fdsets);
        a.push("-device".into());
        a.push(format!(
            "virtio-blk-pci,drive={node},id={},serial={},bus={}",
            disk_device(&d.id),
            d.id,
            slot_id(d.slot)
        ));
    }
    a.extend(spec.nic.iter().flat_map(super::nic::nic_args));
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
            root_chain: vec![DiskFile {
                path: PathBuf::from("/s/vms/vm1/root.qcow2"),
                format: ImageFormat::Qcow2,
                fd: None,
            }],
            hotplug_slots: 2,
            sandbox: true,
            nic: None,
            data_disks: vec![BootDisk {
                id: "d1".into(),
                file: DiskFile {
                    path: PathBuf::from("/s/disks/d1.qcow2"),
                    format: ImageFormat::Qcow2,
                    fd: None,
                },
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
        assert!(line.contains(
            r#"{"backing":null,"driver":"qcow2","file":"root-file","node-name":"root"}"#
        ));
        assert!(line.contains("-machine q35,accel=tcg -cpu max -smp 2 -m 256M"));
        assert!(line.contains("-qmp unix:qmp.sock,server=on,wait=off"));
        assert!(line.contains("path=console.sock,server=on"));
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
        s.root_chain[0].path = PathBuf::from("/a,b/root.qcow2");
        s.sandbox = false;
        let line = joined(&s);
        assert!(line.contains("accel=kvm -cpu host"));
        assert!(line.contains(r#""filename":"/a,b/root.qcow2""#));
        assert!(!line.contains("-sandbox"));
    }

    fn blockdevs(spec: &LaunchSpec) -> Vec<serde_json::Value> {
        let a = argv(spec);
        a.windows(2)
            .filter(|w| w[0] == "-blockdev")
            .map(|w| serde_json::from_str(&w[1].to_string_lossy()).unwrap())
            .collect()
    }

    /// Issue 9, hole 3: QEMU must never resolve a backing file from a
    /// header itself. Every file of the checked chain is its own node, each
    /// format node names its backing node explicitly, the bottom one null.
    #[test]
    fn hole3_block_graph_sets_every_backing_explicitly() {
        let dir = tempfile::tempdir().unwrap();
        let open = |name: &str| {
            let p = dir.path().join(name);
            std::fs::write(&p, b"x").unwrap();
            Some(Arc::new(File::open(&p).unwrap()))
        };
        let mut s = spec();
        s.root_chain = vec![
            DiskFile {
                path: "/s/vms/vm1/root.qcow2".into(),
                format: ImageFormat::Qcow2,
                fd: open("top"),
            },
            DiskFile {
                path: "/img/mid.qcow2".into(),
                format: ImageFormat::Qcow2,
                fd: open("mid"),
            },
            DiskFile {
                path: "/img/base.img".into(),
                format: ImageFormat::Raw,
                fd: open("base"),
            },
        ];
        let nodes = blockdevs(&s);
        // Bottom first: every node exists before one names it.
        let names: Vec<&str> = nodes
            .iter()
            .map(|n| n["node-name"].as_str().unwrap())
            .collect();
        assert_eq!(
            &names[..6],
            [
                "root-b2-file",
                "root-b2",
                "root-b1-file",
                "root-b1",
                "root-file",
                "root"
            ]
        );
        assert_eq!(nodes[1]["driver"], "raw");
        assert!(
            nodes[1].get("backing").is_none(),
            "raw has no backing option"
        );
        assert_eq!(nodes[1]["read-only"], true);
        assert_eq!(nodes[3]["backing"], "root-b2");
        assert_eq!(nodes[3]["read-only"], true);
        assert_eq!(nodes[5]["backing"], "root-b1");
        assert!(nodes[5].get("read-only").is_none());
        // Data disks: no backing at all.
        assert_eq!(nodes[7]["backing"], serde_json::Value::Null);
        assert_eq!(nodes[7]["driver"], "qcow2");
        // Files passed by descriptor, one fd set each, and nothing by path.
        let a: Vec<String> = argv(&s)
            .iter()
            .map(|x| x.to_string_lossy().into_owned())
            .collect();
        let fds = passed_fds(&s);
        assert_eq!(fds.len(), 3);
        for (set, node) in [(1, 0), (2, 2), (3, 4)] {
            assert_eq!(nodes[node]["filename"], format!("/dev/fdset/{set}"));
        }
        let add: Vec<&String> = a
            .windows(2)
            .filter(|w| w[0] == "-add-fd")
            .map(|w| &w[1])
            .collect();
        assert_eq!(add.len(), 3);
        assert_eq!(add[0], &format!("fd={},set=1", fds[2]));
        assert_eq!(add[2], &format!("fd={},set=3", fds[0]));
        assert!(!a.iter().any(|x| x.contains("/img/")), "{a:?}");
        assert_eq!(chain_node("dk-0123456789abcdef", 1).1.len(), 27);
    }
}
