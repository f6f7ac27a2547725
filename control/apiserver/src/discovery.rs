//! API discovery documents, derived from the table of served kinds in
//! [`crate::registry`]: `/version`, the legacy `/api`, `/apis`,
//! `/api/v1` and `/apis/<group>/<version>` documents, and aggregated
//! discovery (`apidiscovery.k8s.io/v2`) that client-go asks for first.
//!
//! Every function returns the JSON body; routing and content negotiation
//! headers are the caller's job (see [`wants_aggregated`] and
//! [`AGGREGATED_CONTENT_TYPE`]).

use base64::Engine as _;
use k8s_openapi::apimachinery::pkg::apis::meta::v1 as meta;
use k8s_openapi::apimachinery::pkg::version::Info;
use kube_core::discovery::v2 as disco;
use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};

use skiff_common::registry::{self, ResourceInfo, Subresource};

/// The Content-Type of an aggregated discovery answer, which client-go
/// reads to pick the aggregated parser.
pub const AGGREGATED_CONTENT_TYPE: &str =
    "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList";

/// The Kubernetes minor version skiff speaks.
const KUBE_MINOR: &str = "37";

/// Verbs of every served kind.
const KIND_VERBS: &[&str] = &[
    "create",
    "delete",
    "deletecollection",
    "get",
    "list",
    "patch",
    "update",
    "watch",
];

/// Verbs of the `status` and `scale` subresources.
const GET_PATCH_UPDATE: &[&str] = &["get", "patch", "update"];

/// Verbs of the `binding` subresource.
const CREATE: &[&str] = &["create"];

fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| (*s).to_string()).collect()
}

fn to_value<T: serde::Serialize>(value: &T) -> Value {
    // Serializing plain k8s-openapi / kube-core structs into a Value cannot
    // fail: they hold only strings, bools, lists and maps with string keys.
    serde_json::to_value(value).unwrap_or(Value::Null)
}

/// How a subresource of `info` is described in discovery: its verbs and
/// the group, version and kind it answers with (`None` group/version: the
/// parent's own).
struct SubresourceShape {
    verbs: &'static [&'static str],
    group: Option<&'static str>,
    version: Option<&'static str>,
    kind: &'static str,
}

fn subresource_shape(info: &ResourceInfo, sub: Subresource) -> SubresourceShape {
    match sub {
        Subresource::Status => SubresourceShape {
            verbs: GET_PATCH_UPDATE,
            group: None,
            version: None,
            kind: info.kind,
        },
        Subresource::Scale => SubresourceShape {
            verbs: GET_PATCH_UPDATE,
            group: Some("autoscaling"),
            version: Some("v1"),
            kind: "Scale",
        },
        Subresource::Binding => SubresourceShape {
            verbs: CREATE,
            group: Some(""),
            version: Some("v1"),
            kind: "Binding",
        },
        Subresource::Token => SubresourceShape {
            verbs: CREATE,
            group: Some("authentication.k8s.io"),
            version: Some("v1"),
            kind: "TokenRequest",
        },
    }
}

/// The platform string as Go spells it, e.g. `linux/amd64`.
fn platform() -> String {
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" => "ppc64le",
        other => other,
    };
    format!("{}/{arch}", std::env::consts::OS)
}

/// `/version`: the server's version.Info, claiming Kubernetes 1.37 so that
/// kubectl's version skew checks pass.
pub fn version() -> Value {
    let info = Info {
        major: "1".to_string(),
        minor: KUBE_MINOR.to_string(),
        emulation_major: Some("1".to_string()),
        emulation_minor: Some(KUBE_MINOR.to_string()),
        min_compatibility_major: Some("1".to_string()),
        min_compatibility_minor: Some("36".to_string()),
        git_version: format!("v1.{KUBE_MINOR}.0-skiff.{}", env!("CARGO_PKG_VERSION")),
        git_commit: String::new(),
        git_tree_state: String::new(),
        build_date: "1970-01-01T00:00:00Z".to_string(),
        go_version: String::new(),
        compiler: "rustc".to_string(),
        platform: platform(),
    };
    to_value(&info)
}

fn server_addresses(server_addr: &str) -> Vec<meta::ServerAddressByClientCIDR> {
    vec![meta::ServerAddressByClientCIDR {
        client_cidr: "0.0.0.0/0".to_string(),
        server_address: server_addr.to_string(),
    }]
}

/// `/api`: the APIVersions of the core group.
pub fn api_versions(server_addr: &str) -> Value {
    to_value(&meta::APIVersions {
        versions: vec!["v1".to_string()],
        server_address_by_client_cidrs: server_addresses(server_addr),
    })
}

