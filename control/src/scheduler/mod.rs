//! The scheduler: places unscheduled pods on nodes (being written).

use tokio_util::sync::CancellationToken;

use crate::controllers::DaemonArgs;

/// Flags of `skiff-control scheduler`.
#[derive(Debug, Clone, clap::Args)]
pub struct SchedulerArgs {
    /// Connection and election.
    #[command(flatten)]
    pub daemon: DaemonArgs,
    /// Scheduler options.
    #[command(flatten)]
    pub options: SchedulerOptions,
}

/// The scheduler's configuration.
#[derive(Debug, Clone, clap::Args)]
pub struct SchedulerOptions {
    /// The `spec.schedulerName` this scheduler serves.
    #[arg(long, default_value = "default-scheduler")]
    pub scheduler_name: String,
}

/// Run the scheduler until `shutdown`.
pub async fn run(client: kube::Client, options: SchedulerOptions, leader_elect: bool, timing: crate::leader::ElectionTiming, shutdown: CancellationToken) {
    let _ = (client, options, leader_elect, timing);
    shutdown.cancelled().await;
}
