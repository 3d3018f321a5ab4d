//! Fault points for crash tests: `point("clone.after_copy")` aborts the
//! process (as a kill -9 would stop it: no unwinding, no cleanup) when the
//! environment variable `VMAN_FAULT_POINT` names that point. Only in debug
//! builds (the tests' binary); a release build never reads the variable.

/// Aborts here when `VMAN_FAULT_POINT` is `name` (debug builds only).
pub fn point(name: &str) {
    if cfg!(debug_assertions) && std::env::var_os("VMAN_FAULT_POINT").is_some_and(|v| v == name) {
        eprintln!("VMAN_FAULT_POINT: aborting at {name}");
        std::process::abort();
    }
}
