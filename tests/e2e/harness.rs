//! What the end-to-end tests share: the `tiny` image built once per test
//! binary by `scripts/build_boot_disk.sh`, a running vman on a free port
//! with its own storage, and waits for console markers and states. Every
//! wait polls with a generous deadline: a TCG guest on a busy CI machine is
//! slow, and no test asserts on speed.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::common::{Server, ServerBuilder};

/// Deadline for a guest to boot or shut down under TCG.
pub const GUEST: Duration = Duration::from_secs(180);
/// Deadline for vman itself (start-up, an API state change).
pub const SERVER: Duration = Duration::from_secs(30);

static TINY: OnceLock<Result<PathBuf, String>> = OnceLock::new();

/// The `tiny` boot disk, built by the project's own script once per run.
pub fn tiny_image() -> &'static Path {
    let built = TINY.get_or_init(|| {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("e2e-tiny-{}", std::process::id()));
        fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let image = dir.join("tiny.qcow2");
        let out =
            Command::new(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/build_boot_disk.sh"))
                .args(["--flavor", "tiny", "--output"])
                .arg(&image)
                .output()
                .map_err(|e| format!("cannot run build_boot_disk.sh: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "build_boot_disk.sh --flavor tiny failed: {}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(image)
    });
    match built {
        Ok(p) => p,
        Err(e) => panic!("{e}"),
    }
}

/// A running `vman serve` (the shared harness of `tests/common`) with the
/// helpers the end-to-end tests need. Dropping it kills the guests too.
pub struct Vman {
    pub storage: PathBuf,
    pub base: String,
    server: Server,
    guard_table: String,
}

pub struct Builder {
    inner: ServerBuilder,
    guard_table: String,
}

impl Builder {
    pub fn env(mut self, key: &str, value: impl AsRef<std::ffi::OsStr>) -> Self {
        let value = value.as_ref().to_string_lossy();
        if key == "VMAN_GUARD_TABLE" {
            self.guard_table = value.to_string();
        }
        self.inner = self.inner.env(key, &value);
        self
    }

    /// Runs on this storage folder (e.g. a small tmpfs the test mounted).
    pub fn storage(mut self, dir: std::sync::Arc<tempfile::TempDir>) -> Self {
        self.inner = self.inner.storage(dir);
        self
    }

    /// `--host` (requests still go to 127.0.0.1).
    pub fn host(mut self, host: &str) -> Self {
        self.inner = self.inner.host(host);
        self
    }

    /// Sets `VMAN_API_TOKEN`; the helpers send it.
    pub fn api_token(mut self, token: &str) -> Self {
        self.inner = self.inner.api_token(token);
        self
    }

    /// The default boot disk is the tiny image.
    pub fn with_tiny_default(self) -> Self {
        let image = tiny_image().to_path_buf();
        self.env("VMAN_DEFAULT_BOOT_DISK", image)
    }

    pub fn start(self) -> Vman {
        let server = self.inner.start();
        let storage = server.storage_path().to_path_buf();
        fs::create_dir_all(storage.join("templates")).expect("templates folder");
        Vman {
            base: server.url(""),
            storage,
            server,
            guard_table: self.guard_table,
        }
    }
}

impl Vman {
    /// Each vman of a test gets its own nftables guard table (as root its
    /// user-mode guests need one), removed when the test drops it: a killed
    /// vman leaves its table, and tests running at once must not remove
    /// each other's.
    pub fn builder() -> Builder {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let table = format!("vman_e2e_{}_{n}", std::process::id());
        Builder {
            inner: Server::builder().env("VMAN_GUARD_TABLE", &table),
            guard_table: table,
        }
    }

    pub fn logs(&self) -> Vec<String> {
        self.server.logs()
    }

    pub fn log_count(&self, needle: &str) -> usize {
        self.logs().iter().filter(|l| l.contains(needle)).count()
    }

    /// A clean stop (SIGTERM); asserts vman exited with success.
    pub fn sigterm(&mut self) {
        if self.server.is_running() {
            let status = self.server.sigterm();
            assert!(status.success(), "vman exit after SIGTERM: {status:?}");
        }
    }

    /// SIGKILL, as a crash would.
    pub fn kill9(&mut self) {
        self.server.reap_dead();
        if self.server.is_running() {
            self.server.kill9();
        }
    }

    /// A crash, then a start again on the same storage and database; returns
    /// once the API listens and start-up adoption is done.
    pub fn restart(&mut self) {
        self.restart_listening();
        self.wait_recovered();
    }

    /// A crash, then a start again; returns as soon as the API listens
    /// (adoption of running QEMUs may still be under way).
    pub fn restart_listening(&mut self) {
        self.kill9();
        self.server.restart();
        self.base = self.server.url("");
    }

    /// Waits until start-up adoption is done: the observer starts after it,
    /// so its first pass marks the end.
    pub fn wait_recovered(&self) {
        let start = Instant::now();
        while self.get("/observer/status")["passes"].as_u64().unwrap_or(0) == 0 {
            assert!(
                start.elapsed() < SERVER,
                "start-up adoption not done after {SERVER:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn call(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let reply = self.server.request(method, path, body.as_ref());
        let body = match reply.body {
            Value::Null if !reply.text.is_empty() => Value::String(reply.text),
            other => other,
        };
        (reply.status, body)
    }

    /// Like `call`, but a transport error (vman gone mid-request) is None.
    pub fn try_call(&self, method: &str, path: &str, body: Option<Value>) -> Option<(u16, Value)> {
        let bytes = body.map(|j| serde_json::to_vec(&j).expect("serialize"));
        let headers: &[(&str, &str)] = if bytes.is_some() {
            &[("content-type", "application/json")]
        } else {
            &[]
        };
        let reply = self
            .server
            .try_raw(method, path, bytes.as_deref(), headers)
            .ok()?;
        Some((reply.status, reply.body))
    }

    /// The storage folder, to start another vman on it.
    pub fn storage_handle(&self) -> std::sync::Arc<tempfile::TempDir> {
        self.server.storage_handle()
    }

    pub fn get(&self, path: &str) -> Value {
        let (status, body) = self.call("GET", path, None);
        assert_eq!(status, 200, "GET {path}: {body}");
        body
    }

    pub fn post(&self, path: &str, body: Value) -> (u16, Value) {
        self.call("POST", path, Some(body))
    }

    /// A template of 1 vCPU and `ram_mib` MiB.
    pub fn template(&self, name: &str, ram_mib: u64) {
        let (s, b) = self.post(
            "/templates",
            json!({"name": name, "cpu_count": 1, "ram_mib": ram_mib}),
        );
        assert_eq!(s, 201, "{b}");
    }

    pub fn create_vm(&self, body: Value) -> (u16, Value) {
        self.post("/vms", body)
    }

    pub fn vm(&self, id: &str) -> Value {
        self.get(&format!("/vms/{id}"))
    }

    pub fn start_vm(&self, id: &str) -> (u16, Value) {
        self.post(&format!("/vms/{id}/actions/start"), json!({}))
    }

    pub fn console(&self, id: &str) -> String {
        self.get(&format!("/vms/{id}/console"))["console"]
            .as_str()
            .unwrap_or("")
            .to_owned()
    }

    pub fn type_line(&self, id: &str, line: &str) {
        let (s, b) = self.post(
            &format!("/vms/{id}/console"),
            json!({"data": format!("{line}\n")}),
        );
        assert_eq!(s, 200, "console input: {b}");
    }

    /// Waits until the console shows `marker` at least `count` times.
    pub fn wait_console(&self, id: &str, marker: &str, count: usize) {
        let start = Instant::now();
        loop {
            let console = self.console(id);
            if console.matches(marker).count() >= count {
                return;
            }
            assert!(
                start.elapsed() < GUEST,
                "no {marker:?} (x{count}) on the console of {id} after {GUEST:?}:\n{console}\nvman log:\n{}",
                self.logs().join("\n")
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until the VM's state is `state`; returns the VM.
    pub fn wait_state(&self, id: &str, state: &str, deadline: Duration) -> Value {
        self.wait_state_of(&format!("/vms/{id}"), state, deadline)
    }

    /// Waits until GET `path` shows `"state": state`; returns the object.
    pub fn wait_state_of(&self, path: &str, state: &str, deadline: Duration) -> Value {
        let start = Instant::now();
        loop {
            let obj = self.get(path);
            if obj["state"] == state {
                return obj;
            }
            assert!(
                start.elapsed() < deadline,
                "{path} not {state} after {deadline:?}: {obj}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn vm_dir(&self, id: &str) -> PathBuf {
        self.storage.join("vms").join(id)
    }
}

impl Drop for Vman {
    fn drop(&mut self) {
        self.kill9();
        // QEMU outlives vman by design; the test's guests must not.
        for (pid, _) in qemu_processes(&self.storage) {
            // SAFETY: kill(2) has no memory effects.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        // Quietly: nft may be missing (not root), the table may not exist.
        let _ = Command::new("nft")
            .args(["delete", "table", "inet", &self.guard_table])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
    }
}

/// QEMU processes whose command line points into `storage`.
pub fn qemu_processes(storage: &Path) -> Vec<(i32, String)> {
    let needle = storage.to_string_lossy().into_owned();
    let mut found = Vec::new();
    for entry in fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(raw) = fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&raw).replace('\0', " ");
        if cmd.contains("qemu-system") && cmd.contains(&needle) {
            found.push((pid, cmd));
        }
    }
    found
}

/// `qemu-io` on an image: writes or checks a byte pattern at an offset.
pub fn qemu_io(image: &Path, command: &str) -> bool {
    Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", command])
        .arg(image)
        .output()
        .map(|o| {
            o.status.success()
                && !String::from_utf8_lossy(&o.stdout).contains("Pattern verification failed")
        })
        .unwrap_or(false)
}
