//! Figures of the web console (ignored by default; `bench/ui.sh` runs them):
//! page load with 100 VMs defined (first paint, first contentful paint,
//! and the mark the page sets when the table is filled), cold and warm;
//! and the time from a state change to the row showing it (a start's
//! answer -> `running`, a kill -9 of QEMU -> `error`). Medians go to
//! stdout and to `target/ui-artifacts/bench.txt`.

use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::json;

use crate::browser::{artifacts, Browser};
use crate::harness::{Vman, SERVER};

fn now_ms() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64() * 1000.0)
        .unwrap_or(0.0)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return f64::NAN;
    }
    v[v.len() / 2]
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

const TIMINGS: &str = "
    const p = Object.fromEntries(performance.getEntriesByType('paint').map(e => [e.name, e.startTime]));
    const rows = performance.getEntriesByName('vman-rows')[0];
    const n = document.querySelectorAll('#vm-rows tr').length;
    if (!rows || !p['first-contentful-paint'] || n < arguments[0]) return null;
    return [p['first-paint'] || p['first-contentful-paint'], p['first-contentful-paint'], rows.startTime, n];";

/// Watches the row of `id` and notes when its state becomes `state`.
const WATCH: &str = "
    const [id, state] = arguments;
    window.__rowAt = null;
    const seen = () => document.querySelector(`#vm-rows tr[data-vm=\"${id}\"][data-state=${state}]`);
    const mo = new MutationObserver(() => { if (!window.__rowAt && seen()) { window.__rowAt = Date.now(); mo.disconnect(); } });
    mo.observe(document.querySelector('#vm-rows'), {childList: true, subtree: true, attributes: true});
    return true;";

#[test]
#[ignore = "a benchmark: bench/ui.sh"]
fn bench_ui_page_load_with_100_vms_and_state_change_to_row() {
    let vms = env_usize("VMAN_BENCH_VMS", 100);
    let loads = env_usize("VMAN_BENCH_LOADS", 10);
    let rounds = env_usize("VMAN_BENCH_ROUNDS", 5);
    let vman = Vman::builder().with_tiny_default().start();
    vman.template("tiny", 128);
    for i in 0..vms {
        let (s, b) = vman.create_vm(json!({"template_name": "tiny", "name": format!("b{i:03}")}));
        assert_eq!(s, 201, "{b}");
    }
    let mut out = String::new();
    let b = Browser::start(&vman.base, 1280, 900);
    let (mut fp, mut fcp, mut rows) = (Vec::new(), Vec::new(), Vec::new());
    let mut cold = None;
    for i in 0..loads {
        b.goto("/ui/");
        let t = b.wait("paint timings", SERVER, TIMINGS, vec![json!(vms)]);
        let t: Vec<f64> = t
            .as_array()
            .map(|a| a.iter().filter_map(|x| x.as_f64()).collect())
            .unwrap_or_default();
        if i == 0 {
            cold = Some(t.clone());
        } else {
            fp.push(t[0]);
            fcp.push(t[1]);
            rows.push(t[2]);
        }
    }
    if let Some(c) = cold {
        out += &format!(
            "page load, {vms} VMs, cold cache: first paint {:.0} ms, first contentful paint {:.0} ms, table filled {:.0} ms\n",
            c[0], c[1], c[2]
        );
    }
    out += &format!(
        "page load, {vms} VMs, warm (median of {}): first paint {:.0} ms, first contentful paint {:.0} ms, table filled {:.0} ms\n",
        fp.len(),
        median(fp.clone()),
        median(fcp),
        median(rows)
    );

    // State changes of one VM among the 100, seen by the open list.
    let id = "b000";
    let (mut start_row, mut kill_row) = (Vec::new(), Vec::new());
    b.goto("/ui/");
    b.wait_for("#live[data-live=live]", SERVER);
    for _ in 0..rounds {
        b.js(WATCH, vec![json!(id), json!("running")]);
        let (s, body) = vman.start_vm(id);
        let answered = now_ms();
        assert_eq!(s, 202, "{body}");
        let at = b.wait("row running", SERVER, "return window.__rowAt", vec![]);
        start_row.push(at.as_f64().unwrap_or(f64::NAN) - answered);
        let pid = vman.vm(id)["pid"].as_i64().expect("pid") as i32;
        b.js(WATCH, vec![json!(id), json!("error")]);
        let killed = now_ms();
        // SAFETY: kill(2) has no memory effects; the pid is this bench's QEMU.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        let at = b.wait("row error", SERVER, "return window.__rowAt", vec![]);
        kill_row.push(at.as_f64().unwrap_or(f64::NAN) - killed);
    }
    let max = |v: &[f64]| v.iter().cloned().fold(f64::NAN, f64::max);
    out += &format!(
        "start answered -> row running (median of {rounds}): {:.0} ms (max {:.0})\n",
        median(start_row.clone()),
        max(&start_row)
    );
    out += &format!(
        "kill -9 of QEMU -> row error (median of {rounds}): {:.0} ms (max {:.0})\n",
        median(kill_row.clone()),
        max(&kill_row)
    );
    print!("{out}");
    std::fs::write(artifacts().join("bench.txt"), out).expect("write bench.txt");
}
