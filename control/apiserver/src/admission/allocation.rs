//! Service ClusterIP and NodePort allocation: etcd side keys claimed in
//! the Service's own transaction.

use super::*;

/// The side keys a Service write claims and releases, written in the same
/// etcd transaction as the Service.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Allocation {
    /// Keys to create; the write fails with [`StorageError::ClaimTaken`]
    /// when another writer holds one.
    pub claims: Vec<String>,
    /// Keys to delete.
    pub releases: Vec<String>,
}

/// Allocates ClusterIPs from the service CIDR and NodePorts from the node
/// port range, as upstream's `ipallocator` and `portallocator` do: values
/// are picked at random, first from the upper part of each range, keeping
/// the lower part for values asked for explicitly (upstream's static
/// subranges).
///
/// Allocation reads the claimed keys and picks a free value; the claim
/// itself happens in the Service's etcd write, guarded by
/// `create_revision == 0`. When two writers pick the same value the second
/// write fails with [`StorageError::ClaimTaken`]: the caller then calls
/// [`ServiceAllocator::allocate`] again on a fresh copy of the Service and
/// retries the write.
#[derive(Debug, Clone)]
pub struct ServiceAllocator {
    range: IpNetwork,
    node_ports: RangeInclusive<u16>,
}

/// Whether a Service of this type gets NodePorts.
pub(super) fn needs_node_ports(spec: &Value) -> bool {
    match str_at(spec, "/type") {
        "NodePort" => true,
        "LoadBalancer" => {
            spec.get("allocateLoadBalancerNodePorts")
                .and_then(Value::as_bool)
                != Some(false)
        }
        _ => false,
    }
}

pub(super) fn service_type(spec: &Value) -> &str {
    match str_at(spec, "/type") {
        "" => "ClusterIP",
        other => other,
    }
}

/// `clusterIPs`, or `[clusterIP]` when only that is set.
pub(super) fn cluster_ips(spec: &Value) -> Vec<String> {
    let ips: Vec<String> = array(spec.get("clusterIPs"))
        .iter()
        .filter_map(Value::as_str)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect();
    if !ips.is_empty() {
        return ips;
    }
    match str_at(spec, "/clusterIP") {
        "" => Vec::new(),
        ip => vec![ip.to_string()],
    }
}

/// The NodePorts a Service holds, including its health check port.
pub(super) fn held_node_ports(spec: &Value) -> Vec<u16> {
    let mut ports: Vec<u16> = array(spec.get("ports"))
        .iter()
        .filter_map(|p| p.get("nodePort").and_then(Value::as_u64))
        .filter_map(|p| u16::try_from(p).ok())
        .filter(|p| *p != 0)
        .collect();
    if let Some(hc) = spec
        .get("healthCheckNodePort")
        .and_then(Value::as_u64)
        .and_then(|p| u16::try_from(p).ok())
        .filter(|p| *p != 0)
    {
        ports.push(hc);
    }
    ports.sort_unstable();
    ports.dedup();
    ports
}

/// Where claimed side keys are looked up: etcd, or a set in tests.
pub(super) trait Claims {
    /// The claimed keys under `prefix`.
    async fn claimed(&self, prefix: &str) -> Result<Vec<String>, ApiError>;
}

impl Claims for Store {
    async fn claimed(&self, prefix: &str) -> Result<Vec<String>, ApiError> {
        self.keys(prefix).await.map_err(storage_error)
    }
}

/// Whether the side key `key` is held. Side keys hold the owner's key, not
/// JSON, so they are read as keys only.
pub(super) async fn is_claimed(store: &impl Claims, key: &str) -> Result<bool, ApiError> {
    let keys = store.claimed(key).await?;
    Ok(keys.iter().any(|k| k == key))
}

pub(super) fn port_range_full() -> ApiError {
    ApiError::internal("failed to allocate a nodePort: range is full")
}

pub(super) fn storage_error(err: StorageError) -> ApiError {
    match err {
        StorageError::Unavailable { .. } => ApiError::unavailable(err.to_string()),
        other => ApiError::internal(other.to_string()),
    }
}

impl ServiceAllocator {
    /// An allocator for ClusterIPs in `cluster_ip_range` (normalised to its
    /// network address) and NodePorts in `node_ports`.
    pub fn new(cluster_ip_range: IpNetwork, node_ports: RangeInclusive<u16>) -> ServiceAllocator {
        let range = IpNetwork::new(cluster_ip_range.network(), cluster_ip_range.prefix())
            .unwrap_or(cluster_ip_range);
        ServiceAllocator { range, node_ports }
    }

