//! ServiceAccounts and their tokens.
//!
//! Two controllers and the API server's half of service-account tokens:
//!
//! - every namespace that is not being deleted gets a `default`
//!   ServiceAccount, recreated when deleted (upstream's serviceaccounts
//!   controller);
//! - every Secret of type `kubernetes.io/service-account-token` annotated
//!   `kubernetes.io/service-account.name` gets `data.token` (a signed JWT
//!   naming the account and the Secret) and `data.namespace`, as upstream's
//!   legacy token controller fills the Secrets users create; a Secret whose
//!   account is gone (or was replaced: uid annotation) is deleted;
//! - [`ServiceAccountTokenAuthenticator`] verifies such tokens for the API
//!   server (signature, issuer, audience, expiry) and maps them to the user
//!   `system:serviceaccount:<ns>:<name>` in the groups
//!   `system:serviceaccounts` and `system:serviceaccounts:<ns>`.
//!
//! Tokens are ES256 (or RS256 with an RSA key given by the operator),
//! signed with the key under `--service-account-private-key-file`; when
//! the key file does not exist a P-256 key pair is generated there, the
//! public half beside it with the extension `pub`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{Namespace, Secret, ServiceAccount};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, DeleteParams, PostParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use rcgen::PublicKeyData;
use serde::{Deserialize, Serialize};
use sha2::Digest;
use tokio_util::sync::CancellationToken;

use super::Context;
use super::endpoints::is_status;
use crate::auth::{TokenAuthenticator, UserInfo};

/// The issuer (`iss`) of the tokens, upstream's default for clusters
/// named `cluster.local`; also the audience they are issued for.
pub const ISSUER: &str = "https://kubernetes.default.svc.cluster.local";
/// The Secret type the token controller fills.
pub const TOKEN_SECRET_TYPE: &str = "kubernetes.io/service-account-token";
/// The annotation naming the ServiceAccount of a token Secret.
pub const SERVICE_ACCOUNT_NAME_ANNOTATION: &str = "kubernetes.io/service-account.name";
/// The annotation holding the uid of the ServiceAccount of a token Secret.
pub const SERVICE_ACCOUNT_UID_ANNOTATION: &str = "kubernetes.io/service-account.uid";
/// The group of every service account.
pub const SERVICE_ACCOUNTS_GROUP: &str = "system:serviceaccounts";
/// How long a token written into a Secret is valid.
pub const SECRET_TOKEN_LIFETIME: Duration = Duration::from_secs(365 * 24 * 3600);
/// Tokens closer than this to their expiry are replaced.
const RENEW_BEFORE: Duration = Duration::from_secs(30 * 24 * 3600);

/// A failure to load, create or use the token signing key.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// A key file could not be read.
    #[error("cannot read the service-account key {}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A key file could not be written.
    #[error("cannot write the service-account key {}", path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A key could not be generated or parsed.
    #[error("bad service-account key {}", path.display())]
    Key {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: rcgen::Error,
    },
    /// The key is neither an ECDSA P-256 nor an RSA key.
    #[error("service-account key {} is neither ECDSA P-256 nor RSA", path.display())]
    UnsupportedKey {
        /// The file.
        path: PathBuf,
    },
    /// Signing failed.
    #[error("cannot sign a service-account token")]
    Sign {
        /// The cause.
        #[source]
        source: jsonwebtoken::errors::Error,
    },
}

