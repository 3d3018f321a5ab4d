//! The passt daemon of a user-mode VM (`VMAN_USER_NET=passt`), supervised
//! like QEMU: started before QEMU, connected to it by a socketpair (passt
//! gets one end with `--fd`, QEMU the other with `-netdev stream,addr.type=fd`:
//! a root passt drops to its user `VMAN_PASST_USER` before it would bind a
//! socket path, and the VM folder is closed to that user), its pid in
//! `{vm}/passt.pid`, its log in `{vm}/passt.log` (the absolute `-l` path is
//! what identifies a VM's passt in the process table, as `-pidfile` does for
//! QEMU). passt exits by itself when QEMU closes its end; vman stops it
//! after QEMU in any case, finds it again after a restart, and the observer
//! stops one whose QEMU is gone.

use std::ffi::OsString;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::cgroup::Placement;
use super::process::{self, Pid, Watch};
use crate::model::{PortForward, Protocol};

/// The guest's address, gateway and prefix on passt's link.
pub const GUEST_IP: &str = "10.0.2.15";
pub const GATEWAY: &str = "10.0.2.2";
pub const PREFIX: &str = "24";

/// The passt files of a VM folder.
pub fn pid_file(dir: &Path) -> PathBuf {
    dir.join("passt.pid")
}

pub fn log_file(dir: &Path) -> PathBuf {
    dir.join("passt.log")
}

#[derive(Debug, thiserror::Error)]
pub enum PasstError {
    #[error("cannot run {binary} (VMAN_USER_NET=passt needs the passt package): {source}")]
    Spawn {
        binary: String,
        source: std::io::Error,
    },
    #[error("cannot make the passt socket pair: {0}")]
    Socket(std::io::Error),
    #[error("passt exited at once: {0}")]
    Exited(String),
}

/// Checks at start-up that `binary` runs (VMAN_USER_NET=passt).
pub fn check(binary: &Path) -> Result<(), PasstError> {
    std::process::Command::new(binary)
        .arg("--version")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .map(|_| ())
        .map_err(|source| PasstError::Spawn {
            binary: binary.display().to_string(),
            source,
        })
}

/// What passt needs for one VM.
#[derive(Debug, Clone)]
pub struct PasstSpec {
    pub dir: PathBuf,
    pub forwards: Vec<PortForward>,
    /// `--runas` (root only).
    pub run_as: Option<String>,
}

/// `-t`/`-u` value of a forward: `127.0.0.1/10022:22`.
fn port_spec(f: &PortForward) -> String {
    format!("{}/{}:{}", f.host_address, f.host_port, f.guest_port)
}

/// The argument vector (without the binary); `fd` is passt's socket end.
pub fn argv(spec: &PasstSpec, fd: i32) -> Vec<OsString> {
    let mut a: Vec<String> = vec![
        "-f".into(),
        "-q".into(),
        "--fd".into(),
        fd.to_string(),
        // The gateway is not the host's loopback (passt's default maps it).
        "--no-map-gw".into(),
        "-a".into(),
        GUEST_IP.into(),
        "-n".into(),
        PREFIX.into(),
        "-g".into(),
        GATEWAY.into(),
    ];
    for f in &spec.forwards {
        a.push(
            match f.protocol {
                Protocol::Tcp => "-t",
                Protocol::Udp => "-u",
            }
            .into(),
        );
        a.push(port_spec(f));
    }
    if let Some(user) = &spec.run_as {
        a.push("--runas".into());
        a.push(user.clone());
    }
    a.push("-l".into());
    a.push(log_file(&spec.dir).to_string_lossy().into_owned());
    a.into_iter().map(OsString::from).collect()
}

/// A started passt: its pid and QEMU's end of the socket pair.
#[derive(Debug)]
pub struct Started {
    pub pid: i32,
    pub qemu_end: OwnedFd,
}

/// Starts passt for the VM in `spec.dir` (its own session: it outlives
/// vman like QEMU) and writes its pid file. Returns once passt runs.
pub async fn spawn(binary: &Path, spec: &PasstSpec) -> Result<Started, PasstError> {
    let (ours, theirs) = UnixStream::pair().map_err(PasstError::Socket)?;
    let theirs: OwnedFd = theirs.into();
    let args = argv(spec, theirs.as_raw_fd());
    let out = spec.dir.join("passt.out");
    let mut child = process::spawn_keeping(
        binary,
        &args,
        &spec.dir,
        &out,
        &Placement::default(),
        vec![theirs.as_raw_fd()],
    )
    .map_err(|source| PasstError::Spawn {
        binary: binary.display().to_string(),
        source,
    })?;
    drop(theirs);
    let pid = child.id().map(|p| p as i32).unwrap_or(0);
    // passt checks its options and sets up before it serves: an error
    // shows as an early exit.
    tokio::time::sleep(Duration::from_millis(100)).await;
    if let Ok(Some(status)) = child.try_wait() {
        let text = std::fs::read_to_string(&out).unwrap_or_default();
        let why: Vec<&str> = text
            .lines()
            .filter(|l| !l.starts_with("Failed to send") && !l.trim().is_empty())
            .collect();
        return Err(PasstError::Exited(format!(
            "{status}; {}",
            why[why.len().saturating_sub(5)..].join("; ")
        )));
    }
    if let Err(e) = std::fs::write(pid_file(&spec.dir), format!("{pid}\n")) {
        tracing::warn!("cannot write {}: {e}", pid_file(&spec.dir).display());
    }
    // Reaped by a task: the pid stays in the pid file for `find`.
    tokio::spawn(async move {
        let _ = child.wait().await;
    });
    Ok(Started {
        pid,
        qemu_end: ours.into(),
    })
}

