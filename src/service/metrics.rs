//! /metrics, the service's part: counters of what happened (starts, stops,
//! exits, adoptions, exit recording latency, root disk provisioning) kept
//! here, and at each scrape the VMs by state and, per running VM, its
//! QEMU's CPU time and memory (`/proc`) and disk I/O (QMP).
//!
//! A QEMU under TCG may take tens of milliseconds to answer QMP (its main
//! loop waits for the vCPU threads), and a stuck one never answers: each
//! scrape asks every running QEMU for its `query-blockstats` in a task of
//! its own (one at a time per QEMU), waits at most `FRESH_WAIT` for the
//! answers, and serves the newest answer each QEMU gave, with its age
//! (`vman_vm_disk_stats_age_seconds`). A late answer is kept for the next
//! scrape.
//!
//! Hand-written Prometheus text (format 0.0.4): the few families are known,
//! most values are read at scrape time from what the service already holds,
//! and a per-VM series disappears with its VM without a registry to clean.
//! `Text` and `Histogram` are also used by the API's request metrics.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::Service;
use crate::model::VmState;
use crate::operator::stats;
use crate::sync::LockExt;

/// How long a scrape waits for fresh `query-blockstats` answers.
const FRESH_WAIT: Duration = Duration::from_millis(20);

/// The newest `query-blockstats` answer of one QEMU (VM id and pid).
#[derive(Default)]
struct DiskAnswer {
    stats: Option<(std::time::Instant, Vec<stats::BlockStats>)>,
    asking: bool,
}

type DiskAnswers = Arc<Mutex<std::collections::HashMap<(String, i32), DiskAnswer>>>;

/// Upper bounds (seconds) of histogram buckets.
pub const BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

/// A latency histogram with the `BUCKETS` bounds.
#[derive(Debug, Clone, Default)]
pub struct Histogram {
    counts: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

impl Histogram {
    pub fn observe(&mut self, d: Duration) {
        let s = d.as_secs_f64();
        for (i, le) in BUCKETS.iter().enumerate() {
            if s <= *le {
                self.counts[i] += 1;
            }
        }
        self.count += 1;
        self.sum += s;
    }
}

/// A Prometheus text exposition being written.
#[derive(Default)]
pub struct Text(pub String);

/// A label value with `\`, `"` and newlines escaped.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn labels(pairs: &[(&str, &str)]) -> String {
    if pairs.is_empty() {
        return String::new();
    }
    let inner: Vec<String> = pairs
        .iter()
        .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
        .collect();
    format!("{{{}}}", inner.join(","))
}

impl Text {
    /// `# HELP` and `# TYPE` of a family.
    pub fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    pub fn sample(&mut self, name: &str, pairs: &[(&str, &str)], value: impl std::fmt::Display) {
        let _ = writeln!(self.0, "{name}{} {value}", labels(pairs));
    }

    pub fn histogram(&mut self, name: &str, pairs: &[(&str, &str)], h: &Histogram) {
        for (le, count) in BUCKETS.iter().zip(h.counts) {
            let le = le.to_string();
            let mut with = pairs.to_vec();
            with.push(("le", &le));
            self.sample(&format!("{name}_bucket"), &with, count);
        }
        let mut with = pairs.to_vec();
        with.push(("le", "+Inf"));
        self.sample(&format!("{name}_bucket"), &with, h.count);
        self.sample(&format!("{name}_sum"), pairs, h.sum);
        self.sample(&format!("{name}_count"), pairs, h.count);
    }
}

/// Root disks made, by method.
#[derive(Debug, Clone, Copy, Default)]
struct Provisions {
    count: u64,
    bytes: u64,
    seconds: f64,
}

/// What the service counts as it happens.
#[derive(Default)]
pub(crate) struct Counters {
    starts_ok: AtomicU64,
    starts_failed: AtomicU64,
    adoptions: AtomicU64,
    stops: Mutex<BTreeMap<String, u64>>,
    exits: Mutex<BTreeMap<&'static str, u64>>,
    exit_recording: Mutex<Histogram>,
    provisions: Mutex<BTreeMap<&'static str, Provisions>>,
    disk_answers: DiskAnswers,
}

