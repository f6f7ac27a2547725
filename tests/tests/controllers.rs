//! Issue 3 end to end: the endpoints, service-account, namespace,
//! garbage-collection and LoadBalancer-IP controllers of `skiff-control all`,
//! driven with real kubectl.
//!
//! The tests share one `skiff-control all --lb-ip-pool 192.0.2.0/28`, each in
//! its own namespace.

use std::sync::{Arc, Mutex, Weak};

use serde_json::Value;
use skiff_tests::{ApiServer, kubectl_path};

static SERVER: Mutex<Weak<ApiServer>> = Mutex::new(Weak::new());

fn server() -> Arc<ApiServer> {
    let mut slot = SERVER.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(server) = slot.upgrade() {
        return server;
    }
    let server = Arc::new(ApiServer::start_all(&["--lb-ip-pool", "192.0.2.0/28"]));
    *slot = Arc::downgrade(&server);
    server
}

fn namespace(server: &ApiServer, name: &str) {
    server.kubectl_ok(&["create", "namespace", name]);
}

/// The object as JSON, or `None` when kubectl fails (e.g. NotFound).
fn get(server: &ApiServer, args: &[&str]) -> Option<Value> {
    let mut all = vec!["get"];
    all.extend_from_slice(args);
    all.extend(["-o", "json"]);
    let out = server.kubectl(&all);
    if !out.status.success() {
        return None;
    }
    Some(serde_json::from_slice(&out.stdout).expect("kubectl printed JSON"))
}

fn not_found(server: &ApiServer, args: &[&str]) -> bool {
    let mut all = vec!["get"];
    all.extend_from_slice(args);
    let out = server.kubectl(&all);
    !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("NotFound")
}

const WEB: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: ep}
spec:
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: http}]
---
apiVersion: v1
kind: Pod
metadata: {name: ready, namespace: ep, labels: {app: web}}
spec: {containers: [{name: c, image: nginx, ports: [{name: http, containerPort: 8080}]}]}
---
apiVersion: v1
kind: Pod
metadata: {name: unready, namespace: ep, labels: {app: web}}
spec: {containers: [{name: c, image: nginx, ports: [{name: http, containerPort: 8080}]}]}
---
apiVersion: v1
kind: Pod
metadata: {name: other, namespace: ep, labels: {app: db}}
spec: {containers: [{name: c, image: nginx, ports: [{name: http, containerPort: 5432}]}]}
"#;

fn set_pod_status(server: &ApiServer, name: &str, ip: &str, ready: bool) {
    let patch = serde_json::json!({"status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}],
        "conditions": [{"type": "Ready", "status": if ready {"True"} else {"False"}}]}});
    server.kubectl_ok(&[
        "-n",
        "ep",
        "patch",
        "pod",
        name,
        "--subresource=status",
        "--type=merge",
        "-p",
        &patch.to_string(),
    ]);
}

fn ips(list: Option<&Value>) -> Vec<String> {
    let mut ips: Vec<String> = list
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|a| a["ip"].as_str().map(str::to_string))
        .collect();
    ips.sort();
    ips
}

