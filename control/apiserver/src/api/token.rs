//! `serviceaccounts/token`: a TokenRequest (`authentication.k8s.io/v1`) answered with a signed,
//! expiring token for the service account, bound to a pod or a Secret when the request names
//! one, as upstream's TokenRequest API does (what the kubelet's projected token volumes and
//! `kubectl create token` use).

use skiff_common::serviceaccount::{
    Claims, ISSUER, KubernetesClaims, Reference, service_account_user,
};

use super::*;

/// The shortest token a request may ask for (upstream's minimum).
const MIN_EXPIRATION: i64 = 600;
/// The lifetime of a token whose request names none (upstream's default, one hour).
const DEFAULT_EXPIRATION: i64 = 3600;
/// The longest lifetime granted (upstream's `--service-account-max-token-expiration` unset:
/// 48 hours for tokens the kubelet asks for, the most we grant anyone).
const MAX_EXPIRATION: i64 = 48 * 3600;

impl Request<'_> {
    pub(super) async fn token(&self) -> Result<Response, ApiError> {
        let Some(issuer) = &self.state.tokens else {
            return Err(
                ApiError::not_found("authentication.k8s.io", "tokenrequests", self.name())
                    .with_message(
                        "the server has no service-account signing key (--service-account-signing-key-file)",
                    ),
            );
        };
        let request = self.decode()?;
        let account = self.read().await?.value;
        let namespace = self.target.namespace.clone().unwrap_or_default();
        let account_uid = account
            .pointer("/metadata/uid")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        let invalid = |field: &str, message: String| {
            ApiError::invalid(
                "authentication.k8s.io",
                "TokenRequest",
                self.name(),
                vec![Cause::new("FieldValueInvalid", field, &message)],
            )
        };
        let expiration = match request.pointer("/spec/expirationSeconds") {
            None | Some(Value::Null) => DEFAULT_EXPIRATION,
            Some(value) => value
                .as_i64()
                .ok_or_else(|| invalid("spec.expirationSeconds", "must be an integer".into()))?,
        };
        if expiration < MIN_EXPIRATION {
            return Err(invalid(
                "spec.expirationSeconds",
                format!(
                    "Invalid value: {expiration}: may not specify a duration less than 10 minutes"
                ),
            ));
        }
        let expiration = expiration.min(MAX_EXPIRATION);
        let audiences: Vec<String> = request
            .pointer("/spec/audiences")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(str::to_owned))
                    .collect()
            })
            .filter(|a: &Vec<String>| !a.is_empty())
            .unwrap_or_else(|| vec![ISSUER.to_owned()]);
        // The object the token is bound to: it must exist, with the uid given.
        let mut pod = None;
        let mut secret = None;
        if let Some(bound) = request
            .pointer("/spec/boundObjectRef")
            .filter(|b| !b.is_null())
        {
            let kind = bound
                .get("kind")
                .and_then(Value::as_str)
                .unwrap_or_default();
            let name = bound
                .get("name")
                .and_then(Value::as_str)
                .unwrap_or_default();
            let plural = match kind {
                "Pod" => "pods",
                "Secret" => "secrets",
                other => {
                    return Err(invalid(
                        "spec.boundObjectRef.kind",
                        format!(
                            "Unsupported value: {other:?}: supported values: \"Pod\", \"Secret\""
                        ),
                    ));
                }
            };
            let info = registry::find("", "v1", plural).expect("pods and secrets are served");
            let key = meta::key(info, Some(&namespace), name);
            let object = self
                .state
                .store
                .get(&key)
                .await
                .map_err(|e| self.storage_error(e))?
                .ok_or_else(|| ApiError::not_found("", plural, name))?
                .value;
            let uid = object
                .pointer("/metadata/uid")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned();
            if let Some(want) = bound
                .get("uid")
                .and_then(Value::as_str)
                .filter(|u| !u.is_empty())
                && want != uid
            {
                return Err(ApiError::conflict("", plural, name).with_message(format!(
                    "the UID in the bound object reference ({want}) does not match the UID in record. The object might have been deleted and then recreated"
                )));
            }
            let reference = Reference {
                name: name.to_owned(),
                uid,
            };
            if kind == "Pod" {
                pod = Some(reference);
            } else {
                secret = Some(reference);
            }
        }
        let now = jiff::Timestamp::now().as_second();
        let claims = Claims {
            iss: ISSUER.to_owned(),
            sub: service_account_user(&namespace, self.name()),
            aud: audiences.clone(),
            exp: now + expiration,
            iat: now,
            nbf: now,
            kubernetes: KubernetesClaims {
                namespace: namespace.clone(),
                serviceaccount: Reference {
                    name: self.name().to_owned(),
                    uid: account_uid,
                },
                secret,
                pod,
            },
        };
        let token = issuer
            .sign(&claims)
            .map_err(|e| ApiError::internal(format!("cannot sign the token: {e}")))?;
        let expires = jiff::Timestamp::from_second(now + expiration)
            .map(|t| t.to_string())
            .unwrap_or_default();
        let mut spec = request.get("spec").cloned().unwrap_or_else(|| json!({}));
        spec["audiences"] = json!(audiences);
        spec["expirationSeconds"] = json!(expiration);
        Ok(json_response(
            StatusCode::CREATED,
            &json!({
                "kind": "TokenRequest",
                "apiVersion": "authentication.k8s.io/v1",
                "metadata": {"name": self.name(), "namespace": namespace,
                             "creationTimestamp": meta::now()},
                "spec": spec,
                "status": {"token": token, "expirationTimestamp": expires},
            }),
        ))
    }
}

