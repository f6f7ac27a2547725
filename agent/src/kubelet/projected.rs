//! Projected volumes, as the kubelet writes them: a service-account token (a TokenRequest bound
//! to the pod, refreshed before it expires), ConfigMap and Secret keys, and downward-API
//! fields, each source's files in one directory that the containers mount (read-only, as the
//! ServiceAccount admission plugin mounts `kube-api-access-*` at
//! `/var/run/secrets/kubernetes.io/serviceaccount`).
//!
//! Each file is written to a temporary name and renamed over the old one, so a container never
//! reads half a token.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret, ServiceAccount, Volume};
use kube::Api;
use kube::api::PostParams;
use serde_json::{Value, json};

/// The default mode of projected files (upstream's 0644).
pub const DEFAULT_MODE: u32 = 0o644;

/// Why a projected volume could not be written.
#[derive(Debug, thiserror::Error)]
pub enum ProjectedError {
    /// The API refused or failed a request.
    #[error("{what}")]
    Api {
        /// What was asked for.
        what: String,
        /// Why.
        #[source]
        source: kube::Error,
    },
    /// A ConfigMap or Secret the volume names does not exist (and is not optional).
    #[error("{kind} {namespace}/{name} not found")]
    NotFound {
        /// `configmap` or `secret`.
        kind: &'static str,
        /// Its namespace.
        namespace: String,
        /// Its name.
        name: String,
    },
    /// A ConfigMap or Secret lacks a key the volume names.
    #[error("{kind} {name} has no key {key:?}")]
    MissingKey {
        /// `configmap` or `secret`.
        kind: &'static str,
        /// Its name.
        name: String,
        /// The key.
        key: String,
    },
    /// A path escapes the volume.
    #[error("the path {path:?} is not inside the volume")]
    BadPath {
        /// The path.
        path: String,
    },
    /// The token request's answer holds no token.
    #[error("the TokenRequest for service account {account} was answered without a token")]
    NoToken {
        /// The account.
        account: String,
    },
    /// A file could not be written.
    #[error("cannot write {}", path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// A file of the volume: its path inside the volume, content and mode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct File {
    /// Relative path.
    pub path: String,
    /// Content.
    pub data: Vec<u8>,
    /// Mode.
    pub mode: u32,
}

/// The value of a downward-API `fieldPath` of `pod` (the fields a volume may project).
pub fn field(pod: &Pod, path: &str) -> Option<String> {
    let meta = &pod.metadata;
    let pairs = |map: &Option<BTreeMap<String, String>>| {
        map.iter()
            .flatten()
            .map(|(k, v)| format!("{k}={}", serde_json::to_string(v).unwrap_or_default()))
            .collect::<Vec<_>>()
            .join("\n")
    };
    Some(match path {
        "metadata.name" => meta.name.clone().unwrap_or_default(),
        "metadata.namespace" => meta.namespace.clone().unwrap_or_default(),
        "metadata.uid" => meta.uid.clone().unwrap_or_default(),
        "metadata.labels" => pairs(&meta.labels),
        "metadata.annotations" => pairs(&meta.annotations),
        _ => {
            let key = path
                .strip_prefix("metadata.labels['")
                .map(|k| (k, &meta.labels))
                .or_else(|| {
                    path.strip_prefix("metadata.annotations['")
                        .map(|k| (k, &meta.annotations))
                })?;
            let name = key.0.strip_suffix("']")?;
            key.1.as_ref()?.get(name).cloned().unwrap_or_default()
        }
    })
}

