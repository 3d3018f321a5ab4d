//! `vman vm console` in pipe mode (stdin not a terminal) against the tiny
//! guest: what is typed reaches the guest's shell and its answer comes
//! back, Ctrl-] (0x1d) detaches and the VM keeps running, `--readonly`
//! sends nothing, a VM stopping ends the console with exit 0, refusals exit 1.

use std::io::{Read, Write};
use std::process::{Child, ChildStdin, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::harness::{Vman, GUEST};
use crate::{wait, Cli, CLIENT_DEADLINE};

fn nonce() -> u32 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .subsec_nanos()
}

/// A running `vman vm console` with its stdin, and its stdout as chunks.
struct Console {
    child: Option<Child>,
    stdin: ChildStdin,
    out: mpsc::Receiver<Vec<u8>>,
    seen: String,
}

impl Console {
    fn open(c: &Cli, args: &[&str]) -> Self {
        let mut child = c
            .command(args)
            .stdin(Stdio::piped())
            .spawn()
            .expect("spawn vm console");
        let stdin = child.stdin.take().expect("stdin");
        let mut stdout = child.stdout.take().expect("stdout");
        let (tx, out) = mpsc::channel();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stdout.read(&mut buf) {
                if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                    break;
                }
            }
        });
        Self {
            child: Some(child),
            stdin,
            out,
            seen: String::new(),
        }
    }

    fn send(&mut self, bytes: &[u8]) {
        self.stdin.write_all(bytes).expect("write to console stdin");
        self.stdin.flush().expect("flush");
    }

    /// Waits until the output has `word` alone on a line (the shell's
    /// answer, not the echoed command).
    fn wait_line(&mut self, word: &str) {
        let start = Instant::now();
        while !self.seen.lines().any(|l| l.trim_end_matches('\r') == word) {
            let left = GUEST.saturating_sub(start.elapsed());
            match self.out.recv_timeout(left.max(Duration::from_millis(1))) {
                Ok(chunk) => self.seen.push_str(&String::from_utf8_lossy(&chunk)),
                Err(_) => panic!(
                    "no line {word:?} from vm console; it printed:\n{}",
                    self.seen
                ),
            }
        }
    }

    /// Ends by Ctrl-] (when `detach`) and returns how it ended.
    fn finish(mut self, detach: bool) -> crate::Run {
        if detach {
            self.send(&[0x1d]);
        }
        let child = self.child.take().expect("not finished yet");
        wait(child, CLIENT_DEADLINE, &["vm", "console"])
    }
}

impl Drop for Console {
    /// A test that failed half-way leaves no client behind.
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

#[test]
fn console_in_pipe_mode_types_into_the_guest_and_detaches_leaving_it_running() {
    // With a token: the socket must carry it (as a header) too.
    let token = "0123456789abcdef-console";
    let v = Vman::builder().with_tiny_default().api_token(token).start();
    let mut c = Cli::new(&v.base, &v.storage);
    c.token = Some(token.into());
    c.ok(&[
        "template",
        "create",
        "tiny",
        "--cpus",
        "1",
        "--ram-mib",
        "256",
    ]);
    // Refusals before the guest runs: not running, unknown VM.
    c.ok(&["vm", "create", "g1", "-t", "tiny"]);
    let d = c.refused(&["vm", "console", "g1"]);
    assert!(d.contains("not running"), "{d}");
    assert_eq!(c.refused(&["vm", "console", "nope"]), "VM not found");

    c.ok(&["vm", "start", "g1"]);
    v.wait_console("g1", "vman-guest: ready", 1);

    // A read-only viewer's typing is dropped...
    let ro = format!("ro-{}", nonce());
    let mut viewer = Console::open(&c, &["vm", "console", "g1", "--readonly"]);
    viewer.send(format!("echo {ro}\n").as_bytes());

    // ...while a normal console's reaches the shell, whose answer both see.
    let word = format!("hi-{}", nonce());
    let mut con = Console::open(&c, &["vm", "console", "g1"]);
    con.send(format!("echo {word}\n").as_bytes());
    con.wait_line(&word);
    viewer.wait_line(&word);
    let r = con.finish(true);
    assert_eq!(r.code, Some(0), "{r:?}");
    assert!(r.stderr.contains("detached"), "{r:?}");
    let r = viewer.finish(true);
    assert_eq!(r.code, Some(0), "{r:?}");
    assert!(!v.console("g1").contains(&ro), "{}", v.console("g1"));

    // Detaching left the VM running, and a console can attach again.
    assert_eq!(v.vm("g1")["state"], "running");
    let again = format!("again-{}", nonce());
    let mut con = Console::open(&c, &["vm", "console", "g1"]);
    con.send(format!("echo {again}\n").as_bytes());
    con.wait_line(&again);

    // The VM stopping closes the console (1000): exit 0, said on stderr.
    c.ok(&["vm", "stop", "g1", "--force"]);
    let r = con.finish(false);
    assert_eq!(r.code, Some(0), "{r:?}");
    assert!(r.stderr.contains("stopped"), "{r:?}");
}
