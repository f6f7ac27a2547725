//! What a pod finds of the cluster's names, as the kubelet gives it: `/etc/resolv.conf` per
//! `dnsPolicy`, the managed `/etc/hosts` (the pod's own name and `hostAliases`), its hostname,
//! and the service environment variables. Pure: the pod worker writes the files and sets the
//! variables.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::Arc;

use k8s_openapi::api::core::v1::Pod;

use crate::services::objects::LbService;

/// The most nameservers a resolv.conf holds (glibc's `MAXNS`; the kubelet drops the rest).
pub const MAX_NAMESERVERS: usize = 3;
/// The most search domains the kubelet writes.
pub const MAX_SEARCHES: usize = 32;

/// The agent's DNS flags (the kubelet's `--cluster-dns`, `--cluster-domain`, `--resolv-conf`).
#[derive(Clone, Debug, clap::Args)]
pub struct DnsArgs {
    /// The cluster DNS server(s) pods with `dnsPolicy: ClusterFirst` use (default: the tenth
    /// address of `--service-cidr`, the `kube-dns` Service's).
    #[arg(long, value_delimiter = ',')]
    pub cluster_dns: Vec<Ipv4Addr>,
    /// The cluster's domain.
    #[arg(long, default_value = "cluster.local")]
    pub cluster_domain: String,
    /// The resolver configuration pods with `dnsPolicy: Default` get (and whose search domains
    /// `ClusterFirst` pods get after the cluster's).
    #[arg(long, default_value = "/etc/resolv.conf")]
    pub resolv_conf: std::path::PathBuf,
}

/// A resolver configuration: nameservers, search domains, options.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ResolvConf {
    /// `nameserver` lines.
    pub nameservers: Vec<String>,
    /// The `search` line's domains.
    pub searches: Vec<String>,
    /// The `options` line's options (`ndots:5`, `edns0`…).
    pub options: Vec<String>,
}

impl ResolvConf {
    /// Reads a resolv.conf file's text (the last `search`/`domain` line wins, as in glibc).
    pub fn parse(text: &str) -> ResolvConf {
        let mut conf = ResolvConf::default();
        for line in text.lines() {
            let line = line.split(['#', ';']).next().unwrap_or_default();
            let mut words = line.split_whitespace();
            match words.next() {
                Some("nameserver") => conf.nameservers.extend(words.next().map(str::to_owned)),
                Some("search") | Some("domain") => {
                    conf.searches = words.map(str::to_owned).collect();
                }
                Some("options") => conf.options.extend(words.map(str::to_owned)),
                _ => {}
            }
        }
        conf
    }

    /// The file's text.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if !self.searches.is_empty() {
            out.push_str(&format!("search {}\n", self.searches.join(" ")));
        }
        for ns in &self.nameservers {
            out.push_str(&format!("nameserver {ns}\n"));
        }
        if !self.options.is_empty() {
            out.push_str(&format!("options {}\n", self.options.join(" ")));
        }
        out
    }
}

/// The node's side of a pod's DNS: the cluster's servers and domain, and the node's own
/// resolver configuration.
#[derive(Clone, Debug, Default)]
pub struct NodeDns {
    /// The cluster DNS servers.
    pub cluster_dns: Vec<Ipv4Addr>,
    /// The cluster domain.
    pub domain: String,
    /// The node's resolv.conf.
    pub host: ResolvConf,
}

/// The pod's resolv.conf, as the kubelet writes it per `dnsPolicy` (`ClusterFirst` by
/// default; a host-network pod's `ClusterFirst` is `Default`), with `dnsConfig` merged in:
/// its nameservers and searches appended, its options replacing those of the same name.
pub fn resolv_conf(pod: &Pod, node: &NodeDns) -> ResolvConf {
    let spec = pod.spec.as_ref();
    let host_network = spec.and_then(|s| s.host_network) == Some(true);
    let policy = spec
        .and_then(|s| s.dns_policy.as_deref())
        .unwrap_or("ClusterFirst");
    let cluster = match policy {
        "ClusterFirstWithHostNet" => true,
        "ClusterFirst" => !host_network,
        _ => false,
    };
    let namespace = pod.metadata.namespace.as_deref().unwrap_or("default");
    let mut conf = match policy {
        "None" => ResolvConf::default(),
        _ if cluster && !node.cluster_dns.is_empty() => {
            let domain = &node.domain;
            let mut searches = vec![
                format!("{namespace}.svc.{domain}"),
                format!("svc.{domain}"),
                domain.clone(),
            ];
            searches.extend(node.host.searches.iter().cloned());
            ResolvConf {
                nameservers: node.cluster_dns.iter().map(Ipv4Addr::to_string).collect(),
                searches,
                options: vec!["ndots:5".to_owned()],
            }
        }
        _ => node.host.clone(),
    };
    if let Some(config) = spec.and_then(|s| s.dns_config.as_ref()) {
        conf.nameservers
            .extend(config.nameservers.iter().flatten().cloned());
        conf.searches
            .extend(config.searches.iter().flatten().cloned());
        for option in config.options.iter().flatten() {
            let Some(name) = option.name.as_deref() else {
                continue;
            };
            conf.options.retain(|o| o.split(':').next() != Some(name));
            conf.options.push(match &option.value {
                Some(value) => format!("{name}:{value}"),
                None => name.to_owned(),
            });
        }
    }
    let mut seen = std::collections::HashSet::new();
    conf.searches.retain(|s| seen.insert(s.clone()));
    conf.nameservers.truncate(MAX_NAMESERVERS);
    conf.searches.truncate(MAX_SEARCHES);
    conf
}