/// Writes the projected volume `volume` of `pod` into `dir`; returns how long until its token
/// (if it has one) should be renewed: at 80% of its lifetime, as the kubelet does.
pub async fn write(
    client: &kube::Client,
    pod: &Pod,
    volume: &Volume,
    dir: &Path,
) -> Result<Option<Duration>, ProjectedError> {
    let Some(projected) = &volume.projected else {
        return Ok(None);
    };
    let namespace = pod.metadata.namespace.clone().unwrap_or_default();
    let default_mode = projected
        .default_mode
        .and_then(|m| u32::try_from(m).ok())
        .unwrap_or(DEFAULT_MODE);
    let mode = |m: Option<i32>| {
        m.and_then(|m| u32::try_from(m).ok())
            .unwrap_or(default_mode)
    };
    let mut files = Vec::new();
    let mut renew = None;
    for source in projected.sources.iter().flatten() {
        if let Some(token) = &source.service_account_token {
            let account = pod
                .spec
                .as_ref()
                .and_then(|s| s.service_account_name.clone())
                .unwrap_or_else(|| "default".into());
            let expiration = token.expiration_seconds.unwrap_or(3600);
            let body = json!({
                "apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                "spec": {
                    "audiences": token.audience.iter().filter(|a| !a.is_empty()).collect::<Vec<_>>(),
                    "expirationSeconds": expiration,
                    "boundObjectRef": {"apiVersion": "v1", "kind": "Pod",
                                       "name": pod.metadata.name, "uid": pod.metadata.uid},
                },
            });
            let api: Api<ServiceAccount> = Api::namespaced(client.clone(), &namespace);
            let answer: Value = api
                .create_subresource("token", &account, &PostParams::default(), &body)
                .await
                .map_err(|source| ProjectedError::Api {
                    what: format!("cannot get a token for service account {namespace}/{account}"),
                    source,
                })?;
            let text = answer
                .pointer("/status/token")
                .and_then(Value::as_str)
                .ok_or_else(|| ProjectedError::NoToken {
                    account: format!("{namespace}/{account}"),
                })?;
            files.push(File {
                path: token.path.clone(),
                data: text.as_bytes().to_vec(),
                mode: default_mode,
            });
            let lifetime = Duration::from_secs(u64::try_from(expiration).unwrap_or(3600));
            let due = lifetime.mul_f64(0.8);
            renew = Some(renew.map_or(due, |r: Duration| r.min(due)));
        }
        if let Some(source) = &source.config_map {
            let found = key_files::<ConfigMap>(
                client,
                &namespace,
                &source.name,
                source.items.as_deref(),
                source.optional,
                &mode,
            );
            files.extend(found.await?);
        }
        if let Some(source) = &source.secret {
            let found = key_files::<Secret>(
                client,
                &namespace,
                &source.name,
                source.items.as_deref(),
                source.optional,
                &mode,
            );
            files.extend(found.await?);
        }
        if let Some(source) = &source.downward_api {
            for item in source.items.iter().flatten() {
                let Some(selector) = &item.field_ref else {
                    continue;
                };
                let value = field(pod, &selector.field_path).unwrap_or_default();
                files.push(File {
                    path: item.path.clone(),
                    data: value.into_bytes(),
                    mode: mode(item.mode),
                });
            }
        }
    }
    store(dir, &files)?;
    Ok(renew)
}

/// A ConfigMap's or a Secret's keys and values.
trait KeyValues:
    kube::Resource<Scope = kube::core::NamespaceResourceScope, DynamicType = ()>
    + Clone
    + serde::de::DeserializeOwned
    + std::fmt::Debug
{
    /// `configmap` or `secret`.
    const KIND: &'static str;
    /// Every key with its value.
    fn key_values(self) -> BTreeMap<String, Vec<u8>>;
}

impl KeyValues for ConfigMap {
    const KIND: &'static str = "configmap";
    fn key_values(self) -> BTreeMap<String, Vec<u8>> {
        let mut data: BTreeMap<String, Vec<u8>> = self
            .data
            .into_iter()
            .flatten()
            .map(|(k, v)| (k, v.into_bytes()))
            .collect();
        data.extend(
            self.binary_data
                .into_iter()
                .flatten()
                .map(|(k, v)| (k, v.0)),
        );
        data
    }
}

impl KeyValues for Secret {
    const KIND: &'static str = "secret";
    fn key_values(self) -> BTreeMap<String, Vec<u8>> {
        let mut data: BTreeMap<String, Vec<u8>> = self
            .data
            .into_iter()
            .flatten()
            .map(|(k, v)| (k, v.0))
            .collect();
        data.extend(
            self.string_data
                .into_iter()
                .flatten()
                .map(|(k, v)| (k, v.into_bytes())),
        );
        data
    }
}

/// The keys of the ConfigMap or Secret `namespace/name` (none when it is missing and
/// `optional`).
async fn read_keys<K: KeyValues>(
    client: &kube::Client,
    namespace: &str,
    name: &str,
    optional: Option<bool>,
) -> Result<BTreeMap<String, Vec<u8>>, ProjectedError> {
    let api: Api<K> = Api::namespaced(client.clone(), namespace);
    match api.get_opt(name).await {
        Ok(Some(found)) => Ok(found.key_values()),
        Ok(None) if optional == Some(true) => Ok(BTreeMap::new()),
        Ok(None) => Err(ProjectedError::NotFound {
            kind: K::KIND,
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        }),
        Err(source) => Err(ProjectedError::Api {
            what: format!("cannot read {} {namespace}/{name}", K::KIND),
            source,
        }),
    }
}

/// The files of the keys of the ConfigMap or Secret `namespace/name`: [`read_keys`], then
/// [`keys`].
async fn key_files<K: KeyValues>(
    client: &kube::Client,
    namespace: &str,
    name: &str,
    items: Option<&[k8s_openapi::api::core::v1::KeyToPath]>,
    optional: Option<bool>,
    mode: &(dyn Fn(Option<i32>) -> u32 + Sync),
) -> Result<Vec<File>, ProjectedError> {
    let data = read_keys::<K>(client, namespace, name, optional).await?;
    keys(K::KIND, name, &data, items, optional, mode)
}

