//! End-to-end test harness: runs the real `vman` binary on an ephemeral port
//! with a fresh temporary storage folder, and talks to it over HTTP.
//!
//! Every wait polls against a generous deadline; nothing here asserts on
//! timing. Each test should start its own `Server` so tests stay independent
//! and can run in parallel.
#![allow(dead_code)]

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;
use tempfile::TempDir;

/// How long any wait may take before the harness gives up.
pub const DEADLINE: Duration = Duration::from_secs(30);

/// How long one request may take: a start copies a boot disk, a graceful
/// stop waits for a guest that may still be booting under TCG.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(180);

/// The marker the server logs on stdout once it accepts connections.
const READY: &str = "listening on http://";

/// Path of the binary under test.
pub fn vman_bin() -> &'static str {
    env!("CARGO_BIN_EXE_vman")
}

/// A reply as the tests see it. `body` is `Value::Null` when the body is
/// empty or not JSON; `text` always holds the raw body.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub body: Value,
    pub text: String,
    pub content_type: Option<String>,
}

/// The result of running the binary to completion.
#[derive(Debug)]
pub struct Exited {
    /// `None` when killed by a signal (also after a timeout).
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    /// True when the process did not exit by itself before the deadline
    /// (it was then killed). A config that should be refused but starts a
    /// server shows up here instead of hanging the test.
    pub timed_out: bool,
}

impl Exited {
    /// Non-empty lines of stderr.
    pub fn stderr_lines(&self) -> Vec<&str> {
        self.stderr
            .lines()
            .filter(|l| !l.trim().is_empty())
            .collect()
    }
}

/// How to start a server. Obtain with `Server::builder()`.
#[derive(Clone)]
pub struct ServerBuilder {
    envs: Vec<(String, String)>,
    removed_envs: Vec<String>,
    args: Vec<String>,
    host: String,
    cwd: Option<PathBuf>,
    storage: Option<Arc<TempDir>>,
    token: Option<String>,
}

impl Default for ServerBuilder {
    fn default() -> Self {
        Self {
            envs: Vec::new(),
            removed_envs: Vec::new(),
            args: Vec::new(),
            host: "127.0.0.1".into(),
            cwd: None,
            storage: None,
            token: None,
        }
    }
}

impl ServerBuilder {
    /// Sets an environment variable of the server (overrides the defaults
    /// the harness sets, e.g. `VMAN_ACCEL`).
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.removed_envs.retain(|k| k != key);
        self.envs.retain(|(k, _)| k != key);
        self.envs.push((key.into(), value.into()));
        self
    }

    /// Removes a variable the harness would set, e.g. to let `.env` provide it.
    pub fn env_remove(mut self, key: &str) -> Self {
        self.envs.retain(|(k, _)| k != key);
        self.removed_envs.push(key.into());
        self
    }

    /// Adds an argument after `serve --port 0 --host <host>`.
    pub fn arg(mut self, arg: &str) -> Self {
        self.args.push(arg.into());
        self
    }

    pub fn args(mut self, args: &[&str]) -> Self {
        self.args.extend(args.iter().map(|a| a.to_string()));
        self
    }

    /// The `--host` argument (default 127.0.0.1). Requests always go to
    /// 127.0.0.1.
    pub fn host(mut self, host: &str) -> Self {
        self.host = host.into();
        self
    }

    /// Working directory of the server (where it looks for `.env`). Default:
    /// the storage folder, so a stray `.env` of the repository never leaks in.
    pub fn current_dir(mut self, dir: impl AsRef<Path>) -> Self {
        self.cwd = Some(dir.as_ref().to_path_buf());
        self
    }

    /// Reuses a storage folder, e.g. one taken with `Server::storage_handle`.
    pub fn storage(mut self, dir: Arc<TempDir>) -> Self {
        self.storage = Some(dir);
        self
    }

    /// Sets `VMAN_API_TOKEN`; the request helpers then send it as
    /// `Authorization: Bearer` (`raw` never adds it by itself).
    pub fn api_token(mut self, token: &str) -> Self {
        self.token = Some(token.into());
        self.env("VMAN_API_TOKEN", token)
    }

    fn storage_dir(&mut self) -> Arc<TempDir> {
        self.storage
            .get_or_insert_with(|| {
                Arc::new(
                    tempfile::Builder::new()
                        .prefix("vman-test-")
                        .tempdir()
                        .expect("create temp storage"),
                )
            })
            .clone()
    }

    fn command(&mut self) -> Command {
        let storage = self.storage_dir();
        let mut cmd = Command::new(vman_bin());
        // The tests decide the configuration, not the caller's shell.
        for (key, _) in std::env::vars_os().filter_map(|(k, v)| Some((k.into_string().ok()?, v))) {
            if key.starts_with("VMAN_") {
                cmd.env_remove(&key);
            }
        }
        cmd.env("VMAN_STORAGE_PATH", storage.path())
            .env("VMAN_LOG_DIR", storage.path().join("logs"))
            .env("VMAN_ACCEL", "tcg");
        for (k, v) in &self.envs {
            cmd.env(k, v);
        }
        for k in &self.removed_envs {
            cmd.env_remove(k);
        }
        cmd.args(["serve", "--port", "0", "--host", &self.host]);
        cmd.args(&self.args);
        cmd.current_dir(self.cwd.clone().unwrap_or_else(|| storage.path().into()));
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        cmd
    }

    /// Starts the server and waits until it listens. Panics (with its output)
    /// if it exits or does not get ready within the deadline.
    pub fn start(mut self) -> Server {
        let storage = self.storage_dir();
        let logs = Arc::new(Mutex::new(Vec::new()));
        let (child, port) = spawn_ready(&mut self, &logs);
        Server {
            builder: self,
            storage,
            child: Some(child),
            port,
            logs,
            client: reqwest::blocking::Client::builder()
                .timeout(REQUEST_TIMEOUT)
                // vman closes connections idle for VMAN_HEADER_TIMEOUT (10 s
                // by default): never reuse one that old.
                .pool_idle_timeout(Duration::from_secs(3))
                .build()
                .expect("http client"),
        }
    }

    /// Runs `vman serve ...` to completion (for configurations that must be
    /// refused), capturing its output. Kills it after the deadline.
    pub fn run_to_exit(mut self) -> Exited {
        let child = self.command().spawn().expect("spawn vman");
        wait_exit(child)
    }
}

