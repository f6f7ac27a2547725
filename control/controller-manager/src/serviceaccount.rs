//! ServiceAccounts and their tokens.
//!
//! Two controllers:
//!
//! - every namespace that is not being deleted gets a `default`
//!   ServiceAccount, recreated when deleted (upstream's serviceaccounts
//!   controller);
//! - every Secret of type `kubernetes.io/service-account-token` annotated
//!   `kubernetes.io/service-account.name` gets `data.token` (a signed JWT
//!   naming the account and the Secret) and `data.namespace`, as upstream's
//!   legacy token controller fills the Secrets users create; a Secret whose
//!   account is gone (or was replaced: uid annotation) is deleted;
//! - the API server verifies such tokens with the same key
//!   (`skiff_common::serviceaccount`, `skiff_apiserver::auth`).
//!
//! Tokens are ES256 (or RS256 with an RSA key given by the operator),
//! signed with the key under `--service-account-private-key-file`; when
//! the key file does not exist a P-256 key pair is generated there, the
//! public half beside it with the extension `pub`.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Secret, ServiceAccount};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, DeleteParams, PostParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use tokio_util::sync::CancellationToken;

use super::Context;
use skiff_common::error::is_status;
use skiff_common::serviceaccount::{TokenError, TokenIssuer, TokenVerifier, load_or_create_key};

/// The Secret type the token controller fills.
pub const TOKEN_SECRET_TYPE: &str = "kubernetes.io/service-account-token";
/// The annotation naming the ServiceAccount of a token Secret.
pub const SERVICE_ACCOUNT_NAME_ANNOTATION: &str = "kubernetes.io/service-account.name";
/// The annotation holding the uid of the ServiceAccount of a token Secret.
pub const SERVICE_ACCOUNT_UID_ANNOTATION: &str = "kubernetes.io/service-account.uid";
/// How long a token written into a Secret is valid.
pub const SECRET_TOKEN_LIFETIME: Duration = Duration::from_secs(365 * 24 * 3600);
/// Tokens closer than this to their expiry are replaced.
const RENEW_BEFORE: Duration = Duration::from_secs(30 * 24 * 3600);

/// What the token controller does with one Secret.
#[derive(Debug, Clone, PartialEq)]
pub enum SecretDecision {
    /// Not a token Secret, or already right.
    Nothing,
    /// Its ServiceAccount is gone or was replaced: delete it.
    Delete,
    /// Write `data.token` (a new token), `data.namespace` and the uid
    /// annotation.
    Fill,
}

/// Decide what a token Secret needs, given its ServiceAccount (`None` when
/// it does not exist), whether its current token is still good (verifies,
/// names this account and Secret and is not close to expiry).
pub fn decide_secret(
    secret: &Secret,
    account: Option<&ServiceAccount>,
    token_good: bool,
) -> SecretDecision {
    if secret.type_.as_deref() != Some(TOKEN_SECRET_TYPE)
        || secret.metadata.deletion_timestamp.is_some()
    {
        return SecretDecision::Nothing;
    }
    let annotations = secret.metadata.annotations.clone().unwrap_or_default();
    if !annotations.contains_key(SERVICE_ACCOUNT_NAME_ANNOTATION) {
        return SecretDecision::Nothing;
    }
    let Some(account) = account else {
        return SecretDecision::Delete;
    };
    let account_uid = account.metadata.uid.clone().unwrap_or_default();
    match annotations.get(SERVICE_ACCOUNT_UID_ANNOTATION) {
        Some(uid) if !uid.is_empty() && *uid != account_uid => return SecretDecision::Delete,
        Some(_) => {}
        None => return SecretDecision::Fill,
    }
    let data = secret.data.clone().unwrap_or_default();
    let namespace_ok = data.get("namespace").map(|b| b.0.as_slice())
        == secret.metadata.namespace.as_deref().map(str::as_bytes);
    if token_good && namespace_ok {
        SecretDecision::Nothing
    } else {
        SecretDecision::Fill
    }
}

