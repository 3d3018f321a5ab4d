//! `vman launch` boots the tiny guest and returns once it is up; `vman vm
//! logs --follow` then shows what the guest's shell prints.

use std::io::BufRead;
use std::sync::mpsc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::harness::{Vman, GUEST};
use crate::Cli;

const READY: &str = "vman-guest: ready";

#[test]
fn launch_returns_once_the_tiny_guest_booted() {
    let v = Vman::builder().with_tiny_default().start();
    let c = Cli::new(&v.base, &v.storage);
    c.ok(&[
        "template",
        "create",
        "tiny",
        "--cpus",
        "1",
        "--ram-mib",
        "256",
    ]);

    let up = c.json(&["launch", "tiny", "g1", "--timeout", "600"]);
    assert_eq!(up["vm"]["id"], "g1", "{up}");
    assert_eq!(up["vm"]["state"], "running", "{up}");
    // Up at the return: the guest had already fetched its metadata or said
    // it is ready (a TCG boot takes seconds, so a launch that did not wait
    // would see neither).
    assert!(
        !up["vm"]["metadata_fetched_at"].is_null() || v.console("g1").contains(READY),
        "{up}\n{}",
        v.console("g1")
    );
    // The shell takes input once the guest says it is ready.
    v.wait_console("g1", READY, 1);

    // The guest's shell, through `vm logs --follow`.
    let mut child = c
        .command(&["vm", "logs", "g1", "--follow", "--interval", "100"])
        .spawn()
        .expect("spawn logs --follow");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let _ = tx.send(line);
        }
    });
    let nonce = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    let word = format!("hi-{nonce}");
    // The shell prints the word alone on a line (the echoed command has `echo ` before it).
    v.type_line("g1", &format!("echo {word}"));
    let start = std::time::Instant::now();
    loop {
        let left = GUEST.saturating_sub(start.elapsed());
        let line = rx
            .recv_timeout(left.max(Duration::from_millis(1)))
            .unwrap_or_else(|_| {
                panic!(
                    "no {word} from logs --follow; console:\n{}",
                    v.console("g1")
                )
            });
        if line.trim_end_matches('\r') == word {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();

    // Refusals: a template that does not exist, a name that is taken.
    assert_eq!(c.refused(&["launch", "nope", "g2"]), "Template not found");
    assert!(c
        .refused(&["launch", "tiny", "g1"])
        .contains("already exists"));
    assert_eq!(v.get("/vms").as_array().map(Vec::len), Some(1));
}

#[test]
fn launch_gives_up_after_its_timeout_and_keeps_the_vm() {
    let v = Vman::builder().with_tiny_default().start();
    let c = Cli::new(&v.base, &v.storage);
    c.ok(&[
        "template",
        "create",
        "tiny",
        "--cpus",
        "1",
        "--ram-mib",
        "256",
    ]);
    let d = c.refused(&[
        "launch",
        "tiny",
        "slow",
        "--timeout",
        "1",
        "--ready-marker",
        "never printed",
    ]);
    assert!(d.contains("did not come up within 1 s"), "{d}");
    assert!(d.contains("vman vm logs slow"), "{d}");
    assert_eq!(v.vm("slow")["state"], "running");
    c.ok(&["vm", "delete", "slow"]);
    assert_eq!(v.get("/vms").as_array().map(Vec::len), Some(0));
}
