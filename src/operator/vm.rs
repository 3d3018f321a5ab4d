//! One running QEMU: launching it until QMP answers, adopting it after a vman
//! restart, stopping it (ACPI, then `quit`, then SIGKILL), and learning how
//! it ended. The exit task of each VM is the only place that notices an exit;
//! everybody else waits on its `watch` channel.

use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::console::Console;
use super::process::{self, ExitStatus, Watch};
use super::qemu::{self, LaunchSpec, VmPaths};
use super::qmp::Qmp;
use crate::model::StopMethod;

/// How long QEMU may take to open its QMP socket after being spawned.
const LAUNCH_TIMEOUT: Duration = Duration::from_secs(30);

/// How often a graceful stop presses the power button again.
const POWER_BUTTON_REPEAT: Duration = Duration::from_secs(3);

#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error("cannot run {binary}: {source}")]
    Spawn {
        binary: String,
        source: std::io::Error,
    },
    #[error("cannot create the VM folder {path}: {source}")]
    Folder {
        path: String,
        source: std::io::Error,
    },
    #[error("QEMU failed to start: {0}")]
    Failed(String),
    #[error("a QEMU of this VM already runs (pid {0}); stop or delete the VM first")]
    AlreadyRunning(i32),
}

#[derive(Debug, thiserror::Error)]
pub enum AdoptError {
    #[error("QEMU pid {0} is gone")]
    Gone(i32),
    #[error("QEMU pid {pid} does not answer on QMP: {reason}")]
    NoQmp { pid: i32, reason: String },
}

/// How a QEMU process ended.
#[derive(Debug, Clone)]
pub struct ExitInfo {
    pub status: ExitStatus,
    /// QEMU reported a SHUTDOWN caused by the guest (power-off from inside,
    /// or its answer to the ACPI button).
    pub guest_poweroff: bool,
    /// vman had asked for the stop.
    pub requested: bool,
}

impl ExitInfo {
    /// A clean end: asked for, or the guest powered itself off.
    pub fn clean(&self) -> bool {
        self.requested
            || (self.guest_poweroff
                && matches!(self.status, ExitStatus::Code(0) | ExitStatus::Unknown))
    }
}

/// A live QEMU that vman manages.
pub struct Running {
    pub pid: i32,
    pub qmp: Arc<Qmp>,
    pub console: Option<Arc<Console>>,
    pub paths: VmPaths,
    exit: watch::Receiver<Option<ExitInfo>>,
    stop_requested: Arc<AtomicBool>,
}

impl Running {
    /// Waits for the process to end (at once when it already has).
    pub async fn wait_exit(&self) -> ExitInfo {
        let mut rx = self.exit.clone();
        let seen = rx.wait_for(Option::is_some).await.map(|info| info.clone());
        match seen {
            Ok(Some(info)) => info,
            Ok(None) | Err(_) => ExitInfo {
                status: ExitStatus::Unknown,
                guest_poweroff: false,
                requested: self.stop_requested.load(Ordering::SeqCst),
            },
        }
    }

    pub fn has_exited(&self) -> bool {
        self.exit.borrow().is_some()
    }

    async fn wait_exit_for(&self, limit: Duration) -> bool {
        tokio::time::timeout(limit, self.wait_exit()).await.is_ok()
    }

    /// Presses the ACPI power button and waits up to `timeout` for the guest
    /// to power off. The button is pressed again every few seconds: a guest
    /// still booting has no handler yet and drops the first press.
    async fn press_power_button(&self, timeout: Duration) -> bool {
        let presses = async {
            loop {
                if let Err(e) = self.qmp.execute("system_powerdown", None).await {
                    // QMP is gone: QEMU exits or is stuck; the wait decides.
                    tracing::warn!("QEMU pid {}: system_powerdown failed: {e}", self.pid);
                    return self.wait_exit_for(timeout).await;
                }
                if self.wait_exit_for(POWER_BUTTON_REPEAT).await {
                    return true;
                }
            }
        };
        // One hard deadline over all presses and waits.
        tokio::time::timeout(timeout, presses)
            .await
            .unwrap_or(false)
    }

