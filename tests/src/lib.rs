//! Harness for skiff's integration tests.
//!
//! The tests drive the real binaries: [`ApiServer`] runs `skiff-control apiserver` (which starts its
//! own child `etcd` unless given `--etcd-servers`) on free loopback ports in a temporary directory,
//! and talks to it with the pinned `kubectl` and the official Python `kubernetes` client from the
//! project's virtual environment. [`Etcd`] runs a standalone `etcd` that a test can stop and start
//! again to see how the API server copes.
//!
//! Where things come from (all set by `cargo xtask test`):
//! - `SKIFF_BIN_DIR`: directory holding `skiff-control` (default `<workspace>/target/debug`),
//! - `SKIFF_KUBECTL`: the kubectl to use (default `<workspace>/.tools/venv/bin/kubectl`, never the
//!   one on `PATH`, whose version may differ),
//! - `SKIFF_PYTHON`: the Python with `kubernetes` installed (default `<workspace>/.tools/venv/bin/python`),
//! - `SKIFF_ETCD`: the etcd binary (default `etcd` on `PATH`).
//!
//! Every process a test starts runs in its own process group and is killed, with its children,
//! when its handle is dropped, also while a test panics; every file lives in a temporary directory
//! removed at the same time.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::thread;
use std::time::{Duration, Instant};

use rustix::process::{Pid, Signal, kill_process, kill_process_group};
use tempfile::TempDir;

pub mod netns;

/// How long [`ApiServer::start`] waits for `/readyz` to answer 200.
pub const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// How long [`Etcd::start`] waits for etcd's `/health` to report healthy.
pub const ETCD_READY_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a stopped process gets between SIGTERM and SIGKILL.
const GRACE: Duration = Duration::from_secs(5);

/// Lines of a server log quoted in panic messages.
const LOG_TAIL_LINES: usize = 80;

/// The workspace root (the parent of this crate's directory).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent directory")
        .to_path_buf()
}

/// The project's Python virtual environment, made by `cargo xtask setup`.
fn venv_dir() -> PathBuf {
    workspace_root().join(".tools").join("venv")
}

/// Path of the pinned kubectl: `$SKIFF_KUBECTL`, else the one in the project's venv.
///
/// Panics when neither exists, pointing at `cargo xtask setup`.
pub fn kubectl_path() -> PathBuf {
    tool_path(
        "SKIFF_KUBECTL",
        venv_dir().join("bin").join("kubectl"),
        "kubectl",
    )
}

/// Path of the Python that has the `kubernetes` client: `$SKIFF_PYTHON`, else the project's venv.
///
/// Panics when neither exists, pointing at `cargo xtask setup`.
pub fn python_path() -> PathBuf {
    tool_path(
        "SKIFF_PYTHON",
        venv_dir().join("bin").join("python"),
        "python",
    )
}

fn tool_path(var: &str, fallback: PathBuf, what: &str) -> PathBuf {
    let path = std::env::var_os(var)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or(fallback);
    assert!(
        path.exists(),
        "{what} not found at {} (from ${var} or the project venv): run cargo xtask setup",
        path.display()
    );
    path
}

/// Path of one of the project's binaries (`skiff-control`, …) in `$SKIFF_BIN_DIR`, else in
/// `$CARGO_TARGET_DIR/debug` or `<workspace>/target/debug`.
///
/// Panics when it is missing, saying how to build it.
pub fn bin_path(name: &str) -> PathBuf {
    let dir = std::env::var_os("SKIFF_BIN_DIR")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            std::env::var_os("CARGO_TARGET_DIR")
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
                .unwrap_or_else(|| workspace_root().join("target"))
                .join("debug")
        });
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: build the binaries first: cargo build --workspace --bins (cargo xtask test does)",
        path.display()
    );
    path
}

/// Path of the etcd binary: `$SKIFF_ETCD`, else `etcd` found on `PATH`.
pub fn etcd_path() -> PathBuf {
    if let Some(p) = std::env::var_os("SKIFF_ETCD").filter(|v| !v.is_empty()) {
        return PathBuf::from(p);
    }
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|d| d.join("etcd"))
        .find(|p| p.is_file())
        .expect("etcd not found on PATH: run cargo xtask setup (installs Debian's etcd-server)")
}

