//! Objects in etcd.
//!
//! Each object is its Kubernetes JSON under its key; its resourceVersion is
//! the key's etcd `mod_revision` and is never stored in the value. Writes are
//! etcd transactions guarded by the expected revision, so a stale write fails
//! with [`StorageError::Conflict`] and nothing half-written reaches etcd.
//! Writes may also claim and release side keys (allocated ClusterIPs and
//! NodePorts) in the same transaction, so an allocation can neither leak nor
//! be handed out twice, across restarts and across API server replicas.
//!
//! A background probe keeps a health flag: while etcd is known to be down,
//! reads and writes fail at once with [`StorageError::Unavailable`] instead
//! of each waiting out the client's timeout, and `/readyz` reports the flag.
//! A successful probe (or call) marks etcd healthy again.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, KvClient, PutOptions, Txn,
    TxnOp, TxnOpResponse, WatchClient, WatchOptions,
};
use futures::Stream;
use serde_json::Value;

/// The largest etcd response the API server reads: a list of every object
/// of a kind is one response.
const MAX_RESPONSE_BYTES: usize = 1 << 30;

/// How long one etcd request may take before the API server answers 503.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// How often the background probe checks etcd.
const PROBE_INTERVAL: Duration = Duration::from_secs(1);

/// How long one probe may take before etcd counts as down.
const PROBE_TIMEOUT: Duration = Duration::from_millis(800);

/// The key the probe reads (it need not exist).
const PROBE_KEY: &str = "/registry/health";

/// Errors from the store.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// etcd could not be reached or did not answer in time.
    #[error("etcd is unavailable")]
    Unavailable {
        /// The client error.
        #[source]
        source: etcd_client::Error,
    },
    /// A create found the key already there.
    #[error("key {key} already exists")]
    AlreadyExists {
        /// The object's key.
        key: String,
    },
    /// The object is not there.
    #[error("key {key} not found")]
    NotFound {
        /// The object's key.
        key: String,
    },
    /// The object changed since the expected revision.
    #[error("key {key} was modified since revision {expected}")]
    Conflict {
        /// The object's key.
        key: String,
        /// The revision the writer expected.
        expected: i64,
    },
    /// A side key the write claims is held already.
    #[error("{key} is already allocated")]
    ClaimTaken {
        /// The side key.
        key: String,
    },
    /// A stored value is not JSON.
    #[error("stored value at {key} is not valid json")]
    Corrupt {
        /// The object's key.
        key: String,
        /// The parse error.
        #[source]
        source: serde_json::Error,
    },
    /// The requested revision has been compacted away.
    #[error("the requested revision {requested} has been compacted (oldest available {compacted})")]
    Compacted {
        /// The revision asked for.
        requested: i64,
        /// The compaction revision.
        compacted: i64,
    },
}

impl From<etcd_client::Error> for StorageError {
    fn from(source: etcd_client::Error) -> Self {
        StorageError::Unavailable { source }
    }
}

/// An object read from the store, with its revision.
#[derive(Debug, Clone)]
pub struct Stored {
    /// The object, with `metadata.resourceVersion` set to `revision`.
    pub value: Value,
    /// The key's mod revision.
    pub revision: i64,
}

/// The kind of change a watch reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeKind {
    /// The key was created.
    Added,
    /// The key was updated.
    Modified,
    /// The key was deleted.
    Deleted,
}

/// One change seen by a watch.
///
/// It carries the object as JSON text, ready to send: a watch without
/// selectors never decodes it. The decoded object, and the part of it
/// selectors read, are made on first use and shared by every watcher of the
/// change.
#[derive(Debug)]
pub struct Change {
    /// What happened.
    pub kind: ChangeKind,
    /// The object's key.
    pub key: String,
    /// The object after the change as JSON, with `metadata.resourceVersion`
    /// set to `revision`; for a deletion, the last state.
    pub json: bytes::Bytes,
    /// The object before the change, when there was one, as stored.
    pub previous: Option<Previous>,
    /// The revision of the change.
    pub revision: i64,
    /// The change's JSON watch-event line as its own kind (`ADDED`,
    /// `MODIFIED`, `DELETED`), made by the first watcher that sends it
    /// unchanged and shared by the others.
    pub encoded: std::sync::OnceLock<bytes::Bytes>,
    /// `json` decoded, once asked for.
    object: std::sync::OnceLock<Value>,
    /// The part of `json` selectors read, once asked for.
    selectable: std::sync::OnceLock<Value>,
}

/// The state of an object before a change, as etcd sent it.
#[derive(Debug)]
pub struct Previous {
    /// The stored JSON.
    bytes: bytes::Bytes,
    /// The part of it selectors read, once asked for.
    selectable: std::sync::OnceLock<Value>,
}

impl Previous {
    /// A previous state as stored.
    pub fn stored(bytes: bytes::Bytes) -> Previous {
        Previous {
            bytes,
            selectable: std::sync::OnceLock::new(),
        }
    }
}

