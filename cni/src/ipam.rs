//! File-based IPAM over the node's pod CIDR, safe against crashes and concurrent plugins.
//!
//! State lives in `<dataDir>/<network name>/`:
//! - one file per allocated address, named after it (`10.244.1.7`), holding the owner's container
//!   id and interface name, one per line;
//! - `last_reserved`: the address handed out last, so that allocation goes round-robin and a
//!   released address is not reused at once;
//! - `lock`: an advisory `flock` taken around allocation and release.
//!
//! **Correctness does not depend on the lock.** An address is taken by creating its file, which
//! either succeeds for exactly one process or fails with `EEXIST`: the content is first written
//! into a private temporary file opened with `O_CREAT|O_EXCL`, which is then hard-linked to the
//! address's name (`link(2)` fails with `EEXIST` like `O_EXCL` does, and makes the file appear
//! with its content already in place, so no reader ever sees an owner-less half-written file).
//! A crash at any point leaves either no file (nothing allocated), or a complete one (allocated to
//! a known owner, reused by a retried ADD of the same attachment and released by DEL or GC), plus
//! possibly a temporary file that GC removes. Files are not fsync'ed: a power loss kills the
//! pods too, and an address file that comes back empty counts as allocated to nobody, which GC
//! releases.
//!
//! Reserved addresses: the network address, the broadcast address and the first host address
//! (`.1` of a /24), which belongs to the node as the pods' gateway side, as in upstream kubenet
//! (whose bridge takes the first address of the pod CIDR). A /24 thus gives 253 pod addresses.

use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use ipnetwork::Ipv4Network;
use nix::fcntl::{Flock, FlockArg};

use crate::config::Attachment;

/// Name of the round-robin cursor file.
pub const LAST_RESERVED_FILE: &str = "last_reserved";
/// Name of the advisory lock file.
pub const LOCK_FILE: &str = "lock";
/// Prefix of temporary files.
const TMP_PREFIX: &str = ".tmp-";
/// Temporary files older than this are leftovers of a crashed plugin, removed by GC.
const TMP_MAX_AGE: Duration = Duration::from_secs(60);

/// A failure of the IPAM store.
#[derive(Debug, thiserror::Error)]
pub enum IpamError {
    /// Every usable address of the pod CIDR is allocated (CNI code 101).
    #[error(
        "no free address left in pod CIDR {cidr}: all {usable} usable addresses are allocated (network, node .1 and broadcast addresses are reserved)"
    )]
    Exhausted {
        /// The pod CIDR.
        cidr: Ipv4Network,
        /// How many addresses it has for pods.
        usable: u32,
    },
    /// A file operation of the store failed (CNI code 5).
    #[error("ipam store: cannot {action} {path}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The system error.
        #[source]
        source: io::Error,
    },
}

impl IpamError {
    /// The CNI error code: 101 for an exhausted pool, 5 (I/O failure) otherwise.
    pub fn code(&self) -> u32 {
        match self {
            IpamError::Exhausted { .. } => crate::error::CODE_POOL_EXHAUSTED,
            IpamError::Io { .. } => 5,
        }
    }
}

