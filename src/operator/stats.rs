//! Usage figures of a running QEMU for /metrics: CPU time and resident
//! memory from `/proc/<pid>/stat` and `statm`, and per-disk I/O counters
//! from QMP `query-blockstats` (the service bounds how long a scrape waits).

use std::sync::Arc;

use serde_json::Value;

use super::qmp::Qmp;

/// CPU seconds (user + system) and resident bytes of a process.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ProcStats {
    pub cpu_seconds: f64,
    pub rss_bytes: u64,
}

/// I/O counters of one disk of a VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockStats {
    /// `root`, or the data disk's id.
    pub disk: String,
    pub read_bytes: u64,
    pub write_bytes: u64,
    pub read_ops: u64,
    pub write_ops: u64,
}

fn sysconf(name: libc::c_int, fallback: u64) -> u64 {
    // SAFETY: sysconf has no memory effects.
    let v = unsafe { libc::sysconf(name) };
    u64::try_from(v).ok().filter(|v| *v > 0).unwrap_or(fallback)
}

/// Reads `/proc/<pid>/stat` and `/proc/<pid>/statm`; `None` once the
/// process is gone.
pub fn proc_stats(pid: i32) -> Option<ProcStats> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let statm = std::fs::read_to_string(format!("/proc/{pid}/statm")).ok()?;
    parse_proc(
        &stat,
        &statm,
        sysconf(libc::_SC_CLK_TCK, 100),
        sysconf(libc::_SC_PAGESIZE, 4096),
    )
}

/// The pure part of `proc_stats`.
fn parse_proc(stat: &str, statm: &str, ticks: u64, page: u64) -> Option<ProcStats> {
    // The command name (field 2) may hold spaces and parentheses: the
    // fields after it start at the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state is field 3, utime 14, stime 15 (1-based).
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    let resident: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(ProcStats {
        cpu_seconds: (utime + stime) as f64 / ticks as f64,
        rss_bytes: resident * page,
    })
}

/// `query-blockstats`; `None` when QEMU refuses or does not answer within
/// QMP's command timeout. Callers that cannot wait that long run it in a
/// task of its own and stop waiting for the task (never cancelling it
/// mid-exchange).
pub async fn block_stats(qmp: Arc<Qmp>) -> Option<Vec<BlockStats>> {
    match qmp.execute("query-blockstats", None).await {
        Ok(reply) => Some(parse_blockstats(&reply)),
        Err(e) => {
            tracing::debug!("query-blockstats: {e}");
            None
        }
    }
}

/// The disk a blockstats entry is about, from its device's qdev id:
/// `root-disk` is the root disk, `disk-<id>` a data disk.
fn parse_blockstats(reply: &Value) -> Vec<BlockStats> {
    let Some(list) = reply.as_array() else {
        return Vec::new();
    };
    list.iter()
        .filter_map(|entry| {
            let qdev = entry["qdev"].as_str()?;
            let id = qdev
                .trim_start_matches("/machine/peripheral/")
                .split('/')
                .next()?;
            let disk = match id {
                "root-disk" => "root".to_owned(),
                other => other.strip_prefix("disk-")?.to_owned(),
            };
            let s = &entry["stats"];
            let n = |k: &str| s[k].as_u64().unwrap_or(0);
            Some(BlockStats {
                disk,
                read_bytes: n("rd_bytes"),
                write_bytes: n("wr_bytes"),
                read_ops: n("rd_operations"),
                write_ops: n("wr_operations"),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_fields_after_a_name_with_spaces_and_parentheses() {
        let stat = "1234 (qemu (x) y) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 3 0 100 1000000 2000";
        let s = parse_proc(stat, "5000 300 100 1 0 200 0", 100, 4096).expect("parsed");
        assert_eq!(s.cpu_seconds, 3.0);
        assert_eq!(s.rss_bytes, 300 * 4096);
        assert_eq!(parse_proc("garbage", "1 2", 100, 4096), None);
        let me = proc_stats(std::process::id() as i32).expect("own process");
        assert!(me.rss_bytes > 0);
    }

    #[test]
    fn blockstats_by_disk() {
        let reply = serde_json::json!([
            {"device": "", "qdev": "/machine/peripheral/root-disk/virtio-backend",
             "stats": {"rd_bytes": 10, "wr_bytes": 20, "rd_operations": 1, "wr_operations": 2}},
            {"device": "", "qdev": "/machine/peripheral/disk-d1/virtio-backend",
             "stats": {"rd_bytes": 5, "wr_bytes": 0, "rd_operations": 1, "wr_operations": 0}},
            {"device": "", "node-name": "x", "stats": {}},
            {"device": "", "qdev": "/machine/peripheral-anon/device[3]/virtio-backend", "stats": {}}
        ]);
        let got = parse_blockstats(&reply);
        assert_eq!(got.len(), 2);
        assert_eq!((got[0].disk.as_str(), got[0].write_bytes), ("root", 20));
        assert_eq!((got[1].disk.as_str(), got[1].read_ops), ("d1", 1));
    }
}
