//! The API server's watch cache: one etcd watch per resource, shared by
//! every client watch of that resource, with a window of its recent changes.
//!
//! Without it each client watch opened its own etcd watch, so a change to a
//! pod was sent by etcd, decoded (object and previous object) and encoded
//! again once per watcher. Here a [`Hub`] per resource key prefix decodes
//! each change once and fans it out in memory; the JSON line of a change is
//! memoized on the change ([`Change::encoded`]), so watchers that see it
//! unchanged share one encoding too.
//!
//! Correctness rules, as upstream's cacher:
//!
//! - A watch starts from its resourceVersion: the window's changes after it,
//!   then the live ones. Subscribing and copying the window happen under the
//!   window's lock, which the hub also holds while it appends and
//!   broadcasts, so no change is missed or delivered twice.
//! - A hub starts where the watch that needs it starts (the resourceVersion of
//!   the list a client just made, typically), not at etcd's current revision:
//!   otherwise every first watch of a resource, whose list was a few
//!   revisions old by then, would miss the window and hold an etcd watch of
//!   its own. A watch from "now" (no resourceVersion) starts at the revision
//!   that was current when the hub started, or later, so it never sees the
//!   changes a hub replays while it catches up.
//! - A resourceVersion older than the window (or a hub that failed) is served
//!   by a watch of its own on etcd ([`Store::watch`]), so a compacted
//!   resourceVersion still gets 410 Gone and nothing is ever skipped. Such a
//!   watch moves to the hub as soon as a change it delivered is inside the
//!   window ([`catch_up`]), so it decodes the resource's changes on its own
//!   only while it catches up.
//! - A watcher that falls more than [`FANOUT_BUFFER`] changes behind is ended
//!   with an error; the client resumes from the last resourceVersion it
//!   received (from the window, or from etcd).
//! - When the hub's etcd watch fails, its watchers are ended the same way
//!   and the next watch of the resource starts a new hub.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use futures::{Stream, StreamExt};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use crate::storage::{Change, ChangeKind, StorageError, Store, WatchItem};

/// Changes kept per resource, for watches that start a little in the past
/// (a client resuming, or listing then watching). Each holds the object's
/// text and its previous state's (and what of them was decoded for watches
/// with selectors or tables). When each held its object decoded, 1,024 of
/// them cost ~250 MiB more at the peak of the scheduler bench (pods,
/// events, nodes and leases changing at once), so the window is kept short:
/// a watch from further back is served by etcd.
pub const WINDOW: usize = 256;

/// Live items a watcher may fall behind before it is ended.
pub const FANOUT_BUFFER: usize = 4096;

/// Items a watch stream buffers towards its consumer.
const STREAM_BUFFER: usize = 64;

/// What a hub broadcasts.
#[derive(Debug, Clone)]
enum HubItem {
    Change(Arc<Change>),
    /// Every change up to this revision has been broadcast.
    Progress(i64),
    /// The etcd watch ended; the hub is done.
    Failed(Arc<str>),
}

/// A hub's window of recent changes.
#[derive(Debug)]
struct Window {
    /// Every change with a revision above `from` is in `changes`.
    from: i64,
    /// Every change up to `head` has been broadcast.
    head: i64,
    /// etcd's revision when the hub started: a watch from "now" starts here
    /// or later, whatever the hub is still replaying.
    started: i64,
    /// Recent changes, oldest first.
    changes: VecDeque<Arc<Change>>,
    /// key → the latest state the hub has seen of it (its text, with its
    /// resourceVersion, and its revision), for every key that changed since
    /// the hub started and still exists.
    latest: HashMap<String, (bytes::Bytes, i64)>,
    /// The etcd watch ended.
    failed: bool,
}

impl Window {
    /// The window of a hub started when etcd's revision is `current`, for a
    /// watch from `after` (0: from now). A watch from the past starts the hub
    /// there, so it is served from the hub; if that revision is compacted,
    /// the hub's etcd watch fails and the watch gets etcd's 410 Gone.
    fn starting(after: i64, current: i64) -> Window {
        let from = if after > 0 && after < current {
            after
        } else {
            current
        };
        Window {
            from,
            head: from,
            started: current,
            changes: VecDeque::new(),
            latest: HashMap::new(),
            failed: false,
        }
    }