#[test]
fn services_get_endpoints_and_slices_split_by_readiness() {
    let server = server();
    namespace(&server, "ep");
    server.kubectl_stdin_ok(&["apply", "-f", "-"], WEB);
    set_pod_status(&server, "ready", "10.244.1.10", true);
    set_pod_status(&server, "unready", "10.244.1.11", false);
    set_pod_status(&server, "other", "10.244.1.12", true);

    let subset = server.wait_for("endpoints with one ready and one unready address", || {
        let endpoints = get(&server, &["-n", "ep", "endpoints", "web"])?;
        let subset = endpoints.pointer("/subsets/0")?.clone();
        (ips(subset.get("addresses")) == ["10.244.1.10"]
            && ips(subset.get("notReadyAddresses")) == ["10.244.1.11"])
        .then_some(subset)
    });
    assert_eq!(
        subset["ports"][0]["port"], 8080,
        "named targetPort resolved: {subset}"
    );
    assert_eq!(subset["ports"][0]["name"], "http");

    let service_uid =
        get(&server, &["-n", "ep", "service", "web"]).expect("service")["metadata"]["uid"].clone();
    let slice = server.wait_for("an endpoint slice with both pods", || {
        let slices = get(
            &server,
            &[
                "-n",
                "ep",
                "endpointslices",
                "-l",
                "kubernetes.io/service-name=web",
            ],
        )?;
        let slice = slices.pointer("/items/0")?.clone();
        (slice["endpoints"].as_array().map(Vec::len) == Some(2)).then_some(slice)
    });
    assert_eq!(slice["addressType"], "IPv4");
    assert_eq!(
        slice["metadata"]["labels"]["endpointslice.kubernetes.io/managed-by"],
        "endpointslice-controller.k8s.io"
    );
    assert_eq!(slice["metadata"]["ownerReferences"][0]["uid"], service_uid);
    assert_eq!(slice["ports"][0]["port"], 8080);
    let endpoints = slice["endpoints"].as_array().expect("endpoints");
    let by_ip = |ip: &str| {
        endpoints
            .iter()
            .find(|e| e["addresses"][0] == ip)
            .unwrap_or_else(|| panic!("no endpoint {ip} in {slice}"))
    };
    assert_eq!(by_ip("10.244.1.10")["conditions"]["ready"], true);
    assert_eq!(by_ip("10.244.1.10")["targetRef"]["name"], "ready");
    assert_eq!(by_ip("10.244.1.11")["conditions"]["ready"], false);
    assert_eq!(by_ip("10.244.1.11")["conditions"]["serving"], false);

    // Readiness changes move the address.
    set_pod_status(&server, "unready", "10.244.1.11", true);
    server.wait_for("both addresses ready", || {
        let endpoints = get(&server, &["-n", "ep", "endpoints", "web"])?;
        let subset = endpoints.pointer("/subsets/0")?;
        (ips(subset.get("addresses")) == ["10.244.1.10", "10.244.1.11"]
            && subset.get("notReadyAddresses").is_none())
        .then_some(())
    });
}

#[test]
fn new_namespaces_get_a_default_service_account() {
    let server = server();
    namespace(&server, "sa-default");
    server.wait_for("the default service account", || {
        get(&server, &["-n", "sa-default", "serviceaccount", "default"])
    });
    // Recreated when deleted.
    server.kubectl_ok(&["-n", "sa-default", "delete", "serviceaccount", "default"]);
    server.wait_for("the default service account again", || {
        get(&server, &["-n", "sa-default", "serviceaccount", "default"])
    });
}

#[test]
fn service_account_tokens_authenticate() {
    let server = server();
    namespace(&server, "tok");
    server.kubectl_ok(&["-n", "tok", "create", "serviceaccount", "builder"]);
    server.kubectl_stdin_ok(
        &["apply", "-f", "-"],
        "apiVersion: v1\nkind: Secret\nmetadata:\n  name: builder-token\n  namespace: tok\n  annotations:\n    kubernetes.io/service-account.name: builder\ntype: kubernetes.io/service-account-token\n",
    );
    let token = server.wait_for("the token secret to be filled", || {
        let out = server.kubectl(&[
            "-n",
            "tok",
            "get",
            "secret",
            "builder-token",
            "-o",
            "go-template={{if .data.token}}{{.data.token | base64decode}}{{end}}",
        ]);
        let token = String::from_utf8(out.stdout).expect("utf-8 token");
        (out.status.success() && !token.is_empty()).then_some(token)
    });
    assert_eq!(token.split('.').count(), 3, "a JWT: {token}");

    // A kubeconfig with only the CA and a token: no client certificate.
    let ca = server.data_dir().join("pki").join("ca.crt");
    let with_token = |token: &str| {
        let path = server
            .dir()
            .join(format!("token-{}.kubeconfig", token.len()));
        let config = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: {}\n    certificate-authority: {}\nusers:\n- name: u\n  user:\n    token: {token}\ncontexts:\n- name: x\n  context: {{cluster: c, user: u}}\ncurrent-context: x\n",
            server.url(),
            ca.display()
        );
        std::fs::write(&path, config).expect("write kubeconfig");
        std::process::Command::new(kubectl_path())
            .arg("--kubeconfig")
            .arg(&path)
            .arg("--cache-dir")
            .arg(server.dir().join("token-cache"))
            .args(["-n", "tok", "get", "serviceaccounts", "-o", "name"])
            .env("KUBERC", "off")
            .output()
            .expect("run kubectl")
    };
    let out = with_token(&token);
    assert!(
        out.status.success(),
        "the service-account token is refused: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        server.log_excerpt()
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("serviceaccount/builder"));
    let mut forged = token.clone();
    forged.truncate(token.len() - 4);
    forged.push_str("AAAA");
    let out = with_token(&forged);
    assert!(!out.status.success(), "a forged token was accepted");
    assert!(String::from_utf8_lossy(&out.stderr).contains("Unauthorized"));

    // The account deleted: its token Secret goes too.
    server.kubectl_ok(&["-n", "tok", "delete", "serviceaccount", "builder"]);
    server.wait_for("the token secret to be deleted", || {
        not_found(&server, &["-n", "tok", "secret", "builder-token"]).then_some(())
    });
}

