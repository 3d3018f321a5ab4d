//! Tests of the `vman` client commands: the real binary as a client
//! (`VMAN_URL` pointing at it) against the real binary serving on port 0
//! with its own storage (tests/common, and the e2e harness for guests).
//! Each test checks output (tables, `--format json` that parses), the
//! server's state after the command, and exit codes: 0 ok, 1 refused by
//! the server (its detail on stderr), 2 usage, 3 server unreachable.

#[path = "../common/mod.rs"]
mod common;
#[allow(dead_code)]
#[path = "../e2e/harness.rs"]
mod harness;

mod clones;
mod console;
mod disks;
mod events;
mod launch;
mod provisioning;
mod system;
mod templates;
mod vms;

use std::io::Read;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

/// A client command may wait for a guest (launch, a graceful stop).
pub const CLIENT_DEADLINE: Duration = Duration::from_secs(300);

/// How one client run ended.
#[derive(Debug)]
pub struct Run {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

/// The client binary pointed at `url` (with `token`, when given), run in
/// `cwd` (no `.env` there) with no other `VMAN_*` variables.
#[derive(Clone)]
pub struct Cli {
    pub url: String,
    pub token: Option<String>,
    pub cwd: std::path::PathBuf,
}

impl Cli {
    pub fn new(url: &str, cwd: &Path) -> Self {
        Self {
            url: url.trim_end_matches('/').to_owned(),
            token: None,
            cwd: cwd.to_path_buf(),
        }
    }

    /// A command with the environment set, not started.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(common::vman_bin());
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("VMAN_") {
                cmd.env_remove(&key);
            }
        }
        cmd.env("VMAN_URL", &self.url);
        if let Some(t) = &self.token {
            cmd.env("VMAN_API_TOKEN", t);
        }
        cmd.args(args)
            .current_dir(&self.cwd)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        cmd
    }

    pub fn run(&self, args: &[&str]) -> Run {
        let child = self.command(args).spawn().expect("spawn vman");
        wait(child, CLIENT_DEADLINE, args)
    }

    /// Runs and asserts exit 0; returns stdout.
    #[track_caller]
    pub fn ok(&self, args: &[&str]) -> String {
        let r = self.run(args);
        assert_eq!(r.code, Some(0), "vman {args:?}: {r:?}");
        r.stdout
    }

    /// Runs with `--format json`, asserts exit 0 and parses stdout.
    #[track_caller]
    pub fn json(&self, args: &[&str]) -> Value {
        let mut all = args.to_vec();
        all.extend(["--format", "json"]);
        let out = self.ok(&all);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("vman {all:?}: not JSON ({e}): {out}"))
    }

    /// Runs, asserts exit `code` and a one-line `vman: ...` message on
    /// stderr; returns that message.
    #[track_caller]
    pub fn fails(&self, code: i32, args: &[&str]) -> String {
        let r = self.run(args);
        assert_eq!(r.code, Some(code), "vman {args:?}: {r:?}");
        let line = r
            .stderr
            .lines()
            .find(|l| l.starts_with("vman: "))
            .unwrap_or_else(|| panic!("vman {args:?}: no `vman: ` line on stderr: {r:?}"));
        line.trim_start_matches("vman: ").to_owned()
    }

    /// Exit 1 (refused by the server): returns the detail.
    #[track_caller]
    pub fn refused(&self, args: &[&str]) -> String {
        self.fails(1, args)
    }
}

/// Waits for `child` to end, reading its output; kills it after `deadline`.
pub fn wait(mut child: Child, deadline: Duration, what: &[&str]) -> Run {
    // Output already taken by the caller reads as empty.
    let out = child.stdout.take().map(reader);
    let err = child.stderr.take().map(reader);
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().expect("try_wait") {
            break s;
        }
        if start.elapsed() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("vman {what:?} did not end within {deadline:?}");
        }
        thread::sleep(Duration::from_millis(10));
    };
    Run {
        code: status.code(),
        stdout: out
            .map(|h| h.join().expect("stdout reader"))
            .unwrap_or_default(),
        stderr: err
            .map(|h| h.join().expect("stderr reader"))
            .unwrap_or_default(),
    }
}

fn reader(mut r: impl Read + Send + 'static) -> thread::JoinHandle<String> {
    thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = r.read_to_end(&mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    })
}

/// The rows of a table (header first), split on runs of 2+ spaces.
pub fn rows(table: &str) -> Vec<Vec<String>> {
    table
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            l.split("  ")
                .map(str::trim)
                .filter(|c| !c.is_empty())
                .map(str::to_owned)
                .collect()
        })
        .collect()
}

/// The value of `column` in the row whose first cell is `key`.
#[track_caller]
pub fn cell(table: &str, key: &str, column: &str) -> String {
    let rows = rows(table);
    let header = rows
        .first()
        .unwrap_or_else(|| panic!("empty table: {table:?}"));
    let idx = header
        .iter()
        .position(|h| h == column)
        .unwrap_or_else(|| panic!("no column {column} in {table}"));
    let row = rows
        .iter()
        .find(|r| r.first().map(String::as_str) == Some(key))
        .unwrap_or_else(|| panic!("no row {key} in {table}"));
    row.get(idx).cloned().unwrap_or_default()
}