/// The part of `text` that selectors read; `Null` (which no selector that
/// reads a field selects) if it does not decode, which the checks made
/// when the change arrived rule out.
fn selectable_or_null(key: &str, text: &[u8]) -> Value {
    crate::selector::selectable(text).unwrap_or_else(|error| {
        tracing::warn!(key, error = %skiff_common::error::chain(&error), "cannot decode a changed object for its selectable fields");
        Value::Null
    })
}

impl Change {
    /// A change to the object whose JSON (with its resourceVersion) is
    /// `json`.
    pub fn new(
        kind: ChangeKind,
        key: String,
        json: bytes::Bytes,
        previous: Option<Previous>,
        revision: i64,
    ) -> Change {
        Change {
            kind,
            key,
            json,
            previous,
            revision,
            encoded: std::sync::OnceLock::new(),
            object: std::sync::OnceLock::new(),
            selectable: std::sync::OnceLock::new(),
        }
    }

    /// The object after the change (for a deletion, its last state),
    /// decoded on first use.
    pub fn object(&self) -> &Value {
        self.object.get_or_init(|| {
            serde_json::from_slice(&self.json).unwrap_or_else(|error| {
                // The text was checked when the change arrived.
                tracing::warn!(key = self.key, error = %skiff_common::error::chain(&error), "cannot decode a changed object");
                Value::Null
            })
        })
    }

    /// What selectors read of the object after the change, decoded on
    /// first use (see [`crate::selector::selectable`]).
    pub fn selectable(&self) -> &Value {
        self.selectable
            .get_or_init(|| selectable_or_null(&self.key, &self.json))
    }

    /// Whether the object existed before the change.
    pub fn had_previous(&self) -> bool {
        self.previous.is_some()
    }

    /// What selectors read of the object before the change, decoded on
    /// first use; `None` if there was none.
    pub fn previous_selectable(&self) -> Option<&Value> {
        let previous = self.previous.as_ref()?;
        Some(
            previous
                .selectable
                .get_or_init(|| selectable_or_null(&self.key, &previous.bytes)),
        )
    }
}

/// One item of a watch stream.
#[derive(Debug, Clone)]
pub enum WatchItem {
    /// A change (shared by the watch cache's watchers).
    Change(std::sync::Arc<Change>),
    /// Everything up to this revision has been delivered (a progress notification).
    Progress(i64),
}

/// Whether etcd answered the last probe or call.
#[derive(Debug)]
struct Health {
    healthy: AtomicBool,
}

impl Health {
    fn set(&self, healthy: bool) {
        let was = self.healthy.swap(healthy, Ordering::Relaxed);
        if was != healthy {
            if healthy {
                tracing::info!("etcd is reachable again");
            } else {
                tracing::warn!("etcd is unreachable; failing requests fast until it answers");
            }
        }
    }
}

/// Whether a client error means etcd cannot be reached (rather than a
/// refused request, such as a compacted revision).
fn is_connection_error(error: &etcd_client::Error) -> bool {
    match error {
        etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) => true,
        // gRPC codes CANCELLED (the client's timeout), DEADLINE_EXCEEDED and
        // UNAVAILABLE, by their numbers (tonic is not a direct dependency).
        etcd_client::Error::GRpcStatus(status) => matches!(status.code() as i32, 1 | 4 | 14),
        _ => false,
    }
}

/// The error of a call refused because etcd failed its last probe.
fn known_down() -> StorageError {
    StorageError::Unavailable {
        source: etcd_client::Error::IoError(std::io::Error::new(
            std::io::ErrorKind::NotConnected,
            "etcd did not answer the last health check",
        )),
    }
}

/// Probes etcd every [`PROBE_INTERVAL`] until the store is dropped.
async fn probe_loop(mut kv: KvClient, health: Weak<Health>) {
    let mut tick = tokio::time::interval(PROBE_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let ok = probe(&mut kv).await;
        match health.upgrade() {
            Some(health) => health.set(ok),
            None => return,
        }
    }
}

/// Whether a write failed because its lease is gone (revoked, or expired
/// early): the write is tried again with a new one.
fn lease_gone(error: &StorageError) -> bool {
    matches!(error, StorageError::Unavailable { source: etcd_client::Error::GRpcStatus(status) }
        if status.message().contains("lease not found"))
}

async fn probe(kv: &mut KvClient) -> bool {
    matches!(
        tokio::time::timeout(
            PROBE_TIMEOUT,
            kv.get(PROBE_KEY, Some(GetOptions::new().with_count_only()))
        )
        .await,
        Ok(Ok(_))
    )
}

/// A handle on etcd; cheap to clone.
#[derive(Clone)]
pub struct Store {
    kv: KvClient,
    watch: WatchClient,
    client: Client,
    health: Arc<Health>,
    expiry: Option<Arc<Expiry>>,
}

/// The longest a lease is shared past the TTL, and the most objects on one
/// lease (upstream's lease manager defaults).
const LEASE_REUSE_MAX: Duration = Duration::from_secs(60);
const LEASE_MAX_OBJECTS: u32 = 1000;