/// A free TCP port on 127.0.0.1, never the same one twice in this process.
///
/// The port is free when chosen; another program may still take it before it is used, which is
/// unlikely enough for tests.
pub fn free_port() -> u16 {
    static HANDED_OUT: OnceLock<Mutex<HashSet<u16>>> = OnceLock::new();
    let handed_out = HANDED_OUT.get_or_init(Default::default);
    for _ in 0..100 {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
        let port = listener.local_addr().expect("local address").port();
        if handed_out
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(port)
        {
            return port;
        }
    }
    panic!("found no free loopback port in 100 tries")
}

/// How often [`wait_for`] checks its condition.
pub const POLL: Duration = Duration::from_millis(250);

/// How long [`ApiServer::wait_for`] waits before it fails the test.
pub const WAIT: Duration = Duration::from_secs(90);

/// Poll `check` every [`POLL`] until it returns `Some`, and return that;
/// after `timeout`, panic naming `what`, with `context()` (logs, the state
/// of things) appended. Tests synchronise with this, never with a sleep.
pub fn wait_for<T>(
    what: &str,
    timeout: Duration,
    context: impl Fn() -> String,
    mut check: impl FnMut() -> Option<T>,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check() {
            return value;
        }
        if Instant::now() >= deadline {
            panic!(
                "timed out after {timeout:?} waiting for {what}\n{}",
                context()
            );
        }
        thread::sleep(POLL);
    }
}

/// The last `n` lines of `text`.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Opens `path` for appending (creating it) and returns two handles for a child's stdout and stderr.
fn log_handles(path: &Path) -> (File, File) {
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open log file {}: {e}", path.display()));
    let copy = file.try_clone().expect("clone log file handle");
    (file, copy)
}

/// Appends a marker line to a log file (best effort: used only to make logs readable).
fn log_marker(path: &Path, text: &str) {
    if let Ok(mut f) = OpenOptions::new().create(true).append(true).open(path) {
        let _ = writeln!(f, "==== skiff-tests: {text} ====");
    }
}

/// A running child in its own process group, killed with everything it started by
/// [`ProcessGroup::terminate`] (also used by `cargo xtask demo`).
///
/// Dropping it without calling `terminate` kills the group at once.
pub struct ProcessGroup {
    child: Option<Child>,
}

impl ProcessGroup {
    /// Spawns `cmd` (stdin from /dev/null unless set) as the leader of a new process group, so
    /// that a terminal's Ctrl-C does not reach it and it can be killed as a whole.
    pub fn spawn(mut cmd: Command) -> std::io::Result<ProcessGroup> {
        cmd.process_group(0);
        let child = cmd.spawn()?;
        Ok(ProcessGroup { child: Some(child) })
    }

    /// Like [`ProcessGroup::spawn`], panicking with `what` and the command if it cannot start.
    fn spawn_or_panic(mut cmd: Command, what: &str) -> ProcessGroup {
        cmd.stdin(Stdio::null());
        let shown = format!("{cmd:?}");
        ProcessGroup::spawn(cmd).unwrap_or_else(|e| panic!("spawn {what} ({shown}): {e}"))
    }

    /// The leader's process id.
    pub fn id(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// The leader's exit status if it has exited.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.as_mut()?.try_wait().ok().flatten()
    }

    /// Stops the whole group: SIGTERM, up to `grace` for the leader to exit, then SIGKILL to the
    /// group and to every descendant seen before (in case one moved to a group of its own), and
    /// waits until none of them runs any more. Never panics (it runs from `Drop`).
    pub fn terminate(mut self, grace: Duration) {
        self.kill_all(grace);
    }

