//! The scheduling queue, as upstream's: an active queue (highest priority
//! first, then oldest), a backoff queue (1 s doubling to 10 s per failed
//! attempt), and a pool of unschedulable pods that cluster changes (a node
//! added or changed, a pod gone) move back, as does a periodic flush after
//! five minutes.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// The backoff after the first failed attempt.
pub const INITIAL_BACKOFF: Duration = Duration::from_secs(1);
/// The longest backoff.
pub const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// How long a pod stays unschedulable before it is retried anyway.
pub const MAX_UNSCHEDULABLE: Duration = Duration::from_secs(300);

/// The backoff after `attempts` failed attempts.
pub fn backoff(attempts: u32) -> Duration {
    let doublings = attempts.saturating_sub(1).min(16);
    (INITIAL_BACKOFF * 2u32.pow(doublings)).min(MAX_BACKOFF)
}

/// A pod handed out for scheduling.
#[derive(Debug, Clone)]
pub struct QueuedPod {
    /// The pod as last seen.
    pub pod: Arc<Pod>,
    /// Its uid, the queue's key.
    pub uid: String,
    /// Scheduling attempts so far, this one included.
    pub attempts: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Place {
    Active,
    Backoff(Instant),
    Unschedulable(Instant),
    InFlight,
}

#[derive(Debug)]
struct Entry {
    pod: Arc<Pod>,
    attempts: u32,
    place: Place,
    /// Bumped on every move, so stale heap items are skipped.
    ticket: u64,
    fingerprint: u64,
    popped_in_cycle: u64,
    failed_at: Option<Instant>,
}

#[derive(Debug, Default)]
struct Inner {
    entries: HashMap<String, Entry>,
    /// (priority, oldest first, ticket, uid).
    active: BinaryHeap<(i32, Reverse<u64>, u64, String)>,
    /// (ready at, ticket, uid), earliest first.
    backoff: BinaryHeap<Reverse<(Instant, u64, String)>>,
    next_ticket: u64,
    move_cycle: u64,
}

/// What about a pod matters to scheduling: a change in it retries an
/// unschedulable pod; status changes (our own condition) do not.
fn fingerprint(pod: &Pod) -> u64 {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    serde_json::to_string(&pod.spec)
        .unwrap_or_default()
        .hash(&mut hasher);
    pod.metadata.labels.hash(&mut hasher);
    hasher.finish()
}

impl Inner {
    fn place(&mut self, uid: &str, place: Place) {
        let ticket = self.next_ticket;
        self.next_ticket += 1;
        let Some(entry) = self.entries.get_mut(uid) else {
            return;
        };
        entry.place = place;
        entry.ticket = ticket;
        match place {
            Place::Active => {
                let priority = entry
                    .pod
                    .spec
                    .as_ref()
                    .and_then(|s| s.priority)
                    .unwrap_or(0);
                self.active
                    .push((priority, Reverse(ticket), ticket, uid.to_string()));
            }
            Place::Backoff(at) => self.backoff.push(Reverse((at, ticket, uid.to_string()))),
            Place::Unschedulable(_) | Place::InFlight => {}
        }
    }

    fn promote_due(&mut self, now: Instant) {
        while let Some(Reverse((at, ticket, _))) = self.backoff.peek() {
            if *at > now {
                break;
            }
            let ticket = *ticket;
            let Some(Reverse((_, _, uid))) = self.backoff.pop() else {
                break;
            };
            if self.entries.get(&uid).is_some_and(|e| e.ticket == ticket) {
                self.place(&uid, Place::Active);
            }
        }
    }

    fn next_due(&mut self) -> Option<Instant> {
        while let Some(Reverse((at, ticket, uid))) = self.backoff.peek() {
            if self.entries.get(uid).is_some_and(|e| e.ticket == *ticket) {
                return Some(*at);
            }
            self.backoff.pop();
        }
        None
    }

    fn pop_active(&mut self) -> Option<QueuedPod> {
        while let Some((_, _, ticket, uid)) = self.active.pop() {
            let cycle = self.move_cycle;
            let Some(entry) = self.entries.get_mut(&uid).filter(|e| e.ticket == ticket) else {
                continue;
            };
            entry.attempts += 1;
            entry.popped_in_cycle = cycle;
            let popped = QueuedPod {
                pod: entry.pod.clone(),
                uid: uid.clone(),
                attempts: entry.attempts,
            };
            self.place(&uid, Place::InFlight);
            return Some(popped);
        }
        None
    }