/// Run both controllers until `shutdown`.
pub async fn run(ctx: Arc<Context>, shutdown: CancellationToken) {
    let tokens = match &ctx.options.service_account_private_key_file {
        Some(path) => match load_signer(path) {
            Ok(signer) => Some(signer),
            Err(error) => {
                tracing::error!(error = %skiff_common::error::chain(&error), "the service-account token controller does not run");
                None
            }
        },
        None => {
            tracing::warn!(
                "no --service-account-private-key-file: the service-account token controller does not run"
            );
            None
        }
    };
    let default_accounts = run_default_accounts(ctx.clone(), shutdown.clone());
    match tokens {
        Some(signer) => {
            tokio::join!(
                default_accounts,
                run_tokens(ctx, Arc::new(signer), shutdown)
            );
        }
        None => default_accounts.await,
    }
}

/// The issuer and a verifier of the same key, for the token controller.
struct Signer {
    issuer: TokenIssuer,
    verifier: TokenVerifier,
}

fn load_signer(path: &Path) -> Result<Signer, TokenError> {
    let key = load_or_create_key(path)?;
    Ok(Signer {
        issuer: TokenIssuer::new(&key, path)?,
        verifier: TokenVerifier::from_public_pem(&key.public_key_pem(), path)?,
    })
}

/// An error of a reconcile, retried.
#[derive(Debug, thiserror::Error)]
enum ReconcileError {
    #[error("api request failed")]
    Api {
        #[source]
        source: kube::Error,
    },
    #[error("cannot issue a token")]
    Token {
        #[source]
        source: TokenError,
    },
}

fn api_error(source: kube::Error) -> ReconcileError {
    ReconcileError::Api { source }
}

/// The ConfigMap holding the cluster CA in every namespace.
pub const ROOT_CA_CONFIG_MAP: &str = "kube-root-ca.crt";

/// Every namespace's `default` ServiceAccount and, with `--root-ca-file`, its
/// [`ROOT_CA_CONFIG_MAP`] (upstream's root-ca-cert-publisher).
async fn run_default_accounts(ctx: Arc<Context>, shutdown: CancellationToken) {
    let root_ca = match &ctx.options.root_ca_file {
        Some(path) => match std::fs::read_to_string(path) {
            Ok(pem) => Some(pem),
            Err(error) => {
                tracing::error!(path = %path.display(), error = %skiff_common::error::chain(&error), "cannot read the root CA; kube-root-ca.crt is not published");
                None
            }
        },
        None => {
            tracing::warn!("no --root-ca-file: kube-root-ca.crt is not published");
            None
        }
    };
    let namespaces: Api<Namespace> = Api::all(ctx.client.clone());
    let accounts: Api<ServiceAccount> = Api::all(ctx.client.clone());
    let config_maps: Api<ConfigMap> = Api::all(ctx.client.clone());
    Controller::new(namespaces, watcher::Config::default())
        .watches(
            accounts,
            watcher::Config::default(),
            |account: ServiceAccount| {
                let namespace = account.metadata.namespace.clone()?;
                (account.metadata.name.as_deref() == Some("default"))
                    .then(|| ObjectRef::new(&namespace))
            },
        )
        .watches(
            config_maps,
            watcher::Config::default().fields(&format!("metadata.name={ROOT_CA_CONFIG_MAP}")),
            |map: ConfigMap| Some(ObjectRef::new(&map.metadata.namespace.clone()?)),
        )
        .graceful_shutdown_on(async move { shutdown.cancelled().await })
        .run(reconcile_namespace, error_policy, Arc::new((ctx, root_ca)))
        .for_each(|_| async {})
        .await;
}

fn error_policy<K, C>(_: Arc<K>, error: &ReconcileError, _: Arc<C>) -> Action {
    tracing::warn!(error = %skiff_common::error::chain(error), "service-account reconcile failed");
    Action::requeue(Duration::from_secs(5))
}