/// Where a pod's service-account volume is mounted in each container.
pub const SERVICE_ACCOUNT_MOUNT: &str = "/var/run/secrets/kubernetes.io/serviceaccount";
/// The lifetime of the projected token (upstream's 3607 s: an hour and a little, so that the
/// kubelet refreshes it well before a client would see it expire).
const PROJECTED_EXPIRATION: i64 = 3607;

impl Request<'_> {
    /// The ServiceAccount admission plugin's volume: unless the pod or its ServiceAccount says
    /// `automountServiceAccountToken: false`, or a container already mounts something at
    /// [`SERVICE_ACCOUNT_MOUNT`], a projected volume `kube-api-access-<5 random>` (a bound token,
    /// the cluster CA from the `kube-root-ca.crt` ConfigMap, the namespace) mounted read-only in
    /// every container and init container.
    pub(super) async fn mount_service_account(&self, pod: &mut Value) -> Result<(), ApiError> {
        let Some(spec) = pod.get_mut("spec").and_then(Value::as_object_mut) else {
            return Ok(());
        };
        let account = spec
            .get("serviceAccountName")
            .and_then(Value::as_str)
            .unwrap_or("default")
            .to_owned();
        let automount = match spec
            .get("automountServiceAccountToken")
            .and_then(Value::as_bool)
        {
            Some(set) => set,
            None => {
                let namespace = self.target.namespace.as_deref();
                let info = registry::find("", "v1", "serviceaccounts").expect("served");
                let key = meta::key(info, namespace, &account);
                // The watch cache's copy when it has one (the token controller watches every
                // account): no etcd read per pod created.
                let root = meta::collection_prefix(info, None);
                let stored = match self.state.watches.latest(&root, &key) {
                    Some((text, _)) => serde_json::from_slice::<Value>(&text).ok(),
                    None => self
                        .state
                        .store
                        .get(&key)
                        .await
                        .map_err(|e| self.storage_error(e))?
                        .map(|s| s.value),
                };
                stored
                    .and_then(|a| {
                        a.get("automountServiceAccountToken")
                            .and_then(Value::as_bool)
                    })
                    .unwrap_or(true)
            }
        };
        if !automount {
            return Ok(());
        }
        let mounted = ["containers", "initContainers"].iter().any(|list| {
            spec.get(*list)
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .flat_map(|c| {
                    c.get("volumeMounts")
                        .and_then(Value::as_array)
                        .into_iter()
                        .flatten()
                })
                .any(|m| m.get("mountPath").and_then(Value::as_str) == Some(SERVICE_ACCOUNT_MOUNT))
        });
        if mounted {
            return Ok(());
        }
        let suffix: String = {
            use rand::Rng;
            const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
            let mut rng = rand::rng();
            (0..5)
                .map(|_| char::from(ALPHABET[rng.random_range(0..ALPHABET.len())]))
                .collect()
        };
        let name = format!("kube-api-access-{suffix}");
        let volume = json!({
            "name": name,
            "projected": {
                "defaultMode": 420,
                "sources": [
                    {"serviceAccountToken": {"expirationSeconds": PROJECTED_EXPIRATION, "path": "token"}},
                    {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
                    {"downwardAPI": {"items": [{"path": "namespace",
                        "fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"}}]}},
                ],
            },
        });
        match spec.get_mut("volumes").and_then(Value::as_array_mut) {
            Some(volumes) => volumes.push(volume),
            None => {
                spec.insert("volumes".into(), json!([volume]));
            }
        }
        let mount = json!({"name": name, "readOnly": true, "mountPath": SERVICE_ACCOUNT_MOUNT});
        for list in ["containers", "initContainers"] {
            for container in spec
                .get_mut(list)
                .and_then(Value::as_array_mut)
                .into_iter()
                .flatten()
            {
                let Some(container) = container.as_object_mut() else {
                    continue;
                };
                match container
                    .get_mut("volumeMounts")
                    .and_then(Value::as_array_mut)
                {
                    Some(mounts) => mounts.push(mount.clone()),
                    None => {
                        container.insert("volumeMounts".into(), json!([mount.clone()]));
                    }
                }
            }
        }
        Ok(())
    }
}