/// Objects under a key prefix that expire (upstream's `--event-ttl`): each
/// write of one attaches an etcd lease, and etcd deletes the object when
/// the lease runs out, which watches see as a deletion.
///
/// As upstream's lease manager, objects written within a short window share
/// one lease: it is granted for the TTL plus that window (5% of the TTL, at
/// most a minute) and used while it still has the TTL to run, for at most
/// [`LEASE_MAX_OBJECTS`] objects. So each object lives at least the TTL
/// after its last write and at most the window longer, and a burst of
/// events costs one lease grant, not one each.
struct Expiry {
    prefix: String,
    ttl: Duration,
    lease: tokio::sync::Mutex<Option<SharedLease>>,
}

/// The lease being shared.
struct SharedLease {
    id: i64,
    expires: tokio::time::Instant,
    objects: u32,
}

impl Expiry {
    /// The window a lease is shared for: 5% of the TTL in whole seconds, at
    /// most [`LEASE_REUSE_MAX`].
    fn reuse_window(&self) -> Duration {
        Duration::from_secs(self.ttl.as_secs() / 20).min(LEASE_REUSE_MAX)
    }

    /// Whether `lease` may carry one more object written at `now`.
    fn usable(&self, lease: &SharedLease, now: tokio::time::Instant) -> bool {
        now + self.ttl < lease.expires && lease.objects < LEASE_MAX_OBJECTS
    }
}