fn group_value(group: &str, versions: &[&str]) -> meta::APIGroup {
    let for_discovery = |v: &&str| meta::GroupVersionForDiscovery {
        group_version: format!("{group}/{v}"),
        version: (*v).to_string(),
    };
    meta::APIGroup {
        name: group.to_string(),
        preferred_version: versions.first().map(for_discovery),
        server_address_by_client_cidrs: None,
        versions: versions.iter().map(for_discovery).collect(),
    }
}

/// `/apis`: the APIGroupList of every named group.
pub fn api_group_list() -> Value {
    let groups = registry::groups()
        .iter()
        .map(|(g, versions)| group_value(g, versions))
        .collect();
    to_value(&meta::APIGroupList { groups })
}

/// `/apis/<group>`: the APIGroup, or `None` if the group is not served.
pub fn api_group(group: &str) -> Option<Value> {
    registry::groups()
        .iter()
        .find(|(g, _)| *g == group)
        .map(|(g, versions)| to_value(&group_value(g, versions)))
}

/// Upstream's storage version hash: the first 8 bytes of the SHA-256 of
/// `group/version/kind`, base64.
fn storage_version_hash(info: &ResourceInfo) -> String {
    let digest = Sha256::digest(format!("{}/{}/{}", info.group, info.version, info.kind));
    base64::engine::general_purpose::STANDARD.encode(&digest[..8])
}

fn non_empty(items: &[&str]) -> Option<Vec<String>> {
    (!items.is_empty()).then(|| strings(items))
}

/// `/api/v1` or `/apis/<group>/<version>`: the APIResourceList of the
/// group-version, with one entry per kind and per subresource; `None` if
/// nothing is served there.
pub fn resource_list(group: &str, version: &str) -> Option<Value> {
    let infos: Vec<_> = registry::in_group_version(group, version).collect();
    if infos.is_empty() {
        return None;
    }
    let mut resources = Vec::new();
    for info in infos {
        resources.push(meta::APIResource {
            name: info.plural.to_string(),
            singular_name: info.singular.to_string(),
            namespaced: info.namespaced,
            kind: info.kind.to_string(),
            verbs: strings(KIND_VERBS),
            short_names: non_empty(info.short_names),
            categories: non_empty(info.categories),
            storage_version_hash: Some(storage_version_hash(info)),
            group: None,
            version: None,
        });
        for sub in info.subresources {
            let shape = subresource_shape(info, *sub);
            resources.push(meta::APIResource {
                name: format!("{}/{}", info.plural, sub.name()),
                singular_name: String::new(),
                namespaced: info.namespaced,
                kind: shape.kind.to_string(),
                verbs: strings(shape.verbs),
                short_names: None,
                categories: None,
                storage_version_hash: None,
                group: shape.group.map(str::to_string),
                version: shape.version.map(str::to_string),
            });
        }
    }
    let group_version = if group.is_empty() {
        version.to_string()
    } else {
        format!("{group}/{version}")
    };
    Some(to_value(&meta::APIResourceList {
        group_version,
        resources,
    }))
}

fn gvk(group: &str, version: &str, kind: &str) -> disco::GroupVersionKind {
    disco::GroupVersionKind {
        group: Some(group.to_string()),
        version: Some(version.to_string()),
        kind: Some(kind.to_string()),
    }
}

fn resource_discovery(info: &ResourceInfo) -> disco::APIResourceDiscovery {
    let subresources = info
        .subresources
        .iter()
        .map(|sub| {
            let shape = subresource_shape(info, *sub);
            disco::APISubresourceDiscovery {
                subresource: Some(sub.name().to_string()),
                response_kind: Some(gvk(
                    shape.group.unwrap_or(""),
                    shape.version.unwrap_or(""),
                    shape.kind,
                )),
                accepted_types: Vec::new(),
                verbs: strings(shape.verbs),
            }
        })
        .collect();
    disco::APIResourceDiscovery {
        resource: Some(info.plural.to_string()),
        // Upstream leaves group and version empty: the kind lives in the
        // group-version being described.
        response_kind: Some(gvk("", "", info.kind)),
        scope: Some(
            if info.namespaced {
                "Namespaced"
            } else {
                "Cluster"
            }
            .to_string(),
        ),
        singular_resource: Some(info.singular.to_string()),
        verbs: strings(KIND_VERBS),
        short_names: strings(info.short_names),
        categories: strings(info.categories),
        subresources,
    }
}

fn group_discovery(group: &str, versions: &[&str]) -> disco::APIGroupDiscovery {
    disco::APIGroupDiscovery {
        metadata: Some(meta::ObjectMeta {
            name: Some(group.to_string()),
            ..Default::default()
        }),
        versions: versions
            .iter()
            .map(|v| disco::APIVersionDiscovery {
                version: Some((*v).to_string()),
                resources: registry::in_group_version(group, v)
                    .map(resource_discovery)
                    .collect(),
                freshness: Some("Current".to_string()),
            })
            .collect(),
    }
}

