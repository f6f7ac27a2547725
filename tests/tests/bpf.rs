//! The eBPF datapath on a real kernel (needs root): two "pods" (network namespaces, each with a
//! veth whose host end sits on a bridge in a "node" namespace), the agent's `Datapath` attached
//! to both host veths from inside the node namespace, real pings between the pods, the counters
//! read back, restored from the pins after the `Datapath` is dropped, shown by the real
//! `skiffctl bpf pods`, then detached.
//!
//! Everything lives in namespaces this test creates (named after its process id) and in
//! `/sys/fs/bpf/skiff/bpftest-<pid>`; a guard removes them even when the test fails.

use std::fs::File;
use std::net::Ipv4Addr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use nix::sched::{CloneFlags, setns};
use skiff_agent::bpf::{self, Datapath, Hook, PodCounters, PodIdentity};
use skiff_tests::bin_path;

const BPFFS: &str = "/sys/fs/bpf";

/// Runs a command; panics with its output unless it succeeds. Returns stdout.
fn sh(args: &[&str]) -> String {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The namespaces, links and pins of one run; removed on drop.
struct Lab {
    node: String,
    node_ns: String,
    pods: [(String, String, Ipv4Addr); 2],
}

impl Lab {
    fn new() -> Lab {
        let pid = std::process::id();
        let lab = Lab {
            node: format!("bpftest-{pid}"),
            node_ns: format!("skbt{pid}-node"),
            pods: [
                (
                    format!("skbt{pid}-a"),
                    format!("skfa{pid}"),
                    Ipv4Addr::new(10, 199, 0, 1),
                ),
                (
                    format!("skbt{pid}-b"),
                    format!("skfb{pid}"),
                    Ipv4Addr::new(10, 199, 0, 2),
                ),
            ],
        };
        // Leftovers of an earlier run with the same pid.
        lab.clean();
        sh(&["ip", "netns", "add", &lab.node_ns]);
        let node = lab.node_ns.as_str();
        sh(&["ip", "-n", node, "link", "add", "br0", "type", "bridge"]);
        sh(&["ip", "-n", node, "link", "set", "br0", "up"]);
        for (ns, host, ip) in &lab.pods {
            sh(&["ip", "netns", "add", ns]);
            sh(&[
                "ip", "-n", node, "link", "add", host, "type", "veth", "peer", "name", "eth0",
                "netns", ns,
            ]);
            sh(&["ip", "-n", node, "link", "set", host, "master", "br0", "up"]);
            sh(&[
                "ip",
                "-n",
                ns,
                "addr",
                "add",
                &format!("{ip}/24"),
                "dev",
                "eth0",
            ]);
            sh(&["ip", "-n", ns, "link", "set", "eth0", "up"]);
            sh(&["ip", "-n", ns, "link", "set", "lo", "up"]);
        }
        lab
    }

    fn clean(&self) {
        // Pins first: removing the link pins detaches the programs.
        if let Err(e) = bpf::remove_node_pins(Path::new(BPFFS), &self.node) {
            eprintln!("cleanup: cannot remove the pins of {}: {e}", self.node);
        }
        for ns in [&self.pods[0].0, &self.pods[1].0, &self.node_ns] {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }

    fn ident(&self, i: usize) -> PodIdentity {
        PodIdentity {
            namespace: "bpftest".into(),
            name: format!("pod-{}", ["a", "b"][i]),
            uid: format!("00000000-0000-4000-8000-00000000000{i}"),
            ip: self.pods[i].2,
        }
    }

    /// Pings from pod a to pod b (and so back): `count` echo requests, all answered.
    fn ping(&self, count: u32) {
        let out = sh(&[
            "ip",
            "netns",
            "exec",
            &self.pods[0].0,
            "ping",
            "-c",
            &count.to_string(),
            "-i",
            "0.2",
            "-W",
            "2",
            &self.pods[1].2.to_string(),
        ]);
        assert!(
            out.contains(&format!("{count} received")),
            "all answered: {out}"
        );
    }

    /// Enters the node namespace (this thread only), where the host veths live.
    fn enter_node(&self) {
        let ns =
            File::open(format!("/var/run/netns/{}", self.node_ns)).expect("open the node netns");
        setns(ns, CloneFlags::CLONE_NEWNET).expect("setns into the node netns");
    }

    /// How many TCX programs the kernel has on a host veth, both hooks together (asked from the
    /// node namespace, which the calling thread must have entered).
    fn tcx_programs(&self, host: &str) -> usize {
        Hook::BOTH
            .iter()
            .map(|&hook| {
                bpf::links::tcx_program_ids(host, hook)
                    .expect("query tcx")
                    .len()
            })
            .sum()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.clean();
    }
}

fn counters_of<'a>(all: &'a [PodCounters], host: &str) -> &'a PodCounters {
    all.iter()
        .find(|c| c.host_ifname == host)
        .unwrap_or_else(|| panic!("no counters for {host}: {all:?}"))
}