    /// The revision a watch from `after` (0: from now) starts after.
    fn start_of(&self, after: i64) -> i64 {
        if after == 0 {
            self.head.max(self.started)
        } else {
            after
        }
    }
}

/// A hub subscription's receiving end.
type Receiver = broadcast::Receiver<HubItem>;

/// One resource's shared etcd watch.
#[derive(Debug)]
struct Hub {
    window: Mutex<Window>,
    fanout: broadcast::Sender<HubItem>,
}

impl Hub {
    fn window(&self) -> MutexGuard<'_, Window> {
        self.window.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Subscribe a watch that has everything up to revision `after` under
    /// `prefix`: the window's later changes under it, and the live ones to
    /// come. `None` when the window does not reach back to `after` or the hub
    /// failed. Under the window's lock, so nothing falls between the two.
    fn join(&self, after: i64, prefix: &str) -> Option<(Vec<Arc<Change>>, Receiver)> {
        let window = self.window();
        if window.failed || after < window.from {
            return None;
        }
        let live = self.fanout.subscribe();
        let backlog = window
            .changes
            .iter()
            .filter(|c| c.revision > after && c.key.starts_with(prefix))
            .cloned()
            .collect();
        Some((backlog, live))
    }

    /// The latest state of `key` the hub has seen, unless it failed.
    fn latest(&self, key: &str) -> Option<(bytes::Bytes, i64)> {
        let window = self.window();
        if window.failed {
            return None;
        }
        window.latest.get(key).cloned()
    }

    /// Append `item` to the window and broadcast it, under the lock.
    fn publish(&self, item: HubItem) {
        let mut window = self.window();
        match &item {
            HubItem::Change(change) => {
                window.head = window.head.max(change.revision);
                if change.kind == ChangeKind::Deleted {
                    window.latest.remove(&change.key);
                } else {
                    window
                        .latest
                        .insert(change.key.clone(), (change.json.clone(), change.revision));
                }
                window.changes.push_back(change.clone());
                if window.changes.len() > WINDOW
                    && let Some(oldest) = window.changes.pop_front()
                {
                    window.from = oldest.revision;
                }
            }
            HubItem::Progress(revision) => window.head = window.head.max(*revision),
            HubItem::Failed(_) => window.failed = true,
        }
        // No receiver is fine: nobody watches right now.
        let _ = self.fanout.send(item);
    }

    /// Feed the hub from its etcd watch until it fails or `shutdown`.
    async fn run(
        self: Arc<Self>,
        mut upstream: impl Stream<Item = Result<WatchItem, StorageError>> + Unpin,
        shutdown: CancellationToken,
    ) {
        loop {
            let item = tokio::select! {
                () = shutdown.cancelled() => {
                    self.publish(HubItem::Failed("the API server is shutting down".into()));
                    return;
                }
                item = upstream.next() => item,
            };
            match item {
                Some(Ok(WatchItem::Change(change))) => self.publish(HubItem::Change(change)),
                Some(Ok(WatchItem::Progress(revision))) => {
                    self.publish(HubItem::Progress(revision));
                }
                Some(Err(error)) => {
                    tracing::debug!(error = %skiff_common::error::chain(&error), "shared etcd watch ended");
                    self.publish(HubItem::Failed(skiff_common::error::chain(&error).into()));
                    return;
                }
                None => {
                    self.publish(HubItem::Failed("the etcd watch stream closed".into()));
                    return;
                }
            }
        }
    }
}

/// Where a resource's hub lives: none before its first watch.
type HubSlot = tokio::sync::Mutex<Option<Arc<Hub>>>;