    fn kill_all(&mut self, grace: Duration) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let leader = Pid::from_child(&child);
        let pgid = leader.as_raw_nonzero().get();
        let descendants = descendants(pgid);
        let _ = kill_process_group(leader, Signal::TERM);
        let deadline = Instant::now() + grace;
        while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(50));
        }
        let _ = kill_process_group(leader, Signal::KILL);
        for pid in &descendants {
            if let Some(pid) = Pid::from_raw(*pid) {
                let _ = kill_process(pid, Signal::KILL);
            }
        }
        let _ = child.wait();
        // Orphaned members are reparented and may never be reaped here (zombies are fine: they
        // hold no files, ports or locks), so wait only for live ones.
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline
            && (group_alive(pgid) || descendants.iter().any(|p| pid_alive(*p)))
        {
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        self.kill_all(Duration::ZERO);
    }
}

/// One process as read from `/proc/PID/stat`: (pid, state, ppid, pgrp).
fn proc_stats() -> Vec<(i32, char, i32, i32)> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(|pid| proc_stat(pid).map(|(state, ppid, pgrp)| (pid, state, ppid, pgrp)))
        .collect()
}

/// (state, ppid, pgrp) of one process.
fn proc_stat(pid: i32) -> Option<(char, i32, i32)> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "pid (comm) S ppid pgrp …": comm may hold spaces and parentheses, so split after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    let pgrp = fields.next()?.parse().ok()?;
    Some((state, ppid, pgrp))
}

fn is_live(state: char) -> bool {
    !matches!(state, 'Z' | 'X')
}

fn pid_alive(pid: i32) -> bool {
    proc_stat(pid).is_some_and(|(state, _, _)| is_live(state))
}

fn group_alive(pgid: i32) -> bool {
    proc_stats()
        .iter()
        .any(|&(_, state, _, pgrp)| pgrp == pgid && is_live(state))
}

/// Every live descendant of `root`.
fn descendants(root: i32) -> Vec<i32> {
    let mut children: HashMap<i32, Vec<i32>> = HashMap::new();
    for (pid, state, ppid, _) in proc_stats() {
        if is_live(state) {
            children.entry(ppid).or_default().push(pid);
        }
    }
    let mut found = Vec::new();
    let mut todo = vec![root];
    while let Some(p) = todo.pop() {
        for &c in children.get(&p).map(Vec::as_slice).unwrap_or_default() {
            found.push(c);
            todo.push(c);
        }
    }
    found
}

/// Runs `cmd` feeding it `stdin`, and collects its output.
fn run_with_stdin(mut cmd: Command, stdin: &[u8]) -> Output {
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    let mut pipe = child.stdin.take().expect("piped stdin");
    let input = stdin.to_vec();
    // Write from another thread so that a child filling its stdout pipe cannot deadlock us.
    let writer = thread::spawn(move || {
        let _ = pipe.write_all(&input);
    });
    let output = child
        .wait_with_output()
        .unwrap_or_else(|e| panic!("wait for {cmd:?}: {e}"));
    let _ = writer.join();
    output
}

/// A `skiff-control apiserver` on free loopback ports, with its data in a temporary directory.
///
/// Dropping it kills the server and everything it started (its etcd too) and removes the
/// directory.
pub struct ApiServer {
    dir: TempDir,
    port: u16,
    extra_args: Vec<String>,
    kubectl: PathBuf,
    server: Option<ProcessGroup>,
    /// The `skiff-control` subcommand: `apiserver`, or `all` (with the
    /// controller manager and the scheduler).
    subcommand: &'static str,
}

impl ApiServer {
    /// Starts a server with its own etcd and waits until `/readyz` answers 200.
    pub fn start() -> ApiServer {
        ApiServer::start_with(&[])
    }

    /// Starts a server with extra command-line flags (e.g. `["--etcd-servers", &etcd.url()]`) and
    /// waits until `/readyz` answers 200.
    pub fn start_with(args: &[&str]) -> ApiServer {
        ApiServer::start_subcommand("apiserver", args)
    }

    /// Starts `skiff-control all` (the API server with the controller manager and the
    /// scheduler) with extra flags and waits until `/readyz` answers 200.
    pub fn start_all(args: &[&str]) -> ApiServer {
        ApiServer::start_subcommand("all", args)
    }

