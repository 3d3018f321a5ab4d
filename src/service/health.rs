//! Health checks: the database answers, the storage folder is writable, and
//! the QEMU tools are there. The QEMU tool lookups are cached: they do not
//! change while vman runs, and /health is polled often.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::OnceLock;

use super::Service;
use crate::operator::tools::tool_version;

#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
pub struct Check {
    pub ok: bool,
    pub detail: String,
}

impl Check {
    fn from_result(r: Result<String, String>) -> Self {
        match r {
            Ok(detail) => Self { ok: true, detail },
            Err(detail) => Self { ok: false, detail },
        }
    }
}

/// Versions of the QEMU tools, looked up once.
#[derive(Debug, Default)]
pub(crate) struct Tools {
    qemu: OnceLock<Result<String, String>>,
    qemu_img: OnceLock<Result<String, String>>,
}

#[derive(Debug, Clone)]
pub struct HealthReport {
    pub checks: BTreeMap<&'static str, Check>,
}

impl HealthReport {
    pub fn ok(&self) -> bool {
        self.checks.values().all(|c| c.ok)
    }
}

fn storage_writable(dir: &Path) -> Result<String, String> {
    let probe = dir.join(format!(".health-{}", std::process::id()));
    let written = std::fs::write(&probe, b"ok");
    // Removed whatever happened: a full disk creates the file, then fails
    // to write it.
    let removed = match std::fs::remove_file(&probe) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        other => other,
    };
    written
        .and(removed)
        .map(|()| format!("{} writable", dir.display()))
        .map_err(|e| format!("{} not writable: {e}", dir.display()))
}

impl Service {
    /// The health report, made on a blocking thread (it pings the database,
    /// writes to the storage and may run the QEMU tools once).
    pub async fn check_health(self: &std::sync::Arc<Self>) -> HealthReport {
        let service = self.clone();
        match super::blocking::blocking("health", move || service.health()).await {
            Ok(report) => report,
            Err(e) => HealthReport {
                checks: BTreeMap::from([("service", Check::from_result(Err(e.to_string())))]),
            },
        }
    }

    pub fn health(&self) -> HealthReport {
        let mut checks = BTreeMap::new();
        checks.insert(
            "database",
            Check::from_result(self.store.ping().map_err(|e| e.to_string()).and_then(|()| {
                match self.store.reserve_missing() {
                    Some(why) => Err(format!("space reserve missing: {why}")),
                    None => Ok("ok".to_owned()),
                }
            })),
        );
        checks.insert(
            "storage",
            Check::from_result(storage_writable(&self.config.storage_path)),
        );
        checks.insert(
            "qemu",
            Check::from_result(
                self.tools
                    .qemu
                    .get_or_init(|| tool_version(&self.config.qemu_binary))
                    .clone(),
            ),
        );
        checks.insert(
            "qemu-img",
            Check::from_result(
                self.tools
                    .qemu_img
                    .get_or_init(|| tool_version(&self.config.qemu_img))
                    .clone(),
            ),
        );
        checks.insert(
            "accelerator",
            Check {
                ok: true,
                detail: format!("{} ({})", self.host.accel.as_str(), self.host.accel_reason),
            },
        );
        checks.insert("observer", self.observer_check());
        let limit = self.memory_limit_mib();
        checks.insert(
            "memory",
            Check {
                ok: true,
                detail: format!(
                    "{} MiB of {limit} MiB reserved by running VMs",
                    self.memory_in_use()
                ),
            },
        );
        HealthReport { checks }
    }

    /// The observer is healthy when its last pass is recent.
    fn observer_check(&self) -> Check {
        let report = self.observer_report();
        let interval = self.config.observer_interval;
        let fresh = report.last_check_at.as_deref().and_then(|t| {
            chrono::DateTime::parse_from_rfc3339(t)
                .ok()
                .map(|at| chrono::Utc::now().signed_duration_since(at))
        });
        match fresh {
            Some(age) if age.num_seconds() <= 3 * interval as i64 + 1 => Check {
                ok: true,
                detail: format!(
                    "running: pass every {interval}s, {} issue(s) last pass",
                    report.issues.len()
                ),
            },
            Some(age) => Check {
                ok: false,
                detail: format!("no pass for {}s", age.num_seconds()),
            },
            None => Check {
                ok: true,
                detail: "starting".into(),
            },
        }
    }
}