impl Counters {
    /// The newest disk figures of each running QEMU and their age, after
    /// asking each (not already being asked) again and waiting `FRESH_WAIT`.
    async fn disk_stats(
        &self,
        running: &[(String, Arc<crate::operator::vm::Running>)],
    ) -> Vec<Option<(Duration, Vec<stats::BlockStats>)>> {
        let keys: Vec<(String, i32)> = running.iter().map(|(id, r)| (id.clone(), r.pid)).collect();
        let mut asked = Vec::new();
        {
            let mut answers = self.disk_answers.lock_or_recover();
            answers.retain(|k, _| keys.contains(k));
            for (key, (_, run)) in keys.iter().zip(running) {
                let entry = answers.entry(key.clone()).or_default();
                if entry.asking {
                    continue;
                }
                entry.asking = true;
                let (answers, key, qmp) = (self.disk_answers.clone(), key.clone(), run.qmp.clone());
                asked.push(tokio::spawn(async move {
                    let got = stats::block_stats(qmp).await;
                    if let Some(entry) = answers.lock_or_recover().get_mut(&key) {
                        entry.asking = false;
                        if let Some(list) = got {
                            entry.stats = Some((std::time::Instant::now(), list));
                        }
                    }
                }));
            }
        }
        // Waiting for a task does not cancel it: a late answer stays.
        let _ = tokio::time::timeout(FRESH_WAIT, futures_util::future::join_all(asked)).await;
        let answers = self.disk_answers.lock_or_recover();
        keys.iter()
            .map(|k| {
                let (at, list) = answers.get(k)?.stats.as_ref()?;
                Some((at.elapsed(), list.clone()))
            })
            .collect()
    }

    /// Counts a VM event by its `action` (called from `emit_vm_change`).
    pub(super) fn vm_change(&self, action: &str, method: Option<&str>) {
        match action {
            "started" => self.starts_ok.fetch_add(1, Ordering::Relaxed),
            "start_failed" => self.starts_failed.fetch_add(1, Ordering::Relaxed),
            "adopted" => self.adoptions.fetch_add(1, Ordering::Relaxed),
            "stopped" => {
                let method = method.unwrap_or("unknown").to_owned();
                *self.stops.lock_or_recover().entry(method).or_default() += 1;
                0
            }
            _ => 0,
        };
    }

    /// Counts an exit nobody asked for: `poweroff` (from inside the guest)
    /// or `unexpected` (crash, kill, found gone).
    pub(super) fn exit(&self, reason: &'static str) {
        *self.exits.lock_or_recover().entry(reason).or_default() += 1;
    }

    /// From the exit task waking up (QEMU's end seen) to the state written.
    pub(crate) fn exit_recorded(&self, took: Duration) {
        self.exit_recording.lock_or_recover().observe(took);
    }

    pub(crate) fn provisioned(&self, made: Option<(&'static str, u64, Duration)>) {
        if let Some((method, bytes, took)) = made {
            let mut map = self.provisions.lock_or_recover();
            let p = map.entry(method).or_default();
            p.count += 1;
            p.bytes += bytes;
            p.seconds += took.as_secs_f64();
        }
    }
}

impl Service {
    /// The service's families, appended to `out`.
    pub async fn metrics(self: &Arc<Self>, out: &mut Text) -> Result<(), super::ServiceError> {
        let vms = self.store.list_vms(None)?;
        out.family("vman_vms", "gauge", "VMs by recorded state.");
        for state in [VmState::Running, VmState::Stopped, VmState::Error] {
            let n = vms.iter().filter(|v| v.state == state).count();
            out.sample("vman_vms", &[("state", state.as_str())], n);
        }
        self.write_counters(out);

        let running: Vec<_> = {
            let map = self.running.lock_or_recover();
            let mut list: Vec<_> = map
                .iter()
                .filter(|(_, r)| !r.has_exited())
                .map(|(id, r)| (id.to_string(), r.clone()))
                .collect();
            list.sort_by(|a, b| a.0.cmp(&b.0));
            list
        };
        let pids: Vec<i32> = running.iter().map(|(_, r)| r.pid).collect();
        let procs = super::blocking::blocking("metrics /proc", move || {
            pids.into_iter().map(stats::proc_stats).collect::<Vec<_>>()
        })
        .await?;
        let disks = self.counters.disk_stats(&running).await;

        out.family(
            "vman_vm_cpu_seconds_total",
            "counter",
            "CPU time (user + system) of the VM's QEMU process.",
        );
        for ((vm, _), p) in running.iter().zip(&procs) {
            if let Some(p) = p {
                out.sample("vman_vm_cpu_seconds_total", &[("vm", vm)], p.cpu_seconds);
            }
        }
        out.family(
            "vman_vm_memory_rss_bytes",
            "gauge",
            "Resident memory of the VM's QEMU process.",
        );
        for ((vm, _), p) in running.iter().zip(&procs) {
            if let Some(p) = p {
                out.sample("vman_vm_memory_rss_bytes", &[("vm", vm)], p.rss_bytes);
            }
        }
        type Field = fn(&stats::BlockStats) -> u64;
        let io: [(&str, &str, Field); 4] = [
            (
                "vman_vm_disk_read_bytes_total",
                "Bytes read by the guest from the disk.",
                |b| b.read_bytes,
            ),
            (
                "vman_vm_disk_write_bytes_total",
                "Bytes written by the guest to the disk.",
                |b| b.write_bytes,
            ),
            (
                "vman_vm_disk_read_ops_total",
                "Read operations of the guest on the disk.",
                |b| b.read_ops,
            ),
            (
                "vman_vm_disk_write_ops_total",
                "Write operations of the guest on the disk.",
                |b| b.write_ops,
            ),
        ];
        for (name, help, field) in io {
            out.family(name, "counter", help);
            for ((vm, _), answer) in running.iter().zip(&disks) {
                for b in answer.iter().flat_map(|(_, list)| list) {
                    out.sample(name, &[("vm", vm), ("disk", &b.disk)], field(b));
                }
            }
        }
        out.family(
            "vman_vm_disk_stats_age_seconds",
            "gauge",
            "Age of the query-blockstats answer the disk series of the VM come from.",
        );
        for ((vm, _), answer) in running.iter().zip(&disks) {
            if let Some((age, _)) = answer {
                out.sample(
                    "vman_vm_disk_stats_age_seconds",
                    &[("vm", vm)],
                    age.as_secs_f64(),
                );
            }
        }
        Ok(())
    }