    fn start_subcommand(subcommand: &'static str, args: &[&str]) -> ApiServer {
        let dir = tempfile::Builder::new()
            .prefix("skiff-test-")
            .tempdir()
            .expect("create a temporary directory");
        fs::create_dir_all(dir.path().join("data")).expect("create the data directory");
        let mut server = ApiServer {
            dir,
            port: free_port(),
            extra_args: args.iter().map(|a| a.to_string()).collect(),
            kubectl: kubectl_path(),
            server: None,
            subcommand,
        };
        server.launch();
        server
    }

    /// A server shared by the tests of one test binary that run at the same time: the first
    /// caller starts it, later callers get the same one while any test still holds it, and it
    /// stops (and is removed) when the last holder drops its handle. Keep tests apart with a
    /// namespace each.
    ///
    /// ```no_run
    /// # use std::sync::{Mutex, Weak};
    /// # use skiff_tests::ApiServer;
    /// static SERVER: Mutex<Weak<ApiServer>> = Mutex::new(Weak::new());
    /// let server = ApiServer::shared(&SERVER);
    /// ```
    pub fn shared(slot: &Mutex<Weak<ApiServer>>) -> Arc<ApiServer> {
        let mut slot = slot.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(server) = slot.upgrade() {
            return server;
        }
        let server = Arc::new(ApiServer::start());
        *slot = Arc::downgrade(&server);
        server
    }

    /// The last lines of the server log, for panic messages.
    pub fn log_excerpt(&self) -> String {
        self.log_tail()
    }

    /// [`wait_for`] `check` for up to [`WAIT`], failing with the server log.
    pub fn wait_for<T>(&self, what: &str, check: impl FnMut() -> Option<T>) -> T {
        self.wait_within(WAIT, what, check)
    }

    /// A barrier behind the garbage collector: creates a ConfigMap in
    /// `namespace` whose owner never existed and returns once the collector
    /// has deleted it, so the changes its watch delivered before have been
    /// acted on. Tests that check the collector leaves something alone wait
    /// for this instead of sleeping.
    pub fn wait_gc_caught_up(&self, namespace: &str) {
        static BARRIERS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = BARRIERS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("gc-barrier-{n}");
        self.kubectl_stdin_ok(
            &["apply", "-f", "-"],
            &format!(
                "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {name}\n  namespace: {namespace}\n  ownerReferences:\n  - apiVersion: v1\n    kind: ConfigMap\n    name: never-existed\n    uid: 00000000-0000-0000-0000-00000000dead\n"
            ),
        );
        self.wait_for(
            &format!("the collector to delete configmap {namespace}/{name}"),
            || {
                let out = self.kubectl(&["get", "configmap", &name, "-n", namespace, "-o", "name"]);
                (!out.status.success()).then_some(())
            },
        );
    }

    /// [`wait_for`] `check` for up to `timeout`, failing with the server log.
    pub fn wait_within<T>(
        &self,
        timeout: Duration,
        what: &str,
        check: impl FnMut() -> Option<T>,
    ) -> T {
        wait_for(
            what,
            timeout,
            || format!("--- server log ---\n{}", self.log_excerpt()),
            check,
        )
    }

    /// Starts the server with an external etcd (`--etcd-servers`) and extra flags.
    pub fn start_with_etcd(etcd: &Etcd, args: &[&str]) -> ApiServer {
        let url = etcd.url();
        let mut all = vec!["--etcd-servers", url.as_str()];
        all.extend_from_slice(args);
        ApiServer::start_with(&all)
    }

    fn launch(&mut self) {
        let bin = bin_path("skiff-control");
        let log = self.log_path();
        log_marker(&log, &format!("starting {}", bin.display()));
        let (out, err) = log_handles(&log);
        let mut cmd = Command::new(&bin);
        cmd.arg(self.subcommand)
            .arg("--data-dir")
            .arg(self.data_dir())
            .args(["--bind-address", "127.0.0.1"])
            .arg("--secure-port")
            .arg(self.port.to_string())
            .arg("--write-kubeconfig")
            .arg(self.kubeconfig())
            .args(&self.extra_args)
            .env("RUST_BACKTRACE", "1")
            .stdout(out)
            .stderr(err);
        self.server = Some(ProcessGroup::spawn_or_panic(cmd, "skiff-control apiserver"));
        self.wait_ready();
    }

