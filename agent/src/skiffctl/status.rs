//! `skiffctl status`: the local cluster's nodes (from the state file and
//! the API's Ready conditions), its processes and its kubeconfig.

use std::path::Path;
use std::time::Duration;

use k8s_openapi::api::core::v1::Node;

use super::fabric;
use super::state::State;
use super::up::node_ready;
use super::{ClusterArgs, SkiffctlError};

/// Run `skiffctl status`: an error when there is no cluster or it is not
/// healthy (after printing what is known).
pub fn status(args: &ClusterArgs) -> Result<(), SkiffctlError> {
    let dir = args.state_dir();
    let Some(state) = State::load(&dir)? else {
        return Err(SkiffctlError::cluster(format!(
            "no cluster in {} (start one with `skiffctl up`)",
            dir.display()
        )));
    };
    print(&dir, &state)?;
    let problems = problems(&state);
    if !state.complete || !problems.is_empty() {
        return Err(SkiffctlError::cluster(format!(
            "the cluster is not healthy{}{}; `skiffctl down --state-dir {}` removes it",
            if state.complete {
                ""
            } else {
                " (its `up` did not finish)"
            },
            if problems.is_empty() {
                String::new()
            } else {
                format!(": {}", problems.join("; "))
            },
            dir.display()
        )));
    }
    Ok(())
}

/// What is wrong with a recorded cluster: dead processes, missing
/// namespaces.
pub fn problems(state: &State) -> Vec<String> {
    let mut problems: Vec<String> = state
        .dead_processes()
        .iter()
        .map(|p| format!("{} (pid {}) is not running", p.label(), p.pid))
        .collect();
    problems.extend(
        state
            .namespaces
            .iter()
            .filter(|n| !fabric::netns_exists(n))
            .map(|n| format!("network namespace {n} is gone")),
    );
    problems
}

/// Print the cluster's status.
pub fn print(dir: &Path, state: &State) -> Result<(), SkiffctlError> {
    let name = if state.name.is_empty() {
        "default"
    } else {
        &state.name
    };
    println!(
        "cluster {name} ({}{}), state in {}",
        if state.complete { "up" } else { "partial" },
        if state.hollow { ", hollow nodes" } else { "" },
        dir.display()
    );
    if let Some(kubeconfig) = &state.kubeconfig {
        println!(
            "kubeconfig: {}  (API on 127.0.0.1:{})",
            kubeconfig.display(),
            state.api_port
        );
    }
    let (nodes, api_error) = match &state.kubeconfig {
        Some(path) => match list_nodes(path) {
            Ok(nodes) => (Some(nodes), None),
            Err(e) => (None, Some(skiff_common::error::chain(&e))),
        },
        None => (None, Some("no kubeconfig recorded".to_string())),
    };
    println!(
        "\nNODE                 NETNS                      ADDRESS       POD CIDR          READY"
    );
    for node in &state.nodes {
        let ready = match &nodes {
            Some(nodes) => match nodes
                .iter()
                .find(|n| n.metadata.name.as_deref() == Some(node.name.as_str()))
            {
                Some(n) if node_ready(n) => "True",
                Some(_) => "False",
                None => "not registered",
            },
            None => "unknown",
        };
        let cidr = node
            .pod_cidr
            .clone()
            .or_else(|| {
                nodes
                    .as_ref()?
                    .iter()
                    .find(|n| n.metadata.name.as_deref() == Some(node.name.as_str()))?
                    .spec
                    .as_ref()?
                    .pod_cidr
                    .clone()
            })
            .unwrap_or_else(|| "-".into());
        let netns = if fabric::netns_exists(&node.netns) {
            node.netns.clone()
        } else {
            format!("{} (gone)", node.netns)
        };
        println!(
            "{:<20} {:<26} {:<13} {:<17} {ready}",
            node.name, netns, node.ip, cidr
        );
    }
    if let Some(error) = api_error {
        println!("(API server unreachable: {error})");
    }
    println!("\nPROCESS                         PID      STATE     LOG");
    for p in &state.processes {
        println!(
            "{:<31} {:<8} {:<9} {}",
            p.label(),
            p.pid,
            if p.is_alive() { "running" } else { "dead" },
            p.log.display()
        );
    }
    Ok(())
}

/// Why the Nodes could not be listed.
#[derive(Debug, thiserror::Error)]
enum ListError {
    /// No runtime for the client.
    #[error(transparent)]
    Runtime(#[from] SkiffctlError),
    /// No client from the recorded kubeconfig.
    #[error(transparent)]
    Client(#[from] skiff_common::daemon::ClientError),
    /// The API server answered with an error.
    #[error(transparent)]
    Api(#[from] kube::Error),
    /// The API server did not answer in time.
    #[error("timed out after 5s")]
    Timeout,
}

fn list_nodes(kubeconfig: &Path) -> Result<Vec<Node>, ListError> {
    let runtime = super::runtime()?;
    runtime.block_on(async {
        let client = skiff_common::daemon::client(Some(kubeconfig)).await?;
        let api: kube::Api<Node> = kube::Api::all(client);
        match tokio::time::timeout(Duration::from_secs(5), api.list(&Default::default())).await {
            Ok(Ok(list)) => Ok(list.items),
            Ok(Err(e)) => Err(e.into()),
            Err(_) => Err(ListError::Timeout),
        }
    })
}