/// The watch cache: a [`Hub`] per resource key prefix, started on first use.
pub struct WatchCache {
    store: Store,
    /// A slot per resource key prefix. Starting a hub calls etcd, under the
    /// slot's own lock only, so a slow start (etcd down) holds up the watches
    /// of that resource alone.
    hubs: Mutex<HashMap<String, Arc<HubSlot>>>,
    shutdown: CancellationToken,
}

/// A stream of watch items, as [`Store::watch`] gives.
pub type WatchStream =
    std::pin::Pin<Box<dyn Stream<Item = Result<WatchItem, StorageError>> + Send + 'static>>;

impl WatchCache {
    /// A cache over `store`; its hubs stop at `shutdown`.
    pub fn new(store: Store, shutdown: CancellationToken) -> WatchCache {
        WatchCache {
            store,
            hubs: Mutex::new(HashMap::new()),
            shutdown,
        }
    }

    /// Watch the keys under `prefix` after revision `after` (0: from now),
    /// through the hub of `root` (the resource's key prefix, which `prefix`
    /// starts with).
    pub async fn watch(
        &self,
        root: &str,
        prefix: &str,
        after: i64,
    ) -> Result<WatchStream, StorageError> {
        debug_assert!(prefix.starts_with(root), "{prefix} is under {root}");
        let hub = self.hub(root, after).await?;
        let start = hub.window().start_of(after);
        let Some((backlog, live)) = hub.join(start, prefix) else {
            // Older than the window: etcd answers (or says 410 Gone) until the
            // watch reaches the window.
            let upstream = Box::pin(self.store.watch(prefix, after).await?);
            let (tx, rx) = tokio::sync::mpsc::channel(STREAM_BUFFER);
            tokio::spawn(catch_up(
                prefix.to_string(),
                upstream,
                hub,
                tx,
                self.shutdown.clone(),
            ));
            return Ok(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx)));
        };
        let (tx, rx) = tokio::sync::mpsc::channel(STREAM_BUFFER);
        tokio::spawn(follow(
            prefix.to_string(),
            start,
            backlog,
            live,
            tx,
            self.shutdown.clone(),
        ));
        Ok(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx)))
    }

    /// The latest state of `key` that the running hub of `root` has seen:
    /// its text (with its resourceVersion) and revision. `None` when no hub
    /// runs, or `key` has not changed since it started (or is deleted).
    ///
    /// It may be behind etcd: it is for writes guarded by its revision,
    /// which then fail and read etcd (upstream's `cachedExistingObject`).
    pub fn latest(&self, root: &str, key: &str) -> Option<(bytes::Bytes, i64)> {
        let slot = self
            .hubs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(root)?
            .clone();
        // A hub being started has nothing yet.
        let hub = slot.try_lock().ok()?.clone()?;
        hub.latest(key)
    }

    /// Put in place, for `root`, a hub that follows no etcd watch and has
    /// seen only `changes`: one fallen behind etcd, for tests of what
    /// writes do with a stale cached state.
    #[cfg(test)]
    pub(crate) fn install_stale_hub(&self, root: &str, changes: Vec<Arc<Change>>) {
        let from = changes.first().map_or(0, |c| c.revision - 1);
        let hub = Arc::new(Hub {
            window: Mutex::new(Window::starting(0, from)),
            fanout: broadcast::channel(16).0,
        });
        for change in changes {
            hub.publish(HubItem::Change(change));
        }
        self.hubs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(
                root.to_string(),
                Arc::new(tokio::sync::Mutex::new(Some(hub))),
            );
    }

    /// The running hub of `root`, started if there is none or the last one
    /// failed: from `after` (the revision the watch asking for it starts
    /// from) when that is in the past, else from etcd's current revision.
    async fn hub(&self, root: &str, after: i64) -> Result<Arc<Hub>, StorageError> {
        let slot = self
            .hubs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(root.to_string())
            .or_default()
            .clone();
        let mut slot = slot.lock().await;
        if let Some(hub) = slot.as_ref()
            && !hub.window().failed
        {
            return Ok(hub.clone());
        }
        let current = self.store.current_revision().await?;
        let window = Window::starting(after, current);
        let upstream = self.store.watch(root, window.from).await?;
        let hub = Arc::new(Hub {
            window: Mutex::new(window),
            fanout: broadcast::channel(FANOUT_BUFFER).0,
        });
        tokio::spawn(hub.clone().run(Box::pin(upstream), self.shutdown.clone()));
        *slot = Some(hub.clone());
        Ok(hub)
    }
}

