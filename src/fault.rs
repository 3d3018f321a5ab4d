//! Fault points for crash tests: `point("snapshot.after_overlay")` aborts
//! the process (as a `kill -9` would stop it: no destructor, no flush) when
//! the environment variable `VMAN_FAULT_POINT` equals that name. Compiled in
//! only in debug builds (what the tests run); a no-op in release builds.

/// The environment variable naming the point to abort at.
pub const ENV: &str = "VMAN_FAULT_POINT";

/// Aborts the process here when `VMAN_FAULT_POINT` is `name` (debug builds).
#[cfg(debug_assertions)]
pub fn point(name: &str) {
    if std::env::var_os(ENV).is_some_and(|v| v == name) {
        tracing::error!("fault point {name}: aborting ({ENV})");
        std::process::abort();
    }
}

/// Release builds: nothing.
#[cfg(not(debug_assertions))]
#[inline(always)]
pub fn point(_name: &str) {}
