//! Service-account tokens: the signing key (generated on first use), the
//! issuer that signs tokens for the token controller, and the verifier the
//! API server authenticates them with. Tokens are ES256 (or RS256 with an
//! RSA key given by the operator), with upstream's claims.

use std::path::{Path, PathBuf};
use std::time::Duration;

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use rcgen::PublicKeyData;
use serde::{Deserialize, Serialize};
use sha2::Digest;

/// The issuer (`iss`) of the tokens, upstream's default for clusters
/// named `cluster.local`; also the audience they are issued for.
pub const ISSUER: &str = "https://kubernetes.default.svc.cluster.local";

/// The group of every service account.
pub const SERVICE_ACCOUNTS_GROUP: &str = "system:serviceaccounts";

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
pub struct Claims {
    /// Issuer: [`ISSUER`].
    pub iss: String,
    /// Subject: `system:serviceaccount:<ns>:<name>`.
    pub sub: String,
    /// Audiences: [`ISSUER`].
    pub aud: Vec<String>,
    /// Expiry, Unix seconds.
    pub exp: i64,
    /// Issued at, Unix seconds.
    pub iat: i64,
    /// Not before, Unix seconds.
    pub nbf: i64,
    /// What the token names.
    #[serde(rename = "kubernetes.io")]
    pub kubernetes: KubernetesClaims,
}

/// The `kubernetes.io` claims: the account and the Secret a token is bound to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KubernetesClaims {
    /// The account's namespace.
    pub namespace: String,
    /// The account.
    pub serviceaccount: Reference,
    /// The Secret the token was written into, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<Reference>,
    /// The pod the token is bound to (a TokenRequest's `boundObjectRef`), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<Reference>,
}

/// An object a token names.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reference {
    /// Its name.
    pub name: String,
    /// Its uid.
    pub uid: String,
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
                pod: None,
            },
        };
        self.sign(&claims)
    }

    /// A token carrying exactly `claims`.
    pub fn sign(&self, claims: &Claims) -> Result<String, TokenError> {
        jsonwebtoken::encode(&self.header, claims, &self.key)
            .map_err(|source| TokenError::Sign { source })
    }
}

/// Verifies service-account tokens (the API server's authenticator, and
/// the token controller's check of the tokens it wrote).
pub struct TokenVerifier {
    key: DecodingKey,
    validation: Validation,
}

impl std::fmt::Debug for TokenVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenVerifier")
            .field("algorithms", &self.validation.algorithms)
            .finish()
    }
}

impl TokenVerifier {
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
        Ok(TokenVerifier { key, validation })
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

    /// The claims of `token` if it is a valid service-account token:
    /// signed with this key, of this issuer and audience, unexpired, and
    /// naming the account its subject names.
    pub fn verify(&self, token: &str) -> Option<Claims> {
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