    /// Where an unschedulable pod goes when the cluster changed: back to
    /// backoff if its backoff has not run out, else to the active queue.
    fn retry(&mut self, uid: &str, now: Instant) {
        let Some(entry) = self.entries.get(uid) else {
            return;
        };
        let ready = entry.failed_at.map(|at| at + backoff(entry.attempts));
        match ready {
            Some(at) if at > now => self.place(uid, Place::Backoff(at)),
            _ => self.place(uid, Place::Active),
        }
    }
}

/// The queue of pods waiting to be scheduled.
#[derive(Debug, Default)]
pub struct SchedulingQueue {
    inner: Mutex<Inner>,
    notify: Notify,
}

impl SchedulingQueue {
    /// An empty queue.
    pub fn new() -> SchedulingQueue {
        SchedulingQueue::default()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Add a pending pod, or update it: an unschedulable pod whose spec or
    /// labels changed is retried.
    pub fn add_or_update(&self, pod: Arc<Pod>, now: Instant) {
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        let print = fingerprint(&pod);
        let mut inner = self.lock();
        match inner.entries.get_mut(&uid) {
            None => {
                inner.entries.insert(
                    uid.clone(),
                    Entry {
                        pod,
                        attempts: 0,
                        place: Place::Active,
                        ticket: 0,
                        fingerprint: print,
                        popped_in_cycle: 0,
                        failed_at: None,
                    },
                );
                inner.place(&uid, Place::Active);
                drop(inner);
                self.notify.notify_one();
            }
            Some(entry) => {
                let changed = entry.fingerprint != print;
                entry.pod = pod;
                entry.fingerprint = print;
                if changed && matches!(entry.place, Place::Unschedulable(_)) {
                    inner.retry(&uid, now);
                    drop(inner);
                    self.notify.notify_one();
                }
            }
        }
    }

    /// Drop a pod (bound, deleted, or no longer ours).
    pub fn remove(&self, uid: &str) {
        self.lock().entries.remove(uid);
    }

    /// Keep only the pods `keep` accepts (after a re-list).
    pub fn retain(&self, keep: impl Fn(&str) -> bool) {
        self.lock().entries.retain(|uid, _| keep(uid));
    }

    /// Whether the queue holds a pod.
    pub fn contains(&self, uid: &str) -> bool {
        self.lock().entries.contains_key(uid)
    }

    /// Pods held, wherever they wait.
    pub fn len(&self) -> usize {
        self.lock().entries.len()
    }

    /// Whether the queue holds no pod.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Take the next pod to schedule without waiting.
    pub fn try_pop(&self, now: Instant) -> Option<QueuedPod> {
        let mut inner = self.lock();
        inner.promote_due(now);
        inner.pop_active()
    }

    /// Wait for the next pod to schedule; `None` once `shutdown` is cancelled.
    pub async fn pop(&self, shutdown: &CancellationToken) -> Option<QueuedPod> {
        loop {
            let due = {
                let mut inner = self.lock();
                inner.promote_due(Instant::now());
                if let Some(popped) = inner.pop_active() {
                    return Some(popped);
                }
                inner.next_due()
            };
            let sleep = match due {
                Some(at) => tokio::time::sleep_until(at.into()),
                None => tokio::time::sleep(Duration::from_secs(3600)),
            };
            tokio::select! {
                _ = shutdown.cancelled() => return None,
                _ = self.notify.notified() => {}
                _ = sleep => {}
            }
        }
    }

    /// A popped pod fit no node: it waits for a cluster change, unless one
    /// already happened while it was being scheduled (then it backs off).
    pub fn unschedulable(&self, uid: &str, now: Instant) {
        let mut inner = self.lock();
        let cycle = inner.move_cycle;
        let Some(entry) = inner.entries.get_mut(uid) else {
            return;
        };
        entry.failed_at = Some(now);
        let place = if entry.popped_in_cycle < cycle {
            Place::Backoff(now + backoff(entry.attempts))
        } else {
            Place::Unschedulable(now)
        };
        inner.place(uid, place);
        drop(inner);
        self.notify.notify_one();
    }

    /// A popped pod failed for another reason (its binding): it backs off.
    pub fn backoff(&self, uid: &str, now: Instant) {
        let mut inner = self.lock();
        let Some(entry) = inner.entries.get_mut(uid) else {
            return;
        };
        entry.failed_at = Some(now);
        let at = now + backoff(entry.attempts);
        inner.place(uid, Place::Backoff(at));
        drop(inner);
        self.notify.notify_one();
    }

    /// The cluster changed in a way that may make unschedulable pods fit.
    pub fn move_all_unschedulable(&self, now: Instant) {
        let mut inner = self.lock();
        inner.move_cycle += 1;
        let waiting: Vec<String> = inner
            .entries
            .iter()
            .filter(|(_, e)| matches!(e.place, Place::Unschedulable(_)))
            .map(|(uid, _)| uid.clone())
            .collect();
        if waiting.is_empty() {
            return;
        }
        for uid in waiting {
            inner.retry(&uid, now);
        }
        drop(inner);
        self.notify.notify_one();
    }

    /// Retry pods unschedulable for longer than [`MAX_UNSCHEDULABLE`].
    pub fn flush_stale(&self, now: Instant) {
        let mut inner = self.lock();
        let stale: Vec<String> = inner
            .entries
            .iter()
            .filter(|(_, e)| matches!(e.place, Place::Unschedulable(since) if now.duration_since(since) >= MAX_UNSCHEDULABLE))
            .map(|(uid, _)| uid.clone())
            .collect();
        if stale.is_empty() {
            return;
        }
        for uid in stale {
            inner.place(&uid, Place::Active);
        }
        drop(inner);
        self.notify.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(uid: &str, priority: i32) -> Arc<Pod> {
        Arc::new(
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": uid, "uid": uid},
                "spec": {"priority": priority, "containers": [{"name": "c"}]}}))
            .expect("pod json"),
        )
    }