    /// Waits until `kubectl get --raw /readyz` succeeds; panics with the log if the server exits
    /// or [`READY_TIMEOUT`] passes.
    fn wait_ready(&mut self) {
        let deadline = Instant::now() + READY_TIMEOUT;
        let mut last = String::from("the kubeconfig was not written yet");
        loop {
            if let Some(status) = self.server.as_mut().and_then(ProcessGroup::exited) {
                panic!(
                    "skiff-control apiserver exited with {status} before it was ready\n--- server log ---\n{}",
                    self.log_tail()
                );
            }
            if self.kubeconfig().exists() {
                let out = self.kubectl(&["get", "--raw", "/readyz", "--request-timeout=5s"]);
                if out.status.success() {
                    return;
                }
                last = format!(
                    "{}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            if Instant::now() >= deadline {
                panic!(
                    "skiff-control apiserver was not ready after {READY_TIMEOUT:?}; last answer: {}\n--- server log ---\n{}",
                    last.trim(),
                    self.log_tail()
                );
            }
            thread::sleep(Duration::from_millis(250));
        }
    }

    /// The admin kubeconfig the server wrote.
    pub fn kubeconfig(&self) -> PathBuf {
        self.dir.path().join("kubeconfig")
    }

    /// The server's base URL, `https://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    /// The secure port the server listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's `--data-dir` (kept across [`ApiServer::restart`]).
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// The temporary directory holding the data dir, kubeconfig, logs and kubectl's cache; a test
    /// may put its own files here.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("server.log")
    }

    /// Everything the server printed (stdout and stderr, all runs).
    pub fn logs(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    fn log_tail(&self) -> String {
        tail(&self.logs(), LOG_TAIL_LINES)
    }

    /// Whether the server process is running (started and not exited).
    pub fn is_running(&mut self) -> bool {
        self.server.as_mut().is_some_and(|g| g.exited().is_none())
    }

    /// Stops the server (SIGTERM, then SIGKILL to its whole process group). Does nothing if it is
    /// already stopped.
    pub fn stop(&mut self) {
        if let Some(group) = self.server.take() {
            group.terminate(GRACE);
            log_marker(&self.log_path(), "stopped");
        }
    }

    /// Stops the server if it runs and starts it again with the same flags, port and data dir, then
    /// waits until it is ready.
    pub fn restart(&mut self) {
        self.stop();
        self.launch();
    }

    /// A kubectl command for this server (`--kubeconfig` and a private `--cache-dir` set), for
    /// tests that need to set more on it.
    pub fn kubectl_command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.kubectl);
        cmd.arg("--kubeconfig")
            .arg(self.kubeconfig())
            .arg("--cache-dir")
            .arg(self.dir.path().join("kube-cache"))
            .args(args)
            .env_remove("KUBECONFIG")
            // Ignore any user preferences file (~/.kube/kuberc).
            .env("KUBERC", "off")
            .stdin(Stdio::null());
        cmd
    }

    /// Runs the pinned kubectl against this server and returns its output, whatever its status.
    pub fn kubectl(&self, args: &[&str]) -> Output {
        let mut cmd = self.kubectl_command(args);
        cmd.output()
            .unwrap_or_else(|e| panic!("run {}: {e}", self.kubectl.display()))
    }

    /// Runs kubectl and returns its stdout; panics with its output and the server log if it fails.
    pub fn kubectl_ok(&self, args: &[&str]) -> String {
        let out = self.kubectl(args);
        self.expect_success("kubectl", args, &out)
    }

    /// Runs kubectl with `stdin` as its standard input (e.g. `apply -f -`), whatever its status.
    pub fn kubectl_stdin(&self, args: &[&str], stdin: &str) -> Output {
        run_with_stdin(self.kubectl_command(args), stdin.as_bytes())
    }

    /// Like [`ApiServer::kubectl_stdin`], returning stdout and panicking with context on failure.
    pub fn kubectl_stdin_ok(&self, args: &[&str], stdin: &str) -> String {
        let out = self.kubectl_stdin(args, stdin);
        self.expect_success("kubectl", args, &out)
    }

    /// Runs kubectl with `-o json` appended and parses its output.
    pub fn kubectl_json(&self, args: &[&str]) -> serde_json::Value {
        let mut all = args.to_vec();
        all.extend(["-o", "json"]);
        let out = self.kubectl_ok(&all);
        serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("kubectl {all:?} printed no JSON ({e}):\n{out}"))
    }

    /// Runs `script` with the project's Python (`kubernetes` installed), `KUBECONFIG` pointing at
    /// this server, whatever its status.
    pub fn python_output(&self, script: &str) -> Output {
        let python = python_path();
        Command::new(&python)
            .arg("-c")
            .arg(script)
            .env("KUBECONFIG", self.kubeconfig())
            .env("PYTHONUNBUFFERED", "1")
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("run {}: {e}", python.display()))
    }

    /// Runs `script` like [`ApiServer::python_output`] and returns its stdout; panics with its
    /// output and the server log if it fails.
    pub fn python(&self, script: &str) -> String {
        let out = self.python_output(script);
        self.expect_success("python", &["-c", script], &out)
    }

    fn expect_success(&self, what: &str, args: &[&str], out: &Output) -> String {
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if !out.status.success() {
            panic!(
                "{what} {args:?} failed with {}\n--- stdout ---\n{stdout}\n--- stderr ---\n{}\n--- server log (last {LOG_TAIL_LINES} lines) ---\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr),
                self.log_tail()
            );
        }
        stdout
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        if let Some(group) = self.server.take() {
            group.terminate(Duration::from_secs(2));
        }
    }
}