fn io_err(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> IpamError {
    move |source| IpamError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

/// One address file: the address and its owner (`None` when the file is empty or unreadable as
/// an owner, which only a power loss can leave).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allocation {
    /// The allocated address.
    pub ip: Ipv4Addr,
    /// Who holds it.
    pub owner: Option<Attachment>,
}

/// What [`Ipam::gc`] did.
#[derive(Debug, Default)]
pub struct GcOutcome {
    /// Allocations released.
    pub released: Vec<Allocation>,
    /// Removals that failed (GC went on past each).
    pub failures: Vec<IpamError>,
}

/// The IPAM store of one network.
#[derive(Debug, Clone)]
pub struct Ipam {
    dir: PathBuf,
    net: Ipv4Network,
}

impl Ipam {
    /// Opens the store in `dir` for `net`, creating the directory if needed.
    pub fn open(dir: impl Into<PathBuf>, net: Ipv4Network) -> Result<Ipam, IpamError> {
        let dir = dir.into();
        fs::create_dir_all(&dir).map_err(io_err("create directory", &dir))?;
        Ok(Ipam { dir, net })
    }

    /// Opens the store only if its directory exists (for DEL, which must not create state).
    pub fn open_existing(dir: impl Into<PathBuf>, net: Ipv4Network) -> Option<Ipam> {
        let dir = dir.into();
        dir.is_dir().then_some(Ipam { dir, net })
    }

    /// The store's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The first and last address handed to pods.
    pub fn usable_range(&self) -> (Ipv4Addr, Ipv4Addr) {
        let network = u32::from(self.net.network());
        let broadcast = u32::from(self.net.broadcast());
        (Ipv4Addr::from(network + 2), Ipv4Addr::from(broadcast - 1))
    }

    /// How many addresses pods can get.
    pub fn usable_count(&self) -> u32 {
        let (lo, hi) = self.usable_range();
        u32::from(hi) - u32::from(lo) + 1
    }

    fn lock(&self) -> Option<Flock<File>> {
        let path = self.dir.join(LOCK_FILE);
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .ok()?;
        // Best effort: the lock only keeps the round-robin cursor tidy, never correctness.
        Flock::lock(file, FlockArg::LockExclusive).ok()
    }

    /// Every address file of the store.
    pub fn allocations(&self) -> Result<Vec<Allocation>, IpamError> {
        let entries = match fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_err("list", &self.dir)(e)),
        };
        let mut out = Vec::new();
        for entry in entries {
            let entry = entry.map_err(io_err("list", &self.dir))?;
            let Some(ip) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<Ipv4Addr>().ok())
            else {
                continue;
            };
            let path = entry.path();
            let owner = match fs::read_to_string(&path) {
                Ok(text) => parse_owner(&text),
                // Released meanwhile.
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io_err("read", &path)(e)),
            };
            out.push(Allocation { ip, owner });
        }
        out.sort_by_key(|a| a.ip);
        Ok(out)
    }

    /// The address held by `owner`, if any.
    pub fn find(&self, owner: &Attachment) -> Result<Option<Ipv4Addr>, IpamError> {
        Ok(self
            .allocations()?
            .into_iter()
            .find(|a| a.owner.as_ref() == Some(owner))
            .map(|a| a.ip))
    }

    /// Allocates an address to `owner`, or returns the one it already holds (an ADD retried after
    /// a crash between allocation and wiring).
    pub fn allocate(&self, owner: &Attachment) -> Result<Ipv4Addr, IpamError> {
        let _lock = self.lock();
        self.allocate_unlocked(owner)
    }

    /// [`Ipam::allocate`] without the advisory lock: still never hands one address out twice.
    pub fn allocate_unlocked(&self, owner: &Attachment) -> Result<Ipv4Addr, IpamError> {
        let allocations = self.allocations()?;
        if let Some(a) = allocations.iter().find(|a| a.owner.as_ref() == Some(owner)) {
            return Ok(a.ip);
        }
        let taken: HashSet<Ipv4Addr> = allocations.iter().map(|a| a.ip).collect();
        let (lo, hi) = self.usable_range();
        let (lo, hi) = (u32::from(lo), u32::from(hi));
        let count = hi - lo + 1;
        let start = self
            .last_reserved()
            .map(|ip| u32::from(ip).wrapping_add(1))
            .filter(|ip| (lo..=hi).contains(ip))
            .unwrap_or(lo);
        for i in 0..count {
            let candidate = Ipv4Addr::from(lo + (start - lo + i) % count);
            if taken.contains(&candidate) {
                continue;
            }
            if self.reserve(candidate, owner)? {
                self.write_last_reserved(candidate);
                return Ok(candidate);
            }
        }
        Err(IpamError::Exhausted {
            cidr: self.net,
            usable: count,
        })
    }

    /// Tries to take `ip` for `owner`: `Ok(false)` when another holds it already.
    fn reserve(&self, ip: Ipv4Addr, owner: &Attachment) -> Result<bool, IpamError> {
        let tmp = self.tmp_path();
        let content = format!("{}\n{}\n", owner.container_id, owner.ifname);
        let written = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .and_then(|mut f| f.write_all(content.as_bytes()));
        if let Err(e) = written {
            let _ = fs::remove_file(&tmp);
            return Err(io_err("write", &tmp)(e));
        }
        let target = self.dir.join(ip.to_string());
        let linked = fs::hard_link(&tmp, &target);
        let _ = fs::remove_file(&tmp);
        match linked {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
            Err(e) => Err(io_err("create", &target)(e)),
        }
    }

    fn tmp_path(&self) -> PathBuf {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        self.dir
            .join(format!("{TMP_PREFIX}{}-{nanos}-{n}", std::process::id()))
    }

    fn last_reserved(&self) -> Option<Ipv4Addr> {
        fs::read_to_string(self.dir.join(LAST_RESERVED_FILE))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// Records the cursor (atomically by rename; failures only cost round-robin order).
    fn write_last_reserved(&self, ip: Ipv4Addr) {
        let tmp = self.tmp_path();
        if fs::write(&tmp, format!("{ip}\n")).is_ok()
            && fs::rename(&tmp, self.dir.join(LAST_RESERVED_FILE)).is_ok()
        {
            return;
        }
        let _ = fs::remove_file(&tmp);
    }

    /// Releases every address held by `owner` (normally one); releasing nothing is fine.
    pub fn release(&self, owner: &Attachment) -> Result<Vec<Ipv4Addr>, IpamError> {
        let _lock = self.lock();
        let mut released = Vec::new();
        for a in self.allocations()? {
            if a.owner.as_ref() == Some(owner) {
                let path = self.dir.join(a.ip.to_string());
                match fs::remove_file(&path) {
                    Ok(()) => released.push(a.ip),
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(io_err("remove", &path)(e)),
                }
            }
        }
        Ok(released)
    }

    /// Releases every allocation whose owner is not in `valid` (and those without an owner), and
    /// removes temporary files left by crashed plugins; goes on past failures.
    pub fn gc(&self, valid: &HashSet<Attachment>) -> GcOutcome {
        let _lock = self.lock();
        let mut outcome = GcOutcome::default();
        match self.allocations() {
            Ok(allocations) => {
                for a in allocations {
                    if a.owner.as_ref().is_some_and(|o| valid.contains(o)) {
                        continue;
                    }
                    let path = self.dir.join(a.ip.to_string());
                    match fs::remove_file(&path) {
                        Ok(()) => outcome.released.push(a),
                        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                        Err(e) => outcome.failures.push(io_err("remove", &path)(e)),
                    }
                }
            }
            Err(e) => outcome.failures.push(e),
        }
        if let Ok(entries) = fs::read_dir(&self.dir) {
            for entry in entries.flatten() {
                let stale = entry.file_name().to_string_lossy().starts_with(TMP_PREFIX)
                    && entry
                        .metadata()
                        .and_then(|m| m.modified())
                        .ok()
                        .and_then(|t| t.elapsed().ok())
                        .is_some_and(|age| age > TMP_MAX_AGE);
                if stale && let Err(e) = fs::remove_file(entry.path()) {
                    outcome.failures.push(io_err("remove", &entry.path())(e));
                }
            }
        }
        outcome
    }

    /// Checks that the store's directory accepts new files (STATUS).
    pub fn probe_writable(&self) -> Result<(), IpamError> {
        let tmp = self.tmp_path();
        let result = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .and_then(|mut f| f.write_all(b"probe\n"));
        let _ = fs::remove_file(&tmp);
        result.map_err(io_err("write", &tmp))
    }
}