/// The files of a ConfigMap's or Secret's keys: those `items` names (each must exist unless the
/// source is optional), or every key under its own name.
fn keys(
    kind: &'static str,
    name: &str,
    data: &BTreeMap<String, Vec<u8>>,
    items: Option<&[k8s_openapi::api::core::v1::KeyToPath]>,
    optional: Option<bool>,
    mode: &dyn Fn(Option<i32>) -> u32,
) -> Result<Vec<File>, ProjectedError> {
    let Some(items) = items.filter(|i| !i.is_empty()) else {
        return Ok(data
            .iter()
            .map(|(k, v)| File {
                path: k.clone(),
                data: v.clone(),
                mode: mode(None),
            })
            .collect());
    };
    let mut out = Vec::new();
    for item in items {
        match data.get(&item.key) {
            Some(value) => out.push(File {
                path: item.path.clone(),
                data: value.clone(),
                mode: mode(item.mode),
            }),
            None if optional == Some(true) => {}
            None => {
                return Err(ProjectedError::MissingKey {
                    kind,
                    name: name.to_owned(),
                    key: item.key.clone(),
                });
            }
        }
    }
    Ok(out)
}

/// Writes `files` under `dir`, each through a temporary file renamed over it.
pub fn store(dir: &Path, files: &[File]) -> Result<(), ProjectedError> {
    let write = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ProjectedError::Write { path, source }
    };
    std::fs::create_dir_all(dir).map_err(write(dir))?;
    for file in files {
        let relative = Path::new(&file.path);
        if file.path.is_empty()
            || relative
                .components()
                .any(|c| !matches!(c, Component::Normal(_)))
        {
            return Err(ProjectedError::BadPath {
                path: file.path.clone(),
            });
        }
        let target = dir.join(relative);
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent).map_err(write(parent))?;
        }
        let temporary = target.with_file_name(format!(
            ".{}.tmp",
            target
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or("file")
        ));
        std::fs::write(&temporary, &file.data).map_err(write(&temporary))?;
        std::fs::set_permissions(&temporary, std::fs::Permissions::from_mode(file.mode))
            .map_err(write(&temporary))?;
        std::fs::rename(&temporary, &target).map_err(write(&target))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn downward_fields_read_the_pod() {
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": "web", "namespace": "shop", "uid": "u1",
                         "labels": {"app": "web", "tier": "front"}},
        }))
        .expect("a pod");
        assert_eq!(field(&pod, "metadata.namespace").as_deref(), Some("shop"));
        assert_eq!(
            field(&pod, "metadata.labels").as_deref(),
            Some("app=\"web\"\ntier=\"front\"")
        );
        assert_eq!(
            field(&pod, "metadata.labels['tier']").as_deref(),
            Some("front")
        );
        assert_eq!(field(&pod, "spec.nodeName"), None);
    }

    #[test]
    fn files_land_inside_the_volume_and_nowhere_else() {
        let dir = tempfile::tempdir().expect("a directory");
        let files = [
            File {
                path: "token".into(),
                data: b"t1".to_vec(),
                mode: 0o600,
            },
            File {
                path: "sub/ca.crt".into(),
                data: b"pem".to_vec(),
                mode: DEFAULT_MODE,
            },
        ];
        store(dir.path(), &files).expect("written");
        assert_eq!(
            std::fs::read(dir.path().join("token")).expect("token"),
            b"t1"
        );
        assert_eq!(
            std::fs::read(dir.path().join("sub/ca.crt")).expect("ca"),
            b"pem"
        );
        let mode = std::fs::metadata(dir.path().join("token"))
            .expect("meta")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        // A renewal replaces the file whole.
        store(
            dir.path(),
            &[File {
                path: "token".into(),
                data: b"t2".to_vec(),
                mode: 0o600,
            }],
        )
        .expect("rewritten");
        assert_eq!(
            std::fs::read(dir.path().join("token")).expect("token"),
            b"t2"
        );
        for bad in ["../escape", "/abs", "a/../../b", ""] {
            let error = store(
                dir.path(),
                &[File {
                    path: bad.into(),
                    data: Vec::new(),
                    mode: 0o644,
                }],
            )
            .expect_err("refused");
            assert!(
                matches!(error, ProjectedError::BadPath { .. }),
                "{bad}: {error}"
            );
        }
        let data = BTreeMap::from([("ca.crt".to_owned(), b"pem".to_vec())]);
        let item: k8s_openapi::api::core::v1::KeyToPath =
            serde_json::from_value(json!({"key": "nope", "path": "x"})).expect("an item");
        let error = keys(
            "configmap",
            "root",
            &data,
            Some(std::slice::from_ref(&item)),
            None,
            &|_| 0o644,
        )
        .expect_err("missing key");
        assert!(error.to_string().contains("\"nope\""), "{error}");
        assert!(
            keys(
                "configmap",
                "root",
                &data,
                Some(&[item]),
                Some(true),
                &|_| 0o644
            )
            .expect("optional")
            .is_empty()
        );
    }
}