fn prog_id(pin: &Path) -> u64 {
    let out = sh(&[
        "bpftool",
        "-j",
        "prog",
        "show",
        "pinned",
        pin.to_str().expect("utf-8"),
    ]);
    let v: serde_json::Value = serde_json::from_str(&out).expect("bpftool json");
    v["id"].as_u64().expect("a program id")
}

fn pinned_progs(node: &str) -> Vec<std::path::PathBuf> {
    let progs = Path::new(BPFFS).join("skiff").join(node).join("progs");
    let mut pins = Vec::new();
    for version in std::fs::read_dir(&progs).expect("progs dir") {
        for pin in std::fs::read_dir(version.expect("entry").path()).expect("version dir") {
            pins.push(pin.expect("entry").path());
        }
    }
    pins.sort();
    pins
}

#[test]
#[ignore = "privileged: needs root (eBPF, network namespaces)"]
fn pods_are_counted_restored_from_pins_shown_and_detached() {
    let lab = Lab::new();
    // The datapath works in the node namespace: run the body on a thread of its own that enters
    // it, so that no other test's thread is affected.
    let result = std::thread::scope(|s| s.spawn(|| scenario(&lab)).join());
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
}

fn scenario(lab: &Lab) {
    lab.enter_node();
    let hosts = [lab.pods[0].1.as_str(), lab.pods[1].1.as_str()];

    let dp = Datapath::open(&lab.node).expect("open the datapath");
    assert!(bpf::pins::is_bpffs(Path::new(BPFFS)), "bpffs mounted");
    for (i, host) in hosts.iter().enumerate() {
        dp.attach_pod(host, &lab.ident(i)).expect("attach");
        dp.attach_pod(host, &lab.ident(i))
            .expect("attach again is harmless");
        assert_eq!(lab.tcx_programs(host), 2, "ingress and egress on {host}");
    }
    let progs = pinned_progs(&lab.node);
    assert_eq!(
        progs.len(),
        4,
        "the pods' two programs, the uplink's and the service veth's: {progs:?}"
    );
    let ids: Vec<u64> = progs.iter().map(|p| prog_id(p)).collect();

    lab.ping(3);
    let first = dp.pod_counters().expect("counters");
    assert_eq!(first.len(), 2, "{first:?}");
    let (a, b) = (counters_of(&first, hosts[0]), counters_of(&first, hosts[1]));
    assert_eq!(a.pod, lab.ident(0));
    assert_eq!(b.pod, lab.ident(1));
    for c in [a, b] {
        // 3 echo requests one way, 3 replies the other, plus ARP.
        assert!(
            c.tx.packets >= 3 && c.rx.packets >= 3,
            "both directions counted: {c:?}"
        );
        assert!(
            c.tx.bytes >= 3 * 98 && c.rx.bytes >= 3 * 98,
            "bytes counted: {c:?}"
        );
    }

    // The agent goes away: the programs stay attached and keep counting.
    drop(dp);
    assert_eq!(
        lab.tcx_programs(hosts[0]),
        2,
        "still attached without the agent"
    );
    lab.ping(2);
    let without_agent =
        bpf::read_pinned_counters(Path::new(BPFFS), Some(&lab.node)).expect("read the pins");
    let a_now = &without_agent
        .iter()
        .find(|r| r.counters.host_ifname == hosts[0])
        .expect("pod a in the pins")
        .counters;
    assert!(
        a_now.tx.packets >= a.tx.packets + 2,
        "counted while no agent ran: {a_now:?}"
    );

    // The agent comes back: restored from the pins, nothing reloaded or reset.
    let dp = Datapath::open(&lab.node).expect("reopen the datapath");
    assert_eq!(
        pinned_progs(&lab.node)
            .iter()
            .map(|p| prog_id(p))
            .collect::<Vec<_>>(),
        ids,
        "the same programs, restored"
    );
    let restored = dp.pod_counters().expect("counters");
    for host in hosts {
        let (before, after) = (counters_of(&first, host), counters_of(&restored, host));
        assert!(
            after.tx.packets > before.tx.packets,
            "not reset: {before:?} -> {after:?}"
        );
        assert!(
            after.rx.packets > before.rx.packets,
            "not reset: {before:?} -> {after:?}"
        );
    }
    lab.ping(2);
    let later = dp.pod_counters().expect("counters");
    for host in hosts {
        let (before, after) = (counters_of(&restored, host), counters_of(&later, host));
        assert!(
            after.tx.packets >= before.tx.packets + 2,
            "still counting: {after:?}"
        );
        assert!(
            after.rx.packets >= before.rx.packets + 2,
            "still counting: {after:?}"
        );
        assert!(after.tx.bytes > before.tx.bytes && after.rx.bytes > before.rx.bytes);
    }

    // An agent with other programs (here: the same object with a byte appended, so another
    // version): they are loaded, take over the links in place, and the maps carry on.
    drop(dp);
    let mut other = bpf::PROGRAM_OBJECT.to_vec();
    other.push(0);
    let dp = Datapath::open_with_object(Path::new(BPFFS), &lab.node, &other).expect("upgrade");
    let new_progs = pinned_progs(&lab.node);
    assert_eq!(
        new_progs.len(),
        4,
        "only the new version's programs: {new_progs:?}"
    );
    let new_ids: Vec<u64> = new_progs.iter().map(|p| prog_id(p)).collect();
    assert!(
        new_ids.iter().all(|id| !ids.contains(id)),
        "{ids:?} -> {new_ids:?}"
    );
    for host in hosts {
        let mut attached: Vec<u64> = Hook::BOTH
            .iter()
            .flat_map(|&hook| bpf::links::tcx_program_ids(host, hook).expect("query tcx"))
            .map(u64::from)
            .collect();
        attached.sort();
        let mut expected: Vec<u64> = new_progs
            .iter()
            .filter(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("skf_pod_"))
            })
            .map(|p| prog_id(p))
            .collect();
        expected.sort();
        assert_eq!(
            attached, expected,
            "the links of {host} run the new programs"
        );
    }
    lab.ping(1);
    let upgraded = dp.pod_counters().expect("counters");
    for host in hosts {
        let (before, after) = (counters_of(&later, host), counters_of(&upgraded, host));
        assert!(
            after.tx.packets > before.tx.packets,
            "kept and counting: {after:?}"
        );
        assert!(
            after.rx.packets > before.rx.packets,
            "kept and counting: {after:?}"
        );
    }

    // skiffctl reads the same pins.
    let out = sh(&[
        bin_path("skiffctl").to_str().expect("utf-8"),
        "bpf",
        "pods",
        "--node",
        &lab.node,
        "-o",
        "json",
    ]);
    let shown: serde_json::Value = serde_json::from_str(&out).expect("skiffctl json");
    let shown = shown.as_array().expect("a list");
    assert_eq!(shown.len(), 2, "{out}");
    for (i, host) in hosts.iter().enumerate() {
        let row = shown
            .iter()
            .find(|r| r["hostInterface"] == *host)
            .unwrap_or_else(|| panic!("{host} in {out}"));
        let c = counters_of(&later, host);
        assert_eq!(row["node"], lab.node.as_str());
        assert_eq!(row["namespace"], "bpftest");
        assert_eq!(row["pod"], lab.ident(i).name.as_str());
        assert_eq!(row["ip"], lab.pods[i].2.to_string().as_str());
        for (field, min) in [
            ("rxPackets", c.rx.packets),
            ("rxBytes", c.rx.bytes),
            ("txPackets", c.tx.packets),
            ("txBytes", c.tx.bytes),
        ] {
            let v = row[field]
                .as_u64()
                .unwrap_or_else(|| panic!("{field} in {row}"));
            assert!(v >= min && v > 0, "{field} {v} >= {min}");
        }
    }
    let table = sh(&[
        bin_path("skiffctl").to_str().expect("utf-8"),
        "bpf",
        "pods",
        "--node",
        &lab.node,
    ]);
    assert!(table.starts_with("NODE"), "{table}");
    assert!(
        table.contains("pod-a") && table.contains("pod-b"),
        "{table}"
    );

    // Detach pod a: its links and entries go, pod b keeps counting, traffic still flows.
    dp.detach_pod(hosts[0]).expect("detach");
    dp.detach_pod(hosts[0]).expect("detach again is harmless");
    // The kernel releases a link whose last pin went after an RCU grace period.
    let deadline = Instant::now() + Duration::from_secs(10);
    while lab.tcx_programs(hosts[0]) != 0 {
        assert!(
            Instant::now() < deadline,
            "{} still has programs after detach",
            hosts[0]
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        lab.tcx_programs(hosts[1]),
        2,
        "the other pod stays attached"
    );
    lab.ping(1);
    let remaining = dp.pod_counters().expect("counters");
    assert_eq!(remaining.len(), 1, "{remaining:?}");
    assert!(
        counters_of(&remaining, hosts[1]).rx.packets > counters_of(&later, hosts[1]).rx.packets
    );
    let links = Path::new(BPFFS).join("skiff").join(&lab.node).join("links");
    let names: Vec<String> = std::fs::read_dir(&links)
        .expect("links dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        names.iter().all(|n| !n.starts_with(hosts[0])),
        "pins of a gone: {names:?}"
    );

    dp.detach_pod(hosts[1]).expect("detach b");
    assert!(dp.pod_counters().expect("counters").is_empty());
    drop(dp);
    bpf::remove_node_pins(Path::new(BPFFS), &lab.node).expect("remove the pins");
    assert!(!Path::new(BPFFS).join("skiff").join(&lab.node).exists());
}