/// `kubectl create token` (the TokenRequest API), the cluster CA published in every namespace,
/// and the ServiceAccount admission plugin's projected volume on pods.
#[test]
fn token_requests_root_ca_and_the_service_account_volume() {
    let server = server();
    namespace(&server, "treq");
    // kube-root-ca.crt holds the API server's CA.
    let ca = std::fs::read_to_string(server.data_dir().join("pki").join("ca.crt")).expect("the CA");
    let published = server.wait_for("kube-root-ca.crt", || {
        get(&server, &["-n", "treq", "configmap", "kube-root-ca.crt"])
    });
    assert_eq!(published["data"]["ca.crt"].as_str(), Some(ca.as_str()));
    // Put back when changed.
    server.kubectl_ok(&[
        "-n",
        "treq",
        "create",
        "configmap",
        "kube-root-ca.crt",
        "--from-literal=ca.crt=x",
        "--dry-run=client",
        "-o",
        "yaml",
    ]);
    server.kubectl_ok(&["-n", "treq", "delete", "configmap", "kube-root-ca.crt"]);
    server.wait_for("kube-root-ca.crt again", || {
        get(&server, &["-n", "treq", "configmap", "kube-root-ca.crt"])
            .filter(|m| m["data"]["ca.crt"].as_str() == Some(ca.as_str()))
    });

    // TokenRequest: a JWT for the account, expiring when asked, that authenticates.
    server.wait_for("the default service account", || {
        get(&server, &["-n", "treq", "serviceaccount", "default"])
    });
    let token = server
        .kubectl_ok(&["-n", "treq", "create", "token", "default", "--duration=15m"])
        .trim()
        .to_owned();
    assert_eq!(token.split('.').count(), 3, "a JWT: {token}");
    let out = std::process::Command::new("curl")
        .args(["-s", "--cacert"])
        .arg(server.data_dir().join("pki").join("ca.crt"))
        .args(["-H", &format!("Authorization: Bearer {token}")])
        .arg(format!(
            "{}/api/v1/namespaces/treq/serviceaccounts",
            server.url()
        ))
        .output()
        .expect("curl runs");
    let body = String::from_utf8_lossy(&out.stdout);
    assert!(
        body.contains("\"ServiceAccountList\""),
        "the requested token lists: {body}"
    );
    let short = server.kubectl(&["-n", "treq", "create", "token", "default", "--duration=1m"]);
    assert!(
        !short.status.success(),
        "a token under 10 minutes is refused"
    );
    let missing = server.kubectl(&["-n", "treq", "create", "token", "nobody"]);
    assert!(
        String::from_utf8_lossy(&missing.stderr).contains("not found"),
        "{}",
        String::from_utf8_lossy(&missing.stderr)
    );

    // Pods get the projected volume, mounted in every container, unless they (or their account)
    // opt out.
    server.kubectl_stdin_ok(
        &["apply", "-f", "-"],
        "apiVersion: v1\nkind: Pod\nmetadata: {name: mounted, namespace: treq}\nspec:\n  containers: [{name: a, image: busybox}, {name: b, image: busybox}]\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: opted-out, namespace: treq}\nspec:\n  automountServiceAccountToken: false\n  containers: [{name: a, image: busybox}]\n---\napiVersion: v1\nkind: ServiceAccount\nmetadata: {name: quiet, namespace: treq}\nautomountServiceAccountToken: false\n",
    );
    server.kubectl_stdin_ok(
        &["apply", "-f", "-"],
        "apiVersion: v1\nkind: Pod\nmetadata: {name: quiet, namespace: treq}\nspec:\n  serviceAccountName: quiet\n  containers: [{name: a, image: busybox}]\n",
    );
    let pod = get(&server, &["-n", "treq", "pod", "mounted"]).expect("the pod");
    let volume = &pod["spec"]["volumes"][0];
    let name = volume["name"].as_str().expect("a volume name");
    assert!(
        name.starts_with("kube-api-access-") && name.len() == 21,
        "{name}"
    );
    let sources = &volume["projected"]["sources"];
    assert_eq!(sources[0]["serviceAccountToken"]["expirationSeconds"], 3607);
    assert_eq!(sources[1]["configMap"]["name"], "kube-root-ca.crt");
    assert_eq!(
        sources[2]["downwardAPI"]["items"][0]["fieldRef"]["fieldPath"],
        "metadata.namespace"
    );
    for container in pod["spec"]["containers"].as_array().expect("containers") {
        let mount = &container["volumeMounts"][0];
        assert_eq!(
            mount["mountPath"],
            "/var/run/secrets/kubernetes.io/serviceaccount"
        );
        assert_eq!(
            (mount["name"].as_str(), mount["readOnly"].as_bool()),
            (Some(name), Some(true))
        );
    }
    for quiet in ["opted-out", "quiet"] {
        let pod = get(&server, &["-n", "treq", "pod", quiet]).expect("the pod");
        assert!(pod["spec"]["volumes"].is_null(), "{quiet}: {}", pod["spec"]);
    }
}