    fn write_counters(&self, out: &mut Text) {
        let c = &self.counters;
        out.family("vman_vm_starts_total", "counter", "VM starts, by result.");
        out.sample(
            "vman_vm_starts_total",
            &[("result", "ok")],
            c.starts_ok.load(Ordering::Relaxed),
        );
        out.sample(
            "vman_vm_starts_total",
            &[("result", "failed")],
            c.starts_failed.load(Ordering::Relaxed),
        );
        out.family(
            "vman_vm_adoptions_total",
            "counter",
            "Running QEMUs taken over after a vman restart.",
        );
        out.sample(
            "vman_vm_adoptions_total",
            &[],
            c.adoptions.load(Ordering::Relaxed),
        );
        out.family(
            "vman_vm_stops_total",
            "counter",
            "VM stops asked for, by how QEMU ended (acpi, quit, killed, already_exited).",
        );
        for (method, n) in c.stops.lock_or_recover().iter() {
            out.sample("vman_vm_stops_total", &[("method", method)], n);
        }
        out.family(
            "vman_vm_exits_total",
            "counter",
            "QEMU exits nobody asked for, by reason (poweroff from inside the guest, unexpected).",
        );
        for reason in ["poweroff", "unexpected"] {
            let n = c.exits.lock_or_recover().get(reason).copied().unwrap_or(0);
            out.sample("vman_vm_exits_total", &[("reason", reason)], n);
        }
        out.family(
            "vman_exit_detection_seconds",
            "histogram",
            "From QEMU's end seen by its exit task (pidfd or child wait) to the VM's state recorded.",
        );
        let h = c.exit_recording.lock_or_recover().clone();
        out.histogram("vman_exit_detection_seconds", &[], &h);
        let provisions = c.provisions.lock_or_recover().clone();
        out.family("vman_root_disk_provisions_total", "counter", "Root disks made at a start, by method (reflink, copy_file_range, read_write, convert, overlay).");
        for (m, p) in &provisions {
            out.sample("vman_root_disk_provisions_total", &[("method", m)], p.count);
        }
        out.family(
            "vman_root_disk_provision_bytes_total",
            "counter",
            "Bytes of root disks made, by method.",
        );
        for (m, p) in &provisions {
            out.sample(
                "vman_root_disk_provision_bytes_total",
                &[("method", m)],
                p.bytes,
            );
        }
        out.family(
            "vman_root_disk_provision_seconds_total",
            "counter",
            "Time spent making root disks, by method.",
        );
        for (m, p) in &provisions {
            out.sample(
                "vman_root_disk_provision_seconds_total",
                &[("method", m)],
                p.seconds,
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative_and_labels_escaped() {
        let mut h = Histogram::default();
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_secs(20));
        let mut t = Text::default();
        t.histogram("x", &[("route", "/a\"b\\")], &h);
        assert!(
            t.0.contains("x_bucket{route=\"/a\\\"b\\\\\",le=\"0.0025\"} 0\n"),
            "{}",
            t.0
        );
        assert!(
            t.0.contains("x_bucket{route=\"/a\\\"b\\\\\",le=\"0.005\"} 1\n"),
            "{}",
            t.0
        );
        assert!(t.0.contains("le=\"+Inf\"} 2\n"), "{}", t.0);
        assert!(
            t.0.contains("x_count{route=\"/a\\\"b\\\\\"} 2\n"),
            "{}",
            t.0
        );
    }
}