/// Aggregated discovery: an `apidiscovery.k8s.io/v2` APIGroupDiscoveryList
/// of the core group (`core` true, for `/api`) or of every named group
/// (for `/apis`).
pub fn aggregated(core: bool) -> Value {
    let items: Vec<_> = if core {
        vec![group_discovery("", &["v1"])]
    } else {
        registry::groups()
            .iter()
            .map(|(g, versions)| group_discovery(g, versions))
            .collect()
    };
    json!({
        "kind": "APIGroupDiscoveryList",
        "apiVersion": "apidiscovery.k8s.io/v2",
        "metadata": {},
        "items": to_value(&items),
    })
}

/// One media range of an Accept header: type/subtype, its parameters
/// (lowercased names) and its quality.
struct MediaRange<'a> {
    essence: String,
    params: Vec<(String, &'a str)>,
    quality: f32,
}

fn parse_accept(accept: &str) -> Vec<MediaRange<'_>> {
    accept
        .split(',')
        .filter_map(|clause| {
            let mut parts = clause.split(';').map(str::trim);
            let essence = parts.next().filter(|e| !e.is_empty())?.to_ascii_lowercase();
            let mut params = Vec::new();
            let mut quality = 1.0;
            for part in parts {
                let Some((name, value)) = part.split_once('=') else {
                    continue;
                };
                let name = name.trim().to_ascii_lowercase();
                let value = value.trim().trim_matches('"');
                if name == "q" {
                    quality = value.parse().unwrap_or(0.0);
                } else {
                    params.push((name, value));
                }
            }
            Some(MediaRange {
                essence,
                params,
                quality,
            })
        })
        .collect()
}

impl MediaRange<'_> {
    fn param(&self, name: &str) -> Option<&str> {
        self.params.iter().find(|(n, _)| n == name).map(|(_, v)| *v)
    }

    fn is_aggregated_v2(&self) -> bool {
        self.essence == "application/json"
            && self.param("g") == Some("apidiscovery.k8s.io")
            && self.param("v") == Some("v2")
            && self.param("as") == Some("APIGroupDiscoveryList")
    }

    /// Whether this range accepts the legacy plain JSON documents.
    fn is_plain_json(&self) -> bool {
        matches!(
            self.essence.as_str(),
            "application/json" | "application/*" | "*/*"
        ) && self.param("as").is_none()
    }
}

