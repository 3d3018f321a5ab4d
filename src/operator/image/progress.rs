//! Progress of one root disk being made: which method, bytes done and the
//! total, as atomics. The copy loop and the qemu-img `-p` reader only store
//! into them (no lock, one store per chunk); readers take a `snapshot`.

use std::io::Read;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};

/// The methods, in the order of their index in `Progress::method`.
pub const METHODS: [&str; 7] = [
    "pending",
    "reflink",
    "copy_file_range",
    "read_write",
    "convert",
    "overlay",
    "empty",
];

/// Shared between the thread making a root disk and whoever asks how far it is.
#[derive(Debug, Default)]
pub struct Progress {
    method: AtomicU8,
    done: AtomicU64,
    total: AtomicU64,
}

/// What a reader sees at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Snapshot {
    pub method: &'static str,
    pub bytes_done: u64,
    pub bytes_total: u64,
}

impl Progress {
    pub fn new() -> Self {
        Self::default()
    }

    /// Names the method (one of `METHODS`; anything else is `pending`).
    pub fn set_method(&self, method: &str) {
        let i = METHODS.iter().position(|m| *m == method).unwrap_or(0);
        self.method.store(i as u8, Ordering::Relaxed);
    }

    /// Sets the total and starts over at 0.
    pub fn begin(&self, total: u64) {
        self.done.store(0, Ordering::Relaxed);
        self.total.store(total, Ordering::Relaxed);
    }

    /// Bytes done so far (never above the total, never backwards).
    pub fn advance_to(&self, done: u64) {
        let done = done.min(self.total.load(Ordering::Relaxed));
        self.done.fetch_max(done, Ordering::Relaxed);
    }

    /// All done.
    pub fn finish(&self) {
        self.done
            .store(self.total.load(Ordering::Relaxed), Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> Snapshot {
        let total = self.total.load(Ordering::Relaxed);
        Snapshot {
            method: METHODS
                .get(usize::from(self.method.load(Ordering::Relaxed)))
                .copied()
                .unwrap_or("pending"),
            bytes_done: self.done.load(Ordering::Relaxed).min(total),
            bytes_total: total,
        }
    }
}

/// Reads qemu-img's `-p` output (`    (12.34/100%)\r` repeated) from `out`
/// until it ends, turning each percentage into bytes of `progress`'s total.
pub(super) fn follow_percentages(mut out: impl Read, progress: &Progress) {
    let mut buf = [0u8; 512];
    let mut line = Vec::with_capacity(64);
    loop {
        let n = match out.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        for &b in &buf[..n] {
            if b == b'\r' || b == b'\n' {
                if let Some(pct) = parse_percentage(&line) {
                    let total = progress.total.load(Ordering::Relaxed);
                    progress.advance_to((total as f64 * pct / 100.0) as u64);
                }
                line.clear();
            } else if line.len() < 64 {
                line.push(b);
            }
        }
    }
}

/// `    (12.34/100%)` → 12.34.
fn parse_percentage(line: &[u8]) -> Option<f64> {
    let s = std::str::from_utf8(line).ok()?.trim();
    let inner = s.strip_prefix('(')?.strip_suffix("/100%)")?;
    let pct: f64 = inner.trim().parse().ok()?;
    (0.0..=100.0).contains(&pct).then_some(pct)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentages_become_bytes_and_never_go_back() {
        let p = Progress::new();
        p.set_method("convert");
        p.begin(1000);
        let out: &[u8] =
            b"    (0.00/100%)\r    (25.00/100%)\r    (10.00/100%)\r garbage\r    (50.5/100%)\r";
        follow_percentages(out, &p);
        assert_eq!(
            p.snapshot(),
            Snapshot {
                method: "convert",
                bytes_done: 505,
                bytes_total: 1000
            }
        );
        assert_eq!(parse_percentage(b"(100.00/100%)"), Some(100.0));
        assert_eq!(parse_percentage(b"(101/100%)"), None);
        assert_eq!(parse_percentage(b"12%"), None);
        p.advance_to(5000);
        assert_eq!(p.snapshot().bytes_done, 1000);
        p.set_method("nonsense");
        assert_eq!(p.snapshot().method, "pending");
    }
}