impl Store {
    /// Connect to `endpoints`. The connection is lazy and re-established by
    /// the client after etcd restarts.
    pub async fn connect(endpoints: &[String]) -> Result<Store, StorageError> {
        let options = ConnectOptions::new()
            .with_timeout(REQUEST_TIMEOUT)
            .with_connect_timeout(Duration::from_secs(2))
            .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5))
            .with_keep_alive_while_idle(true);
        let client = Client::connect(endpoints, Some(options)).await?;
        // Lists of thousands of objects exceed gRPC's default 4 MiB limit.
        let mut kv = client
            .kv_client()
            .max_decoding_message_size(MAX_RESPONSE_BYTES);
        let health = Arc::new(Health {
            healthy: AtomicBool::new(probe(&mut kv).await),
        });
        tokio::spawn(probe_loop(kv.clone(), Arc::downgrade(&health)));
        Ok(Store {
            kv,
            watch: client
                .watch_client()
                .max_decoding_message_size(MAX_RESPONSE_BYTES),
            client,
            health,
            expiry: None,
        })
    }

    /// Let objects under `prefix` expire `ttl` after their last write, as
    /// upstream's `--event-ttl` does for events. A zero `ttl` keeps them.
    pub fn expiring(mut self, prefix: &str, ttl: Duration) -> Store {
        self.expiry = (!ttl.is_zero()).then(|| {
            Arc::new(Expiry {
                prefix: prefix.to_string(),
                // etcd counts lease TTLs in whole seconds.
                ttl: Duration::from_secs(ttl.as_secs().max(1)),
                lease: tokio::sync::Mutex::new(None),
            })
        });
        self
    }

    /// The options of a write of `key`: a lease when objects under its
    /// prefix expire. `fresh` asks for a new lease (the shared one was
    /// found gone).
    async fn put_options(
        &self,
        key: &str,
        fresh: bool,
    ) -> Result<Option<PutOptions>, StorageError> {
        let Some(expiry) = self.expiry.as_ref().filter(|e| key.starts_with(&e.prefix)) else {
            return Ok(None);
        };
        let mut shared = expiry.lease.lock().await;
        let now = tokio::time::Instant::now();
        if let Some(lease) = shared.as_mut().filter(|l| !fresh && expiry.usable(l, now)) {
            lease.objects += 1;
            return Ok(Some(PutOptions::new().with_lease(lease.id)));
        }
        let ttl = expiry.ttl + expiry.reuse_window();
        let mut leases = self.client.lease_client();
        let granted = self
            .call(leases.grant(i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX), None))
            .await?;
        // etcd may raise a TTL below its minimum; the lease runs as granted.
        let granted_ttl = Duration::from_secs(u64::try_from(granted.ttl()).unwrap_or(0));
        *shared = Some(SharedLease {
            id: granted.id(),
            expires: now + granted_ttl.max(ttl),
            objects: 1,
        });
        Ok(Some(PutOptions::new().with_lease(granted.id())))
    }

    /// Whether etcd answered the last probe (at most [`PROBE_INTERVAL`]
    /// ago) or the last call since; for `/readyz`.
    pub async fn healthy(&self) -> bool {
        self.health.healthy.load(Ordering::Relaxed)
    }

    /// Runs one etcd call: refused at once while etcd is known to be down,
    /// and its outcome updates the health flag.
    async fn call<T>(
        &self,
        call: impl Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T, StorageError> {
        if !self.health.healthy.load(Ordering::Relaxed) {
            return Err(known_down());
        }
        match call.await {
            Ok(out) => {
                self.health.set(true);
                Ok(out)
            }
            Err(error) => {
                if is_connection_error(&error) {
                    self.health.set(false);
                }
                Err(error.into())
            }
        }
    }

    /// The current revision of the store.
    pub async fn current_revision(&self) -> Result<i64, StorageError> {
        let mut kv = self.kv.clone();
        let resp = self
            .call(kv.get(PROBE_KEY, Some(GetOptions::new().with_count_only())))
            .await?;
        Ok(resp.header().map(|h| h.revision()).unwrap_or(0))
    }

    /// Read one object.
    pub async fn get(&self, key: &str) -> Result<Option<Stored>, StorageError> {
        let mut kv = self.kv.clone();
        let resp = self.call(kv.get(key, None)).await?;
        match resp.kvs().first() {
            Some(entry) => Ok(Some(decode(key, entry.value(), entry.mod_revision())?)),
            None => Ok(None),
        }
    }

    /// Read every object under `prefix`, in key order, with the store's
    /// revision at the time of the read.
    pub async fn list(&self, prefix: &str) -> Result<(Vec<Stored>, i64), StorageError> {
        let mut kv = self.kv.clone();
        let resp = self
            .call(kv.get(prefix, Some(GetOptions::new().with_prefix())))
            .await?;
        let revision = resp.header().map(|h| h.revision()).unwrap_or(0);
        let mut out = Vec::with_capacity(resp.kvs().len());
        for entry in resp.kvs() {
            let key = String::from_utf8_lossy(entry.key());
            out.push(decode(&key, entry.value(), entry.mod_revision())?);
        }
        Ok((out, revision))
    }

    /// [`list`](Self::list) as JSON text, a page at a time: the objects under `prefix` from
    /// `page.start` on (in key order), at most `page.limit` of them (0: all), as stored with their
    /// resourceVersion spliced in (no tree is built), read at `page.revision` (0: now). Returns
    /// them, the revision read at, and the key to start the next page from when there is more.
    pub async fn list_json(
        &self,
        prefix: &str,
        page: &Page,
    ) -> Result<(Vec<Vec<u8>>, i64, Option<String>), StorageError> {
        let mut kv = self.kv.clone();
        let from = page.start.as_deref().unwrap_or(prefix);
        let mut options = GetOptions::new().with_range(prefix_end(prefix));
        if page.limit > 0 {
            options = options.with_limit(page.limit);
        }
        if page.revision > 0 {
            options = options.with_revision(page.revision);
        }
        let resp = match self.call(kv.get(from, Some(options))).await {
            Err(StorageError::Unavailable { source })
                if page.revision > 0 && source.to_string().contains("compacted") =>
            {
                return Err(StorageError::Compacted {
                    requested: page.revision,
                    compacted: 0,
                });
            }
            other => other?,
        };
        let revision = match page.revision {
            0 => resp.header().map(|h| h.revision()).unwrap_or(0),
            at => at,
        };
        let mut out = Vec::with_capacity(resp.kvs().len());
        for entry in resp.kvs() {
            let json = crate::rawjson::with_resource_version(entry.value(), entry.mod_revision())
                .map_err(|source| StorageError::Corrupt {
                key: String::from_utf8_lossy(entry.key()).into_owned(),
                source,
            })?;
            out.push(json);
        }
        // The next page starts just after the last key.
        let next = (resp.more() && !resp.kvs().is_empty())
            .then(|| {
                resp.kvs()
                    .last()
                    .map(|e| format!("{}\0", String::from_utf8_lossy(e.key())))
            })
            .flatten();
        Ok((out, revision, next))
    }

    /// The keys under `prefix` (side keys, without their values).
    pub async fn keys(&self, prefix: &str) -> Result<Vec<String>, StorageError> {
        let mut kv = self.kv.clone();
        let resp = self
            .call(kv.get(
                prefix,
                Some(GetOptions::new().with_prefix().with_keys_only()),
            ))
            .await?;
        Ok(resp
            .kvs()
            .iter()
            .map(|e| String::from_utf8_lossy(e.key()).into_owned())
            .collect())
    }

    /// Create `key` with `value`, claiming every key of `claims` in the same
    /// transaction. Returns the new revision.
    pub async fn create(
        &self,
        key: &str,
        value: &Value,
        claims: &[String],
    ) -> Result<i64, StorageError> {
        let resp = self
            .write(key, value, claims, |mut compares, ops| async move {
                compares.push(Compare::create_revision(key, CompareOp::Equal, 0));
                let txn = Txn::new()
                    .when(compares)
                    .and_then(ops)
                    .or_else(conflict_reads(key, claims));
                let mut kv = self.kv.clone();
                self.call(kv.txn(txn)).await
            })
            .await?;
        let revision = resp.header().map(|h| h.revision()).unwrap_or(0);
        if resp.succeeded() {
            return Ok(revision);
        }
        let found = found_keys(&resp.op_responses());
        if found.iter().any(|k| k == key) {
            return Err(StorageError::AlreadyExists { key: key.into() });
        }
        let taken = claims
            .iter()
            .find(|c| found.contains(c))
            .cloned()
            .unwrap_or_else(|| key.to_string());
        Err(StorageError::ClaimTaken { key: taken })
    }

    /// Replace `key` with `value` if its revision is still `expected`,
    /// claiming `claims` and releasing `releases` in the same transaction.
    /// Returns the new revision.
    pub async fn update(
        &self,
        key: &str,
        value: &Value,
        expected: i64,
        claims: &[String],
        releases: &[String],
    ) -> Result<i64, StorageError> {
        self.write(key, value, claims, |mut compares, mut ops| async move {
            compares.push(Compare::mod_revision(key, CompareOp::Equal, expected));
            for release in releases {
                ops.push(TxnOp::delete(release.as_str(), None));
            }
            self.guarded(key, expected, claims, compares, ops).await
        })
        .await
    }

    /// Run `txn` with the compares and ops that write `value` at `key` and
    /// claim `claims`: the put carries a lease when objects under the key's
    /// prefix expire, and a write whose shared lease was found gone is run
    /// once more on a new one.
    async fn write<T, F, Fut>(
        &self,
        key: &str,
        value: &Value,
        claims: &[String],
        txn: F,
    ) -> Result<T, StorageError>
    where
        F: Fn(Vec<Compare>, Vec<TxnOp>) -> Fut,
        Fut: Future<Output = Result<T, StorageError>>,
    {
        let mut value = encode(value);
        let mut fresh_lease = false;
        loop {
            let options = self.put_options(key, fresh_lease).await?;
            // Only a leased write can be run again; any other takes the text.
            let leased = options.is_some();
            let text = if leased {
                value.clone()
            } else {
                std::mem::take(&mut value)
            };
            let mut compares = Vec::with_capacity(claims.len() + 1);
            let mut ops = vec![TxnOp::put(key, text, options)];
            for claim in claims {
                compares.push(Compare::create_revision(
                    claim.as_str(),
                    CompareOp::Equal,
                    0,
                ));
                ops.push(TxnOp::put(claim.as_str(), key, None));
            }
            match txn(compares, ops).await {
                Err(e) if leased && !fresh_lease && lease_gone(&e) => fresh_lease = true,
                other => return other,
            }
        }
    }

    /// Delete `key` if its revision is still `expected`, releasing `releases`
    /// in the same transaction. Returns the deletion's revision.
    pub async fn delete(
        &self,
        key: &str,
        expected: i64,
        releases: &[String],
    ) -> Result<i64, StorageError> {
        let compares = vec![Compare::mod_revision(key, CompareOp::Equal, expected)];
        let mut ops = vec![TxnOp::delete(key, None)];
        for release in releases {
            ops.push(TxnOp::delete(release.as_str(), None));
        }
        self.guarded(key, expected, &[], compares, ops).await
    }

    async fn guarded(
        &self,
        key: &str,
        expected: i64,
        claims: &[String],
        compares: Vec<Compare>,
        ops: Vec<TxnOp>,
    ) -> Result<i64, StorageError> {
        let txn = Txn::new()
            .when(compares)
            .and_then(ops)
            .or_else(conflict_reads(key, claims));
        let mut kv = self.kv.clone();
        let resp = self.call(kv.txn(txn)).await?;
        let revision = resp.header().map(|h| h.revision()).unwrap_or(0);
        if resp.succeeded() {
            return Ok(revision);
        }
        let responses = resp.op_responses();
        let current = match responses.first() {
            Some(TxnOpResponse::Get(get)) => get.kvs().first().map(|e| e.mod_revision()),
            _ => None,
        };
        match current {
            None => Err(StorageError::NotFound { key: key.into() }),
            Some(rev) if rev != expected => Err(StorageError::Conflict {
                key: key.into(),
                expected,
            }),
            Some(_) => {
                let found = found_keys(&responses[1..]);
                let taken = found.into_iter().next().unwrap_or_else(|| key.to_string());
                Err(StorageError::ClaimTaken { key: taken })
            }
        }
    }

    /// Compact the history before `revision`.
    pub async fn compact(&self, revision: i64) -> Result<(), StorageError> {
        let mut kv = self.kv.clone();
        self.call(kv.compact(revision, None)).await?;
        Ok(())
    }

    /// Watch every key under `prefix` for changes after `after` (a
    /// resourceVersion; 0 = from now). The stream ends with an error when
    /// etcd goes away or the revision was compacted.
    pub async fn watch(
        &self,
        prefix: &str,
        after: i64,
    ) -> Result<impl Stream<Item = Result<WatchItem, StorageError>> + Send + 'static, StorageError>
    {
        let mut options = WatchOptions::new()
            .with_prefix()
            .with_prev_key()
            .with_progress_notify();
        if after > 0 {
            options = options.with_start_revision(after + 1);
        }
        let mut watch = self.watch.clone();
        let stream = self.call(watch.watch(prefix, Some(options))).await?;
        let (mut sender, mut responses) = stream.split();
        let stream = async_stream(move |tx| async move {
            // Ask for a progress notification now and then, so idle watches
            // learn the current revision for bookmarks.
            let mut tick = tokio::time::interval(Duration::from_secs(20));
            tick.tick().await;
            loop {
                tokio::select! {
                    _ = tick.tick() => {
                        if sender.request_progress().await.is_err() {
                            return;
                        }
                    }
                    message = responses.message() => {
                        let resp = match message {
                            Ok(Some(resp)) => resp,
                            Ok(None) => {
                                let _ = tx.send(Err(StorageError::Unavailable {
                                    source: etcd_client::Error::WatchError("watch stream closed".into()),
                                })).await;
                                return;
                            }
                            Err(source) => {
                                let _ = tx.send(Err(StorageError::Unavailable { source })).await;
                                return;
                            }
                        };
                        if resp.compact_revision() > 0 {
                            let _ = tx
                                .send(Err(StorageError::Compacted {
                                    requested: after,
                                    compacted: resp.compact_revision(),
                                }))
                                .await;
                            return;
                        }
                        if resp.canceled() {
                            let _ = tx.send(Err(StorageError::Unavailable {
                                source: etcd_client::Error::WatchError(format!("watch canceled: {}", resp.cancel_reason())),
                            })).await;
                            return;
                        }
                        if resp.events().is_empty() && !resp.created() {
                            let revision = resp.header().map(|h| h.revision()).unwrap_or(0);
                            if tx.send(Ok(WatchItem::Progress(revision))).await.is_err() {
                                return;
                            }
                            continue;
                        }
                        for event in resp.events() {
                            let item = match change(event) {
                                Ok(Some(change)) => Ok(WatchItem::Change(std::sync::Arc::new(change))),
                                Ok(None) => continue,
                                Err(e) => Err(e),
                            };
                            if tx.send(item).await.is_err() {
                                return;
                            }
                        }
                    }
                }
            }
        });
        Ok(stream)
    }

    /// The underlying client, for maintenance calls.
    pub fn client(&self) -> &Client {
        &self.client
    }
}