    /// Stops QEMU: ACPI power button (unless `force`), up to `timeout`; then
    /// QMP `quit` (0.5 s to answer, 0.7 s to exit); then SIGKILL (0.7 s).
    /// Never takes longer than `timeout` + 2 s.
    pub async fn stop(&self, force: bool, timeout: Duration) -> StopMethod {
        self.stop_requested.store(true, Ordering::SeqCst);
        if self.has_exited() {
            return StopMethod::AlreadyExited;
        }
        if !force && self.press_power_button(timeout).await {
            return StopMethod::Acpi;
        }
        let _ =
            tokio::time::timeout(Duration::from_millis(500), self.qmp.execute("quit", None)).await;
        if self.wait_exit_for(Duration::from_millis(700)).await {
            return StopMethod::Quit;
        }
        match process::Pid::new(self.pid) {
            Some(pid) => {
                if let Err(e) = process::kill(pid, libc::SIGKILL) {
                    tracing::warn!("kill -9 {pid}: {e}");
                }
            }
            None => tracing::error!("QEMU pid {} cannot be signalled", self.pid),
        }
        if !self.wait_exit_for(Duration::from_millis(700)).await {
            tracing::error!("QEMU pid {} still there after SIGKILL", self.pid);
        }
        StopMethod::Killed
    }
}

/// Removes the pid file and sockets of a QEMU that is gone.
pub fn remove_runtime_files(paths: &VmPaths) {
    for f in paths.runtime_files() {
        if let Err(e) = std::fs::remove_file(f) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!("cannot remove {}: {e}", f.display());
            }
        }
    }
}

/// What QEMU wrote to its log since `offset`, trimmed to the useful end.
fn log_since(log: &Path, offset: u64) -> String {
    let mut text = String::new();
    if let Ok(mut f) = std::fs::File::open(log) {
        if f.seek(SeekFrom::Start(offset)).is_ok() {
            let _ = f.take(64 * 1024).read_to_string(&mut text);
        }
    }
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(10)..].join("\n")
}

