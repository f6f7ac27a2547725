//! Privileged integration tests of the `skiff-cni` plugin binary, run the way a container runtime
//! runs it: exec'd with the CNI_* environment and the network configuration on stdin.
//!
//! Each test makes its own network namespaces, named `skiff-cni-test-<pid>-<n>-…`: one acting as
//! the node (the plugin runs inside it through `ip netns exec`, so the node's links, routes,
//! sysctls and portmap's iptables rules never touch the machine's own namespace) and one per pod.
//! Addresses are in 10.0.0.0/8. A [`Fixture`] removes every namespace (and with them every veth
//! and route) and its data directory when dropped, also when the test panics.
//!
//! Needs root, `ip` (iproute2), and for the chain test Debian's containernetworking-plugins in
//! /usr/lib/cni and iptables.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;

use serde_json::{Value, json};

/// Where Debian's containernetworking-plugins live.
const DEBIAN_CNI_DIR: &str = "/usr/lib/cni";

/// Host-side veth name, as the fixed interface defines it (computed here with coreutils'
/// sha256sum, independently of the plugin's code).
fn host_veth(container_id: &str, ifname: &str) -> String {
    let out = run_stdin(
        Command::new("sha256sum"),
        format!("{container_id}/{ifname}").as_bytes(),
    );
    assert!(out.status.success(), "sha256sum failed");
    format!("skf{}", &String::from_utf8_lossy(&out.stdout)[..11])
}

fn run_stdin(mut cmd: Command, stdin: &[u8]) -> Output {
    use std::io::Write;
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    let mut pipe = child.stdin.take().expect("piped stdin");
    let input = stdin.to_vec();
    let writer = thread::spawn(move || {
        let _ = pipe.write_all(&input);
    });
    let out = child
        .wait_with_output()
        .unwrap_or_else(|e| panic!("wait for {cmd:?}: {e}"));
    let _ = writer.join();
    out
}