/// A `skiff-agent --hollow` process: `count` hollow nodes registered with an [`ApiServer`]
/// (started with [`ApiServer::start_all`], whose node IPAM gives them pod CIDRs).
///
/// Dropping it (or [`HollowNodes::kill`]) kills the agent at once, which is how a test makes its
/// nodes stop heartbeating.
pub struct HollowNodes {
    process: Option<ProcessGroup>,
    log: PathBuf,
    names: Vec<String>,
}

impl HollowNodes {
    /// Starts `count` hollow nodes with the server's admin kubeconfig and `args` (e.g.
    /// `["--name-prefix", "a-", "--node-lease-renew-interval", "1s"]`), logging to a file in the
    /// server's directory. Does not wait for them: see [`HollowNodes::wait_ready`].
    pub fn start(server: &ApiServer, count: u32, args: &[&str]) -> HollowNodes {
        static STARTED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = STARTED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let log = server.dir().join(format!("agent-{n}.log"));
        let flag = |name: &str| {
            args.iter()
                .position(|a| *a == name)
                .and_then(|i| args.get(i + 1))
                .map(|v| v.to_string())
        };
        let prefix = flag("--name-prefix").unwrap_or_else(|| "hollow-".to_string());
        let first: u32 =
            flag("--first-index").map_or(0, |v| v.parse().expect("a numeric --first-index"));
        let names = (first..first + count)
            .map(|i| format!("{prefix}{i}"))
            .collect();
        let bin = bin_path("skiff-agent");
        log_marker(&log, &format!("starting {}", bin.display()));
        let (out, err) = log_handles(&log);
        let mut cmd = Command::new(&bin);
        cmd.arg("--hollow")
            .arg("--count")
            .arg(count.to_string())
            .arg("--kubeconfig")
            .arg(server.kubeconfig())
            .args(args)
            .env("RUST_BACKTRACE", "1")
            .stdout(out)
            .stderr(err);
        HollowNodes {
            process: Some(ProcessGroup::spawn_or_panic(cmd, "skiff-agent --hollow")),
            log,
            names,
        }
    }