/// One client watch fed by its own etcd watch (`upstream`) until a change it
/// delivers is inside `hub`'s window; from there on it follows the hub. After
/// a change at revision `r` with `r` at or above the window's start, every
/// later change is in the window or still to be broadcast, so nothing is
/// skipped, and [`follow`] skips what is not after `r`, so nothing is sent
/// twice. Progress notifications do not move a watch: etcd 3.4 may send one
/// ahead of the events it has still to deliver.
async fn catch_up(
    prefix: String,
    mut upstream: impl Stream<Item = Result<WatchItem, StorageError>> + Unpin,
    hub: Arc<Hub>,
    tx: tokio::sync::mpsc::Sender<Result<WatchItem, StorageError>>,
    shutdown: CancellationToken,
) {
    loop {
        let item = tokio::select! {
            () = shutdown.cancelled() => return,
            () = tx.closed() => return,
            item = upstream.next() => item,
        };
        let Some(item) = item else {
            return;
        };
        let delivered = match &item {
            Ok(WatchItem::Change(change)) => Some(change.revision),
            _ => None,
        };
        let last = item.is_err();
        if tx.send(item).await.is_err() || last {
            return;
        }
        let Some(revision) = delivered else {
            continue;
        };
        if let Some((backlog, live)) = hub.join(revision, &prefix) {
            drop(upstream);
            follow(prefix, revision, backlog, live, tx, shutdown).await;
            return;
        }
    }
}

