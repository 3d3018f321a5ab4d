//! The web console (`/ui`) in a real browser: headless Chromium driven by
//! chromedriver, against the real `vman` binary with real tiny TCG guests.
//! The page must have been built into the binary (`npm ci && npm run build`
//! in `ui/`, which scripts/test.sh does before `cargo build`). Screenshots
//! go to `target/ui-artifacts/`. Every wait is for a DOM condition with a
//! generous deadline.

mod bench;
mod browser;
#[path = "../common/mod.rs"]
mod common;
mod forms;
#[allow(dead_code)]
#[path = "../e2e/harness.rs"]
mod harness;
mod pages;