/// The pod's hostname (`spec.hostname`, else its name, at most 63 characters) and, with a
/// `subdomain`, its fully qualified name `<hostname>.<subdomain>.<ns>.svc.<domain>`.
pub fn hostname(pod: &Pod, domain: &str) -> (String, Option<String>) {
    let spec = pod.spec.as_ref();
    let mut host = spec
        .and_then(|s| s.hostname.clone())
        .filter(|h| !h.is_empty())
        .or_else(|| pod.metadata.name.clone())
        .unwrap_or_default();
    host.truncate(63);
    let host = host.trim_end_matches(['-', '.']).to_owned();
    let fqdn = spec
        .and_then(|s| s.subdomain.as_deref())
        .filter(|s| !s.is_empty())
        .map(|sub| {
            let namespace = pod.metadata.namespace.as_deref().unwrap_or("default");
            format!("{host}.{sub}.{namespace}.svc.{domain}")
        });
    (host, fqdn)
}

/// The pod's managed `/etc/hosts`, as the kubelet writes it: localhost, the pod's own address
/// with its names, then the `hostAliases`.
pub fn hosts_file(pod: &Pod, ip: Ipv4Addr, domain: &str) -> String {
    let mut out = String::from(
        "# Kubernetes-managed hosts file.\n\
         127.0.0.1\tlocalhost\n\
         ::1\tlocalhost ip6-localhost ip6-loopback\n\
         fe00::0\tip6-localnet\n\
         fe00::0\tip6-mcastprefix\n\
         fe00::1\tip6-allnodes\n\
         fe00::2\tip6-allrouters\n",
    );
    let (host, fqdn) = hostname(pod, domain);
    match fqdn {
        Some(fqdn) => out.push_str(&format!("{ip}\t{fqdn}\t{host}\n")),
        None => out.push_str(&format!("{ip}\t{host}\n")),
    }
    let aliases = pod
        .spec
        .as_ref()
        .and_then(|s| s.host_aliases.as_ref())
        .filter(|a| !a.is_empty());
    if let Some(aliases) = aliases {
        out.push_str("\n# Entries added by HostAliases.\n");
        for alias in aliases {
            let names = alias.hostnames.clone().unwrap_or_default();
            if !alias.ip.is_empty() && !names.is_empty() {
                out.push_str(&format!("{}\t{}\n", alias.ip, names.join("\t")));
            }
        }
    }
    out
}