/// Whether an Accept header asks for aggregated discovery v2 ahead of the
/// legacy documents: the most preferred range we can serve (by quality,
/// then order) is the `apidiscovery.k8s.io/v2` APIGroupDiscoveryList one.
pub fn wants_aggregated(accept: &str) -> bool {
    let mut ranges: Vec<_> = parse_accept(accept)
        .into_iter()
        .filter(|r| r.quality > 0.0 && (r.is_aggregated_v2() || r.is_plain_json()))
        .collect();
    // A stable sort keeps header order among equal qualities.
    ranges.sort_by(|a, b| b.quality.total_cmp(&a.quality));
    ranges.first().is_some_and(MediaRange::is_aggregated_v2)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resource<'a>(list: &'a Value, name: &str) -> &'a Value {
        list["resources"]
            .as_array()
            .expect("resources is a list")
            .iter()
            .find(|r| r["name"] == name)
            .unwrap_or_else(|| panic!("{name} listed in {list}"))
    }

    #[test]
    fn apps_v1_lists_deployments_with_short_names_and_scale() {
        let list = resource_list("apps", "v1").expect("apps/v1 served");
        assert_eq!(list["kind"], "APIResourceList");
        assert_eq!(list["apiVersion"], "v1");
        assert_eq!(list["groupVersion"], "apps/v1");
        let deploy = resource(&list, "deployments");
        assert_eq!(deploy["singularName"], "deployment");
        assert_eq!(deploy["namespaced"], true);
        assert_eq!(deploy["kind"], "Deployment");
        assert_eq!(deploy["shortNames"], json!(["deploy"]));
        assert_eq!(deploy["categories"], json!(["all"]));
        assert_eq!(deploy["verbs"], json!(KIND_VERBS));
        // Upstream's value for apps/v1 Deployment.
        assert_eq!(deploy["storageVersionHash"], "8aSe+NMegvE=");
        let scale = resource(&list, "deployments/scale");
        assert_eq!(scale["group"], "autoscaling");
        assert_eq!(scale["version"], "v1");
        assert_eq!(scale["kind"], "Scale");
        assert_eq!(scale["verbs"], json!(["get", "patch", "update"]));
        let status = resource(&list, "deployments/status");
        assert_eq!(status["kind"], "Deployment");
        assert!(status.get("group").is_none());
    }

    #[test]
    fn core_v1_has_pod_binding_and_cluster_scoped_namespaces() {
        let list = resource_list("", "v1").expect("core v1 served");
        assert_eq!(list["groupVersion"], "v1");
        let binding = resource(&list, "pods/binding");
        assert_eq!(binding["verbs"], json!(["create"]));
        assert_eq!(binding["kind"], "Binding");
        let ns = resource(&list, "namespaces");
        assert_eq!(ns["namespaced"], false);
        assert_eq!(ns["shortNames"], json!(["ns"]));
        assert!(resource(&list, "secrets").get("shortNames").is_none());
        assert!(resource_list("apps", "v2").is_none());
        assert!(resource_list("batch", "v1").is_none());
    }

    #[test]
    fn groups_and_versions_follow_the_registry() {
        let list = api_group_list();
        assert_eq!(list["kind"], "APIGroupList");
        let names: Vec<_> = list["groups"]
            .as_array()
            .expect("groups")
            .iter()
            .map(|g| g["name"].as_str().expect("name").to_string())
            .collect();
        let expected: Vec<_> = registry::groups()
            .iter()
            .map(|(g, _)| g.to_string())
            .collect();
        assert_eq!(names, expected);
        let apps = api_group("apps").expect("apps served");
        assert_eq!(apps["kind"], "APIGroup");
        assert_eq!(apps["preferredVersion"]["groupVersion"], "apps/v1");
        assert!(api_group("batch").is_none());
        let versions = api_versions("10.0.0.1:6443");
        assert_eq!(versions["kind"], "APIVersions");
        assert_eq!(versions["versions"], json!(["v1"]));
        assert_eq!(
            versions["serverAddressByClientCIDRs"][0]["serverAddress"],
            "10.0.0.1:6443"
        );
    }

    #[test]
    fn aggregated_lists_apps_with_scale_subresource() {
        let all = aggregated(false);
        assert_eq!(all["kind"], "APIGroupDiscoveryList");
        assert_eq!(all["apiVersion"], "apidiscovery.k8s.io/v2");
        let apps = all["items"]
            .as_array()
            .expect("items")
            .iter()
            .find(|g| g["metadata"]["name"] == "apps")
            .expect("apps group listed");
        let v1 = &apps["versions"][0];
        assert_eq!(v1["version"], "v1");
        assert_eq!(v1["freshness"], "Current");
        let deploy = v1["resources"]
            .as_array()
            .expect("resources")
            .iter()
            .find(|r| r["resource"] == "deployments")
            .expect("deployments listed");
        assert_eq!(deploy["scope"], "Namespaced");
        assert_eq!(deploy["responseKind"]["kind"], "Deployment");
        assert_eq!(deploy["shortNames"], json!(["deploy"]));
        let scale = deploy["subresources"]
            .as_array()
            .expect("subresources")
            .iter()
            .find(|s| s["subresource"] == "scale")
            .expect("scale listed");
        assert_eq!(
            scale["responseKind"],
            json!({"group": "autoscaling", "version": "v1", "kind": "Scale"})
        );

        let core = aggregated(true);
        let items = core["items"].as_array().expect("items");
        assert_eq!(items.len(), 1);
        assert_eq!(items[0]["metadata"]["name"], "");
        let pods = items[0]["versions"][0]["resources"]
            .as_array()
            .expect("resources")
            .iter()
            .find(|r| r["resource"] == "pods")
            .expect("pods listed");
        assert_eq!(pods["categories"], json!(["all"]));
    }

    #[test]
    fn accept_negotiation_matches_client_go() {
        assert!(wants_aggregated(
            "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList,application/json"
        ));
        assert!(wants_aggregated(
            kube_core::discovery::v2::ACCEPT_AGGREGATED_DISCOVERY_V2
        ));
        assert!(!wants_aggregated("application/json"));
        assert!(!wants_aggregated(""));
        assert!(!wants_aggregated(
            "application/json;g=apidiscovery.k8s.io;v=v2beta1;as=APIGroupDiscoveryList,application/json"
        ));
        assert!(!wants_aggregated(
            "application/json;q=1,application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList;q=0.9"
        ));
    }

    #[test]
    fn version_claims_kubernetes_1_37() {
        let v = version();
        assert_eq!(v["major"], "1");
        assert_eq!(v["minor"], "37");
        let git = v["gitVersion"].as_str().expect("gitVersion");
        assert!(git.starts_with("v1.37.0-skiff."), "{git}");
        assert!(v["platform"].as_str().expect("platform").contains('/'));
    }
}
