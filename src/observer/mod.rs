//! The observer: the timer that runs the service's coherence pass
//! (`Service::coherence_pass`) every `VMAN_OBSERVER_INTERVAL` seconds and
//! keeps its findings for /observer/status and /health. Exits are noticed
//! at once by each VM's exit task (see `operator::vm`); this pass is the
//! safety net behind it.

use std::sync::Arc;
use std::time::Duration;

use crate::service::Service;

/// Runs passes forever (until the runtime stops).
pub async fn run(service: Arc<Service>, interval: Duration) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let issues = service.coherence_pass().await;
        for issue in issues.iter().filter(|i| !i.repaired) {
            tracing::debug!(
                "observer: {} {}: {}",
                issue.issue_type,
                issue.resource_id,
                issue.details
            );
        }
        service.record_observation(issues);
    }
}
