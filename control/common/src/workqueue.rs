//! The work queue every controller uses, as client-go's: keys of objects
//! to sync, each queued at most once and never handed to two workers at a
//! time, with rate-limited retries and batching.

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::Notify;

/// The state of a [`WorkQueue`].
#[derive(Debug, Default)]
struct QueueState {
    queue: VecDeque<String>,
    dirty: HashSet<String>,
    processing: HashSet<String>,
    failures: HashMap<String, u32>,
    /// Keys waiting for their batch period to end ([`WorkQueue::add_batched`]).
    batched: HashSet<String>,
}

/// A work queue of object keys as client-go's: a key is queued at most once,
/// and is never handed to two workers at the same time; one that changes
/// while processed is queued again when done.
#[derive(Debug, Default)]
pub struct WorkQueue {
    state: Mutex<QueueState>,
    notify: Notify,
}

impl WorkQueue {
    /// An empty queue.
    pub fn new() -> WorkQueue {
        WorkQueue::default()
    }

    /// Queue `key`.
    pub fn add(&self, key: &str) {
        let mut state = self.state.lock().expect("queue lock");
        if !state.dirty.insert(key.to_string()) {
            return;
        }
        if !state.processing.contains(key) {
            state.queue.push_back(key.to_string());
            drop(state);
            self.notify.notify_one();
        }
    }

    /// Queue `key` after `delay`.
    pub fn add_after(self: &std::sync::Arc<Self>, key: &str, delay: Duration) {
        let queue = self.clone();
        let key = key.to_string();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            queue.add(&key);
        });
    }

    /// Queue `key` at the end of a batch `period` that starts now, unless it
    /// is already waiting to be processed or for a batch: every change
    /// reported meanwhile is handled by one sync (client-go's `AddAfter`
    /// with a batch period, as the endpoints controllers' batching does).
    pub fn add_batched(self: &std::sync::Arc<Self>, key: &str, period: Duration) {
        {
            let mut state = self.state.lock().expect("queue lock");
            if state.dirty.contains(key) || !state.batched.insert(key.to_string()) {
                return;
            }
        }
        let queue = self.clone();
        let key = key.to_string();
        tokio::spawn(async move {
            tokio::time::sleep(period).await;
            queue.state.lock().expect("queue lock").batched.remove(&key);
            queue.add(&key);
        });
    }

    /// Queue `key` again after a failure, with exponential backoff.
    pub fn add_rate_limited(self: &std::sync::Arc<Self>, key: &str) {
        let failures = {
            let mut state = self.state.lock().expect("queue lock");
            let n = state.failures.entry(key.to_string()).or_default();
            *n += 1;
            *n
        };
        let delay = Duration::from_millis(20u64 << failures.min(11)).min(Duration::from_secs(30));
        self.add_after(key, delay);
    }

    /// Reset `key`'s backoff after a success.
    pub fn forget(&self, key: &str) {
        self.state.lock().expect("queue lock").failures.remove(key);
    }

    /// The next key to process; call [`WorkQueue::done`] after.
    pub async fn next(&self) -> String {
        loop {
            let notified = self.notify.notified();
            {
                let mut state = self.state.lock().expect("queue lock");
                if let Some(key) = state.queue.pop_front() {
                    state.dirty.remove(&key);
                    state.processing.insert(key.clone());
                    if !state.queue.is_empty() {
                        self.notify.notify_one();
                    }
                    return key;
                }
            }
            notified.await;
        }
    }

    /// Mark `key` processed; queue it again if it changed meanwhile.
    pub fn done(&self, key: &str) {
        let mut state = self.state.lock().expect("queue lock");
        state.processing.remove(key);
        if state.dirty.contains(key) {
            state.queue.push_back(key.to_string());
            drop(state);
            self.notify.notify_one();
        }
    }

    /// One worker: once `synced` holds, takes keys and runs `sync` on each
    /// until `shutdown`. A key that synced is forgotten by the rate limiter
    /// (and queued again after the delay `sync` asks for); one that failed
    /// is logged with its causes and queued again, rate-limited.
    pub async fn run_worker<F, Fut, E>(
        self: &std::sync::Arc<Self>,
        what: &str,
        synced: impl Fn() -> bool,
        shutdown: &tokio_util::sync::CancellationToken,
        sync: F,
    ) where
        F: Fn(String) -> Fut,
        Fut: Future<Output = Result<Option<Duration>, E>>,
        E: std::error::Error,
    {
        while !synced() {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(Duration::from_millis(50)) => {}
            }
        }
        loop {
            let key = tokio::select! {
                () = shutdown.cancelled() => return,
                key = self.next() => key,
            };
            let result = tokio::select! {
                () = shutdown.cancelled() => return,
                result = sync(key.clone()) => result,
            };
            match result {
                Ok(requeue) => {
                    self.forget(&key);
                    if let Some(after) = requeue {
                        self.add_after(&key, after);
                    }
                }
                Err(error) => {
                    tracing::info!(key, error = %crate::error::chain(&error), "{what} sync failed, retrying");
                    self.add_rate_limited(&key);
                }
            }
            self.done(&key);
        }
    }

    /// How many keys wait.
    pub fn len(&self) -> usize {
        self.state.lock().expect("queue lock").queue.len()
    }

    /// Whether no key waits.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn queue_deduplicates_and_requeues_dirty_keys() {
        let q = WorkQueue::new();
        q.add("a");
        q.add("a");
        q.add("b");
        assert_eq!(q.len(), 2);
        let first = q.next().await;
        assert_eq!(first, "a");
        q.add("a");
        assert_eq!(q.len(), 1, "a is processing: not queued twice");
        assert_eq!(q.next().await, "b");
        q.done("b");
        q.done("a");
        assert_eq!(
            q.next().await,
            "a",
            "changed while processing: queued again"
        );
    }

    // Paused time: the clock moves only when every task waits, so the
    // test's sleeps end exactly after the batch periods they outlast.
    #[tokio::test(start_paused = true)]
    async fn batched_keys_are_queued_once_at_the_end_of_the_period() {
        let q = std::sync::Arc::new(WorkQueue::new());
        let period = Duration::from_millis(100);
        q.add_batched("a", period);
        tokio::time::sleep(Duration::from_millis(40)).await;
        q.add_batched("a", period);
        assert!(q.is_empty(), "nothing is queued during the period");
        tokio::time::sleep(Duration::from_millis(70)).await;
        assert_eq!(q.len(), 1, "queued once, when the first period ended");
        assert_eq!(q.next().await, "a");
        // Processing: a batched change waits for its period, then runs again.
        q.add_batched("a", period);
        q.done("a");
        assert!(q.is_empty());
        tokio::time::sleep(Duration::from_millis(110)).await;
        assert_eq!(q.next().await, "a", "a change during the sync is not lost");
        q.done("a");
        // Already queued: the queued sync will see the change.
        q.add("b");
        q.add_batched("b", period);
        tokio::time::sleep(Duration::from_millis(110)).await;
        assert_eq!(q.len(), 1, "b is queued once");
    }
}