/// The claims of a service-account token (upstream's layout).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Claims {
    iss: String,
    sub: String,
    aud: Vec<String>,
    exp: i64,
    iat: i64,
    nbf: i64,
    #[serde(rename = "kubernetes.io")]
    kubernetes: KubernetesClaims,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct KubernetesClaims {
    namespace: String,
    serviceaccount: Reference,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    secret: Option<Reference>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Reference {
    name: String,
    uid: String,
}

/// The user name of a service account.
pub fn service_account_user(namespace: &str, name: &str) -> String {
    format!("system:serviceaccount:{namespace}:{name}")
}

/// The public key file kept beside a private key file: `sa.key` → `sa.pub`.
pub fn public_key_path(private: &Path) -> PathBuf {
    private.with_extension("pub")
}

/// The key file paths `skiff-control all` and the API server default to:
/// `<data-dir>/pki/sa.key` and `<data-dir>/pki/sa.pub`.
pub fn default_key_paths(data_dir: &Path) -> (PathBuf, PathBuf) {
    let private = data_dir.join("pki").join("sa.key");
    let public = public_key_path(&private);
    (private, public)
}

/// Read the private key at `private`, or generate a P-256 key pair there
/// (mode 0600) when the file does not exist; the public half is written to
/// [`public_key_path`] if missing.
pub fn load_or_create_key(private: &Path) -> Result<rcgen::KeyPair, TokenError> {
    let key_error = |source| TokenError::Key {
        path: private.to_path_buf(),
        source,
    };
    let key = match std::fs::read_to_string(private) {
        Ok(pem) => rcgen::KeyPair::from_pem(&pem).map_err(key_error)?,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            let key =
                rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(key_error)?;
            write_file(private, key.serialize_pem().as_bytes(), 0o600)?;
            tracing::info!(path = %private.display(), "generated the service-account signing key");
            key
        }
        Err(source) => {
            return Err(TokenError::Read {
                path: private.to_path_buf(),
                source,
            });
        }
    };
    let public = public_key_path(private);
    if !public.exists() {
        write_file(&public, key.public_key_pem().as_bytes(), 0o644)?;
    }
    Ok(key)
}

fn write_file(path: &Path, contents: &[u8], mode: u32) -> Result<(), TokenError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let wrap = |source| TokenError::Write {
        path: path.to_path_buf(),
        source,
    };
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(wrap)?;
    }
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .map_err(wrap)?;
    file.write_all(contents).map_err(wrap)
}

/// The JWS algorithm of a key pair.
fn algorithm_of(key: &rcgen::KeyPair, path: &Path) -> Result<Algorithm, TokenError> {
    let algorithm = key.algorithm();
    if algorithm == &rcgen::PKCS_ECDSA_P256_SHA256 {
        Ok(Algorithm::ES256)
    } else if algorithm == &rcgen::PKCS_RSA_SHA256 {
        Ok(Algorithm::RS256)
    } else {
        Err(TokenError::UnsupportedKey {
            path: path.to_path_buf(),
        })
    }
}

/// The key id upstream puts in token headers: the unpadded base64url
/// SHA-256 of the public key's DER.
fn key_id(public_der: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(sha2::Sha256::digest(public_der))
}

/// Signs service-account tokens.
pub struct TokenIssuer {
    key: EncodingKey,
    header: Header,
}

impl std::fmt::Debug for TokenIssuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenIssuer")
            .field("header", &self.header)
            .finish()
    }
}

impl TokenIssuer {
    /// An issuer signing with `key` (read from `path`, named in errors).
    pub fn new(key: &rcgen::KeyPair, path: &Path) -> Result<TokenIssuer, TokenError> {
        let algorithm = algorithm_of(key, path)?;
        let pem = key.serialize_pem();
        let encoding = match algorithm {
            Algorithm::ES256 => EncodingKey::from_ec_pem(pem.as_bytes()),
            _ => EncodingKey::from_rsa_pem(pem.as_bytes()),
        }
        .map_err(|source| TokenError::Sign { source })?;
        let mut header = Header::new(algorithm);
        header.kid = Some(key_id(&key.subject_public_key_info()));
        Ok(TokenIssuer {
            key: encoding,
            header,
        })
    }

    /// A token for the ServiceAccount `namespace/name` (uid `uid`), bound
    /// to the Secret `(name, uid)` if given, valid from `now` (Unix
    /// seconds) for `lifetime`.
    pub fn issue(
        &self,
        namespace: &str,
        name: &str,
        uid: &str,
        secret: Option<(&str, &str)>,
        now: i64,
        lifetime: Duration,
    ) -> Result<String, TokenError> {
        let claims = Claims {
            iss: ISSUER.to_string(),
            sub: service_account_user(namespace, name),
            aud: vec![ISSUER.to_string()],
            exp: now + i64::try_from(lifetime.as_secs()).unwrap_or(i64::MAX / 2),
            iat: now,
            nbf: now,
            kubernetes: KubernetesClaims {
                namespace: namespace.to_string(),
                serviceaccount: Reference {
                    name: name.to_string(),
                    uid: uid.to_string(),
                },
                secret: secret.map(|(name, uid)| Reference {
                    name: name.to_string(),
                    uid: uid.to_string(),
                }),
            },
        };
        jsonwebtoken::encode(&self.header, &claims, &self.key)
            .map_err(|source| TokenError::Sign { source })
    }
}

