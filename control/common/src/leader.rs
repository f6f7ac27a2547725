//! Leader election on `coordination.k8s.io/v1` Leases, as client-go's
//! leaderelection does, so that two replicas of the scheduler or of the
//! controller manager can run and only one acts.
//!
//! The leader renews `spec.renewTime` every retry period; a candidate takes
//! the lease once `renewTime + leaseDurationSeconds` has passed. Writes are
//! guarded by resourceVersion, so two candidates never both win. A leader
//! that cannot renew within the renew deadline stops its work before the
//! lease can expire, and a leader that shuts down releases the lease so the
//! standby takes over at once.

use std::future::Future;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::{Api, PostParams};
use tokio_util::sync::CancellationToken;

/// Timing of an election, upstream's `--leader-elect-*` flags.
#[derive(Debug, Clone, Copy, clap::Args)]
pub struct ElectionTiming {
    /// How long a lease is valid after its last renewal.
    #[arg(long = "leader-elect-lease-duration", value_parser = crate::duration::parse_duration, default_value = "10s")]
    pub lease_duration: Duration,
    /// How long a leader keeps trying to renew before it steps down.
    #[arg(long = "leader-elect-renew-deadline", value_parser = crate::duration::parse_duration, default_value = "8s")]
    pub renew_deadline: Duration,
    /// How often candidates try and leaders renew.
    #[arg(long = "leader-elect-retry-period", value_parser = crate::duration::parse_duration, default_value = "2s")]
    pub retry_period: Duration,
}

impl Default for ElectionTiming {
    fn default() -> Self {
        ElectionTiming {
            lease_duration: Duration::from_secs(10),
            renew_deadline: Duration::from_secs(8),
            retry_period: Duration::from_secs(2),
        }
    }
}

/// Whether and how a daemon elects a leader among its replicas
/// (upstream's `--leader-elect` and `--leader-elect-*` flags).
#[derive(Debug, Clone, Copy, clap::Args)]
pub struct ElectionArgs {
    /// Take part in leader election, so only one replica acts.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub leader_elect: bool,
    /// Election timing.
    #[command(flatten)]
    pub timing: ElectionTiming,
}

/// Run `work` until `shutdown`: at once and once when `election` is off,
/// else whenever this process holds the Lease `kube-system/<lease>` (`work`
/// gets a token cancelled when leadership is lost, and starts again if it
/// comes back).
pub async fn run_elected<F, Fut>(
    client: kube::Client,
    lease: &str,
    election: ElectionArgs,
    shutdown: CancellationToken,
    work: F,
) where
    F: Fn(CancellationToken) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    if !election.leader_elect {
        work(shutdown).await;
        return;
    }
    LeaderElection::new(client, "kube-system", lease, &identity(), election.timing)
        .run(shutdown, work)
        .await;
}

/// One candidate in one election.
pub struct LeaderElection {
    api: Api<Lease>,
    name: String,
    identity: String,
    timing: ElectionTiming,
}

impl LeaderElection {
    /// A candidate `identity` for the lease `namespace/name`.
    pub fn new(
        client: kube::Client,
        namespace: &str,
        name: &str,
        identity: &str,
        timing: ElectionTiming,
    ) -> LeaderElection {
        LeaderElection {
            api: Api::namespaced(client, namespace),
            name: name.to_string(),
            identity: identity.to_string(),
            timing,
        }
    }

    /// Run `work` whenever this candidate leads, until `shutdown`. `work`
    /// gets a token that is cancelled when leadership is lost; it is started
    /// again if leadership comes back.
    pub async fn run<F, Fut>(&self, shutdown: CancellationToken, work: F)
    where
        F: Fn(CancellationToken) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        loop {
            // Candidate: try until we hold the lease.
            loop {
                if shutdown.is_cancelled() {
                    return;
                }
                match self.try_acquire_or_renew().await {
                    Ok(true) => break,
                    Ok(false) => {}
                    Err(error) => {
                        tracing::debug!(error = %crate::error::chain(&error), lease = %self.name, "cannot read lease")
                    }
                }
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(self.timing.retry_period) => {}
                }
            }
            tracing::info!(lease = %self.name, identity = %self.identity, "became leader");
            let leading = shutdown.child_token();
            let task = tokio::spawn(work(leading.clone()));
            // Leader: renew until shutdown or the renew deadline passes.
            let mut last_renew = tokio::time::Instant::now();
            let released = loop {
                tokio::select! {
                    _ = shutdown.cancelled() => break true,
                    _ = tokio::time::sleep(self.timing.retry_period) => {}
                }
                match self.try_acquire_or_renew().await {
                    Ok(true) => last_renew = tokio::time::Instant::now(),
                    Ok(false) => {
                        tracing::warn!(lease = %self.name, "lost the lease to another candidate");
                        break false;
                    }
                    Err(error) => {
                        if last_renew.elapsed() > self.timing.renew_deadline {
                            tracing::warn!(error = %crate::error::chain(&error), lease = %self.name, "cannot renew the lease in time; stepping down");
                            break false;
                        }
                    }
                }
            };
            leading.cancel();
            let _ = task.await;
            if released {
                self.release().await;
                return;
            }
        }
    }

    /// Take or keep the lease; `Ok(true)` when this candidate holds it.
    async fn try_acquire_or_renew(&self) -> Result<bool, kube::Error> {
        let now = jiff::Timestamp::now();
        let seconds = self.timing.lease_duration.as_secs().max(1) as i32;
        let Some(mut lease) = self.api.get_opt(&self.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.identity.clone()),
                    lease_duration_seconds: Some(seconds),
                    acquire_time: Some(MicroTime(now)),
                    renew_time: Some(MicroTime(now)),
                    lease_transitions: Some(0),
                    ..LeaseSpec::default()
                }),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
                Err(e) => Err(e),
            };
        };
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        let holder = spec.holder_identity.clone().unwrap_or_default();
        let ours = holder == self.identity;
        if !ours && !holder.is_empty() {
            let duration = spec.lease_duration_seconds.unwrap_or(seconds) as i64;
            let renewed = spec.renew_time.as_ref().map(|t| t.0);
            let expired = match renewed {
                Some(at) => at + jiff::SignedDuration::from_secs(duration) < now,
                None => true,
            };
            if !expired {
                return Ok(false);
            }
        }
        if !ours {
            spec.holder_identity = Some(self.identity.clone());
            spec.acquire_time = Some(MicroTime(now));
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
        }
        spec.lease_duration_seconds = Some(seconds);
        spec.renew_time = Some(MicroTime(now));
        match self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Give the lease up so a standby need not wait for it to expire.
    async fn release(&self) {
        let Ok(Some(mut lease)) = self.api.get_opt(&self.name).await else {
            return;
        };
        let Some(spec) = lease.spec.as_mut() else {
            return;
        };
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return;
        }
        spec.holder_identity = None;
        spec.renew_time = None;
        spec.acquire_time = None;
        spec.lease_duration_seconds = Some(1);
        if let Err(error) = self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            tracing::debug!(error = %crate::error::chain(&error), lease = %self.name, "cannot release lease");
        }
    }
}

/// A unique identity for this process, as upstream's `hostname_uuid`.
pub fn identity() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "localhost".to_string());
    format!("{host}_{}", uuid::Uuid::new_v4())
}