    #[test]
    fn backoff_doubles_from_one_to_ten_seconds() {
        let got: Vec<u64> = (1..=6).map(|a| backoff(a).as_secs()).collect();
        assert_eq!(got, vec![1, 2, 4, 8, 10, 10]);
    }

    #[test]
    fn active_queue_is_by_priority_then_arrival() {
        let q = SchedulingQueue::new();
        let now = Instant::now();
        q.add_or_update(pod("a", 0), now);
        q.add_or_update(pod("b", 10), now);
        q.add_or_update(pod("c", 0), now);
        let order: Vec<String> = std::iter::from_fn(|| q.try_pop(now).map(|p| p.uid)).collect();
        assert_eq!(order, vec!["b", "a", "c"]);
        assert_eq!(q.len(), 3, "popped pods stay known while in flight");
    }

    #[test]
    fn unschedulable_pods_wait_for_a_cluster_change() {
        let q = SchedulingQueue::new();
        let t0 = Instant::now();
        q.add_or_update(pod("a", 0), t0);
        let popped = q.try_pop(t0).expect("a");
        assert_eq!(popped.attempts, 1);
        q.unschedulable("a", t0);
        assert!(
            q.try_pop(t0 + Duration::from_secs(60)).is_none(),
            "no retry without a change"
        );
        // A status-only update (our own condition) does not retry it.
        let mut status_only = (*pod("a", 0)).clone();
        status_only.status = Some(Default::default());
        q.add_or_update(Arc::new(status_only), t0);
        assert!(q.try_pop(t0 + Duration::from_secs(60)).is_none());
        // A node was added: after its 1 s backoff, it is retried.
        q.move_all_unschedulable(t0 + Duration::from_millis(500));
        assert!(
            q.try_pop(t0 + Duration::from_millis(600)).is_none(),
            "still backing off"
        );
        let again = q
            .try_pop(t0 + Duration::from_millis(1001))
            .expect("retried");
        assert_eq!(again.attempts, 2);
    }

    #[test]
    fn a_change_during_the_attempt_means_backoff_not_waiting() {
        let q = SchedulingQueue::new();
        let t0 = Instant::now();
        q.add_or_update(pod("a", 0), t0);
        q.try_pop(t0).expect("a");
        q.move_all_unschedulable(t0);
        q.unschedulable("a", t0);
        assert!(q.try_pop(t0 + Duration::from_millis(999)).is_none());
        assert!(
            q.try_pop(t0 + Duration::from_secs(1)).is_some(),
            "backed off, then retried"
        );
    }

    #[test]
    fn spec_changes_and_flushes_retry_unschedulable_pods() {
        let q = SchedulingQueue::new();
        let t0 = Instant::now();
        q.add_or_update(pod("a", 0), t0);
        q.try_pop(t0).expect("a");
        q.unschedulable("a", t0);
        q.add_or_update(pod("a", 5), t0 + Duration::from_secs(5));
        assert!(
            q.try_pop(t0 + Duration::from_secs(5)).is_some(),
            "spec changed after backoff ran out"
        );
        q.unschedulable("a", t0 + Duration::from_secs(5));
        q.flush_stale(t0 + Duration::from_secs(100));
        assert!(q.try_pop(t0 + Duration::from_secs(100)).is_none());
        q.flush_stale(t0 + Duration::from_secs(306));
        assert!(
            q.try_pop(t0 + Duration::from_secs(306)).is_some(),
            "flushed after five minutes"
        );
    }

    #[test]
    fn bind_failures_back_off_and_removed_pods_vanish() {
        let q = SchedulingQueue::new();
        let t0 = Instant::now();
        q.add_or_update(pod("a", 0), t0);
        q.add_or_update(pod("b", 0), t0);
        q.try_pop(t0).expect("a");
        q.backoff("a", t0);
        q.remove("b");
        assert!(q.try_pop(t0).is_none(), "b removed, a backing off");
        assert_eq!(
            q.try_pop(t0 + Duration::from_secs(1))
                .map(|p| p.uid)
                .as_deref(),
            Some("a")
        );
    }

    #[tokio::test]
    async fn pop_waits_for_backoff_and_wakes_on_add() {
        let q = Arc::new(SchedulingQueue::new());
        let shutdown = CancellationToken::new();
        let waiter = {
            let q = q.clone();
            let shutdown = shutdown.clone();
            tokio::spawn(async move { q.pop(&shutdown).await.map(|p| p.uid) })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        q.add_or_update(pod("x", 0), Instant::now());
        let got = tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("pop woke up")
            .expect("task");
        assert_eq!(got.as_deref(), Some("x"));
        shutdown.cancel();
        assert!(q.pop(&shutdown).await.is_none());
    }
}