fn change(event: &etcd_client::Event) -> Result<Option<Change>, StorageError> {
    let Some(kv) = event.kv() else {
        return Ok(None);
    };
    let key = String::from_utf8_lossy(kv.key()).into_owned();
    let previous = event
        .prev_kv()
        .filter(|prev| !prev.value().is_empty())
        .map(|prev| bytes::Bytes::copy_from_slice(prev.value()));
    // The object is sent as stored with its resourceVersion spliced in;
    // splicing checks the text as decoding it would.
    let json = |text: &[u8], revision: i64| {
        crate::rawjson::with_resource_version(text, revision)
            .map(bytes::Bytes::from)
            .map_err(|source| StorageError::Corrupt {
                key: key.clone(),
                source,
            })
    };
    match event.event_type() {
        EventType::Put => {
            let kind = if kv.create_revision() == kv.mod_revision() {
                ChangeKind::Added
            } else {
                ChangeKind::Modified
            };
            let json = json(kv.value(), kv.mod_revision())?;
            Ok(Some(Change::new(
                kind,
                key,
                json,
                previous.map(Previous::stored),
                kv.mod_revision(),
            )))
        }
        EventType::Delete => {
            // A deletion is sent as the last state, at the deletion's
            // revision.
            let Some(last) = previous else {
                return Ok(None);
            };
            let json = json(&last, kv.mod_revision())?;
            Ok(Some(Change::new(
                ChangeKind::Deleted,
                key,
                json,
                Some(Previous::stored(last)),
                kv.mod_revision(),
            )))
        }
    }
}