#[test]
fn deleting_a_namespace_empties_and_removes_it() {
    let server = server();
    namespace(&server, "doomed");
    server.kubectl_ok(&[
        "-n",
        "doomed",
        "create",
        "configmap",
        "c",
        "--from-literal=a=b",
    ]);
    server.kubectl_ok(&[
        "-n",
        "doomed",
        "create",
        "secret",
        "generic",
        "s",
        "--from-literal=a=b",
    ]);
    server.kubectl_ok(&[
        "-n",
        "doomed",
        "create",
        "service",
        "clusterip",
        "svc",
        "--tcp=80",
    ]);
    server.kubectl_ok(&["-n", "doomed", "run", "p", "--image=nginx"]);
    server.kubectl_ok(&["delete", "namespace", "doomed", "--timeout=90s"]);
    assert!(
        not_found(&server, &["namespace", "doomed"]),
        "the namespace is still there"
    );
    // Its contents are gone with it.
    let configmaps = get(&server, &["-n", "doomed", "configmaps"]).expect("list");
    assert_eq!(configmaps["items"], serde_json::json!([]));
}

fn owned_configmap(server: &ApiServer, owner: &str) {
    server.kubectl_ok(&["-n", "gc", "create", "configmap", owner]);
    let uid = get(server, &["-n", "gc", "configmap", owner]).expect("owner")["metadata"]["uid"]
        .as_str()
        .expect("uid")
        .to_string();
    server.kubectl_stdin_ok(
        &["apply", "-f", "-"],
        &format!(
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {owner}-child\n  namespace: gc\n  ownerReferences:\n  - {{apiVersion: v1, kind: ConfigMap, name: {owner}, uid: {uid}, blockOwnerDeletion: true}}\n"
        ),
    );
}

