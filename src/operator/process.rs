//! QEMU processes: spawning them so they outlive vman, recognising them
//! again after a restart, and waiting for their exit without polling.

use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::time::Duration;

use tokio::io::unix::AsyncFd;
use tokio::process::{Child, Command};

use super::cgroup::Placement;

/// How a QEMU process ended, as far as we can know. A process we spawned
/// ourselves is our child and yields its status; one adopted after a vman
/// restart is not, and only its disappearance is seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    Code(i32),
    Signal(i32),
    Unknown,
}

impl std::fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Code(c) => write!(f, "exit code {c}"),
            Self::Signal(s) => write!(f, "killed by signal {s}"),
            Self::Unknown => f.write_str("exit status unknown (adopted process)"),
        }
    }
}

/// Starts QEMU in its own session (a Ctrl-C to vman does not reach it, and
/// when vman dies while QEMU is stopped, e.g. by SIGSTOP, the kernel sends
/// it no SIGHUP as it would to a stopped member of a newly orphaned process
/// group of vman's session), in the folder `cwd`, with stdout and stderr
/// appended to `log`. It is not killed when vman exits. `placement` lowers
/// its CPU weight: a nice value set in the child before exec (inherited by
/// every thread), or its cgroup, joined right after the fork
/// (`cgroup.procs` moves all threads).
pub fn spawn(
    binary: &Path,
    args: &[std::ffi::OsString],
    cwd: &Path,
    log: &Path,
    placement: &Placement,
) -> io::Result<Child> {
    spawn_keeping(binary, args, cwd, log, placement, Vec::new())
}

