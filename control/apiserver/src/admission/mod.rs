//! Admission: upstream's defaulting and validation of objects, and the
//! allocation of Service ClusterIPs and NodePorts, one module each
//! ([`defaulting`], [`validation`] with [`field`] errors, [`allocation`]).
//!
//! [`default_object`] fills the fields `k8s.io/kubernetes`'
//! `pkg/apis/*/v1/defaults.go`, the registry strategies and the default
//! admission plugins (ServiceAccount, Priority, DefaultTolerationSeconds)
//! fill, so that `kubectl get -o yaml` shows what a real cluster shows.
//!
//! [`validate`] checks the essentials of upstream's `validation.go` and
//! reports every problem as a [`Cause`] worded as upstream words it, e.g.
//! `spec.template.spec.containers[0].name: Invalid value: "Web": a lowercase
//! RFC 1123 label must consist of …`. Bad values print as upstream's
//! `field.Error` prints them: strings quoted, numbers bare, maps and lists as
//! JSON.
//!
//! [`ServiceAllocator`] hands out ClusterIPs and NodePorts. An allocated value
//! is an etcd side key (`/registry/ranges/serviceips/<ip>`,
//! `/registry/ranges/servicenodeports/<port>`) claimed in the same
//! transaction that writes the Service, so values never leak and are never
//! handed out twice, even across API server replicas.