/// True when `args` are the command line of the passt of the VM folder
/// `dir` (its absolute `-l` log path).
pub fn is_vm_passt(args: &[String], dir: &Path) -> bool {
    let log = log_file(dir).to_string_lossy().into_owned();
    args.first().is_some_and(|a| a.contains("passt"))
        && args.windows(2).any(|w| w[0] == "-l" && w[1] == log)
}

/// The live passt of the VM folder `dir`: the pid file's process when its
/// command line is this VM's, else a `/proc` scan.
pub fn find(dir: &Path) -> Option<i32> {
    if let Some(pid) = process::read_pid(&pid_file(dir)).map(Pid::get) {
        if process::cmdline(pid).is_some_and(|a| is_vm_passt(&a, dir)) {
            return Some(pid);
        }
    }
    let log = log_file(dir).to_string_lossy().into_owned();
    process::find_by_arg(&log)
        .into_iter()
        .find(|(_, args)| is_vm_passt(args, dir))
        .map(|(pid, _)| pid)
}

/// Every live passt running for a VM folder under `prefix`
/// (`{storage}/vms/`), with the folder's name.
pub fn passts_under(prefix: &str) -> Vec<(i32, String)> {
    process::find_by_arg(prefix)
        .into_iter()
        .filter(|(_, args)| args.first().is_some_and(|a| a.contains("passt")))
        .filter_map(|(pid, args)| {
            let owner = args
                .windows(2)
                .find(|w| w[0] == "-l")
                .and_then(|w| w[1].strip_prefix(prefix))
                .and_then(|rest| rest.split('/').next())
                .map(str::to_owned)?;
            Some((pid, owner))
        })
        .collect()
}

/// Stops the VM's passt if one runs (SIGTERM, then SIGKILL after 2 s) and
/// removes its pid file. True when none is left.
pub async fn stop(dir: &Path) -> bool {
    let mut gone = true;
    if let Some(pid) = find(dir).and_then(Pid::new) {
        gone = false;
        if let Ok(watch) = Watch::adopt(pid.get()) {
            // Checked after the pidfd is open: the pid cannot be reused.
            if process::cmdline(pid.get()).is_some_and(|a| is_vm_passt(&a, dir)) {
                let _ = process::kill(pid, libc::SIGTERM);
                let waited = tokio::time::timeout(Duration::from_secs(2), watch.wait()).await;
                if waited.is_err() {
                    let _ = process::kill(pid, libc::SIGKILL);
                }
            }
        }
        for _ in 0..50 {
            if find(dir).is_none() {
                gone = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    if gone {
        let _ = std::fs::remove_file(pid_file(dir));
    }
    gone
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argv_hides_the_host_behind_no_map_gw_and_lists_forwards() {
        let spec = PasstSpec {
            dir: PathBuf::from("/s/vms/a"),
            forwards: vec![
                PortForward {
                    host_port: 10022,
                    guest_port: 22,
                    protocol: Protocol::Tcp,
                    host_address: "127.0.0.1".into(),
                },
                PortForward {
                    host_port: 5353,
                    guest_port: 53,
                    protocol: Protocol::Udp,
                    host_address: "127.0.0.1".into(),
                },
            ],
            run_as: Some("vman-qemu".into()),
        };
        let a: Vec<String> = argv(&spec, 7)
            .into_iter()
            .map(|s| s.into_string().expect("utf8"))
            .collect();
        let joined = a.join(" ");
        assert_eq!(
            joined,
            "-f -q --fd 7 --no-map-gw -a 10.0.2.15 -n 24 -g 10.0.2.2 \
             -t 127.0.0.1/10022:22 -u 127.0.0.1/5353:53 --runas vman-qemu -l /s/vms/a/passt.log"
        );
        let mut cmd = vec!["passt".to_owned()];
        cmd.extend(a);
        assert!(is_vm_passt(&cmd, Path::new("/s/vms/a")));
        assert!(!is_vm_passt(&cmd, Path::new("/s/vms/b")));
        let no_root = PasstSpec {
            run_as: None,
            ..spec
        };
        assert!(!argv(&no_root, 3).iter().any(|a| a == "--runas"));
    }
}