async fn reconcile_namespace(
    namespace: Arc<Namespace>,
    shared: Arc<(Arc<Context>, Option<String>)>,
) -> Result<Action, ReconcileError> {
    let (ctx, root_ca) = (&shared.0, &shared.1);
    let Some(name) = namespace.metadata.name.as_deref() else {
        return Ok(Action::await_change());
    };
    if namespace.metadata.deletion_timestamp.is_some()
        || namespace.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Terminating")
    {
        return Ok(Action::await_change());
    }
    let api: Api<ServiceAccount> = Api::namespaced(ctx.client.clone(), name);
    if api.get_opt("default").await.map_err(api_error)?.is_none() {
        let account = ServiceAccount {
            metadata: ObjectMeta {
                name: Some("default".to_string()),
                namespace: Some(name.to_string()),
                ..ObjectMeta::default()
            },
            ..ServiceAccount::default()
        };
        match api.create(&PostParams::default(), &account).await {
            Ok(_) => tracing::info!(namespace = name, "created the default service account"),
            Err(error) if is_status(&error, 409) => {}
            // The namespace went away meanwhile.
            Err(error) if is_status(&error, 404) => {}
            Err(error) => return Err(api_error(error)),
        }
    }
    if let Some(pem) = root_ca {
        publish_root_ca(&ctx.client, name, pem).await?;
    }
    Ok(Action::await_change())
}

/// Puts the CA into the namespace's [`ROOT_CA_CONFIG_MAP`]: created when missing, its `ca.crt`
/// put back when it differs.
async fn publish_root_ca(
    client: &kube::Client,
    namespace: &str,
    pem: &str,
) -> Result<(), ReconcileError> {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    let data = BTreeMap::from([("ca.crt".to_owned(), pem.to_owned())]);
    match api.get_opt(ROOT_CA_CONFIG_MAP).await.map_err(api_error)? {
        Some(existing) if existing.data.as_ref() == Some(&data) => Ok(()),
        Some(mut existing) => {
            existing.data = Some(data);
            existing.binary_data = None;
            match api
                .replace(ROOT_CA_CONFIG_MAP, &PostParams::default(), &existing)
                .await
            {
                Ok(_) => Ok(()),
                Err(error) if is_status(&error, 409) || is_status(&error, 404) => Ok(()),
                Err(error) => Err(api_error(error)),
            }
        }
        None => {
            let map = ConfigMap {
                metadata: ObjectMeta {
                    name: Some(ROOT_CA_CONFIG_MAP.to_owned()),
                    namespace: Some(namespace.to_owned()),
                    annotations: Some(BTreeMap::from([(
                        "kubernetes.io/description".to_owned(),
                        "Contains a CA bundle that can be used to verify the kube-apiserver when using internal endpoints such as the internal service IP or kubernetes.default.svc. No other usage is guaranteed across distributions of Kubernetes clusters.".to_owned(),
                    )])),
                    ..ObjectMeta::default()
                },
                data: Some(data),
                ..ConfigMap::default()
            };
            match api.create(&PostParams::default(), &map).await {
                Ok(_) => {
                    tracing::info!(namespace, "published kube-root-ca.crt");
                    Ok(())
                }
                Err(error) if is_status(&error, 409) || is_status(&error, 404) => Ok(()),
                Err(error) => Err(api_error(error)),
            }
        }
    }
}

async fn run_tokens(ctx: Arc<Context>, signer: Arc<Signer>, shutdown: CancellationToken) {
    let secrets: Api<Secret> = Api::all(ctx.client.clone());
    let accounts: Api<ServiceAccount> = Api::all(ctx.client.clone());
    let controller = Controller::new(secrets, watcher::Config::default());
    let store = controller.store();
    controller
        .watches(
            accounts,
            watcher::Config::default(),
            move |account: ServiceAccount| {
                // The token Secrets of an account, to delete or refill them.
                let namespace = account.metadata.namespace.clone().unwrap_or_default();
                let name = account.metadata.name.clone().unwrap_or_default();
                store
                    .state()
                    .into_iter()
                    .filter(|secret| {
                        secret.metadata.namespace.as_deref() == Some(namespace.as_str())
                            && secret.type_.as_deref() == Some(TOKEN_SECRET_TYPE)
                            && secret
                                .metadata
                                .annotations
                                .as_ref()
                                .and_then(|a| a.get(SERVICE_ACCOUNT_NAME_ANNOTATION))
                                == Some(&name)
                    })
                    .map(|secret| ObjectRef::from_obj(secret.as_ref()))
                    .collect::<Vec<_>>()
            },
        )
        .graceful_shutdown_on(async move { shutdown.cancelled().await })
        .run(reconcile_secret, error_policy, Arc::new((ctx, signer)))
        .for_each(|_| async {})
        .await;
}