/// One client watch fed by a hub: `backlog` first, then `live`, the changes
/// under `prefix` after revision `after`.
async fn follow(
    prefix: String,
    after: i64,
    backlog: Vec<Arc<Change>>,
    mut live: Receiver,
    tx: tokio::sync::mpsc::Sender<Result<WatchItem, StorageError>>,
    shutdown: CancellationToken,
) {
    for change in backlog {
        if tx.send(Ok(WatchItem::Change(change))).await.is_err() {
            return;
        }
    }
    let ended = |message: String| StorageError::Unavailable {
        source: etcd_client::Error::WatchError(message),
    };
    loop {
        let received = tokio::select! {
            () = shutdown.cancelled() => return,
            () = tx.closed() => return,
            received = live.recv() => received,
        };
        let item = match received {
            Ok(HubItem::Change(change))
                if change.revision > after && change.key.starts_with(&prefix) =>
            {
                Ok(WatchItem::Change(change))
            }
            Ok(HubItem::Progress(revision)) if revision > after => {
                Ok(WatchItem::Progress(revision))
            }
            Ok(HubItem::Change(_) | HubItem::Progress(_)) => continue,
            Ok(HubItem::Failed(message)) => Err(ended(message.to_string())),
            Err(broadcast::error::RecvError::Lagged(missed)) => Err(ended(format!(
                "the watcher fell behind by {missed} changes; resume from the last resourceVersion"
            ))),
            Err(broadcast::error::RecvError::Closed) => Err(ended("the watch cache closed".into())),
        };
        let last = item.is_err();
        if tx.send(item).await.is_err() || last {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn change(key: &str, revision: i64) -> Arc<Change> {
        Arc::new(Change::new(
            ChangeKind::Added,
            key.to_string(),
            bytes::Bytes::from(json!({"metadata": {"name": key}}).to_string()),
            None,
            revision,
        ))
    }

    /// A hub whose watchers may fall `lag` items behind.
    fn hub_with(from: i64, lag: usize) -> Arc<Hub> {
        Arc::new(Hub {
            window: Mutex::new(Window::starting(0, from)),
            fanout: broadcast::channel(lag).0,
        })
    }

    fn hub(from: i64) -> Arc<Hub> {
        hub_with(from, 16)
    }

    #[test]
    fn the_window_keeps_the_latest_changes_and_knows_where_it_starts() {
        let hub = hub(10);
        for revision in 11..=(11 + WINDOW as i64) {
            hub.publish(HubItem::Change(change("/registry/pods/a/x", revision)));
        }
        let window = hub.window();
        assert_eq!(window.changes.len(), WINDOW);
        assert_eq!(window.from, 11, "the oldest change was dropped");
        assert_eq!(window.changes.front().map(|c| c.revision), Some(12));
        assert_eq!(window.head, 11 + WINDOW as i64);
        drop(window);
        hub.publish(HubItem::Progress(5000));
        assert_eq!(hub.window().head, 5000);
        hub.publish(HubItem::Failed("gone".into()));
        assert!(hub.window().failed);
    }

    #[test]
    fn the_hub_knows_the_latest_state_of_what_changed_until_it_is_deleted() {
        let hub = hub(10);
        assert_eq!(hub.latest("/registry/pods/a/x"), None, "not seen yet");
        hub.publish(HubItem::Change(change("/registry/pods/a/x", 11)));
        hub.publish(HubItem::Change(change("/registry/pods/a/x", 12)));
        hub.publish(HubItem::Change(change("/registry/pods/a/y", 13)));
        let (text, revision) = hub
            .latest("/registry/pods/a/x")
            .expect("x changed since the hub started");
        assert_eq!(revision, 12, "the latest change");
        let value: serde_json::Value = serde_json::from_slice(&text).expect("text is JSON");
        assert_eq!(value["metadata"]["name"], "/registry/pods/a/x");
        hub.publish(HubItem::Change(Arc::new(Change::new(
            ChangeKind::Deleted,
            "/registry/pods/a/x".to_string(),
            text,
            None,
            14,
        ))));
        assert_eq!(hub.latest("/registry/pods/a/x"), None, "deleted");
        assert_eq!(hub.latest("/registry/pods/a/y").map(|l| l.1), Some(13));
        hub.publish(HubItem::Failed("gone".into()));
        assert_eq!(
            hub.latest("/registry/pods/a/y"),
            None,
            "a failed hub knows nothing"
        );
    }

    #[test]
    fn a_hub_starts_where_its_first_watch_starts_and_now_means_now() {
        // A client listed at 8 and watches from 8; etcd is at 12 by then.
        let window = Window::starting(8, 12);
        assert_eq!(window.from, 8, "the first watch is served from the hub");
        assert_eq!(window.start_of(8), 8);
        assert_eq!(
            window.start_of(0),
            12,
            "a watch from now skips what the hub replays"
        );
        // A watch from now, or from the future, starts the hub at the current revision.
        assert_eq!(Window::starting(0, 12).from, 12);
        assert_eq!(Window::starting(20, 12).from, 12);
        // Once the hub has caught up, now is its head.
        let hub = hub_with(0, 16);
        *hub.window() = Window::starting(8, 12);
        for revision in 9..=15 {
            hub.publish(HubItem::Change(change("/registry/pods/a/x", revision)));
        }
        assert_eq!(hub.window().start_of(0), 15);
        assert_eq!(hub.window().from, 8, "nothing evicted yet");
    }

    #[tokio::test]
    async fn a_follower_gets_the_backlog_then_live_changes_under_its_prefix_only() {
        let hub = hub(0);
        let live = hub.fanout.subscribe();
        let (tx, mut rx) = tokio::sync::mpsc::channel(16);
        let backlog = vec![change("/registry/pods/a/1", 3)];
        let task = tokio::spawn(follow(
            "/registry/pods/a/".into(),
            2,
            backlog,
            live,
            tx,
            CancellationToken::new(),
        ));
        hub.publish(HubItem::Change(change("/registry/pods/b/2", 4)));
        hub.publish(HubItem::Change(change("/registry/pods/a/3", 5)));
        hub.publish(HubItem::Change(change("/registry/pods/a/0", 2)));
        hub.publish(HubItem::Progress(6));
        hub.publish(HubItem::Failed("etcd went away".into()));
        let mut seen = Vec::new();
        while let Some(item) = rx.recv().await {
            seen.push(match item {
                Ok(WatchItem::Change(c)) => format!("{}@{}", c.key, c.revision),
                Ok(WatchItem::Progress(r)) => format!("progress@{r}"),
                Err(e) => format!("error: {}", skiff_common::error::chain(&e)),
            });
        }
        task.await.expect("the follower ends");
        assert_eq!(
            seen,
            vec![
                "/registry/pods/a/1@3".to_string(),
                "/registry/pods/a/3@5".to_string(),
                "progress@6".to_string(),
                "error: etcd is unavailable: watch error: etcd went away".to_string(),
            ],
            "other namespaces and revisions at or before the start are skipped"
        );
    }

    #[tokio::test]
    async fn a_watch_from_before_the_window_moves_to_the_hub_once_inside_it() {
        // The hub's window starts at 10 and holds 11..=15; a client watches
        // from 7, so its own etcd watch delivers 8, 9, then 12 (inside the
        // window), then would go on with 13 and 14, which must not be sent
        // again.
        let hub = hub_with(10, 16);
        for revision in 11..=15 {
            hub.publish(HubItem::Change(change("/registry/pods/a/x", revision)));
        }
        let upstream = futures::stream::iter(
            [8, 9, 12, 13, 14]
                .into_iter()
                .map(|r| Ok(WatchItem::Change(change("/registry/pods/a/x", r)))),
        );
        let (tx, mut rx) = tokio::sync::mpsc::channel(16);
        let task = tokio::spawn(catch_up(
            "/registry/pods/a/".into(),
            upstream,
            hub.clone(),
            tx,
            CancellationToken::new(),
        ));
        let mut seen = Vec::new();
        while seen.len() < 6 {
            match rx.recv().await {
                Some(Ok(WatchItem::Change(c))) => seen.push(c.revision),
                other => panic!("expected changes, got {other:?}"),
            }
        }
        assert_eq!(seen, vec![8, 9, 12, 13, 14, 15], "etcd, then the window");
        hub.publish(HubItem::Change(change("/registry/pods/b/y", 16)));
        hub.publish(HubItem::Change(change("/registry/pods/a/x", 17)));
        match rx.recv().await {
            Some(Ok(WatchItem::Change(c))) => assert_eq!(c.revision, 17, "live from the hub"),
            other => panic!("expected the live change, got {other:?}"),
        }
        drop(rx);
        hub.publish(HubItem::Progress(18));
        task.await
            .expect("the watch ends when its client goes away");
    }

    #[tokio::test]
    async fn a_watch_from_a_compacted_revision_still_gets_the_error() {
        let hub = hub_with(10, 16);
        let upstream = futures::stream::iter([Err(StorageError::Compacted {
            requested: 3,
            compacted: 9,
        })]);
        let (tx, mut rx) = tokio::sync::mpsc::channel(16);
        catch_up(
            "/registry/pods/".into(),
            upstream,
            hub,
            tx,
            CancellationToken::new(),
        )
        .await;
        assert!(matches!(
            rx.recv().await,
            Some(Err(StorageError::Compacted { compacted: 9, .. }))
        ));
        assert!(rx.recv().await.is_none(), "and nothing after it");
    }

    #[tokio::test]
    async fn a_follower_that_falls_behind_is_ended_with_an_error() {
        let hub = hub_with(0, 4);
        let live = hub.fanout.subscribe();
        for revision in 1..=10 {
            hub.publish(HubItem::Change(change("/registry/pods/a/x", revision)));
        }
        let (tx, mut rx) = tokio::sync::mpsc::channel(16);
        follow(
            "/registry/pods/".into(),
            0,
            Vec::new(),
            live,
            tx,
            CancellationToken::new(),
        )
        .await;
        match rx.recv().await {
            Some(Err(StorageError::Unavailable { source })) => {
                assert!(source.to_string().contains("fell behind"), "{source}");
            }
            other => panic!("expected the lag error first, got {other:?}"),
        }
    }
}