/// Spawn `body` with a channel and return the receiving end as a stream.
fn async_stream<T, F, Fut>(body: F) -> impl Stream<Item = T> + Send + 'static
where
    T: Send + 'static,
    F: FnOnce(tokio::sync::mpsc::Sender<T>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let task = tokio::spawn(body(tx));
    AbortOnDrop {
        inner: tokio_stream::wrappers::ReceiverStream::new(rx),
        task,
    }
}

/// A stream that stops its producing task when dropped, so a client that
/// goes away releases its etcd watch.
struct AbortOnDrop<S> {
    inner: S,
    task: tokio::task::JoinHandle<()>,
}

impl<S: Stream + Unpin> Stream for AbortOnDrop<S> {
    type Item = S::Item;
    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        std::pin::Pin::new(&mut self.inner).poll_next(cx)
    }
}

impl<S> Drop for AbortOnDrop<S> {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What a failed guarded write reads back to say why it failed: the
/// object's key, then each claimed side key.
fn conflict_reads(key: &str, claims: &[String]) -> Vec<TxnOp> {
    std::iter::once(key)
        .chain(claims.iter().map(String::as_str))
        .map(|k| TxnOp::get(k, None))
        .collect()
}

fn found_keys(responses: &[TxnOpResponse]) -> Vec<String> {
    responses
        .iter()
        .filter_map(|r| match r {
            TxnOpResponse::Get(get) => get
                .kvs()
                .first()
                .map(|e| String::from_utf8_lossy(e.key()).into_owned()),
            _ => None,
        })
        .collect()
}

/// The stored form of an object: its JSON without
/// `metadata.resourceVersion`, which is the key's revision instead.
fn encode(value: &Value) -> Vec<u8> {
    serde_json::to_vec(&WithoutResourceVersion(value)).unwrap_or_default()
}

/// Serializes an object as it is but for `metadata.resourceVersion`,
/// without copying it first.
struct WithoutResourceVersion<'a>(&'a Value);