/// Starts QEMU and returns once QMP answered. On failure nothing is left:
/// no process, no pid file, no socket.
pub async fn launch(
    binary: &Path,
    spec: &LaunchSpec,
    console_max: u64,
) -> Result<Arc<Running>, LaunchError> {
    let paths = &spec.paths;
    std::fs::create_dir_all(&paths.dir)
        .and_then(|()| {
            // Not for the QEMU user's eyes (console log, root disk).
            std::fs::set_permissions(&paths.dir, std::fs::Permissions::from_mode(0o700))
        })
        .map_err(|source| LaunchError::Folder {
            path: paths.dir.display().to_string(),
            source,
        })?;
    // Never a second QEMU for one VM, whatever the pid file says.
    if let Some(pid) = find(paths) {
        return Err(LaunchError::AlreadyRunning(pid));
    }
    remove_runtime_files(paths);
    let log_offset = std::fs::metadata(&paths.log).map(|m| m.len()).unwrap_or(0);
    let args = qemu::argv(spec);
    let mut child = process::spawn_keeping(
        binary,
        &args,
        &paths.dir,
        &paths.log,
        &spec.placement,
        qemu::passed_fds(spec),
    )
    .map_err(|source| LaunchError::Spawn {
        binary: binary.display().to_string(),
        source,
    })?;
    let pid = child.id().map(|p| p as i32).unwrap_or(0);
    let started = Instant::now();
    let qmp = loop {
        if let Ok(Some(status)) = child.try_wait() {
            remove_runtime_files(paths);
            let why = log_since(&paths.log, log_offset);
            return Err(LaunchError::Failed(if why.is_empty() {
                format!("QEMU exited at once ({status})")
            } else {
                why
            }));
        }
        if let Ok(qmp) = Qmp::connect(&paths.qmp).await {
            break qmp;
        }
        if started.elapsed() > LAUNCH_TIMEOUT {
            let _ = child.start_kill();
            let _ = child.wait().await;
            remove_runtime_files(paths);
            return Err(LaunchError::Failed(format!(
                "QEMU did not answer on QMP within {}s; {}",
                LAUNCH_TIMEOUT.as_secs(),
                log_since(&paths.log, log_offset)
            )));
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    };
    let console = match Console::attach(&paths.console_sock, &paths.console, console_max).await {
        Ok(c) => Some(c),
        Err(e) => {
            tracing::warn!("vm {}: console not attached: {e}", spec.vm_id);
            None
        }
    };
    Ok(watch_exit(
        pid,
        Watch::Child(child),
        Arc::new(qmp),
        console,
        paths.clone(),
        spec.placement.group.as_ref().map(|g| g.dir.clone()),
    ))
}

/// The live QEMU of this VM, if any: the pid file's process when its
/// command line is this VM's, else whatever process in `/proc` has this VM's
/// command line (the pid file may be gone with the folder).
pub fn find(paths: &VmPaths) -> Option<i32> {
    if let Some(pid) = process::read_pid(&paths.pid).map(process::Pid::get) {
        if process::is_our_qemu(pid, &paths.pid, &paths.qmp) {
            return Some(pid);
        }
    }
    process::find_vm_qemus(&paths.pid, &paths.qmp)
        .into_iter()
        .next()
}

/// `msg` followed by the last console lines of the VM, so the user sees why
/// without hunting for files.
pub fn with_console_tail(mut msg: String, paths: &VmPaths) -> String {
    let tail = super::console::last_lines(&paths.console, 5);
    if !tail.is_empty() {
        msg.push_str("; last console lines:\n");
        msg.push_str(&tail);
    }
    msg
}

/// Every live QEMU process running from a VM folder under `prefix`
/// (`{storage}/vms/`), with the folder's name (the VM id it belongs to,
/// whether or not that VM exists): the observer's process scan.
pub fn qemus_under(prefix: &str) -> Vec<(i32, String)> {
    process::find_by_arg(prefix)
        .into_iter()
        .filter(|(_, args)| args.first().is_some_and(|a| a.contains("qemu-system")))
        .map(|(pid, args)| (pid, process::owner_under(&args, prefix).unwrap_or_default()))
        .collect()
}

/// Takes over `pid`, a QEMU of this VM left running by an earlier vman
/// (found by `find`): its command line must still be this VM's, and it must
/// answer on QMP within `limit` (a stopped or hung QEMU does not).
pub async fn adopt(
    pid: i32,
    paths: &VmPaths,
    console_max: u64,
    limit: Duration,
) -> Result<Arc<Running>, AdoptError> {
    let watch = Watch::adopt(pid).map_err(|_| AdoptError::Gone(pid))?;
    // Checked after the pidfd is open, so the pid cannot be reused under us.
    if !process::is_our_qemu(pid, &paths.pid, &paths.qmp) {
        return Err(AdoptError::Gone(pid));
    }
    let qmp = match tokio::time::timeout(limit, Qmp::connect(&paths.qmp)).await {
        Ok(Ok(qmp)) => qmp,
        Ok(Err(e)) => {
            return Err(AdoptError::NoQmp {
                pid,
                reason: e.to_string(),
            })
        }
        Err(_) => {
            return Err(AdoptError::NoQmp {
                pid,
                reason: format!("no answer within {} s", limit.as_secs()),
            })
        }
    };
    let console = tokio::time::timeout(
        limit,
        Console::attach(&paths.console_sock, &paths.console, console_max),
    )
    .await
    .ok()
    .and_then(Result::ok);
    Ok(watch_exit(
        pid,
        watch,
        Arc::new(qmp),
        console,
        paths.clone(),
        None,
    ))
}

/// Spawns the exit task: it waits for the process, lets QMP deliver the
/// last events, removes the runtime files (and the process's cgroup, when
/// known) and publishes the `ExitInfo`.
fn watch_exit(
    pid: i32,
    watch: Watch,
    qmp: Arc<Qmp>,
    console: Option<Arc<Console>>,
    paths: VmPaths,
    group: Option<std::path::PathBuf>,
) -> Arc<Running> {
    let (tx, rx) = watch::channel(None);
    let stop_requested = Arc::new(AtomicBool::new(false));
    let running = Arc::new(Running {
        pid,
        qmp: qmp.clone(),
        console,
        paths: paths.clone(),
        exit: rx,
        stop_requested: stop_requested.clone(),
    });
    tokio::spawn(async move {
        let status = watch.wait().await;
        // The SHUTDOWN event was sent before the exit; read it to the end.
        let _ = tokio::time::timeout(Duration::from_millis(500), qmp.closed()).await;
        let guest_poweroff = qmp
            .last_shutdown()
            .is_some_and(|d| d["guest"].as_bool() == Some(true));
        // Only while no other QEMU of this VM runs (a new start may already
        // have launched one): the files are then its.
        if find(&paths).is_none() {
            remove_runtime_files(&paths);
        }
        if let Some(group) = group {
            let _ = std::fs::remove_dir(group);
        }
        let _ = tx.send(Some(ExitInfo {
            status,
            guest_poweroff,
            requested: stop_requested.load(Ordering::SeqCst),
        }));
    });
    running
}
