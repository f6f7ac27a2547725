//! Privileged helpers for tests that run real nodes: a network namespace
//! of the test's own ([`TestNetns`], entered by the test's thread so that
//! every process it then starts — API server, etcd, kubectl, containerd,
//! the agent — lives in it), and a private containerd ([`Containerd`]) with
//! its root, state and socket in a temporary directory and skiff's busybox
//! image imported.
//!
//! containerd is started from the test thread (network namespace entered
//! with setns, mount namespace untouched) rather than through
//! `ip netns exec`, which remounts /sys and so hides the cgroup
//! hierarchies runc needs.
//!
//! Both guards clean up on drop, also while a test panics: containers and
//! their tasks, mounts under the temporary directory, cgroups, the
//! namespace.

use std::fs;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::{ProcessGroup, log_handles, tail};

/// A network namespace named `skiff-kt-<pid>-<n>`, with `lo` up, deleted on drop.
pub struct TestNetns {
    name: String,
}

fn run(cmd: &mut Command) -> std::process::Output {
    let shown = format!("{cmd:?}");
    cmd.stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("run {shown}: {e}"))
}

fn run_ok(cmd: &mut Command) -> String {
    let shown = format!("{cmd:?}");
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{shown} failed with {}: {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

impl TestNetns {
    /// Create a fresh namespace (`prefix-<pid>-<n>`), loopback up.
    pub fn create(prefix: &str) -> TestNetns {
        static N: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "{prefix}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        run_ok(Command::new("ip").args(["netns", "add", &name]));
        let netns = TestNetns { name };
        netns.exec_ok(&["ip", "link", "set", "lo", "up"]);
        netns
    }

    /// Its name (as in `ip netns list`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its namespace file.
    pub fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.name)
    }

    /// Run `args` inside it (`ip netns exec`) and return stdout; panics on failure.
    pub fn exec_ok(&self, args: &[&str]) -> String {
        run_ok(
            Command::new("ip")
                .args(["netns", "exec", &self.name])
                .args(args),
        )
    }

    /// Run `args` inside it, whatever its status.
    pub fn exec(&self, args: &[&str]) -> std::process::Output {
        run(Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(args))
    }

    /// Move the calling thread into the namespace: every process it starts
    /// from now on, and every socket it opens, is in there.
    pub fn enter(&self) {
        let file = fs::File::open(self.path()).expect("open the namespace file");
        rustix::thread::move_into_link_name_space(
            file.as_fd(),
            Some(rustix::thread::LinkNameSpaceType::Network),
        )
        .expect("setns into the test network namespace");
    }
}

/// Moves the calling thread into the network namespace bound at `path` (a pod's, an `ip netns`
/// one): every socket it opens from now on is in there.
pub fn enter_path(path: &Path) -> std::io::Result<()> {
    let file = fs::File::open(path)?;
    rustix::thread::move_into_link_name_space(
        file.as_fd(),
        Some(rustix::thread::LinkNameSpaceType::Network),
    )
    .map_err(std::io::Error::from)
}

impl Drop for TestNetns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .stdin(Stdio::null())
            .output();
    }
}

/// A private containerd (CRI plugin off) with its files in a temporary
/// directory and skiff's busybox image imported into namespace `skiff`.
pub struct Containerd {
    dir: TempDir,
    process: Option<ProcessGroup>,
    namespace: String,
}