/// Runs the binary with exactly these arguments and environment additions
/// (no harness defaults besides removing inherited `VMAN_*`), to completion.
pub fn run_vman(args: &[&str], envs: &[(&str, &str)], cwd: &Path) -> Exited {
    let mut cmd = Command::new(vman_bin());
    for (key, _) in std::env::vars_os().filter_map(|(k, v)| Some((k.into_string().ok()?, v))) {
        if key.starts_with("VMAN_") {
            cmd.env_remove(&key);
        }
    }
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let child = cmd
        .args(args)
        .current_dir(cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn vman");
    wait_exit(child)
}

fn wait_exit(mut child: Child) -> Exited {
    let out = read_all(child.stdout.take().expect("stdout"));
    let err = read_all(child.stderr.take().expect("stderr"));
    let start = Instant::now();
    let mut timed_out = false;
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if start.elapsed() > DEADLINE {
            timed_out = true;
            let _ = child.kill();
            break child.wait().expect("wait");
        }
        thread::sleep(Duration::from_millis(20));
    };
    Exited {
        code: status.code(),
        stdout: out.join().expect("stdout reader"),
        stderr: err.join().expect("stderr reader"),
        timed_out,
    }
}

fn read_all(mut r: impl Read + Send + 'static) -> thread::JoinHandle<String> {
    thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = r.read_to_end(&mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    })
}

/// Extracts the port from a line containing `listening on http://HOST:PORT`.
pub fn port_of_ready_line(line: &str) -> Option<u16> {
    let rest = &line[line.find(READY)? + READY.len()..];
    let addr = rest.split(|c: char| c.is_whitespace() || c == '/').next()?;
    addr.rsplit(':').next()?.parse().ok()
}

/// Spawns the server with reader threads that store every output line, and
/// waits for the ready line.
fn spawn_ready(builder: &mut ServerBuilder, logs: &Arc<Mutex<Vec<String>>>) -> (Child, u16) {
    let mut child = builder.command().spawn().expect("spawn vman");
    let (tx, rx) = mpsc::channel::<u16>();
    let stdout = child.stdout.take().expect("stdout");
    let stderr = child.stderr.take().expect("stderr");
    {
        let logs = logs.clone();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(port) = port_of_ready_line(&line) {
                    let _ = tx.send(port);
                }
                logs.lock().unwrap_or_else(|p| p.into_inner()).push(line);
            }
        });
    }
    {
        let logs = logs.clone();
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                logs.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(format!("[stderr] {line}"));
            }
        });
    }
    match rx.recv_timeout(DEADLINE) {
        Ok(port) => (child, port),
        Err(e) => {
            let _ = child.kill();
            let status = child.wait();
            // Give the stderr reader a moment to collect the last lines.
            thread::sleep(Duration::from_millis(200));
            let lines = logs.lock().unwrap_or_else(|p| p.into_inner()).join("\n");
            panic!("vman did not get ready ({e:?}, exit {status:?}); output:\n{lines}");
        }
    }
}