/// Lets a child inherit `fds`: clears their close-on-exec flag in the child
/// only (between fork and exec), so no other process vman spawns meanwhile
/// gets them. Call from a `pre_exec` closure.
pub fn inherit_fds(fds: &[RawFd]) -> io::Result<()> {
    for &fd in fds {
        // SAFETY: fcntl is async-signal-safe; F_SETFD on an fd number.
        if unsafe { libc::fcntl(fd, libc::F_SETFD, 0) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// `spawn`, with `fds` inherited by QEMU (for `-add-fd`).
pub fn spawn_keeping(
    binary: &Path,
    args: &[std::ffi::OsString],
    cwd: &Path,
    log: &Path,
    placement: &Placement,
    fds: Vec<RawFd>,
) -> io::Result<Child> {
    let out = OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(|e| io::Error::new(e.kind(), format!("cannot open {}: {e}", log.display())))?;
    let err = out.try_clone()?;
    let mut cmd = Command::new(binary);
    if !fds.is_empty() {
        // SAFETY: the closure only calls fcntl (async-signal-safe) on
        // numbers in a vector allocated before the fork.
        unsafe {
            cmd.pre_exec(move || inherit_fds(&fds));
        }
    }
    cmd.args(args)
        .current_dir(cwd)
        .stdin(std::process::Stdio::null())
        .stdout(out)
        .stderr(err)
        .kill_on_drop(false);
    // SAFETY: setsid(2) is async-signal-safe and touches no memory of the
    // parent; it runs in the child between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    if let Some(nice) = placement.nice {
        // SAFETY: the closure only calls setpriority(2), which is
        // async-signal-safe, and touches no memory of the parent.
        unsafe {
            cmd.pre_exec(move || {
                libc::setpriority(libc::PRIO_PROCESS, 0, nice);
                Ok(())
            });
        }
    }
    let child = cmd.spawn()?;
    if let (Some(group), Some(pid)) = (&placement.group, child.id()) {
        if let Err(e) = group.join(pid as i32) {
            tracing::warn!(
                "QEMU pid {pid}: cannot join cgroup {}: {e}",
                group.dir.display()
            );
        }
    }
    Ok(child)
}

/// Something whose exit can be awaited: our child, or an adopted pid.
pub enum Watch {
    Child(Child),
    Pidfd(AsyncFd<OwnedFd>),
}

impl Watch {
    /// Opens a pidfd on `pid`; fails when the process is already gone.
    pub fn adopt(pid: i32) -> io::Result<Self> {
        // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the syscall returned a fresh fd that nothing else owns.
        let owned = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        // SAFETY: the AsyncFd owns the OwnedFd, so the fd stays open (and is
        // not reused) for as long as it is registered.
        let fd = unsafe { AsyncFd::register_with_interest(owned, tokio::io::Interest::READABLE)? };
        Ok(Self::Pidfd(fd))
    }

    /// Resolves when the process has exited (a pidfd turns readable at once).
    pub async fn wait(self) -> ExitStatus {
        match self {
            Self::Child(mut child) => match child.wait().await {
                Ok(status) => match (status.code(), status.signal()) {
                    (Some(c), _) => ExitStatus::Code(c),
                    (None, Some(s)) => ExitStatus::Signal(s),
                    _ => ExitStatus::Unknown,
                },
                Err(_) => ExitStatus::Unknown,
            },
            Self::Pidfd(fd) => {
                let _ = fd.readable().await;
                let _ = fd.get_ref().as_raw_fd();
                ExitStatus::Unknown
            }
        }
    }
}

/// The command line of a live process, split at NULs.
pub fn cmdline(pid: i32) -> Option<Vec<String>> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    if raw.is_empty() {
        return None; // a zombie or a kernel thread
    }
    Some(
        raw.split(|b| *b == 0)
            .filter(|s| !s.is_empty())
            .map(|s| String::from_utf8_lossy(s).into_owned())
            .collect(),
    )
}

/// True when `args` are the command line of the QEMU of the VM whose pid
/// file is `pid_file`: `-pidfile` names it (vman gives it by absolute path),
/// or, for a QEMU started by an older vman, `-qmp` names its socket `qmp`
/// by absolute path. This, not the pid file, is what identifies a VM's QEMU.
pub fn is_vm_qemu(args: &[String], pid_file: &Path, qmp: &Path) -> bool {
    let pid_arg = pid_file.to_string_lossy();
    let old_qmp = format!(
        "unix:{},server=on,wait=off",
        qmp.to_string_lossy().replace(',', ",,")
    );
    args.windows(2).any(|w| {
        (w[0] == "-pidfile" && w[1] == pid_arg.as_ref()) || (w[0] == "-qmp" && w[1] == old_qmp)
    })
}

/// True when `pid` is alive and runs the QEMU of the VM whose pid file is
/// `pid_file` — the check that keeps a reused pid from being mistaken for
/// our VM.
pub fn is_our_qemu(pid: i32, pid_file: &Path, qmp: &Path) -> bool {
    cmdline(pid).is_some_and(|args| is_vm_qemu(&args, pid_file, qmp))
}

/// Every live process whose command line is the QEMU of the VM whose pid
/// file is `pid_file`, found by scanning `/proc` (the pid file may be gone).
pub fn find_vm_qemus(pid_file: &Path, qmp: &Path) -> Vec<i32> {
    let needle = pid_file.to_string_lossy().into_owned();
    let old = qmp.to_string_lossy().into_owned();
    let mut found: Vec<i32> = find_by_arg(&needle)
        .into_iter()
        .chain(find_by_arg(&old))
        .filter(|(_, args)| is_vm_qemu(args, pid_file, qmp))
        .map(|(pid, _)| pid)
        .collect();
    found.sort_unstable();
    found.dedup();
    found
}

/// The VM folder name under `prefix` (`{storage}/vms/`) that a QEMU command
/// line belongs to: its `-pidfile`, else any argument inside the folder.
pub fn owner_under(args: &[String], prefix: &str) -> Option<String> {
    let in_folder = |a: &str| {
        a.split(prefix)
            .nth(1)
            .and_then(|rest| rest.split('/').next())
            .filter(|o| !o.is_empty())
            .map(str::to_owned)
    };
    args.windows(2)
        .find(|w| w[0] == "-pidfile")
        .and_then(|w| in_folder(&w[1]))
        .or_else(|| args.iter().find_map(|a| in_folder(a)))
}

/// Kills `pid` with SIGKILL if, and only if, it still runs this VM's QEMU,
/// and waits (up to `limit`) until it is gone. True when it is gone.
pub async fn kill_vm_qemu(pid: i32, pid_file: &Path, qmp: &Path, limit: Duration) -> bool {
    let Some(pid) = Pid::new(pid) else {
        return true; // 0, 1 or negative: no QEMU of ours
    };
    let watch = match Watch::adopt(pid.get()) {
        Ok(w) => w,
        Err(_) => return !is_our_qemu(pid.get(), pid_file, qmp),
    };
    // Checked after the pidfd is open: the pid cannot be reused under us.
    if !is_our_qemu(pid.get(), pid_file, qmp) {
        return true;
    }
    if let Err(e) = kill(pid, libc::SIGKILL) {
        tracing::warn!("kill -9 {pid}: {e}");
    }
    tokio::time::timeout(limit, watch.wait()).await.is_ok()
}

/// Reads a pid file written by QEMU.
pub fn read_pid(path: &Path) -> Option<Pid> {
    Pid::new(std::fs::read_to_string(path).ok()?.trim().parse().ok()?)
}

/// A process id that may be signalled: greater than 1, so never 0 (our
/// own process group), -1 (every process we may signal) or 1 (init).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Pid(i32);

impl Pid {
    /// `raw` as a `Pid`; None when it is 1 or less.
    pub fn new(raw: i32) -> Option<Self> {
        (raw > 1).then_some(Self(raw))
    }

    pub fn get(self) -> i32 {
        self.0
    }
}

impl std::fmt::Display for Pid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// Sends `signal` to the one process `pid`.
pub fn kill(pid: Pid, signal: i32) -> io::Result<()> {
    // SAFETY: kill(2) has no memory effects; `Pid` is > 1, so this signals
    // one process, never a group or every process.
    if unsafe { libc::kill(pid.get(), signal) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Every process whose command line mentions `needle` (used by the observer
/// to find QEMU processes running from our storage).
pub fn find_by_arg(needle: &str) -> Vec<(i32, Vec<String>)> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(|pid| Some((pid, cmdline(pid)?)))
        .filter(|(_, args)| args.iter().any(|a| a.contains(needle)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn pidfd_sees_an_exit_and_a_reused_pid_is_not_ours() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("spawn");
        let pid = child.id() as i32;
        assert!(!is_our_qemu(
            pid,
            Path::new("/x/qemu.pid"),
            Path::new("/x/qmp.sock")
        ));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !cmdline(pid).is_some_and(|c| c[0].ends_with("sleep")) {
            assert!(std::time::Instant::now() < deadline, "no cmdline for {pid}");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let watch = Watch::adopt(pid).expect("pidfd");
        kill(Pid::new(pid).expect("pid > 1"), libc::SIGKILL).expect("kill");
        let _ = child.wait();
        assert_eq!(watch.wait().await, ExitStatus::Unknown);
        assert!(Watch::adopt(pid).is_err() || cmdline(pid).is_none());
    }

    #[test]
    fn a_pid_of_one_or_less_cannot_be_killed() {
        for raw in [i32::MIN, -1, 0, 1] {
            assert_eq!(Pid::new(raw), None, "{raw}");
        }
        assert_eq!(Pid::new(2).map(Pid::get), Some(2));
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("qemu.pid");
        for (text, want) in [
            ("1\n", None),
            ("-1", None),
            ("0", None),
            ("4242\n", Some(4242)),
        ] {
            std::fs::write(&file, text).expect("write");
            assert_eq!(read_pid(&file).map(Pid::get), want, "{text:?}");
        }
    }

    #[test]
    fn a_vm_qemu_is_known_by_its_pid_file_argument_or_old_absolute_qmp() {
        let pid_file = Path::new("/s/vms/a/qemu.pid");
        let qmp = Path::new("/s/vms/a/qmp.sock");
        let args = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let new = args(&[
            "qemu",
            "-pidfile",
            "/s/vms/a/qemu.pid",
            "-qmp",
            "unix:qmp.sock",
        ]);
        assert!(is_vm_qemu(&new, pid_file, qmp));
        let other = args(&["qemu", "-pidfile", "/s/vms/ab/qemu.pid"]);
        assert!(!is_vm_qemu(&other, pid_file, qmp));
        let old = args(&["qemu", "-qmp", "unix:/s/vms/a/qmp.sock,server=on,wait=off"]);
        assert!(is_vm_qemu(&old, pid_file, qmp));
        assert_eq!(owner_under(&new, "/s/vms/").as_deref(), Some("a"));
        assert_eq!(owner_under(&old, "/s/vms/").as_deref(), Some("a"));
        assert_eq!(owner_under(&args(&["qemu", "-m", "1"]), "/s/vms/"), None);
    }

    #[tokio::test]
    async fn a_nice_placement_is_set_before_exec() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = dir.path().join("log");
        let placement = Placement {
            group: None,
            nice: Some(7),
        };
        let child = spawn(
            Path::new("sh"),
            &["-c".into(), "cut -d' ' -f19 /proc/self/stat".into()],
            dir.path(),
            &log,
            &placement,
        )
        .expect("spawn");
        assert_eq!(Watch::Child(child).wait().await, ExitStatus::Code(0));
        assert_eq!(std::fs::read_to_string(&log).expect("log"), "7\n");
    }

    #[tokio::test]
    async fn child_exit_status_is_reported() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = dir.path().join("log");
        let child = spawn(
            Path::new("sh"),
            &["-c".into(), "echo hi; exit 3".into()],
            dir.path(),
            &log,
            &Placement::default(),
        )
        .expect("spawn");
        assert_eq!(Watch::Child(child).wait().await, ExitStatus::Code(3));
        assert_eq!(std::fs::read_to_string(&log).expect("log"), "hi\n");
    }
}