    /// The side key of a claimed ClusterIP.
    pub fn ip_key(ip: &IpAddr) -> String {
        format!("{SERVICE_IP_PREFIX}{ip}")
    }

    /// The side key of a claimed NodePort.
    pub fn port_key(port: u16) -> String {
        format!("{NODE_PORT_PREFIX}{port}")
    }

    /// The address family of the range, as `spec.ipFamilies` names it.
    fn family(&self) -> &'static str {
        match self.range {
            IpNetwork::V4(_) => "IPv4",
            IpNetwork::V6(_) => "IPv6",
        }
    }

    /// The offsets (from the network address) that may be handed out: the
    /// network address and, for IPv4, the broadcast address are not.
    fn ip_offsets(&self) -> (u128, u128) {
        match self.range {
            IpNetwork::V4(n) => {
                let size = 1u128 << (32 - u32::from(n.prefix()));
                if size <= 2 {
                    (0, size - 1)
                } else {
                    (1, size - 2)
                }
            }
            IpNetwork::V6(n) => {
                // Large IPv6 ranges are capped as upstream caps them.
                let host_bits = 128 - u32::from(n.prefix());
                let last = if host_bits > 16 {
                    1u128 << 16
                } else {
                    (1u128 << host_bits) - 1
                };
                (1.min(last), last)
            }
        }
    }

    fn ip_at(&self, offset: u128) -> IpAddr {
        match self.range {
            IpNetwork::V4(n) => IpAddr::V4(Ipv4Addr::from(
                u32::from(n.network()).wrapping_add(offset as u32),
            )),
            IpNetwork::V6(n) => {
                IpAddr::V6(Ipv6Addr::from(u128::from(n.network()).wrapping_add(offset)))
            }
        }
    }

    fn offset_of(&self, ip: &IpAddr) -> Option<u128> {
        match (self.range, ip) {
            (IpNetwork::V4(n), IpAddr::V4(ip)) if n.contains(*ip) => {
                Some(u128::from(u32::from(*ip) - u32::from(n.network())))
            }
            (IpNetwork::V6(n), IpAddr::V6(ip)) if n.contains(*ip) => {
                Some(u128::from(*ip) - u128::from(n.network()))
            }
            _ => None,
        }
    }

    /// Whether `ip` may be allocated at all (in the range, and neither the
    /// network nor the broadcast address).
    pub fn ip_in_range(&self, ip: &IpAddr) -> bool {
        let (first, last) = self.ip_offsets();
        self.offset_of(ip).is_some_and(|o| o >= first && o <= last)
    }

    /// Whether `port` is in the NodePort range.
    pub fn port_in_range(&self, port: i64) -> bool {
        u16::try_from(port).is_ok_and(|p| self.node_ports.contains(&p))
    }

    /// Pick a random free value in `first..=last`, trying the upper band
    /// (above `first + reserved`) first, then the whole range.
    fn pick(first: u128, last: u128, reserved: u128, taken: impl Fn(u128) -> bool) -> Option<u128> {
        if last < first {
            return None;
        }
        let mut rng = rand::rng();
        let split = (first + reserved).min(last);
        let bands = if split < last {
            vec![(split + 1, last), (first, last)]
        } else {
            vec![(first, last)]
        };
        for (lo, hi) in bands {
            let span = hi - lo + 1;
            let start = rng.random_range(0..span);
            // Probe from a random start; bounded so huge ranges stay cheap.
            let tries = span.min(1 << 20);
            for step in 0..tries {
                let candidate = lo + (start + step) % span;
                if !taken(candidate) {
                    return Some(candidate);
                }
            }
        }
        None
    }

    fn range_error(&self, ip: &str) -> String {
        format!(
            "failed to allocate IP {ip}: the provided IP ({ip}) is not in the valid range. The range of valid IPs is {}",
            self.range
        )
    }

    fn ports_text(&self) -> String {
        format!("{}-{}", self.node_ports.start(), self.node_ports.end())
    }

    /// On create (`old` is `None`) or update of a Service: fill
    /// `spec.clusterIP`/`clusterIPs` (unless headless or ExternalName),
    /// `spec.ipFamilies`/`ipFamilyPolicy`, and `nodePort`s (and a
    /// `healthCheckNodePort` for a LoadBalancer with
    /// `externalTrafficPolicy: Local`) for NodePort and LoadBalancer
    /// Services; check explicit values are in range and free. On update the
    /// ClusterIP is immutable except when changing to or from ExternalName,
    /// NodePorts are kept, a type change away from NodePort/LoadBalancer
    /// clears and releases the NodePorts, and a change to ExternalName
    /// releases the ClusterIP.
    ///
    /// Returns the side keys to claim and release in the Service's etcd
    /// write. If that write fails with [`StorageError::ClaimTaken`], another
    /// writer won a race for a value: allocate again and retry.
    pub async fn allocate(
        &self,
        store: &Store,
        svc: &mut Value,
        old: Option<&Value>,
    ) -> Result<Allocation, ApiError> {
        self.allocate_in(store, svc, old).await
    }

    async fn allocate_in(
        &self,
        store: &impl Claims,
        svc: &mut Value,
        old: Option<&Value>,
    ) -> Result<Allocation, ApiError> {
        let name = str_at(svc, "/metadata/name").to_string();
        let invalid_err = |causes: Vec<Cause>| ApiError::invalid("", "Service", &name, causes);
        let mut allocation = Allocation::default();
        let empty = json!({});
        let old_spec = old.and_then(|o| o.get("spec")).unwrap_or(&empty).clone();
        if !svc.get("spec").is_some_and(Value::is_object) {
            svc["spec"] = json!({});
        }
        let spec = svc["spec"]
            .as_object_mut()
            .expect("spec was just made an object");
        let spec_value = Value::Object(spec.clone());
        let kind = service_type(&spec_value).to_string();
        let old_kind = old.map(|_| service_type(&old_spec).to_string());
        let old_ips: Vec<String> = if old.is_some() {
            cluster_ips(&old_spec)
        } else {
            Vec::new()
        };

        // --- ClusterIPs ---
        if kind == "ExternalName" {
            for ip in old_ips.iter().filter_map(|ip| ip.parse::<IpAddr>().ok()) {
                allocation.releases.push(Self::ip_key(&ip));
            }
            // Upstream drops the IP fields when they were only carried over.
            if old.is_some() {
                if cluster_ips(&spec_value) == old_ips {
                    spec.remove("clusterIP");
                    spec.remove("clusterIPs");
                }
                if spec.get("ipFamilies") == old_spec.get("ipFamilies") {
                    spec.remove("ipFamilies");
                }
                if spec.get("ipFamilyPolicy") == old_spec.get("ipFamilyPolicy") {
                    spec.remove("ipFamilyPolicy");
                }
            }
        } else {
            let mut wanted = cluster_ips(&spec_value);
            let carried =
                old.is_some() && old_kind.as_deref() != Some("ExternalName") && !old_ips.is_empty();
            if carried {
                if wanted.is_empty() {
                    wanted = old_ips.clone();
                } else if wanted.first() != old_ips.first() {
                    return Err(invalid_err(vec![invalid(
                        "spec.clusterIPs[0]",
                        &show(&json!(wanted)),
                        "may not change once set",
                    )]));
                }
            }
            let family = self.family();
            for (i, requested) in array(spec.get("ipFamilies")).iter().enumerate() {
                if requested.as_str().is_some_and(|f| f != family) {
                    return Err(invalid_err(vec![invalid(
                        format!("spec.ipFamilies[{i}]"),
                        &show(requested),
                        "not configured on this cluster",
                    )]));
                }
            }
            let primary = wanted.first().cloned();
            let ip = match primary.as_deref() {
                Some("None") => "None".to_string(),
                Some(ip) if carried => ip.to_string(),
                Some(text) => {
                    let parsed: IpAddr = text.parse().map_err(|_| {
                        invalid_err(vec![invalid_str(
                            "spec.clusterIPs[0]",
                            text,
                            "must be a valid IP address (e.g. 10.9.8.7 or 2001:db8::ffff)",
                        )])
                    })?;
                    if !self.ip_in_range(&parsed) {
                        return Err(invalid_err(vec![invalid(
                            "spec.clusterIPs",
                            &show(&json!(wanted)),
                            &self.range_error(text),
                        )]));
                    }
                    let taken = is_claimed(store, &Self::ip_key(&parsed)).await?;
                    if taken {
                        return Err(invalid_err(vec![invalid(
                            "spec.clusterIPs",
                            &show(&json!(wanted)),
                            &format!(
                                "failed to allocate IP {text}: provided IP is already allocated"
                            ),
                        )]));
                    }
                    allocation.claims.push(Self::ip_key(&parsed));
                    parsed.to_string()
                }
                None => {
                    let claimed: HashSet<String> = store
                        .claimed(SERVICE_IP_PREFIX)
                        .await?
                        .into_iter()
                        .filter_map(|k| k.strip_prefix(SERVICE_IP_PREFIX).map(str::to_string))
                        .collect();
                    let (first, last) = self.ip_offsets();
                    let size = last - first + 1;
                    let reserved = (size / 16).clamp(16, 256).min(size);
                    let offset = Self::pick(first, last, reserved, |o| {
                        claimed.contains(&self.ip_at(o).to_string())
                    })
                    .ok_or_else(|| {
                        ApiError::internal(format!(
                            "failed to allocate a serviceIP: range is full ({})",
                            self.range
                        ))
                    })?;
                    let ip = self.ip_at(offset);
                    allocation.claims.push(Self::ip_key(&ip));
                    ip.to_string()
                }
            };
            spec.insert("clusterIP".into(), json!(ip));
            spec.insert("clusterIPs".into(), json!([ip]));
            if spec
                .get("ipFamilies")
                .is_none_or(|f| f.as_array().is_none_or(Vec::is_empty))
            {
                spec.insert("ipFamilies".into(), json!([family]));
            }
            set_default(spec, "ipFamilyPolicy", json!("SingleStack"));
        }

        // --- NodePorts ---
        let old_ports = held_node_ports(&old_spec);
        let spec_value = Value::Object(spec.clone());
        let mut kept: Vec<u16> = Vec::new();
        if needs_node_ports(&spec_value) {
            let mut claimed_cache: Option<HashSet<u16>> = None;
            let mut used_here: HashSet<u16> = HashSet::new();
            let old_port_list = array(old_spec.get("ports")).to_vec();
            let ports = spec
                .get_mut("ports")
                .and_then(Value::as_array_mut)
                .map(std::mem::take)
                .unwrap_or_default();
            let mut new_ports = Vec::with_capacity(ports.len());
            let mut errors = Vec::new();
            for (i, mut port) in ports.into_iter().enumerate() {
                let mut node_port = port.get("nodePort").and_then(Value::as_i64).unwrap_or(0);
                if node_port == 0 && old.is_some() {
                    // Keep the port the same entry had before.
                    let same = |p: &Value| {
                        p.get("port") == port.get("port")
                            && p.get("protocol") == port.get("protocol")
                    };
                    let by_name = |p: &Value| {
                        !str_at(&port, "/name").is_empty() && p.get("name") == port.get("name")
                    };
                    node_port = old_port_list
                        .iter()
                        .find(|p| same(p))
                        .or_else(|| old_port_list.iter().find(|p| by_name(p)))
                        .and_then(|p| p.get("nodePort").and_then(Value::as_i64))
                        .unwrap_or(0);
                }
                let field = format!("spec.ports[{i}].nodePort");
                if node_port != 0 {
                    let Ok(number) = u16::try_from(node_port) else {
                        errors.push(invalid(&field, &node_port.to_string(), &format!("provided port is not in the valid range. The range of valid ports is {}", self.ports_text())));
                        new_ports.push(port);
                        continue;
                    };
                    if old_ports.contains(&number) || used_here.contains(&number) {
                        // Held by this Service already.
                    } else if !self.port_in_range(node_port) {
                        errors.push(invalid(&field, &node_port.to_string(), &format!("provided port is not in the valid range. The range of valid ports is {}", self.ports_text())));
                    } else {
                        let taken = is_claimed(store, &Self::port_key(number)).await?;
                        if taken {
                            errors.push(invalid(
                                &field,
                                &node_port.to_string(),
                                "provided port is already allocated",
                            ));
                        } else {
                            allocation.claims.push(Self::port_key(number));
                        }
                    }
                    used_here.insert(number);
                    kept.push(number);
                } else {
                    let claimed = match &claimed_cache {
                        Some(c) => c,
                        None => {
                            let keys = store.claimed(NODE_PORT_PREFIX).await?;
                            let set = keys
                                .iter()
                                .filter_map(|k| k.strip_prefix(NODE_PORT_PREFIX))
                                .filter_map(|p| p.parse().ok())
                                .collect();
                            claimed_cache.insert(set)
                        }
                    };
                    let number = self
                        .pick_port(|p| claimed.contains(&p) || used_here.contains(&p))
                        .ok_or_else(port_range_full)?;
                    allocation.claims.push(Self::port_key(number));
                    used_here.insert(number);
                    kept.push(number);
                    node_port = i64::from(number);
                }
                if let Some(map) = port.as_object_mut() {
                    map.insert("nodePort".into(), json!(node_port));
                }
                new_ports.push(port);
            }
            spec.insert("ports".into(), Value::Array(new_ports));
            // A LoadBalancer keeping traffic node-local gets a health check port.
            let local = str_at(&spec_value, "/type") == "LoadBalancer"
                && str_at(&spec_value, "/externalTrafficPolicy") == "Local";
            if local {
                let mut hc = spec
                    .get("healthCheckNodePort")
                    .and_then(Value::as_i64)
                    .unwrap_or(0);
                if hc == 0 {
                    hc = old_spec
                        .get("healthCheckNodePort")
                        .and_then(Value::as_i64)
                        .unwrap_or(0);
                }
                if hc == 0 {
                    let keys = store.claimed(NODE_PORT_PREFIX).await?;
                    let claimed: HashSet<u16> = keys
                        .iter()
                        .filter_map(|k| k.strip_prefix(NODE_PORT_PREFIX))
                        .filter_map(|p| p.parse().ok())
                        .collect();
                    let number = self
                        .pick_port(|p| claimed.contains(&p) || used_here.contains(&p))
                        .ok_or_else(port_range_full)?;
                    allocation.claims.push(Self::port_key(number));
                    kept.push(number);
                    hc = i64::from(number);
                } else if let Ok(number) = u16::try_from(hc) {
                    if !old_ports.contains(&number) && !used_here.contains(&number) {
                        if !self.port_in_range(hc) {
                            errors.push(invalid("spec.healthCheckNodePort", &hc.to_string(), &format!("provided port is not in the valid range. The range of valid ports is {}", self.ports_text())));
                        } else if is_claimed(store, &Self::port_key(number)).await? {
                            errors.push(invalid(
                                "spec.healthCheckNodePort",
                                &hc.to_string(),
                                "provided port is already allocated",
                            ));
                        } else {
                            allocation.claims.push(Self::port_key(number));
                        }
                    }
                    kept.push(number);
                }
                spec.insert("healthCheckNodePort".into(), json!(hc));
            }
            if !errors.is_empty() {
                return Err(invalid_err(errors));
            }
        } else {
            // Upstream clears NodePorts that were only carried over when the
            // type no longer uses them.
            let old_list = array(old_spec.get("ports")).to_vec();
            for port in array_mut(spec, "ports") {
                let Some(map) = port.as_object_mut() else {
                    continue;
                };
                let node_port = map.get("nodePort").and_then(Value::as_i64).unwrap_or(0);
                let carried = node_port == 0
                    || old_list
                        .iter()
                        .any(|p| p.get("nodePort").and_then(Value::as_i64) == Some(node_port));
                if carried {
                    map.remove("nodePort");
                }
            }
            if spec
                .get("healthCheckNodePort")
                .is_some_and(|h| Some(h) == old_spec.get("healthCheckNodePort"))
            {
                spec.remove("healthCheckNodePort");
            }
            // Anything left (an explicit nodePort on ClusterIP) is rejected
            // by validation; nothing is claimed for it.
        }
        for port in old_ports {
            if !kept.contains(&port) {
                allocation.releases.push(Self::port_key(port));
            }
        }
        Ok(allocation)
    }

    fn pick_port(&self, taken: impl Fn(u16) -> bool) -> Option<u16> {
        let first = u128::from(*self.node_ports.start());
        let last = u128::from(*self.node_ports.end());
        let size = last.saturating_sub(first) + 1;
        let reserved = (size / 32).clamp(16, 128).min(size);
        Self::pick(first, last, reserved, |p| taken(p as u16)).map(|p| p as u16)
    }

    /// The side keys to release when `svc` is deleted: its ClusterIPs and
    /// NodePorts.
    pub fn releases_for(&self, svc: &Value) -> Vec<String> {
        let empty = json!({});
        let spec = svc.get("spec").unwrap_or(&empty);
        let mut keys: Vec<String> = cluster_ips(spec)
            .iter()
            .filter_map(|ip| ip.parse::<IpAddr>().ok())
            .map(|ip| Self::ip_key(&ip))
            .collect();
        keys.extend(held_node_ports(spec).into_iter().map(Self::port_key));
        keys
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{defaulted, info};
    use super::*;

    /// Claimed keys held in memory, standing in for etcd.
    impl Claims for HashSet<String> {
        async fn claimed(&self, prefix: &str) -> Result<Vec<String>, ApiError> {
            Ok(self
                .iter()
                .filter(|k| k.starts_with(prefix))
                .cloned()
                .collect())
        }
    }

    fn allocator() -> ServiceAllocator {
        ServiceAllocator::new("10.96.0.0/12".parse().expect("cidr"), 30000..=32767)
    }

    fn run<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime")
            .block_on(f)
    }

    #[test]
    fn protobuf_zero_values_are_unset() {
        // What `kubectl create deployment` sends as protobuf, decoded.
        let deploy = defaulted(
            "apps/v1",
            "Deployment",
            json!({
                "apiVersion": "apps/v1", "kind": "Deployment",
                "metadata": {"name": "dd", "namespace": "default", "generation": 0},
                "spec": {
                    "selector": {"matchLabels": {"app": "dd"}},
                    "template": {
                        "metadata": {"labels": {"app": "dd"}, "generation": 0, "resourceVersion": "",
                            "uid": "", "annotations": {"a": "b"}},
                        "spec": {"containers": [{"name": "nginx", "image": "nginx"}]}
                    }
                }
            }),
        );
        assert_eq!(
            deploy["spec"]["template"]["metadata"],
            json!({"labels": {"app": "dd"}, "annotations": {"a": "b"}})
        );
        // Every template location is cleaned, whatever the kind.
        let mut cron = json!({"spec": {"jobTemplate": {"metadata": {"generation": 0},
            "spec": {"template": {"metadata": {"uid": "x", "labels": {"a": "b"}}}}}}});
        drop_template_server_metadata(&mut cron);
        assert_eq!(cron["spec"]["jobTemplate"]["metadata"], json!({}));
        assert_eq!(
            cron["spec"]["jobTemplate"]["spec"]["template"]["metadata"],
            json!({"labels": {"a": "b"}})
        );

        // What `kubectl create service nodeport np --tcp=80:8080` sends.
        let mut svc = defaulted(
            "v1",
            "Service",
            json!({
                "apiVersion": "v1", "kind": "Service",
                "metadata": {"name": "np", "namespace": "default"},
                "spec": {"type": "NodePort", "healthCheckNodePort": 0,
                    "ports": [{"name": "80-8080", "port": 80, "targetPort": 8080, "nodePort": 0}],
                    "selector": {"app": "np"}}
            }),
        );
        assert!(svc["spec"].get("healthCheckNodePort").is_none(), "{svc:#}");
        let claims = HashSet::new();
        let allocation = run(allocator().allocate_in(&claims, &mut svc, None)).expect("allocates");
        assert!(svc["spec"].get("healthCheckNodePort").is_none(), "{svc:#}");
        let node_port = svc["spec"]["ports"][0]["nodePort"]
            .as_u64()
            .expect("a node port was allocated");
        assert!((30000..=32767).contains(&node_port), "{svc:#}");
        assert_eq!(
            allocation.claims.len(),
            2,
            "one cluster IP and one node port"
        );
        assert!(validate(info("v1", "Service"), &svc, None).is_empty());
    }

    #[test]
    fn ranges_exclude_network_and_broadcast() {
        let a = allocator();
        assert!(a.ip_in_range(&"10.96.0.1".parse().expect("ip")));
        assert!(a.ip_in_range(&"10.111.255.254".parse().expect("ip")));
        assert!(!a.ip_in_range(&"10.96.0.0".parse().expect("ip")));
        assert!(!a.ip_in_range(&"10.111.255.255".parse().expect("ip")));
        assert!(!a.ip_in_range(&"10.112.0.1".parse().expect("ip")));
        assert!(!a.ip_in_range(&"fd00::1".parse().expect("ip")));
        assert!(a.port_in_range(30000) && a.port_in_range(32767));
        assert!(!a.port_in_range(80) && !a.port_in_range(70000));
        // The configured range prints as a network.
        let b = ServiceAllocator::new("10.96.0.7/12".parse().expect("cidr"), 30000..=32767);
        assert_eq!(b.range.to_string(), "10.96.0.0/12");
    }

    #[test]
    fn random_picks_prefer_the_upper_band_and_find_the_last_free_value() {
        let mut seen = HashSet::new();
        for _ in 0..50 {
            let v = ServiceAllocator::pick(1, 1000, 62, |_| false).expect("free");
            assert!((64..=1000).contains(&v), "{v}");
            seen.insert(v);
        }
        assert!(seen.len() > 10, "picks are random: {seen:?}");
        assert_eq!(ServiceAllocator::pick(1, 1000, 62, |v| v != 7), Some(7));
        assert_eq!(ServiceAllocator::pick(1, 1000, 62, |_| true), None);
    }

    #[test]
    fn explicit_values_out_of_range_are_invalid() {
        let a = allocator();
        let claims = HashSet::new();
        let mut svc = json!({"metadata": {"name": "s"}, "spec": {"clusterIP": "1.2.3.4", "ports": [{"port": 80}]}});
        let err = run(a.allocate_in(&claims, &mut svc, None)).expect_err("out of range");
        assert_eq!(err.code, 422);
        assert_eq!(
            err.message,
            "Service \"s\" is invalid: spec.clusterIPs: Invalid value: [\"1.2.3.4\"]: failed to allocate IP 1.2.3.4: the provided IP (1.2.3.4) is not in the valid range. The range of valid IPs is 10.96.0.0/12"
        );
        let mut svc = json!({"metadata": {"name": "s"}, "spec": {"type": "NodePort", "ports": [{"port": 80, "nodePort": 80}]}});
        let err = run(a.allocate_in(&claims, &mut svc, None)).expect_err("out of range");
        assert_eq!(
            err.message,
            "Service \"s\" is invalid: spec.ports[0].nodePort: Invalid value: 80: provided port is not in the valid range. The range of valid ports is 30000-32767"
        );
        assert_eq!(err.details.causes[0].field, "spec.ports[0].nodePort");
        let taken: HashSet<String> =
            [ServiceAllocator::ip_key(&"10.96.0.10".parse().expect("ip"))].into();
        let mut svc = json!({"metadata": {"name": "s"}, "spec": {"clusterIP": "10.96.0.10", "ports": [{"port": 53}]}});
        let err = run(a.allocate_in(&taken, &mut svc, None)).expect_err("taken");
        assert!(
            err.message
                .ends_with("failed to allocate IP 10.96.0.10: provided IP is already allocated"),
            "{}",
            err.message
        );
    }

    #[test]
    fn type_changes_keep_or_release_values() {
        let a = allocator();
        let claims = HashSet::new();
        let mut svc = json!({"metadata": {"name": "s"}, "spec": {"type": "NodePort", "ports": [{"port": 80, "protocol": "TCP"}]}});
        let created = run(a.allocate_in(&claims, &mut svc, None)).expect("allocates");
        let ip = svc["spec"]["clusterIP"].as_str().expect("ip").to_string();
        let node_port = svc["spec"]["ports"][0]["nodePort"]
            .as_u64()
            .expect("nodePort") as u16;
        assert!((30000..=32767).contains(&node_port));
        assert_eq!(svc["spec"]["clusterIPs"], json!([ip]));
        assert_eq!(svc["spec"]["ipFamilies"], json!(["IPv4"]));
        assert_eq!(svc["spec"]["ipFamilyPolicy"], "SingleStack");
        let ip_key = format!("{SERVICE_IP_PREFIX}{ip}");
        let port_key = format!("{NODE_PORT_PREFIX}{node_port}");
        assert_eq!(created.claims, vec![ip_key.clone(), port_key.clone()]);
        assert_eq!(a.releases_for(&svc), vec![ip_key.clone(), port_key.clone()]);

        // An update that leaves the values out keeps them.
        let old = svc.clone();
        let mut same = json!({"metadata": {"name": "s"}, "spec": {"type": "NodePort", "ports": [{"port": 80, "protocol": "TCP"}]}});
        let kept = run(a.allocate_in(&claims, &mut same, Some(&old))).expect("keeps");
        assert_eq!(kept, Allocation::default());
        assert_eq!(same["spec"]["clusterIP"], ip.as_str());
        assert_eq!(same["spec"]["ports"][0]["nodePort"], node_port);

        // To ClusterIP: the IP stays, the nodePort goes.
        let mut cluster = old.clone();
        cluster["spec"]["type"] = json!("ClusterIP");
        let changed = run(a.allocate_in(&claims, &mut cluster, Some(&old))).expect("to ClusterIP");
        assert_eq!(
            changed,
            Allocation {
                claims: vec![],
                releases: vec![port_key.clone()]
            }
        );
        assert!(cluster["spec"]["ports"][0].get("nodePort").is_none());
        assert_eq!(cluster["spec"]["clusterIP"], ip.as_str());

        // To ExternalName: the IP goes too.
        let mut external = old.clone();
        external["spec"]["type"] = json!("ExternalName");
        external["spec"]["externalName"] = json!("example.com");
        let changed =
            run(a.allocate_in(&claims, &mut external, Some(&old))).expect("to ExternalName");
        assert_eq!(changed.releases, vec![ip_key, port_key]);
        assert!(external["spec"].get("clusterIP").is_none());
        assert!(external["spec"].get("ipFamilies").is_none());

        // The ClusterIP may not change.
        let mut moved = old.clone();
        moved["spec"]["clusterIP"] = json!("10.96.0.99");
        moved["spec"]["clusterIPs"] = json!(["10.96.0.99"]);
        let err = run(a.allocate_in(&claims, &mut moved, Some(&old))).expect_err("immutable");
        assert_eq!(
            err.message,
            "Service \"s\" is invalid: spec.clusterIPs[0]: Invalid value: [\"10.96.0.99\"]: may not change once set"
        );

        // Headless services get no IP and claim nothing.
        let mut headless = json!({"metadata": {"name": "h"}, "spec": {"clusterIP": "None"}});
        let none = run(a.allocate_in(&claims, &mut headless, None)).expect("headless");
        assert_eq!(none, Allocation::default());
        assert_eq!(headless["spec"]["clusterIPs"], json!(["None"]));
        assert!(a.releases_for(&headless).is_empty());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn allocations_against_real_etcd() {
        let etcd = crate::testing::Etcd::start();
        let store = crate::testing::store(&etcd).await;
        let allocator = std::sync::Arc::new(allocator());

        // Three concurrent creates, each retrying when it loses a race.
        let mut tasks = Vec::new();
        for i in 0..3 {
            let (store, allocator) = (store.clone(), allocator.clone());
            tasks.push(tokio::spawn(async move {
                let kind = if i == 0 { "NodePort" } else { "ClusterIP" };
                let key = format!("/registry/core/services/default/svc{i}");
                loop {
                    let mut svc = json!({"metadata": {"name": format!("svc{i}"), "namespace": "default"},
                        "spec": {"type": kind, "ports": [{"port": 80, "protocol": "TCP"}]}});
                    let allocation = allocator.allocate(&store, &mut svc, None).await.expect("allocates");
                    match store.create(&key, &svc, &allocation.claims).await {
                        Ok(_) => return svc,
                        Err(StorageError::ClaimTaken { .. }) => continue,
                        Err(e) => panic!("create svc{i}: {e}"),
                    }
                }
            }));
        }
        let mut ips = HashSet::new();
        let mut services = Vec::new();
        for task in tasks {
            let svc = task.await.expect("task finishes");
            let ip: IpAddr = svc["spec"]["clusterIP"]
                .as_str()
                .expect("ip")
                .parse()
                .expect("an ip");
            assert!(allocator.ip_in_range(&ip), "{ip}");
            ips.insert(ip);
            services.push(svc);
        }
        assert_eq!(ips.len(), 3, "distinct IPs: {ips:?}");
        let node_port = services[0]["spec"]["ports"][0]["nodePort"]
            .as_i64()
            .expect("nodePort");
        assert!((30000..=32767).contains(&node_port), "{node_port}");
        let claimed = store.keys(SERVICE_IP_PREFIX).await.expect("keys");
        assert_eq!(claimed.len(), 3, "{claimed:?}");
        assert_eq!(store.keys(NODE_PORT_PREFIX).await.expect("keys").len(), 1);

        // An explicitly requested IP that is claimed already is a 422.
        let taken = services[1]["spec"]["clusterIP"]
            .as_str()
            .expect("ip")
            .to_string();
        let mut svc = json!({"metadata": {"name": "dup", "namespace": "default"},
            "spec": {"clusterIP": taken, "ports": [{"port": 80}]}});
        let err = allocator
            .allocate(&store, &mut svc, None)
            .await
            .expect_err("already allocated");
        assert_eq!(err.code, 422);
        assert_eq!(
            err.message,
            format!(
                "Service \"dup\" is invalid: spec.clusterIPs: Invalid value: [\"{taken}\"]: failed to allocate IP {taken}: provided IP is already allocated"
            )
        );
        // So is an explicit nodePort held by another Service.
        let mut svc = json!({"metadata": {"name": "dup", "namespace": "default"},
            "spec": {"type": "NodePort", "ports": [{"port": 80, "nodePort": node_port}]}});
        let err = allocator
            .allocate(&store, &mut svc, None)
            .await
            .expect_err("port taken");
        assert!(err.message.ends_with(&format!("spec.ports[0].nodePort: Invalid value: {node_port}: provided port is already allocated")), "{}", err.message);

        // Deleting releases everything the Service held.
        let key = "/registry/core/services/default/svc0";
        let stored = store.get(key).await.expect("get").expect("svc0 stored");
        store
            .delete(key, stored.revision, &allocator.releases_for(&stored.value))
            .await
            .expect("delete");
        assert_eq!(store.keys(SERVICE_IP_PREFIX).await.expect("keys").len(), 2);
        assert!(store.keys(NODE_PORT_PREFIX).await.expect("keys").is_empty());
        drop(etcd);
    }
}