/// A running `vman serve`, killed when dropped.
pub struct Server {
    builder: ServerBuilder,
    storage: Arc<TempDir>,
    child: Option<Child>,
    port: u16,
    logs: Arc<Mutex<Vec<String>>>,
    client: reqwest::blocking::Client,
}

impl Server {
    pub fn builder() -> ServerBuilder {
        ServerBuilder::default()
    }

    /// A server with the default configuration.
    pub fn start() -> Self {
        Self::builder().start()
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("server is running").id()
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{}", self.port, path)
    }

    /// The storage folder (`VMAN_STORAGE_PATH`).
    pub fn storage_path(&self) -> &Path {
        self.storage.path()
    }

    /// The storage folder, to start another server on it later.
    pub fn storage_handle(&self) -> Arc<TempDir> {
        self.storage.clone()
    }

    pub fn http(&self) -> &reqwest::blocking::Client {
        &self.client
    }

    /// Every line the server printed so far (stderr lines prefixed with
    /// `[stderr] `), across restarts.
    pub fn logs(&self) -> Vec<String> {
        self.logs.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn logs_contain(&self, pattern: &str) -> bool {
        self.logs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .any(|l| l.contains(pattern))
    }

    /// Polls the output until a line contains `pattern`; false after `timeout`.
    pub fn wait_for_log(&self, pattern: &str, timeout: Duration) -> bool {
        let start = Instant::now();
        loop {
            if self.logs_contain(pattern) {
                return true;
            }
            if start.elapsed() > timeout {
                return false;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends a request without adding anything (no token): for tests that
    /// control headers and bodies byte by byte.
    pub fn raw(
        &self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
        headers: &[(&str, &str)],
    ) -> Reply {
        self.try_raw(method, path, body, headers)
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
    }

    /// Like `raw`, but a transport error (e.g. the server closing the
    /// connection while a large body is still being sent) is returned.
    pub fn try_raw(
        &self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
        headers: &[(&str, &str)],
    ) -> Result<Reply, reqwest::Error> {
        let method = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
        let mut req = self.client.request(method, self.url(path));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        if let Some(body) = body {
            req = req.body(body.to_vec());
        }
        let resp = req.send()?;
        let status = resp.status().as_u16();
        let content_type = resp
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let text = resp.text()?;
        let body = serde_json::from_str(&text).unwrap_or(Value::Null);
        Ok(Reply {
            status,
            body,
            text,
            content_type,
        })
    }

    /// A request with the token (if any) and an optional JSON body.
    pub fn request(&self, method: &str, path: &str, json: Option<&Value>) -> Reply {
        let auth = self.builder.token.as_ref().map(|t| format!("Bearer {t}"));
        let mut headers: Vec<(&str, &str)> = Vec::new();
        if let Some(a) = &auth {
            headers.push(("authorization", a));
        }
        let bytes = json.map(|j| serde_json::to_vec(j).expect("serialize"));
        if bytes.is_some() {
            headers.push(("content-type", "application/json"));
        }
        self.raw(method, path, bytes.as_deref(), &headers)
    }

    pub fn get(&self, path: &str) -> (u16, Value) {
        let r = self.request("GET", path, None);
        (r.status, r.body)
    }

    pub fn post_json(&self, path: &str, body: &Value) -> (u16, Value) {
        let r = self.request("POST", path, Some(body));
        (r.status, r.body)
    }

    pub fn put_json(&self, path: &str, body: &Value) -> (u16, Value) {
        let r = self.request("PUT", path, Some(body));
        (r.status, r.body)
    }

    pub fn delete(&self, path: &str) -> (u16, Value) {
        let r = self.request("DELETE", path, None);
        (r.status, r.body)
    }

    /// Sends SIGTERM and waits for the exit; returns the exit status.
    pub fn sigterm(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("server is running");
        let pid = libc::pid_t::try_from(child.id()).expect("pid fits");
        // SAFETY: plain kill(2) on our own child, which has not been reaped.
        let rc = unsafe { libc::kill(pid, libc::SIGTERM) };
        assert_eq!(rc, 0, "kill(SIGTERM) failed");
        let start = Instant::now();
        loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                return status;
            }
            if start.elapsed() > DEADLINE {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "vman did not exit within {DEADLINE:?} after SIGTERM; output:\n{}",
                    self.logs().join("\n")
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the server with SIGKILL and reaps it.
    pub fn kill9(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("server is running");
        child.kill().expect("SIGKILL");
        child.wait().expect("wait")
    }

    /// Forgets a server that died by itself (e.g. a test hook's SIGKILL),
    /// so that `restart` starts a new one instead of stopping it.
    pub fn reap_dead(&mut self) {
        if let Some(c) = &mut self.child {
            if c.try_wait().expect("try_wait").is_some() {
                self.child = None;
            }
        }
    }

    pub fn is_running(&mut self) -> bool {
        match &mut self.child {
            Some(c) => c.try_wait().expect("try_wait").is_none(),
            None => false,
        }
    }

    /// Starts the server again on the same storage and configuration (a new
    /// port). Stops it with SIGTERM first if it still runs.
    pub fn restart(&mut self) {
        if self.child.is_some() {
            let status = self.sigterm();
            assert!(status.success(), "exit after SIGTERM: {status:?}");
        }
        let (child, port) = spawn_ready(&mut self.builder, &self.logs);
        self.child = Some(child);
        self.port = port;
    }

    /// Relative paths of everything in the storage folder (recursively).
    pub fn storage_entries(&self) -> BTreeSet<String> {
        fn walk(root: &Path, dir: &Path, out: &mut BTreeSet<String>) {
            let Ok(rd) = std::fs::read_dir(dir) else {
                return;
            };
            for e in rd.flatten() {
                let p = e.path();
                let rel = p
                    .strip_prefix(root)
                    .expect("inside root")
                    .to_string_lossy()
                    .into_owned();
                out.insert(rel);
                if p.is_dir() {
                    walk(root, &p, out);
                }
            }
        }
        let mut out = BTreeSet::new();
        walk(self.storage.path(), self.storage.path(), &mut out);
        out
    }

    /// Storage entries other than the database files and the log folder.
    pub fn storage_entries_besides_db_and_logs(&self) -> BTreeSet<String> {
        self.storage_entries()
            .into_iter()
            // `vms/` and `disks/` themselves are made (closed to the QEMU
            // user) at start-up; what they hold is what a request made.
            .filter(|p| {
                !p.starts_with("vman.db")
                    && p != "logs"
                    && !p.starts_with("logs/")
                    && p != "vms"
                    && p != "disks"
            })
            .collect()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if thread::panicking() {
            eprintln!(
                "---- vman output (port {}) ----\n{}",
                self.port,
                self.logs().join("\n")
            );
        }
    }
}

/// Asserts that `body` is an error body: a JSON object with a string
/// `detail`; returns the detail.
#[track_caller]
/// POSTs `body` as JSON to `path` and checks it is refused: a 4xx with a
/// `detail`, and a 422 whose detail names `field` when one is given (a
/// malformed body may be 400 or 422).
pub fn assert_bad_body_refused(s: &Server, path: &str, body: &str, field: Option<&str>) {
    let r = s.raw(
        "POST",
        path,
        Some(body.as_bytes()),
        &[("content-type", "application/json")],
    );
    assert!(
        (400..500).contains(&r.status),
        "{body:?} gave {} {}",
        r.status,
        r.text
    );
    let d = detail(&r.body);
    match field {
        Some(f) => {
            assert_eq!(r.status, 422, "{body:?}: {}", r.text);
            assert!(d.contains(f), "{body:?}: detail {d:?} does not name {f}");
        }
        None => assert!(
            r.status == 400 || r.status == 422,
            "{body:?}: {} {}",
            r.status,
            r.text
        ),
    }
}

pub fn detail(body: &Value) -> &str {
    body.get("detail")
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("no string `detail` in {body}"))
}

/// Asserts status and that the body is a JSON error with a string detail.
#[track_caller]
pub fn assert_error(reply: &(u16, Value), status: u16) -> String {
    assert_eq!(reply.0, status, "status; body {}", reply.1);
    detail(&reply.1).to_owned()
}

/// True when `s` looks like a UUID v4 (lowercase hex, 8-4-4-4-12, version 4,
/// RFC 4122 variant).
pub fn is_uuid_v4(s: &str) -> bool {
    let parts: Vec<&str> = s.split('-').collect();
    let lens: Vec<usize> = parts.iter().map(|p| p.len()).collect();
    lens == [8, 4, 4, 4, 12]
        && parts
            .iter()
            .all(|p| p.bytes().all(|b| b.is_ascii_hexdigit()))
        && parts[2].starts_with('4')
        && matches!(
            parts[3].as_bytes()[0],
            b'8' | b'9' | b'a' | b'b' | b'A' | b'B'
        )
}