impl Containerd {
    /// Start it, wait for its socket, import the busybox image.
    pub fn start() -> Containerd {
        let dir = tempfile::Builder::new()
            .prefix("skiff-ctrd-")
            .tempdir()
            .expect("create a temporary directory");
        let root = dir.path();
        let config = format!(
            "version = 2\nroot = \"{root}/root\"\nstate = \"{root}/state\"\ndisabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n[grpc]\n  address = \"{root}/containerd.sock\"\n[ttrpc]\n  address = \"{root}/containerd.sock.ttrpc\"\n[debug]\n  address = \"\"\n",
            root = root.display()
        );
        fs::write(root.join("config.toml"), config).expect("write the containerd config");
        let (out, err) = log_handles(&root.join("containerd.log"));
        let mut cmd = Command::new("containerd");
        cmd.arg("--config")
            .arg(root.join("config.toml"))
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        let process =
            ProcessGroup::spawn(cmd).expect("start containerd (Debian's containerd package)");
        let containerd = Containerd {
            dir,
            process: Some(process),
            namespace: "skiff".into(),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !containerd.ctr(&["version"]).status.success() {
            assert!(
                Instant::now() < deadline,
                "containerd did not answer within 30s:\n{}",
                containerd.logs()
            );
            thread::sleep(Duration::from_millis(100));
        }
        let archive = containerd.dir.path().join("busybox.oci.tar");
        skiff_image::build_image(Path::new(skiff_image::DEFAULT_BUSYBOX), &archive)
            .expect("build the busybox image (busybox-static installed?)");
        let out = containerd.ctr(&["images", "import", &archive.display().to_string()]);
        assert!(
            out.status.success(),
            "ctr images import failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        containerd
    }

    /// The gRPC socket.
    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("containerd.sock")
    }

    /// The temporary directory (tests may keep their files here too).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The containerd namespace the image is in (`skiff`).
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// containerd's log.
    pub fn logs(&self) -> String {
        tail(
            &fs::read_to_string(self.dir.path().join("containerd.log")).unwrap_or_default(),
            60,
        )
    }

    /// Run `ctr -a SOCK -n skiff ARGS`, whatever its status.
    pub fn ctr(&self, args: &[&str]) -> std::process::Output {
        run(Command::new("ctr")
            .arg("-a")
            .arg(self.socket())
            .args(["-n", &self.namespace])
            .args(args))
    }

    /// `ctr … ARGS` stdout; panics on failure.
    pub fn ctr_ok(&self, args: &[&str]) -> String {
        let out = self.ctr(args);
        assert!(
            out.status.success(),
            "ctr {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The IDs of the containers in the namespace.
    pub fn containers(&self) -> Vec<String> {
        String::from_utf8_lossy(&self.ctr(&["containers", "list", "-q"]).stdout)
            .lines()
            .map(str::to_string)
            .filter(|l| !l.is_empty())
            .collect()
    }

    /// The pid of a container's task.
    pub fn task_pid(&self, id: &str) -> Option<u32> {
        let out = String::from_utf8_lossy(&self.ctr(&["tasks", "list"]).stdout).into_owned();
        out.lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .find(|f| f.first() == Some(&id))
            .and_then(|f| f.get(1)?.parse().ok())
    }
}

/// Unmount everything mounted under `dir` (deepest first).
pub fn unmount_under(dir: &Path) {
    let prefix = dir.to_string_lossy().to_string();
    let mut points: Vec<String> = fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(4).map(str::to_string))
        .filter(|p| p.starts_with(&prefix))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.len()));
    for point in points {
        let _ = Command::new("umount")
            .args(["-l", &point])
            .stdin(Stdio::null())
            .output();
    }
}

/// Remove `/sys/fs/cgroup/*/<relative>` trees (empty cgroups, deepest first).
pub fn remove_cgroups(relative: &str) {
    for hierarchy in fs::read_dir("/sys/fs/cgroup")
        .into_iter()
        .flatten()
        .flatten()
    {
        let top = hierarchy.path().join(relative);
        if !top.is_dir() {
            continue;
        }
        let mut dirs = Vec::new();
        let mut todo = vec![top];
        while let Some(d) = todo.pop() {
            for e in fs::read_dir(&d).into_iter().flatten().flatten() {
                if e.path().is_dir() {
                    todo.push(e.path());
                }
            }
            dirs.push(d);
        }
        dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
        for d in dirs {
            let _ = fs::remove_dir(&d);
        }
    }
}

impl Containerd {
    /// Kill and remove every container (idempotent), e.g. before removing
    /// the cgroups they lived in.
    pub fn remove_containers(&self) {
        let ids = self.containers();
        if ids.is_empty() {
            return;
        }
        for id in &ids {
            let _ = self.ctr(&["tasks", "kill", "-a", "-s", "SIGKILL", id]);
        }
        thread::sleep(Duration::from_millis(200));
        for id in &ids {
            let _ = self.ctr(&["tasks", "rm", "-f", id]);
            let _ = self.ctr(&["containers", "rm", id]);
        }
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        self.remove_containers();
        if let Some(group) = self.process.take() {
            group.terminate(Duration::from_secs(5));
        }
        unmount_under(self.dir.path());
    }
}