#[test]
fn owner_deletion_cascades_in_background_foreground_and_orphan() {
    let server = server();
    namespace(&server, "gc");
    owned_configmap(&server, "bg");
    owned_configmap(&server, "fg");
    owned_configmap(&server, "or");

    server.kubectl_ok(&["-n", "gc", "delete", "configmap", "bg"]);
    server.wait_for("the background dependent to be collected", || {
        not_found(&server, &["-n", "gc", "configmap", "bg-child"]).then_some(())
    });

    // Foreground: kubectl waits for the owner, which goes only after its
    // blocking dependent.
    server.kubectl_ok(&[
        "-n",
        "gc",
        "delete",
        "configmap",
        "fg",
        "--cascade=foreground",
        "--timeout=60s",
    ]);
    assert!(not_found(&server, &["-n", "gc", "configmap", "fg"]));
    assert!(
        not_found(&server, &["-n", "gc", "configmap", "fg-child"]),
        "the owner went before its dependent"
    );

    server.kubectl_ok(&[
        "-n",
        "gc",
        "delete",
        "configmap",
        "or",
        "--cascade=orphan",
        "--timeout=60s",
    ]);
    assert!(not_found(&server, &["-n", "gc", "configmap", "or"]));
    let child = get(&server, &["-n", "gc", "configmap", "or-child"]).expect("the orphan stays");
    assert!(
        child["metadata"].get("ownerReferences").is_none(),
        "the orphan keeps its reference: {child}"
    );
    // And stays, once the collector has caught up.
    server.wait_gc_caught_up("gc");
    assert!(get(&server, &["-n", "gc", "configmap", "or-child"]).is_some());
}

fn external_ip(server: &ApiServer, name: &str) -> Option<String> {
    let out = server.kubectl_ok(&["-n", "lb", "get", "service", name, "--no-headers"]);
    let ip = out.split_whitespace().nth(3)?.to_string();
    ip.starts_with("192.0.2.").then_some(ip)
}

#[test]
fn load_balancers_get_pool_addresses_released_on_delete() {
    let server = server();
    namespace(&server, "lb");
    server.kubectl_ok(&[
        "-n",
        "lb",
        "create",
        "service",
        "loadbalancer",
        "first",
        "--tcp=80",
    ]);
    let ip = server.wait_for("an EXTERNAL-IP", || external_ip(&server, "first"));
    let last: u8 = ip
        .rsplit('.')
        .next()
        .and_then(|n| n.parse().ok())
        .expect("ip");
    assert!(
        (1..=14).contains(&last),
        "{ip} is not a usable address of 192.0.2.0/28"
    );
    server.kubectl_ok(&[
        "-n",
        "lb",
        "create",
        "service",
        "loadbalancer",
        "second",
        "--tcp=80",
    ]);
    let second = server.wait_for("a second EXTERNAL-IP", || external_ip(&server, "second"));
    assert_ne!(ip, second);

    // Deleted: the address is free for a Service asking for it.
    server.kubectl_ok(&["-n", "lb", "delete", "service", "first"]);
    server.kubectl_stdin_ok(
        &["apply", "-f", "-"],
        &format!("apiVersion: v1\nkind: Service\nmetadata: {{name: third, namespace: lb}}\nspec: {{type: LoadBalancer, loadBalancerIP: \"{ip}\", ports: [{{port: 80}}]}}\n"),
    );
    let third = server.wait_for("the released address", || external_ip(&server, "third"));
    assert_eq!(third, ip);

    // No longer a LoadBalancer: the status is cleared (the node port goes
    // explicitly: this API server does not drop it on a type change).
    server.kubectl_ok(&[
        "-n",
        "lb",
        "patch",
        "service",
        "second",
        "--type=json",
        "-p",
        r#"[{"op":"replace","path":"/spec/type","value":"ClusterIP"},{"op":"remove","path":"/spec/ports/0/nodePort"}]"#,
    ]);
    server.wait_for("the status to be cleared", || {
        let service = get(&server, &["-n", "lb", "service", "second"])?;
        service
            .pointer("/status/loadBalancer/ingress")
            .is_none()
            .then_some(())
    });
}