impl serde::Serialize for WithoutResourceVersion<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let Value::Object(fields) = self.0 else {
            return self.0.serialize(serializer);
        };
        let mut map = serializer.serialize_map(Some(fields.len()))?;
        for (key, value) in fields {
            match value {
                Value::Object(metadata) if key == "metadata" => {
                    let kept = metadata.iter().filter(|(k, _)| *k != "resourceVersion");
                    map.serialize_entry(key, &MapOf(std::cell::Cell::new(Some(kept))))?;
                }
                _ => map.serialize_entry(key, value)?,
            }
        }
        map.end()
    }
}

/// Serializes the entries of an iterator as a JSON object (once).
struct MapOf<I>(std::cell::Cell<Option<I>>);

impl<'a, I: Iterator<Item = (&'a String, &'a Value)>> serde::Serialize for MapOf<I> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let entries = self.0.take().into_iter().flatten();
        serializer.collect_map(entries)
    }
}

fn decode(key: &str, bytes: &[u8], revision: i64) -> Result<Stored, StorageError> {
    let mut value: Value =
        serde_json::from_slice(bytes).map_err(|source| StorageError::Corrupt {
            key: key.into(),
            source,
        })?;
    set_resource_version(&mut value, revision);
    Ok(Stored { value, revision })
}

/// Which page of a list to read: see [`Store::list_json`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Page {
    /// The key to start from; `None`: the first.
    pub start: Option<String>,
    /// At most this many objects; 0: all.
    pub limit: i64,
    /// The revision to read at; 0: the current one.
    pub revision: i64,
}

