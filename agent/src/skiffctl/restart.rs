//! `skiffctl restart-agent --node N` (hidden): stop one node's agent and
//! start it again exactly as `up` did (same command line, same network
//! namespace, same log, appended), recording the new process in the state
//! file. The pods keep running meanwhile; the new agent adopts them and
//! restores its eBPF datapath from the pins. Used by the end-to-end tests.

use std::time::{Duration, Instant};

use clap::Args;

use super::procs::{self, Spawned};
use super::state::State;
use super::{ClusterArgs, SkiffctlError, log_tail};

/// How long the old agent gets between SIGTERM and SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(10);
/// How long the new agent must stay up before the restart counts as done.
const SETTLE: Duration = Duration::from_secs(1);

/// Flags of `skiffctl restart-agent`.
#[derive(Debug, Clone, Args)]
pub struct RestartAgentArgs {
    /// The cluster's state directory.
    #[command(flatten)]
    pub cluster: ClusterArgs,
    /// The node whose agent restarts.
    #[arg(long)]
    pub node: String,
    /// Stop the agent with SIGKILL at once (a crash) instead of SIGTERM.
    #[arg(long)]
    pub kill: bool,
}

/// Run `skiffctl restart-agent`.
pub fn restart_agent(args: &RestartAgentArgs) -> Result<(), SkiffctlError> {
    let dir = args.cluster.state_dir();
    let mut state = State::load(&dir)?
        .ok_or_else(|| SkiffctlError::cluster(format!("no cluster state in {}", dir.display())))?;
    let node = state
        .nodes
        .iter()
        .find(|n| n.name == args.node)
        .cloned()
        .ok_or_else(|| {
            let names: Vec<&str> = state.nodes.iter().map(|n| n.name.as_str()).collect();
            SkiffctlError::cluster(format!(
                "no node {} in the cluster (nodes: {})",
                args.node,
                names.join(", ")
            ))
        })?;
    let index = state
        .processes
        .iter()
        .position(|p| p.role == "agent" && p.node.as_deref() == Some(node.name.as_str()))
        .ok_or_else(|| SkiffctlError::cluster(format!("no agent recorded for {}", node.name)))?;
    let old = state.processes[index].clone();
    if old.is_alive() {
        if args.kill {
            procs::terminate(&[old.pid], Duration::ZERO);
        } else {
            procs::terminate(&[old.pid], STOP_GRACE);
        }
    }
    let Spawned { record, mut child } = procs::spawn_detached(
        &old.role,
        old.node.as_deref(),
        Some(&node.netns),
        &old.command,
        &old.log,
    )?;
    state.processes[index] = record.clone();
    state.save(&dir)?;
    let deadline = Instant::now() + SETTLE;
    while Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(SkiffctlError::cluster(format!(
                "the restarted agent on {} exited ({status}); its log {} ends with:\n{}",
                node.name,
                old.log.display(),
                log_tail(&old.log, 15)
            )));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    println!(
        "agent on {} restarted (pid {} → {})",
        node.name, old.pid, record.pid
    );
    Ok(())
}
