//! Creation and deletion expectations of the workload controllers
//! (upstream's `ControllerExpectations`): a controller that created or
//! deleted pods waits until its watch has seen them before it counts pods
//! again, so it never acts twice on a stale cache.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long expectations may stay unmet before they are ignored (upstream's
/// `ExpectationsTimeout`).
pub const EXPECTATIONS_TIMEOUT: Duration = Duration::from_secs(300);

/// One controller's expected creations and deletions.
#[derive(Debug, Default)]
struct Expected {
    adds: i64,
    deletes: HashSet<String>,
    since: Option<Instant>,
}

/// Upstream's `UIDTrackingControllerExpectations`: what a controller has
/// asked for and not seen through its watch yet, so it never creates or
/// deletes twice while the watch lags.
#[derive(Debug, Default)]
pub struct Expectations {
    inner: Mutex<HashMap<String, Expected>>,
}

impl Expectations {
    /// No expectations.
    pub fn new() -> Expectations {
        Expectations::default()
    }

    /// Whether `key` may act: everything seen, nothing recorded, or expired.
    pub fn satisfied(&self, key: &str) -> bool {
        let inner = self.inner.lock().expect("expectations lock");
        match inner.get(key) {
            None => true,
            Some(e) => {
                (e.adds <= 0 && e.deletes.is_empty())
                    || e.since.is_some_and(|s| s.elapsed() > EXPECTATIONS_TIMEOUT)
            }
        }
    }

    /// Expect `count` creations.
    pub fn expect_creations(&self, key: &str, count: usize) {
        let mut inner = self.inner.lock().expect("expectations lock");
        let e = inner.entry(key.to_string()).or_default();
        e.adds = i64::try_from(count).unwrap_or(i64::MAX);
        e.deletes.clear();
        e.since = Some(Instant::now());
    }

    /// Expect the pods with these UIDs to be deleted.
    pub fn expect_deletions(&self, key: &str, uids: impl IntoIterator<Item = String>) {
        let mut inner = self.inner.lock().expect("expectations lock");
        let e = inner.entry(key.to_string()).or_default();
        e.adds = 0;
        e.deletes = uids.into_iter().collect();
        e.since = Some(Instant::now());
    }

    /// A creation was seen (or will never happen).
    pub fn creation_observed(&self, key: &str) {
        if let Some(e) = self.inner.lock().expect("expectations lock").get_mut(key) {
            e.adds -= 1;
        }
    }

    /// The pod `uid` was seen deleted or terminating (or will never be).
    pub fn deletion_observed(&self, key: &str, uid: &str) {
        if let Some(e) = self.inner.lock().expect("expectations lock").get_mut(key) {
            e.deletes.remove(uid);
        }
    }

    /// Forget `key` (its controller is gone).
    pub fn forget(&self, key: &str) {
        self.inner.lock().expect("expectations lock").remove(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expectations_block_until_observed() {
        let e = Expectations::new();
        assert!(e.satisfied("ns/rs"), "nothing recorded");
        e.expect_creations("ns/rs", 2);
        assert!(!e.satisfied("ns/rs"));
        e.creation_observed("ns/rs");
        assert!(!e.satisfied("ns/rs"));
        e.creation_observed("ns/rs");
        assert!(e.satisfied("ns/rs"));
        e.expect_deletions("ns/rs", ["u1".to_string(), "u2".to_string()]);
        e.deletion_observed("ns/rs", "u1");
        e.deletion_observed("ns/rs", "u1");
        assert!(!e.satisfied("ns/rs"), "the same deletion counts once");
        e.deletion_observed("ns/rs", "u2");
        assert!(e.satisfied("ns/rs"));
    }
}