    /// The names of the nodes (from `--name-prefix`, `--first-index` and the count).
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// Everything the agent printed.
    pub fn logs(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until every node of this agent is Ready with a pod CIDR; panics with the agent's and
    /// the server's logs after `timeout`.
    pub fn wait_ready(&mut self, server: &ApiServer, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.process.as_mut().and_then(ProcessGroup::exited) {
                panic!(
                    "skiff-agent exited with {status}\n--- agent log ---\n{}",
                    tail(&self.logs(), LOG_TAIL_LINES)
                );
            }
            let out = server.kubectl(&["get", "nodes", "-o", "json"]);
            let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
            let ready = |name: &str| {
                list["items"].as_array().into_iter().flatten().any(|node| {
                    node["metadata"]["name"] == name
                        && node["spec"]["podCIDR"].is_string()
                        && node["status"]["conditions"]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .any(|c| c["type"] == "Ready" && c["status"] == "True")
                })
            };
            if self.names.iter().all(|n| ready(n)) {
                return;
            }
            if Instant::now() >= deadline {
                panic!(
                    "hollow nodes {:?} not Ready with a pod CIDR after {timeout:?}\n--- agent log ---\n{}\n--- server log ---\n{}",
                    self.names,
                    tail(&self.logs(), LOG_TAIL_LINES),
                    server.log_excerpt()
                );
            }
            thread::sleep(Duration::from_millis(250));
        }
    }

    /// Whether the agent runs.
    pub fn is_running(&mut self) -> bool {
        self.process.as_mut().is_some_and(|g| g.exited().is_none())
    }

    /// Kills the agent at once (SIGKILL to its group): its nodes stop heartbeating.
    pub fn kill(&mut self) {
        if let Some(group) = self.process.take() {
            group.terminate(Duration::ZERO);
            log_marker(&self.log, "killed");
        }
    }
}

impl Drop for HollowNodes {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A standalone single-member `etcd` on free loopback ports, with its data in a temporary
/// directory, for tests that stop and restart the store under a running API server.
///
/// Dropping it kills etcd and removes the directory.
pub struct Etcd {
    dir: TempDir,
    client_port: u16,
    peer_port: u16,
    process: Option<ProcessGroup>,
}

impl Etcd {
    /// Starts etcd and waits until its `/health` reports healthy.
    pub fn start() -> Etcd {
        let dir = tempfile::Builder::new()
            .prefix("skiff-etcd-")
            .tempdir()
            .expect("create a temporary directory");
        let mut etcd = Etcd {
            dir,
            client_port: free_port(),
            peer_port: free_port(),
            process: None,
        };
        etcd.launch();
        etcd
    }

