//! `lock_or_recover`: the one way vman takes a `std::sync::Mutex`.
//!
//! A mutex is poisoned when a thread panicked while holding it. vman's
//! guarded values (maps of VMs, caches, connections, a log file) stay
//! usable after such a panic, so every site takes the value anyway instead
//! of panicking in turn.

use std::sync::{Mutex, MutexGuard};

/// `Mutex::lock`, recovering the guard of a poisoned mutex.
pub trait LockExt<T: ?Sized> {
    fn lock_or_recover(&self) -> MutexGuard<'_, T>;
}

impl<T: ?Sized> LockExt<T> for Mutex<T> {
    fn lock_or_recover(&self) -> MutexGuard<'_, T> {
        self.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::LockExt;
    use std::sync::{Arc, Mutex};

    #[test]
    fn a_poisoned_mutex_still_gives_its_value() {
        let m = Arc::new(Mutex::new(1));
        let m2 = m.clone();
        let _ = std::thread::spawn(move || {
            let _g = m2.lock_or_recover();
            panic!("poison it");
        })
        .join();
        assert!(m.is_poisoned());
        *m.lock_or_recover() += 1;
        assert_eq!(*m.lock_or_recover(), 2);
    }
}
