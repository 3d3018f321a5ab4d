//! IMDSv2 session tokens: random, bound to the VM that asked for one, with
//! the lifetime the guest chose (1 s to 6 h). Kept in memory only (a vman
//! restart forgets them; clients then ask again, as after an expiry), at
//! most `PER_VM` per VM (the oldest goes first).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::model::Name;
use crate::sync::LockExt;

/// Live tokens kept per VM.
const PER_VM: usize = 64;

#[derive(Debug, PartialEq, Eq)]
pub enum TokenCheck {
    Valid,
    Invalid,
}

#[derive(Default)]
pub struct Tokens {
    /// Per VM: (token, expiry), oldest first.
    by_vm: Mutex<HashMap<Name, Vec<(String, Instant)>>>,
}

impl Tokens {
    /// A new token for `vm`, valid `ttl` seconds.
    pub fn issue(&self, vm: &Name, ttl: u64) -> String {
        let token = format!(
            "{}{}",
            uuid::Uuid::new_v4().simple(),
            uuid::Uuid::new_v4().simple()
        );
        let now = Instant::now();
        let mut map = self.by_vm.lock_or_recover();
        let list = map.entry(vm.clone()).or_default();
        list.retain(|(_, exp)| *exp > now);
        if list.len() >= PER_VM {
            list.remove(0);
        }
        list.push((token.clone(), now + Duration::from_secs(ttl)));
        token
    }

    /// Whether `token` was issued to `vm` and has not expired.
    pub fn check(&self, token: &str, vm: &Name) -> TokenCheck {
        let now = Instant::now();
        let map = self.by_vm.lock_or_recover();
        let ok = map
            .get(vm)
            .is_some_and(|l| l.iter().any(|(t, exp)| t == token && *exp > now));
        if ok {
            TokenCheck::Valid
        } else {
            TokenCheck::Invalid
        }
    }

    /// Forgets a VM's tokens (its channel closed).
    pub fn forget(&self, vm: &Name) {
        self.by_vm.lock_or_recover().remove(vm);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_per_vm_bounded_and_expire() {
        let t = Tokens::default();
        let (a, b) = (
            Name::parse("id", "a").expect("a"),
            Name::parse("id", "b").expect("b"),
        );
        let ta = t.issue(&a, 60);
        assert_eq!(ta.len(), 64);
        assert_eq!(t.check(&ta, &a), TokenCheck::Valid);
        assert_eq!(t.check(&ta, &b), TokenCheck::Invalid);
        assert_eq!(t.check("", &a), TokenCheck::Invalid);
        let first = t.issue(&a, 60);
        for _ in 0..PER_VM {
            t.issue(&a, 60);
        }
        assert_eq!(t.check(&first, &a), TokenCheck::Invalid, "oldest dropped");
        // Expiry, without sleeping: a token whose expiry has passed.
        t.by_vm
            .lock_or_recover()
            .entry(b.clone())
            .or_default()
            .push(("old".into(), Instant::now()));
        assert_eq!(t.check("old", &b), TokenCheck::Invalid);
        t.forget(&a);
        assert_eq!(t.check(&ta, &a), TokenCheck::Invalid);
    }
}
