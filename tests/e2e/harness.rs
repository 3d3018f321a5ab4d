//! What the end-to-end tests share: the `tiny` image built once per test
//! binary by `scripts/build_boot_disk.sh`, a running vman on a free port
//! with its own storage, and waits for console markers and states. Every
//! wait polls with a generous deadline: a TCG guest on a busy CI machine is
//! slow, and no test asserts on speed.

use std::fs;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tempfile::TempDir;

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

/// A running `vman serve` with a temporary storage folder.
pub struct Vman {
    pub storage: PathBuf,
    _tmp: Arc<TempDir>,
    env: Vec<(String, String)>,
    child: Option<Child>,
    pub base: String,
    logs: Arc<Mutex<Vec<String>>>,
    client: reqwest::blocking::Client,
}

pub struct Builder {
    env: Vec<(String, String)>,
    tmp: Option<Arc<TempDir>>,
}

impl Builder {
    pub fn env(mut self, key: &str, value: impl AsRef<std::ffi::OsStr>) -> Self {
        self.env.push((
            key.to_owned(),
            value.as_ref().to_string_lossy().into_owned(),
        ));
        self
    }

    /// The default boot disk is the tiny image.
    pub fn with_tiny_default(self) -> Self {
        let image = tiny_image().to_path_buf();
        self.env("VMAN_DEFAULT_BOOT_DISK", image)
    }

    pub fn start(self) -> Vman {
        let tmp = self.tmp.unwrap_or_else(|| {
            Arc::new(
                tempfile::Builder::new()
                    .prefix("vman-e2e-")
                    .tempdir()
                    .expect("tempdir"),
            )
        });
        let storage = tmp.path().join("storage");
        fs::create_dir_all(storage.join("templates")).expect("storage");
        let mut vman = Vman {
            storage,
            _tmp: tmp,
            env: self.env,
            child: None,
            base: String::new(),
            logs: Arc::default(),
            client: reqwest::blocking::Client::builder()
                .timeout(Duration::from_secs(120))
                .build()
                .expect("client"),
        };
        vman.spawn();
        vman
    }
}

impl Vman {
    pub fn builder() -> Builder {
        Builder {
            env: Vec::new(),
            tmp: None,
        }
    }

    fn spawn(&mut self) {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_vman"));
        cmd.args(["serve", "--host", "127.0.0.1", "--port", "0"])
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("VMAN_STORAGE_PATH", &self.storage)
            .env("VMAN_LOG_DIR", self.storage.join("logs"))
            .env("VMAN_ACCEL", "tcg")
            .current_dir(&self.storage)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn vman");
        let (tx, rx) = std::sync::mpsc::channel();
        for stream in [
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
        ]
        .into_iter()
        .flatten()
        {
            let logs = self.logs.clone();
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    if let Some(rest) = line.split("listening on http://").nth(1) {
                        let _ = tx.send(rest.split_whitespace().next().unwrap_or("").to_owned());
                    }
                    logs.lock().unwrap_or_else(|p| p.into_inner()).push(line);
                }
            });
        }
        let addr = rx.recv_timeout(SERVER).unwrap_or_else(|_| {
            let _ = child.kill();
            panic!("vman did not start:\n{}", self.logs().join("\n"))
        });
        self.base = format!("http://{addr}");
        self.child = Some(child);
    }

    pub fn logs(&self) -> Vec<String> {
        self.logs.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn log_count(&self, needle: &str) -> usize {
        self.logs().iter().filter(|l| l.contains(needle)).count()
    }

    #[allow(dead_code)]
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).expect("running")
    }

    /// SIGKILL, as a crash would.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts again on the same storage and database.
    pub fn restart(&mut self) {
        self.kill9();
        self.spawn();
    }

    pub fn call(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let url = format!("{}{path}", self.base);
        let method = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
        let mut req = self.client.request(method, &url);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().unwrap_or_else(|e| panic!("{url}: {e}"));
        let status = resp.status().as_u16();
        let text = resp.text().unwrap_or_default();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
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
        let start = Instant::now();
        loop {
            let vm = self.vm(id);
            if vm["state"] == state {
                return vm;
            }
            assert!(
                start.elapsed() < deadline,
                "{id} not {state} after {deadline:?}: {vm}"
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