/// The service environment variables of a pod, as the kubelet sets them: for every Service of
/// the pod's namespace with a ClusterIP (all of them unless `enableServiceLinks: false`) and
/// always `default/kubernetes`, `<NAME>_SERVICE_HOST`, `<NAME>_SERVICE_PORT`,
/// `<NAME>_SERVICE_PORT_<PORT>` per named port, and the Docker link variables (`<NAME>_PORT`,
/// `<NAME>_PORT_<port>_<PROTO>`, `…_PROTO`, `…_PORT`, `…_ADDR`). Sorted by name.
pub fn service_env(pod: &Pod, services: &[Arc<LbService>]) -> Vec<(String, String)> {
    let namespace = pod.metadata.namespace.as_deref().unwrap_or("default");
    let links = pod.spec.as_ref().and_then(|s| s.enable_service_links) != Some(false);
    let mut chosen: BTreeMap<String, &LbService> = BTreeMap::new();
    for service in services {
        let Some(spec) = &service.spec else {
            continue;
        };
        let ip = spec.cluster_ip.as_deref().unwrap_or_default();
        if ip.is_empty() || ip == "None" {
            continue;
        }
        let name = service.metadata.name.clone().unwrap_or_default();
        let ns = service.metadata.namespace.as_deref().unwrap_or_default();
        if ns == "default" && name == "kubernetes" {
            chosen.entry(name).or_insert(service);
        } else if ns == namespace && links {
            chosen.insert(name, service);
        }
    }
    let mut env = Vec::new();
    for (name, service) in chosen {
        let Some(spec) = &service.spec else {
            continue;
        };
        let ip = spec.cluster_ip.clone().unwrap_or_default();
        let prefix = variable(&name);
        let ports = spec.ports.as_deref().unwrap_or_default();
        env.push((format!("{prefix}_SERVICE_HOST"), ip.clone()));
        if let Some(first) = ports.first() {
            env.push((format!("{prefix}_SERVICE_PORT"), first.port.to_string()));
        }
        for port in ports {
            if let Some(port_name) = port.name.as_deref().filter(|n| !n.is_empty()) {
                env.push((
                    format!("{prefix}_SERVICE_PORT_{}", variable(port_name)),
                    port.port.to_string(),
                ));
            }
        }
        for (i, port) in ports.iter().enumerate() {
            let protocol = port.protocol.as_deref().unwrap_or("TCP");
            let url = format!("{}://{ip}:{}", protocol.to_ascii_lowercase(), port.port);
            if i == 0 {
                env.push((format!("{prefix}_PORT"), url.clone()));
            }
            let base = format!(
                "{prefix}_PORT_{}_{}",
                port.port,
                protocol.to_ascii_uppercase()
            );
            env.push((base.clone(), url));
            env.push((format!("{base}_PROTO"), protocol.to_ascii_lowercase()));
            env.push((format!("{base}_PORT"), port.port.to_string()));
            env.push((format!("{base}_ADDR"), ip.clone()));
        }
    }
    env.sort();
    env
}

