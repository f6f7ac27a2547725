//! Processes and mounts of the local cluster: starting detached daemons
//! inside a network namespace, stopping them (SIGTERM, then SIGKILL), and
//! finding what a crashed or stale cluster left behind in `/proc`.

use std::collections::{BTreeSet, HashMap};
use std::ffi::CString;
use std::fs::File;
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use clap::Args;
use nix::sched::CloneFlags;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use super::SkiffctlError;
use super::fabric::netns_path;
use super::state::{ProcessRecord, proc_ppid, proc_stat};

/// Flags of the hidden `skiffctl exec-in`: become a session leader, enter
/// a network namespace and exec a command (how `up` starts daemons inside
/// node namespaces without a private mount namespace, unlike
/// `ip netns exec`).
#[derive(Debug, Clone, Args)]
pub struct ExecInArgs {
    /// The named network namespace to enter.
    #[arg(long)]
    pub netns: Option<String>,
    /// The command and its arguments.
    #[arg(trailing_var_arg = true, required = true, allow_hyphen_values = true)]
    pub command: Vec<String>,
}

/// Run `skiffctl exec-in`: returns only on failure.
pub fn exec_in(args: &ExecInArgs) -> SkiffctlError {
    // Already a session leader when started from a shell's job: fine.
    let _ = nix::unistd::setsid();
    if let Some(netns) = &args.netns {
        let path = netns_path(netns);
        let file = match File::open(&path) {
            Ok(file) => file,
            Err(source) => {
                return SkiffctlError::Io {
                    what: "cannot open the network namespace",
                    path,
                    source,
                };
            }
        };
        if let Err(source) = nix::sched::setns(file.as_fd(), CloneFlags::CLONE_NEWNET) {
            return SkiffctlError::Sys {
                what: format!("cannot enter network namespace {netns}"),
                source,
            };
        }
    }
    let argv: Result<Vec<CString>, _> = args
        .command
        .iter()
        .map(|a| CString::new(a.as_bytes()))
        .collect();
    let Ok(argv) = argv else {
        return SkiffctlError::Cluster {
            message: "a command argument holds a NUL byte".into(),
        };
    };
    let Err(source) = nix::unistd::execvp(&argv[0], &argv);
    SkiffctlError::Sys {
        what: format!("cannot execute {}", args.command[0]),
        source,
    }
}

/// A daemon started by [`spawn_detached`].
pub struct Spawned {
    /// Its record for the state file.
    pub record: ProcessRecord,
    /// The child handle, to notice an early exit while `up` waits.
    pub child: Child,
}

/// Start `command` detached (own session, output appended to `log`),
/// inside `netns` if given, through `skiffctl exec-in`.
pub fn spawn_detached(
    role: &str,
    node: Option<&str>,
    netns: Option<&str>,
    command: &[String],
    log: &Path,
) -> Result<Spawned, SkiffctlError> {
    let exe = std::env::current_exe().map_err(|source| SkiffctlError::Io {
        what: "cannot find the skiffctl executable",
        path: PathBuf::from("/proc/self/exe"),
        source,
    })?;
    let mut cmd = Command::new(&exe);
    cmd.arg("exec-in");
    if let Some(netns) = netns {
        cmd.args(["--netns", netns]);
    }
    cmd.arg("--").args(command);
    spawn_logged(role, node, cmd, Stdio::null(), command, log)
}

/// Start `cmd` with `stdin` and its output appended to `log`.
pub fn spawn_logged(
    role: &str,
    node: Option<&str>,
    mut cmd: Command,
    stdin: Stdio,
    command: &[String],
    log: &Path,
) -> Result<Spawned, SkiffctlError> {
    let io_err = |source| SkiffctlError::Io {
        what: "cannot open the log file",
        path: log.to_path_buf(),
        source,
    };
    if let Some(dir) = log.parent() {
        std::fs::create_dir_all(dir).map_err(io_err)?;
    }
    let out = File::options()
        .create(true)
        .append(true)
        .open(log)
        .map_err(io_err)?;
    let err = out.try_clone().map_err(io_err)?;
    let child = cmd
        .stdin(stdin)
        .stdout(out)
        .stderr(err)
        .spawn()
        .map_err(|source| SkiffctlError::Spawn {
            command: command.join(" "),
            source,
        })?;
    let pid = child.id();
    let start_time = proc_stat(pid).map(|(_, start)| start).unwrap_or_default();
    Ok(Spawned {
        record: ProcessRecord {
            role: role.to_string(),
            node: node.map(str::to_string),
            pid,
            start_time,
            command: command.to_vec(),
            log: log.to_path_buf(),
        },
        child,
    })
}

