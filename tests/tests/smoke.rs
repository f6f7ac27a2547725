//! First end-to-end check: a real `skiff-control apiserver` with its own etcd, driven by the
//! pinned kubectl 1.37.

use skiff_tests::ApiServer;

#[test]
fn kubectl_talks_to_the_apiserver() {
    let server = ApiServer::start();

    let version = server.kubectl_json(&["version"]);
    let server_version = &version["serverVersion"];
    assert_eq!(
        server_version["major"], "1",
        "server major version in {version:#}"
    );
    assert_eq!(
        server_version["minor"], "37",
        "server minor version in {version:#}"
    );
    let git_version = server_version["gitVersion"]
        .as_str()
        .unwrap_or_else(|| panic!("serverVersion.gitVersion is a string in {version:#}"));
    assert!(
        git_version.starts_with("v1.37"),
        "server gitVersion {git_version} is v1.37.x"
    );

    let resources = server.kubectl_ok(&["api-resources"]);
    let deployments = resources
        .lines()
        .find(|l| l.split_whitespace().next() == Some("deployments"))
        .unwrap_or_else(|| panic!("api-resources lists deployments:\n{resources}"));
    let columns: Vec<&str> = deployments.split_whitespace().collect();
    assert!(
        columns.contains(&"deploy"),
        "deployments has short name deploy: {deployments}"
    );
    assert!(
        columns.contains(&"apps/v1"),
        "deployments is served in apps/v1: {deployments}"
    );
    assert!(
        columns.contains(&"Deployment"),
        "deployments has kind Deployment: {deployments}"
    );

    let created = server.kubectl_ok(&["create", "namespace", "demo"]);
    assert!(
        created.contains("namespace/demo created"),
        "kubectl create namespace printed: {created}"
    );
    let ns = server.kubectl_json(&["get", "namespace", "demo"]);
    assert_eq!(ns["kind"], "Namespace", "kind in {ns:#}");
    assert_eq!(ns["metadata"]["name"], "demo", "name in {ns:#}");
    let table = server.kubectl_ok(&["get", "ns", "demo"]);
    let row = table
        .lines()
        .nth(1)
        .unwrap_or_else(|| panic!("kubectl get ns demo prints a row:\n{table}"));
    assert!(
        row.starts_with("demo") && row.contains("Active"),
        "namespace demo is Active: {table}"
    );
}
