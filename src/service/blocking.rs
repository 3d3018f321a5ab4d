//! The service's one door to blocking work: file probes, `qemu-img` runs and
//! copies go to tokio's blocking threads, never onto the async workers that
//! serve requests. Handlers call async service methods and never spawn
//! blocking tasks themselves.

use super::ServiceError;

/// Runs `f` on a blocking thread; a panic or cancellation of that thread
/// becomes an internal error naming `what`.
pub(crate) async fn blocking<T, F>(what: &'static str, f: F) -> Result<T, ServiceError>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ServiceError::Internal(format!("{what} task: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn runs_off_the_async_workers_and_reports_a_panic() {
        let on_worker = blocking("probe", || {
            tokio::runtime::Handle::try_current()
                .map(|h| h.runtime_flavor())
                .ok()
        })
        .await
        .expect("ran");
        // A blocking thread of the runtime still sees the handle.
        assert!(on_worker.is_some());
        let e = blocking("boom", || -> u8 { panic!("bad") })
            .await
            .expect_err("panic");
        assert!(e.to_string().contains("boom task"), "{e}");
    }
}