/// Send `signal` to `pid`, ignoring a process that is already gone.
fn signal(pid: u32, signal: Signal) {
    if let Ok(pid) = i32::try_from(pid) {
        let _ = kill(Pid::from_raw(pid), signal);
    }
}

/// Whether `pid` runs (exists and is no zombie).
pub fn pid_alive(pid: u32) -> bool {
    matches!(proc_stat(pid), Some((state, _)) if state != 'Z' && state != 'X')
}

/// Stop processes: SIGTERM to each that still runs, SIGKILL to those still
/// running after `grace`, then wait (briefly) until they are gone. Returns
/// the pids that had to be killed.
pub fn terminate(pids: &[u32], grace: Duration) -> Vec<u32> {
    let alive: Vec<u32> = pids.iter().copied().filter(|&p| pid_alive(p)).collect();
    for &pid in &alive {
        signal(pid, Signal::SIGTERM);
    }
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline && alive.iter().any(|&p| pid_alive(p)) {
        std::thread::sleep(Duration::from_millis(50));
    }
    let killed: Vec<u32> = alive.iter().copied().filter(|&p| pid_alive(p)).collect();
    for &pid in &killed {
        signal(pid, Signal::SIGKILL);
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline && killed.iter().any(|&p| pid_alive(p)) {
        std::thread::sleep(Duration::from_millis(20));
    }
    killed
}

/// The live pids among the recorded processes (same pid and start time).
pub fn live_pids(records: &[ProcessRecord]) -> Vec<u32> {
    records
        .iter()
        .filter(|r| r.is_alive())
        .map(|r| r.pid)
        .collect()
}

/// Program names of the processes a cluster runs.
const OURS: &[&str] = &[
    "etcd",
    "containerd",
    "skiff-control",
    "skiff-agent",
    "skiffctl",
    "skiff-cni",
];

/// Processes left behind by a cluster: every process whose program is one
/// of the cluster's daemons (or a containerd shim) and whose command line
/// names a path under `state_dir` or the address of a node's containerd,
/// every process inside one of `netns` (by namespace inode), and all their
/// descendants (containers under shims). Never this process or its
/// ancestors.
pub fn strays(state_dir: &Path, markers: &[String], netns: &[String]) -> Vec<u32> {
    let inodes: BTreeSet<(u64, u64)> = netns
        .iter()
        .filter_map(|n| std::fs::metadata(netns_path(n)).ok())
        .map(|m| (m.dev(), m.ino()))
        .collect();
    let mut protected = BTreeSet::new();
    let mut pid = std::process::id();
    while pid > 1 && protected.insert(pid) {
        pid = proc_ppid(pid).unwrap_or(1);
    }
    protected.insert(1);
    let state_dir = state_dir.to_string_lossy().into_owned();
    let mut parents: HashMap<u32, u32> = HashMap::new();
    let mut matched = BTreeSet::new();
    for pid in all_pids() {
        if let Some(ppid) = proc_ppid(pid) {
            parents.insert(pid, ppid);
        }
        if protected.contains(&pid) {
            continue;
        }
        let in_our_netns = std::fs::metadata(format!("/proc/{pid}/ns/net"))
            .is_ok_and(|m| inodes.contains(&(m.dev(), m.ino())));
        if in_our_netns || names_us(pid, &state_dir, markers) {
            matched.insert(pid);
        }
    }
    // Descendants of what matched.
    loop {
        let before = matched.len();
        for (&pid, ppid) in &parents {
            if matched.contains(ppid) && !protected.contains(&pid) {
                matched.insert(pid);
            }
        }
        if matched.len() == before {
            break;
        }
    }
    matched.into_iter().collect()
}

fn all_pids() -> Vec<u32> {
    std::fs::read_dir("/proc")
        .map(|entries| {
            entries
                .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Whether `pid` runs one of our programs with an argument naming
/// `state_dir` or one of `markers`.
fn names_us(pid: u32, state_dir: &str, markers: &[String]) -> bool {
    let Ok(raw) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let args: Vec<String> = raw
        .split(|&b| b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    let Some(program) = args.first() else {
        return false;
    };
    let base = program.rsplit('/').next().unwrap_or(program);
    let ours = OURS.contains(&base) || base.starts_with("containerd-shim");
    ours && args[1..]
        .iter()
        .any(|a| a.contains(state_dir) || markers.iter().any(|m| a.contains(m.as_str())))
}

/// Mount points at or under any of `roots`, deepest first (from
/// `/proc/self/mountinfo`).
pub fn mounts_under(roots: &[PathBuf]) -> Vec<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut found: Vec<PathBuf> = text
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|p| PathBuf::from(unescape_mount_path(p)))
        .filter(|p| roots.iter().any(|root| p.starts_with(root)))
        .collect();
    found.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    found.dedup();
    found
}

/// Undo mountinfo's octal escapes (`\040` for a space).
fn unescape_mount_path(raw: &str) -> String {
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && let Some(v) = bytes
                .get(i + 1..i + 4)
                .and_then(|d| std::str::from_utf8(d).ok())
                .and_then(|d| u8::from_str_radix(d, 8).ok())
        {
            out.push(v);
            i += 4;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Unmount (lazily) every mount under `roots`, repeating for stacked
/// mounts; the mount points that would not go.
pub fn unmount_all(roots: &[PathBuf]) -> Vec<PathBuf> {
    for _ in 0..10 {
        let mounts = mounts_under(roots);
        if mounts.is_empty() {
            return Vec::new();
        }
        for mount in &mounts {
            let _ = nix::mount::umount2(mount.as_path(), nix::mount::MntFlags::MNT_DETACH);
        }
    }
    mounts_under(roots)
}

/// The mount points of the cgroup hierarchies (v1 controllers and v2).
pub fn cgroup_mounts() -> Vec<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    text.lines()
        .filter_map(|line| {
            let (before, after) = line.split_once(" - ")?;
            let fstype = after.split(' ').next()?;
            let mount = before.split(' ').nth(4)?;
            (fstype == "cgroup" || fstype == "cgroup2")
                .then(|| PathBuf::from(unescape_mount_path(mount)))
        })
        .collect()
}

/// Remove the cgroups at `relative` (e.g. `skiff/node-1`) in every
/// hierarchy, children first; a cgroup still holding a process stays.
/// The cgroups that could not be removed.
pub fn remove_cgroups(relative: &[PathBuf]) -> Vec<PathBuf> {
    let mut left = Vec::new();
    for mount in cgroup_mounts() {
        for rel in relative {
            let path = mount.join(rel.strip_prefix("/").unwrap_or(rel));
            if path.is_dir() && !mount.starts_with(&path) {
                remove_cgroup_tree(&path, &mut left);
            }
        }
    }
    left
}

/// Remove the cgroup at `relative` in every hierarchy if it has no child
/// cgroups and no processes (a shared parent such as `skiff`).
pub fn remove_cgroups_if_empty(relative: &Path) -> Vec<PathBuf> {
    let mut left = Vec::new();
    for mount in cgroup_mounts() {
        let path = mount.join(relative);
        if path.is_dir() && path != mount && std::fs::remove_dir(&path).is_err() {
            left.push(path);
        }
    }
    left
}

fn remove_cgroup_tree(path: &Path, left: &mut Vec<PathBuf>) {
    if let Ok(entries) = std::fs::read_dir(path) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup_tree(&entry.path(), left);
            }
        }
    }
    // A cgroup's control files go with it: rmdir, never unlink.
    if std::fs::remove_dir(path).is_err() && path.exists() {
        left.push(path.to_path_buf());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroup_hierarchies_are_found_and_absent_cgroups_are_fine() {
        let mounts = cgroup_mounts();
        assert!(!mounts.is_empty(), "this machine mounts cgroups");
        assert!(
            mounts.iter().all(|m| m.starts_with("/sys/fs/cgroup")),
            "{mounts:?}"
        );
        let absent = PathBuf::from(format!("skiff-test-absent-{}", std::process::id()));
        assert!(remove_cgroups(&[absent]).is_empty());
    }

    #[test]
    fn mount_paths_are_unescaped() {
        assert_eq!(unescape_mount_path(r"/a\040b/c"), "/a b/c");
        assert_eq!(unescape_mount_path("/plain"), "/plain");
        assert_eq!(unescape_mount_path(r"/end\04"), r"/end\04");
    }

    #[test]
    fn mounts_under_finds_proc_and_not_unrelated_roots() {
        let found = mounts_under(&[PathBuf::from("/proc")]);
        assert!(found.contains(&PathBuf::from("/proc")), "{found:?}");
        assert!(found.iter().all(|p| p.starts_with("/proc")));
        assert!(mounts_under(&[PathBuf::from("/nonexistent-skiff")]).is_empty());
    }

    #[test]
    fn strays_never_include_this_process() {
        let dir = std::env::temp_dir();
        let found = strays(&dir, &[], &[]);
        assert!(!found.contains(&std::process::id()));
    }

    #[test]
    fn terminate_stops_a_process_that_ignores_nothing() {
        let mut child = Command::new("sleep").arg("30").spawn().expect("sleep runs");
        let pid = child.id();
        let reaper = std::thread::spawn(move || child.wait());
        let killed = terminate(&[pid], Duration::from_secs(5));
        assert!(killed.is_empty(), "SIGTERM was enough");
        reaper.join().expect("reaper").expect("waited");
        assert!(!pid_alive(pid));
    }
}