/// Runs `ip ARGS`, panicking on failure.
fn ip(args: &[&str]) -> String {
    let out = Command::new("ip")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run ip {args:?}: {e}"));
    assert!(
        out.status.success(),
        "ip {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// What one plugin invocation returned.
#[derive(Debug)]
struct CniOutput {
    success: bool,
    stdout: String,
    stderr: String,
}

impl CniOutput {
    /// The JSON printed on stdout (result or error object).
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("plugin printed no JSON ({e}): {self:?}"))
    }

    fn ok(self) -> Self {
        assert!(self.success, "plugin failed: {self:?}");
        self
    }

    /// Asserts failure with CNI error `code` and returns the error object.
    fn err(self, code: u64) -> Value {
        assert!(!self.success, "plugin should have failed: {self:?}");
        let v = self.json();
        assert_eq!(v["code"], code, "unexpected error: {v}");
        assert!(v["msg"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
        assert!(v["cniVersion"].is_string(), "{v}");
        assert!(
            self.stderr.contains("skiff-cni: "),
            "the error is logged on stderr too: {self:?}"
        );
        v
    }
}

/// A node namespace, pod namespaces and a data directory, all removed on drop.
struct Fixture {
    prefix: String,
    node: String,
    pods: Vec<String>,
    data: tempfile::TempDir,
    cidr: String,
}

impl Fixture {
    fn new(third_octet: u8) -> Fixture {
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let prefix = format!("skiff-cni-test-{}-{n}", std::process::id());
        let node = format!("{prefix}-node");
        let data = tempfile::Builder::new()
            .prefix("skiff-cni-test-")
            .tempdir()
            .expect("create a data directory");
        let fixture = Fixture {
            node: node.clone(),
            prefix,
            pods: Vec::new(),
            data,
            cidr: format!("10.{}.{third_octet}.0/24", 200 + std::process::id() % 50),
        };
        ip(&["netns", "add", &node]);
        ip(&["-n", &node, "link", "set", "lo", "up"]);
        fixture
    }

    /// Creates a pod namespace and returns its name.
    fn pod(&mut self, name: &str) -> String {
        let ns = format!("{}-{name}", self.prefix);
        ip(&["netns", "add", &ns]);
        self.pods.push(ns.clone());
        ns
    }

    fn netns_path(ns: &str) -> String {
        format!("/var/run/netns/{ns}")
    }

    fn ipam_dir(&self) -> PathBuf {
        self.data.path().join("skiff-test")
    }

    /// The plugin's configuration, as a runtime would hand it over (`name` and `cniVersion`
    /// injected).
    fn conf(&self) -> Value {
        json!({
            "cniVersion": "1.1.0",
            "name": "skiff-test",
            "type": "skiff-cni",
            "podCIDR": self.cidr,
            "dataDir": self.data.path(),
            "mtu": 1400,
        })
    }

    /// Runs a plugin binary inside the node namespace.
    fn exec(
        &self,
        plugin: &Path,
        command: &str,
        container: Option<(&str, &str, &str)>,
        conf: &Value,
    ) -> CniOutput {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.node])
            .arg(plugin)
            .env("CNI_COMMAND", command)
            .env(
                "CNI_PATH",
                format!(
                    "{DEBIAN_CNI_DIR}:{}",
                    plugin.parent().expect("dir").display()
                ),
            )
            .env_remove("CNI_CONTAINERID")
            .env_remove("CNI_NETNS")
            .env_remove("CNI_IFNAME");
        if let Some((id, ns, ifname)) = container {
            cmd.env("CNI_CONTAINERID", id)
                .env("CNI_IFNAME", ifname)
                .env("CNI_ARGS", "IgnoreUnknown=1;K8S_POD_NAMESPACE=default");
            if !ns.is_empty() {
                cmd.env("CNI_NETNS", Self::netns_path(ns));
            }
        }
        let out = run_stdin(cmd, conf.to_string().as_bytes());
        CniOutput {
            success: out.status.success(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    fn skiff(
        &self,
        command: &str,
        container: Option<(&str, &str, &str)>,
        conf: &Value,
    ) -> CniOutput {
        self.exec(
            &skiff_tests::bin_path("skiff-cni"),
            command,
            container,
            conf,
        )
    }

    fn node_sysctl(&self, path: &str) -> String {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.node, "cat", path])
            .output()
            .expect("run cat");
        assert!(
            out.status.success(),
            "read {path}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    fn node_has_link(&self, name: &str) -> bool {
        Command::new("ip")
            .args(["-n", &self.node, "link", "show", name])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("run ip")
            .success()
    }

    /// The IP files of the IPAM store.
    fn ip_files(&self) -> Vec<String> {
        let mut files: Vec<String> = std::fs::read_dir(self.ipam_dir())
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.parse::<std::net::Ipv4Addr>().is_ok())
                    .collect()
            })
            .unwrap_or_default();
        files.sort();
        files
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        for ns in self.pods.iter().chain([&self.node]) {
            let _ = Command::new("ip")
                .args(["netns", "del", ns])
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// The pod address of an ADD result (the IP on the interface in `sandbox`).
fn pod_ip(result: &Value, ifname: &str, netns: &str) -> String {
    let interfaces = result["interfaces"].as_array().expect("interfaces");
    let index = interfaces
        .iter()
        .position(|i| i["name"] == ifname && i["sandbox"] == Fixture::netns_path(netns))
        .unwrap_or_else(|| panic!("no {ifname} in {netns} in {result}"));
    let ip = result["ips"]
        .as_array()
        .expect("ips")
        .iter()
        .find(|ip| ip["interface"] == index)
        .unwrap_or_else(|| panic!("no ip on interface {index} in {result}"));
    let address = ip["address"].as_str().expect("address");
    address
        .strip_suffix("/32")
        .unwrap_or_else(|| panic!("pod address {address} is not a /32"))
        .to_string()
}

#[test]
#[ignore = "privileged: needs root (network namespaces)"]
fn add_wires_calico_style_pods_reach_each_other_check_and_del() {
    let mut f = Fixture::new(1);
    let pod_a = f.pod("a");
    let pod_b = f.pod("b");
    let conf = f.conf();

    let res_a = f
        .skiff("ADD", Some(("ctr-a", &pod_a, "eth0")), &conf)
        .ok()
        .json();
    let res_b = f
        .skiff("ADD", Some(("ctr-b", &pod_b, "eth0")), &conf)
        .ok()
        .json();
    assert_eq!(res_a["cniVersion"], "1.1.0");
    let veth_a = host_veth("ctr-a", "eth0");
    let veth_b = host_veth("ctr-b", "eth0");

    // Result layout: host veth first (no sandbox, ee:ee:…), then the pod interface, one /32.
    assert_eq!(res_a["interfaces"][0]["name"], veth_a.as_str(), "{res_a}");
    assert_eq!(res_a["interfaces"][0]["mac"], "ee:ee:ee:ee:ee:ee");
    assert!(res_a["interfaces"][0].get("sandbox").is_none(), "{res_a}");
    assert_eq!(res_a["interfaces"][1]["name"], "eth0");
    assert_eq!(res_a["ips"].as_array().map(Vec::len), Some(1), "{res_a}");
    assert!(
        res_a["ips"][0].get("version").is_none(),
        "1.1.0 results have no ip version"
    );
    let ip_a = pod_ip(&res_a, "eth0", &pod_a);
    let ip_b = pod_ip(&res_b, "eth0", &pod_b);
    assert_ne!(ip_a, ip_b);
    let net_prefix = f.cidr.trim_end_matches("0/24");
    assert!(ip_a.starts_with(net_prefix), "{ip_a} outside {}", f.cidr);
    assert!(
        !ip_a.ends_with(".0") && !ip_a.ends_with(".1"),
        "{ip_a} is reserved"
    );

    // The pod: the /32, the link-scope route to the gateway and the default route.
    let addr = ip(&["-n", &pod_a, "-o", "-4", "addr", "show", "dev", "eth0"]);
    assert!(addr.contains(&format!("inet {ip_a}/32")), "{addr}");
    let link = ip(&["-n", &pod_a, "link", "show", "eth0"]);
    assert!(link.contains("mtu 1400") && link.contains("UP"), "{link}");
    let routes = ip(&["-n", &pod_a, "-4", "route", "show"]);
    assert!(
        routes.contains("default via 169.254.1.1 dev eth0"),
        "{routes}"
    );
    assert!(
        routes.contains("169.254.1.1 dev eth0") && routes.contains("scope link"),
        "{routes}"
    );

    // The node: veth without address, MAC ee:…, proxy ARP, forwarding, /32 route.
    let host_link = ip(&["-n", &f.node, "link", "show", &veth_a]);
    assert!(
        host_link.contains("link/ether ee:ee:ee:ee:ee:ee"),
        "{host_link}"
    );
    assert!(host_link.contains(",UP"), "{host_link}");
    let host_addr = ip(&["-n", &f.node, "-4", "addr", "show", "dev", &veth_a]);
    assert!(
        !host_addr.contains("inet "),
        "host veth must have no address: {host_addr}"
    );
    assert_eq!(
        f.node_sysctl(&format!("/proc/sys/net/ipv4/conf/{veth_a}/proxy_arp")),
        "1"
    );
    assert_eq!(
        f.node_sysctl(&format!("/proc/sys/net/ipv4/neigh/{veth_a}/proxy_delay")),
        "0"
    );
    assert_eq!(
        f.node_sysctl(&format!("/proc/sys/net/ipv4/conf/{veth_a}/forwarding")),
        "1"
    );
    let node_routes = ip(&["-n", &f.node, "-4", "route", "show"]);
    assert!(
        node_routes.contains(&format!("{ip_a} dev {veth_a}")),
        "{node_routes}"
    );
    assert!(
        node_routes.contains(&format!("{ip_b} dev {veth_b}")),
        "{node_routes}"
    );

    // Pod to pod through the node.
    let ping = Command::new("ip")
        .args(["netns", "exec", &pod_a, "ping", "-c", "2", "-W", "2", &ip_b])
        .output()
        .expect("run ping");
    assert!(
        ping.status.success(),
        "pod a cannot ping pod b at {ip_b}: {}",
        String::from_utf8_lossy(&ping.stdout)
    );

    // CHECK against the previous result succeeds; after breaking the pod's route it fails.
    let mut check = conf.clone();
    check["prevResult"] = res_a.clone();
    f.skiff("CHECK", Some(("ctr-a", &pod_a, "eth0")), &check)
        .ok();
    ip(&["-n", &pod_a, "route", "del", "default"]);
    let err = f
        .skiff("CHECK", Some(("ctr-a", &pod_a, "eth0")), &check)
        .err(103);
    assert!(
        err["msg"]
            .as_str()
            .unwrap_or_default()
            .contains("default route"),
        "{err}"
    );

    // DEL removes the veth, the route and the IP file; twice is fine; so is a vanished netns.
    assert_eq!(f.ip_files().len(), 2);
    f.skiff("DEL", Some(("ctr-a", &pod_a, "eth0")), &check).ok();
    assert!(!f.node_has_link(&veth_a), "{veth_a} still exists after DEL");
    let node_routes = ip(&["-n", &f.node, "-4", "route", "show"]);
    assert!(!node_routes.contains(&format!("{ip_a} ")), "{node_routes}");
    assert_eq!(f.ip_files(), vec![ip_b.clone()]);
    f.skiff("DEL", Some(("ctr-a", &pod_a, "eth0")), &conf).ok();
    ip(&["netns", "del", &pod_b]);
    f.skiff("DEL", Some(("ctr-b", &pod_b, "eth0")), &conf).ok();
    f.skiff("DEL", Some(("ctr-b", "", "eth0")), &conf).ok();
    assert!(!f.node_has_link(&veth_b));
    assert!(f.ip_files().is_empty(), "{:?}", f.ip_files());
}

#[test]
#[ignore = "privileged: needs root (network namespaces)"]
fn add_twice_for_the_same_interface_is_a_json_error_and_leaks_nothing() {
    let mut f = Fixture::new(2);
    let pod = f.pod("p");
    let conf = f.conf();
    let first = f
        .skiff("ADD", Some(("ctr-1", &pod, "eth0")), &conf)
        .ok()
        .json();
    let err = f
        .skiff("ADD", Some(("ctr-2", &pod, "eth0")), &conf)
        .err(102);
    let msg = err["msg"].as_str().expect("msg");
    assert!(
        msg.contains("eth0") && msg.contains("already exists"),
        "{err}"
    );
    assert_eq!(
        f.ip_files(),
        vec![pod_ip(&first, "eth0", &pod)],
        "no address leaked"
    );
    assert!(
        !f.node_has_link(&host_veth("ctr-2", "eth0")),
        "no veth leaked"
    );

    // A missing namespace is an unknown container (code 3), a bad CIDR invalid config (7).
    let err = f
        .skiff("ADD", Some(("ctr-3", "no-such-ns", "eth0")), &conf)
        .err(3);
    assert!(
        err["msg"]
            .as_str()
            .unwrap_or_default()
            .contains("no-such-ns"),
        "{err}"
    );
    let mut bad = conf.clone();
    bad["podCIDR"] = json!("10.1.2.3/24");
    let err = f.skiff("ADD", Some(("ctr-3", &pod, "eth1")), &bad).err(7);
    assert!(
        err["msg"]
            .as_str()
            .unwrap_or_default()
            .contains("host bits"),
        "{err}"
    );
    let mut old = conf.clone();
    old["cniVersion"] = json!("0.2.0");
    f.skiff("ADD", Some(("ctr-3", &pod, "eth1")), &old).err(1);
}

#[test]
#[ignore = "privileged: needs root (network namespaces)"]
fn concurrent_adds_get_distinct_addresses() {
    let mut f = Fixture::new(3);
    let pods: Vec<String> = (0..8).map(|i| f.pod(&format!("c{i}"))).collect();
    let conf = f.conf();
    let results: Vec<Value> = thread::scope(|s| {
        let handles: Vec<_> = pods
            .iter()
            .enumerate()
            .map(|(i, pod)| {
                let f = &f;
                let conf = &conf;
                s.spawn(move || {
                    f.skiff("ADD", Some((&format!("par-{i}"), pod, "eth0")), conf)
                        .ok()
                        .json()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("thread"))
            .collect()
    });
    let mut ips: Vec<String> = results
        .iter()
        .zip(&pods)
        .map(|(r, pod)| pod_ip(r, "eth0", pod))
        .collect();
    ips.sort();
    ips.dedup();
    assert_eq!(ips.len(), 8, "duplicate addresses: {results:?}");
    assert_eq!(f.ip_files(), ips);
}

#[test]
#[ignore = "privileged: needs root (network namespaces)"]
fn gc_releases_orphans_and_removes_stale_veths() {
    let mut f = Fixture::new(4);
    let keep = f.pod("keep");
    let gone = f.pod("gone");
    let conf = f.conf();
    let kept = f
        .skiff("ADD", Some(("ctr-keep", &keep, "eth0")), &conf)
        .ok()
        .json();
    f.skiff("ADD", Some(("ctr-gone", &gone, "eth0")), &conf)
        .ok();
    // An allocation nobody holds any more (as a crashed runtime would leave).
    let orphan = f.cidr.replace("0/24", "200");
    std::fs::write(f.ipam_dir().join(&orphan), "ctr-crashed\neth0\n").expect("orphan file");
    // A foreign skf* link that this network did not make must survive.
    ip(&[
        "-n",
        &f.node,
        "link",
        "add",
        "skfforeign0",
        "type",
        "veth",
        "peer",
        "name",
        "skfforeign1",
    ]);
    assert_eq!(f.ip_files().len(), 3);

    let mut gc = conf.clone();
    gc["cni.dev/valid-attachments"] = json!([{"containerID": "ctr-keep", "ifname": "eth0"}]);
    let out = f.skiff("GC", None, &gc).ok();
    assert!(out.stdout.trim().is_empty(), "GC prints nothing: {out:?}");
    assert_eq!(f.ip_files(), vec![pod_ip(&kept, "eth0", &keep)], "{out:?}");
    assert!(
        !f.node_has_link(&host_veth("ctr-gone", "eth0")),
        "stale veth removed"
    );
    assert!(
        f.node_has_link(&host_veth("ctr-keep", "eth0")),
        "valid veth kept"
    );
    assert!(f.node_has_link("skfforeign0"), "foreign link kept");
}

#[test]
#[ignore = "privileged: needs root (network namespaces)"]
fn version_and_status_from_the_binary() {
    let f = Fixture::new(5);
    let out = f
        .skiff("VERSION", None, &json!({"cniVersion": "1.0.0"}))
        .ok()
        .json();
    assert_eq!(out["cniVersion"], "1.0.0");
    let versions = out["supportedVersions"].to_string();
    for v in ["0.4.0", "1.0.0", "1.1.0"] {
        assert!(versions.contains(v), "{v} missing: {out}");
    }
    let conf = f.conf();
    let out = f.skiff("STATUS", None, &conf).ok();
    assert!(out.stdout.trim().is_empty(), "{out:?}");
    let mut bad = conf.clone();
    bad["dataDir"] = json!("/proc/version/nope");
    f.skiff("STATUS", None, &bad).err(50);
}

/// Runs a conflist's plugins in order for ADD (each gets the previous result), as libcni does.
fn chain_add(f: &Fixture, conflist: &Value, container: (&str, &str, &str)) -> Value {
    let mut prev: Option<Value> = None;
    for plugin in conflist["plugins"].as_array().expect("plugins") {
        let conf = plugin_conf(conflist, plugin, prev.as_ref());
        let out = f.exec(&plugin_path(plugin), "ADD", Some(container), &conf);
        prev = Some(out.ok().json());
    }
    prev.expect("a result")
}

/// CHECK or DEL through the whole chain with the final result as prevResult (DEL in reverse).
fn chain_other(
    f: &Fixture,
    conflist: &Value,
    command: &str,
    container: (&str, &str, &str),
    result: &Value,
) {
    let mut plugins: Vec<&Value> = conflist["plugins"]
        .as_array()
        .expect("plugins")
        .iter()
        .collect();
    if command == "DEL" {
        plugins.reverse();
    }
    for plugin in plugins {
        // Debian's portmap 1.1.1 fails CHECK whenever it made no IPv6 rules ("could not check
        // ipv6 dnat: chain … not found"), whatever the plugins before it returned.
        if command == "CHECK" && plugin["type"] == "portmap" {
            continue;
        }
        let conf = plugin_conf(conflist, plugin, Some(result));
        let out = f.exec(&plugin_path(plugin), command, Some(container), &conf);
        assert!(
            out.success,
            "{command} of {} failed: {out:?}",
            plugin["type"]
        );
    }
}

fn plugin_conf(conflist: &Value, plugin: &Value, prev: Option<&Value>) -> Value {
    let mut conf = plugin.clone();
    conf["name"] = conflist["name"].clone();
    conf["cniVersion"] = conflist["cniVersion"].clone();
    if let Some(prev) = prev {
        conf["prevResult"] = prev.clone();
    }
    // Capabilities become runtimeConfig, as the runtime fills them in.
    if plugin["capabilities"]["portMappings"] == true {
        conf["runtimeConfig"] = json!({
            "portMappings": [{"hostPort": 18080, "containerPort": 80, "protocol": "tcp"}]
        });
    }
    conf
}

fn plugin_path(plugin: &Value) -> PathBuf {
    let ty = plugin["type"].as_str().expect("type");
    if ty == "skiff-cni" {
        skiff_tests::bin_path("skiff-cni")
    } else {
        Path::new(DEBIAN_CNI_DIR).join(ty)
    }
}

#[test]
#[ignore = "privileged: needs root (network namespaces)"]
fn chains_with_debian_tuning_and_portmap() {
    for plugin in ["tuning", "portmap"] {
        assert!(
            Path::new(DEBIAN_CNI_DIR).join(plugin).exists(),
            "{DEBIAN_CNI_DIR}/{plugin} missing: install containernetworking-plugins (cargo xtask setup)"
        );
    }
    let mut f = Fixture::new(6);
    let pod = f.pod("chain");
    for version in ["1.0.0", "0.4.0"] {
        let ifname = if version == "1.0.0" { "eth0" } else { "eth1" };
        let mut skiff = f.conf();
        skiff.as_object_mut().expect("object").remove("cniVersion");
        let conflist = json!({
            "cniVersion": version,
            "name": "skiff-test",
            "plugins": [
                skiff,
                {"type": "tuning", "sysctl": {"net.ipv4.conf.IFNAME.arp_ignore".replace("IFNAME", ifname): "1"}},
                {"type": "portmap", "capabilities": {"portMappings": true}, "snat": true},
            ],
        });
        let container = ("ctr-chain", pod.as_str(), ifname);
        let result = chain_add(&f, &conflist, container);
        assert_eq!(result["cniVersion"], version, "{result}");
        let ip = pod_ip(&result, ifname, &pod);
        if version == "0.4.0" {
            assert_eq!(
                result["ips"][0]["version"], "4",
                "0.4.0 results carry ip versions"
            );
        }
        // tuning set its sysctl on our interface inside the pod.
        let sysctl = Command::new("ip")
            .args(["netns", "exec", &pod, "cat"])
            .arg(format!("/proc/sys/net/ipv4/conf/{ifname}/arp_ignore"))
            .output()
            .expect("read sysctl");
        assert_eq!(
            String::from_utf8_lossy(&sysctl.stdout).trim(),
            "1",
            "tuning did not run"
        );
        // portmap installed a DNAT to our pod address in the node namespace.
        let rules = Command::new("ip")
            .args(["netns", "exec", &f.node, "iptables-save", "-t", "nat"])
            .output()
            .expect("iptables-save");
        let rules = String::from_utf8_lossy(&rules.stdout);
        assert!(
            rules.contains(&format!("--to-destination {ip}:80")),
            "portmap made no DNAT to {ip}:80:\n{rules}"
        );
        chain_other(&f, &conflist, "CHECK", container, &result);
        chain_other(&f, &conflist, "DEL", container, &result);
        assert!(!f.node_has_link(&host_veth("ctr-chain", ifname)));
        assert!(f.ip_files().is_empty(), "{:?}", f.ip_files());
        let rules = Command::new("ip")
            .args(["netns", "exec", &f.node, "iptables-save", "-t", "nat"])
            .output()
            .expect("iptables-save");
        assert!(
            !String::from_utf8_lossy(&rules.stdout).contains(&format!("{ip}:80")),
            "portmap DEL left its rule"
        );
    }
}