/// The end of the range of every key under `prefix`: the prefix with its last byte incremented
/// (etcd's prefix range end).
fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// Set `metadata.resourceVersion` of `object` to `revision`.
pub fn set_resource_version(object: &mut Value, revision: i64) {
    if let Some(meta) = object.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.insert(
            "resourceVersion".into(),
            Value::String(revision.to_string()),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn resource_version_is_never_stored() {
        let obj = json!({"kind": "K", "metadata": {"name": "a", "resourceVersion": "12",
            "labels": {"resourceVersion": "kept"}}, "spec": {"resourceVersion": "kept"}});
        let bytes = encode(&obj);
        assert_eq!(
            String::from_utf8_lossy(&bytes),
            r#"{"kind":"K","metadata":{"name":"a","labels":{"resourceVersion":"kept"}},"spec":{"resourceVersion":"kept"}}"#,
            "only metadata.resourceVersion is left out, and the order is kept"
        );
        for other in [json!({"metadata": null}), json!([1]), json!({})] {
            assert_eq!(encode(&other), serde_json::to_vec(&other).expect("json"));
        }
        let obj = json!({"metadata": {"name": "a", "resourceVersion": "12"}});
        let bytes = encode(&obj);
        let stored = decode("/k", &bytes, 34).expect("decodes");
        assert_eq!(stored.value["metadata"]["resourceVersion"], "34");
        assert_eq!(stored.revision, 34);
    }

    #[test]
    fn a_store_whose_etcd_is_down_fails_fast() {
        // A port nothing listens on.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .expect("bind a free port")
            .local_addr()
            .expect("local address")
            .port();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(async {
            let store = match Store::connect(&[format!("http://127.0.0.1:{port}")]).await {
                Ok(store) => store,
                // The client may refuse outright; that is fast too.
                Err(StorageError::Unavailable { .. }) => return,
                Err(other) => panic!("unexpected error: {other}"),
            };
            assert!(!store.healthy().await, "nothing answers on {port}");
            let start = std::time::Instant::now();
            for _ in 0..3 {
                let err = store.get("/registry/x").await.expect_err("etcd is down");
                assert!(matches!(err, StorageError::Unavailable { .. }), "{err}");
                let err = store
                    .create("/registry/x", &json!({}), &[])
                    .await
                    .expect_err("etcd is down");
                assert!(matches!(err, StorageError::Unavailable { .. }), "{err}");
            }
            assert!(
                start.elapsed() < Duration::from_millis(500),
                "six refused calls took {:?}",
                start.elapsed()
            );
        });
    }

    #[test]
    fn connection_errors_are_told_from_refusals() {
        let down = etcd_client::Error::IoError(std::io::Error::other("reset"));
        assert!(is_connection_error(&down));
        let refused = etcd_client::Error::InvalidArgs("bad".into());
        assert!(!is_connection_error(&refused));
        assert!(matches!(known_down(), StorageError::Unavailable { .. }));
    }

    /// The lease etcd holds `key` under (0: none), read past the store.
    async fn lease_of(etcd: &mut etcd_client::Client, key: &str) -> Option<i64> {
        let resp = etcd.get(key, None).await.expect("etcd get");
        resp.kvs().first().map(|kv| kv.lease())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn events_expire_on_shared_leases_and_other_objects_stay() {
        let etcd = crate::testing::Etcd::start();
        let base = crate::testing::store(&etcd).await;
        let mut raw = etcd_client::Client::connect([etcd.url()], None)
            .await
            .expect("raw etcd client");
        let events = "/registry/core/events/";
        let event = json!({"kind": "Event", "metadata": {"name": "e"}});

        // A TTL of 40 s shares a lease for 2 s (5%): writes in a burst
        // share one; other keys get none; an update keeps a lease.
        let store = base.clone().expiring(events, Duration::from_secs(40));
        store
            .create("/registry/core/events/ns/a", &event, &[])
            .await
            .expect("create a");
        store
            .create("/registry/core/events/ns/b", &event, &[])
            .await
            .expect("create b");
        store
            .create("/registry/core/configmaps/ns/c", &event, &[])
            .await
            .expect("create c");
        let a = lease_of(&mut raw, "/registry/core/events/ns/a")
            .await
            .expect("a stored");
        let b = lease_of(&mut raw, "/registry/core/events/ns/b")
            .await
            .expect("b stored");
        assert!(a != 0, "an event is written with a lease");
        assert_eq!(a, b, "events written together share a lease");
        assert_eq!(
            lease_of(&mut raw, "/registry/core/configmaps/ns/c").await,
            Some(0)
        );
        let ttl = raw
            .lease_time_to_live(a, None)
            .await
            .expect("lease ttl")
            .ttl();
        assert!(
            (38..=42).contains(&ttl),
            "lease of the TTL plus the window, {ttl} s left"
        );

        // A write whose shared lease was revoked gets a new one rather than
        // failing, and keeps expiring.
        raw.lease_revoke(a).await.expect("revoke the shared lease");
        let revision = store
            .create("/registry/core/events/ns/d", &event, &[])
            .await
            .expect("create on a revoked lease");
        let d = lease_of(&mut raw, "/registry/core/events/ns/d")
            .await
            .expect("d stored");
        assert!(d != 0 && d != a, "a new lease, not {a}");
        store
            .update("/registry/core/events/ns/d", &event, revision, &[], &[])
            .await
            .expect("update d");
        let d2 = lease_of(&mut raw, "/registry/core/events/ns/d")
            .await
            .expect("d stored");
        assert_eq!(d2, d, "an update within the window keeps the shared lease");
        assert_eq!(
            lease_of(&mut raw, "/registry/core/events/ns/a").await,
            None,
            "revoking the lease deleted the events on it"
        );

        // With a TTL of 2 s, etcd deletes the event and a watch sees it go;
        // the configmap stays. An event updated 1 s in lives on 2 s from
        // then: its update re-attached a lease.
        let short = base.clone().expiring(events, Duration::from_secs(2));
        let start = revision;
        let first = short
            .create("/registry/core/events/ns/short", &event, &[])
            .await
            .expect("create short");
        short
            .create("/registry/core/events/ns/renewed", &event, &[])
            .await
            .expect("create renewed");
        tokio::time::sleep(Duration::from_millis(1000)).await;
        let renewed = short
            .get("/registry/core/events/ns/renewed")
            .await
            .expect("get renewed")
            .expect("renewed still there after 1 s");
        short
            .update(
                "/registry/core/events/ns/renewed",
                &event,
                renewed.revision,
                &[],
                &[],
            )
            .await
            .expect("update renewed");
        let mut watch = Box::pin(short.watch(events, start).await.expect("watch events"));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        let mut deleted = Vec::new();
        while !deleted.iter().any(|k: &String| k.ends_with("/short")) {
            let item = tokio::time::timeout_at(deadline, futures::StreamExt::next(&mut watch))
                .await
                .expect("the short-lived event is deleted within 15 s")
                .expect("watch goes on")
                .expect("watch item");
            if let WatchItem::Change(change) = item
                && change.kind == ChangeKind::Deleted
                && change.revision > first
            {
                deleted.push(change.key.clone());
            }
        }
        assert!(
            short
                .get("/registry/core/events/ns/short")
                .await
                .expect("get")
                .is_none(),
            "the expired event is gone"
        );
        assert!(
            !deleted.iter().any(|k| k.ends_with("/renewed")),
            "the renewed event outlived the first: {deleted:?}"
        );
        assert!(
            short
                .get("/registry/core/configmaps/ns/c")
                .await
                .expect("get c")
                .is_some(),
            "objects outside the prefix do not expire"
        );
    }

    #[test]
    fn corrupt_values_name_their_key() {
        let err = decode("/registry/core/pods/a/b", b"{nope", 1).expect_err("not json");
        assert!(err.to_string().contains("/registry/core/pods/a/b"), "{err}");
    }
}