/// A Service or port name as a variable name: upper case, `-` as `_`.
fn variable(name: &str) -> String {
    name.to_ascii_uppercase().replace('-', "_")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(spec: serde_json::Value) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": "web-0", "namespace": "shop"},
            "spec": spec,
        }))
        .expect("a pod")
    }

    fn node() -> NodeDns {
        NodeDns {
            cluster_dns: vec![Ipv4Addr::new(10, 96, 0, 10)],
            domain: "cluster.local".into(),
            host: ResolvConf::parse(
                "# the host's\nnameserver 192.0.2.53\nnameserver 192.0.2.54\nsearch example.com\noptions edns0\n",
            ),
        }
    }

    #[test]
    fn each_dns_policy_gets_the_kubelets_resolv_conf() {
        let containers = json!([{"name": "c", "image": "busybox"}]);
        let cases = [
            (
                json!({"containers": containers}),
                "search shop.svc.cluster.local svc.cluster.local cluster.local example.com\nnameserver 10.96.0.10\noptions ndots:5\n",
            ),
            (
                json!({"containers": containers, "dnsPolicy": "Default"}),
                "search example.com\nnameserver 192.0.2.53\nnameserver 192.0.2.54\noptions edns0\n",
            ),
            // A host-network pod's ClusterFirst is Default; ClusterFirstWithHostNet is not.
            (
                json!({"containers": containers, "hostNetwork": true}),
                "search example.com\nnameserver 192.0.2.53\nnameserver 192.0.2.54\noptions edns0\n",
            ),
            (
                json!({"containers": containers, "hostNetwork": true,
                       "dnsPolicy": "ClusterFirstWithHostNet"}),
                "search shop.svc.cluster.local svc.cluster.local cluster.local example.com\nnameserver 10.96.0.10\noptions ndots:5\n",
            ),
            (
                json!({"containers": containers, "dnsPolicy": "None",
                       "dnsConfig": {"nameservers": ["1.1.1.1"], "searches": ["a.example"],
                                     "options": [{"name": "ndots", "value": "2"}, {"name": "edns0"}]}}),
                "search a.example\nnameserver 1.1.1.1\noptions ndots:2 edns0\n",
            ),
            // dnsConfig merged into ClusterFirst: appended, options replaced by name.
            (
                json!({"containers": containers,
                       "dnsConfig": {"nameservers": ["1.1.1.1"], "searches": ["svc.cluster.local", "x.example"],
                                     "options": [{"name": "ndots", "value": "1"}]}}),
                "search shop.svc.cluster.local svc.cluster.local cluster.local example.com x.example\nnameserver 10.96.0.10\nnameserver 1.1.1.1\noptions ndots:1\n",
            ),
        ];
        for (spec, want) in cases {
            assert_eq!(
                resolv_conf(&pod(spec.clone()), &node()).render(),
                want,
                "{spec}"
            );
        }
    }

    #[test]
    fn the_hosts_file_names_the_pod_and_its_aliases() {
        let plain = pod(json!({"containers": []}));
        let text = hosts_file(&plain, Ipv4Addr::new(10, 244, 1, 5), "cluster.local");
        assert!(text.starts_with("# Kubernetes-managed hosts file.\n127.0.0.1\tlocalhost\n"));
        assert!(text.contains("\n10.244.1.5\tweb-0\n"), "{text}");
        let named = pod(
            json!({"containers": [], "hostname": "db", "subdomain": "cluster",
                               "hostAliases": [{"ip": "192.0.2.9", "hostnames": ["foo.local", "bar.local"]}]}),
        );
        let text = hosts_file(&named, Ipv4Addr::new(10, 244, 1, 5), "cluster.local");
        assert!(
            text.contains("\n10.244.1.5\tdb.cluster.shop.svc.cluster.local\tdb\n"),
            "{text}"
        );
        assert!(
            text.ends_with("\n# Entries added by HostAliases.\n192.0.2.9\tfoo.local\tbar.local\n"),
            "{text}"
        );
        assert_eq!(
            hostname(&named, "cluster.local"),
            (
                "db".to_owned(),
                Some("db.cluster.shop.svc.cluster.local".to_owned())
            )
        );
    }

    fn service(namespace: &str, name: &str, spec: serde_json::Value) -> Arc<LbService> {
        Arc::new(
            serde_json::from_value(json!({"metadata": {"namespace": namespace, "name": name},
                                          "spec": spec}))
            .expect("a Service"),
        )
    }

    #[test]
    fn service_links_are_the_kubelets_variables() {
        let services = vec![
            service(
                "default",
                "kubernetes",
                json!({"clusterIP": "10.96.0.1",
                "ports": [{"name": "https", "port": 443, "protocol": "TCP"}]}),
            ),
            service(
                "shop",
                "web-front",
                json!({"clusterIP": "10.96.0.20",
                "ports": [{"name": "http", "port": 80}, {"name": "dns-udp", "port": 53, "protocol": "UDP"}]}),
            ),
            service(
                "shop",
                "headless",
                json!({"clusterIP": "None", "ports": [{"port": 80}]}),
            ),
            service(
                "other",
                "elsewhere",
                json!({"clusterIP": "10.96.0.30", "ports": [{"port": 80}]}),
            ),
        ];
        let env = service_env(&pod(json!({"containers": []})), &services);
        let get = |name: &str| env.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str());
        assert_eq!(get("KUBERNETES_SERVICE_HOST"), Some("10.96.0.1"));
        assert_eq!(get("KUBERNETES_SERVICE_PORT"), Some("443"));
        assert_eq!(get("KUBERNETES_SERVICE_PORT_HTTPS"), Some("443"));
        assert_eq!(get("KUBERNETES_PORT"), Some("tcp://10.96.0.1:443"));
        assert_eq!(get("KUBERNETES_PORT_443_TCP_ADDR"), Some("10.96.0.1"));
        assert_eq!(get("WEB_FRONT_SERVICE_HOST"), Some("10.96.0.20"));
        assert_eq!(get("WEB_FRONT_SERVICE_PORT"), Some("80"));
        assert_eq!(get("WEB_FRONT_SERVICE_PORT_DNS_UDP"), Some("53"));
        assert_eq!(get("WEB_FRONT_PORT"), Some("tcp://10.96.0.20:80"));
        assert_eq!(get("WEB_FRONT_PORT_53_UDP"), Some("udp://10.96.0.20:53"));
        assert_eq!(get("WEB_FRONT_PORT_53_UDP_PROTO"), Some("udp"));
        assert_eq!(get("WEB_FRONT_PORT_53_UDP_PORT"), Some("53"));
        assert_eq!(get("WEB_FRONT_PORT_80_TCP_ADDR"), Some("10.96.0.20"));
        assert_eq!(
            get("HEADLESS_SERVICE_HOST"),
            None,
            "no ClusterIP, no variables"
        );
        assert_eq!(get("ELSEWHERE_SERVICE_HOST"), None, "another namespace");
        let off = service_env(
            &pod(json!({"containers": [], "enableServiceLinks": false})),
            &services,
        );
        assert!(
            off.iter().all(|(n, _)| n.starts_with("KUBERNETES_")),
            "{off:?}"
        );
        assert!(!off.is_empty(), "the API server's Service is always there");
    }
}