/// Verifies service-account tokens for the API server.
pub struct ServiceAccountTokenAuthenticator {
    key: DecodingKey,
    validation: Validation,
}

impl std::fmt::Debug for ServiceAccountTokenAuthenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceAccountTokenAuthenticator")
            .field("algorithms", &self.validation.algorithms)
            .finish()
    }
}

impl ServiceAccountTokenAuthenticator {
    /// A verifier for the public key PEM `pem` (SPKI `PUBLIC KEY`); `path`
    /// names the source in errors.
    pub fn from_public_pem(pem: &str, path: &Path) -> Result<Self, TokenError> {
        let (key, algorithm) = match DecodingKey::from_ec_pem(pem.as_bytes()) {
            Ok(key) => (key, Algorithm::ES256),
            Err(_) => match DecodingKey::from_rsa_pem(pem.as_bytes()) {
                Ok(key) => (key, Algorithm::RS256),
                Err(_) => {
                    return Err(TokenError::UnsupportedKey {
                        path: path.to_path_buf(),
                    });
                }
            },
        };
        let mut validation = Validation::new(algorithm);
        validation.set_issuer(&[ISSUER]);
        validation.set_audience(&[ISSUER]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        validation.validate_nbf = true;
        Ok(ServiceAccountTokenAuthenticator { key, validation })
    }

    /// A verifier for the key in `path`: a public key, or a private key
    /// whose public half is used (as upstream's `--service-account-key-file`).
    pub fn from_key_file(path: &Path) -> Result<Self, TokenError> {
        let text = std::fs::read_to_string(path).map_err(|source| TokenError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        if text.contains("PRIVATE KEY") {
            let key = rcgen::KeyPair::from_pem(&text).map_err(|source| TokenError::Key {
                path: path.to_path_buf(),
                source,
            })?;
            return Self::from_public_pem(&key.public_key_pem(), path);
        }
        Self::from_public_pem(&text, path)
    }

    /// The API server's verifier: from `key_file` when given, else from
    /// `<data-dir>/pki/sa.pub`, generating the key pair under
    /// `<data-dir>/pki` first if it does not exist (so that `skiff-control
    /// all`'s token controller and API server share it).
    pub fn for_apiserver(key_file: Option<&Path>, data_dir: &Path) -> Result<Self, TokenError> {
        match key_file {
            Some(path) => Self::from_key_file(path),
            None => {
                let (private, public) = default_key_paths(data_dir);
                if !public.exists() {
                    load_or_create_key(&private)?;
                }
                Self::from_key_file(&public)
            }
        }
    }

    fn verify(&self, token: &str) -> Option<Claims> {
        // Cheap rejection of tokens that are not JWTs (static tokens).
        if token.bytes().filter(|b| *b == b'.').count() != 2 {
            return None;
        }
        let data = jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation).ok()?;
        let claims = data.claims;
        let k = &claims.kubernetes;
        (claims.sub == service_account_user(&k.namespace, &k.serviceaccount.name)).then_some(claims)
    }
}

impl TokenAuthenticator for ServiceAccountTokenAuthenticator {
    fn authenticate_token(&self, token: &str) -> Option<UserInfo> {
        let claims = self.verify(token)?;
        let namespace = &claims.kubernetes.namespace;
        Some(UserInfo {
            name: claims.sub.clone(),
            uid: claims.kubernetes.serviceaccount.uid.clone(),
            groups: vec![
                SERVICE_ACCOUNTS_GROUP.to_string(),
                format!("{SERVICE_ACCOUNTS_GROUP}:{namespace}"),
            ],
        })
    }
}

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
                tracing::error!(error = %super::endpoints::chain(&error), "the service-account token controller does not run");
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
    verifier: ServiceAccountTokenAuthenticator,
}