    fn launch(&mut self) {
        let bin = etcd_path();
        let log = self.log_path();
        log_marker(&log, &format!("starting {}", bin.display()));
        let (out, err) = log_handles(&log);
        let client = self.url();
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let mut cmd = Command::new(&bin);
        cmd.args(["--name", "skiff-test"])
            .arg("--data-dir")
            .arg(self.data_dir())
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("skiff-test={peer}")])
            .args(["--initial-cluster-state", "new"])
            .stdout(out)
            .stderr(err);
        self.process = Some(ProcessGroup::spawn_or_panic(cmd, "etcd"));
        self.wait_healthy();
    }

    fn wait_healthy(&mut self) {
        let deadline = Instant::now() + ETCD_READY_TIMEOUT;
        loop {
            if let Some(status) = self.process.as_mut().and_then(ProcessGroup::exited) {
                panic!(
                    "etcd exited with {status} before it was healthy\n--- etcd log ---\n{}",
                    tail(&self.logs(), LOG_TAIL_LINES)
                );
            }
            if self.healthy() {
                return;
            }
            if Instant::now() >= deadline {
                panic!(
                    "etcd was not healthy after {ETCD_READY_TIMEOUT:?}\n--- etcd log ---\n{}",
                    tail(&self.logs(), LOG_TAIL_LINES)
                );
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// Whether etcd's `GET /health` answers `{"health":"true"}` right now.
    pub fn healthy(&self) -> bool {
        let Ok(mut stream) = TcpStream::connect(("127.0.0.1", self.client_port)) else {
            return false;
        };
        let timeout = Some(Duration::from_secs(2));
        let _ = stream.set_read_timeout(timeout);
        let _ = stream.set_write_timeout(timeout);
        let request = format!(
            "GET /health HTTP/1.0\r\nHost: 127.0.0.1:{}\r\n\r\n",
            self.client_port
        );
        if stream.write_all(request.as_bytes()).is_err() {
            return false;
        }
        let mut response = String::new();
        let _ = stream.read_to_string(&mut response);
        response.starts_with("HTTP/1.") && response.contains(r#""health":"true""#)
    }

    /// The client URL, `http://127.0.0.1:PORT`, for `--etcd-servers`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    /// etcd's data directory (kept across [`Etcd::stop`] and [`Etcd::restart`]).
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("etcd.log")
    }

    /// Everything etcd printed (all runs).
    pub fn logs(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Whether etcd is running (started and not exited).
    pub fn is_running(&mut self) -> bool {
        self.process.as_mut().is_some_and(|g| g.exited().is_none())
    }

    /// Stops etcd (SIGTERM, then SIGKILL). Does nothing if it is already stopped.
    pub fn stop(&mut self) {
        if let Some(group) = self.process.take() {
            group.terminate(GRACE);
            log_marker(&self.log_path(), "stopped");
        }
    }

    /// Stops etcd if it runs and starts it again on the same ports with the same data, then waits
    /// until it is healthy.
    pub fn restart(&mut self) {
        self.stop();
        self.launch();
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        if let Some(group) = self.process.take() {
            group.terminate(Duration::from_secs(2));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_ports_differ_and_bind() {
        let a = free_port();
        let b = free_port();
        assert_ne!(a, b, "free_port handed out the same port twice");
        TcpListener::bind(("127.0.0.1", a)).expect("first port is bindable");
        TcpListener::bind(("127.0.0.1", b)).expect("second port is bindable");
    }

    #[test]
    fn tail_keeps_last_lines() {
        assert_eq!(tail("a\nb\nc\n", 2), "b\nc");
        assert_eq!(tail("a", 5), "a");
        assert_eq!(tail("", 3), "");
    }

    #[test]
    fn terminate_kills_the_group_and_orphans() {
        // A shell that starts a grandchild in a session (and so a process group) of its own, as a
        // careless server might do with its etcd, then waits.
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "setsid sleep 300 & echo $! ; wait"])
            .stdout(Stdio::piped());
        let mut group = ProcessGroup::spawn_or_panic(cmd, "sh");
        let mut line = String::new();
        let mut stdout = group
            .child
            .as_mut()
            .and_then(|c| c.stdout.take())
            .expect("piped stdout");
        let mut buf = [0u8; 1];
        while !line.ends_with('\n') {
            let n = stdout.read(&mut buf).expect("read the grandchild pid");
            assert!(n > 0, "sh closed stdout before printing a pid");
            line.push(buf[0] as char);
        }
        let grandchild: i32 = line.trim().parse().expect("a pid");
        assert!(
            pid_alive(grandchild),
            "grandchild should run before terminate"
        );
        group.terminate(Duration::from_millis(500));
        assert!(
            !pid_alive(grandchild),
            "grandchild {grandchild} still runs after terminate"
        );
    }

    #[test]
    fn etcd_stops_and_restarts_with_its_data() {
        let mut etcd = Etcd::start();
        assert!(etcd.healthy(), "etcd should be healthy once started");
        let data = etcd.data_dir();
        etcd.stop();
        assert!(!etcd.is_running(), "etcd should be stopped");
        assert!(!etcd.healthy(), "a stopped etcd should not answer");
        assert!(data.join("member").exists(), "data dir kept after stop");
        etcd.restart();
        assert!(etcd.healthy(), "etcd should be healthy after restart");
        let dir = etcd.dir.path().to_path_buf();
        drop(etcd);
        assert!(!dir.exists(), "temporary directory removed on drop");
    }
}
