//! The local cluster's state file: everything `skiffctl up` made, so that
//! `down` can remove it and `up`/`status` can tell a healthy cluster from a
//! partial one.
//!
//! The file (`<state-dir>/state.json`) is rewritten atomically after every
//! step of `up`, so a failed or interrupted `up` still records what it made.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::SkiffctlError;

/// The state file's name inside the state directory.
pub const STATE_FILE: &str = "state.json";

/// What one local cluster is made of.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct State {
    /// The cluster's name ("" for the default cluster); it prefixes node
    /// and namespace names.
    pub name: String,
    /// Whether `skiffctl up` created the state directory itself (then
    /// `down` removes it).
    pub created_state_dir: bool,
    /// The nodes, in order.
    pub nodes: Vec<NodeRecord>,
    /// Network namespaces made, in creation order.
    pub namespaces: Vec<String>,
    /// Processes started, in start order.
    pub processes: Vec<ProcessRecord>,
    /// Files and directories made outside the state directory (the
    /// kubeconfig, per-node run directories), removed by `down`.
    pub files: Vec<PathBuf>,
    /// The admin kubeconfig for the host (server on 127.0.0.1).
    pub kubeconfig: Option<PathBuf>,
    /// The host port the API server is forwarded to.
    pub api_port: u16,
    /// Whether the nodes run hollow agents.
    pub hollow: bool,
    /// Set once `up` finished: every node Ready and routed.
    pub complete: bool,
}

/// One node of the local cluster.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeRecord {
    /// The Node's name.
    pub name: String,
    /// Its network namespace (`skiff-<name>`).
    pub netns: String,
    /// Its fabric address.
    pub ip: std::net::Ipv4Addr,
    /// Its containerd's gRPC socket.
    pub containerd_address: PathBuf,
    /// Its pod CIDR, once node IPAM assigned it and `up` routed it.
    #[serde(default)]
    pub pod_cidr: Option<String>,
}

/// A process `up` started.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProcessRecord {
    /// What it is: `control-plane`, `api-forwarder`, `containerd`, `agent`.
    pub role: String,
    /// The node it serves, if any.
    pub node: Option<String>,
    /// Its pid.
    pub pid: u32,
    /// Its start time (field 22 of `/proc/<pid>/stat`), so a reused pid is
    /// never mistaken for it.
    pub start_time: u64,
    /// Its command line.
    pub command: Vec<String>,
    /// Where its standard output and error go.
    pub log: PathBuf,
}

impl ProcessRecord {
    /// A label for progress lines and errors: `containerd on node-1`.
    pub fn label(&self) -> String {
        match &self.node {
            Some(node) => format!("{} on {node}", self.role),
            None => self.role.clone(),
        }
    }

    /// Whether the process still runs (same pid and start time, not a
    /// zombie).
    pub fn is_alive(&self) -> bool {
        matches!(proc_stat(self.pid), Some((state, start)) if start == self.start_time && state != 'Z' && state != 'X')
    }
}

/// The state (one-letter, as in `ps`) and start time of `pid`, from
/// `/proc/<pid>/stat`; `None` when there is no such process.
pub fn proc_stat(pid: u32) -> Option<(char, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&text).map(|(state, _, start)| (state, start))
}

/// The parent pid of `pid`.
pub fn proc_ppid(pid: u32) -> Option<u32> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&text).map(|(_, ppid, _)| ppid)
}

/// (state, ppid, starttime) from a `/proc/<pid>/stat` line; the command
/// name in parentheses may itself hold spaces and parentheses.
fn parse_stat(text: &str) -> Option<(char, u32, u64)> {
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // fields[0] is field 3 (state), so field N is fields[N - 3].
    let state = fields.first()?.chars().next()?;
    let ppid = fields.get(1)?.parse().ok()?;
    let start = fields.get(19)?.parse().ok()?;
    Some((state, ppid, start))
}

impl State {
    /// The state file of `dir`.
    pub fn path(dir: &Path) -> PathBuf {
        dir.join(STATE_FILE)
    }

    /// Load the state of `dir`; `None` when there is no state file.
    pub fn load(dir: &Path) -> Result<Option<State>, SkiffctlError> {
        let path = State::path(dir);
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(SkiffctlError::Io {
                    what: "cannot read the state file",
                    path,
                    source,
                });
            }
        };
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|source| SkiffctlError::State { path, source })
    }

    /// Write the state to `dir` atomically (temporary file and rename).
    pub fn save(&self, dir: &Path) -> Result<(), SkiffctlError> {
        let path = State::path(dir);
        let tmp = dir.join(format!("{STATE_FILE}.tmp"));
        let text = serde_json::to_string_pretty(self).expect("the state serializes");
        std::fs::write(&tmp, text + "\n")
            .and_then(|()| std::fs::rename(&tmp, &path))
            .map_err(|source| SkiffctlError::Io {
                what: "cannot write the state file",
                path,
                source,
            })
    }

    /// The processes that no longer run.
    pub fn dead_processes(&self) -> Vec<&ProcessRecord> {
        self.processes.iter().filter(|p| !p.is_alive()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_lines_with_odd_command_names_parse() {
        let line =
            "1234 (a) b (c)) S 1 1234 1234 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 98765 1000 10";
        assert_eq!(parse_stat(line), Some(('S', 1, 98765)));
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn own_process_is_alive_and_a_changed_start_time_is_not() {
        let pid = std::process::id();
        let (state, start) = proc_stat(pid).expect("own stat is readable");
        assert_ne!(state, 'Z');
        let mut record = ProcessRecord {
            role: "test".into(),
            node: Some("node-1".into()),
            pid,
            start_time: start,
            command: vec![],
            log: PathBuf::new(),
        };
        assert!(record.is_alive());
        assert_eq!(record.label(), "test on node-1");
        record.start_time += 1;
        assert!(!record.is_alive(), "a reused pid must not count as alive");
    }

    #[test]
    fn state_round_trips_through_its_file() {
        let dir = std::env::temp_dir().join(format!("skiffctl-state-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        assert!(State::load(&dir).expect("no file is fine").is_none());
        let state = State {
            name: "t".into(),
            namespaces: vec!["skiff-t-fabric".into()],
            api_port: 6443,
            ..State::default()
        };
        state.save(&dir).expect("saves");
        let back = State::load(&dir).expect("loads").expect("exists");
        assert_eq!(back.namespaces, state.namespaces);
        assert_eq!(back.api_port, 6443);
        std::fs::write(State::path(&dir), "{").expect("overwrite");
        assert!(matches!(
            State::load(&dir),
            Err(SkiffctlError::State { .. })
        ));
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}