fn parse_owner(text: &str) -> Option<Attachment> {
    let mut lines = text.lines();
    let container_id = lines.next()?.trim();
    let ifname = lines.next()?.trim();
    (!container_id.is_empty() && !ifname.is_empty()).then(|| Attachment {
        container_id: container_id.to_string(),
        ifname: ifname.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::thread;

    use super::*;

    fn att(id: &str) -> Attachment {
        Attachment {
            container_id: id.to_string(),
            ifname: "eth0".to_string(),
        }
    }

    fn store(cidr: &str) -> (tempfile::TempDir, Ipam) {
        let dir = tempfile::tempdir().expect("tempdir");
        let ipam = Ipam::open(dir.path().join("net"), cidr.parse().expect("cidr")).expect("open");
        (dir, ipam)
    }

    #[test]
    fn skips_network_node_and_broadcast_addresses() {
        let (_d, ipam) = store("10.9.0.0/24");
        assert_eq!(
            ipam.usable_range(),
            ("10.9.0.2".parse().unwrap(), "10.9.0.254".parse().unwrap())
        );
        assert_eq!(ipam.usable_count(), 253);
        let first = ipam.allocate(&att("a")).expect("allocate");
        assert_eq!(first, "10.9.0.2".parse::<Ipv4Addr>().unwrap());
    }

    #[test]
    fn allocation_is_recorded_and_reused_for_the_same_owner() {
        let (_d, ipam) = store("10.9.0.0/24");
        let a = ipam.allocate(&att("a")).expect("allocate a");
        let b = ipam.allocate(&att("b")).expect("allocate b");
        assert_ne!(a, b);
        assert_eq!(
            ipam.allocate(&att("a")).expect("again"),
            a,
            "same owner, same ip"
        );
        let text = fs::read_to_string(ipam.dir().join(a.to_string())).expect("ip file");
        assert_eq!(text, "a\neth0\n");
        let other_if = Attachment {
            container_id: "a".into(),
            ifname: "net1".into(),
        };
        assert_ne!(
            ipam.allocate(&other_if).expect("net1"),
            a,
            "owner is (id, ifname)"
        );
        assert_eq!(ipam.find(&att("b")).expect("find"), Some(b));
    }

    #[test]
    fn exhaustion_is_a_clear_error_and_release_frees() {
        let (_d, ipam) = store("10.9.0.0/29"); // .2 to .6: 5 addresses
        let ips: Vec<_> = (0..5)
            .map(|i| ipam.allocate(&att(&format!("c{i}"))).expect("allocate"))
            .collect();
        let err = ipam.allocate(&att("extra")).expect_err("pool is full");
        assert!(
            matches!(err, IpamError::Exhausted { usable: 5, .. }),
            "{err}"
        );
        assert_eq!(err.code(), 101);
        assert!(err.to_string().contains("10.9.0.0/29"), "{err}");
        assert_eq!(ipam.release(&att("c3")).expect("release"), vec![ips[3]]);
        assert!(ipam.release(&att("c3")).expect("release twice").is_empty());
        assert_eq!(ipam.allocate(&att("extra")).expect("freed"), ips[3]);
    }

    #[test]
    fn round_robin_does_not_reuse_a_just_released_address() {
        let (_d, ipam) = store("10.9.0.0/24");
        let a = ipam.allocate(&att("a")).expect("a");
        ipam.release(&att("a")).expect("release");
        let b = ipam.allocate(&att("b")).expect("b");
        assert_ne!(a, b, "cursor moves on");
        assert_eq!(u32::from(b), u32::from(a) + 1);
    }

    #[test]
    fn round_robin_wraps_around() {
        let (_d, ipam) = store("10.9.0.0/29");
        for i in 0..5 {
            ipam.allocate(&att(&format!("c{i}"))).expect("allocate");
        }
        ipam.release(&att("c0")).expect("release");
        assert_eq!(
            ipam.allocate(&att("n")).expect("wraps"),
            "10.9.0.2".parse::<Ipv4Addr>().unwrap()
        );
    }

    fn concurrent(locked: bool) {
        let (_d, ipam) = store("10.9.0.0/26"); // 61 addresses
        let ipam = Arc::new(ipam);
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let ipam = Arc::clone(&ipam);
                thread::spawn(move || {
                    (0..7)
                        .map(|i| {
                            let owner = att(&format!("t{t}-{i}"));
                            if locked {
                                ipam.allocate(&owner)
                            } else {
                                ipam.allocate_unlocked(&owner)
                            }
                            .expect("allocate")
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let all: Vec<Ipv4Addr> = threads
            .into_iter()
            .flat_map(|t| t.join().expect("thread"))
            .collect();
        let unique: HashSet<_> = all.iter().collect();
        assert_eq!(
            unique.len(),
            56,
            "every allocation got its own address: {all:?}"
        );
        assert_eq!(ipam.allocations().expect("list").len(), 56);
    }

    #[test]
    fn concurrent_allocations_never_share_an_address() {
        concurrent(true);
    }

    #[test]
    fn concurrent_allocations_are_unique_even_without_the_lock() {
        concurrent(false);
    }

    #[test]
    fn a_crash_leftover_tmp_file_or_empty_ip_file_never_double_allocates() {
        let (_d, ipam) = store("10.9.0.0/29");
        // A plugin crashed after creating its temporary file, and a power loss left an empty file.
        fs::write(ipam.dir().join(".tmp-1-2-3"), "x\neth0\n").expect("tmp");
        fs::write(ipam.dir().join("10.9.0.2"), "").expect("empty ip file");
        let a = ipam.allocate(&att("a")).expect("allocate");
        assert_eq!(
            a,
            "10.9.0.3".parse::<Ipv4Addr>().unwrap(),
            "empty file still reserves .2"
        );
        let allocs = ipam.allocations().expect("list");
        assert_eq!(
            allocs.len(),
            2,
            "the tmp file is not an allocation: {allocs:?}"
        );
        assert_eq!(allocs[0].owner, None);
    }

    #[test]
    fn gc_releases_what_no_valid_attachment_holds() {
        let (_d, ipam) = store("10.9.0.0/24");
        let a = ipam.allocate(&att("a")).expect("a");
        let b = ipam.allocate(&att("b")).expect("b");
        fs::write(ipam.dir().join("10.9.0.100"), "").expect("ownerless file");
        let valid: HashSet<_> = [att("a")].into_iter().collect();
        let outcome = ipam.gc(&valid);
        assert!(outcome.failures.is_empty(), "{:?}", outcome.failures);
        let released: Vec<_> = outcome.released.iter().map(|r| r.ip).collect();
        assert_eq!(released, vec![b, "10.9.0.100".parse().unwrap()]);
        assert_eq!(ipam.find(&att("a")).expect("find"), Some(a), "valid kept");
        assert_eq!(ipam.allocations().expect("list").len(), 1);
    }

    #[test]
    fn state_survives_reopening() {
        let (d, ipam) = store("10.9.0.0/24");
        let a = ipam.allocate(&att("a")).expect("a");
        drop(ipam);
        let again = Ipam::open(d.path().join("net"), "10.9.0.0/24".parse().unwrap()).expect("open");
        assert_eq!(again.find(&att("a")).expect("find"), Some(a));
        assert_ne!(again.allocate(&att("b")).expect("b"), a);
        assert!(
            Ipam::open_existing(d.path().join("missing"), "10.9.0.0/24".parse().unwrap()).is_none()
        );
    }

    #[test]
    fn probe_reports_an_unwritable_directory() {
        let (_d, ipam) = store("10.9.0.0/24");
        ipam.probe_writable().expect("writable");
        let gone = Ipam {
            dir: ipam.dir().join("nope"),
            net: ipam.net,
        };
        assert!(gone.probe_writable().is_err());
    }
}