use std::collections::{BTreeMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::ops::RangeInclusive;

use ipnetwork::IpNetwork;
use rand::Rng;
use serde_json::{Map, Value, json};
use skiff_common::quantity::{Quantity, QuantityError};
use skiff_common::validation::{
    is_dns1035_label, is_dns1123_label, is_dns1123_subdomain, is_label_value, is_qualified_name,
    lower_alnum, max_len_error, regex_error,
};

use crate::status::{ApiError, Cause};
use crate::storage::{StorageError, Store};
use skiff_common::registry::ResourceInfo;

/// The etcd prefix of claimed ClusterIPs.
pub const SERVICE_IP_PREFIX: &str = "/registry/ranges/serviceips/";
/// The etcd prefix of claimed NodePorts.
pub const NODE_PORT_PREFIX: &str = "/registry/ranges/servicenodeports/";

/// Upstream's limit on the total size of an object's annotations.
const TOTAL_ANNOTATION_SIZE_LIMIT: usize = 256 * 1024;
/// Upstream's limit on the total size of a Secret's or ConfigMap's data.
const MAX_SECRET_SIZE: usize = 1024 * 1024;

mod allocation;
mod defaulting;
mod field;
mod validation;

pub use allocation::{Allocation, ServiceAllocator};
pub use defaulting::default_object;
pub use validation::validate;

use defaulting::*;
use field::*;
use validation::*;

#[cfg(test)]
mod tests {
    use super::*;
    use skiff_common::registry::find_kind;

    pub(super) fn info(api_version: &str, kind: &str) -> &'static ResourceInfo {
        find_kind(api_version, kind).expect("kind is served")
    }

    pub(super) fn defaulted(api_version: &str, kind: &str, mut obj: Value) -> Value {
        default_object(info(api_version, kind), &mut obj);
        obj
    }

    #[test]
    fn bare_deployment_gets_upstream_defaults() {
        let deploy = defaulted(
            "apps/v1",
            "Deployment",
            json!({
                "apiVersion": "apps/v1", "kind": "Deployment",
                "metadata": {"name": "web", "namespace": "default"},
                "spec": {
                    "selector": {"matchLabels": {"app": "web"}},
                    "template": {
                        "metadata": {"labels": {"app": "web"}},
                        "spec": {"containers": [{"name": "nginx", "image": "nginx:1.27", "ports": [{"containerPort": 80}]}]}
                    }
                }
            }),
        );
        // What `kubectl get deploy web -o json` shows on a real cluster.
        let spec = &deploy["spec"];
        assert_eq!(spec["replicas"], 1);
        assert_eq!(spec["revisionHistoryLimit"], 10);
        assert_eq!(spec["progressDeadlineSeconds"], 600);
        assert_eq!(
            spec["strategy"],
            json!({"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": "25%", "maxSurge": "25%"}})
        );
        let pod = &spec["template"]["spec"];
        assert_eq!(pod["restartPolicy"], "Always");
        assert_eq!(pod["dnsPolicy"], "ClusterFirst");
        assert_eq!(pod["terminationGracePeriodSeconds"], 30);
        assert_eq!(pod["schedulerName"], "default-scheduler");
        assert_eq!(pod["securityContext"], json!({}));
        // Pod-only defaults stay off templates.
        assert!(pod.get("serviceAccountName").is_none(), "{pod}");
        assert!(pod.get("enableServiceLinks").is_none(), "{pod}");
        assert_eq!(
            pod["containers"][0],
            json!({
                "name": "nginx", "image": "nginx:1.27",
                "ports": [{"containerPort": 80, "protocol": "TCP"}],
                "imagePullPolicy": "IfNotPresent",
                "terminationMessagePath": "/dev/termination-log",
                "terminationMessagePolicy": "File",
            })
        );
        assert_eq!(deploy["status"], json!({}));
        // Defaulting twice changes nothing.
        assert_eq!(defaulted("apps/v1", "Deployment", deploy.clone()), deploy);
        assert!(validate(info("apps/v1", "Deployment"), &deploy, None).is_empty());
    }

    #[test]
    fn bare_pod_gets_upstream_and_admission_defaults() {
        let pod = defaulted(
            "v1",
            "Pod",
            json!({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": "p", "namespace": "default"},
                "spec": {"containers": [{
                    "name": "app", "image": "busybox",
                    "readinessProbe": {"httpGet": {"port": 8080}},
                    "resources": {"limits": {"cpu": "500m", "memory": "128Mi"}}
                }]}
            }),
        );
        let spec = &pod["spec"];
        assert_eq!(spec["serviceAccountName"], "default");
        assert_eq!(spec["serviceAccount"], "default");
        assert_eq!(spec["enableServiceLinks"], true);
        assert_eq!(spec["priority"], 0);
        assert_eq!(spec["preemptionPolicy"], "PreemptLowerPriority");
        assert_eq!(spec["restartPolicy"], "Always");
        assert_eq!(spec["tolerations"].as_array().map(Vec::len), Some(2));
        assert_eq!(
            spec["tolerations"][0]["key"],
            "node.kubernetes.io/not-ready"
        );
        assert_eq!(spec["tolerations"][1]["tolerationSeconds"], 300);
        let container = &spec["containers"][0];
        // No tag means `latest`, which is always pulled.
        assert_eq!(container["imagePullPolicy"], "Always");
        assert_eq!(
            container["readinessProbe"],
            json!({
                "httpGet": {"port": 8080, "path": "/", "scheme": "HTTP"},
                "timeoutSeconds": 1, "periodSeconds": 10, "successThreshold": 1, "failureThreshold": 3,
            })
        );
        // Requests default to limits, which makes the pod Guaranteed.
        assert_eq!(
            container["resources"]["requests"],
            json!({"cpu": "500m", "memory": "128Mi"})
        );
        assert_eq!(
            pod["status"],
            json!({"phase": "Pending", "qosClass": "Guaranteed"})
        );
        assert!(validate(info("v1", "Pod"), &pod, None).is_empty());
    }

    #[test]
    fn pull_policy_follows_the_tag() {
        for (image, policy) in [
            ("nginx", "Always"),
            ("nginx:latest", "Always"),
            ("nginx:1.27", "IfNotPresent"),
            ("registry:5000/team/app", "Always"),
            ("registry:5000/team/app:v2", "IfNotPresent"),
            ("nginx@sha256:0123", "IfNotPresent"),
        ] {
            let mut c = Map::new();
            c.insert("image".into(), json!(image));
            default_container(&mut c, false);
            assert_eq!(c["imagePullPolicy"], policy, "{image}");
        }
    }

    #[test]
    fn service_namespace_and_secret_defaults() {
        let svc = defaulted(
            "v1",
            "Service",
            json!({"metadata": {"name": "s", "namespace": "default"},
                   "spec": {"type": "NodePort", "ports": [{"port": 80}]}}),
        );
        assert_eq!(
            svc["spec"]["ports"][0],
            json!({"port": 80, "protocol": "TCP", "targetPort": 80})
        );
        assert_eq!(svc["spec"]["sessionAffinity"], "None");
        assert_eq!(svc["spec"]["externalTrafficPolicy"], "Cluster");
        assert_eq!(svc["spec"]["internalTrafficPolicy"], "Cluster");
        assert_eq!(svc["status"], json!({"loadBalancer": {}}));
        let plain = defaulted(
            "v1",
            "Service",
            json!({"metadata": {"name": "s"}, "spec": {"ports": [{"port": 80, "targetPort": "http"}]}}),
        );
        assert_eq!(plain["spec"]["type"], "ClusterIP");
        assert_eq!(plain["spec"]["ports"][0]["targetPort"], "http");
        assert!(plain["spec"].get("externalTrafficPolicy").is_none());

        let ns = defaulted("v1", "Namespace", json!({"metadata": {"name": "team"}}));
        assert_eq!(ns["spec"]["finalizers"], json!(["kubernetes"]));
        assert_eq!(ns["status"]["phase"], "Active");
        assert_eq!(
            ns["metadata"]["labels"]["kubernetes.io/metadata.name"],
            "team"
        );

        let secret = defaulted("v1", "Secret", json!({"metadata": {"name": "s"}}));
        assert_eq!(secret["type"], "Opaque");
    }

    fn causes(api_version: &str, kind: &str, obj: Value) -> Vec<(String, String, String)> {
        let obj = defaulted(api_version, kind, obj);
        validate(info(api_version, kind), &obj, None)
            .into_iter()
            .map(|c| (c.reason, c.field, c.message))
            .collect()
    }

    fn deployment(labels: Value, containers: Value) -> Value {
        json!({
            "metadata": {"name": "web", "namespace": "default"},
            "spec": {
                "selector": {"matchLabels": {"app": "web"}},
                "template": {"metadata": {"labels": labels}, "spec": {"containers": containers}}
            }
        })
    }

    #[test]
    fn invalid_objects_report_upstream_causes() {
        let label_msg = "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')";
        let subdomain_msg = "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')";
        /// (case, apiVersion, kind, object, expected (reason, field, message)).
        type Case = (
            &'static str,
            &'static str,
            &'static str,
            Value,
            Vec<(&'static str, &'static str, String)>,
        );
        let cases: Vec<Case> = vec![
            (
                "bad pod name, no containers",
                "v1", "Pod",
                json!({"metadata": {"name": "Foo", "namespace": "default"}, "spec": {}}),
                vec![
                    ("FieldValueInvalid", "metadata.name", format!("Invalid value: \"Foo\": {subdomain_msg}")),
                    ("FieldValueRequired", "spec.containers", "Required value".into()),
                ],
            ),
            (
                "missing name and namespace",
                "v1", "ConfigMap",
                json!({"metadata": {}}),
                vec![
                    ("FieldValueRequired", "metadata.name", "Required value: name or generateName is required".into()),
                    ("FieldValueRequired", "metadata.namespace", "Required value".into()),
                ],
            ),
            (
                "template container name, image, duplicate, enum",
                "apps/v1", "Deployment",
                deployment(json!({"app": "web"}), json!([
                    {"name": "Web", "image": "nginx"},
                    {"name": "side", "image": "", "imagePullPolicy": "Sometimes"},
                    {"name": "side", "image": "x", "ports": [{"containerPort": 70000}]}
                ])),
                vec![
                    ("FieldValueInvalid", "spec.template.spec.containers[0].name", format!("Invalid value: \"Web\": {label_msg}")),
                    ("FieldValueRequired", "spec.template.spec.containers[1].image", "Required value".into()),
                    ("FieldValueNotSupported", "spec.template.spec.containers[1].imagePullPolicy", "Unsupported value: \"Sometimes\": supported values: \"Always\", \"IfNotPresent\", \"Never\"".into()),
                    ("FieldValueDuplicate", "spec.template.spec.containers[2].name", "Duplicate value: \"side\"".into()),
                    ("FieldValueInvalid", "spec.template.spec.containers[2].ports[0].containerPort", "Invalid value: 70000: must be between 1 and 65535, inclusive".into()),
                ],
            ),
            (
                "selector does not match the template",
                "apps/v1", "Deployment",
                deployment(json!({"app": "api", "tier": "be"}), json!([{"name": "a", "image": "a"}])),
                vec![(
                    "FieldValueInvalid", "spec.template.metadata.labels",
                    "Invalid value: {\"app\":\"api\",\"tier\":\"be\"}: `selector` does not match template `labels`".into(),
                )],
            ),
            (
                "pod restart policy, requests above limits, bad quantity",
                "v1", "Pod",
                json!({"metadata": {"name": "p", "namespace": "default"}, "spec": {
                    "restartPolicy": "Sometimes",
                    "containers": [{"name": "a", "image": "a", "resources": {
                        "limits": {"cpu": "0.5", "memory": "lots"},
                        "requests": {"cpu": "1"}
                    }}]
                }}),
                vec![
                    ("FieldValueInvalid", "spec.containers[0].resources.limits[memory]", "Invalid value: \"lots\": quantities must match the regular expression '^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$'".into()),
                    ("FieldValueInvalid", "spec.containers[0].resources.requests", "Invalid value: \"1\": must be less than or equal to cpu limit of 500m".into()),
                    ("FieldValueNotSupported", "spec.restartPolicy", "Unsupported value: \"Sometimes\": supported values: \"Always\", \"OnFailure\", \"Never\"".into()),
                ],
            ),
            (
                "labels and annotations",
                "v1", "ConfigMap",
                json!({"metadata": {"name": "c", "namespace": "default",
                    "labels": {"bad key!": "ok", "good": "-bad-"},
                    "annotations": {"big": "x".repeat(TOTAL_ANNOTATION_SIZE_LIMIT)}},
                    "data": {"ok.key": "v", "bad/key": "v"}}),
                vec![
                    ("FieldValueInvalid", "metadata.labels", "Invalid value: \"bad key!\": name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (e.g. 'MyName',  or 'my.name',  or '123-abc', regex used for validation is '([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]')".into()),
                    ("FieldValueInvalid", "metadata.labels", "Invalid value: \"-bad-\": a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (e.g. 'MyValue',  or 'my_value',  or '12345', regex used for validation is '(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?')".into()),
                    ("FieldValueTooLong", "metadata.annotations", "Too long: must have at most 262144 bytes".into()),
                    ("FieldValueInvalid", "data[bad/key]", "Invalid value: \"bad/key\": a valid config key must consist of alphanumeric characters, '-', '_' or '.' (e.g. 'key.name',  or 'KEY_NAME',  or 'key-name', regex used for validation is '[-._a-zA-Z0-9]+')".into()),
                ],
            ),
            (
                "service ports and type",
                "v1", "Service",
                json!({"metadata": {"name": "1svc", "namespace": "default"}, "spec": {
                    "type": "Magic",
                    "ports": [{"port": 80}, {"name": "b", "port": 0}, {"name": "b", "port": 81}]
                }}),
                vec![
                    ("FieldValueInvalid", "metadata.name", "Invalid value: \"1svc\": a DNS-1035 label must consist of lower case alphanumeric characters or '-', start with an alphabetic character, and end with an alphanumeric character (e.g. 'my-name',  or 'abc-123', regex used for validation is '[a-z]([-a-z0-9]*[a-z0-9])?')".into()),
                    ("FieldValueNotSupported", "spec.type", "Unsupported value: \"Magic\": supported values: \"ClusterIP\", \"ExternalName\", \"LoadBalancer\", \"NodePort\"".into()),
                    ("FieldValueRequired", "spec.ports[0].name", "Required value".into()),
                    ("FieldValueInvalid", "spec.ports[1].port", "Invalid value: 0: must be between 1 and 65535, inclusive".into()),
                    (
                        "FieldValueInvalid",
                        "spec.ports[1].targetPort",
                        "Invalid value: 0: must be between 1 and 65535, inclusive".into(),
                    ),
                    ("FieldValueDuplicate", "spec.ports[2].name", "Duplicate value: \"b\"".into()),
                ],
            ),
            (
                "service without ports, external name",
                "v1", "Service",
                json!({"metadata": {"name": "s", "namespace": "default"}, "spec": {"type": "ExternalName", "externalName": "Bad_Name"}}),
                vec![("FieldValueInvalid", "spec.externalName", format!("Invalid value: \"Bad_Name\": {subdomain_msg}"))],
            ),
            (
                "deployment strategy and replicas",
                "apps/v1", "Deployment",
                {
                    let mut d = deployment(json!({"app": "web"}), json!([{"name": "a", "image": "a"}]));
                    d["spec"]["replicas"] = json!(-1);
                    d["spec"]["strategy"] = json!({"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": "0%"}});
                    d
                },
                vec![
                    ("FieldValueInvalid", "spec.replicas", "Invalid value: -1: must be greater than or equal to 0".into()),
                    ("FieldValueInvalid", "spec.strategy.rollingUpdate.maxUnavailable", "Invalid value: 0%: may not be 0 when `maxSurge` is 0".into()),
                ],
            ),
            (
                "empty selector",
                "apps/v1", "ReplicaSet",
                json!({"metadata": {"name": "r", "namespace": "default"}, "spec": {"selector": {},
                    "template": {"spec": {"containers": [{"name": "a", "image": "a"}]}}}}),
                vec![("FieldValueInvalid", "spec.selector", "Invalid value: {}: empty selector is invalid for replicaset".into())],
            ),
            (
                "event namespace",
                "v1", "Event",
                json!({"metadata": {"name": "e", "namespace": "default"}, "involvedObject": {"kind": "Pod", "namespace": "other"}}),
                vec![("FieldValueInvalid", "involvedObject.namespace", "Invalid value: \"other\": does not match event.namespace".into())],
            ),
            (
                "namespaces are labels and cluster-scoped",
                "v1", "Namespace",
                json!({"metadata": {"name": "a.b", "namespace": "x"}}),
                vec![
                    ("FieldValueInvalid", "metadata.name", "Invalid value: \"a.b\": must not contain dots".into()),
                    ("FieldValueForbidden", "metadata.namespace", "Forbidden: not allowed on this type".into()),
                ],
            ),
        ];
        for (name, api_version, kind, obj, expected) in cases {
            let got = causes(api_version, kind, obj);
            let expected: Vec<(String, String, String)> = expected
                .into_iter()
                .map(|(r, f, m)| (r.to_string(), f.to_string(), m))
                .collect();
            assert_eq!(got, expected, "case {name}");
        }
    }

    #[test]
    fn selectors_are_immutable_on_update() {
        let old = defaulted(
            "apps/v1",
            "Deployment",
            deployment(json!({"app": "web"}), json!([{"name": "a", "image": "a"}])),
        );
        let mut new = old.clone();
        new["spec"]["selector"] = json!({"matchLabels": {"app": "web", "v": "2"}});
        new["spec"]["template"]["metadata"]["labels"] = json!({"app": "web", "v": "2"});
        let got = validate(info("apps/v1", "Deployment"), &new, Some(&old));
        assert_eq!(
            got,
            vec![Cause::new(
                "FieldValueInvalid",
                "spec.selector",
                "Invalid value: {\"matchLabels\":{\"app\":\"web\",\"v\":\"2\"}}: field is immutable"
            )]
        );
        assert!(validate(info("apps/v1", "Deployment"), &old, Some(&old)).is_empty());
    }

    #[test]
    fn pod_spec_updates_are_limited() {
        let old = defaulted(
            "v1",
            "Pod",
            json!({"metadata": {"name": "p", "namespace": "d"}, "spec": {"containers": [{"name": "a", "image": "a:1"}]}}),
        );
        let mut image = old.clone();
        image["spec"]["containers"][0]["image"] = json!("a:2");
        image["spec"]["nodeName"] = json!("node-1");
        assert!(validate(info("v1", "Pod"), &image, Some(&old)).is_empty());
        let mut env = old.clone();
        env["spec"]["containers"][0]["env"] = json!([{"name": "X", "value": "1"}]);
        let got = validate(info("v1", "Pod"), &env, Some(&old));
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!(got[0].reason, "FieldValueForbidden");
        assert!(
            got[0]
                .message
                .starts_with("Forbidden: pod updates may not change fields other than")
        );
    }
}