/// Whether `token` verifies, names `account` and `secret`, and is not
/// close to expiry at `now`.
fn token_good(
    signer: &Signer,
    token: Option<&[u8]>,
    secret: &Secret,
    account: &ServiceAccount,
    now: i64,
) -> bool {
    let Some(claims) = token
        .and_then(|t| std::str::from_utf8(t).ok())
        .and_then(|t| signer.verifier.verify(t))
    else {
        return false;
    };
    let k = &claims.kubernetes;
    let renew = i64::try_from(RENEW_BEFORE.as_secs()).unwrap_or(0);
    Some(k.namespace.as_str()) == account.metadata.namespace.as_deref()
        && Some(k.serviceaccount.name.as_str()) == account.metadata.name.as_deref()
        && Some(k.serviceaccount.uid.as_str()) == account.metadata.uid.as_deref()
        && k.secret.as_ref().map(|s| s.uid.as_str()) == secret.metadata.uid.as_deref()
        && claims.exp - now > renew
}

async fn reconcile_secret(
    secret: Arc<Secret>,
    ctx: Arc<(Arc<Context>, Arc<Signer>)>,
) -> Result<Action, ReconcileError> {
    let (ctx, signer) = (&ctx.0, &ctx.1);
    if secret.type_.as_deref() != Some(TOKEN_SECRET_TYPE) {
        return Ok(Action::await_change());
    }
    let Some(account_name) = secret
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(SERVICE_ACCOUNT_NAME_ANNOTATION))
        .cloned()
    else {
        return Ok(Action::await_change());
    };
    let namespace = secret.metadata.namespace.clone().unwrap_or_default();
    let name = secret.metadata.name.clone().unwrap_or_default();
    let accounts: Api<ServiceAccount> = Api::namespaced(ctx.client.clone(), &namespace);
    let account = accounts.get_opt(&account_name).await.map_err(api_error)?;
    let now = jiff::Timestamp::now().as_second();
    let good = account.as_ref().is_some_and(|account| {
        token_good(
            signer,
            secret
                .data
                .as_ref()
                .and_then(|d| d.get("token"))
                .map(|b| b.0.as_slice()),
            &secret,
            account,
            now,
        )
    });
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &namespace);
    match decide_secret(&secret, account.as_ref(), good) {
        SecretDecision::Nothing => {}
        SecretDecision::Delete => {
            tracing::info!(
                namespace,
                name,
                account = account_name,
                "deleting the token secret of a missing service account"
            );
            let params =
                DeleteParams {
                    preconditions: secret.metadata.uid.clone().map(|uid| {
                        kube::api::Preconditions {
                            uid: Some(uid),
                            resource_version: None,
                        }
                    }),
                    ..DeleteParams::default()
                };
            match secrets.delete(&name, &params).await {
                Ok(_) => {}
                Err(error) if is_status(&error, 404) || is_status(&error, 409) => {}
                Err(error) => return Err(api_error(error)),
            }
            return Ok(Action::await_change());
        }
        SecretDecision::Fill => {
            let account = account.as_ref().expect("fill needs the account");
            let account_uid = account.metadata.uid.clone().unwrap_or_default();
            let token = signer
                .issuer
                .issue(
                    &namespace,
                    &account_name,
                    &account_uid,
                    Some((&name, secret.metadata.uid.as_deref().unwrap_or_default())),
                    now,
                    SECRET_TOKEN_LIFETIME,
                )
                .map_err(|source| ReconcileError::Token { source })?;
            let mut next = (*secret).clone();
            next.metadata.managed_fields = None;
            next.metadata
                .annotations
                .get_or_insert_with(BTreeMap::new)
                .insert(SERVICE_ACCOUNT_UID_ANNOTATION.to_string(), account_uid);
            let data = next.data.get_or_insert_with(BTreeMap::new);
            data.insert("token".to_string(), ByteString(token.into_bytes()));
            data.insert(
                "namespace".to_string(),
                ByteString(namespace.clone().into_bytes()),
            );
            match secrets.replace(&name, &PostParams::default(), &next).await {
                Ok(_) => tracing::info!(
                    namespace,
                    name,
                    account = account_name,
                    "wrote a service-account token"
                ),
                // A newer version will be reconciled again.
                Err(error) if is_status(&error, 409) || is_status(&error, 404) => {}
                Err(error) => return Err(api_error(error)),
            }
        }
    }
    Ok(Action::requeue(Duration::from_secs(3600)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn account(namespace: &str, name: &str, uid: &str) -> ServiceAccount {
        ServiceAccount {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some(namespace.into()),
                uid: Some(uid.into()),
                ..ObjectMeta::default()
            },
            ..ServiceAccount::default()
        }
    }

    fn secret(annotations: &[(&str, &str)], data: &[(&str, &str)]) -> Secret {
        Secret {
            metadata: ObjectMeta {
                name: Some("tok".into()),
                namespace: Some("ns".into()),
                uid: Some("secret-uid".into()),
                annotations: Some(
                    annotations
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                ),
                ..ObjectMeta::default()
            },
            type_: Some(TOKEN_SECRET_TYPE.into()),
            data: Some(
                data.iter()
                    .map(|(k, v)| (k.to_string(), ByteString(v.as_bytes().to_vec())))
                    .collect(),
            ),
            ..Secret::default()
        }
    }

    fn signer(dir: &Path) -> Signer {
        load_signer(&dir.join("pki").join("sa.key")).expect("signer")
    }

    #[test]
    fn token_secrets_are_filled_kept_or_deleted() {
        let sa = account("ns", "builder", "sa-uid");
        let name = (SERVICE_ACCOUNT_NAME_ANNOTATION, "builder");
        // New Secret: fill.
        assert_eq!(
            decide_secret(&secret(&[name], &[]), Some(&sa), false),
            SecretDecision::Fill
        );
        // Filled and good: nothing.
        let filled = secret(
            &[name, (SERVICE_ACCOUNT_UID_ANNOTATION, "sa-uid")],
            &[("token", "t"), ("namespace", "ns")],
        );
        assert_eq!(
            decide_secret(&filled, Some(&sa), true),
            SecretDecision::Nothing
        );
        // Token no longer good (e.g. key rotated, near expiry): refill.
        assert_eq!(
            decide_secret(&filled, Some(&sa), false),
            SecretDecision::Fill
        );
        // Account gone or replaced: delete.
        assert_eq!(decide_secret(&filled, None, true), SecretDecision::Delete);
        let replaced = account("ns", "builder", "other-uid");
        assert_eq!(
            decide_secret(&filled, Some(&replaced), false),
            SecretDecision::Delete
        );
        // Other Secrets are left alone.
        let mut opaque = secret(&[name], &[]);
        opaque.type_ = Some("Opaque".into());
        assert_eq!(decide_secret(&opaque, None, false), SecretDecision::Nothing);
        assert_eq!(
            decide_secret(&secret(&[], &[]), None, false),
            SecretDecision::Nothing
        );
    }

    #[test]
    fn token_checks_bind_to_account_and_secret() {
        let dir = tempfile::tempdir().expect("tempdir");
        let signer = signer(dir.path());
        let now = jiff::Timestamp::now().as_second();
        let sa = account("ns", "builder", "sa-uid");
        let sec = secret(&[], &[]);
        let token = signer
            .issuer
            .issue(
                "ns",
                "builder",
                "sa-uid",
                Some(("tok", "secret-uid")),
                now,
                SECRET_TOKEN_LIFETIME,
            )
            .expect("token");
        assert!(token_good(&signer, Some(token.as_bytes()), &sec, &sa, now));
        assert!(!token_good(
            &signer,
            Some(token.as_bytes()),
            &sec,
            &account("ns", "builder", "new"),
            now
        ));
        assert!(!token_good(&signer, None, &sec, &sa, now));
        let short = signer
            .issuer
            .issue(
                "ns",
                "builder",
                "sa-uid",
                Some(("tok", "secret-uid")),
                now,
                Duration::from_secs(3600),
            )
            .expect("token");
        assert!(
            !token_good(&signer, Some(short.as_bytes()), &sec, &sa, now),
            "near expiry is renewed"
        );
    }
}