fn load_signer(path: &Path) -> Result<Signer, TokenError> {
    let key = load_or_create_key(path)?;
    Ok(Signer {
        issuer: TokenIssuer::new(&key, path)?,
        verifier: ServiceAccountTokenAuthenticator::from_public_pem(&key.public_key_pem(), path)?,
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

async fn run_default_accounts(ctx: Arc<Context>, shutdown: CancellationToken) {
    let namespaces: Api<Namespace> = Api::all(ctx.client.clone());
    let accounts: Api<ServiceAccount> = Api::all(ctx.client.clone());
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
        .graceful_shutdown_on(async move { shutdown.cancelled().await })
        .run(reconcile_namespace, error_policy, ctx)
        .for_each(|_| async {})
        .await;
}

fn error_policy<K, C>(_: Arc<K>, error: &ReconcileError, _: Arc<C>) -> Action {
    tracing::warn!(error = %super::endpoints::chain(error), "service-account reconcile failed");
    Action::requeue(Duration::from_secs(5))
}

async fn reconcile_namespace(
    namespace: Arc<Namespace>,
    ctx: Arc<Context>,
) -> Result<Action, ReconcileError> {
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
    Ok(Action::await_change())
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
    fn generated_keys_sign_tokens_the_apiserver_accepts() {
        let dir = tempfile::tempdir().expect("tempdir");
        let signer = signer(dir.path());
        let (private, public) = default_key_paths(dir.path());
        assert!(private.exists() && public.exists());
        let authenticator =
            ServiceAccountTokenAuthenticator::for_apiserver(None, dir.path()).expect("verifier");
        let now = jiff::Timestamp::now().as_second();
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
        let user = authenticator
            .authenticate_token(&token)
            .expect("valid token");
        assert_eq!(user.name, "system:serviceaccount:ns:builder");
        assert_eq!(user.uid, "sa-uid");
        assert_eq!(
            user.groups,
            ["system:serviceaccounts", "system:serviceaccounts:ns"]
        );
        // The private key file also works as the API server's key file.
        let from_private =
            ServiceAccountTokenAuthenticator::for_apiserver(Some(&private), dir.path())
                .expect("verifier");
        assert!(from_private.authenticate_token(&token).is_some());
        // Reloading reuses the same key.
        let again = signer_token(&load_signer(&private).expect("reload"), now);
        assert!(authenticator.authenticate_token(&again).is_some());
    }

    fn signer_token(signer: &Signer, now: i64) -> String {
        signer
            .issuer
            .issue(
                "ns",
                "builder",
                "sa-uid",
                None,
                now,
                Duration::from_secs(600),
            )
            .expect("token")
    }

    #[test]
    fn bad_expired_and_foreign_tokens_are_rejected() {
        let dir = tempfile::tempdir().expect("tempdir");
        let signer = signer(dir.path());
        let authenticator =
            ServiceAccountTokenAuthenticator::for_apiserver(None, dir.path()).expect("verifier");
        let now = jiff::Timestamp::now().as_second();
        let token = signer_token(&signer, now);
        assert!(authenticator.authenticate_token("static-token").is_none());
        let mut tampered = token.clone();
        tampered.pop();
        tampered.push(if token.ends_with('A') { 'B' } else { 'A' });
        assert!(authenticator.authenticate_token(&tampered).is_none());
        let expired = signer_token(&signer, now - 7200);
        assert!(
            authenticator.authenticate_token(&expired).is_none(),
            "expired token accepted"
        );
        // Another cluster's key.
        let other = tempfile::tempdir().expect("tempdir");
        let other_signer = self::signer(other.path());
        assert!(
            authenticator
                .authenticate_token(&signer_token(&other_signer, now))
                .is_none()
        );
        // A wrong issuer.
        let wrong = Claims {
            iss: "someone-else".into(),
            sub: service_account_user("ns", "builder"),
            aud: vec![ISSUER.into()],
            exp: now + 600,
            iat: now,
            nbf: now,
            kubernetes: KubernetesClaims {
                namespace: "ns".into(),
                serviceaccount: Reference {
                    name: "builder".into(),
                    uid: "u".into(),
                },
                secret: None,
            },
        };
        let forged = jsonwebtoken::encode(&signer.issuer.header, &wrong, &signer.issuer.key)
            .expect("encode");
        assert!(authenticator.authenticate_token(&forged).is_none());
        let mut wrong_audience = wrong.clone();
        wrong_audience.iss = ISSUER.into();
        wrong_audience.aud = vec!["vault".into()];
        let forged =
            jsonwebtoken::encode(&signer.issuer.header, &wrong_audience, &signer.issuer.key)
                .expect("encode");
        assert!(authenticator.authenticate_token(&forged).is_none());
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
